"""A SparK step captured in a CUDA graph and replayed for later batches (spark_sparse/model/graphed.py).

A replay runs the kernels of the captured step on the tensors they read then, so a later batch is
copied into the captured batch's tensors: its images and every index table of its plan
(``SparK.copy_plan_``). What the CPU establishes:

* a batch planned like the captured one queues the captured step's operations again, in order,
  on tensors of the same shapes, with the same constants, and copies nothing: for every family
  of the device audit (tests/test_device.py), on PyTorch's ``meta`` device as that audit runs
  (``--device cuda``: on the GPU). A branch taken on the mask's values, or a number read from it
  into a kernel's arguments, would be frozen at capture and wrong for every later batch.
* a plan overwritten with a later batch's gives that batch's loss and gradients exactly (every
  table the step reads is copied, none is left stale), for the operators of three families;
  plans that cannot be overwritten are refused in one line.
* pretraining with ``cuda_graph=true``, its capture and replays stood in for by eager steps on
  the captured tensors, takes the eager run's steps (each batch copied in, the optimizer on the
  gradients the replays write, never cleared), and so do the benchmark's replayed passes.

That the replay itself equals the eager step is ``pytest --device cuda``'s (tests/test_device.py),
which needs a GPU.
"""

import copy

import pytest
import torch

from .conftest import HAS_MINKOWSKI, WITHOUT_MINKOWSKI

if not HAS_MINKOWSKI:  # this module's subject is the sparse engine
    pytest.skip(WITHOUT_MINKOWSKI, allow_module_level=True)

from spark_sparse import SparseEncoder, random_active
from spark_sparse.model.graphed import GraphedStep
from spark_sparse.model.spark import SparK
from spark_sparse.sparse import gemm_conv

from .device_audit import OperationTrace
from .replay import EagerReplay
from .test_device import AUDIT_SIZES, AUDITED, audit_device


def traced(step, *args) -> OperationTrace:
    trace = OperationTrace()
    with trace:
        step(*args)
    return trace


def assert_replays_the_capture(capture: OperationTrace, later: OperationTrace) -> None:
    assert not later.copies, f"copied to the device in a planned step: {dict(later.copies)}"
    assert not later.mixed and not later.host_reads
    difference = capture.first_difference(later)
    assert difference is None, f"a later batch queues other operations than the captured one: {difference}"


@pytest.mark.parametrize("name", AUDITED)
def test_a_batch_planned_like_the_captured_one_queues_the_captured_operations(timm_models, name, device):
    where = audit_device(device)
    encoder = SparseEncoder.from_timm(copy.deepcopy(timm_models(name, **AUDITED[name]))).train().to(where)
    h, w = AUDIT_SIZES.get(name, (128, 160))  # a 4x5 grid: every tile shape
    images = torch.randn(4, 3, h, w).to(where)
    g = torch.Generator().manual_seed(0)
    patch = encoder.stride  # the mask's: 32, NesT's 16
    first, second = (random_active(4, (h // patch, w // patch), 0.6, g) for _ in range(2))

    def step(active, layout) -> None:
        sum(f.sum() for f in encoder.dense_features(images, active, layout)).backward()

    captured = encoder.plan(first, where)
    step(first, captured)  # the warm-up before a capture: the layers make the tables they read
    capture = traced(step, first, captured)
    later = encoder.plan(second, where, like=captured)
    assert_replays_the_capture(capture, traced(step, second, later))
    encoder.copy_plan_(captured, later)  # and every table the step reads keeps its shape


@pytest.mark.parametrize("densify_norm", ["bn", "ln"])
def test_a_whole_spark_step_planned_like_the_captured_one_queues_the_captured_operations(
        timm_models, densify_norm, device):
    """Densify's mask tokens, the decoder and the loss read each scale's visible sites from the plan."""
    where = audit_device(device)
    encoder = SparseEncoder.from_timm(copy.deepcopy(timm_models("resnet18")))
    model = SparK(encoder, decoder_width=64, densify_norm=densify_norm).train().to(where)
    images = torch.randn(4, 3, 128, 160).to(where)
    g = torch.Generator().manual_seed(0)
    first, second = (random_active(4, (4, 5), 0.6, g) for _ in range(2))

    def step(plan) -> None:
        model(images, plan)["loss"].backward()

    captured = model.plan(first, where)
    step(captured)
    capture = traced(step, captured)
    later = model.plan(second, where, like=captured)
    assert_replays_the_capture(capture, traced(step, later))
    model.copy_plan_(captured, later)


def loss_and_grads(model: SparK, images: torch.Tensor, plan) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(images, plan)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def masks(model: SparK, count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [model.random_mask(torch.zeros(3, 3, 64, 96), generator=g) for _ in range(count)]


# ResNet (tiles, window GEMMs, max pooling), ConvNeXt (patchify, depthwise on tiles and canvas,
# layer norms), EfficientNet (strided depthwise, squeeze-excitation's per-image means)
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "efficientnet_b0"])
def test_a_plan_overwritten_with_a_later_batch_gives_that_batchs_step(name, monkeypatch):
    # the GPU's path for small blocks, whose tables keep their shape from batch to batch
    monkeypatch.setitem(gemm_conv.SMALL_BLOCK_PATHS, "cpu", "windows")
    torch.manual_seed(0)
    model = SparK.build(name, decoder_width=32).double().train()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 3, 64, 96, dtype=torch.float64, generator=g) for _ in range(3)]
    first, *later = masks(model, 3)
    captured = model.plan(first, "cpu")
    loss_and_grads(model, images[0], captured)  # the captured step: its layers make their tables
    for x, active in zip(images[1:], later):
        want = loss_and_grads(model, x, model.plan(active, "cpu"))
        model.copy_plan_(captured, model.plan(active, "cpu", like=captured))
        got = loss_and_grads(model, x, captured)
        assert torch.equal(got[0], want[0])
        assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])


def test_a_plan_is_overwritten_only_with_a_batch_of_as_many_visible_patches_per_image():
    model = SparK.build("resnet18", decoder_width=32, mask_ratio=0.5)
    first, other = masks(model, 2)
    captured = model.plan(first, "cpu")
    fewer = other.clone()
    fewer[0].view(-1)[fewer[0].view(-1).nonzero()[0]] = False
    with pytest.raises(ValueError, match="as many visible patches per image"):
        model.copy_plan_(captured, model.plan(fewer, "cpu"))
    with pytest.raises(ValueError, match="as many visible patches per image"):
        model.copy_plan_(captured, model.plan(other[:2], "cpu"))


def test_offset_pairs_which_vary_from_batch_to_batch_are_refused(monkeypatch):
    monkeypatch.setitem(gemm_conv.SMALL_BLOCK_PATHS, "cpu", "offsets")
    model = SparK.build("resnet18", decoder_width=32).train()
    first, *later = masks(model, 8)
    captured = model.plan(first, "cpu")
    model(torch.randn(3, 3, 64, 96), captured)
    with pytest.raises(ValueError, match="differs in shape in the new batch"):
        for active in later:  # some batch's neighbours differ from the first's
            model.copy_plan_(captured, model.plan(active, "cpu", like=captured))


def test_the_dense_masked_engine_and_a_cpu_step_are_not_captured():
    dense = SparK.build("resnet18", engine="dense_masked", decoder_width=32)
    (active,) = masks(dense, 1)
    with pytest.raises(ValueError, match="cannot be captured and replayed"):
        dense.copy_plan_(dense.plan(active, "cpu"), dense.plan(active, "cpu"))
    sparse = SparK.build("resnet18", decoder_width=32)
    with pytest.raises(ValueError, match="needs the images on a CUDA device"):
        GraphedStep(sparse, lambda x, plan: sparse(x, plan)["loss"], torch.zeros(3, 3, 64, 96),
                    sparse.plan(active, "cpu"))


def test_pretraining_that_replays_its_first_step_takes_the_eager_runs_steps(tmp_path, monkeypatch):
    """The pretraining app's side of ``cuda_graph=true``, on the CPU: each batch's images and plan
    go into the captured ones, the optimizer steps on the gradients the replays write, and the
    run's losses are the eager run's, step for step."""
    import spark_sparse.pretrain.app as pretrain
    import spark_sparse.pretrain.checks as checks

    from .runs import losses
    from .test_pretrain import config

    monkeypatch.setitem(gemm_conv.SMALL_BLOCK_PATHS, "cpu", "windows")
    pretrain.train(config(), tmp_path / "eager")
    monkeypatch.setattr(pretrain, "GraphedStep", EagerReplay)
    monkeypatch.setattr(checks, "check_graphable", lambda cfg, world_size: None)  # CUDA's alone
    pretrain.train(config("cuda_graph=true"), tmp_path / "replayed")
    assert len(losses(tmp_path / "replayed")) == 6
    assert losses(tmp_path / "replayed") == losses(tmp_path / "eager")


@pytest.mark.parametrize("pass_name", ["fwd_bwd", "train_step"])
def test_the_benchmarks_replayed_passes_compute_its_eager_passes(pass_name, monkeypatch):
    """``sparse_vs_dense cuda_graph=true``'s passes, the capture stood in for as above: each later
    mask (raw, or planned ahead as ``idle_of`` hands it) gives the eager pass's gradients."""
    import benchmarks.sparse_vs_dense as bench

    monkeypatch.setitem(gemm_conv.SMALL_BLOCK_PATHS, "cpu", "windows")
    monkeypatch.setattr(bench, "GraphedStep", EagerReplay)
    torch.manual_seed(0)
    model = SparK.build("resnet18", decoder_width=32).double().train()
    twin = copy.deepcopy(model)  # the eager passes' (train mode: no gradient reads a running statistic)
    images = torch.randn(3, 3, 64, 96, dtype=torch.float64)
    replayed, eager = bench.make_graphed_pass(pass_name, model, images, "fp32"), bench.make_pass(
        pass_name, twin, images, "fp32")
    first, second, third = masks(model, 3)
    replayed(first)  # the capture
    for active in (second, model.plan(third, "cpu", like=model.plan(second, "cpu"))):
        replayed(active)
        twin.zero_grad(set_to_none=True)
        eager(active if isinstance(active, torch.Tensor) else active.active)
        want = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def bench_config(**overrides):
    """sparse_vs_dense's config with cuda_graph=true for a tiny ResNet-18 run on the CPU."""
    from omegaconf import OmegaConf

    import benchmarks.sparse_vs_dense as bench

    cfg = OmegaConf.load(bench.Path(bench.__file__).parents[1] / "conf/bench/sparse_vs_dense.yaml")
    cfg.merge_with({"models": ["resnet18"], "batch_size": 2, "input_size": 64, "mask_ratios": [0.6],
                    "decoder_width": 32, "cuda_graph": True, **overrides})
    return cfg


def test_with_cuda_graph_the_benchmark_times_the_sparse_engine_a_third_time_replayed(monkeypatch, tmp_path):
    """``sparse_vs_dense cuda_graph=true`` (its capture stood in for as above): every pass timed
    for dense masking, the sparse engine and the same model replayed, side by side in one process;
    results.md gives the replayed engine its own table against the same dense masking."""
    import benchmarks.sparse_vs_dense as bench
    from benchmarks.report import write_markdown

    class Timed(EagerReplay):
        """A timed pass sets the gradients to None first (each engine's pass makes its own): a
        graph's replay writes into the tensors it captured all the same."""

        def replay(self) -> None:
            for p, captured in zip(self.model.parameters(), self.grads):
                p.grad = captured
            super().replay()

    monkeypatch.setitem(gemm_conv.SMALL_BLOCK_PATHS, "cpu", "windows")
    monkeypatch.setattr(bench, "GraphedStep", Timed)
    cfg = bench_config(passes=["fwd_bwd", "train_step"], repeats=2, warmup=1)
    cpu = torch.device("cpu")
    memory = {(p, e): (10.0 if e == "sparse" else 20.0, "test") for p in cfg.passes for e in bench.ENGINES}
    common = {"device": "cpu", "device_name": "a CPU", "threads": 1, "precision": "fp32", "torch": torch.__version__,
              "minkowski_engine": "0.5.4", "input_size": 64, "repeats": 2, "warmup": 1, "cuda_graph": True}
    records = bench.bench_ratio(bench.build_pair("resnet18", cfg, cpu), "resnet18", 2, 0.6, cfg, cpu, common, memory)
    assert [(r["pass"], r["engine"]) for r in records] == [
        (p, e) for p in cfg.passes for e in ("sparse", "dense_masked", "sparse_graph")]
    replayed = [r for r in records if r["engine"] == "sparse_graph"]
    assert all(len(r["times_s"]) == 2 and r["images_per_s"] > 0 and r["peak_mem_mb"] == 10.0 for r in replayed)
    table = write_markdown(records, tmp_path / "results.md")
    eager, graphs = table.split("## The sparse engine replayed from CUDA graphs")
    assert eager.count("| resnet18 | 2 | 0.60 | fwd_bwd |") == graphs.count("| resnet18 | 2 | 0.60 | fwd_bwd |") == 1


def test_a_pass_that_cannot_be_captured_leaves_the_other_engines_timed(monkeypatch, caplog):
    """A capture that fails on the GPU (an operation a graph refuses) is logged with its error,
    and the run keeps the eager engines' figures rather than losing them."""
    import benchmarks.sparse_vs_dense as bench

    class Refused(EagerReplay):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench, "GraphedStep", Refused)
    cfg = bench_config(passes=["fwd_bwd"], repeats=1, warmup=0)
    cpu = torch.device("cpu")
    memory = {("fwd_bwd", e): (None, "test") for e in bench.ENGINES}
    records = bench.bench_ratio(bench.build_pair("resnet18", cfg, cpu), "resnet18", 2, 0.6, cfg, cpu, {}, memory)
    assert [r["engine"] for r in records] == ["sparse", "dense_masked"]
    assert "could not be replayed from a CUDA graph" in caplog.text
    assert "operation not permitted when stream is capturing" in caplog.text
