"""Argument types the benchmarks' argparse command lines share: a value no benchmark can run is
refused by argparse in one line naming the option (``error: argument --batch-size: ...``), before
any model is built, instead of a traceback from deep inside the first pass."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# train-mode batch norm needs two values per channel; the benchmarks run the encoders in train mode
TRAIN_BATCH = 2


def _parsed(text: str, kind: type, expect: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expect}, got {text!r}") from None


def whole(minimum: int, why: str = "") -> Callable[[str], int]:
    """A whole number of at least ``minimum`` (``why`` says what needs that much)."""
    expect = f"a whole number of at least {minimum}" + (f" ({why})" if why else "")

    def parse(text: str) -> int:
        value = _parsed(text, int, expect)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {expect}, got {value}")
        return value

    return parse


def multiple_of_32(text: str) -> int:
    """An input size or a decoder width: the encoders' total stride, and the decoder's channels."""
    value = _parsed(text, int, "a positive multiple of 32")
    if value <= 0 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32, got {value}")
    return value


def mask_ratio(text: str) -> float:
    value = _parsed(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


train_batch = whole(TRAIN_BATCH, "train-mode batch norm")
repeats = whole(1)
seed = whole(0)
