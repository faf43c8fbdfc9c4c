"""A linear probe that runs in seconds on a CPU: "which bundled photo does this crop come from?".

Pretraining on 20 photos cannot be judged by ImageNet accuracy, and reconstruction loss alone does
not say whether the encoder learned anything useful (nor is it comparable across mask ratios).
This probe gives a small downstream number instead:

* Classes: the photos (20 for the bundled set, chance 5%).
* Train/test split without shared pixels: every photo is cut at 60% of its width; train crops lie
  entirely in the left part, held-out crops entirely in the right part, so the probe must
  recognise a photo from a region it never saw. Both parts draw square crops from the same
  absolute size range (half to all of the narrower part's usable side), so train and test crops
  differ in place, not in scale. Crops are resized to ``input_size`` and normalised as in
  pretraining; each is fixed by (seed, split, photo, number).
* Features: the plain timm model (``num_classes=0``) built from the exported ``encoder_timm.pth``
  in eval mode on dense images, i.e. global-average-pooled last stage: exactly what a user would
  fine-tune, with no SparK machinery involved.
* Classifier: multinomial logistic regression on standardised features, full-batch L-BFGS from
  zero weights in float64 (deterministic), with a small fixed L2 penalty.

``linear_probe(None, ...)`` probes a randomly initialised encoder: the baseline that says whether
pretraining helped at all (random conv features already carry colour and texture statistics).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..data.images import IMAGENET_MEAN, IMAGENET_STD, bundled_image_paths
from ..data.regions import Box, crop_boxes
from ..data.seeds import derive_seed


@dataclass(frozen=True)
class ProbeData:
    """Crops as normalised (N, 3, S, S) images with photo labels; boxes kept for inspection."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_boxes: tuple[Box, ...]
    test_boxes: tuple[Box, ...]
    names: tuple[str, ...]


def _crop(image: Image.Image, box: Box, size: int) -> torch.Tensor:
    left, top, side = box
    crop = TF.resized_crop(image, top, left, side, side, [size, size],
                           interpolation=InterpolationMode.BICUBIC)  # crops first: no pixels leak in
    return TF.normalize(TF.to_tensor(crop), IMAGENET_MEAN, IMAGENET_STD)


def build_probe_data(paths: list[Path], input_size: int, seed: int = 0, train_per_image: int = 16,
                     test_per_image: int = 16) -> ProbeData:
    """Deterministic train (left part) and held-out (right part) crops of every image in ``paths``."""
    if len(paths) < 2:
        raise ValueError("the probe needs at least two images (classes)")
    out: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "test": ([], [], [])}
    for label, path in enumerate(paths):
        with Image.open(path) as f:
            image = f.convert("RGB")
        for split, count in (("train", train_per_image), ("test", test_per_image)):
            images, labels, boxes = out[split]
            for box in crop_boxes(image.width, image.height, split, count,
                                  derive_seed("probe", seed, split, label)):
                images.append(_crop(image, box, input_size))
                labels.append(label)
                boxes.append(box)
    (tr_x, tr_y, tr_b), (te_x, te_y, te_b) = out["train"], out["test"]
    return ProbeData(torch.stack(tr_x), torch.tensor(tr_y), torch.stack(te_x), torch.tensor(te_y),
                     tuple(tr_b), tuple(te_b), tuple(Path(p).stem for p in paths))


@lru_cache(maxsize=4)
def bundled_probe_data(input_size: int, seed: int = 0) -> ProbeData:
    """The default probe set (bundled photos), cached: a sweep report probes many encoders on it."""
    return build_probe_data(bundled_image_paths(), input_size, seed)


@torch.inference_mode()
def encoder_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Pooled features of ``model`` (a timm model with num_classes=0) in eval mode."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3,
                 max_iter: int = 100) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS from zeros (no randomness at all)."""
    x = features.double()
    head = torch.nn.Linear(x.shape[1], num_classes).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(head(x), labels)
                + 0.5 * l2 * head.weight.square().sum())
        loss.backward()
        return loss

    # a few hundred tiny matrix products: one thread is several times faster than a contended pool
    with torch.enable_grad(), _threads(1):
        opt.step(closure)
    return head


def probe_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, num_classes: int, l2: float = 1e-3) -> dict[str, float]:
    """Standardise with the train statistics, fit, and score train and held-out top-1 accuracy."""
    mean, std = train_x.double().mean(0), train_x.double().std(0) + 1e-6
    train_z, test_z = (train_x.double() - mean) / std, (test_x.double() - mean) / std
    head = fit_logistic(train_z, train_y, num_classes, l2)
    with torch.no_grad():
        train_acc = (head(train_z).argmax(1) == train_y).double().mean().item()
        test_acc = (head(test_z).argmax(1) == test_y).double().mean().item()
    return {"accuracy": test_acc, "train_accuracy": train_acc}


def linear_probe(encoder_state: dict | None, model_name: str, input_size: int, seed: int = 0,
                 data: ProbeData | None = None, l2: float = 1e-3) -> dict:
    """Held-out top-1 accuracy of a linear classifier on the encoder's pooled features.

    ``encoder_state``: a timm state dict (``encoder_timm.pth``), or None for a randomly
    initialised encoder (seeded by ``seed``). ``data``: the crops (default: the bundled photos at
    ``input_size``, crops fixed by ``seed``).
    """
    start = time.perf_counter()
    data = data if data is not None else bundled_probe_data(input_size, seed)
    torch.manual_seed(seed)  # only matters for the random-init baseline
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if encoder_state is not None:
        model.load_state_dict(encoder_state, strict=True)
    train_x = encoder_features(model, data.train_images)
    test_x = encoder_features(model, data.test_images)
    scores = probe_features(train_x, data.train_labels, test_x, data.test_labels, len(data.names), l2)
    return {**scores, "num_train": len(train_x), "num_test": len(test_x), "num_classes": len(data.names),
            "chance": 1 / len(data.names), "feature_dim": train_x.shape[1],
            "input_size": data.train_images.shape[-1], "seconds": time.perf_counter() - start}
