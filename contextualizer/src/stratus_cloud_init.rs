//! StratusLab's CloudInit disk (method `cloud-init`): what cloud-init's
//! config-drive v1 reader finds on a small VFAT disk.

use crate::image::{build_fat, ImageFile, CLOUD_INIT_DISK_BYTES};
use crate::userdata::{authorized_keys, user_data, STRATUSLAB_MAX_GZIPPED_USER_DATA};
use crate::{Context, ContextError};

pub const CLOUD_INIT_LABEL: [u8; 11] = *b"_CLOUD_INIT";

/// `meta.js`: `{"user-data": …, "dsmode": "local"}` as StratusLab wrote it
/// (`user-data` left out when there is none), plus `instance-id` and
/// `public-keys`, which cloud-init's config-drive v1 reader also takes from
/// here. `dsmode: local` makes cloud-init apply it before networking.
///
/// `public-keys` matters beyond tidiness: cloud-init 22.x reads the
/// `authorized_keys` file as bytes and then fails on it, but prefers this
/// text field when present, so keys reach current guests as well.
pub fn render_meta_js(user_data: Option<&str>, instance_id: &str, keys: &[String]) -> String {
    let json = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut fields = Vec::new();
    if let Some(text) = user_data {
        fields.push(format!("\"user-data\": {}", json(text)));
    }
    fields.push("\"dsmode\": \"local\"".to_string());
    fields.push(format!("\"instance-id\": {}", json(instance_id)));
    if !keys.is_empty() {
        let mut joined = keys.join("\n");
        joined.push('\n');
        fields.push(format!("\"public-keys\": {}", json(&joined)));
    }
    format!("{{{}}}", fields.join(", "))
}

/// A volume serial derived from the instance id: rebuilding an instance's disk
/// keeps its serial (guests may have recorded it), while instances differ.
fn volume_id(ctx: &Context) -> u32 {
    // FNV-1a: tiny, stable across releases (unlike std's hasher).
    let mut hash: u32 = 0x811c_9dc5;
    for byte in ctx.instance_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

pub(crate) fn build(ctx: &Context) -> Result<Vec<u8>, ContextError> {
    let keys = authorized_keys(ctx)?;
    let data = user_data(ctx)?;
    let text = match &data {
        Some(ud) => {
            let size = ud.gzipped_len();
            if size > STRATUSLAB_MAX_GZIPPED_USER_DATA {
                return Err(ContextError::UserDataTooLarge {
                    size,
                    limit: STRATUSLAB_MAX_GZIPPED_USER_DATA,
                    method: "the StratusLab cloud-init method",
                });
            }
            // meta.js is JSON, so the user data must be text.
            Some(
                std::str::from_utf8(&ud.bytes)
                    .map_err(|_| ContextError::NotUtf8 {
                        what: "the user data (the `cloud-init` method stores it in JSON)".into(),
                    })?
                    .to_string(),
            )
        }
        None => None,
    };
    let mut files = vec![ImageFile::new(
        "meta.js",
        render_meta_js(text.as_deref(), &ctx.instance_id, &keys),
        0o644,
    )];
    if !keys.is_empty() {
        let mut joined = keys.join("\n");
        joined.push('\n');
        files.push(ImageFile::new("root/.ssh/authorized_keys", joined, 0o600));
    }
    build_fat(
        CLOUD_INIT_LABEL,
        volume_id(ctx),
        CLOUD_INIT_DISK_BYTES,
        &files,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_js_is_json_with_stratuslab_fields_first() {
        let keys = vec!["ssh-ed25519 AAAA a@b".to_string()];
        let js = render_meta_js(Some("#!/bin/sh\necho \"hi\"\n"), "one-1", &keys);
        assert!(js.starts_with("{\"user-data\": \"#!/bin/sh\\necho"), "{js}");
        let v: serde_json::Value = serde_json::from_str(&js).unwrap();
        assert_eq!(v["user-data"], "#!/bin/sh\necho \"hi\"\n");
        assert_eq!(v["dsmode"], "local");
        assert_eq!(v["instance-id"], "one-1");
        assert_eq!(v["public-keys"], "ssh-ed25519 AAAA a@b\n");
        let v: serde_json::Value = serde_json::from_str(&render_meta_js(None, "x", &[])).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"dsmode": "local", "instance-id": "x"})
        );
    }
}
