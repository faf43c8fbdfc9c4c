"""Patch, build, cache and install MinkowskiEngine 0.5.4 into the running interpreter's venv.

PyPI holds MinkowskiEngine 0.5.4 only as its 2021 source package. It needs two fixes to build
and import on Python 3.11 with a current torch:
  * its setup.py finds BLAS through numpy.distutils, which is gone from numpy 2: we pass
    ``--blas=openblas`` explicitly (and SETUPTOOLS_USE_DISTUTILS=stdlib for pip's metadata step,
    where the interpreter still has the standard library's distutils; from Python 3.12, where
    numpy has no distutils at all, the package comes from the index's JSON page instead of pip's
    download, which would run that setup.py to read its metadata);
  * five modules do ``from collections import Sequence``, removed in Python 3.10.
The compile takes minutes, so the built wheel is cached outside the checkout, keyed by
everything it depends on; a second set-up (or a fresh clone elsewhere) installs it in seconds.

Environment: SPARK_SPARSE_CACHE (cache folder), SPARK_SPARSE_ME_TARGET (cpu or cuda; default
cuda when a GPU and nvcc are present), MAX_JOBS (compile jobs).

Without a network or a system OpenBLAS (a GPU machine: scripts/device_check_pretrain.sh), the
CPU build comes from a carried source package and the CBLAS of the ``scipy-openblas32`` wheel:

    python scripts/build_minkowski.py --source MinkowskiEngine-0.5.4.tar.gz --scipy-openblas SITE --out DIR

builds the wheel into DIR (installing it is the caller's) with the same patches. SITE is where
the scipy-openblas32 wheel is installed: its library names its functions ``scipy_cblas_*``,
which the compile maps MinkowskiEngine's four CBLAS calls to, and the extension finds it at
run time through an rpath into SITE.
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ME_VERSION = "0.5.4"
# Bump when the patches below change, so cached wheels built with the old ones are not reused.
PATCH_REVISION = 1
COLLECTIONS_ABC = {"Sequence", "Mapping", "MutableMapping", "Iterable", "Callable", "Set"}


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[setup] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def cache_root() -> Path:
    if os.environ.get("SPARK_SPARSE_CACHE"):
        return Path(os.environ["SPARK_SPARSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "spark-sparse"


def build_target() -> str:
    import torch

    target = os.environ.get("SPARK_SPARSE_ME_TARGET")
    if target not in (None, "", "cpu", "cuda"):
        fail(f"SPARK_SPARSE_ME_TARGET must be 'cpu' or 'cuda', got {target!r}")
    has_gpu = torch.cuda.is_available() and shutil.which("nvcc") is not None
    if target == "cuda" and not shutil.which("nvcc"):
        fail("SPARK_SPARSE_ME_TARGET=cuda but nvcc is not on PATH")
    if not target:
        target = "cuda" if has_gpu else "cpu"
    return f"cuda{torch.version.cuda}" if target == "cuda" else "cpu"


def cache_key(target: str) -> str:
    import torch

    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"me{ME_VERSION}-torch{torch.__version__}-{py}-{target}-{platform.machine()}-p{PATCH_REVISION}"


def patch_collections_imports(src: Path) -> int:
    """Rewrite ``from collections import Sequence, ...`` into collections / collections.abc."""
    pattern = re.compile(r"^from collections import (.+)$", re.MULTILINE)
    changed = 0
    for path in sorted((src / "MinkowskiEngine").rglob("*.py")):
        text = path.read_text()

        def fix(match: re.Match) -> str:
            names = [n.strip() for n in match.group(1).split(",")]
            abc = [n for n in names if n in COLLECTIONS_ABC]
            plain = [n for n in names if n not in COLLECTIONS_ABC]
            lines = [f"from collections import {', '.join(plain)}"] if plain else []
            lines += [f"from collections.abc import {', '.join(abc)}"] if abc else []
            return "\n".join(lines)

        new = pattern.sub(fix, text)
        if new != text:
            path.write_text(new)
            changed += 1
    return changed


def run(cmd: list[str], cwd: Path | None, logfile: Path, what: str, env: dict | None = None) -> None:
    with open(logfile, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = logfile.read_text().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        fail(f"{what} failed (exit {proc.returncode}); full log: {logfile}")


def distutils_env() -> dict[str, str]:
    """The standard library's distutils for the old setup.py, where there is one (before Python
    3.12; from 3.12 setuptools' own copy is the only one, and asking for the other fails)."""
    return {"SETUPTOOLS_USE_DISTUTILS": "stdlib"} if sys.version_info < (3, 12) else {}


def index_url() -> str:
    """The index pip installs from: PIP_INDEX_URL, pip's configuration, else PyPI's."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    config = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                            capture_output=True, text=True)
    return config.stdout.strip() if config.returncode == 0 and config.stdout.strip() else "https://pypi.org/simple"


def fetch_source(folder: Path) -> Path:
    """The source package from the index's JSON page (PEP 691), checked against its sha256, without
    running its setup.py."""
    name = f"MinkowskiEngine-{ME_VERSION}.tar.gz"
    page = f"{index_url().rstrip('/')}/minkowskiengine/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            entry = next((f for f in json.load(response)["files"] if f["filename"] == name), None)
            if entry is None:
                fail(f"{page} lists no {name}")
            with urllib.request.urlopen(urllib.parse.urljoin(page, entry["url"]), timeout=180) as package:
                data = package.read()
    except (OSError, ValueError, KeyError) as err:
        fail(f"downloading {name} from {page} failed: {err}")
    if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
        fail(f"{name} from {page} does not match the index's sha256")
    (folder / name).write_bytes(data)
    return folder / name


def build_wheel(target: str, dest: Path) -> Path:
    if target == "cpu" and ctypes.util.find_library("openblas") is None:
        fail("OpenBLAS not found: install Debian's libopenblas-dev (scripts/setup.sh does this)")
    dest.mkdir(parents=True, exist_ok=True)
    logfile = dest / "build.log"
    logfile.write_text("")
    env = dict(os.environ, **distutils_env())
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="spark-sparse-me-") as tmp:
        tmpdir = Path(tmp)
        log(f"downloading the MinkowskiEngine {ME_VERSION} source package from PyPI")
        if sys.version_info < (3, 12):
            run([sys.executable, "-m", "pip", "download", f"MinkowskiEngine=={ME_VERSION}", "--no-deps",
                 "--no-binary", ":all:", "--no-build-isolation", "-d", str(tmpdir)],
                None, logfile, "downloading MinkowskiEngine", env)
            archive = next(tmpdir.glob("MinkowskiEngine-*.tar.gz"))
        else:
            archive = fetch_source(tmpdir)
        with tarfile.open(archive) as tar:
            tar.extractall(tmpdir, filter="data")
        src = tmpdir / f"MinkowskiEngine-{ME_VERSION}"
        log(f"patched collections.abc imports in {patch_collections_imports(src)} files")
        flags = ["--blas=openblas"] + (["--cpu_only"] if target == "cpu" else ["--force_cuda"])
        log(f"compiling ({target}, {env['MAX_JOBS']} jobs; several minutes; log: {logfile})")
        run([sys.executable, "setup.py", "bdist_wheel", *flags], src, logfile, "compiling MinkowskiEngine", env)
        built = next((src / "dist").glob("*.whl"))
        # copy then rename, so an interrupted set-up never leaves a half-written wheel in the cache
        partial = dest / (built.name + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, dest / built.name)
    return dest / built.name


CBLAS_CALLS = ("cblas_sgemm", "cblas_dgemm", "cblas_saxpy", "cblas_daxpy")  # all MinkowskiEngine uses


def scipy_openblas_env(site: Path, links: Path) -> dict[str, str]:
    """Compile and link settings for the scipy-openblas32 wheel's CBLAS, installed in ``site``.
    ``--blas=openblas`` links ``-lopenblas``: a link of that name in ``links`` is the wheel's
    library; the rpath (an old-style one, which its own libgfortran is found through as well),
    relative to the extension, finds it beside MinkowskiEngine wherever both are installed
    together: the wheel built once, for one Python and torch, serves any ``--target``."""
    root = site / "scipy_openblas32"
    library = root / "lib" / "libscipy_openblas.so"
    if not library.exists() or not (root / "include" / "cblas.h").exists():
        fail(f"no scipy-openblas32 in {site} (want {library} and include/cblas.h): install its wheel there")
    links.mkdir(parents=True, exist_ok=True)
    (links / "libopenblas.so").unlink(missing_ok=True)
    (links / "libopenblas.so").symlink_to(library)
    defines = " ".join(f"-D{name}=scipy_{name}" for name in CBLAS_CALLS)
    return {"CFLAGS": f"{defines} -I{root / 'include'}",
            "LDFLAGS": f"-L{links} -Wl,--disable-new-dtags,-rpath,$ORIGIN/../scipy_openblas32/lib"}


def build_offline(source: Path, site: Path, out: Path) -> Path:
    """The CPU wheel from a source package and scipy-openblas32, with the patches; no network."""
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "build.log"
    logfile.write_text("")
    with tempfile.TemporaryDirectory(prefix="spark-sparse-me-") as tmp:
        tmpdir = Path(tmp)
        env = dict(os.environ, **distutils_env(), **scipy_openblas_env(site, tmpdir / "blas"))
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        with tarfile.open(source) as tar:
            tar.extractall(tmpdir, filter="data")
        src = tmpdir / f"MinkowskiEngine-{ME_VERSION}"
        if not src.is_dir():
            fail(f"{source} is not the MinkowskiEngine {ME_VERSION} source package")
        log(f"patched collections.abc imports in {patch_collections_imports(src)} files")
        log(f"compiling (cpu, scipy-openblas32, {env['MAX_JOBS']} jobs; log: {logfile})")
        run([sys.executable, "setup.py", "bdist_wheel", "--blas=openblas", "--cpu_only"], src, logfile,
            "compiling MinkowskiEngine", env)
        built = next((src / "dist").glob("*.whl"))
        shutil.copy2(built, out / built.name)
    log(f"built {out / built.name}")
    return out / built.name


def installed_key(venv: Path) -> str:
    marker = venv / "minkowski-key.txt"
    return marker.read_text().strip() if marker.exists() else ""


def main() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        fail("torch is not installed in this environment; run scripts/setup.sh")
    target = build_target()
    key = cache_key(target)
    venv = Path(sys.prefix)
    if installed_key(venv) == key:
        log(f"MinkowskiEngine {ME_VERSION} already installed ({key})")
        return
    dest = cache_root() / "wheels" / key
    wheels = sorted(dest.glob("*.whl"))
    if wheels:
        log(f"using the cached MinkowskiEngine wheel {wheels[0]}")
        wheel = wheels[0]
    else:
        wheel = build_wheel(target, dest)
        log(f"cached the wheel as {wheel}")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
        None, dest / "install.log", "installing the MinkowskiEngine wheel")
    check = subprocess.run([sys.executable, "-c", "import MinkowskiEngine as ME; print(ME.__version__)"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
    if check.returncode != 0:
        print(check.stderr[-3000:], file=sys.stderr)
        fail(f"MinkowskiEngine installed from {wheel} but does not import; delete {dest} to rebuild")
    (venv / "minkowski-key.txt").write_text(key + "\n")
    log(f"MinkowskiEngine {check.stdout.strip()} ready")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build and install MinkowskiEngine 0.5.4 (no options: "
                                     "into this venv, from PyPI), or only build its CPU wheel offline")
    parser.add_argument("--source", type=Path, help="offline: the MinkowskiEngine-0.5.4.tar.gz source package")
    parser.add_argument("--scipy-openblas", type=Path, help="offline: the folder the scipy-openblas32 wheel is installed in")
    parser.add_argument("--out", type=Path, help="offline: where the wheel goes")
    args = parser.parse_args()
    offline = (args.source, args.scipy_openblas, args.out)
    if any(offline) and not all(offline):
        parser.error("an offline build needs --source, --scipy-openblas and --out")
    if all(offline):
        build_offline(args.source, args.scipy_openblas.resolve(), args.out.resolve())
    else:
        main()
