# Python handles on the lib/ and mm/ structures themselves: gmem.XArray (lib/xarray.c) and
# gmem.PhysMem (a buddy allocator with its folio table), for tests, benchmarks and users
# who want the data structures alone.


cdef int _mark_one(object mark) except -2:
    """A mark for set/clear/get_mark: one of XA_MARK_0..2 (None names no mark)."""
    if mark is None:
        raise ValueError("mark must be 0, 1 or 2 (XA_MARK_0..2), not None")
    return _mark_arg(mark)


cdef object _folio_dict(const physmem *pm, uint64_t pfn):
    """The folio containing pfn as a dict, or None."""
    cdef uint32_t id = pfn_folio(pm, pfn)
    cdef folio *f
    if id == 0:
        return None
    f = folio_get(pm, id)
    return dict(pfn=f.pfn, order=f.order, flags=f.flags, refcount=f.refcount,
                mapping=f.mapping, index=f.index, private=f.private)


cdef list _xa_entries(const xarray *xa):
    """Every entry as (first index, order, value), ascending: for the cold paths that list or
    check a whole array."""
    cdef uint64_t start = 0, first, v, end
    cdef int order
    out = []
    while xa_find_entry(xa, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        out.append((first, order, v))
        end = first + ((((<uint64_t>1) << order) - 1))
        if end == <uint64_t>0xFFFFFFFFFFFFFFFF:
            break
        start = end + 1
    return out


cdef class XArray:
    """lib/xarray.c: 64-bit indices -> 63-bit values, with multi-index entries and 3 marks.

    Storing into any index of a multi-index entry stores at every index of it;
    erasing any index erases all of it; marks apply to the whole entry.
    """
    cdef xarray xa
    cdef xa_state xas           # load() and store() walk from where the last one ended

    def __cinit__(self):
        xa_init(&self.xa)
        xas_init(&self.xas, &self.xa, 0)

    def __dealloc__(self):
        xa_destroy(&self.xa)

    def load(self, index):
        """xa_load: the value at index, or None."""
        cdef uint64_t v
        xas_set(&self.xas, _u64(index, "index"))
        if xas_load(&self.xas, &v):
            return v
        return None

    def store(self, index, value, order=0):
        """xa_store_order: store over the aligned 2**order indices at index; returns the old value or None."""
        cdef uint64_t i = _u64(index, "index"), v, old
        cdef int o = _order_arg(order, XA_MAX_ORDER), r
        v = _u64(value, "value")
        if v > _VALUE_MAX:
            raise ValueError(f"value {value} does not fit in 63 bits (xa_mk_value)")
        if i & ((((<uint64_t>1) << o)) - 1):
            raise ValueError(f"index {index:#x} is not aligned to order {o}")
        xas_set(&self.xas, i)
        r = xas_store(&self.xas, o, v, &old)
        if r < 0:
            raise MemoryError("xa_store: out of memory")
        return old if r else None

    def erase(self, index):
        """xa_erase: remove the whole entry covering index; returns its value or None."""
        cdef uint64_t old
        if xa_erase(&self.xa, _u64(index, "index"), &old):
            return old
        return None

    def erase_range(self, first, last):
        """Erase every entry overlapping [first, last]; returns how many."""
        cdef uint64_t f = _u64(first, "first"), l = _u64(last, "last")
        if f > l:
            raise ValueError(f"first {first:#x} > last {last:#x}")
        return xa_erase_range(&self.xa, f, l)

    def store_range(self, first, last, value):
        """xa_store_range: cover [first, last] (inclusive) with maximal aligned entries."""
        cdef uint64_t f = _u64(first, "first"), l = _u64(last, "last"), v = _u64(value, "value")
        if f > l:
            raise ValueError(f"first {first:#x} > last {last:#x}")
        if v > _VALUE_MAX:
            raise ValueError(f"value {value} does not fit in 63 bits (xa_mk_value)")
        if xa_store_range(&self.xa, f, l, v) < 0:
            raise MemoryError("xa_store_range: out of memory")

    def get_order(self, index):
        """xa_get_order: the order of the entry covering index (0 if none)."""
        return xa_get_order(&self.xa, _u64(index, "index"))

    def split(self, index, order):
        """xas_split: the entry covering index becomes entries of order, same value and marks.
        MemoryError, before anything is allocated, for a split whose new nodes need more memory
        than the machine has (an order-63 entry into pages: 2**57 nodes)."""
        cdef uint64_t i = _u64(index, "index")
        cdef int o = _order_arg(order, XA_MAX_ORDER), k = xa_get_order(&self.xa, i)
        cdef int leaf = o - o % XA_CHUNK_SHIFT        # the shift of the nodes that hold order o
        if k >= leaf + XA_CHUNK_SHIFT and o < k:
            # 2 ** (k - leaf - 6) full nodes, plus at most as many above them
            need = (2 << <object>(k - leaf - XA_CHUNK_SHIFT)) * sizeof(xa_node)
            import os
            if need > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
                raise MemoryError(f"xa_split: splitting an order-{k} entry into order {o} needs "
                                  f"{need} bytes of nodes, more than this machine's memory")
        cdef int r = xa_split(&self.xa, i, o)
        if r == -ENOENT:
            raise ValueError(f"no entry at index {index:#x} to split")
        if r == -EINVAL:
            raise ValueError(f"split order {order} is not below the entry's order "
                             f"{xa_get_order(&self.xa, index)}")
        if r < 0:
            raise MemoryError("xa_split: out of memory")

    def find(self, start=0, last=_U64_MAX, mark=None):
        """xa_find: (index, value) of the first entry at or after start (index >= start), or None."""
        cdef uint64_t i = _u64(start, "start"), l = _u64(last, "last"), v
        if xa_find(&self.xa, &i, l, _mark_arg(mark), &v):
            return (i, v)
        return None

    def find_after(self, index, last=_U64_MAX, mark=None):
        """xa_find_after: (index, value) of the first entry after the one covering index, or None."""
        cdef uint64_t i = _u64(index, "index"), l = _u64(last, "last"), v
        if xa_find_after(&self.xa, &i, l, _mark_arg(mark), &v):
            return (i, v)
        return None

    def items(self, first=0, last=_U64_MAX, mark=None):
        """Iterate (first_index, order, value) over the entries overlapping [first, last]
        (arguments are checked at the call)."""
        return self._items(_u64(first, "first"), _u64(last, "last"), _mark_arg(mark))

    def _items(self, uint64_t start, uint64_t l, int m):
        cdef uint64_t f, v, end
        cdef int k
        while xa_find_entry(&self.xa, start, l, m, &f, &k, &v):
            yield (f, k, v)
            end = f + ((((<uint64_t>1) << k) - 1))
            if end >= l:
                return
            start = end + 1

    def set_mark(self, index, mark):
        xa_set_mark(&self.xa, _u64(index, "index"), _mark_one(mark))

    def clear_mark(self, index, mark):
        xa_clear_mark(&self.xa, _u64(index, "index"), _mark_one(mark))

    def get_mark(self, index, mark):
        return bool(xa_get_mark(&self.xa, _u64(index, "index"), _mark_one(mark)))

    def __len__(self):
        return self.xa.nr_entries

    @property
    def nr_indices(self):
        """Indices covered by all entries (an int: may exceed 2**64 - 1 only in theory)."""
        return sum(int(self.xa.nr_by_order[k]) << k for k in range(64))

    @property
    def nr_nodes(self):
        return self.xa.nr_nodes

    @property
    def node_gen(self):
        """Moves by one per node freed (from a value unique to this array): a node a cursor
        found earlier is still on its index's path while this holds."""
        return self.xa.node_gen

    @property
    def memory_bytes(self):
        return xa_memory_bytes(&self.xa)

    def check(self):
        """Raise AssertionError if the tree's internal bookkeeping is inconsistent."""
        cdef int r = xa_check(&self.xa)
        if r < 0:
            raise AssertionError(f"xarray inconsistent (xa_check code {r})")

    # ------------------------------------------------------------ batch calls
    def load_many(self, indices):
        """xa_load over a uint64 array: (values uint64, present bool) arrays."""
        cdef const uint64_t[::1] idx = _u64_array(indices, "indices")
        cdef Py_ssize_t n = idx.shape[0], i
        out = np.zeros(n, dtype=np.uint64)
        present = np.zeros(n, dtype=np.bool_)
        cdef uint64_t[::1] o = out
        cdef cnp.npy_bool[::1] p = present
        cdef xa_state xas               # this call's own: parallel readers each walk theirs
        xas_init(&xas, &self.xa, 0)
        with nogil:
            for i in range(n):
                xas_set(&xas, idx[i])
                p[i] = xas_load(&xas, &o[i])
        return out, present

    def store_many(self, indices, values, order=0):
        """xa_store_order for each (index, value) pair, in order."""
        cdef const uint64_t[::1] idx = _u64_array(indices, "indices")
        cdef const uint64_t[::1] val = _u64_array(values, "values")
        cdef int o = _order_arg(order, XA_MAX_ORDER), r = 0
        cdef Py_ssize_t n = idx.shape[0], i
        cdef uint64_t old, mask = (((<uint64_t>1) << o)) - 1
        cdef xa_state xas
        xas_init(&xas, &self.xa, 0)
        if val.shape[0] != n:
            raise ValueError("indices and values differ in length")
        arr = np.asarray(val)
        if n and (int(arr.max()) > _VALUE_MAX or np.any(np.asarray(idx) & mask)):
            raise ValueError("a value does not fit in 63 bits or an index is not aligned to the order")
        with nogil:
            for i in range(n):
                xas_set(&xas, idx[i])
                r = xas_store(&xas, o, val[i], &old)
                if r < 0:
                    break
        if r < 0:
            raise MemoryError("xa_store: out of memory")


cdef class PhysMem:
    """Host physical memory: a buddy allocator (orders 0..18) and the folio table.

    `memory` is in bytes (a multiple of 4096); pfns run from start_pfn.  Nothing
    is spent on memory that has never been allocated.
    """
    cdef physmem pm

    def __cinit__(self, memory, start_pfn=0):
        cdef uint64_t nbytes = _u64(memory, "memory"), start = _u64(start_pfn, "start_pfn")
        if nbytes == 0 or nbytes & 4095:
            raise ValueError(f"memory {memory} must be a positive multiple of 4096 bytes")
        if start + (nbytes >> 12) < start:
            raise ValueError("start_pfn + pages overflows")
        phys_init(&self.pm, start, nbytes >> 12)

    def __dealloc__(self):
        phys_destroy(&self.pm)

    @property
    def start_pfn(self):
        return self.pm.start_pfn

    @property
    def end_pfn(self):
        return self.pm.end_pfn

    @property
    def nr_pages(self):
        return self.pm.end_pfn - self.pm.start_pfn

    @property
    def nr_free_pages(self):
        return self.pm.nr_free_pages

    @property
    def watermark(self):
        """Pfns from here to end_pfn have never been allocated."""
        return self.pm.watermark

    def alloc(self, order=0):
        """A free, naturally aligned block of 2**order pages: its first pfn. ENOMEM when exhausted."""
        cdef uint64_t pfn
        if phys_alloc(&self.pm, _order_arg(order, MAX_PAGE_ORDER), &pfn) < 0:
            raise OSError(ENOMEM, f"no free block of order {order}")
        return pfn

    def free(self, pfn, order=0):
        """Give a block back (coalescing with its buddies)."""
        cdef uint64_t p = _u64(pfn, "pfn"), first, v
        cdef int o = _order_arg(order, MAX_PAGE_ORDER), k
        if p < self.pm.start_pfn or p >= self.pm.end_pfn:
            raise OSError(EINVAL, f"pfn {pfn:#x} is outside host memory")
        if p & ((((<uint64_t>1) << o)) - 1):
            raise OSError(EINVAL, f"pfn {pfn:#x} is not aligned to order {o}")
        if phys_check_allocated(&self.pm, p, o) < 0:
            raise OSError(EINVAL, f"block {pfn:#x} order {o} is not allocated (double free?)")
        if xa_find_entry(&self.pm.memmap, p, p + (((<uint64_t>1) << o)) - 1, XA_NO_MARK,
                         &first, &k, &v):
            raise OSError(EINVAL, f"block {pfn:#x} holds a folio: release it with folio_put")
        phys_free(&self.pm, p, o)

    def alloc_many(self, n, order=0):
        """n allocations of 2**order pages (benchmarks): a uint64 array of pfns; ENOMEM frees them all."""
        cdef int o = _order_arg(order, MAX_PAGE_ORDER), r = 0
        cdef Py_ssize_t count = _u64(n, "n"), i, j
        out = np.empty(count, dtype=np.uint64)
        cdef uint64_t[::1] pfns = out
        with nogil:
            for i in range(count):
                r = phys_alloc(&self.pm, o, &pfns[i])
                if r < 0:
                    for j in range(i):
                        phys_free(&self.pm, pfns[j], o)
                    break
        if r < 0:
            raise OSError(ENOMEM, f"no free block of order {order}")
        return out

    def free_many(self, pfns, order=0):
        """Free blocks from alloc_many. Every block is checked first, as free() checks one (in
        host memory, aligned, allocated, holding no folio), and given at most once: a refused
        call frees nothing."""
        cdef const uint64_t[::1] p = _u64_array(pfns, "pfns")
        cdef int o = _order_arg(order, MAX_PAGE_ORDER), k
        cdef Py_ssize_t i, bad = -1
        cdef uint64_t first, v
        if p.shape[0] > 1 and np.unique(np.asarray(p)).shape[0] != p.shape[0]:
            raise OSError(EINVAL, "a block is given twice (double free)")
        with nogil:
            for i in range(p.shape[0]):
                if phys_check_allocated(&self.pm, p[i], o) < 0 or xa_find_entry(
                        &self.pm.memmap, p[i], p[i] + (((<uint64_t>1) << o)) - 1, XA_NO_MARK, &first, &k, &v):
                    bad = i
                    break
        if bad >= 0:
            raise OSError(EINVAL, f"block {p[bad]:#x} order {o} is not allocated (double free?) "
                          "or holds a folio")
        with nogil:
            for i in range(p.shape[0]):
                phys_free(&self.pm, p[i], o)

    def free_blocks(self):
        """Free blocks per order 0..18 (untouched memory counted as maximal aligned blocks)."""
        return [phys_nr_free_blocks(&self.pm, o) for o in range(NR_PAGE_ORDERS)]

    # ------------------------------------------------------------------ folios
    def folio_alloc(self, order=0):
        """A new folio (refcount 1): its pfn."""
        cdef uint32_t id
        if folio_alloc(&self.pm, _order_arg(order, MAX_PAGE_ORDER), &id) < 0:
            raise OSError(ENOMEM, f"no memory for a folio of order {order}")
        return folio_get(&self.pm, id).pfn

    cdef uint32_t _folio_head(self, pfn) except 0:
        cdef uint32_t id = pfn_folio(&self.pm, _u64(pfn, "pfn"))
        if id == 0:
            raise OSError(EINVAL, f"pfn {pfn:#x} is not in a folio")
        if folio_get(&self.pm, id).pfn != pfn:
            raise OSError(EINVAL, f"pfn {pfn:#x} is not the head of its folio")
        return id

    def folio_put(self, pfn):
        """Drop a reference to the folio headed at pfn; the last one frees it."""
        cdef uint32_t id = self._folio_head(pfn)
        cdef folio *f = folio_get(&self.pm, id)
        f.refcount -= 1
        if f.refcount == 0:
            folio_free(&self.pm, id)

    def folio_split(self, pfn, order):
        """Split the folio headed at pfn into folios of order."""
        cdef uint32_t id = self._folio_head(pfn)
        cdef int o = _order_arg(order, MAX_PAGE_ORDER)
        if o >= folio_get(&self.pm, id).order:
            raise OSError(EINVAL, f"split order {o} is not below the folio's order")
        if folio_split(&self.pm, id, o) < 0:
            raise OSError(ENOMEM, "no memory to split the folio")

    def folio(self, pfn):
        """The folio containing pfn as a dict, or None."""
        return _folio_dict(&self.pm, _u64(pfn, "pfn"))

    def folios(self):
        """(pfn, order) of every folio, in pfn order."""
        return [(f, k) for f, k, v in _xa_entries(&self.pm.memmap)]

    @property
    def nr_folios(self):
        return self.pm.nr_folios

    @property
    def memory_bytes(self):
        """Bytes of C memory describing this host memory (free areas, memmap, folio table)."""
        return sizeof(physmem) + phys_memory_bytes(&self.pm)

    def inject_alloc_failures(self, n):
        """Make the next n allocations fail with ENOMEM (fault injection)."""
        self.pm.fail_alloc = _u64(n, "n")

    def check(self):
        """Cross-check the free areas, the watermark, the folio table and the counters
        (gmem.InvariantError, an AssertionError, names the first inconsistency)."""
        cdef char buf[1024]
        if phys_check(&self.pm, buf, sizeof(buf)):
            raise _InvariantError(buf.decode())


