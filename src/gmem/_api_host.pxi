# gmem.Host: the simulated machine's handle. It owns one reference to its C gmem_host,
# the fd table of its "process" (/dev/kvm, VMs, guest_memfds), the Python hooks, and the
# host lock that stands for the kernel's locks.

from gmem import uapi as _uapi
from gmem.errors import SigBus as _SigBus, InvariantError as _InvariantError, RmpViolation as _RmpViolation

from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, PyThread_get_thread_ident,
                               WAIT_LOCK, NOWAIT_LOCK)

cdef unsigned char _ZERO_PAGE[4096]

HOST_STATS = ("folios_allocated", "folios_freed", "folio_splits", "gmem_invalidate",
              "gmem_invalidate_pages", "alloc_failures", "hook_errors", "folio_merges",
              "huge_eagain")

_POLICIES = {
    "prepare": {"fault": GMEM_PREPARE_FAULT, "alloc": GMEM_PREPARE_ALLOC},
    "prepared_tracking": {"gmem": GMEM_TRACK_GMEM, "arch": GMEM_TRACK_ARCH},
    "invalidate": {"free_folio": GMEM_INVALIDATE_FREE_FOLIO,
                   "invalidate_folio": GMEM_INVALIDATE_INVALIDATE_FOLIO},
}
_PLATFORMS = {"amd": GMEM_PLATFORM_AMD, "intel": GMEM_PLATFORM_INTEL, "none": GMEM_PLATFORM_NONE}
KERNELS = {"rfc-2023": GMEM_KERNEL_RFC_2023, "6.18": GMEM_KERNEL_6_18, "7.2": GMEM_KERNEL_7_2,
           "next": GMEM_KERNEL_NEXT}


def default_kernel():
    """The version a Host models when none is named: $GMEM_KERNEL, else "7.2" (the latest
    stable). Setting GMEM_KERNEL runs a whole scenario or test suite under another version."""
    import os
    k = os.environ.get("GMEM_KERNEL") or "7.2"
    if k not in KERNELS:
        raise ValueError(f"GMEM_KERNEL={k!r}: kernel must be one of {', '.join(KERNELS)}")
    return k


# ------------------------------------------------------------ the host lock
# One lock per Host stands for the kernel's locks (slots_lock, mmu_lock, the filemap
# invalidate lock, ...).  Every call that reads or writes a host's C state holds the host
# from its first line to its return: page_fault_batch and pre_fault_memory across their
# nogil loop, and the other calls too, since one that runs a Python hook (or a finalizer)
# lets other threads have the GIL in its middle.
#
# The holder is the _owner field, read and written with the GIL held: taking a free host
# costs no system call.  The OS lock is for waiting: the owner holds it ("parks") while it
# may keep the GIL away for long (a nogil loop, a Python hook), and waiters sleep on it.
# No thread waits for anything while holding the GIL: the owner may need the GIL to finish.

cdef inline void _host_lock(Host host) noexcept:
    """Hold the host, recursively for the thread holding it."""
    cdef long me = PyThread_get_thread_ident()
    if host._owner == me:
        host._depth += 1
    elif host._owner == 0 and host._serving == host._tickets:
        host._owner = me
        host._depth = 1
    else:
        _host_wait(host, me)


cdef void _host_wait(Host host, long me) noexcept:
    """Wait for the host, in turn: a thread calling again as soon as its call returned (a loop
    of batches) would otherwise take the host back before a waiter gets the GIL, forever."""
    cdef uint64_t ticket = host._tickets
    host._tickets += 1
    while host._owner != 0 or host._serving != ticket:
        with nogil:                          # sleeps while the owner is parked
            PyThread_acquire_lock(host._lock, WAIT_LOCK)
            PyThread_release_lock(host._lock)
    host._serving += 1
    host._owner = me
    host._depth = 1


cdef inline void _host_unlock(Host host) noexcept:
    host._depth -= 1
    if host._depth == 0:
        host._owner = 0


cdef void _host_park(Host host) noexcept:
    """The owner takes the OS lock before it lets the GIL go for long."""
    if host._parked == 0 and not PyThread_acquire_lock(host._lock, NOWAIT_LOCK):
        with nogil:                          # a waiter holds it for an instant
            PyThread_acquire_lock(host._lock, WAIT_LOCK)
    host._parked += 1


cdef void _host_unpark(Host host) noexcept:
    host._parked -= 1
    if host._parked == 0:
        PyThread_release_lock(host._lock)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class _HostHold:
    """Holds a host while it lives: a local of the call it guards, dropped when that call
    returns or raises (Cython drops locals only then)."""
    cdef Host host

    def __dealloc__(self):
        if self.host is not None:
            _host_unlock(self.host)


cdef _HostHold _host_enter(Host host):
    """The gate of every call on a host's C state: `held = _host_enter(host)`, its first line,
    waits (GIL released) while another thread holds the host, then holds it until the call
    ends.  _refuse_in_hook comes after it: hooks run only in the thread holding the host, so
    a call from another thread is not refused, it waits."""
    cdef _HostHold held = _HostHold.__new__(_HostHold)
    _host_lock(host)
    held.host = host
    return held


# ------------------------------------------------------------ Python hooks
# One table: HOOK_NAMES[i] names field i of kvm_x86_hooks that a Python callable may replace,
# _PY_HOOKS holds the trampoline for each, _hook_set copies field i from a table.

HOOK_NAMES = ("is_private_fault", "gmem_prepare", "gmem_invalidate", "private_max_mapping_level",
              "gmem_make_shared")
# "next"'s names for the same slots (7b8529e70a11, 2131c4f763d2, fb50ca77b672): either name may be
# registered under any version, each called with its own arguments where the slot's event happens
HOOK_RENAMES = {"make_private": "gmem_prepare", "reclaim": "gmem_invalidate"}

cdef kvm_x86_hooks _PY_HOOKS


cdef void _hook_set(kvm_x86_hooks *dst, int i, const kvm_x86_hooks *src) noexcept:
    if i == 0:
        dst.is_private_fault = src.is_private_fault
    elif i == 1:
        dst.gmem_prepare = src.gmem_prepare
    elif i == 2:
        dst.gmem_invalidate = src.gmem_invalidate
    elif i == 3:
        dst.private_max_mapping_level = src.private_max_mapping_level
    else:
        dst.gmem_make_shared = src.gmem_make_shared


cdef void _hook_failed(gmem_host *h, BaseException e):
    """A Python hook raised, or returned what its contract does not allow: the operation that
    called it fails (-EIO, the VM's KVM_BUG_ON), and its caller raises e."""
    if h.py_host != NULL and (<Host>h.py_host)._hook_exc is None:
        (<Host>h.py_host)._hook_exc = e
    h.hook_error = 1
    h.stats[HOST_STAT_HOOK_ERRORS] += 1


cdef object _hook_result(gmem_host *h, str name, object r, object lo, object hi, object default):
    """A hook's integer result in [lo, hi] (None: default); anything else fails the call."""
    if r is None:
        return default
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
        _hook_failed(h, TypeError(f"hook {name} returned {type(r).__name__} {r!r}, not an int"))
        return None
    if not lo <= r <= hi:
        _hook_failed(h, ValueError(f"hook {name} returned {r}, outside [{lo}, {hi}]"))
        return None
    return int(r)


cdef object _call_hook(gmem_host *h, int vm_type, int which, tuple args, object default):
    cdef Host host
    # a host whose handle is gone (a C-level user, or the handle collected first) has no hooks,
    # nor has one whose handles are being collected (_teardown)
    if h.py_host == NULL or h.in_teardown:
        return default
    host = <Host>h.py_host
    # looked up, not borrowed: the cyclic GC may have cleared host._hook_fns (the callable
    # on its way out) while an inode it frees still evicts folios: no call then
    fn = host._hook_fns.get((vm_type, which)) if host._hook_fns is not None else None
    if fn is None:
        return default
    host._hook_depth += 1           # per thread in effect: only the host's owner runs hooks
    _host_park(host)                # a hook may keep the GIL away: waiters sleep
    try:
        return fn(*args)
    except BaseException as e:
        _hook_failed(h, e)
        return default
    finally:
        _host_unpark(host)
        host._hook_depth -= 1


cdef enum:
    _TEARDOWN_FILE = 0
    _TEARDOWN_VMA = 1
    _TEARDOWN_PIN = 2


cdef void _teardown(gmem_host *h, void *what, int kind) noexcept:
    """A handle collected without close(): its reference goes as a process exit's close would,
    but Python hooks do not run (the garbage collector may be clearing them, or the objects
    they use, in the same pass). The machine is held meanwhile: when the Host went first, the
    last VM's reference (which this put may drop) is all that keeps it."""
    h.refcount += 1
    h.in_teardown += 1
    if kind == _TEARDOWN_FILE:
        kvm_gmem_put_file(<gmem_file *>what)
    elif kind == _TEARDOWN_VMA:
        kvm_gmem_vma_close(<gmem_vma *>what)
    else:
        kvm_gmem_unpin(<gmem_pin *>what, True)
    h.in_teardown -= 1
    h.hook_error = 0
    gmem_host_put(h)


cdef inline void _teardown_put_file(gmem_file *f) noexcept:
    _teardown(f.inode.host, <void *>f, _TEARDOWN_FILE)


cdef void _refuse_in_hook(Host host, str what) except *:
    """A hook runs under the locks of the path that called it (the fault holds a file reference,
    the folio lock and the invalidate lock; truncation holds the invalidate lock): a call that
    frees files, folios, memslots or the VM from inside a hook would deadlock in the kernel, and
    would pull memory from under the C path here.  It is refused."""
    if host._hook_depth:
        raise _err(EDEADLK, f"{what}: called from inside a gmem hook (the kernel holds the "
                   "locks this needs: it would deadlock)")


cdef object _vm_object(kvm *kvm):
    """The gmem.Vm of kvm (a handle is made for a VM created through the C-level API)."""
    if kvm.py_vm == NULL:
        return Vm._wrap(kvm)
    return <object>kvm.py_vm


# Each trampoline checks what the hook returned against its documented type and range before
# the C path uses it: anything else fails the operation (-EIO) and is raised to its caller.

cdef int _py_is_private_fault(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil:
    """is_private_fault(vm, gpa, error_code) -> bool"""
    with gil:
        r = _call_hook(kvm.host, kvm.vm_type, 0, (_vm_object(kvm), gpa, error_code), False)
        if isinstance(r, (bool, np.bool_)) or (isinstance(r, (int, np.integer)) and r in (0, 1)):
            return 1 if r else 0
        _hook_failed(kvm.host, TypeError(f"hook is_private_fault returned {type(r).__name__} {r!r}, "
                                         "not a bool"))
        return 0


cdef int _py_gmem_prepare(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil:
    """gmem_prepare(vm, gfn, pfn, order) -> 0 or -errno (None: 0)"""
    with gil:
        r = _call_hook(kvm.host, kvm.vm_type, 1, (_vm_object(kvm), gfn, pfn, order), -EIO)
        r = _hook_result(kvm.host, "gmem_prepare", r, -4095, 0, 0)
        return -EIO if r is None else r


cdef void _py_gmem_invalidate(gmem_host *h, uint64_t start, uint64_t end) noexcept nogil:
    """gmem_invalidate(host, start_pfn, end_pfn): what it returns is not read"""
    with gil:
        _call_hook(h, h.invalidate_vm_type, 2, (<object>h.py_host if h.py_host != NULL else None,
                                                start, end), None)


cdef int _py_private_max_mapping_level(kvm *kvm, uint64_t pfn) noexcept nogil:
    """private_max_mapping_level(vm, pfn) -> 0 (no limit) or a PG_LEVEL_*"""
    with gil:
        r = _call_hook(kvm.host, kvm.vm_type, 3, (_vm_object(kvm), pfn), 0)
        r = _hook_result(kvm.host, "private_max_mapping_level", r, 0, KVM_MAX_HUGEPAGE_LEVEL, 0)
        return PG_LEVEL_4K if r is None else r


cdef void _py_gmem_make_shared(gmem_host *h, uint64_t start, uint64_t end) noexcept nogil:
    """gmem_make_shared(host, start_pfn, npages) ("next", at a conversion to shared): what it
    returns is not read"""
    with gil:
        _call_hook(h, h.invalidate_vm_type, 4, (<object>h.py_host if h.py_host != NULL else None,
                                                start, end - start), None)


def _make_private_as_prepare(fn):
    """make_private(vm, gfn, pfn, npages) in gmem_prepare's slot, which passes log2(npages)."""
    def make_private(vm, gfn, pfn, order):
        return fn(vm, gfn, pfn, 1 << order)
    return make_private


_PY_HOOKS.is_private_fault = _py_is_private_fault
_PY_HOOKS.gmem_make_shared = _py_gmem_make_shared
_PY_HOOKS.gmem_prepare = _py_gmem_prepare
_PY_HOOKS.gmem_invalidate = _py_gmem_invalidate
_PY_HOOKS.private_max_mapping_level = _py_private_max_mapping_level


# -------------------------------------------------------------------- Host

cdef void _user_access_ok(uint64_t hva, uint64_t n) except *:
    """access_ok(hva, n) before copy_{from,to}_user moves a byte: the whole range below
    TASK_SIZE_MAX (7.2: USER_PTR_MAX), no wrap."""
    if not host_user_access_ok(hva, n):
        raise _err(EFAULT, f"[{hva:#x}, +{n:#x}) is not user memory (access_ok: it wraps or reaches "
                   "TASK_SIZE_MAX)")


_HUGE_POLICIES = {
    "gmem_backing": {"buddy": GMEM_BACKING_BUDDY, "hugetlb": GMEM_BACKING_HUGETLB},
    "huge_split": {"never": GMEM_HUGE_SPLIT_NEVER, "convert": GMEM_HUGE_SPLIT_CONVERT,
                   "convert-2m": GMEM_HUGE_SPLIT_CONVERT_2M, "fresh": GMEM_HUGE_SPLIT_FRESH},
    "huge_merge": {"never": GMEM_HUGE_MERGE_NEVER, "eager": GMEM_HUGE_MERGE_EAGER,
                   "lazy": GMEM_HUGE_MERGE_LAZY},
}


def _name_of(table, value):
    return [k for k, v in table.items() if v == value][0]


cdef int _huge_config(gmem_host_config *cfg, backing, pages, split, merge) except -1:
    """Host(gmem_backing=, hugetlb_pages=, huge_split=, huge_merge=) into cfg."""
    for name, value in (("gmem_backing", backing), ("huge_split", split), ("huge_merge", merge)):
        if value is not None and (not isinstance(value, str) or value not in _HUGE_POLICIES[name]):
            raise ValueError(f"{name} must be one of {sorted(_HUGE_POLICIES[name])}, not {value!r}")
    backing = backing or "buddy"
    cfg.gmem_backing = _HUGE_POLICIES["gmem_backing"][backing]
    hugetlb = backing == "hugetlb"
    cfg.huge_split = _HUGE_POLICIES["huge_split"][split or ("fresh" if hugetlb else "never")]
    cfg.huge_merge = _HUGE_POLICIES["huge_merge"][merge or ("eager" if hugetlb else "never")]
    if pages is None:
        pages = {}
    if not isinstance(pages, dict):
        raise TypeError(f"hugetlb_pages must be a dict like {{'1G': 2, '2M': 16}}, not {type(pages).__name__}")
    for size, n in pages.items():
        if size not in ("1G", "2M"):
            raise ValueError(f"hugetlb_pages: sizes are '1G' and '2M', not {size!r}")
        if size == "1G":
            cfg.hugetlb_pages_1g = _int_arg(n, "hugetlb_pages['1G']", 0, 1 << 40)
        else:
            cfg.hugetlb_pages_2m = _int_arg(n, "hugetlb_pages['2M']", 0, 1 << 40)
    return 0


@cython.final
cdef class Host:
    """A simulated machine: physical memory, KVM (/dev/kvm) and, on "amd", the RMP.

    kernel="rfc-2023"|"6.18"|"7.2"|"next" names the version whose rules apply (default
    $GMEM_KERNEL, else "7.2"). Keyword options model kernel builds (sw_protected,
    memory_attributes, tdp) and the policies argued in the RFC, which override the version's
    own: prepare="fault"|"alloc", prepared_tracking="gmem"|"arch",
    invalidate="free_folio"|"invalidate_folio" (with reattach_private, the re-attach scan
    after a split that the RFC cover letter suggests), huge_folios (2M gmem folios,
    proposed upstream), scramble_on_conversion (SW_PROTECTED: converted gmem pages read back
    as garbage). Under kernel="next": gmem_in_place_conversion (the module parameter, default
    False as in a kernel built with CONFIG_KVM_VM_MEMORY_ATTRIBUTES; True: shared/private lives
    in the guest_memfd, KVM_SET_MEMORY_ATTRIBUTES2 on its fd) and
    content_modes (the RFC v4/v5 ZERO/PRESERVE flags of that ioctl, dropped from v7 on).

    Huge pages (proposed upstream, in no kernel): gmem_backing="buddy" (2M folios from the
    buddy allocator with huge_folios) or "hugetlb" (every guest_memfd from the pool);
    hugetlb_pages={"1G": n, "2M": m} reserves the pool at boot (hugepages=), and lets files
    ask for it with the proposed GUEST_MEMFD_FLAG_HUGETLB; huge_split="never"|"convert"|
    "convert-2m"|"fresh" and huge_merge="never"|"eager"|"lazy" are the restructuring policies
    (default: the HugeTLB WIP tree's "fresh"/"eager" for hugetlb, "never"/"never" for buddy).
    """
    cdef gmem_host *h
    cdef readonly str platform
    cdef readonly bint sw_protected
    cdef readonly bint memory_attributes
    cdef readonly int fd
    cdef readonly Trace trace
    cdef dict _fds
    cdef public object _hook_exc
    cdef dict _hook_fns           # (vm_type, hook index) -> the Python callable
    cdef int _hook_depth         # Python hooks running now: gmem refuses to be re-entered from one
    cdef long _owner             # the thread holding the host (_host_enter), 0 for none
    cdef int _depth              # its nested calls
    cdef PyThread_type_lock _lock     # held by the owner while it is parked (_host_park)
    cdef int _parked
    cdef uint64_t _tickets       # threads that ever waited for the host (_host_wait)
    cdef uint64_t _serving       # of them, those that got it
    cdef bint _initialized
    cdef object __weakref__

    def __cinit__(self, memory=64 << 30, platform="amd", *, kernel=None, sw_protected=True,
                  memory_attributes=True, tdp=True, numa_nodes=1, prepare=None, prepared_tracking=None,
                  invalidate=None, huge_folios=False, reattach_private=False,
                  scramble_on_conversion=False, content_memfd=False, gmem_in_place_conversion=None,
                  content_modes=False, gmem_backing="buddy", hugetlb_pages=None, huge_split=None,
                  huge_merge=None, tdx_huge_page=False):
        cdef gmem_host_config cfg
        cdef const char *why = NULL
        cdef int r
        gmem_host_config_init(&cfg)
        cfg.tdx_huge_page = _tdx_huge_page_arg(tdx_huge_page, platform)
        cfg.memory = _u64(memory, "memory")
        if platform not in _PLATFORMS:
            raise ValueError(f"platform must be one of {sorted(_PLATFORMS)}, not {platform!r}")
        kernel = default_kernel() if kernel is None else kernel
        if not isinstance(kernel, str) or kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        cfg.kernel = KERNELS[kernel]
        gmem_host_config_kernel(&cfg)               # the version's policies ...
        for name, value in (("prepare", prepare), ("prepared_tracking", prepared_tracking),
                            ("invalidate", invalidate)):
            if value is not None and (not isinstance(value, str) or value not in _POLICIES[name]):
                raise ValueError(f"{name} must be one of {sorted(_POLICIES[name])}, not {value!r}")
        cfg.platform = _PLATFORMS[platform]
        cfg.tdp = bool(tdp)
        cfg.numa_nodes = _int_arg(numa_nodes, "numa_nodes", 1, GMEM_MAX_NUMNODES + 1)
        cfg.sw_protected = bool(sw_protected)
        cfg.memory_attributes = bool(memory_attributes)
        if prepare is not None:                     # ... which the named options override
            cfg.prepare_policy = _POLICIES["prepare"][prepare]
        if prepared_tracking is not None:
            cfg.prepared_tracking = _POLICIES["prepared_tracking"][prepared_tracking]
        if invalidate is not None:
            cfg.invalidate_policy = _POLICIES["invalidate"][invalidate]
        cfg.huge_folios = bool(huge_folios)
        cfg.reattach_private = bool(reattach_private)
        cfg.scramble_on_conversion = bool(scramble_on_conversion)
        cfg.content_memfd = bool(content_memfd)     # gmem exec (_contents_memfd.pxi)
        _huge_config(&cfg, gmem_backing, hugetlb_pages, huge_split, huge_merge)
        in_place = bool(gmem_in_place_conversion)
        modes = bool(content_modes)
        if in_place and kernel != "next":
            raise ValueError(f"gmem_in_place_conversion is a module parameter of \"next\" only, "
                             f"not of kernel {kernel!r}")
        if modes and kernel != "next":
            raise ValueError(f"content_modes (RFC v4/v5 KVM_SET_MEMORY_ATTRIBUTES2 flags) need "
                             f"kernel=\"next\", not {kernel!r}")
        if modes and not in_place:
            raise ValueError("content_modes need gmem_in_place_conversion (they are flags of "
                             "KVM_SET_MEMORY_ATTRIBUTES2)")
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError("host lock")
        r = gmem_host_create(&cfg, &self.h, &why)
        if r == -ENOMEM:
            raise MemoryError("host")
        if r < 0:
            raise ValueError((<bytes>why).decode() if why != NULL else "invalid host configuration")
        self.h.py_host = <void *>self
        self.h.gmem_in_place_conversion = in_place
        self.h.content_modes = modes
        self.platform = platform
        self.sw_protected = cfg.sw_protected
        self.memory_attributes = cfg.memory_attributes
        # A process's fds 0-2 are open files that are not guest_memfds (set_memory_region_test.c
        # binds guest_memfd = 0 and expects kvm_gmem_bind's "not a gmem file" EINVAL, not EBADF)
        self._fds = {0: "stdin", 1: "stdout", 2: "stderr"}
        self._hook_fns = {}
        self.trace = Trace(self)
        self.fd = self._install_fd(self)          # /dev/kvm

    def __init__(self, *args, **kwargs):
        """(__cinit__ built the host; a second __init__ on a live host is refused)"""
        if self._initialized:
            raise TypeError("Host.__init__ called again on a live host: make a new Host")
        self._initialized = True

    def __dealloc__(self):
        if self.h != NULL:
            self.h.py_host = NULL               # its hooks are gone with it
            gmem_host_put(self.h)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    @property
    def kernel(self):
        """The kernel version whose rules apply ("rfc-2023", "6.18", "7.2" or "next")."""
        return {v: k for k, v in KERNELS.items()}[self.h.kernel]

    @property
    def gmem_in_place_conversion(self):
        """kvm.gmem_in_place_conversion ("next"): shared/private is a guest_memfd attribute
        (KVM_SET_MEMORY_ATTRIBUTES2 on its fd) rather than the VM's."""
        return bool(self.h.gmem_in_place_conversion)

    @property
    def content_modes(self):
        """KVM_SET_MEMORY_ATTRIBUTES2 takes the RFC v4/v5 content modes in flags."""
        return bool(self.h.content_modes)

    @property
    def tdx_huge_page(self):
        """The proposed kvm_intel.tdx_huge_page: the largest private S-EPT leaf of a running TD
        (None: 4K only, as mainline; "2M"; "1G", beyond any posted series)."""
        return {0: None, PG_LEVEL_2M: "2M", PG_LEVEL_1G: "1G"}[self.h.tdx_huge_page]

    @property
    def numa_nodes(self):
        """NUMA nodes: the memory split into equal ranges, node 0 lowest (the local node)."""
        return self.h.pm.nr_nodes

    def pfn_to_nid(self, pfn):
        """pfn_to_nid: the node holding a page frame."""
        held = _host_enter(self)
        cdef uint64_t p = _u64(pfn, "pfn")
        if p >= self.h.pm.end_pfn:
            raise ValueError(f"pfn {p:#x} is beyond the host's memory")
        return phys_pfn_to_nid(&self.h.pm, p)

    @property
    def tdp(self):
        """tdp_enabled: the host has two-dimensional paging (KVM_PRE_FAULT_MEMORY needs it)."""
        return bool(self.h.tdp)

    @property
    def options(self):
        """The policy options in force, by name (the version's, unless overridden)."""
        return dict(
            prepare=[k for k, v in _POLICIES["prepare"].items() if v == self.h.prepare_policy][0],
            prepared_tracking=[k for k, v in _POLICIES["prepared_tracking"].items()
                               if v == self.h.prepared_tracking][0],
            invalidate=[k for k, v in _POLICIES["invalidate"].items() if v == self.h.invalidate_policy][0],
            huge_folios=bool(self.h.huge_folios), reattach_private=bool(self.h.reattach_private),
            scramble_on_conversion=bool(self.h.scramble_on_conversion),
            content_memfd=bool(self.h.content_memfd),
            gmem_backing=_name_of(_HUGE_POLICIES["gmem_backing"], self.h.gmem_backing),
            huge_split=_name_of(_HUGE_POLICIES["huge_split"], self.h.huge_split),
            huge_merge=_name_of(_HUGE_POLICIES["huge_merge"], self.h.huge_merge))

    @property
    def hugetlb(self):
        """The hugetlb pool by page size ("2M", "1G"): total, free and reserved huge pages
        (HugePages_Total/Free/Rsvd), and the bytes freed inside split pool pages that cannot
        go back until the rest of their page does (stranded_bytes)."""
        held = _host_enter(self)
        cdef hstate *hs
        out = {}
        for name, i in (("2M", HSTATE_2M), ("1G", HSTATE_1G)):
            hs = &self.h.pm.hstates[i]
            out[name] = dict(total=hs.nr_huge_pages, free=hs.free_huge_pages, reserved=hs.resv_huge_pages)
        out["stranded_bytes"] = gmem_hugetlb_stranded_bytes(self.h)
        return out

    # ------------------------------------------------------------- fds
    cdef int _install_fd(self, obj) except -1:
        fd = 3
        while fd in self._fds:
            fd += 1
        self._fds[fd] = obj
        return fd

    cdef object _fd_object(self, fd):
        return self._fds.get(fd)

    cdef void _close_fd(self, int fd):
        self._fds.pop(fd, None)

    cdef void _raise_hook_exc(self) except *:
        if self.h.hook_error:
            self.h.hook_error = 0
            exc, self._hook_exc = self._hook_exc, None
            if exc is not None:
                raise exc

    cdef int _check(self, int r, str what) except -1:
        """A kernel rule's result: a Python hook's exception first, then -errno as OSError."""
        self._raise_hook_exc()
        return _check_r(self.h, r, what)

    # -------------------------------------------------------- KVM ioctls
    @property
    def vm_types(self):
        """The KVM_CAP_VM_TYPES bitmap."""
        return self.h.vm_types

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on /dev/kvm (kvm == NULL)."""
        return kvm_check_extension(self.h, NULL, _u64_wrap(cap, "cap"))

    def create_vm(self, vm_type=0):
        """KVM_CREATE_VM: EINVAL for a type >= 32 or one this host does not support."""
        return Vm(self, vm_type)

    def register_hooks(self, vm_type, **hooks):
        """Replace hooks of one VM type with Python callables (None restores the native one):
        is_private_fault(vm, gpa, error_code) -> bool, gmem_prepare(vm, gfn, pfn, order) -> int,
        gmem_invalidate(host, start_pfn, end_pfn), private_max_mapping_level(vm, pfn) -> int,
        and "next"'s names: make_private(vm, gfn, pfn, npages) -> int (gmem_prepare's slot: under
        "next" it runs only for private pages), reclaim(host, start_pfn, end_pfn) (gmem_invalidate's,
        at free), gmem_make_shared(host, start_pfn, npages) (at a conversion to shared).
        A type this host lacks (6..31) becomes creatable, with private memory like SW_PROTECTED."""
        cdef int t, i
        cdef kvm_x86_hooks native
        held = _host_enter(self)                  # the fault path reads the hook table
        if isinstance(vm_type, bool) or not isinstance(vm_type, int) or not 0 <= vm_type < KVM_MAX_VM_TYPES:
            raise ValueError(f"vm_type must be in [0, {KVM_MAX_VM_TYPES})")
        slots = [HOOK_RENAMES.get(name, name) for name in hooks]
        if len(set(slots)) != len(slots):
            raise ValueError("a hook given by both its names: " + ", ".join(sorted(hooks)))
        for name, fn in hooks.items():
            if HOOK_RENAMES.get(name, name) not in HOOK_NAMES:
                raise ValueError(f"unknown hook {name!r}; hooks: {', '.join(HOOK_NAMES + tuple(HOOK_RENAMES))}")
            if fn is not None and not callable(fn):
                raise TypeError(f"hook {name} must be callable or None")
        t = vm_type
        if t >= 6:
            self.h.vm_types |= 1u << t
        kvm_x86_hooks_init(&native, t)
        for name, fn in hooks.items():
            i = HOOK_NAMES.index(HOOK_RENAMES.get(name, name))
            if fn is not None and name == "make_private":
                fn = _make_private_as_prepare(fn)
            _hook_set(&self.h.hooks[t], i, &native if fn is None else &_PY_HOOKS)
            if fn is None:
                self._hook_fns.pop((t, i), None)
            else:
                self._hook_fns[(t, i)] = fn

    # ------------------------------------------------------------ memory
    @property
    def nr_pages(self):
        return self.h.pm.end_pfn - self.h.pm.start_pfn

    @property
    def nr_free_pages(self):
        held = _host_enter(self)
        return gmem_host_free_pages(self.h)

    @property
    def stats(self):
        held = _host_enter(self)
        d = {name: gmem_host_stat(self.h, i) for i, name in enumerate(HOST_STATS)}
        # "next" names: reclaim is the free-time hook gmem_invalidate was
        d["gmem_reclaim"] = d["gmem_invalidate"]
        d["gmem_make_shared"] = self.h.gmem_make_shared_calls
        d["gmem_make_shared_pages"] = self.h.gmem_make_shared_pages
        d["gmem_conversions"] = self.h.gmem_conversions
        d["free_pages"] = self.h.pm.nr_free_pages
        d["used_pages"] = self.h.pm.end_pfn - self.h.pm.start_pfn - self.h.pm.nr_free_pages
        d["folios"] = self.h.pm.nr_folios
        return d

    @property
    def memory_bytes(self):
        """C memory used by the model's own bookkeeping of host memory."""
        held = _host_enter(self)
        return gmem_host_memory_bytes(self.h)

    def folio(self, pfn):
        """The folio containing pfn: dict(pfn, order, flags, refcount, mapping, index, private) or None."""
        held = _host_enter(self)
        return _folio_dict(&self.h.pm, _u64(pfn, "pfn"))

    cdef unsigned char *_user_page(self, uint64_t hva, bint write) except NULL:
        cdef uint64_t pfn
        cdef unsigned char *p
        if hva_to_pfn(self.h, hva, &pfn) < 0:
            raise _err(EFAULT, f"hva {hva:#x} is not mapped in the VMM (host.mmap_user, or a memslot)")
        if write and self.h.platform == GMEM_PLATFORM_AMD and snp_user_write_fault(self.h, pfn):
            # a user-mode RMP #PF: "Unexpected RMP page fault for user address" -> SIGBUS
            raise _SigBus(f"SIGBUS: VMM write at hva {hva:#x} hits pfn {pfn:#x}, assigned in the "
                          f"RMP ({_rmp_entry(self.h, pfn)})", hva)
        p = page_data_get(self.h, pfn, write)
        if p == NULL and write:
            raise MemoryError("out of memory for page contents")
        return p if p != NULL else <unsigned char *>_ZERO_PAGE

    def mmap_user(self, addr, size):
        """The VMM maps anonymous memory at [addr, addr + size) (page aligned, below
        TASK_SIZE_MAX): its pages read as zeros until written. A memslot's userspace range is
        mapped when the memslot is created (the VMM mapped guest RAM first)."""
        held = _host_enter(self)
        cdef uint64_t a = _u64(addr, "addr"), n = _u64(size, "size")
        r = host_mmap_user(self.h, a, n)
        if r == -EINVAL:
            raise _err(EINVAL, f"mmap: [{a:#x}, +{n:#x}) is not page-aligned user memory")
        if r < 0:
            raise MemoryError("mmap: out of memory")

    def munmap_user(self, addr, size):
        """munmap(2) of the VMM's memory: each VM's mmu notifier zaps the gfns of the memslots
        it backs (kvm_mmu_notifier_invalidate_range_start), then the pages go; a guest fault
        there is -EFAULT from then on, with no memory-fault exit (kvm_handle_error_pfn)."""
        held = _host_enter(self)
        _refuse_in_hook(self, "munmap")
        self._check(gmem_munmap_user(self.h, _u64(addr, "addr"), _u64(size, "size")), "munmap")

    def read_user(self, hva, n):
        """Read the VMM's own memory (the shared backing of memslots) at hva."""
        held = _host_enter(self)
        cdef uint64_t a = _u64(hva, "hva"), ln = _buffer_len(n, "n"), pos = 0, k
        _user_access_ok(a, ln)
        out = bytearray(ln)
        cdef unsigned char[::1] o = out if ln else None
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            memcpy(&o[pos], self._user_page(a + pos, False) + ((a + pos) & 4095), k)
            pos += k
        return bytes(out)

    def write_user(self, hva, data):
        """Write the VMM's own memory at hva."""
        held = _host_enter(self)
        cdef uint64_t a = _u64(hva, "hva"), pos = 0, k
        b = _bytes_arg(data, "data")
        cdef uint64_t ln = len(b)
        cdef const unsigned char[::1] d = b if ln else None
        _user_access_ok(a, ln)
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            memcpy(self._user_page(a + pos, True) + ((a + pos) & 4095), &d[pos], k)
            pos += k

    @property
    def rmp(self):
        """The SNP RMP (gmem.Rmp) on platform "amd", else None."""
        return Rmp(self) if self.h.platform == GMEM_PLATFORM_AMD else None

    def touch(self, pfn, write=True):
        """A host CPU access to pfn through the direct map. On "amd" a write to an RMP-assigned
        page, or through a 2M direct mapping over any assigned page, raises gmem.RmpViolation."""
        held = _host_enter(self)
        cdef uint64_t p = _u64(pfn, "pfn")
        if p >= self.h.pm.end_pfn:
            raise _err(EINVAL, f"pfn {pfn:#x} is beyond host memory")
        if write and host_write_fault(self.h, p):
            mapping = "4K" if snp_direct_map_is_4k(self.h, p) else "2M"
            raise _RmpViolation(f"host write to pfn {p:#x} through a {mapping} direct mapping: RMP #PF "
                                f"(X86_PF_RMP); entry {_rmp_entry(self.h, p)}")

    def memory_failure(self, pfn):
        """memory_failure(pfn) (HWPOISON): a gmem page is marked poisoned and unmapped; later
        faults on it are memory-fault exits with -EHWPOISON. Returns True for a gmem page."""
        held = _host_enter(self)
        cdef uint64_t p = _u64(pfn, "pfn")
        if p >= self.h.pm.end_pfn:
            raise _err(EINVAL, f"pfn {pfn:#x} is beyond host memory")
        return bool(gmem_memory_failure(self.h, p))

    def inject(self, *, alloc_failures=0, prepare_failures=0, prepare_errno=EIO,
               rmpupdate_failures=0, rmpupdate_code=3):
        """Fault injection, as a context manager that clears what is left on exit:
        page allocations fail with ENOMEM; arch prepares fail with -prepare_errno;
        RMPUPDATEs return rmpupdate_code (FAIL_OVERLAP is retried, as rmpupdate() does)."""
        held = _host_enter(self)
        # every argument is checked before anything is armed: a refused call injects nothing
        cdef uint64_t na = _u64(alloc_failures, "alloc_failures")
        cdef uint64_t npf = _u64(prepare_failures, "prepare_failures")
        cdef uint64_t nr = _u64(rmpupdate_failures, "rmpupdate_failures")
        if nr and not self.h.platform == GMEM_PLATFORM_AMD:
            raise ValueError("RMPUPDATE failures need platform='amd'")
        if isinstance(prepare_errno, bool) or not isinstance(prepare_errno, (int, np.integer)) \
                or not 0 < prepare_errno < 4096:
            raise ValueError("prepare_errno must be a positive errno")
        if nr and (isinstance(rmpupdate_code, bool) or not isinstance(rmpupdate_code, (int, np.integer))
                   or not snp_rmpupdate_failure_code(rmpupdate_code if 0 <= rmpupdate_code < 256 else 0)):
            raise ValueError(f"not an RMPUPDATE failure code: {rmpupdate_code}")
        gmem_inject(self.h, na, npf, prepare_errno, nr, rmpupdate_code if nr else 0)
        return _Injection(self)

    def inject_alloc_failures(self, n):
        """Fault injection: the next n page allocations fail (ENOMEM as the kernel reports it)."""
        held = _host_enter(self)
        self.h.pm.fail_alloc = _u64(n, "n")

    def check(self):
        """Cross-check every structure; raise gmem.InvariantError naming the first inconsistency."""
        held = _host_enter(self)
        cdef char buf[1024]
        if gmem_host_check(self.h, buf, sizeof(buf)):
            raise _InvariantError(buf.decode())


@cython.final
cdef class _Injection:
    """host.inject(...) as a context manager: on exit, injections not yet consumed are dropped."""
    cdef readonly Host host

    def __cinit__(self, Host host not None):
        self.host = host

    def __enter__(self):
        return self.host

    def __exit__(self, *exc):
        held = _host_enter(self.host)
        gmem_inject(self.host.h, 0, 0, EIO, 0, 0)
        return False
