# Tracepoints: a bounded ring of fixed-size records (include/trace/events/kvm.h).

cdef enum:
    TRACE_NO_VCPU = 0xFFFFFFFF      # a record no vCPU made (an ioctl, a VM-wide operation)


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


cdef void gmem_trace_copy(const gmem_host *host, uint64_t start, uint64_t n, gmem_trace_rec *out) noexcept nogil:
    """The n records of the ring from slot start on (wrapping), oldest first, into out."""
    cdef uint64_t first = n if start + n <= host.trace_cap else host.trace_cap - start
    memcpy(out, &host.trace_buf[start], first * sizeof(gmem_trace_rec))
    memcpy(&out[first], host.trace_buf, (n - first) * sizeof(gmem_trace_rec))
