"""The downstream networks: a plain timm classifier (fine-tuning) or a frozen timm encoder with a
linear head (linear evaluation), and loading pretrained encoder weights into either."""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..run.checkpoint import CHECKPOINT_KEYS
from ..run.checks import ConfigError
from ..run.failures import first_line
from ..run.run_dir import RunFiles, read_record
from ..timm_models import create_timm_model

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # torch's unpickling errors set words in bold


class LinearProbe(nn.Module):
    """The standard linear-evaluation protocol (as MAE's): a frozen encoder, always in eval mode
    (its batch-norm statistics stay as pretrained), then a parameter-free batch norm over the pooled
    features and a linear layer, the only parameters trained."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6),
                                  nn.Linear(encoder.num_features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder(images)
        return self.head(features)


def build_model(name: str, mode: str, num_classes: int, drop_path_rate: float) -> nn.Module:
    """mode 'finetune': ``timm.create_model(name, num_classes=K)``; 'linear': LinearProbe on
    ``timm.create_model(name, num_classes=0)``, whose pooled features the head reads."""
    if mode == "finetune":
        return create_timm_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if mode == "linear":
        return LinearProbe(create_timm_model(name, num_classes=0), num_classes)
    raise ConfigError(f"mode must be finetune or linear, got '{mode}'")


def encoder_of(model: nn.Module) -> nn.Module:
    """The timm network that pretrained weights go into (a fine-tuned model is its own encoder)."""
    return model.encoder if isinstance(model, LinearProbe) else model


def is_classifier_key(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to a timm model's classifier (never part of a pretrained encoder);
    a distilled model (RepViT) names two, its head and its distillation head."""
    classifier = model.pretrained_cfg["classifier"]
    names = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return key.startswith(tuple(f"{name}." for name in names))


def head_only_keys(model: nn.Module, model_name: str) -> set[str]:
    """The tensors of ``model`` (a timm ``model_name``) that ``timm.create_model(model_name,
    num_classes=0)``, what pretraining exports, lacks: its classifier, and the hidden layer of a
    classifier MLP (MetaFormer's head). Never pretrained: they start as timm initialises them."""
    with torch.device("meta"):  # names and shapes only
        headless = create_timm_model(model_name, num_classes=0)
    return set(model.state_dict()) - set(headless.state_dict())


def _examples(keys: set[str] | list[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def pickled_names(path: Path) -> set[str]:
    """The strings in the pickle of a torch archive (its dict keys among them), read without
    unpickling anything; empty for other files."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            return {arg for _, arg, _ in pickletools.genops(archive.read(pickle)) if isinstance(arg, str)}
    except (zipfile.BadZipFile, StopIteration, ValueError, OSError):
        return set()


def read_encoder_weights(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The timm state dict at ``source``: a pretraining run directory (its encoder_timm.pth) or a
    weight file (ours, or SparK's official ``*_timm_style.pth``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = RunFiles(path).encoder
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={source}: no such file (a pretraining run directory must "
                                f"hold {RunFiles.ENCODER}; is the run finished?)")
    instead = f"pass a pretraining run directory or its {RunFiles.ENCODER}"
    if path.stat().st_size == 0:  # torch would say only "EOFError"
        raise ConfigError(f"pretrained={path} is an empty file (0 bytes), not encoder weights; {instead}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on other files
        if CHECKPOINT_KEYS <= pickled_names(path):
            raise ConfigError(f"pretrained={path} is a training checkpoint (the model, optimizer and RNG "
                              f"state of a run), not encoder weights; {instead}") from None
        reason = ANSI_ESCAPE.sub("", first_line(err)).split(". ")[0]  # not torch's advice to unpickle anyway
        raise ConfigError(f"pretrained={path} is not a readable state dict ({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        items = state.items() if isinstance(state, dict) else ()
        other = sorted(str(k) for k, v in items if not isinstance(v, torch.Tensor))
        raise ConfigError(f"pretrained={path} is not a timm-style state dict (names to tensors)"
                          + (f": it holds {_examples(other)}" if other else "") + f"; {instead}")
    return path, state


def _run_model(encoder_file: Path) -> str | None:
    """The model a pretraining run's config record names, for the encoder file in its run
    directory; None for a file elsewhere or a record that cannot be read."""
    model = (read_record(RunFiles(encoder_file.parent)) or {}).get("model")
    return model if isinstance(model, str) else None


def load_encoder(model: nn.Module, source: str | Path, model_name: str) -> dict[str, torch.Tensor]:
    """Load the encoder weights at ``source`` into ``model``'s encoder, refusing (naming the keys) a
    file that does not fit it: every encoder tensor must be in the file with its shape, and nothing
    else may be. A classifier in the file (and a classifier MLP's hidden layer) is dropped: the
    downstream task has its own classes. Returns the loaded state."""
    path, state = read_encoder_weights(source)
    encoder = encoder_of(model)
    head = head_only_keys(encoder, model_name)
    state = {k: v for k, v in state.items() if not is_classifier_key(encoder, k) and k not in head}
    want = {k: v for k, v in encoder.state_dict().items() if k not in head}  # a classifier is in ``head``
    missing, unexpected = set(want) - set(state), set(state) - set(want)
    reshaped = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        problems = [f"{what} {_examples(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if keys]
        pretrained_as = _run_model(path)
        if pretrained_as not in (None, model_name):
            raise ConfigError(f"pretrained={path} is the encoder of a {pretrained_as} pretraining run (its config "
                              f"record) and does not fit {model_name} ({'; '.join(problems)}); set "
                              f"model={pretrained_as}")
        raise ConfigError(f"pretrained={path} does not fit {model_name}: {'; '.join(problems)}")
    encoder.load_state_dict(state, strict=False)
    return state
