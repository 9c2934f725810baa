//! Direct kernel boot from whole-disk images.
//!
//! Marketplace machine images are whole disks (an MBR or GPT partition table, an
//! ext2/3/4 root filesystem, a bootloader) or bare filesystems. Our VMM boots a kernel
//! directly, so this module finds the kernel and initrd inside the image the way GRUB's
//! default entry would, without mounting anything: the partition table is read with
//! `mbrman`/`gpt`, the filesystem with `ext4-view`.
//!
//! Kernel choice (as Debian's `grub-mkconfig` `10_linux`): every `vmlinuz-*`, `vmlinux-*`
//! or `kernel-*` file in `/boot` (or, on a separate boot partition, at its top level); the
//! highest version by Debian version ordering (`dpkg --compare-versions`) wins; its initrd is
//! the first of `initrd.img-V`, `initrd-V.img`, `initrd-V.gz`, `initrd-V`, `initramfs-V.img`
//! that exists beside it. With no such file, the `/vmlinuz` and `/initrd.img` symlinks (or
//! `/boot/vmlinuz`, `/boot/initrd.img`) are resolved and used.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ext4_view::{Ext4, Ext4Read};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::metadata::ImageFormat;

/// Sector size assumed for partition tables of image files.
const SECTOR: u64 = 512;
/// Offset and value of the ext2/3/4 superblock magic (superblock at 1024, magic at +56).
const EXT_MAGIC_OFFSET: u64 = 1024 + 56;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];
/// File names (in the boot directory) that may hold the initrd of kernel version `V`.
const INITRD_PATTERNS: &[(&str, &str)] = &[
    ("initrd.img-", ""),
    ("initrd-", ".img"),
    ("initrd-", ".gz"),
    ("initrd-", ""),
    ("initramfs-", ".img"),
];
const KERNEL_PREFIXES: &[&str] = &["vmlinuz-", "vmlinux-", "kernel-"];

/// What was found in a disk image for direct kernel boot; stored as JSON beside the
/// cached image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// The extracted kernel.
    pub kernel: PathBuf,
    /// Its size in bytes.
    pub kernel_bytes: u64,
    /// The extracted initrd, if the image has one for the chosen kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_bytes: Option<u64>,
    /// UUID of the root filesystem (for `root=UUID=…`).
    pub root_uuid: String,
    /// Kernel version (the file name after `vmlinuz-`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// Path of the kernel inside its filesystem.
    pub kernel_source: String,
    /// Path of the initrd inside its filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_source: Option<String>,
    /// `mbr`, `gpt` or `none` (a bare filesystem image).
    pub partition_table: String,
    /// Number of the partition holding the root filesystem (1-based), if partitioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_partition: Option<u32>,
}

impl BootInfo {
    /// The `root=` kernel argument for this image.
    pub fn root_arg(&self) -> String {
        format!("root=UUID={}", self.root_uuid)
    }

    /// Whether the extracted files are still there with their recorded sizes.
    pub fn files_intact(&self) -> bool {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        len(&self.kernel) == Some(self.kernel_bytes)
            && match (&self.initrd, self.initrd_bytes) {
                (Some(p), Some(n)) => len(p) == Some(n),
                (None, None) => true,
                _ => false,
            }
    }
}

/// A kernel (and initrd) chosen inside one filesystem, not yet extracted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSelection {
    pub kernel_source: String,
    pub kernel_version: Option<String>,
    pub initrd_source: Option<String>,
    pub root_uuid: String,
    pub partition_table: String,
    /// Partition (1-based) holding the kernel, if partitioned.
    pub boot_partition: Option<u32>,
    /// Partition (1-based) holding the root filesystem, if partitioned.
    pub root_partition: Option<u32>,
}

fn not_bootable(image: &Path, reason: impl Into<String>) -> Error {
    Error::NotBootable {
        image: image.display().to_string(),
        reason: reason.into(),
    }
}

/// Compare two Debian version strings as `dpkg --compare-versions` does
/// (`[epoch:]upstream[-revision]`).
pub fn compare_debian_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.bytes().all(|c| c.is_ascii_digit()) && !e.is_empty() => {
                (e.parse().unwrap_or(0), r)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// dpkg's `verrevcmp`: alternating non-digit parts (letters before non-letters, `~`
/// before everything, even the end) and numeric parts.
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    fn order(c: Option<&u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(*c),
            Some(b'~') => -1,
            Some(c) => i32::from(*c) + 256,
        }
    }
    let digit = |s: &[u8], i: usize| s.get(i).is_some_and(u8::is_ascii_digit);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i)), order(b.get(j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// A byte range of the image file, read by `ext4-view`.
struct Slice {
    file: File,
    start: u64,
    len: u64,
}

impl Ext4Read for Slice {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte
            .checked_add(dst.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(format!(
                "read of {} bytes at {start_byte} is past the end of the filesystem ({} bytes)",
                dst.len(),
                self.len
            )
            .into());
        }
        self.file.seek(SeekFrom::Start(self.start + start_byte))?;
        self.file.read_exact(dst)?;
        Ok(())
    }
}

/// A region of the image that may hold a filesystem.
#[derive(Clone, Copy, Debug)]
struct Region {
    /// 1-based partition number; `None` for a bare filesystem image.
    number: Option<u32>,
    start: u64,
    len: u64,
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// The partition table kind and the regions to look at.
fn regions(image: &Path) -> Result<(String, Vec<Region>)> {
    let mut f = File::open(image).map_err(|e| Error::io(image, e))?;
    let size = f.metadata().map_err(|e| Error::io(image, e))?.len();
    if size < 2048 {
        return Err(not_bootable(
            image,
            format!(
                "the image is only {size} bytes: too small for a partition table or a filesystem"
            ),
        ));
    }
    let mut head = [0u8; 512];
    read_at(&mut f, 0, &mut head).map_err(|e| Error::io(image, e))?;
    if ImageFormat::detect(&head) == ImageFormat::Qcow2 {
        return Err(not_bootable(
            image,
            "qcow2 images cannot be inspected for direct kernel boot (only raw images)",
        ));
    }
    let has_mbr_signature = head[510] == 0x55 && head[511] == 0xaa;
    let mbr_types: Vec<u8> = (0..4).map(|k| head[446 + k * 16 + 4]).collect();
    if has_mbr_signature && mbr_types.contains(&0xee) {
        refuse_gpt_headers_gpt_panics_on(image, &mut f, size)?;
        let disk = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .open_from_device(f)
            .map_err(|e| not_bootable(image, format!("unreadable GPT partition table: {e}")))?;
        let mut out = Vec::new();
        for (n, p) in disk.partitions() {
            if !p.is_used() {
                continue;
            }
            let (Ok(start), Ok(len)) = (
                p.bytes_start(gpt::disk::LogicalBlockSize::Lb512),
                p.bytes_len(gpt::disk::LogicalBlockSize::Lb512),
            ) else {
                continue;
            };
            out.push(Region {
                number: Some(*n),
                start,
                len,
            });
        }
        return Ok(("gpt".into(), out));
    }
    if has_mbr_signature && mbr_types.iter().any(|t| *t != 0) {
        // mbrman looks for the partitions' common alignment and panics when every one in
        // use starts at sector 0 (where the MBR itself is).
        if let Some(k) = (0..4).find(|&k| {
            let entry = &head[446 + k * 16..446 + (k + 1) * 16];
            entry[4] != 0 && entry[8..12] == [0; 4]
        }) {
            return Err(not_bootable(
                image,
                format!(
                    "MBR partition {} starts at sector 0, over the partition table",
                    k + 1
                ),
            ));
        }
        let mbr = mbrman::MBR::read_from(&mut f, SECTOR as u32)
            .map_err(|e| not_bootable(image, format!("unreadable MBR partition table: {e}")))?;
        let mut out = Vec::new();
        for (n, p) in mbr.iter() {
            // Extended partitions (0x05, 0x0f, 0x85) are containers: mbrman lists their
            // logical partitions from number 5 on.
            if !p.is_used() || matches!(p.sys, 0x05 | 0x0f | 0x85) {
                continue;
            }
            out.push(Region {
                number: Some(n as u32),
                start: u64::from(p.starting_lba) * SECTOR,
                len: u64::from(p.sectors) * SECTOR,
            });
        }
        return Ok(("mbr".into(), out));
    }
    let mut magic = [0u8; 2];
    read_at(&mut f, EXT_MAGIC_OFFSET, &mut magic).map_err(|e| Error::io(image, e))?;
    if magic == EXT_MAGIC {
        return Ok((
            "none".into(),
            vec![Region {
                number: None,
                start: 0,
                len: size,
            }],
        ));
    }
    Err(not_bootable(
        image,
        "no MBR or GPT partition table and no ext2/3/4 filesystem",
    ))
}

/// Most GPT partition entries a disk is taken with: 128 is what partitioning tools write.
const MAX_GPT_ENTRIES: u32 = 1024;

/// `gpt` asserts 128-byte partition entries (the node agent aborts on a panic) and sizes
/// a buffer by the entry count, so a header asking otherwise is refused before it reads
/// one. Both headers are looked at: `gpt` takes the backup when the primary is damaged.
fn refuse_gpt_headers_gpt_panics_on(image: &Path, f: &mut File, size: u64) -> Result<()> {
    let backup = (size - SECTOR) / SECTOR * SECTOR;
    for (which, at) in [("primary", SECTOR), ("backup", backup)] {
        let mut header = [0u8; 92];
        read_at(f, at, &mut header).map_err(|e| Error::io(image, e))?;
        if &header[..8] != b"EFI PART" {
            continue;
        }
        let field = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let (entries, entry_size) = (field(80), field(84));
        if entry_size != 128 || entries > MAX_GPT_ENTRIES {
            return Err(not_bootable(
                image,
                format!(
                    "the {which} GPT header lists {entries} partition entries of {entry_size} \
                     bytes (only 128-byte entries, at most {MAX_GPT_ENTRIES}, are read)"
                ),
            ));
        }
    }
    Ok(())
}

fn open_fs(image: &Path, r: Region) -> std::result::Result<Ext4, String> {
    let file = File::open(image).map_err(|e| e.to_string())?;
    Ext4::load(Box::new(Slice {
        file,
        start: r.start,
        len: r.len,
    }))
    .map_err(|e| format!("not an ext2/3/4 filesystem ({e})"))
}

fn is_file(fs: &Ext4, path: &str) -> bool {
    fs.metadata(path)
        .map(|m| m.file_type().is_regular_file())
        .unwrap_or(false)
}

/// The GRUB-default kernel in directory `dir` of `fs` (`/boot` or `/`), if any.
fn kernel_in_dir(fs: &Ext4, dir: &str) -> Option<(String, String, Option<String>)> {
    let entries = fs.read_dir(dir).ok()?;
    let base = if dir == "/" { "" } else { dir };
    let mut found: Vec<(String, String)> = Vec::new();
    for e in entries.flatten() {
        let Ok(name) = e.file_name().as_str().map(str::to_string) else {
            continue;
        };
        let Some(version) = KERNEL_PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .filter(|v| !v.is_empty())
        else {
            continue;
        };
        if [".sig", ".old", ".rpmsave", ".rpmnew"]
            .iter()
            .any(|s| version.ends_with(s))
            || version.contains(".dpkg-")
        {
            continue;
        }
        let path = format!("{base}/{name}");
        if is_file(fs, &path) {
            found.push((version.to_string(), path));
        }
    }
    let (version, path) = found
        .into_iter()
        .max_by(|a, b| compare_debian_versions(&a.0, &b.0).then_with(|| a.1.cmp(&b.1)))?;
    let initrd = INITRD_PATTERNS
        .iter()
        .map(|(pre, suf)| format!("{base}/{pre}{version}{suf}"))
        .find(|p| is_file(fs, p));
    Some((path, version, initrd))
}

/// The kernel named by the `/vmlinuz` (or `/boot/vmlinuz`) symlink, resolved.
fn kernel_from_symlinks(
    fs: &Ext4,
) -> std::result::Result<Option<(String, Option<String>)>, String> {
    for (k, i) in [
        ("/vmlinuz", "/initrd.img"),
        ("/boot/vmlinuz", "/boot/initrd.img"),
    ] {
        if fs.symlink_metadata(k).is_err() {
            continue;
        }
        let kernel = fs
            .canonicalize(k)
            .map_err(|e| format!("{k} cannot be resolved ({e})"))?;
        let kernel = kernel
            .to_str()
            .map_err(|_| format!("{k} points to a non-UTF-8 path"))?
            .to_string();
        if !is_file(fs, &kernel) {
            return Err(format!(
                "{k} resolves to {kernel}, which is not a regular file"
            ));
        }
        let initrd = match fs.canonicalize(i) {
            Ok(p) => p
                .to_str()
                .ok()
                .map(str::to_string)
                .filter(|p| is_file(fs, p)),
            Err(_) => None,
        };
        return Ok(Some((kernel, initrd)));
    }
    Ok(None)
}

fn version_of(kernel_path: &str) -> Option<String> {
    let name = kernel_path.rsplit('/').next()?;
    KERNEL_PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .map(str::to_string)
}

/// Whether `fs` looks like a root filesystem.
fn looks_like_root(fs: &Ext4) -> bool {
    ["/etc/fstab", "/sbin/init", "/etc/os-release"]
        .iter()
        .any(|p| fs.symlink_metadata(*p).is_ok())
}

/// Find the kernel, initrd and root filesystem of a raw disk image (partitioned or a bare
/// filesystem), without extracting anything.
pub fn inspect(image: &Path) -> Result<BootSelection> {
    let (table, regions) = regions(image)?;
    if regions.is_empty() {
        return Err(not_bootable(
            image,
            format!("the {table} partition table has no partition"),
        ));
    }
    let mut reasons = Vec::new();
    let mut filesystems = Vec::new();
    for r in &regions {
        let what = match r.number {
            Some(n) => format!("partition {n}"),
            None => "the filesystem".to_string(),
        };
        match open_fs(image, *r) {
            Ok(fs) => filesystems.push((*r, fs, what)),
            Err(e) => reasons.push(format!("{what}: {e}")),
        }
    }
    if filesystems.is_empty() {
        return Err(not_bootable(
            image,
            format!("no ext2/3/4 filesystem found: {}", reasons.join("; ")),
        ));
    }
    let selection = |r: &Region,
                     fs: &Ext4,
                     kernel: String,
                     version: Option<String>,
                     initrd: Option<String>,
                     root: Option<(&Region, &Ext4)>| {
        let (root_region, root_fs) = root.unwrap_or((r, fs));
        BootSelection {
            kernel_source: kernel,
            kernel_version: version,
            initrd_source: initrd,
            root_uuid: root_fs.uuid().to_string(),
            partition_table: table.clone(),
            boot_partition: r.number,
            root_partition: root_region.number,
        }
    };
    // A root filesystem with its kernels in /boot, or the /vmlinuz symlinks.
    for (r, fs, what) in &filesystems {
        if let Some((kernel, version, initrd)) = kernel_in_dir(fs, "/boot") {
            return Ok(selection(r, fs, kernel, Some(version), initrd, None));
        }
        match kernel_from_symlinks(fs) {
            Ok(Some((kernel, initrd))) => {
                let version = version_of(&kernel);
                return Ok(selection(r, fs, kernel, version, initrd, None));
            }
            Ok(None) => reasons.push(format!("{what}: no kernel in /boot and no /vmlinuz")),
            Err(e) => reasons.push(format!("{what}: {e}")),
        }
    }
    // A separate /boot partition (kernels at its top level) and a root elsewhere.
    for (r, fs, what) in &filesystems {
        let Some((kernel, version, initrd)) = kernel_in_dir(fs, "/") else {
            continue;
        };
        if looks_like_root(fs) {
            return Ok(selection(r, fs, kernel, Some(version), initrd, None));
        }
        let root = filesystems
            .iter()
            .find(|(r2, fs2, _)| r2.start != r.start && looks_like_root(fs2));
        match root {
            Some((r2, fs2, _)) => {
                return Ok(selection(r, fs, kernel, Some(version), initrd, Some((r2, fs2))))
            }
            None => reasons.push(format!(
                "{what} holds kernel {kernel} but no partition holds a root filesystem (/etc/fstab, /sbin/init)"
            )),
        }
    }
    Err(not_bootable(
        image,
        format!("no kernel found: {}", reasons.join("; ")),
    ))
}

/// Largest kernel or initrd taken out of an image: the image says how large its files are,
/// and a sparse one would otherwise fill the host's disk with zeroes.
const MAX_BOOT_FILE: u64 = 512 << 20;

/// Copy `src` (a path in `fs`) to `dest` through a temporary file; returns the size.
fn extract_file(image: &Path, fs: &Ext4, src: &str, dest: &Path) -> Result<u64> {
    let tmp = dest.with_extension(format!(
        "{}.part-{}",
        dest.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let mut input = fs.open(src).map_err(|e| {
        Error::io(
            dest,
            std::io::Error::other(format!("cannot open {src} in the image: {e}")),
        )
    })?;
    let copied = File::create(&tmp)
        .and_then(|mut out| {
            let n = std::io::copy(&mut (&mut input).take(MAX_BOOT_FILE + 1), &mut out)?;
            out.flush()?;
            Ok(n)
        })
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|n| match n > MAX_BOOT_FILE {
            true => Err(not_bootable(
                image,
                format!("{src} is larger than {} MiB", MAX_BOOT_FILE >> 20),
            )),
            false => Ok(n),
        })
        .and_then(|n| {
            std::fs::rename(&tmp, dest)
                .map(|()| n)
                .map_err(|e| Error::io(dest, e))
        });
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// Find the kernel and initrd of the raw image at `image` and extract them to
/// `<dir>/<stem>.vmlinuz` and `<dir>/<stem>.initrd`; the [`BootInfo`] is written to
/// `<dir>/<stem>.boot.json` and returned.
pub fn prepare(image: &Path, dir: &Path, stem: &str) -> Result<BootInfo> {
    let sel = inspect(image)?;
    let (table, regions) = regions(image)?;
    let region = regions
        .into_iter()
        .find(|r| r.number == sel.boot_partition)
        .ok_or_else(|| not_bootable(image, "the boot partition disappeared"))?;
    let fs = open_fs(image, region).map_err(|e| not_bootable(image, e))?;
    let kernel = dir.join(format!("{stem}.vmlinuz"));
    let kernel_bytes = extract_file(image, &fs, &sel.kernel_source, &kernel)?;
    let (initrd, initrd_bytes) = match &sel.initrd_source {
        Some(src) => {
            let p = dir.join(format!("{stem}.initrd"));
            let n = extract_file(image, &fs, src, &p)?;
            (Some(p), Some(n))
        }
        None => {
            let _ = std::fs::remove_file(dir.join(format!("{stem}.initrd")));
            (None, None)
        }
    };
    let info = BootInfo {
        kernel,
        kernel_bytes,
        initrd,
        initrd_bytes,
        root_uuid: sel.root_uuid,
        kernel_version: sel.kernel_version,
        kernel_source: sel.kernel_source,
        initrd_source: sel.initrd_source,
        partition_table: table,
        root_partition: sel.root_partition,
    };
    let json_path = boot_info_path(dir, stem);
    let text = serde_json::to_string_pretty(&info).expect("boot info serialises");
    let tmp = json_path.with_extension("json.part");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &json_path).map_err(|e| Error::io(&json_path, e))?;
    tracing::info!(
        image = %image.display(),
        kernel = %info.kernel_source,
        initrd = ?info.initrd_source,
        root = %info.root_uuid,
        "prepared image for direct kernel boot"
    );
    Ok(info)
}

/// Where [`prepare`] stores the [`BootInfo`].
pub fn boot_info_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.boot.json"))
}

/// A previously stored [`BootInfo`] whose files are intact, if any.
pub fn load_prepared(dir: &Path, stem: &str) -> Option<BootInfo> {
    let text = std::fs::read_to_string(boot_info_path(dir, stem)).ok()?;
    let info: BootInfo = serde_json::from_str(&text).ok()?;
    info.files_intact().then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_version_ordering() {
        use Ordering::*;
        let cases = [
            ("6.1.0-13-amd64", "6.1.0-9-amd64", Greater),
            ("6.1.0-13-amd64", "6.1.0-13-amd64", Equal),
            ("6.1.0-1-amd64", "6.1.0-13-amd64", Less),
            ("5.10.0-26-amd64", "6.1.0-1-amd64", Less),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0+b1", Less),
            ("1:0.9", "2.0", Greater),
            ("1.0a", "1.0", Greater),
            ("1.01", "1.1", Equal),
            ("4.19.0-0.bpo.9-amd64", "4.19.0-10-amd64", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_debian_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_debian_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }
}
