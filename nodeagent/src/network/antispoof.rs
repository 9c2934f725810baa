//! Guests may only speak as themselves: per-TAP rules in the host's nftables `bridge`
//! family, the way OpenNebula and OpenStack guard their bridges with ebtables/iptables.
//!
//! A frame a guest sends into its TAP must carry the NIC's MAC as its source; IPv4 must
//! come from the leased address; ARP must announce that MAC and address; DHCP requests
//! must ask for that MAC's lease, at a bounded rate. Everything else a guest sends (IPv6,
//! VLAN tags, other EtherTypes) is dropped: Stratus hands out IPv4 leases only. So one
//! guest can neither take another's address or lease nor poison the bridge's tables.
//!
//! The rules match the TAP by name, not by index, so they are installed before the TAP
//! exists (no window in which a new port forwards unchecked) and stay in the kernel when
//! the agent dies; `protect` re-installs them idempotently when the agent takes a VM back.
//! Each change is one `nft -f` transaction: a port is never half-guarded.

use std::fmt::Write as _;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::mac::MacAddr;

/// The agent's table in the `bridge` family; every guest port's chain lives in it.
pub const TABLE: &str = "stratus";

/// DHCP packets a port may send per second, and in one burst (a booting guest sends a
/// handful; a flood would only keep the agent's server busy).
const DHCP_RATE_PER_SECOND: u32 = 5;
const DHCP_BURST: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum AntiSpoofError {
    #[error(
        "cannot run {nft} to install the guests' anti-spoofing rules \
         (install Debian's nftables package, or set anti_spoofing = false on the network): {source}"
    )]
    Spawn { nft: PathBuf, source: io::Error },
    #[error("{nft} refused the anti-spoofing rules for {what}: {stderr}")]
    Refused {
        nft: PathBuf,
        what: String,
        stderr: String,
    },
    #[error("invalid interface name {0:?} for an anti-spoofing chain")]
    BadName(String),
}

/// What one guest port may claim to be.
#[derive(Clone, Copy, Debug)]
pub struct GuestPort<'a> {
    pub tap: &'a str,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// The host's nftables, driven through the `nft` command.
#[derive(Clone, Debug)]
pub struct AntiSpoofing {
    nft: PathBuf,
}

impl Default for AntiSpoofing {
    fn default() -> Self {
        AntiSpoofing::new("nft")
    }
}

impl AntiSpoofing {
    pub fn new(nft: impl AsRef<Path>) -> Self {
        AntiSpoofing {
            nft: nft.as_ref().to_owned(),
        }
    }

    /// The table, its prerouting chain and the port → chain map (idempotent; running VMs'
    /// chains are kept).
    pub async fn ensure_table(&self) -> Result<(), AntiSpoofError> {
        self.apply("the agent's table", &base_script()).await
    }

    /// Installs (or replaces) the port's chain and its entry in the map, atomically.
    pub async fn protect(&self, port: &GuestPort<'_>) -> Result<(), AntiSpoofError> {
        let script = protect_script(port)?;
        self.apply(&format!("TAP {}", port.tap), &script).await
    }

    /// Removes the port's chain and map entry; removing an absent port succeeds.
    pub async fn release(&self, tap: &str) -> Result<(), AntiSpoofError> {
        let script = release_script(tap)?;
        self.apply(&format!("TAP {tap}"), &script).await
    }

    async fn apply(&self, what: &str, script: &str) -> Result<(), AntiSpoofError> {
        let spawn_error = |source| AntiSpoofError::Spawn {
            nft: self.nft.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(spawn_error)?;
        }
        let output = child.wait_with_output().await.map_err(spawn_error)?;
        if output.status.success() {
            return Ok(());
        }
        Err(AntiSpoofError::Refused {
            nft: self.nft.clone(),
            what: what.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The chain that holds one port's rules.
pub fn chain_name(tap: &str) -> String {
    format!("guest-{tap}")
}

fn base_script() -> String {
    format!(
        "add table bridge {TABLE}\n\
         add map bridge {TABLE} ports {{ type ifname : verdict; }}\n\
         add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority -200; policy accept; }}\n\
         flush chain bridge {TABLE} prerouting\n\
         add rule bridge {TABLE} prerouting iifname vmap @ports\n"
    )
}

/// Interface names go into nft's language between quotes: only the characters Linux and
/// our TAP names use, so nothing in a name can end the string.
fn checked(tap: &str) -> Result<&str, AntiSpoofError> {
    let valid = !tap.is_empty()
        && tap.len() < libc::IFNAMSIZ
        && tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(tap)
    } else {
        Err(AntiSpoofError::BadName(tap.to_owned()))
    }
}

fn protect_script(port: &GuestPort<'_>) -> Result<String, AntiSpoofError> {
    let tap = checked(port.tap)?;
    let chain = chain_name(tap);
    let mac = port.mac;
    let ip = port.ip;
    // DHCP's chaddr: 28 bytes into the message, after the 8-byte UDP header (bits 288..336).
    let chaddr: String = mac.octets().iter().fold("0x".into(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    });
    let mut script = base_script();
    let rules = [
        format!("ether saddr != {mac} drop"),
        format!(
            "ether type arp arp hlen 6 arp plen 4 arp saddr ether {mac} \
             arp saddr ip {{ 0.0.0.0, {ip} }} accept"
        ),
        "ether type arp drop".to_owned(),
        // Positive match: a request too short to hold chaddr, or one whose chaddr is not
        // the port's, never reaches the server.
        format!(
            "ether type ip ip saddr {{ 0.0.0.0, {ip} }} udp sport 68 udp dport 67 \
             @th,288,48 {chaddr} limit rate {DHCP_RATE_PER_SECOND}/second burst {DHCP_BURST} packets accept"
        ),
        "ether type ip udp dport 67 drop".to_owned(),
        // Nor a DHCP server: its replies would be as good as ours to a neighbour.
        "ether type ip udp sport 67 drop".to_owned(),
        format!("ether type ip ip saddr {ip} accept"),
        "drop".to_owned(),
    ];
    let _ = writeln!(script, "add chain bridge {TABLE} {chain}");
    let _ = writeln!(script, "flush chain bridge {TABLE} {chain}");
    for rule in rules {
        let _ = writeln!(script, "add rule bridge {TABLE} {chain} {rule}");
    }
    let _ = writeln!(
        script,
        "add element bridge {TABLE} ports {{ \"{tap}\" : jump {chain} }}"
    );
    Ok(script)
}

/// nft 1.0.6 (Debian 12) has no `destroy`: each object is added first so that deleting it
/// cannot fail, all in one transaction.
fn release_script(tap: &str) -> Result<String, AntiSpoofError> {
    let tap = checked(tap)?;
    let chain = chain_name(tap);
    let mut script = base_script();
    let _ = write!(
        script,
        "add chain bridge {TABLE} {chain}\n\
         add element bridge {TABLE} ports {{ \"{tap}\" : jump {chain} }}\n\
         delete element bridge {TABLE} ports {{ \"{tap}\" }}\n\
         flush chain bridge {TABLE} {chain}\n\
         delete chain bridge {TABLE} {chain}\n"
    );
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> GuestPort<'static> {
        GuestPort {
            tap: "st0a1b2c3dn0",
            mac: "02:00:c6:12:05:0a".parse().unwrap(),
            ip: Ipv4Addr::new(198, 18, 5, 10),
        }
    }

    #[test]
    fn a_port_may_only_use_its_own_mac_address_and_lease() {
        let script = protect_script(&port()).unwrap();
        assert!(script.contains("guest-st0a1b2c3dn0 ether saddr != 02:00:c6:12:05:0a drop"));
        assert!(script.contains("arp saddr ip { 0.0.0.0, 198.18.5.10 } accept"));
        assert!(script.contains("@th,288,48 0x0200c612050a limit rate 5/second"));
        assert!(script.contains("guest-st0a1b2c3dn0 ether type ip ip saddr 198.18.5.10 accept"));
        assert!(script.ends_with(
            "add element bridge stratus ports { \"st0a1b2c3dn0\" : jump guest-st0a1b2c3dn0 }\n"
        ));
        // The chain is emptied before it is filled, so re-protecting replaces its rules.
        let flush = script.find("flush chain bridge stratus guest-").unwrap();
        let first_rule = script.find("add rule bridge stratus guest-").unwrap();
        assert!(flush < first_rule);
    }

    #[test]
    fn names_that_could_escape_the_rules_are_refused() {
        for bad in [
            "",
            "tap\" drop",
            "a b",
            "x;flush ruleset",
            "averyveryverylongname",
        ] {
            let port = GuestPort { tap: bad, ..port() };
            assert!(
                matches!(protect_script(&port), Err(AntiSpoofError::BadName(_))),
                "{bad:?}"
            );
            assert!(matches!(
                release_script(bad),
                Err(AntiSpoofError::BadName(_))
            ));
        }
    }

    #[test]
    fn release_adds_before_deleting_so_a_second_release_succeeds() {
        let script = release_script("st0a1b2c3dn0").unwrap();
        let add = script.find("add element").unwrap();
        let delete = script.find("delete element").unwrap();
        assert!(add < delete);
        assert!(script.ends_with("delete chain bridge stratus guest-st0a1b2c3dn0\n"));
    }
}
