"""gmem: a model of KVM guest_memfd and the x86 confidential-VM fault path.

  gmem demo                      an SEV-SNP guest's life, a table and a memory-map PNG
  gmem run SCENARIO              a built-in scenario or a TOML file; counters, optional trace
  gmem compare SCENARIO          one scenario under several policy sets, side by side
  gmem replay FILE               a fault stream (.npy or CSV: vcpu, gpa, error_code) through the batch path
  gmem exec -- PROGRAM ARGS      run an unmodified program with the model as its /dev/kvm
"""
import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Literal

import numpy as np


class CliError(Exception):
    """A bad input: reported on one line, exit status 2, nothing written."""


DEFAULT_POLICY_SETS = [
    "prepare=fault,prepared_tracking=gmem",           # Linux 6.12 .. 6.18
    "prepare=alloc,prepared_tracking=arch",           # the RFC (6.11)
    "prepare=fault,prepared_tracking=arch",           # post-6.18: no preparation tracking
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


def _table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([line.format(*headers), line.format(*("-" * w for w in widths))] +
                     [line.format(*r) for r in rows])


def _check_writable(path):
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CliError(f"cannot write {path}: no directory {d}")


# ------------------------------------------------------------------ demo

def cmd_demo(args):
    from gmem import _core, plots, scenario
    if not args.no_plot:
        _check_writable(args.out)
    spec = scenario.BUILTIN["snp-life"]
    snap = {}

    def on_step(i, step, run):
        if step["op"] == "check":
            snap["counters"] = run.counters()
            snap["states"] = _core.page_states(run.vms["guest"], 0, 64 << 20)

    t = time.perf_counter()
    run = scenario.run(spec, on_step=on_step)
    elapsed = time.perf_counter() - t
    c = snap["counters"]
    print(f"gmem demo: {spec['description']}\n")
    for e in run.events:
        print(f"  - {e}")
    rows = [
        ("private faults fixed / spurious", f"{c['guest.pf_fixed']} / {c['guest.pf_spurious']}"),
        ("SPTEs 4K / 2M", f"{c['guest.pages_4k']} / {c['guest.pages_2m']}"),
        ("gmem prepare calls (RMPUPDATE to private)", c["guest.gmem_prepare"]),
        ("gmem invalidate calls / pages made shared", f"{c['host.gmem_invalidate']} / {c['host.gmem_invalidate_pages']}"),
        ("RMPUPDATE / PSMASH / PVALIDATE", f"{c['rmp.rmpupdate']} / {c['rmp.psmash']} / {c['rmp.pvalidate']}"),
        ("RMP-assigned pages (before shutdown)", c["rmp.assigned_pages"]),
        ("SPTEs zapped / TLB flushes", f"{c['guest.zapped_sptes']} / {c['guest.remote_tlb_flush']}"),
        ("huge folio splits", c["host.folio_splits"]),
        ("host RMP violations", c["rmp.rmp_violations"]),
        ("RMP-assigned pages after shutdown", len(run.host.rmp.assigned())),
    ]
    print("\n" + _table([(k, str(v)) for k, v in rows], ("what", "count")))
    st = snap["states"]
    print(f"\nguest memory at the end: {int((st['private'] == 1).sum())} private pages "
          f"({int((st['rmp'] == 2).sum())} validated), {int((st['private'] == 0).sum())} shared; "
          f"ran in {elapsed:.2f} s; host.check() passed")
    if not args.no_plot:
        plots.memory_map(st, args.out, "SEV-SNP guest memory before shutdown (gmem demo)")
        note = "" if plots.have_matplotlib() else " (bare image: pip install 'kvm-gmem[plot]' for labels)"
        print(f"wrote {args.out}{note}")
    return 0


# ------------------------------------------------------------------- run

def cmd_run(args):
    from gmem import scenario
    spec = scenario.get(args.scenario)
    options = _parse_policy(",".join(args.set or []))
    if args.trace:
        _check_writable(args.trace)
    t = time.perf_counter()
    r = scenario.run(spec, options, trace=bool(args.trace))
    elapsed = time.perf_counter() - t
    if args.trace:
        recs = r.host.trace.to_numpy()
        if args.trace.endswith(".npy"):
            np.save(args.trace, recs)
        else:
            with open(args.trace, "w") as f:
                f.write(r.host.trace.report() + "\n")
        lost = f" ({r.host.trace.lost} lost)" if r.host.trace.lost else ""
        print(f"wrote {len(recs)} trace records to {args.trace}{lost}")
    counters = r.counters()
    if args.json:
        print(json.dumps(dict(counters=counters, events=r.events, seconds=elapsed), indent=1))
        return 0
    print(f"scenario {args.scenario}: {len(spec.get('steps', []))} steps in {elapsed:.3f} s")
    for e in r.events:
        print(f"  - {e}")
    print(_table([(k, str(v)) for k, v in counters.items() if v or args.all], ("counter", "value")))
    return 0


# --------------------------------------------------------------- compare

COMPARE_KEYS = ("gmem_prepare", "rmp.rmpupdate", "rmp.psmash", "host.folio_splits", "host.gmem_invalidate",
                "zapped_sptes", "pf_fixed", "pf_spurious", "memory_fault_exits", "pages_4k", "pages_2m",
                "rmp.leaked_pages")


def _pick(counters, key):
    if key in counters:
        return counters[key]
    return sum(v for k, v in counters.items() if k.endswith("." + key) and k.count(".") == 1
               and not k.startswith(("host.", "rmp.")))


def cmd_compare(args: argparse.Namespace) -> int:
    from gmem import plots, scenario
    spec = scenario.get(args.scenario)
    sets = args.policy or DEFAULT_POLICY_SETS
    parsed = [_parse_policy(p) for p in sets]
    if args.chart:
        _check_writable(args.chart)
    results = []
    for p in parsed:
        snap: dict[str, dict[str, Any]] = {}

        def on_step(i, step, run, snap=snap):
            if step["op"] != "close":
                snap["c"] = run.counters()
        try:
            scenario.run(spec, p, on_step=on_step)
            results.append(snap.get("c", {}))
        except Exception as e:       # an invariant broken under this policy is a finding, not a crash
            results.append({"error": f"{type(e).__name__}: {e}"})
    if all("error" in c for c in results):
        # nothing to compare: the scenario cannot run under any policy set (bad input, most likely)
        raise CliError(f"{args.scenario} fails under every policy set: {results[0]['error']}")
    names = [",".join(f"{k}={v}" for k, v in p.items()) or "defaults" for p in parsed]
    rows = [(k, *[str(_pick(c, k)) if "error" not in c else "-" for c in results]) for k in COMPARE_KEYS]
    print(f"scenario {args.scenario} under {len(sets)} policy sets:")
    for i, n in enumerate(names):
        print(f"  [{i}] {n}" + (f"  -> {results[i]['error']}" if "error" in results[i] else ""))
    print(_table(rows, ("counter", *[f"[{i}]" for i in range(len(names))])))
    if args.chart:
        ok = [(n, {k: _pick(c, k) for k in COMPARE_KEYS}) for n, c in zip(names, results) if "error" not in c]
        if plots.compare_chart([n for n, _ in ok], [c for _, c in ok], list(COMPARE_KEYS), args.chart,
                               f"{args.scenario}: policies compared"):
            print(f"wrote {args.chart}")
        else:
            print("matplotlib is not installed: no chart (pip install 'kvm-gmem[plot]')")
    return 0


# ---------------------------------------------------------------- replay

def load_stream(path):
    """A fault stream: structured .npy with vcpu, gpa, error_code, or CSV with that header."""
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    try:
        if path.endswith(".npy"):
            a = np.load(path, allow_pickle=False)
            if a.dtype.names is None or not {"gpa", "error_code"} <= set(a.dtype.names):
                raise CliError(f"{path}: need a structured array with fields vcpu, gpa, error_code")
            vcpu = a["vcpu"] if "vcpu" in a.dtype.names else np.zeros(len(a), np.uint64)
            return (np.asarray(vcpu, np.uint64), np.asarray(a["gpa"], np.uint64),
                    np.asarray(a["error_code"], np.uint64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # numpy's "input contained no data": reported below
            data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint64,
                              converters=lambda s: int(s, 0), ndmin=2)
        if data.size == 0:
            raise CliError(f"{path}: empty fault stream")
        if data.shape[1] != 3:
            raise CliError(f"{path}: CSV needs three columns vcpu,gpa,error_code")
        return data[:, 0].copy(), data[:, 1].copy(), data[:, 2].copy()
    except CliError:
        raise
    except Exception as e:
        raise CliError(f"{path}: cannot read the fault stream: {e}") from None


def cmd_replay(args: argparse.Namespace) -> int:
    import gmem
    from gmem import plots, scenario, uapi
    vcpu, gpa, ec = load_stream(args.file)
    if args.plot:
        _check_writable(args.plot)
    if len(gpa) == 0:
        raise CliError(f"{args.file}: empty fault stream")
    vm_type = scenario.VM_TYPES.get(args.vm_type)
    if vm_type is None:
        raise CliError(f"unknown vm type {args.vm_type!r}")
    platform: Literal["amd", "intel"] = "intel" if vm_type == uapi.KVM_X86_TDX_VM else "amd"
    host = gmem.Host(memory=scenario.parse_size(args.memory), platform=platform, huge_folios=args.huge_folios)
    vm = host.create_vm(vm_type)
    top = int((gpa & ~np.uint64(vm.shared_gpa_bit or 0)).max()) + 4096
    size = (top + (2 << 20) - 1) & ~((2 << 20) - 1)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, scenario.HVA_BASE, f, 0)
    if args.private and vm.has_private_mem:
        vm.set_memory_attributes(0, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    for v in np.unique(vcpu):
        vm.create_vcpu(int(v))
    n, chunk = len(gpa), max(1, args.chunk)
    tty = sys.stderr.isatty() and not args.quiet
    sizes, secs, done = [], [], 0
    t0 = time.perf_counter()
    while done < n:
        end = min(n, done + chunk)
        t = time.perf_counter()
        vm.page_fault_batch(gpa[done:end], ec[done:end], vcpu_id=vcpu[done:end])
        secs.append(time.perf_counter() - t)
        sizes.append(end - done)
        done = end
        if tty:
            w = 40
            fill = int(w * done / n)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (w - fill)}] {done}/{n} faults "
                             f"{done / (time.perf_counter() - t0) / 1e6:.1f} M/s")
            sys.stderr.flush()
    elapsed = time.perf_counter() - t0
    if tty:
        sys.stderr.write("\n")
    host.check()
    print(f"replayed {n} faults in {elapsed:.3f} s: {n / elapsed / 1e6:.2f} million faults/s "
          f"({1e9 * elapsed / n:.0f} ns/fault)")
    print(_table([(k, str(v)) for k, v in vm.stats.items()], ("counter", "value")))
    if args.plot:
        if plots.replay_chart(sizes, secs, args.plot, f"replay of {os.path.basename(args.file)}"):
            print(f"wrote {args.plot}")
        else:
            print("matplotlib is not installed: no chart (pip install 'kvm-gmem[plot]')")
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

def build_parser():
    p = argparse.ArgumentParser(prog="gmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the default scenario: an SNP guest's life, a table and a PNG")
    d.add_argument("--no-plot", action="store_true", help="do not write the memory-map PNG")
    d.add_argument("--out", default="gmem-demo.png", help="where to write the PNG (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run a built-in scenario or a TOML file and print its counters")
    r.add_argument("scenario", help="a built-in name (snp-life, sw-conversions, tdx-life) or a .toml file")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="a policy option, e.g. prepare=alloc")
    r.add_argument("--trace", metavar="FILE", help="record every tracepoint: .npy (structured) or text")
    r.add_argument("--json", action="store_true", help="print the counters as JSON")
    r.add_argument("--all", action="store_true", help="also print counters that are zero")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="one scenario under several policy sets, side by side")
    c.add_argument("scenario", nargs="?", default="snp-life")
    c.add_argument("--policy", action="append", metavar="K=V,K=V",
                   help="a policy set (repeat); default: 6.18, the RFC, and post-6.18")
    c.add_argument("--chart", metavar="PNG", help="write a bar chart")
    c.set_defaults(func=cmd_compare)

    rp = sub.add_parser("replay", help="replay a fault stream through the batch path")
    rp.add_argument("file", help=".npy structured array (vcpu, gpa, error_code) or CSV with that header")
    rp.add_argument("--vm-type", default="sw_protected", help="default, sw_protected, snp or tdx")
    rp.add_argument("--private", action="store_true", help="make all guest memory private first")
    rp.add_argument("--huge-folios", action="store_true", help="2M guest_memfd folios")
    rp.add_argument("--memory", default="16G", help="host memory (default: %(default)s)")
    rp.add_argument("--chunk", type=int, default=1 << 20, help="faults per progress step")
    rp.add_argument("--plot", metavar="PNG", help="write a throughput chart")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_replay)

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


def main(argv=None):
    from gmem.scenario import ScenarioError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (CliError, ScenarioError) as e:
        print(f"gmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (gmem ... | head): not an error of ours; keep the exit quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"gmem {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
