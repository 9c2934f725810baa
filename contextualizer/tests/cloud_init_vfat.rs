//! StratusLab CloudInit VFAT disk, read back by mtools, blkid, file, fsck.fat
//! and cloud-init's own config-drive v1 reader.

mod common;

use std::path::Path;

use common::*;
use stratus_contextualizer::{
    prepare_context, Context, ContextError, ContextMethod, CLOUD_INIT_DISK_BYTES,
};

fn prepared_context(dir: &Path) -> (Context, String) {
    let key = dir.join("id.pub");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    let script = dir.join("run-httpd.sh");
    let body = "#!/bin/bash -x\necho \"SUCCESSFUL TEST\" > /var/www/html/test.txt\n";
    std::fs::write(&script, body).unwrap();
    let prepared = prepare_context(
        &format!("ssh,{}#x-shellscript,{}", key.display(), script.display()),
        None,
    )
    .unwrap();
    let user_data = String::from_utf8(prepared.user_data().unwrap().to_vec()).unwrap();
    let ctx = Context::new("one-7", "vm7")
        .with_public_key(KEY2)
        .with_pairs(prepared.pairs());
    (ctx, user_data)
}

#[test]
fn mtools_read_meta_js_and_authorized_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, user_data) = prepared_context(dir.path());
    let img = write_disk(dir.path(), "ci.img", &ctx, ContextMethod::CloudInit);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        CLOUD_INIT_DISK_BYTES
    );

    let root = ok("mdir", &["-i", s(&img), "::"]);
    assert!(root.contains("meta.js"), "{root}");
    assert!(root.contains("root"), "{root}");
    let ssh = ok("mdir", &["-i", s(&img), "::/root/.ssh"]);
    assert!(ssh.contains("authorized_keys"), "{ssh}");

    let meta = ok("mtype", &["-i", s(&img), "::/meta.js"]);
    let json: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(json["dsmode"], "local");
    assert_eq!(json["user-data"].as_str(), Some(user_data.as_str()));
    assert!(user_data.starts_with("Content-Type: multipart/mixed"));
    // Keys come from CLOUD_INIT_AUTHORIZED_KEYS, not from the instance key.
    let keys = ok("mtype", &["-i", s(&img), "::/root/.ssh/authorized_keys"]);
    assert_eq!(keys, format!("{KEY}\n"));

    let label = ok("mlabel", &["-s", "-i", s(&img), "::"]);
    assert!(label.contains("_CLOUD_INIT"), "{label}");
}

#[test]
fn blkid_file_and_fsck_agree_it_is_a_clean_vfat_labelled_cloud_init() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _) = prepared_context(dir.path());
    let img = write_disk(dir.path(), "ci.img", &ctx, ContextMethod::CloudInit);
    assert_eq!(blkid_value(&img, "TYPE").as_deref(), Some("vfat"));
    assert_eq!(blkid_value(&img, "LABEL").as_deref(), Some("_CLOUD_INIT"));
    let file = ok("file", &["-b", s(&img)]);
    assert!(file.contains("label: \"_CLOUD_INIT\""), "{file}");
    assert!(file.contains("FAT (12 bit)"), "{file}");
    let fsck = ok("fsck.fat", &["-n", "-v", s(&img)]);
    for complaint in [
        "Bad short file name",
        "Expected a valid",
        "Renamed",
        "Deleting",
    ] {
        assert!(!fsck.contains(complaint), "fsck.fat: {fsck}");
    }
}

#[test]
fn cloud_init_config_drive_v1_reader_accepts_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, user_data) = prepared_context(dir.path());
    let img = write_disk(dir.path(), "ci.img", &ctx, ContextMethod::CloudInit);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    ok(
        "mcopy",
        &["-s", "-n", "-i", s(&img), "::meta.js", "::root", s(&files)],
    );
    let script = r#"
import json, sys
from cloudinit.sources.helpers import openstack
r = openstack.ConfigDriveReader(sys.argv[1]).read_v1()
md = r["metadata"]
print(json.dumps({"dsmode": r["dsmode"], "userdata": r["userdata"], "keys": md["public-keys"], "iid": md["instance-id"]}))
"#;
    let out = ok("/usr/bin/python3", &["-c", script, s(&files)]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["dsmode"], "local");
    assert_eq!(got["userdata"].as_str(), Some(user_data.as_str()));
    assert_eq!(got["keys"], serde_json::json!([KEY]));
    assert_eq!(got["iid"], "one-7");
}

#[test]
fn instance_key_is_used_without_cloud_init_keys_and_meta_js_omits_missing_user_data() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new("one-8", "vm8").with_public_key(format!("{KEY}\n{KEY2}\n"));
    let img = write_disk(dir.path(), "ci.img", &ctx, ContextMethod::CloudInit);
    let keys = ok("mtype", &["-i", s(&img), "::/root/.ssh/authorized_keys"]);
    assert_eq!(keys, format!("{KEY}\n{KEY2}\n"));
    let meta = ok("mtype", &["-i", s(&img), "::/meta.js"]);
    let json: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "dsmode": "local",
            "instance-id": "one-8",
            "public-keys": format!("{KEY}\n{KEY2}\n"),
        })
    );
}

/// Text that gzip cannot shrink much: a fixed pseudo-random letter stream.
fn incompressible_text(len: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            alphabet[(state % 64) as usize] as char
        })
        .collect()
}

#[test]
fn oversized_user_data_is_refused_and_the_old_disk_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.img");
    std::fs::write(&path, b"previous disk").unwrap();
    let ctx = Context::new("one-9", "vm9")
        .with_public_key(KEY)
        .with_user_data(format!("#!/bin/sh\n: {}\n", incompressible_text(30_000)));
    let err = stratus_contextualizer::write_context_disk(&ctx, ContextMethod::CloudInit, &path)
        .unwrap_err();
    match &err {
        ContextError::UserDataTooLarge { size, limit, .. } => {
            assert_eq!(*limit, 16384);
            assert!(*size > 16384);
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("16384"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"previous disk");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary files left behind");

    // NoCloud has no gzipped limit: the same user data fits its seed.
    stratus_contextualizer::write_context_disk(&ctx, ContextMethod::NoCloud, &path).unwrap();
    assert_eq!(blkid_value(&path, "LABEL").as_deref(), Some("cidata"));
}

#[test]
fn binary_user_data_is_refused_for_meta_js() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new("one-9", "vm9").with_user_data(vec![0xff, 0xfe, 0x00]);
    let path = dir.path().join("ci.img");
    let err = stratus_contextualizer::write_context_disk(&ctx, ContextMethod::CloudInit, &path)
        .unwrap_err();
    assert!(matches!(err, ContextError::NotUtf8 { .. }), "{err}");
    assert!(err.to_string().contains("user data"), "{err}");
    assert!(!path.exists());
}

#[test]
fn user_data_larger_than_the_disk_is_reported_as_not_fitting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.img");
    // Compresses far below 16384 bytes but is larger than the 1,024,000-byte disk.
    let ctx = Context::new("one-10", "vm10")
        .with_user_data(format!("#!/bin/sh\n: '{}'\n", "a".repeat(1_010_000)));
    let err = stratus_contextualizer::write_context_disk(&ctx, ContextMethod::CloudInit, &path)
        .unwrap_err();
    assert!(matches!(err, ContextError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("1024000"), "{err}");
    assert!(!path.exists());
}
