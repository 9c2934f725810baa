//! The serial console as a capped log file (`--console file=PATH[,max=BYTES]`).
//!
//! The guest decides what it prints, so the file must not grow with it: once `PATH` would
//! pass `max` bytes it is renamed to `PATH.1` (replacing the previous one) and a new `PATH`
//! is started, so the console never takes more than twice `max` on the host. The file is
//! created owner-only and never through a symbolic link, since console output can carry
//! secrets (keys printed by cloud-init) and the path may sit in a shared directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Default cap of the console file.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;
/// Largest tail the API hands out at once.
pub const MAX_TAIL_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleLogError {
    #[error("cannot open console file {path}: {source} (it must not be a symbolic link)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot rotate console file {path} to {path}.1: {source}")]
    Rotate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("console file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot read console file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Appends the console to `path`, rotating once at `max_bytes`.
pub struct ConsoleLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
}

fn open(path: &Path) -> Result<File, ConsoleLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| ConsoleLogError::Open {
            path: path.to_owned(),
            source,
        })
}

pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl ConsoleLog {
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, ConsoleLogError> {
        let file = open(path)?;
        let size = file
            .metadata()
            .map_err(|source| ConsoleLogError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        let mut log = ConsoleLog {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            file,
            size,
        };
        if log.size >= log.max_bytes {
            log.rotate()?;
        }
        Ok(log)
    }

    fn rotate(&mut self) -> Result<(), ConsoleLogError> {
        let rotate_err = |source| ConsoleLogError::Rotate {
            path: self.path.clone(),
            source,
        };
        std::fs::rename(&self.path, rotated_path(&self.path)).map_err(rotate_err)?;
        self.file = open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size >= self.max_bytes {
            self.rotate().map_err(std::io::Error::other)?;
        }
        let room = (self.max_bytes - self.size) as usize;
        let n = buf.len().min(room);
        let written = self.file.write(&buf[..n])?;
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The last `bytes` bytes of the console written to `path` (and its rotated half).
pub fn tail(path: &Path, bytes: u64) -> Result<Vec<u8>, ConsoleLogError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ConsoleLogError::Read { path, source }
    };
    let mut out = Vec::new();
    let mut wanted = bytes.min(MAX_TAIL_BYTES);
    // Newest first: the current file, then what rotation kept.
    for part in [path.to_owned(), rotated_path(path)] {
        if wanted == 0 {
            break;
        }
        // The VMM writes the directory: a FIFO it put here must not block the reader (the
        // node agent, answering the API), nor a device be read.
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&part)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_err(&part)(e)),
        };
        let metadata = file.metadata().map_err(read_err(&part))?;
        if !metadata.is_file() {
            return Err(ConsoleLogError::NotAFile { path: part });
        }
        let len = metadata.len();
        let take = wanted.min(len);
        file.seek(SeekFrom::Start(len - take))
            .map_err(read_err(&part))?;
        let mut chunk = Vec::with_capacity(take as usize);
        file.take(take)
            .read_to_end(&mut chunk)
            .map_err(read_err(&part))?;
        wanted -= chunk.len() as u64;
        chunk.extend_from_slice(&out);
        out = chunk;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_fifo_in_the_console_file_s_place_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = path.clone();
        std::thread::spawn(move || tx.send(tail(&reader, 100).map(|_| ())));
        let answer = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading the tail blocked on a FIFO");
        assert!(
            matches!(answer, Err(ConsoleLogError::NotAFile { .. })),
            "{answer:?}"
        );
    }

    #[test]
    fn the_file_never_passes_its_cap_and_rotates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 100).unwrap();
        let line: Vec<u8> = (0..30u8).map(|i| b'a' + i % 26).collect();
        for _ in 0..20 {
            log.write_all(&line).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        }
        // 600 bytes written: the current file holds the last 100, .1 the 100 before.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
        assert_eq!(std::fs::metadata(rotated_path(&path)).unwrap().len(), 100);
        assert!(!dir.path().join("console.log.2").exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The tail spans both halves, in order.
        let all: Vec<u8> = line.iter().cycle().take(600).copied().collect();
        assert_eq!(tail(&path, 150).unwrap(), &all[450..]);
        assert_eq!(tail(&path, 30).unwrap(), &all[570..]);
        // More than both halves hold: what there is.
        assert_eq!(tail(&path, 10_000).unwrap(), &all[400..]);
    }

    #[test]
    fn an_existing_file_is_appended_to_and_rotated_if_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, b"old").unwrap();
        let mut log = ConsoleLog::open(&path, 5).unwrap();
        log.write_all(b"xy").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"oldxy");
        log.write_all(b"z").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"z");
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"oldxy");
        drop(log);
        std::fs::write(&path, b"123456").unwrap();
        ConsoleLog::open(&path, 5).unwrap();
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"123456");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn symbolic_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = ConsoleLog::open(&link, 100).err().unwrap();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(tail(&link, 10).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn a_missing_file_has_an_empty_tail() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(tail(&dir.path().join("none"), 10).unwrap(), b"");
    }
}
