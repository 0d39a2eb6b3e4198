"""Huge pages (proposed upstream): what the model's restructuring costs.

- split and merge of one hugetlb folio, 2M and 1G: a 4K conversion to shared inside a fully
  private, allocated, unmapped folio (huge_split="convert": the folio goes to order 0), and the
  conversion back (huge_merge="eager": merged to the huge order again);
- conversions per second, a 4K page to shared and back at 64 places of a 1G guest_memfd, with
  1G hugetlb backing under three policies and with 4K folios from the buddy allocator;
- a 64 GiB guest's cold private fault stream (every 4K page, sequential) over hugetlb 1G and 2M
  backing: faults per second and the model's own memory (host.memory_bytes) after it.

A SW_PROTECTED VM throughout (no arch work: the figures are gmem's and the MMU's own). Each
round starts from a fresh host made in the untimed setup, after a gc.collect().
"""
import gc

import numpy as np
import pytest

import gmem
from gmem import uapi

PS, MB, GB = 4096, 1 << 20, 1 << 30
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
W = uapi.PFERR_WRITE_MASK | uapi.PFERR_PRIVATE_ACCESS
SIZES = {"2M": (2 * MB, 32), "1G": (GB, 1)}           # folio size, folios per round


def guest(size, pool, memory=None, private=True, allocate=True, **opts):
    """A host whose pool holds `pool`, a SW_PROTECTED VM with one guest_memfd of size at gpa 0."""
    host = gmem.Host(memory=memory or size + 2 * GB, platform="none", hugetlb_pages=pool, **opts)
    vm = host.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, 0, f, 0)
    if private:
        vm.set_memory_attributes(0, size, PRIVATE)
    if allocate:
        f.allocate(0, size)
    return host, vm, f


def fresh(held, make):
    """A pedantic setup: the previous round's guest goes away and is collected, untimed."""
    def setup():
        held.clear()
        gc.collect()
        held["guest"] = make()
        return (), {}
    return setup


@pytest.mark.benchmark(group="huge split/merge")
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("what", ["split", "merge"])
def test_split_merge(benchmark, record, size, what):
    folio, n = SIZES[size]
    held = {}

    def make():
        host, vm, f = guest(folio * n, {size: n}, gmem_backing="hugetlb", huge_split="convert",
                            huge_merge="eager")
        if what == "merge":
            for k in range(n):
                vm.set_memory_attributes(k * folio + PS, PS, 0)
        return host, vm, f

    def run():
        vm = held["guest"][1]
        for k in range(n):
            vm.set_memory_attributes(k * folio + PS, PS, 0 if what == "split" else PRIVATE)

    benchmark.pedantic(run, setup=fresh(held, make), rounds=5 if size == "2M" else 3, iterations=1)
    host, vm, f = held["guest"]
    assert host.stats["folio_splits"] == n and host.stats["folio_merges"] == (n if what == "merge" else 0)
    assert len(f.folios()) == (n if what == "merge" else n * (folio // PS))
    record(benchmark, n, per=f"{size} folio {what} (with its 4K conversion)")
    host.check()


CONVERSION_SETUPS = {
    "hugetlb 1G fresh/eager": dict(pool={"1G": 1}, gmem_backing="hugetlb", huge_split="fresh", huge_merge="eager"),
    "hugetlb 1G convert-2m/eager": dict(pool={"1G": 1}, gmem_backing="hugetlb", huge_split="convert-2m",
                                        huge_merge="eager"),
    "hugetlb 1G never/never": dict(pool={"1G": 1}, gmem_backing="hugetlb", huge_split="never", huge_merge="never"),
    "buddy 4K": dict(pool={}, gmem_backing="buddy"),
}
PLACES = 64


@pytest.mark.benchmark(group="huge conversions 4K in 1G")
@pytest.mark.parametrize("setup_name", list(CONVERSION_SETUPS))
def test_conversions(benchmark, record, setup_name):
    kw = dict(CONVERSION_SETUPS[setup_name])
    pool = kw.pop("pool")
    held = {}
    gpas = [k * (GB // PLACES) + 5 * PS for k in range(PLACES)]

    def run():
        vm = held["guest"][1]
        for g in gpas:
            vm.set_memory_attributes(g, PS, 0)
            vm.set_memory_attributes(g, PS, PRIVATE)

    benchmark.pedantic(run, setup=fresh(held, lambda: guest(GB, pool, **kw)), rounds=3, iterations=1)
    host = held["guest"][0]
    record(benchmark, 2 * PLACES, per="conversion", folio_splits=host.stats["folio_splits"],
           folio_merges=host.stats["folio_merges"])
    if benchmark.stats is not None:
        benchmark.extra_info["conversions_per_s"] = round(2 * PLACES / benchmark.stats.stats.min)
    host.check()


GUEST = 64 * GB
CHUNK = 1 << 20


@pytest.mark.benchmark(group="huge cold 64 GiB stream")
@pytest.mark.parametrize("size", ["1G", "2M"])
def test_cold_stream_64g(benchmark, record, size):
    """Every 4K page of a 64 GiB private guest, in order, on a fresh host: the first fault in
    each huge page allocates it from the pool and maps it huge, the rest are spurious."""
    pool = {size: GUEST // SIZES[size][0]}
    held = {}
    out = np.empty(CHUNK, gmem.FAULT_DTYPE)
    codes = np.full(CHUNK, W, dtype=np.uint64)

    def run():
        vm = held["guest"][1]
        for lo in range(0, GUEST >> 12, CHUNK):
            vm.page_fault_batch(np.arange(lo, lo + CHUNK, dtype=np.uint64) << np.uint64(12), codes, out=out)

    make = lambda: guest(GUEST, pool, memory=GUEST + 4 * GB, allocate=False, gmem_backing="hugetlb")  # noqa: E731
    benchmark.pedantic(run, setup=fresh(held, make), rounds=3, iterations=1)
    host, vm, f = held["guest"]
    assert vm.stats["pages_1g" if size == "1G" else "pages_2m"] == pool[size] and vm.stats["pages_4k"] == 0
    record(benchmark, GUEST >> 12, per="fault", model_memory_mib=round(host.memory_bytes / MB, 1),
           folios=len(f.folios()))
    if benchmark.stats is not None:
        benchmark.extra_info["faults_per_s"] = round((GUEST >> 12) / benchmark.stats.stats.min)
