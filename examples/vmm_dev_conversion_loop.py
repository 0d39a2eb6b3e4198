"""VMM developer: the private<->shared conversion loop a VMM runs, tested without hardware.

    python examples/vmm_dev_conversion_loop.py

An SNP guest asks for page-state changes (PSC, through the GHCB); KVM turns each into a
KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE) that the VMM must answer: set the memory attributes,
discard (punch) what became shared, then complete the hypercall. A TDX guest does the same with
TDG.VP.VMCALL<MapGPA>. The loop below is the VMM's side; the model checks every structure after
each conversion, and an error in the loop (try removing the punch) shows up as counters that do
not add up or a failed host.check().
"""
import gmem
from gmem import uapi

HVA = 0x7F0000000000
MB = 1 << 20


def handle_map_gpa(vm, f, exit_):
    """The VMM's answer to KVM_HC_MAP_GPA_RANGE: 0 for success (the guest sees it)."""
    gpa, npages, attrs = exit_.args
    private = bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED)
    try:
        vm.set_memory_attributes(gpa, npages << 12, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
        if not private:
            f.punch_hole(gpa, npages << 12)          # memslot at gpa 0, file offset == gpa
    except OSError as e:
        return e.errno                                  # KVM_HC_MAP_GPA_RANGE fails with it
    return 0


def run_until_done(vcpu, vm, f, r):
    """Answer hypercall exits until the guest's request completes; the number of exits."""
    exits = 0
    while isinstance(r, gmem.HypercallExit):
        exits += 1
        r = vcpu.complete_hypercall(handle_map_gpa(vm, f, r))
    assert r == 0, f"the guest's conversion failed: {r:#x}"
    return exits


def guest(platform, vm_type):
    """A launched confidential guest with 16 MiB of private guest_memfd memory at gpa 0, whose
    conversion requests exit to this VMM (KVM_CAP_EXIT_HYPERCALL)."""
    host = gmem.Host(memory=1 << 30, platform=platform)
    vm = host.create_vm(vm_type)
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
    f = vm.create_guest_memfd(16 * MB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 16 * MB, HVA, f, 0)
    if vm_type == uapi.KVM_X86_SNP_VM:
        vm.snp_launch_start()                           # SNP_LAUNCH_START, no initial image, FINISH
        vm.snp_launch_finish()
    else:
        vm.tdx_init_vm(52)                              # KVM_TDX_INIT_VM, no initial image, FINALIZE
        vm.tdx_finalize_vm()
    vm.set_memory_attributes(0, 16 * MB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return host, vm, f, vm.create_vcpu(0)


def snp_guest():
    host, vm, f, vcpu = guest("amd", uapi.KVM_X86_SNP_VM)
    for gfn in range(0, 1024):                          # the guest touches its first 4 MiB privately
        vcpu.page_fault(gfn << 12, uapi.PFERR_GUEST_ENC_MASK | uapi.PFERR_WRITE_MASK)
    # the guest makes 1 MiB at 2 MiB shared (one 4K PSC entry per page), then half of it private again
    to_shared = [dict(gfn=g, operation=2, pagesize=0) for g in range(512, 768)]
    exits = sum(run_until_done(vcpu, vm, f, vcpu.page_state_change(to_shared[i:i + 64]))
                for i in range(0, len(to_shared), 64))
    back = [dict(gfn=g, operation=1, pagesize=0) for g in range(512, 640)]
    exits += sum(run_until_done(vcpu, vm, f, vcpu.page_state_change(back[i:i + 64])) for i in range(0, 128, 64))
    host.check()
    shared = sum(1 for g in range(0, 4096) if vm.get_memory_attributes(g) == 0)
    print(f"SNP: {exits} KVM_HC_MAP_GPA_RANGE exits answered; {shared} shared pages; "
          f"RMP-assigned pages {len(host.rmp.assigned())}; invalidated pages {host.stats['gmem_invalidate_pages']}")
    assert shared == 128


def tdx_guest():
    host, vm, f, vcpu = guest("intel", uapi.KVM_X86_TDX_VM)
    for gpa in range(0, 4 * MB, 4096):
        vcpu.tdx_accept(gpa)
    # MapGPA of 4 MiB to shared (the shared bit set): KVM splits it into 2 MiB exits
    exits = run_until_done(vcpu, vm, f, vcpu.tdx_map_gpa((4 * MB) | vm.shared_gpa_bit, 4 * MB))
    host.check()
    print(f"TDX: {exits} MapGPA exits answered; S-EPT ops {dict(vm.tdx_stats)}")
    assert exits == 2


if __name__ == "__main__":
    snp_guest()
    tdx_guest()
