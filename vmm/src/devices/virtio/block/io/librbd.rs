//! librados and librbd (Ceph 16, Debian's librbd1), loaded when an RBD disk is opened:
//! the VMM is also built statically (the nested harness), and Ceph's libraries exist only
//! as shared objects, so they cannot be linked in. Every `unsafe` of the RBD disk lives
//! here; `Image` is the safe type the engine in `rbd.rs` uses.

use std::ffi::{c_char, c_int, c_void, CString};
use std::os::unix::io::RawFd;
#[cfg(not(target_feature = "crt-static"))]
use std::sync::OnceLock;

use libloading::Library;

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type Callback = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;

const EVENT_TYPE_EVENTFD: c_int = 2;

/// The functions used, resolved once per process.
struct Api {
    rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados_shutdown: unsafe extern "C" fn(RadosT),
    rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_open_read_only:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_set_image_notification: unsafe extern "C" fn(ImageT, c_int, c_int) -> c_int,
    rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut CompletionT) -> c_int,
    rbd_aio_release: unsafe extern "C" fn(CompletionT),
    rbd_aio_get_return_value: unsafe extern "C" fn(CompletionT) -> isize,
    rbd_aio_get_arg: unsafe extern "C" fn(CompletionT) -> *mut c_void,
    rbd_aio_readv:
        unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    rbd_aio_writev:
        unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    rbd_aio_flush: unsafe extern "C" fn(ImageT, CompletionT) -> c_int,
    rbd_aio_discard: unsafe extern "C" fn(ImageT, u64, u64, CompletionT) -> c_int,
    rbd_aio_write_zeroes:
        unsafe extern "C" fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int,
    rbd_poll_io_events: unsafe extern "C" fn(ImageT, *mut CompletionT, c_int) -> c_int,
    // Keep the libraries loaded for as long as the function pointers live (the process).
    _rados: Library,
    _rbd: Library,
}

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("cannot load Ceph's client libraries: {0}")]
    Load(String),
    #[error("a name or path contains a NUL byte")]
    Nul,
    #[error("{what}: {source}")]
    Call {
        what: String,
        source: std::io::Error,
    },
}

#[cfg(target_feature = "crt-static")]
fn api() -> Result<&'static Api, RbdError> {
    // A statically linked process cannot load a library that needs the shared libc: it
    // would run two C libraries at once and crash.
    Err(RbdError::Load(
        "this stratus-vmm is statically linked; RBD disks need the dynamically linked build".into(),
    ))
}

#[cfg(not(target_feature = "crt-static"))]
fn api() -> Result<&'static Api, RbdError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| load().map_err(|e| format!("{e} (install librbd1)")))
        .as_ref()
        .map_err(|e| RbdError::Load(e.clone()))
}

#[cfg(not(target_feature = "crt-static"))]
fn load() -> Result<Api, libloading::Error> {
    // SAFETY: loading Debian's librados/librbd runs their initialisers, which only set
    // up the libraries' own state.
    let rados = unsafe { Library::new("librados.so.2")? };
    // SAFETY: as above.
    let rbd = unsafe { Library::new("librbd.so.1")? };
    macro_rules! sym {
        ($lib:expr, $name:literal) => {
            // SAFETY: the symbol's type is the prototype from librados.h/librbd.h of
            // Ceph 16 (the field it is stored in spells it out).
            *unsafe { $lib.get(concat!($name, "\0").as_bytes())? }
        };
    }
    Ok(Api {
        rados_create: sym!(rados, "rados_create"),
        rados_conf_read_file: sym!(rados, "rados_conf_read_file"),
        rados_conf_set: sym!(rados, "rados_conf_set"),
        rados_connect: sym!(rados, "rados_connect"),
        rados_shutdown: sym!(rados, "rados_shutdown"),
        rados_ioctx_create: sym!(rados, "rados_ioctx_create"),
        rados_ioctx_destroy: sym!(rados, "rados_ioctx_destroy"),
        rbd_open: sym!(rbd, "rbd_open"),
        rbd_open_read_only: sym!(rbd, "rbd_open_read_only"),
        rbd_close: sym!(rbd, "rbd_close"),
        rbd_get_size: sym!(rbd, "rbd_get_size"),
        rbd_set_image_notification: sym!(rbd, "rbd_set_image_notification"),
        rbd_aio_create_completion: sym!(rbd, "rbd_aio_create_completion"),
        rbd_aio_release: sym!(rbd, "rbd_aio_release"),
        rbd_aio_get_return_value: sym!(rbd, "rbd_aio_get_return_value"),
        rbd_aio_get_arg: sym!(rbd, "rbd_aio_get_arg"),
        rbd_aio_readv: sym!(rbd, "rbd_aio_readv"),
        rbd_aio_writev: sym!(rbd, "rbd_aio_writev"),
        rbd_aio_flush: sym!(rbd, "rbd_aio_flush"),
        rbd_aio_discard: sym!(rbd, "rbd_aio_discard"),
        rbd_aio_write_zeroes: sym!(rbd, "rbd_aio_write_zeroes"),
        rbd_poll_io_events: sym!(rbd, "rbd_poll_io_events"),
        _rados: rados,
        _rbd: rbd,
    })
}

fn cstring(s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul)
}

fn check(what: impl FnOnce() -> String, r: c_int) -> Result<(), RbdError> {
    if r < 0 {
        return Err(RbdError::Call {
            what: what(),
            source: std::io::Error::from_raw_os_error(-r),
        });
    }
    Ok(())
}

/// How to reach the cluster and which image to open.
pub struct OpenImage<'a> {
    /// ceph.conf; None for librados' own search (`/etc/ceph/ceph.conf`, `$CEPH_CONF`).
    pub conf: Option<&'a str>,
    /// The client id without `client.` (librados' default: admin).
    pub id: Option<&'a str>,
    pub keyring: Option<&'a str>,
    pub pool: &'a str,
    pub image: &'a str,
    /// Snapshots open read-only.
    pub snapshot: Option<&'a str>,
    pub read_only: bool,
    pub timeout_secs: u32,
}

/// An open RBD image with its cluster connection. librbd's handles are thread-safe.
pub struct Image {
    api: &'static Api,
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
}

// SAFETY: librados and librbd handles may be used from any thread (librbd serialises
// internally); the pointers are only freed in Drop.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Connects (blocking, bounded by `timeout_secs`) and opens the image.
    pub fn open(o: &OpenImage<'_>) -> Result<Image, RbdError> {
        let api = api()?;
        let id = o.id.map(cstring).transpose()?;
        let mut cluster: RadosT = std::ptr::null_mut();
        // SAFETY: writes the new handle into `cluster`; id is NULL or a C string.
        let r = unsafe {
            (api.rados_create)(
                &mut cluster,
                id.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        check(|| "cannot create a Ceph client".into(), r)?;
        // From here on, Drop cleans up whatever was made.
        let mut image = Image {
            api,
            cluster,
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
        };
        let conf = o.conf.map(cstring).transpose()?;
        // SAFETY: cluster is live; conf is NULL (default search) or a C string.
        let r = unsafe {
            (api.rados_conf_read_file)(
                cluster,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        check(
            || match o.conf {
                Some(path) => format!("cannot read {path}"),
                None => "cannot find a ceph.conf (give conf=)".into(),
            },
            r,
        )?;
        let timeout = o.timeout_secs.max(1).to_string();
        let mut settings = vec![
            ("client_mount_timeout", timeout.clone()),
            ("rados_mon_op_timeout", timeout.clone()),
            ("rados_osd_op_timeout", timeout),
            // A DISCARD zeroes its whole range (as on every other disk kind), also where
            // it covers parts of RADOS objects.
            ("rbd_skip_partial_discard", "false".to_owned()),
            // No log files or admin sockets of a VMM's own anywhere.
            ("log_file", String::new()),
            ("admin_socket", String::new()),
        ];
        if let Some(keyring) = o.keyring {
            settings.push(("keyring", keyring.to_owned()));
        }
        for (key, value) in settings {
            let (k, v) = (cstring(key)?, cstring(&value)?);
            // SAFETY: cluster is live; both are C strings librados copies.
            let r = unsafe { (api.rados_conf_set)(cluster, k.as_ptr(), v.as_ptr()) };
            check(|| format!("cannot set {key}"), r)?;
        }
        // SAFETY: cluster is live and configured.
        let r = unsafe { (api.rados_connect)(cluster) };
        check(|| "cannot connect to the cluster".into(), r)?;
        let pool = cstring(o.pool)?;
        // SAFETY: cluster is connected; writes the handle into image.ioctx.
        let r = unsafe { (api.rados_ioctx_create)(cluster, pool.as_ptr(), &mut image.ioctx) };
        check(|| format!("no pool {}", o.pool), r)?;
        let name = cstring(o.image)?;
        let snap = o.snapshot.map(cstring).transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let open = if o.read_only || o.snapshot.is_some() {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        // SAFETY: ioctx is live; name and snap are C strings (or NULL); writes the handle.
        let r = unsafe { open(image.ioctx, name.as_ptr(), &mut image.image, snap_ptr) };
        check(
            || match o.snapshot {
                Some(s) => format!("cannot open image {}/{}@{s}", o.pool, o.image),
                None => format!("cannot open image {}/{}", o.pool, o.image),
            },
            r,
        )?;
        Ok(image)
    }

    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: the image is open; writes one u64.
        let r = unsafe { (self.api.rbd_get_size)(self.image, &mut size) };
        check(|| "cannot read the image size".into(), r)?;
        Ok(size)
    }

    /// librbd writes `fd` (an eventfd) when an operation completes; the completions are
    /// then taken with `poll_completions`. One receiver per image handle.
    pub fn notify(&self, fd: RawFd) -> Result<(), RbdError> {
        // SAFETY: the image is open; librbd only writes to the descriptor, which the
        // engine keeps open for as long as it uses this image.
        let r =
            unsafe { (self.api.rbd_set_image_notification)(self.image, fd, EVENT_TYPE_EVENTFD) };
        check(|| "cannot set the completion notification".into(), r)
    }

    /// Starts `op`; `tag` comes back with its result from `poll_completions`. Buffers
    /// (iovec arrays and their memory) must stay valid until then.
    pub fn start(&self, op: RbdOp, tag: u64) -> Result<(), RbdError> {
        let api = self.api;
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: no callback; the tag travels as the completion's argument.
        let r = unsafe { (api.rbd_aio_create_completion)(tag as *mut c_void, None, &mut c) };
        check(|| "cannot create a completion".into(), r)?;
        // SAFETY: the image is open and c a fresh completion; the caller keeps the
        // buffers alive until the completion is polled.
        let r = unsafe {
            match op {
                RbdOp::Read {
                    offset,
                    iovecs,
                    count,
                } => (api.rbd_aio_readv)(self.image, iovecs, count as c_int, offset, c),
                RbdOp::Write {
                    offset,
                    iovecs,
                    count,
                } => (api.rbd_aio_writev)(self.image, iovecs, count as c_int, offset, c),
                RbdOp::Flush => (api.rbd_aio_flush)(self.image, c),
                RbdOp::Discard { offset, len } => (api.rbd_aio_discard)(self.image, offset, len, c),
                RbdOp::WriteZeroes { offset, len } => {
                    (api.rbd_aio_write_zeroes)(self.image, offset, len as usize, c, 0, 0)
                }
            }
        };
        if r < 0 {
            // SAFETY: the operation was refused, so librbd does not hold the completion.
            unsafe { (api.rbd_aio_release)(c) };
        }
        check(|| "librbd refused the request".into(), r)
    }

    /// Finished operations since the last call: (tag, result: bytes or negated errno).
    pub fn poll_completions(&self, into: &mut Vec<(u64, i64)>) {
        let mut batch = [std::ptr::null_mut::<c_void>(); 32];
        loop {
            // SAFETY: the image is open; librbd fills at most `batch.len()` entries.
            let n = unsafe {
                (self.api.rbd_poll_io_events)(self.image, batch.as_mut_ptr(), batch.len() as c_int)
            };
            if n <= 0 {
                return;
            }
            for &c in &batch[..n as usize] {
                // SAFETY: c is a completion librbd has finished with; it is released once.
                let (result, tag) = unsafe {
                    let result = (self.api.rbd_aio_get_return_value)(c);
                    let tag = (self.api.rbd_aio_get_arg)(c) as u64;
                    (self.api.rbd_aio_release)(c);
                    (result, tag)
                };
                into.push((tag, result as i64));
            }
            if (n as usize) < batch.len() {
                return;
            }
        }
    }
}

/// One librbd operation.
#[derive(Clone, Copy, Debug)]
pub enum RbdOp {
    Read {
        offset: u64,
        iovecs: *const libc::iovec,
        count: usize,
    },
    Write {
        offset: u64,
        iovecs: *const libc::iovec,
        count: usize,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: each handle was made by open() (or is NULL) and is released once, the
        // image before its pool context before the cluster.
        unsafe {
            if !self.image.is_null() {
                (self.api.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
            (self.api.rados_shutdown)(self.cluster);
        }
    }
}
