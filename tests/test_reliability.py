"""What a hostile user meets (issue #21): every bad command of the analysis tools ends in one line
and a non-zero exit code, images of any shape and pixel type load or are refused with a reason,
refusals name what to do instead, and files and signals behave on a shared machine."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import spark_sparse.pretrain.app as pretrain
from spark_sparse.analysis import report, visualize
from spark_sparse.analysis.cli import run_command
from spark_sparse.data.images import bundled_image_paths, centre_crop
from spark_sparse.encoders.families import FAMILIES
from spark_sparse.finetune.classifier import read_encoder_weights
from spark_sparse.model.spark import SparK
from spark_sparse.run.checkpoint import atomic_save
from spark_sparse.run.checks import ConfigError, check_model_and_missing
from spark_sparse.run.run_dir import repair_metrics
from spark_sparse.run.signals import StopSignals, Stopped

from .runs import assert_one_line_error, cli_in_process, run_child, run_cli
from .test_pretrain import config as pretrain_config


def fails_in_one_line(main, argv: list[str], capsys, message: str, code: int = 1) -> None:
    """``main(argv)`` (a command line, in this process) exits with ``code`` after exactly one line
    on stderr holding ``message``."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == code, err
    assert len(err.splitlines()) == 1 and message in err, err


# --- python -m spark_sparse.visualize ------------------------------------------------------------

def noise_images(folder: Path, count: int, size: tuple[int, int] = (40, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def save_checkpoint(path: Path, config: dict, model: dict | None = None) -> Path:
    """A checkpoint as the training apps write it (the optimizer's state does not matter here)."""
    atomic_save({"model": model or {}, "optimizer": {}, "scheduler": {}, "step": 3, "config": config}, path)
    return path


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory) -> Path:
    """A pretraining run directory (dense-masked ResNet-18, its data an image folder) at step 3."""
    root = tmp_path_factory.mktemp("pretraining")
    cfg = pretrain_config("engine=dense_masked", "data=imagefolder", f"data.root={noise_images(root / 'data', 3)}")
    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint(root / "run" / "checkpoints" / "last.pt", config, SparK.from_config(cfg).state_dict())
    return root / "run"


def test_visualize_draws_a_run_with_the_picture_where_asked(pretraining_run, tmp_path, capsys):
    out = tmp_path / "new folder" / "picture.jpg"  # a folder made on the way, any format matplotlib writes
    visualize.main([str(pretraining_run), "--out", str(out), "--num-images", "2"])
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert Image.open(out).format == "JPEG"


@pytest.mark.parametrize("argv,message,code", [
    ([], "error: the following arguments are required: checkpoint (see --help)", 2),
    (["{run}", "--num-images", "0"], "--num-images must be from 1 to 64, got 0", 2),
    (["{run}", "--num-images", "65"], "--num-images must be from 1 to 64, got 65", 2),
    (["{run}", "--seed", "-1"], "--seed must be a whole number from 0 to 2**63 - 1, got -1", 2),
    (["{tmp}/nowhere"], "error: {tmp}/nowhere does not exist: expected a pretraining run directory", 1),
    (["{tmp}"], "error: {tmp} holds no checkpoint ({tmp}/checkpoints/last.pt is missing)", 1),
    (["{tmp}/finetuning"], "last.pt is a fine-tuning run's checkpoint: reconstruction pictures need a "
                           "pretraining run", 1),
    (["{tmp}/encoder_timm.pth"], "encoder_timm.pth is the exported encoder alone; pass its run directory", 1),
    (["{tmp}/garbage.pt"], "garbage.pt (7 bytes) is not a readable checkpoint", 1),
    (["{run}", "--out", "{tmp}/garbage.pt/picture.png"], "cannot write {tmp}/garbage.pt/picture.png: "
                                                         "{tmp}/garbage.pt is a file", 1),
    (["{run}", "--out", "{tmp}/picture"], "--out {tmp}/picture has no file extension", 1),
    (["{run}", "--out", "{tmp}/picture.txt"], "'.txt' is not a picture format matplotlib writes", 1),
    (["{run}", "--data-root", "{tmp}/nowhere"], "error: image folder {tmp}/nowhere does not exist", 1),
    (["{run}", "--data-root", "{tmp}"], "error: {tmp} holds no images", 1),
    (["{tmp}/moved"], "the run's data is gone (image folder {tmp}/data-that-moved does not exist); "
                      "--data-root FOLDER draws from another", 1),
    (["{tmp}/other-model"], "other-model/checkpoints/last.pt: the saved model does not fit resnet18 as this version "
                            "builds it (decoder.", 1),
])
def test_every_bad_visualize_command_is_one_line(pretraining_run, tmp_path, capsys, argv, message, code):
    config = visualize.load_checkpoint(pretraining_run / "checkpoints" / "last.pt")["config"]
    save_checkpoint(tmp_path / "finetuning" / "checkpoints" / "last.pt", {"model": "resnet18", "mode": "linear",
                                                                          "pretrained": None})
    save_checkpoint(tmp_path / "moved" / "checkpoints" / "last.pt",
                    {**config, "data": {**config["data"], "root": f"{tmp_path}/data-that-moved"}})
    state = visualize.load_checkpoint(pretraining_run / "checkpoints" / "last.pt")["model"]
    save_checkpoint(tmp_path / "other-model" / "checkpoints" / "last.pt", config,
                    {k: v for k, v in state.items() if not k.startswith("decoder.")})
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "encoder_timm.pth")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    argv = [a.format(run=pretraining_run, tmp=tmp_path) for a in argv]
    fails_in_one_line(visualize.main, argv, capsys, message.format(tmp=tmp_path), code)


@pytest.mark.parametrize("stop,line,code", [(KeyboardInterrupt(), "interrupted", 130),
                                             (Stopped("SIGTERM", 4), "stopped by SIGTERM; the same command continues "
                                                                     "where it stopped", 143)])
def test_a_stopped_analysis_command_is_one_line_with_the_shells_code(capsys, stop, line, code):
    """Ctrl-C while drawing, or a SIGTERM while the report fine-tunes (which saved first)."""
    def command() -> None:
        raise stop

    with pytest.raises(SystemExit) as stopped:
        run_command(command)
    assert stopped.value.code == code and capsys.readouterr().err == line + "\n"


def test_visualize_on_a_fine_tuning_run_is_one_line_on_the_command_line(tmp_path):
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"model": "resnet18", "pretrained": None})
    assert_one_line_error(run_cli("spark_sparse.visualize", str(tmp_path)),
                          f"error: {ckpt} is a fine-tuning run's checkpoint")


# --- python -m spark_sparse.report --------------------------------------------------------------

def fake_run(folder: Path, config: dict, losses: tuple[float, ...] = (1.0, 0.9)) -> Path:
    """A run directory as the report reads it: its config record and metrics."""
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), folder / ".hydra" / "config.yaml")
    (folder / "metrics.jsonl").write_text("".join(f'{{"step": {i + 1}, "loss": {loss}}}\n'
                                                  for i, loss in enumerate(losses)))
    return folder


PRETRAINING = {"model": "resnet18", "engine": "sparse", "mask_ratio": 0.6, "decoder": {"width": 64}}
FINETUNING = {"model": "resnet18", "mode": "linear", "pretrained": None}


@pytest.mark.parametrize("argv,message,code", [
    ([], "error: the following arguments are required: sweep_dir (see --help)", 2),
    (["{sweep}", "--smooth", "nan"], "--smooth must be in [0, 1), got nan", 2),
    (["{sweep}", "--probe-size", "100000"], "--probe-size must be from 32 (one pixel after the encoder) to 512", 2),
    (["{sweep}/0/metrics.jsonl"], "metrics.jsonl is a file; expected a sweep directory", 1),
    (["{sweep}/0"], "{sweep}/0 is a single run; pass the sweep directory that holds the runs", 1),
    (["{tmp}/finetuning"], "the runs in {tmp}/finetuning are fine-tuning runs; the report compares pretraining "
                           "runs", 1),
    (["{sweep}", "--finetune", "epochs=0"], "error: --finetune epochs=0: epochs must be a whole number of at least 1", 1),
    (["{sweep}", "--finetune", "nokey=1"], "error: --finetune nokey=1: Could not override 'nokey'.", 1),
    (["{sweep}", "--finetune", "mode=linear model=resnet50"], "error: --finetune model=resnet50: the report sets "
                                                             "model, pretrained, resume", 1),
    (["{tmp}/unwritable"], "error: [Errno 21] Is a directory: '{tmp}/unwritable/summary.csv'", 1),
])
def test_every_bad_report_command_is_one_line_and_evaluates_nothing(tmp_path, capsys, argv, message, code):
    sweep = tmp_path / "sweep"
    for i, mask_ratio in enumerate((0.4, 0.6)):
        fake_run(sweep / str(i), {**PRETRAINING, "mask_ratio": mask_ratio})
    fake_run(tmp_path / "finetuning" / "0", FINETUNING)
    fake_run(tmp_path / "unwritable" / "0", PRETRAINING)
    (tmp_path / "unwritable" / "summary.csv").mkdir()  # as if it could not be written
    argv = [a.format(sweep=sweep, tmp=tmp_path) for a in argv] + ["--no-probe"] * bool(argv)
    fails_in_one_line(report.main, argv, capsys, message.format(sweep=sweep, tmp=tmp_path), code)
    assert not (sweep / "summary.csv").exists() and not list(sweep.rglob("finetune*"))


def test_a_fine_tuning_run_among_pretraining_runs_is_listed_not_reported(tmp_path):
    fake_run(tmp_path / "0", PRETRAINING)
    fake_run(tmp_path / "1", {**FINETUNING, "epochs": 3})  # its keys are not the sweep's settings
    rows, keys = report.collect(tmp_path, probe=False)
    assert rows[1]["status"] == "a fine-tuning run (not reported)" and rows[0]["steps"] == 2 and keys == []


def test_a_bad_report_command_is_one_line_on_the_command_line(tmp_path):
    fake_run(tmp_path / "0", FINETUNING)
    assert_one_line_error(run_cli("spark_sparse.report", str(tmp_path)),
                          f"error: the runs in {tmp_path} are fine-tuning runs")


# --- images of any shape -------------------------------------------------------------------------

def test_a_centre_crop_is_torchvisions_resize_then_centre_crop():
    """Pixel for pixel up to an aspect ratio of 4 (photographs, thirds of them either way, with
    the shorter side resized to the crop or beyond it, as an evaluation's crop_pct does); strips
    of them 20 pixels wide, whose kept part alone is resampled, within 3 levels (PIL rounds
    between its two resampling passes, and orders those of the whole resize otherwise)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    for path in bundled_image_paths():
        image = Image.open(path).convert("RGB")
        w, h = image.size
        for part in (image, image.crop((0, 0, w // 3, h)), image.crop((0, 0, w, h // 3)),
                     image.crop((0, 0, w, 20)), image.crop((0, 0, 20, h))):
            for size, scale in ((32, 32), (96, 96), (96, 109), (224, 256)):
                ours = np.asarray(centre_crop(part, size, scale), dtype=int)
                resized = TF.resize(part, scale, interpolation=InterpolationMode.BICUBIC)
                difference = np.abs(ours - np.asarray(TF.center_crop(resized, [size, size]), dtype=int))
                exact = max(part.size) <= 4 * min(part.size)
                assert difference.max() <= (0 if exact else 3), (path.name, part.size, size, scale)


def test_a_picture_of_a_1_by_60000_strip_costs_megabytes_not_gigabytes(tmp_path):
    """Resized whole to a shorter side of 64, the strip would be 64 x 3.84M pixels (1.1 GB measured
    before the fix); its centre crop needs a few MB. Peak memory growth of a fresh process, both
    orientations, pretraining's centre crop and fine-tuning's evaluation transform (timm's
    resized the whole strip, to a shorter side of 73), bound 100 MB."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, 60000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    Image.fromarray(pixels.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    script = ("import resource, sys; from pathlib import Path; from types import SimpleNamespace\n"
              "from spark_sparse.pretrain.data import PretrainDataset\n"
              "from spark_sparse.finetune.data import Labelled, transforms\n"
              "aug = SimpleNamespace(scale=(0.08, 1), color_jitter=None, auto_augment=None, reprob=0, crop_pct=0.875)\n"
              "_, evaluation = transforms(64, aug)\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "for name in ('wide.png', 'tall.png'):\n"
              "    x = PretrainDataset([Path(sys.argv[1]) / name], 64, augment=False)[(0, 0)]\n"
              "    assert x.shape == (3, 64, 64)\n"
              "    (x, _), _ = Labelled([(Path(sys.argv[1]) / name, 0)], ['a'], evaluation, substitute=False)[(0, 0)]\n"
              "    assert x.shape == (3, 64, 64)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    proc = run_child([sys.executable, "-c", script, str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 100, f"{proc.stdout} MB"


# --- wandb without a network ---------------------------------------------------------------------

def closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_online_without_a_network_warns_in_one_line_and_logs_offline(tmp_path, monkeypatch, capfd):
    """Before: wandb's own 90 s wait, then a traceback. Now: logger.init_timeout (here 2 s), one
    warning line, and the run's records in an offline wandb run that `wandb sync` uploads later."""
    monkeypatch.setenv("WANDB_API_KEY", "0123456789" * 4)  # a key, so the run is not refused up front
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    began = time.monotonic()
    summary = pretrain.train(pretrain_config("logger=wandb", "logger.mode=online", "logger.init_timeout=2",
                                             "engine=dense_masked", "max_steps=2"), tmp_path)
    assert summary["step"] == 2 and time.monotonic() - began < 60
    warned = [line for line in capfd.readouterr().err.splitlines() if "wandb" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: wandb online failed (")
    assert f"`wandb sync {tmp_path}/wandb/offline-run-*`" in warned[0]
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert any(offline.rglob("*.wandb"))


# --- models timm has and we do not convert ------------------------------------------------------

SUPPORTED = ", ".join(m for family in FAMILIES for m in family.timm_modules)  # as families are added, so is the message


@pytest.mark.parametrize("model,module", [("vit_base_patch16_224", "vision_transformer"), ("inception_v3", "inception_v3")])
def test_a_timm_model_of_another_family_is_named_as_timms_with_its_module(model, module):
    with pytest.raises(ConfigError) as refused:
        check_model_and_missing(OmegaConf.create({"model": model}))
    assert str(refused.value) == (f"model '{model}' is timm's (timm.models.{module}), a family spark_sparse does "
                                  f"not convert; supported: the models of {SUPPORTED} (README: Families)")


@pytest.mark.parametrize("model", ["hardcorenas_a", "res2net50_26w_4s", "resnest50d", "skresnet18"])
def test_a_model_of_another_timm_module_of_a_supported_class_is_accepted(model):
    # timm's hardcorenas builds MobileNetV3s, its res2net, resnest and sknet ResNets
    check_model_and_missing(OmegaConf.create({"model": model}))


def test_a_name_timm_does_not_know_is_unknown_with_close_matches():
    with pytest.raises(ConfigError) as refused:
        check_model_and_missing(OmegaConf.create({"model": "resnet5O"}))
    assert str(refused.value).startswith(f"unknown model 'resnet5O': expected a timm model of {SUPPORTED} "
                                         "(did you mean resnet50")


# --- fine-tuning -------------------------------------------------------------------------------

def test_fine_tuning_a_single_class_is_refused_in_one_line_before_the_run_directory_is_made(tmp_path):
    """One class folder: every prediction is right, and the run would report 100%."""
    for split in ("train", "val"):
        noise_images(tmp_path / split / "cats", 4)
    run = tmp_path / "run"
    proc = cli_in_process("spark_sparse.finetune", "threads=1", "input_size=32", "batch_size=2",
                          f"data.train={tmp_path}/train", f"data.val={tmp_path}/val", f"hydra.run.dir={run}")
    assert_one_line_error(proc, f"error: data.train={tmp_path}/train has a single class folder ('cats'); "
                                "classification needs at least two")
    assert not run.exists()


# --- files on a shared machine -----------------------------------------------------------------

@pytest.mark.parametrize("proc", [True, False], ids=["umask-from-proc", "without-proc"])
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_get_the_mode_of_any_new_file(tmp_path, monkeypatch, umask, proc):
    """0o666 less the umask, as open() gives (mkstemp alone made every checkpoint 0o600), read from
    /proc/self/status or, where there is none, from os.umask."""
    def no_such_file(self: Path, *args, **kwargs) -> str:
        raise FileNotFoundError(self)

    if not proc:
        monkeypatch.setattr(Path, "read_text", no_such_file)
    previous = os.umask(umask)
    try:
        atomic_save({"step": 1}, tmp_path / "last.pt")
        (tmp_path / "plain").touch()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_pretrained_training_checkpoint_says_what_to_pass_instead(tmp_path):
    numpy_state = np.random.get_state()  # what weights-only loading refuses to unpickle
    atomic_save({"model": {}, "optimizer": {}, "scheduler": {}, "step": 3, "config": {}, "rng": numpy_state},
                tmp_path / "last.pt")
    with pytest.raises(ConfigError) as refused:
        read_encoder_weights(tmp_path / "last.pt")
    assert str(refused.value) == (f"pretrained={tmp_path}/last.pt is a training checkpoint (the model, optimizer "
                                  "and RNG state of a run), not encoder weights; pass a pretraining run directory "
                                  "or its encoder_timm.pth")
    torch.save({"weight": numpy_state}, tmp_path / "other.pt")  # torch's refusal sets words in bold
    with pytest.raises(ConfigError, match=r"other.pt is not a readable state dict \(UnpicklingError: Weights only "
                                          r"load failed\)$") as refused:
        read_encoder_weights(tmp_path / "other.pt")
    assert "\x1b" not in str(refused.value)
    (tmp_path / "empty.pth").touch()  # a copy that never happened
    with pytest.raises(ConfigError, match=r"empty.pth is an empty file \(0 bytes\), not encoder weights; pass a"):
        read_encoder_weights(tmp_path / "empty.pth")


def test_metrics_with_bytes_that_are_not_utf8_are_repaired_as_torn_lines(tmp_path):
    """Before: a UnicodeDecodeError without the file's name, and no resume."""
    damaged = b'{"step": 1, "loss": 1.0}\n{"step": 2, "lo\xff\xfe\n3\n{"step": 2, "loss": 0.5}\n\x80\x81'
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(damaged)
    assert [r["step"] for r in report.read_metrics(path)] == [1, 2]  # the report reads such a file too
    assert repair_metrics(path, last_step=2) == f"{path}: dropped 3 torn or unreadable line(s); kept 2 record(s)"
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


# --- Ctrl-C with data-loader workers -----------------------------------------------------------

class SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGINT to the process loading it, as Ctrl-C reaches every worker."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        return index


def test_ctrl_c_is_the_main_process_s_alone_data_workers_neither_speak_nor_stop(capfd):
    with StopSignals() as stops:
        loaded = list(torch.utils.data.DataLoader(SignalsItself(), num_workers=2))  # forked with the handler
        assert [int(x) for x in loaded] == [0, 1, 2, 3] and stops.requested is None
        assert "saving" not in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)
    assert stops.requested == "SIGINT"
    assert capfd.readouterr().err == ("SIGINT: saving a checkpoint after this step, then stopping (send it again "
                                      "to stop at once)\n")


def test_a_signal_the_run_was_started_ignoring_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a non-interactive shell
    try:
        with StopSignals() as stops:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stops._handle
            os.kill(os.getpid(), signal.SIGINT)
        assert stops.requested is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
