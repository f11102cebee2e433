//! systemd's notification protocol (sd_notify), spoken directly: one datagram per message to
//! the unix socket named by `NOTIFY_SOCKET` (a path, or an abstract name starting with '@').
//! Without `NOTIFY_SOCKET` every call is a no-op.

use std::os::unix::net::UnixDatagram;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = address(path.to_str()?)?;
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        Notifier { socket }
    }

    /// Send `message` (newline-separated `KEY=value` pairs). Failures are logged, never fatal:
    /// the service works without its supervisor's notifications.
    pub fn notify(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }
}

fn address(name: &str) -> Option<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).ok()
        }
        None if name.starts_with('/') => std::os::unix::net::SocketAddr::from_pathname(name).ok(),
        None => None,
    }
}
