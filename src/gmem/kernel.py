"""The gmem uAPI on the real kernel: ``Host``/``Vm``/``GuestMemfd``/``Mapping`` over ``/dev/kvm``.

This is the oracle for the model. A scenario written against the ``gmem`` API (the README's tour)
runs unchanged on ``gmem.kernel.Host()``: every call here is the kernel's own syscall or ioctl
(``fcntl.ioctl``, ``os.*``, and libc through ``ctypes``) and every refusal is the kernel's
``OSError(errno)``, passed through untouched. Comparing the two runs checks the model against
the kernel it models. Needs a readable/writable ``/dev/kvm`` with guest_memfd support
(``available()``); nothing here works without one.

What the real kernel cannot give, and what this backend does instead:

* There is no ioctl to read memory attributes. ``Vm.get_memory_attributes(gfn)`` answers from a
  Python shadow of the ``KVM_SET_MEMORY_ATTRIBUTES`` calls the kernel *accepted* (same semantics as
  the kernel: the call overwrites all attribute bits of the range; 0 erases). On a kernel without
  ``CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES`` every set fails (``ENOTTY``) and every gfn reads 0.
* A page fault cannot be injected into the real KVM MMU from userspace with a chosen error code,
  so ``Vcpu.page_fault()`` raises ``NotImplementedError``; a vCPU here is a real
  ``KVM_CREATE_VCPU`` fd and nothing more (plus ``KVM_PRE_FAULT_MEMORY``).
* ``Host(**options)`` ignores the model's options: the machine is whatever this kernel is.

Host access to a 6.18 guest_memfd mapping (``GuestMemfd.mmap`` -> ``Mapping``). The kernel answers
some accesses with SIGBUS (``kvm_gmem_fault_user_mapping``: a page at or beyond ``i_size``, or any
page of a gmem without ``GUEST_MEMFD_FLAG_INIT_SHARED``); a SIGBUS from a CPU load or store would
kill the interpreter. So:

* ``mmap``/``munmap``/``mprotect`` go through libc via ``ctypes`` (not Python's ``mmap`` module),
  so ``prot`` and ``flags`` reach the kernel unchanged and its errno comes back (``ENODEV`` without
  ``GUEST_MEMFD_FLAG_MMAP``, ``EINVAL`` for ``MAP_PRIVATE``, ``EPERM`` for ``PROT_EXEC``).
* The process never dereferences the mapping. Every ``m[a:b]`` read or write is a
  ``process_vm_readv``/``process_vm_writev`` on our own pid. Those walk the range with
  get-user-pages, which runs the same fault handler (``handle_mm_fault`` ->
  ``kvm_gmem_fault_user_mapping``: allocate, zero, mark prepared) as a CPU access, but turn
  ``VM_FAULT_SIGBUS`` into ``EFAULT`` and a short count instead of a signal. A transfer stops at
  the first page that faults, having copied every byte before it, just as a CPU ``memset``
  stops at the faulting page; ``Mapping`` then raises ``gmem.errors.SigBus`` (with ``.offset``,
  the first byte of the mapping that faulted). This was checked on 6.18.44: INIT_SHARED pages
  read and write, the page at ``i_size`` and every page of a gmem without INIT_SHARED give
  ``EFAULT``, and a transfer across ``i_size`` returns the count up to it.
  Chosen over probing each page in a forked child: no fork per access, no process-wide signal
  handling, exact partial-write semantics, and the accessing process is the mapping's owner.
* Get-user-pages would also fail with ``EFAULT`` on a protection violation, which the CPU reports
  as SIGSEGV, not SIGBUS; ``Mapping`` checks ``prot`` itself first and raises ``PermissionError``
  (``EACCES``) for a write without ``PROT_WRITE`` or any access to a ``PROT_NONE`` mapping.
  Any other errno from ``process_vm_*`` (e.g. ``EPERM``/``ENOSYS`` under a seccomp filter that
  forbids them) is raised as ``OSError``, never mistaken for SIGBUS.
"""

import bisect
import ctypes
import errno
import fcntl
import os
import struct

from gmem import uapi
from gmem.errors import SigBus

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_DEV_KVM = "/dev/kvm"

# --------------------------------------------------------------------------------------------
# libc


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)

_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
for _f in (_libc.process_vm_readv, _libc.process_vm_writev):
    _f.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                   ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
    _f.restype = ctypes.c_ssize_t

_MAP_FAILED = ctypes.c_void_p(-1).value


def _s64(x):
    """A Python int as the C int64 (off_t/loff_t) the kernel receives."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _s32(x):
    x &= _MASK32
    return x - (1 << 32) if x >> 31 else x


def _oserror(err, what):
    return OSError(err, f"{os.strerror(err)} ({what})")


def _ioctl_int(fd, request, arg, what):
    """An ioctl whose argument is an integer (passed as unsigned long, as the kernel reads it)."""
    ret = _libc.ioctl(fd, request, arg & _MASK64)
    if ret < 0:
        raise _oserror(ctypes.get_errno(), what)
    return ret


def _ioctl_buf(fd, request, buf, what):
    """An ioctl on a struct: ``buf`` is a bytearray, updated in place when the kernel copies back."""
    try:
        return fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise _oserror(e.errno, what) from None


def _check_open(obj, what):
    if obj.closed:
        raise _oserror(errno.EBADF, f"{what} on a closed {type(obj).__name__}")


def available():
    """True if /dev/kvm opens and ``KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD)`` is non-zero;
    ``unavailable_reason()`` says why not."""
    return unavailable_reason() is None


def unavailable_reason():
    """None if this backend can run here, else why not, in one line (no /dev/kvm, no
    permission, a kernel without guest_memfd)."""
    try:
        fd = os.open(_DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {_DEV_KVM}: {e.strerror}"
    try:
        if _libc.ioctl(fd, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_GUEST_MEMFD) <= 0:
            return (f"{_DEV_KVM}: this kernel has no guest_memfd (KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) is 0: "
                    "Linux before 6.8, or built without CONFIG_KVM_GUEST_MEMFD)")
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# /dev/kvm


class _Fd:
    """An object owning one fd: close() once, usable in a with-statement."""
    closed = False

    def close(self):
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Host(_Fd):
    """/dev/kvm. The model's options (``memory=``, ``platform=``, policies ...) are accepted and
    ignored: the machine is the running kernel."""

    def __init__(self, **ignored_model_options):
        self.options = dict(ignored_model_options)
        self.fd = os.open(_DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
        self.closed = False

    def api_version(self):
        _check_open(self, "KVM_GET_API_VERSION")
        return _ioctl_int(self.fd, uapi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap):
        _check_open(self, "KVM_CHECK_EXTENSION")
        return _ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION on /dev/kvm")

    def vcpu_mmap_size(self):
        _check_open(self, "KVM_GET_VCPU_MMAP_SIZE")
        return _ioctl_int(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def create_vm(self, vm_type=uapi.KVM_X86_DEFAULT_VM):
        _check_open(self, "KVM_CREATE_VM")
        fd = _ioctl_int(self.fd, uapi.KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
        return Vm(self, fd, vm_type)


    def __repr__(self):
        return f"<gmem.kernel.Host fd={self.fd}{' closed' if self.closed else ''}>"


# --------------------------------------------------------------------------------------------
# VM


class _AttributeShadow:
    """The memory attributes the kernel accepted, as sorted disjoint [start, end) gfn runs with a
    non-zero value (the kernel's xarray, which erases an entry set to 0)."""

    def __init__(self):
        self.starts = []
        self.runs = []      # (start, end, value), sorted by start

    def set(self, start, end, value):
        keep = []
        for s, e, v in self.runs:
            if e <= start or s >= end:
                keep.append((s, e, v))
                continue
            if s < start:
                keep.append((s, start, v))
            if e > end:
                keep.append((end, e, v))
        if value:
            keep.append((start, end, value))
        keep.sort()
        self.runs = keep
        self.starts = [s for s, _, _ in keep]

    def get(self, gfn):
        i = bisect.bisect_right(self.starts, gfn) - 1
        if i >= 0:
            s, e, v = self.runs[i]
            if s <= gfn < e:
                return v
        return 0


class Vm(_Fd):
    """A VM fd from ``KVM_CREATE_VM``. The kernel keeps the VM alive while this fd or any of its
    guest_memfd files is open; ``close()`` closes only the fd."""

    def __init__(self, host, fd, vm_type):
        self.host = host
        self.fd = fd
        self.vm_type = vm_type
        self.closed = False
        self._attributes = _AttributeShadow()

    def check_extension(self, cap):
        _check_open(self, "KVM_CHECK_EXTENSION")
        return _ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION on a VM")

    def enable_cap(self, cap, *args, flags=0):
        _check_open(self, "KVM_ENABLE_CAP")
        argv = [a & _MASK64 for a in args] + [0] * (4 - len(args))
        buf = bytearray(struct.pack(uapi.KVM_ENABLE_CAP_FORMAT, cap & _MASK32, flags & _MASK32,
                                    *argv, b""))
        return _ioctl_buf(self.fd, uapi.KVM_ENABLE_CAP, buf, "KVM_ENABLE_CAP")

    def create_guest_memfd(self, size, flags=0):
        _check_open(self, "KVM_CREATE_GUEST_MEMFD")
        buf = bytearray(struct.pack(uapi.KVM_CREATE_GUEST_MEMFD_FORMAT, size & _MASK64,
                                    flags & _MASK64, 0, 0, 0, 0, 0, 0))
        fd = _ioctl_buf(self.fd, uapi.KVM_CREATE_GUEST_MEMFD, buf, "KVM_CREATE_GUEST_MEMFD")
        return GuestMemfd(self, fd, size, flags)

    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr=0):
        _check_open(self, "KVM_SET_USER_MEMORY_REGION")
        buf = bytearray(struct.pack(uapi.KVM_USERSPACE_MEMORY_REGION_FORMAT, slot & _MASK32,
                                    flags & _MASK32, guest_phys_addr & _MASK64,
                                    memory_size & _MASK64, userspace_addr & _MASK64))
        _ioctl_buf(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, buf, "KVM_SET_USER_MEMORY_REGION")

    def set_user_memory_region2(self, slot, flags, guest_phys_addr, memory_size,
                                userspace_addr=0, guest_memfd=-1, guest_memfd_offset=0):
        """``guest_memfd``: a GuestMemfd or an int fd; the field is a u32 (-1 -> 0xffffffff), and a
        closed GuestMemfd is passed as -1 so a recycled fd number is never bound by mistake."""
        _check_open(self, "KVM_SET_USER_MEMORY_REGION2")
        if isinstance(guest_memfd, GuestMemfd):
            guest_memfd = -1 if guest_memfd.closed else guest_memfd.fd
        buf = bytearray(struct.pack(uapi.KVM_USERSPACE_MEMORY_REGION2_FORMAT, slot & _MASK32,
                                    flags & _MASK32, guest_phys_addr & _MASK64,
                                    memory_size & _MASK64, userspace_addr & _MASK64,
                                    guest_memfd_offset & _MASK64, guest_memfd & _MASK32, 0,
                                    *([0] * 14)))
        _ioctl_buf(self.fd, uapi.KVM_SET_USER_MEMORY_REGION2, buf, "KVM_SET_USER_MEMORY_REGION2")

    def set_memory_attributes(self, address, size, attributes, flags=0):
        _check_open(self, "KVM_SET_MEMORY_ATTRIBUTES")
        address &= _MASK64
        size &= _MASK64
        buf = bytearray(struct.pack(uapi.KVM_MEMORY_ATTRIBUTES_FORMAT, address, size,
                                    attributes & _MASK64, flags & _MASK64))
        _ioctl_buf(self.fd, uapi.KVM_SET_MEMORY_ATTRIBUTES, buf, "KVM_SET_MEMORY_ATTRIBUTES")
        self._attributes.set(address >> uapi.PAGE_SHIFT, (address + size) >> uapi.PAGE_SHIFT,
                             attributes & _MASK64)

    def get_memory_attributes(self, gfn):
        """The attributes of ``gfn`` from the shadow of accepted ``set_memory_attributes`` calls
        (the kernel has no get ioctl)."""
        return self._attributes.get(gfn)

    def create_vcpu(self, vcpu_id):
        _check_open(self, "KVM_CREATE_VCPU")
        fd = _ioctl_int(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return Vcpu(self, fd, vcpu_id)


    def __repr__(self):
        return (f"<gmem.kernel.Vm fd={self.fd} vm_type={self.vm_type}"
                f"{' closed' if self.closed else ''}>")


class Vcpu(_Fd):
    """A vCPU fd from ``KVM_CREATE_VCPU``. No guest runs here: see the module docstring."""

    def __init__(self, vm, fd, vcpu_id):
        self.vm = vm
        self.fd = fd
        self.vcpu_id = vcpu_id
        self.closed = False

    def pre_fault_memory(self, gpa, size, flags=0):
        """``KVM_PRE_FAULT_MEMORY``; returns the (gpa, size) the kernel copied back."""
        _check_open(self, "KVM_PRE_FAULT_MEMORY")
        buf = bytearray(struct.pack(uapi.KVM_PRE_FAULT_MEMORY_FORMAT, gpa & _MASK64,
                                    size & _MASK64, flags & _MASK64, 0, 0, 0, 0, 0))
        _ioctl_buf(self.fd, uapi.KVM_PRE_FAULT_MEMORY, buf, "KVM_PRE_FAULT_MEMORY")
        return struct.unpack_from("<QQ", buf)

    def page_fault(self, gpa, error_code):
        raise NotImplementedError(
            "the real kernel takes #NPF/EPT-violation faults only from a running guest; "
            "gmem.kernel cannot inject one with a chosen error code")



# --------------------------------------------------------------------------------------------
# guest_memfd


class GuestMemfd(_Fd):
    """A guest_memfd fd. Every method is the plain syscall on it; the kernel's refusals come out
    as ``OSError``. After ``close()`` calls raise ``EBADF`` without reaching the kernel (the fd
    number may already belong to another file)."""

    def __init__(self, vm, fd, size, flags):
        self.vm = vm
        self.fd = fd
        self.size = size
        self.flags = flags
        self.closed = False

    def fileno(self):
        return self.fd

    def fallocate(self, mode, offset, length):
        """fallocate(2) with a mode (os.posix_fallocate has none)."""
        _check_open(self, "fallocate")
        if _fallocate(self.fd, _s32(mode), _s64(offset), _s64(length)) < 0:
            raise _oserror(ctypes.get_errno(), "fallocate on a guest_memfd")

    def allocate(self, offset, length):
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset, length):
        self.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def read(self, n):
        _check_open(self, "read")
        return os.read(self.fd, n)

    def write(self, b):
        _check_open(self, "write")
        return os.write(self.fd, b)

    def pread(self, n, offset):
        _check_open(self, "pread")
        return os.pread(self.fd, n, _s64(offset))

    def pwrite(self, b, offset):
        _check_open(self, "pwrite")
        return os.pwrite(self.fd, b, _s64(offset))

    def lseek(self, offset, whence=os.SEEK_SET):
        _check_open(self, "lseek")
        return os.lseek(self.fd, _s64(offset), whence)

    def ftruncate(self, length):
        _check_open(self, "ftruncate")
        os.ftruncate(self.fd, _s64(length))

    def fstat(self):
        _check_open(self, "fstat")
        return os.fstat(self.fd)

    def mmap(self, length, offset=0, prot=uapi.PROT_READ | uapi.PROT_WRITE, flags=uapi.MAP_SHARED):
        """mmap(2) of this file -> ``Mapping`` (6.18: needs ``GUEST_MEMFD_FLAG_MMAP`` and MAP_SHARED)."""
        _check_open(self, "mmap")
        addr = _libc.mmap(None, length & _MASK64, _s32(prot), _s32(flags), self.fd, _s64(offset))
        if addr == _MAP_FAILED:
            raise _oserror(ctypes.get_errno(), "mmap of a guest_memfd")
        return Mapping(self, addr, length, offset, prot, flags)

    def dup(self):
        _check_open(self, "dup")
        return GuestMemfd(self.vm, os.dup(self.fd), self.size, self.flags)


    def __repr__(self):
        return (f"<gmem.kernel.GuestMemfd fd={self.fd} size={self.size:#x} flags={self.flags:#x}"
                f"{' closed' if self.closed else ''}>")


class Mapping:
    """A host mapping of a guest_memfd. ``m[a:b]`` reads, ``m[a:b] = data`` writes, both through
    ``process_vm_readv``/``process_vm_writev`` on our own pid, so a page the kernel answers with
    SIGBUS raises ``gmem.errors.SigBus`` instead of killing the process (module docstring).
    The mapping holds its own reference to the file: it stays usable after ``GuestMemfd.close()``,
    and ``close()`` (munmap) may be what releases the file, so it is never left to the GC."""

    def __init__(self, gmem, address, length, offset, prot, flags):
        self.gmem = gmem
        self.address = address
        self.length = length
        self.offset = offset
        self.prot = prot
        self.flags = flags
        self.closed = False

    def __len__(self):
        return self.length

    def _range(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            return start, max(start, stop), step
        i = key.__index__()
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError("mapping index out of range")
        return i, i + 1, None

    def _check(self, write):
        if self.closed:
            raise ValueError("access to a closed gmem mapping")
        if self.prot == uapi.PROT_NONE or (write and not self.prot & uapi.PROT_WRITE):
            raise PermissionError(errno.EACCES, "SIGSEGV: access not allowed by the mapping's prot")

    def _transfer(self, fn, start, buf, n):
        """Copy n bytes between buf and the mapping at start; SigBus at the first faulting byte."""
        pid = os.getpid()
        base = ctypes.addressof(buf)
        done = 0
        while done < n:
            local = _iovec(base + done, n - done)
            remote = _iovec(self.address + start + done, n - done)
            ret = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if ret <= 0:
                err = ctypes.get_errno() if ret < 0 else errno.EFAULT
                if err != errno.EFAULT:
                    raise _oserror(err, "process_vm_readv/writev on a gmem mapping")
                e = SigBus(f"SIGBUS at mapping offset {start + done:#x} "
                           f"(file offset {self.offset + start + done:#x})")
                e.offset = start + done
                raise e
            done += ret

    def __getitem__(self, key):
        start, stop, step = self._range(key)
        self._check(write=False)
        n = stop - start
        buf = ctypes.create_string_buffer(n)
        if n:
            self._transfer(_libc.process_vm_readv, start, buf, n)
        data = buf.raw
        if step is None:
            return data[0]
        return data if step == 1 else data[::step]

    def __setitem__(self, key, value):
        start, stop, step = self._range(key)
        if step is None:
            value = bytes([value])
        elif step != 1:
            raise ValueError("gmem mapping slice assignment needs step 1")
        value = bytes(value)
        if len(value) != stop - start:
            raise IndexError("gmem mapping slice assignment is wrong size")
        self._check(write=True)
        if value:
            buf = ctypes.create_string_buffer(value, len(value))
            self._transfer(_libc.process_vm_writev, start, buf, len(value))

    def mprotect(self, prot):
        if self.closed:
            raise ValueError("mprotect of a closed gmem mapping")
        if _libc.mprotect(self.address, self.length, _s32(prot)) < 0:
            raise _oserror(ctypes.get_errno(), "mprotect of a gmem mapping")
        self.prot = prot

    def close(self):
        if not self.closed:
            self.closed = True
            if _libc.munmap(self.address, self.length) < 0:
                raise _oserror(ctypes.get_errno(), "munmap of a gmem mapping")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<gmem.kernel.Mapping {self.address:#x}+{self.length:#x} of fd {self.gmem.fd}"
                f"{' closed' if self.closed else ''}>")
