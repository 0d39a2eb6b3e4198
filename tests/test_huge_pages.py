"""Huge pages in guest_memfd (proposed upstream, in no kernel): the hugetlb pool and its
reservations (Host(hugetlb_pages=), GUEST_MEMFD_FLAG_HUGETLB with the RFC v2 size bits or the
WIP tree's page_order), 2M and 1G folios, and the restructuring policies (huge_split=,
huge_merge=) with what the MMU and SNP's RMP do around them. A Hypothesis machine per policy
checks that host.check() stays clean (no huge SPTE over a split, pool accounting, RMP) and that
folio sizes follow the policy's rule."""
import errno

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import gmem
from gmem import uapi as u

PS = 4096
MB = 1 << 20
GB = 1 << 30
PRIV = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
WRITE_PRIVATE = u.PFERR_WRITE_MASK | u.PFERR_PRIVATE_ACCESS
HUGETLB_2M = u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_2MB
HUGETLB_1G = u.GUEST_MEMFD_FLAG_HUGETLB | u.GUESTMEM_HUGETLB_FLAG_1GB


def guest(size=GB, vm_type=u.KVM_X86_SW_PROTECTED_VM, flags=0, private=True, memory=4 * GB,
          pages=None, **opts):
    """A host with a hugetlb pool, a VM whose one slot is a guest_memfd of size at gpa 0."""
    opts.setdefault("gmem_backing", "hugetlb")
    platform = "intel" if vm_type == u.KVM_X86_TDX_VM else "amd"
    h = gmem.Host(memory=memory, platform=platform, hugetlb_pages=pages or {"1G": 2, "2M": 16}, **opts)
    vm = h.create_vm(vm_type)
    f = vm.create_guest_memfd(size, flags)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, 0, f, 0)
    if private:
        vm.set_memory_attributes(0, size, PRIV)
    if vm_type in (u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM):
        vm.launch()
    return h, vm, f, vm.create_vcpu(0)


def orders(h, f):
    """gmem index -> folio order, one entry per folio."""
    return {index: order for index, order, pfn in f.folios()}


# ------------------------------------------------------------------ the pool

def test_the_pool_is_taken_at_boot_and_named_by_size():
    h = gmem.Host(memory=4 * GB, hugetlb_pages={"1G": 2, "2M": 3})
    assert h.hugetlb == {"2M": dict(total=3, free=3, reserved=0), "1G": dict(total=2, free=2, reserved=0),
                         "stranded_bytes": 0}
    assert h.stats["free_pages"] == (4 * GB - 2 * GB - 6 * MB) // PS
    assert h.options["gmem_backing"] == "buddy" and h.options["huge_split"] == "never"
    assert gmem.Host(memory=GB, gmem_backing="hugetlb").options["huge_merge"] == "eager"
    with pytest.raises(ValueError, match="cannot hold"):
        gmem.Host(memory=GB, hugetlb_pages={"1G": 2})
    with pytest.raises(ValueError, match="sizes"):
        gmem.Host(memory=GB, hugetlb_pages={"4K": 1})
    with pytest.raises(TypeError):
        gmem.Host(memory=GB, hugetlb_pages=[("1G", 1)])
    with pytest.raises(ValueError, match="huge_split"):
        gmem.Host(memory=GB, huge_split="sometimes")
    h.check()


def test_hugetlb_flag_is_offered_only_where_there_is_a_pool():
    plain = gmem.Host(memory=GB)
    vm = plain.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    assert not vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) & u.GUEST_MEMFD_FLAG_HUGETLB
    with pytest.raises(OSError) as e:
        vm.create_guest_memfd(2 * MB, HUGETLB_2M)
    assert e.value.errno == errno.EINVAL
    pooled = gmem.Host(memory=GB, hugetlb_pages={"2M": 4}).create_vm(u.KVM_X86_SW_PROTECTED_VM)
    assert pooled.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) & HUGETLB_1G == HUGETLB_1G


@pytest.mark.parametrize("flags, order", [(HUGETLB_2M, 0), (u.GUEST_MEMFD_FLAG_HUGETLB, 9)])
def test_create_reserves_the_whole_file(flags, order):
    h = gmem.Host(memory=GB, hugetlb_pages={"2M": 4})
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(6 * MB, flags, page_order=order)
    assert h.hugetlb["2M"] == dict(total=4, free=4, reserved=3)
    before = h.hugetlb
    for size, fl, po, err in [(4 * MB, flags, order, errno.ENOMEM),          # 3 + 2 > 4
                              (3 * MB, flags, order, errno.EINVAL),          # not a multiple
                              (2 * MB, HUGETLB_2M, 9, errno.EINVAL),         # the size twice
                              (2 * MB, u.GUEST_MEMFD_FLAG_HUGETLB, 12, errno.EINVAL),   # no such size
                              (2 * MB, u.GUESTMEM_HUGETLB_FLAG_2MB, 0, errno.EINVAL)]:  # size, no flag
        with pytest.raises(OSError) as e:
            vm.create_guest_memfd(size, fl, page_order=po)
        assert e.value.errno == err
        assert h.hugetlb == before                   # nothing changed
    f.close()
    vm.close()
    assert h.hugetlb["2M"]["reserved"] == 0
    h.check()


def test_hugetlb_files_allocate_and_punch_whole_huge_pages():
    h, vm, f, v = guest(size=4 * MB, flags=HUGETLB_2M)
    for off, ln in ((PS, 2 * MB), (0, PS), (2 * MB, MB)):
        with pytest.raises(OSError) as e:
            f.allocate(off, ln)
        assert e.value.errno == errno.EINVAL and "whole huge pages" in str(e.value)
        with pytest.raises(OSError):
            f.punch_hole(off, ln)
    f.allocate(0, 4 * MB)
    assert orders(h, f) == {0: 9, 512: 9} and h.hugetlb["2M"]["free"] == 16 - 2
    f.punch_hole(2 * MB, 2 * MB)
    assert orders(h, f) == {0: 9}
    assert h.hugetlb["2M"] == dict(total=16, free=15, reserved=1)    # back to the file's subpool
    h.check()


# ------------------------------------------------------------- mapping levels

@pytest.mark.parametrize("flags, size, level, counter", [(HUGETLB_1G, GB, 3, "pages_1g"),
                                                         (HUGETLB_2M, 32 * MB, 2, "pages_2m")])
def test_a_private_fault_maps_at_the_folio_size(flags, size, level, counter):
    h, vm, f, v = guest(size=size, flags=flags)
    r = v.page_fault(0x5000, WRITE_PRIVATE)
    assert r.ret == u.RET_PF_FIXED and r.level == level and vm.stats[counter] == 1
    assert h.folio(r.pfn)["order"] == (18 if level == 3 else 9)
    h.check()


def test_fresh_folios_split_unless_their_whole_range_is_private():
    h, vm, f, v = guest(private=False)
    vm.set_memory_attributes(0, GB - PS, PRIV)          # the last page stays shared
    r = v.page_fault(0, WRITE_PRIVATE)
    assert r.level == 1 and h.stats["folio_splits"] == 1
    assert len(orders(h, f)) == 1 << 18 and set(orders(h, f).values()) == {0}
    h.check()


def test_convert_keeps_a_fresh_folio_whole_and_the_mmu_maps_what_lpage_info_allows():
    h, vm, f, v = guest(private=False, huge_split="convert")
    vm.set_memory_attributes(0, GB - PS, PRIV)
    r = v.page_fault(0, WRITE_PRIVATE)
    assert r.level == 2 and orders(h, f) == {0: 18}     # 1G mixed: 2M at most
    h.check()


# --------------------------------------------------------------- restructuring

@pytest.mark.parametrize("split, folios", [("convert", 1 << 18), ("convert-2m", 511 + 512), ("never", 1)])
def test_to_shared_restructures_as_the_policy_says(split, folios):
    h, vm, f, v = guest(huge_split=split, huge_merge="never")
    assert v.page_fault(0x40000000 - PS, WRITE_PRIVATE).level == 3
    vm.set_memory_attributes(5 * MB, PS, 0)
    assert len(orders(h, f)) == folios
    assert vm.stats["pages_1g"] == 0                    # no huge SPTE over the split (nor the mixed range)
    r = v.page_fault(0, WRITE_PRIVATE)
    assert r.level == (1 if split == "convert" else 2)
    h.check()


@pytest.mark.parametrize("merge", ["eager", "lazy", "never"])
def test_to_private_merges_as_the_policy_says(merge):
    h, vm, f, v = guest(huge_merge=merge)
    v.page_fault(0, WRITE_PRIVATE)
    vm.set_memory_attributes(5 * MB, PS, 0)
    assert len(orders(h, f)) == 1 << 18
    vm.set_memory_attributes(5 * MB, PS, PRIV)
    assert len(orders(h, f)) == (1 if merge == "eager" else 1 << 18)
    r = v.page_fault(7 * MB, WRITE_PRIVATE)
    assert len(orders(h, f)) == (1 << 18 if merge == "never" else 1)
    assert h.stats["folio_merges"] == (0 if merge == "never" else 1)
    assert r.level == (1 if merge == "never" else 3)
    h.check()


def test_in_place_conversion_restructures_and_refuses_over_a_pin():
    h = gmem.Host(memory=4 * GB, platform="amd", kernel="next", gmem_in_place_conversion=True,
                  hugetlb_pages={"2M": 4}, gmem_backing="hugetlb")
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(4 * MB, u.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * MB, 0, f, 0)
    v = vm.create_vcpu(0)
    assert v.page_fault(0, WRITE_PRIVATE).level == 2
    f.set_memory_attributes(PS, PS, 0)
    assert len(orders(h, f)) == 512 and h.stats["folio_splits"] == 1
    m = f.mmap(4 * MB)
    m[PS:PS + 1] = b"x"
    with m.pin(PS, PS):
        with pytest.raises(OSError) as e:
            f.punch_hole(0, 2 * MB)
        assert e.value.errno == errno.EAGAIN and h.stats["huge_eagain"] == 1
        assert len(orders(h, f)) == 512                  # nothing changed
        h.check()
    del m
    f.set_memory_attributes(PS, PS, PRIV)
    assert orders(h, f) == {0: 9} and h.stats["folio_merges"] == 1
    h.check()


def test_buddy_partial_punch_of_a_pinned_huge_folio_is_eagain():
    h = gmem.Host(memory=GB, platform="none", huge_folios=True)
    vm = h.create_vm(u.KVM_X86_DEFAULT_VM)
    f = vm.create_guest_memfd(4 * MB, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    m = f.mmap(4 * MB)
    m[0:1] = b"x"
    assert orders(h, f) == {0: 9}
    pin = m.pin(0, PS)
    with pytest.raises(OSError) as e:
        f.punch_hole(MB, PS)
    assert e.value.errno == errno.EAGAIN and orders(h, f) == {0: 9}
    pin.release()
    f.punch_hole(MB, PS)
    assert len(orders(h, f)) == 511
    h.check()


def test_a_poisoned_piece_strands_the_rest_of_its_huge_page():
    h, vm, f, v = guest(size=4 * MB, flags=HUGETLB_2M)
    r = v.page_fault(0, WRITE_PRIVATE)
    vm.set_memory_attributes(PS, PS, 0)                 # split: 512 folios
    assert h.memory_failure(r.pfn + 7) == 1
    f.punch_hole(0, 2 * MB)                              # no merge over a poisoned page
    assert orders(h, f) == {}
    assert h.hugetlb["stranded_bytes"] == 2 * MB - PS
    assert h.hugetlb["2M"] == dict(total=16, free=15, reserved=1)   # one never allocated, one stranded
    h.check()


# ------------------------------------------------------------------------ SNP

def test_snp_maps_a_1g_folio_with_2m_rmp_entries():
    h, vm, f, v = guest(vm_type=u.KVM_X86_SNP_VM, flags=HUGETLB_1G)
    rmp_before = h.rmp.stats["rmpupdate"]               # the launch's VMSA
    r = v.page_fault(0x3000, WRITE_PRIVATE | u.PFERR_GUEST_ENC_MASK)
    assert r.level == 2
    head = r.pfn - (r.pfn % (1 << 18))
    e = [h.rmp.lookup(head + k * 512) for k in range(512)]
    assert all(x.assigned and x.pagesize == 1 for x in e)
    assert h.rmp.stats["rmpupdate"] - rmp_before == 512 and h.rmp.stats["psmash"] == 0
    h.check()


def test_snp_punch_of_a_merged_hugetlb_page_is_one_2m_rmpupdate_per_2m():
    h, vm, f, v = guest(size=2 * MB, vm_type=u.KVM_X86_SNP_VM, flags=HUGETLB_2M)
    v.page_fault(0, WRITE_PRIVATE | u.PFERR_GUEST_ENC_MASK)
    vm.set_memory_attributes(PS, PS, 0)                 # split (the RMP keeps its 2M entry) ...
    vm.set_memory_attributes(PS, PS, PRIV)              # ... and merged back
    n = h.rmp.stats["rmpupdate"]
    f.punch_hole(0, 2 * MB)
    assert h.rmp.stats["rmpupdate"] == n + 1 and h.rmp.stats["psmash"] == 0
    h.check()


def test_snp_pvalidate_at_4k_inside_a_2m_mapping_psmashes():
    h, vm, f, v = guest(size=2 * MB, vm_type=u.KVM_X86_SNP_VM, flags=HUGETLB_2M)
    head = v.page_fault(0, WRITE_PRIVATE | u.PFERR_GUEST_ENC_MASK).pfn
    assert h.rmp.lookup(head).pagesize == 1
    assert v.pvalidate(0x5000, 0, 1) == 0                # 4K inside the 2M entry: #NPF(SIZEM), PSMASH
    assert h.rmp.stats["psmash"] == 1 and h.rmp.lookup(head).pagesize == 0
    assert h.rmp.lookup(head + 5).validated
    h.check()


# ------------------------------------------------------------ state machine

POLICIES = [("hugetlb", "fresh", "eager"), ("hugetlb", "convert", "lazy"), ("hugetlb", "convert-2m", "eager"),
            ("hugetlb", "never", "never"), ("buddy", "convert", "eager")]


class HugeMachine(RuleBasedStateMachine):
    """Faults, conversions (VM attributes) and punches over a 2M-backed SW_PROTECTED, SNP or TDX
    guest (TDX with 2M S-EPT leaves); after
    every step host.check() is clean and the folios obey the policy: with huge_split "fresh" no
    huge folio covers a shared page, with huge_merge "eager" every fully private,
    present, unpinned huge range is one folio."""
    SIZE = 4 * MB

    @initialize(policy=st.sampled_from(POLICIES), vm_type=st.sampled_from(
        [u.KVM_X86_SW_PROTECTED_VM, u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM]))
    def setup(self, policy, vm_type):
        backing, self.split, self.merge = policy
        snp = vm_type == u.KVM_X86_SNP_VM
        opts = dict(gmem_backing=backing, huge_split=self.split, huge_merge=self.merge)
        if vm_type == u.KVM_X86_TDX_VM:
            opts["tdx_huge_page"] = True
        if backing == "buddy":
            opts.update(huge_folios=True, pages={"2M": 1})
        else:
            opts.update(pages={"2M": 4, "1G": 1})
        flags = 0 if backing == "buddy" else HUGETLB_1G if self.SIZE == GB else HUGETLB_2M
        self.order = 18 if flags == HUGETLB_1G else 9
        self.h, self.vm, self.f, self.v = guest(size=self.SIZE, vm_type=vm_type, memory=4 * GB,
                                                flags=flags, **opts)
        self.shared = set()
        self.ec = WRITE_PRIVATE | (u.PFERR_GUEST_ENC_MASK if snp else 0)

    pages = st.integers(0, SIZE // PS - 1)

    @rule(p=pages)
    def fault(self, p):
        r = self.v.page_fault(p * PS, self.ec if p not in self.shared else u.PFERR_WRITE_MASK)
        if p in self.shared:
            assert r.exit_reason == u.KVM_EXIT_MEMORY_FAULT or r.ret < 0
        else:
            assert r.ret in (u.RET_PF_FIXED, u.RET_PF_SPURIOUS)

    @rule(p=pages, n=st.integers(1, 600), private=st.booleans())
    def convert(self, p, n, private):
        n = min(n, self.SIZE // PS - p)
        self.vm.set_memory_attributes(p * PS, n * PS, PRIV if private else 0)
        rng = set(range(p, p + n))
        self.shared = self.shared - rng if private else self.shared | rng

    @rule(k=st.integers(0, 1))
    def punch(self, k):
        unit = PS << self.order                        # a hugetlb file punches whole pages
        k %= self.SIZE // unit
        self.f.punch_hole(k * unit, unit)

    @invariant()
    def clean(self):
        if hasattr(self, "h"):
            self.h.check()

    @invariant()
    def folios_follow_the_policy(self):
        if not hasattr(self, "h"):
            return
        folios = orders(self.h, self.f)
        for index, order in folios.items():
            if order and self.split == "fresh":
                assert not any(i in self.shared for i in range(index, index + (1 << order))), (index, order)
        # (6.18 tracks "prepared" per folio: no merge over pieces prepared and not)
        if self.merge == "eager" and self.h.options["prepared_tracking"] != "gmem":
            for base in range(0, self.SIZE // PS, 1 << self.order):
                inside = [i for i in folios if base <= i < base + (1 << self.order)]
                if len(inside) == (1 << self.order) and not self.shared & set(range(base, base + (1 << self.order))):
                    raise AssertionError(f"huge range {base:#x} fully private and present but split")


HugeMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestHugeMachine = HugeMachine.TestCase


class HugeMachine1G(HugeMachine):
    """The same over one 1G hugetlb folio (the buddy policy: 2M folios): 2M leaves inside a 1G
    folio are what a split must not leave behind."""
    SIZE = GB
    # most pages in the first 8 MiB, so that conversions and faults meet
    pages = st.one_of(st.integers(0, 2047), st.integers(0, SIZE // PS - 1))


HugeMachine1G.TestCase.settings = settings(max_examples=12, stateful_step_count=12, deadline=None)
TestHugeMachine1G = HugeMachine1G.TestCase


# ------------------------------------------------------------------------ TDX

def test_tdx_a_split_folio_demotes_the_accepted_leaf_and_keeps_acceptance():
    h, vm, f, v = guest(size=4 * MB, vm_type=u.KVM_X86_TDX_VM, flags=HUGETLB_2M, tdx_huge_page=True)
    assert v.tdx_accept(0, level=2) == u.TDX_SUCCESS
    pool = h.hugetlb
    assert vm.stats["pages_2m"] == 1 and vm.sept_leaves()[0][2] == 2
    vm.set_memory_attributes(PS, PS, 0)                 # to shared: split leaf and folio, zap one page
    assert vm.tdx_stats["demote"] == 1 and vm.stats["pages_2m"] == 0 and vm.stats["pages_4k"] == 511
    assert len(orders(h, f)) == 512 and h.hugetlb == pool
    assert v.tdx_accept(0) == u.TDX_PAGE_ALREADY_ACCEPTED
    assert v.tdx_accept(2 * PS) == u.TDX_PAGE_ALREADY_ACCEPTED
    h.check()
    vm.set_memory_attributes(PS, PS, PRIV)              # merged back; the S-EPT stays 4K (no promotion)
    assert orders(h, f) == {0: 9} and vm.stats["pages_2m"] == 0
    assert v.tdx_accept(PS) == u.TDX_SUCCESS
    h.check()


def test_tdx_1g_folio_maps_2m_leaves_only():
    h, vm, f, v = guest(size=GB, vm_type=u.KVM_X86_TDX_VM, flags=HUGETLB_1G, tdx_huge_page=True)
    assert v.tdx_accept(0, level=2) == u.TDX_SUCCESS
    assert vm.stats["pages_2m"] == 1 and vm.stats["pages_1g"] == 0
    vm.set_memory_attributes(8 * MB, 2 * MB, 0)        # a whole other 2M to shared: the 1G folio splits
    assert len(orders(h, f)) == 1 << 18
    assert vm.tdx_stats["demote"] == 1                  # the accepted 2M leaf over the split folio
    assert v.tdx_accept(PS) == u.TDX_PAGE_ALREADY_ACCEPTED
    h.check()


def in_place_guest(split, merge, snp=False, size=4 * MB):
    """A launched SNP or SW_PROTECTED guest over a 2M hugetlb file with in-place conversion
    ("next") and the file mmapped: (host, vm, file, mapping)."""
    h = gmem.Host(memory=GB, platform="amd", kernel="next", gmem_in_place_conversion=True,
                  hugetlb_pages={"2M": 4}, gmem_backing="hugetlb", huge_split=split, huge_merge=merge)
    vm = h.create_vm(u.KVM_X86_SNP_VM if snp else u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(size, u.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, 0, f, 0)
    vm.launch()
    return h, vm, f, f.mmap(size)


def test_in_place_to_shared_leaves_an_all_shared_pinned_huge_folio_whole():
    """Under "convert", a host fault into a shared range gets a whole shared huge folio; a
    later conversion to shared that overlaps it changes none of its pages, so it neither
    splits it nor fails on its pin (the in-place machine found the EAGAIN)."""
    h, vm, f, m = in_place_guest("convert", "lazy")
    f.set_memory_attributes(2 * MB, 2 * MB, 0)
    pin = m.pin(2 * MB, PS)
    assert (512, 9) in [(i, o) for i, o, _ in f.folios()]
    f.set_memory_attributes(2 * MB - PS, 2 * PS, 0)             # pages 511 and 512
    assert (512, 9) in [(i, o) for i, o, _ in f.folios()]      # whole, still pinned
    h.check()
    pin.release()


class InPlaceHugeMachine(RuleBasedStateMachine):
    """In-place conversion ("next") over a 2M hugetlb file of an SNP or SW_PROTECTED guest, with
    pins of shared pages through a mapping and the guest's PVALIDATE: conversions to private and
    punches over a pinned page are EAGAIN and change nothing; no folio is freed while pinned
    (check(): nothing maps a freed page, the pool counts hold); a huge folio never spans a shared
    page under "fresh"; after every step host.check() is clean."""
    SIZE = 4 * MB

    @initialize(policy=st.sampled_from([("fresh", "eager"), ("convert", "lazy"), ("never", "never")]),
                snp=st.booleans())
    def setup(self, policy, snp):
        self.split, self.merge = policy
        self.h, self.vm, self.f, self.m = in_place_guest(self.split, self.merge, snp, self.SIZE)
        self.v = self.vm.create_vcpu(0)
        self.snp, self.shared, self.pins = snp, set(), {}
        self.ec = WRITE_PRIVATE | (u.PFERR_GUEST_ENC_MASK if snp else 0)

    pages = st.integers(0, SIZE // PS - 1)

    @rule(p=pages)
    def fault(self, p):
        r = self.v.page_fault(p * PS, u.PFERR_WRITE_MASK if p in self.shared else self.ec)
        assert r.ret in (u.RET_PF_FIXED, u.RET_PF_SPURIOUS), r

    @rule(p=pages, n=st.integers(1, 700), private=st.booleans())
    def convert(self, p, n, private):
        n = min(n, self.SIZE // PS - p)
        rng = set(range(p, p + n))
        before = self.f.folios()
        try:
            self.f.set_memory_attributes(p * PS, n * PS, PRIV if private else 0)
        except OSError as e:
            assert e.errno == errno.EAGAIN and private and self._held(rng, before), e
            assert self.f.folios() == before                 # nothing changed
            return
        self.shared = self.shared - rng if private else self.shared | rng

    def _held(self, rng, folios):
        """The range overlaps a folio a pin holds: a pin references its whole folio (under
        "convert" a host fault into a shared range gets a whole shared huge folio)."""
        for i, o, _ in folios:
            span = set(range(i, i + (1 << o)))
            if span & rng and span & set(self.pins):
                return True
        return False

    @rule(p=pages)
    def pin(self, p):
        if p in self.shared and p not in self.pins:
            self.pins[p] = self.m.pin(p * PS, PS)

    @rule(data=st.data())
    def unpin(self, data):
        if self.pins:
            self.pins.pop(data.draw(st.sampled_from(sorted(self.pins)))).release()

    @rule(k=st.integers(0, SIZE // (2 * MB) - 1))
    def punch(self, k):
        before = self.f.folios()
        try:
            self.f.punch_hole(k * 2 * MB, 2 * MB)
        except OSError as e:
            assert e.errno == errno.EAGAIN and any(k * 512 <= p < (k + 1) * 512 for p in self.pins)
            assert self.f.folios() == before
            return
        assert not [i for i, o, _ in self.f.folios() if k * 512 <= i < (k + 1) * 512]

    @rule(p=pages, validate=st.booleans())
    def pvalidate(self, p, validate):
        if self.snp and p not in self.shared:
            assert self.v.pvalidate(p * PS, 0, validate) in (0, u.PVALIDATE_FAIL_NOUPDATE)

    @invariant()
    def clean(self):
        if hasattr(self, "h"):
            self.h.check()
            if self.split == "fresh":
                for index, order, _ in self.f.folios():
                    assert not order or not self.shared & set(range(index, index + (1 << order)))

    def teardown(self):
        for pin in getattr(self, "pins", {}).values():
            pin.release()


InPlaceHugeMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
TestInPlaceHugeMachine = InPlaceHugeMachine.TestCase
