//! `ops::build` measures images (decompressing them) and agrees with coreutils.
mod common;

use common::{compress_with, image_bytes, run};
use stratus_images::{ops, Algorithm, Compression, Endorser, ImageFormat};

fn endorser() -> Endorser {
    Endorser {
        email: "jane@stratuslab.eu".into(),
        subject: "CN=Jane Endorser,O=StratusLab,C=EU".into(),
        issuer: "CN=StratusLab Test CA,O=StratusLab,C=EU".into(),
    }
}

#[test]
fn build_measures_the_decompressed_image() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes(300_000, 7);
    let raw = dir.path().join("disk.img");
    std::fs::write(&raw, &data).unwrap();
    let sums = |tool: &str| {
        let out = run(tool, &[raw.to_str().unwrap()], dir.path());
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let (md5, sha1, sha256, sha512) = (
        sums("md5sum"),
        sums("sha1sum"),
        sums("sha256sum"),
        sums("sha512sum"),
    );
    for (tool, compression) in [
        ("gzip", Compression::Gz),
        ("bzip2", Compression::Bz2),
        ("xz", Compression::Xz),
    ] {
        let path = dir.path().join(format!("disk.img.{tool}"));
        std::fs::write(&path, compress_with(tool, &data, dir.path())).unwrap();
        let m = ops::build(&path, endorser(), "machine").unwrap();
        assert_eq!(m.bytes, data.len() as u64, "{tool}");
        assert_eq!(m.compression, Some(compression));
        assert_eq!(m.format, Some(ImageFormat::Raw));
        assert_eq!(m.checksums.get(Algorithm::Md5), Some(md5.as_str()));
        assert_eq!(m.checksums.get(Algorithm::Sha1), Some(sha1.as_str()));
        assert_eq!(m.checksums.get(Algorithm::Sha256), Some(sha256.as_str()));
        assert_eq!(m.checksums.get(Algorithm::Sha512), Some(sha512.as_str()));
        assert_eq!(m.identifier.to_sha1_hex(), sha1);
        // The built entry survives the XML round trip.
        assert_eq!(stratus_images::Metadata::from_xml(&m.to_xml()).unwrap(), m);
    }
    let m = ops::build(&raw, endorser(), "machine").unwrap();
    assert_eq!(m.compression, Some(Compression::None));
    // qcow2 is recognised by its header.
    let q = dir.path().join("disk.qcow2");
    let mut qdata = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    qdata.resize(65536, 0);
    std::fs::write(&q, &qdata).unwrap();
    assert_eq!(
        ops::build(&q, endorser(), "machine").unwrap().format,
        Some(ImageFormat::Qcow2)
    );
    let e = ops::build(&dir.path().join("absent.img"), endorser(), "machine").unwrap_err();
    assert!(e.to_string().contains("absent.img"), "{e}");
}
