"""gmem.PhysMem (mm/page_alloc.c's buddy allocator and the folio table).

A Hypothesis state machine allocates and frees against the simplest model that
can be right: the set of blocks the caller owns.  Blocks never overlap, are
naturally aligned and inside the host; ENOMEM only when no aligned free block
of the order exists; everything freed is reusable; after freeing everything
the host looks fresh again (free_blocks(), watermark).
"""
import errno
import time

import numpy as np
import pytest
from hypothesis import assume, event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gmem import PhysMem

MAX_PAGE_ORDER = 18
PAGE = 4096
TOP = 2**64 - 1


def fresh_free_blocks(start, nr_pages):
    """free_blocks() of an untouched host: [start, end) as maximal aligned blocks."""
    counts = [0] * (MAX_PAGE_ORDER + 1)
    p, end = start, start + nr_pages
    while p < end:
        o = MAX_PAGE_ORDER
        while o and (p % (1 << o) or p + (1 << o) > end):
            o -= 1
        counts[o] += 1
        p += 1 << o
    return counts


def einval(call, *args):
    with pytest.raises(OSError) as e:
        call(*args)
    assert e.value.errno == errno.EINVAL, e.value


def enomem(call, *args):
    with pytest.raises(OSError) as e:
        call(*args)
    assert e.value.errno == errno.ENOMEM, e.value


def snapshot(pm):
    return (pm.free_blocks(), pm.nr_free_pages, pm.watermark, list(pm.folios()), pm.nr_folios)


orders = st.one_of(st.integers(0, 3), st.integers(0, MAX_PAGE_ORDER))


class PhysMemMachine(RuleBasedStateMachine):
    @initialize(
        nr_pages=st.one_of(st.integers(1, 1100), st.sampled_from([1 << 18, (1 << 19) + 5])),
        start=st.one_of(st.integers(0, 1100),
                        st.sampled_from([1 << 18, (1 << 18) - 1, (1 << 40) + 7, TOP - 1000, TOP - (1 << 18)])),
    )
    def host(self, nr_pages, start):
        nr_pages = min(nr_pages, TOP - start)     # end_pfn is at most 2**64 - 1
        self.start, self.nr_pages = start, nr_pages
        self.end = start + nr_pages
        self.pm = PhysMem(nr_pages * PAGE, start_pfn=start)
        self.blocks = {}          # pfn -> order: blocks from alloc()
        self.folios = {}          # pfn -> [order, index]: folios from folio_alloc()
        self.freed = []           # blocks given back, for double frees
        assert self.pm.free_blocks() == fresh_free_blocks(start, nr_pages)

    # ------------------------------------------------------------ the model
    def owned(self):
        """[(first, end, kind)] of everything owned, sorted."""
        spans = [(p, p + (1 << o), "block") for p, o in self.blocks.items()]
        spans += [(p, p + (1 << o), "folio") for p, (o, _) in self.folios.items()]
        return sorted(spans)

    def used_pages(self):
        return sum(e - p for p, e, _ in self.owned())

    def fits(self, order):
        """Is there a free naturally aligned block of this order?"""
        n = 1 << order
        p = self.start
        for first, end, _ in self.owned() + [(self.end, self.end, None)]:
            q = -(-p // n) * n
            if q + n <= first:
                return True
            p = max(p, end)
        return False

    def check_new(self, pfn, order):
        n = 1 << order
        assert pfn % n == 0, f"pfn {pfn:#x} not aligned to order {order}"
        assert self.start <= pfn and pfn + n <= self.end
        for first, end, _ in self.owned():
            assert pfn + n <= first or end <= pfn, f"{pfn:#x}+{n} overlaps owned {first:#x}..{end:#x}"

    def fully_allocated_blocks(self, pfn, order):
        """Is [pfn, pfn + 2**order) covered by plain blocks and touching no folio?"""
        p, end = pfn, pfn + (1 << order)
        for first, e, kind in self.owned():
            if e <= p or first >= end:
                continue
            if kind == "folio" or first > p:
                return False
            p = e
        return p >= end

    # ------------------------------------------------------------ the rules
    @rule(order=orders)
    def alloc(self, order):
        before = snapshot(self.pm)
        try:
            pfn = self.pm.alloc(order)
        except OSError as e:
            assert e.errno == errno.ENOMEM
            assert not self.fits(order), f"ENOMEM for order {order} with a free aligned block"
            event("alloc: ENOMEM")
            assert snapshot(self.pm) == before
            return
        self.check_new(pfn, order)
        self.blocks[pfn] = order

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def free(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.blocks)))
        order = self.blocks.pop(pfn)
        self.pm.free(pfn, order)
        self.freed.append((pfn, order))

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data):
        pfn, order = data.draw(st.sampled_from(self.freed))
        assume(not self.fully_allocated_blocks(pfn, order))   # not handed out again since
        before = snapshot(self.pm)
        einval(self.pm.free, pfn, order)
        assert snapshot(self.pm) == before
        event("double free")

    @rule(offset=st.integers(-3, 1200), order=st.integers(0, MAX_PAGE_ORDER))
    def free_refused(self, offset, order):
        """Freeing what is free, in a folio, misaligned or outside the host: EINVAL, no change."""
        pfn = min(max(0, self.start + offset), TOP)
        aligned = pfn % (1 << order) == 0
        inside = self.start <= pfn < self.end
        assume(not (aligned and inside and self.fully_allocated_blocks(pfn, order)))
        before = snapshot(self.pm)
        einval(self.pm.free, pfn, order)
        assert snapshot(self.pm) == before

    @rule(order=orders)
    def folio_alloc(self, order):
        before = snapshot(self.pm)
        try:
            pfn = self.pm.folio_alloc(order)
        except OSError as e:
            assert e.errno == errno.ENOMEM and not self.fits(order)
            assert snapshot(self.pm) == before
            return
        self.check_new(pfn, order)
        self.folios[pfn] = [order, 0]

    @precondition(lambda self: self.folios)
    @rule(data=st.data())
    def folio_put(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.folios)))
        order, _ = self.folios.pop(pfn)
        self.pm.folio_put(pfn)
        assert self.pm.folio(pfn) is None
        self.freed.append((pfn, order))

    @precondition(lambda self: any(o for o, _ in self.folios.values()))
    @rule(data=st.data())
    def folio_split(self, data):
        pfn = data.draw(st.sampled_from(sorted(p for p, (o, _) in self.folios.items() if o)))
        order, index = self.folios[pfn]
        new = data.draw(st.integers(max(0, order - 6), order - 1))
        self.pm.folio_split(pfn, new)
        for k in range(1 << (order - new)):
            self.folios[pfn + (k << new)] = [new, index + (k << new)]

    @precondition(lambda self: self.folios)
    @rule(data=st.data())
    def folio_lookup(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.folios)))
        order, index = self.folios[pfn]
        inside = pfn + data.draw(st.integers(0, (1 << order) - 1))
        want = dict(pfn=pfn, order=order, flags=0, refcount=1, mapping=0, index=index, private=0)
        assert self.pm.folio(inside) == want
        if inside != pfn:
            before = snapshot(self.pm)
            einval(self.pm.folio_put, inside)            # not the head
            einval(self.pm.folio_split, inside, 0)
            assert snapshot(self.pm) == before

    @rule(offset=st.integers(0, 1200))
    def folio_at(self, offset):
        pfn = min(self.start + offset, TOP)
        heads = [p for p, e, kind in self.owned() if kind == "folio" and p <= pfn < e]
        got = self.pm.folio(pfn)
        assert (got and got["pfn"]) == (heads[0] if heads else None)

    @rule(order=orders, folio=st.booleans())
    def injected_failure(self, order, folio):
        before = snapshot(self.pm)
        self.pm.inject_alloc_failures(1)
        enomem(self.pm.folio_alloc if folio else self.pm.alloc, order)
        assert snapshot(self.pm) == before

    @rule()
    def free_everything(self):
        for pfn, order in sorted(self.blocks.items()):
            self.pm.free(pfn, order)
        for pfn in sorted(self.folios):
            self.pm.folio_put(pfn)
        self.blocks.clear()
        self.folios.clear()
        self.pm.check()
        assert self.pm.free_blocks() == fresh_free_blocks(self.start, self.nr_pages)
        assert self.pm.watermark == self.start
        assert self.pm.nr_free_pages == self.nr_pages and self.pm.nr_folios == 0

    # ------------------------------------------------------------ invariants
    @invariant()
    def consistent(self):
        pm = self.pm
        pm.check()
        assert (pm.start_pfn, pm.end_pfn, pm.nr_pages) == (self.start, self.end, self.nr_pages)
        assert self.start <= pm.watermark <= self.end
        assert pm.nr_free_pages == self.nr_pages - self.used_pages()
        assert sum(n << o for o, n in enumerate(pm.free_blocks())) == pm.nr_free_pages
        assert pm.nr_folios == len(self.folios)
        assert list(pm.folios()) == sorted((p, o) for p, (o, _) in self.folios.items())

    def teardown(self):
        if hasattr(self, "pm"):
            self.free_everything()


TestPhysMemMachine = PhysMemMachine.TestCase


# ------------------------------------------------------------------ scenarios

def test_exhaustion_order_0():
    pm = PhysMem(100 * PAGE, start_pfn=3)
    pfns = [pm.alloc(0) for _ in range(100)]
    assert sorted(pfns) == list(range(3, 103))
    enomem(pm.alloc, 0)
    assert pm.nr_free_pages == 0 and pm.free_blocks() == [0] * 19
    for p in pfns:
        pm.free(p, 0)
    pm.check()
    assert pm.free_blocks() == fresh_free_blocks(3, 100) and pm.watermark == 3


@pytest.mark.parametrize("order", [0, 3, 9, 18])
def test_exhaustion_per_order(order):
    nr_pages = 4 << MAX_PAGE_ORDER if order == 18 else 1 << (order + 4)
    pm = PhysMem(nr_pages * PAGE)
    pfns = pm.alloc_many(nr_pages >> order, order)
    assert len(set(pfns.tolist())) == nr_pages >> order
    assert all(p % (1 << order) == 0 for p in pfns.tolist())
    enomem(pm.alloc, order)
    enomem(pm.alloc, 0)
    enomem(pm.alloc_many, 1, 0)
    pm.free_many(pfns, order)
    pm.check()
    assert pm.free_blocks() == fresh_free_blocks(0, nr_pages) and pm.watermark == 0


def test_enomem_for_a_larger_order_leaves_small_blocks_usable():
    # 3 pages: an order-1 block and a page; order 2 can never fit.
    pm = PhysMem(3 * PAGE)
    a = pm.alloc(0)
    enomem(pm.alloc, 1)
    assert pm.nr_free_pages == 2
    b, c = pm.alloc(0), pm.alloc(0)
    assert sorted([a, b, c]) == [0, 1, 2]
    enomem(pm.alloc, 0)
    for p in (a, b, c):
        pm.free(p, 0)
    pm.check()
    assert pm.watermark == 0 and pm.free_blocks() == fresh_free_blocks(0, 3)


def test_enomem_changes_nothing():
    pm = PhysMem(3 * PAGE)
    pm.alloc(0)
    before = snapshot(pm)
    enomem(pm.alloc, 1)
    assert snapshot(pm) == before


def test_double_free():
    pm = PhysMem(1024 * PAGE)
    p = pm.alloc(2)
    q = pm.alloc(2)
    pm.free(p, 2)
    before = snapshot(pm)
    einval(pm.free, p, 2)
    einval(pm.free, p + 1, 0)
    einval(pm.free, p, 3)             # half free, half allocated
    assert snapshot(pm) == before
    pm.free(q, 2)
    einval(pm.free, q, 2)             # free again, now untouched memory
    pm.check()


def test_free_refused():
    pm = PhysMem(64 * PAGE, start_pfn=64)
    p = pm.alloc(1)
    before = snapshot(pm)
    einval(pm.free, p + 1, 1)         # misaligned
    einval(pm.free, 0, 0)             # below the host
    einval(pm.free, 128, 0)           # above it
    einval(pm.free, 2**64 - 1, 0)
    with pytest.raises(ValueError):
        pm.free(p, 19)                # no such order
    with pytest.raises(ValueError):
        pm.free(-1, 0)
    with pytest.raises(TypeError):
        pm.free("64", 0)
    with pytest.raises(ValueError):
        pm.alloc(19)
    assert snapshot(pm) == before


def test_free_of_a_folio_refused():
    pm = PhysMem(64 * PAGE)
    f = pm.folio_alloc(2)
    before = snapshot(pm)
    einval(pm.free, f, 2)
    einval(pm.free, f + 1, 0)
    einval(pm.free, 0, 6)
    assert snapshot(pm) == before
    pm.folio_put(f)
    assert pm.folio(f) is None and pm.nr_folios == 0


def test_folio_split_and_put():
    pm = PhysMem(1 << 30)
    head = pm.folio_alloc(9)
    assert pm.folio(head + 511) == dict(pfn=head, order=9, flags=0, refcount=1,
                                        mapping=0, index=0, private=0)
    pm.folio_split(head, 6)
    assert list(pm.folios()) == [(head + (k << 6), 6) for k in range(8)]
    assert pm.folio(head + 70)["pfn"] == head + 64 and pm.folio(head + 70)["index"] == 64
    pm.folio_split(head + 64, 0)
    assert pm.nr_folios == 7 + 64
    assert pm.folio(head + 70) == dict(pfn=head + 70, order=0, flags=0, refcount=1,
                                       mapping=0, index=70, private=0)
    einval(pm.folio_split, head + 64, 0)          # order not below the folio's
    einval(pm.folio_split, head + 1, 0)           # not a head
    before = snapshot(pm)
    einval(pm.folio_put, head + 1)
    assert snapshot(pm) == before
    for pfn, _ in list(pm.folios()):
        pm.folio_put(pfn)
    pm.check()
    assert pm.nr_folios == 0 and pm.watermark == 0
    assert pm.free_blocks() == fresh_free_blocks(0, (1 << 30) // PAGE)


def test_coalescing_restores_the_top_order():
    pm = PhysMem(2 << 30)                           # two 1 GiB blocks
    pfns = pm.alloc_many(1024, 0)
    big = pm.alloc(MAX_PAGE_ORDER)
    assert pm.free_blocks()[MAX_PAGE_ORDER] == 0
    rng = np.random.default_rng(7)
    for p in rng.permutation(pfns).tolist():
        pm.free(p, 0)
    assert pm.free_blocks()[MAX_PAGE_ORDER] == 1
    pm.free(big, MAX_PAGE_ORDER)
    assert pm.free_blocks() == fresh_free_blocks(0, 2 << 18) and pm.watermark == 0
    pm.check()


def test_inject_alloc_failures():
    pm = PhysMem(64 * PAGE)
    pm.inject_alloc_failures(2)
    enomem(pm.alloc, 0)
    enomem(pm.folio_alloc, 0)
    assert pm.nr_free_pages == 64
    p = pm.alloc(0)
    pm.free(p, 0)


def test_16_tib_host_is_instant():
    t = time.perf_counter()
    pm = PhysMem(16 << 40)
    assert time.perf_counter() - t < 0.1
    assert pm.nr_pages == 1 << 32 and pm.nr_free_pages == 1 << 32
    assert pm.memory_bytes < 64 << 10
    assert pm.free_blocks()[MAX_PAGE_ORDER] == 1 << 14 and sum(pm.free_blocks()[:MAX_PAGE_ORDER]) == 0
    top = [pm.alloc(MAX_PAGE_ORDER) for _ in range(4)]
    f = pm.folio_alloc(9)
    assert pm.memory_bytes < 1 << 20
    pm.folio_put(f)
    for p in top:
        pm.free(p, MAX_PAGE_ORDER)
    pm.check()
    assert pm.watermark == 0 and pm.free_blocks()[MAX_PAGE_ORDER] == 1 << 14
    assert time.perf_counter() - t < 1


def test_host_at_high_start_pfn():
    start = (1 << 40) + 5
    pm = PhysMem(1000 * PAGE, start_pfn=start)
    assert (pm.start_pfn, pm.end_pfn) == (start, start + 1000)
    p = pm.alloc(4)
    assert p % 16 == 0 and start <= p < start + 1000
    pm.free(p, 4)
    pm.check()
    assert pm.free_blocks() == fresh_free_blocks(start, 1000) and pm.watermark == start


def test_host_at_the_top_of_the_pfn_space():
    # one page short of an order-18 block that would end at 2**64 (and wrap)
    start = 2**64 - 2**18
    pm = PhysMem((2**18 - 1) * PAGE, start_pfn=start)
    assert pm.end_pfn == TOP
    assert pm.free_blocks() == fresh_free_blocks(start, 2**18 - 1) == [1] * 18 + [0]
    enomem(pm.alloc, 18)
    p = pm.alloc(17)
    q = pm.alloc(0)
    assert p == start and q == start + 2**17
    pm.free(p, 17)
    pm.free(q, 0)
    pm.check()
    assert pm.watermark == start and pm.free_blocks() == [1] * 18 + [0]


def test_bad_host_size():
    for size in (0, 4095, 4097):
        with pytest.raises(ValueError):
            PhysMem(size)
    with pytest.raises(ValueError):
        PhysMem(1 << 30, start_pfn=2**64 - 10)
