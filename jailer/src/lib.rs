//! `stratus-jailer`: how the node agent starts each `stratus-vmm` confined, in the manner of
//! Firecracker's jailer. The VMM gets
//! - a mount namespace whose root holds only what the agent named (the VM's directory, its
//!   kernel, images and disks at their host paths, read-only where it only reads them),
//!   the host's library directories read-only, a private `/dev` with KVM, TUN, the VM's
//!   block devices and the random devices, and its own `/proc`;
//! - its own PID and IPC namespaces;
//! - a user and group of its own (never root), with every capability dropped, the bounding
//!   set emptied and `no_new_privs` set (so its seccomp filters need no privilege either);
//! - a cgroup with memory (guest RAM + the VMM's allowance), task and CPU limits.
//!
//! The jailer stays as the VMM's parent in the host's namespaces: it forwards stop signals,
//! removes the cgroup and the jail's mount points when the VMM ends, and exits as the VMM
//! did (same code, or killed by the same signal) so the agent reports the real cause. If
//! the jailer is killed, the kernel kills the VMM (parent-death signal).

pub mod cgroup;
pub mod enter;
pub mod jail;
pub mod run;
pub mod spec;

pub use spec::{CgroupLimits, Cli, Command, EnterSpec, JailSpec, SpecError};
