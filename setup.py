"""Build the Cython core (gmem._core) and gmem exec's preload library (gmem._shim, plain C:
an LD_PRELOAD library, never imported).

GMEM_SANITIZE=1 builds it with -fsanitize=address,undefined (run the tests with
LD_PRELOAD=$(gcc -print-file-name=libasan.so)); GMEM_DEBUG=1 builds with -O0 -g.
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# inline-unit-growth: the module's Python wrappers use up gcc's default unit growth (40%),
# after which it stops inlining the fault path's small helpers (the XArray cursor's fast
# paths among them) wherever the budget happened to run out
cflags = ["-O3", "-fno-strict-aliasing", "--param=max-inline-insns-single=500",
          "--param=inline-unit-growth=80"]
ldflags = []
if os.environ.get("GMEM_DEBUG"):
    cflags = ["-O0", "-g"]
if os.environ.get("GMEM_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    cflags += san
    ldflags += san

ext = Extension(
    "gmem._core",
    ["src/gmem/_core.pyx"],
    include_dirs=[numpy.get_include()],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# gmem exec's preload library: a shared object built like an extension so that it installs
# with the package; it links against libc only (never libpython) and exports only the calls
# it interposes.
shim = Extension(
    "gmem._shim",
    ["src/gmem/shim/gmem_shim.c"],
    depends=["src/gmem/shim/proto.h"],
    extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall"],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=[shim] + cythonize(
        [ext],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
            "binding": True,
        },
    ),
)
