//! Marketplace identifiers: the SHA-1 of an image as a 160-bit big-endian integer written
//! in radix 64 (`A–Z a–z 0–9 - _`), 27 digits, most significant first, left-padded with `A`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Number of characters in an identifier.
pub const IDENTIFIER_LEN: usize = 27;

/// A validated 27-character Marketplace identifier.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier(String);

fn digit_value(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

impl Identifier {
    /// Identifier of an image whose SHA-1 digest is `sha1`.
    pub fn from_sha1(sha1: &[u8; 20]) -> Identifier {
        // 27 digits of 6 bits = 162 bits; the number has 160, so bit i (from the least
        // significant end) of the 162-bit view is 0 for i >= 160.
        let bit = |i: usize| -> u8 {
            if i >= 160 {
                return 0;
            }
            let byte = sha1[19 - i / 8];
            (byte >> (i % 8)) & 1
        };
        let mut s = String::with_capacity(IDENTIFIER_LEN);
        for d in 0..IDENTIFIER_LEN {
            let low = 6 * (IDENTIFIER_LEN - 1 - d);
            let mut v = 0usize;
            for b in (0..6).rev() {
                v = (v << 1) | usize::from(bit(low + b));
            }
            s.push(char::from(ALPHABET[v]));
        }
        Identifier(s)
    }

    /// Identifier from a lower- or upper-case hexadecimal SHA-1.
    pub fn from_sha1_hex(hex: &str) -> Result<Identifier> {
        let bytes = crate::checksum::decode_hex(hex).ok_or_else(|| Error::InvalidIdentifier {
            value: hex.to_string(),
            reason: "not a hexadecimal SHA-1".into(),
        })?;
        let arr: [u8; 20] = bytes.try_into().map_err(|_| Error::InvalidIdentifier {
            value: hex.to_string(),
            reason: "a SHA-1 has 40 hexadecimal digits".into(),
        })?;
        Ok(Identifier::from_sha1(&arr))
    }

    /// The SHA-1 digest this identifier encodes.
    pub fn to_sha1(&self) -> [u8; 20] {
        let mut out = [0u8; 20];
        let bytes = self.0.as_bytes();
        for (d, c) in bytes.iter().enumerate() {
            let v = digit_value(*c).expect("validated identifier");
            let low = 6 * (IDENTIFIER_LEN - 1 - d);
            for b in 0..6 {
                let i = low + b;
                if (v >> b) & 1 == 1 && i < 160 {
                    out[19 - i / 8] |= 1 << (i % 8);
                }
            }
        }
        out
    }

    /// The SHA-1 digest as lower-case hexadecimal.
    pub fn to_sha1_hex(&self) -> String {
        crate::checksum::encode_hex(&self.to_sha1())
    }

    /// The identifier text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Identifier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Identifier> {
        let err = |reason: &str| Error::InvalidIdentifier {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        if s.len() != IDENTIFIER_LEN {
            return Err(err("must be exactly 27 characters"));
        }
        if let Some(c) = s.bytes().find(|c| digit_value(*c).is_none()) {
            return Err(err(&format!(
                "character '{}' is not in A-Z a-z 0-9 - _",
                char::from(c)
            )));
        }
        // 27 * 6 = 162 bits: the first digit holds only 4 significant bits.
        if digit_value(s.as_bytes()[0]).unwrap_or(0) > 15 {
            return Err(err("value exceeds 160 bits (first character must be A-P)"));
        }
        Ok(Identifier(s.to_string()))
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Identifier {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Identifier {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_test_vector() {
        let id = Identifier::from_sha1_hex("c319bbd5afc0a22ba3eaed0507c39383ec28eeff").unwrap();
        assert_eq!(id.as_str(), "MMZu9WvwKIro-rtBQfDk4PsKO7_");
        assert_eq!(id.to_sha1_hex(), "c319bbd5afc0a22ba3eaed0507c39383ec28eeff");
    }

    #[test]
    fn extremes() {
        assert_eq!(Identifier::from_sha1(&[0; 20]).as_str(), "A".repeat(27));
        let max = Identifier::from_sha1(&[0xff; 20]);
        assert_eq!(max.as_str(), format!("P{}", "_".repeat(26)));
        assert!("Q__________________________".parse::<Identifier>().is_err());
    }

    #[test]
    fn rejects_bad_text() {
        let e = "MMZu9WvwKIro-rtBQfDk4PsKO7"
            .parse::<Identifier>()
            .unwrap_err();
        assert!(e.to_string().contains("27 characters"), "{e}");
        let e = "MMZu9WvwKIro+rtBQfDk4PsKO7_"
            .parse::<Identifier>()
            .unwrap_err();
        assert!(e.to_string().contains("'+'"), "{e}");
    }
}
