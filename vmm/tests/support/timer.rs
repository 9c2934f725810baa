//! The throttle timer, for tests that drive a worker by hand.

use std::os::unix::io::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

/// Waits (at most ten seconds) until the timer has fired, as the worker's epoll would
/// before it lets the worker go on.
pub fn wait_until_fired(timer: &TimerFd) {
    let mut fd = libc::pollfd {
        fd: timer.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, which poll only writes `revents` of.
    let ready = unsafe { libc::poll(&mut fd, 1, 10_000) };
    assert_eq!(ready, 1, "the throttle timer never fired");
}
