//! Test support: start the real `forkserve` binary on the real model, talk HTTP/1.1 to it over
//! loopback with a deliberately plain client (no retries, so a dropped request shows), find its
//! workers, read their memory, and stop exactly the processes the test started.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_forkserve");

pub fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir() -> PathBuf {
    project_dir().join("models/all-MiniLM-L6-v2")
}

/// sentence-transformers' own answers for the bundled model (token ids, embeddings,
/// communities), recorded by `scripts/make-reference.py`.
pub fn reference_path() -> PathBuf {
    project_dir().join("tests/data/reference/all-MiniLM-L6-v2.json")
}

pub fn reference() -> serde_json::Value {
    let path = reference_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// The seed example: five dog-walking titles, then four public-speaking titles.
pub const SEED: [&str; 9] = [
    "Dog Walking: 10 Simple Steps",
    "The Secrets of Dog Walking",
    "Why You Need To Dog Walking",
    "The Art of Dog Walking",
    "The Joy of Dog Walking",
    "Public Speaking For The Modern Age",
    "Learn The Art of Public Speaking",
    "Master The Art of Public Speaking",
    "The Best Way To Public Speaking",
];

pub fn seed_body() -> String {
    serde_json::json!({ "sentences": SEED }).to_string()
}

/// A scratch directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "forkserve-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running forkserve master started by this test.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub dir: TempDir,
}

/// Config for tests: an ephemeral port, the real model, short timeouts where a test needs them.
pub fn config(extra: &str) -> String {
    config_for(&model_dir(), extra)
}

/// The same on another model directory.
pub fn config_for(model: &Path, extra: &str) -> String {
    format!(
        "bind = \"127.0.0.1:0\"\n{extra}\n[model]\npath = {:?}\n",
        model.display().to_string()
    )
}

/// Copy a directory tree, following symlinks (a model's modules live in subdirectories, and
/// the small test models reach their transformer through one).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        // metadata() follows symlinks.
        if std::fs::metadata(entry.path()).unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// all-mpnet-base-v2, fetched by `make model` like the default model.
pub fn mpnet_dir() -> PathBuf {
    project_dir().join("models/all-mpnet-base-v2")
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// A JSON array of numbers.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// A list of vectors (an array of arrays of numbers).
pub fn vectors(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("an array of vectors")
        .iter()
        .map(floats)
        .collect()
}

impl Server {
    /// Start with this config (TOML text, see `config`) and wait for `workers` ready workers.
    pub fn start(config_text: &str, workers: usize) -> Server {
        let mut s = Server::spawn(config_text, &[]);
        s.wait_ready(workers);
        s
    }

    /// Start without waiting for anything.
    pub fn spawn(config_text: &str, args: &[&str]) -> Server {
        Server::spawn_with_env(config_text, args, &[])
    }

    /// Start with extra environment variables, without waiting.
    pub fn spawn_with_env(config_text: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = TempDir::new("server");
        let conf = dir.path("forkserve.toml");
        std::fs::write(&conf, config_text).unwrap();
        let log = dir.path("stderr.log");
        let child = Command::new(BIN)
            .arg("-c")
            .arg(&conf)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(project_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start forkserve");
        Server {
            child,
            port: 0,
            log,
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log satisfies `pred`, or panic with the log.
    pub fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if pred(&text) {
                return text;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the listening port and for `workers` distinct workers to be ready.
    pub fn wait_ready(&mut self, workers: usize) {
        let text = self.wait_log("the server to start", Duration::from_secs(60), |t| {
            t.contains("listening at: http://127.0.0.1:") && count(t, "worker ready") >= workers
        });
        let marker = "listening at: http://127.0.0.1:";
        let at = text.find(marker).unwrap() + marker.len();
        let port: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        self.port = port.parse().expect("port in the log");
    }

    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn post_json(&self, path: &str, body: &str) -> Response {
        post_json_to(self.port, path, body).expect("request")
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, &[], b"").expect("request")
    }

    pub fn signal(&self, sig: &str) {
        send_signal(self.pid(), sig);
    }

    /// `GET /metrics` (from whichever worker answers: the counters are server-wide).
    pub fn metrics(&self) -> String {
        String::from_utf8_lossy(&self.get("/metrics").body).into_owned()
    }

    /// One sample of /metrics, by its full name and labels as written, e.g.
    /// `forkserve_worker_restarts_total{reason="crash"}`; 0 if absent or unreachable.
    pub fn metric(&self, sample: &str) -> f64 {
        let Ok(r) = request(self.port, "GET", "/metrics", &[], b"") else {
            return 0.0;
        };
        metric_value(&String::from_utf8_lossy(&r.body), sample)
    }

    /// Wait until `forkserve_workers{state="ready"}` is `n` and the master has `n` workers.
    pub fn wait_ready_workers(&self, n: usize, timeout: Duration) {
        eventually(&format!("{n} ready workers"), timeout, || {
            self.metric("forkserve_workers{state=\"ready\"}") == n as f64
                && self.worker_pids().len() == n
        });
    }

    /// Wait until a worker restart counted for `reason` reaches `n`.
    pub fn wait_restarts(&self, reason: &str, n: usize, timeout: Duration) {
        let sample = format!("forkserve_worker_restarts_total{{reason=\"{reason}\"}}");
        eventually(&format!("{n} restarts for {reason}"), timeout, || {
            self.metric(&sample) >= n as f64
        });
    }

    /// Pids of this master's live workers (children in /proc).
    pub fn worker_pids(&self) -> BTreeSet<i32> {
        children_of(self.pid())
    }

    /// Wait for the master to exit and return its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "master did not exit in {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only the processes this test started: the master and its own children.
        if self.child.try_wait().ok().flatten().is_none() {
            let workers = self.worker_pids();
            // Not `send_signal`: a worker listed here may exit on its own before the signal
            // (one retiring after max_requests did, and its failed kill failed a test that
            // had passed).
            try_signal(self.pid(), "KILL");
            for pid in workers {
                try_signal(pid, "KILL");
            }
            let _ = self.child.wait();
        }
    }
}

/// A port nothing listens on right now (bound and released), for tests that must choose the
/// port themselves (a gunicorn command line, `PORT`).
/// The value of one sample line of Prometheus text (name and labels exactly as written).
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .next()
        .unwrap_or(0.0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `pred` every 20 ms until it holds, or panic saying what did not happen.
pub fn eventually(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll `GET /health` on `port` until it answers 200.
pub fn wait_healthy(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if request(port, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing healthy on port {port} after {timeout:?}");
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

pub fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// `kill -SIG pid`: whether the signal was delivered (not if the process had already gone).
pub fn try_signal(pid: i32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub fn send_signal(pid: i32, sig: &str) {
    assert!(try_signal(pid, sig), "kill -{sig} {pid} failed");
}

/// Children of `parent`, from the ppid field of /proc/PID/stat.
pub fn children_of(parent: i32) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain spaces: parse after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] = state, fields[1] = ppid
        if fields.len() > 1 && fields[1] == parent.to_string() && fields[0] != "Z" {
            out.insert(pid);
        }
    }
    out
}

/// Memory of one process from /proc/PID/smaps_rollup, in KiB.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    pub rss: u64,
    pub pss: u64,
    pub private_clean: u64,
    pub private_dirty: u64,
    /// Anonymous memory on transparent huge pages.
    pub anon_huge_pages: u64,
}

impl Memory {
    pub fn uss(&self) -> u64 {
        self.private_clean + self.private_dirty
    }
}

pub fn memory_of(pid: i32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let mut m = Memory::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let v: u64 = value.parse().unwrap_or(0);
        match key {
            "Rss:" => m.rss = v,
            "Pss:" => m.pss = v,
            "Private_Clean:" => m.private_clean = v,
            "Private_Dirty:" => m.private_dirty = v,
            "AnonHugePages:" => m.anon_huge_pages = v,
            _ => {}
        }
    }
    m
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn worker_pid(&self) -> i32 {
        self.header("x-worker-pid")
            .and_then(|v| v.parse().ok())
            .expect("X-Worker-Pid header")
    }
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// One request on a fresh connection (`Connection: close`).
/// POST a JSON body on a fresh connection (for client threads that hold only the port).
pub fn post_json_to(port: u16, path: &str, body: &str) -> std::io::Result<Response> {
    request(
        port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut conn = Connection::open(port)?;
    conn.send(method, path, headers, body, false)
}

/// A keep-alive HTTP/1.1 connection. It never retries: a request that fails is reported, as a
/// client that cannot safely repeat a POST would see it.
pub struct Connection {
    reader: BufReader<TcpStream>,
    pub closed_by_server: bool,
}

impl Connection {
    pub fn open(port: u16) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            reader: BufReader::new(stream),
            closed_by_server: false,
        })
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        keep_alive: bool,
    ) -> std::io::Result<Response> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if !keep_alive {
            req.push_str("Connection: close\r\n");
        }
        req.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(req.as_bytes())?;
        stream.write_all(body)?;
        let response = read_response(&mut self.reader)?;
        if response.closes() {
            self.closed_by_server = true;
        }
        Ok(response)
    }
}

pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The clusters of a /cluster response, as sets of input indices, for comparisons that do not
/// depend on ordering.
pub fn partition(indices: &serde_json::Value) -> BTreeSet<BTreeSet<u64>> {
    indices
        .as_array()
        .expect("array of clusters")
        .iter()
        .map(|c| {
            c.as_array()
                .expect("cluster")
                .iter()
                .map(|i| i.as_u64().expect("index"))
                .collect()
        })
        .collect()
}

/// Mean PSS/USS helpers for memory tests.
pub fn total_pss_kib(master: i32) -> (u64, Vec<Memory>) {
    let mut pids: Vec<i32> = vec![master];
    pids.extend(children_of(master));
    let mems: Vec<Memory> = pids.iter().map(|&p| memory_of(p)).collect();
    (mems.iter().map(|m| m.pss).sum(), mems)
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// One request's fate, as a client saw it. `served_by` is the worker that answered the
/// connection's previous request (None on a fresh connection): when a request fails, it tells
/// whose connection broke.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub at: Instant,
    pub error: Option<String>,
    pub served_by: Option<i32>,
    /// A failed connect: the listening socket refused or lost the connection.
    pub connect: bool,
}

/// Clients looping keep-alive `/cluster` requests until `limit` requests are done or
/// `finish()` is called. A client reopens its connection only when the server says
/// `Connection: close` or the connection broke, and never retries: any dropped request is
/// counted as a failure. Every request's `Outcome` is kept.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ok: Arc<AtomicU64>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    pids: Arc<Mutex<BTreeSet<i32>>>,
}

pub struct LoadResult {
    pub ok: u64,
    /// What went wrong, one line per failed request.
    pub failures: Vec<String>,
    /// Workers that answered.
    pub pids: BTreeSet<i32>,
    pub outcomes: Vec<Outcome>,
}

impl Load {
    /// Two short sentences per request: many requests per second.
    pub fn start(port: u16, clients: usize, limit: Option<u64>) -> Load {
        let body = serde_json::json!({
            "sentences": ["The Art of Dog Walking", "Learn The Art of Public Speaking"]
        })
        .to_string();
        Load::start_with(port, clients, limit, body)
    }

    pub fn start_with(port: u16, clients: usize, limit: Option<u64>, body: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let taken = Arc::new(AtomicU64::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(BTreeSet::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, taken, outcomes, pids, body) = (
                    stop.clone(),
                    ok.clone(),
                    taken.clone(),
                    outcomes.clone(),
                    pids.clone(),
                    body.clone(),
                );
                std::thread::spawn(move || {
                    let record = |outcome: Outcome| outcomes.lock().unwrap().push(outcome);
                    let mut conn: Option<(Connection, Option<i32>)> = None;
                    while !stop.load(Ordering::Relaxed)
                        && limit.is_none_or(|l| taken.fetch_add(1, Ordering::Relaxed) < l)
                    {
                        if conn.as_ref().is_none_or(|(c, _)| c.closed_by_server) {
                            match Connection::open(port) {
                                Ok(c) => conn = Some((c, None)),
                                Err(e) => {
                                    record(Outcome {
                                        at: Instant::now(),
                                        error: Some(format!("connect: {e}")),
                                        served_by: None,
                                        connect: true,
                                    });
                                    std::thread::sleep(Duration::from_millis(50));
                                    continue;
                                }
                            }
                        }
                        let Some((c, served_by)) = conn.as_mut() else {
                            continue;
                        };
                        let headers = [("Content-Type", "application/json")];
                        let result = c.send("POST", "/cluster", &headers, body.as_bytes(), true);
                        let mut outcome = Outcome {
                            at: Instant::now(),
                            error: None,
                            served_by: *served_by,
                            connect: false,
                        };
                        match result {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                pids.lock().unwrap().insert(r.worker_pid());
                                *served_by = Some(r.worker_pid());
                            }
                            Ok(r) => outcome.error = Some(format!("status {}", r.status)),
                            Err(e) => {
                                outcome.error = Some(e.to_string());
                                conn = None;
                            }
                        }
                        record(outcome);
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            ok,
            outcomes,
            pids,
        }
    }

    pub fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn pids(&self) -> BTreeSet<i32> {
        self.pids.lock().unwrap().clone()
    }

    /// Wait for the clients to send their `limit` requests.
    pub fn wait(self) -> LoadResult {
        for t in self.threads {
            t.join().unwrap();
        }
        let outcomes = self.outcomes.lock().unwrap().clone();
        LoadResult {
            ok: self.ok.load(Ordering::Relaxed),
            failures: outcomes.iter().filter_map(|o| o.error.clone()).collect(),
            pids: self.pids.lock().unwrap().clone(),
            outcomes,
        }
    }

    /// Stop the clients after their current request.
    pub fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }
}
