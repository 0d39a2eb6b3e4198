"""The kernel's constants used by gmem, in one place, under the kernel's own names.

Mirrors, for x86-64 and Linux 6.8 ... 6.18:

* ``include/uapi/linux/kvm.h``            ioctls, structs, memslot flags, capabilities, exit reasons
* ``include/uapi/linux/kvm_para.h``       ``KVM_HC_MAP_GPA_RANGE`` and its flags, ``KVM_ENOSYS``
* ``arch/x86/include/uapi/asm/kvm.h``     VM types, SEV-SNP launch commands and page types, TDX commands
* ``arch/x86/include/asm/kvm_host.h``     ``PFERR_*`` error-code bits, ``KVM_USER_MEM_SLOTS``, hugepage levels
* ``include/linux/kvm_host.h``            internal memslot flags, ``KVM_MEM_MAX_NR_PAGES``
* ``arch/x86/kvm/mmu/mmu_internal.h``     ``RET_PF_*``
* ``arch/x86/include/asm/sev.h``, ``sev-common.h``, ``svm.h``, ``include/linux/psp-sev.h``
                                          RMP, RMPUPDATE/PSMASH/PVALIDATE codes, GHCB page-state change
* ``arch/x86/virt/vmx/tdx/tdx.h``, ``asm/tdx.h``, ``asm/shared/tdx.h``, ``arch/x86/kvm/vmx/tdx*.h``
                                          SEAMCALL leaves and status codes, TDVMCALLs, the shared bit
* ``include/uapi/linux/falloc.h``, ``include/uapi/asm-generic/errno*.h``, ``mman*.h``

Values are the kernel headers' above. The core defines the ones it uses once, in C
(``gmem._core.C_CONSTANTS``); ``tests/test_layers.py`` checks that the two agree, and
``tests/test_kernel_backend.py`` checks the ioctl numbers against ``_IOC()``.
Function-like kernel macros (``_IOC``, ``KVM_PAGES_PER_HPAGE``, ...) are functions here.
"""

import errno as _errno
import mmap as _mmap


def BIT(n):
    return 1 << n


# --------------------------------------------------------------------------------------------
# ioctl encoding (include/uapi/asm-generic/ioctl.h): dir<<30 | size<<16 | type<<8 | nr

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir, type, nr, size):
    return (dir << _IOC_DIRSHIFT) | (type << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type, nr):
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type, nr, size):
    return _IOC(_IOC_READ, type, nr, size)


def _IOW(type, nr, size):
    return _IOC(_IOC_WRITE, type, nr, size)


def _IOWR(type, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, size)


# --------------------------------------------------------------------------------------------
# Structs: little-endian `struct` formats and sizes (natural alignment, no implicit padding)

# struct kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr
KVM_USERSPACE_MEMORY_REGION_FORMAT = "<IIQQQ"
KVM_USERSPACE_MEMORY_REGION_SIZE = 32
# struct kvm_userspace_memory_region2: ..., guest_memfd_offset, guest_memfd (u32), pad1, pad2[14]
KVM_USERSPACE_MEMORY_REGION2_FORMAT = "<IIQQQQII14Q"
KVM_USERSPACE_MEMORY_REGION2_SIZE = 160
# struct kvm_memory_attributes: address, size, attributes, flags
KVM_MEMORY_ATTRIBUTES_FORMAT = "<QQQQ"
KVM_MEMORY_ATTRIBUTES_SIZE = 32
# struct kvm_memory_attributes2 ("next", on the guest_memfd fd): offset, size, attributes, flags,
# error_offset (out, written only on error), reserved[11] (must be 0)
KVM_MEMORY_ATTRIBUTES2_FORMAT = "<QQQQQ11Q"
KVM_MEMORY_ATTRIBUTES2_SIZE = 128
# struct kvm_create_guest_memfd: size, flags, reserved[6] (reserved is not checked)
KVM_CREATE_GUEST_MEMFD_FORMAT = "<QQ6Q"
KVM_CREATE_GUEST_MEMFD_SIZE = 64
# struct kvm_pre_fault_memory: gpa (in/out), size (in/out), flags (must be 0), padding[5]
KVM_PRE_FAULT_MEMORY_FORMAT = "<QQQ5Q"
KVM_PRE_FAULT_MEMORY_SIZE = 64
# struct kvm_enable_cap: cap, flags, args[4], pad[64]
KVM_ENABLE_CAP_FORMAT = "<II4Q64s"
KVM_ENABLE_CAP_SIZE = 104
# struct kvm_sev_snp_launch_update: gfn_start, uaddr, len, type, pad0, flags (must be 0), pad1, pad2[4]
KVM_SEV_SNP_LAUNCH_UPDATE_FORMAT = "<QQQBBHI4Q"
KVM_SEV_SNP_LAUNCH_UPDATE_SIZE = 64

# struct kvm_run (x86-64): byte offsets of the fields gmem reads
KVM_RUN_EXIT_REASON_OFFSET = 8          # __u32 exit_reason
KVM_RUN_MEMORY_FAULT_FLAGS_OFFSET = 32  # __u64 memory_fault.flags
KVM_RUN_MEMORY_FAULT_GPA_OFFSET = 40    # __u64 memory_fault.gpa
KVM_RUN_MEMORY_FAULT_SIZE_OFFSET = 48   # __u64 memory_fault.size
KVM_RUN_HYPERCALL_NR_OFFSET = 32        # __u64 hypercall.nr
KVM_RUN_HYPERCALL_ARGS_OFFSET = 40      # __u64 hypercall.args[6]
KVM_RUN_HYPERCALL_RET_OFFSET = 88       # __u64 hypercall.ret
KVM_RUN_HYPERCALL_FLAGS_OFFSET = 96     # __u64 hypercall.flags (union with __u32 longmode)

# --------------------------------------------------------------------------------------------
# ioctls

KVMIO = 0xAE
KVM_API_VERSION = 12

# on /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)               # arg = VM type; returns a VM fd
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)         # arg = capability; also on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
# on a VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KVM_USERSPACE_MEMORY_REGION_SIZE)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, KVM_USERSPACE_MEMORY_REGION2_SIZE)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, KVM_ENABLE_CAP_SIZE)   # also on a vCPU fd
KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xD2, KVM_MEMORY_ATTRIBUTES_SIZE)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, KVM_CREATE_GUEST_MEMFD_SIZE)
# on a guest_memfd fd ("next": in-place conversion; a different number from the VM ioctl's)
KVM_SET_MEMORY_ATTRIBUTES2 = _IOWR(KVMIO, 0xD2, KVM_MEMORY_ATTRIBUTES2_SIZE)
# on a vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_PRE_FAULT_MEMORY = _IOWR(KVMIO, 0xD5, KVM_PRE_FAULT_MEMORY_SIZE)   # 6.11+

# --------------------------------------------------------------------------------------------
# VM types (arch/x86/include/uapi/asm/kvm.h): the KVM_CREATE_VM argument; KVM_CAP_VM_TYPES is a
# bitmap of BIT(type)

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1  # 6.8
KVM_X86_SEV_VM = 2           # 6.10
KVM_X86_SEV_ES_VM = 3        # 6.10
KVM_X86_SNP_VM = 4           # 6.11
KVM_X86_TDX_VM = 5           # 6.16

# --------------------------------------------------------------------------------------------
# Capabilities (KVM_CHECK_EXTENSION)

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_MMU_SHADOW_CACHE_CONTROL = 2
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_VAPIC = 6
KVM_CAP_EXT_CPUID = 7
KVM_CAP_CLOCKSOURCE = 8
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT = 11
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_PV_MMU = 13
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_REINJECT_CONTROL = 24
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_PCI_SEGMENT = 47
KVM_CAP_DEBUGREGS = 50
KVM_CAP_X86_ROBUST_SINGLESTEP = 51
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_ASYNC_PF = 59
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SYNC_REGS = 74
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_EXT_EMUL_CPUID = 95
KVM_CAP_IOAPIC_POLARITY_IGNORED = 97
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_X86_SMM = 117
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_VCPU_ATTRIBUTES = 127
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_MSR_PLATFORM_INFO = 159
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_PMU_EVENT_FILTER = 173
KVM_CAP_HALT_POLL = 182
KVM_CAP_ASYNC_PF_INT = 183
KVM_CAP_LAST_CPU = 184
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_ENFORCE_PV_FEATURE_CPUID = 190
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
KVM_CAP_SREGS2 = 200
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206
KVM_CAP_SYS_ATTRIBUTES = 209
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
KVM_CAP_VM_DISABLE_NX_HUGE_PAGES = 220
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_PMU_EVENT_MASKED_EVENTS = 226
KVM_CAP_NR_MEMSLOTS = 10            # returns KVM_USER_MEM_SLOTS
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_EXIT_HYPERCALL = 201        # KVM_ENABLE_CAP args[0] = BIT(KVM_HC_MAP_GPA_RANGE)
KVM_CAP_USER_MEMORY2 = 231          # 6.8
KVM_CAP_MEMORY_FAULT_INFO = 232     # 6.8
KVM_CAP_MEMORY_ATTRIBUTES = 233     # 6.8; returns the supported attributes
KVM_CAP_GUEST_MEMFD = 234           # 6.8
KVM_CAP_VM_TYPES = 235              # 6.8; returns a bitmap of BIT(vm_type)
KVM_CAP_PRE_FAULT_MEMORY = 236      # 6.11
KVM_CAP_X86_APIC_BUS_CYCLES_NS = 237
KVM_CAP_X86_GUEST_MODE = 238
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243
KVM_CAP_GUEST_MEMFD_FLAGS = 244     # 6.18; returns the valid KVM_CREATE_GUEST_MEMFD flags
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250   # "next" (v8's number); attributes of guest_memfd fds

# --------------------------------------------------------------------------------------------
# guest_memfd creation flags (6.18; every flag bit was invalid in 6.8 ... 6.17)

GUEST_MEMFD_FLAG_MMAP = BIT(0)
KVM_GUEST_MEMFD_ALLOW_HUGEPAGE = BIT(0)     # the RFC's base (6.8-rc): 2M THP folios; no mmap then
# include/uapi/linux/mempolicy.h: mbind() modes (a guest_memfd's NUMA policy, 6.19+)
MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4
MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE = 5, 6
GUEST_MEMFD_FLAG_INIT_SHARED = BIT(1)
# proposed uAPI, in no kernel: HugeTLB-backed guest_memfd ("1G page support for guest_memfd"
# RFC v2, 2025-05): the flag and log2(page size) in bits 58..63, as MAP_HUGE_* (0: the default)
GUEST_MEMFD_FLAG_HUGETLB = BIT(2)
GUESTMEM_HUGETLB_FLAG_SHIFT = 58
GUESTMEM_HUGETLB_FLAG_MASK = 0x3F
GUESTMEM_HUGETLB_FLAG_2MB = 21 << GUESTMEM_HUGETLB_FLAG_SHIFT
GUESTMEM_HUGETLB_FLAG_1GB = 30 << GUESTMEM_HUGETLB_FLAG_SHIFT

# --------------------------------------------------------------------------------------------
# Memslots

KVM_MEM_LOG_DIRTY_PAGES = BIT(0)
KVM_MEM_READONLY = BIT(1)
KVM_MEM_GUEST_MEMFD = BIT(2)        # KVM_SET_USER_MEMORY_REGION2 only
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
# internal (include/linux/kvm_host.h), never set by userspace
KVM_MEMSLOT_INVALID = BIT(16)
KVM_MEMSLOT_GMEM_ONLY = BIT(17)     # 6.18: slot bound to a gmem with GUEST_MEMFD_FLAG_MMAP

KVM_MEM_SLOTS_NUM = 32767           # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS = 3          # x86
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS   # 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1

# --------------------------------------------------------------------------------------------
# Memory attributes and memory-fault exits

KVM_MEMORY_ATTRIBUTE_PRIVATE = BIT(3)
KVM_MEMORY_EXIT_FLAG_PRIVATE = BIT(3)
# KVM_SET_MEMORY_ATTRIBUTES2 content modes in flags: RFC v4/v5 only (gmem.Host(content_modes=True))
KVM_SET_MEMORY_ATTRIBUTES2_ZERO = BIT(0)
KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE = BIT(1)

# --------------------------------------------------------------------------------------------
# Exit reasons (kvm_run.exit_reason)

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_NOTIFY = 37
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_TDX = 40

# --------------------------------------------------------------------------------------------
# Hypercalls (include/uapi/linux/kvm_para.h)

KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = BIT(0)
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = BIT(1)


def KVM_MAP_GPA_RANGE_ENC_STAT(n):
    return n << 4


KVM_MAP_GPA_RANGE_ENCRYPTED = KVM_MAP_GPA_RANGE_ENC_STAT(1)
KVM_MAP_GPA_RANGE_DECRYPTED = KVM_MAP_GPA_RANGE_ENC_STAT(0)
KVM_EXIT_HYPERCALL_LONG_MODE = BIT(0)   # kvm_run.hypercall.flags
# hypercall return values seen by the guest (negated)
KVM_ENOSYS = 1000
KVM_EINVAL = _errno.EINVAL

# --------------------------------------------------------------------------------------------
# fallocate(2) modes (include/uapi/linux/falloc.h)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_NO_HIDE_STALE = 0x04
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80        # 6.17+

# --------------------------------------------------------------------------------------------
# mmap(2)

PROT_NONE = 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
PROT_EXEC = _mmap.PROT_EXEC
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_SHARED_VALIDATE = 0x03

# --------------------------------------------------------------------------------------------
# Pages and hugepage levels (arch/x86/include/asm/pgtable_types.h, kvm_host.h)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

PG_LEVEL_NONE = 0
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
KVM_NR_PAGE_SIZES = 3


def KVM_HPAGE_GFN_SHIFT(level):
    return (level - PG_LEVEL_4K) * 9


def KVM_HPAGE_SHIFT(level):
    return PAGE_SHIFT + KVM_HPAGE_GFN_SHIFT(level)


def KVM_HPAGE_SIZE(level):
    return 1 << KVM_HPAGE_SHIFT(level)


def KVM_PAGES_PER_HPAGE(level):
    return 1 << KVM_HPAGE_GFN_SHIFT(level)


# --------------------------------------------------------------------------------------------
# errno (include/uapi/asm-generic/errno-base.h, errno.h); EHWPOISON is not in Python's errno

EPERM = _errno.EPERM              # 1
ENOENT = _errno.ENOENT            # 2
EINTR = _errno.EINTR              # 4
EIO = _errno.EIO                  # 5
ENXIO = _errno.ENXIO              # 6
EBADF = _errno.EBADF              # 9
EAGAIN = _errno.EAGAIN            # 11
ENOMEM = _errno.ENOMEM            # 12
EACCES = _errno.EACCES            # 13
EFAULT = _errno.EFAULT            # 14
EBUSY = _errno.EBUSY              # 16
EEXIST = _errno.EEXIST            # 17
ENODEV = _errno.ENODEV            # 19
EINVAL = _errno.EINVAL            # 22
EMFILE = _errno.EMFILE            # 24
ENOTTY = _errno.ENOTTY            # 25
EFBIG = _errno.EFBIG              # 27
ENOSPC = _errno.ENOSPC            # 28
ESPIPE = _errno.ESPIPE            # 29
ENOSYS = _errno.ENOSYS            # 38
EOPNOTSUPP = _errno.EOPNOTSUPP    # 95
EHWPOISON = 133

# --------------------------------------------------------------------------------------------
# x86 page-fault error code (arch/x86/include/asm/kvm_host.h), a u64.
# Bits 0-15: architectural #PF; 31-36: AMD NPF EXITINFO1; 48+: KVM-internal ("synthetic").

PFERR_PRESENT_MASK = BIT(0)
PFERR_WRITE_MASK = BIT(1)
PFERR_USER_MASK = BIT(2)        # on VMX, KVM puts the EPT "read" access bit here
PFERR_RSVD_MASK = BIT(3)
PFERR_FETCH_MASK = BIT(4)
PFERR_PK_MASK = BIT(5)
PFERR_SS_MASK = BIT(6)
PFERR_SGX_MASK = BIT(15)
PFERR_GUEST_RMP_MASK = BIT(31)
PFERR_GUEST_FINAL_MASK = BIT(32)
PFERR_GUEST_PAGE_MASK = BIT(33)
PFERR_GUEST_ENC_MASK = BIT(34)
PFERR_GUEST_SIZEM_MASK = BIT(35)
PFERR_GUEST_VMPL_MASK = BIT(36)
PFERR_IMPLICIT_ACCESS = BIT(48)
PFERR_PRIVATE_ACCESS = BIT(49)
PFERR_SYNTHETIC_MASK = PFERR_IMPLICIT_ACCESS | PFERR_PRIVATE_ACCESS
PFERR_NESTED_GUEST_PAGE = PFERR_GUEST_PAGE_MASK | PFERR_WRITE_MASK | PFERR_PRESENT_MASK  # <= 6.9
X86_PF_RMP = BIT(31)            # host #PF error code of an RMP violation (asm/trap_pf.h)

# RET_PF_* (arch/x86/kvm/mmu/mmu_internal.h); negative values are errnos
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_WRITE_PROTECTED = 3
RET_PF_INVALID = 4
RET_PF_FIXED = 5
RET_PF_SPURIOUS = 6

# --------------------------------------------------------------------------------------------
# AMD SEV-SNP: RMP (arch/x86/include/asm/sev.h, arch/x86/virt/svm/sev.c)

MSR_AMD64_RMP_BASE = 0xC0010132
MSR_AMD64_RMP_END = 0xC0010133
RMP_ADDR_MASK = ((1 << 52) - 1) & ~((1 << 13) - 1)   # GENMASK_ULL(51, 13)
RMPTABLE_CPU_BOOKKEEPING_SZ = 0x4000
RMP_PG_SIZE_4K = 0
RMP_PG_SIZE_2M = 1


def RMP_TO_PG_LEVEL(level):
    return PG_LEVEL_4K if level == RMP_PG_SIZE_4K else PG_LEVEL_2M


def PG_LEVEL_TO_RMP(level):
    return RMP_PG_SIZE_4K if level == PG_LEVEL_4K else RMP_PG_SIZE_2M


# Instruction return codes (EAX). Linux defines RMPUPDATE_FAIL_OVERLAP, PSMASH_FAIL_INUSE and the
# PVALIDATE_* ones; the others are the APM's codes under the same naming.
RMPUPDATE_SUCCESS = 0
RMPUPDATE_FAIL_INPUT = 1
RMPUPDATE_FAIL_PERMISSION = 2
RMPUPDATE_FAIL_INUSE = 3
RMPUPDATE_FAIL_OVERLAP = 4
PSMASH_SUCCESS = 0
PSMASH_FAIL_INPUT = 1
PSMASH_FAIL_PERMISSION = 2
PSMASH_FAIL_INUSE = 3
PSMASH_FAIL_BADADDR = 4
PVALIDATE_SUCCESS = 0
PVALIDATE_FAIL_INPUT = 1
PVALIDATE_FAIL_SIZEMISMATCH = 6
PVALIDATE_FAIL_NOUPDATE = 255        # software code: CF=1, Validated already had the value
RMPADJUST_SUCCESS = 0
RMPADJUST_FAIL_INPUT = 1
RMPADJUST_FAIL_PERMISSION = 2
RMPADJUST_FAIL_SIZEMISMATCH = 6
RMPADJUST_VMSA_PAGE_BIT = BIT(16)

# Page-state change (arch/x86/include/asm/sev-common.h, svm.h)
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_PSC_RESP_ERROR = BIT(63) | GHCB_MSR_PSC_RESP


def GHCB_MSR_PSC_REQ_TO_GFN(msr):
    return (msr >> 12) & ((1 << 40) - 1)


def GHCB_MSR_PSC_REQ_TO_OP(msr):
    return (msr >> 52) & 0xF


SNP_PAGE_STATE_PRIVATE = 1
SNP_PAGE_STATE_SHARED = 2
SVM_VMGEXIT_PSC = 0x80000010
VMGEXIT_PSC_MAX_ENTRY = 64
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_OP_PRIVATE = 1
VMGEXIT_PSC_OP_SHARED = 2
VMGEXIT_PSC_OP_PSMASH = 3            # not supported by KVM
VMGEXIT_PSC_OP_UNSMASH = 4           # not supported by KVM
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
SVM_VMGEXIT_AP_CREATE_ON_INIT = 0
SVM_VMGEXIT_AP_CREATE = 1
SVM_VMGEXIT_AP_DESTROY = 2

# Launch (KVM_MEMORY_ENCRYPT_OP command ids, arch/x86/include/uapi/asm/kvm.h)
KVM_SEV_SNP_LAUNCH_START = 100
KVM_SEV_SNP_LAUNCH_UPDATE = 101
KVM_SEV_SNP_LAUNCH_FINISH = 102
KVM_SEV_SNP_PAGE_TYPE_NORMAL = 0x1
KVM_SEV_SNP_PAGE_TYPE_ZERO = 0x3
KVM_SEV_SNP_PAGE_TYPE_UNMEASURED = 0x4
KVM_SEV_SNP_PAGE_TYPE_SECRETS = 0x5
KVM_SEV_SNP_PAGE_TYPE_CPUID = 0x6
SNP_PAGE_TYPE_VMSA = 0x2             # firmware only, used by LAUNCH_FINISH
INITIAL_VMSA_GPA = 0xFFFFFFFFF000
# firmware commands and status (include/linux/psp-sev.h)
SEV_CMD_SNP_LAUNCH_START = 0x0A0
SEV_CMD_SNP_LAUNCH_UPDATE = 0x0A1
SEV_CMD_SNP_LAUNCH_FINISH = 0x0A2
SEV_CMD_SNP_PAGE_RECLAIM = 0x0C7
SEV_RET_SUCCESS = 0
SEV_RET_INVALID_PARAM = 0x16

# --------------------------------------------------------------------------------------------
# Intel TDX

# The shared bit, as the kernel defines it: a *gfn* mask (GPA bit 51 or 47)
TDX_SHARED_BIT_PWL_5 = BIT(51) >> PAGE_SHIFT   # GPAW 52, 5-level EPT
TDX_SHARED_BIT_PWL_4 = BIT(47) >> PAGE_SHIFT   # GPAW 48, 4-level EPT

# KVM_MEMORY_ENCRYPT_OP command ids (enum kvm_tdx_cmd_id)
KVM_TDX_CAPABILITIES = 0
KVM_TDX_INIT_VM = 1
KVM_TDX_INIT_VCPU = 2
KVM_TDX_INIT_MEM_REGION = 3
KVM_TDX_FINALIZE_VM = 4
KVM_TDX_GET_CPUID = 5
KVM_TDX_MEASURE_MEMORY_REGION = BIT(0)
TDX_EXTENDMR_CHUNKSIZE = 256
TDX_TD_ATTR_DEBUG = BIT(0)
TDX_TD_ATTR_SEPT_VE_DISABLE = BIT(28)
TDX_EXT_EXIT_QUAL_TYPE_MASK = 0xF
TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION = 6

# SEAMCALL leaves
TDH_VP_ENTER = 0
TDH_MNG_ADDCX = 1
TDH_MEM_PAGE_ADD = 2
TDH_MEM_SEPT_ADD = 3
TDH_VP_ADDCX = 4
TDH_MEM_PAGE_RELOCATE = 5
TDH_MEM_PAGE_AUG = 6
TDH_MEM_RANGE_BLOCK = 7
TDH_MNG_KEY_CONFIG = 8
TDH_MNG_CREATE = 9
TDH_VP_CREATE = 10
TDH_MNG_RD = 11
TDH_MEM_PAGE_DEMOTE = 15
TDH_MR_EXTEND = 16
TDH_MR_FINALIZE = 17
TDH_VP_FLUSH = 18
TDH_MNG_VPFLUSHDONE = 19
TDH_MNG_KEY_FREEID = 20
TDH_MNG_INIT = 21
TDH_VP_INIT = 22
TDH_MEM_PAGE_PROMOTE = 23
TDH_MEM_SEPT_RD = 25
TDH_VP_RD = 26
TDH_PHYMEM_PAGE_RECLAIM = 28
TDH_MEM_PAGE_REMOVE = 29
TDH_MEM_SEPT_REMOVE = 30
TDH_MEM_TRACK = 38
TDH_MEM_RANGE_UNBLOCK = 39
TDH_PHYMEM_CACHE_WB = 40
TDH_PHYMEM_PAGE_WBINVD = 41
TDH_VP_WR = 43

# SEAMCALL status codes; operand ids are ORed into the low bits
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000
TDX_SUCCESS = 0
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000    # TDG.MEM.PAGE.ACCEPT of an accepted page
TDX_PAGE_SIZE_MISMATCH = 0xC0000B0B00000000       # ... at a size the S-EPT does not map at
TDX_NON_RECOVERABLE_VCPU = 0x4000000100000000
TDX_INTERRUPTED_RESUMABLE = 0x8000000300000000
TDX_OPERAND_INVALID = 0xC000010000000000
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
TDX_RND_NO_ENTROPY = 0x8000020300000000
TDX_EPT_WALK_FAILED = 0xC0000B0000000000
TDX_EPT_ENTRY_NOT_FREE = 0xC0000B0200000000
TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
TDX_OPERAND_ID_RCX = 0x01
TDX_OPERAND_ID_TDR = 0x80
TDX_OPERAND_ID_SEPT = 0x92
TDX_OPERAND_ID_TD_EPOCH = 0xA9

# TDVMCALLs (guest -> host) and their status codes
TDVMCALL_MAP_GPA = 0x10001
TDVMCALL_GET_QUOTE = 0x10002
TDVMCALL_REPORT_FATAL_ERROR = 0x10003
TDVMCALL_STATUS_SUCCESS = 0x0000000000000000
TDVMCALL_STATUS_RETRY = 0x0000000000000001
TDVMCALL_STATUS_INVALID_OPERAND = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED = 0x8000000000000003
TDX_MAP_GPA_MAX_LEN = 2 << 20
