//! `prepare-context`: turns `mime,file` pairs into the three context lines of
//! StratusLab's cloud-init method.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::userdata::{gzip, AUTHORIZED_KEYS_KEY, STRATUSLAB_MAX_GZIPPED_USER_DATA, USER_DATA_KEY};
use crate::ContextError;

/// One `mime,file` pair, e.g. `x-shellscript,run.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInitPart {
    /// `ssh` and `none` are pseudo-types; anything else is a MIME subtype of
    /// `text/` (or a full `type/subtype`).
    pub mime: String,
    pub file: PathBuf,
}

impl CloudInitPart {
    /// Parses one `mime,file` pair (split at the first comma, so file names may
    /// contain commas).
    pub fn parse(pair: &str) -> Result<Self, ContextError> {
        let malformed = || ContextError::MalformedPair {
            pair: pair.to_string(),
        };
        let (mime, file) = pair.split_once(',').ok_or_else(malformed)?;
        let (mime, file) = (mime.trim(), file.trim());
        if mime.is_empty() || file.is_empty() {
            return Err(malformed());
        }
        Ok(CloudInitPart {
            mime: mime.to_string(),
            file: PathBuf::from(file),
        })
    }

    fn label(&self) -> String {
        format!("{},{}", self.mime, self.file.display())
    }
}

/// Parses `mime,file#mime,file`; empty segments are skipped, so `""` means
/// "defaults only".
pub fn parse_cloud_init_pairs(pairs: &str) -> Result<Vec<CloudInitPart>, ContextError> {
    pairs
        .split('#')
        .filter(|p| !p.trim().is_empty())
        .map(CloudInitPart::parse)
        .collect()
}

/// The result of `prepare-context`; `Display` gives the context-file lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedContext {
    authorized_keys: Option<String>,
    user_data: Option<Vec<u8>>,
    user_data_gzip: Option<Vec<u8>>,
}

impl PreparedContext {
    /// Authorized keys as sent: keys joined by `\n`, `\n` after each file.
    pub fn authorized_keys(&self) -> Option<&str> {
        self.authorized_keys.as_deref()
    }

    /// User data before gzip and base64.
    pub fn user_data(&self) -> Option<&[u8]> {
        self.user_data.as_deref()
    }

    pub fn gzipped_user_data_len(&self) -> Option<usize> {
        self.user_data_gzip.as_ref().map(Vec::len)
    }

    /// The context keys, ready to merge into a `Context`.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut out = vec![("CONTEXT_METHOD".to_string(), "cloud-init".to_string())];
        if let Some(keys) = &self.authorized_keys {
            out.push((AUTHORIZED_KEYS_KEY.to_string(), b64(keys.as_bytes())));
        }
        if let Some(gz) = &self.user_data_gzip {
            out.push((USER_DATA_KEY.to_string(), b64(gz)));
        }
        out
    }
}

impl fmt::Display for PreparedContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in self.pairs() {
            writeln!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// `prepare-context` on `mime,file#mime,file` (the CLI's `--cloud-init`).
/// `default_key` is used when no `ssh` pair is given.
pub fn prepare_context(
    pairs: &str,
    default_key: Option<&Path>,
) -> Result<PreparedContext, ContextError> {
    prepare_context_parts(&parse_cloud_init_pairs(pairs)?, default_key)
}

fn read(path: &Path, origin: String) -> Result<Vec<u8>, ContextError> {
    std::fs::read(path).map_err(|source| ContextError::ReadFile {
        path: path.to_path_buf(),
        origin,
        source,
    })
}

fn text(bytes: Vec<u8>, what: impl FnOnce() -> String) -> Result<String, ContextError> {
    String::from_utf8(bytes).map_err(|_| ContextError::NotUtf8 { what: what() })
}

/// Keys of one file, as StratusLab sent them: lines stripped, RFC 4716
/// `Comment:` headers and blank lines dropped.
fn key_lines(content: &str) -> Vec<&str> {
    content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Comment:"))
        .collect()
}

/// `prepare-context` on already split pairs (`stratus-prepare-context`'s
/// arguments, which may contain `#`).
pub fn prepare_context_parts(
    parts: &[CloudInitPart],
    default_key: Option<&Path>,
) -> Result<PreparedContext, ContextError> {
    let mut keys = String::new();
    let mut saw_ssh = false;
    let mut mime_parts: Vec<MimePart> = Vec::new();
    let mut verbatim: Option<(&CloudInitPart, Vec<u8>)> = None;

    for part in parts {
        let origin = format!(" (from pair `{}`)", part.label());
        match part.mime.as_str() {
            "ssh" => {
                saw_ssh = true;
                let content = text(read(&part.file, origin)?, || {
                    format!("SSH key file `{}`", part.file.display())
                })?;
                let lines = key_lines(&content);
                keys.push_str(&lines.join("\n"));
                keys.push('\n');
            }
            "none" => {
                if let Some((first, _)) = &verbatim {
                    return Err(ContextError::NoneCombined {
                        file: first.file.display().to_string(),
                        other: part.label(),
                    });
                }
                let content = read(&part.file, origin)?;
                // The disk stores user data as JSON text, so reject binary now
                // rather than when the VM starts.
                text(content.clone(), || {
                    format!("user data file `{}`", part.file.display())
                })?;
                verbatim = Some((part, content));
            }
            mime => {
                let content_type = content_type(mime, part)?;
                let filename = file_name(part)?;
                // cloud-init stores parts by name (scripts/<name>): one would replace the
                // other without a word.
                if let Some(first) = mime_parts.iter().find(|p| p.filename == filename) {
                    return Err(ContextError::DuplicatePartName {
                        name: filename,
                        first: first.label.clone(),
                        second: part.label(),
                    });
                }
                let content = text(read(&part.file, origin)?, || {
                    format!("file `{}` (type `{mime}`)", part.file.display())
                })?;
                mime_parts.push(MimePart {
                    content_type,
                    filename,
                    content,
                    label: part.label(),
                });
            }
        }
    }

    if let (Some((none, _)), Some(other)) = (
        &verbatim,
        parts.iter().find(|p| p.mime != "ssh" && p.mime != "none"),
    ) {
        return Err(ContextError::NoneCombined {
            file: none.file.display().to_string(),
            other: other.label(),
        });
    }

    if !saw_ssh {
        if let Some(path) = default_key {
            let content = text(read(path, " (the default SSH key)".into())?, || {
                format!("SSH key file `{}`", path.display())
            })?;
            keys.push_str(&key_lines(&content).join("\n"));
            keys.push('\n');
        }
    }
    let authorized_keys = if keys.trim().is_empty() {
        None
    } else {
        Some(keys)
    };

    let user_data = match verbatim {
        Some((_, content)) => Some(content),
        None if mime_parts.is_empty() => None,
        None => Some(multipart(&mime_parts).into_bytes()),
    };
    let user_data_gzip = match &user_data {
        Some(data) => {
            let gz = gzip(data);
            if gz.len() > STRATUSLAB_MAX_GZIPPED_USER_DATA {
                return Err(ContextError::UserDataTooLarge {
                    size: gz.len(),
                    limit: STRATUSLAB_MAX_GZIPPED_USER_DATA,
                    method: "StratusLab's cloud-init context",
                });
            }
            Some(gz)
        }
        None => None,
    };
    tracing::debug!(
        parts = parts.len(),
        keys = authorized_keys.is_some(),
        user_data_bytes = user_data.as_ref().map(Vec::len),
        "prepared cloud-init context"
    );
    Ok(PreparedContext {
        authorized_keys,
        user_data,
        user_data_gzip,
    })
}

struct MimePart {
    content_type: String,
    filename: String,
    content: String,
    /// The pair it came from, for errors.
    label: String,
}

/// `x-shellscript` → `text/x-shellscript`; a full `type/subtype` is kept.
/// Only token characters are allowed, since the value lands in a MIME header.
fn content_type(mime: &str, part: &CloudInitPart) -> Result<String, ContextError> {
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_'))
    };
    let full = match mime.split_once('/') {
        Some((ty, sub)) if token_ok(ty) && token_ok(sub) => mime.to_ascii_lowercase(),
        None if token_ok(mime) => format!("text/{}", mime.to_ascii_lowercase()),
        _ => {
            return Err(ContextError::InvalidMimeType {
                pair: part.label(),
                mime: mime.to_string(),
            })
        }
    };
    Ok(full)
}

fn file_name(part: &CloudInitPart) -> Result<String, ContextError> {
    let name = part
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ContextError::MalformedPair { pair: part.label() })?;
    if name.chars().any(char::is_control) {
        return Err(ContextError::InvalidFileName {
            pair: part.label(),
            name,
        });
    }
    Ok(name)
}

/// `filename="…"` for printable ASCII names, RFC 2231 `filename*=` otherwise,
/// so that any name survives a standard MIME parser.
fn disposition(filename: &str) -> String {
    if filename.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        let escaped = filename.replace('\\', "\\\\").replace('"', "\\\"");
        format!("attachment; filename=\"{escaped}\"")
    } else {
        let mut encoded = String::new();
        for b in filename.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        format!("attachment; filename*=utf-8''{encoded}")
    }
}

fn boundary_for(parts: &[MimePart]) -> String {
    // Deterministic (the same files give the same context), and re-drawn until
    // no part contains it.
    let mut seed: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.content.bytes().chain(part.filename.bytes()) {
            seed ^= u64::from(b);
            seed = seed.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    loop {
        let candidate = format!("===============stratus-{seed:016x}==");
        if parts.iter().all(|p| !p.content.contains(&candidate)) {
            return candidate;
        }
        seed = seed.wrapping_add(1);
    }
}

/// A `multipart/mixed` message in the shape cloud-init's own
/// `make-mime` produces. ASCII parts are sent as 7bit text; other text as
/// base64 so that long or odd lines survive transports that rewrap.
fn multipart(parts: &[MimePart]) -> String {
    let boundary = boundary_for(parts);
    let mut out =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for part in parts {
        out.push_str(&format!("--{boundary}\n"));
        if part.content.is_ascii() {
            out.push_str(&format!(
                "Content-Type: {}; charset=\"us-ascii\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\nContent-Disposition: {}\n\n",
                part.content_type,
                disposition(&part.filename)
            ));
            out.push_str(&part.content);
            // The line break before a boundary belongs to the boundary
            // (RFC 2046), so one is added even after a final newline; the
            // content then comes back byte for byte.
            out.push('\n');
        } else {
            out.push_str(&format!(
                "Content-Type: {}; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: base64\nContent-Disposition: {}\n\n",
                part.content_type,
                disposition(&part.filename)
            ));
            let encoded = base64::engine::general_purpose::STANDARD.encode(part.content.as_bytes());
            for chunk in encoded.as_bytes().chunks(76) {
                out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
                out.push('\n');
            }
        }
    }
    out.push_str(&format!("--{boundary}--\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_on_hash_and_first_comma() {
        let parts = parse_cloud_init_pairs("ssh,a.pub#x-shellscript,run,1.sh#").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].mime, "x-shellscript");
        assert_eq!(parts[1].file, PathBuf::from("run,1.sh"));
        assert!(matches!(
            parse_cloud_init_pairs("x-shellscript"),
            Err(ContextError::MalformedPair { pair }) if pair == "x-shellscript"
        ));
    }

    #[test]
    fn header_injection_in_mime_is_refused() {
        let part = CloudInitPart::parse("x-shellscript\r\nX: y,run.sh").unwrap();
        assert!(matches!(
            content_type(&part.mime, &part),
            Err(ContextError::InvalidMimeType { .. })
        ));
    }

    #[test]
    fn disposition_quotes_and_encodes() {
        assert_eq!(disposition("a\"b.sh"), "attachment; filename=\"a\\\"b.sh\"");
        assert_eq!(
            disposition("é.sh"),
            "attachment; filename*=utf-8''%C3%A9.sh"
        );
    }
}
