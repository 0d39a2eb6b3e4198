# Intel TDX private memory (arch/x86/kvm/vmx/tdx.c): the S-EPT as KVM drives
# it through the mirror root's external hooks.  Each private 4K leaf is
# PREMAPPED (mapped before KVM_TDX_FINALIZE_VM, not yet PAGE.ADDed), PENDING
# (TDH.MEM.PAGE.AUG done, the guest has not accepted it) or ACCEPTED.

cdef enum:
    TDX_SEPT_PREMAPPED = 1
    TDX_SEPT_PENDING = 2
    TDX_SEPT_ACCEPTED = 3
    TD_STATE_UNINITIALIZED = 0
    TD_STATE_INITIALIZED = 1
    TD_STATE_RUNNABLE = 2
    # kvm.tdx_stats
    TDX_STAT_AUG = 0
    TDX_STAT_PAGE_ADD = 1
    TDX_STAT_BLOCK = 2
    TDX_STAT_TRACK = 3
    TDX_STAT_REMOVE = 4
    TDX_STAT_ACCEPT = 5


cdef int tdx_sept_set_private_spte(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil:
    cdef uint64_t old
    if level != PG_LEVEL_4K:
        return -_EINVAL                       # KVM_BUG_ON: private mappings are 4K
    if kvm.launch_state == TD_STATE_RUNNABLE:
        kvm.tdx_stats[TDX_STAT_AUG] += 1      # TDH.MEM.PAGE.AUG: pending until the guest accepts
        return xa_store_order(&kvm.sept, gfn, 0, (pfn << 4) | TDX_SEPT_PENDING, &old)
    kvm.nr_premapped += 1                     # before finalize: no SEAMCALL yet
    return xa_store_order(&kvm.sept, gfn, 0, (pfn << 4) | TDX_SEPT_PREMAPPED, &old)


cdef void tdx_sept_remove_private_spte(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil:
    cdef uint64_t v
    if not xa_erase(&kvm.sept, gfn, &v):
        return
    if (v & 15) == TDX_SEPT_PREMAPPED:
        kvm.nr_premapped -= 1                 # premapped, never added: nothing to remove
        return
    # BLOCK, TRACK, REMOVE, WBINVD, then tdx_clear_page (MOVDIR64B) before the page goes back
    kvm.tdx_stats[TDX_STAT_BLOCK] += 1
    kvm.tdx_stats[TDX_STAT_TRACK] += 1
    kvm.tdx_stats[TDX_STAT_REMOVE] += 1
    page_data_drop(kvm.host, pfn, 1)
