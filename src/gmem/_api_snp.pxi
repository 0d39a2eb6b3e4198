# SEV-SNP from Python: host.rmp, host.touch, the guest's PVALIDATE/RMPADJUST,
# page-state changes (GHCB MSR protocol and PSC buffer) and the launch.

from collections import namedtuple as _namedtuple

RmpEntry = _namedtuple("RmpEntry", "assigned pagesize immutable validated asid gpa vmsa",
                       module="gmem._core")
RMP_DTYPE = np.dtype([("pfn", "<u8"), ("assigned", "u1"), ("pagesize", "u1"), ("immutable", "u1"),
                      ("validated", "u1"), ("vmsa", "u1"), ("asid", "<u2"), ("gpa", "<u8")])
SNP_STATS = ("rmpupdate", "rmpupdate_failed", "psmash", "pvalidate", "rmp_faults", "rmp_violations",
             "leaked_pages", "direct_map_splits")
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | GHCB_MSR_PSC_RESP
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
VMGEXIT_PSC_MAX_COUNT = 253
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
INITIAL_VMSA_GPA = 0xFFFFFFFFF000


cdef object _rmp_entry(uint64_t raw):
    return RmpEntry(bool(raw & RMP_ASSIGNED), int(bool(raw & RMP_PAGESIZE)), bool(raw & RMP_IMMUTABLE),
                    bool(raw & RMP_VALIDATED), int((raw & RMP_ASID_MASK) >> RMP_ASID_SHIFT),
                    raw & RMP_GPA_MASK, bool(raw & RMP_VMSA))


cdef class Rmp:
    """The SNP Reverse Map Table of a host (platform "amd")."""
    cdef Host host

    def __cinit__(self, Host host not None):
        self.host = host

    cdef uint64_t _pfn(self, pfn) except? 0:
        cdef uint64_t p = _u64(pfn, "pfn")
        if p >= self.host.h.pm.end_pfn:
            raise ValueError(f"pfn {pfn:#x} is beyond host memory (the RMP covers all of it)")
        return p

    def lookup(self, pfn):
        """The entry for pfn; its pagesize is 1 only at the head of a 2M entry."""
        held = _host_enter(self.host)
        return _rmp_entry(rmp_raw(&self.host.h, self._pfn(pfn)))

    def level(self, pfn):
        """snp_lookup_rmpentry's level: PG_LEVEL_2M inside a 2M entry, else PG_LEVEL_4K."""
        held = _host_enter(self.host)
        cdef int assigned, level
        snp_lookup_rmpentry(&self.host.h, self._pfn(pfn), &assigned, &level)
        return level

    def rmpupdate(self, pfn, *, assigned, pagesize=0, immutable=False, gpa=0, asid=0):
        """The RMPUPDATE instruction: its architectural return code."""
        held = _host_enter(self.host)
        cdef uint64_t p = self._pfn(pfn)
        return rmpupdate_insn(&self.host.h, p, rmp_state(bool(assigned), PG_LEVEL_2M if pagesize else PG_LEVEL_4K,
                                                        bool(immutable), _u64(gpa, "gpa"), _u32_wrap(asid, "asid")))

    def psmash(self, pfn):
        """The PSMASH instruction: its architectural return code."""
        held = _host_enter(self.host)
        return psmash_insn(&self.host.h, self._pfn(pfn))

    def make_private(self, pfn, gpa, level, asid, immutable=False):
        """rmp_make_private: 0 or -errno (rmpupdate loops on FAIL_OVERLAP, else -EFAULT)."""
        held = _host_enter(self.host)
        return rmp_make_private(&self.host.h, self._pfn(pfn), _u64(gpa, "gpa"), _c_int_arg(level, "level"),
                                _u32_wrap(asid, "asid"), bool(immutable))

    def make_shared(self, pfn, level):
        """rmp_make_shared: 0 or -errno."""
        held = _host_enter(self.host)
        return rmp_make_shared(&self.host.h, self._pfn(pfn), _c_int_arg(level, "level"))

    def view(self, start, stop):
        """Entries for pfns [start, stop) as an RMP_DTYPE array."""
        held = _host_enter(self.host)
        cdef uint64_t a = self._pfn(start), b = _u64(stop, "stop"), i, raw
        if b < a or b - a > (1 << 24):
            raise ValueError("need start <= stop and at most 2**24 pfns")
        out = np.zeros(b - a, dtype=RMP_DTYPE)
        for i in range(a, b):
            raw = rmp_raw(&self.host.h, i)
            e = _rmp_entry(raw)
            out[i - a] = (i, e.assigned, int(bool(raw & RMP_PAGESIZE)), e.immutable, e.validated,
                          e.vmsa, e.asid, e.gpa)
        return out

    def assigned(self):
        """Every assigned pfn, ascending (2M entries expanded)."""
        held = _host_enter(self.host)
        out = []
        for first, order, v in _xa_entries(&self.host.h.rmp.entries):
            if v & RMP_ASSIGNED:
                out.extend(range(first, first + (PTRS_PER_PMD if v & RMP_PAGESIZE else 1)))
        return out

    @property
    def leaked(self):
        held = _host_enter(self.host)
        return [first for first, order, v in _xa_entries(&self.host.h.rmp.leaked)]

    @property
    def stats(self):
        held = _host_enter(self.host)
        return {name: self.host.h.rmp.stats[i] for i, name in enumerate(SNP_STATS)}

    def inject_rmpupdate_failures(self, n, code=RMPUPDATE_FAIL_INUSE):
        """Fault injection: the next n RMPUPDATEs return code (FAIL_OVERLAP is retried, as rmpupdate() does)."""
        held = _host_enter(self.host)
        if code not in (RMPUPDATE_FAIL_INPUT, RMPUPDATE_FAIL_PERMISSION, RMPUPDATE_FAIL_INUSE,
                        RMPUPDATE_FAIL_OVERLAP):
            raise ValueError(f"not an RMPUPDATE failure code: {code}")
        self.host.h.rmp.fail_rmpupdate = _u64(n, "n")
        self.host.h.rmp.fail_rmpupdate_code = code


class GuestFault(Exception):
    """An exception the guest itself takes (e.g. #VC 0x404 PAGE_NOT_VALIDATED); KVM never sees it."""

    def __init__(self, vector, code, message):
        super().__init__(message)
        self.vector, self.code = vector, code


class HypercallExit:
    """KVM_EXIT_HYPERCALL: nr, args (gpa, npages, attrs), flags. Answer with vcpu.complete_hypercall(ret)."""
    __slots__ = ("nr", "args", "flags")
    exit_reason = 3

    def __init__(self, nr, args, flags=0):
        self.nr, self.args, self.flags = nr, tuple(args), flags

    def __repr__(self):
        return f"HypercallExit(nr={self.nr}, args=({', '.join(hex(a) for a in self.args)}), flags={self.flags})"

    def __eq__(self, other):
        return isinstance(other, HypercallExit) and (self.nr, self.args, self.flags) == (other.nr, other.args, other.flags)


# ------------------------------------------------------------ guest side

cdef int _snp_translate(Vcpu vcpu, uint64_t gpa, uint64_t *pfn, int *spte_level) except -1:
    """The guest's C=1 access to gpa through the NPT: fault it in (ENC) if unmapped."""
    cdef kvm *k = &vcpu.vm.k
    cdef uint64_t gfn = gpa >> 12, first, v
    cdef int order
    cdef kvm_fault_out out
    if not xa_lookup(&k.sptes, gfn, &v, &first, &order) or not (v & SPTE_PRIVATE):
        for _ in range(16):
            kvm_mmu_page_fault(&vcpu.v, gpa & ~(<uint64_t>4095), PFERR_GUEST_ENC_MASK | PFERR_GUEST_FINAL_MASK, &out)
            vcpu.vm.host._raise_hook_exc()
            if out.ret != RET_PF_RETRY:
                break
        if out.ret != RET_PF_FIXED and out.ret != RET_PF_SPURIOUS:
            raise GuestExit(_fault_result(&out))
        xa_lookup(&k.sptes, gfn, &v, &first, &order)
    pfn[0] = (v >> SPTE_PFN_SHIFT) + (gfn - first)
    spte_level[0] = v & SPTE_LEVEL_MASK
    return 0


cdef int _snp_rmp_npf(Vcpu vcpu, uint64_t gpa, uint64_t extra) except -1:
    """An #NPF with the RMP bit: through kvm_mmu_page_fault, then sev_handle_rmp_fault."""
    cdef kvm_fault_out out
    kvm_mmu_page_fault(&vcpu.v, gpa & ~(<uint64_t>4095), PFERR_GUEST_RMP_MASK | PFERR_GUEST_ENC_MASK |
                       PFERR_GUEST_FINAL_MASK | PFERR_PRESENT_MASK | extra, &out)
    vcpu.vm.host._raise_hook_exc()
    if out.ret < 0:
        raise GuestExit(_fault_result(&out))
    return 0


cdef tuple _snp_rmp_target(Vcpu vcpu, uint64_t gpa, int pagesize, str insn):
    """PVALIDATE/RMPADJUST's walk: (0, pfn of the entry to change) or (result code, 0).
    A 4K request on a 2M entry takes an RMP|SIZEM #NPF (KVM PSMASHes) and is retried."""
    cdef gmem_host *h = vcpu.v.kvm.host
    cdef uint64_t pfn, raw
    cdef int spte_level, assigned, level
    vcpu.vm._check_open(insn)
    if vcpu.v.kvm.vm_type != KVM_X86_SNP_VM:
        raise _err(_errno_mod.EINVAL, f"{insn}: only an SEV-SNP guest has it (#UD)")
    if pagesize not in (0, 1) or (pagesize and gpa & ((PTRS_PER_PMD << 12) - 1)):
        return (PVALIDATE_FAIL_INPUT, 0)
    for _ in range(4):
        _snp_translate(vcpu, gpa, &pfn, &spte_level)
        raw = rmp_raw(h, pfn)
        if (not (raw & RMP_ASSIGNED) or ((raw & RMP_ASID_MASK) >> RMP_ASID_SHIFT) != vcpu.v.kvm.asid
                or (raw & RMP_GPA_MASK) != (gpa & ~(<uint64_t>4095)) or raw & RMP_IMMUTABLE):
            _snp_rmp_npf(vcpu, gpa, 0)
            raise GuestFault(14, 0, f"{insn} at gpa {gpa:#x}: the RMP entry of pfn {pfn:#x} is not this "
                             "guest's (the #NPF repeats forever on hardware)")
        snp_lookup_rmpentry(h, pfn, &assigned, &level)
        if pagesize == 1 and level == PG_LEVEL_4K:
            return (PVALIDATE_FAIL_SIZEMISMATCH, 0)
        if pagesize == 0 and level == PG_LEVEL_2M:
            _snp_rmp_npf(vcpu, gpa, PFERR_GUEST_SIZEM_MASK)
            continue
        return (0, (pfn & ~(<uint64_t>PTRS_PER_PMD - 1)) if pagesize else pfn)
    raise GuestFault(14, 0, f"{insn} at gpa {gpa:#x}: RMP size mismatch persists")


cdef object _snp_pvalidate(Vcpu vcpu, uint64_t gpa, int pagesize, bint validate):
    cdef gmem_host *h = vcpu.v.kvm.host
    cdef uint64_t pfn, raw = 0, old
    code, pfn = _snp_rmp_target(vcpu, gpa, pagesize, "PVALIDATE")
    if code:
        return code
    xa_load(&h.rmp.entries, pfn, &raw)
    h.rmp.stats[SNP_STAT_PVALIDATE] += 1
    if bool(raw & RMP_VALIDATED) == validate:
        return PVALIDATE_FAIL_NOUPDATE
    raw = (raw | RMP_VALIDATED) if validate else (raw & ~RMP_VALIDATED)
    xa_store_order(&h.rmp.entries, pfn, 0, raw, &old)
    return 0


cdef object _snp_rmpadjust(Vcpu vcpu, uint64_t gpa, int pagesize, uint64_t attrs):
    cdef gmem_host *h = vcpu.v.kvm.host
    cdef uint64_t pfn, raw = 0, old, perms = 0
    cdef int vmpl = attrs & 0xFF, perm = (attrs >> 8) & 0xFF
    if vmpl == 0:
        return 2                                 # FAIL_PERMISSION: only higher VMPLs can be changed
    if vmpl > 3 or (perm & 0x2 and not perm & 0x1):
        return 1                                 # FAIL_INPUT: no such VMPL, or write without read
    code, pfn = _snp_rmp_target(vcpu, gpa, pagesize, "RMPADJUST")
    if code:
        return code
    xa_load(&h.rmp.perms, pfn, &perms)
    perms = (perms & ~((<uint64_t>0xFF) << ((vmpl - 1) * 8))) | (<uint64_t>perm << ((vmpl - 1) * 8))
    xa_store_order(&h.rmp.perms, pfn, 0, perms, &old)
    xa_load(&h.rmp.entries, pfn, &raw)
    raw = (raw | RMP_VMSA) if attrs & (1 << 16) else (raw & ~RMP_VMSA)
    xa_store_order(&h.rmp.entries, pfn, 0, raw, &old)
    return 0


cdef int _snp_private_access_check(Vcpu vcpu, uint64_t gpa, int spte_level, uint64_t pfn) except -1:
    """The RMP checks of an SNP guest's C=1 data access (APM §15.36.10), after the NPT walk:
    returns 1 to retry after an #NPF, 0 when the access proceeds."""
    cdef gmem_host *h = vcpu.v.kvm.host
    cdef uint64_t raw = rmp_raw(h, pfn)
    cdef int assigned, level
    if (not (raw & RMP_ASSIGNED) or ((raw & RMP_ASID_MASK) >> RMP_ASID_SHIFT) != vcpu.v.kvm.asid
            or (raw & RMP_GPA_MASK) != (gpa & ~(<uint64_t>4095)) or raw & RMP_IMMUTABLE):
        _snp_rmp_npf(vcpu, gpa, 0)
        raise GuestFault(14, 0, f"access at gpa {gpa:#x}: pfn {pfn:#x} is not assigned to this guest there")
    snp_lookup_rmpentry(h, pfn, &assigned, &level)
    if spte_level != level:
        _snp_rmp_npf(vcpu, gpa, PFERR_GUEST_SIZEM_MASK)
        return 1
    if not raw & RMP_VALIDATED:
        raise GuestFault(29, 0x404, f"#VC 0x404 (PAGE_NOT_VALIDATED) at gpa {gpa:#x}")
    return 0


# ---------------------------------------------------- page-state changes

cdef object _psc_msr(Vcpu vcpu, uint64_t gpa, int op):
    """GHCB MSR protocol PSC request (snp_begin_psc_msr): a hypercall exit or the GHCB response."""
    if vcpu.v.kvm.vm_type != KVM_X86_SNP_VM:
        raise _err(_errno_mod.EINVAL, "page-state change: only an SEV-SNP guest has it")
    if op not in (1, 2) or not vcpu.v.kvm.hypercall_exit_enabled & (1 << 12):
        return GHCB_MSR_PSC_RESP_ERROR
    vcpu._pending = ("psc_msr",)
    return HypercallExit(12, (gpa & ~0xFFF, 1, KVM_MAP_GPA_RANGE_ENCRYPTED if op == 1 else 0))


cdef object _psc_next(Vcpu vcpu):
    """One step of snp_begin_psc over vcpu._psc (hdr, entries): an exit or the final code."""
    hdr, entries = vcpu._psc
    if hdr["end_entry"] >= VMGEXIT_PSC_MAX_COUNT:
        vcpu._pending = None
        return VMGEXIT_PSC_ERROR_INVALID_HDR
    idx = hdr["cur_entry"]
    while idx <= hdr["end_entry"]:
        e = entries[idx]
        npages = 512 if e["pagesize"] else 1
        if e["cur_page"] > npages or e["gfn"] % npages:
            vcpu._pending = None
            return VMGEXIT_PSC_ERROR_INVALID_ENTRY
        if e["cur_page"] == npages or e["operation"] not in (1, 2):
            e["cur_page"] = npages               # PSMASH/UNSMASH ops: done, no exit
            idx += 1
            hdr["cur_entry"] = idx
            continue
        break
    else:
        vcpu._pending = None
        return 0
    first = entries[idx]
    huge = bool(first["pagesize"]) and first["cur_page"] == 0
    gfn = first["gfn"] + first["cur_page"]
    npages = (512 if first["pagesize"] else 1) - first["cur_page"]
    last = idx
    while last + 1 <= hdr["end_entry"]:
        n = entries[last + 1]
        # snp_begin_psc compares with entry_start.gfn + npages, not gfn + npages: after a
        # partly done 2M entry (gfn advanced by cur_page) the next 4K entry is not merged
        if (n["operation"] != first["operation"] or n["cur_page"] != 0 or bool(n["pagesize"]) != huge
                or n["gfn"] != first["gfn"] + npages):
            break
        npages += 512 if n["pagesize"] else 1
        last += 1
    vcpu._pending = ("psc", idx, last)
    attrs = (KVM_MAP_GPA_RANGE_ENCRYPTED if first["operation"] == 1 else 0) | \
        (KVM_MAP_GPA_RANGE_PAGE_SZ_2M if first["pagesize"] else 0)
    return HypercallExit(12, (gfn << 12, npages, attrs))


cdef object _psc_complete(Vcpu vcpu, ret):
    kind = vcpu._pending[0]
    if kind == "psc_msr":
        vcpu._pending = None
        return GHCB_MSR_PSC_RESP_ERROR if ret else GHCB_MSR_PSC_RESP
    _, idx, last = vcpu._pending
    if ret:
        vcpu._pending = None
        return VMGEXIT_PSC_ERROR_GENERIC
    hdr, entries = vcpu._psc
    for i in range(idx, last + 1):
        entries[i]["cur_page"] = 512 if entries[i]["pagesize"] else 1
    hdr["cur_entry"] = last + 1
    return _psc_next(vcpu)


# ---------------------------------------------------------------- launch

ctypedef struct snp_populate_args:
    int page_type
    uint32_t fw_error


cdef int sev_gmem_post_populate(kvm *kvm, uint64_t gfn, uint64_t pfn, uint64_t src, int order,
                                void *opaque) noexcept nogil:
    cdef gmem_host *h = kvm.host
    cdef snp_populate_args *args = <snp_populate_args *>opaque
    cdef int assigned, level, r
    cdef uint64_t spfn, raw, old
    cdef unsigned char *d
    cdef unsigned char *s
    if snp_lookup_rmpentry(h, pfn, &assigned, &level):
        return -_EINVAL
    if assigned:
        return -_EEXIST
    if src:
        if hva_to_pfn(h, src, &spfn):
            return -_EFAULT
        s = page_data_get(h, spfn, False)
        if s == NULL:
            host_clear_pages(h, pfn, 1)
        else:
            d = page_data_get(h, pfn, True)
            if d == NULL:
                return -_ENOMEM
            memcpy(d, s, 4096)
    else:
        host_clear_pages(h, pfn, 1)
    r = rmp_make_private(h, pfn, gfn << 12, PG_LEVEL_4K, kvm.asid, True)
    if r:
        return r
    # SNP_LAUNCH_UPDATE: firmware measures the page and accepts it into the guest
    # (Validated; no longer Immutable) [firmware ABI]
    xa_load(&h.rmp.entries, pfn, &raw)
    xa_store_order(&h.rmp.entries, pfn, 0, (raw | RMP_VALIDATED) & ~RMP_IMMUTABLE, &old)
    return 0
