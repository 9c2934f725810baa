//! virtio-net on a TAP device: one RX and one TX queue per queue pair (several pairs on a
//! multiqueue TAP, one worker each, with a control queue), mergeable receive buffers,
//! checksum and TSO offloads through the TAP's virtio-net header.

pub mod device;
pub mod tap;
pub mod worker;

pub use device::{NetConfig, VirtioNet};

pub const QUEUE_SIZE: u16 = 256;
/// Queue pair N's RX and TX queues are 2N and 2N + 1; the control queue comes after the last
/// pair.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// Most queue pairs a NIC may have (`queues=`): one per vCPU is what spreads the work.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// struct virtio_net_hdr_v1 (with num_buffers): what VERSION_1 drivers put before frames.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of num_buffers in the header.
pub const VNET_HDR_NUM_BUFFERS: usize = 10;
/// Largest frame with offloads (a 64 KiB GSO frame plus Ethernet header) and its header.
pub const MAX_FRAME_LEN: usize = 65_550;
pub const MAX_PACKET_LEN: usize = MAX_FRAME_LEN + VNET_HDR_LEN;
/// Smallest frame the TX path accepts: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Control queue commands: class, command, then the command's data; the device writes one
/// status byte.
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;
