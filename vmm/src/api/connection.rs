//! The API socket's connections: accepted one by one and served with HTTP/1.1, each with
//! the descriptors its client passed (`SCM_RIGHTS`, e.g. the TAP of a hot-plugged NIC), a
//! deadline for sending the request head, and a cap on how many may be open at once, so
//! idle clients cannot pin the VMM's descriptors.

use std::future::Future;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// A client must send its whole request head within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors one connection may pass; more are closed on arrival.
const MAX_PASSED_FDS: usize = 4;

/// Descriptors a connection's client passed, for its requests to take.
#[derive(Clone, Default)]
pub struct PassedFds(Arc<Mutex<Vec<OwnedFd>>>);

impl PassedFds {
    /// The oldest descriptor passed and not yet taken.
    pub fn take(&self) -> Option<OwnedFd> {
        let mut fds = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (!fds.is_empty()).then(|| fds.remove(0))
    }

    /// Closes what the last request did not take.
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn keep(&self, received: Vec<OwnedFd>) {
        let mut fds = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for fd in received {
            if fds.len() < MAX_PASSED_FDS {
                fds.push(fd);
            } else {
                tracing::warn!(
                    "API client passed more than {MAX_PASSED_FDS} descriptors; closing the rest"
                );
            }
        }
    }
}

/// A Unix stream whose reads also collect passed descriptors.
pub struct FdStream {
    inner: UnixStream,
    fds: PassedFds,
}

/// `recvmsg` into `buf`, keeping any `SCM_RIGHTS` descriptors that came with the bytes.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // Room for MAX_PASSED_FDS descriptors; u64 storage keeps the cmsghdr aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `fd` is an open socket; msg describes buffers valid for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors now owned by this
    // process (read unaligned, as the payload need not be aligned for i32).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    received.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        tracing::warn!("API client passed more descriptors than fit; the rest were closed");
    }
    Ok((n as usize, received))
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || recv_with_fds(fd, unfilled))
            {
                Ok((n, fds)) => {
                    this.fds.keep(fds);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in progress
/// finish (idle connections are closed).
pub async fn serve(listener: UnixListener, app: Router, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("cannot accept an API connection: {e}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let fds = PassedFds::default();
        let leftovers = fds.clone();
        let service = TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(fds.clone()))
                // A descriptor its request did not take goes with the answer: the
                // connection's next request must not find it.
                .layer(axum::middleware::map_response(
                    move |response: axum::response::Response| {
                        leftovers.clear();
                        std::future::ready(response)
                    },
                )),
        );
        let io = TokioIo::new(FdStream { inner: stream, fds });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("API connection ended: {e}");
            }
            drop(permit);
        });
    }
    graceful.shutdown().await;
}
