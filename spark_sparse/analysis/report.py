"""Summarise a hydra sweep of pretraining runs: ``python -m spark_sparse.report SWEEP_DIR``.

Writes SWEEP_DIR/summary.csv, summary.md and summary.png: one row per run with the config values
that differ between the runs (dotted names such as ``decoder.width``), the number of steps, the
final and smoothed reconstruction loss, the training speed and the held-out accuracy of the
linear probe (spark_sparse/analysis/probe.py), next to the same probe on a randomly initialised encoder.
A run without an exported encoder (killed, or stopped by a diverging loss) is reported with its
status rather than failing the report.

Reconstruction loss is averaged over the hidden patches, so it is not comparable as a quality
measure across mask ratios; the probe accuracy is. With ``--finetune "OVERRIDES"`` every run's
encoder is also fine-tuned by ``spark_sparse.finetune`` (analysis/downstream.py), and the report
gains its val top-1 beside the same recipe from random initialisation, in the table and in the plot.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch

from ..run.checkpoint import load_checkpoint
from ..run.recipe import register_resolver, timm_input_size
from ..run.run_dir import RunFiles, read_record
from .cli import CommandError, OneLineParser, run_command

FIXED_COLUMNS = ("status", "steps", "final_loss", "smoothed_loss", "images_per_s",
                 "probe_accuracy", "probe_random_init")
FINETUNE_COLUMNS = ("finetune_top1", "finetune_random_init")
PROBE_MAX_SIZE = 128  # larger runs are probed at 128 px by default: seconds, not minutes, per run
PROBE_SIZE_LIMIT = 512  # the probe's crops are at most the bundled photos' size: larger only upsamples


class ReportError(CommandError):
    """The sweep directory cannot be reported (missing, a single run, or no runs in it)."""


def is_run(folder: Path) -> bool:
    return RunFiles(folder).metrics.exists() or RunFiles(folder).record.is_dir()


def is_finetuning(config: dict | None) -> bool:
    return config is not None and "pretrained" in config  # a pretraining config has no such key


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run directories directly under ``sweep_dir`` (hydra job numbers sort numerically)."""
    if sweep_dir.is_file():
        raise ReportError(f"{sweep_dir} is a file; expected a sweep directory (hydra.sweep.dir)")
    if not sweep_dir.is_dir():
        raise ReportError(f"sweep directory {sweep_dir} does not exist")
    if is_run(sweep_dir):
        raise ReportError(f"{sweep_dir} is a single run; pass the sweep directory that holds the runs to compare "
                          f"(the hydra.sweep.dir of `python -m spark_sparse.pretrain -m ...`)")
    runs = [d for d in sweep_dir.iterdir() if d.is_dir() and is_run(d)]
    if not runs:
        raise ReportError(f"no runs in {sweep_dir}: expected sub-directories holding metrics.jsonl "
                          "(the hydra.sweep.dir of `python -m spark_sparse.pretrain -m ...`)")
    return sorted(runs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def load_config(run_dir: Path) -> dict | None:
    """The run's resolved config: the .hydra/ record (written once the run was accepted), else the checkpoint's."""
    register_resolver()  # the record interpolates the model's recipe defaults
    record = read_record(RunFiles(run_dir))
    if record is not None:
        return record
    try:  # missing or unreadable: the checkpoint may still have it
        return load_checkpoint(RunFiles(run_dir).checkpoint)["config"]
    except Exception:
        return None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"decoder": {"width": 64}} -> {"decoder.width": 64}; lists become strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value) if isinstance(value, (list, tuple)) else value
    return flat


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Flattened keys whose value is not the same in every config (in config order)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl; torn lines (a killed run, bytes that are not UTF-8) are skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line.decode("utf-8")))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r and "loss" in r]


def smoothed(values: list[float], beta: float) -> float:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing) of the last value."""
    if not 0 <= beta < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {beta}")
    ema, weight = 0.0, 0.0
    for v in values:
        ema, weight = beta * ema + (1 - beta) * v, beta * weight + (1 - beta)
    return ema / weight if weight else math.nan


def summarize_run(run_dir: Path, beta: float) -> dict[str, Any]:
    """Losses, speed and status of one run (no probe)."""
    records = read_metrics(RunFiles(run_dir).metrics)
    losses = [float(r["loss"]) for r in records]
    row: dict[str, Any] = {
        "run": run_dir.name, "steps": records[-1]["step"] if records else 0,
        "final_loss": losses[-1] if losses else math.nan,
        "smoothed_loss": smoothed(losses, beta) if losses else math.nan,
        "images_per_s": statistics.median(r["images_per_s"] for r in records if "images_per_s" in r)
        if any("images_per_s" in r for r in records) else math.nan,
    }
    if not records:
        row["status"] = "no metrics"
    elif not RunFiles(run_dir).encoder.exists():
        row["status"] = f"incomplete (stopped at step {row['steps']}, no encoder_timm.pth)"
    elif not all(map(math.isfinite, losses)):
        row["status"] = "diverged"
    else:
        row["status"] = "ok"
    return row


def probe_size_for(config: dict, probe_size: int | None) -> int:
    """``probe_size``, else the run's input size up to ``PROBE_MAX_SIZE``, or timm's own size for a
    model timm makes for one (the probe runs timm's model: a Hiera or a Swin at 224 whatever its run's)."""
    if probe_size:
        return probe_size
    return timm_input_size(config["model"], min(int(config.get("input_size", PROBE_MAX_SIZE)), PROBE_MAX_SIZE))


def collect(sweep_dir: Path, beta: float = 0.9, probe: bool = True, probe_size: int | None = None,
            finetune: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run and the varying config keys; probes (and with ``finetune``, a list of
    fine-tuning overrides, fine-tunes) every run that exported an encoder."""
    runs = find_runs(sweep_dir)
    configs = {d.name: load_config(d) for d in runs}
    if all(map(is_finetuning, configs.values())):
        raise ReportError(f"the runs in {sweep_dir} are fine-tuning runs; the report compares pretraining runs "
                          "(--finetune adds their downstream accuracy)")
    if finetune is not None:
        from .downstream import check_overrides  # imports the fine-tuning app only when asked

        check_overrides(finetune, {c["model"] for c in configs.values() if c is not None and not is_finetuning(c)})
    flat = {name: flatten(c) for name, c in configs.items() if c is not None and not is_finetuning(c)}
    keys = varying_keys(list(flat.values()))
    baselines: dict[tuple[str, int], float] = {}
    rows = []
    for run_dir in runs:
        row = summarize_run(run_dir, beta)
        config = configs[run_dir.name]
        row.update({k: flat.get(run_dir.name, {}).get(k, "") for k in keys})
        row["probe_accuracy"] = row["probe_random_init"] = math.nan
        if config is None:
            row["status"] = "no config"
        elif is_finetuning(config):
            row["status"], config = "a fine-tuning run (not reported)", None
        if probe and config is not None and row["status"] in ("ok", "diverged"):
            _probe(row, run_dir, config, probe_size, baselines)
        if finetune is not None:
            _finetune(row, run_dir, config, finetune, sweep_dir)
        rows.append(row)
    return rows, keys


def _probe(row: dict, run_dir: Path, config: dict, probe_size: int | None,
           baselines: dict[tuple[str, int], float]) -> None:
    from .probe import linear_probe  # imports timm/torchvision only when probing

    model, size = config["model"], probe_size_for(config, probe_size)
    try:
        state = torch.load(RunFiles(run_dir).encoder, map_location="cpu", weights_only=True)
        row["probe_accuracy"] = linear_probe(state, model, size)["accuracy"]
        if (model, size) not in baselines:
            baselines[(model, size)] = linear_probe(None, model, size)["accuracy"]
        row["probe_random_init"] = baselines[(model, size)]
    except Exception as err:  # one broken run must not sink the report of the others
        row["status"] = f"probe failed ({type(err).__name__}: {err})"


def _finetune(row: dict, run_dir: Path, config: dict | None, overrides: list[str], sweep_dir: Path) -> None:
    from .downstream import finetune_top1  # imports the fine-tuning app only when asked

    row["finetune_top1"] = row["finetune_random_init"] = math.nan
    if config is None or row["status"] != "ok":
        return
    try:
        row["finetune_top1"] = finetune_top1(run_dir, config["model"], run_dir / "finetune", overrides)
        # one baseline per model: the finished run directory is read back, not trained again
        row["finetune_random_init"] = finetune_top1(
            None, config["model"], sweep_dir / "finetune_random_init" / config["model"], overrides)
    except Exception as err:  # one broken run must not sink the report of the others
        row["status"] = f"fine-tuning failed ({type(err).__name__}: {str(err).splitlines()[0]})"


def columns(keys: list[str], rows: list[dict] = ()) -> list[str]:
    extra = FINETUNE_COLUMNS if any("finetune_top1" in r for r in rows) else ()
    return ["run", *keys, *FIXED_COLUMNS, *extra]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns(keys, rows))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if isinstance(row[c], float) and math.isnan(row[c]) else row[c])
                             for c in columns(keys, rows)})


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    cols = columns(keys, rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict], keys: list[str]) -> str:
    cols = columns(keys, rows)
    cells = [cols] + [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


def _label(row: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) or row["run"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def figure(rows: list[dict], keys: list[str], title: str):
    """Smoothed loss, probe accuracy and (for a report with --finetune) downstream val top-1
    against the varying setting, the random-init baselines as dashed horizontal lines.

    A numeric setting (the first one) is the x axis, with one line per combination of the other
    settings; with only categorical settings (e.g. decoder.densify_norm) each run is one bar.
    Returns the matplotlib figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (column, random-init column, axis label, upper limit)
    panels = [("probe_accuracy", "probe_random_init", "linear probe held-out accuracy", 1.0)]
    if any("finetune_top1" in r for r in rows):
        panels.append(("finetune_top1", "finetune_random_init", "fine-tuning val top-1 (%)", 100.0))
    fig, (ax_loss, *axes) = plt.subplots(1, 1 + len(panels), figsize=(5 * (1 + len(panels)), 4))
    numeric = [k for k in keys if all(_is_number(r[k]) for r in rows)]
    if numeric:
        x_key, others = numeric[0], [k for k in keys if k != numeric[0]]
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(_label(r, others) if others else "", []).append(r)
        for label, members in groups.items():
            members = sorted(members, key=lambda r: r[x_key])
            xs = [r[x_key] for r in members]
            line, = ax_loss.plot(xs, [r["smoothed_loss"] for r in members], "o-", label=label or "smoothed")
            ax_loss.plot(xs, [r["final_loss"] for r in members], "x:", color=line.get_color(), alpha=0.6,
                         label=f"{label} final" if label else "final")
            for ax, (column, *_) in zip(axes, panels):
                ax.plot(xs, [r[column] for r in members], "o-", color=line.get_color(), label=label or "pretrained")
        for ax in (ax_loss, *axes):
            ax.set_xlabel(x_key)
    else:
        positions = range(len(rows))
        names = [_label(r, keys) for r in rows]
        ax_loss.bar(positions, [r["smoothed_loss"] for r in rows], label="smoothed")
        ax_loss.plot(positions, [r["final_loss"] for r in rows], "kx", label="final")
        for ax, (column, *_) in zip(axes, panels):
            ax.bar(positions, [r[column] for r in rows], label="pretrained")
        for ax in (ax_loss, *axes):
            ax.set_xticks(list(positions), names, rotation=20, ha="right", fontsize=8)
    for ax, (_, baseline, ylabel, top) in zip(axes, panels):
        values = sorted({r[baseline] for r in rows if not math.isnan(r.get(baseline, math.nan))})
        for i, b in enumerate(values):
            ax.axhline(b, color="grey", ls="--", lw=1, label="random init" if i == 0 else None)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top)
    ax_loss.set_ylabel("reconstruction loss (hidden patches)")
    for ax in (ax_loss, *axes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_plot(rows: list[dict], keys: list[str], path: Path, title: str) -> None:
    """The report's figure (see ``figure``) as a PNG."""
    fig = figure(rows, keys, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sweep_dir: Path, beta: float = 0.9, probe: bool = True, probe_size: int | None = None,
           finetune: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Collect the sweep and write summary.csv, summary.md and summary.png into it."""
    sweep_dir = Path(sweep_dir)
    rows, keys = collect(sweep_dir, beta, probe, probe_size, finetune)
    write_csv(rows, keys, sweep_dir / "summary.csv")
    probe_note = ("probe: held-out top-1 accuracy of a linear classifier naming the source photo of "
                  "crops from the right 40% of each bundled photo, trained on crops from the left 60% "
                  "(chance 0.05); probe_random_init: the same on a randomly initialised encoder."
                  if probe else "probe: not run (--no-probe).")
    (sweep_dir / "summary.md").write_text(
        f"{markdown_table(rows, keys)}\n\nsmoothed_loss: bias-corrected EMA (beta {beta}) of the logged "
        f"losses; loss is over hidden patches only, so it is not comparable across mask ratios. "
        f"{probe_note}"
        + (f" finetune_top1: val top-1 (%) after `python -m spark_sparse.finetune pretrained=RUN "
           f"{' '.join(finetune)}`; finetune_random_init: the same with pretrained=null."
           if finetune is not None else "")
        + "\n")
    write_plot(rows, keys, sweep_dir / "summary.png", f"SparK sweep {sweep_dir.name} ({len(rows)} runs)")
    return rows, keys


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m spark_sparse.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="hydra.sweep.dir of a pretraining multirun")
    parser.add_argument("--smooth", type=float, default=0.9, help="EMA factor for the smoothed loss")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument("--probe-size", type=int, default=None,
                        help=f"probe crop size (default: the run's input_size, at most {PROBE_MAX_SIZE}, or "
                             "timm's own size for a model timm makes for one)")
    parser.add_argument("--finetune", nargs="?", const="", default=None, metavar="OVERRIDES",
                        help="also fine-tune every run's encoder (and a random-init baseline) with "
                             "spark_sparse.finetune and these overrides, e.g. \"mode=linear epochs=5\"")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.probe_size is not None and not 32 <= args.probe_size <= PROBE_SIZE_LIMIT:
        parser.error(f"--probe-size must be from 32 (one pixel after the encoder) to {PROBE_SIZE_LIMIT} (the "
                     f"probe's crops are no larger), got {args.probe_size}")
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    finetune = None if args.finetune is None else args.finetune.split()

    def summarise() -> None:
        rows, keys = report(args.sweep_dir, args.smooth, not args.no_probe, args.probe_size, finetune)
        print(text_table(rows, keys))
        print(f"wrote {args.sweep_dir / 'summary.csv'}, summary.md and summary.png")

    run_command(summarise)


if __name__ == "__main__":
    main()
