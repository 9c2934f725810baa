//! The RBD pool: each volume an image of its own, named by its UUID, in one Ceph pool, as
//! StratusLab's pdisk kept them on Ceph. Images are thin: a new volume takes no space until
//! the guest writes. Nodes get the image's name and the cluster's configuration and
//! credentials; their VMMs open the image themselves through librbd, so the nodes need no
//! kernel RBD client, no shared filesystem and nothing from this host while the VM runs.
//!
//! Images are made and removed with Ceph's own `rbd` command, as the iSCSI pool drives
//! tgtd through `tgtadm`: no RADOS protocol code here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[volume_rbd]` in the orchestrator's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdPoolConfig {
    /// The Ceph pool the volumes' images are made in.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// The cluster's `ceph.conf`, at this path on this host and on every node.
    pub conf: PathBuf,
    /// The cephx user (without `client.`) this host and the nodes' VMMs act as; it needs
    /// `profile rbd` on the pool.
    pub id: String,
    /// That user's keyring, at this path on this host and on every node.
    pub keyring: PathBuf,
}

fn default_pool() -> String {
    "rbd".into()
}

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("[volume_rbd] {field} {value:?} cannot be used: {why}")]
    Config {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("cannot run rbd (install Debian's ceph-common): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("rbd {args} failed: {stderr}")]
    Rbd { args: String, stderr: String },
    #[error("rbd {0} got no answer from the Ceph cluster in time")]
    Timeout(String),
    /// The image has snapshots (or clones of them) or a client still has it open.
    #[error("Ceph keeps the image: {0}")]
    InUse(String),
}

/// Ceph can leave a client waiting for as long as no monitor answers; a volume operation
/// must fail with a reason instead.
const RBD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// For imports and copies of up to a TiB: long enough for the data, short of forever.
const RBD_COPY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// `rbd` exits with the errno of what failed.
const EXISTS: i32 = 17;
const NOT_FOUND: i32 = 2;
const BUSY: i32 = 16;
const INVALID: i32 = 22;
const HAS_SNAPSHOTS: i32 = 39;

pub struct RbdPool {
    config: RbdPoolConfig,
}

impl RbdPool {
    /// Refuses names that would not survive the trip into a VMM's `--disk rbd:...` flag.
    pub fn new(config: RbdPoolConfig) -> Result<Self, RbdError> {
        let pool_ok = !config.pool.is_empty()
            && config
                .pool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !pool_ok {
            return Err(RbdError::Config {
                field: "pool",
                value: config.pool,
                why: "a pool name here is letters, digits, '.', '_' and '-'",
            });
        }
        if config.id.is_empty() || config.id.bytes().any(|b| b",=:/@ ".contains(&b)) {
            return Err(RbdError::Config {
                field: "id",
                value: config.id,
                why: "a cephx user name without ',', '=', ':', '/', '@' or spaces",
            });
        }
        for (field, path) in [("conf", &config.conf), ("keyring", &config.keyring)] {
            let text = path.to_string_lossy();
            if !path.is_absolute() || text.contains(',') || text.contains('=') {
                return Err(RbdError::Config {
                    field,
                    value: text.into_owned(),
                    why: "an absolute path without ',' or '='",
                });
            }
        }
        Ok(RbdPool { config })
    }

    pub fn config(&self) -> &RbdPoolConfig {
        &self.config
    }

    /// `POOL/UUID`, as librbd and the `rbd` command name it.
    pub fn image(&self, uuid: &str) -> String {
        format!("{}/{uuid}", self.config.pool)
    }

    /// What the volume's row keeps as its location.
    pub fn location(&self, uuid: &str) -> String {
        format!("rbd:{}", self.image(uuid))
    }

    /// The image a location names (`rbd:POOL/UUID` → `POOL/UUID`).
    pub fn image_at(location: &str) -> Option<&str> {
        location.strip_prefix("rbd:")
    }

    /// Where a volume derived from the one at `location` goes: the same pool, so a
    /// clone stays beside its parent.
    pub fn location_beside(location: &str, uuid: &str) -> Option<String> {
        let (pool, _) = Self::image_at(location)?.split_once('/')?;
        Some(format!("rbd:{pool}/{uuid}"))
    }

    /// Runs `program` (`rbd` or `ceph`) as the pool's user, within [`RBD_TIMEOUT`].
    async fn run(&self, program: &str, args: &[&str]) -> Result<std::process::Output, RbdError> {
        self.run_within(RBD_TIMEOUT, program, args).await
    }

    async fn run_within(
        &self,
        limit: std::time::Duration,
        program: &str,
        args: &[&str],
    ) -> Result<std::process::Output, RbdError> {
        let run = tokio::process::Command::new(program)
            .arg("-c")
            .arg(&self.config.conf)
            .args(["--id", &self.config.id, "--keyring"])
            .arg(&self.config.keyring)
            .args(args)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(limit, run)
            .await
            .map_err(|_| RbdError::Timeout(args.join(" ")))?
            .map_err(RbdError::Spawn)
    }

    /// Runs `rbd` as the pool's user. Commands that show progress are given `--no-progress`
    /// by the caller (the others refuse the option).
    async fn rbd(&self, args: &[&str]) -> Result<(), (Option<i32>, RbdError)> {
        self.rbd_within(RBD_TIMEOUT, args).await
    }

    /// [`RbdPool::rbd`] for commands that copy data, which take as long as the data needs.
    async fn rbd_within(
        &self,
        limit: std::time::Duration,
        args: &[&str],
    ) -> Result<(), (Option<i32>, RbdError)> {
        let out = self
            .run_within(limit, "rbd", args)
            .await
            .map_err(|e| (None, e))?;
        if out.status.success() {
            return Ok(());
        }
        // librbd's log lines come first; the last line is rbd's own reason.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no reason given")
            .trim()
            .to_owned();
        Err((
            out.status.code(),
            RbdError::Rbd {
                args: args.join(" "),
                stderr: reason,
            },
        ))
    }

    /// What the pool's images use, in bytes (`rbd du`, which needs no ceph-mgr).
    pub async fn used(&self) -> Result<u64, RbdError> {
        let pool = self.config.pool.clone();
        let out = self
            .ceph_json("rbd", &["du", "--format", "json", "-p", &pool])
            .await?;
        out["total_used_size"]
            .as_u64()
            .ok_or_else(|| RbdError::Rbd {
                args: format!("du -p {pool}"),
                stderr: "no total_used_size in the answer".into(),
            })
    }

    /// What the pool stores and what Ceph can still place in it, in bytes (`ceph df`,
    /// which the cluster's ceph-mgr answers).
    pub async fn space(&self) -> Result<(u64, u64), RbdError> {
        let df = self.ceph_json("ceph", &["df", "--format", "json"]).await?;
        let failed = |why: String| RbdError::Rbd {
            args: "(ceph) df".into(),
            stderr: why,
        };
        let stats = df["pools"]
            .as_array()
            .and_then(|pools| {
                pools
                    .iter()
                    .find(|p| p["name"] == self.config.pool.as_str())
            })
            .map(|p| &p["stats"])
            .ok_or_else(|| {
                failed(format!(
                    "Ceph reports no statistics for pool {} (is a ceph-mgr running?)",
                    self.config.pool
                ))
            })?;
        match (stats["stored"].as_u64(), stats["max_avail"].as_u64()) {
            (Some(stored), Some(free)) => Ok((stored, free)),
            _ => Err(failed(format!(
                "no stored/max_avail for pool {}",
                self.config.pool
            ))),
        }
    }

    /// Runs `program` (`ceph` or `rbd`) as the pool's user and reads its JSON answer.
    async fn ceph_json(&self, program: &str, args: &[&str]) -> Result<serde_json::Value, RbdError> {
        let out = self.run(program, args).await?;
        let failed = |why: String| RbdError::Rbd {
            args: format!("({program}) {}", args.join(" ")),
            stderr: why,
        };
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| failed(format!("unreadable answer: {e}")))
    }

    /// A thin image of `size_gib`. Done again after a crash, it keeps the existing image
    /// and its data.
    pub async fn create(&self, image: &str, size_gib: u64) -> Result<(), RbdError> {
        let size = format!("{size_gib}G");
        match self
            .rbd(&["create", "--no-progress", "--size", &size, image])
            .await
        {
            Err((Some(EXISTS), _)) => Ok(()),
            other => other.map_err(|(_, e)| e),
        }
    }

    /// `image` as a copy-on-write clone of `origin`: of its snapshot [`BASE_SNAPSHOT`],
    /// taken (and protected, so Ceph keeps it while clones need it) on the first clone.
    /// The clone costs the same time and no data whatever the origin's size; writes to it
    /// never reach the origin. Done again after a crash, it keeps what exists.
    pub async fn clone_of(&self, origin: &str, image: &str) -> Result<(), RbdError> {
        let base = format!("{origin}@{BASE_SNAPSHOT}");
        // Every clone but the first finds the snapshot protected: one `rbd` run, not three.
        match self.rbd(&["clone", &base, image]).await {
            Ok(_) | Err((Some(EXISTS), _)) => return Ok(()),
            // No base snapshot yet, or not protected yet: made below.
            Err((Some(NOT_FOUND | INVALID), _)) => {}
            Err((_, e)) => return Err(e),
        }
        match self.rbd(&["snap", "create", "--no-progress", &base]).await {
            Err((Some(EXISTS), _)) => {}
            other => other.map_err(|(_, e)| e)?,
        }
        match self.rbd(&["snap", "protect", &base]).await {
            // Protected already.
            Err((Some(BUSY), _)) => {}
            other => other.map_err(|(_, e)| e)?,
        }
        match self.rbd(&["clone", &base, image]).await {
            Err((Some(EXISTS), _)) => Ok(()),
            other => other.map_err(|(_, e)| e),
        }
    }

    /// `image` made from the raw `file` (zeros left out: thin). An `image` left by a crash
    /// in the middle is made again.
    pub async fn import(&self, file: &std::path::Path, image: &str) -> Result<(), RbdError> {
        self.delete(image).await?;
        let file = file.to_string_lossy();
        self.rbd_within(RBD_COPY_TIMEOUT, &["import", "--no-progress", &file, image])
            .await
            .map_err(|(_, e)| e)
    }

    /// `image` as a full, independent copy of `source` (a clone's parent data included).
    /// An `image` left by a crash in the middle is made again.
    pub async fn copy_of(&self, source: &str, image: &str) -> Result<(), RbdError> {
        self.delete(image).await?;
        self.rbd_within(RBD_COPY_TIMEOUT, &["cp", "--no-progress", source, image])
            .await
            .map_err(|(_, e)| e)
    }

    /// Removes the image's [`BASE_SNAPSHOT`], so that its next clone is taken from the
    /// data it has then. Refused while a clone needs the snapshot; done again, or with no
    /// snapshot, it does nothing.
    pub async fn drop_base(&self, image: &str) -> Result<(), RbdError> {
        let base = format!("{image}@{BASE_SNAPSHOT}");
        match self.rbd(&["snap", "unprotect", &base]).await {
            // Not protected, or no such snapshot.
            Ok(()) | Err((Some(NOT_FOUND | INVALID), _)) => {}
            Err((Some(BUSY), RbdError::Rbd { stderr, .. })) => return Err(RbdError::InUse(stderr)),
            Err((_, e)) => return Err(e),
        }
        match self.rbd(&["snap", "rm", "--no-progress", &base]).await {
            Ok(()) | Err((Some(NOT_FOUND), _)) => Ok(()),
            Err((_, e)) => Err(e),
        }
    }

    /// Removes the image, and its [`BASE_SNAPSHOT`] if no clone needs it any more; done
    /// again, it does nothing. An image with clones or other snapshots, or one a client
    /// still has open, is refused with Ceph's reason and left alone.
    pub async fn delete(&self, image: &str) -> Result<(), RbdError> {
        let in_use = |e| match e {
            RbdError::Rbd { stderr, .. } => RbdError::InUse(stderr),
            e => e,
        };
        match self.rbd(&["rm", "--no-progress", image]).await {
            Ok(()) | Err((Some(NOT_FOUND), _)) => return Ok(()),
            Err((Some(HAS_SNAPSHOTS), e)) => {
                let base = format!("{image}@{BASE_SNAPSHOT}");
                match self.rbd(&["snap", "unprotect", &base]).await {
                    // Not protected, or no such snapshot: rm below says what is left.
                    Ok(()) | Err((Some(NOT_FOUND | INVALID), _)) => {}
                    Err((Some(BUSY), e)) => return Err(in_use(e)),
                    Err((_, e)) => return Err(e),
                }
                match self.rbd(&["snap", "rm", "--no-progress", &base]).await {
                    Ok(()) | Err((Some(NOT_FOUND), _)) => {}
                    Err((_, _)) => return Err(in_use(e)),
                }
            }
            Err((Some(BUSY), e)) => return Err(in_use(e)),
            Err((_, e)) => return Err(e),
        }
        match self.rbd(&["rm", "--no-progress", image]).await {
            Ok(()) | Err((Some(NOT_FOUND), _)) => Ok(()),
            Err((Some(BUSY | HAS_SNAPSHOTS), e)) => Err(in_use(e)),
            Err((_, e)) => Err(e),
        }
    }
}

/// The snapshot of an ORIGIN image its LIVE clones are made from.
pub const BASE_SNAPSHOT: &str = "stratus-base";

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RbdPoolConfig {
        RbdPoolConfig {
            pool: "rbd".into(),
            conf: "/etc/ceph/ceph.conf".into(),
            id: "stratus".into(),
            keyring: "/etc/ceph/ceph.client.stratus.keyring".into(),
        }
    }

    #[test]
    fn names_that_would_break_a_disk_flag_are_refused() {
        let pool = RbdPool::new(config()).unwrap();
        assert_eq!(pool.location("u-1"), "rbd:rbd/u-1");
        for bad in ["", "a/b", "a,b", "a@b", "a b"] {
            let e = RbdPool::new(RbdPoolConfig {
                pool: bad.into(),
                ..config()
            })
            .err()
            .unwrap_or_else(|| panic!("pool {bad:?} accepted"));
            assert!(e.to_string().contains("pool"), "{e}");
        }
        for bad in ["", "a,b", "a=b", "a:b"] {
            assert!(RbdPool::new(RbdPoolConfig {
                id: bad.into(),
                ..config()
            })
            .is_err());
        }
        for bad in ["ceph.conf", "/etc/ceph/a,b", "/etc/ceph/a=b"] {
            assert!(RbdPool::new(RbdPoolConfig {
                keyring: bad.into(),
                ..config()
            })
            .is_err());
            assert!(RbdPool::new(RbdPoolConfig {
                conf: bad.into(),
                ..config()
            })
            .is_err());
        }
    }
}
