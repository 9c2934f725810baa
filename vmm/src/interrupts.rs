//! GSI routing: the default legacy routes plus one MSI route per MSI-X vector.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every change rewrites the legacy
//! IOAPIC/PIC routes too; losing them would silence the serial port's irqfd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::arch::layout::{IOAPIC_PINS, MSI_GSI_START};

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("KVM refused the interrupt routing table: {0}")]
    SetRouting(kvm_ioctls::Error),
    #[error("no free GSI left for MSI vectors: unplug a device first")]
    OutOfGsis,
    #[error("cannot build the routing table: {0}")]
    Table(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Entries KVM's routing table takes on x86 (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: u32 = 4096;
/// The legacy routes (every IOAPIC pin, and the PIC's 16) are in the table too: MSI GSIs
/// stop where the table would be full, or a guest enabling every vector of a large VM
/// would make the commit, and every later one, fail.
const MAX_GSI: u32 = MSI_GSI_START + MAX_ROUTES - LEGACY_ROUTES;
const LEGACY_ROUTES: u32 = IOAPIC_PINS + 16;

struct RoutingState {
    msi_routes: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    /// GSIs of unplugged devices, handed out again first.
    free_gsis: Vec<u32>,
}

/// Shared by all devices that raise MSIs; cheap to clone.
#[derive(Clone)]
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Arc<Mutex<RoutingState>>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: msg.address as u32,
                address_hi: (msg.address >> 32) as u32,
                data: msg.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// The routes KVM installs by default for the legacy PIC and IOAPIC pins.
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            state: Arc::new(Mutex::new(RoutingState {
                msi_routes: BTreeMap::new(),
                next_gsi: MSI_GSI_START,
                free_gsis: Vec::new(),
            })),
        }
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    pub fn allocate_gsi(&self) -> Result<u32, InterruptError> {
        let mut state = self.state.lock().expect("routing lock poisoned");
        if let Some(gsi) = state.free_gsis.pop() {
            return Ok(gsi);
        }
        if state.next_gsi >= MAX_GSI {
            return Err(InterruptError::OutOfGsis);
        }
        let gsi = state.next_gsi;
        state.next_gsi += 1;
        Ok(gsi)
    }

    /// Frees a GSI no irqfd was bound to (a device whose set-up failed part way).
    pub fn free_unbound_gsi(&self, gsi: u32) {
        self.state
            .lock()
            .expect("routing lock poisoned")
            .free_gsis
            .push(gsi);
    }

    /// Unbinds `irqfd` from `gsi` and frees the GSI. Its route leaves KVM's table with the
    /// next commit: until a new device routes the GSI, nothing signals it.
    pub fn release_gsi(&self, gsi: u32, irqfd: &vmm_sys_util::eventfd::EventFd) {
        if let Err(e) = self.vm.unregister_irqfd(irqfd, gsi) {
            tracing::warn!("cannot unbind the irqfd of GSI {gsi}: {e}");
        }
        let mut state = self.state.lock().expect("routing lock poisoned");
        state.msi_routes.remove(&gsi);
        state.free_gsis.push(gsi);
    }

    /// Points `gsi` at `msg` (or removes the route with `None`) and commits the table.
    pub fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut state = self.state.lock().expect("routing lock poisoned");
        let previous = match msg {
            Some(m) => state.msi_routes.insert(gsi, m),
            None => state.msi_routes.remove(&gsi),
        };
        if previous != msg {
            if let Err(e) = self.commit(&state) {
                // Kept, the route KVM refused would make every later commit fail too.
                match previous {
                    Some(p) => state.msi_routes.insert(gsi, p),
                    None => state.msi_routes.remove(&gsi),
                };
                return Err(e);
            }
        }
        Ok(())
    }

    fn commit(&self, state: &RoutingState) -> Result<(), InterruptError> {
        let mut entries = legacy_routes();
        entries.extend(
            state
                .msi_routes
                .iter()
                .map(|(&gsi, &msg)| msi_entry(gsi, msg)),
        );
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| InterruptError::Table(format!("{e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetRouting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_cover_pic_and_ioapic_pins() {
        let routes = legacy_routes();
        // 24 IOAPIC pins plus 16 PIC pins.
        assert_eq!(routes.len(), 40);
        assert_eq!(routes.len() as u32, LEGACY_ROUTES);
        // SAFETY: every entry built by irqchip_entry holds the irqchip variant.
        let com1: Vec<_> = routes
            .iter()
            .filter(|r| r.gsi == 4)
            .map(|r| unsafe { r.u.irqchip })
            .map(|c| (c.irqchip, c.pin))
            .collect();
        assert_eq!(
            com1,
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
    }

    #[test]
    fn msi_entry_splits_the_address() {
        let e = msi_entry(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: msi_entry builds the msi variant.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }

    /// Through KVM: every GSI handed out can be routed at once.
    #[test]
    fn every_gsi_handed_out_can_be_routed() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = GsiRouter::new(vm);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        let mut routed = 0;
        while let Ok(gsi) = router.allocate_gsi() {
            router
                .set_msi_route(gsi, Some(msg))
                .unwrap_or_else(|e| panic!("route {routed} (GSI {gsi}): {e}"));
            routed += 1;
        }
        assert!(routed > 4000, "{routed}");
    }
}
