"""Simulator author: drive the model with numpy batches, then from your own Cython through the
C-level API (`cimport gmem._core`).

    python examples/simulator_batch_and_capi.py

1. Batch: a million faults as numpy arrays through vm.page_fault_batch (the GIL is released;
   pass out= to reuse the result array), on two hosts in two threads at once.
2. C-level API: simulator_capi_consumer.pyx (next to this file) calls kvm_mmu_page_fault for
   each fault without the GIL; it is compiled here with Cython against the installed gmem
   (skipped, with the reason, where no C compiler or Cython exists).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import numpy as np

import gmem
from gmem import uapi

HERE = os.path.dirname(os.path.abspath(__file__))


def machine():
    host = gmem.Host(memory=2 << 30, platform="none")
    vm = host.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(256 << 20)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 256 << 20, 0x7F0000000000, f, 0)
    vm.set_memory_attributes(0, 128 << 20, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return host, vm, vm.create_vcpu(0)


def batch():
    rng = np.random.default_rng(0)
    gpas = rng.integers(0, 65536, 1 << 20, dtype=np.uint64) << np.uint64(12)     # 1M faults over 256 MiB
    ecs = np.full(len(gpas), uapi.PFERR_WRITE_MASK, np.uint64)
    hosts = [machine() for _ in range(2)]
    outs = [np.empty(len(gpas), gmem.FAULT_DTYPE) for _ in hosts]
    t = time.perf_counter()
    threads = [threading.Thread(target=vm.page_fault_batch, args=(gpas, ecs), kwargs={"out": out})
               for (_, vm, _), out in zip(hosts, outs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    (host, vm, _), out = hosts[0], outs[0]
    fixed = int((out["ret"] == uapi.RET_PF_FIXED).sum())
    print(f"batch: 2 x {len(gpas):,} faults on two hosts in two threads in {dt:.2f} s; "
          f"{fixed:,} fixed, {vm.stats['pf_spurious']:,} spurious, {vm.stats['pages_4k']:,} 4K SPTEs")
    host.check()
    assert vm.stats["pf_taken"] == len(gpas)


def build_consumer(d):
    """Compile simulator_capi_consumer.pyx in d against the installed gmem's .pxd files."""
    gmem_root = os.path.dirname(os.path.dirname(os.path.abspath(gmem.__file__)))
    shutil.copy(os.path.join(HERE, "simulator_capi_consumer.pyx"), d)
    setup = ("import numpy\nfrom Cython.Build import cythonize\nfrom setuptools import Extension, setup\n"
             "setup(name='simulator_capi_consumer', script_args=['build_ext', '--inplace', '-q'],\n"
             "      ext_modules=cythonize([Extension('simulator_capi_consumer', ['simulator_capi_consumer.pyx'],\n"
             "                                       include_dirs=[numpy.get_include()])],\n"
             f"                            include_path=[{gmem_root!r}], quiet=True))\n")
    with open(os.path.join(d, "setup.py"), "w") as fh:
        fh.write(setup)
    subprocess.run([sys.executable, "setup.py"], cwd=d, check=True, capture_output=True, text=True)
    (built,) = [x for x in os.listdir(d) if x.endswith(sysconfig.get_config_var("EXT_SUFFIX"))]
    spec = importlib.util.spec_from_file_location("simulator_capi_consumer", os.path.join(d, built))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def capi():
    if importlib.util.find_spec("Cython") is None or not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        print("C-level API: skipped (needs Cython and a C compiler: pip install cython; apt-get install gcc)")
        return
    with tempfile.TemporaryDirectory() as d:
        mod = build_consumer(d)
        host, vm, vcpu = machine()
        gpas = (np.arange(4096, dtype=np.uint64) << np.uint64(12))
        n_fixed = mod.fault_all(vcpu, gpas, uapi.PFERR_WRITE_MASK, uapi.RET_PF_FIXED)
        print(f"C-level API: kvm_mmu_page_fault x {len(gpas)} without the GIL from Cython: {n_fixed} fixed; "
              f"vm.stats pf_fixed = {vm.stats['pf_fixed']}")
        assert n_fixed == vm.stats["pf_fixed"] == len(gpas)
        host.check()


if __name__ == "__main__":
    batch()
    capi()
