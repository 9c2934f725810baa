//! seccomp confinement: every kind of thread is killed (the whole process, SIGSYS) by a
//! call outside its list, `log` lets the call through, a thread may be created but never
//! a process; and the stratus-vmm binary runs every thread of a live VM confined.
//!
//! A filter cannot be taken off a thread, so each case runs in a child process: this test
//! binary again, running only `confined_child` with the case in its environment.

use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use stratus_vmm::seccomp::{self, Mode, ThreadKind};

const CASE: &str = "STRATUS_SECCOMP_CASE";

/// Runs `confined_child` in a child process with `case`; returns its wait status.
fn run_case(case: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "confined_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE, case)
        .output()
        .expect("run the test binary again")
        .status
}

/// The calling thread's scheduling policy, as /proc shows it (field 41 of `stat`).
/// `stat` is the thread's /proc/thread-self/stat opened before it was confined (a net
/// worker may not open files) and not read yet.
fn own_policy(stat: &std::fs::File) -> i32 {
    let mut buf = [0u8; 1024];
    // SAFETY: reads into a buffer we own, at most its length.
    let n = unsafe { libc::read(stat.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    let stat = String::from_utf8_lossy(&buf[..usize::try_from(n).unwrap()]).into_owned();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(38).unwrap().parse().unwrap()
}

#[test]
#[ignore = "run by the other tests in a child process"]
fn confined_child() {
    let Ok(case) = std::env::var(CASE) else {
        return;
    };
    let mut parts = case.split(':');
    let (kind, mode, call) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let kind = *ThreadKind::ALL
        .iter()
        .find(|k| format!("{k:?}") == kind)
        .unwrap();
    seccomp::set_mode(if mode == "log" { Mode::Log } else { Mode::Kill });
    let stat = std::fs::File::open("/proc/thread-self/stat").unwrap();
    // Made before the filter, as the VMM makes its VM before confining its threads.
    let vm = call
        .starts_with("kvm-")
        .then(|| kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    seccomp::confine(kind).unwrap();
    // Allowed to every thread: the filter does not stop ordinary work.
    // SAFETY: getpid has no arguments and no side effects.
    assert!(unsafe { libc::getpid() } > 0);
    let _ = std::hint::black_box(vec![0u8; 1 << 20]);
    match call {
        // On no thread's list; with 0xffffffff it only reads the execution domain.
        // SAFETY: a query without side effects.
        "personality" => unsafe {
            libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
        },
        "fork" => {
            // SAFETY: the child exits at once without touching anything.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit ends the forked child only.
                unsafe { libc::_exit(0) };
            }
        }
        "batch" => {
            stratus_vmm::devices::virtio::worker::batch_wakeups("test");
            assert_eq!(own_policy(&stat), libc::SCHED_BATCH);
        }
        "realtime" | "other-thread" => {
            let (pid, policy) = if call == "realtime" {
                (0, libc::SCHED_FIFO)
            } else {
                // SAFETY: getppid has no arguments and no side effects.
                (unsafe { libc::getppid() }, libc::SCHED_BATCH)
            };
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: a valid sched_param outliving the call.
            unsafe { libc::sched_setscheduler(pid, policy, &param) };
        }
        // Whether the call succeeds does not matter (this VM has no interrupt controller):
        // only whether the filter lets it be made.
        "kvm-irq-line" => {
            let _ = vm.unwrap().set_irq_line(8, true);
        }
        "kvm-other" => {
            let _ = vm.unwrap().check_extension(kvm_ioctls::Cap::Irqchip);
        }
        "thread" => std::thread::spawn(|| 7)
            .join()
            .map(|v| assert_eq!(v, 7))
            .unwrap(),
        other => panic!("unknown call {other}"),
    }
    std::process::exit(42);
}

#[test]
fn a_call_outside_the_list_kills_the_process_with_sigsys() {
    for kind in ThreadKind::ALL {
        let status = run_case(&format!("{kind:?}:kill:personality"));
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{kind:?}: {status}");
    }
}

#[test]
fn threads_may_be_created_but_never_processes() {
    for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Api] {
        let status = run_case(&format!("{kind:?}:kill:thread"));
        assert_eq!(status.code(), Some(42), "{kind:?}: {status}");
        let status = run_case(&format!("{kind:?}:kill:fork"));
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{kind:?}: {status}");
    }
    // A worker creates nothing at all.
    let status = run_case("BlockWorker:kill:thread");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}");
}

/// The RTC's thread raises the interrupts a guest enables (`hwclock` does): without
/// `KVM_IRQ_LINE` on its list, the first one killed the VMM.
#[test]
fn the_clock_thread_may_raise_an_interrupt_line_and_make_no_other_kvm_call() {
    let status = run_case("Clock:kill:kvm-irq-line");
    assert_eq!(status.code(), Some(42), "{status}");
    let status = run_case("Clock:kill:kvm-other");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}");
}

#[test]
fn workers_may_batch_their_own_wakeups_and_nothing_more() {
    for kind in ["BlockWorker", "NetWorker"] {
        let status = run_case(&format!("{kind}:kill:batch"));
        assert_eq!(status.code(), Some(42), "{kind}: {status}");
        for call in ["realtime", "other-thread"] {
            let status = run_case(&format!("{kind}:kill:{call}"));
            assert_eq!(
                status.signal(),
                Some(libc::SIGSYS),
                "{kind} {call}: {status}"
            );
        }
    }
}

#[test]
fn log_mode_lets_the_call_through() {
    let status = run_case("BlockWorker:log:personality");
    assert_eq!(status.code(), Some(42), "{status}");
}

#[test]
fn off_installs_nothing() {
    seccomp::set_mode(Mode::Off);
    seccomp::confine(ThreadKind::BlockWorker).unwrap();
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
}
