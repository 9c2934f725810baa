//! Guest CPUID: KVM's supported set, adjusted per vCPU.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;

const ECX_CX16: u32 = 1 << 13;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_VMX: u32 = 1 << 5;
const EXT_ECX_SVM: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot read the CPUID features KVM supports: {0}")]
    Supported(kvm_ioctls::Error),
}

/// A KVM without VT-x or AMD-V underneath is a PVM backend: its ring-0 emulator lacks
/// `cmpxchg16b`, so guests must not be told the instruction exists.
pub fn host_is_pvm() -> bool {
    let features = std::arch::x86_64::__cpuid(LEAF_FEATURES);
    let ext = std::arch::x86_64::__cpuid(0x8000_0001);
    features.ecx & ECX_VMX == 0 && ext.ecx & EXT_ECX_SVM == 0
}

/// The CPUID template shared by all vCPUs; `for_vcpu` specialises it.
pub struct CpuidTemplate {
    base: CpuId,
    vcpu_count: u8,
}

impl CpuidTemplate {
    pub fn new(kvm: &Kvm, vcpu_count: u8, hide_cx16: bool) -> Result<Self, CpuidError> {
        let mut base = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuidError::Supported)?;
        // KVM emulates the TSC-deadline timer but leaves announcing it to us. Without it
        // the guest calibrates its APIC timer against another clock at boot and runs it
        // in one-shot mode; with it, one MSR write arms each timer event.
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        for entry in base.as_mut_slice() {
            match entry.function {
                LEAF_FEATURES => {
                    entry.ecx |= ECX_HYPERVISOR;
                    if tsc_deadline {
                        entry.ecx |= ECX_TSC_DEADLINE;
                    }
                    if hide_cx16 {
                        entry.ecx &= !ECX_CX16;
                    }
                }
                LEAF_CACHE_TOPOLOGY => {
                    // Cores sharing the package: bits 31..26 hold the count minus one.
                    entry.eax &= !(0x3f << 26);
                    entry.eax |= (u32::from(vcpu_count.saturating_sub(1)) & 0x3f) << 26;
                }
                _ => {}
            }
        }
        Ok(CpuidTemplate { base, vcpu_count })
    }

    pub fn for_vcpu(&self, apic_id: u8) -> CpuId {
        let mut cpuid = self.base.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                LEAF_FEATURES => {
                    entry.ebx &= 0x0000_ffff;
                    entry.ebx |= u32::from(apic_id) << 24;
                    entry.ebx |= u32::from(self.vcpu_count) << 16;
                }
                LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => entry.edx = u32::from(apic_id),
                _ => {}
            }
        }
        cpuid
    }
}

/// True when the template exposes KVM's paravirtual leaves (kvm-clock needs them).
pub fn has_kvm_signature(cpuid: &CpuId) -> bool {
    cpuid.as_slice().iter().any(|e| {
        e.function == LEAF_HYPERVISOR_BASE
            && e.ebx == u32::from_le_bytes(*b"KVMK")
            && e.ecx == u32::from_le_bytes(*b"VMKV")
            && e.edx == u32::from_le_bytes(*b"M\0\0\0")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(cpuid: &CpuId, function: u32) -> kvm_bindings::kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == 0)
            .expect("leaf present")
    }

    #[test]
    fn vcpu_cpuid_carries_hypervisor_bit_apic_id_and_kvm_leaves() {
        let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
        let template = CpuidTemplate::new(&kvm, 2, true).unwrap();
        let cpu1 = template.for_vcpu(1);
        let features = leaf(&cpu1, LEAF_FEATURES);
        assert_ne!(features.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(features.ecx & ECX_CX16, 0);
        assert_eq!(features.ebx >> 24, 1);
        assert!(has_kvm_signature(&cpu1));
        assert_eq!(
            features.ecx & ECX_TSC_DEADLINE != 0,
            kvm.check_extension(Cap::TscDeadlineTimer),
            "the TSC-deadline timer is announced exactly when KVM emulates it"
        );
        let cpu0 = template.for_vcpu(0);
        assert_eq!(leaf(&cpu0, LEAF_FEATURES).ebx >> 24, 0);
    }
}
