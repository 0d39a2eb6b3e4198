# The simulated machine (mm/ and the platform at boot): host physical memory, the contents
# of pages, the VMM's own memory behind its virtual addresses (get_user_pages), host CPU
# writes through the direct map, and the platform set up at boot (SNP's RMP on "amd"); and
# the model's own pages for page tables (gmem_page_pool, on _slab.pxi's chunks).

cdef enum:
    _PLATFORM_TYPES_AMD = (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SEV_VM) | \
        (1 << KVM_X86_SEV_ES_VM) | (1 << KVM_X86_SNP_VM)
    _PLATFORM_TYPES_INTEL = (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_TDX_VM)
    _PLATFORM_TYPES_NONE = 1 << KVM_X86_DEFAULT_VM

cdef extern from *:
    """
    #define GMEM_MMAP_MIN_ADDR (65536ULL)
    #define GMEM_TASK_SIZE_MAX (0x7FFFFFFFF000ULL)
    """
    const uint64_t MMAP_MIN_ADDR "GMEM_MMAP_MIN_ADDR"
    const uint64_t TASK_SIZE_MAX "GMEM_TASK_SIZE_MAX"  # the end of user memory (4-level paging)


# ------------------------------------------------------ the model's own pages
# Page tables are the model's memory, not the simulated host's: 4 KiB pages carved from the
# 2 MiB chunks of _slab.pxi, so 4 GiB of 4K mappings (8 MiB of tables) need four TLB entries.
# A page comes zeroed: a fresh chunk is zero (the OS zeroes it on first touch), and a page
# is zeroed by whoever frees it (the TDP MMU's teardown walk reads every entry anyway), so
# nothing memsets 4 KiB that a sparse table touches one line of. A freed host's chunks are
# kept, zeroed, for the next host.

cdef uint64_t *gmem_page_alloc_chunk(gmem_page_pool *pool) noexcept nogil:
    cdef void **grown
    cdef char *c
    if pool.nr_chunks == pool.cap_chunks:
        grown = <void **>realloc(pool.chunks, (pool.cap_chunks + 16) * sizeof(void *))
        if grown == NULL:
            return NULL
        pool.chunks = grown
        pool.cap_chunks += 16
    c = <char *>gmem_pool_chunk_get()
    if c == NULL:
        return NULL
    pool.chunks[pool.nr_chunks] = c
    pool.nr_chunks += 1
    pool.next = c + 4096
    pool.end = c + GMEM_POOL_CHUNK
    pool.nr_pages += 1
    return <uint64_t *>c


cdef inline uint64_t *gmem_page_alloc(gmem_page_pool *pool) noexcept nogil:
    """A zeroed 4 KiB page, or NULL (out of memory)."""
    cdef uint64_t *p = pool.free_list
    if p != NULL:
        pool.free_list = <uint64_t *><size_t>p[0]
        p[0] = 0
        gmem_prefetch(pool.free_list)      # the next pop's link: freed long ago, cold
    elif pool.next != pool.end:
        p = <uint64_t *>pool.next
        pool.next += 4096
    else:
        return gmem_page_alloc_chunk(pool)
    pool.nr_pages += 1
    return p


cdef inline void gmem_page_free(gmem_page_pool *pool, uint64_t *p) noexcept nogil:
    """Give back a page the caller has zeroed."""
    p[0] = <uint64_t><size_t>pool.free_list
    pool.free_list = p
    pool.nr_pages -= 1


cdef void gmem_page_pool_destroy(gmem_page_pool *pool) noexcept nogil:
    """Every page is back (zeroed): the chunks go to the process-wide cache."""
    cdef uint64_t *p = pool.free_list
    cdef uint64_t *nxt
    cdef uint32_t i
    while p != NULL:
        nxt = <uint64_t *><size_t>p[0]
        p[0] = 0
        p = nxt
    for i in range(pool.nr_chunks):
        gmem_pool_chunk_put(pool.chunks[i])
    free(pool.chunks)
    memset(pool, 0, sizeof(gmem_page_pool))


cdef void gmem_host_config_init(gmem_host_config *cfg) noexcept nogil:
    """The defaults of gmem.Host(): 64 GiB, "amd", Linux 7.2 and its policies."""
    memset(cfg, 0, sizeof(gmem_host_config))
    cfg.memory = (<uint64_t>64) << 30
    cfg.platform = GMEM_PLATFORM_AMD
    cfg.kernel = GMEM_KERNEL_7_2
    cfg.tdp = 1
    cfg.numa_nodes = 1
    cfg.sw_protected = 1
    cfg.memory_attributes = 1
    gmem_host_config_kernel(cfg)


cdef void gmem_host_config_kernel(gmem_host_config *cfg) noexcept nogil:
    """The policies each version has (DESIGN.md "Policies and kernel versions are data"):
    - rfc-2023: prepare whenever a folio is obtained, "prepared" left to the arch (the RFC's
      kvm_gmem_get_folio calls kvm_arch_gmem_prepare for every binding, tracking nothing);
    - 6.18: prepare at the first kvm_gmem_get_pfn, "prepared" is the folio's uptodate flag;
    - 7.2 and next: zero once (uptodate) but prepare on every kvm_gmem_get_pfn, SNP tracking
      preparedness in the RMP (7.0, "Remove kvm_gmem_populate()'s preparation tracking")."""
    cfg.prepare_policy = GMEM_PREPARE_ALLOC if cfg.kernel == GMEM_KERNEL_RFC_2023 else GMEM_PREPARE_FAULT
    cfg.prepared_tracking = GMEM_TRACK_GMEM if cfg.kernel == GMEM_KERNEL_6_18 else GMEM_TRACK_ARCH
    cfg.invalidate_policy = GMEM_INVALIDATE_FREE_FOLIO


cdef int gmem_host_create(const gmem_host_config *cfg, gmem_host **out, const char **why) noexcept nogil:
    cdef gmem_host *h
    cdef int t
    if cfg.memory == 0 or cfg.memory & 4095:
        why[0] = "memory must be a positive multiple of 4096 bytes"
        return -EINVAL
    if cfg.memory >> 12 > ((<uint64_t>1) << 40):
        why[0] = "memory above 4 PiB is not modelled"
        return -EINVAL
    if not GMEM_PLATFORM_NONE <= cfg.platform <= GMEM_PLATFORM_INTEL:
        why[0] = "unknown platform"
        return -EINVAL
    if not cfg.memory_attributes and (cfg.sw_protected or cfg.platform != GMEM_PLATFORM_NONE):
        why[0] = ("SW_PROTECTED, SEV-SNP and TDX VMs need KVM_SET_MEMORY_ATTRIBUTES "
                  "(their Kconfig selects KVM_GENERIC_MEMORY_ATTRIBUTES)")
        return -EINVAL
    if not (0 <= cfg.prepare_policy <= 1 and 0 <= cfg.prepared_tracking <= 1
            and 0 <= cfg.invalidate_policy <= 1 and 0 <= cfg.gmem_backing <= GMEM_BACKING_HUGETLB
            and 0 <= cfg.huge_split <= GMEM_HUGE_SPLIT_FRESH and 0 <= cfg.huge_merge <= GMEM_HUGE_MERGE_LAZY):
        why[0] = "unknown policy"
        return -EINVAL
    if not GMEM_KERNEL_RFC_2023 <= cfg.kernel <= GMEM_KERNEL_NEXT:
        why[0] = "unknown kernel version"
        return -EINVAL
    h = <gmem_host *>_calloc(1, sizeof(gmem_host))
    if h == NULL:
        why[0] = "out of memory"
        return -ENOMEM
    h.refcount = 1
    phys_init(&h.pm, 0, cfg.memory >> 12)
    if cfg.numa_nodes != 1 and phys_set_nodes(&h.pm, cfg.numa_nodes) < 0:
        phys_destroy(&h.pm)
        free(h)
        why[0] = "numa_nodes must be 1 to 8, each node at least 2 MiB"
        return -EINVAL
    hugetlb_init(&h.pm)
    if hugetlb_pool_grow(&h.pm, HSTATE_1G, cfg.hugetlb_pages_1g) < 0 or \
            hugetlb_pool_grow(&h.pm, HSTATE_2M, cfg.hugetlb_pages_2m) < 0:
        hugetlb_destroy(&h.pm)
        phys_destroy(&h.pm)
        free(h)
        why[0] = "hugetlb_pages: the memory cannot hold that pool"
        return -EINVAL
    h.gmem_backing = cfg.gmem_backing
    h.huge_split = cfg.huge_split
    h.huge_merge = cfg.huge_merge
    h.pm.pcp_enabled = 1
    xa_init(&h.page_data)
    xa_init(&h.user_pages)
    xa_init(&h.user_mapped)
    h.platform = cfg.platform
    h.kernel = cfg.kernel
    h.tdp = cfg.tdp != 0
    h.vm_types = (_PLATFORM_TYPES_AMD if cfg.platform == GMEM_PLATFORM_AMD else
                  _PLATFORM_TYPES_INTEL if cfg.platform == GMEM_PLATFORM_INTEL else _PLATFORM_TYPES_NONE)
    if cfg.sw_protected:
        h.vm_types |= 1 << KVM_X86_SW_PROTECTED_VM
    if not cfg.tdp:
        # without TDP: no SW_PROTECTED (needs the TDP MMU), no SEV (sev_hardware_setup needs
        # NPT), no TDX (tdx_bringup needs EPT)
        h.vm_types = 1 << KVM_X86_DEFAULT_VM
    h.memory_attributes = cfg.memory_attributes != 0
    h.prepare_policy = cfg.prepare_policy
    h.prepared_tracking = cfg.prepared_tracking
    h.invalidate_policy = cfg.invalidate_policy
    h.huge_folios = cfg.huge_folios != 0
    h.reattach_private = cfg.reattach_private != 0
    h.scramble_on_conversion = cfg.scramble_on_conversion != 0
    # "next": kvm.gmem_in_place_conversion (537ec2b15fdd) defaults to
    # !CONFIG_KVM_VM_MEMORY_ATTRIBUTES; off here, as in a kernel that keeps the per-VM ioctl
    # VMMs use today; gmem.Host(gmem_in_place_conversion=True) loads the module with it on
    h.gmem_in_place_conversion = 0
    h.content_memfd = cfg.content_memfd != 0
    h.tdx_huge_page = cfg.tdx_huge_page
    xa_init(&h.content_inodes)
    h.next_ino = 1
    h.next_asid = 1
    for t in range(KVM_MAX_VM_TYPES):
        kvm_x86_hooks_init(&h.hooks[t], t)
    if cfg.platform == GMEM_PLATFORM_AMD:
        snp_rmptable_init(h)
    out[0] = h
    return 0


cdef void gmem_host_put(gmem_host *h) noexcept nogil:
    """The last reference (its creator's, or the last VM's) frees the machine."""
    cdef uint64_t start = 0, first, v
    cdef int order
    h.refcount -= 1
    if h.refcount:
        return
    while xa_find_entry(&h.page_data, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        free(<void *><size_t>v)
        start = first + 1
    xa_destroy(&h.page_data)
    xa_destroy(&h.content_inodes)
    xa_destroy(&h.user_pages)
    xa_destroy(&h.user_mapped)
    snp_rmptable_destroy(h)
    hugetlb_destroy(&h.pm)
    phys_destroy(&h.pm)
    gmem_page_pool_destroy(&h.pt_pool)
    free(h.trace_buf)
    free(h)


cdef inline int _refuse(gmem_host *h, int err, const char *why) noexcept nogil:
    """A rule refuses: err (a -errno) comes back, why is kept for gmem_reason()."""
    h.reason = why
    return err


cdef const char *gmem_reason(const gmem_host *h) noexcept nogil:
    return h.reason


cdef uint64_t gmem_host_stat(const gmem_host *h, int which) noexcept nogil:
    return h.stats[which] if 0 <= which < HOST_NR_STATS else 0


cdef uint64_t gmem_host_free_pages(const gmem_host *h) noexcept nogil:
    return h.pm.nr_free_pages


# ------------------------------------------------------------- page contents

cdef inline void page_data_drop(gmem_host *host, uint64_t pfn, uint64_t n) noexcept nogil:
    """Forget the contents of [pfn, pfn + n): they read as zeros again."""
    # inline: while no page has contents (every cold fault of a fresh guest) nothing is called
    if host.content_inodes.nr_entries or host.page_data.nr_entries:
        _page_data_drop(host, pfn, n)


cdef void _page_data_drop(gmem_host *host, uint64_t pfn, uint64_t n) noexcept nogil:
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


cdef unsigned char *page_data_get(gmem_host *host, uint64_t pfn, bint create) noexcept nogil:
    """The 4 KiB of pfn, or NULL for a page of zeros (create: allocate them; NULL if out of
    memory)."""
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


cdef inline int host_write_fault(gmem_host *h, uint64_t pfn) noexcept nogil:
    """Does a host CPU write to pfn fault? The platform's check (SNP's RMP on "amd"), which
    counts it."""
    return h.rmp.enabled and snp_host_write_fault(h, pfn)


cdef void host_clear_pages(gmem_host *host, uint64_t pfn, uint64_t n) noexcept nogil:
    """clear_highpage of each page: a host write of zeros (a fault where the platform forbids
    the write is counted, the zeros are written as the model's contents anyway)."""
    cdef uint64_t i
    if host.rmp.enabled and host.rmp.entries.nr_entries:
        for i in range(n):
            host_write_fault(host, pfn + i)
    page_data_drop(host, pfn, n)


cdef void host_scramble_page(gmem_host *host, uint64_t pfn, uint64_t seed) noexcept nogil:
    """Fill pfn with pseudo-random bytes from seed (xorshift): what a page encrypted under
    another key reads as."""
    cdef unsigned char *p = page_data_get(host, pfn, True)
    cdef uint64_t x = seed * (<uint64_t>0x9E3779B97F4A7C15) + 1
    cdef int i
    if p == NULL:
        return
    for i in range(4096):
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        p[i] = x & 0xFF


cdef int host_copy_page(gmem_host *host, uint64_t dst, uint64_t src) noexcept nogil:
    """copy_page of src's contents to dst (zeros if src has none): 0 or -ENOMEM."""
    cdef unsigned char *s = page_data_get(host, src, False)
    cdef unsigned char *d
    if s == NULL:
        page_data_drop(host, dst, 1)
        return 0
    d = page_data_get(host, dst, True)
    if d == NULL:
        return -ENOMEM
    memcpy(d, s, 4096)
    return 0


# ------------------------------------------------------- the VMM's own memory

cdef int host_copy_from_user(gmem_host *host, uint64_t dst, uint64_t hva) noexcept nogil:
    """copy_from_user of one page at hva (any alignment: two source pages then) into pfn
    dst: 0, -EFAULT where the VMM has nothing mapped, or -ENOMEM."""
    cdef uint64_t spfn, done = 0, n
    cdef unsigned char *s
    cdef unsigned char *d = page_data_get(host, dst, True)
    if d == NULL:
        return -ENOMEM
    while done < 4096:
        n = min(4096 - done, 4096 - ((hva + done) & 4095))
        if hva_to_pfn(host, hva + done, &spfn):
            return -EFAULT
        s = page_data_get(host, spfn, False)
        if s != NULL:
            memcpy(d + done, s + ((hva + done) & 4095), n)
        else:
            memset(d + done, 0, n)
        done += n
    return 0


cdef inline bint host_user_access_ok(uint64_t hva, uint64_t n) noexcept nogil:
    """access_ok(): [hva, hva + n) lies below TASK_SIZE_MAX and does not wrap."""
    return hva + n >= hva and hva + n <= TASK_SIZE_MAX


cdef int host_mmap_user(gmem_host *h, uint64_t addr, uint64_t size) noexcept nogil:
    """The VMM maps [addr, addr + size) (anonymous memory, its pages zero until written):
    0, or -EINVAL outside user memory, -ENOMEM."""
    if size == 0 or addr & 4095 or size & 4095 or addr < MMAP_MIN_ADDR or not host_user_access_ok(addr, size):
        return -EINVAL
    return xa_store_range(&h.user_mapped, addr >> 12, ((addr + size) >> 12) - 1, 1)


cdef void host_munmap_user(gmem_host *h, uint64_t addr, uint64_t size) noexcept nogil:
    """The VMM unmaps [addr, addr + size): its pages go back to the host (the caller ran the
    mmu notifiers first)."""
    cdef uint64_t start = addr >> 12, last = ((addr + size) >> 12) - 1, first, v
    cdef int order
    while xa_find_entry(&h.user_pages, start, last, XA_NO_MARK, &first, &order, &v):
        page_data_drop(h, folio_get(&h.pm, <uint32_t>v).pfn, 1)
        folio_free(&h.pm, <uint32_t>v)
        xa_erase(&h.user_pages, first, &v)
        start = first + 1
    xa_assign_range(&h.user_mapped, addr >> 12, last, 0, True)


cdef int hva_to_pfn(gmem_host *host, uint64_t hva, uint64_t *pfn) noexcept nogil:
    """get_user_pages of the VMM's memory behind an hva: a 4K page allocated at first touch
    where the VMM has memory mapped, else -EFAULT."""
    cdef uint64_t v, old
    cdef uint32_t id
    if hva < MMAP_MIN_ADDR or hva >= TASK_SIZE_MAX or not xa_load(&host.user_mapped, hva >> 12, &v):
        return -EFAULT              # below mmap_min_addr, not user memory, or nothing mapped
    if xa_load(&host.user_pages, hva >> 12, &v):
        pfn[0] = folio_get(&host.pm, <uint32_t>v).pfn
        return 0
    if folio_alloc(&host.pm, 0, &id) < 0:
        host.stats[HOST_STAT_ALLOC_FAILURES] += 1
        return -ENOMEM
    if xa_store_order(&host.user_pages, hva >> 12, 0, id, &old) < 0:
        folio_free(&host.pm, id)
        return -ENOMEM
    pfn[0] = folio_get(&host.pm, id).pfn
    return 0


# ------------------------------------------------------------ fault injection

cdef void gmem_inject(gmem_host *h, uint64_t alloc_failures, uint64_t prepare_failures,
                      int prepare_errno, uint64_t rmpupdate_failures, int rmpupdate_code) noexcept nogil:
    """Arm (or, with zeros, disarm) the injected failures: page allocations (ENOMEM), arch
    prepares (-prepare_errno) and, on "amd", RMPUPDATEs (rmpupdate_code)."""
    h.pm.fail_alloc = alloc_failures
    h.fail_prepare = prepare_failures
    h.fail_prepare_errno = prepare_errno
    snp_inject_rmpupdate_failures(h, rmpupdate_failures, rmpupdate_code)


cdef size_t gmem_host_memory_bytes(const gmem_host *h) noexcept nogil:
    """C memory of the model's own bookkeeping of host memory (free areas, memmap, folio table,
    page contents, the VMM's pages)."""
    cdef size_t n = sizeof(gmem_host) + phys_memory_bytes(&h.pm)
    n += xa_memory_bytes(&h.page_data) + 4096 * h.page_data.nr_entries
    return n + xa_memory_bytes(&h.user_pages)


cdef uint8_t host_page_platform_state(gmem_host *h, uint64_t pfn) noexcept nogil:
    """The platform's view of a page (gmem.page_states' rmp): 0 shared, 1 assigned to a guest,
    2 assigned and validated (SNP's RMP; always 0 elsewhere)."""
    if h.platform != GMEM_PLATFORM_AMD:
        return 0
    return snp_page_state(h, pfn)
