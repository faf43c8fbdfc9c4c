"""Sweep reports, the linear probe and the README refresh of `make bench`."""

import csv
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot
import pytest
import timm
import torch
from PIL import Image

from benchmarks import update_readme
from spark_sparse import create_encoder
from spark_sparse.analysis import report
from spark_sparse.analysis.probe import build_probe_data, crop_boxes, linear_probe, probe_features
from spark_sparse.data.regions import split_column

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI, needs_minkowski
from .runs import cli_in_process

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["mask_ratio=0.5,0.75", "model=resnet18", "input_size=64", "batch_size=4", "decoder.width=64",
         "max_steps=3", "log_every=1", "vis_every=1000", "vis_images=1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-run multirun through the pretraining command line, then the report's on it."""
    if not HAS_MINKOWSKI:  # pretraining's default engine
        pytest.skip(WITHOUT_MINKOWSKI)
    tmp = tmp_path_factory.mktemp("sweep")
    run = cli_in_process("spark_sparse.pretrain", "-m", *SWEEP, f"hydra.sweep.dir={tmp}")
    assert run.returncode == 0, run.stderr[-3000:]
    # probed at 32 px: the same code path as the default size, a quarter of the time (both command
    # lines also run in processes of their own: test_run_dir.py, test_reliability.py)
    out = cli_in_process("spark_sparse.report", str(tmp), "--probe-size", "32")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, out.stdout


@pytest.mark.xdist_group("sweep")  # one worker runs the sweep for all three
def test_report_of_a_real_multirun(sweep):
    tmp, stdout = sweep
    with open(tmp / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1"]
    assert sorted(float(r["mask_ratio"]) for r in rows) == [0.5, 0.75]
    assert "decoder.width" not in rows[0]  # the same in both runs: not a column
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == "3"
        assert math.isfinite(float(r["final_loss"])) and math.isfinite(float(r["smoothed_loss"]))
    # the probe is deterministic: its numbers are reproduced here from the run's exported encoder,
    # and from a random init of the same seed for the baseline column (the same for both runs)
    random_init = linear_probe(None, "resnet18", 32)["accuracy"]
    assert [float(r["probe_random_init"]) for r in rows] == [random_init, random_init]
    exported = torch.load(tmp / "0" / "encoder_timm.pth")
    assert float(rows[0]["probe_accuracy"]) == linear_probe(exported, "resnet18", 32)["accuracy"]
    assert (tmp / "summary.png").stat().st_size > 0
    assert "mask_ratio" in stdout and "probe_accuracy" in stdout
    assert "| run | mask_ratio |" in (tmp / "summary.md").read_text()


@pytest.mark.xdist_group("sweep")  # one worker runs the sweep for all three
def test_a_stopped_run_is_reported_not_fatal(sweep, tmp_path):
    src, _ = sweep
    for name in ("0", "1"):
        shutil.copytree(src / name, tmp_path / name)
    (tmp_path / "1" / "encoder_timm.pth").unlink()  # as after a kill or a diverged loss
    with open(tmp_path / "1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a torn last line
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # started, then killed before any step
    (tmp_path / "notes").mkdir()  # not a run
    rows, keys = report.report(tmp_path, probe=False)
    assert keys == ["mask_ratio"]
    status = {r["run"]: r["status"] for r in rows}
    assert status["0"] == "ok" and status["1"].startswith("incomplete") and status["2"] == "no config"
    assert rows[1]["steps"] == 3 and math.isfinite(rows[1]["final_loss"])
    assert len(list(csv.DictReader(open(tmp_path / "summary.csv")))) == 3


def test_report_errors(tmp_path, capsys):
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path, "no runs in")):
        with pytest.raises(SystemExit) as exc:
            report.main([str(path), "--no-probe"])
        assert exc.value.code == 1 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--smooth", "1.5"])


def test_varying_keys_and_smoothing():
    configs = [report.flatten({"model": "resnet18", "decoder": {"width": w, "densify_norm": n}, "s": [1, 2]})
               for w, n in ((64, "bn"), (128, "bn"), (128, "ln"))]
    assert report.varying_keys(configs) == ["decoder.width", "decoder.densify_norm"]
    assert configs[0]["s"] == "[1, 2]"
    assert report.smoothed([2.0] * 5, 0.9) == pytest.approx(2.0)  # bias-corrected: no pull to 0
    assert report.smoothed([0.0, 10.0], 0.5) == pytest.approx(10 / 1.5)
    assert report.smoothed([3.0, 7.0], 0.0) == 7.0


@pytest.mark.parametrize("keys, values", [
    (["decoder.densify_norm"], [("bn",), ("ln",), ("none",)]),               # categorical: bars
    (["mask_ratio", "decoder.width"], [(0.6, 64), (0.75, 64), (0.6, 128)]),  # one line per width
])
def test_plot_layouts(tmp_path, keys, values):
    rows = [{"run": str(i), **dict(zip(keys, v)), "smoothed_loss": 1.0 + i, "final_loss": 1.1,
             "probe_accuracy": math.nan if i == 2 else 0.5, "probe_random_init": 0.4}
            for i, v in enumerate(values)]
    report.write_plot(rows, keys, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_with_finetune_columns_the_plot_gains_downstream_accuracy_against_mask_ratio(tmp_path):
    rows = [{"run": str(i), "mask_ratio": m, "smoothed_loss": 1.0, "final_loss": 1.1, "probe_accuracy": 0.5,
             "probe_random_init": 0.4, "finetune_top1": top1, "finetune_random_init": 31.25}
            for i, (m, top1) in enumerate([(0.75, 70.0), (0.4, 55.0), (0.6, 62.5)])]
    fig = report.figure(rows, ["mask_ratio"], "test")
    try:
        ax = fig.axes[-1]
        assert len(fig.axes) == 3 and ax.get_ylabel() == "fine-tuning val top-1 (%)"
        assert ax.get_xlabel() == "mask_ratio" and ax.get_ylim() == (0.0, 100.0)
        curve, baseline = ax.get_lines()
        assert list(curve.get_xdata()) == [0.4, 0.6, 0.75] and list(curve.get_ydata()) == [55.0, 62.5, 70.0]
        assert list(baseline.get_ydata()) == [31.25, 31.25] and baseline.get_label() == "random init"
        assert list(baseline.get_xdata()) == [0, 1]  # axhline: the whole width, in axes coordinates
    finally:
        matplotlib.pyplot.close(fig)
    no_finetune = [{k: v for k, v in r.items() if not k.startswith("finetune")} for r in rows]
    fig = report.figure(no_finetune, ["mask_ratio"], "test")
    assert len(fig.axes) == 2  # without --finetune: loss and probe only
    matplotlib.pyplot.close(fig)
    report.write_plot(rows, ["mask_ratio"], tmp_path / "p.png", "test")
    assert matplotlib.image.imread(tmp_path / "p.png").shape[1] == 15 * 120  # three 5-inch panels at 120 dpi


# --- the linear probe ---

@pytest.mark.parametrize("width, height", [(512, 512), (102, 102), (448, 172), (300, 451), (5, 40)])
def test_train_and_test_crops_never_share_pixels(width, height):
    cut = split_column(width)
    train, test = crop_boxes(width, height, "train", 50, 1), crop_boxes(width, height, "test", 50, 2)
    for left, top, side in train + test:
        assert left >= 0 and top >= 0 and top + side <= height and side >= 1
    assert all(left + side <= cut for left, _, side in train)
    assert all(left >= cut and left + side <= width for left, _, side in test)
    # same scale on both sides: only location differs
    assert max(s for *_, s in train) <= min(cut, width - cut, height)
    assert crop_boxes(width, height, "train", 50, 1) == train != crop_boxes(width, height, "train", 50, 3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three tiny 'photos' of different colours and sizes (one grey)."""
    tmp = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (colour, size) in enumerate((((200, 30, 30), (90, 60)), ((30, 200, 30), (64, 64)), (128, (50, 80)))):
        path = tmp / f"p{i}.png"
        Image.new("RGB" if i < 2 else "L", size, colour).save(path)
        paths.append(path)
    return paths


def test_probe_data_is_deterministic_with_the_right_shapes(photos):
    a = build_probe_data(photos, 32, seed=0, train_per_image=4, test_per_image=2)
    b = build_probe_data(photos, 32, seed=0, train_per_image=4, test_per_image=2)
    assert a.train_images.shape == (12, 3, 32, 32) and a.test_images.shape == (6, 3, 32, 32)
    assert a.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and a.names == ("p0", "p1", "p2")
    assert torch.equal(a.train_images, b.train_images) and a.test_boxes == b.test_boxes
    assert build_probe_data(photos, 32, seed=1, train_per_image=4, test_per_image=2).train_boxes != a.train_boxes


def test_probe_classifier_uses_information_and_only_that():
    g = torch.Generator().manual_seed(0)
    classes, n = 20, 200
    train_y, test_y = torch.arange(n) % classes, torch.arange(n // 2) % classes

    def informative(y: torch.Tensor) -> torch.Tensor:  # the label, one-hot, under noise
        return torch.nn.functional.one_hot(y, classes) * 6.0 + torch.randn(len(y), classes, generator=g)

    good = probe_features(informative(train_y), train_y, informative(test_y), test_y, classes)
    assert good["accuracy"] > 0.95
    noise = probe_features(torch.randn(n, 64, generator=g), train_y, torch.randn(n // 2, 64, generator=g),
                           test_y, classes)
    assert noise["train_accuracy"] > 0.9 and noise["accuracy"] < 0.3  # fits noise, cannot generalise it


def without_any_signal(state: dict) -> dict:
    """The state with every norm's weight and bias zeroed: every feature of every image is 0."""
    return {k: torch.zeros_like(v) if ("bn" in k or "norm" in k) and k.endswith(("weight", "bias")) else v
            for k, v in state.items()}


def test_linear_probe_loads_weights_and_is_deterministic(photos):
    # the photos are uniform colours: every crop of one photo is the same image, so any encoder
    # whose features tell three colours apart scores 1, and one with no features at all scores
    # chance exactly (an untrained head predicts the first class: 2 of 6 test crops)
    data = build_probe_data(photos, 32, train_per_image=4, test_per_image=2)
    random_init = linear_probe(None, "resnet18", 32, seed=0, data=data)
    assert random_init == {**linear_probe(None, "resnet18", 32, seed=0, data=data),
                           "seconds": random_init["seconds"]}
    assert (random_init["num_train"], random_init["num_test"], random_init["num_classes"]) == (12, 6, 3)
    assert random_init["feature_dim"] == 512 and random_init["accuracy"] == 1.0
    torch.manual_seed(0)  # the very weights of the random init, but no signal: a load that did nothing would score 1
    state = without_any_signal(timm.create_model("resnet18", num_classes=0).state_dict())
    assert linear_probe(state, "resnet18", 32, data=data)["accuracy"] == pytest.approx(1 / 3, abs=1e-12)
    with pytest.raises(RuntimeError):  # a state dict of another model is refused, not half-loaded
        linear_probe(timm.create_model("resnet34", num_classes=0).state_dict(), "resnet18", 32, data=data)


# --- README refresh ---

README = "# x\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nmiddle\n\n" \
         "<!-- ablation:start -->\n<!-- ablation:end -->\n\nend\n"


def fake_results(tmp_path: Path) -> tuple[Path, Path]:
    bench, ablation = tmp_path / "bench", tmp_path / "ablation"
    bench.mkdir()
    ablation.mkdir()
    (bench / "results.md").write_text("# Sparse vs dense-masked SparK\n\nsettings line\n\n| model |\n|---|\n| r18 |\n")
    (bench / "results.json").write_text(json.dumps([{"threads": 2}]))
    (bench / "speedup.png").write_bytes(b"png1")
    (ablation / "summary.md").write_text("| run | mask_ratio |\n|---|---|\n| 0 | 0.6 |\n")
    (ablation / "summary.png").write_bytes(b"png2")
    (ablation / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - mask_ratio=0.4,0.6\n")
    return bench, ablation


def test_update_readme_fills_the_markers_and_copies_plots(tmp_path):
    bench, ablation = fake_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    update_readme.main(["--readme", str(readme), "--bench", str(bench), "--ablation", str(ablation)])
    text = readme.read_text()
    assert "old table" not in text and "| r18 |" in text and "Sparse vs dense-masked SparK" not in text
    assert "2 torch threads" in text and update_readme.cpu_model() in text
    assert "`python -m spark_sparse.pretrain -m mask_ratio=0.4,0.6`" in text and "| 0 | 0.6 |" in text
    assert "![sparse vs dense-masked speed-up](docs/speedup.png)" in text and "](docs/ablation.png)" in text
    assert text.startswith("# x\n\nintro\n\n") and "\n\nmiddle\n\n" in text and text.endswith("end\n")
    assert (tmp_path / "docs" / "speedup.png").read_bytes() == b"png1"
    assert (tmp_path / "docs" / "ablation.png").read_bytes() == b"png2"
    update_readme.main(["--readme", str(readme), "--bench", str(bench), "--ablation", str(ablation)])
    assert readme.read_text() == text  # idempotent


@pytest.mark.parametrize("broken", [
    README.replace("<!-- ablation:start -->\n", ""),
    README.replace("<!-- bench:start -->\nold table\n<!-- bench:end -->", "<!-- bench:end -->\n<!-- bench:start -->"),
    README + "<!-- bench:start -->\n",
])
def test_update_readme_refuses_missing_markers_and_writes_nothing(tmp_path, capsys, broken):
    bench, ablation = fake_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(broken)
    for args in (["--bench", str(bench), "--ablation", str(ablation)], ["--check"]):
        with pytest.raises(SystemExit) as exc:
            update_readme.main(["--readme", str(readme), *args])
        assert exc.value.code == 1 and "<!-- " in capsys.readouterr().err
    assert readme.read_text() == broken and not (tmp_path / "docs").exists()


@pytest.mark.xdist_group("sweep")  # one worker runs the sweep for all three
def test_finetune_columns_put_each_runs_downstream_accuracy_beside_the_random_init_baseline(sweep, tmp_path):
    src, _ = sweep
    for name in ("0", "1"):
        shutil.copytree(src / name, tmp_path / name, ignore=shutil.ignore_patterns("summary*"))
    # a small task of its own (two colours, four images each a split) instead of the bundled photos
    task = tmp_path / "task"
    for split in ("train", "val"):
        for name, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30))):
            (task / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), colour).save(task / split / name / f"{i}.png")
    overrides = ["mode=linear", "epochs=1", "input_size=32", "batch_size=4", "threads=1",
                 f"data.train={task / 'train'}", f"data.val={task / 'val'}"]
    rows, _ = report.report(tmp_path, probe=False, finetune=overrides)
    baseline = tmp_path / "finetune_random_init" / "resnet18"
    for row in rows:
        log = [json.loads(line) for line in (tmp_path / row["run"] / "finetune" / "metrics.jsonl").read_text().splitlines()]
        assert row["finetune_top1"] == log[-1]["val_top1"]
        assert row["finetune_random_init"] == json.loads((baseline / "metrics.jsonl").read_text())["val_top1"]
    assert "| finetune_top1 | finetune_random_init |" in (tmp_path / "summary.md").read_text()

    # a second report reads the finished evaluations back instead of training again
    evaluations = [tmp_path / "0" / "finetune", tmp_path / "1" / "finetune", baseline]
    saved = [(d / "checkpoints" / "last.pt").stat().st_mtime_ns for d in evaluations]
    assert report.report(tmp_path, probe=False, finetune=overrides)[0] == rows
    assert [(d / "checkpoints" / "last.pt").stat().st_mtime_ns for d in evaluations] == saved


@needs_minkowski
def test_the_probe_runs_at_the_runs_size_up_to_128_or_at_timms_own_for_a_model_timm_makes_for_one():
    assert report.probe_size_for({"model": "resnet18", "input_size": 96}, None) == 96
    assert report.probe_size_for({"model": "resnet18", "input_size": 224}, None) == 128
    assert report.probe_size_for({"model": "swin_tiny_patch4_window7_224", "input_size": 128}, None) == 224
    assert report.probe_size_for({"model": "hiera_small_abswin_256", "input_size": 256}, None) == 256
    assert report.probe_size_for({"model": "hiera_tiny_224", "input_size": 224}, 64) == 64  # asked for


def test_linear_probe_takes_a_convnext_export(photos):
    # the exported encoder of a ConvNeXt run loads strictly into timm's model (head norm included)
    data = build_probe_data(photos, 32, train_per_image=4, test_per_image=2)
    state = create_encoder("convnext_atto", "sparse").timm_state_dict()
    result = linear_probe(state, "convnext_atto", 32, data=data)
    assert result["feature_dim"] == 320 and result["accuracy"] == 1.0  # three colours told apart
    # the pooled features pass through the head's norm: zeroed, they carry nothing (chance, 1/3)
    state = {k: torch.zeros_like(v) if k.startswith("head.norm.") else v for k, v in state.items()}
    assert linear_probe(state, "convnext_atto", 32, data=data)["accuracy"] == pytest.approx(1 / 3, abs=1e-12)
