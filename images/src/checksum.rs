//! Image checksums (MD5, SHA-1, SHA-256, SHA-512) computed in one streaming pass.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

use crate::error::{Error, Result};

/// A checksum algorithm of StratusLab metadata (`slreq:algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    /// All algorithms, in the order they are emitted.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Md5,
        Algorithm::Sha1,
        Algorithm::Sha256,
        Algorithm::Sha512,
    ];

    /// The name used in metadata entries (`MD5`, `SHA-1`, `SHA-256`, `SHA-512`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha1 => "SHA-1",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha512 => "SHA-512",
        }
    }

    /// Length of the digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Algorithm> {
        match s.trim().to_ascii_uppercase().as_str() {
            "MD5" => Ok(Algorithm::Md5),
            "SHA-1" | "SHA1" => Ok(Algorithm::Sha1),
            "SHA-256" | "SHA256" => Ok(Algorithm::Sha256),
            "SHA-512" | "SHA512" => Ok(Algorithm::Sha512),
            _ => Err(Error::InvalidMetadata(format!(
                "unknown checksum algorithm '{s}' (expected MD5, SHA-1, SHA-256 or SHA-512)"
            ))),
        }
    }
}

impl serde::Serialize for Algorithm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Algorithm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checksums of one image, lower-case hexadecimal by algorithm.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Checksums(pub BTreeMap<Algorithm, String>);

impl Checksums {
    /// The checksum for `alg`, if present.
    pub fn get(&self, alg: Algorithm) -> Option<&str> {
        self.0.get(&alg).map(String::as_str)
    }

    /// Set a checksum (stored lower-case).
    pub fn insert(&mut self, alg: Algorithm, hex: &str) {
        self.0.insert(alg, hex.to_ascii_lowercase());
    }

    /// Iterate over (algorithm, hex value).
    pub fn iter(&self) -> impl Iterator<Item = (Algorithm, &str)> {
        self.0.iter().map(|(a, v)| (*a, v.as_str()))
    }

    /// Check that every checksum in `expected` equals ours; the error names the first
    /// algorithm that differs, with expected and actual values.
    pub fn verify_against(&self, expected: &Checksums, what: &str) -> Result<()> {
        for (alg, want) in expected.iter() {
            let got = self.get(alg).unwrap_or("");
            if !want.eq_ignore_ascii_case(got) {
                return Err(Error::ChecksumMismatch {
                    url: what.to_string(),
                    algorithm: alg.name().to_string(),
                    expected: want.to_string(),
                    actual: got.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Computes MD5, SHA-1, SHA-256 and SHA-512 and counts bytes in one pass; use it as a
/// [`Write`] sink or feed it with [`MultiHasher::update`].
#[derive(Clone, Default)]
pub struct MultiHasher {
    md5: Md5,
    sha1: Sha1,
    sha256: Sha256,
    sha512: Sha512,
    bytes: u64,
}

impl MultiHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        self.sha1.update(data);
        self.sha256.update(data);
        self.sha512.update(data);
        self.bytes += data.len() as u64;
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Final (byte count, checksums).
    pub fn finish(self) -> (u64, Checksums) {
        let mut c = Checksums::default();
        c.insert(Algorithm::Md5, &encode_hex(&self.md5.finalize()));
        c.insert(Algorithm::Sha1, &encode_hex(&self.sha1.finalize()));
        c.insert(Algorithm::Sha256, &encode_hex(&self.sha256.finalize()));
        c.insert(Algorithm::Sha512, &encode_hex(&self.sha512.finalize()));
        (self.bytes, c)
    }
}

impl Write for MultiHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hash everything `reader` yields: (byte count, checksums).
pub fn hash_reader(mut reader: impl Read) -> io::Result<(u64, Checksums)> {
    let mut h = MultiHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(h.finish())
}

/// Lower-case hexadecimal.
pub fn encode_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// Decode hexadecimal (either case); `None` if malformed.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let v = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_of_abc() {
        let (n, c) = hash_reader(&b"abc"[..]).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            c.get(Algorithm::Md5),
            Some("900150983cd24fb0d6963f7d28e17f72")
        );
        assert_eq!(
            c.get(Algorithm::Sha1),
            Some("a9993e364706816aba3e25717850c26c9cd0d89d")
        );
        assert_eq!(
            c.get(Algorithm::Sha256),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert!(c
            .get(Algorithm::Sha512)
            .unwrap()
            .starts_with("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"));
    }

    #[test]
    fn chunked_equals_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = MultiHasher::new();
        for chunk in data.chunks(777) {
            h.write_all(chunk).unwrap();
        }
        assert_eq!(h.finish(), hash_reader(&data[..]).unwrap());
    }

    #[test]
    fn mismatch_names_algorithm() {
        let (_, c) = hash_reader(&b"abc"[..]).unwrap();
        let mut want = Checksums::default();
        want.insert(Algorithm::Sha256, &"0".repeat(64));
        let e = c.verify_against(&want, "img").unwrap_err().to_string();
        assert!(e.contains("SHA-256") && e.contains("ba7816bf"), "{e}");
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(decode_hex("00fFa1"), Some(vec![0, 255, 0xa1]));
        assert_eq!(decode_hex("0g"), None);
        assert_eq!(encode_hex(&[0, 255, 0xa1]), "00ffa1");
    }
}
