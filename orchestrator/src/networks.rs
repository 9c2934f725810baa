//! Networks and their leases. Every address a network can hand out is a row; a lease is
//! that row naming its VM, taken in the same transaction that creates the VM and freed when
//! the VM's node resources are released, so no address is ever handed out twice.

use std::net::Ipv4Addr;

use sqlx::AnyConnection;

use crate::config::{NetworkConfig, NetworkKind, MAX_NETWORK_ADDRESSES};
use crate::db::{Db, DbError};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no network '{0}' in this cloud")]
    Unknown(String),
    #[error("no free address left on network '{0}'")]
    Exhausted(String),
    #[error("address {ip} is not one of network '{network}'s addresses")]
    NotInNetwork { ip: Ipv4Addr, network: String },
    /// Which VM holds it is not said: users would learn other users' VMs' addresses.
    #[error("address {ip} on network '{network}' is in use")]
    InUse { ip: Ipv4Addr, network: String },
    #[error("network '{network}': {reason}")]
    Config { network: String, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for NetworkError {
    fn from(e: sqlx::Error) -> Self {
        NetworkError::Db(e.into())
    }
}

/// StratusLab's MAC for an address: `02:00` and the address's four bytes.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

fn parse_mac(text: &str) -> Option<String> {
    let parts: Vec<&str> = text.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then(|| text.to_ascii_lowercase())
}

/// The (address, MAC) pairs a network configuration defines, in hand-out order.
pub fn addresses_of(network: &NetworkConfig) -> Result<Vec<(Ipv4Addr, String)>, String> {
    let mut out = Vec::new();
    match (network.kind, &network.range, network.addresses.is_empty()) {
        (NetworkKind::Private, Some((first, last)), true) => {
            let (first, last) = (u32::from(*first), u32::from(*last));
            if first > last {
                return Err("the range's first address is after its last".into());
            }
            if last - first >= MAX_NETWORK_ADDRESSES {
                return Err(format!(
                    "a range holds at most {MAX_NETWORK_ADDRESSES} addresses"
                ));
            }
            for ip in first..=last {
                let ip = Ipv4Addr::from(ip);
                out.push((ip, mac_for(ip)));
            }
        }
        (NetworkKind::Private, _, _) => {
            return Err("a private network is a `range = [FIRST, LAST]`, not addresses".into())
        }
        (_, Some(_), _) => {
            return Err("public and local networks list `addresses`, not a range".into())
        }
        (_, None, _) => {
            for entry in &network.addresses {
                let mut words = entry.split_whitespace();
                let ip: Ipv4Addr = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ok_or_else(|| format!("'{entry}' does not start with an IPv4 address"))?;
                let mac = match words.next() {
                    Some(m) => parse_mac(m).ok_or_else(|| format!("'{m}' is not a MAC"))?,
                    None => mac_for(ip),
                };
                if words.next().is_some() {
                    return Err(format!("'{entry}': expected \"IP\" or \"IP MAC\""));
                }
                out.push((ip, mac));
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (ip, mac) in &out {
        if !seen.insert(ip.to_string()) || !seen.insert(mac.clone()) {
            return Err(format!("address {ip} or MAC {mac} is listed twice"));
        }
    }
    Ok(out)
}

/// Brings the networks table in line with the configuration: new networks and addresses
/// are added, free addresses take their configured MAC, free addresses no longer configured
/// are dropped. Leased addresses stay as they are until their VM lets them go; a MAC given
/// to another address while a VM still holds it is refused, as two NICs would have it.
pub async fn sync(db: &Db, networks: &[NetworkConfig]) -> Result<(), NetworkError> {
    let mut tx = db.pool.begin().await?;
    for network in networks {
        let addresses = addresses_of(network).map_err(|reason| NetworkError::Config {
            network: network.name.clone(),
            reason,
        })?;
        let kind = serde_json::to_value(network.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        sqlx::query("DELETE FROM networks WHERE name = $1")
            .bind(&network.name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO networks (name, kind) VALUES ($1, $2)")
            .bind(&network.name)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        let existing: Vec<(String,)> =
            sqlx::query_as("SELECT ip FROM addresses WHERE network = $1")
                .bind(&network.name)
                .fetch_all(&mut *tx)
                .await?;
        let existing: std::collections::BTreeSet<String> =
            existing.into_iter().map(|(ip,)| ip).collect();
        let wanted: std::collections::BTreeSet<String> =
            addresses.iter().map(|(ip, _)| ip.to_string()).collect();
        for (seq, (ip, mac)) in addresses.iter().enumerate() {
            if existing.contains(&ip.to_string()) {
                sqlx::query(
                    "UPDATE addresses SET seq = $1, mac = CASE WHEN vm_id IS NULL THEN $2 \
                     ELSE mac END WHERE network = $3 AND ip = $4",
                )
                .bind(seq as i64)
                .bind(mac)
                .bind(&network.name)
                .bind(ip.to_string())
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query(
                    "INSERT INTO addresses (network, seq, ip, mac, vm_id) VALUES ($1, $2, $3, $4, NULL)",
                )
                .bind(&network.name)
                .bind(seq as i64)
                .bind(ip.to_string())
                .bind(mac)
                .execute(&mut *tx)
                .await?;
            }
        }
        for ip in existing.difference(&wanted) {
            sqlx::query("DELETE FROM addresses WHERE network = $1 AND ip = $2 AND vm_id IS NULL")
                .bind(&network.name)
                .bind(ip)
                .execute(&mut *tx)
                .await?;
        }
        let shared: Option<(String, String)> = sqlx::query_as(
            "SELECT a.mac, a.ip FROM addresses a JOIN addresses b ON a.network = b.network \
             AND a.mac = b.mac AND a.ip <> b.ip WHERE a.network = $1 AND a.vm_id IS NOT NULL \
             ORDER BY a.seq LIMIT 1",
        )
        .bind(&network.name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((mac, leased)) = shared {
            return Err(NetworkError::Config {
                network: network.name.clone(),
                reason: format!(
                    "MAC {mac} is configured for another address while a VM holds it with \
                     {leased}: keep it until that VM ends"
                ),
            });
        }
    }
    tx.commit().await?;
    Ok(())
}

/// A lease: the address and MAC a VM's NIC gets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub network: String,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// Leases an address on `network` to `vm`: `wanted` if given (and free), otherwise the
/// first free one. Runs inside the caller's transaction.
pub async fn allocate(
    db: &Db,
    conn: &mut AnyConnection,
    network: &str,
    vm: i64,
    wanted: Option<Ipv4Addr>,
) -> Result<Lease, NetworkError> {
    let known: Option<(String,)> = sqlx::query_as("SELECT name FROM networks WHERE name = $1")
        .bind(network)
        .fetch_optional(&mut *conn)
        .await?;
    if known.is_none() {
        return Err(NetworkError::Unknown(network.to_owned()));
    }
    if let Some(ip) = wanted {
        let row: Option<(String, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT mac, vm_id FROM addresses WHERE network = $1 AND ip = $2{}",
            db.for_update()
        )))
        .bind(network)
        .bind(ip.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        return match row {
            None => Err(NetworkError::NotInNetwork {
                ip,
                network: network.to_owned(),
            }),
            Some((_, Some(_))) => Err(NetworkError::InUse {
                ip,
                network: network.to_owned(),
            }),
            Some((mac, None)) => {
                sqlx::query("UPDATE addresses SET vm_id = $1 WHERE network = $2 AND ip = $3")
                    .bind(vm)
                    .bind(network)
                    .bind(ip.to_string())
                    .execute(&mut *conn)
                    .await?;
                Ok(Lease {
                    network: network.to_owned(),
                    ip,
                    mac,
                })
            }
        };
    }
    // Replicas skip rows another transaction is leasing right now instead of waiting on
    // them; the `vm_id IS NULL` test in the UPDATE is the final word.
    loop {
        let row: Option<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT ip, mac FROM addresses WHERE network = $1 AND vm_id IS NULL \
             ORDER BY seq LIMIT 1{}",
            db.skip_locked()
        )))
        .bind(network)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((ip_text, mac)) = row else {
            return Err(NetworkError::Exhausted(network.to_owned()));
        };
        let taken = sqlx::query(
            "UPDATE addresses SET vm_id = $1 WHERE network = $2 AND ip = $3 AND vm_id IS NULL",
        )
        .bind(vm)
        .bind(network)
        .bind(&ip_text)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if taken == 1 {
            let ip = ip_text.parse().map_err(|_| DbError::Corrupt {
                what: "addresses.ip",
                value: ip_text.clone(),
            })?;
            return Ok(Lease {
                network: network.to_owned(),
                ip,
                mac,
            });
        }
    }
}

/// Frees every address `vm` holds.
pub async fn release(conn: &mut AnyConnection, vm: i64) -> Result<(), NetworkError> {
    sqlx::query("UPDATE addresses SET vm_id = NULL WHERE vm_id = $1")
        .bind(vm)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The leases `vm` holds.
pub async fn leases_of(conn: &mut AnyConnection, vm: i64) -> Result<Vec<Lease>, NetworkError> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT network, ip, mac FROM addresses WHERE vm_id = $1 ORDER BY network, seq",
    )
    .bind(vm)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|(network, ip, mac)| {
            let ip = ip.parse().map_err(|_| DbError::Corrupt {
                what: "addresses.ip",
                value: ip.clone(),
            })?;
            Ok(Lease { network, ip, mac })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(kind: NetworkKind, addresses: &[&str], range: Option<(&str, &str)>) -> NetworkConfig {
        NetworkConfig {
            name: "n".into(),
            kind,
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            range: range.map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())),
        }
    }

    #[test]
    fn addresses_come_from_lists_or_ranges_with_stratuslab_macs() {
        let got = addresses_of(&net(
            NetworkKind::Public,
            &["198.18.0.10", "198.18.0.11 0A:00:00:00:00:01"],
            None,
        ))
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("198.18.0.10".parse().unwrap(), "02:00:c6:12:00:0a".into()),
                ("198.18.0.11".parse().unwrap(), "0a:00:00:00:00:01".into())
            ]
        );
        let range = addresses_of(&net(
            NetworkKind::Private,
            &[],
            Some(("198.18.1.1", "198.18.1.4")),
        ))
        .unwrap();
        assert_eq!(range.len(), 4);
        assert_eq!(range[3].1, "02:00:c6:12:01:04");
    }

    #[tokio::test]
    async fn free_addresses_take_a_changed_mac_and_a_leased_mac_is_never_given_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&format!(
            "sqlite:{}",
            dir.path().join("db.sqlite").display()
        ))
        .await
        .unwrap();
        let macs = || async {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT ip, mac FROM addresses ORDER BY seq")
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            rows
        };
        sync(
            &db,
            &[net(
                NetworkKind::Public,
                &["198.18.0.10", "198.18.0.11"],
                None,
            )],
        )
        .await
        .unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        let lease = allocate(&db, &mut conn, "n", 1, Some("198.18.0.10".parse().unwrap()))
            .await
            .unwrap();
        drop(conn);
        assert_eq!(lease.mac, "02:00:c6:12:00:0a");

        // The leased MAC configured for the free address: refused, nothing changed.
        let e = sync(
            &db,
            &[net(
                NetworkKind::Public,
                &[
                    "198.18.0.10 0a:00:00:00:00:01",
                    "198.18.0.11 02:00:c6:12:00:0a",
                ],
                None,
            )],
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MAC 02:00:c6:12:00:0a is configured for another address while a VM holds it with 198.18.0.10"),
            "{e}"
        );
        assert_eq!(
            macs().await,
            [
                ("198.18.0.10".into(), "02:00:c6:12:00:0a".into()),
                ("198.18.0.11".into(), "02:00:c6:12:00:0b".into())
            ]
        );

        // New MACs: the free address takes its own at once, the leased one keeps its lease's.
        sync(
            &db,
            &[net(
                NetworkKind::Public,
                &[
                    "198.18.0.10 0a:00:00:00:00:01",
                    "198.18.0.11 0a:00:00:00:00:02",
                ],
                None,
            )],
        )
        .await
        .unwrap();
        assert_eq!(
            macs().await,
            [
                ("198.18.0.10".into(), "02:00:c6:12:00:0a".into()),
                ("198.18.0.11".into(), "0a:00:00:00:00:02".into())
            ]
        );
    }

    #[test]
    fn bad_network_definitions_are_refused_with_the_reason() {
        for (n, needle) in [
            (net(NetworkKind::Public, &["bogus"], None), "IPv4"),
            (net(NetworkKind::Public, &["198.18.0.1 zz"], None), "MAC"),
            (
                net(NetworkKind::Public, &["198.18.0.1", "198.18.0.1"], None),
                "twice",
            ),
            (net(NetworkKind::Private, &["198.18.0.1"], None), "range"),
            (
                net(
                    NetworkKind::Private,
                    &[],
                    Some(("198.18.0.9", "198.18.0.1")),
                ),
                "after",
            ),
            (
                net(NetworkKind::Private, &[], Some(("10.0.0.0", "10.2.0.0"))),
                "at most",
            ),
        ] {
            let e = addresses_of(&n).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
