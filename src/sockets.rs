//! Listening sockets: parse `bind` addresses and bind them, once, in the master. Workers inherit
//! the very same sockets, so a recycled worker never takes queued connections down with it
//! (which per-worker SO_REUSEPORT sockets would).

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use forkserve_worker::listener::ListenSocket;
use socket2::{Domain, Socket, Type};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddress {
    /// `HOST:PORT` as written (resolved at bind time; may give several addresses).
    Tcp(String),
    Unix(PathBuf),
    /// `fd://N`: a listening socket this process was started with.
    Fd(i32),
}

/// gunicorn's port when an address has none.
const DEFAULT_PORT: u16 = 8000;

impl BindAddress {
    /// The forms gunicorn takes, written out: `:8000` is `0.0.0.0:8000`, a host alone listens
    /// on port 8000; `HOST:PORT`, `[V6]:PORT`, `unix:PATH` and `fd://N` stay as they are.
    pub fn normalize(s: &str) -> Result<String, String> {
        let s = s.trim();
        let bare_v6 = s.starts_with('[') && s.ends_with(']');
        let written = if let Some(port) = s.strip_prefix(':') {
            format!("0.0.0.0:{port}")
        } else if s.starts_with("unix:") || s.starts_with("fd://") {
            s.to_string()
        } else if bare_v6 || (!s.contains(':') && !s.is_empty()) {
            // A host alone: gunicorn's port.
            format!("{s}:{DEFAULT_PORT}")
        } else {
            s.to_string()
        };
        BindAddress::parse(&written).map(|_| written)
    }

    pub fn parse(s: &str) -> Result<BindAddress, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(BindAddress::Unix(PathBuf::from(path)));
        }
        if let Some(fd) = s.strip_prefix("fd://") {
            return match fd.parse::<i32>() {
                Ok(n) if n >= 0 => Ok(BindAddress::Fd(n)),
                _ => Err(format!("fd://{fd}: expected a file descriptor number")),
            };
        }
        if s.parse::<SocketAddr>().is_ok() {
            return Ok(BindAddress::Tcp(s.to_string()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(BindAddress::Tcp(s.to_string()))
            }
            Some((_, port)) if port.parse::<u64>().is_ok() => {
                Err(format!("port {port} is out of range (0 to 65535)"))
            }
            _ => Err("expected :PORT, HOST, HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N".into()),
        }
    }
}

impl fmt::Display for BindAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindAddress::Tcp(a) => write!(f, "http://{a}"),
            BindAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            BindAddress::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

/// One `bind` entry, bound: its listening socket, what to call it in logs, and the entry.
/// (The worker gets the `ListenSocket` alone and accepts on it as its async `Listener`.)
pub struct Binding {
    pub socket: ListenSocket,
    pub name: String,
    pub spec: String,
    /// A unix socket's path and the inode of its file when this process took it.
    pub file: Option<(std::path::PathBuf, u64)>,
}

/// The path of a unix listener and the inode of the file there now.
fn socket_file(l: &std::os::unix::net::UnixListener) -> Option<(std::path::PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let path = l.local_addr().ok()?.as_pathname()?.to_path_buf();
    let inode = std::fs::symlink_metadata(&path).ok()?.ino();
    Some((path, inode))
}

impl Binding {
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }

    /// Remove this unix socket's file, if the file at its path is still the one this socket
    /// is bound to (same inode as when it was bound or handed over): a clean exit leaves no
    /// file that refuses connections, and never removes a file another server bound since.
    pub fn remove_socket_file(&self) {
        use std::os::unix::fs::MetadataExt;
        if let Some((path, inode)) = &self.file {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *inode) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Binding> {
        Ok(Binding {
            socket: self.socket.try_clone()?,
            name: self.name.clone(),
            spec: self.spec.clone(),
            file: self.file.clone(),
        })
    }
}

/// Environment variable naming the listening fds a re-exec'd master inherits (USR2), like
/// gunicorn's GUNICORN_FD: "3,4".
pub const INHERITED_FDS_ENV: &str = "FORKSERVE_FDS";

/// Adopt listening sockets passed by the previous master (`FORKSERVE_FDS`). Their addresses
/// come from the sockets themselves.
pub fn inherit(fds: &str) -> io::Result<Vec<Binding>> {
    let mut out = Vec::new();
    for part in fds.split(',').filter(|p| !p.trim().is_empty()) {
        let fd: i32 = part.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{INHERITED_FDS_ENV}: bad fd {part:?}"),
            )
        })?;
        out.push(adopt(fd, None)?);
    }
    Ok(out)
}

/// Take a listening socket this process was given (by a previous master, or as `fd://N`).
/// `spec` is the `bind` entry it stands for; None: its own address.
fn adopt(fd: i32, spec: Option<&str>) -> io::Result<Binding> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // The fd must be a socket we can ask its address of; anything else is refused before
    // we take ownership of it.
    let addr =
        nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd}: not a socket: {e}"),
            )
        })?;
    // SAFETY: this fd was handed to us for exactly this purpose (FORKSERVE_FDS from the
    // previous master, or fd://N in `bind`), nothing else in this process refers to it, and
    // it was just checked to be a socket.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(if addr.as_unix_addr().is_some() {
        let l = std::os::unix::net::UnixListener::from(owned);
        let name = match l.local_addr()?.as_pathname() {
            Some(p) => format!("unix:{}", p.display()),
            None => "unix:(unnamed)".to_string(),
        };
        Binding {
            file: socket_file(&l),
            socket: ListenSocket::Unix(l),
            spec: spec.map_or_else(|| name.clone(), str::to_string),
            name,
        }
    } else {
        let l = std::net::TcpListener::from(owned);
        let local = l.local_addr()?.to_string();
        Binding {
            socket: ListenSocket::Tcp(l),
            name: format!("http://{local}"),
            spec: spec.map_or(local, str::to_string),
            file: None,
        }
    })
}

/// Bind every address. A host name binds every address it resolves to.
pub fn bind_all(
    addresses: &[String],
    backlog: u32,
    socket_mode: Option<u32>,
) -> io::Result<Vec<Binding>> {
    let mut out = Vec::new();
    for text in addresses {
        let addr = BindAddress::parse(text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{text}: {e}")))?;
        match addr {
            BindAddress::Tcp(spec) => {
                let resolved: Vec<SocketAddr> = spec.to_socket_addrs()?.collect();
                if resolved.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{spec}: resolves to no address"),
                    ));
                }
                for sa in resolved {
                    let listener = bind_tcp(sa, backlog)
                        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {sa}: {e}")))?;
                    let name = format!("http://{}", listener.local_addr()?);
                    out.push(Binding {
                        socket: ListenSocket::Tcp(listener),
                        name,
                        spec: text.clone(),
                        file: None,
                    });
                }
            }
            BindAddress::Fd(fd) => out.push(adopt(fd, Some(text))?),
            BindAddress::Unix(path) => {
                let listener = bind_unix(&path, backlog, socket_mode).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot bind unix:{}: {e}", path.display()),
                    )
                })?;
                out.push(Binding {
                    file: socket_file(&listener),
                    socket: ListenSocket::Unix(listener),
                    name: format!("unix:{}", path.display()),
                    spec: text.clone(),
                });
            }
        }
    }
    Ok(out)
}

fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted server must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // "[::]:8000" means IPv6 only; bind "0.0.0.0:8000" too for both.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

fn bind_unix(
    path: &std::path::Path,
    backlog: u32,
    mode: Option<u32>,
) -> io::Result<std::os::unix::net::UnixListener> {
    // A socket file left by a previous run that died would make bind fail: remove it. But a
    // socket a live server answers on is that server's (two servers silently sharing a path
    // is how one of them ends up unreachable), and anything that is not a socket is not ours.
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if let Ok(live) = std::os::unix::net::UnixStream::connect(path) {
                let pid =
                    nix::sys::socket::getsockopt(&live, nix::sys::socket::sockopt::PeerCredentials)
                        .map(|c| c.pid().to_string())
                        .unwrap_or_else(|_| "unknown".into());
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a live process (pid {pid}) answers on it; stop it or bind elsewhere"),
                ));
            }
            std::fs::remove_file(path)?;
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_ops_write() {
        assert!(matches!(
            BindAddress::parse("127.0.0.1:8000"),
            Ok(BindAddress::Tcp(_))
        ));
        assert!(matches!(
            BindAddress::parse("[::1]:8000"),
            Ok(BindAddress::Tcp(_))
        ));
        assert!(matches!(
            BindAddress::parse("localhost:8000"),
            Ok(BindAddress::Tcp(_))
        ));
        assert_eq!(
            BindAddress::parse("unix:/run/forkserve.sock"),
            Ok(BindAddress::Unix("/run/forkserve.sock".into()))
        );
        assert!(BindAddress::parse("8000").is_err());
        assert_eq!(BindAddress::normalize(":8001").unwrap(), "0.0.0.0:8001");
        assert_eq!(
            BindAddress::normalize("example.org").unwrap(),
            "example.org:8000"
        );
        assert_eq!(BindAddress::normalize("[::1]:9").unwrap(), "[::1]:9");
        assert_eq!(BindAddress::normalize("fd://3").unwrap(), "fd://3");
        assert!(BindAddress::normalize("localhost:99999")
            .unwrap_err()
            .contains("out of range"));
        assert!(BindAddress::parse("host:http").is_err());
        assert!(BindAddress::parse("unix:").is_err());
    }

    #[test]
    fn binds_an_ephemeral_port() {
        let bound = bind_all(&["127.0.0.1:0".into()], 16, None).unwrap();
        assert_eq!(bound.len(), 1);
        assert!(bound[0].name.starts_with("http://127.0.0.1:"));
        assert!(!bound[0].name.ends_with(":0"));
    }
}
