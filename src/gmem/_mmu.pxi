# arch/x86/kvm/mmu/mmu.c: the TDP page-fault path with the 64-bit error code, from
# kvm_mmu_page_fault down to kvm_tdp_mmu_map (the page tables are _tdp_mmu.pxi's); unmapping
# a gfn range; the batch of faults (kvm_mmu_page_fault_batch, with its prefetching
# pipeline); KVM_PRE_FAULT_MEMORY's kvm_tdp_map_page; SW_PROTECTED's private-fault rule.
# Vendors' rules come in through the hook table (_x86.pxi): nothing here names SNP's or
# TDX's internals.

cdef inline bint kvm_is_addr_direct(const kvm *kvm, uint64_t gpa) noexcept nogil:
    """mmu.h: gpa is mapped by the direct root (the VM has no direct bits, or gpa has them)."""
    return kvm.gfn_direct_bits == 0 or ((gpa >> 12) & kvm.gfn_direct_bits) != 0


cdef uint64_t kvm_unmap_gfn_range(kvm *kvm, uint64_t start, uint64_t end, int filter) noexcept nogil:
    """Zap the SPTEs overlapping [start, end) in the roots filter names (0: all), huge ones
    whole (kvm_tdp_mmu_unmap_gfn_range: the filter only picks the mirror or the direct root,
    kvm_gfn_range_filter_to_root_types; a VM without mirrored TDP has one root)."""
    cdef uint64_t zapped = 0
    if end <= start:
        return 0
    if not kvm_has_mirrored_tdp(kvm):
        filter = 0
    # the roots in the order the kernel lists them (the direct root was added last)
    if filter != KVM_FILTER_PRIVATE:
        zapped += tdp_mmu_zap_leafs(kvm, TDP_ROOT_DIRECT, start, end)
    if filter != KVM_FILTER_SHARED:
        zapped += tdp_mmu_zap_leafs(kvm, TDP_ROOT_MIRROR, start, end)
    if filter != KVM_FILTER_PRIVATE:
        xa_erase_range(&kvm.mmio_sptes, start, end - 1)
    if zapped:
        kvm.stats[VM_STAT_ZAPPED_SPTES] += zapped
        kvm.stats[VM_STAT_REMOTE_TLB_FLUSH] += 1
    return zapped


cdef void kvm_unmap_huge_leafs(kvm *kvm, uint64_t start, uint64_t end, int order) noexcept nogil:
    """Before the folios under [start, end) are split to order: no leaf larger than them may
    stay. Private leaves of a VM whose zaps must be precise are split down (TDX: demote, the
    guest keeps what it accepted); the others are zapped (smaller leaves keep mapping the
    same pfns; the next fault maps at the new size)."""
    cdef uint64_t zapped = 0
    cdef int root, max_level = kvm_max_level_for_order(order)
    if max_level >= KVM_MAX_HUGEPAGE_LEVEL or end <= start:
        return
    for root in range(TDP_NR_ROOTS):
        if root == TDP_ROOT_MIRROR and kvm_private_zap_must_be_precise(kvm):
            tdp_mmu_split_leafs_above(kvm, root, start, end, max_level)
        else:
            zapped += tdp_mmu_zap_leafs(kvm, root, start, end, max_level + 1)
    if zapped:
        kvm.stats[VM_STAT_ZAPPED_SPTES] += zapped
        kvm.stats[VM_STAT_REMOTE_TLB_FLUSH] += 1

# ------------------------------------------- precise private zaps (proposed)

cdef inline bint kvm_private_zap_must_be_precise(const kvm *kvm) noexcept nogil:
    """A VM whose guest must re-accept whatever private memory is zapped, so that a huge
    private leaf is split rather than zapped whole (the VMs with a mirror root: TDX; a no-op
    walk where no leaf is huge)."""
    return kvm_has_mirrored_tdp(kvm)


cdef void kvm_split_private_leafs(kvm *kvm, uint64_t start, uint64_t end) noexcept nogil:
    """Before private leaves in [start, end) are zapped: split the huge ones crossing its
    edges (v3 16/24 "Split for punch hole and private-to-shared conversion"). A failure
    (-ENOMEM for a table) leaves the zap imprecise, as a KVM_BUG_ON would end the TD."""
    if kvm_private_zap_must_be_precise(kvm):
        kvm_split_cross_boundary_leafs(kvm, start, end, KVM_FILTER_PRIVATE)


cdef inline void hugepage_set_guest_inhibit(kvm_memory_slot *slot, uint64_t gfn, int level) noexcept nogil:
    """Proposed (v3 12/24): the guest accepts below level here, so no mapping of level may
    cover gfn again: KVM_LPAGE_GUEST_INHIBIT_FLAG in disallow_lpage, set one-way (there is
    no promotion that clearing it could allow)."""
    lpage_info_slot(slot, gfn, level)[0] |= KVM_LPAGE_GUEST_INHIBIT_FLAG


cdef inline bint hugepage_test_guest_inhibit(kvm_memory_slot *slot, uint64_t gfn, int level) noexcept nogil:
    return (lpage_info_slot(slot, gfn, level)[0] & KVM_LPAGE_GUEST_INHIBIT_FLAG) != 0


ctypedef struct kvm_page_fault:
    uint64_t error_code
    uint64_t gfn
    uint64_t pfn
    uint64_t mmu_seq
    kvm_memory_slot *slot
    # the kernel's bools, one byte each: gcc stores a flag with setne to memory, and a wider
    # load of it stalls on store-to-load forwarding (measured: +4 ns a fault)
    uint8_t is_private
    uint8_t write
    uint8_t present
    uint8_t map_writable
    int max_level
    int goal_level


cdef inline int _min(int a, int b) noexcept nogil:
    return a if a < b else b


cdef inline int kvm_max_level_for_order(int order) noexcept nogil:
    if order >= 18:
        return PG_LEVEL_1G
    if order >= 9:
        return PG_LEVEL_2M
    return PG_LEVEL_4K


cdef inline int kvm_mmu_prepare_memory_fault_exit(kvm_vcpu *vcpu, kvm_page_fault *fault,
                                                  kvm_fault_out *out, int ret) noexcept nogil:
    # the gfn without the shared bit, one page, PRIVATE if the access was private
    out.exit_reason = KVM_EXIT_MEMORY_FAULT
    out.gpa = fault.gfn << 12
    vcpu.memory_fault_size = 4096
    out.flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
    vcpu.stats[VCPU_STAT_MEMORY_FAULT_EXITS] += 1
    gmem_trace(vcpu.kvm.host, TRACE_MEMORY_FAULT_EXIT, vcpu.vcpu_id, out.gpa, out.flags,
               <uint64_t>(-ret), 0)
    return ret


cdef int kvm_mmu_faultin_pfn_gmem(kvm_vcpu *vcpu, kvm_page_fault *fault, kvm_fault_out *out) noexcept nogil:
    cdef int r, max_order = 0
    if not kvm_slot_has_gmem(fault.slot):
        return kvm_mmu_prepare_memory_fault_exit(vcpu, fault, out, -EFAULT)
    r = __kvm_gmem_get_pfn(vcpu.kvm, fault.slot, fault.gfn, &fault.pfn, &max_order, &vcpu.gmem_cursor)
    if r:
        return kvm_mmu_prepare_memory_fault_exit(vcpu, fault, out, r)
    fault.map_writable = not (fault.slot.flags & KVM_MEM_READONLY)
    fault.max_level = kvm_max_level_for_order(max_order)
    return RET_PF_CONTINUE


cdef int kvm_mmu_faultin_pfn(kvm_vcpu *vcpu, kvm_page_fault *fault, kvm_fault_out *out) noexcept nogil:
    cdef kvm *kvm = vcpu.kvm
    cdef kvm_memory_slot *slot = fault.slot
    cdef uint64_t old
    cdef int r
    # snapshot the sequence before anything is looked up
    fault.mmu_seq = kvm.mmu_invalidate_seq
    if fault.is_private != _kvm_mem_is_private(kvm, fault.gfn):
        return kvm_mmu_prepare_memory_fault_exit(vcpu, fault, out, -EFAULT)
    if slot == NULL:
        # kvm_handle_noslot_fault: private -> exit; shared -> MMIO SPTE, emulate
        if fault.is_private:
            return kvm_mmu_prepare_memory_fault_exit(vcpu, fault, out, -EFAULT)
        if xa_store_order(&kvm.mmio_sptes, fault.gfn, 0, kvm.memslots_generation, &old) < 0:
            return -ENOMEM
        return RET_PF_EMULATE
    if mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn):
        return RET_PF_RETRY
    # __kvm_mmu_faultin_pfn: a gmem-only slot serves shared faults from the file too, with no
    # check that the file holds shared memory (on a TDX VM, whose files cannot be INIT_SHARED,
    # that shared SPTE survives a punch: see kvm_gmem_invalidate_filter)
    if fault.is_private or kvm_memslot_is_gmem_only(slot):
        r = kvm_mmu_faultin_pfn_gmem(vcpu, fault, out)
        if r != RET_PF_CONTINUE:
            return r
    else:
        if fault.write and slot.flags & KVM_MEM_READONLY:
            # __gfn_to_hva_many gives KVM_HVA_ERR_RO_BAD -> KVM_PFN_ERR_RO_FAULT, which
            # kvm_handle_error_pfn turns into emulation (MMIO semantics for a ROM)
            return RET_PF_EMULATE
        r = hva_to_pfn(kvm.host, slot.userspace_addr + ((fault.gfn - slot.base_gfn) << 12), &fault.pfn)
        if r:
            # kvm_handle_error_pfn: an hva nothing is mapped at is -EFAULT from KVM_RUN, with
            # no KVM_EXIT_MEMORY_FAULT (a memory-fault exit for it was proposed, never merged)
            return -EFAULT
        fault.map_writable = not (slot.flags & KVM_MEM_READONLY)
        fault.max_level = PG_LEVEL_4K      # the VMM's memory is in 4K pages
    if mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn):
        return RET_PF_RETRY
    return RET_PF_CONTINUE


cdef void kvm_mmu_hugepage_adjust(kvm *kvm, kvm_page_fault *fault) noexcept nogil:
    """goal = min(folio order level, lpage_info (slot edges, mixed attributes), vendor limit)."""
    cdef int level = _min(fault.max_level, KVM_MAX_HUGEPAGE_LEVEL), vendor
    cdef private_max_mapping_level_t hook
    fault.goal_level = PG_LEVEL_4K
    if level == PG_LEVEL_4K or fault.slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    while level > PG_LEVEL_4K and lpage_info_slot(fault.slot, fault.gfn, level)[0] != 0:
        level -= 1
    if level == PG_LEVEL_4K:
        return
    if fault.is_private:
        hook = kvm.host.hooks[kvm.vm_type].private_max_mapping_level
        if hook != NULL:
            vendor = hook(kvm, fault.pfn)
            if vendor:
                level = _min(level, vendor)
    fault.goal_level = level
    fault.pfn &= ~_mask(_level_order(level))


cdef inline int page_fault_can_be_fast(kvm *kvm, const kvm_page_fault *fault) noexcept nogil:
    if fault.error_code & PFERR_RSVD_MASK:
        return 0
    if kvm.has_private_mem and fault.is_private != _kvm_mem_is_private(kvm, fault.gfn):
        return 0
    if not fault.present:
        return 0            # TDP with A/D bits: a not-present fault is never fast
    return fault.write


cdef inline int fast_page_fault(kvm_vcpu *vcpu, const kvm_page_fault *fault, kvm_fault_out *out) noexcept nogil:
    cdef tdp_cursor *c = &vcpu.tdp_cursor[TDP_ROOT_DIRECT]
    cdef uint64_t *sptep
    cdef uint64_t spte
    if fault.is_private and kvm_has_mirrored_tdp(vcpu.kvm):
        return RET_PF_INVALID    # fast pf is not supported for mirrored roots
    sptep = tdp_mmu_last_sptep(vcpu.kvm, TDP_ROOT_DIRECT, fault.gfn, c)
    if sptep == NULL:
        return RET_PF_INVALID
    spte = sptep[0]
    if not is_shadow_present_pte(spte):
        return RET_PF_INVALID
    if (spte & PT_WRITABLE_MASK) or not fault.write:
        out.level = c.level
        out.pfn = spte_to_pfn(spte)
        return RET_PF_SPURIOUS
    return RET_PF_INVALID


cdef int kvm_tdp_mmu_map_fault(kvm_vcpu *vcpu, kvm_page_fault *fault, kvm_fault_out *out) noexcept nogil:
    """kvm_tdp_mmu_page_fault past fast_page_fault: faultin under the mmu_seq snapshot,
    level, staleness check, map."""
    cdef kvm *kvm = vcpu.kvm
    cdef int r
    # kvm_mmu_do_page_fault's fields that only this path reads
    fault.slot = __gfn_to_memslot(kvm, fault.gfn)
    fault.max_level = KVM_MAX_HUGEPAGE_LEVEL
    fault.goal_level = PG_LEVEL_4K
    fault.pfn = fault.mmu_seq = 0
    fault.map_writable = 0
    r = kvm_mmu_faultin_pfn(vcpu, fault, out)
    if r != RET_PF_CONTINUE:
        return r
    kvm_mmu_hugepage_adjust(kvm, fault)
    if kvm.inject_inval_end:
        # a test's invalidation landing between faultin and the map (mmu_lock)
        kvm_zap_gfn_range_invalidate(kvm, kvm.inject_inval_start, kvm.inject_inval_end, 0)
        kvm.inject_inval_start = kvm.inject_inval_end = 0
    if mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn):   # is_page_fault_stale
        return RET_PF_RETRY
    r = kvm_tdp_mmu_map(vcpu, fault)
    if r == RET_PF_FIXED or r == RET_PF_SPURIOUS:
        out.pfn = fault.pfn
        out.level = fault.goal_level
    return r


cdef int kvm_tdp_mmu_page_fault_slow(kvm_vcpu *vcpu, uint64_t error_code, uint64_t gfn,
                                     kvm_fault_out *out) noexcept nogil:
    """kvm_tdp_mmu_page_fault past fast_page_fault, and kvm_mmu_do_page_fault's check of its
    outcome (only this path emulates). Out of line, so the fast path stays small enough to
    inline into the batch loop; it builds its own struct from the fault's two words: the
    fast path's struct never escapes, so it lives in registers (and a copy of it would load
    16 bytes at a time what was stored a field at a time: a store-forwarding stall, +10 ns a
    fault, measured)."""
    cdef kvm_page_fault slow
    cdef int r
    kvm_page_fault_init(&slow, error_code, gfn)
    r = kvm_tdp_mmu_map_fault(vcpu, &slow, out)
    if r == RET_PF_EMULATE and slow.is_private:
        # KVM cannot emulate an access to private memory
        return kvm_mmu_prepare_memory_fault_exit(vcpu, &slow, out, -EFAULT)
    return r


cdef inline void kvm_page_fault_init(kvm_page_fault *fault, uint64_t error_code, uint64_t gfn) noexcept nogil:
    """kvm_mmu_do_page_fault's struct kvm_page_fault: what the error code says, and the gfn."""
    fault.error_code = error_code
    fault.write = (error_code & PFERR_WRITE_MASK) != 0
    fault.present = (error_code & PFERR_PRESENT_MASK) != 0
    fault.is_private = (error_code & PFERR_PRIVATE_ACCESS) != 0
    fault.gfn = gfn


cdef inline int kvm_mmu_do_page_fault(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                                      kvm_fault_out *out) noexcept nogil:
    cdef kvm_page_fault fault
    cdef int r
    # memslots do not know the TDX shared bit; the slot is looked up past the fast path,
    # which does not use it (the kernel's lookup only updates last_used_slot)
    kvm_page_fault_init(&fault, error_code, (gpa >> 12) & ~vcpu.kvm.gfn_direct_bits)
    # kvm_tdp_mmu_page_fault: fast_page_fault first
    if page_fault_can_be_fast(vcpu.kvm, &fault):
        r = fast_page_fault(vcpu, &fault, out)
        if r != RET_PF_INVALID:
            vcpu.stats[VCPU_STAT_PF_FAST] += 1      # fast_page_fault: fixed without mmu_lock
            return r
    return kvm_tdp_mmu_page_fault_slow(vcpu, fault.error_code, fault.gfn, out)


cdef int handle_mmio_page_fault(kvm *kvm, uint64_t gpa) noexcept nogil:
    """mmu.c handle_mmio_page_fault for a TDP fault with PFERR_RSVD_MASK: an MMIO SPTE means
    emulate; one whose memslot generation is stale (check_mmio_spte) means the slow path; no
    MMIO SPTE means it was zapped by someone else: let the vCPU fault again."""
    cdef uint64_t gfn = (gpa >> 12) & ~kvm.gfn_direct_bits, gen
    if not xa_load(&kvm.mmio_sptes, gfn, &gen):
        return RET_PF_RETRY
    if gen != kvm.memslots_generation:
        return RET_PF_INVALID       # check_mmio_spte: made before some memslot change
    return RET_PF_EMULATE


cdef int kvm_mmu_page_fault(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                            kvm_fault_out *out) noexcept nogil:
    """One #NPF / EPT violation with its 64-bit error code; the outcome in *out."""
    # not the kernel's: the fault's SPTE and filemap leaves are found and prefetched first,
    # the vCPU's cursors left on them, so their cache misses overlap rather than follow one
    # another
    kvm_mmu_prefetch_leaves(vcpu.kvm, gpa, error_code,
                            &vcpu.tdp_cursor[kvm_fault_root(vcpu.kvm, gpa)], &vcpu.gmem_cursor.filemap)
    return __kvm_mmu_page_fault(vcpu, gpa, error_code, out)


cdef inline int __kvm_mmu_page_fault(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                                     kvm_fault_out *out) noexcept nogil:
    # inline and short, so that the batch loop holds the vCPU's and VM's fields in
    # registers: what a batch seldom sees (a vendor exit handler, MMIO, a dead VM) is
    # kvm_mmu_page_fault_unusual's
    cdef kvm *kvm = vcpu.kvm
    cdef is_private_fault_t is_private = kvm.host.hooks[kvm.vm_type].is_private_fault
    cdef bint private
    cdef int r
    memset(out, 0, sizeof(kvm_fault_out))
    if vcpu.pre_run_err:            # KVM_RUN refused before entering (kvm_vcpu_pre_run)
        out.ret = vcpu.pre_run_err
        return out.ret
    # hardware never sets KVM's synthetic bits (npf_interception WARNs and clears them)
    if error_code & PFERR_SYNTHETIC_MASK:
        vcpu.stats[VCPU_STAT_SYNTHETIC_CLEARED] += 1
        error_code &= ~PFERR_SYNTHETIC_MASK
    if is_private == sw_protected_is_private_fault:
        private = _sw_protected_is_private_fault(kvm, gpa, error_code)   # a direct call inlines
    else:
        private = is_private != NULL and is_private(kvm, gpa, error_code)
    # npf_interception sets PFERR_PRIVATE_ACCESS (SNP) before trace_kvm_page_fault;
    # SW_PROTECTED gets it later, inside kvm_mmu_page_fault
    gmem_trace(kvm.host, TRACE_PAGE_FAULT, vcpu.vcpu_id, gpa,
               error_code | (PFERR_PRIVATE_ACCESS if private and is_private != sw_protected_is_private_fault
                             else 0), 0, 0)
    if kvm_has_mirrored_tdp(kvm) or error_code & PFERR_RSVD_MASK or kvm.host.hook_error:
        return kvm_mmu_page_fault_unusual(vcpu, gpa, error_code, private, out)
    if private:
        error_code |= PFERR_PRIVATE_ACCESS
    vcpu.stats[VCPU_STAT_PF_TAKEN] += 1
    r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, out)
    return kvm_mmu_page_fault_done(vcpu, gpa, error_code, r, out)


cdef int kvm_mmu_page_fault_unusual(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code, bint private,
                                    kvm_fault_out *out) noexcept nogil:
    """__kvm_mmu_page_fault past the vendor's private decision, for a fault the vendor's own
    exit handler takes (TDX's EPT violation), an MMIO (RSVD) fault or a VM whose hook raised."""
    cdef kvm *kvm = vcpu.kvm
    cdef handle_ept_violation_t vendor = kvm.host.hooks[kvm.vm_type].handle_ept_violation
    cdef int r
    if private:
        error_code |= PFERR_PRIVATE_ACCESS
    if vendor != NULL:
        return vendor(vcpu, gpa, error_code, out)
    r = kvm_mmu_page_fault_checks(vcpu, gpa, error_code, out)
    if r == RET_PF_INVALID:
        vcpu.stats[VCPU_STAT_PF_TAKEN] += 1
        r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, out)
    elif r != RET_PF_RETRY:
        return r
    return kvm_mmu_page_fault_done(vcpu, gpa, error_code, r, out)


cdef int kvm_mmu_page_fault_checks(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                                   kvm_fault_out *out) noexcept nogil:
    """kvm_mmu_page_fault before kvm_mmu_do_page_fault: a dead VM, and the MMIO fast path of
    an RSVD fault. RET_PF_INVALID to go on, RET_PF_RETRY to count a retry (no MMIO SPTE: it
    was zapped), else the outcome (out.ret set)."""
    cdef kvm *kvm = vcpu.kvm
    cdef int r = RET_PF_INVALID
    if kvm.host.hook_error:
        out.ret = -EIO
        return out.ret
    if error_code & PFERR_RSVD_MASK:
        if error_code & PFERR_PRIVATE_ACCESS:
            out.ret = -EFAULT       # WARN_ON_ONCE: private MMIO
            return out.ret
        r = handle_mmio_page_fault(kvm, gpa)
        if r == RET_PF_EMULATE:
            out.ret = r             # goto emulate: past the pf_* counters
    return r


cdef inline int kvm_mmu_page_fault_done(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code, int r,
                                        kvm_fault_out *out) noexcept nogil:
    """The outcome's counters, and the RMP fault handling that follows it."""
    cdef kvm *kvm = vcpu.kvm
    if kvm.host.hook_error and r >= 0:
        r = -EIO
    if r == RET_PF_FIXED:
        vcpu.stats[VCPU_STAT_PF_FIXED] += 1
    elif r == RET_PF_SPURIOUS:
        vcpu.stats[VCPU_STAT_PF_SPURIOUS] += 1
    elif r == RET_PF_EMULATE:
        vcpu.stats[VCPU_STAT_PF_EMULATE] += 1
    elif r == RET_PF_RETRY:
        vcpu.stats[VCPU_STAT_PF_RETRY] += 1
    out.ret = r
    # npf_interception: an RMP fault is handled once the guest is to be resumed
    if r >= 0 and error_code & PFERR_GUEST_RMP_MASK and kvm.host.hooks[kvm.vm_type].handle_rmp_fault != NULL:
        kvm.host.hooks[kvm.vm_type].handle_rmp_fault(vcpu, gpa, error_code)
    return r


# --------------------------------------------------------- batch prefetch
# Not the kernel's: a batch knows its next faults, so while one fault runs it pulls into
# the cache what later ones will touch, in two stages, each using what the one before
# found. The leaf stage, 2 * PREFETCH_AHEAD faults ahead, walks cursors of its own (in a
# ring) to the fault's last-level page table and its guest_memfd filemap leaf, and
# prefetches the SPTE and the filemap slot. The folio stage, PREFETCH_AHEAD faults ahead,
# reads that slot through the leaf found (if no node of the filemap was freed and no inode
# since): the folio it names is prefetched (one cache line, as a struct page is); an empty
# slot means a cold fault, which will store into the leaf and count it, so the leaf's header
# is prefetched for writing. When the fault comes, the cursors become its vCPU's, so its own
# lookups walk nothing (a cursor is trusted only while its tables or nodes are). Nothing
# else changes state. The scalar kvm_mmu_page_fault does the leaf stage on its vCPU's
# cursors, just before the fault.

ctypedef struct kvm_fault_leaves:
    # the leaf stage's cursors for a later fault
    tdp_cursor spte
    xa_state filemap            # stands on the filemap leaf (xa_node), if there is one
    uint64_t inode_gen          # host.inode_gen when the filemap was walked
    int root                    # the root spte walked (kvm_fault_root)
    bint filemap_walked         # the filemap cursor was walked for this fault
    bint filemap_leaf           # ... and stands on the index's leaf


cdef inline int kvm_fault_root(const kvm *kvm, uint64_t gpa) noexcept nogil:
    """The root a fault at gpa most likely maps in (tdp_mmu_get_root_for_fault)."""
    return TDP_ROOT_MIRROR if kvm_has_mirrored_tdp(kvm) and not kvm_is_addr_direct(kvm, gpa) else TDP_ROOT_DIRECT


cdef inline int kvm_mmu_prefetch_leaves(kvm *kvm, uint64_t gpa, uint64_t error_code, tdp_cursor *spte,
                                        xa_state *filemap) noexcept nogil:
    """The leaf stage: walk the cursors to the fault's last-level page table and (for a fault
    that is not present) its filemap leaf, prefetching the slots. 0: the filemap cursor was
    not walked; 1: it was, and found no leaf; 2: it stands on the index's leaf. Inline up to
    the filemap (a present fault's stage: -23 instructions in random order); the filemap walk
    is out of line (inlined too, it made TDX's sparse cold faults 15-30 % slower)."""
    cdef uint64_t gfn = (gpa >> 12) & ~kvm.gfn_direct_bits
    cdef uint64_t *pt = tdp_mmu_pt_at(kvm, kvm_fault_root(kvm, gpa), gfn, spte, PG_LEVEL_4K)
    if pt != NULL:
        gmem_prefetch(&pt[gfn & (SPTE_ENT_PER_PAGE - 1)])
    if error_code & PFERR_PRESENT_MASK:
        return 0        # most likely fast_page_fault, which reads only the SPTE
    return kvm_mmu_prefetch_filemap(kvm, gfn, filemap)


cdef int kvm_mmu_prefetch_filemap(kvm *kvm, uint64_t gfn, xa_state *filemap) noexcept nogil:
    cdef kvm_memory_slot *s = __gfn_to_memslot(kvm, gfn, False)
    cdef uint64_t index
    cdef xa_node *leaf
    if s == NULL or s.gmem_file == NULL:
        return 0
    index = gfn - s.base_gfn + s.gmem_pgoff
    xas_set_xa(filemap, &s.gmem_file.inode.filemap, index)
    leaf = xas_leaf(filemap)
    if leaf == NULL:
        return 1
    gmem_prefetch(&leaf.slots[index & XA_CHUNK_MASK])
    return 2


cdef void kvm_mmu_prefetch_folio(kvm *kvm, const kvm_fault_leaves *lv) noexcept nogil:
    """The folio stage: the slot the leaf stage prefetched, read through its leaf."""
    cdef const xa_node *leaf = lv.filemap.xa_node
    cdef uint64_t e
    cdef const char *f
    if kvm.host.inode_gen != lv.inode_gen or lv.filemap.xa.node_gen != lv.filemap.xa_gen:
        return          # the leaf may be gone (a Python hook changed things mid-batch)
    e = leaf.slots[lv.filemap.xa_index & XA_CHUNK_MASK]
    if _xa_is_sibling(e):
        e = leaf.slots[_xa_sibling_off(e)]
    if _xa_is_value(e):
        f = <const char *>folio_get(&kvm.host.pm, <uint32_t>(e >> 1))
        gmem_prefetch(f)           # one line (struct folio is a cache line)
    elif e == 0:
        gmem_prefetchw(leaf)        # its header: count += 1 when the fault stores


cdef inline void kvm_mmu_hand_leaves(kvm_vcpu *vcpu, const kvm_fault_leaves *lv) noexcept nogil:
    """The fault's vCPU takes the cursors the leaf stage left on its leaves."""
    vcpu.tdp_cursor[lv.root] = lv.spte
    if lv.filemap_walked:
        vcpu.gmem_cursor.filemap = lv.filemap


cdef enum:
    # not the kernel's: retries of one fault after which the model stands in for a pending
    # signal (only a Python hook that invalidates on every attempt gets near it)
    KVM_FAULT_RETRIES_BEFORE_SIGNAL = 1024
    PREFETCH_AHEAD = 8       # faults between the two prefetch stages
    PREFETCH_RING = 32       # the leaves of faults i .. i + 2 * AHEAD (a power of two, <= 32)


cdef size_t kvm_mmu_page_fault_batch(kvm_vcpu **vcpus, const uint64_t *ids, const uint64_t *gpas,
                                     const uint64_t *ecs, kvm_fault_out *out, size_t n) noexcept nogil:
    """kvm_mmu_page_fault per record, in order. Without ids, every fault is taken by vcpus[0].
    Fault i + 2 * AHEAD gets its leaves prefetched (unless they are the ones the stage went to
    last: a sequential stream needs none), fault i + AHEAD its folio, and fault i's vCPU takes
    the cursors left on its leaves. Returns the faults done (fewer than n only when a Python
    hook raised)."""
    cdef size_t i, j
    cdef kvm_vcpu *v
    cdef kvm *k
    cdef gmem_host *host
    cdef kvm_fault_leaves ring[PREFETCH_RING]
    cdef uint32_t filled = 0        # bit r: the leaf stage filled ring[r] (else it went nowhere)
    cdef uint64_t key, last = <uint64_t>-1
    cdef int r, walked, root
    if n == 0:
        return 0                # (with ids, the vCPU table has no entry to read)
    v = vcpus[ids[0]] if ids != NULL else vcpus[0]
    k = v.kvm
    host = k.host
    for r in range(PREFETCH_RING):
        tdp_cursor_init(&ring[r].spte)
        ring[r].root = TDP_ROOT_DIRECT
        xas_init(&ring[r].filemap, NULL, 0)
    for i in range(n):
        j = i + 2 * PREFETCH_AHEAD
        if j < n:
            r = j & (PREFETCH_RING - 1)
            key = gpas[j] >> 18
            if key != last:
                root = kvm_fault_root(k, gpas[j])
                if root != ring[r].root:
                    # a cursor serves one root: its tables are no other root's
                    tdp_cursor_init(&ring[r].spte)
                    ring[r].root = root
                walked = kvm_mmu_prefetch_leaves(k, gpas[j], ecs[j], &ring[r].spte, &ring[r].filemap)
                ring[r].filemap_walked = walked != 0
                ring[r].filemap_leaf = walked == 2
                ring[r].inode_gen = host.inode_gen
                filled |= 1u << r
            else:
                filled &= ~(1u << r)
            last = key
        r = (i + PREFETCH_AHEAD) & (PREFETCH_RING - 1)
        if (filled >> r) & 1 and ring[r].filemap_leaf and i + PREFETCH_AHEAD < n:
            kvm_mmu_prefetch_folio(k, &ring[r])
        if ids != NULL:
            v = vcpus[ids[i]]
        r = i & (PREFETCH_RING - 1)
        if (filled >> r) & 1:
            kvm_mmu_hand_leaves(v, &ring[r])
        __kvm_mmu_page_fault(v, gpas[i], ecs[i], &out[i])
        if host.hook_error:
            return i + 1
    return n


# ------------------------------------------------------ KVM_PRE_FAULT_MEMORY

cdef int kvm_tdp_map_page(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code, int *level) noexcept nogil:
    """mmu.c kvm_tdp_map_page (since renamed kvm_tdp_page_prefault): the vCPU's fault path as a
    prefetch, again while RET_PF_RETRY; 0 with *level the mapping's, or -errno. No pf_*
    stat moves: kvm_mmu_page_fault counts those, kvm_mmu_do_page_fault does not (6.11)."""
    cdef kvm_fault_out out
    cdef int r, tries = 0
    if not vcpu.kvm.host.tdp:
        return _refuse(vcpu.kvm.host, -EOPNOTSUPP, "the host has no TDP (mmu->page_fault is not "
                       "kvm_tdp_page_fault)")
    memset(&out, 0, sizeof(out))
    while True:
        # kvm_check_request(KVM_REQ_VM_DEAD): a hook raised
        if vcpu.kvm.host.hook_error:
            return -EIO
        r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, &out)
        if r != RET_PF_RETRY:
            break
        tries += 1
        if vcpu.kvm.mmu_invalidate_in_progress or tries >= KVM_FAULT_RETRIES_BEFORE_SIGNAL:
            # signal_pending: a retry that never ends here is an invalidation only our caller
            # (a Python hook inside it) could finish, or one a hook starts on every attempt;
            # the kernel's task would get a signal
            return -EINTR
    if r < 0:
        return r
    if r == RET_PF_FIXED or r == RET_PF_SPURIOUS or r == RET_PF_WRITE_PROTECTED:
        level[0] = out.level if out.level else PG_LEVEL_4K
        return 0
    if r == RET_PF_EMULATE:
        return -ENOENT             # no memslot: emulated MMIO
    return -EIO                    # WARN_ONCE: could not fix page fault during prefault


cdef int64_t kvm_arch_vcpu_pre_fault_memory(kvm_vcpu *vcpu, uint64_t gpa, uint64_t size) noexcept nogil:
    """mmu.c: map the page at gpa as the guest reaches it (private iff the attributes say so,
    TDX shared memory through its shared alias); the bytes covered, at most size, or -errno."""
    cdef kvm *kvm = vcpu.kvm
    cdef uint64_t error_code = PFERR_GUEST_FINAL_MASK, direct_bits = 0, huge, end
    cdef int level = PG_LEVEL_4K, r
    if not kvm.pre_fault_allowed:
        return -EOPNOTSUPP         # SNP before LAUNCH_FINISH, TDX before FINALIZE_VM
    if (gpa >> 12) & kvm.gfn_direct_bits:
        return -EINVAL             # kvm_is_gfn_alias: memslot addresses only (6.16)
    if kvm.has_private_mem and kvm_mem_is_private(kvm, gpa >> 12):
        error_code |= PFERR_PRIVATE_ACCESS
    else:
        direct_bits = kvm.gfn_direct_bits << 12
    r = kvm_tdp_map_page(vcpu, gpa | direct_bits, error_code, &level)
    if r < 0:
        return r
    # a huge mapping may start below gpa and end past gpa + size
    huge = (<uint64_t>4096) << _level_order(level)
    end = (gpa & ~(huge - 1)) + huge
    return <int64_t>(size if size < end - gpa else end - gpa)


# ------------------------------------------------------------ native hooks

cdef inline int _sw_protected_is_private_fault(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil:
    # kvm_mmu_page_fault: attributes decide, except for RSVD (MMIO) faults
    return not (error_code & PFERR_RSVD_MASK) and _kvm_mem_is_private(kvm, gpa >> 12)


cdef int sw_protected_is_private_fault(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil:
    return _sw_protected_is_private_fault(kvm, gpa, error_code)
