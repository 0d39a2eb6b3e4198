"""TDX huge pages, as Yan Zhao's "KVM: TDX huge page support for private memory" v3 (2026-01)
proposes them (Host(tdx_huge_page=), the proposed kvm_intel.tdx_huge_page): 2M S-EPT leaves
once the TD runs, never while it is built; the guest's ACCEPT level caps the mapping
(GUEST_INHIBIT, demote) or fails with TDX_PAGE_SIZE_MISMATCH; a zap that must be precise
(a conversion to shared or a punch over part of a huge leaf) demotes first (BLOCK, TRACK, kick,
DEMOTE); no promotion in the mirror root. Module rules from its tdg_mem_page_accept."""
import errno

import pytest

import gmem
from gmem import uapi as u

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
HVA = 0x7F0000000000
SRC = 0x7E0000000000
MB2 = 2 << 20
SIZE = 8 << 20
ALREADY = u.TDX_PAGE_ALREADY_ACCEPTED
MISMATCH = u.TDX_PAGE_SIZE_MISMATCH


def td(huge=True, build=False, huge_folios=True, size=SIZE):
    """A TD with one private gmem slot of size at gpa 0 and vCPU 0: runnable at once
    (vm.launch()), or being built (build=True)."""
    h = gmem.Host(memory=1 << 30, platform="intel", huge_folios=huge_folios, tdx_huge_page=huge)
    vm = h.create_vm(u.KVM_X86_TDX_VM)
    if build:
        h.mmap_user(SRC, 1 << 20)
        vm.tdx_init_vm(52)
    else:
        vm.launch()
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, HVA, f, 0)
    vm.set_memory_attributes(0, size, PRIVATE)
    v = vm.create_vcpu(0)
    if build:
        v.tdx_init_vcpu()
    return h, vm, f, v


def fault(v, gpa):
    return v.page_fault(gpa, u.PFERR_USER_MASK)


def trace_of(h, *events):
    recs = h.trace.to_numpy()
    names = [gmem.TRACE_EVENTS[e] for e in recs["event"]]
    return [(n, int(r["a"]), int(r["b"]), int(r["c"])) for n, r in zip(names, recs) if n in events]


def levels(vm):
    return {gfn: (st, lvl) for gfn, (pfn, st, lvl) in vm.sept_leaves().items()}


class TestOption:
    def test_values(self):
        assert gmem.Host(memory=64 << 20, platform="intel").tdx_huge_page is None
        for value, name in ((True, "2M"), ("2M", "2M"), ("1G", "1G"), (False, None), (None, None)):
            assert gmem.Host(memory=64 << 20, platform="intel", tdx_huge_page=value).tdx_huge_page == name
        for bad in ("4K", 2, "2m"):
            with pytest.raises(ValueError):
                gmem.Host(memory=64 << 20, platform="intel", tdx_huge_page=bad)
        with pytest.raises(ValueError, match="kvm_intel"):
            gmem.Host(memory=64 << 20, platform="amd", tdx_huge_page=True)

    def test_off_keeps_private_leaves_4k(self):
        h, vm, f, v = td(huge=False)
        r = fault(v, MB2 + 0x3000)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_4K)
        assert h.folio(r.pfn)["order"] == 9
        assert levels(vm) == {0x203: ("pending", 1)}
        # a 2M ACCEPT over the 4K leaf's table: the guest retries at 4K
        assert v.tdx_accept(MB2, 2) == MISMATCH
        assert v.tdx_accept(MB2 + 0x3000) == u.TDX_SUCCESS
        assert vm.tdx_stats["demote"] == 0 and vm.tdx_stats["kick"] == 0
        h.check()

    def test_set_external_spte_refuses_a_huge_leaf_when_off(self):
        """tdx_sept_set_private_spte: KVM_BUG_ON (-EIO) for a level above what
        tdx_gmem_max_mapping_level allows (a vendor hook that lies about it)."""
        h, vm, f, v = td(huge=False)
        h.register_hooks(u.KVM_X86_TDX_VM, private_max_mapping_level=lambda vm, pfn: u.PG_LEVEL_2M)
        r = fault(v, MB2)
        assert r.ret == -errno.EIO
        assert vm.sept() == {} and vm.stats["pages_2m"] == 0 and vm.tdx_stats["aug"] == 0
        h.check()


class TestMappingLevel:
    def test_2m_leaf_once_runnable(self):
        h, vm, f, v = td()
        h.trace.enable("tdx_page_aug", "spte_install")
        r = fault(v, MB2 + 0x3000)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_2M)
        pfn = r.pfn
        assert pfn % 512 == 0 and h.folio(pfn)["order"] == 9
        assert vm.sept_leaves() == {0x200: (pfn, "pending", 2)}
        assert vm.sept() == {0x200 + i: (pfn + i, "pending") for i in range(512)}
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (1, 0)
        assert vm.tdx_stats["aug"] == 1
        assert trace_of(h, "tdx_page_aug") == [("tdx_page_aug", 0x200, pfn, 2)]
        # a second fault in the leaf is spurious: nothing new in the S-EPT
        assert fault(v, MB2 + 0x5000).ret == u.RET_PF_SPURIOUS
        assert vm.tdx_stats["aug"] == 1
        h.check()

    def test_4k_while_the_td_is_built(self):
        """TDH.MEM.PAGE.ADD adds 4K pages only: tdx_gmem_max_mapping_level says 4K until the
        TD is RUNNABLE (v3 "Turn on PG_LEVEL_2M after TD is RUNNABLE"), so the image's 2M
        range stays a table of 4K leaves: no promotion after FINALIZE either."""
        h, vm, f, v = td(build=True)
        h.write_user(SRC, b"\x90" * 8192)
        assert v.tdx_init_mem_region(SRC, MB2, 2) == 2
        assert levels(vm) == {0x200: ("accepted", 1), 0x201: ("accepted", 1)}
        vm.tdx_finalize_vm()
        r = fault(v, MB2 + 0x10000)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_4K)      # a table is there
        r = fault(v, 2 * MB2)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_2M)      # an untouched range
        h.check()

    def test_folio_order_caps_the_level(self):
        h, vm, f, v = td(huge_folios=False)
        r = fault(v, MB2)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_4K)
        h, vm, f, v = td(huge="1G")             # 1G allowed, the folios are 2M
        assert fault(v, 0).level == u.PG_LEVEL_2M
        h.check()

    def test_mixed_attributes_cap_the_level(self):
        h, vm, f, v = td()
        vm.set_memory_attributes(MB2 + 0x1000, 0x1000, 0)
        assert fault(v, MB2).level == u.PG_LEVEL_4K
        assert fault(v, 2 * MB2).level == u.PG_LEVEL_2M
        h.check()


class TestAccept:
    def test_2m_accept_of_a_2m_leaf(self):
        h, vm, f, v = td()
        h.trace.enable("tdx_accept")
        pfn = fault(v, MB2).pfn
        assert v.tdx_accept(MB2, 2) == u.TDX_SUCCESS
        assert levels(vm) == {0x200: ("accepted", 2)}
        assert set(st for _, st in vm.sept().values()) == {"accepted"}
        assert vm.tdx_stats["accept"] == 1
        assert trace_of(h, "tdx_accept") == [("tdx_accept", MB2, pfn, 2)]
        assert v.tdx_accept(MB2, 2) == ALREADY
        # a 4K ACCEPT inside an accepted 2M leaf: already accepted, no demote (the module's
        # check_tdaccept_failure, case 1.1)
        assert v.tdx_accept(MB2 + 0x7000) == ALREADY
        assert vm.tdx_stats["demote"] == 0
        v.write(MB2 + 0x7000, b"huge")
        assert v.read(MB2 + 0x7000, 4) == b"huge"
        h.check()

    def test_2m_accept_of_an_unmapped_range_augs_it_at_2m(self):
        h, vm, f, v = td()
        assert v.tdx_accept(2 * MB2, 2) == u.TDX_SUCCESS
        assert levels(vm) == {0x400: ("accepted", 2)}
        assert vm.tdx_stats["aug"] == 1 and vm.tdx_stats["accept"] == 1
        h.check()

    def test_4k_accept_in_a_pending_2m_leaf_demotes_it(self):
        """Host level > ACCEPT level: the module's EPT violation carries the ACCEPT level;
        KVM sets GUEST_INHIBIT, demotes the leaf (BLOCK, TRACK, kick, DEMOTE) and the ACCEPT
        succeeds at 4K; the other 511 pages stay PENDING."""
        h, vm, f, v = td()
        pfn = fault(v, MB2).pfn
        h.trace.enable("tdx_range_block", "tdx_track", "tdx_page_demote", "tdx_accept")
        assert v.tdx_accept(MB2 + 0x5000) == u.TDX_SUCCESS
        lv = levels(vm)
        assert len(lv) == 512 and all(lvl == 1 for _, lvl in lv.values())
        assert lv[0x205] == ("accepted", 1)
        assert [g for g, (st, _) in lv.items() if st == "accepted"] == [0x205]
        assert vm.sept()[0x2FF] == (pfn + 0xFF, "pending")
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 512)
        s = vm.tdx_stats
        assert (s["block"], s["track"], s["kick"], s["demote"], s["remove"]) == (1, 1, 1, 1, 0)
        assert trace_of(h, "tdx_range_block", "tdx_track", "tdx_page_demote", "tdx_accept") == [
            ("tdx_range_block", 0x200, 0, 2), ("tdx_track", 0, 0, 0), ("tdx_page_demote", 0x200, pfn, 2),
            ("tdx_accept", MB2 + 0x5000, pfn + 5, 1)]
        # a 2M ACCEPT over the demoted range: size mismatch; the guest goes on at 4K
        assert v.tdx_accept(MB2, 2) == MISMATCH
        assert v.tdx_accept(MB2 + 0x6000) == u.TDX_SUCCESS
        h.check()

    def test_guest_inhibit_is_one_way(self):
        """A 4K ACCEPT of an unmapped page sets GUEST_INHIBIT first (scenario b): KVM maps
        4K; the range never maps 2M again, even once every leaf in it is gone."""
        h, vm, f, v = td()
        assert v.tdx_accept(3 * MB2 + 0x1000) == u.TDX_SUCCESS
        assert levels(vm) == {0x601: ("accepted", 1)}
        assert fault(v, 3 * MB2 + 0x4000).level == u.PG_LEVEL_4K
        vm.set_memory_attributes(3 * MB2, MB2, 0)
        vm.set_memory_attributes(3 * MB2, MB2, PRIVATE)
        f.punch_hole(3 * MB2, MB2)
        assert vm.sept() == {}
        assert fault(v, 3 * MB2).level == u.PG_LEVEL_4K
        assert fault(v, 2 * MB2).level == u.PG_LEVEL_2M     # its neighbour is not inhibited
        h.check()

    def test_bad_level_or_alignment(self):
        h, vm, f, v = td()
        for gpa, level in ((MB2, 3), (MB2, 0), (MB2 + 0x1000, 2)):
            assert v.tdx_accept(gpa, level) == u.TDX_OPERAND_INVALID
        assert vm.sept() == {}
        with pytest.raises(TypeError):
            v.tdx_accept(MB2, "2M")
        with pytest.raises(ValueError):
            v.tdx_accept(MB2, 8)
        h.check()


class TestDemoteBeforeZap:
    def test_partial_conversion_to_shared(self):
        h, vm, f, v = td()
        pfn = fault(v, MB2).pfn
        assert v.tdx_accept(MB2, 2) == u.TDX_SUCCESS
        h.trace.enable("tdx_page_demote", "tdx_page_remove", "spte_zap")
        vm.set_memory_attributes(MB2 + 0x10000, 0x2000, 0)
        lv = levels(vm)
        assert len(lv) == 510 and 0x210 not in lv and 0x211 not in lv
        assert set(lv.values()) == {("accepted", 1)}          # the state follows the split
        s = vm.tdx_stats
        assert (s["demote"], s["kick"], s["remove"], s["block"], s["track"]) == (1, 3, 2, 3, 3)
        assert trace_of(h, "tdx_page_demote", "tdx_page_remove") == [
            ("tdx_page_demote", 0x200, pfn, 2), ("tdx_page_remove", 0x210, pfn + 0x10, 1),
            ("tdx_page_remove", 0x211, pfn + 0x11, 1)]
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 510)
        h.check()
        # back to private: the range is uniform again but the table stays (no promotion)
        vm.set_memory_attributes(MB2 + 0x10000, 0x2000, PRIVATE)
        r = fault(v, MB2 + 0x10000)
        assert (r.ret, r.level, r.pfn) == (u.RET_PF_FIXED, u.PG_LEVEL_4K, pfn + 0x10)
        assert levels(vm)[0x210] == ("pending", 1)
        h.check()

    def test_whole_leaf_conversion_zaps_without_demote(self):
        h, vm, f, v = td()
        pfn = fault(v, MB2).pfn
        h.trace.enable("tdx_page_remove")
        vm.set_memory_attributes(MB2, MB2, 0)
        assert vm.sept() == {} and vm.tdx_stats["demote"] == 0
        s = vm.tdx_stats
        assert (s["block"], s["track"], s["remove"]) == (1, 1, 1)
        assert trace_of(h, "tdx_page_remove") == [("tdx_page_remove", 0x200, pfn, 2)]
        vm.set_memory_attributes(MB2, MB2, PRIVATE)
        assert fault(v, MB2).level == u.PG_LEVEL_2M          # no table was left: 2M again
        h.check()

    def test_punch_inside_a_2m_leaf(self):
        h, vm, f, v = td()
        pfn = fault(v, 2 * MB2).pfn
        f.punch_hole(2 * MB2 + 0x3000, 0x1000)
        lv = levels(vm)
        assert len(lv) == 511 and 0x403 not in lv and set(lv.values()) == {("pending", 1)}
        assert vm.tdx_stats["demote"] == 1 and vm.tdx_stats["remove"] == 1
        assert h.folio(pfn)["order"] == 0                      # the folio was split too
        h.check()
        # the hole refills with a new 4K page (a new folio: the allocator may reuse the frame)
        r = fault(v, 2 * MB2 + 0x3000)
        assert r.level == u.PG_LEVEL_4K and levels(vm)[0x403] == ("pending", 1)
        assert vm.tdx_stats["aug"] == 2
        h.check()

    def test_default_zaps_are_whole(self):
        """Without tdx_huge_page nothing is huge, so nothing splits: the counters are the
        mainline ones (a kick per TRACK, tdx_track's kvm_make_all_cpus_request)."""
        h, vm, f, v = td(huge=False)
        for gpa in (MB2, MB2 + 0x1000):
            fault(v, gpa)
        vm.set_memory_attributes(MB2, 0x1000, 0)
        s = vm.tdx_stats
        assert (s["block"], s["track"], s["kick"], s["remove"], s["demote"]) == (1, 1, 1, 1, 0)
        h.check()


# ------------------------------------------------------------- the state machine
# A reference model of one TD (launched, tdx_huge_page="2M", 2M gmem folios) over an 8 MiB
# private slot: per gfn its attribute and folio, per 2M range whether the mirror root holds a
# table there (sticky: tables stay until the VM goes, so the range never maps 2M again) and
# whether GUEST_INHIBIT is set (one-way), and the S-EPT leaves {first gfn: (state, level)}.

import os  # noqa: E402

from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

NPAGES = SIZE >> 12
GFNS = st.integers(0, NPAGES - 1)
LENGTHS = st.sampled_from([1, 2, 16, 511, 512, 513, 1024])


class TdxHugeModel:
    def __init__(self):
        self.private = [True] * NPAGES
        self.folio = [None] * NPAGES            # None, "huge" or "small"
        self.table = [False] * (NPAGES // 512)
        self.inhibit = [False] * (NPAGES // 512)
        self.leaves = {}                        # first gfn -> [state, level]
        self.stats = dict(aug=0, accept=0, demote=0, remove=0)

    def covering(self, gfn):
        for first in (gfn, gfn & ~511):
            leaf = self.leaves.get(first)
            if leaf and (first == gfn or leaf[1] == 2):
                return first, leaf
        return None, None

    def alloc(self, gfn):
        """kvm_gmem_get_folio with huge_folios: a 2M folio for an empty aligned 2M range."""
        base = gfn & ~511
        if self.folio[gfn] is None:
            if all(f is None for f in self.folio[base:base + 512]):
                self.folio[base:base + 512] = ["huge"] * 512
            else:
                self.folio[gfn] = "small"

    def fault(self, gfn):
        """A private EPT violation at gfn (private attribute): the leaf it maps, or None."""
        if self.covering(gfn)[0] is not None:
            return None
        self.alloc(gfn)
        r = gfn // 512
        if self.folio[gfn] == "huge" and all(self.private[r * 512:r * 512 + 512]) and \
                not self.inhibit[r] and not self.table[r]:
            self.leaves[r * 512] = ["pending", 2]
        else:
            self.leaves[gfn] = ["pending", 1]
            self.table[r] = True
        self.stats["aug"] += 1

    def demote(self, r):
        state, level = self.leaves.pop(r * 512)
        assert level == 2
        for g in range(r * 512, r * 512 + 512):
            self.leaves[g] = [state, 1]
        self.table[r] = True
        self.stats["demote"] += 1

    def split_and_zap(self, a, b):
        for boundary in (a, b):
            if boundary % 512 and boundary < NPAGES and self.leaves.get(boundary & ~511, [0, 0])[1] == 2:
                self.demote(boundary // 512)
        for first in [g for g in self.leaves if a <= g < b]:
            del self.leaves[first]
            self.stats["remove"] += 1

    def accept(self, gfn, level):
        if level == 2 and gfn % 512:
            return u.TDX_OPERAND_INVALID
        r = gfn // 512
        while True:
            if level == 2 and self.table[r]:
                return MISMATCH
            first, leaf = self.covering(gfn)
            if leaf is not None:
                if leaf[0] == "accepted":
                    return ALREADY
                if leaf[1] == level:
                    leaf[0] = "accepted"
                    self.stats["accept"] += 1
                    return u.TDX_SUCCESS
            # the EPT violation with the ACCEPT level
            if level == 1:
                self.inhibit[r] = True
                if leaf is not None:
                    self.demote(r)
            self.fault(gfn)


class TdxHugeMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.h, self.vm, self.f, self.v = td()
        self.m = TdxHugeModel()

    @rule(gfn=GFNS)
    def fault(self, gfn):
        r = fault(self.v, gfn << 12)
        if not self.m.private[gfn]:
            assert r.exit_reason == u.KVM_EXIT_MEMORY_FAULT
            return
        first, leaf = self.m.covering(gfn)
        self.m.fault(gfn)
        if first is not None:
            assert (r.ret, r.level) == (u.RET_PF_SPURIOUS, leaf[1])
        else:
            assert r.ret == u.RET_PF_FIXED
            assert r.level == self.m.covering(gfn)[1][1]

    @rule(gfn=GFNS, level=st.sampled_from([1, 2]), align=st.booleans())
    def accept(self, gfn, level, align):
        if align and level == 2:
            gfn &= ~511
        if not self.m.private[gfn]:
            return
        assert self.v.tdx_accept(gfn << 12, level) == self.m.accept(gfn, level)

    @rule(a=GFNS, n=LENGTHS)
    def to_shared(self, a, n):
        b = min(a + n, NPAGES)
        if any(self.m.private[a:b]):
            self.m.split_and_zap(a, b)
        self.m.private[a:b] = [False] * (b - a)
        self.vm.set_memory_attributes(a << 12, (b - a) << 12, 0)

    @rule(a=GFNS, n=LENGTHS)
    def to_private(self, a, n):
        b = min(a + n, NPAGES)
        self.m.private[a:b] = [True] * (b - a)
        self.vm.set_memory_attributes(a << 12, (b - a) << 12, PRIVATE)

    @rule(a=GFNS, n=LENGTHS)
    def punch(self, a, n):
        b = min(a + n, NPAGES)
        self.m.split_and_zap(a, b)
        for base in {a & ~511, (b - 1) & ~511}:
            if self.m.folio[base] == "huge" and (a > base or b < base + 512):
                self.m.folio[base:base + 512] = ["small"] * 512      # kvm_gmem_split_folio
        self.m.folio[a:b] = [None] * (b - a)
        self.f.punch_hole(a << 12, (b - a) << 12)

    @invariant()
    def agrees(self):
        self.h.check()
        assert levels(self.vm) == {g: tuple(leaf) for g, leaf in self.m.leaves.items()}
        s, ms = self.vm.tdx_stats, self.m.stats
        for name in ms:
            assert s[name] == ms[name], name
        assert s["block"] == s["track"] == s["kick"] == ms["remove"] + ms["demote"]
        assert self.vm.stats["pages_2m"] == sum(lvl == 2 for _, lvl in self.m.leaves.values())
        assert self.vm.stats["pages_4k"] == sum(lvl == 1 for _, lvl in self.m.leaves.values())


TdxHugeMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("GMEM_SM_EXAMPLES", 500 if os.environ.get("CI") else 60)),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestTdxHugeMachine = TdxHugeMachine.TestCase
