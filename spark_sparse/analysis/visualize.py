"""A reconstruction picture of any pretraining checkpoint:

    python -m spark_sparse.visualize RUN_DIR_OR_CHECKPOINT [--out recon.png] [--num-images 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..model.spark import SparK
from ..pretrain.data import build_dataset
from ..pretrain.visualize import save_reconstruction
from ..run.checkpoint import load_checkpoint
from ..run.run_dir import RunFiles


def load_model(checkpoint: dict) -> SparK:
    cfg = OmegaConf.create(checkpoint["config"])
    model = SparK.from_config(cfg)
    model.load_state_dict(checkpoint["model"])
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory holding checkpoints/last.pt")
    parser.add_argument("--out", help="PNG to write (default: next to the checkpoint)")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask")
    parser.add_argument("--data-root", help="image folder to draw from (default: the run's data)")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    if path.is_dir():
        path = RunFiles(path).checkpoint
    ckpt = load_checkpoint(path)
    model = load_model(ckpt)
    cfg = OmegaConf.create(ckpt["config"])
    kind, root = ("imagefolder", args.data_root) if args.data_root else (cfg.data.kind, cfg.data.root)
    data = build_dataset(kind, cfg.input_size, root=root, augment=False)
    images = torch.stack([data[(i, 0)] for i in range(min(args.num_images, len(data)))])
    out = Path(args.out) if args.out else path.parent.parent / f"reconstruction_step{ckpt['step']}.png"
    save_reconstruction(model, images, out, seed=args.seed, title=f"{cfg.model}, step {ckpt['step']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
