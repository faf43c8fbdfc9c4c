#!/usr/bin/env bash
# Fine-tuning on a GPU machine without MinkowskiEngine (issue 14: "on CPU or CUDA, under torchrun
# too"), on the bundled photos task, in under 5 minutes:
#   (a) python -m spark_sparse.finetune, 2 epochs
#   (b) the same launched by torchrun with one process; with one process the app stays
#       single-process by design (spark_sparse/run/distributed.py), so NCCL and DDP need 2+ GPUs
#   (c) resume: a resume of (a) with more epochs is refused (epochs is fixed on resume); (a)'s
#       run stopped by Ctrl-C mid-epoch 2 and resumed must give (a)'s records (exactly on CPU;
#       cuDNN's nondeterminism may move the last digits on CUDA)
#   (d) mode=linear from a timm state dict saved on the CPU, 1 epoch
# Logs, summary.txt and every run's metrics (metrics.jsonl, one "run" key added) go to $OUT.
#
#   bash scripts/device_check_finetune.sh                       # the GPU machine: carry .whl
#   DEVICE=cpu OUT=/tmp/out PYTHON=.venv/bin/python WHEELS=/path/to/.whl ARGS=threads=1 \
#       bash scripts/device_check_finetune.sh                   # dry run on CPU (STEP_LIMIT_S=200 on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the folder for logs and metrics}"
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
ARGS=${ARGS:-}  # extra overrides for every run, e.g. threads=1
STEP_LIMIT_S=${STEP_LIMIT_S:-40}  # 6 steps: the whole check stays under 5 minutes
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
RUNS=$(mktemp -d /tmp/finetune-check.XXXXXX)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# hydra-core, omegaconf, antlr4 (and our timm) are not on the GPU image: carried as wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { say "FAIL: installing the wheels of $WHEELS"; exit 1; }
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
  say "no wheels in $WHEELS: using the installed packages"
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib.metadata as md, importlib.util, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()})")
for name in ("timm", "torchvision", "hydra-core", "omegaconf", "antlr4-python3-runtime", "numpy", "pillow",
             "scikit-image", "tqdm", "PyYAML", "huggingface-hub", "safetensors"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
import spark_sparse.finetune.app  # noqa: E402
print(f"spark_sparse from {spark_sparse.__file__}; MinkowskiEngine importable: "
      f"{importlib.util.find_spec('MinkowskiEngine') is not None}, imported by the fine-tuning app: "
      f"{'MinkowskiEngine' in sys.modules}")
EOF
[ "$DEVICE" = cuda ] && nvidia-smi -L 2>&1 | tee -a "$SUMMARY"

failed=0
# step NAME LOG EXPECTED_RC COMMAND...: run with a time limit, tee into $OUT/LOG, note rc and time
step() {
  local name=$1 log=$2 expected=$3 start rc
  shift 3
  start=$(date +%s)
  echo "\$ $*" >>"$OUT/$log"
  timeout -k 10 "$STEP_LIMIT_S" "$@" 2>&1 | tee -a "$OUT/$log"
  rc=$?
  if [ "$rc" = "$expected" ]; then
    say "ok   $name (rc $rc, $(($(date +%s) - start)) s)"
  else
    say "FAIL $name (rc $rc, expected $expected, $(($(date +%s) - start)) s; see $log)"
    failed=1
  fi
}

# 10 steps an epoch (320 crops of the 20 photos, batch 32); the lr of `make finetune`
COMMON=(device="$DEVICE" logger=none optim.lr=0.02 epochs=2 $ARGS)
step "(a) finetune, 2 epochs" a.log 0 \
  "$PY" -m spark_sparse.finetune "${COMMON[@]}" hydra.run.dir="$RUNS/a"
step "(b) torchrun, 1 process (no process group)" b.log 0 \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m spark_sparse.finetune "${COMMON[@]}" \
  hydra.run.dir="$RUNS/b"
step "(c) resume of (a) with epochs=3 refused" c.log 1 \
  "$PY" -m spark_sparse.finetune "${COMMON[@]}" epochs=3 resume=true hydra.run.dir="$RUNS/a"
grep -q "resume=true with a different epochs" "$OUT/c.log" || { say "FAIL (c): the refusal does not name epochs"; failed=1; }
step "(c) (a) stopped by Ctrl-C at step 14" c.log 130 \
  env STOP_AT_STEP=14 "$PY" tests/finetune_stopped.py "${COMMON[@]}" hydra.run.dir="$RUNS/c"
step "(c) ... resumed" c.log 0 \
  "$PY" -m spark_sparse.finetune "${COMMON[@]}" resume=true hydra.run.dir="$RUNS/c"
"$PY" -c "import timm, torch; torch.save(timm.create_model('resnet18', num_classes=0).state_dict(), '$RUNS/r18.pth')"
step "(d) linear, 1 epoch, pretrained=a timm state dict" d.log 0 \
  "$PY" -m spark_sparse.finetune mode=linear device="$DEVICE" logger=none epochs=1 pretrained="$RUNS/r18.pth" $ARGS \
  hydra.run.dir="$RUNS/d"

"$PY" - "$RUNS" "$OUT/metrics.jsonl" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
records = {}
with out.open("w") as f:
    for run in "abcd":
        path = runs / run / "metrics.jsonl"
        records[run] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for r in records[run]:
            f.write(json.dumps({"run": run, **r}) + "\n")
        print(f"({run}) epochs {[r['epoch'] for r in records[run]]}, val top-1 {[r['val_top1'] for r in records[run]]}, "
              f"train loss {[round(r['train_loss'], 4) for r in records[run]]}")
keys = ("train_loss", "val_top1", "val_loss", "ema_top1")
for run, name in (("c", "resumed"), ("b", "torchrun")):
    same = len(records[run]) == len(records["a"]) == 2
    diff = max((abs(x[k] - y[k]) for x, y in zip(records[run], records["a"]) for k in keys), default=float("nan"))
    print(f"({run}) {name} vs (a): {'same epochs' if same else 'DIFFERENT epochs'}, max |difference| over {keys}: {diff:.3g}")
EOF
say "$([ $failed = 0 ] && echo 'all steps ok' || echo 'some steps FAILED') (device $DEVICE, runs in $RUNS)"
exit $failed
