"""Builds the optional C decoder; without a compiler detectord installs and runs in pure Python."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "detectord.ingest._fastdecode",
            ["detectord/ingest/_fastdecode.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
        ),
    ],
)
