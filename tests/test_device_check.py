"""The GPU check of issue 19 (scripts/device_check_pretrain.sh) dry-runs on the CPU with tiny
settings: every step it takes on a GPU machine (the engine's tests on the device, the benchmarks,
pretraining, torchrun) runs here with the same arguments, so that scarce device minutes are never
spent on a script that fell behind the code."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import needs_minkowski

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """The check with tiny settings on the CPU, this Python's packages (no wheels), its results in
    ``tmp_path/out`` and its work folder in ``tmp_path``."""
    env = dict(os.environ, DEVICE="cpu", SMALL="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               TMPDIR=str(tmp_path), WHEELS=str(tmp_path / "no-wheels"), **env)
    return subprocess.run(["bash", "scripts/device_check_pretrain.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_minkowski
def test_the_gpu_checks_dry_run_passes_every_step_and_writes_its_results(tmp_path):
    out = tmp_path / "out"
    before = set(Path("/tmp").glob("pretrain-check.*"))
    proc = dry_run(tmp_path, 900, OMP_NUM_THREADS="1", ONLY="cefgvdpi")  # the diagnostics too
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    assert "all steps ok (device cpu" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu"
    steps = {s["step"]: s["rc"] for s in results["steps"]}
    assert all(rc == 0 for rc in steps.values()) and len(steps) >= 8, steps
    assert any(name.startswith("(c) pytest") for name in steps)
    assert " passed" in (out / "v.log").read_text()  # (v): the variants' float64 steps
    assert any(name.startswith("(g) torchrun") for name in steps)
    assert set(results["benchmarks"]) == {"fp32", "bf16", "fp32_ieee"}  # TF32, bf16, IEEE float32
    speedups = [row["speedup"] for rows in results["benchmarks"].values() for row in rows]
    assert speedups and all(s > 0 for s in speedups)
    assert (out / "results.md").read_text().strip()
    # the pretraining runs profiled some of their steps (on the CPU: their traces, no GPU idle share)
    assert set(results["pretrain_profiles"]) == {"pretrain", "resnet18"}
    assert all(p["gpu_idle_share"] is None for p in results["pretrain_profiles"].values())
    # its work folder is in TMPDIR, nothing left in /tmp
    assert list(tmp_path.glob("pretrain-check.*")) and set(Path("/tmp").glob("pretrain-check.*")) == before


@needs_minkowski
def test_a_check_out_of_time_skips_its_steps_and_still_writes_its_report(tmp_path):
    """The device tool stops a command at 600 s and a stopped check would leave no results.json:
    each step's limit is cut to what is left of DEADLINE_S, a step without 10 s left is skipped,
    and the report is written whatever ran."""
    out = tmp_path / "out"
    proc = dry_run(tmp_path, 120, DEADLINE_S="5")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, summary
    assert "SKIP (c) pytest --device cpu (" in summary and "some steps FAILED or were skipped" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] and all(s["rc"] == 125 and s["skipped"] for s in results["steps"])
    assert {s["step"].split()[0] for s in results["steps"]} == {"(c)", "(d)", "(e)", "(f)", "(g)", "(v)"}
    assert "(skipped: no time left)" in (out / "results.md").read_text()


@needs_minkowski
def test_a_part_of_the_check_runs_alone(tmp_path):
    """A rerun on the device of what failed: ONLY names the steps by letter, PYTEST_K the tests."""
    out = tmp_path / "out"
    proc = dry_run(tmp_path, 300, OMP_NUM_THREADS="1", ONLY="c", PYTEST_K="small_blocks")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == ["(c) pytest --device cpu"]
    assert " passed" in (out / "c.log").read_text() and "deselected" in (out / "c.log").read_text()


def test_preparing_the_carried_wheels_refuses_a_missing_python_before_anything(tmp_path):
    """scripts/prepare_device_wheels.sh needs PyPI and minutes, so it runs by hand; its refusal of a
    Python it cannot find (the GPU machine's) comes first, in one line, with nothing made."""
    env = dict(os.environ, GPU_PYTHON="9.9", WHEELS=str(tmp_path / "wheels"), PYENV_ROOT=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/prepare_device_wheels.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["[device wheels] error: no Python 9.9 that runs (the GPU machine's; set GPU_PYTHON)"]
    assert not (tmp_path / "wheels").exists()


def test_the_report_judges_the_targets_eager_and_again_replayed_from_cuda_graphs(tmp_path):
    """On CUDA the check also times the sparse engine replayed from CUDA graphs and pretrains with
    cuda_graph=true: their speed-ups, idle shares and loss are judged apart from the eager run's."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import device_check_report as report
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    def records(**sparse: tuple[float, float]) -> list[dict]:
        """dense masking at 100 images/s, GPU idle 50%; each sparse engine's (speed-up, idle)"""
        out = []
        for model, ratio in [("resnet50", 0.6), ("resnet50", 0.75), ("convnext_tiny", 0.6)]:
            for pass_ in ("fwd_bwd", "train_step"):
                for engine, (speedup, idle) in {**sparse, "dense_masked": (1.0, 0.5)}.items():
                    out.append({"model": model, "batch_size": 64, "mask_ratio": ratio, "pass": pass_,
                                "engine": engine, "images_per_s": 100.0 * speedup, "median_s": 0.64 / speedup,
                                "peak_mem_mb": 100.0 if engine == "dense_masked" else 40.0, "gpu_idle_share": idle,
                                "gpu_idle_share_planned": idle, "gpu_idle_share_vs_median": idle,
                                "queue_s": 0.01, "device_name": "a GPU", "tf32": True})
        return out

    # each run on CUDA times the sparse engine a third time, replayed (cuda_graph=true)
    runs = [("fp32", {"sparse": (1.4, 0.5), "sparse_graph": (2.5, 0.02)}),
            ("bf16", {"sparse": (1.2, 0.5), "sparse_graph": (3.0, 0.01)})]
    for run, sparse in runs:
        (tmp_path / f"bench_{run}").mkdir()
        (tmp_path / f"bench_{run}" / "results.json").write_text(json.dumps(records(**sparse)))
    steps = {"(c) pytest --device cuda": 0, "(f) pretrain 200 steps": 0, "(f) pretrain 200 steps, cuda_graph=true": 0,
             "(v) pytest --device cuda, every variant": 1}  # a variant unequal on the device
    (tmp_path / "steps.jsonl").write_text("\n".join(json.dumps({"step": name, "rc": rc, "seconds": 1, "log": "x"})
                                                    for name, rc in steps.items()))
    (tmp_path / "pretrain_metrics.jsonl").write_text('{"loss": 1.2}\n{"loss": 0.7}\n')  # the graph run's: none
    # ResNet-50's pretraining steps profiled as they ran (its profile/summary.json)
    # eager, and every step replayed from a CUDA graph (profile_resnet50_graph.json)
    for run, idle in (("resnet50", 0.08), ("resnet50_graph", 0.03)):
        (tmp_path / f"profile_{run}.json").write_text(json.dumps(
            {"steps": [5, 8], "device": "cuda", "trace": "trace_steps5-8.json", "gpu_idle_share": idle,
             "gpu_busy_s_per_step": 0.1}))
    report.main(tmp_path, "cuda", 400)
    met = {t["target"]: t["met"] for t in json.loads((tmp_path / "results.json").read_text())["targets"]}
    graphed = ", sparse replayed from CUDA graphs"
    assert met["exact on the device (float64: features 1e-9, gradients 1e-6), canvas invariance, batch "
               "independence, no device mixing or host reads (pytest --device)"] is True
    assert met["every family's variants equal dense masking on the device (a float64 train step each, mask 0.6; "
               "pytest --device)"] is False
    assert met["resnet50 encoder fwd+bwd at mask 0.75: >= 2.0x dense masking"] is False
    assert met[f"resnet50 encoder fwd+bwd at mask 0.75: >= 2.0x dense masking{graphed}"] is True
    idle = "resnet50 mask 0.6: GPU idle <= 5% of a SparK step (sparse, masks planned a step ahead as pretraining does)"
    assert met[idle] is False and met[idle + graphed] is True
    assert met["resnet50 mask 0.6: peak memory <= 0.6 of dense masking's (encoder fwd+bwd)"] is True
    assert met["200 steps of pretraining on the device: the loss falls"] is True
    assert met["200 steps of pretraining with cuda_graph=true: the loss falls"] is False  # it wrote no metrics
    assert met["resnet50 pretraining, steps 5-8 as the run takes them (batch 64, decoder 768, eager): "
               "GPU idle <= 5%"] is False
    assert met["resnet50 pretraining, steps 5-8 as the run takes them (batch 64, decoder 768, replayed from a "
               "CUDA graph): GPU idle <= 5%"] is True
    md = (tmp_path / "results.md").read_text()
    assert "| resnet50 | 5-8 | 8.0% | 100.0 | trace_steps5-8.json |" in md
    assert "## Sparse vs dense masking, fp32 (TF32), the sparse engine replayed from CUDA graphs" in md
    assert "## Sparse vs dense masking, bf16 autocast, the sparse engine replayed from CUDA graphs" in md
    bf16_graph = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["bf16_graph"]
    assert {(r["model"], r["mask_ratio"], r["pass"]): round(r["speedup"], 2) for r in bf16_graph}[
        ("resnet50", 0.6, "fwd_bwd")] == 3.0
