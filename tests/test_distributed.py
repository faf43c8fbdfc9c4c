"""Data-parallel pretraining: synchronised visible-site batch norm, and torchrun runs that match
a single process with the same global batch (fresh and resumed)."""

import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import spark_sparse.pretrain.app as pretrain
from spark_sparse.run.checkpoint import load_checkpoint
from spark_sparse.run.cli import RUN_DIR_EXISTED, RunDirCallback
from spark_sparse.run.distributed import (SyncVisibleBatchNorm, average_gradients, broadcast_parameters,
                                          convert_sync_batchnorm)
from spark_sparse.run.recipe import register_resolver
from spark_sparse.encoders.families.dfc import cell_norm
from spark_sparse.encoders.masked_engine import MaskedBatchNorm2d
from spark_sparse.encoders.masked_tensor import MaskedTensor
from spark_sparse.model.spark import SparK

from .frozen_rank import TIMEOUT_S, frozen_rank_worker
from .runs import after_checkpoint, records
from .test_pretrain import config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
RUN = ["model=resnet18", "input_size=64", "batch_size=4", "decoder.width=64", "max_steps=4",
       "log_every=1", "save_every=2", "vis_every=1000", "vis_images=1"]
ROWS = (7, 12)  # unequal visible-site counts per rank: the statistics must weigh them


# -- the synchronised norm, against one BatchNorm over the concatenated batch -----------------
def _norm_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        sizes = ROWS[:world] if world > 1 else (sum(ROWS),)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        cases = {
            "rows": (nn.BatchNorm1d(5), torch.randn(sum(sizes), 5, generator=g) * 3 + 2),
            "maps": (nn.BatchNorm2d(5, momentum=None), torch.randn(sum(sizes), 5, 2, 3, generator=g)),
        }
        for name, (ref, x_all) in cases.items():
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5, generator=g)
                ref.bias.uniform_(-1, 1, generator=g)
            sync = convert_sync_batchnorm(nn.Sequential(ref.__class__(5)))[0]
            sync.load_state_dict(ref.state_dict())
            sync.momentum = ref.momentum
            assert isinstance(sync, SyncVisibleBatchNorm)
            for _ in range(2):  # two steps: the running statistics accumulate
                upstream = torch.randn(x_all.shape, generator=g)
                x_ref, x = x_all.clone().requires_grad_(), x_all[lo:hi].clone().requires_grad_()
                out_ref, out = ref(x_ref), sync(x)
                (out_ref * upstream).sum().backward()
                (out * upstream[lo:hi]).sum().backward()
                torch.testing.assert_close(out, out_ref[lo:hi], rtol=1e-5, atol=1e-5, msg=name)
                torch.testing.assert_close(x.grad, x_ref.grad[lo:hi], rtol=1e-4, atol=1e-5, msg=name)
                for p_ref, p in zip(ref.parameters(), sync.parameters()):
                    dist.all_reduce(p.grad)  # what DDP does (as a sum): one loss over all ranks
                    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
                    p.grad, p_ref.grad = None, None
            for key, value in ref.state_dict().items():
                torch.testing.assert_close(sync.state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} {key}")

        # the dense-masked engine's norm: visible sites of (B, C, h, w) maps, 2 images per rank
        ref = MaskedBatchNorm2d(4)
        sync = convert_sync_batchnorm(nn.Sequential(MaskedBatchNorm2d(4)))[0]
        x_all = torch.randn(2 * max(world, 2), 4, 4, 4, generator=g)
        active = torch.rand(x_all.shape[0], 1, 2, 2, generator=g) < 0.5
        active[:, 0, 0, 0] = True
        b = x_all.shape[0] // world
        out_ref = ref(MaskedTensor(x_all, active)).x[rank * b:(rank + 1) * b]
        out = sync(MaskedTensor(x_all[rank * b:(rank + 1) * b], active[rank * b:(rank + 1) * b])).x
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-5, atol=1e-6)

        # GhostNetV2's DFC gate: a norm over the visible cells of pooled maps, by masked sums
        ref = nn.BatchNorm2d(4)
        sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
        cells = (torch.rand(x_all.shape[0], 1, 4, 4, generator=g) < 0.5).float()
        cells[:, 0, 0, 0] = 1.0
        out_ref = cell_norm(ref, x_all, cells)[rank * b:(rank + 1) * b]
        out = cell_norm(sync, x_all[rank * b:(rank + 1) * b], cells[rank * b:(rank + 1) * b])
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_sync_norm_in_one_process_equals_batchnorm(tmp_path):
    _norm_worker(0, 1, str(tmp_path / "init"))  # a process group of one, in this process


def test_sync_norm_over_two_processes_equals_one_batchnorm_over_both(tmp_path):
    """Forward, input and parameter gradients, running statistics, with unequal row counts."""
    mp.spawn(_norm_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


# -- outside DistributedDataParallel (steps replayed from CUDA graphs) --------------------------
def _weights_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # every rank's own weights and gradients
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
        model[1].running_mean.uniform_()
        broadcast_parameters(model)
        torch.manual_seed(0)
        want = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
        want[1].running_mean.uniform_()
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
        grads = [torch.full_like(p, float(rank + 1)) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        model[2].weight.grad = None  # no gradient on any rank: left alone
        average_gradients(model.parameters())
        mean = sum(range(1, world + 1)) / world
        assert all(torch.equal(p.grad, torch.full_like(p, mean)) for p in list(model.parameters())[:-1])
        assert model[2].weight.grad is None and grads[0] is model[0].weight.grad  # in place
    finally:
        dist.destroy_process_group()


def test_weights_from_rank_0_and_gradients_averaged_in_place_over_two_processes(tmp_path):
    mp.spawn(_weights_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_sync_norm_without_a_process_group_is_plain_batchnorm():
    ref = nn.BatchNorm1d(3)
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))[0]
    x = torch.randn(10, 3)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)


@pytest.mark.parametrize("engine", ["sparse", "dense_masked"])
@pytest.mark.parametrize("model", ["resnet18", "mobilenetv3_small_100"])  # batch norm + activation leaves
def test_conversion_reaches_every_norm_and_keeps_the_state_dict(engine, model):
    model = SparK.from_config(config(f"engine={engine}", f"model={model}"))
    before = model.state_dict()
    timm_before = model.encoder.timm_state_dict()
    convert_sync_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, SyncVisibleBatchNorm) for m in norms)
    # encoder (MinkowskiEngine's .bn or masked norms), densify and decoder norms all converted
    assert len(norms) == len([k for k in before if k.endswith("running_var")])
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert list(model.encoder.timm_state_dict()) == list(timm_before)


# -- whole runs: torchrun with 2 gloo processes against one process ---------------------------
def torchrun(*overrides: str, cwd: Path = ROOT, entry: tuple[str, ...] = ("-m", "spark_sparse.pretrain")
             ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *entry, *RUN, "threads=1", *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_run(got: Path, want: Path, after: int = 0) -> None:
    """The same losses and gradient norms at every logged step past ``after`` (relative 1e-4: the
    order of floating-point sums differs), and the same final weights (1e-3 per tensor: LAMB turns
    rounding in near-zero gradient elements into whole updates). A reduction that summed the
    ranks' gradients instead of averaging them would double every gradient norm."""
    got_records = {r["step"]: r for r in records(got)}
    want_records = {r["step"]: r for r in records(want) if r["step"] > after}
    assert sorted(got_records) == sorted(want_records)
    for step, want_record in want_records.items():
        for key in ("loss", "grad_norm"):
            assert got_records[step][key] == pytest.approx(want_record[key], rel=1e-4), (step, key)
    got_model = load_checkpoint(got / "checkpoints" / "last.pt")["model"]
    for name, tensor in load_checkpoint(want / "checkpoints" / "last.pt")["model"].items():
        if tensor.is_floating_point():
            error = float((got_model[name] - tensor).norm() / tensor.norm().clamp_min(1e-12))
            assert error < 1e-3, (name, error)
        else:
            assert torch.equal(got_model[name], tensor), name


def test_two_processes_match_one_process_and_resume_across_world_sizes(tmp_path, monkeypatch):
    single, interrupted = tmp_path / "single", tmp_path / "interrupted"

    def keep_step_2():  # the step-2 checkpoint, as an interrupted run leaves it
        (interrupted / "checkpoints").mkdir(parents=True)
        shutil.copy(single / "checkpoints" / "last.pt", interrupted / "checkpoints" / "last.pt")

    after_checkpoint(monkeypatch, step=2, action=keep_step_2)
    pretrain.train(config(*RUN), single)

    # a fresh 2-process run, in hydra's default time-stamped run directory
    proc = torchrun(cwd=tmp_path)
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("metrics.jsonl")]
    assert len(run_dirs) == 1, "the two ranks must agree on one run directory"
    ddp = run_dirs[0]
    assert proc.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    assert_same_run(ddp, single)
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.pt"]
    assert len(list(ddp.glob("reconstruction_step*.png"))) == 1
    ckpt = load_checkpoint(ddp / "checkpoints" / "last.pt")
    assert list(ckpt["model"]) == list(load_checkpoint(single / "checkpoints" / "last.pt")["model"])
    assert len(ckpt["rng_per_rank"]) == 2
    timm.create_model("resnet18", num_classes=0).load_state_dict(torch.load(ddp / "encoder_timm.pth"))

    # the single-process step-2 checkpoint, finished by 2 processes
    torchrun("resume=true", f"hydra.run.dir={interrupted}")
    assert_same_run(interrupted, single, after=2)


def test_two_processes_replaying_their_steps_take_the_steps_of_distributed_data_parallel(tmp_path):
    """``cuda_graph=true`` under torchrun (with ``sync_bn=false``): DistributedDataParallel's hooks
    do not run in a replayed backward, so the run starts every rank from rank 0's weights and
    averages the gradients after each step. The graphs stood in for on the CPU (tests/replay.py),
    its losses, gradient norms and weights are DDP's. A sum in place of the mean would double
    every gradient norm."""
    entry = (str(ROOT / "tests" / "pretrain_replayed.py"),)
    ddp, replayed = tmp_path / "ddp", tmp_path / "replayed"
    torchrun("sync_bn=false", f"hydra.run.dir={ddp}", entry=entry)
    torchrun("sync_bn=false", "cuda_graph=true", f"hydra.run.dir={replayed}", entry=entry)
    assert_same_run(replayed, ddp)
    assert len(records(replayed)) == 4


# -- a frozen rank ------------------------------------------------------------------------------
def test_the_process_group_timeout_comes_from_the_config(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(RUN_DIR_EXISTED, "")  # restored after the test: the callback notes the run dir
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.update(kwargs))
    register_resolver()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=["dist_timeout_s=7", f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    RunDirCallback().on_run_start(cfg)
    assert seen["timeout"] == timedelta(seconds=7)


def test_a_frozen_rank_makes_the_others_fail_after_the_timeout():
    """Rank 1 freezes until rank 0 has an answer, so the only way rank 0 gets one is the timeout;
    it must come after dist_timeout_s, not after the default of many minutes (bounded at 60 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    outcome, released = context.Queue(), context.Event()
    workers = mp.spawn(frozen_rank_worker, args=(port, outcome, released), nprocs=2, join=False)
    try:
        what, waited = outcome.get(timeout=120)
    finally:
        released.set()
        workers.join(timeout=120)
    assert what == "timed out" and TIMEOUT_S <= waited + 0.5 and waited < 60, (what, waited)
