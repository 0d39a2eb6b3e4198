# Intel TDX from Python: the TD's launch (KVM_TDX_INIT_VM, INIT_MEM_REGION,
# FINALIZE_VM), the guest's TDG.MEM.PAGE.ACCEPT and MapGPA.

TDX_STATS = ("aug", "page_add", "block", "track", "remove", "accept")
TDX_SEPT_STATES = {TDX_SEPT_PREMAPPED: "premapped", TDX_SEPT_PENDING: "pending",
                   TDX_SEPT_ACCEPTED: "accepted"}
TDX_SUCCESS = 0
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
TDVMCALL_STATUS_SUCCESS = 0
TDVMCALL_STATUS_RETRY = 1
TDVMCALL_STATUS_INVALID_OPERAND = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED = 0x8000000000000003
TDX_MAP_GPA_MAX_LEN = 2 << 20
KVM_EXIT_HYPERCALL_LONG_MODE = 1


ctypedef struct tdx_populate_args:
    kvm_vcpu *vcpu


cdef int tdx_gmem_post_populate(kvm *kvm, uint64_t gfn, uint64_t pfn, uint64_t src, int order,
                                void *opaque) noexcept nogil:
    cdef tdx_populate_args *args = <tdx_populate_args *>opaque
    cdef uint64_t spfn, v, old
    cdef unsigned char *d
    cdef unsigned char *s
    cdef int level, r
    # build the mirror leaf (premapped: the TD is not runnable yet)
    r = kvm_tdp_map_page(args.vcpu, gfn << 12, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS, &level)
    if r < 0:
        return r
    if hva_to_pfn(kvm.host, src, &spfn):
        return -_EFAULT
    # TDH.MEM.PAGE.ADD: the page enters the TD with the source's contents, accepted
    s = page_data_get(kvm.host, spfn, False)
    page_data_drop(kvm.host, pfn, 1)
    if s != NULL:
        d = page_data_get(kvm.host, pfn, True)
        if d == NULL:
            return -_ENOMEM
        memcpy(d, s, 4096)
    if xa_load(&kvm.sept, gfn, &v) and (v & 15) == TDX_SEPT_PREMAPPED:
        kvm.nr_premapped -= 1
    xa_store_order(&kvm.sept, gfn, 0, (pfn << 4) | TDX_SEPT_ACCEPTED, &old)
    kvm.tdx_stats[TDX_STAT_PAGE_ADD] += 1
    return 0


cdef void _tdx_check(Vm vm, str what) except *:
    vm._check_open(what)
    if vm.k.vm_type != KVM_X86_TDX_VM:
        raise _err(_errno_mod.EINVAL, f"{what}: not a TDX VM")


cdef object _tdx_map_gpa_next(Vcpu vcpu):
    start, end, nxt = vcpu._pending[1:]
    size = min(end - nxt, TDX_MAP_GPA_MAX_LEN)
    direct = vcpu.v.kvm.gfn_direct_bits << 12
    private = not (nxt & direct)
    return HypercallExit(12, (nxt & ~direct, size >> 12, KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0),
                         KVM_EXIT_HYPERCALL_LONG_MODE)


cdef object _tdx_map_gpa_complete(Vcpu vcpu, ret):
    _, start, end, nxt = vcpu._pending
    if ret:
        vcpu._pending = None
        return TDVMCALL_STATUS_INVALID_OPERAND
    nxt += TDX_MAP_GPA_MAX_LEN
    if nxt >= end:
        vcpu._pending = None
        return TDVMCALL_STATUS_SUCCESS
    vcpu._pending = ("map_gpa", start, end, nxt)
    return _tdx_map_gpa_next(vcpu)


cdef int _tdx_private_access_check(Vcpu vcpu, uint64_t gpa) except -1:
    """A TD's access to a private page the guest has not accepted: with SEPT_VE_DISABLE the
    module exits to KVM, which (since the July 2025 change) reports a memory-fault exit of
    size 0 with -EFAULT. (v6.16 killed the VM instead.)"""
    cdef kvm *k = vcpu.v.kvm
    cdef uint64_t v
    if (gpa >> 12) & k.gfn_direct_bits:
        return 0
    if xa_load(&k.sept, gpa >> 12, &v) and (v & 15) == TDX_SEPT_PENDING:
        raise GuestExit(FaultResult(-_EFAULT, KVM_EXIT_MEMORY_FAULT,
                                    (KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa & ~(<uint64_t>4095), 0), 0, 0))
    return 0
