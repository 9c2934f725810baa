//! Disk I/O engines behind one asynchronous interface: requests are queued with a tag,
//! submitted in batches, and completions are collected later, signalled through an eventfd
//! the device worker polls. `sync_io` runs each operation at once (pread/pwrite family);
//! `uring` keeps many in flight with io_uring. `qcow2` sits in front of either: it maps
//! guest offsets to host files and offsets, then hands the data transfers to them.

pub mod iscsi;
mod libiscsi;
mod librbd;
pub mod qcow2;
pub mod rbd;
pub mod sync_io;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

use self::qcow2::{Qcow2Image, Qcow2Io};
use super::request::RangeRequests;
use super::MAX_DISCARD_SECTORS;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
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
    #[error("a network disk is raw; qcow2 images are opened from files only")]
    FormatOnNetwork,
    #[error("a network disk has no file to open")]
    NotAFile,
    #[error(transparent)]
    Iscsi(#[from] iscsi::IscsiError),
    #[error(transparent)]
    Rbd(#[from] rbd::RbdDiskError),
    #[error("cannot create qcow2 image {path}: {reason}")]
    Qcow2Create { path: PathBuf, reason: String },
    #[error("cannot copy disk image {path} into {dest}: {source}")]
    Flatten {
        path: PathBuf,
        dest: PathBuf,
        source: std::io::Error,
    },
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

/// The open disk: a raw file or host block device, a qcow2 image with its backing chain,
/// or an iSCSI LUN. Each kind makes its own per-queue engine (`create_engine`); the queue
/// worker never branches on the kind.
pub struct DiskFile {
    size: u64,
    read_only: bool,
    topology: Topology,
    /// The backend can deallocate ranges; without it the guest is not offered DISCARD.
    can_discard: bool,
    /// The backend can zero ranges; without it the guest is not offered WRITE_ZEROES.
    can_write_zeroes: bool,
    backend: Backend,
}

enum Backend {
    File {
        file: File,
        direct: bool,
        qcow2: Option<Arc<Qcow2Image>>,
        block_device: bool,
    },
    Iscsi(Arc<iscsi::IscsiLun>),
    Rbd(Arc<rbd::RbdDisk>),
}

/// Block sizes the guest should use, from the host device or the iSCSI LUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Smallest addressable unit (virtio-blk's blk_size); a power of two, >= 512.
    pub logical_block_size: u32,
    /// log2(physical / logical block size).
    pub physical_block_exp: u8,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            logical_block_size: super::SECTOR_SIZE as u32,
            physical_block_exp: 0,
        }
    }
}

// From <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// Size and block sizes of a host block device (file metadata says 0 for them).
fn block_device_geometry(file: &File) -> std::io::Result<(u64, Topology)> {
    let fd = file.as_raw_fd();
    let mut size: u64 = 0;
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: each ioctl writes one integer of the type given into a local we own; the
    // descriptor is an open block device.
    let results = unsafe {
        [
            libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64),
            libc::ioctl(fd, BLKSSZGET as _, &mut logical as *mut libc::c_int),
            libc::ioctl(fd, BLKPBSZGET as _, &mut physical as *mut libc::c_uint),
        ]
    };
    if results.iter().any(|r| *r < 0) {
        return Err(std::io::Error::last_os_error());
    }
    Ok((size, topology_from(logical as u32, physical)))
}

/// A topology from a device's logical and physical block sizes; odd values (not powers of
/// two, below 512) fall back to 512-byte sectors rather than confuse the guest.
pub fn topology_from(logical: u32, physical: u32) -> Topology {
    let logical = if logical.is_power_of_two() && logical >= super::SECTOR_SIZE as u32 {
        logical
    } else {
        super::SECTOR_SIZE as u32
    };
    let physical_block_exp = if physical.is_power_of_two() && physical > logical {
        (physical / logical).trailing_zeros() as u8
    } else {
        0
    };
    Topology {
        logical_block_size: logical,
        physical_block_exp,
    }
}

/// Whether a block device's queue takes discards (sysfs: queue/discard_max_bytes > 0).
fn device_discards(metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let rdev = metadata.rdev();
    let path = format!(
        "/sys/dev/block/{}:{}/queue/discard_max_bytes",
        libc::major(rdev),
        libc::minor(rdev)
    );
    // A partition has no queue of its own: its disk's is one directory up.
    let parent = format!(
        "/sys/dev/block/{}:{}/../queue/discard_max_bytes",
        libc::major(rdev),
        libc::minor(rdev)
    );
    [path, parent].iter().any(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|max| max > 0)
    })
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
            if let Backend::File { qcow2, .. } = &mut disk.backend {
                *qcow2 = Some(Arc::new(image));
            }
        }
        Ok(disk)
    }

    /// Opens whatever the disk's configuration names: a file or block device, or an
    /// iSCSI LUN (logged in once here, so a bad target fails at start-up).
    pub fn open_config(config: &super::BlockConfig) -> Result<Self, DiskError> {
        if let Some(source) = &config.rbd {
            if config.format != ImageFormat::Raw {
                return Err(DiskError::FormatOnNetwork);
            }
            let disk = rbd::RbdDisk::open(source, config.read_only)?;
            return Ok(DiskFile {
                size: disk.size(),
                read_only: disk.read_only(),
                topology: Topology::default(),
                can_discard: true,
                can_write_zeroes: true,
                backend: Backend::Rbd(Arc::new(disk)),
            });
        }
        match &config.iscsi {
            Some(source) => {
                if config.format != ImageFormat::Raw {
                    return Err(DiskError::FormatOnNetwork);
                }
                let lun = iscsi::IscsiLun::connect(source)?;
                Ok(DiskFile {
                    size: lun.size(),
                    read_only: config.read_only,
                    topology: lun.topology(),
                    can_discard: lun.can_discard(),
                    can_write_zeroes: lun.can_write_zeroes(),
                    backend: Backend::Iscsi(Arc::new(lun)),
                })
            }
            None => Self::open_format(&config.path, config.format, config.read_only, config.cache),
        }
    }

    fn open_raw(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        // Non-blocking until its type is known: opening a FIFO would wait for a writer,
        // on the thread that answers the control API.
        let direct = if cache == CacheMode::None {
            libc::O_DIRECT
        } else {
            0
        };
        options.custom_flags(direct | libc::O_NONBLOCK);
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
        let metadata = file.metadata().map_err(open_err)?;
        let block_device = metadata.file_type().is_block_device();
        if !block_device && !metadata.is_file() {
            return Err(DiskError::NotADisk {
                path: path.to_owned(),
            });
        }
        // io_uring answers EAGAIN instead of waiting on a descriptor marked non-blocking.
        // SAFETY: F_SETFL on a descriptor this function owns, with plain flags.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, direct) } != 0 {
            return Err(open_err(std::io::Error::last_os_error()));
        }
        let (size, topology) = if block_device {
            block_device_geometry(&file).map_err(open_err)?
        } else {
            (metadata.len(), Topology::default())
        };
        if size < u64::from(topology.logical_block_size).max(super::SECTOR_SIZE) {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(DiskFile {
            size,
            read_only,
            topology,
            // Files take both through fallocate; a block device discards only when its
            // queue says it can (zeroing falls back to writing zeroes).
            can_discard: !block_device || device_discards(&metadata),
            can_write_zeroes: true,
            backend: Backend::File {
                file,
                direct: cache == CacheMode::None,
                qcow2: None,
                block_device,
            },
        })
    }

    pub fn format(&self) -> ImageFormat {
        match self.backend {
            Backend::File { qcow2: Some(_), .. } => ImageFormat::Qcow2,
            _ => ImageFormat::Raw,
        }
    }

    /// Size in bytes; a trailing partial block is not exposed.
    pub fn size(&self) -> u64 {
        self.size & !(u64::from(self.topology.logical_block_size) - 1)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// Whether DISCARD can be offered to the guest.
    pub fn can_discard(&self) -> bool {
        self.can_discard && !self.read_only
    }

    /// The DISCARD and WRITE_ZEROES requests the guest is offered, each with the largest
    /// range the backend takes (and the device's own limit).
    pub fn range_requests(&self) -> RangeRequests {
        let (discard, write_zeroes) = match &self.backend {
            Backend::Iscsi(lun) => (lun.max_discard_sectors(), lun.max_write_zeroes_sectors()),
            Backend::File { .. } | Backend::Rbd(_) => (None, None),
        };
        let limit = |l: Option<u64>| {
            l.map_or(MAX_DISCARD_SECTORS, |l| {
                l.clamp(1, u64::from(MAX_DISCARD_SECTORS)) as u32
            })
        };
        RangeRequests {
            discard: self.can_discard().then(|| limit(discard)),
            write_zeroes: self.can_write_zeroes().then(|| limit(write_zeroes)),
        }
    }

    /// How many request queues the disk can serve: an RBD image has one completion
    /// receiver, so one queue.
    pub fn max_queues(&self) -> u16 {
        match self.backend {
            Backend::Rbd(_) => 1,
            _ => u16::MAX,
        }
    }

    /// Whether the disk is on the network (its engines log in themselves).
    pub fn is_network(&self) -> bool {
        matches!(self.backend, Backend::Iscsi(_) | Backend::Rbd(_))
    }

    /// Whether WRITE_ZEROES can be offered to the guest.
    pub fn can_write_zeroes(&self) -> bool {
        self.can_write_zeroes && !self.read_only
    }

    /// The alignment O_DIRECT needs of buffers and their lengths: the device's logical
    /// block (4 KiB on a 4Kn disk), at least 512 bytes.
    pub fn direct_alignment(&self) -> u64 {
        u64::from(self.topology.logical_block_size).max(DIRECT_IO_ALIGNMENT)
    }

    /// True when buffers must be aligned (cache=none).
    pub fn direct(&self) -> bool {
        matches!(self.backend, Backend::File { direct: true, .. })
    }

    /// Each engine instance gets its own descriptor, so queues never share file state.
    /// Network disks have no file.
    pub fn try_clone_file(&self) -> Result<File, DiskError> {
        match &self.backend {
            Backend::File { file, .. } => Ok(file.try_clone()?),
            Backend::Iscsi(_) | Backend::Rbd(_) => Err(DiskError::NotAFile),
        }
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
    /// Readable when the engine has something to do: completions to collect, or for a
    /// network disk, its connection or timer to serve. The queue worker polls it.
    fn event_fd(&self) -> RawFd;
    /// Called after `event_fd` was readable: clears it and does what it signalled
    /// (completions then come from `next_completion`).
    fn process_events(&mut self);
    /// Queues an operation; it may not start before `submit`.
    fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError>;
    /// Starts everything queued since the last call.
    fn submit(&mut self) -> Result<(), DiskError>;
    /// Gives up on what is in flight, when waiting for it would block a device reset for
    /// too long (a network disk whose target is gone): every operation still queued
    /// completes, with an error, and no buffer is referred to afterwards. Local engines
    /// always finish on their own.
    fn abort(&mut self) {}
    fn next_completion(&mut self) -> Option<Completion>;
    /// Whether the queue worker may spin waiting for completions and requests instead of
    /// sleeping. False for an engine whose own threads complete its requests: the spinning
    /// takes the CPU they need when the host has no idle one.
    fn spinning_helps(&self) -> bool {
        true
    }
}

/// How a discard or write-zeroes is carried out on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeCall {
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// ioctl(BLKDISCARD): Linux's fallocate on a block device only zeroes (a hole punch
    /// there needs the device's write-zeroes support); a plain discard is this ioctl.
    BlkDiscard {
        offset: u64,
        len: u64,
    },
}

/// The host call for a discard or write-zeroes; None for other operations. On a block
/// device a write-zeroes is a zero-out that falls back to writing zeroes.
pub fn range_call(op: &DiskOp<'_>, block_device: bool) -> Option<RangeCall> {
    let fallocate = |mode, offset, len| RangeCall::Fallocate { mode, offset, len };
    match *op {
        DiskOp::Discard { offset, len } if block_device => {
            Some(RangeCall::BlkDiscard { offset, len })
        }
        DiskOp::WriteZeroes { offset, len, .. } if block_device => Some(fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )),
        DiskOp::Discard { offset, len } => Some(file_discard(offset, len)),
        DiskOp::WriteZeroes { offset, len, unmap } => Some(fallocate(
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

/// How a discard reaches a regular file: the range's blocks are given back, its size kept.
fn file_discard(offset: u64, len: u64) -> RangeCall {
    RangeCall::Fallocate {
        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    }
}

// From <linux/fs.h>: _IO(0x12, 119).
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Runs a range call on `fd` at once: 0, or a negated errno.
pub fn run_range_call(fd: RawFd, call: RangeCall) -> i64 {
    let result = match call {
        RangeCall::Fallocate { mode, offset, len } => {
            // SAFETY: fallocate only takes a descriptor we own and plain integers.
            unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) }
        }
        RangeCall::BlkDiscard { offset, len } => {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 (start, length) from the local array.
            unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) }
        }
    };
    if result < 0 {
        -i64::from(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        0
    }
}

pub fn create_engine(
    kind: IoEngine,
    disk: &DiskFile,
    depth: u32,
) -> Result<Box<dyn AsyncIo>, DiskError> {
    match &disk.backend {
        Backend::Iscsi(lun) => Ok(Box::new(iscsi::IscsiIo::new(lun.clone(), depth)?)),
        Backend::Rbd(disk) => Ok(Box::new(rbd::RbdIo::new(disk.clone())?)),
        Backend::File {
            qcow2: Some(image), ..
        } => {
            let data = DataEngine::new(kind, image.data_files()?, depth, false)?;
            Ok(Box::new(Qcow2Io::new(image.clone(), data)))
        }
        Backend::File {
            file, block_device, ..
        } => Ok(
            match DataEngine::new(kind, vec![file.try_clone()?], depth, *block_device)? {
                DataEngine::Sync(engine) => Box::new(engine),
                DataEngine::IoUring(engine) => engine,
            },
        ),
    }
}

/// An engine over several files, for formats that spread a disk across them.
pub enum DataEngine {
    Sync(sync_io::SyncIo),
    IoUring(Box<uring::IoUringIo>),
}

impl DataEngine {
    /// `block_device`: the files are host block devices (see `fallocate_mode`).
    pub fn new(
        kind: IoEngine,
        files: Vec<File>,
        depth: u32,
        block_device: bool,
    ) -> Result<Self, DiskError> {
        Ok(match kind {
            IoEngine::Sync => DataEngine::Sync(sync_io::SyncIo::new(files, block_device)?),
            IoEngine::IoUring => {
                DataEngine::IoUring(Box::new(uring::IoUringIo::new(files, depth, block_device)?))
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

    /// Punches a hole in file `file` now, on the calling thread (a regular file: the
    /// engines' files for formats are never block devices).
    pub fn punch_hole_now(&self, file: usize, offset: u64, len: u64) -> Result<(), DiskError> {
        let file_ref = match self {
            DataEngine::Sync(engine) => engine.file(file),
            DataEngine::IoUring(engine) => engine.file(file),
        };
        let fd = file_ref.ok_or(DiskError::NoSuchFile(file))?.as_raw_fd();
        match run_range_call(fd, file_discard(offset, len)) {
            0 => Ok(()),
            errno => Err(DiskError::Io(std::io::Error::from_raw_os_error(
                -errno as i32,
            ))),
        }
    }

    pub fn engine(&mut self) -> &mut dyn AsyncIo {
        match self {
            DataEngine::Sync(engine) => engine,
            DataEngine::IoUring(engine) => engine.as_mut(),
        }
    }

    /// The eventfd both file engines signal completions on.
    pub fn notifier(&self) -> &EventFd {
        match self {
            DataEngine::Sync(engine) => engine.notifier(),
            DataEngine::IoUring(engine) => engine.notifier(),
        }
    }
}

/// Whether this kernel lets us create an io_uring (containers and old kernels may not).
pub fn io_uring_supported() -> bool {
    io_uring::IoUring::new(2).is_ok()
}
