"""Layers: the model library (models/, kernels/) never imports the training app (train/)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "kernels")


def app_imports(source: str, package: str) -> list[str]:
    """Every import in ``source`` (top level or inside functions) that reaches the training app,
    absolute (``spikeformers.train...``) or relative (``..train``, ``from .. import train``) from a
    module of ``package`` (dotted, e.g. ``spikeformers.models``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_app(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, package)
            if _is_app(target) or any(_is_app(f"{target}.{alias.name}") for alias in node.names):
                found.append("." * node.level + (node.module or ""))
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: max(len(parts) - (node.level - 1), 0)]  # level 1: this package, 2: its parent, ...
    return ".".join(parts + ([node.module] if node.module else []))


def _is_app(name: str) -> bool:
    return name == "spikeformers.train" or name.startswith("spikeformers.train.")


def library_modules() -> list[Path]:
    return sorted(path for folder in LIBRARY for path in (REPO / folder).rglob("*.py"))


def package_of(path: Path) -> str:
    return ".".join(["spikeformers", *path.relative_to(REPO).parent.parts])


@pytest.mark.parametrize("source, package, expected", [
    ("from spikeformers.train.checkpoint import atomic_write", "spikeformers.models", ["spikeformers.train.checkpoint"]),
    ("def f():\n    import spikeformers.train.main as m", "spikeformers.models", ["spikeformers.train.main"]),
    ("from spikeformers.train import checkpoint", "spikeformers.kernels", ["spikeformers.train"]),
    ("from ..train.data import DataInfo", "spikeformers.models", ["..train.data"]),
    ("from .. import train", "spikeformers.models", [".."]),
    ("from ...train import main", "spikeformers.models.blocks", ["...train"]),
    ("from spikeformers.models import hub\nfrom . import layers\nfrom .. import models\nimport torch",
     "spikeformers.models", []),
])
def test_scanner_finds_app_imports(source, package, expected):
    assert app_imports(source, package) == expected


def test_model_library_does_not_import_the_training_app():
    offenders = {
        str(path.relative_to(REPO)): imports
        for path in library_modules()
        if (imports := app_imports(path.read_text(), package_of(path)))
    }
    assert offenders == {}, f"the model library imports the training app: {offenders}"
