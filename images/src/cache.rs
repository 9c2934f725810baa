//! Host image cache: images stored by identifier, each fetched once (concurrent requests
//! for one image share a single download and verification), reused while intact, and
//! refetched when the cached copy is found corrupt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use chrono::Utc;

use crate::boot::{self, BootInfo};
use crate::checksum::hash_reader;
use crate::download::{self, Expected, Progress};
use crate::error::{Error, Result};
use crate::metadata::Metadata;
use crate::policy::Policy;

type Outcome = std::result::Result<PathBuf, Arc<Error>>;

#[derive(Default)]
struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

/// The image cache of one host.
pub struct ImageCache {
    dir: PathBuf,
    policy: Policy,
    inflight: Mutex<HashMap<String, Arc<Flight>>>,
    /// Files verified in this process: identifier -> (length, modification time).
    verified: Mutex<HashMap<String, (u64, SystemTime)>>,
    /// Serialises kernel/initrd extraction.
    boot_lock: Mutex<()>,
    /// Whether `file://` locations in metadata are followed.
    file_locations: bool,
    timeouts: download::Timeouts,
}

impl ImageCache {
    /// A cache in `dir` (created if missing) applying `policy`.
    pub fn new(dir: impl Into<PathBuf>, policy: Policy) -> Result<ImageCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(ImageCache {
            dir,
            policy,
            inflight: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            boot_lock: Mutex::new(()),
            file_locations: false,
            timeouts: download::Timeouts::default(),
        })
    }

    /// Follow `file://` locations in metadata entries too. Off by default: an entry's
    /// endorser, not the site, chooses its locations, and a `file://` one would have the
    /// host copy any file it can read into a VM's disk.
    pub fn allowing_file_locations(mut self, allow: bool) -> Self {
        self.file_locations = allow;
        self
    }

    /// How long downloads may wait on a server (see [`download::Timeouts`]).
    pub fn with_timeouts(mut self, timeouts: download::Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Where the image with this entry is (or would be) stored.
    pub fn path_of(&self, m: &Metadata) -> PathBuf {
        self.dir.join(m.identifier.as_str())
    }

    /// The local path of the image of `m`, downloading it if it is not cached or its
    /// cached copy is corrupt. Refuses images that the site policy refuses, and expired or
    /// deprecated ones.
    pub fn get(&self, m: &Metadata, progress: &mut dyn FnMut(Progress)) -> Result<PathBuf> {
        self.policy.check(m)?;
        m.check_usable(Utc::now())?;
        let id = m.identifier.to_string();
        let (flight, leader) = {
            let mut map = self.inflight.lock().expect("cache lock");
            match map.get(&id) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    map.insert(id.clone(), f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            tracing::debug!(identifier = %id, "waiting for the download in progress");
            let mut done = flight.done.lock().expect("flight lock");
            while done.is_none() {
                done = flight.cv.wait(done).expect("flight lock");
            }
            return match done.as_ref().expect("set") {
                Ok(p) => Ok(p.clone()),
                Err(e) => Err(Error::SharedDownloadFailed {
                    identifier: id,
                    source: e.clone(),
                }),
            };
        }
        let result = self.fetch(m, progress);
        // Out of the map first: no request joins from here, so the ones sharing this
        // download are all counted.
        self.inflight.lock().expect("cache lock").remove(&id);
        let shared = Arc::strong_count(&flight) > 1;
        let (outcome, result) = match result {
            Ok(p) => (Ok(p.clone()), Ok(p)),
            // Errors are not Clone: the one error goes to every request, each seeing it
            // as its source.
            Err(e) if shared => {
                let e = Arc::new(e);
                let own = Error::SharedDownloadFailed {
                    identifier: id,
                    source: e.clone(),
                };
                (Err(e), Err(own))
            }
            Err(e) => return Err(e),
        };
        *flight.done.lock().expect("flight lock") = Some(outcome);
        flight.cv.notify_all();
        result
    }

    /// The image of `m` (fetched as by [`ImageCache::get`]) prepared for direct kernel boot:
    /// its kernel and initrd are extracted beside it (`<id>.vmlinuz`, `<id>.initrd`) and the
    /// [`BootInfo`] (with the root filesystem UUID) is stored as `<id>.boot.json`. Prepared
    /// files are reused while intact. An image with no usable filesystem or no kernel gives
    /// [`Error::NotBootable`] naming the reason (the image itself stays cached).
    pub fn prepare_boot(
        &self,
        m: &Metadata,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(PathBuf, BootInfo)> {
        let image = self.get(m, progress)?;
        let stem = m.identifier.as_str();
        let _guard = self.boot_lock.lock().expect("boot lock");
        if let Some(info) = boot::load_prepared(&self.dir, stem) {
            tracing::debug!(identifier = %m.identifier, "boot files already prepared");
            return Ok((image, info));
        }
        let info = boot::prepare(&image, &self.dir, stem).map_err(|e| match e {
            Error::NotBootable { reason, .. } => Error::NotBootable {
                image: m.identifier.to_string(),
                reason,
            },
            other => other,
        })?;
        Ok((image, info))
    }

    fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
        let md = std::fs::metadata(path).ok()?;
        Some((md.len(), md.modified().ok()?))
    }

    /// Whether the cached file at `path` matches the entry (size and every checksum).
    fn intact(&self, m: &Metadata, path: &Path) -> Result<bool> {
        let id = m.identifier.to_string();
        let Some(stamp) = Self::stamp(path) else {
            return Ok(false);
        };
        if self.verified.lock().expect("lock").get(&id) == Some(&stamp) {
            return Ok(true);
        }
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let (bytes, sums) = hash_reader(f).map_err(|e| Error::io(path, e))?;
        let ok = bytes == m.bytes && sums.verify_against(&m.checksums, "cache").is_ok();
        if ok {
            self.verified.lock().expect("lock").insert(id, stamp);
        }
        Ok(ok)
    }

    fn refuse_hazards(m: &Metadata, path: &Path) -> Result<()> {
        use std::io::Read;
        let mut header = Vec::with_capacity(512);
        std::fs::File::open(path)
            .and_then(|f| f.take(512).read_to_end(&mut header))
            .map_err(|e| Error::io(path, e))?;
        match crate::metadata::ImageFormat::qcow2_hazard(&header) {
            Some(reason) => Err(Error::UnsafeImage {
                identifier: m.identifier.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn fetch(&self, m: &Metadata, progress: &mut dyn FnMut(Progress)) -> Result<PathBuf> {
        let path = self.path_of(m);
        if path.exists() {
            if self.intact(m, &path)? {
                // Also on a hit: a crash between a download's rename and its check below
                // leaves an image here that was never looked at.
                if let Err(e) = Self::refuse_hazards(m, &path) {
                    self.verified
                        .lock()
                        .expect("lock")
                        .remove(m.identifier.as_str());
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                tracing::debug!(identifier = %m.identifier, "cache hit");
                return Ok(path);
            }
            tracing::warn!(identifier = %m.identifier, path = %path.display(), "corrupt cache entry; refetching");
            self.verified
                .lock()
                .expect("lock")
                .remove(m.identifier.as_str());
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        let expected = Expected::from_metadata(m);
        let mut reasons = Vec::new();
        let mut last_err = None;
        for loc in &m.locations {
            if loc.starts_with("file://") && !self.file_locations {
                reasons.push(format!(
                    "{loc}: file:// locations are not followed on this host (the site enables them with allow_file_locations)"
                ));
                continue;
            }
            if !(loc.starts_with("http://")
                || loc.starts_with("https://")
                || loc.starts_with("file://"))
            {
                reasons.push(format!("{loc}: unsupported location"));
                continue;
            }
            match download::download_with(loc, &path, &expected, &self.timeouts, progress) {
                Ok(d) => {
                    // Checked before the image is served: its checksums only prove it is
                    // what the endorser signed, not that it is safe to open on this host.
                    if let Err(e) = Self::refuse_hazards(m, &d.path) {
                        let _ = std::fs::remove_file(&d.path);
                        return Err(e);
                    }
                    if let Some(stamp) = Self::stamp(&d.path) {
                        self.verified
                            .lock()
                            .expect("lock")
                            .insert(m.identifier.to_string(), stamp);
                    }
                    return Ok(d.path);
                }
                Err(e) => {
                    reasons.push(e.to_string());
                    last_err = Some(e);
                }
            }
        }
        match (reasons.len(), last_err) {
            (1, Some(e)) => Err(e),
            _ => Err(Error::NoUsableLocation {
                identifier: m.identifier.to_string(),
                reasons: if reasons.is_empty() {
                    "the entry has no location".into()
                } else {
                    reasons.join("; ")
                },
            }),
        }
    }
}
