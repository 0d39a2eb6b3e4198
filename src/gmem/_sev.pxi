# AMD SEV-SNP: the RMP table and its instructions (arch/x86/virt/svm/sev.c,
# AMD APM vol. 2 §15.36) and KVM's gmem hooks (arch/x86/kvm/svm/sev.c).
#
# An RMP entry is kept as the raw low qword (struct rmpentry_raw): assigned
# bit 0, pagesize bit 1, immutable bit 2, gpa[50:12] in bits 12-50, asid in
# bits 51-60, vmsa bit 61, validated bit 62.  Absent entries are all zero,
# so the table grows with the pfns the guest owns.  A 2M entry is stored at
# its 2M-aligned head only: its 511 other pages read as the head with
# contiguous GPAs (what PSMASH then writes out), and only the head's
# pagesize says 2M (__snp_lookup_rmpentry).

cdef enum:
    RMP_PG_SIZE_4K = 0
    RMP_PG_SIZE_2M = 1
    RMPUPDATE_FAIL_INPUT = 1
    RMPUPDATE_FAIL_PERMISSION = 2
    RMPUPDATE_FAIL_INUSE = 3
    RMPUPDATE_FAIL_OVERLAP = 4
    PSMASH_FAIL_INPUT = 1
    PSMASH_FAIL_INUSE = 3
    PVALIDATE_FAIL_INPUT = 1
    PVALIDATE_FAIL_SIZEMISMATCH = 6
    PVALIDATE_FAIL_NOUPDATE = 255
    PTRS_PER_PMD = 512

cdef extern from *:
    # constants, so the compiler folds them
    """
    #define GMEM_RMP_ASSIGNED (1ULL)
    #define GMEM_RMP_PAGESIZE (1ULL << 1)
    #define GMEM_RMP_IMMUTABLE (1ULL << 2)
    #define GMEM_RMP_GPA_MASK (((1ULL << 39) - 1) << 12)
    #define GMEM_RMP_ASID_SHIFT (51ULL)
    #define GMEM_RMP_ASID_MASK (0x3FFULL << 51)
    #define GMEM_RMP_VMSA (1ULL << 61)
    #define GMEM_RMP_VALIDATED (1ULL << 62)
    #define GMEM_PFERR_GUEST_RMP_MASK (1ULL << 31)
    #define GMEM_PFERR_GUEST_FINAL_MASK (1ULL << 32)
    #define GMEM_PFERR_GUEST_SIZEM_MASK (1ULL << 35)
    """
    const uint64_t RMP_ASSIGNED "GMEM_RMP_ASSIGNED"
    const uint64_t RMP_PAGESIZE "GMEM_RMP_PAGESIZE"
    const uint64_t RMP_IMMUTABLE "GMEM_RMP_IMMUTABLE"
    const uint64_t RMP_GPA_MASK "GMEM_RMP_GPA_MASK"
    const uint64_t RMP_ASID_SHIFT "GMEM_RMP_ASID_SHIFT"
    const uint64_t RMP_ASID_MASK "GMEM_RMP_ASID_MASK"
    const uint64_t RMP_VMSA "GMEM_RMP_VMSA"
    const uint64_t RMP_VALIDATED "GMEM_RMP_VALIDATED"
    const uint64_t PFERR_GUEST_RMP_MASK "GMEM_PFERR_GUEST_RMP_MASK"
    const uint64_t PFERR_GUEST_FINAL_MASK "GMEM_PFERR_GUEST_FINAL_MASK"
    const uint64_t PFERR_GUEST_SIZEM_MASK "GMEM_PFERR_GUEST_SIZEM_MASK"


cdef inline uint64_t _rmp_raw_in(gmem_host *h, uint64_t pfn, bint *in_2m) noexcept nogil:
    """The entry as hardware would read it for this pfn; *in_2m: a 2M entry covers it."""
    cdef uint64_t v, head = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
    # pfn's own slot first: no 4K entry lies under a 2M one (rmpupdate_insn), so an entry
    # there is the answer, and a 2M head is read only when the RMP holds one
    if xa_load(&h.rmp.entries, pfn, &v):
        in_2m[0] = pfn == head and (v & RMP_PAGESIZE) != 0
        return v
    in_2m[0] = (h.rmp.nr_2m != 0 and pfn != head and xa_load(&h.rmp.entries, head, &v)
                and (v & RMP_PAGESIZE) != 0)
    if in_2m[0]:
        # a page inside a 2M entry: the head's state at its own GPA, pagesize 0
        return (v & ~RMP_PAGESIZE) + ((pfn - head) << 12)
    return 0


cdef inline uint64_t rmp_raw(gmem_host *h, uint64_t pfn) noexcept nogil:
    """The entry as hardware would read it for this pfn."""
    cdef bint in_2m
    return _rmp_raw_in(h, pfn, &in_2m)


cdef int snp_lookup_rmpentry(gmem_host *h, uint64_t pfn, int *assigned, int *level) noexcept nogil:
    cdef bint in_2m
    if not h.rmp.enabled:
        return -_ENODEV
    if pfn >= h.pm.end_pfn:
        return -_EINVAL
    assigned[0] = (_rmp_raw_in(h, pfn, &in_2m) & RMP_ASSIGNED) != 0
    level[0] = PG_LEVEL_2M if in_2m else PG_LEVEL_4K
    return 0


cdef inline int _rmp_store(gmem_host *h, uint64_t pfn, uint64_t raw) noexcept nogil:
    """The one place an entry's pagesize changes (other writers keep it): counts 2M entries."""
    cdef uint64_t old = 0
    cdef int r
    if raw == 0:
        r = xa_erase(&h.rmp.entries, pfn, &old)
    else:
        r = xa_store_order(&h.rmp.entries, pfn, 0, raw, &old)
        if r < 0:
            return r
    h.rmp.nr_2m += ((raw & RMP_PAGESIZE) != 0) - (r == 1 and (old & RMP_PAGESIZE) != 0)
    return 0 if raw == 0 else r


cdef void _adjust_direct_map(gmem_host *h, uint64_t pfn, int rmp_level) noexcept nogil:
    """adjust_direct_map: a 4K RMP update splits the host's 2M direct mapping around it."""
    cdef uint64_t old
    if rmp_level == PG_LEVEL_4K and not xa_load(&h.rmp.direct_map_4k, pfn >> 9, &old):
        xa_store_order(&h.rmp.direct_map_4k, pfn >> 9, 0, 1, &old)
        h.rmp.stats[SNP_STAT_DIRECT_MAP_SPLITS] += 1


cdef bint _rmp_smashed_region(gmem_host *h, uint64_t head) noexcept nogil:
    """The 512 4K entries from the 2M-aligned head are what PSMASH leaves: all assigned,
    with the head's owner and immutability, at GPAs contiguous from the head's."""
    cdef uint64_t hv, v, i, same = RMP_ASSIGNED | RMP_PAGESIZE | RMP_IMMUTABLE | RMP_ASID_MASK
    if not xa_load(&h.rmp.entries, head, &hv):
        return False
    for i in range(1, PTRS_PER_PMD):
        if (not xa_load(&h.rmp.entries, head + i, &v) or (v & same) != (hv & same)
                or (v & RMP_GPA_MASK) != (hv & RMP_GPA_MASK) + (i << 12)):
            return False
    return True


cdef int rmpupdate_insn(gmem_host *h, uint64_t pfn, uint64_t state) noexcept nogil:
    """RMPUPDATE (F2 0F 01 FE): install `state` (assigned, pagesize, immutable, gpa, asid)
    as pfn's entry; returns the architectural code."""
    cdef bint in_2m, merge = False
    cdef uint64_t cur = _rmp_raw_in(h, pfn, &in_2m), f, v
    cdef uint64_t new, keep
    cdef int k
    cdef bint huge = (state & RMP_PAGESIZE) != 0
    h.rmp.stats[SNP_STAT_RMPUPDATE] += 1
    if h.rmp.fail_rmpupdate:
        h.rmp.fail_rmpupdate -= 1
        h.rmp.stats[SNP_STAT_RMPUPDATE_FAILED] += 1
        return h.rmp.fail_rmpupdate_code
    if pfn >= h.pm.end_pfn:
        return RMPUPDATE_FAIL_INPUT
    if cur & RMP_IMMUTABLE:
        return RMPUPDATE_FAIL_PERMISSION
    if huge:
        if pfn & (PTRS_PER_PMD - 1) or (state & RMP_GPA_MASK) & ((<uint64_t>PTRS_PER_PMD << 12) - 1):
            return RMPUPDATE_FAIL_INPUT
        # the 512 entries must be one consistent state: all unassigned, this 2M entry, or
        # the 512 4K entries a PSMASH left (APM §15.36: the host rebuilds a 2M page with
        # RMPUPDATE-to-2M, which clears Validated, and the guest re-PVALIDATEs it at 2M)
        if not in_2m and xa_find_entry(&h.rmp.entries, pfn, pfn + PTRS_PER_PMD - 1, XA_NO_MARK, &f, &k, &v):
            if not _rmp_smashed_region(h, pfn):
                return RMPUPDATE_FAIL_INPUT
            merge = True
    elif in_2m:
        return RMPUPDATE_FAIL_INPUT      # 4K update inside a 2M entry: PSMASH first
    new = state & (RMP_ASSIGNED | RMP_PAGESIZE | RMP_IMMUTABLE | RMP_GPA_MASK | RMP_ASID_MASK)
    keep = RMP_ASSIGNED | RMP_PAGESIZE | RMP_GPA_MASK
    if (cur & keep) == (new & keep) and (cur & RMP_ASID_MASK) == (new & RMP_ASID_MASK):
        new |= cur & (RMP_VALIDATED | RMP_VMSA)    # nothing moved: Validated survives
    elif h.rmp.perms.nr_entries:
        xa_erase(&h.rmp.perms, pfn, &v)            # VMPL0 full, others none
    if not (new & RMP_ASSIGNED):
        new = 0                                    # unassigned entries are not stored
    if merge:
        # the 511 tail entries are now read through the 2M head
        xa_erase_range(&h.rmp.entries, pfn + 1, pfn + PTRS_PER_PMD - 1)
        xa_erase_range(&h.rmp.perms, pfn + 1, pfn + PTRS_PER_PMD - 1)
    if _rmp_store(h, pfn, new) < 0:
        return RMPUPDATE_FAIL_INPUT
    return 0


cdef int rmpupdate(gmem_host *h, uint64_t pfn, uint64_t state) noexcept nogil:
    """The kernel's rmpupdate(): split the direct map, loop on FAIL_OVERLAP, -EFAULT otherwise."""
    cdef int ret
    if not h.rmp.enabled:
        return -_ENODEV
    _adjust_direct_map(h, pfn, PG_LEVEL_2M if state & RMP_PAGESIZE else PG_LEVEL_4K)
    ret = rmpupdate_insn(h, pfn, state)
    while ret == RMPUPDATE_FAIL_OVERLAP:
        ret = rmpupdate_insn(h, pfn, state)
    return -_EFAULT if ret else 0


cdef inline uint64_t rmp_state(bint assigned, int level, bint immutable, uint64_t gpa,
                               uint32_t asid) noexcept nogil:
    return ((RMP_ASSIGNED if assigned else 0) | (RMP_PAGESIZE if level == PG_LEVEL_2M else 0) |
            (RMP_IMMUTABLE if immutable else 0) | (gpa & RMP_GPA_MASK) |
            ((<uint64_t>asid << RMP_ASID_SHIFT) & RMP_ASID_MASK))


cdef int rmp_make_private(gmem_host *h, uint64_t pfn, uint64_t gpa, int level, uint32_t asid,
                          bint immutable) noexcept nogil:
    return rmpupdate(h, pfn, rmp_state(True, level, immutable, gpa, asid))


cdef int rmp_make_shared(gmem_host *h, uint64_t pfn, int level) noexcept nogil:
    return rmpupdate(h, pfn, rmp_state(False, level, False, 0, 0))


cdef int psmash_insn(gmem_host *h, uint64_t pfn) noexcept nogil:
    """PSMASH (F3 0F 01 FF): a 2M entry becomes 512 4K entries, each keeping the head's
    state (validated included) at contiguous GPAs."""
    cdef uint64_t hv, i, perms, old
    cdef bint has_perms
    if pfn >= h.pm.end_pfn or pfn & (PTRS_PER_PMD - 1):
        return PSMASH_FAIL_INPUT
    if not xa_load(&h.rmp.entries, pfn, &hv) or not (hv & RMP_PAGESIZE):
        return PSMASH_FAIL_INPUT
    has_perms = xa_load(&h.rmp.perms, pfn, &perms)
    for i in range(PTRS_PER_PMD):
        if _rmp_store(h, pfn + i, (hv & ~RMP_PAGESIZE) + (i << 12)) < 0:
            return PSMASH_FAIL_INPUT
        if has_perms:
            xa_store_order(&h.rmp.perms, pfn + i, 0, perms, &old)
    h.rmp.stats[SNP_STAT_PSMASH] += 1
    return 0


cdef int snp_rmptable_psmash(gmem_host *h, uint64_t pfn) noexcept nogil:
    cdef int ret
    pfn &= ~(<uint64_t>PTRS_PER_PMD - 1)
    ret = psmash_insn(h, pfn)
    while ret == PSMASH_FAIL_INUSE:
        ret = psmash_insn(h, pfn)
    return ret


cdef void snp_leak_pages(gmem_host *h, uint64_t pfn, uint64_t npages) noexcept nogil:
    cdef uint64_t i, old
    for i in range(npages):
        xa_store_order(&h.rmp.leaked, pfn + i, 0, 1, &old)
    h.rmp.stats[SNP_STAT_LEAKED_PAGES] += npages


cdef int host_write_ok(gmem_host *h, uint64_t pfn) noexcept nogil:
    """Would a host write to pfn, through the host's direct map, pass the RMP check?"""
    cdef uint64_t base, f, v, hv
    cdef int k
    if not h.rmp.enabled or h.rmp.entries.nr_entries == 0:
        return 1                    # nothing assigned anywhere (no SNP guest yet)
    if rmp_raw(h, pfn) & RMP_ASSIGNED:
        return 0
    if xa_load(&h.rmp.direct_map_4k, pfn >> 9, &v):
        return 1
    # a 2M host mapping: all 512 entries of the region must be unassigned
    base = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
    return not xa_find_entry(&h.rmp.entries, base, base + PTRS_PER_PMD - 1, XA_NO_MARK, &f, &k, &v)


# ------------------------------------------------------------ KVM's hooks

cdef int sev_gmem_prepare(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil:
    cdef gmem_host *h = kvm.host
    cdef int assigned, level, k
    cdef uint64_t pfn_aligned = pfn, gfn_aligned = gfn, f, v
    if snp_lookup_rmpentry(h, pfn, &assigned, &level):
        return -_ENOENT
    if assigned:
        return 0                                   # already private: idempotent
    level = PG_LEVEL_4K
    if order >= 9:
        # is_large_rmp_possible: the whole aligned 2M region is unassigned
        f = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
        if not xa_find_entry(&h.rmp.entries, f, f + PTRS_PER_PMD - 1, XA_NO_MARK, &f, &k, &v):
            level = PG_LEVEL_2M
            pfn_aligned = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
            gfn_aligned = gfn & ~(<uint64_t>PTRS_PER_PMD - 1)
    if rmp_make_private(h, pfn_aligned, gfn_aligned << 12, level, kvm.asid, False):
        return -_EINVAL
    return 0


cdef void sev_gmem_invalidate(gmem_host *h, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t pfn = start
    cdef int assigned, rmp_level, use_2m
    while pfn < end:
        use_2m = 0
        if snp_lookup_rmpentry(h, pfn, &assigned, &rmp_level) == 0 and assigned:
            use_2m = (pfn & (PTRS_PER_PMD - 1)) == 0 and end >= pfn + PTRS_PER_PMD and rmp_level > PG_LEVEL_4K
            if not use_2m and rmp_level > PG_LEVEL_4K:
                snp_rmptable_psmash(h, pfn)        # WARN_ONCE on failure, keep going
            if rmp_make_shared(h, pfn, PG_LEVEL_2M if use_2m else PG_LEVEL_4K):
                # the page cannot go back to the host: take it out of use for good
                snp_leak_pages(h, pfn, PTRS_PER_PMD if use_2m else 1)
        pfn += PTRS_PER_PMD if use_2m else 1


cdef int sev_private_max_mapping_level(kvm *kvm, uint64_t pfn) noexcept nogil:
    cdef int assigned, level
    if snp_lookup_rmpentry(kvm.host, pfn, &assigned, &level) or not assigned:
        return PG_LEVEL_4K
    return level


cdef void sev_handle_rmp_fault(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code) noexcept nogil:
    cdef kvm *kvm = vcpu.kvm
    cdef uint64_t gfn = gpa >> 12, pfn
    cdef kvm_memory_slot *slot
    cdef int order, assigned, rmp_level
    kvm.host.rmp.stats[SNP_STAT_RMP_FAULTS] += 1
    if not kvm_mem_is_private(kvm, gfn):
        return                                     # "Unexpected RMP fault for non-private GPA"
    slot = gfn_to_memslot(kvm, gfn)
    if not kvm_slot_has_gmem(slot):
        return
    if kvm_gmem_get_pfn(kvm, slot, gfn, &pfn, &order):
        return
    if snp_lookup_rmpentry(kvm.host, pfn, &assigned, &rmp_level) or not assigned:
        return
    if rmp_level == PG_LEVEL_4K:
        return                                     # spurious: someone PSMASHed already
    snp_rmptable_psmash(kvm.host, pfn)
    # the real kernel zaps from the unaligned gfn
    kvm_zap_gfn_range_invalidate(kvm, gfn, gfn + PTRS_PER_PMD, 0)



cdef uint32_t _snp_safe_alloc_page(gmem_host *h) noexcept nogil:
    """snp_safe_alloc_page_node: a 4K page for a VMSA/VMCB that is never 2M-aligned (a CPU
    erratum gives spurious RMP #PFs when a hugepage overlaps such a page's RMP entry).
    A folio id, or 0 when out of memory."""
    cdef uint32_t id, spare = 0
    if folio_alloc(&h.pm, 0, &id) < 0:
        return 0
    if folio_get(&h.pm, id).pfn & (PTRS_PER_PMD - 1) == 0:
        spare = id
        if folio_alloc(&h.pm, 0, &id) < 0:
            id = 0
        folio_free(&h.pm, spare)        # its buddy is the next page: never aligned
    return id
