//! Looks run requests' images up in the Marketplace and checks them: valid dates, not
//! deprecated, and the site's image policy. The chosen entry travels with the VM to its
//! node, which caches the image and checks it again.

use std::time::Duration;

use stratus_images::Metadata;

#[derive(Debug, thiserror::Error)]
pub enum MarketplaceError {
    #[error("'{0}' is not a Marketplace image identifier (27 letters, digits, '-' or '_')")]
    BadIdentifier(String),
    #[error("this cloud has no Marketplace configured (marketplace_endpoint)")]
    NotConfigured,
    #[error("no Marketplace entry for image {0}")]
    NoEntry(String),
    #[error("image {id}: {source}")]
    Unusable {
        id: String,
        #[source]
        source: stratus_images::Error,
    },
    #[error("the Marketplace {url} does not answer: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the Marketplace {url} refused ({status}) the lookup of image {id}")]
    Refused {
        url: String,
        status: u16,
        id: String,
    },
}

impl MarketplaceError {
    /// The user's mistake (4xx) rather than the Marketplace's trouble (502).
    pub fn is_users(&self) -> bool {
        matches!(
            self,
            MarketplaceError::BadIdentifier(_)
                | MarketplaceError::NotConfigured
                | MarketplaceError::NoEntry(_)
                | MarketplaceError::Unusable { .. }
        )
    }
}

pub fn valid_identifier(id: &str) -> bool {
    id.len() == 27
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The newest usable entry for image `id`; if none is usable, why the newest is not.
pub async fn resolve(
    http: &reqwest::Client,
    endpoint: Option<&str>,
    policy: Option<&stratus_images::policy::Policy>,
    id: &str,
) -> Result<Metadata, MarketplaceError> {
    if !valid_identifier(id) {
        return Err(MarketplaceError::BadIdentifier(id.to_owned()));
    }
    let endpoint = endpoint.ok_or(MarketplaceError::NotConfigured)?;
    let url = format!("{}/metadata", endpoint.trim_end_matches('/'));
    let unreachable = |source| MarketplaceError::Unreachable {
        url: url.clone(),
        source,
    };
    let response = http
        .get(&url)
        .query(&[("identifier", id), ("status", "all")])
        .header("accept", "application/json")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(unreachable)?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(MarketplaceError::NoEntry(id.to_owned()));
    }
    if !response.status().is_success() {
        return Err(MarketplaceError::Refused {
            url,
            status: response.status().as_u16(),
            id: id.to_owned(),
        });
    }
    let mut entries: Vec<Metadata> = response.json().await.map_err(unreachable)?;
    entries.retain(|e| e.identifier.to_string() == id);
    entries.sort_by_key(|e| std::cmp::Reverse(e.endorsement.created));
    let now = chrono::Utc::now();
    let mut first_refusal = None;
    for entry in entries {
        let verdict = entry
            .check_usable(now)
            .and_then(|()| policy.map_or(Ok(()), |p| p.check(&entry)));
        match verdict {
            Ok(()) => return Ok(entry),
            Err(source) => {
                first_refusal.get_or_insert(MarketplaceError::Unusable {
                    id: id.to_owned(),
                    source,
                });
            }
        }
    }
    Err(first_refusal.unwrap_or_else(|| MarketplaceError::NoEntry(id.to_owned())))
}
