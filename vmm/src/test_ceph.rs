//! A throw-away single-node Ceph cluster for the tests of every crate that opens RBD
//! images (the VMM's engine, the node agent's disk sources, pdisk's RBD pool): the
//! project's `scripts/ceph-cluster.sh`, started in a directory of its own and stopped when
//! the value is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct CephCluster {
    dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

fn run_script(command: &str, dir: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(script())
        .arg(command)
        .arg(dir)
        .output()
        .expect("run scripts/ceph-cluster.sh")
}

impl CephCluster {
    /// Starts a new, empty cluster (pool `rbd`, user `client.stratus`); panics with the
    /// script's output if it does not come up.
    pub fn start() -> CephCluster {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "stratus-ceph-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("make the cluster's directory");
        let cluster = CephCluster { dir };
        let out = run_script("start", &cluster.dir);
        assert!(
            out.status.success(),
            "ceph-cluster.sh start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster's `ceph.conf` (client.admin's keyring is found through it).
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// The keyring of `client.stratus` (`profile rbd` on the pool `rbd`).
    pub fn keyring(&self) -> PathBuf {
        self.dir.join("client.stratus.keyring")
    }

    /// Runs `rbd` as client.admin and returns what it printed; panics if it failed.
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = self.try_rbd(args);
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `rbd` as client.admin, whatever its outcome.
    pub fn try_rbd(&self, args: &[&str]) -> std::process::Output {
        Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run rbd (Debian's ceph-common)")
    }

    /// Stops the OSD without closing its connections (SIGSTOP): requests sent to it stay
    /// unanswered, as from a cluster that is unreachable, and its in-memory store survives.
    pub fn freeze_osd(&self) {
        self.signal_osd("-STOP");
    }

    /// Lets a frozen OSD go on (SIGCONT).
    pub fn thaw_osd(&self) {
        self.signal_osd("-CONT");
    }

    fn signal_osd(&self, signal: &str) {
        let pid =
            std::fs::read_to_string(self.dir.join("run/osd.0.pid")).expect("osd.0's pid file");
        let status = Command::new("kill")
            .args([signal, pid.trim()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} osd.0");
    }

    /// The image's bytes as `rbd export` reads them.
    pub fn export(&self, image: &str) -> Vec<u8> {
        let out = self.dir.join("export.raw");
        let _ = std::fs::remove_file(&out);
        self.rbd(&["export", "--no-progress", image, &out.to_string_lossy()]);
        std::fs::read(out).expect("read the exported image")
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        run_script("stop", &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
