//! A throw-away tgtd for benchmarks (scripts/iscsi-target.sh, Debian's tgt).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Result};

/// A throw-away tgtd (scripts/iscsi-target.sh), stopped when dropped.
pub struct Tgtd {
    script: PathBuf,
    dir: PathBuf,
}

impl Tgtd {
    fn run(script: &Path, args: &[&str]) -> Result<()> {
        let out = Command::new("bash").arg(script).args(args).output()?;
        ensure!(
            out.status.success(),
            "iscsi-target.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    pub fn start(dir: &Path) -> Result<Tgtd> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-target.sh");
        Self::run(&script, &["start", &dir.to_string_lossy()])?;
        Ok(Tgtd {
            script,
            dir: dir.to_owned(),
        })
    }

    /// A LUN of `file`; its URL.
    pub fn add(&self, iqn: &str, file: &Path) -> Result<String> {
        let dir = self.dir.to_string_lossy();
        Self::run(&self.script, &["add", &dir, iqn, &file.to_string_lossy()])?;
        let port = std::fs::read_to_string(self.dir.join("port"))?;
        Ok(format!("iscsi://127.0.0.1:{}/{iqn}/1", port.trim()))
    }

    /// A tgtd, or `None` (said on stderr) where Debian's tgt is not installed.
    pub fn start_if_installed(dir: &Path) -> Result<Option<Tgtd>> {
        match Command::new("tgtd").arg("--help").output() {
            Ok(_) => Ok(Some(Tgtd::start(dir)?)),
            Err(_) => {
                eprintln!("tgtd is not installed (Debian's tgt): no iSCSI row");
                Ok(None)
            }
        }
    }

    /// `(portal port, control port)` for `[volume_iscsi]`.
    pub fn ports(&self) -> Result<(String, String)> {
        let read = |name: &str| -> Result<String> {
            Ok(std::fs::read_to_string(self.dir.join(name))?
                .trim()
                .to_owned())
        };
        Ok((read("port")?, read("control")?))
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = Tgtd::run(&self.script, &["stop", &self.dir.to_string_lossy()]);
    }
}
