//! Disks on Ceph RBD images through librbd, with no kernel rbd module in between (QEMU's
//! `block/rbd.c` does the same). librbd runs the requests on its own threads; it writes the
//! engine's eventfd when one completes (`rbd_set_image_notification`), and the queue worker,
//! woken by that eventfd, takes the finished ones with `rbd_poll_io_events`.
//!
//! An image has one notification receiver, so an RBD disk has one request queue (librbd
//! spreads the work over its own threads anyway).

use std::collections::{HashMap, VecDeque};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::librbd::{Image, OpenImage, RbdError, RbdOp};
use super::{AsyncIo, Completion, DiskError, DiskOp};

pub const DEFAULT_TIMEOUT_SECS: u32 = 60;

/// An RBD image as a disk source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdSource {
    /// `POOL/IMAGE` or `POOL/IMAGE@SNAPSHOT` (a snapshot opens read-only).
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// The Ceph client id, without `client.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// How long the cluster may take to answer (connection, each request) before the
    /// guest gets an I/O error.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u32,
}

fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_SECS
}

/// The parts of `POOL/IMAGE[@SNAP]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdName {
    pub pool: String,
    pub image: String,
    pub snapshot: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RbdDiskError {
    #[error("'{name}' is not an RBD image name: {reason} (rbd:POOL/IMAGE[@SNAP])")]
    BadName { name: String, reason: &'static str },
    #[error("RBD disk rbd:{name}: {source}")]
    Open {
        name: String,
        #[source]
        source: RbdError,
    },
    #[error("RBD disk rbd:{name}: the image is empty")]
    Empty { name: String },
    #[error("RBD disk rbd:{name}: {reason}")]
    Path { name: String, reason: &'static str },
    #[error("RBD disk rbd:{name}: cannot set up its completions: {source}")]
    Events {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl RbdName {
    pub fn parse(name: &str) -> Result<Self, RbdDiskError> {
        let bad = |reason| RbdDiskError::BadName {
            name: name.to_owned(),
            reason,
        };
        let (path, snapshot) = match name.split_once('@') {
            Some((path, snap)) if !snap.is_empty() => (path, Some(snap.to_owned())),
            Some(_) => return Err(bad("the snapshot name after @ is empty")),
            None => (name, None),
        };
        let (pool, image) = path
            .split_once('/')
            .ok_or_else(|| bad("it names no pool before /"))?;
        if pool.is_empty() || image.is_empty() {
            return Err(bad("the pool or image name is empty"));
        }
        if image.contains('/') || name.contains(',') {
            return Err(bad("names contain neither / nor ,"));
        }
        Ok(RbdName {
            pool: pool.to_owned(),
            image: image.to_owned(),
            snapshot,
        })
    }

    pub fn display(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("{}/{}@{s}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

/// An open RBD image, shared by the disk and its queue's engine.
pub struct RbdDisk {
    name: RbdName,
    image: Image,
    /// librbd writes it when an operation completes. An image takes one such receiver
    /// for its whole life, so it belongs to the disk, and each engine (one at a time: one
    /// queue) waits on it.
    notifier: EventFd,
    size: u64,
    read_only: bool,
}

impl std::fmt::Debug for RbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDisk")
            .field("name", &self.name.display())
            .field("size", &self.size)
            .finish()
    }
}

fn path_str<'a>(name: &RbdName, p: &'a Option<PathBuf>) -> Result<Option<&'a str>, RbdDiskError> {
    p.as_ref()
        .map(|p| {
            p.to_str().ok_or(RbdDiskError::Path {
                name: name.display(),
                reason: "a conf or keyring path is not UTF-8",
            })
        })
        .transpose()
}

impl RbdDisk {
    /// Connects and opens the image (blocking, bounded by the source's timeout).
    pub fn open(source: &RbdSource, read_only: bool) -> Result<Self, RbdDiskError> {
        let name = RbdName::parse(&source.image)?;
        let shown = name.display();
        let open_err = |source| RbdDiskError::Open {
            name: shown.clone(),
            source,
        };
        let read_only = read_only || name.snapshot.is_some();
        let image = Image::open(&OpenImage {
            conf: path_str(&name, &source.conf)?,
            id: source.id.as_deref(),
            keyring: path_str(&name, &source.keyring)?,
            pool: &name.pool,
            image: &name.image,
            snapshot: name.snapshot.as_deref(),
            read_only,
            timeout_secs: source.timeout_secs,
        })
        .map_err(open_err)?;
        let size = image.size().map_err(open_err)?;
        let notifier = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| RbdDiskError::Events {
            name: shown.clone(),
            source,
        })?;
        image.notify(notifier.as_raw_fd()).map_err(open_err)?;
        if size < super::super::SECTOR_SIZE {
            return Err(RbdDiskError::Empty { name: shown });
        }
        tracing::info!(
            "RBD disk rbd:{shown}: {size} bytes{}",
            if read_only { ", read-only" } else { "" }
        );
        Ok(RbdDisk {
            name,
            image,
            notifier,
            size,
            read_only,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Snapshots are read-only whatever the configuration says.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// The queue's engine: requests go to librbd, completions come back on `notifier`.
pub struct RbdIo {
    disk: Arc<RbdDisk>,
    /// Bytes each request in librbd reports on success, and whether it is a read, by tag.
    expected: HashMap<u64, (i64, bool)>,
    completions: VecDeque<Completion>,
    polled: Vec<(u64, i64)>,
}

impl RbdIo {
    pub fn new(disk: Arc<RbdDisk>) -> Result<Self, DiskError> {
        Ok(RbdIo {
            disk,
            expected: HashMap::new(),
            completions: VecDeque::new(),
            polled: Vec::new(),
        })
    }

    fn poll(&mut self) {
        self.disk.image.poll_completions(&mut self.polled);
        for (tag, result) in self.polled.drain(..) {
            let Some((expected, read)) = self.expected.remove(&tag) else {
                continue;
            };
            // librbd answers a read with the bytes read (fewer at the end of an image
            // shrunk from outside: the worker then fails it) and other operations with 0.
            let result = if result < 0 || read { result } else { expected };
            self.completions.push_back(Completion {
                user_data: tag,
                result,
            });
        }
    }
}

impl AsyncIo for RbdIo {
    fn event_fd(&self) -> RawFd {
        self.disk.notifier.as_raw_fd()
    }

    fn process_events(&mut self) {
        let _ = self.disk.notifier.read();
        self.poll();
    }

    fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError> {
        let bytes = |iovecs: &[libc::iovec]| iovecs.iter().map(|v| v.iov_len as i64).sum();
        let read = matches!(op, DiskOp::Read { .. });
        let (op, expected) = match op {
            DiskOp::Read { offset, iovecs } => (
                RbdOp::Read {
                    offset,
                    iovecs: iovecs.as_ptr(),
                    count: iovecs.len(),
                },
                bytes(iovecs),
            ),
            DiskOp::Write { offset, iovecs } => (
                RbdOp::Write {
                    offset,
                    iovecs: iovecs.as_ptr(),
                    count: iovecs.len(),
                },
                bytes(iovecs),
            ),
            DiskOp::Flush => (RbdOp::Flush, 0),
            DiskOp::Discard { offset, len } => (RbdOp::Discard { offset, len }, 0),
            DiskOp::WriteZeroes { offset, len, .. } => (RbdOp::WriteZeroes { offset, len }, 0),
        };
        self.expected.insert(user_data, (expected, read));
        if let Err(e) = self.disk.image.start(op, user_data) {
            tracing::warn!("RBD disk rbd:{}: {e}", self.disk.name.display());
            self.expected.remove(&user_data);
            self.completions.push_back(Completion {
                user_data,
                result: -i64::from(libc::EIO),
            });
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<(), DiskError> {
        // librbd started each request when it was queued; refusals wait in the list.
        if !self.completions.is_empty() {
            self.disk.notifier.write(1).map_err(DiskError::EventFd)?;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        if self.completions.is_empty() && !self.expected.is_empty() {
            self.poll();
        }
        self.completions.pop_front()
    }
    /// librbd's messenger and io_context threads do each request's work; a worker spinning
    /// beside them on a busy host slowed 4k QD32 reads by a tenth (benches/blk_rbd.sh).
    /// QEMU's event loop does not poll RBD completions either.
    fn spinning_helps(&self) -> bool {
        false
    }
}

impl Drop for RbdIo {
    fn drop(&mut self) {
        // librbd may still write into guest memory for a request it has: wait for them
        // (each is bounded by the cluster timeout) before the buffers can go.
        while !self.expected.is_empty() {
            let mut fds = [libc::pollfd {
                fd: self.disk.notifier.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: polls one descriptor we own, with a bounded timeout.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
            let _ = self.disk.notifier.read();
            self.poll();
        }
    }
}

// SAFETY: the iovec pointers handed to librbd point into guest memory or the worker's
// bounce buffers, kept alive by the worker until their completion is collected.
unsafe impl Send for RbdIo {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_snapshots_and_bad_ones_say_why() {
        assert_eq!(
            RbdName::parse("rbd/vm-1@base").unwrap(),
            RbdName {
                pool: "rbd".into(),
                image: "vm-1".into(),
                snapshot: Some("base".into())
            }
        );
        assert_eq!(RbdName::parse("p/i").unwrap().display(), "p/i");
        for (name, reason) in [
            ("image", "no pool"),
            ("/image", "empty"),
            ("p/", "empty"),
            ("p/i@", "snapshot name"),
            ("p/a/b", "neither /"),
        ] {
            let e = RbdName::parse(name).unwrap_err().to_string();
            assert!(e.contains(reason), "{name}: {e}");
        }
    }
}
