//! Direct kernel boot: ELF vmlinux (64-bit or PVH entry) or bzImage, initrd and command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::boot_params::Initrd;
use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::regs::EntryMode;
use crate::memory::{low_ram_end, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat { path: PathBuf },
    #[error("cannot load kernel {path}: {reason}")]
    LoadKernel { path: PathBuf, reason: String },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot copy initrd {path} into guest memory: {reason}")]
    LoadInitrd { path: PathBuf, reason: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Recognises the kernel by its magic numbers, before any loader gets to see it.
pub fn detect_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// What the boot vCPU needs to start the loaded kernel.
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
    pub format: KernelFormat,
}

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let load_err = |reason: String| LoaderError::LoadKernel {
        path: path.to_owned(),
        reason,
    };
    let format = detect_format(&mut file)
        .map_err(|e| load_err(e.to_string()))?
        .ok_or_else(|| LoaderError::UnknownKernelFormat {
            path: path.to_owned(),
        })?;
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| load_err(e.to_string()))?;
            let (entry, mode) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.0, EntryMode::Protected32),
                _ => (
                    elf_entry(&mut file).map_err(|e| load_err(e.to_string()))?,
                    EntryMode::Long64,
                ),
            };
            Ok(LoadedKernel {
                entry,
                mode,
                kernel_end: result.kernel_end,
                setup_header: None,
                format,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| load_err(e.to_string()))?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            Ok(LoadedKernel {
                entry: result.kernel_load.0 + 0x200,
                mode: EntryMode::Long64,
                kernel_end: result.kernel_end,
                setup_header: result.setup_header,
                format,
            })
        }
    }
}

/// The ELF header's entry point: the 64-bit `startup_64` of a vmlinux.
fn elf_entry(file: &mut File) -> std::io::Result<u64> {
    let mut header = [0u8; 32];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut header)?;
    Ok(u64::from_le_bytes(
        header[24..32].try_into().expect("8 bytes"),
    ))
}

/// Highest address the kernel accepts for an initrd when its header does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Copies the initrd to the top of low RAM (below the kernel's limit), page aligned.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<Initrd, LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::OpenInitrd {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| LoaderError::OpenInitrd {
            path: path.to_owned(),
            source,
        })?
        .len();
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&max| max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = low_ram_end(mem).min(addr_max + 1);
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoaderError::LoadInitrd {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Initrd { addr, size })
}

/// Writes the command line; returns its length including the terminating NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, LoaderError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    debug_assert!(mem.address_in_range(GuestAddress(CMDLINE_START)));
    Ok(cmdline.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;
    use std::io::Write;

    #[test]
    fn a_file_that_is_not_a_kernel_is_refused_by_name() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"#!/bin/sh\necho not a kernel\n").unwrap();
        let err = load_kernel(&mem, f.path()).err().expect("must fail");
        assert!(matches!(err, LoaderError::UnknownKernelFormat { .. }));
        assert!(err
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
    }

    #[test]
    fn a_missing_kernel_is_refused_by_name() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux"))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn initrd_lands_page_aligned_at_the_top_of_low_ram() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0xab; 5000]).unwrap();
        let initrd = load_initrd(&mem, f.path(), HIMEM_START + 0x1000, None).unwrap();
        assert_eq!(initrd.size, 5000);
        assert_eq!(initrd.addr % 4096, 0);
        assert!(initrd.addr + initrd.size <= 64 << 20);
        let mut back = [0u8; 5000];
        vm_memory::Bytes::read_slice(&mem, &mut back, GuestAddress(initrd.addr)).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(80 << 20).unwrap();
        let err = load_initrd(&mem, f.path(), HIMEM_START, None)
            .err()
            .unwrap();
        assert!(matches!(err, LoaderError::InitrdTooLarge { .. }));
    }
}
