//! Benchmark helpers: a tiny PVH guest both VMMs can boot, process timing by console
//! markers, medians, and VMM memory overhead from /proc.

pub mod agent;
pub mod blk;
pub mod cloud;
pub mod download;
pub mod guest;
pub mod hotplug;
pub mod measure;
pub mod net;
pub mod pdisk;
pub mod tgtd;

/// Whether something listens on 127.0.0.1:`port`. A connect to a port nobody listens on
/// can connect the socket to itself (TCP simultaneous open, when the kernel picks that very
/// port as the source port): that is not a listener.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port))
        .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}
