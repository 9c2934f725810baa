//! Guest RAM: allocation, the MMIO hole and registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::{FromRangesError, MmapRegionError};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::arch::layout::{MMIO32_HOLE_START, RAM_64BIT_START};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Smallest guest a stock distribution kernel plus initramfs boots in.
pub const MIN_MEMORY_MIB: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {requested} MiB is too small: at least {MIN_MEMORY_MIB} MiB is needed"
    )]
    TooSmall { requested: u64 },
    #[error("guest memory of {requested} MiB exceeds this host's RAM ({host} MiB)")]
    ExceedsHost { requested: u64, host: u64 },
    #[error("cannot read host memory size from /proc/meminfo: {0}")]
    HostMemInfo(String),
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[from] vm_memory::mmap::FromRangesError),
    #[error("cannot register guest memory with KVM: {0}")]
    Register(kvm_ioctls::Error),
}

/// RAM ranges for `size` bytes: below the 32-bit hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO32_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO32_HOLE_START as usize),
            (
                GuestAddress(RAM_64BIT_START),
                (size - MMIO32_HOLE_START) as usize,
            ),
        ]
    }
}

fn host_memory_mib() -> Result<u64, MemoryError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| MemoryError::HostMemInfo(e.to_string()))?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
        .ok_or_else(|| MemoryError::HostMemInfo("no MemTotal line".into()))
}

/// Checks the requested size against the limits before anything is allocated.
pub fn validate_size_mib(mib: u64) -> Result<(), MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall { requested: mib });
    }
    let host = host_memory_mib()?;
    if mib > host {
        return Err(MemoryError::ExceedsHost {
            requested: mib,
            host,
        });
    }
    Ok(())
}

pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size_mib(mib)?;
    let regions = ram_ranges(mib << 20)
        .into_iter()
        .map(|(start, size)| {
            let mapping = map_huge_page_aligned(size)?;
            GuestRegionMmap::new(mapping, start).ok_or(FromRangesError::InvalidGuestRegion)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mem = GuestMemoryMmap::from_regions(regions).map_err(FromRangesError::from)?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// The size of an x86 huge page.
const HUGE_PAGE: usize = 2 << 20;
const RAM_PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const RAM_FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Anonymous memory for `size` bytes of guest RAM at a 2 MiB-aligned host address. KVM
/// maps guest RAM to the guest in 2 MiB pages only where the host and guest addresses
/// agree modulo 2 MiB (RAM starts at 0 and 4 GiB, both aligned); at an address the kernel
/// picks, that is luck, and without it every guest page is a 4 KiB nested page fault
/// however the host backs it — 21 000 of them in a nested Debian boot, against 300–600
/// for Firecracker and Cloud Hypervisor (benches/nested_boot.sh with NESTED_BOOT_TRACE).
/// The mapping is never unmapped: a VMM process runs one VM, whose RAM lives as long as
/// the process, so no worker can outlive it.
fn map_huge_page_aligned(size: usize) -> Result<MmapRegion, FromRangesError> {
    let reserved = size
        .checked_add(HUGE_PAGE)
        .ok_or(FromRangesError::InvalidGuestRegion)?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks, overlapping nothing.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserved, RAM_PROT, RAM_FLAGS, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(MmapRegionError::Mmap(std::io::Error::last_os_error()).into());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = reserved - head - size;
    // SAFETY: both ranges lie inside the mapping made above and outside the part kept;
    // nothing refers to them yet.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: `start` is a page-aligned live mapping of `size` bytes with these protections
    // and flags, owned by nobody else, and it stays mapped for the life of the process.
    let region = unsafe { MmapRegion::build_raw(start as *mut u8, size, RAM_PROT, RAM_FLAGS) }?;
    Ok(region)
}

/// Asks the host for transparent huge pages under guest RAM, which hosts set to `madvise`
/// (Ubuntu's default; Debian's is `always`) give only where asked. Each host fault then
/// maps 2 MiB instead of 4 KiB, so loading the kernel and the guest's first touches of its
/// memory cost hundreds of faults instead of tens of thousands; on a nested host, where
/// every fault is slow, that is most of the time before the guest's first output. Cloud
/// Hypervisor does the same by default. Only a hint: a host set to `never` ignores it, and
/// guest RAM still never grows past its size.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(addr) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        // SAFETY: the range is exactly one live mapping owned by `mem`; MADV_HUGEPAGE
        // changes how the kernel backs it, never what it holds.
        let rc = unsafe { libc::madvise(addr.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                "guest RAM without transparent huge pages: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::HostMemInfo("region without host mapping".into()))?;
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps alive (the
        // Vm struct holds the memory for as long as the VmFd exists), and slots do not overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Highest guest-physical address + 1 of RAM below the 32-bit hole.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO32_HOLE_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range_below_the_hole() {
        let ranges = ram_ranges(256 << 20);
        assert_eq!(ranges, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO32_HOLE_START as usize));
        assert_eq!(ranges[1], (GuestAddress(1 << 32), (1 << 30) as usize));
    }

    #[test]
    fn size_limits_are_enforced() {
        assert!(matches!(
            validate_size_mib(32),
            Err(MemoryError::TooSmall { requested: 32 })
        ));
        let too_big = host_memory_mib().unwrap() + 1;
        assert!(matches!(
            validate_size_mib(too_big),
            Err(MemoryError::ExceedsHost { .. })
        ));
        assert!(validate_size_mib(128).is_ok());
    }

    /// The `VmFlags` of the mapping that starts at `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Option<Vec<String>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines.next()?;
        lines
            .take_while(|l| l.contains(':') && !l.contains('-'))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .map(|flags| flags.split_whitespace().map(str::to_owned).collect())
    }

    #[test]
    fn guest_ram_lies_on_huge_page_boundaries_of_the_host() {
        let mem = create_guest_memory(MIN_MEMORY_MIB).unwrap();
        for region in mem.iter() {
            let addr = mem.get_host_address(region.start_addr()).unwrap() as usize;
            assert_eq!(
                addr % HUGE_PAGE,
                0,
                "region at {:#x}",
                region.start_addr().0
            );
        }
        // The whole range is usable, first byte to last.
        let last = GuestAddress((MIN_MEMORY_MIB << 20) - 1);
        vm_memory::Bytes::write_obj(&mem, 0xa5u8, last).unwrap();
        assert_eq!(vm_memory::Bytes::read_obj::<u8>(&mem, last).unwrap(), 0xa5);
    }

    #[test]
    fn guest_ram_asks_for_transparent_huge_pages() {
        let mem = create_guest_memory(MIN_MEMORY_MIB).unwrap();
        let region = mem.iter().next().unwrap();
        let addr = mem.get_host_address(region.start_addr()).unwrap() as usize;
        // `hg`: the mapping was advised MADV_HUGEPAGE, whatever the host's own setting.
        let flags = vm_flags(addr).expect("guest RAM's mapping in smaps");
        assert!(flags.iter().any(|f| f == "hg"), "{flags:?}");
    }
}
