"""Put the latest `make bench` results into the README: ``python -m benchmarks.update_readme``.

Replaces what lies between ``<!-- bench:start -->`` / ``<!-- bench:end -->`` with the speed
benchmark's results.md (and a line describing the machine), and between ``<!-- ablation:start -->``
/ ``<!-- ablation:end -->`` with the sweep report's summary.md; copies the plots into docs/ and
links them. Every marker is checked before anything is written, so a README without them is left
untouched.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import yaml


class ReadmeError(ValueError):
    """The README or an input cannot be used."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(measured: Path, threads: int | str | None = None) -> str:
    """'<CPU> (<n> cores), <t> torch threads, on <date of the results>'."""
    if threads is None:
        import torch  # only for its default thread count, which the runs used unless told otherwise

        threads = torch.get_num_threads()
    day = datetime.date.fromtimestamp(measured.stat().st_mtime).isoformat()
    return f"{cpu_model()} ({os.cpu_count()} cores), {threads} torch threads, on {day}"


def marker_span(text: str, name: str) -> tuple[int, int]:
    """(end of the start marker, start of the end marker); a clear error when they are not usable."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i or text.count(start) > 1 or text.count(end) > 1:
        raise ReadmeError(f"the README needs exactly one '{start}' followed by one '{end}' where the "
                          f"{name} results go; add them (on lines of their own) and rerun")
    return i + len(start), j


def replace_between(text: str, name: str, body: str) -> str:
    i, j = marker_span(text, name)
    return f"{text[:i]}\n{body.strip()}\n{text[j:]}"


def _read(path: Path) -> str:
    if not path.is_file():
        raise ReadmeError(f"{path} does not exist; run `make bench` (or the step that writes it) first")
    return path.read_text()


def bench_section(bench_dir: Path, image: str) -> str:
    results = bench_dir / "results.md"
    # results.md: a '# title' line, then the settings, notes and table
    body = "\n".join(line for line in _read(results).splitlines() if not line.startswith("# "))
    threads = None
    records = bench_dir / "results.json"
    if records.is_file():
        threads = (json.loads(records.read_text()) or [{}])[0].get("threads")
    return (f"Measured by `make bench` with {machine_line(results, threads)}.\n\n{body.strip()}\n\n"
            f"![sparse vs dense-masked speed-up]({image})")


def sweep_command(sweep_dir: Path) -> str | None:
    """The pretraining command line of a hydra sweep, from its multirun.yaml."""
    try:
        task = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    return "python -m spark_sparse.pretrain -m " + " ".join(task)


def ablation_section(sweep_dir: Path, image: str) -> str:
    summary = sweep_dir / "summary.md"
    body = _read(summary)
    command = sweep_command(sweep_dir)
    ran = f"`{command}`, then `python -m spark_sparse.report`" if command else "the `make bench` sweep"
    return f"{ran}, with {machine_line(summary)}.\n\n{body.strip()}\n\n![ablation]({image})"


def update(readme: Path, bench_dir: Path | None, ablation_dir: Path | None,
           docs: Path | None = None) -> list[Path]:
    """Rewrite the README's marked sections; returns the files written."""
    text = _read(readme)
    docs = docs or readme.parent / "docs"

    def link(name: str) -> str:  # relative to the README, so it renders on GitHub and locally
        return os.path.relpath(docs / name, readme.parent).replace(os.sep, "/")

    copies: list[tuple[Path, Path]] = []
    if bench_dir is not None:
        text = replace_between(text, "bench", bench_section(bench_dir, link("speedup.png")))
        copies += [(bench_dir / "speedup.png", docs / "speedup.png")]
    if ablation_dir is not None:
        text = replace_between(text, "ablation", ablation_section(ablation_dir, link("ablation.png")))
        copies += [(ablation_dir / "summary.png", docs / "ablation.png")]
    for source, _ in copies:
        if not source.is_file():
            raise ReadmeError(f"{source} does not exist; run `make bench` first")
    docs.mkdir(parents=True, exist_ok=True)
    for source, target in copies:
        shutil.copyfile(source, target)
    readme.write_text(text)
    return [readme] + [target for _, target in copies]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.update_readme", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--bench", type=Path, default=None, help="run directory of benchmarks.sparse_vs_dense")
    parser.add_argument("--ablation", type=Path, default=None, help="sweep directory with the report's summary")
    parser.add_argument("--docs", type=Path, default=None, help="where the plots go (default: docs/ next to the README)")
    parser.add_argument("--check", action="store_true",
                        help="only check that the README has the markers (before a long benchmark)")
    args = parser.parse_args(argv)
    if not args.check and args.bench is None and args.ablation is None:
        parser.error("give --bench DIR, --ablation DIR or both (or --check)")
    try:
        if args.check:
            text = _read(args.readme)
            for name in ("bench", "ablation"):
                marker_span(text, name)
            print(f"{args.readme} has the bench and ablation markers")
        else:
            written = update(args.readme, args.bench, args.ablation, args.docs)
            print("updated " + ", ".join(str(p) for p in written))
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
