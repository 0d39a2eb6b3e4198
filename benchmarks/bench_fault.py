"""The x86 fault path (vcpu.page_fault, vm.page_fault_batch) against the pure-Python reference.

A 4 GiB guest of each kind: SW_PROTECTED, SEV-SNP (with RMPUPDATE) and TDX (a runnable TD:
private faults AUG through the mirror root), one guest_memfd memslot, every page private. Each
figure is ns per fault, thread CPU time (extra_info ns_per_op_min/median, ns_per_fault, and
L_multiple: the fastest round in multiples of the memory limit L, conftest.py):

  fault warm batch   faults on mapped pages: PRESENT|WRITE (fast_page_fault; TDX's private
                     faults have none) and not-present WRITE (the slow path down to
                     kvm_tdp_mmu_map: spurious); results into a preallocated out= array, and
                     once without it
  fault cold batch   first private 4K faults: allocate the folio, prepare, map; a fresh host
                     per round (benchmark.pedantic with setup, the garbage collector run
                     first); sequential, random (every page, in random order) and sparse
                     (2^13 pages in random order over the 4 GiB: a page table per 2 MiB touched)
  fault scalar       one vcpu.page_fault call per fault
  fault reference    tests/reference_fault.py on the same streams (fewer faults), with the
                     batch path's figure on that stream and the ratio in extra_info
"""
import gc
import os
import sys
import time

import numpy as np
import pytest

import gmem
from gmem import uapi as U

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from reference_fault import RefHost  # noqa: E402

GUEST = 4 << 30
NPAGES = GUEST >> 12                      # 1M faults per round
HVA = 1 << 40
SCALAR_N = 1 << 14
REF_N = 1 << 13
W, PW = U.PFERR_WRITE_MASK, U.PFERR_PRESENT_MASK | U.PFERR_WRITE_MASK

OUT = np.empty(NPAGES, dtype=gmem.FAULT_DTYPE)   # results land here: no allocation per call
SEQ = np.arange(NPAGES, dtype=np.uint64) << 12
RANDOM = np.random.default_rng(7).permutation(SEQ)
STREAMS = {"sequential": SEQ, "random": RANDOM}
SPARSE = RANDOM[:REF_N]                   # 2^13 pages over 4 GiB
COLD_STREAMS = dict(STREAMS, sparse=SPARSE)
# the reference's streams (2^13 faults): the first pages in order and in random order (dense),
# and the sparse one
REF_STREAMS = {"sequential": SEQ[:REF_N], "dense_random": np.random.default_rng(7).permutation(SEQ[:REF_N]),
               "sparse": SPARSE}
# VM type, platform, the error code bits of a private access
KINDS = {"sw": (U.KVM_X86_SW_PROTECTED_VM, "amd", 0),
         "snp": (U.KVM_X86_SNP_VM, "amd", U.PFERR_GUEST_ENC_MASK),
         "tdx": (U.KVM_X86_TDX_VM, "intel", 0)}


def guest(huge_folios=False, kind="sw"):
    """A host with a 4 GiB guest of that kind, all of it private (nothing faulted yet)."""
    vm_type, platform, _ = KINDS[kind]
    host = gmem.Host(memory=2 * GUEST, platform=platform, huge_folios=huge_folios)
    vm = host.create_vm(vm_type)
    f = vm.create_guest_memfd(GUEST)
    vm.set_user_memory_region2(0, U.KVM_MEM_GUEST_MEMFD, 0, GUEST, userspace_addr=HVA, guest_memfd=f)
    vm.set_memory_attributes(0, GUEST, U.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    if kind != "sw":
        vm.launch()             # SNP and TDX vCPUs run only in a launched guest
    return host, vm, f, vm.create_vcpu(0)


def ref_guest():
    ref = RefHost().create_vm(U.KVM_X86_SW_PROTECTED_VM)
    f = ref.create_guest_memfd(GUEST)
    ref.set_user_memory_region2(0, U.KVM_MEM_GUEST_MEMFD, 0, GUEST, HVA, f, 0)
    ref.set_memory_attributes(0, GUEST, U.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return ref


def codes(n, ec):
    return np.full(n, ec, dtype=np.uint64)


def report(benchmark, record, n, **extra):
    """ns/fault (fastest round) and, against the batch path on the same stream, the speed-up."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:                          # None under --benchmark-disable
        extra["ns_per_fault"] = round(stats.stats.min / n * 1e9, 1)
        if "batch_ns_per_fault" in extra:
            extra["batch_speedup"] = round(extra["ns_per_fault"] / extra["batch_ns_per_fault"], 1)
    record(benchmark, n, **extra)


_warm = {}


def warm_guest(kind):
    """The guest of that kind with every page mapped (4K private SPTEs), shared by the warm
    benchmarks."""
    if kind not in _warm:
        host, vm, f, vcpu = guest(kind=kind)
        out = vm.page_fault_batch(SEQ, codes(NPAGES, W | KINDS[kind][2]))
        assert (out["ret"] == U.RET_PF_FIXED).all()
        _warm[kind] = host, vm, f, vcpu
    return _warm[kind]


@pytest.fixture(scope="module")
def warm():
    yield warm_guest("sw")


@pytest.fixture(scope="module", autouse=True)
def _drop_warm_guests():
    yield
    _warm.clear()


# ------------------------------------------------------------------ L

@pytest.mark.benchmark(group="fault memory limit")
def test_memory_limit(benchmark, memory_limit, memory_limit_reason):
    """L itself (conftest.py), in the table beside the figures given in its multiples."""
    if memory_limit is None:
        pytest.skip(f"memory limit L not measured: {memory_limit_reason}")
    benchmark.extra_info["L_ns"] = memory_limit
    benchmark.pedantic(lambda: None, rounds=1)


# ------------------------------------------------------------------ warm

@pytest.mark.benchmark(group="fault warm batch")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("order", sorted(STREAMS))
@pytest.mark.parametrize("ec", ["present_write", "not_present_write"])
def test_batch_warm(benchmark, record, kind, order, ec):
    host, vm, f, vcpu = warm_guest(kind)
    gpas = STREAMS[order]
    e = codes(NPAGES, (PW if ec == "present_write" else W) | KINDS[kind][2])
    out = benchmark(vm.page_fault_batch, gpas, e, out=OUT)
    assert (out["ret"] == U.RET_PF_SPURIOUS).all()
    report(benchmark, record, NPAGES, goal_ns=10)


@pytest.mark.benchmark(group="fault warm batch")
def test_batch_warm_new_array(benchmark, record, warm):
    """The same sequential present faults without out=: a fresh 32 MB result array per call
    (numpy's allocation and the kernel's first-touch page faults on it)."""
    host, vm, f, vcpu = warm
    out = benchmark(vm.page_fault_batch, SEQ, codes(NPAGES, PW))
    assert (out["ret"] == U.RET_PF_SPURIOUS).all()
    report(benchmark, record, NPAGES)


# ------------------------------------------------------------------ cold

@pytest.mark.benchmark(group="fault cold batch")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("order", sorted(COLD_STREAMS))
def test_batch_cold_4k(benchmark, record, kind, order):
    gpas = COLD_STREAMS[order]
    n = len(gpas)
    e = codes(n, W | KINDS[kind][2])
    held = {}

    def setup():
        held.clear()                       # the previous round's host goes away untimed
        gc.collect()              # what the last round left in cycles goes untimed
        host, vm, f, vcpu = guest(kind=kind)
        held["vm"] = vm
        held["keep"] = (host, f, vcpu)
        return (vm, gpas, e), {}

    def run(vm, gpas, e):
        return vm.page_fault_batch(gpas, e, out=OUT[:n])

    out = benchmark.pedantic(run, setup=setup, rounds=5 if order == "sparse" else 3, iterations=1)
    assert (out["ret"] == U.RET_PF_FIXED).all() and held["vm"].stats["pages_4k"] == n
    report(benchmark, record, n, goal_ns=100)


# ---------------------------------------------------------------- scalar

@pytest.mark.benchmark(group="fault scalar")
@pytest.mark.parametrize("ec", ["present_write", "not_present_write"])
def test_scalar_warm(benchmark, record, warm, ec):
    host, vm, f, vcpu = warm
    gpas = [int(g) for g in RANDOM[:SCALAR_N]]
    code = PW if ec == "present_write" else W
    pf = vcpu.page_fault

    def run():
        for g in gpas:
            pf(g, code)

    benchmark(run)
    report(benchmark, record, SCALAR_N, goal_ns=300)


@pytest.mark.benchmark(group="fault scalar")
def test_scalar_cold_4k(benchmark, record):
    gpas = [int(g) for g in SEQ[:SCALAR_N]]
    held = {}

    def setup():
        held.clear()
        gc.collect()              # what the last round left in cycles goes untimed
        held["guest"] = guest()
        return (held["guest"][3],), {}

    def run(vcpu):
        pf = vcpu.page_fault
        for g in gpas:
            pf(g, W)

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    report(benchmark, record, SCALAR_N, goal_ns=300)


# ------------------------------------------------------------- reference

def batch_ns(gpas, ec, warm, rounds=5):
    """ns/fault (thread CPU time) of page_fault_batch on this stream: best of rounds, each on a
    fresh guest (warm: with the stream's pages faulted in first, as the reference has them)."""
    best = float("inf")
    e = codes(len(gpas), ec)
    for _ in range(rounds):
        gc.collect()
        host, vm, f, vcpu = guest()
        if warm:
            vm.page_fault_batch(gpas, codes(len(gpas), W))
        t = time.thread_time_ns()
        vm.page_fault_batch(gpas, e)
        best = min(best, time.thread_time_ns() - t)
    return best / len(gpas)


@pytest.mark.benchmark(group="fault reference")
@pytest.mark.parametrize("order", sorted(REF_STREAMS))
def test_reference_cold_4k(benchmark, record, order):
    gpas = REF_STREAMS[order]
    held = {}

    def setup():
        held.clear()
        gc.collect()              # what the last round left in cycles goes untimed
        held["ref"] = ref_guest()
        return (held["ref"],), {}

    def run(ref):
        for g in gpas.tolist():
            ref.page_fault(0, g, W)

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert held["ref"].vm_stats["pages_4k"] == REF_N
    fast = batch_ns(gpas, W, warm=False)
    report(benchmark, record, REF_N, batch_ns_per_fault=round(fast, 1), goal_speedup=150)


@pytest.mark.benchmark(group="fault reference")
@pytest.mark.parametrize("order", sorted(REF_STREAMS))
@pytest.mark.parametrize("ec", ["present_write", "not_present_write"])
def test_reference_warm(benchmark, record, ec, order):
    gpas = REF_STREAMS[order]
    code = PW if ec == "present_write" else W
    ref = ref_guest()
    for g in gpas.tolist():
        ref.page_fault(0, g, W)
    glist = gpas.tolist()

    def run():
        for g in glist:
            ref.page_fault(0, g, code)

    benchmark(run)
    fast = batch_ns(gpas, code, warm=True)
    report(benchmark, record, REF_N, batch_ns_per_fault=round(fast, 1),
           goal_speedup=120 if code == W else 100)
