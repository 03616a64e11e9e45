"""Where the shipped default model set is: inside the installed package (the wheel carries it as
`detectord/_models/default`, see setup.py), or at the top of a source checkout (`models/default`)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def default_model_path() -> Path:
    installed = _PACKAGE / "_models" / "default"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "models" / "default"
