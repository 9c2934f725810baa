//! Virtio devices and the PCI transport that exposes them.

pub mod block;
pub mod net;
pub mod transport;
pub mod worker;

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const DEVICE_STATUS_ACKNOWLEDGE: u8 = 1;
pub const DEVICE_STATUS_DRIVER: u8 = 2;
pub const DEVICE_STATUS_DRIVER_OK: u8 = 4;
pub const DEVICE_STATUS_FEATURES_OK: u8 = 8;
pub const DEVICE_STATUS_NEEDS_RESET: u8 = 0x40;
pub const DEVICE_STATUS_FAILED: u8 = 0x80;

pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    Config,
    Queue(u16),
}

pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType);
}

/// Everything a device needs to start serving its queues once the driver is ready.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {enabled} queues, the device needs {needed}")]
    QueueCount { enabled: usize, needed: usize },
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn available_features(&self) -> u64;
    /// Device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the worker; the transport then returns to its reset state.
    fn reset(&mut self);
}

/// Copies `data.len()` bytes of `config` from `offset`, zero past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// With EVENT_IDX: re-enables the driver's notifications and tells whether it made buffers
/// available meanwhile, which the caller then takes instead of waiting for a kick that will
/// not come. A ring virtio-queue refuses to pop from (its index more than a queue ahead of
/// the device's, or no available ring address) counts as empty: `enable_notification`
/// alone would report more forever while every pop hands out nothing, and the worker would
/// spin on the guest's word without end.
pub fn enable_notification_checked(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.enable_notification(mem).unwrap_or(false) && queue.iter(mem).is_ok()
}

/// Whether the driver made buffers available that the device has not taken yet: what a
/// polling worker looks at instead of waiting for a kick. An index more than a queue
/// ahead is nothing to take (virtio-queue pops nothing from it), not work to spin on.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| {
            let waiting = (idx - std::num::Wrapping(queue.next_avail())).0;
            waiting != 0 && waiting <= queue.size()
        })
}

/// An interrupt line nobody listens to, for device tests that drive a worker directly.
#[cfg(test)]
pub(crate) struct NoInterrupt;

#[cfg(test)]
impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// Regression (found by fuzz/blk_request): a driver that moves the available index
    /// more than a queue ahead made the block and net workers spin forever.
    #[test]
    fn a_ring_index_more_than_a_queue_ahead_reports_nothing_more() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        mock.avail().idx().store(3);
        assert!(queue.enable_notification(&mem).unwrap());
        assert!(enable_notification_checked(&mut queue, &mem));
        assert!(has_available(&queue, &mem));
        mock.avail().idx().store(17);
        assert!(
            !has_available(&queue, &mem),
            "a polling worker would spin on it"
        );
        assert!(
            queue.enable_notification(&mem).unwrap(),
            "what virtio-queue says"
        );
        assert!(queue.pop_descriptor_chain(&mem).is_none());
        assert!(!enable_notification_checked(&mut queue, &mem));
        mock.avail().idx().store(0);
        assert!(!enable_notification_checked(&mut queue, &mem));
    }
}
