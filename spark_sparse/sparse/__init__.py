"""The sparse engine: visible pixels as MinkowskiEngine sparse tensors, per-batch index tables, and our operators on them.

MinkowskiEngine is imported here, before any module of the engine, and only here is it a
requirement: fine-tuning and the dense-masked engine never import this package.
"""

import warnings

try:
    with warnings.catch_warnings():
        # a CPU-only MinkowskiEngine build is what we build on machines without a GPU: not news
        warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
        import MinkowskiEngine as ME
except ImportError as err:
    raise ImportError(f"the sparse engine needs MinkowskiEngine, which does not import ({err}); build it with "
                      "`make setup` or `python scripts/build_minkowski.py` (fine-tuning and engine=dense_masked "
                      "run without it)", name="MinkowskiEngine") from err

__all__ = ["ME"]
