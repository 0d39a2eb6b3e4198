# arch/x86/kvm/x86.c: what x86 adds to the generic VM (kvm_arch_init_vm and its vendor
# vm_init, kvm_arch_prepare_memory_region, the x86 capabilities, KVM_ENABLE_CAP) and the
# per-VM-type hook table (struct kvm_x86_ops), which each vendor fills from its own file.


cdef void kvm_x86_hooks_init(kvm_x86_hooks *hooks, int vm_type) noexcept nogil:
    """The native hooks of a VM type: SW_PROTECTED (and the types a user adds) are the MMU's
    own; each vendor fills its types from its file (svm_x86_ops, vt_x86_ops)."""
    memset(hooks, 0, sizeof(kvm_x86_hooks))
    if vm_type == KVM_X86_SW_PROTECTED_VM or vm_type >= 6:
        hooks.is_private_fault = sw_protected_is_private_fault
    elif KVM_X86_SEV_VM <= vm_type <= KVM_X86_SNP_VM:
        sev_hooks_init(hooks, vm_type)
    elif vm_type == KVM_X86_TDX_VM:
        tdx_hooks_init(hooks)


cdef int kvm_arch_init_vm(kvm *kvm) noexcept nogil:
    """kvm_arch_init_vm: the generic x86 flags, then the vendor's vm_init."""
    cdef vm_init_t vm_init = kvm.host.hooks[kvm.vm_type].vm_init
    kvm.has_private_mem = kvm.vm_type == KVM_X86_SW_PROTECTED_VM or kvm.vm_type >= 6
    kvm.pre_fault_allowed = 1
    return vm_init(kvm) if vm_init != NULL else 0


cdef void kvm_arch_destroy_vm(kvm *kvm) noexcept nogil:
    cdef vm_destroy_t vm_destroy = kvm.host.hooks[kvm.vm_type].vm_destroy
    if vm_destroy != NULL:
        vm_destroy(kvm)


cdef int kvm_launch(kvm *kvm) noexcept nogil:
    """vm.launch(): the vendor's minimal launch (nothing for VM types without one)."""
    cdef vm_launch_t launch = kvm.host.hooks[kvm.vm_type].vm_launch
    return launch(kvm) if launch != NULL else 0


cdef int kvm_arch_prepare_memory_region(kvm *kvm, uint64_t base_gfn, uint64_t npages) noexcept nogil:
    """For CREATE/MOVE, after kvm_gmem_bind's checks (so EBADF etc. from the bind come first):
    the last gfn must not exceed kvm_mmu_max_gfn() (52-bit guest physical addresses, as on
    this machine's kernel) nor have a TDX shared bit set (kvm_is_gfn_alias)."""
    cdef uint64_t last = base_gfn + npages - 1
    if last > ((<uint64_t>1) << (52 - 12)) - 1:
        return _refuse(kvm.host, -EINVAL, "the memslot ends above kvm_mmu_max_gfn()")
    if last & kvm.gfn_direct_bits:
        return _refuse(kvm.host, -EINVAL, "the memslot reaches the shared bit (kvm_is_gfn_alias)")
    return 0


cdef int64_t kvm_vm_ioctl_check_extension(gmem_host *h, kvm *kvm, uint64_t cap) noexcept nogil:
    if cap == KVM_CAP_VM_TYPES:
        return h.vm_types
    if cap == KVM_CAP_READONLY_MEM:
        return 1 if kvm == NULL else int(not kvm.has_protected_state)
    if cap == KVM_CAP_PRE_FAULT_MEMORY:
        return 1
    return 0


cdef int kvm_vm_ioctl_enable_cap(kvm *kvm, uint64_t cap, uint64_t arg0) noexcept nogil:
    """KVM_ENABLE_CAP on a VM: KVM_CAP_EXIT_HYPERCALL (arg0: the hypercalls that exit to
    userspace; only KVM_HC_MAP_GPA_RANGE is valid)."""
    if cap == KVM_CAP_EXIT_HYPERCALL:
        if arg0 & ~((<uint64_t>1) << KVM_HC_MAP_GPA_RANGE):
            return _refuse(kvm.host, -EINVAL, "hypercall bitmap outside KVM_EXIT_HYPERCALL_VALID_MASK")
        kvm.hypercall_exit_enabled = arg0
        return 0
    return _refuse(kvm.host, -EINVAL, "this capability cannot be enabled")


cdef bint kvm_arch_has_bound_private_mem(kvm *kvm) noexcept nogil:
    """The VM's memory is encrypted with a key of its own (SEV's ASID, TDX's HKID): no other
    VM can use its pages unless the whole encryption context moves."""
    return KVM_X86_SEV_VM <= kvm.vm_type <= KVM_X86_TDX_VM


cdef inline bint user_exit_on_hypercall(kvm *kvm, uint64_t nr) noexcept nogil:
    return (kvm.hypercall_exit_enabled >> nr) & 1
