"""How many operations a GPU would be handed per pass, and how often the CPU would wait for it.

``python -m benchmarks.queued_ops --models resnet50 convnext_tiny efficientnet_b0 --batch-size 64``

On a GPU every operation with a result on the device is a kernel (or a copy) the CPU launches,
some microseconds of its time each, except views and bare allocations, which only make a tensor
header; an operation whose result the CPU reads (``nonzero``, ``.item()``) makes it wait until
the GPU has run everything queued. Both are counts, the same on any GPU, so they are taken here without
one: the pass runs on PyTorch's ``meta`` device (shapes and devices, no numbers) under a
dispatch mode that sees every operation. Per model, for plain timm (nothing masked), the
dense-masked engine (SparK's reference) and the sparse engine: the operations with a result on
the device and the reads back, for the encoder's forward+backward and for a whole SparK step
(encoder, densify, decoder, loss, backward). Masks are made on the CPU, as pretraining makes
them; the dense-masked engine's ``nonzero`` is counted with all sites taken as visible (meta has
no values), which changes shapes, not counts.
"""

from __future__ import annotations

import argparse
from collections import Counter
from contextlib import nullcontext

import timm
import torch
from torch.fx.experimental import _config as fx_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spark_sparse import random_active
from spark_sparse.encoders.families import encoder_strides, input_sizes
from spark_sparse.encoders.refusals import ConversionError
from spark_sparse.encoders.registry import create_encoder
from spark_sparse.model.spark import SparK

from . import arguments

aten = torch.ops.aten
# operations whose result the CPU reads: on a GPU, a wait for every queued kernel
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
              aten.is_nonzero.default, aten.unique_consecutive.default, aten._unique2.default,
              aten.masked_select.default, aten.repeat_interleave.Tensor}
# no kernel: a view (``func.is_view``) or an allocation of uninitialised memory only makes a tensor header
NO_KERNEL = {aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten.empty_like.default}
DEVICE = torch.device("meta")


class QueuedOps(TorchDispatchMode):
    """Counts by name, while active, the operations that launch a kernel with a result on a device
    other than the CPU (``queued``; views and bare allocations launch none) and those that read a
    device tensor on the host (``host_reads``: on a GPU, waits for everything queued)."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if func in HOST_READS and any(isinstance(t, torch.Tensor) and t.device.type != "cpu"
                                      for t in tree_leaves((args, kwargs))):
            self.host_reads[name] += 1
        out = func(*args, **kwargs)
        if (not func.is_view and func not in NO_KERNEL
                and any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(out))):
            self.queued[name] += 1
        return out


def count(run, *args) -> tuple[int, int]:
    """(operations queued, reads back) of ``run(*args)``."""
    mode = QueuedOps()
    with mode:
        run(*args)
    return sum(mode.queued.values()), sum(mode.host_reads.values())


def encoder_pass(encoder, images: torch.Tensor, active: torch.Tensor) -> None:
    sum(f.sum() for f in encoder.dense_features(images, active)).backward()


def timm_pass(model, images: torch.Tensor, _active: torch.Tensor) -> None:
    model.forward_features(images).sum().backward()


def step_pass(model: SparK, images: torch.Tensor, active: torch.Tensor) -> None:
    model(images, active)["loss"].backward()


def measure(model_name: str, batch: int, input_size: int, mask_ratio: float, decoder_width: int) -> dict:
    """{(pass, engine): (queued, reads)} for one model."""
    g = torch.Generator().manual_seed(0)
    images = torch.empty(batch, 3, input_size, input_size, device=DEVICE)
    patch = encoder_strides(model_name)[-1]  # the mask's (NesT's 16)
    active = random_active(batch, (input_size // patch, input_size // patch), mask_ratio, g)
    out = {}
    for engine in ("dense_masked", "sparse"):  # first: a model no engine mirrors fails before anything runs
        # meta has no values: the dense-masked engine's nonzero takes every site as visible
        values = fx_config.patch(meta_nonzero_assume_all_nonzero=True) if engine == "dense_masked" else nullcontext()
        with values:
            encoder = create_encoder(model_name, engine).train().to(DEVICE)
            out["fwd_bwd", engine] = count(encoder_pass, encoder, images, active)
            spark = SparK(create_encoder(model_name, engine), decoder_width=decoder_width).train().to(DEVICE)
            out["train_step", engine] = count(step_pass, spark, images, active)
    try:
        out["fwd_bwd", "timm"] = count(timm_pass, timm.create_model(model_name, num_classes=0).train().to(DEVICE),
                                       images, active)
    except (AssertionError, RuntimeError):  # timm makes some models for their own input size alone (BotNet's)
        pass  # shown as n/a
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny", "efficientnet_b0"])
    parser.add_argument("--batch-size", type=arguments.train_batch, default=64)
    parser.add_argument("--input-size", type=arguments.multiple_of_32, default=224)
    parser.add_argument("--mask-ratio", type=arguments.mask_ratio, default=0.6)
    parser.add_argument("--decoder-width", type=arguments.multiple_of_32, default=768)
    args = parser.parse_args(argv)
    print(f"operations queued on a device / reads of it by the CPU, per pass; batch {args.batch_size}, "
          f"{args.input_size} px, mask {args.mask_ratio}, decoder width {args.decoder_width}\n")
    print("| model | pass | timm, nothing masked | dense-masked | sparse | sparse / dense-masked |")
    print("|---|---|---:|---:|---:|---:|")
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        parser.error(f"--models: unknown timm model(s) {', '.join(unknown)}")
    for name in args.models:
        try:
            why = input_sizes(name).refusal(name, args.input_size)
            if why:
                parser.error(f"--models {name}: {why}")
            counts = measure(name, args.batch_size, args.input_size, args.mask_ratio, args.decoder_width)
        except ConversionError as err:  # a model no engine mirrors
            parser.error(f"--models {name}: {err}")
        for pass_name in ("fwd_bwd", "train_step"):
            cells = [counts.get((pass_name, e)) for e in ("timm", "dense_masked", "sparse")]
            shown = ["n/a" if c is None else f"{c[0]} / {c[1]}" for c in cells]
            ratio = cells[2][0] / cells[1][0]
            print(f"| {name} | {pass_name} | " + " | ".join(shown) + f" | {ratio:.2f} |")


if __name__ == "__main__":
    main()
