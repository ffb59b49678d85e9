"""What the wheel ships, from setuptools' own discovery over pyproject.toml (what a build
runs, without building): every package of the tree, found rather than listed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"kvstore": "kvstore", "kvstore.proto": "proto", "kvstore.server": "server",
          "kvstore.client": "client", "kvstore.bench": "bench"}  # fmt: skip


def shipped_modules(root: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The dotted name of every module a wheel built from `root` holds."""
    monkeypatch.chdir(root)  # setuptools resolves package folders from the working directory
    dist = Distribution({"script_name": "setup.py"})  # a build names one, even without a file
    apply_configuration(dist, root / "pyproject.toml")
    dist.set_defaults()  # the package discovery a build runs first
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    return {f"{package}.{module}" for package, module, _ in build_py.find_all_modules()}


def tree_modules(root: Path) -> set[str]:
    """Every module in a package folder (one with `__init__.py`) of the mapped folders."""
    modules = set()
    for package, folder in MAPPED.items():
        for init in (root / folder).rglob("__init__.py"):
            for source in init.parent.glob("*.py"):
                parts = source.relative_to(root / folder).with_suffix("").parts
                modules.add(".".join((package, *parts)))
    return modules


def test_every_package_of_the_tree_ships_and_no_test(monkeypatch) -> None:
    shipped = shipped_modules(ROOT, monkeypatch)
    assert tree_modules(ROOT) <= shipped
    assert {"kvstore.integrations.common", "kvstore.client.engine"} <= shipped
    assert not any(name.startswith(("tests", "conftest")) for name in shipped)


def test_a_new_integration_ships_without_editing_pyproject(tmp_path, monkeypatch) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").touch()  # the project's readme, named in pyproject
    for folder in MAPPED.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").touch()
    engine = tmp_path / "kvstore" / "integrations" / "newengine"
    engine.mkdir(parents=True)
    (engine.parent / "__init__.py").touch()
    (engine / "__init__.py").touch()
    (engine / "connector.py").touch()
    shipped = shipped_modules(tmp_path, monkeypatch)
    assert "kvstore.integrations.newengine.connector" in shipped
    assert shipped == tree_modules(tmp_path)


def test_the_shared_engine_parts_import_without_torch() -> None:
    """torch is optional: the node guard must load in a process that has none."""
    code = "import sys; sys.modules['torch'] = None; import kvstore.integrations.common"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
