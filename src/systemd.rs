//! systemd's side of a `Type=notify` service, spoken directly (no libsystemd):
//! - sd_notify: one datagram per message to the unix socket named by `NOTIFY_SOCKET` (a path,
//!   or an abstract name starting with '@'). Without `NOTIFY_SOCKET` every call is a no-op.
//! - the watchdog: with `WATCHDOG_USEC` (and `WATCHDOG_PID` naming this process, if set),
//!   `WATCHDOG=1` every half of that period, sent from the master's loop so that a wedged
//!   loop stops the pings and systemd restarts the service.
//! - socket activation: `LISTEN_PID`/`LISTEN_FDS` name listening sockets at fd 3 onwards.
//!
//! Protocol facts from systemd's sd_notify(3), sd_watchdog_enabled(3) and sd_listen_fds(3).

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;
/// STATUS= lines change with every request served; systemd needs them no more than this often.
const STATUS_PERIOD: Duration = Duration::from_secs(1);

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// How often to send WATCHDOG=1: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
    watchdog_every: Option<Duration>,
    last_watchdog: Option<Instant>,
    last_status: String,
    last_status_at: Option<Instant>,
    /// The worker-count part of the last STATUS=: a change of it is sent at once.
    last_counts: String,
    /// READY=1 was sent for the current generation of workers.
    ready_sent: bool,
    /// Why the last reload was refused, shown in STATUS= until a reload succeeds.
    reload_refused: Option<String>,
}

/// What the master reports in STATUS= (what `systemctl status` shows).
pub struct PoolStatus {
    pub ready: usize,
    pub booting: usize,
    pub stopping: usize,
    /// The configured worker count.
    pub target: usize,
    pub requests_served: u64,
    /// Shutting down: gracefully (true) or fast.
    pub shutting_down: Option<bool>,
}

impl Notifier {
    /// From the environment systemd gives the service. `previous_master` is the pid of the
    /// master that started this one by USR2: systemd's `WATCHDOG_PID` still names it, and this
    /// master takes the watchdog over along with `MAINPID`.
    pub fn from_env(previous_master: Option<i32>) -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = address(path.to_str()?)?;
            let sock = UnixDatagram::unbound().ok()?;
            // Never block the master's loop on its supervisor: a notification that does not
            // fit the receiver's queue is dropped (the next STATUS= or WATCHDOG=1 follows).
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        });
        let watchdog_every = watchdog_period(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id() as i32,
            previous_master,
        )
        .map(|period| period / 2);
        if let Some(every) = watchdog_every {
            tracing::info!(
                every_ms = every.as_millis() as u64,
                "systemd watchdog enabled"
            );
        }
        Notifier {
            socket,
            watchdog_every,
            last_watchdog: None,
            last_status: String::new(),
            last_status_at: None,
            last_counts: String::new(),
            ready_sent: false,
            reload_refused: None,
        }
    }

    /// READY=1, once per generation of workers (`main_pid`: this master replaces another,
    /// started by USR2, and says it is the service's main process now). True if sent now.
    pub fn ready(&mut self, main_pid: Option<i32>) -> bool {
        if self.ready_sent {
            return false;
        }
        // Not sent (the receiver's queue was full): tried again on the next turn of the loop.
        self.ready_sent = match main_pid {
            Some(pid) => self.notify(&format!("MAINPID={pid}\nREADY=1")),
            None => self.notify("READY=1"),
        };
        self.ready_sent
    }

    pub fn is_ready_sent(&self) -> bool {
        self.ready_sent
    }

    /// A reload was applied: READY=1 again once its new generation is all ready.
    pub fn reload_applied(&mut self) {
        self.ready_sent = false;
        self.reload_refused = None;
    }

    /// A reload changed nothing: systemd hears READY=1 after the RELOADING=1, and `systemctl
    /// status` shows why until a reload succeeds.
    pub fn reload_refused(&mut self, why: &str) {
        self.notify("READY=1");
        self.reload_refused = Some(why.to_string());
        self.last_counts.clear(); // send the new STATUS= at once
    }

    /// The watchdog ping if due, and STATUS= with the pool's counts: a change of the counts
    /// at once, the request count at most once per `STATUS_PERIOD`.
    pub fn report(&mut self, pool: &PoolStatus) {
        self.keep_alive();
        if self.socket.is_none() {
            return; // nothing to format the status for
        }
        let state = match pool.shutting_down {
            Some(true) => "stopping (graceful); ",
            Some(false) => "stopping; ",
            None => "",
        };
        let mut counts = format!(
            "{state}workers: {} ready, {} booting, {} stopping (target {})",
            pool.ready, pool.booting, pool.stopping, pool.target
        );
        if let Some(why) = &self.reload_refused {
            counts = format!("reload failed, previous configuration kept ({why}); {counts}");
        }
        let changed = counts != self.last_counts;
        self.status(
            &format!("{counts}; requests served: {}", pool.requests_served),
            changed,
        );
        self.last_counts = counts;
    }

    /// Send `message` (newline-separated `KEY=value` pairs). Failures are logged, never fatal:
    /// the service works without its supervisor's notifications.
    /// False only if the message could not be sent now.
    pub fn notify(&self, message: &str) -> bool {
        let Some((sock, addr)) = &self.socket else {
            return true;
        };
        match sock.send_to_addr(message.as_bytes(), addr) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::debug!(message, "systemd's notification queue is full; not sent");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot notify systemd");
                true
            }
        }
    }

    /// `RELOADING=1`, with the `MONOTONIC_USEC` that systemd 253+ asks for alongside it.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    /// `STATUS=<text>` when the text changed, at most once per `STATUS_PERIOD` unless `now`
    /// (a change of state worth showing at once, like a worker count).
    fn status(&mut self, text: &str, now: bool) {
        if self.socket.is_none() || text == self.last_status {
            return;
        }
        if !now
            && self
                .last_status_at
                .is_some_and(|t| t.elapsed() < STATUS_PERIOD)
        {
            return;
        }
        self.notify(&format!("STATUS={text}"));
        self.last_status = text.to_string();
        self.last_status_at = Some(Instant::now());
    }

    /// `WATCHDOG=1` if one is due. Called on every turn of the master's loop.
    fn keep_alive(&mut self) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        if self.last_watchdog.is_none_or(|t| t.elapsed() >= every) {
            self.notify("WATCHDOG=1");
            self.last_watchdog = Some(Instant::now());
        }
    }

    /// Time until the next `WATCHDOG=1` is due, for the loop's sleep.
    pub fn until_keep_alive(&self) -> Option<Duration> {
        let every = self.watchdog_every?;
        Some(match self.last_watchdog {
            Some(t) => every.saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        })
    }
}

/// The watchdog period, if the watchdog is on for this process: `WATCHDOG_USEC` a positive
/// number, and `WATCHDOG_PID` unset or naming `me` (or the master that handed over to us).
fn watchdog_period(
    usec: Option<&str>,
    pid: Option<&str>,
    me: i32,
    previous_master: Option<i32>,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: i32 = pid.trim().parse().ok()?;
        if pid != me && Some(pid) != previous_master {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The fds passed by socket activation, if `LISTEN_PID` names `me`: `LISTEN_FDS` of them from
/// fd 3 on. `Err` for a variable that is set but unreadable (the service cannot serve without
/// its sockets, so this must not be ignored).
pub fn activation_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    me: i32,
) -> Result<Option<Vec<i32>>, String> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: i32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_PID: not a pid: {pid:?}"))?;
    if pid != me {
        // Meant for another process (e.g. a wrapper that exec'd us without updating it).
        return Ok(None);
    }
    let n: i32 = fds
        .trim()
        .parse()
        .ok()
        .filter(|&n| (1..=1024).contains(&n))
        .ok_or_else(|| format!("LISTEN_FDS: expected 1 to 1024 sockets, got {fds:?}"))?;
    Ok(Some((LISTEN_FDS_START..LISTEN_FDS_START + n).collect()))
}

fn address(name: &str) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()).ok(),
        None if name.starts_with('/') => SocketAddr::from_pathname(name).ok(),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_on_only_for_this_process() {
        let s = |us| Some(Duration::from_micros(us));
        assert_eq!(
            watchdog_period(Some("30000000"), None, 7, None),
            s(30_000_000)
        );
        assert_eq!(
            watchdog_period(Some("500000"), Some("7"), 7, None),
            s(500_000)
        );
        assert_eq!(watchdog_period(Some("500000"), Some("8"), 7, None), None);
        // After USR2, WATCHDOG_PID still names the old master.
        assert_eq!(
            watchdog_period(Some("500000"), Some("8"), 7, Some(8)),
            s(500_000)
        );
        assert_eq!(watchdog_period(Some("0"), None, 7, None), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7, None), None);
        assert_eq!(watchdog_period(None, Some("7"), 7, None), None);
    }

    #[test]
    fn activation_fds_follow_sd_listen_fds() {
        assert_eq!(activation_fds(None, None, 5), Ok(None));
        assert_eq!(
            activation_fds(Some("5"), Some("2"), 5),
            Ok(Some(vec![3, 4]))
        );
        assert_eq!(activation_fds(Some("6"), Some("2"), 5), Ok(None));
        assert!(activation_fds(Some("5"), Some("0"), 5).is_err());
        assert!(activation_fds(Some("5"), Some("x"), 5).is_err());
        assert!(activation_fds(Some("x"), Some("1"), 5).is_err());
    }
}
