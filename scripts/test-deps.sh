#!/usr/bin/env bash
# What the tests need besides Rust: a virtualenv (target/pyenv) with the official openai
# client, schemathesis, selenium, hadolint and PyYAML, and the Debian packages below.
# Idempotent: does nothing once everything is there.
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

# Debian packages: chromium for the page test; systemd for systemd-analyze and
# systemd-socket-activate (tests/systemd.rs); make for the Makefile test.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v systemd-analyze >/dev/null && command -v systemd-socket-activate >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "the tests need Debian's ${missing[*]}: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (Debian)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
