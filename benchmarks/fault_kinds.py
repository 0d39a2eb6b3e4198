"""Every fault kind of benchmarks/README's fault-path table, outside pytest, for interleaved A/B
runs of two builds and for instruction counts:

    PYTHONPATH=<build> python benchmarks/fault_kinds.py time KIND[,KIND...] ROUNDS
        -> "KIND min median": ns per fault, thread CPU time, fastest and median round
    valgrind --tool=callgrind --callgrind-out-file=/dev/null --collect-atstart=no \
        --toggle-collect='__pyx_pw_4gmem_5_core_2Vm_*page_fault_batch' \
        --zero-before='__pyx_getprop_4gmem_5_core_2Vm_stats' \
        python benchmarks/fault_kinds.py count KIND
        -> "Collected" / n = instructions per fault inside page_fault_batch (the guest's setup
        and warm-up are not counted: vm.stats is read just before the measured call; for
        scalar_* kinds toggle on '__pyx_pw_4gmem_5_core_4Vcpu_*page_fault')

KIND: {sw,snp,tdx}_{seq,rnd,sparse}_{present,slow,cold} (a 4 GiB guest, every page private;
seq and rnd: all 2^20 pages, sparse: 2^13 pages in random order over the 4 GiB) or
scalar_{present,slow,cold} (2^14 vcpu.page_fault calls, SW_PROTECTED). $GMEM_KERNEL picks the
kernel version whose policies the hosts take (gmem.Host(kernel=...))."""
import gc
import sys
import time

import numpy as np

from gmem import uapi as U
from bench_fault import COLD_STREAMS, OUT, RANDOM, SEQ, W, KINDS as VT, guest as _guest

P = U.PFERR_PRESENT_MASK
STREAM = {"seq": SEQ, "rnd": RANDOM, "sparse": COLD_STREAMS["sparse"]}
SCALAR_N = 1 << 14


def guest(vk):
    return _guest(kind=vk)


def prepare(kind):
    """-> (callable doing the measured faults, n); the guest made and warmed."""
    parts = kind.split("_")
    if parts[0] == "scalar":
        what = parts[1]
        g = guest("sw")
        v = g[3]
        if what == "cold":
            gl = [int(x) for x in SEQ[:SCALAR_N]]
        else:
            gl = [int(x) for x in RANDOM[:SCALAR_N]]
            g[1].page_fault_batch(RANDOM[:SCALAR_N], np.full(SCALAR_N, W, np.uint64))
        ec = W | P if what == "present" else W
        pf = v.page_fault
        def run():
            for x in gl:
                pf(x, ec)
        return run, SCALAR_N, g
    vk, order, what = parts
    enc = VT[vk][2]
    s = STREAM[order]
    n = len(s)
    g = guest(vk)
    if what != "cold":
        g[1].page_fault_batch(s, np.full(n, W | enc, np.uint64), out=OUT[:n])
    e = np.full(n, (W | P if what == "present" else W) | enc, np.uint64)
    vm = g[1]
    return (lambda: vm.page_fault_batch(s, e, out=OUT[:n])), n, g


def time_kind(kind, rounds):
    ts = []
    cold = kind.endswith("cold")
    state = None
    for _ in range(rounds):
        if cold or state is None:
            state = None
            gc.collect()
            state = prepare(kind)
        run, n, g = state
        gc.collect()
        t = time.thread_time_ns()
        out = run()
        ts.append((time.thread_time_ns() - t) / n)
        # every fault taken (an exit or a refused KVM_RUN would be timed as a fault)
        assert out is None or (out["ret"] >= 0).all(), (kind, np.unique(out["ret"]))
    ts.sort()
    return ts[0], ts[len(ts) // 2]


def main():
    if sys.argv[1] == "time":
        for k in sys.argv[2].split(","):
            mn, md = time_kind(k, int(sys.argv[3]))
            print(f"{k} {mn:.1f} {md:.1f}", flush=True)
    else:
        run, n, g = prepare(sys.argv[2])
        g[1].stats                         # callgrind --zero-before: counting starts here
        run()
        print("n", n)


if __name__ == "__main__":
    main()
