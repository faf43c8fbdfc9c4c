"""Where a timm model's stem ends and each stage, one per scale, begins: the ``Layout`` a family
reads off a model (most from timm's feature taps), and the scales SparK's decoder can take (their
strides double up to the mask's patch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .refusals import ConversionError


class Layout(NamedTuple):
    """How one timm model runs as an encoder. Paths are timm module paths."""

    stem: tuple[str, ...]  # run in order before the stages
    stages: tuple[tuple[str, ...], ...]  # one per scale (``Family.strides``), each run in order
    channels: tuple[int, ...]  # of each stage's output

    def top_level(self) -> list[str]:
        """The timm model's top-level modules the encoder converts, in order."""
        paths = self.stem + tuple(p for stage in self.stages for p in stage)
        return list(dict.fromkeys(p.split(".")[0] for p in paths))


# the stages' strides of most families; the last is the mask's patch size
STRIDES = (4, 8, 16, 32)


PATCH = STRIDES[-1]


def check_strides(model: nn.Module, reductions: list[int], strides: tuple[int, ...] = STRIDES) -> None:
    if tuple(reductions) != strides:
        raise ConversionError(f"{type(model).__name__}: stage strides {reductions} are not "
                              f"{', '.join(map(str, strides))} (dilated or output-stride models cannot be masked "
                              f"on a {PATCH}-pixel grid)")


# the mask's patch sizes a family's coarsest stride may set (NesT's 16; 64 would need inputs of its multiples)
PATCHES = (16, PATCH)


def check_scales(strides: tuple[int, ...]) -> None:
    """A family's scales feed SparK's decoder, whose blocks double the resolution from the mask's
    patch (the coarsest stride, 32 or 16) down: they must halve without a gap (4, 8, 16, 32;
    Visformer's 8, 16, 32; NesT's 4, 8, 16)."""
    if not strides or strides[-1] not in PATCHES or any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"encoder strides {strides} must double from the finest to the mask's patch, "
                         f"{' or '.join(map(str, PATCHES))}")


@dataclass(frozen=True)
class NamedStages:
    """Named stage modules (timm's feature taps) at ``strides``; ``head`` (a final 1x1 convolution
    before pooling, say) runs after the last, which then has ``num_features`` channels."""

    stem: tuple[str, ...]
    stages: tuple[str, ...]
    head: tuple[str, ...] = ()
    strides: tuple[int, ...] = STRIDES

    def __call__(self, model: nn.Module) -> Layout:
        info = {i["module"]: i for i in model.feature_info}
        missing = [s for s in self.stages if s not in info]
        if missing:
            raise ConversionError(f"{type(model).__name__} reports no features for {missing}")
        check_strides(model, [info[s]["reduction"] for s in self.stages], self.strides)
        channels = [info[s]["num_chs"] for s in self.stages]
        if self.head:
            channels[-1] = model.num_features
        groups = tuple((s,) for s in self.stages[:-1]) + ((self.stages[-1], *self.head),)
        return Layout(self.stem, groups, tuple(channels))


@dataclass(frozen=True)
class BlockStages:
    """Models whose body is one Sequential (``blocks``: EfficientNet, MobileNetV3; ``features``:
    RexNet) of stages: a stage runs every block after the previous stage's tap up to timm's
    feature tap at its stride; blocks after the last tap, then ``head``, end the last stage,
    which then has ``num_features`` channels (what timm's ``forward_features`` returns)."""

    stem: tuple[str, ...]
    head: tuple[str, ...] = ()
    body: str = "blocks"

    def __call__(self, model: nn.Module) -> Layout:
        taps = {i["reduction"]: i for i in model.feature_info}  # the last tap at each stride
        check_strides(model, sorted(r for r in taps if r > 2))
        modules = [taps[r]["module"] for r in STRIDES]
        if not all(m.startswith(f"{self.body}.") for m in modules):
            raise ConversionError(f"{type(model).__name__}: feature taps {modules} are not in '{self.body}'")
        ends = [int(m.split(".")[1]) for m in modules]
        last = len(getattr(model, self.body)) - 1
        channels = [taps[r]["num_chs"] for r in STRIDES]
        if self.head or ends[-1] < last:
            channels[-1] = model.num_features
        ends[-1] = last  # blocks after the last tap keep its stride
        starts = [0] + [e + 1 for e in ends[:-1]]
        stages = [tuple(f"{self.body}.{i}" for i in range(a, e + 1)) for a, e in zip(starts, ends)]
        stages[-1] += self.head
        return Layout(self.stem, tuple(stages), tuple(channels))


@dataclass(frozen=True)
class TappedStages:
    """Models whose body is ``stem``, the Sequential ``stages`` and ``head`` (ByobNet's final 1x1
    convolution), run in that order (ByobNet, CspNet). A stage ends at timm's feature tap at
    its stride; what runs before the stride-4 stage (CSPDarkNet's stride-2 first stage, after a
    stride-1 stem) joins the stem, what runs after the stride-32 tap joins the last stage, which
    then has ``num_features`` channels."""

    head: tuple[str, ...] = ()

    def __call__(self, model: nn.Module) -> Layout:
        order = ["stem", *(f"stages.{i}" for i in range(len(model.stages))), *self.head]
        taps = {}  # reduction -> (position in order, channels) of the last top-level tap there
        for info in model.feature_info:
            if info["module"] in order:
                taps[info["reduction"]] = (order.index(info["module"]), info["num_chs"])
        check_strides(model, sorted(r for r in taps if r > 2))
        early = [taps[r][0] for r in taps if r < STRIDES[0]]
        ends = [max(early, default=0)] + [taps[r][0] for r in STRIDES]
        ends[-1] = len(order) - 1  # the head keeps the last stride
        channels = [taps[r][1] for r in STRIDES]
        if taps[STRIDES[-1]][0] < ends[-1]:  # a head timm does not tap (FastViT's final MobileOne block)
            channels[-1] = model.num_features
        stages = tuple(tuple(order[a + 1:e + 1]) for a, e in zip(ends, ends[1:]))
        return Layout(tuple(order[:ends[0] + 1]), stages, tuple(channels))


@dataclass(frozen=True)
class ChildStages:
    """Models whose body is one Sequential (``features``: VGG, DenseNet, DPN; ``dense_stages``:
    RDNet) with timm's feature taps among its children: the stem (``stem`` first, where the model
    has one apart) runs up to the last tap below stride 4, a stage from there up to its stride's
    tap; children after the stride-32 tap (DPN's final norm), then ``head`` (RDNet's ``norm_pre``),
    end the last stage, which then has ``num_features`` channels."""

    body: str = "features"
    stem: tuple[str, ...] = ()
    head: tuple[str, ...] = ()

    def __call__(self, model: nn.Module) -> Layout:
        order = [f"{self.body}.{name}" for name, _ in getattr(model, self.body).named_children()]
        taps = {i["reduction"]: i for i in model.feature_info}  # the last tap at each stride
        check_strides(model, sorted(r for r in taps if r > 2))
        ends = [max((order.index(taps[r]["module"]) for r in taps if r < STRIDES[0]), default=-1)]
        ends += [order.index(taps[r]["module"]) for r in STRIDES]
        channels = [taps[r]["num_chs"] for r in STRIDES]
        if ends[-1] < len(order) - 1:
            channels[-1] = model.num_features
        ends[-1] = len(order) - 1  # children after the last tap keep its stride
        stages = [tuple(order[a + 1:e + 1]) for a, e in zip(ends, ends[1:])]
        stages[-1] += self.head
        return Layout(self.stem + tuple(order[:ends[0] + 1]), tuple(stages), tuple(channels))


class StemPool(NamedTuple):
    """A stem that ends in an activation then a max pooling (top-level module names). An engine may
    pool first (they commute for ReLU), and hidden zeros never win the pooling after a ReLU."""

    act: str
    pool: str
