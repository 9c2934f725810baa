//! The VM's PCI devices: which slot holds which disk or NIC, their handles (limits,
//! counters), and adding and removing them while the guest runs.
//!
//! Devices given at start and devices hot-plugged later go through the same path; only
//! the latter notify the guest. Removal is a request: the guest is told (through the
//! Generic Event Device) that a slot's device should go, and the device is only taken
//! down when the guest ejects the slot, so a guest that still uses a disk never has it
//! pulled from under it. Everything here runs on the VMM's control thread.

use std::os::unix::io::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use crate::api::{DeviceState, DiskInfo, NetInfo};
use crate::arch::layout::PCI_MMIO32_START;
use crate::devices::legacy::ged::{GedNotifier, EVENT_PCI_HOTPLUG};
use crate::devices::pci::hotplug::HotplugSlots;
use crate::devices::pci::msix::{Msix, MsixError};
use crate::devices::pci::root::{PciRootError, MAX_DEVICES};
use crate::devices::pci::PciRoot;
use crate::devices::rate_limiter::{RateLimit, RateLimiter};
use crate::devices::virtio::block::counters::{BlockCounters, BlockCountersReport};
use crate::devices::virtio::block::io::DiskError;
use crate::devices::virtio::block::{BlockConfig, VirtioBlock};
use crate::devices::virtio::net::device::{NetError, NetRateLimiters};
use crate::devices::virtio::net::worker::{NetCountersReport, NetStats};
use crate::devices::virtio::net::{NetConfig, VirtioNet};
use crate::devices::virtio::transport::pci::{VirtioPciDevice, VirtioPciError, BAR0_SIZE};
use crate::devices::virtio::VirtioDevice;
use crate::interrupts::{GsiRouter, InterruptError};
use crate::memory::GuestMemoryMmap;

/// Highest slot number on bus 0 (slot 0 is the host bridge).
pub const MAX_SLOT: u8 = (MAX_DEVICES - 1) as u8;
/// Hot-pluggable slots reserved beyond the devices given at start, by default.
pub const DEFAULT_SPARE_SLOTS: u8 = 8;
/// Device ids appear in URLs: short, and from a safe alphabet.
const MAX_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "'{0}' is not a valid device id: use 1 to {MAX_ID_LEN} letters, digits, '.', '_' or '-'"
    )]
    BadId(String),
    #[error("a device with id '{0}' is already attached")]
    DuplicateId(String),
    #[error("{path} is already attached as disk '{id}'")]
    PathInUse { path: PathBuf, id: String },
    #[error(
        "no free PCI slot: slots 1 to {last} are taken (start the VM with a larger --pci-slots)"
    )]
    NoFreeSlot { last: u8 },
    #[error("no disk '{0}'")]
    NoDisk(String),
    #[error("no NIC '{0}'")]
    NoNet(String),
    #[error("{source}")]
    Disk { path: PathBuf, source: DiskError },
    #[error("network device on TAP {tap}: {source}")]
    Net { tap: String, source: NetError },
    #[error("cannot raise the hot-plug event: {0}")]
    Notify(std::io::Error),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    #[error(transparent)]
    Pci(#[from] PciRootError),
}

impl DeviceError {
    /// Whether the caller asked for something that conflicts with the VM's current state
    /// (as opposed to a bad request, or a failure of the VMM itself).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            DeviceError::DuplicateId(_)
                | DeviceError::PathInUse { .. }
                | DeviceError::NoFreeSlot { .. }
                | DeviceError::Msix(MsixError::Interrupt(InterruptError::OutOfGsis))
        )
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, DeviceError::NoDisk(_) | DeviceError::NoNet(_))
    }

    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            DeviceError::BadId(_) | DeviceError::Disk { .. } | DeviceError::Net { .. }
        )
    }
}

type PciFunction = Arc<Mutex<VirtioPciDevice>>;

fn driver_ready(function: &PciFunction) -> bool {
    function.lock().is_ok_and(|f| f.is_activated())
}

struct Disk {
    id: String,
    function: PciFunction,
    index: usize,
    slot: u8,
    config: BlockConfig,
    /// The file as opened, for refusing the same file twice under another name.
    canonical: PathBuf,
    limiter: RateLimiter,
    counters: Arc<BlockCounters>,
    /// As opened: an RBD snapshot is read-only whatever the configuration says.
    read_only: bool,
    removing: bool,
}

struct Nic {
    id: String,
    function: PciFunction,
    index: usize,
    slot: u8,
    config: NetConfig,
    limiters: NetRateLimiters,
    stats: Arc<NetStats>,
    removing: bool,
}

/// What the device manager needs from the VM to put devices on its PCI bus.
pub struct DeviceManagerParts {
    pub pci_root: Arc<Mutex<PciRoot>>,
    pub router: GsiRouter,
    pub mem: GuestMemoryMmap,
    pub vm: Arc<VmFd>,
    /// Request queues per disk (one per vCPU).
    pub queues_per_disk: u16,
    /// Slots 1 to `last_slot` take devices (and are described as hot-pluggable).
    pub last_slot: u8,
    pub hotplug: HotplugSlots,
    pub ged: GedNotifier,
}

pub struct DeviceManager {
    p: DeviceManagerParts,
    disks: Vec<Disk>,
    nets: Vec<Nic>,
    next_disk_index: usize,
    next_net_index: usize,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where a slot's BAR 0 starts: fixed per slot, so a hot-plugged device finds its BAR
/// free without an allocator (the guest may still move it).
pub fn bar_address(slot: u8) -> u64 {
    PCI_MMIO32_START + u64::from(slot.saturating_sub(1)) * BAR0_SIZE
}

impl DeviceManager {
    pub fn new(parts: DeviceManagerParts) -> Self {
        DeviceManager {
            p: parts,
            disks: Vec::new(),
            nets: Vec::new(),
            next_disk_index: 0,
            next_net_index: 0,
        }
    }

    fn id_taken(&self, id: &str) -> bool {
        self.disks.iter().any(|d| d.id == id) || self.nets.iter().any(|n| n.id == id)
    }

    /// The caller's id, checked, or the first free `<kind><n>`.
    fn choose_id(
        &self,
        wanted: Option<&str>,
        kind: &str,
        index: usize,
    ) -> Result<String, DeviceError> {
        match wanted {
            Some(id) if !valid_id(id) => Err(DeviceError::BadId(id.to_owned())),
            Some(id) if self.id_taken(id) => Err(DeviceError::DuplicateId(id.to_owned())),
            Some(id) => Ok(id.to_owned()),
            None => Ok((index..)
                .map(|n| format!("{kind}{n}"))
                .find(|id| !self.id_taken(id))
                .expect("an unbounded range has a free name")),
        }
    }

    fn free_slot(&self) -> Result<u8, DeviceError> {
        let root = self.p.pci_root.lock().expect("PCI root lock poisoned");
        (1..=self.p.last_slot)
            .find(|&s| root.is_free(usize::from(s)))
            .ok_or(DeviceError::NoFreeSlot {
                last: self.p.last_slot,
            })
    }

    /// Puts `device` on the bus at `slot` behind its own MSI-X vectors.
    fn plug(
        &mut self,
        slot: u8,
        device: Box<dyn VirtioDevice>,
    ) -> Result<PciFunction, DeviceError> {
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let msix = Msix::with_kvm(&self.p.router, vectors)?;
        let device = Arc::new(Mutex::new(VirtioPciDevice::new(
            device,
            self.p.mem.clone(),
            msix,
            bar_address(slot),
            Some(self.p.vm.clone()),
        )?));
        self.p
            .pci_root
            .lock()
            .expect("PCI root lock poisoned")
            .add_device_at(usize::from(slot), device.clone(), Some(device.clone()))?;
        Ok(device)
    }

    fn announce(&self, slot: u8, hotplug: bool) -> Result<(), DeviceError> {
        if hotplug {
            self.p.hotplug.device_added(slot);
            self.p
                .ged
                .notify(EVENT_PCI_HOTPLUG)
                .map_err(DeviceError::Notify)?;
        }
        Ok(())
    }

    /// Adds a virtio-blk disk in the first free slot; with `hotplug`, the guest is told.
    /// On any error nothing is left behind: no slot taken, no file kept open.
    pub fn add_disk(
        &mut self,
        config: BlockConfig,
        hotplug: bool,
    ) -> Result<DiskInfo, DeviceError> {
        let index = self.next_disk_index;
        let id = self.choose_id(config.id.as_deref(), "disk", index)?;
        let disk_err = |source| DeviceError::Disk {
            path: config.source_name(),
            source,
        };
        let canonical = config.identity().map_err(disk_err)?;
        if let Some(other) = self.disks.iter().find(|d| d.canonical == canonical) {
            return Err(DeviceError::PathInUse {
                path: config.source_name(),
                id: other.id.clone(),
            });
        }
        let slot = self.free_slot()?;
        let block = VirtioBlock::new(&config, self.p.queues_per_disk).map_err(disk_err)?;
        let limiter = block.rate_limiter();
        let counters = block.counters();
        let read_only = block.read_only();
        let function = self.plug(slot, Box::new(block))?;
        self.next_disk_index += 1;
        self.disks.push(Disk {
            id,
            function,
            index,
            slot,
            config,
            canonical,
            limiter,
            counters,
            read_only,
            removing: false,
        });
        let info = self.disk_info(self.disks.len() - 1);
        if let Err(e) = self.announce(slot, hotplug) {
            self.unplug(slot);
            return Err(e);
        }
        tracing::info!(
            "disk '{}' ({}) in PCI slot {slot}",
            info.id,
            info.path.display()
        );
        Ok(info)
    }

    /// Adds a virtio-net NIC in the first free slot; with `hotplug`, the guest is told.
    /// `passed` is a TAP descriptor handed over the API socket, used instead of the name.
    pub fn add_net(
        &mut self,
        config: NetConfig,
        passed: Option<OwnedFd>,
        hotplug: bool,
    ) -> Result<NetInfo, DeviceError> {
        let index = self.next_net_index;
        let id = self.choose_id(config.id.as_deref(), "net", index)?;
        let slot = self.free_slot()?;
        let device =
            VirtioNet::with_passed_fd(&config, passed).map_err(|source| DeviceError::Net {
                tap: config.tap.clone(),
                source,
            })?;
        let limiters = device.rate_limiters();
        let stats = device.stats();
        let function = self.plug(slot, Box::new(device))?;
        self.next_net_index += 1;
        self.nets.push(Nic {
            id,
            function,
            index,
            slot,
            config,
            limiters,
            stats,
            removing: false,
        });
        let info = self.net_info(self.nets.len() - 1);
        if let Err(e) = self.announce(slot, hotplug) {
            self.unplug(slot);
            return Err(e);
        }
        tracing::info!("NIC '{}' (TAP {}) in PCI slot {slot}", info.id, info.tap);
        Ok(info)
    }

    fn request_removal(&self, slot: u8) -> Result<(), DeviceError> {
        self.p.hotplug.removal_requested(slot);
        self.p
            .ged
            .notify(EVENT_PCI_HOTPLUG)
            .map_err(DeviceError::Notify)
    }

    /// Asks the guest to let go of disk `id`; it stays until the guest ejects it. Asking
    /// again repeats the request.
    pub fn remove_disk(&mut self, id: &str) -> Result<DiskInfo, DeviceError> {
        let i = self.disk_position(id)?;
        self.request_removal(self.disks[i].slot)?;
        self.disks[i].removing = true;
        Ok(self.disk_info(i))
    }

    pub fn remove_net(&mut self, id: &str) -> Result<NetInfo, DeviceError> {
        let i = self.net_position(id)?;
        self.request_removal(self.nets[i].slot)?;
        self.nets[i].removing = true;
        Ok(self.net_info(i))
    }

    /// The guest ejected the slots in `slots` (a bitmap): their devices are taken down
    /// (workers ended, files closed) and forgotten.
    pub fn ejected(&mut self, slots: u32) {
        for slot in 1..=MAX_SLOT {
            if slots & (1 << slot) != 0 {
                self.unplug(slot);
            }
        }
    }

    fn unplug(&mut self, slot: u8) {
        let removed = self
            .p
            .pci_root
            .lock()
            .expect("PCI root lock poisoned")
            .remove_device(usize::from(slot));
        // Dropped here, outside the root's lock: the device's workers are joined.
        drop(removed);
        self.p.hotplug.slot_freed(slot);
        if let Some(i) = self.disks.iter().position(|d| d.slot == slot) {
            let disk = self.disks.remove(i);
            tracing::info!("disk '{}' ejected from PCI slot {slot}", disk.id);
        }
        if let Some(i) = self.nets.iter().position(|n| n.slot == slot) {
            let nic = self.nets.remove(i);
            tracing::info!("NIC '{}' ejected from PCI slot {slot}", nic.id);
        }
    }

    fn disk_position(&self, id: &str) -> Result<usize, DeviceError> {
        self.disks
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| DeviceError::NoDisk(id.to_owned()))
    }

    fn net_position(&self, id: &str) -> Result<usize, DeviceError> {
        self.nets
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| DeviceError::NoNet(id.to_owned()))
    }

    fn disk_info(&self, i: usize) -> DiskInfo {
        let d = &self.disks[i];
        DiskInfo {
            id: d.id.clone(),
            index: d.index,
            slot: d.slot,
            path: d.config.source_name(),
            read_only: d.read_only,
            serial: d.config.serial.clone(),
            rate_limit: d.limiter.limit(),
            driver_ready: driver_ready(&d.function),
            state: if d.removing {
                DeviceState::Removing
            } else {
                DeviceState::Active
            },
        }
    }

    fn net_info(&self, i: usize) -> NetInfo {
        let n = &self.nets[i];
        NetInfo {
            id: n.id.clone(),
            index: n.index,
            slot: n.slot,
            tap: n.config.tap.clone(),
            mac: n.config.mac.clone(),
            rate_limit: n.limiters.limit(),
            driver_ready: driver_ready(&n.function),
            state: if n.removing {
                DeviceState::Removing
            } else {
                DeviceState::Active
            },
        }
    }

    pub fn disks(&self) -> Vec<DiskInfo> {
        (0..self.disks.len()).map(|i| self.disk_info(i)).collect()
    }

    pub fn nets(&self) -> Vec<NetInfo> {
        (0..self.nets.len()).map(|i| self.net_info(i)).collect()
    }

    pub fn disk(&self, id: &str) -> Result<DiskInfo, DeviceError> {
        Ok(self.disk_info(self.disk_position(id)?))
    }

    pub fn net(&self, id: &str) -> Result<NetInfo, DeviceError> {
        Ok(self.net_info(self.net_position(id)?))
    }

    pub fn set_disk_limit(&self, id: &str, limit: RateLimit) -> Result<DiskInfo, DeviceError> {
        let i = self.disk_position(id)?;
        self.disks[i].limiter.update(limit);
        Ok(self.disk_info(i))
    }

    pub fn set_net_limit(&self, id: &str, limit: RateLimit) -> Result<NetInfo, DeviceError> {
        let i = self.net_position(id)?;
        self.nets[i].limiters.update(limit);
        Ok(self.net_info(i))
    }

    pub fn disk_counters(&self) -> Vec<(String, BlockCountersReport)> {
        self.disks
            .iter()
            .map(|d| (d.id.clone(), d.counters.report()))
            .collect()
    }

    pub fn net_counters(&self) -> Vec<(String, NetCountersReport)> {
        self.nets
            .iter()
            .map(|n| (n.id.clone(), n.stats.report()))
            .collect()
    }

    /// Takes every device off the bus, in order, at VM exit.
    pub fn shut_down(&mut self) {
        self.p
            .pci_root
            .lock()
            .expect("PCI root lock poisoned")
            .remove_all();
        self.disks.clear();
        self.nets.clear();
    }
}
