"""Fine-tuning and linear evaluation: both modes train and evaluate, pretrained weights are really
loaded (and refused when they do not fit), linear mode leaves the encoder alone, resume is exact,
and an easy task (classes that differ in colour) is learned."""

import os
import shutil
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

import spark_sparse.finetune.app as finetune
import spark_sparse.pretrain.app as pretrain
import spark_sparse.finetune.checks as finetune_checks
from spark_sparse.run.recipe import register_resolver
from spark_sparse.run.checkpoint import load_checkpoint
from spark_sparse.run.checks import Refused
from spark_sparse.finetune.classifier import build_model, encoder_of, load_encoder
from spark_sparse.data.images import DataError
from spark_sparse.finetune.data import EpochBatches, build_datasets

from .runs import ENV, ROOT, assert_one_line_error, cli_in_process, records
from .test_pretrain import config as pretrain_config

TORCHRUN = Path(sys.executable).with_name("torchrun")
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
    register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("finetune", overrides=TINY + [f"data.train={colours / 'train'}",
                                                     f"data.val={colours / 'val'}", *overrides])


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


@pytest.mark.parametrize("name, head", [
    ("convformer_s18", {"head.fc.fc1", "head.fc.norm", "head.fc.fc2"}),  # an MLP classifier
    ("repvit_m0_9", {"head.head.bn", "head.head.l", "head.head_dist.bn", "head.head_dist.l"}),  # two, distilled
])
def test_a_classifier_the_headless_model_lacks_starts_fresh_and_a_supervised_ones_is_dropped(tmp_path, name, head):
    """ConvFormer's classifier is an MLP (fc1, norm, fc2), RepViT's a norm and a linear layer twice
    (its head and its distillation head), all missing from the headless model pretraining exports:
    fine-tuning loads every exported tensor and leaves the whole head as timm made it; a supervised
    checkpoint's head (1000 classes) is dropped the same way."""
    torch.manual_seed(0)
    exported = tmp_path / "encoder_timm.pth"
    torch.save(timm.create_model(name, num_classes=0).state_dict(), exported)
    supervised = tmp_path / "supervised.pth"
    torch.save(timm.create_model(name, num_classes=1000).state_dict(), supervised)
    for path in (exported, supervised):
        model = build_model(name, "finetune", num_classes=3, drop_path_rate=0.0)
        fresh = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in head}
        assert {k.rsplit(".", 1)[0] for k in fresh} == head
        loaded = load_encoder(model, path, name)
        want = torch.load(exported)
        assert loaded.keys() == want.keys()
        got = model.state_dict()
        for key, tensor in (loaded | fresh).items():
            assert torch.equal(got[key], tensor), key


# a member of every family the encoders convert (test_spark's pretraining list): its export fits its classifier
EVERY_FAMILY = ["resnet18", "convnext_atto", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_100",
                "resnetv2_50x1_bit", "repvgg_a0", "mobileone_s0", "cspdarknet53", "test_nfnet", "mobilenetv4_conv_small",
                "test_mambaout", "densenet121", "rexnet_100", "ghostnet_050", "hgnetv2_b0", "hgnet_tiny", "starnet_s050",
                "fasternet_t0", "repvit_m0_9", "res2net50_26w_4s", "resnest14d", "rdnet_tiny", "inception_next_atto",
                "dpn48b", "ese_vovnet19b_slim_dw", "cspnext_tiny", "legacy_seresnet18", "dla46_c", "repghostnet_050",
                "skresnet18", "mixnet_s", "gcresnet33ts", "xception41", "hrnet_w18_small", "fastvit_t8", "tresnet_m",
                "convformer_s18", "poolformer_s12", "focalnet_tiny_srf", "lcnetv2_small", "efficientvit_b0",
                "swiftformer_xs", "pvt_v2_b0", "twins_svt_small", "tiny_vit_5m_224",
                "efficientformer_l1", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "edgenext_xx_small",
                "selecsls42b", "swinv2_cr_tiny_224", "davit_tiny", "mobilevit_xxs", "mobilevitv2_050",
                "mobilenetv5_base", "iformer_t", "maxvit_nano_rw_256", "coatnet_nano_rw_224", "botnet26t_256",
                "lambda_resnet26t", "hiera_tiny_224", "cpubone_t0", "lowformer_b0", "gcvit_xxtiny", "mvitv2_tiny",
                "efficientformerv2_s0", "sam2_hiera_tiny", "coat_lite_tiny", "vgg11", "visformer_tiny", "nest_tiny"]


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_every_familys_pretrained_encoder_loads_into_its_classifier_and_its_linear_probe(tmp_path, name):
    """What pretraining exports (the headless model's tensors) loads, tensor for tensor, into the
    fine-tuned classifier and into the linear probe's encoder, whatever the family's head."""
    exported = tmp_path / "encoder_timm.pth"
    torch.save(timm.create_model(name, num_classes=0).state_dict(), exported)
    want = torch.load(exported)
    for mode in ("finetune", "linear"):
        model = build_model(name, mode, num_classes=3, drop_path_rate=0.0)
        assert load_encoder(model, exported, name).keys() == want.keys()


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


def test_resuming_a_pretraining_run_as_a_fine_tuning_is_refused_naming_both_apps(colours, tmp_path):
    """resume=true continues a run of the same app; a pretraining run's encoder is pretrained=."""
    run = tmp_path / "pretraining"
    pretrain.train(pretrain_config("max_steps=1", "engine=dense_masked"), run)  # fine-tuning needs no MinkowskiEngine
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(Refused, match=r"last.pt is a checkpoint of python -m spark_sparse.pretrain, not of "
                                      r"python -m spark_sparse.finetune; choose another hydra.run.dir$"):
        finetune.train(config(colours, "resume=true"), run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_a_pretraining_run_of_another_model_is_refused_naming_that_model(colours, tmp_path):
    pretraining = tmp_path / "pretraining"  # a run directory as pretraining leaves it
    (pretraining / ".hydra").mkdir(parents=True)
    (pretraining / ".hydra" / "config.yaml").write_text("model: resnet34\nmask_ratio: 0.6\n")
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), pretraining / "encoder_timm.pth")
    with pytest.raises(finetune.ConfigError, match=r"encoder_timm.pth is the encoder of a resnet34 pretraining run "
                                                   r"\(its config record\) and does not fit resnet18 \(unexpected "
                                                   r"layer1\.2\.bn1\.bias, .*\); set model=resnet34$"):
        finetune.train(config(colours, f"pretrained={pretraining}"), tmp_path / "run")


@pytest.mark.parametrize("model,size,made,message", [
    ("swin_tiny_patch4_window7_224", 64, "makes {} for input_size 224",
     r"\(Input height \(64\) doesn't match model \(224\)\.\); set input_size=224$"),
    ("hiera_tiny_224", 256, "makes {} for input_size 224",
     r"\(Attempting to broadcast a dimension of length 3136 .*\); set input_size=224$"),
    ("botnet26t_256", 224, "makes {} for input_size 256",
     r"\(AssertionError in its forward\); set input_size=256$"),  # timm's assert says nothing
    ("halonet26t", 300, "runs {} at multiples of 256",  # blocks of 8x8 sites at stride 32
     r"\(AssertionError in its forward\); set input_size=512$"),
])
def test_a_model_timm_makes_for_one_input_size_is_refused_at_another_before_any_work(colours, tmp_path, model, size,
                                                                                      made, message):
    with pytest.raises(finetune.ConfigError, match=f"^timm {made.format(model)} and it does not run at {size} "
                                                   + message):
        finetune.train(config(colours, f"model={model}", f"input_size={size}"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_model_timm_marks_as_made_for_one_size_that_runs_at_others_is_not_refused():
    # twins_svt_small's pretrained_cfg says fixed_input_size; its windows and position convolutions take other sizes
    finetune_checks.check_input_size("twins_svt_small", 64)
    finetune_checks.check_input_size("maxvit_nano_rw_256", 512)  # whole groups and grids at every stride


def test_resume_after_a_stop_mid_epoch_gives_the_same_run(colours, tmp_path, monkeypatch):
    # mixup: numpy RNG is resumed too; repeated augmentation: the epoch's order too (one sampler
    # for any number of repeats; one repeat and two processes: the torchrun test below)
    overrides = ("optim.lr=0.02", "mixup.mixup_alpha=0.2", "epochs=2", "aug.repeats=3")
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
    register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=["epochs=1", "input_size=32", "threads=1"])
    finetune.train(cfg, tmp_path)
    (rec,) = records(tmp_path)
    assert rec["epoch"] == 1
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert state["fc.weight"].shape == (20, 512)  # one class per bundled photo
    # the recorded accuracy is the saved model's on the 160 held-out crops (8 per photo)
    _, val_set = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    model = build_model("resnet18", "finetune", num_classes=20, drop_path_rate=0.0)
    model.load_state_dict(state)
    scores = finetune.evaluate(model, val_set, 32, torch.device("cpu"))
    assert len(val_set) == 160 and (scores["top1"], scores["top5"]) == (rec["val_top1"], rec["val_top5"])


@pytest.mark.parametrize("overrides,message", [
    (["ema.decay=1.5"], "error: ema.decay must be in (0, 1) or null, got 1.5"),
    (["data.train={colours}/nowhere", "data.val={colours}/val"], "data.train={colours}/nowhere is not a folder"),
    (["data.train={colours}/train", "data.val={colours}"], "data.train and data.val have different class folders"),
    (["pretrained={colours}"], "must hold encoder_timm.pth"),
    (["batch_size=7"], "even with mixup"),
    (["aug.repeats=0"], "aug.repeats must be a whole number of at least 1, got 0"),
    # the paper's schedule without one's own data
    (["+experiment=finetune_paper", "device=cpu"], "error: batch_size 2048 is larger than the 320 training images of "
                                                   "the bundled photos task (set data.train=DIR data.val=DIR"),
])
def test_command_line_errors_are_one_clear_line(colours, tmp_path, overrides, message):
    run = tmp_path / "run"
    overrides = [o.format(colours=colours) for o in overrides]
    proc = cli_in_process("spark_sparse.finetune", "threads=1", *overrides, f"hydra.run.dir={run}")
    assert_one_line_error(proc, message.format(colours=colours))
    assert not run.exists()  # a refused command leaves no trace


@pytest.mark.parametrize("model,opt,base_lr,layer_decay,mixup,drop_path,repeats", [
    ("resnet50", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("resnet101", "lamb", 1e-3, 0.8, 0.1, 0.2, 1),
    ("convnext_small", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),  # SparK: repeated augmentation for ConvNeXt
    ("convnext_base", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),
    # families SparK has no downstream recipe for: the ResNet entry's values (ConvNeXt's for MambaOut)
    ("efficientnet_b0", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("mobilenetv4_conv_small", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("densenet121", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),  # no stochastic depth
    ("repvit_m0_9", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),
    ("dpn68", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),  # no stochastic depth
    ("hgnetv2_b0", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("ese_vovnet19b_dw", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("cspnext_s", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("legacy_seresnet50", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),  # no stochastic depth
    ("dla34", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),
    ("repghostnet_100", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),
    ("lcnetv2_base", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),
    ("efficientvit_l1", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),
    ("swiftformer_s", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("xception41", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("hrnet_w18", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),  # no stochastic depth
    ("selecsls42b", "lamb", 2e-3, 0.7, 0.1, 0.0, 1),
    ("mobilevit_s", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("iformer_m", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("fastvit_t8", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("tresnet_m", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("hardcorenas_a", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("resnest50d", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("skresnet18", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("mambaout_tiny", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("rdnet_tiny", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("inception_next_tiny", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("convformer_s18", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("convformer_b36", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("caformer_b36", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),
    ("focalnet_small_lrf", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("focalnet_large_fl3", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),  # as ConvNeXt-L
    ("pvt_v2_b2", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("pvt_v2_b5", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("twins_svt_small", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("twins_pcpvt_large", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("tiny_vit_21m_224", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("efficientformer_l7", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("swin_tiny_patch4_window7_224", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("swin_base_patch4_window12_384", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("swin_large_patch4_window7_224", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),  # as ConvNeXt-L
    ("swinv2_small_window16_256", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("swinv2_large_window12to24_192to384", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),
    ("swinv2_cr_small_ns_224", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("swinv2_cr_huge_384", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),  # as ConvNeXt-L
    ("edgenext_small_rw", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("mobilenetv5_300m_enc", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("davit_small", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("davit_base_fl", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("davit_giant", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),  # as ConvNeXt-L
    ("botnet50ts_256", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("lambda_resnet26rpt_256", "lamb", 2e-3, 0.7, 0.1, 0.05, 1),
    ("hiera_small_224", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("hiera_base_plus_224", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("hiera_huge_224", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),  # as ConvNeXt-L
    ("maxvit_tiny_rw_224", "adamw", 2e-4, 0.7, 0.8, 0.3, 3),
    ("maxvit_base_tf_384", "adamw", 1e-4, 0.7, 0.8, 0.4, 3),  # as ConvNeXt-B
    ("coatnet_rmlp_3_rw_224", "adamw", 1e-4, 0.7, 0.8, 0.5, 3),  # as ConvNeXt-L
])
def test_sparks_downstream_recipe_is_the_default_per_model_and_overridable(model, opt, base_lr, layer_decay,
                                                                           mixup, drop_path, repeats):
    register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"model={model}"])
        assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.layer_decay) == (opt, base_lr, layer_decay)
        assert (cfg.mixup.mixup_alpha, cfg.drop_path_rate, cfg.ema.decay) == (mixup, drop_path, 0.9999)
        assert cfg.aug.repeats == repeats
        assert compose("finetune", overrides=[f"model={model}", "aug.repeats=2"]).aug.repeats == 2
        cfg = compose("finetune", overrides=[f"model={model}", "optim.base_lr=0.5", "mode=linear"])
        assert (cfg.optim.name, cfg.optim.base_lr, cfg.mixup.mixup_alpha, cfg.ema.decay) == ("sgd", 0.5, 0.0, None)
        assert cfg.aug.repeats == 1


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


# -- repeated augmentation -----------------------------------------------------------------------
def test_with_three_repeats_every_chosen_image_comes_three_times_in_different_crops(colours):
    cfg = config(colours, "aug.repeats=3")
    train_set, _ = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    epoch = [key for batch in EpochBatches(48, 8, seed=0, epoch=0, repeats=3) for key in batch]
    images = [i for i, _ in epoch]
    assert len(epoch) == 48 and len(set(images)) == 16 and all(images.count(i) == 3 for i in images)
    assert len({seed for _, seed in epoch}) == 48  # every copy has its own augmentation
    first = images[0]
    crops = [train_set[key][0][0] for key in epoch if key[0] == first]
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])
    # the next epoch chooses other images; a resumed epoch continues the same batches
    assert {i for batch in EpochBatches(48, 8, 0, 1, repeats=3) for i, _ in batch} != set(images)
    assert list(EpochBatches(48, 8, 0, 0, start=2, repeats=3)) == list(EpochBatches(48, 8, 0, 0, repeats=3))[2:]


def test_repeats_must_be_a_whole_number_of_at_least_one(colours):
    for value in ("1.5", "three", "true"):
        with pytest.raises(finetune.ConfigError, match="aug.repeats must be a whole number of at least 1, got"):
            finetune.validate(config(colours, f"aug.repeats={value}"))


# -- unreadable images -----------------------------------------------------------------------------
def truncate(path: Path) -> None:
    """Cut an image file in half, as an interrupted copy leaves it: the header reads, the pixels do not."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def damaged(colours, tmp_path) -> Path:
    """The colour task with one truncated train image (red/3.png) and one truncated val image (blue/2.png)."""
    root = tmp_path / "damaged"
    shutil.copytree(colours, root)
    truncate(root / "train" / "red" / "3.png")
    truncate(root / "val" / "blue" / "2.png")
    return root


def test_an_unreadable_training_image_is_warned_about_once_and_replaced_by_the_next(damaged, tmp_path):
    cfg = config(damaged, "optim.lr=0.02", "epochs=2")
    train_set, _ = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    bad = [p for p, _ in train_set.items].index(damaged / "train" / "red" / "3.png")
    (image, label), skipped = train_set[(bad, 7)]
    assert [p.name for p, _ in skipped] == ["3.png"] and "truncated" in skipped[0][1]
    (want, want_label), _ = train_set[(bad + 1, 7)]  # the next item (red/4.png), same augmentation
    assert torch.equal(image, want) and label == want_label

    with pytest.warns(UserWarning) as caught:
        finetune.train(cfg, tmp_path / "run")
    unreadable = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(unreadable) == 2, unreadable  # two files, two epochs: one warning per file
    assert any("train/red/3.png" in m for m in unreadable) and any("val/blue/2.png" in m for m in unreadable)
    assert [r["epoch"] for r in records(tmp_path / "run")] == [1, 2]


def test_an_unreadable_validation_image_is_left_out_of_the_counts(damaged, colours):
    cfg = config(damaged)
    _, val_damaged = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    healthy = colours.parent / "healthy"
    if not healthy.exists():
        shutil.copytree(colours, healthy)
        (healthy / "val" / "blue" / "2.png").unlink()
    _, val_without = build_datasets(config(healthy).data, cfg.input_size, cfg.aug, cfg.seed)
    torch.manual_seed(0)
    model = build_model("resnet18", "finetune", num_classes=3, drop_path_rate=0.0)
    with pytest.warns(UserWarning, match=r"val/blue/2\.png"):
        got = finetune.evaluate(model, val_damaged, 4, torch.device("cpu"))
    want = finetune.evaluate(model, val_without, 4, torch.device("cpu"))
    assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_more_than_half_of_the_images_unreadable_stops_the_run_naming_the_problem(colours, tmp_path):
    root = tmp_path / "mostly-bad"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
        shutil.copy(colours / split / "red" / "0.png", root / split / "a" / "0.png")
        for i in range(3):
            shutil.copy(colours / split / "red" / "0.png", root / split / "b" / f"{i}.png")
            truncate(root / split / "b" / f"{i}.png")
    cfg = config(root, "batch_size=2", "mixup.mixup_alpha=0", "ema.decay=null")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"more than 2 of the 4 images of data.train "
                                                                   r"are unreadable \(latest: .*b/\d\.png"):
        finetune.train(cfg, tmp_path / "run")


# -- torchrun ------------------------------------------------------------------------------------
def torchrun(colours: Path, *overrides: str, entry: tuple[str, ...] = ("-m", "spark_sparse.finetune"),
             env: dict | None = None) -> subprocess.CompletedProcess:
    """A 2-process CPU run (gloo) with mixup, EMA and layer decay (the ResNet recipe's) on."""
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *entry, *TINY,
                           f"data.train={colours / 'train'}", f"data.val={colours / 'val'}", "epochs=2",
                           "optim.lr=0.005", "mixup.mixup_alpha=0.2", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(ENV, **(env or {})))


def test_torchrun_trains_evaluates_as_one_process_and_resumes_exactly(colours, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = torchrun(colours, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: finetune resnet18, 12 steps (2 processes)") == 1  # rank 0 alone reports
    recs = records(straight)
    assert [r["epoch"] for r in recs] == [1, 2]
    ckpt = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert len(ckpt["rng_per_rank"]) == 2 and ckpt["ema"] is not None

    # each rank evaluated its half with rank 0's weights: the sums are one process's evaluation
    cfg = config(colours)
    _, val_set = build_datasets(cfg.data, cfg.input_size, cfg.aug, cfg.seed)
    model = build_model("resnet18", "finetune", num_classes=3, drop_path_rate=0.0)
    model.load_state_dict(ckpt["model"])
    alone = finetune.evaluate(model, val_set, 5, torch.device("cpu"))  # other batches than the ranks' 4
    assert (alone["top1"], alone["top5"]) == (recs[-1]["val_top1"], recs[-1]["val_top5"])
    assert alone["loss"] == pytest.approx(recs[-1]["val_loss"], rel=1e-5)

    # stopped by a Ctrl-C at step 4 (mid-epoch 1), then resumed by torchrun: the same run
    proc = torchrun(colours, f"hydra.run.dir={stopped}", entry=(str(ROOT / "tests" / "finetune_stopped.py"),),
                    env={"STOP_AT_STEP": "4"})
    assert proc.returncode != 0 and "stopped by SIGINT at step 4" in proc.stderr, proc.stderr[-3000:]
    assert load_checkpoint(stopped / "checkpoints" / "last.pt")["step"] == 4
    proc = torchrun(colours, f"hydra.run.dir={stopped}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout

    def without_speed(recs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]

    assert without_speed(records(stopped)) == without_speed(recs)
    resumed = load_checkpoint(stopped / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        for name, tensor in ckpt[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
