"""The one-way layer order of docs/design.md, as the import-linter contracts in pyproject.toml state it.

``lint-imports`` runs on the checkout and on a copy of the package with one import that breaks the order
(each of the cycles the order replaced among them): the copy must fail, naming that import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hilal

ROOT = Path(hilal.__file__).resolve().parent.parent


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` as ``make lint`` runs it, on the package and pyproject.toml found in ``cwd``."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(cwd)})


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the package's sources and of pyproject.toml (the contracts) under ``tmp_path``."""
    shutil.copytree(ROOT / "hilal", tmp_path / "hilal", ignore=shutil.ignore_patterns("__pycache__", "resources"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_checkout_keeps_every_layer_contract():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken\.", r.stdout), r.stdout[-3000:]


def test_an_unchanged_copy_keeps_them(package_copy):
    """The control for the next test: the copy itself passes, so its failures come from the added import."""
    r = lint_imports(package_copy)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize(("module", "line", "message"), [
    # the three cycles the order replaced: device helpers, dataset registration, argparse builders
    ("analog.py", "from hilal.train import model_device", "hilal.analog is not allowed to import hilal.train"),
    ("qa.py", "from hilal.data import DATASETS", "hilal.qa is not allowed to import hilal.data"),
    ("bench/cli.py", "from hilal.cli import add_bench_options", "hilal.bench is not allowed to import hilal.cli"),
    # the bottom importing the top, inside a function (local imports count too)
    ("registry.py", "def _late():\n    from hilal.cli import main",
     "hilal.registry is not allowed to import hilal.cli"),
    # independent siblings, and the subpackages' own orders
    ("plots/base.py", "import hilal.reproduce", "hilal.plots is not allowed to import hilal.reproduce"),
    ("mapping/config.py", "from hilal.mapping.run import _Run",
     "hilal.mapping.config is not allowed to import hilal.mapping.run"),
    ("bench/config.py", "from hilal.bench.tables import table",
     "hilal.bench.config is not allowed to import hilal.bench.tables"),
    ("hessian/config.py", "from hilal.hessian.operators import HessianOperator",
     "hilal.hessian.config is not allowed to import hilal.hessian.operators"),
    ("hessian/graphs.py", "from hilal.hessian.config import HessianConfig",
     "hilal.hessian.graphs is not allowed to import hilal.hessian.config"),
])
def test_an_import_against_the_order_breaks_a_contract(package_copy, module, line, message):
    path = package_copy / "hilal" / module
    path.write_text(path.read_text() + "\n\n" + line + "\n")
    r = lint_imports(package_copy)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert message in r.stdout, r.stdout[-3000:]
    assert "BROKEN" in r.stdout


def test_a_module_without_a_place_in_the_order_breaks_it(package_copy):
    """The contract is exhaustive: a new module must be placed in the order before it is checked against it."""
    (package_copy / "hilal" / "newcomer.py").write_text('"""A module nobody placed."""\n')
    r = lint_imports(package_copy)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "hilal.newcomer" in r.stdout


def test_datasets_are_registered_in_one_place_whatever_is_imported_first():
    """``hilal.qa`` defines the question-answering builders and imports nothing from ``hilal.data``, which
    registers them: importing qa first (in a fresh interpreter) still gives the full registry."""
    code = ("import hilal.qa, sys\n"
            "assert 'hilal.data' not in sys.modules\n"
            "from hilal.data import DATASETS, load_dataset\n"
            "assert DATASETS['squad'] is hilal.qa.squad and DATASETS['squad_sample'] is hilal.qa.squad_sample\n"
            "print(sorted(DATASETS))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["['cifar10',", "'cifar100',", "'digits',", "'imagenet',", "'squad',",
                                "'squad_sample']"]


def test_the_device_helpers_keep_their_old_home():
    """``hilal.device`` owns them; ``hilal.train`` still exports the same functions for existing callers."""
    import hilal.device
    import hilal.train

    for name in ("default_device", "model_device", "to_device"):
        assert getattr(hilal.train, name) is getattr(hilal.device, name)


@pytest.mark.parametrize("package", ["hilal.bench", "hilal.hessian", "hilal.mapping", "hilal.plots"])
def test_subpackage_modules_import_one_way(package):
    """A subpackage's modules import each other without a cycle and never through the package itself (a module
    importing its own package would see it half-initialized)."""
    import ast
    import importlib
    from graphlib import CycleError, TopologicalSorter

    folder = Path(importlib.import_module(package).__file__).parent
    graph = {}
    for f in folder.glob("*.py"):
        if f.name == "__init__.py":
            continue
        tree = ast.parse(f.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert package not in names, f.name
        graph[f.stem] = {n.split(".")[2] for n in names if n and n.startswith(package + ".")}
    assert set().union(*graph.values()) <= set(graph)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle: {e.args[1]}")
    assert set(order) == set(graph)
