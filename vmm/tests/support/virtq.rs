//! Descriptor chains as a simulated driver writes them, for the device test files.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;

/// Chains `descs` (address, length, flags; NEXT and indices are set here) at table index
/// `first`.
pub fn chain(descs: &[(u64, u32, u32)], first: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i == descs.len() - 1;
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
        })
        .collect()
}
