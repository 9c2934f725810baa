//! Decoding of the `CLOUD_INIT_*` context keys that `prepare-context` makes.

use std::io::Read;

use base64::Engine;
use flate2::read::MultiGzDecoder;

use crate::{Context, ContextError};

pub const AUTHORIZED_KEYS_KEY: &str = "CLOUD_INIT_AUTHORIZED_KEYS";
pub const USER_DATA_KEY: &str = "CLOUD_INIT_USER_DATA";

/// StratusLab's limit on gzipped user data, inherited from the size of a
/// context attribute the original cloud accepted.
pub const STRATUSLAB_MAX_GZIPPED_USER_DATA: usize = 16384;

/// Limit on user data once decoded, for every method. NoCloud has no limit of
/// its own (the seed is a disk, not a metadata field), so this is the NoCloud
/// limit; it also bounds what a small gzip stream may expand to.
pub const MAX_USER_DATA: usize = 1024 * 1024;

pub(crate) fn decode_base64(key: &str, value: &str) -> Result<Vec<u8>, ContextError> {
    // Context files may wrap long values; whitespace is never part of base64.
    let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| ContextError::InvalidBase64 {
            key: key.to_string(),
            reason: e.to_string(),
        })
}

pub(crate) fn gunzip(key: &str, data: &[u8]) -> Result<Vec<u8>, ContextError> {
    let mut out = Vec::new();
    // Every member, as gunzip and Python's gzip module read them (`cat a.gz b.gz`).
    MultiGzDecoder::new(data)
        .take(MAX_USER_DATA as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| ContextError::InvalidGzip {
            key: key.to_string(),
            source,
        })?;
    if out.len() > MAX_USER_DATA {
        return Err(ContextError::DecodedTooLarge {
            what: format!("context key `{key}`"),
            limit: MAX_USER_DATA,
        });
    }
    Ok(out)
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// SSH keys for the guest, one per entry: from `CLOUD_INIT_AUTHORIZED_KEYS`
/// when the user prepared a cloud-init context, else the instance's key.
pub(crate) fn authorized_keys(ctx: &Context) -> Result<Vec<String>, ContextError> {
    let text = match ctx.get(AUTHORIZED_KEYS_KEY) {
        Some(encoded) => {
            let bytes = decode_base64(AUTHORIZED_KEYS_KEY, encoded)?;
            String::from_utf8(bytes).map_err(|_| ContextError::NotUtf8 {
                what: format!("the decoded value of `{AUTHORIZED_KEYS_KEY}`"),
            })?
        }
        None => ctx.public_key.clone().unwrap_or_default(),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// User data in clear, together with its gzipped size when it came gzipped.
pub(crate) struct UserData {
    pub bytes: Vec<u8>,
    pub gzipped_len: Option<usize>,
}

impl UserData {
    pub fn gzipped_len(&self) -> usize {
        self.gzipped_len.unwrap_or_else(|| gzip(&self.bytes).len())
    }
}

pub(crate) fn user_data(ctx: &Context) -> Result<Option<UserData>, ContextError> {
    match (ctx.get(USER_DATA_KEY), &ctx.user_data) {
        (Some(_), Some(_)) => Err(ContextError::ConflictingUserData),
        (Some(encoded), None) => {
            let gz = decode_base64(USER_DATA_KEY, encoded)?;
            let bytes = gunzip(USER_DATA_KEY, &gz)?;
            Ok(Some(UserData {
                bytes,
                gzipped_len: Some(gz.len()),
            }))
        }
        (None, Some(raw)) => {
            if raw.len() > MAX_USER_DATA {
                return Err(ContextError::DecodedTooLarge {
                    what: "the instance's user data".into(),
                    limit: MAX_USER_DATA,
                });
            }
            Ok(Some(UserData {
                bytes: raw.clone(),
                gzipped_len: None,
            }))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn user_data_of_several_gzip_members_is_read_whole() {
        let mut gz = gzip(b"#cloud-config\n");
        gz.extend(gzip(b"runcmd: [true]\n"));
        let encoded = base64::engine::general_purpose::STANDARD.encode(&gz);
        let ctx = Context::new("i-1", "vm1").with_pair(USER_DATA_KEY, encoded.as_str());
        let data = user_data(&ctx).unwrap().unwrap();
        assert_eq!(data.bytes, b"#cloud-config\nruncmd: [true]\n");
    }
}
