"""NUMA placement of guest_memfd memory (6.19+, in 7.2): gmem.Host(numa_nodes=N) splits the
memory into N nodes; mbind() on a mapping of the guest_memfd sets a shared policy of the inode
(kvm_gmem_set_policy) that kvm_gmem_get_folio consults only when it allocates, so folios never
move; f.get_policy(offset) reads it back. Allocation follows mm/mempolicy.c: BIND only on its
nodes, PREFERRED and LOCAL first on their node then anywhere, INTERLEAVE round robin
(interleave_nodes: filemap_alloc_folio passes no interleave index)."""
import errno

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import gmem
from gmem import uapi as u

PS = 4096
MB = 1 << 20
FLAGS = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED


def setup(nodes=2, memory=32 * MB, pages=64, kernel="7.2"):
    h = gmem.Host(memory=memory, platform="none", numa_nodes=nodes, kernel=kernel)
    vm = h.create_vm(u.KVM_X86_DEFAULT_VM)
    f = vm.create_guest_memfd(pages * PS, FLAGS)
    return h, vm, f, f.mmap(pages * PS)


def placement(h, f):
    """page index -> node, for the folios f has."""
    return {d["index"]: h.pfn_to_nid(p) for p in range(h.nr_pages)
            if (d := h.folio(p)) and d["mapping"] == f.ino}


def test_nodes_split_the_memory():
    h = gmem.Host(memory=64 * MB, platform="none", numa_nodes=4)
    assert h.numa_nodes == 4 and gmem.Host(memory=64 * MB).numa_nodes == 1
    per = 16 * MB // PS
    assert [h.pfn_to_nid(p) for p in (0, per - 1, per, 3 * per, h.nr_pages - 1)] == [0, 0, 1, 3, 3]
    for bad in (0, 9):
        with pytest.raises(ValueError):
            gmem.Host(memory=64 * MB, numa_nodes=bad)
    with pytest.raises(ValueError, match="2 MiB"):
        gmem.Host(memory=2 * MB, numa_nodes=2)


def test_bind_places_new_folios_and_never_moves_old_ones():
    h, vm, f, m = setup()
    f.allocate(0, PS)                                    # before any policy: the local node
    assert f.get_policy(0) == (u.MPOL_DEFAULT, ())
    m.mbind(u.MPOL_BIND, [1])
    assert f.get_policy(0) == f.get_policy(63 * PS) == (u.MPOL_BIND, (1,))
    f.allocate(0, 8 * PS)
    m[8 * PS:8 * PS + 1] = b"x"                          # a user fault allocates too
    assert placement(h, f) == {0: 0, **{i: 1 for i in range(1, 9)}}
    m.mbind(u.MPOL_DEFAULT)
    f.allocate(9 * PS, PS)
    assert placement(h, f)[9] == 0 and f.get_policy(0) == (u.MPOL_DEFAULT, ())
    h.check()


def test_interleave_and_preferred():
    h, vm, f, m = setup(nodes=4, memory=64 * MB)
    m.mbind(u.MPOL_INTERLEAVE, [1, 3])
    f.allocate(0, 6 * PS)
    assert [placement(h, f)[i] for i in range(6)] == [1, 3, 1, 3, 1, 3]
    m.mbind(u.MPOL_PREFERRED, [2, 3])                    # PREFERRED keeps the first node
    assert f.get_policy(0) == (u.MPOL_PREFERRED, (2,))
    f.allocate(6 * PS, 2 * PS)
    assert placement(h, f)[7] == 2
    m.mbind(u.MPOL_PREFERRED, [])                        # no nodes: the local node
    assert f.get_policy(0) == (u.MPOL_LOCAL, ())
    h.check()


def test_a_full_node():
    """BIND fails with ENOMEM when its nodes are full (kvm_gmem_get_folio -> fallocate);
    PREFERRED falls back to another node."""
    h, vm, f, m = setup(memory=8 * MB, pages=1024 + 16)  # two nodes of 1024 pages
    m.mbind(u.MPOL_BIND, [1])
    f.allocate(0, 1024 * PS)
    assert set(placement(h, f).values()) == {1}
    with pytest.raises(OSError) as e:
        f.allocate(1024 * PS, PS)
    assert e.value.errno == errno.ENOMEM
    m.mbind(u.MPOL_PREFERRED, [1])
    f.allocate(1024 * PS, PS)
    assert placement(h, f)[1024] == 0
    f.punch_hole(0, 1024 * PS)
    h.check()


@pytest.mark.parametrize("mode,nodes", [(7, []), (-1, []), (u.MPOL_DEFAULT, [0]), (u.MPOL_LOCAL, [1]),
                                        (u.MPOL_BIND, []), (u.MPOL_INTERLEAVE, []), (u.MPOL_BIND, [2]),
                                        (u.MPOL_BIND, [8])])
def test_mbind_refusals_change_nothing(mode, nodes):
    h, vm, f, m = setup()
    m.mbind(u.MPOL_BIND, [0])
    with pytest.raises(OSError) as e:
        m.mbind(mode, nodes)
    assert e.value.errno == errno.EINVAL and f.get_policy(0) == (u.MPOL_BIND, (0,))
    with pytest.raises(TypeError):
        m.mbind(u.MPOL_BIND, "1")
    m.close()
    with pytest.raises(OSError) as e:
        m.mbind(u.MPOL_BIND, [1])
    assert e.value.errno == errno.EFAULT


def test_before_6_19_guest_memfd_keeps_no_policy():
    """6.18's guest_memfd mapping has no .set_policy: mbind succeeds on the VMA, allocation
    ignores it."""
    h, vm, f, m = setup(kernel="6.18")
    m.mbind(u.MPOL_BIND, [1])
    f.allocate(0, 4 * PS)
    assert f.get_policy(0) == (u.MPOL_DEFAULT, ()) and set(placement(h, f).values()) == {0}


class NumaMachine(RuleBasedStateMachine):
    """Random policies over ranges, allocations and punches on a 3-node host: BIND pages land
    on their nodes, nothing crosses a node, check() stays clean, and the pages come back."""

    def __init__(self):
        super().__init__()
        self.h, self.vm, self.f, _ = setup(nodes=3, memory=24 * MB, pages=256)
        self.free0 = self.h.nr_free_pages
        self.policy = {}                      # page -> (mode, nodes) in force when allocated

    @rule(first=st.integers(0, 255), n=st.integers(1, 64),
          mode=st.sampled_from([u.MPOL_DEFAULT, u.MPOL_BIND, u.MPOL_PREFERRED, u.MPOL_INTERLEAVE]),
          nodes=st.sets(st.integers(0, 2), min_size=1))
    def mbind(self, first, n, mode, nodes):
        n = min(n, 256 - first)
        with self.f.mmap(n * PS, first * PS) as m:
            m.mbind(mode, [] if mode == u.MPOL_DEFAULT else sorted(nodes))
        want = (mode, () if mode == u.MPOL_DEFAULT else
                (min(nodes),) if mode == u.MPOL_PREFERRED else tuple(sorted(nodes)))
        assert all(self.f.get_policy(i * PS) == want for i in range(first, first + n))

    @rule(first=st.integers(0, 255), n=st.integers(1, 32))
    def allocate(self, first, n):
        n = min(n, 256 - first)
        before = placement(self.h, self.f)
        self.f.allocate(first * PS, n * PS)
        after = placement(self.h, self.f)
        for i in range(first, first + n):
            if i in before:
                assert after[i] == before[i]                    # folios never move
                continue
            mode, nodes = self.f.get_policy(i * PS)
            if mode == u.MPOL_BIND:
                assert after[i] in nodes

    @rule(first=st.integers(0, 255), n=st.integers(1, 64))
    def punch(self, first, n):
        n = min(n, 256 - first)
        self.f.punch_hole(first * PS, n * PS)
        assert not any(first <= i < first + n for i in placement(self.h, self.f))

    @invariant()
    def consistent(self):
        self.h.check()
        assert self.h.nr_free_pages + len(placement(self.h, self.f)) == self.free0

    def teardown(self):
        self.f.punch_hole(0, 256 * PS)
        assert self.h.nr_free_pages == self.free0


TestNumaMachine = NumaMachine.TestCase
TestNumaMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
