# mm/hugetlb.c, the parts a hugetlb-backed guest_memfd uses (proposed upstream: Ackerley Tng's
# "1G page support for guest_memfd" RFC v2 and its restructuring WIP tree): a pool of 2M and
# 1G pages taken from the buddy allocator at boot (hugepages=), reservations a file takes at
# create (its subpool), and restructuring: a huge folio split into smaller folios stays one
# huge page of the pool, which goes back only when every page of it is freed (or after the
# folios are merged back, hugetlb_restructuring's merge).

cdef enum:
    HSTATE_FREE_MARK = 0


cdef inline int hstate_order(int hs) noexcept nogil:
    return 18 if hs == HSTATE_1G else 9


cdef void hugetlb_init(physmem *pm) noexcept nogil:
    cdef int hs
    for hs in range(HUGE_MAX_HSTATE):
        pm.hstates[hs].order = hstate_order(hs)
        xa_init(&pm.hstates[hs].pages)


cdef void hugetlb_destroy(physmem *pm) noexcept nogil:
    cdef int hs
    for hs in range(HUGE_MAX_HSTATE):
        xa_destroy(&pm.hstates[hs].pages)


cdef int hugetlb_pool_grow(physmem *pm, int hs, uint64_t n) noexcept nogil:
    """hugetlb_hstate_alloc_pages: n pages of the size from the buddy allocator, or -ENOMEM
    (the pool keeps those it got)."""
    cdef hstate *h = &pm.hstates[hs]
    cdef uint64_t pfn, old, i
    for i in range(n):
        if phys_alloc(pm, h.order, &pfn) < 0:
            return -ENOMEM
        if xa_store_order(&h.pages, pfn >> h.order, 0, 1, &old) < 0:
            phys_free(pm, pfn, h.order)
            return -ENOMEM
        xa_set_mark(&h.pages, pfn >> h.order, HSTATE_FREE_MARK)
        h.nr_huge_pages += 1
        h.free_huge_pages += 1
    return 0


cdef int hugetlb_reserve_pages(physmem *pm, int hs, uint64_t n) noexcept nogil:
    """hugetlb_acct_memory: promise n free pages to a file, or -ENOMEM."""
    cdef hstate *h = &pm.hstates[hs]
    if h.free_huge_pages - h.resv_huge_pages < n:
        return -ENOMEM
    h.resv_huge_pages += n
    return 0


cdef int hugetlb_folio_alloc(physmem *pm, int hs, bint reserved, uint32_t *id) noexcept nogil:
    """alloc_hugetlb_folio: the lowest free page of the pool as one folio (a reserved one,
    or one nobody was promised): 0 and *id, or -ENOMEM."""
    cdef hstate *h = &pm.hstates[hs]
    cdef uint64_t idx = 0, v
    if not reserved and h.free_huge_pages <= h.resv_huge_pages:
        return -ENOMEM
    if not xa_find(&h.pages, &idx, <uint64_t>0xFFFFFFFFFFFFFFFF, HSTATE_FREE_MARK, &v):
        return -ENOMEM
    if _folio_install(pm, idx << h.order, h.order, id) < 0:
        return -ENOMEM
    xa_clear_mark(&h.pages, idx, HSTATE_FREE_MARK)
    h.free_huge_pages -= 1
    if reserved:
        h.resv_huge_pages -= 1
    folio_get(pm, id[0]).flags = PG_hugetlb
    return 0


cdef int hugetlb_pfn_hstate(const physmem *pm, uint64_t pfn) noexcept nogil:
    """The pool size pfn belongs to, or -1."""
    cdef int hs
    cdef uint64_t v
    for hs in range(HUGE_MAX_HSTATE):
        if pm.hstates[hs].nr_huge_pages and xa_load(&pm.hstates[hs].pages, pfn >> hstate_order(hs), &v):
            return hs
    return -1


cdef int hugetlb_free_pages(physmem *pm, uint64_t pfn) noexcept nogil:
    """A folio of a pool page was freed: the page goes back to the pool once no folio is left
    in it (free_huge_folio after the restructuring's merge). 1 if it went back, else 0."""
    cdef int hs = hugetlb_pfn_hstate(pm, pfn), order, o
    cdef uint64_t head, first, v
    if hs < 0:
        return 0
    order = hstate_order(hs)
    head = pfn & ~(_pages(order) - 1)
    if xa_find_entry(&pm.memmap, head, head + (_pages(order) - 1), XA_NO_MARK, &first, &o, &v):
        return 0                    # other folios of the page are still in use
    xa_set_mark(&pm.hstates[hs].pages, head >> order, HSTATE_FREE_MARK)
    pm.hstates[hs].free_huge_pages += 1
    return 1


cdef uint64_t hugetlb_stranded_pages(const physmem *pm) noexcept nogil:
    """4K pages of pool pages in use that no folio holds: freed, but not returnable until the
    rest of their huge page is (the "bytes that could not be returned" of a split)."""
    cdef uint64_t idx, v, n = 0, head, first, used
    cdef int hs, order, o
    for hs in range(HUGE_MAX_HSTATE):
        order = hstate_order(hs)
        idx = 0
        while xa_find(&pm.hstates[hs].pages, &idx, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &v):
            if not xa_get_mark(&pm.hstates[hs].pages, idx, HSTATE_FREE_MARK):
                head = idx << order
                used = 0
                first = head
                while xa_find_entry(&pm.memmap, first, head + (_pages(order) - 1), XA_NO_MARK, &first, &o, &v):
                    used += _pages(o)
                    first += _pages(o)
                n += _pages(order) - used
            idx += 1
    return n


cdef int folio_merge(physmem *pm, uint32_t id, int order) noexcept nogil:
    """Restructure the folios covering [head.pfn, + 1 << order) into one folio of order (the
    WIP tree's hugetlb_restructuring merge; for THP a merge without freeing, which mm lacks).
    The caller checked that every page is in a folio of the same mapping at consecutive
    indices with only the page cache's reference. The head keeps id; 0 or -ENOMEM."""
    cdef folio *head = folio_get(pm, id)
    cdef uint64_t pfn = head.pfn, idx = head.pfn, first, v, old, n = 0, k
    cdef int o
    cdef uint8_t flags = head.flags
    cdef uint32_t *ids = <uint32_t *>malloc(_pages(order) * sizeof(uint32_t))
    if ids == NULL:
        return -ENOMEM
    while xa_find_entry(&pm.memmap, idx, pfn + (_pages(order) - 1), XA_NO_MARK, &first, &o, &v):
        if <uint32_t>v != id:
            ids[n] = <uint32_t>v
            n += 1
            flags &= folio_get(pm, <uint32_t>v).flags | ~PG_uptodate    # uptodate only if all are
        idx = first + _pages(o)
    if xa_store_order(&pm.memmap, pfn, order, id, &old) < 0:
        free(ids)
        return -ENOMEM
    for k in range(n):
        _folio_release_id(pm, ids[k])
    free(ids)
    pm.nr_folios -= n
    head = folio_get(pm, id)
    head.order = order
    head.flags = flags
    return 0
