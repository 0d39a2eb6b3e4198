"""SEV-SNP: the RMP table and its instructions, and the scenarios of issue 5.

Rules from arch/x86/kvm/svm/sev.c and arch/x86/virt/svm/sev.c (the architectural ones from
the AMD APM vol. 2 §15.36).  Every scenario ends with host.check().
"""
import errno

import numpy as np
import pytest

import gmem
from gmem import uapi as u

ENC = u.PFERR_GUEST_ENC_MASK
W = u.PFERR_WRITE_MASK
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
HVA = 0x7F0000000000
MB2 = 2 << 20


def snp(size=8 << 20, memory=1 << 30, private=True, slot_gpa=0, launch=True, **hostkw):
    """A launched SNP VM with one gmem slot of `size` bytes at slot_gpa (all private by
    default) and vCPU 0; launch=False leaves it before LAUNCH_START."""
    h = gmem.Host(memory=memory, platform="amd", **hostkw)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, slot_gpa, size, HVA, f, 0)
    if private:
        vm.set_memory_attributes(slot_gpa, size, PRIVATE)
    v = vm.create_vcpu(0)
    if launch:
        vm.launch()                 # LAUNCH_START + FINISH: the vCPU gets its VMSA and runs
    return h, vm, f, v


def guest_assigned(h):
    """The RMP-assigned pages other than the vCPUs' VMSAs (a launched vCPU has one; its
    RMPUPDATE is the "+ 1" in the counts below)."""
    return [p for p in h.rmp.assigned() if not h.rmp.lookup(p).vmsa]


def private_fault(v, gpa):
    r = v.page_fault(gpa, ENC | W)
    assert r.ret == u.RET_PF_FIXED, r
    return r


# ============================================================ RMP instructions

class TestRmpupdate:
    def test_fresh_entries_are_hypervisor_owned(self):
        h = gmem.Host(memory=64 << 20)
        e = h.rmp.lookup(0x1234)
        assert e == gmem.RmpEntry(False, 0, False, False, 0, 0, False)
        assert h.rmp.level(0x1234) == u.PG_LEVEL_4K
        assert h.rmp.assigned() == [] and h.rmp.leaked == []
        with pytest.raises(ValueError):
            h.rmp.lookup(h.nr_pages + 10)
        assert gmem.Host(memory=64 << 20, platform="intel").rmp is None
        h.check()

    def test_assign_and_release_4k(self):
        h = gmem.Host(memory=64 << 20)
        assert h.rmp.rmpupdate(0x10, assigned=1, gpa=0x7000, asid=3) == u.RMPUPDATE_SUCCESS
        assert h.rmp.lookup(0x10) == gmem.RmpEntry(True, 0, False, False, 3, 0x7000, False)
        assert h.rmp.assigned() == [0x10]
        assert h.rmp.rmpupdate(0x10, assigned=0) == 0
        assert not h.rmp.lookup(0x10).assigned and h.rmp.assigned() == []
        assert h.rmp.stats["rmpupdate"] == 2
        h.check()

    def test_2m_needs_aligned_pfn_and_gpa(self):
        h = gmem.Host(memory=64 << 20)
        assert h.rmp.rmpupdate(0x201, assigned=1, pagesize=1, gpa=0x200000, asid=1) == u.RMPUPDATE_FAIL_INPUT
        assert h.rmp.rmpupdate(0x200, assigned=1, pagesize=1, gpa=0x201000, asid=1) == u.RMPUPDATE_FAIL_INPUT
        assert h.rmp.assigned() == []
        assert h.rmp.rmpupdate(0x200, assigned=1, pagesize=1, gpa=0x400000, asid=1) == 0
        assert h.rmp.lookup(0x200).pagesize == 1
        assert len(h.rmp.assigned()) == 512
        assert h.rmp.rmpupdate(0x200, assigned=0, pagesize=1) == 0
        assert h.rmp.assigned() == []
        h.check()

    def test_2m_over_mixed_4k_state_fails(self):
        h = gmem.Host(memory=64 << 20)
        assert h.rmp.rmpupdate(0x203, assigned=1, gpa=0x3000, asid=1) == 0
        assert h.rmp.rmpupdate(0x200, assigned=1, pagesize=1, gpa=0, asid=1) == u.RMPUPDATE_FAIL_INPUT
        assert h.rmp.lookup(0x200) == gmem.RmpEntry(False, 0, False, False, 0, 0, False)
        assert h.rmp.lookup(0x203).gpa == 0x3000 and h.rmp.level(0x203) == u.PG_LEVEL_4K
        # a 4K update inside a 2M entry is refused too: PSMASH comes first
        assert h.rmp.rmpupdate(0x400, assigned=1, pagesize=1, gpa=0, asid=1) == 0
        assert h.rmp.rmpupdate(0x405, assigned=0) == u.RMPUPDATE_FAIL_INPUT
        assert h.rmp.level(0x405) == u.PG_LEVEL_2M
        for pfn, size in ((0x203, 0), (0x400, 1)):
            assert h.rmp.rmpupdate(pfn, assigned=0, pagesize=size) == 0
        h.check()

    def test_2m_rebuild_over_psmashed_entries(self):
        # §3.4 PSMASH: "the host does RMPUPDATE-to-2M, which clears Validated, then the guest
        # PVALIDATEs at 2M": 512 consistent 4K entries can become one 2M entry again.
        h, vm, f, v = snp(huge_folios=True)
        r = private_fault(v, 0)
        assert r.level == u.PG_LEVEL_2M
        assert v.pvalidate(0, 1, 1) == 0
        assert h.rmp.psmash(r.pfn) == 0
        assert h.rmp.lookup(r.pfn + 7).validated
        # a bare PSMASH under a 2M NPT mapping: the mapping now exceeds the RMP size (INV-2)
        with pytest.raises(gmem.InvariantError, match="private SPTE gfn 0x0 level 2"):
            h.check()
        # not consistent: one page has another GPA
        assert h.rmp.rmpupdate(r.pfn + 9, assigned=1, gpa=0x1000, asid=vm.asid) == 0
        assert h.rmp.rmpupdate(r.pfn, assigned=1, pagesize=1, gpa=0, asid=vm.asid) == u.RMPUPDATE_FAIL_INPUT
        assert h.rmp.rmpupdate(r.pfn + 9, assigned=1, gpa=0x9000, asid=vm.asid) == 0
        assert h.rmp.rmpupdate(r.pfn, assigned=1, pagesize=1, gpa=0, asid=vm.asid) == 0
        e = h.rmp.lookup(r.pfn)
        assert e.pagesize == 1 and not e.validated and h.rmp.level(r.pfn + 7) == u.PG_LEVEL_2M
        assert h.rmp.lookup(r.pfn + 7) == gmem.RmpEntry(True, 0, False, False, vm.asid, 0x7000, False)
        assert v.pvalidate(0, 1, 1) == 0 and h.rmp.lookup(r.pfn + 511).validated
        h.check()

    def test_immutable_refuses_every_update(self):
        h = gmem.Host(memory=64 << 20)
        assert h.rmp.rmpupdate(0x20, assigned=1, immutable=True, gpa=0x1000, asid=0) == 0
        assert h.rmp.lookup(0x20).immutable
        assert h.rmp.rmpupdate(0x20, assigned=0) == u.RMPUPDATE_FAIL_PERMISSION
        assert h.rmp.rmpupdate(0x20, assigned=1, gpa=0x1000, asid=0) == u.RMPUPDATE_FAIL_PERMISSION
        # the kernel's wrapper turns any failure but FAIL_OVERLAP into -EFAULT
        assert h.rmp.make_shared(0x20, u.PG_LEVEL_4K) == -errno.EFAULT
        assert h.rmp.lookup(0x20).assigned
        # firmware-owned and tied to no gmem folio: exactly what check() must report
        with pytest.raises(gmem.InvariantError, match="0x20"):
            h.check()

    def test_validated_cleared_by_any_change_of_assignment_size_or_gpa(self):
        h, vm, f, v = snp()
        r = private_fault(v, 0x5000)
        pfn, asid = r.pfn, vm.asid

        def validate():
            assert h.rmp.rmpupdate(pfn, assigned=1, gpa=0x5000, asid=asid) in (0,)
            if not h.rmp.lookup(pfn).validated:
                assert v.pvalidate(0x5000, 0, 1) == 0
            assert h.rmp.lookup(pfn).validated

        validate()
        # the same state again: nothing moves, Validated survives
        assert h.rmp.rmpupdate(pfn, assigned=1, gpa=0x5000, asid=asid) == 0
        assert h.rmp.lookup(pfn).validated
        # another GPA
        assert h.rmp.rmpupdate(pfn, assigned=1, gpa=0x6000, asid=asid) == 0
        assert not h.rmp.lookup(pfn).validated and h.rmp.lookup(pfn).gpa == 0x6000
        validate()
        # another owner
        assert h.rmp.rmpupdate(pfn, assigned=1, gpa=0x5000, asid=asid + 1) == 0
        assert not h.rmp.lookup(pfn).validated
        validate()
        # unassign and assign again
        assert h.rmp.rmpupdate(pfn, assigned=0) == 0
        assert h.rmp.rmpupdate(pfn, assigned=1, gpa=0x5000, asid=asid) == 0
        assert not h.rmp.lookup(pfn).validated
        validate()
        h.check()

    def test_validated_cleared_by_size_change(self):
        h, vm, f, v = snp(huge_folios=True)
        r = private_fault(v, 0)
        assert v.pvalidate(0, 1, 1) == 0
        # same 2M state: kept
        assert h.rmp.rmpupdate(r.pfn, assigned=1, pagesize=1, gpa=0, asid=vm.asid) == 0
        assert h.rmp.lookup(r.pfn).validated and h.rmp.lookup(r.pfn + 3).validated
        # 2M -> 4K x 512 by PSMASH keeps it, 4K -> 2M by RMPUPDATE clears it
        assert v.pvalidate(0x3000, 0, 1) == u.PVALIDATE_FAIL_NOUPDATE      # KVM PSMASHed it
        assert h.rmp.stats["psmash"] == 1 and h.rmp.lookup(r.pfn).validated
        assert h.rmp.rmpupdate(r.pfn, assigned=1, pagesize=1, gpa=0, asid=vm.asid) == 0
        assert not h.rmp.lookup(r.pfn).validated and not h.rmp.lookup(r.pfn + 3).validated
        h.check()

    def test_kernel_wrappers_and_direct_map(self):
        h = gmem.Host(memory=64 << 20)
        # adjust_direct_map: a 4K update splits the host's 2M mapping of that region, a 2M one does not
        assert h.rmp.make_private(0x400, 0x400000, u.PG_LEVEL_2M, 2) == 0
        assert h.rmp.stats["direct_map_splits"] == 0
        assert h.rmp.make_private(0x605, 0x5000, u.PG_LEVEL_4K, 2) == 0
        assert h.rmp.stats["direct_map_splits"] == 1
        assert h.rmp.make_private(0x606, 0x6000, u.PG_LEVEL_4K, 2) == 0
        assert h.rmp.stats["direct_map_splits"] == 1        # that region is split already
        assert h.rmp.make_shared(0x400, u.PG_LEVEL_2M) == 0
        assert h.rmp.make_shared(0x605, u.PG_LEVEL_4K) == 0
        assert h.rmp.make_shared(0x606, u.PG_LEVEL_4K) == 0
        assert h.rmp.assigned() == []
        h.check()


class TestPsmash:
    def test_psmash_copies_the_head(self):
        h = gmem.Host(memory=64 << 20)
        assert h.rmp.rmpupdate(0x800, assigned=1, pagesize=1, gpa=0x40000000, asid=9) == 0
        # before: only the head's pagesize says 2M, every page is inside a 2M entry
        assert h.rmp.lookup(0x800).pagesize == 1
        assert h.rmp.lookup(0x801).pagesize == 0 and h.rmp.level(0x801) == u.PG_LEVEL_2M
        assert h.rmp.lookup(0x9FF).gpa == 0x40000000 + 511 * 4096
        assert h.rmp.psmash(0x801) == u.PSMASH_FAIL_INPUT        # not 2M aligned
        assert h.rmp.psmash(0x800) == u.PSMASH_SUCCESS
        view = h.rmp.view(0x800, 0xA00)
        assert (view["pfn"] == np.arange(0x800, 0xA00)).all()
        assert view["assigned"].all() and (view["asid"] == 9).all()
        assert (view["pagesize"] == 0).all() and not view["immutable"].any()
        assert (view["gpa"] == 0x40000000 + 4096 * np.arange(512)).all()
        assert all(h.rmp.level(p) == u.PG_LEVEL_4K for p in (0x800, 0x900, 0x9FF))
        assert h.rmp.stats["psmash"] == 1
        # a 4K entry has nothing to smash; 4K updates work now
        assert h.rmp.psmash(0x800) == u.PSMASH_FAIL_INPUT
        assert h.rmp.psmash(0x1000) == u.PSMASH_FAIL_INPUT
        for p in range(0x800, 0xA00):
            assert h.rmp.rmpupdate(p, assigned=0) == 0
        assert h.rmp.assigned() == []
        h.check()

    def test_psmash_keeps_validated(self):
        h, vm, f, v = snp(huge_folios=True)
        r = private_fault(v, MB2)
        assert v.pvalidate(MB2, 1, 1) == 0
        # a 4K PVALIDATE on the 2M entry: KVM PSMASHes, and the guest finds it validated
        assert v.pvalidate(MB2 + 0x3000, 0, 1) == u.PVALIDATE_FAIL_NOUPDATE
        assert h.rmp.stats["psmash"] == 1
        view = h.rmp.view(r.pfn, r.pfn + 512)
        assert view["validated"].all() and (view["asid"] == vm.asid).all()
        assert (view["gpa"] == MB2 + 4096 * np.arange(512)).all()
        assert (view["pagesize"] == 0).all()
        h.check()

    def test_view_dtype(self):
        h = gmem.Host(memory=64 << 20)
        view = h.rmp.view(0, 16)
        assert view.dtype == gmem.RMP_DTYPE
        assert set(view.dtype.names) == {"pfn", "assigned", "pagesize", "immutable", "validated",
                                         "vmsa", "asid", "gpa"}
        assert len(view) == 16 and not view["assigned"].any()
        assert len(h.rmp.view(5, 5)) == 0
        with pytest.raises(ValueError):
            h.rmp.view(6, 5)


class TestInjectedFailures:
    def test_overlap_is_retried_transparently(self):
        h, vm, f, v = snp()
        h.rmp.inject_rmpupdate_failures(3, u.RMPUPDATE_FAIL_OVERLAP)
        r = private_fault(v, 0x3000)
        assert h.rmp.lookup(r.pfn).assigned and h.rmp.lookup(r.pfn).gpa == 0x3000
        s = h.rmp.stats
        assert s["rmpupdate_failed"] == 3 and s["rmpupdate"] == 4 + 1
        assert vm.stats["gmem_prepare_failed"] == 0
        h.check()

    def test_inuse_fails_prepare_and_the_fault_exits(self):
        h, vm, f, v = snp()
        h.rmp.inject_rmpupdate_failures(1, u.RMPUPDATE_FAIL_INUSE)
        r = v.page_fault(0x3000, ENC | W)
        # sev_gmem_prepare: rmp_make_private failed -> -EINVAL; kvm_gmem_get_pfn fails,
        # the fault becomes a memory-fault exit
        assert r.ret == -errno.EINVAL and r.exit_reason == u.KVM_EXIT_MEMORY_FAULT
        assert r.memory_fault == (u.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x3000, 4096)
        assert guest_assigned(h) == [] and vm.stats["gmem_prepare_failed"] == 1
        assert vm.sptes() == []
        h.check()
        # the folio was not marked prepared: the next fault prepares it
        r = private_fault(v, 0x3000)
        assert h.rmp.lookup(r.pfn).assigned and vm.stats["gmem_prepare"] == 2
        h.check()

    def test_failed_reclaim_frees_the_page_still_assigned(self):
        """sev_gmem_invalidate: a failed RMPUPDATE is only a WARN_ONCE, and the folio goes back
        to the host still assigned to the guest (6.18 to 7.2): nothing is leaked, check() names
        the hazard, and a host write to the page takes an RMP violation."""
        h, vm, f, v = snp()
        r = private_fault(v, 0x3000)
        before = h.stats["used_pages"]
        h.rmp.inject_rmpupdate_failures(1, u.RMPUPDATE_FAIL_INUSE)
        vm.set_memory_attributes(0x3000, 4096, 0)
        f.punch_hole(0x3000, 4096)
        assert h.rmp.leaked == [] and h.rmp.stats["rmpupdate_failed"] == 1
        assert h.stats["used_pages"] == before - 1
        assert h.rmp.lookup(r.pfn).assigned and h.folio(r.pfn) is None
        with pytest.raises(gmem.InvariantError, match=f"freed pfn {r.pfn:#x} is still assigned"):
            h.check()
        with pytest.raises(gmem.RmpViolation):
            h.touch(r.pfn)

    def test_bad_code_refused(self):
        h = gmem.Host(memory=64 << 20)
        with pytest.raises(ValueError):
            h.rmp.inject_rmpupdate_failures(1, 0)


# =================================================================== scenarios

class TestLaunch:
    def test_no_vcpu_runs_before_launch_finish(self):
        """svm_vcpu_pre_run / pre_sev_run: an SNP vCPU has no VMSA until LAUNCH_FINISH, so
        KVM_RUN is -EINVAL (nothing faults, nothing counted); LAUNCH_START and FINISH on a VM
        that is not SNP are -ENOTTY; a second START is -EINVAL (the SNP context stays); a vCPU
        created after an explicit FINISH has no VMSA and cannot run, one created after
        vm.launch() can."""
        h, vm, f, v = snp(launch=False)
        assert v.page_fault(0x5000, ENC | W).ret == -errno.EINVAL
        assert v.stats["pf_taken"] == 0 and h.rmp.assigned() == []
        for call in (lambda: v.read(0x5000, 1, ENC), lambda: v.pvalidate(0x5000, 0, True),
                     lambda: v.psc_msr(0x5000, 2)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EINVAL and "KVM_RUN" in str(e.value)
        out = vm.page_fault_batch(np.array([0x5000, 0x6000], np.uint64), np.full(2, ENC | W, np.uint64))
        assert list(out["ret"]) == [-errno.EINVAL] * 2
        other = h.create_vm(u.KVM_X86_SW_PROTECTED_VM) if h.check_extension(
            u.KVM_CAP_VM_TYPES) & (1 << u.KVM_X86_SW_PROTECTED_VM) else h.create_vm(u.KVM_X86_DEFAULT_VM)
        for call in (other.snp_launch_start, other.snp_launch_finish):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENOTTY
        vm.snp_launch_start()
        vm.snp_launch_finish()
        assert private_fault(v, 0x5000).level == u.PG_LEVEL_4K
        with pytest.raises(OSError) as e:
            vm.snp_launch_start()
        assert e.value.errno == errno.EINVAL
        late = vm.create_vcpu(1)
        assert late.page_fault(0x6000, ENC | W).ret == -errno.EINVAL
        h2, vm2, f2, v2 = snp()                         # vm.launch(): later vCPUs run
        assert private_fault(vm2.create_vcpu(1), 0x6000).ret == u.RET_PF_FIXED
        assert len(vm2.vmsa_pfns) == 2
        h.check()
        h2.check()

    def test_launch_start_policy(self):
        """snp_launch_start: only snp_supported_policy_bits, and the must-be-one bit 17; a
        refused start changes nothing (the launch can start afterwards)."""
        h, vm, f, v = snp(launch=False)
        for policy in (0, 1 << 16, (1 << 17) | (1 << 18), (1 << 17) | (1 << 21), (1 << 17) | (1 << 63)):
            with pytest.raises(OSError) as e:
                vm.snp_launch_start(policy)
            assert e.value.errno == errno.EINVAL, hex(policy)
        vm.snp_launch_start((1 << 17) | (1 << 19) | (1 << 20) | 0xFFFF)   # MBO, DEBUG, SINGLE_SOCKET, ABI
        vm.snp_launch_finish()

    def test_vm_launch_is_the_minimal_launch(self):
        h, vm, f, v = snp(launch=False)
        with pytest.raises(OSError) as e:
            v.pre_fault_memory(0, 4096)               # pre_fault_allowed: not before the launch
        assert e.value.errno == errno.EOPNOTSUPP
        vm.launch()
        assert vm.vmsa_pfns and h.rmp.lookup(vm.vmsa_pfns[0]).vmsa
        assert v.pre_fault_memory(0, 4096) == (4096, 0)
        h.check()

    def test_launch_and_boot(self):
        h, vm, f, v = snp(size=4 << 20, private=False, launch=False)
        vm.set_memory_attributes(0, MB2, PRIVATE)          # the second 2M stay shared
        kernel = bytes(range(256)) * 32                     # two pages
        h.write_user(HVA + 0x100000, kernel)
        with pytest.raises(OSError) as e:
            vm.snp_launch_update(0, HVA + 0x100000, 8192, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        assert e.value.errno == errno.EINVAL                 # no LAUNCH_START yet
        vm.snp_launch_start()
        rmpupdates = h.rmp.stats["rmpupdate"]
        assert vm.snp_launch_update(0x10, HVA + 0x100000, 8192, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL) == \
            (0x12, HVA + 0x102000, 0)
        assert vm.snp_launch_update(0x20, 0, 4096, u.KVM_SEV_SNP_PAGE_TYPE_ZERO) == (0x21, 0, 0)
        assert h.rmp.stats["rmpupdate"] == rmpupdates + 3     # one 4K rmp_make_private per page
        assert h.rmp.stats["direct_map_splits"] == 1
        launched = {h.rmp.lookup(p).gpa: p for p in h.rmp.assigned()}
        assert sorted(launched) == [0x10000, 0x11000, 0x20000]
        for gpa, pfn in launched.items():
            # 4K, this guest's, at that GPA; made immutable, then accepted by firmware:
            # Validated set and Immutable cleared (the model's firmware, _api_snp.pxi)
            assert h.rmp.lookup(pfn) == gmem.RmpEntry(True, 0, False, True, vm.asid, gpa, False)
            with pytest.raises(gmem.RmpViolation):
                h.touch(pfn)
        digest = vm.launch_digest
        assert len(digest) == 48
        # already populated: kvm_gmem_populate's -EEXIST, reported by the ioctl as EIO
        with pytest.raises(OSError, match="EEXIST") as e:
            vm.snp_launch_update(0x10, HVA + 0x100000, 4096, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        assert e.value.errno == errno.EIO
        # not private in the attributes: -EINVAL from populate
        with pytest.raises(OSError, match="EINVAL") as e:
            vm.snp_launch_update(0x300, HVA, 4096, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        assert e.value.errno == errno.EIO
        # no vCPU runs during the launch (no VMSA before FINISH): nothing faults in or prepares
        assert v.page_fault(0x30000, ENC | W).ret == -errno.EINVAL
        assert v.stats["pf_taken"] == 0
        # (an unaligned uaddr: refused from 7.0, copied from in 6.18; test_kernel_versions.py)
        for bad in (dict(length=0), dict(length=100), dict(page_type=2), dict(flags=1)) + \
                ((dict(uaddr=HVA + 8),) if h.kernel != "6.18" else ()):
            args = dict(gfn_start=0x40, uaddr=HVA, length=4096, page_type=1)
            args.update(bad)
            with pytest.raises(OSError) as e:
                vm.snp_launch_update(**args)
            assert e.value.errno == errno.EINVAL, bad
        assert vm.launch_digest == digest                    # nothing measured by the failures
        h.check()

        v2 = vm.create_vcpu(1)
        vm.snp_launch_finish()
        assert len(vm.vmsa_pfns) == 2
        for pfn in vm.vmsa_pfns:
            e = h.rmp.lookup(pfn)
            assert e == gmem.RmpEntry(True, 0, True, True, vm.asid, u.INITIAL_VMSA_GPA, True)
            with pytest.raises(gmem.RmpViolation):
                h.touch(pfn)
        with pytest.raises(OSError) as e:
            vm.snp_launch_update(0x50, HVA, 4096, 1)
        assert e.value.errno == errno.EIO                    # the context stays; the firmware refuses
        h.check()

        # boot: launch pages need no PVALIDATE
        assert v.read(0x10000, 8192, ENC) == kernel
        assert v.read(0x20000, 16, ENC) == bytes(16)
        assert v2.read(0x11000, 4, ENC) == kernel[4096:4100]
        # a fresh private page is assigned but not validated: #VC 0x404 until PVALIDATE
        with pytest.raises(gmem.GuestFault) as e:
            v.read(0x40000, 4, ENC)
        assert e.value.code == 0x404
        assert v.pvalidate(0x40000, 0, 1) == 0
        v.write(0x40000, b"boot", ENC)
        assert v.read(0x40000, 4, ENC) == b"boot"
        # the shared half is ordinary VMM memory
        h.write_user(HVA + 0x300000, b"io")
        assert v.read(0x300000, 2, 0) == b"io"
        h.check()
        f.close()
        vm.close()
        assert h.rmp.assigned() == [] and h.rmp.leaked == []
        h.check()

    def test_each_vm_has_its_own_asid(self):
        h = gmem.Host(memory=256 << 20)
        vms = [h.create_vm(u.KVM_X86_SNP_VM) for _ in range(3)]
        assert len({vm.asid for vm in vms}) == 3 and all(vm.asid for vm in vms)
        h.check()


class TestPrivateFault:
    def test_fault_prepare_pvalidate(self):
        h, vm, f, v = snp(kernel="6.18")             # a folio is prepared once (uptodate)
        r = v.page_fault(0x5000, ENC | W)
        assert (r.ret, r.exit_reason, r.level) == (u.RET_PF_FIXED, 0, u.PG_LEVEL_4K)
        assert h.rmp.lookup(r.pfn) == gmem.RmpEntry(True, 0, False, False, vm.asid, 0x5000, False)
        assert vm.stats["gmem_prepare"] == 1 and h.rmp.stats["rmpupdate"] == 1 + 1
        assert vm.sptes() == [(5, 1, r.pfn, True, True)]
        h.check()
        with pytest.raises(gmem.GuestFault) as e:
            v.read(0x5000, 4, ENC)
        assert (e.value.vector, e.value.code) == (29, 0x404)
        assert v.pvalidate(0x5000, 1, 1) == u.PVALIDATE_FAIL_INPUT           # 2M, misaligned
        assert v.pvalidate(0, 1, 1) == u.PVALIDATE_FAIL_SIZEMISMATCH          # 2M on a 4K entry
        assert vm.stats["gmem_prepare"] == 2                                   # gpa 0 faulted in
        assert v.pvalidate(0x5000, 0, 1) == 0
        assert h.rmp.lookup(r.pfn).validated
        assert v.pvalidate(0x5000, 0, 1) == u.PVALIDATE_FAIL_NOUPDATE
        v.write(0x5ff0, b"secret", ENC)
        assert v.read(0x5ff0, 6, ENC) == b"secret"
        # the same fault again: the page is mapped, prepare is not repeated
        assert v.page_fault(0x5000, ENC | W).ret == u.RET_PF_SPURIOUS
        assert vm.stats["gmem_prepare"] == 2
        assert v.pvalidate(0x5000, 0, 0) == 0 and not h.rmp.lookup(r.pfn).validated
        assert v.pvalidate(0x5000, 0, 0) == u.PVALIDATE_FAIL_NOUPDATE
        with pytest.raises(gmem.GuestFault):
            v.read(0x5000, 1, ENC)
        h.check()

    def test_rmpadjust(self):
        h, vm, f, v = snp()
        r = private_fault(v, 0x8000)
        assert v.rmpadjust(0x8000, 0, 0 | (0x3 << 8)) == u.RMPADJUST_FAIL_PERMISSION   # VMPL0
        assert v.rmpadjust(0x8000, 0, 1 | (0x2 << 8)) == u.RMPADJUST_FAIL_INPUT        # W without R
        assert v.rmpadjust(0x8000, 0, 1 | (0x3 << 8)) == 0
        assert v.rmpadjust(0x8000, 0, 1 | u.RMPADJUST_VMSA_PAGE_BIT) == 0
        assert h.rmp.lookup(r.pfn).vmsa
        h.check()

    def test_non_snp_guest_has_no_pvalidate(self):
        h = gmem.Host(memory=64 << 20)
        vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        with pytest.raises(OSError):
            vm.create_vcpu(0).pvalidate(0, 0, 1)


class TestConversion:
    def test_implicit_conversion_to_shared(self):
        h, vm, f, v = snp()
        r = private_fault(v, 0x5000)
        assert v.pvalidate(0x5000, 0, 1) == 0
        v.write(0x5000, b"private", ENC)
        # the guest touches it as shared (C=0): a shared fault on a private gfn
        with pytest.raises(gmem.GuestExit) as e:
            v.read(0x5000, 4, 0)
        res = e.value.result
        assert (res.ret, res.exit_reason) == (-errno.EFAULT, u.KVM_EXIT_MEMORY_FAULT)
        assert res.memory_fault == (0, 0x5000, 4096)
        assert h.rmp.lookup(r.pfn).assigned           # nothing changed by the exit itself
        # userspace: attributes shared, punch the private page
        vm.set_memory_attributes(0x5000, 4096, 0)
        assert vm.sptes() == []                        # the private SPTE went with the attributes
        h.check()
        f.punch_hole(0x5000, 4096)
        assert h.rmp.lookup(r.pfn) == gmem.RmpEntry(False, 0, False, False, 0, 0, False)
        h.touch(r.pfn)                                 # the host may write it again
        h.write_user(HVA + 0x5000, b"shared")
        assert v.read(0x5000, 6, 0) == b"shared"
        (gfn, level, pfn, writable, private), = vm.sptes()
        assert (gfn, level, private) == (5, 1, False)
        assert h.rmp.stats["rmp_violations"] == 0
        h.check()
        # and back to private: a new page, prepared again, unvalidated
        vm.set_memory_attributes(0x5000, 4096, PRIVATE)
        with pytest.raises(gmem.GuestFault) as e:
            v.read(0x5000, 4, ENC)
        assert e.value.code == 0x404
        assert v.pvalidate(0x5000, 0, 1) == 0
        assert v.read(0x5000, 7, ENC) == bytes(7)      # the old contents are gone
        h.check()

    def test_private_access_to_shared_gfn_exits_private(self):
        h, vm, f, v = snp(private=False)
        r = v.page_fault(0x2000, ENC | W)
        assert r.exit_reason == u.KVM_EXIT_MEMORY_FAULT
        assert r.memory_fault == (u.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x2000, 4096)
        assert guest_assigned(h) == []
        h.check()


class TestHugeFolio:
    def test_2m_folio_2m_rmp_then_4k_pvalidate_psmash(self):
        h, vm, f, v = snp(huge_folios=True)
        r = v.page_fault(MB2 + 0x5000, ENC | W)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_2M)
        head = r.pfn
        assert head % 512 == 0
        assert h.rmp.lookup(head) == gmem.RmpEntry(True, 1, False, False, vm.asid, MB2, False)
        assert h.rmp.lookup(head + 5).pagesize == 0 and h.rmp.level(head + 5) == u.PG_LEVEL_2M
        assert h.rmp.lookup(head + 5).gpa == MB2 + 0x5000
        # (+ 1: the VMSA's RMPUPDATE, which split the direct map)
        assert h.rmp.stats["rmpupdate"] == 1 + 1 and h.rmp.stats["direct_map_splits"] == 0 + 1
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (1, 0)
        h.check()
        # the guest validates 4K: RMP|SIZEM #NPF, KVM PSMASHes and zaps, the retry maps 4K
        assert v.pvalidate(MB2 + 0x5000, 0, 1) == 0
        s = h.rmp.stats
        assert (s["psmash"], s["rmp_faults"]) == (1, 1)
        assert all(h.rmp.level(head + i) == u.PG_LEVEL_4K for i in (0, 5, 511))
        assert h.rmp.lookup(head + 5).validated and not h.rmp.lookup(head + 6).validated
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 1)
        assert vm.sptes() == [(0x205, 1, head + 5, True, True)]
        h.check()
        # the rest of the 2M, page by page: no more PSMASH
        for off in range(0, MB2, 0x1000):
            assert v.pvalidate(MB2 + off, 0, 1) in (0, u.PVALIDATE_FAIL_NOUPDATE)
        assert h.rmp.stats["psmash"] == 1
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 512)
        assert h.rmp.view(head, head + 512)["validated"].all()
        h.check()

    def test_2m_pvalidate_on_2m_entry(self):
        h, vm, f, v = snp(huge_folios=True)
        r = private_fault(v, 0)
        assert v.pvalidate(0, 1, 1) == 0
        assert v.read(0x1ff000, 4, ENC) == bytes(4)
        assert (vm.stats["pages_2m"], h.rmp.stats["psmash"]) == (1, 0)
        h.check()

    def test_release_and_destroy_leave_nothing_assigned(self):
        h, vm, f, v = snp(size=8 << 20, huge_folios=True)
        private_fault(v, 0)                              # 2M entry
        r = private_fault(v, MB2)                        # 2M entry, then PSMASHed
        assert v.pvalidate(MB2 + 0x1000, 0, 1) == 0
        vm.set_memory_attributes(4 << 20, 4 << 20, 0)
        vm.set_memory_attributes(4 << 20, 4096, PRIVATE)
        r = private_fault(v, 4 << 20)                    # a mixed 2M range: 2M folio and RMP,
        assert r.level == u.PG_LEVEL_4K                  # but a 4K mapping
        assert h.rmp.level(r.pfn) == u.PG_LEVEL_2M
        assert len(guest_assigned(h)) == 3 * 512
        h.check()
        f2 = f.dup()
        f.close()
        assert len(guest_assigned(h)) == 3 * 512         # the file is still open through f2
        f2.close()                                       # release: the inode is evicted
        assert guest_assigned(h) == [] and h.rmp.leaked == []
        assert vm.sptes() == []
        h.check()
        vm.close()
        assert h.rmp.assigned() == []
        h.check()

    def test_destroying_the_vm_first(self):
        h, vm, f, v = snp(huge_folios=True)
        private_fault(v, 0)
        private_fault(v, 0x200000 + 0x3000)             # and snp()'s launch made a VMSA page
        assert len(h.rmp.assigned()) == 2 * 512 + 1
        vm.close()                                       # the gmem file keeps the VM alive
        assert len(h.rmp.assigned()) == 2 * 512 + 1
        h.check()
        f.close()                                        # last reference: kvm_destroy_vm
        assert h.rmp.assigned() == [] and h.rmp.leaked == []
        h.check()


class TestHostAccess:
    def test_host_write_to_private_page_raises(self):
        h, vm, f, v = snp()
        r = private_fault(v, 0x1000)
        with pytest.raises(gmem.RmpViolation):
            h.touch(r.pfn)
        h.touch(r.pfn, write=False)                      # reads see ciphertext, no fault
        assert h.rmp.stats["rmp_violations"] == 1
        h.check()

    def test_2m_direct_map_semantics(self):
        h = gmem.Host(memory=64 << 20)
        # the bare instruction leaves the host's 2M direct map alone: the neighbours fault too
        assert h.rmp.rmpupdate(0x405, assigned=1, gpa=0x5000, asid=1) == 0
        for pfn in (0x405, 0x406, 0x400, 0x5FF):
            with pytest.raises(gmem.RmpViolation):
                h.touch(pfn)
        h.touch(0x600)                                   # another 2M region
        # rmp_make_private splits the direct map first (adjust_direct_map)
        assert h.rmp.make_private(0x805, 0x5000, u.PG_LEVEL_4K, 1) == 0
        assert h.rmp.stats["direct_map_splits"] == 1
        with pytest.raises(gmem.RmpViolation):
            h.touch(0x805)
        h.touch(0x806)
        h.touch(0x800)
        # a 2M entry: every page of it is assigned
        assert h.rmp.make_private(0xA00, 0x200000, u.PG_LEVEL_2M, 1) == 0
        with pytest.raises(gmem.RmpViolation):
            h.touch(0xBFF)
        assert h.rmp.stats["rmp_violations"] == 6
        for pfn, lvl in ((0x405, 1), (0x805, 1), (0xA00, 2)):
            assert h.rmp.make_shared(pfn, lvl) == 0
        h.touch(0x405)
        h.check()

    def test_gmem_never_writes_an_assigned_page(self):
        """AS_INACCESSIBLE: punching and truncating partly private huge folios never zero
        an assigned page; the direct-map split lets the freed pages be reused at once."""
        h, vm, f, v = snp(size=8 << 20, huge_folios=True)
        f.allocate(0, 8 << 20)                           # four 2M folios, unprepared
        r0 = private_fault(v, 0)                         # 2M RMP entry
        r1 = private_fault(v, MB2)
        assert v.pvalidate(MB2 + 0x3000, 0, 1) == 0      # PSMASH: 512 4K entries
        h.check()
        # punch 4K out of each: split the folio, PSMASH where needed, make that page shared
        for gpa in (0x7000, MB2 + 0x3000, (4 << 20) + 0x1000):
            vm.set_memory_attributes(gpa, 4096, 0)
            f.punch_hole(gpa, 4096)
            h.check()
        assert h.rmp.stats["psmash"] == 2
        assert not h.rmp.lookup(r0.pfn + 7).assigned and h.rmp.lookup(r0.pfn + 8).assigned
        assert h.stats["folio_splits"] == 3
        # the freed pages come back into use as new private pages at once
        vm.set_memory_attributes(0x7000, 4096, PRIVATE)
        private_fault(v, 0x7000)
        # partial punches across folio edges, then an unaligned range
        vm.set_memory_attributes(0x1F0000, 0x20000, 0)
        f.punch_hole(0x1F0000, 0x20000)
        h.check()
        vm.set_memory_attributes(0x300000, 0x180000, 0)
        f.punch_hole(0x300000, 0x180000)
        h.check()
        # refill and fault again, then tear everything down
        vm.set_memory_attributes(0, 8 << 20, PRIVATE)
        f.allocate(0, 8 << 20)
        for gpa in range(0, 8 << 20, 0x40000):
            assert v.page_fault(gpa, ENC | W).ret in (u.RET_PF_FIXED, u.RET_PF_SPURIOUS)
        h.check()
        f.close()
        vm.close()
        assert h.rmp.assigned() == []
        assert h.rmp.stats["rmp_violations"] == 0
        h.check()


class TestPageStateChange:
    def test_msr_protocol(self):
        h, vm, f, v = snp()
        assert v.psc_msr(0x3000, u.SNP_PAGE_STATE_SHARED) == u.GHCB_MSR_PSC_RESP_ERROR   # exits off
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        ex = v.psc_msr(0x3000, u.SNP_PAGE_STATE_SHARED)
        assert isinstance(ex, gmem.HypercallExit)
        assert (ex.nr, ex.args) == (u.KVM_HC_MAP_GPA_RANGE, (0x3000, 1, u.KVM_MAP_GPA_RANGE_DECRYPTED))
        assert vm.get_memory_attributes(3) == PRIVATE    # KVM changed nothing itself (INV-10)
        assert v.complete_hypercall(0) == u.GHCB_MSR_PSC_RESP
        ex = v.psc_msr(0x4000, u.SNP_PAGE_STATE_PRIVATE)
        assert ex.args == (0x4000, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
        assert v.complete_hypercall(errno.EINVAL) == u.GHCB_MSR_PSC_RESP_ERROR
        assert v.psc_msr(0x4000, 3) == u.GHCB_MSR_PSC_RESP_ERROR                       # not 1 or 2
        with pytest.raises(OSError) as e:
            v.complete_hypercall(0)                      # nothing pending
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << 3)
        h.check()

    def test_buffer_batching(self):
        h, vm, f, v = snp()
        private_fault(v, 0x10000)
        assert v.page_state_change([dict(gfn=0x10, operation=2)]) == u.VMGEXIT_PSC_ERROR_GENERIC
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        rmp_before = h.rmp.view(0, 4096).tobytes()
        ents = [dict(gfn=0x10, operation=2), dict(gfn=0x11, operation=2), dict(gfn=0x12, operation=2),
                dict(gfn=0x13, operation=1)]
        ex = v.page_state_change(ents)
        assert ex.args == (0x10000, 3, u.KVM_MAP_GPA_RANGE_DECRYPTED)
        # userspace does the conversion
        vm.set_memory_attributes(0x10000, 3 * 4096, 0)
        f.punch_hole(0x10000, 3 * 4096)
        ex = v.complete_hypercall(0)
        assert [e["cur_page"] for e in ents] == [1, 1, 1, 0]
        assert ex.args == (0x13000, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED)
        assert v.complete_hypercall(0) == 0
        assert [e["cur_page"] for e in ents] == [1, 1, 1, 1]
        assert guest_assigned(h) == []                    # the punch made it shared
        assert h.rmp.view(0, 4096).tobytes() != rmp_before
        h.check()

    def test_2m_entries(self):
        h, vm, f, v = snp()
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        attrs0 = [vm.get_memory_attributes(g) for g in range(0, 0x800, 0x80)]
        # two adjacent 2M entries coalesce
        ents = [dict(gfn=0x200, operation=2, pagesize=1), dict(gfn=0x400, operation=2, pagesize=1)]
        ex = v.page_state_change(ents)
        assert ex.args == (0x200000, 1024, u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M)
        assert v.complete_hypercall(0) == 0
        assert [e["cur_page"] for e in ents] == [512, 512]
        # a partly done 2M entry continues as 4K pages (the size flag still says 2M)
        ents = [dict(gfn=0x200, operation=1, pagesize=1, cur_page=100), dict(gfn=0x400, operation=1)]
        ex = v.page_state_change(ents)
        assert ex.args == ((0x200 + 100) << 12, 412,
                           u.KVM_MAP_GPA_RANGE_ENCRYPTED | u.KVM_MAP_GPA_RANGE_PAGE_SZ_2M)
        # snp_begin_psc compares the next gfn with entry_start.gfn + npages: the following
        # 4K entry is not merged into the rest of a partly done 2M entry
        ex = v.complete_hypercall(0)
        assert ex.args == (0x400000, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED)
        assert v.complete_hypercall(0) == 0
        # a 4K entry after a whole 2M one does not merge either (pagesize differs)
        ents = [dict(gfn=0x200, operation=2, pagesize=1), dict(gfn=0x400, operation=2)]
        assert v.page_state_change(ents).args[1] == 512
        assert v.complete_hypercall(0).args == (0x400000, 1, 0)
        assert v.complete_hypercall(0) == 0
        assert [vm.get_memory_attributes(g) for g in range(0, 0x800, 0x80)] == attrs0
        h.check()

    def test_errors(self):
        h, vm, f, v = snp()
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        ents = [dict(gfn=0x10, operation=2), dict(gfn=0x11, operation=2)]
        assert v.page_state_change(ents).args[1] == 2
        assert v.complete_hypercall(errno.EINVAL) == u.VMGEXIT_PSC_ERROR_GENERIC
        assert [e["cur_page"] for e in ents] == [0, 0]
        assert v.page_state_change([dict(gfn=0x201, operation=2, pagesize=1)]) == \
            u.VMGEXIT_PSC_ERROR_INVALID_ENTRY
        assert v.page_state_change([dict(gfn=0x10, operation=2, cur_page=2)]) == \
            u.VMGEXIT_PSC_ERROR_INVALID_ENTRY
        assert v.page_state_change([dict(gfn=0x10, operation=2)] * 300, end_entry=253) == \
            u.VMGEXIT_PSC_ERROR_INVALID_HDR
        # PSMASH/UNSMASH requests are done without an exit; done entries are skipped
        ents = [dict(gfn=0x200, operation=3, pagesize=1), dict(gfn=0x10, operation=2, cur_page=1),
                dict(gfn=0x11, operation=2)]
        ex = v.page_state_change(ents)
        assert ex.args == (0x11000, 1, 0) and ents[0]["cur_page"] == 512
        assert v.complete_hypercall(0) == 0
        assert v.page_state_change([dict(gfn=0x10, operation=2, cur_page=1)]) == 0
        h.check()

    def test_guest_conversion_flow(self):
        """PSC to shared -> userspace converts -> the RMP changes lazily (on the punch)."""
        h, vm, f, v = snp(huge_folios=True)
        r = private_fault(v, MB2)
        assert v.pvalidate(MB2, 1, 1) == 0
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        assert v.pvalidate(MB2 + 0x8000, 0, 0) == 0       # rescind first: PSMASH on the way
        ex = v.page_state_change([dict(gfn=0x208, operation=2)])
        gpa, npages, attrs = ex.args
        assert h.rmp.lookup(r.pfn + 8).assigned
        vm.set_memory_attributes(gpa, npages << 12, 0)
        f.punch_hole(gpa, npages << 12)
        assert v.complete_hypercall(0) == 0
        assert not h.rmp.lookup(r.pfn + 8).assigned and h.rmp.lookup(r.pfn + 9).validated
        h.write_user(HVA + gpa, b"dma")
        assert v.read(gpa, 3, 0) == b"dma"
        assert v.read(MB2 + 0x9000, 1, ENC) == b"\0"
        assert h.rmp.stats["rmp_violations"] == 0
        h.check()


class TestKnownGaps:
    """Gaps found while writing these tests, fixed since: kept as regression tests."""

    def test_vmm_write_to_assigned_page_faults(self):
        h = gmem.Host(memory=64 << 20)
        h.mmap_user(HVA, 4096)
        h.write_user(HVA, b"a")
        pfn, = [p for p in range(64) if h.folio(p)]
        assert h.rmp.rmpupdate(pfn, assigned=1, gpa=0, asid=1) == 0
        with pytest.raises((gmem.RmpViolation, gmem.SigBus)):
            h.write_user(HVA, b"b")

    def test_misaligned_binding_with_huge_folios(self):
        h = gmem.Host(memory=256 << 20, huge_folios=True)
        vm = h.create_vm(u.KVM_X86_SNP_VM)
        f = vm.create_guest_memfd(MB2)
        vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0x3000, 0x10000, HVA, f, 0)
        vm.set_memory_attributes(0, 4 << 20, PRIVATE)
        v = vm.create_vcpu(0)
        vm.launch()
        r = private_fault(v, 0x5000)
        assert h.rmp.lookup(r.pfn).gpa == 0x5000
        assert v.pvalidate(0x5000, 0, 1) == 0
        h.check()

    def test_vmsa_is_never_2m_aligned(self):
        h = gmem.Host(memory=64 << 20)
        vm = h.create_vm(u.KVM_X86_SNP_VM)
        for i in range(4):
            vm.create_vcpu(i)
        vm.snp_launch_start()
        vm.snp_launch_finish()
        assert all(pfn % 512 for pfn in vm.vmsa_pfns), [hex(p) for p in vm.vmsa_pfns]
