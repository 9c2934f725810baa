//! MC146818-compatible CMOS real-time clock and NVRAM at ports 0x70 (index) / 0x71 (data).
//!
//! Without it Linux's `rtc_cmos` probe reads 0xff everywhere, sees the update-in-progress
//! bit stuck and spends seconds polling before giving up, and the guest starts with no wall
//! clock. The clock is the host's UTC plus an offset the guest sets by writing the time
//! registers; it is never stored, so it advances with the host's clock. The update cycle is
//! modelled as the chip's 244 µs warning window before each second, so a reader that
//! waits for UIP to clear waits at most that long. Update-ended, alarm and periodic
//! interrupts go out on IRQ 8 from a timer thread that sleeps while none is enabled.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::IrqTrigger;
use crate::bus::BusDevice;
use chrono::{DateTime, Datelike, NaiveDate, Timelike};

pub const INDEX_PORT: u16 = 0x70;
pub const PORTS: u64 = 2;
/// ISA IRQ of the RTC.
pub const IRQ: u32 = 8;
/// NVRAM index of the century byte (named in the FADT).
pub const CENTURY: u8 = 0x32;

const SECONDS: u8 = 0x00;
const SECONDS_ALARM: u8 = 0x01;
const MINUTES: u8 = 0x02;
const MINUTES_ALARM: u8 = 0x03;
const HOURS: u8 = 0x04;
const HOURS_ALARM: u8 = 0x05;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;

/// The registers that show the running clock.
const TIME_REGISTERS: [u8; 8] = [
    SECONDS,
    MINUTES,
    HOURS,
    DAY_OF_WEEK,
    DAY_OF_MONTH,
    MONTH,
    YEAR,
    CENTURY,
];

const A_UIP: u8 = 0x80;
const A_RATE_MASK: u8 = 0x0f;
/// 32.768 kHz time base, oscillator running (what firmware programs).
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;
/// An alarm register at or above this value matches every value ("don't care").
const ALARM_ANY: u8 = 0xc0;
const HOUR_PM: u8 = 0x80;

/// How long before each second UIP is set (the chip's t_BUC).
const UIP_WINDOW: Duration = Duration::from_micros(244);

/// The host's wall clock, replaceable in tests.
pub trait WallClock: Send + Sync {
    /// Time since the Unix epoch.
    fn now(&self) -> Duration;
}

pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// Guest RAM sizes as firmware reports them in NVRAM.
#[derive(Clone, Copy, Debug)]
pub struct MemorySizes {
    /// RAM below the 32-bit PCI hole, from address 0.
    pub below_4g: u64,
    /// RAM from 4 GiB up.
    pub above_4g: u64,
}

struct State {
    index: u8,
    nvram: [u8; 128],
    /// Guest time minus host time, in nanoseconds.
    offset_ns: i128,
    /// The guest second whose update-ended flag was last reported (read of register C).
    reported_second: i64,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    clock: Box<dyn WallClock>,
    irq: Box<dyn IrqTrigger>,
}

pub struct Cmos {
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
}

impl Cmos {
    pub fn new(
        memory: MemorySizes,
        irq: Box<dyn IrqTrigger>,
        clock: Box<dyn WallClock>,
    ) -> std::io::Result<Cmos> {
        let mut nvram = [0u8; 128];
        nvram[STATUS_A as usize] = A_DEFAULT;
        nvram[STATUS_B as usize] = B_24H;
        nvram[STATUS_D as usize] = D_VRT;
        write_memory_sizes(&mut nvram, memory);
        let now = clock.now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: 0,
                nvram,
                offset_ns: 0,
                reported_second: now.as_secs() as i64,
                shutdown: false,
            }),
            changed: Condvar::new(),
            clock,
            irq,
        });
        let thread_shared = shared.clone();
        let timer = std::thread::Builder::new()
            .name("rtc".into())
            .spawn(move || {
                crate::seccomp::confine_or_abort(crate::seccomp::ThreadKind::Clock);
                timer_loop(&thread_shared)
            })?;
        Ok(Cmos {
            shared,
            timer: Some(timer),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_register(&self, state: &mut State) -> u8 {
        let index = state.index;
        let now = self.shared.clock.now();
        let guest_ns = guest_ns(state, now);
        let b = state.nvram[STATUS_B as usize];
        match index {
            reg if TIME_REGISTERS.contains(&reg) && b & B_SET == 0 => {
                time_register(index, guest_ns, b)
            }
            STATUS_A => {
                let mut a = state.nvram[STATUS_A as usize] & !A_UIP;
                let into_second = guest_ns.rem_euclid(1_000_000_000) as u64;
                if b & B_SET == 0 && Duration::from_nanos(1_000_000_000 - into_second) <= UIP_WINDOW
                {
                    a |= A_UIP;
                }
                a
            }
            STATUS_C => {
                // Reading C reports and clears every flag. The update-ended flag is raised
                // for each second boundary passed since the last read, whether or not its
                // interrupt is enabled (drivers may poll for it).
                let second = guest_ns.div_euclid(1_000_000_000) as i64;
                let mut c = state.nvram[STATUS_C as usize];
                if b & B_SET == 0 && second != state.reported_second {
                    c |= C_UF;
                }
                state.reported_second = second;
                state.nvram[STATUS_C as usize] = 0;
                if c & b & (C_PF | C_AF | C_UF) != 0 {
                    c |= C_IRQF;
                }
                c
            }
            STATUS_D => D_VRT,
            _ => state.nvram[index as usize],
        }
    }

    fn write_register(&self, state: &mut State, value: u8) {
        let index = state.index;
        match index {
            STATUS_A => {
                state.nvram[STATUS_A as usize] = value & !A_UIP;
                self.shared.changed.notify_all();
            }
            STATUS_B => {
                let old = state.nvram[STATUS_B as usize];
                let now = self.shared.clock.now();
                if value & B_SET != 0 && old & B_SET == 0 {
                    // Freeze: the time registers now hold the current time in the old
                    // format, for the guest to overwrite.
                    let guest = guest_ns(state, now);
                    snapshot_time(&mut state.nvram, guest, old);
                }
                // Binary/BCD and 12/24-hour changes take effect as written; the time
                // registers are read in the format in force when SET is cleared.
                state.nvram[STATUS_B as usize] = value;
                if value & B_SET == 0 && old & B_SET != 0 {
                    if let Some(secs) = frozen_time(&state.nvram, value) {
                        // The new second starts now, as on the chip.
                        state.offset_ns = i128::from(secs) * 1_000_000_000 - now.as_nanos() as i128;
                        state.reported_second = secs;
                    } else {
                        tracing::debug!("guest set an invalid RTC date; clock unchanged");
                    }
                }
                self.shared.changed.notify_all();
            }
            STATUS_C | STATUS_D => {}
            reg if TIME_REGISTERS.contains(&reg) && state.nvram[STATUS_B as usize] & B_SET == 0 => {
                // The chip takes writes to running time registers as an immediate set of
                // that field; Linux always sets SET first, so keep it simple and exact:
                // apply the one field to the current time.
                let b = state.nvram[STATUS_B as usize];
                let now = self.shared.clock.now();
                let guest = guest_ns(state, now);
                let mut regs = state.nvram;
                snapshot_time(&mut regs, guest, b);
                regs[index as usize] = value;
                if let Some(secs) = frozen_time(&regs, b) {
                    let into_second = guest.rem_euclid(1_000_000_000);
                    state.offset_ns =
                        i128::from(secs) * 1_000_000_000 + into_second - now.as_nanos() as i128;
                }
            }
            SECONDS_ALARM | MINUTES_ALARM | HOURS_ALARM => {
                state.nvram[index as usize] = value;
                self.shared.changed.notify_all();
            }
            _ => state.nvram[index as usize] = value,
        }
    }
}

impl Drop for Cmos {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        let mut state = self.lock();
        data[0] = match offset {
            0 => state.index,
            _ => self.read_register(&mut state),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        let mut state = self.lock();
        match offset {
            // Bit 7 of the index port masks NMIs on a PC; there are none to mask here.
            0 => state.index = value & 0x7f,
            _ => self.write_register(&mut state, *value),
        }
    }
}

fn write_memory_sizes(nvram: &mut [u8; 128], memory: MemorySizes) {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    // Base memory in KiB (below the EBDA), extended memory above 1 MiB in KiB (capped at
    // 63 MiB as the 16-bit field can hold), memory above 16 MiB in 64 KiB units, and
    // memory above 4 GiB in 64 KiB units (three bytes).
    let put16 = |nvram: &mut [u8; 128], at: usize, v: u64| {
        let v = v.min(0xffff) as u16;
        nvram[at..at + 2].copy_from_slice(&v.to_le_bytes());
    };
    put16(nvram, 0x15, 640);
    let extended = memory.below_4g.saturating_sub(MIB) / KIB;
    put16(nvram, 0x17, extended);
    put16(nvram, 0x30, extended);
    put16(
        nvram,
        0x34,
        memory.below_4g.saturating_sub(16 * MIB) / (64 * KIB),
    );
    let high = (memory.above_4g / (64 * KIB)).min(0xff_ffff) as u32;
    nvram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
}

fn guest_ns(state: &State, now: Duration) -> i128 {
    now.as_nanos() as i128 + state.offset_ns
}

/// Writes the clock at `guest_ns` into the time registers of `nvram`, in the format of `b`.
fn snapshot_time(nvram: &mut [u8; 128], guest_ns: i128, b: u8) {
    for reg in TIME_REGISTERS {
        nvram[reg as usize] = time_register(reg, guest_ns, b);
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0x0f);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

/// Register `reg` of the running clock at guest time `guest_ns`, in the format of `b`.
fn time_register(reg: u8, guest_ns: i128, b: u8) -> u8 {
    let secs = guest_ns.div_euclid(1_000_000_000) as i64;
    let Some(t) = DateTime::from_timestamp(secs, 0) else {
        return 0;
    };
    let encode = |v: u32| {
        let v = v as u8;
        if b & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    };
    match reg {
        SECONDS => encode(t.second()),
        MINUTES => encode(t.minute()),
        HOURS => encode_hour(t.hour() as u8, b),
        DAY_OF_WEEK => encode(t.weekday().number_from_sunday()),
        DAY_OF_MONTH => encode(t.day()),
        MONTH => encode(t.month()),
        YEAR => encode(t.year().rem_euclid(100) as u32),
        CENTURY => encode(t.year().div_euclid(100).clamp(0, 99) as u32),
        _ => 0,
    }
}

fn encode_hour(hour: u8, b: u8) -> u8 {
    let encode = |v: u8| if b & B_BINARY != 0 { v } else { to_bcd(v) };
    if b & B_24H != 0 {
        return encode(hour);
    }
    let pm = if hour >= 12 { HOUR_PM } else { 0 };
    let h12 = match hour % 12 {
        0 => 12,
        h => h,
    };
    encode(h12) | pm
}

fn decode_hour(v: u8, b: u8) -> Option<u8> {
    let decode = |v: u8| {
        if b & B_BINARY != 0 {
            Some(v)
        } else {
            from_bcd(v)
        }
    };
    if b & B_24H != 0 {
        return decode(v).filter(|h| *h < 24);
    }
    let h12 = decode(v & !HOUR_PM).filter(|h| (1..=12).contains(h))?;
    Some(h12 % 12 + if v & HOUR_PM != 0 { 12 } else { 0 })
}

/// The time the frozen registers hold, in seconds since the epoch, or None if the guest
/// wrote a date that does not exist.
fn frozen_time(nvram: &[u8; 128], b: u8) -> Option<i64> {
    let decode = |reg: u8| {
        let v = nvram[reg as usize];
        if b & B_BINARY != 0 {
            Some(v)
        } else {
            from_bcd(v)
        }
    };
    let century = decode(CENTURY).filter(|c| *c > 0).unwrap_or(20);
    let year = i32::from(century) * 100 + i32::from(decode(YEAR)?);
    let date = NaiveDate::from_ymd_opt(
        year,
        u32::from(decode(MONTH)?),
        u32::from(decode(DAY_OF_MONTH)?),
    )?;
    let time = date.and_hms_opt(
        u32::from(decode_hour(nvram[HOURS as usize], b)?),
        u32::from(decode(MINUTES)?),
        u32::from(decode(SECONDS)?),
    )?;
    Some(time.and_utc().timestamp())
}

/// Whether guest second `secs` matches the alarm registers.
fn alarm_matches(nvram: &[u8; 128], b: u8, secs: i64) -> bool {
    let ns = i128::from(secs) * 1_000_000_000;
    [
        (SECONDS_ALARM, SECONDS),
        (MINUTES_ALARM, MINUTES),
        (HOURS_ALARM, HOURS),
    ]
    .iter()
    .all(|&(alarm, reg)| {
        let want = nvram[alarm as usize];
        want >= ALARM_ANY || want == time_register(reg, ns, b)
    })
}

/// Period of the periodic interrupt for register A's rate bits (None: off).
fn periodic_period(a: u8) -> Option<Duration> {
    let rate = a & A_RATE_MASK;
    let hz = match rate {
        0 => return None,
        // Rates 1 and 2 repeat rates 8 and 9 on the 32.768 kHz time base.
        1 => 256,
        2 => 128,
        r => 32768u32 >> (r - 1),
    };
    Some(Duration::from_nanos(1_000_000_000 / u64::from(hz)))
}

/// Raises the interrupt flags due at guest time `guest`, and the line if an enabled flag
/// was newly raised.
fn timer_loop(shared: &Shared) {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut next_periodic: Option<i128> = None;
    let mut last_second: Option<i64> = None;
    loop {
        if state.shutdown {
            return;
        }
        let b = state.nvram[STATUS_B as usize];
        let a = state.nvram[STATUS_A as usize];
        let guest = guest_ns(&state, shared.clock.now());
        let second = guest.div_euclid(1_000_000_000) as i64;
        let running = b & B_SET == 0;

        let mut raised = 0u8;
        if running && b & (B_UIE | B_AIE) != 0 {
            if let Some(last) = last_second {
                if second > last {
                    raised |= C_UF;
                    if alarm_matches(&state.nvram, b, second) {
                        raised |= C_AF;
                    }
                }
            }
            last_second = Some(second);
        } else {
            last_second = None;
        }
        let period = periodic_period(a).filter(|_| b & B_PIE != 0);
        match (period, next_periodic) {
            (Some(p), Some(due)) if guest >= due => {
                raised |= C_PF;
                let p = p.as_nanos() as i128;
                // Skip ticks missed while the host was busy rather than bursting them.
                next_periodic = Some(guest + p - (guest - due) % p);
            }
            (Some(p), None) => next_periodic = Some(guest + p.as_nanos() as i128),
            (None, _) => next_periodic = None,
            _ => {}
        }
        if raised != 0 {
            let c = state.nvram[STATUS_C as usize];
            let was_signalled = c & C_IRQF != 0;
            let mut new_c = c | raised;
            if new_c & b & (C_PF | C_AF | C_UF) != 0 {
                new_c |= C_IRQF;
            }
            state.nvram[STATUS_C as usize] = new_c;
            if new_c & C_IRQF != 0 && !was_signalled {
                if let Err(e) = shared.irq.trigger() {
                    tracing::warn!("cannot raise the RTC interrupt: {e}");
                }
            }
        }

        // Sleep until the next event the guest asked for; with none enabled, until the
        // guest changes a register.
        let mut wait: Option<i128> = None;
        if running && b & (B_UIE | B_AIE) != 0 {
            wait = Some((i128::from(second) + 1) * 1_000_000_000 - guest);
        }
        if let Some(due) = next_periodic {
            let d = (due - guest).max(0);
            wait = Some(wait.map_or(d, |w| w.min(d)));
        }
        state = match wait {
            Some(ns) => {
                let ns = ns.clamp(0, 1_000_000_000) as u64;
                shared
                    .changed
                    .wait_timeout(state, Duration::from_nanos(ns))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vmm_sys_util::eventfd::EventFd;

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct TestClock(Arc<AtomicU64>);

    impl TestClock {
        fn at(secs: u64, nanos: u64) -> Self {
            TestClock(Arc::new(AtomicU64::new(secs * 1_000_000_000 + nanos)))
        }
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl WallClock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    // 2026-12-01 15:04:05 UTC, a Tuesday.
    const T0: u64 = 1_796_137_445;

    fn mem() -> MemorySizes {
        MemorySizes {
            below_4g: 3 << 30,
            above_4g: 5 << 30,
        }
    }

    fn cmos(clock: &TestClock) -> Cmos {
        Cmos::new(
            mem(),
            Box::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            Box::new(clock.clone()),
        )
        .unwrap()
    }

    fn get(dev: &mut Cmos, reg: u8) -> u8 {
        dev.write(0, &[reg]);
        let mut v = [0u8];
        dev.read(1, &mut v);
        v[0]
    }

    fn set(dev: &mut Cmos, reg: u8, value: u8) {
        dev.write(0, &[reg]);
        dev.write(1, &[value]);
    }

    #[test]
    fn reads_the_host_time_in_bcd_24_hour_by_default() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        assert_eq!(get(&mut dev, SECONDS), 0x05);
        assert_eq!(get(&mut dev, MINUTES), 0x04);
        assert_eq!(get(&mut dev, HOURS), 0x15);
        assert_eq!(get(&mut dev, DAY_OF_WEEK), 3); // Sunday = 1
        assert_eq!(get(&mut dev, DAY_OF_MONTH), 0x01);
        assert_eq!(get(&mut dev, MONTH), 0x12);
        assert_eq!(get(&mut dev, YEAR), 0x26);
        assert_eq!(get(&mut dev, CENTURY), 0x20);
        // Valid RAM and time; no update in progress mid-second.
        assert_eq!(get(&mut dev, STATUS_D), D_VRT);
        assert_eq!(get(&mut dev, STATUS_A) & A_UIP, 0);
        assert_eq!(get(&mut dev, STATUS_A), A_DEFAULT);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        set(&mut dev, STATUS_B, B_BINARY | B_24H);
        assert_eq!(get(&mut dev, HOURS), 15);
        assert_eq!(get(&mut dev, YEAR), 26);
        set(&mut dev, STATUS_B, B_BINARY);
        assert_eq!(get(&mut dev, HOURS), 3 | HOUR_PM);
        set(&mut dev, STATUS_B, 0);
        assert_eq!(get(&mut dev, HOURS), 0x03 | HOUR_PM);
        // Midnight and noon in 12-hour mode.
        assert_eq!(encode_hour(0, 0), 0x12);
        assert_eq!(encode_hour(12, 0), 0x12 | HOUR_PM);
        assert_eq!(decode_hour(0x12, 0), Some(0));
        assert_eq!(decode_hour(0x12 | HOUR_PM, 0), Some(12));
        assert_eq!(decode_hour(0x13, 0), None);
    }

    #[test]
    fn time_advances_with_the_host_clock() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        clock.advance(Duration::from_secs(61));
        assert_eq!(get(&mut dev, SECONDS), 0x06);
        assert_eq!(get(&mut dev, MINUTES), 0x05);
        // Across a year boundary.
        clock.advance(Duration::from_secs(31 * 86400));
        assert_eq!(get(&mut dev, YEAR), 0x27);
        assert_eq!(get(&mut dev, MONTH), 0x01);
    }

    #[test]
    fn update_in_progress_only_in_the_last_244_us_of_a_second() {
        let clock = TestClock::at(T0, 999_700_000);
        let mut dev = cmos(&clock);
        assert_eq!(get(&mut dev, STATUS_A) & A_UIP, 0);
        clock.advance(Duration::from_micros(100)); // 200 µs before the second
        assert_eq!(get(&mut dev, STATUS_A) & A_UIP, A_UIP);
        clock.advance(Duration::from_micros(200)); // past it
        assert_eq!(get(&mut dev, STATUS_A) & A_UIP, 0);
        assert_eq!(get(&mut dev, SECONDS), 0x06);
        // UIP is not writable.
        set(&mut dev, STATUS_A, A_DEFAULT | A_UIP);
        assert_eq!(get(&mut dev, STATUS_A), A_DEFAULT);
    }

    #[test]
    fn the_guest_sets_the_clock_with_set_and_it_keeps_running() {
        let clock = TestClock::at(T0, 500_000_000);
        let mut dev = cmos(&clock);
        set(&mut dev, STATUS_B, B_SET | B_24H);
        // Frozen: reads return the registers, not the advancing clock.
        clock.advance(Duration::from_secs(5));
        assert_eq!(get(&mut dev, SECONDS), 0x05);
        assert_eq!(get(&mut dev, STATUS_A) & A_UIP, 0);
        // 1999-12-31 23:59:58.
        for (reg, v) in [
            (SECONDS, 0x58),
            (MINUTES, 0x59),
            (HOURS, 0x23),
            (DAY_OF_MONTH, 0x31),
            (MONTH, 0x12),
            (YEAR, 0x99),
            (CENTURY, 0x19),
        ] {
            set(&mut dev, reg, v);
        }
        set(&mut dev, STATUS_B, B_24H);
        assert_eq!(get(&mut dev, SECONDS), 0x58);
        clock.advance(Duration::from_secs(3));
        assert_eq!(get(&mut dev, SECONDS), 0x01);
        assert_eq!(get(&mut dev, YEAR), 0x00);
        assert_eq!(get(&mut dev, CENTURY), 0x20);
        assert_eq!(get(&mut dev, MONTH), 0x01);
        assert_eq!(get(&mut dev, DAY_OF_WEEK), 7); // 2000-01-01 was a Saturday
    }

    #[test]
    fn an_impossible_date_leaves_the_clock_alone() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        set(&mut dev, STATUS_B, B_SET | B_24H);
        set(&mut dev, MONTH, 0x13);
        set(&mut dev, STATUS_B, B_24H);
        assert_eq!(get(&mut dev, MONTH), 0x12);
        // In binary mode, a value that is not valid BCD is a valid minute.
        set(&mut dev, STATUS_B, B_24H | B_BINARY);
        set(&mut dev, STATUS_B, B_SET | B_24H | B_BINARY);
        set(&mut dev, MINUTES, 30);
        set(&mut dev, STATUS_B, B_24H | B_BINARY);
        assert_eq!(get(&mut dev, MINUTES), 30);
    }

    #[test]
    fn a_single_running_field_write_changes_only_that_field() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        set(&mut dev, HOURS, 0x07);
        assert_eq!(get(&mut dev, HOURS), 0x07);
        assert_eq!(get(&mut dev, MINUTES), 0x04);
        assert_eq!(get(&mut dev, DAY_OF_MONTH), 0x01);
    }

    #[test]
    fn register_c_reports_update_ended_and_clears_on_read() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        assert_eq!(get(&mut dev, STATUS_C), 0);
        clock.advance(Duration::from_secs(1));
        assert_eq!(get(&mut dev, STATUS_C), C_UF);
        assert_eq!(get(&mut dev, STATUS_C), 0);
        // With UIE on, the flag also sets IRQF.
        set(&mut dev, STATUS_B, B_24H | B_UIE);
        clock.advance(Duration::from_secs(1));
        assert_eq!(get(&mut dev, STATUS_C), C_UF | C_IRQF);
        // C and D are read-only.
        set(&mut dev, STATUS_D, 0);
        assert_eq!(get(&mut dev, STATUS_D), D_VRT);
    }

    #[test]
    fn alarm_registers_are_kept_and_match_with_dont_care() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        set(&mut dev, SECONDS_ALARM, 0x30);
        set(&mut dev, MINUTES_ALARM, ALARM_ANY);
        set(&mut dev, HOURS_ALARM, 0xff);
        assert_eq!(get(&mut dev, SECONDS_ALARM), 0x30);
        let state = dev.lock();
        assert!(alarm_matches(&state.nvram, B_24H, T0 as i64 + 25));
        assert!(!alarm_matches(&state.nvram, B_24H, T0 as i64 + 26));
    }

    #[test]
    fn nvram_holds_guest_bytes_and_memory_sizes() {
        let clock = TestClock::at(T0, 0);
        let mut dev = cmos(&clock);
        set(&mut dev, 0x40, 0xa5);
        assert_eq!(get(&mut dev, 0x40), 0xa5);
        // The NMI-mask bit of the index port is ignored.
        dev.write(0, &[0x80 | 0x40]);
        let mut v = [0u8];
        dev.read(1, &mut v);
        assert_eq!(v[0], 0xa5);
        let word =
            |dev: &mut Cmos, at: u8| u16::from(get(dev, at)) | (u16::from(get(dev, at + 1)) << 8);
        assert_eq!(word(&mut dev, 0x15), 640);
        assert_eq!(word(&mut dev, 0x17), 0xffff);
        // (3 GiB - 16 MiB) / 64 KiB
        assert_eq!(word(&mut dev, 0x34), (3072 - 16) * 16);
        let high = u32::from(get(&mut dev, 0x5b))
            | (u32::from(get(&mut dev, 0x5c)) << 8)
            | (u32::from(get(&mut dev, 0x5d)) << 16);
        assert_eq!(u64::from(high), (5u64 << 30) / (64 << 10));
        // Wrong-sized accesses are ignored.
        let mut two = [0u8; 2];
        dev.read(1, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }

    #[test]
    fn update_interrupts_are_raised_on_irq_8_each_second() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Cmos::new(
            mem(),
            Box::new(irq.try_clone().unwrap()),
            Box::new(SystemClock),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(irq.read().is_err(), "no interrupt while none is enabled");
        set(&mut dev, STATUS_B, B_24H | B_UIE);
        // The line goes up once and stays up (one edge) until the guest reads C.
        std::thread::sleep(Duration::from_millis(2200));
        assert_eq!(irq.read().unwrap(), 1);
        let c = get(&mut dev, STATUS_C);
        assert_eq!(c & (C_IRQF | C_UF), C_IRQF | C_UF);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(irq.read().unwrap(), 1);
        set(&mut dev, STATUS_B, B_24H);
        get(&mut dev, STATUS_C);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(irq.read().is_err());
    }

    #[test]
    fn periodic_interrupts_follow_the_rate_bits() {
        assert_eq!(periodic_period(0), None);
        assert_eq!(periodic_period(0x06), Some(Duration::from_nanos(976_562)));
        assert_eq!(periodic_period(0x0f), Some(Duration::from_millis(500)));
        assert_eq!(periodic_period(0x01), periodic_period(0x08));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = Cmos::new(
            mem(),
            Box::new(irq.try_clone().unwrap()),
            Box::new(SystemClock),
        )
        .unwrap();
        set(&mut dev, STATUS_A, 0x20 | 0x0f); // 2 Hz
        set(&mut dev, STATUS_B, B_24H | B_PIE);
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(get(&mut dev, STATUS_C) & (C_IRQF | C_PF), C_IRQF | C_PF);
    }
}
