#!/usr/bin/env bash
# Fill the wheel folder the GPU check carries (run(command="OUT=$OUT bash
# scripts/device_check_pretrain.sh", carry=[".whl"])) on a machine that reaches PyPI, so that the
# GPU machine (no network; Python 3.12, torch 2.11) installs in seconds what its image lacks
# instead of compiling MinkowskiEngine in its device minutes:
#   * the wheels of requirements.txt's hydra-core and timm (with omegaconf and antlr4, as
#     hydra-core 1.3.8 pins them) and scipy-openblas32 (the CBLAS of MinkowskiEngine's CPU build);
#   * MinkowskiEngine 0.5.4's source package (the check builds from it if the wheel fails there);
#   * that source built for the GPU machine's Python and torch, in a venv of them ($VENV, made once:
#     pip takes torch's CUDA build from PyPI, some GB) with build_minkowski.py's patches, then
#     installed beside scipy-openblas32 into a fresh folder and imported, as the check will.
# About 15 minutes on 2 cores, most of it the compile: start it first in a session lent a GPU.
# What $WHEELS already holds is kept (delete the folder to refresh it).
#
#   bash scripts/prepare_device_wheels.sh    # GPU_PYTHON=3.12 GPU_TORCH=2.11.0 WHEELS=.whl VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_PYTHON=${GPU_PYTHON:-3.12}
GPU_TORCH=${GPU_TORCH:-2.11.0}
WHEELS=${WHEELS:-.whl}
VENV=${VENV:-${TMPDIR:-/tmp}/device-venv-py$GPU_PYTHON-torch$GPU_TORCH}
ME=MinkowskiEngine==0.5.4
say() { echo "[device wheels] $*"; }
pin() { sed -n "s/^$1==//p" requirements.txt; }

# the GPU machine's Python: on PATH, or one of pyenv's (whose shim on PATH may not run it)
PY=
for candidate in "python$GPU_PYTHON" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$GPU_PYTHON".*/bin/python"$GPU_PYTHON"; do
  if "$candidate" -c "" >/dev/null 2>&1; then PY=$(command -v "$candidate"); break; fi
done
[ -n "$PY" ] || { say "error: no Python $GPU_PYTHON that runs (the GPU machine's; set GPU_PYTHON)"; exit 1; }
bash scripts/setup.sh >/dev/null  # .venv: its pip fetches MinkowskiEngine's source package below
mkdir -p "$WHEELS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-wheels.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

say "pure wheels for Python $GPU_PYTHON into $WHEELS"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" \
  "hydra-core==$(pin hydra-core)" omegaconf==2.3.1 "timm==$(pin timm)" scipy-openblas32
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3  # a source package only: pure Python
if ! compgen -G "$WHEELS/MinkowskiEngine-0.5.4.tar.gz" >/dev/null; then
  say "MinkowskiEngine's source package"
  # pip reads the old setup.py's metadata, which imports torch: the project's venv has it
  SETUPTOOLS_USE_DISTUTILS=stdlib .venv/bin/python -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation -d "$WHEELS" "$ME"
fi

TAG=cp${GPU_PYTHON/./}
if compgen -G "$WHEELS/minkowskiengine-0.5.4-$TAG-*.whl" >/dev/null; then
  say "a MinkowskiEngine wheel for $TAG is there already: not built"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "a venv of Python $GPU_PYTHON and torch $GPU_TORCH: $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "torch==$GPU_TORCH" numpy setuptools wheel ninja
  fi
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/scipy_openblas32-*.whl
  say "building MinkowskiEngine for $TAG and torch $GPU_TORCH (minutes)"
  "$VENV/bin/python" scripts/build_minkowski.py --source "$WHEELS/MinkowskiEngine-0.5.4.tar.gz" \
    --scipy-openblas "$WORK/site" --out "$WORK/me"
  cp "$WORK"/me/*.whl "$WHEELS/"
fi

# the GPU check's own install and import: the wheel and scipy-openblas32 into one fresh folder
"$VENV/bin/python" -m pip install -q --no-index --no-deps --target "$WORK/check" \
  "$WHEELS"/scipy_openblas32-*.whl "$WHEELS"/minkowskiengine-0.5.4-"$TAG"-*.whl
(cd "$WORK" && PYTHONPATH="$WORK/check" "$VENV/bin/python" -W ignore -c \
  "import torch, MinkowskiEngine as ME; print('[device wheels] MinkowskiEngine', ME.__version__, 'imports with torch', torch.__version__)")
say "ready: carry $WHEELS ($(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1))"
