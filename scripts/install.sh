#!/usr/bin/env bash
# Install (or upgrade) forkserve as a systemd service, from a checkout or a release tarball.
# Run as root; safe to run again: an upgrade replaces the binary and the model, keeps the
# config, and says what to reload.
#
#   scripts/install.sh                      # make install runs this
#   MODEL=all-mpnet-base-v2 scripts/install.sh
#   DESTDIR=/tmp/stage scripts/install.sh   # into a staging root (packaging, tests): no systemctl
#
# What goes where:
#   /usr/local/bin/forkserve                     the binary
#   /opt/forkserve/models/<MODEL>/               the model (replaced whole on upgrade, never nested)
#   /etc/forkserve/forkserve.toml                the config, written once with absolute paths
#   /etc/systemd/system/forkserve.{service,socket}
#   /etc/sysusers.d/forkserve.conf               the forkserve system user
#   /etc/logrotate.d/forkserve                   rotation for log.file under /var/log/forkserve
#   /usr/share/doc/forkserve/README.md           what the unit's Documentation= points to
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# A checkout has scripts/ and conf/ side by side; the release tarball has both at its top.
root=$here
[ -d "$root/conf" ] || root=$(dirname "$here")
MODEL=${MODEL:-all-MiniLM-L6-v2}
DESTDIR=${DESTDIR:-}
BIN=${BIN:-}
if [ -z "$BIN" ]; then
    for b in "$root/forkserve" "$root/target/release/forkserve"; do
        [ -x "$b" ] && BIN=$b && break
    done
fi
[ -n "$BIN" ] || { echo "install: no forkserve binary (run make build, or set BIN=)" >&2; exit 2; }

model_src=${MODEL_SRC:-$root/models/$MODEL}
if [ ! -f "$model_src/model.safetensors" ]; then
    echo "install: fetching the model $MODEL into $model_src"
    MODEL=$MODEL MODEL_DIR=$model_src "$here/fetch-model.sh"
fi

etc=$DESTDIR/etc
models=$DESTDIR/opt/forkserve/models
install -d "$DESTDIR/usr/local/bin" "$etc/forkserve" "$etc/systemd/system" "$etc/sysusers.d" \
    "$etc/logrotate.d" "$models" "$DESTDIR/usr/share/doc/forkserve"

install -m 0755 "$BIN" "$DESTDIR/usr/local/bin/forkserve.new"
mv -f "$DESTDIR/usr/local/bin/forkserve.new" "$DESTDIR/usr/local/bin/forkserve"

# The model: copied beside the old one, then swapped in by rename, so a running server keeps
# its mapped file and a reload picks up the new one whole. Never `cp -r` onto an existing
# directory (that nests the new model inside the old one, and the old one stays in use).
target=$models/$MODEL
rm -rf "$target.new" "$target.old"
mkdir -p "$target.new"
cp -R "$model_src/." "$target.new/"
[ -d "$target" ] && mv "$target" "$target.old"
mv "$target.new" "$target"
rm -rf "$target.old"

# The config: written once; an upgrade keeps the operator's edits.
config=$etc/forkserve/forkserve.toml
if [ ! -f "$config" ]; then
    sed -e "s|^path = \"models/all-MiniLM-L6-v2\"|path = \"/opt/forkserve/models/$MODEL\"|" \
        "$root/conf/forkserve.toml" > "$config.new"
    grep -q "^path = \"/opt/forkserve/models/$MODEL\"" "$config.new" \
        || { echo "install: could not set model.path in $config" >&2; exit 1; }
    chmod 0644 "$config.new"
    mv "$config.new" "$config"
    echo "install: wrote $config (model.path = /opt/forkserve/models/$MODEL)."
    echo "install: the service listens where forkserve.socket says (ListenStream=); bind in the config is not used under it."
else
    echo "install: kept $config (compare with $root/conf/forkserve.toml for new settings)."
fi

install -m 0644 "$root/conf/forkserve.service" "$root/conf/forkserve.socket" "$etc/systemd/system/"
install -m 0644 "$root/conf/forkserve.sysusers" "$etc/sysusers.d/forkserve.conf"
install -m 0644 "$root/conf/forkserve.logrotate" "$etc/logrotate.d/forkserve"
install -m 0644 "$root/README.md" "$DESTDIR/usr/share/doc/forkserve/README.md"

if [ -z "$DESTDIR" ]; then
    systemd-sysusers /etc/sysusers.d/forkserve.conf
    systemctl daemon-reload
    if systemctl is-active --quiet forkserve.service; then
        # A new binary: USR2 would keep serving through the upgrade, but a restart is the
        # simple, complete way; connections wait in the socket's queue meanwhile.
        systemctl restart forkserve.service
        echo "install: upgraded and restarted forkserve.service"
    else
        systemctl enable --now forkserve.socket forkserve.service
        echo "install: forkserve.socket and forkserve.service enabled and started"
    fi
    systemctl --no-pager status forkserve.service | head -5 || true
fi
