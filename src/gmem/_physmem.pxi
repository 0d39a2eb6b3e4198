# mm/page_alloc.c (the buddy allocator) and the folio table (struct folio).
#
# free_area[order] is an xarray of the free blocks of that order, indexed by
# pfn >> order, each marked XA_MARK_0 so that "any free block" is a bitmap
# search.  Pfns from the watermark to end_pfn have never been allocated: they
# are free without being described, and freeing back down to the watermark
# lowers it again, so the allocator's memory follows what is in use.

from libc.stdlib cimport malloc, realloc, qsort
from libc.string cimport memmove

cdef enum:
    _FREE_MARK = 0


cdef inline uint64_t _pages(int order) noexcept nogil:
    return (<uint64_t>1) << order


cdef int phys_init(physmem *pm, uint64_t start_pfn, uint64_t nr_pages) noexcept nogil:
    cdef int o
    memset(pm, 0, sizeof(physmem))
    pm.start_pfn = start_pfn
    pm.end_pfn = start_pfn + nr_pages
    pm.watermark = start_pfn
    pm.nr_free_pages = nr_pages
    pm.nr_nodes = 1
    pm.node_end[0] = pm.end_pfn
    for o in range(NR_PAGE_ORDERS):
        xa_init(&pm.free_area[o])
    xa_init(&pm.memmap)
    xas_init(&pm.memmap_xas, &pm.memmap, 0)
    pm.folio_next_id = 1
    return 0


cdef int phys_set_nodes(physmem *pm, uint32_t n) noexcept nogil:
    """Split the (untouched) memory into n NUMA nodes of equal 2M-aligned size, the last
    taking the rest: 0, or -EINVAL if n is out of range or a node would be empty."""
    cdef uint64_t per
    cdef uint32_t i
    if n == 0 or n > GMEM_MAX_NUMNODES:
        return -EINVAL
    per = ((pm.end_pfn - pm.start_pfn) // n) & ~(<uint64_t>511)
    if per == 0 or pm.watermark != pm.start_pfn:
        return -EINVAL
    for i in range(n):
        pm.node_end[i] = pm.start_pfn + per * (i + 1) if i + 1 < n else pm.end_pfn
    pm.nr_nodes = n
    return 0


cdef int phys_pfn_to_nid(const physmem *pm, uint64_t pfn) noexcept nogil:
    """pfn_to_nid: the node holding pfn."""
    cdef int i = 0
    while i + 1 < <int>pm.nr_nodes and pfn >= pm.node_end[i]:
        i += 1
    return i


cdef inline uint64_t _node_end_of(const physmem *pm, uint64_t pfn) noexcept nogil:
    return pm.node_end[phys_pfn_to_nid(pm, pfn)]


cdef void phys_destroy(physmem *pm) noexcept nogil:
    cdef int o
    cdef uint32_t c
    for o in range(NR_PAGE_ORDERS):
        xa_destroy(&pm.free_area[o])
    xa_destroy(&pm.memmap)
    for c in range(pm.nr_chunks):
        gmem_kmem_cache_free(GMEM_KMEM_FOLIOS, pm.folio_chunks[c])
    free(pm.folio_chunks)
    pm.folio_chunks = NULL
    pm.nr_chunks = 0


cdef inline int _free_area_add(physmem *pm, uint64_t pfn, int order) noexcept nogil:
    cdef uint64_t old
    cdef int r = xa_store_order(&pm.free_area[order], pfn >> order, 0, 0, &old)
    if r >= 0:
        xa_set_mark(&pm.free_area[order], pfn >> order, _FREE_MARK)
    return r


cdef inline bint _free_area_take(physmem *pm, uint64_t pfn, int order) noexcept nogil:
    cdef uint64_t old
    return xa_erase(&pm.free_area[order], pfn >> order, &old)


cdef int _carve_order(const physmem *pm, uint64_t pfn) noexcept nogil:
    """The largest block at pfn (a watermark) that is aligned and fits below the end of its
    node (end_pfn with one node)."""
    cdef int o = MAX_PAGE_ORDER
    cdef uint64_t end = _node_end_of(pm, pfn)
    # (end - pfn, not pfn + pages: a block at the top of the pfn space would wrap)
    while o > 0 and ((pfn & (_pages(o) - 1)) or _pages(o) > end - pfn):
        o -= 1
    return o


cdef int _pcp_refill(physmem *pm) noexcept nogil:
    """rmqueue_bulk: move a block of free pages onto the per-cpu list (lowest pfn on top)."""
    cdef int o
    cdef uint64_t p, i
    for o in range(PCP_BATCH_ORDER, -1, -1):
        if _buddy_alloc(pm, o, &p) == 0:
            pm.nr_free_pages += _pages(o)       # still free: only their list changed
            for i in range(_pages(o)):
                pm.pcp[pm.pcp_count + i] = p + _pages(o) - 1 - i
            pm.pcp_count += _pages(o)
            return 0
    return -ENOMEM


cdef int _cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0], y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef void _pcp_drain(physmem *pm, uint32_t n) noexcept nogil:
    """free_pcppages_bulk: the n coldest pages (bottom of the list) go back to the buddy,
    aligned runs of them as one block (the buddy would merge them anyway)."""
    cdef uint32_t i = 0, k
    cdef int o
    cdef uint64_t *b = pm.pcp
    qsort(b, n, sizeof(uint64_t), _cmp_u64)
    while i < n:
        o = 0
        while (o < PCP_BATCH_ORDER and not (b[i] & (_pages(o + 1) - 1)) and i + _pages(o + 1) <= n
               and b[i + _pages(o + 1) - 1] == b[i] + _pages(o + 1) - 1):
            o += 1                  # sorted and distinct: the ends decide the run
        pm.nr_free_pages -= _pages(o)
        _buddy_free(pm, b[i], o)
        i += _pages(o)
    memmove(&pm.pcp[0], &pm.pcp[n], (pm.pcp_count - n) * sizeof(uint64_t))
    pm.pcp_count -= n


cdef void phys_drain_pcp(physmem *pm) noexcept nogil:
    _pcp_drain(pm, pm.pcp_count)


cdef int phys_alloc(physmem *pm, int order, uint64_t *pfn) noexcept nogil:
    if pm.fail_alloc:
        pm.fail_alloc -= 1
        return -ENOMEM
    if order == 0 and pm.pcp_enabled:
        if pm.pcp_count == 0 and _pcp_refill(pm) < 0:
            return -ENOMEM
        pm.pcp_count -= 1
        pfn[0] = pm.pcp[pm.pcp_count]
        pm.nr_free_pages -= 1
        return 0
    if _buddy_alloc(pm, order, pfn) == 0:
        return 0
    if pm.pcp_count:
        phys_drain_pcp(pm)                      # the slow path drains the per-cpu lists
        return _buddy_alloc(pm, order, pfn)
    return -ENOMEM


cdef void phys_free(physmem *pm, uint64_t pfn, int order) noexcept nogil:
    if order == 0 and pm.pcp_enabled:
        if pm.pcp_count == PCP_HIGH:
            _pcp_drain(pm, _pages(PCP_BATCH_ORDER))
        pm.pcp[pm.pcp_count] = pfn
        pm.pcp_count += 1
        pm.nr_free_pages += 1
        return
    _buddy_free(pm, pfn, order)


cdef int _buddy_alloc(physmem *pm, int order, uint64_t *pfn) noexcept nogil:
    cdef int o, c
    cdef uint64_t idx = 0, v, p, watermark = pm.watermark
    # the smallest free block that is large enough
    for o in range(order, NR_PAGE_ORDERS):
        if pm.free_area[o].nr_entries:
            idx = 0
            xa_find(&pm.free_area[o], &idx, <uint64_t>0xFFFFFFFFFFFFFFFF, _FREE_MARK, &v)
            p = idx << o
            _free_area_take(pm, p, o)
            break
    else:
        # carve untouched memory; blocks too small on the way go to the free lists
        while True:
            if pm.watermark >= pm.end_pfn:
                # nothing fits: give the blocks carved on the way back to
                # untouched memory, so that a failed allocation changes nothing
                _phys_lower_watermark(pm, watermark)
                return -ENOMEM
            c = _carve_order(pm, pm.watermark)
            p = pm.watermark
            if c >= order:
                pm.watermark += _pages(c)
                o = c
                break
            if _free_area_add(pm, p, c) < 0:
                _phys_lower_watermark(pm, watermark)
                return -ENOMEM
            pm.watermark += _pages(c)
    return _buddy_split(pm, p, o, order, pfn)


cdef int _buddy_split(physmem *pm, uint64_t p, int o, int order, uint64_t *pfn) noexcept nogil:
    """expand(): the free block [p, order o) taken off its list is split down to order, the
    upper halves going to the free lists."""
    while o > order:
        o -= 1
        if _free_area_add(pm, p + _pages(o), o) < 0:
            pm.nr_free_pages -= _pages(o + 1)
            _buddy_free(pm, p, o + 1)        # undo: nothing was handed out
            return -ENOMEM
    pm.nr_free_pages -= _pages(order)
    pfn[0] = p
    return 0


cdef int _buddy_alloc_in(physmem *pm, int order, uint64_t lo, uint64_t hi, uint64_t *pfn) noexcept nogil:
    """The lowest free block of at least order inside [lo, hi) (a node): untouched memory
    below hi is described first (carved into the free lists), then searched."""
    cdef int o, c
    cdef uint64_t idx, v
    cdef bint carved = False
    while True:
        for o in range(order, NR_PAGE_ORDERS):
            idx = (lo + _pages(o) - 1) >> o
            if hi >> o > idx and xa_find(&pm.free_area[o], &idx, (hi >> o) - 1, _FREE_MARK, &v):
                _free_area_take(pm, idx << o, o)
                return _buddy_split(pm, idx << o, o, order, pfn)
        if carved or pm.watermark >= hi:
            return -ENOMEM
        while pm.watermark < hi:
            c = _carve_order(pm, pm.watermark)
            if _free_area_add(pm, pm.watermark, c) < 0:
                return -ENOMEM
            pm.watermark += _pages(c)
        carved = True


cdef int phys_alloc_node(physmem *pm, int order, int nid, uint64_t *pfn) noexcept nogil:
    """__alloc_pages(__GFP_THISNODE): a block on node nid, or -ENOMEM."""
    cdef uint64_t lo = pm.start_pfn if nid == 0 else pm.node_end[nid - 1], hi = pm.node_end[nid]
    if pm.fail_alloc:
        pm.fail_alloc -= 1
        return -ENOMEM
    if _buddy_alloc_in(pm, order, lo, hi, pfn) == 0:
        return 0
    if pm.pcp_count:
        phys_drain_pcp(pm)
        return _buddy_alloc_in(pm, order, lo, hi, pfn)
    return -ENOMEM


cdef void _phys_lower_watermark(physmem *pm, uint64_t floor) noexcept nogil:
    """Give free blocks that end at the watermark back to untouched memory, down to floor."""
    cdef int o
    cdef uint64_t p
    cdef bint moved = True
    while moved:
        moved = False
        for o in range(NR_PAGE_ORDERS):
            if pm.watermark - floor < _pages(o):
                break
            p = pm.watermark - _pages(o)
            if (p & (_pages(o) - 1)) == 0 and _free_area_take(pm, p, o):
                pm.watermark = p
                moved = True
                break


cdef void _buddy_free(physmem *pm, uint64_t pfn, int order) noexcept nogil:
    cdef uint64_t buddy
    pm.nr_free_pages += _pages(order)
    while order < MAX_PAGE_ORDER:
        buddy = pfn ^ _pages(order)
        if buddy < pm.start_pfn or buddy + _pages(order) > pm.watermark:
            break
        if pm.nr_nodes > 1 and _node_end_of(pm, buddy) != _node_end_of(pm, pfn):
            break                               # a block never spans two nodes
        if not _free_area_take(pm, buddy, order):
            break
        pfn = pfn if pfn < buddy else buddy
        order += 1
    if pfn + _pages(order) == pm.watermark:
        pm.watermark = pfn
        _phys_lower_watermark(pm, pm.start_pfn)
    elif _free_area_add(pm, pfn, order) < 0:
        # Out of memory describing a free block: keep it as allocated (a leak the
        # counters show) rather than lose track of it.
        pm.nr_free_pages -= _pages(order)


cdef int phys_check_allocated(const physmem *pm, uint64_t pfn, int order) noexcept nogil:
    cdef int o
    cdef uint64_t idx, v, end = pfn + _pages(order)
    if order < 0 or order > MAX_PAGE_ORDER or pfn & (_pages(order) - 1):
        return -EINVAL
    if pfn < pm.start_pfn or end > pm.watermark or end < pfn:
        return -EINVAL
    for o in range(NR_PAGE_ORDERS):
        if o >= order:
            if xa_load(&pm.free_area[o], pfn >> o, &v):
                return -EINVAL
        else:
            idx = pfn >> o
            if xa_find(&pm.free_area[o], &idx, (end - 1) >> o, XA_NO_MARK, &v):
                return -EINVAL
    return 0


cdef uint64_t phys_nr_free_blocks(const physmem *pm, int order) noexcept nogil:
    """Free blocks of this order, counting untouched memory as its maximal aligned blocks."""
    cdef uint64_t n = pm.free_area[order].nr_entries
    cdef uint64_t p = pm.watermark, run
    cdef int c
    while p < pm.end_pfn:
        c = _carve_order(pm, p)
        if c == MAX_PAGE_ORDER:
            run = (pm.end_pfn - p) >> MAX_PAGE_ORDER
            if order == MAX_PAGE_ORDER:
                n += run
            p += run << MAX_PAGE_ORDER
            continue
        if c == order:
            n += 1
        p += _pages(c)
    return n


# ------------------------------------------------------------------- folios

cdef inline folio *folio_get(const physmem *pm, uint32_t id) noexcept nogil:
    return &pm.folio_chunks[id >> FOLIO_CHUNK_SHIFT][id & ((1 << FOLIO_CHUNK_SHIFT) - 1)]


cdef int _folio_new_id(physmem *pm, uint32_t *id) noexcept nogil:
    cdef folio **chunks
    cdef uint32_t i
    if pm.folio_free_id:
        i = pm.folio_free_id
        pm.folio_free_id = <uint32_t>folio_get(pm, i).index
        id[0] = i
        return 0
    i = pm.folio_next_id
    if (i >> FOLIO_CHUNK_SHIFT) >= pm.nr_chunks:
        chunks = <folio **>realloc(pm.folio_chunks, (pm.nr_chunks + 1) * sizeof(folio *))
        if chunks == NULL:
            return -ENOMEM
        pm.folio_chunks = chunks
        chunks[pm.nr_chunks] = <folio *>gmem_kmem_cache_alloc(GMEM_KMEM_FOLIOS, sizeof(folio) << FOLIO_CHUNK_SHIFT)
        if chunks[pm.nr_chunks] == NULL:
            return -ENOMEM
        pm.nr_chunks += 1
    pm.folio_next_id = i + 1
    id[0] = i
    return 0


cdef inline void _folio_release_id(physmem *pm, uint32_t id) noexcept nogil:
    cdef folio *f = folio_get(pm, id)
    f.refcount = 0
    f.order = 0xFF                  # marks a released id
    f.index = pm.folio_free_id
    pm.folio_free_id = id


cdef int folio_alloc(physmem *pm, int order, uint32_t *id) noexcept nogil:
    return folio_alloc_node(pm, order, -1, id)


cdef int folio_alloc_node(physmem *pm, int order, int nid, uint32_t *id) noexcept nogil:
    """A folio of order on node nid (any node, lowest first, if nid < 0): 0 or -ENOMEM."""
    cdef uint64_t pfn
    if (phys_alloc(pm, order, &pfn) if nid < 0 else phys_alloc_node(pm, order, nid, &pfn)) < 0:
        return -ENOMEM
    if _folio_install(pm, pfn, order, id) < 0:
        phys_free(pm, pfn, order)
        return -ENOMEM
    return 0


cdef int _folio_install(physmem *pm, uint64_t pfn, int order, uint32_t *id) noexcept nogil:
    """A new folio struct for the allocated block at pfn: 0 and *id, or -ENOMEM."""
    cdef uint64_t old
    cdef uint32_t i
    cdef folio *f
    if _folio_new_id(pm, &i) < 0:
        return -ENOMEM
    xas_set(&pm.memmap_xas, pfn)          # allocations mostly go up: one leaf per 64 pfns
    if xas_store(&pm.memmap_xas, order, i, &old) < 0:
        _folio_release_id(pm, i)
        return -ENOMEM
    f = folio_get(pm, i)
    memset(f, 0, sizeof(folio))
    f.pfn = pfn
    f.order = order
    f.refcount = 1
    pm.nr_folios += 1
    id[0] = i
    return 0


cdef int folio_free(physmem *pm, uint32_t id) noexcept nogil:
    """Drop the folio; its pages go back to the allocator, or to their pool page (PG_hugetlb):
    1 when that made a whole pool page free, else 0."""
    cdef folio *f = folio_get(pm, id)
    cdef uint64_t old, pfn = f.pfn
    cdef bint hugetlb = f.flags & PG_hugetlb
    xa_erase(&pm.memmap, f.pfn, &old)
    if not hugetlb:
        phys_free(pm, f.pfn, f.order)
    _folio_release_id(pm, id)
    pm.nr_folios -= 1
    return hugetlb_free_pages(pm, pfn) if hugetlb else 0


cdef int folio_split(physmem *pm, uint32_t id, int new_order) noexcept nogil:
    cdef folio *head = folio_get(pm, id)
    cdef int old_order = head.order
    cdef uint64_t n = _pages(old_order - new_order), k, old
    cdef uint32_t *ids
    cdef folio *t
    if new_order >= old_order:
        return -EINVAL
    ids = <uint32_t *>malloc(n * sizeof(uint32_t))
    if ids == NULL:
        return -ENOMEM
    ids[0] = id
    for k in range(1, n):
        if _folio_new_id(pm, &ids[k]) < 0:
            while k > 1:
                k -= 1
                _folio_release_id(pm, ids[k])
            free(ids)
            return -ENOMEM
    if xa_split(&pm.memmap, head.pfn, new_order) < 0:
        for k in range(1, n):
            _folio_release_id(pm, ids[k])
        free(ids)
        return -ENOMEM
    head = folio_get(pm, id)
    for k in range(1, n):
        t = folio_get(pm, ids[k])
        t.pfn = head.pfn + (k << new_order)
        t.index = head.index + (k << new_order)
        t.private = 0
        t.mapping = head.mapping
        t.refcount = head.refcount
        t.order = new_order
        t.flags = head.flags & ~PG_private
        xa_store_order(&pm.memmap, t.pfn, new_order, ids[k], &old)   # in place: no allocation
    head.order = new_order
    pm.nr_folios += n - 1
    free(ids)
    return 0


cdef uint32_t pfn_folio(const physmem *pm, uint64_t pfn) noexcept nogil:
    cdef uint64_t v
    if xa_load(&pm.memmap, pfn, &v):
        return <uint32_t>v
    return 0


cdef size_t phys_memory_bytes(const physmem *pm) noexcept nogil:
    """C memory describing pm beyond its struct: free areas, memmap, folio table."""
    cdef size_t n = xa_memory_bytes(&pm.memmap)
    cdef int o
    for o in range(NR_PAGE_ORDERS):
        n += xa_memory_bytes(&pm.free_area[o])
    return n + pm.nr_chunks * (sizeof(folio) << FOLIO_CHUNK_SHIFT)
