"""Building timm models by name, for the encoders and the fine-tuning app alike."""

from __future__ import annotations

import re

import timm
from torch import nn


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, with one-line ValueErrors for an
    unknown name or an argument the model does not take. A zero ``drop_path_rate`` is left out:
    models without stochastic depth (DenseNet) take no such argument, and zero is its default."""
    if not kwargs.get("drop_path_rate", 1):
        kwargs.pop("drop_path_rate")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"unknown timm model '{name}': {err}") from None
    except TypeError as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected is None:
            raise
        value = kwargs.get(unexpected[1])
        raise ValueError(f"timm model '{name}' takes no {unexpected[1]} (got {value}); "
                         f"leave it at its default") from None
