//! One request to a VMM's control API socket, for shells without a Unix-socket HTTP client
//! (the nested harness's busybox L1): `api_call SOCKET METHOD PATH [JSON-BODY]`. Prints the
//! status code and the body on one line (`200 {...}`); exits 0 for 2xx answers, else 1.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, method, path, body) = match args.as_slice() {
        [s, m, p] => (s, m, p, String::new()),
        [s, m, p, b] => (s, m, p, b.clone()),
        _ => anyhow::bail!("usage: api_call SOCKET METHOD PATH [JSON-BODY]"),
    };
    let mut stream = UnixStream::connect(socket)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header in the answer: {text:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    println!("{status} {body}");
    std::process::exit(if (200..300).contains(&status) { 0 } else { 1 });
}
