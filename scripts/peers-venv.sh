#!/usr/bin/env bash
# make the virtual environment of one peer server of `srvit bench` (bench/peers/): each framework in a venv of its own,
# so that their pins never meet srvit's or each other's. Every venv holds the onnxruntime, numpy and Pillow that
# srvit's .venv has, so that only the serving framework differs between the peers. Idempotent: a venv that already
# holds every pin is left as it is.
#
#   bash scripts/peers-venv.sh PEER [VENV]    (PEER: naive, ray, bentoml, litserve or pytriton;
#                                              VENV defaults to .venv-peers/PEER)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'peers-venv: %s\n' "$*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: bash scripts/peers-venv.sh PEER [VENV]"
PEER=$1
VENV=${2:-.venv-peers/$PEER}

# srvit's own versions (its .venv): the same ONNX Runtime, the same decoder, the same arrays in every peer.
COMMON=(onnxruntime==1.32.0 numpy==2.4.6 pillow==13.0.0)
PYTHON=python3  # any CPython 3.11
case $PEER in
    # srvit's own web stack at .venv's versions: a plain FastAPI app, no batching.
    naive) PINS=(fastapi==0.165.0 uvicorn==0.54.0 python-multipart==0.0.34) ;;
    ray) PINS=("ray[serve]==2.60.0") ;;
    bentoml) PINS=(bentoml==1.4.40) ;;
    # python-multipart (.venv's version): LitServe documents file uploads as forms, which Starlette parses with it,
    # yet does not require it.
    litserve) PINS=(litserve==0.2.19 python-multipart==0.0.34) ;;
    # Debian's own interpreter, never another python3.11 on PATH (pyenv's, say): PyTriton's Python backend stub
    # links the system libpython3.11.so.1, and a model served from another 3.11 build fails to load.
    # numpy 1.26.4, not 2.4.6: nvidia-pytriton 0.7.0 (its newest) requires numpy<2, and 1.26.4 is the newest 1.x;
    # onnxruntime 1.32.0 (numpy>=1.21.6) and Pillow run on it unchanged.
    pytriton) PINS=(nvidia-pytriton==0.7.0); COMMON[1]=numpy==1.26.4; PYTHON=/usr/bin/python3.11 ;;
    *) fail "unknown peer '$PEER' (naive, ray, bentoml, litserve or pytriton)" ;;
esac
PINS+=("${COMMON[@]}")

missing_pins() {  # the pins the venv does not hold at their version, one a line; all of them when it has no python
    "$VENV/bin/python" - "${PINS[@]}" 2>/dev/null <<'EOF' || printf '%s\n' "${PINS[@]}"
import importlib.metadata as m
import re
import sys

for pin in sys.argv[1:]:
    name, version = re.fullmatch(r"([\w.-]+)(?:\[[\w,]+\])?==(.+)", pin).groups()  # "ray[serve]" is "ray"'s
    try:
        ok = m.version(name) == version
    except m.PackageNotFoundError:
        ok = False
    if not ok:
        print(pin)
EOF
}

made_by_python() {  # the venv is 3.11 and, for pytriton, made by Debian's interpreter itself
    local want base
    want=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
    base=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix, sys.version_info[:2] == (3, 11))')
    if [ "$PEER" = pytriton ]; then [ "$base" = "$want True" ]; else [ "${base##* }" = True ]; fi
}

command -v "$PYTHON" >/dev/null || fail "no $PYTHON (for pytriton: apt-get install python3.11 python3.11-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || fail "$PYTHON is not Python 3.11"
if [ -x "$VENV/bin/python" ] && ! made_by_python; then
    echo "peers-venv: $VENV was made by another interpreter; recreating it with $PYTHON"
    "$PYTHON" -m venv --clear "$VENV"
fi
[ -x "$VENV/bin/python" ] || { mkdir -p "$(dirname "$VENV")"; "$PYTHON" -m venv "$VENV"; }
if [ -n "$(missing_pins)" ]; then
    # All pins in one resolve: pip either satisfies them together or says which of them clash.
    timeout 900 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi
missing=$(missing_pins)
[ -z "$missing" ] || fail "$VENV lacks $(echo "$missing" | tr '\n' ' ')after pip install"
echo "peers-venv: $VENV has ${PINS[*]}"
