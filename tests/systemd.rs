//! systemd's protocols against the real binary: the notification sequence through start, HUP
//! and TERM (with the watchdog), socket activation through Debian's `systemd-socket-activate`,
//! and `systemd-analyze verify` on the shipped unit files.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// systemd's end of NOTIFY_SOCKET: a datagram socket that collects every message.
struct Systemd {
    socket: UnixDatagram,
    messages: Vec<(Instant, String)>,
}

impl Systemd {
    fn bind(dir: &TempDir) -> (Systemd, String) {
        let path = dir.path("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let systemd = Systemd {
            socket,
            messages: Vec::new(),
        };
        (systemd, path.to_str().unwrap().to_string())
    }

    /// Read until a message satisfies `pred` (returned), or panic after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                self.messages.push((Instant::now(), text.clone()));
                if pred(&text) {
                    return text;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {what} from the server; heard: {:?}",
                self.texts()
            );
        }
    }

    /// Collect whatever has arrived, without waiting past the socket's read timeout.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            self.messages.push((Instant::now(), text));
        }
    }

    fn texts(&self) -> Vec<&str> {
        self.messages.iter().map(|(_, m)| m.as_str()).collect()
    }

    /// The messages other than STATUS= and WATCHDOG=1: the state changes.
    fn events(&self) -> Vec<&str> {
        self.texts()
            .into_iter()
            .filter(|m| !m.starts_with("STATUS=") && !m.starts_with("WATCHDOG="))
            .collect()
    }
}

#[test]
fn notifications_through_start_reload_and_stop() {
    let dir = TempDir::new("notify");
    let (mut systemd, notify_path) = Systemd::bind(&dir);
    // A 1 s watchdog: WATCHDOG=1 is due every 0.5 s.
    let mut server = Server::spawn_with_env(
        &config("workers = 2"),
        &[],
        &[
            ("NOTIFY_SOCKET", notify_path.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );

    // READY=1 only once both workers are ready, and then /cluster answers at once.
    systemd.wait_for("READY=1", Duration::from_secs(60), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    let log = server.log_text();
    assert_eq!(
        count(&log, "worker ready"),
        2,
        "READY=1 before the workers:\n{log}"
    );
    server.wait_ready(2);
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
    systemd.wait_for("a STATUS= with both workers", Duration::from_secs(5), |m| {
        m.starts_with("STATUS=") && m.contains("workers: 2 ready")
    });
    // The request just served shows within about a second.
    let status = systemd.wait_for("the request count", Duration::from_secs(5), |m| {
        m.starts_with("STATUS=") && m.contains("requests served: ") && !m.ends_with("served: 0")
    });
    assert!(status.contains("(target 2)"), "{status}");

    // Watchdog pings keep coming, about every half period.
    let first = Instant::now();
    for _ in 0..4 {
        systemd.wait_for("WATCHDOG=1", Duration::from_secs(2), |m| m == "WATCHDOG=1");
    }
    let four = first.elapsed();
    assert!(
        four < Duration::from_millis(2600),
        "4 pings took {four:?} with a 1 s watchdog"
    );

    // HUP with one worker more: RELOADING=1, then READY=1 once the new generation is ready.
    std::fs::write(server.dir.path("forkserve.toml"), config("workers = 3")).unwrap();
    server.signal("HUP");
    systemd.wait_for("RELOADING=1", Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "RELOADING=1")
    });
    let reloading = systemd
        .texts()
        .into_iter()
        .find(|m| m.starts_with("RELOADING=1"))
        .unwrap()
        .to_string();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    systemd.wait_for("READY=1 after the reload", Duration::from_secs(60), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    systemd.wait_for("STATUS= with 3 workers", Duration::from_secs(30), |m| {
        m.starts_with("STATUS=") && m.contains("workers: 3 ready, 0 booting, 0 stopping")
    });

    // A broken config on HUP: RELOADING=1, then READY=1 with the reason, old config kept.
    std::fs::write(server.dir.path("forkserve.toml"), config("workers = 0")).unwrap();
    server.signal("HUP");
    let failed = systemd.wait_for(
        "the failed reload's STATUS=",
        Duration::from_secs(10),
        |m| m.contains("reload failed"),
    );
    assert!(failed.contains("workers"), "{failed}");
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
    // The reason stays in STATUS= (what `systemctl status` shows) as the counts move on.
    let later = systemd.wait_for("a later STATUS=", Duration::from_secs(5), |m| {
        m.starts_with("STATUS=") && m != failed
    });
    assert!(
        later.contains("reload failed") && later.contains("workers: 3 ready"),
        "{later}"
    );

    // TERM: STOPPING=1.
    server.signal("TERM");
    systemd.wait_for("STOPPING=1", Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    assert_eq!(server.wait_exit(Duration::from_secs(40)).code(), Some(0));
    // The state changes, in order (RELOADING=1 lines also carry MONOTONIC_USEC).
    let firsts: Vec<&str> = systemd
        .events()
        .into_iter()
        .map(|m| m.lines().next().unwrap_or(""))
        .collect();
    assert_eq!(
        firsts,
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ],
        "the sequence of state changes"
    );
}

#[test]
fn watchdog_pid_of_another_process_turns_the_watchdog_off() {
    let dir = TempDir::new("watchdog-pid");
    let (mut systemd, notify_path) = Systemd::bind(&dir);
    let mut server = Server::spawn_with_env(
        &config("workers = 1"),
        &[],
        &[
            ("NOTIFY_SOCKET", notify_path.as_str()),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    systemd.wait_for("READY=1", Duration::from_secs(60), |m| m == "READY=1");
    std::thread::sleep(Duration::from_millis(600));
    systemd.drain();
    assert!(
        !systemd.texts().contains(&"WATCHDOG=1"),
        "{:?}",
        systemd.texts()
    );
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(40));
}

/// `systemd-socket-activate` binds the port and execs forkserve with LISTEN_FDS=1: the server
/// serves through that socket and binds nothing itself (its `bind` names a port it must not
/// take).
#[test]
fn serves_through_a_socket_passed_by_systemd() {
    let Some(activate) = which("systemd-socket-activate") else {
        panic!(
            "systemd-socket-activate missing: apt-get install systemd (scripts/test-deps.sh does)"
        );
    };
    let dir = TempDir::new("activate");
    // A port the test holds bound without listening: the server must never try it.
    let decoy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let decoy_port = decoy.local_addr().unwrap().port();
    drop(decoy);
    let port = free_port();
    let conf = dir.path("forkserve.toml");
    std::fs::write(
        &conf,
        config("workers = 2").replace(
            "bind = \"127.0.0.1:0\"",
            &format!("bind = \"127.0.0.1:{decoy_port}\""),
        ),
    )
    .unwrap();
    let log = dir.path("stderr.log");
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(env!("CARGO_BIN_EXE_forkserve"))
        .arg("-c")
        .arg(&conf)
        .current_dir(project_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // systemd-socket-activate listens and execs the server in place (same pid) when the first
    // connection arrives, as a socket unit does; that connection waits in the queue meanwhile.
    let master = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Listening on")
    {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = std::thread::spawn(move || {
        request(
            port,
            "POST",
            "/cluster",
            &[("Content-Type", "application/json")],
            seed_body().as_bytes(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if count(&text, "worker ready") >= 2 {
            break text;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("not serving through the passed socket; log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let first = first.join().unwrap();
    assert_eq!(
        first
            .expect("the connection that started the server is answered")
            .status,
        200
    );
    assert!(
        text.contains(&format!(
            "listening at: http://127.0.0.1:{port} (from systemd)"
        )),
        "{text}"
    );
    assert_eq!(count(&text, "listening at:"), 1, "{text}");
    let reply = request(
        port,
        "POST",
        "/cluster",
        &[("Content-Type", "application/json")],
        seed_body().as_bytes(),
    )
    .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["clusters"].as_array().unwrap().len(), 2);
    // Nothing listens on the configured port: the server never bound it.
    assert!(std::net::TcpStream::connect(("127.0.0.1", decoy_port)).is_err());
    // A reload (of a setting the workers use, so that they roll) keeps systemd's socket.
    std::fs::write(
        &conf,
        std::fs::read_to_string(&conf)
            .unwrap()
            .replace("workers = 2", "workers = 2\nmax_requests = 100000"),
    )
    .unwrap();
    send_signal(master, "HUP");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&std::fs::read_to_string(&log).unwrap(), "worker ready") < 4 {
        assert!(Instant::now() < deadline, "no new generation after HUP");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = request(port, "GET", "/health", &[], b"").unwrap();
    assert_eq!(reply.status, 200);
    send_signal(master, "TERM");
    let deadline = Instant::now() + Duration::from_secs(40);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Both unit files pass `systemd-analyze verify`. verify insists that ExecStart's binary
/// exists, so it checks a copy whose ExecStart points at the binary under test; everything
/// else is verified exactly as shipped.
#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        panic!("systemd-analyze missing: apt-get install systemd (scripts/test-deps.sh does)");
    };
    let dir = TempDir::new("units");
    let conf = project_dir().join("conf");
    let service = std::fs::read_to_string(conf.join("forkserve.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/forkserve "));
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NotifyAccess=all",
        "User=forkserve",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "MemoryDenyWriteExecute=yes",
        "Requires=forkserve.socket",
        // A bad configuration (exit 2) is not retried for ever.
        "RestartPreventExitStatus=2",
        // log.file under /var/log/forkserve stays writable under ProtectSystem=strict.
        "LogsDirectory=forkserve",
    ] {
        assert!(service.lines().any(|l| l == line), "{line} missing");
    }
    assert!(service.lines().any(|l| l.starts_with("WatchdogSec=")));
    // "-": a model kept elsewhere must not fail the start.
    assert!(service
        .lines()
        .any(|l| l.starts_with("ReadOnlyPaths=") && l.contains("-/opt/forkserve")));
    std::fs::write(
        dir.path("forkserve.service"),
        service.replace("/usr/local/bin/forkserve", env!("CARGO_BIN_EXE_forkserve")),
    )
    .unwrap();
    std::fs::copy(conf.join("forkserve.socket"), dir.path("forkserve.socket")).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(dir.path("forkserve.socket"))
        .arg(dir.path("forkserve.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // verify reports unknown or misspelt settings as warnings with a zero exit code.
    assert!(
        !stderr.contains("forkserve.service:") && !stderr.contains("forkserve.socket:"),
        "systemd-analyze verify complained:\n{stderr}"
    );
    // The hardening, as systemd scores it (lower is better): 1.6 when this test was written.
    let out = Command::new(analyze)
        .args(["security", "--offline=yes"])
        .arg(dir.path("forkserve.service"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for forkserve.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 1.6, "exposure level {score} > 1.6:\n{text}");
}

/// The install script, run twice into a staging root (as an upgrade would be): an absolute
/// model.path that names the installed model, the model replaced whole (never nested inside
/// the old one), the operator's config kept, the files the units refer to in place; the
/// staged config and model pass --check-config.
#[test]
fn install_script_installs_and_upgrades_into_a_staging_root() {
    let stage = TempDir::new("install");
    let root = stage.path("root");
    let run = || {
        let out = Command::new(project_dir().join("scripts/install.sh"))
            .env("DESTDIR", &root)
            .env("BIN", env!("CARGO_BIN_EXE_forkserve"))
            .env("MODEL_SRC", model_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run();
    let config = root.join("etc/forkserve/forkserve.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "path = \"/opt/forkserve/models/all-MiniLM-L6-v2\""),
        "{text}"
    );
    let model = root.join("opt/forkserve/models/all-MiniLM-L6-v2");
    assert!(model.join("model.safetensors").is_file());
    for file in [
        "usr/local/bin/forkserve",
        "etc/systemd/system/forkserve.service",
        "etc/systemd/system/forkserve.socket",
        "etc/sysusers.d/forkserve.conf",
        "etc/logrotate.d/forkserve",
        "usr/share/doc/forkserve/README.md",
    ] {
        assert!(root.join(file).is_file(), "{file} not installed");
    }
    // The unit's Documentation= names a file the install put there.
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/forkserve.service")).unwrap();
    assert!(unit.contains("Documentation=file:///usr/share/doc/forkserve/README.md"));

    // An upgrade: the operator's edit survives, the model is replaced, not nested.
    std::fs::write(&config, format!("{text}\n# edited\n")).unwrap();
    run();
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .ends_with("# edited\n"));
    assert!(
        !model.join("all-MiniLM-L6-v2").exists(),
        "the model was nested"
    );
    assert!(!root
        .join("opt/forkserve/models/all-MiniLM-L6-v2.old")
        .exists());

    let check = Command::new(env!("CARGO_BIN_EXE_forkserve"))
        .arg("-c")
        .arg(&config)
        .arg("--model")
        .arg(&model)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
