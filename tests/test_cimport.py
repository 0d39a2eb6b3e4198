"""The C-level API (gmem/_core.pxd, `cimport gmem._core`) from a consumer's side.

A tiny Cython extension is written to a temporary directory and compiled with
Cython + setuptools against the *installed* gmem (the .pxd files shipped in the
package, found through the directory that contains `gmem`), then imported; it
drives kvm_mmu_page_fault directly, without the GIL, on a gmem.Vcpu. Its results
and the counters must equal those of vm.page_fault_batch on an identical host.
"""
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import gmem
from gmem import uapi

CONSUMER_PYX = """\
# cython: language_level=3, boundscheck=False, wraparound=False
# A consumer of gmem's C-level API, as an embedding simulator would write it.
from libc.stdint cimport uint64_t
from gmem._core cimport kvm_vcpu, kvm_fault_out, kvm_mmu_page_fault, gmem_vcpu_ptr, GMEM_CAPI_VERSION

import numpy as np

CAPI_VERSION = GMEM_CAPI_VERSION
FAULT_OUT_SIZE = sizeof(kvm_fault_out)


def run_faults(vcpu, gpas, error_codes, out):
    \"\"\"kvm_mmu_page_fault for each (gpa, error_code) on vcpu (a gmem.Vcpu), in order, the
    GIL released; out: a zeroed gmem.FAULT_DTYPE array of the same length, filled in place.\"\"\"
    cdef kvm_vcpu *v = gmem_vcpu_ptr(vcpu)
    cdef const uint64_t[::1] g = np.ascontiguousarray(gpas, dtype=np.uint64)
    cdef const uint64_t[::1] e = np.ascontiguousarray(error_codes, dtype=np.uint64)
    cdef unsigned char[::1] raw = out.view(np.uint8)
    cdef kvm_fault_out *o = <kvm_fault_out *>&raw[0]
    cdef Py_ssize_t i, n = g.shape[0]
    if e.shape[0] != n or out.shape[0] != n or out.dtype.itemsize != sizeof(kvm_fault_out):
        raise ValueError("gpas, error_codes and out must match (out: gmem.FAULT_DTYPE)")
    with nogil:
        for i in range(n):
            kvm_mmu_page_fault(v, g[i], e[i], &o[i])
    return n
"""

SETUP_PY = """\
import sys
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

gmem_root = sys.argv.pop(1)          # the directory containing the installed gmem package
setup(
    name="gmem_consumer",
    script_args=["build_ext", "--inplace", "-q"],
    ext_modules=cythonize(
        [Extension("gmem_consumer", ["gmem_consumer.pyx"], include_dirs=[numpy.get_include()],
                   define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])],
        include_path=[gmem_root], quiet=True),
)
"""


def _c_compiler():
    """The C compiler setuptools would use, if it exists on this machine."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    for cand in (cc.split()[0], "cc", "gcc", "clang"):
        if shutil.which(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    if _c_compiler() is None:
        pytest.skip("no C compiler found (CC, cc, gcc, clang): cannot build a Cython consumer of gmem's C API")
    gmem_root = os.path.dirname(os.path.dirname(os.path.abspath(gmem.__file__)))
    for name in ("__init__.pxd", "_core.pxd"):
        assert os.path.exists(os.path.join(gmem_root, "gmem", name)), f"gmem/{name} is not installed"
    d = tmp_path_factory.mktemp("cimport")
    (d / "gmem_consumer.pyx").write_text(CONSUMER_PYX)
    (d / "setup.py").write_text(SETUP_PY)
    # Cython resolves `cimport gmem._core` through include_path = gmem_root: the .pxd files of
    # the gmem this test imported (installed, or the source tree when run in place)
    p = subprocess.run([sys.executable, "setup.py", gmem_root], cwd=d,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"building the consumer failed:\n{p.stdout}\n{p.stderr}"
    built = [f for f in os.listdir(d) if f.startswith("gmem_consumer.") and f.endswith(
        sysconfig.get_config_var("EXT_SUFFIX"))]
    assert len(built) == 1, os.listdir(d)
    spec = importlib.util.spec_from_file_location("gmem_consumer", d / built[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup():
    """A SW_PROTECTED VM with a 16 MiB guest_memfd memslot at 4 GiB, its first half private, and
    a 2 MiB memslot without guest_memfd at 0, its first 1 MiB private (memory-fault exits)."""
    host = gmem.Host(memory=1 << 30, platform="none")
    vm = host.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(16 << 20)
    vm.set_user_memory_region2(10, uapi.KVM_MEM_GUEST_MEMFD, 4 << 30, 16 << 20, 0x7F0000000000, f, 0)
    vm.set_user_memory_region2(0, 0, 0, 2 << 20, 0x7E0000000000)
    vm.set_memory_attributes(4 << 30, 8 << 20, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_memory_attributes(0, 1 << 20, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0)
    return host, vm, f, vcpu


def _workload(seed=1):
    """Faults on private and shared pages of the gmem slot (each page twice: fixed, then
    spurious), in random order, on the slot at 0 (private: memory-fault exits; shared: fixed),
    and outside every memslot (emulated as MMIO)."""
    rng = np.random.default_rng(seed)
    pages = np.arange((4 << 30) >> 12, ((4 << 30) + (16 << 20)) >> 12, dtype=np.uint64)
    low = np.arange(0, 512, 8, dtype=np.uint64)             # 32 private, 32 shared pages
    gpas = np.concatenate([rng.permutation(pages), rng.permutation(pages), low,
                           np.array([0x400000, 0xFEE00000], dtype=np.uint64) >> np.uint64(12)])
    gpas = gpas << np.uint64(12)
    ecs = rng.choice(np.array([0, uapi.PFERR_WRITE_MASK, uapi.PFERR_WRITE_MASK | uapi.PFERR_USER_MASK],
                              dtype=np.uint64), size=len(gpas))
    return gpas, ecs


def test_capi_version_and_layout(consumer):
    assert consumer.CAPI_VERSION >= 1
    assert consumer.FAULT_OUT_SIZE == gmem.FAULT_DTYPE.itemsize


def test_consumer_batch_matches_page_fault_batch(consumer):
    gpas, ecs = _workload()
    h1, vm1, f1, vcpu1 = _setup()
    h2, vm2, f2, vcpu2 = _setup()

    out1 = np.zeros(len(gpas), dtype=gmem.FAULT_DTYPE)
    assert consumer.run_faults(vcpu1, gpas, ecs, out1) == len(gpas)
    out2 = vm2.page_fault_batch(gpas, ecs, vcpu_id=0)

    for name in gmem.FAULT_DTYPE.names:
        np.testing.assert_array_equal(out1[name], out2[name], err_msg=f"field {name}")
    # the workload exercises more than one outcome
    assert (out1["ret"] == uapi.RET_PF_FIXED).sum() == 4096 + 32
    assert (out1["ret"] == uapi.RET_PF_SPURIOUS).sum() == 4096
    assert (out1["ret"] == uapi.RET_PF_EMULATE).sum() == 2
    mf = out1["exit_reason"] == uapi.KVM_EXIT_MEMORY_FAULT
    assert mf.sum() == 32 and (out1["ret"][mf] == -errno.EFAULT).all()
    assert (out1["gpa"][mf] == np.arange(0, 256, 8, dtype=np.uint64) << np.uint64(12)).all()
    assert set(out1["level"][out1["ret"] == uapi.RET_PF_FIXED].tolist()) == {1}
    assert vm1.stats == vm2.stats
    assert vcpu1.stats == vcpu2.stats
    assert h1.stats == h2.stats
    assert vm1.sptes() == vm2.sptes()
    assert vm1.stats["pf_taken"] == len(gpas)
    h1.check()
    h2.check()

    # a conversion in between, then the same faults again: still identical
    for vm in (vm1, vm2):
        vm.set_memory_attributes(4 << 30, 16 << 20, 0)
    f1.punch_hole(0, 8 << 20)
    f2.punch_hole(0, 8 << 20)
    out1 = np.zeros(len(gpas), dtype=gmem.FAULT_DTYPE)
    consumer.run_faults(vcpu1, gpas, ecs, out1)
    out2 = vm2.page_fault_batch(gpas, ecs, vcpu_id=0)
    for name in gmem.FAULT_DTYPE.names:
        np.testing.assert_array_equal(out1[name], out2[name], err_msg=f"field {name} after conversion")
    assert vm1.stats == vm2.stats and vcpu1.stats == vcpu2.stats and h1.stats == h2.stats
    h1.check()


def test_consumer_rejects_non_vcpu(consumer):
    out = np.zeros(1, dtype=gmem.FAULT_DTYPE)
    with pytest.raises(TypeError, match="gmem.Vcpu"):
        consumer.run_faults(object(), np.zeros(1, np.uint64), np.zeros(1, np.uint64), out)
    host, vm, f, vcpu = _setup()
    f.close()
    vm.close()
    with pytest.raises(ValueError, match="destroyed"):
        consumer.run_faults(vcpu, np.zeros(1, np.uint64), np.zeros(1, np.uint64), out)

