//! NoCloud seed, read back by ISO tools and by cloud-init itself (the code
//! that runs in stock Ubuntu and Debian cloud images).

mod common;

use std::path::Path;

use common::*;
use stratus_contextualizer::{Context, ContextMethod, StaticInterface, StaticNetwork};

fn static_network() -> StaticNetwork {
    let mut eth0 = StaticInterface::new("eth0", "02:00:C0:00:02:0A");
    eth0.addresses = vec![
        "192.0.2.10/24".parse().unwrap(),
        "2001:db8::10/64".parse().unwrap(),
    ];
    eth0.gateway4 = Some("192.0.2.1".parse().unwrap());
    eth0.gateway6 = Some("2001:db8::1".parse().unwrap());
    eth0.nameservers = vec!["192.0.2.53".parse().unwrap()];
    eth0.search = vec!["stratus.example".into()];
    StaticNetwork {
        interfaces: vec![eth0],
    }
}

/// Runs cloud-init's NoCloud datasource on an extracted seed and returns what
/// it found, as JSON.
fn nocloud_datasource(seed: &Path, scratch: &Path) -> serde_json::Value {
    let cloud = scratch.join("cloud");
    std::fs::create_dir_all(cloud.join("seed")).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-r", s(seed), s(&cloud.join("seed/nocloud"))])
        .status()
        .unwrap();
    assert!(status.success());
    let script = r#"
import json, sys
from cloudinit import helpers, distros
from cloudinit.sources.DataSourceNoCloud import DataSourceNoCloud
cloud = sys.argv[1]
paths = helpers.Paths({"cloud_dir": cloud, "run_dir": cloud + "/run"})
distro = distros.fetch("ubuntu")("ubuntu", {}, paths)
# fs_label None: read the seed directory only, never probe this host's disks.
ds = DataSourceNoCloud({"datasource": {"NoCloud": {"fs_label": None}}}, distro, paths)
assert ds._get_data(), "NoCloud found no data"
print(json.dumps({
    "instance_id": ds.get_instance_id(),
    "hostname": ds.get_hostname().hostname,
    "keys": ds.get_public_ssh_keys(),
    "userdata": ds.userdata_raw.decode("utf-8", "replace") if isinstance(ds.userdata_raw, bytes) else ds.userdata_raw,
    "network": ds.network_config,
}))
"#;
    let out = ok("/usr/bin/python3", &["-c", script, s(&cloud)]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn seed_is_an_iso_labelled_cidata_with_the_three_files() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new("i-0042", "vm42")
        .with_public_key(KEY)
        .with_network(static_network());
    let iso = write_disk(dir.path(), "seed.iso", &ctx, ContextMethod::NoCloud);
    assert_eq!(blkid_value(&iso, "TYPE").as_deref(), Some("iso9660"));
    assert_eq!(blkid_value(&iso, "LABEL").as_deref(), Some("cidata"));
    let file = ok("file", &["-b", s(&iso)]);
    assert!(
        file.contains("ISO 9660 CD-ROM filesystem data 'cidata'"),
        "{file}"
    );
    let rr = ok("isoinfo", &["-R", "-l", "-i", s(&iso)]);
    let joliet = ok("isoinfo", &["-J", "-l", "-i", s(&iso)]);
    for name in ["meta-data", "user-data", "network-config"] {
        assert!(rr.contains(name), "RR listing lacks {name}:\n{rr}");
        assert!(
            joliet.contains(name),
            "Joliet listing lacks {name}:\n{joliet}"
        );
    }
}

#[test]
fn cloud_init_reads_identity_keys_default_user_data_and_network() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new("i-0042", "vm42")
        .with_public_key(format!("{KEY}\n{KEY2}"))
        .with_network(static_network());
    let iso = write_disk(dir.path(), "seed.iso", &ctx, ContextMethod::NoCloud);
    let seed = dir.path().join("seed");
    extract_iso(&iso, &seed);

    let found = nocloud_datasource(&seed, dir.path());
    assert_eq!(found["instance_id"], "i-0042");
    assert_eq!(found["hostname"], "vm42");
    assert_eq!(found["keys"], serde_json::json!([KEY, KEY2]));
    let user_data = found["userdata"].as_str().unwrap();
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    let eth0 = &found["network"]["ethernets"]["eth0"];
    assert_eq!(found["network"]["version"], 2);
    assert_eq!(eth0["match"]["macaddress"], "02:00:c0:00:02:0a");
    assert_eq!(
        eth0["addresses"],
        serde_json::json!(["192.0.2.10/24", "2001:db8::10/64"])
    );
    assert_eq!(
        eth0["nameservers"]["addresses"],
        serde_json::json!(["192.0.2.53"])
    );

    // The default user data is valid cloud-config that installs the keys.
    let schema = ok("cloud-init", &["schema", "-c", s(&seed.join("user-data"))]);
    assert!(schema.contains("Valid cloud-config"), "{schema}");
    let parsed = ok(
        "/usr/bin/python3",
        &[
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            s(&seed.join("user-data")),
        ],
    );
    let parsed: serde_json::Value = serde_json::from_str(&parsed).unwrap();
    assert_eq!(
        parsed["ssh_authorized_keys"],
        serde_json::json!([KEY, KEY2])
    );
}

#[test]
fn cloud_init_renders_the_network_config_for_ubuntu_and_debian() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new("i-1", "vm1").with_network(static_network());
    let iso = write_disk(dir.path(), "seed.iso", &ctx, ContextMethod::NoCloud);
    let seed = dir.path().join("seed");
    extract_iso(&iso, &seed);
    let config = s(&seed.join("network-config")).to_string();

    let netplan = dir.path().join("netplan");
    ok(
        "cloud-init",
        &[
            "devel",
            "net-convert",
            "-p",
            &config,
            "-k",
            "yaml",
            "-D",
            "ubuntu",
            "-O",
            "netplan",
            "-d",
            s(&netplan),
        ],
    );
    let rendered = read_all(&netplan);
    for needle in [
        "192.0.2.10/24",
        "2001:db8::10/64",
        "via: 192.0.2.1",
        "via: 2001:db8::1",
        "set-name: eth0",
        "stratus.example",
    ] {
        assert!(
            rendered.contains(needle),
            "netplan lacks {needle}:\n{rendered}"
        );
    }

    let eni = dir.path().join("eni");
    ok(
        "cloud-init",
        &[
            "devel",
            "net-convert",
            "-p",
            &config,
            "-k",
            "yaml",
            "-D",
            "debian",
            "-O",
            "eni",
            "-d",
            s(&eni),
        ],
    );
    let rendered = read_all(&eni);
    for needle in [
        "iface eth0 inet static",
        "address 192.0.2.10/24",
        "192.0.2.1",
        "dns-nameservers 192.0.2.53",
    ] {
        assert!(rendered.contains(needle), "ENI lacks {needle}:\n{rendered}");
    }
}

fn read_all(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn user_data_is_written_verbatim_and_keys_still_reach_meta_data() {
    let dir = tempfile::tempdir().unwrap();
    let user_data = b"#!/bin/sh\necho \"h\xc3\xa9llo\" > /tmp/x\n".to_vec();
    let ctx = Context::new("i-2", "vm2")
        .with_public_key(KEY)
        .with_user_data(user_data.clone());
    let iso = write_disk(dir.path(), "seed.iso", &ctx, ContextMethod::NoCloud);
    let seed = dir.path().join("seed");
    extract_iso(&iso, &seed);
    assert_eq!(std::fs::read(seed.join("user-data")).unwrap(), user_data);
    assert!(
        !seed.join("network-config").exists(),
        "DHCP guests get no network-config"
    );
    let found = nocloud_datasource(&seed, dir.path());
    assert_eq!(found["keys"], serde_json::json!([KEY]));
}

#[test]
fn odd_instance_ids_stay_yaml_strings() {
    let dir = tempfile::tempdir().unwrap();
    // Unquoted, these would parse as a number, a boolean and a mapping.
    for id in ["0042", "yes", "a: b # c é ✓ \"q\""] {
        let ctx = Context::new(id, "vm3").with_public_key(KEY);
        let iso = write_disk(dir.path(), "seed.iso", &ctx, ContextMethod::NoCloud);
        let seed = dir.path().join(format!("seed-{}", id.len()));
        extract_iso(&iso, &seed);
        let scratch = dir.path().join(format!("scratch-{}", id.len()));
        let found = nocloud_datasource(&seed, &scratch);
        assert_eq!(found["instance_id"].as_str(), Some(id));
    }
}
