"""Building timm models by name, for the encoders and the fine-tuning app alike."""

from __future__ import annotations

import re

import timm
from torch import nn


def copy_parameters(module: nn.Module, twin: nn.Module, optional: tuple[str, ...] = ()) -> None:
    """Give ``twin`` copies of ``module``'s own parameters under timm's names (an engine's twin of a
    timm norm: EvoNorm's ``weight``, ``bias``, ``v``); each name in ``optional`` is None where the
    module has no such parameter."""
    for name in optional:
        twin.register_parameter(name, None)
    for name, p in module.named_parameters(recurse=False):
        twin.register_parameter(name, nn.Parameter(p.detach().clone()))


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, with one-line ValueErrors for an
    unknown name or an argument the model does not take. A model without stochastic depth
    (DenseNet) takes no ``drop_path_rate``: a zero one is then left out, as it asks for nothing."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"unknown timm model '{name}': {err}") from None
    except TypeError as err:
        # Python's words, or HRNet's own check of its config's keys ("argument(s): ['drop_path_rate']")
        unexpected = re.search(r"unexpected keyword argument(?:\(s\): \[)? ?'(\w+)'", str(err))
        if unexpected is None:
            raise
        key = unexpected[1]
        if key == "drop_path_rate" and not kwargs[key]:
            return create_timm_model(name, **{k: v for k, v in kwargs.items() if k != key})
        raise ValueError(f"timm model '{name}' takes no {key} (got {kwargs.get(key)}); "
                         f"leave it at its default") from None
