//! The file backend: each volume a sparse raw file in one directory, which the nodes see
//! at the same path (the orchestrator's own host, or a shared filesystem). A LIVE snapshot
//! of an ORIGIN is a qcow2 overlay beside it, naming the ORIGIN by its file name, so the
//! pair works wherever the directory is mounted.

use std::path::{Path, PathBuf};

use stratus_vmm::devices::virtio::block::io::qcow2::{create_overlay, flatten_to_raw_while};
use stratus_vmm::devices::virtio::block::io::{DiskError, ImageFormat};

use super::hold::Fence;

pub struct FileBackend {
    dir: PathBuf,
}

impl FileBackend {
    /// Makes the directory if it is missing (only its owner may read volumes' data).
    pub fn open(dir: &Path) -> std::io::Result<FileBackend> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(FileBackend {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bytes the volume files in `dir` have allocated (sparse: what was written).
    pub fn allocated(dir: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir)? {
            let meta = entry?.metadata()?;
            if meta.is_file() {
                bytes += meta.blocks() * 512;
            }
        }
        Ok(bytes)
    }

    /// Where Marketplace images are downloaded to before they are copied into ORIGINs.
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join(".images")
    }

    pub fn location(&self, uuid: &str) -> PathBuf {
        self.dir.join(format!("{uuid}.img"))
    }

    /// Where a volume made from the one at `source` goes: beside it, a qcow2 overlay for a
    /// LIVE snapshot, a raw file for a rebase.
    pub fn location_beside(source: &Path, uuid: &str, snapshot: bool) -> PathBuf {
        let extension = if snapshot { "qcow2" } else { "img" };
        source
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!("{uuid}.{extension}"))
    }

    /// A sparse file of `size_gib`: no data blocks until the guest writes. Done again
    /// after a crash, it leaves an existing file's data alone.
    pub fn create(path: &Path, size_gib: u64) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        file.set_len(size_gib << 30)?;
        file.sync_all()
    }

    /// A LIVE snapshot of the raw ORIGIN at `origin`: a qcow2 overlay at `path`, made in
    /// constant time whatever the size, holding only what is written to it. Done again
    /// after a crash, it starts over (a volume still being made was never used).
    pub fn snapshot(path: &Path, origin: &Path) -> Result<(), DiskError> {
        Self::delete(path)?;
        // Both are in the pool's directory: the overlay names its origin relative to it.
        let name = origin.file_name().map(Path::new).unwrap_or(origin);
        create_overlay(path, name, ImageFormat::Raw)
    }

    /// A rebase: a new raw file at `path` holding what the volume at `source` reads as
    /// (through `backing`, its ORIGIN, when it is a LIVE), with holes where it reads zeroes.
    /// Copies `source` into a raw file at `path` while `fence` holds: a copy whose hold
    /// lapsed stops before another replica, taking the volume over, copies into `path` too.
    pub fn copy(
        path: &Path,
        source: &Path,
        backing: Option<&Path>,
        fence: &Fence,
    ) -> Result<(), DiskError> {
        let backing: Vec<PathBuf> = backing.map(Path::to_owned).into_iter().collect();
        let format = format_of(&source.to_string_lossy());
        flatten_to_raw_while(source, format, &backing, path, &|| fence.holds())?;
        Ok(())
    }

    pub fn delete(path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// A file volume's format, from its location (set by this module, never read from the
/// file, which the guest writes): LIVE snapshots are qcow2, every other volume raw.
pub fn format_of(location: &str) -> ImageFormat {
    if location.ends_with(".qcow2") {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    }
}
