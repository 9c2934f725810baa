//! Building ISO9660 and FAT images in memory and writing them atomically.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::Path;

use hadris_iso::read::PathSeparator;
use hadris_iso::write::options::{BaseIsoLevel, CreationFeatures, IsoFormatOptions};
use hadris_iso::write::{InputEntry, InputMetadata, InputTree, IsoImageWriter};

use crate::ContextError;

/// A file to place in an image; `path` uses `/` between directories.
pub(crate) struct ImageFile {
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

impl ImageFile {
    pub fn new(path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        ImageFile {
            path: path.to_string(),
            contents: contents.into(),
            mode,
        }
    }
}

fn insert(entries: &mut Vec<InputEntry>, components: &[&str], file: &ImageFile) {
    let dir_meta = InputMetadata {
        mode: Some(0o755),
        uid: Some(0),
        gid: Some(0),
        ..InputMetadata::default()
    };
    match components {
        [name] => entries.push(
            InputEntry::file(*name, file.contents.clone()).with_metadata(InputMetadata {
                mode: Some(file.mode),
                uid: Some(0),
                gid: Some(0),
                ..InputMetadata::default()
            }),
        ),
        [dir, rest @ ..] => {
            let pos = entries.iter().position(|e| e.name.as_str() == *dir);
            let idx = match pos {
                Some(i) => i,
                None => {
                    entries.push(InputEntry::directory(*dir, Vec::new()).with_metadata(dir_meta));
                    entries.len() - 1
                }
            };
            if let hadris_iso::write::InputEntryKind::Directory(children) = &mut entries[idx].kind {
                insert(children, rest, file);
            }
        }
        [] => {}
    }
}

/// An ISO9660 image with Rock Ridge (POSIX names and modes, what Linux guests
/// read) and Joliet (what Windows guests read), like `mkisofs -J -R`.
pub(crate) fn build_iso(label: &str, files: &[ImageFile]) -> Result<Vec<u8>, ContextError> {
    let mut entries = Vec::new();
    for file in files {
        let components: Vec<&str> = file.path.split('/').collect();
        insert(&mut entries, &components, file);
    }
    let tree = InputTree::new(PathSeparator::ForwardSlash, entries);
    let mut features = CreationFeatures::extensions();
    // Level 2 keeps the plain ISO names close to the real ones (`META_DATA.`
    // rather than `META_DAT.`) for readers that ignore both extensions.
    features.filenames = BaseIsoLevel::Level2 {
        supports_lowercase: false,
        supports_rrip: true,
    };
    let options = IsoFormatOptions {
        volume_name: label.to_string(),
        system_id: Some("LINUX".to_string()),
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("STRATUS CONTEXTUALIZER".to_string()),
        sector_size: 2048,
        path_separator: PathSeparator::ForwardSlash,
        features,
        strict_charset: false,
    };
    let cursor = IsoImageWriter::create(Cursor::new(Vec::new()), tree, options).map_err(|e| {
        ContextError::ImageBuild {
            kind: "ISO9660",
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    Ok(cursor.into_inner())
}

/// Size of StratusLab's CloudInit disk, kept so that guests that check it agree.
pub const CLOUD_INIT_DISK_BYTES: u64 = 1_024_000;

/// A FAT image of `size` bytes. `label` goes both in the boot sector and in a
/// root-directory volume entry, because tools disagree on which one they read
/// (blkid prefers the directory entry, `fatlabel` the boot sector).
pub(crate) fn build_fat(
    label: [u8; 11],
    volume_id: u32,
    size: u64,
    files: &[ImageFile],
) -> Result<Vec<u8>, ContextError> {
    let build_err = |source: std::io::Error| ContextError::ImageBuild {
        kind: "FAT",
        source,
    };
    let full_err = |source: std::io::Error| ContextError::DiskFull {
        kind: "FAT",
        size,
        source,
    };
    let mut cursor = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut cursor,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(volume_id),
    )
    .map_err(build_err)?;
    write_fat_label_entry(&mut cursor, label).map_err(build_err)?;
    cursor.seek(SeekFrom::Start(0)).map_err(build_err)?;
    {
        let fs = fatfs::FileSystem::new(&mut cursor, fatfs::FsOptions::new()).map_err(build_err)?;
        for file in files {
            let mut dir = fs.root_dir();
            let components: Vec<&str> = file.path.split('/').collect();
            let (name, parents) = components.split_last().expect("split yields one item");
            for parent in parents {
                dir = match dir.open_dir(parent) {
                    Ok(d) => d,
                    Err(_) => dir.create_dir(parent).map_err(full_err)?,
                };
            }
            let mut handle = dir.create_file(name).map_err(full_err)?;
            handle.truncate().map_err(full_err)?;
            handle.write_all(&file.contents).map_err(full_err)?;
            handle.flush().map_err(full_err)?;
        }
        fs.unmount().map_err(build_err)?;
    }
    let mut image = cursor.into_inner();
    repair_fatfs_directories(&mut image).map_err(build_err)?;
    Ok(image)
}

/// Geometry of a FAT12/16 volume, read back from its boot sector.
struct FatLayout {
    fat12: bool,
    fat_start: usize,
    root_start: usize,
    root_len: usize,
    data_start: usize,
    cluster_len: usize,
}

impl FatLayout {
    fn read(img: &[u8]) -> std::io::Result<Self> {
        let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]) as usize;
        let bytes_per_sector = u16_at(11);
        let sectors_per_cluster = img[13] as usize;
        let reserved = u16_at(14);
        let fats = img[16] as usize;
        let root_entries = u16_at(17);
        let total_sectors = match u16_at(19) {
            0 => u32::from_le_bytes([img[32], img[33], img[34], img[35]]) as usize,
            n => n,
        };
        let sectors_per_fat = u16_at(22);
        if bytes_per_sector == 0 || sectors_per_cluster == 0 || sectors_per_fat == 0 {
            return Err(std::io::Error::other(
                "unexpected FAT layout (FAT32 or damaged boot sector)",
            ));
        }
        let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
        let data_sector = reserved + fats * sectors_per_fat + root_sectors;
        let clusters = (total_sectors - data_sector) / sectors_per_cluster;
        Ok(FatLayout {
            fat12: clusters < 4085,
            fat_start: reserved * bytes_per_sector,
            root_start: (reserved + fats * sectors_per_fat) * bytes_per_sector,
            root_len: root_entries * 32,
            data_start: data_sector * bytes_per_sector,
            cluster_len: sectors_per_cluster * bytes_per_sector,
        })
    }

    fn next_cluster(&self, img: &[u8], cluster: usize) -> Option<usize> {
        let value = if self.fat12 {
            let off = self.fat_start + cluster * 3 / 2;
            let pair = u16::from_le_bytes([img[off], img[off + 1]]) as usize;
            if cluster % 2 == 1 {
                pair >> 4
            } else {
                pair & 0xFFF
            }
        } else {
            let off = self.fat_start + cluster * 2;
            u16::from_le_bytes([img[off], img[off + 1]]) as usize
        };
        let end = if self.fat12 { 0xFF8 } else { 0xFFF8 };
        (2..end).contains(&value).then_some(value)
    }

    /// Byte ranges of a directory's clusters, bounded against corrupt chains.
    fn chain(&self, img: &[u8], first: usize) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut cluster = Some(first);
        while let Some(c) = cluster {
            let start = self.data_start + (c - 2) * self.cluster_len;
            if start + self.cluster_len > img.len() || out.len() > img.len() / self.cluster_len {
                break;
            }
            out.push(start..start + self.cluster_len);
            cluster = self.next_cluster(img, c);
        }
        out
    }
}

/// Repairs two `fatfs` 0.3 slips that make `fsck.fat` report damage, in every
/// directory: it writes long-name entries in front of `.` and `..` (dropped
/// here), and gives names with a leading dot a short name starting with `.`
/// (`.SSH`), which is invalid (renamed `SSH~1`, as other FAT writers do).
fn repair_fatfs_directories(img: &mut [u8]) -> std::io::Result<()> {
    let layout = FatLayout::read(img)?;
    let mut pending = vec![vec![layout.root_start..layout.root_start + layout.root_len]];
    while let Some(ranges) = pending.pop() {
        let bytes: Vec<u8> = ranges
            .iter()
            .flat_map(|r| img[r.clone()].to_vec())
            .collect();
        let entries: Vec<&[u8]> = bytes.chunks_exact(32).take_while(|e| e[0] != 0).collect();
        let mut taken: Vec<[u8; 11]> = entries
            .iter()
            .filter(|e| e[11] & 0x3F != 0x0F)
            .map(|e| e[..11].try_into().expect("11 bytes"))
            .collect();
        let mut kept: Vec<Vec<u8>> = Vec::new();
        let mut run: Vec<Vec<u8>> = Vec::new();
        for entry in entries {
            if entry[11] & 0x3F == 0x0F && entry[0] != 0xE5 {
                run.push(entry.to_vec());
                continue;
            }
            let mut entry = entry.to_vec();
            let dot = &entry[..11] == b".          " || &entry[..11] == b"..         ";
            if dot {
                run.clear();
            } else if entry[0] == b'.' || entry[0] == b' ' {
                let name = dotless_short_name(&entry[..11], &taken);
                taken.push(name);
                entry[..11].copy_from_slice(&name);
                let sum = lfn_checksum(&name);
                for lfn in &mut run {
                    lfn[13] = sum;
                }
            }
            let is_subdir = entry[11] & 0x10 != 0 && entry[11] & 0x08 == 0 && entry[0] != 0xE5;
            let first = u16::from_le_bytes([entry[26], entry[27]]) as usize;
            if is_subdir && !dot && first >= 2 {
                pending.push(layout.chain(img, first));
            }
            kept.append(&mut run);
            kept.push(entry);
        }
        kept.append(&mut run);
        let mut fixed: Vec<u8> = kept.concat();
        fixed.resize(bytes.len(), 0);
        let mut offset = 0;
        for r in &ranges {
            let len = r.len();
            img[r.clone()].copy_from_slice(&fixed[offset..offset + len]);
            offset += len;
        }
    }
    Ok(())
}

fn dotless_short_name(name: &[u8], taken: &[[u8; 11]]) -> [u8; 11] {
    let valid = |b: &u8| *b != b'.' && *b != b' ';
    let base: Vec<u8> = name[..8].iter().copied().filter(valid).collect();
    // `.ssh` arrives as an empty base with extension `SSH`: the extension is
    // really the name.
    let (base, ext): (Vec<u8>, &[u8]) = if base.is_empty() {
        (name[8..].iter().copied().filter(valid).collect(), b"   ")
    } else {
        (base, &name[8..11])
    };
    let base = if base.is_empty() { b"_".to_vec() } else { base };
    let mut n: u32 = 1;
    loop {
        let tail = format!("~{n}");
        let keep = base.len().min(8 - tail.len().min(7));
        let mut candidate = [b' '; 11];
        candidate[..keep].copy_from_slice(&base[..keep]);
        candidate[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        candidate[8..].copy_from_slice(ext);
        if !taken.contains(&candidate) || n >= 999_999 {
            return candidate;
        }
        n += 1;
    }
}

fn lfn_checksum(short_name: &[u8; 11]) -> u8 {
    short_name
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// Adds the volume-label entry (attribute 0x08) as the first root-directory
/// slot, which `fatfs` 0.3 does not write. Only FAT12/16 are produced here, so
/// the root directory is the fixed region after the FATs.
fn write_fat_label_entry(cursor: &mut Cursor<Vec<u8>>, label: [u8; 11]) -> std::io::Result<()> {
    let buf = cursor.get_mut();
    let root = FatLayout::read(buf)?.root_start;
    let entry = &mut buf[root..root + 32];
    entry.fill(0);
    entry[..11].copy_from_slice(&label);
    entry[11] = 0x08;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// so that a reader sees either the old file or the complete new one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ContextError> {
    let err = |source: std::io::Error| ContextError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".stratus-context-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}
