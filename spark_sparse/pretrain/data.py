"""Pretraining data: SparK's augmentation and deterministic, resumable batches of images.

Every random choice is derived from explicit seeds rather than the global RNG, so a batch is a
pure function of (seed, step): a resumed run, a run with worker processes and a run on several
ranks all see exactly the images and crops an uninterrupted single-process run would see.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from ..data.images import (IMAGENET_MEAN, IMAGENET_STD, Batches, bundled_image_paths, centre_crop, first_readable,
                           image_folder_paths, warn_skipped)
from ..data.seeds import derive_seed

Key = tuple[int, int]  # (index into the data set, sample seed)


def _crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
              g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g`` instead of the global RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    # no luck in 10 tries (extreme aspect ratio): the largest central crop within `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainDataset(Dataset):
    """Images as normalised (3, S, S) float tensors, indexed by (index, seed) keys.

    With ``augment`` the seed fixes SparK's augmentation (RandomResizedCrop with bicubic
    interpolation, then a horizontal flip), so a key always gives the same tensor. Without it
    the shorter side is resized to S and the centre cropped; the seed is ignored.

    Unreadable files are skipped in favour of the next index (deterministically, so every
    process agrees) with a warning; each process remembers the bad files it has met.
    """

    def __init__(self, paths: list[Path], input_size: int, augment: bool = True,
                 scale: tuple[float, float] = (0.67, 1.0)) -> None:
        if not paths:
            raise ValueError("PretrainDataset needs at least one image path")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        self.paths = [Path(p) for p in paths]
        self.input_size = input_size
        self.augment = augment
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop's default, as in SparK
        self.bad_paths: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Key) -> torch.Tensor:
        image, skipped = self.load(key)
        before = len(self.bad_paths) - len(skipped)
        for i, (path, reason) in enumerate(skipped, start=1):
            warn_skipped(before + i, path, reason)
        return image

    def load(self, key: Key) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
        """The sample for ``key`` and the unreadable files newly skipped on the way, unwarned:
        the loader warns once per file in the main process, whichever worker met it."""
        index, seed = key
        image, skipped = self._load_from(index)
        if self.augment:
            g = torch.Generator().manual_seed(seed)
            top, left, h, w = _crop_box(image.width, image.height, self.scale, self.ratio, g)
            image = TF.resized_crop(image, top, left, h, w, [self.input_size, self.input_size],
                                    interpolation=InterpolationMode.BICUBIC)
            if torch.rand(1, generator=g).item() < 0.5:
                image = TF.hflip(image)
        else:
            image = centre_crop(image, self.input_size)
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD), skipped

    def check_readable(self) -> None:
        """Decode one image now, so that a data set with none readable fails before training."""
        self[(0, 0)]

    def plain(self) -> PretrainDataset:
        """The same images without augmentation (the centre crops a reconstruction picture shows),
        sharing what is known of unreadable files, so that none is warned about twice."""
        twin = PretrainDataset(self.paths, self.input_size, augment=False, scale=self.scale)
        twin.bad_paths = self.bad_paths
        return twin

    def _load_from(self, index: int) -> tuple[Image.Image, list[tuple[Path, str]]]:
        _, image, skipped = first_readable(self.paths, index, self.bad_paths)
        return image, skipped


class StepBatchSampler:
    """Deterministic, resumable batches of (index, sample_seed) keys for step-based training.

    Step s takes positions [s * B, (s + 1) * B) of an endless stream made of one fresh
    permutation per epoch, so batches may straddle epochs and B may exceed the data set. Every
    rank builds the same global batch and keeps its contiguous slice of B // world_size keys.
    Starting at ``start_step`` yields exactly what an uninterrupted run yields from there.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, start_step: int = 0,
                 max_steps: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, "
                             f"world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by "
                             f"world_size {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("StepBatchSampler without max_steps is endless and has no length")
        return max(0, self.max_steps - self.start_step)

    def __iter__(self) -> Iterator[list[Key]]:
        stream = self._indices_from(self.start_step * self.batch_size)
        lo = self.rank * self.local_batch_size
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            batch = list(islice(stream, self.batch_size))
            yield [(index, self.sample_seed(step, position))
                   for position, index in enumerate(batch[lo:lo + self.local_batch_size], start=lo)]
            step += 1

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order in which ``epoch`` visits the data set."""
        g = torch.Generator().manual_seed(derive_seed("epoch", self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=g)

    def sample_seed(self, step: int, position: int) -> int:
        """Augmentation seed of the ``position``-th key in the global batch of ``step``."""
        return derive_seed("sample", self.seed, step, position)

    def _indices_from(self, position: int) -> Iterator[int]:
        epoch, offset = divmod(position, self.dataset_len)
        while True:
            yield from self.permutation(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0


class _Loading(Dataset):
    """What worker processes load: each sample with the unreadable files skipped for it."""

    def __init__(self, dataset: PretrainDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
        return self.dataset.load(key)


def _collate(samples: list[tuple[torch.Tensor, list[tuple[Path, str]]]]) -> tuple[torch.Tensor, list]:
    return torch.stack([x for x, _ in samples]), [bad for _, skipped in samples for bad in skipped]


def build_loader(dataset: PretrainDataset, batch_size: int, seed: int, start_step: int = 0,
                 max_steps: int | None = None, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> Batches:
    """Stacked (batch_size // world_size, 3, S, S) batches, one per step; ``pin_memory`` for a
    GPU: its non-blocking copy of a pinned batch does not wait for the GPU's queue."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step=start_step,
                               max_steps=max_steps, rank=rank, world_size=world_size)
    # a generator of its own: the loader would otherwise draw its workers' base seed from the
    # global RNG when iterated, one draw that a resumed run makes at another point of the stream
    # than an uninterrupted one (drop path, which draws from it, would then differ)
    loader = DataLoader(_Loading(dataset), batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=num_workers > 0, generator=torch.Generator(),
                        pin_memory=pin_memory)
    return Batches(loader, dataset)


def build_dataset(kind: str, input_size: int, root: str | None = None, augment: bool = True,
                  scale: tuple[float, float] = (0.67, 1.0)) -> PretrainDataset:
    """The data set named by the ``data`` config group: 'bundled' or 'imagefolder'."""
    if kind == "bundled":
        paths = bundled_image_paths()
    elif kind == "imagefolder":
        if not root:
            raise ValueError("data.root must be set for data=imagefolder")
        paths = image_folder_paths(root)
    else:
        raise ValueError(f"unknown data kind {kind!r}; choose 'bundled' or 'imagefolder'")
    return PretrainDataset(paths, input_size, augment=augment, scale=scale)
