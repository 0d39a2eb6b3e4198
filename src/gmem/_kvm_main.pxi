# virt/kvm/kvm_main.c: memslot lookup, memory attributes, the invalidation
# sequence and zapping (the generic parts of KVM gmem relies on).

from libc.stdlib cimport calloc as _calloc

cdef enum:
    _ENODEV = 19
    _EINTR = 4
    _EFAULT = 14
    _EIO = 5
    _EHWPOISON = 133
    _EOPNOTSUPP = 95
    KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
    KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
    KVM_MEM_READONLY = 1 << 1
    KVM_MEM_GUEST_MEMFD = 1 << 2
    KVM_MEMSLOT_GMEM_ONLY = 1 << 17     # internal (bits 16-31 are never userspace's)
    GUEST_MEMFD_FLAG_MMAP = 1 << 0
    GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

cdef extern from *:
    # a constant, not a module variable
    """
    #define GMEM_INVALID_GFN (0xFFFFFFFFFFFFFFFFULL)
    """
    const uint64_t INVALID_GFN "GMEM_INVALID_GFN"


cdef inline uint64_t _mask(int order) noexcept nogil:
    return ((<uint64_t>1) << order) - 1


cdef inline int _level_order(int level) noexcept nogil:
    # KVM_HPAGE_GFN_SHIFT(level)
    return (level - 1) * 9


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


# ------------------------------------------------------------------ memslots

cdef kvm_memory_slot *gfn_to_memslot(kvm *kvm, uint64_t gfn) noexcept nogil:
    return __gfn_to_memslot(kvm, gfn)


cdef inline kvm_memory_slot *__gfn_to_memslot(kvm *kvm, uint64_t gfn, bint update=True) noexcept nogil:
    """update=False: a lookup that changes nothing (the batch prefetch)."""
    cdef kvm_memory_slot *s
    if kvm.last_used_slot >= 0:
        # the kernel's last_used_slot: consecutive lookups mostly hit one slot
        s = &kvm.memslots[kvm.last_used_slot]
        if s.used and gfn - s.base_gfn < s.npages:
            return s
    return search_memslots(kvm, gfn, update)


cdef kvm_memory_slot *search_memslots(kvm *kvm, uint64_t gfn, bint update) noexcept nogil:
    cdef uint64_t idx
    if xa_load(&kvm.gfn_to_slot, gfn, &idx):
        if update:
            kvm.last_used_slot = idx
        return &kvm.memslots[idx]
    return NULL


cdef inline int kvm_slot_has_gmem(const kvm_memory_slot *slot) noexcept nogil:
    return slot != NULL and (slot.flags & KVM_MEM_GUEST_MEMFD) != 0


cdef inline int kvm_memslot_is_gmem_only(const kvm_memory_slot *slot) noexcept nogil:
    # 6.18: a slot flag kvm_gmem_bind sets when the file has GUEST_MEMFD_FLAG_MMAP; it
    # outlives the file (kvm_gmem_release only clears slot->gmem.file), so a dead gmem-only
    # slot still faults through kvm_gmem_get_pfn (-EFAULT), never through userspace_addr
    return slot != NULL and (slot.flags & KVM_MEMSLOT_GMEM_ONLY) != 0


cdef inline uint32_t *lpage_info_slot(kvm_memory_slot *slot, uint64_t gfn, int level) noexcept nogil:
    cdef int o = _level_order(level)
    return &slot.lpage_info[level - 2][(gfn >> o) - (slot.base_gfn >> o)]


cdef uint64_t lpage_info_count(const kvm_memory_slot *slot, int level) noexcept nogil:
    cdef int o = _level_order(level)
    return ((slot.base_gfn + slot.npages - 1) >> o) - (slot.base_gfn >> o) + 1


# ---------------------------------------------------------- memory attributes

cdef inline uint64_t kvm_get_memory_attributes(kvm *kvm, uint64_t gfn) noexcept nogil:
    if kvm.attr_memo_valid and gfn - kvm.attr_memo_first <= kvm.attr_memo_last - kvm.attr_memo_first:
        # a fault asks twice (vendor entry, then faultin), and neighbours share one entry
        return kvm.attr_memo_val
    return kvm_get_memory_attributes_memo(kvm, gfn)


cdef uint64_t kvm_get_memory_attributes_memo(kvm *kvm, uint64_t gfn) noexcept nogil:
    """The attributes at gfn from the XArray, memoized with the extent of their entry."""
    cdef uint64_t v, first
    cdef int order
    if xa_lookup(&kvm.mem_attr_array, gfn, &v, &first, &order):
        kvm.attr_memo_first, kvm.attr_memo_last = first, first + _mask(order)
    else:
        v = 0
        kvm.attr_memo_first = kvm.attr_memo_last = gfn
    kvm.attr_memo_val, kvm.attr_memo_valid = v, 1
    return v


cdef inline int _kvm_mem_is_private(kvm *kvm, uint64_t gfn) noexcept nogil:
    return (kvm_get_memory_attributes(kvm, gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0


cdef int kvm_mem_is_private(kvm *kvm, uint64_t gfn) noexcept nogil:
    return _kvm_mem_is_private(kvm, gfn)


cdef int kvm_range_has_memory_attributes(kvm *kvm, uint64_t start, uint64_t end,
                                         uint64_t mask, uint64_t attrs) noexcept nogil:
    """Every gfn in [start, end) has (attributes & mask) == attrs (kvm_main.c)."""
    cdef uint64_t index = start, first, v
    cdef int order
    if not kvm.has_private_mem:
        mask = 0
    else:
        mask &= KVM_MEMORY_ATTRIBUTE_PRIVATE
    if attrs & ~mask:
        return 0
    if end <= start:
        return 1
    if attrs == 0:
        # absent entries read as 0: no entry in range may have a masked bit set
        while xa_find_entry(&kvm.mem_attr_array, index, end - 1, XA_NO_MARK, &first, &order, &v):
            if v & mask:
                return 0
            if first + _mask(order) >= end - 1:
                return 1
            index = first + _mask(order) + 1
        return 1
    while index < end:
        if not xa_lookup(&kvm.mem_attr_array, index, &v, &first, &order) or (v & mask) != attrs:
            return 0
        if first + _mask(order) >= end - 1:
            return 1
        index = first + _mask(order) + 1
    return 1


# --------------------------------------------------------- KVM_PRE_FAULT_MEMORY

ctypedef struct kvm_pre_fault_memory:
    uint64_t gpa
    uint64_t size
    uint64_t flags


cdef int kvm_vcpu_pre_fault_memory(kvm_vcpu *vcpu, kvm_pre_fault_memory *range) noexcept nogil:
    """The ioctl's loop (its argument checks are at the Python boundary): range advances past
    what each step covered; the error comes back only if nothing was done."""
    cdef uint64_t full_size = range.size
    cdef int64_t r
    while True:
        r = kvm_arch_vcpu_pre_fault_memory(vcpu, range.gpa, range.size)
        if r <= 0:
            break                   # r == 0 and -EIO are WARN_ON_ONCE in the kernel
        range.size -= r
        range.gpa += r
        if range.size == 0:
            break
    return <int>r if full_size == range.size else 0


# ------------------------------------------------------ invalidation and zap

cdef void kvm_mmu_invalidate_begin(kvm *kvm) noexcept nogil:
    kvm.mmu_invalidate_in_progress += 1
    if kvm.mmu_invalidate_in_progress == 1:
        kvm.mmu_invalidate_range_start = INVALID_GFN
        kvm.mmu_invalidate_range_end = INVALID_GFN
    kvm.stats[VM_STAT_MMU_INVALIDATIONS] += 1


cdef void kvm_mmu_invalidate_range_add(kvm *kvm, uint64_t start, uint64_t end) noexcept nogil:
    if kvm.mmu_invalidate_range_start == INVALID_GFN:
        kvm.mmu_invalidate_range_start = start
        kvm.mmu_invalidate_range_end = end
    else:
        if start < kvm.mmu_invalidate_range_start:
            kvm.mmu_invalidate_range_start = start
        if end > kvm.mmu_invalidate_range_end:
            kvm.mmu_invalidate_range_end = end


cdef void kvm_mmu_invalidate_end(kvm *kvm) noexcept nogil:
    kvm.mmu_invalidate_seq += 1
    kvm.mmu_invalidate_in_progress -= 1


cdef int mmu_invalidate_retry_gfn(kvm *kvm, uint64_t mmu_seq, uint64_t gfn) noexcept nogil:
    if kvm.mmu_invalidate_in_progress:
        if gfn >= kvm.mmu_invalidate_range_start and gfn < kvm.mmu_invalidate_range_end:
            return 1
    return kvm.mmu_invalidate_seq != mmu_seq


# SPTE encoding in the sptes xarray: pfn << 8 | private << 3 | writable << 2 | level
cdef enum:
    SPTE_LEVEL_MASK = 3
    SPTE_WRITABLE = 1 << 2
    SPTE_PRIVATE = 1 << 3
    SPTE_PFN_SHIFT = 8


cdef inline uint64_t make_spte(uint64_t pfn, int level, bint writable, bint private) noexcept nogil:
    return (pfn << SPTE_PFN_SHIFT) | (SPTE_PRIVATE if private else 0) | \
           (SPTE_WRITABLE if writable else 0) | level


cdef uint64_t kvm_unmap_gfn_range(kvm *kvm, uint64_t start, uint64_t end, int filter) noexcept nogil:
    """Zap the SPTEs overlapping [start, end) that pass filter (0: all): huge ones whole."""
    cdef uint64_t index = start, first, v, zapped = 0
    cdef int order
    if end <= start:
        return 0
    if kvm.vm_type != KVM_X86_TDX_VM:
        filter = 0          # one (direct) root: the filter only picks TDX's mirror or direct root
    while xa_find_entry(&kvm.sptes, index, end - 1, XA_NO_MARK, &first, &order, &v):
        if (filter == 0 or (filter == KVM_FILTER_PRIVATE and (v & SPTE_PRIVATE))
                or (filter == KVM_FILTER_SHARED and not (v & SPTE_PRIVATE))):
            xa_erase(&kvm.sptes, first, &v)
            if v & SPTE_PRIVATE and kvm.host.hooks[kvm.vm_type].remove_external_spte != NULL:
                kvm.host.hooks[kvm.vm_type].remove_external_spte(kvm, first, v & SPTE_LEVEL_MASK,
                                                                 v >> SPTE_PFN_SHIFT)
            gmem_trace(kvm.host, TRACE_SPTE_ZAP, 0, first, v >> SPTE_PFN_SHIFT, v & SPTE_LEVEL_MASK, 0)
            zapped += 1
        if first + _mask(order) >= end - 1:
            break
        index = first + _mask(order) + 1
    if filter != KVM_FILTER_PRIVATE:
        xa_erase_range(&kvm.mmio_sptes, start, end - 1)
    if zapped:
        kvm.stats[VM_STAT_ZAPPED_SPTES] += zapped
        kvm.stats[VM_STAT_REMOTE_TLB_FLUSH] += 1
    return zapped


cdef void kvm_zap_gfn_range_invalidate(kvm *kvm, uint64_t start, uint64_t end, int filter) noexcept nogil:
    """A whole invalidation (begin, range_add, unmap, end) of [start, end)."""
    kvm_mmu_invalidate_begin(kvm)
    kvm_mmu_invalidate_range_add(kvm, start, end)
    kvm_unmap_gfn_range(kvm, start, end, filter)
    kvm_mmu_invalidate_end(kvm)
