//! The iSCSI pool: each volume's backing file (in the file backend's directory) exported
//! by the storage host's tgtd as a target of its own, LUN 1, as StratusLab's pdisk did with
//! tgtd. Nodes get the volume's `iscsi://` URL and their VMMs log in themselves, so the
//! nodes need no shared filesystem and no kernel initiator.
//!
//! tgtd keeps its targets in memory only: a volume is exported when it is made and again
//! whenever a VM is about to use it ([`IscsiExport::export`] is idempotent), so a
//! restarted tgtd serves everything again on first use.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// `[volume_iscsi]` in the orchestrator's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiPoolConfig {
    /// HOST:PORT the nodes log in to (tgtd's portal as they reach it).
    pub portal: String,
    /// tgtd's management port here (`tgtadm -C`); 0 is the system tgtd.
    #[serde(default)]
    pub control_port: u16,
    /// Targets are named `<prefix>:<volume uuid>`.
    #[serde(default = "default_iqn_prefix")]
    pub iqn_prefix: String,
}

fn default_iqn_prefix() -> String {
    "iqn.2026-12.eu.stratuslab.pdisk".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot run tgtadm (install Debian's tgt): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("tgtadm {args} failed: {stderr}")]
    Tgtadm { args: String, stderr: String },
    #[error("tgtd has no free target id")]
    NoTid,
    #[error("tgtadm {0} got no answer from tgtd in time")]
    Timeout(String),
}

const TGTADM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub struct IscsiExport {
    config: IscsiPoolConfig,
    /// Creations pick the next free target id: one at a time.
    changes: Mutex<()>,
}

impl IscsiExport {
    pub fn new(config: IscsiPoolConfig) -> Self {
        IscsiExport {
            config,
            changes: Mutex::new(()),
        }
    }

    pub fn target(&self, uuid: &str) -> String {
        format!("{}:{uuid}", self.config.iqn_prefix)
    }

    /// HOST:PORT the nodes log in to.
    pub fn portal(&self) -> &str {
        &self.config.portal
    }

    /// What nodes are given: the volume's LUN.
    pub fn url(&self, uuid: &str) -> String {
        format!("iscsi://{}/{}/1", self.config.portal, self.target(uuid))
    }

    async fn tgtadm(&self, args: &[&str]) -> Result<String, ExportError> {
        let control = self.config.control_port.to_string();
        let run = tokio::process::Command::new("tgtadm")
            .args(["-C", &control, "--lld", "iscsi"])
            .args(args)
            .kill_on_drop(true)
            .output();
        // A hung tgtd must not hold every volume operation behind this lock.
        let out = tokio::time::timeout(TGTADM_TIMEOUT, run)
            .await
            .map_err(|_| ExportError::Timeout(args.join(" ")))?
            .map_err(ExportError::Spawn)?;
        if !out.status.success() {
            return Err(ExportError::Tgtadm {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// tgtd's targets: (tid, name).
    async fn targets(&self) -> Result<Vec<(u32, String)>, ExportError> {
        let shown = self.tgtadm(&["--op", "show", "--mode", "target"]).await?;
        Ok(shown
            .lines()
            .filter_map(|line| line.strip_prefix("Target "))
            .filter_map(|rest| rest.split_once(": "))
            .filter_map(|(tid, name)| Some((tid.parse().ok()?, name.trim().to_owned())))
            .collect())
    }

    /// Exports `file` as the volume's target unless tgtd has it already. A target left
    /// half-made (no LUN) by a crash is made again.
    pub async fn export(&self, uuid: &str, file: &Path) -> Result<(), ExportError> {
        let _one_at_a_time = self.changes.lock().await;
        let name = self.target(uuid);
        let targets = self.targets().await?;
        if let Some((tid, _)) = targets.iter().find(|(_, n)| *n == name) {
            let shown = self.tgtadm(&["--op", "show", "--mode", "target"]).await?;
            if target_has_lun(&shown, *tid) {
                return Ok(());
            }
            self.delete_target(*tid).await?;
        }
        let tid = (1..=u32::from(u16::MAX))
            .find(|t| !targets.iter().any(|(used, _)| used == t))
            .ok_or(ExportError::NoTid)?
            .to_string();
        self.tgtadm(&[
            "--op", "new", "--mode", "target", "--tid", &tid, "-T", &name,
        ])
        .await?;
        let file = file.to_string_lossy();
        // The LUN comes last: a crash in between leaves a target without it, which the
        // next export makes again; a target with its LUN is complete.
        let made = async {
            let target = ["--tid", tid.as_str()];
            let lun = ["--tid", tid.as_str(), "--lun", "1"];
            self.tgtadm(
                &[
                    &["--op", "bind", "--mode", "target"][..],
                    &target,
                    &["-I", "ALL"],
                ]
                .concat(),
            )
            .await?;
            self.tgtadm(
                &[
                    &["--op", "new", "--mode", "logicalunit"][..],
                    &lun,
                    &["-b", &file],
                ]
                .concat(),
            )
            .await?;
            // Thin: the guest's discards punch holes in the backing file.
            self.tgtadm(
                &[
                    &["--op", "update", "--mode", "logicalunit"][..],
                    &lun,
                    &["--params", "thin_provisioning=1"],
                ]
                .concat(),
            )
            .await
        }
        .await;
        if let Err(e) = made {
            // Never leave a target without its LUN behind.
            let _ = self.delete_target(tid.parse().unwrap_or(0)).await;
            return Err(e);
        }
        Ok(())
    }

    /// Withdraws the volume's target (sessions still logged in are cut). Done again, or
    /// for a target tgtd does not have, it does nothing.
    pub async fn unexport(&self, uuid: &str) -> Result<(), ExportError> {
        let _one_at_a_time = self.changes.lock().await;
        let name = self.target(uuid);
        if let Some((tid, _)) = self.targets().await?.into_iter().find(|(_, n)| *n == name) {
            self.delete_target(tid).await?;
        }
        Ok(())
    }

    async fn delete_target(&self, tid: u32) -> Result<(), ExportError> {
        let tid = tid.to_string();
        self.tgtadm(&[
            "--op", "delete", "--mode", "target", "--tid", &tid, "--force",
        ])
        .await
        .map(|_| ())
    }
}

/// Whether `tgtadm --op show` lists LUN 1 under target `tid`.
fn target_has_lun(shown: &str, tid: u32) -> bool {
    let header = format!("Target {tid}: ");
    let mut inside = false;
    for line in shown.lines() {
        if line.starts_with("Target ") {
            inside = line.starts_with(&header);
        } else if inside && line.trim() == "LUN: 1" {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_counts_as_made_only_with_its_lun() {
        let shown = "Target 1: iqn.x:a\n    System information:\n        LUN: 0\n            Type: controller\n        LUN: 1\n            Type: disk\nTarget 2: iqn.x:b\n    LU information:\n        LUN: 0\n";
        assert!(target_has_lun(shown, 1));
        assert!(!target_has_lun(shown, 2));
        assert!(!target_has_lun(shown, 3));
    }

    #[test]
    fn urls_name_the_portal_target_and_lun_1() {
        let export = IscsiExport::new(IscsiPoolConfig {
            portal: "198.18.0.1:3260".into(),
            control_port: 0,
            iqn_prefix: default_iqn_prefix(),
        });
        assert_eq!(
            export.url("0f0e"),
            "iscsi://198.18.0.1:3260/iqn.2026-12.eu.stratuslab.pdisk:0f0e/1"
        );
    }
}
