//! libiscsi (Debian's libiscsi-dev, 1.19): the declarations we use and one safe type,
//! `Session`, that owns a context. Every `unsafe` of the iSCSI disk lives here; the engine
//! in `iscsi.rs` only sees the safe methods.
//!
//! Struct layouts are copied from `<iscsi/scsi-lowlevel.h>` and `<iscsi/iscsi.h>` of that
//! version; only plain structs without bit fields are mirrored, everything else stays
//! behind pointers.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

#[repr(C)]
struct IscsiContext {
    _private: [u8; 0],
}

#[repr(C)]
struct ScsiTask {
    // `int status` is the struct's first member; nothing else of it is read here.
    status: c_int,
}

#[repr(C)]
struct ReadCapacity16 {
    returned_lba: u64,
    block_length: u32,
    p_type: u8,
    prot_en: u8,
    p_i_exp: u8,
    lbppbe: u8,
    lbpme: u8,
    lbprz: u8,
    lalba: u16,
}

#[repr(C)]
struct InquiryBlockLimits {
    qualifier: c_int,
    device_type: c_int,
    pagecode: c_int,
    wsnz: c_int,
    max_cmp: u8,
    opt_gran: u16,
    max_xfer_len: u32,
    opt_xfer_len: u32,
    max_prefetch: u32,
    max_unmap: u32,
    max_unmap_bdc: u32,
    opt_unmap_gran: u32,
    ugavalid: c_int,
    unmap_gran_align: u32,
    max_ws_len: u64,
    max_atomic_xfer_len: u32,
    atomic_align: u32,
    atomic_gran: u32,
    max_atomic_tl_with_atomic_boundary: u32,
    max_atomic_boundary_size: u32,
}

#[repr(C)]
struct InquiryLogicalBlockProvisioning {
    qualifier: c_int,
    device_type: c_int,
    pagecode: c_int,
    threshold_exponent: c_int,
    lbpu: c_int,
    lbpws: c_int,
    lbpws10: c_int,
    lbprz: c_int,
    anc_sup: c_int,
    dp: c_int,
    provisioning_type: c_int,
}

#[repr(C)]
struct UnmapList {
    lba: u64,
    num: u32,
}

type CommandCallback = unsafe extern "C" fn(
    iscsi: *mut IscsiContext,
    status: c_int,
    command_data: *mut c_void,
    private_data: *mut c_void,
);

const ISCSI_SESSION_NORMAL: c_int = 2;
const ISCSI_HEADER_DIGEST_NONE_CRC32C: c_int = 1;
const SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS: c_int = 0xb0;
const SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING: c_int = 0xb2;

pub const SCSI_STATUS_GOOD: i32 = 0;
pub const SCSI_STATUS_BUSY: i32 = 8;
pub const SCSI_STATUS_TASK_SET_FULL: i32 = 0x28;
pub const SCSI_STATUS_CANCELLED: i32 = 0x0f00_0000;
pub const SCSI_STATUS_ERROR: i32 = 0x0f00_0001;
pub const SCSI_STATUS_TIMEOUT: i32 = 0x0f00_0002;

// Linked by build.rs (static builds need libiscsi's own dependencies after it).
extern "C" {
    fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_set_isid_random(iscsi: *mut IscsiContext, rnd: u32, qualifier: u32) -> c_int;
    fn iscsi_set_targetname(iscsi: *mut IscsiContext, targetname: *const c_char) -> c_int;
    fn iscsi_set_session_type(iscsi: *mut IscsiContext, session_type: c_int) -> c_int;
    fn iscsi_set_header_digest(iscsi: *mut IscsiContext, header_digest: c_int) -> c_int;
    fn iscsi_set_initiator_username_pwd(
        iscsi: *mut IscsiContext,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    fn iscsi_set_timeout(iscsi: *mut IscsiContext, timeout: c_int) -> c_int;
    fn iscsi_set_noautoreconnect(iscsi: *mut IscsiContext, state: c_int);
    fn iscsi_full_connect_async(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
        cb: CommandCallback,
        private_data: *mut c_void,
    ) -> c_int;
    fn iscsi_full_connect_sync(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
    ) -> c_int;
    fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    fn iscsi_readcapacity16_sync(iscsi: *mut IscsiContext, lun: c_int) -> *mut ScsiTask;
    fn iscsi_inquiry_sync(
        iscsi: *mut IscsiContext,
        lun: c_int,
        evpd: c_int,
        page_code: c_int,
        maxsize: c_int,
    ) -> *mut ScsiTask;
    fn scsi_datain_unmarshall(task: *mut ScsiTask) -> *mut c_void;
    fn scsi_free_scsi_task(task: *mut ScsiTask);
    fn iscsi_read16_iov_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        datalen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCallback,
        private_data: *mut c_void,
        iov: *mut libc::iovec,
        niov: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_write16_iov_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCallback,
        private_data: *mut c_void,
        iov: *mut libc::iovec,
        niov: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_synchronizecache16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        num_blocks: u32,
        syncnv: c_int,
        immed: c_int,
        cb: CommandCallback,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_unmap_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        anchor: c_int,
        group: c_int,
        list: *mut UnmapList,
        list_len: c_int,
        cb: CommandCallback,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_writesame16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        num_blocks: u32,
        anchor: c_int,
        unmap: c_int,
        wrprotect: c_int,
        group: c_int,
        cb: CommandCallback,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("a name or secret contains a NUL byte")]
    Nul,
    #[error("libiscsi cannot create a context (out of memory?)")]
    Context,
    #[error("{0}")]
    Library(String),
}

/// What a LUN says about itself at login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LunGeometry {
    pub blocks: u64,
    pub block_size: u32,
    /// log2(physical blocks per logical block).
    pub physical_block_exp: u8,
    /// Thin provisioning enabled (READ CAPACITY(16) LBPME).
    pub thin: bool,
    /// UNMAP supported (provisioning VPD LBPU).
    pub unmap: bool,
    /// WRITE SAME(16) with UNMAP supported (provisioning VPD LBPWS).
    pub write_same_unmap: bool,
    /// Block limits: most blocks in one UNMAP descriptor / one WRITE SAME; 0 = not said.
    pub max_unmap_blocks: u32,
    pub max_write_same_blocks: u64,
    /// The block limits page was there (it says what WRITE SAME may do).
    pub has_block_limits: bool,
}

/// Where a finished command's outcome goes: (ticket, SCSI status). Written by the
/// completion callback, read by the engine between library calls.
pub type Outcomes = Mutex<Vec<(u64, i32)>>;

/// Handed to libiscsi with each command; taken back by the callback.
struct Ticket {
    outcomes: *const Outcomes,
    ticket: u64,
}

unsafe extern "C" fn command_done(
    _iscsi: *mut IscsiContext,
    status: c_int,
    _command_data: *mut c_void,
    private_data: *mut c_void,
) {
    // SAFETY: private_data is the Box<Ticket> leaked by `Session::start`; libiscsi calls
    // this callback exactly once per command (on completion, cancellation or context
    // destruction), so the box is taken back exactly once.
    let ticket = unsafe { Box::from_raw(private_data.cast::<Ticket>()) };
    // SAFETY: the outcomes list outlives the session (it is dropped after the context).
    let outcomes = unsafe { &*ticket.outcomes };
    if let Ok(mut list) = outcomes.lock() {
        list.push((ticket.ticket, status));
    }
}

/// A command handed to libiscsi. Freed with `free` once it can no longer be referred to:
/// after its outcome GOOD (or another answer from the target), or after the session that
/// ran it is dropped — never while libiscsi may still send its data.
#[derive(Debug)]
pub struct TaskHandle(*mut ScsiTask);

impl TaskHandle {
    pub fn free(self) {
        // SAFETY: by the rule above libiscsi no longer refers to the task; the handle is
        // consumed, so it is freed once.
        unsafe { scsi_free_scsi_task(self.0) };
    }
}

/// One logged-in iSCSI session (a libiscsi context) to one LUN.
pub struct Session {
    ctx: *mut IscsiContext,
    lun: c_int,
    outcomes: Box<Outcomes>,
    /// One zeroed block, the payload of every WRITE SAME.
    zero_block: Vec<u8>,
}

// SAFETY: a libiscsi context has no thread affinity; a Session is used by one thread at a
// time (it is owned by one queue's engine and every method takes &mut self).
unsafe impl Send for Session {}

/// A random initiator session id for `Login::isid` (24 bits are random).
pub fn random_isid() -> u32 {
    let mut random = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into the local array.
    unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    u32::from_ne_bytes(random) & 0x00ff_ffff
}

pub struct Login<'a> {
    /// The session's ISID (random part): two sessions of one initiator to one target
    /// must differ in it, or the target takes the second for a reinstatement of the first.
    pub isid: u32,
    pub initiator: &'a str,
    pub target: &'a str,
    /// host:port
    pub portal: &'a str,
    pub lun: u32,
    pub chap: Option<(&'a str, &'a str)>,
    pub timeout_secs: u32,
}

fn cstring(s: &str) -> Result<CString, SessionError> {
    CString::new(s).map_err(|_| SessionError::Nul)
}

/// The ticket of a session's own login (commands use their request slots).
pub const LOGIN_TICKET: u64 = u64::MAX;

impl Session {
    /// A context set up for `login`, not connected yet.
    fn context(login: &Login<'_>) -> Result<Self, SessionError> {
        let initiator = cstring(login.initiator)?;
        let target = cstring(login.target)?;
        let chap = match login.chap {
            Some((user, secret)) => Some((cstring(user)?, cstring(secret)?)),
            None => None,
        };
        // SAFETY: initiator is a valid C string; the context is checked for NULL.
        let ctx = unsafe { iscsi_create_context(initiator.as_ptr()) };
        if ctx.is_null() {
            return Err(SessionError::Context);
        }
        let session = Session {
            ctx,
            lun: login.lun as c_int,
            outcomes: Box::new(Mutex::new(Vec::new())),
            zero_block: Vec::new(),
        };
        // SAFETY: ctx is a live context; libiscsi copies the strings.
        unsafe {
            // libiscsi's own ISID choice repeats in forked processes: ours is explicit.
            iscsi_set_isid_random(ctx, login.isid, 0);
            iscsi_set_targetname(ctx, target.as_ptr());
            iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
            iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE_CRC32C);
            iscsi_set_timeout(ctx, login.timeout_secs.min(i32::MAX as u32) as c_int);
            // The engine reconnects by itself: libiscsi's own reconnect would keep commands
            // (and guest buffers) past their deadline with no safe way to withdraw them.
            iscsi_set_noautoreconnect(ctx, 1);
            if let Some((user, secret)) = &chap {
                iscsi_set_initiator_username_pwd(ctx, user.as_ptr(), secret.as_ptr());
            }
        }
        Ok(session)
    }

    /// Creates a context and logs in, blocking until it is done.
    pub fn login(login: &Login<'_>) -> Result<Self, SessionError> {
        let portal = cstring(login.portal)?;
        let session = Self::context(login)?;
        // SAFETY: ctx is live; portal is a valid C string.
        if unsafe { iscsi_full_connect_sync(session.ctx, portal.as_ptr(), session.lun) } != 0 {
            return Err(SessionError::Library(session.last_error()));
        }
        Ok(session)
    }

    /// Creates a context and starts logging in; the outcome arrives with `LOGIN_TICKET`
    /// once `service` has driven the login to its end.
    pub fn start_login(login: &Login<'_>) -> Result<Self, SessionError> {
        let portal = cstring(login.portal)?;
        let session = Self::context(login)?;
        let private = Box::into_raw(Box::new(Ticket {
            outcomes: &*session.outcomes,
            ticket: LOGIN_TICKET,
        }));
        // SAFETY: ctx is live; the ticket is taken back by the callback, or below when
        // libiscsi refuses at once (then no callback runs).
        let started = unsafe {
            iscsi_full_connect_async(
                session.ctx,
                portal.as_ptr(),
                session.lun,
                command_done,
                private.cast(),
            )
        };
        if started != 0 {
            // SAFETY: see above.
            drop(unsafe { Box::from_raw(private) });
            return Err(SessionError::Library(session.last_error()));
        }
        Ok(session)
    }

    /// Timeout of commands sent from now on (libiscsi counts whole seconds).
    pub fn set_timeout(&mut self, secs: u32) {
        // SAFETY: ctx is live.
        unsafe { iscsi_set_timeout(self.ctx, secs.clamp(1, i32::MAX as u32) as c_int) };
    }

    /// libiscsi's description of the last failure.
    pub fn last_error(&self) -> String {
        // SAFETY: ctx is live; the returned string is owned by the context and copied here.
        let text = unsafe { iscsi_get_error(self.ctx) };
        if text.is_null() {
            return "unknown iSCSI error".into();
        }
        // SAFETY: libiscsi returns a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .trim()
            .to_owned();
        if text.is_empty() {
            "unknown iSCSI error".into()
        } else {
            text
        }
    }

    /// Reads the LUN's capacity, block sizes and provisioning (blocking).
    pub fn geometry(&mut self) -> Result<LunGeometry, SessionError> {
        let capacity = self.sync_task(|ctx, lun| {
            // SAFETY: ctx is live.
            unsafe { iscsi_readcapacity16_sync(ctx, lun) }
        })?;
        // SAFETY: the task holds READ CAPACITY(16) data; unmarshall returns a struct owned
        // by the task (or NULL), read before the task is freed.
        let rc = unsafe {
            scsi_datain_unmarshall(capacity)
                .cast::<ReadCapacity16>()
                .as_ref()
        }
        .map(|rc| (rc.returned_lba, rc.block_length, rc.lbppbe, rc.lbpme));
        // SAFETY: the task came from libiscsi and is freed once.
        unsafe { scsi_free_scsi_task(capacity) };
        let (last_lba, block_size, lbppbe, lbpme) = rc.ok_or_else(|| {
            SessionError::Library("the target's READ CAPACITY(16) answer is malformed".into())
        })?;
        let mut geometry = LunGeometry {
            blocks: last_lba.saturating_add(1),
            block_size,
            physical_block_exp: lbppbe,
            thin: lbpme != 0,
            unmap: false,
            write_same_unmap: false,
            max_unmap_blocks: 0,
            max_write_same_blocks: 0,
            has_block_limits: false,
        };
        if let Ok(task) = self.sync_task(|ctx, lun| {
            // SAFETY: ctx is live.
            unsafe { iscsi_inquiry_sync(ctx, lun, 1, SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS, 255) }
        }) {
            // SAFETY: as for READ CAPACITY above.
            if let Some(bl) = unsafe {
                scsi_datain_unmarshall(task)
                    .cast::<InquiryBlockLimits>()
                    .as_ref()
            } {
                geometry.has_block_limits = true;
                geometry.max_unmap_blocks = bl.max_unmap;
                geometry.max_write_same_blocks = bl.max_ws_len;
            }
            // SAFETY: freed once.
            unsafe { scsi_free_scsi_task(task) };
        }
        if let Ok(task) = self.sync_task(|ctx, lun| {
            // SAFETY: ctx is live.
            unsafe {
                iscsi_inquiry_sync(
                    ctx,
                    lun,
                    1,
                    SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING,
                    255,
                )
            }
        }) {
            // SAFETY: as for READ CAPACITY above.
            if let Some(lbp) = unsafe {
                scsi_datain_unmarshall(task)
                    .cast::<InquiryLogicalBlockProvisioning>()
                    .as_ref()
            } {
                geometry.unmap = lbp.lbpu != 0;
                geometry.write_same_unmap = lbp.lbpws != 0;
            }
            // SAFETY: freed once.
            unsafe { scsi_free_scsi_task(task) };
        }
        Ok(geometry)
    }

    /// Runs a blocking command; a task that did not end GOOD is freed and reported.
    fn sync_task(
        &mut self,
        run: impl FnOnce(*mut IscsiContext, c_int) -> *mut ScsiTask,
    ) -> Result<*mut ScsiTask, SessionError> {
        let task = run(self.ctx, self.lun);
        if task.is_null() {
            return Err(SessionError::Library(self.last_error()));
        }
        // SAFETY: status is the first member of a live task.
        let status = unsafe { (*task).status };
        if status != SCSI_STATUS_GOOD {
            // SAFETY: freed once, not used afterwards.
            unsafe { scsi_free_scsi_task(task) };
            return Err(SessionError::Library(self.last_error()));
        }
        Ok(task)
    }

    pub fn fd(&self) -> i32 {
        // SAFETY: ctx is live.
        unsafe { iscsi_get_fd(self.ctx) }
    }

    /// poll(2) events the session waits for; 0 while it waits to reconnect.
    pub fn which_events(&self) -> i16 {
        // SAFETY: ctx is live.
        unsafe { iscsi_which_events(self.ctx) as i16 }
    }

    /// Lets libiscsi read, write, reconnect and time out; finished commands land in the
    /// outcomes. Err when the connection failed (libiscsi then reconnects by itself).
    pub fn service(&mut self, revents: i16) -> Result<(), String> {
        // SAFETY: ctx is live; callbacks only touch the outcomes list.
        if unsafe { iscsi_service(self.ctx, c_int::from(revents)) } < 0 {
            return Err(self.last_error());
        }
        Ok(())
    }

    /// Outcomes of commands finished since the last call: (ticket, SCSI status).
    pub fn take_outcomes(&mut self, into: &mut Vec<(u64, i32)>) {
        if let Ok(mut list) = self.outcomes.lock() {
            into.append(&mut list);
        }
    }

    fn start(
        &mut self,
        ticket: u64,
        issue: impl FnOnce(*mut IscsiContext, c_int, *mut c_void) -> *mut ScsiTask,
    ) -> Result<TaskHandle, String> {
        let private = Box::into_raw(Box::new(Ticket {
            outcomes: &*self.outcomes,
            ticket,
        }));
        let task = issue(self.ctx, self.lun, private.cast());
        if task.is_null() {
            // SAFETY: libiscsi did not take the ticket: no callback will run for it.
            drop(unsafe { Box::from_raw(private) });
            return Err(self.last_error());
        }
        Ok(TaskHandle(task))
    }

    /// READ(16) into `iovecs` (host memory that stays valid until the outcome is taken).
    pub fn read(
        &mut self,
        ticket: u64,
        lba: u64,
        bytes: u32,
        block_size: u32,
        iovecs: *const libc::iovec,
        count: usize,
    ) -> Result<TaskHandle, String> {
        self.start(ticket, |ctx, lun, private| {
            // SAFETY: ctx is live; libiscsi keeps the iovec array and its buffers until
            // the callback, and the caller keeps both alive until then.
            unsafe {
                iscsi_read16_iov_task(
                    ctx,
                    lun,
                    lba,
                    bytes,
                    block_size as c_int,
                    0,
                    0,
                    0,
                    0,
                    0,
                    command_done,
                    private,
                    iovecs.cast_mut(),
                    count as c_int,
                )
            }
        })
    }

    /// WRITE(16) from `iovecs` (valid until the outcome is taken).
    pub fn write(
        &mut self,
        ticket: u64,
        lba: u64,
        bytes: u32,
        block_size: u32,
        iovecs: *const libc::iovec,
        count: usize,
    ) -> Result<TaskHandle, String> {
        self.start(ticket, |ctx, lun, private| {
            // SAFETY: as for `read`; libiscsi only reads the buffers.
            unsafe {
                iscsi_write16_iov_task(
                    ctx,
                    lun,
                    lba,
                    std::ptr::null_mut(),
                    bytes,
                    block_size as c_int,
                    0,
                    0,
                    0,
                    0,
                    0,
                    command_done,
                    private,
                    iovecs.cast_mut(),
                    count as c_int,
                )
            }
        })
    }

    /// SYNCHRONIZE CACHE(16) of the whole LUN.
    pub fn flush(&mut self, ticket: u64) -> Result<TaskHandle, String> {
        self.start(ticket, |ctx, lun, private| {
            // SAFETY: ctx is live; no buffers.
            unsafe { iscsi_synchronizecache16_task(ctx, lun, 0, 0, 0, 0, command_done, private) }
        })
    }

    /// UNMAP of one range.
    pub fn unmap(&mut self, ticket: u64, lba: u64, blocks: u32) -> Result<TaskHandle, String> {
        let mut list = UnmapList { lba, num: blocks };
        self.start(ticket, |ctx, lun, private| {
            // SAFETY: ctx is live; libiscsi encodes the list into the CDB's data before
            // returning, so the local may go away afterwards.
            unsafe { iscsi_unmap_task(ctx, lun, 0, 0, &mut list, 1, command_done, private) }
        })
    }

    /// WRITE SAME(16) of zeroes over a range, deallocating it where `unmap` allows.
    pub fn write_zeroes(
        &mut self,
        ticket: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
        unmap: bool,
    ) -> Result<TaskHandle, String> {
        if self.zero_block.len() != block_size as usize {
            self.zero_block = vec![0; block_size as usize];
        }
        let data = self.zero_block.as_mut_ptr();
        self.start(ticket, |ctx, lun, private| {
            // SAFETY: ctx is live; the zero block belongs to this session and is never
            // resized while a command is in flight (the block size is fixed per LUN).
            unsafe {
                iscsi_writesame16_task(
                    ctx,
                    lun,
                    lba,
                    data,
                    block_size,
                    blocks,
                    0,
                    c_int::from(unmap),
                    0,
                    0,
                    command_done,
                    private,
                )
            }
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Commands still in flight are reported CANCELLED to the callback, which only
        // touches `outcomes` (dropped after this); their tasks are freed by their owner
        // afterwards.
        // SAFETY: ctx is live and destroyed once.
        unsafe { iscsi_destroy_context(self.ctx) };
    }
}
