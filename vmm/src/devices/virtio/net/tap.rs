//! TAP devices: opened by name (created if missing) or taken over as an already-open
//! descriptor from the node agent. Frames carry a 12-byte virtio-net header.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::VNET_HDR_LEN;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("TAP name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot attach to TAP device {name}: {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("TAP {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: std::io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
    /// Whether the kernel gives this queue of a multiqueue TAP frames (TUNSETQUEUE). A
    /// queue is attached when opened; attaching it twice, or detaching it twice, is an
    /// error for the kernel, so the state is kept here.
    attached: AtomicBool,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` attached to the TAP `name` (created if missing) with a virtio-net
/// header and no packet information: the one place TUNSETIFF is done, for the VMM and for
/// the node agent (which makes its VMs' TAPs persistent). `multi_queue` opens one queue of
/// a multiqueue TAP (a TAP is made one or the other, and stays so).
pub fn attach_tap(name: &str, nonblocking: bool, multi_queue: bool) -> Result<File, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(TapError::BadName(name.into()));
    }
    let mut flags = libc::O_CLOEXEC;
    if nonblocking {
        flags |= libc::O_NONBLOCK;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq-sized struct that lives for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TapError::Attach {
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

impl Tap {
    /// Opens (or creates) the TAP `name` with a virtio-net header, non-blocking.
    pub fn open(name: &str) -> Result<Self, TapError> {
        Self::attach(name, false)
    }

    /// Opens `queues` queues of the multiqueue TAP `name` (created if missing); one queue
    /// is a plain TAP, as [`Tap::open`] makes it.
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Self>, TapError> {
        if queues <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..queues).map(|_| Self::attach(name, true)).collect()
    }

    fn attach(name: &str, multi_queue: bool) -> Result<Self, TapError> {
        let file = attach_tap(name, true, multi_queue)?;
        let tap = Tap {
            file,
            name: name.into(),
            attached: AtomicBool::new(true),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Takes over a TAP descriptor the node agent opened (with IFF_VNET_HDR).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Self, TapError> {
        let tap = Tap {
            file: File::from(fd),
            name: name.into(),
            attached: AtomicBool::new(true),
        };
        // SAFETY: F_SETFL with O_NONBLOCK on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(tap.file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(
                tap.file.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            );
        }
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Any datagram-preserving descriptor (tests use a socketpair in place of a TAP).
    pub fn from_raw_datagram_fd(fd: RawFd, name: &str) -> Self {
        // SAFETY: the caller hands over ownership of an open descriptor.
        Tap {
            file: unsafe { File::from_raw_fd(fd) },
            name: name.into(),
            attached: AtomicBool::new(true),
        }
    }

    /// Lets the kernel give this queue of a multiqueue TAP frames, or stops it: frames are
    /// spread over the attached queues only, so a queue nobody reads must be detached.
    pub fn set_queue_attached(&self, attached: bool) -> Result<(), TapError> {
        if self.attached.load(Ordering::Acquire) == attached {
            return Ok(());
        }
        let flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads an ifreq-sized struct that lives for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETQUEUE",
                source: std::io::Error::last_os_error(),
            });
        }
        self.attached.store(attached, Ordering::Release);
        Ok(())
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int that lives for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the TAP which offloads the guest accepts on frames it receives.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETOFFLOAD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame (with its header); `Ok(None)` when nothing is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        // SAFETY: read writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        read_result(n)
    }

    /// Reads one frame (with its header) scattered over `iovecs`; `Ok(None)` when nothing
    /// is waiting.
    pub fn read_frame_vectored(&self, iovecs: &[libc::iovec]) -> std::io::Result<Option<usize>> {
        // SAFETY: the iovecs point into guest memory validated by the caller, which nothing
        // else writes while the worker holds the buffers.
        let n = unsafe { libc::readv(self.fd(), iovecs.as_ptr(), iovecs.len() as i32) };
        read_result(n)
    }

    /// Writes one frame (header included) gathered from `iovecs`.
    pub fn write_frame(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the iovecs point into guest memory validated by the caller.
        let n = unsafe { libc::writev(self.fd(), iovecs.as_ptr(), iovecs.len() as i32) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A read's return value: the length, or None when the non-blocking TAP had nothing.
fn read_result(n: isize) -> std::io::Result<Option<usize>> {
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}
