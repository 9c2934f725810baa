//! prepare-context encoding: decoded with base64, gzip and Python's `email`
//! package, independent of this crate's own code.

mod common;

use std::io::Read;
use std::path::Path;

use base64::Engine;
use common::*;
use stratus_contextualizer::{prepare_context, prepare_context_parts, CloudInitPart, ContextError};

fn decode_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE line");
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Parses a MIME message with Python's `email` package and lists its parts.
fn python_parts(message: &Path) -> serde_json::Value {
    let script = r#"
import email, json, sys
from email import policy
msg = email.message_from_bytes(open(sys.argv[1], "rb").read(), policy=policy.compat32)
parts = []
for part in msg.walk():
    if part.is_multipart():
        continue
    parts.append({
        "type": part.get_content_type(),
        "filename": part.get_filename(),
        "disposition": part.get_content_disposition(),
        "payload": part.get_payload(decode=True).decode("utf-8"),
    })
print(json.dumps({"type": msg.get_content_type(), "defects": len(msg.defects), "parts": parts}))
"#;
    let out = ok("python3", &["-c", script, s(message)]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn multipart_round_trips_through_python_email() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("id_rsa.pub");
    std::fs::write(
        &key,
        format!("Comment: \"2048-bit RSA\"\n  {KEY}  \n\n{KEY2}\n"),
    )
    .unwrap();
    let script = d.join("run-httpd.sh");
    let script_body = "#!/bin/bash -x\nyum install -y httpd\n--not-a-boundary\n";
    std::fs::write(&script, script_body).unwrap();
    let config = d.join("config.yaml");
    let config_body = "#cloud-config\npackages: [httpd]\n";
    std::fs::write(&config, config_body).unwrap();
    let unicode = d.join("démarrage \"v2\".sh");
    let unicode_body = "#!/bin/sh\necho 'héllo ✓'\n";
    std::fs::write(&unicode, unicode_body).unwrap();

    let pairs = format!(
        "ssh,{}#x-shellscript,{}#cloud-config,{}#x-shellscript,{}",
        key.display(),
        script.display(),
        config.display(),
        unicode.display()
    );
    let prepared = prepare_context(&pairs, None).unwrap();
    let text = prepared.to_string();
    let lines = decode_lines(&text);
    assert_eq!(
        lines.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        [
            "CONTEXT_METHOD",
            "CLOUD_INIT_AUTHORIZED_KEYS",
            "CLOUD_INIT_USER_DATA"
        ]
    );
    assert_eq!(lines[0].1, "cloud-init");
    assert_eq!(
        String::from_utf8(b64(&lines[1].1)).unwrap(),
        format!("{KEY}\n{KEY2}\n"),
        "keys stripped, Comment: and blank lines dropped"
    );

    let gz = b64(&lines[2].1);
    assert!(gz.len() <= 16384);
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    let message = d.join("user-data.mime");
    std::fs::write(&message, gunzip(&gz)).unwrap();

    let parsed = python_parts(&message);
    assert_eq!(parsed["type"], "multipart/mixed");
    assert_eq!(parsed["defects"], 0);
    let expected = serde_json::json!([
        {"type": "text/x-shellscript", "filename": "run-httpd.sh", "disposition": "attachment", "payload": script_body},
        {"type": "text/cloud-config", "filename": "config.yaml", "disposition": "attachment", "payload": config_body},
        {"type": "text/x-shellscript", "filename": "démarrage \"v2\".sh", "disposition": "attachment", "payload": unicode_body},
    ]);
    assert_eq!(parsed["parts"], expected);
}

#[test]
fn none_pseudo_type_sends_the_file_verbatim_and_default_key_fills_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = d.join("run.sh");
    let body = b"#!/bin/bash\necho raw\n";
    std::fs::write(&script, body).unwrap();
    let default_key = d.join("default.pub");
    std::fs::write(&default_key, format!("{KEY}\n")).unwrap();

    let prepared =
        prepare_context(&format!("none,{}", script.display()), Some(&default_key)).unwrap();
    let lines = decode_lines(&prepared.to_string());
    assert_eq!(
        String::from_utf8(b64(&lines[1].1)).unwrap(),
        format!("{KEY}\n")
    );
    assert_eq!(gunzip(&b64(&lines[2].1)), body);
}

#[test]
fn empty_pairs_give_only_the_default_key() {
    let dir = tempfile::tempdir().unwrap();
    let default_key = dir.path().join("default.pub");
    std::fs::write(&default_key, format!("{KEY}\n")).unwrap();
    let text = prepare_context("", Some(&default_key)).unwrap().to_string();
    let lines = decode_lines(&text);
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], ("CONTEXT_METHOD".into(), "cloud-init".into()));
    assert_eq!(lines[1].0, "CLOUD_INIT_AUTHORIZED_KEYS");
}

#[test]
fn split_pairs_may_contain_hash_signs() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("a#b.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let part = CloudInitPart::parse(&format!("x-shellscript,{}", script.display())).unwrap();
    let prepared = prepare_context_parts(&[part], None).unwrap();
    let message = dir.path().join("m");
    std::fs::write(&message, prepared.user_data().unwrap()).unwrap();
    assert_eq!(python_parts(&message)["parts"][0]["filename"], "a#b.sh");
}

#[test]
fn bad_input_names_the_offending_item() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("missing.sh");
    let err = prepare_context(&format!("x-shellscript,{}", missing.display()), None).unwrap_err();
    assert!(matches!(err, ContextError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains("missing.sh"), "{err}");

    let err = prepare_context("x-shellscript", None).unwrap_err();
    assert!(err.to_string().contains("`x-shellscript`"), "{err}");

    let binary = d.join("blob.sh");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let err = prepare_context(&format!("x-shellscript,{}", binary.display()), None).unwrap_err();
    assert!(matches!(err, ContextError::NotUtf8 { .. }), "{err}");
    assert!(err.to_string().contains("blob.sh"), "{err}");

    let script = d.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let err = prepare_context(
        &format!("none,{0}#x-shellscript,{0}", script.display()),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, ContextError::NoneCombined { .. }), "{err}");

    std::fs::create_dir(d.join("b")).unwrap();
    let other = d.join("b/run.sh");
    std::fs::write(&other, "#!/bin/sh\n").unwrap();
    let err = prepare_context(
        &format!(
            "x-shellscript,{}#x-shellscript,{}",
            script.display(),
            other.display()
        ),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&err, ContextError::DuplicatePartName { name, .. } if name == "run.sh"),
        "{err}"
    );

    let err = prepare_context(&format!("x shellscript,{}", script.display()), None).unwrap_err();
    assert!(matches!(err, ContextError::InvalidMimeType { .. }), "{err}");

    let missing_key = d.join("nokey.pub");
    let err = prepare_context("", Some(&missing_key)).unwrap_err();
    assert!(err.to_string().contains("nokey.pub"), "{err}");
}

#[test]
fn gzipped_user_data_over_16384_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.sh");
    let mut state: u32 = 12345;
    let body: String = (0..30_000)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (b'!' + ((state >> 16) % 90) as u8) as char
        })
        .collect();
    std::fs::write(&big, format!("#!/bin/sh\n: '{body}'\n")).unwrap();
    let err = prepare_context(&format!("x-shellscript,{}", big.display()), None).unwrap_err();
    match &err {
        ContextError::UserDataTooLarge { size, limit, .. } => {
            assert_eq!(*limit, 16384);
            assert!(*size > 16384, "{size}");
        }
        other => panic!("unexpected: {other}"),
    }

    // Just under the limit passes: the bound is on the gzipped size.
    let small = dir.path().join("small.sh");
    std::fs::write(&small, format!("#!/bin/sh\n: '{}'\n", &body[..15_000])).unwrap();
    let prepared = prepare_context(&format!("x-shellscript,{}", small.display()), None).unwrap();
    assert!(prepared.gzipped_user_data_len().unwrap() <= 16384);
}

#[test]
fn cloud_init_user_data_processor_takes_the_gzipped_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = d.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let config = d.join("cc.yaml");
    std::fs::write(&config, "#cloud-config\npackages: [httpd]\n").unwrap();
    let prepared = prepare_context(
        &format!(
            "x-shellscript,{}#cloud-config,{}",
            script.display(),
            config.display()
        ),
        None,
    )
    .unwrap();
    let lines = decode_lines(&prepared.to_string());
    let (_, encoded) = lines
        .iter()
        .find(|(k, _)| k == "CLOUD_INIT_USER_DATA")
        .expect("user data line");
    let blob = d.join("user-data.gz");
    std::fs::write(&blob, b64(encoded)).unwrap();
    // cloud-init gunzips user data itself, as a guest would receive it.
    let script = r#"
import json, sys, tempfile
from cloudinit import helpers, user_data
tmp = tempfile.mkdtemp()
proc = user_data.UserDataProcessor(helpers.Paths({"cloud_dir": tmp, "run_dir": tmp}))
msg = proc.process(open(sys.argv[1], "rb").read())
print(json.dumps([[p.get_content_type(), p.get_filename()] for p in msg.walk() if not p.is_multipart()]))
"#;
    let out = ok("/usr/bin/python3", &["-c", script, s(&blob)]);
    let parts: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        parts,
        serde_json::json!([
            ["text/x-shellscript", "run.sh"],
            ["text/cloud-config", "cc.yaml"]
        ])
    );
}
