# Inspection for pictures, tests and check(): C views across the layers that no kernel
# function has (gmem.page_states), built only from the layers' own accessors.

ctypedef packed struct gmem_page_state:
    # laid out as gmem.PAGE_STATE_DTYPE
    uint64_t gfn
    uint8_t private
    uint8_t backed
    uint8_t prepared
    uint8_t level
    uint8_t rmp
    uint64_t pfn


cdef void kvm_page_states(kvm *kvm, uint64_t gfn0, uint64_t n, gmem_page_state *out) noexcept nogil:
    """Each guest page's state (gmem.page_states): attribute, gmem backing and preparedness,
    SPTE level, and the platform's view of the page (kvm_page_platform_state)."""
    cdef uint64_t i, gfn, pfn, idx, v, first
    cdef int level, order
    cdef bint private
    cdef kvm_memory_slot *slot
    cdef folio *f
    memset(out, 0, n * sizeof(gmem_page_state))
    if kvm.dead:
        return
    for i in range(n):
        gfn = gfn0 + i
        out[i].gfn = gfn
        out[i].private = kvm_mem_is_private(kvm, gfn)
        if kvm_mmu_spte_lookup(kvm, gfn, &pfn, &level, &private):
            out[i].level = level
        slot = gfn_to_memslot(kvm, gfn)
        if slot != NULL and slot.gmem_file != NULL:
            idx = gfn - slot.base_gfn + slot.gmem_pgoff
            if xa_lookup(&slot.gmem_file.inode.filemap, idx, &v, &first, &order):
                f = folio_get(&kvm.host.pm, <uint32_t>v)
                out[i].backed = 1
                out[i].prepared = (f.flags & PG_uptodate) != 0
                out[i].pfn = f.pfn + idx - first
                out[i].rmp = host_page_platform_state(kvm.host, out[i].pfn)
