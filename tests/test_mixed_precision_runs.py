"""Mixed precision in the training apps: bf16 pretraining learns what fp32 learns, checkpoints keep
float32 weights, a bf16 run resumes exactly, and a resume in another precision is a deliberate
change (resume_changes), refused otherwise."""

import shutil

import pytest
import torch

import spark_sparse.finetune.app as finetune
import spark_sparse.pretrain.app as pretrain
from spark_sparse.finetune.classifier import build_model
from spark_sparse.finetune.data import build_datasets
from spark_sparse.run.checkpoint import load_checkpoint

from .runs import after_checkpoint, losses, records
from .test_finetune import COLOURS, colours, config as finetune_config  # noqa: F401 - colours is a fixture
from .test_pretrain import config


def test_a_bf16_pretraining_ends_within_a_few_percent_of_the_fp32_one(tmp_path):
    """Same seed, data, crops and masks; only the forward's arithmetic differs (bf16 keeps 8 bits
    of mantissa, so the two trajectories part slowly). Compared: the mean loss of the last 10 of 20
    steps, at an lr that makes them learn (measured: 1.31 at step 1, 1.09 for both)."""
    run = ["max_steps=20", "optim.base_lr=0.5", "save_every=1000", "vis_every=1000", "log_every=1"]
    pretrain.train(config(*run), tmp_path / "fp32")
    pretrain.train(config(*run, "precision=bf16"), tmp_path / "bf16")
    fp32, bf16 = (losses(tmp_path / p) for p in ("fp32", "bf16"))
    last = range(11, 21)
    mean32, mean16 = (sum(run[s] for s in last) / len(last) for run in (fp32, bf16))
    assert mean32 < 0.9 * fp32[1]  # it learned something to compare
    assert abs(mean16 - mean32) < 0.05 * mean32, (mean16, mean32)
    ckpt = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "last.pt")
    assert {t.dtype for t in ckpt["model"].values() if t.is_floating_point()} == {torch.float32}
    assert ckpt["config"]["precision"] == "bf16"


def test_a_bf16_run_resumes_exactly(tmp_path, monkeypatch):
    run = ["precision=bf16", "max_steps=4", "save_every=2"]
    pretrain.train(config(*run), tmp_path / "straight")
    after_checkpoint(monkeypatch, step=2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config(*run), tmp_path / "stopped")
    pretrain.train(config(*run, "resume=true"), tmp_path / "stopped")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_resuming_in_another_precision_is_a_deliberate_change(tmp_path, monkeypatch, capsys):
    after_checkpoint(monkeypatch, step=2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config("max_steps=4", "save_every=2"), tmp_path)
    with pytest.raises(pretrain.ConfigError, match="a different precision than the checkpoint's"):
        pretrain.train(config("max_steps=4", "save_every=2", "resume=true", "precision=bf16"), tmp_path)
    pretrain.train(config("max_steps=4", "save_every=2", "resume=true", "precision=bf16", "resume_changes=[precision]"),
                   tmp_path)
    assert "resume_changes: precision fp32 -> bf16 from step 2 on" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["changes"] == [{"step": 2, "key": "precision", "from": "fp32", "to": "bf16"}]


def test_fp16_needs_a_gpu(tmp_path):
    with pytest.raises(pretrain.ConfigError, match="precision=fp16 needs a CUDA device"):
        pretrain.train(config("precision=fp16"), tmp_path)


def test_fine_tuning_runs_and_evaluates_in_bf16_keeping_float32_weights(colours, tmp_path):  # noqa: F811
    # three steps of four images (this CPU's bf16 backward costs a third of a second an image)
    few = tmp_path / "few"
    for name in COLOURS:
        (few / name).mkdir(parents=True)
        for image in sorted((colours / "train" / name).iterdir())[:4]:
            shutil.copy(image, few / name)
    run = tmp_path / "run"
    finetune.train(finetune_config(colours, f"data.train={few}", "batch_size=4", "optim.lr=0.02", "epochs=1",
                                   "ema.decay=null", "precision=bf16"), run)
    (record,) = records(run)
    assert record["step"] == 3
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    # the recorded scores are the saved weights' under bf16 autocast, as the run evaluated them
    cfg = finetune_config(colours)
    _, val_set = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    model = build_model("resnet18", "finetune", num_classes=3, drop_path_rate=0.0)
    model.load_state_dict(state)
    scores = finetune.evaluate(model, val_set, 8, torch.device("cpu"), precision="bf16")
    assert (scores["top1"], scores["top5"]) == (record["val_top1"], record["val_top5"])
