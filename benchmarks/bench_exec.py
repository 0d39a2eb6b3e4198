"""gmem exec: what a program pays for the virtual /dev/kvm. A C program (exec_ioctls.c) makes
N ioctls of each kind under gmem exec and times them itself; the benchmark times the whole run
(startup included) and records the program's ns per call beside it, and the same calls on this
machine's /dev/kvm where it has one (they may be refused there: the figure is the kernel's
round trip)."""
import os
import shutil
import subprocess

import pytest

from gmem import _exec, uapi

HERE = os.path.dirname(os.path.abspath(__file__))
CC = shutil.which("cc") or shutil.which("gcc")
N = 5000


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    if CC is None:
        pytest.skip("needs a C compiler")
    out = str(tmp_path_factory.mktemp("bench") / "exec_ioctls")
    subprocess.run([CC, "-O2", "-o", out, os.path.join(HERE, "exec_ioctls.c")], check=True)
    return out


def _figures(path):
    return {name: int(ns) for name, ns in (line.split() for line in open(path))}


@pytest.mark.benchmark(group="gmem exec ioctls")
def test_exec_ioctls_through_the_preload_library(benchmark, record, prog, tmp_path):
    out = tmp_path / "out"

    def one():
        with open(out, "w") as f:
            assert _exec.run(["sh", "-c", f"{prog} {N} {uapi.KVM_X86_SW_PROTECTED_VM} > {out}"],
                             stdout=f) == 0

    benchmark.pedantic(one, rounds=3, iterations=1)
    record(benchmark, 3 * N, per="ioctl, whole run", **{f"{k}_ns": v for k, v in _figures(out).items()})


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm on this machine")
@pytest.mark.benchmark(group="gmem exec ioctls")
def test_exec_ioctls_on_the_host_kernel(benchmark, record, prog, tmp_path):
    out = tmp_path / "out"

    def one():
        with open(out, "w") as f:
            subprocess.run([prog, str(N)], stdout=f, check=True)

    benchmark.pedantic(one, rounds=3, iterations=1)
    record(benchmark, 3 * N, per="ioctl, whole run", **{f"{k}_ns": v for k, v in _figures(out).items()})
