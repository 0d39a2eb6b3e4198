"""Confidential VMs: batch faults on SEV-SNP and TDX VMs, RMP instructions, Python hook cost.

* Cold batch faults: every 4K page of a 1 GiB guest, first touch, through
  vm.page_fault_batch (the C fault path without the GIL).  SNP: gmem allocates and
  zeroes the folio, sev_gmem_prepare RMPUPDATEs it (4K, or 2M with huge_folios),
  the SPTE is installed.  TDX (runnable TD): the folio is allocated and zeroed and
  the mirror leaf is AUGed (4K only).
* Warm batch faults: the same gpas again.  "present|write" takes fast_page_fault
  (SNP); "not present" runs the whole path to RET_PF_SPURIOUS (and TDX private
  faults always do: no fast path on the mirror root).
* RMPUPDATE / PSMASH per call: host.rmp.rmpupdate / host.rmp.psmash called in a
  Python loop, so each figure includes one Python method call (~50-100 ns); the
  instruction models themselves are a fraction of that.
* Python hook per call: warm batch faults on a SW_PROTECTED VM with a Python
  is_private_fault hook (called once per fault, taking the GIL) against the native
  hook; the difference per fault is the cost of one Python hook call.
"""
import gc

import numpy as np
import pytest

import gmem
from gmem import uapi as u

GUEST = 1 << 30
NPAGES = GUEST >> 12
HVA = 0x7F0000000000
ENC = u.PFERR_GUEST_ENC_MASK
W = u.PFERR_WRITE_MASK
P = u.PFERR_PRESENT_MASK
GPAS = np.arange(0, GUEST, 4096, dtype=np.uint64)
OUT = np.empty(NPAGES, dtype=gmem.FAULT_DTYPE)    # results land here: no allocation per call


def snp_vm(huge=False):
    h = gmem.Host(memory=2 * GUEST, platform="amd", huge_folios=huge)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(GUEST)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, GUEST, HVA, f, 0)
    vm.set_memory_attributes(0, GUEST, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.create_vcpu(0)
    vm.launch()                                        # the vCPU runs after LAUNCH_FINISH
    return h, vm, f


def tdx_vm(huge=False):
    h = gmem.Host(memory=2 * GUEST, platform="intel", huge_folios=huge)
    vm = h.create_vm(u.KVM_X86_TDX_VM)
    vm.launch()                                        # runnable at once: private faults AUG
    f = vm.create_guest_memfd(GUEST)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, GUEST, HVA, f, 0)
    vm.set_memory_attributes(0, GUEST, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.create_vcpu(0)
    return h, vm, f


def ecs(value):
    return np.full(NPAGES, value, dtype=np.uint64)


KINDS = {
    "snp 4K folios": (snp_vm, False, ENC | W),
    "snp 2M folios": (snp_vm, True, ENC | W),
    "tdx 4K folios": (tdx_vm, False, 0),
    "tdx 2M folios (4K maps)": (tdx_vm, True, 0),
}


@pytest.mark.benchmark(group="coco cold batch fault (1 GiB)")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cold_batch_fault(benchmark, record, kind):
    make, huge, ec = KINDS[kind]
    codes = ecs(ec)
    held = []

    def setup():
        held.clear()                                  # drop the previous round's VM
        gc.collect()                                  # ... and what it left in cycles, untimed
        held.append(make(huge))
        return (), {}

    def run():
        return held[0][1].page_fault_batch(GPAS, codes, out=OUT)

    out = benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=0)
    h, vm, f = held[0]
    assert set(np.unique(out["ret"])) <= {u.RET_PF_FIXED, u.RET_PF_SPURIOUS}
    extra = dict(pages_4k=vm.stats["pages_4k"], pages_2m=vm.stats["pages_2m"])
    if h.rmp is not None:
        extra["rmpupdates"] = h.rmp.stats["rmpupdate"]
        assert h.rmp.stats["rmp_violations"] == 0
    else:
        extra["aug"] = vm.tdx_stats["aug"]
    record(benchmark, NPAGES, **extra)


WARM = {
    "snp present|write (fast path)": (snp_vm, ENC | W | P),
    "snp not present (full path)": (snp_vm, ENC | W),
    "tdx private (full path)": (tdx_vm, 0),
}


@pytest.mark.benchmark(group="coco warm batch fault (1 GiB)")
@pytest.mark.parametrize("kind", list(WARM))
def test_warm_batch_fault(benchmark, record, kind):
    make, ec = WARM[kind]
    h, vm, f = make(False)
    codes = ecs(ec)
    vm.page_fault_batch(GPAS, ecs(ENC | W if h.rmp is not None else 0))
    out = benchmark.pedantic(lambda: vm.page_fault_batch(GPAS, codes, out=OUT), rounds=5, warmup_rounds=1)
    assert (out["ret"] == u.RET_PF_SPURIOUS).all()
    record(benchmark, NPAGES)


N_RMP = 1 << 14


@pytest.mark.benchmark(group="coco RMP instruction (Python call each)")
def test_rmpupdate(benchmark, record):
    """RMPUPDATE assigning N 4K pages, one host.rmp.rmpupdate call each."""
    h = gmem.Host(memory=4 * N_RMP << 12, platform="amd")
    rmp = h.rmp
    pfns = list(range(0, 2 * N_RMP, 2))

    def setup():
        for p in pfns:
            rmp.rmpupdate(p, assigned=0)
        return (), {}

    def run():
        for p in pfns:
            rmp.rmpupdate(p, assigned=1, gpa=p << 12, asid=1)

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    assert len(rmp.assigned()) == N_RMP
    record(benchmark, N_RMP)


@pytest.mark.benchmark(group="coco RMP instruction (Python call each)")
def test_psmash(benchmark, record):
    """PSMASH of N_2M 2M entries (512 4K entries written each), one host.rmp.psmash call each."""
    n2m = 256
    h = gmem.Host(memory=n2m * 512 << 12, platform="amd")
    rmp = h.rmp
    heads = list(range(0, n2m * 512, 512))

    def setup():
        for p in heads:                               # back to one 2M entry per region
            assert rmp.rmpupdate(p, assigned=1, pagesize=1, gpa=p << 12, asid=1) == 0
        return (), {}

    def run():
        for p in heads:
            rmp.psmash(p)

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    assert rmp.level(heads[-1] + 7) == u.PG_LEVEL_4K and rmp.stats["psmash"] % n2m == 0
    record(benchmark, n2m)


def sw_vm(hook):
    h = gmem.Host(memory=2 * GUEST, platform="none", sw_protected=True)
    if hook:
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM,
                         is_private_fault=lambda vm, gpa, ec: True)
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(GUEST)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, GUEST, HVA, f, 0)
    vm.set_memory_attributes(0, GUEST, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return h, vm, f


N_HOOK = 1 << 16


@pytest.mark.benchmark(group="coco Python hook (warm batch, per fault)")
@pytest.mark.parametrize("hook", ["native", "python is_private_fault"])
def test_hook_cost(benchmark, record, hook):
    h, vm, f = sw_vm(hook != "native")
    g, e = GPAS[:N_HOOK], ecs(W)[:N_HOOK]
    vm.page_fault_batch(g, e)
    out = benchmark.pedantic(lambda: vm.page_fault_batch(g, e), rounds=5, warmup_rounds=1)
    assert (out["ret"] == u.RET_PF_SPURIOUS).all()
    record(benchmark, N_HOOK)
