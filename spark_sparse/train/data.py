"""Pretraining data: image paths, SparK's augmentation and deterministic, resumable batches.

Every random choice is derived from explicit seeds rather than the global RNG, so a batch is a
pure function of (seed, step): a resumed run, a run with worker processes and a run on several
ranks all see exactly the images and crops an uninterrupted single-process run would see.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# drawings and test patterns in skimage/data; pretraining on them teaches nothing about photos
SYNTHETIC_BUNDLED = frozenset({"chessboard_GRAY", "chessboard_RGB", "color", "horse", "logo",
                               "phantom"})

# what PIL raises for unreadable files (SyntaxError: some plugins' "broken file" error)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Key = tuple[int, int]  # (index into the data set, sample seed)


class DataError(ValueError):
    """The data cannot be used: no such folder, no images in it, or none of them readable."""


def bundled_image_paths() -> list[Path]:
    """The real photos shipped inside the scikit-image wheel: a data set that needs no download."""
    import skimage.data  # only here, so imagefolder runs do not pay for importing skimage

    folder = Path(skimage.data.__file__).parent
    return sorted(p for p in folder.iterdir()
                  if p.suffix in {".png", ".jpg"} and p.stem not in SYNTHETIC_BUNDLED)


def image_folder_paths(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively, any case of extension, following symlinked
    folders but never into a loop), sorted."""
    root = Path(root).expanduser()
    if root.is_file():
        raise DataError(f"data.root {root} is a file; it must be a folder of images")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    paths, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        here = os.stat(folder)
        if (here.st_dev, here.st_ino) in seen:  # a link back up the tree, or a second link to a folder
            subfolders.clear()
            continue
        seen.add((here.st_dev, here.st_ino))
        paths += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    paths = sorted(p for p in paths if p.is_file())
    if not paths:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own convert clips 16-bit pixels (nearly white) and truncates float ones
    (black): those are rescaled here, or refused with a ValueError when their range is unknown."""
    if image.mode.startswith("I"):  # I;16 and friends, and I (how PIL may read 16-bit PNGs)
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{image.mode} pixels outside the 16-bit range: unknown scale")
        return Image.fromarray(np.rint(pixels / 257).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise ValueError("floating-point pixels outside [0, 1]: unknown scale")
        return Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def read_rgb(source: Path | Image.Image) -> Image.Image:
    """An image file decoded to 8-bit RGB (an image already in memory is returned as is)."""
    if isinstance(source, Image.Image):
        return source
    with Image.open(source) as image:
        return to_rgb(image)  # converting decodes, so corruption surfaces here


def try_read(source: Path | Image.Image, bad_paths: set[Path]) -> tuple[Image.Image | None, list[tuple[Path, str]]]:
    """The decoded image, or None for an unreadable file (added to ``bad_paths``, and returned
    with its reason the first time)."""
    if isinstance(source, Path) and source in bad_paths:
        return None, []
    try:
        return read_rgb(source), []
    except _DECODE_ERRORS as err:
        bad_paths.add(source)
        return None, [(source, f"{type(err).__name__}: {err}")]


def first_readable(sources: Sequence[Path | Image.Image], index: int,
                   bad_paths: set[Path]) -> tuple[int, Image.Image, list[tuple[Path, str]]]:
    """The image at ``index``, or at the first readable index after it (wrapping around): its
    index, the image, and the files newly found unreadable (added to ``bad_paths``). Whether a
    file is readable is a property of the file, so every process, worker and resumed run picks
    the same substitute; ``bad_paths`` only spares decoding a known bad file again."""
    n = len(sources)
    skipped = []
    for offset in range(n):
        i = (index + offset) % n
        image, newly = try_read(sources[i], bad_paths)
        skipped += newly
        if image is not None:
            return i, image, skipped
    folder = os.path.commonpath([str(Path(p).parent) for p in sources if isinstance(p, Path)] or ["."])
    example = f" (e.g. {skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
    raise DataError(f"none of the {n} images under {folder} could be read{example}")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part; stable across processes, unlike hash()."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
            image = TF.resize(image, self.input_size, interpolation=InterpolationMode.BICUBIC)
            image = TF.center_crop(image, [self.input_size, self.input_size])
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD), skipped

    def check_readable(self) -> None:
        """Decode one image now, so that a data set with none readable fails before training."""
        self[(0, 0)]

    def _load_from(self, index: int) -> tuple[Image.Image, list[tuple[Path, str]]]:
        _, image, skipped = first_readable(self.paths, index, self.bad_paths)
        return image, skipped


def warn_skipped(count: int, path: Path, reason: str) -> None:
    warnings.warn(f"skipped {count} unreadable image(s) so far, latest: {path} ({reason})", stacklevel=3)


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


class Batches:
    """Batches from a DataLoader whose items are (batch, unreadable files skipped for it). Each
    worker process meets unreadable files on its own, so they are warned about here, in the main
    process, once per file, and added to the data set's ``bad_paths`` (the workers of a later
    loader start out knowing them). More than ``max_unreadable`` of them stop the run."""

    def __init__(self, loader: DataLoader, dataset: Dataset, max_unreadable: int | None = None,
                 what: str = "images") -> None:
        self.loader, self.dataset = loader, dataset
        self.max_unreadable, self.what = max_unreadable, what
        self.warned = set(dataset.bad_paths)  # already warned about in this process

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch, skipped in self.loader:
            for path, reason in skipped:
                if path not in self.warned:
                    self.warned.add(path)
                    self.dataset.bad_paths.add(path)
                    if self.max_unreadable is not None and len(self.warned) > self.max_unreadable:
                        raise DataError(f"more than {self.max_unreadable} of the {len(self.dataset)} {self.what} "
                                        f"are unreadable (latest: {path}: {reason}); fix or remove them")
                    warn_skipped(len(self.warned), path, reason)
            yield batch


def build_loader(dataset: PretrainDataset, batch_size: int, seed: int, start_step: int = 0,
                 max_steps: int | None = None, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1) -> Batches:
    """Stacked (batch_size // world_size, 3, S, S) batches, one per step."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step=start_step,
                               max_steps=max_steps, rank=rank, world_size=world_size)
    # a generator of its own: the loader would otherwise draw its workers' base seed from the
    # global RNG when iterated, one draw that a resumed run makes at another point of the stream
    # than an uninterrupted one (drop path, which draws from it, would then differ)
    loader = DataLoader(_Loading(dataset), batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=num_workers > 0, generator=torch.Generator())
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
