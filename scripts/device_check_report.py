"""results.json and results.md of scripts/device_check_pretrain.sh, from the folder it wrote.

    python scripts/device_check_report.py OUT DEVICE SECONDS

Reads OUT/steps.jsonl (each step's exit status and time), the two benchmark runs
(OUT/bench_fp32, OUT/bench_bf16: benchmarks.sparse_vs_dense's results.json), the long
pretraining's metrics, the pretraining runs' profiled steps (OUT/profile_<run>.json, their
profile/summary.json) and the logs of the table benchmark and the torchrun checks, and sets the
measured figures against issue 19's targets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (model, mask ratio): the encoder fwd+bwd speed-up the issue asks for, at batch 64
SPEEDUP_TARGETS = {("resnet50", 0.6): 1.5, ("resnet50", 0.75): 2.0, ("convnext_tiny", 0.6): 1.3}
MEMORY_TARGET = 0.6  # sparse peak CUDA memory / dense masking's, encoder fwd+bwd
IDLE_TARGET = 0.05  # the GPU's idle share of a whole SparK step
# the benchmark's runs (OUT/bench_<run>): the targets are judged on fp32's, whose float32 convolutions
# and GEMMs run in TF32 on CUDA (the benchmark's default), fp32_ieee's in IEEE float32
RUNS = {"fp32": "fp32 (on CUDA: TF32 for both engines' convolutions and GEMMs)",
        # the fp32 run's third engine on CUDA (cuda_graph=true), paired with its dense masking
        "fp32_graph": "fp32 (TF32), the sparse engine replayed from CUDA graphs (cuda_graph=true)",
        "bf16": "bf16 autocast",
        # the bf16 run's, likewise: how a GPU pretraining runs (precision=bf16 cuda_graph=true)
        "bf16_graph": "bf16 autocast, the sparse engine replayed from CUDA graphs (cuda_graph=true)",
        "fp32_ieee": "fp32, IEEE float32 (tf32=false)"}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bench(out: Path, precision: str) -> list[dict]:
    path = out / f"bench_{precision}" / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


def pairs(records: list[dict], sparse: str = "sparse") -> list[dict]:
    """One row per (model, batch, mask ratio, pass) with both engines (``sparse``: the sparse
    engine's records to pair, "sparse_graph" for those replayed from CUDA graphs)."""
    rows: dict[tuple, dict] = {}
    for r in records:
        row = rows.setdefault((r["model"], r["batch_size"], r["mask_ratio"], r["pass"]), {})
        row[r["engine"]] = r
    out = []
    for (model, batch, ratio, pass_), e in rows.items():
        if {sparse, "dense_masked"} <= e.keys():
            s, d = e[sparse], e["dense_masked"]
            mem = s["peak_mem_mb"] / d["peak_mem_mb"] if s["peak_mem_mb"] and d["peak_mem_mb"] else None
            out.append({"model": model, "batch_size": batch, "mask_ratio": ratio, "pass": pass_,
                        "sparse_images_per_s": s["images_per_s"], "dense_images_per_s": d["images_per_s"],
                        "speedup": s["images_per_s"] / d["images_per_s"], "memory_ratio": mem,
                        "sparse_peak_mb": s["peak_mem_mb"], "dense_peak_mb": d["peak_mem_mb"],
                        "sparse_gpu_idle": s.get("gpu_idle_share"), "dense_gpu_idle": d.get("gpu_idle_share"),
                        # whole steps with each mask planned during the step before, as pretraining runs
                        "sparse_gpu_idle_planned": s.get("gpu_idle_share_planned"),
                        "dense_gpu_idle_planned": d.get("gpu_idle_share_planned"),
                        "sparse_gpu_idle_vs_median": s.get("gpu_idle_share_vs_median"),
                        "dense_gpu_idle_vs_median": d.get("gpu_idle_share_vs_median"),
                        # the CPU's time to queue a pass against the pass's time: near 1, launch-bound
                        "sparse_queue_share": _share(s.get("queue_s"), s["median_s"]),
                        "dense_queue_share": _share(d.get("queue_s"), d["median_s"]),
                        # the CPU's time to plan the next mask within each pass, as pretraining does
                        "sparse_plan_s": s.get("plan_s")})
    return out


def _share(part: float | None, whole: float) -> float | None:
    return None if part is None else part / whole


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def speed_targets(rows: list[dict], how: str = "") -> list[dict]:
    """The encoder speed-ups and the SparK step's GPU idle share of one benchmark run (``how``:
    how its sparse engine ran, appended to each target)."""
    checks = []
    by = {(r["model"], r["mask_ratio"], r["pass"]): r for r in rows}
    for (model, ratio), want in SPEEDUP_TARGETS.items():
        r = by.get((model, ratio, "fwd_bwd"))
        checks.append({"target": f"{model} encoder fwd+bwd at mask {ratio}: >= {want}x dense masking{how}",
                       "measured": None if r is None else f"{r['speedup']:.2f}x",
                       "met": None if r is None else r["speedup"] >= want})
    for r in rows:
        if r["pass"] == "train_step" and r["model"] == "resnet50" and r["sparse_gpu_idle"] is not None:
            # judged as pretraining runs its steps: each mask planned during the step before
            idle = r.get("sparse_gpu_idle_planned")
            idle = r["sparse_gpu_idle"] if idle is None else idle
            checks.append({"target": f"resnet50 mask {r['mask_ratio']}: GPU idle <= {IDLE_TARGET:.0%} of a SparK step "
                                     f"(sparse, masks planned a step ahead as pretraining does){how}",
                           "measured": f"{idle:.1%} profiled ({r['sparse_gpu_idle']:.1%} with each step making "
                                       f"its tables), {fmt(r['sparse_gpu_idle_vs_median'], '.1%')} against the median",
                           "met": idle <= IDLE_TARGET})
    return checks


def profiles(out: Path) -> dict[str, dict]:
    """The pretraining runs' profiled steps by run (``profile_<run>.json``: a family's name,
    resnet50_graph for ResNet-50's replayed steps, pretrain / pretrain_graph for the 200-step runs)."""
    return {path.stem.removeprefix("profile_"): json.loads(path.read_text())
            for path in sorted(out.glob("profile_*.json"))}


def idle_target(profiled: dict[str, dict]) -> list[dict]:
    """The GPU's idle share of whole pretraining steps of ResNet-50 (batch 64, decoder 768, as the
    issue's SparK step), data, optimizer and logging included, where the check profiled them: eager
    and (CUDA) every step replayed from a CUDA graph."""
    checks = []
    for run, how in (("resnet50", "eager"), ("resnet50_graph", "replayed from a CUDA graph")):
        p = profiled.get(run)
        if p is not None and p.get("gpu_idle_share") is not None:
            checks.append({"target": f"resnet50 pretraining, steps {p['steps'][0]}-{p['steps'][1]} as the run takes "
                                     f"them (batch 64, decoder 768, {how}): GPU idle <= {IDLE_TARGET:.0%}",
                           "measured": f"{p['gpu_idle_share']:.1%}", "met": p["gpu_idle_share"] <= IDLE_TARGET})
    return checks


def targets(rows: list[dict], steps: dict, losses: list[float], graph_rows: list[dict] | None = None,
            graph_losses: list[float] | None = None, profiled: dict[str, dict] | None = None) -> list[dict]:
    """The issue's targets against what the fp32 benchmark and the steps measured; where the check
    ran them (CUDA), the same speed targets and a falling loss with every step replayed from a
    CUDA graph, as pretraining runs with cuda_graph=true."""
    checks = [{"target": "exact on the device (float64: features 1e-9, gradients 1e-6), canvas invariance, "
                         "batch independence, no device mixing or host reads (pytest --device)",
               "measured": f"rc {steps.get('(c) pytest', {}).get('rc', 'not run')}",
               "met": steps.get("(c) pytest", {}).get("rc") == 0}]
    if "(v) pytest" in steps:  # not an issue target: every family on the device, where time was left for it
        checks.append({"target": "every family's variants equal dense masking on the device (a float64 train step "
                                 "each, mask 0.6; pytest --device)",
                       "measured": f"rc {steps['(v) pytest']['rc']}", "met": steps["(v) pytest"]["rc"] == 0})
    checks += speed_targets(rows)
    for r in rows:
        if r["pass"] == "fwd_bwd" and r["memory_ratio"] is not None:
            checks.append({"target": f"{r['model']} mask {r['mask_ratio']}: peak memory <= {MEMORY_TARGET} of "
                                     "dense masking's (encoder fwd+bwd)",
                           "measured": f"{r['memory_ratio']:.2f}", "met": r["memory_ratio"] <= MEMORY_TARGET})
    checks.append(falling(losses, "200 steps of pretraining on the device: the loss falls"))
    checks += idle_target(profiled or {})
    if graph_rows:
        checks += speed_targets(graph_rows, ", sparse replayed from CUDA graphs")
    if graph_losses is not None:
        checks.append(falling(graph_losses, "200 steps of pretraining with cuda_graph=true: the loss falls"))
    return checks


def falling(losses: list[float], target: str) -> dict:
    return {"target": target, "measured": f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no metrics",
            "met": len(losses) >= 2 and losses[-1] < losses[0]}


def markdown(result: dict) -> str:
    lines = ["# Sparse engine on CUDA with MinkowskiEngine's CPU build (issue 19)", "",
             f"{result['environment']}", "", f"Whole check: {result['seconds']} s.", "", "## Targets", "",
             "| target | measured | met |", "|---|---|---|"]
    for c in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[c["met"]]
        lines.append(f"| {c['target']} | {c['measured'] or 'n/a'} | {met} |")
    for run, rows in result["benchmarks"].items():
        if not rows:
            continue
        lines += ["", f"## Sparse vs dense masking, {RUNS[run]}", "",
                  "| model | batch | mask | pass | dense img/s | sparse img/s | speed-up | peak MiB sparse/dense "
                  "| GPU idle dense / sparse | planned ahead | CPU queueing dense / sparse | sparse planning ms |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            mem = (f"{fmt(r['memory_ratio'], '.2f')} ({fmt(r['sparse_peak_mb'], '.0f')}/"
                   f"{fmt(r['dense_peak_mb'], '.0f')})")
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['mask_ratio']} | {r['pass']} | "
                         f"{r['dense_images_per_s']:.1f} | {r['sparse_images_per_s']:.1f} | {r['speedup']:.2f}x | "
                         f"{mem} | {fmt(r['dense_gpu_idle'], '.1%')} / {fmt(r['sparse_gpu_idle'], '.1%')} | "
                         f"{fmt(r.get('dense_gpu_idle_planned'), '.1%')} / {fmt(r.get('sparse_gpu_idle_planned'), '.1%')} | "
                         f"{fmt(r.get('dense_queue_share'), '.0%')} / {fmt(r.get('sparse_queue_share'), '.0%')} | "
                         f"{fmt(_ms(r.get('sparse_plan_s')), '.1f')} |")
    if result.get("pretrain_profiles"):
        lines += ["", "## Pretraining's own steps, profiled (data, optimizer and logging included)", "",
                  "| run | steps | GPU idle | GPU busy a step (ms) | trace |", "|---|---|---:|---:|---|"]
        for run, p in result["pretrain_profiles"].items():
            lines.append(f"| {run} | {p['steps'][0]}-{p['steps'][1]} | {fmt(p.get('gpu_idle_share'), '.1%')} | "
                         f"{fmt(_ms(p.get('gpu_busy_s_per_step')), '.1f')} | {p['trace']} |")
    lines += ["", "## A batch's CPU work (benchmarks.batch_tables)", "", result["batch_tables"] or "not measured",
              "", "## Convolution paths per layer (benchmarks.conv_paths)", "", result["conv_paths"] or "not measured",
              "", "## torchrun", ""] + [f"- {line}" for line in result["torchrun"] or ["not run"]]
    lines += ["", "## Steps", "", "| step | rc | s |", "|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['rc']}{' (skipped: no time left)' if s.get('skipped') else ''} | {s['seconds']} |"
              for s in result["steps"]]
    return "\n".join(lines) + "\n"


def main(out: Path, device: str, seconds: int) -> None:
    steps = read_jsonl(out / "steps.jsonl")
    by_step = {}
    for s in steps:  # by the name's start, e.g. "(c) pytest"
        by_step[" ".join(s["step"].split()[:2])] = s
    metrics = read_jsonl(out / "pretrain_metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    tables = (out / "d.log").read_text() if (out / "d.log").exists() else ""
    table = "\n".join(line for line in tables.splitlines() if line.startswith("|") or line.startswith("batch "))
    paths = "\n\n".join((out / log).read_text() for log in ("d_paths.log", "d_paths_dw.log") if (out / log).exists())
    paths = "\n".join(line for line in paths.splitlines()
                      if not line or line.startswith(("|", "total:", "depthwise total", "resnet", "convnext")))
    torchrun = [line.strip() for log in sorted(out.glob("g*.log")) for line in log.read_text().splitlines()
                if "process(es) on" in line]
    summary = (out / "summary.txt").read_text().splitlines() if (out / "summary.txt").exists() else []
    environment = next((line for line in summary if line.startswith("python ")), "environment not recorded")
    fp32, bf16 = bench(out, "fp32"), bench(out, "bf16")
    runs = {"fp32": pairs(fp32), "bf16": pairs(bf16), "fp32_graph": pairs(fp32, "sparse_graph"),
            "bf16_graph": pairs(bf16, "sparse_graph"), "fp32_ieee": pairs(bench(out, "fp32_ieee"))}
    runs = {name: rows for name, rows in runs.items() if rows or name in ("fp32", "bf16")}  # graphs: CUDA; IEEE: ONLY=i
    result = {"device": device, "seconds": seconds, "environment": environment,
              "device_name": next((r["device_name"] for r in fp32 + bf16), None),
              "tf32": next((r.get("tf32") for r in fp32), None),
              "steps": steps, "benchmarks": runs,
              "pretrain_losses": losses, "batch_tables": table, "conv_paths": paths,
              "torchrun": torchrun}
    # the run with cuda_graph=true (CUDA only): its losses, none where it ran and wrote no metrics
    graph_ran = any("cuda_graph=true" in s["step"] for s in steps)
    graph_losses = [m["loss"] for m in read_jsonl(out / "pretrain_graph_metrics.jsonl") if "loss" in m]
    graph_losses = graph_losses if graph_ran or graph_losses else None
    result["pretrain_graph_losses"] = graph_losses
    result["pretrain_profiles"] = profiles(out)
    result["targets"] = targets(result["benchmarks"]["fp32"], by_step, losses,
                                result["benchmarks"].get("fp32_graph"), graph_losses, result["pretrain_profiles"])
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    for c in result["targets"]:
        met = {True: "met", False: "NOT MET", None: "not measured"}[c["met"]]
        print(f"target {met}: {c['target']}: {c['measured']}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
