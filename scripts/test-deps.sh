#!/usr/bin/env bash
# What the client tests need besides Rust: a virtualenv with the official openai client,
# schemathesis and selenium (target/pyenv), and Debian's chromium + chromium-driver for the
# page test. Idempotent: does nothing once everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/pyenv
REQ=tests/clients/requirements.txt
STAMP=$VENV/.installed

if [ ! -f "$STAMP" ] || [ "$REQ" -nt "$STAMP" ]; then
    echo "installing the client-test tools into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
    touch "$STAMP"
fi

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "the page test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver" >&2
        exit 1
    fi
    echo "installing chromium and chromium-driver (Debian)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi
