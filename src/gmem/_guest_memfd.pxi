# virt/kvm/guest_memfd.c: the gmem inode (filemap of folios), its files and
# bindings, allocation, hole punching, release, and kvm_gmem_get_pfn with the
# prepare/invalidate hooks.
#
# AS_INACCESSIBLE: nothing here reads or writes a folio's contents except
# zeroing a page before it is first prepared (kvm_gmem_prepare_folio) and the
# 6.18 host mmap fault path; truncation and splitting never touch pages.

cdef enum:
    HPAGE_ORDER = 9


# ------------------------------------------------------------- page contents

cdef void page_data_drop(gmem_host *host, uint64_t pfn, uint64_t n) noexcept nogil:
    """Forget the contents of [pfn, pfn + n): they read as zeros again."""
    cdef uint64_t first, v, start = pfn
    cdef int order
    if host.content_inodes.nr_entries and gmem_contents_drop(host, pfn, n) == n:
        return                          # gmem exec: the contents live in memfds
    if host.page_data.nr_entries == 0:
        return
    while xa_find_entry(&host.page_data, start, pfn + n - 1, XA_NO_MARK, &first, &order, &v):
        free(<void *><size_t>v)
        xa_erase(&host.page_data, first, &v)
        start = first + 1


cdef void host_clear_pages(gmem_host *host, uint64_t pfn, uint64_t n) noexcept nogil:
    """A host write of zeros: counted as an RMP violation where the RMP forbids it."""
    cdef uint64_t i
    if host.rmp.enabled:
        for i in range(n):
            if not host_write_ok(host, pfn + i):
                host.rmp.stats[SNP_STAT_RMP_VIOLATIONS] += 1
    page_data_drop(host, pfn, n)


cdef unsigned char *page_data_get(gmem_host *host, uint64_t pfn, bint create) noexcept nogil:
    cdef uint64_t v, old
    cdef void *p
    cdef unsigned char *c
    if host.content_inodes.nr_entries:
        c = gmem_contents_page(host, pfn)   # gmem exec: the contents live in memfds
        if c != NULL:
            return c
    if xa_load(&host.page_data, pfn, &v):
        return <unsigned char *><size_t>v
    if not create:
        return NULL
    p = _calloc(1, 4096)
    if p == NULL:
        return NULL
    if xa_store_order(&host.page_data, pfn, 0, <uint64_t><size_t>p, &old) < 0:
        free(p)
        return NULL
    return <unsigned char *>p


# ------------------------------------------------------------------ folios

cdef inline folio *gmem_folio(gmem_inode *inode, uint32_t id) noexcept nogil:
    return folio_get(&inode.host.pm, id)


cdef inline int kvm_gmem_get_folio(gmem_inode *inode, uint64_t index, uint32_t *id) noexcept nogil:
    """filemap_grab_folio: the folio at index, allocated if absent (2M when
    huge_folios allows: an aligned, empty 2M range inside i_size)."""
    cdef uint64_t v, first, old, base
    cdef int order = 0, k
    cdef gmem_host *host = inode.host
    cdef uint32_t i
    cdef folio *f
    if xa_load_follow(&inode.filemap, index, &v):
        id[0] = <uint32_t>v
        return 0
    if host.huge_folios:
        base = index & ~_mask(HPAGE_ORDER)
        if (base + _pages(HPAGE_ORDER) <= inode.size >> 12 and
                not xa_find_entry(&inode.filemap, base, base + _mask(HPAGE_ORDER), XA_NO_MARK, &first, &k, &v)):
            order = HPAGE_ORDER
    if folio_alloc(&host.pm, order, &i) < 0 and (order == 0 or folio_alloc(&host.pm, 0, &i) < 0):
        host.stats[HOST_STAT_ALLOC_FAILURES] += 1
        return -_ENOMEM
    f = folio_get(&host.pm, i)
    if f.order == 0:
        order = 0
    f.mapping = inode.ino
    f.index = index & ~_mask(order)
    if xa_store_follow(&inode.filemap, f.index, order, i, &old) < 0:
        folio_free(&host.pm, i)
        host.stats[HOST_STAT_ALLOC_FAILURES] += 1
        return -_ENOMEM
    host.stats[HOST_STAT_FOLIOS_ALLOCATED] += 1
    id[0] = i
    return 0


cdef void kvm_gmem_free_folio(gmem_inode *inode, uint32_t id) noexcept nogil:
    """.free_folio: the invalidate hook sees only the pfn range, then the pages go back."""
    cdef gmem_host *host = inode.host
    cdef folio *f = folio_get(&host.pm, id)
    cdef uint64_t start = f.pfn, end = f.pfn + _pages(f.order), first, v
    cdef int order
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
    if f.flags & PG_hwpoison or (host.rmp.leaked.nr_entries and xa_find_entry(
            &host.rmp.leaked, start, end - 1, XA_NO_MARK, &first, &order, &v)):
        # a poisoned page, or one the invalidate hook could not give back (snp_leak_pages),
        # never returns to the allocator
        f.mapping = 0
        f.flags = (f.flags & PG_hwpoison) | PG_leaked
        return
    folio_free(&host.pm, id)


cdef int kvm_gmem_split_folio(gmem_inode *inode, uint64_t first, uint32_t id) noexcept nogil:
    """Split a huge folio into 4K folios (truncate_inode_partial_folio -> split_folio)."""
    cdef int r = xa_split(&inode.filemap, first, 0)
    cdef uint64_t k, old
    cdef folio *f
    cdef int had_private
    if r < 0:
        return r
    r = folio_split(&inode.host.pm, id, 0)
    if r < 0:
        # undo the filemap split: one entry again
        xa_store_order(&inode.filemap, first, HPAGE_ORDER, id, &old)
        return r
    f = folio_get(&inode.host.pm, id)
    had_private = f.flags & PG_private
    for k in range(_pages(HPAGE_ORDER)):
        xa_store_order(&inode.filemap, first + k, 0, pfn_folio(&inode.host.pm, f.pfn + k), &old)
        if had_private and inode.host.reattach_private:
            # the scan the RFC cover letter suggests: every tail gets the head's private data back
            folio_get(&inode.host.pm, pfn_folio(&inode.host.pm, f.pfn + k)).flags |= PG_private
    inode.host.stats[HOST_STAT_FOLIO_SPLITS] += 1
    return 0


cdef void kvm_gmem_truncate(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """truncate_inode_pages_range over page indices [start, end): free whole folios,
    split huge folios that stick out (never touching their contents)."""
    cdef uint64_t index = start, first, v
    cdef int order
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
    if inode.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
        return KVM_FILTER_SHARED
    return KVM_FILTER_PRIVATE


cdef void kvm_gmem_invalidate_begin(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    """Zap every binding's gfns in [start, end) of every file on the inode."""
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
                                slot.base_gfn + hi - slot.gmem_pgoff, kvm_gmem_invalidate_filter(inode))
            index = slot.gmem_pgoff + slot.npages
        f = f.next


cdef void kvm_gmem_invalidate_end(gmem_inode *inode) noexcept nogil:
    cdef gmem_file *f = inode.files
    while f != NULL:
        if f.inval_begun:
            f.inval_begun = 0
            kvm_mmu_invalidate_end(f.kvm)
        f = f.next


cdef void kvm_gmem_punch_hole(gmem_inode *inode, uint64_t start, uint64_t end) noexcept nogil:
    kvm_gmem_invalidate_begin(inode, start, end)
    kvm_gmem_truncate(inode, start, end)
    kvm_gmem_invalidate_end(inode)


# ----------------------------------------------------------------- prepare

cdef inline int kvm_gmem_prepare_folio(kvm *kvm, kvm_memory_slot *slot, gmem_inode *inode,
                                       folio *f) noexcept nogil:
    """Zero a folio the first time and run the arch prepare hook, as the policy says:
    with "prepared" tracked by gmem (uptodate) a prepared folio is skipped."""
    cdef gmem_host *host = inode.host
    cdef gmem_prepare_t hook = host.hooks[kvm.vm_type].gmem_prepare
    cdef uint64_t gfn, pfn = f.pfn
    cdef int order = f.order, r = 0
    if host.prepared_tracking == GMEM_TRACK_GMEM and (f.flags & PG_uptodate):
        return 0
    if not (f.flags & PG_uptodate):
        host_clear_pages(host, pfn, _pages(order))         # clear_highpage of every page
    if hook != NULL:
        gfn = slot.base_gfn + f.index - slot.gmem_pgoff    # ALIGN_DOWN(index, nr_pages)
        kvm.stats[VM_STAT_GMEM_PREPARE] += 1
        if host.fail_prepare:
            host.fail_prepare -= 1
            r = -host.fail_prepare_errno
        else:
            r = hook(kvm, gfn, pfn, order)
        if host.hook_error and r == 0:
            r = -_EIO
        gmem_trace(host, TRACE_GMEM_PREPARE, 0, gfn, pfn, order, <uint64_t>(-r))
        if r:
            kvm.stats[VM_STAT_GMEM_PREPARE_FAILED] += 1
            return r
    f.flags |= PG_uptodate
    if hook != NULL and host.invalidate_policy == GMEM_INVALIDATE_INVALIDATE_FOLIO:
        f.flags |= PG_private           # the arch's "needs invalidation" in folio->private
        f.private = 1
    return 0


cdef int kvm_gmem_fit_folio(gmem_inode *inode, kvm_memory_slot *slot, uint64_t index,
                            uint32_t *id) noexcept nogil:
    """A huge folio bound where gfns and file indices disagree modulo its size cannot be
    mapped or prepared as one page: split it into 4K folios before its first use."""
    cdef folio *f = folio_get(&inode.host.pm, id[0])
    cdef uint64_t v
    cdef int r
    if f.order == 0 or f.flags & PG_uptodate or \
            ((slot.base_gfn - slot.gmem_pgoff) & _mask(f.order)) == 0:
        return 0
    r = kvm_gmem_split_folio(inode, f.index, id[0])
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
        if not f.released and xa_load(&f.bindings, index, &v):
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
    cdef int r
    while index < end:
        r = kvm_gmem_get_folio(inode, index, &id)
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
    cdef gmem_file *file = slot.gmem_file
    cdef uint64_t index, v
    cdef uint32_t id
    cdef folio *f
    cdef int r
    if file == NULL or file.released:
        return -_EFAULT
    index = gfn - slot.base_gfn + slot.gmem_pgoff
    if not xa_load_follow(&file.bindings, index, &v) or &kvm.memslots[v] != slot:
        return -_EIO
    r = kvm_gmem_get_folio(file.inode, index, &id)
    if r == 0:
        r = kvm_gmem_fit_folio(file.inode, slot, index, &id)
    if r:
        return r
    f = folio_get(&kvm.host.pm, id)
    if f.flags & PG_hwpoison:
        return -_EHWPOISON
    r = kvm_gmem_prepare_folio(kvm, slot, file.inode, f)
    if r:
        return r
    pfn[0] = f.pfn + (index - f.index)
    # A huge folio maps huge only where gfn and index agree modulo its size.
    max_order[0] = f.order if ((gfn ^ index) & _mask(f.order)) == 0 else 0
    return 0


# ---------------------------------------------------------------- release

cdef void kvm_gmem_unbind(kvm *kvm, kvm_memory_slot *slot) noexcept nogil:
    cdef gmem_file *file = slot.gmem_file
    if file == NULL:
        return
    xa_assign_range(&file.bindings, slot.gmem_pgoff, slot.gmem_pgoff + slot.npages - 1, 0, True)
    slot.gmem_file = NULL


cdef void kvm_gmem_evict_inode(gmem_inode *inode) noexcept nogil:
    kvm_gmem_truncate(inode, 0, <uint64_t>0xFFFFFFFFFFFFFFFF)


cdef void kvm_gmem_release(gmem_file *file) noexcept nogil:
    """Last close of a gmem file: its slots go dead, their gfns are zapped, the
    bindings vanish; the inode is evicted when no file is left on it."""
    cdef gmem_inode *inode = file.inode
    cdef gmem_file **pp
    cdef uint64_t index = 0, first, v
    cdef int order
    cdef kvm_memory_slot *slot
    kvm_mmu_invalidate_begin(file.kvm)
    while xa_find_entry(&file.bindings, index, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        slot = &file.kvm.memslots[v]
        slot.gmem_file = NULL
        kvm_mmu_invalidate_range_add(file.kvm, slot.base_gfn, slot.base_gfn + slot.npages)
        kvm_unmap_gfn_range(file.kvm, slot.base_gfn, slot.base_gfn + slot.npages,
                            kvm_gmem_invalidate_filter(inode))
        index = slot.gmem_pgoff + slot.npages
    kvm_mmu_invalidate_end(file.kvm)
    xa_destroy(&file.bindings)
    file.released = 1
    pp = &inode.files
    while pp[0] != NULL:
        if pp[0] == file:
            pp[0] = file.next
            break
        pp = &pp[0].next
    file.next = NULL
    if inode.files == NULL:
        kvm_gmem_evict_inode(inode)


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
    if npages <= 0:
        return -_EINVAL
    if not kvm_slot_has_gmem(slot):
        return -_EINVAL
    file = slot.gmem_file
    if file == NULL or file.released:
        return -_EFAULT
    if npages > <int64_t>(slot.npages - (start_gfn - slot.base_gfn)):
        npages = slot.npages - (start_gfn - slot.base_gfn)
    while i < npages:
        gfn = start_gfn + i
        index = gfn - slot.base_gfn + slot.gmem_pgoff
        if not xa_load_follow(&file.bindings, index, &v) or &kvm.memslots[v] != slot:
            ret = -_EIO
            break
        ret = kvm_gmem_get_folio(file.inode, index, &id)       # no prepare
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
            ret = -_EHWPOISON
            break
        if f.flags & PG_uptodate:
            ret = -_EEXIST                                      # already faulted in / populated
            break
        if not kvm_range_has_memory_attributes(kvm, gfn, gfn + 1, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                               KVM_MEMORY_ATTRIBUTE_PRIVATE):
            ret = -_EINVAL
            break
        ret = post_populate(kvm, gfn, f.pfn + (index - f.index), src + (<uint64_t>i << 12) if src else 0,
                            0, opaque)
        if ret:
            break
        f = folio_get(&kvm.host.pm, id)
        f.flags |= PG_uptodate                                  # kvm_gmem_mark_prepared
        if kvm.host.invalidate_policy == GMEM_INVALIDATE_INVALIDATE_FOLIO:
            f.flags |= PG_private       # the arch changed the page's state: it needs invalidation
            f.private = 1
        i += 1
    return ret if (ret and i == 0) else i


cdef int kvm_gmem_error_folio(gmem_inode *inode, uint32_t id) noexcept nogil:
    """.error_remove_folio after memory_failure(): zap the guest mappings of the folio but keep
    it (MF_DELAYED); it is marked poisoned, so kvm_gmem_get_pfn answers -EHWPOISON."""
    cdef folio *f = folio_get(&inode.host.pm, id)
    cdef uint64_t start = f.index, end = f.index + _pages(f.order)
    f.flags |= PG_hwpoison
    kvm_gmem_invalidate_begin(inode, start, end)
    kvm_gmem_invalidate_end(inode)
    return 0
