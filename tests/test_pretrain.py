"""Pretraining runs: outputs, exact resume, divergence, config errors, logging, pictures."""

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

import spark_sparse.pretrain.app as pretrain
from spark_sparse.run.recipe import register_resolver
from spark_sparse.run.checkpoint import atomic_save, load_checkpoint
from spark_sparse.pretrain.data import build_dataset
from spark_sparse.pretrain.optim import build_optimizer
from spark_sparse.model.spark import SparK

from .runs import ROOT, after_checkpoint, assert_one_line_error, cli_in_process, losses, records

# threads unset: the test process's own (under `make test`, its worker's share of the cores)
TINY = ["model=resnet18", "input_size=64", "batch_size=4", "decoder.width=64", "max_steps=6",
        "log_every=1", "save_every=3", "vis_every=1000", "vis_images=2"]


def config(*overrides: str):
    register_resolver()  # ${recipe:KEY} in conf/pretrain.yaml
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("pretrain", overrides=TINY + list(overrides))


def test_a_run_writes_metrics_checkpoint_timm_export_and_picture(tmp_path, monkeypatch):
    built = []
    real_from_config = SparK.from_config.__func__

    def from_config(cls, cfg):  # the model the run trains, as it was built
        built.append(real_from_config(cls, cfg))
        built.append(built[0].encoder.timm_state_dict())
        return built[0]

    monkeypatch.setattr(SparK, "from_config", classmethod(from_config))
    summary = pretrain.train(config(), tmp_path)
    assert summary["step"] == 6
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert {"step", "loss", "lr", "images_per_s", "weight_decay", "grad_norm"} <= r.keys()
        assert r["images_per_s"] > 0 and r["loss"] > 0
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "step", "rng", "config"} <= ckpt.keys()
    assert ckpt["step"] == 6 and ckpt["config"]["model"] == "resnet18"
    encoder = torch.load(tmp_path / "encoder_timm.pth")
    timm.create_model("resnet18", num_classes=0).load_state_dict(encoder, strict=True)
    # what was exported is what the run trained: every convolution moved away from its start
    start = built[1]
    moved = [k for k, v in encoder.items() if k.endswith("conv1.weight") and not torch.equal(v, start[k])]
    assert len(moved) == len([k for k in encoder if k.endswith("conv1.weight")]) > 0
    assert list(tmp_path.glob("reconstruction_step*.png"))


def test_profiled_steps_leave_their_trace_and_a_summary_in_the_run_directory(tmp_path, capsys, monkeypatch):
    """``profile.start=2 profile.steps=3``: steps 3 to 5 under torch.profiler, as the run takes
    them; on the CPU the trace alone (a GPU's idle share is measured on CUDA only). A run that
    ends inside the window keeps what it profiled; a resumed run warms up again, so its window
    starts ``profile.start`` steps after its checkpoint."""
    import json

    after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config("profile.start=1", "profile.steps=1"), tmp_path / "resumed")
    pretrain.train(config("resume=true", "profile.start=1", "profile.steps=1"), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "profile" / "summary.json").read_text())["steps"] == [5, 5]
    pretrain.train(config("profile.start=2", "profile.steps=3"), tmp_path / "full")
    summary = json.loads((tmp_path / "full" / "profile" / "summary.json").read_text())
    assert summary["steps"] == [3, 5] and summary["device"] == "cpu" and summary["gpu_idle_share"] is None
    events = json.loads((tmp_path / "full" / "profile" / summary["trace"]).read_text())["traceEvents"]
    window = [e for e in events if e.get("name") == "spark_sparse.steps"]
    # the steps' own work inside the window: the optimizer's update among it
    assert len(window) == 1 and any("Optimizer.step" in e.get("name", "") for e in events)
    assert "profiled steps 3-5: trace" in capsys.readouterr().out
    pretrain.train(config("profile.start=4", "profile.steps=10"), tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "profile" / "summary.json").read_text())["steps"] == [5, 6]


def test_the_recipe_fits_a_fixed_batch():
    """The model, the optimiser and the lr of the bundled run learn: 40 LAMB steps on four bundled
    photos with one mask take the reconstruction loss below half of where it started (measured:
    1.23 -> 0.45). With an lr of 0 or gradients that do not reach the weights it would stay put."""
    cfg = config("batch_size=16")  # the bundled run's batch, so its lr
    data = build_dataset("bundled", cfg.input_size)
    images = torch.stack([data[(i, i)] for i in range(4)])
    torch.manual_seed(0)
    model = SparK.from_config(cfg).train()
    optimizer = build_optimizer(model, cfg.optim, cfg.batch_size)
    active = model.random_mask(images)
    first = None
    for _ in range(40):
        loss = model(images, active)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


@pytest.mark.parametrize("changes", [(), ("decoder.checkpoint=true",)], ids=["as it was", "decoder checkpointed"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, monkeypatch, changes):
    # a memory setting may change on resume: the decoder's recomputed activations are the same
    straight = tmp_path / "straight"
    pretrain.train(config(), straight)

    interrupted = tmp_path / "interrupted"
    after_checkpoint(monkeypatch, step=3)  # the run is killed right after its step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config(), interrupted)
    assert load_checkpoint(interrupted / "checkpoints" / "last.pt")["step"] == 3
    pretrain.train(config("resume=true", *changes), interrupted)
    assert losses(interrupted) == losses(straight)  # same process, same threads: bit for bit


def test_a_run_begun_before_a_config_key_existed_resumes_as_it_began(tmp_path, monkeypatch, capsys):
    """Runs begun before optim.timm_no_weight_decay decayed their position tables (TinyViT's attention
    biases): resumed by today's code, they still do, from the optimizer state they saved."""
    before = ["model=tiny_vit_5m_224", "optim.timm_no_weight_decay=false"]
    straight = tmp_path / "straight"
    pretrain.train(config(*before), straight)

    interrupted = tmp_path / "interrupted"
    after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(config(*before), interrupted)
    monkeypatch.undo()
    path = interrupted / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    del ckpt["config"]["optim"]["timm_no_weight_decay"]  # as the older code wrote it
    del ckpt["config"]["tf32"]  # a key whose default behaves as before: not compared, and said so
    atomic_save(ckpt, path)
    pretrain.train(config("model=tiny_vit_5m_224", "resume=true"), interrupted)
    out = capsys.readouterr().out
    assert "optim.timm_no_weight_decay=False, as the checkpoint's run began before the key existed" in out
    assert "tf32=True from this command: the checkpoint's run began before the key existed, so it was not " \
        "compared" in out
    assert losses(interrupted) == losses(straight)
    assert load_checkpoint(path)["config"]["optim"]["timm_no_weight_decay"] is False


def test_each_step_reads_its_loss_only_once_the_next_batch_is_ready(tmp_path, monkeypatch):
    """Reading the loss waits for the GPU to finish the step: before it, while the GPU works, the
    next step's images are loaded and sent and its mask is planned with the tables this step read."""
    events = []
    real_next, real_update = pretrain.Pretraining.next_batch, pretrain.Run.update

    def next_batch(self, run, model, batches, step, like):
        batch = real_next(self, run, model, batches, step, like)
        events.append(("next batch", step, like is not None, batch is not None))
        return batch

    def update(self, *args, **kwargs):
        events.append(("loss read", self.step))
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(pretrain.Pretraining, "next_batch", next_batch)
    monkeypatch.setattr(pretrain.Run, "update", update)
    pretrain.train(config("max_steps=3"), tmp_path / "run")
    assert events == [("next batch", 0, False, True),
                      ("next batch", 1, True, True), ("loss read", 0),
                      ("next batch", 2, True, True), ("loss read", 1),
                      ("next batch", 3, True, False), ("loss read", 2)]


def test_resume_refuses_a_different_experiment_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(pretrain.ConfigError, match="no checkpoint"):
        pretrain.train(config("resume=true"), tmp_path)
    pretrain.train(config("max_steps=2"), tmp_path)
    with pytest.raises(pretrain.ConfigError, match="already holds a checkpoint"):
        pretrain.train(config("max_steps=2"), tmp_path)
    with pytest.raises(pretrain.ConfigError, match="different mask_ratio"):
        pretrain.train(config("max_steps=2", "resume=true", "mask_ratio=0.75"), tmp_path)
    # the data is part of the experiment too (the number of loader workers is not)
    with pytest.raises(pretrain.ConfigError, match="different data.kind, data.root"):
        pretrain.train(config("max_steps=2", "resume=true", "data=imagefolder", f"data.root={tmp_path}"), tmp_path)
    with pytest.raises(pretrain.ConfigError, match="different data.scale"):
        pretrain.train(config("max_steps=2", "resume=true", "data.scale=[0.5,1.0]"), tmp_path)
    with pytest.raises(pretrain.ConfigError, match="different decoder.width"):
        pretrain.train(config("max_steps=2", "resume=true", "decoder.width=32"), tmp_path)


def test_resuming_a_finished_run_says_so_and_reports_its_final_loss(tmp_path, capsys):
    first = pretrain.train(config("max_steps=2"), tmp_path)
    again = pretrain.train(config("max_steps=2", "resume=true"), tmp_path)
    assert again["step"] == 2 and again["loss"] == first["loss"]
    assert "had finished (2 of 2 steps): nothing left to train" in capsys.readouterr().out


def test_each_step_queues_its_update_before_it_waits_to_read_its_loss(tmp_path, monkeypatch):
    """On a GPU reading the loss (and gradient norm: one read) waits for everything queued; the
    optimizer's update is queued before that, so that the GPU does not idle while it is."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    events = []
    real_tolist = torch.Tensor.tolist

    def tolist(tensor):
        if tensor.dtype == torch.float64:  # the run's one read a step (a mask's are integers)
            events.append("read")
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    hook = register_optimizer_step_pre_hook(lambda *_: events.append("update"))
    try:
        pretrain.train(config("max_steps=3"), tmp_path)
    finally:
        hook.remove()
    assert events == ["update", "read"] * 3


def test_the_progress_bar_is_redrawn_at_most_once_a_second_not_once_a_step(tmp_path, monkeypatch, capsys):
    """A run's stderr is often a log file, where every redraw is another line; on a GPU a redraw
    is also CPU time between steps. With the clock stopped no second passes: only the bar's first
    and last drawings are written."""
    import tqdm.std

    monkeypatch.setattr(tqdm.std, "time", lambda: 1000.0)
    pretrain.train(config(), tmp_path)
    drawn = capsys.readouterr().err
    assert drawn.count("SparK resnet18:") == 2 and drawn.count("loss=") == 1, drawn


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_forward = SparK.forward
    calls = {"n": 0}

    def forward(self, images, active=None):
        out = real_forward(self, images, active)
        calls["n"] += 1
        if self.training and calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SparK, "forward", forward)
    with pytest.raises(pretrain.TrainingDiverged, match=r"step 5.*last good checkpoint .*step 3"):
        pretrain.train(config(), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    assert not (tmp_path / "encoder_timm.pth").exists()


@pytest.mark.parametrize("override,message", [
    ("mask_ratio=1.0", r"mask_ratio must be in \[0, 1\)"),
    ("input_size=100", "input_size must be a positive multiple of 32"),
    ("model=resnet_nope", "unknown model 'resnet_nope'"),
    # a loss that is identically 0 trains nothing: one patch per image stays visible
    ("input_size=32", "hides none of the 1 patch"),
    ("mask_ratio=0", "mask_ratio 0 at input_size 64 hides none of the 4 patch"),
    ("mask_ratio=0.1", "hides none of the 4 patch"),  # round(4 * 0.9) = 4 stay visible
    ("log_every=0", "log_every must be a whole number of at least 1, got 0"),
    ("save_every=0", "save_every must be a whole number of at least 1, got 0"),
    ("vis_every=0", "vis_every must be a whole number of at least 1, got 0"),
    ("vis_images=0", "vis_images must be a whole number of at least 1, got 0"),
    ("threads=-1", "threads must be a whole number of at least 1 or null, got -1"),
    ("epochs=0", "epochs must be positive"),
    ("dist_timeout_s=0", "dist_timeout_s must be positive"),
    ("data=imagefolder", r"data.root must be set \(add data.root=... to the command line\)"),
    # keys whose type or range would fail later or train nonsense: refused up front, by name
    ("decoder.width=0", "decoder.width must be a positive multiple of 32, got 0"),
    ("decoder.hierarchy=0", "decoder.hierarchy must be a whole number from 1 to 4, got 0"),
    ("drop_path_rate=1.5", r"drop_path_rate must be in \[0, 1\), got 1.5"),
    ("mask_ratio=abc", r"mask_ratio must be in \[0, 1\), got 'abc'"),
    ("optim.name=sgdx", "optim.name must be one of lamb, adamw, got 'sgdx'"),
    ("optim.base_lr=-1e-3", "optim.base_lr must be positive, got -0.001"),
    ("optim.clip_grad=-1", "optim.clip_grad must be positive or null, got -1"),  # else: gradient ascent
    ("data.num_workers=-1", "data.num_workers must be a whole number of at least 0, got -1"),
    ("+optim.lrr=0.1", r"unknown config key optim.lrr \(did you mean"),
    ("cuda_graph=maybe", "cuda_graph must be true or false, got 'maybe'"),
    ("cuda_graph=true", "cuda_graph=true replays each step from a CUDA graph: it needs device=cuda"),
    ("profile.steps=-1", "profile.steps must be a whole number of at least 0, got -1"),
    ("profile.start=0", "profile.start must be a whole number of at least 1, got 0"),
])
def test_config_errors_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(pretrain.ConfigError, match=message):
        pretrain.train(config(override), tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_decoder_takes_every_scale_of_the_encoder_by_default_and_no_more(tmp_path):
    # Visformer's encoders output three scales (strides 8, 16, 32), the other families' four
    assert config().decoder.hierarchy == 4 and config("model=visformer_tiny").decoder.hierarchy == 3
    with pytest.raises(pretrain.ConfigError, match=r"^decoder.hierarchy=4: the encoders of visformer_tiny output 3 "
                                                   r"scales \(strides 8, 16, 32\); use 1..3$"):
        pretrain.train(config("model=visformer_tiny", "input_size=224", "decoder.hierarchy=4"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_mobilevit_at_an_input_size_of_no_whole_2x2_blocks_at_stride_32_fails_before_any_work(tmp_path):
    # timm resizes such a map bilinearly, which has no sparse twin (encoders/families/mobilevit.py)
    with pytest.raises(pretrain.ConfigError, match="^model mobilevit_xxs unfolds its maps into 2x2 blocks of sites, "
                                                   "at stride 32 too: input_size must be a multiple of 64, got 96$"):
        pretrain.train(config("model=mobilevit_xxs", "input_size=96"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_botnet_above_its_own_input_size_fails_before_any_work(tmp_path):
    # its relative position tables reach the map of its own size (encoders/families/byoanet.py)
    with pytest.raises(pretrain.ConfigError, match=r"^model botnet26t_256 has relative position tables that reach "
                                                   r"the map of its own input size: input_size must be at most 256, "
                                                   r"got 288$"):
        pretrain.train(config("model=botnet26t_256", "input_size=288"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model,size,why,multiple", [
    # its grid attention spreads groups of 7x7 sites over each map (encoders/families/maxxvit.py)
    ("maxvit_tiny_rw_224", 96, r"attends within groups and grids of sites that must be whole at every stride "
                               r"\(timm asserts so\)", 224),
    # timm pads a map of part windows with zeros that its attention reads as keys (encoders/families/hieradet.py)
    ("sam2_hiera_tiny", 256, r"attends within windows that must be whole at every stride \(timm pads others with "
                             r"keys\)", 224),
    # halo attention cuts each map into blocks of 8x8 sites (encoders/families/byoanet.py)
    ("halonet26t", 128, "cuts its maps into whole blocks of halo attention", 256),
])
def test_a_model_at_an_input_size_off_its_groups_of_sites_fails_before_any_work(tmp_path, model, size, why,
                                                                                 multiple):
    with pytest.raises(pretrain.ConfigError, match=rf"^model {model} {why}: input_size must be a multiple of "
                                                   rf"{multiple}, got {size}$"):
        pretrain.train(config(f"model={model}", f"input_size={size}"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model,why", [
    ("hiera_tiny_224", "adds a position embedding made for its own input size"),  # encoders/families/hiera.py
    ("gcvit_xxtiny", "has windows made for its own input size"),  # encoders/families/gcvit.py
    ("mvitv2_tiny", "indexes its relative positions from the corner of its own input size's map"),  # mvitv2.py
    ("efficientformerv2_s0", "biases its attention by offsets on its own input size's maps"),  # efficientformer_v2.py
    ("pvt_v2_b2_li", "pools its keys to 7x7 cells, one per patch at its own input size"),  # encoders/families/pvt_v2.py
    ("visformer_tiny", "adds position embeddings made for its own input size"),  # encoders/families/visformer.py
    ("nest_tiny", "adds position embeddings made for its own input size"),  # encoders/families/nest.py
])
def test_a_model_off_its_own_input_size_fails_before_any_work(tmp_path, model, why):
    with pytest.raises(pretrain.ConfigError, match=rf"^model {model} {why}: input_size must be 224, got 256$"):
        pretrain.train(config(f"model={model}", "input_size=256"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides,world_size,why", [
    (["engine=dense_masked"], 1, "the dense-masked engine reads the GPU back"),
    ([], 2, "under torchrun the synchronised norms' collectives run inside the step.*set sync_bn=false"),
    (["precision=fp16"], 1, "fp16's loss scaling is not captured; use precision=bf16"),
])
def test_steps_from_a_cuda_graph_need_the_sparse_engine_unsynchronised_norms_and_no_loss_scaling(
        overrides, world_size, why):
    from spark_sparse.pretrain.checks import check_graphable

    check_graphable(config("device=cuda", "cuda_graph=true"), 1)
    check_graphable(config("device=cuda", "cuda_graph=true", "sync_bn=false"), 2)
    with pytest.raises(pretrain.ConfigError, match=why):
        check_graphable(config("device=cuda", "cuda_graph=true", *overrides), world_size)


def test_wandb_online_without_an_api_key_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(pretrain.ConfigError, match="logger.mode=online needs a wandb API key"):
        pretrain.train(config("logger=wandb", "logger.mode=online"), tmp_path)


@pytest.mark.parametrize("overrides,message", [
    (["mask_ratio=1.5"], "error: mask_ratio must be in [0, 1), got 1.5"),
    (["data=imagefolder"], "error: data.root must be set"),
    (["data=imagefolder", "data.root=pyproject.toml"], "pyproject.toml is a file; it must be a folder"),
    (["data=imagefolder", "data.root={bad}"], "none of the 3 images under"),
    # a folder given without data=imagefolder: the bundled photos were trained on instead, silently
    (["data.root={bad}"], "is read by data=imagefolder only: add data=imagefolder"),
    # what hydra cannot compose: hydra says it in several lines (a misspelt key: "use +mask_ratoi=0.7")
    (["mask_ratoi=0.7"], "error: unknown config key mask_ratoi (did you mean mask_ratio?)"),
    (["optim=sgd"], "error: optim=sgd is not one of optim's options (adamw, lamb)"),
    (["mask_ratio=0.4,0.6"], "error: mask_ratio=0.4,0.6 is several values: add -m to sweep over them"),
    (["model"], "error: cannot read the override 'model' (missing EQUAL at '<EOF>')"),
])
def test_command_line_errors_are_one_clear_line(tmp_path, overrides, message):
    run, bad = tmp_path / "run", tmp_path / "unreadable"
    bad.mkdir()
    for name in ["a.jpg", "b.png", "c.png"]:
        (bad / name).write_bytes(b"not an image")
    overrides = [o.format(bad=bad) for o in overrides]
    assert_one_line_error(cli_in_process("spark_sparse.pretrain", *overrides, f"hydra.run.dir={run}"), message)
    assert not run.exists()  # a refused command leaves no trace


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save({"step": 2, "boom": Unpicklable()}, path)
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_wandb_logger_runs_offline(tmp_path):
    pretrain.train(config("logger=wandb", "max_steps=2"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_visualize_command_draws_any_checkpoint(tmp_path):
    pretrain.train(config("max_steps=2"), tmp_path)
    # a checkpoint from before decoder.checkpoint existed: drawn with the plain decoder
    last = tmp_path / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=False)
    del saved["config"]["decoder"]["checkpoint"]
    torch.save(saved, last)
    out = tmp_path / "picture.png"
    proc = cli_in_process("spark_sparse.visualize", str(tmp_path), "--out", str(out), "--num-images", "2")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
