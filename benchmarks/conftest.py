"""Shared helpers for the benchmarks: per-operation figures and a summary table.

Each benchmark times a batch (n operations through load_many/store_many/
alloc_many, or one Python call) and calls `per_op(benchmark, n, ...)`, which
stores ns per operation (from the fastest and the median round) in
benchmark.extra_info, so they land in --benchmark-json output, and prints one
table at the end of the run.

Timing is the thread's CPU time (time.thread_time, unless --benchmark-timer says otherwise):
the machine is shared, and wall time counts whatever else ran. The garbage collector runs
between rounds: a previous round's guest that lives on in reference
cycles would otherwise be freed, or its memory first-touched again, inside a timed round
(each pedantic round's setup calls gc.collect()).

The memory limit L: one random 8-byte load over 256 MiB with software prefetch, from
benchmarks/memlimit.c compiled and run in the same session (the `memory_limit` fixture; without
a C compiler it is not measured, and the summary says so). Figures of memory-bound streams are
also given as multiples of L (`L_multiple`), which moves less than nanoseconds when other work
shares the machine.
"""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

_rows = []
_limit = {}          # "L": ns, or "why": the reason it was not measured
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when given the directory (pytest's default is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # before pytest-benchmark's own pytest_configure reads the option (an explicit
    # --benchmark-timer wins)
    if getattr(config.option, "benchmark_timer", None) == "time.perf_counter":
        config.option.benchmark_timer = "time.thread_time"


def measure_memory_limit(mib=256, rounds=7):
    """L in ns from benchmarks/memlimit.c, or (None, why) without a compiler or on failure."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc, gcc or clang) to build benchmarks/memlimit.c"
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "memlimit")
        r = subprocess.run([cc, "-O2", "-o", exe, os.path.join(HERE, "memlimit.c")],
                           capture_output=True, text=True)
        if r.returncode:
            return None, f"benchmarks/memlimit.c did not build: {r.stderr.strip()[:200]}"
        r = subprocess.run([exe, str(mib), str(rounds)], capture_output=True, text=True)
        if r.returncode:
            return None, f"memlimit exited {r.returncode}"
    return json.loads(r.stdout)["min_ns"], None


@pytest.fixture(scope="session")
def memory_limit():
    """L (ns), measured once per session; None if it could not be (the reason is in the
    summary)."""
    if not _limit:
        ns, why = measure_memory_limit()
        _limit.update({"L": ns} if ns else {"why": why})
    return _limit.get("L")


@pytest.fixture(scope="session")
def memory_limit_reason(memory_limit):
    """Why L was not measured (None if it was)."""
    return _limit.get("why")


def per_op(benchmark, n, **extra):
    """Record ns/op for a benchmark that did n operations per round (plus any extra figures)."""
    stats = getattr(benchmark, "stats", None)
    info = dict(extra)
    if stats is not None:                     # None under --benchmark-disable
        info["ns_per_op_min"] = round(stats.stats.min / n * 1e9, 2)
        info["ns_per_op_median"] = round(stats.stats.median / n * 1e9, 2)
        if _limit.get("L"):
            info["L_multiple"] = round(info["ns_per_op_min"] / _limit["L"], 2)
    info["ops_per_round"] = n
    benchmark.extra_info.update(info)
    _rows.append((benchmark.group or "", benchmark.name, info))


@pytest.fixture
def record(memory_limit):
    return per_op


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    tr.section("per operation")
    if _limit:
        tr.write_line(f"memory limit L = {_limit['L']} ns (benchmarks/memlimit.c: one random 8-byte "
                      "load over 256 MiB, prefetched)" if _limit.get("L") else
                      f"memory limit L not measured: {_limit['why']}")
    tr.write_line(f"{'group':<28} {'benchmark':<46} {'ns/op min':>10} {'median':>10}  other")
    for group, name, info in sorted(_rows, key=lambda r: r[0]):
        other = ", ".join(f"{k}={v}" for k, v in info.items()
                          if k not in ("ns_per_op_min", "ns_per_op_median", "ops_per_round"))
        tr.write_line(f"{group:<28} {name:<46} {info.get('ns_per_op_min', '-'):>10} "
                      f"{info.get('ns_per_op_median', '-'):>10}  {other}")
