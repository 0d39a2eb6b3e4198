"""Kernel versions as an axis: gmem.Host(kernel=...) switches the rules that differ between the
2023 RFC, 6.18, 7.2 and kvm-x86's queue ("next"), each from the kernel function named beside
it; the rules that did not change hold under every version."""
import errno

import pytest

import gmem
from gmem import uapi as u

KERNELS = ("rfc-2023", "6.18", "7.2", "next")
GMEM = u.KVM_MEM_GUEST_MEMFD
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ENC_W = u.PFERR_GUEST_ENC_MASK | u.PFERR_WRITE_MASK
HVA = 0x7F0000000000
SRC = 0x7E0000000000
PS = 4096


def errno_of(fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def test_the_default_is_the_latest_stable(monkeypatch):
    monkeypatch.delenv("GMEM_KERNEL", raising=False)
    assert gmem.Host(memory=64 << 20).kernel == "7.2"
    monkeypatch.setenv("GMEM_KERNEL", "6.18")              # a whole run under another version
    assert gmem.Host(memory=64 << 20).kernel == "6.18"
    monkeypatch.setenv("GMEM_KERNEL", "6.1")
    with pytest.raises(ValueError, match="GMEM_KERNEL"):
        gmem.Host(memory=64 << 20)
    monkeypatch.delenv("GMEM_KERNEL")
    for k in KERNELS:
        assert gmem.Host(memory=64 << 20, kernel=k).kernel == k
    with pytest.raises(ValueError, match="kernel must be one of"):
        gmem.Host(memory=64 << 20, kernel="6.1")


@pytest.mark.parametrize("kernel,prepare,tracking", [("rfc-2023", "alloc", "arch"), ("6.18", "fault", "gmem"),
                                                     ("7.2", "fault", "arch"), ("next", "fault", "arch")])
def test_bundle_policies_and_overrides(kernel, prepare, tracking):
    """The RFC prepares at every folio lookup and leaves "prepared" to the arch; 6.18 prepares at
    the first kvm_gmem_get_pfn and tracks it in gmem (uptodate); 7.0 moved SNP's tracking into
    the RMP (sev_gmem_prepare on every get_pfn). A policy keyword overrides the bundle."""
    o = gmem.Host(memory=64 << 20, kernel=kernel).options
    assert (o["prepare"], o["prepared_tracking"]) == (prepare, tracking)
    o = gmem.Host(memory=64 << 20, kernel=kernel, prepare="alloc", prepared_tracking="gmem").options
    assert (o["prepare"], o["prepared_tracking"]) == ("alloc", "gmem")


@pytest.mark.parametrize("kernel", KERNELS)
def test_bind_overlap(kernel):
    """kvm_gmem_bind: a guest_memfd range bound to another memslot is -EINVAL in the RFC and
    6.18, -EEXIST since 7.2 ("KVM guest_memfd changes for 7.2")."""
    h = gmem.Host(memory=64 << 20, platform="none", kernel=kernel)
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(8 * PS)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * PS, HVA, f, 0)
    want = errno.EEXIST if kernel in ("7.2", "next") else errno.EINVAL
    assert errno_of(vm.set_user_memory_region2, 1, GMEM, 1 << 30, 4 * PS, HVA, f, 2 * PS) == want
    assert len(vm.memslots()) == 1                       # nothing bound by the refusal
    h.check()


def snp_launching(kernel, **kw):
    h = gmem.Host(memory=64 << 20, platform="amd", kernel=kernel, **kw)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(2 << 20)
    vm.set_user_memory_region2(0, GMEM, 0, 2 << 20, HVA, f, 0)
    vm.set_memory_attributes(0, 2 << 20, PRIVATE)
    v = vm.create_vcpu(0)
    h.mmap_user(SRC, 4 * PS)
    h.write_user(SRC, bytes(range(256)) * 16)
    h.write_user(SRC + PS, b"\xAA" * PS)
    vm.snp_launch_start()
    return h, vm, f, v


@pytest.mark.parametrize("kernel", ["6.18", "7.2"])
def test_snp_launch_update_source_alignment(kernel):
    """snp_launch_update: 7.0 "retroactively documents and enforces" a page-aligned uaddr
    (EINVAL); 6.18 copies the page from any alignment (straddling two source pages)."""
    h, vm, f, v = snp_launching(kernel)
    if kernel == "7.2":
        assert errno_of(vm.snp_launch_update, 0x10, SRC + 0x800, PS, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL) == errno.EINVAL
        assert h.rmp.assigned() == []
        return
    assert vm.snp_launch_update(0x10, SRC + 0x800, PS, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL) == (0x11, SRC + 0x1800, 0)
    vm.snp_launch_finish()
    want = (bytes(range(256)) * 16)[0x800:] + b"\xAA" * 0x800
    assert v.read(0x10000, PS, u.PFERR_GUEST_ENC_MASK) == want
    h.check()


@pytest.mark.parametrize("kernel", ["6.18", "7.2"])
def test_snp_launch_update_pins_the_source_before_the_folio(kernel):
    """An unmapped source: kvm_gmem_populate's -EFAULT, which the ioctl reports as EIO either
    way; 7.0+ pins it (get_user_pages_fast) before kvm_gmem_populate gets a folio, 6.18 finds
    it only in the copy, the folio allocated."""
    h, vm, f, v = snp_launching(kernel)
    assert errno_of(vm.snp_launch_update, 0x10, SRC + 64 * PS, PS, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL) == errno.EIO
    assert h.rmp.assigned() == [] and len(f.folios()) == (0 if kernel == "7.2" else 1)
    h.check()


@pytest.mark.parametrize("kernel", ["6.18", "7.2", "next"])
def test_snp_launch_update_without_source(kernel):
    """uaddr 0 with a type other than ZERO: sev_gmem_post_populate's WARN_ON_ONCE -EINVAL,
    reported by the ioctl as -EIO with the cause; nothing is assigned."""
    h, vm, f, v = snp_launching(kernel)
    with pytest.raises(OSError, match="EINVAL") as e:
        vm.snp_launch_update(0x10, 0, PS, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert e.value.errno == errno.EIO and h.rmp.assigned() == []
    assert vm.snp_launch_update(0x10, 0, PS, u.KVM_SEV_SNP_PAGE_TYPE_ZERO) == (0x11, 0, 0)
    h.check()


@pytest.mark.parametrize("kernel", KERNELS[1:])         # (the RFC's base has no TDX, no pre-fault)
def test_rules_that_did_not_change(kernel):
    """The same answer under every version: a TD takes vCPUs only while being built, no SNP
    vCPU runs before LAUNCH_FINISH, pre-faulting waits for the launch."""
    h = gmem.Host(memory=64 << 20, platform="intel", kernel=kernel)
    td = h.create_vm(u.KVM_X86_TDX_VM)
    assert errno_of(td.create_vcpu, 0) == errno.EIO
    h, vm, f, v = snp_launching(kernel)
    assert v.page_fault(0, ENC_W).ret == -errno.EINVAL
    assert errno_of(v.pre_fault_memory, 0, PS) == errno.EOPNOTSUPP
    vm.snp_launch_finish()
    assert v.page_fault(0, ENC_W).ret == u.RET_PF_FIXED
    h.check()


def td_being_built(kernel):
    h = gmem.Host(memory=64 << 20, platform="intel", kernel=kernel)
    vm = h.create_vm(u.KVM_X86_TDX_VM)
    vm.tdx_init_vm(52)
    f = vm.create_guest_memfd(2 << 20)
    vm.set_user_memory_region2(0, GMEM, 0, 2 << 20, HVA, f, 0)
    vm.set_memory_attributes(0, 2 << 20, PRIVATE)
    v = vm.create_vcpu(0)
    v.tdx_init_vcpu()
    h.mmap_user(SRC, 4 * PS)
    return h, vm, f, v


@pytest.mark.parametrize("kernel", ["6.18", "7.2"])
def test_tdx_init_mem_region_per_version(kernel):
    """KVM_TDX_INIT_MEM_REGION: the source is pinned before anything is mapped (a bad one
    maps nothing, EFAULT); 7.2's tdx_gmem_post_populate has no page for source 0
    (EOPNOTSUPP; 6.18's get_user_pages_fast(0) said EFAULT); a page added already is EEXIST
    in 6.18 (kvm_gmem_populate's uptodate check) and EIO in 7.2 (kvm_tdp_mmu_map_private_pfn
    finds it mapped: RET_PF_SPURIOUS)."""
    h, vm, f, v = td_being_built(kernel)
    assert errno_of(v.tdx_init_mem_region, SRC + 64 * PS, 0x10000, 1) == errno.EFAULT
    assert errno_of(v.tdx_init_mem_region, 0, 0x10000, 1) == (errno.EOPNOTSUPP if kernel == "7.2" else errno.EFAULT)
    assert vm.sept() == {} and vm.nr_premapped == 0
    assert v.tdx_init_mem_region(SRC, 0x10000, 1) == 1
    assert errno_of(v.tdx_init_mem_region, SRC, 0x10000, 1) == (errno.EIO if kernel == "7.2" else errno.EEXIST)
    vm.tdx_finalize_vm()                    # nothing premapped was left behind
    h.check()


@pytest.mark.parametrize("kernel", ["6.18", "7.2"])
def test_map_gpa_range_ret(kernel):
    """hypercall.ret after a KVM_HC_MAP_GPA_RANGE exit: since 7.1 only 0, EINVAL and EAGAIN
    (kvm_is_valid_map_gpa_range_ret); anything else is KVM_RUN -EINVAL with the exit still
    pending. TDX answers EAGAIN with TDVMCALL_STATUS_RETRY (tdx_complete_vmcall_map_gpa);
    6.18 took any non-zero as the guest's INVALID_OPERAND."""
    h = gmem.Host(memory=64 << 20, platform="intel", kernel=kernel)
    vm = h.create_vm(u.KVM_X86_TDX_VM)
    vm.launch()
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
    v = vm.create_vcpu(0)
    assert isinstance(v.tdx_map_gpa(vm.shared_gpa_bit, PS), gmem.HypercallExit)
    if kernel == "7.2":
        assert errno_of(v.complete_hypercall, 5) == errno.EINVAL
        assert v.complete_hypercall(errno.EAGAIN) == u.TDVMCALL_STATUS_RETRY
    else:
        assert v.complete_hypercall(5) == u.TDVMCALL_STATUS_INVALID_OPERAND
    with pytest.raises(OSError, match="no hypercall exit is pending"):
        v.complete_hypercall(0)


@pytest.mark.parametrize("kernel", ["rfc-2023", "6.18"])
def test_create_flags(kernel):
    """The RFC's base has one flag, KVM_GUEST_MEMFD_ALLOW_HUGEPAGE (bit 0: 2M THP folios, the
    size a multiple of 2M) and no mmap; 6.18 reuses bit 0 for GUEST_MEMFD_FLAG_MMAP."""
    h = gmem.Host(memory=64 << 20, platform="none", kernel=kernel)
    vm = h.create_vm(u.KVM_X86_DEFAULT_VM)
    if kernel == "rfc-2023":
        assert errno_of(vm.create_guest_memfd, 3 << 20, u.KVM_GUEST_MEMFD_ALLOW_HUGEPAGE) == errno.EINVAL
        assert errno_of(vm.create_guest_memfd, 4 << 20, 2) == errno.EINVAL
        f = vm.create_guest_memfd(4 << 20, u.KVM_GUEST_MEMFD_ALLOW_HUGEPAGE)
        f.allocate(0, PS)
        orders = {d["order"] for p in range(h.nr_pages) if (d := h.folio(p)) and d["mapping"] == f.ino}
        assert orders == {9} and errno_of(f.mmap, PS) == errno.ENODEV
    else:
        f = vm.create_guest_memfd(3 << 20, u.GUEST_MEMFD_FLAG_MMAP)
        f.allocate(0, PS)
        orders = {d["order"] for p in range(h.nr_pages) if (d := h.folio(p)) and d["mapping"] == f.ino}
        assert orders == {0} and len(f.mmap(PS)) == PS
    h.check()
