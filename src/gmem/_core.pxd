# cython: language_level=3
# The C-level API of gmem's core, for the rest of the core and for other Cython or C
# projects (`from gmem._core cimport ...`, or `cimport gmem`).  Every function here is
# `noexcept nogil`: results come back as return codes (0 or a negative errno, as in the
# kernel), never as Python exceptions; where a user would want to know which rule refused,
# gmem_reason(host) names it (a static string, valid until the host's next call).
#
# Two sections, as include/linux/xarray.h fences its internals:
#   STABLE           the calls, constants and result structs a simulator needs to build and
#                    drive a model without Python objects: GMEM_CAPI_VERSION changes whenever
#                    anything in this section changes (tests/test_cimport.py checks it);
#   LAYOUT PRIVATE   the structs' fields and the internal functions the core's files call
#                    each other through: they may change with any commit.
# src/gmem/README.md says which .pxi file holds which kernel file's rules.

from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

# ======================================================================================
#                                        STABLE
# ======================================================================================

cdef enum:
    GMEM_CAPI_VERSION = 6

# Opaque to stable users: reach them only through the calls below.
ctypedef struct gmem_host
ctypedef struct kvm
ctypedef struct kvm_vcpu
ctypedef struct gmem_file

cdef enum:
    # VM types (arch/x86/include/uapi/asm/kvm.h)
    KVM_X86_DEFAULT_VM = 0
    KVM_X86_SW_PROTECTED_VM = 1
    KVM_X86_SEV_VM = 2
    KVM_X86_SEV_ES_VM = 3
    KVM_X86_SNP_VM = 4
    KVM_X86_TDX_VM = 5
    KVM_MAX_VM_TYPES = 32
    KVM_MAX_VCPU_IDS = 4096
    # mapping levels
    PG_LEVEL_4K = 1
    PG_LEVEL_2M = 2
    PG_LEVEL_1G = 3
    KVM_MAX_HUGEPAGE_LEVEL = 3
    # arch/x86/kvm/mmu/mmu_internal.h: the fault path's outcomes
    RET_PF_CONTINUE = 0
    RET_PF_RETRY = 1
    RET_PF_EMULATE = 2
    RET_PF_WRITE_PROTECTED = 3
    RET_PF_INVALID = 4
    RET_PF_FIXED = 5
    RET_PF_SPURIOUS = 6
    # include/uapi/linux/kvm.h
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_MEMORY_FAULT = 39
    KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
    KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
    KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
    KVM_MEM_READONLY = 1 << 1
    KVM_MEM_GUEST_MEMFD = 1 << 2
    GUEST_MEMFD_FLAG_MMAP = 1 << 0
    KVM_GUEST_MEMFD_ALLOW_HUGEPAGE = 1 << 0   # the RFC's base (6.8-rc), dropped before 6.8
    GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
    # proposed uAPI, in no kernel: HugeTLB-backed guest_memfd (Ackerley Tng's "1G page support
    # for guest_memfd" RFC v2, 2025-05): the flag, and log2 of the page size in bits 58..63
    # (0: the default size), as MAP_HUGE_* encodes it
    GUEST_MEMFD_FLAG_HUGETLB = 1 << 2
    GUESTMEM_HUGETLB_FLAG_SHIFT = 58
    GUESTMEM_HUGETLB_FLAG_MASK = 0x3f
    # capabilities (KVM_CHECK_EXTENSION)
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_MULTI_ADDRESS_SPACE = 118
    KVM_CAP_EXIT_HYPERCALL = 201
    KVM_CAP_USER_MEMORY2 = 231
    KVM_CAP_MEMORY_FAULT_INFO = 232
    KVM_CAP_MEMORY_ATTRIBUTES = 233
    KVM_CAP_GUEST_MEMFD = 234
    KVM_CAP_VM_TYPES = 235
    KVM_CAP_PRE_FAULT_MEMORY = 236
    KVM_CAP_GUEST_MEMFD_FLAGS = 244
    # include/uapi/linux/kvm_para.h
    KVM_HC_MAP_GPA_RANGE = 12
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
    KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
    # include/uapi/linux/falloc.h
    FALLOC_FL_KEEP_SIZE = 0x01
    FALLOC_FL_PUNCH_HOLE = 0x02
    FALLOC_FL_COLLAPSE_RANGE = 0x08
    FALLOC_FL_ZERO_RANGE = 0x10
    FALLOC_FL_INSERT_RANGE = 0x20
    FALLOC_FL_UNSHARE_RANGE = 0x40
    FALLOC_FL_WRITE_ZEROES = 0x80
    # platforms of a simulated host
    GMEM_PLATFORM_NONE = 0
    GMEM_PLATFORM_AMD = 1          # DEFAULT, SEV, SEV_ES, SNP VM types; an RMP
    GMEM_PLATFORM_INTEL = 2        # DEFAULT, TDX VM types
    # kernel versions a host models (gmem.Host(kernel=...)): each a bundle of the rules that
    # differ, named in comments where they are applied
    GMEM_KERNEL_RFC_2023 = 0        # "KVM: gmem hooks/changes needed for x86" (Oct 2023)
    GMEM_KERNEL_6_18 = 1
    GMEM_KERNEL_7_2 = 2             # the latest stable (the default)
    GMEM_KERNEL_NEXT = 3            # kvm-x86 as of late 2026: hook renames, in-place conversion
    # policies (gmem.Host options)
    GMEM_PREPARE_FAULT = 0          # Linux 6.12+: prepare at the first kvm_gmem_get_pfn
    GMEM_PREPARE_ALLOC = 1          # the RFC: prepare whenever a folio is obtained
    GMEM_TRACK_GMEM = 0             # "prepared" is the folio's uptodate flag
    GMEM_TRACK_ARCH = 1             # gmem does not track; the arch hook must be idempotent
    GMEM_INVALIDATE_FREE_FOLIO = 0
    GMEM_INVALIDATE_INVALIDATE_FOLIO = 1
    # huge pages (proposed upstream; gmem.Host(gmem_backing=, huge_split=, huge_merge=))
    GMEM_BACKING_BUDDY = 0          # THP-like 2M folios from the buddy allocator (huge_folios)
    GMEM_BACKING_HUGETLB = 1        # every guest_memfd from the hugetlb pool
    GMEM_HUGE_SPLIT_NEVER = 0       # the folio stays whole; the arch tracks 4K state (RFC 2023)
    GMEM_HUGE_SPLIT_CONVERT = 1     # to shared: the huge folio goes to order 0
    GMEM_HUGE_SPLIT_CONVERT_2M = 2  # ... a 1G folio to 2M first, only the 2M parts touched to 0
    GMEM_HUGE_SPLIT_FRESH = 3       # CONVERT, and a new folio goes to 0 at once unless its
                                    # whole range is private (the HugeTLB WIP tree)
    GMEM_HUGE_MERGE_NEVER = 0
    GMEM_HUGE_MERGE_EAGER = 1       # at the conversion that makes the whole range private
    GMEM_HUGE_MERGE_LAZY = 2        # at the next kvm_gmem_get_pfn in the range

cdef extern from *:
    # arch/x86/include/asm/kvm_host.h: the 64-bit error code's bits (constants, so the compiler
    # folds them into the fault path)
    """
    #define GMEM_PFERR_PRESENT_MASK (1ULL << 0)
    #define GMEM_PFERR_WRITE_MASK (1ULL << 1)
    #define GMEM_PFERR_USER_MASK (1ULL << 2)
    #define GMEM_PFERR_RSVD_MASK (1ULL << 3)
    #define GMEM_PFERR_FETCH_MASK (1ULL << 4)
    #define GMEM_PFERR_GUEST_RMP_MASK (1ULL << 31)
    #define GMEM_PFERR_GUEST_FINAL_MASK (1ULL << 32)
    #define GMEM_PFERR_GUEST_PAGE_MASK (1ULL << 33)
    #define GMEM_PFERR_GUEST_ENC_MASK (1ULL << 34)
    #define GMEM_PFERR_GUEST_SIZEM_MASK (1ULL << 35)
    #define GMEM_PFERR_IMPLICIT_ACCESS (1ULL << 48)
    #define GMEM_PFERR_PRIVATE_ACCESS (1ULL << 49)
    #define GMEM_PFERR_SYNTHETIC_MASK (GMEM_PFERR_IMPLICIT_ACCESS | GMEM_PFERR_PRIVATE_ACCESS)
    """
    const uint64_t PFERR_PRESENT_MASK "GMEM_PFERR_PRESENT_MASK"
    const uint64_t PFERR_WRITE_MASK "GMEM_PFERR_WRITE_MASK"
    const uint64_t PFERR_USER_MASK "GMEM_PFERR_USER_MASK"
    const uint64_t PFERR_RSVD_MASK "GMEM_PFERR_RSVD_MASK"
    const uint64_t PFERR_FETCH_MASK "GMEM_PFERR_FETCH_MASK"
    const uint64_t PFERR_GUEST_RMP_MASK "GMEM_PFERR_GUEST_RMP_MASK"
    const uint64_t PFERR_GUEST_FINAL_MASK "GMEM_PFERR_GUEST_FINAL_MASK"
    const uint64_t PFERR_GUEST_PAGE_MASK "GMEM_PFERR_GUEST_PAGE_MASK"
    const uint64_t PFERR_GUEST_ENC_MASK "GMEM_PFERR_GUEST_ENC_MASK"
    const uint64_t PFERR_GUEST_SIZEM_MASK "GMEM_PFERR_GUEST_SIZEM_MASK"
    const uint64_t PFERR_IMPLICIT_ACCESS "GMEM_PFERR_IMPLICIT_ACCESS"
    const uint64_t PFERR_PRIVATE_ACCESS "GMEM_PFERR_PRIVATE_ACCESS"
    const uint64_t PFERR_SYNTHETIC_MASK "GMEM_PFERR_SYNTHETIC_MASK"

# Counters: indices into gmem_host_stat / kvm_vm_stat / kvm_vcpu_stat (KVM's names first).
cdef enum:
    VCPU_STAT_PF_TAKEN
    VCPU_STAT_PF_FIXED
    VCPU_STAT_PF_SPURIOUS
    VCPU_STAT_PF_EMULATE
    VCPU_STAT_PF_FAST
    VCPU_STAT_PF_RETRY
    VCPU_STAT_MEMORY_FAULT_EXITS
    VCPU_STAT_SYNTHETIC_CLEARED
    VCPU_NR_STATS

cdef enum:
    VM_STAT_REMOTE_TLB_FLUSH
    VM_STAT_ZAPPED_SPTES
    VM_STAT_MMU_INVALIDATIONS
    VM_STAT_GMEM_PREPARE
    VM_STAT_GMEM_PREPARE_FAILED
    VM_NR_STATS

cdef enum:
    HOST_STAT_FOLIOS_ALLOCATED
    HOST_STAT_FOLIOS_FREED
    HOST_STAT_FOLIO_SPLITS
    HOST_STAT_GMEM_INVALIDATE
    HOST_STAT_GMEM_INVALIDATE_PAGES
    HOST_STAT_ALLOC_FAILURES
    HOST_STAT_HOOK_ERRORS
    HOST_STAT_FOLIO_MERGES          # huge folios restructured back (huge_merge)
    HOST_STAT_HUGE_EAGAIN           # punches and merges refused for a reference (-EAGAIN)
    HOST_NR_STATS

# gmem.Host(...) as a C struct: gmem_host_config_init() fills in the defaults (Linux 6.18).
ctypedef struct gmem_host_config:
    uint64_t memory                 # bytes of host physical memory (a multiple of 4096)
    int platform                    # GMEM_PLATFORM_*
    int kernel                      # GMEM_KERNEL_*: set it, then gmem_host_config_kernel()
                                    # gives the policies below that version's defaults
    int tdp                         # two-dimensional paging (tdp_enabled)
    int numa_nodes                  # NUMA nodes the memory is split into (1 .. GMEM_MAX_NUMNODES)
    int sw_protected                # KVM_X86_SW_PROTECTED_VM available
    int memory_attributes           # KVM_SET_MEMORY_ATTRIBUTES exists
    int prepare_policy              # GMEM_PREPARE_*
    int prepared_tracking           # GMEM_TRACK_*
    int invalidate_policy           # GMEM_INVALIDATE_*
    int huge_folios                 # 2M guest_memfd folios (proposed upstream)
    int reattach_private            # invalidate_folio: re-attach folio->private after a split
    int scramble_on_conversion      # SW_PROTECTED: a converted page reads back as garbage
    int content_memfd               # gmem exec: each inode's contents in a memfd another
                                    # process can map (_contents_memfd.pxi)
    int gmem_backing                # GMEM_BACKING_*
    uint64_t hugetlb_pages_2m       # the hugetlb pool reserved at boot (hugepages=)
    uint64_t hugetlb_pages_1g
    int huge_split                  # GMEM_HUGE_SPLIT_*
    int huge_merge                  # GMEM_HUGE_MERGE_*
    int tdx_huge_page               # the proposed kvm_intel.tdx_huge_page: the largest private
                                    # S-EPT leaf once a TD runs (PG_LEVEL_2M, PG_LEVEL_1G), 0 off

# struct kvm_userspace_memory_region2 (guest_memfd is resolved by the caller: see
# kvm_set_memory_region)
ctypedef struct kvm_userspace_memory_region2:
    uint32_t slot
    uint32_t flags
    uint64_t guest_phys_addr
    uint64_t memory_size
    uint64_t userspace_addr
    uint64_t guest_memfd_offset
    uint32_t guest_memfd

# struct kvm_memory_attributes
ctypedef struct kvm_memory_attributes:
    uint64_t address
    uint64_t size
    uint64_t attributes
    uint64_t flags

# struct kvm_pre_fault_memory (gpa and size are updated in place)
ctypedef struct kvm_pre_fault_memory:
    uint64_t gpa
    uint64_t size
    uint64_t flags

# One fault's outcome, laid out as gmem.FAULT_DTYPE.
ctypedef struct kvm_fault_out:
    int32_t ret                 # RET_PF_* or -errno
    uint32_t exit_reason        # 0 or KVM_EXIT_MEMORY_FAULT
    uint64_t pfn
    uint64_t gpa                # memory_fault.gpa
    uint64_t flags              # memory_fault.flags
    uint8_t level

# ---- the simulated machine
cdef void gmem_host_config_init(gmem_host_config *cfg) noexcept nogil
# The policies of cfg.kernel's bundle (prepare, prepared_tracking, invalidate, huge_folios).
cdef void gmem_host_config_kernel(gmem_host_config *cfg) noexcept nogil
# 0 with *out (one reference, the caller's), or -EINVAL (reason set in *why) / -ENOMEM.
cdef int gmem_host_create(const gmem_host_config *cfg, gmem_host **out, const char **why) noexcept nogil
cdef void gmem_host_put(gmem_host *h) noexcept nogil
# The rule behind the host's last refused call (a static string), or NULL.
cdef const char *gmem_reason(const gmem_host *h) noexcept nogil
cdef uint64_t gmem_host_stat(const gmem_host *h, int which) noexcept nogil
cdef uint64_t gmem_host_free_pages(const gmem_host *h) noexcept nogil
# Every structure against the others: 0, or -1 with the first inconsistency in buf.
cdef int gmem_host_check(gmem_host *h, char *buf, size_t len) noexcept nogil
# memory_failure(pfn): 1 for a guest_memfd page (poisoned and unmapped), 0 otherwise.
cdef int gmem_memory_failure(gmem_host *h, uint64_t pfn) noexcept nogil
# KVM_CHECK_EXTENSION on /dev/kvm (kvm NULL) or on a VM.
cdef int64_t kvm_check_extension(gmem_host *h, kvm *kvm, uint64_t cap) noexcept nogil

# ---- VMs and vCPUs (virt/kvm/kvm_main.c)
# KVM_CREATE_VM: 0 with *out holding the VM fd's reference, or -errno.
cdef int kvm_create_vm(gmem_host *h, uint64_t vm_type, kvm **out) noexcept nogil
# close() of the VM fd: the VM is destroyed when no guest_memfd of it is open either.
cdef void kvm_put_kvm(kvm *kvm) noexcept nogil
cdef int kvm_vm_type(const kvm *kvm) noexcept nogil
# KVM_CREATE_VCPU: 0 with *out (owned by the VM), or -EINVAL / -EEXIST / -ENOMEM.
cdef int kvm_vm_ioctl_create_vcpu(kvm *kvm, uint64_t id, kvm_vcpu **out) noexcept nogil
cdef kvm_vcpu *kvm_get_vcpu_by_id(kvm *kvm, uint64_t id) noexcept nogil
cdef uint64_t kvm_vm_stat(const kvm *kvm, int which) noexcept nogil
cdef uint64_t kvm_vcpu_stat(const kvm_vcpu *vcpu, int which) noexcept nogil
# SPTEs mapped at a level (pages_4k, pages_2m, pages_1g)
cdef uint64_t kvm_vm_pages(const kvm *kvm, int level) noexcept nogil
# KVM_SET_USER_MEMORY_REGION(2): file is the guest_memfd the caller resolved mem.guest_memfd
# to, or NULL with fdget_err the error fdget() would give (-EBADF, or -EINVAL for an open fd
# that is not a guest_memfd); reported where kvm_gmem_bind() would report it.
cdef int kvm_set_memory_region(kvm *kvm, const kvm_userspace_memory_region2 *mem, int v2,
                               gmem_file *file, int fdget_err) noexcept nogil
# KVM_SET_MEMORY_ATTRIBUTES
cdef int kvm_vm_ioctl_set_mem_attributes(kvm *kvm, const kvm_memory_attributes *attrs) noexcept nogil
cdef uint64_t kvm_get_memory_attributes(kvm *kvm, uint64_t gfn) noexcept nogil
# KVM_ENABLE_CAP on the VM
cdef int kvm_vm_ioctl_enable_cap(kvm *kvm, uint64_t cap, uint64_t arg0) noexcept nogil
# the minimal launch for the VM type (no-op for DEFAULT/SW_PROTECTED): vm.launch()
cdef int kvm_launch(kvm *kvm) noexcept nogil
# kvm_vm_ioctl / kvm_vcpu_ioctl's first check: -EIO once the VM is dead (kvm_vm_dead), else 0.
# Call it before any VM or vCPU ioctl; the C functions above assume it was.
cdef int kvm_ioctl_check_dead(kvm *kvm) noexcept nogil
cdef void kvm_vm_dead(kvm *kvm) noexcept nogil
# KVM_RUN's checks before entering the guest (vcpu_pre_run): 0, or -EINVAL (an SNP vCPU
# before LAUNCH_FINISH, a TD vCPU before KVM_TDX_INIT_VCPU and KVM_TDX_FINALIZE_VM) / -EIO.
# kvm_mmu_page_fault makes the same check and reports it in out.ret.
cdef int kvm_vcpu_pre_run(kvm_vcpu *vcpu) noexcept nogil

# ---- guest_memfd (virt/kvm/guest_memfd.c)
# KVM_CREATE_GUEST_MEMFD: 0 with *out holding the new fd's reference, or -errno.
cdef int kvm_gmem_create(kvm *kvm, uint64_t size, uint64_t flags, gmem_file **out) noexcept nogil
cdef void kvm_gmem_get_file(gmem_file *file) noexcept nogil         # fget / dup
cdef void kvm_gmem_put_file(gmem_file *file) noexcept nogil         # fput: the last one releases
# fallocate(2) on a guest_memfd: vfs_fallocate's checks, then kvm_gmem_fallocate's.
cdef int kvm_gmem_fallocate(gmem_file *file, uint64_t mode, uint64_t offset, uint64_t len) noexcept nogil
cdef uint64_t kvm_gmem_size(const gmem_file *file) noexcept nogil

# ---- the fault path (arch/x86/kvm/mmu/mmu.c)
cdef int kvm_mmu_page_fault(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                            kvm_fault_out *out) noexcept nogil
# The batch: n faults in order, fault i taken by vcpus[ids[i]] (ids NULL: all by vcpus[0]),
# with the prefetching pipeline. Stops early only if a Python hook raised (returns the count
# done); out[i] for i < that count is filled.
cdef size_t kvm_mmu_page_fault_batch(kvm_vcpu **vcpus, const uint64_t *ids, const uint64_t *gpas,
                                     const uint64_t *error_codes, kvm_fault_out *out,
                                     size_t n) noexcept nogil
# KVM_PRE_FAULT_MEMORY: 0 (range advanced past what was mapped) or -errno if nothing was.
cdef int kvm_vcpu_pre_fault_memory(kvm_vcpu *vcpu, kvm_pre_fault_memory *range) noexcept nogil

# Handles -> structs, for Cython code holding Python objects:
#   cdef kvm_vcpu *v = gmem_vcpu_ptr(vcpu)        # vcpu: a gmem.Vcpu
#   with nogil:
#       kvm_mmu_page_fault(v, gpa, error_code, &out)
# The pointers stay valid while the Python objects live (and the VM is not destroyed).
cdef kvm_vcpu *gmem_vcpu_ptr(object vcpu) except NULL
cdef kvm *gmem_vm_ptr(object vm) except NULL
cdef gmem_host *gmem_host_ptr(object host) except NULL


# ======================================================================================
#                         LAYOUT PRIVATE: may change with any commit
# ======================================================================================

# errnos (include/uapi/asm-generic/errno*.h): the C library's, the one home of the numbers
cdef extern from "<errno.h>":
    enum:
        EPERM
        ENOENT
        EINTR
        EIO
        EBADF
        EAGAIN
        ENOMEM
        EACCES
        EFAULT
        EEXIST
        ENODEV
        EINVAL
        ENOTTY
        EFBIG
        ESPIPE
        EDEADLK
        EOPNOTSUPP
        EOVERFLOW
        EHWPOISON

# ---------------------------------------------------------------- lib/xarray.c
cdef enum:
    XA_CHUNK_SHIFT = 6
    XA_CHUNK_SIZE = 64
    XA_CHUNK_MASK = 63
    XA_MAX_MARKS = 3
    XA_MAX_ORDER = 63
    XA_NO_MARK = -1
    XA_NODE_CACHE = 8

# A slot holds 0 (empty), a value (v << 1 | 1, like xa_mk_value), a sibling
# (canonical offset << 2 | 2, like xa_mk_sibling) or a pointer to a child node.
ctypedef struct xa_node:
    uint8_t shift          # each slot covers 1 << shift indices
    uint8_t offset         # this node's slot in its parent
    uint8_t count          # occupied slots (entries, siblings and children)
    xa_node *parent
    uint64_t marks[3]      # per slot; for a child: set if any entry below is marked
    uint64_t slots[64]

ctypedef struct xarray:
    xa_node *head
    uint64_t nr_entries
    uint64_t nr_nodes
    xa_node *node_cache         # up to XA_NODE_CACHE freed nodes kept for reuse (not counted)
    uint64_t node_gen           # bumped when a node is freed (from a value unique to this
                                # array, taken by xa_init): a node a cursor found earlier is
                                # still on its index's path while node_gen is unchanged
    uint32_t nr_cached
    uint64_t nr_by_order[64]   # entries of each order (nr_indices = sum n << order)

# struct xa_state: a caller's cursor (see _xarray.pxi). It stands on the node its last walk
# ended in, reached for xa_node_index; the next walk starts there for any index in that
# node's range while the array's node_gen is still xa_gen (XA_GEN_NOWHERE: it stands
# nowhere).
ctypedef struct xa_state:
    xarray *xa
    uint64_t xa_index
    uint64_t xa_gen
    uint64_t xa_node_index
    xa_node *xa_node
    uint8_t xa_shift            # xa_node's shift (carried: its header is not read)
    uint8_t xa_offset           # the canonical slot of xa_index's entry in xa_node

cdef void xa_init(xarray *xa) noexcept nogil
cdef void xa_destroy(xarray *xa) noexcept nogil
# 1 and *value set if an entry covers index, else 0.
cdef int xa_load(const xarray *xa, uint64_t index, uint64_t *value) noexcept nogil
# Like xa_load, also giving the entry's first index and order.
cdef int xa_lookup(const xarray *xa, uint64_t index, uint64_t *value,
                   uint64_t *first, int *order) noexcept nogil
cdef int xa_get_order(const xarray *xa, uint64_t index) noexcept nogil
# The address of index's slot in its leaf node (not read), or NULL: for prefetching.
cdef const uint64_t *xa_leaf_slot(const xarray *xa, uint64_t index) noexcept nogil
# Store value over the naturally aligned range of 1 << order indices at index
# (index must be aligned).  A store into part of a larger entry stores at every
# index of that entry; smaller entries inside the range are replaced by one entry.
# Returns 1 (*old = the previous value at index) or 0 (was empty), or -ENOMEM.
cdef int xa_store_order(xarray *xa, uint64_t index, int order, uint64_t value,
                        uint64_t *old) noexcept nogil
# Cover [first, last] (inclusive) with maximal aligned entries.  0 or -ENOMEM.
cdef int xa_store_range(xarray *xa, uint64_t first, uint64_t last, uint64_t value) noexcept nogil
# Erase the whole entry covering index: 1 (*old set) or 0.
cdef int xa_erase(xarray *xa, uint64_t index, uint64_t *old) noexcept nogil
# Erase every entry overlapping [first, last]; returns the number erased.
cdef uint64_t xa_erase_range(xarray *xa, uint64_t first, uint64_t last) noexcept nogil
# Split the entry covering index into entries of order; each keeps the value and
# marks.  0, -ENOENT (no entry), -EINVAL (order not below the entry's), -ENOMEM.
cdef int xa_split(xarray *xa, uint64_t index, int order) noexcept nogil
# The lowest entry overlapping [start, last] (with mark set, unless mark is
# XA_NO_MARK): 1 with its first index, order and value, or 0.
cdef int xa_find_entry(const xarray *xa, uint64_t start, uint64_t last, int mark,
                       uint64_t *first, int *order, uint64_t *value) noexcept nogil
# xa_find: *index = max(start, first index of the entry found).
cdef int xa_find(const xarray *xa, uint64_t *index, uint64_t last, int mark,
                 uint64_t *value) noexcept nogil
# xa_find_after: the first entry starting after the entry covering *index.
cdef int xa_find_after(const xarray *xa, uint64_t *index, uint64_t last, int mark,
                       uint64_t *value) noexcept nogil
cdef void xa_set_mark(xarray *xa, uint64_t index, int mark) noexcept nogil
cdef void xa_clear_mark(xarray *xa, uint64_t index, int mark) noexcept nogil
cdef int xa_get_mark(const xarray *xa, uint64_t index, int mark) noexcept nogil
cdef size_t xa_memory_bytes(const xarray *xa) noexcept nogil
# Internal consistency (counts, siblings, marks, parents): 0 or a negative code.
cdef int xa_check(const xarray *xa) noexcept nogil

# ------------------------------------------------- mm/page_alloc.c, mm/filemap.c
cdef enum:
    MAX_PAGE_ORDER = 18          # largest buddy block: 1 GiB of 4 KiB pages
    GMEM_MAX_NUMNODES = 8        # (MAX_NUMNODES on x86 is 1 << CONFIG_NODES_SHIFT)
    NR_PAGE_ORDERS = 19
    PCP_HIGH = 512               # per-cpu list of free 4K pages: drained above this ...
    PCP_BATCH_ORDER = 6          # ... and refilled / drained 64 pages at a time
    FOLIO_CHUNK_SHIFT = 12       # folios are allocated in chunks of 4096 structs
    FOLIO_PAD = 30               # sizeof(folio) == 64, chunks aligned to 64
    # folio->flags
    PG_uptodate = 1 << 0         # gmem: "prepared" (kvm_gmem_mark_prepared)
    PG_private = 1 << 1          # folio->private holds data (invalidate_folio policy)
    PG_hwpoison = 1 << 2         # memory failure (kvm_gmem_error_folio)
    PG_leaked = 1 << 3           # snp_leak_pages: never given back to the allocator
    PG_hugetlb = 1 << 4          # from the hugetlb pool: freed pages go back to their huge page
    # mm/hugetlb.c: the pool's page sizes
    HSTATE_2M = 0
    HSTATE_1G = 1
    HUGE_MAX_HSTATE = 2

ctypedef struct folio:
    uint64_t pfn
    uint64_t index         # offset in its mapping, in pages
    uint64_t private       # the owner's private word (folio->private)
    uint32_t mapping       # owner inode id, 0 = none
    int32_t refcount
    uint8_t order
    uint8_t flags
    # to a cache line, as struct page is 64 bytes: a random fault reads one line of its folio
    # (a 40-byte struct straddled two half the time: +0.5 random lines a slow-path fault)
    uint8_t _pad[FOLIO_PAD]

# struct hstate: the pool of one huge page size, taken from the buddy allocator at boot
ctypedef struct hstate:
    uint8_t order
    uint64_t nr_huge_pages      # HugePages_Total
    uint64_t free_huge_pages    # HugePages_Free: no folio in them
    uint64_t resv_huge_pages    # HugePages_Rsvd: promised to files, not yet in use
    xarray pages                # head pfn >> order -> 1, marked (HSTATE_FREE_MARK) while free

# Host physical memory: pfns [start_pfn, end_pfn).  Pfns at and above the
# watermark have never been handed out and take no memory to describe, so a
# host of 16 TiB costs nothing until it is used.
ctypedef struct physmem:
    uint64_t start_pfn
    uint64_t end_pfn
    uint64_t watermark
    uint64_t nr_free_pages
    uint64_t fail_alloc          # fault injection: fail this many allocations
    int pcp_enabled              # order-0 pages go through pcp (the Host's allocator)
    uint32_t pcp_count
    uint64_t pcp[512]            # free 4K pages kept out of the buddy lists (free_unref_page)
    xarray free_area[19]         # index pfn >> order of each free block
    # folio table: ids index chunked arrays of structs (a struct never moves, so a
    # folio * stays valid while its id is held); id 0 is never used
    folio **folio_chunks
    uint32_t nr_chunks
    uint32_t folio_next_id       # ids below this have been handed out once
    uint32_t folio_free_id       # head of the list of released ids (0 = none)
    uint64_t nr_folios
    xarray memmap                # pfn -> folio id (multi-index: the folio's order)
    uint32_t nr_nodes            # NUMA nodes: node n is [node_end[n - 1] (or start_pfn), node_end[n]);
    uint64_t node_end[8]         # no free block crosses a node's end
    xa_state memmap_xas          # folio_alloc's cursor in it
    hstate hstates[2]            # the hugetlb pool: HSTATE_2M, HSTATE_1G

cdef int phys_init(physmem *pm, uint64_t start_pfn, uint64_t nr_pages) noexcept nogil
cdef void phys_destroy(physmem *pm) noexcept nogil
# Allocate a naturally aligned block: 0 with *pfn set, or -ENOMEM.
cdef int phys_alloc(physmem *pm, int order, uint64_t *pfn) noexcept nogil
# Return a block (coalescing with free buddies).  The caller guarantees it was allocated.
cdef void phys_free(physmem *pm, uint64_t pfn, int order) noexcept nogil
# Give every page on the per-cpu list back to the buddy lists (drain_all_pages).
cdef void phys_drain_pcp(physmem *pm) noexcept nogil
# 0 if [pfn, pfn + 1 << order) is wholly allocated, else -EINVAL (free or out of range).
cdef int phys_check_allocated(const physmem *pm, uint64_t pfn, int order) noexcept nogil
cdef uint64_t phys_nr_free_blocks(const physmem *pm, int order) noexcept nogil

cdef folio *folio_get(const physmem *pm, uint32_t id) noexcept nogil
# 0 and *id, or -ENOMEM.  The folio starts with refcount 1, no mapping, no flags.
cdef int folio_alloc(physmem *pm, int order, uint32_t *id) noexcept nogil
# Drop the folio and give its pages back to the allocator (or, from the hugetlb pool, to
# their huge page: 1 when that made the huge page free).
cdef int folio_free(physmem *pm, uint32_t id) noexcept nogil
# Split into folios of new_order (head keeps id and private word; tails are new
# ids with the same mapping, consecutive indices and flags).  0 or -ENOMEM.
cdef int folio_split(physmem *pm, uint32_t id, int new_order) noexcept nogil
# The folio containing pfn: its id, or 0.
cdef uint32_t pfn_folio(const physmem *pm, uint64_t pfn) noexcept nogil

# ------------------------------------------- virt/kvm: gmem, memslots, x86 mmu
cdef enum:
    KVM_LPAGE_MIXED_FLAG = 1 << 31
    KVM_LPAGE_GUEST_INHIBIT_FLAG = 1 << 30      # proposed (TDX huge pages v3 12/24)
    # zap filters (enum kvm_gfn_range_filter)
    KVM_FILTER_SHARED = 1
    KVM_FILTER_PRIVATE = 2

# Trace events (kernel tracepoints of the same meaning)
cdef enum:
    TRACE_PAGE_FAULT            # kvm_page_fault: a = gpa, b = 64-bit error code
    TRACE_SPTE_INSTALL          # a = gfn, b = pfn, c = level, d = private
    TRACE_SPTE_ZAP              # a = gfn, b = pfn, c = level
    TRACE_MEMORY_FAULT_EXIT     # a = gpa, b = flags, c = -ret
    TRACE_GMEM_PREPARE          # a = gfn, b = pfn, c = order, d = -ret
    TRACE_GMEM_INVALIDATE       # a = start pfn, b = end pfn
    TRACE_RMPUPDATE             # a = pfn, b = gpa, c = assigned | pagesize << 1 | asid << 32, d = code
    TRACE_PSMASH                # a = 2M head pfn, d = code
    TRACE_PVALIDATE             # a = gpa, b = pfn, c = pagesize | validate << 1, d = code (a vCPU's)
    TRACE_SET_MEMORY_ATTRIBUTES # a = start gfn, b = end gfn, c = attributes, d = -ret
    TRACE_GMEM_FALLOCATE        # a = inode number, b = offset, c = length, d = mode | -ret << 32
    TRACE_FOLIO_SPLIT           # a = head pfn, b = old order, c = new order
    TRACE_MEMORY_FAILURE        # a = pfn, d = handled (a guest_memfd folio)
    TRACE_TDX_PAGE_AUG          # a = gfn, b = pfn, c = level
    TRACE_TDX_PAGE_ADD          # a = gfn, b = pfn, c = level
    TRACE_TDX_RANGE_BLOCK       # a = gfn, c = level
    TRACE_TDX_TRACK             # (once per removal while the TD runs)
    TRACE_TDX_PAGE_REMOVE       # a = gfn, b = pfn, c = level
    TRACE_TDX_ACCEPT            # a = gpa, b = pfn, d = TDX status (a vCPU's)
    TRACE_MAP_GPA_RANGE         # a = gpa, b = npages, c = attributes, d = hypercall.ret (a vCPU's:
                                # the KVM_HC_MAP_GPA_RANGE exit of a PSC or MapGPA, as answered)
    TRACE_FOLIO_MERGE           # a = head pfn, b = new order (huge_merge, or before a hugetlb free)
    TRACE_TDX_PAGE_DEMOTE       # a = gfn, b = pfn, c = level (of the leaf split; proposed)
    TRACE_NR_EVENTS

ctypedef struct gmem_trace_rec:
    uint64_t seq
    uint32_t event
    uint32_t vcpu
    uint64_t a
    uint64_t b
    uint64_t c
    uint64_t d

# The per-VM-type hook table (struct kvm_x86_ops, the parts gmem touches).
# NULL means "not implemented" (the kernel's OPTIONAL/OPTIONAL_RET0 ops).
ctypedef int (*is_private_fault_t)(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil
ctypedef int (*gmem_prepare_t)(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil
ctypedef void (*gmem_invalidate_t)(gmem_host *host, uint64_t start, uint64_t end) noexcept nogil
ctypedef int (*private_max_mapping_level_t)(kvm *kvm, uint64_t pfn) noexcept nogil
ctypedef void (*handle_rmp_fault_t)(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code) noexcept nogil
# TDX's external (S-EPT) page-table ops, for private leaves of the mirror root
ctypedef int (*set_external_spte_t)(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil
ctypedef void (*remove_external_spte_t)(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil
# ... and the split of a huge one into 512 of the next level (0 or -errno, nothing changed)
ctypedef int (*split_external_spte_t)(kvm *kvm, uint64_t gfn, int level, uint64_t pfn) noexcept nogil
# The vendor's exit handler for a fault (tdx_handle_ept_violation), for a VM type whose faults
# do not take the common entry; *out filled as kvm_mmu_page_fault fills it
ctypedef int (*handle_ept_violation_t)(kvm_vcpu *vcpu, uint64_t gpa, uint64_t error_code,
                                       kvm_fault_out *out) noexcept nogil
ctypedef int (*vm_init_t)(kvm *kvm) noexcept nogil
ctypedef void (*vm_destroy_t)(kvm *kvm) noexcept nogil
ctypedef int (*vm_launch_t)(kvm *kvm) noexcept nogil
ctypedef int (*vcpu_create_t)(kvm_vcpu *vcpu) noexcept nogil

ctypedef struct kvm_x86_hooks:
    is_private_fault_t is_private_fault
    gmem_prepare_t gmem_prepare         # "next": make_private (given log2(npages))
    gmem_invalidate_t gmem_invalidate   # "next": reclaim
    private_max_mapping_level_t private_max_mapping_level
    gmem_invalidate_t gmem_make_shared  # "next": to-shared conversion (start_pfn, end_pfn)
    handle_rmp_fault_t handle_rmp_fault
    set_external_spte_t set_external_spte
    remove_external_spte_t remove_external_spte
    handle_ept_violation_t handle_ept_violation
    vm_init_t vm_init
    vm_destroy_t vm_destroy
    vm_launch_t vm_launch
    vcpu_create_t vcpu_create   # kvm_x86_ops.vcpu_precreate + vcpu_create: 0 or -errno
    split_external_spte_t split_external_spte

# SEV-SNP host state (arch/x86/virt/svm/sev.c)
cdef enum:
    SNP_STAT_RMPUPDATE
    SNP_STAT_RMPUPDATE_FAILED
    SNP_STAT_PSMASH
    SNP_STAT_PVALIDATE
    SNP_STAT_RMP_FAULTS
    SNP_STAT_RMP_VIOLATIONS
    SNP_STAT_LEAKED_PAGES
    SNP_STAT_DIRECT_MAP_SPLITS
    SNP_NR_STATS

ctypedef struct snp_rmp:
    int enabled                 # the platform has SNP (an RMP covering all memory)
    xarray entries              # pfn -> raw low qword (struct rmpentry_raw); absent = 0.
                                # A 2M entry is stored at its head only.
    xa_state cursor             # reads and writes of entries: they follow the allocator's pfns
    uint64_t nr_2m              # 2M entries among them (none: a lookup reads no head)
    xarray perms                # pfn -> VMPL1..3 permission bytes (RMPADJUST), absent = none
    xarray direct_map_4k        # 2M region (pfn >> 9) -> 1 where the host direct map was split
    xa_state direct_map_cursor  # its reads and writes (they follow the allocator too)
    xarray leaked               # pfn -> 1: snp_leak_pages
    uint64_t fail_rmpupdate     # fault injection: fail this many RMPUPDATEs ...
    uint32_t fail_rmpupdate_code  # ... with this code
    uint64_t stats[SNP_NR_STATS]

ctypedef struct gmem_inode

# lib/maple_tree.c as guest_memfd's attributes use it (_maple.pxi): page index -> attributes,
# every index present, adjacent equal ranges merged
ctypedef struct gmem_attr_tree:
    uint64_t *starts            # range i is [starts[i], starts[i + 1]) (the last: to ULONG_MAX)
    uint64_t *vals
    uint32_t nr                 # ranges (>= 1)
    uint32_t cap

cdef int mt_init(gmem_attr_tree *mt, uint64_t value) noexcept nogil
cdef void mt_destroy(gmem_attr_tree *mt) noexcept nogil
cdef uint64_t mt_load(const gmem_attr_tree *mt, uint64_t index, uint64_t *first,
                      uint64_t *last) noexcept nogil
cdef bint mt_range_is(const gmem_attr_tree *mt, uint64_t first, uint64_t last,
                      uint64_t value) noexcept nogil
cdef int mt_preallocate(gmem_attr_tree *mt) noexcept nogil
cdef void mt_store(gmem_attr_tree *mt, uint64_t first, uint64_t last, uint64_t value) noexcept nogil
cdef int mt_check(const gmem_attr_tree *mt) noexcept nogil

# struct kvm_memory_attributes2 ("next": KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd)
ctypedef struct kvm_memory_attributes2:
    uint64_t offset
    uint64_t size
    uint64_t attributes
    uint64_t flags
    uint64_t error_offset       # out: written only on error
    uint64_t reserved[11]

# A user mapping of a guest_memfd (a VMA of the VMM): the pages it has a PTE for, so that
# folio_mapped() and unmap_mapping_pages() have something to look at
ctypedef struct gmem_vma:
    gmem_file *file
    uint64_t pgoff              # first page index mapped
    uint64_t npages
    xarray ptes                 # page index -> 1 where this mapping has a PTE
    gmem_vma *next              # inode.vmas (i_mmap)

# GUP references taken through a mapping (pin_user_pages(FOLL_LONGTERM) for DMA/VFIO, or a
# plain get_user_pages reference): one folio reference per page, held until released
ctypedef struct gmem_pin:
    gmem_file *file             # held, so the inode outlives the pin
    uint64_t first              # first page index
    uint64_t npages
    uint32_t *ids               # the folio of each page (a punched one lives on, off the page cache)
    int longterm                # FOLL_PIN (GUP_PIN_COUNTING_BIAS) or FOLL_GET (1)
# The model's own 4 KiB pages (the TDP MMU's page tables), carved from 2 MiB chunks on
# transparent huge pages; a free page is all zero but for its link (_host.pxi)
ctypedef struct gmem_page_pool:
    uint64_t *free_list         # freed pages: word 0 links the next
    char *next                  # the newest chunk's pages not handed out yet
    char *end
    void **chunks
    uint32_t nr_chunks
    uint32_t cap_chunks
    uint64_t nr_pages           # handed out and not freed

ctypedef struct gmem_host:
    int refcount                # the creator's reference and one per VM
    physmem pm
    xarray page_data            # pfn -> malloc'd 4 KiB of contents (absent: zeros)
    xarray user_pages           # VMM userspace memory: hva >> 12 -> folio id
    xarray user_mapped          # hva >> 12 -> 1 where the VMM has memory mapped (mmap_user,
                                # and the userspace range of every memslot it created)
    int platform                # GMEM_PLATFORM_*
    int kernel                  # GMEM_KERNEL_*: the version whose rules apply
    uint8_t tdp                 # tdp_enabled
    uint32_t vm_types           # KVM_CAP_VM_TYPES
    uint8_t memory_attributes   # CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
    uint8_t prepare_policy
    uint8_t prepared_tracking
    uint8_t invalidate_policy
    uint8_t huge_folios
    uint8_t reattach_private    # invalidate_folio: re-attach folio->private to tails after a split
    uint8_t scramble_on_conversion  # SW_PROTECTED: a converted page's old contents are garbage
    uint8_t gmem_in_place_conversion  # "next": kvm.gmem_in_place_conversion (per-inode attributes)
    uint8_t content_modes       # "next" + RFC v4/v5: KVM_SET_MEMORY_ATTRIBUTES2 content modes
    uint8_t gmem_backing        # GMEM_BACKING_*
    uint8_t huge_split          # GMEM_HUGE_SPLIT_*
    uint8_t huge_merge          # GMEM_HUGE_MERGE_*
    uint64_t gmem_conversions   # KVM_SET_MEMORY_ATTRIBUTES2 calls that changed attributes
    uint64_t gmem_make_shared_calls   # the arch's make_shared hook, and the pages it was given
    uint64_t gmem_make_shared_pages
    kvm_x86_hooks hooks[32]
    void *py_host               # borrowed PyObject* of the gmem.Host, or NULL
    const char *reason          # the rule behind the last refused call (a static string)
    kvm *vms                    # live (not yet destroyed) VMs, oldest first
    gmem_inode *inodes          # live guest_memfd inodes, oldest first
    uint32_t nr_vms_created     # VMs are numbered 1, 2, ... (kvm->id) in messages
    uint32_t next_ino
    int il_prev                 # the (one) task's interleave rotor (current->il_prev)
    uint32_t next_asid
    uint64_t fail_prepare       # fault injection: the next prepares fail ...
    int fail_prepare_errno      # ... with -errno
    int invalidate_vm_type      # whose gmem_invalidate is running (it gets no kvm)
    int hook_error              # a Python hook raised: stop and re-raise at the boundary
    int in_teardown             # a handle's deallocation is closing what it held: no Python
                                # hook runs (the collector may have torn them down already)
    uint64_t stats[HOST_NR_STATS]
    gmem_trace_rec *trace_buf   # ring of trace_cap records; trace_seq counts all written
    uint64_t trace_cap
    uint64_t trace_seq
    uint32_t trace_mask         # enabled events (1 << TRACE_*)
    snp_rmp rmp
    uint8_t content_memfd       # gmem exec: inode contents in memfds (_contents_memfd.pxi)
    xarray content_inodes       # ... ino -> gmem_inode * of those inodes
    gmem_page_pool pt_pool      # the VMs' page tables
    uint64_t inode_gen          # bumped when an inode is freed (a batch's ring knows its own)
    int tdx_huge_page           # gmem_host_config.tdx_huge_page (proposed kvm_intel.tdx_huge_page)

ctypedef struct gmem_inode:
    gmem_host *host
    uint64_t size               # bytes (i_size)
    uint64_t flags              # GUEST_MEMFD_FLAG_* (the RFC: KVM_GUEST_MEMFD_ALLOW_HUGEPAGE)
    uint64_t mmap_flags         # flags & GUEST_MEMFD_FLAG_MMAP where the kernel has it (6.18+)
    uint8_t allow_hugepage      # the RFC's KVM_GUEST_MEMFD_ALLOW_HUGEPAGE: 2M THP folios
    uint8_t page_order          # order of the huge folios it gets (0: 4K only)
    int8_t hstate               # HSTATE_* of a hugetlb inode, else -1
    uint64_t hugetlb_resv       # pool pages reserved for it at create (subpool)
    uint32_t ino
    int vm_type                 # of the VM that created it: whose gmem_invalidate runs
    xarray filemap              # page index -> folio id
    gmem_file *files            # the files on this inode (6.18: exactly one)
    gmem_inode *next            # host.inodes
    int memfd                   # content_memfd: the memfd holding the contents, else -1
    unsigned char *contents     # ... mapped here (NULL: contents in the host's page_data)
    gmem_attr_tree attributes   # in-place conversion: page index -> KVM_MEMORY_ATTRIBUTE_*
    gmem_attr_tree policy       # 6.19+ shared mempolicy (mbind): page index -> mode << 32 | nodes
    gmem_vma *vmas              # the user mappings of the inode (i_mmap)

ctypedef struct gmem_file:
    gmem_inode *inode
    kvm *kvm
    int refcount                # fds, mappings and other holders (fget/fput)
    xarray bindings             # page index -> memslot index
    gmem_file *next             # next file of the inode
    int inval_begun             # inside kvm_gmem_invalidate_begin/end

ctypedef struct kvm_memory_slot:
    uint64_t base_gfn
    uint64_t npages
    uint64_t userspace_addr
    uint64_t gmem_pgoff
    gmem_file *gmem_file        # NULL when unbound or its file was closed
    uint32_t *lpage_info[2]     # disallow_lpage per 2M and 1G page (KVM_LPAGE_MIXED_FLAG)
    uint32_t flags
    uint32_t id                 # as_id << 16 | slot id
    int used

# arch/x86/kvm/svm/svm.h struct kvm_sev_info, the parts gmem models
ctypedef struct kvm_sev_info:
    uint32_t asid
    int launch_started          # 0, SNP_LAUNCHING (LAUNCH_START done), SNP_LAUNCHED (FINISH)
    uint64_t policy             # the guest policy LAUNCH_START was given
    xarray vmsa_pfns            # pfn -> 1: the vCPUs' VMSA pages (snp_launch_finish)

# arch/x86/kvm/vmx/tdx.h struct kvm_tdx, the parts gmem models
cdef enum:
    TDX_NR_STATS = 9
ctypedef struct kvm_tdx:
    int state                   # enum kvm_tdx_state (TD_STATE_*)
    xarray sept                 # mirror S-EPT leaves: gfn -> pfn << 4 | TDX_SEPT_* state
    xa_state sept_xas           # ... the cursor of its stores (AUG in fault order: one leaf per 64)
    int64_t nr_premapped        # leaves mapped before FINALIZE_VM, not yet PAGE.ADDed
    uint64_t stats[TDX_NR_STATS]

ctypedef struct kvm:
    gmem_host *host
    void *py_vm                 # borrowed PyObject* of the gmem.Vm, or NULL
    int users_count             # kernel references: the VM fd and each guest_memfd file
    int handle_refs             # handles pointing at this struct: it is freed after both are 0
    int dead                    # kvm_destroy_vm ran: only the struct and its vCPUs remain
    int vm_dead                 # kvm_vm_dead (KVM_BUG_ON, a TD's unaccepted access): every VM
                                # and vCPU ioctl is -EIO from now on
    int launched_minimal        # vm.launch() stood for the whole build (vCPUs made later too)
    kvm *next                   # host.vms
    uint32_t id                 # this host's VM number (1, 2, ...)
    int vm_type
    int has_private_mem
    int has_protected_state
    int pre_fault_allowed
    uint64_t gfn_direct_bits    # TDX: the shared bit, as a gfn mask
    kvm_vcpu **vcpus            # by vcpu id (KVM_MAX_VCPU_IDS entries), NULL = none
    uint32_t created_vcpus
    kvm_memory_slot *memslots
    uint32_t nr_memslots        # entries in memslots (used or not)
    xarray slot_index           # slot id (as_id << 16 | id) -> memslots index
    xarray gfn_to_slot          # gfn -> memslots index (address space 0)
    int64_t last_used_slot      # memslots index of the last lookup (kvm_vcpu.last_used_slot)
    uint64_t attr_memo_first    # the entry of the last attribute lookup: [first, last] hold
    uint64_t attr_memo_last     # attr_memo_val, valid until attributes change
    uint64_t attr_memo_val
    int attr_memo_valid
    xarray mem_attr_array       # gfn -> memory attributes
    uint64_t *tdp_root[2]       # the TDP MMU's roots, 512-entry page tables (NULL until the
                                # first map): TDP_ROOT_DIRECT, TDP_ROOT_MIRROR (TDX's private
                                # SPTEs, forwarded to the S-EPT)
    uint64_t tdp_mmu_gen        # bumped whenever a page table is freed (tdp_cursor)
    uint64_t tdp_mmu_pages      # page tables in use, roots included (kvm->arch.tdp_mmu_pages)
    uint64_t tdp_pages[3]       # leaf SPTEs by level (kvm->stat.pages: pages_4k, _2m, _1g)
    xarray mmio_sptes           # gfn -> the memslot generation it was made in
    uint64_t memslots_generation  # bumped by every memslot change (kvm_memslots.generation)
    uint64_t mmu_invalidate_seq
    int64_t mmu_invalidate_in_progress
    uint64_t mmu_invalidate_range_start
    uint64_t mmu_invalidate_range_end
    uint64_t inject_inval_start # fault injection: an invalidation between faultin and map
    uint64_t inject_inval_end
    uint64_t stats[VM_NR_STATS]
    uint64_t hypercall_exit_enabled   # KVM_CAP_EXIT_HYPERCALL bitmap
    kvm_sev_info sev
    kvm_tdx tdx

cdef enum:
    VMGEXIT_PSC_MAX_ENTRY = 253

# struct psc_buffer (arch/x86/include/asm/sev-common.h): the guest's page-state change request
# in the GHCB shared buffer; entries are the raw psc_entry bitfields
# (cur_page:12, gfn:40, operation:4, pagesize:1, reserved:7)
ctypedef struct psc_buffer:
    uint16_t cur_entry
    uint16_t end_entry
    uint32_t reserved
    uint64_t entries[253]

ctypedef struct kvm_run_hypercall:
    uint64_t nr
    uint64_t args[6]
    uint64_t ret
    uint32_t flags

# vcpu->arch.complete_userspace_io: how KVM finishes a userspace exit once userspace answers;
# KVM_EXIT_HYPERCALL when it exits again, else 0 with *result what the guest sees
ctypedef int (*complete_userspace_io_t)(kvm_vcpu *vcpu, uint64_t ret, uint64_t *result) noexcept nogil

# How a guest access ends (_guest.pxi)
cdef enum:
    GUEST_ACCESS_OK = 0          # the access goes through (the page's pfn is known)
    GUEST_ACCESS_EXIT = 1        # it exits to userspace: the kvm_fault_out says how
    GUEST_ACCESS_FAULT = 2       # the guest takes an exception: vcpu.guest_fault
    GUEST_ACCESS_HOOK_ERROR = 3  # a Python hook raised on the way

ctypedef struct guest_fault:
    int vector                   # 14 #PF, 29 #VC
    uint64_t code                # the exception's error code (#VC: the exit code)
    uint64_t gpa
    uint64_t pfn                 # the host page involved, if any
    const char *why

cdef enum:
    TDP_ROOT_DIRECT = 0
    TDP_ROOT_MIRROR = 1
    TDP_NR_ROOTS = 2
    # kvm_mmu_max_gfn() is 2^40 - 1 (52-bit guest physical addresses: _x86.pxi), beyond a
    # 4-level root's 2^36 gfns (kvm_mmu_get_tdp_level: 5 levels past MAXPHYADDR 48)
    TDP_ROOT_LEVEL = 5          # PT64_ROOT_5LEVEL

# Not the kernel's (its walks start at the root): where a vCPU's last walk of one root
# ended, the page table pt of that level, reached for gfn while the VM's tdp_mmu_gen was gen,
# and the tables above it on gfn's path, as tdp_iter's pt_path keeps them (_tdp_mmu.pxi).
ctypedef struct tdp_cursor:
    uint64_t *pt
    uint64_t gfn
    uint64_t gen                # TDP_GEN_NOWHERE: it stands nowhere
    uint8_t level
    uint8_t shift               # gfn shift of pt's entries: 9 * (level - 1)
    uint64_t *pt_path[TDP_ROOT_LEVEL]   # [l - 1]: the table of level l, for l >= level

# A stream's cursors into one guest_memfd (not the kernel's: kvm_gmem_get_pfn walks from the
# top each time): a vCPU's faults, a loop over a range.
ctypedef struct kvm_gmem_cursor:
    xa_state bindings           # in gmem_file.bindings
    xa_state filemap            # in gmem_inode.filemap

ctypedef struct kvm_vcpu:
    kvm *kvm
    uint32_t vcpu_id
    kvm_gmem_cursor gmem_cursor # the fault path's, handed the batch's leaves
    tdp_cursor tdp_cursor[2]    # the fault path's, in each root
    uint64_t stats[VCPU_NR_STATS]
    complete_userspace_io_t complete_userspace_io   # NULL: no userspace exit pending
    kvm_run_hypercall hypercall # the exit's fields, as userspace sees them
    guest_fault fault           # the exception of the last GUEST_ACCESS_FAULT
    uint64_t memory_fault_size  # kvm_run.memory_fault.size of the last memory-fault exit
    psc_buffer psc              # SNP: the request being worked through
    uint32_t psc_idx            # ... its entries [psc_idx, psc_last] are in this exit
    uint32_t psc_last
    uint64_t map_gpa_next       # TDX MapGPA: the chunk in this exit starts here (shared bit
    uint64_t map_gpa_end        # included); the request ends here
    int pre_run_err             # what KVM_RUN returns before entering the guest (0: it enters):
                                # -EINVAL for an SNP vCPU without a VMSA or a TD vCPU before
                                # INIT_VCPU/FINALIZE_VM, -EIO once the VM is dead
    int tdx_state               # VCPU_TD_STATE_*: KVM_TDX_INIT_VCPU done

cdef int kvm_gmem_get_pfn(kvm *kvm, kvm_memory_slot *slot, uint64_t gfn, uint64_t *pfn,
                          int *max_order) noexcept nogil
cdef kvm_memory_slot *gfn_to_memslot(kvm *kvm, uint64_t gfn) noexcept nogil
cdef int kvm_mem_is_private(kvm *kvm, uint64_t gfn) noexcept nogil
