# virt/kvm/kvm_main.c: VMs and vCPUs, memslots (__kvm_set_memory_region), memory
# attribute lookups, KVM_PRE_FAULT_MEMORY, KVM_CHECK_EXTENSION (generic part), and the
# mmu_notifier invalidation sequence.  Every rule returns 0 or -errno; a refused call names
# its rule in host->reason (gmem_reason()).

from libc.stdlib cimport calloc as _calloc

cdef enum:
    # capabilities the generic part answers (include/uapi/linux/kvm.h)
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SYNC_MMU = 16
    KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
    KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
    KVM_CAP_INTERNAL_ERROR_DATA = 40
    KVM_CAP_IRQFD = 32
    KVM_CAP_SIGNAL_MSI = 77
    KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
    KVM_CAP_CHECK_EXTENSION_VM = 105
    KVM_CAP_ENABLE_CAP_VM = 98
    KVM_CAP_HALT_POLL = 182
    KVM_CAP_BINARY_STATS_FD = 203
    KVM_CAP_SYSTEM_EVENT_DATA = 215
    KVM_CAP_DEVICE_CTRL = 89
    KVM_CAP_COALESCED_PIO = 162
    KVM_CAP_COALESCED_MMIO = 15
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_DIRTY_LOG_RING = 192
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
    KVM_COALESCED_MMIO_PAGE_OFFSET = 2
    KVM_DIRTY_LOG_MANUAL_CAPS = 3
    KVM_MAX_IRQ_ROUTES = 4096
    KVM_DIRTY_RING_MAX_BYTES = 65536 * 16       # KVM_DIRTY_RING_MAX_ENTRIES * sizeof(kvm_dirty_gfn)
    KVM_MEMSLOT_GMEM_ONLY = 1 << 17     # internal (bits 16-31 are never userspace's)
    KVM_MR_CREATE = 0
    KVM_MR_DELETE = 1
    KVM_MR_MOVE = 2
    KVM_MR_FLAGS_ONLY = 3
    KVM_MEM_SLOTS_NUM = 32767           # SHRT_MAX
    KVM_USER_MEM_SLOTS = 32764          # KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS (x86: 3)
    KVM_MEM_MAX_NR_PAGES = 0x7FFFFFFF   # (1UL << 31) - 1

cdef extern from *:
    # constants, not module variables
    """
    #define GMEM_INVALID_GFN (0xFFFFFFFFFFFFFFFFULL)
    """
    const uint64_t INVALID_GFN "GMEM_INVALID_GFN"


cdef inline uint64_t _mask(int order) noexcept nogil:
    return ((<uint64_t>1) << order) - 1


cdef inline int _level_order(int level) noexcept nogil:
    # KVM_HPAGE_GFN_SHIFT(level)
    return (level - 1) * 9


# ----------------------------------------------------------------------- VMs

cdef int kvm_create_vm(gmem_host *h, uint64_t vm_type, kvm **out) noexcept nogil:
    """KVM_CREATE_VM: kvm_arch_init_vm refuses a type the host does not offer."""
    cdef kvm *k
    cdef kvm **pp
    cdef int r
    if vm_type >= KVM_MAX_VM_TYPES or not (h.vm_types >> vm_type) & 1:
        return _refuse(h, -EINVAL, "KVM_CREATE_VM: the VM type is not in KVM_CAP_VM_TYPES "
                       "(kvm_arch_init_vm)")
    k = <kvm *>_calloc(1, sizeof(kvm))
    if k != NULL:
        k.vcpus = <kvm_vcpu **>_calloc(KVM_MAX_VCPU_IDS, sizeof(kvm_vcpu *))
    if k == NULL or k.vcpus == NULL:
        free(k)
        return _refuse(h, -ENOMEM, "KVM_CREATE_VM: out of memory")
    k.host = h
    k.users_count = 1                   # the VM fd
    k.vm_type = <int>vm_type            # indexes the host's hook table
    k.last_used_slot = -1
    xa_init(&k.slot_index)
    xa_init(&k.gfn_to_slot)
    xa_init(&k.mem_attr_array)
    xa_init(&k.mmio_sptes)
    k.tdp_mmu_gen = 1                   # (a cursor of zeroes trusts nothing)
    r = kvm_arch_init_vm(k)
    if r < 0:
        free(k.vcpus)
        free(k)
        return r
    h.refcount += 1
    h.nr_vms_created += 1
    k.id = h.nr_vms_created
    pp = &h.vms                         # listed oldest first: check() reports in that order
    while pp[0] != NULL:
        pp = &pp[0].next
    pp[0] = k
    out[0] = k
    return 0


cdef int kvm_vm_type(const kvm *kvm) noexcept nogil:
    return kvm.vm_type


cdef inline void kvm_get_kvm(kvm *kvm) noexcept nogil:
    kvm.users_count += 1


cdef void kvm_put_kvm(kvm *kvm) noexcept nogil:
    """The last kernel reference destroys the VM; its struct goes once no handle holds it."""
    kvm.users_count -= 1
    if kvm.users_count == 0:
        kvm_destroy_vm(kvm)


cdef void kvm_destroy_vm(kvm *kvm) noexcept nogil:
    """kvm_destroy_vm: every mapping goes, memslots unbind from their files, the arch gives
    back what it holds; the vCPUs and the struct stay for the handles still pointing here."""
    cdef uint32_t i
    kvm_unmap_gfn_range(kvm, 0, <uint64_t>0xFFFFFFFFFFFFFFFF, 0)
    for i in range(kvm.nr_memslots):
        if kvm.memslots[i].used:
            kvm_gmem_unbind(kvm, &kvm.memslots[i])
    kvm_arch_destroy_vm(kvm)
    for i in range(kvm.nr_memslots):
        if kvm.memslots[i].used:
            kvm_free_memslot(&kvm.memslots[i])
    free(kvm.memslots)
    kvm.memslots = NULL
    kvm.nr_memslots = 0
    kvm.last_used_slot = -1
    kvm.attr_memo_valid = 0
    xa_destroy(&kvm.slot_index)
    xa_destroy(&kvm.gfn_to_slot)
    xa_destroy(&kvm.mem_attr_array)
    kvm_mmu_uninit_tdp_mmu(kvm)
    xa_destroy(&kvm.mmio_sptes)
    _kvm_unlist(kvm.host, kvm)
    kvm.dead = 1
    if kvm.handle_refs == 0:
        kvm_free(kvm)


cdef void _kvm_unlist(gmem_host *h, kvm *k) noexcept nogil:
    cdef kvm **pp = &h.vms
    while pp[0] != NULL:
        if pp[0] == k:
            pp[0] = k.next
            break
        pp = &pp[0].next
    k.next = NULL


cdef void kvm_free(kvm *kvm) noexcept nogil:
    cdef gmem_host *h = kvm.host
    cdef uint32_t i
    for i in range(KVM_MAX_VCPU_IDS):
        free(kvm.vcpus[i])
    free(kvm.vcpus)
    free(kvm)
    gmem_host_put(h)


cdef void kvm_handle_get(kvm *kvm) noexcept nogil:
    """A handle points at kvm: its struct (and vCPUs) outlive kvm_destroy_vm until released."""
    kvm.handle_refs += 1


cdef void kvm_handle_put(kvm *kvm) noexcept nogil:
    kvm.handle_refs -= 1
    if kvm.handle_refs == 0 and kvm.dead:
        kvm_free(kvm)


cdef int kvm_vm_ioctl_create_vcpu(kvm *kvm, uint64_t id, kvm_vcpu **out) noexcept nogil:
    cdef vcpu_create_t vcpu_create = kvm.host.hooks[kvm.vm_type].vcpu_create
    cdef kvm_vcpu *v
    cdef int r
    if id >= KVM_MAX_VCPU_IDS:
        return _refuse(kvm.host, -EINVAL, "KVM_CREATE_VCPU: id >= KVM_MAX_VCPU_IDS")
    if kvm.vcpus[id] != NULL:
        return _refuse(kvm.host, -EEXIST, "KVM_CREATE_VCPU: a vCPU with this id exists")
    v = <kvm_vcpu *>_calloc(1, sizeof(kvm_vcpu))
    if v == NULL:
        return _refuse(kvm.host, -ENOMEM, "KVM_CREATE_VCPU: out of memory")
    v.kvm = kvm
    v.vcpu_id = <uint32_t>id
    r = vcpu_create(v) if vcpu_create != NULL else 0
    if r:
        free(v)
        return r
    kvm_mmu_create(v)
    kvm.vcpus[id] = v
    kvm.created_vcpus += 1
    out[0] = v
    return 0


cdef void kvm_vm_dead(kvm *kvm) noexcept nogil:
    """kvm_vm_dead (include/linux/kvm_host.h): KVM_REQ_VM_DEAD to every vCPU; from now on
    every VM and vCPU ioctl, KVM_RUN included, is -EIO. The VM stays until its fds close."""
    cdef uint32_t i
    kvm.vm_dead = 1
    for i in range(KVM_MAX_VCPU_IDS):
        if kvm.vcpus[i] != NULL:
            kvm.vcpus[i].pre_run_err = -EIO


cdef int kvm_ioctl_check_dead(kvm *kvm) noexcept nogil:
    """kvm_vm_ioctl, kvm_vcpu_ioctl: a dead VM answers -EIO before the command is read."""
    if kvm.vm_dead:
        return _refuse(kvm.host, -EIO, "the VM is dead (kvm_vm_dead): every VM and vCPU ioctl "
                       "is -EIO")
    return 0


cdef kvm_vcpu *kvm_get_vcpu_by_id(kvm *kvm, uint64_t id) noexcept nogil:
    return kvm.vcpus[id] if id < KVM_MAX_VCPU_IDS else NULL


cdef uint64_t kvm_vm_stat(const kvm *kvm, int which) noexcept nogil:
    return kvm.stats[which] if 0 <= which < VM_NR_STATS else 0


cdef uint64_t kvm_vcpu_stat(const kvm_vcpu *vcpu, int which) noexcept nogil:
    return vcpu.stats[which] if 0 <= which < VCPU_NR_STATS else 0


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


cdef kvm_memory_slot *id_to_memslot(kvm *kvm, uint32_t id) noexcept nogil:
    cdef uint64_t v
    if xa_load(&kvm.slot_index, id, &v):
        return &kvm.memslots[v]
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


cdef int check_memory_region_flags(kvm *kvm, const kvm_userspace_memory_region2 *mem) noexcept nogil:
    """6.18: guest_memfd for every VM type; READONLY only without protected state."""
    cdef uint32_t valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD
    if mem.flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    elif not kvm.has_protected_state:
        valid |= KVM_MEM_READONLY
    if mem.flags & ~valid:
        return _refuse(kvm.host, -EINVAL, "flags not valid for this VM (check_memory_region_flags)")
    return 0


cdef int kvm_set_memory_region(kvm *kvm, const kvm_userspace_memory_region2 *mem, int v2,
                               gmem_file *file, int fdget_err) noexcept nogil:
    """__kvm_set_memory_region: the checks in the kernel's order, then create, delete, move
    or change flags."""
    cdef gmem_host *h = kvm.host
    cdef kvm_memory_slot *old
    cdef uint64_t npages, base_gfn, size = mem.memory_size, gpa = mem.guest_phys_addr
    cdef uint64_t hva = mem.userspace_addr, offset = mem.guest_memfd_offset
    cdef uint32_t as_id = mem.slot >> 16, id = mem.slot & 0xFFFF
    cdef int r, change
    # kvm_vm_ioctl: the v1 struct's flags, then the user slot id, then kvm_set_memory_region
    if not v2 and mem.flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
        return _refuse(h, -EINVAL, "these flags need KVM_SET_USER_MEMORY_REGION2")
    if id >= KVM_USER_MEM_SLOTS:
        return _refuse(h, -EINVAL, "slot id >= KVM_USER_MEM_SLOTS")
    r = check_memory_region_flags(kvm, mem)
    if r:
        return r
    if size & 4095:
        return _refuse(h, -EINVAL, "memory_size is not page aligned")
    if gpa & 4095:
        return _refuse(h, -EINVAL, "guest_phys_addr is not page aligned")
    if hva & 4095 or hva + size < hva or hva + size > TASK_SIZE_MAX:
        return _refuse(h, -EINVAL, "userspace_addr is misaligned or not access_ok()")
    if mem.flags & KVM_MEM_GUEST_MEMFD and (offset & 4095 or offset + size < offset):
        return _refuse(h, -EINVAL, "guest_memfd_offset is misaligned or wraps")
    if as_id >= 1 or id >= KVM_MEM_SLOTS_NUM:
        return _refuse(h, -EINVAL, "the address space does not exist (KVM_MAX_NR_ADDRESS_SPACES 1)")
    if gpa + size < gpa:
        return _refuse(h, -EINVAL, "guest_phys_addr + memory_size wraps")
    npages = size >> 12
    if npages > KVM_MEM_MAX_NR_PAGES:
        return _refuse(h, -EINVAL, "more than KVM_MEM_MAX_NR_PAGES pages")
    old = id_to_memslot(kvm, mem.slot)
    if npages == 0:
        if old == NULL:
            return _refuse(h, -EINVAL, "deleting a memslot that does not exist")
        kvm_delete_memslot(kvm, old)
        kvm.memslots_generation += 1
        return 0
    base_gfn = gpa >> 12
    change = KVM_MR_CREATE
    if old != NULL:
        if mem.flags & KVM_MEM_GUEST_MEMFD:
            return _refuse(h, -EINVAL, "guest_memfd memslots are immutable, they can only be deleted")
        if hva != old.userspace_addr or npages != old.npages or \
                (mem.flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD):
            return _refuse(h, -EINVAL, "a modification may not change userspace_addr, size, "
                           "KVM_MEM_READONLY or KVM_MEM_GUEST_MEMFD")
        if base_gfn != old.base_gfn:
            change = KVM_MR_MOVE
        elif mem.flags != (old.flags & 0xFFFF):
            change = KVM_MR_FLAGS_ONLY
        else:
            return 0                    # nothing changes
    if change != KVM_MR_FLAGS_ONLY and kvm_check_memslot_overlap(kvm, old, base_gfn, npages):
        return _refuse(h, -EEXIST, "the gpa range overlaps another memslot")
    if change == KVM_MR_CREATE:
        if mem.flags & KVM_MEM_GUEST_MEMFD:
            r = kvm_gmem_bind_check(kvm, file, fdget_err, offset, npages)
        if r == 0:
            r = kvm_arch_prepare_memory_region(kvm, base_gfn, npages)
        if r == 0:
            r = kvm_create_memslot(kvm, mem, base_gfn, npages, file if mem.flags & KVM_MEM_GUEST_MEMFD else NULL)
    elif change == KVM_MR_MOVE:
        r = kvm_arch_prepare_memory_region(kvm, base_gfn, npages)
        if r == 0:
            r = kvm_move_memslot(kvm, old, base_gfn)
    else:
        old.flags = (old.flags & ~0xFFFF) | mem.flags
        kvm_unmap_gfn_range(kvm, old.base_gfn, old.base_gfn + old.npages, 0)
    if r == 0:
        kvm.memslots_generation += 1      # install_new_memslots: MMIO SPTEs go stale
    return r


cdef bint kvm_next_memslot(kvm *kvm, uint32_t *i, kvm_userspace_memory_region2 *mem, bint *bound) noexcept nogil:
    """The next memslot in kvm's array from *i on, as userspace set it (and whether its
    guest_memfd binding is live); *i past it."""
    cdef kvm_memory_slot *s
    while i[0] < kvm.nr_memslots:
        s = &kvm.memslots[i[0]]
        i[0] += 1
        if s.used:
            mem.slot, mem.flags = s.id, s.flags & 0xFFFF
            mem.guest_phys_addr, mem.memory_size = s.base_gfn << 12, s.npages << 12
            mem.userspace_addr, mem.guest_memfd_offset = s.userspace_addr, s.gmem_pgoff << 12
            mem.guest_memfd = 0
            bound[0] = s.gmem_file != NULL
            return 1
    return 0


cdef bint kvm_check_memslot_overlap(kvm *kvm, kvm_memory_slot *old, uint64_t base_gfn,
                                    uint64_t npages) noexcept nogil:
    cdef uint64_t f, v
    cdef int k
    return (xa_find_entry(&kvm.gfn_to_slot, base_gfn, base_gfn + npages - 1, XA_NO_MARK, &f, &k, &v)
            and &kvm.memslots[v] != old)


cdef int kvm_alloc_memslot(kvm *kvm) noexcept nogil:
    """A free entry of kvm->memslots (the array grows by 16), or -ENOMEM."""
    cdef uint32_t i
    cdef kvm_memory_slot *a
    for i in range(kvm.nr_memslots):
        if not kvm.memslots[i].used:
            return i
    a = <kvm_memory_slot *>realloc(kvm.memslots, (kvm.nr_memslots + 16) * sizeof(kvm_memory_slot))
    if a == NULL:
        return _refuse(kvm.host, -ENOMEM, "out of memory for the memslot array")
    memset(&a[kvm.nr_memslots], 0, 16 * sizeof(kvm_memory_slot))
    kvm.memslots = a
    kvm.last_used_slot = -1             # (the array moved)
    kvm.nr_memslots += 16
    return kvm.nr_memslots - 16


cdef int kvm_alloc_memslot_metadata(kvm *kvm, kvm_memory_slot *s) noexcept nogil:
    """lpage_info: disallow hugepages over misaligned slot edges and, when userspace_addr and
    base_gfn disagree modulo the hugepage size, over the whole slot (kvm_alloc_memslot_metadata)."""
    cdef int level, o
    cdef uint64_t n, j, ugfn = s.userspace_addr >> 12
    cdef uint32_t *info[2]
    info[0] = info[1] = NULL
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        info[level - 2] = <uint32_t *>_calloc(lpage_info_count(s, level), sizeof(uint32_t))
        if info[level - 2] == NULL:
            free(info[0])
            return _refuse(kvm.host, -ENOMEM, "out of memory for lpage_info")
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        o = _level_order(level)
        n = lpage_info_count(s, level)
        free(s.lpage_info[level - 2])
        s.lpage_info[level - 2] = info[level - 2]
        if s.base_gfn & _mask(o):
            info[level - 2][0] = 1
        if (s.base_gfn + s.npages) & _mask(o):
            info[level - 2][n - 1] = 1
        # every slot, guest_memfd ones included (kvm_alloc_memslot_metadata, all versions)
        if (s.base_gfn ^ ugfn) & _mask(o):
            for j in range(n):
                info[level - 2][j] = 1
    kvm_mmu_init_memslot_memory_attributes(kvm, s)
    return 0


cdef void kvm_free_memslot(kvm_memory_slot *s) noexcept nogil:
    free(s.lpage_info[0])
    free(s.lpage_info[1])
    memset(s, 0, sizeof(kvm_memory_slot))


cdef int kvm_create_memslot(kvm *kvm, const kvm_userspace_memory_region2 *mem, uint64_t base_gfn,
                            uint64_t npages, gmem_file *file) noexcept nogil:
    cdef int i = kvm_alloc_memslot(kvm)
    cdef kvm_memory_slot *s
    cdef uint64_t pgoff = mem.guest_memfd_offset >> 12
    if i < 0:
        return i
    s = &kvm.memslots[i]
    memset(s, 0, sizeof(kvm_memory_slot))
    s.base_gfn, s.npages, s.userspace_addr, s.flags, s.id = base_gfn, npages, mem.userspace_addr, \
        mem.flags, mem.slot
    if kvm_alloc_memslot_metadata(kvm, s) < 0:
        return -ENOMEM
    # the VMM mapped the memslot's memory before it created the slot
    if mem.userspace_addr >= MMAP_MIN_ADDR:
        host_mmap_user(kvm.host, mem.userspace_addr, npages << 12)
    if (xa_store_range(&kvm.gfn_to_slot, base_gfn, base_gfn + npages - 1, i) < 0
            or xa_assign_range(&kvm.slot_index, s.id, s.id, i, False) < 0
            or (file != NULL and kvm_gmem_bind(kvm, s, file, pgoff) < 0)):
        xa_assign_range(&kvm.gfn_to_slot, base_gfn, base_gfn + npages - 1, 0, True)
        xa_assign_range(&kvm.slot_index, s.id, s.id, 0, True)
        kvm_free_memslot(s)
        return _refuse(kvm.host, -ENOMEM, "out of memory for the memslot")
    s.used = 1
    return 0


cdef void kvm_delete_memslot(kvm *kvm, kvm_memory_slot *s) noexcept nogil:
    kvm_gmem_unbind(kvm, s)
    kvm_unmap_gfn_range(kvm, s.base_gfn, s.base_gfn + s.npages, 0)
    xa_assign_range(&kvm.gfn_to_slot, s.base_gfn, s.base_gfn + s.npages - 1, 0, True)
    xa_assign_range(&kvm.slot_index, s.id, s.id, 0, True)
    kvm_free_memslot(s)


cdef int kvm_move_memslot(kvm *kvm, kvm_memory_slot *s, uint64_t base_gfn) noexcept nogil:
    kvm_unmap_gfn_range(kvm, s.base_gfn, s.base_gfn + s.npages, 0)
    xa_assign_range(&kvm.gfn_to_slot, s.base_gfn, s.base_gfn + s.npages - 1, 0, True)
    s.base_gfn = base_gfn
    if xa_store_range(&kvm.gfn_to_slot, base_gfn, base_gfn + s.npages - 1, s - kvm.memslots) < 0:
        return _refuse(kvm.host, -ENOMEM, "out of memory moving the memslot")
    return kvm_alloc_memslot_metadata(kvm, s)


# ---------------------------------------------------------- memory attributes

cdef inline uint64_t _kvm_get_memory_attributes(kvm *kvm, uint64_t gfn) noexcept nogil:
    if kvm.attr_memo_valid and gfn - kvm.attr_memo_first <= kvm.attr_memo_last - kvm.attr_memo_first:
        # a fault asks twice (vendor entry, then faultin), and neighbours share one entry
        return kvm.attr_memo_val
    return kvm_get_memory_attributes_memo(kvm, gfn)


cdef uint64_t kvm_get_memory_attributes(kvm *kvm, uint64_t gfn) noexcept nogil:
    return _kvm_get_memory_attributes(kvm, gfn) if not kvm.dead else 0


cdef uint64_t kvm_get_memory_attributes_memo(kvm *kvm, uint64_t gfn) noexcept nogil:
    """The attributes at gfn from the XArray, memoized with the extent of their entry; with
    in-place conversion ("next"), the guest_memfd's (kvm_gmem_is_private_gfn), not memoized."""
    cdef uint64_t v, first
    cdef int order
    if kvm.host.gmem_in_place_conversion:
        return kvm_gmem_get_memory_attributes(kvm, gfn)
    if xa_lookup(&kvm.mem_attr_array, gfn, &v, &first, &order):
        kvm.attr_memo_first, kvm.attr_memo_last = first, first + _mask(order)
    else:
        v = 0
        kvm.attr_memo_first = kvm.attr_memo_last = gfn
    kvm.attr_memo_val, kvm.attr_memo_valid = v, 1
    return v


cdef inline int _kvm_mem_is_private(kvm *kvm, uint64_t gfn) noexcept nogil:
    return (_kvm_get_memory_attributes(kvm, gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0


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


cdef uint64_t kvm_supported_mem_attributes(kvm *kvm) noexcept nogil:
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if kvm == NULL or kvm.has_private_mem else 0


cdef uint64_t kvm_supported_vm_mem_attributes(gmem_host *h, kvm *kvm) noexcept nogil:
    """What the VM ioctl accepts: "next" (v8) deprecates the VM's PRIVATE attribute while
    in-place conversion is on, so 0 then (v5-v7 removed the ioctl instead, -ENOTTY; which one
    v13 has is unverified)."""
    return 0 if h.gmem_in_place_conversion else kvm_supported_mem_attributes(kvm)


cdef int kvm_vm_ioctl_set_mem_attributes(kvm *kvm, const kvm_memory_attributes *a) noexcept nogil:
    """KVM_SET_MEMORY_ATTRIBUTES: the ioctl's checks, then kvm_vm_set_mem_attributes."""
    cdef gmem_host *h = kvm.host
    cdef int r
    if not h.memory_attributes:
        return _refuse(h, -ENOTTY, "this kernel is built without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES")
    if a.flags:
        return _refuse(h, -EINVAL, "flags must be 0")
    if a.attributes & ~kvm_supported_vm_mem_attributes(h, kvm):
        if h.gmem_in_place_conversion:
            return _refuse(h, -EINVAL, "kvm.gmem_in_place_conversion is on: PRIVATE is a guest_memfd "
                           "attribute (KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd)")
        return _refuse(h, -EINVAL, "attributes outside kvm_supported_mem_attributes()")
    if a.size == 0 or a.address + a.size < a.address:
        return _refuse(h, -EINVAL, "size is 0 or address + size wraps")
    if a.address & 4095 or a.size & 4095:
        return _refuse(h, -EINVAL, "address and size must be page aligned")
    r = kvm_vm_set_mem_attributes(kvm, a.address >> 12, (a.address + a.size) >> 12, a.attributes)
    gmem_trace(h, TRACE_SET_MEMORY_ATTRIBUTES, TRACE_NO_VCPU, a.address >> 12, (a.address + a.size) >> 12,
               a.attributes, <uint64_t>(-r))
    if r < 0:
        return _refuse(h, r, "out of memory")
    return 0


# --------------------------------------------------------- KVM_PRE_FAULT_MEMORY

cdef int kvm_vcpu_pre_fault_memory(kvm_vcpu *vcpu, kvm_pre_fault_memory *range) noexcept nogil:
    """The ioctl: its checks, then a loop in which range advances past what each step
    covered; the error comes back only if nothing was done."""
    cdef gmem_host *h = vcpu.kvm.host
    cdef uint64_t full_size = range.size
    cdef int64_t r
    if h.kernel == GMEM_KERNEL_RFC_2023:
        # (6.11) an unknown vCPU ioctl: kvm_arch_vcpu_ioctl's default
        return _refuse(h, -EINVAL, "no KVM_PRE_FAULT_MEMORY before Linux 6.11")
    if range.flags:
        return _refuse(h, -EINVAL, "flags must be 0")
    if range.gpa & 4095 or range.size & 4095 or range.gpa + range.size <= range.gpa:
        return _refuse(h, -EINVAL, "gpa and size must be page aligned, size non-zero, and gpa + "
                       "size must not wrap")
    h.reason = NULL
    while True:
        r = kvm_arch_vcpu_pre_fault_memory(vcpu, range.gpa, range.size)
        if r <= 0:
            break                   # r == 0 and -EIO are WARN_ON_ONCE in the kernel
        range.size -= r
        range.gpa += r
        if range.size == 0:
            break
    if full_size != range.size:
        return 0
    if h.reason != NULL:
        return <int>r               # the rule that refused named itself
    return _refuse(h, <int>r, kvm_pre_fault_reason(<int>r))


cdef const char *kvm_pre_fault_reason(int r) noexcept nogil:
    """The rule behind a KVM_PRE_FAULT_MEMORY errno (kvm_arch_vcpu_pre_fault_memory)."""
    if r == -EOPNOTSUPP:
        return ("kvm->arch.pre_fault_allowed is false (SNP before KVM_SEV_SNP_LAUNCH_FINISH, "
                "TDX before KVM_TDX_FINALIZE_VM)")
    if r == -EINVAL:
        return "the gpa is in the shared alias (kvm_is_gfn_alias)"
    if r == -ENOENT:
        return "no memslot at the gpa (RET_PF_EMULATE: emulated MMIO)"
    if r == -EINTR:
        return "interrupted: an invalidation in progress that only the caller could end"
    return "the fault at the gpa failed (kvm_tdp_map_page)"


# ---------------------------------------------------------- KVM_CHECK_EXTENSION

cdef int64_t kvm_check_extension(gmem_host *h, kvm *kvm, uint64_t cap) noexcept nogil:
    """kvm_vm_ioctl_check_extension_generic, then the arch's (kvm NULL: on /dev/kvm): what a
    7.2 x86-64 host with TDP answers (kvm_main.c:4886), the same in 6.18."""
    if cap in (KVM_CAP_USER_MEMORY, KVM_CAP_SYNC_MMU, KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
             KVM_CAP_JOIN_MEMORY_REGIONS_WORKS, KVM_CAP_INTERNAL_ERROR_DATA, KVM_CAP_IRQFD,
             KVM_CAP_SIGNAL_MSI, KVM_CAP_IOEVENTFD_ANY_LENGTH, KVM_CAP_CHECK_EXTENSION_VM,
             KVM_CAP_ENABLE_CAP_VM, KVM_CAP_HALT_POLL, KVM_CAP_BINARY_STATS_FD,
             KVM_CAP_SYSTEM_EVENT_DATA, KVM_CAP_DEVICE_CTRL, KVM_CAP_COALESCED_PIO,
             KVM_CAP_USER_MEMORY2, KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_GUEST_MEMFD):
        return 1
    if cap == KVM_CAP_COALESCED_MMIO:
        return KVM_COALESCED_MMIO_PAGE_OFFSET
    if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        return KVM_DIRTY_LOG_MANUAL_CAPS
    if cap == KVM_CAP_IRQ_ROUTING:
        return KVM_MAX_IRQ_ROUTES
    if cap == KVM_CAP_DIRTY_LOG_RING or cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL:
        return KVM_DIRTY_RING_MAX_BYTES
    if cap == KVM_CAP_MEMORY_ATTRIBUTES:
        return kvm_supported_vm_mem_attributes(h, kvm) if h.memory_attributes else 0
    if cap == KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES and h.kernel == GMEM_KERNEL_NEXT:
        # "next" (v8): 0 unless in-place conversion, else PRIVATE where private memory exists
        # (/dev/kvm: kvm_supports_private_mem(NULL) is true); 250 is v8's number
        return kvm_supported_mem_attributes(kvm) if h.gmem_in_place_conversion else 0
    if cap == KVM_CAP_GUEST_MEMFD_FLAGS:
        # 6.18 (the flags and the capability came together)
        return kvm_gmem_get_supported_flags(kvm) if h.kernel >= GMEM_KERNEL_6_18 else 0
    if cap == KVM_CAP_NR_MEMSLOTS:
        return KVM_USER_MEM_SLOTS
    if cap == KVM_CAP_MULTI_ADDRESS_SPACE:
        # built without SMM, like this machine's kernel: KVM_MAX_NR_ADDRESS_SPACES == 1 compiles the
        # case out of kvm_vm_ioctl_check_extension_generic, so the answer is 0 (observed on 6.18.44)
        return 0
    return kvm_vm_ioctl_check_extension(h, kvm, cap)


# ------------------------------------------------------------ mmu notifiers

cdef void kvm_mmu_notifier_invalidate_range(kvm *kvm, uint64_t start, uint64_t end) noexcept nogil:
    """kvm_mmu_notifier_invalidate_range_start/end for the hvas [start, end): the gfns of every
    memslot whose userspace range overlaps are zapped (kvm_handle_hva_range, KVM_FILTER_SHARED:
    the direct root, which on a non-TDX VM is the only one)."""
    cdef uint32_t i
    cdef kvm_memory_slot *s
    cdef uint64_t lo, hi
    cdef bint begun = False
    for i in range(kvm.nr_memslots):
        s = &kvm.memslots[i]
        if not s.used or kvm_memslot_is_gmem_only(s):
            continue
        lo = start if start > s.userspace_addr else s.userspace_addr
        hi = end if end < s.userspace_addr + (s.npages << 12) else s.userspace_addr + (s.npages << 12)
        if lo >= hi:
            continue
        if not begun:
            begun = True
            kvm_mmu_invalidate_begin(kvm)
        lo = s.base_gfn + ((lo - s.userspace_addr) >> 12)
        hi = s.base_gfn + ((hi - s.userspace_addr + 4095) >> 12)
        kvm_mmu_invalidate_range_add(kvm, lo, hi)
        kvm_unmap_gfn_range(kvm, lo, hi, KVM_FILTER_SHARED)
    if begun:
        kvm_mmu_invalidate_end(kvm)


cdef int gmem_munmap_user(gmem_host *h, uint64_t addr, uint64_t size) noexcept nogil:
    """munmap(2) of the VMM's memory: every VM's mmu notifier, then the pages go (faults on
    them from now on: -EFAULT, kvm_handle_error_pfn)."""
    cdef kvm *k = h.vms
    if size == 0 or addr & 4095 or size & 4095 or not host_user_access_ok(addr, size):
        return _refuse(h, -EINVAL, "munmap: addr and length must be page aligned user memory")
    while k != NULL:
        kvm_mmu_notifier_invalidate_range(k, addr, addr + size)
        k = k.next
    host_munmap_user(h, addr, size)
    return 0


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


cdef void kvm_zap_gfn_range_invalidate(kvm *kvm, uint64_t start, uint64_t end, int filter) noexcept nogil:
    """A whole invalidation (begin, range_add, unmap, end) of [start, end)."""
    kvm_mmu_invalidate_begin(kvm)
    kvm_mmu_invalidate_range_add(kvm, start, end)
    kvm_unmap_gfn_range(kvm, start, end, filter)
    kvm_mmu_invalidate_end(kvm)
