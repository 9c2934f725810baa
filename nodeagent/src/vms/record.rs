//! One record per VM on disk: all the agent needs to come back after it was killed. A
//! record is replaced whole (temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves the old record or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::types::{DiskSpec, VmExit, VmSpec, VmState};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub id: String,
    pub spec: VmSpec,
    pub state: VmState,
    /// The VMM process, and when it started (to tell it from a later process with the
    /// same number).
    pub pid: Option<u32>,
    pub pid_start_time: Option<u64>,
    pub exit: Option<VmExit>,
    pub restarts: u32,
    pub created: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub attached: Vec<DiskSpec>,
    /// The user and group of the VM's jailed VMM.
    #[serde(default)]
    pub jail_uid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write VM record {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read VM record {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM record {path} is damaged: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn record_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Writes `record` into `dir` atomically and durably.
pub fn save(dir: &Path, record: &VmRecord) -> Result<(), RecordError> {
    let path = record_path(dir, &record.id);
    let write_err = |source| RecordError::Write {
        path: path.clone(),
        source,
    };
    let body =
        serde_json::to_vec_pretty(record).map_err(|e| write_err(std::io::Error::other(e)))?;
    // Records hold the CHAP secrets of the VM's iSCSI volumes: root's alone.
    write_private(&path, &body).map_err(write_err)
}

/// Writes `path` atomically and durably, readable by its owner alone (mode 0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(format!(
            "{} names no file",
            path.display()
        )));
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

pub fn remove(dir: &Path, id: &str) -> Result<(), RecordError> {
    let path = record_path(dir, id);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir).map_err(|source| RecordError::Write { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Write { path, source }),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Every record in `dir`. Leftover temporary files (a crash between write and rename) are
/// removed; a damaged record is reported and skipped, never guessed at.
pub fn load_all(dir: &Path) -> Result<Vec<VmRecord>, RecordError> {
    let read_err = |source| RecordError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        // A VM's directory named like a record (ids ending in ".json" were once taken)
        // or one unreadable record must not keep the agent from starting.
        if !name.ends_with(".json") || !path.is_file() {
            continue;
        }
        let body = match std::fs::read(&path) {
            Ok(body) => body,
            Err(source) => {
                let e = RecordError::Read { path, source };
                tracing::error!("{e}; skipping it");
                continue;
            }
        };
        match serde_json::from_slice(&body) {
            Ok(record) => records.push(record),
            Err(source) => {
                let e = RecordError::Parse { path, source };
                tracing::error!("{e}; skipping it");
            }
        }
    }
    records.sort_by(|a: &VmRecord, b| a.id.cmp(&b.id));
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::BootSpec;

    fn record(id: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 64,
                boot: BootSpec {
                    kernel: Some("/k".into()),
                    initrd: None,
                    cmdline: String::new(),
                    image: None,
                },
                disks: vec![],
                nics: vec![],
                context: None,
            },
            state: VmState::Running,
            pid: Some(42),
            pid_start_time: Some(7),
            exit: None,
            restarts: 0,
            created: chrono::Utc::now(),
            attached: vec![],
            jail_uid: Some(1_900_000_000),
        }
    }

    #[test]
    fn a_directory_named_like_a_record_or_an_unreadable_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &record("a")).unwrap();
        std::fs::create_dir(dir.path().join("x.json")).unwrap();
        let loaded = load_all(dir.path()).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, "a");
    }

    #[test]
    fn records_round_trip_and_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &record("b")).unwrap();
        save(dir.path(), &record("a")).unwrap();
        let mut changed = record("a");
        changed.state = VmState::Stopped;
        save(dir.path(), &changed).unwrap();
        std::fs::write(dir.path().join(".c.json.tmp"), b"{half").unwrap();
        std::fs::write(dir.path().join("d.json"), b"{damaged").unwrap();
        let all = load_all(dir.path()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(all[0].state, VmState::Stopped);
        assert!(!dir.path().join(".c.json.tmp").exists());
        remove(dir.path(), "a").unwrap();
        remove(dir.path(), "a").unwrap();
        assert_eq!(load_all(dir.path()).unwrap().len(), 1);
    }
}
