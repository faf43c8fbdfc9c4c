"""The random number generators a run seeds, saves and restores (global torch, numpy, python, CUDA,
and the app's own, e.g. the mask generator), so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..data.seeds import derive_seed


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(mask_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global RNGs' states (and the mask generator's, for pretraining)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if mask_generator is not None:
        state["mask"] = mask_generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], mask_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if mask_generator is not None:
        mask_generator.set_state(state["mask"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(ckpt: dict, mask_generator: torch.Generator | None, seed: int, rank: int) -> None:
    """This rank's saved RNG states; a rank the checkpoint has none for (it was written by fewer
    processes) takes rank 0's mask generator and fresh per-rank global RNGs."""
    states = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    if rank < len(states):
        set_rng_state(states[rank], mask_generator)
    else:
        set_rng_state(states[0], mask_generator)
        seed_everything(derive_seed("resume", seed, rank, ckpt["step"]))
