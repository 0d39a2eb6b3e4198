"""One regression test per numbered item of issue 13 (an outside attack's findings), each
reproducing the attack as described and asserting the outcome the issue asks for.

Each attack runs in a forked child (tests/hostile_cases.py: run_isolated), so a crash or a
hang fails the test instead of ending the run.  Items not fixed yet are marked
xfail(strict=True): the test turns into a failure the day the item is fixed, and its marker
goes then.  The memory-corruption items (1-7) are written to fail on a normal build too (a
sprayed heap turns a use-after-free into a crash or a visible overwrite); under the ASan build
(.ci/sanitize) each is a heap-use-after-free or a SEGV report.
"""
import errno
import gc
import sys
from fractions import Fraction

import numpy as np
import pytest

import gmem
import gmem._core as core
import hostile_cases as hc
from gmem import uapi as u

MB = 1 << 20
HVA = 0x7F0000000000
GMEM = u.KVM_MEM_GUEST_MEMFD
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ENC = u.PFERR_GUEST_ENC_MASK
W = u.PFERR_WRITE_MASK
SW = u.KVM_X86_SW_PROTECTED_VM
SNP = u.KVM_X86_SNP_VM
TDX = u.KVM_X86_TDX_VM
OK = (u.RET_PF_FIXED, u.RET_PF_SPURIOUS)
REFUSED = (TypeError, ValueError, OSError)
# the scenarios take milliseconds: one that takes this long is a hang
HANG = 10.0 if hc._under_asan() else 2.0


def gap(n, why):
    return pytest.mark.xfail(strict=True, reason=f"issue 13 item {n}: {why}")


def isolated(scenario, timeout=None):
    """Run the scenario in a child; fail with what went wrong there."""
    failure = hc.run_isolated(scenario, timeout)
    assert failure is None, failure


def guest(vm_type=SW, size=4 * MB, private=True, vm_class=None, **host_kw):
    platform = "intel" if vm_type == TDX else "amd"
    h = gmem.Host(memory=64 * MB, platform=platform, **host_kw)
    vm = h.create_vm(vm_type) if vm_class is None else vm_class(h, vm_type)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, GMEM, 0, size, HVA, f, 0)
    if private:
        vm.set_memory_attributes(0, size, PRIVATE)
    return h, vm, f


# ---------------------------------------------------------------- memory corruption

def test_item_1_xarray_marks_refuse_none():
    """set_mark/clear_mark/get_mark(index, None): None was mark -1, node.marks[-1] is the
    node's parent pointer (a segfault, a heap-corruption abort or a hang)."""
    def scenario():
        x = gmem.XArray()
        for i in range(200):
            x.store(i * 7, i)
        x.set_mark(7, 1)
        before = [list(x.items(mark=m)) for m in (None, 0, 1, 2)]
        for call in (x.set_mark, x.clear_mark, x.get_mark):
            for i in range(0, 1400, 7):
                with pytest.raises((TypeError, ValueError)):
                    call(i, None)
        x.check()
        assert [list(x.items(mark=m)) for m in (None, 0, 1, 2)] == before
        assert x.find(1, mark=None) == (7, 1)        # for a search None still means any entry
    isolated(scenario)


def test_item_2_host_init_twice():
    def scenario():
        h, vm, f = guest()
        f.allocate(0, 4 * MB)
        before = h.stats
        try:
            h.__init__(memory=64 * MB)
        except (TypeError, ValueError):
            pass
        assert h.stats == before
        f.punch_hole(0, 4 * MB)
        h.check()
    isolated(scenario)


def test_item_3_vm_init_with_another_host():
    def scenario():
        h, h2 = gmem.Host(memory=64 * MB), gmem.Host(memory=16 * MB)
        vm = h.create_vm(SW)
        try:
            vm.__init__(h2, SW)
        except (TypeError, ValueError):
            pass
        del h
        gc.collect()
        churn = [gmem.XArray() for _ in range(100)]
        for x in churn:
            for i in range(100):
                x.store(i * 5, i)
        f = vm.create_guest_memfd(4 * MB)
        vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f, 0)
        host, folios = vm.host, vm.host.stats["folios"]
        assert vm.create_vcpu(0).page_fault(0x1000, W).ret in OK
        assert host.stats["folios"] == folios + 1       # taken from the host the VM reports
        f.close()
        vm.close()
        host.check()
        h2.check()
    isolated(scenario)


@pytest.mark.parametrize("how", ["__new__", "subclass"])
def test_item_4_half_built_vm(how):
    def scenario():
        w = hc.world()
        try:
            if how == "__new__":
                vm = gmem.Vm.__new__(gmem.Vm, w.amd, SW)
            else:
                vm = type("Lazy", (gmem.Vm,), {"__init__": lambda self, host, vm_type: None})(w.amd, SW)
        except TypeError:
            return                  # refusing to build it half (or to be subclassed) is fine
        failures = hc.poke_members(w, vm, "Vm")
        assert not failures, "\n".join(failures)
    isolated(scenario)


def test_item_5_injection_without_a_host():
    def scenario():
        h = gmem.Host(memory=16 * MB)
        inj = h.inject(alloc_failures=1)
        try:
            inj.host = None
        except AttributeError:
            pass                    # a read-only attribute
        for make in (lambda: inj, lambda: hc.live_class("_Injection")(None)):
            try:
                with make():
                    pass
            except REFUSED:
                pass
        h.check()
    isolated(scenario)


@pytest.mark.parametrize("vcpu_id", [0, "array"])
def test_item_6_batch_on_a_vcpu_nobody_keeps(vcpu_id):
    """A hook refills the freed vCPU's memory with 0x41 bytes: the fault path then follows
    vcpu->kvm = 0x4141414141414141."""
    def scenario():
        try:        # create_vcpu returns a vCPU that nobody keeps
            leaky = type("LeakyVm", (gmem.Vm,), {"create_vcpu": lambda self, vcpu_id=0: gmem.Vcpu(self, vcpu_id)})
        except TypeError:
            return                  # Vm cannot be subclassed: fine
        h, vm, f = guest(private=False, vm_class=leaky)
        spray = []

        def refill(vm, gpa, error_code):
            spray.extend(b"\x41" * 100 + bytes([i & 255]) for i in range(2000))
            return False

        h.register_hooks(SW, is_private_fault=refill)
        ids = 0 if vcpu_id == 0 else np.zeros(8, np.uint64)
        try:
            out = vm.page_fault_batch(np.arange(8, dtype=np.uint64) << 12, np.full(8, W, np.uint64), ids)
        except REFUSED:
            pass
        else:
            assert set(out["ret"].tolist()) <= set(OK)
        h.check()
    isolated(scenario)


@pytest.mark.parametrize("array", ["out", "gpas"])
def test_item_7_hook_resizes_the_batch_arrays(array):
    """out: the batch goes on writing the freed buffer, which malloc hands to the next arrays of
    that size (the spray), and the array it returns lacks the records; gpas: it goes on reading
    the freed buffer (faults at gfns nobody asked for, or misses some it was asked for).  The
    arrays are larger than numpy's cache of small buffers (1 KiB), so a freed one goes back to
    malloc at once."""
    n = 256

    def scenario():
        h, vm, f = guest(private=False)
        gpas = np.arange(n, dtype=np.uint64) << 12
        out = np.zeros(n, gmem.FAULT_DTYPE)
        spray = []

        def resize(vm, gpa, error_code):
            if not spray:
                spray.append(None)
                (out if array == "out" else gpas).resize(4 * n, refcheck=False)
                fill = np.zeros(n, gmem.FAULT_DTYPE) if array == "out" else np.full(n, 3 * MB, np.uint64)
                spray.extend(fill.copy() for _ in range(64))
            return False

        h.register_hooks(SW, is_private_fault=resize)
        try:
            res = vm.page_fault_batch(gpas, np.full(n, W, np.uint64), 0, out)
        except REFUSED:
            res = None
        if array == "out":
            # (the fields only: a copy of a structured array leaves its padding bytes undefined)
            assert not any(a[name].any() for a in spray[1:] for name in a.dtype.names), \
                "the batch wrote into freed memory"
            if res is not None:
                assert set(res["ret"][:n].tolist()) <= set(OK), "records missing from the returned array"
        else:
            mapped = {g for g, *_ in vm.sptes()}
            assert mapped <= set(range(n)), "the batch faulted gfns nobody asked for"
            assert res is None or mapped == set(range(n)), "the batch missed gfns it was asked for"
        h.check()
    isolated(scenario)


# ---------------------------------------------------------- hangs, silent wrong answers

@pytest.mark.parametrize("vm_type", [SW, TDX], ids=["sw_protected", "tdx"])
def test_item_8_prepare_return_values(vm_type):
    """True/1/1.0 are RET_PF_RETRY to the fault path (pre_fault_memory and a TDX private fault
    loop forever); 5 is RET_PF_FIXED with nothing mapped, and a guest write then lands on host
    pfn == gfn, another VM's private page."""
    def scenario():
        for value in (True, 1, 1.0, 5):
            h, victim, vf = guest(vm_type)
            vv = victim.create_vcpu(0)
            if vm_type == TDX:
                vv.tdx_accept(0)
            vv.write(0, b"victim", W)
            victim_pfn = vv.page_fault(0, W).pfn
            h.register_hooks(vm_type, gmem_prepare=lambda *a, value=value: value)
            vm = h.create_vm(vm_type)
            f = vm.create_guest_memfd(4 * MB)
            vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA + 8 * MB, f, 0)
            vm.set_memory_attributes(0, 4 * MB, PRIVATE)
            v = vm.create_vcpu(0)
            if vm_type == SW:
                try:
                    v.pre_fault_memory(0x1000, 4096)
                except REFUSED:
                    pass
            try:
                r = v.page_fault(0x5000, W)
            except REFUSED:
                pass
            else:
                assert r.ret < 0, f"prepare returned {value!r}, the fault gave {r}"
            try:
                v.write(victim_pfn << 12, b"attack", W)
            except REFUSED + (gmem.GuestExit,):
                pass
            h.register_hooks(vm_type, gmem_prepare=None)
            assert vv.read(0, 6, W) == b"victim"
            h.check()
    isolated(scenario, HANG)


def test_item_9_invalidation_on_every_call():
    """The kernel's kvm_tdp_map_page returns -EINTR on a pending signal; here the loop must
    end too: with OSError (EINTR) or partial progress."""
    def scenario():
        h, vm, f = guest(huge_folios=True)

        def invalidate(vm, pfn):
            vm.inject_invalidation(0, 4 * MB)
            return 1

        h.register_hooks(SW, private_max_mapping_level=invalidate)
        try:
            vm.create_vcpu(0).pre_fault_memory(0, 8192)
        except OSError as e:
            assert e.errno == errno.EINTR
        h.check()
    isolated(scenario, HANG)


@pytest.mark.parametrize("hook", ["is_private_fault", "gmem_prepare", "private_max_mapping_level"])
def test_item_10_failing_return_value_conversions(hook):
    def scenario():
        h, vm, f = guest(huge_folios=True)
        unraisable = []
        sys.unraisablehook = unraisable.append
        h.register_hooks(SW, **{hook: lambda *a: hc.RaisingEverything()})
        with pytest.raises((hc.Hostile, TypeError, ValueError)):    # its own error, or a refusal of it
            vm.create_vcpu(0).page_fault(0, W)
        assert not unraisable, f"{unraisable[0].exc_value!r} was printed as 'Exception ignored'"
        h.check()
    isolated(scenario)


# ------------------------------------------ state left behind by refused calls, misuse

@pytest.mark.parametrize("page_type", [1.0, np.float64(1), Fraction(1), np.bool_(True), np.int64(1)],
                         ids=["1.0", "np.float64", "Fraction", "np.bool_", "np.int64"])
def test_item_11_launch_update_page_type(page_type):
    def scenario():
        h, vm, f = guest(SNP, size=2 * MB)
        vm.snp_launch_start()
        h.mmap_user(HVA + 4 * MB, 4096)
        h.write_user(HVA + 4 * MB, b"kernel")
        try:
            vm.snp_launch_update(0, HVA + 4 * MB, 4096, page_type)
        except REFUSED:
            assert h.rmp.assigned() == [] and vm.launch_digest == b"", "a refused update left pages behind"
            assert vm.snp_launch_update(0, HVA + 4 * MB, 4096, 1) == (1, HVA + 4 * MB + 4096, 0)
        assert vm.launch_digest != b"" and len(h.rmp.assigned()) == 1
        h.check()
    isolated(scenario)


def test_item_12_vcpu_id_array_refused_whole():
    def scenario():
        h = gmem.Host(memory=16 * MB)
        vm = h.create_vm(SW)
        with pytest.raises(REFUSED):
            vm.page_fault_batch(np.zeros(3, np.uint64), np.zeros(3, np.uint64), np.array([0, 1, 5000], np.uint64))
        assert vm.vcpus == {}
    isolated(scenario)


def test_item_13_tdx_init_vm_from_a_hook():
    def scenario():
        h, vm, f = guest(TDX)

        def prepare(v, gfn, pfn, order):
            try:
                v.tdx_init_vm(52)
            except OSError:
                pass
            return 0

        h.register_hooks(TDX, gmem_prepare=prepare)
        try:
            vm.create_vcpu(0).tdx_accept(0x3000)
        except REFUSED + (gmem.GuestExit,):
            pass
        h.check()
        if vm.td_state == "initialized" and vm.nr_premapped == 0:
            vm.tdx_finalize_vm()
    isolated(scenario)


def test_item_14_link_between_snp_vms():
    def scenario():
        h, a, fa = guest(SNP, size=2 * MB)
        assert a.create_vcpu(0).page_fault(0x1000, ENC | W).ret in OK
        b = h.create_vm(SNP)
        try:
            fb = b.link_guest_memfd(fa)
        except OSError as e:
            assert e.errno == errno.EINVAL
            return
        b.set_user_memory_region2(0, GMEM, 0, 2 * MB, HVA, fb, 0)
        b.set_memory_attributes(0, 2 * MB, PRIVATE)
        r = b.create_vcpu(0).page_fault(0x1000, ENC | W)
        if r.ret in OK:
            assert h.rmp.lookup(r.pfn).asid == b.asid
        h.check()
    isolated(scenario)


@pytest.mark.parametrize("cls", ["GmemInode", "GmemFile", "Mapping"])
def test_item_15_internal_classes_are_not_constructible(cls):
    """A guest_memfd inode of 4097 bytes with every flag, a second struct file on a VM's inode,
    a 1 TiB mapping at offset 3 with prot 0xff: each was one call away. The inode and the file
    are C structs now, with no Python class; a Mapping comes only from GuestMemfd.mmap()."""
    def scenario():
        w = hc.world()
        if cls != "Mapping":
            assert not hasattr(core, cls), f"gmem._core.{cls} exists"
            return
        with pytest.raises(TypeError):
            type(w.m)(w.f, 1 << 40, 3, 0xFF)
        with pytest.raises(TypeError):
            type(w.m)()
        hc.check_world(w)
    isolated(scenario)


_PSC_CHANGES = {
    "emptied": lambda e: e.clear(),
    "key dropped": lambda e: e[1].pop("gfn"),
    "negative gfn": lambda e: e[1].__setitem__("gfn", -5),
    "2**80 gfn": lambda e: e[1].__setitem__("gfn", 1 << 80),
    "negative cur_page": lambda e: e[1].__setitem__("cur_page", -3),
}


@pytest.mark.parametrize("change", list(_PSC_CHANGES))
def test_item_16_psc_entries_changed_mid_request(change):
    """The next exit may only cover pages the request named (gfns 0x10 and 0x20), or the
    request ends with a PSC error code or a refusal; never IndexError/KeyError."""
    def scenario():
        h, vm, f = guest(SNP, size=2 * MB, private=False)
        vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        v = vm.create_vcpu(0)
        entries = [dict(gfn=0x10, operation=1), dict(gfn=0x20, operation=1)]
        assert isinstance(v.page_state_change(entries), gmem.HypercallExit)
        _PSC_CHANGES[change](entries)
        try:
            r = v.complete_hypercall(0)
        except REFUSED:
            return
        if isinstance(r, gmem.HypercallExit):
            gpa, npages, _ = r.args
            assert gpa >= 0 and gpa % 4096 == 0 and {(gpa >> 12) + i for i in range(npages)} <= {0x10, 0x20}, r
        else:
            assert r in (0, core.VMGEXIT_PSC_ERROR_INVALID_ENTRY, core.VMGEXIT_PSC_ERROR_INVALID_HDR)
        h.check()
    isolated(scenario)


# ------------------------------------------------------------------------ item 17

@pytest.mark.parametrize("args", [(1 << 40, 0, None, 0, 0), (0, -1, None, 0, 0), (0, 0, None, 256, 0),
                                  (0, 0, None, 0, 1 << 64), (0, 39, (1 << 64, 0, 0), 1, 0), (0, 39, (1, 2), 1, 0),
                                  (0, 39, (1, 2, 3, 4), 1, 0)])
def test_item_17_fault_result_out_of_range(args):
    """FaultResult(...) raised OverflowError from the C conversions."""
    with pytest.raises(ValueError):
        gmem.FaultResult(*args)


def test_item_17_empty_batch():
    h = gmem.Host(memory=16 * MB)
    out = h.create_vm(SW).page_fault_batch([], [])
    assert out.dtype == gmem.FAULT_DTYPE and out.shape == (0,)


@pytest.mark.parametrize("hva, n", [((1 << 64) - 4096, 8192), (0xFFFF800000000000, 8), (0x7FFFFFFFF000 - 4096, 8192)],
                         ids=["wraps", "kernel half", "crosses TASK_SIZE_MAX"])
def test_item_17_user_access_checks_the_whole_range(hva, n):
    """copy_{from,to}_user: access_ok(hva, n) refuses the whole access (EFAULT) before a byte moves."""
    h = gmem.Host(memory=16 * MB)
    before = h.stats
    with pytest.raises(OSError) as e:
        h.read_user(hva, n)
    assert e.value.errno == errno.EFAULT
    with pytest.raises(OSError) as e:
        h.write_user(hva, b"z" * n)
    assert e.value.errno == errno.EFAULT and h.stats == before


def test_item_17_split_that_cannot_fit():
    """XArray.split(0, 0) of an order-63 entry tried to build 2**63 entries, taking all memory
    first: now MemoryError before a node is allocated, the entry intact."""
    def scenario():
        import resource
        x = gmem.XArray()
        x.store(0, 5, order=63)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(MemoryError):
            x.split(0, 0)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10    # KiB
        assert list(x.items()) == [(0, 63, 5)] and x.nr_nodes <= 1
        x.split(0, 57)                      # 64 pieces fit
        assert len(x) == 64
        x.check()
    isolated(scenario)


@pytest.mark.parametrize("case", ["twice in one call", "freed before", "never allocated", "holds a folio"])
def test_item_17_free_many_refuses_double_frees(case):
    """PhysMem.free_many freed whatever it was given: a block twice in one array, or a block
    already free, corrupted the free lists.  Now every block is checked first, and a refused
    call frees nothing."""
    pm = gmem.PhysMem(16 * MB)
    blocks = pm.alloc_many(8, 1)
    folio = pm.folio_alloc(1)
    pm.free_many(blocks[6:], 1)
    bad = {"twice in one call": np.array([blocks[0], blocks[1], blocks[0]]),
           "freed before": blocks[5:7], "never allocated": np.array([blocks[0], blocks.max() + 64]),
           "holds a folio": np.array([blocks[0], folio], np.uint64)}[case]
    before = (pm.free_blocks(), pm.nr_free_pages)
    with pytest.raises(OSError) as e:
        pm.free_many(bad, 1)
    assert e.value.errno == errno.EINVAL and (pm.free_blocks(), pm.nr_free_pages) == before
    pm.check()
    pm.free_many(blocks[:6], 1)
    pm.check()
