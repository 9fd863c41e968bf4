"""The packages, and `rela._C` built through CMake.

Packages are discovered, never listed by hand (a hand-written list once left `rela.backends` out of
the wheel): every package under rela/, plus rela.kernels. The Triton ops live in the top-level
kernels/ folder, which is deliberately *not* a Python package (no __init__.py): a checkout on
sys.path (pytest, `python -m`) must not shadow Hugging Face's `kernels`, which transformers imports.
`rela/kernels` is a link to that folder, so `rela.kernels` (a namespace package) is the only name
its modules have, in a checkout, an editable install and the wheel alike.

Never import torch here: an isolated build environment would pull a multi-GB torch wheel.
Set RELA_SKIP_EXT=1 to install without the extension (rela then falls back to numpy/Python).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11  # build requirement, present in the build environment

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


ext_modules = [] if os.environ.get("RELA_SKIP_EXT") else [CMakeExtension("rela._C")]
setup(
    packages=[*find_packages(include=["rela", "rela.*"]), "rela.kernels"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
