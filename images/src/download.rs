//! Download an image from an `http://`, `https://` or `file://` location, decompressing
//! gz, bz2 or xz on the fly and verifying the size and every expected checksum of the
//! decompressed content while streaming. On any failure the partial file is deleted.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checksum::{Checksums, MultiHasher};
use crate::error::{Error, Result};
use crate::metadata::{Compression, ImageFormat, Metadata};
use crate::ops::decompressor;

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
    /// Bytes received from the location (compressed).
    pub received: u64,
    /// Size at the location, if announced.
    pub total: Option<u64>,
    /// Decompressed bytes written.
    pub written: u64,
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

struct Counting<R> {
    inner: R,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
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
    if let Some(path) = url.strip_prefix("file://") {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().ok().map(|m| m.len());
        return Ok((Box::new(f), len));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let rest = url.split_once("://").map(|x| x.1).unwrap_or("");
        let authority = rest.split('/').next().unwrap_or("");
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => authority,
        };
        let mut cfg = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_body(None);
        if is_loopback(host) {
            cfg = cfg.proxy(None);
        }
        let agent = ureq::Agent::new_with_config(cfg.build());
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

/// The temporary file used while downloading to `dest`.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// Download `url` to `dest`, decompressing and verifying as it streams. The data go to
/// `dest.part`, renamed to `dest` only when size and checksums agree; any error removes
/// the partial file.
pub fn download(
    url: &str,
    dest: &Path,
    expected: &Expected,
    progress: &mut dyn FnMut(Progress),
) -> Result<Downloaded> {
    let part = partial_path(dest);
    let r = download_to(url, &part, expected, progress);
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

fn download_to(
    url: &str,
    part: &Path,
    expected: &Expected,
    progress: &mut dyn FnMut(Progress),
) -> Result<Downloaded> {
    let (raw, total) = open_location(url)?;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting = Counting {
        inner: raw,
        count: received.clone(),
    };
    let mut buffered = BufReader::with_capacity(256 * 1024, counting);
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
            received: received.load(std::sync::atomic::Ordering::Relaxed),
            total,
            written: hasher.bytes(),
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
