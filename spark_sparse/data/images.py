"""Images as both training apps and the analysis tools read them: the bundled photos, folders of
image files, decoding to 8-bit RGB (wider integer and float pixels rescaled as their values say,
TIFFs that PIL cannot open read by tifffile), unreadable files skipped and warned about once, in
the main process."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# drawings and test patterns in skimage/data; pretraining on them teaches nothing about photos
SYNTHETIC_BUNDLED = frozenset({"chessboard_GRAY", "chessboard_RGB", "color", "horse", "logo",
                               "phantom"})

# what PIL raises for unreadable files (SyntaxError: some plugins' "broken file" error)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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


def pixels_to_rgb(pixels: np.ndarray) -> Image.Image:
    """8-bit RGB from decoded pixels, (H, W) or (H, W, C) with C from 1 to 4 (a second or fourth
    channel is alpha, dropped as PIL's convert drops it). The scale is read from the values:
    integers that fit 0-255 are 8-bit data in a wider type, integers up to 65535 16-bit data
    (rescaled), floats in [0, 1] of any precision rescaled; any other range, or shape, is a
    ValueError saying why (the file is skipped as unreadable)."""
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):
        pixels = pixels[:, :, 0]
    elif pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = pixels[:, :, :3]
    elif pixels.ndim != 2:
        raise ValueError(f"pixels of shape {pixels.shape}: not a grey, RGB or RGBA image")
    if pixels.dtype == bool:
        return Image.fromarray(pixels.astype(np.uint8) * 255).convert("RGB")
    if pixels.dtype.kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{pixels.dtype} pixels from {low} to {high}, outside the 8- and 16-bit ranges: "
                             "unknown scale")
        scale = 1 if high <= 255 else 257
    elif pixels.dtype.kind == "f":
        if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise ValueError("floating-point pixels outside [0, 1]: unknown scale")
        scale = 1 / 255
    else:
        raise ValueError(f"{pixels.dtype} pixels: not an image type")
    return Image.fromarray(np.rint(pixels / scale).astype(np.uint8)).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own convert clips integer pixels wider than 8 bits (16-bit ones come out
    nearly white) and truncates float ones (black): those go through ``pixels_to_rgb``."""
    if image.mode.startswith("I") or image.mode == "F":  # I;16 and friends, I (32-bit), F (float32)
        return pixels_to_rgb(np.asarray(image))
    return image.convert("RGB")


def read_tiff(path: Path) -> np.ndarray:
    """The pixels of a TIFF that PIL cannot open (float RGB, float64, float16 ...), (H, W) or
    (H, W, C), decoded by tifffile (scikit-image's TIFF reader)."""
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        axes = series.axes
        pixels_count = int(np.prod([n for n, axis in zip(series.shape, axes) if axis in "YX"]))
        if Image.MAX_IMAGE_PIXELS and pixels_count > 2 * Image.MAX_IMAGE_PIXELS:  # PIL's own limit
            raise Image.DecompressionBombError(f"{pixels_count} pixels: over twice PIL's limit of "
                                               f"{Image.MAX_IMAGE_PIXELS}, a decompression bomb?")
        pixels = series.asarray()
    if axes == "SYX":  # channels stored plane by plane
        pixels, axes = np.moveaxis(pixels, 0, -1), "YXS"
    if axes not in ("YX", "YXS"):
        raise ValueError(f"a TIFF of shape {series.shape} ({axes}): a stack, not one image")
    return pixels


# Up to this aspect ratio a centre crop resizes the whole image, as torchvision does (the pixels
# are torchvision's); beyond it only the kept part is resampled, which bounds the memory
WHOLE_RESIZE_MAX_ASPECT = 4


def centre_crop(image: Image.Image, size: int, scale_size: int | None = None) -> Image.Image:
    """The centre ``size`` x ``size`` crop of ``image`` resized (bicubic) so that its shorter side
    is ``scale_size`` (default ``size``): torchvision's Resize(scale_size) then CenterCrop(size).
    Images more than ``WHOLE_RESIZE_MAX_ASPECT`` times as long as they are wide resample only
    the kept part of each side, the long one first, so that the memory is ``size`` times the
    short side (a 1 x 60000 strip resized whole to a shorter side of 64 takes 1 GB); PIL rounds
    between the two passes and orders those of a whole resize otherwise, so their pixels are
    torchvision's to within a few levels."""
    scale = scale_size or size
    width, height = image.size
    bicubic = Image.Resampling.BICUBIC
    short, long = min(width, height), max(width, height)
    scaled = int(scale * long / short)  # torchvision's resized long side
    # where CenterCrop puts the crop along each resized side
    along, across = int(round((scaled - size) / 2.0)), int(round((scale - size) / 2.0))
    if long <= WHOLE_RESIZE_MAX_ASPECT * short:
        resized = image.resize((scaled, scale) if width >= height else (scale, scaled), bicubic)
        left, top = (along, across) if width >= height else (across, along)
        return resized.crop((left, top, left + size, top + size))
    lo, hi = along * long / scaled, (along + size) * long / scaled  # in source pixels
    a, b = across * short / scale, (across + size) * short / scale
    if width > height:
        kept = image.resize((size, height), bicubic, box=(lo, 0, hi, height))
        return kept.resize((size, size), bicubic, box=(0, a, size, b))
    kept = image.resize((width, size), bicubic, box=(0, lo, width, hi))
    return kept.resize((size, size), bicubic, box=(a, 0, b, size))


def read_rgb(source: Path | Image.Image) -> Image.Image:
    """An image file decoded to 8-bit RGB (an image already in memory is returned as is)."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as image:
            return to_rgb(image)  # converting decodes, so corruption surfaces here
    except UnidentifiedImageError:
        if source.suffix.lower() not in (".tif", ".tiff") or importlib.util.find_spec("tifffile") is None:
            raise
    return pixels_to_rgb(read_tiff(source))


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


def warn_skipped(count: int, path: Path, reason: str) -> None:
    warnings.warn(f"skipped {count} unreadable image(s) so far, latest: {path} ({reason})", stacklevel=3)


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
