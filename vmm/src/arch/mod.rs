//! x86_64 specifics: address map, vCPU register state, CPUID, boot structures.

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod regs;
