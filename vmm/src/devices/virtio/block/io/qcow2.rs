//! qcow2 images through imago: imago owns the metadata (L1/L2 tables, refcounts, copy on
//! write from the backing chain), while the data itself moves through our own engines. For
//! each guest request we ask imago where the bytes live, then queue plain reads and writes
//! on that host file and offset, so allocated clusters go as fast as a raw disk. Only
//! allocation, compressed clusters, flush, discard and write-zeroes run synchronously in
//! imago on the queue's worker thread.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File as ImagoFile;
use imago::format::drivers::FormatDriverInstance;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate,
    Storage, StorageCreateOptions, StorageOpenOptions,
};

use super::{AsyncIo, CacheMode, Completion, DataEngine, DiskError, DiskOp, ImageFormat};

/// An open qcow2 image, shared by every queue of the device.
pub struct Qcow2Image {
    access: FormatAccess<ImagoFile>,
    /// Where each of imago's storage objects is, so data mappings can be turned into our
    /// own descriptors (same order as `files`).
    storages: Vec<(usize, PathBuf, bool)>,
    cache: CacheMode,
    path: PathBuf,
}

impl Drop for Qcow2Image {
    /// The last user is gone (the VMM is exiting or the disk was removed): cached metadata
    /// goes to the file now, and the outcome is logged where the node agent sees it.
    fn drop(&mut self) {
        match self.flush() {
            Ok(()) => tracing::info!("qcow2 image {} closed", self.path.display()),
            Err(e) => tracing::error!(
                "qcow2 image {}: cannot write its metadata on close: {e}",
                self.path.display()
            ),
        }
    }
}

impl Qcow2Image {
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, DiskError> {
        let open_err = |source: std::io::Error| DiskError::Qcow2Open {
            path: path.to_owned(),
            source,
        };
        let options = StorageOpenOptions::new().direct(cache == CacheMode::None);
        let qcow2 = Qcow2::<ImagoFile>::builder_path(path)
            .write(!read_only)
            .storage_open_options(options)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(open_err)?;
        if qcow2.requires_external_data_file() {
            return Err(open_err(std::io::Error::other(
                "images with an external data file are not supported",
            )));
        }
        let access = FormatAccess::new(qcow2);
        let top = std::fs::canonicalize(path).map_err(open_err)?;
        let mut storages = Vec::new();
        for storage in access.inner().collect_storage_dependencies() {
            let file = storage.get_filename().ok_or_else(|| {
                open_err(std::io::Error::other(
                    "a file of the backing chain has no path",
                ))
            })?;
            let canonical = std::fs::canonicalize(&file).map_err(open_err)?;
            let writable = !read_only && canonical == top;
            storages.push((storage as *const ImagoFile as usize, file, writable));
        }
        Ok(Qcow2Image {
            access,
            storages,
            cache,
            path: path.to_owned(),
        })
    }

    /// Virtual disk size.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// Fresh descriptors on every file of the chain (one set per queue engine); only the
    /// top image is writable.
    pub fn data_files(&self) -> Result<Vec<File>, DiskError> {
        self.storages
            .iter()
            .map(|(_, path, writable)| {
                let mut options = OpenOptions::new();
                options.read(true).write(*writable);
                if self.cache == CacheMode::None {
                    options.custom_flags(libc::O_DIRECT);
                }
                options.open(path).map_err(|source| DiskError::Open {
                    path: path.clone(),
                    source,
                })
            })
            .collect()
    }

    fn file_index(&self, storage: &ImagoFile) -> std::io::Result<usize> {
        let address = storage as *const ImagoFile as usize;
        self.storages
            .iter()
            .position(|(known, _, _)| *known == address)
            .ok_or_else(|| std::io::Error::other("imago mapped data into an unknown file"))
    }

    /// Writes imago's cached metadata, then makes everything durable.
    fn flush(&self) -> std::io::Result<()> {
        self.access.flush()?;
        self.access.sync()
    }

    /// The cluster size of images that have zero clusters (qcow2 v3).
    fn cluster_size(&self) -> Option<u64> {
        self.access
            .inner()
            .zero_granularity()
            .filter(|&cluster| cluster > 0)
    }

    /// Clusters fully inside `offset..offset + len`, as a range (empty when none).
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset + len;
        match self.cluster_size() {
            Some(cluster) => (offset.next_multiple_of(cluster), end / cluster * cluster),
            None => (end, end),
        }
    }
}

/// Creates a qcow2 overlay at `path` on `backing`: the new disk reads as the backing image
/// and keeps its own writes. Only headers and empty tables are written, so this takes the
/// same time for any backing size. `backing` is recorded as given (a relative path is taken
/// relative to the overlay's directory, as qemu-img does). An existing `path` is refused.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
) -> Result<(), DiskError> {
    let create_err = |reason: String| DiskError::Qcow2Create {
        path: path.to_owned(),
        reason,
    };
    let backing_resolved = match path.parent() {
        Some(dir) if backing.is_relative() => dir.join(backing),
        _ => backing.to_owned(),
    };
    let size = image_size(&backing_resolved, backing_format).map_err(|e| {
        create_err(format!(
            "cannot read the backing image {}: {e}",
            backing_resolved.display()
        ))
    })?;
    let backing_name = backing
        .to_str()
        .ok_or_else(|| create_err("the backing path is not UTF-8".into()))?
        .to_owned();
    let storage = ImagoFile::create_open(StorageCreateOptions::new().filename(path).size(0))
        .map_err(|e| create_err(e.to_string()))?;
    let created = Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .backing(backing_name, backing_format.to_string())
        .create();
    if let Err(e) = created {
        // Leave nothing half-made behind.
        let _ = std::fs::remove_file(path);
        return Err(create_err(e.to_string()));
    }
    Ok(())
}

/// Virtual size of an image of the given format.
pub fn image_size(path: &Path, format: ImageFormat) -> std::io::Result<u64> {
    Ok(match format {
        ImageFormat::Raw => Raw::<ImagoFile>::builder_path(path)
            .open(PermissiveImplicitOpenGate::default())?
            .size(),
        ImageFormat::Qcow2 => Qcow2::<ImagoFile>::builder_path(path)
            .open(PermissiveImplicitOpenGate::default())?
            .size(),
    })
}

/// Opens only the backing files it was given: a header rewritten to name any other file
/// (a host secret, a FIFO that would block the open, a device) fails to open instead.
#[derive(Clone, Debug)]
struct ExpectedBackingGate {
    allowed: Vec<PathBuf>,
}

impl ExpectedBackingGate {
    fn new(backing: &[PathBuf]) -> std::io::Result<Self> {
        let allowed = backing
            .iter()
            .map(std::fs::canonicalize)
            .collect::<std::io::Result<_>>()?;
        Ok(ExpectedBackingGate { allowed })
    }

    fn check(&self, path: Option<&Path>) -> std::io::Result<()> {
        let named = path.map(Path::to_owned).unwrap_or_default();
        // A name that does not resolve cannot be one of the expected files.
        match std::fs::canonicalize(&named) {
            Ok(canonical) if self.allowed.contains(&canonical) => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the image names {} as its backing file, which is not the one expected",
                    named.display()
                ),
            )),
        }
    }
}

impl imago::format::gate::ImplicitOpenGate<ImagoFile> for ExpectedBackingGate {
    fn open_format<F: FormatDriverBuilder<ImagoFile>>(
        &mut self,
        builder: F,
    ) -> std::io::Result<FormatAccess<ImagoFile>> {
        self.check(builder.get_image_path().as_deref())?;
        let writable = builder.get_writable();
        if writable {
            return Err(std::io::Error::other("a backing image is opened read-only"));
        }
        Ok(FormatAccess::new(builder.open(self.clone())?))
    }

    fn open_storage(&mut self, options: StorageOpenOptions) -> std::io::Result<ImagoFile> {
        self.check(options.get_filename())?;
        ImagoFile::open(options)
    }
}

fn open_read_only(
    path: &Path,
    format: ImageFormat,
    backing: &[PathBuf],
) -> std::io::Result<FormatAccess<ImagoFile>> {
    // imago opens the top image's file through the gate too.
    let mut files = vec![path.to_owned()];
    files.extend_from_slice(backing);
    let gate = ExpectedBackingGate::new(&files)?;
    Ok(match format {
        ImageFormat::Raw => FormatAccess::new(Raw::<ImagoFile>::builder_path(path).open(gate)?),
        ImageFormat::Qcow2 => {
            let qcow2 = Qcow2::<ImagoFile>::builder_path(path)
                .write(false)
                .open(gate)?;
            if qcow2.requires_external_data_file() {
                return Err(std::io::Error::other(
                    "images with an external data file are not supported",
                ));
            }
            FormatAccess::new(qcow2)
        }
    })
}

/// Copies what the image at `source` reads as, its backing chain included, into a raw
/// file at `dest` (made anew: a copy interrupted earlier starts over). Ranges that read as
/// zeroes stay holes, so the copy is as sparse as the data allows. Only the files in
/// `backing` may be opened below `source`: an image whose header names any other file is
/// refused, so a header rewritten by whoever could write the image (a VMM) cannot copy a
/// host file into a new disk. Returns the disk's size.
pub fn flatten_to_raw(
    source: &Path,
    format: ImageFormat,
    backing: &[PathBuf],
    dest: &Path,
) -> Result<u64, DiskError> {
    flatten_to_raw_while(source, format, backing, dest, &|| true)
}

/// [`flatten_to_raw`] that asks `may_write` before each chunk it writes, and stops with
/// an `Interrupted` error when told no: a copy whose caller lost the right to write
/// `dest` (another took its work over, and may be writing `dest` itself) stops there.
pub fn flatten_to_raw_while(
    source: &Path,
    format: ImageFormat,
    backing: &[PathBuf],
    dest: &Path,
    may_write: &dyn Fn() -> bool,
) -> Result<u64, DiskError> {
    let flatten_err = |source_error: std::io::Error| DiskError::Flatten {
        path: source.to_owned(),
        dest: dest.to_owned(),
        source: source_error,
    };
    let access = open_read_only(source, format, backing).map_err(flatten_err)?;
    // Not even truncated once the caller may no longer write it.
    stop_unless(may_write).map_err(flatten_err)?;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .map_err(flatten_err)?;
    let size = access.size();
    let mut buffer = Vec::new();
    let mut offset = 0;
    // A raw file's holes are skipped without reading them, so copying a sparse volume
    // takes time in proportion to its data, not its size.
    let raw = match format {
        ImageFormat::Raw => Some(File::open(source).map_err(flatten_err)?),
        ImageFormat::Qcow2 => None,
    };
    while offset < size {
        if let Some(raw) = &raw {
            match next_data(raw, offset).map_err(flatten_err)? {
                Some(data) if data > offset => {
                    offset = data.min(size);
                    continue;
                }
                Some(_) => {}
                None => break,
            }
        }
        let want = (size - offset).min(FLATTEN_CHUNK);
        let (mapping, len) = access.get_mapping(offset, want).map_err(flatten_err)?;
        let len = len.min(want);
        if len == 0 {
            return Err(flatten_err(std::io::Error::other(format!(
                "the image maps nothing at offset {offset} of its {size} bytes"
            ))));
        }
        if !matches!(mapping, Mapping::Zero { .. }) {
            buffer.resize(len as usize, 0);
            access.read(&mut buffer, offset).map_err(flatten_err)?;
            stop_unless(may_write).map_err(flatten_err)?;
            write_nonzero_runs(&out, &buffer, offset).map_err(flatten_err)?;
        }
        offset += len;
    }
    stop_unless(may_write).map_err(flatten_err)?;
    out.set_len(size).map_err(flatten_err)?;
    out.sync_all().map_err(flatten_err)?;
    Ok(size)
}

fn stop_unless(may_write: &dyn Fn() -> bool) -> std::io::Result<()> {
    match may_write() {
        true => Ok(()),
        false => Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "stopped: the copy may no longer write its destination",
        )),
    }
}

/// Where the first data at or after `offset` in `file` starts (`None`: only a hole
/// follows). A filesystem that cannot tell says all of it is data.
fn next_data(file: &File, offset: u64) -> std::io::Result<Option<u64>> {
    let Ok(at) = libc::off_t::try_from(offset) else {
        return Ok(None);
    };
    // SAFETY: lseek only moves the offset of a descriptor `file` owns; nothing else reads
    // from that descriptor's offset (the copy reads the source through `access`).
    let found = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
        _ => Err(error),
    }
}

/// What a flatten reads at a time.
const FLATTEN_CHUNK: u64 = 1 << 20;
/// The granularity at which a flatten leaves zeroes out (a filesystem block).
const SPARSE_BLOCK: usize = 4096;

/// Writes `data`, which belongs at `offset` of `out`, except its all-zero blocks.
fn write_nonzero_runs(out: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut run_start = None;
    for (index, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let at = index * SPARSE_BLOCK;
        match (block.iter().any(|&b| b != 0), run_start) {
            (true, None) => run_start = Some(at),
            (false, Some(start)) => {
                out.write_all_at(&data[start..at], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    match run_start {
        Some(start) => out.write_all_at(&data[start..], offset + start as u64),
        None => Ok(()),
    }
}

/// Largest qcow2 cluster: partial-cluster zeroing never needs more in one go.
const ZERO_BUFFER_LEN: usize = 2 << 20;

/// A page-aligned, never-written buffer of zeroes for O_DIRECT writes.
fn zeroes() -> &'static [u8] {
    static BUFFER: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();
    BUFFER.get_or_init(|| {
        let layout = std::alloc::Layout::from_size_align(ZERO_BUFFER_LEN, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size; the zeroed allocation is leaked on purpose
        // (one per process) and only ever read.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "cannot allocate the zero buffer");
        // SAFETY: `ptr` points to ZERO_BUFFER_LEN initialised (zeroed) bytes that live forever.
        unsafe { std::slice::from_raw_parts(ptr, ZERO_BUFFER_LEN) }
    })
}

/// One piece of a request that went to the data engine.
struct Transfer {
    iovecs: Vec<libc::iovec>,
    len: u64,
}

// SAFETY: the iovecs point into guest memory or the worker's bounce buffers, which stay valid
// until the request completes; they are only handed to the kernel, never dereferenced from
// another thread.
unsafe impl Send for Transfer {}

struct Request {
    user_data: u64,
    /// Bytes the whole request moves when it succeeds.
    bytes: u64,
    transfers: Vec<Transfer>,
    in_flight: usize,
    /// First failure (a negated errno).
    error: Option<i64>,
}

/// The qcow2 engine for one queue.
pub struct Qcow2Io {
    image: Arc<Qcow2Image>,
    data: DataEngine,
    requests: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    ready: VecDeque<Completion>,
    transfers_in_flight: usize,
}

impl Qcow2Io {
    pub fn new(image: Arc<Qcow2Image>, data: DataEngine) -> Self {
        Qcow2Io {
            image,
            data,
            requests: Vec::new(),
            free_slots: Vec::new(),
            ready: VecDeque::new(),
            transfers_in_flight: 0,
        }
    }

    fn read(&mut self, slot: usize, offset: u64, iovecs: &[libc::iovec]) -> std::io::Result<()> {
        let image = self.image.clone();
        let total = iovecs_len(iovecs);
        let mut done = 0;
        while done < total {
            let (mapping, len) = image.access.get_mapping(offset + done, total - done)?;
            let len = len.min(total - done);
            if len == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let part = slice_iovecs(iovecs, done, len);
            match mapping {
                Mapping::Raw {
                    storage,
                    offset: host,
                    ..
                } => {
                    let file = image.file_index(storage)?;
                    self.start_transfer(slot, file, host, part, false)?;
                }
                Mapping::Zero { .. } => fill_zero(&part),
                _ => {
                    // Compressed clusters: imago decodes them.
                    let mut buffer = vec![0u8; len as usize];
                    image.access.read(&mut buffer, offset + done)?;
                    copy_to_iovecs(&buffer, &part);
                }
            }
            done += len;
        }
        Ok(())
    }

    fn write(&mut self, slot: usize, offset: u64, iovecs: &[libc::iovec]) -> std::io::Result<()> {
        let image = self.image.clone();
        let total = iovecs_len(iovecs);
        let mut done = 0;
        while done < total {
            let at = offset + done;
            let (mapping, len) = image.access.get_mapping(at, total - done)?;
            let (storage, host, len) = match mapping {
                Mapping::Raw {
                    storage,
                    offset: host,
                    writable: true,
                    ..
                } if len > 0 => (storage, host, len),
                // Unallocated, zero, compressed or backing data: allocate clusters here;
                // imago copies what the write does not cover from the old contents. An
                // allocation run keeps its clusters contiguous on the host, so a zero
                // cluster that kept its host cluster (see `discard`) but is not the run's
                // first would move and its old cluster be freed, while a transfer of
                // another queue may still be on its way there. Such clusters are allocated
                // one at a time, which imago does in place; other runs end where their
                // mapping does, before any such cluster.
                Mapping::Zero { explicit: true, .. } => {
                    let cluster = image.cluster_size().ok_or_else(|| {
                        std::io::Error::other("explicit zero clusters in an image without them")
                    })?;
                    let run = (at / cluster + 1) * cluster - at;
                    image
                        .access
                        .ensure_data_mapping(at, run.min(total - done), true)?
                }
                _ => image
                    .access
                    .ensure_data_mapping(at, len.min(total - done), true)?,
            };
            let len = len.min(total - done);
            if len == 0 {
                // As in read: a mapping that covers nothing would never end the loop.
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let file = image.file_index(storage)?;
            self.start_transfer(slot, file, host, slice_iovecs(iovecs, done, len), true)?;
            done += len;
        }
        Ok(())
    }

    /// Whole clusters become zero clusters that keep their host clusters, and the host
    /// ranges of those this image owns alone are punched out of the file, which gives the
    /// space back. imago could free the clusters instead, but another queue may still have
    /// a transfer in flight to one of them (the guest writes where it discards), and imago
    /// would hand a freed cluster to the next L2 table or refcount block: the late write
    /// would land in the image's metadata. A kept cluster stays this guest offset's (see
    /// `write`), so a late write there only scrambles data the guest itself discarded.
    /// Images without zero clusters (qcow2 v2) have no whole clusters here: a discard,
    /// being a hint, leaves them as they are.
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let image = self.image.clone();
        let (first, last) = image.whole_clusters(offset, len);
        if first >= last {
            return Ok(());
        }
        let mut holes = Vec::new();
        let mut at = first;
        while at < last {
            let (mapping, n) = image.access.get_mapping(at, last - at)?;
            let n = n.min(last - at);
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            // Clusters shared with a snapshot are not `writable`: they keep their data.
            if let Mapping::Raw {
                storage,
                offset: host,
                writable: true,
                ..
            } = mapping
            {
                holes.push((image.file_index(storage)?, host, n));
            }
            at += n;
        }
        image.access.write_zeroes(first, last - first)?;
        // On this thread, before the request completes: a write the guest sends after the
        // discard's completion must not be punched away. A filesystem that cannot punch
        // holes keeps the space; the clusters read as zeroes all the same.
        for (file, host, n) in holes {
            if let Err(e) = self.data.punch_hole_now(file, host, n) {
                tracing::debug!("qcow2: a discarded range keeps its space: {e}");
            }
        }
        Ok(())
    }

    /// Whole clusters become zero clusters in imago. Partial ones get zeroes written like
    /// guest data, through our engine at sector granularity: imago's own write path would
    /// read-modify-write whole O_DIRECT blocks (up to 4 KiB) and could undo a neighbouring
    /// sector another queue writes meanwhile. (imago 0.2.6's write_zeroes also underflows
    /// on partial clusters of an image smaller than one cluster.)
    fn write_zeroes(&mut self, slot: usize, offset: u64, len: u64) -> std::io::Result<()> {
        let end = offset + len;
        let (first, last) = self.image.whole_clusters(offset, len);
        let (head_end, tail_start) = if first < last {
            (first, last)
        } else {
            (end, end)
        };
        if first < last {
            self.image.access.write_zeroes(first, last - first)?;
        }
        for (from, to) in [(offset, head_end), (tail_start, end)] {
            let mut at = from;
            while at < to {
                let n = (to - at).min(ZERO_BUFFER_LEN as u64);
                let iovec = [libc::iovec {
                    iov_base: zeroes().as_ptr() as *mut libc::c_void,
                    iov_len: n as usize,
                }];
                self.write(slot, at, &iovec)?;
                at += n;
            }
        }
        Ok(())
    }

    fn start_transfer(
        &mut self,
        slot: usize,
        file: usize,
        host_offset: u64,
        iovecs: Vec<libc::iovec>,
        write: bool,
    ) -> std::io::Result<()> {
        let request = self.requests[slot].as_mut().expect("live request");
        let index = request.transfers.len();
        let len = iovecs_len(&iovecs);
        request.transfers.push(Transfer { iovecs, len });
        // The iovec array lives on the heap inside the request until the transfer completes.
        let iovecs = request.transfers[index].iovecs.as_slice();
        let offset = host_offset;
        let op = match write {
            true => DiskOp::Write { offset, iovecs },
            false => DiskOp::Read { offset, iovecs },
        };
        let tag = slot as u64 | ((index as u64) << 32);
        self.data
            .queue_on(file, op, tag)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        request.in_flight += 1;
        self.transfers_in_flight += 1;
        Ok(())
    }

    fn account(&mut self, completion: Completion) {
        let slot = (completion.user_data & 0xffff_ffff) as usize;
        let index = (completion.user_data >> 32) as usize;
        let Some(request) = self.requests.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!("qcow2: completion for unknown request {slot}");
            return;
        };
        self.transfers_in_flight -= 1;
        request.in_flight -= 1;
        let expected = request.transfers.get(index).map_or(0, |t| t.len);
        if completion.result < 0 {
            request.error.get_or_insert(completion.result);
        } else if completion.result as u64 != expected {
            request.error.get_or_insert(-i64::from(libc::EIO));
        }
        self.finish_if_done(slot);
    }

    fn finish_if_done(&mut self, slot: usize) {
        if self.requests[slot]
            .as_ref()
            .is_some_and(|r| r.in_flight == 0)
        {
            let request = self.requests[slot].take().expect("checked above");
            self.free_slots.push(slot);
            self.ready.push_back(Completion {
                user_data: request.user_data,
                result: request.error.unwrap_or(request.bytes as i64),
            });
        }
    }

    /// Blocks until every transfer this queue started has completed: flushes must cover
    /// them, and discards must not free clusters they are writing to.
    fn wait_for_transfers(&mut self) -> std::io::Result<()> {
        while self.transfers_in_flight > 0 {
            self.data
                .engine()
                .submit()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            match self.data.engine().next_completion() {
                Some(completion) => self.account(completion),
                None => {
                    let notifier = self.data.notifier();
                    let mut fds = [libc::pollfd {
                        fd: notifier.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    // SAFETY: polls one valid descriptor we own, with a bounded timeout.
                    unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
                    let _ = notifier.read();
                }
            }
        }
        Ok(())
    }
}

impl AsyncIo for Qcow2Io {
    fn event_fd(&self) -> RawFd {
        self.data.notifier().as_raw_fd()
    }

    fn process_events(&mut self) {
        self.data.engine().process_events();
    }

    fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError> {
        let bytes = match op {
            DiskOp::Read { iovecs, .. } | DiskOp::Write { iovecs, .. } => iovecs_len(iovecs),
            _ => 0,
        };
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.requests.push(None);
            self.requests.len() - 1
        });
        self.requests[slot] = Some(Request {
            user_data,
            bytes,
            transfers: Vec::new(),
            in_flight: 0,
            error: None,
        });
        let outcome = match op {
            DiskOp::Read { offset, iovecs } => self.read(slot, offset, iovecs),
            DiskOp::Write { offset, iovecs } => self.write(slot, offset, iovecs),
            DiskOp::Flush => self.wait_for_transfers().and_then(|()| self.image.flush()),
            DiskOp::Discard { offset, len } => self
                .wait_for_transfers()
                .and_then(|()| self.discard(offset, len)),
            DiskOp::WriteZeroes { offset, len, .. } => self
                .wait_for_transfers()
                .and_then(|()| self.write_zeroes(slot, offset, len)),
        };
        if let Err(e) = outcome {
            tracing::warn!("qcow2 request failed: {e}");
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            if let Some(request) = self.requests[slot].as_mut() {
                request.error.get_or_insert(-i64::from(errno));
            }
        }
        self.finish_if_done(slot);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), DiskError> {
        self.data.engine().submit()?;
        if !self.ready.is_empty() {
            self.data.notifier().write(1).map_err(DiskError::EventFd)?;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        loop {
            if let Some(completion) = self.ready.pop_front() {
                return Some(completion);
            }
            let completion = self.data.engine().next_completion()?;
            self.account(completion);
        }
    }
}

fn iovecs_len(iovecs: &[libc::iovec]) -> u64 {
    iovecs.iter().map(|v| v.iov_len as u64).sum()
}

/// The iovecs covering bytes `start..start + len` of `iovecs`.
fn slice_iovecs(iovecs: &[libc::iovec], start: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let (mut skip, mut want) = (start as usize, len as usize);
    for v in iovecs {
        if want == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let take = (v.iov_len - skip).min(want);
        out.push(libc::iovec {
            // SAFETY: `skip` is within this buffer (checked above).
            iov_base: unsafe { (v.iov_base as *mut u8).add(skip) }.cast(),
            iov_len: take,
        });
        want -= take;
        skip = 0;
    }
    out
}

fn fill_zero(iovecs: &[libc::iovec]) {
    for v in iovecs {
        // SAFETY: each iovec is a writable buffer of iov_len bytes (guest memory the request
        // may write, or a bounce buffer) that the caller keeps alive.
        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

fn copy_to_iovecs(mut data: &[u8], iovecs: &[libc::iovec]) {
    for v in iovecs {
        let n = v.iov_len.min(data.len());
        // SAFETY: as in fill_zero; `n` bytes fit both the source and the destination.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), v.iov_base as *mut u8, n) };
        data = &data[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn slicing_iovecs_crosses_buffer_boundaries() {
        let (mut a, mut b, mut c) = ([0u8; 512], [0u8; 1024], [0u8; 512]);
        let vecs = [iov(&mut a), iov(&mut b), iov(&mut c)];
        let part = slice_iovecs(&vecs, 256, 1536);
        assert_eq!(part.len(), 3);
        assert_eq!(part[0].iov_len, 256);
        assert_eq!(part[0].iov_base as usize, vecs[0].iov_base as usize + 256);
        assert_eq!(part[1].iov_len, 1024);
        assert_eq!(part[2].iov_len, 256);
        assert_eq!(part[2].iov_base, vecs[2].iov_base);
        assert_eq!(iovecs_len(&slice_iovecs(&vecs, 2048, 0)), 0);
        assert_eq!(slice_iovecs(&vecs, 1536, 512)[0].iov_base, vecs[2].iov_base);
    }

    #[test]
    fn zero_fill_and_copy_cover_every_buffer() {
        let (mut a, mut b) = ([7u8; 3], [7u8; 5]);
        let vecs = [iov(&mut a), iov(&mut b)];
        fill_zero(&vecs);
        assert_eq!((a, b), ([0; 3], [0; 5]));
        let vecs = [iov(&mut a), iov(&mut b)];
        copy_to_iovecs(&[1, 2, 3, 4, 5, 6, 7, 8], &vecs);
        assert_eq!((a, b), ([1, 2, 3], [4, 5, 6, 7, 8]));
    }
}
