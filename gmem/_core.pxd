# cython: language_level=3
# The C-level API of gmem's core, for the rest of the core and for other Cython
# projects (`from gmem._core cimport ...`).  Every function here is
# `noexcept nogil`: results come back as return codes (0 or a negative errno, as
# in the kernel), never as Python exceptions.
#
# Layers, bottom up (each a section of _core.pyx, named after its kernel file):
#   lib/xarray.c  -> xarray:  a radix tree of 64-slot nodes with multi-index entries
#   mm/page_alloc.c, mm/filemap.c -> physmem: buddy allocator + folio table
#
# GMEM_CAPI_VERSION changes whenever a declaration below changes incompatibly.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

cdef enum:
    GMEM_CAPI_VERSION = 1

# ---------------------------------------------------------------- lib/xarray.c
cdef enum:
    XA_CHUNK_SHIFT = 6
    XA_CHUNK_SIZE = 64
    XA_CHUNK_MASK = 63
    XA_MAX_MARKS = 3
    XA_MAX_ORDER = 63
    XA_NO_MARK = -1

# A slot holds 0 (empty), a value (v << 1 | 1, like xa_mk_value), a sibling
# (canonical offset << 2 | 2, like xa_mk_sibling) or a pointer to a child node.
ctypedef struct xa_node:
    uint8_t shift          # each slot covers 1 << shift indices
    uint8_t offset         # this node's slot in its parent
    uint8_t count          # occupied slots (entries, siblings and children)
    xa_node *parent
    uint64_t marks[3]      # per slot; for a child: set if any entry below is marked
    uint64_t slots[64]

ctypedef struct xarray:
    xa_node *head
    uint64_t nr_entries
    uint64_t nr_nodes
    uint64_t nr_by_order[64]   # entries of each order (nr_indices = sum n << order)

cdef void xa_init(xarray *xa) noexcept nogil
cdef void xa_destroy(xarray *xa) noexcept nogil
# 1 and *value set if an entry covers index, else 0.
cdef int xa_load(const xarray *xa, uint64_t index, uint64_t *value) noexcept nogil
# Like xa_load, also giving the entry's first index and order.
cdef int xa_lookup(const xarray *xa, uint64_t index, uint64_t *value,
                   uint64_t *first, int *order) noexcept nogil
cdef int xa_get_order(const xarray *xa, uint64_t index) noexcept nogil
# Store value over the naturally aligned range of 1 << order indices at index
# (index must be aligned).  A store into part of a larger entry stores at every
# index of that entry; smaller entries inside the range are replaced by one entry.
# Returns 1 (*old = the previous value at index) or 0 (was empty), or -ENOMEM.
cdef int xa_store_order(xarray *xa, uint64_t index, int order, uint64_t value,
                        uint64_t *old) noexcept nogil
# Cover [first, last] (inclusive) with maximal aligned entries.  0 or -ENOMEM.
cdef int xa_store_range(xarray *xa, uint64_t first, uint64_t last, uint64_t value) noexcept nogil
# Erase the whole entry covering index: 1 (*old set) or 0.
cdef int xa_erase(xarray *xa, uint64_t index, uint64_t *old) noexcept nogil
# Erase every entry overlapping [first, last]; returns the number erased.
cdef uint64_t xa_erase_range(xarray *xa, uint64_t first, uint64_t last) noexcept nogil
# Split the entry covering index into entries of order; each keeps the value and
# marks.  0, -ENOENT (no entry), -EINVAL (order not below the entry's), -ENOMEM.
cdef int xa_split(xarray *xa, uint64_t index, int order) noexcept nogil
# The lowest entry overlapping [start, last] (with mark set, unless mark is
# XA_NO_MARK): 1 with its first index, order and value, or 0.
cdef int xa_find_entry(const xarray *xa, uint64_t start, uint64_t last, int mark,
                       uint64_t *first, int *order, uint64_t *value) noexcept nogil
# xa_find: *index = max(start, first index of the entry found).
cdef int xa_find(const xarray *xa, uint64_t *index, uint64_t last, int mark,
                 uint64_t *value) noexcept nogil
# xa_find_after: the first entry starting after the entry covering *index.
cdef int xa_find_after(const xarray *xa, uint64_t *index, uint64_t last, int mark,
                       uint64_t *value) noexcept nogil
cdef void xa_set_mark(xarray *xa, uint64_t index, int mark) noexcept nogil
cdef void xa_clear_mark(xarray *xa, uint64_t index, int mark) noexcept nogil
cdef int xa_get_mark(const xarray *xa, uint64_t index, int mark) noexcept nogil
cdef size_t xa_memory_bytes(const xarray *xa) noexcept nogil
# Internal consistency (counts, siblings, marks, parents): 0 or a negative code.
cdef int xa_check(const xarray *xa) noexcept nogil

# ------------------------------------------------- mm/page_alloc.c, mm/filemap.c
cdef enum:
    MAX_PAGE_ORDER = 18          # largest buddy block: 1 GiB of 4 KiB pages
    NR_PAGE_ORDERS = 19
    FOLIO_CHUNK_SHIFT = 12       # folios are allocated in chunks of 4096 structs
    # folio->flags
    PG_uptodate = 1 << 0         # gmem: "prepared" (kvm_gmem_mark_prepared)
    PG_private = 1 << 1          # folio->private holds data (invalidate_folio policy)
    PG_hwpoison = 1 << 2         # memory failure (kvm_gmem_error_folio)

ctypedef struct folio:
    uint64_t pfn
    uint64_t index         # offset in its mapping, in pages
    uint64_t private       # the owner's private word (folio->private)
    uint32_t mapping       # owner inode id, 0 = none
    int32_t refcount
    uint8_t order
    uint8_t flags

# Host physical memory: pfns [start_pfn, end_pfn).  Pfns at and above the
# watermark have never been handed out and take no memory to describe, so a
# host of 16 TiB costs nothing until it is used.
ctypedef struct physmem:
    uint64_t start_pfn
    uint64_t end_pfn
    uint64_t watermark
    uint64_t nr_free_pages
    uint64_t fail_alloc          # fault injection: fail this many allocations
    xarray free_area[19]         # index pfn >> order of each free block
    # folio table: ids index chunked arrays of structs; id 0 is never used
    folio **folio_chunks
    uint32_t nr_chunks
    uint32_t folio_next_id       # ids below this have been handed out once
    uint32_t folio_free_id       # head of the list of released ids (0 = none)
    uint64_t nr_folios
    xarray memmap                # pfn -> folio id (multi-index: the folio's order)

cdef int phys_init(physmem *pm, uint64_t start_pfn, uint64_t nr_pages) noexcept nogil
cdef void phys_destroy(physmem *pm) noexcept nogil
# Allocate a naturally aligned block: 0 with *pfn set, or -ENOMEM.
cdef int phys_alloc(physmem *pm, int order, uint64_t *pfn) noexcept nogil
# Return a block (coalescing with free buddies).  The caller guarantees it was allocated.
cdef void phys_free(physmem *pm, uint64_t pfn, int order) noexcept nogil
# 0 if [pfn, pfn + 1 << order) is wholly allocated, else -EINVAL (free or out of range).
cdef int phys_check_allocated(const physmem *pm, uint64_t pfn, int order) noexcept nogil
cdef uint64_t phys_nr_free_blocks(const physmem *pm, int order) noexcept nogil

cdef folio *folio_get(const physmem *pm, uint32_t id) noexcept nogil
# 0 and *id, or -ENOMEM.  The folio starts with refcount 1, no mapping, no flags.
cdef int folio_alloc(physmem *pm, int order, uint32_t *id) noexcept nogil
# Drop the folio and give its pages back to the allocator.
cdef void folio_free(physmem *pm, uint32_t id) noexcept nogil
# Split into folios of new_order (head keeps id and private word; tails are new
# ids with the same mapping, consecutive indices and flags).  0 or -ENOMEM.
cdef int folio_split(physmem *pm, uint32_t id, int new_order) noexcept nogil
# The folio containing pfn: its id, or 0.
cdef uint32_t pfn_folio(const physmem *pm, uint64_t pfn) noexcept nogil
