# AMD SEV-SNP: the RMP table and its instructions (arch/x86/virt/svm/sev.c, AMD APM vol. 2
# §15.36: RMPUPDATE, PSMASH, PVALIDATE, RMPADJUST), and KVM's side (arch/x86/kvm/svm/sev.c):
# the VM's ASID and VMSAs, the gmem hooks, the launch (SNP_LAUNCH_START/UPDATE/FINISH with
# sev_gmem_post_populate), and page-state changes (GHCB MSR protocol and PSC buffer).
#
# An RMP entry is kept as the raw low qword (struct rmpentry_raw): assigned
# bit 0, pagesize bit 1, immutable bit 2, gpa[50:12] in bits 12-50, asid in
# bits 51-60, vmsa bit 61, validated bit 62.  Absent entries are all zero,
# so the table grows with the pfns the guest owns.  A 2M entry is stored at
# its 2M-aligned head only: its 511 other pages read as the head with
# contiguous GPAs (what PSMASH then writes out), and only the head's
# pagesize says 2M (__snp_lookup_rmpentry).

cdef enum:
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
    #define GMEM_GHCB_MSR_PSC_RESP (0x015ULL)
    #define GMEM_GHCB_MSR_PSC_RESP_ERROR ((1ULL << 63) | 0x015ULL)
    #define GMEM_VMGEXIT_PSC_ERROR_GENERIC (0x100ULL << 32)
    #define GMEM_VMGEXIT_PSC_ERROR_INVALID_HDR ((1ULL << 32) | 1)
    #define GMEM_VMGEXIT_PSC_ERROR_INVALID_ENTRY ((1ULL << 32) | 2)
    #define GMEM_INITIAL_VMSA_GPA (0xFFFFFFFFF000ULL)
    """
    # arch/x86/include/asm/sev-common.h, svm.h: the GHCB's page-state change answers
    const uint64_t GHCB_MSR_PSC_RESP "GMEM_GHCB_MSR_PSC_RESP"
    const uint64_t GHCB_MSR_PSC_RESP_ERROR "GMEM_GHCB_MSR_PSC_RESP_ERROR"
    const uint64_t VMGEXIT_PSC_ERROR_GENERIC "GMEM_VMGEXIT_PSC_ERROR_GENERIC"
    const uint64_t VMGEXIT_PSC_ERROR_INVALID_HDR "GMEM_VMGEXIT_PSC_ERROR_INVALID_HDR"
    const uint64_t VMGEXIT_PSC_ERROR_INVALID_ENTRY "GMEM_VMGEXIT_PSC_ERROR_INVALID_ENTRY"
    # arch/x86/kvm/svm/sev.c: where a VMSA sits in the guest's physical address space
    const uint64_t INITIAL_VMSA_GPA "GMEM_INITIAL_VMSA_GPA"
    const uint64_t RMP_ASSIGNED "GMEM_RMP_ASSIGNED"
    const uint64_t RMP_PAGESIZE "GMEM_RMP_PAGESIZE"
    const uint64_t RMP_IMMUTABLE "GMEM_RMP_IMMUTABLE"
    const uint64_t RMP_GPA_MASK "GMEM_RMP_GPA_MASK"
    const uint64_t RMP_ASID_SHIFT "GMEM_RMP_ASID_SHIFT"
    const uint64_t RMP_ASID_MASK "GMEM_RMP_ASID_MASK"
    const uint64_t RMP_VMSA "GMEM_RMP_VMSA"
    const uint64_t RMP_VALIDATED "GMEM_RMP_VALIDATED"


cdef inline uint64_t _rmp_raw_in(gmem_host *h, uint64_t pfn, bint *in_2m) noexcept nogil:
    """The entry as hardware would read it for this pfn; *in_2m: a 2M entry covers it."""
    cdef uint64_t v, head = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
    # pfn's own slot first: no 4K entry lies under a 2M one (rmpupdate_insn), so an entry
    # there is the answer, and a 2M head is read only when the RMP holds one
    xas_set(&h.rmp.cursor, pfn)
    if xas_load(&h.rmp.cursor, &v):
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
        return -ENODEV
    if pfn >= h.pm.end_pfn:
        return -EINVAL
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
        xas_set(&h.rmp.cursor, pfn)
        r = xas_store(&h.rmp.cursor, 0, raw, &old)
        if r < 0:
            return r
    h.rmp.nr_2m += ((raw & RMP_PAGESIZE) != 0) - (r == 1 and (old & RMP_PAGESIZE) != 0)
    return 0 if raw == 0 else r


cdef void _adjust_direct_map(gmem_host *h, uint64_t pfn, int rmp_level) noexcept nogil:
    """adjust_direct_map: a 4K RMP update splits the host's 2M direct mapping around it."""
    cdef uint64_t old
    if rmp_level == PG_LEVEL_4K and not snp_direct_map_is_4k(h, pfn):
        xas_store(&h.rmp.direct_map_cursor, 0, 1, &old)
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
        return -ENODEV
    _adjust_direct_map(h, pfn, PG_LEVEL_2M if state & RMP_PAGESIZE else PG_LEVEL_4K)
    ret = rmpupdate_insn(h, pfn, state)
    while ret == RMPUPDATE_FAIL_OVERLAP:
        ret = rmpupdate_insn(h, pfn, state)
    gmem_trace(h, TRACE_RMPUPDATE, TRACE_NO_VCPU, pfn, state & RMP_GPA_MASK,
               (1 if state & RMP_ASSIGNED else 0) | (2 if state & RMP_PAGESIZE else 0) |
               (((state & RMP_ASID_MASK) >> RMP_ASID_SHIFT) << 32), ret)
    return -EFAULT if ret else 0


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
    gmem_trace(h, TRACE_PSMASH, TRACE_NO_VCPU, pfn, 0, 0, ret)
    return ret


cdef void snp_leak_pages(gmem_host *h, uint64_t pfn, uint64_t npages) noexcept nogil:
    """The pages cannot go back to the host: out of use for good (their folio is never freed)."""
    cdef uint64_t i, old
    cdef uint32_t id
    for i in range(npages):
        xa_store_order(&h.rmp.leaked, pfn + i, 0, 1, &old)
        id = pfn_folio(&h.pm, pfn + i)
        if id:
            folio_get(&h.pm, id).flags |= PG_leaked
    h.rmp.stats[SNP_STAT_LEAKED_PAGES] += npages


cdef inline int snp_host_write_fault(gmem_host *h, uint64_t pfn) noexcept nogil:
    """A host write through the direct map to pfn faults (RMP #PF) when the page is assigned,
    or when a 2M direct mapping covers any assigned page of its region; counted."""
    if h.rmp.entries.nr_entries == 0:
        return 0                    # nothing assigned anywhere (no SNP guest yet)
    return snp_host_write_fault_slow(h, pfn)


cdef int snp_host_write_fault_slow(gmem_host *h, uint64_t pfn) noexcept nogil:
    cdef uint64_t base, f, v
    cdef int k
    if rmp_raw(h, pfn) & RMP_ASSIGNED:
        h.rmp.stats[SNP_STAT_RMP_VIOLATIONS] += 1
        return 1
    if snp_direct_map_is_4k(h, pfn):
        return 0
    # a 2M host mapping: all 512 entries of the region must be unassigned
    base = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
    if xa_find_entry(&h.rmp.entries, base, base + PTRS_PER_PMD - 1, XA_NO_MARK, &f, &k, &v):
        h.rmp.stats[SNP_STAT_RMP_VIOLATIONS] += 1
        return 1
    return 0


cdef int snp_user_write_fault(gmem_host *h, uint64_t pfn) noexcept nogil:
    """A user-mode write (through the VMM's own 4K mapping) faults only on the page's own
    entry ("Unexpected RMP page fault for user address" -> SIGBUS); counted."""
    if rmp_raw(h, pfn) & RMP_ASSIGNED:
        h.rmp.stats[SNP_STAT_RMP_VIOLATIONS] += 1
        return 1
    return 0


cdef bint snp_direct_map_is_4k(gmem_host *h, uint64_t pfn) noexcept nogil:
    """The host's direct map around pfn was split to 4K (adjust_direct_map)."""
    cdef uint64_t v
    xas_set(&h.rmp.direct_map_cursor, pfn >> 9)
    return xas_load(&h.rmp.direct_map_cursor, &v)


cdef void snp_rmptable_init(gmem_host *h) noexcept nogil:
    """snp_rmptable_init at boot: an RMP covering all memory, checked on every host write."""
    h.rmp.enabled = 1
    xa_init(&h.rmp.entries)
    xas_init(&h.rmp.cursor, &h.rmp.entries, 0)
    xa_init(&h.rmp.perms)
    xa_init(&h.rmp.direct_map_4k)
    xas_init(&h.rmp.direct_map_cursor, &h.rmp.direct_map_4k, 0)
    xa_init(&h.rmp.leaked)


cdef void snp_rmptable_destroy(gmem_host *h) noexcept nogil:
    xa_destroy(&h.rmp.entries)
    xa_destroy(&h.rmp.perms)
    xa_destroy(&h.rmp.direct_map_4k)
    xa_destroy(&h.rmp.leaked)


ctypedef struct rmp_entry_info:
    bint assigned
    int pagesize
    bint immutable
    bint validated
    uint32_t asid
    uint64_t gpa
    bint vmsa


cdef rmp_entry_info snp_rmpentry_info(gmem_host *h, uint64_t pfn) noexcept nogil:
    """pfn's entry decoded, as hardware reads it (pagesize is 1 only at a 2M entry's head)."""
    return rmp_entry_decode(rmp_raw(h, pfn))


cdef rmp_entry_info rmp_entry_decode(uint64_t raw) noexcept nogil:
    cdef rmp_entry_info e
    e.assigned = (raw & RMP_ASSIGNED) != 0
    e.pagesize = (raw & RMP_PAGESIZE) != 0
    e.immutable = (raw & RMP_IMMUTABLE) != 0
    e.validated = (raw & RMP_VALIDATED) != 0
    e.asid = (raw & RMP_ASID_MASK) >> RMP_ASID_SHIFT
    e.gpa = raw & RMP_GPA_MASK
    e.vmsa = (raw & RMP_VMSA) != 0
    return e


# ------------------------------------------------------------ KVM's hooks

cdef int sev_gmem_prepare(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil:
    """sev_gmem_prepare: the folio's pages private in the RMP. A huge folio (proposed: no
    kernel hands one out) is taken 2M at a time, so a 1G folio is 512 2M RMP entries (RMP
    entries are 4K or 2M)."""
    cdef uint64_t k = 0
    cdef int r
    if order < 9:
        return sev_gmem_prepare_2m(kvm, gfn, pfn, order)
    while k < _pages(order):
        r = sev_gmem_prepare_2m(kvm, gfn + k, pfn + k, 9)
        if r:
            return r
        k += PTRS_PER_PMD
    return 0


cdef inline int sev_gmem_prepare_2m(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil:
    """One page, or one 2M part of a huge folio: a single 2M RMPUPDATE if all 512 pages are
    shared (is_large_rmp_possible), else each shared page at 4K (a 2M entry needs its 512
    pages in one state)."""
    cdef gmem_host *h = kvm.host
    cdef int assigned, level, k
    cdef uint64_t f, v, i
    if snp_lookup_rmpentry(h, pfn, &assigned, &level):
        return -ENOENT
    if order == 0:
        if assigned:
            return 0                               # already private: idempotent
        return -EINVAL if rmp_make_private(h, pfn, gfn << 12, PG_LEVEL_4K, kvm.sev.asid, False) else 0
    if order >= 9:
        f = pfn & ~(<uint64_t>PTRS_PER_PMD - 1)
        if not assigned and not xa_find_entry(&h.rmp.entries, f, f + PTRS_PER_PMD - 1, XA_NO_MARK, &f, &k, &v):
            if rmp_make_private(h, pfn & ~(<uint64_t>PTRS_PER_PMD - 1),
                                (gfn & ~(<uint64_t>PTRS_PER_PMD - 1)) << 12, PG_LEVEL_2M, kvm.sev.asid, False):
                return -EINVAL
            return 0
        if assigned and level == PG_LEVEL_2M:
            return 0
    for i in range(_pages(order) if order < 9 else PTRS_PER_PMD):
        if snp_lookup_rmpentry(h, pfn + i, &assigned, &level):
            return -ENOENT
        if assigned:
            continue                               # already private: idempotent
        if rmp_make_private(h, pfn + i, (gfn + i) << 12, PG_LEVEL_4K, kvm.sev.asid, False):
            return -EINVAL
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
            # a failed RMPUPDATE is only a WARN_ONCE: the folio is freed all the same, still
            # assigned in the RMP (the hazard host.check() reports as a freed, assigned pfn)
            rmp_make_shared(h, pfn, PG_LEVEL_2M if use_2m else PG_LEVEL_4K)
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


cdef int pvalidate_insn(gmem_host *h, uint64_t pfn, bint validate) noexcept nogil:
    """PVALIDATE (F2 0F 01 FF) on the entry the guest's walk found (a 2M head for a 2M
    request): 0, or PVALIDATE_FAIL_NOUPDATE when Validated already had that value."""
    cdef uint64_t raw = 0, old
    xa_load(&h.rmp.entries, pfn, &raw)
    h.rmp.stats[SNP_STAT_PVALIDATE] += 1
    if ((raw & RMP_VALIDATED) != 0) == validate:
        return PVALIDATE_FAIL_NOUPDATE
    xa_store_order(&h.rmp.entries, pfn, 0, raw ^ RMP_VALIDATED, &old)
    return 0


cdef int rmpadjust_check(uint64_t attrs) noexcept nogil:
    """RMPADJUST's checks of its attributes before any walk: 0 or the code."""
    cdef int vmpl = attrs & 0xFF, perm = (attrs >> 8) & 0xFF
    if vmpl == 0:
        return RMPUPDATE_FAIL_PERMISSION         # only higher VMPLs can be changed
    if vmpl > 3 or (perm & 0x2 and not perm & 0x1):
        return RMPUPDATE_FAIL_INPUT              # no such VMPL, or write without read
    return 0


cdef int rmpadjust_insn(gmem_host *h, uint64_t pfn, uint64_t attrs) noexcept nogil:
    """RMPADJUST (F3 0F 01 FE) on the entry the guest's walk found: VMPL1-3 permissions and
    the VMSA bit (attrs: vmpl in bits 0-7, permissions in 8-15, VMSA in 16)."""
    cdef uint64_t raw = 0, old, perms = 0
    cdef int vmpl = attrs & 0xFF, perm = (attrs >> 8) & 0xFF
    xa_load(&h.rmp.perms, pfn, &perms)
    perms = (perms & ~((<uint64_t>0xFF) << ((vmpl - 1) * 8))) | (<uint64_t>perm << ((vmpl - 1) * 8))
    xa_store_order(&h.rmp.perms, pfn, 0, perms, &old)
    xa_load(&h.rmp.entries, pfn, &raw)
    raw = (raw | RMP_VMSA) if attrs & (1 << 16) else (raw & ~RMP_VMSA)
    xa_store_order(&h.rmp.entries, pfn, 0, raw, &old)
    return 0


# ------------------------------------------------------- the VM (svm/sev.c)

cdef void sev_hooks_init(kvm_x86_hooks *hooks, int vm_type) noexcept nogil:
    """svm_x86_ops for the SEV VM types: every one has an ASID; SNP has private memory."""
    hooks.vm_init = sev_vm_init
    hooks.vm_destroy = sev_vm_destroy
    if vm_type == KVM_X86_SNP_VM:
        hooks.is_private_fault = snp_is_private_fault
        hooks.gmem_prepare = sev_gmem_prepare
        hooks.gmem_invalidate = sev_gmem_invalidate
        hooks.private_max_mapping_level = sev_private_max_mapping_level
        hooks.handle_rmp_fault = sev_handle_rmp_fault
        hooks.vm_launch = snp_launch_minimal
        hooks.vcpu_create = snp_vcpu_create


cdef int sev_vm_init(kvm *kvm) noexcept nogil:
    kvm.sev.asid = kvm.host.next_asid
    kvm.host.next_asid += 1
    xa_init(&kvm.sev.vmsa_pfns)
    if kvm.vm_type == KVM_X86_SEV_ES_VM or kvm.vm_type == KVM_X86_SNP_VM:
        kvm.has_protected_state = 1
    if kvm.vm_type == KVM_X86_SNP_VM:
        kvm.has_private_mem = 1
        kvm.pre_fault_allowed = 0           # until SNP_LAUNCH_FINISH
    return 0


cdef void sev_vm_destroy(kvm *kvm) noexcept nogil:
    """snp_page_reclaim of each VMSA: firmware gives it back, it is made shared and freed."""
    cdef gmem_host *h = kvm.host
    cdef uint64_t start = 0, pfn, v
    cdef int order
    while xa_find_entry(&kvm.sev.vmsa_pfns, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &pfn, &order, &v):
        _rmp_store(h, pfn, 0)
        folio_free(&h.pm, pfn_folio(&h.pm, pfn))
        start = pfn + 1
    xa_destroy(&kvm.sev.vmsa_pfns)


cdef int snp_is_private_fault(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil:
    # npf_interception: the C-bit of the access (PFERR_GUEST_ENC)
    return (error_code & PFERR_GUEST_ENC_MASK) != 0


# -------------------------------------------------------------------- launch

ctypedef struct snp_populate_args:
    int page_type
    uint32_t fw_error

cdef enum:
    KVM_SEV_SNP_PAGE_TYPE_NORMAL = 1
    KVM_SEV_SNP_PAGE_TYPE_ZERO = 3
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED = 4
    KVM_SEV_SNP_PAGE_TYPE_SECRETS = 5
    KVM_SEV_SNP_PAGE_TYPE_CPUID = 6


cdef enum:
    # include/linux/psp-sev.h
    SNP_POLICY_MASK_SMT = 1 << 16
    SNP_POLICY_MASK_RSVD_MBO = 1 << 17
    SNP_POLICY_MASK_DEBUG = 1 << 19
    SNP_POLICY_MASK_SINGLE_SOCKET = 1 << 20
    # snp_supported_policy_bits: the minimum firmware's bits (SNP_POLICY_MASK_BASE) that
    # KVM_SNP_POLICY_MASK_VALID allows: API version, SMT, MBO, DEBUG, SINGLE_SOCKET
    SNP_SUPPORTED_POLICY_BITS = 0xFFFF | SNP_POLICY_MASK_SMT | SNP_POLICY_MASK_RSVD_MBO | \
        SNP_POLICY_MASK_DEBUG | SNP_POLICY_MASK_SINGLE_SOCKET


cdef enum:
    SNP_LAUNCHING = 1           # kvm_sev_info.launch_started: LAUNCH_START done
    SNP_LAUNCHED = 2            # ... and LAUNCH_FINISH (the context stays: no second START)


cdef int sev_snp_launch_start(kvm *kvm, uint64_t policy) noexcept nogil:
    """KVM_SEV_SNP_LAUNCH_START (snp_launch_start): the guest is being built; pre-faulting is
    refused until finish. The policy may hold only the supported bits and must hold the
    reserved must-be-one bit 17."""
    if kvm.vm_type != KVM_X86_SNP_VM:
        return _refuse(kvm.host, -ENOTTY, "KVM_SEV_SNP_LAUNCH_START on a VM that is not SNP")
    if kvm.sev.launch_started:
        return _refuse(kvm.host, -EINVAL, "launch already started (the SNP context exists)")
    if policy & ~(<uint64_t>SNP_SUPPORTED_POLICY_BITS):
        return _refuse(kvm.host, -EINVAL, "policy bits outside snp_supported_policy_bits")
    if not policy & SNP_POLICY_MASK_RSVD_MBO:
        return _refuse(kvm.host, -EINVAL, "policy without SNP_POLICY_MASK_RSVD_MBO (bit 17)")
    kvm.sev.policy = policy
    kvm.sev.launch_started = SNP_LAUNCHING
    kvm.pre_fault_allowed = 0
    return 0


cdef int sev_gmem_post_populate(kvm *kvm, uint64_t gfn, uint64_t pfn, uint64_t src, int order,
                                void *opaque) noexcept nogil:
    cdef gmem_host *h = kvm.host
    cdef snp_populate_args *args = <snp_populate_args *>opaque
    cdef int assigned, level, r
    cdef uint64_t raw, old
    # sev_gmem_post_populate: a non-ZERO page needs a source (WARN_ON_ONCE, -EINVAL: the ioctl
    # says -EIO), unless the page is converted in place ("next": it already holds the data)
    if src == 0 and args.page_type != KVM_SEV_SNP_PAGE_TYPE_ZERO and not h.gmem_in_place_conversion:
        return -EINVAL
    if snp_lookup_rmpentry(h, pfn, &assigned, &level):
        return -EINVAL
    if assigned:
        return -EEXIST
    if src:
        r = host_copy_from_user(h, pfn, src)    # 6.18 copies from any alignment
        if r:
            return r
    elif not h.gmem_in_place_conversion:
        host_clear_pages(h, pfn, 1)
    r = rmp_make_private(h, pfn, gfn << 12, PG_LEVEL_4K, kvm.sev.asid, True)
    if r:
        return r
    # SNP_LAUNCH_UPDATE: firmware measures the page and accepts it into the guest
    # (Validated; no longer Immutable) [firmware ABI]
    xa_load(&h.rmp.entries, pfn, &raw)
    xa_store_order(&h.rmp.entries, pfn, 0, (raw | RMP_VALIDATED) & ~RMP_IMMUTABLE, &old)
    return 0


cdef int64_t sev_snp_launch_update(kvm *kvm, uint64_t gfn, uint64_t *uaddr, uint64_t len,
                                   int page_type, uint64_t flags, int *populate_err) noexcept nogil:
    """KVM_SEV_SNP_LAUNCH_UPDATE through kvm_gmem_populate: the pages must be PRIVATE in the
    attributes and not yet prepared. The pages done, or -errno (-EIO when kvm_gmem_populate
    failed: *populate_err says why). *uaddr: 0 for a ZERO page."""
    cdef snp_populate_args args
    cdef int64_t count
    if kvm.vm_type != KVM_X86_SNP_VM or not kvm.sev.launch_started:
        return _refuse(kvm.host, -EINVAL, "not an SNP VM with a launch context (LAUNCH_START)")
    if (len == 0 or len & 4095 or flags or not (page_type == KVM_SEV_SNP_PAGE_TYPE_NORMAL
            or KVM_SEV_SNP_PAGE_TYPE_ZERO <= page_type <= KVM_SEV_SNP_PAGE_TYPE_CPUID)):
        return _refuse(kvm.host, -EINVAL, "len, flags or page type invalid")
    if page_type == KVM_SEV_SNP_PAGE_TYPE_ZERO:
        uaddr[0] = 0
    elif uaddr[0] & 4095 and kvm.host.kernel >= GMEM_KERNEL_7_2:
        # "retroactively document and enforce" (7.0): 6.18 copied from any alignment
        return _refuse(kvm.host, -EINVAL, "uaddr must be page-aligned (7.0+)")
    if not kvm_slot_has_gmem(gfn_to_memslot(kvm, gfn)):
        return _refuse(kvm.host, -EINVAL, "gfn_start is not in a guest_memfd memslot")
    if kvm.sev.launch_started == SNP_LAUNCHED:
        # the context outlives LAUNCH_FINISH, so the ioctl goes on; the firmware refuses
        # LAUNCH_UPDATE in the RUNNING state (by reading the SNP ABI; not seen on hardware)
        return _refuse(kvm.host, -EIO, "the firmware refuses SNP_LAUNCH_UPDATE once the guest runs")
    args.page_type = page_type
    args.fw_error = 0
    count = kvm_gmem_populate(kvm, gfn, uaddr[0], len >> 12, sev_gmem_post_populate, &args)
    if count < 0:
        populate_err[0] = <int>-count
        return _refuse(kvm.host, -EIO, "kvm_gmem_populate failed")
    return count


cdef int snp_launch_update_vmsa(kvm_vcpu *vcpu) noexcept nogil:
    """snp_launch_update_vmsa for one vCPU: its VMSA becomes a private, immutable page, and
    the vCPU may run (pre_sev_run finds a valid VMSA)."""
    cdef kvm *kvm = vcpu.kvm
    cdef gmem_host *h = kvm.host
    cdef uint64_t pfn, raw, old
    cdef uint32_t id = _snp_safe_alloc_page(h)
    if id == 0:
        return _refuse(h, -ENOMEM, "out of memory for a VMSA page")
    pfn = folio_get(&h.pm, id).pfn
    if rmp_make_private(h, pfn, INITIAL_VMSA_GPA, PG_LEVEL_4K, kvm.sev.asid, True):
        folio_free(&h.pm, id)
        return _refuse(h, -EIO, "RMPUPDATE of the VMSA failed")
    xa_load(&h.rmp.entries, pfn, &raw)
    xa_store_order(&h.rmp.entries, pfn, 0, raw | RMP_VALIDATED | RMP_VMSA, &old)
    xa_store_order(&kvm.sev.vmsa_pfns, pfn, 0, 1, &old)
    vcpu.pre_run_err = 0
    return 0


cdef int sev_snp_launch_finish(kvm *kvm) noexcept nogil:
    """KVM_SEV_SNP_LAUNCH_FINISH: each vCPU's VMSA becomes a private, immutable page; the
    guest runs and pre-faulting is allowed."""
    cdef uint32_t vid
    cdef int r
    if kvm.vm_type != KVM_X86_SNP_VM:
        return _refuse(kvm.host, -ENOTTY, "KVM_SEV_SNP_LAUNCH_FINISH on a VM that is not SNP")
    if kvm.sev.launch_started != SNP_LAUNCHING:
        return _refuse(kvm.host, -EINVAL, "no SNP launch in progress (LAUNCH_START first)")
    for vid in range(KVM_MAX_VCPU_IDS):
        if kvm.vcpus[vid] != NULL:
            r = snp_launch_update_vmsa(kvm.vcpus[vid])
            if r:
                return r
    kvm.sev.launch_started = SNP_LAUNCHED
    kvm.pre_fault_allowed = 1
    return 0


cdef int snp_vcpu_create(kvm_vcpu *vcpu) noexcept nogil:
    """An SNP vCPU has no VMSA until LAUNCH_FINISH: KVM_RUN is -EINVAL (pre_sev_run). One
    created after vm.launch() gets its VMSA at once (the minimal launch stands for the build);
    one created after an explicit LAUNCH_FINISH stays unable to run, as in the kernel (only
    the guest's AP creation would give it one)."""
    if vcpu.kvm.launched_minimal:
        return snp_launch_update_vmsa(vcpu)
    vcpu.pre_run_err = -EINVAL
    return 0


cdef int snp_launch_minimal(kvm *kvm) noexcept nogil:
    """vm.launch() for SNP: LAUNCH_START, then LAUNCH_FINISH with nothing measured."""
    cdef int r = sev_snp_launch_start(kvm, SNP_POLICY_MASK_SMT | SNP_POLICY_MASK_RSVD_MBO)
    return r if r else sev_snp_launch_finish(kvm)


# --------------------------------------------------------- page-state changes
# The GHCB's psc_entry bitfields: cur_page:12, gfn:40, operation:4, pagesize:1

cdef enum:
    SNP_PAGE_STATE_PRIVATE = 1
    SNP_PAGE_STATE_SHARED = 2


cdef inline uint64_t psc_cur_page(uint64_t e) noexcept nogil:
    return e & 0xFFF

cdef inline uint64_t psc_gfn(uint64_t e) noexcept nogil:
    return (e >> 12) & ((<uint64_t>1 << 40) - 1)

cdef inline int psc_operation(uint64_t e) noexcept nogil:
    return (e >> 52) & 0xF

cdef inline uint64_t psc_npages(uint64_t e) noexcept nogil:
    return PTRS_PER_PMD if (e >> 56) & 1 else 1

cdef inline uint64_t psc_entry(uint64_t gfn, int operation, int pagesize, uint64_t cur_page) noexcept nogil:
    return (cur_page & 0xFFF) | ((gfn & ((<uint64_t>1 << 40) - 1)) << 12) | \
        (<uint64_t>(operation & 0xF) << 52) | (<uint64_t>(pagesize & 1) << 56)

cdef inline void psc_set_done(uint64_t *e) noexcept nogil:
    e[0] = (e[0] & ~(<uint64_t>0xFFF)) | psc_npages(e[0])


cdef int snp_map_gpa_exit(kvm_vcpu *vcpu, uint64_t gpa, uint64_t npages, uint64_t attrs,
                          complete_userspace_io_t complete) noexcept nogil:
    """Exit to userspace with KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)."""
    vcpu.hypercall.nr = KVM_HC_MAP_GPA_RANGE
    vcpu.hypercall.args[0] = gpa
    vcpu.hypercall.args[1] = npages
    vcpu.hypercall.args[2] = attrs
    vcpu.hypercall.flags = 0
    vcpu.complete_userspace_io = complete
    return KVM_EXIT_HYPERCALL


cdef int snp_begin_psc_msr(kvm_vcpu *vcpu, uint64_t gpa, int op, uint64_t *result) noexcept nogil:
    """GHCB MSR protocol page-state change of one page (snp_begin_psc_msr)."""
    if vcpu.kvm.vm_type != KVM_X86_SNP_VM:
        return _refuse(vcpu.kvm.host, -EINVAL, "only an SEV-SNP guest has it")
    if (op != SNP_PAGE_STATE_PRIVATE and op != SNP_PAGE_STATE_SHARED) or \
            not user_exit_on_hypercall(vcpu.kvm, KVM_HC_MAP_GPA_RANGE):
        result[0] = GHCB_MSR_PSC_RESP_ERROR
        return 0
    return snp_map_gpa_exit(vcpu, gpa & ~(<uint64_t>0xFFF), 1,
                            KVM_MAP_GPA_RANGE_ENCRYPTED if op == SNP_PAGE_STATE_PRIVATE else 0,
                            snp_complete_psc_msr)


cdef int snp_complete_psc_msr(kvm_vcpu *vcpu, uint64_t ret, uint64_t *result) noexcept nogil:
    result[0] = GHCB_MSR_PSC_RESP_ERROR if ret else GHCB_MSR_PSC_RESP
    return 0


cdef int snp_begin_psc(kvm_vcpu *vcpu, uint64_t *result) noexcept nogil:
    """One step of snp_begin_psc over the vCPU's PSC buffer: KVM_EXIT_HYPERCALL for the next
    run of entries that need userspace, or 0 with the final code in *result."""
    cdef psc_buffer *psc = &vcpu.psc
    cdef uint32_t idx, last
    cdef uint64_t e, gfn, npages
    cdef bint huge
    if psc.end_entry >= VMGEXIT_PSC_MAX_ENTRY:
        result[0] = VMGEXIT_PSC_ERROR_INVALID_HDR
        return 0
    idx = psc.cur_entry
    while idx <= psc.end_entry:
        e = psc.entries[idx]
        if psc_cur_page(e) > psc_npages(e) or psc_gfn(e) % psc_npages(e):
            result[0] = VMGEXIT_PSC_ERROR_INVALID_ENTRY
            return 0
        if psc_cur_page(e) == psc_npages(e) or (psc_operation(e) != SNP_PAGE_STATE_PRIVATE
                                                and psc_operation(e) != SNP_PAGE_STATE_SHARED):
            psc_set_done(&psc.entries[idx])        # PSMASH/UNSMASH ops: done, no exit
            idx += 1
            psc.cur_entry = idx
            continue
        break
    if idx > psc.end_entry:
        result[0] = 0
        return 0
    e = psc.entries[idx]
    huge = psc_npages(e) > 1 and psc_cur_page(e) == 0
    gfn = psc_gfn(e) + psc_cur_page(e)
    npages = psc_npages(e) - psc_cur_page(e)
    last = idx
    while last + 1 <= psc.end_entry:
        # snp_begin_psc compares with entry_start.gfn + npages, not gfn + npages: after a
        # partly done 2M entry (gfn advanced by cur_page) the next 4K entry is not merged
        e = psc.entries[last + 1]
        if (psc_operation(e) != psc_operation(psc.entries[idx]) or psc_cur_page(e) != 0
                or (psc_npages(e) > 1) != huge or psc_gfn(e) != psc_gfn(psc.entries[idx]) + npages):
            break
        npages += psc_npages(e)
        last += 1
    vcpu.psc_idx = idx
    vcpu.psc_last = last
    e = psc.entries[idx]
    return snp_map_gpa_exit(vcpu, gfn << 12, npages,
                            (KVM_MAP_GPA_RANGE_ENCRYPTED if psc_operation(e) == SNP_PAGE_STATE_PRIVATE else 0) |
                            (KVM_MAP_GPA_RANGE_PAGE_SZ_2M if psc_npages(e) > 1 else 0),
                            snp_complete_one_psc)


cdef int snp_complete_one_psc(kvm_vcpu *vcpu, uint64_t ret, uint64_t *result) noexcept nogil:
    cdef uint32_t i
    if ret:
        result[0] = VMGEXIT_PSC_ERROR_GENERIC
        return 0
    for i in range(vcpu.psc_idx, vcpu.psc_last + 1):
        psc_set_done(&vcpu.psc.entries[i])
    vcpu.psc.cur_entry = vcpu.psc_last + 1
    return snp_begin_psc(vcpu, result)


cdef int sev_vcpu_psc(kvm_vcpu *vcpu, uint64_t *result) noexcept nogil:
    """SVM_VMGEXIT_PSC with vcpu.psc filled by the guest: refused without KVM_HC_MAP_GPA_RANGE
    exits (VMGEXIT_PSC_ERROR_GENERIC), else snp_begin_psc."""
    if vcpu.kvm.vm_type != KVM_X86_SNP_VM:
        return _refuse(vcpu.kvm.host, -EINVAL, "only an SEV-SNP guest has it")
    if not user_exit_on_hypercall(vcpu.kvm, KVM_HC_MAP_GPA_RANGE):
        result[0] = VMGEXIT_PSC_ERROR_GENERIC
        return 0
    return snp_begin_psc(vcpu, result)


cdef bint snp_rmpupdate_failure_code(int code) noexcept nogil:
    return code == RMPUPDATE_FAIL_INPUT or code == RMPUPDATE_FAIL_PERMISSION or \
        code == RMPUPDATE_FAIL_INUSE or code == RMPUPDATE_FAIL_OVERLAP


cdef bint snp_next_assigned(gmem_host *h, uint64_t *start, uint64_t *pfn, uint64_t *npages) noexcept nogil:
    """The next assigned entry at or after *start: 1 with its first pfn and its pages (512 for
    a 2M entry), *start past it."""
    cdef uint64_t first, v
    cdef int order
    while start[0] != INVALID_GFN and xa_find_entry(&h.rmp.entries, start[0], INVALID_GFN, XA_NO_MARK,
                                                    &first, &order, &v):
        start[0] = first + 1
        if v & RMP_ASSIGNED:
            pfn[0], npages[0] = first, PTRS_PER_PMD if v & RMP_PAGESIZE else 1
            return 1
    return 0


cdef uint8_t snp_page_state(gmem_host *h, uint64_t pfn) noexcept nogil:
    cdef uint64_t raw = rmp_raw(h, pfn)
    return 0 if not raw & RMP_ASSIGNED else (2 if raw & RMP_VALIDATED else 1)


cdef void rmp_entry_repr(const rmp_entry_info *e, char *out, size_t len) noexcept nogil:
    """The entry as gmem.RmpEntry prints it, for check()'s messages."""
    snprintf(out, len, "RmpEntry(assigned=%s, pagesize=%d, immutable=%s, validated=%s, asid=%u, gpa=%llu, "
             "vmsa=%s)", "True" if e.assigned else "False", e.pagesize, "True" if e.immutable else "False",
             "True" if e.validated else "False", e.asid, <unsigned long long>e.gpa,
             "True" if e.vmsa else "False")


cdef uint64_t snp_stat(const gmem_host *h, int which) noexcept nogil:
    return h.rmp.stats[which] if 0 <= which < SNP_NR_STATS else 0


cdef void snp_inject_rmpupdate_failures(gmem_host *h, uint64_t n, int code) noexcept nogil:
    """Fault injection: the next n RMPUPDATEs return code."""
    h.rmp.fail_rmpupdate = n
    h.rmp.fail_rmpupdate_code = code


cdef bint snp_next_leaked(gmem_host *h, uint64_t *start, uint64_t *pfn) noexcept nogil:
    """The next page snp_leak_pages took out of use, at or after *start."""
    cdef uint64_t v
    cdef int order
    if start[0] == INVALID_GFN or not xa_find_entry(&h.rmp.leaked, start[0], INVALID_GFN, XA_NO_MARK,
                                                    pfn, &order, &v):
        return 0
    start[0] = pfn[0] + 1
    return 1


cdef bint sev_next_vmsa(kvm *kvm, uint64_t *start, uint64_t *pfn) noexcept nogil:
    """The next VMSA page of kvm's vCPUs, at or after *start."""
    cdef uint64_t v
    cdef int order
    if kvm.dead or start[0] == INVALID_GFN or not xa_find_entry(&kvm.sev.vmsa_pfns, start[0], INVALID_GFN,
                                                                XA_NO_MARK, pfn, &order, &v):
        return 0
    start[0] = pfn[0] + 1
    return 1


cdef uint32_t sev_asid(const kvm *kvm) noexcept nogil:
    return kvm.sev.asid


ctypedef packed struct rmp_view_rec:
    # laid out as gmem.RMP_DTYPE
    uint64_t pfn
    uint8_t assigned
    uint8_t pagesize
    uint8_t immutable
    uint8_t validated
    uint8_t vmsa
    uint16_t asid
    uint64_t gpa


cdef void snp_rmp_view(gmem_host *h, uint64_t start, uint64_t stop, rmp_view_rec *out) noexcept nogil:
    """The entries of pfns [start, stop) as hardware reads them (host.rmp.view)."""
    cdef uint64_t pfn
    cdef rmp_entry_info e
    for pfn in range(start, stop):
        e = snp_rmpentry_info(h, pfn)
        out.pfn, out.assigned, out.pagesize, out.immutable = pfn, e.assigned, e.pagesize, e.immutable
        out.validated, out.vmsa, out.asid, out.gpa = e.validated, e.vmsa, e.asid, e.gpa
        out += 1
