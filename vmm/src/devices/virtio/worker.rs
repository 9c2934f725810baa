//! What every virtio device thread shares: the epoll loop (EINTR retried, the kill event
//! ending it) and the rate limiter's throttle timer. A device only says what its own
//! events mean (`WorkerHandler`); starting and ending its threads on demand (activation,
//! reset, hot-unplug) is then the same for every device.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::rate_limiter::RateLimiter;

/// Token of the kill event; device tokens must differ from it.
pub const KILL_TOKEN: u64 = u64::MAX;

/// The epoll set a worker sleeps in, for handlers that watch a descriptor only part of the
/// time (a TAP while the guest has no RX buffers).
pub struct WorkerEpoll(Epoll);

impl WorkerEpoll {
    /// An epoll set watching nothing yet, for tests that drive a handler directly.
    #[cfg(test)]
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(WorkerEpoll(Epoll::new()?))
    }

    pub fn set_watched(&self, fd: RawFd, token: u64, watched: bool) {
        let set = if watched {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        if let Err(e) = self
            .0
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, token))
        {
            tracing::warn!("cannot change what a device worker watches: {e}");
        }
    }

    /// Stops watching `fd` for good: epoll reports an error on a descriptor even when it
    /// is watched for nothing, so a failed one would wake the worker in a loop.
    pub fn forget(&self, fd: RawFd) {
        if let Err(e) = self
            .0
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            tracing::warn!("cannot change what a device worker watches: {e}");
        }
    }
}

/// How long a worker keeps looking for new work (a disk's completions and requests, a
/// NIC's frames and returned buffers) before it goes to sleep in epoll. The guest's next
/// request or frame usually comes within tens of microseconds; catching it here saves the
/// thread a sleep and a wake-up, and the guest a kick, which is most of a small request's
/// cost. (QEMU's event loop polls the same way.) The window adapts, as QEMU's does: it
/// halves after a poll that found nothing (down to zero, no polling) and doubles when the
/// worker is woken soon after going to sleep.
pub const POLL_WINDOW: Duration = Duration::from_micros(50);
const POLL_WINDOW_MIN: Duration = Duration::from_micros(4);
/// Longest stretch spent polling without passing through epoll, so the kill, throttle and
/// limit events are never starved by a busy queue.
const POLL_MAX: Duration = Duration::from_micros(500);

/// A worker's adaptive polling window (see POLL_WINDOW). `Default` is off.
#[derive(Debug, Default)]
pub struct Polling {
    window: Duration,
    /// False on a single-CPU host, where spinning only takes time from the vCPUs, and
    /// where the work needs the CPU itself (librbd's own threads).
    allowed: bool,
}

impl Polling {
    /// Made before the worker's thread is confined: the CPU count is read from files the
    /// confined thread may not open.
    pub fn new(allowed: bool) -> Self {
        let spare_cpu = || std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
        Polling {
            window: Duration::ZERO,
            allowed: allowed && spare_cpu(),
        }
    }

    pub fn allowed(&self) -> bool {
        self.allowed
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The worker was woken after sleeping `slept`: within one full window, polling would
    /// have caught what woke it.
    pub fn woken_after(&mut self, slept: Duration) {
        if self.allowed && slept < POLL_WINDOW {
            self.window = (self.window * 2).clamp(POLL_WINDOW_MIN, POLL_WINDOW);
        }
    }

    /// Calls `step` (which says whether it found work) until a whole window passes
    /// without work, or POLL_MAX; a poll that found nothing halves the window.
    pub fn spin(&mut self, mut step: impl FnMut() -> bool) {
        if self.window.is_zero() {
            return;
        }
        let start = Instant::now();
        let mut deadline = start + self.window;
        let mut paid = false;
        loop {
            let progressed = step();
            let now = Instant::now();
            if progressed {
                deadline = now + self.window;
                paid = true;
            }
            if now >= deadline || now - start >= POLL_MAX {
                if !paid {
                    self.window /= 2;
                    if self.window < POLL_WINDOW_MIN {
                        self.window = Duration::ZERO;
                    }
                }
                return;
            }
            std::hint::spin_loop();
        }
    }
}

/// A device thread's reactions to its events.
pub trait WorkerHandler {
    /// Handles the event of `token`.
    fn handle(&mut self, token: u64, epoll: &WorkerEpoll);
    /// After each batch of events; `slept` is how long the thread waited for it.
    fn after_events(&mut self, _slept: Duration, _epoll: &WorkerEpoll) {}
    /// The kill event fired: last work before the thread ends.
    fn stopping(&mut self) {}
}

/// Makes the calling worker thread's wake-ups wait for the thread running on its CPU.
///
/// Where every CPU is busy (an overcommitted host, a one-CPU nested host), a normal worker
/// woken by the guest's kick preempts the vCPU thread at once and serves that one request
/// or frame before the guest may queue the next: the guest hands its work over one kick at
/// a time, takes an interrupt per completion, each a VM exit, and never idles long enough
/// to stop its timer tick (measured in a one-CPU L1 with fio at QD32 on an iSCSI disk: the
/// worker took one request per wake-up and had at most one in flight; QEMU's guest, whose
/// event loop did not preempt it, queued seven per kick). Under `SCHED_BATCH` a thread
/// keeps the same CPU share as any normal one but does not preempt on wake-up: the worker
/// runs when the vCPU waits or at the scheduler's next tick and finds the guest's requests
/// and the backend's completions in batches. Where a CPU is idle the worker wakes there and
/// nothing changes.
pub fn batch_wakeups(name: &str) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the
    // call, and priority 0 is the only one SCHED_BATCH takes.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::debug!(
            "{name} worker keeps preempting on wake-up: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sleeps on `fds` (each with its token) and the `kill` eventfd, handing every event to
/// `handler`, until `kill` fires. `name` is for the log.
pub fn run_worker(name: &str, kill: RawFd, fds: &[(RawFd, u64)], handler: &mut impl WorkerHandler) {
    batch_wakeups(name);
    let epoll = match register(kill, fds) {
        Ok(e) => WorkerEpoll(e),
        Err(e) => {
            tracing::error!("{name} worker cannot set up epoll: {e}");
            return;
        }
    };
    let mut events = vec![EpollEvent::default(); fds.len() + 1];
    loop {
        let slept_at = Instant::now();
        let n = match epoll.0.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("{name} worker epoll failed: {e}");
                return;
            }
        };
        let slept = slept_at.elapsed();
        for event in &events[..n] {
            if event.data() == KILL_TOKEN {
                handler.stopping();
                return;
            }
            handler.handle(event.data(), &epoll);
        }
        handler.after_events(slept, &epoll);
    }
}

fn register(kill: RawFd, fds: &[(RawFd, u64)]) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for &(fd, token) in fds.iter().chain([(kill, KILL_TOKEN)].iter()) {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

/// A worker's side of rate limiting: the timer that ends a throttled stretch, the event
/// its limiters raise when the API changes their limits, and the time spent throttled.
pub struct Throttle {
    /// Non-blocking: a handler earlier in the same epoll batch may re-arm it after it was
    /// reported ready, and a blocking read would then stall the worker (its kill event
    /// included) until the new deadline.
    timer: TimerFd,
    limit_changed: Arc<EventFd>,
    since: Option<Instant>,
    /// When the armed timer fires: a later, longer hold (the other direction of a NIC)
    /// does not push back an earlier one.
    due: Option<Instant>,
}

impl Throttle {
    /// Fails only when the host is out of eventfds or timerfds.
    pub fn new<'a>(limiters: impl IntoIterator<Item = &'a RateLimiter>) -> std::io::Result<Self> {
        let limit_changed = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        for limiter in limiters {
            limiter.watch(&limit_changed);
        }
        let timer = TimerFd::new()?;
        // SAFETY: F_GETFL/F_SETFL on a descriptor `timer` owns; no pointers.
        let set = unsafe {
            let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
            flags >= 0
                && libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !set {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Throttle {
            timer,
            limit_changed,
            since: None,
            due: None,
        })
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    pub fn limit_changed_fd(&self) -> RawFd {
        self.limit_changed.as_raw_fd()
    }

    /// The timer, for callers that drive a worker by hand.
    pub fn timer(&mut self) -> &mut TimerFd {
        &mut self.timer
    }

    /// Holds the worker back for `wait`, or less if the timer already fires sooner.
    pub fn hold(&mut self, wait: Duration, device: &str) {
        let now = Instant::now();
        self.since.get_or_insert(now);
        let due = now + wait;
        if self.due.is_some_and(|armed| armed <= due) {
            return;
        }
        match self.timer.reset(wait, None) {
            Ok(()) => self.due = Some(due),
            Err(e) => tracing::error!("{device}: cannot arm the throttle timer: {e}"),
        }
    }

    /// The limits changed (API). A held worker does not wait for the deadline the old
    /// limits gave it: the timer fires now, and its handler, the only way out of the
    /// throttled state, retries under the new limits. Returns whether a change was pending.
    pub fn limits_changed(&mut self, held: bool, device: &str) -> bool {
        if self.limit_changed.read().is_err() {
            return false;
        }
        // A zero duration would disarm the timer rather than fire it.
        if held {
            match self.timer.reset(Duration::from_nanos(1), None) {
                Ok(()) => self.due = Some(Instant::now()),
                Err(e) => tracing::error!("{device}: cannot re-arm the throttle timer: {e}"),
            }
        }
        true
    }

    /// The timer was reported ready: how long the worker was held back, or None when it
    /// was re-armed since and has not fired yet (the hold goes on).
    pub fn released(&mut self) -> Option<Duration> {
        if let Err(e) = self.timer.wait() {
            if e.errno() == libc::EAGAIN {
                return None;
            }
            tracing::error!("throttle timer: {e}");
        }
        self.due = None;
        Some(self.since.take().map_or(Duration::ZERO, |s| s.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports the policy its thread runs under when its event fires.
    struct PolicyProbe(std::sync::mpsc::Sender<Option<i32>>);

    impl WorkerHandler for PolicyProbe {
        fn handle(&mut self, _token: u64, _epoll: &WorkerEpoll) {
            // SAFETY: queries the calling thread's policy; no pointers involved.
            let policy = unsafe { libc::sched_getscheduler(0) };
            let _ = self.0.send((policy >= 0).then_some(policy));
        }
    }

    fn fires_within(timer: &TimerFd, timeout: Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: timer.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, which poll only writes `revents` of.
        unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) == 1 }
    }

    /// A NIC's two directions share the timer: RX held for a moment and then TX for ten
    /// seconds still wakes the worker for RX in a moment (it waited for TX's deadline).
    #[test]
    fn a_later_longer_hold_does_not_push_back_an_earlier_one() {
        let mut throttle = Throttle::new([]).unwrap();
        throttle.hold(Duration::from_millis(2), "test");
        throttle.hold(Duration::from_secs(10), "test");
        assert!(fires_within(throttle.timer(), Duration::from_secs(5)));
        assert!(throttle.released().is_some());
        // Released: the next hold arms the timer again.
        throttle.hold(Duration::from_millis(2), "test");
        assert!(fires_within(throttle.timer(), Duration::from_secs(5)));
    }

    /// A timer re-armed after epoll reported it ready (by a handler earlier in the same
    /// batch) must not block the worker until the new deadline: it is not released yet.
    #[test]
    fn a_timer_that_has_not_fired_is_not_waited_for() {
        let mut throttle = Throttle::new([]).unwrap();
        throttle.hold(Duration::from_secs(10), "test");
        assert_eq!(throttle.released(), None, "the hold goes on");
        assert!(throttle.timer().is_armed().unwrap());
    }

    #[test]
    fn workers_do_not_preempt_on_wakeup() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        event.write(1).unwrap();
        let (fd, kill_fd) = (event.as_raw_fd(), kill.as_raw_fd());
        let (policy_tx, policy_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            run_worker("test", kill_fd, &[(fd, 0)], &mut PolicyProbe(policy_tx));
        });
        let policy = policy_rx.recv_timeout(Duration::from_secs(10));
        kill.write(1).unwrap();
        worker.join().unwrap();
        assert_eq!(policy, Ok(Some(libc::SCHED_BATCH)));
    }
}
