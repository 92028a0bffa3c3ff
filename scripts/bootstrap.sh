#!/usr/bin/env bash
# Set up asm on a fresh machine: a virtualenv in .venv with asm and its dev tools.
# Needs python3 (>= 3.11) with venv; installs everything else from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "bootstrap: need Python >= 3.11 (set PYTHON=...)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || {
    # Debian/Ubuntu ship venv separately.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && "$PY" -m venv .venv
    else
      echo "bootstrap: python venv module missing (install python3-venv)" >&2; exit 2
    fi
  }
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "bootstrap: asm $(.venv/bin/asm --version | cut -d' ' -f2) installed in .venv" >&2
