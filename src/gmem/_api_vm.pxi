# gmem.Vm, Vcpu, GuestMemfd, Mapping: the VM ioctls, the guest_memfd file
# operations and the vCPU's page faults.


cdef enum:
    KVM_MAX_VCPU_IDS = 4096
    KVM_MR_CREATE = 0
    KVM_MR_MOVE = 1
    KVM_MR_FLAGS_ONLY = 2


cdef class FaultResult:
    """The outcome of one vcpu.page_fault(): ret (RET_PF_* or -errno), exit_reason,
    memory_fault ((flags, gpa, size) for KVM_EXIT_MEMORY_FAULT), level and pfn when mapped."""
    cdef kvm_fault_out o
    cdef uint64_t mf_size

    def __init__(self, ret, exit_reason, memory_fault, level, pfn):
        # every field checked against its C type first (ValueError, not a C conversion's
        # OverflowError), then all assigned
        cdef int32_t r = _int_arg(ret, "ret", -(1 << 31), 1 << 31)
        cdef uint32_t e = _int_arg(exit_reason, "exit_reason", 0, 1 << 32)
        cdef uint8_t lv = _int_arg(level, "level", 0, 1 << 8)
        cdef uint64_t p = _int_arg(pfn, "pfn", 0, 1 << 64)
        mf = (0, 0, 0) if memory_fault is None else tuple(memory_fault)
        if len(mf) != 3:
            raise ValueError("memory_fault must be (flags, gpa, size)")
        mf = [_int_arg(x, f"memory_fault {name}", 0, 1 << 64) for x, name in zip(mf, ("flags", "gpa", "size"))]
        self.o.ret, self.o.exit_reason, self.o.level, self.o.pfn = r, e, lv, p
        if memory_fault is not None:
            self.o.flags, self.o.gpa, self.mf_size = mf

    @property
    def ret(self):
        return self.o.ret

    @property
    def exit_reason(self):
        return self.o.exit_reason

    @property
    def memory_fault(self):
        if self.o.exit_reason != KVM_EXIT_MEMORY_FAULT:
            return None
        return (self.o.flags, self.o.gpa, self.mf_size)

    @property
    def level(self):
        return self.o.level

    @property
    def pfn(self):
        return self.o.pfn

    def __repr__(self):
        return (f"FaultResult(ret={self.ret}, exit_reason={self.exit_reason}, "
                f"memory_fault={self.memory_fault}, level={self.level}, pfn={self.pfn:#x})")

    def __eq__(self, other):
        if not isinstance(other, FaultResult):
            return NotImplemented
        return (self.ret, self.exit_reason, self.memory_fault, self.level, self.pfn) == \
            (other.ret, other.exit_reason, other.memory_fault, other.level, other.pfn)

    __hash__ = None


class GuestExit(Exception):
    """A guest access stopped in userspace: .result is the FaultResult (ret, exit_reason,
    memory_fault) that KVM_RUN would have returned."""

    def __init__(self, result):
        super().__init__(f"guest access exits to userspace: {result!r}")
        self.result = result


cdef int _vm_type_arg(object t) except -1:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"vm_type must be an integer, not {type(t).__name__}")
    if not 0 <= t < KVM_MAX_VM_TYPES:
        raise ValueError(f"vm_type {t} is outside [0, {KVM_MAX_VM_TYPES})")
    return <int>t


cdef object _fault_result(const kvm_fault_out *o):
    cdef FaultResult r = FaultResult.__new__(FaultResult)
    r.o = o[0]
    r.mf_size = 4096            # KVM_EXIT_MEMORY_FAULT always reports one page
    return r


# ----------------------------------------------------------------------- Vm

cdef class Vm:
    """A VM (KVM_CREATE_VM). It lives while its fd or any of its guest_memfd files is open."""
    cdef kvm k
    cdef readonly Host host
    cdef readonly int fd
    cdef readonly bint closed
    cdef readonly bint destroyed
    cdef int _refs
    cdef dict _vcpus
    cdef list _vmsa_pfns
    cdef public bytes launch_digest
    cdef object __weakref__

    def __cinit__(self, Host host not None, vm_type):
        memset(&self.k, 0, sizeof(kvm))
        self.k.host = &host.h
        self.k.py_vm = <void *>self
        self.k.vm_type = _vm_type_arg(vm_type)     # indexes the host's hook table
        self.k.last_used_slot = -1
        xa_init(&self.k.slot_index)
        xa_init(&self.k.gfn_to_slot)
        xa_init(&self.k.mem_attr_array)
        xa_init(&self.k.sptes)
        xa_init(&self.k.mmio_sptes)

    def __init__(self, Host host not None, vm_type):
        vm_type = _vm_type_arg(vm_type)
        self.host = host
        self.k.has_private_mem = vm_type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM) \
            or vm_type >= 6
        self.k.has_protected_state = vm_type in (KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM)
        self.k.pre_fault_allowed = vm_type not in (KVM_X86_SNP_VM, KVM_X86_TDX_VM)
        if vm_type == KVM_X86_TDX_VM:
            self.k.gfn_direct_bits = (<uint64_t>1) << (51 - 12)     # GPAW 52: shared bit 51
        if vm_type in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM):
            self.k.asid = host._next_asid
            host._next_asid += 1
        self._vcpus = {}
        self._vmsa_pfns = []
        self.launch_digest = b""
        if vm_type == KVM_X86_TDX_VM:
            self.k.launch_state = TD_STATE_RUNNABLE    # a TD can fault at once; tdx_init_vm models the build
        self.fd = host._install_fd(self)

    def __dealloc__(self):
        self._free_state()

    cdef void _free_state(self):
        cdef uint32_t i
        for i in range(self.k.nr_memslots):
            if self.k.memslots[i].used:
                free(self.k.memslots[i].lpage_info[0])
                free(self.k.memslots[i].lpage_info[1])
                self.k.memslots[i].used = 0
        free(self.k.memslots)
        self.k.memslots = NULL
        self.k.nr_memslots = 0
        self.k.last_used_slot = -1
        self.k.attr_memo_valid = 0
        xa_destroy(&self.k.slot_index)
        xa_destroy(&self.k.gfn_to_slot)
        xa_destroy(&self.k.mem_attr_array)
        xa_destroy(&self.k.sptes)
        xa_destroy(&self.k.mmio_sptes)
        xa_destroy(&self.k.sept)

    @property
    def vm_type(self):
        return self.k.vm_type

    @property
    def asid(self):
        return self.k.asid

    @property
    def has_private_mem(self):
        return bool(self.k.has_private_mem)

    cdef void _check_open(self, str what) except *:
        if self.closed:
            raise _err(_errno_mod.EBADF, f"{what}: the VM fd is closed")

    def close(self):
        """Close the VM fd; the VM is destroyed once no guest_memfd of it is open either."""
        held = _host_enter(self.host)
        if self.closed:
            return
        _refuse_in_hook(self.host, "close(VM fd)")
        self.closed = True
        self.host._close_fd(self.fd)
        self._put()

    cdef void _put(self):
        """kvm_put_kvm: the last reference destroys the VM (its memslots unbind)."""
        cdef uint32_t i
        cdef uint64_t v
        if not self.closed or self._refs or self.destroyed:
            return
        kvm_unmap_gfn_range(&self.k, 0, <uint64_t>0xFFFFFFFFFFFFFFFF, 0)
        for i in range(self.k.nr_memslots):
            if self.k.memslots[i].used:
                kvm_gmem_unbind(&self.k, &self.k.memslots[i])
        for pfn in self._vmsa_pfns:
            # snp_page_reclaim: firmware gives the VMSA back, then it is made shared
            xa_erase(&self.host.h.rmp.entries, pfn, &v)
            folio_free(&self.host.h.pm, pfn_folio(&self.host.h.pm, pfn))
        self._vmsa_pfns = []
        self._free_state()
        self.destroyed = True

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the VM fd."""
        self._check_open("KVM_CHECK_EXTENSION")
        return _check_extension(self.host, self, _u64_wrap(cap, "cap"))

    # ------------------------------------------------------------ vCPUs
    def create_vcpu(self, vcpu_id=0):
        """KVM_CREATE_VCPU."""
        held = _host_enter(self.host)
        self._check_open("KVM_CREATE_VCPU")
        cdef uint64_t id = _u64_wrap(vcpu_id, "vcpu_id")
        if id >= KVM_MAX_VCPU_IDS:
            raise _err(_errno_mod.EINVAL, f"KVM_CREATE_VCPU: id {vcpu_id} >= KVM_MAX_VCPU_IDS")
        if id in self._vcpus:
            raise _err(_errno_mod.EEXIST, f"KVM_CREATE_VCPU: vcpu {vcpu_id} exists")
        v = Vcpu(self, <uint32_t>id)
        self._vcpus[id] = v
        return v

    @property
    def vcpus(self):
        return dict(self._vcpus)

    # --------------------------------------------------------- guest_memfd
    def create_guest_memfd(self, size, flags=0):
        """KVM_CREATE_GUEST_MEMFD: flags are checked before size (kvm_gmem_create)."""
        held = _host_enter(self.host)
        self._check_open("KVM_CREATE_GUEST_MEMFD")
        cdef uint64_t sz = _u64_wrap(size, "size"), fl = _u64_wrap(flags, "flags")
        cdef uint64_t supported = GUEST_MEMFD_FLAG_MMAP
        if not self.k.has_private_mem:
            supported |= GUEST_MEMFD_FLAG_INIT_SHARED   # kvm_arch_supports_gmem_init_shared
        if fl & ~supported:
            raise _err(_errno_mod.EINVAL, f"KVM_CREATE_GUEST_MEMFD: flags {fl:#x} outside "
                       f"kvm_gmem_get_supported_flags() = {supported:#x}")
        if _s64(sz) <= 0 or sz & 4095:
            raise _err(_errno_mod.EINVAL, f"KVM_CREATE_GUEST_MEMFD: size {_s64(sz)} is not a "
                       "positive multiple of PAGE_SIZE")
        inode = GmemInode(self.host, sz, fl, self.k.vm_type)
        return GuestMemfd(GmemFile(inode, self))

    def link_guest_memfd(self, GuestMemfd src not None):
        """A new guest_memfd of this VM on the same inode as src: the shared-inode model of
        intra-host migration. This mirrors a proposed uAPI (KVM_LINK_GUEST_MEMFD), not a merged one."""
        held = _host_enter(self.host)
        self._check_open("KVM_LINK_GUEST_MEMFD")
        src._check_open("KVM_LINK_GUEST_MEMFD")
        if src.file.vm.host is not self.host:
            # another Host is another process: its fds are not open here (and its folios
            # belong to another allocator)
            raise _err(_errno_mod.EBADF, "KVM_LINK_GUEST_MEMFD: the guest_memfd belongs to another Host")
        if src.file.vm.k.vm_type != self.k.vm_type:
            raise _err(_errno_mod.EINVAL, "KVM_LINK_GUEST_MEMFD: the VM types differ")
        return GuestMemfd(GmemFile(src.file.inode, self))

    # ------------------------------------------------------------ memslots
    def set_user_memory_region2(self, slot, flags, guest_phys_addr, memory_size,
                                userspace_addr=0, guest_memfd=-1, guest_memfd_offset=0):
        """KVM_SET_USER_MEMORY_REGION2, with the kernel's order of checks."""
        held = _host_enter(self.host)
        self._check_open("KVM_SET_USER_MEMORY_REGION2")
        _refuse_in_hook(self.host, "KVM_SET_USER_MEMORY_REGION2")
        if isinstance(guest_memfd, GuestMemfd):
            # a closed GuestMemfd is no open fd (its number may already belong to another file):
            # pass -1 as gmem.kernel does, so the bind answers EBADF
            guest_memfd = -1 if (<GuestMemfd>guest_memfd).closed else (<GuestMemfd>guest_memfd).fd
        self._set_memory_region(_u32_wrap(slot, "slot"), _u32_wrap(flags, "flags"),
                                _u64_wrap(guest_phys_addr, "guest_phys_addr"),
                                _u64_wrap(memory_size, "memory_size"),
                                _u64_wrap(userspace_addr, "userspace_addr"),
                                _u32_wrap(guest_memfd, "guest_memfd"),
                                _u64_wrap(guest_memfd_offset, "guest_memfd_offset"), True)

    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr=0):
        """KVM_SET_USER_MEMORY_REGION (v1: no guest_memfd)."""
        held = _host_enter(self.host)
        self._check_open("KVM_SET_USER_MEMORY_REGION")
        _refuse_in_hook(self.host, "KVM_SET_USER_MEMORY_REGION")
        self._set_memory_region(_u32_wrap(slot, "slot"), _u32_wrap(flags, "flags"),
                                _u64_wrap(guest_phys_addr, "guest_phys_addr"),
                                _u64_wrap(memory_size, "memory_size"),
                                _u64_wrap(userspace_addr, "userspace_addr"), 0, 0, False)

    cdef int _find_slot(self, uint32_t id):
        cdef uint64_t v
        if xa_load(&self.k.slot_index, id, &v):
            return <int>v
        return -1

    cdef _set_memory_region(self, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
                            uint64_t hva, uint32_t gmem_fd, uint64_t offset, bint v2):
        cdef uint64_t valid, npages, base_gfn, f, v
        cdef int old, change, k
        cdef kvm_memory_slot *s
        EINVAL = _errno_mod.EINVAL
        what = "KVM_SET_USER_MEMORY_REGION2" if v2 else "KVM_SET_USER_MEMORY_REGION"
        if not v2 and flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
            raise _err(EINVAL, f"{what}: flags {flags:#x} need KVM_SET_USER_MEMORY_REGION2")
        if (slot & 0xFFFF) >= _uapi.KVM_USER_MEM_SLOTS:
            raise _err(EINVAL, f"{what}: slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS")
        # check_memory_region_flags (6.18: guest_memfd for every VM type)
        valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD
        if flags & KVM_MEM_GUEST_MEMFD:
            valid &= ~KVM_MEM_LOG_DIRTY_PAGES
        elif not self.k.has_protected_state:
            valid |= KVM_MEM_READONLY
        if flags & ~valid:
            raise _err(EINVAL, f"{what}: flags {flags:#x} not valid here (check_memory_region_flags: {valid:#x})")
        if size & 4095:
            raise _err(EINVAL, f"{what}: memory_size {size:#x} is not page aligned")
        if gpa & 4095:
            raise _err(EINVAL, f"{what}: guest_phys_addr {gpa:#x} is not page aligned")
        if hva & 4095 or hva + size < hva or hva + size > _TASK_SIZE_MAX:
            raise _err(EINVAL, f"{what}: userspace_addr {hva:#x} is misaligned or not access_ok()")
        if flags & KVM_MEM_GUEST_MEMFD and (offset & 4095 or offset + size < offset):
            raise _err(EINVAL, f"{what}: guest_memfd_offset {offset:#x} is misaligned or wraps")
        if slot >> 16 >= 1 or (slot & 0xFFFF) >= _uapi.KVM_MEM_SLOTS_NUM:
            raise _err(EINVAL, f"{what}: address space {slot >> 16} does not exist")
        if gpa + size < gpa:
            raise _err(EINVAL, f"{what}: guest_phys_addr + memory_size wraps")
        npages = size >> 12
        if npages > _uapi.KVM_MEM_MAX_NR_PAGES:
            raise _err(EINVAL, f"{what}: more than KVM_MEM_MAX_NR_PAGES pages")
        old = self._find_slot(slot)
        if npages == 0:
            if old < 0:
                raise _err(EINVAL, f"{what}: deleting slot {slot:#x}, which does not exist")
            self._delete_memslot(old)
            self.k.memslots_generation += 1
            return
        base_gfn = gpa >> 12
        change = KVM_MR_CREATE
        if old >= 0:
            s = &self.k.memslots[old]
            if flags & KVM_MEM_GUEST_MEMFD:
                raise _err(EINVAL, f"{what}: guest_memfd memslots are immutable, they can only be deleted")
            if hva != s.userspace_addr or npages != s.npages or \
                    (flags ^ s.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD):
                raise _err(EINVAL, f"{what}: a modification may not change userspace_addr, size, "
                           "KVM_MEM_READONLY or KVM_MEM_GUEST_MEMFD")
            if base_gfn != s.base_gfn:
                change = KVM_MR_MOVE
            elif flags != s.flags:
                change = KVM_MR_FLAGS_ONLY
            else:
                return
        if change != KVM_MR_FLAGS_ONLY and xa_find_entry(&self.k.gfn_to_slot, base_gfn, base_gfn + npages - 1,
                                                         XA_NO_MARK, &f, &k, &v) and <int>v != old:
            raise _err(_errno_mod.EEXIST, f"{what}: gpa range overlaps memslot "
                       f"{self.k.memslots[v].id:#x}")
        if change == KVM_MR_CREATE:
            gfile = None
            if flags & KVM_MEM_GUEST_MEMFD:
                gfile = self._gmem_bind_check(gmem_fd, offset, npages, what)
            self._arch_prepare_memory_region(base_gfn, npages, what)
            self._create_memslot(slot, flags, base_gfn, npages, hva, gfile, offset >> 12)
        elif change == KVM_MR_MOVE:
            self._arch_prepare_memory_region(base_gfn, npages, what)
            self._move_memslot(old, base_gfn)
        else:
            s = &self.k.memslots[old]
            s.flags = flags
            kvm_unmap_gfn_range(&self.k, s.base_gfn, s.base_gfn + s.npages, 0)
        self.k.memslots_generation += 1      # install_new_memslots: MMIO SPTEs go stale

    cdef void _arch_prepare_memory_region(self, uint64_t base_gfn, uint64_t npages, str what) except *:
        """x86 kvm_arch_prepare_memory_region for CREATE/MOVE, which runs after kvm_gmem_bind
        (so EBADF etc. from the bind come first): the last gfn must not exceed kvm_mmu_max_gfn()
        (52-bit guest physical addresses, as on this machine's kernel) nor have a TDX shared
        bit set (kvm_is_gfn_alias)."""
        cdef uint64_t last = base_gfn + npages - 1
        if last > ((<uint64_t>1) << (52 - 12)) - 1:
            raise _err(_errno_mod.EINVAL, f"{what}: the memslot ends above kvm_mmu_max_gfn()")
        if last & self.k.gfn_direct_bits:
            raise _err(_errno_mod.EINVAL, f"{what}: the memslot reaches the shared bit (kvm_is_gfn_alias)")

    cdef GmemFile _gmem_bind_check(self, uint32_t fd, uint64_t offset, uint64_t npages, str what):
        """kvm_gmem_bind's checks, in order."""
        cdef GmemFile gf
        cdef uint64_t f, v
        cdef int k
        obj = self.host._fd_object(fd)
        if obj is None:
            raise _err(_errno_mod.EBADF, f"{what}: guest_memfd {fd} is not an open fd")
        if not isinstance(obj, GuestMemfd):
            raise _err(_errno_mod.EINVAL, f"{what}: fd {fd} is not a guest_memfd")
        gf = (<GuestMemfd>obj).file
        if gf.vm is not self:
            raise _err(_errno_mod.EINVAL, f"{what}: guest_memfd {fd} belongs to another VM")
        if _s64(offset) < 0 or offset + (npages << 12) > gf.inode.i.size:
            raise _err(_errno_mod.EINVAL, f"{what}: guest_memfd_offset + memory_size is past the "
                       f"end of the guest_memfd ({gf.inode.i.size:#x})")
        if xa_find_entry(&gf.f.bindings, offset >> 12, (offset >> 12) + npages - 1, XA_NO_MARK, &f, &k, &v):
            raise _err(_errno_mod.EINVAL, f"{what}: that guest_memfd range is already bound to "
                       f"memslot {self.k.memslots[v].id:#x}")
        return gf

    cdef int _alloc_memslot(self) except -1:
        cdef uint32_t i
        cdef kvm_memory_slot *a
        for i in range(self.k.nr_memslots):
            if not self.k.memslots[i].used:
                return i
        a = <kvm_memory_slot *>realloc(self.k.memslots, (self.k.nr_memslots + 16) * sizeof(kvm_memory_slot))
        if a == NULL:
            raise _err(_errno_mod.ENOMEM, "memslot array")
        memset(&a[self.k.nr_memslots], 0, 16 * sizeof(kvm_memory_slot))
        self.k.memslots = a
        self.k.nr_memslots += 16
        return self.k.nr_memslots - 16

    cdef int _init_lpage_info(self, kvm_memory_slot *s) except -1:
        """kvm_alloc_memslot_metadata: disallow hugepages over misaligned edges."""
        cdef int level, o
        cdef uint64_t n, j, ugfn = s.userspace_addr >> 12
        cdef uint32_t *info
        for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
            o = _level_order(level)
            n = lpage_info_count(s, level)
            info = <uint32_t *>_calloc(n, sizeof(uint32_t))
            if info == NULL:
                raise _err(_errno_mod.ENOMEM, "lpage_info")
            free(s.lpage_info[level - 2])
            s.lpage_info[level - 2] = info
            if s.base_gfn & _mask(o):
                info[0] = 1
            if (s.base_gfn + s.npages) & _mask(o):
                info[n - 1] = 1
            if (s.base_gfn ^ ugfn) & _mask(o) and not (s.flags & KVM_MEM_GUEST_MEMFD):
                for j in range(n):
                    info[j] = 1
        kvm_mmu_init_memslot_memory_attributes(&self.k, s)
        return 0

    cdef void _create_memslot(self, uint32_t id, uint32_t flags, uint64_t base_gfn, uint64_t npages,
                              uint64_t hva, GmemFile gfile, uint64_t pgoff) except *:
        cdef int i = self._alloc_memslot()
        cdef kvm_memory_slot *s = &self.k.memslots[i]
        memset(s, 0, sizeof(kvm_memory_slot))
        s.base_gfn, s.npages, s.userspace_addr, s.flags, s.id = base_gfn, npages, hva, flags, id
        self._init_lpage_info(s)
        if (xa_store_range(&self.k.gfn_to_slot, base_gfn, base_gfn + npages - 1, i) < 0
                or xa_assign_range(&self.k.slot_index, id, id, i, False) < 0
                or (gfile is not None and
                    xa_store_range(&gfile.f.bindings, pgoff, pgoff + npages - 1, i) < 0)):
            xa_assign_range(&self.k.gfn_to_slot, base_gfn, base_gfn + npages - 1, 0, True)
            xa_assign_range(&self.k.slot_index, id, id, 0, True)
            free(s.lpage_info[0])
            free(s.lpage_info[1])
            raise _err(_errno_mod.ENOMEM, "memslot")
        if gfile is not None:
            s.gmem_file = &gfile.f
            s.gmem_pgoff = pgoff
            if gfile.f.inode.flags & GUEST_MEMFD_FLAG_MMAP:
                s.flags |= KVM_MEMSLOT_GMEM_ONLY        # kvm_gmem_bind
        s.used = 1

    cdef void _delete_memslot(self, int i):
        cdef kvm_memory_slot *s = &self.k.memslots[i]
        kvm_gmem_unbind(&self.k, s)
        kvm_unmap_gfn_range(&self.k, s.base_gfn, s.base_gfn + s.npages, 0)
        xa_assign_range(&self.k.gfn_to_slot, s.base_gfn, s.base_gfn + s.npages - 1, 0, True)
        xa_assign_range(&self.k.slot_index, s.id, s.id, 0, True)
        free(s.lpage_info[0])
        free(s.lpage_info[1])
        memset(s, 0, sizeof(kvm_memory_slot))

    cdef void _move_memslot(self, int i, uint64_t base_gfn) except *:
        cdef kvm_memory_slot *s = &self.k.memslots[i]
        kvm_unmap_gfn_range(&self.k, s.base_gfn, s.base_gfn + s.npages, 0)
        xa_assign_range(&self.k.gfn_to_slot, s.base_gfn, s.base_gfn + s.npages - 1, 0, True)
        s.base_gfn = base_gfn
        if xa_store_range(&self.k.gfn_to_slot, base_gfn, base_gfn + s.npages - 1, i) < 0:
            raise MemoryError("memslot move")
        self._init_lpage_info(s)

    def memslots(self):
        """The memslots as dicts (slot, flags, guest_phys_addr, memory_size, userspace_addr,
        guest_memfd_offset, bound)."""
        held = _host_enter(self.host)
        cdef uint32_t i
        cdef kvm_memory_slot *s
        out = []
        for i in range(self.k.nr_memslots):
            s = &self.k.memslots[i]
            if s.used:
                out.append(dict(slot=s.id, flags=s.flags & 0xFFFF, guest_phys_addr=s.base_gfn << 12,
                                memory_size=s.npages << 12, userspace_addr=s.userspace_addr,
                                guest_memfd_offset=s.gmem_pgoff << 12, bound=s.gmem_file != NULL))
        return sorted(out, key=lambda d: d["slot"])

    # ----------------------------------------------------------- attributes
    def set_memory_attributes(self, address, size, attributes, flags=0):
        """KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes)."""
        held = _host_enter(self.host)
        self._check_open("KVM_SET_MEMORY_ATTRIBUTES")
        cdef uint64_t a = _u64_wrap(address, "address"), sz = _u64_wrap(size, "size")
        cdef uint64_t attrs = _u64_wrap(attributes, "attributes"), fl = _u64_wrap(flags, "flags")
        cdef uint64_t supported = KVM_MEMORY_ATTRIBUTE_PRIVATE if self.k.has_private_mem else 0
        cdef int r
        what = "KVM_SET_MEMORY_ATTRIBUTES"
        if not self.host.memory_attributes:
            raise _err(_errno_mod.ENOTTY, f"{what}: this kernel is built without "
                       "CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES")
        if fl:
            raise _err(_errno_mod.EINVAL, f"{what}: flags must be 0")
        if attrs & ~supported:
            raise _err(_errno_mod.EINVAL, f"{what}: attributes {attrs:#x} outside "
                       f"kvm_supported_mem_attributes() = {supported:#x}")
        if sz == 0 or a + sz < a:
            raise _err(_errno_mod.EINVAL, f"{what}: size is 0 or address + size wraps")
        if a & 4095 or sz & 4095:
            raise _err(_errno_mod.EINVAL, f"{what}: address and size must be page aligned")
        r = kvm_vm_set_mem_attributes(&self.k, a >> 12, (a + sz) >> 12, attrs)
        if r < 0:
            raise _err(-r, f"{what}: out of memory")

    def get_memory_attributes(self, gfn):
        """The attributes of one gfn (kvm_get_memory_attributes; no ioctl reads them)."""
        held = _host_enter(self.host)
        return kvm_get_memory_attributes(&self.k, _u64(gfn, "gfn"))

    def enable_cap(self, cap, *args):
        """KVM_ENABLE_CAP on the VM: KVM_CAP_EXIT_HYPERCALL (args[0]: bitmap of hypercalls
        that exit to userspace; only KVM_HC_MAP_GPA_RANGE is valid)."""
        held = _host_enter(self.host)
        self._check_open("KVM_ENABLE_CAP")
        c = _u64_wrap(cap, "cap")
        a0 = _u64_wrap(args[0] if args else 0, "args[0]")
        if c == _uapi.KVM_CAP_EXIT_HYPERCALL:
            if a0 & ~(1 << _uapi.KVM_HC_MAP_GPA_RANGE):
                raise _err(_errno_mod.EINVAL, "KVM_ENABLE_CAP: hypercall bitmap outside KVM_EXIT_HYPERCALL_VALID_MASK")
            self.k.hypercall_exit_enabled = a0
            return
        raise _err(_errno_mod.EINVAL, f"KVM_ENABLE_CAP: capability {c} cannot be enabled")

    # ------------------------------------------------------------ SEV-SNP
    def snp_launch_start(self, policy=0x30000):
        """KVM_SEV_SNP_LAUNCH_START: the guest is being built; pre-faulting is refused until finish."""
        held = _host_enter(self.host)
        self._check_open("KVM_SEV_SNP_LAUNCH_START")
        if self.k.vm_type != KVM_X86_SNP_VM or self.k.launch_state:
            raise _err(_errno_mod.EINVAL, "KVM_SEV_SNP_LAUNCH_START: not an SNP VM, or launch already started")
        self.k.launch_state = 1
        self.k.pre_fault_allowed = 0
        self.launch_digest = b""

    def snp_launch_update(self, gfn_start, uaddr, length, page_type, flags=0):
        """KVM_SEV_SNP_LAUNCH_UPDATE through kvm_gmem_populate: the pages must be PRIVATE in the
        attributes and not yet prepared (EEXIST). Returns the updated (gfn_start, uaddr, len)."""
        held = _host_enter(self.host)
        cdef snp_populate_args args
        cdef int64_t count
        cdef uint64_t gfn = _u64(gfn_start, "gfn_start"), src = _u64(uaddr, "uaddr"), ln = _u64(length, "len")
        what = "KVM_SEV_SNP_LAUNCH_UPDATE"
        self._check_open(what)
        if self.k.vm_type != KVM_X86_SNP_VM or self.k.launch_state != 1:
            raise _err(_errno_mod.EINVAL, f"{what}: not an SNP VM being launched")
        if ln == 0 or ln & 4095 or flags or page_type not in (1, 3, 4, 5, 6):
            raise _err(_errno_mod.EINVAL, f"{what}: len, flags or page type invalid")
        if page_type == 3:
            src = 0
        elif src == 0 or src & 4095:
            raise _err(_errno_mod.EINVAL, f"{what}: uaddr must be a page-aligned source")
        if not kvm_slot_has_gmem(gfn_to_memslot(&self.k, gfn)):
            raise _err(_errno_mod.EINVAL, f"{what}: gfn {gfn:#x} is not in a guest_memfd memslot")
        args.page_type = page_type
        args.fw_error = 0
        count = kvm_gmem_populate(&self.k, gfn, src, ln >> 12, sev_gmem_post_populate, &args)
        self.host._raise_hook_exc()
        if count < 0:
            raise _err(_errno_mod.EIO, f"{what}: kvm_gmem_populate failed with {-count} "
                       f"({_errno_mod.errorcode.get(-count, '?')})")
        import hashlib
        m = hashlib.sha384(self.launch_digest)
        for i in range(count):
            m.update((((gfn + i) << 12) | page_type).to_bytes(8, "little"))
        self.launch_digest = m.digest()
        return (gfn + count, src + (count << 12) if page_type != 3 else src, ln - (count << 12))

    def snp_launch_finish(self):
        """KVM_SEV_SNP_LAUNCH_FINISH: each vCPU's VMSA becomes a private, immutable page; the
        guest runs and pre-faulting is allowed."""
        held = _host_enter(self.host)
        cdef uint32_t id
        cdef uint64_t pfn, raw, old
        what = "KVM_SEV_SNP_LAUNCH_FINISH"
        self._check_open(what)
        if self.k.vm_type != KVM_X86_SNP_VM or self.k.launch_state != 1:
            raise _err(_errno_mod.EINVAL, f"{what}: not an SNP VM being launched")
        for vid in sorted(self._vcpus):
            id = _snp_safe_alloc_page(&self.host.h)
            if id == 0:
                raise _err(_errno_mod.ENOMEM, f"{what}: VMSA page")
            pfn = folio_get(&self.host.h.pm, id).pfn
            if rmp_make_private(&self.host.h, pfn, INITIAL_VMSA_GPA, PG_LEVEL_4K, self.k.asid, True):
                folio_free(&self.host.h.pm, id)
                raise _err(_errno_mod.EIO, f"{what}: RMPUPDATE of the VMSA failed")
            xa_load(&self.host.h.rmp.entries, pfn, &raw)
            xa_store_order(&self.host.h.rmp.entries, pfn, 0, raw | RMP_VALIDATED | RMP_VMSA, &old)
            self._vmsa_pfns.append(pfn)
        self.k.launch_state = 0
        self.k.pre_fault_allowed = 1

    @property
    def vmsa_pfns(self):
        return list(self._vmsa_pfns)

    # ---------------------------------------------------------------- TDX
    def tdx_init_vm(self, gpaw=52):
        """KVM_TDX_INIT_VM: GPAW 52 (shared bit 51) or 48 (shared bit 47); the TD is being built."""
        held = _host_enter(self.host)
        _tdx_check(self, "KVM_TDX_INIT_VM")
        if self.k.launch_state != TD_STATE_RUNNABLE or self.k.sept.nr_entries or gpaw not in (48, 52):
            raise _err(_errno_mod.EINVAL, "KVM_TDX_INIT_VM: already initialised, or GPAW not 48/52")
        self.k.gfn_direct_bits = (<uint64_t>1) << ((51 if gpaw == 52 else 47) - 12)
        self.k.launch_state = TD_STATE_INITIALIZED
        self.k.pre_fault_allowed = 0

    def tdx_finalize_vm(self):
        """KVM_TDX_FINALIZE_VM: refused (EINVAL) while a premapped page was never added."""
        held = _host_enter(self.host)
        _tdx_check(self, "KVM_TDX_FINALIZE_VM")
        if self.k.launch_state != TD_STATE_INITIALIZED or self.k.nr_premapped:
            raise _err(_errno_mod.EINVAL, "KVM_TDX_FINALIZE_VM: TD not initialised, or "
                       f"{self.k.nr_premapped} premapped pages not added")
        self.k.launch_state = TD_STATE_RUNNABLE
        self.k.pre_fault_allowed = 1

    @property
    def td_state(self):
        held = _host_enter(self.host)
        return ("uninitialized", "initialized", "runnable")[self.k.launch_state] \
            if self.k.vm_type == KVM_X86_TDX_VM else None

    @property
    def nr_premapped(self):
        held = _host_enter(self.host)
        return self.k.nr_premapped

    @property
    def shared_gpa_bit(self):
        """TDX: the GPA bit that selects the shared alias (0 for other types)."""
        held = _host_enter(self.host)
        return self.k.gfn_direct_bits << 12

    def sept(self):
        """TDX mirror S-EPT leaves: {gfn: (pfn, state)}."""
        held = _host_enter(self.host)
        return {first: (v >> 4, TDX_SEPT_STATES[v & 15]) for first, order, v in _xa_entries(&self.k.sept)}

    @property
    def tdx_stats(self):
        held = _host_enter(self.host)
        return {name: self.k.tdx_stats[i] for i, name in enumerate(TDX_STATS)}

    # ------------------------------------------------------------- faults
    def page_fault_batch(self, gpas, error_codes, vcpu_id=0, out=None):
        """Run faults through the same C path as vcpu.page_fault, in order, the GIL released
        (Python hooks take it while they run). vcpu_id is one id or an array of one id per
        fault; vCPUs that do not exist yet are created. Returns a FAULT_DTYPE array (out, if
        given one of the right length, is filled and returned: no allocation per call).
        Threads: the batch holds its host's lock for the whole call, so other threads' calls
        on that host wait and land before or after it, never between two faults; other hosts
        run in parallel."""
        held = _host_enter(self.host)
        cdef kvm_vcpu *one
        cdef kvm_vcpu **vcpus
        self._check_open("page_fault_batch")
        g = _u64_array(gpas, "gpas")
        e = _u64_array(error_codes, "error_codes")
        n = g.shape[0]
        if e.shape[0] != n:
            raise ValueError(f"gpas ({n}) and error_codes ({e.shape[0]}) differ in length")
        if out is None:
            out = np.empty(n, dtype=FAULT_DTYPE)
        elif not isinstance(out, np.ndarray) or out.dtype != FAULT_DTYPE or out.shape != (n,) \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable, contiguous FAULT_DTYPE array of length {n}")
        if np.ndim(vcpu_id) == 0:
            one = &self._vcpu(_u64(vcpu_id, "vcpu_id")).v
            _fault_batch_parked(self.host, &one, None, g, e, out)
        else:
            ids = _u64_array(vcpu_id, "vcpu_id")
            if ids.shape[0] != n:
                raise ValueError(f"vcpu_id ({ids.shape[0]}) and gpas ({n}) differ in length")
            vcpus = <kvm_vcpu **>_calloc(KVM_MAX_VCPU_IDS, sizeof(kvm_vcpu *))
            if vcpus == NULL:
                raise MemoryError("vcpu table")
            try:
                for v in (np.unique(ids) if n else ()):
                    vcpus[v] = &self._vcpu(int(v)).v
                _fault_batch_parked(self.host, vcpus, ids, g, e, out)
            finally:
                free(vcpus)
        self.host._raise_hook_exc()
        return out

    cdef Vcpu _vcpu(self, uint64_t vid):
        """The vCPU with this id, created if absent (KVM_MAX_VCPU_IDS applies)."""
        vc = self._vcpus.get(vid)
        return vc if vc is not None else self.create_vcpu(vid)

    def inject_invalidation(self, gpa, size):
        """Fault injection: run an invalidation of [gpa, gpa + size) between the next fault's
        pfn lookup and its map (as if an mmu notifier ran then): that fault returns RET_PF_RETRY."""
        held = _host_enter(self.host)
        cdef uint64_t a = _u64(gpa, "gpa"), n = _u64(size, "size")
        if n == 0:
            raise ValueError("size must be positive")
        self.k.inject_inval_start = a >> 12
        self.k.inject_inval_end = (a + n + 4095) >> 12

    def sptes(self):
        """The SPTEs as a list of (gfn, level, pfn, writable, private)."""
        held = _host_enter(self.host)
        return [(first, v & SPTE_LEVEL_MASK, v >> SPTE_PFN_SHIFT, bool(v & SPTE_WRITABLE),
                 bool(v & SPTE_PRIVATE)) for first, order, v in _xa_entries(&self.k.sptes)]

    @property
    def stats(self):
        held = _host_enter(self.host)
        d = {"pages_4k": self.k.sptes.nr_by_order[0], "pages_2m": self.k.sptes.nr_by_order[9],
             "pages_1g": self.k.sptes.nr_by_order[18]}
        for i, name in enumerate(VM_STATS):
            d[name] = self.k.stats[i]
        for name in VCPU_STATS:
            d[name] = sum(v.stats[name] for v in self._vcpus.values())
        return d


cdef dict _psc_entry(object e, Py_ssize_t i):
    """One PSC entry as a dict of the GHCB's psc_entry bitfields: cur_page:12, gfn:40,
    operation:4, pagesize:1 (gfn and operation required)."""
    if not isinstance(e, dict):
        raise TypeError(f"PSC entry {i} must be a dict, not {type(e).__name__}")
    for key in ("gfn", "operation"):
        if key not in e:
            raise ValueError(f"PSC entry {i} has no {key!r}")
    return dict(gfn=_int_arg(e["gfn"], "gfn", 0, 1 << 40),
                operation=_int_arg(e["operation"], "operation", 0, 1 << 4),
                pagesize=_int_arg(e.get("pagesize", 0), "pagesize", 0, 2),
                cur_page=_int_arg(e.get("cur_page", 0), "cur_page", 0, 1 << 12))


cdef object _u64_array(object a, str what):
    try:
        arr = np.asarray(a)
    except OverflowError:
        # numpy converts an int subclass through its __index__, which may say 2**70
        raise ValueError(f"{what} holds a number outside 64 bits") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, not {arr.ndim}-D")
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{what} must hold integers, not {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{what} holds negative numbers")
    return np.ascontiguousarray(arr, dtype=np.uint64)


cdef enum:
    PREFETCH_AHEAD = 4       # faults between the two prefetch stages (measured: 4 beats 2-24)
    PREFETCH_RING = 16       # the leaves of faults i .. i + 2 * AHEAD (a power of two)


cdef void _fault_batch(kvm_vcpu **vcpus, const uint64_t[::1] ids, const uint64_t[::1] gpas,
                       const uint64_t[::1] ecs, object out_arr) except *:
    """The batch loop: kvm_mmu_page_fault per record, no Python objects, no GIL. Without ids,
    every fault is taken by vcpus[0]. Fault i + 2 * AHEAD gets its leaves prefetched (unless
    they are the ones the stage went to last: a sequential stream needs none), fault
    i + AHEAD its folio, and fault i its leaves as hints."""
    cdef kvm_fault_out *out = <kvm_fault_out *>cnp.PyArray_DATA(out_arr)
    cdef Py_ssize_t i, j, n = gpas.shape[0]
    cdef bint many = ids is not None
    cdef kvm_vcpu *v
    cdef kvm *k
    cdef gmem_host *host
    cdef kvm_fault_leaves ring[PREFETCH_RING]
    cdef uint32_t filled = 0        # bit r: the leaf stage filled ring[r] (else it went nowhere)
    cdef uint64_t key, last = <uint64_t>-1
    cdef int r
    if n == 0:
        return                  # (with ids, the vCPU table has no entry to read)
    v = vcpus[ids[0]] if many else vcpus[0]
    k = v.kvm
    host = k.host
    with nogil:
        for i in range(n):
            j = i + 2 * PREFETCH_AHEAD
            if j < n:
                r = j & (PREFETCH_RING - 1)
                key = gpas[j] >> 18
                if key != last:
                    kvm_mmu_prefetch_leaves(k, gpas[j], ecs[j], &ring[r])
                    filled |= 1u << r
                else:
                    filled &= ~(1u << r)
                last = key
            r = (i + PREFETCH_AHEAD) & (PREFETCH_RING - 1)
            if (filled >> r) & 1 and ring[r].filemap != NULL and i + PREFETCH_AHEAD < n:
                kvm_mmu_prefetch_folio(k, &ring[r])
            r = i & (PREFETCH_RING - 1)
            if (filled >> r) & 1:
                kvm_mmu_hint_leaves(k, &ring[r])
            if many:
                v = vcpus[ids[i]]
            __kvm_mmu_page_fault(v, gpas[i], ecs[i], &out[i])
            if host.hook_error:
                break


cdef void _fault_batch_parked(Host host, kvm_vcpu **vcpus, const uint64_t[::1] ids,
                              const uint64_t[::1] gpas, const uint64_t[::1] ecs, object out) except *:
    """_fault_batch with the host parked across it (one OS lock per batch): other threads'
    calls on the host sleep on the lock until it ends."""
    _host_park(host)
    try:
        _fault_batch(vcpus, ids, gpas, ecs, out)
    finally:
        _host_unpark(host)


cdef str _pre_fault_reason(int e, uint64_t gpa):
    """The rule behind a KVM_PRE_FAULT_MEMORY errno (kvm_arch_vcpu_pre_fault_memory)."""
    if e == _errno_mod.EOPNOTSUPP:
        return ("kvm->arch.pre_fault_allowed is false (SNP before KVM_SEV_SNP_LAUNCH_FINISH, "
                "TDX before KVM_TDX_FINALIZE_VM)")
    if e == _errno_mod.EINVAL:
        return f"gpa {gpa:#x} is in the shared alias (kvm_is_gfn_alias)"
    if e == _errno_mod.ENOENT:
        return f"no memslot at gpa {gpa:#x} (RET_PF_EMULATE: emulated MMIO)"
    return f"the fault at gpa {gpa:#x} failed (kvm_tdp_map_page)"


# --------------------------------------------------------------------- Vcpu

cdef class Vcpu:
    """A vCPU: where page faults are taken."""
    cdef kvm_vcpu v
    cdef readonly Vm vm
    cdef public object _pending      # the userspace exit being answered (complete_hypercall)
    cdef public object _psc          # the guest's PSC buffer: (hdr, entries)

    def __cinit__(self, Vm vm not None, vcpu_id):
        cdef uint64_t id = _u64(vcpu_id, "vcpu_id")
        if id >= KVM_MAX_VCPU_IDS:
            raise ValueError(f"vcpu_id {vcpu_id} >= KVM_MAX_VCPU_IDS")
        memset(&self.v, 0, sizeof(kvm_vcpu))
        self.v.kvm = &vm.k
        self.v.vcpu_id = <uint32_t>id
        self.vm = vm

    @property
    def vcpu_id(self):
        return self.v.vcpu_id

    def page_fault(self, gpa, error_code):
        """One #NPF / EPT violation with the full 64-bit error code (kvm_mmu_page_fault)."""
        cdef kvm_fault_out out
        cdef uint64_t g, e
        cdef Host host = self.vm.host
        _host_lock(host)            # the hot scalar path: try/finally, not a _host_enter object
        try:
            g = _u64(gpa, "gpa")
            e = _u64(error_code, "error_code")
            self.vm._check_open("page fault")
            kvm_mmu_page_fault(&self.v, g, e, &out)
            host._raise_hook_exc()
        finally:
            _host_unlock(host)
        return _fault_result(&out)

    def pre_fault_memory(self, gpa, size, flags=0):
        """KVM_PRE_FAULT_MEMORY: map [gpa, gpa + size) through the vCPU's fault path, page by
        page (kvm_tdp_map_page), private where the attributes say so; the pf_* stats do not
        count it. Returns what the kernel copies back into struct kvm_pre_fault_memory: the
        (gpa, size) not yet mapped, (gpa + size, 0) when all was. A failure after some progress
        is not raised (the ioctl returns 0; call again from the returned gpa to see it);
        without progress it raises OSError with the kernel's errno and nothing changes.
        Like page_fault_batch it runs with the GIL released, holding its host's lock."""
        held = _host_enter(self.vm.host)
        cdef kvm_pre_fault_memory range
        cdef int r
        what = "KVM_PRE_FAULT_MEMORY"
        range.gpa = _u64_wrap(gpa, "gpa")
        range.size = _u64_wrap(size, "size")
        range.flags = _u64_wrap(flags, "flags")
        self.vm._check_open(what)
        # kvm_vcpu_pre_fault_memory's own checks, before any vCPU work
        if range.flags:
            raise _err(_errno_mod.EINVAL, f"{what}: flags must be 0")
        if range.gpa & 4095 or range.size & 4095 or range.gpa + range.size <= range.gpa:
            raise _err(_errno_mod.EINVAL, f"{what}: gpa and size must be page aligned, size "
                       "non-zero, and gpa + size must not wrap")
        _host_park(self.vm.host)
        try:
            with nogil:
                r = kvm_vcpu_pre_fault_memory(&self.v, &range)
        finally:
            _host_unpark(self.vm.host)
        self.vm.host._raise_hook_exc()
        if r < 0:
            raise _err(-r, f"{what}: {_pre_fault_reason(-r, range.gpa)}")
        return (range.gpa, range.size)

    @property
    def stats(self):
        held = _host_enter(self.vm.host)
        return {name: self.v.stats[i] for i, name in enumerate(VCPU_STATS)}

    cdef unsigned char *_guest_page(self, uint64_t gpa, uint64_t error_code, bint write) except NULL:
        """Fault until the page at gpa is mapped (RET_PF_RETRY re-enters), then its bytes."""
        cdef kvm_fault_out out
        cdef unsigned char *p
        cdef int tries = 0
        cdef bint snp_private = (self.v.kvm.vm_type == KVM_X86_SNP_VM and
                                 (error_code & PFERR_GUEST_ENC_MASK) != 0)
        while True:
            kvm_mmu_page_fault(&self.v, gpa & ~(<uint64_t>4095), error_code, &out)
            self.vm.host._raise_hook_exc()
            if out.ret == RET_PF_FIXED or out.ret == RET_PF_SPURIOUS:
                out.pfn += ((gpa >> 12) & _mask(_level_order(out.level)))
                if self.v.kvm.vm_type == KVM_X86_TDX_VM:
                    _tdx_private_access_check(self, gpa)
                if not snp_private or not _snp_private_access_check(self, gpa, out.level, out.pfn):
                    break
            elif out.ret != RET_PF_RETRY or tries > 16:
                raise GuestExit(_fault_result(&out))
            tries += 1
            if tries > 16:
                raise GuestExit(_fault_result(&out))
        p = page_data_get(self.v.kvm.host, out.pfn, write)
        if p == NULL and write:
            raise MemoryError("out of memory for page contents")
        return p if p != NULL else <unsigned char *>_ZERO_PAGE

    def read(self, gpa, n, error_code=0):
        """A guest read of n bytes at gpa, faulting pages in with error_code (add
        PFERR_GUEST_ENC_MASK for an SNP private access). Raises gmem.GuestExit when a fault
        cannot be resolved in KVM (memory-fault exit, emulation, error)."""
        held = _host_enter(self.vm.host)
        cdef uint64_t a = _u64(gpa, "gpa"), ec = _u64(error_code, "error_code"), pos = 0, k
        cdef uint64_t ln = _buffer_len(n, "n")
        cdef unsigned char *p
        self.vm._check_open("guest read")
        out = bytearray(ln)
        cdef unsigned char[::1] o = out if ln else None
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            p = self._guest_page(a + pos, ec & ~PFERR_WRITE_MASK, False)
            memcpy(&o[pos], p + ((a + pos) & 4095), k)
            pos += k
        return bytes(out)

    # -------------------------------------------------------- SEV-SNP guest
    def pvalidate(self, gpa, pagesize, validate):
        """The guest's PVALIDATE of the page at gpa (pagesize 0: 4K, 1: 2M): 0 or the code
        (FAIL_INPUT, FAIL_SIZEMISMATCH, PVALIDATE_FAIL_NOUPDATE when nothing changed).
        A 4K PVALIDATE on a 2M RMP entry takes an RMP|SIZEM #NPF: KVM PSMASHes, then it runs."""
        held = _host_enter(self.vm.host)
        return _snp_pvalidate(self, _u64(gpa, "gpa"), _c_int_arg(pagesize, "pagesize"), bool(validate))

    def rmpadjust(self, gpa, pagesize, attrs):
        """The guest's RMPADJUST (VMPL permissions, VMSA bit) of the page at gpa: 0 or the code."""
        held = _host_enter(self.vm.host)
        return _snp_rmpadjust(self, _u64(gpa, "gpa"), _c_int_arg(pagesize, "pagesize"), _u64(attrs, "attrs"))

    def psc_msr(self, gpa, op):
        """A GHCB MSR-protocol page-state change of one page (op 1 private, 2 shared): a
        HypercallExit to answer with complete_hypercall(), or the GHCB response right away."""
        held = _host_enter(self.vm.host)
        self.vm._check_open("page-state change")
        return _psc_msr(self, _u64(gpa, "gpa"), _c_int_arg(op, "op"))

    def page_state_change(self, entries, cur_entry=0, end_entry=None):
        """A GHCB PSC request (SVM_VMGEXIT_PSC). entries: dicts with gfn, operation, pagesize,
        cur_page (updated in place as KVM progresses). Returns a HypercallExit (answer with
        complete_hypercall) or the final PSC return code (0 or VMGEXIT_PSC_ERROR_*)."""
        held = _host_enter(self.vm.host)
        self.vm._check_open("page-state change")
        if self.v.kvm.vm_type != KVM_X86_SNP_VM:
            raise _err(_errno_mod.EINVAL, "page-state change: only an SEV-SNP guest has it")
        ents = [_psc_entry(e, i) for i, e in enumerate(entries)]
        if not isinstance(entries, list):
            entries = ents
        else:
            entries[:] = ents
        # the GHCB header's cur_entry and end_entry are 16-bit fields
        hdr = dict(cur_entry=_int_arg(cur_entry, "cur_entry", 0, 1 << 16),
                   end_entry=len(entries) - 1 if end_entry is None else _int_arg(end_entry, "end_entry", 0, 1 << 16))
        if hdr["end_entry"] >= len(entries) and hdr["end_entry"] < VMGEXIT_PSC_MAX_COUNT:
            raise ValueError("end_entry is past the entries given")
        if not self.v.kvm.hypercall_exit_enabled & (1 << 12):
            return VMGEXIT_PSC_ERROR_GENERIC
        self._psc = (hdr, entries)
        return _psc_next(self)

    # ------------------------------------------------------------ TDX guest
    def tdx_accept(self, gpa):
        """The guest's TDG.MEM.PAGE.ACCEPT of the private 4K page at gpa: an EPT violation
        AUGs it first if needed. TDX_SUCCESS, or TDX_PAGE_ALREADY_ACCEPTED."""
        held = _host_enter(self.vm.host)
        cdef kvm *k = self.v.kvm
        cdef uint64_t g = _u64(gpa, "gpa"), v, old
        cdef kvm_fault_out out
        _tdx_check(self.vm, "TDG.MEM.PAGE.ACCEPT")
        if k.launch_state != TD_STATE_RUNNABLE:
            # no guest instruction runs before KVM_TDX_FINALIZE_VM (tdx_vcpu_pre_run: -EINVAL);
            # accepting here would turn a premapped leaf into an accepted one behind nr_premapped
            raise _err(_errno_mod.EINVAL, "TDG.MEM.PAGE.ACCEPT: the TD is not runnable yet "
                       "(KVM_RUN before KVM_TDX_FINALIZE_VM)")
        if (g >> 12) & k.gfn_direct_bits:
            return TDVMCALL_STATUS_INVALID_OPERAND
        if not xa_load(&k.sept, (g >> 12), &v):
            kvm_mmu_page_fault(&self.v, g & ~(<uint64_t>4095), PFERR_WRITE_MASK, &out)
            self.vm.host._raise_hook_exc()
            if out.ret < 0:
                raise GuestExit(_fault_result(&out))
            if not xa_load(&k.sept, (g >> 12), &v):
                raise GuestExit(_fault_result(&out))
        if (v & 15) == TDX_SEPT_ACCEPTED:
            return TDX_PAGE_ALREADY_ACCEPTED
        xa_store_order(&k.sept, g >> 12, 0, (v & ~(<uint64_t>15)) | TDX_SEPT_ACCEPTED, &old)
        k.tdx_stats[TDX_STAT_ACCEPT] += 1
        return TDX_SUCCESS

    def tdx_map_gpa(self, gpa, size):
        """TDG.VP.VMCALL<MapGPA>: the shared bit of gpa says the target state. A HypercallExit
        per 2M chunk (answer with complete_hypercall), or a TDVMCALL status."""
        held = _host_enter(self.vm.host)
        cdef kvm *k = self.v.kvm
        cdef uint64_t g = _u64(gpa, "gpa"), n = _u64(size, "size"), direct
        _tdx_check(self.vm, "MapGPA")
        direct = k.gfn_direct_bits << 12
        if not k.hypercall_exit_enabled & (1 << 12):
            return TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
        if g + n <= g or (g + n - 1) >> 52 or bool(g & direct) != bool((g + n - 1) & direct):
            return TDVMCALL_STATUS_INVALID_OPERAND
        if g & 4095 or n & 4095:
            return TDVMCALL_STATUS_ALIGN_ERROR
        self._pending = ("map_gpa", g, g + n, g)
        return _tdx_map_gpa_next(self)

    def tdx_init_mem_region(self, source_addr, gpa, nr_pages, measure=False):
        """KVM_TDX_INIT_MEM_REGION: copy nr_pages from the VMM's memory at source_addr into the
        TD's private memory at gpa (premap, then TDH.MEM.PAGE.ADD), one page at a time.
        Returns the pages added; on an error after some pages, raises with partial progress kept."""
        held = _host_enter(self.vm.host)
        cdef kvm *k = self.v.kvm
        cdef uint64_t src = _u64(source_addr, "source_addr"), g = _u64(gpa, "gpa")
        cdef uint64_t n = _u64(nr_pages, "nr_pages"), done = 0
        cdef int64_t r
        cdef tdx_populate_args args
        what = "KVM_TDX_INIT_MEM_REGION"
        _tdx_check(self.vm, what)
        if k.launch_state != TD_STATE_INITIALIZED:
            raise _err(_errno_mod.EINVAL, f"{what}: the TD is not being built (initial memory is fixed)")
        if src & 4095 or g & 4095 or n == 0 or g + (n << 12) <= g or \
                (g >> 12) & k.gfn_direct_bits or ((g + (n << 12) - 1) >> 12) & k.gfn_direct_bits:
            raise _err(_errno_mod.EINVAL, f"{what}: unaligned, empty, wrapping or shared range")
        args.vcpu = &self.v
        while done < n:
            r = kvm_gmem_populate(k, (g >> 12) + done, src + (done << 12), 1, tdx_gmem_post_populate, &args)
            self.vm.host._raise_hook_exc()
            if r < 0:
                raise _err(<int>-r, f"{what}: page {done} of {n} failed ({done} added)")
            if r != 1:
                raise _err(_errno_mod.EIO, f"{what}: page {done} of {n} failed")
            done += 1
        return done

    def complete_hypercall(self, ret=0):
        """Userspace's answer (hypercall.ret) to the last HypercallExit; returns the next exit,
        or the guest-visible result when the request is done."""
        held = _host_enter(self.vm.host)
        if self._pending is None:
            raise _err(_errno_mod.EINVAL, "no hypercall exit is pending on this vCPU")
        if self._pending[0] == "map_gpa":
            return _tdx_map_gpa_complete(self, _int_arg(ret, "ret", -(1 << 63), 1 << 64))
        return _psc_complete(self, _int_arg(ret, "ret", -(1 << 63), 1 << 64))

    def write(self, gpa, data, error_code=PFERR_WRITE_MASK):
        """A guest write of data at gpa (the fault carries PFERR_WRITE_MASK); see read()."""
        held = _host_enter(self.vm.host)
        cdef uint64_t a = _u64(gpa, "gpa"), ec = _u64(error_code, "error_code"), pos = 0, k
        cdef unsigned char *p
        self.vm._check_open("guest write")
        b = _bytes_arg(data, "data")
        cdef uint64_t ln = len(b)
        cdef const unsigned char[::1] d = b if ln else None
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            p = self._guest_page(a + pos, ec | PFERR_WRITE_MASK, True)
            memcpy(p + ((a + pos) & 4095), &d[pos], k)
            pos += k


# ------------------------------------------------------- guest_memfd files

@cython.no_gc_clear      # __dealloc__ frees folios into self.host: the cyclic GC must not drop it first
cdef class GmemInode:
    """The guest_memfd inode: the filemap of folios (AS_INACCESSIBLE)."""
    cdef gmem_inode i
    cdef Host host

    def __cinit__(self, Host host not None, uint64_t size, uint64_t flags, vm_type):
        vm_type = _vm_type_arg(vm_type)          # indexes the host's hook table on free
        memset(&self.i, 0, sizeof(gmem_inode))
        xa_init(&self.i.filemap)
        self.host = host
        self.i.host = &host.h
        self.i.size = size
        self.i.flags = flags
        self.i.vm_type = vm_type
        self.i.ino = host._next_ino
        host._next_ino += 1

    def __dealloc__(self):
        cdef Host host = self.host
        if self.i.filemap.nr_entries:
            if host is not None:
                _host_lock(host)                # its folios go back to the host's allocator
            kvm_gmem_evict_inode(&self.i)
            if host is not None:
                _host_unlock(host)
        xa_destroy(&self.i.filemap)


cdef class GmemFile:
    """One struct file of a guest_memfd: a VM's view of the inode, with its bindings."""
    cdef gmem_file f
    cdef GmemInode inode
    cdef Vm vm
    cdef int refs          # fds and mappings

    def __cinit__(self, GmemInode inode not None, Vm vm not None):
        if inode.host is not vm.host:
            raise ValueError("the inode and the VM belong to different Hosts")
        memset(&self.f, 0, sizeof(gmem_file))
        xa_init(&self.f.bindings)
        self.inode = inode
        self.vm = vm
        self.f.inode = &inode.i
        self.f.kvm = &vm.k
        self.f.next = inode.i.files
        inode.i.files = &self.f
        vm._refs += 1          # the file pins the VM
        vm.host._gmem_files[id(self)] = self

    def __dealloc__(self):
        # a file never released (its fd and mappings never closed, the objects collected):
        # its bindings tree would leak (kvm_gmem_release destroys it otherwise; idempotent)
        xa_destroy(&self.f.bindings)

    cdef void get(self):
        self.refs += 1

    cdef void put(self) except *:
        self.refs -= 1
        if self.refs == 0:
            self.vm.host._gmem_files.pop(id(self), None)
            kvm_gmem_release(&self.f)
            self.vm._refs -= 1
            self.vm._put()
            self.vm.host._raise_hook_exc()


cdef class GuestMemfd:
    """A guest_memfd file descriptor (KVM_CREATE_GUEST_MEMFD)."""
    cdef readonly int fd
    cdef readonly bint closed
    cdef GmemFile file

    def __cinit__(self, GmemFile file not None):
        self.file = file
        file.get()
        self.fd = file.vm.host._install_fd(self)

    @property
    def size(self):
        return self.file.inode.i.size

    @property
    def flags(self):
        return self.file.inode.i.flags

    @property
    def vm(self):
        return self.file.vm

    @property
    def ino(self):
        return self.file.inode.i.ino

    cdef void _check_open(self, str what) except *:
        if self.closed:
            raise _err(_errno_mod.EBADF, f"{what}: guest_memfd fd is closed")

    def close(self):
        held = _host_enter(self.file.vm.host)
        if self.closed:
            return
        _refuse_in_hook(self.file.vm.host, "close(guest_memfd)")
        self.closed = True
        self.file.vm.host._close_fd(self.fd)
        self.file.put()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def dup(self):
        """dup(2): a new fd on the same file."""
        held = _host_enter(self.file.vm.host)
        self._check_open("dup")
        return GuestMemfd(self.file)

    def fstat(self):
        """st_size, st_blksize, st_mode (S_IFREG | 0600), st_ino, st_blocks (always 0)."""
        self._check_open("fstat")
        return dict(st_size=self.size, st_blksize=4096, st_mode=0o100600, st_ino=self.ino, st_blocks=0)

    # file operations gmem does not have: the VFS answers
    def read(self, n=-1):
        self._check_open("read")
        raise _err(_errno_mod.EINVAL, "read: guest_memfd has no read (no FMODE_CAN_READ)")

    def write(self, data):
        self._check_open("write")
        raise _err(_errno_mod.EINVAL, "write: guest_memfd has no write (no FMODE_CAN_WRITE)")

    def pread(self, n, offset):
        self._check_open("pread")
        if _s64(_u64_wrap(offset, "offset")) < 0:
            raise _err(_errno_mod.EINVAL, "pread: negative offset")
        raise _err(_errno_mod.ESPIPE, "pread: guest_memfd has no FMODE_PREAD")

    def pwrite(self, data, offset):
        self._check_open("pwrite")
        if _s64(_u64_wrap(offset, "offset")) < 0:
            raise _err(_errno_mod.EINVAL, "pwrite: negative offset")
        raise _err(_errno_mod.ESPIPE, "pwrite: guest_memfd has no FMODE_PWRITE")

    def lseek(self, offset, whence=0):
        self._check_open("lseek")
        raise _err(_errno_mod.ESPIPE, "lseek: guest_memfd has no FMODE_LSEEK")

    def ftruncate(self, length):
        self._check_open("ftruncate")
        if _s64(_u64_wrap(length, "length")) < 0:
            raise _err(_errno_mod.EINVAL, "ftruncate: negative length")
        raise _err(_errno_mod.EINVAL, "ftruncate: kvm_gmem_setattr refuses every size change")

    def fallocate(self, mode, offset, length):
        """fallocate(2): vfs_fallocate's checks, then kvm_gmem_fallocate's."""
        held = _host_enter(self.file.vm.host)
        self._check_open("fallocate")
        _refuse_in_hook(self.file.vm.host, "fallocate")
        cdef uint64_t m = _u32_wrap(mode, "mode"), off = _u64_wrap(offset, "offset")
        cdef uint64_t ln = _u64_wrap(length, "length")
        cdef int r
        cdef uint64_t modes = (_uapi.FALLOC_FL_PUNCH_HOLE | _uapi.FALLOC_FL_COLLAPSE_RANGE |
                               _uapi.FALLOC_FL_ZERO_RANGE | _uapi.FALLOC_FL_INSERT_RANGE |
                               _uapi.FALLOC_FL_UNSHARE_RANGE | _uapi.FALLOC_FL_WRITE_ZEROES)
        cdef uint64_t mm = m & modes
        EOPNOTSUPP = _errno_mod.EOPNOTSUPP
        if _s64(off) < 0 or _s64(ln) <= 0:
            raise _err(_errno_mod.EINVAL, "fallocate: offset < 0 or len <= 0 (vfs_fallocate)")
        if m & ~(modes | _uapi.FALLOC_FL_KEEP_SIZE):
            raise _err(EOPNOTSUPP, f"fallocate: unknown mode bits {m:#x} (vfs_fallocate)")
        if mm not in (0, _uapi.FALLOC_FL_PUNCH_HOLE, _uapi.FALLOC_FL_COLLAPSE_RANGE,
                      _uapi.FALLOC_FL_ZERO_RANGE, _uapi.FALLOC_FL_INSERT_RANGE,
                      _uapi.FALLOC_FL_UNSHARE_RANGE, _uapi.FALLOC_FL_WRITE_ZEROES):
            raise _err(EOPNOTSUPP, f"fallocate: modes are exclusive ({m:#x})")
        if mm == _uapi.FALLOC_FL_PUNCH_HOLE and not m & _uapi.FALLOC_FL_KEEP_SIZE:
            raise _err(EOPNOTSUPP, "fallocate: PUNCH_HOLE needs KEEP_SIZE")
        if mm in (_uapi.FALLOC_FL_COLLAPSE_RANGE, _uapi.FALLOC_FL_INSERT_RANGE,
                  _uapi.FALLOC_FL_WRITE_ZEROES) and m & _uapi.FALLOC_FL_KEEP_SIZE:
            raise _err(EOPNOTSUPP, "fallocate: this mode cannot take KEEP_SIZE")
        if off + ln > _MAX_LFS_FILESIZE or off + ln < off:
            raise _err(_errno_mod.EFBIG, "fallocate: offset + len beyond MAX_LFS_FILESIZE")
        # kvm_gmem_fallocate
        if not m & _uapi.FALLOC_FL_KEEP_SIZE:
            raise _err(EOPNOTSUPP, "fallocate: guest_memfd needs FALLOC_FL_KEEP_SIZE")
        if m & ~(_uapi.FALLOC_FL_KEEP_SIZE | _uapi.FALLOC_FL_PUNCH_HOLE):
            raise _err(EOPNOTSUPP, "fallocate: guest_memfd allows only KEEP_SIZE [| PUNCH_HOLE]")
        if off & 4095 or ln & 4095:
            raise _err(_errno_mod.EINVAL, "fallocate: offset and len must be page aligned")
        host = self.file.vm.host
        if m & _uapi.FALLOC_FL_PUNCH_HOLE:
            kvm_gmem_punch_hole(&self.file.inode.i, off >> 12, (off + ln) >> 12)   # no EOF check
            host._raise_hook_exc()
            return
        if off + ln > self.file.inode.i.size:
            raise _err(_errno_mod.EINVAL, "fallocate: offset + len past i_size")
        r = kvm_gmem_allocate(&self.file.inode.i, off >> 12, (off + ln) >> 12)
        host._raise_hook_exc()
        if r < 0:
            raise _err(-r, "fallocate: kvm_gmem_allocate failed (pages allocated so far stay)")

    def allocate(self, offset, length):
        """fallocate(FALLOC_FL_KEEP_SIZE)."""
        self.fallocate(_uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset, length):
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
        self.fallocate(_uapi.FALLOC_FL_PUNCH_HOLE | _uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def mmap(self, length, offset=0, prot=_uapi.PROT_READ | _uapi.PROT_WRITE, flags=_uapi.MAP_SHARED):
        """mmap(2): do_mmap's checks, then kvm_gmem_mmap's (6.18)."""
        held = _host_enter(self.file.vm.host)
        self._check_open("mmap")
        cdef uint64_t ln = _u64_wrap(length, "length"), off = _u64_wrap(offset, "offset")
        cdef uint64_t p = _u32_wrap(prot, "prot"), fl = _u32_wrap(flags, "flags")
        map_type = fl & 0x0F
        if ln == 0 or off & 4095:
            raise _err(_errno_mod.EINVAL, "mmap: length 0 or offset not page aligned")
        # do_mmap: len = PAGE_ALIGN(len) (0 after wrapping: ENOMEM); get_unmapped_area refuses
        # len > TASK_SIZE (ENOMEM); file_mmap_ok() refuses offset + len past MAX_LFS_FILESIZE
        # (EOVERFLOW) -- all before the MAP_TYPE switch and the file's ->mmap
        ln_al = (ln + 4095) & ~(<uint64_t>4095)
        if ln_al == 0 or ln_al > _TASK_SIZE_MAX:
            raise _err(_errno_mod.ENOMEM, "mmap: length too large (len > TASK_SIZE)")
        if ln_al > _MAX_LFS_FILESIZE or (off >> 12) > ((_MAX_LFS_FILESIZE - ln_al) >> 12):
            raise _err(_errno_mod.EOVERFLOW, "mmap: offset + length past MAX_LFS_FILESIZE (file_mmap_ok)")
        if map_type not in (_uapi.MAP_SHARED, _uapi.MAP_PRIVATE, 0x03):
            raise _err(_errno_mod.EINVAL, "mmap: flags need MAP_SHARED or MAP_PRIVATE")
        if map_type == 0x03 and fl & ~0x407f933:
            # MAP_SHARED_VALIDATE: flags outside LEGACY_MAP_MASK (gmem has no FOP_MMAP_SYNC)
            raise _err(_errno_mod.EOPNOTSUPP, f"mmap: MAP_SHARED_VALIDATE with unknown flags {fl:#x}")
        if p & _uapi.PROT_EXEC:
            raise _err(_errno_mod.EPERM, "mmap: PROT_EXEC on a noexec (anon_inode) mount")
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise _err(_errno_mod.ENODEV, "mmap: guest_memfd created without GUEST_MEMFD_FLAG_MMAP")
        if map_type == _uapi.MAP_PRIVATE:
            raise _err(_errno_mod.EINVAL, "mmap: guest_memfd mappings must be MAP_SHARED")
        return Mapping(self.file, ln, off, p)


cdef class Mapping:
    """A MAP_SHARED mapping of a guest_memfd. m[a:b] reads, m[a:b] = data writes; an access
    the kernel answers with SIGBUS (kvm_gmem_fault_user_mapping) raises gmem.SigBus."""
    cdef GmemFile file
    cdef readonly uint64_t length
    cdef readonly uint64_t offset
    cdef readonly uint32_t prot
    cdef readonly bint closed

    def __cinit__(self, GmemFile file not None, length, offset, prot):
        self.file = file
        self.length = _u64(length, "length")
        self.offset = _u64(offset, "offset")
        self.prot = _u32_wrap(prot, "prot")
        file.get()             # a VMA holds a file reference

    def __len__(self):
        return self.length

    def close(self):
        """munmap."""
        held = _host_enter(self.file.vm.host)
        if not self.closed:
            _refuse_in_hook(self.file.vm.host, "munmap")
            self.closed = True
            self.file.put()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef tuple _range(self, key):
        if self.closed:
            raise ValueError("mapping is closed")
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                raise ValueError("only contiguous slices")
            return start, max(start, stop)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key)
            if i < 0:
                i += self.length
            if not 0 <= i < self.length:
                raise IndexError("mapping index out of range")
            return i, i + 1
        raise TypeError("mapping indices must be integers or slices")

    cdef unsigned char *_fault(self, uint64_t pos, bint write) except NULL:
        """kvm_gmem_fault_user_mapping for the page holding byte pos of the mapping."""
        cdef gmem_inode *inode = &self.file.inode.i
        cdef uint64_t pgoff = (self.offset + pos) >> 12
        cdef uint32_t id
        cdef folio *f
        cdef unsigned char *p
        cdef object e = None
        if pgoff << 12 >= inode.size:
            e = _SigBus(f"SIGBUS: page {pgoff} is beyond i_size {inode.size:#x}", pos)
        elif not inode.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
            e = _SigBus("SIGBUS: guest_memfd without GUEST_MEMFD_FLAG_INIT_SHARED is private", pos)
        if e is not None:
            e.offset = pos          # the first byte of the mapping that faulted, as gmem.kernel sets it
            raise e
        if kvm_gmem_get_folio(inode, pgoff, &id) < 0:
            raise MemoryError("out of memory faulting a guest_memfd page (VM_FAULT_OOM)")
        f = folio_get(&inode.host.pm, id)
        if not f.flags & PG_uptodate:
            page_data_drop(inode.host, f.pfn, _pages(f.order))   # clear_highpage
            f.flags |= PG_uptodate                                  # kvm_gmem_mark_prepared
        p = page_data_get(inode.host, f.pfn + (pgoff - f.index), write)
        if p == NULL and write:
            raise MemoryError("out of memory for page contents")
        return p if p != NULL else <unsigned char *>_ZERO_PAGE

    def __getitem__(self, key):
        held = _host_enter(self.file.vm.host)
        cdef uint64_t a, b, pos, n
        cdef unsigned char *p
        a, b = self._range(key)
        if not self.prot & _uapi.PROT_READ:
            raise _err(_errno_mod.EACCES, "read of a mapping without PROT_READ (SIGSEGV)")
        out = bytearray(b - a)
        cdef unsigned char[::1] o = out if b > a else None
        pos = a
        while pos < b:
            n = min(b - pos, 4096 - ((self.offset + pos) & 4095))
            p = self._fault(pos, False)
            memcpy(&o[pos - a], p + ((self.offset + pos) & 4095), n)
            pos += n
        return bytes(out) if isinstance(key, slice) else out[0]

    def __setitem__(self, key, value):
        held = _host_enter(self.file.vm.host)
        cdef uint64_t a, b, pos, n
        cdef unsigned char *p
        a, b = self._range(key)
        if not self.prot & _uapi.PROT_WRITE:
            raise _err(_errno_mod.EACCES, "write to a mapping without PROT_WRITE (SIGSEGV)")
        data = bytes([value]) if isinstance(value, (int, np.integer)) else bytes(value)
        if len(data) != b - a:
            raise ValueError(f"{len(data)} bytes for a {b - a}-byte slice")
        cdef const unsigned char[::1] d = data if data else None
        pos = a
        while pos < b:
            n = min(b - pos, 4096 - ((self.offset + pos) & 4095))
            p = self._fault(pos, True)
            memcpy(p + ((self.offset + pos) & 4095), &d[pos - a], n)
            pos += n

