cdef enum:
    # capabilities x86 answers (include/uapi/linux/kvm.h)
    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_MMU_SHADOW_CACHE_CONTROL = 2
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_EXT_EMUL_CPUID = 95
    KVM_CAP_CLOCKSOURCE = 8
    KVM_CAP_PIT = 11
    KVM_CAP_PIT2 = 33
    KVM_CAP_PIT_STATE2 = 35
    KVM_CAP_REINJECT_CONTROL = 24
    KVM_CAP_NOP_IO_DELAY = 12
    KVM_CAP_MP_STATE = 14
    KVM_CAP_USER_NMI = 22
    KVM_CAP_IRQ_INJECT_STATUS = 26
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_IOEVENTFD_NO_LENGTH = 100
    KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_PCI_SEGMENT = 47
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_X86_ROBUST_SINGLESTEP = 51
    KVM_CAP_XSAVE = 55
    KVM_CAP_ASYNC_PF = 59
    KVM_CAP_ASYNC_PF_INT = 183
    KVM_CAP_GET_TSC_KHZ = 61
    KVM_CAP_KVMCLOCK_CTRL = 76
    KVM_CAP_IOAPIC_POLARITY_IGNORED = 97
    KVM_CAP_TSC_DEADLINE_TIMER = 72
    KVM_CAP_DISABLE_QUIRKS = 116
    KVM_CAP_SET_BOOT_CPU_ID = 34
    KVM_CAP_SPLIT_IRQCHIP = 121
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_PMU_EVENT_FILTER = 173
    KVM_CAP_PMU_EVENT_MASKED_EVENTS = 226
    KVM_CAP_GET_MSR_FEATURES = 153
    KVM_CAP_MSR_PLATFORM_INFO = 159
    KVM_CAP_EXCEPTION_PAYLOAD = 164
    KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
    KVM_CAP_SET_GUEST_DEBUG = 23
    KVM_CAP_LAST_CPU = 184
    KVM_CAP_X86_USER_SPACE_MSR = 188
    KVM_CAP_X86_MSR_FILTER = 189
    KVM_CAP_ENFORCE_PV_FEATURE_CPUID = 190
    KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
    KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206
    KVM_CAP_SREGS2 = 200
    KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
    KVM_CAP_VCPU_ATTRIBUTES = 127
    KVM_CAP_SYS_ATTRIBUTES = 209
    KVM_CAP_VAPIC = 6
    KVM_CAP_ENABLE_CAP = 54
    KVM_CAP_VM_DISABLE_NX_HUGE_PAGES = 220
    KVM_CAP_IRQFD_RESAMPLE = 82
    KVM_CAP_ONE_REG = 70
    KVM_CAP_TSC_CONTROL = 60
    KVM_CAP_VM_TSC_CONTROL = 214
    KVM_CAP_XCRS = 56
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_MAX_VCPU_ID = 128
    KVM_CAP_MCE = 31
    KVM_CAP_SYNC_REGS = 74
    KVM_CAP_X86_SMM = 117
    KVM_CAP_PV_MMU = 13
    KVM_CAP_X86_APIC_BUS_CYCLES_NS = 237
    KVM_CAP_X86_GUEST_MODE = 238
    KVM_MAX_VCPUS = 1024                # CONFIG_KVM_MAX_NR_VCPUS
    KVM_MAX_MCE_BANKS = 32
    KVM_SYNC_X86_VALID_FIELDS = 7       # REGS | SREGS | EVENTS
    GMEM_HOST_ONLINE_CPUS = 64          # the simulated machine's CPUs (KVM_CAP_NR_VCPUS)

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
    # "next" (f3c073e25476, 6fa1dab756fd): a to-shared conversion runs the vendor's make_shared,
    # which for SEV is the RMP body its free-time hook has (sev_gmem_make_shared: RMPUPDATE to
    # shared; whether it also flushes caches as the free path does is unverified)
    hooks.gmem_make_shared = hooks.gmem_invalidate


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
    """vm.launch(): the vendor's minimal launch (nothing for VM types without one). It
    stands for the whole build: vCPUs created afterwards come up as if created during it
    (not the kernel's: there a TD refuses KVM_CREATE_VCPU after FINALIZE_VM, and an SNP
    vCPU created after LAUNCH_FINISH has no VMSA)."""
    cdef vm_launch_t launch = kvm.host.hooks[kvm.vm_type].vm_launch
    cdef int r = launch(kvm) if launch != NULL else 0
    if r == 0 and launch != NULL:
        kvm.launched_minimal = 1
    return r


cdef int kvm_complete_hypercall(kvm_vcpu *vcpu, uint64_t ret, uint64_t *result) noexcept nogil:
    """KVM_RUN after a KVM_HC_MAP_GPA_RANGE exit: vcpu->arch.complete_userspace_io with the
    hypercall.ret userspace wrote. Since 3e2dec1ede0a (7.1) only 0, EINVAL and EAGAIN are
    valid (kvm_is_valid_map_gpa_range_ret): anything else is KVM_RUN -EINVAL, the guest not
    resumed and the exit still pending; before, any non-zero was the guest's error."""
    cdef complete_userspace_io_t complete = vcpu.complete_userspace_io
    if complete == NULL:
        return _refuse(vcpu.kvm.host, -EINVAL, "no hypercall exit is pending on this vCPU")
    if vcpu.kvm.host.kernel >= GMEM_KERNEL_7_2 and ret != 0 and ret != EINVAL and ret != EAGAIN:
        return _refuse(vcpu.kvm.host, -EINVAL, "hypercall.ret must be 0, EINVAL or EAGAIN "
                       "(kvm_is_valid_map_gpa_range_ret, 7.1+)")
    vcpu.complete_userspace_io = NULL
    vcpu.hypercall.ret = ret
    gmem_trace(vcpu.kvm.host, TRACE_MAP_GPA_RANGE, vcpu.vcpu_id, vcpu.hypercall.args[0],
               vcpu.hypercall.args[1], vcpu.hypercall.args[2], ret)
    return complete(vcpu, ret, result)


cdef int kvm_vcpu_pre_run(kvm_vcpu *vcpu) noexcept nogil:
    """vcpu_pre_run's refusals before the guest is entered: a dead VM (-EIO, KVM_REQ_VM_DEAD);
    svm_vcpu_pre_run / pre_sev_run: an SNP vCPU with no VMSA, i.e. before LAUNCH_FINISH
    (-EINVAL); tdx_vcpu_pre_run: a TD vCPU not INITIALIZED or a TD not RUNNABLE (-EINVAL)."""
    if vcpu.pre_run_err == -EIO:
        return kvm_ioctl_check_dead(vcpu.kvm)
    if vcpu.pre_run_err:
        return _refuse(vcpu.kvm.host, vcpu.pre_run_err, "KVM_RUN before the launch lets this vCPU "
                       "run (SNP: LAUNCH_FINISH gives it a VMSA; TDX: KVM_TDX_INIT_VCPU and "
                       "KVM_TDX_FINALIZE_VM)")
    return 0


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
    """x86.c:4364 for a host with TDP (EPT/NPT) and without SMM (as this machine's kernel)."""
    cdef bint protected = kvm != NULL and kvm.has_protected_state
    if cap in (KVM_CAP_IRQCHIP, KVM_CAP_HLT, KVM_CAP_MMU_SHADOW_CACHE_CONTROL, KVM_CAP_SET_TSS_ADDR,
             KVM_CAP_EXT_CPUID, KVM_CAP_EXT_EMUL_CPUID, KVM_CAP_CLOCKSOURCE, KVM_CAP_PIT,
             KVM_CAP_PIT2, KVM_CAP_PIT_STATE2, KVM_CAP_REINJECT_CONTROL, KVM_CAP_NOP_IO_DELAY,
             KVM_CAP_MP_STATE, KVM_CAP_USER_NMI, KVM_CAP_IRQ_INJECT_STATUS, KVM_CAP_IOEVENTFD,
             KVM_CAP_IOEVENTFD_NO_LENGTH, KVM_CAP_SET_IDENTITY_MAP_ADDR, KVM_CAP_VCPU_EVENTS,
             KVM_CAP_PCI_SEGMENT, KVM_CAP_DEBUGREGS, KVM_CAP_X86_ROBUST_SINGLESTEP, KVM_CAP_XSAVE,
             KVM_CAP_ASYNC_PF, KVM_CAP_ASYNC_PF_INT, KVM_CAP_GET_TSC_KHZ, KVM_CAP_KVMCLOCK_CTRL,
             KVM_CAP_IOAPIC_POLARITY_IGNORED, KVM_CAP_TSC_DEADLINE_TIMER, KVM_CAP_DISABLE_QUIRKS,
             KVM_CAP_SET_BOOT_CPU_ID, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_IMMEDIATE_EXIT,
             KVM_CAP_PMU_EVENT_FILTER, KVM_CAP_PMU_EVENT_MASKED_EVENTS, KVM_CAP_GET_MSR_FEATURES,
             KVM_CAP_MSR_PLATFORM_INFO, KVM_CAP_EXCEPTION_PAYLOAD, KVM_CAP_X86_TRIPLE_FAULT_EVENT,
             KVM_CAP_SET_GUEST_DEBUG, KVM_CAP_LAST_CPU, KVM_CAP_X86_USER_SPACE_MSR,
             KVM_CAP_X86_MSR_FILTER, KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
             KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, KVM_CAP_SREGS2,
             KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_CAP_VCPU_ATTRIBUTES, KVM_CAP_SYS_ATTRIBUTES,
             KVM_CAP_VAPIC, KVM_CAP_ENABLE_CAP, KVM_CAP_VM_DISABLE_NX_HUGE_PAGES,
             KVM_CAP_IRQFD_RESAMPLE, KVM_CAP_ONE_REG, KVM_CAP_TSC_CONTROL, KVM_CAP_VM_TSC_CONTROL,
             KVM_CAP_XCRS):
        return 1
    if cap == KVM_CAP_X86_APIC_BUS_CYCLES_NS or cap == KVM_CAP_X86_GUEST_MODE:
        return 1 if h.kernel >= GMEM_KERNEL_6_18 else 0     # (6.11; not in the RFC's base)
    if cap == KVM_CAP_VM_TYPES:
        return h.vm_types
    if cap == KVM_CAP_READONLY_MEM:
        return 0 if protected else 1
    if cap == KVM_CAP_SYNC_REGS:
        return 0 if protected else KVM_SYNC_X86_VALID_FIELDS
    if cap == KVM_CAP_PRE_FAULT_MEMORY:
        # tdp_enabled, not per VM type (SNP/TDX refuse the ioctl itself until launched); 6.11
        return h.tdp if h.kernel >= GMEM_KERNEL_6_18 else 0
    if cap == KVM_CAP_EXIT_HYPERCALL:
        return (<uint64_t>1) << KVM_HC_MAP_GPA_RANGE       # KVM_EXIT_HYPERCALL_VALID_MASK
    if cap == KVM_CAP_NR_VCPUS:
        return GMEM_HOST_ONLINE_CPUS if GMEM_HOST_ONLINE_CPUS < KVM_MAX_VCPUS else KVM_MAX_VCPUS
    if cap == KVM_CAP_MAX_VCPUS:
        # tdx_vm_init: a TD has at most the present CPUs
        if kvm != NULL and kvm.vm_type == KVM_X86_TDX_VM:
            return GMEM_HOST_ONLINE_CPUS
        return KVM_MAX_VCPUS
    if cap == KVM_CAP_MAX_VCPU_ID:
        return KVM_MAX_VCPU_IDS
    if cap == KVM_CAP_MCE:
        return KVM_MAX_MCE_BANKS
    return 0                                # X86_SMM, PV_MMU and everything not listed


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
