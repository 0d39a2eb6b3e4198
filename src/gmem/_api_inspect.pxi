# Per-page state of a guest, for pictures and tests (gmem.page_states), and the handles ->
# structs converters of the C-level API.

PAGE_STATE_DTYPE = np.dtype([("gfn", "<u8"), ("private", "u1"), ("backed", "u1"), ("prepared", "u1"),
                             ("level", "u1"), ("rmp", "u1"), ("pfn", "<u8")])


def page_states(Vm vm not None, gpa, size):
    """One PAGE_STATE_DTYPE record per guest page of [gpa, gpa + size): private (attribute),
    backed (a gmem folio exists), prepared (uptodate), level (SPTE level, 0 unmapped),
    rmp (0 shared, 1 assigned, 2 assigned and validated; SNP only), pfn (of the gmem page)."""
    held = _host_enter(vm.host)
    cdef uint64_t g0 = _u64(gpa, "gpa") >> 12, n = _u64(size, "size") >> 12
    if n > (1 << 24):
        raise ValueError("at most 2**24 pages")
    out = np.zeros(n, dtype=PAGE_STATE_DTYPE)
    if n:
        kvm_page_states(vm.k, g0, n, <gmem_page_state *>cnp.PyArray_DATA(out))
    return out


cdef kvm_vcpu *gmem_vcpu_ptr(object vcpu) except NULL:
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"expected a gmem.Vcpu, not {type(vcpu).__name__}")
    if (<Vcpu>vcpu).vm.k.dead:
        raise ValueError("the VM of this vCPU is destroyed")
    return (<Vcpu>vcpu).v


cdef kvm *gmem_vm_ptr(object vm) except NULL:
    if not isinstance(vm, Vm):
        raise TypeError(f"expected a gmem.Vm, not {type(vm).__name__}")
    if (<Vm>vm).k.dead:
        raise ValueError("the VM is destroyed")
    return (<Vm>vm).k


cdef gmem_host *gmem_host_ptr(object host) except NULL:
    if not isinstance(host, Host):
        raise TypeError(f"expected a gmem.Host, not {type(host).__name__}")
    return (<Host>host).h
