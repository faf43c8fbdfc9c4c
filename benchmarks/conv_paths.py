"""Which of the three exact paths of a k x k convolution is faster, per layer of a real encoder.

``python -m benchmarks.conv_paths --model resnet50 --batch-size 8 --mask-ratio 0.6 [--device cuda]``

Every k x k convolution of the sparse encoder (plain and grouped) is timed (forward + backward,
on the input it sees in a forward pass of random images) as tile convolution, as offset GEMMs
and as window GEMMs, interleaved, the best of ``--repeats`` runs each (on a GPU, synchronised);
the table shows which path the layer picks on the device and which one was faster. This is the
measurement behind ``tile_min_sites`` and ``gemm_conv.SMALL_BLOCK_PATHS``. Stride-1 depthwise
convolutions (ConvNeXt's, EfficientNet's) get a table of their own: each layout (tiles, canvas)
with each backward (the CPU's adjoint forward convolutions, torch's native one), the
measurement behind ``DepthwiseConvolution.tile_min_sites`` and ``depthwise.BACKWARDS``.
"""

from __future__ import annotations

import argparse
import time

import torch

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
from spark_sparse import SparseEncoder, random_active
from spark_sparse.encoders.refusals import ConversionError
from spark_sparse.sparse import depthwise
from spark_sparse.sparse.depthwise import DepthwiseConvolution
from spark_sparse.sparse.grouped_conv import GroupedConvolution
from spark_sparse.sparse.gemm_conv import small_block_path
from spark_sparse.sparse.patch_conv import PatchConvolution
from spark_sparse.sparse.patch_sites import PatchSites
from spark_sparse.run.runtime import configure_cpu, configure_cuda

from . import arguments

# (tile_min_sites, small_block_path) that force each path
PATHS = {"tiles": (1, None), "offsets": (10**9, "offsets"), "windows": (10**9, "windows")}
# (tile_min_sites, backward) that force each way of a stride-1 depthwise convolution
DEPTHWISE_PATHS = {f"{layout} {backward}": (sites, backward) for layout, sites in (("tiles", 1), ("canvas", 10**9))
                   for backward in ("adjoint", "native")}


def shape(conv: PatchConvolution | GroupedConvolution) -> tuple[int, int, int, int, int]:
    """(C_in, C_out, kernel size, stride, groups)."""
    if isinstance(conv, GroupedConvolution):
        c_out, c_in_g, k, _ = conv.weight.shape
        return c_in_g * conv.groups, c_out, k, conv.stride, conv.groups
    kernel = conv.kernel_generator
    return conv.in_channels, conv.out_channels, int(kernel.kernel_size[0]), int(kernel.kernel_stride[0]), 1


def conv_inputs(encoder: SparseEncoder, images: torch.Tensor, active: torch.Tensor, depthwise: bool = False) -> list:
    """(name, conv, input SparseTensor) of every k x k convolution, grouped or not (or with
    ``depthwise``, every stride-1 depthwise one), in forward order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.append((name, m, inp[0])))
             for name, m in encoder.named_modules()
             if (isinstance(m, DepthwiseConvolution) and m.stride == 1 if depthwise else
                 isinstance(m, (PatchConvolution, GroupedConvolution)) and shape(m)[2] > 1)]
    with torch.no_grad():
        encoder(images, active)
    for h in hooks:
        h.remove()
    return seen


def time_path(conv: PatchConvolution | GroupedConvolution, x: ME.SparseTensor, path: str, grad_input: bool) -> float:
    conv.tile_min_sites, conv.small_block_path = PATHS[path]
    return time_pass(conv, x, grad_input)


def time_depthwise(conv: DepthwiseConvolution, x: ME.SparseTensor, path: str) -> float:
    conv.tile_min_sites, conv.backward_path = DEPTHWISE_PATHS[path]
    return time_pass(conv, x, grad_input=True)


def time_pass(conv: torch.nn.Module, x: ME.SparseTensor, grad_input: bool) -> float:
    feats = x.F.detach().requires_grad_(grad_input)
    inp = ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    conv.zero_grad(set_to_none=True)
    sync(feats.device)
    start = time.perf_counter()
    conv(inp).F.sum().backward()
    sync(feats.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=arguments.train_batch, default=16)
    parser.add_argument("--input-size", type=arguments.multiple_of_32, default=224)
    parser.add_argument("--mask-ratio", type=arguments.mask_ratio, default=0.6)
    parser.add_argument("--repeats", type=arguments.repeats, default=7)
    parser.add_argument("--seed", type=arguments.seed, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: float32 tiles (convolutions) and GEMMs both in TF32, or both in IEEE float32")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU")
    device = torch.device(args.device)
    if device.type == "cuda":
        configure_cuda(args.tf32)  # PyTorch's default would give the tiles TF32 and the GEMMs none
    configure_cpu()
    g = torch.Generator().manual_seed(args.seed)
    size = args.input_size
    images = torch.randn(args.batch_size, 3, size, size, generator=g)
    try:
        encoder = SparseEncoder.from_timm(args.model).train().to(device)
    except (ConversionError, ValueError) as err:  # an unknown model, or one no engine mirrors
        parser.error(f"--model {args.model}: {err}")
    active = random_active(args.batch_size, (size // encoder.stride, size // encoder.stride), args.mask_ratio, g)

    precision = f", float32 in {'TF32' if args.tf32 else 'IEEE float32'}" if device.type == "cuda" else ""
    print(f"{args.model}, batch {args.batch_size}, {size} px, mask {args.mask_ratio}, forward+backward on "
          f"{device.type}{precision}, best of {args.repeats} (ms)\n")
    print("| layer | channels(/groups) | kernel/stride | sites per side in->out | tiles | offset GEMMs | window GEMMs "
          "| picked | faster |")
    print("|---|---|---|---|---:|---:|---:|---|---|")
    totals = dict.fromkeys(PATHS, 0.0)
    picked_total = 0.0
    for name, conv, x in conv_inputs(encoder, images.to(device), active):
        c_in, c_out, k, stride, groups = shape(conv)
        s = PatchSites.of(x).sites_per_side(x.tensor_stride[0])
        picked = conv.path(s, device)
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        for r in range(args.repeats + 1):  # the first round warms up
            for path in (PATHS if r % 2 else reversed(PATHS)):
                t = time_path(conv, x, path, grad_input=name != "body.conv1")
                if r:
                    times[path].append(t)
        del conv.tile_min_sites, conv.small_block_path  # back to the class defaults
        best = {p: min(v) * 1e3 for p, v in times.items()}
        for p in PATHS:
            totals[p] += best[p]
        picked_total += best[picked]
        faster = min(best, key=best.get)
        print(f"| {name.removeprefix('body.')} | {c_in}->{c_out}{f'/{groups}' if groups > 1 else ''} | {k}/{stride} | "
              f"{s}->{s // stride} | {best['tiles']:.1f} | {best['offsets']:.1f} | {best['windows']:.1f} | "
              f"{picked} | {faster} |")
    print(f"\ntotal: tiles {totals['tiles']:.0f} ms, offset GEMMs {totals['offsets']:.0f} ms, window GEMMs "
          f"{totals['windows']:.0f} ms, as picked (tile_min_sites={PatchConvolution.tile_min_sites}, "
          f"small blocks: {small_block_path(device)}) {picked_total:.0f} ms")
    depthwise_table(encoder, images.to(device), active, args.repeats, device)


def depthwise_table(encoder: SparseEncoder, images: torch.Tensor, active: torch.Tensor, repeats: int,
                    device: torch.device) -> None:
    layers = conv_inputs(encoder, images, active, depthwise=True)
    if not layers:
        return
    print("\n| depthwise layer | channels | kernel | sites per side | " + " | ".join(DEPTHWISE_PATHS)
          + " | picked | faster |")
    print("|---|---|---|---|" + "---:|" * len(DEPTHWISE_PATHS) + "---|---|")
    totals = dict.fromkeys(DEPTHWISE_PATHS, 0.0)
    picked_total = 0.0
    for name, conv, x in layers:
        s = PatchSites.of(x).sites_per_side(x.tensor_stride[0])
        picked = f"{'tiles' if s >= conv.tile_min_sites else 'canvas'} {depthwise.backward_path(device)}"
        # a tile reaches into the neighbouring blocks only: none where the kernel reaches beyond
        paths = [p for p in DEPTHWISE_PATHS if p.startswith("canvas") or conv.kernel_size // 2 <= s]
        times: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(repeats + 1):  # the first round warms up
            for path in (paths if r % 2 else paths[::-1]):
                t = time_depthwise(conv, x, path)
                if r:
                    times[path].append(t)
        del conv.tile_min_sites, conv.backward_path  # back to the class defaults
        best = {p: min(v) * 1e3 for p, v in times.items()}
        for p in DEPTHWISE_PATHS:
            totals[p] += best.get(p, best[p.replace("tiles", "canvas")])  # no tiles: the canvas
        picked_total += best[picked]
        print(f"| {name.removeprefix('body.')} | {conv.weight.shape[0]} | {conv.kernel_size} | {s} | "
              + " | ".join(f"{best[p]:.1f}" if p in best else "n/a" for p in DEPTHWISE_PATHS)
              + f" | {picked} | {min(best, key=best.get)} |")
    print("\ndepthwise total (a layer without tiles counted at its canvas): " + ", ".join(f"{p} {totals[p]:.0f} ms" for p in DEPTHWISE_PATHS)
          + f", as picked (tile_min_sites={DepthwiseConvolution.tile_min_sites}, backward: "
          f"{depthwise.backward_path(device)}) {picked_total:.0f} ms")


if __name__ == "__main__":
    main()
