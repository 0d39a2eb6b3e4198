# gmem.Trace: the tracepoint ring of one host (_trace.pxi), enabled per event, read as numpy.

TRACE_DTYPE = np.dtype({
    "names": ["seq", "event", "vcpu", "a", "b", "c", "d"],
    "formats": ["<u8", "<u4", "<u4", "<u8", "<u8", "<u8", "<u8"],
    "offsets": [0, 8, 12, 16, 24, 32, 40],
    "itemsize": sizeof(gmem_trace_rec),
})
TRACE_EVENTS = ("kvm_page_fault", "spte_install", "spte_zap", "memory_fault_exit",
                "gmem_prepare", "gmem_invalidate", "rmpupdate", "psmash", "pvalidate",
                "kvm_set_memory_attributes", "gmem_fallocate", "folio_split", "memory_failure",
                "tdx_page_aug", "tdx_page_add", "tdx_range_block", "tdx_track", "tdx_page_remove",
                "tdx_accept", "kvm_map_gpa_range", "folio_merge", "tdx_page_demote")
_TRACE_FIELDS = (("gpa", "error_code", None, None), ("gfn", "pfn", "level", "private"),
                 ("gfn", "pfn", "level", None), ("gpa", "flags", "errno", None),
                 ("gfn", "pfn", "order", "errno"), ("start_pfn", "end_pfn", None, None),
                 ("pfn", "gpa", "state", "code"), ("pfn", None, None, "code"),
                 ("gpa", "pfn", "size_validate", "code"), ("gfn", "end_gfn", "attributes", "errno"),
                 ("ino", "offset", "length", "mode_errno"), ("pfn", "old_order", "new_order", None),
                 ("pfn", None, None, "handled"), ("gfn", "pfn", "level", None), ("gfn", "pfn", "level", None),
                 ("gfn", None, "level", None), (None, None, None, None), ("gfn", "pfn", "level", None),
                 ("gpa", "pfn", "level", "status"), ("gpa", "npages", "attributes", "ret"),
                 ("pfn", "new_order", None, None), ("gfn", "pfn", "level", None))


@cython.final
cdef class Trace:
    """Tracepoints of one host: a ring of fixed-size records (see TRACE_EVENTS)."""
    cdef Host host

    def __cinit__(self, Host host not None):
        self.host = host

    def enable(self, *events, capacity=1 << 16):
        """Record these events (all if none are named) in a ring of `capacity` records."""
        held = _host_enter(self.host)
        cdef gmem_host *h = self.host.h
        cdef uint64_t cap = _u64(capacity, "capacity")
        cdef gmem_trace_rec *buf
        if cap == 0 or cap > (1 << 28):
            raise ValueError("capacity must be in [1, 2**28]")
        mask = 0
        for e in (events or TRACE_EVENTS):
            if e not in TRACE_EVENTS:
                raise ValueError(f"unknown trace event {e!r}; events: {', '.join(TRACE_EVENTS)}")
            mask |= 1 << TRACE_EVENTS.index(e)
        if h.trace_buf == NULL or h.trace_cap != cap:
            buf = <gmem_trace_rec *>_calloc(cap, sizeof(gmem_trace_rec))
            if buf == NULL:
                raise MemoryError("trace buffer")
            free(h.trace_buf)
            h.trace_buf = buf
            h.trace_cap = cap
            h.trace_seq = 0
        h.trace_mask |= mask

    def disable(self, *events):
        held = _host_enter(self.host)
        cdef gmem_host *h = self.host.h
        for e in (events or TRACE_EVENTS):
            if e not in TRACE_EVENTS:
                raise ValueError(f"unknown trace event {e!r}")
            h.trace_mask &= ~(1 << TRACE_EVENTS.index(e))

    def clear(self):
        held = _host_enter(self.host)
        self.host.h.trace_seq = 0

    @property
    def enabled(self):
        held = _host_enter(self.host)
        return tuple(e for i, e in enumerate(TRACE_EVENTS) if (self.host.h.trace_mask >> i) & 1)

    @property
    def lost(self):
        """Records overwritten because the ring was full."""
        held = _host_enter(self.host)
        cdef gmem_host *h = self.host.h
        return h.trace_seq - h.trace_cap if h.trace_cap and h.trace_seq > h.trace_cap else 0

    def to_numpy(self):
        """The records still in the ring, oldest first, as a TRACE_DTYPE array: one copy (the
        ring is reused as tracing goes on, so a view would change under its reader)."""
        held = _host_enter(self.host)
        cdef gmem_host *h = self.host.h
        cdef uint64_t n, start
        if h.trace_buf == NULL or h.trace_seq == 0:
            return np.zeros(0, dtype=TRACE_DTYPE)
        n = min(h.trace_seq, h.trace_cap)
        out = np.empty(n, dtype=TRACE_DTYPE)
        start = h.trace_seq % h.trace_cap if h.trace_seq > h.trace_cap else 0
        gmem_trace_copy(h, start, n, <gmem_trace_rec *>cnp.PyArray_DATA(out))
        return out

    def report(self, limit=None):
        """Lines in the style of trace-cmd report."""
        lines = []
        recs = self.to_numpy()
        if limit is not None:
            n = _int_arg(limit, "limit", 0, None)
            recs = recs[len(recs) - n:] if n < len(recs) else recs
        for r in recs:
            ev = int(r["event"])
            fields = []
            for name, key in zip(_TRACE_FIELDS[ev], "abcd"):
                if name is None:
                    continue
                v = int(r[key])
                if name in ("errno", "level", "order", "private"):
                    fields.append(f"{name}={v}")
                else:
                    fields.append(f"{name}={v:#x}")
            lines.append(f"{int(r['seq']):>10} vcpu{int(r['vcpu'])}: {TRACE_EVENTS[ev]}: " + " ".join(fields))
        return "\n".join(lines)


