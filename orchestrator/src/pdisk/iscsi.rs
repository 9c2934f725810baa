//! The iSCSI pool: each volume's backing file (in the file backend's directory) exported
//! by the storage host's tgtd as a target of its own, LUN 1, as StratusLab's pdisk did with
//! tgtd. Nodes get the volume's `iscsi://` URL and their VMMs log in themselves, so the
//! nodes need no shared filesystem and no kernel initiator.
//!
//! A volume's target exists only while a VM has the volume: it is made when the VM is
//! about to use it and withdrawn when the volume is detached or the VM ends. It admits
//! only the initiator name of the node the VM runs on, and only with the volume's own
//! CHAP credentials, which pdisk hands to that node alone; a target without its ACL
//! admits nobody, so a half-made export is closed, never open.
//!
//! tgtd keeps its targets and accounts in memory only: [`IscsiExport::export`] is
//! idempotent and puts back whatever is missing, so a restarted tgtd serves the attached
//! volumes again as soon as pdisk's reconciliation passes over them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error("cannot take the lock on tgtd's changes: {0}")]
    Lock(#[source] std::io::Error),
}

const TGTADM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub struct IscsiExport {
    config: IscsiPoolConfig,
    /// Changes look tgtd's targets up and act on their ids: one at a time in this process,
    /// and (with `lock_file`) across the replicas on this host.
    changes: Arc<Mutex<()>>,
    lock_file: Option<PathBuf>,
}

/// Held while tgtd is changed.
struct Changing<'a> {
    _here: tokio::sync::MutexGuard<'a, ()>,
    _host: Option<std::fs::File>,
}

impl IscsiExport {
    pub fn new(config: IscsiPoolConfig) -> Self {
        IscsiExport {
            config,
            changes: Arc::new(Mutex::new(())),
            lock_file: None,
        }
    }

    /// Every replica on this host that changes the same tgtd takes `path`'s lock first.
    pub fn with_lock_file(mut self, path: PathBuf) -> Self {
        self.lock_file = Some(path);
        self
    }

    /// Another pool on this host's tgtd: its changes and this one's go one at a time, as
    /// both pick target ids from the same tgtd.
    pub fn sharing_changes_with(mut self, other: &IscsiExport) -> Self {
        self.changes = other.changes.clone();
        self
    }

    async fn changing(&self) -> Result<Changing<'_>, ExportError> {
        let here = self.changes.lock().await;
        let host = match &self.lock_file {
            Some(path) => {
                let path = path.clone();
                let locked = tokio::task::spawn_blocking(move || {
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)?;
                    file.lock()?;
                    Ok(file)
                })
                .await
                .map_err(|e| ExportError::Lock(std::io::Error::other(e)))?
                .map_err(ExportError::Lock)?;
                Some(locked)
            }
            None => None,
        };
        Ok(Changing {
            _here: here,
            _host: host,
        })
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

    /// Whether the LUN URL `location` is one of this pool's.
    pub fn owns(&self, location: &str) -> bool {
        self.uuid_at(location).is_some()
    }

    /// The volume whose LUN URL is `location`, if it is one of this pool's.
    pub fn uuid_at<'a>(&self, location: &'a str) -> Option<&'a str> {
        location
            .strip_prefix("iscsi://")?
            .strip_prefix(self.config.portal.as_str())?
            .strip_prefix('/')?
            .strip_prefix(self.config.iqn_prefix.as_str())?
            .strip_prefix(':')?
            .strip_suffix("/1")
    }

    async fn tgtadm(&self, args: &[&str]) -> Result<String, ExportError> {
        // What errors show of the command: never an account's password.
        let shown = || {
            let mut shown: Vec<&str> = args.to_vec();
            if let Some(at) = shown.iter().position(|a| *a == "--password") {
                if let Some(secret) = shown.get_mut(at + 1) {
                    *secret = "(secret)";
                }
            }
            shown.join(" ")
        };
        let control = self.config.control_port.to_string();
        let run = tokio::process::Command::new("tgtadm")
            .args(["-C", &control, "--lld", "iscsi"])
            .args(args)
            .kill_on_drop(true)
            .output();
        // A hung tgtd must not hold every volume operation behind this lock.
        let out = tokio::time::timeout(TGTADM_TIMEOUT, run)
            .await
            .map_err(|_| ExportError::Timeout(shown()))?
            .map_err(ExportError::Spawn)?;
        if !out.status.success() {
            return Err(ExportError::Tgtadm {
                args: shown(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The CHAP user of the volume's target.
    pub fn chap_user(uuid: &str) -> String {
        format!("pdisk-{uuid}")
    }

    /// Exports `file` as the volume's target to `access.initiator` alone, with the
    /// volume's CHAP account: whatever of that tgtd lacks (a restart, a crash half-way) is
    /// made, a LUN-less target is made again, and any other initiator's admission (the
    /// node the volume was on before) is withdrawn.
    pub async fn export(
        &self,
        uuid: &str,
        file: &Path,
        access: &Access<'_>,
    ) -> Result<(), ExportError> {
        let _one_at_a_time = self.changing().await?;
        let name = self.target(uuid);
        let shown = self.show().await?;
        let existing = shown.iter().find(|t| t.name == name);
        let tid = match existing {
            Some(target) if target.has_lun => target.tid,
            _ => {
                if let Some(target) = existing {
                    self.delete_target(target.tid).await?;
                }
                self.new_target(&shown, &name, file).await?
            }
        };
        let target = self.show().await?.into_iter().find(|t| t.tid == tid);
        let target = target.unwrap_or_default();
        let tid = tid.to_string();
        // The account before the ACL: the target must never admit anyone without CHAP.
        if !target.accounts.contains(&access.user) {
            let accounts = self.tgtadm(&["--op", "show", "--mode", "account"]).await?;
            if !accounts.lines().skip(1).any(|l| l.trim() == access.user) {
                match self
                    .tgtadm(&[
                        "--op",
                        "new",
                        "--mode",
                        "account",
                        "--user",
                        &access.user,
                        "--password",
                        access.secret,
                    ])
                    .await
                {
                    Err(ExportError::Tgtadm { stderr, .. })
                        if stderr.contains("already exists") => {}
                    other => {
                        other?;
                    }
                }
            }
            self.tgtadm(&[
                "--op",
                "bind",
                "--mode",
                "account",
                "--tid",
                &tid,
                "--user",
                &access.user,
            ])
            .await?;
        }
        // Debian's tgtd admits an initiator that matches any one entry, address or name:
        // the node's name must be the only one.
        for entry in &target.acl {
            if entry != access.initiator {
                let by = if is_initiator_name(entry) { "-Q" } else { "-I" };
                self.tgtadm(&[
                    "--op", "unbind", "--mode", "target", "--tid", &tid, by, entry,
                ])
                .await?;
            }
        }
        // A read-only mount's node gets a LUN it cannot write, whatever its VMM does.
        if target.lun_read_only != Some(access.read_only) {
            let flag = if access.read_only {
                "readonly=1"
            } else {
                "readonly=0"
            };
            self.tgtadm(&[
                "--op",
                "update",
                "--mode",
                "logicalunit",
                "--tid",
                &tid,
                "--lun",
                "1",
                "--params",
                flag,
            ])
            .await?;
        }
        if !target.acl.iter().any(|e| e == access.initiator) {
            self.tgtadm(&[
                "--op",
                "bind",
                "--mode",
                "target",
                "--tid",
                &tid,
                "-Q",
                access.initiator,
            ])
            .await?;
        }
        Ok(())
    }

    /// A target with the file as its LUN 1 and no ACL (nobody may log in yet).
    async fn new_target(
        &self,
        shown: &[TargetView],
        name: &str,
        file: &Path,
    ) -> Result<u32, ExportError> {
        let tid_number = (1..=u32::from(u16::MAX))
            .find(|t| !shown.iter().any(|used| used.tid == *t))
            .ok_or(ExportError::NoTid)?;
        let tid = tid_number.to_string();
        self.tgtadm(&["--op", "new", "--mode", "target", "--tid", &tid, "-T", name])
            .await?;
        let file = file.to_string_lossy();
        // The LUN is what marks a target complete: a crash before it leaves a LUN-less
        // target, which the next export makes again.
        let made = async {
            let lun = ["--tid", tid.as_str(), "--lun", "1"];
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
            let _ = self.delete_target(tid_number).await;
            return Err(e);
        }
        Ok(tid_number)
    }

    /// The volumes tgtd has a target for, each with the one initiator it admits if its
    /// export is complete as [`IscsiExport::export`] makes it (LUN, CHAP account, that
    /// initiator alone), else None.
    pub async fn exported(&self) -> Result<Vec<(String, Option<(String, bool)>)>, ExportError> {
        let prefix = format!("{}:", self.config.iqn_prefix);
        Ok(self
            .show()
            .await?
            .into_iter()
            .filter_map(|t| {
                let uuid = t.name.strip_prefix(&prefix)?.to_owned();
                let complete = t.has_lun
                    && t.accounts == [Self::chap_user(&uuid)]
                    && t.acl.len() == 1
                    && is_initiator_name(&t.acl[0]);
                let admitted = match (complete, t.lun_read_only) {
                    (true, Some(read_only)) => Some((t.acl[0].clone(), read_only)),
                    _ => None,
                };
                Some((uuid, admitted))
            })
            .collect())
    }

    async fn show(&self) -> Result<Vec<TargetView>, ExportError> {
        let shown = self.tgtadm(&["--op", "show", "--mode", "target"]).await?;
        Ok(parse_targets(&shown))
    }

    /// Withdraws the volume's target (sessions still logged in are cut) and its CHAP
    /// account, together, so that no target is ever left without its account. Done
    /// again, or for what tgtd does not have, it does nothing.
    pub async fn unexport(&self, uuid: &str) -> Result<(), ExportError> {
        let _one_at_a_time = self.changing().await?;
        let name = self.target(uuid);
        if let Some(target) = self.show().await?.into_iter().find(|t| t.name == name) {
            self.delete_target(target.tid).await?;
        }
        let user = Self::chap_user(uuid);
        let accounts = self.tgtadm(&["--op", "show", "--mode", "account"]).await?;
        if accounts.lines().skip(1).any(|l| l.trim() == user) {
            self.tgtadm(&["--op", "delete", "--mode", "account", "--user", &user])
                .await?;
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

/// Who may log in to a volume's target: the node's initiator, with the volume's account.
pub struct Access<'a> {
    pub initiator: &'a str,
    pub user: String,
    pub secret: &'a str,
    /// The mount is read-only: so is the LUN.
    pub read_only: bool,
}

/// One target as `tgtadm --op show --mode target` lists it.
#[derive(Debug, Default, PartialEq)]
struct TargetView {
    tid: u32,
    name: String,
    has_lun: bool,
    /// LUN 1's `Readonly:`, when listed.
    lun_read_only: Option<bool>,
    accounts: Vec<String>,
    /// Admitted addresses ("ALL", IPs) and initiator names, as tgtd lists them together.
    acl: Vec<String>,
}

fn parse_targets(shown: &str) -> Vec<TargetView> {
    let mut targets: Vec<TargetView> = Vec::new();
    let mut section = "";
    let mut in_lun_1 = false;
    for line in shown.lines() {
        if let Some(rest) = line.strip_prefix("Target ") {
            if let Some((tid, name)) = rest.split_once(": ") {
                if let Ok(tid) = tid.parse() {
                    targets.push(TargetView {
                        tid,
                        name: name.trim().to_owned(),
                        ..TargetView::default()
                    });
                }
            }
            section = "";
            continue;
        }
        let Some(target) = targets.last_mut() else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        match indent {
            4 => section = text.trim_end_matches(':'),
            8 if section == "LUN information" && text.starts_with("LUN: ") => {
                in_lun_1 = text == "LUN: 1";
                target.has_lun |= in_lun_1;
            }
            12 if section == "LUN information" && in_lun_1 => {
                if let Some(value) = text.strip_prefix("Readonly: ") {
                    target.lun_read_only = Some(value == "Yes");
                }
            }
            8 => match section {
                "Account information" => target.accounts.push(text.to_owned()),
                "ACL information" => target.acl.push(text.to_owned()),
                _ => {}
            },
            _ => {}
        }
    }
    targets
}

/// iSCSI names (RFC 3720: iqn., eui., naa.), as opposed to the addresses in an ACL.
fn is_initiator_name(entry: &str) -> bool {
    ["iqn.", "eui.", "naa."]
        .iter()
        .any(|p| entry.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_read_with_their_lun_accounts_and_acl() {
        let shown = "Target 1: iqn.x:a\n    System information:\n        Driver: iscsi\n        State: ready\n    I_T nexus information:\n    LUN information:\n        LUN: 0\n            Type: controller\n        LUN: 1\n            Type: disk\n            Readonly: No\n    Account information:\n        pdisk-a\n    ACL information:\n        ALL\n        iqn.2026-12.eu.stratuslab.node:1-n\nTarget 2: iqn.x:b\n    System information:\n    LUN information:\n        LUN: 0\n    Account information:\n    ACL information:\n";
        let targets = parse_targets(shown);
        assert_eq!(
            targets,
            vec![
                TargetView {
                    tid: 1,
                    name: "iqn.x:a".into(),
                    has_lun: true,
                    lun_read_only: Some(false),
                    accounts: vec!["pdisk-a".into()],
                    acl: vec!["ALL".into(), "iqn.2026-12.eu.stratuslab.node:1-n".into()],
                },
                TargetView {
                    tid: 2,
                    name: "iqn.x:b".into(),
                    ..TargetView::default()
                },
            ]
        );
        assert!(is_initiator_name(&targets[0].acl[1]));
        assert!(!is_initiator_name("198.18.0.7"));
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
