//! The file backend: each volume a sparse raw file in one directory, which the nodes see
//! at the same path (the orchestrator's own host, or a shared filesystem).

use std::path::{Path, PathBuf};

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

    pub fn location(&self, uuid: &str) -> PathBuf {
        self.dir.join(format!("{uuid}.img"))
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

    pub fn delete(path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
