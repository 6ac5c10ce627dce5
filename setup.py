"""Packaging hook: ships the device sources NVRTC compiles (igengine/kernels/nvrtc.py) inside the wheel.

Everything else is in pyproject.toml. csrc/ stays the one copy of the kernel sources; a wheel gets
igengine/_csrc/ with the three files the NVRTC build needs (a source checkout reads csrc/ itself).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NVRTC_SOURCES = ("igk_kernels.cuh", "igk_math.h", "igk_api.h")  # igengine.kernels.nvrtc.SOURCES


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        dst = Path(self.build_lib) / "igengine" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for name in NVRTC_SOURCES:
            shutil.copyfile(src / name, dst / name)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
