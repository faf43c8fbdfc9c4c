"""What no engine mirrors, and how the encoders say so: ``ConversionError`` names the timm module,
its path and why, before any work; the refusals families share (DropBlock, dropout, gradient
checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class ConversionError(ValueError):
    """A module of the timm model has no equivalent in the target engine."""


def unsupported(module: nn.Module, path: str, why: str = "") -> ConversionError:
    detail = f": {why}" if why else ""
    return ConversionError(f"cannot convert {type(module).__name__} at '{path}'{detail}")


# why no engine mirrors an optional sub-module of timm's blocks, by its attribute name
EXTRAS_REFUSED = {
    "drop_block": "DropBlock drops square regions of the whole map, hidden sites included; "
                  "set drop_block_rate to 0",
    "drop": "DropBlock drops square regions of the whole map, hidden sites included; set drop_block_rate to 0",
}


def reject_extras(block: nn.Module, path: str, names: tuple[str, ...]) -> None:
    """Refuse, by name, path and reason, optional sub-modules of a block that no engine mirrors."""
    for name in names:
        sub = getattr(block, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise unsupported(sub, f"{path}.{name}", EXTRAS_REFUSED[name])


def refuse_dropout(module: nn.Module, path: str, *names: str) -> None:
    """Refuse ``module`` where any of its dropouts ``names`` (dotted paths below it) drops: its
    mirror runs without them (timm's default rate is 0). A ``nn.Dropout`` the converter meets as a
    leaf runs in every engine (``DROPOUTS``)."""
    for name in names:
        drop = module.get_submodule(name)
        if drop.p > 0:
            raise unsupported(drop, f"{path}.{name}", f"dropout p={drop.p}")


def refuse_checkpointing(module: nn.Module, path: str) -> None:
    """Refuse a module whose timm forward checkpoints (``grad_checkpointing``): no engine mirrors
    timm's re-run of its blocks in backward."""
    if getattr(module, "grad_checkpointing", False):
        raise unsupported(module, path, "gradient checkpointing is not mirrored; turn it off")


@dataclass(frozen=True)
class CheckpointingRefused:
    """A family's check: refuse gradient checkpointing wherever timm keeps its flag, on the model
    (reported at ``body``, what its forward checkpoints) or on each of ``body``'s stages."""

    body: str

    def __call__(self, model: nn.Module) -> None:
        refuse_checkpointing(model, self.body)
        for name, stage in getattr(model, self.body).named_children():
            refuse_checkpointing(stage, f"{self.body}.{name}")
