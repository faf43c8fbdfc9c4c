"""How far a bf16 (or fp16) SparK step is from the exact one, for both engines.

``python -m benchmarks.precision_error --models resnet50 convnext_tiny --batch-size 4``

One train-mode SparK step (encoder, densify, decoder, loss; as in pretraining) per engine and
precision on the same weights, images and mask, against the same step in float64 (where both
engines agree to 1e-9: tests/test_encoder_equivalence.py). Reported as relative errors (norm of
the difference over the norm of the float64 value): the encoder's stage outputs, the loss,
and the gradient of every parameter (all of them as one vector, and the median parameter's).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from omegaconf import OmegaConf

from spark_sparse import random_active
from spark_sparse.model.spark import SparK
from spark_sparse.precision import PRECISIONS, autocast
from spark_sparse.run.runtime import configure_cpu

from . import arguments
from .sparse_vs_dense import ENGINES, build_pair


def step(model: SparK, images: torch.Tensor, active: torch.Tensor, precision: str) -> tuple[list, torch.Tensor, dict]:
    """Stage outputs, loss and parameter gradients of one train-mode step."""
    feats = []
    hook = model.encoder.register_forward_hook(lambda m, args, out: feats.extend(out))
    with autocast(precision, images.device.type):
        loss = model(images, active)["loss"]
    hook.remove()
    loss.backward()
    dense = [model.encoder.to_dense(f, images.shape[0], (images.shape[2] // s, images.shape[3] // s))
             for f, s in zip(feats, model.encoder.strides)]
    encoder = model.encoder.to_timm({n: p.grad for n, p in model.encoder.named_parameters()})  # engines' names differ
    head = {n: p.grad for n, p in model.named_parameters() if not n.startswith("encoder.")}
    return [d.detach() for d in dense], loss.detach(), {**{f"encoder.{n}": g for n, g in encoder.items()}, **head}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def measure(name: str, batch: int, size: int, ratio: float, precisions: list[str], seed: int = 0,
            decoder_width: int = 768) -> list[str]:
    # both engines with the same encoder, densify and decoder weights, as the speed benchmark's
    models = build_pair(name, OmegaConf.create({"seed": seed, "decoder_width": decoder_width, "sparse_conv": None}),
                        torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    patch = models["sparse"].stride  # the mask's: the model's coarsest stride
    active = random_active(batch, (size // patch, size // patch), ratio, g)
    reference = copy.deepcopy(models["dense_masked"]).double()
    want_f, want_loss, want_g = step(reference, images.double(), active, "fp32")
    lines = []
    for engine in ENGINES:
        for precision in precisions:
            feats, loss, grads = step(copy.deepcopy(models[engine]), images, active, precision)
            keys = [k for k in want_g if want_g[k] is not None]
            flat = rel(torch.cat([grads[k].flatten() for k in keys]), torch.cat([want_g[k].flatten() for k in keys]))
            median = statistics.median(rel(grads[k], want_g[k]) for k in keys if want_g[k].norm() > 0)
            lines.append(f"| {name} | {engine} | {precision} | " + " / ".join(f"{rel(f, w):.1e}" for f, w in
                                                                           zip(feats, want_f))
                         + f" | {rel(loss, want_loss):.1e} | {flat:.1e} | {median:.1e} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    parser.add_argument("--batch-size", type=arguments.train_batch, default=4)
    parser.add_argument("--input-size", type=arguments.multiple_of_32, default=224)
    parser.add_argument("--mask-ratio", type=arguments.mask_ratio, default=0.6)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS)
    parser.add_argument("--decoder-width", type=arguments.multiple_of_32, default=768)
    parser.add_argument("--seed", type=arguments.seed, default=0)
    args = parser.parse_args(argv)
    configure_cpu()
    print("| model | engine | precision | stage outputs, strides 4/8/16/32 | loss | all gradients | median "
          "parameter's gradient |\n|---|---|---|---|---:|---:|---:|")
    for name in args.models:
        measure(name, args.batch_size, args.input_size, args.mask_ratio, args.precisions, args.seed, args.decoder_width)


if __name__ == "__main__":
    main()
