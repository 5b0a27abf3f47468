"""Packaging: the wheel installs everything inside the lightning_brn namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("lightning_brn-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_installs_nothing_outside_the_namespace(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lightning_brn"}
    assert "callbacks" not in tops and "recipes" not in tops


def test_wheel_carries_callbacks_recipes_and_types(wheel):
    names = set(wheel.namelist())
    assert "lightning_brn/callbacks/__init__.py" in names
    assert "lightning_brn/recipes/__init__.py" in names
    assert "lightning_brn/py.typed" in names
    assert "lightning_brn/csrc/renorm_cpu.cpp" in names  # the C++ CPU kernels are built from it on first use
    recipes = {Path(n).name for n in names if n.startswith("lightning_brn/recipes/") and n.endswith(".yaml")}
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped and recipes == shipped
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "lightning-brn = lightning_brn.cli:main" in wheel.read(entry_points).decode()


def test_subpackages_import_from_the_namespace():
    import lightning_brn.callbacks
    import lightning_brn.recipes

    assert Path(lightning_brn.callbacks.__file__).parent == ROOT / "callbacks" or "site-packages" in lightning_brn.callbacks.__file__
    assert Path(lightning_brn.recipes.__file__).parent == ROOT / "recipes" or "site-packages" in lightning_brn.recipes.__file__


def test_version_is_defined_once():
    import lightning_brn

    about = (ROOT / "lightning_brn" / "__about__.py").read_text()
    assert f'__version__ = "{lightning_brn.__version__}"' in about
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_every_directly_imported_package_is_a_declared_dependency():
    import ast
    import importlib.metadata as md
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    optional = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-")
                for deps in project.get("optional-dependencies", {}).values() for d in deps}
    distributions = md.packages_distributions()
    missing = {}
    for folder in ("lightning_brn", "callbacks"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top in ("lightning_brn", "__future__"):
                        continue
                    dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                    if not dists & (declared | optional):
                        missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_wheel_carries_the_license(wheel):
    assert any(n.endswith("LICENSE") for n in wheel.namelist())
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_lightning_callbacks_factory_entry_point_is_declared_and_installed():
    """Every Trainer gets lightning_brn's TakeSyncBatchnorm through Lightning's callbacks_factory entry point."""
    from importlib.metadata import entry_points

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    group = "lightning.pytorch.callbacks_factory"
    assert project["entry-points"][group] == {"lightning_brn": "lightning_brn.plugins:callbacks_factory"}
    installed = [e for e in entry_points(group=group) if e.name == "lightning_brn"]
    assert [e.value for e in installed] == ["lightning_brn.plugins:callbacks_factory"], "pip install -e . again"
