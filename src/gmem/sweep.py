"""`gmem sweep SPEC.toml`: a grid of independent, deterministic runs on Dask.

A spec (gmem/schemas/sweep-1.schema.json) names scenarios, host options (every combination of
the values listed), kernel versions, guest sizes and seeds; each point of the grid is one
*cell*: one scenario run on a fresh Host. Cells share nothing, so they run anywhere: on Dask
threads in this process (the default: a batch of faults releases the GIL), on local worker
processes (--processes), or on an existing cluster (--scheduler ADDRESS; its workers need
this gmem installed).

Output directory::

    cells/KEY.json     one result record per finished cell (resuming skips these)
    sweep.parquet      one row per cell: its coordinates, status, seconds and the counters
                       (gmem.results.totals: VM counters summed over the VMs)
    sweep.json         the result document (kind "sweep") with every cell's run
    charts/METRIC.png  per metric: the median over seeds against the size, per policy set

From Python::

    from gmem import sweep
    doc = sweep.run(sweep.load("spec.toml"), "out/", scheduler="serial")
"""
import copy
import hashlib
import itertools
import json
import os
import time

from gmem import results, scenario, schema

DEFAULT_METRICS = ("vm.pf_fixed", "vm.pf_spurious", "vm.gmem_prepare", "vm.zapped_sptes", "vm.pages_2m",
                   "rmp.rmpupdate", "rmp.psmash", "tdx.aug", "host.folio_splits", "host.gmem_invalidate_pages",
                   "seconds")       # any column of sweep.parquet, e.g. "huge.mean_share_1g"
OPTION_KEYS = ("prepare", "prepared_tracking", "invalidate", "huge_folios", "reattach_private",
               "scramble_on_conversion", "gmem_backing", "huge_split", "huge_merge", "tdx_huge_page")


class SweepError(ValueError):
    """A sweep spec that cannot be run (schema, unknown scenario, missing Dask)."""


# ------------------------------------------------------------------ spec

def load(path):
    """A sweep spec from a TOML file, validated; scenario files resolve next to it."""
    try:
        spec = scenario.load_toml(path)
    except FileNotFoundError:
        raise SweepError(f"no such file: {path}") from None
    except scenario.ScenarioError as e:
        raise SweepError(str(e)) from None
    except Exception as e:
        raise SweepError(f"{path}: malformed TOML: {e}") from None
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return validate(spec, os.path.dirname(os.path.abspath(path)))


def validate(spec, base_dir="."):
    """The spec with its scenarios loaded (spec["_scenarios"]: name -> scenario dict);
    SweepError naming the path of the first problem."""
    try:
        schema.validate({k: v for k, v in spec.items() if k != "_scenarios"}, "sweep")
    except schema.SchemaError as e:
        raise SweepError(str(e)) from None
    loaded = {}
    for i, name in enumerate(spec["scenarios"]):
        path = name if name in scenario.BUILTIN or os.path.isabs(name) else os.path.join(base_dir, name)
        try:
            loaded[name] = scenario.get(name if name in scenario.BUILTIN else path)
        except scenario.ScenarioError as e:
            raise SweepError(f"scenarios[{i}]: {e}") from None
    for i, k in enumerate(spec.get("kernels", [])):
        _kernel_kw(k, f"kernels[{i}]")
    spec = dict(spec, _scenarios=loaded)
    return spec


def _kernel_kw(kernel, where="kernel"):
    """The Host keywords that select `kernel`: {} for the core's only kernel."""
    from gmem import Host
    try:
        Host(memory=2 << 20, platform="none", kernel=kernel)
        return {"kernel": kernel}
    except TypeError:            # a core that models one kernel (no kernel= keyword)
        if kernel == results.DEFAULT_KERNEL:
            return {}
        raise SweepError(f"{where}: {kernel!r}: this gmem core models kernel {results.DEFAULT_KERNEL} only") from None
    except ValueError as e:
        raise SweepError(f"{where}: {e}") from None


def scale(spec, size):
    """The scenario with its first memslot `size` bytes long and every address and size in it
    scaled with it: sizes by size/old, addresses around the base of their memslot (each
    rounded down to 4 KiB, at least 4 KiB for a size). The host grows if it must."""
    spec = copy.deepcopy(spec)
    slots = [m for v in spec.get("vms", []) for m in v.get("memslots", [])]
    if not slots:
        raise SweepError("sizes: the scenario has no memslot to scale")
    old = scenario.parse_size(slots[0]["size"])
    f = size / old
    bases = sorted({scenario.parse_size(m.get("gpa", 0)) for m in slots})

    def sz(v):
        return max(4096, int(scenario.parse_size(v) * f) // 4096 * 4096)

    def addr(v):
        a = scenario.parse_size(v)
        base = max([b for b in bases if b <= a], default=0)
        return base + int((a - base) * f) // 4096 * 4096

    for v in spec.get("vms", []):
        for g in v.get("gmem", []):
            g["size"] = sz(g["size"])
        for m in v.get("memslots", []):
            m["size"] = sz(m["size"])
            if "offset" in m:
                m["offset"] = addr(m["offset"])
    for st in spec.get("steps", []):
        for key in ("gpa", "size"):
            if key in st:
                st[key] = addr(st[key]) if key == "gpa" else sz(st[key])
    host = spec.setdefault("host", {})
    need = 4 * sum(scenario.parse_size(g["size"]) for v in spec.get("vms", []) for g in v.get("gmem", []))
    host["memory"] = max(scenario.parse_size(host.get("memory", 64 << 30)), need)
    return spec


def seeded(spec, seed):
    """The scenario with `seed` added to the seed of every faults step."""
    spec = copy.deepcopy(spec)
    for st in spec.get("steps", []):
        if st.get("op") == "faults":
            st["seed"] = int(st.get("seed", 0)) + seed
    return spec


def cells(spec):
    """Every cell of the grid: {key, scenario, size, seed, kernel, options, label, spec}."""
    opts = spec.get("options", {})
    names = [k for k in OPTION_KEYS if k in opts]
    combos = [dict(zip(names, vals)) for vals in itertools.product(*(opts[k] for k in names))]
    out = []
    for name, kernel, options, size, seed in itertools.product(
            spec["scenarios"], spec.get("kernels", [results.DEFAULT_KERNEL]), combos,
            spec.get("sizes", [None]), spec.get("seeds", [0])):
        base = spec["_scenarios"][name]
        size_b = scenario.parse_size(size) if size is not None else None
        run_spec = seeded(scale(base, size_b) if size_b is not None else base, seed)
        coord = {"scenario": name, "fingerprint": scenario.fingerprint(base), "size": size_b, "seed": seed,
                 "kernel": kernel, "options": options}
        key = hashlib.sha256(json.dumps(coord, sort_keys=True).encode()).hexdigest()[:16]
        label = ",".join([f"{k}={v}" for k, v in options.items()] + ([f"kernel={kernel}"] if "kernels" in spec else []))
        out.append({"key": key, "scenario": name, "size": size_b, "seed": seed, "kernel": kernel,
                    "options": options, "label": label or "defaults", "spec": run_spec})
    return out


# ------------------------------------------------------------------- run

def run_cell(cell):
    """One cell, on a fresh Host: its result record (gmem.results.run_record) with `cell`.
    Deterministic: the same cell gives the same counters anywhere."""
    coords = {k: cell[k] for k in ("key", "scenario", "size", "seed", "kernel", "options")}
    options = dict(cell["options"], **_kernel_kw(cell["kernel"]))
    try:
        r = scenario.run(cell["spec"], options, name=cell["scenario"])
        return r.result(label=cell["label"], cell=coords)
    except (scenario.ScenarioError, OSError) as e:
        empty = {"moment": {"after_step": None, "op": None, "label": "not run"}, "host": {}, "rmp": None,
                 "vm": {}, "vcpu": {}, "tdx": {}, "closed_vms": {}}
        host = {"kernel": cell["kernel"], "platform": "none", "memory": 0, "sw_protected": True,
                "memory_attributes": True, "options": dict(cell["options"])}
        return results.run_record(cell["label"], host, empty, status="error", error=results.error_record(e),
                                  cell=coords)


def run_cells(batch):
    """run_cell for each cell of a batch (one Dask task: a cell takes tens of milliseconds,
    about what a task costs the scheduler, so cells travel in batches)."""
    return [run_cell(c) for c in batch]


def _batches(todo, nworkers):
    """About 8 batches per worker: few enough to amortise a task, enough to balance the load
    and show progress."""
    size = max(1, len(todo) // (8 * max(1, nworkers)))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _client(scheduler, workers, processes, connect_timeout="10s"):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SweepError("gmem sweep needs Dask: pip install 'kvm-gmem[sweep]' (or --serial)") from None
    if scheduler:
        try:
            return Client(scheduler, timeout=connect_timeout)
        except (OSError, TimeoutError) as e:
            raise SweepError(f"--scheduler {scheduler}: cannot connect: {e}") from None
    n = workers or os.cpu_count() or 1
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=None,
                           silence_logs=40)
    return Client(cluster)


def _finished(cells_dir):
    done = {}
    if os.path.isdir(cells_dir):
        for fn in os.listdir(cells_dir):
            if fn.endswith(".json"):
                try:
                    with open(os.path.join(cells_dir, fn)) as f:
                        done[fn[:-5]] = json.load(f)
                except (OSError, ValueError):
                    pass            # a cell cut off mid-write: run it again
    return done


def _save_cell(cells_dir, rec):
    tmp = os.path.join(cells_dir, f".{rec['cell']['key']}.tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, os.path.join(cells_dir, rec["cell"]["key"] + ".json"))


def run(spec, out_dir, *, scheduler=None, workers=None, processes=False, progress=None, connect_timeout="10s"):
    """Run every cell of a validated spec not already in out_dir/cells; write the table, the
    charts and sweep.json; return the result document. scheduler: None (a local Dask cluster
    of `workers` threads, or processes), "serial" (no Dask), or a Dask scheduler address.
    progress(done, total) after each cell. Ctrl-C keeps the cells finished so far (the
    document says "interrupted") and the rerun goes on from there."""
    cells_dir = os.path.join(out_dir, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    grid = cells(spec)
    done = _finished(cells_dir)
    todo = [c for c in grid if c["key"] not in done]
    skipped = len(grid) - len(todo)
    t0 = time.perf_counter()
    interrupted = False
    where = "serial" if scheduler == "serial" else (scheduler or ("local processes" if processes else "local threads"))
    nworkers = 1
    if progress:
        progress(skipped, len(grid))
    try:
        if scheduler == "serial":
            for c in todo:
                rec = run_cell(c)
                _save_cell(cells_dir, rec)
                done[c["key"]] = rec
                if progress:
                    progress(len(done), len(grid))
        elif todo:
            from distributed import as_completed
            client = _client(scheduler, workers, processes, connect_timeout)
            try:
                nworkers = len(client.scheduler_info()["workers"])
                futures = client.map(run_cells, _batches(todo, nworkers), pure=False)
                for fut in as_completed(futures):
                    for rec in fut.result():
                        _save_cell(cells_dir, rec)
                        done[rec["cell"]["key"]] = rec
                    if progress:
                        progress(len(done), len(grid))
            finally:
                cluster = None if scheduler else client.cluster
                client.close()
                if cluster is not None:
                    cluster.close()
    except KeyboardInterrupt:
        interrupted = True
    runs = [done[c["key"]] for c in grid if c["key"] in done]
    doc = _document(spec, out_dir, runs, len(grid), skipped, nworkers, where, time.perf_counter() - t0)
    if interrupted:
        doc["status"] = "interrupted"
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(doc, f)
    return doc


def _document(spec, out_dir, runs, ncells, skipped, nworkers, where, seconds):
    public = {k: v for k, v in spec.items() if k != "_scenarios"}
    charts = write_outputs(spec, out_dir, runs) if runs else []
    return results.document("sweep", runs, seconds=seconds, sweep={
        "spec": public, "cells": ncells, "skipped": skipped, "table": "sweep.parquet",
        "charts": charts, "workers": nworkers, "scheduler": where})


# ---------------------------------------------------------------- output

def rows(runs):
    """One flat row per cell: coordinates, label, status, seconds, counter totals."""
    out = []
    for r in runs:
        c = r["cell"]
        row = {"key": c["key"], "scenario": c["scenario"], "size": c["size"], "seed": c["seed"],
               "kernel": c["kernel"], "label": r["label"], "status": r["status"],
               "error": r["error"]["message"] if r["error"] else None, "seconds": r["seconds"]}
        row.update({f"option.{k}": str(v) for k, v in c["options"].items()})
        row.update(results.row(r))
        out.append(row)
    return out


def table(runs):
    """The cells as a pyarrow Table (missing counters are null)."""
    import pyarrow as pa
    rs = rows(runs)
    cols = list(dict.fromkeys(k for r in rs for k in r))
    return pa.table({k: [r.get(k) for r in rs] for k in cols})


def write_outputs(spec, out_dir, runs):
    """sweep.parquet and charts/METRIC.png; the chart file names (relative to out_dir)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SweepError("gmem sweep writes Parquet through pyarrow: pip install 'kvm-gmem[sweep]'") from None
    from gmem import plots
    t = table(runs)
    pq.write_table(t, os.path.join(out_dir, "sweep.parquet"))
    if not plots.have_matplotlib():
        return []
    os.makedirs(os.path.join(out_dir, "charts"), exist_ok=True)
    cols = t.to_pydict()
    charts = []
    for m in spec.get("metrics", DEFAULT_METRICS):
        if m in cols and any(v for v in cols[m] if v is not None):
            name = os.path.join("charts", m.replace("/", "_") + ".png")
            plots.sweep_chart(cols, m, os.path.join(out_dir, name), f"{spec.get('name', 'sweep')}: {m}")
            charts.append(name)
    return charts


# ------------------------------------------------------------------ CLI

def main(args):
    """gmem sweep (see gmem.__main__): the exit status."""
    from gmem import _console
    spec = load(args.spec)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.spec)), spec["name"])
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise SweepError(f"cannot write {out}: no directory {parent}")
    if args.workers is not None and args.workers <= 0:
        raise SweepError("--workers must be > 0")
    if not args.serial:
        _client_check()
    n = len(cells(spec))
    with _console.Bar(quiet=args.quiet, unit="cells") as bar:
        doc = run(spec, out, scheduler="serial" if args.serial else args.scheduler, workers=args.workers,
                  processes=args.processes, progress=lambda d, t: bar.update("cells", d, t, "sweep"))
    sw = doc["sweep"]
    if not args.json:
        bad = [r for r in doc["runs"] if r["status"] != "ok"]
        print(f"sweep {spec['name']}: {n} cells ({sw['skipped']} already done) on {sw['workers']} worker(s), "
              f"{sw['scheduler']}, in {doc['seconds']:.1f} s; {len(bad)} not ok")
        for r in bad[:10]:
            print(f"  {r['cell']['key']} {r['label']} {r['cell']['scenario']}: {r['status']}: "
                  f"{r['error']['message'] if r['error'] else ''}")
        print(f"wrote {os.path.join(out, 'sweep.parquet')}, {os.path.join(out, 'sweep.json')} and "
              f"{len(sw['charts'])} charts in {os.path.join(out, 'charts')}")
    from gmem.__main__ import _emit
    return _emit(doc, args)


def _client_check():
    try:
        import distributed  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        raise SweepError("gmem sweep needs Dask and pyarrow: pip install 'kvm-gmem[sweep]'") from None
