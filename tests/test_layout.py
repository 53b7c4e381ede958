"""The package's layout (issue 30, README.md "Layout"): the folders are the pipeline.

Imports run down the layers declared in pyproject.toml ([tool.importlinter], checked with
import-linter), with no cycle between siblings anywhere; no private name is imported from
another folder; no module is over 500 lines; the options are declared once (AttnResConfig);
the entry points a fresh install registers resolve.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import attnres_compile as ac
from attnres_compile.plan.config import AttnResConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnres_compile"


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_imports_run_down_the_layers_without_cycles():
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        exe = shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extra"
    r = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "The pipeline runs downward KEPT" in r.stdout and "No import cycles between sibling modules KEPT" in r.stdout


def _imports(path: Path):
    """(imported module, name) of every `from ... import name` in a module, absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield module, alias.name


def test_no_private_name_crosses_folders():
    crossing = []
    for path in _modules():
        folder = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for module, name in _imports(path):
            if not module.startswith("attnres_compile") or not name.startswith("_") or name.startswith("__"):
                continue
            target = PACKAGE.parent / Path(*module.split("."))
            target_folder = module if target.is_dir() else module.rpartition(".")[0]
            if target_folder != folder:
                crossing.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
    assert not crossing, crossing


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_options_are_declared_once():
    """convert() takes AttnResConfig's conversion fields; the compile backend all of them."""
    conversion = {"num_blocks", "block_size", "preserve", "eps", "dynamic", "filter_fn"}
    fields = {f.name for f in dataclasses.fields(AttnResConfig)}
    params = set(inspect.signature(ac.convert).parameters) - {"model", "example_inputs", "kwargs", "config"}
    assert params == conversion <= fields
    assert set(AttnResConfig.SAVED) <= conversion
    from attnres_compile.compile import backend

    with pytest.raises(ValueError, match=r"unknown option\(s\) for the attnres backend: \['nope'\]"):
        backend._config({"nope": 1})
    assert backend._config({k: getattr(AttnResConfig(), k) for k in fields - {"filter_fn"}}).preserve == "scale"
    with pytest.raises(ValueError, match="set either num_blocks or block_size"):
        AttnResConfig(num_blocks=2, block_size=2)
    assert ac.convert.__doc__ and all(f.metadata.get("help") for f in dataclasses.fields(AttnResConfig))


@pytest.mark.parametrize("group, name, target", [
    ("console_scripts", "attnres", "attnres_compile.cli:main"),
    ("torch_dynamo_backends", "attnres", "attnres_compile.compile.backend:attnres_backend"),
    ("vllm.general_plugins", "attnres", "attnres_compile.serving.vllm_plugin:register"),
])
def test_entry_points_resolve(group, name, target):
    """The entry points of the installed package (pyproject.toml) load; the old backend path
    (`attnres_compile.lowering.backend`) still resolves for environments installed before."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    assert found, f"no {group} entry point {name}: reinstall the package (pip install -e .)"
    declared = (ROOT / "pyproject.toml").read_text()
    assert f'attnres = "{target}"' in declared
    assert callable(found[0].load())
    from attnres_compile.compile.backend import attnres_backend
    from attnres_compile.lowering.backend import attnres_backend as old_path

    assert old_path is attnres_backend
