//! Disks on iSCSI LUNs through libiscsi, with no kernel initiator in between (QEMU's
//! `block/iscsi.c` does the same). Each queue has its own session and keeps the guest's
//! whole queue depth in flight on it; the session's socket and a tick timer sit in an
//! epoll set whose descriptor is what the queue worker polls, so the worker's own event
//! loop drives the protocol.
//!
//! A target that goes away is reconnected by libiscsi, which sends the commands in flight
//! again; a command that has not finished after `timeout_secs` fails to the guest as an
//! I/O error, and so does every command while the target stays away.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::libiscsi::{self, Login, LunGeometry, Session, TaskHandle};
use super::{topology_from, AsyncIo, Completion, DiskError, DiskOp, Topology};

/// The initiator name when the configuration gives none.
pub const DEFAULT_INITIATOR: &str = "iqn.2026-12.eu.stratuslab:stratus-vmm";
pub const DEFAULT_TIMEOUT_SECS: u32 = 60;
const DEFAULT_PORT: u16 = 3260;

/// An iSCSI LUN as a disk source. The CHAP secret is never part of it: it is read from
/// `secret_file` (mode 0600), so it shows neither in `/proc/PID/cmdline` nor in the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiSource {
    /// `iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN`
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// How long a command may wait for the target (reconnects included) before the guest
    /// gets an I/O error.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u32,
}

fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_SECS
}

#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    #[error("'{url}' is not an iSCSI URL: {reason} (iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN)")]
    BadUrl { url: String, reason: &'static str },
    #[error("iSCSI disk {url}: CHAP user {user} needs secret-file= (a file of mode 0600 holding the secret)")]
    NoSecret { url: String, user: String },
    #[error("iSCSI disk {url}: secret-file= is given but the URL names no CHAP user")]
    SecretWithoutUser { url: String },
    #[error("iSCSI disk {url}: cannot read the CHAP secret file {path}: {source}")]
    SecretFile {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("iSCSI disk {url}: the CHAP secret file {path} is readable by others (mode {mode:o}); make it 0600")]
    SecretMode {
        url: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("iSCSI disk {url}: the CHAP secret file {path} is empty")]
    EmptySecret { url: String, path: PathBuf },
    #[error("iSCSI disk {url}: timeout must be at least 1 second")]
    ZeroTimeout { url: String },
    #[error("iSCSI disk {url}: cannot log in: {reason}")]
    Login { url: String, reason: String },
    #[error("iSCSI disk {url}: {reason}")]
    Lun { url: String, reason: String },
    #[error("iSCSI disk {url}: cannot set up its event loop: {source}")]
    Events { url: String, source: std::io::Error },
}

/// The URL as errors may show it: anything between the user and the @ (a password the
/// URL should not hold) is left out.
fn redacted(url: &str) -> String {
    let Some(rest) = url.strip_prefix("iscsi://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split([':', '%']).next().unwrap_or("");
            format!("iscsi://{user}:…{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// The parts of an `iscsi://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiUrl {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    pub target: String,
    pub lun: u32,
}

impl IscsiUrl {
    pub fn parse(url: &str) -> Result<Self, IscsiError> {
        let bad = |reason| IscsiError::BadUrl {
            url: redacted(url),
            reason,
        };
        let rest = url
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("it must start with iscsi://"))?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no target"))?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, _)) if user.contains(':') || user.contains('%') => {
                return Err(bad(
                    "a secret in the URL would show in process listings; use secret-file=",
                ))
            }
            Some(("", _)) => return Err(bad("the user before @ is empty")),
            Some((user, hostport)) => (Some(user.to_owned()), hostport),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ]"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
                None if after.is_empty() => DEFAULT_PORT,
                None => return Err(bad("unexpected text after the IPv6 address")),
            };
            (format!("[{host}]"), port)
        } else {
            match hostport.split_once(':') {
                Some((host, port)) => (
                    host.to_owned(),
                    port.parse().map_err(|_| bad("the port is not a number"))?,
                ),
                None => (hostport.to_owned(), DEFAULT_PORT),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("the host is empty"));
        }
        if port == 0 {
            return Err(bad("port 0 is not a port"));
        }
        let (target, lun) = path
            .rsplit_once('/')
            .ok_or_else(|| bad("it names no LUN after the target"))?;
        if target.is_empty() || target.contains('/') {
            return Err(bad("the target name is empty or contains /"));
        }
        let lun = lun
            .parse::<u32>()
            .ok()
            .filter(|l| *l < 16384)
            .ok_or_else(|| bad("the LUN is not a number below 16384"))?;
        Ok(IscsiUrl {
            user,
            host,
            port,
            target: target.to_owned(),
            lun,
        })
    }

    /// The URL as shown in logs, errors and the API: the user stays, there is no secret.
    pub fn display(&self) -> String {
        let user = self
            .user
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        format!(
            "iscsi://{user}{}:{}/{}/{}",
            self.host, self.port, self.target, self.lun
        )
    }

    /// What identifies the LUN itself (two disks on it would corrupt each other).
    pub fn identity(&self) -> String {
        format!(
            "iscsi://{}:{}/{}/{}",
            self.host, self.port, self.target, self.lun
        )
    }
}

/// An iSCSI LUN checked at start-up: reachable, credentials accepted, geometry known.
/// Each queue logs in again with `IscsiIo::new`.
pub struct IscsiLun {
    url: IscsiUrl,
    /// host:port
    portal: String,
    initiator: String,
    secret: Option<String>,
    timeout: Duration,
    geometry: LunGeometry,
}

impl std::fmt::Debug for IscsiLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("IscsiLun")
            .field("url", &self.url.display())
            .field("geometry", &self.geometry)
            .finish()
    }
}

fn read_secret(url: &str, path: &PathBuf) -> Result<String, IscsiError> {
    let file_err = |source| IscsiError::SecretFile {
        url: url.to_owned(),
        path: path.clone(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(file_err)?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IscsiError::SecretMode {
            url: url.to_owned(),
            path: path.clone(),
            mode,
        });
    }
    let secret = std::fs::read_to_string(path).map_err(file_err)?;
    let secret = secret.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(IscsiError::EmptySecret {
            url: url.to_owned(),
            path: path.clone(),
        });
    }
    Ok(secret)
}

impl IscsiLun {
    /// Checks the source and logs in once to learn the LUN's geometry.
    pub fn connect(source: &IscsiSource) -> Result<Self, IscsiError> {
        let url = IscsiUrl::parse(&source.url)?;
        let shown = url.display();
        if source.timeout_secs == 0 {
            return Err(IscsiError::ZeroTimeout { url: shown });
        }
        let secret = match (&url.user, &source.secret_file) {
            (Some(_), Some(path)) => Some(read_secret(&shown, path)?),
            (Some(user), None) => {
                return Err(IscsiError::NoSecret {
                    url: shown,
                    user: user.clone(),
                })
            }
            (None, Some(_)) => return Err(IscsiError::SecretWithoutUser { url: shown }),
            (None, None) => None,
        };
        let mut lun = IscsiLun {
            portal: format!("{}:{}", url.host, url.port),
            initiator: source
                .initiator
                .clone()
                .unwrap_or_else(|| DEFAULT_INITIATOR.to_owned()),
            url,
            secret,
            timeout: Duration::from_secs(u64::from(source.timeout_secs)),
            geometry: LunGeometry {
                blocks: 0,
                block_size: 0,
                physical_block_exp: 0,
                thin: false,
                unmap: false,
                write_same_unmap: false,
                max_unmap_blocks: 0,
                max_write_same_blocks: 0,
                has_block_limits: false,
            },
        };
        let mut session = lun.login()?;
        let geometry = session.geometry().map_err(|e| IscsiError::Lun {
            url: shown.clone(),
            reason: format!("cannot read its capacity: {e}"),
        })?;
        let lun_err = |reason: String| IscsiError::Lun {
            url: shown.clone(),
            reason,
        };
        if !geometry.block_size.is_power_of_two() || geometry.block_size < 512 {
            return Err(lun_err(format!(
                "block size {} is not a power of two of at least 512 bytes",
                geometry.block_size
            )));
        }
        if geometry.blocks == 0 {
            return Err(lun_err("the LUN is empty".into()));
        }
        lun.geometry = geometry;
        tracing::info!(
            "iSCSI disk {shown}: {} blocks of {} bytes{}",
            geometry.blocks,
            geometry.block_size,
            if lun.can_discard() {
                ", thin-provisioned (UNMAP)"
            } else {
                ""
            }
        );
        Ok(lun)
    }

    fn login_params(&self, isid: u32) -> Login<'_> {
        Login {
            isid,
            initiator: &self.initiator,
            target: &self.url.target,
            portal: &self.portal,
            lun: self.url.lun,
            chap: self.url.user.as_deref().zip(self.secret.as_deref()),
            timeout_secs: self.timeout.as_secs() as u32,
        }
    }

    fn login(&self) -> Result<Session, IscsiError> {
        Session::login(&self.login_params(libiscsi::random_isid())).map_err(|e| IscsiError::Login {
            url: self.url.display(),
            reason: e.to_string(),
        })
    }

    pub fn size(&self) -> u64 {
        self.geometry
            .blocks
            .saturating_mul(u64::from(self.geometry.block_size))
    }

    pub fn topology(&self) -> Topology {
        let physical = self
            .geometry
            .block_size
            .checked_shl(u32::from(self.geometry.physical_block_exp))
            .unwrap_or(0);
        topology_from(self.geometry.block_size, physical)
    }

    /// DISCARD needs UNMAP, which the target offers only on thin-provisioned LUNs.
    pub fn can_discard(&self) -> bool {
        self.geometry.thin && self.geometry.unmap
    }

    /// WRITE_ZEROES is WRITE SAME(16), which the block limits page says the LUN takes.
    pub fn can_write_zeroes(&self) -> bool {
        self.geometry.has_block_limits
    }

    /// Largest DISCARD the LUN takes in one UNMAP, in 512-byte sectors (None: no limit).
    pub fn max_discard_sectors(&self) -> Option<u64> {
        let blocks = u64::from(self.geometry.max_unmap_blocks);
        (blocks > 0 && blocks != u64::from(u32::MAX))
            .then(|| blocks * u64::from(self.geometry.block_size) / 512)
    }

    /// Largest WRITE_ZEROES the LUN takes in one WRITE SAME, in sectors (None: no limit).
    pub fn max_write_zeroes_sectors(&self) -> Option<u64> {
        let blocks = self.geometry.max_write_same_blocks;
        (blocks > 0).then(|| blocks.saturating_mul(u64::from(self.geometry.block_size)) / 512)
    }
}

/// One operation, kept so it can be sent again on a new session.
#[derive(Clone, Copy, Debug)]
enum Command {
    Read {
        lba: u64,
        bytes: u32,
        iovecs: *const libc::iovec,
        count: usize,
    },
    Write {
        lba: u64,
        bytes: u32,
        iovecs: *const libc::iovec,
        count: usize,
    },
    Flush,
    Unmap {
        lba: u64,
        blocks: u32,
    },
    WriteZeroes {
        lba: u64,
        blocks: u32,
        unmap: bool,
    },
}

struct Request {
    user_data: u64,
    /// Submission order: requests sent again after a reconnect keep it.
    seq: u64,
    command: Command,
    /// Bytes a success reports (the worker checks it).
    bytes: i64,
    deadline: Instant,
    /// Set while libiscsi has the command.
    task: Option<TaskHandle>,
    /// Earliest time to send again after BUSY; None when not waiting to retry.
    retry_at: Option<Instant>,
}

/// The engine's connection to the target. libiscsi's own reconnect is off: after a lost
/// connection the session is dropped (which ends every command in it), the commands go
/// back to `pending`, and a new session logs in without blocking the worker.
enum Link {
    Up(Session),
    LoggingIn(Session, Instant),
    Down { retry_at: Instant },
}

const SOCKET_TOKEN: u64 = 0;
const TICK_TOKEN: u64 = 1;
const WAKE_TOKEN: u64 = 2;
/// libiscsi wants `iscsi_service(ctx, 0)` regularly for its timeouts; the tick also
/// fails overdue requests and paces reconnects.
const TICK: Duration = Duration::from_millis(250);
const BUSY_RETRY: Duration = Duration::from_millis(100);
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past its deadline a command libiscsi still has may stay before the session is
/// dropped (libiscsi's own timeout should have ended it by then).
const STUCK_GRACE: Duration = Duration::from_secs(5);

/// One queue's engine: its own session, its own epoll set.
pub struct IscsiIo {
    lun: Arc<IscsiLun>,
    /// The same on every login of this queue, so that a new session reinstates (and the
    /// target cleans up) the old one instead of leaving its commands running beside it.
    isid: u32,
    link: Link,
    epoll: Epoll,
    tick: TimerFd,
    wake: EventFd,
    watched: Option<(RawFd, i16)>,
    requests: Vec<Option<Request>>,
    free: Vec<usize>,
    next_seq: u64,
    /// Requests not handed to libiscsi yet, in order: queued since the last submit,
    /// waiting behind a flush, or waiting for the target to come back.
    pending: VecDeque<usize>,
    /// Requests libiscsi has.
    sending: usize,
    /// The flush in flight: nothing is sent until it has finished.
    barrier: Option<usize>,
    completions: VecDeque<Completion>,
    outcomes: Vec<(u64, i32)>,
}

impl IscsiIo {
    /// Starts logging in without waiting: queues are set up while the guest's vCPU waits
    /// for its driver to be accepted, and requests simply wait for the session (the disk
    /// was checked when it was opened).
    pub fn new(lun: Arc<IscsiLun>, depth: u32) -> Result<Self, DiskError> {
        let now = Instant::now();
        let isid = libiscsi::random_isid();
        let link = match Session::start_login(&lun.login_params(isid)) {
            Ok(session) => Link::LoggingIn(session, now),
            Err(e) => {
                tracing::warn!("iSCSI disk {}: cannot log in: {e}", lun.url.display());
                Link::Down {
                    retry_at: now + RECONNECT_DELAY,
                }
            }
        };
        let events = |source: std::io::Error| IscsiError::Events {
            url: lun.url.display(),
            source,
        };
        let epoll = Epoll::new().map_err(events)?;
        let mut tick = TimerFd::new().map_err(|e| events(e.into()))?;
        tick.reset(TICK, Some(TICK)).map_err(|e| events(e.into()))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(events)?;
        for (fd, token) in [
            (tick.as_raw_fd(), TICK_TOKEN),
            (wake.as_raw_fd(), WAKE_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(events)?;
        }
        let mut engine = IscsiIo {
            lun,
            isid,
            link,
            epoll,
            tick,
            wake,
            watched: None,
            requests: Vec::with_capacity(depth as usize),
            free: Vec::new(),
            next_seq: 0,
            pending: VecDeque::new(),
            sending: 0,
            barrier: None,
            completions: VecDeque::new(),
            outcomes: Vec::new(),
        };
        engine.rearm();
        Ok(engine)
    }

    fn block_size(&self) -> u32 {
        self.lun.geometry.block_size
    }

    fn url(&self) -> String {
        self.lun.url.display()
    }

    fn session(&mut self) -> Option<&mut Session> {
        match &mut self.link {
            Link::Up(session) | Link::LoggingIn(session, _) => Some(session),
            Link::Down { .. } => None,
        }
    }

    fn unwatch(&mut self) {
        if let Some((old, _)) = self.watched.take() {
            // A socket already closed has left the set by itself.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, old, EpollEvent::default());
        }
    }

    /// Watches the session's socket for what libiscsi waits for now.
    fn rearm(&mut self) {
        let wanted = match self.session() {
            Some(session) => {
                let (fd, events) = (session.fd(), session.which_events());
                (fd >= 0 && events != 0).then_some((fd, events))
            }
            None => None,
        };
        if wanted == self.watched {
            return;
        }
        self.unwatch();
        if let Some((fd, events)) = wanted {
            let set = EventSet::from_bits_truncate(events as u32);
            let event = EpollEvent::new(set, SOCKET_TOKEN);
            let added = self
                .epoll
                .ctl(ControlOperation::Add, fd, event)
                .or_else(|_| self.epoll.ctl(ControlOperation::Modify, fd, event));
            match added {
                Ok(()) => self.watched = Some((fd, events)),
                Err(e) => tracing::warn!("iSCSI disk {}: cannot watch its socket: {e}", self.url()),
            }
        }
    }

    fn finish(&mut self, slot: usize, result: i64) {
        if self.barrier == Some(slot) {
            self.barrier = None;
        }
        if let Some(request) = self.requests.get_mut(slot).and_then(Option::take) {
            if let Some(task) = request.task {
                // Only reached for commands the target answered, or after their session
                // was dropped.
                task.free();
            }
            self.completions.push_back(Completion {
                user_data: request.user_data,
                result,
            });
            self.free.push(slot);
        }
    }

    /// Drops the session: every command in it ends (libiscsi reports them cancelled),
    /// their tasks are freed, and those not overdue go back to `pending` in their order.
    fn reset(&mut self, why: &str) {
        self.unwatch();
        let was_up = matches!(self.link, Link::Up(_));
        self.link = Link::Down {
            retry_at: Instant::now() + RECONNECT_DELAY,
        };
        if was_up {
            tracing::warn!("iSCSI disk {}: {why}; reconnecting", self.url());
        } else {
            tracing::debug!("iSCSI disk {}: {why}; trying again", self.url());
        }
        for (slot, request) in self.requests.iter_mut().enumerate() {
            if let Some(task) = request.as_mut().and_then(|r| r.task.take()) {
                task.free();
                self.pending.push_back(slot);
            }
        }
        self.sending = 0;
        self.barrier = None;
        self.outcomes.clear();
        // Everything goes out again in the order the guest queued it.
        let seq_of = |slot: &usize| {
            self.requests
                .get(*slot)
                .and_then(Option::as_ref)
                .map_or(u64::MAX, |r| r.seq)
        };
        let mut order: Vec<usize> = self.pending.drain(..).collect();
        order.sort_by_key(seq_of);
        order.dedup();
        self.pending = order.into();
    }

    /// Hands a request to libiscsi. Returns false when the request failed at once.
    fn send(&mut self, slot: usize) {
        let block_size = self.block_size();
        let url = self.url();
        let Link::Up(session) = &mut self.link else {
            return;
        };
        let Some(request) = self.requests.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        request.retry_at = None;
        // libiscsi times each command from when it is queued: give it what is left.
        let left = request.deadline.saturating_duration_since(Instant::now());
        session.set_timeout(left.as_secs().max(1) as u32);
        let ticket = slot as u64;
        let started = match request.command {
            Command::Read {
                lba,
                bytes,
                iovecs,
                count,
            } => session.read(ticket, lba, bytes, block_size, iovecs, count),
            Command::Write {
                lba,
                bytes,
                iovecs,
                count,
            } => session.write(ticket, lba, bytes, block_size, iovecs, count),
            Command::Flush => session.flush(ticket),
            Command::Unmap { lba, blocks } => session.unmap(ticket, lba, blocks),
            Command::WriteZeroes { lba, blocks, unmap } => {
                session.write_zeroes(ticket, lba, blocks, block_size, unmap)
            }
        };
        match started {
            Ok(task) => {
                request.task = Some(task);
                self.sending += 1;
            }
            Err(reason) => {
                tracing::warn!("iSCSI disk {url}: cannot send a command: {reason}");
                self.finish(slot, -i64::from(libc::EIO));
            }
        }
    }

    fn is_flush(&self, slot: usize) -> bool {
        matches!(
            self.requests.get(slot).and_then(Option::as_ref),
            Some(Request {
                command: Command::Flush,
                ..
            })
        )
    }

    /// Sends pending requests in order while the session is up. A flush waits until
    /// everything before it has finished (the target may complete commands in any
    /// order), and what comes after waits for the flush.
    fn pump(&mut self) {
        while matches!(self.link, Link::Up(_)) && self.barrier.is_none() {
            let Some(&slot) = self.pending.front() else {
                return;
            };
            if self.requests.get(slot).and_then(Option::as_ref).is_none() {
                self.pending.pop_front();
                continue;
            }
            let flush = self.is_flush(slot);
            if flush && self.sending > 0 {
                return;
            }
            if self
                .requests
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|r| r.retry_at.is_some_and(|at| Instant::now() < at))
            {
                // Waiting out a BUSY keeps the order: nothing overtakes it.
                return;
            }
            self.pending.pop_front();
            self.send(slot);
            if flush && self.requests.get(slot).and_then(Option::as_ref).is_some() {
                self.barrier = Some(slot);
                return;
            }
        }
    }

    /// Turns libiscsi's outcomes into completions, retries, or a new session.
    fn collect(&mut self) {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        let Some(session) = self.session() else {
            self.outcomes = outcomes;
            return;
        };
        session.take_outcomes(&mut outcomes);
        let now = Instant::now();
        let mut broken = None;
        let mut refused = Vec::new();
        for &(ticket, status) in &outcomes {
            if ticket == libiscsi::LOGIN_TICKET {
                if status == libiscsi::SCSI_STATUS_GOOD {
                    if let Link::LoggingIn(..) = self.link {
                        let Link::LoggingIn(session, _) =
                            std::mem::replace(&mut self.link, Link::Down { retry_at: now })
                        else {
                            unreachable!("matched above")
                        };
                        tracing::info!("iSCSI disk {}: logged in again", self.url());
                        self.link = Link::Up(session);
                    }
                } else {
                    broken = Some("the target refused the login".to_owned());
                }
                continue;
            }
            let slot = ticket as usize;
            let Some(request) = self.requests.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            // A command with data to send (write, WRITE SAME, UNMAP's list) may still have
            // data PDUs queued when the target answers early; they refer to the task and
            // the guest's buffers, so such a command is let go only with its session.
            let sends_data = !matches!(request.command, Command::Read { .. } | Command::Flush);
            match status {
                libiscsi::SCSI_STATUS_GOOD => {
                    self.sending = self.sending.saturating_sub(1);
                    let bytes = request.bytes;
                    self.finish(slot, bytes);
                }
                libiscsi::SCSI_STATUS_BUSY | libiscsi::SCSI_STATUS_TASK_SET_FULL
                    if sends_data && now < request.deadline =>
                {
                    // Sent again on the new session.
                    broken = Some("the target was busy".to_owned());
                }
                libiscsi::SCSI_STATUS_BUSY | libiscsi::SCSI_STATUS_TASK_SET_FULL
                    if now < request.deadline =>
                {
                    // The target answered: the command is over and may be freed.
                    self.sending = self.sending.saturating_sub(1);
                    if let Some(task) = request.task.take() {
                        task.free();
                    }
                    request.retry_at = Some(now + BUSY_RETRY);
                    self.pending.push_front(slot);
                    if self.barrier == Some(slot) {
                        self.barrier = None;
                    }
                }
                libiscsi::SCSI_STATUS_CANCELLED
                | libiscsi::SCSI_STATUS_ERROR
                | libiscsi::SCSI_STATUS_TIMEOUT => {
                    // The connection is gone or stuck; libiscsi may still hold the
                    // command's data, so its task is freed only with the session.
                    broken = Some(match status {
                        libiscsi::SCSI_STATUS_TIMEOUT => "a command got no answer in time".into(),
                        _ => "the connection failed".into(),
                    });
                }
                _ => {
                    let reason = match &mut self.link {
                        Link::Up(session) => session.last_error(),
                        _ => String::new(),
                    };
                    tracing::warn!("iSCSI disk {}: a command failed: {reason}", self.url());
                    if sends_data {
                        refused.push(slot);
                        broken = Some("the target refused a write".to_owned());
                    } else {
                        self.sending = self.sending.saturating_sub(1);
                        self.finish(slot, -i64::from(libc::EIO));
                    }
                }
            }
        }
        outcomes.clear();
        self.outcomes = outcomes;
        if let Some(why) = broken {
            self.reset(&why);
            for slot in refused {
                self.pending.retain(|s| *s != slot);
                self.finish(slot, -i64::from(libc::EIO));
            }
            self.fail_overdue();
        }
        self.pump();
    }

    /// Fails requests past their deadline that libiscsi does not have (waiting for the
    /// target to come back, or behind a flush).
    fn fail_overdue(&mut self) {
        let now = Instant::now();
        let overdue: Vec<usize> = self
            .pending
            .iter()
            .copied()
            .filter(|&slot| {
                self.requests
                    .get(slot)
                    .and_then(Option::as_ref)
                    .is_some_and(|r| r.task.is_none() && now >= r.deadline)
            })
            .collect();
        if overdue.is_empty() {
            return;
        }
        tracing::warn!(
            "iSCSI disk {}: {} request(s) waited {} s for the target; failing them",
            self.url(),
            overdue.len(),
            self.lun.timeout.as_secs()
        );
        self.pending.retain(|slot| !overdue.contains(slot));
        for slot in overdue {
            self.finish(slot, -i64::from(libc::ETIMEDOUT));
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        match &mut self.link {
            Link::Up(session) => {
                // libiscsi's own timeouts run inside service.
                if let Err(reason) = session.service(0) {
                    self.reset(&format!("the connection failed: {reason}"));
                } else if self
                    .requests
                    .iter()
                    .flatten()
                    .any(|r| r.task.is_some() && now >= r.deadline + STUCK_GRACE)
                {
                    // libiscsi lost them (e.g. a logout the target asked for): starting
                    // over is the only safe way to let their buffers go.
                    self.reset("commands outlived their timeout");
                }
            }
            Link::LoggingIn(session, since) => {
                let since = *since;
                if let Err(reason) = session.service(0) {
                    self.reset(&format!("cannot log in: {reason}"));
                } else if now.duration_since(since) > LOGIN_TIMEOUT {
                    self.reset("the login takes too long");
                }
            }
            Link::Down { retry_at } if now >= *retry_at => {
                match Session::start_login(&self.lun.login_params(self.isid)) {
                    Ok(session) => self.link = Link::LoggingIn(session, now),
                    Err(e) => {
                        tracing::debug!("iSCSI disk {}: cannot log in yet: {e}", self.url());
                        self.link = Link::Down {
                            retry_at: now + RECONNECT_DELAY,
                        };
                    }
                }
            }
            Link::Down { .. } => {}
        }
        self.collect();
        self.fail_overdue();
        self.pump();
    }

    fn service(&mut self, revents: i16) {
        let failed = match self.session() {
            Some(session) => session.service(revents).err(),
            None => None,
        };
        self.collect();
        if let Some(reason) = failed {
            if !matches!(self.link, Link::Down { .. }) {
                self.reset(&format!("the connection failed: {reason}"));
            }
        }
    }

    fn in_engine(&self) -> usize {
        self.requests.len() - self.free.len()
    }

    /// A request that cannot be expressed in whole blocks fails (the guest sent it
    /// misaligned); the worker is woken to collect it.
    fn refuse(&mut self, user_data: u64) -> Result<(), DiskError> {
        self.completions.push_back(Completion {
            user_data,
            result: -i64::from(libc::EINVAL),
        });
        Ok(())
    }
}

impl AsyncIo for IscsiIo {
    fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        let ready = self.epoll.wait(0, &mut events).unwrap_or(0);
        for event in &events[..ready] {
            match event.data() {
                SOCKET_TOKEN => self.service(event.events() as i16),
                TICK_TOKEN => {
                    let _ = self.tick.wait();
                    self.on_tick();
                }
                _ => {
                    let _ = self.wake.read();
                }
            }
        }
        self.collect();
        self.rearm();
    }

    fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError> {
        let block = u64::from(self.block_size());
        let blocks_of = |offset: u64, len: u64| -> Option<(u64, u64)> {
            (offset.is_multiple_of(block) && len.is_multiple_of(block))
                .then_some((offset / block, len / block))
        };
        let (command, bytes) = match op {
            DiskOp::Read { offset, iovecs } | DiskOp::Write { offset, iovecs } => {
                let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
                let (Some((lba, _)), Ok(bytes)) =
                    (blocks_of(offset, len as u64), u32::try_from(len))
                else {
                    return self.refuse(user_data);
                };
                let (iovecs, count) = (iovecs.as_ptr(), iovecs.len());
                let command = if matches!(op, DiskOp::Read { .. }) {
                    Command::Read {
                        lba,
                        bytes,
                        iovecs,
                        count,
                    }
                } else {
                    Command::Write {
                        lba,
                        bytes,
                        iovecs,
                        count,
                    }
                };
                (command, i64::from(bytes))
            }
            DiskOp::Flush => (Command::Flush, 0),
            DiskOp::Discard { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
                let Some((lba, Ok(blocks))) =
                    blocks_of(offset, len).map(|(lba, n)| (lba, u32::try_from(n)))
                else {
                    return self.refuse(user_data);
                };
                let command = match op {
                    DiskOp::WriteZeroes { unmap, .. } => Command::WriteZeroes {
                        lba,
                        blocks,
                        unmap: unmap
                            && self.lun.can_discard()
                            && self.lun.geometry.write_same_unmap,
                    },
                    _ => Command::Unmap { lba, blocks },
                };
                (command, 0)
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.requests.push(None);
            self.requests.len() - 1
        });
        self.requests[slot] = Some(Request {
            user_data,
            seq: self.next_seq,
            command,
            bytes,
            deadline: Instant::now() + self.lun.timeout,
            task: None,
            retry_at: None,
        });
        self.next_seq += 1;
        self.pending.push_back(slot);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), DiskError> {
        self.pump();
        // Write what libiscsi queued now rather than after a round through epoll.
        let wants_out = match &self.link {
            Link::Up(session) => session.which_events() & libc::POLLOUT != 0,
            _ => false,
        };
        if wants_out {
            self.service(libc::POLLOUT);
        }
        self.rearm();
        if !self.completions.is_empty() {
            self.wake.write(1).map_err(DiskError::EventFd)?;
        }
        Ok(())
    }

    fn abort(&mut self) {
        if self.in_engine() == 0 {
            return;
        }
        self.reset("the disk is being stopped");
        self.link = Link::Down {
            retry_at: Instant::now() + Duration::from_secs(3600),
        };
        for slot in std::mem::take(&mut self.pending) {
            self.finish(slot, -i64::from(libc::EIO));
        }
    }

    fn next_completion(&mut self) -> Option<Completion> {
        if self.completions.is_empty() && self.in_engine() > 0 {
            // Busy-polling workers look here without an event: serve the socket.
            self.process_events();
        }
        self.completions.pop_front()
    }
}

impl Drop for IscsiIo {
    fn drop(&mut self) {
        // Dropping the session ends whatever it still has; only then are the tasks freed,
        // so libiscsi never touches a guest buffer after this.
        self.unwatch();
        self.link = Link::Down {
            retry_at: Instant::now(),
        };
        for request in self.requests.iter_mut().flatten() {
            if let Some(task) = request.task.take() {
                task.free();
            }
        }
    }
}

// SAFETY: the raw iovec pointers in queued commands point into guest memory or the
// worker's bounce buffers, which the worker keeps alive until the completion; they are
// only handed to libiscsi on the thread that owns this engine.
unsafe impl Send for IscsiIo {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_users_and_ipv6() {
        let u = IscsiUrl::parse("iscsi://198.18.0.1/iqn.2026-12.org.x:disk/3").unwrap();
        assert_eq!(
            u,
            IscsiUrl {
                user: None,
                host: "198.18.0.1".into(),
                port: 3260,
                target: "iqn.2026-12.org.x:disk".into(),
                lun: 3
            }
        );
        let u = IscsiUrl::parse("iscsi://alice@[::1]:13260/iqn.x:y/0").unwrap();
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.host, "[::1]");
        assert_eq!(u.port, 13260);
        assert_eq!(u.display(), "iscsi://alice@[::1]:13260/iqn.x:y/0");
        assert_eq!(u.identity(), "iscsi://[::1]:13260/iqn.x:y/0");
    }

    #[test]
    fn bad_urls_and_secrets_in_urls_are_refused_with_the_reason() {
        for (url, reason) in [
            ("http://h/iqn.x/1", "must start with iscsi://"),
            ("iscsi://h", "names no target"),
            ("iscsi://h/iqn.x", "names no LUN"),
            ("iscsi://h/iqn.x/lun", "LUN is not a number"),
            ("iscsi://h/iqn.x/99999", "LUN is not a number"),
            ("iscsi://h:port/iqn.x/1", "port is not a number"),
            ("iscsi://h:0/iqn.x/1", "port 0"),
            ("iscsi:///iqn.x/1", "host is empty"),
            ("iscsi://bob:pw@h/iqn.x/1", "use secret-file="),
            ("iscsi://bob%pw@h/iqn.x/1", "use secret-file="),
            ("iscsi://h//1", "target name is empty"),
        ] {
            let e = IscsiUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(reason), "{url}: {e}");
            assert!(!e.contains("pw@"), "a password shown: {e}");
        }
        let e = IscsiUrl::parse("iscsi://bob:hunter2@h/x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'iscsi://bob:…@h/x'") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn chap_needs_a_private_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let source = |url: &str, file: Option<&PathBuf>| IscsiSource {
            url: url.into(),
            initiator: None,
            secret_file: file.cloned(),
            timeout_secs: 60,
        };
        let e = IscsiLun::connect(&source("iscsi://bob@127.0.0.1:1/iqn.x:y/1", Some(&secret)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("readable by others (mode 644)"), "{e}");
        let e = IscsiLun::connect(&source("iscsi://bob@127.0.0.1:1/iqn.x:y/1", None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs secret-file="), "{e}");
        let e = IscsiLun::connect(&source("iscsi://127.0.0.1:1/iqn.x:y/1", Some(&secret)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("names no CHAP user"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret("u", &secret).unwrap(), "s3cret");
        std::fs::write(&secret, "\n").unwrap();
        let e = read_secret("u", &secret).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}
