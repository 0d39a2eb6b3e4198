# Tracepoints: a bounded ring of fixed-size records (include/trace/events/kvm.h).

cdef inline void gmem_trace(gmem_host *host, uint32_t event, uint32_t vcpu, uint64_t a,
                            uint64_t b, uint64_t c, uint64_t d) noexcept nogil:
    cdef gmem_trace_rec *r
    if not (host.trace_mask >> event) & 1:
        return
    r = &host.trace_buf[host.trace_seq % host.trace_cap]
    r.seq = host.trace_seq
    r.event = event
    r.vcpu = vcpu
    r.a = a
    r.b = b
    r.c = c
    r.d = d
    host.trace_seq += 1
