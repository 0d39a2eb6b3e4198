"""Shared helpers for the benchmarks: per-operation figures and a summary table.

Each benchmark times a batch (n operations through load_many/store_many/
alloc_many, or one Python call) and calls `per_op(benchmark, n, ...)`, which
stores ns per operation (from the fastest and the median round) in
benchmark.extra_info, so they land in --benchmark-json output, and prints one
table at the end of the run.
"""
import pytest

_rows = []


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when given the directory (pytest's default is test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def per_op(benchmark, n, **extra):
    """Record ns/op for a benchmark that did n operations per round (plus any extra figures)."""
    stats = getattr(benchmark, "stats", None)
    info = dict(extra)
    if stats is not None:                     # None under --benchmark-disable
        info["ns_per_op_min"] = round(stats.stats.min / n * 1e9, 2)
        info["ns_per_op_median"] = round(stats.stats.median / n * 1e9, 2)
    info["ops_per_round"] = n
    benchmark.extra_info.update(info)
    _rows.append((benchmark.group or "", benchmark.name, info))


@pytest.fixture
def record():
    return per_op


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    tr.section("per operation")
    tr.write_line(f"{'group':<28} {'benchmark':<46} {'ns/op min':>10} {'median':>10}  other")
    for group, name, info in sorted(_rows, key=lambda r: r[0]):
        other = ", ".join(f"{k}={v}" for k, v in info.items()
                          if k not in ("ns_per_op_min", "ns_per_op_median", "ops_per_round"))
        tr.write_line(f"{group:<28} {name:<46} {info.get('ns_per_op_min', '-'):>10} "
                      f"{info.get('ns_per_op_median', '-'):>10}  {other}")
