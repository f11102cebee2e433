//! What ops do to a running server, with real signals: reload (HUP) with a new worker count, a
//! broken config, a new model file; binary upgrade (USR2); log reopening (USR1); memory-based
//! recycling; pidfile; users; unix sockets. Clients keep sending requests throughout, and none
//! may fail.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

fn rewrite_config(server: &Server, text: &str) {
    std::fs::write(server.dir.path("forkserve.toml"), text).unwrap();
}

#[test]
fn hup_with_new_settings_rolls_the_workers_without_a_failed_request() {
    let server = Server::start(&config("workers = 2"), 2);
    let before = server.worker_pids();
    let load = Load::start(server.port, 4, None);
    eventually("load to flow", Duration::from_secs(10), || {
        load.answered() > 10
    });
    // max_requests is a worker's setting: every worker rolls (and one more starts).
    rewrite_config(&server, &config("workers = 3\nmax_requests = 100000"));
    server.signal("HUP");
    server.wait_restarts("reload", 2, Duration::from_secs(30));
    let log = server.log_text();
    assert!(
        log.contains("changed: max_requests, workers"),
        "the reload does not say what changed:\n{log}"
    );
    eventually("three new workers", Duration::from_secs(20), || {
        let now = server.worker_pids();
        now.len() == 3 && now.is_disjoint(&before)
    });
    let served_after = load.answered();
    eventually("requests after the roll", Duration::from_secs(10), || {
        load.answered() > served_after + 10
    });
    let LoadResult { ok, failures, .. } = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
}

#[test]
fn hup_with_a_broken_config_keeps_serving_and_says_why() {
    let server = Server::start(&config("workers = 2"), 2);
    let before = server.worker_pids();
    rewrite_config(&server, &format!("wrokers = 3\n{}", config("")));
    server.signal("HUP");
    let log = server.wait_log("the reload error", Duration::from_secs(10), |log| {
        log.contains("reload failed")
    });
    assert!(log.contains("wrokers"), "the error names the key: {log}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.worker_pids(), before, "nothing restarted");
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
}

/// A copy of the model directory whose weights are ours to replace.
fn model_copy(dir: &TempDir) -> std::path::PathBuf {
    let copy = dir.path("model");
    copy_dir(&model_dir(), &copy);
    copy
}

/// Write `dir/model.safetensors` (by rename, as a deploy would) with one tensor multiplied by
/// `factor`.
fn scale_tensor(dir: &std::path::Path, name: &str, factor: f32) {
    let original = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&original).unwrap();
    let mut scaled_bytes = Vec::new();
    let mut views = Vec::new();
    for (tname, view) in tensors.tensors() {
        if tname == name {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            scaled_bytes = view
                .data()
                .chunks_exact(4)
                .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * factor).to_le_bytes())
                .collect();
        }
        views.push((tname, view));
    }
    assert!(!scaled_bytes.is_empty(), "no tensor {name}");
    let mut out: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (tname, view) in views {
        if tname == name {
            let v = safetensors::tensor::TensorView::new(
                view.dtype(),
                view.shape().to_vec(),
                &scaled_bytes,
            )
            .unwrap();
            out.push((tname, v));
        } else {
            out.push((tname, view));
        }
    }
    let bytes = safetensors::serialize(out, None).unwrap();
    let tmp = dir.join("model.safetensors.new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("model.safetensors")).unwrap();
}

#[test]
fn hup_after_a_new_model_file_serves_the_new_model_without_downtime() {
    let dir = TempDir::new("swap");
    let model = model_copy(&dir);
    let text = format!(
        "bind = \"127.0.0.1:0\"\nworkers = 2\n[model]\npath = {:?}\n",
        model.display().to_string()
    );
    let server = Server::start(&text, 2);
    let probe = r#"{"inputs": "The Art of Dog Walking"}"#;
    let vector = |r: Response| floats(&r.json()[0]);
    let before = vector(server.post_json("/embed", probe));

    // The last layer's LayerNorm weight negated: a different model, still a usable one (one
    // that gave every sentence the same vector would be refused by the probe).
    scale_tensor(&model, "encoder.layer.5.output.LayerNorm.weight", -1.0);
    let load = Load::start(server.port, 3, None);
    server.signal("HUP");
    server.wait_restarts("reload", 2, Duration::from_secs(30));
    let failures = load.finish().failures;
    assert!(failures.is_empty(), "{failures:?}");
    // Taken once the load has stopped, so the probe runs in a pass of its own, as it does
    // below: a pass shared with the load's sentences may take another product route, and
    // move the vector in its 7th digit (tests/batching.rs bounds that), which the exact
    // comparison below would mistake for another model.
    let after = vector(server.post_json("/embed", probe));
    assert!(
        cosine(&before, &after) < 0.99,
        "not served by the new model: cos {}",
        cosine(&before, &after)
    );

    // A model file that does not load keeps the model that works.
    std::fs::write(model.join("model.safetensors.bad"), b"not safetensors").unwrap();
    std::fs::rename(
        model.join("model.safetensors.bad"),
        model.join("model.safetensors"),
    )
    .unwrap();
    server.signal("HUP");
    server.wait_log("the failed reload", Duration::from_secs(10), |log| {
        log.contains("still serving the previous model")
    });
    let r = server.post_json("/embed", probe);
    assert_eq!(r.status, 200);
    assert_eq!(vector(r), after, "no longer the model that loaded last");
}

#[test]
fn usr2_starts_a_new_master_on_the_same_socket_and_quit_retires_the_old_one() {
    let dir = TempDir::new("usr2");
    let pidfile = dir.path("forkserve.pid");
    // systemd's side of the notification protocol: a datagram socket named by NOTIFY_SOCKET.
    let notify_path = dir.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut server = Server::spawn_with_env(
        &config(&format!(
            "workers = 2\npidfile = {:?}",
            pidfile.display().to_string()
        )),
        &[],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    server.wait_ready(2);
    let old_master = server.pid();
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        old_master.to_string()
    );
    let old_workers = server.worker_pids();
    let load = Load::start(server.port, 4, None);
    eventually("load to flow", Duration::from_secs(10), || {
        load.answered() > 10
    });

    let usr2_at = Instant::now();
    server.signal("USR2");
    // The new master writes <pidfile>.2 while the old one lives.
    let pidfile2 = dir.path("forkserve.pid.2");
    let mut new_master = 0;
    eventually("the new master's pidfile", Duration::from_secs(10), || {
        new_master = std::fs::read_to_string(&pidfile2)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        new_master > 0 && children_of(old_master).contains(&new_master)
    });
    eventually("the new master's workers", Duration::from_secs(30), || {
        children_of(new_master).len() == 2 && count(&server.log_text(), "worker ready") >= 4
    });
    let serving_after = usr2_at.elapsed();
    eprintln!(
        "USR2 to the new master's workers ready: {:.3} s",
        serving_after.as_secs_f64()
    );
    server.signal("QUIT");
    let status = server.wait_exit(Duration::from_secs(40));
    assert_eq!(status.code(), Some(0));
    for pid in &old_workers {
        assert!(!alive(*pid), "old worker {pid} still running");
    }
    // The new master takes the pidfile's name once the old one is gone.
    eventually("the pidfile to be renamed", Duration::from_secs(5), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|p| p.trim() == new_master.to_string())
            && !pidfile2.exists()
    });
    // The clients' connections to old workers were closed between requests; they reconnect
    // through the same socket and reach the new generation.
    let new_workers = children_of(new_master);
    eventually("the new workers to answer", Duration::from_secs(20), || {
        load.pids().iter().any(|p| new_workers.contains(p))
    });
    let LoadResult { ok, failures, .. } = load.finish();

    // systemd heard: READY once the first workers served, then the new master's MAINPID
    // with its own READY, and STOPPING from the old master.
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    // (STATUS= and WATCHDOG= lines aside: tests/systemd.rs covers them.)
    let events: Vec<&String> = messages
        .iter()
        .filter(|m| !m.starts_with("STATUS=") && !m.starts_with("WATCHDOG="))
        .collect();
    assert!(
        events.first().is_some_and(|m| m.starts_with("READY=1")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("MAINPID={new_master}")) && m.contains("READY=1")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("STOPPING=1")),
        "{messages:?}"
    );

    send_signal(new_master, "TERM");
    eventually("the new master to stop", Duration::from_secs(40), || {
        !alive(new_master)
    });
    assert!(!pidfile.exists(), "pidfile removed on exit");
    assert!(
        failures.is_empty(),
        "{} of {} failed through the upgrade: {failures:?}",
        failures.len(),
        ok
    );
}

#[test]
fn usr1_reopens_the_log_file_in_master_and_workers() {
    let dir = TempDir::new("usr1");
    let logfile = dir.path("forkserve.log");
    let mut server = Server::spawn(
        &config(&format!(
            "workers = 2\n[log]\nfile = {:?}",
            logfile.display().to_string()
        )),
        &[],
    );
    eventually("the log file", Duration::from_secs(30), || {
        std::fs::read_to_string(&logfile).is_ok_and(|t| count(&t, "worker ready") == 2)
    });
    // logrotate: move the file away, then USR1.
    let rotated = dir.path("forkserve.log.1");
    std::fs::rename(&logfile, &rotated).unwrap();
    server.signal("USR1");
    eventually(
        "master and both workers to write to the new file",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&logfile)
                .is_ok_and(|t| count(&t, "reopened the log files") == 3)
        },
    );
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("reopened the log files"));
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(30));
}

#[test]
fn a_worker_over_max_worker_memory_is_recycled_gracefully() {
    // A worker idles at ~5 MiB; clustering 900 sentences of ~100 tokens fills every forward
    // pass to `max_batch_tokens` (~75 MiB of activations) for ~10 passes (9 s on a Zen 5 with
    // AVX-512, which made 3,000 one-line sentences too quick for three 1 s samples): past
    // the 40 MiB limit for more than 3 samples, the worker is replaced, after it answers.
    let server = Server::start(&config("workers = 1\nmax_worker_memory = \"40MiB\""), 1);
    let first = server.worker_pids();
    let load = Load::start(server.port, 1, None);
    let words = [
        "memory", "worker", "request", "sample", "limit", "replaced", "graceful",
    ];
    let sentences: Vec<String> = (0..900)
        .map(|i| {
            let filler: Vec<&str> = (0..80).map(|j| words[(i + j * 3) % words.len()]).collect();
            format!(
                "Sentence number {i} about topic {}: {}",
                i % 37,
                filler.join(" ")
            )
        })
        .collect();
    let big = server.post_json("/cluster", &json!({ "sentences": sentences }).to_string());
    assert_eq!(big.status, 200, "the large request itself is answered");
    server.wait_restarts("memory", 1, Duration::from_secs(20));
    eventually("a new worker", Duration::from_secs(10), || {
        server.worker_pids().is_disjoint(&first)
    });
    let failures = load.finish().failures;
    assert!(failures.is_empty(), "{failures:?}");
    // A limit below a worker's idle memory is refused at start, naming the key.
    let mut refused = Server::spawn(&config("workers = 1\nmax_worker_memory = \"1MiB\""), &[]);
    assert_eq!(refused.wait_exit(Duration::from_secs(30)).code(), Some(2));
    assert!(refused.log_text().contains("max_worker_memory"));
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn workers_do_not_run_as_root() {
    if uid_of(std::process::id() as i32) != 0 {
        eprintln!("not root: the master's own user is used; nothing to check");
        return;
    }
    let server = Server::start(&config("workers = 1"), 1);
    let worker = *server.worker_pids().iter().next().unwrap();
    assert_eq!(uid_of(server.pid()), 0, "the master keeps its privileges");
    assert_ne!(uid_of(worker), 0, "a worker runs as root");
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
    drop(server);

    let server = Server::start(&config("workers = 1\nallow_root = true"), 1);
    let worker = *server.worker_pids().iter().next().unwrap();
    assert_eq!(uid_of(worker), 0, "allow_root keeps root");
}

#[test]
fn serves_a_unix_socket_with_its_mode_and_tcp_side_by_side() {
    use std::io::Write;
    let dir = TempDir::new("unix");
    let sock = dir.path("forkserve.sock");
    let server = Server::start(
        &format!(
            "bind = [\"127.0.0.1:0\", \"unix:{}\"]\nsocket_mode = 0o600\nworkers = 1\n[model]\npath = {:?}\n",
            sock.display(),
            model_dir().display().to_string()
        ),
        1,
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let body = seed_body();
    write!(
        stream,
        "POST /cluster HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let r = read_response(&mut std::io::BufReader::new(stream)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["indices"].as_array().unwrap().len(), 2);
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
}

/// GET /health over a unix socket; None if nothing answers.
fn health_over(path: &std::path::Path) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn a_second_server_never_takes_a_live_servers_socket_or_pidfile() {
    let dir = TempDir::new("two-masters");
    let sock = dir.path("api.sock");
    let pidfile = dir.path("api.pid");
    let text = config(&format!(
        "workers = 1\npidfile = {:?}",
        pidfile.display().to_string()
    ))
    .replace(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"unix:{}\"", sock.display()),
    );
    // Leftovers of a server that died: a socket file nobody answers on, a pidfile naming a
    // dead process. Both are stale and replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    std::fs::write(&pidfile, "999999\n").unwrap();
    let mut first = Server::spawn(&text, &[]);
    eventually(
        "the first server on its socket",
        Duration::from_secs(60),
        || health_over(&sock).is_some_and(|r| r.starts_with("HTTP/1.1 200")),
    );
    eventually("its pidfile", Duration::from_secs(5), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|p| p.trim() == first.pid().to_string())
    });

    // The same socket path: refused, naming the path and the live pid.
    let mut second = Server::spawn(&text, &[]);
    assert_eq!(second.wait_exit(Duration::from_secs(60)).code(), Some(2));
    let log = second.log_text();
    assert!(
        log.contains(&sock.display().to_string()) && log.contains(&format!("pid {}", first.pid())),
        "{log}"
    );
    // The same pidfile on another address: refused, naming the live pid.
    let other = text.replace(
        &format!("bind = \"unix:{}\"", sock.display()),
        "bind = \"127.0.0.1:0\"",
    );
    let mut third = Server::spawn(&other, &[]);
    assert_eq!(third.wait_exit(Duration::from_secs(60)).code(), Some(2));
    let log = third.log_text();
    assert!(
        log.contains("pidfile") && log.contains(&format!("pid {}", first.pid())),
        "{log}"
    );
    // The first one serves on, its pidfile intact.
    assert!(health_over(&sock).is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        first.pid().to_string()
    );
    // A clean exit removes both its socket file and its pidfile.
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!sock.exists(), "the socket file was left behind");
    assert!(!pidfile.exists(), "the pidfile was left behind");
}

/// A HUP that changes nothing says so and rolls no worker; one that changes only what the
/// master uses (worker count) rolls none either, and says what changed; the log's restart
/// reason is the metric's label.
#[test]
fn hup_rolls_workers_only_when_something_they_use_changed() {
    let server = Server::start(&config("workers = 1"), 1);
    let before = server.worker_pids();
    server.signal("HUP");
    server.wait_log("the reload", Duration::from_secs(30), |l| {
        l.contains("configuration reloaded (changed: nothing)")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.worker_pids(),
        before,
        "a HUP that changed nothing rolled the workers"
    );

    rewrite_config(&server, &config("workers = 2"));
    server.signal("HUP");
    server.wait_log("the reload", Duration::from_secs(30), |l| {
        l.contains("configuration reloaded (changed: workers)")
    });
    server.wait_ready_workers(2, Duration::from_secs(30));
    assert!(
        server.worker_pids().is_superset(&before),
        "the first worker was rolled"
    );

    rewrite_config(&server, &config("workers = 1"));
    server.signal("HUP");
    server.wait_restarts("scale_down", 1, Duration::from_secs(30));
    let log = server.wait_log("the scale-down line", Duration::from_secs(10), |l| {
        l.contains("reason=\"scale_down\"") || l.contains("reason=scale_down")
    });
    assert!(
        !log.contains("uid=65534 gid=65534 uid="),
        "the uid line repeats itself"
    );
}

/// An address another live server holds: refused with exit 2, naming it.
#[test]
fn a_port_in_use_is_refused_with_exit_2() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let text = config("workers = 1").replace(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"127.0.0.1:{port}\""),
    );
    let mut server = Server::spawn(&text, &[]);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(2));
    let log = server.log_text();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
}
