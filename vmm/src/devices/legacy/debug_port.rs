//! Boot-progress port 0x80: the guest writes a byte at each milestone and the VMM records
//! it with the time since the VMM process started, for the boot-time benchmark.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;
use crate::log_limit::rate_limited;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Milestone {
    pub code: u8,
    pub since_start: Duration,
}

/// Milestones kept; a guest that floods the port cannot grow VMM memory.
const MAX_MILESTONES: usize = 256;

#[derive(Clone)]
pub struct BootProgress {
    start: Instant,
    milestones: Arc<Mutex<Vec<Milestone>>>,
}

impl BootProgress {
    pub fn new(start: Instant) -> Self {
        BootProgress {
            start,
            milestones: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn record(&self, code: u8) {
        let since_start = self.start.elapsed();
        let mut milestones = self.milestones.lock().expect("milestone lock poisoned");
        if milestones.len() < MAX_MILESTONES {
            milestones.push(Milestone { code, since_start });
        }
        // Linux's own I/O delays write here too (outb_p): a guest may write it at will.
        rate_limited!(
            tracing::Level::INFO,
            code,
            micros = since_start.as_micros() as u64,
            "guest boot milestone"
        );
    }

    pub fn milestones(&self) -> Vec<Milestone> {
        self.milestones
            .lock()
            .expect("milestone lock poisoned")
            .clone()
    }
}

pub struct DebugPort {
    progress: BootProgress,
}

impl DebugPort {
    pub fn new(progress: BootProgress) -> Self {
        DebugPort { progress }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.progress.record(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_recorded_in_order_and_bounded() {
        let progress = BootProgress::new(Instant::now());
        let mut port = DebugPort::new(progress.clone());
        port.write(0, &[0x10]);
        port.write(0, &[0x20]);
        let m = progress.milestones();
        assert_eq!(
            m.iter().map(|m| m.code).collect::<Vec<_>>(),
            vec![0x10, 0x20]
        );
        assert!(m[0].since_start <= m[1].since_start);
        for _ in 0..1000 {
            port.write(0, &[1]);
        }
        assert_eq!(progress.milestones().len(), MAX_MILESTONES);
    }
}
