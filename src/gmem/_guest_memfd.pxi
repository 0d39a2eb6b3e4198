# virt/kvm/guest_memfd.c: the gmem inode (filemap of folios), its files and their bindings
# to memslots, KVM_CREATE_GUEST_MEMFD, fallocate (allocation, hole punching), mmap and the
# host fault on a mapping, release, kvm_gmem_get_pfn with the arch's prepare hook,
# kvm_gmem_populate, and the memory-failure handler.  Every rule returns 0 or -errno and
# names itself in host->reason.
#
# AS_INACCESSIBLE: nothing here reads or writes a folio's contents except zeroing a page
# before it is first prepared (kvm_gmem_prepare_folio) and the host fault on a mapping
# (6.18's GUEST_MEMFD_FLAG_MMAP); truncation and splitting never touch pages.

cdef enum:
    HPAGE_ORDER = 9
    MAX_LFS_FILESIZE = 0x7FFFFFFFFFFFFFFF
    # the VFS calls a guest_memfd has no operation for (kvm_gmem_vfs_op)
    GMEM_VFS_READ = 0
    GMEM_VFS_WRITE = 1
    GMEM_VFS_PREAD = 2
    GMEM_VFS_PWRITE = 3
    GMEM_VFS_LSEEK = 4
    GMEM_VFS_FTRUNCATE = 5
    # include/uapi/asm-generic/mman*.h
    PROT_READ = 0x1
    PROT_WRITE = 0x2
    PROT_EXEC = 0x4
    MAP_SHARED = 0x01
    MAP_PRIVATE = 0x02
    MAP_SHARED_VALIDATE = 0x03
    LEGACY_MAP_MASK = 0x407f933
    # kvm_gmem_fault_user_mapping's outcomes besides 0 (VM_FAULT_SIGBUS and its reason)
    GMEM_FAULT_SIGBUS_EOF = 1
    GMEM_FAULT_SIGBUS_PRIVATE = 2
    # "next": in-place conversion (include/uapi/linux/kvm.h as of v8/v13)
    KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250
    # content modes in kvm_memory_attributes2.flags: RFC v4/v5 only (Host(content_modes=True))
    KVM_SET_MEMORY_ATTRIBUTES2_ZERO = 1 << 0
    KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE = 1 << 1


# ------------------------------------------------------------------ folios

cdef inline int kvm_gmem_alloc_folio(gmem_inode *inode, uint64_t index, int order, uint32_t *id) noexcept nogil:
    """__filemap_get_folio_mpol's allocation: by the inode's policy at index (mbind, 6.19+;
    mpol_shared_policy_lookup only for an absent folio), else the local node first."""
    cdef uint64_t first, last
    cdef uint64_t pol = mt_load(&inode.policy, index, &first, &last) if inode.host.pm.nr_nodes > 1 else 0
    return mpol_folio_alloc(inode.host, pol, order, id) if pol else folio_alloc(&inode.host.pm, order, id)


cdef int kvm_gmem_set_policy(gmem_inode *inode, uint64_t pgoff, uint64_t npages, uint64_t pol) noexcept nogil:
    """kvm_gmem_set_policy (.set_policy of the mapping, 6.19+): mpol_set_shared_policy over
    the pages; the folios there stay where they are. Before 6.19 the mapping has no
    .set_policy: mbind succeeds on the VMA and guest_memfd never sees it."""
    if inode.host.kernel < GMEM_KERNEL_7_2 or npages == 0:
        return 0
    if mt_preallocate(&inode.policy) < 0:
        return _refuse(inode.host, -ENOMEM, "mbind: out of memory")
    mt_store(&inode.policy, pgoff, pgoff + npages - 1, pol)
    return 0


cdef uint64_t kvm_gmem_get_policy(gmem_inode *inode, uint64_t index) noexcept nogil:
    """kvm_gmem_get_policy: the shared policy at index (0, MPOL_DEFAULT: none was set)."""
    cdef uint64_t first, last
    return mt_load(&inode.policy, index, &first, &last)


cdef inline int kvm_gmem_get_folio(gmem_inode *inode, xa_state *xas, uint64_t index,
                                   uint32_t *id) noexcept nogil:
    """filemap_grab_folio: the folio at index, allocated if absent (2M when
    huge_folios allows: an aligned, empty 2M range inside i_size). xas: the caller's
    cursor, on the filemap or elsewhere."""
    cdef uint64_t v, old
    cdef int order
    cdef gmem_host *host = inode.host
    cdef uint32_t i
    cdef folio *f
    xas_set_xa(xas, &inode.filemap, index)
    if xas_load(xas, &v):
        id[0] = <uint32_t>v
        return 0
    if kvm_gmem_alloc_huge(inode, index, &i) < 0:
        host.stats[HOST_STAT_ALLOC_FAILURES] += 1
        return -ENOMEM
    f = folio_get(&host.pm, i)
    order = f.order
    f.mapping = inode.ino
    f.index = index & ~_mask(order)
    xas_set(xas, f.index)
    if xas_store(xas, order, i, &old) < 0:
        kvm_gmem_free_huge(inode, folio_free(&host.pm, i))
        host.stats[HOST_STAT_ALLOC_FAILURES] += 1
        return -ENOMEM
    host.stats[HOST_STAT_FOLIOS_ALLOCATED] += 1
    id[0] = i
    if order and host.huge_split == GMEM_HUGE_SPLIT_FRESH and not kvm_gmem_range_private(
            inode, f.index, _pages(order)):
        # __maybe_split_fresh_folio: huge only if every page of it is private
        if kvm_gmem_split_to(inode, f.index, i, 0) == 0:
            xa_load(&inode.filemap, index, &v)
            id[0] = <uint32_t>v
        xas_set_xa(xas, &inode.filemap, index)       # the split rebuilt the leaf
    return 0


cdef void kvm_gmem_free_folio(gmem_inode *inode, uint32_t id) noexcept nogil:
    """.free_folio: the invalidate hook sees only the pfn range, then the pages go back."""
    cdef gmem_host *host = inode.host
    cdef folio *f = folio_get(&host.pm, id)
    cdef uint64_t start = f.pfn, end = f.pfn + _pages(f.order)
    cdef gmem_invalidate_t hook = host.hooks[inode.vm_type].gmem_invalidate
    # .free_folio sees every folio; .invalidate_folio only those with private data
    if host.invalidate_policy == GMEM_INVALIDATE_INVALIDATE_FOLIO and not (f.flags & PG_private):
        hook = NULL
    if hook != NULL:
        host.stats[HOST_STAT_GMEM_INVALIDATE] += 1
        host.stats[HOST_STAT_GMEM_INVALIDATE_PAGES] += end - start
        gmem_trace(host, TRACE_GMEM_INVALIDATE, 0, start, end, 0, 0)
        host.invalidate_vm_type = inode.vm_type
        hook(host, start, end)
    page_data_drop(host, start, end - start)
    host.stats[HOST_STAT_FOLIOS_FREED] += 1
    f = folio_get(&host.pm, id)
    if f.refcount > 1:
        # filemap_free_folio: the page cache drops its reference; a GUP pin or reference
        # (kvm_gmem_pin) keeps the folio until it is released, off the page cache
        f.refcount -= 1
        f.mapping = 0
        return
    if f.flags & (PG_hwpoison | PG_leaked):
        # a poisoned page, or one the invalidate hook could not give back (snp_leak_pages),
        # never returns to the allocator
        f.mapping = 0
        f.flags = (f.flags & (PG_hwpoison | PG_hugetlb)) | PG_leaked
        return
    kvm_gmem_free_huge(inode, folio_free(&host.pm, id))


cdef int kvm_gmem_split_folio(gmem_inode *inode, uint64_t first, uint32_t id) noexcept nogil:
    """Split a huge folio into 4K folios (truncate_inode_partial_folio -> split_folio)."""
    return kvm_gmem_split_to(inode, first, id, 0)


cdef void kvm_gmem_truncate(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """truncate_inode_pages_range over page indices [start, end): free whole folios,
    split huge folios that stick out (never touching their contents)."""
    cdef uint64_t index = start, first, v
    cdef int order
    kvm_gmem_merge_for_truncate(inode, start, end)
    while index < end and xa_find_entry(&inode.filemap, index, end - 1, XA_NO_MARK, &first, &order, &v):
        if first < start or first + _pages(order) > end:
            if kvm_gmem_split_folio(inode, first, <uint32_t>v) == 0:
                continue
            index = first + _pages(order)      # could not split: the folio stays
            continue
        xa_erase(&inode.filemap, first, &v)
        kvm_gmem_free_folio(inode, <uint32_t>v)
        index = first + _pages(order)


# -------------------------------------------------------------- invalidation

cdef inline int kvm_gmem_invalidate_filter(gmem_inode *inode) noexcept nogil:
    # kvm_gmem_get_invalidate_filter (6.18, unchanged in 7.0-rc): a file without INIT_SHARED
    # is taken to hold only private memory.  Known kernel gap, kept: a TDX VM's gmem-only slot
    # (MMAP without INIT_SHARED) also maps shared faults from the file (__kvm_mmu_faultin_pfn),
    # and KVM_FILTER_PRIVATE zaps only TDX's mirror root, so punch/release/memory_failure leave
    # those shared SPTEs; check() names them.  Other VM types have one root, zapped whole.
    # "next" (e088c7f86bef kvm_gmem_get_all_gfns_filter): with in-place conversion a file holds
    # both kinds, so punch/release/memory failure zap SHARED | PRIVATE
    if inode.host.gmem_in_place_conversion:
        return KVM_FILTER_SHARED | KVM_FILTER_PRIVATE
    if inode.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
        return KVM_FILTER_SHARED
    return KVM_FILTER_PRIVATE


cdef void kvm_gmem_invalidate_begin(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """Zap every binding's gfns in [start, end) of every file on the inode."""
    kvm_gmem_invalidate_start(inode, start, end, kvm_gmem_invalidate_filter(inode))


cdef void kvm_gmem_invalidate_start(gmem_inode *inode, uint64_t start, uint64_t end,
                                    int filter) noexcept nogil:
    """kvm_gmem_invalidate_start with the caller's filter (a conversion zaps only the kind it
    converts from)."""
    cdef gmem_file *f = inode.files
    cdef uint64_t index, first, v, lo, hi
    cdef int order
    cdef kvm_memory_slot *slot
    while f != NULL:
        index = start
        while index < end and xa_find_entry(&f.bindings, index, end - 1, XA_NO_MARK, &first, &order, &v):
            slot = &f.kvm.memslots[v]
            if not f.inval_begun:
                f.inval_begun = 1
                kvm_mmu_invalidate_begin(f.kvm)
            lo = start if start > slot.gmem_pgoff else slot.gmem_pgoff
            hi = slot.gmem_pgoff + slot.npages
            if end < hi:
                hi = end
            kvm_mmu_invalidate_range_add(f.kvm, slot.base_gfn + lo - slot.gmem_pgoff,
                                         slot.base_gfn + hi - slot.gmem_pgoff)
            kvm_unmap_gfn_range(f.kvm, slot.base_gfn + lo - slot.gmem_pgoff,
                                slot.base_gfn + hi - slot.gmem_pgoff, filter)
            index = slot.gmem_pgoff + slot.npages
        f = f.next


cdef void kvm_gmem_invalidate_end(gmem_inode *inode) noexcept nogil:
    cdef gmem_file *f = inode.files
    while f != NULL:
        if f.inval_begun:
            f.inval_begun = 0
            kvm_mmu_invalidate_end(f.kvm)
        f = f.next


cdef int kvm_gmem_punch_hole(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    cdef int r = kvm_gmem_punch_check(inode, start, end)
    if r:
        return r
    unmap_mapping_pages(inode, start, end - start)     # truncate_pagecache_range
    kvm_gmem_split_private_leafs(inode, start, end)    # proposed: TDX huge pages v3
    kvm_gmem_invalidate_begin(inode, start, end)
    kvm_gmem_truncate(inode, start, end)
    kvm_gmem_invalidate_end(inode)
    return 0


# ----------------------------------------------------------------- prepare

cdef inline void kvm_gmem_mark_prepared(gmem_host *host, folio *f) noexcept nogil:
    """folio_mark_uptodate; under the invalidate_folio policy the arch's "needs invalidation"
    goes into folio->private whenever the arch may have changed the page's state."""
    f.flags |= PG_uptodate
    if host.invalidate_policy == GMEM_INVALIDATE_INVALIDATE_FOLIO:
        f.flags |= PG_private
        f.private = 1


cdef inline int kvm_gmem_prepare_folio(kvm *kvm, kvm_memory_slot *slot, gmem_inode *inode,
                                       folio *f) noexcept nogil:
    """Zero a folio the first time and run the arch prepare hook, as the policy says:
    with "prepared" tracked by gmem (uptodate) a prepared folio is skipped."""
    cdef gmem_host *host = inode.host
    cdef gmem_prepare_t hook = host.hooks[kvm.vm_type].gmem_prepare
    cdef uint64_t gfn, pfn = f.pfn
    cdef int order = f.order, r = 0
    if host.kernel == GMEM_KERNEL_NEXT:
        return kvm_gmem_make_private_folio(kvm, slot, inode, f)
    if host.prepared_tracking == GMEM_TRACK_GMEM and (f.flags & PG_uptodate):
        return 0
    if not (f.flags & PG_uptodate):
        host_clear_pages(host, pfn, _pages(order))         # clear_highpage of every page
    if hook != NULL:
        gfn = slot.base_gfn + f.index - slot.gmem_pgoff    # ALIGN_DOWN(index, nr_pages)
        r = kvm_gmem_call_prepare(kvm, hook, gfn, pfn, order)
        if r:
            return r
        kvm_gmem_mark_prepared(host, f)
    else:
        f.flags |= PG_uptodate
    return 0


cdef int kvm_gmem_make_private_folio(kvm *kvm, kvm_memory_slot *slot, gmem_inode *inode,
                                     folio *f) noexcept nogil:
    """"next" (3df611b5a04e, 2131c4f763d2, fb50ca77b672, cb0544296a33): __kvm_gmem_get_pfn zeroes
    a folio once (uptodate), then kvm_gmem_get_pfn calls make_private(kvm, gfn, pfn, npages) only
    if the index is private (the inode's attributes with in-place conversion, else the VM's);
    shared pages are never prepared.  The C hook slot is gmem_prepare's, given log2(npages).
    A huge folio (proposed) over both kinds of page: make_private of its private runs only."""
    cdef gmem_host *host = inode.host
    cdef gmem_prepare_t hook = host.hooks[kvm.vm_type].gmem_prepare
    cdef uint64_t gfn = slot.base_gfn + f.index - slot.gmem_pgoff
    if not (f.flags & PG_uptodate):
        host_clear_pages(host, f.pfn, _pages(f.order))
        f.flags |= PG_uptodate
    if hook == NULL:
        return 0
    if f.order and host.gmem_in_place_conversion and not mt_range_is(
            &inode.attributes, f.index, f.index + _mask(f.order), KVM_MEMORY_ATTRIBUTE_PRIVATE):
        return kvm_gmem_make_private_runs(kvm, inode, hook, gfn, f)
    if not kvm_mem_is_private(kvm, gfn):
        return 0
    return kvm_gmem_call_prepare(kvm, hook, gfn, f.pfn, f.order)


cdef int kvm_gmem_make_private_runs(kvm *kvm, gmem_inode *inode, gmem_prepare_t hook, uint64_t gfn,
                                    folio *f) noexcept nogil:
    """make_private over each private run of a mixed huge folio, in aligned power-of-two pieces."""
    cdef uint64_t i = f.index, end = f.index + _pages(f.order), last, hi
    cdef int o, r
    cdef uint64_t private
    while i < end:
        private = mt_load(&inode.attributes, i, NULL, &last) & KVM_MEMORY_ATTRIBUTE_PRIVATE
        hi = end if last >= end - 1 else last + 1
        while private and i < hi:
            o = 0
            while o < f.order and not ((i - f.index) & _mask(o + 1)) and i + _pages(o + 1) <= hi:
                o += 1
            r = kvm_gmem_call_prepare(kvm, hook, gfn + i - f.index, f.pfn + i - f.index, o)
            if r:
                return r
            i += _pages(o)
        i = hi
    return 0


cdef inline int kvm_gmem_call_prepare(kvm *kvm, gmem_prepare_t hook, uint64_t gfn, uint64_t pfn,
                                    int order) noexcept nogil:
    """The arch's prepare (make_private in "next") with its counters, fault injection and trace."""
    cdef gmem_host *host = kvm.host
    cdef int r
    kvm.stats[VM_STAT_GMEM_PREPARE] += 1
    if host.fail_prepare:
        host.fail_prepare -= 1
        r = -host.fail_prepare_errno
    else:
        r = hook(kvm, gfn, pfn, order)
    if host.hook_error and r == 0:
        r = -EIO
    gmem_trace(host, TRACE_GMEM_PREPARE, 0, gfn, pfn, order, <uint64_t>(-r))
    if r:
        kvm.stats[VM_STAT_GMEM_PREPARE_FAILED] += 1
    return r


cdef inline int kvm_gmem_fit_folio(gmem_inode *inode, kvm_memory_slot *slot, uint64_t index,
                                   uint32_t *id) noexcept nogil:
    """A huge folio bound where gfns and file indices disagree modulo its size cannot be
    mapped or prepared as one page: split it into 4K folios before its first use."""
    cdef folio *f = folio_get(&inode.host.pm, id[0])
    if f.order == 0 or f.flags & PG_uptodate or \
            ((slot.base_gfn - slot.gmem_pgoff) & _mask(f.order)) == 0:
        return 0
    return kvm_gmem_fit_folio_split(inode, f, index, id)


cdef int kvm_gmem_fit_folio_split(gmem_inode *inode, folio *f, uint64_t index, uint32_t *id) noexcept nogil:
    cdef uint64_t v
    cdef int r = kvm_gmem_split_folio(inode, f.index, id[0])
    if r == 0:
        xa_load(&inode.filemap, index, &v)
        id[0] = <uint32_t>v
    return r


cdef int kvm_gmem_prepare_bound(gmem_inode *inode, uint64_t index, uint32_t id) noexcept nogil:
    """The RFC's prepare at allocation: every file with a binding at index, now;
    unbound ranges are deferred to the fault."""
    cdef gmem_file *f = inode.files
    cdef uint64_t v
    cdef int r
    while f != NULL:
        if xa_load(&f.bindings, index, &v):
            r = kvm_gmem_fit_folio(inode, &f.kvm.memslots[v], index, &id)
            if r == 0:
                r = kvm_gmem_prepare_folio(f.kvm, &f.kvm.memslots[v], inode, folio_get(&inode.host.pm, id))
            if r:
                return r
        f = f.next
    return 0


cdef int kvm_gmem_allocate(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """fallocate(KEEP_SIZE): allocate every hole in [start, end); existing pages stay."""
    cdef uint64_t index = start
    cdef uint32_t id
    cdef folio *f
    cdef xa_state xas
    cdef int r
    xas_init(&xas, &inode.filemap, start)
    while index < end:
        r = kvm_gmem_get_folio(inode, &xas, index, &id)
        if r:
            return r
        if inode.host.prepare_policy == GMEM_PREPARE_ALLOC:
            r = kvm_gmem_prepare_bound(inode, index, id)
            if r:
                return r
        f = folio_get(&inode.host.pm, id)
        index = f.index + _pages(f.order)
    return 0


# -------------------------------------------------------------- get_pfn

cdef int kvm_gmem_get_pfn(kvm *kvm, kvm_memory_slot *slot, uint64_t gfn, uint64_t *pfn,
                          int *max_order) noexcept nogil:
    cdef kvm_gmem_cursor cur
    xas_init(&cur.bindings, NULL, 0)
    xas_init(&cur.filemap, NULL, 0)
    return __kvm_gmem_get_pfn(kvm, slot, gfn, pfn, max_order, &cur)


cdef inline int __kvm_gmem_get_pfn(kvm *kvm, kvm_memory_slot *slot, uint64_t gfn, uint64_t *pfn,
                                   int *max_order, kvm_gmem_cursor *cur) noexcept nogil:
    """kvm_gmem_get_pfn with the caller's cursors (a vCPU's: its stream of faults mostly
    stays in one leaf of the bindings and of the page cache)."""
    cdef gmem_file *file = slot.gmem_file
    cdef uint64_t index, v
    cdef uint32_t id
    cdef folio *f
    cdef int r
    if file == NULL:
        return -EFAULT
    index = gfn - slot.base_gfn + slot.gmem_pgoff
    xas_set_xa(&cur.bindings, &file.bindings, index)
    if not xas_load(&cur.bindings, &v) or &kvm.memslots[v] != slot:
        return -EIO
    r = kvm_gmem_get_folio(file.inode, &cur.filemap, index, &id)
    if r == 0:
        r = kvm_gmem_fit_folio(file.inode, slot, index, &id)
    if r:
        return r
    f = folio_get(&kvm.host.pm, id)
    if f.order < file.inode.page_order and kvm.host.huge_merge == GMEM_HUGE_MERGE_LAZY:
        id = kvm_gmem_merge_lazy(file.inode, &cur.filemap, index, id)
        f = folio_get(&kvm.host.pm, id)
    if f.flags & PG_hwpoison:
        return -EHWPOISON
    r = kvm_gmem_prepare_folio(kvm, slot, file.inode, f)
    if r:
        return r
    pfn[0] = f.pfn + (index - f.index)
    # A huge folio maps huge only where gfn and index agree modulo its size.
    max_order[0] = f.order if ((gfn ^ index) & _mask(f.order)) == 0 else 0
    if max_order[0] and file.inode.host.gmem_in_place_conversion and not mt_range_is(
            &file.inode.attributes, f.index, f.index + _mask(f.order),
            mt_load(&file.inode.attributes, f.index, NULL, NULL)):
        max_order[0] = 0        # the folio's range has both kinds: map 4K
    return 0


# ------------------------------------------------------- create, files, release

cdef uint64_t kvm_gmem_get_supported_flags(kvm *kvm) noexcept nogil:
    """6.18: MMAP everywhere; INIT_SHARED only where the VM type has no private memory
    (kvm_arch_supports_gmem_init_shared).  kvm NULL: /dev/kvm answers as for a default VM."""
    # "next" (b5ed1ee2a7a0): kvm_arch_supports_gmem_init_shared() = gmem_in_place_conversion ||
    # !kvm_arch_has_private_mem() (body not read: inferred from its subject and v8's review)
    if kvm != NULL and kvm.host.kernel == GMEM_KERNEL_RFC_2023:
        return KVM_GUEST_MEMFD_ALLOW_HUGEPAGE   # the RFC's base (6.8-rc): THP only, no mmap
    if kvm != NULL and kvm.has_private_mem and not kvm.host.gmem_in_place_conversion:
        return GUEST_MEMFD_FLAG_MMAP | kvm_gmem_hugetlb_flags(kvm.host)
    return GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | (kvm_gmem_hugetlb_flags(kvm.host) if kvm != NULL else 0)


cdef inline uint64_t kvm_gmem_hugetlb_flags(const gmem_host *h) noexcept nogil:
    """CONFIG_KVM_GMEM_HUGETLB (proposed): offered where the host has a hugetlb pool."""
    if h.gmem_backing == GMEM_BACKING_HUGETLB or h.pm.hstates[HSTATE_2M].nr_huge_pages or \
            h.pm.hstates[HSTATE_1G].nr_huge_pages:
        return GUEST_MEMFD_FLAG_HUGETLB | (<uint64_t>GUESTMEM_HUGETLB_FLAG_MASK << GUESTMEM_HUGETLB_FLAG_SHIFT)
    return 0


cdef int kvm_gmem_create(kvm *kvm, uint64_t size, uint64_t flags, gmem_file **out) noexcept nogil:
    return kvm_gmem_create_order(kvm, size, flags, 0, out)


cdef int kvm_gmem_create_order(kvm *kvm, uint64_t size, uint64_t flags, int page_order,
                               gmem_file **out) noexcept nogil:
    """KVM_CREATE_GUEST_MEMFD: flags are checked before size; page_order is the HugeTLB WIP
    tree's field of the struct (proposed uAPI; 0: the flags say)."""
    cdef gmem_host *h = kvm.host
    cdef gmem_inode *inode
    cdef gmem_inode **pp
    cdef int r
    if flags & ~kvm_gmem_get_supported_flags(kvm):
        return _refuse(h, -EINVAL, "flags outside kvm_gmem_get_supported_flags()")
    if <int64_t>size <= 0 or size & 4095:
        return _refuse(h, -EINVAL, "size is not a positive multiple of PAGE_SIZE")
    if h.kernel == GMEM_KERNEL_RFC_2023 and flags & KVM_GUEST_MEMFD_ALLOW_HUGEPAGE and size & ((4096 << HPAGE_ORDER) - 1):
        return _refuse(h, -EINVAL, "KVM_GUEST_MEMFD_ALLOW_HUGEPAGE needs a size that is a multiple of "
                       "HPAGE_PMD_SIZE")
    inode = <gmem_inode *>_calloc(1, sizeof(gmem_inode))
    if inode == NULL:
        return _refuse(h, -ENOMEM, "out of memory")
    xa_init(&inode.filemap)
    inode.memfd = -1
    inode.host = h
    inode.size = size
    inode.flags = flags
    inode.allow_hugepage = h.kernel == GMEM_KERNEL_RFC_2023 and flags & KVM_GUEST_MEMFD_ALLOW_HUGEPAGE
    inode.mmap_flags = 0 if h.kernel == GMEM_KERNEL_RFC_2023 else flags & GUEST_MEMFD_FLAG_MMAP
    inode.vm_type = kvm.vm_type             # indexes the host's hook table on free
    r = kvm_gmem_huge_setup(inode, flags, page_order)
    if r < 0:
        xa_destroy(&inode.filemap)
        free(inode)
        return r
    # "next": every index present, PRIVATE unless the file starts shared
    if mt_init(&inode.attributes, 0 if flags & GUEST_MEMFD_FLAG_INIT_SHARED
               else KVM_MEMORY_ATTRIBUTE_PRIVATE) < 0:
        xa_destroy(&inode.filemap)
        free(inode)
        return _refuse(h, -ENOMEM, "out of memory")
    if mt_init(&inode.policy, 0) < 0:
        mt_destroy(&inode.attributes)
        xa_destroy(&inode.filemap)
        free(inode)
        return _refuse(h, -ENOMEM, "out of memory")
    inode.ino = h.next_ino
    h.next_ino += 1
    pp = &h.inodes                      # listed oldest first, as the VMs
    while pp[0] != NULL:
        pp = &pp[0].next
    pp[0] = inode
    r = gmem_contents_init(inode)              # gmem exec (content_memfd): a memfd of i_size
    if r < 0:
        kvm_gmem_evict_inode(inode)
        return _refuse(h, r, "no memfd for the contents (content_memfd)")
    if __kvm_gmem_create_file(kvm, inode, out) < 0:
        kvm_gmem_evict_inode(inode)
        return _refuse(h, -ENOMEM, "out of memory")
    return 0


cdef int __kvm_gmem_create_file(kvm *kvm, gmem_inode *inode, gmem_file **out) noexcept nogil:
    """A new struct file of kvm on inode, with one reference (the fd's)."""
    cdef gmem_file *f = <gmem_file *>_calloc(1, sizeof(gmem_file))
    if f == NULL:
        return -ENOMEM
    xa_init(&f.bindings)
    f.inode = inode
    f.kvm = kvm
    f.refcount = 1
    f.next = inode.files
    inode.files = f
    kvm_get_kvm(kvm)                        # the file pins the VM
    out[0] = f
    return 0


cdef int kvm_gmem_link(kvm *kvm, gmem_file *src, gmem_file **out) noexcept nogil:
    """A new guest_memfd of kvm on src's inode: the shared-inode model of intra-host
    migration (KVM_LINK_GUEST_MEMFD, proposed uAPI, not merged)."""
    if src.kvm.vm_type != kvm.vm_type:
        return _refuse(kvm.host, -EINVAL, "the VM types differ")
    if kvm_arch_has_bound_private_mem(kvm):
        return _refuse(kvm.host, -EINVAL, "the pages are encrypted for the source's ASID/HKID: they "
                       "move only with its encryption context (KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM)")
    if __kvm_gmem_create_file(kvm, src.inode, out) < 0:
        return _refuse(kvm.host, -ENOMEM, "out of memory")
    return 0


cdef void kvm_gmem_get_file(gmem_file *file) noexcept nogil:
    file.refcount += 1


cdef void kvm_gmem_put_file(gmem_file *file) noexcept nogil:
    file.refcount -= 1
    if file.refcount == 0:
        kvm_gmem_release(file)


cdef uint64_t kvm_gmem_size(const gmem_file *file) noexcept nogil:
    return file.inode.size


cdef void kvm_gmem_release(gmem_file *file) noexcept nogil:
    """Last close of a gmem file: its slots go dead, their gfns are zapped, the bindings
    vanish; the inode is evicted when no file is left on it, and the VM loses the file's
    reference."""
    cdef gmem_inode *inode = file.inode
    cdef kvm *kvm = file.kvm
    cdef gmem_file **pp
    cdef uint64_t index = 0, first, v
    cdef int order
    cdef kvm_memory_slot *slot
    kvm_mmu_invalidate_begin(kvm)
    while xa_find_entry(&file.bindings, index, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        slot = &kvm.memslots[v]
        slot.gmem_file = NULL
        kvm_mmu_invalidate_range_add(kvm, slot.base_gfn, slot.base_gfn + slot.npages)
        kvm_unmap_gfn_range(kvm, slot.base_gfn, slot.base_gfn + slot.npages,
                            kvm_gmem_invalidate_filter(inode))
        index = slot.gmem_pgoff + slot.npages
    kvm_mmu_invalidate_end(kvm)
    xa_destroy(&file.bindings)
    pp = &inode.files
    while pp[0] != NULL:
        if pp[0] == file:
            pp[0] = file.next
            break
        pp = &pp[0].next
    free(file)
    if inode.files == NULL:
        kvm_gmem_evict_inode(inode)
    kvm_put_kvm(kvm)


cdef void kvm_gmem_evict_inode(gmem_inode *inode) noexcept nogil:
    """The last file is gone: truncate everything, unlist and free the inode."""
    cdef gmem_inode **pp = &inode.host.inodes
    inode.host.inode_gen += 1           # a batch's ring stops reading its filemap
    kvm_gmem_truncate(inode, 0, <uint64_t>0xFFFFFFFFFFFFFFFF)
    kvm_gmem_huge_release(inode)
    gmem_contents_release(inode)
    xa_destroy(&inode.filemap)
    mt_destroy(&inode.attributes)
    mt_destroy(&inode.policy)
    while pp[0] != NULL:
        if pp[0] == inode:
            pp[0] = inode.next
            break
        pp = &pp[0].next
    free(inode)


# ------------------------------------------------------------------ bindings

cdef int kvm_gmem_bind_check(kvm *kvm, gmem_file *file, int fdget_err, uint64_t offset,
                             uint64_t npages) noexcept nogil:
    """kvm_gmem_bind's checks, in order (fdget's error first)."""
    cdef gmem_host *h = kvm.host
    cdef uint64_t f, v
    cdef int k
    if file == NULL:
        if fdget_err == -EBADF:
            return _refuse(h, -EBADF, "guest_memfd is not an open fd")
        return _refuse(h, -EINVAL, "the guest_memfd fd is not a guest_memfd")
    if file.kvm != kvm:
        return _refuse(h, -EINVAL, "the guest_memfd belongs to another VM")
    if <int64_t>offset < 0 or offset + (npages << 12) > file.inode.size:
        return _refuse(h, -EINVAL, "guest_memfd_offset + memory_size is past the end of the guest_memfd")
    if xa_find_entry(&file.bindings, offset >> 12, (offset >> 12) + npages - 1, XA_NO_MARK, &f, &k, &v):
        # -EEXIST since 7.2 ("KVM guest_memfd changes for 7.2"); 6.18 and the RFC said -EINVAL
        return _refuse(h, -EEXIST if h.kernel >= GMEM_KERNEL_7_2 else -EINVAL,
                       "that guest_memfd range is already bound to a memslot")
    return 0


cdef int kvm_gmem_bind(kvm *kvm, kvm_memory_slot *slot, gmem_file *file, uint64_t pgoff) noexcept nogil:
    """Bind slot to file's pages [pgoff, pgoff + npages) (checked by kvm_gmem_bind_check)."""
    if xa_store_range(&file.bindings, pgoff, pgoff + slot.npages - 1, slot - kvm.memslots) < 0:
        return -ENOMEM
    slot.gmem_file = file
    slot.gmem_pgoff = pgoff
    # "next" (2e646bcfcf90): with in-place conversion every gmem memslot is gmem-only
    if file.inode.mmap_flags or kvm.host.gmem_in_place_conversion:
        slot.flags |= KVM_MEMSLOT_GMEM_ONLY
    return 0


cdef void kvm_gmem_unbind(kvm *kvm, kvm_memory_slot *slot) noexcept nogil:
    cdef gmem_file *file = slot.gmem_file
    if file == NULL:
        return
    xa_assign_range(&file.bindings, slot.gmem_pgoff, slot.gmem_pgoff + slot.npages - 1, 0, True)
    slot.gmem_file = NULL


# ----------------------------------------------------------------- fallocate

cdef int vfs_fallocate_check(gmem_host *h, uint64_t mode, uint64_t offset, uint64_t len) noexcept nogil:
    """vfs_fallocate's checks, before the file's ->fallocate."""
    cdef uint64_t modes = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_ZERO_RANGE |
                           FALLOC_FL_INSERT_RANGE | FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_WRITE_ZEROES)
    cdef uint64_t mm = mode & modes
    if <int64_t>offset < 0 or <int64_t>len <= 0:
        return _refuse(h, -EINVAL, "offset < 0 or len <= 0 (vfs_fallocate)")
    if mode & ~(modes | FALLOC_FL_KEEP_SIZE):
        return _refuse(h, -EOPNOTSUPP, "unknown mode bits (vfs_fallocate)")
    if mm and mm & (mm - 1):
        return _refuse(h, -EOPNOTSUPP, "the modes are exclusive (vfs_fallocate)")
    if mm == FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
        return _refuse(h, -EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE (vfs_fallocate)")
    if (mm == FALLOC_FL_COLLAPSE_RANGE or mm == FALLOC_FL_INSERT_RANGE
            or mm == FALLOC_FL_WRITE_ZEROES) and mode & FALLOC_FL_KEEP_SIZE:
        return _refuse(h, -EOPNOTSUPP, "this mode cannot take KEEP_SIZE (vfs_fallocate)")
    if offset + len > MAX_LFS_FILESIZE or offset + len < offset:
        return _refuse(h, -EFBIG, "offset + len beyond MAX_LFS_FILESIZE")
    return 0


cdef int kvm_gmem_fallocate(gmem_file *file, uint64_t mode, uint64_t offset, uint64_t len) noexcept nogil:
    cdef int r = _kvm_gmem_fallocate(file, mode, offset, len)
    gmem_trace(file.inode.host, TRACE_GMEM_FALLOCATE, TRACE_NO_VCPU, file.inode.ino, offset, len,
               (mode & <uint64_t>0xFFFFFFFF) | ((<uint64_t>(-r)) << 32))
    return r


cdef int _kvm_gmem_fallocate(gmem_file *file, uint64_t mode, uint64_t offset, uint64_t len) noexcept nogil:
    cdef gmem_inode *inode = file.inode
    cdef gmem_host *h = inode.host
    cdef int r = vfs_fallocate_check(h, mode, offset, len)
    if r:
        return r
    if not mode & FALLOC_FL_KEEP_SIZE:
        return _refuse(h, -EOPNOTSUPP, "guest_memfd needs FALLOC_FL_KEEP_SIZE")
    if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        return _refuse(h, -EOPNOTSUPP, "guest_memfd allows only KEEP_SIZE [| PUNCH_HOLE]")
    if offset & 4095 or len & 4095:
        return _refuse(h, -EINVAL, "offset and len must be page aligned")
    if inode.hstate >= 0 and (offset | len) & ((<uint64_t>4096 << inode.page_order) - 1):
        return _refuse(h, -EINVAL, "a hugetlb guest_memfd allocates and punches whole huge pages "
                       "(offset and len multiples of the huge page size)")
    if mode & FALLOC_FL_PUNCH_HOLE:
        return kvm_gmem_punch_hole(inode, offset >> 12, (offset + len) >> 12)   # no EOF check
    if offset + len > inode.size:
        return _refuse(h, -EINVAL, "offset + len past i_size")
    r = kvm_gmem_allocate(inode, offset >> 12, (offset + len) >> 12)
    if r < 0:
        return _refuse(h, r, "kvm_gmem_allocate failed (pages allocated so far stay)")
    return 0


# -------------------------------------------------------- mmap and user faults

cdef int kvm_gmem_mmap(gmem_file *file, uint64_t len, uint64_t offset, uint64_t prot,
                       uint64_t flags) noexcept nogil:
    """mmap(2): do_mmap's checks, then kvm_gmem_mmap's (6.18)."""
    cdef gmem_host *h = file.inode.host
    cdef uint64_t map_type = flags & 0x0F, aligned
    if len == 0 or offset & 4095:
        return _refuse(h, -EINVAL, "length 0 or offset not page aligned")
    # do_mmap: len = PAGE_ALIGN(len) (0 after wrapping: ENOMEM); get_unmapped_area refuses
    # len > TASK_SIZE (ENOMEM); file_mmap_ok() refuses offset + len past MAX_LFS_FILESIZE
    # (EOVERFLOW) -- all before the MAP_TYPE switch and the file's ->mmap
    aligned = (len + 4095) & ~(<uint64_t>4095)
    if aligned == 0 or aligned > TASK_SIZE_MAX:
        return _refuse(h, -ENOMEM, "length too large (len > TASK_SIZE)")
    if aligned > MAX_LFS_FILESIZE or (offset >> 12) > ((MAX_LFS_FILESIZE - aligned) >> 12):
        return _refuse(h, -EOVERFLOW, "offset + length past MAX_LFS_FILESIZE (file_mmap_ok)")
    if map_type != MAP_SHARED and map_type != MAP_PRIVATE and map_type != MAP_SHARED_VALIDATE:
        return _refuse(h, -EINVAL, "flags need MAP_SHARED or MAP_PRIVATE")
    if map_type == MAP_SHARED_VALIDATE and flags & ~LEGACY_MAP_MASK:
        # gmem has no FOP_MMAP_SYNC
        return _refuse(h, -EOPNOTSUPP, "MAP_SHARED_VALIDATE with unknown flags")
    if prot & PROT_EXEC:
        return _refuse(h, -EPERM, "PROT_EXEC on a noexec (anon_inode) mount")
    if not file.inode.mmap_flags:
        return _refuse(h, -ENODEV, "guest_memfd created without GUEST_MEMFD_FLAG_MMAP (or before "
                       "6.18: no mmap at all)")
    if map_type == MAP_PRIVATE:
        return _refuse(h, -EINVAL, "guest_memfd mappings must be MAP_SHARED")
    return 0


cdef int kvm_gmem_fault_refused(gmem_inode *inode, uint64_t pgoff) noexcept nogil:
    """The user fault's SIGBUS rules: 0, or GMEM_FAULT_SIGBUS_* with the reason."""
    if pgoff << 12 >= inode.size or pgoff >= inode.size >> 12:
        return _refuse(inode.host, GMEM_FAULT_SIGBUS_EOF, "the page is beyond i_size")
    if inode.host.gmem_in_place_conversion:
        # "next": shared per the inode's attributes, else -EACCES -> VM_FAULT_SIGBUS
        if mt_load(&inode.attributes, pgoff, NULL, NULL) & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            return _refuse(inode.host, GMEM_FAULT_SIGBUS_PRIVATE, "the page is private (in-place "
                           "conversion: kvm_gmem_fault_user_mapping gets -EACCES)")
    elif not inode.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
        return _refuse(inode.host, GMEM_FAULT_SIGBUS_PRIVATE,
                       "guest_memfd without GUEST_MEMFD_FLAG_INIT_SHARED is private")
    return 0


cdef int kvm_gmem_fault_user_mapping(gmem_file *file, uint64_t pgoff, bint write,
                                     unsigned char **page) noexcept nogil:
    """A host access to page pgoff through a mapping: 0 with *page its bytes (for a read of a
    page with no contents, the zero page: NULL), GMEM_FAULT_SIGBUS_* (VM_FAULT_SIGBUS), or
    -ENOMEM (VM_FAULT_OOM)."""
    cdef gmem_inode *inode = file.inode
    cdef uint64_t v
    cdef uint32_t id
    cdef folio *f
    cdef xa_state xas
    cdef int r = kvm_gmem_fault_refused(inode, pgoff)
    if r:
        return r
    xas_init(&xas, &inode.filemap, pgoff)
    if kvm_gmem_get_folio(inode, &xas, pgoff, &id) < 0:
        return _refuse(inode.host, -ENOMEM, "out of memory faulting a guest_memfd page (VM_FAULT_OOM)")
    f = folio_get(&inode.host.pm, id)
    if f.order and inode.host.gmem_in_place_conversion and not mt_range_is(
            &inode.attributes, f.index, f.index + _mask(f.order), 0):
        # a page the host maps is a folio of its own while others of its huge page are
        # private (the proposals' restructuring; Hildenbrand: split hugetlb folios become
        # normal folios so that refcount and mapcount work): the policy's "fresh" split, late
        if kvm_gmem_split_to(inode, f.index, id, 0) < 0:
            return _refuse(inode.host, -ENOMEM, "a huge folio could not be split for a host mapping "
                           "(VM_FAULT_OOM)")
        xa_load(&inode.filemap, pgoff, &v)
        f = folio_get(&inode.host.pm, <uint32_t>v)
    if not f.flags & PG_uptodate:
        page_data_drop(inode.host, f.pfn, _pages(f.order))   # clear_highpage
        f.flags |= PG_uptodate                                  # kvm_gmem_mark_uptodate
    page[0] = page_data_get(inode.host, f.pfn + (pgoff - f.index), write)
    if page[0] == NULL and write:
        return _refuse(inode.host, -ENOMEM, "out of memory for page contents")
    return 0


cdef int kvm_gmem_vfs_op(gmem_file *file, int op, uint64_t arg) noexcept nogil:
    """The file operations guest_memfd does not have: what the VFS answers (arg: the
    offset or length, where the call has one)."""
    cdef gmem_host *h = file.inode.host
    if op == GMEM_VFS_READ:
        return _refuse(h, -EINVAL, "guest_memfd has no read (no FMODE_CAN_READ)")
    if op == GMEM_VFS_WRITE:
        return _refuse(h, -EINVAL, "guest_memfd has no write (no FMODE_CAN_WRITE)")
    if op == GMEM_VFS_PREAD or op == GMEM_VFS_PWRITE:
        if <int64_t>arg < 0:
            return _refuse(h, -EINVAL, "negative offset")
        return _refuse(h, -ESPIPE, "guest_memfd has no FMODE_PREAD / FMODE_PWRITE")
    if op == GMEM_VFS_LSEEK:
        return _refuse(h, -ESPIPE, "guest_memfd has no FMODE_LSEEK")
    if <int64_t>arg < 0:
        return _refuse(h, -EINVAL, "negative length")
    return _refuse(h, -EINVAL, "kvm_gmem_setattr refuses every size change")


# --------------------------------------------------------------- populate

ctypedef int (*kvm_gmem_populate_cb)(kvm *kvm, uint64_t gfn, uint64_t pfn, uint64_t src,
                                     int order, void *opaque) noexcept nogil


cdef int64_t kvm_gmem_populate(kvm *kvm, uint64_t start_gfn, uint64_t src, int64_t npages,
                               kvm_gmem_populate_cb post_populate, void *opaque) noexcept nogil:
    """Fill not-yet-prepared private pages with initial contents (SNP_LAUNCH_UPDATE,
    KVM_TDX_INIT_MEM_REGION): pages done, or the error if the first page failed."""
    cdef kvm_memory_slot *slot = gfn_to_memslot(kvm, start_gfn)
    cdef gmem_file *file
    cdef uint64_t index, gfn, v
    cdef int64_t i = 0
    cdef int ret = 0
    cdef uint32_t id
    cdef folio *f
    cdef xa_state bindings, filemap
    if npages <= 0:
        return -EINVAL
    if not kvm_slot_has_gmem(slot):
        return -EINVAL
    file = slot.gmem_file
    if file == NULL:
        return -EFAULT
    if npages > <int64_t>(slot.npages - (start_gfn - slot.base_gfn)):
        npages = slot.npages - (start_gfn - slot.base_gfn)
    xas_init(&bindings, &file.bindings, 0)
    xas_init(&filemap, &file.inode.filemap, 0)
    while i < npages:
        gfn = start_gfn + i
        index = gfn - slot.base_gfn + slot.gmem_pgoff
        xas_set(&bindings, index)
        if not xas_load(&bindings, &v) or &kvm.memslots[v] != slot:
            ret = -EIO
            break
        if src and kvm.host.kernel >= GMEM_KERNEL_7_2 and \
                hva_to_pfn(kvm.host, (src + (<uint64_t>i << 12)) & ~(<uint64_t>4095), &v) < 0:
            ret = -EFAULT       # 7.0+: the source page is pinned (get_user_pages_fast) first
            break
        ret = kvm_gmem_get_folio(file.inode, &filemap, index, &id)       # no prepare
        if ret:
            break
        f = folio_get(&kvm.host.pm, id)
        if f.order and not (f.flags & PG_uptodate):
            # launch pages are 4K: populate a huge folio page by page
            ret = kvm_gmem_split_folio(file.inode, f.index, id)
            if ret:
                break
            continue
        if f.flags & PG_hwpoison:
            ret = -EHWPOISON
            break
        if f.flags & PG_uptodate and kvm.host.kernel < GMEM_KERNEL_7_2:
            ret = -EEXIST       # already faulted in / populated (7.0 dropped it: the arch decides)
            break
        if not kvm.has_private_mem or not kvm_mem_is_private(kvm, gfn):   # next: kvm_is_private_gfn
            ret = -EINVAL
            break
        ret = post_populate(kvm, gfn, f.pfn + (index - f.index), src + (<uint64_t>i << 12) if src else 0,
                            0, opaque)
        if ret:
            break
        # the arch changed the page's state: mark it prepared (and, under the invalidate_folio
        # policy, in need of invalidation)
        kvm_gmem_mark_prepared(kvm.host, folio_get(&kvm.host.pm, id))
        i += 1
    return ret if (ret and i == 0) else i


# ------------------------------------------------------------ memory failure

cdef int kvm_gmem_error_folio(gmem_inode *inode, uint32_t id) noexcept nogil:
    """.error_remove_folio after memory_failure(): zap the guest mappings of the folio but keep
    it (MF_DELAYED); it is marked poisoned, so kvm_gmem_get_pfn answers -EHWPOISON."""
    cdef folio *f = folio_get(&inode.host.pm, id)
    cdef uint64_t start = f.index, end = f.index + _pages(f.order)
    f.flags |= PG_hwpoison
    kvm_gmem_invalidate_begin(inode, start, end)
    kvm_gmem_invalidate_end(inode)
    return 0


cdef int gmem_memory_failure(gmem_host *h, uint64_t pfn) noexcept nogil:
    """mm/memory-failure.c for a pfn: a guest_memfd folio goes to its mapping's
    error_remove_folio (1); any other folio is only marked poisoned (0)."""
    cdef uint32_t id = pfn_folio(&h.pm, pfn)
    cdef gmem_inode *inode = h.inodes
    if id == 0:
        return 0
    while inode != NULL:
        if inode.ino == folio_get(&h.pm, id).mapping:
            kvm_gmem_error_folio(inode, id)
            gmem_trace(h, TRACE_MEMORY_FAILURE, TRACE_NO_VCPU, pfn, 0, 0, 1)
            return 1
        inode = inode.next
    folio_get(&h.pm, id).flags |= PG_hwpoison
    gmem_trace(h, TRACE_MEMORY_FAILURE, TRACE_NO_VCPU, pfn, 0, 0, 0)
    return 0


# ------------------------------------------------ user mappings and GUP references
# A Mapping is a VMA (struct gmem_vma): the pages it has a PTE for are what folio_mapped() and
# unmap_mapping_pages() see.  GUP through it (mm/gup.c on a guest_memfd VMA) faults each page
# in and takes a folio reference: FOLL_PIN adds GUP_PIN_COUNTING_BIAS (folio_maybe_dma_pinned),
# FOLL_GET one.  The page cache holds one reference of its own (folio_alloc's).

cdef enum:
    GUP_PIN_COUNTING_BIAS = 1024


cdef gmem_vma *kvm_gmem_vma_create(gmem_file *file, uint64_t pgoff, uint64_t npages) noexcept nogil:
    """After kvm_gmem_mmap succeeded: the VMA, holding a file reference (NULL: out of memory)."""
    cdef gmem_vma *vma = <gmem_vma *>_calloc(1, sizeof(gmem_vma))
    if vma == NULL:
        return NULL
    vma.file, vma.pgoff, vma.npages = file, pgoff, npages
    xa_init(&vma.ptes)
    vma.next = file.inode.vmas
    file.inode.vmas = vma
    kvm_gmem_get_file(file)
    return vma


cdef void kvm_gmem_vma_close(gmem_vma *vma) noexcept nogil:
    """munmap: the PTEs go with the VMA, then its file reference."""
    cdef gmem_vma **pp = &vma.file.inode.vmas
    cdef gmem_file *file = vma.file
    while pp[0] != NULL:
        if pp[0] == vma:
            pp[0] = vma.next
            break
        pp = &pp[0].next
    xa_destroy(&vma.ptes)
    free(vma)
    kvm_gmem_put_file(file)


cdef int kvm_gmem_vma_fault(gmem_vma *vma, uint64_t pgoff, bint write, unsigned char **page) noexcept nogil:
    """A user access through the VMA: kvm_gmem_fault_user_mapping, and the PTE it installs."""
    cdef uint64_t old
    cdef int r = kvm_gmem_fault_user_mapping(vma.file, pgoff, write, page)
    if r == 0 and xa_store_order(&vma.ptes, pgoff, 0, 1, &old) < 0:
        return _refuse(vma.file.inode.host, -ENOMEM, "out of memory for a page table")
    return r


cdef void unmap_mapping_pages(gmem_inode *inode, uint64_t start, uint64_t nr) noexcept nogil:
    """Zap every user PTE of pages [start, start + nr) in every VMA of the inode."""
    cdef gmem_vma *vma = inode.vmas
    if nr == 0:
        return
    while vma != NULL:
        xa_erase_range(&vma.ptes, start, start + nr - 1)
        vma = vma.next


cdef bint kvm_gmem_folio_mapped(gmem_inode *inode, uint64_t first, uint64_t nr) noexcept nogil:
    """folio_mapped() for the folio at pages [first, first + nr): a PTE in some VMA."""
    cdef gmem_vma *vma = inode.vmas
    cdef uint64_t f, v
    cdef int k
    while vma != NULL:
        if xa_find_entry(&vma.ptes, first, first + nr - 1, XA_NO_MARK, &f, &k, &v):
            return True
        vma = vma.next
    return False


cdef int kvm_gmem_pin(gmem_vma *vma, uint64_t pgoff, uint64_t npages, int longterm,
                      gmem_pin **out) noexcept nogil:
    """pin_user_pages(FOLL_LONGTERM | FOLL_WRITE) (longterm) or get_user_pages (FOLL_GET) on
    pages [pgoff, pgoff + npages) of the VMA: every page is faulted in for write (a page the
    fault refuses with SIGBUS is -EFAULT, as GUP reports it) and its folio gets a reference.
    All or nothing: 0 with *out, or -errno with no reference taken."""
    cdef gmem_inode *inode = vma.file.inode
    cdef gmem_pin *pin
    cdef unsigned char *page
    cdef uint64_t i, v
    cdef int r
    for i in range(npages):
        # (every page is checked before any is faulted in: a refused GUP changes nothing)
        if kvm_gmem_fault_refused(inode, pgoff + i):
            return _refuse(inode.host, -EFAULT, "GUP: the fault on a page of the range is SIGBUS "
                           "(a private page, or beyond i_size)")
    pin = <gmem_pin *>_calloc(1, sizeof(gmem_pin))
    if pin == NULL:
        return _refuse(inode.host, -ENOMEM, "out of memory")
    pin.ids = <uint32_t *>_calloc(npages if npages else 1, sizeof(uint32_t))
    if pin.ids == NULL:
        free(pin)
        return _refuse(inode.host, -ENOMEM, "out of memory")
    pin.file, pin.first, pin.longterm = vma.file, pgoff, longterm
    for i in range(npages):
        r = kvm_gmem_vma_fault(vma, pgoff + i, True, &page)
        if r:
            pin.npages = i
            kvm_gmem_unpin(pin, False)
            return r
        xa_load(&inode.filemap, pgoff + i, &v)
        pin.ids[i] = <uint32_t>v
        folio_get(&inode.host.pm, pin.ids[i]).refcount += GUP_PIN_COUNTING_BIAS if longterm else 1
    pin.npages = npages
    kvm_gmem_get_file(vma.file)
    out[0] = pin
    return 0


cdef void kvm_gmem_unpin(gmem_pin *pin, bint put_file) noexcept nogil:
    """unpin_user_pages / put_page: a folio the page cache dropped meanwhile (a punched hole)
    is freed with its last reference."""
    cdef gmem_host *host = pin.file.inode.host
    cdef folio *f
    cdef uint64_t i
    for i in range(pin.npages):
        f = folio_get(&host.pm, pin.ids[i])
        f.refcount -= GUP_PIN_COUNTING_BIAS if pin.longterm else 1
        if f.refcount == 0:
            folio_free(&host.pm, pin.ids[i])
    free(pin.ids)
    if put_file:
        kvm_gmem_put_file(pin.file)
    free(pin)


# ------------------------------------------------- in-place conversion ("next")

cdef uint64_t kvm_gmem_get_memory_attributes(kvm *kvm, uint64_t gfn) noexcept nogil:
    """kvm_gmem_is_private_gfn (98fd6e30bd14), for every attribute lookup while in-place
    conversion is on: memslot -> file -> the inode's maple tree; a gfn with no memslot or no
    file is shared."""
    cdef kvm_memory_slot *slot = gfn_to_memslot(kvm, gfn)
    if slot == NULL or not kvm_slot_has_gmem(slot) or slot.gmem_file == NULL:
        return 0
    return mt_load(&slot.gmem_file.inode.attributes, gfn - slot.base_gfn + slot.gmem_pgoff, NULL, NULL)


cdef int kvm_gmem_get_attributes(gmem_file *file, uint64_t index, uint64_t *attrs) noexcept nogil:
    """The inode's attributes at index: 0 with *attrs, or -ENOTTY when they are the VM's."""
    if not file.inode.host.gmem_in_place_conversion:
        return _refuse(file.inode.host, -ENOTTY, "attributes are per VM (in-place conversion is "
                       "off, or the kernel predates it): vm.get_memory_attributes(gfn)")
    attrs[0] = mt_load(&file.inode.attributes, index, NULL, NULL)
    return 0


cdef int kvm_gmem_has_outstanding_references(gmem_inode *inode, uint64_t start, uint64_t end,
                                             uint64_t *error_index) noexcept nogil:
    """dcde2f853ff4: a folio in [start, end) still referenced beyond the page cache's own after
    unmapping: maybe DMA-pinned, still mapped, or any other reference (lru batches drained).
    Unallocated indices have no folio and never fail."""
    cdef uint64_t index = start, first, v
    cdef int order
    cdef folio *f
    while index < end and xa_find_entry(&inode.filemap, index, end - 1, XA_NO_MARK, &first, &order, &v):
        f = folio_get(&inode.host.pm, <uint32_t>v)
        if (f.refcount >= GUP_PIN_COUNTING_BIAS or kvm_gmem_folio_mapped(inode, first, _pages(order))
                or f.refcount != 1):
            error_index[0] = first if first > start else start
            return 1
        index = first + _pages(order)
    return 0


cdef void kvm_gmem_make_shared(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """6fa1dab756fd: to shared, the arch's make_shared(start_pfn, nr_pages) over each allocated
    folio run of the range, inside the invalidation."""
    cdef gmem_host *host = inode.host
    cdef gmem_invalidate_t hook = host.hooks[inode.vm_type].gmem_make_shared
    cdef uint64_t index = start, first, v, lo, hi, pfn
    cdef int order
    cdef folio *f
    while index < end and xa_find_entry(&inode.filemap, index, end - 1, XA_NO_MARK, &first, &order, &v):
        f = folio_get(&host.pm, <uint32_t>v)
        lo = first if first > start else start
        hi = first + _pages(order) if first + _pages(order) < end else end
        pfn = f.pfn + lo - first
        if hook != NULL:
            host.gmem_make_shared_calls += 1
            host.gmem_make_shared_pages += hi - lo
            host.invalidate_vm_type = inode.vm_type
            hook(host, pfn, pfn + hi - lo)
        index = first + _pages(order)


cdef int kvm_gmem_content_mode(gmem_file *file, uint64_t mode, bint to_private) noexcept nogil:
    """RFC v4/v5 kvm_gmem_content_mode_is_supported (Host(content_modes=True) only; dropped from
    v7 on): UNSPECIFIED always; ZERO never when converting to private (KVM is untrusted, it
    cannot promise the guest zeros); else the arch's mask: SW_PROTECTED ZERO | PRESERVE; SNP and
    TDX ZERO, PRESERVE only to private before the launch finishes (!pre_fault_allowed).  Those
    masks were argued, not agreed."""
    cdef kvm *kvm = file.kvm
    cdef uint64_t mask = KVM_SET_MEMORY_ATTRIBUTES2_ZERO
    if mode == 0:
        return 0
    if mode == KVM_SET_MEMORY_ATTRIBUTES2_ZERO and to_private:
        return _refuse(kvm.host, -EOPNOTSUPP, "content mode ZERO converting to private: KVM "
                       "cannot promise the guest zeroed private memory")
    if kvm.vm_type == KVM_X86_SW_PROTECTED_VM or kvm.vm_type >= 6:
        mask |= KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
    elif to_private and not kvm.pre_fault_allowed:
        mask |= KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
    if not mode & mask:
        return _refuse(kvm.host, -EOPNOTSUPP, "content mode not supported by this VM type "
                       "(kvm_arch_gmem_supported_content_modes; RFC v4/v5 masks, unsettled)")
    return 0


cdef void kvm_gmem_apply_content_mode(gmem_file *file, uint64_t start, uint64_t end,
                                      uint64_t mode) noexcept nogil:
    """The mode over the allocated pages of the whole range: ZERO clears them, PRESERVE keeps
    them, unspecified scrambles them on SW_PROTECTED (random bytes, so a test can tell it from
    PRESERVE) and leaves them to the hardware elsewhere."""
    cdef gmem_inode *inode = file.inode
    cdef uint64_t index = start, first, v, lo, hi, pfn, i
    cdef int order
    cdef folio *f
    if mode == KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE:
        return
    if mode == 0 and not (file.kvm.vm_type == KVM_X86_SW_PROTECTED_VM
                          and (inode.host.content_modes or inode.host.scramble_on_conversion)):
        return
    while index < end and xa_find_entry(&inode.filemap, index, end - 1, XA_NO_MARK, &first, &order, &v):
        f = folio_get(&inode.host.pm, <uint32_t>v)
        lo = first if first > start else start
        hi = first + _pages(order) if first + _pages(order) < end else end
        pfn = f.pfn + lo - first
        if mode == KVM_SET_MEMORY_ATTRIBUTES2_ZERO:
            host_clear_pages(inode.host, pfn, hi - lo)
        else:
            for i in range(hi - lo):
                host_scramble_page(inode.host, pfn + i, (lo + i) ^ (<uint64_t>inode.ino << 40))
        index = first + _pages(order)


cdef int kvm_gmem_set_attributes(gmem_file *file, kvm_memory_attributes2 *a) noexcept nogil:
    """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd (kvm_gmem_ioctl ->
    kvm_gmem_set_attributes, 799c9fadc639): the checks in order, then under the invalidate lock
    __kvm_gmem_set_attributes.  On error a.error_offset is written where the kernel writes it."""
    cdef gmem_inode *inode = file.inode
    cdef gmem_host *h = inode.host
    cdef uint64_t start, end, err_index, mode, modes = 0
    cdef bint to_private
    cdef int i, r
    if h.kernel != GMEM_KERNEL_NEXT:
        return _refuse(h, -ENOTTY, "guest_memfd has no ioctls before in-place conversion (\"next\")")
    if not h.gmem_in_place_conversion:
        return _refuse(h, -ENOTTY, "kvm.gmem_in_place_conversion is off: attributes are per VM "
                       "(KVM_SET_MEMORY_ATTRIBUTES on the VM fd)")
    if h.content_modes:
        modes = KVM_SET_MEMORY_ATTRIBUTES2_ZERO | KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
    mode = a.flags
    if a.flags & ~modes or mode == modes and modes:
        return _refuse(h, -EINVAL, "flags must be 0 (content modes: RFC v4/v5 only, and one "
                       "at a time)" if not modes else "flags: one content mode at most")
    for i in range(11):
        if a.reserved[i]:
            return _refuse(h, -EINVAL, "reserved fields must be 0")
    if not file.kvm.has_private_mem:
        return _refuse(h, -EINVAL, "the VM has no private memory (kvm_arch_has_private_mem)")
    if a.attributes & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
        return _refuse(h, -EINVAL, "attributes other than KVM_MEMORY_ATTRIBUTE_PRIVATE")
    if a.size == 0 or a.offset + a.size < a.offset:
        return _refuse(h, -EINVAL, "size is 0 or offset + size wraps")
    if a.offset & 4095 or a.size & 4095:
        return _refuse(h, -EINVAL, "offset and size must be page aligned")
    if a.offset >= inode.size or a.offset + a.size > inode.size:
        return _refuse(h, -EINVAL, "offset + size is past i_size")
    start, end = a.offset >> 12, (a.offset + a.size) >> 12
    to_private = (a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
    r = kvm_gmem_content_mode(file, mode, to_private)
    if r < 0:
        a.error_offset = a.offset
        return r
    if mt_range_is(&inode.attributes, start, end - 1, a.attributes):
        kvm_gmem_apply_content_mode(file, start, end, mode)
        return 0                                    # nothing to convert: no invalidation
    if mt_preallocate(&inode.attributes) < 0:
        a.error_offset = a.offset
        return _refuse(h, -ENOMEM, "out of memory (kvm_gmem_mas_preallocate)")
    if to_private:
        # every process's PTEs of the range go first (not undone on -EAGAIN); private to
        # shared needs no check: the guest is the only user of private pages
        unmap_mapping_pages(inode, start, end - start)
        if kvm_gmem_has_outstanding_references(inode, start, end, &err_index):
            a.error_offset = err_index << 12
            return _refuse(h, -EAGAIN, "a page of the range is still referenced (a GUP pin or "
                           "reference): error_offset is the first")
    kvm_gmem_invalidate_start(inode, start, end, KVM_FILTER_SHARED if to_private else KVM_FILTER_PRIVATE)
    if not to_private:
        r = kvm_gmem_split_for_shared(inode, start, end)
        if r < 0:
            kvm_gmem_invalidate_end(inode)
            a.error_offset = a.offset
            return _refuse(h, r, "a huge folio of the range could not be restructured to order 0 "
                           "(kvm_gmem_restructure: still referenced, or out of memory)")
        kvm_gmem_make_shared(inode, start, end)
    mt_store(&inode.attributes, start, end - 1, a.attributes)
    kvm_gmem_apply_content_mode(file, start, end, mode)
    if to_private:
        kvm_gmem_merge_private(inode, start, end)
    kvm_gmem_invalidate_end(inode)
    h.gmem_conversions += 1
    return 0
