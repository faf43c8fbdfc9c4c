"""What a pretraining config must satisfy, checked before any data is read or anything written:
every key's type and range (``KEYS``), then the rules that tie keys together."""

from __future__ import annotations

from omegaconf import DictConfig

from ..encoders.families import encoder_strides, input_sizes
from ..encoders.layouts import PATCH, STRIDES
from ..encoders.registry import ENGINES, engine_class
from ..model.densify import NORMS
from ..run.checks import RUN_KEYS, ConfigError, check_model_and_missing, check_runtime
from ..run.schema import (FLAG, FRACTION, NON_NEGATIVE, NULL, POSITIVE, TEXT, at_least, check_keys, multiple_of,
                          number, numbers, one_of)
from .optim import OPTIMIZERS

KEYS = {
    **RUN_KEYS,
    "engine": one_of(*ENGINES),
    "mask_ratio": FRACTION,
    "input_size": multiple_of(PATCH),
    "batch_size": at_least(1),
    "max_steps": at_least(1) | NULL,
    "epochs": POSITIVE | NULL,
    "drop_path_rate": FRACTION,
    "optim.name": one_of(*OPTIMIZERS),
    "optim.base_lr": POSITIVE,
    "optim.betas": numbers(2, "two numbers in [0, 1)", lambda v: all(0 <= b < 1 for b in v)),
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.timm_no_weight_decay": FLAG,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.clip_grad": POSITIVE | NULL,  # a negative clip would turn every step into gradient ascent
    # the decoder halves its width at each of its 5 upsampling blocks
    "decoder.width": multiple_of(PATCH),
    "decoder.hierarchy": number(f"a whole number from 1 to {len(STRIDES)}", lambda v: 1 <= v <= len(STRIDES),
                                whole=True),
    "decoder.densify_norm": one_of(*NORMS),
    "decoder.checkpoint": FLAG,
    "sync_bn": FLAG,
    "cuda_graph": FLAG,
    "log_every": at_least(1),
    "save_every": at_least(1),
    "vis_every": at_least(1),
    "vis_images": at_least(1),
    "data.kind": one_of("bundled", "imagefolder"),
    "data.root": TEXT | NULL,
    "data.num_workers": at_least(0),
    "data.scale": numbers(2, "two numbers 0 < min <= max <= 1", lambda v: 0 < v[0] <= v[1] <= 1),
}

# a resumed run must be the same experiment; these may not change between the two halves
# (decoder.checkpoint, a memory setting, may change freely)
FIXED_ON_RESUME = ("model", "engine", "mask_ratio", "input_size", "batch_size", "seed", "data.kind", "data.root",
                   "data.scale", "decoder.width", "decoder.hierarchy", "decoder.densify_norm", "drop_path_rate",
                   "optim", "max_steps", "epochs", "precision", "tf32")
# ... but a user may resume with these changed on purpose (resume_changes=[...]): a long run that
# diverged goes on from its last good checkpoint with a smaller lr
CHANGEABLE_ON_RESUME = ("precision", "optim.base_lr", "optim.min_lr", "optim.clip_grad", "optim.weight_decay",
                        "optim.weight_decay_end", "tf32")

# keys added since older runs began, with the value those runs behave by (their code had no such key)
FORMER_DEFAULTS = {"optim.timm_no_weight_decay": False}


def hidden_patches(input_size: int, mask_ratio: float, stride: int = PATCH) -> int:
    """How many patches of each image the mask hides (what spark_sparse.mask.random_active keeps)."""
    patches = (input_size // stride) ** 2
    return patches - max(1, round(patches * (1.0 - mask_ratio)))


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    check_model_and_missing(cfg)
    check_keys(cfg, KEYS, ConfigError)
    try:
        engine_class(cfg.engine)  # imported now: a sparse engine without MinkowskiEngine stops before any work
    except (ValueError, ImportError) as err:
        raise ConfigError(str(err)) from None
    refusal = input_sizes(str(cfg.model)).refusal(str(cfg.model), cfg.input_size)
    if refusal:
        raise ConfigError(refusal)
    strides = encoder_strides(str(cfg.model))
    if cfg.decoder.hierarchy > len(strides):
        raise ConfigError(f"decoder.hierarchy={cfg.decoder.hierarchy}: the encoders of {cfg.model} output "
                          f"{len(strides)} scales (strides {', '.join(map(str, strides))}); use 1..{len(strides)}")
    if cfg.data.kind == "bundled" and cfg.data.root is not None and not cfg.resume:  # (a run begun so goes on)
        raise ConfigError(f"data.root={cfg.data.root} is read by data=imagefolder only: add data=imagefolder "
                          "(data=bundled trains on the photos bundled with scikit-image)")
    patch = strides[-1]  # the mask's: the encoders' coarsest stride (NesT's 16)
    if hidden_patches(cfg.input_size, cfg.mask_ratio, patch) == 0:
        raise ConfigError(f"mask_ratio {cfg.mask_ratio} at input_size {cfg.input_size} hides none of the "
                          f"{(cfg.input_size // patch) ** 2} patch(es) of an image: with nothing to "
                          "reconstruct the loss is always 0; raise mask_ratio or input_size")
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must divide evenly "
                          f"among the {world_size} processes")
    if cfg.epochs is None and cfg.max_steps is None:
        raise ConfigError("set max_steps (a positive number of steps) or epochs")
    if cfg.cuda_graph:
        check_graphable(cfg, world_size)
    check_runtime(cfg)


def check_graphable(cfg: DictConfig, world_size: int) -> None:
    """What replaying every step from a CUDA graph (``cuda_graph``, spark_sparse/model/graphed.py) needs."""
    why = ("it needs device=cuda" if cfg.device != "cuda" else
           "the dense-masked engine reads the GPU back (nonzero) and cannot be captured" if cfg.engine != "sparse" else
           "under torchrun the synchronised norms' collectives run inside the step, which a graph does not "
           "capture; set sync_bn=false (each process's norms then see its share of the batch)"
           if world_size > 1 and cfg.sync_bn else
           "fp16's loss scaling is not captured; use precision=bf16" if cfg.precision == "fp16" else None)
    if why:
        raise ConfigError(f"cuda_graph=true replays each step from a CUDA graph: {why}")
