# gmem.Vm: a VM fd's handle. It holds one reference to its C struct kvm (kept until the handle
# goes, so its vCPUs and counters stay readable) and, while open, the VM fd's kernel reference;
# each ioctl converts its arguments, resolves fds, makes the kernel call and raises.

VM_STATS = ("remote_tlb_flush", "zapped_sptes", "mmu_invalidations", "gmem_prepare",
            "gmem_prepare_failed")
TDX_STATS = ("aug", "page_add", "block", "track", "remove", "accept", "mr_extend", "demote", "kick")
TDX_SEPT_STATES = {s: (<bytes>tdx_sept_state_name(s)).decode() for s in range(16) if tdx_sept_state_name(s)}

cdef object _HANDLE = object()          # only the core makes handles around existing C objects


@cython.final
cdef class Vm:
    """A VM (KVM_CREATE_VM). It lives while its fd or any of its guest_memfd files is open."""
    cdef kvm *k
    cdef readonly Host host
    cdef readonly int fd
    cdef readonly bint closed
    cdef dict _vcpus
    cdef public bytes launch_digest
    cdef bint _initialized
    cdef object __weakref__

    def __cinit__(self, Host host not None, vm_type, _wrap=None):
        cdef kvm *k
        self.host = host
        self._vcpus = {}
        self.launch_digest = b""
        self.fd = -1
        if _wrap is _HANDLE:
            return                          # Vm._wrap fills it in
        held = _host_enter(host)
        host._check(kvm_create_vm(host.h, _u64_wrap(vm_type, "vm_type"), &k), "KVM_CREATE_VM")
        self._attach(k)
        self.fd = host._install_fd(self)

    def __init__(self, Host host not None, vm_type, _wrap=None):
        if self._initialized:
            raise TypeError("Vm.__init__ called again on a live VM: use host.create_vm()")
        self._initialized = True

    cdef void _attach(self, kvm *k):
        self.k = k
        k.py_vm = <void *>self
        kvm_handle_get(k)

    @staticmethod
    cdef Vm _wrap(kvm *k):
        """A handle for a VM created through the C-level API (no fd in this host's table)."""
        cdef Vm vm = Vm.__new__(Vm, <Host>k.host.py_host, 0, _HANDLE)
        vm._initialized = True
        vm.closed = True            # it holds no fd reference
        vm._attach(k)
        return vm

    def __dealloc__(self):
        if self.k == NULL:
            return
        if self.k.py_vm == <void *>self:
            self.k.py_vm = NULL
        if not self.closed:
            self.k.host.in_teardown += 1
            kvm_put_kvm(self.k)     # the fd's reference (a process exiting closes it)
            self.k.host.in_teardown -= 1
        kvm_handle_put(self.k)

    @property
    def vm_type(self):
        return self.k.vm_type

    @property
    def asid(self):
        return sev_asid(self.k)

    @property
    def has_private_mem(self):
        return bool(self.k.has_private_mem)

    @property
    def destroyed(self):
        return bool(self.k.dead)

    cdef kvm *_open(self, str what, bint run=False) except NULL:
        """The VM for an ioctl on its fd (or one of its vCPUs'): EBADF once the fd is closed,
        EIO once the VM is dead (kvm_vm_ioctl, kvm_vcpu_ioctl). run: a fault, whose outcome
        says -EIO itself (kvm_vcpu_pre_run), as each record of a batch does."""
        if self.closed:
            raise _err(EBADF, f"{what}: the VM fd is closed")
        if not run:
            self.host._check(kvm_ioctl_check_dead(self.k), what)
        return self.k

    def close(self):
        """Close the VM fd; the VM is destroyed once no guest_memfd of it is open either."""
        held = _host_enter(self.host)
        if self.closed:
            return
        _refuse_in_hook(self.host, "close(VM fd)")
        self.closed = True
        self.host._close_fd(self.fd)
        kvm_put_kvm(self.k)
        self.host._raise_hook_exc()

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the VM fd."""
        return kvm_check_extension(self.host.h, self._open("KVM_CHECK_EXTENSION"), _u64_wrap(cap, "cap"))

    def launch(self):
        """The minimal launch for the VM type, for scenarios that do not model it: SNP
        LAUNCH_START + LAUNCH_FINISH, TDX INIT_VM + INIT_VCPU (each vCPU) + FINALIZE_VM; nothing
        for the others. It stands for the whole build: vCPUs created after it can run at once
        (in the kernel they are made during the build; after an explicit finish a TD refuses
        new vCPUs with EIO and a new SNP vCPU has no VMSA)."""
        held = _host_enter(self.host)
        _refuse_in_hook(self.host, "launch")
        self.host._check(kvm_launch(self._open("launch")), "launch")

    # ------------------------------------------------------------ vCPUs
    def create_vcpu(self, vcpu_id=0):
        """KVM_CREATE_VCPU."""
        held = _host_enter(self.host)
        cdef kvm_vcpu *v
        self.host._check(kvm_vm_ioctl_create_vcpu(self._open("KVM_CREATE_VCPU"),
                                                  _u64_wrap(vcpu_id, "vcpu_id"), &v), "KVM_CREATE_VCPU")
        return self._vcpu_handle(v.vcpu_id)

    cdef Vcpu _vcpu_handle(self, uint32_t vid):
        """The handle of vCPU vid (which exists)."""
        h = self._vcpus.get(vid)
        if h is None:
            h = Vcpu.__new__(Vcpu, self, vid, _HANDLE)
            self._vcpus[vid] = h
        return h

    @property
    def vcpus(self):
        cdef uint32_t i
        return {i: self._vcpu_handle(i) for i in range(KVM_MAX_VCPU_IDS) if self.k.vcpus[i] != NULL}

    # --------------------------------------------------------- guest_memfd
    def create_guest_memfd(self, size, flags=0, *, page_order=0):
        """KVM_CREATE_GUEST_MEMFD: flags are checked before size (kvm_gmem_create).

        Proposed uAPI (no kernel has it): flags=uapi.GUEST_MEMFD_FLAG_HUGETLB with log2 of the
        page size in bits 58..63 (uapi.GUESTMEM_HUGETLB_FLAG_2MB / _1GB, RFC v2), or
        page_order=9|18 (the WIP tree's struct field), takes the file from the hugetlb pool."""
        held = _host_enter(self.host)
        cdef gmem_file *f
        cdef uint64_t sz = _u64_wrap(size, "size"), fl = _u64_wrap(flags, "flags")
        cdef int order = _int_arg(page_order, "page_order", 0, 64)
        self.host._check(kvm_gmem_create_order(self._open("KVM_CREATE_GUEST_MEMFD"), sz, fl, order, &f),
                         "KVM_CREATE_GUEST_MEMFD")
        return GuestMemfd._new(self, f)

    def link_guest_memfd(self, GuestMemfd src not None):
        """A new guest_memfd of this VM on the same inode as src: the shared-inode model of
        intra-host migration. This mirrors a proposed uAPI (KVM_LINK_GUEST_MEMFD), not a merged one."""
        held = _host_enter(self.host)
        cdef gmem_file *f
        cdef kvm *k = self._open("KVM_LINK_GUEST_MEMFD")
        cdef gmem_file *s = src._open("KVM_LINK_GUEST_MEMFD")
        if src.vm.host is not self.host:
            # another Host is another process: its fds are not open here (and its folios
            # belong to another allocator)
            raise _err(EBADF, "KVM_LINK_GUEST_MEMFD: the guest_memfd belongs to another Host")
        self.host._check(kvm_gmem_link(k, s, &f), "KVM_LINK_GUEST_MEMFD")
        return GuestMemfd._new(self, f)

    # ------------------------------------------------------------ memslots
    def set_user_memory_region2(self, slot, flags, guest_phys_addr, memory_size,
                                userspace_addr=0, guest_memfd=-1, guest_memfd_offset=0):
        """KVM_SET_USER_MEMORY_REGION2, with the kernel's order of checks."""
        if isinstance(guest_memfd, GuestMemfd):
            # a closed GuestMemfd is no open fd (its number may already belong to another file):
            # pass -1 as gmem.kernel does, so the bind answers EBADF
            guest_memfd = -1 if (<GuestMemfd>guest_memfd).closed else (<GuestMemfd>guest_memfd).fd
        self._set_memory_region("KVM_SET_USER_MEMORY_REGION2", True, slot, flags, guest_phys_addr,
                                memory_size, userspace_addr, guest_memfd, guest_memfd_offset)

    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr=0):
        """KVM_SET_USER_MEMORY_REGION (v1: no guest_memfd)."""
        self._set_memory_region("KVM_SET_USER_MEMORY_REGION", False, slot, flags, guest_phys_addr,
                                memory_size, userspace_addr, 0, 0)

    cdef _set_memory_region(self, str what, bint v2, slot, flags, gpa, size, hva, gmem_fd, offset):
        held = _host_enter(self.host)
        cdef kvm_userspace_memory_region2 mem
        cdef gmem_file *file = NULL
        cdef int fdget_err = 0
        cdef kvm *k = self._open(what)
        _refuse_in_hook(self.host, what)
        mem.slot, mem.flags = _u32_wrap(slot, "slot"), _u32_wrap(flags, "flags")
        mem.guest_phys_addr = _u64_wrap(gpa, "guest_phys_addr")
        mem.memory_size = _u64_wrap(size, "memory_size")
        mem.userspace_addr = _u64_wrap(hva, "userspace_addr")
        mem.guest_memfd = _u32_wrap(gmem_fd, "guest_memfd")
        mem.guest_memfd_offset = _u64_wrap(offset, "guest_memfd_offset")
        if v2 and mem.flags & KVM_MEM_GUEST_MEMFD:
            # fdget: the fd is resolved here, its error reported where kvm_gmem_bind would
            obj = self.host._fd_object(mem.guest_memfd)
            if obj is None:
                fdget_err = -EBADF
            elif not isinstance(obj, GuestMemfd):
                fdget_err = -EINVAL
            else:
                file = (<GuestMemfd>obj).f
        self.host._check(kvm_set_memory_region(k, &mem, v2, file, fdget_err), what)

    def memslots(self):
        """The memslots as dicts (slot, flags, guest_phys_addr, memory_size, userspace_addr,
        guest_memfd_offset, bound)."""
        held = _host_enter(self.host)
        cdef uint32_t i = 0
        cdef kvm_userspace_memory_region2 m
        cdef bint bound
        out = []
        while kvm_next_memslot(self.k, &i, &m, &bound):
            out.append(dict(slot=m.slot, flags=m.flags, guest_phys_addr=m.guest_phys_addr,
                            memory_size=m.memory_size, userspace_addr=m.userspace_addr,
                            guest_memfd_offset=m.guest_memfd_offset, bound=bool(bound)))
        return sorted(out, key=lambda d: d["slot"])

    # ----------------------------------------------------------- attributes
    def set_memory_attributes(self, address, size, attributes, flags=0):
        """KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes)."""
        held = _host_enter(self.host)
        cdef kvm_memory_attributes a
        cdef kvm *k = self._open("KVM_SET_MEMORY_ATTRIBUTES")
        a.address, a.size = _u64_wrap(address, "address"), _u64_wrap(size, "size")
        a.attributes, a.flags = _u64_wrap(attributes, "attributes"), _u64_wrap(flags, "flags")
        self.host._check(kvm_vm_ioctl_set_mem_attributes(k, &a), "KVM_SET_MEMORY_ATTRIBUTES")

    def get_memory_attributes(self, gfn):
        """The attributes of one gfn (kvm_get_memory_attributes; no ioctl reads them)."""
        held = _host_enter(self.host)
        return kvm_get_memory_attributes(self.k, _u64(gfn, "gfn"))

    def enable_cap(self, cap, *args):
        """KVM_ENABLE_CAP on the VM: KVM_CAP_EXIT_HYPERCALL (args[0]: bitmap of hypercalls
        that exit to userspace; only KVM_HC_MAP_GPA_RANGE is valid)."""
        held = _host_enter(self.host)
        cdef kvm *k = self._open("KVM_ENABLE_CAP")
        self.host._check(kvm_vm_ioctl_enable_cap(k, _u64_wrap(cap, "cap"),
                                                 _u64_wrap(args[0] if args else 0, "args[0]")), "KVM_ENABLE_CAP")

    # ------------------------------------------------------------ SEV-SNP
    def snp_launch_start(self, policy=0x30000):
        """KVM_SEV_SNP_LAUNCH_START: the guest is being built; pre-faulting is refused until finish."""
        held = _host_enter(self.host)
        _refuse_in_hook(self.host, "KVM_SEV_SNP_LAUNCH_START")
        cdef uint64_t p = _u64_wrap(policy, "policy")
        self.host._check(sev_snp_launch_start(self._open("KVM_SEV_SNP_LAUNCH_START"), p), "KVM_SEV_SNP_LAUNCH_START")
        self.launch_digest = b""

    def snp_launch_update(self, gfn_start, uaddr, length, page_type, flags=0):
        """KVM_SEV_SNP_LAUNCH_UPDATE through kvm_gmem_populate: the pages must be PRIVATE in the
        attributes and not yet prepared (EEXIST). Returns the updated (gfn_start, uaddr, len)."""
        held = _host_enter(self.host)
        _refuse_in_hook(self.host, "KVM_SEV_SNP_LAUNCH_UPDATE")
        cdef uint64_t gfn = _u64(gfn_start, "gfn_start"), src = _u64(uaddr, "uaddr"), ln = _u64(length, "len")
        cdef int ptype = _int_arg(page_type, "page_type", 0, 256), err = 0
        cdef uint64_t fl = _u64(flags, "flags")
        what = "KVM_SEV_SNP_LAUNCH_UPDATE"
        cdef int64_t count = sev_snp_launch_update(self._open(what), gfn, &src, ln, ptype, fl, &err)
        self.host._raise_hook_exc()
        if count == -EIO and err:
            raise _err(EIO, f"{what}: {_reason(self.host.h)} with {err} ({_errno_mod.errorcode.get(err, '?')})")
        _check_r(self.host.h, <int>count if count < 0 else 0, what)
        # the firmware's measurement, chained over the pages it accepted
        import hashlib
        m = hashlib.sha384(self.launch_digest)
        for i in range(count):
            m.update((((gfn + i) << 12) | ptype).to_bytes(8, "little"))
        self.launch_digest = m.digest()
        return (gfn + count, src + (count << 12) if src else src, ln - (count << 12))

    def snp_launch_finish(self):
        """KVM_SEV_SNP_LAUNCH_FINISH: each vCPU's VMSA becomes a private, immutable page; the
        guest runs and pre-faulting is allowed."""
        held = _host_enter(self.host)
        _refuse_in_hook(self.host, "KVM_SEV_SNP_LAUNCH_FINISH")
        self.host._check(sev_snp_launch_finish(self._open("KVM_SEV_SNP_LAUNCH_FINISH")), "KVM_SEV_SNP_LAUNCH_FINISH")

    @property
    def vmsa_pfns(self):
        held = _host_enter(self.host)
        cdef uint64_t start = 0, pfn
        out = []
        while sev_next_vmsa(self.k, &start, &pfn):
            out.append(pfn)
        return out

    # ---------------------------------------------------------------- TDX
    cdef kvm *_tdx(self, str what, int refuse_errno=ENOTTY) except NULL:
        """A TDX command's VM: vt_mem_enc_ioctl refuses a VM that is not a TD with ENOTTY,
        vt_vcpu_mem_enc_ioctl a vCPU that is not a TD's with EINVAL."""
        cdef kvm *k = self._open(what)
        if k.vm_type != KVM_X86_TDX_VM:
            raise _err(refuse_errno, f"{what}: not a TDX VM")
        return k

    def tdx_init_vm(self, gpaw=52):
        """KVM_TDX_INIT_VM: GPAW 52 (shared bit 51) or 48 (shared bit 47); the TD is being built."""
        held = _host_enter(self.host)
        _refuse_in_hook(self.host, "KVM_TDX_INIT_VM")
        cdef kvm *k = self._tdx("KVM_TDX_INIT_VM")
        self.host._check(tdx_td_init(k, _int_arg(gpaw, "gpaw", 0, 256)), "KVM_TDX_INIT_VM")

    def tdx_finalize_vm(self):
        """KVM_TDX_FINALIZE_VM: refused (EINVAL) while a premapped page was never added."""
        held = _host_enter(self.host)
        _refuse_in_hook(self.host, "KVM_TDX_FINALIZE_VM")
        self.host._check(tdx_td_finalize(self._tdx("KVM_TDX_FINALIZE_VM")), "KVM_TDX_FINALIZE_VM")

    @property
    def td_state(self):
        held = _host_enter(self.host)
        return ("uninitialized", "initialized", "runnable")[tdx_td_state(self.k)] \
            if self.k.vm_type == KVM_X86_TDX_VM else None

    @property
    def nr_premapped(self):
        held = _host_enter(self.host)
        return tdx_nr_premapped(self.k)

    @property
    def shared_gpa_bit(self):
        """TDX: the GPA bit that selects the shared alias (0 for other types)."""
        held = _host_enter(self.host)
        return self.k.gfn_direct_bits << 12

    def sept(self):
        """TDX mirror S-EPT, page by page: {gfn: (pfn, state)} (a huge leaf gives each of its
        gfns; vm.sept_leaves() lists the leaves)."""
        return {gfn + i: (pfn + i, state) for gfn, (pfn, state, level) in self.sept_leaves().items()
                for i in range(1 << (9 * (level - 1)))}

    def sept_leaves(self):
        """TDX mirror S-EPT leaves: {first gfn: (pfn, state, level)}."""
        held = _host_enter(self.host)
        cdef uint64_t start = 0, gfn, pfn
        cdef int state, level
        out = {}
        if self.k.vm_type != KVM_X86_TDX_VM or self.k.dead:
            return out
        while tdx_sept_next(self.k, &start, &gfn, &pfn, &state, &level):
            out[gfn] = (pfn, TDX_SEPT_STATES[state], level)
        return out

    @property
    def tdx_stats(self):
        held = _host_enter(self.host)
        return {name: tdx_stat(self.k, i) for i, name in enumerate(TDX_STATS)}

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
        cdef kvm *k = self._open("page_fault_batch", True)
        cdef const uint64_t[::1] g = _u64_array(gpas, "gpas")
        cdef const uint64_t[::1] e = _u64_array(error_codes, "error_codes")
        cdef const uint64_t[::1] ids = None
        cdef Py_ssize_t n = g.shape[0]
        cdef kvm_vcpu *one
        cdef uint64_t vid
        if e.shape[0] != n:
            raise ValueError(f"gpas ({n}) and error_codes ({e.shape[0]}) differ in length")
        if out is None:
            out = np.empty(n, dtype=FAULT_DTYPE)
        elif not isinstance(out, np.ndarray) or out.dtype != FAULT_DTYPE or out.shape != (n,) \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable, contiguous FAULT_DTYPE array of length {n}")
        res = out
        if self.host._hook_fns:
            # a Python hook runs inside the batch and may resize or free any array it can
            # reach: the batch reads and writes private copies, and fills out at the end
            g, e = np.array(g, copy=True), np.array(e, copy=True)
            res = np.empty(n, dtype=FAULT_DTYPE)
        cdef unsigned char[::1] o = res.view(np.uint8) if n else None
        if isinstance(vcpu_id, (int, np.integer)) or np.ndim(vcpu_id) == 0:
            vid = _u64(vcpu_id, "vcpu_id")
            self._vcpu(vid)
            one = k.vcpus[vid]
            _fault_batch(self.host, &one, NULL, g, e, o, n)
        else:
            ids = _u64_array(vcpu_id, "vcpu_id")
            if self.host._hook_fns:
                ids = np.array(ids, copy=True)
            if ids.shape[0] != n:
                raise ValueError(f"vcpu_id ({ids.shape[0]}) and gpas ({n}) differ in length")
            idv = np.unique(np.asarray(ids)) if n else ()
            if n and idv.max() >= KVM_MAX_VCPU_IDS:
                raise _err(EINVAL, f"KVM_CREATE_VCPU: id {idv.max()} >= KVM_MAX_VCPU_IDS")
            for v in idv:
                self._vcpu(int(v))
            _fault_batch(self.host, k.vcpus, &ids[0] if n else NULL, g, e, o, n)
        self.host._raise_hook_exc()
        if res is not out:
            if not isinstance(out, np.ndarray) or out.shape != (n,) or out.dtype != FAULT_DTYPE:
                raise ValueError("out was resized or replaced during the batch (by a hook)")
            out[...] = res
        return out

    cdef void _vcpu(self, uint64_t vid) except *:
        """vCPU vid, created if absent (KVM_MAX_VCPU_IDS applies)."""
        if vid >= KVM_MAX_VCPU_IDS or self.k.vcpus[vid] == NULL:
            self.create_vcpu(vid)

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
        cdef uint64_t start = 0
        cdef kvm_spte_info s
        out = []
        while kvm_mmu_next_spte(self.k, &start, &s):
            out.append((s.gfn, s.level, s.pfn, bool(s.writable), bool(s.private)))
        return out

    @property
    def stats(self):
        held = _host_enter(self.host)
        cdef int level
        d = {"pages_4k": kvm_vm_pages(self.k, PG_LEVEL_4K), "pages_2m": kvm_vm_pages(self.k, PG_LEVEL_2M),
             "pages_1g": kvm_vm_pages(self.k, PG_LEVEL_1G)}
        for i, name in enumerate(VM_STATS):
            d[name] = kvm_vm_stat(self.k, i)
        d["gmem_make_private"] = d["gmem_prepare"]     # "next"'s name for the same hook
        for name in VCPU_STATS:
            d[name] = 0
        for v in self.vcpus.values():
            for i, name in enumerate(VCPU_STATS):
                d[name] += kvm_vcpu_stat((<Vcpu>v).v, i)
        return d


cdef void _fault_batch(Host host, kvm_vcpu **vcpus, const uint64_t *ids, const uint64_t[::1] gpas,
                       const uint64_t[::1] ecs, unsigned char[::1] out, Py_ssize_t n) except *:
    """kvm_mmu_page_fault_batch without the GIL and with the host parked across it (one OS lock
    per batch): other threads' calls on the host sleep on the lock until it ends."""
    if n == 0:
        return
    _host_park(host)
    try:
        with nogil:
            kvm_mmu_page_fault_batch(vcpus, ids, &gpas[0], &ecs[0], <kvm_fault_out *>&out[0], n)
    finally:
        _host_unpark(host)
