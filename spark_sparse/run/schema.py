"""Every config key an app accepts, declared once with what its value must be, and checked before
anything is read or written: a key whose type or range makes the run fail or train nonsense
(a negative clip, a drop-path rate of 1.5, ``mask_ratio=abc``) is refused in one line naming it,
and a key nobody declared (``+optim.lrr=...``, or a new key someone forgot) is refused too.

An app's schema maps dotted keys to ``Rule``s (``pretrain/checks.py``, ``finetune/checks.py``, on the
shared keys of ``RUN_KEYS`` in checks.py; the speed benchmark's in benchmarks/sparse_vs_dense.py); a
test checks that every key of every config group is declared. Rules that tie keys together (a batch
that must split among the processes) stay with the app's checks.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass(frozen=True)
class Rule:
    """What a key's value must be: ``ok(value)``, and ``expect``, the words that say so."""

    expect: str
    ok: Callable[[Any], bool]
    nested: bool = False  # the key holds a table its own code checks (a recipe): not descended into

    def __or__(self, other: Rule) -> Rule:
        return Rule(f"{self.expect} or {other.expect}", lambda v: self.ok(v) or other.ok(v))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(expect: str, ok: Callable[[float], bool] = lambda v: True, whole: bool = False) -> Rule:
    """A finite number (a whole one with ``whole``) for which ``ok`` holds."""
    typed = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if whole else _is_number
    return Rule(expect, lambda v: typed(v) and ok(v))


def at_least(lo: int) -> Rule:
    return number(f"a whole number of at least {lo}", lambda v: v >= lo, whole=True)


def multiple_of(n: int) -> Rule:
    return number(f"a positive multiple of {n}", lambda v: v > 0 and v % n == 0, whole=True)


WHOLE = number("a whole number", whole=True)


POSITIVE = number("positive", lambda v: v > 0)
NON_NEGATIVE = number("at least 0", lambda v: v >= 0)
FRACTION = number("in [0, 1)", lambda v: 0 <= v < 1)  # a rate that must leave something: drop path, mask
PROBABILITY = number("in [0, 1]", lambda v: 0 <= v <= 1)
NULL = Rule("null", lambda v: v is None)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str) and v != "")
ANY_TABLE = Rule("a table", lambda v: True, nested=True)


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


def numbers(count: int, expect: str, ok: Callable[[list], bool] = lambda v: True) -> Rule:
    """A list of ``count`` finite numbers for which ``ok`` holds."""
    return Rule(expect, lambda v: isinstance(v, list) and len(v) == count and all(map(_is_number, v)) and ok(v))


TEXTS = Rule("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def leaves(cfg: DictConfig, schema: Mapping[str, Rule], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, resolved value) of every leaf of ``cfg``, a nested table declared as such
    taken whole (unresolved: its own code reads it); lists are leaves."""
    for key in cfg:
        path = f"{prefix}{key}"
        node = cfg._get_node(key)
        nested = (rule := schema.get(path)) is not None and rule.nested
        if isinstance(node, DictConfig) and not nested:
            yield from leaves(node, schema, f"{path}.")
        elif isinstance(node, DictConfig):
            yield path, OmegaConf.to_container(node, resolve=False)
        else:
            value = cfg[key]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            yield path, value


def check_keys(cfg: DictConfig, schema: Mapping[str, Rule], error: type[Exception]) -> None:
    """Refuse (``error``, one line naming the key) the first key of ``cfg`` that the schema does not
    declare or whose value breaks its rule. Hydra's own settings are not the app's keys."""
    for key, value in leaves(cfg, schema):
        rule = schema.get(key)
        if rule is None:
            close = difflib.get_close_matches(key, list(schema), n=3)
            raise error(f"unknown config key {key}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        if not rule.ok(value):
            raise error(f"{key} must be {rule.expect}, got {_show(value)}")
