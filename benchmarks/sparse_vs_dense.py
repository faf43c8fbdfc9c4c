"""Sparse encoder vs SparK's dense-masked simulation: speed, exact FLOPs and peak memory.

``python -m benchmarks.sparse_vs_dense models=[resnet18,resnet50] batch_size=[16,8] mask_ratios=[0.6] ...``

``batch_size`` is one number for every model, or a list with one per model. ``precision`` (fp32,
bf16; fp16 on CUDA) is the same for both engines: forward passes under its autocast, backward
outside it, as a mixed-precision training step runs them.

For every model both engines are built from one timm model (so they hold the same weights) with
the same densify/decoder weights, and every pass sees the same images and masks on both. Passes:

* ``fwd``: encoder forward in train mode (batch statistics, as in pretraining) under no_grad;
* ``fwd_bwd``: encoder forward, then backward of the sum of the raw stage outputs
  (sparse features / masked dense maps): the encoder's own work, no densify to dense maps;
* ``train_step``: the whole SparK forward (encoder, densify, decoder, loss) and backward. The
  optimizer update is the same for both engines and left out.

Timed repeats alternate which engine goes first, so slow phases of the machine hit both; the
median of the repeats after ``warmup`` untimed runs is reported. Each pass gets its mask planned
(``SparK.plan``, like the mask before) during the engine's pass before, as pretraining plans each
batch during the step before: a timed pass queues its work, plans the next mask (``plan_s``: the
CPU's time for it), then waits for the GPU; on a GPU the planning overlaps the GPU's work as far
as the GPU has work queued, on the CPU it adds to the pass. Memory is measured before any
timing, on the first timed batch, after one unmeasured run (benchmarks/memory.py); FLOPs in one
counting forward on that batch (benchmarks/flops.py). On CUDA, after the timing, the first
``idle_steps`` timed masks run once more back to back under torch.profiler for the share of that
time the GPU idles (spark_sparse/run/profiling.py), whole SparK steps twice: each making its mask's
tables as its layers ask, and each mask planned while the GPU runs the step before
(``gpu_idle_share_planned``, as pretraining runs them), and each timed pass also records how long
the CPU took to queue it (``queue_s``: until the pass returned, before waiting for the GPU): a
pass whose queueing takes about its whole time keeps the GPU waiting for launches. Masks are made
on the CPU, as pretraining makes them. The run directory receives results.json, results.md,
speedup.png and flops_ratio.png.

``cuda_graph=true`` (CUDA): the sparse engine is timed a third time in the same process
(``engine: sparse_graph``), its passes captured once in a CUDA graph and replayed
(spark_sparse/model/graphed.py), each timed pass copying its mask's tables into the captured ones,
replaying, and planning the next mask while the GPU replays; dense masking runs as it is (it reads
the device back and cannot be captured). Its peak memory is recorded as the eager pass's;
results.md gives it a table of its own. A pass that cannot be captured is logged with its error,
and the other engines are timed as ever.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import hydra
import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
from spark_sparse import MaskedDenseEncoder, SparseEncoder, random_active
from spark_sparse.run.runtime import configure_cpu, configure_cuda, returning_freed_memory
from spark_sparse.encoders.sparse_engine import CONV_IMPLS
from spark_sparse.model.graphed import GraphedStep
from spark_sparse.model.spark import MaskPlan, SparK
from spark_sparse.precision import autocast, check_precision
from spark_sparse.sparse.depthwise import DepthwiseConvolution
from spark_sparse.sparse.patch_conv import PatchifyConvolution
from spark_sparse.run.cli import command_line
from spark_sparse.run.profiling import gpu_idle
from spark_sparse.run.recipe import default_recipe
from spark_sparse.run.schema import (ANY_TABLE, FLAG, FRACTION, NULL, TEXTS, WHOLE, Rule, at_least, check_keys,
                                     multiple_of, one_of)

from .flops import encoder_flops, head_flops
from .memory import peak_memory_mb
from .report import write_markdown, write_plots

log = logging.getLogger(__name__)

ENGINES = ("sparse", "dense_masked")
GRAPHED = "sparse_graph"  # cuda_graph=true: the sparse engine's model, its passes replayed from CUDA graphs
PASSES = ("fwd", "fwd_bwd", "train_step")


class BenchConfigError(ValueError):
    """The benchmark configuration cannot run; raised before any model is built."""


# every key with what its value must be (spark_sparse/run/schema.py, as the apps declare theirs):
# a value of the wrong type is refused in one line, not met later as a traceback
KEYS = {
    "models": TEXTS,
    "mask_ratios": Rule("a list of numbers in [0, 1)", lambda v: all(map(FRACTION.ok, v))),
    "passes": TEXTS,
    "batch_size": Rule("a whole number, or a list of them (one per model)",
                       lambda v: WHOLE.ok(v) or isinstance(v, list) and all(map(WHOLE.ok, v))),
    "input_size": multiple_of(32),
    "repeats": at_least(1),
    "warmup": at_least(0),
    "idle_steps": at_least(1),
    "device": one_of("cpu", "cuda"),
    "precision": Rule("a string", lambda v: isinstance(v, str)),  # which ones, and where: check_precision
    "tf32": FLAG,
    "cuda_graph": FLAG,
    "threads": at_least(1) | NULL,
    "decoder_width": multiple_of(32),
    "sparse_conv": one_of(*CONV_IMPLS) | NULL,
    "seed": at_least(0),
    "hydra": ANY_TABLE,  # hydra's own settings (in the file; an app's composed config has none)
}


def validate(cfg: DictConfig) -> None:
    for key in ("models", "mask_ratios", "passes"):  # what every table row is made of
        if not OmegaConf.is_list(cfg[key]) or not len(cfg[key]):
            raise BenchConfigError(f"{key} must be a list of at least one ({key}=[...]), got {cfg[key]}")
    check_keys(cfg, KEYS, BenchConfigError)
    for name in cfg.models:
        if not timm.is_model(name):
            raise BenchConfigError(f"unknown timm model '{name}'")
    unknown = set(cfg.passes) - set(PASSES)
    if unknown:
        raise BenchConfigError(f"unknown pass(es) {sorted(unknown)}; choose from {list(PASSES)}")
    sizes = batch_sizes(cfg)
    if any(b < 2 for b in sizes.values()):
        raise BenchConfigError("batch_size must be at least 2 (train-mode batch norm)")
    try:
        check_precision(cfg.precision, cfg.device)
    except ValueError as err:
        raise BenchConfigError(str(err)) from None
    if cfg.precision != "fp32" and cfg.sparse_conv == "minkowski":
        raise BenchConfigError(f"sparse_conv=minkowski runs MinkowskiEngine's float32 operators: no "
                               f"precision={cfg.precision}")
    if cfg.cuda_graph and cfg.device != "cuda":
        raise BenchConfigError("cuda_graph=true replays the sparse engine's steps from CUDA graphs: "
                               "it needs device=cuda")
    if cfg.cuda_graph and cfg.sparse_conv == "minkowski":
        raise BenchConfigError("cuda_graph=true cannot replay MinkowskiEngine's own modules (sparse_conv=minkowski)")
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise BenchConfigError("device=cuda but PyTorch sees no CUDA GPU; use device=cpu")
        if cfg.sparse_conv == "minkowski" and not ME.is_cuda_available():
            raise BenchConfigError("sparse_conv=minkowski on device=cuda runs MinkowskiEngine's own kernels, which "
                                   "this CPU-only build lacks; the default (patch) needs no CUDA build")


def batch_sizes(cfg: DictConfig) -> dict[str, int]:
    """The batch size of each model: ``batch_size`` is one int, or a list with one per model."""
    sizes = cfg.batch_size
    if isinstance(sizes, int):
        return {name: sizes for name in cfg.models}
    sizes = list(sizes) if OmegaConf.is_list(sizes) or isinstance(sizes, (list, tuple)) else None
    if sizes is None or len(sizes) != len(cfg.models) or not all(isinstance(b, int) for b in sizes):
        raise BenchConfigError(f"batch_size must be an int or a list of {len(cfg.models)} ints (one per "
                               f"model), got {cfg.batch_size}")
    return dict(zip(cfg.models, sizes))


def build_pair(model: str, cfg: DictConfig, device: torch.device) -> dict[str, SparK]:
    """Both engines' SparK models with identical encoder, densify and decoder weights."""
    torch.manual_seed(cfg.seed)
    timm_model = timm.create_model(model, pretrained=False, num_classes=0)
    head = dict(decoder_width=cfg.decoder_width,  # every scale of the encoder, as pretraining's default
                densify_norm=default_recipe(model, "densify_norm"))  # as pretraining would
    options = {} if cfg.sparse_conv is None else {"conv": cfg.sparse_conv}
    sparse = SparK(SparseEncoder.from_timm(timm_model, **options), **head)
    dense = SparK(MaskedDenseEncoder.from_timm(timm_model), **head)
    shared = {k: v for k, v in sparse.state_dict().items() if not k.startswith("encoder.")}
    missing, unexpected = dense.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise RuntimeError(f"decoder weights do not transfer: {missing}, {unexpected}")
    a, b = sparse.encoder.timm_state_dict(), dense.encoder.timm_state_dict()
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError("the two encoders do not hold the same weights")
    return {"sparse": sparse.to(device).train(), "dense_masked": dense.to(device).train()}


def conv_class(encoder: nn.Module) -> str:
    """The class names of the sparse encoder's convolutions (which implementations ran)."""
    convs = (ME.MinkowskiConvolution, DepthwiseConvolution, PatchifyConvolution)
    names = {type(m).__name__ for m in encoder.modules() if isinstance(m, convs)}
    return "+".join(sorted(names))


def _feature_sum(feature) -> torch.Tensor:
    return feature.F.sum() if isinstance(feature, ME.SparseTensor) else feature.x.sum()


def _mask_and_layout(active: torch.Tensor | MaskPlan) -> tuple:
    """The encoder's (mask, layout) arguments from a mask or its plan."""
    return (active.active, active.encoder) if isinstance(active, MaskPlan) else (active, None)


def make_pass(name: str, model: SparK, images: torch.Tensor, precision: str) -> Callable[[torch.Tensor], None]:
    """A closure running one ``name`` pass of ``model`` on ``images`` with a given mask (or the
    mask's plan, ``SparK.plan``), its forward under ``precision``'s autocast."""
    def forward(fn, *args):
        with autocast(precision, images.device.type):
            return fn(*args)

    if name == "fwd":
        def run(active):
            with torch.no_grad():
                forward(model.encoder, images, *_mask_and_layout(active))
    elif name == "fwd_bwd":
        def run(active):
            sum(_feature_sum(f) for f in forward(model.encoder, images, *_mask_and_layout(active))).backward()
    else:
        def run(active):
            forward(model, images, active)["loss"].backward()
    return run


def make_graphed_pass(name: str, model: SparK, images: torch.Tensor, precision: str) -> Callable:
    """``make_pass``'s run for the sparse engine, replayed from a CUDA graph (``GraphedStep``)
    captured on its first mask; each later mask is planned like that one, its tables copied
    into the captured ones and the graph replayed. ``run`` also takes a mask already planned like
    the captured one (``PlannedAhead``'s)."""
    def forward(imgs: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        with torch.set_grad_enabled(name != "fwd"), autocast(precision, imgs.device.type, cache=False):
            if name == "train_step":
                return model(imgs, plan)["loss"]
            return sum(_feature_sum(f) for f in model.encoder(imgs, plan.active, plan.encoder))

    graphed: GraphedStep | None = None

    def run(active) -> None:
        nonlocal graphed
        plan = active if isinstance(active, MaskPlan) else model.plan(
            active, images.device, like=graphed.plan if graphed is not None else None)
        if graphed is None:  # captures on this mask: runs nothing yet
            graphed = GraphedStep(model, forward, images, plan, backward=name != "fwd")
        graphed(images, plan)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlannedAhead:
    """One engine's masks planned as pretraining plans each batch's: like the mask before
    (``SparK.plan``: the tables that batch's layers read made with the rest), the CPU's time
    for each kept in ``seconds``."""

    def __init__(self, model: SparK, device: torch.device):
        self.model, self.device = model, device
        self.last: MaskPlan | None = None
        self.seconds: list[float] = []

    def __call__(self, active: torch.Tensor) -> MaskPlan:
        start = time.perf_counter()
        self.last = self.model.plan(active, self.device, like=self.last)
        self.seconds.append(time.perf_counter() - start)
        return self.last


def timed(run: Callable[[torch.Tensor], None], active: torch.Tensor | MaskPlan, model: SparK,
          device: torch.device, queued: list[float] | None = None,
          meanwhile: Callable[[], None] | None = None) -> float:
    """Seconds of one pass, the GPU's work included; the CPU's time to queue it appended to
    ``queued``. ``meanwhile``: CPU work between queueing the pass and waiting for it (the next
    mask's plan), counted in the pass's time."""
    model.zero_grad(set_to_none=True)  # gradients of the last pass are not this one's work
    _sync(device)
    start = time.perf_counter()
    run(active)
    if queued is not None:
        queued.append(time.perf_counter() - start)
    if meanwhile is not None:
        meanwhile()
    _sync(device)
    return time.perf_counter() - start


def captured(run: Callable, active: torch.Tensor | MaskPlan, model: SparK, device: torch.device, what: str) -> bool:
    """Capture the CUDA graph of ``run`` (``make_graphed_pass``'s) now, in an untimed pass; False,
    with the error logged, where the step cannot be captured: the other engines are timed all the same."""
    try:
        timed(run, active, model, device)
    except Exception:  # noqa: BLE001 - a step that cannot be captured is a finding, not the run's end
        log.exception("%s: the sparse engine's pass could not be replayed from a CUDA graph; "
                      "timed eagerly only", what)
        return False
    return True


def idle_of(run: Callable[[torch.Tensor], None], masks: list, model: SparK, device: torch.device,
            plan: Callable[[torch.Tensor], MaskPlan] | None = None) -> tuple[float, float] | None:
    """``gpu_idle`` of ``run`` over ``masks``, back to back as training runs them; None off CUDA.
    ``plan`` (a ``PlannedAhead``): every mask comes planned, the first before the profiled steps,
    each later one while the GPU still runs the step before, before the wait for it, as
    pretraining does; otherwise a step makes its tables as its layers ask."""
    upcoming = plan(masks[0]) if plan is not None else masks[0]
    pending = iter(masks[1:])

    def step() -> None:
        nonlocal upcoming
        model.zero_grad(set_to_none=True)
        run(upcoming)
        following = next(pending, None)
        if following is not None:
            upcoming = plan(following) if plan is not None else following

    return gpu_idle(step, len(masks), device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(cfg: DictConfig, b: int, ratio: float, device: torch.device,
                patch: int = 32) -> tuple[torch.Tensor, list]:
    """The images and masks of ``patch``-pixel patches (the model's coarsest stride; warm-up ones
    first) of one model and ratio: the same every call."""
    size = cfg.input_size
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(b, 3, size, size, generator=g).to(device)
    # on the CPU, as pretraining draws them: the sparse engine reads them there, the dense
    # engine copies them to the GPU (pinned, without waiting), each in its timed pass
    masks = [random_active(b, (size // patch, size // patch), ratio, g) for _ in range(cfg.warmup + cfg.repeats)]
    return images, masks


def measure_memory(models: dict[str, SparK], b: int, ratio: float, cfg: DictConfig,
                   device: torch.device) -> dict[tuple[str, str], tuple[float | None, str]]:
    """Peak memory of every (pass, engine) on the first timed mask, after one unmeasured run.

    Run before any timing: timing keeps freed memory in the heap (runtime.configure_cpu), and a
    heap grown by earlier passes serves and keeps pages in ways that depend on what ran before,
    which made the same pass measure up to 20% apart."""
    images, masks = make_inputs(cfg, b, ratio, device, models["sparse"].stride)
    active = masks[cfg.warmup]
    memory = {}
    for pass_name in cfg.passes:
        for e in ENGINES:
            run = make_pass(pass_name, models[e], images, cfg.precision)
            models[e].zero_grad(set_to_none=True)
            with returning_freed_memory():  # the unmeasured run must not grow the heap either
                run(active)
            models[e].zero_grad(set_to_none=True)
            memory[pass_name, e] = peak_memory_mb(lambda: run(active), device)
            models[e].zero_grad(set_to_none=True)
    return memory


def _memory_of_model(model_name: str, container: dict, b: int) -> dict:
    """``measure_memory`` for every mask ratio of one model, with the allocator returning freed
    memory (run in a process of its own: see ``memory_by_model``)."""
    cfg = OmegaConf.create(container)
    configure_cpu(cfg.threads, keep_memory=False)
    models = build_pair(model_name, cfg, torch.device(cfg.device))
    return {float(r): measure_memory(models, b, float(r), cfg, torch.device(cfg.device)) for r in cfg.mask_ratios}


def memory_by_model(cfg: DictConfig, sizes: dict[str, int], device: torch.device) -> dict:
    """Peak memory of every model, ratio, pass and engine. On a CPU each model is measured in a
    fresh process: in one process a model measured after a larger one grew by up to 1.6 times as
    much for the same pass (RepVGG-B0 after CSPDarkNet-53: 298 against 125 MiB), whatever the
    allocator's policy. CUDA's allocator statistics need no such care."""
    memory = {}
    for model_name in cfg.models:
        args = (model_name, OmegaConf.to_container(cfg, resolve=True), sizes[model_name])
        if device.type == "cuda":
            per_ratio = _memory_of_model(*args)
        else:
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                per_ratio = pool.submit(_memory_of_model, *args).result()
        memory.update({(model_name, r): m for r, m in per_ratio.items()})
    return memory


def bench_ratio(models: dict[str, SparK], model_name: str, b: int, ratio: float, cfg: DictConfig,
                device: torch.device, common: dict, memory: dict) -> list[dict]:
    """All passes, both engines (and the sparse one replayed: ``cuda_graph``), one model, batch
    size and mask ratio."""
    engines = ENGINES + (GRAPHED,) if cfg.cuda_graph else ENGINES
    model_of = {e: models["sparse" if e == GRAPHED else e] for e in engines}
    images, masks = make_inputs(cfg, b, ratio, device, models["sparse"].stride)
    timed_masks = masks[cfg.warmup:]
    visible = float(torch.stack(timed_masks).float().mean())

    flops = {}
    for engine, model in models.items():
        enc = sum(encoder_flops(model.encoder, images, timed_masks[0]).values()) / b
        flops[engine] = (enc, head_flops(model, images, timed_masks[0]) / b)
    log.info("%s r=%.2f: FLOPs counted", model_name, ratio)  # the log's times show where a run's time goes

    records = []
    for pass_name in cfg.passes:
        runs = {e: make_graphed_pass(pass_name, m, images, cfg.precision) if e == GRAPHED
                else make_pass(pass_name, m, images, cfg.precision) for e, m in model_of.items()}
        planned = {e: PlannedAhead(m, device) for e, m in model_of.items()}  # the replayed: like its capture's
        timing = engines
        if GRAPHED in runs and not captured(runs[GRAPHED], planned[GRAPHED](masks[0]), model_of[GRAPHED], device,
                                            f"{model_name} r={ratio:.2f} {pass_name}"):
            timing = ENGINES
        for active in masks[: cfg.warmup]:
            for e in timing:
                timed(runs[e], planned[e](active), model_of[e], device)
        upcoming = {e: planned[e](timed_masks[0]) for e in timing}
        times: dict[str, list[float]] = {e: [] for e in timing}
        queue: dict[str, list[float]] = {e: [] for e in timing}
        for i in range(len(timed_masks)):
            # every timed pass plans one mask, the last the first's again
            following = timed_masks[(i + 1) % len(timed_masks)]
            for e in (timing if i % 2 == 0 else timing[::-1]):
                def plan_following(e: str = e) -> None:
                    upcoming[e] = planned[e](following)

                times[e].append(timed(runs[e], upcoming[e], model_of[e], device, queue[e], plan_following))
        # the plans made within the timed passes, one each: the latest
        plan_s = {e: planned[e].seconds[-len(timed_masks):] for e in timing}
        # a few: every profiled step's trace (a thousand kernels and as many CPU operations or
        # more) is written out and parsed as JSON, which takes longer than the step
        profiled = timed_masks[: cfg.idle_steps]
        for e in timing:
            idle = idle_of(runs[e], profiled, model_of[e], device)
            ahead = idle_of(runs[e], profiled, model_of[e], device, planned[e]) if pass_name == "train_step" else None
            model_of[e].zero_grad(set_to_none=True)
            eager = "sparse" if e == GRAPHED else e  # the same model: its memory (eager) and FLOPs
            mem, method = memory[pass_name, eager]
            enc, head = flops[eager]
            median = statistics.median(times[e])
            records.append({
                **common, "model": model_name, "batch_size": b, "mask_ratio": ratio, "visible_fraction": visible,
                "engine": e, "pass": pass_name,
                "images_per_s": b / median, "median_s": median, "times_s": times[e],
                "gflops_per_image": (enc + head if pass_name == "train_step" else enc) / 1e9,
                "gflops_encoder_per_image": enc / 1e9, "gflops_head_per_image": head / 1e9,
                "peak_mem_mb": mem, "mem_method": method,
                # CUDA: the share of back-to-back passes the GPU idles (profiled, an upper bound),
                # and its busy time a pass (against the unprofiled median: the other estimate)
                "gpu_idle_share": None if idle is None else idle[0],
                "gpu_busy_s": None if idle is None else idle[1],
                "gpu_idle_share_vs_median": None if idle is None else max(0.0, 1.0 - idle[1] / median),
                # CUDA, whole steps: the same with each step's mask planned during the step before
                "gpu_idle_share_planned": None if ahead is None else ahead[0],
                # CUDA: the CPU's time to queue a pass (median); on the CPU the pass itself
                "queue_s": statistics.median(queue[e]) if device.type == "cuda" else None,
                # the CPU's time to plan the next mask within each timed pass (median)
                "plan_s": statistics.median(plan_s[e]),
                "sparse_conv": conv_class(models["sparse"].encoder),
            })
            log.info("%s r=%.2f %-10s %-12s %7.2f img/s  %6.2f GFLOPs/img  %s MiB", model_name, ratio,
                     pass_name, e, b / median, records[-1]["gflops_per_image"],
                     "n/a" if mem is None else f"{mem:.0f}")
    return records


def benchmark(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Run the whole grid; write results.json, results.md and the plots into ``out_dir``."""
    validate(cfg)
    sizes = batch_sizes(cfg)
    device = torch.device(cfg.device)
    cuda = configure_cuda(cfg.tf32) if device.type == "cuda" else {}  # both engines' float32 arithmetic alike
    # memory first (see memory_by_model); then time with freed memory kept
    memory = memory_by_model(cfg, sizes, device)
    log.info("peak memory measured")
    cpu = configure_cpu(cfg.threads)  # the same allocator and threads for both engines
    common = {
        "input_size": cfg.input_size, "precision": cfg.precision, "repeats": cfg.repeats,
        "warmup": cfg.warmup, "decoder_width": cfg.decoder_width, "seed": cfg.seed,
        "device": device.type, "device_name": device_name(device), "threads": cpu["threads"],
        "tf32": cuda.get("tf32"), "cudnn_benchmark": cuda.get("cudnn_benchmark"), "cuda_graph": cfg.cuda_graph,
        "keep_freed_memory": cpu["keep_freed_memory"],
        "torch": torch.__version__, "minkowski_engine": ME.__version__,
    }
    records: list[dict] = []
    for model_name in cfg.models:
        models = build_pair(model_name, cfg, device)
        log.info("%s: both engines built", model_name)
        for ratio in cfg.mask_ratios:
            records += bench_ratio(models, model_name, sizes[model_name], float(ratio), cfg, device, common,
                                   memory[model_name, float(ratio)])
            # rewritten after every ratio, so a long run that is stopped keeps what it measured
            (out_dir / "results.json").write_text(json.dumps(records, indent=1))
    table = write_markdown(records, out_dir / "results.md")
    write_plots(records, out_dir)
    print(table)
    print(f"results in {out_dir}")
    return records


BENCH_CONF = str(Path(__file__).resolve().parents[1] / "conf" / "bench")


@hydra.main(version_base="1.3", config_path=BENCH_CONF, config_name="sparse_vs_dense")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    try:
        benchmark(cfg, out_dir)
    except BenchConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    command_line(main, "sparse_vs_dense", BENCH_CONF)
