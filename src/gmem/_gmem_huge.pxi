# guest_memfd's huge folios (proposed upstream, in no kernel): 2M folios from the buddy
# allocator (THP-like: the RFC's KVM_GUEST_MEMFD_ALLOW_HUGEPAGE, huge_folios) or 2M/1G folios
# from the hugetlb pool (GUEST_MEMFD_FLAG_HUGETLB, RFC v2 / the restructuring WIP tree), and
# the restructuring policies the proposals argue about (Host(huge_split=, huge_merge=)):
#   huge_split  "never"       the folio stays whole; the arch tracks 4K state (RFC 2023)
#               "convert"     a conversion to shared restructures the huge folio to order 0
#                             (kvm_gmem_convert -> kvm_gmem_restructure in the WIP tree)
#               "convert-2m"  ... a 1G folio to 2M first, only the 2M parts touched to 0
#               "fresh"       "convert", and a new huge folio goes to order 0 at once unless its
#                             whole range is private (__maybe_split_fresh_folio)
#   huge_merge  "eager"       back to the huge order at the conversion that makes the whole
#                             range private, when every page is there with a safe refcount
#                             (kvm_gmem_has_safe_refcount: only the page cache's)
#               "lazy"        the same check at the next kvm_gmem_get_pfn in the range
#               "never"       split stays split until the pages are freed
# A split never leaves a huge SPTE over the folios it made (kvm_unmap_huge_leafs).


cdef int kvm_gmem_huge_setup(gmem_inode *inode, uint64_t flags, int page_order) noexcept nogil:
    """The folio size of a new inode: guestmem_hugetlb_setup's checks and the subpool's
    reservation of the whole file (RFC v2: exhaustion is -ENOMEM at create, not at fault)."""
    cdef gmem_host *h = inode.host
    cdef int log2 = <int>((flags >> GUESTMEM_HUGETLB_FLAG_SHIFT) & GUESTMEM_HUGETLB_FLAG_MASK), hs
    cdef uint64_t n
    inode.hstate = -1
    if not (flags & GUEST_MEMFD_FLAG_HUGETLB or h.gmem_backing == GMEM_BACKING_HUGETLB):
        if log2 or page_order:
            return _refuse(h, -EINVAL, "a huge page size needs GUEST_MEMFD_FLAG_HUGETLB")
        inode.page_order = HPAGE_ORDER if h.huge_folios or inode.allow_hugepage else 0
        return 0
    if log2 and page_order:
        return _refuse(h, -EINVAL, "the page size is given twice (flags bits 58..63 and page_order)")
    if flags & GUEST_MEMFD_FLAG_INIT_SHARED:
        return _refuse(h, -EINVAL, "GUEST_MEMFD_FLAG_HUGETLB with INIT_SHARED (the WIP tree refuses it)")
    if log2:
        page_order = log2 - 12
    elif page_order == 0:           # the default hstate: the largest size the pool has
        page_order = 18 if h.pm.hstates[HSTATE_1G].nr_huge_pages else HPAGE_ORDER
    if page_order == 18:
        hs = HSTATE_1G
    elif page_order == HPAGE_ORDER:
        hs = HSTATE_2M
    else:
        return _refuse(h, -EINVAL, "no hugetlb page size of that order (2M and 1G only)")
    if inode.size & ((<uint64_t>4096 << page_order) - 1):
        return _refuse(h, -EINVAL, "size is not a multiple of the huge page size")
    n = inode.size >> (12 + page_order)
    if hugetlb_reserve_pages(&h.pm, hs, n) < 0:
        return _refuse(h, -ENOMEM, "the hugetlb pool cannot reserve the file's pages (subpool)")
    inode.page_order = page_order
    inode.hstate = hs
    inode.hugetlb_resv = n
    return 0


cdef void kvm_gmem_huge_release(gmem_inode *inode) noexcept nogil:
    """Evict: the file's remaining reservation goes back to the pool."""
    if inode.hstate >= 0:
        inode.host.pm.hstates[inode.hstate].resv_huge_pages -= inode.hugetlb_resv
        inode.hugetlb_resv = 0


cdef inline int kvm_gmem_alloc_huge(gmem_inode *inode, uint64_t index, uint32_t *id) noexcept nogil:
    """A folio for index, huge where the inode allows: from the pool (its reservation first),
    or 2M from the buddy allocator when the aligned range is empty and inside i_size (the
    2023 kvm_gmem_get_huge_folio), else 4K. 0 with *id, or -ENOMEM."""
    if inode.page_order == 0:
        return kvm_gmem_alloc_folio(inode, index, 0, id)
    return _kvm_gmem_alloc_huge(inode, index, id)


cdef int _kvm_gmem_alloc_huge(gmem_inode *inode, uint64_t index, uint32_t *id) noexcept nogil:
    cdef uint64_t base = index & ~_mask(inode.page_order), first, v
    cdef int k
    if inode.hstate >= 0:
        if hugetlb_folio_alloc(&inode.host.pm, inode.hstate, inode.hugetlb_resv > 0, id) < 0:
            return -ENOMEM
        if inode.hugetlb_resv:
            inode.hugetlb_resv -= 1
        return 0
    if (base + _pages(inode.page_order) <= inode.size >> 12 and not xa_find_entry(
            &inode.filemap, base, base + _mask(inode.page_order), XA_NO_MARK, &first, &k, &v)):
        if kvm_gmem_alloc_folio(inode, index, inode.page_order, id) == 0:
            return 0
    return kvm_gmem_alloc_folio(inode, index, 0, id)


cdef void kvm_gmem_free_huge(gmem_inode *inode, bint returned) noexcept nogil:
    """A pool page came back whole while its file lives: the subpool keeps it reserved."""
    if returned and inode.hstate >= 0:
        inode.hugetlb_resv += 1
        inode.host.pm.hstates[inode.hstate].resv_huge_pages += 1


# ------------------------------------------------------------ who is private

cdef bint kvm_gmem_range_private(gmem_inode *inode, uint64_t first, uint64_t nr) noexcept nogil:
    """kvm_gmem_range_has_attributes(PRIVATE): the inode's attributes with in-place conversion;
    else the VM attributes of every binding, which must cover the range in one slot."""
    cdef gmem_file *f = inode.files
    cdef uint64_t v, gfn
    cdef kvm_memory_slot *slot
    cdef bint bound = False
    if inode.host.gmem_in_place_conversion:
        return mt_range_is(&inode.attributes, first, first + nr - 1, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    while f != NULL:
        if xa_load(&f.bindings, first, &v):
            slot = &f.kvm.memslots[v]
            if first + nr > slot.gmem_pgoff + slot.npages:
                return False
            gfn = slot.base_gfn + first - slot.gmem_pgoff
            if not kvm_range_has_memory_attributes(f.kvm, gfn, gfn + nr, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                                   KVM_MEMORY_ATTRIBUTE_PRIVATE):
                return False
            bound = True
        f = f.next
    return bound


# ------------------------------------------------------------------ split

ctypedef void (*gfn_range_fn)(kvm *kvm, uint64_t start, uint64_t end, int arg) noexcept nogil


cdef void kvm_gmem_for_each_binding(gmem_inode *inode, uint64_t start, uint64_t end, gfn_range_fn fn,
                                    int arg) noexcept nogil:
    """fn(kvm, gfn range, arg) for the part of [start, end) each binding of each file on the
    inode covers (the walk kvm_gmem_invalidate_begin makes)."""
    cdef gmem_file *f = inode.files
    cdef uint64_t index, v, lo, hi, s
    cdef int order
    cdef kvm_memory_slot *slot
    while f != NULL:
        index = start
        while index < end and xa_find_entry(&f.bindings, index, end - 1, XA_NO_MARK, &s, &order, &v):
            slot = &f.kvm.memslots[v]
            lo = start if start > slot.gmem_pgoff else slot.gmem_pgoff
            hi = end if end < slot.gmem_pgoff + slot.npages else slot.gmem_pgoff + slot.npages
            fn(f.kvm, slot.base_gfn + lo - slot.gmem_pgoff, slot.base_gfn + hi - slot.gmem_pgoff, arg)
            index = slot.gmem_pgoff + slot.npages
        f = f.next


cdef void _split_private_leafs(kvm *kvm, uint64_t start, uint64_t end, int arg) noexcept nogil:
    kvm_split_private_leafs(kvm, start, end)


cdef void _unmap_huge_leafs(kvm *kvm, uint64_t start, uint64_t end, int order) noexcept nogil:
    kvm_unmap_huge_leafs(kvm, start, end, order)


cdef void kvm_gmem_split_private_leafs(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """A punch: the huge private leaves crossing its edges split first in every binding
    (proposed: TDX huge pages v3 16/24), so that its zap is precise."""
    kvm_gmem_for_each_binding(inode, start, end, _split_private_leafs, 0)


cdef int kvm_gmem_split_to(gmem_inode *inode, uint64_t first, uint32_t id, int new_order) noexcept nogil:
    """Restructure a huge folio into folios of new_order (split_folio_to_order): -EAGAIN while
    anything but the page cache holds it (can_split_folio), else 0 or -ENOMEM."""
    cdef int r, old_order
    cdef uint64_t k, old
    cdef folio *f = folio_get(&inode.host.pm, id)
    cdef int had_private
    if f.refcount != 1:
        return -EAGAIN
    old_order = f.order
    r = xa_split(&inode.filemap, first, new_order)
    if r < 0:
        return r
    r = folio_split(&inode.host.pm, id, new_order)
    if r < 0:
        xa_store_order(&inode.filemap, first, old_order, id, &old)     # one entry again
        return r
    # no SPTE larger than the new folios may map any of it (kvm_split_cross_boundary_leafs then
    # the zap, in the WIP tree)
    kvm_gmem_for_each_binding(inode, first, first + _pages(old_order), _unmap_huge_leafs, new_order)
    f = folio_get(&inode.host.pm, id)
    had_private = f.flags & PG_private
    k = 0
    while k < _pages(old_order):
        xa_store_order(&inode.filemap, first + k, new_order, pfn_folio(&inode.host.pm, f.pfn + k), &old)
        if had_private and inode.host.reattach_private:
            # the scan the RFC cover letter suggests: every tail gets the head's private data back
            folio_get(&inode.host.pm, pfn_folio(&inode.host.pm, f.pfn + k)).flags |= PG_private
        k += _pages(new_order)
    inode.host.stats[HOST_STAT_FOLIO_SPLITS] += 1
    gmem_trace(inode.host, TRACE_FOLIO_SPLIT, TRACE_NO_VCPU, f.pfn, old_order, new_order, 0)
    return 0


cdef int kvm_gmem_split_for_shared(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """To shared: every huge folio overlapping [start, end) goes to order 0 ("convert-2m": a 1G
    folio to 2M, then the 2M folios overlapping to 0). 0, or -EAGAIN at the first folio a
    reference holds whole (HOST_STAT_HUGE_EAGAIN), or -ENOMEM."""
    cdef uint64_t index = start, first, v
    cdef int order, r, target
    if inode.host.huge_split == GMEM_HUGE_SPLIT_NEVER:
        return 0
    while index < end and xa_find_entry(&inode.filemap, index, end - 1, XA_NO_MARK, &first, &order, &v):
        if order == 0 or (inode.host.gmem_in_place_conversion and
                          mt_range_is(&inode.attributes, first, first + _mask(order), 0)):
            # (a huge folio already all shared, as a host fault under "convert" makes one in
            # a shared range: the conversion changes none of its pages, so it stays whole,
            # and a pin on it is no reason for EAGAIN)
            index = first + _pages(order)
            continue
        target = HPAGE_ORDER if (order > HPAGE_ORDER and
                                 inode.host.huge_split == GMEM_HUGE_SPLIT_CONVERT_2M) else 0
        r = kvm_gmem_split_to(inode, first, <uint32_t>v, target)
        if r < 0:
            if r == -EAGAIN:
                inode.host.stats[HOST_STAT_HUGE_EAGAIN] += 1
            return r
        index = first if first > start else start       # look again at what the split made
    return 0


# ------------------------------------------------------------------ merge

cdef int kvm_gmem_mergeable(gmem_inode *inode, uint64_t base, int order, uint32_t *head,
                            bint *mixed) noexcept nogil:
    """1 (with the head's id) if [base, + 1 << order) is in several folios, all there, over
    consecutive pfns from an aligned one, each with only the page cache's reference and no
    user mapping; 0 if not; -EAGAIN if only a reference stands in the way. *mixed: some
    pieces are uptodate and some not."""
    cdef uint64_t index = base, first, v, pfn0 = 0
    cdef int o, n = 0, uptodate = 0
    cdef bint referenced = False
    cdef folio *f
    while index < base + _pages(order):
        if not xa_lookup(&inode.filemap, index, &v, &first, &o) or o >= order:
            return 0
        f = folio_get(&inode.host.pm, <uint32_t>v)
        if n == 0:
            pfn0 = f.pfn
            head[0] = <uint32_t>v
            if pfn0 & _mask(order):
                return 0
        if f.pfn != pfn0 + (first - base) or f.flags & (PG_hwpoison | PG_leaked):
            return 0
        if f.refcount != 1 or kvm_gmem_folio_mapped(inode, first, _pages(o)):
            referenced = True
        uptodate += (f.flags & PG_uptodate) != 0
        n += 1
        index = first + _pages(o)
    mixed[0] = 0 < uptodate < n
    if mixed[0] and inode.host.prepared_tracking == GMEM_TRACK_GMEM:
        # "prepared" is per folio (6.18): one over pieces prepared and not would skip an arch
        # prepare or zero pages the guest owns; it stays split
        return 0
    return -EAGAIN if referenced else 1


cdef int kvm_gmem_merge_at(gmem_inode *inode, uint64_t index, int order) noexcept nogil:
    """kvm_gmem_restructure to private: the huge range around index back to one folio of
    order if every page of it is private and mergeable. 1 if merged, else 0."""
    cdef uint64_t base = index & ~_mask(order)
    cdef uint32_t head
    cdef bint mixed
    cdef int r
    if base + _pages(order) > inode.size >> 12:
        return 0
    if not kvm_gmem_range_private(inode, base, _pages(order)):
        return 0                            # (first: it is the cheap test, a walk of ranges)
    r = kvm_gmem_mergeable(inode, base, order, &head, &mixed)
    if r == 0:
        return 0
    if r < 0:
        inode.host.stats[HOST_STAT_HUGE_EAGAIN] += 1
        return 0
    return kvm_gmem_merge_unchecked(inode, base, order, head, mixed)


cdef void kvm_gmem_zero_stale_pieces(gmem_inode *inode, uint32_t head, int order) noexcept nogil:
    """Some pieces were used, some never: those are zeroed now, as their first use would have,
    so the merged folio is uptodate (zeroed) as a whole and no later prepare zeroes pages the
    guest already has (7.2+: uptodate means zeroed; the arch tracks what it prepared)."""
    cdef uint64_t pfn = folio_get(&inode.host.pm, head).pfn, k = 0
    cdef folio *f
    while k < _pages(order):
        f = folio_get(&inode.host.pm, pfn_folio(&inode.host.pm, pfn + k))
        if not f.flags & PG_uptodate:
            host_clear_pages(inode.host, f.pfn, _pages(f.order))
            f.flags |= PG_uptodate
        k += _pages(f.order)


cdef void kvm_gmem_refill_filemap(gmem_inode *inode, uint64_t base, int order) noexcept nogil:
    """Undo a filemap store over [base, + 1 << order): each folio at its own entry again."""
    cdef uint64_t k = 0, pfn, old
    cdef uint32_t id
    cdef folio *f
    xa_load(&inode.filemap, base, &old)
    pfn = folio_get(&inode.host.pm, <uint32_t>old).pfn
    while k < _pages(order):
        id = pfn_folio(&inode.host.pm, pfn + k)
        f = folio_get(&inode.host.pm, id)
        xa_store_order(&inode.filemap, base + k, f.order, id, &old)
        k += _pages(f.order)


cdef void kvm_gmem_merge_private(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """To private, eager: each huge range [start, end) touches, merged where it can be
    ("convert-2m": the 2M ranges first, then the 1G)."""
    cdef uint64_t index
    cdef int order = inode.page_order
    if order == 0 or inode.host.huge_merge != GMEM_HUGE_MERGE_EAGER:
        return
    index = start & ~_mask(order)
    while index < end:
        kvm_gmem_merge_around(inode, index)
        index += _pages(order)


cdef void kvm_gmem_merge_around(gmem_inode *inode, uint64_t index) noexcept nogil:
    cdef uint64_t k
    if inode.page_order > HPAGE_ORDER and inode.host.huge_split == GMEM_HUGE_SPLIT_CONVERT_2M:
        k = 0
        while k < _pages(inode.page_order):
            kvm_gmem_merge_at(inode, (index & ~_mask(inode.page_order)) + k, HPAGE_ORDER)
            k += _pages(HPAGE_ORDER)
    kvm_gmem_merge_at(inode, index, inode.page_order)


cdef uint32_t kvm_gmem_merge_lazy(gmem_inode *inode, xa_state *xas, uint64_t index, uint32_t id) noexcept nogil:
    """huge_merge="lazy": a fault into a split range merges it if it can; the folio at index."""
    cdef uint64_t v
    kvm_gmem_merge_around(inode, index)
    xas_set_xa(xas, &inode.filemap, index)
    if xas_load(xas, &v):
        return <uint32_t>v
    return id


# ------------------------------------------------------------ hole punch

cdef int kvm_gmem_punch_check(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """Before a punch changes anything: a huge folio it must split or free, still referenced,
    is -EAGAIN (the WIP tree's merge_truncate_range(require_merge=true); THP: split_folio
    fails). A hugetlb file punches whole huge pages, merged back first, so every folio of the
    range counts; otherwise only huge folios sticking out of the range."""
    cdef uint64_t index = start, first, v
    cdef int order
    cdef folio *f
    if inode.page_order == 0:
        return 0
    while index < end and xa_find_entry(&inode.filemap, index, end - 1, XA_NO_MARK, &first, &order, &v):
        f = folio_get(&inode.host.pm, <uint32_t>v)
        if f.refcount != 1 and (inode.hstate >= 0 or (order and (first < start or first + _pages(order) > end))):
            inode.host.stats[HOST_STAT_HUGE_EAGAIN] += 1
            return _refuse(inode.host, -EAGAIN, "a page of a huge folio the punch must split or merge "
                           "is still referenced (a GUP pin or reference)")
        index = first + _pages(order)
    return 0


cdef void kvm_gmem_merge_for_truncate(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """A hugetlb file gives whole pages back: the split ones are merged first, so the arch's
    invalidate sees each huge range once (one 2M RMPUPDATE, not a PSMASH and 512)."""
    cdef uint64_t index = start
    cdef uint32_t head
    cdef bint mixed
    if inode.hstate < 0:
        return
    if end > inode.size >> 12:
        end = inode.size >> 12
    while index < end:
        if kvm_gmem_mergeable(inode, index, inode.page_order, &head, &mixed) == 1:
            kvm_gmem_merge_unchecked(inode, index, inode.page_order, head, False)   # freed next
        index += _pages(inode.page_order)


cdef int kvm_gmem_merge_unchecked(gmem_inode *inode, uint64_t base, int order, uint32_t head,
                                  bint zero_stale) noexcept nogil:
    """The merge itself (kvm_gmem_mergeable said yes): filemap, then the folios. 1, or 0 if
    out of memory (nothing changed)."""
    cdef uint64_t old
    if xa_store_order(&inode.filemap, base, order, head, &old) < 0:
        return 0
    if zero_stale:
        kvm_gmem_zero_stale_pieces(inode, head, order)
    if folio_merge(&inode.host.pm, head, order) < 0:
        kvm_gmem_refill_filemap(inode, base, order)
        return 0
    folio_get(&inode.host.pm, head).index = base
    inode.host.stats[HOST_STAT_FOLIO_MERGES] += 1
    gmem_trace(inode.host, TRACE_FOLIO_MERGE, TRACE_NO_VCPU, folio_get(&inode.host.pm, head).pfn, order, 0, 0)
    return 1


cdef uint64_t gmem_hugetlb_stranded_bytes(const gmem_host *h) noexcept nogil:
    return hugetlb_stranded_pages(&h.pm) << 12


cdef bint kvm_gmem_next_folio(gmem_inode *inode, uint64_t *start, uint64_t *index, int *order,
                              uint64_t *pfn) noexcept nogil:
    """The first folio at or after *start (its index, order, pfn), *start moved past it."""
    cdef uint64_t v
    if not xa_find_entry(&inode.filemap, start[0], <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, index, order, &v):
        return False
    pfn[0] = folio_get(&inode.host.pm, <uint32_t>v).pfn
    start[0] = index[0] + _pages(order[0])
    return True
