"""Pretraining data: paths, deterministic augmentation, unreadable files and resumable batches."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spark_sparse.data.images import (IMAGENET_MEAN, IMAGENET_STD, DataError, bundled_image_paths, image_folder_paths,
                                      read_rgb, try_read)
from spark_sparse.pretrain.data import PretrainDataset, StepBatchSampler, build_dataset, build_loader

SIZE = 32


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 30)) -> list[Path]:
    """Small random-noise images, each different, so crops and sources are distinguishable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def bundled() -> PretrainDataset:
    return build_dataset("bundled", SIZE)


# --- paths -----------------------------------------------------------------------------------

def test_bundled_photos_exist_and_decode_as_rgb():
    paths = bundled_image_paths()
    assert len(paths) >= 15
    assert paths == sorted(paths)
    for path in paths:
        assert path.is_file()
        with Image.open(path) as image:
            assert image.convert("RGB").mode == "RGB"
    names = {p.stem for p in paths}
    assert {"astronaut", "coffee", "camera"} <= names  # colour and grayscale photos
    assert not names & {"chessboard_RGB", "logo", "phantom", "color"}  # no drawings


def test_image_folder_walks_nested_dirs_and_keeps_only_images(tmp_path):
    write_images(tmp_path / "a", ["1.png", "2.JPG"])
    write_images(tmp_path / "b" / "deep", ["3.jpeg", "4.bmp", "5.webp", "6.TIFF"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "labels.csv").write_text("x,y")
    (tmp_path / "c.png").mkdir()  # a folder with an image-like name is not a file

    paths = image_folder_paths(tmp_path)

    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "a/1.png", "a/2.JPG", "b/deep/3.jpeg", "b/deep/4.bmp", "b/deep/5.webp", "b/deep/6.TIFF"]


def test_image_folder_follows_symlinked_folders_once_and_never_loops(tmp_path):
    write_images(tmp_path / "real" / "inner", ["a.png"])
    root = tmp_path / "root"
    root.mkdir()
    (root / "photos").symlink_to(tmp_path / "real", target_is_directory=True)
    (root / "photos_again").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "up").symlink_to(root, target_is_directory=True)  # a loop

    paths = image_folder_paths(root)

    assert len(paths) == 1 and paths[0].name == "a.png"  # found once, whichever way
    assert paths[0].resolve() == (tmp_path / "real" / "inner" / "a.png").resolve()


def test_image_folder_root_that_is_a_file_is_data_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file; it must be a folder"):
        image_folder_paths(tmp_path / "x.png")


def test_image_folder_missing_root_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder_paths(tmp_path / "nowhere")


def test_image_folder_without_images_is_value_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        image_folder_paths(tmp_path)


def test_build_dataset_choices(tmp_path):
    write_images(tmp_path, ["x.png"])
    assert build_dataset("imagefolder", SIZE, root=str(tmp_path)).paths == [tmp_path / "x.png"]
    with pytest.raises(ValueError, match="data.root must be set"):
        build_dataset("imagefolder", SIZE, root=None)
    with pytest.raises(ValueError, match="bundled.*imagefolder"):
        build_dataset("imagenet", SIZE)


# --- samples ---------------------------------------------------------------------------------

def test_sample_is_normalised_float_image(bundled):
    x = bundled[(0, 123)]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # bicubic overshoot aside, values stay within the normalised range of [0, 1] pixels
    assert (x.amin(dim=(1, 2)) >= lo - 0.2).all() and (x.amax(dim=(1, 2)) <= hi + 0.2).all()
    batch = torch.stack([bundled[(i, i)] for i in range(len(bundled))])
    assert batch.mean().abs() < 1.0 and 0.5 < batch.std() < 1.5


def test_same_key_same_tensor_regardless_of_global_rng(bundled):
    torch.manual_seed(0)
    first = bundled[(3, 42)]
    state = torch.get_rng_state()
    torch.manual_seed(999)
    again = bundled[(3, 42)]
    torch.set_rng_state(state)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed


def test_different_seeds_give_different_crops(bundled):
    crops = [bundled[(0, seed)] for seed in range(8)]
    assert all(not torch.equal(crops[0], other) for other in crops[1:])


def test_plain_dataset_is_a_fixed_center_crop(bundled):
    plain = PretrainDataset(bundled.paths, SIZE, augment=False)
    assert torch.equal(plain[(0, 1)], plain[(0, 2)])
    assert not torch.equal(plain[(0, 1)], bundled[(0, 1)])


def test_every_bundled_photo_loads_without_warnings(bundled):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(len(bundled)):
            assert bundled[(i, 0)].shape == (3, SIZE, SIZE)


# --- unreadable files ------------------------------------------------------------------------

def test_corrupt_file_is_skipped_with_a_counting_warning(tmp_path):
    write_images(tmp_path, ["a.png", "c.png", "d.png"])
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg" * 10)
    paths = image_folder_paths(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.jpg", "c.png", "d.png"]
    dataset = PretrainDataset(paths, SIZE)

    expected = r"skipped 1 unreadable image\(s\) so far, latest: .*b\.jpg"
    with pytest.warns(UserWarning, match=expected):
        x = dataset[(1, 7)]

    assert torch.equal(x, dataset[(2, 7)])  # the next file, c.png, with the same augmentation
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file is skipped quietly
        assert torch.equal(dataset[(1, 7)], x)


def test_warning_counts_distinct_bad_files(tmp_path):
    write_images(tmp_path, ["ok.png"])
    for name in ["bad1.png", "bad2.jpg"]:
        (tmp_path / name).write_bytes(b"\x00garbage")
    dataset = PretrainDataset(image_folder_paths(tmp_path), SIZE)  # bad1, bad2, ok

    with pytest.warns(UserWarning) as record:
        dataset[(0, 0)]
    assert [str(w.message).split(",")[0] for w in record] == [
        "skipped 1 unreadable image(s) so far", "skipped 2 unreadable image(s) so far"]


def test_unreadable_files_are_warned_about_once_however_many_workers_meet_them(tmp_path, capfd):
    write_images(tmp_path, ["ok.png"])
    for name in ["bad1.png", "bad2.png", "bad3.png"]:
        (tmp_path / name).write_bytes(b"\x00garbage")
    dataset = PretrainDataset(image_folder_paths(tmp_path), SIZE)
    # every batch is the whole data set, and each of the 2 workers loads 2 batches
    loader = build_loader(dataset, batch_size=4, seed=0, max_steps=4, num_workers=2)
    with pytest.warns(UserWarning) as record:
        assert len(list(loader)) == 4
    # (Python 3.12 adds a DeprecationWarning for forking a multi-threaded process: not ours)
    assert sorted(str(w.message).split(",")[0] for w in record if issubclass(w.category, UserWarning)) == [
        f"skipped {n} unreadable image(s) so far" for n in (1, 2, 3)]
    assert "unreadable" not in capfd.readouterr().err  # the workers themselves stay silent


def test_the_plain_twin_of_a_data_set_warns_about_no_file_twice(tmp_path):
    """The reconstruction pictures' centre crops come from the training set's plain twin: a bad
    file the run's first check warned about is skipped quietly there (it was warned about twice)."""
    (tmp_path / "0_bad.png").write_bytes(b"\x00garbage")
    write_images(tmp_path, ["1.png", "2.png"])
    dataset = PretrainDataset(image_folder_paths(tmp_path), SIZE)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        dataset.check_readable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picture = dataset.plain()[(0, 0)]
    alone = PretrainDataset([tmp_path / "1.png"], SIZE, augment=False)[(0, 0)]
    torch.testing.assert_close(picture, alone, rtol=0, atol=0)  # the next readable image


def test_16_bit_and_float_images_look_like_their_8_bit_versions(tmp_path):
    gradient = np.linspace(0, 1, 40 * 30).reshape(30, 40)
    Image.fromarray(np.rint(gradient * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(gradient.astype(np.float32)).save(tmp_path / "float.tiff")
    Image.fromarray(np.rint(gradient * 255).astype(np.uint8)).save(tmp_path / "plain.png")
    deep, flt, plain = (PretrainDataset([tmp_path / n], SIZE, augment=False)[(0, 0)]
                        for n in ("deep.png", "float.tiff", "plain.png"))
    torch.testing.assert_close(deep, plain, atol=0.02, rtol=0)
    torch.testing.assert_close(flt, plain, atol=0.02, rtol=0)


RGB8 = np.stack(np.meshgrid(np.arange(40) * 6, np.arange(30) * 8), -1)[:, :, [0, 1, 0]].astype(np.uint8)
RGB8[:, :, 2] = 255 - RGB8[:, :, 0]  # a colour gradient: any channel mix-up or rescaling shows
GREY8 = RGB8[:, :, 0]


def pil_save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path)


def tiff_save(array: np.ndarray, path: Path, **options) -> None:
    import tifffile

    colour = array.shape[-1] in (3, 4) and array.ndim >= 3
    options.setdefault("photometric", "rgb" if colour else "minisblack")
    if array.ndim == 3 and array.shape[-1] <= 8:  # (H, W, C): channels, not a stack of C-wide images
        options.setdefault("planarconfig", "contig")
    tifffile.imwrite(path, array, **options)


@pytest.mark.parametrize("name,write,pixels", [
    ("int32 of 0-255 (8-bit data, PIL mode I)", pil_save, GREY8.astype(np.int32)),
    ("uint16 of 0-255 (8-bit data)", tiff_save, GREY8.astype(np.uint16)),
    ("uint16 of the full range (16-bit data)", tiff_save, GREY8.astype(np.uint16) * 257),
    ("float32 grey in [0, 1] (PIL mode F)", pil_save, (GREY8 / 255).astype(np.float32)),
    ("float64 grey", tiff_save, GREY8 / 255),
    ("float16 grey", tiff_save, (GREY8 / 255).astype(np.float16)),
    ("float32 RGB", tiff_save, (RGB8 / 255).astype(np.float32)),
    ("float64 RGB", tiff_save, RGB8 / 255),
    ("float32 RGBA, alpha dropped", tiff_save, np.concatenate([RGB8, GREY8[:, :, None] // 2], -1) / 255),
    ("float32 RGB stored plane by plane", lambda a, p: tiff_save(a.transpose(2, 0, 1), p, planarconfig="separate",
                                                                photometric="rgb"), (RGB8 / 255).astype(np.float32)),
])
def test_integer_and_float_images_of_any_width_read_as_their_8_bit_pixels(tmp_path, name, write, pixels):
    """Integers that fit 0-255 are 8-bit data in a wider type (an int32 TIFF of them loaded almost
    black), up to 65535 16-bit; floats in [0, 1] of any precision and channel count (float RGB and
    float64 TIFFs, which PIL cannot open, were skipped as unreadable). Exact, rounding included."""
    write(pixels, tmp_path / "image.tif")
    expected = RGB8 if pixels.ndim == 3 else np.repeat(GREY8[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "image.tif")), expected)


@pytest.mark.parametrize("pixels,reason", [
    (GREY8.astype(np.int32) * 1000, "int32 pixels from 0 to 234000, outside the 8- and 16-bit ranges: unknown scale"),
    (GREY8.astype(np.int32) - 10, "int32 pixels from -10 to 224, outside the 8- and 16-bit ranges: unknown scale"),
    (RGB8 / 255 * 1.5, "floating-point pixels outside [0, 1]: unknown scale"),
    (np.full((30, 40, 5), 0.5), "pixels of shape (30, 40, 5): not a grey, RGB or RGBA image"),
    (np.zeros((3, 30, 40, 3), np.float32), "a TIFF of shape (3, 30, 40, 3) (QYXS): a stack, not one image"),
])
def test_images_of_unknown_scale_or_shape_are_refused_with_the_reason(tmp_path, pixels, reason):
    tiff_save(pixels, tmp_path / "image.tif")
    image, skipped = try_read(tmp_path / "image.tif", set())
    assert image is None and skipped == [(tmp_path / "image.tif", f"ValueError: {reason}")]


def test_float_images_of_unknown_scale_are_skipped_with_a_warning(tmp_path):
    Image.fromarray(np.full((30, 40), 1000.0, dtype=np.float32)).save(tmp_path / "a.tiff")
    write_images(tmp_path, ["b.png"])
    dataset = PretrainDataset(image_folder_paths(tmp_path), SIZE)
    with pytest.warns(UserWarning, match=r"a\.tiff .*outside \[0, 1\]"):
        assert torch.equal(dataset[(0, 3)], dataset[(1, 3)])


def test_all_files_corrupt_is_data_error(tmp_path):
    for name in ["a.jpg", "b.png"]:
        (tmp_path / name).write_bytes(b"garbage")
    dataset = PretrainDataset(image_folder_paths(tmp_path), SIZE)
    message = rf"none of the 2 images under {re.escape(str(tmp_path))} could be read \(e.g. a.jpg: "
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error says it all: no warning per file before it
        with pytest.raises(DataError, match=message):
            dataset[(0, 0)]


# --- batches ---------------------------------------------------------------------------------

def test_resuming_mid_run_yields_the_same_batches():
    straight = list(StepBatchSampler(100, 16, seed=3, max_steps=10))
    resumed = list(StepBatchSampler(100, 16, seed=3, start_step=5, max_steps=10))
    assert len(straight) == 10 and len(resumed) == 5
    assert resumed == straight[5:]


def test_each_epoch_is_a_fresh_permutation():
    keys = [k for batch in StepBatchSampler(10, 5, seed=0, max_steps=4) for k in batch]
    indices = [index for index, _ in keys]
    assert sorted(indices[:10]) == sorted(indices[10:]) == list(range(10))
    assert indices[:10] != indices[10:]


def test_batch_larger_than_dataset_spans_epochs():
    batches = list(StepBatchSampler(25, 32, seed=1, max_steps=25))  # 25 * 32 = 32 whole epochs
    assert all(len(batch) == 32 for batch in batches)
    assert sorted(i for i, _ in batches[0][:25]) == list(range(25))
    counts = np.bincount([i for batch in batches for i, _ in batch], minlength=25)
    assert (counts == 32).all()


def test_sample_seeds_are_distinct_63_bit_and_depend_on_seed():
    a = [s for batch in StepBatchSampler(25, 32, seed=1, max_steps=5) for _, s in batch]
    b = [s for batch in StepBatchSampler(25, 32, seed=2, max_steps=5) for _, s in batch]
    assert len(set(a)) == len(a)
    assert all(0 <= s < 2**63 for s in a)
    assert not set(a) & set(b)


def test_ranks_take_contiguous_slices_of_the_global_batch():
    full = list(StepBatchSampler(50, 8, seed=4, max_steps=6))
    r0 = list(StepBatchSampler(50, 8, seed=4, max_steps=6, rank=0, world_size=2))
    r1 = list(StepBatchSampler(50, 8, seed=4, max_steps=6, rank=1, world_size=2))
    assert all(len(b) == 4 for b in r0 + r1)
    assert [a + b for a, b in zip(r0, r1)] == full


def test_batch_not_divisible_by_world_size_is_value_error():
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(50, 10, seed=0, world_size=4)


def test_endless_sampler_keeps_going():
    sampler = StepBatchSampler(5, 2, seed=0)
    it = iter(sampler)
    assert len([next(it) for _ in range(100)]) == 100
    with pytest.raises(TypeError):
        len(sampler)


def test_loader_yields_stacked_batches_identical_across_worker_processes(bundled):
    loader = build_loader(bundled, batch_size=4, seed=0, max_steps=2, world_size=2, rank=1)
    batches = list(loader)
    assert len(loader) == 2 and len(batches) == 2
    assert batches[0].shape == (2, 3, SIZE, SIZE) and batches[0].dtype == torch.float32

    in_workers = list(build_loader(bundled, batch_size=4, seed=0, max_steps=2, world_size=2,
                                   rank=1, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(batches, in_workers))
