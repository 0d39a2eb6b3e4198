# arch/x86/kvm/mmu/tdp_mmu.c, tdp_iter.c and spte.h: SPTEs in 512-entry, 4 KiB page tables
# as the TDP MMU keeps them. Each VM has a direct root and, where private memory is mirrored
# to external page tables (TDX), a mirror root holding the private leaves; a leaf is a 4K
# SPTE at level 1 or a huge one (2M, 1G) with the large bit at level 2 or 3. Zaps walk the
# range (tdp_mmu_zap_leafs) and leave the tables; a table goes when a huge leaf takes its
# place or the VM goes. Every SPTE is read and written here: the fault path, vm.sptes() and
# check() come through the functions at the end of this file. Vendors come in through the
# hook table (set_external_spte, remove_external_spte): nothing here names SNP or TDX.
#
# Both roots are indexed by the gfn without TDX's shared bit (the kernel's direct root adds
# it back, tdp_iter's gfn_bits): the model has always reported, zapped and checked SPTEs by
# that gfn.

from libc.stdio cimport snprintf

# ------------------------------------------------------------------- mmu.h

cdef inline bint kvm_has_mirrored_tdp(const kvm *kvm) noexcept nogil:
    """Private leaves live in a mirror root forwarded to external page tables, and the vendor
    handles the fault's exit itself (mmu.h: the VM type says so, as in the kernel)."""
    return kvm.vm_type == KVM_X86_TDX_VM


# ------------------------------------------------------------------ spte.h

cdef enum:
    SPTE_LEVEL_BITS = 9
    SPTE_ENT_PER_PAGE = 512
    # (TDP_ROOT_LEVEL, 5: _core.pxd, the cursors' pt_path holds a table per level)
    TDP_ROOT_GFN_BITS = 45      # what a root of TDP_ROOT_LEVEL reaches

cdef extern from *:
    """
    #define GMEM_PT_WRITABLE_MASK (1ULL << 1)
    #define GMEM_PT_PAGE_SIZE_MASK (1ULL << 7)
    #define GMEM_SPTE_MMU_PRESENT_MASK (1ULL << 11)
    #define GMEM_SPTE_BASE_ADDR_MASK (((1ULL << 52) - 1) & ~4095ULL)
    #define GMEM_SPTE_PRIVATE (1ULL << 60)
    #define GMEM_TDP_GEN_NOWHERE (~0ULL)
    """
    const uint64_t PT_WRITABLE_MASK "GMEM_PT_WRITABLE_MASK"
    const uint64_t PT_PAGE_SIZE_MASK "GMEM_PT_PAGE_SIZE_MASK"        # a huge leaf
    const uint64_t SPTE_MMU_PRESENT_MASK "GMEM_SPTE_MMU_PRESENT_MASK"
    const uint64_t SPTE_BASE_ADDR_MASK "GMEM_SPTE_BASE_ADDR_MASK"    # the pfn, or the child table
    # the model's, in a software-available bit: the leaf maps private memory (the kernel
    # knows it from the root for TDX and from the RMP for SNP)
    const uint64_t SPTE_PRIVATE "GMEM_SPTE_PRIVATE"
    const uint64_t TDP_GEN_NOWHERE "GMEM_TDP_GEN_NOWHERE"


cdef inline uint64_t make_spte(uint64_t pfn, int level, bint writable, bint private) noexcept nogil:
    return (SPTE_MMU_PRESENT_MASK | (pfn << 12) | (PT_PAGE_SIZE_MASK if level > PG_LEVEL_4K else 0) |
            (PT_WRITABLE_MASK if writable else 0) | (SPTE_PRIVATE if private else 0))


cdef inline uint64_t make_nonleaf_spte(const uint64_t *child) noexcept nogil:
    # the child table's address where the kernel keeps its physical address
    return SPTE_MMU_PRESENT_MASK | <uint64_t><size_t>child


cdef inline bint is_shadow_present_pte(uint64_t spte) noexcept nogil:
    return (spte & SPTE_MMU_PRESENT_MASK) != 0


cdef inline bint is_last_spte(uint64_t spte, int level) noexcept nogil:
    return level == PG_LEVEL_4K or (spte & PT_PAGE_SIZE_MASK) != 0


cdef inline uint64_t spte_to_pfn(uint64_t spte) noexcept nogil:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


cdef inline uint64_t *spte_to_child_pt(uint64_t spte) noexcept nogil:
    return <uint64_t *><size_t>(spte & SPTE_BASE_ADDR_MASK)


cdef inline int spte_shift(int level) noexcept nogil:
    """gfn bits below a level's index (KVM_HPAGE_GFN_SHIFT)."""
    return (level - 1) * SPTE_LEVEL_BITS


cdef inline int spte_index(uint64_t gfn, int level) noexcept nogil:
    return (gfn >> spte_shift(level)) & (SPTE_ENT_PER_PAGE - 1)


# --------------------------------------------------------------- the cursor
# Not the kernel's: a walk leaves the caller's tdp_cursor on the table it ended in, and the
# next walk for a gfn under that table starts there while no table of the VM was freed
# (tdp_mmu_gen), so a stream of faults in one 2 MiB range reads one SPTE. The batch walks
# cursors ahead of the faults and hands them over (_mmu.pxi).

cdef inline void tdp_cursor_init(tdp_cursor *c) noexcept nogil:
    c.gen = TDP_GEN_NOWHERE


cdef void kvm_mmu_create(kvm_vcpu *vcpu) noexcept nogil:
    """kvm_mmu_create (kvm_arch_vcpu_create): the vCPU's MMU state, here its cursors, one per
    root, standing nowhere."""
    tdp_cursor_init(&vcpu.tdp_cursor[TDP_ROOT_DIRECT])
    tdp_cursor_init(&vcpu.tdp_cursor[TDP_ROOT_MIRROR])


cdef inline void tdp_cursor_stand(tdp_cursor *c, const kvm *kvm, uint64_t *pt, int level,
                                  uint64_t gfn) noexcept nogil:
    c.pt = pt
    c.gfn = gfn
    c.gen = kvm.tdp_mmu_gen
    c.level = level
    c.shift = spte_shift(level)


cdef inline bint tdp_cursor_trusted(const tdp_cursor *c, const kvm *kvm, uint64_t gfn) noexcept nogil:
    return c.gen == kvm.tdp_mmu_gen and ((gfn ^ c.gfn) >> c.shift) < SPTE_ENT_PER_PAGE


cdef inline uint64_t *tdp_cursor_climb(const tdp_cursor *c, const kvm *kvm, uint64_t gfn, int min_level,
                                       int *level) noexcept nogil:
    """The deepest table on the cursor's path, of min_level or above, whose range holds gfn
    (*level its level): where a walk for gfn can start. NULL if the cursor is not trusted or
    only the root holds gfn (the walk starts at the root)."""
    cdef uint64_t x = gfn ^ c.gfn
    cdef int lvl = c.level
    if c.gen != kvm.tdp_mmu_gen:
        return NULL
    while lvl < min_level or x >> (spte_shift(lvl) + SPTE_LEVEL_BITS):
        lvl += 1
        if lvl == TDP_ROOT_LEVEL:
            return NULL
    level[0] = lvl
    return c.pt_path[lvl - 1]


cdef uint64_t *_tdp_mmu_walk(kvm *kvm, int root, uint64_t gfn, tdp_cursor *c, int *level,
                             int to_table) noexcept nogil:
    """Down from the deepest table on the cursor's path that holds gfn (else from the root) to
    the last SPTE on gfn's path (a leaf, not present, or at level 1): its address, with
    *level; the cursor stands on its table. NULL if the root does not reach gfn. to_table (a
    level, or 0): stop at the table of that level without reading its SPTE (a batch
    prefetches it)."""
    cdef uint64_t *pt
    cdef uint64_t spte
    cdef int lvl
    pt = tdp_cursor_climb(c, kvm, gfn, 1, &lvl)
    if pt == NULL:
        pt, lvl = kvm.tdp_root[root], TDP_ROOT_LEVEL
        if pt == NULL or gfn >> TDP_ROOT_GFN_BITS:
            c.gen = TDP_GEN_NOWHERE
            return NULL
        c.pt_path[TDP_ROOT_LEVEL - 1] = pt
    while lvl > to_table:
        spte = pt[spte_index(gfn, lvl)]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, lvl):
            break
        pt = spte_to_child_pt(spte)
        lvl -= 1
        c.pt_path[lvl - 1] = pt
    tdp_cursor_stand(c, kvm, pt, lvl, gfn)
    level[0] = lvl
    return &pt[spte_index(gfn, lvl)]


cdef inline uint64_t *tdp_mmu_last_sptep(kvm *kvm, int root, uint64_t gfn, tdp_cursor *c) noexcept nogil:
    """kvm_tdp_mmu_fast_pf_get_last_sptep with the caller's cursor, left on the SPTE's table
    (c.level is the SPTE's level): a cursor already there reads it inline."""
    cdef uint64_t *sptep
    cdef int level
    if tdp_cursor_trusted(c, kvm, gfn):
        sptep = &c.pt[(gfn >> c.shift) & (SPTE_ENT_PER_PAGE - 1)]
        if not is_shadow_present_pte(sptep[0]) or is_last_spte(sptep[0], c.level):
            return sptep
    return _tdp_mmu_walk(kvm, root, gfn, c, &level, 0)


cdef uint64_t *tdp_mmu_pt_at(kvm *kvm, int root, uint64_t gfn, tdp_cursor *c, int level) noexcept nogil:
    """The table of that level on gfn's path (or one below it, where the cursor already
    stands), the cursor left on it, or NULL if there is none (the batch finds it to prefetch
    gfn's entry in it)."""
    cdef int found
    if tdp_cursor_trusted(c, kvm, gfn) and c.level <= level:
        return c.pt
    if _tdp_mmu_walk(kvm, root, gfn, c, &found, level) == NULL or found > level:
        return NULL
    return c.pt


# ------------------------------------------------------------------ tables

cdef inline uint64_t *tdp_mmu_alloc_sp(kvm *kvm) noexcept nogil:
    cdef uint64_t *pt = gmem_page_alloc(&kvm.host.pt_pool)
    if pt != NULL:
        kvm.tdp_mmu_pages += 1          # tdp_account_mmu_page
    return pt


cdef void tdp_mmu_free_pt(kvm *kvm, uint64_t *pt, int level) noexcept nogil:
    """handle_removed_pt, with the model's accounting: the table's leaves go uncounted (not
    zapped: no trace, no remote flush, no external removal, as when an entry replaces
    smaller ones), its tables are freed, every entry is zeroed and the page goes back."""
    cdef int i
    cdef uint64_t spte
    for i in range(SPTE_ENT_PER_PAGE):
        spte = pt[i]
        if not is_shadow_present_pte(spte):
            continue
        if is_last_spte(spte, level):
            kvm.tdp_pages[level - 1] -= 1
        else:
            tdp_mmu_free_pt(kvm, spte_to_child_pt(spte), level - 1)
        pt[i] = 0
    gmem_page_free(&kvm.host.pt_pool, pt)
    kvm.tdp_mmu_pages -= 1
    kvm.tdp_mmu_gen += 1                # no cursor trusts a freed table


cdef void kvm_mmu_uninit_tdp_mmu(kvm *kvm) noexcept nogil:
    """The VM goes: every table of every root (its leaves were zapped before)."""
    cdef int root
    for root in range(TDP_NR_ROOTS):
        if kvm.tdp_root[root] != NULL:
            tdp_mmu_free_pt(kvm, kvm.tdp_root[root], TDP_ROOT_LEVEL)
            kvm.tdp_root[root] = NULL


# -------------------------------------------------------------------- zap

cdef inline void tdp_mmu_zap_spte(kvm *kvm, uint64_t *sptep, uint64_t gfn, int level,
                                  uint32_t vcpu_id) noexcept nogil:
    """A leaf goes (tdp_mmu_iter_set_spte to SHADOW_NONPRESENT_VALUE): its stats, the
    vendor's external removal for a private one, the trace (vcpu_id: the fault's, or 0)."""
    cdef uint64_t spte = sptep[0]
    cdef remove_external_spte_t remove_external = kvm.host.hooks[kvm.vm_type].remove_external_spte
    sptep[0] = 0
    kvm.tdp_pages[level - 1] -= 1
    if spte & SPTE_PRIVATE and remove_external != NULL:
        remove_external(kvm, gfn, level, spte_to_pfn(spte))
    gmem_trace(kvm.host, TRACE_SPTE_ZAP, vcpu_id, gfn, spte_to_pfn(spte), level, 0)


cdef uint64_t _tdp_mmu_zap_leafs(kvm *kvm, uint64_t *pt, int level, uint64_t base, uint64_t start,
                                 uint64_t end, int min_level=PG_LEVEL_4K) noexcept nogil:
    """Zap the leaves of pt (level, covering gfns from base) overlapping [start, end), huge
    ones whole, in gfn order, those of min_level and above; the number zapped."""
    cdef int shift = spte_shift(level), i, last
    cdef uint64_t spte, gfn, zapped = 0
    i = 0 if start <= base else <int>((start - base) >> shift)
    last = SPTE_ENT_PER_PAGE - 1
    if end - base <= (<uint64_t>SPTE_ENT_PER_PAGE << shift):
        last = <int>((end - 1 - base) >> shift)
    while i <= last:
        spte = pt[i]
        if is_shadow_present_pte(spte):
            gfn = base + ((<uint64_t>i) << shift)
            if is_last_spte(spte, level):
                tdp_mmu_zap_spte(kvm, &pt[i], gfn, level, 0)
                zapped += 1
            elif level - 1 >= min_level:
                zapped += _tdp_mmu_zap_leafs(kvm, spte_to_child_pt(spte), level - 1, gfn, start, end,
                                             min_level)
        i += 1
    return zapped


cdef uint64_t tdp_mmu_zap_leafs(kvm *kvm, int root, uint64_t start, uint64_t end,
                                int min_level=PG_LEVEL_4K) noexcept nogil:
    """tdp_mmu_zap_leafs: the leaf SPTEs of root in [start, end) (of min_level and above) go;
    the tables stay."""
    cdef uint64_t reach = (<uint64_t>1) << TDP_ROOT_GFN_BITS
    if kvm.tdp_root[root] == NULL or start >= reach:
        return 0
    return _tdp_mmu_zap_leafs(kvm, kvm.tdp_root[root], TDP_ROOT_LEVEL, 0, start,
                              end if end < reach else reach, min_level)


# ------------------------------------------------------------------ split

cdef int tdp_mmu_split_huge_page(kvm *kvm, uint64_t *sptep, uint64_t gfn, int level) noexcept nogil:
    """tdp_mmu_split_huge_page: the huge leaf at sptep (mapping gfn on, at level) becomes a
    table of 512 leaves one level down mapping the same pfns, with the same bits; a private
    one goes through the vendor's split_external_spte first (TDX: demote). 0, or -errno with
    nothing changed. No flush: the translations stay valid (kvm_split_cross_boundary_leafs
    leaves flushing to its caller)."""
    cdef uint64_t spte = sptep[0], pfn = spte_to_pfn(spte), step = _pages(spte_shift(level - 1))
    cdef split_external_spte_t split_external = kvm.host.hooks[kvm.vm_type].split_external_spte
    cdef uint64_t *child = tdp_mmu_alloc_sp(kvm)
    cdef int i, r
    if child == NULL:
        return -ENOMEM
    if spte & SPTE_PRIVATE and split_external != NULL:
        r = split_external(kvm, gfn, level, pfn)
        if r:
            gmem_page_free(&kvm.host.pt_pool, child)
            kvm.tdp_mmu_pages -= 1
            return r
    for i in range(SPTE_ENT_PER_PAGE):
        child[i] = make_spte(pfn + i * step, level - 1, (spte & PT_WRITABLE_MASK) != 0,
                             (spte & SPTE_PRIVATE) != 0)
    sptep[0] = make_nonleaf_spte(child)
    kvm.tdp_pages[level - 1] -= 1
    kvm.tdp_pages[level - 2] += SPTE_ENT_PER_PAGE
    return 0


cdef int tdp_mmu_split_at(kvm *kvm, int root, uint64_t boundary) noexcept nogil:
    """Split the huge leaves of root that map both boundary - 1 and boundary, down to the
    level where none does: the number split, or -errno."""
    cdef tdp_cursor c
    cdef uint64_t *sptep
    cdef int level, r, n = 0
    if boundary == 0 or boundary >> TDP_ROOT_GFN_BITS:
        return 0
    tdp_cursor_init(&c)
    while True:
        sptep = _tdp_mmu_walk(kvm, root, boundary, &c, &level, 0)
        if sptep == NULL or level == PG_LEVEL_4K or not is_shadow_present_pte(sptep[0]) or \
                not boundary & _mask(spte_shift(level)):
            return n
        r = tdp_mmu_split_huge_page(kvm, sptep, boundary & ~_mask(spte_shift(level)), level)
        if r:
            return r
        n += 1


cdef int tdp_mmu_split_leafs_above(kvm *kvm, int root, uint64_t start, uint64_t end,
                                   int max_level) noexcept nogil:
    """Split every leaf of root in [start, end) above max_level down to it (a folio under
    them is being split): the number split, or -errno (what was split stays split)."""
    cdef tdp_cursor c
    cdef uint64_t *sptep
    cdef uint64_t gfn = start
    cdef int level, r, n = 0
    tdp_cursor_init(&c)
    while gfn < end and not gfn >> TDP_ROOT_GFN_BITS:
        sptep = _tdp_mmu_walk(kvm, root, gfn, &c, &level, 0)
        if sptep == NULL:
            return n
        if level > max_level and is_shadow_present_pte(sptep[0]) and is_last_spte(sptep[0], level):
            r = tdp_mmu_split_huge_page(kvm, sptep, gfn & ~_mask(spte_shift(level)), level)
            if r:
                return r
            n += 1
            continue                            # walk again into the new table
        gfn = (gfn & ~_mask(spte_shift(level))) + _pages(spte_shift(level))
    return n


cdef int kvm_split_cross_boundary_leafs(kvm *kvm, uint64_t start, uint64_t end, int filter) noexcept nogil:
    """kvm_split_cross_boundary_leafs (proposed, TDX huge pages v3): split every huge leaf of
    the roots filter names (as kvm_unmap_gfn_range does) that crosses start or end, so that a
    zap of [start, end) that follows is precise. The number of leaves split, or -errno (what
    was split stays split). TDX's private zaps must be precise: the guest has to re-accept
    whatever is zapped."""
    cdef int root, r, n = 0
    if end <= start:
        return 0
    if not kvm_has_mirrored_tdp(kvm):
        filter = 0
    for root in range(TDP_NR_ROOTS):
        if kvm.tdp_root[root] == NULL or \
                filter == (KVM_FILTER_SHARED if root == TDP_ROOT_MIRROR else KVM_FILTER_PRIVATE):
            continue
        r = tdp_mmu_split_at(kvm, root, start)
        if r >= 0:
            n += r
            r = tdp_mmu_split_at(kvm, root, end)
        if r < 0:
            return r
        n += r
    return n


cdef uint64_t kvm_tdp_mmu_mirror_spte(kvm *kvm, uint64_t gfn, int *level) noexcept nogil:
    """The last SPTE on gfn's path in the mirror root (a leaf, not present, or at level 1),
    with its level: the walk a TDX module makes of the S-EPT, whose tables are the mirror's
    (0 at TDP_ROOT_LEVEL if there is no mirror root)."""
    cdef tdp_cursor c
    cdef uint64_t *sptep
    tdp_cursor_init(&c)
    sptep = _tdp_mmu_walk(kvm, TDP_ROOT_MIRROR, gfn, &c, level, 0)
    if sptep == NULL:
        level[0] = TDP_ROOT_LEVEL
        return 0
    return sptep[0]


# -------------------------------------------------------------------- map

cdef inline bint mirror_hugepage_adjust(kvm_page_fault *fault, const uint64_t *pt, int level) noexcept nogil:
    """disallowed_hugepage_adjust as Rick Edgecombe's "KVM: x86/mmu: Disallow page merging
    (huge page adjustment) for mirror root" applies it (proposed, TDX huge pages v3): at the
    goal level of the mirror root, a table already there lowers the goal by one, the pfn
    following the gfn (the TDX module promotes nothing KVM asks it to map over smaller
    leaves). True when it did."""
    cdef uint64_t spte
    if level != fault.goal_level or level == PG_LEVEL_4K:
        return False
    spte = pt[spte_index(fault.gfn, level)]
    if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
        return False
    fault.pfn |= fault.gfn & (_mask(spte_shift(level)) & ~_mask(spte_shift(level - 1)))
    fault.goal_level -= 1
    return True


cdef inline int kvm_fault_map_root(const kvm *kvm, const kvm_page_fault *fault) noexcept nogil:
    """tdp_mmu_get_root_for_fault: the mirror root for a private fault of a VM with mirrored
    TDP. Branches, not `a and b`: gcc kept that flag in a stack byte (setcc) and read it back
    8 bytes wide, a store-forwarding stall on every slow-path fault (+10 ns, measured)."""
    if fault.is_private:
        if kvm_has_mirrored_tdp(kvm):
            return TDP_ROOT_MIRROR
    return TDP_ROOT_DIRECT


cdef int kvm_tdp_mmu_map(kvm_vcpu *vcpu, kvm_page_fault *fault) noexcept nogil:
    """kvm_tdp_mmu_map: down the root of the fault (the mirror root for a private fault of a
    VM with mirrored TDP) to the goal level, linking tables where there are none, then the
    leaf (tdp_mmu_map_handle_target_level). The model's rules, as before page tables: the
    very SPTE already there is RET_PF_SPURIOUS; a huge leaf on the way is zapped (counted,
    traced, flushed) to make room for a table; smaller SPTEs under the new huge leaf go
    with their table, uncounted. The mirror root (proposed, TDX huge pages v3) never maps a
    huge leaf where a table is (no promotion: mirror_hugepage_adjust), and splits a huge leaf
    on the way rather than zap it (the guest would have to re-accept it; the model's choice:
    v3 splits before the fault, under the write mmu_lock, where GUEST_INHIBIT is set, so the
    fault path does not meet one)."""
    cdef kvm *kvm = vcpu.kvm
    cdef int root = kvm_fault_map_root(kvm, fault)
    cdef tdp_cursor *c = &vcpu.tdp_cursor[root]
    cdef int goal = fault.goal_level, level, r
    cdef uint64_t base, spte, new
    cdef uint64_t *pt
    cdef uint64_t *child
    cdef uint64_t *sptep
    pt = tdp_cursor_climb(c, kvm, fault.gfn, goal, &level)
    if pt == NULL:
        pt, level = kvm.tdp_root[root], TDP_ROOT_LEVEL
        if fault.gfn >> TDP_ROOT_GFN_BITS:
            return -EFAULT              # beyond kvm_mmu_max_gfn(): no memslot maps it
        if pt == NULL:
            pt = kvm.tdp_root[root] = tdp_mmu_alloc_sp(kvm)     # kvm_tdp_mmu_alloc_root
            if pt == NULL:
                return -ENOMEM
        c.pt_path[TDP_ROOT_LEVEL - 1] = pt
    # the path below is rewritten for fault.gfn: the cursor stands nowhere until it stands
    # on the goal's table (a failure on the way leaves it so)
    c.gen = TDP_GEN_NOWHERE
    while level > goal or (root == TDP_ROOT_MIRROR and mirror_hugepage_adjust(fault, pt, level)):
        goal = fault.goal_level
        sptep = &pt[spte_index(fault.gfn, level)]
        spte = sptep[0]
        if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
            pt = spte_to_child_pt(spte)
            level -= 1
            c.pt_path[level - 1] = pt
            continue
        if root == TDP_ROOT_MIRROR and is_shadow_present_pte(spte):
            r = tdp_mmu_split_huge_page(kvm, sptep, fault.gfn & ~_mask(spte_shift(level)), level)
            if r:
                return r
            continue
        child = tdp_mmu_alloc_sp(kvm)
        if child == NULL:
            return -ENOMEM
        if is_shadow_present_pte(spte):
            # a huge SPTE where a smaller one goes: zapped first
            tdp_mmu_zap_spte(kvm, sptep, fault.gfn & ~_mask(spte_shift(level)), level, vcpu.vcpu_id)
            kvm.stats[VM_STAT_ZAPPED_SPTES] += 1
            kvm.stats[VM_STAT_REMOTE_TLB_FLUSH] += 1
        sptep[0] = make_nonleaf_spte(child)     # tdp_mmu_link_sp
        pt = child
        level -= 1
        c.pt_path[level - 1] = pt
    tdp_cursor_stand(c, kvm, pt, level, fault.gfn)
    base = fault.gfn & ~_mask(spte_shift(goal))
    new = make_spte(fault.pfn, goal, fault.map_writable, fault.is_private)
    sptep = &pt[spte_index(fault.gfn, level)]
    spte = sptep[0]
    if spte == new:
        return RET_PF_SPURIOUS
    if fault.is_private and kvm.host.hooks[kvm.vm_type].set_external_spte != NULL:
        # TDX: the mirror leaf is forwarded to the S-EPT before it becomes visible
        if kvm.host.hooks[kvm.vm_type].set_external_spte(kvm, base, goal, fault.pfn):
            return -EIO
    if is_shadow_present_pte(spte):
        if is_last_spte(spte, goal):
            kvm.tdp_pages[goal - 1] -= 1
        else:
            sptep[0] = 0
            tdp_mmu_free_pt(kvm, spte_to_child_pt(spte), goal - 1)
            tdp_cursor_stand(c, kvm, pt, level, fault.gfn)
    sptep[0] = new
    kvm.tdp_pages[goal - 1] += 1
    gmem_trace(kvm.host, TRACE_SPTE_INSTALL, vcpu.vcpu_id, base, fault.pfn, goal, fault.is_private)
    return RET_PF_FIXED


# ---------------------------------------------- lookups: vm.sptes(), check()

cdef bint _tdp_mmu_leaf_at(kvm *kvm, int root, uint64_t gfn, uint64_t *spte, int *level) noexcept nogil:
    cdef tdp_cursor c
    cdef uint64_t *sptep
    tdp_cursor_init(&c)
    sptep = _tdp_mmu_walk(kvm, root, gfn, &c, level, 0)
    if sptep == NULL or not is_shadow_present_pte(sptep[0]):
        return False
    spte[0] = sptep[0]
    return True


cdef bint kvm_mmu_spte_lookup(kvm *kvm, uint64_t gfn, uint64_t *pfn, int *level, bint *private) noexcept nogil:
    """The leaf SPTE mapping gfn, in either root: 1 with the pfn it maps gfn to, its level and
    whether it is private, or 0 if gfn is not mapped."""
    cdef uint64_t spte
    cdef int root
    if kvm.dead:
        return 0
    for root in range(TDP_NR_ROOTS):
        if _tdp_mmu_leaf_at(kvm, root, gfn, &spte, level):
            pfn[0] = spte_to_pfn(spte) + (gfn & _mask(spte_shift(level[0])))
            private[0] = (spte & SPTE_PRIVATE) != 0
            return 1
    return 0


ctypedef struct kvm_spte_info:
    uint64_t gfn                # the first gfn it maps
    uint64_t pfn
    int level
    bint writable
    bint private


cdef bint _tdp_mmu_next_leaf(const uint64_t *pt, int level, uint64_t base, uint64_t start,
                             kvm_spte_info *info) noexcept nogil:
    """The first leaf of pt (level, from base) that ends at or after start."""
    cdef int shift = spte_shift(level), i
    cdef uint64_t spte, gfn
    i = 0 if start <= base else <int>((start - base) >> shift)
    while i < SPTE_ENT_PER_PAGE:
        spte = pt[i]
        gfn = base + ((<uint64_t>i) << shift)
        if is_shadow_present_pte(spte):
            if is_last_spte(spte, level):
                info.gfn, info.pfn, info.level = gfn, spte_to_pfn(spte), level
                info.writable, info.private = (spte & PT_WRITABLE_MASK) != 0, (spte & SPTE_PRIVATE) != 0
                return True
            if _tdp_mmu_next_leaf(spte_to_child_pt(spte), level - 1, gfn, start, info):
                return True
        i += 1
    return False


cdef bint kvm_mmu_next_spte(kvm *kvm, uint64_t *start, kvm_spte_info *info) noexcept nogil:
    """The next leaf SPTE covering *start or after it, in either root, advancing *start past it
    (vm.sptes(), check())."""
    cdef kvm_spte_info other
    cdef bint found = False
    cdef int root
    if kvm.dead or start[0] >> TDP_ROOT_GFN_BITS:
        return 0
    for root in range(TDP_NR_ROOTS):
        if kvm.tdp_root[root] != NULL and _tdp_mmu_next_leaf(kvm.tdp_root[root], TDP_ROOT_LEVEL, 0,
                                                              start[0], &other):
            if not found or other.gfn < info.gfn:
                info[0] = other
                found = True
    if found:
        start[0] = info.gfn + _pages(spte_shift(info.level))
    return found


cdef uint64_t kvm_vm_pages(const kvm *kvm, int level) noexcept nogil:
    if not PG_LEVEL_4K <= level <= PG_LEVEL_1G or kvm.dead:
        return 0
    return kvm.tdp_pages[level - 1]


cdef int _tdp_mmu_check_pt(const kvm *kvm, int root, const uint64_t *pt, int level, uint64_t base,
                           uint64_t *pages, uint64_t *tables) noexcept nogil:
    """Entries of one table: the code of the first malformed one (see tdp_mmu_check), or 0."""
    cdef int shift = spte_shift(level), i, r
    cdef uint64_t spte, known = (SPTE_MMU_PRESENT_MASK | SPTE_BASE_ADDR_MASK | PT_WRITABLE_MASK |
                                 PT_PAGE_SIZE_MASK | SPTE_PRIVATE)
    tables[0] += 1
    for i in range(SPTE_ENT_PER_PAGE):
        spte = pt[i]
        if not is_shadow_present_pte(spte):
            if spte:
                return 1                # bits in a non-present SPTE
            continue
        if spte & ~known:
            return 2                    # reserved bits
        if not is_last_spte(spte, level):
            if level == PG_LEVEL_4K or spte & ~(SPTE_MMU_PRESENT_MASK | SPTE_BASE_ADDR_MASK):
                return 3                # a table entry with leaf bits
            r = _tdp_mmu_check_pt(kvm, root, spte_to_child_pt(spte), level - 1,
                                  base + ((<uint64_t>i) << shift), pages, tables)
            if r:
                return r
            continue
        if level > KVM_MAX_HUGEPAGE_LEVEL:
            return 4                    # a leaf above 1G
        if spte_to_pfn(spte) & _mask(shift):
            return 5                    # a huge leaf's pfn not aligned to its size
        if kvm_has_mirrored_tdp(kvm) and ((spte & SPTE_PRIVATE) != 0) != (root == TDP_ROOT_MIRROR):
            return 6                    # the mirror root holds the private leaves, only they
        pages[level - 1] += 1
    return 0


cdef int tdp_mmu_check(const kvm *kvm, char *buf, size_t len) noexcept nogil:
    """The page tables are well formed and the counters agree with them: 0, or -1 with the
    first inconsistency in buf."""
    cdef uint64_t pages[3]
    cdef uint64_t tables = 0
    cdef int root, r, level
    pages[0] = pages[1] = pages[2] = 0
    for root in range(TDP_NR_ROOTS):
        if kvm.tdp_root[root] == NULL:
            continue
        if root == TDP_ROOT_MIRROR and not kvm_has_mirrored_tdp(kvm):
            snprintf(buf, len, "VM %u (type %d): a mirror root without mirrored TDP", kvm.id, kvm.vm_type)
            return -1
        r = _tdp_mmu_check_pt(kvm, root, kvm.tdp_root[root], TDP_ROOT_LEVEL, 0, pages, &tables)
        if r:
            snprintf(buf, len, "VM %u (type %d): %s root page tables malformed (code %d)", kvm.id,
                     kvm.vm_type, "mirror" if root == TDP_ROOT_MIRROR else "direct", r)
            return -1
    if tables != kvm.tdp_mmu_pages:
        snprintf(buf, len, "VM %u (type %d): %llu page tables found, tdp_mmu_pages %llu", kvm.id,
                 kvm.vm_type, <unsigned long long>tables, <unsigned long long>kvm.tdp_mmu_pages)
        return -1
    for level in range(PG_LEVEL_4K, PG_LEVEL_1G + 1):
        if pages[level - 1] != kvm.tdp_pages[level - 1]:
            snprintf(buf, len, "VM %u (type %d): %llu leaf SPTEs at level %d, pages counter %llu",
                     kvm.id, kvm.vm_type, <unsigned long long>pages[level - 1], level, <unsigned long long>kvm.tdp_pages[level - 1])
            return -1
    return 0
