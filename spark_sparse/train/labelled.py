"""Labelled data for fine-tuning and linear evaluation: ImageFolder trees or the bundled photos task,
with timm's transforms, in deterministic and resumable batches.

As in pretraining, a batch is a pure function of (seed, epoch, position): each sample is drawn
under its own seed (timm's transforms use the global ``random``, numpy and torch RNGs, which are
forked around the draw), so a resumed run and a run with worker processes see exactly the crops
of an uninterrupted single-process run.

The bundled task asks which of the scikit-image photos a crop comes from, as the probe of
spark_sparse.analysis.probe does: train crops come from the left part of every photo, validation
crops (fixed) from the right part, so no pixel is shared between the two.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from .regions import crop_boxes, split_column
from .data import DataError, bundled_image_paths, derive_seed, to_rgb

VAL_CROPS_PER_PHOTO = 8  # bundled task: fixed validation crops per photo
TRAIN_REPEATS = 16       # bundled task: random train crops of each photo per epoch


class Labelled(Dataset):
    """(image, label) pairs from a list of items, each an image path or an already cut PIL image,
    transformed under the sample seed of its key (index, seed)."""

    def __init__(self, items: list[tuple[Path | Image.Image, int]], classes: list[str], transform) -> None:
        self.items, self.classes, self.transform = items, classes, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        source, label = self.items[index]
        if isinstance(source, Image.Image):
            image = source
        else:
            with Image.open(source) as f:
                image = to_rgb(f)
        # timm draws from all three global RNGs (RandAugment's op choice from numpy's)
        state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            try:
                return self.transform(image), label
            finally:
                random.setstate(state)
                np.random.set_state(np_state)

    def check_readable(self) -> None:
        """Decode the first image now, so unusable data fails before the run directory is touched."""
        try:
            self[(0, 0)]
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot read {self.items[0][0]}: {err}") from None


def transforms(input_size: int, aug) -> tuple:
    """timm's training transform (RandomResizedCrop, flip, RandAugment, colour jitter, random
    erasing as ``aug`` says) and its evaluation transform (resize, centre crop)."""
    train = create_transform(input_size, is_training=True, scale=tuple(aug.scale), hflip=0.5,
                             color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
                             interpolation="bicubic", re_prob=aug.reprob)
    val = create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=aug.crop_pct)
    return train, val


def image_folder(root: str, transform, split: str) -> Labelled:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.{split}={root} is not a folder (expected class subfolders of images)")
    try:
        folder = ImageFolder(str(path))
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise DataError(f"data.{split}={root}: {err}") from None
    return Labelled([(Path(p), y) for p, y in folder.samples], folder.classes, transform)


def bundled(train_transform, val_transform, seed: int) -> tuple[Labelled, Labelled]:
    """Train: the left part of each photo, TRAIN_REPEATS times per epoch (the random crop is the
    transform's); val: VAL_CROPS_PER_PHOTO fixed square crops of its right part."""
    paths = bundled_image_paths()
    train, val = [], []
    for label, path in enumerate(paths):
        with Image.open(path) as f:
            image = to_rgb(f)
        left = image.crop((0, 0, split_column(image.width), image.height))
        train += [(left, label)] * TRAIN_REPEATS
        for x, y, side in crop_boxes(image.width, image.height, "test", VAL_CROPS_PER_PHOTO,
                                     derive_seed("finetune-val", seed, label)):
            val.append((image.crop((x, y, x + side, y + side)), label))
    classes = [p.stem for p in paths]
    return Labelled(train, classes, train_transform), Labelled(val, classes, val_transform)


def build_datasets(data, input_size: int, aug, seed: int) -> tuple[Labelled, Labelled]:
    """The train and val sets the ``data`` config names: ImageFolder trees, or (both null) the
    bundled photos task."""
    train_tf, val_tf = transforms(input_size, aug)
    if data.train is None and data.val is None:
        return bundled(train_tf, val_tf, seed)
    if data.train is None or data.val is None:
        raise DataError("set both data.train and data.val (ImageFolder trees), or neither for the bundled task")
    train, val = image_folder(data.train, train_tf, "train"), image_folder(data.val, val_tf, "val")
    if train.classes != val.classes:
        raise DataError(f"data.train and data.val have different class folders ({len(train.classes)} vs "
                        f"{len(val.classes)}; first difference: "
                        f"{next((a, b) for a, b in zip(train.classes + [None], val.classes + [None]) if a != b)})")
    return train, val


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch from batch ``start`` on: a fresh permutation per epoch, full batches
    only (mixup pairs images within a batch), each key carrying its sample seed."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0) -> None:
        self.size, self.batch_size, self.seed, self.epoch, self.start = size, batch_size, seed, epoch, start

    def __len__(self) -> int:
        return self.size // self.batch_size - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(derive_seed("finetune-epoch", self.seed, self.epoch))
        order = torch.randperm(self.size, generator=g).tolist()
        for b in range(self.start, self.size // self.batch_size):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, derive_seed("finetune-sample", self.seed, self.epoch, b, k)) for k, i in enumerate(batch)]


class InOrder(Sampler[list[tuple[int, int]]]):
    """Validation: every sample once, in order (the eval transform draws nothing)."""

    def __init__(self, size: int, batch_size: int) -> None:
        self.size, self.batch_size = size, batch_size

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for lo in range(0, self.size, self.batch_size):
            yield [(i, 0) for i in range(lo, min(lo + self.batch_size, self.size))]


def loader(dataset: Labelled, sampler: Sampler, num_workers: int) -> DataLoader:
    # a generator of its own: the loader would otherwise draw its workers' base seed from the
    # global torch RNG (drop path's), one draw per epoch started, and resume would shift it
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=torch.Generator())
