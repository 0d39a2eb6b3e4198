"""Type stubs for gmem._core, the Cython core of gmem (hand-written; checked by
``python -m mypy.stubtest gmem._core --allowlist stubtest-allowlist.txt``).

Arguments documented as addresses, sizes, pfns or gfns take a Python int or a numpy
integer (``_Int``); the core checks their range at run time and raises TypeError,
ValueError or the kernel's OSError(errno) as its docstrings say.
"""

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, ClassVar, Final, final, Literal, NamedTuple, NoReturn, SupportsIndex, TypedDict, overload

import numpy as np
import numpy.typing as npt
from _typeshed import ReadableBuffer
from typing_extensions import Required, Self, TypeAlias, disjoint_base

# ---------------------------------------------------------------- aliases (stub-only)

_Int: TypeAlias = int | np.integer[Any]
_Bytes: TypeAlias = ReadableBuffer | Iterable[SupportsIndex]
_Platform: TypeAlias = Literal["amd", "intel", "none"]
_Kernel: TypeAlias = Literal["rfc-2023", "6.18", "7.2", "next"]
_TraceEvent: TypeAlias = Literal["kvm_page_fault", "spte_install", "spte_zap", "memory_fault_exit",
                                 "gmem_prepare", "gmem_invalidate", "rmpupdate", "psmash", "pvalidate",
                                 "kvm_set_memory_attributes", "gmem_fallocate", "folio_split",
                                 "memory_failure", "tdx_page_aug", "tdx_page_add", "tdx_range_block",
                                 "tdx_track", "tdx_page_remove", "tdx_accept", "kvm_map_gpa_range",
                                 "folio_merge", "tdx_page_demote"]
_HookName: TypeAlias = Literal["is_private_fault", "gmem_prepare", "gmem_invalidate",
                               "private_max_mapping_level", "gmem_make_shared"]
# a structured numpy array (FAULT_DTYPE, TRACE_DTYPE, RMP_DTYPE or PAGE_STATE_DTYPE)
_Record: TypeAlias = npt.NDArray[np.void]

class _Folio(TypedDict):
    pfn: int
    order: int
    flags: int
    refcount: int
    mapping: int
    index: int
    private: int

class _HostOptions(TypedDict):
    prepare: Literal["fault", "alloc"]
    prepared_tracking: Literal["gmem", "arch"]
    invalidate: Literal["free_folio", "invalidate_folio"]
    huge_folios: bool
    reattach_private: bool
    scramble_on_conversion: bool
    content_memfd: bool
    gmem_backing: Literal["buddy", "hugetlb"]
    huge_split: Literal["never", "convert", "convert-2m", "fresh"]
    huge_merge: Literal["never", "eager", "lazy"]

class _Memslot(TypedDict):
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int
    bound: bool

class _Stat(TypedDict):
    st_size: int
    st_blksize: int
    st_mode: int
    st_ino: int
    st_blocks: int

class _PscEntry(TypedDict, total=False):
    gfn: Required[int]
    operation: Required[int]  # 1: private, 2: shared (PSMASH/UNSMASH are passed over)
    pagesize: int
    cur_page: int

# ------------------------------------------------------------------- constants

FAULT_DTYPE: np.dtype[np.void]
"""One record of Vm.page_fault_batch: ret, exit_reason, pfn, gpa, flags, level (kvm_fault_out)."""
TRACE_DTYPE: np.dtype[np.void]
"""One tracepoint record: seq, event (index into TRACE_EVENTS), vcpu, a, b, c, d."""
RMP_DTYPE: np.dtype[np.void]
"""One RMP entry of Rmp.view: pfn, assigned, pagesize, immutable, validated, vmsa, asid, gpa."""
PAGE_STATE_DTYPE: np.dtype[np.void]
"""One guest page of page_states: gfn, private, backed, prepared, level, rmp, pfn."""

TRACE_EVENTS: Final[tuple[_TraceEvent, ...]]
VCPU_STATS: Final[tuple[str, ...]]
VM_STATS: Final[tuple[str, ...]]
HOST_STATS: Final[tuple[str, ...]]
SNP_STATS: Final[tuple[str, ...]]
TDX_STATS: Final[tuple[str, ...]]
HOOK_NAMES: Final[tuple[_HookName, ...]]
# "next"'s names for hook slots: name -> the HOOK_NAMES entry it replaces
HOOK_RENAMES: Final[dict[str, _HookName]]
TDX_SEPT_STATES: Final[dict[int, str]]
# the kernel versions a Host can model, and the one it models when none is named
KERNELS: Final[dict[str, int]]
def default_kernel() -> _Kernel:
    """$GMEM_KERNEL, else "7.2"."""
# the kernel's constants as the core's C code defines them (gmem.uapi mirrors them)
C_CONSTANTS: Final[dict[str, int]]

# SEV-SNP GHCB / page-state change
GHCB_MSR_PSC_RESP: Final = 0x015
GHCB_MSR_PSC_RESP_ERROR: Final = 0x8000000000000015
VMGEXIT_PSC_ERROR_GENERIC: Final = 0x10000000000
VMGEXIT_PSC_ERROR_INVALID_HDR: Final = 0x100000001
VMGEXIT_PSC_ERROR_INVALID_ENTRY: Final = 0x100000002
VMGEXIT_PSC_MAX_COUNT: Final = 253
KVM_MAP_GPA_RANGE_PAGE_SZ_2M: Final = 1
KVM_MAP_GPA_RANGE_ENCRYPTED: Final = 16
INITIAL_VMSA_GPA: Final = 0xFFFFFFFFF000

# TDX
TDX_SUCCESS: Final = 0
TDX_PAGE_ALREADY_ACCEPTED: Final = 0x00000B0A00000000
TDX_PAGE_SIZE_MISMATCH: Final = 0xC0000B0B00000000
TDX_OPERAND_INVALID: Final = 0xC000010000000000
TDVMCALL_STATUS_SUCCESS: Final = 0
TDVMCALL_STATUS_RETRY: Final = 1
TDVMCALL_STATUS_INVALID_OPERAND: Final = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR: Final = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED: Final = 0x8000000000000003
TDX_MAP_GPA_MAX_LEN: Final = 0x200000
KVM_EXIT_HYPERCALL_LONG_MODE: Final = 1

# ---------------------------------------------------------------------- XArray

@disjoint_base
class XArray:
    """lib/xarray.c: 64-bit indices -> 63-bit values, with multi-index entries and 3 marks."""

    def __init__(self) -> None: ...
    def load(self, index: _Int) -> int | None:
        """xa_load: the value at index, or None."""
    def store(self, index: _Int, value: _Int, order: _Int = 0) -> int | None:
        """xa_store_order: store over the aligned 2**order indices at index; the old value or None."""
    def erase(self, index: _Int) -> int | None:
        """xa_erase: remove the whole entry covering index; its value or None."""
    def erase_range(self, first: _Int, last: _Int) -> int:
        """Erase every entry overlapping [first, last]; returns how many."""
    def store_range(self, first: _Int, last: _Int, value: _Int) -> None:
        """xa_store_range: cover [first, last] (inclusive) with maximal aligned entries."""
    def get_order(self, index: _Int) -> int:
        """xa_get_order: the order of the entry covering index (0 if none)."""
    def split(self, index: _Int, order: _Int) -> None:
        """xas_split: the entry covering index becomes entries of order, same value and marks."""
    def find(self, start: _Int = 0, last: _Int = ..., mark: int | None = None) -> tuple[int, int] | None:
        """xa_find: (index, value) of the first entry at or after start, or None."""
    def find_after(self, index: _Int, last: _Int = ..., mark: int | None = None) -> tuple[int, int] | None:
        """xa_find_after: (index, value) of the first entry after the one covering index, or None."""
    def items(self, first: _Int = 0, last: _Int = ..., mark: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Yield (first_index, order, value) for each entry overlapping [first, last]."""
    def set_mark(self, index: _Int, mark: int) -> None: ...
    def clear_mark(self, index: _Int, mark: int) -> None: ...
    def get_mark(self, index: _Int, mark: int) -> bool: ...
    def __len__(self) -> int: ...
    @property
    def nr_indices(self) -> int:
        """Indices covered by all entries."""
    @property
    def nr_nodes(self) -> int: ...
    @property
    def node_gen(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    def check(self) -> None:
        """Raise AssertionError if the tree's internal bookkeeping is inconsistent."""
    def load_many(self, indices: npt.ArrayLike) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        """xa_load over a uint64 array: (values, present)."""
    def store_many(self, indices: npt.ArrayLike, values: npt.ArrayLike, order: _Int = 0) -> None:
        """xa_store_order for each (index, value) pair, in order."""

# --------------------------------------------------------------------- PhysMem

@disjoint_base
class PhysMem:
    """Host physical memory: a buddy allocator (orders 0..18) and the folio table."""

    def __new__(cls, memory: _Int, start_pfn: _Int = 0) -> Self: ...
    @property
    def start_pfn(self) -> int: ...
    @property
    def end_pfn(self) -> int: ...
    @property
    def nr_pages(self) -> int: ...
    @property
    def nr_free_pages(self) -> int: ...
    @property
    def watermark(self) -> int:
        """Pfns from here to end_pfn have never been allocated."""
    def alloc(self, order: _Int = 0) -> int:
        """A free, naturally aligned block of 2**order pages: its first pfn (OSError ENOMEM)."""
    def free(self, pfn: _Int, order: _Int = 0) -> None:
        """Give a block back (coalescing with its buddies)."""
    def alloc_many(self, n: _Int, order: _Int = 0) -> npt.NDArray[np.uint64]:
        """n allocations of 2**order pages: their pfns."""
    def free_many(self, pfns: npt.ArrayLike, order: _Int = 0) -> None:
        """Free blocks from alloc_many."""
    def free_blocks(self) -> list[int]:
        """Free blocks per order 0..18."""
    def folio_alloc(self, order: _Int = 0) -> int:
        """A new folio (refcount 1): its pfn."""
    def folio_put(self, pfn: _Int) -> None:
        """Drop a reference to the folio headed at pfn; the last one frees it."""
    def folio_split(self, pfn: _Int, order: _Int) -> None:
        """Split the folio headed at pfn into folios of order."""
    def folio(self, pfn: _Int) -> _Folio | None:
        """The folio containing pfn, or None."""
    def folios(self) -> list[tuple[int, int]]:
        """(pfn, order) of every folio, in pfn order."""
    @property
    def nr_folios(self) -> int: ...
    @property
    def memory_bytes(self) -> int:
        """Bytes of C memory describing this host memory."""
    def inject_alloc_failures(self, n: _Int) -> None:
        """Make the next n allocations fail with ENOMEM."""
    def check(self) -> None:
        """Cross-check the free areas, the watermark, the folio table and the counters."""

# ----------------------------------------------------------------------- Trace

@final
class Trace:
    """Tracepoints of one host: a ring of fixed-size records (see TRACE_EVENTS)."""

    def __new__(cls, host: Host) -> Self: ...
    def enable(self, *events: _TraceEvent, capacity: _Int = 65536) -> None:
        """Record these events (all if none are named) in a ring of `capacity` records."""
    def disable(self, *events: _TraceEvent) -> None:
        """Stop recording these events (all if none are named)."""
    def clear(self) -> None:
        """Forget the records in the ring."""
    @property
    def enabled(self) -> tuple[_TraceEvent, ...]: ...
    @property
    def lost(self) -> int:
        """Records overwritten because the ring was full."""
    def to_numpy(self) -> _Record:
        """The records still in the ring, oldest first, as a TRACE_DTYPE array (a copy)."""
    def report(self, limit: int | None = None) -> str:
        """Lines in the style of trace-cmd report."""

# ------------------------------------------------------------------------ Host

@final
class Host:
    """A simulated machine: physical memory, KVM (/dev/kvm) and, on "amd", the RMP."""

    def __init__(
        self,
        memory: _Int = 68719476736,
        platform: _Platform = "amd",
        *,
        kernel: _Kernel | None = None,
        sw_protected: bool = True,
        memory_attributes: bool = True,
        tdp: bool = True,
        numa_nodes: int = 1,
        prepare: Literal["fault", "alloc"] | None = None,
        prepared_tracking: Literal["gmem", "arch"] | None = None,
        invalidate: Literal["free_folio", "invalidate_folio"] | None = None,
        huge_folios: bool = False,
        reattach_private: bool = False,
        scramble_on_conversion: bool = False,
        content_memfd: bool = False,
        gmem_in_place_conversion: bool | None = None,
        content_modes: bool = False,
        gmem_backing: Literal["buddy", "hugetlb"] = "buddy",
        hugetlb_pages: dict[str, int] | None = None,
        huge_split: Literal["never", "convert", "convert-2m", "fresh"] | None = None,
        huge_merge: Literal["never", "eager", "lazy"] | None = None,
        tdx_huge_page: bool | Literal["2M", "1G"] = False,
    ) -> None: ...
    @property
    def hugetlb(self) -> dict[str, Any]:
        """The hugetlb pool by size: total, free, reserved; and stranded_bytes."""
    @property
    def gmem_in_place_conversion(self) -> bool:
        """kvm.gmem_in_place_conversion ("next"): attributes live in the guest_memfd."""
    @property
    def content_modes(self) -> bool:
        """KVM_SET_MEMORY_ATTRIBUTES2 takes the RFC v4/v5 content modes."""
    @property
    def tdx_huge_page(self) -> Literal["2M", "1G"] | None:
        """The proposed kvm_intel.tdx_huge_page: the largest private S-EPT leaf of a running TD."""
    @property
    def kernel(self) -> _Kernel:
        """The kernel version whose rules apply."""
    @property
    def numa_nodes(self) -> int: ...
    def pfn_to_nid(self, pfn: _Int) -> int: ...
    @property
    def tdp(self) -> bool:
        """tdp_enabled: the host has two-dimensional paging."""
    @property
    def platform(self) -> _Platform: ...
    @property
    def sw_protected(self) -> bool: ...
    @property
    def memory_attributes(self) -> bool: ...
    @property
    def fd(self) -> int:
        """The /dev/kvm fd of this host."""
    @property
    def trace(self) -> Trace: ...
    @property
    def options(self) -> _HostOptions:
        """The policy options in force, by name."""
    @property
    def vm_types(self) -> int:
        """The KVM_CAP_VM_TYPES bitmap."""
    def check_extension(self, cap: _Int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm."""
    def create_vm(self, vm_type: _Int = 0) -> Vm:
        """KVM_CREATE_VM: EINVAL for a type this host does not support."""
    def register_hooks(
        self,
        vm_type: int,
        *,
        is_private_fault: Callable[[Vm, int, int], object] | None = ...,
        gmem_prepare: Callable[[Vm, int, int, int], int | None] | None = ...,
        gmem_invalidate: Callable[[Host, int, int], object] | None = ...,
        private_max_mapping_level: Callable[[Vm, int], int | None] | None = ...,
        gmem_make_shared: Callable[[Host, int, int], object] | None = ...,
        make_private: Callable[[Vm, int, int, int], int | None] | None = ...,
        reclaim: Callable[[Host, int, int], object] | None = ...,
    ) -> None:
        """Replace hooks of one VM type with Python callables (None restores the native one)."""
    @property
    def nr_pages(self) -> int: ...
    @property
    def nr_free_pages(self) -> int: ...
    @property
    def stats(self) -> dict[str, int]:
        """HOST_STATS plus free_pages, used_pages and folios."""
    @property
    def memory_bytes(self) -> int:
        """C memory used by the model's own bookkeeping of host memory."""
    def folio(self, pfn: _Int) -> _Folio | None:
        """The folio containing pfn, or None."""
    def mmap_user(self, addr: _Int, size: _Int) -> None:
        """The VMM maps anonymous memory at [addr, addr + size) (memslots map their own range)."""
    def munmap_user(self, addr: _Int, size: _Int) -> None:
        """munmap(2) of the VMM's memory: the mmu notifiers zap what it backed; faults there: -EFAULT."""
    def read_user(self, hva: _Int, n: _Int) -> bytes:
        """Read the VMM's own memory (the shared backing of memslots) at hva."""
    def write_user(self, hva: _Int, data: _Bytes) -> None:
        """Write the VMM's own memory at hva."""
    @property
    def rmp(self) -> Rmp | None:
        """The SNP RMP on platform "amd", else None."""
    def touch(self, pfn: _Int, write: bool = True) -> None:
        """A host CPU access to pfn; on "amd" a forbidden write raises gmem.RmpViolation."""
    def memory_failure(self, pfn: _Int) -> bool:
        """memory_failure(pfn) (HWPOISON): True when pfn is a gmem page (poisoned and unmapped)."""
    def inject(self, *, alloc_failures: _Int = 0, prepare_failures: _Int = 0, prepare_errno: int = 5,
               rmpupdate_failures: _Int = 0, rmpupdate_code: int = 3) -> _Injection:
        """Fault injection, as a context manager that clears what is left on exit."""
    def inject_alloc_failures(self, n: _Int) -> None:
        """Fault injection: the next n page allocations fail."""
    def check(self) -> None:
        """Cross-check every structure; raise gmem.InvariantError naming the first inconsistency."""

@final
class _Injection:
    """What Host.inject returns: `with host.inject(...) as host:` drops unconsumed injections on exit."""

    @property
    def host(self) -> Host: ...
    def __new__(cls, host: Host) -> Self: ...
    def __enter__(self) -> Host: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> Literal[False]: ...

# ---------------------------------------------------------- fault results, exits

@final
class FaultResult:
    """The outcome of one vcpu.page_fault()."""

    __hash__: ClassVar[None]  # type: ignore[assignment]
    @property
    def ret(self) -> int:
        """RET_PF_* or -errno."""
    @property
    def exit_reason(self) -> int:
        """0, or uapi.KVM_EXIT_MEMORY_FAULT."""
    @property
    def memory_fault(self) -> tuple[int, int, int] | None:
        """(flags, gpa, size) for KVM_EXIT_MEMORY_FAULT, else None."""
    @property
    def level(self) -> int:
        """Mapping level installed (1=4K, 2=2M, 3=1G), 0 when nothing was mapped."""
    @property
    def pfn(self) -> int: ...
    def __init__(self, ret: int, exit_reason: int, memory_fault: tuple[int, int, int] | None,
                 level: int, pfn: int) -> None: ...
    def __eq__(self, value: object, /) -> bool: ...

class GuestExit(Exception):
    """A guest access stopped in userspace; .result is what KVM_RUN would have returned."""

    result: FaultResult
    def __init__(self, result: FaultResult) -> None: ...

class GuestFault(Exception):
    """An exception the guest itself takes (e.g. #VC 0x404); KVM never sees it."""

    vector: int
    code: int
    def __init__(self, vector: int, code: int, message: str) -> None: ...

class HypercallExit:
    """KVM_EXIT_HYPERCALL: nr, args (gpa, npages, attrs), flags; answer with vcpu.complete_hypercall."""

    __slots__ = ("nr", "args", "flags")
    __hash__: ClassVar[None]  # type: ignore[assignment]
    exit_reason: ClassVar[int]
    nr: int
    args: tuple[int, ...]
    flags: int
    def __init__(self, nr: int, args: Iterable[int], flags: int = 0) -> None: ...
    def __eq__(self, other: object) -> bool: ...

class RmpEntry(NamedTuple):
    """One RMP entry as Rmp.lookup returns it."""

    assigned: bool
    pagesize: int
    immutable: bool
    validated: bool
    asid: int
    gpa: int
    vmsa: bool

# -------------------------------------------------------------------------- Vm

@final
class Vm:
    """A VM (KVM_CREATE_VM); it lives while its fd or any of its guest_memfd files is open."""

    launch_digest: bytes
    """SNP: the running launch measurement (SHA-384 over the pages added)."""
    def __init__(self, host: Host, vm_type: int, _wrap: object = None) -> None: ...
    @property
    def host(self) -> Host: ...
    @property
    def fd(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def destroyed(self) -> bool: ...
    @property
    def vm_type(self) -> int: ...
    @property
    def asid(self) -> int: ...
    @property
    def has_private_mem(self) -> bool: ...
    def close(self) -> None:
        """Close the VM fd; the VM is destroyed once no guest_memfd of it is open either."""
    def launch(self) -> None:
        """The minimal launch for the VM type (SNP LAUNCH_START + FINISH, TDX INIT_VM +
        FINALIZE_VM; nothing for the others)."""
    def check_extension(self, cap: _Int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
    def create_vcpu(self, vcpu_id: _Int = 0) -> Vcpu:
        """KVM_CREATE_VCPU."""
    @property
    def vcpus(self) -> dict[int, Vcpu]: ...
    def create_guest_memfd(self, size: _Int, flags: _Int = 0, *, page_order: _Int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD."""
    def link_guest_memfd(self, src: GuestMemfd) -> GuestMemfd:
        """A new guest_memfd of this VM on the same inode as src (proposed KVM_LINK_GUEST_MEMFD)."""
    def set_user_memory_region2(self, slot: _Int, flags: _Int, guest_phys_addr: _Int, memory_size: _Int,
                                userspace_addr: _Int = 0, guest_memfd: GuestMemfd | _Int = -1,
                                guest_memfd_offset: _Int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2, with the kernel's order of checks."""
    def set_user_memory_region(self, slot: _Int, flags: _Int, guest_phys_addr: _Int, memory_size: _Int,
                               userspace_addr: _Int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1: no guest_memfd)."""
    def memslots(self) -> list[_Memslot]:
        """The memslots, by slot id."""
    def set_memory_attributes(self, address: _Int, size: _Int, attributes: _Int, flags: _Int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""
    def get_memory_attributes(self, gfn: _Int) -> int:
        """The attributes of one gfn."""
    def enable_cap(self, cap: _Int, *args: _Int) -> None:
        """KVM_ENABLE_CAP on the VM (KVM_CAP_EXIT_HYPERCALL)."""
    def snp_launch_start(self, policy: int = 0x30000) -> None:
        """KVM_SEV_SNP_LAUNCH_START."""
    def snp_launch_update(self, gfn_start: _Int, uaddr: _Int, length: _Int, page_type: int,
                          flags: int = 0) -> tuple[int, int, int]:
        """KVM_SEV_SNP_LAUNCH_UPDATE: the updated (gfn_start, uaddr, len)."""
    def snp_launch_finish(self) -> None:
        """KVM_SEV_SNP_LAUNCH_FINISH."""
    @property
    def vmsa_pfns(self) -> list[int]: ...
    def tdx_init_vm(self, gpaw: int = 52) -> None:
        """KVM_TDX_INIT_VM (GPAW 52 or 48)."""
    def tdx_finalize_vm(self) -> None:
        """KVM_TDX_FINALIZE_VM."""
    @property
    def td_state(self) -> Literal["uninitialized", "initialized", "runnable"] | None: ...
    @property
    def nr_premapped(self) -> int: ...
    @property
    def shared_gpa_bit(self) -> int:
        """TDX: the GPA bit that selects the shared alias (0 for other types)."""
    def sept(self) -> dict[int, tuple[int, str]]:
        """TDX mirror S-EPT, page by page: {gfn: (pfn, state)}."""
    def sept_leaves(self) -> dict[int, tuple[int, str, int]]:
        """TDX mirror S-EPT leaves: {first gfn: (pfn, state, level)}."""
    @property
    def tdx_stats(self) -> dict[str, int]: ...
    def page_fault_batch(self, gpas: npt.ArrayLike, error_codes: npt.ArrayLike,
                         vcpu_id: _Int | npt.ArrayLike = 0, out: _Record | None = None) -> _Record:
        """Faults through the same C path as vcpu.page_fault, in order: a FAULT_DTYPE array
        (out, when given, is filled and returned)."""
    def inject_invalidation(self, gpa: _Int, size: _Int) -> None:
        """Fault injection: an invalidation of [gpa, gpa + size) inside the next fault."""
    def sptes(self) -> list[tuple[int, int, int, bool, bool]]:
        """The SPTEs as (gfn, level, pfn, writable, private)."""
    @property
    def stats(self) -> dict[str, int]: ...

# ------------------------------------------------------------------------ Vcpu

@final
class Vcpu:
    """A vCPU: where page faults are taken."""

    def __new__(cls, vm: Vm, vcpu_id: _Int, _wrap: object = None) -> Self:
        """vm's vCPU vcpu_id, created (KVM_CREATE_VCPU) if it does not exist."""
    @property
    def vm(self) -> Vm: ...
    @property
    def vcpu_id(self) -> int: ...
    @property
    def stats(self) -> dict[str, int]: ...
    def page_fault(self, gpa: _Int, error_code: _Int) -> FaultResult:
        """One #NPF / EPT violation with the full 64-bit error code."""
    def pre_fault_memory(self, gpa: _Int, size: _Int, flags: _Int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY: the (gpa, size) left unmapped, as the kernel copies them back."""
    def read(self, gpa: _Int, n: _Int, error_code: _Int = 0) -> bytes:
        """A guest read of n bytes at gpa (raises GuestExit when a fault exits to userspace)."""
    def write(self, gpa: _Int, data: _Bytes, error_code: _Int = 2) -> None:
        """A guest write of data at gpa."""
    def pvalidate(self, gpa: _Int, pagesize: int, validate: bool | int) -> int:
        """The guest's PVALIDATE: 0 or the architectural error code."""
    def rmpadjust(self, gpa: _Int, pagesize: int, attrs: _Int) -> int:
        """The guest's RMPADJUST: 0 or the architectural error code."""
    def psc_msr(self, gpa: _Int, op: int) -> HypercallExit | int:
        """A GHCB MSR-protocol page-state change: an exit to answer, or the GHCB response."""
    def page_state_change(self, entries: list[_PscEntry] | Iterable[_PscEntry], cur_entry: int = 0,
                          end_entry: int | None = None) -> HypercallExit | int:
        """A GHCB PSC request: an exit to answer, or the final PSC return code."""
    def tdx_accept(self, gpa: _Int, level: _Int = 1) -> int:
        """TDG.MEM.PAGE.ACCEPT at level 1 (4K) or 2 (2M): TDX_SUCCESS, TDX_PAGE_ALREADY_ACCEPTED,
        TDX_PAGE_SIZE_MISMATCH or TDX_OPERAND_INVALID."""
    def tdx_map_gpa(self, gpa: _Int, size: _Int) -> HypercallExit | int:
        """TDG.VP.VMCALL<MapGPA>: an exit to answer, or a TDVMCALL status."""
    def tdx_init_vcpu(self) -> None:
        """KVM_TDX_INIT_VCPU: once per vCPU, between KVM_TDX_INIT_VM and KVM_TDX_FINALIZE_VM."""
    def tdx_init_mem_region(self, source_addr: _Int, gpa: _Int, nr_pages: _Int, measure: bool = False) -> int:
        """KVM_TDX_INIT_MEM_REGION: the pages added."""
    def complete_hypercall(self, ret: int = 0) -> HypercallExit | int:
        """Userspace's answer to the last HypercallExit: the next exit, or the guest-visible result."""

# ----------------------------------------------------------- guest_memfd files

@final
class GuestMemfd:
    """A guest_memfd file descriptor (KVM_CREATE_GUEST_MEMFD)."""

    def __new__(cls, _wrap: object = None) -> Self:
        """Not for Python callers: guest_memfds come from Vm.create_guest_memfd()."""
    @property
    def fd(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def size(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def vm(self) -> Vm: ...
    @property
    def ino(self) -> int: ...
    @property
    def memfd(self) -> int:
        """Host(content_memfd=True): the memfd holding the inode's contents (owned by the inode), else -1."""
    def sync_memfd(self) -> int:
        """Host(content_memfd=True): fault in the pages another process wrote through its own mapping."""
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    def dup(self) -> GuestMemfd:
        """dup(2): a new fd on the same file."""
    def fstat(self) -> _Stat: ...
    def read(self, n: int = -1) -> NoReturn:
        """Refused: guest_memfd has no read (EINVAL)."""
    def write(self, data: object) -> NoReturn:
        """Refused: guest_memfd has no write (EINVAL)."""
    def pread(self, n: int, offset: _Int) -> NoReturn:
        """Refused (ESPIPE, or EINVAL for a negative offset)."""
    def pwrite(self, data: object, offset: _Int) -> NoReturn:
        """Refused (ESPIPE, or EINVAL for a negative offset)."""
    def lseek(self, offset: int, whence: int = 0) -> NoReturn:
        """Refused (ESPIPE)."""
    def ftruncate(self, length: _Int) -> NoReturn:
        """Refused (EINVAL): kvm_gmem_setattr refuses every size change."""
    def fallocate(self, mode: _Int, offset: _Int, length: _Int) -> None:
        """fallocate(2): vfs_fallocate's checks, then kvm_gmem_fallocate's."""
    def allocate(self, offset: _Int, length: _Int) -> None:
        """fallocate(FALLOC_FL_KEEP_SIZE)."""
    def punch_hole(self, offset: _Int, length: _Int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
    def mmap(self, length: _Int, offset: _Int = 0, prot: _Int = 3, flags: _Int = 1) -> Mapping:
        """mmap(2) of the file (needs GUEST_MEMFD_FLAG_MMAP)."""
    def set_memory_attributes(self, offset: _Int, size: _Int, attributes: _Int, flags: _Int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on this fd ("next"); OSError carries .error_offset."""
    def folios(self) -> list[tuple[int, int, int]]: ...
    def get_policy(self, offset: _Int) -> tuple[int, tuple[int, ...]]: ...
    def get_memory_attributes(self, offset: _Int) -> int:
        """The inode's attributes at offset (in-place conversion only; else ENOTTY)."""

@final
class Mapping:
    """A MAP_SHARED mapping of a guest_memfd; a refused access raises gmem.SigBus."""

    def __new__(cls, _wrap: object = None) -> Self:
        """Not for Python callers: mappings come from GuestMemfd.mmap()."""
    @property
    def length(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def prot(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def __len__(self) -> int: ...
    def close(self) -> None:
        """munmap."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    @overload
    def __getitem__(self, key: SupportsIndex, /) -> int: ...
    @overload
    def __getitem__(self, key: slice, /) -> bytes: ...
    @overload
    def __setitem__(self, key: SupportsIndex, value: int | _Bytes, /) -> None: ...
    @overload
    def __setitem__(self, key: slice, value: _Bytes, /) -> None: ...
    def mbind(self, mode: _Int, nodes: Iterable[_Int] = ()) -> None: ...
    def pin(self, offset: _Int, length: _Int, *, longterm: bool = True) -> Pin:
        """GUP references on the mapping's pages (FOLL_PIN | FOLL_LONGTERM, or FOLL_GET)."""

@final
class Pin:
    """GUP references taken by Mapping.pin(), held until release()."""

    def __new__(cls, _wrap: object = None) -> Self:
        """Not for Python callers: pins come from Mapping.pin()."""
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def longterm(self) -> bool: ...
    @property
    def released(self) -> bool: ...
    def release(self) -> None:
        """unpin_user_pages / put_page."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

# -------------------------------------------------------------------------- Rmp

@final
class Rmp:
    """The SNP Reverse Map Table of a host (platform "amd")."""

    def __new__(cls, host: Host) -> Self: ...
    def lookup(self, pfn: _Int) -> RmpEntry:
        """The entry for pfn; its pagesize is 1 only at the head of a 2M entry."""
    def level(self, pfn: _Int) -> int:
        """snp_lookup_rmpentry's level: PG_LEVEL_2M inside a 2M entry, else PG_LEVEL_4K."""
    def rmpupdate(self, pfn: _Int, *, assigned: bool | int, pagesize: int = 0, immutable: bool | int = False,
                  gpa: _Int = 0, asid: _Int = 0) -> int:
        """The RMPUPDATE instruction: its architectural return code."""
    def psmash(self, pfn: _Int) -> int:
        """The PSMASH instruction: its architectural return code."""
    def make_private(self, pfn: _Int, gpa: _Int, level: int, asid: _Int, immutable: bool | int = False) -> int:
        """rmp_make_private: 0 or -errno."""
    def make_shared(self, pfn: _Int, level: int) -> int:
        """rmp_make_shared: 0 or -errno."""
    def view(self, start: _Int, stop: _Int) -> _Record:
        """Entries for pfns [start, stop) as an RMP_DTYPE array."""
    def assigned(self) -> list[int]:
        """Every assigned pfn, ascending (2M entries expanded)."""
    @property
    def leaked(self) -> list[int]:
        """Pfns leaked because a reclaim failed."""
    @property
    def stats(self) -> dict[str, int]: ...
    def inject_rmpupdate_failures(self, n: _Int, code: int = ...) -> None:
        """Fault injection: the next n RMPUPDATEs return code."""

# ----------------------------------------------------------------- inspection

def page_states(vm: Vm, gpa: _Int, size: _Int) -> _Record:
    """One PAGE_STATE_DTYPE record per guest page of [gpa, gpa + size)."""
