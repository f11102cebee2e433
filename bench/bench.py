#!/usr/bin/env python3
"""forkserve against the Python stack it replaces (FastAPI + gunicorn/uvicorn, preloaded
sentence-transformers model), side by side on the same machine, in one run, alternating the
two servers so that drift on a shared machine hits both.

    python3 bench/bench.py            # full comparison (make bench), under 30 min on 2 cores
    python3 bench/bench.py --quick    # forkserve alone, one setting each (make bench-quick)
    python3 bench/bench.py --selftest # parse sample outputs (run by the test suite)

Writes bench/results/bench.json (raw), bench/results/summary.md (tables) and a PNG chart per
section. The Python stack runs from target/bench-venv (bench/python/requirements.txt).
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "forkserve")
MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
VENV = os.path.join(ROOT, "target", "bench-venv")
RESULTS = os.path.join(ROOT, "bench", "results")
SEED = [
    "Dog Walking: 10 Simple Steps", "The Secrets of Dog Walking", "Why You Need To Dog Walking",
    "The Art of Dog Walking", "The Joy of Dog Walking", "Public Speaking For The Modern Age",
    "Learn The Art of Public Speaking", "Master The Art of Public Speaking",
    "The Best Way To Public Speaking",
]
SEED_BODY = json.dumps({"sentences": SEED}).encode()
WORDS = ("river garden morning quiet engineer music coffee market winter student ancient city "
         "bright forest paper window travel kitchen lesson ocean planet careful doctor evening "
         "story mountain simple yellow history museum bridge letter number village machine").split()


def sentences(n, words=15, salt=0):
    """n distinct sentences of about `words` words, the same on every run."""
    out = []
    for i in range(n):
        k = i * 7 + salt * 131
        out.append(" ".join(WORDS[(k + j * (i % 5 + 1)) % len(WORDS)] for j in range(words)) + f" {i}.")
    return out


# ---------------------------------------------------------------------------------------------
# The two servers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A forkserve or Python-stack server started by this harness (and stopped by PID)."""

    def __init__(self, kind, workers, max_requests=0, threads=1, model=None):
        self.kind, self.workers = kind, workers
        model = model or MODEL
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{kind}-", suffix=".log", delete=False)
        env = dict(os.environ)
        if kind == "forkserve":
            cmd = [BIN, "-c", "/dev/null", "-b", f"127.0.0.1:{self.port}", "-w", str(workers),
                   "--max-requests", str(max_requests), "--threads", str(threads), "--model", model,
                   "--log-level", "warn"]
            env["FORKSERVE_LOG_ACCESS_LOG"] = "false"
        else:
            cmd = [os.path.join(VENV, "bin", "gunicorn"), "-c", "gunicorn.conf.py", "main:app"]
            env.update(WORKERS=str(workers), MAX_REQUESTS=str(max_requests),
                       BIND=f"127.0.0.1:{self.port}", MODEL_DIR=model, HF_HUB_OFFLINE="1")
        cwd = ROOT if kind == "forkserve" else os.path.join(ROOT, "bench", "python")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    @property
    def pid(self):
        return self.proc.pid

    def post(self, body=SEED_BODY, conn=None, timeout=120):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/cluster", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            if own:
                conn.close()

    def wait_first_ok(self, limit=180):
        """Seconds from exec to the first 200 on POST /cluster with the 9 seed titles."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited:\n{open(self.log.name).read()[-3000:]}")
            try:
                if self.post(timeout=30) == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.kind} not serving after {limit}s")

    def wait_all_workers(self, limit=180):
        """Until every worker is up (gunicorn answers before its other workers have booted)."""
        deadline = time.monotonic() + limit
        while len(children(self.pid)) < self.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        # uvicorn workers import the app's dependencies after fork; give them time to serve.
        for _ in range(self.workers * 3):
            self.post()

    def load(self, n, clients=2):
        left, lock, failed = [n], threading.Lock(), [0]

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            while True:
                with lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                try:
                    if self.post(conn=conn) != 200:
                        failed[0] += 1
                except (OSError, http.client.HTTPException):
                    failed[0] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return failed[0]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in children(self.pid) + [self.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait()
        os.unlink(self.log.name)


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[1] == str(pid) and rest[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def parse_smaps_rollup(text):
    fields = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M))
    keys = ["Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"]
    return {k: fields.get(k, 0) for k in keys}


def memory(pid):
    """smaps_rollup (KiB) of the master and each worker."""
    def one(p):
        with open(f"/proc/{p}/smaps_rollup") as f:
            return parse_smaps_rollup(f.read())
    return {"master": one(pid), "workers": [one(c) for c in children(pid)]}


def total_pss(mem):
    return mem["master"]["Pss"] + sum(w["Pss"] for w in mem["workers"])


def amx_bf16():
    """Whether this CPU has AMX's bf16 tiles, which `model.precision = "bf16"` needs."""
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    return "amx_bf16" in flags and "amx_tile" in flags


def model_shape(model_dir):
    """(layers, hidden, intermediate) of the transformer in `model_dir`."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]


def forward_flops(lengths, model_dir=None):
    """Multiply-adds x 2 of one forward pass over sentences of these token lengths: the linear
    layers (2 x weights per token) plus the attention (Q·Kᵀ and P·V: 4·n²·hidden per layer)."""
    layers, hidden, intermediate = model_shape(model_dir or MODEL)
    weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return 2 * weights * sum(lengths) + layers * 4 * hidden * sum(n * n for n in lengths)


def machine():
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s+(.+)", out)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    mhz = 0.0
    try:
        mhz = max(float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", open("/proc/cpuinfo").read()))
    except (OSError, ValueError):
        pass
    # f32 flops per cycle per core: 2 FMA units x lanes x 2 flops. AVX-512 = 16 lanes (64 flop,
    # assuming 2 FMA ports as on Xeon Gold/Platinum: `make bench-kernels` measures up to 140
    # GFLOP/s on one 2.3 GHz core here, more than one 512-bit unit could do), AVX2 = 8 lanes (32).
    flags = ""
    try:
        flags = re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split()
    except (OSError, AttributeError):
        pass
    simd, per_cycle = ("AVX-512", 64) if "avx512f" in flags else ("AVX2 FMA", 32) if "fma" in flags else ("SSE", 8)
    return {"cpus": os.cpu_count(), "cpu_model": model, "mhz": mhz, "simd": simd, "flop_per_cycle": per_cycle,
            "peak_gflops_per_core": mhz / 1000 * per_cycle, "loadavg": os.getloadavg()}


def token_lengths(port, texts):
    """Tokens the model sees per sentence, from forkserve's /v1/embeddings usage."""
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for t in texts:
        conn.request("POST", "/v1/embeddings", json.dumps({"input": [t]}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        out.append(json.loads(r.read())["usage"]["prompt_tokens"])
    conn.close()
    return out


# ---------------------------------------------------------------------------------------------
# wrk


def parse_wrk(text):
    """requests/s, latency percentiles (ms), non-2xx and socket errors from `wrk --latency`."""
    def ms(value, unit):
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    out = {"requests_per_s": None, "requests": 0, "non_2xx": 0, "socket_errors": 0, "latency_ms": {}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["requests_per_s"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = sum(int(x) for x in m.groups())
        out["socket_errors_detail"] = dict(zip(["connect", "read", "write", "timeout"], map(int, m.groups())))
    for p, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        out["latency_ms"][f"p{p}"] = ms(value, unit)
    return out


def run_wrk(server, connections, seconds):
    seen = set()
    stop = threading.Event()

    def watch():  # every worker pid seen, to count worker exits during the run
        while not stop.is_set():
            seen.update(children(server.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
           "--timeout", "30s", "-s", os.path.join(ROOT, "bench", "wrk", "cluster.lua"),
           f"http://127.0.0.1:{server.port}/cluster"]
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    stop.set()
    watcher.join()
    result = parse_wrk(text)
    alive = set(children(server.pid))
    result["worker_exits"] = len(seen - alive)
    return result


# ---------------------------------------------------------------------------------------------
# The sections


def alternate(kinds, fn):
    """Run fn(kind) for each kind, alternating, and return {kind: result}."""
    return {kind: fn(kind) for kind in kinds}


def section_startup(kinds, worker_counts, reps):
    rows = []
    for w in worker_counts:
        times = {k: [] for k in kinds}
        for _ in range(reps):
            for kind in kinds:
                load = os.getloadavg()[0]
                s = Server(kind, w)
                try:
                    times[kind].append(s.wait_first_ok())
                finally:
                    s.stop()
        rows.append({"workers": w, "load_before": load,
                     **{k: {"runs_s": v, "median_s": statistics.median(v)} for k, v in times.items()}})
        print(f"  startup w={w}: " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in times.items()), flush=True)
    return rows


def section_memory(kinds, worker_counts, requests):
    rows = []
    for w in worker_counts:
        row = {"workers": w}
        for kind in kinds:
            row.setdefault("load_before", os.getloadavg()[0])
            s = Server(kind, w)
            try:
                s.wait_first_ok()
                s.wait_all_workers()
                ready = memory(s.pid)
                failed = s.load(requests)
                after = memory(s.pid)
            finally:
                s.stop()
            row[kind] = {"after_ready": ready, "after_requests": after, "failed": failed,
                         "total_pss_kib_ready": total_pss(ready), "total_pss_kib": total_pss(after)}
        rows.append(row)
        print(f"  memory w={w}: " + ", ".join(f"{k} {row[k]['total_pss_kib'] / 1024:.0f} MiB" for k in kinds), flush=True)
    for kind in kinds:
        first, last = rows[0], rows[-1]
        if last["workers"] > first["workers"]:
            marginal = (last[kind]["total_pss_kib"] - first[kind]["total_pss_kib"]) / (last["workers"] - first["workers"])
            for r in rows:
                r[kind]["marginal_pss_kib_per_worker"] = marginal
    return rows


def section_throughput(kinds, workers, conns, max_requests_list, seconds):
    rows = []
    for mr in max_requests_list:
        for c in conns:
            row = {"workers": workers, "connections": c, "max_requests": mr, "seconds": seconds}
            for kind in kinds:
                row.setdefault("load_before", os.getloadavg()[0])
                s = Server(kind, workers, mr)
                try:
                    s.wait_first_ok()
                    s.wait_all_workers()
                    row[kind] = run_wrk(s, c, seconds)
                finally:
                    s.stop()
            rows.append(row)
            print(f"  wrk c={c} max_requests={mr}: " + ", ".join(
                f"{k} {row[k]['requests_per_s']} req/s, errors {row[k]['socket_errors']}" for k in kinds), flush=True)
    return rows


# The latency contenders: forkserve with one and with two compute threads, and the Python stack
# (torch uses every core by default). `cores` is what the % of peak is measured against.
LATENCY_SETUPS = {"forkserve": ("forkserve", 1), "forkserve 2 threads": ("forkserve", 2), "python": ("python", None)}
SHORT = "The Art of Dog Walking"  # "short": one seed title, 7 tokens with [CLS] and [SEP]


def section_latency(kinds, batches, repeats):
    setups = [name for name, (kind, _) in LATENCY_SETUPS.items() if kind in kinds]
    rows = []
    servers = {}
    try:
        for name in setups:
            kind, threads = LATENCY_SETUPS[name]
            servers[name] = Server(kind, 1, threads=threads or 1)
            servers[name].wait_first_ok()
        for n in batches:
            texts = [SHORT] if n == "short" else sentences(n)
            row = {"batch": n, "load_before": os.getloadavg()[0], "setups": setups}
            body = json.dumps({"sentences": texts}).encode()
            lengths = token_lengths(servers[setups[0]].port, texts)
            row["tokens"] = sum(lengths)
            row["gflop"] = forward_flops(lengths) / 1e9
            for name in setups:
                s = servers[name]
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
                s.post(body, conn)  # warm this batch shape
                times = []
                for _ in range(repeats):
                    t = time.monotonic()
                    assert s.post(body, conn) == 200
                    times.append((time.monotonic() - t) * 1000)
                conn.close()
                cores = LATENCY_SETUPS[name][1] or os.cpu_count()
                row[name] = {"median_ms": statistics.median(times), "runs_ms": times, "cores": cores}
            rows.append(row)
            print(f"  latency batch {n}: " + ", ".join(f"{k} {row[k]['median_ms']:.1f} ms" for k in setups), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return rows


def section_threads(combos, connections, seconds):
    """forkserve alone: requests/s under wrk for each (workers, threads) on the seed request."""
    rows = []
    for workers, threads in combos:
        s = Server("forkserve", workers, threads=threads)
        try:
            s.wait_first_ok()
            s.wait_all_workers()
            w = run_wrk(s, connections, seconds)
        finally:
            s.stop()
        rows.append({"workers": workers, "threads": threads, "connections": connections, "forkserve": w})
        print(f"  workers={workers} threads={threads}: {w['requests_per_s']} req/s, "
              f"p99 {w['latency_ms'].get('p99', 0):.0f} ms", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "–"


def report(results):
    kinds = results["kinds"]
    both = len(kinds) == 2
    lines = [f"Model: {results.get('model', 'all-MiniLM-L6-v2')}. "
             f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['cpu_model']}; "
             f"load average at start {results['machine']['loadavg'][0]:.2f}.", ""]

    def head(cols):
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---:" for _ in cols) + "|")

    if results.get("startup"):
        lines += ["### Exec to first 200 on POST /cluster (9 seed titles), median of runs", ""]
        head(["workers"] + [f"{k} s" for k in kinds] + (["forkserve / python"] if both else []))
        for r in results["startup"]:
            vals = [r[k]["median_s"] for k in kinds]
            lines.append("| " + " | ".join([str(r["workers"])] + [f"{v:.3f}" for v in vals] + ([ratio(*vals)] if both else [])) + " |")
        lines.append("")
    if results.get("memory"):
        lines += [f"### Memory after ready and after {results['memory_requests']} requests (PSS, MiB)", ""]
        cols = ["workers"]
        for k in kinds:
            cols += [f"{k} total PSS ready", f"{k} total PSS after", f"{k} per-worker USS after"]
        if both:
            cols.append("forkserve / python (after)")
        head(cols)
        for r in results["memory"]:
            cells = [str(r["workers"])]
            for k in kinds:
                uss = ", ".join(f"{(w['Private_Clean'] + w['Private_Dirty']) / 1024:.1f}" for w in r[k]["after_requests"]["workers"])
                cells += [f"{r[k]['total_pss_kib_ready'] / 1024:.1f}", f"{r[k]['total_pss_kib'] / 1024:.1f}", uss]
            if both:
                cells.append(ratio(r[kinds[0]]["total_pss_kib"], r[kinds[1]]["total_pss_kib"]))
            lines.append("| " + " | ".join(cells) + " |")
        marg = [results["memory"][0][k].get("marginal_pss_kib_per_worker") for k in kinds]
        if all(m is not None for m in marg):
            lines.append("")
            lines.append("Marginal PSS per extra worker: " + ", ".join(f"{k} {m / 1024:.1f} MiB" for k, m in zip(kinds, marg)) + ".")
        lines.append("")
    if results.get("throughput"):
        lines += ["### Throughput and latency under wrk (POST /cluster, 9 seed titles)", ""]
        cols = ["workers", "conns", "max_requests"]
        for k in kinds:
            cols += [f"{k} req/s", f"{k} p50/p90/p99 ms", f"{k} non-2xx", f"{k} socket errors", f"{k} worker exits"]
        if both:
            cols.append("forkserve / python req/s")
        head(cols)
        for r in results["throughput"]:
            cells = [str(r["workers"]), str(r["connections"]), str(r["max_requests"])]
            for k in kinds:
                x = r[k]
                lat = x["latency_ms"]
                cells += [f"{x['requests_per_s']}", "/".join(f"{lat.get(p, 0):.0f}" for p in ("p50", "p90", "p99")),
                          str(x["non_2xx"]), str(x["socket_errors"]), str(x["worker_exits"])]
            if both:
                cells.append(ratio(r[kinds[0]]["requests_per_s"], r[kinds[1]]["requests_per_s"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("threads"):
        lines += ["### Workers x compute threads (forkserve, wrk, 9 seed titles)", ""]
        head(["workers", "threads", "conns", "req/s", "p50/p90/p99 ms"])
        for r in results["threads"]:
            w, lat = r["forkserve"], r["forkserve"]["latency_ms"]
            lines.append(f"| {r['workers']} | {r['threads']} | {r['connections']} | {w['requests_per_s']} | "
                         + "/".join(f"{lat.get(p, 0):.0f}" for p in ("p50", "p90", "p99")) + " |")
        lines.append("")
    if results.get("latency"):
        lines += [f"### Single-request latency, 1 worker, median of {results['latency_repeats']} sequential requests (ms)", ""]
        m = results["machine"]
        peak = m.get("peak_gflops_per_core") or 0
        setups = results["latency"][0]["setups"]
        head(["sentences", "tokens", "GFLOP"] + [f"{k} ms" for k in setups]
             + (["forkserve / python"] if "python" in setups else [])
             + [f"{k} GFLOP/s (% of peak of its cores)" for k in setups])
        for r in results["latency"]:
            vals = [r[k]["median_ms"] for k in setups]
            gflop = r.get("gflop", 0)
            rates = []
            for k, v in zip(setups, vals):
                rate = gflop / (v / 1000)
                rates.append(f"{rate:.1f} ({100 * rate / (peak * r[k]['cores']):.0f}%)" if gflop and peak else "–")
            lines.append("| " + " | ".join([str(r["batch"]), str(r.get("tokens", "–")), f"{gflop:.2f}"] + [f"{v:.1f}" for v in vals]
                                            + ([ratio(r["forkserve"]["median_ms"], r["python"]["median_ms"])] if "python" in setups else [])
                                            + rates) + " |")
        lines.append(f"Peak: {peak:.1f} GFLOP/s per core ({m.get('mhz', 0):.0f} MHz x {m.get('flop_per_cycle', 32)} fp32 flop/cycle, "
                     f"{m.get('simd', 'AVX2 FMA')}); forkserve: one worker with 1 or 2 compute threads; Python: one worker, "
                     "torch's default intra-op threads (every core). \"short\" is one seed title. "
                     "GFLOP = 2 x non-embedding weights x tokens + attention (4·n²·hidden per layer and sentence).")
        lines.append("")
    return "\n".join(lines)


def charts(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no charts", file=sys.stderr)
        return
    kinds = results["kinds"]
    # Charts of another model than the default one get its name in front.
    model = results.get("model", "all-MiniLM-L6-v2")
    prefix = "" if model == "all-MiniLM-L6-v2" else f"{model}-"

    def bars(name, title, ylabel, groups, values):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(kinds)
        for i, k in enumerate(kinds):
            ax.bar([g + i * width for g in range(len(groups))], values[k], width, label=k)
        ax.set_xticks([g + width * (len(kinds) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, prefix + name))
        plt.close(fig)

    if results.get("startup"):
        bars("startup.png", "Exec to first 200 on /cluster", "seconds", [f"w={r['workers']}" for r in results["startup"]],
             {k: [r[k]["median_s"] for r in results["startup"]] for k in kinds})
    if results.get("memory"):
        bars("memory.png", f"Total PSS after {results['memory_requests']} requests", "MiB", [f"w={r['workers']}" for r in results["memory"]],
             {k: [r[k]["total_pss_kib"] / 1024 for r in results["memory"]] for k in kinds})
    if results.get("throughput"):
        bars("throughput.png", "Requests/s under wrk (workers=2)", "req/s",
             [f"c={r['connections']} mr={r['max_requests']}" for r in results["throughput"]],
             {k: [r[k]["requests_per_s"] or 0 for r in results["throughput"]] for k in kinds})
    if results.get("latency"):
        setups = results["latency"][0]["setups"]
        kinds[:] = setups  # bars() draws one bar per entry of `kinds`
        bars("latency.png", "Single-request latency, 1 worker", "ms", [f"{r['batch']} sent." for r in results["latency"]],
             {k: [r[k]["median_ms"] for r in results["latency"]] for k in setups})


# ---------------------------------------------------------------------------------------------


SAMPLE_WRK = """Running 20s test @ http://127.0.0.1:8000/cluster
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    60.12ms   10.01ms 215.40ms   90.00%
    Req/Sec    15.60      4.00    30.00     70.00%
  Latency Distribution
     50%   58.12ms
     75%   62.00ms
     90%   70.50ms
     99%    1.20s
  624 requests in 20.01s, 250.00KB read
  Socket errors: connect 0, read 24, write 0, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:     31.18
Transfer/sec:     12.49KB
"""

SAMPLE_SMAPS = """55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:              104536 kB
Pss:               36768 kB
Pss_Anon:           4000 kB
Shared_Clean:      99000 kB
Shared_Dirty:        500 kB
Private_Clean:       100 kB
Private_Dirty:      4436 kB
"""


def selftest():
    w = parse_wrk(SAMPLE_WRK)
    assert w["requests_per_s"] == 31.18, w
    assert w["requests"] == 624 and w["non_2xx"] == 3 and w["socket_errors"] == 24, w
    assert w["latency_ms"] == {"p50": 58.12, "p75": 62.0, "p90": 70.5, "p99": 1200.0}, w
    m = parse_smaps_rollup(SAMPLE_SMAPS)
    assert m == {"Rss": 104536, "Pss": 36768, "Private_Clean": 100, "Private_Dirty": 4436,
                 "Shared_Clean": 99000, "Shared_Dirty": 500}, m
    fake = {"kinds": ["forkserve", "python"], "machine": {"cpus": 2, "cpu_model": "x", "loadavg": (0.1, 0, 0),
                                                          "mhz": 2300.0, "peak_gflops_per_core": 73.6},
            "latency_repeats": 3,
            "latency": [{"batch": 9, "tokens": 69, "gflop": 1.47, "setups": ["forkserve", "python"],
                         "forkserve": {"median_ms": 40.0, "cores": 1}, "python": {"median_ms": 68.0, "cores": 2}}],
            "throughput": [{"workers": 2, "connections": 4, "max_requests": 0,
                            "forkserve": dict(w, worker_exits=0), "python": dict(w, worker_exits=2)}]}
    text = report(fake)
    assert "| 9 | 69 | 1.47 | 40.0 | 68.0 | 0.59 | 36.8 (50%) | 21.6 (15%) |" in text, text
    # all-MiniLM-L6-v2: 6 layers, hidden 384, intermediate 1536.
    weights = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert forward_flops([10]) == 2 * weights * 10 + 6 * 4 * 384 * 100
    assert "| 2 | 4 | 0 | 31.18 | 58/70/1200 | 3 | 24 | 0 | 31.18 | 58/70/1200 | 3 | 24 | 2 | 1.00 |" in text, text
    assert len(sentences(32)) == len(set(sentences(32))) == 32
    print("selftest: 5 passed, 0 failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="forkserve alone, one setting each (< 3 min)")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--sections", default="startup,memory,throughput,threads,latency")
    ap.add_argument("--batches", help="latency batch sizes, e.g. short,1,9,32,128")
    ap.add_argument("--out", help="name of the result files under bench/results (default bench or bench-quick)")
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="a directory under models/ (make model MODEL=...)")
    args = ap.parse_args()
    global MODEL
    MODEL = os.path.join(ROOT, "models", args.model)
    if args.selftest:
        return selftest()
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} missing: run `make build`")
    kinds = ["forkserve"] if args.quick else ["forkserve", "python"]
    if "python" in kinds and not os.path.exists(os.path.join(VENV, "bin", "gunicorn")):
        raise SystemExit(f"{VENV} missing: run `make bench` (it installs the Python stack)")
    os.makedirs(RESULTS, exist_ok=True)
    sections = args.sections.split(",")
    results = {"kinds": kinds, "machine": machine(), "quick": args.quick, "model": args.model}
    results["memory_requests"] = 100 if args.quick else 500
    results["latency_repeats"] = 10 if args.quick else 20
    t0 = time.monotonic()
    if "startup" in sections:
        print("startup", flush=True)
        results["startup"] = section_startup(kinds, [2] if args.quick else [1, 2, 4], 1 if args.quick else 3)
    if "memory" in sections:
        print("memory", flush=True)
        results["memory"] = section_memory(kinds, [1, 2] if args.quick else [1, 2, 4], results["memory_requests"])
    if "throughput" in sections:
        print("throughput", flush=True)
        if args.quick:
            results["throughput"] = section_throughput(kinds, 2, [4], [0], 10)
        else:
            results["throughput"] = section_throughput(kinds, 2, [4, 16], [0, 50], 20)
    if "threads" in sections:
        print("threads", flush=True)
        combos = [(2, 1), (1, 2)] if args.quick else [(1, 1), (1, 2), (2, 1), (2, 2)]
        results["threads"] = section_threads(combos, 4, 10 if args.quick else 15)
    if "latency" in sections:
        print("latency", flush=True)
        spec = args.batches or ("short,9" if args.quick else "short,1,9,32,128")
        batches = [b if b == "short" else int(b) for b in spec.split(",")]
        results["latency"] = section_latency(kinds, batches, results["latency_repeats"])
    results["elapsed_s"] = time.monotonic() - t0
    name = args.out or ("bench-quick" if args.quick else "bench")
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = report(results)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    if not args.quick:
        charts(results)
    print()
    print(text)
    print(f"(took {results['elapsed_s'] / 60:.1f} min; raw figures in bench/results/{name}.json)")


if __name__ == "__main__":
    sys.exit(main())
