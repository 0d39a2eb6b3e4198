"""gmem: a model of KVM guest_memfd and the x86 confidential-VM fault path.

  gmem demo                      an SEV-SNP guest's life, a table and a memory-map picture
  gmem run SCENARIO              a built-in scenario or a TOML file; counters, optional trace
  gmem compare SCENARIO          one scenario under several policy sets, side by side
  gmem replay FILE               a fault stream (.npy or CSV: vcpu, gpa, error_code) through the batch path
  gmem exec -- PROGRAM ARGS      run an unmodified program with the model as its /dev/kvm
  gmem sweep SPEC.toml           a grid of scenarios x options x sizes x seeds on Dask, into Parquet
  gmem report RESULT             an HTML page of a result (run, compare, replay or sweep)

Exit status: 0 done; 1 the model found a violation (host.check(), an RMP violation);
2 bad input (one line on stderr, nothing written); 130 interrupted (the partial result is
still printed). --json prints one result document (gmem/schemas/result-1.schema.json).
"""
import argparse
import json
import os
import sys
import time
from typing import Any, Literal

import numpy as np


class CliError(Exception):
    """A bad input: reported on one line, exit status 2, nothing written."""


EXIT = {"ok": 0, "violation": 1, "error": 1, "interrupted": 130}
CLI_EXTRA_HINT = "pip install 'kvm-gmem[cli]'"

DEFAULT_POLICY_SETS = [
    "prepare=fault,prepared_tracking=gmem",           # Linux 6.12 .. 6.18
    "prepare=alloc,prepared_tracking=arch",           # the RFC (6.11)
    "prepare=fault,prepared_tracking=arch",           # post-6.18: no preparation tracking
]
# --huge-policies: the huge-page designs argued upstream (all proposed, none merged)
HUGE_POLICY_SETS = [
    "gmem_backing=buddy,huge_split=never,huge_merge=never",        # THP-like 2M (huge_folios), no restructuring
    "gmem_backing=hugetlb,huge_split=fresh,huge_merge=eager",      # the HugeTLB WIP tree
    "gmem_backing=hugetlb,huge_split=convert,huge_merge=lazy",
    "gmem_backing=hugetlb,huge_split=convert-2m,huge_merge=eager",  # RFC v2's 1G -> 2M "future optimisation"
    "gmem_backing=hugetlb,huge_split=never,huge_merge=never",      # folio kept whole, the arch tracks 4K state
]


def _parse_policy(text: str) -> dict[str, Any]:
    """key=value,... into Host keywords; unknown keys and values are refused here, before
    anything runs (the values are checked by gmem.Host itself)."""
    import gmem
    from gmem.scenario import POLICY_KEYS
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in POLICY_KEYS:
            raise CliError(f"unknown policy {item!r}: use key=value with keys {', '.join(POLICY_KEYS)}")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    defaults = gmem.Host(memory=2 << 20, platform="none").options
    for key, value in out.items():
        if isinstance(defaults.get(key), bool) and not isinstance(value, bool):
            raise CliError(f"unknown policy {key}={value}: {key} is true or false")
    try:
        gmem.Host(memory=2 << 20, platform="none", **out)
    except (TypeError, ValueError) as e:
        raise CliError(f"unknown policy in {text!r}: {e}") from None
    return out


def _check_writable(path, picture=False):
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CliError(f"cannot write {path}: no directory {d}")
    if picture:
        from gmem import plots
        try:
            plots.require(path)
        except plots.PlotError as e:
            raise CliError(f"{e} (or --no-plot)" if "matplotlib" in str(e) and picture == "demo" else str(e)) from None


def _emit(doc, args):
    """Validate the result document, print it (--json) and/or write it (-o); the exit status."""
    from gmem import results
    results.validate(doc)
    text = json.dumps(doc, indent=1)
    if doc["status"] != "ok":
        worst = next(r for r in doc["runs"] if r["status"] == doc["status"])
        print(f"gmem {args.command}: {_status_line(worst)}", file=sys.stderr)
    if getattr(args, "output", None):
        with open(args.output, "w") as f:
            f.write(text + "\n")
        _note(args, f"wrote the result to {args.output}")
    if args.json:
        print(text)
    return EXIT[doc["status"]]


def _note(args, text):
    """A status line: stdout normally, stderr under --json (stdout is the document)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def _status_line(run_rec):
    e = run_rec["error"]
    where = f" at steps[{e['step']}] ({e['op']})" if e and e.get("step") is not None else ""
    return f"{run_rec['status']}{where}: {e['type']}: {e['message']}" if e else run_rec["status"]


def _run_progress(bar, spec):
    """A progress callback for scenario.run: the step bar, and the faults of a long step."""
    nsteps = len(spec.get("steps", []))

    def on_step(i, step, run):
        bar.update("steps", i + 1, nsteps, f"step {i + 1}/{nsteps} ({step['op']})")

    def progress(i, op, done, total):
        bar.update("faults", done, total, f"steps[{i}] {op}")
    return on_step, progress


def _scenario_record(name, spec):
    return {"name": name, "description": spec.get("description", ""), "spec": spec}


# ------------------------------------------------------------------ demo

def cmd_demo(args):
    from gmem import _console, _core, plots, scenario
    if not args.no_plot:
        _check_writable(args.out, picture="demo")
    spec = scenario.BUILTIN["snp-life"]
    snap = {}

    def on_step(i, step, run):
        if step["op"] == "check":
            snap["states"] = _core.page_states(run.vms["guest"], 0, 64 << 20)

    run = scenario.run(spec, on_step=on_step, name="snp-life")
    c = results_flat(run)
    print(f"gmem demo: {spec['description']}\n")
    for e in run.events:
        print(f"  - {e}")
    rows = [
        ("private faults fixed / spurious", f"{c['guest.pf_fixed']} / {c['guest.pf_spurious']}"),
        ("SPTEs 4K / 2M", f"{c['guest.pages_4k']} / {c['guest.pages_2m']}"),
        ("gmem prepare calls (RMPUPDATE to private)", c["guest.gmem_prepare"]),
        ("gmem invalidate calls / pages made shared", f"{c['host.gmem_invalidate']} / {c['host.gmem_invalidate_pages']}"),
        ("RMPUPDATE / PSMASH / PVALIDATE", f"{c['rmp.rmpupdate']} / {c['rmp.psmash']} / {c['rmp.pvalidate']}"),
        ("huge folio splits", c["host.folio_splits"]),
        ("host RMP violations", c["rmp.rmp_violations"]),
        ("RMP-assigned pages after shutdown", c["rmp.assigned_pages"]),
    ]
    print()
    _console.print_table([(k, str(v)) for k, v in rows], ("what (counted over the whole run)", "count"))
    st = snap["states"]
    print(f"guest memory before shutdown: {int((st['private'] == 1).sum())} private pages "
          f"({int((st['rmp'] == 2).sum())} validated), {int((st['private'] == 0).sum())} shared; "
          f"ran in {run.seconds:.2f} s; host.check() passed")
    if not args.no_plot:
        plots.memory_map(st, args.out, "SEV-SNP guest memory before shutdown (gmem demo)")
        print(f"wrote {args.out}")
    return 0


def results_flat(run):
    from gmem import results
    return results.flat(run.counters())


# ------------------------------------------------------------------- run

def cmd_run(args):
    from gmem import _console, results, scenario
    spec = scenario.get(args.scenario)
    options = _parse_policy(",".join(args.set or []))
    trace_filter = _trace_filter(args)
    if args.trace:
        _check_writable(args.trace)
    if args.timeline:
        _check_writable(args.timeline, picture=True)
    if args.output:
        _check_writable(args.output)
    with _console.Bar(quiet=args.quiet, unit="faults") as bar:
        on_step, progress = _run_progress(bar, spec)
        r = scenario.run(spec, options, on_step=on_step, trace=bool(args.trace or args.timeline), name=args.scenario,
                         progress=progress, keep_partial=True)
    extra = {}
    if args.trace:
        extra["trace"] = _write_trace(args, r.host.trace, trace_filter)
    if args.timeline:
        from gmem import plots, tracing
        recs = r.host.trace.to_numpy()
        plots.trace_timeline(recs[tracing.where(recs, **trace_filter)] if args.trace_gpa or args.trace_event
                             else recs, args.timeline, f"{args.scenario}: trace timeline")
        _note(args, f"wrote {args.timeline}")
    rec = r.result(**extra)
    doc = results.document("run", [rec], scenario=_scenario_record(args.scenario, spec))
    if not args.json:
        print(f"scenario {args.scenario}: {len(spec.get('steps', []))} steps in {r.seconds:.3f} s")
        for e in r.events:
            print(f"  - {e}")
        flat = results.flat(rec["counters"], vcpus=args.all)
        _console.print_table([(k, str(v)) for k, v in flat.items() if v or args.all], ("counter", "value"),
                             title=f"counters {rec['counters']['moment']['label']}" + _closed_note(rec))
    return _emit(doc, args)


def _closed_note(rec):
    closed = rec["counters"]["closed_vms"]
    return "".join(f"; {n}'s just before its close (step {s})" for n, s in closed.items())


def _trace_filter(args):
    from gmem import tracing
    from gmem._core import TRACE_EVENTS
    for e in args.trace_event or []:
        if e not in TRACE_EVENTS:
            raise CliError(f"unknown trace event {e!r} (one of {', '.join(TRACE_EVENTS)})")
    gpa = None
    if args.trace_gpa:
        try:
            gpa = tracing.parse_gpa_range(args.trace_gpa)
        except ValueError as e:
            raise CliError(str(e)) from None
    return {"events": args.trace_event or None, "gpa": gpa}


def _write_trace(args, trace, flt):
    """The trace into args.trace: .npy (TRACE_DTYPE records), .json (Chrome trace format, for
    Perfetto), else text in the style of trace-cmd report."""
    from gmem import tracing
    recs = trace.to_numpy()
    keep = tracing.where(recs, **flt)
    if args.trace.endswith(".npy"):
        np.save(args.trace, recs[keep])
    elif args.trace.endswith(".json"):
        with open(args.trace, "w") as f:
            json.dump(tracing.chrome_trace(recs, where=keep), f)
    else:
        with open(args.trace, "w") as f:
            f.write(tracing.report(recs, where=keep) + "\n")
    n = int(keep.sum())
    lost = f" ({trace.lost} lost)" if trace.lost else ""
    print(f"wrote {n} trace records to {args.trace}{lost}", file=sys.stderr)
    return {"records": n, "lost": int(trace.lost), "path": args.trace}


# --------------------------------------------------------------- compare

COMMON_KEYS = ("vm.pf_fixed", "vm.pf_spurious", "vm.memory_fault_exits", "vm.pages_4k", "vm.pages_2m",
               "vm.zapped_sptes", "vm.gmem_prepare", "host.folio_splits", "host.gmem_invalidate")
SNP_KEYS = ("rmp.rmpupdate", "rmp.psmash", "rmp.pvalidate", "rmp.leaked_pages")
TDX_KEYS = ("tdx.aug", "tdx.page_add", "tdx.block", "tdx.remove", "tdx.accept")


HUGE_KEYS = ("huge.folio_splits", "huge.folio_merges", "huge.huge_eagain", "huge.remote_tlb_flush",
             "huge.stranded_bytes", "huge.pages_4k", "huge.pages_2m", "huge.pages_1g", "huge.share_4k",
             "huge.share_2m", "huge.share_1g", "huge.mean_share_2m", "huge.mean_share_1g")
HUGE_SNP_KEYS = ("huge.rmpupdate", "huge.psmash", "huge.rmp_flush_equivalent")
HUGE_TDX_KEYS = ("huge.tdx_block", "huge.tdx_track", "huge.tdx_demote", "huge.tdx_kick")


def _huge(run_rec):
    """A run with huge pages in play: a hugetlb backing, 2M buddy folios or TDX huge leaves."""
    o = run_rec["host"]["options"]
    return bool(run_rec.get("huge")) and (o.get("gmem_backing") == "hugetlb" or bool(o.get("huge_folios"))
                                          or bool(o.get("tdx_huge_page")))


def compare_keys(runs):
    """The counters worth comparing for the VM types in these runs: SNP's RMP counters when a
    run has an RMP in use, TDX's S-EPT operations when one has a TD; the huge-page measures
    (gmem.results.HUGE_MEASURES) when a run has huge pages in play."""
    keys = list(COMMON_KEYS)
    snp = any(r["counters"]["rmp"] and r["counters"]["rmp"].get("rmpupdate") for r in runs)
    tdx = any(r["counters"]["tdx"] for r in runs)
    keys += SNP_KEYS if snp else ()
    keys += TDX_KEYS if tdx else ()
    if any(_huge(r) for r in runs):
        keys += HUGE_KEYS + (HUGE_SNP_KEYS if snp else ()) + (HUGE_TDX_KEYS if tdx else ())
    return keys


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def cmd_compare(args: argparse.Namespace) -> int:
    from gmem import _console, plots, results, scenario
    spec = scenario.get(args.scenario)
    sets = (args.policy or []) + (HUGE_POLICY_SETS if args.huge_policies else [])
    sets = sets or ([""] if args.kernel else DEFAULT_POLICY_SETS)
    if args.kernel:             # each policy set under each kernel version
        sets = [",".join(filter(None, (f"kernel={k.strip()}", p))) for k in args.kernel.split(",") for p in sets]
    parsed = [_parse_policy(p) for p in sets]
    for picture in (args.chart, args.levels):
        if picture:
            _check_writable(picture, picture=True)
    if args.output:
        _check_writable(args.output)
    names = [",".join(f"{k}={v}" for k, v in p.items()) or "defaults" for p in parsed]
    runs = []
    with _console.Bar(quiet=args.quiet, unit="faults") as bar:
        for n, p in zip(names, parsed):
            bar.update("sets", len(runs), len(parsed), f"policy set {len(runs) + 1}/{len(parsed)}")
            try:
                r = scenario.run(spec, p, name=args.scenario, keep_partial=True,
                                 progress=lambda i, op, d, t: bar.update("faults", d, t, f"steps[{i}] {op}"))
                runs.append(r.result(label=n))
            except (scenario.ScenarioError, OSError) as e:   # refused under this policy: a finding
                runs.append(_failed_run(n, p, e))
            if runs[-1]["status"] == "interrupted":
                break
    if all(r["status"] == "error" for r in runs):
        # nothing to compare: the scenario cannot run under any policy set (bad input, most likely)
        e = runs[0]["error"]
        raise CliError(f"{args.scenario} fails under every policy set: {e['type']}: {e['message']}")
    doc = results.document("compare", runs, scenario=_scenario_record(args.scenario, spec))
    keys = compare_keys([r for r in runs if r["status"] != "error"])
    tot = [results.row(r) for r in runs]
    if not args.json:
        print(f"scenario {args.scenario} under {len(runs)} policy sets "
              f"(counters after the last step; VMs closed earlier: just before their close):")
        for i, r in enumerate(runs):
            print(f"  {i + 1}: {r['label']}  [{r['status']}]" + (f"  {_status_line(r)}" if r["error"] else ""))
        rows = [(k, *[_fmt(t.get(k, 0)) if r["status"] != "error" else "-" for t, r in zip(tot, runs)]) for k in keys]
        _console.print_table(rows, ("counter", *[f"{i + 1}: {r['label']}" for i, r in enumerate(runs)]))
    if args.chart:
        ok = [(r["label"], t) for r, t in zip(runs, tot) if r["status"] != "error"]
        plots.compare_chart([n for n, _ in ok], [t for _, t in ok], keys, args.chart,
                            f"{args.scenario}: policies compared")
        _note(args, f"wrote {args.chart}")
    if args.levels:
        ran = [r for r in runs if r["status"] != "error"]
        plots.level_share_chart([r["label"] for r in ran], [r.get("huge", {}).get("samples", []) for r in ran],
                                args.levels, f"{args.scenario}: share of mapped bytes per level, after each step")
        _note(args, f"wrote {args.levels}")
    return _emit(doc, args)


def _failed_run(label, options, exc):
    from gmem import results
    host = {"kernel": results.DEFAULT_KERNEL, "platform": "none", "memory": 0, "sw_protected": True,
            "memory_attributes": True, "options": dict(options)}
    empty = {"moment": {"after_step": None, "op": None, "label": "not run"}, "host": {}, "rmp": None, "vm": {},
             "vcpu": {}, "tdx": {}, "closed_vms": {}}
    return results.run_record(label, host, empty, status="error", error=results.error_record(exc))


# ---------------------------------------------------------------- replay

STREAM_FIELDS = ("vcpu", "gpa", "error_code")


def _u64_column(values, path, name):
    """A column of a fault stream as uint64: integers in [0, 2**64) only."""
    a = np.asarray(values)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise CliError(f"{path}: {name} must be a column of integers, not {a.dtype} of shape {a.shape}")
    if a.size and int(a.min()) < 0:
        raise CliError(f"{path}: {name} has values outside [0, 2**64)")
    return a.astype(np.uint64)


def _load_npy(path):
    a = np.load(path, allow_pickle=False)
    if a.ndim != 1 or a.dtype.names is None or not {"gpa", "error_code"} <= set(a.dtype.names):
        raise CliError(f"{path}: need a 1-D structured array with fields vcpu, gpa, error_code "
                       f"(got shape {a.shape}, fields {a.dtype.names})")
    vcpu = a["vcpu"] if "vcpu" in a.dtype.names else np.zeros(len(a), np.uint64)
    return tuple(_u64_column(c, path, n) for c, n in zip((vcpu, a["gpa"], a["error_code"]), STREAM_FIELDS))


def _load_csv(path):
    """A CSV fault stream, read by its header's column names (any order; vcpu optional)."""
    import csv
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if not header:
            raise CliError(f"{path}: empty fault stream")
        unknown = set(header) - set(STREAM_FIELDS)
        if unknown or not {"gpa", "error_code"} <= set(header) or len(set(header)) != len(header):
            raise CliError(f"{path}: the first line must be a header naming the columns gpa, error_code and "
                           f"optionally vcpu (got {','.join(header)!r})")
        cols: dict[str, list[int]] = {h: [] for h in header}
        for lineno, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise CliError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
            for h, v in zip(header, row):
                try:
                    x = int(v.strip(), 0)
                except ValueError:
                    raise CliError(f"{path}:{lineno}: {h}: {v.strip()!r} is not an integer") from None
                if not 0 <= x < 1 << 64:
                    raise CliError(f"{path}:{lineno}: {h}: {x} is outside [0, 2**64)")
                cols[h].append(x)
    n = len(cols["gpa"])
    return tuple(np.array(cols.get(h, [0] * n), dtype=np.uint64) for h in STREAM_FIELDS)


def load_stream(path):
    """(vcpu, gpa, error_code) uint64 arrays from a structured .npy (fields vcpu, gpa,
    error_code) or a CSV whose header names its columns."""
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    try:
        stream = _load_npy(path) if path.endswith(".npy") else _load_csv(path)
    except CliError:
        raise
    except Exception as e:
        raise CliError(f"{path}: cannot read the fault stream: {e}") from None
    if len(stream[1]) == 0:
        raise CliError(f"{path}: empty fault stream")
    if int(stream[0].max()) > 1023:
        raise CliError(f"{path}: vcpu {int(stream[0].max())} is out of range (0..1023)")
    return stream


def cmd_replay(args: argparse.Namespace) -> int:
    import gmem
    from gmem import _console, results, scenario, uapi
    vcpu, gpa, ec = load_stream(args.file)
    if args.plot:
        _check_writable(args.plot, picture=True)
    if args.output:
        _check_writable(args.output)
    vm_type = scenario.VM_TYPES.get(args.vm_type)
    if vm_type is None:
        raise CliError(f"unknown vm type {args.vm_type!r} (one of {', '.join(scenario.VM_TYPES)})")
    if args.chunk <= 0:
        raise CliError("--chunk must be > 0")
    platform: Literal["amd", "intel"] = "intel" if vm_type == uapi.KVM_X86_TDX_VM else "amd"
    try:
        memory = scenario.parse_size(args.memory, "--memory")
        host = gmem.Host(memory=memory, platform=platform, huge_folios=args.huge_folios)
    except ValueError as e:
        raise CliError(f"--memory: {e}") from None
    vm = host.create_vm(vm_type)
    vm.launch()                         # a replay runs the guest: the minimal launch first
    gfn_bits = gpa & ~np.uint64(vm.shared_gpa_bit or 0)
    top = int(gfn_bits.max()) + 4096
    if top > 1 << 52:
        raise CliError(f"{args.file}: gpa {int(gfn_bits.max()):#x} is beyond 2**52 (MAXPHYADDR)")
    size = (top + (2 << 20) - 1) & ~((2 << 20) - 1)
    try:
        f = vm.create_guest_memfd(size)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, scenario.HVA_BASE, f, 0)
    except OSError as e:
        raise CliError(f"{args.file}: guest memory of {size >> 20} MiB does not fit --memory {args.memory}: "
                       f"{e.strerror}") from None
    if args.private and vm.has_private_mem:
        vm.set_memory_attributes(0, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpus = [vm.create_vcpu(int(v)) for v in np.unique(vcpu)]
    n, chunk = len(gpa), args.chunk
    chunks, done, status, error, elapsed = [], 0, "ok", None, 0.0
    exits = 0
    t0 = time.perf_counter()
    try:
        with _console.Bar(quiet=args.quiet, unit="faults") as bar:
            while done < n:
                end = min(n, done + chunk)
                t = time.perf_counter()
                out = vm.page_fault_batch(gpa[done:end], ec[done:end], vcpu_id=vcpu[done:end])
                chunks.append((end - done, time.perf_counter() - t))
                exits += int((out["exit_reason"] == uapi.KVM_EXIT_MEMORY_FAULT).sum())
                done = end
                bar.update("faults", done, n, "replay")
        elapsed = time.perf_counter() - t0          # the faults only, not the check below
        host.check()
    except KeyboardInterrupt:
        status, error = "interrupted", {"type": "KeyboardInterrupt", "message": f"interrupted after {done} faults",
                                        "step": None, "op": None}
    except gmem.InvariantError as e:
        status, error = "violation", results.error_record(e)
    if status == "interrupted":
        elapsed = time.perf_counter() - t0
    hints = _replay_hints(vm, ec[:done], exits, done)
    counters = results.snapshot(host, {"replay": vm}, {"replay": vcpus}, (f"after {done} faults", None, None))
    stream = {"path": args.file, "faults": int(done), "vm_type": args.vm_type,
              "faults_per_second": done / elapsed if elapsed else 0.0,
              "chunks": [[int(a), float(b)] for a, b in chunks], "hints": hints}
    rec = results.run_record(f"replay of {os.path.basename(args.file)}", host, counters, status=status, error=error,
                             seconds=elapsed, stream=stream)
    doc = results.document("replay", [rec])
    if not args.json:
        print(f"replayed {done} faults in {elapsed:.3f} s: {done / max(elapsed, 1e-9) / 1e6:.2f} million faults/s "
              f"({1e9 * elapsed / max(done, 1):.0f} ns/fault)")
        _console.print_table([(k, str(v)) for k, v in vm.stats.items()], ("counter", "value"))
        for h in hints:
            print(f"hint: {h}")
    if args.plot and chunks:
        from gmem import plots
        plots.replay_chart([a for a, _ in chunks], [b for _, b in chunks], args.plot,
                           f"replay of {os.path.basename(args.file)}")
        _note(args, f"wrote {args.plot}")
    return _emit(doc, args)


def _replay_hints(vm, ec, exits, n):
    """What a surprising replay most likely means."""
    from gmem import uapi
    hints = []
    if n and exits == n and vm.vm_type == uapi.KVM_X86_SNP_VM and not (ec & np.uint64(uapi.PFERR_GUEST_ENC_MASK)).any():
        hints.append("every fault exited to userspace and no error code has bit 34 (PFERR_GUEST_ENC_MASK): on an "
                     "SNP VM a fault is private only with that bit, so these shared faults hit private memory "
                     "(--private) or no shared backing; set bit 34 for private accesses")
    elif n and exits == n:
        hints.append("every fault exited to userspace (KVM_EXIT_MEMORY_FAULT): the accesses and the memory "
                     "attributes disagree (try --private, or mark the faults' private bit)")
    return hints


# ----------------------------------------------------------------- sweep

def cmd_sweep(args: argparse.Namespace) -> int:
    from gmem import sweep
    try:
        return sweep.main(args)
    except sweep.SweepError as e:
        raise CliError(str(e)) from None


# ---------------------------------------------------------------- report

def cmd_report(args: argparse.Namespace) -> int:
    from gmem import report
    out = args.out or os.path.splitext(os.path.basename(args.result.rstrip("/")))[0] + ".html"
    _check_writable(out)
    try:
        report.write(args.result, out)
    except report.ReportError as e:
        raise CliError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    """Random operations over SNP, TDX and SW_PROTECTED guests, check() every --check-every."""
    from gmem import soak
    if args.ops < 0 or args.check_every <= 0:
        raise CliError("--ops must be >= 0 and --check-every > 0")

    def progress(done, total, fig):
        if not args.quiet:
            print(f"\r{done:>12,}/{total:,} ops  {fig['ops_per_s']:>9,} ops/s  "
                  f"model {fig['memory_bytes'] / 2**20:7.1f} MiB  RSS {fig['rss_bytes'] / 2**20:7.1f} MiB",
                  end="", file=sys.stderr, flush=True)

    r = soak.run(ops=args.ops, seed=args.seed, check_every=args.check_every, progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(r, indent=2) if args.json else soak.format_result(r))
    return 0


# ------------------------------------------------------------------ main

def _result_options(p, what="the result"):
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document (stdout), nothing else")
    p.add_argument("-o", "--output", metavar="FILE", help=f"also write {what} document to FILE (for gmem report)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser():
    p = argparse.ArgumentParser(prog="gmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the default scenario: an SNP guest's life, a table and a picture")
    d.add_argument("--no-plot", action="store_true", help="do not draw the memory map")
    d.add_argument("--out", default="gmem-demo.png", help="the memory map: .png, .svg or .pdf (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run a built-in scenario or a TOML file and print its counters")
    r.add_argument("scenario", help="a built-in name (snp-life, sw-conversions, tdx-life, huge-bounce-buffers, "
                                    "huge-balloon, huge-boot-accept, huge-tdx-boot) or a .toml file")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="a policy option, e.g. prepare=alloc")
    r.add_argument("--trace", metavar="FILE", help="record the tracepoints: .npy (records), .json (Chrome trace "
                                                    "format: Perfetto) or text (trace-cmd report style)")
    r.add_argument("--trace-event", action="append", metavar="EVENT", help="keep only this event (repeat)")
    r.add_argument("--trace-gpa", metavar="START-END", help="keep only records touching these guest addresses "
                                                            "(START-END or START+SIZE, e.g. 1G+2M)")
    r.add_argument("--timeline", metavar="PNG", help="draw the trace: faults and their outcome, zaps, "
                                                     "preparations, invalidations, memory mapped per level")
    r.add_argument("--all", action="store_true", help="also print counters that are zero, and per vCPU")
    _result_options(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="one scenario under several policy sets, side by side")
    c.add_argument("scenario", nargs="?", default="snp-life")
    c.add_argument("--policy", action="append", metavar="K=V,K=V",
                   help="a policy set (repeat); default: 6.18, the RFC, and post-6.18")
    c.add_argument("--kernel", metavar="K,K", help="kernel versions to compare (rfc-2023,6.18,7.2,next), "
                   "each with the --policy sets (or the version's own defaults)")
    c.add_argument("--huge-policies", action="store_true",
                   help="the huge-page policy sets (gmem_backing, huge_split, huge_merge; proposed upstream), "
                        "after any --policy sets")
    c.add_argument("--chart", metavar="PNG", help="write a chart (.png, .svg or .pdf)")
    c.add_argument("--levels", metavar="PNG", help="write a chart of the share of mapped bytes at 4K, 2M and 1G "
                                                   "after each step, one panel per run")
    _result_options(c)
    c.set_defaults(func=cmd_compare)

    rp = sub.add_parser("replay", help="replay a fault stream through the batch path")
    rp.add_argument("file", help=".npy structured array (vcpu, gpa, error_code) or CSV with a header naming them")
    rp.add_argument("--vm-type", default="sw_protected", help="default, sw_protected, snp or tdx")
    rp.add_argument("--private", action="store_true", help="make all guest memory private first")
    rp.add_argument("--huge-folios", action="store_true", help="2M guest_memfd folios")
    rp.add_argument("--memory", default="16G", help="host memory (default: %(default)s)")
    rp.add_argument("--chunk", type=int, default=1 << 16, help="faults per batch call (default: %(default)s)")
    rp.add_argument("--plot", metavar="PNG", help="write a throughput chart")
    _result_options(rp)
    rp.set_defaults(func=cmd_replay)

    sw = sub.add_parser("sweep", help="a grid of runs on Dask, into one Parquet table and charts")
    sw.add_argument("spec", help="a sweep spec (.toml; gmem/schemas/sweep-1.schema.json)")
    sw.add_argument("--out", metavar="DIR", help="output directory (default: the spec's name next to it); "
                                                 "rerunning into it skips the cells already done")
    sw.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (tcp://host:8786)")
    sw.add_argument("--workers", type=int, help="local workers (default: the number of CPUs)")
    sw.add_argument("--processes", action="store_true", help="local worker processes instead of threads")
    sw.add_argument("--serial", action="store_true", help="no Dask: run the cells one after another here")
    _result_options(sw, "the sweep's")
    sw.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="an HTML page of a result document (run, compare, replay, sweep)")
    rep.add_argument("result", help="a result JSON (gmem run ... -o r.json) or a sweep's output directory")
    rep.add_argument("--out", metavar="HTML", help="where to write it (default: RESULT's name with .html)")
    rep.set_defaults(func=cmd_report)

    sk = sub.add_parser("soak", help="random operations over SNP, TDX and SW_PROTECTED guests, checked")
    sk.add_argument("--ops", type=int, default=10**6, help="operations (default: %(default)s)")
    sk.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sk.add_argument("--check-every", type=int, default=10**4, help="host.check() interval (default: %(default)s)")
    sk.add_argument("--json", action="store_true", help="print the figures as JSON")
    sk.add_argument("--quiet", action="store_true", help="no progress line")
    sk.set_defaults(func=cmd_soak)

    from gmem._exec import add_parsers      # gmem exec, gmem shim-path (gmem/_exec)
    add_parsers(sub)
    return p


def _missing_extra():
    """The name of a command-line dependency that is not installed, or None."""
    import importlib.util
    for mod in ("rich", "jsonschema"):
        if importlib.util.find_spec(mod) is None:
            return mod
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    missing = _missing_extra()
    if missing:
        print(f"gmem {args.command}: error: the command line needs {missing}: {CLI_EXTRA_HINT}", file=sys.stderr)
        return 2
    from gmem import plots, schema
    from gmem.scenario import ScenarioError
    try:
        return args.func(args) or 0
    except (CliError, ScenarioError, schema.SchemaError, plots.PlotError) as e:
        print(f"gmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gmem {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (gmem ... | head): not an error of ours; keep the exit quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"gmem {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
