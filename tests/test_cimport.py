"""The C-level API (gmem/_core.pxd, `cimport gmem._core`) from a consumer's side.

Tiny Cython extensions are written to a temporary directory and compiled with Cython +
setuptools against the *installed* gmem (the .pxd files shipped in the package, found
through the directory that contains `gmem`), then imported:

* one drives kvm_mmu_page_fault directly, without the GIL, on a gmem.Vcpu: its results and
  counters must equal those of vm.page_fault_batch on an identical host;
* one uses only the STABLE section of _core.pxd, no Python object anywhere in the model:
  host -> SNP VM -> guest_memfd -> memslot -> private attributes -> a 2^20-fault
  prefetching batch -> punch -> check, calling every stable function, and checks the exact
  GMEM_CAPI_VERSION it was built against.
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


# The stable C-level API, from C alone. Every call of the STABLE section of _core.pxd is made
# at least once; the results come back as a dict of plain numbers (the model itself holds no
# Python object).
STABLE_PYX = """\
# cython: language_level=3, boundscheck=False, wraparound=False
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.stdio cimport printf
from gmem._core cimport (
    GMEM_CAPI_VERSION, gmem_host, kvm, kvm_vcpu, gmem_file, gmem_host_config, kvm_fault_out,
    kvm_userspace_memory_region2, kvm_memory_attributes, kvm_pre_fault_memory,
    gmem_host_config_init, gmem_host_create, gmem_host_put, gmem_reason, gmem_host_stat,
    gmem_host_free_pages, gmem_host_check, gmem_memory_failure, kvm_check_extension,
    kvm_create_vm, kvm_put_kvm, kvm_vm_type, kvm_vm_ioctl_create_vcpu, kvm_get_vcpu_by_id,
    kvm_vm_stat, kvm_vcpu_stat, kvm_vm_pages, kvm_set_memory_region,
    kvm_vm_ioctl_set_mem_attributes, kvm_get_memory_attributes, kvm_vm_ioctl_enable_cap, kvm_launch,
    kvm_gmem_create, kvm_gmem_get_file, kvm_gmem_put_file, kvm_gmem_fallocate, kvm_gmem_size,
    kvm_mmu_page_fault, kvm_mmu_page_fault_batch, kvm_vcpu_pre_fault_memory,
    KVM_X86_SNP_VM, KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, PFERR_GUEST_ENC_MASK,
    PFERR_WRITE_MASK, RET_PF_FIXED, RET_PF_SPURIOUS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    KVM_CAP_GUEST_MEMFD, KVM_CAP_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE, PG_LEVEL_4K,
    HOST_STAT_FOLIOS_ALLOCATED, HOST_STAT_FOLIOS_FREED, HOST_STAT_GMEM_INVALIDATE,
    VM_STAT_GMEM_PREPARE, VM_STAT_ZAPPED_SPTES, VCPU_STAT_PF_FIXED, VCPU_STAT_PF_TAKEN,
    VCPU_STAT_PF_SPURIOUS, GMEM_PLATFORM_AMD)

CAPI_VERSION = GMEM_CAPI_VERSION


cdef uint64_t _next(uint64_t x) noexcept nogil:
    # xorshift64: a random order of the guest's pages, without Python
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    return x


def run(uint64_t log2_pages):
    cdef gmem_host_config cfg
    cdef gmem_host *h = NULL
    cdef const char *why = NULL
    cdef kvm *vm = NULL
    cdef kvm_vcpu *v = NULL
    cdef gmem_file *f = NULL
    cdef kvm_userspace_memory_region2 mem
    cdef kvm_memory_attributes attrs
    cdef kvm_pre_fault_memory pf
    cdef kvm_fault_out one
    cdef uint64_t n = (<uint64_t>1) << log2_pages, size = n << 12, i, j, t, x = 88172645463325252
    cdef uint64_t *gpas = <uint64_t *>malloc(n * 8)
    cdef uint64_t *ecs = <uint64_t *>malloc(n * 8)
    cdef kvm_fault_out *out = <kvm_fault_out *>malloc(n * sizeof(kvm_fault_out))
    cdef char buf[1024]
    cdef int64_t cap_gmem
    cdef int r_host, r_vm, r_vcpu, r_gmem, r_slot, r_attr, r_cap, r_check, r_punch, r_alloc
    cdef int r_prefault_before, r_prefault_after, r_launch, r_run_before, r_mf, vm_type, fixed = 0
    cdef uint64_t done
    cdef uint64_t c[16]
    with nogil:
        gmem_host_config_init(&cfg)
        cfg.memory = size * 2
        cfg.platform = GMEM_PLATFORM_AMD
        r_host = gmem_host_create(&cfg, &h, &why)
        r_vm = kvm_create_vm(h, KVM_X86_SNP_VM, &vm)
        vm_type = kvm_vm_type(vm)
        r_vcpu = kvm_vm_ioctl_create_vcpu(vm, 0, &v)
        cap_gmem = kvm_check_extension(h, vm, KVM_CAP_GUEST_MEMFD)
        r_cap = kvm_vm_ioctl_enable_cap(vm, KVM_CAP_EXIT_HYPERCALL, (<uint64_t>1) << KVM_HC_MAP_GPA_RANGE)
        r_gmem = kvm_gmem_create(vm, size, 0, &f)
        mem.slot, mem.flags, mem.guest_phys_addr, mem.memory_size = 1, KVM_MEM_GUEST_MEMFD, 0, size
        mem.userspace_addr, mem.guest_memfd_offset, mem.guest_memfd = 0x7f0000000000, 0, 0
        r_slot = kvm_set_memory_region(vm, &mem, 1, f, 0)
        attrs.address, attrs.size, attrs.attributes, attrs.flags = 0, size, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0
        r_attr = kvm_vm_ioctl_set_mem_attributes(vm, &attrs)
        pf.gpa, pf.size, pf.flags = 0, 4096, 0
        r_prefault_before = kvm_vcpu_pre_fault_memory(v, &pf)        # before the launch: refused
        kvm_mmu_page_fault(v, 0, PFERR_GUEST_ENC_MASK, &one)             # no VMSA yet: KVM_RUN -EINVAL
        r_run_before = one.ret
        r_launch = kvm_launch(vm)
        for i in range(n):                                               # a random permutation
            gpas[i] = i << 12
            ecs[i] = PFERR_GUEST_ENC_MASK | PFERR_WRITE_MASK
        for i in range(n - 1, 0, -1):
            x = _next(x)
            j = x % (i + 1)
            t = gpas[i]
            gpas[i] = gpas[j]
            gpas[j] = t
        done = kvm_mmu_page_fault_batch(&v, NULL, gpas, ecs, out, n)
        i = 0
        while i < done:
            if out[i].ret == RET_PF_FIXED:
                fixed += 1
            i += 1
        kvm_mmu_page_fault(kvm_get_vcpu_by_id(vm, 0), gpas[0], ecs[0], &one)
        pf.gpa, pf.size = 0, 4096
        r_prefault_after = kvm_vcpu_pre_fault_memory(v, &pf)
        kvm_gmem_get_file(f)                                              # a second holder (dup)
        r_punch = kvm_gmem_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2 << 20)
        r_alloc = kvm_gmem_fallocate(f, 0, 0, 4096)                      # no KEEP_SIZE: refused
        why = gmem_reason(h)
        r_mf = gmem_memory_failure(h, out[done - 1].pfn)
        r_check = gmem_host_check(h, buf, sizeof(buf))
        c[0] = gmem_host_stat(h, HOST_STAT_FOLIOS_ALLOCATED)
        c[1] = gmem_host_stat(h, HOST_STAT_FOLIOS_FREED)
        c[2] = gmem_host_stat(h, HOST_STAT_GMEM_INVALIDATE)
        c[3] = kvm_vm_stat(vm, VM_STAT_GMEM_PREPARE)
        c[4] = kvm_vm_stat(vm, VM_STAT_ZAPPED_SPTES)
        c[5] = kvm_vcpu_stat(v, VCPU_STAT_PF_TAKEN)
        c[6] = kvm_vcpu_stat(v, VCPU_STAT_PF_FIXED)
        c[7] = kvm_vcpu_stat(v, VCPU_STAT_PF_SPURIOUS)
        c[8] = kvm_vm_pages(vm, PG_LEVEL_4K)
        c[9] = kvm_get_memory_attributes(vm, 5)
        c[10] = kvm_gmem_size(f)
        c[11] = gmem_host_free_pages(h)
        printf("gmem C consumer: %llu faults, %d fixed; prepares %llu, 4K SPTEs %llu, folios +%llu -%llu\\n",
               <unsigned long long>done, fixed, <unsigned long long>c[3], <unsigned long long>c[8],
               <unsigned long long>c[0], <unsigned long long>c[1])
        kvm_gmem_put_file(f)
        kvm_gmem_put_file(f)                                              # the last: released
        kvm_put_kvm(vm)                                                   # the VM fd: destroyed
        gmem_host_put(h)
    free(gpas)
    free(ecs)
    free(out)
    return dict(reason=(<bytes>why).decode(), r_host=r_host, r_vm=r_vm, vm_type=vm_type, r_vcpu=r_vcpu, cap_gmem=cap_gmem, r_cap=r_cap,
                r_gmem=r_gmem, r_slot=r_slot, r_attr=r_attr, r_prefault_before=r_prefault_before,
                r_prefault_after=r_prefault_after, r_launch=r_launch, r_run_before=r_run_before, done=done, fixed=fixed,
                one_ret=one.ret, r_punch=r_punch, r_alloc=r_alloc, r_mf=r_mf, r_check=r_check,
                check=buf[:256].decode(errors="replace") if r_check else "",
                folios_allocated=c[0], folios_freed=c[1], gmem_invalidate=c[2], gmem_prepare=c[3],
                zapped_sptes=c[4], pf_taken=c[5], pf_fixed=c[6], pf_spurious=c[7], pages_4k=c[8],
                attributes=c[9], size=c[10], free_pages=c[11])
"""


def _c_compiler():
    """The C compiler setuptools would use, if it exists on this machine."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    for cand in (cc.split()[0], "cc", "gcc", "clang"):
        if shutil.which(cand):
            return cand
    return None


def _build(tmp_path_factory, source):
    if _c_compiler() is None:
        pytest.skip("no C compiler found (CC, cc, gcc, clang): cannot build a Cython consumer of gmem's C API")
    gmem_root = os.path.dirname(os.path.dirname(os.path.abspath(gmem.__file__)))
    for name in ("__init__.pxd", "_core.pxd"):
        assert os.path.exists(os.path.join(gmem_root, "gmem", name)), f"gmem/{name} is not installed"
    d = tmp_path_factory.mktemp("cimport")
    (d / "gmem_consumer.pyx").write_text(source)
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


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    return _build(tmp_path_factory, CONSUMER_PYX)


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    return _build(tmp_path_factory, STABLE_PYX)


# the version of the STABLE section this test was written against: a change there must bump
# GMEM_CAPI_VERSION, and this test with it
STABLE_CAPI_VERSION = 6


def test_stable_capi_version(stable):
    assert stable.CAPI_VERSION == STABLE_CAPI_VERSION


def test_stable_api_drives_a_model_without_python_objects(stable, capfd):
    n = 1 << 20
    r = stable.run(20)
    assert (r["r_host"], r["r_vm"], r["r_vcpu"], r["r_gmem"], r["r_slot"], r["r_attr"], r["r_cap"]) == (0,) * 7
    assert r["vm_type"] == uapi.KVM_X86_SNP_VM and r["cap_gmem"] == 1
    assert r["r_prefault_before"] == -errno.EOPNOTSUPP          # SNP before LAUNCH_FINISH
    assert r["r_run_before"] == -errno.EINVAL                    # ... and no VMSA to run with
    assert (r["done"], r["fixed"], r["pf_fixed"]) == (n, n, n)    # every private page faulted in once
    assert r["one_ret"] == uapi.RET_PF_SPURIOUS and r["pf_spurious"] == 1 and r["pf_taken"] == n + 1
    # 7.2: sev_gmem_prepare on every kvm_gmem_get_pfn: each page once, then the scalar slow-path
    # fault and the pre-fault again (idempotent: the RMP says the page is private already)
    assert r["gmem_prepare"] == n + 2
    assert (r["r_launch"], r["r_prefault_after"]) == (0, 0)
    assert r["r_punch"] == 0 and r["r_alloc"] == -errno.EOPNOTSUPP
    assert r["reason"] == "guest_memfd needs FALLOC_FL_KEEP_SIZE"
    # the punch zapped 512 SPTEs and freed 512 folios (sev_gmem_invalidate each); memory_failure
    # on the last page faulted zapped one more
    assert r["r_mf"] == 1
    assert r["zapped_sptes"] == 513 and r["pages_4k"] == n - 513 and r["gmem_invalidate"] == 512
    assert r["folios_allocated"] == n and r["folios_freed"] == 512
    assert r["r_check"] == 0, r["check"]
    assert r["attributes"] == uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE and r["size"] == n << 12
    assert "gmem C consumer: 1048576 faults, 1048576 fixed" in capfd.readouterr().out


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
    assert consumer.CAPI_VERSION == STABLE_CAPI_VERSION
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

