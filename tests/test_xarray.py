"""gmem.XArray against the contract of lib/xarray.c.

A Hypothesis state machine compares every operation with `RefXArray`, a dict
of entries {first index: [order, value, marks]} searched linearly: too slow for
anything but tests, simple enough to be obviously right.  The `test_check_*`
scenarios re-express the cases of the kernel's lib/test_xarray.c.
"""
import numpy as np
import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gmem import XArray

U64_MAX = 2**64 - 1
VALUE_MAX = 2**63 - 1


def size(order):
    return 1 << order


def aligned_blocks(first, last):
    """[first, last] as maximal naturally aligned blocks, lowest first: (index, order)."""
    blocks = []
    index = first
    while index <= last:
        order = 63 if index == 0 else (index & -index).bit_length() - 1
        order = min(order, 63)
        while index + size(order) - 1 > last:
            order -= 1
        blocks.append((index, order))
        index += size(order)
    return blocks


class RefXArray:
    """The reference: {first index: [order, value, set of marks]}."""

    def __init__(self):
        self.entries = {}

    def covering(self, index):
        for first, (order, _, _) in self.entries.items():
            if first <= index < first + size(order):
                return first
        return None

    def overlapping(self, first, last, mark=None):
        found = [f for f, (order, _, marks) in self.entries.items()
                 if f <= last and f + size(order) - 1 >= first and (mark is None or mark in marks)]
        return sorted(found)

    def load(self, index):
        f = self.covering(index)
        return None if f is None else self.entries[f][1]

    def get_order(self, index):
        f = self.covering(index)
        return 0 if f is None else self.entries[f][0]

    def store(self, index, value, order):
        f = self.covering(index)
        old = None if f is None else self.entries[f][1]
        if f is not None and self.entries[f][0] >= order:
            self.entries[f][1] = value          # lands on the whole larger entry
            return old
        marks = set()
        for g in self.overlapping(index, index + size(order) - 1):
            marks |= self.entries.pop(g)[2]
        self.entries[index] = [order, value, marks]
        return old

    def store_range(self, first, last, value):
        for index, order in aligned_blocks(first, last):
            self.store(index, value, order)

    def erase(self, index):
        f = self.covering(index)
        return None if f is None else self.entries.pop(f)[1]

    def erase_range(self, first, last):
        found = self.overlapping(first, last)
        for f in found:
            del self.entries[f]
        return len(found)

    def split(self, index, order):
        f = self.covering(index)
        k, value, marks = self.entries.pop(f)
        for i in range(size(k - order)):
            self.entries[f + (i << order)] = [order, value, set(marks)]

    def find(self, start, last, mark):
        found = self.overlapping(start, last, mark)
        if not found:
            return None
        return (max(start, found[0]), self.entries[found[0]][1])

    def find_after(self, index, last, mark):
        f = self.covering(index)
        start = index + 1 if f is None else f + size(self.entries[f][0])
        if start > U64_MAX or start > last:
            return None
        found = self.overlapping(start, last, mark)
        return None if not found else (found[0], self.entries[found[0]][1])

    def items(self, first, last, mark):
        return [(f, self.entries[f][0], self.entries[f][1]) for f in self.overlapping(first, last, mark)]

    def nr_indices(self):
        return sum(size(order) for order, _, _ in self.entries.values())


# Indices crowd into four small windows (so entries collide) and the edges of
# the index space; orders reach the top of it.
WINDOWS = [0, 2**32 - 128, 2**63 - 128, 2**64 - 256]
indices = st.one_of(
    st.tuples(st.sampled_from(WINDOWS), st.integers(0, 255)).map(sum),
    st.sampled_from([0, 1, 63, 64, 4095, 4096, 2**63, U64_MAX, U64_MAX - 63]),
)
orders = st.one_of(st.integers(0, 3), st.integers(4, 9), st.sampled_from([12, 13, 32, 62, 63]))
values = st.one_of(st.integers(0, 1000), st.sampled_from([VALUE_MAX, VALUE_MAX - 1]))
marks = st.integers(0, 2)
maybe_marks = st.none() | marks
lengths = st.one_of(st.integers(0, 300), st.sampled_from([2**12 - 1, 2**21, 2**32, 2**63, U64_MAX]))


def align(index, order):
    return index & ~(size(order) - 1)


def snapshot(x):
    """Everything observable about x, to show that a refused call changed nothing."""
    return (list(x.items()), [list(x.items(mark=m)) for m in range(3)], len(x), x.nr_indices,
            x.nr_nodes, x.memory_bytes)


BAD_CALLS = [
    (ValueError, lambda x: x.store(-1, 0)),
    (ValueError, lambda x: x.store(2**64, 0)),
    (TypeError, lambda x: x.store(1.0, 0)),
    (TypeError, lambda x: x.store("1", 0)),
    (ValueError, lambda x: x.store(0, 2**63)),
    (ValueError, lambda x: x.store(0, -1)),
    (ValueError, lambda x: x.store(0, 0, order=64)),
    (ValueError, lambda x: x.store(0, 0, order=-1)),
    (ValueError, lambda x: x.store(1, 0, order=1)),
    (ValueError, lambda x: x.store(2**63 + 2**62, 0, order=63)),
    (ValueError, lambda x: x.store_range(5, 4, 0)),
    (ValueError, lambda x: x.store_range(0, 2**64, 0)),
    (ValueError, lambda x: x.store_range(0, 5, 2**63)),
    (ValueError, lambda x: x.erase(-1)),
    (TypeError, lambda x: x.erase(None)),
    (ValueError, lambda x: x.erase_range(5, 4)),
    (ValueError, lambda x: x.load(2**64)),
    (ValueError, lambda x: x.get_order(-5)),
    (ValueError, lambda x: x.split(-1, 0)),
    (ValueError, lambda x: x.split(0, 64)),
    (ValueError, lambda x: x.set_mark(0, 3)),
    (ValueError, lambda x: x.set_mark(0, -1)),
    (ValueError, lambda x: x.clear_mark(0, 3)),
    (ValueError, lambda x: x.get_mark(0, 3)),
    (ValueError, lambda x: x.find(0, mark=3)),
    (ValueError, lambda x: x.find(2**64)),
    (ValueError, lambda x: x.find_after(0, mark=7)),
    (ValueError, lambda x: x.store_many(np.array([1], dtype=np.uint64), np.array([0], dtype=np.uint64), order=1)),
    (ValueError, lambda x: x.store_many(np.array([0], dtype=np.uint64), np.array([2**63], dtype=np.uint64))),
    (ValueError, lambda x: x.store_many(np.array([0, 1], dtype=np.uint64), np.array([0], dtype=np.uint64))),
]


class XArrayMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.x = XArray()
        self.ref = RefXArray()

    # ---------------------------------------------------------------- changes
    @rule(index=indices, order=orders, value=values)
    def store(self, index, order, value):
        index = align(index, order)
        assert self.x.store(index, value, order=order) == self.ref.store(index, value, order)

    @rule(first=indices, length=lengths, value=values)
    def store_range(self, first, length, value):
        last = min(first + length, U64_MAX)
        assert self.x.store_range(first, last, value) is None
        self.ref.store_range(first, last, value)

    @rule(index=indices)
    def erase(self, index):
        assert self.x.erase(index) == self.ref.erase(index)

    @precondition(lambda self: self.ref.entries)
    @rule(data=st.data())
    def erase_existing(self, data):
        first = data.draw(st.sampled_from(sorted(self.ref.entries)))
        index = first + data.draw(st.integers(0, size(self.ref.entries[first][0]) - 1))
        assert self.x.erase(index) == self.ref.erase(index)

    @rule(first=indices, length=lengths)
    def erase_range(self, first, length):
        last = min(first + length, U64_MAX)
        assert self.x.erase_range(first, last) == self.ref.erase_range(first, last)

    @precondition(lambda self: self.ref.entries)
    @rule(data=st.data())
    def split(self, data):
        first = data.draw(st.sampled_from(sorted(self.ref.entries)))
        k = self.ref.entries[first][0]
        assume(k > 0 and len(self.ref.entries) < 2000)
        order = data.draw(st.integers(max(0, k - 6), k - 1))   # at most 64 pieces
        index = first + data.draw(st.integers(0, size(k) - 1))
        self.x.split(index, order)
        self.ref.split(index, order)

    @rule(index=indices, order=st.integers(0, 63))
    def split_refused(self, index, order):
        k = self.ref.get_order(index)
        assume(self.ref.covering(index) is None or order >= k)
        before = snapshot(self.x)
        with pytest.raises(ValueError):
            self.x.split(index, order)
        assert snapshot(self.x) == before

    @rule(index=indices, mark=marks)
    def set_mark(self, index, mark):
        self.x.set_mark(index, mark)
        f = self.ref.covering(index)
        if f is not None:
            self.ref.entries[f][2].add(mark)

    @precondition(lambda self: self.ref.entries)
    @rule(data=st.data(), mark=marks, clear=st.booleans())
    def mark_existing(self, data, mark, clear):
        first = data.draw(st.sampled_from(sorted(self.ref.entries)))
        index = first + data.draw(st.integers(0, size(self.ref.entries[first][0]) - 1))
        if clear:
            self.x.clear_mark(index, mark)
            self.ref.entries[first][2].discard(mark)
        else:
            self.x.set_mark(index, mark)
            self.ref.entries[first][2].add(mark)

    @rule(index=indices, mark=marks)
    def clear_mark(self, index, mark):
        self.x.clear_mark(index, mark)
        f = self.ref.covering(index)
        if f is not None:
            self.ref.entries[f][2].discard(mark)

    @rule(data=st.data())
    def store_many(self, data):
        order = data.draw(st.integers(0, 3))
        idx = data.draw(st.lists(indices.map(lambda i: align(i, order)), max_size=20))
        vals = data.draw(st.lists(values, min_size=len(idx), max_size=len(idx)))
        self.x.store_many(np.array(idx, dtype=np.uint64), np.array(vals, dtype=np.uint64), order=order)
        for i, v in zip(idx, vals):
            self.ref.store(i, v, order)

    @rule(bad=st.sampled_from(BAD_CALLS))
    def bad_input(self, bad):
        exc, call = bad
        before = snapshot(self.x)
        with pytest.raises(exc):
            call(self.x)
        assert snapshot(self.x) == before

    # ---------------------------------------------------------------- queries
    @rule(index=indices)
    def load(self, index):
        assert self.x.load(index) == self.ref.load(index)
        assert self.x.get_order(index) == self.ref.get_order(index)

    @rule(index=indices, mark=marks)
    def get_mark(self, index, mark):
        f = self.ref.covering(index)
        assert self.x.get_mark(index, mark) == (f is not None and mark in self.ref.entries[f][2])

    @rule(idx=st.lists(indices, max_size=20))
    def load_many(self, idx):
        vals, present = self.x.load_many(np.array(idx, dtype=np.uint64))
        assert vals.dtype == np.uint64 and present.dtype == np.bool_
        for i, v, p in zip(idx, vals, present):
            want = self.ref.load(i)
            assert bool(p) == (want is not None)
            if p:
                assert int(v) == want

    @rule(start=indices, length=lengths, mark=maybe_marks)
    def find(self, start, length, mark):
        last = min(start + length, U64_MAX)
        assert self.x.find(start, last, mark) == self.ref.find(start, last, mark)

    @rule(index=indices, length=lengths, mark=maybe_marks)
    def find_after(self, index, length, mark):
        last = min(index + length, U64_MAX)
        assert self.x.find_after(index, last, mark) == self.ref.find_after(index, last, mark)

    @rule(first=indices, length=lengths, mark=maybe_marks)
    def items(self, first, length, mark):
        last = min(first + length, U64_MAX)
        assert list(self.x.items(first, last, mark)) == self.ref.items(first, last, mark)

    # ------------------------------------------------------------- invariants
    @invariant()
    def consistent(self):
        self.x.check()
        assert len(self.x) == len(self.ref.entries)
        assert self.x.nr_indices == self.ref.nr_indices()
        if not self.ref.entries:
            assert self.x.nr_nodes == 0 and self.x.memory_bytes == XArray().memory_bytes

    @invariant()
    def same_entries(self):
        assert list(self.x.items()) == self.ref.items(0, U64_MAX, None)
        for m in range(3):
            assert [f for f, _, _ in self.x.items(mark=m)] == self.ref.overlapping(0, U64_MAX, m)

    def teardown(self):
        n = len(self.ref.entries)
        assert self.x.erase_range(0, U64_MAX) == n
        assert len(self.x) == 0 and self.x.nr_nodes == 0
        self.x.check()


TestXArrayMachine = XArrayMachine.TestCase
TestXArrayMachine.settings = settings(stateful_step_count=40, deadline=None)


# --------------------------------------------------- lib/test_xarray.c scenarios

def test_check_xa_load():
    x = XArray()
    for i in range(1024):
        x.store(i, i)
        for j in range(1024):
            assert x.load(j) == (j if j <= i else None)
    for i in range(1024):
        assert x.erase(i) == i
        assert x.load(i) is None and x.load(i + 1) == (i + 1 if i < 1023 else None)
    assert len(x) == 0 and x.nr_nodes == 0
    x.check()


def test_check_xa_load_edges():
    x = XArray()
    assert x.load(0) is None and x.load(U64_MAX) is None
    assert x.store(0, 1) is None and x.store(U64_MAX, VALUE_MAX) is None
    assert x.load(0) == 1 and x.load(U64_MAX) == VALUE_MAX
    assert x.load(1) is None and x.load(U64_MAX - 1) is None and x.load(2**63) is None
    assert list(x.items()) == [(0, 0, 1), (U64_MAX, 0, VALUE_MAX)]
    assert x.store(U64_MAX, 7) == VALUE_MAX
    x.check()
    assert x.erase(U64_MAX) == 7 and x.erase(0) == 1
    assert x.nr_nodes == 0


def test_check_xa_mark_1():
    """Marks on an entry cover every index of it; store keeps them; erase drops them."""
    x = XArray()
    x.set_mark(5, 0)                           # on an empty index: nothing
    assert not x.get_mark(5, 0) and x.find(0, mark=0) is None
    x.store(64, 1, order=6)
    x.set_mark(100, 0)
    assert all(x.get_mark(i, 0) for i in range(64, 128))
    assert not x.get_mark(63, 0) and not x.get_mark(128, 0) and not x.get_mark(64, 1)
    x.store(127, 2)                            # a store into the entry keeps its order and marks
    assert x.get_order(64) == 6 and x.get_mark(64, 0) and x.load(64) == 2
    x.clear_mark(65, 0)
    assert not any(x.get_mark(i, 0) for i in range(64, 128))
    x.set_mark(64, 2)
    x.erase(90)
    x.store(64, 3, order=6)
    assert not x.get_mark(64, 2)
    x.check()


def test_check_xa_mark_2():
    """A multi-index store over marked entries carries the union of their marks."""
    x = XArray()
    x.store(0, 1)
    x.store(1, 1)
    x.store(3, 1)
    x.set_mark(0, 0)
    x.set_mark(3, 1)
    x.store(0, 9, order=2)
    assert list(x.items()) == [(0, 2, 9)]
    assert x.get_mark(2, 0) and x.get_mark(2, 1) and not x.get_mark(2, 2)
    # the same across node levels: entries in a child node replaced by an order-12 entry
    x.store(4096 + 70, 1)
    x.set_mark(4096 + 70, 2)
    x.store(4096, 2, order=12)
    assert x.get_mark(8191, 2) and not x.get_mark(8191, 0)
    x.check()


def test_check_xa_mark_3():
    """Marks summarised up the tree: find(mark) skips unmarked subtrees."""
    x = XArray()
    for i in range(0, 1 << 20, 4096):
        x.store(i, i)
    x.set_mark(3 << 12, 1)
    x.set_mark(200 << 12, 1)
    assert x.find(0, mark=1) == (3 << 12, 3 << 12)
    assert x.find_after(3 << 12, mark=1) == (200 << 12, 200 << 12)
    assert x.find_after(200 << 12, mark=1) is None
    x.clear_mark(3 << 12, 1)
    assert x.find(0, mark=1) == (200 << 12, 200 << 12)
    x.erase(200 << 12)
    assert x.find(0, mark=1) is None
    x.check()


def test_check_xa_shrink():
    x = XArray()
    x.store(0, 0)
    base, mem = x.nr_nodes, x.memory_bytes
    x.store(1 << 40, 1)
    assert x.nr_nodes > base
    x.erase(1 << 40)
    assert x.nr_nodes == base and x.memory_bytes == mem
    x.erase(0)
    assert x.nr_nodes == 0 and x.memory_bytes == XArray().memory_bytes
    x.check()


def test_check_multi_store_1():
    """An entry of order 1 at index: loads at both indices, erase by either."""
    for index in (0, 2, 62, 64, 2**63, U64_MAX - 1):
        x = XArray()
        x.store(index, 5, order=1)
        assert x.load(index) == 5 and x.load(index + 1) == 5
        assert x.load(index - 1 if index else 2) is None
        assert x.get_order(index + 1) == 1 and len(x) == 1 and x.nr_indices == 2
        assert x.erase(index + 1) == 5
        assert x.load(index) is None and x.nr_nodes == 0
        x.check()


def test_check_multi_store_2():
    """Storing over a multi-index entry at any index replaces it at every index."""
    x = XArray()
    for order in range(1, 20):
        x.store(0, order - 1, order=order)     # replaces the smaller entry
        assert list(x.items()) == [(0, order, order - 1)]
        assert x.store(size(order) - 1, 100) == order - 1   # lands on the whole entry
        assert x.load(0) == 100 and x.get_order(size(order) - 1) == order
        x.check()


def test_check_multi_store_3():
    """A large store replaces every entry inside its range, across node levels,
    and returns the value that was at its first index."""
    x = XArray()
    for i in range(0, 300, 3):
        x.store(i, i)
    x.store(4096, 1, order=6)
    assert x.store(0, 7, order=12) == 0
    assert list(x.items()) == [(0, 12, 7), (4096, 6, 1)]
    assert len(x) == 2 and x.nr_indices == 4096 + 64
    x.check()


def test_check_multi_store_top():
    """The largest orders at the top of the index space."""
    x = XArray()
    assert x.store(2**63, 1, order=63) is None
    assert x.load(U64_MAX) == 1 and x.load(2**63 - 1) is None and x.get_order(U64_MAX) == 63
    assert x.store(0, 2, order=63) is None
    assert list(x.items()) == [(0, 63, 2), (2**63, 63, 1)]
    assert x.nr_indices == 2**64
    assert x.store(U64_MAX, 3) == 1
    assert list(x.items(2**63)) == [(2**63, 63, 3)]
    assert x.find(U64_MAX) == (U64_MAX, 3)
    assert x.find_after(5) == (2**63, 3)
    assert x.find_after(2**63) is None
    x.split(U64_MAX, 60)
    assert len(x) == 9 and x.get_order(U64_MAX) == 60
    assert list(x.items(U64_MAX)) == [(2**64 - 2**60, 60, 3)]
    x.check()
    assert x.erase_range(0, U64_MAX) == 9 and x.nr_nodes == 0


def test_check_store_range():
    x = XArray()
    x.store_range(5, 5, 1)                      # a range of one index
    assert list(x.items()) == [(5, 0, 1)]
    x.store_range(1, 14, 2)
    assert list(x.items()) == [(1, 0, 2), (2, 1, 2), (4, 2, 2), (8, 2, 2), (12, 1, 2), (14, 0, 2)]
    x.store_range(0, U64_MAX, 3)                # the whole index space: two order-63 entries
    assert list(x.items()) == [(0, 63, 3), (2**63, 63, 3)]
    x.erase_range(0, U64_MAX)
    x.store_range(U64_MAX, U64_MAX, 4)
    assert list(x.items()) == [(U64_MAX, 0, 4)]
    x.store_range(2**21, 2 * 2**21 - 1, 5)      # 2M of indices: one order-21 entry
    assert x.get_order(2**21 + 7) == 21
    x.check()


def test_check_create_range_into_larger():
    """store_range inside a larger entry stores at every index of it."""
    x = XArray()
    x.store(0, 1, order=12)
    x.store_range(10, 20, 2)
    assert list(x.items()) == [(0, 12, 2)]


def test_check_split_1():
    for order, new in [(6, 0), (12, 6), (12, 0), (9, 3), (13, 5), (21, 18), (63, 60)]:
        x = XArray()
        index = 2**63 if order == 63 else 3 << order
        x.store(index, 42, order=order)
        x.set_mark(index, 1)
        x.split(index + size(order) - 1, new)
        got = list(x.items())
        assert got == [(index + (i << new), new, 42) for i in range(size(order - new))]
        assert all(x.get_mark(f, 1) and not x.get_mark(f, 0) for f, _, _ in got)
        assert len(x) == size(order - new) and x.nr_indices == size(order)
        x.check()
        assert x.erase_range(0, U64_MAX) == len(got) and x.nr_nodes == 0


def test_check_split_refused():
    x = XArray()
    with pytest.raises(ValueError):
        x.split(0, 0)                            # nothing there
    x.store(0, 1, order=3)
    before = snapshot(x)
    for order in (3, 4, 63):
        with pytest.raises(ValueError):
            x.split(5, order)
    assert snapshot(x) == before


def test_check_find_1():
    x = XArray()
    assert x.find() is None and x.find_after(0) is None and list(x.items()) == []
    x.store(0, 10)
    x.store(U64_MAX, 11)
    assert x.find() == (0, 10)
    assert x.find(1) == (U64_MAX, 11)
    assert x.find(1, U64_MAX - 1) is None
    assert x.find_after(0) == (U64_MAX, 11)
    assert x.find_after(U64_MAX) is None
    assert x.find(U64_MAX, U64_MAX) == (U64_MAX, 11)
    assert x.find(5, 4) is None                  # an empty range


def test_check_find_2():
    """find starting inside a multi-index entry reports the start, not the entry's head."""
    x = XArray()
    x.store(64, 5, order=6)
    assert x.find(70) == (70, 5)
    assert x.find(0, 63) is None
    assert x.find(0, 64) == (64, 5)
    assert x.find_after(70) is None
    assert x.find_after(10) == (64, 5)
    assert list(x.items(100, 100)) == [(64, 6, 5)]
    assert list(x.items(0, 63)) == []


def test_check_find_3():
    """find with marks visits every marked entry in order."""
    x = XArray()
    marked = []
    for i in range(0, 5000, 7):
        x.store(i, i)
        if i % 3 == 0:
            x.set_mark(i, 2)
            marked.append(i)
    got = []
    r = x.find(0, mark=2)
    while r is not None:
        got.append(r[0])
        r = x.find_after(r[0], mark=2)
    assert got == marked
    assert [f for f, _, _ in x.items(mark=2)] == marked


def test_check_get_order():
    x = XArray()
    for order in range(64):
        index = 0 if order == 63 else size(order)
        x.store(index, order, order=order)
        assert x.get_order(index) == order
        assert x.get_order(index + size(order) - 1) == order
        x.erase(index)
    assert x.get_order(12345) == 0


def test_check_account():
    x = XArray()
    x.store_range(0, 2**20 - 1, 1)
    x.store(2**40, 1, order=9)
    assert len(x) == 2 and x.nr_indices == 2**20 + 2**9
    x.split(0, 14)
    assert len(x) == 65 and x.nr_indices == 2**20 + 2**9
    x.check()


def test_check_destroy():
    """Erasing everything gives all the memory back."""
    x = XArray()
    empty = x.memory_bytes
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 2**63, 2_000, dtype=np.uint64)
    x.store_many(idx, idx)
    x.store_range(2**63, 2**63 + 10**6, 1)
    assert x.memory_bytes > empty
    x.erase_range(0, U64_MAX)
    assert len(x) == 0 and x.nr_nodes == 0 and x.memory_bytes == empty
    x.check()


def test_check_xa_err_unchanged():
    """Every refused call raises and leaves the array as it was."""
    x = XArray()
    x.store(0, 1, order=4)
    x.store(U64_MAX, 2)
    x.set_mark(0, 1)
    for exc, call in BAD_CALLS:
        before = snapshot(x)
        with pytest.raises(exc):
            call(x)
        assert snapshot(x) == before


def test_check_batch():
    x = XArray()
    idx = np.arange(0, 2000, 2, dtype=np.uint64)
    x.store_many(idx, idx * 3)
    vals, present = x.load_many(np.arange(2000, dtype=np.uint64))
    assert present.tolist() == [i % 2 == 0 for i in range(2000)]
    assert vals[present].tolist() == [3 * i for i in range(0, 2000, 2)]
    x.store_many(np.array([64], dtype=np.uint64), np.array([7], dtype=np.uint64), order=6)
    assert x.load(127) == 7 and len(x) == 1000 - 32 + 1


# ----------------------------------------------------------------------- memory

def test_memory_dense_4k_entries():
    """<= 16 bytes per index for 10^5 consecutive order-0 (4K-page) entries."""
    x = XArray()
    n = 10**5
    x.store_many(np.arange(n, dtype=np.uint64), np.arange(n, dtype=np.uint64))
    assert len(x) == n
    assert x.memory_bytes / n <= 16


def test_memory_2m_entries():
    """<= 1 byte per index for 2M entries (order 9: 512 4K pages)."""
    x = XArray()
    n = 4096                                     # 4096 order-9 entries: 2M indices
    idx = np.arange(n, dtype=np.uint64) << np.uint64(9)
    x.store_many(idx, idx, order=9)
    assert len(x) == n and x.nr_indices == n << 9
    assert x.memory_bytes / x.nr_indices <= 1
    big = XArray()
    big.store_range(0, 2**21 - 1, 1)             # a 2M-index range is one entry
    assert big.memory_bytes / big.nr_indices <= 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(indices, orders), max_size=30))
def test_memory_back_to_baseline(stores):
    x = XArray()
    empty = x.memory_bytes
    for index, order in stores:
        x.store(align(index, order), 1, order=order)
    for index, order in stores:
        x.erase(align(index, order))
    assert len(x) == 0 and x.memory_bytes == empty and x.nr_nodes == 0


# ------------------------------------------- known bugs in the Python wrapper

def test_check_xa_err_batch_casts():
    x = XArray()
    with pytest.raises(ValueError):
        x.store_many(np.array([-1], dtype=np.int64), np.array([5], dtype=np.int64))
    with pytest.raises(TypeError):
        x.store_many(np.array([2.7]), np.array([5], dtype=np.uint64))
    with pytest.raises(TypeError):
        x.load_many(np.array([2.7]))
    assert len(x) == 0


def test_check_xa_err_items_at_call():
    with pytest.raises(ValueError):
        XArray().items(first=-1)


# ------------------------------------------------------------------ the cursor

def test_cursor_follows_the_tree():
    """load() and store() walk a cursor kept in the handle, which stays on the last node it
    walked to: a leaf freed, replaced by a larger entry, split or re-made elsewhere must
    never answer."""
    x = XArray()
    for i in range(64, 128):
        x.store(i, i)
    assert x.load(70) == 70                    # the cursor is now on the leaf of [64, 128)
    x.store(0, 9, order=9)                     # a 2M entry frees that leaf
    assert [x.load(i) for i in (70, 0, 511)] == [9, 9, 9] and x.load(512) is None
    x.check()
    x.split(0, 0)                              # 512 new 4K entries in fresh leaves
    assert x.load(70) == 9 and x.store(70, 1) == 9 and x.load(70) == 1 and x.load(71) == 9
    x.check()
    x.erase_range(0, 511)                      # every leaf freed; the tree empties
    assert x.load(70) is None and x.nr_nodes == 0
    x.store(70, 2)                             # a new leaf, perhaps at the freed one's address
    assert x.load(70) == 2 and x.load(71) is None and x.load(6) is None
    x.store(1 << 40, 3)                        # the tree grows a level above that leaf
    assert x.load(70) == 2 and x.load(1 << 40) == 3
    x.erase(1 << 40)                           # and shrinks back
    assert x.load(70) == 2 and x.load(1 << 40) is None
    x.check()


@given(st.lists(st.tuples(st.sampled_from(["store", "erase", "big"]),
                          st.integers(0, 1023)), max_size=200))
@settings(max_examples=200, deadline=None)
def test_cursor_against_a_dict(ops):
    """Sequential-ish streams (where the cursor stays in its leaf) of stores, erases and
    64-index entries answer every load as a dict of indices does."""
    x, ref = XArray(), {}
    for n, (op, i) in enumerate(ops):
        if op == "store":
            x.store(i, n)
            first = next((f for f in ref if ref[f][1] > 0 and f <= i < f + 64), None)
            if first is not None:              # a store into a big entry lands on all of it
                ref[first] = (n, 64)
            else:
                ref[i] = (n, 0)
        elif op == "erase":
            x.erase(i)
            ref = {f: v for f, v in ref.items() if not (f <= i < f + (64 if v[1] else 1))}
        else:
            base = i & ~63
            x.store(base, n, order=6)
            ref = {f: v for f, v in ref.items() if not (base <= f < base + 64) and
                   not (v[1] and f <= base < f + 64)}
            ref[base] = (n, 64)
        for j in (i, i ^ 1, (i + 1) & 1023):
            hit = next((v[0] for f, v in ref.items() if f <= j < f + max(v[1], 1)), None)
            assert x.load(j) == hit
    x.check()


def test_node_gen_moves_on_every_node_freed():
    """node_gen (a cursor's test that the node it stands on is still on its index's path)
    stays while nodes are only added, and moves by one per node freed; each array starts
    from its own value, so a cursor kept from a freed array never trusts another's nodes."""
    x = XArray()
    gen = x.node_gen
    assert gen != XArray().node_gen
    for i in range(0, 4096, 7):
        x.store(i, i)
    assert x.node_gen == gen and x.nr_nodes > 64
    nodes = x.nr_nodes
    x.erase_range(0, 63)                       # the first leaf empties and goes
    assert x.node_gen == gen + 1 and x.nr_nodes == nodes - 1
    x.store(0, 1, order=12)                    # one entry over everything: every node goes
    assert x.node_gen == gen + nodes and x.load(4095) == 1
    x.check()
