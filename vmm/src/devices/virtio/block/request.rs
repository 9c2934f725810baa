//! Parsing and executing one virtio-blk request. Everything in a descriptor chain is
//! guest-controlled: every address, length and flag is checked before use.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::memory::GuestMemoryMmap;

/// Header: type (u32), reserved (u32), sector (u64).
const REQUEST_HEADER_SIZE: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetDeviceId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetDeviceId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain is empty")]
    EmptyChain,
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("descriptor chain loops or does not end")]
    UnterminatedChain,
    #[error("request header is write-only or shorter than 16 bytes")]
    BadHeader,
    #[error("request header buffer of {0} bytes: the data must come in buffers of its own")]
    HeaderWithData(u32),
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfGuestMemory { addr: u64, len: u32 },
    #[error("status descriptor is missing, read-only or empty")]
    BadStatusDescriptor,
    #[error("data descriptor has the wrong direction for this request")]
    WrongDirection,
    #[error("data segment of {0} bytes is longer than SIZE_MAX ({SIZE_MAX})")]
    SegmentTooLong(u32),
    #[error("request length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("request covers sectors beyond the end of the disk")]
    BeyondEnd,
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard/write-zeroes request needs exactly one 16-byte range")]
    BadRangeCount,
    #[error("discard/write-zeroes range of {0} sectors is empty or over the limit of {1}")]
    BadRangeLength(u32, u32),
    #[error("{0} is not offered for this disk")]
    NotOffered(&'static str),
    #[error("discard range with flags {0:#x} (no flags are defined for discard)")]
    DiscardFlags(u32),
    #[error("write-zeroes range with flags {0:#x} (only unmap, 0x1, is defined)")]
    WriteZeroesFlags(u32),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
}

impl RequestError {
    /// The status a guest sees: UNSUPP for what this device does not do, IOERR otherwise.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_)
            | RequestError::NotOffered(_)
            | RequestError::DiscardFlags(_)
            | RequestError::WriteZeroesFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// The one range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

/// What a parsed request asks for, with what only that kind carries: the worker and the
/// engines match on it, so a new kind or backend adds no "cannot happen" paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Into the guest's buffers, from this sector.
    Read {
        sector: u64,
    },
    /// From the guest's buffers, to this sector.
    Write {
        sector: u64,
    },
    Flush,
    GetDeviceId,
    Discard(SectorRange),
    WriteZeroes(SectorRange),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

impl Request {
    /// Bytes of guest buffers the request reads or writes (u64: SEG_MAX segments of up to
    /// 4 GiB each would overflow a u32 before SIZE_MAX is checked).
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }
}

/// The DISCARD and WRITE_ZEROES requests a disk takes, each with its largest range in
/// 512-byte sectors; `None`: not offered to the guest, so refused as unsupported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeRequests {
    pub discard: Option<u32>,
    pub write_zeroes: Option<u32>,
}

/// Outcome of parsing: a request, or an error with (if it could be found) where to write
/// the status byte.
pub type Parsed = Result<Request, (RequestError, Option<GuestAddress>)>;

fn in_guest(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Result<(), RequestError> {
    if GuestMemoryBackend::check_range(mem, addr, len as usize) {
        Ok(())
    } else {
        Err(RequestError::OutOfGuestMemory { addr: addr.0, len })
    }
}

/// Reads the chain into a request, checking structure, direction, memory and bounds.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk_sectors: u64,
    read_only: bool,
    ranges: RangeRequests,
) -> Parsed {
    // The chain iterator stops by itself at loops (it counts down from the table size) and
    // at chains longer than 4 GiB; a chain cut short that way ends in a descriptor that
    // still points onwards, and has no trustworthy status byte.
    let descriptors: Vec<_> = chain.collect();
    let (header, rest) = descriptors
        .split_first()
        .ok_or((RequestError::EmptyChain, None))?;
    if descriptors.last().is_some_and(|d| d.has_next()) {
        return Err((RequestError::UnterminatedChain, None));
    }
    // Find the status byte first, so that every later error can still be reported. It is
    // the chain's last byte: a longer last buffer holds data before it (VIRTIO_F_ANY_LAYOUT,
    // implied by VIRTIO_F_VERSION_1; Linux gives the status a buffer of its own).
    let status_desc = rest
        .last()
        .filter(|d| d.is_write_only() && d.len() >= 1)
        .filter(|d| in_guest(mem, d.addr(), d.len()).is_ok());
    let Some(status_desc) = status_desc else {
        return Err((RequestError::BadStatusDescriptor, None));
    };
    // In guest memory, so the sum cannot overflow.
    let status = GuestAddress(status_desc.addr().0 + u64::from(status_desc.len() - 1));
    let fail = |e: RequestError| Err((e, Some(status)));
    let max_descriptors = SEG_MAX as usize + 2;
    if descriptors.len() > max_descriptors {
        return fail(RequestError::TooManyDescriptors(max_descriptors));
    }

    if header.is_write_only() || header.len() < REQUEST_HEADER_SIZE {
        return fail(RequestError::BadHeader);
    }
    // Data after the header in the same buffer would be ignored: a write would land
    // nowhere and be answered OK.
    if header.len() > REQUEST_HEADER_SIZE {
        return fail(RequestError::HeaderWithData(header.len()));
    }
    if let Err(e) = in_guest(mem, header.addr(), header.len()) {
        return fail(e);
    }
    let request_type = match mem.read_obj::<u32>(header.addr()) {
        Ok(t) => RequestType::from(u32::from_le(t)),
        Err(_) => return fail(RequestError::BadHeader),
    };
    let sector = match mem.read_obj::<u64>(GuestAddress(header.addr().0 + 8)) {
        Ok(s) => u64::from_le(s),
        Err(_) => return fail(RequestError::BadHeader),
    };

    let data_descs = &rest[..rest.len() - 1];
    let pieces = data_descs
        .iter()
        .map(|d| (d.addr(), d.len(), d.is_write_only()))
        .chain((status_desc.len() > 1).then(|| (status_desc.addr(), status_desc.len() - 1, true)));
    let wants_write_only = match request_type {
        RequestType::In | RequestType::GetDeviceId => Some(true),
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => Some(false),
        RequestType::Flush | RequestType::Unsupported(_) => None,
    };
    let mut data = Vec::with_capacity(rest.len());
    let mut total: u64 = 0;
    for (addr, len, write_only) in pieces {
        if let Err(e) = in_guest(mem, addr, len) {
            return fail(e);
        }
        if wants_write_only.is_some_and(|w| write_only != w) {
            return fail(RequestError::WrongDirection);
        }
        if matches!(request_type, RequestType::In | RequestType::Out) && len > SIZE_MAX {
            return fail(RequestError::SegmentTooLong(len));
        }
        total += u64::from(len);
        data.push((addr, len));
    }

    let kind = match request_type {
        RequestType::In | RequestType::Out => {
            if request_type == RequestType::Out && read_only {
                return fail(RequestError::ReadOnly);
            }
            if !total.is_multiple_of(SECTOR_SIZE) {
                return fail(RequestError::UnalignedLength(total));
            }
            let end = sector.checked_add(total >> SECTOR_SHIFT);
            if end.is_none_or(|end| end > disk_sectors) {
                return fail(RequestError::BeyondEnd);
            }
            if request_type == RequestType::In {
                RequestKind::Read { sector }
            } else {
                RequestKind::Write { sector }
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if read_only {
                return fail(RequestError::ReadOnly);
            }
            let (offered, name) = match request_type {
                RequestType::Discard => (ranges.discard, "discard"),
                _ => (ranges.write_zeroes, "write-zeroes"),
            };
            let Some(max_sectors) = offered else {
                return fail(RequestError::NotOffered(name));
            };
            if data.len() != 1 || total != 16 {
                return fail(RequestError::BadRangeCount);
            }
            let at = data[0].0;
            let (Ok(start), Ok(num_sectors), Ok(flags)) = (
                mem.read_obj::<u64>(at),
                mem.read_obj::<u32>(GuestAddress(at.0 + 8)),
                mem.read_obj::<u32>(GuestAddress(at.0 + 12)),
            ) else {
                return fail(RequestError::BadRangeCount);
            };
            let (start, num_sectors, flags) = (
                u64::from_le(start),
                u32::from_le(num_sectors),
                u32::from_le(flags),
            );
            // A backend sent a range beyond its own limit refuses it and, for iSCSI, drops
            // the session: the guest could make its disk reconnect again and again.
            if num_sectors == 0 || num_sectors > max_sectors {
                return fail(RequestError::BadRangeLength(num_sectors, max_sectors));
            }
            if request_type == RequestType::Discard && flags != 0 {
                return fail(RequestError::DiscardFlags(flags));
            }
            // Flags this device does not know could ask for something it would not do.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return fail(RequestError::WriteZeroesFlags(flags));
            }
            let end = start.checked_add(u64::from(num_sectors));
            if end.is_none_or(|end| end > disk_sectors) {
                return fail(RequestError::BeyondEnd);
            }
            let range = SectorRange {
                sector: start,
                num_sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            };
            if request_type == RequestType::Discard {
                RequestKind::Discard(range)
            } else {
                RequestKind::WriteZeroes(range)
            }
        }
        RequestType::Unsupported(t) => return fail(RequestError::Unsupported(t)),
        RequestType::Flush => RequestKind::Flush,
        RequestType::GetDeviceId => RequestKind::GetDeviceId,
    };
    Ok(Request { kind, data, status })
}

/// Answers GET_ID: the serial, zero-padded to 20 bytes, cut to the guest's buffers.
/// Returns the bytes written.
pub fn write_device_id(request: &Request, mem: &GuestMemoryMmap, serial: &[u8]) -> u32 {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
    id[..n].copy_from_slice(&serial[..n]);
    let mut copied = 0usize;
    for &(addr, len) in &request.data {
        let take = (len as usize).min(id.len() - copied);
        if take == 0 || mem.write_slice(&id[copied..copied + take], addr).is_err() {
            break;
        }
        copied += take;
    }
    copied as u32
}
