"""Review s4: reproducers for the batch leaf-hint change."""
import numpy as np
import pytest

import gmem
from gmem import uapi as u

HVA = 0x7F0000000000
S51 = 1 << 51
S47 = 1 << 47


def _shared_td():
    h = gmem.Host(memory=1 << 30, platform="intel")
    vm = h.create_vm(u.KVM_X86_TDX_VM)          # runnable, not initialised: shared bit 51
    f = vm.create_guest_memfd(8 << 20)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 8 << 20, HVA, f, 0)
    v = vm.create_vcpu(0)
    return h, vm, f, v


def test_batch_hint_after_hook_changes_shared_bit():
    """A hook may call tdx_init_vm (not refused in hooks; the S-EPT is empty while only shared
    pages were faulted), which moves gfn_direct_bits. Fault 8's SPTE leaf was found, before
    fault 0 ran, for gfn = gpa >> 12 & ~old_bits; it must not be hinted for the gfn
    recomputed with the new bits (another leaf's range)."""
    h, vm, f, v = _shared_td()
    P = 0x5000
    r = v.page_fault(S51 | P, u.PFERR_WRITE_MASK)      # shared: an SPTE at gfn 5 (leaf 0)
    assert r.ret == u.RET_PF_FIXED and vm.shared_gpa_bit == S51
    fired = []

    def is_private(vm_, gpa, ec):
        if not fired:
            fired.append(1)
            vm_.tdx_init_vm(48)                          # shared bit 51 -> 47
        return not (gpa & vm_.shared_gpa_bit)

    h.register_hooks(u.KVM_X86_TDX_VM, is_private_fault=is_private)
    gpas = np.array([S51 | S47 | 0x100000] * 8 + [S51 | P], dtype=np.uint64)
    vm.page_fault_batch(gpas, np.full(9, u.PFERR_WRITE_MASK, np.uint64))
    assert vm.shared_gpa_bit == S47
    h.check()       # sptes: xa_check -11 (the hint is leaf 0 with hint_index (1 << 39) | 0)


def test_batch_hint_after_shared_bit_change_gives_wrong_answer():
    """As above, then a present shared fault at gfn (1 << 39) | 5 (no memslot, no SPTE):
    fast_page_fault reads gfn 5's SPTE through the bogus hint and answers SPURIOUS."""
    h, vm, f, v = _shared_td()
    P = 0x5000
    assert v.page_fault(S51 | P, u.PFERR_WRITE_MASK).ret == u.RET_PF_FIXED
    fired = []

    def is_private(vm_, gpa, ec):
        if not fired:
            fired.append(1)
            vm_.tdx_init_vm(48)
        return not (gpa & vm_.shared_gpa_bit)

    h.register_hooks(u.KVM_X86_TDX_VM, is_private_fault=is_private)
    gpas = np.array([S51 | S47 | 0x100000] * 8 + [S51 | P], dtype=np.uint64)
    vm.page_fault_batch(gpas, np.full(9, u.PFERR_WRITE_MASK, np.uint64))
    r = v.page_fault(S51 | S47 | P, u.PFERR_PRESENT_MASK | u.PFERR_WRITE_MASK)
    assert r.ret != u.RET_PF_SPURIOUS, r  #: the SPTE of another gfn
