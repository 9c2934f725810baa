//! Helpers shared by the integration tests. External tools (openssl, xmlsec1, gzip, bzip2,
//! xz) are required: a missing tool fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Run a tool; panic (failing the test) if it is missing or exits non-zero.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("required tool '{program}' could not be run: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a tool and return whether it succeeded (the tool itself must exist).
pub fn run_status(program: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("required tool '{program}' could not be run: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A test PKI: a CA and an endorser certificate issued by it (see
/// `stratus_images::test_pki`).
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        Pki::for_endorser(dir, "Jane Endorser", "jane@stratuslab.eu")
    }

    /// A CA and an endorser certificate for `name` <`email`>, in `dir`.
    pub fn for_endorser(dir: &Path, name: &str, email: &str) -> Pki {
        let made = stratus_images::test_pki::TestPki::make(dir, "StratusLab", name, email, 30)
            .unwrap_or_else(|e| panic!("{e}"));
        Pki {
            dir: made.dir,
            ca_cert: made.ca_cert,
            key: made.key,
            cert: made.cert,
        }
    }

    pub fn signer(&self) -> stratus_images::dsig::Signer {
        stratus_images::dsig::Signer::from_pem(
            &std::fs::read_to_string(&self.key).unwrap(),
            &std::fs::read_to_string(&self.cert).unwrap(),
        )
        .unwrap()
    }
}

/// Deterministic test image content with some structure (so it compresses).
pub fn image_bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|i| {
            if (i / 4096) % 3 == 0 {
                0
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x & 0xff) as u8
            }
        })
        .collect()
}

/// How the test server answers for one path.
#[derive(Clone)]
pub enum Route {
    /// This body, honouring `Range` (206) and `If-Range` against its ETag.
    Body(Vec<u8>),
    /// 200 with this body, sent slowly (in chunks with pauses).
    Slow(Vec<u8>),
    /// 200 announcing the full length but closing after half of the body, ignoring
    /// `Range`.
    Truncated(Vec<u8>),
    /// This body with this ETag; the first `cuts` requests close the connection after
    /// `after` bytes of their body. `ranges`: whether `Range` is honoured (else every
    /// answer is a 200 with the whole body).
    Flaky {
        body: Vec<u8>,
        etag: String,
        after: usize,
        cuts: usize,
        ranges: bool,
    },
}

/// One request the test server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

/// Etag of `Route::Body` answers.
pub const BODY_ETAG: &str = "\"body-v1\"";

/// A minimal HTTP/1.1 server on 127.0.0.1 counting requests per path and body bytes
/// sent; unknown paths get 404.
pub struct TestServer {
    pub port: u16,
    pub hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
    pub sent: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

fn header_value(text: &str, name: &str) -> Option<String> {
    text.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The body offset a request asks for, if `Range: bytes=N-` applies.
fn range_start(req: &Request, etag: &str) -> Option<usize> {
    let from = req
        .range
        .as_deref()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?;
    match &req.if_range {
        Some(v) if v != etag => None,
        _ => from.parse().ok(),
    }
}

impl TestServer {
    pub fn start(routes: Vec<(&str, Route)>) -> TestServer {
        use std::io::{Read, Write};
        use std::sync::{Arc, Mutex};
        let routes: Arc<std::collections::HashMap<String, Route>> = Arc::new(
            routes
                .into_iter()
                .map(|(p, r)| (p.to_string(), r))
                .collect(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let (h, l, s) = (hits.clone(), log.clone(), sent.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let routes = routes.clone();
                let (hits, log, sent) = (h.clone(), l.clone(), s.clone());
                std::thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&req);
                    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let request = Request {
                        path: path.clone(),
                        range: header_value(&text, "range"),
                        if_range: header_value(&text, "if-range"),
                    };
                    let nth = {
                        let mut hits = hits.lock().unwrap();
                        let n = hits.entry(path.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    log.lock().unwrap().push(request.clone());
                    let head = |len: usize| {
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
                    };
                    // Send the answer for `body` (Range honoured if `ranges`), at most
                    // `limit` body bytes; returns the body bytes written.
                    let mut answer = |body: &[u8], etag: &str, ranges: bool, limit: usize| {
                        let start = if ranges {
                            range_start(&request, etag)
                        } else {
                            None
                        };
                        let (head, from) = match start {
                            Some(n) if n >= body.len() => (
                                format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", body.len()),
                                body.len(),
                            ),
                            Some(n) => (
                                format!("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{}\r\nContent-Length: {}\r\nETag: {etag}\r\nConnection: close\r\n\r\n", body.len() - 1, body.len(), body.len() - n),
                                n,
                            ),
                            None => (
                                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {etag}\r\nConnection: close\r\n\r\n", body.len()),
                                0,
                            ),
                        };
                        let part = &body[from..body.len().min(from.saturating_add(limit))];
                        let r = stream
                            .write_all(head.as_bytes())
                            .and_then(|_| stream.write_all(part));
                        (r, part.len())
                    };
                    let (r, n) = match routes.get(&path) {
                        None => (stream.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
                        ), 0),
                        Some(Route::Body(b)) => answer(b, BODY_ETAG, true, usize::MAX),
                        Some(Route::Slow(b)) => {
                            let mut r = stream.write_all(head(b.len()).as_bytes());
                            for chunk in b.chunks(b.len() / 10 + 1) {
                                std::thread::sleep(std::time::Duration::from_millis(30));
                                r = r.and_then(|_| stream.write_all(chunk));
                            }
                            (r, b.len())
                        }
                        Some(Route::Truncated(b)) => (stream
                            .write_all(head(b.len()).as_bytes())
                            .and_then(|_| stream.write_all(&b[..b.len() / 2])), b.len() / 2),
                        Some(Route::Flaky { body, etag, after, cuts, ranges }) => {
                            let limit = if nth <= *cuts { *after } else { usize::MAX };
                            answer(body, etag, *ranges, limit)
                        }
                    };
                    *sent.lock().unwrap().entry(path).or_insert(0) += n as u64;
                    let _ = r;
                    let _ = stream.flush();
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        TestServer {
            port,
            hits,
            log,
            sent,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// The requests received for `path`, in order.
    pub fn requests(&self, path: &str) -> Vec<Request> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Body bytes written for `path` over all requests.
    pub fn sent(&self, path: &str) -> u64 {
        self.sent.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// Compress `data` with an external tool (`gzip`, `bzip2` or `xz`).
pub fn compress_with(tool: &str, data: &[u8], dir: &Path) -> Vec<u8> {
    let src = dir.join(format!("input-for-{tool}"));
    std::fs::write(&src, data).unwrap();
    let out = run(tool, &["-c", "-9", src.to_str().unwrap()], dir);
    std::fs::remove_file(&src).unwrap();
    out.stdout
}
