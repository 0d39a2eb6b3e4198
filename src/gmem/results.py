"""Result documents: one versioned schema (gmem/schemas/result-1.schema.json) for every
front end that produces a result: `gmem run`, `compare`, `replay`, `sweep` and `exec --report`.

A document holds one or more runs. A run is one host under one set of options: its effective
host (every option in force, defaults included, and the kernel version), its counters grouped
by owner (host / rmp / vm / vcpu / tdx) with the moment they were taken, its events and its
step timings. A producer builds runs with `run_record()` (counters from `snapshot()`) and
wraps them with `document()`:

    from gmem import results
    counters = results.snapshot(host, {"guest": vm}, {"guest": [vcpu]}, moment=("end", None, None))
    doc = results.document("exec", [results.run_record("program", host, counters)])
    results.validate(doc)                     # SchemaError naming the path of the first problem
"""
import datetime

from gmem import schema, uapi
from gmem._version import __version__

SCHEMA = "kvm-gmem-result"
STATUSES = ("ok", "violation", "interrupted", "error")       # from best to worst
KINDS = ("run", "compare", "replay", "sweep", "exec")
from gmem._core import default_kernel as _default_kernel

DEFAULT_KERNEL = _default_kernel()


def host_record(host):
    """The effective host: platform, memory, kernel build options, kernel version, policies."""
    return {
        "kernel": str(getattr(host, "kernel", DEFAULT_KERNEL)),
        "platform": host.platform,
        "memory": int(host.nr_pages) * 4096,
        "sw_protected": bool(host.sw_protected),
        "memory_attributes": bool(host.memory_attributes),
        "options": dict(host.options),
    }


def snapshot(host, vms, vcpus=None, moment=("end", None, None), closed=None):
    """Counters grouped by owner, taken now.

    vms: {name: Vm} (destroyed VMs are skipped), vcpus: {name: [Vcpu, ...]};
    moment: (label, step index or None, op or None) saying when this is;
    closed: {name: (step, vm stats, [vcpu stats], tdx stats or None)} for VMs that were
    closed earlier, whose counters were taken just before their close.
    """
    label, step, op = moment
    out = {"moment": {"after_step": step, "op": op, "label": label},
           "host": {k: int(v) for k, v in host.stats.items()},
           "rmp": None, "vm": {}, "vcpu": {}, "tdx": {}, "closed_vms": {}}
    if host.rmp is not None:
        out["rmp"] = {k: int(v) for k, v in host.rmp.stats.items()}
        out["rmp"]["assigned_pages"] = len(host.rmp.assigned())
    for name, (at, vm_stats, vcpu_stats, tdx_stats) in (closed or {}).items():
        _put(out, name, vm_stats, vcpu_stats, tdx_stats)
        out["closed_vms"][name] = at
    for name, vm in vms.items():
        if vm.destroyed:
            continue
        vm_stats = dict(vm.stats)
        vcpu_stats = [dict(v.stats) for v in (vcpus or {}).get(name, [])]
        tdx_stats = dict(vm.tdx_stats) if vm.vm_type == uapi.KVM_X86_TDX_VM else None
        _put(out, name, vm_stats, vcpu_stats, tdx_stats)
    return out


def _put(out, name, vm_stats, vcpu_stats, tdx_stats):
    out["vm"][name] = {k: int(v) for k, v in vm_stats.items()}
    out["vcpu"][name] = [{k: int(v) for k, v in s.items()} for s in vcpu_stats]
    if tdx_stats is not None:
        out["tdx"][name] = {k: int(v) for k, v in tdx_stats.items()}


def flat(counters, vcpus=False):
    """{"host.x": n, "rmp.x": n, "VM.x": n, "VM.tdx.x": n[, "VM.vcpuI.x": n]} for tables."""
    out = {f"host.{k}": v for k, v in counters["host"].items()}
    out.update({f"rmp.{k}": v for k, v in (counters["rmp"] or {}).items()})
    for name, stats in counters["vm"].items():
        out.update({f"{name}.{k}": v for k, v in stats.items()})
        out.update({f"{name}.tdx.{k}": v for k, v in counters["tdx"].get(name, {}).items()})
        if vcpus:
            for i, s in enumerate(counters["vcpu"].get(name, [])):
                out.update({f"{name}.vcpu{i}.{k}": v for k, v in s.items()})
    return out


def totals(counters):
    """{"host.x", "rmp.x", "vm.x", "tdx.x"}: VM and TDX counters summed over the VMs, so that
    runs of different scenarios (with different VM names) line up in one table."""
    out = {f"host.{k}": v for k, v in counters["host"].items()}
    out.update({f"rmp.{k}": v for k, v in (counters["rmp"] or {}).items()})
    for group in ("vm", "tdx"):
        for stats in counters[group].values():
            for k, v in stats.items():
                out[f"{group}.{k}"] = out.get(f"{group}.{k}", 0) + v
    return out


# ------------------------------------------------------------- huge pages

LEVELS = (("pages_4k", 12), ("pages_2m", 21), ("pages_1g", 30))       # KVM's stats, log2 of their size
# Huge-page measures of a run, in this order in tables. rmp_flush_equivalent is a
# model parameter, not a measured cost: RMPUPDATE + PSMASH, for the claim that an RMP update
# costs a global TLB flush on Zen, which no source consulted for this model confirms.
HUGE_MEASURES = ("folio_splits", "folio_merges", "huge_eagain", "rmpupdate", "psmash", "rmp_flush_equivalent",
                 "remote_tlb_flush", "zapped_sptes", "tdx_block", "tdx_track", "tdx_demote", "tdx_kick",
                 "stranded_bytes", "pages_4k", "pages_2m", "pages_1g", "share_4k", "share_2m", "share_1g",
                 "mean_share_2m", "mean_share_1g")


def level_sample(step, op, vms):
    """The pages each live VM maps at 4K, 2M and 1G now: {"step", "op", "vm": {name: {pages_4k, ...}}}."""
    return {"step": step, "op": op,
            "vm": {name: {k: int(vm.stats[k]) for k, _ in LEVELS} for name, vm in vms.items() if not vm.destroyed}}


def level_shares(pages):
    """{"share_4k", "share_2m", "share_1g"}: the share of mapped bytes at each level, from
    {"pages_4k": n, ...} (all 0 when nothing is mapped)."""
    size = {k: int(pages.get(k, 0)) << shift for k, shift in LEVELS}
    total = sum(size.values())
    return {"share_" + k[6:]: (size[k] / total if total else 0.0) for k, _ in LEVELS}


def sample_shares(sample):
    """level_shares() of one level_sample(), the VMs' pages summed."""
    return level_shares({k: sum(v[k] for v in sample["vm"].values()) for k, _ in LEVELS})


def huge_measures(counters, samples=(), stranded_bytes=0):
    """The huge-page measures (HUGE_MEASURES) of a run from its counters (snapshot()) and its
    level samples: restructuring, arch operations and TLB flushes summed over the VMs, the
    mapping at the end (VMs closed earlier: at their close), and the 2M/1G share of mapped bytes
    averaged over the samples (each step counts once)."""
    t = totals(counters)

    def g(k):
        return int(t.get(k, 0))
    m = {"folio_splits": g("host.folio_splits"), "folio_merges": g("host.folio_merges"),
         "huge_eagain": g("host.huge_eagain"), "rmpupdate": g("rmp.rmpupdate"), "psmash": g("rmp.psmash"),
         "rmp_flush_equivalent": g("rmp.rmpupdate") + g("rmp.psmash"),
         "remote_tlb_flush": g("vm.remote_tlb_flush"), "zapped_sptes": g("vm.zapped_sptes"),
         "tdx_block": g("tdx.block"), "tdx_track": g("tdx.track"), "tdx_demote": g("tdx.demote"),
         "tdx_kick": g("tdx.kick"), "stranded_bytes": int(stranded_bytes)}
    m.update({k: g(f"vm.{k}") for k, _ in LEVELS})
    m.update(level_shares(m))
    shares = [sample_shares(s) for s in samples]
    for k in ("share_2m", "share_1g"):
        m["mean_" + k] = sum(s[k] for s in shares) / len(shares) if shares else 0.0
    return m


def huge_record(host, counters, samples):
    """A run's "huge" part: the level samples, the measures and the hugetlb pool at the end."""
    pool = host.hugetlb
    return {"samples": list(samples), "measures": huge_measures(counters, samples, pool["stranded_bytes"]),
            "pool": {k: dict(v) for k, v in pool.items() if isinstance(v, dict)}}


def row(run_rec):
    """totals() of a run with its huge-page measures as "huge.x" (the rows of a comparison)."""
    out = totals(run_rec["counters"])
    out.update({f"huge.{k}": v for k, v in (run_rec.get("huge") or {}).get("measures", {}).items()})
    return out


def error_record(exc, step=None, op=None):
    return {"type": type(exc).__name__, "message": str(exc), "step": step, "op": op}


def run_record(label, host, counters, *, status="ok", error=None, events=(), timings=(), seconds=0.0,
               **extra):
    """One run: label, the effective host (a gmem.Host, or a dict from host_record), counters
    from snapshot(), status (one of STATUSES) and error (error_record() or None), events
    (strings), timings ([(step, op, seconds)]), seconds; extra keys: cell, trace, stream, huge
    (huge_record())."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    rec = {
        "label": label,
        "host": host if isinstance(host, dict) else host_record(host),
        "status": status,
        "error": error,
        "counters": counters,
        "events": list(events),
        "timings": [{"step": int(i), "op": op, "seconds": float(s)} for i, op, s in timings],
        "seconds": float(seconds),
    }
    rec.update(extra)
    return rec


def worst(statuses):
    """The worst of the statuses (ok < violation < interrupted < error); ok for none."""
    return max(statuses, key=STATUSES.index, default="ok")


def document(kind, runs, *, scenario=None, seconds=None, **extra):
    """The result document: kind (one of KINDS), runs (run_record()s), scenario
    ({"name", "description", "spec"} or None); extra keys: sweep, command, extra."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    doc = {
        "schema": SCHEMA,
        "schema_version": schema.VERSION,
        "kind": kind,
        "gmem_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": worst(r["status"] for r in runs),
        "scenario": scenario,
        "runs": list(runs),
        "seconds": float(sum(r["seconds"] for r in runs) if seconds is None else seconds),
    }
    doc.update(extra)
    return doc


def validate(doc):
    """doc, or SchemaError naming the path of the first thing that breaks the result schema."""
    return schema.validate(doc, "result")

