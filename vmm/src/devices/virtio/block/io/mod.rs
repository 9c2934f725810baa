//! Disk I/O engines behind one asynchronous interface: requests are queued with a tag,
//! submitted in batches, and completions are collected later, signalled through an eventfd
//! the device worker polls. `sync_io` runs each operation at once (pread/pwrite family);
//! `uring` keeps many in flight with io_uring. `qcow2` sits in front of either: it maps
//! guest offsets to host files and offsets, then hands the data transfers to them.

pub mod qcow2;
pub mod sync_io;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

use self::qcow2::{Qcow2Image, Qcow2Io};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is empty; a disk needs at least one 512-byte sector")]
    Empty { path: PathBuf },
    #[error("disk image {path} cannot be opened with cache=none (O_DIRECT): {source}")]
    Direct {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up io_uring: {0} (use engine=sync on this host)")]
    IoUringSetup(std::io::Error),
    #[error("the I/O engine's queue is full")]
    QueueFull,
    #[error("cannot create the completion eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("disk I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the I/O engine has no file number {0}")]
    NoSuchFile(usize),
    #[error("cannot open qcow2 image {path}: {source}")]
    Qcow2Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create qcow2 image {path}: {reason}")]
    Qcow2Create { path: PathBuf, reason: String },
}

/// How the guest's disk is laid out in the image file. Never guessed from the file's
/// contents: a guest could write a qcow2 header into a raw disk and make the host open
/// files of its choosing as backing images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Raw,
    /// qcow2, possibly on a chain of backing images (opened read-only).
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!("format must be raw or qcow2, not '{other}'")),
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// Host page cache use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Through the host page cache; FLUSH makes writes durable.
    #[default]
    Writeback,
    /// O_DIRECT: no host page cache, no double caching of guest data.
    None,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngine {
    /// One operation at a time, on the device worker thread.
    Sync,
    /// Many operations in flight through io_uring.
    #[default]
    IoUring,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            other => Err(format!("cache must be writeback or none, not '{other}'")),
        }
    }
}

impl std::str::FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(IoEngine::Sync),
            "io_uring" => Ok(IoEngine::IoUring),
            other => Err(format!("engine must be io_uring or sync, not '{other}'")),
        }
    }
}

/// Alignment O_DIRECT needs for buffers, offsets and lengths.
pub const DIRECT_IO_ALIGNMENT: u64 = 512;

/// The open disk image: a raw file, or a qcow2 image with its backing chain.
pub struct DiskFile {
    file: File,
    size: u64,
    read_only: bool,
    direct: bool,
    qcow2: Option<Arc<Qcow2Image>>,
}

impl DiskFile {
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, DiskError> {
        Self::open_format(path, ImageFormat::Raw, read_only, cache)
    }

    pub fn open_format(
        path: &Path,
        format: ImageFormat,
        read_only: bool,
        cache: CacheMode,
    ) -> Result<Self, DiskError> {
        let mut disk = Self::open_raw(path, read_only, cache)?;
        if format == ImageFormat::Qcow2 {
            let image = Qcow2Image::open(path, read_only, cache)?;
            disk.size = image.size();
            disk.qcow2 = Some(Arc::new(image));
        }
        Ok(disk)
    }

    fn open_raw(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if cache == CacheMode::None {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| {
            if cache == CacheMode::None && source.raw_os_error() == Some(libc::EINVAL) {
                DiskError::Direct {
                    path: path.to_owned(),
                    source,
                }
            } else {
                open_err(source)
            }
        })?;
        let size = file.metadata().map_err(open_err)?.len();
        if size < super::SECTOR_SIZE {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(DiskFile {
            file,
            size,
            read_only,
            direct: cache == CacheMode::None,
            qcow2: None,
        })
    }

    pub fn format(&self) -> ImageFormat {
        match self.qcow2 {
            Some(_) => ImageFormat::Qcow2,
            None => ImageFormat::Raw,
        }
    }

    /// Size in bytes; a trailing partial sector is not exposed.
    pub fn size(&self) -> u64 {
        self.size & !(super::SECTOR_SIZE - 1)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// True when buffers must be aligned (cache=none).
    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Each engine instance gets its own descriptor, so queues never share file state.
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }
}

/// One disk operation. Buffers are host addresses of guest memory (or bounce buffers)
/// that stay valid until the operation's completion has been collected.
#[derive(Debug)]
pub enum DiskOp<'a> {
    Read {
        offset: u64,
        iovecs: &'a [libc::iovec],
    },
    Write {
        offset: u64,
        iovecs: &'a [libc::iovec],
    },
    /// Makes every write completed before it durable; ordered after earlier writes.
    Flush,
    /// Deallocates the range (it then reads as zeroes).
    Discard { offset: u64, len: u64 },
    /// Zeroes the range; `unmap` lets the range be deallocated as well.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    /// Bytes transferred, or a negated errno.
    pub result: i64,
}

pub trait AsyncIo: Send {
    /// Readable when completions are waiting.
    fn notifier(&self) -> &EventFd;
    /// Queues an operation; it may not start before `submit`.
    fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError>;
    /// Starts everything queued since the last call.
    fn submit(&mut self) -> Result<(), DiskError>;
    fn next_completion(&mut self) -> Option<Completion>;
}

pub fn fallocate_mode(op: &DiskOp<'_>) -> Option<(i32, u64, u64)> {
    match *op {
        DiskOp::Discard { offset, len } => Some((
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )),
        DiskOp::WriteZeroes { offset, len, unmap } => Some((
            if unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            },
            offset,
            len,
        )),
        _ => None,
    }
}

pub fn create_engine(
    kind: IoEngine,
    disk: &DiskFile,
    depth: u32,
) -> Result<Box<dyn AsyncIo>, DiskError> {
    if let Some(image) = &disk.qcow2 {
        let data = DataEngine::new(kind, image.data_files()?, depth)?;
        return Ok(Box::new(Qcow2Io::new(image.clone(), data)));
    }
    Ok(
        match DataEngine::new(kind, vec![disk.try_clone_file()?], depth)? {
            DataEngine::Sync(engine) => Box::new(engine),
            DataEngine::IoUring(engine) => engine,
        },
    )
}

/// An engine over several files, for formats that spread a disk across them.
pub enum DataEngine {
    Sync(sync_io::SyncIo),
    IoUring(Box<uring::IoUringIo>),
}

impl DataEngine {
    pub fn new(kind: IoEngine, files: Vec<File>, depth: u32) -> Result<Self, DiskError> {
        Ok(match kind {
            IoEngine::Sync => DataEngine::Sync(sync_io::SyncIo::new(files)?),
            IoEngine::IoUring => {
                DataEngine::IoUring(Box::new(uring::IoUringIo::new(files, depth)?))
            }
        })
    }

    pub fn queue_on(
        &mut self,
        file: usize,
        op: DiskOp<'_>,
        user_data: u64,
    ) -> Result<(), DiskError> {
        match self {
            DataEngine::Sync(engine) => engine.queue_on(file, op, user_data),
            DataEngine::IoUring(engine) => engine.queue_on(file, op, user_data),
        }
    }

    pub fn engine(&mut self) -> &mut dyn AsyncIo {
        match self {
            DataEngine::Sync(engine) => engine,
            DataEngine::IoUring(engine) => engine.as_mut(),
        }
    }

    pub fn engine_ref(&self) -> &dyn AsyncIo {
        match self {
            DataEngine::Sync(engine) => engine,
            DataEngine::IoUring(engine) => engine.as_ref(),
        }
    }
}

/// Whether this kernel lets us create an io_uring (containers and old kernels may not).
pub fn io_uring_supported() -> bool {
    io_uring::IoUring::new(2).is_ok()
}
