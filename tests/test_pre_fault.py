"""KVM_PRE_FAULT_MEMORY: vcpu.pre_fault_memory(gpa, size, flags).

The kernel's path: kvm_vcpu_pre_fault_memory (virt/kvm/kvm_main.c: flags, alignment, the loop
and its partial-progress rule) -> kvm_arch_vcpu_pre_fault_memory (arch/x86/kvm/mmu/mmu.c:
pre_fault_allowed, the TDX alias, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS iff the
attributes say private, the mapping's size) -> kvm_tdp_map_page (kvm_mmu_do_page_fault again
while RET_PF_RETRY; RET_PF_EMULATE -> ENOENT). kvm_mmu_do_page_fault counts no pf_* stat since
6.11 ("KVM_PRE_FAULT_MEMORY won't bump _any_ stats"), so none moves here.

Parts: tools/testing/selftests/kvm/pre_fault_memory_test.c re-expressed (its racing memslot
deletion becomes a deletion between calls), one test per rule, SNP and TDX before and after their
launch, a Hypothesis comparison with the vCPU's own faults on a twin host, and the real kernel.
Every model scenario ends with host.check().
"""
import ctypes
import errno
import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gmem
from gmem import kernel
from gmem import uapi as U

PAGE = 4096
M = 1 << 20
SZ_2M = 2 * M
TEST_SIZE = SZ_2M + PAGE                         # pre_fault_memory_test.c
TEST_NPAGES = TEST_SIZE // PAGE
TEST_SLOT = 10
BASE = ((1 << 36) - TEST_SIZE) & ~(SZ_2M - 1)    # the top of a 36-bit guest, 2M aligned
HVA = 0x7F0000000000
GMEM, PRIVATE = U.KVM_MEM_GUEST_MEMFD, U.KVM_MEMORY_ATTRIBUTE_PRIVATE
DEFAULT, SW, SNP, TDX = U.KVM_X86_DEFAULT_VM, U.KVM_X86_SW_PROTECTED_VM, U.KVM_X86_SNP_VM, U.KVM_X86_TDX_VM
PF_STATS = ("pf_taken", "pf_fixed", "pf_spurious", "pf_emulate", "pf_fast", "pf_retry")
NO_FAULTS = dict.fromkeys(PF_STATS, 0)


def errno_of(fn, *args, **kwargs):
    """The errno a call fails with (the test fails if it succeeds)."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def pf_stats(vcpu):
    return {k: vcpu.stats[k] for k in PF_STATS}


def sptes(vm):
    """{gfn: (level, writable, private)} of every SPTE."""
    return {gfn: (level, w, p) for gfn, level, pfn, w, p in vm.sptes()}


def selftest_vm(vm_type, private, huge_folios=False, platform="amd"):
    """__test_pre_fault_memory: slot 10 of TEST_SIZE at BASE, a guest_memfd one if private,
    the whole slot private if private."""
    host = gmem.Host(memory=256 * M, platform=platform, huge_folios=huge_folios)
    vm = host.create_vm(vm_type)
    f = vm.create_guest_memfd(TEST_SIZE) if private else -1
    vm.set_user_memory_region2(TEST_SLOT, GMEM if private else 0, BASE, TEST_SIZE,
                               userspace_addr=HVA, guest_memfd=f)
    if private:
        vm.set_memory_attributes(BASE, TEST_SIZE, PRIVATE)
    return host, vm, vm.create_vcpu(0)


def pre_fault_memory(vcpu, base_gpa, offset, size, expected_left):
    """The selftest's pre_fault_memory() less the racing thread: call until nothing is left or
    a call fails; every call either shrinks range.size or fails, never both; a range that is not
    all done ends in ENOENT (RET_PF_EMULATE: no memslot)."""
    gpa, left, err = base_gpa + offset, size, None
    while left and err is None:
        prev = left
        try:
            gpa, left = vcpu.pre_fault_memory(gpa, left)
            assert left < prev, "expecting range.size to change on success"
        except OSError as e:
            err = e.errno
    assert left == expected_left
    assert err == (errno.ENOENT if expected_left else None)
    return gpa, left


# ----------------------------------------------------------- pre_fault_memory_test.c

@pytest.mark.parametrize("vm_type,private", [(DEFAULT, False), (SW, False), (SW, True)],
                         ids=["default", "sw-shared", "sw-private"])
@pytest.mark.parametrize("huge", [False, True], ids=["4k-folios", "2m-folios"])
def test_pre_fault_memory_selftest(vm_type, private, huge):
    host, vm, vcpu = selftest_vm(vm_type, private, huge)
    assert host.check_extension(U.KVM_CAP_PRE_FAULT_MEMORY) == 1
    assert pre_fault_memory(vcpu, BASE, 0, SZ_2M, 0) == (BASE + SZ_2M, 0)
    assert pre_fault_memory(vcpu, BASE, SZ_2M, 2 * PAGE, PAGE) == (BASE + TEST_SIZE, PAGE)
    assert pre_fault_memory(vcpu, BASE, TEST_SIZE, PAGE, PAGE) == (BASE + TEST_SIZE, PAGE)
    # every page of the slot is mapped, private iff the attributes say so; a 2M folio of
    # guest_memfd gives a 2M mapping (the VMM's memory is in 4K pages)
    base = BASE >> 12
    if huge and private:
        expect = {base: (U.PG_LEVEL_2M, True, True), base + 512: (U.PG_LEVEL_4K, True, True)}
    else:
        expect = {base + i: (U.PG_LEVEL_4K, True, private) for i in range(TEST_NPAGES)}
    assert sptes(vm) == expect
    assert vm.stats["pages_2m"] == (1 if huge and private else 0)
    assert pf_stats(vcpu) == NO_FAULTS
    # the guest reads every page (guest_code): each one is already mapped
    for i in range(TEST_NPAGES):
        vcpu.read(BASE + i * PAGE, 8)
    assert pf_stats(vcpu) == dict(NO_FAULTS, pf_taken=TEST_NPAGES, pf_spurious=TEST_NPAGES)
    assert sptes(vm) == expect
    host.check()


@pytest.mark.parametrize("private", [False, True], ids=["shared", "private"])
def test_memslot_deleted_and_recreated_between_calls(private):
    """The selftest's delete_slot_worker, serialised: with the slot gone the range is MMIO
    (ENOENT) when shared and a memory-fault exit (EFAULT) when private; recreated, it maps."""
    host, vm, vcpu = selftest_vm(SW, private)
    vm.set_user_memory_region2(TEST_SLOT, GMEM if private else 0, BASE, 0, userspace_addr=HVA)
    assert errno_of(vcpu.pre_fault_memory, BASE, SZ_2M) == (errno.EFAULT if private else errno.ENOENT)
    assert sptes(vm) == {}
    f = vm.create_guest_memfd(TEST_SIZE) if private else -1
    vm.set_user_memory_region2(TEST_SLOT, GMEM if private else 0, BASE, TEST_SIZE,
                               userspace_addr=HVA, guest_memfd=f)
    assert vcpu.pre_fault_memory(BASE, SZ_2M) == (BASE + SZ_2M, 0)
    assert len(sptes(vm)) == 512
    host.check()


# ------------------------------------------------------------- kvm_vcpu_pre_fault_memory

@pytest.mark.parametrize("gpa,size,flags", [
    (BASE, PAGE, 1),                       # flags != 0
    (BASE, PAGE, 1 << 63),
    (BASE + 1, PAGE, 0),                   # !PAGE_ALIGNED(gpa)
    (BASE, PAGE + 1, 0),                   # !PAGE_ALIGNED(size)
    (BASE, 0, 0),                          # gpa + size <= gpa: size 0
    (2**64 - PAGE, PAGE, 0),               # ... wraps to 0
    (2**64 - PAGE, 2 * PAGE, 0),           # ... wraps past 0
    (-PAGE, PAGE, 0),                      # __u64 fields: -4096 is 2**64 - 4096
    (BASE + 1, 0, 1),
])
def test_argument_checks(gpa, size, flags):
    host, vm, vcpu = selftest_vm(SW, True)
    assert errno_of(vcpu.pre_fault_memory, gpa, size, flags) == errno.EINVAL
    assert sptes(vm) == {} and pf_stats(vcpu) == NO_FAULTS
    host.check()


def test_argument_checks_come_before_pre_fault_allowed():
    """kvm_vcpu_pre_fault_memory checks its arguments before the arch says EOPNOTSUPP."""
    host = gmem.Host(memory=64 * M, platform="amd")
    vcpu = host.create_vm(SNP).create_vcpu(0)
    assert errno_of(vcpu.pre_fault_memory, 0, PAGE, 1) == errno.EINVAL
    assert errno_of(vcpu.pre_fault_memory, 0, 0) == errno.EINVAL
    assert errno_of(vcpu.pre_fault_memory, 0, PAGE) == errno.EOPNOTSUPP
    host.check()


def test_argument_types():
    host, vm, vcpu = selftest_vm(SW, True)
    with pytest.raises(TypeError):
        vcpu.pre_fault_memory(float(BASE), PAGE)
    with pytest.raises(ValueError):
        vcpu.pre_fault_memory(BASE, 1 << 64)
    host.check()


def test_closed_vm_fd():
    host, vm, vcpu = selftest_vm(SW, True)
    vm.close()
    assert errno_of(vcpu.pre_fault_memory, BASE, PAGE) == errno.EBADF
    host.check()


def test_partial_progress_is_success_then_the_error():
    """Return success if at least one page was mapped: range says where it stopped, and the
    next call from there fails with nothing changed."""
    host, vm, vcpu = selftest_vm(DEFAULT, False)
    end = BASE + TEST_SIZE
    assert vcpu.pre_fault_memory(end - 2 * PAGE, 4 * PAGE) == (end, 2 * PAGE)
    assert errno_of(vcpu.pre_fault_memory, end, 2 * PAGE) == errno.ENOENT
    assert set(sptes(vm)) == {(end >> 12) - 2, (end >> 12) - 1}
    host.check()


def test_private_gfn_without_a_memslot_is_efault():
    """A private gfn past the slot: kvm_mmu_faultin_pfn's no-slot private fault is a
    memory-fault exit, so EFAULT -- after the slot's last page was done."""
    host, vm, vcpu = selftest_vm(SW, True)
    end = BASE + TEST_SIZE
    vm.set_memory_attributes(end, PAGE, PRIVATE)
    assert vcpu.pre_fault_memory(end - PAGE, 2 * PAGE) == (end, PAGE)
    assert errno_of(vcpu.pre_fault_memory, end, PAGE) == errno.EFAULT
    host.check()


# ------------------------------------------------------- kvm_arch_vcpu_pre_fault_memory

def test_attributes_decide_private():
    """PFERR_PRIVATE_ACCESS iff kvm_mem_is_private: private pages come from guest_memfd,
    shared ones from the VMM's memory, in one call."""
    host, vm, vcpu = selftest_vm(SW, True)
    vm.set_memory_attributes(BASE + 4 * PAGE, 4 * PAGE, 0)
    assert vcpu.pre_fault_memory(BASE, 16 * PAGE) == (BASE + 16 * PAGE, 0)
    b = BASE >> 12
    assert sptes(vm) == {b + i: (U.PG_LEVEL_4K, True, not 4 <= i < 8) for i in range(16)}
    host.check()


def test_private_gfn_in_a_slot_without_guest_memfd_is_efault():
    """kvm_mmu_faultin_pfn_gmem: a private fault needs a guest_memfd slot."""
    host, vm, vcpu = selftest_vm(SW, False)
    vm.set_memory_attributes(BASE, PAGE, PRIVATE)
    assert errno_of(vcpu.pre_fault_memory, BASE, 2 * PAGE) == errno.EFAULT
    assert vcpu.pre_fault_memory(BASE + PAGE, PAGE) == (BASE + 2 * PAGE, 0)
    assert sptes(vm) == {(BASE >> 12) + 1: (U.PG_LEVEL_4K, True, False)}
    host.check()


def test_the_error_code_has_no_write_bit():
    """The kernel pre-faults with PFERR_GUEST_FINAL_MASK alone: a KVM_MEM_READONLY slot maps
    read-only, where a guest write would be emulated."""
    host = gmem.Host(memory=64 * M, platform="amd")
    vm = host.create_vm(DEFAULT)
    vm.set_user_memory_region2(0, U.KVM_MEM_READONLY, 0, 2 * M, userspace_addr=HVA)
    vcpu = vm.create_vcpu(0)
    assert vcpu.page_fault(PAGE, U.PFERR_WRITE_MASK).ret == U.RET_PF_EMULATE
    assert vcpu.pre_fault_memory(0, 2 * PAGE) == (2 * PAGE, 0)
    assert sptes(vm) == {0: (U.PG_LEVEL_4K, False, False), 1: (U.PG_LEVEL_4K, False, False)}
    host.check()


def test_a_huge_mapping_is_clamped_to_the_range():
    """The size covered is from gpa to the end of the mapping, at most range.size."""
    host = gmem.Host(memory=256 * M, platform="amd", huge_folios=True)
    vm = host.create_vm(SW)
    f = vm.create_guest_memfd(4 * M)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * M, userspace_addr=HVA, guest_memfd=f)
    vm.set_memory_attributes(0, 4 * M, PRIVATE)
    vcpu = vm.create_vcpu(0)
    assert vcpu.pre_fault_memory(PAGE, PAGE) == (2 * PAGE, 0)
    assert sptes(vm) == {0: (U.PG_LEVEL_2M, True, True)}
    host.trace.enable("spte_install")
    assert vcpu.pre_fault_memory(PAGE, 4 * M - PAGE) == (4 * M, 0)
    # two steps: the 2M mapping already there (RET_PF_SPURIOUS), then the next 2M
    assert list(host.trace.to_numpy()["a"]) == [512]
    assert sptes(vm) == {0: (U.PG_LEVEL_2M, True, True), 512: (U.PG_LEVEL_2M, True, True)}
    assert pf_stats(vcpu) == NO_FAULTS
    host.check()


# -------------------------------------------------------------------- kvm_tdp_map_page

def test_mapped_pages_are_spurious_and_nothing_is_counted():
    host, vm, vcpu = selftest_vm(SW, True)
    assert vcpu.page_fault(BASE, U.PFERR_WRITE_MASK).ret == U.RET_PF_FIXED
    before = sptes(vm)
    assert vcpu.pre_fault_memory(BASE, PAGE) == (BASE + PAGE, 0)
    assert vcpu.pre_fault_memory(BASE, 2 * PAGE) == (BASE + 2 * PAGE, 0)
    assert vcpu.pre_fault_memory(BASE, 2 * PAGE) == (BASE + 2 * PAGE, 0)
    assert set(sptes(vm)) == set(before) | {(BASE >> 12) + 1}
    assert pf_stats(vcpu) == dict(NO_FAULTS, pf_taken=1, pf_fixed=1)
    host.check()


def test_retry_after_an_invalidation_is_inside_the_ioctl():
    """An invalidation between the pfn lookup and the map makes the fault RET_PF_RETRY:
    kvm_tdp_map_page faults again itself (the vCPU path returns it to the guest)."""
    host, vm, vcpu = selftest_vm(SW, True)
    vm.inject_invalidation(BASE, PAGE)
    assert vcpu.page_fault(BASE, 0).ret == U.RET_PF_RETRY
    assert vcpu.stats["pf_retry"] == 1 and sptes(vm) == {}
    vm.inject_invalidation(BASE + PAGE, PAGE)
    invalidations = vm.stats["mmu_invalidations"]
    assert vcpu.pre_fault_memory(BASE + PAGE, PAGE) == (BASE + 2 * PAGE, 0)
    assert vm.stats["mmu_invalidations"] == invalidations + 1
    assert sptes(vm) == {(BASE >> 12) + 1: (U.PG_LEVEL_4K, True, True)}
    assert vcpu.stats["pf_retry"] == 1
    host.check()


def test_gmem_errors_come_back_as_their_errno():
    """kvm_gmem_get_pfn's error becomes the memory-fault exit's, and the ioctl's errno."""
    host, vm, vcpu = selftest_vm(SW, True)
    with host.inject(alloc_failures=1):
        assert errno_of(vcpu.pre_fault_memory, BASE, 2 * PAGE) == errno.ENOMEM
    assert sptes(vm) == {}
    assert vcpu.pre_fault_memory(BASE, 2 * PAGE) == (BASE + 2 * PAGE, 0)
    pfn = {gfn: pfn for gfn, level, pfn, w, p in vm.sptes()}[BASE >> 12]
    assert host.memory_failure(pfn)
    assert set(sptes(vm)) == {(BASE >> 12) + 1}
    assert errno_of(vcpu.pre_fault_memory, BASE, 2 * PAGE) == U.EHWPOISON
    host.check()


def test_a_failing_python_hook_is_raised():
    host, vm, vcpu = selftest_vm(SW, True)

    def gmem_prepare(vm, gfn, pfn, order):
        raise RuntimeError("prepare hook")

    host.register_hooks(SW, gmem_prepare=gmem_prepare)
    with pytest.raises(RuntimeError, match="prepare hook"):
        vcpu.pre_fault_memory(BASE, 4 * PAGE)
    assert sptes(vm) == {}
    host.register_hooks(SW, gmem_prepare=None)
    assert vcpu.pre_fault_memory(BASE, 4 * PAGE) == (BASE + 4 * PAGE, 0)
    host.check()


# ---------------------------------------------------------------------- SEV-SNP, TDX

def gmem_vm(vm_type, platform="amd", size=4 * M, private=2 * M, init=lambda vm: None):
    """A VM with one guest_memfd memslot of size at gpa 0, its first private bytes private
    (init runs before the memslot: TDX's INIT_VM): host, vm, vcpu 0, the guest_memfd."""
    host = gmem.Host(memory=256 * M, platform=platform)
    vm = host.create_vm(vm_type)
    init(vm)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, GMEM, 0, size, userspace_addr=HVA, guest_memfd=f)
    vm.set_memory_attributes(0, private, PRIVATE)
    vcpu = vm.create_vcpu(0)
    if vm_type == TDX and vm.td_state == "initialized":
        vcpu.tdx_init_vcpu()                # runs once the test finalizes the TD
    return host, vm, vcpu, f


def snp_vm():
    return gmem_vm(SNP)[:3]


def test_snp_refuses_until_launch_finish():
    """pre_fault_allowed = !has_private_mem (svm_vm_init), true at SNP_LAUNCH_FINISH."""
    host, vm, vcpu = snp_vm()
    assert errno_of(vcpu.pre_fault_memory, 0, PAGE) == errno.EOPNOTSUPP
    vm.snp_launch_start()
    assert errno_of(vcpu.pre_fault_memory, 0, PAGE) == errno.EOPNOTSUPP
    assert errno_of(vcpu.pre_fault_memory, 2 * M, PAGE) == errno.EOPNOTSUPP
    assert sptes(vm) == {} and host.rmp.assigned() == []
    host.check()
    vm.snp_launch_finish()
    assert vcpu.pre_fault_memory(0, 2 * PAGE) == (2 * PAGE, 0)
    assert vcpu.pre_fault_memory(2 * M, PAGE) == (2 * M + PAGE, 0)
    # the private pages went through sev_gmem_prepare: assigned to the guest, not validated
    pfns = {gfn: pfn for gfn, level, pfn, w, p in vm.sptes()}
    assert sptes(vm) == {0: (1, True, True), 1: (1, True, True), 512: (1, True, False)}
    for gfn in (0, 1):
        assert host.rmp.lookup(pfns[gfn]) == gmem.RmpEntry(True, 0, False, False, vm.asid, gfn << 12, False)
    assert not host.rmp.lookup(pfns[512]).assigned
    assert pf_stats(vcpu) == NO_FAULTS
    host.check()


@pytest.mark.parametrize("vm_type", [U.KVM_X86_SEV_VM, U.KVM_X86_SEV_ES_VM])
def test_sev_without_private_memory_may_pre_fault(vm_type):
    host = gmem.Host(memory=64 * M, platform="amd")
    vm = host.create_vm(vm_type)
    vm.set_user_memory_region2(0, 0, 0, 2 * M, userspace_addr=HVA)
    assert vm.create_vcpu(0).pre_fault_memory(0, PAGE) == (PAGE, 0)
    host.check()


def tdx_vm():
    return gmem_vm(TDX, platform="intel", init=lambda vm: vm.tdx_init_vm(52))[:3]


def test_tdx_refuses_until_finalize():
    host, vm, vcpu = tdx_vm()
    assert errno_of(vcpu.pre_fault_memory, 0, PAGE) == errno.EOPNOTSUPP
    # pre_fault_allowed comes before the alias check
    assert errno_of(vcpu.pre_fault_memory, vm.shared_gpa_bit, PAGE) == errno.EOPNOTSUPP
    assert vm.sept() == {} and vm.nr_premapped == 0
    vm.tdx_finalize_vm()
    # private: a mirror leaf, AUGed and pending until the guest accepts it
    assert vcpu.pre_fault_memory(0, 2 * PAGE) == (2 * PAGE, 0)
    assert {gfn: s for gfn, (pfn, s) in vm.sept().items()} == {0: "pending", 1: "pending"}
    assert vm.tdx_stats["aug"] == 2
    # shared: through the shared alias, outside the S-EPT; the alias itself is refused
    assert vcpu.pre_fault_memory(2 * M, PAGE) == (2 * M + PAGE, 0)
    assert sptes(vm) == {0: (1, True, True), 1: (1, True, True), 512: (1, True, False)}
    assert set(vm.sept()) == {0, 1}
    assert errno_of(vcpu.pre_fault_memory, vm.shared_gpa_bit | 2 * M, PAGE) == errno.EINVAL
    assert vcpu.tdx_accept(0) == U.TDX_SUCCESS
    assert pf_stats(vcpu) == NO_FAULTS
    host.check()


def test_tdx_range_into_the_alias_stops_there():
    """Only range.gpa is checked: a range running into the shared alias is done up to it,
    and the next call is refused (Paolo Bonzini on the 6.16 patch)."""
    host = gmem.Host(memory=64 * M, platform="intel")
    vm = host.create_vm(TDX)
    vm.tdx_init_vm(48)
    top = vm.shared_gpa_bit - PAGE
    vm.set_user_memory_region2(0, 0, top, PAGE, userspace_addr=HVA)
    vcpu = vm.create_vcpu(0)
    vcpu.tdx_init_vcpu()
    vm.tdx_finalize_vm()
    assert vcpu.pre_fault_memory(top, 2 * PAGE) == (vm.shared_gpa_bit, PAGE)
    assert errno_of(vcpu.pre_fault_memory, vm.shared_gpa_bit, PAGE) == errno.EINVAL
    host.check()


# ---------------------------------------------------- the vCPU's own faults, on a twin host

def twin_hosts(huge):
    """Two identical hosts with an SW_PROTECTED VM: slot 0 of 4M (guest_memfd) at 0 and slot 1
    of 2M (the VMM's memory) at 8M."""
    out = []
    for _ in range(2):
        host = gmem.Host(memory=256 * M, platform="amd", huge_folios=huge)
        vm = host.create_vm(SW)
        f = vm.create_guest_memfd(4 * M)
        vm.set_user_memory_region2(0, GMEM, 0, 4 * M, userspace_addr=HVA, guest_memfd=f)
        vm.set_user_memory_region2(1, 0, 8 * M, 2 * M, userspace_addr=HVA + 8 * M)
        out.append((host, vm, vm.create_vcpu(0)))
    return out


@given(huge=st.booleans(),
       private=st.lists(st.one_of(st.tuples(st.integers(0, 2047), st.integers(1, 600)),
                                  st.tuples(st.sampled_from([0, 512, 1024, 1536]), st.sampled_from([512, 1024]))),
                        max_size=4),
       ranges=st.lists(st.tuples(st.integers(0, 2600), st.integers(1, 1200)), min_size=1, max_size=4))
def test_same_mappings_as_the_vcpu_faulting_page_by_page(huge, private, ranges):
    """pre_fault_memory(gpa, size) leaves the SPTEs the vCPU's faults leave when it touches
    the same pages in order (SW_PROTECTED: the attributes decide private either way) and stops
    where they first fail; only the faults count in pf_*."""
    (h1, vm1, v1), (h2, vm2, v2) = twin_hosts(huge)
    for first, n in private:
        for vm in (vm1, vm2):
            vm.set_memory_attributes(first * PAGE, n * PAGE, PRIVATE)
    for first, n in ranges:
        gpa, size = first * PAGE, n * PAGE
        try:
            got = v1.pre_fault_memory(gpa, size)
        except OSError as e:
            got = e.errno
        done = 0
        while done < size:
            r = v2.page_fault(gpa + done, U.PFERR_GUEST_FINAL_MASK)
            if r.ret not in (U.RET_PF_FIXED, U.RET_PF_SPURIOUS):
                break
            done += PAGE
        if done == 0:
            assert got == (errno.ENOENT if r.ret == U.RET_PF_EMULATE else -r.ret)
        else:
            assert got == (gpa + done, size - done)
        assert vm1.sptes() == vm2.sptes()
    assert pf_stats(v1) == NO_FAULTS
    h1.check()
    h2.check()


# --------------------------------------------------------------------------- real kernel

requires_kvm = pytest.mark.skipif(not kernel.available(),
                                  reason="needs /dev/kvm with guest_memfd (KVM_CAP_GUEST_MEMFD)")


@pytest.fixture(params=["model", "kernel"])
def backend(request):
    if request.param == "model":
        yield gmem.Host(memory=64 * M, platform="none", sw_protected=False, memory_attributes=False)
        return
    if not kernel.available():
        pytest.skip("needs /dev/kvm with guest_memfd (KVM_CAP_GUEST_MEMFD)")
    with kernel.Host() as host:
        yield host


@pytest.mark.parametrize("gpa,size,flags", [(0, PAGE, 1), (1, PAGE, 0), (0, PAGE + 1, 0), (0, 0, 0),
                                            (-PAGE, PAGE, 0), (-PAGE, 2 * PAGE, 0)])
def test_argument_checks_model_and_kernel(backend, gpa, size, flags):
    """kvm_vcpu_pre_fault_memory's checks run before anything that needs TDP: the model and
    this machine's kernel agree on them."""
    vm = backend.create_vm(DEFAULT)
    try:
        assert errno_of(vm.create_vcpu(0).pre_fault_memory, gpa, size, flags) == errno.EINVAL
    finally:
        vm.close()


@requires_kvm
def test_real_kernel_without_tdp_refuses():
    """KVM_CAP_PRE_FAULT_MEMORY is tdp_enabled. Without TDP, kvm_tdp_map_page refuses
    (EOPNOTSUPP: the MMU is not indexed by GPA) -- once kvm_mmu_reload has built the shadow
    root, which needs MMU pages: a VM that never had a memslot has none (ENOSPC from
    make_mmu_pages_available; seen on 6.18.44)."""
    with kernel.Host() as host:
        if host.check_extension(U.KVM_CAP_PRE_FAULT_MEMORY):
            pytest.skip("this host has TDP, so KVM_PRE_FAULT_MEMORY maps: the model's tests cover that")
        with mmap.mmap(-1, SZ_2M) as buf, host.create_vm(DEFAULT) as vm:
            vcpu = vm.create_vcpu(0)
            assert errno_of(vcpu.pre_fault_memory, 0, PAGE) == errno.ENOSPC
            cbuf = ctypes.c_char.from_buffer(buf)
            vm.set_user_memory_region2(0, 0, 0, SZ_2M, userspace_addr=ctypes.addressof(cbuf))
            assert errno_of(vcpu.pre_fault_memory, 0, PAGE) == errno.EOPNOTSUPP
            assert errno_of(vcpu.pre_fault_memory, SZ_2M, PAGE) == errno.EOPNOTSUPP
            assert errno_of(vcpu.pre_fault_memory, 0, PAGE, 1) == errno.EINVAL
            vcpu.close()
            vm.close()
            del cbuf


def test_pre_fault_from_an_invalidate_hook_is_interrupted():
    """A hook inside a punch's invalidation pre-faults the range being invalidated: the
    retry could only end when the punch does, so it ends with EINTR (the kernel's task
    would see a signal) instead of spinning; the punch then completes."""
    host, vm, vcpu, f = gmem_vm(SW, size=SZ_2M, private=SZ_2M)
    vcpu.page_fault(0, U.PFERR_WRITE_MASK)
    seen = []

    def invalidate(h, start, end):
        try:
            vcpu.pre_fault_memory(0, 4096)
        except OSError as e:
            seen.append(e.errno)

    host.register_hooks(SW, gmem_invalidate=invalidate)
    f.punch_hole(0, PAGE)
    assert seen == [errno.EINTR]
    assert vm.sptes() == [] and host.stats["folios"] == 0
    host.check()
