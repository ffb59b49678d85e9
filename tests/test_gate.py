"""The lint and type gate: ruff and mypy over every package the project ships."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"client": "client", "server": "server", "proto": "proto", "bench": "bench"}
CHECKED = ["kvstore", *PACKAGES, "tests"]


def run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    lint = run(str(ruff), "check", *CHECKED, cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    style = run(str(ruff), "format", "--check", *CHECKED, cwd=ROOT)
    assert style.returncode == 0, style.stdout + style.stderr


def test_mypy_finds_nothing(tmp_path: Path) -> None:
    """mypy sees the package as it installs: kvstore/ with client/, server/, proto/ and
    bench/ linked in under their package names (pyproject's package-dir)."""
    pytest.importorskip("mypy")
    package = tmp_path / "kvstore"
    package.mkdir()
    for entry in (ROOT / "kvstore").iterdir():
        (package / entry.name).symlink_to(entry)
    for name, folder in PACKAGES.items():
        (package / name).symlink_to(ROOT / folder)
    check = run(
        sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "kvstore", cwd=tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout[-20000:] + check.stderr
