"""A reconstruction picture of any pretraining checkpoint:

    python -m spark_sparse.visualize RUN_DIR_OR_CHECKPOINT [--out recon.png] [--num-images 4]

A bad command (no such run, a run without a checkpoint, a fine-tuning run, a number out of range,
an output that cannot be written, data that moved) ends in one line on stderr and exit code 1
(2 for a usage error).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from matplotlib.backend_bases import FigureCanvasBase
from omegaconf import OmegaConf

from ..model.spark import SparK
from ..pretrain.data import PretrainDataset, build_dataset
from ..pretrain.visualize import save_reconstruction
from ..run.checkpoint import load_checkpoint
from ..run.run_dir import RunFiles
from .cli import CommandError, OneLineParser, run_command

MAX_IMAGES = 64  # rows of one picture: more are unreadable (and beyond matplotlib's largest figure)
PRETRAINING_KEYS = ("engine", "mask_ratio", "decoder")  # what a pretraining config has and others lack


def read_checkpoint(source: Path) -> tuple[Path, dict]:
    """The pretraining checkpoint at ``source`` (a run directory or a checkpoint file) and its path;
    a CommandError naming what ``source`` is instead."""
    if not source.exists():
        raise CommandError(f"{source} does not exist: expected a pretraining run directory or a checkpoint file")
    path = RunFiles(source).checkpoint if source.is_dir() else source
    if path.name == RunFiles.ENCODER:
        raise CommandError(f"{path} is the exported encoder alone; pass its run directory ({path.parent})")
    if not path.is_file():
        raise CommandError(f"{source} holds no checkpoint ({path} is missing): not a pretraining run "
                           "directory, or its run stopped before the first save")
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    if "pretrained" in config:
        raise CommandError(f"{path} is a fine-tuning run's checkpoint: reconstruction pictures need a "
                           "pretraining run (the SparK decoder draws them)")
    missing = [k for k in PRETRAINING_KEYS if k not in config]
    if missing:
        raise CommandError(f"{path} is not a pretraining checkpoint (its config lacks {', '.join(missing)})")
    return path, ckpt


def load_model(checkpoint: dict, path: Path) -> SparK:
    """The checkpoint's SparK model; a CommandError naming the keys of a state that does not fit it."""
    model = SparK.from_config(OmegaConf.create(checkpoint["config"]))
    want, have = model.state_dict(), checkpoint["model"]
    wrong = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k].shape != have[k].shape)
    if wrong:
        raise CommandError(f"{path}: the saved model does not fit {checkpoint['config']['model']} as this "
                           f"version builds it ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})")
    model.load_state_dict(have)
    return model


def output_path(out: str | None, checkpoint: Path, step: int) -> Path:
    """Where the picture goes: ``out`` (a folder gets the default name), by default beside the
    checkpoint's run directory; its folder is made now, so that an unwritable place fails first."""
    name = f"reconstruction_step{step}.png"
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    path = folder / name if out is None else Path(out).expanduser()
    if path.is_dir():
        path = path / name
    formats = FigureCanvasBase.get_supported_filetypes()
    if not path.suffix:
        raise CommandError(f"--out {out} has no file extension: name the picture's format, e.g. {out}.png")
    if path.suffix[1:].lower() not in formats:
        raise CommandError(f"--out {out}: '{path.suffix}' is not a picture format matplotlib writes "
                           f"({', '.join(sorted(formats))})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = f"{err.filename} is a file" if err.errno in (errno.EEXIST, errno.ENOTDIR) else err.strerror
        raise CommandError(f"cannot write {path}: {why}") from None
    if not os.access(path.parent, os.W_OK):
        raise CommandError(f"cannot write {path}: {path.parent} is not writable")
    return path


def picture_data(config: dict, data_root: str | None) -> PretrainDataset:
    """The run's images (or those under ``data_root``), centre crops at the run's input size."""
    if data_root is not None:
        if Path(data_root).is_file():
            raise CommandError(f"--data-root {data_root} is a file; it must be a folder of images")
        return build_dataset("imagefolder", config["input_size"], root=data_root, augment=False)
    data = config["data"]
    try:
        return build_dataset(data["kind"], config["input_size"], root=data["root"], augment=False)
    except FileNotFoundError as err:
        raise CommandError(f"the run's data is gone ({err}); --data-root FOLDER draws from another") from None


def visualize(source: str, out: str | None, num_images: int, seed: int, data_root: str | None) -> Path:
    """Draw ``num_images`` reconstructions of the checkpoint at ``source``; returns the picture's path."""
    path, ckpt = read_checkpoint(Path(source).expanduser())
    picture = output_path(out, path, ckpt["step"])
    data = picture_data(ckpt["config"], data_root)
    model = load_model(ckpt, path)
    images = torch.stack([data[(i, 0)] for i in range(min(num_images, len(data)))])
    return save_reconstruction(model, images, picture, seed=seed,
                               title=f"{ckpt['config']['model']}, step {ckpt['step']}")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m spark_sparse.visualize", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a pretraining run directory, or a checkpoint file")
    parser.add_argument("--out", help="the picture to write (.png, .jpg, .pdf, .svg, ...; default: "
                                      "reconstruction_stepN.png in the run directory)")
    parser.add_argument("--num-images", type=int, default=4, help=f"rows of the picture (1 to {MAX_IMAGES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask")
    parser.add_argument("--data-root", help="image folder to draw from (default: the run's data)")
    args = parser.parse_args(argv)
    if not 1 <= args.num_images <= MAX_IMAGES:
        parser.error(f"--num-images must be from 1 to {MAX_IMAGES}, got {args.num_images}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")

    def draw() -> None:
        print(f"wrote {visualize(args.checkpoint, args.out, args.num_images, args.seed, args.data_root)}")

    run_command(draw)


if __name__ == "__main__":
    main()
