"""gmem exec --report: what the model saw of the program, printed when it exits.

The counters (host, RMP, every VM that lived), host.check()'s verdict on the model's
structures, and the VMM bug classes the model can name from its own state:

* private backing left after a shared transition (cloud-hypervisor #8167): guest_memfd pages
  still allocated for gfns whose attribute is shared, in a VM whose shared memory is not the
  guest_memfd itself (no INIT_SHARED);
* a guest_memfd page written by the host while it is private: an RMP violation on SNP,
  counted by the model (snp rmp_violations).
"""
import numpy as np

from gmem import _core, uapi


def _stats_line(name, stats):
    items = [f"{k}={v}" for k, v in stats.items() if v]
    return f"  {name}: " + (" ".join(items) if items else "(all zero)")


def stale_private_backing(server):
    """(vm id, gfn, pages) runs of gmem pages backing shared gfns of private-memory VMs."""
    out = []
    for vs in server.vms.values():
        vm = vs.vm
        if vm.destroyed or not vm.has_private_mem:
            continue
        for s in vs.real.governed.values():
            if s.gmem is None or s.gmem.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
                continue
            ps = _core.page_states(vm, s.gpa, s.size)
            bad = (ps["private"] == 0) & (ps["backed"] != 0)
            idx = np.flatnonzero(bad)
            if not len(idx):
                continue
            cut = np.flatnonzero(np.diff(idx) != 1) + 1
            for run in np.split(idx, cut):
                out.append((vs.id, int(ps["gfn"][run[0]]), len(run)))
    return out


def report(server):
    host = server.host
    lines = ["gmem exec report", f"  platform={host.platform} options: " +
             " ".join(f"{k}={v}" for k, v in host.options.items() if k != "content_memfd"),
             _stats_line("host", host.stats)]
    if host.rmp is not None:
        lines.append(_stats_line("rmp", host.rmp.stats))
    lines.append(_stats_line("exec", server.counts))
    for vs in server.vms.values():
        state = "destroyed" if vs.vm.destroyed else "open"
        lines.append(_stats_line(f"vm {vs.id} (type {vs.vm.vm_type}, {state})",
                                 {} if vs.vm.destroyed else vs.vm.stats))
    problems = []
    for vm_id, gfn, n in stale_private_backing(server):
        problems.append(f"private backing left after a shared transition: vm {vm_id} gfn {gfn:#x}, "
                        f"{n} page(s) of guest_memfd still allocated while shared (not punched)")
    if host.rmp is not None and host.rmp.stats.get("rmp_violations"):
        problems.append(f"{host.rmp.stats['rmp_violations']} host write(s) to guest-owned pages "
                        "(RMP violations)")
    try:
        host.check()
        lines.append("  check: ok")
    except Exception as e:                  # gmem.InvariantError, named by check()
        problems.append(f"check: {e}")
    lines += [f"  PROBLEM: {p}" for p in problems] or ["  problems: none"]
    return "\n".join(lines)
