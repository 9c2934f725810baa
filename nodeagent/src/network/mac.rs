//! MAC addresses and the StratusLab convention that ties a guest MAC to its IPv4 address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// First two bytes of every StratusLab guest MAC: `02` marks a locally administered unicast
/// address, so generated MACs never collide with vendor-assigned ones.
pub const STRATUSLAB_MAC_PREFIX: [u8; 2] = [0x02, 0x00];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("invalid MAC address {0:?}: expected six hex bytes separated by ':'")]
    Parse(String),
    #[error("MAC address {0} does not start with 02:00, so it encodes no IPv4 address")]
    NotStratusLab(MacAddr),
}

/// An Ethernet MAC address, written and serialised as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The StratusLab MAC for an address: `02:00` then the four IPv4 bytes, so an operator
    /// reading a bridge's forwarding table sees which guest address each port carries.
    pub fn from_ipv4(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        MacAddr([
            STRATUSLAB_MAC_PREFIX[0],
            STRATUSLAB_MAC_PREFIX[1],
            a,
            b,
            c,
            d,
        ])
    }

    /// The IPv4 address encoded in a StratusLab MAC.
    pub fn to_ipv4(self) -> Result<Ipv4Addr, MacError> {
        let b = self.0;
        if b[..2] != STRATUSLAB_MAC_PREFIX {
            return Err(MacError::NotStratusLab(self));
        }
        Ok(Ipv4Addr::new(b[2], b[3], b[4], b[5]))
    }

    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Accepts the 6-byte hardware address a DHCP message or netlink attribute carries.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacError::Parse(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratuslab_convention_round_trips() {
        let ip = Ipv4Addr::new(192, 168, 1, 10);
        let mac = MacAddr::from_ipv4(ip);
        assert_eq!(mac.to_string(), "02:00:c0:a8:01:0a");
        assert_eq!(mac.to_ipv4().unwrap(), ip);
        let parsed: MacAddr = "02:00:c6:12:00:ff".parse().unwrap();
        assert_eq!(parsed.to_ipv4().unwrap(), Ipv4Addr::new(198, 18, 0, 255));
    }

    #[test]
    fn foreign_prefix_encodes_no_address() {
        let mac: MacAddr = "0a:0a:86:9e:49:2a".parse().unwrap();
        assert_eq!(mac.to_ipv4(), Err(MacError::NotStratusLab(mac)));
    }

    #[test]
    fn parse_accepts_upper_case_and_rejects_malformed() {
        let mac: MacAddr = "02:00:AB:cd:0E:f0".parse().unwrap();
        assert_eq!(mac.octets(), [0x02, 0x00, 0xab, 0xcd, 0x0e, 0xf0]);
        for bad in [
            "",
            "02:00:c0:a8:01",
            "02:00:c0:a8:01:0a:00",
            "02-00-c0-a8-01-0a",
            "02:00:c0:a8:01:0g",
            "2:00:c0:a8:01:0a0",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(MacError::Parse(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn serde_uses_colon_string() {
        let mac = MacAddr::from_ipv4(Ipv4Addr::new(198, 18, 0, 10));
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"02:00:c6:12:00:0a\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        assert!(serde_json::from_str::<MacAddr>("\"nonsense\"").is_err());
    }
}
