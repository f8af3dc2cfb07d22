"""The installed package takes one name (issue 14, item 5): the repository's kernels/, models/ and
cli.py install as ann2snn.kernels, ann2snn.models and ann2snn.cli, nothing as a top-level module.

The wheel is built from a copy of the checkout by setuptools' own PEP 517 hook (no network, no
pip), then checked file by file, then imported in a fresh interpreter that sees only the wheel
and the environment's third-party packages (`python -S`: no .pth, so no editable install).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the copy leaves out: environments, outputs, caches, the git store
_SKIP = shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "*.egg-info", "build", "dist", ".whl",
                               ".pytest_cache", "docs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "ann2snn"
    shutil.copytree(REPO, source, symlinks=True, ignore=_SKIP)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_installs_nothing_under_a_generic_top_level_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"ann2snn"}
    # every module of the checkout is in it, under ann2snn
    expected = {f"ann2snn/{p.relative_to(REPO / 'ann2snn')}" for p in (REPO / "ann2snn").rglob("*.py")}
    expected |= {f"ann2snn/{folder}/{p.relative_to(REPO / folder)}" for folder in ("kernels", "models")
                 for p in (REPO / folder).rglob("*.py")}
    expected |= {f"ann2snn/kernels/{p.name}" for p in (REPO / "kernels").glob("*.[ch]")}
    expected |= {f"ann2snn/energy/tables/{p.name}" for p in (REPO / "ann2snn" / "energy" / "tables").glob("*.json")}
    assert not expected - names, sorted(expected - names)
    assert zipfile.ZipFile(wheel).read("ann2snn/cli.py") == (REPO / "cli.py").read_bytes()   # the file, not a link
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ann2snn = ann2snn.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_runs_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    code = ("import importlib.util, ann2snn, ann2snn.cli, ann2snn.kernels, ann2snn.models; "
            "print([m.__file__.startswith(%r) for m in (ann2snn, ann2snn.cli, ann2snn.kernels, ann2snn.models)], "
            "[importlib.util.find_spec(name) for name in ('cli', 'kernels', 'models')])" % str(site))
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[True, True, True, True] [None, None, None]"
    command = subprocess.run([sys.executable, "-S", "-m", "ann2snn", "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert command.returncode == 0 and "Usage: " in command.stdout, command.stderr[-3000:]
