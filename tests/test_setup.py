"""The set-up is reproducible: one set of pins, a patched MinkowskiEngine, an idempotent script."""

import hashlib
import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
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


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A package index on localhost: its JSON page (PEP 691) for minkowskiengine lists ``files``."""
    files: list[dict] = []
    package = b"the source package's bytes"

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"files": files}).encode() if self.path == "/simple/minkowskiengine/" else package
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    for name in ("no_proxy", "NO_PROXY"):  # a proxy of the machine's is not asked for localhost
        monkeypatch.setenv(name, "127.0.0.1")
    yield files, package
    server.shutdown()


def test_the_source_package_is_fetched_from_pips_index_and_checked_against_its_hash(tmp_path, index, capsys):
    """Python 3.12's path: pip's download would run the package's setup.py, which needs numpy.distutils."""
    build = load_build_script()
    files, package = index
    files.append({"filename": "MinkowskiEngine-0.5.4.tar.gz", "url": "../../packages/me.tar.gz",
                  "hashes": {"sha256": hashlib.sha256(package).hexdigest()}})
    assert build.fetch_source(tmp_path).read_bytes() == package
    files[0]["hashes"]["sha256"] = hashlib.sha256(b"another package").hexdigest()
    with pytest.raises(SystemExit):
        build.fetch_source(tmp_path)
    assert "MinkowskiEngine-0.5.4.tar.gz from http://127.0.0.1:" in capsys.readouterr().err
    files.clear()
    with pytest.raises(SystemExit):
        build.fetch_source(tmp_path)
    assert "/simple/minkowskiengine/ lists no MinkowskiEngine-0.5.4.tar.gz" in capsys.readouterr().err


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
