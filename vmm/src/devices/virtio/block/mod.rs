//! virtio-blk: request parsing, the device, its worker thread and its disk I/O engines.

pub mod counters;
pub mod device;
pub mod io;
pub mod request;
pub mod worker;

pub use device::{BlockConfig, VirtioBlock};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Queue depth offered to the guest.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the queue size less the header and status descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest data segment (descriptor) of a read or write, offered as SIZE_MAX: with SEG_MAX
/// it bounds a request at 254 MiB, which the worker bounces (when O_DIRECT needs it) in
/// pieces of at most this size.
pub const SIZE_MAX: u32 = 1 << 20;
/// GET_ID answers with at most this many bytes.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Flag in a write-zeroes segment: the range may be deallocated.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Largest discard or write-zeroes range in one request (2 GiB), and one range per request.
pub const MAX_DISCARD_SECTORS: u32 = 0x40_0000;
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
