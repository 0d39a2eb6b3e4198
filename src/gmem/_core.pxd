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
    GMEM_CAPI_VERSION = 2

# ---------------------------------------------------------------- lib/xarray.c
cdef enum:
    XA_CHUNK_SHIFT = 6
    XA_CHUNK_SIZE = 64
    XA_CHUNK_MASK = 63
    XA_MAX_MARKS = 3
    XA_MAX_ORDER = 63
    XA_NO_MARK = -1
    XA_NODE_CACHE = 8

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
    xa_node *node_cache         # up to XA_NODE_CACHE freed nodes kept for reuse (not counted)
    xa_node *hint               # a leaf (shift 0) node a sequential stream is in, or NULL
    uint64_t hint_index         # the first index it covers (no node header to read)
    uint64_t node_gen           # bumped when a node is freed: a leaf found earlier (xa_leaf)
                                # is still its index's leaf while node_gen is unchanged
    uint32_t nr_cached
    uint64_t nr_by_order[64]   # entries of each order (nr_indices = sum n << order)

cdef void xa_init(xarray *xa) noexcept nogil
cdef void xa_destroy(xarray *xa) noexcept nogil
# 1 and *value set if an entry covers index, else 0.
cdef int xa_load(const xarray *xa, uint64_t index, uint64_t *value) noexcept nogil
# Like xa_load, also giving the entry's first index and order.
cdef int xa_lookup(const xarray *xa, uint64_t index, uint64_t *value,
                   uint64_t *first, int *order) noexcept nogil
cdef int xa_get_order(const xarray *xa, uint64_t index) noexcept nogil
# The address of index's slot in its leaf node (not read), or NULL: for prefetching.
cdef const uint64_t *xa_leaf_slot(const xarray *xa, uint64_t index) noexcept nogil
# The leaf node (shift 0) covering index, or NULL; for xa_hint_leaf while node_gen holds.
cdef xa_node *xa_leaf(const xarray *xa, uint64_t index) noexcept nogil
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
    PCP_HIGH = 512               # per-cpu list of free 4K pages: drained above this ...
    PCP_BATCH_ORDER = 6          # ... and refilled / drained 64 pages at a time
    FOLIO_CHUNK_SHIFT = 12       # folios are allocated in chunks of 4096 structs
    # folio->flags
    PG_uptodate = 1 << 0         # gmem: "prepared" (kvm_gmem_mark_prepared)
    PG_private = 1 << 1          # folio->private holds data (invalidate_folio policy)
    PG_hwpoison = 1 << 2         # memory failure (kvm_gmem_error_folio)
    PG_leaked = 1 << 3           # snp_leak_pages: never given back to the allocator

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
    int pcp_enabled              # order-0 pages go through pcp (the Host's allocator)
    uint32_t pcp_count
    uint64_t pcp[512]            # free 4K pages kept out of the buddy lists (free_unref_page)
    xarray free_area[19]         # index pfn >> order of each free block
    # folio table: ids index chunked arrays of structs (a struct never moves, so a
    # folio * stays valid while its id is held); id 0 is never used
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
# Give every page on the per-cpu list back to the buddy lists (drain_all_pages).
cdef void phys_drain_pcp(physmem *pm) noexcept nogil
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

# ------------------------------------------- virt/kvm: gmem, memslots, x86 mmu
cdef enum:
    KVM_MAX_VM_TYPES = 32
    KVM_X86_DEFAULT_VM = 0
    KVM_X86_SW_PROTECTED_VM = 1
    KVM_X86_SEV_VM = 2
    KVM_X86_SEV_ES_VM = 3
    KVM_X86_SNP_VM = 4
    KVM_X86_TDX_VM = 5
    PG_LEVEL_4K = 1
    PG_LEVEL_2M = 2
    PG_LEVEL_1G = 3
    KVM_MAX_HUGEPAGE_LEVEL = 3
    KVM_LPAGE_MIXED_FLAG = 1 << 31
    # policies (gmem.Host options)
    GMEM_PREPARE_FAULT = 0          # Linux 6.12+: prepare at the first kvm_gmem_get_pfn
    GMEM_PREPARE_ALLOC = 1          # the RFC: prepare whenever a folio is obtained
    GMEM_TRACK_GMEM = 0             # "prepared" is the folio's uptodate flag
    GMEM_TRACK_ARCH = 1             # gmem does not track; the arch hook must be idempotent
    GMEM_INVALIDATE_FREE_FOLIO = 0
    GMEM_INVALIDATE_INVALIDATE_FOLIO = 1
    # zap filters (enum kvm_gfn_range_filter)
    KVM_FILTER_SHARED = 1
    KVM_FILTER_PRIVATE = 2

# vCPU stats (KVM's names first)
cdef enum:
    VCPU_STAT_PF_TAKEN
    VCPU_STAT_PF_FIXED
    VCPU_STAT_PF_SPURIOUS
    VCPU_STAT_PF_EMULATE
    VCPU_STAT_PF_FAST
    VCPU_STAT_PF_RETRY
    VCPU_STAT_MEMORY_FAULT_EXITS
    VCPU_STAT_SYNTHETIC_CLEARED
    VCPU_NR_STATS

# VM stats (pages_4k/2m/1g are the SPTE xarray's per-order counts)
cdef enum:
    VM_STAT_REMOTE_TLB_FLUSH
    VM_STAT_ZAPPED_SPTES
    VM_STAT_MMU_INVALIDATIONS
    VM_STAT_GMEM_PREPARE
    VM_STAT_GMEM_PREPARE_FAILED
    VM_NR_STATS

# host stats
cdef enum:
    HOST_STAT_FOLIOS_ALLOCATED
    HOST_STAT_FOLIOS_FREED
    HOST_STAT_FOLIO_SPLITS
    HOST_STAT_GMEM_INVALIDATE
    HOST_STAT_GMEM_INVALIDATE_PAGES
    HOST_STAT_ALLOC_FAILURES
    HOST_STAT_HOOK_ERRORS
    HOST_NR_STATS

ctypedef struct gmem_host
ctypedef struct kvm
ctypedef struct gmem_file

# Trace events (kernel tracepoints of the same meaning)
cdef enum:
    TRACE_PAGE_FAULT            # kvm_page_fault: a = gpa, b = 64-bit error code
    TRACE_SPTE_INSTALL          # a = gfn, b = pfn, c = level, d = private
    TRACE_SPTE_ZAP              # a = gfn, b = pfn, c = level
    TRACE_MEMORY_FAULT_EXIT     # a = gpa, b = flags, c = -ret
    TRACE_GMEM_PREPARE          # a = gfn, b = pfn, c = order, d = -ret
    TRACE_GMEM_INVALIDATE       # a = start pfn, b = end pfn
    TRACE_NR_EVENTS

ctypedef struct gmem_trace_rec:
    uint64_t seq
    uint32_t event
    uint32_t vcpu
    uint64_t a
    uint64_t b
    uint64_t c
    uint64_t d

# The per-VM-type hook table (struct kvm_x86_ops, the parts gmem touches).
# NULL means "not implemented" (the kernel's OPTIONAL/OPTIONAL_RET0 ops).
ctypedef int (*is_private_fault_t)(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil
ctypedef int (*gmem_prepare_t)(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil
ctypedef void (*gmem_invalidate_t)(gmem_host *host, uint64_t start, uint64_t end) noexcept nogil
ctypedef int (*private_max_mapping_level_t)(kvm *kvm, uint64_t pfn) noexcept nogil

ctypedef struct kvm_vcpu
ctypedef void (*handle_rmp_fault_t)(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code) noexcept nogil
# TDX's external (S-EPT) page-table ops, for private leaves of the mirror root
ctypedef int (*set_external_spte_t)(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil
ctypedef void (*remove_external_spte_t)(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil

ctypedef struct kvm_x86_hooks:
    is_private_fault_t is_private_fault
    gmem_prepare_t gmem_prepare
    gmem_invalidate_t gmem_invalidate
    private_max_mapping_level_t private_max_mapping_level
    handle_rmp_fault_t handle_rmp_fault
    set_external_spte_t set_external_spte
    remove_external_spte_t remove_external_spte

# SEV-SNP host state (arch/x86/virt/svm/sev.c)
cdef enum:
    SNP_STAT_RMPUPDATE
    SNP_STAT_RMPUPDATE_FAILED
    SNP_STAT_PSMASH
    SNP_STAT_PVALIDATE
    SNP_STAT_RMP_FAULTS
    SNP_STAT_RMP_VIOLATIONS
    SNP_STAT_LEAKED_PAGES
    SNP_STAT_DIRECT_MAP_SPLITS
    SNP_NR_STATS

ctypedef struct snp_rmp:
    int enabled                 # the platform has SNP (an RMP covering all memory)
    xarray entries              # pfn -> raw low qword (struct rmpentry_raw); absent = 0.
                                # A 2M entry is stored at its head only.
    uint64_t nr_2m              # 2M entries among them (none: a lookup reads no head)
    xarray perms                # pfn -> VMPL1..3 permission bytes (RMPADJUST), absent = none
    xarray direct_map_4k        # 2M region (pfn >> 9) -> 1 where the host direct map was split
    xarray leaked               # pfn -> 1: snp_leak_pages
    uint64_t fail_rmpupdate     # fault injection: fail this many RMPUPDATEs ...
    uint32_t fail_rmpupdate_code  # ... with this code
    uint64_t stats[SNP_NR_STATS]

ctypedef struct gmem_host:
    physmem pm
    xarray page_data            # pfn -> malloc'd 4 KiB of contents (absent: zeros)
    xarray user_pages           # VMM userspace memory: hva >> 12 -> folio id
    uint8_t prepare_policy
    uint8_t prepared_tracking
    uint8_t invalidate_policy
    uint8_t huge_folios
    uint8_t reattach_private    # invalidate_folio: re-attach folio->private to tails after a split
    uint8_t scramble_on_conversion  # SW_PROTECTED: a converted page's old contents are garbage
    kvm_x86_hooks hooks[32]
    void *py_host               # borrowed PyObject* of the gmem.Host
    uint64_t fail_prepare       # fault injection: the next prepares fail ...
    int fail_prepare_errno      # ... with -errno
    int invalidate_vm_type      # whose gmem_invalidate is running (it gets no kvm)
    int hook_error              # a Python hook raised: stop and re-raise at the boundary
    uint64_t stats[HOST_NR_STATS]
    gmem_trace_rec *trace_buf   # ring of trace_cap records; trace_seq counts all written
    uint64_t trace_cap
    uint64_t trace_seq
    uint32_t trace_mask         # enabled events (1 << TRACE_*)
    snp_rmp rmp
    uint8_t content_memfd       # gmem exec: inode contents in memfds (_contents_memfd.pxi)
    xarray content_inodes       # ... ino -> gmem_inode * of those inodes

ctypedef struct gmem_inode:
    gmem_host *host
    uint64_t size               # bytes (i_size)
    uint64_t flags              # GUEST_MEMFD_FLAG_*
    uint32_t ino
    int vm_type                 # of the VM that created it: whose gmem_invalidate runs
    xarray filemap              # page index -> folio id
    gmem_file *files            # the files on this inode (6.18: exactly one)
    int memfd                   # content_memfd: the memfd holding the contents, else -1
    unsigned char *contents     # ... mapped here (NULL: contents in the host's page_data)

ctypedef struct gmem_file:
    gmem_inode *inode
    kvm *kvm
    xarray bindings             # page index -> memslot index
    gmem_file *next             # next file of the inode
    int released
    int inval_begun             # inside kvm_gmem_invalidate_begin/end

ctypedef struct kvm_memory_slot:
    uint64_t base_gfn
    uint64_t npages
    uint64_t userspace_addr
    uint64_t gmem_pgoff
    gmem_file *gmem_file        # NULL when unbound or its file was closed
    uint32_t *lpage_info[2]     # disallow_lpage per 2M and 1G page (KVM_LPAGE_MIXED_FLAG)
    uint32_t flags
    uint32_t id                 # as_id << 16 | slot id
    int used

ctypedef struct kvm:
    gmem_host *host
    void *py_vm                 # borrowed PyObject* of the gmem.Vm
    int vm_type
    int has_private_mem
    int has_protected_state
    int pre_fault_allowed
    uint64_t gfn_direct_bits    # TDX: the shared bit, as a gfn mask
    uint32_t asid
    kvm_memory_slot *memslots
    uint32_t nr_memslots        # entries in memslots (used or not)
    xarray slot_index           # slot id (as_id << 16 | id) -> memslots index
    xarray gfn_to_slot          # gfn -> memslots index (address space 0)
    int64_t last_used_slot      # memslots index of the last lookup (kvm_vcpu.last_used_slot)
    uint64_t attr_memo_first    # the entry of the last attribute lookup: [first, last] hold
    uint64_t attr_memo_last     # attr_memo_val, valid until attributes change
    uint64_t attr_memo_val
    int attr_memo_valid
    xarray mem_attr_array       # gfn -> memory attributes
    xarray sptes                # gfn -> spte (multi-index for huge mappings)
    xarray mmio_sptes           # gfn -> the memslot generation it was made in
    uint64_t memslots_generation  # bumped by every memslot change (kvm_memslots.generation)
    uint64_t mmu_invalidate_seq
    int64_t mmu_invalidate_in_progress
    uint64_t mmu_invalidate_range_start
    uint64_t mmu_invalidate_range_end
    uint64_t inject_inval_start # fault injection: an invalidation between faultin and map
    uint64_t inject_inval_end
    uint64_t stats[VM_NR_STATS]
    uint64_t hypercall_exit_enabled   # KVM_CAP_EXIT_HYPERCALL bitmap
    int launch_state            # SNP: 0 running, 1 launch started; TDX: enum kvm_tdx_state
    xarray sept                 # TDX mirror: gfn -> pfn << 4 | TDX_SEPT_* state
    int64_t nr_premapped        # TDX: mirror leaves mapped before finalize, not yet PAGE.ADDed
    uint64_t tdx_stats[8]

ctypedef struct kvm_vcpu:
    kvm *kvm
    uint32_t vcpu_id
    uint64_t stats[VCPU_NR_STATS]

# One fault's outcome, laid out as gmem.FAULT_DTYPE.
ctypedef struct kvm_fault_out:
    int32_t ret                 # RET_PF_* or -errno
    uint32_t exit_reason        # 0 or KVM_EXIT_MEMORY_FAULT
    uint64_t pfn
    uint64_t gpa                # memory_fault.gpa
    uint64_t flags              # memory_fault.flags
    uint8_t level

cdef int kvm_mmu_page_fault(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                            kvm_fault_out *out) noexcept nogil
cdef int kvm_gmem_get_pfn(kvm *kvm, kvm_memory_slot *slot, uint64_t gfn, uint64_t *pfn,
                          int *max_order) noexcept nogil
cdef kvm_memory_slot *gfn_to_memslot(kvm *kvm, uint64_t gfn) noexcept nogil
cdef int kvm_mem_is_private(kvm *kvm, uint64_t gfn) noexcept nogil

# Handles -> structs, for Cython code driving the model without Python objects:
#   from gmem._core cimport kvm_vcpu, kvm_fault_out, kvm_mmu_page_fault, gmem_vcpu_ptr
#   cdef kvm_vcpu *v = gmem_vcpu_ptr(vcpu)        # vcpu: a gmem.Vcpu
#   with nogil:
#       kvm_mmu_page_fault(v, gpa, error_code, &out)
# The pointers stay valid while the Python objects live (and the VM is not destroyed).
cdef kvm_vcpu *gmem_vcpu_ptr(object vcpu) except NULL
cdef kvm *gmem_vm_ptr(object vm) except NULL
cdef gmem_host *gmem_host_ptr(object host) except NULL
