//! The virtio-pci transport driven the way Linux's virtio_pci driver does it: capabilities
//! found by walking config space, feature negotiation, queue setup, MSI-X, a notification,
//! a completion interrupt, and reset. No KVM: interrupts land on plain eventfds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stratus_vmm::bus::BusDevice;
use stratus_vmm::devices::pci::msix::{MsiSink, Msix};
use stratus_vmm::devices::pci::PciDevice;
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::transport::pci::*;
use stratus_vmm::devices::virtio::*;
use stratus_vmm::interrupts::{InterruptError, MsiMessage};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

type RouteLog = Arc<Mutex<Vec<(u32, Option<MsiMessage>)>>>;

#[derive(Clone, Default)]
struct Routes(RouteLog);

/// A virtio vendor capability: (cfg_type, bar, offset, length, where it sits).
type VirtioCap = (u8, u8, u32, u32, usize);

impl MsiSink for Routes {
    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        self.0.lock().unwrap().push((gsi, msg));
        Ok(())
    }
}

struct Setup {
    dev: VirtioPciDevice,
    msix: Msix,
    routes: Routes,
    mem: GuestMemoryMmap,
    _disk: tempfile::NamedTempFile,
}

fn setup() -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let block = VirtioBlock::new(
        &BlockConfig {
            serial: Some("vol-42".into()),
            ..BlockConfig::new(disk.path())
        },
        1,
    )
    .unwrap();
    let routes = Routes::default();
    let fds = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let msix = Msix::new(vec![24, 25], fds, Box::new(routes.clone())).unwrap();
    let dev = VirtioPciDevice::new(
        Box::new(block),
        mem.clone(),
        msix.clone(),
        0xc000_0000,
        None,
    )
    .unwrap();
    Setup {
        dev,
        msix,
        routes,
        mem,
        _disk: disk,
    }
}

fn cfg_byte(dev: &mut VirtioPciDevice, offset: usize) -> u8 {
    (dev.read_config_register(offset / 4) >> ((offset % 4) * 8)) as u8
}

fn cfg_u32(dev: &mut VirtioPciDevice, offset: usize) -> u32 {
    dev.read_config_register(offset / 4)
}

/// (cfg_type -> (bar, offset, length, cap offset)), and the MSI-X capability offset.
fn walk_capabilities(dev: &mut VirtioPciDevice) -> (Vec<VirtioCap>, usize) {
    let status = (dev.read_config_register(1) >> 16) as u16;
    assert_ne!(status & (1 << 4), 0, "capability list bit");
    let mut at = cfg_byte(dev, 0x34) as usize;
    let mut virtio = Vec::new();
    let mut msix = None;
    let mut guard = 0;
    while at != 0 {
        guard += 1;
        assert!(guard < 16, "capability list loops");
        match cfg_byte(dev, at) {
            0x09 => virtio.push((
                cfg_byte(dev, at + 3),
                cfg_byte(dev, at + 4),
                cfg_u32(dev, at + 8),
                cfg_u32(dev, at + 12),
                at,
            )),
            0x11 => msix = Some(at),
            other => panic!("unexpected capability {other:#x}"),
        }
        at = cfg_byte(dev, at + 1) as usize;
    }
    (virtio, msix.expect("MSI-X capability"))
}

fn r8(dev: &mut VirtioPciDevice, off: u64) -> u8 {
    let mut b = [0u8; 1];
    dev.read(off, &mut b);
    b[0]
}
fn r16(dev: &mut VirtioPciDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    dev.read(off, &mut b);
    u16::from_le_bytes(b)
}
fn r32(dev: &mut VirtioPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}
fn w8(dev: &mut VirtioPciDevice, off: u64, v: u8) {
    dev.write(off, &[v]);
}
fn w16(dev: &mut VirtioPciDevice, off: u64, v: u16) {
    dev.write(off, &v.to_le_bytes());
}
fn w32(dev: &mut VirtioPciDevice, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}
fn w64(dev: &mut VirtioPciDevice, off: u64, v: u64) {
    w32(dev, off, v as u32);
    w32(dev, off + 4, (v >> 32) as u32);
}

fn negotiate(dev: &mut VirtioPciDevice, accept_hi: u32) -> u8 {
    w8(dev, 0x14, DEVICE_STATUS_ACKNOWLEDGE);
    w8(dev, 0x14, DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER);
    w32(dev, 0x00, 0);
    let lo = r32(dev, 0x04);
    w32(dev, 0x00, 1);
    let hi = r32(dev, 0x04);
    assert_ne!(lo & (1 << 9), 0, "FLUSH offered");
    assert_ne!(hi & 1, 0, "VERSION_1 offered");
    w32(dev, 0x08, 0);
    w32(dev, 0x0c, lo & ((1 << 9) | (1 << 2) | (1 << 6)));
    w32(dev, 0x08, 1);
    w32(dev, 0x0c, accept_hi);
    w8(
        dev,
        0x14,
        DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK,
    );
    r8(dev, 0x14)
}

/// Points queue 0 at `mock`'s rings and enables it.
fn enable_queue_0(dev: &mut VirtioPciDevice, mock: &MockSplitQueue<GuestMemoryMmap>) {
    w16(dev, 0x16, 0);
    w64(dev, 0x20, mock.desc_table_addr().0);
    w64(dev, 0x28, mock.avail_addr().0);
    w64(dev, 0x30, mock.used_addr().0);
    w16(dev, 0x1c, 1);
}

/// The driver says it is ready, having negotiated features.
fn driver_ok(dev: &mut VirtioPciDevice) {
    let ready = DEVICE_STATUS_ACKNOWLEDGE
        | DEVICE_STATUS_DRIVER
        | DEVICE_STATUS_FEATURES_OK
        | DEVICE_STATUS_DRIVER_OK;
    w8(dev, 0x14, ready);
}

#[test]
fn capabilities_describe_bar0_regions() {
    let mut s = setup();
    assert_eq!(cfg_u32(&mut s.dev, 0), 0x1042_1af4);
    let (caps, msix_at) = walk_capabilities(&mut s.dev);
    let find = |t: u8| {
        caps.iter()
            .find(|c| c.0 == t)
            .copied()
            .expect("cap present")
    };
    assert_eq!(find(1).1, 0);
    assert_eq!(
        (find(1).2, find(1).3),
        (COMMON_CFG_OFFSET as u32, COMMON_CFG_SIZE as u32)
    );
    assert_eq!(find(3).2, ISR_CFG_OFFSET as u32);
    assert_eq!(find(4).2, DEVICE_CFG_OFFSET as u32);
    let notify = find(2);
    assert_eq!(notify.2, NOTIFY_OFFSET as u32);
    assert_eq!(cfg_u32(&mut s.dev, notify.4 + 16), NOTIFY_OFF_MULTIPLIER);
    assert!(
        caps.iter().any(|c| c.0 == 5),
        "PCI configuration access capability"
    );
    // MSI-X: two vectors, table and PBA in BAR 0.
    let control = cfg_u32(&mut s.dev, msix_at) >> 16;
    assert_eq!(control & 0x7ff, 1);
    assert_eq!(cfg_u32(&mut s.dev, msix_at + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(cfg_u32(&mut s.dev, msix_at + 8), MSIX_PBA_OFFSET as u32);
    // Device config: capacity of the 1 MiB disk in sectors, blk_size 512.
    let capacity = r32(&mut s.dev, DEVICE_CFG_OFFSET) as u64
        | (r32(&mut s.dev, DEVICE_CFG_OFFSET + 4) as u64) << 32;
    assert_eq!(capacity, 2048);
    assert_eq!(r32(&mut s.dev, DEVICE_CFG_OFFSET + 20), 512);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut s = setup();
    let status = negotiate(&mut s.dev, 0);
    assert_eq!(status & DEVICE_STATUS_FEATURES_OK, 0);
}

/// A driver that goes on to DRIVER_OK although the device refused its features (here: no
/// VERSION_1) must not get a running device with features nobody agreed on.
#[test]
fn driver_ok_without_features_ok_does_not_start_the_device() {
    let mut s = setup();
    let status = negotiate(&mut s.dev, 0);
    assert_eq!(status & DEVICE_STATUS_FEATURES_OK, 0);
    let mock = MockSplitQueue::create(&s.mem, GuestAddress(0x1000), QUEUE_SIZE);
    enable_queue_0(&mut s.dev, &mock);
    w8(
        &mut s.dev,
        0x14,
        DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_DRIVER_OK,
    );
    assert!(!s.dev.is_activated());
    assert_ne!(r8(&mut s.dev, 0x14) & DEVICE_STATUS_NEEDS_RESET, 0);
    // A reset and a proper negotiation start it as usual.
    w8(&mut s.dev, 0x14, 0);
    assert_ne!(negotiate(&mut s.dev, 1) & DEVICE_STATUS_FEATURES_OK, 0);
    enable_queue_0(&mut s.dev, &mock);
    driver_ok(&mut s.dev);
    assert!(s.dev.is_activated());
}

/// A device that starts something, then fails to activate (as a net device whose second
/// queue pair's worker cannot be spawned); `running` says whether what it started still
/// runs.
struct HalfStarting {
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl VirtioDevice for HalfStarting {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn available_features(&self) -> u64 {
        (1 << 32) | (1 << 9)
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _ctx: ActivateContext) -> Result<(), ActivateError> {
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Err(ActivateError::QueueCount {
            enabled: 1,
            needed: 2,
        })
    }
    fn reset(&mut self) {
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Regression: a device that failed partway through activation kept what it had started
/// (the transport reset only activated devices), and a second DRIVER_OK started more.
#[test]
fn a_device_that_fails_to_activate_is_reset_at_once() {
    let s = setup();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let device = HalfStarting {
        running: running.clone(),
    };
    let mut dev = VirtioPciDevice::new(
        Box::new(device),
        s.mem.clone(),
        s.msix.clone(),
        0xc000_0000,
        None,
    )
    .unwrap();
    assert_ne!(negotiate(&mut dev, 1) & DEVICE_STATUS_FEATURES_OK, 0);
    let mock = MockSplitQueue::create(&s.mem, GuestAddress(0x1000), QUEUE_SIZE);
    enable_queue_0(&mut dev, &mock);
    driver_ok(&mut dev);
    assert!(!dev.is_activated());
    assert_ne!(r8(&mut dev, 0x14) & DEVICE_STATUS_NEEDS_RESET, 0);
    assert!(
        !running.load(std::sync::atomic::Ordering::SeqCst),
        "what the device started before failing still runs"
    );
}

#[test]
fn pci_cfg_capability_window_reads_bar0() {
    let mut s = setup();
    let (caps, _) = walk_capabilities(&mut s.dev);
    let cap = caps.iter().find(|c| c.0 == 5).unwrap().4;
    // bar 0, offset 0x12 (num_queues), length 2.
    s.dev.write_config_register(cap / 4 + 1, 0, &[0]);
    s.dev
        .write_config_register((cap + 8) / 4, 0, &0x12u32.to_le_bytes());
    s.dev
        .write_config_register((cap + 12) / 4, 0, &2u32.to_le_bytes());
    assert_eq!(s.dev.read_config_register((cap + 16) / 4) & 0xffff, 1);
}

#[test]
fn driver_sets_up_a_queue_notifies_and_gets_an_msix_completion() {
    let mut s = setup();
    let (_, msix_at) = walk_capabilities(&mut s.dev);
    let status = negotiate(&mut s.dev, 1);
    assert_ne!(status & DEVICE_STATUS_FEATURES_OK, 0);

    // Enable MSI-X and program both vectors.
    s.dev
        .write_config_register(msix_at / 4, 2, &0x8000u16.to_le_bytes());
    assert!(s.msix.enabled());
    for v in 0..2u64 {
        let entry = MSIX_TABLE_OFFSET + v * 16;
        w32(&mut s.dev, entry, 0xfee0_0000);
        w32(&mut s.dev, entry + 4, 0);
        w32(&mut s.dev, entry + 8, 0x30 + v as u32);
        w32(&mut s.dev, entry + 12, 0);
    }
    assert!(s.routes.0.lock().unwrap().contains(&(
        25,
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x31
        })
    )));
    w16(&mut s.dev, 0x10, 0);
    assert_eq!(r16(&mut s.dev, 0x10), 0);

    assert_eq!(r16(&mut s.dev, 0x12), 1, "one queue");
    w16(&mut s.dev, 0x16, 0);
    assert_eq!(r16(&mut s.dev, 0x18), QUEUE_SIZE);
    w16(&mut s.dev, 0x1a, 7);
    assert_eq!(
        r16(&mut s.dev, 0x1a),
        VIRTIO_MSI_NO_VECTOR,
        "vector beyond the table"
    );
    w16(&mut s.dev, 0x1a, 1);
    assert_eq!(r16(&mut s.dev, 0x1a), 1);
    let mock = MockSplitQueue::create(&s.mem, GuestAddress(0x1000), QUEUE_SIZE);
    enable_queue_0(&mut s.dev, &mock);
    assert_eq!(r16(&mut s.dev, 0x1c), 1);
    driver_ok(&mut s.dev);
    assert_eq!(r8(&mut s.dev, 0x14) & DEVICE_STATUS_NEEDS_RESET, 0);

    // A GET_ID request: header, 20-byte buffer, status.
    let (header, buffer, status_at) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
    s.mem
        .write_obj(VIRTIO_BLK_T_GET_ID, GuestAddress(header))
        .unwrap();
    s.mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(
            header,
            16,
            VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            buffer,
            20,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            status_at,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    mock.add_desc_chains(&descs, 0).unwrap();
    w16(&mut s.dev, NOTIFY_OFFSET, 0);

    let irq = s.msix.irqfd(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while irq.read().is_err() {
        assert!(
            Instant::now() < deadline,
            "no completion interrupt on vector 1"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(
        s.mem.read_obj::<u8>(GuestAddress(status_at)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut id = [0u8; 6];
    s.mem.read_slice(&mut id, GuestAddress(buffer)).unwrap();
    assert_eq!(&id, b"vol-42");
    // ISR shows a queue interrupt and clears on read.
    assert_eq!(r8(&mut s.dev, ISR_CFG_OFFSET), 1);
    assert_eq!(r8(&mut s.dev, ISR_CFG_OFFSET), 0);

    // Reset: status reads back 0 and the queue is gone.
    w8(&mut s.dev, 0x14, 0);
    assert_eq!(r8(&mut s.dev, 0x14), 0);
    assert_eq!(r16(&mut s.dev, 0x1c), 0);
    assert_eq!(r16(&mut s.dev, 0x1a), VIRTIO_MSI_NO_VECTOR);
}
