# gmem.Rmp: host.rmp, the SNP Reverse Map Table of an "amd" host, read and driven through the
# instructions of _sev.pxi; and the SNP constants the Python API gives back.

from collections import namedtuple as _namedtuple

RmpEntry = _namedtuple("RmpEntry", "assigned pagesize immutable validated asid gpa vmsa",
                       module="gmem._core")
RMP_DTYPE = np.dtype([("pfn", "<u8"), ("assigned", "u1"), ("pagesize", "u1"), ("immutable", "u1"),
                      ("validated", "u1"), ("vmsa", "u1"), ("asid", "<u2"), ("gpa", "<u8")])
SNP_STATS = ("rmpupdate", "rmpupdate_failed", "psmash", "pvalidate", "rmp_faults", "rmp_violations",
             "leaked_pages", "direct_map_splits")
VMGEXIT_PSC_MAX_COUNT = VMGEXIT_PSC_MAX_ENTRY


cdef object _rmp_info(const rmp_entry_info *e):
    return RmpEntry(bool(e.assigned), e.pagesize, bool(e.immutable), bool(e.validated), e.asid,
                    e.gpa, bool(e.vmsa))


cdef object _rmp_entry(gmem_host *h, uint64_t pfn):
    """pfn's RMP entry as a gmem.RmpEntry (as hardware reads it)."""
    cdef rmp_entry_info e = snp_rmpentry_info(h, pfn)
    return _rmp_info(&e)


@cython.final
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
        return _rmp_entry(self.host.h, self._pfn(pfn))

    def level(self, pfn):
        """snp_lookup_rmpentry's level: PG_LEVEL_2M inside a 2M entry, else PG_LEVEL_4K."""
        held = _host_enter(self.host)
        cdef int assigned, level
        snp_lookup_rmpentry(self.host.h, self._pfn(pfn), &assigned, &level)
        return level

    def rmpupdate(self, pfn, *, assigned, pagesize=0, immutable=False, gpa=0, asid=0):
        """The RMPUPDATE instruction: its architectural return code."""
        held = _host_enter(self.host)
        cdef uint64_t p = self._pfn(pfn)
        return rmpupdate_insn(self.host.h, p, rmp_state(bool(assigned), PG_LEVEL_2M if pagesize else PG_LEVEL_4K,
                                                       bool(immutable), _u64(gpa, "gpa"), _u32_wrap(asid, "asid")))

    def psmash(self, pfn):
        """The PSMASH instruction: its architectural return code."""
        held = _host_enter(self.host)
        return psmash_insn(self.host.h, self._pfn(pfn))

    def make_private(self, pfn, gpa, level, asid, immutable=False):
        """rmp_make_private: 0 or -errno (rmpupdate loops on FAIL_OVERLAP, else -EFAULT)."""
        held = _host_enter(self.host)
        return rmp_make_private(self.host.h, self._pfn(pfn), _u64(gpa, "gpa"), _c_int_arg(level, "level"),
                                _u32_wrap(asid, "asid"), bool(immutable))

    def make_shared(self, pfn, level):
        """rmp_make_shared: 0 or -errno."""
        held = _host_enter(self.host)
        return rmp_make_shared(self.host.h, self._pfn(pfn), _c_int_arg(level, "level"))

    def view(self, start, stop):
        """Entries for pfns [start, stop) as an RMP_DTYPE array."""
        held = _host_enter(self.host)
        cdef uint64_t a = self._pfn(start), b = _u64(stop, "stop")
        if b < a or b - a > (1 << 24):
            raise ValueError("need start <= stop and at most 2**24 pfns")
        out = np.empty(b - a, dtype=RMP_DTYPE)
        if b > a:
            snp_rmp_view(self.host.h, a, b, <rmp_view_rec *>cnp.PyArray_DATA(out))
        return out

    def assigned(self):
        """Every assigned pfn, ascending (2M entries expanded)."""
        held = _host_enter(self.host)
        cdef uint64_t start = 0, pfn, n
        out = []
        while snp_next_assigned(self.host.h, &start, &pfn, &n):
            out.extend(range(pfn, pfn + n))
        return out

    @property
    def leaked(self):
        held = _host_enter(self.host)
        cdef uint64_t start = 0, pfn
        out = []
        while snp_next_leaked(self.host.h, &start, &pfn):
            out.append(pfn)
        return out

    @property
    def stats(self):
        held = _host_enter(self.host)
        return {name: snp_stat(self.host.h, i) for i, name in enumerate(SNP_STATS)}

    def inject_rmpupdate_failures(self, n, code=RMPUPDATE_FAIL_INUSE):
        """Fault injection: the next n RMPUPDATEs return code (FAIL_OVERLAP is retried, as rmpupdate() does)."""
        held = _host_enter(self.host)
        cdef uint64_t count = _u64(n, "n")
        if isinstance(code, bool) or not isinstance(code, (int, np.integer)) or \
                not snp_rmpupdate_failure_code(code if 0 <= code < 256 else 0):
            raise ValueError(f"not an RMPUPDATE failure code: {code}")
        snp_inject_rmpupdate_failures(self.host.h, count, code)
