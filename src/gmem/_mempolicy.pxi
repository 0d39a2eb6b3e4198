# mm/mempolicy.c as guest_memfd uses it (6.19+, in 7.2): the policy a VMM sets with mbind() on
# a mapping of the guest_memfd is a shared policy of the inode (kvm_gmem_set_policy), looked up
# when a folio is allocated (kvm_gmem_get_folio), never moving folios that exist. A policy is
# kept as mode << 32 | nodemask (bit n: node n); 0 is MPOL_DEFAULT.

cdef enum:
    # include/uapi/linux/mempolicy.h
    MPOL_DEFAULT = 0
    MPOL_PREFERRED = 1
    MPOL_BIND = 2
    MPOL_INTERLEAVE = 3
    MPOL_LOCAL = 4
    MPOL_PREFERRED_MANY = 5
    MPOL_WEIGHTED_INTERLEAVE = 6
    MPOL_MAX = 7


cdef int mpol_new(gmem_host *h, int mode, uint64_t nodes, uint64_t *pol) noexcept nogil:
    """do_mbind's mpol_new and mpol_set_nodemask: the policy for mode and nodes, or -EINVAL.
    PREFERRED without nodes is LOCAL; DEFAULT and LOCAL take no nodes; the others need some,
    all online."""
    if mode < 0 or mode >= MPOL_MAX:
        return _refuse(h, -EINVAL, "mbind: unknown mode")
    if nodes >> h.pm.nr_nodes:
        return _refuse(h, -EINVAL, "mbind: a node that is not online")
    if mode == MPOL_DEFAULT or mode == MPOL_LOCAL:
        if nodes:
            return _refuse(h, -EINVAL, "mbind: MPOL_DEFAULT and MPOL_LOCAL take no nodes")
        pol[0] = 0 if mode == MPOL_DEFAULT else (<uint64_t>MPOL_LOCAL) << 32
        return 0
    if mode == MPOL_PREFERRED and nodes == 0:
        pol[0] = (<uint64_t>MPOL_LOCAL) << 32
        return 0
    if nodes == 0:
        return _refuse(h, -EINVAL, "mbind: this mode needs nodes")
    if mode == MPOL_PREFERRED:
        nodes &= -nodes                     # first_node()
    pol[0] = (<uint64_t>mode) << 32 | nodes
    return 0


cdef inline int _first_node(uint64_t nodes) noexcept nogil:
    cdef int n = 0
    while not (nodes >> n) & 1:
        n += 1
    return n


cdef int _interleave_nodes(gmem_host *h, uint64_t nodes) noexcept nogil:
    """interleave_nodes: the task's rotor (current->il_prev) moves to the next node of the
    policy (NO_INTERLEAVE_INDEX: filemap_alloc_folio has no index to give)."""
    cdef int n = h.il_prev
    cdef int i
    for i in range(GMEM_MAX_NUMNODES):
        n = (n + 1) % GMEM_MAX_NUMNODES
        if (nodes >> n) & 1:
            break
    h.il_prev = n
    return n


cdef int mpol_folio_alloc(gmem_host *h, uint64_t pol, int order, uint32_t *id) noexcept nogil:
    """folio_alloc_mpol(..., numa_node_id() = 0): the node the policy picks, then (except
    for BIND) any node, lowest first. 0 or -ENOMEM."""
    cdef int mode = <int>(pol >> 32), n
    cdef uint64_t nodes = pol & <uint64_t>0xFFFFFFFF
    if mode == MPOL_BIND or mode == MPOL_PREFERRED_MANY:
        for n in range(h.pm.nr_nodes):      # the zonelist of node 0, inside the mask
            if (nodes >> n) & 1 and folio_alloc_node(&h.pm, order, n, id) == 0:
                return 0
        return -ENOMEM if mode == MPOL_BIND else folio_alloc(&h.pm, order, id)
    if mode == MPOL_INTERLEAVE or mode == MPOL_WEIGHTED_INTERLEAVE:
        n = _interleave_nodes(h, nodes)     # (every weight 1 by default)
    elif mode == MPOL_PREFERRED:
        n = _first_node(nodes)
    else:
        n = 0                               # MPOL_LOCAL, MPOL_DEFAULT: the local node
    if folio_alloc_node(&h.pm, order, n, id) == 0:
        return 0
    return folio_alloc(&h.pm, order, id)
