//! Listening sockets as the master hands them over (TCP or unix, bound and listening), and
//! accepting on them in a way that spreads connections over the workers.

use std::io;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A bound, listening socket, as the master creates it (blocking, std types).
#[derive(Debug)]
pub enum ListenSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl ListenSocket {
    pub fn try_clone(&self) -> io::Result<ListenSocket> {
        Ok(match self {
            ListenSocket::Tcp(l) => ListenSocket::Tcp(l.try_clone()?),
            ListenSocket::Unix(l) => ListenSocket::Unix(l.try_clone()?),
        })
    }

    /// Register with the worker's runtime. Must be called inside it.
    pub fn into_listener(self) -> io::Result<Listener> {
        // SAFETY (both arms): the std listener owns its fd and is moved into the AsyncFd, so the
        // fd stays open, refers to the same socket and is what `as_raw_fd` returns for as long
        // as the AsyncFd lives — the contract of `AsyncFd::register_with_interest`.
        Ok(match self {
            ListenSocket::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(
                    unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                        .map_err(io::Error::from)?,
                )
            }
            ListenSocket::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(
                    unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                        .map_err(io::Error::from)?,
                )
            }
        })
    }
}

impl std::os::fd::AsRawFd for ListenSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            ListenSocket::Tcp(l) => l.as_raw_fd(),
            ListenSocket::Unix(l) => l.as_raw_fd(),
        }
    }
}

pub enum Listener {
    Tcp(AsyncFd<std::net::TcpListener>),
    Unix(AsyncFd<std::os::unix::net::UnixListener>),
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// How long a worker lets a less busy worker take a waiting connection before it takes it
/// itself (a less busy worker that is hung must not stall new clients).
const MAX_DEFERRAL: Duration = Duration::from_millis(20);
const DEFERRAL_STEP: Duration = Duration::from_millis(1);

impl Listener {
    /// The next connection and the client's address as the access log shows it.
    ///
    /// Every worker waits on the same socket, and the kernel wakes them all; without care the
    /// first to wake takes every connection of a burst, and keep-alive clients then stay on
    /// it. So a worker with more open connections than another ready worker steps back for
    /// up to `MAX_DEFERRAL`, leaving the connection to the less busy one (`busier` says
    /// whether this worker should).
    pub async fn accept(&self, busier: &(dyn Fn() -> bool + Sync)) -> io::Result<(Stream, String)> {
        let mut deferred = Duration::ZERO;
        loop {
            let waited = match self {
                Listener::Tcp(fd) => fd.readable().await.map(|g| (Some(g), None)),
                Listener::Unix(fd) => fd.readable().await.map(|g| (None, Some(g))),
            }?;
            if deferred < MAX_DEFERRAL && busier() {
                // Readiness is kept (the guard goes out of use without `clear_ready`): if the
                // other worker does not take the connection, the next turn sees it again.
                tokio::time::sleep(DEFERRAL_STEP).await;
                deferred += DEFERRAL_STEP;
                continue;
            }
            let accepted = match waited {
                (Some(mut g), _) => g.try_io(|l| {
                    let (s, peer) = l.get_ref().accept()?;
                    s.set_nonblocking(true)?;
                    Ok((Stream::Tcp(TcpStream::from_std(s)?), peer.ip().to_string()))
                }),
                (_, Some(mut g)) => g.try_io(|l| {
                    let (s, _) = l.get_ref().accept()?;
                    s.set_nonblocking(true)?;
                    Ok((Stream::Unix(UnixStream::from_std(s)?), "unix".to_string()))
                }),
                (None, None) => unreachable!("one of the two guards is set"),
            };
            match accepted {
                Ok(result) => return result,
                // Another worker took it first: wait for the next one.
                Err(_would_block) => deferred = Duration::ZERO,
            }
        }
    }
}
