"""Build the private C++ extension ``trustrepair._dpp`` and map ``kernels/`` to ``trustrepair.kernels``.

Package metadata lives in pyproject.toml; this file only adds what setuptools cannot declare there:
the pybind11 extension (C++17, -O3, OpenMP when the compiler accepts it) and the package_dir mapping.
"""
import glob
import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(compiler, flag: str) -> bool:
    """True when the C++ compiler builds a trivial OpenMP program with ``flag``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExtWithOpenMP(build_ext):
    """Adds -fopenmp to every extension when the compiler supports it (serial build otherwise)."""

    def build_extensions(self):
        if sys.platform != "win32" and _compiler_accepts(self.compiler, "-fopenmp"):
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "trustrepair._dpp",
        sorted(glob.glob("csrc/*.cpp")),
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    packages=["trustrepair", "trustrepair.app", "trustrepair.data", "trustrepair.engine", "trustrepair.kernels",
              "trustrepair.methods"],
    package_dir={"trustrepair": "trustrepair", "trustrepair.kernels": "kernels"},
    package_data={"trustrepair": ["py.typed", "*.pyi"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
