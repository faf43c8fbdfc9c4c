"""Which models of timm modules both engines convert, and why the rest are refused.

    .venv/bin/python -m scripts.coverage byobnet cspnet

Builds every model of each module (``timm.list_models(module=...)``, pretrained=False,
num_classes=0), converts it with each engine, and prints a markdown summary: models converted
out of the total, then the refusals grouped by their message with the path left out.
"""

from __future__ import annotations

import argparse
import gc
import re
from collections import defaultdict

import timm
import torch

from spark_sparse.encoders.refusals import ConversionError
from spark_sparse.encoders.registry import ENGINES, engine_class


def refusal(name: str, engines: list[str]) -> str | None:
    """None if every engine converts the model, else the first refusal (a ConversionError)."""
    model = timm.create_model(name, pretrained=False, num_classes=0)
    try:
        for engine in engines:
            engine_class(engine).from_timm(model)
    except ConversionError as err:
        return str(err)
    finally:
        del model
        gc.collect()
    return None


def summary(module: str, engines: list[str]) -> str:
    names = timm.list_models(module=module)
    refused = defaultdict(list)  # the message with its path left out -> models
    for name in names:
        with torch.no_grad():
            message = refusal(name, engines)
        if message is not None:
            refused[re.sub(r" at '[^']*'", "", message)].append(name)
    lines = [f"`{module}`: {len(names) - sum(map(len, refused.values()))} of {len(names)} models convert "
             f"({', '.join(engines)})"]
    for message, models in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {len(models)} refused, {message}: {', '.join(models)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="timm module names, e.g. byobnet cspnet")
    parser.add_argument("--engines", nargs="+", default=sorted(ENGINES), choices=sorted(ENGINES))
    args = parser.parse_args()
    for module in args.modules:
        print(summary(module, args.engines), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
