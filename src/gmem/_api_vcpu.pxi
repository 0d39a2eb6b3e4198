# gmem.Vcpu: a vCPU's handle (the struct is the VM's, kept while the Vm handle lives): page
# faults, KVM_PRE_FAULT_MEMORY, the guest's own accesses and instructions through the guest
# CPU (_guest.pxi), and the userspace exits a guest's requests end in.

VCPU_STATS = ("pf_taken", "pf_fixed", "pf_spurious", "pf_emulate", "pf_fast", "pf_retry",
              "memory_fault_exits", "synthetic_error_bits_cleared")



@cython.final
cdef class Vcpu:
    """A vCPU: where page faults are taken. Vcpu(vm, id) is vm's vCPU id, created if absent."""
    cdef kvm_vcpu *v
    cdef readonly Vm vm
    cdef list _psc_entries           # the dicts of the PSC request being worked through

    def __cinit__(self, Vm vm not None, vcpu_id, _wrap=None):
        cdef uint64_t id = _u64(vcpu_id, "vcpu_id")
        if id >= KVM_MAX_VCPU_IDS:
            raise ValueError(f"vcpu_id {vcpu_id} >= KVM_MAX_VCPU_IDS")
        self.vm = vm
        if _wrap is not _HANDLE:
            vm._vcpu(id)
            vm._vcpus.setdefault(id, self)
        self.v = vm.k.vcpus[id]

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
            self.vm._open("page fault", True)
            kvm_mmu_page_fault(self.v, g, e, &out)
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
        self.vm._open(what)
        _host_park(self.vm.host)
        try:
            with nogil:
                r = kvm_vcpu_pre_fault_memory(self.v, &range)
        finally:
            _host_unpark(self.vm.host)
        self.vm.host._check(r, what)
        return (range.gpa, range.size)

    @property
    def stats(self):
        held = _host_enter(self.vm.host)
        return {name: kvm_vcpu_stat(self.v, i) for i, name in enumerate(VCPU_STATS)}

    # ------------------------------------------------------- guest accesses
    cdef kvm *_run(self, str what) except NULL:
        """KVM_RUN for a guest instruction: the VM fd open, then vcpu_pre_run's refusals
        (kvm_vcpu_pre_run: the launch not done for this vCPU, a dead VM)."""
        cdef kvm *k = self.vm._open(what)
        self.vm.host._check(kvm_vcpu_pre_run(self.v), what)
        return k

    cdef unsigned char *_guest_page(self, uint64_t gpa, uint64_t error_code, bint write) except NULL:
        """The bytes of the page at gpa once a guest access reaches it (kvm_guest_access)."""
        cdef kvm_fault_out out
        cdef uint64_t pfn
        cdef unsigned char *p
        cdef int r = kvm_guest_access(self.v, gpa, error_code, &pfn, &out)
        if r != GUEST_ACCESS_OK:
            _guest_access_end(self, r, &out, "guest access")
        p = page_data_get(self.v.kvm.host, pfn, write)
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
        self._run("guest read")
        out = bytearray(ln)
        cdef unsigned char[::1] o = out if ln else None
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            p = self._guest_page(a + pos, ec & ~PFERR_WRITE_MASK, False)
            memcpy(&o[pos], p + ((a + pos) & 4095), k)
            pos += k
        return bytes(out)

    def write(self, gpa, data, error_code=PFERR_WRITE_MASK):
        """A guest write of data at gpa (the fault carries PFERR_WRITE_MASK); see read()."""
        held = _host_enter(self.vm.host)
        cdef uint64_t a = _u64(gpa, "gpa"), ec = _u64(error_code, "error_code"), pos = 0, k
        cdef unsigned char *p
        self._run("guest write")
        b = _bytes_arg(data, "data")
        cdef uint64_t ln = len(b)
        cdef const unsigned char[::1] d = b if ln else None
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            p = self._guest_page(a + pos, ec | PFERR_WRITE_MASK, True)
            memcpy(p + ((a + pos) & 4095), &d[pos], k)
            pos += k

    # -------------------------------------------------------- SEV-SNP guest
    def pvalidate(self, gpa, pagesize, validate):
        """The guest's PVALIDATE of the page at gpa (pagesize 0: 4K, 1: 2M): 0 or the code
        (FAIL_INPUT, FAIL_SIZEMISMATCH, PVALIDATE_FAIL_NOUPDATE when nothing changed).
        A 4K PVALIDATE on a 2M RMP entry takes an RMP|SIZEM #NPF: KVM PSMASHes, then it runs."""
        held = _host_enter(self.vm.host)
        cdef kvm_fault_out out
        cdef uint64_t code = 0, g = _u64(gpa, "gpa")
        cdef int ps = _c_int_arg(pagesize, "pagesize")
        self._run("PVALIDATE")
        r = snp_guest_pvalidate(self.v, g, ps, bool(validate), &code, &out)
        if r != GUEST_ACCESS_OK:
            _guest_access_end(self, r, &out, "PVALIDATE")
        return code

    def rmpadjust(self, gpa, pagesize, attrs):
        """The guest's RMPADJUST (VMPL permissions, VMSA bit) of the page at gpa: 0 or the code."""
        held = _host_enter(self.vm.host)
        cdef kvm_fault_out out
        cdef uint64_t code = 0, g = _u64(gpa, "gpa"), a = _u64(attrs, "attrs")
        cdef int ps = _c_int_arg(pagesize, "pagesize")
        self._run("RMPADJUST")
        r = snp_guest_rmpadjust(self.v, g, ps, a, &code, &out)
        if r != GUEST_ACCESS_OK:
            _guest_access_end(self, r, &out, "RMPADJUST")
        return code

    cdef object _exit_or_result(self, int r, uint64_t result, str what):
        """A request's outcome: a HypercallExit to answer, or what the guest sees."""
        self.vm.host._check(r, what)
        if r == KVM_EXIT_HYPERCALL:
            return _hypercall_exit(self.v)
        self._psc_entries = None
        return result

    def psc_msr(self, gpa, op):
        """A GHCB MSR-protocol page-state change of one page (op 1 private, 2 shared): a
        HypercallExit to answer with complete_hypercall(), or the GHCB response right away."""
        held = _host_enter(self.vm.host)
        cdef uint64_t result = 0, g = _u64(gpa, "gpa")
        cdef int o = _c_int_arg(op, "op")
        self._run("page-state change")
        self.v.complete_userspace_io = NULL
        r = snp_begin_psc_msr(self.v, g, o, &result)
        return self._exit_or_result(r, result, "page-state change")

    def page_state_change(self, entries, cur_entry=0, end_entry=None):
        """A GHCB PSC request (SVM_VMGEXIT_PSC). entries: dicts with gfn, operation, pagesize,
        cur_page (updated in place as KVM progresses). Returns a HypercallExit (answer with
        complete_hypercall) or the final PSC return code (0 or VMGEXIT_PSC_ERROR_*)."""
        held = _host_enter(self.vm.host)
        cdef uint64_t result = 0
        cdef psc_buffer buf
        cdef Py_ssize_t i
        self._run("page-state change")
        if self.v.kvm.vm_type != KVM_X86_SNP_VM:
            raise _err(EINVAL, "page-state change: only an SEV-SNP guest has it")
        ents = [_psc_entry(e, i) for i, e in enumerate(entries)]
        dicts = entries if isinstance(entries, list) else ents
        if dicts is entries:
            entries[:] = ents
            dicts = ents
        # the GHCB header's cur_entry and end_entry are 16-bit fields
        memset(&buf, 0, sizeof(buf))
        buf.cur_entry = _int_arg(cur_entry, "cur_entry", 0, 1 << 16)
        buf.end_entry = len(ents) - 1 if end_entry is None else _int_arg(end_entry, "end_entry", 0, 1 << 16)
        if end_entry is None and not ents:
            buf.cur_entry, buf.end_entry = 1, 0          # nothing to do
        if buf.end_entry >= len(ents) and buf.end_entry < VMGEXIT_PSC_MAX_ENTRY:
            raise ValueError("end_entry is past the entries given")
        for i in range(min(len(ents), VMGEXIT_PSC_MAX_ENTRY)):
            e = ents[i]
            buf.entries[i] = psc_entry(e["gfn"], e["operation"], e["pagesize"], e["cur_page"])
        self.v.psc = buf
        self.v.complete_userspace_io = NULL
        self._psc_entries = dicts
        r = sev_vcpu_psc(self.v, &result)
        self._psc_sync()
        return self._exit_or_result(r, result, "page-state change")

    cdef void _psc_sync(self):
        """Each entry's cur_page as KVM left it in the buffer, back into the caller's dicts."""
        cdef Py_ssize_t i
        if self._psc_entries is None:
            return
        for i, d in enumerate(self._psc_entries[:VMGEXIT_PSC_MAX_ENTRY]):
            d["cur_page"] = psc_cur_page(self.v.psc.entries[i])

    # ------------------------------------------------------------ TDX guest
    def tdx_accept(self, gpa, level=1):
        """The guest's TDG.MEM.PAGE.ACCEPT of the private page at gpa, of level 1 (4K) or 2
        (2M): an EPT violation AUGs it first if needed (with Host(tdx_huge_page=), a 4K ACCEPT
        inside a PENDING 2M leaf demotes it first). TDX_SUCCESS, TDX_PAGE_ALREADY_ACCEPTED,
        TDX_PAGE_SIZE_MISMATCH (mapped smaller than level: retry at 4K) or TDX_OPERAND_INVALID
        (another level, or gpa not aligned to it)."""
        held = _host_enter(self.vm.host)
        cdef kvm_fault_out out
        cdef uint64_t status = 0, g = _u64(gpa, "gpa")
        cdef int lvl = _int_arg(level, "level", 0, 8)
        self.vm._tdx("TDG.MEM.PAGE.ACCEPT", EINVAL)
        self._run("TDG.MEM.PAGE.ACCEPT")
        r = tdx_accept_page(self.v, g, lvl, &status, &out)
        if r != 0:
            _guest_access_end(self, r, &out, "TDG.MEM.PAGE.ACCEPT")
        return status

    def tdx_map_gpa(self, gpa, size):
        """TDG.VP.VMCALL<MapGPA>: the shared bit of gpa says the target state. A HypercallExit
        per 2M chunk (answer with complete_hypercall), or a TDVMCALL status."""
        held = _host_enter(self.vm.host)
        cdef uint64_t status = 0, g = _u64(gpa, "gpa"), n = _u64(size, "size")
        self.vm._tdx("MapGPA", EINVAL)
        self._run("MapGPA")
        self.v.complete_userspace_io = NULL
        r = tdx_map_gpa(self.v, g, n, &status)
        return self._exit_or_result(r, status, "MapGPA")

    def tdx_init_vcpu(self):
        """KVM_TDX_INIT_VCPU: once per vCPU, between KVM_TDX_INIT_VM and KVM_TDX_FINALIZE_VM;
        the vCPU runs only after it (and after FINALIZE)."""
        held = _host_enter(self.vm.host)
        _refuse_in_hook(self.vm.host, "KVM_TDX_INIT_VCPU")
        self.vm._tdx("KVM_TDX_INIT_VCPU", EINVAL)
        self.vm.host._check(tdx_vcpu_init(self.v), "KVM_TDX_INIT_VCPU")

    def tdx_init_mem_region(self, source_addr, gpa, nr_pages, measure=False):
        """KVM_TDX_INIT_MEM_REGION: copy nr_pages from the VMM's memory at source_addr into the
        TD's private memory at gpa (premap, then TDH.MEM.PAGE.ADD), one page at a time.
        Returns the pages added; on an error after some pages, raises with partial progress kept.
        measure: KVM_TDX_MEASURE_MEMORY_REGION, each page extended into the TD's measurement
        (TDH.MR.EXTEND per 256 bytes, counted in vm.tdx_stats["mr_extend"])."""
        held = _host_enter(self.vm.host)
        cdef uint64_t src = _u64(source_addr, "source_addr"), g = _u64(gpa, "gpa")
        cdef uint64_t n = _u64(nr_pages, "nr_pages"), done = 0
        what = "KVM_TDX_INIT_MEM_REGION"
        self.vm._tdx(what, EINVAL)
        r = tdx_vcpu_init_mem_region(self.v, src, g, n, bool(measure), &done)
        self.vm.host._raise_hook_exc()
        if r < 0:
            raise _err(-r, f"{what}: page {done} of {n}: {_reason(self.vm.host.h)} ({done} added)")
        return done

    def complete_hypercall(self, ret=0):
        """Userspace's answer (hypercall.ret) to the last HypercallExit; returns the next exit,
        or the guest-visible result when the request is done."""
        held = _host_enter(self.vm.host)
        cdef uint64_t result = 0, r64 = <uint64_t>(_int_arg(ret, "ret", -(1 << 63), 1 << 64) & 0xFFFFFFFFFFFFFFFF)
        self._run("complete_hypercall")
        r = kvm_complete_hypercall(self.v, r64, &result)
        if r < 0:
            self.vm.host._check(r, "complete_hypercall")
        self._psc_sync()
        return self._exit_or_result(r, result, "complete_hypercall")


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
