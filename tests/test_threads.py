"""Threads: one Host is serialized by its lock (README "Threads").

page_fault_batch and pre_fault_memory run with the GIL released; every other call on the
same host waits for them instead of walking or changing the structures they use, and lands
entirely before or after them.  Different hosts run in parallel.  The checks are outcomes
(results equal to a single-threaded run, host.check(), errnos), never durations.
"""
import errno
import threading
import time

import numpy as np

import gmem
from gmem import uapi as u

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = u.KVM_MEM_GUEST_MEMFD
W = u.PFERR_WRITE_MASK
HVA = 1 << 40
GUEST = 1 << 30                         # 2**18 pages, each faulted 4 times: 2**20 faults
NPAGES = GUEST >> 12
R1, R2 = 1 << 32, 1 << 33               # thread B's regions, away from the stream's
MB = 1 << 20
JOIN_TIMEOUT = 120                      # a hang fails the test instead of the whole run


def world(allocate=True):
    """A SW_PROTECTED guest whose stream region is allocated up front (its pfns do not depend
    on what other threads allocate meanwhile), plus two files for another thread to use."""
    h = gmem.Host(memory=2 * GUEST)
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(GUEST)
    vm.set_user_memory_region2(0, GMEM, 0, GUEST, HVA, f, 0)
    vm.set_memory_attributes(0, GUEST, PRIVATE)
    if allocate:
        f.allocate(0, GUEST)
    f2 = vm.create_guest_memfd(16 * MB)
    vm.set_user_memory_region2(1, GMEM, R1, 16 * MB, HVA + GUEST, f2, 0)
    f3 = vm.create_guest_memfd(4 * MB)
    return dict(h=h, vm=vm, f=f, f2=f2, f3=f3, v=vm.create_vcpu(0), v1=vm.create_vcpu(1))


def stream(seed, n=NPAGES, passes=4, base=0):
    """passes permutations of n pages: the first pass is cold, the others hit mapped pages."""
    rng = np.random.default_rng(seed)
    pages = np.arange(n, dtype=np.uint64) + (base >> 12)
    return np.concatenate([rng.permutation(pages) for _ in range(passes)]) << np.uint64(12)


def run_batches(vm, gpas, chunks=8, vcpu_id=0):
    ecs = np.full(len(gpas), W, np.uint64)
    return np.concatenate([vm.page_fault_batch(g, e, vcpu_id=vcpu_id)
                           for g, e in zip(np.array_split(gpas, chunks), np.array_split(ecs, chunks))])


def same(a, b):
    return all(np.array_equal(a[name], b[name]) for name in gmem.FAULT_DTYPE.names)


def run_threads(*fns):
    """Run each fn in its own thread; re-raise the first exception one of them raised."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:          # handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]


def test_calls_from_another_thread_land_between_batches():
    """Thread B converts, allocates, punches, faults, binds and unbinds memslots, reads stats,
    SPTEs and checks the host while thread A runs 2**20 faults in batches on the same VM: the
    batches give what they give single-threaded, and the host stays consistent."""
    w = world()
    h, vm, f2, f3, v1 = w["h"], w["vm"], w["f2"], w["f3"], w["v1"]
    gpas = stream(1)
    out = {}
    b_ran = threading.Event()
    a_done = threading.Event()
    counts = dict(b=0, checks=0)

    def a():
        b_ran.wait(JOIN_TIMEOUT)
        try:
            out["a"] = run_batches(vm, gpas)
        finally:
            a_done.set()

    def b():
        i = 0
        while not a_done.is_set() or i < 2:
            vm.set_memory_attributes(R1, 2 * MB, PRIVATE if i % 2 else 0)
            f2.allocate(4 * MB, 64 << 10)
            v1.page_fault(R1 + ((i * 4096) % (2 * MB)), W)
            f2.punch_hole(0, 16 * MB)
            vm.set_user_memory_region2(2, GMEM, R2, 4 * MB, HVA + 2 * GUEST, f3, 0)
            v1.page_fault(R2 + 4096 * (i % 1024), W)
            vm.set_user_memory_region2(2, GMEM, R2, 0, HVA + 2 * GUEST, f3, 0)     # delete
            f3.punch_hole(0, 4 * MB)
            assert vm.stats["pf_taken"] >= 2 * (i + 1) and h.stats["folios"] >= NPAGES
            if i % 8 == 0:
                h.check()
                vm.sptes()
                counts["checks"] += 1
            i += 1
            b_ran.set()
        counts["b"] = i

    run_threads(a, b)
    assert counts["b"] >= 2 and counts["checks"] >= 1
    h.check()
    ref = world()
    assert same(out["a"], run_batches(ref["vm"], gpas))
    assert vm.stats["pages_4k"] >= NPAGES and (out["a"]["ret"] > 0).all()


def test_batches_on_two_hosts_run_in_parallel():
    """Each host has its own lock: two threads' batches on two hosts run at once."""
    worlds = [world(), world()]
    gpas = stream(2)
    out = [None, None]

    def run(i):
        out[i] = run_batches(worlds[i]["vm"], gpas, chunks=2)
        worlds[i]["h"].check()

    run_threads(lambda: run(0), lambda: run(1))
    ref = run_batches(world()["vm"], gpas, chunks=2)
    assert same(out[0], ref) and same(out[1], ref)


def test_batches_on_one_host_are_serialized():
    """Two threads fault two halves of one guest through two vCPUs, in chunks that interleave
    in any order: each gets what it would get alone, and every page is mapped once."""
    w = world()
    half = GUEST // 2
    g0, g1 = stream(3, NPAGES // 2, passes=2), stream(4, NPAGES // 2, passes=2, base=half)
    out = [None, None]

    def run(i, gpas):
        out[i] = run_batches(w["vm"], gpas, chunks=16, vcpu_id=i)

    run_threads(lambda: run(0, g0), lambda: run(1, g1))
    w["h"].check()
    ref = world()
    assert same(out[0], run_batches(ref["vm"], g0, chunks=16, vcpu_id=0))
    assert same(out[1], run_batches(ref["vm"], g1, chunks=16, vcpu_id=1))
    assert w["vm"].stats["pages_4k"] == NPAGES
    assert w["vm"].stats["pf_fixed"] == ref["vm"].stats["pf_fixed"] == NPAGES


def test_a_loop_of_batches_does_not_starve_another_thread():
    """Waiters get the host in turn.  Thread A calls page_fault_batch in a loop until thread B
    has made its calls: were A to take the host back as soon as its call returned (before B,
    woken, got the GIL), B would wait as long as A loops, here up to the cap."""
    h = gmem.Host(memory=64 * MB)
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(MB)
    vm.set_user_memory_region2(0, GMEM, 0, MB, HVA, f, 0)
    gpas = np.arange(64, dtype=np.uint64) << np.uint64(12)
    ecs = np.full(64, W, np.uint64)
    n = dict(a=0, b=0)
    cap = 200_000

    def a():
        while n["b"] < 16 and n["a"] < cap:
            vm.page_fault_batch(gpas, ecs)
            n["a"] += 1

    def b():
        while n["a"] == 0:
            time.sleep(0.001)
        for _ in range(16):
            vm.stats
            n["b"] += 1

    run_threads(a, b)
    assert n["b"] == 16 and n["a"] < cap


def test_pre_fault_memory_and_calls_from_another_thread():
    """pre_fault_memory allocates and maps the whole guest, the GIL released, while thread B
    allocates, punches and converts on the same host."""
    w = world(allocate=False)
    h, vm, v, f2 = w["h"], w["vm"], w["v"], w["f2"]
    left = {}
    done = threading.Event()

    def a():
        try:
            left["a"] = v.pre_fault_memory(0, GUEST)
        finally:
            done.set()

    def b():
        i = 0
        while not done.is_set() or i < 2:
            f2.allocate(0, 2 * MB)
            vm.set_memory_attributes(R1, 2 * MB, PRIVATE if i % 2 else 0)
            f2.punch_hole(0, 2 * MB)
            if i % 64 == 0:
                vm.sptes()
            i += 1

    run_threads(a, b)
    assert left["a"] == (GUEST, 0) and vm.stats["pages_4k"] == NPAGES
    h.check()


def test_closing_the_vm_during_a_batch():
    """vm.close() and the files' close() from thread B, made while thread A's batch is inside
    (in its prepare hook), wait for the batch: it runs whole, then the VM is destroyed."""
    w = world(allocate=False)
    h, vm = w["h"], w["vm"]
    inside = threading.Event()

    def prepare(vm_, gfn, pfn, order):
        if not inside.is_set():
            inside.set()
            time.sleep(0.05)                # without the GIL: B makes its calls now
        return 0

    h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=prepare)
    gpas = stream(5, n=1 << 14, passes=2)
    out = {}

    def a():
        out["a"] = vm.page_fault_batch(gpas, np.full(len(gpas), W, np.uint64))

    def b():
        inside.wait(JOIN_TIMEOUT)
        vm.close()
        for name in ("f", "f2", "f3"):
            w[name].close()

    run_threads(a, b)
    assert (out["a"]["ret"][:1 << 14] == u.RET_PF_FIXED).all()
    assert (out["a"]["ret"][1 << 14:] == u.RET_PF_SPURIOUS).all()
    assert vm.destroyed and vm.sptes() == []
    h.check()


class TestHooks:
    def test_hook_in_a_batch_refuses_its_own_thread_and_makes_others_wait(self):
        """A Python hook runs inside thread A's batch (A holds the host): a punch from the hook
        is refused with EDEADLK as before, a read works; the same punch from thread B waits
        for the batch and then succeeds."""
        h = gmem.Host(memory=512 * MB)
        vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        f = vm.create_guest_memfd(64 * MB)
        vm.set_user_memory_region2(0, GMEM, 0, 64 * MB, HVA, f, 0)
        vm.set_memory_attributes(0, 64 * MB, PRIVATE)
        f2 = vm.create_guest_memfd(2 * MB)
        f2.allocate(0, 2 * MB)
        in_hook, b_calling = threading.Event(), threading.Event()
        seen = dict(calls=0)
        order = []

        def prepare(vm_, gfn, pfn, order_):
            seen["calls"] += 1
            if seen["calls"] == 1:
                try:
                    f.punch_hole(32 * MB, 4096)
                except OSError as e:
                    seen["errno"] = e.errno
                seen["attrs"] = vm_.get_memory_attributes(gfn)
                in_hook.set()
                b_calling.wait(JOIN_TIMEOUT)
                time.sleep(0.05)            # lets B reach its call; the outcome does not depend on it
                order.append("hook returns")
            return 0

        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=prepare)
        gpas = np.arange(4096, dtype=np.uint64) << np.uint64(12)
        out = {}

        def a():
            out["a"] = vm.page_fault_batch(gpas, np.full(4096, W, np.uint64))

        def b():
            in_hook.wait(JOIN_TIMEOUT)
            b_calling.set()
            f2.punch_hole(0, 2 * MB)        # refused inside a hook; from here it waits
            order.append("B punched")

        run_threads(a, b)
        assert seen["errno"] == errno.EDEADLK and seen["attrs"] == PRIVATE
        assert order == ["hook returns", "B punched"]
        assert seen["calls"] == 4096 and (out["a"]["ret"] == u.RET_PF_FIXED).all()
        assert vm.stats["gmem_prepare"] == 4096
        h.check()

    def test_hook_from_a_scalar_call_makes_others_wait(self):
        """The same with a hook run by a call that holds the GIL (fallocate's invalidate on
        punch): while the hook sleeps without the GIL, another thread's call waits for the
        punch to end instead of running in its middle."""
        h = gmem.Host(memory=256 * MB)
        vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        f = vm.create_guest_memfd(8 * MB)
        vm.set_user_memory_region2(0, GMEM, 0, 8 * MB, HVA, f, 0)
        vm.set_memory_attributes(0, 8 * MB, PRIVATE)
        v = vm.create_vcpu(0)
        for g in range(0, 8 * MB, 4096):
            v.page_fault(g, W)
        in_hook = threading.Event()
        order = []

        def invalidate(host, start, end):
            if not in_hook.is_set():
                in_hook.set()
                time.sleep(0.05)            # no GIL: thread B runs meanwhile
                order.append("invalidate returns")

        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_invalidate=invalidate)

        def a():
            f.punch_hole(0, 8 * MB)

        def b():
            in_hook.wait(JOIN_TIMEOUT)
            order.append(("invalidations", h.stats["gmem_invalidate"], len(vm.sptes())))

        run_threads(a, b)
        assert order == ["invalidate returns", ("invalidations", 2048, 0)]     # the whole punch
        h.check()


def test_parallel_readers_of_one_xarray():
    """Loads write nothing (the leaf hint moves only for the array's owner), so several
    threads may read one XArray at once, each in its own sequential stream."""
    n = 1 << 16
    xa = gmem.XArray()
    xa.store_many(np.arange(n, dtype=np.uint64), np.arange(n, dtype=np.uint64))
    bad = []

    def reader(off):
        idx = (np.arange(n, dtype=np.uint64) + off) % n
        for _ in range(100):
            v, present = xa.load_many(idx)
            if not (present.all() and (v == idx).all()):
                bad.append(off)
                return

    ts = [threading.Thread(target=reader, args=(o,)) for o in (0, 12345, 33333, 50000)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert bad == []
    xa.check()
