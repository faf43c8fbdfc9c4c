"""MinkowskiEngine is a dependency of the sparse engine only: fine-tuning, the dense-masked engine
and pretraining with it run where MinkowskiEngine is not installed (as on a GPU cluster where its
CUDA build failed), and asking for the sparse engine there fails with one line naming the fix."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import needs_minkowski
from .runs import error_lines, run_child

ROOT = Path(__file__).resolve().parents[1]

# prepended to a child's code: importing MinkowskiEngine fails as it does where it was never built
WITHOUT_MINKOWSKI = textwrap.dedent("""
    import importlib.abc, sys

    class NoMinkowskiEngine(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] == "MinkowskiEngine":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoMinkowskiEngine())
""")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return run_child([sys.executable, "-c", code, *args], env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_fine_tuning_and_the_dense_masked_engine_work_and_the_sparse_one_says_what_is_missing(tmp_path):
    code = WITHOUT_MINKOWSKI + textwrap.dedent(f"""
        import json, sys
        import torch
        from hydra import compose, initialize_config_dir
        import spark_sparse
        import spark_sparse.finetune.app  # the whole fine-tuning app
        import spark_sparse.pretrain.app as pretrain
        from spark_sparse.run.recipe import register_resolver
        from spark_sparse import MaskedDenseEncoder, create_encoder, random_active
        from spark_sparse.run.checks import ConfigError
        from spark_sparse.pretrain.checks import validate

        torch.manual_seed(0)
        encoder = create_encoder("resnet18", "dense_masked")
        maps = encoder.dense_features(torch.randn(2, 3, 64, 64), random_active(2, (2, 2), mask_ratio=0.5))
        maps[-1].sum().backward()

        errors = []
        for ask in (lambda: spark_sparse.SparseEncoder, lambda: create_encoder("resnet18", "sparse")):
            try:
                ask()
            except ImportError as err:
                errors.append(str(err))
        register_resolver()
        with initialize_config_dir(config_dir="{ROOT / 'conf'}", version_base="1.3"):
            tiny = ["model=resnet18", "input_size=64", "batch_size=2", "decoder.width=32", "max_steps=1",
                    "vis_images=1", "threads=1"]
            try:
                validate(compose("pretrain", overrides=tiny + ["engine=sparse"]))
            except ConfigError as err:
                errors.append(str(err))
            summary = pretrain.train(compose("pretrain", overrides=tiny + ["engine=dense_masked"]), "{tmp_path}")
        print(json.dumps({{"masked": isinstance(encoder, MaskedDenseEncoder),
                          "shapes": [list(m.shape) for m in maps],
                          "grad": all(p.grad is not None for p in encoder.parameters() if p.requires_grad),
                          "steps": summary["step"], "errors": errors,
                          "imported": "MinkowskiEngine" in sys.modules}}))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["masked"] and out["grad"] and out["steps"] == 1
    assert out["shapes"] == [[2, 64, 16, 16], [2, 128, 8, 8], [2, 256, 4, 4], [2, 512, 2, 2]]
    assert len(out["errors"]) == 3  # SparseEncoder, create_encoder(..., "sparse"), pretrain engine=sparse
    for message in out["errors"]:
        assert "\n" not in message and "needs MinkowskiEngine" in message
        assert "No module named 'MinkowskiEngine'" in message and "make setup" in message
        assert "scripts/build_minkowski.py" in message
    assert not out["imported"]


def test_the_fine_tuning_command_runs_without_minkowski(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        for name, rgb in (("red", (220, 30, 40)), ("blue", (30, 40, 220))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((40, 40, 3), rgb, np.uint8)).save(tmp_path / split / name / f"{i}.png")
    run = tmp_path / "run"
    code = WITHOUT_MINKOWSKI + "import runpy; runpy.run_module('spark_sparse.finetune', run_name='__main__', alter_sys=True)"
    proc = run_python(code, "input_size=32", "batch_size=4", "epochs=1", "threads=1",
                      f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert not error_lines(proc.stderr), proc.stderr  # progress bars only: no warning while it loads and runs
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and 0.0 <= record["val_top1"] <= 100.0
    assert (run / "checkpoints" / "last.pt").is_file()


@needs_minkowski
def test_minkowski_is_imported_only_when_the_sparse_engine_is_asked_for_and_quietly():
    code = textwrap.dedent("""
        import json, sys, warnings
        import spark_sparse, spark_sparse.finetune, spark_sparse.pretrain
        import spark_sparse.finetune.app
        before = "MinkowskiEngine" in sys.modules
        spark_sparse.create_encoder("resnet18", "dense_masked")
        after_dense = "MinkowskiEngine" in sys.modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls = spark_sparse.SparseEncoder
        print(json.dumps({"before": before, "after_dense": after_dense, "after": "MinkowskiEngine" in sys.modules,
                          "name": cls.__name__, "listed": "SparseEncoder" in dir(spark_sparse),
                          "warnings": [str(w.message) for w in caught]}))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["before"] and not out["after_dense"]
    assert out["after"] and out["name"] == "SparseEncoder" and out["listed"]
    assert not [w for w in out["warnings"] if "CPU_ONLY" in w]  # silenced by spark_sparse/sparse/__init__.py


SPARSE_ENGINE_MODULES = {"test_benchmarks", "test_device", "test_efficientformer_v2", "test_encoder_equivalence",
                         "test_graphed", "test_mvitv2", "test_patch_conv", "test_rowwise", "test_sparse_properties"}


def test_without_minkowski_the_suite_collects_the_sparse_engines_modules_skip_saying_why_and_the_rest_runs():
    # the whole suite is collected; of a module about both engines the dense-masked cases run
    code = WITHOUT_MINKOWSKI + "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"
    proc = run_python(code, "-v", "-rs", "-p", "no:cacheprovider", "-o", "addopts=", "tests", "-k", "test_inputs")
    assert proc.returncode == 0, proc.stdout[-3000:]
    skipped = re.findall(r"^SKIPPED \[\d+\] tests/(test_\w+)\.py:\d+: (.+)$", proc.stdout, re.M)
    assert {module for module, _ in skipped} == SPARSE_ENGINE_MODULES | {"test_inputs"}
    assert all(why.startswith("MinkowskiEngine is not installed") for _, why in skipped)
    outcomes = dict(re.findall(r"^tests/test_inputs\.py::(\S+) (PASSED|SKIPPED|FAILED|ERROR)", proc.stdout, re.M))
    assert outcomes and all(outcome == ("SKIPPED" if "[sparse]" in test else "PASSED")
                            for test, outcome in outcomes.items()), outcomes
    assert sum("[dense_masked]" in test for test in outcomes) == sum("[sparse]" in test for test in outcomes) > 0
