//! Virtio 1.x over PCI ("modern" transport): vendor capabilities pointing into BAR 0 for the
//! common, ISR, device and notification regions, MSI-X for interrupts and one ioeventfd per
//! queue so notifications never exit to user space.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::devices::pci::configuration::{ConfigurationError, PciConfiguration, PciHeader};
use crate::devices::pci::msix::{Msix, MSIX_CAPABILITY_ID};
use crate::devices::pci::PciDevice;
use crate::devices::virtio::*;
use crate::log_limit::rate_limited;
use crate::memory::GuestMemoryMmap;

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const PCI_CAP_ID_VENDOR: u8 = 0x09;

const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// BAR 0 layout. Each region gets its own page so it can be trapped on its own.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_SIZE: u64 = 0x38;
pub const ISR_CFG_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
pub const BAR0_SIZE: u64 = 0x8000;
/// Table room between the table and the PBA: 512 vectors.
const MAX_VECTORS: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize;

pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device has {0} queues; the transport supports 1 to {max}", max = MAX_VECTORS - 1)]
    QueueCount(usize),
    #[error("invalid queue size {0}: must be a power of two up to 32768")]
    QueueSize(u16),
    #[error(transparent)]
    Configuration(#[from] ConfigurationError),
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(std::io::Error),
}

/// MSI-X vector the driver chose for the config change interrupt and for each queue.
struct Vectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

struct PciInterrupt {
    msix: Msix,
    vectors: Arc<Vectors>,
    isr: Arc<AtomicU8>,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        let (isr_bit, vector) = match kind {
            VirtioInterruptType::Config => (2, self.vectors.config.load(Ordering::Acquire)),
            VirtioInterruptType::Queue(q) => (
                1,
                self.vectors
                    .queues
                    .get(q as usize)
                    .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire)),
            ),
        };
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        if vector != VIRTIO_MSI_NO_VECTOR {
            self.msix.trigger(vector);
        }
    }
}

pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    vm: Option<Arc<VmFd>>,
    msix: Msix,
    msix_cap_offset: usize,
    pci_cfg_cap_offset: usize,
    vectors: Arc<Vectors>,
    isr: Arc<AtomicU8>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    activated: bool,
}

impl VirtioPciDevice {
    /// `msix` must have one vector per queue plus one for configuration changes.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msix: Msix,
        bar0_addr: u64,
        vm: Option<Arc<VmFd>>,
    ) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty()
            || sizes.len() + 1 > MAX_VECTORS
            || msix.vector_count() as usize != sizes.len() + 1
        {
            return Err(VirtioPciError::QueueCount(sizes.len()));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_events = Vec::with_capacity(sizes.len());
        for &size in &sizes {
            queues.push(Queue::new(size).map_err(|_| VirtioPciError::QueueSize(size))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?);
        }
        let device_type = device.device_type();
        let class_code = match device_type {
            VIRTIO_ID_BLOCK => (0x01, 0x80, 0x00),
            crate::devices::virtio::net::device::VIRTIO_ID_NET => (0x02, 0x00, 0x00),
            _ => (0xff, 0x00, 0x00),
        };
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class_code,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        config.add_memory_bar(0, bar0_addr, BAR0_SIZE)?;
        let msix_cap_offset = config.add_capability(
            MSIX_CAPABILITY_ID,
            &msix.capability_body(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32),
            &Msix::capability_writable_mask(),
        )?;
        let notify_len = sizes.len() as u32 * NOTIFY_OFF_MULTIPLIER;
        for (cfg_type, offset, len) in [
            (
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE as u32,
            ),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1),
            (
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE as u32,
            ),
        ] {
            config.add_capability(
                PCI_CAP_ID_VENDOR,
                &virtio_cap_body(cfg_type, offset as u32, len, &[]),
                &[],
            )?;
        }
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &virtio_cap_body(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET as u32,
                notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        // The PCI configuration access window: bar, offset, length and data are the driver's.
        let mut writable = vec![0u8; 20];
        writable[4] = 0xff;
        writable[8..20].fill(0xff);
        let pci_cfg_cap_offset = config.add_capability(
            PCI_CAP_ID_VENDOR,
            &virtio_cap_body(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]),
            &writable,
        )?;
        let vectors = Arc::new(Vectors {
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: sizes
                .iter()
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        });
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            vm,
            msix,
            msix_cap_offset,
            pci_cfg_cap_offset,
            vectors,
            isr: Arc::new(AtomicU8::new(0)),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            queue_events,
            activated: false,
        })
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether a guest driver has set the device up (DRIVER_OK) and it is serving.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn queue_event(&self, index: usize) -> Option<&EventFd> {
        self.queue_events.get(index)
    }

    fn device_features(&self) -> u64 {
        self.device.available_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queue_select as usize;
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.vectors.config.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self.queues.get(q).map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => self
                .vectors
                .queues
                .get(q)
                .map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::Acquire))
                }),
            (0x1c, 2) => self.queues.get(q).map_or(0, |q| u64::from(q.ready())),
            (0x1e, 2) => q as u64, // queue_notify_off: queue i notifies at i * multiplier
            (0x20, 4) => self
                .queues
                .get(q)
                .map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => self.queues.get(q).map_or(0, |q| q.desc_table() >> 32),
            (0x28, 4) => self
                .queues
                .get(q)
                .map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => self.queues.get(q).map_or(0, |q| q.avail_ring() >> 32),
            (0x30, 4) => self
                .queues
                .get(q)
                .map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => self.queues.get(q).map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = match data.len() {
            1 => u32::from(data[0]),
            2 => u32::from(u16::from_le_bytes([data[0], data[1]])),
            4 => u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            _ => return,
        };
        // Queue layout may only change before the driver says it is ready.
        let queue_writable = self.status & DEVICE_STATUS_DRIVER_OK == 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value,
            (0x08, 4) => self.driver_feature_select = value,
            (0x0c, 4) if self.status & DEVICE_STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self
                .vectors
                .config
                .store(self.checked_vector(value as u16), Ordering::Release),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    // Sizes that are not a power of two within the maximum leave the queue
                    // invalid; activation then refuses it.
                    q.set_size(value as u16);
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(value as u16);
                if let Some(v) = self.vectors.queues.get(self.queue_select as usize) {
                    v.store(vector, Ordering::Release);
                }
            }
            (0x1c, 2) if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            (0x20..=0x34, 4) if queue_writable => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let (lo, hi) = if offset.is_multiple_of(8) {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                match offset & !7 {
                    0x20 => q.set_desc_table_address(lo, hi),
                    0x28 => q.set_avail_ring_address(lo, hi),
                    0x30 => q.set_used_ring_address(lo, hi),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// A vector beyond the table reads back as NO_VECTOR, which tells the driver it failed.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.vector_count() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        let newly_set = status & !self.status;
        if newly_set & DEVICE_STATUS_FEATURES_OK != 0 {
            let unsupported = self.driver_features & !self.device_features();
            if unsupported != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver the device refused the set.
                status &= !DEVICE_STATUS_FEATURES_OK;
            }
        }
        self.status = status;
        if newly_set & DEVICE_STATUS_DRIVER_OK != 0 && !self.activated {
            if status & DEVICE_STATUS_FEATURES_OK == 0 {
                // No feature set was agreed (none offered, or ours refused): running now
                // would serve features the device never accepted.
                tracing::debug!("virtio: DRIVER_OK without FEATURES_OK; device needs reset");
                self.status |= DEVICE_STATUS_NEEDS_RESET;
                return;
            }
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mem = &self.mem;
        let invalid = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(mem));
        if let Some(index) = invalid {
            rate_limited!(
                tracing::Level::WARN,
                "virtio queue {index} is not valid in guest memory; device needs reset"
            );
            self.status |= DEVICE_STATUS_NEEDS_RESET;
            return;
        }
        let mut queues = Vec::new();
        let mut events = Vec::new();
        for (q, e) in self.queues.iter().zip(&self.queue_events) {
            if !q.ready() {
                break;
            }
            let Ok(event) = e.try_clone() else {
                self.status |= DEVICE_STATUS_NEEDS_RESET;
                return;
            };
            let Ok(mut queue) = Queue::try_from(q.state()) else {
                self.status |= DEVICE_STATUS_NEEDS_RESET;
                return;
            };
            queue.set_event_idx(self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
            queues.push(queue);
            events.push(event);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: Arc::new(PciInterrupt {
                msix: self.msix.clone(),
                vectors: self.vectors.clone(),
                isr: self.isr.clone(),
            }),
            queues,
            queue_events: events,
            acked_features: self.driver_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                rate_limited!(tracing::Level::ERROR, "cannot activate virtio device: {e}");
                // What the device started before it failed (a net device's first queue
                // pairs' workers) stops now: the transport's own reset only resets an
                // activated device, and a second DRIVER_OK would start it all again.
                self.device.reset();
                self.status |= DEVICE_STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        // A stale notification must not wake the next incarnation's worker.
        for e in &self.queue_events {
            let _ = e.read();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.isr.store(0, Ordering::Release);
        self.vectors
            .config
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in &self.vectors.queues {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }

    fn bar0_access(&mut self, offset: u64, data: &mut [u8], write: Option<&[u8]>) {
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => match write {
                Some(w) => self.write_common(o, w),
                None => self.read_common(o, data),
            },
            ISR_CFG_OFFSET => {
                if write.is_none() {
                    data.fill(0);
                    // Reading the ISR acknowledges it.
                    data[0] = self.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                match write {
                    Some(w) => self.device.write_config(o - DEVICE_CFG_OFFSET, w),
                    None => self.device.read_config(o - DEVICE_CFG_OFFSET, data),
                }
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Only reached when no ioeventfd is registered (tests, or before mapping).
                if write.is_some() {
                    let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                    if let Some(e) = self.queue_events.get(queue) {
                        let _ = e.write(1);
                    }
                } else {
                    data.fill(0);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => match write {
                Some(w) => self.msix.write_table(o - MSIX_TABLE_OFFSET, w),
                None => self.msix.read_table(o - MSIX_TABLE_OFFSET, data),
            },
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => {
                if write.is_none() {
                    self.msix.read_pba(o - MSIX_PBA_OFFSET, data);
                }
            }
            _ => {
                if write.is_none() {
                    data.fill(0);
                }
            }
        }
    }

    fn notify_address(bar0: u64, queue: usize) -> u64 {
        bar0 + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    /// The window of the PCI configuration access capability: (bar, offset, length).
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let base = self.pci_cfg_cap_offset;
        let bar = self.config.byte(base + 4);
        let word =
            |at: usize| u32::from_le_bytes(std::array::from_fn(|i| self.config.byte(at + i)));
        (bar, u64::from(word(base + 8)), word(base + 12) as usize)
    }
}

fn virtio_cap_body(cfg_type: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg_type, 0 /* bar */, 0 /* id */, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_data_reg() {
            return self.read_pci_cfg_data();
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        let msix_control_reg = self.msix_cap_offset / 4;
        if reg == msix_control_reg {
            let control = u16::from_le_bytes([
                self.config.byte(self.msix_cap_offset + 2),
                self.config.byte(self.msix_cap_offset + 3),
            ]);
            self.msix.set_control(control);
        }
        // A write to pci_cfg_data goes through to BAR 0 at the window's offset.
        if reg == (self.pci_cfg_cap_offset + 16) / 4 {
            let (bar, window_offset, len) = self.pci_cfg_window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && data.len() == len {
                self.bar0_access(window_offset, &mut [], Some(data));
            }
        }
    }

    fn bar_moved(&mut self, _bar: usize, from: Option<u64>, to: Option<u64>) {
        let Some(vm) = self.vm.clone() else { return };
        for (i, event) in self.queue_events.iter().enumerate() {
            if let Some(old) = from {
                let addr = IoEventAddress::Mmio(Self::notify_address(old, i));
                if let Err(e) = vm.unregister_ioevent(event, &addr, NoDatamatch) {
                    tracing::warn!("cannot unregister queue {i} notification: {e}");
                }
            }
            if let Some(new) = to {
                let addr = IoEventAddress::Mmio(Self::notify_address(new, i));
                if let Err(e) = vm.register_ioevent(event, &addr, NoDatamatch) {
                    tracing::error!("cannot register queue {i} notification: {e}");
                }
            }
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar0_access(offset, data, None);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar0_access(offset, &mut [], Some(data));
    }
}

impl VirtioPciDevice {
    /// Reads pci_cfg_data: the configuration read is forwarded to BAR 0.
    pub fn read_pci_cfg_data(&mut self) -> u32 {
        let (bar, offset, len) = self.pci_cfg_window();
        if bar != 0 || !matches!(len, 1 | 2 | 4) {
            return 0;
        }
        let mut buf = [0u8; 4];
        self.bar0_access(offset, &mut buf[..len], None);
        u32::from_le_bytes(buf)
    }

    pub fn pci_cfg_data_reg(&self) -> usize {
        (self.pci_cfg_cap_offset + 16) / 4
    }
}
