"""Intel TDX private memory: the TD build (INIT_MEM_REGION, FINALIZE), AUG and ACCEPT, MapGPA
conversions and the shared-bit alias.  Rules from arch/x86/kvm/vmx/tdx.c (tdx_sept_set_private_spte,
tdx_gmem_post_populate, tdx_handle_ept_violation) and the TDX module's ABI.  The TD's life is
gated as tdx.c gates it: vCPUs only between INIT_VM and FINALIZE, KVM_RUN only after both
INIT_VCPU and FINALIZE; an access to an unaccepted page kills the VM (6.16 to 7.2)."""
import errno

import numpy as np
import pytest

import gmem
from gmem import uapi as u

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
HVA = 0x7F0000000000
SRC = 0x7E0000000000
MB2 = 2 << 20
HC = 1 << u.KVM_HC_MAP_GPA_RANGE


def td(size=8 << 20, gpaw=52, init=True, private=True, **hostkw):
    """A TD with one gmem slot and vCPU 0. init: being built (KVM_TDX_INIT_VM with gpaw, the
    vCPU KVM_TDX_INIT_VCPU'd; FINALIZE lets it run); else launched at once (vm.launch())."""
    h = gmem.Host(memory=1 << 30, platform="intel", **hostkw)
    h.mmap_user(SRC, 1 << 20)                   # the VMM's buffer for the TD's initial image
    vm = h.create_vm(u.KVM_X86_TDX_VM)
    if init:
        vm.tdx_init_vm(gpaw)
    else:
        vm.launch()
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, HVA, f, 0)
    if private:
        vm.set_memory_attributes(0, size, PRIVATE)
    v = vm.create_vcpu(0)
    if init:
        v.tdx_init_vcpu()
    return h, vm, f, v


def states(vm):
    return {gfn: st for gfn, (pfn, st) in vm.sept().items()}


class TestBuild:
    def test_init_vm(self):
        h = gmem.Host(memory=64 << 20, platform="intel")
        vm = h.create_vm(u.KVM_X86_TDX_VM)
        assert vm.td_state == "uninitialized" and vm.shared_gpa_bit == 0    # tdx_vm_init
        vm.tdx_init_vm(48)
        assert vm.td_state == "initialized"
        assert vm.shared_gpa_bit == 1 << 47 == u.TDX_SHARED_BIT_PWL_4 << 12
        for bad in (48, 52):
            with pytest.raises(OSError) as e:
                vm.tdx_init_vm(bad)                # once only
            assert e.value.errno == errno.EINVAL
        vm2 = h.create_vm(u.KVM_X86_TDX_VM)
        with pytest.raises(OSError):
            vm2.tdx_init_vm(50)
        vm2.tdx_init_vm(52)
        assert vm2.shared_gpa_bit == 1 << 51 == u.TDX_SHARED_BIT_PWL_5 << 12
        assert gmem.Host(memory=64 << 20, platform="amd").create_vm(u.KVM_X86_SNP_VM).td_state is None
        sw = gmem.Host(memory=64 << 20, platform="intel").create_vm(u.KVM_X86_DEFAULT_VM)
        with pytest.raises(OSError) as e:
            sw.tdx_init_vm(52)
        assert e.value.errno == errno.ENOTTY        # vt_mem_enc_ioctl: not a TD
        with pytest.raises(OSError) as e:
            sw.create_vcpu(0).tdx_init_vcpu()
        assert e.value.errno == errno.EINVAL        # vt_vcpu_mem_enc_ioctl: not a TD's vCPU
        h.check()

    def test_the_build_gates_vcpus_and_kvm_run(self):
        """tdx_vcpu_create: vCPUs only while the TD is being built (-EIO before INIT_VM and
        after FINALIZE); tdx_vcpu_pre_run: KVM_RUN -EINVAL until the vCPU had INIT_VCPU and the
        TD is finalized; KVM_TDX_INIT_VCPU once per vCPU."""
        h = gmem.Host(memory=64 << 20, platform="intel")
        vm = h.create_vm(u.KVM_X86_TDX_VM)
        with pytest.raises(OSError) as e:
            vm.create_vcpu(0)
        assert e.value.errno == errno.EIO
        vm.tdx_init_vm(52)
        f = vm.create_guest_memfd(1 << 20)
        vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 1 << 20, HVA, f, 0)
        vm.set_memory_attributes(0, 1 << 20, PRIVATE)
        v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
        assert v0.page_fault(0x5000, 0).ret == -errno.EINVAL        # KVM_RUN refused: not entered
        with pytest.raises(OSError) as e:
            v0.tdx_accept(0x5000)
        assert e.value.errno == errno.EINVAL
        h.mmap_user(SRC, 4096)
        with pytest.raises(OSError) as e:
            v0.tdx_init_mem_region(SRC, 0x10000, 1)                 # the vCPU is not initialised
        assert e.value.errno == errno.EINVAL
        v0.tdx_init_vcpu()
        with pytest.raises(OSError) as e:
            v0.tdx_init_vcpu()
        assert e.value.errno == errno.EINVAL
        assert v0.tdx_init_mem_region(SRC, 0x10000, 1) == 1
        assert v0.page_fault(0x5000, 0).ret == -errno.EINVAL        # not finalized yet
        vm.tdx_finalize_vm()
        with pytest.raises(OSError) as e:
            vm.create_vcpu(2)
        assert e.value.errno == errno.EIO
        assert v0.page_fault(0x5000, 0).ret == u.RET_PF_FIXED
        assert v1.page_fault(0x6000, 0).ret == -errno.EINVAL        # never had INIT_VCPU
        assert v1.stats["pf_taken"] == 0
        with pytest.raises(OSError) as e:
            v1.tdx_init_vcpu()                                       # too late: the TD runs
        assert e.value.errno == errno.EINVAL
        h.check()

    def test_launch_stands_for_the_build(self):
        """vm.launch() does INIT_VM, INIT_VCPU for the vCPUs there are, FINALIZE_VM; vCPUs
        created after it run at once (the minimal launch stands for the whole build)."""
        h = gmem.Host(memory=64 << 20, platform="intel")
        vm = h.create_vm(u.KVM_X86_TDX_VM)
        vm.tdx_init_vm(52)
        v0 = vm.create_vcpu(0)
        vm.launch()                                 # INIT_VM done already: INIT_VCPU, FINALIZE
        f = vm.create_guest_memfd(1 << 20)
        vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 1 << 20, HVA, f, 0)
        vm.set_memory_attributes(0, 1 << 20, PRIVATE)
        v1 = vm.create_vcpu(1)
        assert v0.page_fault(0x5000, 0).ret == u.RET_PF_FIXED
        assert v1.page_fault(0x6000, 0).ret == u.RET_PF_FIXED
        with pytest.raises(OSError) as e:
            vm.launch()
        assert e.value.errno == errno.EINVAL
        h.check()

    def test_access_before_accept_kills_the_td(self):
        """tdx_handle_ept_violation: a private access to a PENDING page (SEPT_VE_DISABLE) is
        kvm_vm_dead and KVM_RUN -EIO; from then on every VM and vCPU ioctl is -EIO, while the
        guest_memfd file and close() still work (kvm_vm_ioctl, kvm_vcpu_ioctl)."""
        h, vm, f, v = td(init=False)
        assert v.page_fault(0x5000, u.PFERR_USER_MASK).ret == u.RET_PF_FIXED
        assert states(vm)[5] == "pending"
        with pytest.raises(gmem.GuestExit) as e:
            v.read(0x5000, 4)
        assert e.value.result.ret == -errno.EIO and e.value.result.exit_reason == 0
        assert v.page_fault(0x6000, 0).ret == -errno.EIO            # KVM_RUN: KVM_REQ_VM_DEAD
        out = vm.page_fault_batch(np.array([0x6000, 0x7000], np.uint64), np.zeros(2, np.uint64))
        assert list(out["ret"]) == [-errno.EIO] * 2
        for call in (lambda: v.read(0x6000, 1),
                     lambda: v.tdx_accept(0x5000), lambda: vm.create_vcpu(1),
                     lambda: vm.set_memory_attributes(0, 4096, 0), lambda: vm.create_guest_memfd(4096),
                     lambda: vm.check_extension(u.KVM_CAP_GUEST_MEMFD), lambda: v.pre_fault_memory(0, 4096)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EIO and "kvm_vm_dead" in str(e.value)
        f.punch_hole(0, 1 << 20)                    # the gmem file is not the VM
        h.check()
        vm.close()
        f.close()
        h.check()

    def test_init_mem_region_measure(self):
        """KVM_TDX_MEASURE_MEMORY_REGION extends each page into the measurement: TDH.MR.EXTEND
        per 256 bytes; without it, the pages are added unmeasured."""
        h, vm, f, v = td()
        assert v.tdx_init_mem_region(SRC, 0x10000, 2, measure=True) == 2
        assert vm.tdx_stats["mr_extend"] == 2 * 4096 // 256
        assert v.tdx_init_mem_region(SRC, 0x20000, 1) == 1
        assert vm.tdx_stats["mr_extend"] == 32 and vm.tdx_stats["page_add"] == 3

    def test_vm_launch_is_the_minimal_launch(self):
        h = gmem.Host(memory=64 << 20, platform="intel")
        vm = h.create_vm(u.KVM_X86_TDX_VM)
        vm.launch()                                  # INIT_VM, then FINALIZE_VM
        assert vm.td_state == "runnable" and vm.shared_gpa_bit == 1 << 51
        sw = h.create_vm(u.KVM_X86_DEFAULT_VM)
        sw.launch()                                  # nothing to launch
        h.check()

    def test_init_mem_region_finalize_aug_accept(self):
        h, vm, f, v = td()
        image = bytes(range(256)) * 16 * 3
        h.write_user(SRC, image)
        assert v.tdx_init_mem_region(SRC, 0x10000, 3) == 3
        # each page was premapped by kvm_tdp_map_page, then PAGE.ADDed: nothing stays premapped
        assert vm.nr_premapped == 0
        assert states(vm) == {0x10: "accepted", 0x11: "accepted", 0x12: "accepted"}
        assert vm.tdx_stats["page_add"] == 3 and vm.tdx_stats["aug"] == 0
        assert vm.stats["pages_4k"] == 3
        h.check()
        # no vCPU runs before FINALIZE (tdx_vcpu_pre_run): a fault cannot premap anything
        r = v.page_fault(0x40000, 0)
        assert (r.ret, r.exit_reason) == (-errno.EINVAL, 0) and vm.nr_premapped == 0
        assert 0x40 not in vm.sept() and vm.tdx_stats["aug"] == 0
        h.check()
        vm.tdx_finalize_vm()
        assert vm.td_state == "runnable"
        with pytest.raises(OSError) as e:
            vm.tdx_finalize_vm()
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            v.tdx_init_mem_region(SRC, 0x20000, 1)  # initial memory is fixed now
        assert e.value.errno == errno.EINVAL
        # the added pages are accepted already
        assert v.read(0x10000, len(image)) == image
        # a runtime fault AUGs: the page is PENDING until the guest accepts it
        r = v.page_fault(0x5000, u.PFERR_USER_MASK)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_4K)
        assert vm.sept()[5] == (r.pfn, "pending") and vm.tdx_stats["aug"] == 1
        assert vm.nr_premapped == 0
        h.check()
        assert v.tdx_accept(0x5000) == u.TDX_SUCCESS
        assert vm.sept()[5] == (r.pfn, "accepted")
        assert v.tdx_accept(0x5000) == 0xB0A00000000     # TDX_PAGE_ALREADY_ACCEPTED
        v.write(0x5000, b"td data")
        assert v.read(0x5000, 7) == b"td data"
        # ACCEPT of an unmapped page: its EPT violation AUGs, then it is accepted
        assert v.tdx_accept(0x6000) == u.TDX_SUCCESS
        assert states(vm)[6] == "accepted" and vm.tdx_stats["aug"] == 2
        assert vm.tdx_stats["accept"] == 2
        h.check()
        f.close()
        vm.close()
        assert vm.sept() == {}
        h.check()

    def test_init_mem_region_errors(self):
        h, vm, f, v = td(private=False)
        vm.set_memory_attributes(0, MB2, PRIVATE)
        sb = vm.shared_gpa_bit
        for src, gpa, n in ((SRC + 8, 0, 1), (SRC, 0x10, 1), (SRC, 0, 0), (SRC, sb, 1),
                            (SRC, sb - 0x1000, 2)):
            with pytest.raises(OSError) as e:
                v.tdx_init_mem_region(src, gpa, n)
            assert e.value.errno == errno.EINVAL, (src, gpa, n)
        # not private: the premapping fault exits, populate reports -EFAULT
        with pytest.raises(OSError):
            v.tdx_init_mem_region(SRC, 0x300000, 1)
        assert vm.nr_premapped == 0 and vm.sept() == {}
        # partial progress: the first page goes in, the one at the shared boundary fails
        with pytest.raises(OSError):
            v.tdx_init_mem_region(SRC, MB2 - 0x1000, 2)
        assert states(vm) == {0x1FF: "accepted"} and vm.nr_premapped == 0
        h.check()
        vm2 = h.create_vm(u.KVM_X86_TDX_VM)          # not being built: no vCPU to populate with
        with pytest.raises(OSError) as e:
            vm2.create_vcpu(0)
        assert e.value.errno == errno.EIO
        h.check()


class TestRuntime:
    def runnable(self, **kw):
        h, vm, f, v = td(**kw)
        vm.tdx_finalize_vm()
        return h, vm, f, v

    def test_private_faults_are_writes_and_4k_only(self):
        h, vm, f, v = self.runnable(huge_folios=True)
        r = v.page_fault(MB2 + 0x3000, u.PFERR_USER_MASK)      # an EPT "read"
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_4K)
        assert h.folio(r.pfn)["order"] == 9                     # the folio is 2M, the mapping 4K
        (gfn, level, pfn, writable, private), = vm.sptes()
        assert (gfn, level, writable, private) == (0x203, 1, True, True)
        out = vm.page_fault_batch(np.arange(MB2, 2 * MB2, 4096, dtype=np.uint64),
                                  np.zeros(512, dtype=np.uint64))
        assert (out["level"] == u.PG_LEVEL_4K).all()
        assert set(out["ret"]) <= {u.RET_PF_FIXED, u.RET_PF_SPURIOUS}
        assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 512)
        assert vm.tdx_stats["aug"] == 512
        h.check()

    def test_map_gpa_conversion(self):
        h, vm, f, v = self.runnable(size=8 << 20)
        sb = vm.shared_gpa_bit
        for gpa in range(0, 5 << 20, 0x40000):
            assert v.tdx_accept(gpa) == u.TDX_SUCCESS
        v.write(0x40000, b"private")
        before = dict(vm.sept())
        assert v.tdx_map_gpa(sb, 5 << 20) == u.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, HC)
        ex = v.tdx_map_gpa(sb, 5 << 20)
        # 2M chunks, the shared bit stripped from args[0], DECRYPTED because the bit was set
        assert (ex.nr, ex.args, ex.flags) == (u.KVM_HC_MAP_GPA_RANGE, (0, 512, u.KVM_MAP_GPA_RANGE_DECRYPTED),
                                              u.KVM_EXIT_HYPERCALL_LONG_MODE)
        assert vm.sept() == before and vm.get_memory_attributes(0) == PRIVATE     # INV-10
        stats0 = dict(vm.tdx_stats)
        chunks = []
        while isinstance(ex, gmem.HypercallExit):
            gpa, npages, attrs = ex.args
            chunks.append((gpa, npages, attrs))
            vm.set_memory_attributes(gpa, npages << 12, 0)     # zaps the mirror: BLOCK/TRACK/REMOVE
            f.punch_hole(gpa, npages << 12)
            h.check()
            ex = v.complete_hypercall(0)
        assert ex == u.TDVMCALL_STATUS_SUCCESS
        assert chunks == [(0, 512, 0), (MB2, 512, 0), (2 * MB2, 256, 0)]
        gone = len([g for g in before if g < (5 << 20) >> 12])
        assert gone == 20
        for op in ("block", "track", "remove"):
            assert vm.tdx_stats[op] - stats0[op] == gone
        assert vm.sept() == {} and vm.stats["pages_4k"] == 0
        # the alias now maps the VMM's shared memory
        h.write_user(HVA + 0x40000, b"shared!")
        assert v.read(sb | 0x40000, 7) == b"shared!"
        # back to private: MapGPA without the shared bit asks for ENCRYPTED
        ex = v.tdx_map_gpa(0x40000, 0x1000)
        assert ex.args == (0x40000, 1, u.KVM_MAP_GPA_RANGE_ENCRYPTED)
        vm.set_memory_attributes(0x40000, 0x1000, PRIVATE)
        assert v.complete_hypercall(0) == 0
        assert v.tdx_accept(0x40000) == u.TDX_SUCCESS
        assert v.read(0x40000, 7) == bytes(7)                  # a new page: the old contents are gone
        h.check()

    def test_map_gpa_errors(self):
        h, vm, f, v = self.runnable()
        sb = vm.shared_gpa_bit
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, HC)
        assert v.tdx_map_gpa(sb | 0x800, 0x1000) == u.TDVMCALL_STATUS_ALIGN_ERROR
        assert v.tdx_map_gpa(sb, 0x800) == u.TDVMCALL_STATUS_ALIGN_ERROR
        assert v.tdx_map_gpa(sb - 0x1000, 0x2000) == u.TDVMCALL_STATUS_INVALID_OPERAND  # crosses the bit
        assert v.tdx_map_gpa(0x1000, 0) == u.TDVMCALL_STATUS_INVALID_OPERAND
        ex = v.tdx_map_gpa(sb, 4 << 20)
        assert ex.args[1] == 512
        assert v.complete_hypercall(errno.EINVAL) == u.TDVMCALL_STATUS_INVALID_OPERAND
        with pytest.raises(OSError):
            v.complete_hypercall(0)
        h.check()

    def test_alias_faults(self):
        h, vm, f, v = self.runnable()
        sb = vm.shared_gpa_bit
        # a shared-bit access to a private gfn: a shared fault on gfn & ~shared -> exit, flags 0
        r = v.page_fault(sb | 0x5000, u.PFERR_WRITE_MASK)
        assert (r.ret, r.exit_reason) == (-errno.EFAULT, u.KVM_EXIT_MEMORY_FAULT)
        assert r.memory_fault == (0, 0x5000, 4096)
        # the private alias of the same gfn is a private fault: AUG
        r = v.page_fault(0x5000, u.PFERR_WRITE_MASK)
        assert r.ret == u.RET_PF_FIXED and states(vm)[5] == "pending"
        h.check()
        vm.set_memory_attributes(0x5000, 4096, 0)
        assert 5 not in vm.sept()
        r = v.page_fault(sb | 0x5000, u.PFERR_WRITE_MASK)
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_4K)
        (gfn, level, pfn, writable, private), = vm.sptes()
        assert (gfn, private) == (5, False)                     # memslot gfn, without the bit
        assert vm.sept() == {}
        # now the private alias is the wrong kind: a private exit at the stripped gpa
        r = v.page_fault(0x5000, 0)
        assert r.memory_fault == (u.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x5000, 4096)
        # the batch path decides the same way
        out = vm.page_fault_batch([sb | 0x5000, 0x5000, sb | 0x6000, 0x6000], [2, 2, 2, 2])
        assert list(out["ret"]) == [u.RET_PF_SPURIOUS, -errno.EFAULT, -errno.EFAULT, u.RET_PF_FIXED]
        assert list(out["gpa"][1:3]) == [0x5000, 0x6000]
        h.check()

    def test_fetch_from_shared_gpa_is_a_kvm_bug(self):
        h, vm, f, v = self.runnable(private=False)
        r = v.page_fault(vm.shared_gpa_bit | 0x5000, u.PFERR_FETCH_MASK)
        assert r.ret == -errno.EIO and vm.sptes() == []

    def test_private_retry_stays_in_kvm(self):
        """tdx_handle_ept_violation's local_retry: RET_PF_RETRY on a private GPA is retried
        inside KVM (zero-step mitigation), unlike SNP where the guest re-faults."""
        h, vm, f, v = self.runnable()
        vm.inject_invalidation(0x6000, 4096)
        r = v.page_fault(0x6000, 0)
        assert r.ret == u.RET_PF_FIXED and v.stats["pf_retry"] == 1
        assert states(vm)[6] == "pending"
        h.check()

    def test_gpaw_48(self):
        h, vm, f, v = td(gpaw=48)
        vm.tdx_finalize_vm()
        sb = vm.shared_gpa_bit
        assert sb == 1 << 47
        r = v.page_fault(sb | 0x3000, 0)
        assert r.memory_fault == (0, 0x3000, 4096)
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, HC)
        assert v.tdx_map_gpa(sb | 0x3000, 0x1000).args == (0x3000, 1, 0)
        h.check()

    def test_teardown(self):
        h, vm, f, v = self.runnable()
        for gpa in range(0, 1 << 20, 4096):
            v.tdx_accept(gpa)
        assert len(vm.sept()) == 256
        used = h.stats["used_pages"]
        vm.close()
        h.check()
        f.close()
        assert h.stats["used_pages"] == used - 256
        assert vm.tdx_stats["remove"] == 256
        h.check()


class TestGuestMemfdFlags:
    @pytest.mark.parametrize("vm_type,platform", [(u.KVM_X86_TDX_VM, "intel"), (u.KVM_X86_SNP_VM, "amd"),
                                                  (u.KVM_X86_SW_PROTECTED_VM, "amd"),
                                                  (u.KVM_X86_DEFAULT_VM, "amd")])
    def test_mmap_on_every_vm_init_shared_only_without_private_memory(self, vm_type, platform):
        """kvm_gmem_get_supported_flags (6.18): MMAP on every VM, INIT_SHARED only if
        kvm_arch_supports_gmem_init_shared(), on x86 !kvm_arch_has_private_mem().  A TDX (SNP,
        SW_PROTECTED) guest_memfd can be MMAP, which makes its memslots gmem-only, but never
        INIT_SHARED: EINVAL, checked before the size."""
        MMAP, INIT_SHARED = u.GUEST_MEMFD_FLAG_MMAP, u.GUEST_MEMFD_FLAG_INIT_SHARED
        h = gmem.Host(memory=64 << 20, platform=platform)
        vm = h.create_vm(vm_type)
        private = vm_type != u.KVM_X86_DEFAULT_VM
        assert vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS) == (MMAP if private else MMAP | INIT_SHARED)
        f = vm.create_guest_memfd(MB2, MMAP)
        assert f.flags == MMAP
        vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, MB2, HVA, f, 0)
        assert [s["flags"] for s in vm.memslots()] == [u.KVM_MEM_GUEST_MEMFD]   # GMEM_ONLY is internal
        for flags in (INIT_SHARED, MMAP | INIT_SHARED):
            if private:
                with pytest.raises(OSError, match="kvm_gmem_get_supported_flags") as e:
                    vm.create_guest_memfd(0, flags)
                assert e.value.errno == errno.EINVAL
            else:
                assert vm.create_guest_memfd(MB2, flags).flags == flags
        h.check()
