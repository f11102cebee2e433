#!/usr/bin/env bash
# What `make bench` needs: the Python stack in target/bench-venv (torch, sentence-transformers,
# FastAPI, uvicorn, gunicorn, matplotlib; from PyPI, pinned in bench/python/requirements.txt)
# and Debian's wrk. Idempotent. `--quick` needs only wrk.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "the benchmark needs wrk: apt-get install wrk" >&2
        exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >&2
fi
[ "${1:-}" = "--quick" ] && exit 0

VENV=target/bench-venv
REQ=bench/python/requirements.txt
if [ ! -f "$VENV/.installed" ] || [ "$REQ" -nt "$VENV/.installed" ]; then
    echo "installing the Python stack into $VENV (torch is large: a few minutes the first time)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
    touch "$VENV/.installed"
fi
