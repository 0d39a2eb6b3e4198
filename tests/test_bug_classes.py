"""The bug classes of issue 7, each provoked through the public API, mostly under a deliberately
broken Python hook, and each reported: host.check() raises gmem.InvariantError naming it, or
the access raises gmem.RmpViolation.

1. a host write to a guest-owned page          -> RmpViolation; check(): "never prepared: the
                                                  next prepare zeroes a guest-owned page"
2. a freed page still assigned in the RMP      -> check(): "freed pfn ... is still assigned"
3. a stale SPTE after a hole punch             -> check(): "maps a freed page (stale SPTE)"
   (zapping is no hook: the hook paths are shown to be closed; the one stale SPTE the public
   API makes is the kernel's own, a TDX gmem-only slot's shared SPTE, named as a kernel gap)
4. a 2M RMP entry over mixed 4K state          -> check(): a 2M NPT mapping over a 4K RMP entry
                                                  (INV-2), a 2M entry over pages it does not own;
                                                  RMPUPDATE itself refuses 2M over 4K entries
5. a leaked or double-freed folio              -> not reachable through the public API (see the
                                                  tests' docstrings); the closest cases are shown
                                                  to stay consistent

The correct SNP hooks below (PythonSnp) are the native ones written in Python on the public RMP
calls; each test breaks one thing in them.
"""
import errno

import numpy as np
import pytest

import gmem
from gmem import uapi as u

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ENC = u.PFERR_GUEST_ENC_MASK
W = u.PFERR_WRITE_MASK
GMEM = u.KVM_MEM_GUEST_MEMFD
SNP = u.KVM_X86_SNP_VM
HVA = 0x7F0000000000
MB = 1 << 20
MB2 = 2 * MB


class PythonSnp:
    """sev_gmem_prepare / sev_gmem_invalidate / sev_private_max_mapping_level in Python."""

    def __init__(self, host):
        self.host, self.rmp = host, host.rmp

    def prepare(self, vm, gfn, pfn, order):
        if self.rmp.lookup(pfn).assigned:
            return 0
        head = pfn & ~511
        if order >= 9 and not self.rmp.view(head, head + 512)["assigned"].any():
            return -errno.EINVAL if self.rmp.make_private(head, (gfn & ~511) << 12, u.PG_LEVEL_2M, vm.asid) else 0
        return -errno.EINVAL if self.rmp.make_private(pfn, gfn << 12, u.PG_LEVEL_4K, vm.asid) else 0

    def invalidate(self, host, start, end):
        pfn = start
        while pfn < end:
            huge = False
            if self.rmp.lookup(pfn).assigned:
                level = self.rmp.level(pfn)
                huge = pfn % 512 == 0 and end >= pfn + 512 and level == u.PG_LEVEL_2M
                if level == u.PG_LEVEL_2M and not huge:
                    self.rmp.psmash(pfn & ~511)
                self.rmp.make_shared(pfn, u.PG_LEVEL_2M if huge else u.PG_LEVEL_4K)
            pfn += 512 if huge else 1

    def max_level(self, vm, pfn):
        return self.rmp.level(pfn) if self.rmp.lookup(pfn).assigned else u.PG_LEVEL_4K

    def register(self, **broken):
        hooks = dict(gmem_prepare=self.prepare, gmem_invalidate=self.invalidate,
                     private_max_mapping_level=self.max_level, is_private_fault=None)
        hooks.update(broken)
        self.host.register_hooks(SNP, **hooks)


def snp_guest(huge=False, size=4 * MB, memory=64 * MB, prepared_tracking=None, **hooks):
    h = gmem.Host(memory=memory, platform="amd", huge_folios=huge, prepared_tracking=prepared_tracking)
    py = PythonSnp(h)
    py.register(**hooks)
    vm = h.create_vm(SNP)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, GMEM, 0, size, HVA, f, 0)
    vm.set_memory_attributes(0, size, PRIVATE)
    v = vm.create_vcpu(0)
    vm.launch()
    return h, py, vm, f, v


def test_the_python_hooks_are_correct():
    """The baseline: with the unbroken Python hooks a guest's life passes check() throughout."""
    h, py, vm, f, v = snp_guest(huge=True)
    r = v.page_fault(0x5000, ENC | W)
    assert r.ret == u.RET_PF_FIXED and r.level == u.PG_LEVEL_2M
    assert v.pvalidate(0x5000, 0, True) == 0              # PSMASH, then 4K
    h.check()
    vm.set_memory_attributes(0x5000, 4096, 0)
    f.punch_hole(0x5000, 4096)
    h.check()
    f.close()
    vm.close()
    h.check()
    assert h.rmp.assigned() == []


# ------------------------------------------------- 1. host write to a guest page

class TestHostWriteToGuestPage:
    def test_prepare_hook_scribbles_on_the_page_it_assigned(self):
        """A prepare hook that "initialises" the page after RMPUPDATE: the host write takes an
        RMP #PF (RmpViolation), raised from the fault that ran the hook."""
        def prepare(vm, gfn, pfn, order):
            r = py.prepare(vm, gfn, pfn, order)
            h.touch(pfn)                                   # memset(page, 0, PAGE_SIZE)
            return r

        h, py, vm, f, v = snp_guest()
        py.register(gmem_prepare=prepare)
        with pytest.raises(gmem.RmpViolation, match="host write to pfn"):
            v.page_fault(0x3000, ENC | W)
        assert h.rmp.stats["rmp_violations"] == 1

    def test_invalidate_hook_scrubs_before_making_the_page_shared(self):
        """Zeroing a page on free before the RMPUPDATE to shared is a write to a guest page."""
        def invalidate(host, start, end):
            for pfn in range(start, end):
                host.touch(pfn)                            # clear_page() first: wrong order
            py.invalidate(host, start, end)

        h, py, vm, f, v = snp_guest(gmem_invalidate=None)
        py.register(gmem_invalidate=invalidate)
        r = v.page_fault(0x3000, ENC | W)
        with pytest.raises(gmem.RmpViolation):
            f.punch_hole(0x3000, 4096)
        # the hook died before its RMPUPDATE: the page went back to the allocator assigned
        with pytest.raises(gmem.InvariantError, match=f"freed pfn {r.pfn:#x} is still assigned"):
            h.check()

    def test_prepare_hook_fails_after_assigning(self):
        """A hook that RMPUPDATEs and then reports failure leaves an assigned page gmem never
        marked prepared: check() names it, and the retry's clear_highpage is the host write."""
        fail = [True]

        def prepare(vm, gfn, pfn, order):
            r = py.prepare(vm, gfn, pfn, order)
            return -errno.EIO if fail[0] else r

        h, py, vm, f, v = snp_guest()
        py.register(gmem_prepare=prepare)
        r = v.page_fault(0x3000, ENC | W)
        assert r.exit_reason == u.KVM_EXIT_MEMORY_FAULT and r.ret == -errno.EIO
        with pytest.raises(gmem.InvariantError, match="never prepared: the next prepare zeroes a guest-owned page"):
            h.check()
        fail[0] = False
        before = h.rmp.stats["rmp_violations"]
        assert v.page_fault(0x3000, ENC | W).ret == u.RET_PF_FIXED
        assert h.rmp.stats["rmp_violations"] == before + 1  # kvm_gmem_prepare_folio zeroed it
        h.check()                                           # prepared now: consistent again

    def test_prepare_hook_assigns_the_vmms_page(self):
        """A hook that RMPUPDATEs the wrong pfn, here a page of the VMM's own memory: the VMM's
        next write to it faults (SIGBUS for a user access), and check() finds a guest page that
        is no guest_memfd's."""
        h, py, vm, f, v = snp_guest()
        h.mmap_user(HVA + 64 * MB, 4096)                           # a buffer of the VMM's own
        h.write_user(HVA + 64 * MB, b"vmm data")
        vmm_pfn = next(p for p in range(h.nr_pages) if h.folio(p))

        def prepare(vm, gfn, pfn, order):
            py.prepare(vm, gfn, pfn, order)
            h.rmp.make_private(vmm_pfn, gfn << 12, u.PG_LEVEL_4K, vm.asid)
            return 0

        py.register(gmem_prepare=prepare)
        v.page_fault(0x3000, ENC | W)
        with pytest.raises((gmem.RmpViolation, gmem.SigBus)):      # the VMM takes SIGBUS
            h.write_user(HVA + 64 * MB, b"more")
        with pytest.raises(gmem.InvariantError, match=f"pfn {vmm_pfn:#x} is assigned to ASID {vm.asid} "
                                                      "but belongs to no guest_memfd"):
            h.check()


class TestWrongAssignment:
    """Prepare hooks that assign the page wrongly: the guest would take RMP #NPFs forever (or
    read another guest's data), and the host writes the page when it next prepares it."""

    def test_wrong_gpa(self):
        h, py, vm, f, v = snp_guest(gmem_prepare=lambda vm, gfn, pfn, order: py.prepare(vm, gfn + 1, pfn, order))
        r = v.page_fault(0x3000, ENC | W)
        with pytest.raises(gmem.InvariantError, match=f"private SPTE gfn 0x3 level 1 maps pfn {r.pfn:#x}"):
            h.check()
        vm.set_memory_attributes(0x3000, 4096, 0)          # no SPTE now: the binding still says
        vm.set_memory_attributes(0x3000, 4096, PRIVATE)
        with pytest.raises(gmem.InvariantError, match="bound at gfn 0x3 .* but assigned at gpa 0x4000 "
                                                      "\\(INV-2: wrong GPA\\)"):
            h.check()

    def test_wrong_asid(self):
        h, py, vm, f, v = snp_guest()
        py.register(gmem_prepare=lambda vm, gfn, pfn, order: h.rmp.make_private(pfn, gfn << 12, u.PG_LEVEL_4K, 77))
        r = v.page_fault(0x3000, ENC | W)
        with pytest.raises(gmem.InvariantError, match="asid=77"):
            h.check()
        vm.set_memory_attributes(0x3000, 4096, 0)
        with pytest.raises(gmem.InvariantError, match=f"pfn {r.pfn:#x} is assigned to ASID 77 but belongs to "
                                                      f"gmem inode {f.ino} \\(VM ASIDs \\[{vm.asid}\\]\\)"):
            h.check()

    def test_forgets_to_assign(self):
        """A prepare hook that returns 0 without the RMPUPDATE: where gmem tracks "prepared"
        (6.18) it marks the page prepared and never asks again (INV-4), so the guest maps an
        unassigned page (from 7.0 the next fault asks again)."""
        h, py, vm, f, v = snp_guest(prepared_tracking="gmem", gmem_prepare=lambda vm, gfn, pfn, order: 0)
        v.page_fault(0x3000, ENC | W)
        vm.set_memory_attributes(0x3000, 4096, 0)          # zap the SPTE
        with pytest.raises(gmem.InvariantError, match="index 0x3 .* is prepared for an SNP guest but not "
                                                      "RMP-assigned"):
            h.check()


# ------------------------------------------- 2. freed page still assigned in the RMP

class TestFreedPageStillAssigned:
    def test_invalidate_hook_forgets_to_make_pages_shared(self):
        h, py, vm, f, v = snp_guest(gmem_invalidate=lambda host, start, end: None)
        r = v.page_fault(0x3000, ENC | W)
        h.check()
        vm.set_memory_attributes(0x3000, 4096, 0)
        f.punch_hole(0x3000, 4096)
        with pytest.raises(gmem.InvariantError, match=f"RMP: freed pfn {r.pfn:#x} is still assigned"):
            h.check()

    def test_the_page_reused_by_another_guest(self):
        """Freed while assigned, then given to a second SNP guest's guest_memfd: check() names
        the two owners (and preparing it for the new guest wrote the old guest's page)."""
        h, py, vm, f, v = snp_guest(memory=16 * MB, gmem_invalidate=lambda host, start, end: None)
        r = v.page_fault(0x3000, ENC | W)
        f.punch_hole(0, 4 * MB)
        vm2 = h.create_vm(SNP)
        f2 = vm2.create_guest_memfd(4 * MB)
        vm2.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f2, 0)
        vm2.set_memory_attributes(0, 4 * MB, PRIVATE)
        f2.allocate(0, 4 * MB)
        assert h.folio(r.pfn)["mapping"] == f2.ino
        with pytest.raises(gmem.InvariantError, match=f"pfn {r.pfn:#x} is assigned to ASID {vm.asid} but "
                                                      f"belongs to gmem inode {f2.ino}"):
            h.check()

    def test_invalidate_hook_raises(self):
        """A hook that raises: the exception comes out of punch_hole, the folio is freed anyway
        (free_folio cannot fail), and the page is still assigned."""
        def invalidate(host, start, end):
            raise RuntimeError("firmware busy")

        h, py, vm, f, v = snp_guest(gmem_invalidate=invalidate)
        r = v.page_fault(0x3000, ENC | W)
        with pytest.raises(RuntimeError, match="firmware busy"):
            f.punch_hole(0x3000, 4096)
        assert h.folio(r.pfn) is None
        with pytest.raises(gmem.InvariantError, match="still assigned"):
            h.check()

    def test_invalidate_hook_forgets_the_2m_entry(self):
        """A hook that makes each 4K page shared but never PSMASHes the 2M entry: every
        RMPUPDATE fails (FAIL_INPUT inside a 2M entry) and the 2M folio is freed assigned."""
        def invalidate(host, start, end):
            for pfn in range(start, end):
                assert h.rmp.make_shared(pfn, u.PG_LEVEL_4K) != 0

        h, py, vm, f, v = snp_guest(huge=True, gmem_invalidate=invalidate)
        r = v.page_fault(0x200000, ENC | W)
        assert h.rmp.level(r.pfn) == u.PG_LEVEL_2M
        f.punch_hole(0x200000, MB2)
        with pytest.raises(gmem.InvariantError, match="freed pfn .* is still assigned"):
            h.check()

    def test_native_hook_frees_what_it_cannot_reclaim(self):
        """The native sev_gmem_invalidate, when RMPUPDATE fails, only warns: the folio is freed
        all the same, still assigned in the RMP, and check() names that hazard (the kernel's
        own, 6.18 to 7.2)."""
        h = gmem.Host(memory=64 * MB)
        vm = h.create_vm(SNP)
        vm.launch()
        f = vm.create_guest_memfd(4 * MB)
        vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f, 0)
        vm.set_memory_attributes(0, 4 * MB, PRIVATE)
        r = vm.create_vcpu(0).page_fault(0x3000, ENC | W)
        used = h.stats["used_pages"]
        with h.inject(rmpupdate_failures=1, rmpupdate_code=3):
            f.punch_hole(0x3000, 4096)
        assert h.rmp.leaked == [] and h.stats["used_pages"] == used - 1
        assert h.rmp.lookup(r.pfn).assigned and h.folio(r.pfn) is None
        with pytest.raises(gmem.InvariantError, match=f"freed pfn {r.pfn:#x} is still assigned"):
            h.check()


# ------------------------------------------------------ 3. stale SPTE after a punch

class TestStaleSpteAfterPunch:
    @pytest.mark.parametrize("how", ["punch", "close"])
    def test_tdx_gmem_only_slot_keeps_its_shared_spte(self, how):
        """Zapping is not a hook, so no broken hook makes a stale SPTE.  The kernel leaves one
        itself (6.18, unchanged in 7.0-rc) and the model keeps it: a TDX guest_memfd created
        with GUEST_MEMFD_FLAG_MMAP makes its memslot gmem-only (kvm_gmem_bind), so a shared
        access (GPA with the shared bit) is served from the file too (__kvm_mmu_faultin_pfn)
        and mapped in the direct root.  A punch, or the last close (kvm_gmem_release), zaps with
        kvm_gmem_get_invalidate_filter(): KVM_FILTER_PRIVATE without INIT_SHARED, which TDX
        cannot have, i.e. the mirror root only.  The private SPTE goes, the shared one keeps the
        freed page, and check() names it as that kernel gap, not as a model bug."""
        h = gmem.Host(memory=64 * MB, platform="intel")
        vm = h.create_vm(u.KVM_X86_TDX_VM)
        vm.launch()
        f = vm.create_guest_memfd(MB2, u.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(0, GMEM, 0, MB2, HVA, f, 0)
        vm.set_memory_attributes(0x2000, 4096, PRIVATE)
        v = vm.create_vcpu(0)
        shared = v.page_fault(vm.shared_gpa_bit | 0x1000, W)
        private = v.page_fault(0x2000, W)
        assert shared.ret == private.ret == u.RET_PF_FIXED
        # both pages come from the file
        assert h.folio(shared.pfn)["mapping"] == h.folio(private.pfn)["mapping"] == f.ino
        assert vm.sptes() == [(1, 1, shared.pfn, True, False), (2, 1, private.pfn, True, True)]
        assert list(vm.sept()) == [2]
        h.check()
        if how == "punch":
            f.punch_hole(0, MB2)
        else:
            f.close()
        assert h.folio(shared.pfn) is None and h.folio(private.pfn) is None    # both pages are free
        assert vm.sptes() == [(1, 1, shared.pfn, True, False)] and vm.sept() == {}
        stale = (f"SPTE gfn 0x1 level 1 pfn {shared.pfn:#x}: maps a freed page \\(stale SPTE; known kernel "
                 "gap: kvm_gmem_get_invalidate_filter\\(\\) is KVM_FILTER_PRIVATE")
        with pytest.raises(gmem.InvariantError, match=stale):
            h.check()
        if how == "close":
            # the slot stays gmem-only without its file: a shared fault is -EFAULT, never the VMM's page
            r = v.page_fault(vm.shared_gpa_bit | 0x3000, W)
            assert (r.ret, r.exit_reason, r.memory_fault) == \
                (-errno.EFAULT, u.KVM_EXIT_MEMORY_FAULT, (0, 0x3000, 4096))

    @pytest.mark.parametrize("vm_type", [u.KVM_X86_SW_PROTECTED_VM, SNP, u.KVM_X86_DEFAULT_VM])
    def test_one_root_vms_zap_the_shared_spte_of_a_gmem_only_slot(self, vm_type):
        """For contrast: without TDX's mirror root the filter picks nothing
        (kvm_gfn_range_filter_to_root_types: KVM_DIRECT_ROOTS), so the same punch zaps the shared
        SPTE of a gmem-only slot and check() passes."""
        h = gmem.Host(memory=64 * MB, platform="amd")
        vm = h.create_vm(vm_type)
        vm.launch()
        f = vm.create_guest_memfd(MB2, u.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(0, GMEM, 0, MB2, HVA, f, 0)
        r = vm.create_vcpu(0).page_fault(0x1000, W)
        assert r.ret == u.RET_PF_FIXED and h.folio(r.pfn)["mapping"] == f.ino
        assert vm.sptes() == [(1, 1, r.pfn, True, False)]
        h.check()
        f.punch_hole(0, MB2)
        assert vm.sptes() == [] and h.folio(r.pfn) is None
        h.check()

    @pytest.mark.parametrize("hook", ["gmem_prepare", "private_max_mapping_level", "is_private_fault"])
    def test_a_hook_cannot_punch_under_a_fault(self, hook):
        """The way a hook could leave a stale SPTE is to free the page the fault is about to
        map.  The fault path is protected twice: a punch from inside a hook is refused
        (EDEADLK: the kernel would deadlock on the invalidate lock), and an invalidation that
        does land between the pfn lookup and the map (vm.inject_invalidation, an mmu notifier)
        makes the fault retry instead of mapping."""
        h, py, vm, f, v = snp_guest(huge=True)
        ret = {"gmem_prepare": None, "private_max_mapping_level": u.PG_LEVEL_2M, "is_private_fault": True}[hook]

        def punching(*args):
            f.punch_hole(0, 4 * MB)
            return py.prepare(*args) if hook == "gmem_prepare" else ret

        py.register(**{hook: punching})
        with pytest.raises(OSError) as e:
            v.page_fault(0x200000, ENC | W)
        assert e.value.errno == errno.EDEADLK
        h.check()
        py.register()
        vm.inject_invalidation(0x200000, 4096)
        assert v.page_fault(0x200000, ENC | W).ret == u.RET_PF_RETRY and vm.sptes() == []
        h.check()

    def test_memory_failure_behind_a_mapping_zaps(self):
        """memory_failure on a page whose guest_memfd fd is closed (a mapping keeps the file,
        its VM and the guest's SPTEs): the model used to miss the inode and leave the SPTE to
        the poisoned page; check() now names such an SPTE, and memory_failure zaps it."""
        h = gmem.Host(memory=64 * MB)
        vm = h.create_vm(SNP)
        vm.launch()
        f = vm.create_guest_memfd(4 * MB, u.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f, 0)
        vm.set_memory_attributes(0, 4 * MB, PRIVATE)
        v = vm.create_vcpu(0)
        r = v.page_fault(0, ENC)
        m = f.mmap(4096)
        f.close()
        vm.close()
        h.check()                                          # the VM and file are still checked
        assert h.memory_failure(r.pfn) is True and vm.sptes() == []
        assert v.vm.destroyed is False
        h.check()
        m.close()
        assert vm.destroyed
        h.check()


# -------------------------------------------------- 4. 2M RMP entry over mixed 4K state

class TestMixed2M:
    def test_max_level_hook_claims_2m_over_a_4k_rmp_entry(self):
        """The hook says 2M while the RMP entry is 4K: a 2M NPT mapping over 4K RMP state
        (INV-2: the RMP page size must be >= the mapping level)."""
        h, py, vm, f, v = snp_guest(huge=True, private_max_mapping_level=lambda vm, pfn: u.PG_LEVEL_2M)
        h.rmp.make_private(0, 0, u.PG_LEVEL_4K, 99)          # pre-existing 4K state in the region
        h.rmp.make_shared(0, u.PG_LEVEL_4K)
        py.register(private_max_mapping_level=lambda vm, pfn: u.PG_LEVEL_2M,
                    gmem_prepare=lambda vm, gfn, pfn, order: py.prepare(vm, gfn, pfn, 0))   # 4K only
        r = v.page_fault(0x200000, ENC | W)
        assert r.level == u.PG_LEVEL_2M and h.rmp.level(r.pfn) == u.PG_LEVEL_4K
        with pytest.raises(gmem.InvariantError, match=r"private SPTE gfn 0x200 level 2 maps pfn .* \(level 1\)"):
            h.check()

    def test_prepare_hook_makes_a_2m_entry_for_a_4k_folio(self):
        """A 2M RMPUPDATE at ALIGN_DOWN(pfn, 512) for a 4K folio: the entry covers 511 pages
        the guest does not own (here free ones) and gives the faulting page the GPA of the 2M
        head: check() finds the private SPTE over it, or else the freed pages it assigns."""
        def prepare(vm, gfn, pfn, order):
            assert order == 0
            return h.rmp.make_private(pfn & ~511, (gfn & ~511) << 12, u.PG_LEVEL_2M, vm.asid)

        h, py, vm, f, v = snp_guest(gmem_prepare=prepare)
        h.mmap_user(HVA + 64 * MB, 2 * MB)               # the VMM's pages: the guest's next
        h.write_user(HVA + 64 * MB, bytes(2 * MB))       # folio lies past the VMSA's 2M range
        r = v.page_fault(0x3000, ENC | W)
        assert h.rmp.level(r.pfn) == u.PG_LEVEL_2M
        with pytest.raises(gmem.InvariantError, match=r"pagesize=1.*level 2|freed pfn .* is still "
                           r"assigned|private SPTE gfn 0x3 .*\(level 2\)"):
            h.check()
        vm.set_memory_attributes(0x3000, 4096, 0)            # zap the SPTE: the RMP side shows
        with pytest.raises(gmem.InvariantError, match="freed pfn .* is still assigned|bound at gfn 0x3|belongs to no guest_memfd"):
            h.check()

    def test_rmpupdate_refuses_2m_over_4k_entries(self):
        """The mixed state itself, a 2M entry over live 4K entries, cannot be made: RMPUPDATE
        answers FAIL_INPUT (the kernel's rmpupdate() -EFAULT) unless the 512 entries are what a
        PSMASH left.  A hook trying it only gets the failure, and check() stays clean."""
        tried = []

        def prepare(vm, gfn, pfn, order):
            r = py.prepare(vm, gfn, pfn, 0)                 # 4K entry for the faulting page
            tried.append(h.rmp.make_private(pfn & ~511, (gfn & ~511) << 12, u.PG_LEVEL_2M, vm.asid))
            return r

        h, py, vm, f, v = snp_guest(gmem_prepare=prepare)
        r = v.page_fault(0x200000, ENC | W)
        assert tried == [-errno.EFAULT] and h.rmp.level(r.pfn) == u.PG_LEVEL_4K
        assert h.rmp.rmpupdate(r.pfn, assigned=True, pagesize=1, gpa=0x200000, asid=vm.asid) == 1
        assert r.level == u.PG_LEVEL_4K                     # the native level hook reads 4K
        h.check()


# --------------------------------------------------- 5. leaked or double-freed folio

class TestLeakedOrDoubleFreedFolio:
    """Not provokable through the public API: folios are allocated and freed only by
    guest_memfd's own paths (kvm_gmem_get_folio, truncation, release).  Hooks see pfn ranges,
    never folios, and cannot free anything: a hook that tries to free what the path calling it
    holds is refused (EDEADLK).  A page the invalidate hook cannot give back is leaked on
    purpose and recorded (rmp.leaked, PG_leaked), a poisoned page is kept (PG_hwpoison); check()
    accepts only those.  These tests push on the nearest edges."""

    def test_every_double_free_attempt_is_refused(self):
        h, py, vm, f, v = snp_guest(huge=True)
        v.page_fault(0x200000, ENC | W)
        used = h.stats["used_pages"]
        f.punch_hole(0x200000, MB2)
        f.punch_hole(0x200000, MB2)                         # nothing left to free
        f.punch_hole(0x201000, 4096)
        assert h.stats["used_pages"] == used - 512
        d = f.dup()
        f.close()
        f.close()
        d.close()
        vm.close()
        vm.close()
        h.check()
        assert h.stats["used_pages"] == h.stats["folios"] == 0 and h.rmp.assigned() == []
        pm = gmem.PhysMem(16 * MB)                          # the allocator refuses it outright
        p = pm.alloc(0)
        pm.free(p, 0)
        with pytest.raises(OSError, match="double free"):
            pm.free(p, 0)
        pm.check()

    def test_hook_that_frees_under_prepare_neither_leaks_nor_double_frees(self):
        def prepare(vm, gfn, pfn, order):
            f.punch_hole(0, 4 * MB)                        # would free the folio being prepared
            return 0

        h, py, vm, f, v = snp_guest(gmem_prepare=prepare)
        free = h.nr_free_pages
        with pytest.raises(OSError):
            v.page_fault(0x3000, ENC | W)
        py.register()
        f.close()
        vm.close()
        h.check()
        assert h.nr_free_pages >= free and h.stats["folios"] == 0

    def test_failed_reclaims_and_poison_are_exact(self):
        """Failed reclaims (native hook, injected RMPUPDATE failures) free their pages still
        assigned, which check() names; a poisoned page is the only one that does not come back,
        and host memory accounts for exactly it."""
        h = gmem.Host(memory=64 * MB)
        vm = h.create_vm(SNP)
        vm.launch()
        f = vm.create_guest_memfd(4 * MB)
        vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f, 0)
        vm.set_memory_attributes(0, 4 * MB, PRIVATE)
        out = vm.page_fault_batch(np.arange(64, dtype=np.uint64) << 12, np.full(64, ENC | W, np.uint64))
        assert (out["ret"] == u.RET_PF_FIXED).all()
        h.memory_failure(int(out["pfn"][5]))
        with h.inject(rmpupdate_failures=3, rmpupdate_code=3):
            f.punch_hole(0, 4 * MB)
        f.close()
        vm.close()
        stale = [p for p in h.rmp.assigned() if h.folio(p) is None]
        assert len(stale) == 3 and h.rmp.leaked == []
        with pytest.raises(gmem.InvariantError, match="is still assigned"):
            h.check()
        assert h.stats["used_pages"] == h.stats["folios"] == 1        # the poisoned page
