#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: system BLAS, .venv with the pinned packages of
# requirements.txt, and MinkowskiEngine built (or taken from the wheel cache) by
# scripts/build_minkowski.py. `make pretrain` and `make test` both call it.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

# CPython 3.11 (CI's) or 3.12 (Ubuntu 24.04's python3, the GPU image's): the pins have wheels for
# both and MinkowskiEngine builds on both (from 3.12 without the standard library's distutils).
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if "$candidate" -c "" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
[ -n "$PYTHON" ] || die "no python3 found; install CPython 3.11 or 3.12"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case $pyver in
  3.11|3.12) ;;
  *) die "$PYTHON is Python $pyver; spark-sparse pins torch 2.14.1 for Python 3.11 or 3.12 (set PYTHON=...)" ;;
esac

if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "libopenblas-dev is missing and apt-get is not available; install OpenBLAS development files by hand"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo -n true 2>/dev/null || die "libopenblas-dev is missing; run 'sudo apt-get install libopenblas-dev' once"
    sudo="sudo -n"
  fi
  say "installing Debian's libopenblas-dev (MinkowskiEngine's CPU BLAS)"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libopenblas-dev >/dev/null || die "apt-get install libopenblas-dev failed"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv || die "could not create .venv"
fi

stamp=.venv/requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the pinned packages of requirements.txt (torch is a large wheel; first time takes minutes)"
  .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt \
    || die "pip could not install requirements.txt (see the messages above)"
  echo "$want" > "$stamp"
else
  say "pinned packages already installed"
fi

.venv/bin/python scripts/build_minkowski.py
say "environment ready: .venv"
