"""The x86 TDP fault path (arch/x86/kvm/mmu/mmu.c) with guest_memfd.

Three parts:
  * one test per rule of the fault path (arch/x86/kvm/mmu/mmu.c): the error-code bits that
    matter, the synthetic bits, each memory-fault-exit trigger (kvm_mmu_prepare_memory_fault_exit), RET_PF_RETRY,
    zapping, hugepages and their demotion, the TDX shared-bit alias, the trace;
  * the kernel selftests private_mem_kvm_exits_test.c and private_mem_conversions_test.c
    (kernel-gmem.md §18.4-§18.5) re-expressed with vcpu.read/write and the VMM's memory;
  * Hypothesis streams of faults, conversions, punches, allocations, memslot changes,
    gmem closes and injected invalidations, on which the scalar path, the batch path (a
    second identical host) and the pure-Python reference (reference_fault.py) agree on
    every result, every SPTE and every counter.
"""
import errno
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import gmem
from gmem import uapi as U
from reference_fault import VCPU_COUNTERS, VM_COUNTERS, RefHost, Renaming

PAGE = 4096
M = 1 << 20
PRESENT, WRITE, USER, RSVD, FETCH = (U.PFERR_PRESENT_MASK, U.PFERR_WRITE_MASK, U.PFERR_USER_MASK,
                                     U.PFERR_RSVD_MASK, U.PFERR_FETCH_MASK)
ENC, FINAL, GPAGE = U.PFERR_GUEST_ENC_MASK, U.PFERR_GUEST_FINAL_MASK, U.PFERR_GUEST_PAGE_MASK
IMPLICIT, PRIVATE_ACCESS = U.PFERR_IMPLICIT_ACCESS, U.PFERR_PRIVATE_ACCESS
PRIVATE = U.KVM_MEMORY_ATTRIBUTE_PRIVATE
EXIT_PRIVATE = U.KVM_MEMORY_EXIT_FLAG_PRIVATE
GMEM = U.KVM_MEM_GUEST_MEMFD
SW, SNP, TDX, DEFAULT = U.KVM_X86_SW_PROTECTED_VM, U.KVM_X86_SNP_VM, U.KVM_X86_TDX_VM, U.KVM_X86_DEFAULT_VM
FIXED, SPURIOUS, EMULATE, RETRY = U.RET_PF_FIXED, U.RET_PF_SPURIOUS, U.RET_PF_EMULATE, U.RET_PF_RETRY
TDX_SHARED = 1 << 51
HVA = 0x7F0000000000
PLATFORM = {SW: "amd", SNP: "amd", DEFAULT: "amd", TDX: "intel"}


def make_vm(vm_type=SW, gmem_size=8 * M, slot_size=None, gpa=0, huge_folios=False, memory=256 * M,
            hva=HVA, **host_kw):
    """A host, a VM with one gmem-backed memslot (slot 0) at gpa, and vCPU 0."""
    host = gmem.Host(memory=memory, platform=PLATFORM[vm_type], huge_folios=huge_folios, **host_kw)
    vm = host.create_vm(vm_type)
    vm.launch()                                     # SNP/TDX run only once launched
    f = vm.create_guest_memfd(gmem_size)
    vm.set_user_memory_region2(0, GMEM, gpa, slot_size or gmem_size, userspace_addr=hva, guest_memfd=f)
    return host, vm, f, vm.create_vcpu(0)


def assert_exit(r, gpa, private, ret=-errno.EFAULT):
    """A KVM_EXIT_MEMORY_FAULT (§2.9): the page's gpa, 4096 bytes, PRIVATE iff the access was."""
    assert (r.ret, r.exit_reason, r.memory_fault, r.level, r.pfn) == \
        (ret, U.KVM_EXIT_MEMORY_FAULT, (EXIT_PRIVATE if private else 0, gpa, PAGE), 0, 0), r


def sptes(vm):
    return {gfn: (level, pfn, writable, private) for gfn, level, pfn, writable, private in vm.sptes()}


# ---------------------------------------------------------------- §1.1 constants

def test_error_code_bits_are_the_kernels():
    assert [PRESENT, WRITE, USER, RSVD, FETCH, U.PFERR_PK_MASK] == [1 << i for i in range(6)]
    assert U.PFERR_GUEST_RMP_MASK == 1 << 31 and FINAL == 1 << 32 and GPAGE == 1 << 33
    assert ENC == 1 << 34 and U.PFERR_GUEST_SIZEM_MASK == 1 << 35 and U.PFERR_GUEST_VMPL_MASK == 1 << 36
    assert (IMPLICIT, PRIVATE_ACCESS) == (1 << 48, 1 << 49)
    assert U.PFERR_SYNTHETIC_MASK == IMPLICIT | PRIVATE_ACCESS
    assert U.PFERR_SYNTHETIC_MASK & 0xFFFFFFFF == 0       # BUILD_BUG_ON in kvm_handle_page_fault
    assert (U.RET_PF_CONTINUE, RETRY, EMULATE, U.RET_PF_WRITE_PROTECTED, U.RET_PF_INVALID, FIXED,
            SPURIOUS) == tuple(range(7))


# ------------------------------------------------------------- §2.1-2.2 who is private

def test_sw_protected_private_iff_the_attribute_says_so():
    host, vm, f, vcpu = make_vm()
    vm.set_memory_attributes(0x1000, PAGE, PRIVATE)
    shared, private = vcpu.page_fault(0x0, WRITE), vcpu.page_fault(0x1000, WRITE)
    assert (shared.ret, private.ret) == (FIXED, FIXED)
    assert sptes(vm)[0][3] is False and sptes(vm)[1][3] is True
    # the private page is guest_memfd's, the shared one the VMM's
    assert host.folio(private.pfn)["mapping"] == f.ino
    assert host.folio(shared.pfn)["mapping"] == 0
    # PFERR_GUEST_ENC means nothing to a SW_PROTECTED VM
    assert vcpu.page_fault(0x2000, WRITE | ENC).ret == FIXED and not sptes(vm)[2][3]
    host.check()


def test_snp_private_iff_guest_enc():
    host, vm, f, vcpu = make_vm(SNP)
    vm.set_memory_attributes(0, 2 * PAGE, PRIVATE)
    assert vcpu.page_fault(0x0, WRITE | ENC).ret == FIXED and sptes(vm)[0][3]
    assert_exit(vcpu.page_fault(0x1000, WRITE), 0x1000, private=False)     # C=0 on a private page
    assert_exit(vcpu.page_fault(0x2000, WRITE | ENC), 0x2000, private=True)  # C=1 on a shared page
    assert vcpu.page_fault(0x2000, WRITE).ret == FIXED and not sptes(vm)[2][3]
    host.check()


def test_default_vm_is_never_private():
    host, vm, f, vcpu = make_vm(DEFAULT)
    for ec in (WRITE, WRITE | ENC, WRITE | PRIVATE_ACCESS):
        assert vcpu.page_fault(0x3000, ec).ret in (FIXED, SPURIOUS)
    assert sptes(vm) == {3: (1, sptes(vm)[3][1], True, False)}
    with pytest.raises(OSError) as e:
        vm.set_memory_attributes(0, PAGE, PRIVATE)
    assert e.value.errno == errno.EINVAL


def test_tdx_shared_bit_alias():
    """§4.1/§6.4.7: gpa | bit 51 is the shared alias of gpa: shared, the memslot lookup and the
    SPTE use the gfn without the bit, and memory-fault exits report it without the bit."""
    host, vm, f, vcpu = make_vm(TDX, huge_folios=True)
    vm.set_memory_attributes(0, 2 * M, PRIVATE)
    r = vcpu.page_fault(0x5000, 0)                       # no shared bit: private, 4K only (TDX)
    assert (r.ret, r.level) == (FIXED, 1)
    assert sptes(vm)[5] == (1, r.pfn, True, True)
    assert_exit(vcpu.page_fault(TDX_SHARED | 0x5123, WRITE), 0x5000, private=False)
    vm.set_memory_attributes(0x5000, PAGE, 0)
    assert 5 not in sptes(vm)                            # the private leaf went with the conversion
    r = vcpu.page_fault(TDX_SHARED | 0x5000, WRITE)
    assert (r.ret, r.level) == (FIXED, 1) and sptes(vm)[5] == (1, r.pfn, True, False)
    assert host.folio(r.pfn)["mapping"] == 0             # the VMM's page
    assert_exit(vcpu.page_fault(0x5000, WRITE), 0x5000, private=True)
    assert vm.stats["memory_fault_exits"] == 2
    host.check()


# ----------------------------------------------------------- the error-code bits

def test_present_write_fault_on_a_mapped_page_takes_the_fast_path():
    host, vm, f, vcpu = make_vm()
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    first = vcpu.page_fault(0, WRITE)
    assert first.ret == FIXED
    # PRESENT | WRITE: page_fault_can_be_fast -> fast_page_fault finds the SPTE -> spurious
    r = vcpu.page_fault(0, PRESENT | WRITE)
    assert (r.ret, r.pfn, r.level) == (SPURIOUS, first.pfn, 1)
    assert vcpu.stats["pf_fast"] == 1 and vcpu.stats["pf_spurious"] == 1
    # PRESENT without WRITE, or not PRESENT: never fast (A/D bits on), the slow path says spurious
    for ec in (PRESENT, WRITE, 0, PRESENT | FETCH, USER):
        assert vcpu.page_fault(0, ec).ret == SPURIOUS
    assert vcpu.stats["pf_fast"] == 1 and vcpu.stats["pf_spurious"] == 6
    assert vcpu.stats["pf_taken"] == 7 and vcpu.stats["pf_fixed"] == 1


def test_fast_path_not_taken_on_an_attribute_mismatch():
    """page_fault_can_be_fast: a private/shared mismatch must reach the memory-fault exit,
    not spin on RET_PF_SPURIOUS."""
    host, vm, f, vcpu = make_vm(SNP)
    assert vcpu.page_fault(0, WRITE).ret == FIXED                        # shared mapping
    assert_exit(vcpu.page_fault(0, PRESENT | WRITE | ENC), 0, private=True)
    assert vcpu.stats["pf_fast"] == 0


def test_fetch_and_user_bits_change_nothing():
    host, vm, f, vcpu = make_vm()
    for i, ec in enumerate((FETCH, USER, USER | FETCH, FINAL, GPAGE, FINAL | GPAGE | 1 << 40)):
        r = vcpu.page_fault(i * PAGE, ec)
        assert (r.ret, r.level) == (FIXED, 1)


def test_synthetic_bits_from_hardware_are_cleared_and_counted():
    """npf_interception: WARN_ON_ONCE(error_code & PFERR_SYNTHETIC_MASK), then clear them."""
    host, vm, f, vcpu = make_vm()
    host.trace.enable("kvm_page_fault")
    r = vcpu.page_fault(0x1000, WRITE | PRIVATE_ACCESS)     # a shared page: PRIVATE_ACCESS ignored
    assert r.ret == FIXED and sptes(vm)[1][3] is False
    assert vcpu.page_fault(0x2000, WRITE | IMPLICIT | PRIVATE_ACCESS).ret == FIXED
    assert vcpu.page_fault(0x3000, WRITE).ret == FIXED
    assert vcpu.stats["synthetic_error_bits_cleared"] == 2
    assert list(host.trace.to_numpy()["b"]) == [WRITE] * 3


def test_rsvd_fault_is_an_mmio_spte_hit():
    """§2.3/§2.14: an RSVD fault is KVM's own MMIO SPTE: emulate without counting the fault
    (goto emulate); never private; no MMIO SPTE there (zapped) means fault again."""
    host, vm, f, vcpu = make_vm(slot_size=4 * M)
    mmio = 6 * M                                             # no memslot there
    assert vcpu.page_fault(mmio, WRITE).ret == EMULATE       # kvm_handle_noslot_fault: MMIO SPTE
    assert (vcpu.stats["pf_taken"], vcpu.stats["pf_emulate"]) == (1, 1)
    assert vcpu.page_fault(mmio + 8, RSVD | PRESENT | WRITE).ret == EMULATE
    assert (vcpu.stats["pf_taken"], vcpu.stats["pf_emulate"]) == (1, 1)
    # an RSVD fault where no MMIO SPTE is: handle_mmio_page_fault's RET_PF_RETRY
    assert vcpu.page_fault(mmio + PAGE, RSVD | PRESENT).ret == RETRY
    # SW_PROTECTED never makes an RSVD fault private, even on a private gfn
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    assert vcpu.page_fault(0, RSVD | PRESENT).ret == RETRY
    assert vcpu.stats["memory_fault_exits"] == 0 and vcpu.stats["pf_taken"] == 1
    # a memslot created over an MMIO SPTE makes it stale: the slow path maps the page
    f2 = vm.create_guest_memfd(M)
    vm.set_user_memory_region2(1, GMEM, mmio, M, userspace_addr=HVA + 6 * M, guest_memfd=f2)
    r = vcpu.page_fault(mmio, RSVD | PRESENT | WRITE)
    assert (r.ret, r.level) == (FIXED, 1) and vcpu.stats["pf_taken"] == 2
    host.check()


def test_rsvd_private_fault_is_efault_without_an_exit():
    """§2.3: WARN_ON_ONCE(error_code & PFERR_PRIVATE_ACCESS) -> -EFAULT, no memory-fault exit."""
    host, vm, f, vcpu = make_vm(SNP)
    r = vcpu.page_fault(0x1000, RSVD | ENC | PRESENT)
    assert (r.ret, r.exit_reason, r.memory_fault) == (-errno.EFAULT, 0, None)
    assert vcpu.stats["pf_taken"] == 0 and vcpu.stats["memory_fault_exits"] == 0


def test_write_to_a_readonly_memslot_is_emulated():
    """KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn -> RET_PF_EMULATE; reads map read-only."""
    host = gmem.Host(memory=64 * M, platform="amd")
    vm = host.create_vm(SW)
    vm.set_user_memory_region2(0, U.KVM_MEM_READONLY, 0, M, userspace_addr=HVA)
    vcpu = vm.create_vcpu(0)
    assert vcpu.page_fault(0, WRITE).ret == EMULATE and sptes(vm) == {}
    r = vcpu.page_fault(0, 0)
    assert r.ret == FIXED and sptes(vm)[0] == (1, r.pfn, False, False)
    assert vcpu.page_fault(0, PRESENT | WRITE).ret == EMULATE     # the fast path cannot fix it
    assert vcpu.stats["pf_fast"] == 0 and vcpu.stats["pf_emulate"] == 2


# -------------------------------------------------- §2.9 memory-fault exit triggers

def test_exit_1_attribute_mismatch_reports_the_page_not_the_address():
    host, vm, f, vcpu = make_vm(SNP)
    vm.set_memory_attributes(0x7000, PAGE, PRIVATE)
    assert_exit(vcpu.page_fault(0x7ABC, WRITE), 0x7000, private=False)
    assert_exit(vcpu.page_fault(0x8ABC, ENC), 0x8000, private=True)
    assert vcpu.stats["memory_fault_exits"] == 2 and sptes(vm) == {}


def test_exit_2_private_fault_without_a_memslot():
    host, vm, f, vcpu = make_vm(slot_size=M)
    vm.set_memory_attributes(2 * M, PAGE, PRIVATE)           # no memslot at 2M
    assert_exit(vcpu.page_fault(2 * M, WRITE), 2 * M, private=True)
    assert vcpu.page_fault(2 * M + PAGE, WRITE).ret == EMULATE   # shared: MMIO
    host2, vm2, f2, vcpu2 = make_vm(SNP, slot_size=M)
    vm2.set_memory_attributes(2 * M, PAGE, PRIVATE)
    assert_exit(vcpu2.page_fault(2 * M, ENC), 2 * M, private=True)


def test_exit_3_private_fault_on_a_memslot_without_gmem():
    host = gmem.Host(memory=64 * M, platform="amd")
    vm = host.create_vm(SW)
    vm.set_user_memory_region2(0, 0, 0, M, userspace_addr=HVA)
    vcpu = vm.create_vcpu(0)
    vm.set_memory_attributes(0x3000, PAGE, PRIVATE)
    assert_exit(vcpu.page_fault(0x3000, 0), 0x3000, private=True)
    assert vcpu.page_fault(0x4000, 0).ret == FIXED


def test_exit_4_gmem_get_pfn_errors_carry_their_errno():
    host, vm, f, vcpu = make_vm()
    vm.set_memory_attributes(0, 2 * M, PRIVATE)
    host.inject_alloc_failures(1)
    assert_exit(vcpu.page_fault(0x1000, WRITE), 0x1000, private=True, ret=-errno.ENOMEM)
    assert vcpu.page_fault(0x1000, WRITE).ret == FIXED
    f.close()                                                # kvm_gmem_get_pfn: no file
    assert sptes(vm) == {}
    assert_exit(vcpu.page_fault(0x1000, WRITE), 0x1000, private=True)
    assert_exit(vcpu.page_fault(0x2000, WRITE), 0x2000, private=True)
    assert vcpu.page_fault(2 * M, WRITE).ret == FIXED        # shared pages do not need the file
    host.check()


def test_exit_5_emulation_on_private_memory_cannot_be_reached():
    """kvm_mmu_do_page_fault turns RET_PF_EMULATE on a private fault into an exit, but every
    source of RET_PF_EMULATE is shared: no memslot (a private one exits first, trigger 2), a
    read-only memslot (the private path goes to gmem), an MMIO SPTE (RSVD faults are never
    private, §2.3). The exit each would have been shows up as the earlier trigger."""
    host, vm, f, vcpu = make_vm(slot_size=M)
    vm.set_memory_attributes(2 * M, PAGE, PRIVATE)
    assert_exit(vcpu.page_fault(2 * M, WRITE), 2 * M, private=True)
    assert vcpu.stats["pf_emulate"] == 0


def test_unresolvable_shared_pfn_is_efault_without_an_exit():
    """kvm_handle_error_pfn's default: a memslot whose hva is not mapped in the VMM is -EFAULT
    from KVM_RUN with no KVM_EXIT_MEMORY_FAULT (one was proposed for it, never merged), and no
    memory-fault exit is counted."""
    host, vm, f, vcpu = make_vm(hva=0)
    r = vcpu.page_fault(0x2000, WRITE)
    assert (r.ret, r.exit_reason, r.memory_fault) == (-errno.EFAULT, 0, None)
    assert vcpu.stats["memory_fault_exits"] == 0
    vm.set_memory_attributes(0x2000, PAGE, PRIVATE)
    assert vcpu.page_fault(0x2000, WRITE).ret == FIXED       # private pages come from gmem


def test_munmap_of_the_vmm_memory_zaps_and_faults_efault():
    """munmap of a memslot's backing: the mmu notifier zaps the gfns it backs
    (kvm_mmu_notifier_invalidate_range_start), then a fault there is -EFAULT (no exit); the
    VMM mapping it again gives the guest zero pages."""
    host, vm, f, vcpu = make_vm()
    gpa = 4 * M                                              # the shared slot's memory
    assert vcpu.page_fault(gpa, WRITE).ret == FIXED
    vcpu.write(gpa, b"shared")
    host.munmap_user(HVA + gpa, 2 * PAGE)
    assert all(g != gpa >> 12 for g, *_ in vm.sptes())
    r = vcpu.page_fault(gpa, WRITE)
    assert (r.ret, r.exit_reason) == (-errno.EFAULT, 0)
    with pytest.raises(OSError) as e:
        host.read_user(HVA + gpa, 6)
    assert e.value.errno == errno.EFAULT
    host.mmap_user(HVA + gpa, 2 * PAGE)
    assert vcpu.read(gpa, 6) == bytes(6)
    host.check()


# ------------------------------------------------------------- §2.10 retry

def test_invalidation_between_faultin_and_map_retries():
    host, vm, f, vcpu = make_vm()
    vm.set_memory_attributes(0, M, PRIVATE)
    a = vcpu.page_fault(0x1000, WRITE)
    inval = vm.stats["mmu_invalidations"]
    vm.inject_invalidation(0x1000, PAGE)
    # a fast-path fault never reaches the map: the injection waits
    assert vcpu.page_fault(0x1000, PRESENT | WRITE).ret == SPURIOUS
    r = vcpu.page_fault(0x2000, WRITE)                        # any gfn: the sequence moved
    assert (r.ret, r.exit_reason, r.level) == (RETRY, 0, 0)
    assert sptes(vm) == {} and vm.stats["mmu_invalidations"] == inval + 1
    assert vcpu.stats["pf_retry"] == 1
    assert vcpu.page_fault(0x2000, WRITE).ret == FIXED        # re-entering the guest succeeds
    r = vcpu.page_fault(0x1000, WRITE)
    assert (r.ret, r.pfn) == (FIXED, a.pfn)                   # zapped, not freed
    host.check()


def test_retry_through_guest_access_reenters():
    host, vm, f, vcpu = make_vm()
    vm.inject_invalidation(0, PAGE)
    vcpu.write(0x10, b"abc")
    assert vcpu.read(0x10, 3) == b"abc" and vcpu.stats["pf_retry"] == 1


# -------------------------------------------------------------- zapping

def test_punch_hole_zaps_and_frees():
    host, vm, f, vcpu = make_vm()
    vm.set_memory_attributes(0, 16 * PAGE, PRIVATE)
    for i in range(16):
        vcpu.write(i * PAGE, bytes([i + 1]))
    vcpu.write(32 * PAGE, b"s")                               # a shared page in the same slot
    assert vm.stats["pages_4k"] == 17
    freed = host.stats["folios_freed"]
    f.punch_hole(4 * PAGE, 4 * PAGE)
    assert sorted(sptes(vm)) == [g for g in range(16) if not 4 <= g < 8] + [32]
    assert vm.stats["pages_4k"] == 13 and host.stats["folios_freed"] == freed + 4
    assert vcpu.read(4 * PAGE, 1) == b"\0" and vcpu.read(3 * PAGE, 1) == b"\4"
    # a non-TDX VM has one root: a punch zaps the shared SPTEs of those gfns as well
    f.punch_hole(32 * PAGE, PAGE)
    assert 32 not in sptes(vm) and vcpu.read(32 * PAGE, 1) == b"s"
    host.check()


def test_attribute_changes_zap_and_same_attributes_do_nothing():
    host, vm, f, vcpu = make_vm()
    for g in range(8):
        vcpu.page_fault(g * PAGE, WRITE)
    zapped, inval = vm.stats["zapped_sptes"], vm.stats["mmu_invalidations"]
    vm.set_memory_attributes(0, 2 * PAGE, 0)                  # already shared: nothing happens
    assert (vm.stats["zapped_sptes"], vm.stats["mmu_invalidations"]) == (zapped, inval)
    vm.set_memory_attributes(2 * PAGE, 2 * PAGE, PRIVATE)
    assert sorted(sptes(vm)) == [0, 1, 4, 5, 6, 7] and vm.stats["pages_4k"] == 6
    for g in (2, 3):
        assert vcpu.page_fault(g * PAGE, WRITE).ret == FIXED and sptes(vm)[g][3]
    vm.set_memory_attributes(3 * PAGE, PAGE, 0)
    assert sorted(sptes(vm)) == [0, 1, 2, 4, 5, 6, 7] and vm.stats["pages_4k"] == 7
    host.check()


def test_memslot_deletion_zaps_its_range_only():
    host, vm, f, vcpu = make_vm(slot_size=M)
    f2 = vm.create_guest_memfd(M)
    vm.set_user_memory_region2(1, GMEM, 4 * M, M, userspace_addr=HVA + 4 * M, guest_memfd=f2)
    vm.set_memory_attributes(0, 8 * M, PRIVATE)
    for gpa in (0, PAGE, 4 * M, 4 * M + PAGE):
        assert vcpu.page_fault(gpa, WRITE).ret == FIXED
    vm.set_user_memory_region2(1, 0, 4 * M, 0)
    assert sorted(sptes(vm)) == [0, 1] and vm.stats["pages_4k"] == 2
    assert_exit(vcpu.page_fault(4 * M, WRITE), 4 * M, private=True)
    host.check()


def test_gmem_close_zaps_its_memslots():
    host, vm, f, vcpu = make_vm(slot_size=M)
    vm.set_user_memory_region2(1, 0, 4 * M, M, userspace_addr=HVA + 4 * M)
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    for gpa in (0, PAGE, 4 * M):
        assert vcpu.page_fault(gpa, WRITE).ret == FIXED
    f.close()
    assert sorted(sptes(vm)) == [4 * M // PAGE] and vm.stats["pages_4k"] == 1
    assert_exit(vcpu.page_fault(0, WRITE), 0, private=True)
    assert vcpu.page_fault(PAGE, WRITE).ret == FIXED          # shared: the VMM's page
    host.check()


def test_gmem_only_slot_stays_gmem_only_after_its_file_is_closed():
    """KVM_MEMSLOT_GMEM_ONLY is a memslot flag that kvm_gmem_bind sets for a
    GUEST_MEMFD_FLAG_MMAP file (internal: not in the slot's uAPI flags), and kvm_gmem_release
    only clears slot->gmem.file: after the last close a shared fault still goes to
    kvm_gmem_get_pfn (-EFAULT, a memory-fault exit), never to the VMM's page at userspace_addr."""
    host = gmem.Host(memory=64 * M, platform="amd")
    vm = host.create_vm(DEFAULT)
    f = vm.create_guest_memfd(2 * M, U.GUEST_MEMFD_FLAG_MMAP | U.GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * M, userspace_addr=HVA, guest_memfd=f)
    vcpu = vm.create_vcpu(0)
    r = vcpu.page_fault(0, WRITE)
    assert r.ret == FIXED and host.folio(r.pfn)["mapping"] == f.ino      # from the file
    f.close()
    assert sptes(vm) == {}
    assert_exit(vcpu.page_fault(PAGE, WRITE), PAGE, private=False)
    assert sptes(vm) == {}
    assert [(s["flags"], s["bound"]) for s in vm.memslots()] == [(GMEM, False)]
    host.check()


# ------------------------------------------------------------ hugepages (§2.8, §2.11)

def test_2m_private_mapping_from_a_2m_folio():
    host, vm, f, vcpu = make_vm(huge_folios=True)
    vm.set_memory_attributes(0, 4 * M, PRIVATE)
    r = vcpu.page_fault(0x3000, WRITE)
    assert (r.ret, r.level) == (FIXED, 2) and host.folio(r.pfn)["order"] == 9 and r.pfn % 512 == 0
    assert sptes(vm) == {0: (2, r.pfn, True, True)}
    assert vcpu.page_fault(0x1FF000, 0).ret == SPURIOUS       # the same 2M SPTE
    assert vcpu.page_fault(2 * M, WRITE).level == 2
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (2, 0)
    # guest data lands at the right 4K page of the 2M folio
    vcpu.write(0x5008, b"huge")
    assert vcpu.read(0x5008, 4) == b"huge"
    host.check()


def test_2m_demotes_to_4k_while_attributes_are_mixed():
    host, vm, f, vcpu = make_vm(huge_folios=True)
    vm.set_memory_attributes(0, 2 * M, PRIVATE)
    head = vcpu.page_fault(0, WRITE).pfn
    vm.set_memory_attributes(0x10000, PAGE, 0)                # one page of the 2M becomes shared
    assert sptes(vm) == {}                                    # the 2M SPTE overlapped: zapped
    r = vcpu.page_fault(0x3000, WRITE)
    assert (r.ret, r.level, r.pfn) == (FIXED, 1, head + 3)    # KVM_LPAGE_MIXED_FLAG: 4K
    s = vcpu.page_fault(0x10000, WRITE)
    assert (s.level, host.folio(s.pfn)["mapping"]) == (1, 0)
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 2)
    vm.set_memory_attributes(0x10000, PAGE, PRIVATE)          # uniform again
    r = vcpu.page_fault(0x4000, WRITE)
    assert (r.level, r.pfn) == (2, head)                      # the 4K private SPTE is replaced
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (1, 0)
    host.check()


def test_2m_needs_a_2m_range_inside_the_memslot_and_aligned_gmem():
    # the slot starts 4K into a 2M region: no 2M range is wholly inside it
    host, vm, f, vcpu = make_vm(huge_folios=True, gpa=PAGE, slot_size=4 * M)
    vm.set_memory_attributes(0, 8 * M, PRIVATE)
    assert vcpu.page_fault(2 * M + PAGE, WRITE).level == 1
    assert vcpu.page_fault(3 * M, WRITE).level == 1
    # gfn and gmem index disagree modulo 512: the 2M folio is split at first use, mapped 4K
    host = gmem.Host(memory=64 * M, platform="amd", huge_folios=True)
    vm = host.create_vm(SW)
    f = vm.create_guest_memfd(8 * M)
    vm.set_user_memory_region2(0, GMEM, 2 * M, 2 * M, userspace_addr=HVA, guest_memfd=f,
                               guest_memfd_offset=PAGE)
    vm.set_memory_attributes(0, 8 * M, PRIVATE)
    r = vm.create_vcpu(0).page_fault(2 * M, WRITE)
    assert r.level == 1 and host.folio(r.pfn)["order"] == 0 and host.stats["folio_splits"] == 1
    host.check()


def test_punching_a_page_splits_the_folio_and_the_mapping():
    host, vm, f, vcpu = make_vm(huge_folios=True)
    vm.set_memory_attributes(0, 2 * M, PRIVATE)
    head = vcpu.page_fault(0, WRITE).pfn
    f.punch_hole(0x7000, PAGE)
    assert sptes(vm) == {} and host.stats["folio_splits"] == 1
    r = vcpu.page_fault(0x8000, WRITE)
    assert (r.level, r.pfn) == (1, head + 8)                  # the pages keep their pfns
    assert vcpu.page_fault(0x7000, WRITE).level == 1
    host.check()


def test_tdx_private_memory_is_mapped_4k():
    host, vm, f, vcpu = make_vm(TDX, huge_folios=True)
    vm.set_memory_attributes(0, 2 * M, PRIVATE)
    r = vcpu.page_fault(0, WRITE)
    assert (r.ret, r.level) == (FIXED, 1) and host.folio(r.pfn)["order"] == 9


# ------------------------------------------------------------------ trace

def test_trace_keeps_the_64_bit_error_code():
    host, vm, f, vcpu = make_vm(SNP)
    host.trace.enable()
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    ec = PRESENT | WRITE | ENC | FINAL | (1 << 40)
    r = vcpu.page_fault(0x123, ec | IMPLICIT)
    assert r.ret == FIXED
    assert_exit(vcpu.page_fault(0x1000, WRITE | ENC), 0x1000, private=True)
    recs = host.trace.to_numpy()
    events = [gmem.TRACE_EVENTS[e] for e in recs["event"]]
    faults = recs[[e == "kvm_page_fault" for e in events]]
    # npf_interception: synthetic bits cleared, PFERR_PRIVATE_ACCESS set for the encrypted access
    assert [int(x) for x in faults["a"]] == [0x123, 0x1000]
    assert [int(x) for x in faults["b"]] == [ec | PRIVATE_ACCESS, WRITE | ENC | PRIVATE_ACCESS]
    install = recs[[e == "spte_install" for e in events]]
    assert [(int(x["a"]), int(x["b"]), int(x["c"]), int(x["d"])) for x in install] == [(0, r.pfn, 1, 1)]
    exits = recs[[e == "memory_fault_exit" for e in events]]
    assert [(int(x["a"]), int(x["b"]), int(x["c"])) for x in exits] == [(0x1000, EXIT_PRIVATE, errno.EFAULT)]
    assert f"gpa=0x123 error_code={ec | PRIVATE_ACCESS:#x}" in host.trace.report()


def test_trace_sw_protected_sets_private_after_the_trace():
    """SW_PROTECTED's PFERR_PRIVATE_ACCESS comes from kvm_mmu_page_fault, after npf_interception
    traced the fault: the traced error code is the hardware's."""
    host, vm, f, vcpu = make_vm()
    host.trace.enable("kvm_page_fault")
    vm.set_memory_attributes(0, PAGE, PRIVATE)
    vcpu.page_fault(0, WRITE | FINAL)
    assert [int(x) for x in host.trace.to_numpy()["b"]] == [WRITE | FINAL]


def test_batch_result_fields():
    host, vm, f, vcpu = make_vm(slot_size=M)
    vm.set_memory_attributes(PAGE, PAGE, PRIVATE)
    vm.set_memory_attributes(2 * M, PAGE, PRIVATE)
    out = vm.page_fault_batch(np.array([0, PAGE, 2 * M, 3 * M], dtype=np.uint64),
                              np.array([WRITE] * 4, dtype=np.uint64))
    assert out.dtype == gmem.FAULT_DTYPE
    assert list(out["ret"]) == [FIXED, FIXED, -errno.EFAULT, EMULATE]
    assert list(out["level"]) == [1, 1, 0, 0] and out["pfn"][0] != out["pfn"][1]
    assert (out["exit_reason"][2], out["gpa"][2], out["flags"][2]) == (U.KVM_EXIT_MEMORY_FAULT, 2 * M, EXIT_PRIVATE)


# ============================================ selftests: private_mem_kvm_exits_test.c

EXITS_GPA = 0xC0000000


def exits_vm(flags):
    host = gmem.Host(memory=64 * M, platform="amd")
    vm = host.create_vm(SW)
    kw = {}
    if flags & GMEM:
        kw = dict(guest_memfd=vm.create_guest_memfd(PAGE))
    vm.set_user_memory_region2(10, flags, EXITS_GPA, PAGE, userspace_addr=HVA, **kw)
    vm.set_memory_attributes(EXITS_GPA, PAGE, PRIVATE)
    return host, vm, vm.create_vcpu(0)


def run_vcpu_get_exit(vcpu):
    with pytest.raises(gmem.GuestExit) as e:
        while True:                  # the guest loops reading *(u64 *)GVA
            vcpu.read(EXITS_GPA, 8)
    r = e.value.result
    assert r.ret == -errno.EFAULT and r.exit_reason == U.KVM_EXIT_MEMORY_FAULT
    return r


def test_private_access_memslot_deleted():
    host, vm, vcpu = exits_vm(GMEM)
    assert vcpu.read(EXITS_GPA, 8) == bytes(8)             # runs until the memslot goes away
    vm.set_user_memory_region2(10, GMEM, EXITS_GPA, 0)
    assert run_vcpu_get_exit(vcpu).memory_fault == (EXIT_PRIVATE, EXITS_GPA, PAGE)
    host.check()


def test_private_access_memslot_not_private():
    host, vm, vcpu = exits_vm(0)
    assert run_vcpu_get_exit(vcpu).memory_fault == (EXIT_PRIVATE, EXITS_GPA, PAGE)


def test_private_access_gmem_closed():
    host, vm, vcpu = exits_vm(GMEM)
    vcpu.read(EXITS_GPA, 8)
    f = vm.create_guest_memfd(PAGE)     # a second gmem of its own slot, then closed
    vm.set_user_memory_region2(11, GMEM, EXITS_GPA + PAGE, PAGE, userspace_addr=HVA + PAGE, guest_memfd=f)
    vm.set_memory_attributes(EXITS_GPA + PAGE, PAGE, PRIVATE)
    vcpu.write(EXITS_GPA + PAGE, b"x")
    f.close()
    with pytest.raises(gmem.GuestExit) as e:
        vcpu.read(EXITS_GPA + PAGE, 1)
    assert e.value.result.memory_fault == (EXIT_PRIVATE, EXITS_GPA + PAGE, PAGE)
    assert vcpu.read(EXITS_GPA, 8) == bytes(8)               # the other slot still works


# ======================================== selftests: private_mem_conversions_test.c

BASE_DATA_SLOT, BASE_DATA_GPA = 10, 1 << 32
PER_CPU_DATA_SIZE = 2 * M + PAGE
PER_CPU_SIZE = 4 * M                 # align_up(PER_CPU_DATA_SIZE, 2M)
TEST_RANGES = ((0, PAGE), (0, 2 * M), (PAGE, PAGE), (PAGE, 2 * M), (2 * M, PAGE))
MAP_GPA_SET_ATTRIBUTES, MAP_GPA_SHARED, MAP_GPA_DO_FALLOCATE = 1, 2, 4


class ConversionsVm:
    """The host side: one gmem split across nr_memslots memslots, the KVM_HC_MAP_GPA_RANGE
    handler and the SYNC_SHARED / SYNC_PRIVATE checks on the VMM's memory."""

    def __init__(self, nr_vcpus, nr_memslots, huge_folios=False):
        self.host = gmem.Host(memory=256 * M, platform="amd", huge_folios=huge_folios)
        self.vm = self.host.create_vm(SW)
        self.memfd_size = PER_CPU_SIZE * nr_vcpus
        self.slot_size = self.memfd_size // nr_memslots
        self.memfd = self.vm.create_guest_memfd(self.memfd_size)
        self.slots = []
        for i in range(nr_memslots):
            gpa, hva = BASE_DATA_GPA + self.slot_size * i, HVA + self.slot_size * i
            self.vm.set_user_memory_region2(BASE_DATA_SLOT + i, GMEM, gpa, self.slot_size,
                                            userspace_addr=hva, guest_memfd=self.memfd,
                                            guest_memfd_offset=self.slot_size * i)
            self.slots.append((gpa, hva))
        self.vcpus = [self.vm.create_vcpu(i) for i in range(nr_vcpus)]

    def hva(self, gpa):
        return HVA + gpa - BASE_DATA_GPA

    def map_gpa_range(self, gpa, size, flags):
        """handle_exit_hypercall for KVM_HC_MAP_GPA_RANGE: fallocate, then the attributes."""
        if flags & MAP_GPA_DO_FALLOCATE:
            # vm_guest_mem_fallocate: walk the memslots, punch (shared) or allocate (private)
            off = gpa - BASE_DATA_GPA
            if flags & MAP_GPA_SHARED:
                self.memfd.punch_hole(off, size)
            else:
                self.memfd.allocate(off, size)
        if flags & MAP_GPA_SET_ATTRIBUTES:
            self.vm.set_memory_attributes(gpa, size, 0 if flags & MAP_GPA_SHARED else PRIVATE)

    def sync_shared(self, gpa, size, cur, new):
        assert self.host.read_user(self.hva(gpa), size) == bytes([cur]) * size
        self.host.write_user(self.hva(gpa), bytes([new]) * size)

    def sync_private(self, gpa, size, pattern):
        assert self.host.read_user(self.hva(gpa), size) == bytes([pattern]) * size


def memcmp_g(vcpu, gpa, pattern, size):
    assert vcpu.read(gpa, size) == bytes([pattern]) * size, f"gpa {gpa:#x}"


def guest_code(h, vcpu, base):
    """guest_code(base_gpa): a generator that yields at each exit to the host, so that
    several vCPUs can be run interleaved."""
    def map_private(gpa, size, do_fallocate):
        h.map_gpa_range(gpa, size, MAP_GPA_SET_ATTRIBUTES | (MAP_GPA_DO_FALLOCATE if do_fallocate else 0))

    def map_shared(gpa, size, do_fallocate):
        h.map_gpa_range(gpa, size, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED |
                        (MAP_GPA_DO_FALLOCATE if do_fallocate else 0))

    # guest_test_explicit_conversion(base, false) then (base, true)
    for do_fallocate in (False, True):
        def_p, init_p = 0xAA, 0xCC
        vcpu.write(base, bytes([def_p]) * PER_CPU_DATA_SIZE)
        memcmp_g(vcpu, base, def_p, PER_CPU_DATA_SIZE)
        h.sync_shared(base, PER_CPU_DATA_SIZE, def_p, init_p)
        yield
        memcmp_g(vcpu, base, init_p, PER_CPU_DATA_SIZE)
        for offset, size in TEST_RANGES:
            gpa = base + offset
            p1, p2, p3, p4 = 0x11, 0x22, 0x33, 0x44
            vcpu.write(gpa, bytes([p1]) * size)
            map_private(gpa, size, do_fallocate)
            yield
            if size > PAGE:
                vcpu.write(gpa, bytes([p2]) * PAGE)
            else:
                vcpu.write(gpa, bytes([p2]) * size)
                h.sync_private(gpa, size, p1)
                yield
                memcmp_g(vcpu, gpa, p2, size)
                if gpa > base:
                    memcmp_g(vcpu, base, init_p, gpa - base)
                if gpa + size < base + PER_CPU_DATA_SIZE:
                    memcmp_g(vcpu, gpa + size, init_p, base + PER_CPU_DATA_SIZE - (gpa + size))
                for j in range(0, size, PAGE):                # holes in private ranges
                    if (j >> 12) & 1:
                        map_shared(gpa + j, PAGE, do_fallocate)
                        h.sync_shared(gpa + j, PAGE, p1, p3)
                        memcmp_g(vcpu, gpa + j, p3, PAGE)
                    else:
                        h.sync_private(gpa + j, PAGE, p1)
                    yield
            map_shared(gpa, size, do_fallocate)
            vcpu.write(gpa, bytes([p3]) * size)
            h.sync_shared(gpa, size, p3, p4)
            yield
            memcmp_g(vcpu, gpa, p4, size)
            vcpu.write(gpa, bytes([init_p]) * size)
            map_shared(base, PER_CPU_DATA_SIZE, True)           # free all private memory
            yield
    # guest_test_punch_hole(base, false) then (base, true)
    for precise in (False, True):
        init_p = 0xCC
        map_private(base, PER_CPU_DATA_SIZE, False)
        for offset, size in TEST_RANGES:
            gpa = base + offset
            h.map_gpa_range(base, PER_CPU_DATA_SIZE, MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE)
            yield
            if precise:
                vcpu.write(gpa, bytes([init_p]) * size)
                memcmp_g(vcpu, gpa, init_p, size)
            else:
                vcpu.write(base, bytes([init_p]) * PER_CPU_DATA_SIZE)
                memcmp_g(vcpu, base, init_p, PER_CPU_DATA_SIZE)
            h.map_gpa_range(gpa, size, MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE)
            yield
            memcmp_g(vcpu, gpa, 0, size)                       # punched pages read back zero
    h.map_gpa_range(base, PER_CPU_DATA_SIZE, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED)


@pytest.mark.parametrize("nr_vcpus,nr_memslots,huge_folios",
                         [(1, 1, False), (1, 2, False), (2, 1, True), (4, 2, False)])
def test_private_mem_conversions(nr_vcpus, nr_memslots, huge_folios):
    h = ConversionsVm(nr_vcpus, nr_memslots, huge_folios)
    guests = [guest_code(h, v, BASE_DATA_GPA + i * PER_CPU_SIZE) for i, v in enumerate(h.vcpus)]
    steps = 0
    while guests:                                            # the vCPUs run interleaved
        for g in list(guests):
            try:
                next(g)
                steps += 1
            except StopIteration:
                guests.remove(g)
        if steps % 16 == 0:
            h.host.check()
    h.host.check()
    stats = h.vm.stats
    assert stats["memory_fault_exits"] == 0 and stats["pf_fixed"] > 0
    # kvm_vm_free(), then the gmem outlives the VM fd: punch and allocate it all
    h.vm.close()
    h.memfd.punch_hole(0, h.memfd_size)
    h.memfd.allocate(0, h.memfd_size)
    h.memfd.close()
    h.host.check()


def test_private_data_survives_an_attribute_round_trip():
    """Private and shared backings are independent; attributes never touch gmem contents."""
    h = ConversionsVm(1, 1)
    v = h.vcpus[0]
    h.map_gpa_range(BASE_DATA_GPA, PAGE, MAP_GPA_SET_ATTRIBUTES)
    v.write(BASE_DATA_GPA, b"private")
    h.map_gpa_range(BASE_DATA_GPA, PAGE, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED)
    assert v.read(BASE_DATA_GPA, 7) == bytes(7)               # the VMM's page
    v.write(BASE_DATA_GPA, b"shared!")
    h.map_gpa_range(BASE_DATA_GPA, PAGE, MAP_GPA_SET_ATTRIBUTES)
    assert v.read(BASE_DATA_GPA, 7) == b"private"
    assert h.host.read_user(HVA, 7) == b"shared!"


# ======================================= differential: scalar, batch and the reference

FILE_SIZES = {"A": 8 * M, "B": 10 * M}
# slot id -> (gpa, size, flags, hva, file, gmem offset): aligned, misaligned, a plain
# memslot, a gfn/index mismatch modulo 2M, an unmapped hva and a read-only memslot
LAYOUT = {
    0: (0, 4 * M, GMEM, 0x100000000, "A", 0),
    1: (6 * M, 2 * M + 2 * PAGE, GMEM, 0x200000000, "A", 4 * M),
    2: (16 * M + PAGE, 2 * M, GMEM, 0x300001000, "B", PAGE),
    3: (20 * M, M, 0, 0x400000000, None, 0),
    4: (24 * M, 2 * M, GMEM, 0x500000000, "B", 4 * M),
    5: (28 * M, 2 * M, GMEM, 0x600000000, "B", 7 * M),
    6: (30 * M + 64 * PAGE, 16 * PAGE, GMEM, 0, "A", 7 * M),
    7: (31 * M, 16 * PAGE, U.KVM_MEM_READONLY, 0x700000000, None, 0),
}


def interesting_gfns():
    gfns = {1024 + 5, 4096 + 3, 8191, 8192}                  # gaps: no memslot
    for gpa, size, *_ in LAYOUT.values():
        b, n = gpa // PAGE, size // PAGE
        gfns |= {b, b + 1, b + n // 2, b + n - 1, b + n, (b + 511) & ~511, ((b + 511) & ~511) + 7}
    return sorted(gfns)


GFNS = interesting_gfns()
GMEM_INDICES = [0, 1, 7, 511, 512, 513, 1024, 1025, 1536, 1792, 2047, 2048, 2100]
NPAGES = [1, 2, 3, 16, 511, 512, 513, 1024, 2048]


class Twin:
    """One stream of operations on three things: a host driven fault by fault through
    vcpu.page_fault, an identical host driven through vm.page_fault_batch in chunks, and the
    reference. Results and counters of the two hosts must be identical; both must agree with
    the reference, pfns up to renaming."""

    def __init__(self, vm_type, huge_folios, chunk, nr_vcpus=2, layout=None, file_sizes=None):
        layout, self.file_sizes = layout or LAYOUT, file_sizes or FILE_SIZES
        self.vm_type, self.chunk = vm_type, chunk
        self.hosts = [gmem.Host(memory=128 * M, platform=PLATFORM[vm_type], huge_folios=huge_folios)
                      for _ in range(2)]
        self.vms = [h.create_vm(vm_type) for h in self.hosts]
        for vm in self.vms:
            vm.launch()
        self.vcpus = [[vm.create_vcpu(i) for i in range(nr_vcpus)] for vm in self.vms]
        self.ref_host = RefHost(huge_folios)
        self.ref = self.ref_host.create_vm(vm_type)
        self.files = {name: ([vm.create_guest_memfd(size) for vm in self.vms],
                             self.ref.create_guest_memfd(size)) for name, size in self.file_sizes.items()}
        self.names = Renaming()
        self.levels = Counter()     # mapping levels seen, for the tests' own coverage checks
        self.pending = []           # (vcpu id, gpa, error code, scalar result) for the batch host
        # KVM_MEM_READONLY needs !has_protected_state (kvm_arch_has_readonly_mem)
        self.layout = {k: v for k, v in layout.items()
                       if not (v[2] & U.KVM_MEM_READONLY and vm_type in (SNP, TDX))}
        for slot in self.layout:
            self.toggle_slot(slot)

    # ------------------------------------------------------------ operations
    def fault(self, vcpu_id, gpa, ec):
        self.names.forget(self.ref_host.freed)          # pages freed since: their pfns may return
        self.ref_host.freed.clear()
        r = self.vcpus[0][vcpu_id].page_fault(gpa, ec)
        ref = self.ref.page_fault(vcpu_id, gpa, ec)
        what = f"fault vcpu{vcpu_id} gpa {gpa:#x} ec {ec:#x}"
        assert (r.ret, r.exit_reason, r.memory_fault, r.level) == \
            (ref.ret, ref.exit_reason, ref.memory_fault, ref.level), f"{what}: {r} != {ref}"
        if ref.page is None:
            assert r.pfn == 0, what
        else:
            self.names.match(ref.page, r.pfn, what)
        self.levels[r.level] += 1
        if self.pending and (self.pending[-1][0] != vcpu_id or len(self.pending) >= self.chunk):
            self.flush()
        self.pending.append((vcpu_id, gpa, ec, r))

    def flush(self):
        if not self.pending:
            return
        vid = self.pending[0][0]
        out = self.vms[1].page_fault_batch(np.array([p[1] for p in self.pending], dtype=np.uint64),
                                           np.array([p[2] for p in self.pending], dtype=np.uint64),
                                           vcpu_id=vid)
        for (_, gpa, ec, r), o in zip(self.pending, out):
            mf = r.memory_fault or (0, 0, PAGE)
            assert (int(o["ret"]), int(o["exit_reason"]), int(o["level"]), int(o["pfn"]),
                    int(o["flags"]), int(o["gpa"])) == (r.ret, r.exit_reason, r.level, r.pfn, mf[0], mf[1]), \
                f"batch fault gpa {gpa:#x} ec {ec:#x}: {o} != {r}"
        self.pending = []

    def both(self, fn):
        """A non-fault operation: the batch host catches up first, then all three do it."""
        self.flush()
        for i in range(2):
            fn(i)

    def set_attributes(self, gfn, npages, private):
        attrs = PRIVATE if private and self.vm_type != DEFAULT else 0
        self.both(lambda i: self.vms[i].set_memory_attributes(gfn * PAGE, npages * PAGE, attrs))
        self.ref.set_memory_attributes(gfn * PAGE, npages * PAGE, attrs)

    def punch(self, name, index, npages):
        real, ref = self.files[name]
        if ref.closed:
            return
        self.both(lambda i: real[i].punch_hole(index * PAGE, npages * PAGE))
        ref.punch_hole(index * PAGE, npages * PAGE)

    def allocate(self, name, index, npages):
        real, ref = self.files[name]
        npages = min(npages, self.file_sizes[name] // PAGE - index)
        if ref.closed or npages <= 0:
            return
        self.both(lambda i: real[i].allocate(index * PAGE, npages * PAGE))
        ref.allocate(index * PAGE, npages * PAGE)

    def close(self, name):
        real, ref = self.files[name]
        if ref.closed:
            return
        self.both(lambda i: real[i].close())
        ref.close()

    def toggle_slot(self, slot):
        if slot not in self.layout:
            return
        gpa, size, flags, hva, name, off = self.layout[slot]
        if slot in self.ref.slots:
            self.both(lambda i: self.vms[i].set_user_memory_region2(slot, flags, gpa, 0))
            self.ref.set_user_memory_region2(slot, flags, gpa, 0)
            return
        if name is not None and self.files[name][1].closed:
            return
        real, ref = self.files[name] if name else ([-1, -1], None)
        self.both(lambda i: self.vms[i].set_user_memory_region2(slot, flags, gpa, size, userspace_addr=hva,
                                                                guest_memfd=real[i], guest_memfd_offset=off))
        self.ref.set_user_memory_region2(slot, flags, gpa, size, hva, ref, off)

    def inject(self, gfn, npages):
        self.both(lambda i: self.vms[i].inject_invalidation(gfn * PAGE, npages * PAGE))
        self.ref.inject_invalidation(gfn * PAGE, npages * PAGE)

    # ------------------------------------------------------------ checks
    def check(self):
        self.flush()
        self.names.forget(self.ref_host.freed)
        self.ref_host.freed.clear()
        a, b = self.vms
        assert a.sptes() == b.sptes()
        assert a.stats == b.stats
        for va, vb in zip(*self.vcpus):
            assert va.stats == vb.stats
        sa, sb = self.hosts[0].stats, self.hosts[1].stats
        assert sa == sb
        for vid, vcpu in enumerate(self.vcpus[0]):
            ref = self.ref.stats(vid)
            assert {k: vcpu.stats[k] for k in VCPU_COUNTERS} == {k: ref[k] for k in VCPU_COUNTERS}, vid
        assert {k: a.stats[k] for k in VM_COUNTERS} == self.ref.vm_stats
        real = {gfn: (level, pfn, w, p) for gfn, level, pfn, w, p in a.sptes()}
        assert sorted(real) == sorted(self.ref.sptes)
        for gfn, s in self.ref.sptes.items():
            level, pfn, w, p = real[gfn]
            assert (level, w, p) == (s.level, s.writable, s.private), f"SPTE gfn {gfn:#x}"
            self.names.match(s.page, pfn, f"SPTE gfn {gfn:#x}")
        for h in self.hosts:
            h.check()


def error_codes(vm_type, rsvd):
    bits = [PRESENT, WRITE, USER, FETCH, FINAL, GPAGE, IMPLICIT, PRIVATE_ACCESS, 1 << 40, ENC]
    if rsvd:
        bits.append(RSVD)
    return st.lists(st.sampled_from(bits), max_size=4).map(lambda bs: sum(set(bs)))


def in_a_slot():
    return st.sampled_from(sorted(LAYOUT)).flatmap(
        lambda s: st.integers(LAYOUT[s][0] // PAGE, (LAYOUT[s][0] + LAYOUT[s][1]) // PAGE - 1))


HUGE_STARTS = [0, 512, 1024, 1536, 4096, 4608, 6144, 7168]


def operations(vm_type, toggles, rsvd):
    gfns = st.one_of(st.sampled_from(GFNS), in_a_slot(), st.integers(0, 8300))
    gpa = st.tuples(gfns, st.sampled_from([0, 8, 0xFFF])).map(lambda t: t[0] * PAGE + t[1])
    if vm_type == TDX:
        gpa = st.tuples(gpa, st.booleans()).map(lambda t: t[0] | (TDX_SHARED if t[1] else 0))
    fault = st.tuples(st.integers(0, 1), gpa, error_codes(vm_type, rsvd))
    faults = st.tuples(st.just("faults"), st.lists(fault, min_size=1, max_size=12))
    ops = [faults] * 4 + [
           st.tuples(st.just("attr"), gfns, st.sampled_from(NPAGES), st.booleans()),
           st.tuples(st.just("attr"), st.sampled_from(HUGE_STARTS), st.sampled_from([512, 1024, 2048]),
                     st.booleans()),
           st.tuples(st.just("punch"), st.sampled_from("AB"), st.sampled_from(GMEM_INDICES),
                     st.sampled_from(NPAGES)),
           st.tuples(st.just("alloc"), st.sampled_from("AB"), st.sampled_from(GMEM_INDICES),
                     st.sampled_from(NPAGES)),
           st.tuples(st.just("inject"), gfns, st.sampled_from([1, 512]))]
    if toggles:
        ops += [st.tuples(st.just("slot"), st.sampled_from(sorted(LAYOUT, reverse=True))),
                st.tuples(st.just("close"), st.just("B"))]
    return st.lists(st.one_of(ops), min_size=4, max_size=50)


def run_stream(twin, ops, initially_private):
    if initially_private:
        twin.set_attributes(0, 8300, True)
    for op in ops:
        kind = op[0]
        if kind == "faults":
            for fault in op[1]:
                twin.fault(*fault)
            continue
        if kind == "attr":
            twin.set_attributes(*op[1:])
        elif kind == "punch":
            twin.punch(*op[1:])
        elif kind == "alloc":
            twin.allocate(*op[1:])
        elif kind == "inject":
            twin.inject(*op[1:])
        elif kind == "slot":
            twin.toggle_slot(op[1])
        elif kind == "close":
            twin.close(op[1])
        twin.check()
    twin.check()


# vm type, huge folios, memslot changes and gmem close, RSVD faults. RSVD faults are drawn
# only where memslots stay put: the model does not keep the memslot generation that makes
# every MMIO SPTE stale (see test_mmio_spte_stale_after_an_unrelated_memslot_change).
STREAMS = {
    "sw_protected": (SW, False, True, False),
    "sw_protected_2m": (SW, True, True, False),
    "sw_protected_rsvd": (SW, True, False, True),
    "snp": (SNP, False, True, False),
    "snp_rsvd": (SNP, False, False, True),
    "tdx_2m": (TDX, True, True, False),
    "default": (DEFAULT, False, True, False),
}


@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_scalar_batch_and_reference_agree(stream):
    vm_type, huge, toggles, rsvd = STREAMS[stream]

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=operations(vm_type, toggles, rsvd), chunk=st.sampled_from([1, 3, 1000]),
           initially_private=st.booleans())
    def run(ops, chunk, initially_private):
        run_stream(Twin(vm_type, huge, chunk), ops, initially_private)

    run()


# ------------------------------- the page tables' SPTEs against the reference's SPTE map

G = 1 << 30
# memslots across the page tables' boundaries: a level-3 table's (1 GiB, gfn 2^18), a
# level-4 table's (512 GiB, gfn 2^27), a level-2 table's inside one 1 GiB, and a 2M-misaligned
# gmem offset; every one bound to a guest_memfd
PT_FILE_SIZES = {"A": 8 * M, "B": 8 * M}
PT_LAYOUT = {
    0: (G - 2 * M, 4 * M, GMEM, 0x100000000, "A", 0),
    1: (512 * G - 2 * M, 4 * M, GMEM, 0x200000000, "B", 0),
    2: (5 * G + 2 * M, 2 * M, GMEM, 0x300000000, "A", 4 * M),
    3: (7 * G, 2 * M, GMEM, 0x400000000, "B", 4 * M + PAGE),
}


def _pt_gfns():
    """A gfn in a memslot of PT_LAYOUT, mostly near the table boundaries."""
    edges = []
    for gpa, size, *_ in PT_LAYOUT.values():
        b, n = gpa // PAGE, size // PAGE
        edges += [b, b + 1, b + n // 2 - 1, b + n // 2, b + n - 1]
    slot = st.sampled_from(sorted(PT_LAYOUT)).flatmap(
        lambda s: st.integers(PT_LAYOUT[s][0] // PAGE, (PT_LAYOUT[s][0] + PT_LAYOUT[s][1]) // PAGE - 1))
    return st.one_of(st.sampled_from(edges), slot)


def tdp_machine(vm_type, huge):
    """Faults (batched and scalar), conversions, hole punches, memslot deletions (their zaps)
    and invalidations racing a fault, on two hosts and the reference (Twin): after every step
    the page tables' leaves are the reference's SPTE map, level, pfn, writable and private,
    and host.check() walks every table."""

    class TdpMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.twin = Twin(vm_type, huge, 5, layout=PT_LAYOUT, file_sizes=PT_FILE_SIZES)

        @initialize(private=st.booleans())
        def attributes(self, private):
            if private:
                for gpa, size, *_ in PT_LAYOUT.values():
                    self.twin.set_attributes(gpa // PAGE, size // PAGE, True)

        @rule(faults=st.lists(st.tuples(st.integers(0, 1), _pt_gfns(), st.booleans(), st.sampled_from(
            [WRITE, 0, PRESENT | WRITE, WRITE | ENC, PRESENT | WRITE | ENC])), min_size=1, max_size=16))
        def fault(self, faults):
            for vcpu, gfn, shared, ec in faults:
                self.twin.fault(vcpu, gfn * PAGE | (TDX_SHARED if shared and vm_type == TDX else 0), ec)

        @rule(gfn=_pt_gfns(), npages=st.sampled_from([1, 2, 511, 512, 1024]), private=st.booleans(),
              align=st.booleans())
        def convert(self, gfn, npages, private, align):
            self.twin.set_attributes(gfn & ~511 if align else gfn, npages, private)

        @rule(name=st.sampled_from("AB"), index=st.sampled_from([0, 1, 511, 512, 1023, 1024, 1536]),
              npages=st.sampled_from([1, 3, 512, 1024]))
        def punch(self, name, index, npages):
            self.twin.punch(name, index, npages)

        @rule(slot=st.sampled_from(sorted(PT_LAYOUT)))
        def toggle_slot(self, slot):
            self.twin.toggle_slot(slot)

        @rule(gfn=_pt_gfns(), npages=st.sampled_from([1, 512]))
        def inject(self, gfn, npages):
            self.twin.inject(gfn, npages)

        @invariant()
        def agree(self):
            self.twin.check()

    return TdpMachine


for _name, (_vm_type, _huge) in {"SwProtected2M": (SW, True), "Snp": (SNP, False), "Tdx2M": (TDX, True)}.items():
    _case = tdp_machine(_vm_type, _huge).TestCase
    _case.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    globals()[f"TestTdpPageTables{_name}"] = _case


@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_long_random_stream(stream):
    """A longer seeded stream per configuration: thousands of faults batched 64 at a time,
    with the same kinds of operations in between (numpy's generator, not Hypothesis: long
    streams that reach 2M mappings, their demotion and the memslots' edges)."""
    vm_type, huge, toggles, rsvd = STREAMS[stream]
    rng = np.random.default_rng(sorted(STREAMS).index(stream))
    twin = Twin(vm_type, huge, 64)
    twin.set_attributes(0, 8300, True)
    bits = [PRESENT, WRITE, USER, FETCH, FINAL, IMPLICIT, ENC] + ([RSVD] if rsvd else [])
    slots = sorted(twin.layout)
    for step in range(3000):
        x = rng.random()
        if x < 0.85:
            if rng.random() < 0.7:
                s = LAYOUT[int(rng.choice(slots))]
                gfn = int(rng.integers(s[0] // PAGE, (s[0] + s[1]) // PAGE))
            else:
                gfn = int(rng.integers(0, 8300))
            ec = sum(b for b in bits if rng.random() < 0.25)
            gpa = gfn * PAGE | (TDX_SHARED if vm_type == TDX and rng.random() < 0.5 else 0)
            twin.fault(int(rng.integers(0, 2)), gpa, ec)
            continue
        if x < 0.91:
            if rng.random() < 0.5:
                twin.set_attributes(int(rng.choice(HUGE_STARTS)), 512, bool(rng.integers(0, 2)))
            else:
                twin.set_attributes(int(rng.choice(GFNS)), int(rng.choice(NPAGES)), bool(rng.integers(0, 2)))
        elif x < 0.94:
            twin.punch(str(rng.choice(["A", "B"])), int(rng.choice(GMEM_INDICES)), int(rng.choice(NPAGES)))
        elif x < 0.96:
            twin.allocate(str(rng.choice(["A", "B"])), int(rng.choice(GMEM_INDICES)), int(rng.choice(NPAGES)))
        elif x < 0.97:
            twin.inject(int(rng.choice(GFNS)), 1)
        elif toggles and x < 0.99:
            twin.toggle_slot(int(rng.choice(slots)))
        elif toggles and rng.random() < 0.05:
            twin.close("B")
        if step % 100 == 0:
            twin.check()
    twin.check()
    stats = twin.vms[0].stats
    assert stats["pf_fixed"] > 100 and stats["memory_fault_exits"] + stats["pf_emulate"] > 0
    if huge and vm_type == SW:
        assert twin.levels[2] > 0, "no 2M mapping was ever made"


def test_mmio_spte_stale_after_an_unrelated_memslot_change():
    host, vm, f, vcpu = make_vm(slot_size=M)
    assert vcpu.page_fault(8 * M, WRITE).ret == EMULATE
    vm.set_user_memory_region2(1, 0, 16 * M, M, userspace_addr=HVA + 16 * M)   # elsewhere
    assert vcpu.page_fault(8 * M, RSVD | PRESENT).ret == EMULATE
    assert (vcpu.stats["pf_taken"], vcpu.stats["pf_emulate"]) == (2, 2)        # the slow path ran


def test_empty_batch_with_a_vcpu_id_array():
    """No faults, vCPU ids as an (empty) array: an empty result, nothing touched."""
    host = gmem.Host(memory=64 << 20)
    vm = host.create_vm(U.KVM_X86_SW_PROTECTED_VM)
    empty = np.zeros(0, np.uint64)
    out = vm.page_fault_batch(empty, empty, vcpu_id=empty)
    assert out.shape == (0,) and out.dtype == gmem.FAULT_DTYPE
    assert vm.stats["pf_taken"] == 0
    host.check()


# ----------------------------------------- the fault path's cursors, and leaves freed

def test_vcpu_cursors_outlive_a_closed_guest_memfd():
    """A vCPU's cursors into a guest_memfd's bindings and page cache stay behind when the file
    is closed and its inode freed. A new guest_memfd bound in its place (its structs often at
    the freed one's addresses) is never read through them: each fault gets the new file's own
    page, scalar and batched."""
    host, vm, f, vcpu = make_vm(gmem_size=2 * M)
    vm.set_memory_attributes(0, 2 * M, PRIVATE)
    gpas = np.arange(0, 2 * M, 5 * PAGE, dtype=np.uint64)
    for round in range(20):
        if round % 2:
            out = vm.page_fault_batch(gpas, np.full(len(gpas), WRITE, np.uint64))
            assert (out["ret"] == FIXED).all()
            pfns = {int(g): int(p) for g, p in zip(gpas, out["pfn"])}
        else:
            pfns = {int(g): vcpu.page_fault(int(g), WRITE).pfn for g in gpas}
        assert sptes(vm) == {g >> 12: (1, pfns[g], True, True) for g in pfns}
        host.check()
        vm.set_user_memory_region2(0, GMEM, 0, 0)
        f.close()                              # the inode goes: every page freed
        assert vm.sptes() == [] and host.stats["folios_freed"] == (round + 1) * len(gpas)
        f = vm.create_guest_memfd(2 * M)
        vm.set_user_memory_region2(0, GMEM, 0, 2 * M, userspace_addr=HVA, guest_memfd=f)
    host.check()


# ------------------------------------------------- batch leaves freed mid-batch

def _zapping_guest(batch):
    """A 16 MiB private guest, half of it mapped, with a prepare hook that zaps every SPTE
    (a round trip through shared) on every 50th cold fault; the stream's records and stats
    (Linux 6.18: a folio is prepared once, so the hook runs once per page)."""
    host = gmem.Host(memory=64 * M, kernel="6.18")
    vm = host.create_vm(SW)
    f = vm.create_guest_memfd(16 * M)
    vm.set_user_memory_region2(0, GMEM, 0, 16 * M, userspace_addr=HVA, guest_memfd=f)
    vm.set_memory_attributes(0, 16 * M, PRIVATE)
    vcpu = vm.create_vcpu(0)
    pages = np.random.default_rng(3).permutation(np.arange(4096, dtype=np.uint64) << 12)
    vm.page_fault_batch(pages[:2048], np.full(2048, WRITE, np.uint64))
    calls = []

    def prepare(v, gfn, pfn, order):
        calls.append(gfn)
        if len(calls) % 50 == 1:
            v.set_memory_attributes(0, 16 * M, 0)
            v.set_memory_attributes(0, 16 * M, PRIVATE)
        return 0

    host.register_hooks(SW, gmem_prepare=prepare)
    stream = np.random.default_rng(4).permutation(pages)
    if batch:
        out = vm.page_fault_batch(stream, np.full(len(stream), WRITE, np.uint64))
        recs = [(int(r["ret"]), int(r["level"]), int(r["pfn"]), int(r["exit_reason"])) for r in out]
    else:
        recs = []
        for g in stream:
            r = vcpu.page_fault(int(g), WRITE)
            recs.append((r.ret, r.level, r.pfn, r.exit_reason))
    host.check()
    return recs, vm.stats, vcpu.stats, len(calls)


def test_batch_leaves_freed_under_it_are_not_trusted():
    """The batch hands each fault cursors on its SPTE and filemap leaves, found ahead. A hook
    zapping every SPTE in between frees those leaves (their array's node_gen moves), so the
    cursors are not trusted: the batch still answers fault for fault as the scalar path does."""
    batch, scalar = _zapping_guest(True), _zapping_guest(False)
    assert batch[3] == scalar[3] == 2048 and batch[0] == scalar[0]
    assert batch[1] == scalar[1] and batch[2] == scalar[2]
    assert Counter(r[0] for r in batch[0])[FIXED] > 2048   # zapped pages faulted again


def test_batch_td_state_does_not_change_under_a_fault():
    """A hook's tdx_init_vm mid-batch (which would move the shared bit from 51 to 47 under the
    faults the leaf stage already looked up) is refused, as the kernel's KVM_TDX_INIT_VM cannot
    run while a vCPU faults: the batch stops with that error and nothing moved."""
    s51, s47, page = 1 << 51, 1 << 47, 0x5000
    host = gmem.Host(memory=1 << 30, platform="intel")
    vm = host.create_vm(TDX)
    vm.launch()                                  # INIT_VM with GPAW 52: shared bit 51
    f = vm.create_guest_memfd(8 * M)
    vm.set_user_memory_region2(0, GMEM, 0, 8 * M, HVA, f, 0)
    vcpu = vm.create_vcpu(0)
    assert vcpu.page_fault(s51 | page, WRITE).ret == FIXED and vm.shared_gpa_bit == s51

    def is_private(v, gpa, ec):
        if v.shared_gpa_bit == s51:
            v.tdx_init_vm(48)
        return not gpa & v.shared_gpa_bit

    host.register_hooks(TDX, is_private_fault=is_private)
    gpas = np.array([s51 | s47 | 0x100000] * 8 + [s51 | page], dtype=np.uint64)
    with pytest.raises(OSError) as e:
        vm.page_fault_batch(gpas, np.full(9, WRITE, np.uint64))
    assert e.value.errno == errno.EDEADLK
    assert vm.shared_gpa_bit == s51 and vm.td_state == "runnable"
    host.register_hooks(TDX, is_private_fault=None)
    host.check()
    r = vcpu.page_fault(s51 | page, PRESENT | WRITE)
    assert r.ret == SPURIOUS


def test_batch_cursor_reused_for_the_other_root():
    """The leaf stage's cursors are reused around a ring for later faults. A TD's shared fault
    leaves one on a table of the direct root; when the same cursor is walked for a private
    fault under the same 2 MiB, it must not be trusted for the mirror root: the private leaf
    goes into the mirror root's table, never the direct root's."""
    host, vm, f, vcpu = make_vm(TDX, gmem_size=2 * M, memory=64 * M)
    vm.set_memory_attributes(M, M, PRIVATE)                  # gfns 256-511 private
    assert vcpu.page_fault(TDX_SHARED | 0, WRITE).ret == FIXED       # direct root: gfns 0-511
    assert vcpu.page_fault(300 * PAGE, WRITE).ret == FIXED           # mirror root: the same
    gpas = np.full(64, TDX_SHARED | 0x80000, np.uint64)
    gpas[16] = TDX_SHARED | PAGE                             # ring entry 16: the direct root
    gpas[48] = 301 * PAGE                                    # ring entry 16 again: the mirror root
    out = vm.page_fault_batch(gpas, np.full(64, WRITE, np.uint64))
    assert (out["ret"] >= 0).all()
    host.check()
    assert sptes(vm)[301][3] is True and sptes(vm)[1][3] is False
