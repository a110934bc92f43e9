"""Packaging rules: one import name, no bare folder imports, shipped data."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import timm

REPO = Path(__file__).resolve().parents[1]
BARE_IMPORT = re.compile(r"^\s*(from|import) (models|train|configs|kernels)(\.| |$)", re.M)


def test_no_bare_folder_imports():
    offenders = [
        str(path.relative_to(REPO))
        for path in REPO.rglob("*.py")
        if ".git" not in path.parts and "site-packages" not in path.parts and BARE_IMPORT.search(path.read_text())
    ]
    assert offenders == []


def test_import_registers_models_in_a_fresh_interpreter():
    code = "import timm, spikeformers; print(len(timm.list_models('sdt*')), len(timm.list_models('spikformer*')))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    n_sdt, n_sf = map(int, out.stdout.split())
    assert n_sdt >= 10 and n_sf >= 9
    assert "Overwriting" not in out.stderr  # a double import would re-register


def test_installed_distribution_and_subpackages():
    assert importlib.metadata.version("spikeformers")
    import spikeformers.configs
    import spikeformers.kernels
    import spikeformers.models
    import spikeformers.train  # noqa: F401

    assert "spikformer_tiny" in timm.list_models("spikformer*")


def test_no_tests_package_init():
    assert not (REPO / "tests" / "__init__.py").exists()
    assert not (REPO / "conftest.py").exists()
