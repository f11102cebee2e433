#!/usr/bin/env python3
"""Requests lost during the operations ops perform on a live server, and how long an upgrade
takes. Clients are plain keep-alive HTTP/1.1 connections that never retry (a POST cannot be
retried safely), reconnecting only when the server says `Connection: close`.

    python3 bench/ops.py        # recycle, HUP roll, USR2 upgrade; prints a table, writes JSON
"""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "forkserve")
MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
BODY = json.dumps({"sentences": ["The Art of Dog Walking", "Learn The Art of Public Speaking"]}).encode()


class Clients:
    """`n` client threads sending until `limit` requests are done or `stop()` is called."""

    def __init__(self, port, n, limit=None):
        self.port, self.limit = port, limit
        self.sent = self.ok = 0
        self.errors = []
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self.run) for _ in range(n)]
        for t in self.threads:
            t.start()

    def take(self):
        with self.lock:
            if not self.running or (self.limit is not None and self.sent >= self.limit):
                return False
            self.sent += 1
            return True

    def run(self):
        conn = None
        while self.take():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                conn.request("POST", "/cluster", BODY, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                with self.lock:
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.errors.append(f"status {r.status}")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.errors.append(repr(e))
                conn.close()
                conn = None

    def stop(self):
        self.running = False
        return self.join()

    def join(self):
        for t in self.threads:
            t.join()
        return {"sent": self.sent, "ok": self.ok, "failed": len(self.errors), "errors": self.errors[:5]}


class Server:
    def __init__(self, conf_text):
        self.dir = tempfile.mkdtemp(prefix="forkserve-ops-")
        self.conf = os.path.join(self.dir, "forkserve.toml")
        self.write(conf_text)
        self.log = os.path.join(self.dir, "stderr.log")
        self.proc = subprocess.Popen([BIN, "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"), cwd=ROOT)
        self.port = int(self.wait(r"listening at: http://127\.0\.0\.1:(\d+)").group(1))

    def write(self, text):
        with open(self.conf, "w") as f:
            f.write(f'bind = "127.0.0.1:0"\n{text}\n[model]\npath = "{MODEL}"\n')

    def text(self):
        return open(self.log).read()

    def wait(self, pattern, count=1, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.005)
        raise SystemExit(f"timed out waiting for {pattern!r}:\n{self.text()}")

    def stop(self, pid=None):
        os.kill(pid or self.proc.pid, signal.SIGTERM)
        if pid is None:
            self.proc.wait(timeout=60)


def recycle():
    s = Server("workers = 2\nmax_requests = 20")
    s.wait("worker ready", 2)
    r = Clients(s.port, 8, limit=1000).join()
    r["recycles"] = len(re.findall("retired after max_requests", s.text()))
    s.stop()
    return r


def under_load(conf):
    """A server with its workers ready and 8 clients sending for 2 s already."""
    s = Server(conf)
    s.wait("worker ready", 2)
    c = Clients(s.port, 8)
    time.sleep(2)
    return s, c


def hup_roll():
    s, c = under_load("workers = 2")
    # A setting the workers use, so that every worker is replaced (the worker count alone
    # only adds one: the running workers keep serving).
    s.write("workers = 3\n[cluster]\nthreshold = 0.55")
    os.kill(s.proc.pid, signal.SIGHUP)
    s.wait("retired by a reload", 2)
    time.sleep(2)
    r = c.stop()
    s.stop()
    return r


def usr2_upgrade():
    s, c = under_load("workers = 2")
    t0 = time.monotonic()
    os.kill(s.proc.pid, signal.SIGUSR2)
    new_master = int(s.wait(r"started a new master.*new_master=(\d+)").group(1))
    s.wait("worker ready", 4)
    ready_s = time.monotonic() - t0
    time.sleep(1)
    os.kill(s.proc.pid, signal.SIGQUIT)
    s.proc.wait(timeout=60)
    time.sleep(2)
    r = c.stop()
    r["usr2_to_new_workers_ready_s"] = round(ready_s, 3)
    s.stop(new_master)
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{new_master}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return r


def main():
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} missing: run `make build`")
    results = {"recycle (max_requests=20, 1000 requests, concurrency 8)": recycle(),
               "HUP roll (2 -> 3 workers, concurrency 8)": hup_roll(),
               "USR2 upgrade then QUIT old master (concurrency 8)": usr2_upgrade()}
    print("| operation | requests | failed |")
    print("|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['sent']} | {r['failed']} |")
    u = results["USR2 upgrade then QUIT old master (concurrency 8)"]
    print(f"\nUSR2 to the new master's workers ready: {u['usr2_to_new_workers_ready_s']} s")
    out = os.path.join(ROOT, "bench", "results", "ops.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"raw figures: {os.path.relpath(out, ROOT)}")
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
