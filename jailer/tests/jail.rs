//! The jailer against the real kernel: a static busybox stands in for the VMM and reports
//! what it can see and do from inside. Needs root (CI runs as root) and busybox-static.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const JAILER: &str = env!("CARGO_BIN_EXE_stratus-jailer");
const BUSYBOX: &str = "/bin/busybox";
const UID: u32 = 1_900_000_101;

struct Jail {
    dir: tempfile::TempDir,
    id: String,
}

impl Jail {
    fn new(tag: &str) -> Jail {
        Jail {
            dir: tempfile::tempdir().unwrap(),
            id: format!("jail-test-{tag}-{}", std::process::id()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn root(&self) -> PathBuf {
        self.path("root")
    }

    /// A directory of the host that the jailed program's user owns.
    fn owned_dir(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(UID), Some(UID)).unwrap();
        dir
    }

    /// busybox `applet` with `args` as the jail's program.
    fn applet(&self, extra: &[&str], applet: &[&str]) -> Command {
        let mut cmd = Command::new(JAILER);
        cmd.args(["run", "--id", &self.id, "--uid", &UID.to_string()])
            .args(["--gid", &UID.to_string(), "--root"])
            .arg(self.root())
            .args(extra)
            .args(["--", BUSYBOX])
            .args(applet);
        cmd
    }

    fn command(&self, extra: &[&str], script: &str) -> Command {
        self.applet(extra, &["sh", "-c", script])
    }

    fn run(&self, extra: &[&str], script: &str) -> Output {
        self.command(extra, script)
            .output()
            .expect("run stratus-jailer")
    }
}

/// A jailer ended with the test, whatever its outcome: a jailed script left waiting would
/// run on, and keep the test's output open.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmpfs mounted for a test, unmounted after it.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(at: &Path) -> TmpfsMount {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs at {}", at.display());
        TmpfsMount(at.to_owned())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A block device node made for a test, removed after it.
struct BlockNode(PathBuf);

impl BlockNode {
    fn new(path: &str) -> BlockNode {
        let status = Command::new("mknod")
            .args([path, "b", "7", "250"])
            .status()
            .unwrap();
        assert!(status.success(), "mknod {path}");
        BlockNode(PathBuf::from(path))
    }
}

impl Drop for BlockNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    [
        "/sys/fs/cgroup/stratus",
        "/sys/fs/cgroup/memory/stratus",
        "/sys/fs/cgroup/pids/stratus",
        "/sys/fs/cgroup/cpu/stratus",
    ]
    .iter()
    .map(|parent| Path::new(parent).join(id))
    .collect()
}

#[test]
fn the_jailed_program_sees_only_what_it_was_given_as_its_own_user_without_privileges() {
    let jail = Jail::new("view");
    let vm_dir = jail.owned_dir("vm");
    std::fs::write(vm_dir.join("disk.img"), "the VM's disk").unwrap();
    let kernel = jail.path("vmlinux");
    std::fs::write(&kernel, "kernel").unwrap();
    // A program the VMM might plant in its own directory, and a host mount below it.
    let tool = vm_dir.join("busybox");
    std::fs::copy(BUSYBOX, &tool).unwrap();
    let below = vm_dir.join("below");
    std::fs::create_dir(&below).unwrap();
    let _below = TmpfsMount::new(&below);
    std::fs::write(below.join("host-file"), "a host mount's file").unwrap();
    let other_vm = jail.path("other-vm");
    std::fs::create_dir(&other_vm).unwrap();
    std::fs::write(other_vm.join("disk.img"), "another VM's disk").unwrap();

    let script = format!(
        "echo ROOT $(ls / | tr '\\n' ' ')\n\
         echo DEV $(ls /dev | tr '\\n' ' ')\n\
         cat {vm}/disk.img; echo\n\
         echo written > {vm}/new && echo WROTE-OWN\n\
         cat {kernel}; echo\n\
         echo x > {kernel} || echo KERNEL-READ-ONLY\n\
         cat {other}/disk.img || echo NO-OTHER-VM\n\
         ls /etc/shadow /root /home || echo NO-HOST-PATHS\n\
         touch /planted || echo ROOT-READ-ONLY\n\
         echo PID $$\n\
         {vm}/busybox true && echo EXEC-DATA || echo DATA-NOEXEC\n\
         ls {vm}/below/host-file || echo NO-SUBMOUNT\n\
         grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status\n\
         ls -ln /dev/kvm\n\
         cat /proc/self/cgroup",
        vm = vm_dir.display(),
        kernel = kernel.display(),
        other = other_vm.display(),
    );
    let out = jail.run(
        &[
            "--bind",
            vm_dir.to_str().unwrap(),
            "--bind-ro",
            kernel.to_str().unwrap(),
            "--memory-max",
            &(256u64 << 20).to_string(),
            "--pids-max",
            "64",
        ],
        &script,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let root_line = stdout.lines().find(|l| l.starts_with("ROOT ")).unwrap();
    let mut root: Vec<&str> = root_line.split_whitespace().skip(1).collect();
    root.sort();
    // The VM's files are under the temporary directory's top (/tmp): only that chain.
    let top = vm_dir
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    let mut expected: Vec<&str> = ["dev", "lib", "proc", "usr", top]
        .into_iter()
        .chain(Path::new("/lib64").is_dir().then_some("lib64"))
        .collect();
    expected.sort();
    expected.dedup();
    assert_eq!(root, expected, "{stdout}");
    for want in [
        "DEV kvm net null random urandom zero",
        "the VM's disk",
        "WROTE-OWN",
        "kernel",
        "KERNEL-READ-ONLY",
        "NO-OTHER-VM",
        "NO-HOST-PATHS",
        "ROOT-READ-ONLY",
        "DATA-NOEXEC",
        "NO-SUBMOUNT",
        "PID 1",
        "NoNewPrivs:\t1",
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains(&format!("Uid:\t{UID}\t{UID}\t{UID}\t{UID}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{UID} {UID}")),
        "/dev/kvm is the VM's: {stdout}"
    );
    assert!(
        stdout.contains(&format!("/stratus/{}", jail.id)),
        "in its own cgroup: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(vm_dir.join("new")).unwrap(),
        "written\n"
    );
    // Afterwards: no jail root, no cgroup left behind.
    assert!(!jail.root().exists(), "the jail root was removed");
    for dir in cgroup_dirs(&jail.id) {
        assert!(!dir.exists(), "{} was removed", dir.display());
    }
}

#[test]
fn the_memory_limit_holds_and_the_end_is_reported_as_it_happened() {
    let jail = Jail::new("mem");
    let limit = (64u64 << 20).to_string();
    // 200 MiB touched at once in a 64 MiB jail: the kernel kills it, and the jailer ends
    // the same way.
    let dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"];
    let out = jail
        .applet(&["--memory-max", &limit], &dd)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
    // Control: the same under a limit it fits in.
    let out = jail
        .applet(&["--memory-max", &(512u64 << 20).to_string()], &dd)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = jail.run(&[], "exit 7");
    assert_eq!(out.status.code(), Some(7));
    // A setup failure is the jailer's own code, with the reason.
    let out = jail.run(&["--bind-ro", "/nonexistent/stratus"], "exit 0");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/nonexistent/stratus"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn killing_the_jailer_kills_the_vmm_and_stop_signals_are_passed_on() {
    let jail = Jail::new("signals");
    let marker = jail.owned_dir("marker");
    let script = format!(
        "trap 'echo TERM > {m}/term; exit 3' TERM; echo $$ > {m}/started; \
         while :; do sleep 0.05; done",
        m = marker.display()
    );
    let wait_for = |path: &Path| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let bind = ["--bind", marker.to_str().unwrap()];
    let start = || {
        let _ = std::fs::remove_file(marker.join("started"));
        let child = jail
            .command(&bind, &script)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&marker.join("started"));
        child
    };
    let child = start();
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(
        status.code(),
        Some(3),
        "the VMM's own exit after its handler ran"
    );
    assert!(marker.join("term").exists());

    let mut child = start();
    let vmm = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{vmm}")).exists()
        && !std::fs::read_to_string(format!("/proc/{vmm}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(Instant::now() < deadline, "the VMM outlived its jailer");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A killed jailer cannot clean up; the agent removes what it left.
    let limits = stratus_jailer::CgroupLimits {
        parent: "stratus".into(),
        root: "/sys/fs/cgroup".into(),
        memory_max: None,
        pids_max: None,
        cpu_millis: None,
    };
    let left = stratus_jailer::cgroup::VmCgroup::existing(&limits, &jail.id);
    assert!(
        !left.dirs().is_empty(),
        "the killed jailer's cgroup is still there"
    );
    left.remove().unwrap();
    for dir in cgroup_dirs(&jail.id) {
        assert!(!dir.exists(), "{} was removed", dir.display());
    }
}

#[test]
fn a_disk_hot_plugged_later_appears_in_the_running_jail_and_nothing_else_does() {
    let jail = Jail::new("enter");
    let volume = jail.path("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("data"), "hot-plugged").unwrap();
    std::fs::copy(BUSYBOX, volume.join("busybox")).unwrap();
    let out_dir = jail.owned_dir("out");
    // A block device node (an unattached loop device's numbers: never opened here).
    let disk = BlockNode::new(&format!("/dev/stratus-jailer-test-{}", std::process::id()));
    let script = format!(
        // The jail has no `sleep` to run: the wait spins (for as long as the test lets it).
        "until [ -e {v}/data ] && [ -e {d} ]; do :; done; \
         cat {v}/data > {o}/seen; echo x > {v}/data || echo RO > {o}/ro; \
         {v}/busybox true && echo EXEC > {o}/exec; \
         ls -ln {d} > {o}/dev; if [ -e /dev/full ]; then echo FULL > {o}/full; fi",
        v = volume.display(),
        d = disk.0.display(),
        o = out_dir.display()
    );
    let mut child = Reaped(
        jail.command(&["--bind", out_dir.to_str().unwrap()], &script)
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let enter = |args: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(JAILER)
                .args(["enter", "--pid", &pid])
                .args(["--uid", &UID.to_string(), "--gid", &UID.to_string()])
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            // Until the VMM exists there is nothing to enter.
            assert!(
                Instant::now() < deadline && text(&out.stderr).contains("has no VMM"),
                "{}",
                text(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    enter(&["--bind-ro", volume.to_str().unwrap()]);
    // A character device is no disk.
    let refused = Command::new(JAILER)
        .args(["enter", "--pid", &pid])
        .args(["--uid", &UID.to_string(), "--gid", &UID.to_string()])
        .args(["--device", "/dev/full"])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a character device was taken as a disk"
    );
    assert!(
        text(&refused.stderr).contains("not a block device"),
        "{}",
        text(&refused.stderr)
    );
    enter(&["--device", disk.0.to_str().unwrap()]);
    let status = child.0.wait().unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(out_dir.join("seen")).unwrap(),
        "hot-plugged"
    );
    assert!(
        out_dir.join("ro").exists(),
        "the read-only disk stayed read-only"
    );
    let node = std::fs::read_to_string(out_dir.join("dev")).unwrap();
    assert!(
        node.starts_with('b') && node.contains(&format!("{UID} {UID}")),
        "the device node is the VM's: {node}"
    );
    assert!(
        !out_dir.join("full").exists(),
        "the refused device appeared"
    );
    assert!(
        !out_dir.join("exec").exists(),
        "a program on a hot-plugged bind ran"
    );
    assert_eq!(
        std::fs::read_to_string(volume.join("data")).unwrap(),
        "hot-plugged"
    );

    // The host's own mount namespace is never the target.
    let out = Command::new(JAILER)
        .args(["enter", "--pid", &std::process::id().to_string()])
        .args(["--uid", "7", "--gid", "7", "--bind-ro", "/etc"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // Nor another program's (a jailer's pid reused by a process whose child has a mount
    // namespace of its own).
    let mut other = Command::new("unshare")
        .args(["--mount", "--fork", "sleep", "30"])
        .spawn()
        .unwrap();
    let children = format!("/proc/{0}/task/{0}/children", other.id());
    let started = Instant::now();
    while std::fs::read_to_string(&children)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "unshare made no child"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(JAILER)
        .args(["enter", "--pid", &other.id().to_string()])
        .args(["--uid", "7", "--gid", "7", "--bind-ro", "/etc"])
        .output()
        .unwrap();
    let _ = other.kill();
    let _ = other.wait();
    assert!(!out.status.success(), "entered another program's namespace");
    assert!(
        text(&out.stderr).contains("is not a stratus-jailer"),
        "{}",
        text(&out.stderr)
    );
}
