//! MSI-X: the vector table and pending bits in a BAR, each vector backed by its own GSI and
//! irqfd so devices raise interrupts without a VM exit.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::{GsiRouter, InterruptError, MsiMessage};
use crate::log_limit::rate_limited;

pub const MSIX_CAPABILITY_ID: u8 = 0x11;
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// The table size field is 11 bits wide.
pub const MAX_MSIX_VECTORS: u16 = 2048;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TableEntry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    vector_control: u32,
}

impl TableEntry {
    fn masked(&self) -> bool {
        self.vector_control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

/// Where the GSI routes and irqfds live; absent in device tests without KVM.
pub trait MsiSink: Send {
    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError>;
    /// The vector's device is gone: unbind `irqfd` and let `gsi` be handed out again.
    fn release(&self, _gsi: u32, _irqfd: &EventFd) {}
}

impl MsiSink for GsiRouter {
    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        self.set_msi_route(gsi, msg)
    }

    fn release(&self, gsi: u32, irqfd: &EventFd) {
        self.release_gsi(gsi, irqfd);
    }
}

pub struct MsixState {
    table: Vec<TableEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    sink: Box<dyn MsiSink>,
}

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("MSI-X needs between 1 and {MAX_MSIX_VECTORS} vectors, not {0}")]
    VectorCount(usize),
    #[error("cannot create an eventfd for an MSI-X vector: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    #[error("KVM refused an irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
}

/// Shared between the PCI transport (which the guest programs) and the device worker
/// (which raises interrupts).
#[derive(Clone)]
pub struct Msix(Arc<Mutex<MsixState>>);

impl Msix {
    /// `gsis[i]` carries vector `i`; `irqfds[i]` must already be bound to it in KVM.
    pub fn new(
        gsis: Vec<u32>,
        irqfds: Vec<EventFd>,
        sink: Box<dyn MsiSink>,
    ) -> Result<Self, MsixError> {
        let n = gsis.len();
        if n == 0 || n > MAX_MSIX_VECTORS as usize || irqfds.len() != n {
            return Err(MsixError::VectorCount(n));
        }
        Ok(Msix(Arc::new(Mutex::new(MsixState {
            // Vectors start masked, as the specification requires after reset.
            table: vec![
                TableEntry {
                    vector_control: VECTOR_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            gsis,
            irqfds,
            sink,
        }))))
    }

    /// Allocates GSIs and irqfds from KVM for `vectors` vectors.
    /// A failure part way gives back every GSI taken: they are a VM's for its lifetime
    /// (4096 of them), and hot-plugs that failed would otherwise use them up.
    pub fn with_kvm(router: &GsiRouter, vectors: u16) -> Result<Self, MsixError> {
        let mut gsis = Vec::with_capacity(vectors as usize);
        let mut irqfds = Vec::with_capacity(vectors as usize);
        let mut bind_one = || -> Result<(), MsixError> {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(MsixError::EventFd)?;
            let gsi = router.allocate_gsi()?;
            if let Err(source) = router.vm().register_irqfd(&fd, gsi) {
                router.free_unbound_gsi(gsi);
                return Err(MsixError::Irqfd { gsi, source });
            }
            gsis.push(gsi);
            irqfds.push(fd);
            Ok(())
        };
        let bound = (0..vectors).try_for_each(|_| bind_one());
        if let Err(e) = bound {
            for (gsi, fd) in gsis.iter().zip(&irqfds) {
                router.release_gsi(*gsi, fd);
            }
            return Err(e);
        }
        Msix::new(gsis, irqfds, Box::new(router.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MsixState> {
        self.0.lock().expect("MSI-X lock poisoned")
    }

    pub fn vector_count(&self) -> u16 {
        self.lock().table.len() as u16
    }

    pub fn table_size_bytes(&self) -> u64 {
        u64::from(self.vector_count()) * MSIX_TABLE_ENTRY_SIZE
    }

    pub fn pba_size_bytes(&self) -> u64 {
        self.lock().pending.len() as u64 * 8
    }

    /// Capability body (after ID and next pointer) for a table and PBA in `bar`.
    pub fn capability_body(&self, bar: u8, table_offset: u32, pba_offset: u32) -> Vec<u8> {
        let control = self.vector_count() - 1;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        body
    }

    /// Writable bytes of the capability: only the enable and function-mask bits.
    pub fn capability_writable_mask() -> Vec<u8> {
        vec![0, 0, 0, 0xc0]
    }

    /// Called after the guest wrote the message control word.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        let was_active = s.enabled && !s.function_masked;
        s.enabled = control & MSIX_ENABLE != 0;
        s.function_masked = control & MSIX_FUNCTION_MASK != 0;
        if s.enabled && !was_active {
            for v in 0..s.table.len() {
                s.update_route(v);
            }
        }
        if s.enabled && !s.function_masked {
            for v in 0..s.table.len() {
                s.deliver_if_pending(v);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let index = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let field = offset % MSIX_TABLE_ENTRY_SIZE;
        let Some(entry) = s.table.get(index) else {
            data.fill(0);
            return;
        };
        let words = [
            entry.address_lo,
            entry.address_hi,
            entry.data,
            entry.vector_control,
        ];
        read_words(&words, field, data);
    }

    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let index = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let field = offset % MSIX_TABLE_ENTRY_SIZE;
        let Some(entry) = s.table.get_mut(index) else {
            return;
        };
        let mut words = [
            entry.address_lo,
            entry.address_hi,
            entry.data,
            entry.vector_control,
        ];
        if !write_words(&mut words, field, data) {
            return;
        }
        let before = *entry;
        *entry = TableEntry {
            address_lo: words[0],
            address_hi: words[1],
            data: words[2],
            vector_control: words[3] & VECTOR_MASKED,
        };
        let after = *entry;
        if s.enabled && before.message() != after.message() {
            s.update_route(index);
        }
        if before.masked() && !after.masked() {
            s.deliver_if_pending(index);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let words: Vec<u32> = s
            .pending
            .iter()
            .flat_map(|w| [*w as u32, (*w >> 32) as u32])
            .collect();
        read_words(&words, offset, data);
    }

    /// Raises `vector`, or records it as pending while masked.
    pub fn trigger(&self, vector: u16) {
        let mut s = self.lock();
        let v = vector as usize;
        if !s.enabled || v >= s.table.len() {
            return;
        }
        if s.function_masked || s.table[v].masked() {
            s.pending[v / 64] |= 1 << (v % 64);
            return;
        }
        if let Err(e) = s.irqfds[v].write(1) {
            tracing::warn!("cannot signal MSI-X vector {vector}: {e}");
        }
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        let s = self.lock();
        let v = vector as usize;
        v < s.table.len() && s.pending[v / 64] & (1 << (v % 64)) != 0
    }

    /// For tests and diagnostics: the eventfd behind `vector`.
    pub fn irqfd(&self, vector: u16) -> Option<EventFd> {
        self.lock()
            .irqfds
            .get(vector as usize)
            .and_then(|f| f.try_clone().ok())
    }
}

impl Drop for MsixState {
    fn drop(&mut self) {
        for (gsi, irqfd) in self.gsis.iter().zip(&self.irqfds) {
            self.sink.release(*gsi, irqfd);
        }
    }
}

impl MsixState {
    fn update_route(&mut self, v: usize) {
        let msg = self.table[v].message();
        let route = (msg.address != 0).then_some(msg);
        if let Err(e) = self.sink.route(self.gsis[v], route) {
            // The guest reprograms vectors at will.
            rate_limited!(tracing::Level::ERROR, "cannot route MSI-X vector {v}: {e}");
        }
    }

    fn deliver_if_pending(&mut self, v: usize) {
        let bit = 1u64 << (v % 64);
        if self.pending[v / 64] & bit != 0 && !self.table[v].masked() && !self.function_masked {
            self.pending[v / 64] &= !bit;
            let _ = self.irqfds[v].write(1);
        }
    }
}

fn read_words(words: &[u32], offset: u64, data: &mut [u8]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let start = offset as usize;
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(start + i).copied().unwrap_or(0);
    }
}

/// Only naturally aligned 4- and 8-byte writes are legal for MSI-X tables.
fn write_words(words: &mut [u32; 4], offset: u64, data: &[u8]) -> bool {
    let start = offset as usize;
    match data.len() {
        4 if start.is_multiple_of(4) => {
            words[start / 4] = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            true
        }
        8 if start.is_multiple_of(8) => {
            words[start / 4] = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
            words[start / 4 + 1] = u32::from_le_bytes(data[4..].try_into().expect("4 bytes"));
            true
        }
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    type RouteLog = Arc<Mutex<Vec<(u32, Option<MsiMessage>)>>>;

    /// Records routes instead of programming KVM.
    #[derive(Clone, Default)]
    pub struct RecordingSink(pub RouteLog);

    impl MsiSink for RecordingSink {
        fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    pub fn test_msix(vectors: u16) -> (Msix, RecordingSink) {
        let sink = RecordingSink::default();
        let gsis = (0..vectors as u32).map(|v| 24 + v).collect();
        let fds = (0..vectors)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        (Msix::new(gsis, fds, Box::new(sink.clone())).unwrap(), sink)
    }

    /// Through KVM: a device whose vectors cannot all be had gives back those it took.
    #[test]
    fn a_failed_allocation_gives_back_the_gsis_it_took() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = GsiRouter::new(vm);
        // Take GSIs until three are left.
        let mut taken = Vec::new();
        while let Ok(gsi) = router.allocate_gsi() {
            taken.push(gsi);
        }
        assert!(taken.len() > 3);
        for gsi in taken.split_off(taken.len() - 3) {
            router.free_unbound_gsi(gsi);
        }
        let error = Msix::with_kvm(&router, 8)
            .err()
            .expect("8 vectors from 3 GSIs");
        assert!(error.to_string().contains("GSI"), "{error}");
        let again: Vec<_> = (0..3).map(|_| router.allocate_gsi()).collect();
        assert!(again.iter().all(Result::is_ok), "{again:?}");
        let msix = Msix::with_kvm(&router, 1);
        assert!(msix.is_err(), "no GSI is left");
    }

    fn program(msix: &Msix, v: u64, addr: u32, data: u32, masked: bool) {
        msix.write_table(v * 16, &addr.to_le_bytes());
        msix.write_table(v * 16 + 4, &0u32.to_le_bytes());
        msix.write_table(v * 16 + 8, &data.to_le_bytes());
        msix.write_table(v * 16 + 12, &(masked as u32).to_le_bytes());
    }

    #[test]
    fn table_reads_back_and_enable_installs_routes() {
        let (msix, sink) = test_msix(2);
        program(&msix, 1, 0xfee0_0000, 0x4033, false);
        let mut word = [0u8; 4];
        msix.read_table(16 + 8, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x4033);
        assert!(sink.0.lock().unwrap().is_empty(), "no routes before enable");
        msix.set_control(MSIX_ENABLE);
        let routes = sink.0.lock().unwrap().clone();
        assert!(routes.contains(&(
            25,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x4033
            })
        )));
        assert!(routes.contains(&(24, None)));
    }

    #[test]
    fn masked_vector_is_pending_until_unmasked() {
        let (msix, _) = test_msix(1);
        program(&msix, 0, 0xfee0_0000, 0x30, true);
        msix.set_control(MSIX_ENABLE);
        msix.trigger(0);
        assert!(msix.is_pending(0));
        let fd = msix.irqfd(0).unwrap();
        assert!(fd.read().is_err(), "masked vector must not fire");
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        msix.write_table(12, &0u32.to_le_bytes());
        assert!(!msix.is_pending(0));
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn function_mask_holds_back_all_vectors() {
        let (msix, _) = test_msix(1);
        program(&msix, 0, 0xfee0_0000, 0x30, false);
        msix.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        msix.trigger(0);
        let fd = msix.irqfd(0).unwrap();
        assert!(fd.read().is_err());
        msix.set_control(MSIX_ENABLE);
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn out_of_range_and_misaligned_accesses_are_ignored() {
        let (msix, _) = test_msix(1);
        msix.write_table(16, &1u32.to_le_bytes());
        msix.write_table(2, &[1, 2]);
        let mut word = [0xaau8; 4];
        msix.read_table(16, &mut word);
        assert_eq!(word, [0; 4]);
        msix.read_table(0, &mut word);
        assert_eq!(word, [0; 4]);
        msix.trigger(7);
        assert!(Msix::new(vec![], vec![], Box::new(RecordingSink::default())).is_err());
    }
}
