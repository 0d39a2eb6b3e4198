"""Security researcher: provoke each bug class the model catches, and see it reported.

    python examples/security_researcher_bug_classes.py

1. the host writes to a guest-owned page       -> gmem.RmpViolation (an RMP #PF on the host)
2. a freed page still assigned in the RMP        -> host.check(): "freed pfn ... is still assigned"
3. a stale SPTE after a hole punch               -> host.check(): "maps a freed page (stale SPTE)"
4. a 2M mapping over mixed 4K RMP state          -> host.check(): "level 2 maps pfn ... (level 1)"

Classes 2 and 4 need a broken arch hook, registered in Python over SNP's native one (the kind
of bug a backend patch could bring); class 3 is a gap of the real kernel (6.18), reachable
through the uAPI alone: a TDX guest_memfd with MMAP.
"""
import gmem
from gmem import uapi

HVA = 0x7F0000000000
MB = 1 << 20
ENC, W = uapi.PFERR_GUEST_ENC_MASK, uapi.PFERR_WRITE_MASK


def snp_guest(**hooks):
    host = gmem.Host(memory=64 * MB, platform="amd", huge_folios=True)
    if hooks:
        host.register_hooks(uapi.KVM_X86_SNP_VM, **hooks)
    vm = host.create_vm(uapi.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(4 * MB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 4 * MB, HVA, f, 0)
    vm.set_memory_attributes(0, 4 * MB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return host, vm, f, vm.create_vcpu(0)


def report(n, what, exc):
    print(f"{n}. {what}:\n   {type(exc).__name__}: {exc}")


def host_writes_guest_page():
    host, vm, f, vcpu = snp_guest()
    r = vcpu.page_fault(0x3000, ENC | W)                # the guest's private page, RMP-assigned
    try:
        host.touch(r.pfn, write=True)
    except gmem.RmpViolation as e:
        return report(1, "the host writes to a guest-owned page", e)
    raise AssertionError("no RMP violation")


def freed_page_still_assigned():
    def invalidate_forgets(host, start_pfn, end_pfn):   # sev_gmem_invalidate that does nothing
        return None
    host, vm, f, vcpu = snp_guest(gmem_invalidate=invalidate_forgets)
    vcpu.page_fault(0x3000, ENC | W)
    vm.set_memory_attributes(0x3000, 4096, 0)
    f.punch_hole(0x3000, 4096)                          # the folio is freed, its RMP entry stays
    try:
        host.check()
    except gmem.InvariantError as e:
        report(2, "a freed page still assigned in the RMP", e)
    else:
        raise AssertionError("check() passed")
    f.close()
    vm.close()


def stale_spte_after_punch():
    host = gmem.Host(memory=1 << 30, platform="intel")
    vm = host.create_vm(uapi.KVM_X86_TDX_VM)
    f = vm.create_guest_memfd(4 * MB, uapi.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 4 * MB, HVA, f, 0)
    vm.tdx_init_vm(52)
    vm.tdx_finalize_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.page_fault((2 * MB) | vm.shared_gpa_bit, W)    # a shared fault maps the file's page
    f.punch_hole(2 * MB, 4096)                          # zaps with KVM_FILTER_PRIVATE only
    try:
        host.check()
    except gmem.InvariantError as e:
        return report(3, "a stale SPTE after a hole punch (a kernel gap)", e)
    raise AssertionError("check() passed")


def huge_mapping_over_4k_rmp():
    host, vm, f, vcpu = snp_guest()
    rmp = host.rmp

    def prepare_4k(vm, gfn, pfn, order):                # prepares only the faulting 4K page
        if rmp.lookup(pfn).assigned:
            return 0
        return -5 if rmp.make_private(pfn, gfn << 12, uapi.PG_LEVEL_4K, vm.asid) else 0

    host.register_hooks(uapi.KVM_X86_SNP_VM, gmem_prepare=prepare_4k,
                        private_max_mapping_level=lambda vm, pfn: uapi.PG_LEVEL_2M)   # ... but claims 2M
    r = vcpu.page_fault(2 * MB, ENC | W)
    print(f"   (fault mapped at level {r.level}, RMP entry level {rmp.level(r.pfn)})")
    try:
        host.check()
    except gmem.InvariantError as e:
        return report(4, "a 2M mapping over mixed 4K RMP state", e)
    raise AssertionError("check() passed")


if __name__ == "__main__":
    host_writes_guest_page()
    freed_page_still_assigned()
    stale_spte_after_punch()
    huge_mapping_over_4k_rmp()
