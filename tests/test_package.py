"""What ships: the license the metadata names is in the repository and in the built wheel; the README says what holds
only inside the repository (relative links) and on this project's package index (``torch==2.13.0`` as a CPU build)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_apache_license_is_in_the_repository_and_declared() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


@pytest.mark.slow
def test_the_wheel_ships_the_license(tmp_path) -> None:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("license-files needs setuptools >= 77")
    tree = tmp_path / "tree"  # a copy, so the build writes nothing into the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(tree)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("xattention-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        license_path = next(n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
        assert zf.read(license_path) == (ROOT / "LICENSE").read_bytes()
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


def test_the_readme_says_what_holds_only_here() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # torch==2.13.0 is the CPU build on this project's package index only; PyTorch's own CPU index is the portable way
    assert "https://download.pytorch.org/whl/cpu" in readme and "https://pytorch.org/get-started/locally/" in readme
    # images and links are relative to the repository: they do not resolve in the package description
    assert "relative to the repository" in readme
