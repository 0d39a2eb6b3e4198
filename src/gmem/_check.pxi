# host.check() (DESIGN.md "Verifiable"): every structure against the others, in C, naming
# the first inconsistency in a message buffer: the allocator against the folio table, each
# guest_memfd's filemap against its folios, each VM's SPTEs against memslots, bindings,
# folios and attributes, and the platform's tables (SNP's RMP, TDX's S-EPT) against them all.

from libc.stdio cimport snprintf

ctypedef unsigned long long ull

ctypedef struct _span:
    uint64_t start
    uint64_t n
    uint64_t id                 # a folio id, or 0 for a free block
    int kind                    # 0 free block, 1 per-cpu free page, 2 folio


cdef int _span_cmp(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const _span *>a).start, y = (<const _span *>b).start
    return (x > y) - (x < y)


cdef int phys_check(const physmem *pm, char *buf, size_t len) noexcept nogil:
    """Free areas, watermark, folio table and counters agree: 0, or -1 with the reason."""
    cdef int o, r, k
    cdef uint64_t free_pages = 0, nr = 0, cap = 1024, start, f, v, end
    cdef _span *spans = <_span *>malloc(cap * sizeof(_span))
    cdef _span *grown
    cdef int rc = -1
    if spans == NULL:
        snprintf(buf, len, "check: out of memory")
        return -1
    for o in range(NR_PAGE_ORDERS):
        r = xa_check(&pm.free_area[o])
        if r < 0:
            snprintf(buf, len, "free_area[%d] xarray inconsistent (%d)", o, r)
            free(spans)
            return -1
    r = xa_check(&pm.memmap)
    if r < 0:
        snprintf(buf, len, "memmap xarray inconsistent (%d)", r)
        free(spans)
        return -1
    # every owned span of pfns: free blocks, per-cpu pages, folios
    for o in range(NR_PAGE_ORDERS + 2):
        start = 0
        while True:
            if o < NR_PAGE_ORDERS:
                if not xa_find_entry(&pm.free_area[o], start, INVALID_GFN, XA_NO_MARK, &f, &k, &v):
                    break
            elif o == NR_PAGE_ORDERS:
                if start >= pm.pcp_count:
                    break
            elif not xa_find_entry(&pm.memmap, start, INVALID_GFN, XA_NO_MARK, &f, &k, &v):
                break
            if nr == cap:
                cap *= 2
                grown = <_span *>realloc(spans, cap * sizeof(_span))
                if grown == NULL:
                    snprintf(buf, len, "check: out of memory")
                    free(spans)
                    return -1
                spans = grown
            if o < NR_PAGE_ORDERS:
                spans[nr].start, spans[nr].n, spans[nr].id, spans[nr].kind = f << o, _pages(o), 0, 0
                free_pages += _pages(o)
                start = f + 1
            elif o == NR_PAGE_ORDERS:
                spans[nr].start, spans[nr].n, spans[nr].id, spans[nr].kind = pm.pcp[start], 1, 0, 1
                free_pages += 1
                start += 1
            else:
                spans[nr].start, spans[nr].n, spans[nr].id, spans[nr].kind = f, _pages(k), v, 2
                if folio_get(pm, <uint32_t>v).pfn != f or folio_get(pm, <uint32_t>v).order != k:
                    snprintf(buf, len, "folio %llu disagrees with memmap at pfn 0x%llx", <ull>v, <ull>f)
                    free(spans)
                    return -1
                if f + _mask(k) == INVALID_GFN:
                    nr += 1
                    break
                start = f + _mask(k) + 1
            nr += 1
    qsort(spans, nr, sizeof(_span), _span_cmp)
    end = pm.start_pfn
    for f in range(nr):
        if spans[f].start < end:
            if spans[f].kind == 2:
                snprintf(buf, len, "folio %llu at pfn 0x%llx overlaps the block before it (pfn owned twice)",
                         <ull>spans[f].id, <ull>spans[f].start)
            else:
                snprintf(buf, len, "%s at pfn 0x%llx overlaps the block before it (pfn owned twice)",
                         "free block" if spans[f].kind == 0 else "per-cpu free page", <ull>spans[f].start)
            free(spans)
            return -1
        end = spans[f].start + spans[f].n
    free(spans)
    if end > pm.watermark:
        snprintf(buf, len, "a block ends at pfn 0x%llx, above the watermark 0x%llx", <ull>end, <ull>pm.watermark)
        return -1
    free_pages += pm.end_pfn - pm.watermark
    if free_pages != pm.nr_free_pages:
        snprintf(buf, len, "nr_free_pages %llu != %llu free pages found", <ull>pm.nr_free_pages, <ull>free_pages)
        return -1
    return hugetlb_check(pm, buf, len)


cdef int hugetlb_check(const physmem *pm, char *buf, size_t len) noexcept nogil:
    """The pool: a free huge page holds no folio, a page in use holds only its own (PG_hugetlb,
    inside it); the counts match the marks; no more reserved than free."""
    cdef uint64_t idx, v, nfree, first, at
    cdef int hs, order, o
    cdef folio *f
    for hs in range(HUGE_MAX_HSTATE):
        order = pm.hstates[hs].order
        idx = 0
        nfree = 0
        while xa_find(&pm.hstates[hs].pages, &idx, INVALID_GFN, XA_NO_MARK, &v):
            at = idx << order
            if xa_get_mark(&pm.hstates[hs].pages, idx, HSTATE_FREE_MARK):
                nfree += 1
                if xa_find_entry(&pm.memmap, at, at + _mask(order), XA_NO_MARK, &first, &o, &v):
                    snprintf(buf, len, "hugetlb: free huge page at pfn 0x%llx holds folio %llu", <ull>at, <ull>v)
                    return -1
            else:
                first = at
                while xa_find_entry(&pm.memmap, first, at + _mask(order), XA_NO_MARK, &first, &o, &v):
                    f = folio_get(pm, <uint32_t>v)
                    if not f.flags & PG_hugetlb or o > order:
                        snprintf(buf, len, "hugetlb: huge page at pfn 0x%llx holds folio %llu that is not "
                                 "one of its own", <ull>at, <ull>v)
                        return -1
                    first += _pages(o)
            idx += 1
        if nfree != pm.hstates[hs].free_huge_pages or pm.hstates[hs].resv_huge_pages > nfree:
            snprintf(buf, len, "hugetlb: %llu free huge pages of order %d found, counted %llu, reserved %llu",
                     <ull>nfree, order, <ull>pm.hstates[hs].free_huge_pages,
                     <ull>pm.hstates[hs].resv_huge_pages)
            return -1
    return 0


cdef int _xa_check_named(const xarray *xa, const char *name, char *buf, size_t len) noexcept nogil:
    cdef int r = xa_check(xa)
    if r < 0:
        snprintf(buf, len, "%s: xarray inconsistent (xa_check %d)", name, r)
        return -1
    return 0


cdef int inode_check(gmem_inode *i, char *buf, size_t len) noexcept nogil:
    """A guest_memfd's filemap: each entry is its folio's, inside i_size."""
    cdef uint64_t start = 0, first, v
    cdef int order, r = xa_check(&i.filemap)
    cdef folio *f
    if r < 0:
        snprintf(buf, len, "gmem inode %u filemap: xarray inconsistent (xa_check %d)", i.ino, r)
        return -1
    while start != INVALID_GFN and xa_find_entry(&i.filemap, start, INVALID_GFN, XA_NO_MARK, &first, &order, &v):
        f = folio_get(&i.host.pm, <uint32_t>v)
        if f.order != order or f.index != first or f.mapping != i.ino or pfn_folio(&i.host.pm, f.pfn) != v:
            snprintf(buf, len, "gmem inode %u index 0x%llx: folio %llu (pfn 0x%llx, order %d, mapping %u, "
                     "index 0x%llx) disagrees", i.ino, <ull>first, <ull>v, <ull>f.pfn, f.order, f.mapping,
                     <ull>f.index)
            return -1
        if (first + _pages(order)) << 12 > i.size:
            snprintf(buf, len, "gmem inode %u: folio at index 0x%llx beyond i_size", i.ino, <ull>first)
            return -1
        if (i.host.gmem_in_place_conversion and f.refcount != 1
                and not mt_range_is(&i.attributes, first, first + _mask(order), 0)):
            snprintf(buf, len, "gmem inode %u index 0x%llx: a private page still has a GUP pin or "
                     "reference (refcount %d)", i.ino, <ull>first, f.refcount)
            return -1
        start = first + _pages(order)
    return inode_attributes_check(i, buf, len)


cdef int inode_attributes_check(gmem_inode *i, char *buf, size_t len) noexcept nogil:
    """In-place conversion: the maple tree covers every index, merged; no user PTE maps a
    private page (conversion to private unmaps first, the user fault refuses private pages)."""
    cdef gmem_vma *vma = i.vmas
    cdef uint64_t start, first, v
    cdef int order
    if mt_check(&i.attributes):
        snprintf(buf, len, "gmem inode %u attributes: a range is missing or not merged", i.ino)
        return -1
    if not i.host.gmem_in_place_conversion:
        return 0
    while vma != NULL:
        start = 0
        while start != INVALID_GFN and xa_find_entry(&vma.ptes, start, INVALID_GFN, XA_NO_MARK,
                                                     &first, &order, &v):
            if mt_load(&i.attributes, first, NULL, NULL) & KVM_MEMORY_ATTRIBUTE_PRIVATE:
                snprintf(buf, len, "gmem inode %u index 0x%llx: a user mapping still maps a private "
                         "page", i.ino, <ull>first)
                return -1
            start = first + 1
        vma = vma.next
    return 0


cdef const char *_tdx_gap(kvm *kvm, const kvm_spte_info *s, kvm_memory_slot *slot) noexcept nogil:
    # a TDX shared SPTE of a gmem-only slot goes stale in the kernel too (see
    # kvm_gmem_invalidate_filter): say so, it is not a model bug
    if kvm.vm_type == KVM_X86_TDX_VM and not s.private and kvm_memslot_is_gmem_only(slot):
        return ("; known kernel gap: kvm_gmem_get_invalidate_filter() is KVM_FILTER_PRIVATE, "
                "which leaves TDX's direct root")
    return ""


cdef int spte_check(kvm *kvm, const kvm_spte_info *s, char *buf, size_t len) noexcept nogil:
    """One SPTE against memslots, folios, attributes, lpage_info and its gmem binding."""
    cdef int order = _level_order(s.level)
    cdef uint64_t gfn, idx, fv, ffirst
    cdef int forder
    cdef char where[160]
    cdef kvm_memory_slot *slot
    cdef const char *gap
    cdef folio *f
    snprintf(where, sizeof(where), "VM %u (type %d): SPTE gfn 0x%llx level %d pfn 0x%llx", kvm.id,
             kvm.vm_type, <ull>s.gfn, s.level, <ull>s.pfn)
    if s.level < PG_LEVEL_4K or s.level > PG_LEVEL_1G or s.pfn & _mask(order) or s.gfn & _mask(order):
        snprintf(buf, len, "%s: level and entry size disagree or pfn misaligned", where)
        return -1
    slot = gfn_to_memslot(kvm, s.gfn)
    if slot == NULL or gfn_to_memslot(kvm, s.gfn + _mask(order)) != slot:
        snprintf(buf, len, "%s: not inside one memslot (stale SPTE)", where)
        return -1
    gap = _tdx_gap(kvm, s, slot)
    if pfn_folio(&kvm.host.pm, s.pfn) == 0 or pfn_folio(&kvm.host.pm, s.pfn + _mask(order)) == 0:
        snprintf(buf, len, "%s: maps a freed page (stale SPTE%s)", where, gap)
        return -1
    f = folio_get(&kvm.host.pm, pfn_folio(&kvm.host.pm, s.pfn))
    if f.mapping and f.flags & PG_hwpoison:
        # (a poisoned VMM page is not checked: memory_failure does not model the mmu
        # notifier that unmapping it from the VMM would run)
        snprintf(buf, len, "%s: maps a poisoned guest_memfd page (stale SPTE: kvm_gmem_error_folio did "
                 "not zap it%s)", where, gap)
        return -1
    if kvm.has_private_mem:
        for gfn in range(s.gfn, s.gfn + _pages(order)):
            if kvm_mem_is_private(kvm, gfn) != s.private:
                snprintf(buf, len, "%s: private=%s but gfn 0x%llx attributes are 0x%llx", where,
                         "True" if s.private else "False", <ull>gfn, <ull>kvm_get_memory_attributes(kvm, gfn))
                return -1
    if s.level > PG_LEVEL_4K and lpage_info_slot(slot, s.gfn, s.level)[0]:
        snprintf(buf, len, "%s: huge mapping where lpage_info disallows it (0x%x)", where,
                 lpage_info_slot(slot, s.gfn, s.level)[0])
        return -1
    if s.private or kvm_memslot_is_gmem_only(slot):
        if slot.gmem_file == NULL:
            snprintf(buf, len, "%s: gmem SPTE in a slot without a live binding%s", where, gap)
            return -1
        idx = s.gfn - slot.base_gfn + slot.gmem_pgoff
        if not xa_lookup(&slot.gmem_file.inode.filemap, idx, &fv, &ffirst, &forder):
            snprintf(buf, len, "%s: gmem index 0x%llx has no folio (stale SPTE after a punch%s)", where,
                     <ull>idx, gap)
            return -1
        f = folio_get(&kvm.host.pm, <uint32_t>fv)
        if f.pfn + (idx - ffirst) != s.pfn:
            snprintf(buf, len, "%s: gmem index 0x%llx holds pfn 0x%llx%s", where, <ull>idx,
                     <ull>(f.pfn + idx - ffirst), gap)
            return -1
        if forder < order:
            snprintf(buf, len, "%s: a huge SPTE maps across a split (the folio at gmem index 0x%llx "
                     "is order %d)", where, <ull>idx, forder)
            return -1
    return 0


cdef int vm_check(kvm *kvm, char *buf, size_t len) noexcept nogil:
    """A VM's SPTEs (spte_check), then its hugepage mixed flags against the attributes."""
    cdef uint64_t start = 0, n, g
    cdef kvm_spte_info s
    cdef kvm_memory_slot *slot
    cdef uint32_t i
    cdef int lvl
    cdef char name[64]
    if tdp_mmu_check(kvm, buf, len):
        return -1
    snprintf(name, sizeof(name), "VM %u (type %d) memory attributes", kvm.id, kvm.vm_type)
    if _xa_check_named(&kvm.mem_attr_array, name, buf, len):
        return -1
    snprintf(name, sizeof(name), "VM %u (type %d) gfn_to_slot", kvm.id, kvm.vm_type)
    if _xa_check_named(&kvm.gfn_to_slot, name, buf, len):
        return -1
    while kvm_mmu_next_spte(kvm, &start, &s):
        if spte_check(kvm, &s, buf, len):
            return -1
    if not kvm.has_private_mem or kvm.host.gmem_in_place_conversion:
        return 0        # in place: the VM's attributes (and their mixed flags) are not used
    for i in range(kvm.nr_memslots):
        slot = &kvm.memslots[i]
        if not slot.used:
            continue
        for lvl in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
            n = _pages(_level_order(lvl))
            g = (slot.base_gfn + n - 1) & ~(n - 1)
            while g + n <= slot.base_gfn + slot.npages:
                if hugepage_test_mixed(slot, g, lvl) == hugepage_has_attrs(
                        kvm, slot, g, lvl, kvm_get_memory_attributes(kvm, g)):
                    snprintf(buf, len, "VM %u (type %d): memslot 0x%x level %d gfn 0x%llx: "
                             "KVM_LPAGE_MIXED_FLAG disagrees with the attributes", kvm.id, kvm.vm_type,
                             slot.id, lvl, <ull>g)
                    return -1
                g += n
    return 0


cdef int snp_vm_check(kvm *kvm, char *buf, size_t len) noexcept nogil:
    """Private SPTEs are backed by this guest's RMP entries at that GPA and size (INV-2)."""
    cdef uint64_t start = 0, i, pfn
    cdef kvm_spte_info s
    cdef int assigned, rmp_level
    cdef rmp_entry_info e
    cdef char entry[160]
    while kvm_mmu_next_spte(kvm, &start, &s):
        if not s.private:
            continue
        for i in range(_pages(_level_order(s.level))):
            pfn = s.pfn + i
            e = snp_rmpentry_info(kvm.host, pfn)
            snp_lookup_rmpentry(kvm.host, pfn, &assigned, &rmp_level)
            if not e.assigned or e.asid != kvm.sev.asid or e.gpa != (s.gfn + i) << 12 or rmp_level < s.level:
                rmp_entry_repr(&e, entry, sizeof(entry))
                snprintf(buf, len, "VM %u (type %d): private SPTE gfn 0x%llx level %d maps pfn 0x%llx whose "
                         "RMP entry is %s (level %d)", kvm.id, kvm.vm_type, <ull>(s.gfn + i), s.level,
                         <ull>pfn, entry, rmp_level)
                return -1
    return 0


cdef int tdx_sept_leaf_check(kvm *kvm, uint64_t gfn, uint64_t pfn, int state, int level,
                             char *buf, size_t len) noexcept nogil:
    """One S-EPT leaf: its mirror SPTE is the same leaf; a huge one (proposed, TDX huge pages
    v3) exists only as tdx_huge_page allows, is uniformly PENDING or ACCEPTED (one entry: the
    TDX module's rule that a 2M leaf's 512 pages share a state) and lies inside one folio of
    at least its order (the v3 cover letter: mapping size <= folio size)."""
    cdef uint64_t spfn, n = _pages(_level_order(level))
    cdef int slevel
    cdef bint private
    cdef folio *f
    if not kvm_mmu_spte_lookup(kvm, gfn, &spfn, &slevel, &private) or not private or \
            spfn != pfn or slevel != level:
        snprintf(buf, len, "VM %u (type %d): S-EPT leaf gfn 0x%llx level %d without its mirror SPTE",
                 kvm.id, kvm.vm_type, <ull>gfn, level)
        return -1
    if level == PG_LEVEL_4K:
        return 0
    if level > kvm.host.tdx_huge_page or state == TDX_SEPT_PREMAPPED:
        snprintf(buf, len, "VM %u (type %d): huge S-EPT leaf gfn 0x%llx level %d %s (tdx_huge_page "
                 "level %d)", kvm.id, kvm.vm_type, <ull>gfn, level, tdx_sept_state_name(state),
                 kvm.host.tdx_huge_page)
        return -1
    f = folio_get(&kvm.host.pm, pfn_folio(&kvm.host.pm, pfn)) if pfn_folio(&kvm.host.pm, pfn) else NULL
    if f == NULL or pfn_folio(&kvm.host.pm, pfn + n - 1) != pfn_folio(&kvm.host.pm, pfn) or \
            f.order < _level_order(level):
        snprintf(buf, len, "VM %u (type %d): huge S-EPT leaf gfn 0x%llx level %d pfn 0x%llx is not "
                 "inside one folio of at least its order", kvm.id, kvm.vm_type, <ull>gfn, level, <ull>pfn)
        return -1
    return 0


cdef int tdx_vm_check(kvm *kvm, char *buf, size_t len) noexcept nogil:
    """The mirror S-EPT and the private SPTEs are the same set of leaves (INV-8); premapped
    leaves are counted and exist only while the TD is built; huge leaves as
    tdx_sept_leaf_check says."""
    cdef uint64_t start = 0, gfn, pfn, spfn, first
    cdef kvm_spte_info s
    cdef int state, level
    cdef int64_t premapped = 0
    cdef char name[64]
    snprintf(name, sizeof(name), "VM %u (type %d) S-EPT", kvm.id, kvm.vm_type)
    if _xa_check_named(&kvm.tdx.sept, name, buf, len):
        return -1               # its multi-order entries after demotes, stores and erases
    while kvm_mmu_next_spte(kvm, &start, &s):
        if s.private and (tdx_sept_leaf(kvm, s.gfn, &first, &spfn, &level) == 0 or first != s.gfn or
                          spfn != s.pfn or level != s.level):
            snprintf(buf, len, "VM %u (type %d): private SPTE gfn 0x%llx level %d has no matching S-EPT "
                     "leaf", kvm.id, kvm.vm_type, <ull>s.gfn, s.level)
            return -1
    start = 0
    while tdx_sept_next(kvm, &start, &gfn, &pfn, &state, &level):
        if tdx_sept_leaf_check(kvm, gfn, pfn, state, level, buf, len):
            return -1
        premapped += state == TDX_SEPT_PREMAPPED
    if premapped != kvm.tdx.nr_premapped or (premapped and kvm.tdx.state == TD_STATE_RUNNABLE):
        snprintf(buf, len, "VM %u (type %d): nr_premapped %lld, %lld premapped leaves, TD state %d",
                 kvm.id, kvm.vm_type, <long long>kvm.tdx.nr_premapped, <long long>premapped, kvm.tdx.state)
        return -1
    return 0


cdef bint _is_vmsa(gmem_host *h, uint64_t pfn) noexcept nogil:
    cdef kvm *k = h.vms
    cdef uint64_t v
    while k != NULL:
        if xa_load(&k.sev.vmsa_pfns, pfn, &v):
            return True
        k = k.next
    return False


cdef gmem_inode *_inode_of(gmem_host *h, uint32_t ino) noexcept nogil:
    cdef gmem_inode *i = h.inodes
    while i != NULL and i.ino != ino:
        i = i.next
    return i


cdef int _asids_str(gmem_inode *inode, char *out, size_t len) noexcept nogil:
    """"[a, b]": the ASIDs of the VMs with a file on inode, sorted, as Python prints a list."""
    cdef uint32_t asids[64]
    cdef int n = 0, i, j, pos
    cdef gmem_file *f = inode.files if inode != NULL else NULL
    cdef uint32_t t
    while f != NULL and n < 64:
        for i in range(n):
            if asids[i] == f.kvm.sev.asid:
                break
        else:
            asids[n] = f.kvm.sev.asid
            n += 1
        f = f.next
    for i in range(n):
        for j in range(i + 1, n):
            if asids[j] < asids[i]:
                t = asids[i]
                asids[i] = asids[j]
                asids[j] = t
    pos = snprintf(out, len, "[")
    for i in range(n):
        pos += snprintf(out + pos, len - pos, "%s%u", ", " if i else "", asids[i])
    snprintf(out + pos, len - pos, "]")
    return n


cdef bint _inode_has_asid(gmem_inode *inode, uint32_t asid) noexcept nogil:
    cdef gmem_file *f = inode.files if inode != NULL else NULL
    while f != NULL:
        if f.kvm.sev.asid == asid:
            return True
        f = f.next
    return False


cdef int rmp_check(gmem_host *h, char *buf, size_t len) noexcept nogil:
    """Every assigned pfn belongs to a live gmem folio of a VM with that ASID, or is a VMSA,
    or was leaked; 2M entries are aligned and alone in their region (INV-3, INV-4)."""
    cdef uint64_t start = 0, first, v, f2, v2, pfn, leaked, nr_2m = 0, end
    cdef int order, k2
    cdef uint32_t id
    cdef folio *f
    cdef gmem_inode *owner
    cdef rmp_entry_info e
    cdef char entry[160]
    cdef char asids[512]
    if _xa_check_named(&h.rmp.entries, "RMP", buf, len):
        return -1
    while start != INVALID_GFN and xa_find_entry(&h.rmp.entries, start, INVALID_GFN, XA_NO_MARK, &first, &order, &v):
        start = first + 1
        e = rmp_entry_decode(v)
        if e.pagesize:
            nr_2m += 1
            if first & (PTRS_PER_PMD - 1) or e.gpa & ((PTRS_PER_PMD << 12) - 1):
                rmp_entry_repr(&e, entry, sizeof(entry))
                snprintf(buf, len, "RMP: 2M entry at pfn 0x%llx is misaligned (%s)", <ull>first, entry)
                return -1
            if xa_find_entry(&h.rmp.entries, first + 1, first + PTRS_PER_PMD - 1, XA_NO_MARK, &f2, &k2, &v2):
                snprintf(buf, len, "RMP: 2M entry at pfn 0x%llx over a 4K entry at 0x%llx (mixed 4K state)",
                         <ull>first, <ull>f2)
                return -1
        if not e.assigned:
            continue
        end = first + (PTRS_PER_PMD if e.pagesize else 1)
        for pfn in range(first, end):
            if xa_load(&h.rmp.leaked, pfn, &leaked) or _is_vmsa(h, pfn):
                continue
            e = snp_rmpentry_info(h, pfn)
            rmp_entry_repr(&e, entry, sizeof(entry))
            id = pfn_folio(&h.pm, pfn)
            if id == 0:
                snprintf(buf, len, "RMP: freed pfn 0x%llx is still assigned (%s)", <ull>pfn, entry)
                return -1
            f = folio_get(&h.pm, id)
            owner = _inode_of(h, f.mapping) if f.mapping else NULL
            if owner == NULL or not _inode_has_asid(owner, e.asid):
                _asids_str(owner, asids, sizeof(asids))
                if owner != NULL:
                    snprintf(buf, len, "RMP: pfn 0x%llx is assigned to ASID %u but belongs to gmem inode %u "
                             "(VM ASIDs %s)", <ull>pfn, e.asid, f.mapping, asids)
                else:
                    snprintf(buf, len, "RMP: pfn 0x%llx is assigned to ASID %u but belongs to no guest_memfd "
                             "(VM ASIDs [])", <ull>pfn, e.asid)
                return -1
            if not f.flags & PG_uptodate:
                snprintf(buf, len, "RMP: pfn 0x%llx (gmem inode %u, index 0x%llx) is assigned (%s) but its "
                         "folio was never prepared: the next prepare zeroes a guest-owned page (INV-4, INV-5)",
                         <ull>pfn, f.mapping, <ull>(f.index + pfn - f.pfn), entry)
                return -1
    if nr_2m != h.rmp.nr_2m:
        snprintf(buf, len, "RMP: %llu 2M entries, but nr_2m is %llu", <ull>nr_2m, <ull>h.rmp.nr_2m)
        return -1
    return 0


cdef int gmem_rmp_check(gmem_host *h, char *buf, size_t len) noexcept nogil:
    """From the guest_memfd side (INV-2, INV-4): a prepared page of an SNP guest_memfd is
    RMP-assigned, and an assigned page bound in a memslot of the VM with its ASID is assigned
    at the GPA the memslot gives it."""
    cdef gmem_inode *inode = h.inodes
    cdef gmem_file *gf
    cdef uint64_t start, first, v, k, idx, pfn, sv, gfn
    cdef int order
    cdef folio *f
    cdef kvm_memory_slot *slot
    cdef rmp_entry_info e
    while inode != NULL:
        gf = inode.files
        while gf != NULL:
            start = 0
            while start != INVALID_GFN and xa_find_entry(&inode.filemap, start, INVALID_GFN, XA_NO_MARK,
                                                         &first, &order, &v):
                start = first + _pages(order)
                f = folio_get(&h.pm, <uint32_t>v)
                if not f.flags & PG_uptodate:
                    continue
                for k in range(_pages(order)):
                    idx, pfn = first + k, f.pfn + k
                    e = snp_rmpentry_info(h, pfn)
                    if e.assigned and h.gmem_in_place_conversion and not f.flags & PG_leaked and not (
                            mt_load(&inode.attributes, idx, NULL, NULL) & KVM_MEMORY_ATTRIBUTE_PRIVATE):
                        snprintf(buf, len, "gmem inode %u index 0x%llx (pfn 0x%llx) is shared but still "
                                 "RMP-assigned: the conversion's make_shared did not run", inode.ino,
                                 <ull>idx, <ull>pfn)
                        return -1
                    if not e.assigned:
                        # only where gmem tracks "prepared" (6.18: uptodate skips the prepare);
                        # from 7.0 uptodate means zeroed and the next kvm_gmem_get_pfn prepares
                        # again (a merged huge folio's never-used pieces are zeroed, not prepared)
                        if (inode.vm_type == KVM_X86_SNP_VM and not f.flags & PG_leaked
                                and h.prepared_tracking == GMEM_TRACK_GMEM):
                            snprintf(buf, len, "gmem inode %u index 0x%llx (pfn 0x%llx) is prepared for an SNP "
                                     "guest but not RMP-assigned: the prepare hook did not make it private "
                                     "(INV-4)", inode.ino, <ull>idx, <ull>pfn)
                            return -1
                        continue
                    if e.asid != gf.kvm.sev.asid or not xa_load(&gf.bindings, idx, &sv):
                        continue
                    slot = &gf.kvm.memslots[sv]
                    gfn = slot.base_gfn + idx - slot.gmem_pgoff
                    if e.gpa != gfn << 12:
                        snprintf(buf, len, "RMP: pfn 0x%llx (gmem inode %u, index 0x%llx) is bound at gfn 0x%llx "
                                 "of VM %u (ASID %u) but assigned at gpa 0x%llx (INV-2: wrong GPA)", <ull>pfn,
                                 inode.ino, <ull>idx, <ull>gfn, gf.kvm.id, gf.kvm.sev.asid, <ull>e.gpa)
                        return -1
            gf = gf.next
        inode = inode.next
    return 0


cdef int gmem_host_check(gmem_host *h, char *buf, size_t len) noexcept nogil:
    cdef kvm *k
    cdef gmem_inode *inode
    cdef uint64_t resv[2]
    cdef int hs
    resv[0] = resv[1] = 0
    buf[0] = 0
    if phys_check(&h.pm, buf, len) or _xa_check_named(&h.page_data, "page contents", buf, len):
        return -1
    inode = h.inodes
    while inode != NULL:
        if inode_check(inode, buf, len):
            return -1
        resv[inode.hstate] += inode.hugetlb_resv if inode.hstate >= 0 else 0
        inode = inode.next
    for hs in range(HUGE_MAX_HSTATE):
        if resv[hs] != h.pm.hstates[hs].resv_huge_pages:
            snprintf(buf, len, "hugetlb: the files hold %llu reservations of order %d, the pool counts %llu",
                     <ull>resv[hs], h.pm.hstates[hs].order, <ull>h.pm.hstates[hs].resv_huge_pages)
            return -1
    k = h.vms
    while k != NULL:
        if vm_check(k, buf, len):
            return -1
        if k.vm_type == KVM_X86_SNP_VM and snp_vm_check(k, buf, len):
            return -1
        if k.vm_type == KVM_X86_TDX_VM and tdx_vm_check(k, buf, len):
            return -1
        k = k.next
    if h.rmp.enabled and (rmp_check(h, buf, len) or gmem_rmp_check(h, buf, len)):
        return -1
    return 0
