# lib/maple_tree.c, as guest_memfd's in-place conversion uses it ("next", 1ae5be958ff7 "Track
# attributes in a maple tree"): gmem_inode->attributes maps every page index to its memory
# attributes; every index is present (the tree is created covering [0, ULONG_MAX]) and adjacent
# ranges with equal values are merged (mas_store_prealloc extends the store over equal
# neighbours).  Modelled as a sorted array of range starts: lookups are a binary search, a
# store replaces the ranges it covers.  Writers hold the filemap invalidate lock (the host lock).

cdef enum:
    MT_INIT_CAP = 8


cdef int mt_init(gmem_attr_tree *mt, uint64_t value) noexcept nogil:
    """One range [0, ULONG_MAX] holding value: 0 or -ENOMEM."""
    mt.starts = <uint64_t *>malloc(MT_INIT_CAP * sizeof(uint64_t))
    mt.vals = <uint64_t *>malloc(MT_INIT_CAP * sizeof(uint64_t))
    if mt.starts == NULL or mt.vals == NULL:
        mt_destroy(mt)
        return -ENOMEM
    mt.cap = MT_INIT_CAP
    mt.nr = 1
    mt.starts[0] = 0
    mt.vals[0] = value
    return 0


cdef void mt_destroy(gmem_attr_tree *mt) noexcept nogil:
    free(mt.starts)
    free(mt.vals)
    mt.starts = mt.vals = NULL
    mt.nr = mt.cap = 0


cdef inline uint32_t mt_slot(const gmem_attr_tree *mt, uint64_t index) noexcept nogil:
    """The range holding index: the last start <= index (starts[0] is 0)."""
    cdef uint32_t lo = 0, hi = mt.nr, mid
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if mt.starts[mid] <= index:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline uint64_t mt_range_last(const gmem_attr_tree *mt, uint32_t i) noexcept nogil:
    return mt.starts[i + 1] - 1 if i + 1 < mt.nr else <uint64_t>0xFFFFFFFFFFFFFFFF


cdef uint64_t mt_load(const gmem_attr_tree *mt, uint64_t index, uint64_t *first,
                      uint64_t *last) noexcept nogil:
    """mtree_load: the value at index, with the extent of its range (first/last may be NULL)."""
    cdef uint32_t i = mt_slot(mt, index)
    if first != NULL:
        first[0] = mt.starts[i]
    if last != NULL:
        last[0] = mt_range_last(mt, i)
    return mt.vals[i]


cdef bint mt_range_is(const gmem_attr_tree *mt, uint64_t first, uint64_t last,
                      uint64_t value) noexcept nogil:
    """Every index in [first, last] holds value (ranges are merged: one range covers them)."""
    cdef uint32_t i = mt_slot(mt, first)
    return mt.vals[i] == value and mt_range_last(mt, i) >= last


cdef int mt_preallocate(gmem_attr_tree *mt) noexcept nogil:
    """mas_preallocate: room for the worst store (one range split in three), so that mt_store
    cannot fail: 0 or -ENOMEM, nothing changed."""
    cdef uint32_t cap = mt.cap
    cdef uint64_t *p
    if mt.nr + 2 <= cap:
        return 0
    while cap < mt.nr + 2:
        cap *= 2
    p = <uint64_t *>realloc(mt.starts, cap * sizeof(uint64_t))
    if p == NULL:
        return -ENOMEM
    mt.starts = p
    p = <uint64_t *>realloc(mt.vals, cap * sizeof(uint64_t))
    if p == NULL:
        return -ENOMEM
    mt.vals = p
    mt.cap = cap
    return 0


cdef void mt_store(gmem_attr_tree *mt, uint64_t first, uint64_t last, uint64_t value) noexcept nogil:
    """mas_store_prealloc of value over [first, last], merging with equal neighbours (after
    mt_preallocate: cannot fail)."""
    cdef uint32_t i = mt_slot(mt, first), j = mt_slot(mt, last), k = 0, n
    cdef uint64_t s[3]
    cdef uint64_t v[3]
    cdef uint64_t right_end = mt_range_last(mt, j)
    # the pieces that replace ranges i..j: the head of i, the new range, the tail of j
    if mt.starts[i] < first and mt.vals[i] != value:
        s[k], v[k] = mt.starts[i], mt.vals[i]
        k += 1
    elif mt.starts[i] < first:
        first = mt.starts[i]                    # merges with the head
    if i > 0 and mt.vals[i - 1] == value and mt.starts[i] == first:
        i -= 1                                  # merges with the range before
        first = mt.starts[i]
    s[k], v[k] = first, value
    k += 1
    if last < right_end and mt.vals[j] != value:
        s[k], v[k] = last + 1, mt.vals[j]
        k += 1
    elif j + 1 < mt.nr and mt.vals[j + 1] == value:
        j += 1                                  # merges with the range after
    n = mt.nr - (j - i + 1) + k
    memmove(&mt.starts[i + k], &mt.starts[j + 1], (mt.nr - j - 1) * sizeof(uint64_t))
    memmove(&mt.vals[i + k], &mt.vals[j + 1], (mt.nr - j - 1) * sizeof(uint64_t))
    memcpy(&mt.starts[i], s, k * sizeof(uint64_t))
    memcpy(&mt.vals[i], v, k * sizeof(uint64_t))
    mt.nr = n


cdef int mt_check(const gmem_attr_tree *mt) noexcept nogil:
    """0, or -1 if an index is missing (no range at 0), starts are not increasing, or two
    adjacent ranges hold the same value (not merged)."""
    cdef uint32_t i
    if mt.nr == 0 or mt.starts[0] != 0 or mt.nr > mt.cap:
        return -1
    for i in range(1, mt.nr):
        if mt.starts[i] <= mt.starts[i - 1] or mt.vals[i] == mt.vals[i - 1]:
            return -1
    return 0
