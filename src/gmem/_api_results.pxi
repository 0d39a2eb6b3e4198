# What calls give back: fault outcomes (FaultResult, the FAULT_DTYPE array of a batch),
# userspace exits (HypercallExit) and the exceptions a guest access ends in (GuestExit,
# GuestFault), all built from the C structs the kernel files fill.

FAULT_DTYPE = np.dtype({
    "names": ["ret", "exit_reason", "pfn", "gpa", "flags", "level"],
    "formats": ["<i4", "<u4", "<u8", "<u8", "<u8", "u1"],
    "offsets": [0, 4, 8, 16, 24, 32],
    "itemsize": sizeof(kvm_fault_out),
})


@cython.final
cdef class FaultResult:
    """The outcome of one vcpu.page_fault(): ret (RET_PF_* or -errno), exit_reason,
    memory_fault ((flags, gpa, size) for KVM_EXIT_MEMORY_FAULT), level and pfn when mapped."""
    cdef kvm_fault_out o
    cdef uint64_t mf_size

    def __init__(self, ret, exit_reason, memory_fault, level, pfn):
        self.o.ret = _int_arg(ret, "ret", -(1 << 31), 1 << 31)
        self.o.exit_reason = _int_arg(exit_reason, "exit_reason", 0, 1 << 32)
        self.o.level = _int_arg(level, "level", 0, 256)
        self.o.pfn = _u64(pfn, "pfn")
        if memory_fault is not None:
            flags, gpa, size = memory_fault
            self.o.flags, self.o.gpa, self.mf_size = _u64(flags, "flags"), _u64(gpa, "gpa"), _u64(size, "size")

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


cdef object _fault_result(const kvm_fault_out *o, uint64_t mf_size=4096):
    cdef FaultResult r = FaultResult.__new__(FaultResult)
    r.o = o[0]
    r.mf_size = mf_size         # KVM_EXIT_MEMORY_FAULT reports one page (a TD's PENDING page: 0)
    return r


class GuestExit(Exception):
    """A guest access stopped in userspace: .result is the FaultResult (ret, exit_reason,
    memory_fault) that KVM_RUN would have returned."""

    def __init__(self, result):
        super().__init__(f"guest access exits to userspace: {result!r}")
        self.result = result


class GuestFault(Exception):
    """An exception the guest itself takes (e.g. #VC 0x404 PAGE_NOT_VALIDATED); KVM never sees it."""

    def __init__(self, vector, code, message):
        super().__init__(message)
        self.vector, self.code = vector, code


class HypercallExit:
    """KVM_EXIT_HYPERCALL: nr, args (gpa, npages, attrs), flags. Answer with vcpu.complete_hypercall(ret)."""
    __slots__ = ("nr", "args", "flags")
    exit_reason = KVM_EXIT_HYPERCALL

    def __init__(self, nr, args, flags=0):
        self.nr, self.args, self.flags = nr, tuple(args), flags

    def __repr__(self):
        return f"HypercallExit(nr={self.nr}, args=({', '.join(hex(a) for a in self.args)}), flags={self.flags})"

    def __eq__(self, other):
        return isinstance(other, HypercallExit) and (self.nr, self.args, self.flags) == (other.nr, other.args, other.flags)


cdef object _hypercall_exit(const kvm_vcpu *v):
    """vcpu->run->hypercall as userspace reads it."""
    return HypercallExit(v.hypercall.nr, (v.hypercall.args[0], v.hypercall.args[1], v.hypercall.args[2]),
                         v.hypercall.flags)


cdef object _guest_access_end(Vcpu vcpu, int r, const kvm_fault_out *out, str what):
    """Raise what a guest access that did not go through ends in (r from _guest.pxi)."""
    cdef guest_fault *f = &vcpu.v.fault
    vcpu.vm.host._raise_hook_exc()
    if r == GUEST_ACCESS_EXIT:
        raise GuestExit(_fault_result(out, vcpu.v.memory_fault_size))
    if r == GUEST_ACCESS_FAULT:
        where = f" (pfn {f.pfn:#x})" if f.pfn else ""
        raise GuestFault(f.vector, f.code, f"{what} at gpa {f.gpa:#x}{where}: {(<bytes>f.why).decode()}")
    _check_r(vcpu.v.kvm.host, r, what)
    if r != GUEST_ACCESS_OK:
        raise RuntimeError(f"{what}: unexpected outcome {r}")
