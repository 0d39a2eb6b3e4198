"""gmem exec --report: what the model saw of the program, printed when it exits.

The counters (host, RMP, every VM that lived), host.check()'s verdict on the model's
structures, and the VMM bug classes the model can name from its own state:

* private backing left after a shared transition (cloud-hypervisor #8167): guest_memfd pages
  still allocated for gfns whose attribute is shared, in a VM whose shared memory is not the
  guest_memfd itself (no INIT_SHARED);
* shared memory still backing private gfns when the VM closes: the VMM did not discard the
  program's shared copy at the private conversion, or wrote to it after the discard through a
  stale pointer (a DMA mapping that outlived the conversion, QEMU 852f0048f3's class); the
  preload library measures it with mincore() before the VM's last fd closes (OP_AUDIT);
* a guest_memfd page written by the host while it is private: an RMP violation on SNP,
  counted by the model (snp rmp_violations).
"""
import struct

import numpy as np

from gmem import _core, uapi


def _stats_line(name, stats):
    items = [f"{k}={v}" for k, v in stats.items() if v]
    return f"  {name}: " + (" ".join(items) if items else "(all zero)")


def stale_private_backing(vs, ranges=None):
    """Problems: runs of guest_memfd pages backing shared gfns of a private-memory VM, in the
    (gpa, size) ranges given (made shared since the last KVM_RUN), or in all its memory."""
    out = []
    vm = vs.vm
    if vm.destroyed or not vm.has_private_mem or ranges == []:
        return out
    for s in vs.real.governed.values():
        if s.gmem is None or s.gmem.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
            continue
        for gpa, size in ranges or [(s.gpa, s.size)]:
            lo, hi = max(gpa, s.gpa), min(gpa + size, s.gpa + s.size)
            if lo >= hi:
                continue
            ps = _core.page_states(vm, lo, hi - lo)
            for run in _runs((ps["private"] == 0) & (ps["backed"] != 0)):
                when = "when the guest resumed" if ranges else "when the VM closed"
                out.append(f"private backing left after a shared transition: vm {vs.id} gfn "
                           f"{int(ps['gfn'][run[0]]):#x}, {len(run)} page(s) of guest_memfd still "
                           f"allocated while shared {when} (not punched)")
    return out


def _runs(mask):
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    return np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)


def audit_ranges(vs):
    """(hva, pages) pairs, packed: the program's shared memory behind the private gfns of vs."""
    out = []
    if vs.vm.destroyed or not vs.vm.has_private_mem:
        return b""
    for s in vs.real.governed.values():
        if not s.uaddr or s.gmem_only:
            continue
        ps = _core.page_states(vs.vm, s.gpa, s.size)
        for run in _runs(ps["private"] != 0):
            out.append(struct.pack("<QQ", s.uaddr + (int(run[0]) << 12), len(run)))
    return b"".join(out[:256])


def audit_findings(vs, payload):
    """The problems in the preload library's answer to audit_ranges."""
    out = []
    for hva, resident in struct.iter_unpack("<QQ", payload):
        if resident:
            out.append(f"shared memory still backs private gfns: vm {vs.id}, {resident} page(s) resident "
                       f"at hva {hva:#x} (not discarded at the private conversion, or written after "
                       "the discard through a stale pointer, e.g. a DMA mapping)")
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
                                 vs.last_stats if vs.vm.destroyed else vs.vm.stats))
    problems = list(server.findings)
    for vs in server.vms.values():          # VMs still open at exit (closed ones were audited)
        if not vs.audited:
            problems += stale_private_backing(vs)
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
