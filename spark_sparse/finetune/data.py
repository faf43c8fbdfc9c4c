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

import math
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.transforms import MaybeToTensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import Compose, Normalize

from ..data.regions import crop_boxes, split_column
from ..data.seeds import derive_seed
from ..data.images import (IMAGENET_MEAN, IMAGENET_STD, Batches, DataError, bundled_image_paths, centre_crop,
                           first_readable, to_rgb, try_read, warn_skipped)

VAL_CROPS_PER_PHOTO = 8  # bundled task: fixed validation crops per photo
TRAIN_REPEATS = 16       # bundled task: random train crops of each photo per epoch


Sample = tuple[torch.Tensor, int]
Skipped = list[tuple[Path, str]]  # unreadable files met while loading, with the reason


class Labelled(Dataset):
    """(image, label) pairs from a list of items, each an image path or an already cut PIL image,
    transformed under the sample seed of its key (index, seed).

    An unreadable file is met with once per file (a warning, in the main process: see ``loader``).
    For training (``substitute``) its sample becomes the next readable item's, label included;
    for validation it is left out (None), so every evaluation counts the same images. More than
    half of the files unreadable stops the run.
    """

    def __init__(self, items: list[tuple[Path | Image.Image, int]], classes: list[str], transform,
                 substitute: bool = True, what: str = "images") -> None:
        self.items, self.classes, self.transform = items, classes, transform
        self.sources = [source for source, _ in items]
        self.substitute, self.what = substitute, what
        self.bad_paths: set[Path] = set()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def max_unreadable(self) -> int:
        return len(self) // 2

    def __getitem__(self, key: tuple[int, int]) -> tuple[Sample | None, Skipped]:
        """The sample of ``key`` (None: left out) and the files newly found unreadable, unwarned."""
        index, seed = key
        if self.substitute:
            index, image, skipped = first_readable(self.sources, index, self.bad_paths)
        else:
            image, skipped = try_read(self.sources[index], self.bad_paths)
            if image is None:
                return None, skipped
        # timm draws from all three global RNGs (RandAugment's op choice from numpy's)
        state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            try:
                return (self.transform(image), self.items[index][1]), skipped
            finally:
                random.setstate(state)
                np.random.set_state(np_state)

    def check_readable(self) -> None:
        """Decode a first image now (warning about unreadable ones before it), so unusable data
        fails before the run directory is touched."""
        _, _, skipped = first_readable(self.sources, 0, self.bad_paths)
        for count, (path, reason) in enumerate(skipped, start=1):
            if count > self.max_unreadable:
                raise DataError(f"more than {self.max_unreadable} of the {len(self)} {self.what} are "
                                f"unreadable (latest: {path}: {reason}); fix or remove them")
            warn_skipped(count, path, reason)


def transforms(input_size: int, aug) -> tuple:
    """timm's training transform (RandomResizedCrop, flip, RandAugment, colour jitter, random
    erasing as ``aug`` says) and its evaluation transform: the shorter side resized to
    ``input_size / crop_pct``, the centre crop, ImageNet's normalisation. The evaluation's resize
    and crop are ``centre_crop``'s, which resamples only the kept part: timm's resizes the whole
    image first, and a 1 x 100000 strip would take 20 GB at 224 px."""
    train = create_transform(input_size, is_training=True, scale=tuple(aug.scale), hflip=0.5,
                             color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
                             interpolation="bicubic", re_prob=aug.reprob)
    scale_size = math.floor(input_size / aug.crop_pct)  # as timm's evaluation transform computes it
    val = Compose([partial(centre_crop, size=input_size, scale_size=scale_size), MaybeToTensor(),
                   Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return train, val


def image_folder(root: str, transform, split: str) -> Labelled:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.{split}={root} is not a folder (expected class subfolders of images)")
    try:
        folder = ImageFolder(str(path))
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise DataError(f"data.{split}={root}: {err}") from None
    return Labelled([(Path(p), y) for p, y in folder.samples], folder.classes, transform,
                    substitute=split == "train", what=f"images of data.{split}")


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
    return Labelled(train, classes, train_transform), Labelled(val, classes, val_transform, substitute=False)


def build_datasets(data, input_size: int, aug, seed: int) -> tuple[Labelled, Labelled]:
    """The train and val sets the ``data`` config names: ImageFolder trees, or (both null) the
    bundled photos task."""
    train_tf, val_tf = transforms(input_size, aug)
    if data.train is None and data.val is None:
        return bundled(train_tf, val_tf, seed)
    if data.train is None or data.val is None:
        raise DataError("set both data.train and data.val (ImageFolder trees), or neither for the bundled task")
    train = image_folder(data.train, train_tf, "train")
    if len(train.classes) < 2:  # a classifier of one class is always right: 100% that say nothing
        raise DataError(f"data.train={data.train} has a single class folder ('{train.classes[0]}'); "
                        "classification needs at least two (one subfolder of images per class)")
    val = image_folder(data.val, val_tf, "val")
    if train.classes != val.classes:
        raise DataError(f"data.train and data.val have different class folders ({len(train.classes)} vs "
                        f"{len(val.classes)}; first difference: "
                        f"{next((a, b) for a, b in zip(train.classes + [None], val.classes + [None]) if a != b)})")
    return train, val


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This process's part of the batches of one epoch, from batch ``start`` on.

    The epoch's order is timm's RepeatAugSampler (SparK's repeated augmentation, from DeiT): a
    fresh permutation of which the first size / repeats images come ``repeats`` times in a row,
    so an epoch still holds ``size`` samples. Full global batches only (mixup pairs images within
    a batch); every key carries the seed of its position in the global batch, so crops do not
    depend on the number of processes, and rank r takes positions r, r + N, ... of each global
    batch, which sends the copies of an image to different processes, as timm does.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0, repeats: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.epoch, self.start = size, batch_size, seed, epoch, start
        self.repeats, self.rank, self.world_size = repeats, rank, world_size

    def __len__(self) -> int:
        return self.size // self.batch_size - self.start

    def order(self) -> list[int]:
        """The epoch's sample order (all processes'); timm seeds its generator with the 'epoch'."""
        sampler = RepeatAugSampler(range(self.size), num_replicas=1, rank=0, num_repeats=self.repeats,
                                   selected_round=0)
        sampler.set_epoch(derive_seed("finetune-epoch", self.seed, self.epoch))
        return list(sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        for b in range(self.start, self.size // self.batch_size):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            keys = [(i, derive_seed("finetune-sample", self.seed, self.epoch, b, k)) for k, i in enumerate(batch)]
            yield keys[self.rank::self.world_size]


class InOrder(Sampler[list[tuple[int, int]]]):
    """Validation: every sample once, in order (the eval transform draws nothing); under torchrun
    rank r takes samples r, r + N, ..."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices, self.batch_size = range(rank, size, world_size), batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for lo in range(0, len(self.indices), self.batch_size):
            yield [(i, 0) for i in self.indices[lo:lo + self.batch_size]]


def _collate(items: list[tuple[Sample | None, Skipped]]) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, Skipped]:
    samples = [sample for sample, _ in items if sample is not None]
    return (default_collate(samples) if samples else None), [bad for _, skipped in items for bad in skipped]


def loader(dataset: Labelled, sampler: Sampler, num_workers: int) -> Batches:
    """(images, targets) batches (None where a validation batch was all unreadable), warning
    once per unreadable file and stopping when more than half of them are."""
    # a generator of its own: the loader would otherwise draw its workers' base seed from the
    # global torch RNG (drop path's), one draw per epoch started, and resume would shift it
    batches = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                         generator=torch.Generator())
    return Batches(batches, dataset, dataset.max_unreadable, dataset.what)
