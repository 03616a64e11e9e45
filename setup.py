"""Builds the optional C decoder, feature accumulator, /metrics renderer and huge-page arenas, and puts
the shipped default model set into the wheel.

Without a compiler detectord installs and runs in pure Python. The model set lives at the top of
the repository (`models/default`, where `make models` writes it) and travels in the wheel as
`detectord/_models/default`, where `detectord.packaged` finds it.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).parent / "models" / "default"


class BuildPyWithModels(build_py):
    def run(self) -> None:
        super().run()
        if not (MODELS / "MODEL_CARD.md").is_file():
            raise SystemExit(f"{MODELS}: the shipped default model set is missing (make models)")
        dst = Path(self.build_lib) / "detectord" / "_models" / "default"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(MODELS, dst)


setup(
    cmdclass={"build_py": BuildPyWithModels},
    ext_modules=[
        Extension(
            "detectord.ingest._fastdecode",
            ["detectord/ingest/_fastdecode.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
        Extension(
            "detectord.ingest._fastfeatures",
            ["detectord/ingest/_fastfeatures.c"],
            optional=True,
            # No fused multiply-adds: row() gives Python's float numbers bit for bit (GCC's ISO C
            # modes contract nothing, Clang contracts within a statement unless told).
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-ffp-contract=off"],
        ),
        Extension(
            "detectord.serve._hugepages",
            ["detectord/serve/_hugepages.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
        Extension(
            "detectord.serve._fastexports",
            ["detectord/serve/_fastexports.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
    ],
)
