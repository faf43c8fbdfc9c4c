import collections
import importlib.util
import os
import signal
import tempfile

# `make test` runs the suite in one worker process per core (pytest-xdist): each worker keeps its
# share of the cores in every thread pool (torch's, numpy's and MinkowskiEngine's BLAS), set before
# any of them loads; two workers spinning two pools each on two cores run many times slower
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_pool, str(_share))

import pytest  # noqa: E402 - the thread pools' sizes first
import timm  # noqa: E402
import torch  # noqa: E402

from spark_sparse import random_active  # noqa: E402
from spark_sparse.precision import set_tf32  # noqa: E402
from spark_sparse.run.runtime import keep_freed_memory, trim_freed_memory  # noqa: E402


def _minkowski_installed() -> bool:
    try:
        return importlib.util.find_spec("MinkowskiEngine") is not None
    except ImportError:  # a finder that refuses it (tests/test_without_minkowski.py)
        return False


# Without MinkowskiEngine only the sparse engine is missing: its tests skip, saying why, and the
# rest (the dense-masked engine, fine-tuning, the configuration) still runs. An installed but
# broken MinkowskiEngine is not skipped: its tests fail.
HAS_MINKOWSKI = _minkowski_installed()
WITHOUT_MINKOWSKI = "MinkowskiEngine is not installed: the sparse engine cannot run (`make setup` builds it)"
needs_minkowski = pytest.mark.skipif(not HAS_MINKOWSKI, reason=WITHOUT_MINKOWSKI)
ENGINE_NAMES = [pytest.param("sparse", marks=needs_minkowski), "dense_masked"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where the engines' equivalence and property tests run their models and images "
                          "(tests/test_encoder_equivalence.py, test_sparse_properties.py, test_device.py); "
                          "masks stay on the CPU, as in training")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda, but PyTorch sees no CUDA GPU")
    # freed memory stays in the heap, as the apps' entry points keep it (runtime.configure_cpu),
    # until a worker is RESIDENT_KEPT (torch_threads_kept)
    keep_freed_memory()
    # the suite sends Ctrl-C to runs, in this process and in children, which inherit an ignored
    # signal: a suite started in the background by a script (`make test &`: SIGINT ignored, which
    # the apps then leave ignored) tests them as a terminal starts them
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The ``--device`` of the run. On CUDA, float32 matrix products and convolutions are kept
    IEEE float32 (no TF32), which is what the tests' float32 tolerances assume."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda":
        set_tf32(False)
    return device


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """A run started in-process (pretrain.train, finetune) sets torch's threads for the whole
    process (its `threads` setting): restored after each test, so the rest of the suite keeps the
    threads it started with (OMP_NUM_THREADS) instead of oversubscribing a shared machine. A worker
    keeps the memory its tests free, as the entry points do, until it is RESIDENT_KEPT: then the
    heap's free pages go back to the kernel. One that kept everything held its largest test's peak
    for good (two such on a 23 GB machine got one killed for memory, 2026-11-30); handing them back
    after every test, or glibc's default policy, cost 20-40% of the suite's time in page faults."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    keep_freed_memory()  # whatever the test left (returning_freed_memory, configure_cpu)
    if _resident_bytes() > RESIDENT_KEPT:
        trim_freed_memory()


# how much a test worker may keep resident before it hands its free pages back (its models, its
# largest test's working set)
RESIDENT_KEPT = 3 << 30


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: no glibc either, nothing to trim
        return 0


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm affine parameters, BN running stats, layer scales, GRN parameters, NFNet's
    convolution and skip-init gains, HGNetV2's scalar affines, GCNet's added context, EvoNorm's and
    FRN's parameters, MetaFormer's StarReLU and residual scales, TinyViT's attention biases, Swin
    V2's q and v biases and logit scales, EdgeNeXt's attention temperatures, and convolution and
    linear biases (timm initialises GRN to the identity, layer scale to 1e-6, scalar affines to
    x -> x, StarReLU's bias and ConvNeXt's biases to zero, which would hide errors: a zero bias
    cannot leak into hidden sites)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.Conv2d) and isinstance(getattr(m, "gain", None), torch.nn.Parameter):
                # NFNet's scaled weight standardisation: its last 1x1 of a block starts at gain 0
                m.gain.copy_(0.5 + torch.rand(m.gain.shape, generator=g))
            if isinstance(getattr(m, "skipinit_gain", None), torch.nn.Parameter):  # NFNet's, starts at 0
                m.skipinit_gain.copy_(0.5 + torch.rand((), generator=g))
            if type(m).__name__ == "GlobalContext" and m.mlp_add is not None:  # GCNet's added context starts at 0
                m.mlp_add.fc2.weight.copy_(0.1 * torch.randn(m.mlp_add.fc2.weight.shape, generator=g))
            if type(m).__name__.startswith(("EvoNorm", "FilterResponseNorm")):  # start at weight 1, bias 0
                for name, p in m.named_parameters(recurse=False):
                    scale, shift = (0.5, 0.5) if name in ("weight", "v") else (0.1, 0.0)
                    p.copy_(shift + scale * torch.rand(p.shape, generator=g) if shift
                            else scale * torch.randn(p.shape, generator=g))
            # HGNetV2's scalar affine starts at x -> x, MetaFormer's StarReLU at relu(x) ** 2
            if type(m).__name__ in ("LearnableAffineBlock", "StarReLU"):
                m.scale.copy_(0.5 + torch.rand(1, generator=g))
                m.bias.copy_(0.1 * torch.randn(1, generator=g))
            if type(m).__name__ == "Scale" and isinstance(getattr(m, "scale", None), torch.nn.Parameter):
                m.scale.copy_(0.5 + torch.rand(m.scale.shape, generator=g))  # MetaFormer's res scale: 1
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                c = m.weight.shape[0]
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                if m.bias is not None:  # MetaFormer's layer norms have none
                    m.bias.copy_(0.1 * torch.randn(c, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "gamma_xca")) or ".grn." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            # TinyViT's bias per relative offset and Swin V2's q and v biases start at zero, its
            # per-head logit scales all at log(10), EdgeNeXt's temperatures at 1
            if name.endswith(("attention_biases", "q_bias", "v_bias", "logit_scale", "xca.temperature")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session", autouse=True)
def scratch_under_pytest_tmp(tmp_path_factory):
    """Temporary files the tests' runs leave (torchrun's torchelastic logs, wandb's media and
    artifacts) go under pytest's own temporary folder, which pytest prunes, not into /tmp."""
    from .runs import ENV  # the environment of the apps' command-line runs, made at import

    scratch = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(scratch))  # subprocesses that copy os.environ when started
        patch.setitem(ENV, "TMPDIR", str(scratch))  # and those started with tests.runs.ENV
        patch.setattr(tempfile, "tempdir", str(scratch))  # this process (gettempdir caches it)
        yield scratch


# the most recently used models the session keeps; all of them were 10 GiB of float32
MODEL_CACHE_BYTES = 1 << 30


@pytest.fixture(scope="session")
def timm_models():
    """``timm_models(name, **timm_kwargs)``: a timm model with randomised norms (seed 0), kept
    while it is among the most recently used (MODEL_CACHE_BYTES): a test table's rows for one
    model run one after another, and building one takes 0.1-0.5 s. Shared: deep-copy it before
    converting or training it."""
    cache: collections.OrderedDict = collections.OrderedDict()

    def get(name: str, **kwargs) -> torch.nn.Module:
        key = (name, repr(sorted(kwargs.items())))  # repr: some kwargs are dicts (ByobNet's self_attn_kwargs)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        torch.manual_seed(0)
        cache[key] = model = randomise_norms(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
        while len(cache) > 1 and sum(map(_bytes, cache.values())) > MODEL_CACHE_BYTES:
            cache.popitem(last=False)
        return model

    return get


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def make_batch(size: tuple[int, int], mask: str, batch: int = 4, seed: int = 0, patch: int = 32):
    """Images and an `active` grid of ``patch``-pixel patches (the encoder's coarsest stride: 32, NesT's
    16) for a named masking case: 'none', 'ratio0.6' or 'one'."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randn(batch, 3, h, w, generator=g)
    grid = (h // patch, w // patch)
    if mask == "none":
        active = random_active(batch, grid, 0.0, g)
    elif mask == "ratio0.6":
        active = random_active(batch, grid, 0.6, g)
    elif mask == "one":
        active = random_active(batch, grid, 1 - 1 / (grid[0] * grid[1]) + 1e-9, g)
        assert int(active.sum()) == batch
    else:
        raise ValueError(mask)
    return images, active
