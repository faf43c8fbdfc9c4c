"""results.json records -> a markdown table and two PNG plots (sparse relative to dense-masked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

Record = dict


def pair_rows(records: list[Record], sparse: str = "sparse") -> list[dict]:
    """One row per (model, mask ratio, pass) holding both engines' numbers and the ratios;
    ``sparse``: the sparse engine's records to pair ("sparse_graph": replayed from CUDA graphs)."""
    by_key: dict[tuple, dict[str, Record]] = {}
    for r in records:
        by_key.setdefault((r["model"], r["batch_size"], r["mask_ratio"], r["pass"]), {})[r["engine"]] = r
    rows = []
    for (model, batch, ratio, pass_), engines in by_key.items():
        if not {sparse, "dense_masked"} <= engines.keys():
            continue
        s, d = engines[sparse], engines["dense_masked"]
        mem = (s["peak_mem_mb"] / d["peak_mem_mb"]
               if s["peak_mem_mb"] is not None and d["peak_mem_mb"] else None)
        rows.append({
            "model": model, "batch_size": batch, "mask_ratio": ratio, "pass": pass_,
            "dense_s": d["median_s"], "sparse_s": s["median_s"], "dense_ips": d["images_per_s"], "sparse_ips": s["images_per_s"],
            "speedup": s["images_per_s"] / d["images_per_s"],
            "flops_ratio": s["gflops_per_image"] / d["gflops_per_image"],
            "mem_ratio": mem, "dense_mem": d["peak_mem_mb"], "sparse_mem": s["peak_mem_mb"],
            "dense_idle": d.get("gpu_idle_share"), "sparse_idle": s.get("gpu_idle_share"),
        })
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    idle = any(r["sparse_idle"] is not None for r in rows)  # measured on CUDA only
    lines = ["| model | batch | mask ratio | pass | dense img/s | sparse img/s | speed-up | FLOPs ratio "
             "| peak-mem ratio (sparse/dense MiB) |" + (" GPU idle dense / sparse |" if idle else ""),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if idle else "")]
    for r in rows:
        mem = _fmt(r["mem_ratio"], ".2f")
        if r["mem_ratio"] is not None:
            mem += f" ({r['sparse_mem']:.0f}/{r['dense_mem']:.0f})"
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['mask_ratio']:.2f} | {r['pass']} | {r['dense_ips']:.2f} "
                     f"| {r['sparse_ips']:.2f} | {r['speedup']:.2f}x | {r['flops_ratio']:.3f} | {mem} |"
                     + (f" {_fmt(r['dense_idle'], '.1%')} / {_fmt(r['sparse_idle'], '.1%')} |" if idle else ""))
    return "\n".join(lines)


def step_limit(encoder: dict, step: dict) -> float:
    """The whole step's speed-up if only the encoder got faster, by as much as measured:
    T_dense_step / (T_dense_step - T_dense_encoder + T_sparse_encoder)."""
    return step["dense_s"] / (step["dense_s"] - encoder["dense_s"] + encoder["sparse_s"])


def summary_table(rows: list[dict]) -> str:
    """Per model, batch and mask ratio: encoder speed-up and memory, and the whole step's
    speed-up next to its limit (where both passes were measured)."""
    by = {(r["model"], r["batch_size"], r["mask_ratio"], r["pass"]): r for r in rows}
    lines = ["| model | batch | mask ratio | encoder fwd+bwd speed-up | encoder peak memory sparse/dense "
             "| SparK step speed-up (limit) |", "|---|---:|---:|---:|---:|---:|"]
    for (model, batch, ratio, pass_), enc in by.items():
        if pass_ != "fwd_bwd":
            continue
        step = by.get((model, batch, ratio, "train_step"))
        step_txt = "n/a" if step is None else f"{step['speedup']:.2f}x ({step_limit(enc, step):.2f}x)"
        lines.append(f"| {model} | {batch} | {ratio:.2f} | **{enc['speedup']:.2f}x** | "
                     f"{_fmt(enc['mem_ratio'], '.2f')} | {step_txt} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _tf32(record: Record) -> str:
    """How CUDA ran float32 convolutions and matrix products (nothing to say on a CPU)."""
    tf32 = record.get("tf32")
    return "" if tf32 is None else "; float32 convolutions and GEMMs in " + ("TF32" if tf32 else "IEEE float32")


def _tables(rows: list[dict]) -> str:
    """The summary where fwd_bwd was measured, then the full table."""
    table, summary = markdown_table(rows), summary_table(rows)
    return f"{summary}\n\nAll passes:\n\n{table}" if summary else table


def write_markdown(records: list[Record], path: Path) -> str:
    """Write results.md (settings, the summary where fwd_bwd was measured, then the full table);
    returns the tables."""
    table = _tables(pair_rows(records))
    replayed = pair_rows(records, "sparse_graph")
    if replayed:  # cuda_graph=true: the sparse engine's model again, in the same process
        table += ("\n\n## The sparse engine replayed from CUDA graphs (cuda_graph=true)\n\n"
                  "Peak memory: the eager pass's.\n\n" + _tables(replayed))
    first = records[0]
    convs = ", ".join(sorted({f"'{c}'" for r in records for c in r["sparse_conv"].split("+") if c}))
    settings = (f"device {first['device']} ({first['device_name']}), {first['threads']} torch threads, "
                f"precision {first['precision']} (both engines{_tf32(first)}), "
                f"torch {first['torch']}, MinkowskiEngine {first['minkowski_engine']}, "
                f"sparse convolutions {convs}; "
                f"input {first['input_size']}, median of {first['repeats']} repeats after "
                f"{first['warmup']} warm-up, engines interleaved, same weights and masks.")
    notes = ("speed-up = sparse img/s / dense-masked img/s; FLOPs ratio = exact sparse / dense forward "
             "FLOPs (convolutions and linear layers; train_step adds the dense densify+decoder to both); peak memory = "
             f"growth during one pass ({first['mem_method']}).")
    path.write_text(f"# Sparse vs dense-masked SparK\n\n{settings}\n\n{notes}\n\n{table}\n")
    return table


def _plot(rows: list[dict], key: str, ylabel: str, path: Path, reference,
          labels: dict[str, str] | None = None) -> None:
    """One line per model and pass; ``labels`` renames passes (passes mapped to None are left out)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        for pass_ in dict.fromkeys(r["pass"] for r in rows):
            label = (labels or {}).get(pass_, pass_)
            pts = sorted((r["mask_ratio"], r[key]) for r in rows if r["model"] == model and r["pass"] == pass_)
            if pts and label:
                ax.plot(*zip(*pts), marker="o", label=f"{model} {label}")
    reference(ax, sorted({r["mask_ratio"] for r in rows}))
    ax.set_xlabel("mask ratio")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(records: list[Record], out_dir: Path) -> list[Path]:
    rows = pair_rows(records)
    speed, flops = out_dir / "speedup.png", out_dir / "flops_ratio.png"
    _plot(rows, "speedup", "sparse / dense-masked images per second", speed,
          lambda ax, xs: ax.axhline(1.0, color="grey", ls="--", lw=1))
    # fwd and fwd_bwd count the same (forward) encoder FLOPs: one line for both
    passes = {r["pass"] for r in rows}
    encoder_only = {"fwd": "encoder", "fwd_bwd": None if "fwd" in passes else "encoder"}
    _plot(rows, "flops_ratio", "sparse / dense forward FLOPs", flops,
          lambda ax, xs: ax.plot(xs, [1 - x for x in xs], color="grey", ls="--", lw=1,
                                 label="1 - mask ratio"), encoder_only)
    return [speed, flops]
