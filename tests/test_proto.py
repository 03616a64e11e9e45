"""The generated protobuf code is exactly what `make proto` produces from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(REPO / "scripts/gen-proto.sh"), str(tmp_path)], check=True, env=env, cwd=REPO)
    committed = REPO / "detectord/ingest/_proto"
    generated = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert generated == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix != ".pyc")
    for name in generated:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"detectord/ingest/_proto/{name} is stale: run `make proto`"
        )
