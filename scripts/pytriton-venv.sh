#!/usr/bin/env bash
# make .venv-pytriton: a virtual environment holding nvidia-pytriton, for the real tritonserver binary its wheel ships
# (Triton 2.51.0), which tests/triton_server starts on model_repo/. Idempotent: a venv already at the pin is left as it is.
#
#   bash scripts/pytriton-venv.sh [VENV]    (VENV defaults to .venv-pytriton)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv-pytriton}
# Debian's own interpreter, never another python3.11 on PATH (pyenv's, say): PyTriton's Python backend stub links the
# system libpython3.11.so.1.
PYTHON=/usr/bin/python3.11
# The newest release. 0.5.13 to 0.7.0 ship the same tritonserver binary (server_version 2.51.0); the wheel is 53 MiB.
PYTRITON_VERSION=0.7.0

fail() { printf 'pytriton-venv: %s\n' "$*" >&2; exit 1; }

installed_version() {  # the venv's nvidia-pytriton version, empty when it has none
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('nvidia-pytriton'))" 2>/dev/null || true
}

made_by_debian_python() {  # the venv's base interpreter is $PYTHON's installation
    [ "$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix, sys.version_info[:2] == (3, 11))')" = "/usr True" ]
}

[ -x "$PYTHON" ] || fail "no $PYTHON: apt-get install python3.11 python3.11-venv (Debian's, for its libpython)"
if [ -x "$VENV/bin/python" ] && ! made_by_debian_python; then
    echo "pytriton-venv: $VENV was made by another interpreter; recreating it with $PYTHON"
    "$PYTHON" -m venv --clear "$VENV"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if [ "$(installed_version)" != "$PYTRITON_VERSION" ]; then
    timeout 600 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nvidia-pytriton==$PYTRITON_VERSION"
fi
[ "$(installed_version)" = "$PYTRITON_VERSION" ] || fail "nvidia-pytriton $PYTRITON_VERSION did not install in $VENV"
echo "pytriton-venv: $VENV has nvidia-pytriton $PYTRITON_VERSION"
