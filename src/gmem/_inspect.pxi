# Per-page state of a guest, for pictures and tests (no kernel counterpart).

PAGE_STATE_DTYPE = np.dtype([("gfn", "<u8"), ("private", "u1"), ("backed", "u1"), ("prepared", "u1"),
                             ("level", "u1"), ("rmp", "u1"), ("pfn", "<u8")])


def page_states(Vm vm not None, gpa, size):
    """One PAGE_STATE_DTYPE record per guest page of [gpa, gpa + size): private (attribute),
    backed (a gmem folio exists), prepared (uptodate), level (SPTE level, 0 unmapped),
    rmp (0 shared, 1 assigned, 2 assigned and validated; SNP only), pfn (of the gmem page)."""
    held = _host_enter(vm.host)
    cdef kvm *k = &vm.k
    cdef uint64_t g0 = _u64(gpa, "gpa") >> 12, n = _u64(size, "size") >> 12, i, gfn, v, first, idx, raw
    cdef int order
    cdef kvm_memory_slot *slot
    cdef folio *f
    if n > (1 << 24):
        raise ValueError("at most 2**24 pages")
    out = np.zeros(n, dtype=PAGE_STATE_DTYPE)
    cols = {name: np.zeros(n, dtype=out.dtype[name]) for name in out.dtype.names}
    cdef uint64_t[::1] o_gfn = cols["gfn"], o_pfn = cols["pfn"]
    cdef uint8_t[::1] o_priv = cols["private"], o_backed = cols["backed"]
    cdef uint8_t[::1] o_prep = cols["prepared"], o_level = cols["level"], o_rmp = cols["rmp"]
    if vm.destroyed:
        return out
    for i in range(n):
        gfn = g0 + i
        o_gfn[i] = gfn
        o_priv[i] = kvm_mem_is_private(k, gfn)
        if xa_lookup(&k.sptes, gfn, &v, &first, &order):
            o_level[i] = v & SPTE_LEVEL_MASK
        slot = gfn_to_memslot(k, gfn)
        if slot != NULL and slot.gmem_file != NULL:
            idx = gfn - slot.base_gfn + slot.gmem_pgoff
            if xa_lookup(&slot.gmem_file.inode.filemap, idx, &v, &first, &order):
                f = folio_get(&k.host.pm, <uint32_t>v)
                o_backed[i] = 1
                o_prep[i] = (f.flags & PG_uptodate) != 0
                o_pfn[i] = f.pfn + idx - first
                if k.host.rmp.enabled:
                    raw = rmp_raw(k.host, o_pfn[i])
                    o_rmp[i] = 0 if not raw & RMP_ASSIGNED else (2 if raw & RMP_VALIDATED else 1)
    for name in out.dtype.names:
        out[name] = cols[name]
    return out


# ------------------------------------------------------------ C-level API

cdef kvm_vcpu *gmem_vcpu_ptr(object vcpu) except NULL:
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"expected a gmem.Vcpu, not {type(vcpu).__name__}")
    if (<Vcpu>vcpu).vm.destroyed:
        raise ValueError("the VM of this vCPU is destroyed")
    return &(<Vcpu>vcpu).v


cdef kvm *gmem_vm_ptr(object vm) except NULL:
    if not isinstance(vm, Vm):
        raise TypeError(f"expected a gmem.Vm, not {type(vm).__name__}")
    if (<Vm>vm).destroyed:
        raise ValueError("the VM is destroyed")
    return &(<Vm>vm).k


cdef gmem_host *gmem_host_ptr(object host) except NULL:
    if not isinstance(host, Host):
        raise TypeError(f"expected a gmem.Host, not {type(host).__name__}")
    return &(<Host>host).h
