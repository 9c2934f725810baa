//! Image download throughput: stratus-image-fetch (HTTP + xz decompression + checksums +
//! writing the image) against `curl | xz -d | sha1sum`, both from a small HTTP server in
//! this process on 127.0.0.1.

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Size of the blocks the test image is made of.
pub const BLOCK: usize = 64 << 10;

/// A deterministic xorshift generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Block number `i` of the image: random (4 in 10), a copy of one of 16 fixed random blocks
/// (3 in 10, long-range repeats), or low-entropy bytes (3 in 10).
pub fn image_block(rng: &mut Rng, templates: &[Vec<u8>], out: &mut [u8]) {
    match rng.next_u64() % 10 {
        0..=3 => rng.fill(out),
        4..=6 => {
            let t = &templates[(rng.next_u64() % templates.len() as u64) as usize];
            out.copy_from_slice(&t[..out.len()]);
        }
        _ => {
            rng.fill(out);
            for b in out.iter_mut() {
                *b &= 0x0f;
            }
        }
    }
}

/// Write an image of `size` bytes (a whole number of blocks) to `w`.
pub fn write_image(w: &mut impl Write, size: u64, seed: u64) -> std::io::Result<()> {
    let mut rng = Rng::new(seed);
    let templates: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            let mut b = vec![0u8; BLOCK];
            rng.fill(&mut b);
            b
        })
        .collect();
    let mut block = vec![0u8; BLOCK];
    for _ in 0..size / BLOCK as u64 {
        image_block(&mut rng, &templates, &mut block);
        w.write_all(&block)?;
    }
    Ok(())
}

/// The xz-compressed image of `size_mib` MiB and the SHA-1 of its content, made once and
/// kept in `dir`.
pub fn prepare_image(dir: &Path, size_mib: u64) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let xz = dir.join(format!("img-{size_mib}.xz"));
    let sha_file = dir.join(format!("img-{size_mib}.sha1"));
    if xz.exists() {
        if let Ok(sha) = std::fs::read_to_string(&sha_file) {
            return Ok((xz, sha.trim().to_string()));
        }
    }
    let raw = dir.join(format!("img-{size_mib}.raw"));
    {
        let f = std::fs::File::create(&raw)
            .with_context(|| format!("cannot create {}", raw.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        write_image(&mut w, size_mib << 20, 42)?;
        w.flush()?;
    }
    let out = Command::new("sha1sum")
        .arg(&raw)
        .output()
        .context("sha1sum")?;
    if !out.status.success() {
        bail!("sha1sum {} failed", raw.display());
    }
    let sha = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let status = Command::new("xz")
        .args(["-T2", "-3", "-c"])
        .arg(&raw)
        .stdout(std::fs::File::create(&xz)?)
        .status()
        .context("xz")?;
    std::fs::remove_file(&raw)?;
    if !status.success() {
        let _ = std::fs::remove_file(&xz);
        bail!("xz -T2 -3 {} failed", raw.display());
    }
    std::fs::write(&sha_file, &sha)?;
    Ok((xz, sha))
}

/// Serve `file` (any path) over HTTP/1.1 on 127.0.0.1 until the process ends; returns the
/// port.
pub fn serve(file: PathBuf) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let file = file.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &file);
            });
        }
    });
    Ok(port)
}

fn answer(mut stream: TcpStream, file: &Path) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/x-xz\r\nConnection: close\r\n\r\n"
    )?;
    // File to socket: std uses sendfile here.
    std::io::copy(&mut f, &mut stream)?;
    Ok(())
}

/// Time `stratus-image-fetch URL DEST --bytes N --checksum SHA-1=...`.
pub fn time_stratus(
    fetch: &Path,
    url: &str,
    dest: &Path,
    bytes: u64,
    sha1: &str,
) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(fetch)
        .arg(url)
        .arg(dest)
        .args([
            "--bytes",
            &bytes.to_string(),
            "--checksum",
            &format!("SHA-1={sha1}"),
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", fetch.display()))?;
    let t = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            fetch.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_file(dest)?;
    Ok(t)
}

/// Time `curl -s URL | xz -d | sha1sum` and check the digest.
pub fn time_curl(url: &str, sha1: &str) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new("sh")
        .args(["-c", &format!("curl -s '{url}' | xz -d | sha1sum")])
        .stdin(Stdio::null())
        .output()
        .context("cannot run sh")?;
    let t = start.elapsed();
    let got = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || got.split_whitespace().next() != Some(sha1) {
        bail!(
            "curl | xz -d | sha1sum gave '{}', expected {sha1}",
            got.trim()
        );
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_deterministic_and_mixed() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_image(&mut a, 64 * BLOCK as u64, 7).unwrap();
        write_image(&mut b, 64 * BLOCK as u64, 7).unwrap();
        assert_eq!(a.len(), 64 * BLOCK);
        assert_eq!(a, b);
        let blocks: Vec<&[u8]> = a.chunks(BLOCK).collect();
        let low = blocks.iter().filter(|b| b.iter().all(|x| *x < 16)).count();
        let repeated = blocks
            .iter()
            .enumerate()
            .filter(|(i, b)| blocks[..*i].contains(b))
            .count();
        assert!(low > 5 && low < 40, "{low} low-entropy blocks");
        assert!(repeated > 5 && repeated < 40, "{repeated} repeated blocks");
    }
}
