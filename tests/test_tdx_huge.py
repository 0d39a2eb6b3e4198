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
