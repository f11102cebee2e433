//! Listening sockets as the master hands them over: TCP or unix, already bound and listening.

use std::io;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A bound, listening socket, as the master creates it (blocking, std types).
#[derive(Debug)]
pub enum BoundSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl BoundSocket {
    pub fn try_clone(&self) -> io::Result<BoundSocket> {
        Ok(match self {
            BoundSocket::Tcp(l) => BoundSocket::Tcp(l.try_clone()?),
            BoundSocket::Unix(l) => BoundSocket::Unix(l.try_clone()?),
        })
    }

    /// Register with the worker's runtime. Must be called inside it.
    pub fn into_listener(self) -> io::Result<Listener> {
        Ok(match self {
            BoundSocket::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            BoundSocket::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?)
            }
        })
    }
}

impl std::os::fd::AsRawFd for BoundSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            BoundSocket::Tcp(l) => l.as_raw_fd(),
            BoundSocket::Unix(l) => l.as_raw_fd(),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// The next connection and the client's address as the access log shows it.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, peer)| (Stream::Tcp(s), peer.ip().to_string())),
            Listener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| (Stream::Unix(s), "unix".to_string())),
        }
    }
}
