"""gmem.XArray (lib/xarray.c) against a Python dict doing the same job, in the same run.

Goals (issue 2), per operation through the C-level API, measured in batch:
load <= 20 ns and store <= 50 ns at 10^6 entries; <= 16 bytes per 4K entry and
<= 1 byte per index of a 2M entry.  load_many/store_many run xa_load /
xa_store_order in a nogil loop over a uint64 array; the dict baseline gets
Python lists prepared outside the timing and its fastest idiom (map(d.get),
d.update(zip)).
"""
import tracemalloc

import numpy as np
import pytest

from gmem import XArray

N = 10**6
N_SPARSE = 10**5
PATTERNS = ["sequential", "random"]


@pytest.fixture(scope="module")
def indices():
    rng = np.random.default_rng(2024)
    seq = np.arange(N, dtype=np.uint64)
    return {"sequential": seq, "random": rng.permutation(seq),
            "sparse": rng.integers(0, 2**40, N_SPARSE, dtype=np.uint64)}


@pytest.fixture(scope="module")
def filled(indices):
    """An XArray and a dict per pattern, already holding every index (value = index)."""
    out = {}
    for pattern, idx in indices.items():
        x = XArray()
        x.store_many(idx, idx)
        keys = idx.tolist()
        out[pattern] = (x, dict(zip(keys, keys)), keys)
    return out


# ----------------------------------------------------------------------- load

@pytest.mark.benchmark(group="xarray load 10^6")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_load_xarray(benchmark, record, indices, filled, pattern):
    x, _, _ = filled[pattern]
    idx = indices[pattern]
    values, present = benchmark(x.load_many, idx)
    assert present.all() and (values == idx).all()
    record(benchmark, len(idx))


@pytest.mark.benchmark(group="xarray load 10^6")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_load_dict(benchmark, record, filled, pattern):
    _, d, keys = filled[pattern]
    values = benchmark(lambda: list(map(d.get, keys)))
    assert values == keys
    record(benchmark, len(keys))


@pytest.mark.benchmark(group="xarray load sparse 10^5")
def test_load_xarray_sparse(benchmark, record, indices, filled):
    """Random 40-bit indices: every entry has leaf nodes of its own (informational)."""
    x, _, _ = filled["sparse"]
    _, present = benchmark(x.load_many, indices["sparse"])
    assert present.all()
    record(benchmark, N_SPARSE)


@pytest.mark.benchmark(group="xarray load sparse 10^5")
def test_load_dict_sparse(benchmark, record, filled):
    _, d, keys = filled["sparse"]
    benchmark(lambda: list(map(d.get, keys)))
    record(benchmark, N_SPARSE)


# ---------------------------------------------------------------------- store

@pytest.mark.benchmark(group="xarray store 10^6 (overwrite)")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_store_xarray(benchmark, record, indices, filled, pattern):
    x, _, _ = filled[pattern]
    idx = indices[pattern]
    benchmark(x.store_many, idx, idx)
    assert len(x) == N
    record(benchmark, N)


@pytest.mark.benchmark(group="xarray store 10^6 (overwrite)")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_store_dict(benchmark, record, filled, pattern):
    _, d, keys = filled[pattern]
    benchmark(lambda: d.update(zip(keys, keys)))
    assert len(d) == N
    record(benchmark, N)


@pytest.mark.benchmark(group="xarray store 10^6 (insert)")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_insert_xarray(benchmark, record, indices, pattern):
    """Into an empty array: node allocation included."""
    idx = indices[pattern]
    benchmark.pedantic(lambda x: x.store_many(idx, idx), setup=lambda: ((XArray(),), {}),
                       rounds=7, warmup_rounds=1)
    record(benchmark, N)


@pytest.mark.benchmark(group="xarray store 10^6 (insert)")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_insert_dict(benchmark, record, filled, pattern):
    _, _, keys = filled[pattern]
    benchmark.pedantic(lambda d: d.update(zip(keys, keys)), setup=lambda: (({},), {}),
                       rounds=7, warmup_rounds=1)
    record(benchmark, N)


# ---------------------------------------------------------------- store_range

RANGES = {
    "2M aligned": (2**21, 2 * 2**21 - 1),          # one order-21 entry
    "2M unaligned": (2**21 + 1, 2 * 2**21),        # 22 entries
    "1G aligned": (2**30, 2 * 2**30 - 1),          # one order-30 entry
    "1G unaligned": (2**30 + 1, 2 * 2**30),        # 31 entries
}


@pytest.mark.benchmark(group="xarray store_range")
@pytest.mark.parametrize("case", list(RANGES))
def test_store_range_xarray(benchmark, record, case):
    """One xa_store_range call into an empty array (one Python call each)."""
    first, last = RANGES[case]
    arrays = []

    def setup():
        x = XArray()
        arrays.append(x)
        return (x,), {}

    benchmark.pedantic(lambda x: x.store_range(first, last, 1), setup=setup,
                       rounds=300, warmup_rounds=10)
    x = arrays[-1]
    assert x.nr_indices == last - first + 1
    record(benchmark, 1, entries=len(x), bytes=x.memory_bytes)


@pytest.mark.benchmark(group="xarray store_range")
def test_store_range_dict_2m(benchmark, record):
    """The dict's way to the same job: one key per index (a 1G range would need ~100 GB)."""
    first, last = RANGES["2M aligned"]
    benchmark.pedantic(lambda: dict.fromkeys(range(first, last + 1), 1), rounds=3, warmup_rounds=1)
    record(benchmark, 1)


# --------------------------------------------------------------------- memory

def dict_bytes(keys):
    tracemalloc.start()
    d = dict(zip(keys, keys))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(d) == len(keys)
    return size


MEMORY = {
    # case: (indices, order, entries)
    "4K entries, dense 10^6": ("dense", 0, N),
    "2M entries (order 9), 2^14": ("dense", 9, 2**14),
    "1G entries (order 18), 2^10": ("dense", 18, 2**10),
    "4K entries, sparse 10^5": ("sparse", 0, N_SPARSE),
}


@pytest.mark.benchmark(group="xarray memory")
@pytest.mark.parametrize("case", list(MEMORY))
def test_memory_xarray(benchmark, record, indices, case):
    """Bytes of C memory per entry and per index (the timing is only memory_bytes)."""
    layout, order, n = MEMORY[case]
    if layout == "dense":
        idx = np.arange(n, dtype=np.uint64) << np.uint64(order)
    else:
        idx = indices["sparse"]
    x = XArray()
    x.store_many(idx, idx, order=order)
    assert len(x) == n
    benchmark(lambda: x.memory_bytes)
    extra = dict(bytes_per_entry=float(f"{x.memory_bytes / n:.3g}"),
                 bytes_per_index=float(f"{x.memory_bytes / x.nr_indices:.3g}"))
    if order == 0:
        extra["dict_bytes_per_entry"] = round(dict_bytes(idx.tolist()) / n, 1)
    record(benchmark, 1, **extra)
