# The guest CPU (as arch/x86/coco is kept apart from arch/x86/kvm): a guest's loads and
# stores reach memory through the nested page tables, faulting into KVM until the page is
# mapped; an SEV-SNP guest's private (C=1) accesses and its PVALIDATE/RMPADJUST go through
# the hardware's RMP checks (APM vol. 2 §15.36.10) and may take an #NPF or a #VC; a TD's
# access to a page it has not accepted exits.  No kernel counterpart: this is the hardware
# and the guest the kernel runs against.

cdef enum:
    GUEST_FAULT_RETRIES = 16     # RET_PF_RETRY re-entries before the access is given up


cdef inline int guest_fault_exc(kvm_vcpu *vcpu, int vector, uint64_t code, uint64_t gpa,
                                uint64_t pfn, const char *why) noexcept nogil:
    vcpu.fault.vector, vcpu.fault.code, vcpu.fault.gpa, vcpu.fault.pfn, vcpu.fault.why = \
        vector, code, gpa, pfn, why
    return GUEST_ACCESS_FAULT


cdef int guest_npf(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code, kvm_fault_out *out) noexcept nogil:
    """One #NPF for the page of gpa: GUEST_ACCESS_OK when KVM resumes the guest, else how the
    access ends."""
    kvm_mmu_page_fault(vcpu, gpa & ~(<uint64_t>4095), error_code, out)
    if vcpu.kvm.host.hook_error:
        return GUEST_ACCESS_HOOK_ERROR
    return GUEST_ACCESS_EXIT if out.ret < 0 else GUEST_ACCESS_OK


cdef int snp_rmp_npf(kvm_vcpu *vcpu, uint64_t gpa, uint64_t extra, kvm_fault_out *out) noexcept nogil:
    """An #NPF with the RMP bit: kvm_mmu_page_fault, then sev_handle_rmp_fault."""
    return guest_npf(vcpu, gpa, PFERR_GUEST_RMP_MASK | PFERR_GUEST_ENC_MASK | PFERR_GUEST_FINAL_MASK |
                     PFERR_PRESENT_MASK | extra, out)


cdef bint snp_rmp_owned(kvm_vcpu *vcpu, uint64_t gpa, uint64_t pfn) noexcept nogil:
    """The RMP check of a C=1 access: pfn is assigned to this guest's ASID, at this GPA,
    and not immutable."""
    cdef rmp_entry_info e = snp_rmpentry_info(vcpu.kvm.host, pfn)
    return e.assigned and e.asid == vcpu.kvm.sev.asid and e.gpa == gpa & ~(<uint64_t>4095) \
        and not e.immutable


cdef int snp_private_access_check(kvm_vcpu *vcpu, uint64_t gpa, int spte_level, uint64_t pfn,
                                  kvm_fault_out *out) noexcept nogil:
    """The RMP checks of an SNP guest's C=1 data access after the NPT walk: GUEST_ACCESS_OK,
    RET_PF_RETRY (an RMP size-mismatch #NPF was taken: walk again), or how it ends."""
    cdef int assigned, level, r
    if not snp_rmp_owned(vcpu, gpa, pfn):
        r = snp_rmp_npf(vcpu, gpa, 0, out)
        if r:
            return r
        return guest_fault_exc(vcpu, 14, 0, gpa, pfn, "the page is not assigned to this guest there")
    snp_lookup_rmpentry(vcpu.kvm.host, pfn, &assigned, &level)
    if spte_level != level:
        r = snp_rmp_npf(vcpu, gpa, PFERR_GUEST_SIZEM_MASK, out)
        return r if r else RET_PF_RETRY
    if not snp_rmpentry_info(vcpu.kvm.host, pfn).validated:
        return guest_fault_exc(vcpu, 29, 0x404, gpa, pfn, "#VC 0x404 (PAGE_NOT_VALIDATED)")
    return GUEST_ACCESS_OK


cdef int kvm_guest_access(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code, uint64_t *pfn,
                          kvm_fault_out *out) noexcept nogil:
    """A guest load or store at gpa: fault until the page is mapped (RET_PF_RETRY re-enters),
    then the hardware's checks of the access. GUEST_ACCESS_OK with *pfn the page's host pfn,
    or how the access ends (out, vcpu.fault)."""
    cdef kvm *kvm = vcpu.kvm
    cdef bint snp_private = kvm.vm_type == KVM_X86_SNP_VM and (error_code & PFERR_GUEST_ENC_MASK) != 0
    cdef int tries, r
    for tries in range(GUEST_FAULT_RETRIES + 1):
        kvm_mmu_page_fault(vcpu, gpa & ~(<uint64_t>4095), error_code, out)
        if kvm.host.hook_error:
            return GUEST_ACCESS_HOOK_ERROR
        if out.ret == RET_PF_FIXED or out.ret == RET_PF_SPURIOUS:
            out.pfn += (gpa >> 12) & _mask(_level_order(out.level))
            if kvm.vm_type == KVM_X86_TDX_VM and tdx_access_pending(vcpu, gpa):
                kvm_vm_dead(kvm)
                memset(out, 0, sizeof(kvm_fault_out))
                out.ret = -EIO
                return GUEST_ACCESS_EXIT
            if not snp_private:
                pfn[0] = out.pfn
                return GUEST_ACCESS_OK
            r = snp_private_access_check(vcpu, gpa, out.level, out.pfn, out)
            if r == GUEST_ACCESS_OK:
                pfn[0] = out.pfn
                return GUEST_ACCESS_OK
            if r != RET_PF_RETRY:
                return r
        elif out.ret != RET_PF_RETRY:
            return GUEST_ACCESS_EXIT
    return GUEST_ACCESS_EXIT


cdef int snp_translate(kvm_vcpu *vcpu, uint64_t gpa, uint64_t *pfn, int *spte_level,
                       kvm_fault_out *out) noexcept nogil:
    """The guest's C=1 walk of gpa through the NPT, faulting it in (ENC) if unmapped."""
    cdef int tries, r
    cdef bint private
    if not kvm_mmu_spte_lookup(vcpu.kvm, gpa >> 12, pfn, spte_level, &private) or not private:
        for tries in range(GUEST_FAULT_RETRIES):
            r = guest_npf(vcpu, gpa, PFERR_GUEST_ENC_MASK | PFERR_GUEST_FINAL_MASK, out)
            if r or out.ret != RET_PF_RETRY:
                break
        if vcpu.kvm.host.hook_error:
            return GUEST_ACCESS_HOOK_ERROR
        if out.ret != RET_PF_FIXED and out.ret != RET_PF_SPURIOUS:
            return GUEST_ACCESS_EXIT
        kvm_mmu_spte_lookup(vcpu.kvm, gpa >> 12, pfn, spte_level, &private)
    return GUEST_ACCESS_OK


cdef int snp_rmp_target(kvm_vcpu *vcpu, uint64_t gpa, int pagesize, uint64_t *target,
                        uint64_t *code, kvm_fault_out *out) noexcept nogil:
    """PVALIDATE/RMPADJUST's walk to the RMP entry they change: GUEST_ACCESS_OK with *target
    (and *code 0), or *code an architectural failure, or how the instruction ends. A 4K
    request on a 2M entry takes an RMP|SIZEM #NPF (KVM PSMASHes) and is retried."""
    cdef uint64_t pfn
    cdef int spte_level, assigned, level, tries, r
    code[0] = 0
    if pagesize != 0 and pagesize != 1 or (pagesize and gpa & ((PTRS_PER_PMD << 12) - 1)):
        code[0] = PVALIDATE_FAIL_INPUT
        return GUEST_ACCESS_OK
    for tries in range(4):
        r = snp_translate(vcpu, gpa, &pfn, &spte_level, out)
        if r:
            return r
        if not snp_rmp_owned(vcpu, gpa, pfn):
            r = snp_rmp_npf(vcpu, gpa, 0, out)
            if r:
                return r
            return guest_fault_exc(vcpu, 14, 0, gpa, pfn, "the RMP entry is not this guest's "
                                   "(the #NPF repeats forever on hardware)")
        snp_lookup_rmpentry(vcpu.kvm.host, pfn, &assigned, &level)
        if pagesize == 1 and level == PG_LEVEL_4K:
            code[0] = PVALIDATE_FAIL_SIZEMISMATCH
            return GUEST_ACCESS_OK
        if pagesize == 0 and level == PG_LEVEL_2M:
            r = snp_rmp_npf(vcpu, gpa, PFERR_GUEST_SIZEM_MASK, out)
            if r:
                return r
            continue
        target[0] = (pfn & ~(<uint64_t>PTRS_PER_PMD - 1)) if pagesize else pfn
        return GUEST_ACCESS_OK
    return guest_fault_exc(vcpu, 14, 0, gpa, 0, "RMP size mismatch persists")


cdef int snp_guest_pvalidate(kvm_vcpu *vcpu, uint64_t gpa, int pagesize, bint validate,
                             uint64_t *code, kvm_fault_out *out) noexcept nogil:
    """The guest's PVALIDATE of the page at gpa: GUEST_ACCESS_OK with *code (0 or the
    architectural failure), or how it ends; -EINVAL (#UD) outside an SNP guest."""
    cdef uint64_t target
    cdef int r
    if vcpu.kvm.vm_type != KVM_X86_SNP_VM:
        return _refuse(vcpu.kvm.host, -EINVAL, "only an SEV-SNP guest has it (#UD)")
    r = snp_rmp_target(vcpu, gpa, pagesize, &target, code, out)
    if r or code[0]:
        return r
    code[0] = pvalidate_insn(vcpu.kvm.host, target, validate)
    gmem_trace(vcpu.kvm.host, TRACE_PVALIDATE, vcpu.vcpu_id, gpa, target, pagesize | (validate << 1), code[0])
    return GUEST_ACCESS_OK


cdef int snp_guest_rmpadjust(kvm_vcpu *vcpu, uint64_t gpa, int pagesize, uint64_t attrs,
                             uint64_t *code, kvm_fault_out *out) noexcept nogil:
    """The guest's RMPADJUST of the page at gpa (as snp_guest_pvalidate)."""
    cdef uint64_t target
    cdef int r
    code[0] = rmpadjust_check(attrs)
    if code[0]:
        return GUEST_ACCESS_OK
    if vcpu.kvm.vm_type != KVM_X86_SNP_VM:
        return _refuse(vcpu.kvm.host, -EINVAL, "only an SEV-SNP guest has it (#UD)")
    r = snp_rmp_target(vcpu, gpa, pagesize, &target, code, out)
    if r or code[0]:
        return r
    code[0] = rmpadjust_insn(vcpu.kvm.host, target, attrs)
    return GUEST_ACCESS_OK
