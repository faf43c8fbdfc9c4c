"""bf16 (or fp16) against fp32, for both engines, side by side in one process.

``python -m benchmarks.precision_speed models=[resnet50,convnext_tiny] batch_size=8 mask_ratios=[0.6] passes=[fwd_bwd,train_step] repeats=3``

Keys and passes are benchmarks.sparse_vs_dense's (conf/bench/sparse_vs_dense.yaml), plus
``precisions`` (default [fp32, bf16]); its ``precision`` key is ignored. For every model, mask
ratio and pass, each engine runs under each precision on the same weights, images and masks;
the repeats rotate which (engine, precision) goes first, so slow phases of a shared machine
hit all of them. Prints the medians and each precision's speed relative to the first one.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from spark_sparse.run.runtime import configure_cpu

from .sparse_vs_dense import (ENGINES, BenchConfigError, batch_sizes, build_pair, device_name, make_inputs, make_pass,
                              timed, validate)

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "bench" / "sparse_vs_dense.yaml"
BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what CPU bf16 speed depends on


def cpu_flags() -> str:
    """Which of the CPU features that bf16 matrix products use this machine has (Linux only)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in BF16_FLAGS)


def config(argv: list[str]) -> DictConfig:
    cfg = OmegaConf.load(CONFIG)
    cfg.pop("hydra")
    cfg.precisions = ["fp32", "bf16"]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_cli(argv))
    if not OmegaConf.is_list(cfg.precisions) or not len(cfg.precisions):
        raise BenchConfigError(f"precisions must be a list of at least one (precisions=[...]), got {cfg.precisions}")
    checked = cfg.copy()  # sparse_vs_dense's keys, each precision in its turn
    checked.pop("precisions")
    for precision in cfg.precisions:
        checked.precision = precision
        validate(checked)
    return cfg


def measure(cfg: DictConfig) -> list[dict]:
    device = torch.device(cfg.device)
    threads = configure_cpu(cfg.threads)["threads"]
    print(f"{device_name(device)}, {threads} threads, torch {torch.__version__}; CPU flags: {cpu_flags()}\n")
    print(header(list(cfg.precisions)))
    combos = [(e, p) for p in cfg.precisions for e in ENGINES]
    rows = []
    for model_name, b in batch_sizes(cfg).items():
        models = build_pair(model_name, cfg, device)
        for ratio in cfg.mask_ratios:
            images, masks = make_inputs(cfg, b, float(ratio), device, models["sparse"].stride)
            for pass_name in cfg.passes:
                runs = {(e, p): make_pass(pass_name, models[e], images, p) for e, p in combos}
                times: dict[tuple[str, str], list[float]] = {c: [] for c in combos}
                for i, active in enumerate(masks):
                    order = combos[i % len(combos):] + combos[:i % len(combos)]
                    for e, p in order:
                        t = timed(runs[e, p], active, models[e], device)
                        if i >= cfg.warmup:
                            times[e, p].append(t)
                for e in ENGINES:
                    median = {p: statistics.median(times[e, p]) for p in cfg.precisions}
                    rows.append({"model": model_name, "batch_size": b, "mask_ratio": float(ratio), "pass": pass_name,
                                 "engine": e, "median_s": median})
                    print(row_line(rows[-1], cfg.precisions), flush=True)
                for m in models.values():
                    m.zero_grad(set_to_none=True)
    return rows


def row_line(row: dict, precisions: list[str]) -> str:
    base, median = precisions[0], row["median_s"]
    cells = [f"{median[p]:.3f}" for p in precisions] + [f"{median[base] / median[p]:.2f}x" for p in precisions[1:]]
    return (f"| {row['model']} | {row['batch_size']} | {row['mask_ratio']:.2f} | {row['pass']} | {row['engine']} | "
            + " | ".join(cells) + " |")


def header(precisions: list[str]) -> str:
    cols = [f"{p} s" for p in precisions] + [f"{p} speed vs {precisions[0]}" for p in precisions[1:]]
    return ("| model | batch | mask ratio | pass | engine | " + " | ".join(cols) + " |\n"
            + "|---|---:|---:|---|---|" + "---:|" * len(cols))


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = config(sys.argv[1:] if argv is None else argv)
    except BenchConfigError as err:
        raise SystemExit(f"error: {err}") from None
    measure(cfg)


if __name__ == "__main__":
    main()
