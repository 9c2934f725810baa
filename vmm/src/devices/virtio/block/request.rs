//! Parsing and executing one virtio-blk request. Everything in a descriptor chain is
//! guest-controlled: every address, length and flag is checked before use.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::io::{DiskError, DiskImage};
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
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetDeviceId,
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
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfGuestMemory { addr: u64, len: u32 },
    #[error("status descriptor is missing, read-only or empty")]
    BadStatusDescriptor,
    #[error("data descriptor has the wrong direction for this request")]
    WrongDirection,
    #[error("request length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("request covers sectors beyond the end of the disk")]
    BeyondEnd,
    #[error("write to a read-only disk")]
    ReadOnly,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub request_type: RequestType,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

/// Outcome of parsing: a request, or an error with (if it could be found) where to write
/// the status byte.
pub type Parsed = Result<Request, (RequestError, Option<GuestAddress>)>;

fn in_guest(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), RequestError> {
    if GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
        Ok(())
    } else {
        Err(RequestError::OutOfGuestMemory {
            addr: d.addr().0,
            len: d.len(),
        })
    }
}

/// Reads the chain into a request, checking structure, direction, memory and bounds.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk_sectors: u64,
    read_only: bool,
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
    // Find the status byte first, so that every later error can still be reported.
    let status_desc = rest.last().filter(|d| d.is_write_only() && d.len() >= 1);
    let status = match status_desc {
        Some(d) if in_guest(mem, d).is_ok() => d.addr(),
        _ => return Err((RequestError::BadStatusDescriptor, None)),
    };
    let fail = |e: RequestError| Err((e, Some(status)));
    let max_descriptors = SEG_MAX as usize + 2;
    if descriptors.len() > max_descriptors {
        return fail(RequestError::TooManyDescriptors(max_descriptors));
    }

    if header.is_write_only() || header.len() < REQUEST_HEADER_SIZE {
        return fail(RequestError::BadHeader);
    }
    if let Err(e) = in_guest(mem, header) {
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
    let mut data = Vec::with_capacity(data_descs.len());
    let mut total: u64 = 0;
    for d in data_descs {
        if let Err(e) = in_guest(mem, d) {
            return fail(e);
        }
        let wants_write_only = match request_type {
            RequestType::In | RequestType::GetDeviceId => Some(true),
            RequestType::Out => Some(false),
            RequestType::Flush | RequestType::Unsupported(_) => None,
        };
        if let Some(w) = wants_write_only {
            if d.is_write_only() != w {
                return fail(RequestError::WrongDirection);
            }
        }
        total += u64::from(d.len());
        data.push((d.addr(), d.len()));
    }

    match request_type {
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
        }
        RequestType::Flush | RequestType::GetDeviceId | RequestType::Unsupported(_) => {}
    }
    Ok(Request {
        request_type,
        sector,
        data,
        status,
    })
}

/// Runs a parsed request; returns the status and the bytes written into guest buffers.
pub fn execute(
    request: &Request,
    mem: &GuestMemoryMmap,
    disk: &DiskImage,
    serial: &[u8],
) -> (u8, u32) {
    let result: Result<u32, DiskError> = match request.request_type {
        RequestType::In => {
            let mut offset = request.sector << SECTOR_SHIFT;
            let mut written = 0u32;
            let mut outcome = Ok(());
            for &(addr, len) in &request.data {
                outcome = disk.read_into_guest(mem, addr, len, offset);
                if outcome.is_err() {
                    break;
                }
                offset += u64::from(len);
                written += len;
            }
            outcome.map(|_| written)
        }
        RequestType::Out => {
            let mut offset = request.sector << SECTOR_SHIFT;
            let mut outcome = Ok(());
            for &(addr, len) in &request.data {
                outcome = disk.write_from_guest(mem, addr, len, offset);
                if outcome.is_err() {
                    break;
                }
                offset += u64::from(len);
            }
            outcome.map(|_| 0)
        }
        RequestType::Flush => disk.flush().map(|_| 0),
        RequestType::GetDeviceId => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
            let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
            id[..n].copy_from_slice(&serial[..n]);
            let mut copied = 0usize;
            for &(addr, len) in &request.data {
                let take = (len as usize).min(id.len() - copied);
                if take == 0 {
                    break;
                }
                if mem.write_slice(&id[copied..copied + take], addr).is_err() {
                    break;
                }
                copied += take;
            }
            Ok(copied as u32)
        }
        RequestType::Unsupported(t) => {
            tracing::debug!("unsupported virtio-blk request type {t}");
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
    };
    match result {
        Ok(len) => (VIRTIO_BLK_S_OK, len),
        Err(e) => {
            tracing::warn!("virtio-blk I/O error: {e}");
            (VIRTIO_BLK_S_IOERR, 0)
        }
    }
}
