"""The tree's layering holds (import-linter's contracts in pyproject.toml), every module imports on
its own in a fresh interpreter (no circular imports, as aiohttp tests it), and the daemon's
network path imports without Keras or TensorFlow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for root in ("detectord", "lab")
    for p in (REPO / root).rglob("*.py")
    if "_proto" not in p.parts and p.name != "__main__.py"
)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the `detectord` package found under `root`, with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layering_contracts_are_kept() -> None:
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_serve_importing_offline_breaks_the_contract(tmp_path: Path) -> None:
    # The contract can fail: the same tree with one upward import from serve into offline.
    shutil.copytree(REPO / "detectord", tmp_path / "detectord", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    sink = tmp_path / "detectord/serve/sink.py"
    sink.write_text(sink.read_text() + "\nfrom detectord.offline.training import Settings  # noqa: E402\n")
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "detectord.serve.sink -> detectord.offline.training" in res.stdout, res.stdout


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    res = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning:detectord", "-c", f"import {module}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_daemon_path_imports_without_keras() -> None:
    code = (
        "import sys; import detectord.serve.server, detectord.recordings.recorder, detectord.cli; "
        "loaded = sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules); "
        "assert not loaded, loaded"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
