"""Fine-tuning and linear evaluation: both modes train and evaluate, pretrained weights are really
loaded (and refused when they do not fit), linear mode leaves the encoder alone, resume is exact,
and an easy task (classes that differ in colour) is learned."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import spark_sparse.train.finetune as finetune
from spark_sparse.train.checkpoint import load_checkpoint
from spark_sparse.train.classifier import build_model, encoder_of, load_encoder

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (30, 40, 220), "green": (40, 200, 50), "red": (220, 30, 40)}
# no colour-changing augmentation: the classes are colours
TINY = ["model=resnet18", "input_size=32", "batch_size=8", "epochs=3", "threads=1", "aug.auto_augment=null",
        "aug.color_jitter=null", "aug.reprob=0", "aug.scale=[0.5,1.0]", "aug.crop_pct=1.0"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """train/ and val/ ImageFolder trees: 16 + 6 noisy 40x40 images per colour class."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 6)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def config(colours: Path, *overrides: str):
    finetune.register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("finetune", overrides=TINY + [f"data.train={colours / 'train'}",
                                                     f"data.val={colours / 'val'}", *overrides])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A 'pretraining run directory' holding a resnet18 encoder_timm.pth with non-default weights."""
    run = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    encoder = timm.create_model("resnet18", num_classes=0)
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn_like(tensor))  # BN statistics too: none at defaults
    torch.save(encoder.state_dict(), run / "encoder_timm.pth")
    return run


def test_fine_tuning_learns_the_colour_task_and_writes_metrics_and_checkpoints(colours, tmp_path):
    summary = finetune.train(config(colours, "optim.lr=0.02"), tmp_path)
    recs = records(tmp_path)
    assert [r["epoch"] for r in recs] == [1, 2, 3] and summary["step"] == 3 * (48 // 8)
    for r in recs:
        assert {"train_loss", "lr", "val_top1", "val_top5", "ema_top1", "ema_top5", "best_top1"} <= r.keys()
        assert r["val_top5"] == 100.0  # three classes: the top 5 holds them all
    assert recs[-1]["val_top1"] >= 95.0, recs
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == summary["step"] and ckpt["ema"] is not None
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)
    assert best["val_top1"] == max(r["val_top1"] for r in recs) == summary["best"]["top1"]
    # the fine-tuned network is a plain timm model with the task's classes
    timm.create_model("resnet18", num_classes=3).load_state_dict(best["model"], strict=True)


def test_pretrained_weights_are_loaded_tensor_for_tensor(exported):
    for mode in ("finetune", "linear"):
        model = build_model("resnet18", mode, num_classes=3, drop_path_rate=0.0)
        load_encoder(model, exported, "resnet18")  # the run directory: its encoder_timm.pth
        want = torch.load(exported / "encoder_timm.pth")
        got = encoder_of(model).state_dict()
        assert set(want) <= set(got)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (mode, name)


def test_linear_mode_trains_the_head_and_leaves_the_pretrained_encoder_untouched(colours, exported, tmp_path):
    finetune.train(config(colours, "mode=linear", f"pretrained={exported}", "optim.lr=0.05"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    want = torch.load(exported / "encoder_timm.pth")
    for name, tensor in want.items():  # weights and batch-norm statistics alike
        assert torch.equal(state[f"encoder.{name}"], tensor), name
    assert records(tmp_path)[-1]["val_top1"] >= 90.0  # colour is linearly readable from pooled features
    assert "ema_top1" not in records(tmp_path)[-1]


@pytest.mark.parametrize("model,message", [
    ("resnet34", r"does not fit resnet18: unexpected layer1\.2\.bn1\.bias"),
    ("convnext_atto", r"does not fit resnet18: missing bn1\.bias, .* \(120 in all\); unexpected head\.norm\.bias"),
])
def test_a_weight_file_for_another_model_is_refused_naming_the_keys(colours, tmp_path, model, message):
    torch.save(timm.create_model(model, num_classes=0).state_dict(), tmp_path / "other.pth")
    run = tmp_path / "run"
    with pytest.raises(finetune.ConfigError, match=message):
        finetune.train(config(colours, f"pretrained={tmp_path / 'other.pth'}"), run)
    assert not run.exists()


def test_resume_after_a_stop_mid_epoch_gives_the_same_run(colours, tmp_path, monkeypatch):
    overrides = ("optim.lr=0.02", "mixup.mixup_alpha=0.2", "epochs=2")  # mixup: numpy RNG is resumed too
    straight = tmp_path / "straight"
    finetune.train(config(colours, *overrides), straight)

    real_criterion = finetune.criterion

    def sigint_at_step_4(cfg):
        loss_fn, calls = real_criterion(cfg), []

        def loss(logits, targets):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the run stops after this step
            return loss_fn(logits, targets)
        return loss

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(finetune, "criterion", sigint_at_step_4)
    with pytest.raises(finetune.Stopped) as stop:
        finetune.train(config(colours, *overrides), interrupted)
    assert stop.value.step == 4 and not (interrupted / "metrics.jsonl").read_text()
    monkeypatch.setattr(finetune, "criterion", real_criterion)
    finetune.train(config(colours, *overrides, "resume=true"), interrupted)

    def without_speed(recs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]

    assert without_speed(records(interrupted)) == without_speed(records(straight))
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_the_bundled_photos_task_runs_out_of_the_box(tmp_path):
    finetune.register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=["epochs=1", "input_size=32", "threads=1"])
    finetune.train(cfg, tmp_path)
    (rec,) = records(tmp_path)
    assert rec["epoch"] == 1 and 0.0 <= rec["val_top1"] <= 100.0
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]["fc.weight"].shape == (20, 512)


@pytest.mark.parametrize("overrides,message", [
    (["ema.decay=1.5"], "error: ema.decay must be in (0, 1) or null, got 1.5"),
    (["data.train={colours}/nowhere", "data.val={colours}/val"], "data.train={colours}/nowhere is not a folder"),
    (["data.train={colours}/train", "data.val={colours}"], "data.train and data.val have different class folders"),
    (["pretrained={colours}"], "must hold encoder_timm.pth"),
    (["batch_size=7"], "even with mixup"),
])
def test_command_line_errors_are_one_clear_line(colours, tmp_path, overrides, message):
    run = tmp_path / "run"
    overrides = [o.format(colours=colours) for o in overrides]
    proc = subprocess.run([sys.executable, "-m", "spark_sparse.finetune", "threads=1", *overrides,
                           f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()], proc.stderr
    assert message.format(colours=colours) in proc.stderr
    assert not run.exists()  # a refused command leaves no trace


@pytest.mark.parametrize("model,opt,base_lr,layer_decay,mixup,drop_path", [
    ("resnet50", "lamb", 2e-3, 0.7, 0.1, 0.05),
    ("resnet101", "lamb", 1e-3, 0.8, 0.1, 0.2),
    ("convnext_small", "adamw", 2e-4, 0.7, 0.8, 0.3),
    ("convnext_base", "adamw", 1e-4, 0.7, 0.8, 0.4),
])
def test_sparks_downstream_recipe_is_the_default_per_model_and_overridable(model, opt, base_lr, layer_decay,
                                                                           mixup, drop_path):
    finetune.register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"model={model}"])
        assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.layer_decay) == (opt, base_lr, layer_decay)
        assert (cfg.mixup.mixup_alpha, cfg.drop_path_rate, cfg.ema.decay) == (mixup, drop_path, 0.9999)
        cfg = compose("finetune", overrides=[f"model={model}", "optim.base_lr=0.5", "mode=linear"])
        assert (cfg.optim.name, cfg.optim.base_lr, cfg.mixup.mixup_alpha, cfg.ema.decay) == ("sgd", 0.5, 0.0, None)


def test_layer_decay_gives_the_stem_the_smallest_and_the_classifier_the_full_lr(colours):
    cfg = config(colours, "optim.lr=0.01")
    model = build_model("resnet18", "finetune", num_classes=3, drop_path_rate=0.0)
    groups = finetune.build_optimizer(model, cfg).param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) >= 5, scales  # stem, four stages, classifier: one lr per depth at least
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.7 ** (len(scales) - 1))


def test_convnext_fine_tunes_with_adamw_and_layer_decay(colours, tmp_path):
    finetune.train(config(colours, "model=convnext_atto", "epochs=1", "ema.decay=null"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    timm.create_model("convnext_atto", num_classes=3).load_state_dict(state, strict=True)
    assert records(tmp_path)[0]["epoch"] == 1


def test_epoch_records_go_to_wandb_too(colours, tmp_path):
    finetune.train(config(colours, "logger=wandb", "epochs=1", "ema.decay=null"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
