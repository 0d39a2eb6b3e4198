# Intel TDX (arch/x86/kvm/vmx/tdx.c and the TDX module it calls): the TD's life
# (KVM_TDX_INIT_VM, INIT_MEM_REGION with tdx_gmem_post_populate, FINALIZE_VM), the S-EPT as
# KVM drives it through the mirror root's external hooks, the EPT-violation exit handler, the
# guest's TDG.MEM.PAGE.ACCEPT and TDG.VP.VMCALL<MapGPA>.  Each private S-EPT leaf is
# PREMAPPED (mapped before KVM_TDX_FINALIZE_VM, not yet PAGE.ADDed), PENDING
# (TDH.MEM.PAGE.AUG done, the guest has not accepted it) or ACCEPTED.
#
# Huge leaves (proposed: Yan Zhao, "KVM: TDX huge page support for private memory" v3,
# 2026-01; Host(tdx_huge_page=)): once the TD runs, a private leaf may be 2M (or 1G, beyond
# that series), one multi-order entry of kvm.tdx.sept, uniformly PENDING or ACCEPTED (the TDX
# module's rule); it is demoted (BLOCK, TRACK, kick, DEMOTE) where a zap must be precise and
# never promoted; the guest's ACCEPT level caps the mapping (GUEST_INHIBIT).

cdef enum:
    TDX_SEPT_PREMAPPED = 1
    TDX_SEPT_PENDING = 2
    TDX_SEPT_ACCEPTED = 3
    TDX_SEPT_STATE_MASK = 15
    TDX_SEPT_PFN_SHIFT = 4
    TD_STATE_UNINITIALIZED = 0
    TD_STATE_INITIALIZED = 1
    TD_STATE_RUNNABLE = 2
    VCPU_TD_STATE_UNINITIALIZED = 0
    VCPU_TD_STATE_INITIALIZED = 1
    # kvm.tdx.stats
    TDX_STAT_AUG = 0
    TDX_STAT_PAGE_ADD = 1
    TDX_STAT_BLOCK = 2
    TDX_STAT_TRACK = 3
    TDX_STAT_REMOVE = 4
    TDX_STAT_ACCEPT = 5
    TDX_STAT_MR_EXTEND = 6
    TDX_STAT_DEMOTE = 7                 # TDH.MEM.PAGE.DEMOTE (proposed, huge pages)
    TDX_STAT_KICK = 8                   # vCPU kicks (TLB shootdown IPIs) before a DEMOTE
    TDX_MR_EXTEND_GRANULARITY = 256     # TDH.MR.EXTEND measures 256 bytes
    KVM_EXIT_HYPERCALL_LONG_MODE = 1

cdef extern from *:
    # arch/x86/include/asm/shared/tdx.h, arch/x86/virt/vmx/tdx/tdx.h: status codes
    """
    #define GMEM_TDX_SUCCESS (0ULL)
    #define GMEM_TDX_PAGE_ALREADY_ACCEPTED (0x00000B0A00000000ULL)
    #define GMEM_TDX_PAGE_SIZE_MISMATCH (0xC0000B0B00000000ULL)
    #define GMEM_TDX_OPERAND_INVALID (0xC000010000000000ULL)
    #define GMEM_TDVMCALL_STATUS_SUCCESS (0ULL)
    #define GMEM_TDVMCALL_STATUS_RETRY (1ULL)
    #define GMEM_TDVMCALL_STATUS_INVALID_OPERAND (0x8000000000000000ULL)
    #define GMEM_TDVMCALL_STATUS_ALIGN_ERROR (0x8000000000000002ULL)
    #define GMEM_TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED (0x8000000000000003ULL)
    #define GMEM_TDX_MAP_GPA_MAX_LEN (2ULL << 20)
    """
    const uint64_t TDX_SUCCESS "GMEM_TDX_SUCCESS"
    const uint64_t TDX_PAGE_ALREADY_ACCEPTED "GMEM_TDX_PAGE_ALREADY_ACCEPTED"
    # TDG.MEM.PAGE.ACCEPT at a size the S-EPT does not map at (the module's status; not in
    # 7.2's tdx_errno.h, which KVM does not need it in)
    const uint64_t TDX_PAGE_SIZE_MISMATCH "GMEM_TDX_PAGE_SIZE_MISMATCH"
    const uint64_t TDX_OPERAND_INVALID "GMEM_TDX_OPERAND_INVALID"
    const uint64_t TDVMCALL_STATUS_SUCCESS "GMEM_TDVMCALL_STATUS_SUCCESS"
    const uint64_t TDVMCALL_STATUS_RETRY "GMEM_TDVMCALL_STATUS_RETRY"
    const uint64_t TDVMCALL_STATUS_INVALID_OPERAND "GMEM_TDVMCALL_STATUS_INVALID_OPERAND"
    const uint64_t TDVMCALL_STATUS_ALIGN_ERROR "GMEM_TDVMCALL_STATUS_ALIGN_ERROR"
    const uint64_t TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED "GMEM_TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED"
    const uint64_t TDX_MAP_GPA_MAX_LEN "GMEM_TDX_MAP_GPA_MAX_LEN"


cdef const char *tdx_sept_state_name(int state) noexcept nogil:
    """An S-EPT leaf state's name (vm.sept()), or NULL for a value that is not one."""
    if state == TDX_SEPT_PREMAPPED:
        return "premapped"
    if state == TDX_SEPT_PENDING:
        return "pending"
    if state == TDX_SEPT_ACCEPTED:
        return "accepted"
    return NULL


cdef inline uint64_t tdx_sept_entry(uint64_t pfn, int state) noexcept nogil:
    return (pfn << TDX_SEPT_PFN_SHIFT) | state

cdef inline int tdx_sept_state(uint64_t entry) noexcept nogil:
    return entry & TDX_SEPT_STATE_MASK

cdef inline uint64_t tdx_sept_pfn(uint64_t entry) noexcept nogil:
    return entry >> TDX_SEPT_PFN_SHIFT


# ------------------------------------------------------------------ the VM

cdef void tdx_hooks_init(kvm_x86_hooks *hooks) noexcept nogil:
    """vt_x86_ops for KVM_X86_TDX_VM."""
    hooks.vm_init = tdx_vm_init
    hooks.vm_destroy = tdx_vm_destroy
    hooks.vm_launch = tdx_launch_minimal
    hooks.vcpu_create = tdx_vcpu_create
    hooks.is_private_fault = tdx_is_private_fault
    hooks.private_max_mapping_level = tdx_private_max_mapping_level
    hooks.set_external_spte = tdx_sept_set_private_spte
    hooks.remove_external_spte = tdx_sept_remove_private_spte
    hooks.split_external_spte = tdx_sept_split_private_spte
    hooks.handle_ept_violation = tdx_handle_ept_violation


cdef int tdx_vm_init(kvm *kvm) noexcept nogil:
    kvm.has_private_mem = 1
    kvm.has_protected_state = 1
    kvm.pre_fault_allowed = 0               # until KVM_TDX_FINALIZE_VM
    kvm.gfn_direct_bits = 0                 # KVM_TDX_INIT_VM chooses the shared bit
    kvm.tdx.state = TD_STATE_UNINITIALIZED
    xa_init(&kvm.tdx.sept)
    xas_init(&kvm.tdx.sept_xas, &kvm.tdx.sept, 0)
    return 0


cdef void tdx_vm_destroy(kvm *kvm) noexcept nogil:
    xa_destroy(&kvm.tdx.sept)


cdef int tdx_is_private_fault(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil:
    # tdx_handle_ept_violation: private unless the GPA carries the shared bit
    return ((gpa >> 12) & kvm.gfn_direct_bits) == 0


cdef int tdx_private_max_mapping_level(kvm *kvm, uint64_t pfn) noexcept nogil:
    """tdx_gmem_max_mapping_level: 4K (7.2). Proposed (v3 "Turn on PG_LEVEL_2M after TD is
    RUNNABLE"): with tdx_huge_page, the option's level once the TD runs; 4K while it is built,
    since TDH.MEM.PAGE.ADD adds 4K pages only."""
    if kvm.tdx.state != TD_STATE_RUNNABLE or not kvm.host.tdx_huge_page:
        return PG_LEVEL_4K
    return kvm.host.tdx_huge_page


cdef int tdx_td_init(kvm *kvm, int gpaw) noexcept nogil:
    """KVM_TDX_INIT_VM (tdx_td_init): GPAW 52 (shared bit 51) or 48 (shared bit 47); the TD is
    being built: vCPUs may be created now, and only now."""
    if kvm.tdx.state != TD_STATE_UNINITIALIZED or (gpaw != 48 and gpaw != 52):
        return _refuse(kvm.host, -EINVAL, "already initialised, or GPAW not 48/52")
    kvm.gfn_direct_bits = (<uint64_t>1) << ((51 if gpaw == 52 else 47) - 12)
    kvm.tdx.state = TD_STATE_INITIALIZED
    kvm.pre_fault_allowed = 0
    return 0


cdef int tdx_td_finalize(kvm *kvm) noexcept nogil:
    """KVM_TDX_FINALIZE_VM: refused (EINVAL) while a premapped page was never added. The
    vCPUs that had KVM_TDX_INIT_VCPU may run (tdx_vcpu_pre_run)."""
    cdef uint32_t i
    if kvm.tdx.state != TD_STATE_INITIALIZED or kvm.tdx.nr_premapped:
        return _refuse(kvm.host, -EINVAL, "TD not initialised, or premapped pages not added")
    kvm.tdx.state = TD_STATE_RUNNABLE
    kvm.pre_fault_allowed = 1
    for i in range(KVM_MAX_VCPU_IDS):
        if kvm.vcpus[i] != NULL and kvm.vcpus[i].tdx_state == VCPU_TD_STATE_INITIALIZED:
            kvm.vcpus[i].pre_run_err = 0
    return 0


cdef int tdx_vcpu_create(kvm_vcpu *vcpu) noexcept nogil:
    """tdx_vcpu_create: a TD takes vCPUs only between KVM_TDX_INIT_VM and FINALIZE_VM (-EIO);
    each runs once it had KVM_TDX_INIT_VCPU and the TD is finalized."""
    cdef kvm *kvm = vcpu.kvm
    if kvm.launched_minimal:
        vcpu.tdx_state = VCPU_TD_STATE_INITIALIZED      # kvm_launch: as if made during the build
        return 0
    if kvm.tdx.state != TD_STATE_INITIALIZED:
        return _refuse(kvm.host, -EIO, "KVM_CREATE_VCPU on a TD outside KVM_TDX_INIT_VM .. "
                       "KVM_TDX_FINALIZE_VM (tdx_vcpu_create)")
    vcpu.pre_run_err = -EINVAL
    return 0


cdef int tdx_vcpu_init(kvm_vcpu *vcpu) noexcept nogil:
    """KVM_TDX_INIT_VCPU (tdx_vcpu_init): once per vCPU, while the TD is being built."""
    if vcpu.kvm.tdx.state != TD_STATE_INITIALIZED or vcpu.tdx_state != VCPU_TD_STATE_UNINITIALIZED:
        return _refuse(vcpu.kvm.host, -EINVAL, "KVM_TDX_INIT_VCPU: the TD is not being built, or "
                       "the vCPU is initialised already")
    vcpu.tdx_state = VCPU_TD_STATE_INITIALIZED
    return 0


cdef int tdx_launch_minimal(kvm *kvm) noexcept nogil:
    """vm.launch() for TDX: INIT_VM (unless done), INIT_VCPU for each vCPU not yet
    initialised, then FINALIZE_VM with no initial memory."""
    cdef uint32_t i
    cdef int r = tdx_td_init(kvm, 52) if kvm.tdx.state == TD_STATE_UNINITIALIZED else 0
    for i in range(KVM_MAX_VCPU_IDS):
        if r == 0 and kvm.vcpus[i] != NULL and kvm.vcpus[i].tdx_state == VCPU_TD_STATE_UNINITIALIZED:
            r = tdx_vcpu_init(kvm.vcpus[i])
    return r if r else tdx_td_finalize(kvm)


# ----------------------------------------------------------------- the S-EPT

cdef int tdx_sept_set_private_spte(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil:
    cdef uint64_t old
    if level > tdx_private_max_mapping_level(kvm, pfn):
        return -EINVAL                        # KVM_BUG_ON: private mappings are 4K (7.2)
    xas_set(&kvm.tdx.sept_xas, gfn)
    if kvm.tdx.state == TD_STATE_RUNNABLE:
        kvm.tdx.stats[TDX_STAT_AUG] += 1      # TDH.MEM.PAGE.AUG: pending until the guest accepts
        gmem_trace(kvm.host, TRACE_TDX_PAGE_AUG, TRACE_NO_VCPU, gfn, pfn, level, 0)
        return xas_store(&kvm.tdx.sept_xas, _level_order(level), tdx_sept_entry(pfn, TDX_SEPT_PENDING), &old)
    kvm.tdx.nr_premapped += 1                 # before finalize: no SEAMCALL yet
    return xas_store(&kvm.tdx.sept_xas, 0, tdx_sept_entry(pfn, TDX_SEPT_PREMAPPED), &old)


cdef void tdx_sept_remove_private_spte(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil:
    cdef uint64_t v
    if not xa_erase(&kvm.tdx.sept, gfn, &v):
        return
    if tdx_sept_state(v) == TDX_SEPT_PREMAPPED:
        kvm.tdx.nr_premapped -= 1             # premapped, never added: nothing to remove
        return
    # BLOCK, TRACK (tdx_track: only once the TD runs), REMOVE, WBINVD, then tdx_clear_page
    # (MOVDIR64B) before the page goes back
    kvm.tdx.stats[TDX_STAT_BLOCK] += 1
    gmem_trace(kvm.host, TRACE_TDX_RANGE_BLOCK, TRACE_NO_VCPU, gfn, 0, level, 0)
    if kvm.tdx.state == TD_STATE_RUNNABLE:
        tdx_track_and_kick(kvm)
    kvm.tdx.stats[TDX_STAT_REMOVE] += 1
    gmem_trace(kvm.host, TRACE_TDX_PAGE_REMOVE, TRACE_NO_VCPU, gfn, pfn, level, 0)
    page_data_drop(kvm.host, pfn, _pages(_level_order(level)))   # a huge leaf: the whole of it


cdef void tdx_track_and_kick(kvm *kvm) noexcept nogil:
    """TDH.MEM.TRACK, then kick every vCPU (a TLB shootdown IPI) so none still holds a
    translation of a blocked range (tdx_track)."""
    kvm.tdx.stats[TDX_STAT_TRACK] += 1
    gmem_trace(kvm.host, TRACE_TDX_TRACK, TRACE_NO_VCPU, 0, 0, 0, 0)
    kvm.tdx.stats[TDX_STAT_KICK] += 1


cdef int tdx_sept_split_private_spte(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil:
    """Demote the huge leaf at gfn into 512 leaves of the next level, each keeping its state
    (proposed, v3 "KVM: TDX: Implement huge page splitting"; current module, without
    NON-BLOCKING-RESIZE): TDH.MEM.RANGE.BLOCK, TDH.MEM.TRACK, kick the vCPUs,
    TDH.MEM.PAGE.DEMOTE. 0, or -ENOMEM with nothing changed."""
    cdef uint64_t v, old, first, step
    cdef int order, sub, i, r
    if not xa_lookup(&kvm.tdx.sept, gfn, &v, &first, &order) or first != gfn or \
            order != _level_order(level) or tdx_sept_pfn(v) != pfn:
        return -EIO                           # KVM_BUG_ON: the mirror and the S-EPT disagree
    sub = _level_order(level - 1)
    r = xa_split(&kvm.tdx.sept, gfn, sub)
    if r < 0:
        return r
    step = _pages(sub)
    for i in range(SPTE_ENT_PER_PAGE):        # stores onto entries there: they cannot fail
        xa_store_order(&kvm.tdx.sept, gfn + i * step, sub,
                       tdx_sept_entry(pfn + i * step, tdx_sept_state(v)), &old)
    kvm.tdx.stats[TDX_STAT_BLOCK] += 1
    gmem_trace(kvm.host, TRACE_TDX_RANGE_BLOCK, TRACE_NO_VCPU, gfn, 0, level, 0)
    tdx_track_and_kick(kvm)
    kvm.tdx.stats[TDX_STAT_DEMOTE] += 1
    gmem_trace(kvm.host, TRACE_TDX_PAGE_DEMOTE, TRACE_NO_VCPU, gfn, pfn, level, 0)
    return 0


cdef int tdx_sept_leaf(kvm *kvm, uint64_t gfn, uint64_t *first, uint64_t *pfn, int *level) noexcept nogil:
    """The S-EPT leaf covering gfn: its state (TDX_SEPT_*) with its first gfn, the pfn it maps
    there and its level, or 0 if there is none."""
    cdef uint64_t v
    cdef int order
    if not xa_lookup(&kvm.tdx.sept, gfn, &v, first, &order):
        return 0
    pfn[0] = tdx_sept_pfn(v)
    level[0] = kvm_max_level_for_order(order)
    return tdx_sept_state(v)


cdef int tdx_sept_lookup(kvm *kvm, uint64_t gfn, uint64_t *pfn) noexcept nogil:
    """The S-EPT at gfn: its leaf's state (TDX_SEPT_*) with the pfn gfn maps to, or 0 if
    there is none."""
    cdef uint64_t first
    cdef int level, state = tdx_sept_leaf(kvm, gfn, &first, pfn, &level)
    pfn[0] += gfn - first
    return state


# ------------------------------------------------------------ EPT violations

cdef int tdx_handle_ept_violation(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                                  kvm_fault_out *out) noexcept nogil:
    """tdx_handle_ept_violation: a private access is always a write; a fetch from shared
    memory is a bug; private faults retry inside KVM (local_retry), not re-entering the TD."""
    cdef kvm *kvm = vcpu.kvm
    cdef int r, tries = 0
    if error_code & PFERR_PRIVATE_ACCESS:
        error_code = (error_code & (PFERR_GUEST_FINAL_MASK | PFERR_GUEST_PAGE_MASK)) | \
            PFERR_WRITE_MASK | PFERR_PRIVATE_ACCESS
    elif error_code & PFERR_FETCH_MASK:
        out.ret = -EIO                        # KVM_BUG_ON: a TD cannot fetch from shared memory
        return out.ret
    r = kvm_mmu_page_fault_checks(vcpu, gpa, error_code, out)
    if r != RET_PF_INVALID and r != RET_PF_RETRY:
        return r
    if r == RET_PF_INVALID:
        vcpu.stats[VCPU_STAT_PF_TAKEN] += 1
        r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, out)
    if error_code & PFERR_PRIVATE_ACCESS:
        # (an invalidation still in progress can only be a Python hook's caller: the vCPU goes
        # back to the guest, as it would on a pending signal)
        while r == RET_PF_RETRY and not kvm.host.hook_error and not kvm.mmu_invalidate_in_progress \
                and tries < KVM_FAULT_RETRIES_BEFORE_SIGNAL:
            tries += 1
            vcpu.stats[VCPU_STAT_PF_RETRY] += 1
            vcpu.stats[VCPU_STAT_PF_TAKEN] += 1
            r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, out)
    return kvm_mmu_page_fault_done(vcpu, gpa, error_code, r, out)


# ---------------------------------------------------------- initial memory

ctypedef struct tdx_gmem_post_populate_arg:
    kvm_vcpu *vcpu
    bint measure                # KVM_TDX_MEASURE_MEMORY_REGION


cdef int tdx_gmem_post_populate(kvm *kvm, uint64_t gfn, uint64_t pfn, uint64_t src, int order,
                                void *opaque) noexcept nogil:
    cdef tdx_gmem_post_populate_arg *arg = <tdx_gmem_post_populate_arg *>opaque
    cdef kvm_vcpu *vcpu = arg.vcpu
    cdef uint64_t spfn, v, old
    cdef int level, r
    # the source is pinned before anything is mapped (get_user_pages_fast in
    # kvm_gmem_populate, 6.18 and 7.0+): a bad one maps nothing. 7.2 has no source for 0
    # (tdx_gmem_post_populate: -EOPNOTSUPP) unless the page is converted in place ("next")
    if src == 0 and kvm.host.kernel >= GMEM_KERNEL_7_2 and not kvm.host.gmem_in_place_conversion:
        return -EOPNOTSUPP
    if (src or kvm.host.kernel < GMEM_KERNEL_7_2) and hva_to_pfn(kvm.host, src, &spfn):
        return -EFAULT                          # (6.18: get_user_pages_fast(0) as well)
    # build the mirror leaf: 6.18 premaps it (the TD is not runnable yet), 7.2 maps and adds
    # in one step (kvm_tdp_mmu_map_private_pfn: anything but RET_PF_FIXED, e.g. a gfn mapped
    # already, is -EIO)
    if kvm.host.kernel >= GMEM_KERNEL_7_2 and xa_load(&kvm.tdx.sept, gfn, &v):
        return -EIO                             # RET_PF_SPURIOUS: mapped already
    r = kvm_tdp_map_page(vcpu, gfn << 12, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS, &level)
    if r < 0:
        return r
    # TDH.MEM.PAGE.ADD: the page enters the TD with the source's contents, accepted
    r = host_copy_page(kvm.host, pfn, spfn) if src else 0
    if r:
        return r
    if xa_load(&kvm.tdx.sept, gfn, &v) and tdx_sept_state(v) == TDX_SEPT_PREMAPPED:
        kvm.tdx.nr_premapped -= 1
    xa_store_order(&kvm.tdx.sept, gfn, 0, tdx_sept_entry(pfn, TDX_SEPT_ACCEPTED), &old)
    kvm.tdx.stats[TDX_STAT_PAGE_ADD] += 1
    gmem_trace(kvm.host, TRACE_TDX_PAGE_ADD, TRACE_NO_VCPU, gfn, pfn, PG_LEVEL_4K, 0)
    if arg.measure:
        kvm.tdx.stats[TDX_STAT_MR_EXTEND] += 4096 // TDX_MR_EXTEND_GRANULARITY    # TDH.MR.EXTEND
    return 0


cdef int tdx_vcpu_init_mem_region(kvm_vcpu *vcpu, uint64_t src, uint64_t gpa, uint64_t nr_pages,
                                  bint measure, uint64_t *done) noexcept nogil:
    """KVM_TDX_INIT_MEM_REGION: copy nr_pages from the VMM's memory at src into the TD's private
    memory at gpa (premap, then TDH.MEM.PAGE.ADD), a page at a time: 0, or -errno with *done
    the pages added before the failure (they stay)."""
    cdef kvm *kvm = vcpu.kvm
    cdef int64_t r
    cdef tdx_gmem_post_populate_arg arg
    arg.vcpu, arg.measure = vcpu, measure
    done[0] = 0
    if kvm.tdx.state != TD_STATE_INITIALIZED or vcpu.tdx_state != VCPU_TD_STATE_INITIALIZED:
        return _refuse(kvm.host, -EINVAL, "the TD is not being built (initial memory is fixed), "
                       "or the vCPU had no KVM_TDX_INIT_VCPU")
    if src & 4095 or gpa & 4095 or nr_pages == 0 or nr_pages >= (<uint64_t>1) << 52 or \
            gpa + (nr_pages << 12) <= gpa or (gpa >> 12) & kvm.gfn_direct_bits or \
            ((gpa + (nr_pages << 12) - 1) >> 12) & kvm.gfn_direct_bits:
        return _refuse(kvm.host, -EINVAL, "unaligned, empty, wrapping or shared range")
    while done[0] < nr_pages:
        r = kvm_gmem_populate(kvm, (gpa >> 12) + done[0], src + (done[0] << 12), 1,
                              tdx_gmem_post_populate, &arg)
        if kvm.host.hook_error:
            return -EIO
        if r != 1:
            return _refuse(kvm.host, <int>r if r < 0 else -EIO, "a page failed (kvm_gmem_populate)")
        done[0] += 1
    return 0


# ------------------------------------------------------------ the guest's calls

cdef int tdx_accept_ept_violation(kvm_vcpu *vcpu, uint64_t gpa, int level, kvm_fault_out *out) noexcept nogil:
    """The EPT violation TDG.MEM.PAGE.ACCEPT exits with when gpa is not mapped at or above the
    ACCEPT level, or is mapped PENDING above it, as tdx_handle_ept_violation takes it.
    Proposed (v3 "KVM: TDX: Honor the guest's accept level contained in an EPT violation"):
    an ACCEPT level below what KVM may map sets GUEST_INHIBIT for every level above it, one-way,
    and splits the leaf over gpa (under the write mmu_lock); the fault then maps at most at
    that level. 0 if something maps gpa now, else GUEST_ACCESS_EXIT / GUEST_ACCESS_HOOK_ERROR."""
    cdef kvm *kvm = vcpu.kvm
    cdef uint64_t gfn = gpa >> 12, start = gfn & ~_mask(_level_order(level)), v
    cdef kvm_memory_slot *slot = gfn_to_memslot(kvm, gfn)
    cdef int lvl
    if level < kvm.host.tdx_huge_page:
        for lvl in range(level + 1, KVM_MAX_HUGEPAGE_LEVEL + 1):
            if slot != NULL:
                hugepage_set_guest_inhibit(slot, gfn, lvl)
        kvm_split_cross_boundary_leafs(kvm, start, start + _pages(_level_order(level)), KVM_FILTER_PRIVATE)
    kvm_mmu_page_fault(vcpu, start << 12, PFERR_WRITE_MASK, out)
    if kvm.host.hook_error:
        return GUEST_ACCESS_HOOK_ERROR
    if out.ret < 0 or not xa_load(&kvm.tdx.sept, gfn, &v):
        return GUEST_ACCESS_EXIT
    return 0


cdef int tdx_accept_page(kvm_vcpu *vcpu, uint64_t gpa, int level, uint64_t *status,
                         kvm_fault_out *out) noexcept nogil:
    """TDG.MEM.PAGE.ACCEPT of the private page of that level (4K or 2M) at gpa, as the TDX
    module walks the S-EPT (tdg_mem_page_accept): a table at the ACCEPT level is
    TDX_PAGE_SIZE_MISMATCH (the guest retries at 4K); a leaf at or above it already accepted is
    TDX_PAGE_ALREADY_ACCEPTED; a PENDING leaf at that level is accepted whole (a 2M one: its
    512 pages); anything else is an EPT violation (tdx_accept_ept_violation), then the walk
    again. 0 with *status (those, TDX_SUCCESS, TDX_OPERAND_INVALID for a bad level or
    alignment, TDVMCALL_STATUS_INVALID_OPERAND for a shared gpa), GUEST_ACCESS_EXIT (out:
    why), GUEST_ACCESS_HOOK_ERROR, or -EINVAL before the TD runs."""
    cdef kvm *kvm = vcpu.kvm
    cdef uint64_t gfn = gpa >> 12, first = 0, pfn = 0, old
    cdef int slevel, llevel, state, r, tries
    if kvm.tdx.state != TD_STATE_RUNNABLE:
        # no guest instruction runs before KVM_TDX_FINALIZE_VM (tdx_vcpu_pre_run: -EINVAL);
        # accepting here would turn a premapped leaf into an accepted one behind nr_premapped
        return _refuse(kvm.host, -EINVAL, "the TD is not runnable yet (KVM_RUN before "
                       "KVM_TDX_FINALIZE_VM)")
    if gfn & kvm.gfn_direct_bits:
        status[0] = TDVMCALL_STATUS_INVALID_OPERAND
        return 0
    if level < PG_LEVEL_4K or level > PG_LEVEL_2M or gfn & _mask(_level_order(level)):
        status[0] = TDX_OPERAND_INVALID         # verify_page_info_input: 4K or 2M, aligned
        return 0
    for tries in range(KVM_MAX_HUGEPAGE_LEVEL + 1):
        if kvm_tdp_mmu_mirror_spte(kvm, gfn, &slevel) and slevel >= level:
            state = tdx_sept_leaf(kvm, gfn, &first, &pfn, &llevel)
            if state == TDX_SEPT_ACCEPTED:
                status[0] = TDX_PAGE_ALREADY_ACCEPTED
                return 0
            if slevel == level:
                xa_store_order(&kvm.tdx.sept, first, _level_order(level),
                               tdx_sept_entry(pfn, TDX_SEPT_ACCEPTED), &old)
                kvm.tdx.stats[TDX_STAT_ACCEPT] += 1
                status[0] = TDX_SUCCESS
                gmem_trace(kvm.host, TRACE_TDX_ACCEPT, vcpu.vcpu_id, gpa, pfn, level, TDX_SUCCESS)
                return 0
        elif slevel < level:
            status[0] = TDX_PAGE_SIZE_MISMATCH  # a table where the ACCEPT level's leaf would be
            return 0
        r = tdx_accept_ept_violation(vcpu, gpa, level, out)
        if r:
            return r
    return GUEST_ACCESS_EXIT


cdef int tdx_map_gpa_exit(kvm_vcpu *vcpu, uint64_t next) noexcept nogil:
    """Exit to userspace with the next chunk (at most 2M) of the MapGPA request."""
    cdef uint64_t direct = vcpu.kvm.gfn_direct_bits << 12
    cdef uint64_t size = vcpu.map_gpa_end - next
    if size > TDX_MAP_GPA_MAX_LEN:
        size = TDX_MAP_GPA_MAX_LEN
    vcpu.hypercall.nr = KVM_HC_MAP_GPA_RANGE
    vcpu.hypercall.args[0] = next & ~direct
    vcpu.hypercall.args[1] = size >> 12
    vcpu.hypercall.args[2] = 0 if next & direct else KVM_MAP_GPA_RANGE_ENCRYPTED
    vcpu.hypercall.flags = KVM_EXIT_HYPERCALL_LONG_MODE
    vcpu.map_gpa_next = next
    vcpu.complete_userspace_io = tdx_complete_vmcall_map_gpa
    return KVM_EXIT_HYPERCALL


cdef int tdx_map_gpa(kvm_vcpu *vcpu, uint64_t gpa, uint64_t size, uint64_t *status) noexcept nogil:
    """TDG.VP.VMCALL<MapGPA>: the shared bit of gpa says the target state. KVM_EXIT_HYPERCALL
    per 2M chunk, or 0 with the TDVMCALL status in *status."""
    cdef kvm *kvm = vcpu.kvm
    cdef uint64_t direct = kvm.gfn_direct_bits << 12
    if not user_exit_on_hypercall(kvm, KVM_HC_MAP_GPA_RANGE):
        status[0] = TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
        return 0
    if gpa + size <= gpa or (gpa + size - 1) >> 52 or ((gpa & direct) != 0) != (((gpa + size - 1) & direct) != 0):
        status[0] = TDVMCALL_STATUS_INVALID_OPERAND
        return 0
    if gpa & 4095 or size & 4095:
        status[0] = TDVMCALL_STATUS_ALIGN_ERROR
        return 0
    vcpu.map_gpa_end = gpa + size
    return tdx_map_gpa_exit(vcpu, gpa)


cdef int tdx_complete_vmcall_map_gpa(kvm_vcpu *vcpu, uint64_t ret, uint64_t *status) noexcept nogil:
    cdef uint64_t next = vcpu.map_gpa_next + TDX_MAP_GPA_MAX_LEN
    if ret == EAGAIN and vcpu.kvm.host.kernel >= GMEM_KERNEL_7_2:
        status[0] = TDVMCALL_STATUS_RETRY       # the guest retries from the chunk (7.1+)
        return 0
    if ret:
        status[0] = TDVMCALL_STATUS_INVALID_OPERAND
        return 0
    if next >= vcpu.map_gpa_end:
        status[0] = TDVMCALL_STATUS_SUCCESS
        return 0
    return tdx_map_gpa_exit(vcpu, next)


cdef bint tdx_access_pending(kvm_vcpu *vcpu, uint64_t gpa) noexcept nogil:
    """A TD's access to a private page it has not accepted: with SEPT_VE_DISABLE (which KVM
    requires) the module exits to KVM as a PENDING EPT violation, and
    tdx_handle_ept_violation (tdx_is_sept_violation_unexpected_pending, 6.16 to 7.2) kills
    the VM: kvm_vm_dead, KVM_RUN -EIO."""
    cdef uint64_t v
    if (gpa >> 12) & vcpu.kvm.gfn_direct_bits:
        return False
    return xa_load(&vcpu.kvm.tdx.sept, gpa >> 12, &v) and tdx_sept_state(v) == TDX_SEPT_PENDING


cdef bint tdx_sept_next(kvm *kvm, uint64_t *start, uint64_t *gfn, uint64_t *pfn, int *state,
                        int *level) noexcept nogil:
    """The next S-EPT leaf at or after *start: 1 with its first gfn, pfn, state and level,
    *start past it."""
    cdef uint64_t v
    cdef int order
    if start[0] == INVALID_GFN or not xa_find_entry(&kvm.tdx.sept, start[0], INVALID_GFN, XA_NO_MARK,
                                                    gfn, &order, &v):
        return 0
    pfn[0], state[0] = tdx_sept_pfn(v), tdx_sept_state(v)
    level[0] = kvm_max_level_for_order(order)
    start[0] = gfn[0] + _pages(order)
    return 1


cdef int tdx_td_state(const kvm *kvm) noexcept nogil:
    return kvm.tdx.state


cdef int64_t tdx_nr_premapped(const kvm *kvm) noexcept nogil:
    return kvm.tdx.nr_premapped


cdef uint64_t tdx_stat(const kvm *kvm, int which) noexcept nogil:
    return kvm.tdx.stats[which] if 0 <= which < TDX_NR_STATS else 0
