# lib/xarray.c: the XArray, a radix tree of 64-slot nodes over 64-bit indices.
#
# An entry of order k lives in the node whose shift is k rounded down to a
# multiple of 6: its first slot (the canonical one) holds the value, the
# following (1 << (k - shift)) - 1 slots hold siblings pointing back at it.
# Marks are per slot; a slot pointing at a child is marked when any entry
# below it is.  As in the kernel: a store into any index of a multi-index
# entry stores at every index of it, erasing any index erases all of it, and
# marks apply to every index of an entry.  A position in the tree is the caller's
# (struct xa_state, the cursor): the array keeps none.

from libc.string cimport memset

cdef extern from *:
    """
    static inline int gmem_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    /* asm volatile, not __builtin_prefetch: gcc may delete a prefetch, or a whole inlined
       function of loads and prefetches, as having no effect */
    #if defined(__x86_64__)
    #define gmem_prefetch(p) __asm__ __volatile__("prefetcht0 (%0)" : : "r"((const void *)(p)))
    #define gmem_prefetchw(p) __asm__ __volatile__("prefetchw (%0)" : : "r"((const void *)(p)))
    #else
    #define gmem_prefetch(p) __builtin_prefetch((const void *)(p))
    #define gmem_prefetchw(p) __builtin_prefetch((const void *)(p), 1)
    #endif
    /* node_gen values are unique to an array (xa_init): 2^32 arrays of 2^32 frees each */
    static unsigned long long gmem_xa_gen_next;
    static inline unsigned long long gmem_xa_new_gen(void) {
        return __atomic_add_fetch(&gmem_xa_gen_next, 1ULL << 32, __ATOMIC_RELAXED);
    }
    """
    int gmem_ctz64(unsigned long long x) noexcept nogil
    void gmem_prefetch(const void *p) noexcept nogil
    void gmem_prefetchw(const void *p) noexcept nogil
    uint64_t gmem_xa_new_gen() noexcept nogil
    # a cursor's xa_gen when it stands nowhere: no array's node_gen gets there
    const uint64_t XA_GEN_NOWHERE "(~0ULL)"

cdef inline bint _xa_is_value(uint64_t e) noexcept nogil:
    return e & 1

cdef inline bint _xa_is_sibling(uint64_t e) noexcept nogil:
    return (e & 3) == 2

cdef inline bint _xa_is_node(uint64_t e) noexcept nogil:
    return e != 0 and (e & 3) == 0

cdef inline uint64_t _xa_mk_value(uint64_t v) noexcept nogil:
    return (v << 1) | 1

cdef inline uint64_t _xa_mk_sibling(int off) noexcept nogil:
    return (<uint64_t>off << 2) | 2

cdef inline int _xa_sibling_off(uint64_t e) noexcept nogil:
    return <int>(e >> 2)

cdef inline xa_node *_xa_to_node(uint64_t e) noexcept nogil:
    return <xa_node *><size_t>e

cdef inline uint64_t _xa_mk_node(xa_node *n) noexcept nogil:
    return <uint64_t><size_t>n

cdef inline bint _xa_covers(int shift, uint64_t index) noexcept nogil:
    # Does a node of this shift, rooted at index 0, reach index?
    return shift + XA_CHUNK_SHIFT >= 64 or (index >> (shift + XA_CHUNK_SHIFT)) == 0

cdef inline uint64_t _xa_bit(int off) noexcept nogil:
    return (<uint64_t>1) << off

cdef inline uint64_t _xa_range_bits(int off, int n) noexcept nogil:
    if n >= 64:
        return <uint64_t>0xFFFFFFFFFFFFFFFF
    return (((<uint64_t>1) << n) - 1) << off

cdef inline int _xa_max_offset(int shift) noexcept nogil:
    # Offsets past this would overflow a 64-bit index (only the top node, shift 60).
    if shift + XA_CHUNK_SHIFT > 64:
        return (1 << (64 - shift)) - 1
    return XA_CHUNK_MASK


cdef xa_node *_xa_node_alloc(xarray *xa, int shift, xa_node *parent, int offset) noexcept nogil:
    cdef xa_node *n = xa.node_cache
    if n != NULL:
        # a node freed a moment ago: trees that shrink and grow again skip the slab
        xa.node_cache = n.parent
        xa.nr_cached -= 1
    else:
        n = <xa_node *>gmem_kmem_cache_alloc(GMEM_KMEM_XA_NODE, sizeof(xa_node))
        if n == NULL:
            return NULL
    n.shift = shift
    n.parent = parent
    n.offset = offset
    xa.nr_nodes += 1
    return n


cdef void _xa_node_free(xarray *xa, xa_node *n) noexcept nogil:
    xa.nr_nodes -= 1
    xa.node_gen += 1
    # zeroed now, while its lines are in the cache (whoever frees a node has just read it), so
    # that an allocation writes only the lines it uses
    memset(n, 0, sizeof(xa_node))
    if xa.nr_cached < XA_NODE_CACHE:
        n.parent = xa.node_cache
        xa.node_cache = n
        xa.nr_cached += 1
    else:
        gmem_kmem_cache_free(GMEM_KMEM_XA_NODE, n)


cdef inline int _xa_entry_order_at(const xa_node *node, int shift, int off) noexcept nogil:
    """Order of the entry whose canonical slot is off, in a node of this shift."""
    cdef uint64_t sib = _xa_mk_sibling(off)
    cdef int n = 1
    while off + n < XA_CHUNK_SIZE and node.slots[off + n] == sib:
        n <<= 1
    return shift + gmem_ctz64(n)


cdef int _xa_entry_order(const xa_node *node, int off) noexcept nogil:
    """Order of the entry whose canonical slot is off."""
    return _xa_entry_order_at(node, node.shift, off)


cdef void _xa_free_subtree(xarray *xa, xa_node *node) noexcept nogil:
    """Free node and everything below it, uncounting its entries."""
    cdef int off
    cdef uint64_t e
    for off in range(XA_CHUNK_SIZE):
        e = node.slots[off]
        if _xa_is_node(e):
            _xa_free_subtree(xa, _xa_to_node(e))
        elif _xa_is_value(e):
            xa.nr_by_order[_xa_entry_order(node, off)] -= 1
            xa.nr_entries -= 1
    _xa_node_free(xa, node)


cdef void _xa_update_marks_up(xa_node *node) noexcept nogil:
    cdef xa_node *p
    cdef int m
    while node.parent != NULL:
        p = node.parent
        for m in range(XA_MAX_MARKS):
            if node.marks[m]:
                p.marks[m] |= _xa_bit(node.offset)
            else:
                p.marks[m] &= ~_xa_bit(node.offset)
        node = p


cdef void _xa_shrink(xarray *xa) noexcept nogil:
    """Drop empty nodes from the top and roots with only slot 0 used by a child."""
    cdef xa_node *head = xa.head
    cdef xa_node *child
    while head != NULL:
        if head.count == 0:
            _xa_node_free(xa, head)
            xa.head = NULL
            return
        if head.count != 1 or not _xa_is_node(head.slots[0]):
            return
        child = _xa_to_node(head.slots[0])
        child.parent = NULL
        child.offset = 0
        _xa_node_free(xa, head)
        xa.head = child
        head = child


cdef void _xa_delete_empty(xarray *xa, xa_node *node) noexcept nogil:
    """Free node if it became empty, and its ancestors likewise; then fix marks."""
    cdef xa_node *p
    cdef int m
    while node != NULL and node.count == 0 and node.parent != NULL:
        p = node.parent
        p.slots[node.offset] = 0
        p.count -= 1
        for m in range(XA_MAX_MARKS):
            p.marks[m] &= ~_xa_bit(node.offset)
        _xa_node_free(xa, node)
        node = p
    if node != NULL:
        _xa_update_marks_up(node)
    _xa_shrink(xa)


cdef int _xa_expand(xarray *xa, uint64_t index, int min_shift) noexcept nogil:
    """Grow the tree until its head covers index with a shift of at least min_shift."""
    cdef xa_node *head = xa.head
    cdef xa_node *n
    cdef int shift, m
    if head == NULL:
        shift = min_shift
        while not _xa_covers(shift, index):
            shift += XA_CHUNK_SHIFT
        xa.head = _xa_node_alloc(xa, shift, NULL, 0)
        return 0 if xa.head != NULL else -ENOMEM
    while head.shift < min_shift or not _xa_covers(head.shift, index):
        n = _xa_node_alloc(xa, head.shift + XA_CHUNK_SHIFT, NULL, 0)
        if n == NULL:
            return -ENOMEM
        n.slots[0] = _xa_mk_node(head)
        n.count = 1
        for m in range(XA_MAX_MARKS):
            if head.marks[m]:
                n.marks[m] = 1
        head.parent = n
        head.offset = 0
        xa.head = n
        head = n
    return 0


cdef void xa_init(xarray *xa) noexcept nogil:
    memset(xa, 0, sizeof(xarray))
    # a node_gen no other array has had: a cursor kept from an array freed since, whose
    # address this one took, cannot take this array's nodes for its own (xas_set_xa)
    xa.node_gen = gmem_xa_new_gen()


cdef void xa_destroy(xarray *xa) noexcept nogil:
    cdef xa_node *n
    if xa.head != NULL:
        _xa_free_subtree(xa, xa.head)
    while xa.node_cache != NULL:
        n = xa.node_cache
        xa.node_cache = n.parent
        n.parent = NULL             # (the rest was zeroed when it was freed)
        gmem_kmem_cache_free(GMEM_KMEM_XA_NODE, n)
    xa_init(xa)                     # (a new node_gen: no cursor's node stays valid)


# --------------------------------------------------------------------- the cursor
# struct xa_state: the caller's position in one array (XA_STATE, xas_set, xas_load,
# xas_store, as in lib/xarray.c). A walk leaves the cursor on the node it ended in, with
# the range of indices that node covers and the array's node_gen. The next walk from the
# same cursor starts there (xas_start trusting a cursor already on the path) if the node
# covers the new index and no node of the array was freed since: a stream that stays in
# one leaf, or under one multi-index entry, reads one slot. The array keeps no position of
# its own: a load writes only its caller's cursor, and any number of readers may walk one
# array at once. Whole-array calls (xa_load, xa_store_order, ...) are a cursor on the stack.

cdef inline void xas_init(xa_state *xas, xarray *xa, uint64_t index) noexcept nogil:
    """XA_STATE(xas, xa, index): a cursor that stands nowhere yet."""
    xas.xa = xa
    xas.xa_index = index
    xas.xa_gen = XA_GEN_NOWHERE


cdef inline void xas_set(xa_state *xas, uint64_t index) noexcept nogil:
    """Point the cursor at index. Unlike the kernel's xas_set(), which restarts the walk,
    the node the cursor stands on is kept: the next walk starts there if it covers index."""
    xas.xa_index = index


cdef inline void xas_set_xa(xa_state *xas, xarray *xa, uint64_t index) noexcept nogil:
    """xas_set() for a cursor kept between calls (a vCPU's), on the array the caller names
    now: a cursor that last walked another array starts from its head. One that walked an
    array since freed, whose address this one took, is told apart by node_gen (xa_init)."""
    if xas.xa != xa:
        xas.xa = xa
        xas.xa_gen = XA_GEN_NOWHERE
    xas.xa_index = index


cdef inline void xas_stand(xa_state *xas, xa_node *node, int shift) noexcept nogil:
    """The cursor stands on node (of this shift), which is on xa_index's path now."""
    xas.xa_node = node
    xas.xa_shift = shift
    xas.xa_node_index = xas.xa_index
    xas.xa_gen = xas.xa.node_gen


cdef inline bint xas_trusted(const xa_state *xas) noexcept nogil:
    """xas_start()'s test: the node the cursor stands on is on xa_index's path, as no node
    was freed since the cursor got there (a node that is not freed never moves) and the
    index shares the node's range with the one it was reached for."""
    return xas.xa_gen == xas.xa.node_gen and \
        ((xas.xa_index ^ xas.xa_node_index) >> xas.xa_shift) < XA_CHUNK_SIZE


cdef inline uint64_t xas_descend(const xa_state *xas, const xa_node *node, int shift) noexcept nogil:
    """One level down (lib/xarray.c xas_descend): the slot of xa_index in node, whose slots
    cover 1 << shift indices each. The shift is carried down rather than read from the
    node: its header is on another cache line than the slot."""
    return node.slots[(xas.xa_index >> shift) & XA_CHUNK_MASK]


cdef inline uint64_t xas_settle(xa_state *xas, const xa_node *node, int shift, uint64_t e) noexcept nogil:
    """The walk ends in node with slot e: a sibling resolves to its canonical slot, which
    becomes xa_offset; the entry (a value, or 0)."""
    cdef int off = (xas.xa_index >> shift) & XA_CHUNK_MASK
    if _xa_is_sibling(e):
        off = _xa_sibling_off(e)
        e = node.slots[off]
    xas.xa_offset = off
    return e


cdef inline uint64_t _xas_walk_from(xa_state *xas, xa_node *node, int shift) noexcept nogil:
    """From node (on xa_index's path) down to the lowest node on it: the entry there (a
    value, or 0), with the cursor standing on that node."""
    cdef uint64_t e = xas_descend(xas, node, shift)
    while _xa_is_node(e):
        node = _xa_to_node(e)
        shift -= XA_CHUNK_SHIFT
        e = xas_descend(xas, node, shift)
    xas_stand(xas, node, shift)
    return xas_settle(xas, node, shift, e)


cdef inline uint64_t _xas_walk_head(xa_state *xas) noexcept nogil:
    """xas_walk() from the head."""
    cdef xa_node *node = xas.xa.head
    if node == NULL or not _xa_covers(node.shift, xas.xa_index):
        xas.xa_gen = XA_GEN_NOWHERE
        return 0
    return _xas_walk_from(xas, node, node.shift)


cdef uint64_t _xas_walk(xa_state *xas) noexcept nogil:
    """xas_walk() past its inline case: from the cursor's node if it is on the path, else
    from the head."""
    if xas_trusted(xas):
        return _xas_walk_from(xas, xas.xa_node, xas.xa_shift)
    return _xas_walk_head(xas)


cdef inline uint64_t xas_walk(xa_state *xas) noexcept nogil:
    """xas_start() then descend: the entry covering xa_index (a value, siblings resolved) or 0,
    the cursor left on the node holding its slot (XA_GEN_NOWHERE: the tree does not reach
    xa_index). A cursor already on the node holding the entry reads one slot, inline."""
    cdef uint64_t e
    if xas_trusted(xas):
        e = xas_descend(xas, xas.xa_node, xas.xa_shift)
        if not _xa_is_node(e):
            return xas_settle(xas, xas.xa_node, xas.xa_shift, e)
    return _xas_walk(xas)


cdef inline int xas_load(xa_state *xas, uint64_t *value) noexcept nogil:
    """1 and *value if an entry covers xa_index, else 0."""
    cdef uint64_t e = xas_walk(xas)
    if _xa_is_value(e):
        value[0] = e >> 1
        return 1
    return 0


cdef inline int xas_lookup(xa_state *xas, uint64_t *value, uint64_t *first, int *order) noexcept nogil:
    """xas_load() with the entry's first index and order."""
    cdef uint64_t e = xas_walk(xas)
    cdef int k
    if not _xa_is_value(e):
        return 0
    k = _xa_entry_order_at(xas.xa_node, xas.xa_shift, xas.xa_offset)
    value[0] = e >> 1
    order[0] = k
    first[0] = xas.xa_index & ~((((<uint64_t>1) << k) - 1))
    return 1


cdef xa_node *xas_walk_to(xa_state *xas, int shift_to) noexcept nogil:
    """The node of shift shift_to on xa_index's path (or one below it, where the cursor
    already stands), the cursor standing on it, without reading the slot of xa_index in it
    (a batch finds it to prefetch that slot); NULL if the path ends above that shift."""
    cdef xa_node *node
    cdef int shift
    cdef uint64_t e
    if xas_trusted(xas):
        node, shift = xas.xa_node, xas.xa_shift
    else:
        node = xas.xa.head
        if node == NULL or not _xa_covers(node.shift, xas.xa_index):
            xas.xa_gen = XA_GEN_NOWHERE
            return NULL
        shift = node.shift
    while shift > shift_to:
        e = xas_descend(xas, node, shift)
        if not _xa_is_node(e):
            break
        node = _xa_to_node(e)
        shift -= XA_CHUNK_SHIFT
    xas_stand(xas, node, shift)
    return node if shift <= shift_to else NULL


cdef inline xa_node *xas_leaf(xa_state *xas) noexcept nogil:
    """The leaf (shift 0) covering xa_index, the cursor standing on it, without reading its
    slot (a batch finds it to prefetch the slot); NULL if there is none."""
    if xas_trusted(xas) and xas.xa_shift == 0:
        return xas.xa_node
    return xas_walk_to(xas, 0)


cdef inline int _xas_store_here(xa_state *xas, uint64_t e, uint64_t value, uint64_t *old) noexcept nogil:
    """An order-0 store where the walk ended, whose slot held e: onto the whole entry there
    (1), or into an empty slot of a leaf (0; no marks to inherit or propagate)."""
    cdef xa_node *node = xas.xa_node
    node.slots[xas.xa_offset] = _xa_mk_value(value)
    if e:
        old[0] = e >> 1
        return 1
    node.count += 1
    xas.xa.nr_entries += 1
    xas.xa.nr_by_order[0] += 1
    return 0


cdef inline int xas_store(xa_state *xas, int order, uint64_t value, uint64_t *old) noexcept nogil:
    """Store value over the aligned 1 << order indices at xa_index (xas_set_order and
    xas_store in one): 1 (*old the value it replaced at xa_index), 0, or -ENOMEM. A store
    of order 0 onto an entry lands on that whole entry; one on the node the cursor stands
    on (a stream filling a leaf) is inline."""
    cdef uint64_t e
    if order == 0 and xas_trusted(xas):
        e = xas_settle(xas, xas.xa_node, xas.xa_shift, xas_descend(xas, xas.xa_node, xas.xa_shift))
        if _xa_is_value(e) or (e == 0 and xas.xa_shift == 0):
            return _xas_store_here(xas, e, value, old)
    return _xas_store(xas, order, value, old)


cdef int _xas_store(xa_state *xas, int order, uint64_t value, uint64_t *old) noexcept nogil:
    cdef uint64_t e
    if order == 0:
        e = _xas_walk(xas)
        if _xa_is_value(e) or (e == 0 and xas.xa_gen != XA_GEN_NOWHERE and xas.xa_shift == 0):
            return _xas_store_here(xas, e, value, old)
    return _xas_store_slow(xas, order, value, old)


cdef int _xas_store_slow(xa_state *xas, int order, uint64_t value, uint64_t *old) noexcept nogil:
    """xas_create() then the store: the nodes down to the entry's level are made as needed
    (from the cursor's node if it is on the path above that level, else from the head)."""
    cdef xarray *xa = xas.xa
    cdef uint64_t index = xas.xa_index
    cdef int target = order - order % XA_CHUNK_SHIFT
    cdef int off, i, m, n, r, shift, had = 0
    cdef uint64_t e
    cdef uint64_t marks[3]
    cdef xa_node *node
    cdef xa_node *child
    cdef xa_state below
    r = _xa_expand(xa, index, target)
    if r < 0:
        _xa_shrink(xa)
        xas.xa_gen = XA_GEN_NOWHERE
        return r
    if xas_trusted(xas) and xas.xa_shift >= target:
        node, shift = xas.xa_node, xas.xa_shift
    else:
        node, shift = xa.head, xa.head.shift
    while True:
        e = xas_settle(xas, node, shift, xas_descend(xas, node, shift))
        if shift == target:
            break
        if e == 0:
            child = _xa_node_alloc(xa, shift - XA_CHUNK_SHIFT, node, xas.xa_offset)
            if child == NULL:
                _xa_delete_empty(xa, node)
                xas.xa_gen = XA_GEN_NOWHERE
                return -ENOMEM
            node.slots[xas.xa_offset] = _xa_mk_node(child)
            node.count += 1
            node = child
        elif _xa_is_node(e):
            node = _xa_to_node(e)
        else:
            # A larger entry covers the range: the store lands on all of it.
            old[0] = e >> 1
            node.slots[xas.xa_offset] = _xa_mk_value(value)
            xas_stand(xas, node, shift)
            return 1
        shift -= XA_CHUNK_SHIFT
    off = xas.xa_offset
    xas_stand(xas, node, shift)
    if order == 0 and e == 0:
        # a new 4K entry in an empty leaf slot (maybe in a leaf made just now): nothing to
        # replace, no marks to inherit or to summarise upwards, nothing to shrink
        node.slots[off] = _xa_mk_value(value)
        node.count += 1
        xa.nr_entries += 1
        xa.nr_by_order[0] += 1
        return 0
    # An entry whose canonical slot is in this node (a sibling was resolved to it) has an
    # order of at least target, so when order == target there is no need to measure it.
    if _xa_is_value(e) and (order == target or _xa_entry_order_at(node, shift, off) >= order):
        old[0] = e >> 1
        node.slots[off] = _xa_mk_value(value)
        return 1
    # Replace whatever lies in [off, off + n): the new entry inherits their marks.
    n = 1 << (order - target)
    if _xa_is_value(e):
        old[0] = e >> 1
        had = 1
    elif _xa_is_node(e):
        # the entry at index (if any) is in the subtree being replaced
        xas_init(&below, xa, index)
        e = _xas_walk_from(&below, _xa_to_node(e), shift - XA_CHUNK_SHIFT)
        if _xa_is_value(e):
            old[0] = e >> 1
            had = 1
    for m in range(XA_MAX_MARKS):
        marks[m] = node.marks[m] & _xa_range_bits(off, n)
        node.marks[m] &= ~_xa_range_bits(off, n)
    for i in range(off, off + n):
        e = node.slots[i]
        if e == 0:
            continue
        if _xa_is_node(e):
            _xa_free_subtree(xa, _xa_to_node(e))
        elif _xa_is_value(e):
            xa.nr_by_order[_xa_entry_order(node, i)] -= 1
            xa.nr_entries -= 1
        node.slots[i] = 0
        node.count -= 1
    node.slots[off] = _xa_mk_value(value)
    for i in range(1, n):
        node.slots[off + i] = _xa_mk_sibling(off)
    node.count += n
    for m in range(XA_MAX_MARKS):
        if marks[m]:
            node.marks[m] |= _xa_bit(off)
    xa.nr_entries += 1
    xa.nr_by_order[order] += 1
    _xa_update_marks_up(node)
    _xa_shrink(xa)                  # (frees nodes only by moving node_gen: the cursor knows)
    return had


# ------------------------------------------------------------- whole-array calls

cdef inline xa_node *_xa_walk(const xarray *xa, uint64_t index, int *off) noexcept nogil:
    """The node holding the entry covering index, with its canonical offset; or NULL."""
    cdef xa_state xas
    xas_init(&xas, <xarray *>xa, index)
    if not _xa_is_value(_xas_walk_head(&xas)):
        return NULL
    off[0] = xas.xa_offset
    return xas.xa_node


cdef int xa_load(const xarray *xa, uint64_t index, uint64_t *value) noexcept nogil:
    """Writes nothing, so any number of threads may load from one array at once."""
    cdef xa_state xas
    cdef uint64_t e
    xas_init(&xas, <xarray *>xa, index)
    e = _xas_walk_head(&xas)
    if _xa_is_value(e):
        value[0] = e >> 1
        return 1
    return 0


cdef int xa_lookup(const xarray *xa, uint64_t index, uint64_t *value,
                   uint64_t *first, int *order) noexcept nogil:
    cdef xa_state xas
    cdef uint64_t e
    cdef int k
    xas_init(&xas, <xarray *>xa, index)
    e = _xas_walk_head(&xas)
    if not _xa_is_value(e):
        return 0
    k = _xa_entry_order_at(xas.xa_node, xas.xa_shift, xas.xa_offset)
    value[0] = e >> 1
    order[0] = k
    first[0] = index & ~((((<uint64_t>1) << k) - 1))
    return 1


cdef const uint64_t *xa_leaf_slot(const xarray *xa, uint64_t index) noexcept nogil:
    """Where index's slot is in its leaf, found without reading the leaf itself, or NULL if
    index has no leaf: a batch prefetches it for a later lookup."""
    cdef xa_state xas
    cdef xa_node *leaf
    xas_init(&xas, <xarray *>xa, index)
    leaf = xas_leaf(&xas)
    return &leaf.slots[index & XA_CHUNK_MASK] if leaf != NULL else NULL


cdef int xa_get_order(const xarray *xa, uint64_t index) noexcept nogil:
    cdef int off
    cdef xa_node *node = _xa_walk(xa, index, &off)
    if node == NULL:
        return 0
    return _xa_entry_order(node, off)


cdef int xa_store_order(xarray *xa, uint64_t index, int order, uint64_t value,
                        uint64_t *old) noexcept nogil:
    cdef xa_state xas
    xas_init(&xas, xa, index)
    return _xas_store(&xas, order, value, old)



cdef int xa_store_range(xarray *xa, uint64_t first, uint64_t last, uint64_t value) noexcept nogil:
    cdef uint64_t index = first, old
    cdef int order, r
    while True:
        # the largest aligned block at index that ends at or before last
        order = gmem_ctz64(index) if index else 63
        if order > XA_MAX_ORDER:
            order = XA_MAX_ORDER
        while order > 0 and (last - index) < ((((<uint64_t>1) << order) - 1)):
            order -= 1
        r = xa_store_order(xa, index, order, value, &old)
        if r < 0:
            return r
        if last - index == ((((<uint64_t>1) << order) - 1)):
            return 0
        index += (<uint64_t>1) << order


cdef int _xa_erase_at(xarray *xa, xa_node *node, int off) noexcept nogil:
    cdef int k = _xa_entry_order(node, off)
    cdef int n = 1 << (k - node.shift)
    cdef int i, m
    cdef uint64_t marked = 0
    for i in range(off, off + n):
        node.slots[i] = 0
    node.count -= n
    for m in range(XA_MAX_MARKS):
        marked |= node.marks[m] & _xa_range_bits(off, n)
        node.marks[m] &= ~_xa_range_bits(off, n)
    xa.nr_entries -= 1
    xa.nr_by_order[k] -= 1
    if node.count or marked:
        if marked:
            _xa_update_marks_up(node)
        if node.count:
            return k                # the tree's shape is unchanged
    _xa_delete_empty(xa, node)
    return k


cdef int xa_erase(xarray *xa, uint64_t index, uint64_t *old) noexcept nogil:
    cdef int off
    cdef xa_node *node = _xa_walk(xa, index, &off)
    if node == NULL:
        return 0
    old[0] = node.slots[off] >> 1
    _xa_erase_at(xa, node, off)
    return 1


cdef uint64_t xa_erase_range(xarray *xa, uint64_t first, uint64_t last) noexcept nogil:
    cdef uint64_t start = first, f, v, end, count = 0
    cdef int k
    while start <= last and xa_find_entry(xa, start, last, XA_NO_MARK, &f, &k, &v):
        xa_erase(xa, f, &v)
        count += 1
        end = f + ((((<uint64_t>1) << k) - 1))
        if end >= last:
            break
        start = end + 1
    return count


cdef void _xa_fill(xa_node *node, int off, int n, int step, uint64_t value,
                   const uint64_t *marks) noexcept nogil:
    """Fill slots [off, off + n) with entries of step slots each, all holding value."""
    cdef int i = off, j, m
    while i < off + n:
        node.slots[i] = _xa_mk_value(value)
        for j in range(1, step):
            node.slots[i + j] = _xa_mk_sibling(i)
        for m in range(XA_MAX_MARKS):
            if marks[m]:
                node.marks[m] |= _xa_bit(i)
        i += step


cdef xa_node *_xa_build_full(xarray *xa, int shift, int order, uint64_t value,
                             const uint64_t *marks, xa_node *parent, int offset) noexcept nogil:
    """A node of this shift whose every index holds an entry of order (order < shift + 6)."""
    cdef xa_node *n = _xa_node_alloc(xa, shift, parent, offset)
    cdef xa_node *c
    cdef int i, j, m, step
    if n == NULL:
        return NULL
    if order >= shift:
        step = 1 << (order - shift)
        _xa_fill(n, 0, XA_CHUNK_SIZE, step, value, marks)
        xa.nr_entries += XA_CHUNK_SIZE // step
        xa.nr_by_order[order] += XA_CHUNK_SIZE // step
    else:
        for i in range(XA_CHUNK_SIZE):
            c = _xa_build_full(xa, shift - XA_CHUNK_SHIFT, order, value, marks, n, i)
            if c == NULL:
                _xa_free_subtree(xa, n)
                return NULL
            n.slots[i] = _xa_mk_node(c)
            n.count += 1
        for m in range(XA_MAX_MARKS):
            if marks[m]:
                n.marks[m] = <uint64_t>0xFFFFFFFFFFFFFFFF
    n.count = XA_CHUNK_SIZE
    return n


cdef int xa_split(xarray *xa, uint64_t index, int order) noexcept nogil:
    cdef int off, k, n, i, j, m, step
    cdef xa_node *node = _xa_walk(xa, index, &off)
    cdef xa_node *built[64]
    cdef uint64_t value
    cdef uint64_t marks[3]
    if node == NULL:
        return -ENOENT
    k = _xa_entry_order(node, off)
    if order < 0 or order >= k:
        return -EINVAL
    value = node.slots[off] >> 1
    for m in range(XA_MAX_MARKS):
        marks[m] = node.marks[m] & _xa_bit(off)
    n = 1 << (k - node.shift)
    if order >= node.shift:
        step = 1 << (order - node.shift)
        _xa_fill(node, off, n, step, value, marks)
    else:
        # Every slot of the entry becomes a full subtree; build them all first so
        # that a failed allocation leaves the entry as it was.
        for i in range(n):
            built[i] = _xa_build_full(xa, node.shift - XA_CHUNK_SHIFT, order, value,
                                      marks, node, off + i)
            if built[i] == NULL:
                for j in range(i):
                    _xa_free_subtree(xa, built[j])
                return -ENOMEM
        for i in range(n):
            node.slots[off + i] = _xa_mk_node(built[i])
            for m in range(XA_MAX_MARKS):
                if marks[m]:
                    node.marks[m] |= _xa_bit(off + i)
    xa.nr_entries -= 1
    xa.nr_by_order[k] -= 1
    if order >= node.shift:
        xa.nr_entries += n // step
        xa.nr_by_order[order] += n // step
    return 0


cdef int _xa_find_in(const xa_node *node, uint64_t start, uint64_t last, int mark,
                     uint64_t *first, int *order, uint64_t *value) noexcept nogil:
    cdef int s = node.shift
    cdef int off0 = (start >> s) & XA_CHUNK_MASK
    cdef int maxoff = _xa_max_offset(s)
    cdef int off, canon
    cdef uint64_t base, slot_first, e, bits
    base = 0 if s + XA_CHUNK_SHIFT >= 64 else (start >> (s + XA_CHUNK_SHIFT)) << (s + XA_CHUNK_SHIFT)
    # An entry that starts before start but covers it.
    e = node.slots[off0]
    if _xa_is_sibling(e):
        canon = _xa_sibling_off(e)
        if mark == XA_NO_MARK or (node.marks[mark] >> canon) & 1:
            first[0] = base + (<uint64_t>canon << s)
            order[0] = _xa_entry_order(node, canon)
            value[0] = node.slots[canon] >> 1
            return 1
    off = off0
    while off <= maxoff:
        if mark != XA_NO_MARK:
            bits = node.marks[mark] & ~(_xa_bit(off) - 1)
            if bits == 0:
                return 0
            off = gmem_ctz64(bits)
            if off > maxoff:
                return 0
        slot_first = base + (<uint64_t>off << s)
        if slot_first > last:
            return 0
        e = node.slots[off]
        if _xa_is_node(e):
            if _xa_find_in(_xa_to_node(e), slot_first if slot_first > start else start,
                           last, mark, first, order, value):
                return 1
        elif _xa_is_value(e):
            first[0] = slot_first
            order[0] = _xa_entry_order(node, off)
            value[0] = e >> 1
            return 1
        off += 1
    return 0


cdef int xa_find_entry(const xarray *xa, uint64_t start, uint64_t last, int mark,
                       uint64_t *first, int *order, uint64_t *value) noexcept nogil:
    if xa.head == NULL or start > last or not _xa_covers(xa.head.shift, start):
        return 0
    return _xa_find_in(xa.head, start, last, mark, first, order, value)


cdef int xa_find(const xarray *xa, uint64_t *index, uint64_t last, int mark,
                 uint64_t *value) noexcept nogil:
    cdef uint64_t f
    cdef int k
    if not xa_find_entry(xa, index[0], last, mark, &f, &k, value):
        return 0
    if f > index[0]:
        index[0] = f
    return 1


cdef int xa_find_after(const xarray *xa, uint64_t *index, uint64_t last, int mark,
                       uint64_t *value) noexcept nogil:
    cdef uint64_t f, v, start
    cdef int k
    if xa_lookup(xa, index[0], &v, &f, &k):
        start = f + ((((<uint64_t>1) << k) - 1))
    else:
        start = index[0]
    if start == <uint64_t>0xFFFFFFFFFFFFFFFF:
        return 0
    start += 1
    if not xa_find_entry(xa, start, last, mark, &f, &k, value):
        return 0
    index[0] = f if f > start else start
    return 1


cdef void xa_set_mark(xarray *xa, uint64_t index, int mark) noexcept nogil:
    cdef int off
    cdef xa_node *node = _xa_walk(xa, index, &off)
    if node != NULL:
        node.marks[mark] |= _xa_bit(off)
        _xa_update_marks_up(node)


cdef void xa_clear_mark(xarray *xa, uint64_t index, int mark) noexcept nogil:
    cdef int off
    cdef xa_node *node = _xa_walk(xa, index, &off)
    if node != NULL:
        node.marks[mark] &= ~_xa_bit(off)
        _xa_update_marks_up(node)


cdef int xa_get_mark(const xarray *xa, uint64_t index, int mark) noexcept nogil:
    cdef int off
    cdef xa_node *node = _xa_walk(xa, index, &off)
    return node != NULL and (node.marks[mark] >> off) & 1


cdef size_t xa_memory_bytes(const xarray *xa) noexcept nogil:
    return sizeof(xarray) + xa.nr_nodes * sizeof(xa_node)


cdef int _xa_check_node(const xa_node *node, uint64_t *entries, uint64_t *nodes,
                        uint64_t *by_order) noexcept nogil:
    cdef int off, count = 0, m, k, j, n
    cdef uint64_t e, child_marks
    cdef const xa_node *c
    nodes[0] += 1
    for off in range(XA_CHUNK_SIZE):
        e = node.slots[off]
        if e == 0:
            for m in range(XA_MAX_MARKS):
                if (node.marks[m] >> off) & 1:
                    return -1          # mark on an empty slot
            continue
        count += 1
        if _xa_is_node(e):
            c = _xa_to_node(e)
            if c.parent != node or c.offset != off or c.shift + XA_CHUNK_SHIFT != node.shift:
                return -2              # broken parent link or shift
            if c.count == 0:
                return -3              # empty node left in the tree
            for m in range(XA_MAX_MARKS):
                if ((node.marks[m] >> off) & 1) != (c.marks[m] != 0):
                    return -4          # mark summary disagrees with the child
            k = _xa_check_node(c, entries, nodes, by_order)
            if k < 0:
                return k
        elif _xa_is_value(e):
            k = _xa_entry_order(node, off)
            n = 1 << (k - node.shift)
            if off % n:
                return -5              # misaligned multi-index entry
            entries[0] += 1
            by_order[k] += 1
        else:
            j = _xa_sibling_off(e)
            if j >= off or not _xa_is_value(node.slots[j]):
                return -6              # sibling without its canonical entry
            k = _xa_entry_order(node, j)
            if off >= j + (1 << (k - node.shift)):
                return -7              # stray sibling
            for m in range(XA_MAX_MARKS):
                if (node.marks[m] >> off) & 1:
                    return -8          # marks live on the canonical slot only
    if count != node.count:
        return -9                      # occupancy count wrong
    return 0


cdef int xa_check(const xarray *xa) noexcept nogil:
    cdef uint64_t entries = 0, nodes = 0
    cdef uint64_t by_order[64]
    cdef int r, k
    memset(by_order, 0, sizeof(by_order))
    if xa.head != NULL:
        if xa.head.parent != NULL:
            return -2
        r = _xa_check_node(xa.head, &entries, &nodes, by_order)
        if r < 0:
            return r
    if entries != xa.nr_entries or nodes != xa.nr_nodes:
        return -10                     # counters wrong
    for k in range(64):
        if by_order[k] != xa.nr_by_order[k]:
            return -10
    return 0


cdef int xa_split_at(xarray *xa, uint64_t index) noexcept nogil:
    """Split entries until none covers both index - 1 and index (0 or -ENOMEM)."""
    cdef uint64_t v, first
    cdef int order, r
    if index == 0:
        return 0
    while xa_lookup(xa, index, &v, &first, &order) and first < index:
        r = xa_split(xa, first, order - 1)
        if r < 0:
            return r
    return 0


cdef int xa_assign_range(xarray *xa, uint64_t first, uint64_t last, uint64_t value,
                         bint erase) noexcept nogil:
    """Give exactly the indices [first, last] value (or erase them), leaving the rest alone:
    per-index semantics (xa_store() of each index) on top of multi-index entries."""
    cdef int r = xa_split_at(xa, first)
    if r == 0 and last != <uint64_t>0xFFFFFFFFFFFFFFFF:
        r = xa_split_at(xa, last + 1)
    if r < 0:
        return r
    if erase:
        xa_erase_range(xa, first, last)
        return 0
    return xa_store_range(xa, first, last, value)
