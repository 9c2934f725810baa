//! Disk I/O between a host file and guest memory. This is the synchronous engine
//! (`pread`/`pwrite`/`fdatasync`), straight into guest memory without a bounce buffer.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is empty; a disk needs at least one 512-byte sector")]
    Empty { path: PathBuf },
    #[error("guest buffer {addr:#x}+{len:#x} is not in guest memory")]
    GuestRange { addr: u64, len: u64 },
    #[error("disk I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("disk ended early at byte {0}")]
    ShortIo(u64),
}

/// The host mappings behind a guest buffer; the whole range must be guest RAM.
fn guest_slices(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
) -> Result<Vec<VolatileSlice<'_, ()>>, DiskError> {
    let range_err = || DiskError::GuestRange {
        addr: addr.0,
        len: u64::from(len),
    };
    if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
        return Err(range_err());
    }
    GuestMemoryBackend::get_slices(mem, addr, len as usize)
        .map(|s| s.map_err(|_| range_err()))
        .collect()
}

pub struct DiskImage {
    file: File,
    size: u64,
    read_only: bool,
}

impl DiskImage {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        if size < super::SECTOR_SIZE {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(DiskImage {
            file,
            size,
            read_only,
        })
    }

    /// Size in bytes; a trailing partial sector is not exposed.
    pub fn size(&self) -> u64 {
        self.size & !(super::SECTOR_SIZE - 1)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `len` bytes at `offset` of the disk into guest memory at `addr`.
    pub fn read_into_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        offset: u64,
    ) -> Result<(), DiskError> {
        let mut done = 0u64;
        for slice in guest_slices(mem, addr, len)? {
            let guard = slice.ptr_guard_mut();
            let mut filled = 0usize;
            while filled < slice.len() {
                // SAFETY: the pointer and length come from a VolatileSlice of guest memory
                // that stays mapped for the guard's lifetime; pread writes at most
                // `slice.len() - filled` bytes into it.
                let n = unsafe {
                    libc::pread(
                        self.file.as_raw_fd(),
                        guard.as_ptr().add(filled).cast(),
                        slice.len() - filled,
                        (offset + done + filled as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err.into());
                }
                if n == 0 {
                    return Err(DiskError::ShortIo(offset + done + filled as u64));
                }
                filled += n as usize;
            }
            done += slice.len() as u64;
        }
        Ok(())
    }

    /// Writes `len` bytes from guest memory at `addr` to the disk at `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        offset: u64,
    ) -> Result<(), DiskError> {
        let mut done = 0u64;
        for slice in guest_slices(mem, addr, len)? {
            let guard = slice.ptr_guard();
            let mut written = 0usize;
            while written < slice.len() {
                // SAFETY: the pointer and length come from a VolatileSlice of guest memory
                // that stays mapped for the guard's lifetime; pwrite only reads from it.
                let n = unsafe {
                    libc::pwrite(
                        self.file.as_raw_fd(),
                        guard.as_ptr().add(written).cast(),
                        slice.len() - written,
                        (offset + done + written as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err.into());
                }
                if n == 0 {
                    return Err(DiskError::ShortIo(offset + done + written as u64));
                }
                written += n as usize;
            }
            done += slice.len() as u64;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data()?;
        Ok(())
    }
}
