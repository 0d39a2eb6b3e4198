# The Python handles: gmem.Host, Vm, Vcpu, GuestMemfd, Mapping.  They check
# arguments in the kernel's order, raise OSError(errno) like the ioctls and
# syscalls they model, and call the C functions above; all state is in the
# structs they own.

import errno as _errno_mod
from gmem import uapi as _uapi
from gmem.errors import SigBus as _SigBus, InvariantError as _InvariantError, RmpViolation as _RmpViolation

from cpython.ref cimport PyObject
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, PyThread_get_thread_ident,
                               WAIT_LOCK, NOWAIT_LOCK)
from libc.string cimport memcpy

cdef unsigned char _ZERO_PAGE[4096]

FAULT_DTYPE = np.dtype({
    "names": ["ret", "exit_reason", "pfn", "gpa", "flags", "level"],
    "formats": ["<i4", "<u4", "<u8", "<u8", "<u8", "u1"],
    "offsets": [0, 4, 8, 16, 24, 32],
    "itemsize": sizeof(kvm_fault_out),
})
TRACE_DTYPE = np.dtype({
    "names": ["seq", "event", "vcpu", "a", "b", "c", "d"],
    "formats": ["<u8", "<u4", "<u4", "<u8", "<u8", "<u8", "<u8"],
    "offsets": [0, 8, 12, 16, 24, 32, 40],
    "itemsize": sizeof(gmem_trace_rec),
})
TRACE_EVENTS = ("kvm_page_fault", "spte_install", "spte_zap", "memory_fault_exit",
                "gmem_prepare", "gmem_invalidate")
_TRACE_FIELDS = (("gpa", "error_code", None, None), ("gfn", "pfn", "level", "private"),
                 ("gfn", "pfn", "level", None), ("gpa", "flags", "errno", None),
                 ("gfn", "pfn", "order", "errno"), ("start_pfn", "end_pfn", None, None))
VCPU_STATS = ("pf_taken", "pf_fixed", "pf_spurious", "pf_emulate", "pf_fast", "pf_retry",
              "memory_fault_exits", "synthetic_error_bits_cleared")
VM_STATS = ("remote_tlb_flush", "zapped_sptes", "mmu_invalidations", "gmem_prepare",
            "gmem_prepare_failed")
HOST_STATS = ("folios_allocated", "folios_freed", "folio_splits", "gmem_invalidate",
              "gmem_invalidate_pages", "alloc_failures", "hook_errors")
HOOK_NAMES = ("is_private_fault", "gmem_prepare", "gmem_invalidate", "private_max_mapping_level")

_POLICIES = {
    "prepare": {"fault": GMEM_PREPARE_FAULT, "alloc": GMEM_PREPARE_ALLOC},
    "prepared_tracking": {"gmem": GMEM_TRACK_GMEM, "arch": GMEM_TRACK_ARCH},
    "invalidate": {"free_folio": GMEM_INVALIDATE_FREE_FOLIO,
                   "invalidate_folio": GMEM_INVALIDATE_INVALIDATE_FOLIO},
}
_PLATFORM_TYPES = {"amd": (0, 2, 3, 4), "intel": (0, 5), "none": (0,)}
_U32 = 0xFFFFFFFF
_MAX_LFS_FILESIZE = (1 << 63) - 1
_TASK_SIZE_MAX = 0x7FFFFFFFF000


def _err(int e, str msg):
    return OSError(e, f"{_errno_mod.errorcode.get(e, e)}: {msg}")


cdef uint64_t _u64_wrap(object x, str what) except? 0:
    """A __u64 ioctl field: Python ints wrap as C would (-1 -> 2**64 - 1)."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if x < -(1 << 63) or x >= (1 << 64):
        raise ValueError(f"{what} {x} does not fit in 64 bits")
    return <uint64_t>(x & 0xFFFFFFFFFFFFFFFF)


cdef uint32_t _u32_wrap(object x, str what) except? 0:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if x < -(1 << 31) or x >= (1 << 32):
        raise ValueError(f"{what} {x} does not fit in 32 bits")
    return <uint32_t>(x & _U32)


cdef object _int_arg(object x, str what, object lo, object hi):
    """An integer argument in [lo, hi) (None: unbounded): TypeError for anything but an int
    (floats, strings, bools), ValueError outside the range -- never an OverflowError from a C
    conversion."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x >= hi):
        raise ValueError(f"{what} {x} is outside [{lo}, {hi})")
    return x


cdef inline object _c_int_arg(object x, str what):
    return _int_arg(x, what, -(1 << 31), 1 << 31)


cdef bytes _bytes_arg(object data, str what):
    """Bytes-like data or an iterable of byte values; an int is refused (bytes(n) would be
    n zero bytes, and an OverflowError for n >= 2**63)."""
    if isinstance(data, (int, np.integer)):
        raise TypeError(f"{what} must be bytes-like or an iterable of ints, not {type(data).__name__}")
    return bytes(data)


cdef inline uint64_t _buffer_len(object n, str what) except? 0:
    """A length of bytes to return: a Python object cannot be 2**63 bytes or more."""
    cdef uint64_t ln = _u64(n, what)
    if ln >= (<uint64_t>1) << 63:
        raise ValueError(f"{what} {ln} is larger than any buffer")
    return ln


cdef inline int64_t _s64(uint64_t x) noexcept nogil:
    return <int64_t>x


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

cdef object _call_hook(gmem_host *h, int vm_type, int which, tuple args, object default):
    cdef Host host = <Host>h.py_host
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
        host._hook_exc = e
        h.hook_error = 1
        h.stats[HOST_STAT_HOOK_ERRORS] += 1
        return default
    finally:
        _host_unpark(host)
        host._hook_depth -= 1


cdef void _refuse_in_hook(Host host, str what) except *:
    """A hook runs under the locks of the path that called it (the fault holds a file reference,
    the folio lock and the invalidate lock; truncation holds the invalidate lock): a call that
    frees files, folios, memslots or the VM from inside a hook would deadlock in the kernel, and
    would pull memory from under the C path here.  It is refused."""
    if host._hook_depth:
        raise _err(_errno_mod.EDEADLK, f"{what}: called from inside a gmem hook (the kernel holds the "
                   "locks this needs: it would deadlock)")


cdef int _py_is_private_fault(kvm *kvm, uint64_t gpa, uint64_t error_code) noexcept nogil:
    with gil:
        r = _call_hook(kvm.host, kvm.vm_type, 0, (<object>kvm.py_vm, gpa, error_code), False)
        return 1 if r else 0


cdef int _py_gmem_prepare(kvm *kvm, uint64_t gfn, uint64_t pfn, int order) noexcept nogil:
    with gil:
        r = _call_hook(kvm.host, kvm.vm_type, 1, (<object>kvm.py_vm, gfn, pfn, order), -_EIO)
        try:
            return int(r or 0)
        except Exception:
            return -_EIO


cdef void _py_gmem_invalidate(gmem_host *h, uint64_t start, uint64_t end) noexcept nogil:
    with gil:
        _call_hook(h, h.invalidate_vm_type, 2, (<object>h.py_host, start, end), None)


cdef int _py_private_max_mapping_level(kvm *kvm, uint64_t pfn) noexcept nogil:
    with gil:
        r = _call_hook(kvm.host, kvm.vm_type, 3, (<object>kvm.py_vm, pfn), 0)
        try:
            r = int(r or 0)
        except Exception:
            return 0
        return r if 0 <= r <= 3 else 0


# ------------------------------------------------------------------- trace

cdef class Trace:
    """Tracepoints of one host: a ring of fixed-size records (see TRACE_EVENTS)."""
    cdef Host host

    def __cinit__(self, Host host not None):
        self.host = host

    def enable(self, *events, capacity=1 << 16):
        """Record these events (all if none are named) in a ring of `capacity` records."""
        held = _host_enter(self.host)
        cdef gmem_host *h = &self.host.h
        cdef uint64_t cap = _u64(capacity, "capacity")
        cdef gmem_trace_rec *buf
        if cap == 0 or cap > (1 << 28):
            raise ValueError("capacity must be in [1, 2**28]")
        mask = 0
        for e in (events or TRACE_EVENTS):
            if e not in TRACE_EVENTS:
                raise ValueError(f"unknown trace event {e!r}; events: {', '.join(TRACE_EVENTS)}")
            mask |= 1 << TRACE_EVENTS.index(e)
        if h.trace_buf == NULL or h.trace_cap != cap:
            buf = <gmem_trace_rec *>_calloc(cap, sizeof(gmem_trace_rec))
            if buf == NULL:
                raise MemoryError("trace buffer")
            free(h.trace_buf)
            h.trace_buf = buf
            h.trace_cap = cap
            h.trace_seq = 0
        h.trace_mask |= mask

    def disable(self, *events):
        held = _host_enter(self.host)
        cdef gmem_host *h = &self.host.h
        for e in (events or TRACE_EVENTS):
            if e not in TRACE_EVENTS:
                raise ValueError(f"unknown trace event {e!r}")
            h.trace_mask &= ~(1 << TRACE_EVENTS.index(e))

    def clear(self):
        held = _host_enter(self.host)
        self.host.h.trace_seq = 0

    @property
    def enabled(self):
        held = _host_enter(self.host)
        return tuple(e for i, e in enumerate(TRACE_EVENTS) if (self.host.h.trace_mask >> i) & 1)

    @property
    def lost(self):
        """Records overwritten because the ring was full."""
        held = _host_enter(self.host)
        cdef gmem_host *h = &self.host.h
        return h.trace_seq - h.trace_cap if h.trace_cap and h.trace_seq > h.trace_cap else 0

    def to_numpy(self):
        """The records still in the ring, oldest first, as a TRACE_DTYPE array (a copy)."""
        held = _host_enter(self.host)
        cdef gmem_host *h = &self.host.h
        if h.trace_buf == NULL or h.trace_seq == 0:
            return np.zeros(0, dtype=TRACE_DTYPE)
        n = min(h.trace_seq, h.trace_cap)
        raw = np.asarray(<char[:h.trace_cap * sizeof(gmem_trace_rec)]><char *>h.trace_buf)
        ring = np.frombuffer(raw.tobytes(), dtype=TRACE_DTYPE)
        start = h.trace_seq % h.trace_cap if h.trace_seq > h.trace_cap else 0
        return np.concatenate([ring[start:n], ring[:start]]) if start else ring[:n].copy()

    def report(self, limit=None):
        """Lines in the style of trace-cmd report."""
        lines = []
        recs = self.to_numpy()
        if limit is not None:
            n = _int_arg(limit, "limit", 0, None)
            recs = recs[len(recs) - n:] if n < len(recs) else recs
        for r in recs:
            ev = int(r["event"])
            fields = []
            for name, key in zip(_TRACE_FIELDS[ev], "abcd"):
                if name is None:
                    continue
                v = int(r[key])
                if name in ("errno", "level", "order", "private"):
                    fields.append(f"{name}={v}")
                else:
                    fields.append(f"{name}={v:#x}")
            lines.append(f"{int(r['seq']):>10} vcpu{int(r['vcpu'])}: {TRACE_EVENTS[ev]}: " + " ".join(fields))
        return "\n".join(lines)


# -------------------------------------------------------------------- Host

cdef class Host:
    """A simulated machine: physical memory, KVM (/dev/kvm) and, on "amd", the RMP.

    Keyword options model kernel builds and the policies argued in the RFC:
    prepare="fault"|"alloc", prepared_tracking="gmem"|"arch",
    invalidate="free_folio"|"invalidate_folio" (with reattach_private, the re-attach scan
    after a split that the RFC cover letter suggests), huge_folios (2M gmem folios,
    proposed upstream), scramble_on_conversion (SW_PROTECTED: converted gmem pages read back
    as garbage). Defaults follow Linux 6.18.
    """
    cdef gmem_host h
    cdef readonly str platform
    cdef readonly bint sw_protected
    cdef readonly bint memory_attributes
    cdef readonly int fd
    cdef readonly Trace trace
    cdef dict _fds
    cdef dict _gmem_files
    cdef dict _custom_types
    cdef public object _hook_exc
    cdef dict _hook_fns           # (vm_type, hook index) -> the Python callable
    cdef int _hook_depth         # Python hooks running now: gmem refuses to be re-entered from one
    cdef long _owner             # the thread holding the host (_host_enter), 0 for none
    cdef int _depth              # its nested calls
    cdef PyThread_type_lock _lock     # held by the owner while it is parked (_host_park)
    cdef int _parked
    cdef uint64_t _tickets       # threads that ever waited for the host (_host_wait)
    cdef uint64_t _serving       # of them, those that got it
    cdef uint32_t _next_ino
    cdef uint32_t _next_asid
    cdef object __weakref__

    def __cinit__(self):
        cdef int t
        memset(&self.h, 0, sizeof(gmem_host))
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError("host lock")
        self.h.py_host = <void *>self
        for t in range(KVM_MAX_VM_TYPES):
            kvm_x86_hooks_init(&self.h.hooks[t], t)

    def __init__(self, memory=64 << 30, platform="amd", *, sw_protected=True,
                 memory_attributes=True, prepare="fault", prepared_tracking="gmem",
                 invalidate="free_folio", huge_folios=False, reattach_private=False,
                 scramble_on_conversion=False, content_memfd=False):
        cdef uint64_t nbytes = _u64(memory, "memory")
        if nbytes == 0 or nbytes & 4095:
            raise ValueError(f"memory {memory} must be a positive multiple of 4096 bytes")
        if nbytes >> 12 > (1 << 40):
            raise ValueError("memory above 4 PiB is not modelled")
        if platform not in _PLATFORM_TYPES:
            raise ValueError(f"platform must be one of {sorted(_PLATFORM_TYPES)}, not {platform!r}")
        for name, value in (("prepare", prepare), ("prepared_tracking", prepared_tracking),
                            ("invalidate", invalidate)):
            if value not in _POLICIES[name]:
                raise ValueError(f"{name} must be one of {sorted(_POLICIES[name])}, not {value!r}")
        if not memory_attributes and (sw_protected or platform != "none"):
            raise ValueError("SW_PROTECTED, SEV-SNP and TDX VMs need KVM_SET_MEMORY_ATTRIBUTES "
                             "(their Kconfig selects KVM_GENERIC_MEMORY_ATTRIBUTES)")
        phys_init(&self.h.pm, 0, nbytes >> 12)
        self.h.pm.pcp_enabled = 1
        xa_init(&self.h.page_data)
        xa_init(&self.h.user_pages)
        self.h.rmp.enabled = platform == "amd"
        self.platform = platform
        self.sw_protected = bool(sw_protected)
        self.memory_attributes = bool(memory_attributes)
        self.h.prepare_policy = _POLICIES["prepare"][prepare]
        self.h.prepared_tracking = _POLICIES["prepared_tracking"][prepared_tracking]
        self.h.invalidate_policy = _POLICIES["invalidate"][invalidate]
        self.h.huge_folios = bool(huge_folios)
        self.h.reattach_private = bool(reattach_private)
        self.h.scramble_on_conversion = bool(scramble_on_conversion)
        # gmem exec: guest_memfd contents in memfds another process maps (_contents_memfd.pxi)
        self.h.content_memfd = bool(content_memfd)
        xa_init(&self.h.content_inodes)
        # A process's fds 0-2 are open files that are not guest_memfds (set_memory_region_test.c
        # binds guest_memfd = 0 and expects kvm_gmem_bind's "not a gmem file" EINVAL, not EBADF)
        self._fds = {0: "stdin", 1: "stdout", 2: "stderr"}
        # every live guest_memfd struct file, whether an fd or only a mapping holds it
        # (memory_failure and check() must reach an inode whose fds are all closed)
        self._gmem_files = {}
        self._custom_types = {}
        self._hook_fns = {}
        self._next_ino = 1
        self._next_asid = 1
        self.trace = Trace(self)
        self.fd = self._install_fd(self)          # /dev/kvm

    def __dealloc__(self):
        cdef uint64_t start = 0, first, v
        cdef int order
        while xa_find_entry(&self.h.page_data, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
            free(<void *><size_t>v)
            start = first + 1
        xa_destroy(&self.h.page_data)
        xa_destroy(&self.h.content_inodes)
        xa_destroy(&self.h.user_pages)
        xa_destroy(&self.h.rmp.entries)
        xa_destroy(&self.h.rmp.perms)
        xa_destroy(&self.h.rmp.direct_map_4k)
        xa_destroy(&self.h.rmp.leaked)
        phys_destroy(&self.h.pm)
        free(self.h.trace_buf)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    @property
    def options(self):
        """The policy options in force, by name."""
        inv = {v: k for name in _POLICIES for k, v in _POLICIES[name].items()}
        return dict(
            prepare=[k for k, v in _POLICIES["prepare"].items() if v == self.h.prepare_policy][0],
            prepared_tracking=[k for k, v in _POLICIES["prepared_tracking"].items()
                               if v == self.h.prepared_tracking][0],
            invalidate=[k for k, v in _POLICIES["invalidate"].items() if v == self.h.invalidate_policy][0],
            huge_folios=bool(self.h.huge_folios), reattach_private=bool(self.h.reattach_private),
            scramble_on_conversion=bool(self.h.scramble_on_conversion),
            content_memfd=bool(self.h.content_memfd))

    # ------------------------------------------------------------- fds
    cdef int _install_fd(self, obj) except -1:
        fd = 3
        while fd in self._fds:
            fd += 1
        self._fds[fd] = obj
        return fd

    cdef object _fd_object(self, fd):
        return self._fds.get(fd)

    def _close_fd(self, fd):
        self._fds.pop(fd, None)

    cdef void _raise_hook_exc(self) except *:
        if self.h.hook_error:
            self.h.hook_error = 0
            exc, self._hook_exc = self._hook_exc, None
            if exc is not None:
                raise exc

    # -------------------------------------------------------- KVM ioctls
    @property
    def vm_types(self):
        """The KVM_CAP_VM_TYPES bitmap."""
        bits = 0
        for t in _PLATFORM_TYPES[self.platform]:
            bits |= 1 << t
        if self.sw_protected:
            bits |= 1 << KVM_X86_SW_PROTECTED_VM
        for t in self._custom_types:
            bits |= 1 << t
        return bits

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on /dev/kvm (kvm == NULL)."""
        return _check_extension(self, None, _u64_wrap(cap, "cap"))

    def create_vm(self, vm_type=0):
        """KVM_CREATE_VM: EINVAL for a type >= 32 or one this host does not support."""
        cdef uint64_t t = _u64_wrap(vm_type, "vm_type")
        if t >= KVM_MAX_VM_TYPES or not (self.vm_types >> t) & 1:
            raise _err(_errno_mod.EINVAL, f"KVM_CREATE_VM: vm type {vm_type} is not supported "
                       f"(kvm_arch_init_vm: KVM_CAP_VM_TYPES is {self.vm_types:#x})")
        return Vm(self, <int>t)

    def register_hooks(self, vm_type, **hooks):
        """Replace hooks of one VM type with Python callables (None restores the native one):
        is_private_fault(vm, gpa, error_code) -> bool, gmem_prepare(vm, gfn, pfn, order) -> int,
        gmem_invalidate(host, start_pfn, end_pfn), private_max_mapping_level(vm, pfn) -> int.
        A type this host lacks (6..31) becomes creatable, with private memory like SW_PROTECTED."""
        cdef int t
        cdef kvm_x86_hooks native
        held = _host_enter(self)                  # the fault path reads the hook table
        if isinstance(vm_type, bool) or not isinstance(vm_type, int) or not 0 <= vm_type < KVM_MAX_VM_TYPES:
            raise ValueError(f"vm_type must be in [0, {KVM_MAX_VM_TYPES})")
        for name, fn in hooks.items():
            if name not in HOOK_NAMES:
                raise ValueError(f"unknown hook {name!r}; hooks: {', '.join(HOOK_NAMES)}")
            if fn is not None and not callable(fn):
                raise TypeError(f"hook {name} must be callable or None")
        t = vm_type
        if t >= 6:
            self._custom_types[t] = True
        for name, fn in hooks.items():
            i = HOOK_NAMES.index(name)
            if fn is None:
                kvm_x86_hooks_init(&native, t)
                if i == 0:
                    self.h.hooks[t].is_private_fault = native.is_private_fault
                elif i == 1:
                    self.h.hooks[t].gmem_prepare = native.gmem_prepare
                elif i == 2:
                    self.h.hooks[t].gmem_invalidate = native.gmem_invalidate
                else:
                    self.h.hooks[t].private_max_mapping_level = native.private_max_mapping_level
                self._hook_fns.pop((t, i), None)
                continue
            self._hook_fns[(t, i)] = fn
            if i == 0:
                self.h.hooks[t].is_private_fault = _py_is_private_fault
            elif i == 1:
                self.h.hooks[t].gmem_prepare = _py_gmem_prepare
            elif i == 2:
                self.h.hooks[t].gmem_invalidate = _py_gmem_invalidate
            else:
                self.h.hooks[t].private_max_mapping_level = _py_private_max_mapping_level

    # ------------------------------------------------------------ memory
    @property
    def nr_pages(self):
        return self.h.pm.end_pfn - self.h.pm.start_pfn

    @property
    def nr_free_pages(self):
        held = _host_enter(self)
        return self.h.pm.nr_free_pages

    @property
    def stats(self):
        held = _host_enter(self)
        d = {name: self.h.stats[i] for i, name in enumerate(HOST_STATS)}
        d["free_pages"] = self.h.pm.nr_free_pages
        d["used_pages"] = self.h.pm.end_pfn - self.h.pm.start_pfn - self.h.pm.nr_free_pages
        d["folios"] = self.h.pm.nr_folios
        return d

    @property
    def memory_bytes(self):
        """C memory used by the model's own bookkeeping of host memory."""
        held = _host_enter(self)
        cdef size_t n = sizeof(gmem_host) + xa_memory_bytes(&self.h.pm.memmap)
        cdef int o
        for o in range(NR_PAGE_ORDERS):
            n += xa_memory_bytes(&self.h.pm.free_area[o])
        n += self.h.pm.nr_chunks * (sizeof(folio) << FOLIO_CHUNK_SHIFT)
        n += xa_memory_bytes(&self.h.page_data) + 4096 * self.h.page_data.nr_entries
        return n + xa_memory_bytes(&self.h.user_pages)

    def folio(self, pfn):
        """The folio containing pfn: dict(pfn, order, flags, refcount, mapping, index, private) or None."""
        held = _host_enter(self)
        cdef uint32_t id = pfn_folio(&self.h.pm, _u64(pfn, "pfn"))
        cdef folio *f
        if id == 0:
            return None
        f = folio_get(&self.h.pm, id)
        return dict(pfn=f.pfn, order=f.order, flags=f.flags, refcount=f.refcount,
                    mapping=f.mapping, index=f.index, private=f.private)

    cdef unsigned char *_user_page(self, uint64_t hva, bint write) except NULL:
        cdef uint64_t pfn
        cdef unsigned char *p
        if hva_to_pfn(&self.h, hva, &pfn) < 0:
            raise _err(_errno_mod.EFAULT, f"hva {hva:#x} is not mapped in the VMM")
        if write and rmp_raw(&self.h, pfn) & RMP_ASSIGNED:
            # a user-mode RMP #PF: "Unexpected RMP page fault for user address" -> SIGBUS
            self.h.rmp.stats[SNP_STAT_RMP_VIOLATIONS] += 1
            raise _SigBus(f"SIGBUS: VMM write at hva {hva:#x} hits pfn {pfn:#x}, assigned in the "
                          f"RMP ({_rmp_entry(rmp_raw(&self.h, pfn))})", hva)
        p = page_data_get(&self.h, pfn, write)
        if p == NULL and write:
            raise MemoryError("out of memory for page contents")
        return p if p != NULL else <unsigned char *>_ZERO_PAGE

    def read_user(self, hva, n):
        """Read the VMM's own memory (the shared backing of memslots) at hva."""
        held = _host_enter(self)
        cdef uint64_t a = _u64(hva, "hva"), ln = _buffer_len(n, "n"), pos = 0, k
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
        while pos < ln:
            k = min(ln - pos, 4096 - ((a + pos) & 4095))
            memcpy(self._user_page(a + pos, True) + ((a + pos) & 4095), &d[pos], k)
            pos += k

    @property
    def rmp(self):
        """The SNP RMP (gmem.Rmp) on platform "amd", else None."""
        return Rmp(self) if self.h.rmp.enabled else None

    def touch(self, pfn, write=True):
        """A host CPU access to pfn through the direct map. On "amd" a write to an RMP-assigned
        page, or through a 2M direct mapping over any assigned page, raises gmem.RmpViolation."""
        held = _host_enter(self)
        cdef uint64_t p = _u64(pfn, "pfn"), split
        if p >= self.h.pm.end_pfn:
            raise _err(_errno_mod.EINVAL, f"pfn {pfn:#x} is beyond host memory")
        if write and not host_write_ok(&self.h, p):
            self.h.rmp.stats[SNP_STAT_RMP_VIOLATIONS] += 1
            mapping = "4K" if xa_load(&self.h.rmp.direct_map_4k, p >> 9, &split) else "2M"
            raise _RmpViolation(f"host write to pfn {p:#x} through a {mapping} direct mapping: RMP #PF "
                                f"(X86_PF_RMP); entry {_rmp_entry(rmp_raw(&self.h, p))}")

    def memory_failure(self, pfn):
        """memory_failure(pfn) (HWPOISON): a gmem page is marked poisoned and unmapped; later
        faults on it are memory-fault exits with -EHWPOISON. Returns True for a gmem page."""
        held = _host_enter(self)
        cdef uint64_t p = _u64(pfn, "pfn")
        cdef uint32_t id = pfn_folio(&self.h.pm, p)
        if p >= self.h.pm.end_pfn:
            raise _err(_errno_mod.EINVAL, f"pfn {pfn:#x} is beyond host memory")
        if id == 0:
            return False
        for gf in self._gmem_files.values():
            if (<GmemFile>gf).inode.i.ino == folio_get(&self.h.pm, id).mapping:
                kvm_gmem_error_folio(&(<GmemFile>gf).inode.i, id)
                return True
        folio_get(&self.h.pm, id).flags |= PG_hwpoison
        return False

    def inject(self, *, alloc_failures=0, prepare_failures=0, prepare_errno=_errno_mod.EIO,
               rmpupdate_failures=0, rmpupdate_code=3):
        """Fault injection, as a context manager that clears what is left on exit:
        page allocations fail with ENOMEM; arch prepares fail with -prepare_errno;
        RMPUPDATEs return rmpupdate_code (FAIL_OVERLAP is retried, as rmpupdate() does)."""
        held = _host_enter(self)
        # every argument is checked before anything is armed: a refused call injects nothing
        cdef uint64_t na = _u64(alloc_failures, "alloc_failures")
        cdef uint64_t npf = _u64(prepare_failures, "prepare_failures")
        cdef uint64_t nr = _u64(rmpupdate_failures, "rmpupdate_failures")
        if nr and not self.h.rmp.enabled:
            raise ValueError("RMPUPDATE failures need platform='amd'")
        if isinstance(prepare_errno, bool) or not isinstance(prepare_errno, (int, np.integer)) \
                or not 0 < prepare_errno < 4096:
            raise ValueError("prepare_errno must be a positive errno")
        if nr and rmpupdate_code not in (RMPUPDATE_FAIL_INPUT, RMPUPDATE_FAIL_PERMISSION,
                                         RMPUPDATE_FAIL_INUSE, RMPUPDATE_FAIL_OVERLAP):
            raise ValueError(f"not an RMPUPDATE failure code: {rmpupdate_code}")
        self.h.pm.fail_alloc = na
        self.h.fail_prepare = npf
        self.h.fail_prepare_errno = int(prepare_errno)
        if nr:
            self.rmp.inject_rmpupdate_failures(nr, rmpupdate_code)
        return _Injection(self)

    def inject_alloc_failures(self, n):
        """Fault injection: the next n page allocations fail (ENOMEM as the kernel reports it)."""
        held = _host_enter(self)
        self.h.pm.fail_alloc = _u64(n, "n")

    def check(self):
        """Cross-check every structure; raise gmem.InvariantError naming the first inconsistency."""
        held = _host_enter(self)
        _host_check(self)


# ------------------------------------------------------- KVM_CHECK_EXTENSION

cdef object _check_extension(Host host, Vm vm, uint64_t cap):
    """kvm_vm_ioctl_check_extension_generic + the x86 part, for the caps gmem models."""
    cdef bint private = vm is not None and vm.k.has_private_mem
    if cap == _uapi.KVM_CAP_USER_MEMORY2 or cap == _uapi.KVM_CAP_MEMORY_FAULT_INFO:
        return 1
    if cap == _uapi.KVM_CAP_MEMORY_ATTRIBUTES:
        if not host.memory_attributes:
            return 0
        return KVM_MEMORY_ATTRIBUTE_PRIVATE if vm is None or private else 0
    if cap == _uapi.KVM_CAP_GUEST_MEMFD:
        return 1
    if cap == _uapi.KVM_CAP_GUEST_MEMFD_FLAGS:
        # kvm_gmem_get_supported_flags: INIT_SHARED only without private memory
        return GUEST_MEMFD_FLAG_MMAP if private else GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    if cap == _uapi.KVM_CAP_VM_TYPES:
        return host.vm_types
    if cap == _uapi.KVM_CAP_NR_MEMSLOTS:
        return _uapi.KVM_USER_MEM_SLOTS
    if cap == _uapi.KVM_CAP_READONLY_MEM:
        return 1 if vm is None else int(not vm.k.has_protected_state)
    if cap == _uapi.KVM_CAP_MULTI_ADDRESS_SPACE:
        # built without SMM, like this machine's kernel: KVM_MAX_NR_ADDRESS_SPACES == 1 compiles the
        # case out of kvm_vm_ioctl_check_extension_generic, so the answer is 0 (observed on 6.18.44)
        return 0
    if cap == _uapi.KVM_CAP_PRE_FAULT_MEMORY:
        return 1
    return 0


class _Injection:
    """host.inject(...) as a context manager: on exit, injections not yet consumed are dropped."""

    def __init__(self, host):
        self.host = host

    def __enter__(self):
        return self.host

    def __exit__(self, *exc):
        held = _host_enter(self.host)
        (<Host>self.host).h.pm.fail_alloc = 0
        (<Host>self.host).h.fail_prepare = 0
        (<Host>self.host).h.rmp.fail_rmpupdate = 0
        return False
