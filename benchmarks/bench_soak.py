"""A short soak (gmem.soak, issue 7) under pytest-benchmark: 10**5 random operations over SNP,
TDX and SW_PROTECTED guests, host.check() every 10**4, one round.

Not a CI test.  The full soak is `gmem soak` (10**6 operations by default); its figures are in
benchmarks/README.md, "Soak".  Besides ns per operation this records the figures the soak
reports: faults per second, peak memory, and the model's memory and pages after every VM is
closed against the start.
"""
from gmem import soak

OPS = 10**5


def test_soak(benchmark, record):
    out = {}

    def once():
        out["r"] = soak.run(ops=OPS, seed=0, check_every=10**4)

    benchmark.pedantic(once, rounds=1, iterations=1)
    r = out["r"]
    m = r["memory"]
    record(benchmark, OPS,
           ops_per_s=r["ops_per_s"], faults_per_s=r["faults_per_s"],
           peak_model_mib=round(m["peak"]["memory_bytes"] / 2**20, 1),
           peak_rss_mib=round(m["peak"]["rss_bytes"] / 2**20, 1),
           model_start_mib=round(m["start"]["memory_bytes"] / 2**20, 1),
           model_after_teardown_mib=round(m["after_teardown"]["memory_bytes"] / 2**20, 1),
           pages_start=m["start"]["used_pages"], pages_after_teardown=m["after_teardown"]["used_pages"])
    assert r["pages_after_teardown"]["gmem"] == 0 and r["assigned_after_teardown"] == 0
    # every page in use after teardown is the VMM's window or held on purpose (leaked, poisoned)
    p = r["pages_after_teardown"]
    assert m["after_teardown"]["used_pages"] == p["vmm"] + p["leaked"] + p["poisoned"]
    assert p["vmm"] <= m["start"]["used_pages"]           # no VMM page beyond the prefaulted window
