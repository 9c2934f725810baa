//! Direct kernel boot: real disk images made with `mke2fs -d` (e2fsprogs) and `sfdisk`
//! (fdisk), no mounts. Both tools are required; a missing tool fails the test.
mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::run;
use stratus_images::boot::{self, BootInfo};
use stratus_images::cache::ImageCache;
use stratus_images::policy::Policy;
use stratus_images::{ops, Endorser, Error};

const ROOT_UUID: &str = "6f1c3a52-52b5-4b4e-9d8e-0c4f9d3b7a11";
const BOOT_UUID: &str = "0b9e2f44-1d3c-4e55-8a66-77f0e1d2c3b4";
const LINUX_GUID: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const BIOS_BOOT_GUID: &str = "21686148-6449-6E6F-744E-656564454649";
const FS_MIB: u64 = 24;

/// Distinct, recognisable content for a file of the tree (spans several blocks).
fn content(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let mut i = 0u32;
    while v.len() < 150_000 {
        v.extend_from_slice(format!("{name}:{i};").as_bytes());
        i += 1;
    }
    v
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A Debian-like root tree: three kernels (the highest by Debian ordering is 6.1.0-13,
/// which sorts before 6.1.0-9 as plain text), their initrds, config and System.map files,
/// the `/vmlinuz` and `/initrd.img` symlinks, and a little of `/etc` and `/sbin`.
fn debian_tree(root: &Path) {
    for v in ["6.1.0-1-amd64", "6.1.0-9-amd64", "6.1.0-13-amd64"] {
        for f in ["vmlinuz", "initrd.img", "config", "System.map"] {
            let name = format!("boot/{f}-{v}");
            write(root, &name, &content(&name));
        }
    }
    write(root, "boot/grub/grub.cfg", b"set default=0\n");
    write(
        root,
        "etc/fstab",
        b"UUID=... / ext4 errors=remount-ro 0 1\n",
    );
    write(
        root,
        "etc/os-release",
        b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    );
    write(root, "sbin/init", b"#!/bin/sh\n");
    symlink("boot/vmlinuz-6.1.0-13-amd64", root.join("vmlinuz")).unwrap();
    symlink("boot/initrd.img-6.1.0-13-amd64", root.join("initrd.img")).unwrap();
    symlink("boot/vmlinuz-6.1.0-9-amd64", root.join("vmlinuz.old")).unwrap();
}

/// `mke2fs -t <kind> -d <tree> -U <uuid>` into a new file of FS_MIB MiB.
fn make_fs(dir: &Path, name: &str, kind: &str, tree: &Path, uuid: &str) -> PathBuf {
    let img = dir.join(name);
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            kind,
            "-d",
            tree.to_str().unwrap(),
            "-U",
            uuid,
            img.to_str().unwrap(),
            &format!("{FS_MIB}M"),
        ],
        dir,
    );
    img
}

/// A partitioned disk made with `sfdisk` from `script`, with the given filesystem images
/// copied at the given start sectors.
fn make_disk(dir: &Path, name: &str, script: &str, contents: &[(u64, &Path)]) -> PathBuf {
    let disk = dir.join(name);
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len((2 + 2 * FS_MIB + 2) << 20).unwrap();
    drop(f);
    let script_path = dir.join(format!("{name}.sfdisk"));
    std::fs::write(&script_path, script).unwrap();
    run(
        "sh",
        &[
            "-c",
            &format!(
                "sfdisk --no-reread --no-tell-kernel '{}' < '{}'",
                disk.display(),
                script_path.display()
            ),
        ],
        dir,
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for (sector, fs) in contents {
        f.seek(SeekFrom::Start(sector * 512)).unwrap();
        f.write_all(&std::fs::read(fs).unwrap()).unwrap();
    }
    disk
}

const FS_SECTORS: u64 = FS_MIB * 2048;

/// MBR disk: partition 1 is swap-typed and empty, partition 2 (from sector 4096) is root.
fn mbr_disk(dir: &Path, fs: &Path) -> PathBuf {
    let script = format!(
        "label: dos\nstart=2048, size=2048, type=82\nstart=4096, size={FS_SECTORS}, type=83, bootable\n"
    );
    make_disk(dir, "mbr.img", &script, &[(4096, fs)])
}

/// GPT disk: partition 1 is a BIOS boot partition, partition 2 (from sector 4096) is root.
fn gpt_disk(dir: &Path, fs: &Path) -> PathBuf {
    let script = format!(
        "label: gpt\nstart=2048, size=2048, type={BIOS_BOOT_GUID}\nstart=4096, size={FS_SECTORS}, type={LINUX_GUID}\n"
    );
    make_disk(dir, "gpt.img", &script, &[(4096, fs)])
}

fn assert_debian_13(info: &BootInfo, tree: &Path) {
    assert_eq!(info.kernel_version.as_deref(), Some("6.1.0-13-amd64"));
    assert_eq!(info.kernel_source, "/boot/vmlinuz-6.1.0-13-amd64");
    assert_eq!(
        info.initrd_source.as_deref(),
        Some("/boot/initrd.img-6.1.0-13-amd64")
    );
    assert_eq!(
        std::fs::read(&info.kernel).unwrap(),
        std::fs::read(tree.join("boot/vmlinuz-6.1.0-13-amd64")).unwrap()
    );
    let initrd = info.initrd.as_ref().expect("an initrd");
    assert_eq!(
        std::fs::read(initrd).unwrap(),
        std::fs::read(tree.join("boot/initrd.img-6.1.0-13-amd64")).unwrap()
    );
    assert_eq!(
        info.kernel_bytes,
        content("boot/vmlinuz-6.1.0-13-amd64").len() as u64
    );
    assert_eq!(info.root_uuid, ROOT_UUID);
    assert_eq!(info.root_arg(), format!("root=UUID={ROOT_UUID}"));
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    tree: PathBuf,
    fs: PathBuf,
}

fn debian_fs(kind: &str) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let tree = dir.join("tree");
    debian_tree(&tree);
    let fs = make_fs(&dir, "root.fs", kind, &tree, ROOT_UUID);
    Fixture {
        _tmp: tmp,
        dir,
        tree,
        fs,
    }
}

#[test]
fn mbr_disk_boots_the_highest_debian_kernel() {
    let fx = debian_fs("ext4");
    let disk = mbr_disk(&fx.dir, &fx.fs);
    let out = fx.dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let info = boot::prepare(&disk, &out, "img").unwrap();
    assert_debian_13(&info, &fx.tree);
    assert_eq!(info.partition_table, "mbr");
    assert_eq!(info.root_partition, Some(2));
    assert_eq!(info.kernel, out.join("img.vmlinuz"));
    assert_eq!(info.initrd, Some(out.join("img.initrd")));
    let stored: BootInfo =
        serde_json::from_str(&std::fs::read_to_string(out.join("img.boot.json")).unwrap()).unwrap();
    assert_eq!(stored, info);
    assert_eq!(boot::load_prepared(&out, "img"), Some(info));
}

#[test]
fn gpt_disk_boots_the_highest_debian_kernel() {
    let fx = debian_fs("ext4");
    let disk = gpt_disk(&fx.dir, &fx.fs);
    let info = boot::prepare(&disk, &fx.dir, "img").unwrap();
    assert_debian_13(&info, &fx.tree);
    assert_eq!(info.partition_table, "gpt");
    assert_eq!(info.root_partition, Some(2));
}

#[test]
fn unpartitioned_ext2_and_ext3_filesystems_boot() {
    for kind in ["ext2", "ext3", "ext4"] {
        let fx = debian_fs(kind);
        let info = boot::prepare(&fx.fs, &fx.dir, "img").unwrap();
        assert_debian_13(&info, &fx.tree);
        assert_eq!(info.partition_table, "none", "{kind}");
        assert_eq!(info.root_partition, None, "{kind}");
    }
}

#[test]
fn the_vmlinuz_symlinks_are_resolved_when_boot_has_no_versioned_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    write(&tree, "boot/linux-custom", &content("custom kernel"));
    write(&tree, "boot/initramfs-custom", &content("custom initrd"));
    write(&tree, "etc/fstab", b"\n");
    symlink("/boot/linux-custom", tree.join("vmlinuz")).unwrap();
    symlink("boot/initramfs-custom", tree.join("initrd.img")).unwrap();
    let fs = make_fs(tmp.path(), "root.fs", "ext4", &tree, ROOT_UUID);
    let disk = gpt_disk(tmp.path(), &fs);
    let info = boot::prepare(&disk, tmp.path(), "img").unwrap();
    assert_eq!(info.kernel_source, "/boot/linux-custom");
    assert_eq!(
        info.initrd_source.as_deref(),
        Some("/boot/initramfs-custom")
    );
    assert_eq!(
        std::fs::read(&info.kernel).unwrap(),
        content("custom kernel")
    );
    assert_eq!(
        std::fs::read(info.initrd.as_ref().unwrap()).unwrap(),
        content("custom initrd")
    );
    assert_eq!(info.root_uuid, ROOT_UUID);
}

#[test]
fn separate_boot_partition_uses_the_root_partition_uuid() {
    let tmp = tempfile::tempdir().unwrap();
    let boot_tree = tmp.path().join("boot-tree");
    for v in ["5.10.0-26-amd64", "6.1.0-9-amd64"] {
        write(
            &boot_tree,
            &format!("vmlinuz-{v}"),
            &content(&format!("k{v}")),
        );
        write(
            &boot_tree,
            &format!("initrd.img-{v}"),
            &content(&format!("i{v}")),
        );
    }
    let root_tree = tmp.path().join("root-tree");
    write(&root_tree, "etc/fstab", b"\n");
    std::fs::create_dir_all(root_tree.join("boot")).unwrap();
    let boot_fs = make_fs(tmp.path(), "boot.fs", "ext2", &boot_tree, BOOT_UUID);
    let root_fs = make_fs(tmp.path(), "root.fs", "ext4", &root_tree, ROOT_UUID);
    let first = 2048 + FS_SECTORS;
    let script = format!(
        "label: dos\nstart=2048, size={FS_SECTORS}, type=83, bootable\nstart={first}, size={FS_SECTORS}, type=83\n"
    );
    let disk = make_disk(
        tmp.path(),
        "disk.img",
        &script,
        &[(2048, &boot_fs), (first, &root_fs)],
    );
    let info = boot::prepare(&disk, tmp.path(), "img").unwrap();
    assert_eq!(info.kernel_source, "/vmlinuz-6.1.0-9-amd64");
    assert_eq!(
        std::fs::read(&info.kernel).unwrap(),
        content("k6.1.0-9-amd64")
    );
    assert_eq!(
        std::fs::read(info.initrd.as_ref().unwrap()).unwrap(),
        content("i6.1.0-9-amd64")
    );
    assert_eq!(info.root_uuid, ROOT_UUID);
    assert_eq!(info.root_partition, Some(2));
}

fn not_bootable_reason(e: Error) -> String {
    match e {
        Error::NotBootable { reason, .. } => reason,
        other => panic!("expected NotBootable, got {other}"),
    }
}

#[test]
fn images_without_kernel_or_filesystem_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    write(&tree, "etc/fstab", b"\n");
    write(&tree, "boot/grub/grub.cfg", b"\n");
    let fs = make_fs(tmp.path(), "root.fs", "ext4", &tree, ROOT_UUID);

    // A root filesystem without any kernel.
    let disk = mbr_disk(tmp.path(), &fs);
    let reason = not_bootable_reason(boot::prepare(&disk, tmp.path(), "a").unwrap_err());
    assert!(reason.starts_with("no kernel found"), "{reason}");
    assert!(
        reason.contains("partition 2: no kernel in /boot"),
        "{reason}"
    );
    assert!(!tmp.path().join("a.vmlinuz").exists());
    assert!(!tmp.path().join("a.boot.json").exists());

    // A partition table whose partitions hold no filesystem.
    let empty = tmp.path().join("empty.fs");
    std::fs::write(&empty, vec![0u8; 4096]).unwrap();
    let disk = gpt_disk(tmp.path(), &empty);
    let reason = not_bootable_reason(boot::prepare(&disk, tmp.path(), "b").unwrap_err());
    assert!(
        reason.starts_with("no ext2/3/4 filesystem found"),
        "{reason}"
    );
    assert!(reason.contains("partition 1"), "{reason}");
    assert!(reason.contains("partition 2"), "{reason}");

    // Neither a partition table nor a filesystem.
    let junk = tmp.path().join("junk.img");
    std::fs::write(&junk, common::image_bytes(1 << 20, 7)).unwrap();
    let e = boot::prepare(&junk, tmp.path(), "c").unwrap_err();
    assert!(
        e.to_string()
            .contains("no MBR or GPT partition table and no ext2/3/4 filesystem"),
        "{e}"
    );
    assert!(e.to_string().contains("junk.img"), "{e}");
}

/// An image's files are as large as the image says: a sparse 600 MiB "initrd" in a 16 MiB
/// filesystem is refused, not written out to the host's disk, and nothing is left behind.
#[test]
fn a_boot_file_larger_than_any_initrd_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    debian_tree(&tree);
    std::fs::File::options()
        .write(true)
        .open(tree.join("boot/initrd.img-6.1.0-13-amd64"))
        .unwrap()
        .set_len(600 << 20)
        .unwrap();
    let fs = make_fs(tmp.path(), "root.fs", "ext4", &tree, ROOT_UUID);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let reason = not_bootable_reason(boot::prepare(&fs, &out, "big").unwrap_err());
    assert_eq!(
        reason,
        "/boot/initrd.img-6.1.0-13-amd64 is larger than 512 MiB"
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().contains(".part"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Partition tables the `gpt` and `mbrman` crates panic on (and a panic aborts the node
/// agent) are refused as not bootable before they reach them.
#[test]
fn partition_tables_the_parsers_would_panic_on_are_refused() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();

    // An MBR whose only partition starts at sector 0.
    let mut head = vec![0u8; 1 << 20];
    head[446 + 4] = 0x83;
    head[446 + 12..446 + 16].copy_from_slice(&100u32.to_le_bytes());
    head[510] = 0x55;
    head[511] = 0xaa;
    let disk = tmp.path().join("mbr-at-0.img");
    std::fs::write(&disk, &head).unwrap();
    let reason = not_bootable_reason(boot::prepare(&disk, tmp.path(), "a").unwrap_err());
    assert_eq!(
        reason,
        "MBR partition 1 starts at sector 0, over the partition table"
    );

    // A GPT whose (valid, checksummed) primary header has 256-byte entries, as the
    // specification allows, and one with more entries than any disk has.
    let tree = tmp.path().join("tree");
    write(&tree, "etc/fstab", b"\n");
    let fs = make_fs(tmp.path(), "root.fs", "ext4", &tree, ROOT_UUID);
    let disk = gpt_disk(tmp.path(), &fs);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut original = [0u8; 92];
    file.read_exact_at(&mut original, 512).unwrap();
    assert_eq!(&original[..8], b"EFI PART");
    for (entries, entry_size) in [(128u32, 256u32), (1 << 20, 128)] {
        let mut header = original;
        header[80..84].copy_from_slice(&entries.to_le_bytes());
        header[84..88].copy_from_slice(&entry_size.to_le_bytes());
        header[16..20].fill(0);
        let crc = crc32fast::hash(&header);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&header, 512).unwrap();
        let reason = not_bootable_reason(boot::prepare(&disk, tmp.path(), "b").unwrap_err());
        assert_eq!(
            reason,
            format!(
                "the primary GPT header lists {entries} partition entries of {entry_size} \
                 bytes (only 128-byte entries, at most 1024, are read)"
            )
        );
    }
}

fn endorser() -> Endorser {
    Endorser {
        email: "jane@stratuslab.eu".into(),
        subject: "CN=Jane Endorser,O=StratusLab,C=EU".into(),
        issuer: "CN=StratusLab Test CA,O=StratusLab,C=EU".into(),
    }
}

#[test]
fn the_cache_prepares_boot_files_beside_the_image_and_refuses_unbootable_ones() {
    let fx = debian_fs("ext4");
    let disk = gpt_disk(&fx.dir, &fx.fs);
    let mut m = ops::build(&disk, endorser(), "machine").unwrap();
    m.locations = vec![format!("file://{}", disk.display())];
    let cache_dir = fx.dir.join("cache");
    let cache = ImageCache::new(&cache_dir, Policy::default())
        .unwrap()
        .allowing_file_locations(true);
    let (image, info) = cache.prepare_boot(&m, &mut |_| {}).unwrap();
    let id = m.identifier.as_str();
    assert_eq!(image, cache_dir.join(id));
    assert_eq!(info.kernel, cache_dir.join(format!("{id}.vmlinuz")));
    assert_eq!(info.initrd, Some(cache_dir.join(format!("{id}.initrd"))));
    assert!(cache_dir.join(format!("{id}.boot.json")).exists());
    assert_debian_13(&info, &fx.tree);

    // Reused while intact; re-extracted when a boot file is damaged.
    let (_, again) = cache.prepare_boot(&m, &mut |_| {}).unwrap();
    assert_eq!(again, info);
    std::fs::write(&info.kernel, b"truncated").unwrap();
    let (_, repaired) = cache.prepare_boot(&m, &mut |_| {}).unwrap();
    assert_eq!(repaired, info);
    assert_debian_13(&repaired, &fx.tree);

    // An image without a kernel: a NotBootable error naming the identifier and reason.
    let tree = fx.dir.join("nokernel");
    write(&tree, "etc/fstab", b"\n");
    let fs = make_fs(&fx.dir, "nokernel.fs", "ext4", &tree, BOOT_UUID);
    let disk = mbr_disk(&fx.dir, &fs);
    let mut m = ops::build(&disk, endorser(), "machine").unwrap();
    m.locations = vec![format!("file://{}", disk.display())];
    let e = cache.prepare_boot(&m, &mut |_| {}).unwrap_err();
    let text = e.to_string();
    assert!(text.contains(m.identifier.as_str()), "{text}");
    assert!(text.contains("no kernel found"), "{text}");
    assert!(cache_dir.join(m.identifier.as_str()).exists());
    assert!(!cache_dir.join(format!("{}.vmlinuz", m.identifier)).exists());
}

/// A real Debian root, made by `debootstrap --variant=minbase` with Debian's kernel
/// (scripts/debian-root.sh, shared with the systemd host test and kept between runs), put
/// in a GPT disk: the kernel and initrd chosen must be the ones Debian's own `/vmlinuz` and
/// `/initrd.img` symlinks name.
#[test]
fn real_debootstrapped_debian_disk_boots_its_own_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/debian-root.sh");
    let made = run("bash", &[script.to_str().unwrap()], tmp.path());
    let tree = std::fs::canonicalize(String::from_utf8_lossy(&made.stdout).trim()).unwrap();
    let kernel = std::fs::canonicalize(tree.join("vmlinuz")).unwrap();
    let initrd = std::fs::canonicalize(tree.join("initrd.img")).unwrap();
    let du = run("du", &["-sm", tree.to_str().unwrap()], tmp.path());
    let used: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mib = used * 3 / 2 + 64;
    let fs = tmp.path().join("root.fs");
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            tree.to_str().unwrap(),
            "-U",
            ROOT_UUID,
            fs.to_str().unwrap(),
            &format!("{mib}M"),
        ],
        tmp.path(),
    );
    let disk = tmp.path().join("debian.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((mib + 4) << 20)
        .unwrap();
    run(
        "sh",
        &[
            "-c",
            &format!(
                "echo 'label: gpt\nstart=2048, size={}, type={LINUX_GUID}' | sfdisk --no-reread --no-tell-kernel '{}'",
                mib * 2048,
                disk.display()
            ),
        ],
        tmp.path(),
    );
    run(
        "dd",
        &[
            &format!("if={}", fs.display()),
            &format!("of={}", disk.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc",
        ],
        tmp.path(),
    );
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let info = boot::prepare(&disk, &out, "debian").unwrap();
    let rel = |p: &Path| format!("/{}", p.strip_prefix(&tree).unwrap().display());
    assert_eq!(info.kernel_source, rel(&kernel));
    assert_eq!(info.initrd_source.as_deref(), Some(rel(&initrd).as_str()));
    assert_eq!(
        std::fs::read(&info.kernel).unwrap(),
        std::fs::read(&kernel).unwrap()
    );
    assert_eq!(
        std::fs::read(info.initrd.as_ref().unwrap()).unwrap(),
        std::fs::read(&initrd).unwrap()
    );
    assert_eq!(info.root_uuid, ROOT_UUID);
    assert_eq!(info.partition_table, "gpt");
}
