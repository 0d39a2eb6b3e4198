# lib/xarray.c: the XArray, a radix tree of 64-slot nodes over 64-bit indices.
#
# An entry of order k lives in the node whose shift is k rounded down to a
# multiple of 6: its first slot (the canonical one) holds the value, the
# following (1 << (k - shift)) - 1 slots hold siblings pointing back at it.
# Marks are per slot; a slot pointing at a child is marked when any entry
# below it is.  As in the kernel: a store into any index of a multi-index
# entry stores at every index of it, erasing any index erases all of it, and
# marks apply to every index of an entry.

from libc.stdlib cimport calloc, free
from libc.string cimport memset

cdef extern from *:
    """
    static inline int gmem_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    #define gmem_prefetch(p) __builtin_prefetch((const void *)(p))
    """
    int gmem_ctz64(unsigned long long x) noexcept nogil
    void gmem_prefetch(const void *p) noexcept nogil

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
        # a node freed a moment ago: trees that shrink and grow again skip malloc
        xa.node_cache = n.parent
        xa.nr_cached -= 1
        memset(n, 0, sizeof(xa_node))
    else:
        n = <xa_node *>calloc(1, sizeof(xa_node))
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
    if xa.hint == n:
        xa.hint = NULL
    if xa.nr_cached < XA_NODE_CACHE:
        n.parent = xa.node_cache
        xa.node_cache = n
        xa.nr_cached += 1
    else:
        free(n)


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


cdef xa_node *_xa_walk_shift(xarray *xa, uint64_t index, int *off, int *shift,
                             bint follow) noexcept nogil:
    """The node holding the entry covering index, with its canonical offset and the node's
    shift; or NULL. The shift is carried down: no node header is read (see _xa_load_from).
    follow: the caller owns xa (a store follows), so the walk may move the leaf hint."""
    cdef xa_node *node = _xa_hint(xa, index)
    cdef uint64_t e
    cdef int o, sh = 0
    if node == NULL:
        node = xa.head
        if node == NULL or not _xa_covers(node.shift, index):
            return NULL
        sh = node.shift
    while True:
        o = (index >> sh) & XA_CHUNK_MASK
        e = node.slots[o]
        if _xa_is_sibling(e):
            o = _xa_sibling_off(e)
            e = node.slots[o]
        if _xa_is_value(e):
            if sh == 0 and follow:
                _xa_follow(xa, node, index)
            off[0] = o
            shift[0] = sh
            return node
        if e == 0:
            if sh == 0 and follow:
                _xa_set_hint(xa, node, index)   # a miss in a leaf: the owner's store follows
            return NULL
        node = _xa_to_node(e)
        sh -= XA_CHUNK_SHIFT


cdef inline xa_node *_xa_walk(const xarray *xa, uint64_t index, int *off) noexcept nogil:
    """The node holding the entry covering index, with its canonical offset; or NULL."""
    cdef int shift
    return _xa_walk_shift(<xarray *>xa, index, off, &shift, False)


cdef void xa_init(xarray *xa) noexcept nogil:
    memset(xa, 0, sizeof(xarray))


cdef void xa_destroy(xarray *xa) noexcept nogil:
    cdef xa_node *n
    cdef uint64_t gen
    if xa.head != NULL:
        _xa_free_subtree(xa, xa.head)
    while xa.node_cache != NULL:
        n = xa.node_cache
        xa.node_cache = n.parent
        free(n)
    gen = xa.node_gen
    xa_init(xa)
    xa.node_gen = gen + 1           # no leaf found before stays valid


cdef inline int _xa_load_from(const xa_node *node, uint64_t index, uint64_t *value) noexcept nogil:
    """Load index starting at a node whose range covers it."""
    cdef uint64_t e
    cdef int o
    # The shift is carried down rather than read from each node: a child's
    # header is on another cache line than the slot we want (half the misses
    # of a random load in a large array).
    cdef int shift = node.shift
    while True:
        o = (index >> shift) & XA_CHUNK_MASK
        e = node.slots[o]
        if _xa_is_value(e):
            value[0] = e >> 1
            return 1
        if _xa_is_sibling(e):
            value[0] = node.slots[_xa_sibling_off(e)] >> 1
            return 1
        if e == 0:
            return 0
        node = _xa_to_node(e)
        shift -= XA_CHUNK_SHIFT


cdef inline xa_node *_xa_hint(const xarray *xa, uint64_t index) noexcept nogil:
    """The hinted leaf if it covers index (a sequential stream stays in one leaf for 64
    indices: one compare instead of a walk from the head)."""
    if xa.hint_index == (index & ~(<uint64_t>XA_CHUNK_MASK)):
        return xa.hint
    return NULL


cdef inline void _xa_set_hint(xarray *xa, xa_node *leaf, uint64_t index) noexcept nogil:
    # two words: only the array's owner writes them (stores, and the owner's *_follow
    # lookups); plain loads and lookups only read them, so readers may run in parallel
    xa.hint = leaf
    xa.hint_index = index & ~(<uint64_t>XA_CHUNK_MASK)


cdef inline void _xa_follow(xarray *xa, xa_node *leaf, uint64_t index) noexcept nogil:
    """After a walk to leaf: hint it if a stream is entering it at its first index or moving
    on from the hinted leaf to the next. Random hits mostly leave the hint alone: writing
    it on every walk slows them (each walk would wait on the last one's store). A miss in
    a leaf always hints it (the walks call _xa_set_hint): the owner's store comes next."""
    if (index & XA_CHUNK_MASK) == 0 or (index >> XA_CHUNK_SHIFT) - (xa.hint_index >> XA_CHUNK_SHIFT) == 1:
        _xa_set_hint(xa, leaf, index)


cdef inline int _xa_slot_get(const xa_node *node, int o, uint64_t *value) noexcept nogil:
    """Slot o of a node at the end of a walk: a value, a sibling of one, or nothing (in a
    leaf, no larger entry can cover an index)."""
    cdef uint64_t e = node.slots[o]
    if _xa_is_sibling(e):
        e = node.slots[_xa_sibling_off(e)]
    if _xa_is_value(e):
        value[0] = e >> 1
        return 1
    return 0


cdef inline int _xa_load(const xarray *xa, uint64_t index, uint64_t *value, bint follow) noexcept nogil:
    cdef xa_node *node = _xa_hint(xa, index)
    cdef uint64_t e
    cdef int shift
    if node != NULL:
        return _xa_slot_get(node, index & XA_CHUNK_MASK, value)
    node = xa.head
    if node == NULL or not _xa_covers(node.shift, index):
        return 0
    shift = node.shift          # carried down: see _xa_load_from
    while shift:
        e = node.slots[(index >> shift) & XA_CHUNK_MASK]
        if not _xa_is_node(e):
            return _xa_slot_get(node, (index >> shift) & XA_CHUNK_MASK, value)
        node = _xa_to_node(e)
        shift -= XA_CHUNK_SHIFT
    if not follow:
        return _xa_slot_get(node, index & XA_CHUNK_MASK, value)
    if _xa_slot_get(node, index & XA_CHUNK_MASK, value):
        _xa_follow(<xarray *>xa, node, index)
        return 1
    _xa_set_hint(<xarray *>xa, node, index)     # a miss in a leaf: the owner's store follows
    return 0


cdef int xa_load(const xarray *xa, uint64_t index, uint64_t *value) noexcept nogil:
    """Writes nothing, so any number of threads may load from one array at once."""
    return _xa_load(xa, index, value, False)


cdef inline int xa_load_follow(xarray *xa, uint64_t index, uint64_t *value) noexcept nogil:
    """xa_load for the array's owner (the fault path, under the host lock): a sequential
    stream moves the leaf hint along; the hint check is inlined into the caller."""
    cdef xa_node *leaf = _xa_hint(xa, index)
    if leaf != NULL:
        return _xa_slot_get(leaf, index & XA_CHUNK_MASK, value)
    return _xa_load(xa, index, value, True)


cdef xa_node *_xa_leaf(const xarray *xa, uint64_t index) noexcept nogil:
    """The shift-0 node covering index, walked from the head; NULL if there is none."""
    cdef xa_node *node = xa.head
    cdef uint64_t e
    cdef int shift
    if node == NULL or not _xa_covers(node.shift, index):
        return NULL
    shift = node.shift
    while shift:
        e = node.slots[(index >> shift) & XA_CHUNK_MASK]
        if not _xa_is_node(e):
            return NULL
        node = _xa_to_node(e)
        shift -= XA_CHUNK_SHIFT
    return node


cdef xa_node *xa_leaf(const xarray *xa, uint64_t index) noexcept nogil:
    """index's leaf, hinted or walked, or NULL if it has none. Leaves the hint alone."""
    cdef xa_node *node = _xa_hint(xa, index)
    return node if node != NULL else _xa_leaf(xa, index)


cdef const uint64_t *xa_leaf_slot(const xarray *xa, uint64_t index) noexcept nogil:
    """Where index's slot is in its leaf, found without reading the leaf itself, or NULL if
    index has no leaf: a batch prefetches it for a later lookup. Leaves the hint alone."""
    cdef xa_node *node = xa_leaf(xa, index)
    return &node.slots[index & XA_CHUNK_MASK] if node != NULL else NULL


cdef inline void xa_hint_leaf(xarray *xa, xa_node *leaf, uint64_t index) noexcept nogil:
    """The owner hints leaf, which xa_leaf found for index with no node freed since (the
    array's node_gen unchanged): lookups at index then walk nothing."""
    _xa_set_hint(xa, leaf, index)


cdef inline int _xa_lookup(xarray *xa, uint64_t index, uint64_t *value, uint64_t *first,
                           int *order, bint follow) noexcept nogil:
    cdef int off, k, shift = 0
    cdef uint64_t e
    cdef xa_node *node = _xa_hint(xa, index)
    if node != NULL:                # the hinted leaf, inline: no walk, no call
        off = index & XA_CHUNK_MASK
        e = node.slots[off]
        if _xa_is_sibling(e):
            off = _xa_sibling_off(e)
            e = node.slots[off]
        if not _xa_is_value(e):
            return 0
    else:
        node = _xa_walk_shift(xa, index, &off, &shift, follow)
        if node == NULL:
            return 0
    k = _xa_entry_order_at(node, shift, off)
    value[0] = node.slots[off] >> 1
    order[0] = k
    first[0] = index & ~((((<uint64_t>1) << k) - 1))
    return 1


cdef int xa_lookup(const xarray *xa, uint64_t index, uint64_t *value,
                   uint64_t *first, int *order) noexcept nogil:
    return _xa_lookup(<xarray *>xa, index, value, first, order, False)


cdef int xa_lookup_follow(xarray *xa, uint64_t index, uint64_t *value,
                          uint64_t *first, int *order) noexcept nogil:
    """xa_lookup for the array's owner, about to store at index: the walk may move the hint."""
    return _xa_lookup(xa, index, value, first, order, True)


cdef int xa_get_order(const xarray *xa, uint64_t index) noexcept nogil:
    cdef int off
    cdef xa_node *node = _xa_walk(xa, index, &off)
    if node == NULL:
        return 0
    return _xa_entry_order(node, off)


cdef inline int _xa_store_in_leaf(xarray *xa, xa_node *leaf, uint64_t index, uint64_t value,
                                  uint64_t *old) noexcept nogil:
    """An order-0 store at index in its leaf: onto the whole entry there (1, *old set), or
    into an empty slot (0; no marks to inherit or propagate)."""
    cdef int off = index & XA_CHUNK_MASK
    cdef uint64_t e = leaf.slots[off]
    if _xa_is_sibling(e):
        off = _xa_sibling_off(e)
        e = leaf.slots[off]
    leaf.slots[off] = _xa_mk_value(value)
    if e:
        old[0] = e >> 1
        return 1
    leaf.count += 1
    xa.nr_entries += 1
    xa.nr_by_order[0] += 1
    return 0


cdef inline int xa_store_follow(xarray *xa, uint64_t index, int order, uint64_t value,
                                uint64_t *old) noexcept nogil:
    """xa_store_order where the owner expects index's leaf to be hinted (its *_follow lookup
    of index just missed there, or a sequential stream is filling it): an order-0 store
    into the hinted leaf is inlined into the caller."""
    cdef xa_node *leaf = _xa_hint(xa, index)
    if order == 0 and leaf != NULL:
        return _xa_store_in_leaf(xa, leaf, index, value, old)
    return xa_store_order(xa, index, order, value, old)


cdef int xa_store_order(xarray *xa, uint64_t index, int order, uint64_t value,
                        uint64_t *old) noexcept nogil:
    # Fast path: a store of order 0 onto an existing entry lands on that whole entry,
    # whatever its order, wherever it is found on the way down; in a leaf it may also
    # fill an empty slot.
    cdef xa_node *node
    cdef int shift, off
    cdef uint64_t e
    if order != 0:
        return _xa_store_slow(xa, index, order, value, old)
    node = _xa_hint(xa, index)
    if node != NULL:
        return _xa_store_in_leaf(xa, node, index, value, old)
    node = xa.head
    if node == NULL or not _xa_covers(node.shift, index):
        return _xa_store_slow(xa, index, order, value, old)
    shift = node.shift
    while shift:
        off = (index >> shift) & XA_CHUNK_MASK
        e = node.slots[off]
        if _xa_is_sibling(e):
            off = _xa_sibling_off(e)
            e = node.slots[off]
        if _xa_is_value(e):
            old[0] = e >> 1
            node.slots[off] = _xa_mk_value(value)
            return 1
        if e == 0:
            return _xa_store_slow(xa, index, order, value, old)
        node = _xa_to_node(e)
        shift -= XA_CHUNK_SHIFT
    _xa_follow(xa, node, index)
    return _xa_store_in_leaf(xa, node, index, value, old)


cdef int _xa_store_slow(xarray *xa, uint64_t index, int order, uint64_t value,
                        uint64_t *old) noexcept nogil:
    cdef int target = order - order % XA_CHUNK_SHIFT
    cdef int off, i, m, n, r, shift, had = 0
    cdef uint64_t e
    cdef uint64_t marks[3]
    cdef xa_node *node
    cdef xa_node *child
    r = _xa_expand(xa, index, target)
    if r < 0:
        _xa_shrink(xa)
        return r
    node = xa.head
    shift = node.shift              # carried down, as in _xa_load_from
    while True:
        off = (index >> shift) & XA_CHUNK_MASK
        e = node.slots[off]
        if shift == target:
            break
        shift -= XA_CHUNK_SHIFT
        if e == 0:
            child = _xa_node_alloc(xa, shift, node, off)
            if child == NULL:
                _xa_delete_empty(xa, node)
                return -ENOMEM
            node.slots[off] = _xa_mk_node(child)
            node.count += 1
            node = child
        elif _xa_is_node(e):
            node = _xa_to_node(e)
        else:
            # A larger entry covers the range: the store lands on all of it.
            if _xa_is_sibling(e):
                off = _xa_sibling_off(e)
            old[0] = node.slots[off] >> 1
            node.slots[off] = _xa_mk_value(value)
            return 1
    if order == 0 and e == 0:
        # a new 4K entry in an empty leaf slot (maybe in a leaf made just now): nothing to
        # replace, no marks to inherit or to summarise upwards, nothing to shrink
        node.slots[off] = _xa_mk_value(value)
        node.count += 1
        xa.nr_entries += 1
        xa.nr_by_order[0] += 1
        _xa_follow(xa, node, index)
        return 0
    # An entry whose canonical slot is in this node has an order of at least
    # target, so when order == target there is no need to measure it.
    if _xa_is_sibling(e) or (_xa_is_value(e) and (order == target or _xa_entry_order(node, off) >= order)):
        if _xa_is_sibling(e):
            off = _xa_sibling_off(e)
        old[0] = node.slots[off] >> 1
        node.slots[off] = _xa_mk_value(value)
        return 1
    # Replace whatever lies in [off, off + n): the new entry inherits their marks.
    n = 1 << (order - target)
    if _xa_is_value(e):
        old[0] = e >> 1
        had = 1
    elif _xa_is_node(e):
        # the entry at index (if any) is in the subtree being replaced
        had = _xa_load_from(_xa_to_node(e), index, old)
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
    _xa_shrink(xa)
    return had


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
    if xa.hint != NULL and _xa_leaf(xa, xa.hint_index) != xa.hint:
        return -11                     # the lookup hint is not the leaf of its index
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
