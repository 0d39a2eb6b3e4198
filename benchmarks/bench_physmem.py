"""gmem.PhysMem (mm/page_alloc.c's buddy allocator) against a pure-Python buddy allocator.

alloc_many/free_many run phys_alloc/phys_free in a nogil loop; the reference,
`PyBuddy`, is the textbook buddy allocator with a Python set of free pfns per
order.  Both serve a 16 TiB host (creating gmem's costs nothing).
"""
import numpy as np
import pytest

from gmem import PhysMem

MAX_PAGE_ORDER = 18
HOST_BYTES = 16 << 40
HOST_PAGES = HOST_BYTES >> 12
N = 2**14                                   # blocks per round
ORDERS = [0, 1, 4, 9, 12, 18]


class PyBuddy:
    """The pure-Python reference: a set of free block pfns per order."""

    def __init__(self, nr_pages):
        self.free_area = [set() for _ in range(MAX_PAGE_ORDER + 1)]
        self.free_area[MAX_PAGE_ORDER] = set(range(0, nr_pages, 1 << MAX_PAGE_ORDER))

    def alloc(self, order):
        for o in range(order, MAX_PAGE_ORDER + 1):
            if self.free_area[o]:
                pfn = self.free_area[o].pop()
                while o > order:
                    o -= 1
                    self.free_area[o].add(pfn + (1 << o))
                return pfn
        raise MemoryError

    def free(self, pfn, order):
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy not in self.free_area[order]:
                break
            self.free_area[order].remove(buddy)
            pfn = min(pfn, buddy)
            order += 1
        self.free_area[order].add(pfn)


def shuffled(pfns):
    return np.random.default_rng(5).permutation(pfns)


@pytest.mark.benchmark(group="physmem alloc")
@pytest.mark.parametrize("order", ORDERS)
def test_alloc_physmem(benchmark, record, order):
    """N allocations of one order; the previous round's blocks are freed (untimed) first."""
    pm = PhysMem(HOST_BYTES)
    held = []

    def setup():
        if held:
            pm.free_many(held.pop(), order)
        return (), {}

    benchmark.pedantic(lambda: held.append(pm.alloc_many(N, order)), setup=setup,
                       rounds=10, warmup_rounds=1)
    pm.free_many(held.pop(), order)
    pm.check()
    record(benchmark, N)


@pytest.mark.benchmark(group="physmem alloc")
@pytest.mark.parametrize("order", [0, 9])
def test_alloc_pybuddy(benchmark, record, order):
    b = PyBuddy(HOST_PAGES)
    held = []

    def setup():
        if held:
            for p in held.pop():
                b.free(p, order)
        return (), {}

    benchmark.pedantic(lambda: held.append([b.alloc(order) for _ in range(N)]), setup=setup,
                       rounds=5, warmup_rounds=1)
    record(benchmark, N)


@pytest.mark.benchmark(group="physmem free (random order)")
@pytest.mark.parametrize("order", ORDERS)
def test_free_physmem(benchmark, record, order):
    """Free N blocks of one order in random order (buddies coalescing as they meet)."""
    pm = PhysMem(HOST_BYTES)
    benchmark.pedantic(lambda pfns: pm.free_many(pfns, order),
                       setup=lambda: ((shuffled(pm.alloc_many(N, order)),), {}),
                       rounds=10, warmup_rounds=1)
    pm.check()
    assert pm.watermark == 0
    record(benchmark, N)


@pytest.mark.benchmark(group="physmem free (random order)")
@pytest.mark.parametrize("order", [0, 9])
def test_free_pybuddy(benchmark, record, order):
    b = PyBuddy(HOST_PAGES)

    def target(pfns):
        for p in pfns:
            b.free(p, order)

    benchmark.pedantic(target, setup=lambda: ((shuffled([b.alloc(order) for _ in range(N)]).tolist(),), {}),
                       rounds=5, warmup_rounds=1)
    record(benchmark, N)


@pytest.mark.benchmark(group="physmem folio alloc+put (Python call)")
def test_folio_alloc_put(benchmark, record):
    """One folio_alloc and one folio_put per iteration through the Python wrapper."""
    pm = PhysMem(HOST_BYTES)
    n = 10**4

    def churn():
        pfns = [pm.folio_alloc(0) for _ in range(n)]
        for p in pfns:
            pm.folio_put(p)

    benchmark.pedantic(churn, rounds=5, warmup_rounds=1)
    assert pm.nr_folios == 0
    record(benchmark, n)


@pytest.mark.benchmark(group="physmem memory")
@pytest.mark.parametrize("case", ["fresh 16 TiB host", "2^14 order-0 blocks held", "2^14 order-0 folios held"])
def test_memory_physmem(benchmark, record, case):
    """Bytes of C memory describing the host (the timing is only memory_bytes)."""
    pm = PhysMem(HOST_BYTES)
    if case.endswith("blocks held"):
        pm.alloc_many(N, 0)
    elif case.endswith("folios held"):
        for _ in range(N):
            pm.folio_alloc(0)
    benchmark(lambda: pm.memory_bytes)
    record(benchmark, 1, bytes=pm.memory_bytes)
