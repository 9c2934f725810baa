//! Timing processes by what they print, and reading a VMM's memory use from /proc.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Times from spawning a process to each marker's first appearance on its standard output,
/// and to its exit.
#[derive(Debug, Clone)]
pub struct Timing {
    pub markers: Vec<Option<Duration>>,
    pub exited: Duration,
    pub status: Option<i32>,
    pub output: Vec<u8>,
    /// Killed once the `stop_after` marker appeared (it would not have exited by itself).
    pub stopped: bool,
}

/// Runs `cmd`, watching stdout for `markers`; kills it after `limit`.
pub fn time_process(cmd: Command, markers: &[&[u8]], limit: Duration) -> Result<Timing> {
    time_process_until(cmd, markers, limit, None)
}

/// As [`time_process`], and kills the process as soon as marker `stop_after` appears (for
/// a VMM that does not exit when its guest powers off).
pub fn time_process_until(
    mut cmd: Command,
    markers: &[&[u8]],
    limit: Duration,
    stop_after: Option<usize>,
) -> Result<Timing> {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the command")?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    // A process that hangs without printing would block the read below forever: a watchdog
    // kills it at the limit, which ends the read.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let finished = finished.clone();
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || {
            while start.elapsed() < limit {
                if finished.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !finished.load(std::sync::atomic::Ordering::Acquire) {
                // SAFETY: kill only sends a signal. The child is reaped only just before
                // `finished` is set, and a pid is not reused within those microseconds.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })
    };
    let mut seen = vec![None; markers.len()];
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    let mut stopped = false;
    loop {
        let n = stdout
            .read(&mut buf)
            .context("reading the command's output")?;
        if n == 0 {
            break;
        }
        let at = start.elapsed();
        output.extend_from_slice(&buf[..n]);
        for (i, m) in markers.iter().enumerate() {
            if seen[i].is_none() && output.windows(m.len()).any(|w| w == *m) {
                seen[i] = Some(at);
            }
        }
        if stop_after.is_some_and(|i| seen.get(i).is_some_and(Option::is_some)) {
            let _ = child.kill();
            stopped = true;
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
    }
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let exited = start.elapsed();
    finished.store(true, std::sync::atomic::Ordering::Release);
    let _ = watchdog.join();
    Ok(Timing {
        markers: seen,
        exited,
        status: status.code(),
        output,
        stopped,
    })
}

/// The nearest-rank `p`th percentile (0–100) of sorted values; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Resident memory of a process: in total, and in its largest mapping (guest RAM).
#[derive(Debug, Clone, Copy)]
pub struct Residency {
    pub total_kib: u64,
    pub guest_ram_kib: u64,
    /// Private (not shared with other processes) memory outside guest RAM: what each
    /// additional VM really costs the host.
    pub private_overhead_kib: u64,
}

impl Residency {
    pub fn overhead_kib(&self) -> u64 {
        self.total_kib.saturating_sub(self.guest_ram_kib)
    }
}

/// Parses /proc/PID/smaps; guest RAM is the one mapping of exactly `guest_bytes`.
pub fn parse_smaps(smaps: &str, guest_bytes: u64) -> Result<Residency> {
    let mut total = 0;
    let mut guest = None;
    let mut private = 0;
    let mut current_size = 0u64;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(key) = fields.next() else { continue };
        if key.contains('-') && !key.ends_with(':') {
            let (a, b) = key.split_once('-').context("mapping range")?;
            current_size = u64::from_str_radix(b, 16)? - u64::from_str_radix(a, 16)?;
            continue;
        }
        if key == "Rss:" {
            let kib: u64 = fields.next().context("Rss value")?.parse()?;
            total += kib;
            if current_size == guest_bytes && guest.is_none() {
                guest = Some(kib);
            }
        }
        if (key == "Private_Clean:" || key == "Private_Dirty:") && current_size != guest_bytes {
            private += fields.next().context("Private value")?.parse::<u64>()?;
        }
    }
    match guest {
        Some(guest_ram_kib) => Ok(Residency {
            total_kib: total,
            guest_ram_kib,
            private_overhead_kib: private,
        }),
        None => bail!("no mapping of {guest_bytes} bytes (guest RAM) in smaps"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn smaps_overhead_excludes_the_guest_ram_mapping() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1 /usr/bin/vmm
Size:               1024 kB
Rss:                 800 kB
Private_Clean:         8 kB
Private_Dirty:         0 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                 640 kB
Private_Dirty:       640 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  16 kB
Private_Dirty:        16 kB
";
        let r = parse_smaps(smaps, 128 << 20).unwrap();
        assert_eq!(r.total_kib, 1456);
        assert_eq!(r.guest_ram_kib, 640);
        assert_eq!(r.overhead_kib(), 816);
        assert_eq!(r.private_overhead_kib, 24);
        assert!(parse_smaps(smaps, 64 << 20).is_err());
    }

    #[test]
    fn markers_are_timed_in_order_and_exit_status_kept() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "printf first; sleep 0.05; printf second; exit 3"]);
        let t = time_process(
            cmd,
            &[b"first", b"second", b"never"],
            Duration::from_secs(10),
        )
        .unwrap();
        let first = t.markers[0].unwrap();
        let second = t.markers[1].unwrap();
        assert!(first < second);
        assert!(t.markers[2].is_none());
        assert!(t.exited >= second);
        assert_eq!(t.status, Some(3));
    }
}
