"""Reading a trace: filters, a `trace-cmd report` style listing, each fault's outcome, the
SPTEs mapped over time, and export to the Chrome trace format that Perfetto opens.

Everything here works on the TRACE_DTYPE records of `host.trace.to_numpy()` (or a saved
.npy of them): seq, event (an index into TRACE_EVENTS), vcpu and four payload words a..d
whose meaning per event is FIELDS[event].

    recs = host.trace.to_numpy()
    faults = tracing.select(recs, events=["kvm_page_fault"], gpa=(0, 2 << 20))
    print(tracing.report(faults))
    json.dump(tracing.chrome_trace(recs), open("t.json", "w"))   # ui.perfetto.dev, chrome://tracing

The records carry no timestamps: the sequence number orders them and stands in for time
(1 record = 1 µs in the Chrome export). Events the core emits and the fields it should add
are listed in docs/trace-events.md.
"""
import numpy as np

from gmem._core import _TRACE_FIELDS as FIELDS
from gmem._core import TRACE_DTYPE, TRACE_EVENTS

# fields printed in decimal; the others are addresses, frame numbers or bit masks (hex)
DECIMAL = frozenset({"errno", "level", "order", "private"})
# events whose first payload word (a) is a guest address: gpa, or gfn (a page number)
GPA_FIELD = {"kvm_page_fault": "gpa", "memory_fault_exit": "gpa", "spte_install": "gfn", "spte_zap": "gfn",
             "gmem_prepare": "gfn"}
LEVEL_PAGES = {1: 1, 2: 512, 3: 512 * 512}


def _recs(recs):
    recs = np.asarray(recs)
    if recs.dtype != TRACE_DTYPE:
        raise TypeError(f"need TRACE_DTYPE records (host.trace.to_numpy()), not {recs.dtype}")
    return recs


def events(recs):
    """The event name of each record (a numpy array of str)."""
    recs = _recs(recs)
    names = np.array(TRACE_EVENTS + ("unknown",))
    return names[np.minimum(recs["event"], len(TRACE_EVENTS))]


def gpa_span(recs):
    """(first gpa, end gpa) of each record; (0, 0) for records with no guest address
    (gmem_invalidate names host pfns)."""
    recs = _recs(recs)
    ev = events(recs)
    lo = np.zeros(len(recs), np.uint64)
    hi = np.zeros(len(recs), np.uint64)
    for name, field in GPA_FIELD.items():
        m = ev == name
        if field == "gpa":
            lo[m] = recs["a"][m]
            hi[m] = recs["a"][m] + np.uint64(1)
        else:
            pages = np.ones(int(m.sum()), np.uint64)
            if name in ("spte_install", "spte_zap"):    # c = level: one SPTE maps 1, 512 or 512**2 pages
                pages = np.array([LEVEL_PAGES.get(int(x), 1) for x in recs["c"][m]], np.uint64)
            lo[m] = recs["a"][m] << np.uint64(12)
            hi[m] = lo[m] + (pages << np.uint64(12))
    return lo, hi


def select(recs, events=None, gpa=None, vcpu=None):
    """The records of these events (names), touching guest addresses [start, end) (gpa=(start,
    end): records without a guest address are dropped) and of this vCPU."""
    return _recs(recs)[where(recs, events, gpa, vcpu)]


def where(recs, events=None, gpa=None, vcpu=None):
    """The boolean mask of select(): for report(recs, where=...) and chrome_trace(), which
    infer each fault's outcome from all the records and then show only these."""
    recs = _recs(recs)
    keep = np.ones(len(recs), bool)
    if events is not None:
        events = [events] if isinstance(events, str) else list(events)
        for e in events:
            if e not in TRACE_EVENTS:
                raise ValueError(f"unknown trace event {e!r}; events: {', '.join(TRACE_EVENTS)}")
        keep &= np.isin(recs["event"], [TRACE_EVENTS.index(e) for e in events])
    if gpa is not None:
        start, end = (int(x) for x in gpa)
        if not 0 <= start < end <= 1 << 64:
            raise ValueError(f"gpa range [{start:#x}, {end:#x}) is empty or outside [0, 2**64)")
        lo, hi = gpa_span(recs)
        keep &= (hi > lo) & (lo < np.uint64(min(end, (1 << 64) - 1))) & (hi > np.uint64(start))
    if vcpu is not None:
        keep &= recs["vcpu"] == int(vcpu)
    return keep


def fields(rec):
    """{field: value} of one record, the event's own names (FIELDS)."""
    return {name: int(rec[key]) for name, key in zip(FIELDS[int(rec["event"])], "abcd") if name is not None}


def _fmt(name, v):
    return f"{name}={v}" if name in DECIMAL else f"{name}={v:#x}"


def _outcome_per_record(recs):
    """fault_outcomes() spread over the records: the outcome at each fault, None elsewhere."""
    per = np.full(len(recs), None, dtype=object)
    per[recs["event"] == TRACE_EVENTS.index("kvm_page_fault")] = fault_outcomes(recs)
    return per


def report(recs, where=None):
    """The records as `trace-cmd report` prints tracepoints: task, [cpu], time (here the
    sequence number), event, fields; each kvm_page_fault line ends with what followed it
    (fault_outcomes, inferred from all the records; where: a mask of those to print)."""
    recs = _recs(recs)
    out = _outcome_per_record(recs)
    if where is not None:
        recs, out = recs[where], out[where]
    lines = []
    for r, outcome in zip(recs, out):
        ev = int(r["event"])
        name = TRACE_EVENTS[ev] if ev < len(TRACE_EVENTS) else f"event{ev}"
        body = " ".join(_fmt(n, v) for n, v in fields(r).items()) if ev < len(TRACE_EVENTS) else ""
        if outcome is not None:
            body += f" outcome={outcome}"
        vcpu = int(r["vcpu"])
        lines.append(f"{'vcpu-' + str(vcpu):>10} [{vcpu:03d}] {int(r['seq']):>10}: {name + ':':<19} {body}")
    return "\n".join(lines)


def fault_outcomes(recs):
    """For each kvm_page_fault record, in order: "fixed" (an SPTE was installed before the
    vCPU's next fault), "exit" (a memory-fault exit), or "no change" (spurious, fast path,
    retry, or an outcome the trace did not record). Inferred from the records that follow
    each fault on its vCPU, since the current fault record carries no outcome."""
    recs = _recs(recs)
    ev = recs["event"]
    pf = TRACE_EVENTS.index("kvm_page_fault")
    result = np.full(int((ev == pf).sum()), "no change", dtype=object)
    fault_no = np.cumsum(ev == pf) - 1                      # which fault (overall) each record is
    # per vCPU: the last fault seen on that vCPU owns the records that follow it on that vCPU
    last = {}
    owner = np.full(len(recs), -1)
    for i, (e, v) in enumerate(zip(ev.tolist(), recs["vcpu"].tolist())):
        if e == pf:
            last[v] = fault_no[i]
        else:
            owner[i] = last.get(v, -1)
    for name, what in (("spte_install", "fixed"), ("memory_fault_exit", "exit")):
        m = (ev == TRACE_EVENTS.index(name)) & (owner >= 0)
        result[owner[m]] = what
    return result


def mapped_levels(recs):
    """{level: SPTEs mapped at that level after each record} (installs minus zaps, counted
    from the start of the trace)."""
    recs = _recs(recs)
    ev = recs["event"]
    inst, zap = TRACE_EVENTS.index("spte_install"), TRACE_EVENTS.index("spte_zap")
    out = {}
    for lvl in (1, 2, 3):
        delta = ((ev == inst) & (recs["c"] == lvl)).astype(np.int64) - ((ev == zap) & (recs["c"] == lvl))
        out[lvl] = np.cumsum(delta)
    return out


CATEGORY = {"kvm_page_fault": "mmu", "spte_install": "mmu", "spte_zap": "mmu", "memory_fault_exit": "exit",
            "gmem_prepare": "gmem", "gmem_invalidate": "gmem"}


def chrome_trace(recs, name="gmem", where=None):
    """The records in the Chrome trace event format (a dict to json.dump), which Perfetto
    (ui.perfetto.dev) and chrome://tracing open: one track per vCPU, an instant event per
    record at time = sequence number (µs), its fields (and a fault's outcome) as args;
    where: a mask of the records to export."""
    recs = _recs(recs)
    out = _outcome_per_record(recs)
    if where is not None:
        recs, out = recs[where], out[where]
    evs = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": name}}]
    for v in np.unique(recs["vcpu"]).tolist():
        evs.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": v, "args": {"name": f"vcpu {v}"}})
    for r, outcome in zip(recs, out):
        ev = int(r["event"])
        ename = TRACE_EVENTS[ev] if ev < len(TRACE_EVENTS) else f"event{ev}"
        args = {n: (v if n in DECIMAL else f"{v:#x}") for n, v in fields(r).items()} if ev < len(TRACE_EVENTS) else {}
        args["seq"] = int(r["seq"])
        if outcome is not None:
            args["outcome"] = outcome
        evs.append({"name": ename, "cat": CATEGORY.get(ename, "gmem"), "ph": "i", "s": "t", "pid": 1,
                    "tid": int(r["vcpu"]), "ts": int(r["seq"]), "args": args})
    return {"traceEvents": evs, "displayTimeUnit": "ns",
            "otherData": {"producer": "gmem", "clock": "trace sequence numbers (1 record = 1 us)"}}


def parse_gpa_range(text):
    """"START-END" or "START+SIZE" (each an int or a size like 2M) -> (start, end)."""
    from gmem.scenario import parse_size
    for sep in ("-", "+"):
        a, s, b = text.partition(sep)
        if s:
            start = parse_size(a.strip(), "gpa range start")
            end = parse_size(b.strip(), "gpa range end")
            end = start + end if sep == "+" else end
            if end <= start:
                raise ValueError(f"gpa range {text!r} is empty")
            return start, end
    raise ValueError(f"gpa range {text!r}: use START-END or START+SIZE (e.g. 1G+2M)")
