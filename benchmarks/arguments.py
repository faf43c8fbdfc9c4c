"""Argument types the benchmarks' argparse command lines share: a value no benchmark can run is
refused by argparse in one line naming the option (``error: argument --batch-size: ...``), before
any model is built, instead of a traceback from deep inside the first pass. The rules are the
apps' own (``run/schema.py``, pretraining's ``KEYS``), read from text."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from spark_sparse.pretrain.checks import KEYS
from spark_sparse.run.schema import FRACTION, Rule, at_least


def argument(rule: Rule, kind: type = int) -> Callable[[str], int | float]:
    """An argparse type: the text as ``kind``, refused unless ``rule`` holds for it."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule.expect}, got {text!r}") from None
        if not rule.ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule.expect}, got {text}")
        return value

    return parse


def whole(minimum: int) -> Callable[[str], int]:
    return argument(at_least(minimum))


multiple_of_32 = argument(KEYS["input_size"])  # an input size; a decoder width follows the same rule
mask_ratio = argument(FRACTION, float)
# the benchmarks run the encoders in train mode, whose batch norm needs two values per channel
train_batch = argument(Rule(f"{at_least(2).expect} (train-mode batch norm)", at_least(2).ok))
repeats = whole(1)
seed = whole(0)
