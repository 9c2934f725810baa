//! The host's image cache as the API shows it: what is cached, prefetches started ahead of
//! the VMs that will need them (one download per image however many ask; progress while
//! it runs), and removal of images no VM uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use stratus_images::cache::ImageCache;
use stratus_images::{Identifier, Metadata};

use crate::api::types::{ImageInfo, ImageState};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("'{0}' is not a Marketplace image identifier")]
    BadIdentifier(String),
    #[error("no image {0} in this host's cache")]
    NotFound(String),
    #[error("image {id} is used by VM(s) {vms}; delete them first")]
    InUse { id: String, vms: String },
    #[error("image {0} is being downloaded")]
    Downloading(String),
    #[error("this agent has no marketplace_endpoint to look identifiers up in; post the entry or its URL")]
    NoMarketplace,
    #[error("'{url}' is not a URL a Marketplace entry can be fetched from: {source}")]
    EntryUrl {
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("the Marketplace at {url} has no such entry")]
    NoEntry { url: String },
    #[error("cannot fetch the Marketplace entry from {url}: {reason}")]
    Entry { url: String, reason: String },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] stratus_images::Error),
}

/// A prefetch this agent started, until the next restart.
#[derive(Clone, Debug)]
struct Prefetch {
    state: ImageState,
    bytes: u64,
    written: u64,
    error: Option<String>,
}

pub struct Images {
    cache: Arc<ImageCache>,
    dir: PathBuf,
    prefetches: Mutex<BTreeMap<String, Prefetch>>,
}

/// Files the cache keeps for an image besides the image itself.
const BESIDE: &[&str] = &["vmlinuz", "initrd", "boot.json"];

fn valid(id: &str) -> Result<(), ImageError> {
    id.parse::<Identifier>()
        .map(|_| ())
        .map_err(|_| ImageError::BadIdentifier(id.to_owned()))
}

impl Images {
    pub fn new(cache: Arc<ImageCache>, dir: &Path) -> Images {
        Images {
            cache,
            dir: dir.to_owned(),
            prefetches: Mutex::new(BTreeMap::new()),
        }
    }

    fn prefetches(&self) -> MutexGuard<'_, BTreeMap<String, Prefetch>> {
        self.prefetches.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_size(&self, id: &str) -> Option<u64> {
        std::fs::metadata(self.dir.join(id))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// One image: a prefetch under way (or failed), or a cached file.
    pub fn info(&self, id: &str, used_by: Vec<String>) -> Result<ImageInfo, ImageError> {
        valid(id)?;
        let prefetch = self.prefetches().get(id).cloned();
        match (prefetch, self.cached_size(id)) {
            (Some(p), _) if p.state != ImageState::Ready => Ok(ImageInfo {
                identifier: id.to_owned(),
                state: p.state,
                bytes: p.bytes,
                written: p.written,
                error: p.error,
                used_by,
            }),
            (_, Some(size)) => Ok(ImageInfo {
                identifier: id.to_owned(),
                state: ImageState::Ready,
                bytes: size,
                written: size,
                error: None,
                used_by,
            }),
            _ => Err(ImageError::NotFound(id.to_owned())),
        }
    }

    /// Every image cached or being fetched, by identifier.
    pub fn identifiers(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| valid(name).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.extend(self.prefetches().keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Starts fetching `entry`'s image into the cache unless it is cached or on its way.
    /// Returns whether a download was started.
    pub fn prefetch(self: &Arc<Self>, entry: Metadata) -> Result<bool, ImageError> {
        entry.check()?;
        let id = entry.identifier.to_string();
        {
            let mut prefetches = self.prefetches();
            let downloading = prefetches
                .get(&id)
                .is_some_and(|p| p.state == ImageState::Downloading);
            // A cached copy is checked against the entry when a VM asks for it.
            if downloading || self.cached_size(&id).is_some() {
                return Ok(false);
            }
            prefetches.insert(
                id.clone(),
                Prefetch {
                    state: ImageState::Downloading,
                    bytes: entry.bytes,
                    written: 0,
                    error: None,
                },
            );
        }
        let images = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut progress = |p: stratus_images::download::Progress| {
                if let Some(prefetch) = images.prefetches().get_mut(&id) {
                    prefetch.written = p.written;
                }
            };
            let outcome = images.cache.get(&entry, &mut progress);
            let mut prefetches = images.prefetches();
            if let Some(prefetch) = prefetches.get_mut(&id) {
                match outcome {
                    Ok(_) => {
                        prefetch.state = ImageState::Ready;
                        prefetch.written = prefetch.bytes;
                    }
                    Err(e) => {
                        tracing::warn!("image {id}: prefetch failed: {e}");
                        prefetch.state = ImageState::Failed;
                        prefetch.error = Some(e.to_string());
                    }
                }
            }
        });
        Ok(true)
    }

    /// Removes a cached image and what was extracted from it; `used_by` are the VMs whose
    /// root overlay or disks need it.
    pub fn remove(&self, id: &str, used_by: Vec<String>) -> Result<(), ImageError> {
        valid(id)?;
        if !used_by.is_empty() {
            return Err(ImageError::InUse {
                id: id.to_owned(),
                vms: used_by.join(", "),
            });
        }
        let mut prefetches = self.prefetches();
        if prefetches
            .get(id)
            .is_some_and(|p| p.state == ImageState::Downloading)
        {
            return Err(ImageError::Downloading(id.to_owned()));
        }
        let had_prefetch = prefetches.remove(id).is_some();
        let image = self.dir.join(id);
        let existed = image.exists();
        if !existed && !had_prefetch {
            return Err(ImageError::NotFound(id.to_owned()));
        }
        for path in std::iter::once(image).chain(
            BESIDE
                .iter()
                .map(|ext| self.dir.join(format!("{id}.{ext}"))),
        ) {
            if let Err(source) = std::fs::remove_file(&path) {
                if source.kind() != std::io::ErrorKind::NotFound {
                    return Err(ImageError::Remove { path, source });
                }
            }
        }
        Ok(())
    }
}

/// Fetches a Marketplace entry (JSON form) from a URL: an entry's own URL, or a
/// Marketplace search whose first result is taken.
pub fn fetch_entry(url: &str) -> Result<Metadata, ImageError> {
    let failed = |reason: String| ImageError::Entry {
        url: url.to_owned(),
        reason,
    };
    let mut response = ureq::get(url)
        .header("accept", "application/json")
        .call()
        .map_err(|e| match e {
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => ImageError::EntryUrl {
                url: url.to_owned(),
                source: Box::new(e),
            },
            ureq::Error::StatusCode(404) => ImageError::NoEntry {
                url: url.to_owned(),
            },
            e => failed(e.to_string()),
        })?;
    let text = response
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(|e| failed(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| failed(format!("not JSON: {e}")))?;
    let entry = match value {
        serde_json::Value::Array(mut list) if !list.is_empty() => list.swap_remove(0),
        serde_json::Value::Array(_) => {
            return Err(ImageError::NoEntry {
                url: url.to_owned(),
            })
        }
        single => single,
    };
    // Through from_json, which checks what serde alone does not (identifier against
    // checksum, dates).
    Metadata::from_json(&entry.to_string())
        .map_err(|e| failed(format!("not a valid Marketplace entry: {e}")))
}
