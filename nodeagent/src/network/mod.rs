//! Host-side networking for guests: TAP devices on a Linux bridge, network pools of
//! fixed MAC ↔ IP pairs, and a DHCP server that hands each known MAC its fixed address.
//!
//! StratusLab guests never get their address from the context disk: they run DHCP and the
//! server answers only MACs it has a fixed lease for. The pieces here are independent so the
//! agent can persist pool state (JSON) and rebuild the DHCP table from it after a restart.

pub mod antispoof;
pub mod dhcp;
pub mod link;
pub mod mac;
pub mod pool;

pub use antispoof::{AntiSpoofError, AntiSpoofing, GuestPort};
pub use dhcp::{BoundDhcpServer, DhcpError, DhcpHost, DhcpReply, DhcpServer, DhcpTable};
pub use link::{BridgeConfig, LinkError, LinkKind, LinkState, Netlink, Tap, TapConfig};
pub use mac::{MacAddr, MacError};
pub use pool::{
    FixedAddress, Ipv4Subnet, Lease, NetworkPool, NetworkPools, PoolAddresses, PoolDefinition,
    PoolError, PoolKind, PoolState,
};
