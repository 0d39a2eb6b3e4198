# KVM_SET_MEMORY_ATTRIBUTES (kvm_main.c: kvm_vm_set_mem_attributes) with the
# x86 hooks around it (mmu.c: kvm_arch_pre/post_set_memory_attributes and
# the KVM_LPAGE_MIXED_FLAG hugepage bookkeeping).

cdef inline int hugepage_test_mixed(kvm_memory_slot *slot, uint64_t gfn, int level) noexcept nogil:
    return (lpage_info_slot(slot, gfn, level)[0] & KVM_LPAGE_MIXED_FLAG) != 0


cdef inline void hugepage_set_mixed(kvm_memory_slot *slot, uint64_t gfn, int level, bint mixed) noexcept nogil:
    if mixed:
        lpage_info_slot(slot, gfn, level)[0] |= KVM_LPAGE_MIXED_FLAG
    else:
        lpage_info_slot(slot, gfn, level)[0] &= ~KVM_LPAGE_MIXED_FLAG


cdef int hugepage_has_attrs(kvm *kvm, kvm_memory_slot *slot, uint64_t gfn, int level,
                            uint64_t attrs) noexcept nogil:
    cdef uint64_t end = gfn + _pages(_level_order(level)), g
    if level == PG_LEVEL_2M:
        return kvm_range_has_memory_attributes(kvm, gfn, end, <uint64_t>0xFFFFFFFFFFFFFFFF, attrs)
    g = gfn
    while g < end:
        if hugepage_test_mixed(slot, g, level - 1) or attrs != kvm_get_memory_attributes(kvm, g):
            return 0
        g += _pages(_level_order(level - 1))
    return 1


cdef inline void _update_mixed(kvm *kvm, kvm_memory_slot *slot, uint64_t gfn, int level,
                               uint64_t attrs) noexcept nogil:
    hugepage_set_mixed(slot, gfn, level, not hugepage_has_attrs(kvm, slot, gfn, level, attrs))


cdef void kvm_mmu_init_memslot_memory_attributes(kvm *kvm, kvm_memory_slot *slot) noexcept nogil:
    cdef uint64_t n, gfn, end = slot.base_gfn + slot.npages, f, v
    cdef int level, k
    if not kvm.has_private_mem:
        return
    if not xa_find_entry(&kvm.mem_attr_array, slot.base_gfn, end - 1, XA_NO_MARK, &f, &k, &v):
        return                              # all shared: nothing is mixed
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        n = _pages(_level_order(level))
        gfn = (slot.base_gfn + n - 1) & ~(n - 1)
        while gfn + n <= end:
            _update_mixed(kvm, slot, gfn, level, kvm_get_memory_attributes(kvm, gfn))
            gfn += n


cdef void kvm_arch_pre_set_memory_attributes(kvm *kvm, kvm_memory_slot *slot, uint64_t start,
                                             uint64_t end, uint64_t attrs) noexcept nogil:
    cdef uint64_t n, gfn, ends[2]
    cdef int level, i
    # keep hugepages over the unchanged head and tail out of reach while this runs
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        n = _pages(_level_order(level))
        ends[0] = start & ~(n - 1)
        ends[1] = (end - 1) & ~(n - 1)
        for i in range(2):
            gfn = ends[i]
            if (gfn >= slot.base_gfn and gfn + n <= slot.base_gfn + slot.npages
                    and not hugepage_test_mixed(slot, gfn, level)):
                kvm_mmu_invalidate_range_add(kvm, gfn, gfn + n)
    if not attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE:
        kvm_split_private_leafs(kvm, start, end)        # proposed: TDX huge pages v3
    kvm_unmap_gfn_range(kvm, start, end,
                        KVM_FILTER_SHARED if attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE else KVM_FILTER_PRIVATE)


cdef void kvm_arch_post_set_memory_attributes(kvm *kvm, kvm_memory_slot *slot, uint64_t start,
                                              uint64_t end, uint64_t attrs) noexcept nogil:
    cdef uint64_t n, gfn
    cdef int level
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        n = _pages(_level_order(level))
        gfn = start & ~(n - 1)
        if gfn != start or gfn + n > end:
            # only a head hugepage the memslot covers whole has lpage_info (as the tail below)
            if gfn >= slot.base_gfn and gfn + n <= slot.base_gfn + slot.npages:
                _update_mixed(kvm, slot, gfn, level, attrs)
            gfn += n
        while gfn + n <= end:
            hugepage_set_mixed(slot, gfn, level, False)
            gfn += n
        if gfn < end and gfn + n <= slot.base_gfn + slot.npages:
            _update_mixed(kvm, slot, gfn, level, attrs)


cdef kvm_memory_slot *_next_slot_in(kvm *kvm, uint64_t *index, uint64_t end) noexcept nogil:
    """The next memslot overlapping [*index, end), advancing *index past it."""
    cdef uint64_t first, v
    cdef int order
    cdef kvm_memory_slot *slot
    if index[0] >= end or not xa_find_entry(&kvm.gfn_to_slot, index[0], end - 1, XA_NO_MARK,
                                            &first, &order, &v):
        return NULL
    slot = &kvm.memslots[v]
    index[0] = slot.base_gfn + slot.npages
    return slot


cdef void kvm_scramble_range(kvm *kvm, uint64_t start, uint64_t end) noexcept nogil:
    """The option for SW_PROTECTED VMs: a page that changes between private and shared reads
    back as garbage (as if encrypted with another key) instead of keeping its bytes."""
    cdef uint64_t index = start, gfn, idx, v, first
    cdef int order
    cdef kvm_memory_slot *slot = _next_slot_in(kvm, &index, end)
    while slot != NULL:
        gfn = start if start > slot.base_gfn else slot.base_gfn
        while gfn < end and gfn < slot.base_gfn + slot.npages:
            idx = gfn - slot.base_gfn + slot.gmem_pgoff
            if slot.gmem_file != NULL and xa_lookup(&slot.gmem_file.inode.filemap, idx, &v, &first, &order):
                host_scramble_page(kvm.host, folio_get(&kvm.host.pm, <uint32_t>v).pfn + idx - first, gfn)
            gfn += 1
        slot = _next_slot_in(kvm, &index, end)


cdef int kvm_vm_set_mem_attributes(kvm *kvm, uint64_t start, uint64_t end, uint64_t attrs) noexcept nogil:
    cdef uint64_t index, s, e
    cdef kvm_memory_slot *slot
    cdef bint found = False
    cdef int r
    if kvm_range_has_memory_attributes(kvm, start, end, <uint64_t>0xFFFFFFFFFFFFFFFF, attrs):
        return 0
    # xa_reserve(): make the store below unable to fail before anything changes
    r = xa_split_at(&kvm.mem_attr_array, start)
    if r == 0:
        r = xa_split_at(&kvm.mem_attr_array, end)
    if r < 0:
        return r
    index = start
    slot = _next_slot_in(kvm, &index, end)
    while slot != NULL:
        if not found:
            found = True
            kvm_mmu_invalidate_begin(kvm)
        s = start if start > slot.base_gfn else slot.base_gfn
        e = end if end < slot.base_gfn + slot.npages else slot.base_gfn + slot.npages
        kvm_mmu_invalidate_range_add(kvm, s, e)
        kvm_arch_pre_set_memory_attributes(kvm, slot, s, e, attrs)
        slot = _next_slot_in(kvm, &index, end)
    r = xa_assign_range(&kvm.mem_attr_array, start, end - 1, attrs, attrs == 0)
    kvm.attr_memo_valid = 0
    if kvm.host.scramble_on_conversion and kvm.vm_type == KVM_X86_SW_PROTECTED_VM:
        kvm_scramble_range(kvm, start, end)
    index = start
    slot = _next_slot_in(kvm, &index, end)
    while slot != NULL:
        s = start if start > slot.base_gfn else slot.base_gfn
        e = end if end < slot.base_gfn + slot.npages else slot.base_gfn + slot.npages
        kvm_arch_post_set_memory_attributes(kvm, slot, s, e, attrs)
        kvm_gmem_restructure_slot(slot, s, e, attrs)
        slot = _next_slot_in(kvm, &index, end)
    if found:
        kvm_mmu_invalidate_end(kvm)
    return r


cdef void kvm_gmem_restructure_slot(kvm_memory_slot *slot, uint64_t s, uint64_t e, uint64_t attrs) noexcept nogil:
    """Huge gmem folios follow a conversion of the VM's attributes as the proposals' in-place
    conversion has them follow the file's (kvm_gmem_convert): split to shared, merge to
    private. A split a reference forbids leaves the folio whole (counted: the VM ioctl has no
    way to refuse), the 4K state is then the arch's, as with huge_split="never"."""
    cdef gmem_inode *inode
    if slot.gmem_file == NULL or slot.gmem_file.inode.page_order == 0:
        return
    inode = slot.gmem_file.inode
    s = s - slot.base_gfn + slot.gmem_pgoff
    e = e - slot.base_gfn + slot.gmem_pgoff
    if attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE:
        kvm_gmem_merge_private(inode, s, e)
    else:
        kvm_gmem_split_for_shared(inode, s, e)
