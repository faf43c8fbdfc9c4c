"""The set-up is reproducible: one set of pins, a patched MinkowskiEngine, an idempotent script."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import needs_minkowski

ROOT = Path(__file__).resolve().parents[1]


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_minkowski", ROOT / "scripts/build_minkowski.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_environment_yml_pins_the_same_versions_as_the_setup_script():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = dict(line.split("==") for line in pip_section)
    assert {k.lower(): v for k, v in conda_pins.items()} == requirement_pins()
    assert "python=3.11" in env["dependencies"]
    assert requirement_pins()["torch"] == "2.14.1" and requirement_pins()["torchvision"] == "0.29.1"


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for name, pinned in requirement_pins().items():
        assert version(name) == pinned, name


@needs_minkowski
def test_the_minkowski_engine_built_is_the_pinned_one():
    import MinkowskiEngine as ME

    assert ME.__version__ == "0.5.4"


def test_collections_patch_splits_abc_names(tmp_path):
    build = load_build_script()
    pkg = tmp_path / "MinkowskiEngine"
    pkg.mkdir()
    (pkg / "a.py").write_text("from collections import Sequence, namedtuple\nx = 1\n")
    (pkg / "b.py").write_text("from collections import OrderedDict\n")
    assert build.patch_collections_imports(tmp_path) == 1
    assert (pkg / "a.py").read_text() == (
        "from collections import namedtuple\nfrom collections.abc import Sequence\nx = 1\n")
    assert (pkg / "b.py").read_text() == "from collections import OrderedDict\n"


def test_wheel_cache_key_names_what_the_build_depends_on():
    import torch

    key = load_build_script().cache_key("cpu")
    assert key.startswith("me0.5.4-") and f"torch{torch.__version__}" in key
    assert f"cp{sys.version_info.major}{sys.version_info.minor}" in key and "-cpu-" in key


def test_second_setup_is_quick_and_builds_nothing():
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pinned packages already installed" in proc.stdout
    assert re.search(r"MinkowskiEngine 0\.5\.4 already installed", proc.stdout)
    assert "compiling" not in proc.stdout
