//! Download, decompression, verification, policy and the host image cache, against a
//! local HTTP server on 127.0.0.1.
mod common;

use std::path::Path;
use std::sync::Arc;

use chrono::{Duration, Utc};
use common::{compress_with, image_bytes, Request, Route, TestServer};
use stratus_images::cache::ImageCache;
use stratus_images::checksum::hash_reader;
use stratus_images::download::{self, Expected, Timeouts};
use stratus_images::policy::Policy;
use stratus_images::{Algorithm, Compression, Endorser, Error, Metadata};

const LEN: usize = 1 << 20;

fn entry(data: &[u8], locations: Vec<String>) -> Metadata {
    let (bytes, sums) = hash_reader(data).unwrap();
    let mut m = Metadata::new(
        bytes,
        sums,
        Endorser {
            email: "jane@stratuslab.eu".into(),
            subject: "CN=Jane Endorser,O=StratusLab,C=EU".into(),
            issuer: "CN=StratusLab Test CA,O=StratusLab,C=EU".into(),
        },
        "machine",
    )
    .unwrap();
    m.locations = locations;
    m
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (install qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image at `path` whose backing file is a host file the guest must never see.
fn backed_by_a_host_file(path: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        path,
    ]);
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn downloads_and_decompresses_gz_bz2_xz_and_plain() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 1);
    let gz = compress_with("gzip", &data, work.path());
    let bz2 = compress_with("bzip2", &data, work.path());
    let xz = compress_with("xz", &data, work.path());
    assert!(gz.len() < LEN && bz2.len() < LEN && xz.len() < LEN);
    let server = TestServer::start(vec![
        ("/img.gz", Route::Body(gz)),
        ("/img.bz2", Route::Body(bz2)),
        ("/img.xz", Route::Body(xz)),
        ("/img", Route::Body(data.clone())),
    ]);
    let m = entry(&data, vec![]);
    for (path, compression) in [
        ("/img.gz", Compression::Gz),
        ("/img.bz2", Compression::Bz2),
        ("/img.xz", Compression::Xz),
        ("/img", Compression::None),
    ] {
        let dest = work.path().join(format!("out{}", path.replace('/', "-")));
        let mut events = 0u32;
        let mut last = None;
        let d = download::download(
            &server.url(path),
            &dest,
            &Expected::from_metadata(&m),
            &mut |p| {
                events += 1;
                last = Some(p);
            },
        )
        .unwrap();
        assert_eq!(d.compression, compression, "{path}");
        assert_eq!(d.bytes, LEN as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), data, "{path}");
        assert!(!download::partial_path(&dest).exists());
        assert!(events > 0);
        assert_eq!(last.unwrap().written, LEN as u64);
        assert!(last.unwrap().total.is_some());
    }
    // file:// works the same way.
    let local = work.path().join("local.xz");
    std::fs::write(&local, compress_with("xz", &data, work.path())).unwrap();
    let dest = work.path().join("from-file");
    let url = format!("file://{}", local.display());
    download::download(&url, &dest, &Expected::from_metadata(&m), &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

fn cache_error(server: &TestServer, m: &Metadata, policy: Policy) -> (Error, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path(), policy).unwrap();
    let e = cache.get(m, &mut |_| {}).unwrap_err();
    let _ = server;
    (e, files_in(dir.path()))
}

#[test]
fn failures_give_the_right_error_and_leave_no_file() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 2);
    let gz = compress_with("gzip", &data, work.path());
    let other = image_bytes(LEN, 3);
    let server = TestServer::start(vec![
        ("/good.gz", Route::Body(gz.clone())),
        (
            "/other.gz",
            Route::Body(compress_with("gzip", &other, work.path())),
        ),
        ("/cut.gz", Route::Truncated(gz)),
        ("/cut.raw", Route::Truncated(data.clone())),
        ("/longer", Route::Body([data.clone(), vec![0; 10]].concat())),
    ]);

    // Checksum mismatch: same size, different content.
    let m = entry(&data, vec![server.url("/other.gz")]);
    let (e, files) = cache_error(&server, &m, Policy::default());
    match &e {
        Error::ChecksumMismatch {
            algorithm,
            expected,
            actual,
            ..
        } => {
            assert_eq!(algorithm, "MD5");
            assert_eq!(expected, m.checksums.get(Algorithm::Md5).unwrap());
            assert_ne!(expected, actual);
        }
        other => panic!("checksum mismatch expected, got {other:?}"),
    }
    assert!(files.is_empty(), "{files:?}");

    // Truncated downloads (compressed and plain).
    for path in ["/cut.gz", "/cut.raw"] {
        let m = entry(&data, vec![server.url(path)]);
        let (e, files) = cache_error(&server, &m, Policy::default());
        assert!(
            matches!(
                e,
                Error::Decompression { .. } | Error::Transport { .. } | Error::SizeMismatch { .. }
            ),
            "{path}: {e:?}"
        );
        assert!(e.to_string().contains(path), "{e}");
        // A transport failure keeps only the bytes received, for a later resume.
        let id = m.identifier.to_string();
        assert_eq!(
            files,
            vec![format!("{id}.download"), format!("{id}.download.meta")],
            "{path}"
        );
        // 1 request + MAX_RETRIES reconnections, each answered with a cut 200.
        assert_eq!(
            server.hits(path) as u32,
            1 + download::MAX_RETRIES,
            "{path}"
        );
    }

    // Wrong size: the entry announces fewer bytes than served.
    let m = entry(&data, vec![server.url("/longer")]);
    let (e, files) = cache_error(&server, &m, Policy::default());
    match e {
        Error::SizeMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, LEN as u64);
            assert!(actual > expected);
        }
        other => panic!("size mismatch expected, got {other:?}"),
    }
    assert!(files.is_empty());

    // 404.
    let m = entry(&data, vec![server.url("/missing.gz")]);
    let (e, files) = cache_error(&server, &m, Policy::default());
    assert!(matches!(e, Error::HttpStatus { status: 404, .. }), "{e:?}");
    assert!(e.to_string().contains("/missing.gz"));
    assert!(files.is_empty());

    // Policy refusal: nothing is even requested.
    let m = entry(&data, vec![server.url("/good.gz")]);
    let policy = Policy::parse(
        "[policy]\nblacklist_endorsers = mallory@example.org; JANE@stratuslab.eu\n",
        "test",
    )
    .unwrap();
    let (e, files) = cache_error(&server, &m, policy);
    match &e {
        Error::PolicyRefused { rule, value, .. } => {
            assert_eq!(rule, "blacklist_endorsers");
            assert_eq!(value, "JANE@stratuslab.eu");
        }
        other => panic!("policy refusal expected, got {other:?}"),
    }
    assert!(files.is_empty());
    assert_eq!(server.hits("/good.gz"), 0);

    // Expired entries are refused too.
    let mut expired = entry(&data, vec![server.url("/good.gz")]);
    expired.valid = Some(Utc::now() - Duration::days(1));
    let (e, files) = cache_error(&server, &expired, Policy::default());
    assert!(matches!(e, Error::Expired { .. }), "{e:?}");
    assert!(files.is_empty());
    assert_eq!(server.hits("/good.gz"), 0);

    // The good location after a bad one is used.
    let m = entry(
        &data,
        vec![
            server.url("/missing.gz"),
            "pdisk:host/uuid".into(),
            server.url("/good.gz"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path(), Policy::default()).unwrap();
    let p = cache.get(&m, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), data);
    assert_eq!(files_in(dir.path()), vec![m.identifier.to_string()]);
}

#[test]
fn policy_lists() {
    let data = image_bytes(4096, 9);
    let m = entry(&data, vec![]);
    let sha1 = m.checksums.get(Algorithm::Sha1).unwrap().to_string();
    let id = m.identifier.to_string();
    let ok = |text: &str| Policy::parse(text, "t").unwrap().check(&m);
    ok("").unwrap();
    ok("whitelist_endorsers = CN=Jane Endorser,O=StratusLab,C=EU").unwrap();
    ok(&format!("whitelist_checksums = {}", sha1.to_uppercase())).unwrap();
    ok(&format!("whitelist_identifiers = {id}")).unwrap();
    let rule = |text: &str| match ok(text) {
        Err(Error::PolicyRefused { rule, .. }) => rule,
        other => panic!("{text}: {other:?}"),
    };
    assert_eq!(
        rule("whitelist_endorsers = bob@example.org"),
        "whitelist_endorsers"
    );
    assert_eq!(
        rule(&format!("blacklist_checksums = {sha1}")),
        "blacklist_checksums"
    );
    assert_eq!(
        rule(&format!("whitelist_checksums = {}", "0".repeat(40))),
        "whitelist_checksums"
    );
    assert_eq!(
        rule(&format!("blacklist_identifiers = x {id}")),
        "blacklist_identifiers"
    );
    assert_eq!(
        rule("whitelist_identifiers = MMZu9WvwKIro-rtBQfDk4PsKO7_"),
        "whitelist_identifiers"
    );
    // The entry may spell its endorser as the certificate check allows (any DN form and
    // order, spaces around the email): the lists still know them.
    let mut respelled = m.clone();
    respelled.endorsement.endorser.subject = "/C=eu/O=StratusLab/CN=JANE ENDORSER".into();
    respelled.endorsement.endorser.email = format!(" {} ", m.endorsement.endorser.email);
    for listed in [
        "CN=Jane Endorser,O=StratusLab,C=EU",
        "C = EU, O = StratusLab, CN = Jane Endorser",
        "jane@stratuslab.eu",
    ] {
        let policy = Policy::parse(&format!("blacklist_endorsers = {listed}"), "t").unwrap();
        assert!(
            matches!(policy.check(&respelled), Err(Error::PolicyRefused { .. })),
            "{listed} let the respelled endorser through"
        );
        let policy = Policy::parse(&format!("whitelist_endorsers = {listed}"), "t").unwrap();
        policy.check(&respelled).unwrap();
    }
    let e = Policy::parse("colour = red", "site.cfg")
        .unwrap_err()
        .to_string();
    assert!(e.contains("site.cfg") && e.contains("colour"), "{e}");
}

#[test]
fn concurrent_fetches_share_one_download() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 4);
    let server = TestServer::start(vec![(
        "/slow.xz",
        Route::Slow(compress_with("xz", &data, work.path())),
    )]);
    let m = entry(&data, vec![server.url("/slow.xz")]);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ImageCache::new(dir.path(), Policy::default()).unwrap());
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            let m = m.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                cache.get(&m, &mut |_| {}).unwrap()
            })
        })
        .collect();
    let paths: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(paths.iter().all(|p| *p == paths[0]));
    assert_eq!(
        server.hits("/slow.xz"),
        1,
        "one download for 8 concurrent requests"
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), data);
    // Later requests reuse the cached file.
    cache.get(&m, &mut |_| {}).unwrap();
    assert_eq!(server.hits("/slow.xz"), 1);
}

/// A shared download that fails gives every request sharing it the error it met, as
/// the source of theirs: a node agent answers a refused image with 400 for all of them,
/// not 400 for one and 502 for the others.
#[test]
fn a_failed_shared_download_gives_each_request_the_error_it_met() {
    let work = tempfile::tempdir().unwrap();
    let backed = work.path().join("backed.qcow2");
    backed_by_a_host_file(backed.to_str().unwrap());
    let data = std::fs::read(&backed).unwrap();
    let server = TestServer::start(vec![("/backed.qcow2", Route::Slow(data.clone()))]);
    let m = entry(&data, vec![server.url("/backed.qcow2")]);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ImageCache::new(dir.path(), Policy::default()).unwrap());
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (cache, m, barrier) = (cache.clone(), m.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.get(&m, &mut |_| {}).unwrap_err()
            })
        })
        .collect();
    let errors: Vec<Error> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        server.hits("/backed.qcow2"),
        1,
        "one download for 4 requests"
    );
    for e in &errors {
        assert!(
            matches!(e.root(), Error::UnsafeImage { reason, .. } if reason.contains("backing file")),
            "{e:?}"
        );
        if let Error::SharedDownloadFailed { .. } = e {
            let source = std::error::Error::source(e).expect("the shared error is the source");
            assert!(source.to_string().contains("backing file"), "{source}");
        }
    }
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn corrupt_cache_entry_is_refetched() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 5);
    let server = TestServer::start(vec![(
        "/img.bz2",
        Route::Body(compress_with("bzip2", &data, work.path())),
    )]);
    let m = entry(&data, vec![server.url("/img.bz2")]);
    let dir = tempfile::tempdir().unwrap();
    let path = ImageCache::new(dir.path(), Policy::default())
        .unwrap()
        .get(&m, &mut |_| {})
        .unwrap();
    assert_eq!(server.hits("/img.bz2"), 1);
    // Flip one byte in the cached copy; a new cache instance (new process) must notice.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[LEN / 2] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let cache = ImageCache::new(dir.path(), Policy::default()).unwrap();
    let again = cache.get(&m, &mut |_| {}).unwrap();
    assert_eq!(again, path);
    assert_eq!(server.hits("/img.bz2"), 2, "corrupt entry refetched");
    assert_eq!(std::fs::read(&again).unwrap(), data);
    // An intact entry is not refetched.
    ImageCache::new(dir.path(), Policy::default())
        .unwrap()
        .get(&m, &mut |_| {})
        .unwrap();
    assert_eq!(server.hits("/img.bz2"), 2);
}

/// Everything a download leaves beside `dest` (besides `dest` itself).
fn leftovers(dest: &Path) -> Vec<std::path::PathBuf> {
    [
        download::partial_path(dest),
        download::resume_path(dest),
        download::resume_meta_path(dest),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect()
}

fn flaky(body: &[u8], after: usize, cuts: usize, ranges: bool) -> Route {
    Route::Flaky {
        body: body.to_vec(),
        etag: "\"v7\"".into(),
        after,
        cuts,
        ranges,
    }
}

#[test]
fn a_cut_connection_is_resumed_with_range() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 11);
    let xz = compress_with("xz", &data, work.path());
    let cut = xz.len() / 3;
    let server = TestServer::start(vec![("/img.xz", flaky(&xz, cut, 1, true))]);
    let m = entry(&data, vec![]);
    let dest = work.path().join("img");
    let mut last = None;
    let d = download::download(
        &server.url("/img.xz"),
        &dest,
        &Expected::from_metadata(&m),
        &mut |p| last = Some(p),
    )
    .unwrap();
    assert_eq!(d.bytes, LEN as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(
        server.requests("/img.xz"),
        vec![
            Request {
                path: "/img.xz".into(),
                range: None,
                if_range: None
            },
            Request {
                path: "/img.xz".into(),
                range: Some(format!("bytes={cut}-")),
                if_range: Some("\"v7\"".into())
            },
        ]
    );
    // Only the missing part was fetched again.
    assert_eq!(server.sent("/img.xz"), xz.len() as u64);
    let last = last.unwrap();
    assert_eq!(last.resumed, cut as u64);
    assert_eq!(last.received, xz.len() as u64);
    assert_eq!(last.total, Some(xz.len() as u64));
    assert_eq!(last.written, LEN as u64);
    assert!(leftovers(&dest).is_empty(), "{:?}", leftovers(&dest));
}

#[test]
fn a_server_ignoring_range_still_gives_a_correct_file() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 12);
    let gz = compress_with("gzip", &data, work.path());
    let cut = gz.len() / 2;
    let server = TestServer::start(vec![("/img.gz", flaky(&gz, cut, 1, false))]);
    let m = entry(&data, vec![]);
    let dest = work.path().join("img");
    let mut last = None;
    download::download(
        &server.url("/img.gz"),
        &dest,
        &Expected::from_metadata(&m),
        &mut |p| last = Some(p),
    )
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = server.requests("/img.gz");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range, Some(format!("bytes={cut}-")));
    // The 200 answer to the Range request is used from its first byte: no third request.
    assert_eq!(server.sent("/img.gz"), (cut + gz.len()) as u64);
    assert_eq!(last.unwrap().resumed, 0);
    assert!(leftovers(&dest).is_empty());
}

#[test]
fn a_partial_download_left_by_an_earlier_process_is_resumed() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 13);
    let bz2 = compress_with("bzip2", &data, work.path());
    let step = bz2.len() / 8;
    let attempts = 1 + download::MAX_RETRIES as usize;
    // Every connection of the first call is cut: it fails, keeping what it received.
    let server = TestServer::start(vec![("/img.bz2", flaky(&bz2, step, attempts, true))]);
    let m = entry(&data, vec![]);
    let dest = work.path().join("img");
    let url = server.url("/img.bz2");
    let e = download::download(&url, &dest, &Expected::from_metadata(&m), &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(e.to_string().contains("/img.bz2"), "{e}");
    assert!(!dest.exists() && !download::partial_path(&dest).exists());
    let kept = std::fs::read(download::resume_path(&dest)).unwrap();
    assert_eq!(kept, bz2[..attempts * step]);
    assert_eq!(server.sent("/img.bz2"), (attempts * step) as u64);

    // A later call (as by a new process: only the files are shared) continues there.
    let mut last = None;
    download::download(&url, &dest, &Expected::from_metadata(&m), &mut |p| {
        last = Some(p)
    })
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = server.requests("/img.bz2");
    assert_eq!(reqs.len(), attempts + 1);
    assert_eq!(
        reqs[attempts].range,
        Some(format!("bytes={}-", attempts * step))
    );
    assert_eq!(server.sent("/img.bz2"), bz2.len() as u64);
    assert_eq!(last.unwrap().resumed, (attempts * step) as u64);
    assert!(leftovers(&dest).is_empty());
}

#[test]
fn a_corrupt_partial_download_fails_verification_and_is_removed() {
    let work = tempfile::tempdir().unwrap();
    let data = image_bytes(LEN, 14);
    let server = TestServer::start(vec![("/img", flaky(&data, LEN / 4 - 1, 4, true))]);
    let m = entry(&data, vec![]);
    let dest = work.path().join("img");
    let url = server.url("/img");
    download::download(&url, &dest, &Expected::from_metadata(&m), &mut |_| {}).unwrap_err();
    // Complete the kept bytes (as if a process received everything and then crashed)
    // and damage them, as a bad disk might.
    let kept = download::resume_path(&dest);
    let mut bytes = std::fs::read(&kept).unwrap();
    assert_eq!(bytes.len(), LEN - 4);
    bytes.extend_from_slice(&data[LEN - 4..]);
    bytes[100] ^= 1;
    std::fs::write(&kept, bytes).unwrap();
    // The whole file was kept: the server answers 416 and the kept bytes are verified.
    let e = download::download(&url, &dest, &Expected::from_metadata(&m), &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::ChecksumMismatch { .. }), "{e:?}");
    assert_eq!(
        server.requests("/img")[4].range,
        Some(format!("bytes={LEN}-"))
    );
    assert!(leftovers(&dest).is_empty(), "{:?}", leftovers(&dest));
    assert!(!dest.exists());
    // Nothing kept any more: the next call starts from zero and succeeds.
    download::download(&url, &dest, &Expected::from_metadata(&m), &mut |_| {}).unwrap();
    assert_eq!(server.requests("/img")[5].range, None);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

#[test]
fn a_changed_resource_restarts_the_download() {
    let work = tempfile::tempdir().unwrap();
    let old = image_bytes(LEN, 15);
    let data = image_bytes(LEN, 16);
    let gz_old = compress_with("gzip", &old, work.path());
    let gz = compress_with("gzip", &data, work.path());
    let dest = work.path().join("img");
    let attempts = 1 + download::MAX_RETRIES as usize;
    // The first server always cuts: the old version is partly kept.
    let first = TestServer::start(vec![("/img.gz", flaky(&gz_old, 1000, attempts, true))]);
    let m = entry(&data, vec![]);
    download::download(
        &first.url("/img.gz"),
        &dest,
        &Expected::from_metadata(&m),
        &mut |_| {},
    )
    .unwrap_err();
    // The same URL now serves a new version (new ETag): If-Range makes it send it whole.
    let second = TestServer::start(vec![(
        "/img.gz",
        Route::Flaky {
            body: gz.clone(),
            etag: "\"v8\"".into(),
            after: 0,
            cuts: 0,
            ranges: true,
        },
    )]);
    let meta = download::resume_meta_path(&dest);
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(
        &meta,
        text.replace(&first.port.to_string(), &second.port.to_string()),
    )
    .unwrap();
    download::download(
        &second.url("/img.gz"),
        &dest,
        &Expected::from_metadata(&m),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = second.requests("/img.gz");
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].range, Some(format!("bytes={}-", attempts * 1000)));
    assert_eq!(reqs[0].if_range.as_deref(), Some("\"v7\""));
    assert_eq!(second.sent("/img.gz"), gz.len() as u64);
    assert!(leftovers(&dest).is_empty());
}

#[test]
fn qcow2_images_that_name_other_host_files_are_refused_and_not_kept() {
    let work = tempfile::tempdir().unwrap();
    let path = |name: &str| work.path().join(name).to_str().unwrap().to_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &path("alone.qcow2"), "4M"]);
    backed_by_a_host_file(&path("backed.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", path("data.raw")),
        &path("external.qcow2"),
        "4M",
    ]);

    let fetch = |name: &str| {
        let data = std::fs::read(path(name)).unwrap();
        let m = entry(&data, vec![format!("file://{}", path(name))]);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path(), Policy::default())
            .unwrap()
            .allowing_file_locations(true);
        let got = cache.get(&m, &mut |_| {});
        (
            got.map(|p| std::fs::read(p).unwrap() == data),
            files_in(dir.path()),
        )
    };
    // A file:// location is the endorser's choice, not the site's: refused unless the
    // site allows them.
    let data = std::fs::read(path("alone.qcow2")).unwrap();
    let m = entry(&data, vec![format!("file://{}", path("alone.qcow2"))]);
    let dir = tempfile::tempdir().unwrap();
    let refused = ImageCache::new(dir.path(), Policy::default())
        .unwrap()
        .get(&m, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("file:// locations are not followed"),
        "{refused}"
    );
    assert!(files_in(dir.path()).is_empty());
    let (ok, files) = fetch("alone.qcow2");
    assert!(
        ok.unwrap(),
        "a standalone qcow2 image is served as downloaded"
    );
    assert_eq!(files.len(), 1);
    for (name, why) in [
        ("backed.qcow2", "backing file"),
        ("external.qcow2", "external data file"),
    ] {
        let (refused, files) = fetch(name);
        match refused {
            Err(Error::UnsafeImage { reason, .. }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(
            files.is_empty(),
            "{name}: nothing may stay in the cache: {files:?}"
        );
        // Nor is it served when found in the cache with the right checksums (left there
        // by a crash between the download's rename and its check).
        let data = std::fs::read(path(name)).unwrap();
        let m = entry(&data, vec![]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(m.identifier.to_string()), &data).unwrap();
        let cache = ImageCache::new(dir.path(), Policy::default()).unwrap();
        match cache.get(&m, &mut |_| {}) {
            Err(Error::UnsafeImage { reason, .. }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{name} from the cache: {other:?}"),
        }
        assert!(files_in(dir.path()).is_empty(), "{name} stays cached");
    }
}

/// A server that takes connections and then stops: silent before its headers (`/silent`),
/// or after its headers and 1 KiB of the body (`/stalled`). It holds every connection.
fn stopping_server() -> std::net::SocketAddr {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            if line.contains("/stalled") {
                let mut stream = &stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n{}",
                    "x".repeat(1024)
                );
            }
            held.push(stream);
        }
    });
    addr
}

/// A server whose body has no length and never ends: a gzip header, then empty deflate
/// blocks (valid, and they decompress to nothing) for as long as the client reads.
fn endless_gzip_server() -> std::net::SocketAddr {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let mut stream = &stream;
                let head =
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n\x1f\x8b\x08\0\0\0\0\0\0\xff";
                if stream.write_all(head).is_err() {
                    return;
                }
                let blocks = [0u8, 0, 0, 0xff, 0xff].repeat(13107);
                while stream.write_all(&blocks).is_ok() {}
            });
        }
    });
    addr
}

#[test]
fn a_location_that_sends_far_more_than_the_image_is_cut_off_and_nothing_is_kept() {
    let addr = endless_gzip_server();
    let data = image_bytes(LEN, 3);
    let mut m = entry(&data, vec![format!("http://{addr}/image.gz")]);
    m.compression = Some(Compression::Gz);
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(dir.path(), Policy::default()).unwrap();
    let started = std::time::Instant::now();
    match cache.get(&m, &mut |_| {}) {
        Err(Error::TooMuchData {
            limit, image_bytes, ..
        }) => {
            assert_eq!(image_bytes, LEN as u64);
            assert!(limit < LEN as u64 + (2 << 20), "{limit}");
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

// Found by a review: with no receive timeout one server that stopped answering hung every
// VM waiting on its image.
#[test]
fn a_server_that_stops_answering_fails_the_download_instead_of_hanging_it() {
    let addr = stopping_server();
    let data = image_bytes(LEN, 9);
    let timeouts = Timeouts {
        response: std::time::Duration::from_secs(1),
        body_floor: std::time::Duration::from_secs(1),
        min_bytes_per_s: 1 << 30,
        unknown_body: std::time::Duration::from_secs(1),
    };
    for path in ["silent", "stalled"] {
        let m = entry(&data, vec![format!("http://{addr}/{path}")]);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path(), Policy::default())
            .unwrap()
            .with_timeouts(timeouts);
        let started = std::time::Instant::now();
        let e = cache.get(&m, &mut |_| {}).unwrap_err().to_string();
        assert!(e.to_lowercase().contains("timeout"), "{path}: {e}");
        // Resumed a few times, each attempt within its deadline; never for good.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{path}"
        );
        assert!(!dir.path().join(m.identifier.as_str()).exists());
    }
}
