//! Where a VM goes: filters (enabled and answering nodes, free vCPUs and memory after what
//! the database already holds for other VMs there, the request's requirements), then the
//! cloud's rank (spread: fewest VMs, StratusLab's default; pack: most). The room is taken
//! in the database, in the transaction that records the VM's node, with the node's row
//! locked, so concurrent placements never over-commit a node.

use std::collections::BTreeMap;

use sqlx::AnyConnection;

use crate::config::Rank;
use crate::db::{Db, DbError};
use crate::nodes::{self, NodeRow};

/// `--vm-requirements`: terms `ATTRIBUTE OP VALUE` joined by `&`, all of which must hold.
/// Attributes: `name`, `hostname`, `hypervisor`, `cpu_total`, `cpu_free`,
/// `memory_total_mib`, `memory_free_mib`, `running_vms`, and the node's admin-set
/// attributes. OP: `=`, `!=` (strings may hold `*` wildcards), `<`, `<=`, `>`, `>=`
/// (numbers). VALUE: a number or a double-quoted string.
#[derive(Clone, Debug, PartialEq)]
pub struct Requirements {
    terms: Vec<Term>,
}

#[derive(Clone, Debug, PartialEq)]
struct Term {
    attribute: String,
    op: Op,
    value: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

const MAX_REQUIREMENTS: usize = 1024;

impl Requirements {
    pub fn parse(text: &str) -> Result<Requirements, String> {
        if text.len() > MAX_REQUIREMENTS {
            return Err(format!(
                "requirements are limited to {MAX_REQUIREMENTS} characters"
            ));
        }
        let mut terms = Vec::new();
        for raw in text.split('&') {
            let raw = raw.trim();
            if raw.is_empty() {
                return Err(format!("requirements '{text}': an empty term"));
            }
            let at = raw
                .find(['=', '!', '<', '>'])
                .ok_or_else(|| format!("requirement '{raw}' has no operator (= != < <= > >=)"))?;
            let attribute = raw[..at].trim();
            let rest = &raw[at..];
            let (op, value) = [
                ("!=", Op::Ne),
                ("<=", Op::Le),
                (">=", Op::Ge),
                ("=", Op::Eq),
                ("<", Op::Lt),
                (">", Op::Gt),
            ]
            .into_iter()
            .find_map(|(sym, op)| rest.strip_prefix(sym).map(|v| (op, v.trim())))
            .ok_or_else(|| format!("requirement '{raw}': unknown operator"))?;
            if attribute.is_empty()
                || !attribute
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            {
                return Err(format!("requirement '{raw}': bad attribute name"));
            }
            let value =
                if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    if inner.contains('"') {
                        return Err(format!("requirement '{raw}': stray quote"));
                    }
                    inner.to_owned()
                } else if value.parse::<f64>().is_ok() {
                    value.to_owned()
                } else {
                    return Err(format!(
                        "requirement '{raw}': the value must be a number or a \"quoted string\""
                    ));
                };
            if matches!(op, Op::Lt | Op::Le | Op::Gt | Op::Ge) && value.parse::<f64>().is_err() {
                return Err(format!("requirement '{raw}': < and > compare numbers"));
            }
            terms.push(Term {
                attribute: attribute.to_ascii_lowercase(),
                op,
                value,
            });
        }
        Ok(Requirements { terms })
    }

    /// Whether a node with these attributes meets every term (an unknown attribute never
    /// does).
    pub fn met_by(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| {
            let Some(actual) = attributes.get(&t.attribute) else {
                return false;
            };
            match t.op {
                Op::Eq => wildcard(&t.value, actual),
                Op::Ne => !wildcard(&t.value, actual),
                _ => match (actual.parse::<f64>(), t.value.parse::<f64>()) {
                    (Ok(a), Ok(v)) => match t.op {
                        Op::Lt => a < v,
                        Op::Le => a <= v,
                        Op::Gt => a > v,
                        _ => a >= v,
                    },
                    _ => false,
                },
            }
        })
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn wildcard(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// A node's room as the database sees it.
#[derive(Clone, Debug)]
pub struct Room {
    pub node: NodeRow,
    pub vms: i64,
    pub cpu_used: i64,
    pub memory_used_mib: i64,
}

impl Room {
    pub fn cpu_free(&self) -> i64 {
        self.node.cpu_total - self.cpu_used
    }
    pub fn memory_free_mib(&self) -> i64 {
        self.node.memory_total_mib - self.memory_used_mib
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = self.node.attributes();
        for (k, v) in [
            ("name", self.node.name.clone()),
            ("hostname", self.node.hostname.clone().unwrap_or_default()),
            (
                "hypervisor",
                self.node.hypervisor.clone().unwrap_or_default(),
            ),
            ("cpu_total", self.node.cpu_total.to_string()),
            ("cpu_free", self.cpu_free().to_string()),
            ("memory_total_mib", self.node.memory_total_mib.to_string()),
            ("memory_free_mib", self.memory_free_mib().to_string()),
            ("running_vms", self.vms.to_string()),
        ] {
            a.insert(k.to_owned(), v);
        }
        a
    }
}

/// What the database holds on `node` for VMs placed there.
pub async fn room(conn: &mut AnyConnection, node: NodeRow) -> Result<Room, DbError> {
    let (vms, cpu, memory): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(vcpus), 0) AS BIGINT), \
         CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) FROM vms WHERE node_id = $1 AND holds = 1",
    )
    .bind(node.id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Room {
        node,
        vms,
        cpu_used: cpu,
        memory_used_mib: memory,
    })
}

/// VMs, vCPUs and memory the database holds on every node, in one query.
async fn usage_by_node(
    conn: &mut AnyConnection,
) -> Result<std::collections::HashMap<i64, (i64, i64, i64)>, DbError> {
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT node_id, COUNT(*), CAST(COALESCE(SUM(vcpus), 0) AS BIGINT), \
         CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) FROM vms \
         WHERE node_id IS NOT NULL AND holds = 1 GROUP BY node_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(node, vms, cpu, memory)| (node, (vms, cpu, memory)))
        .collect())
}

/// Why no node took a VM, for its reason line.
#[derive(Debug, Default)]
pub struct Refusals(Vec<String>);

impl std::fmt::Display for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return write!(f, "the cloud has no nodes");
        }
        write!(f, "no node can take it: {}", self.0.join("; "))
    }
}

/// Nodes that could take a VM of `cpu` vCPUs and `memory_mib` whose image needs
/// `disk_bytes` in the node's cache, best first, and why the others cannot.
pub async fn candidates(
    conn: &mut AnyConnection,
    cpu: i64,
    memory_mib: i64,
    disk_bytes: i64,
    requirements: Option<&Requirements>,
    rank: Rank,
    exclude: &[i64],
) -> Result<(Vec<Room>, Refusals), DbError> {
    let mut fit = Vec::new();
    let mut refusals = Refusals::default();
    let mut used = usage_by_node(conn).await?;
    for node in nodes::all(conn).await? {
        let name = node.name.clone();
        if exclude.contains(&node.id) {
            refusals.0.push(format!("{name} refused it"));
            continue;
        }
        if node.state != "enabled" {
            refusals.0.push(format!("{name} is {}", node.state));
            continue;
        }
        if node.health != "up" {
            refusals.0.push(format!("{name} is not answering"));
            continue;
        }
        let (vms, cpu_used, memory_used_mib) = used.remove(&node.id).unwrap_or_default();
        let room = Room {
            node,
            vms,
            cpu_used,
            memory_used_mib,
        };
        if room.cpu_free() < cpu {
            refusals.0.push(format!(
                "{name} has {} free vCPUs, {cpu} needed",
                room.cpu_free()
            ));
            continue;
        }
        if room.memory_free_mib() < memory_mib {
            refusals.0.push(format!(
                "{name} has {} MiB free, {memory_mib} needed",
                room.memory_free_mib()
            ));
            continue;
        }
        if room.node.disk_free_bytes < disk_bytes {
            refusals.0.push(format!(
                "{name} has {} MiB of free disk, {} MiB needed",
                room.node.disk_free_bytes >> 20,
                disk_bytes >> 20
            ));
            continue;
        }
        if let Some(r) = requirements {
            if !r.met_by(&room.attributes()) {
                refusals
                    .0
                    .push(format!("{name} does not meet the requirements"));
                continue;
            }
        }
        fit.push(room);
    }
    match rank {
        Rank::Spread => fit.sort_by_key(|r| (r.vms, r.node.id)),
        Rank::Pack => fit.sort_by_key(|r| (-r.vms, r.node.id)),
    }
    Ok((fit, refusals))
}

/// What [`reserve`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The VM now has its room on the node.
    Taken,
    /// The node filled up meanwhile.
    Full,
    /// Another worker placed this VM meanwhile (a job taken over after its claim ran out):
    /// it is on this node now.
    PlacedElsewhere(i64),
}

/// Takes room for the VM on `node` if it still has it: locks the node's row, counts again
/// and records the VM's node in the caller's transaction — only if the VM has no node yet,
/// so two workers can never place one VM twice.
pub async fn reserve(
    db: &Db,
    conn: &mut AnyConnection,
    node: i64,
    vm: i64,
    cpu: i64,
    memory_mib: i64,
) -> Result<Reservation, DbError> {
    let row = nodes::load_locked(db, conn, node).await?;
    let room = room(conn, row).await?;
    if room.cpu_free() < cpu || room.memory_free_mib() < memory_mib {
        return Ok(Reservation::Full);
    }
    let taken = sqlx::query("UPDATE vms SET node_id = $1 WHERE id = $2 AND node_id IS NULL")
        .bind(node)
        .bind(vm)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if taken == 1 {
        return Ok(Reservation::Taken);
    }
    let (placed,): (Option<i64>,) = sqlx::query_as("SELECT node_id FROM vms WHERE id = $1")
        .bind(vm)
        .fetch_one(&mut *conn)
        .await?;
    Ok(placed.map_or(Reservation::Full, Reservation::PlacedElsewhere))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn requirements_parse_and_match() {
        let r = Requirements::parse(r#"name = "node*" & cpu_free >= 4 & zone != "b""#).unwrap();
        assert!(r.met_by(&attrs(&[
            ("name", "node1"),
            ("cpu_free", "4"),
            ("zone", "a")
        ])));
        assert!(!r.met_by(&attrs(&[
            ("name", "node1"),
            ("cpu_free", "3"),
            ("zone", "a")
        ])));
        assert!(!r.met_by(&attrs(&[
            ("name", "other"),
            ("cpu_free", "8"),
            ("zone", "a")
        ])));
        assert!(
            !r.met_by(&attrs(&[("name", "node1"), ("cpu_free", "8")])),
            "an unknown attribute never matches"
        );
        for (bad, needle) in [
            ("", "empty term"),
            ("cpu_free 4", "no operator"),
            ("cpu_free >= x", "number or"),
            (r#"name > "a""#, "compare numbers"),
            (r#"na me = "a""#, "attribute"),
        ] {
            let e = Requirements::parse(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("a*c", "abbbc"));
        assert!(wildcard("*", ""));
        assert!(wildcard("*b*", "abc"));
        assert!(!wildcard("a*c", "abd"));
        assert!(wildcard("abc", "abc"));
        assert!(!wildcard("ab", "abc"));
    }
}
