//! Download an image from an `http://`, `https://` or `file://` location, decompressing
//! gz, bz2 or xz on the fly and verifying the size and every expected checksum of the
//! decompressed content while streaming. On any failure the partial file is deleted.
//! Downloads over HTTP resume after a lost connection and across calls (see [`download`]).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checksum::{Checksums, MultiHasher};
use crate::error::{Error, Result};
use crate::metadata::{Compression, ImageFormat, Metadata};
use crate::ops::decompressor;

/// How long a download may wait on its server. Without them one server that stops
/// answering would hold every VM waiting on its image for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting, and then the answer's status and headers.
    pub response: Duration,
    /// The body of an image of known size may take this long plus its size at
    /// `min_bytes_per_s`; then the attempt fails (and resumes, as after a lost connection).
    pub body_floor: Duration,
    pub min_bytes_per_s: u64,
    /// The body of a download of unknown size.
    pub unknown_body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            response: Duration::from_secs(60),
            body_floor: Duration::from_secs(300),
            min_bytes_per_s: 128 << 10,
            unknown_body: Duration::from_secs(6 * 3600),
        }
    }
}

impl Timeouts {
    fn body(&self, bytes: Option<u64>) -> Duration {
        match bytes {
            Some(bytes) => {
                self.body_floor + Duration::from_secs(bytes / self.min_bytes_per_s.max(1))
            }
            None => self.unknown_body,
        }
    }
}

/// What the downloaded (decompressed) image must be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub bytes: Option<u64>,
    pub checksums: Checksums,
    /// Compression at the location; `None` = detect from the magic bytes.
    pub compression: Option<Compression>,
}

impl Expected {
    /// Expectations from a metadata entry.
    pub fn from_metadata(m: &Metadata) -> Expected {
        Expected {
            bytes: Some(m.bytes),
            checksums: m.checksums.clone(),
            compression: m.compression,
        }
    }
}

/// A progress event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the location (compressed) processed so far, from the network or from an
    /// earlier partial download.
    pub received: u64,
    /// Size at the location, if announced.
    pub total: Option<u64>,
    /// Decompressed bytes written.
    pub written: u64,
    /// Bytes of the location (among `received`) that were not fetched again thanks to
    /// resuming: kept from an earlier attempt, or received before a lost connection.
    pub resumed: u64,
}

/// Result of a successful download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    pub checksums: Checksums,
    pub compression: Compression,
    pub format: ImageFormat,
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

/// Open a location for reading: (reader, announced length).
pub fn open_location(url: &str) -> Result<(Box<dyn Read + Send>, Option<u64>)> {
    open_location_with(url, &Timeouts::default(), None)
}

fn open_location_with(
    url: &str,
    timeouts: &Timeouts,
    bytes: Option<u64>,
) -> Result<(Box<dyn Read + Send>, Option<u64>)> {
    if let Some(path) = url.strip_prefix("file://") {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().ok().map(|m| m.len());
        return Ok((Box::new(f), len));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let agent = http_agent(url, timeouts, bytes);
        let resp = agent.get(url).call().map_err(|e| Error::Transport {
            url: url.into(),
            reason: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(Error::HttpStatus {
                url: url.into(),
                status,
            });
        }
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        return Ok((Box::new(resp.into_body().into_reader()), len));
    }
    Err(Error::UnsupportedLocation(url.into()))
}

/// The temporary file holding the decompressed image while downloading to `dest`.
pub fn partial_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".part")
}

/// The file keeping the bytes received so far from an `http(s)://` location, as they are
/// at the location (still compressed), so that an interrupted download resumes there.
pub fn resume_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".download")
}

/// The file recording which location and which version of it [`resume_path`] holds.
pub fn resume_meta_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".download.meta")
}

fn with_suffix(dest: &Path, suffix: &str) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// How many times a lost connection is resumed (or a download restarted) before giving up.
pub const MAX_RETRIES: u32 = 3;

/// Download `url` to `dest`, decompressing and verifying as it streams. The data go to
/// `dest.part`, renamed to `dest` only when size and checksums agree; any error removes
/// the partial file.
///
/// From `http(s)://` locations the bytes received are also kept in [`resume_path`]: a
/// connection lost mid-transfer is resumed with a `Range` request (up to [`MAX_RETRIES`]
/// times), and a partial download left by an earlier call or process is continued. A
/// server that ignores `Range`, answers `416`, or whose `ETag`/`Last-Modified` changed
/// makes the download start over. The kept bytes are removed on success and on any
/// decompression, size or checksum failure; they stay only after a transport failure.
pub fn download(
    url: &str,
    dest: &Path,
    expected: &Expected,
    progress: &mut dyn FnMut(Progress),
) -> Result<Downloaded> {
    download_with(url, dest, expected, &Timeouts::default(), progress)
}

/// [`download`] with its own limits on how long the server may take.
pub fn download_with(
    url: &str,
    dest: &Path,
    expected: &Expected,
    timeouts: &Timeouts,
    progress: &mut dyn FnMut(Progress),
) -> Result<Downloaded> {
    let part = partial_path(dest);
    let r = if url.starts_with("http://") || url.starts_with("https://") {
        download_http(url, dest, &part, expected, timeouts, progress)
    } else {
        let (raw, total) = open_location_with(url, timeouts, expected.bytes)?;
        let shared = Arc::new(Shared::new(total));
        let counting = Counting {
            inner: raw,
            shared: shared.clone(),
        };
        decode(url, Box::new(counting), &part, expected, &shared, progress)
    };
    match r {
        Ok(mut d) => {
            fs::rename(&part, dest).map_err(|e| {
                let _ = fs::remove_file(&part);
                Error::io(dest, e)
            })?;
            d.path = dest.to_path_buf();
            tracing::info!(url, dest = %dest.display(), bytes = d.bytes, "downloaded image");
            Ok(d)
        }
        Err(e) => {
            let _ = fs::remove_file(&part);
            tracing::warn!(url, error = %e, "download failed; partial file removed");
            Err(e)
        }
    }
}

/// Counters shared between the byte source and the decoding loop.
struct Shared {
    /// Offset in the location of the next byte handed to the decompressor.
    pos: AtomicU64,
    /// Size at the location; `u64::MAX` = unknown.
    total: AtomicU64,
    /// Bytes of the location not fetched again thanks to resuming.
    resumed: AtomicU64,
    /// Reconnections left.
    budget: AtomicU32,
    /// Why the source stopped, when it was not the data's fault.
    interrupt: Mutex<Option<Interrupt>>,
}

enum Interrupt {
    /// Start over from byte 0, with this answer if the server already sent it.
    Restart(Option<Opened>),
    /// Give up with this error.
    Fail(Error),
}

impl Shared {
    fn new(total: Option<u64>) -> Shared {
        Shared {
            pos: AtomicU64::new(0),
            total: AtomicU64::new(total.unwrap_or(u64::MAX)),
            resumed: AtomicU64::new(0),
            budget: AtomicU32::new(MAX_RETRIES),
            interrupt: Mutex::new(None),
        }
    }

    fn total(&self) -> Option<u64> {
        Some(self.total.load(Relaxed)).filter(|t| *t != u64::MAX)
    }

    fn stop(&self, why: Interrupt) -> std::io::Error {
        let msg = match &why {
            Interrupt::Restart(_) => "download restarts from the beginning".to_string(),
            Interrupt::Fail(e) => e.to_string(),
        };
        *self.interrupt.lock().expect("interrupt lock") = Some(why);
        std::io::Error::other(msg)
    }

    fn take_interrupt(&self) -> Option<Interrupt> {
        self.interrupt.lock().expect("interrupt lock").take()
    }
}

struct Counting<R> {
    inner: R,
    shared: Arc<Shared>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.shared.pos.fetch_add(n as u64, Relaxed);
        Ok(n)
    }
}

/// What identifies one version of a resource, for `If-Range`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validator {
    fn from_headers(h: &ureq::http::HeaderMap) -> Validator {
        let get = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_string())
        };
        Validator {
            etag: get("etag"),
            last_modified: get("last-modified"),
        }
    }

    /// The `If-Range` value: a strong ETag, else the modification date.
    fn if_range(&self) -> Option<&str> {
        self.etag
            .as_deref()
            .filter(|e| !e.starts_with("W/"))
            .or(self.last_modified.as_deref())
    }

    /// Whether `other` (from a later response) may be the same version.
    fn same_version(&self, other: &Validator) -> bool {
        match (&self.etag, &other.etag) {
            (Some(a), Some(b)) => return a == b,
            (Some(_), None) | (None, Some(_)) => return false,
            (None, None) => {}
        }
        match (&self.last_modified, &other.last_modified) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

/// What a partially downloaded location is, as saved beside [`resume_path`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResumeMeta {
    url: String,
    validator: Validator,
}

/// A response whose body is being (or about to be) read.
struct Opened {
    body: Box<dyn Read + Send>,
    /// Offset in the resource of the body's first byte.
    start: u64,
    total: Option<u64>,
    validator: Validator,
}

enum Answer {
    Opened(Opened),
    /// `416`; the resource's size if the server told it.
    NotSatisfiable(Option<u64>),
}

fn http_agent(url: &str, timeouts: &Timeouts, body_bytes: Option<u64>) -> ureq::Agent {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or("");
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let mut cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(timeouts.response))
        .timeout_recv_response(Some(timeouts.response))
        .timeout_recv_body(Some(timeouts.body(body_bytes)));
    if is_loopback(host) {
        cfg = cfg.proxy(None);
    }
    ureq::Agent::new_with_config(cfg.build())
}

/// `Content-Range: bytes START-END/TOTAL` (or `bytes */TOTAL`): (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(Option<u64>, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let start = match range.trim() {
        "*" => None,
        r => Some(r.split_once('-')?.0.trim().parse().ok()?),
    };
    Some((start, total))
}

/// GET `url`, from byte `from` on when `from > 0` (with `If-Range: if_range` when given).
fn request(agent: &ureq::Agent, url: &str, from: u64, if_range: Option<&str>) -> Result<Answer> {
    let mut req = agent.get(url);
    if from > 0 {
        req = req.header("Range", format!("bytes={from}-"));
        if let Some(v) = if_range {
            req = req.header("If-Range", v);
        }
    }
    let resp = req.call().map_err(|e| Error::Transport {
        url: url.into(),
        reason: e.to_string(),
    })?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_range = header("content-range").and_then(|v| parse_content_range(&v));
    let validator = Validator::from_headers(resp.headers());
    match status {
        416 => Ok(Answer::NotSatisfiable(content_range.and_then(|c| c.1))),
        206 if from > 0 => {
            let Some((Some(start), total)) = content_range else {
                return Err(Error::Transport {
                    url: url.into(),
                    reason: format!(
                        "206 answer with an invalid Content-Range '{}'",
                        header("content-range").unwrap_or_default()
                    ),
                });
            };
            Ok(Answer::Opened(Opened {
                body: Box::new(resp.into_body().into_reader()),
                start,
                total,
                validator,
            }))
        }
        200..=299 => {
            let total = header("content-length").and_then(|v| v.trim().parse().ok());
            Ok(Answer::Opened(Opened {
                body: Box::new(resp.into_body().into_reader()),
                start: 0,
                total,
                validator,
            }))
        }
        _ => Err(Error::HttpStatus {
            url: url.into(),
            status,
        }),
    }
}

/// The bytes of an `http(s)://` location: first those kept from an earlier attempt, then
/// the network, saving what arrives and resuming after a lost connection.
struct Resuming {
    url: String,
    agent: ureq::Agent,
    validator: Validator,
    /// Whether a lost connection may be resumed with `Range` (else it restarts).
    can_resume: bool,
    local: Option<std::io::Take<File>>,
    body: Box<dyn Read + Send>,
    save: File,
    save_path: PathBuf,
    pos: u64,
    /// The most the location may send for the image: compressed data is barely larger
    /// than the image at worst. Without a length of its own, a stream of empty deflate
    /// blocks would otherwise fill the disk until the body's deadline (hours).
    limit: Option<(u64, u64)>,
    shared: Arc<Shared>,
}

/// (most bytes a location may send, the image's size) for an image of `bytes` bytes.
fn transfer_limit(bytes: Option<u64>) -> Option<(u64, u64)> {
    bytes.map(|b| (b.saturating_add(b / 16).saturating_add(1 << 20), b))
}

impl Resuming {
    /// Reconnect after a lost connection, continuing at `self.pos`.
    fn reconnect(&mut self, mut cause: String) -> std::io::Result<()> {
        loop {
            let left = self.shared.budget.load(Relaxed);
            if left == 0 {
                return Err(self.shared.stop(Interrupt::Fail(Error::Transport {
                    url: self.url.clone(),
                    reason: format!("{cause} (gave up after {MAX_RETRIES} retries)"),
                })));
            }
            self.shared.budget.store(left - 1, Relaxed);
            let attempt = MAX_RETRIES - left + 1;
            tracing::warn!(url = %self.url, at = self.pos, %cause, attempt, "connection lost; resuming");
            // Drop the old connection before opening a new one.
            self.body = Box::new(std::io::empty());
            std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
            let from = if self.can_resume { self.pos } else { 0 };
            match request(&self.agent, &self.url, from, self.validator.if_range()) {
                Ok(Answer::Opened(o))
                    if from > 0 && o.start == from && self.validator.same_version(&o.validator) =>
                {
                    tracing::info!(url = %self.url, from, "download resumed");
                    self.shared.resumed.fetch_add(from, Relaxed);
                    if let Some(t) = o.total {
                        self.shared.total.store(t, Relaxed);
                    }
                    self.body = o.body;
                    return Ok(());
                }
                Ok(Answer::Opened(o)) if o.start == 0 => {
                    tracing::info!(url = %self.url, "the server sent the whole resource; restarting");
                    return Err(self.shared.stop(Interrupt::Restart(Some(o))));
                }
                Ok(_) => {
                    tracing::info!(url = %self.url, "the resource cannot be resumed; restarting");
                    return Err(self.shared.stop(Interrupt::Restart(None)));
                }
                Err(Error::Transport { reason, .. }) => cause = reason,
                Err(e) => return Err(self.shared.stop(Interrupt::Fail(e))),
            }
        }
    }
}

impl Read for Resuming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(local) = &mut self.local {
            let n = local.read(buf).map_err(|e| {
                self.shared
                    .stop(Interrupt::Fail(Error::io(&self.save_path, e)))
            })?;
            if n > 0 {
                self.pos += n as u64;
                self.shared.pos.store(self.pos, Relaxed);
                return Ok(n);
            }
            self.local = None;
        }
        loop {
            let cause = match self.body.read(buf) {
                Ok(0) => match self.shared.total() {
                    Some(t) if self.pos < t => {
                        format!("connection closed at byte {} of {t}", self.pos)
                    }
                    _ => return Ok(0),
                },
                Ok(n) => {
                    if let Some((limit, image_bytes)) = self.limit {
                        if self.pos + n as u64 > limit {
                            return Err(self.shared.stop(Interrupt::Fail(Error::TooMuchData {
                                url: self.url.clone(),
                                limit,
                                image_bytes,
                            })));
                        }
                    }
                    self.save.write_all(&buf[..n]).map_err(|e| {
                        self.shared
                            .stop(Interrupt::Fail(Error::io(&self.save_path, e)))
                    })?;
                    self.pos += n as u64;
                    self.shared.pos.store(self.pos, Relaxed);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => e.to_string(),
            };
            self.reconnect(cause)?;
        }
    }
}

/// The kept bytes of an earlier attempt at `url`, if they can be resumed: (length,
/// validator). Kept bytes of another location, or unusable ones, are removed.
fn earlier_attempt(url: &str, dest: &Path, expected: &Expected) -> Option<(u64, Validator)> {
    let saved = resume_path(dest);
    let meta_path = resume_meta_path(dest);
    let meta: Option<ResumeMeta> = fs::read(&meta_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let len = fs::metadata(&saved).map(|m| m.len()).unwrap_or(0);
    match meta {
        Some(m)
            if m.url == url
                && len > 0
                && (m.validator.if_range().is_some() || !expected.checksums.0.is_empty()) =>
        {
            Some((len, m.validator))
        }
        _ => {
            discard_kept(dest);
            None
        }
    }
}

fn discard_kept(dest: &Path) {
    let _ = fs::remove_file(resume_path(dest));
    let _ = fs::remove_file(resume_meta_path(dest));
}

fn download_http(
    url: &str,
    dest: &Path,
    part: &Path,
    expected: &Expected,
    timeouts: &Timeouts,
    progress: &mut dyn FnMut(Progress),
) -> Result<Downloaded> {
    let agent = http_agent(url, timeouts, expected.bytes);
    let saved = resume_path(dest);
    let meta_path = resume_meta_path(dest);
    let shared = Arc::new(Shared::new(None));
    // (answer, bytes kept from before that precede its body)
    let mut next: Option<(Opened, u64)> = None;
    if let Some((len, validator)) = earlier_attempt(url, dest, expected) {
        match request(&agent, url, len, validator.if_range()) {
            Ok(Answer::Opened(o)) if o.start == len && validator.same_version(&o.validator) => {
                tracing::info!(url, from = len, "resuming an earlier partial download");
                next = Some((o, len));
            }
            Ok(Answer::Opened(o)) if o.start == 0 => next = Some((o, 0)),
            Ok(Answer::NotSatisfiable(Some(total))) if total == len => {
                tracing::info!(url, "an earlier partial download is complete");
                let o = Opened {
                    body: Box::new(std::io::empty()),
                    start: len,
                    total: Some(total),
                    validator,
                };
                next = Some((o, len));
            }
            Ok(_) => {}
            Err(e) => {
                if !matches!(e, Error::Transport { .. }) {
                    discard_kept(dest);
                }
                return Err(e);
            }
        }
        if next.as_ref().is_none_or(|(_, kept)| *kept == 0) {
            tracing::info!(
                url,
                "an earlier partial download cannot be resumed; starting over"
            );
            discard_kept(dest);
        }
    }
    loop {
        let (opened, kept) = match next.take() {
            Some(x) => x,
            None => match request(&agent, url, 0, None).inspect_err(|e| {
                if !matches!(e, Error::Transport { .. }) {
                    discard_kept(dest);
                }
            })? {
                Answer::Opened(o) => (o, 0),
                Answer::NotSatisfiable(_) => {
                    return Err(Error::HttpStatus {
                        url: url.into(),
                        status: 416,
                    })
                }
            },
        };
        let meta = ResumeMeta {
            url: url.to_string(),
            validator: opened.validator.clone(),
        };
        let meta_json = serde_json::to_vec(&meta).expect("plain struct serialises");
        fs::write(&meta_path, meta_json).map_err(|e| Error::io(&meta_path, e))?;
        let save = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&saved)
            .and_then(|mut f| {
                f.set_len(kept)?;
                f.seek(SeekFrom::End(0))?;
                Ok(f)
            })
            .map_err(|e| Error::io(&saved, e))?;
        let local = if kept > 0 {
            Some(
                File::open(&saved)
                    .map_err(|e| Error::io(&saved, e))?
                    .take(kept),
            )
        } else {
            None
        };
        shared.pos.store(0, Relaxed);
        shared
            .total
            .store(opened.total.unwrap_or(u64::MAX), Relaxed);
        shared.resumed.fetch_add(kept, Relaxed);
        let can_resume = opened.validator.if_range().is_some() || !expected.checksums.0.is_empty();
        let source = Resuming {
            url: url.to_string(),
            agent: agent.clone(),
            validator: opened.validator,
            can_resume,
            local,
            body: opened.body,
            save,
            save_path: saved.clone(),
            pos: 0,
            limit: transfer_limit(expected.bytes),
            shared: shared.clone(),
        };
        let result = decode(url, Box::new(source), part, expected, &shared, progress);
        match (result, shared.take_interrupt()) {
            (Ok(d), _) => {
                discard_kept(dest);
                return Ok(d);
            }
            (Err(_), Some(Interrupt::Restart(o))) => {
                next = o.map(|o| (o, 0));
                shared.resumed.store(0, Relaxed);
            }
            (Err(_), Some(Interrupt::Fail(e))) => {
                if !matches!(e, Error::Transport { .. }) {
                    discard_kept(dest);
                }
                return Err(e);
            }
            (Err(e), None) => {
                discard_kept(dest);
                return Err(e);
            }
        }
    }
}

/// Decompress `source` into `part`, hashing and checking the size as it streams.
fn decode(
    url: &str,
    source: Box<dyn Read + Send>,
    part: &Path,
    expected: &Expected,
    shared: &Shared,
    progress: &mut dyn FnMut(Progress),
) -> Result<Downloaded> {
    let mut buffered = BufReader::with_capacity(256 * 1024, source);
    let transport = |e: std::io::Error| Error::Transport {
        url: url.into(),
        reason: e.to_string(),
    };
    let head = buffered.fill_buf().map_err(transport)?;
    let compression = expected
        .compression
        .unwrap_or_else(|| Compression::detect(head));
    let mut reader = decompressor(buffered, compression);
    let mut out = File::create(part).map_err(|e| Error::io(part, e))?;
    let mut hasher = MultiHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut format = None;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(if compression == Compression::None {
                    transport(e)
                } else {
                    Error::Decompression {
                        url: url.into(),
                        compression: compression.to_string(),
                        reason: e.to_string(),
                    }
                })
            }
        };
        if format.is_none() {
            format = Some(ImageFormat::detect(&buf[..n]));
        }
        hasher.update(&buf[..n]);
        if let Some(want) = expected.bytes {
            if hasher.bytes() > want {
                return Err(Error::SizeMismatch {
                    url: url.into(),
                    expected: want,
                    actual: hasher.bytes(),
                });
            }
        }
        out.write_all(&buf[..n]).map_err(|e| Error::io(part, e))?;
        progress(Progress {
            received: shared.pos.load(Relaxed),
            total: shared.total(),
            written: hasher.bytes(),
            resumed: shared.resumed.load(Relaxed),
        });
    }
    out.sync_all().map_err(|e| Error::io(part, e))?;
    let (bytes, checksums) = hasher.finish();
    if let Some(want) = expected.bytes {
        if bytes != want {
            return Err(Error::SizeMismatch {
                url: url.into(),
                expected: want,
                actual: bytes,
            });
        }
    }
    checksums.verify_against(&expected.checksums, url)?;
    Ok(Downloaded {
        path: part.to_path_buf(),
        bytes,
        checksums,
        compression,
        format: format.unwrap_or(ImageFormat::Raw),
    })
}
