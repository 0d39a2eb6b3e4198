"""Differential uAPI tests: every case is a small scenario on a ``host`` -- the model
``gmem.Host(platform="none", sw_protected=False, memory_attributes=False)`` and, where
``gmem.kernel.available()``, the real /dev/kvm of this machine (Linux 6.18, DEFAULT VM type only,
no memory attributes) -- and each case's outcome is asserted equal to the expected outcome written
in the table (read from the kernel's source and confirmed on a real kernel). So the model is
checked against the kernel's rules everywhere, and against a running kernel where one exists.

Outcome of a scenario: its return value (``OK`` for None), the errno name of an ``OSError``
(``"EINVAL"``), or ``("SIGBUS", offset)`` for a ``gmem.SigBus`` escaping the scenario.

A second table runs only on the model, for what this kernel cannot run (SW_PROTECTED/SEV/SNP/TDX VM
types, memory attributes); each expectation there cites the kernel function it comes from.
"""

import errno

import pytest

import gmem
from gmem import kernel, uapi
from gmem.errors import SigBus

PS = uapi.PAGE_SIZE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
RO = uapi.KVM_MEM_READONLY
RW = uapi.PROT_READ | uapi.PROT_WRITE
SHARED = uapi.MAP_SHARED
PRIVATE = uapi.MAP_PRIVATE
MAP_SHARED_VALIDATE = 0x03
MAP_SYNC = 0x80000
MAP_POPULATE = 0x8000
MAX_LFS_FILESIZE = (1 << 63) - 1
OK = "ok"

KERNEL = kernel.available()


def model_host():
    return gmem.Host(platform="none", sw_protected=False, memory_attributes=False)


# ------------------------------------------------------------------------------------ running

def errname(e):
    """The errno's name; 95 is EOPNOTSUPP (Python's errorcode calls it ENOTSUP)."""
    return "EOPNOTSUPP" if e == errno.EOPNOTSUPP else errno.errorcode.get(e, e)


_open = []


def track(obj):
    """Close obj (VM, guest_memfd, mapping) when the scenario ends, in reverse order."""
    _open.append(obj)
    return obj


def run(scenario, host):
    mark = len(_open)
    try:
        r = scenario(host)
        return OK if r is None else r
    except SigBus as e:
        return ("SIGBUS", e.offset)
    except OSError as e:
        return errname(e.errno)
    finally:
        for obj in reversed(_open[mark:]):
            if hasattr(obj, "close"):       # the model's Vcpu has no fd to close
                obj.close()
        del _open[mark:]


@pytest.fixture(scope="module")
def khost():
    if not KERNEL:
        yield None
        return
    h = kernel.Host()
    yield h
    h.close()


def check(scenario, expected, khost):
    got = {"model": run(scenario, model_host())}
    if khost is not None:
        got["kernel"] = run(scenario, khost)
    assert got == {k: expected for k in got}


# ----------------------------------------------------------------------------------- helpers

def vm_(h, vm_type=0):
    return track(h.create_vm(vm_type))


def gm(vm, size=4 * PS, flags=0):
    return track(vm.create_guest_memfd(size, flags))


def mp(f, length, offset=0, prot=RW, flags=SHARED):
    return track(f.mmap(length, offset, prot, flags))


def region2(vm, slot, flags, gpa, size, fd=-1, offset=0, hva=0):
    vm.set_user_memory_region2(slot, flags, gpa, size, hva, fd, offset)


def stat(f):
    s = f.fstat()
    get = s.__getitem__ if isinstance(s, dict) else lambda k: getattr(s, k)
    return {k: get(k) for k in ("st_size", "st_blksize", "st_mode", "st_blocks")}


def pages(m, n, start=0):
    """Per page of the mapping: its byte value if uniform, else the first 8 bytes."""
    out = []
    for i in range(start, start + n):
        b = m[i * PS:(i + 1) * PS]
        out.append(b[0] if b == bytes([b[0]]) * PS else b[:8])
    return tuple(out)


def sigbus_offset(fn):
    """Run fn; the offset of the SigBus it raises (None if it raised none)."""
    try:
        fn()
    except SigBus as e:
        return e.offset
    return None


CASES = []


def case(name, expected):
    def deco(fn):
        CASES.append(pytest.param(fn, expected, id=name))
        return fn
    return deco


# -------------------------------------------------------------------- KVM_CREATE_GUEST_MEMFD
# kvm_gmem_create (6.18): flags & ~kvm_gmem_get_supported_flags() -> EINVAL, then
# size <= 0 (loff_t) || !PAGE_ALIGNED(size) -> EINVAL.  DEFAULT VM: MMAP | INIT_SHARED valid.

def _create(size, flags):
    def scenario(h):
        f = gm(vm_(h), size, flags)
        return (f.size, f.flags)
    return scenario


for _bit in range(64):
    case(f"create-flag-bit{_bit}", (PS, 1 << _bit) if _bit < 2 else "EINVAL")(_create(PS, 1 << _bit))
case("create-flags-mmap-init_shared", (PS, 3))(_create(PS, MMAP | INIT_SHARED))
case("create-flags-bit2-bad-size", "EINVAL")(_create(1, 4))
case("create-flags-all", "EINVAL")(_create(PS, -1))
for _size in (0, 1, 2, 3, 100, 511, 512, 1024, 2048, 4000, 4095, PS + 1, 2 * PS - 1, 3 * PS + 7):
    case(f"create-size-{_size}", "EINVAL")(_create(_size, 0))
for _name, _size in (("minus1", -1), ("minus-page", -PS), ("1<<63", 1 << 63), ("2^64-2page", -2 * PS)):
    case(f"create-size-negative-{_name}", "EINVAL")(_create(_size, 0))
for _name, _size in (("1page", PS), ("2M", 2 << 20), ("1T", 1 << 40), ("1<<62", 1 << 62),
                     ("max", (1 << 63) - PS)):
    case(f"create-size-{_name}", (_size, 0))(_create(_size, 0))


@case("create-multiple-fstat", ({"st_size": PS, "st_blksize": PS, "st_mode": 0o100600, "st_blocks": 0},
                                {"st_size": 2 * PS, "st_blksize": PS, "st_mode": 0o100600, "st_blocks": 0},
                                True))
def _(h):
    vm = vm_(h)
    a, b = gm(vm, PS), gm(vm, 2 * PS)
    ino = lambda f: f.fstat()["st_ino"] if isinstance(f.fstat(), dict) else f.fstat().st_ino
    return stat(a), stat(b), ino(a) != ino(b)


@case("fstat-after-allocate-blocks-0", {"st_size": 4 * PS, "st_blksize": PS, "st_mode": 0o100600,
                                        "st_blocks": 0})
def _(h):
    f = gm(vm_(h), 4 * PS, MMAP | INIT_SHARED)
    f.allocate(0, 4 * PS)
    return stat(f)


# ----------------------------------------------------------------------------- fallocate
# vfs_fallocate (6.12+ "modes are exclusive") then kvm_gmem_fallocate (§5).

FALLOC_MODE_MASK = 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80


def vfs_mode_ok(mode):
    """vfs_fallocate's mode switch: does this mode get past the VFS?"""
    if mode & ~(FALLOC_MODE_MASK | KEEP):
        return False
    m = mode & FALLOC_MODE_MASK
    if m in (0, uapi.FALLOC_FL_ZERO_RANGE, uapi.FALLOC_FL_UNSHARE_RANGE):
        return True
    if m == PUNCH:
        return bool(mode & KEEP)
    if m in (uapi.FALLOC_FL_COLLAPSE_RANGE, uapi.FALLOC_FL_INSERT_RANGE, uapi.FALLOC_FL_WRITE_ZEROES):
        return not mode & KEEP
    return False


def _falloc(mode, offset, length, size=4 * PS, flags=0):
    def scenario(h):
        gm(vm_(h), size, flags).fallocate(mode, offset, length)
    return scenario


for _mode in range(256):
    # offset 0, one page: only KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE succeed (kvm_gmem_fallocate)
    case(f"fallocate-mode-{_mode:#04x}", OK if _mode in (KEEP, KEEP | PUNCH) else "EOPNOTSUPP")(
        _falloc(_mode, 0, PS))
    # offset + len past MAX_LFS_FILESIZE: EFBIG for every mode the VFS lets through, before gmem
    # looks at the mode (so even mode 0 and ZERO_RANGE get EFBIG)
    case(f"fallocate-mode-{_mode:#04x}-efbig", "EFBIG" if vfs_mode_ok(_mode) else "EOPNOTSUPP")(
        _falloc(_mode, (1 << 63) - PS, 2 * PS))

for _name, _mode, _off, _len, _exp in [
        ("allocate-all", KEEP, 0, 4 * PS, OK),
        ("allocate-last-page", KEEP, 3 * PS, PS, OK),
        ("allocate-offset-misaligned", KEEP, 1, PS, "EINVAL"),
        ("allocate-len-misaligned", KEEP, 0, PS - 1, "EINVAL"),
        ("allocate-both-misaligned", KEEP, PS - 1, PS + 1, "EINVAL"),
        ("allocate-at-eof", KEEP, 4 * PS, PS, "EINVAL"),
        ("allocate-past-eof", KEEP, 3 * PS, 2 * PS, "EINVAL"),
        ("allocate-far-past-eof", KEEP, 1 << 40, PS, "EINVAL"),
        ("allocate-misaligned-past-eof", KEEP, 4 * PS + 1, PS, "EINVAL"),
        ("allocate-len0", KEEP, 0, 0, "EINVAL"),
        ("allocate-len-negative", KEEP, 0, -PS, "EINVAL"),
        ("allocate-offset-negative", KEEP, -PS, PS, "EINVAL"),
        ("allocate-efbig", KEEP, MAX_LFS_FILESIZE - PS + 1, PS, "EFBIG"),
        ("allocate-efbig-1<<62", KEEP, 1 << 62, 1 << 62, "EFBIG"),
        ("allocate-efbig-before-misaligned", KEEP, 1, MAX_LFS_FILESIZE, "EFBIG"),
        ("allocate-max-lfs-exact-misaligned", KEEP, 1, MAX_LFS_FILESIZE - 1, "EINVAL"),
        ("allocate-max-lfs-aligned-past-eof", KEEP, (1 << 63) - 2 * PS, PS, "EINVAL"),
        ("punch-all", KEEP | PUNCH, 0, 4 * PS, OK),
        ("punch-at-eof", KEEP | PUNCH, 4 * PS, PS, OK),
        ("punch-past-eof", KEEP | PUNCH, 5 * PS, PS, OK),
        ("punch-across-eof", KEEP | PUNCH, 2 * PS, 8 * PS, OK),
        ("punch-far-past-eof", KEEP | PUNCH, 1 << 50, 1 << 30, OK),
        ("punch-offset-misaligned", KEEP | PUNCH, PS - 1, PS, "EINVAL"),
        ("punch-len-misaligned", KEEP | PUNCH, PS, PS - 1, "EINVAL"),
        ("punch-misaligned-past-eof", KEEP | PUNCH, 5 * PS + 1, PS, "EINVAL"),
        ("punch-len0", KEEP | PUNCH, 0, 0, "EINVAL"),
        ("punch-len-negative", KEEP | PUNCH, PS, -1, "EINVAL"),
        ("punch-offset-negative", KEEP | PUNCH, -1, PS, "EINVAL"),
        ("punch-efbig", KEEP | PUNCH, (1 << 63) - PS, PS, "EFBIG"),
        ("punch-max-lfs-aligned", KEEP | PUNCH, (1 << 63) - 2 * PS, PS, OK),
        ("mode0-len0-einval-first", 0, 0, 0, "EINVAL"),
        ("mode-no_hide_stale-len0-einval-first", 0x04, 0, 0, "EINVAL"),
        ("mode0-misaligned-eopnotsupp-first", 0, 1, 1, "EOPNOTSUPP"),
        ("mode-zero-range-keep-misaligned", KEEP | uapi.FALLOC_FL_ZERO_RANGE, 1, 1, "EOPNOTSUPP"),
        ("mode-minus1", -1, 0, PS, "EOPNOTSUPP"),
        ("mode-1<<31", 1 << 31, 0, PS, "EOPNOTSUPP"),
        ("mode-keep|1<<8", KEEP | 0x100, 0, PS, "EOPNOTSUPP")]:
    case(f"fallocate-{_name}", _exp)(_falloc(_mode, _off, _len))

case("fallocate-huge-gmem-last-page", OK)(_falloc(KEEP, (1 << 40) - PS, PS, size=1 << 40))
case("fallocate-huge-gmem-punch-all", OK)(_falloc(KEEP | PUNCH, 0, 1 << 40, size=1 << 40))
case("fallocate-mmap-gmem-allocate", OK)(_falloc(KEEP, 0, 4 * PS, flags=MMAP | INIT_SHARED))


@case("fallocate-allocate-idempotent-and-repunch", OK)
def _(h):
    f = gm(vm_(h))
    f.allocate(0, 4 * PS)
    f.allocate(0, 4 * PS)
    f.allocate(PS, PS)
    f.punch_hole(0, 2 * PS)
    f.punch_hole(0, 2 * PS)
    f.allocate(0, 4 * PS)


@case("fallocate-dup-shares-file", OK)
def _(h):
    f = gm(vm_(h))
    d = track(f.dup())
    f.close()
    d.allocate(0, 4 * PS)
    d.punch_hole(0, PS)


# ---------------------------------------------------------------------------- file operations
# kvm_gmem_fops has no read/write/llseek: vfs_read/vfs_write EINVAL (no FMODE_CAN_READ/WRITE),
# pread/pwrite/lseek ESPIPE (no FMODE_PREAD/PWRITE/LSEEK; negative pos EINVAL first),
# ftruncate -> kvm_gmem_setattr EINVAL (§4.1).

for _flags in (0, MMAP | INIT_SHARED):
    for _name, _op, _exp in [
            ("read", lambda f: f.read(64), "EINVAL"),
            ("read0", lambda f: f.read(0), "EINVAL"),
            ("write", lambda f: f.write(b"x" * 64), "EINVAL"),
            ("write0", lambda f: f.write(b""), "EINVAL"),
            ("pread", lambda f: f.pread(64, 0), "ESPIPE"),
            ("pread-past-eof", lambda f: f.pread(64, 1 << 40), "ESPIPE"),
            ("pread-negative", lambda f: f.pread(64, -1), "EINVAL"),
            ("pwrite", lambda f: f.pwrite(b"x" * 64, 0), "ESPIPE"),
            ("pwrite-negative", lambda f: f.pwrite(b"x", -PS), "EINVAL"),
            ("lseek-set", lambda f: f.lseek(0, 0), "ESPIPE"),
            ("lseek-end", lambda f: f.lseek(0, 2), "ESPIPE"),
            ("lseek-negative", lambda f: f.lseek(-1, 0), "ESPIPE"),
            ("ftruncate-same", lambda f: f.ftruncate(4 * PS), "EINVAL"),
            ("ftruncate-0", lambda f: f.ftruncate(0), "EINVAL"),
            ("ftruncate-grow", lambda f: f.ftruncate(8 * PS), "EINVAL"),
            ("ftruncate-negative", lambda f: f.ftruncate(-1), "EINVAL")]:
        case(f"fileop-{_name}-flags{_flags}", _exp)(
            lambda h, _op=_op, _flags=_flags: _op(gm(vm_(h), 4 * PS, _flags)))


# ----------------------------------------------------------------------------------- mmap
# do_mmap, then kvm_gmem_mmap (6.18): ENODEV without GUEST_MEMFD_FLAG_MMAP, EINVAL unless
# MAP_SHARED; PROT_EXEC is EPERM on the noexec anon_inode mount even without the MMAP flag.

def _mmap(length, offset=0, prot=RW, flags=SHARED, gflags=MMAP | INIT_SHARED, size=4 * PS):
    def scenario(h):
        m = mp(gm(vm_(h), size, gflags), length, offset, prot, flags)
        return len(m)
    return scenario


for _name, _args, _exp in [
        ("shared", dict(length=4 * PS), 4 * PS),
        ("shared-no-init-shared", dict(length=4 * PS, gflags=MMAP), 4 * PS),
        ("shared-one-page", dict(length=PS), PS),
        ("shared-odd-length", dict(length=100), 100),
        ("shared-beyond-eof", dict(length=64 * PS), 64 * PS),
        ("shared-offset-at-eof", dict(length=PS, offset=4 * PS), PS),
        ("shared-offset-far", dict(length=PS, offset=1 << 40), PS),
        ("shared-validate", dict(length=PS, flags=MAP_SHARED_VALIDATE), PS),
        ("shared-populate", dict(length=4 * PS, flags=SHARED | MAP_POPULATE), 4 * PS),
        ("shared-sync-ignored", dict(length=PS, flags=SHARED | MAP_SYNC), PS),
        ("shared-validate-sync", dict(length=PS, flags=MAP_SHARED_VALIDATE | MAP_SYNC), "EOPNOTSUPP"),
        ("prot-read", dict(length=PS, prot=uapi.PROT_READ), PS),
        ("prot-none", dict(length=PS, prot=uapi.PROT_NONE), PS),
        ("no-mmap-flag", dict(length=PS, gflags=0), "ENODEV"),
        ("no-mmap-flag-init-shared", dict(length=PS, gflags=INIT_SHARED), "ENODEV"),
        ("no-mmap-flag-4pages", dict(length=4 * PS, gflags=0), "ENODEV"),
        ("no-mmap-flag-private", dict(length=PS, gflags=0, flags=PRIVATE), "ENODEV"),
        ("private", dict(length=PS, flags=PRIVATE), "EINVAL"),
        ("private-no-init-shared", dict(length=4 * PS, gflags=MMAP, flags=PRIVATE), "EINVAL"),
        ("map-type-0", dict(length=PS, flags=0), "EINVAL"),
        ("map-type-4", dict(length=PS, flags=4), "EINVAL"),
        ("map-type-0-no-mmap-flag", dict(length=PS, flags=0, gflags=0), "EINVAL"),
        ("exec", dict(length=PS, prot=RW | uapi.PROT_EXEC), "EPERM"),
        ("exec-only", dict(length=PS, prot=uapi.PROT_EXEC), "EPERM"),
        ("exec-no-mmap-flag", dict(length=PS, prot=RW | uapi.PROT_EXEC, gflags=0), "EPERM"),
        ("exec-private-no-mmap-flag", dict(length=PS, prot=uapi.PROT_EXEC, flags=PRIVATE, gflags=0),
         "EPERM"),
        ("exec-map-type-0", dict(length=PS, prot=uapi.PROT_EXEC, flags=0), "EINVAL"),
        ("length-0", dict(length=0), "EINVAL"),
        ("length-0-no-mmap-flag", dict(length=0, gflags=0), "EINVAL"),
        ("offset-misaligned", dict(length=PS, offset=1), "EINVAL"),
        ("offset-misaligned-no-mmap-flag", dict(length=PS, offset=PS - 1, gflags=0), "EINVAL"),
        ("length-0-offset-misaligned", dict(length=0, offset=1), "EINVAL"),
        ("length-1<<47", dict(length=1 << 47), "ENOMEM"),
        ("length-1<<47-no-mmap-flag", dict(length=1 << 47, gflags=0), "ENOMEM"),
        ("length-minus1", dict(length=-1), "ENOMEM"),
        ("length-minus-page", dict(length=-PS), "ENOMEM"),
        ("offset-max-lfs", dict(length=PS, offset=(1 << 63) - 2 * PS), PS),
        ("offset-past-max-lfs", dict(length=PS, offset=(1 << 63) - PS), "EOVERFLOW"),
        ("offset-past-max-lfs-no-mmap-flag", dict(length=PS, offset=(1 << 63) - PS, gflags=0),
         "EOVERFLOW"),
        ("offset-negative", dict(length=PS, offset=-PS), "EOVERFLOW"),
        ("offset-negative-private", dict(length=PS, offset=-PS, flags=PRIVATE), "EOVERFLOW")]:
    case(f"mmap-{_name}", _exp)(_mmap(**_args))


# ----------------------------------------------------------------------------- mmap contents
# kvm_gmem_fault_user_mapping (§4.2): SIGBUS at/after i_size and on every page without
# INIT_SHARED; a first touch zeroes the page; punch-hole unmaps and frees (reads zero again).

def _gm_map(h, npages=4, map_pages=None, gflags=MMAP | INIT_SHARED, offset=0, prot=RW):
    f = gm(vm_(h), npages * PS, gflags)
    return f, mp(f, (map_pages or npages) * PS, offset, prot)


@case("contents-fresh-pages-zero", (0, 0, 0, 0))
def _(h):
    return pages(_gm_map(h)[1], 4)


@case("contents-write-read-back", (0xAA, 0xAA, 0xAA, 0xAA))
def _(h):
    f, m = _gm_map(h)
    m[:] = b"\xaa" * 4 * PS
    return pages(m, 4)


@case("contents-punch-first-page", (0, 0xAA, 0xAA, 0xAA))
def _(h):
    f, m = _gm_map(h)
    m[:] = b"\xaa" * 4 * PS
    f.punch_hole(0, PS)
    return pages(m, 4)


@case("contents-punch-then-rewrite", (0xAA, 0, 0xBB, 0xAA))
def _(h):
    f, m = _gm_map(h)
    m[:] = b"\xaa" * 4 * PS
    f.punch_hole(PS, 2 * PS)
    m[2 * PS:3 * PS] = b"\xbb" * PS
    return pages(m, 4)


@case("contents-punch-past-eof-keeps", (0xAA, 0xAA, 0xAA, 0xAA))
def _(h):
    f, m = _gm_map(h)
    m[:] = b"\xaa" * 4 * PS
    f.punch_hole(4 * PS, 4 * PS)
    return pages(m, 4)


@case("contents-allocate-reads-zero", (0, 0, 0, 0))
def _(h):
    f, m = _gm_map(h)
    f.allocate(0, 4 * PS)
    return pages(m, 4)


@case("contents-allocate-keeps-written", (0xAA, 0, 0, 0xCC))
def _(h):
    f, m = _gm_map(h)
    m[0:PS] = b"\xaa" * PS
    m[3 * PS:] = b"\xcc" * PS
    f.allocate(0, 4 * PS)
    return pages(m, 4)


@case("contents-unaligned-write-across-pages", b"\x00\x00abcde\x00")
def _(h):
    f, m = _gm_map(h)
    m[PS - 4:PS + 1] = b"abcde"
    return m[PS - 6:PS + 2]


@case("contents-mapping-at-offset", (0, 0, 0x11, 0))
def _(h):
    f, m = _gm_map(h)
    m2 = mp(f, PS, 2 * PS)
    m2[:] = b"\x11" * PS
    return pages(m, 4)


@case("contents-two-mappings-coherent", ((0x22, 0x22), (0, 0x33)))
def _(h):
    f, m = _gm_map(h, npages=2)
    m2 = mp(f, 2 * PS)
    m[:] = b"\x22" * 2 * PS
    r = pages(m2, 2)
    f.punch_hole(0, PS)
    m2[PS:] = b"\x33" * PS
    return r, pages(m, 2)


@case("contents-dup-shares", (0, 0x44))
def _(h):
    f, m = _gm_map(h, npages=2)
    d = track(f.dup())
    m[:] = b"\x44" * 2 * PS
    d.punch_hole(0, PS)
    return pages(m, 2)


@case("contents-mapping-outlives-fd", (0x55, 0, 0x66, 0))
def _(h):
    f, m = _gm_map(h)
    m[0:PS] = b"\x55" * PS
    f.close()
    m[2 * PS:3 * PS] = b"\x66" * PS
    return pages(m, 4)


@case("contents-mapping-outlives-vm-fd", (0x77, 0x77))
def _(h):
    f, m = _gm_map(h, npages=2)
    f.vm.close()
    m[:] = b"\x77" * 2 * PS
    return pages(m, 2)


@case("contents-huge-gmem-far-page", (0x88, 0))
def _(h):
    f = gm(vm_(h), 1 << 40, MMAP | INIT_SHARED)
    m = mp(f, 2 * PS, (1 << 40) - 2 * PS)
    m[:PS] = b"\x88" * PS
    return pages(m, 2)


@case("contents-write-overflow-sigbus", (4 * PS, (0xAA, 0xAA, 0xAA, 0xAA)))
def _(h):
    # guest_memfd_test.c test_fault_overflow: map 4x the size, memset -> SIGBUS at i_size,
    # every byte before it written
    f, m = _gm_map(h, npages=4, map_pages=16)
    off = sigbus_offset(lambda: m.__setitem__(slice(0, 16 * PS), b"\xaa" * 16 * PS))
    return off, pages(m, 4)


@case("contents-write-partial-across-eof", (4 * PS, b"wx"))
def _(h):
    f, m = _gm_map(h, npages=4, map_pages=5)
    off = sigbus_offset(lambda: m.__setitem__(slice(4 * PS - 2, 4 * PS + 2), b"wxyz"))
    return off, m[4 * PS - 2:4 * PS]


@case("contents-read-at-eof-sigbus", ("SIGBUS", 4 * PS))
def _(h):
    f, m = _gm_map(h, npages=4, map_pages=8)
    return m[4 * PS]


@case("contents-read-across-eof-sigbus", ("SIGBUS", 4 * PS))
def _(h):
    f, m = _gm_map(h, npages=4, map_pages=8)
    return m[4 * PS - 8:4 * PS + 8]


@case("contents-read-last-page-ok", 0)
def _(h):
    f, m = _gm_map(h, npages=4, map_pages=8)
    return m[4 * PS - 1]


@case("contents-mapping-beyond-eof-sigbus", ("SIGBUS", 0))
def _(h):
    f = gm(vm_(h), 4 * PS, MMAP | INIT_SHARED)
    return mp(f, PS, 4 * PS)[0:8]


@case("contents-no-init-shared-write-sigbus", ("SIGBUS", 0))
def _(h):
    f, m = _gm_map(h, gflags=MMAP)
    m[0:PS] = b"\xaa" * PS


@case("contents-no-init-shared-read-sigbus", ("SIGBUS", 0))
def _(h):
    f, m = _gm_map(h, gflags=MMAP)
    return m[0]


@case("contents-no-init-shared-read-last-page-sigbus", ("SIGBUS", PS - 1))
def _(h):
    f, m = _gm_map(h, gflags=MMAP, offset=3 * PS, map_pages=1)
    return m[PS - 1]


@case("contents-no-init-shared-after-allocate-sigbus", ("SIGBUS", 2 * PS))
def _(h):
    f, m = _gm_map(h, gflags=MMAP)
    f.allocate(0, 4 * PS)
    return m[2 * PS:2 * PS + 1]


@case("contents-prot-read-write-eacces", (0, "EACCES"))
def _(h):
    f, m = _gm_map(h, prot=uapi.PROT_READ)
    first = m[0]
    try:
        m[0:1] = b"x"
    except OSError as e:
        return first, errname(e.errno)


@case("contents-prot-none-read-eacces", "EACCES")
def _(h):
    f, m = _gm_map(h, prot=uapi.PROT_NONE)
    return m[0]


# ---------------------------------------------------------------------------------- memslots
# __kvm_set_memory_region (§11.3): flags -> size -> gpa -> hva -> gmem offset -> as_id/id -> wrap
# -> delete/modify rules -> GPA overlap EEXIST -> kvm_gmem_bind (EBADF -> not gmem EINVAL ->
# other VM EINVAL -> offset/size EINVAL -> binding overlap EINVAL) -> kvm_arch_prepare_memory_region
# (last gfn > kvm_mmu_max_gfn(): EINVAL; 52-bit guest physical addresses on this machine).

G0 = 0x100000000          # 4 GiB


def _slot(vm, g, slot=0, gpa=G0, npages=4, offset=0, flags=GMEM):
    region2(vm, slot, flags, gpa, npages * PS, g, offset)


def _memslot(body):
    """body(h, vm, g): a DEFAULT VM with a 16-page guest_memfd g."""
    def scenario(h):
        vm = vm_(h)
        return body(h, vm, gm(vm, 16 * PS))
    return scenario


MEMSLOT_CASES = [
    ("bind", lambda h, vm, g: _slot(vm, g), OK),
    ("bind-whole", lambda h, vm, g: _slot(vm, g, npages=16), OK),
    ("bind-offset-tail", lambda h, vm, g: _slot(vm, g, offset=12 * PS), OK),
    ("bind-gpa-0", lambda h, vm, g: _slot(vm, g, gpa=0), OK),
    ("bind-hva-ignored-nonzero", lambda h, vm, g: region2(vm, 0, GMEM, G0, 4 * PS, g, 0, hva=0x10000000), OK),
    ("bind-slot-id-max", lambda h, vm, g: _slot(vm, g, slot=uapi.KVM_USER_MEM_SLOTS - 1), OK),
    ("bind-past-eof", lambda h, vm, g: _slot(vm, g, offset=13 * PS), "EINVAL"),
    ("bind-offset-at-eof", lambda h, vm, g: _slot(vm, g, offset=16 * PS, npages=1), "EINVAL"),
    ("bind-too-big", lambda h, vm, g: _slot(vm, g, npages=17), "EINVAL"),
    ("bind-offset-misaligned", lambda h, vm, g: _slot(vm, g, offset=1), "EINVAL"),
    ("bind-offset-negative", lambda h, vm, g: _slot(vm, g, offset=1 << 63), "EINVAL"),
    ("bind-offset-wraps", lambda h, vm, g: _slot(vm, g, offset=-PS), "EINVAL"),
    ("bind-fd-minus1", lambda h, vm, g: _slot(vm, -1), "EBADF"),
    ("bind-fd-not-open", lambda h, vm, g: _slot(vm, 1000), "EBADF"),
    ("bind-vm-fd", lambda h, vm, g: _slot(vm, vm.fd), "EINVAL"),
    ("bind-kvm-fd", lambda h, vm, g: _slot(vm, h.fd), "EINVAL"),
    ("bind-stdin-fd-0", lambda h, vm, g: _slot(vm, 0), "EINVAL"),
    ("bind-stderr-fd-2", lambda h, vm, g: _slot(vm, 2), "EINVAL"),
    ("bind-other-vms-gmem", lambda h, vm, g: _slot(vm, gm(vm_(h), 16 * PS)), "EINVAL"),
    ("bind-gmem-into-other-vm", lambda h, vm, g: _slot(vm_(h), g), "EINVAL"),
    ("bind-other-vms-gmem-ok-in-owner", lambda h, vm, g: (lambda vm2: (lambda g2: (_try(lambda: _slot(vm, g2)), _slot(vm2, g2)))(gm(vm2, 4 * PS)))(vm_(h)), ("EINVAL", None)),
    ("bind-overlapping-binding", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, 2 * G0, 4, 2 * PS)), "EINVAL"),
    ("bind-overlapping-binding-last-page", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, 2 * G0, 4, 3 * PS)), "EINVAL"),
    ("bind-overlapping-binding-covering", lambda h, vm, g: (_slot(vm, g, offset=4 * PS), _slot(vm, g, 1, 2 * G0, 16)), "EINVAL"),
    ("bind-adjacent-bindings", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, 2 * G0, 4, 4 * PS), _slot(vm, g, 2, 3 * G0, 8, 8 * PS)), (None,) * 3),
    ("bind-two-gmems", lambda h, vm, g: (_slot(vm, g), _slot(vm, gm(vm, 16 * PS), 1, 2 * G0)), (None, None)),
    ("bind-dup-overlapping", lambda h, vm, g: (_slot(vm, g), _slot(vm, track(g.dup()), 1, 2 * G0, 4, PS)), "EINVAL"),
    ("bind-dup-disjoint", lambda h, vm, g: (_slot(vm, g), _slot(vm, track(g.dup()), 1, 2 * G0, 4, 4 * PS)), (None, None)),
    ("bind-mmap-gmem", lambda h, vm, g: _slot(vm, gm(vm, 4 * PS, MMAP)), OK),
    ("bind-mmap-init-shared-gmem", lambda h, vm, g: _slot(vm, gm(vm, 4 * PS, MMAP | INIT_SHARED)), OK),
    ("bind-huge-gmem-far-offset", lambda h, vm, g: _slot(vm, gm(vm, 1 << 40), offset=(1 << 40) - 4 * PS), OK),
    ("gpa-overlap-gmem-slots", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, G0 + 2 * PS, 4, 8 * PS)), "EEXIST"),
    ("gpa-overlap-gmem-over-plain", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), _slot(vm, g, 1, G0 + 3 * PS)), "EEXIST"),
    ("gpa-overlap-plain-over-gmem", lambda h, vm, g: (_slot(vm, g), region2(vm, 1, 0, G0 - 2 * PS, 4 * PS)), "EEXIST"),
    # several rules failing at once: the first in the kernel's order wins
    ("multi-overlap-before-ebadf", lambda h, vm, g: (_slot(vm, g), _slot(vm, -1, 1, G0)), "EEXIST"),
    ("multi-overlap-before-not-gmem", lambda h, vm, g: (_slot(vm, g), _slot(vm, vm.fd, 1, G0)), "EEXIST"),
    ("multi-overlap-before-binding-overlap", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, G0)), "EEXIST"),
    ("multi-overlap-before-past-eof", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, G0, 4, 64 * PS)), "EEXIST"),
    ("multi-size-misaligned-before-overlap", lambda h, vm, g: (_slot(vm, g), region2(vm, 1, GMEM, G0, PS + 1, g)), "EINVAL"),
    ("multi-flags-before-ebadf", lambda h, vm, g: _slot(vm, -1, flags=GMEM | LOG), "EINVAL"),
    ("multi-flags-bit3-before-overlap", lambda h, vm, g: (_slot(vm, g), _slot(vm, -1, 1, G0, flags=GMEM | 8)), "EINVAL"),
    ("multi-readonly-gmem", lambda h, vm, g: _slot(vm, g, flags=GMEM | RO), "EINVAL"),
    ("multi-size-misaligned-before-ebadf", lambda h, vm, g: region2(vm, 0, GMEM, G0, PS - 1, -1), "EINVAL"),
    ("multi-gpa-misaligned-before-ebadf", lambda h, vm, g: region2(vm, 0, GMEM, G0 + 1, PS, -1), "EINVAL"),
    ("multi-hva-misaligned-before-ebadf", lambda h, vm, g: region2(vm, 0, GMEM, G0, PS, -1, hva=1), "EINVAL"),
    ("multi-hva-not-access-ok-before-ebadf", lambda h, vm, g: region2(vm, 0, GMEM, G0, PS, -1, hva=1 << 47), "EINVAL"),
    ("multi-hva-end-past-user-before-ebadf", lambda h, vm, g: region2(vm, 0, GMEM, G0, 2 * PS, -1, hva=(1 << 47) - 2 * PS), "EINVAL"),
    ("hva-end-at-user-limit", lambda h, vm, g: region2(vm, 0, 0, G0, PS, hva=(1 << 47) - 2 * PS), OK),
    ("multi-offset-misaligned-before-ebadf", lambda h, vm, g: _slot(vm, -1, offset=PS // 2), "EINVAL"),
    ("multi-offset-wrap-before-ebadf", lambda h, vm, g: _slot(vm, -1, offset=-2 * PS), "EINVAL"),
    ("multi-offset-wrap-before-overlap", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, 1, G0, offset=-2 * PS)), "EINVAL"),
    ("multi-as-id-before-ebadf", lambda h, vm, g: _slot(vm, -1, slot=1 << 16), "EINVAL"),
    ("multi-slot-id-before-ebadf", lambda h, vm, g: _slot(vm, -1, slot=uapi.KVM_USER_MEM_SLOTS), "EINVAL"),
    ("multi-slot-id-before-overlap", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, uapi.KVM_USER_MEM_SLOTS, G0)), "EINVAL"),
    ("multi-gpa-wrap-before-ebadf", lambda h, vm, g: _slot(vm, -1, gpa=-PS, npages=2), "EINVAL"),
    ("multi-max-nr-pages", lambda h, vm, g: region2(vm, 0, 0, 0, (1 << 31) * PS), "EINVAL"),
    ("multi-ebadf-before-max-gfn", lambda h, vm, g: _slot(vm, -1, gpa=1 << 52), "EBADF"),
    ("multi-past-eof-before-max-gfn", lambda h, vm, g: _slot(vm, g, gpa=1 << 52, offset=15 * PS), "EINVAL"),
    ("max-gfn-gmem", lambda h, vm, g: _slot(vm, g, gpa=1 << 52, npages=1), "EINVAL"),
    ("max-gfn-gmem-straddles", lambda h, vm, g: _slot(vm, g, gpa=(1 << 52) - PS, npages=2), "EINVAL"),
    ("max-gfn-gmem-last-page-ok", lambda h, vm, g: _slot(vm, g, gpa=(1 << 52) - PS, npages=1), OK),
    ("max-gfn-gmem-fails-leaves-range-unbound", lambda h, vm, g: (_try(lambda: _slot(vm, g, gpa=1 << 52)), _slot(vm, g, 1)), ("EINVAL", None)),
    ("max-gfn-plain", lambda h, vm, g: region2(vm, 0, 0, 1 << 53, PS), "EINVAL"),
    ("max-gfn-move", lambda h, vm, g: (region2(vm, 0, 0, G0, PS), region2(vm, 0, 0, 1 << 52, PS)), "EINVAL"),
    # delete
    ("delete-nonexistent", lambda h, vm, g: region2(vm, 0, 0, 0, 0), "EINVAL"),
    ("delete-nonexistent-gmem-flags-bad-fd", lambda h, vm, g: region2(vm, 0, GMEM, 0, 0, -1), "EINVAL"),
    ("delete-gmem", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, GMEM, G0, 0, -1)), (None, None)),
    ("delete-gmem-flags-zero", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, 0, 0)), (None, None)),
    ("delete-gmem-misaligned-offset", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, GMEM, G0, 0, -1, 1)), "EINVAL"),
    ("delete-gmem-log-flag", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, GMEM | LOG, G0, 0, -1)), "EINVAL"),
    ("delete-gpa-misaligned", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, G0 + 1, 0)), "EINVAL"),
    ("delete-hva-misaligned", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, G0, 0, hva=1)), "EINVAL"),
    ("delete-other-gpa-ignored", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, 3 * G0, 0)), (None, None)),
    ("delete-twice", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, 0, 0), region2(vm, 0, 0, 0, 0)), "EINVAL"),
    ("delete-readd-same", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, 0, 0), _slot(vm, g)), (None,) * 3),
    ("delete-rebind-range-other-slot", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, 0, 0), _slot(vm, g, 7, 3 * G0)), (None,) * 3),
    ("delete-readd-at-old-gpa-plain", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, 0, 0), region2(vm, 1, 0, G0, PS)), (None,) * 3),
    # modify: a gmem slot is immutable
    ("modify-gmem-identical", lambda h, vm, g: (_slot(vm, g), _slot(vm, g)), "EINVAL"),
    ("modify-gmem-identical-bad-fd", lambda h, vm, g: (_slot(vm, g), _slot(vm, -1)), "EINVAL"),
    ("modify-gmem-move", lambda h, vm, g: (_slot(vm, g), _slot(vm, g, gpa=2 * G0)), "EINVAL"),
    ("modify-gmem-drop-gmem-flag", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, 0, G0, 4 * PS)), "EINVAL"),
    ("modify-gmem-log-flag-only", lambda h, vm, g: (_slot(vm, g), region2(vm, 0, LOG, G0, 4 * PS)), "EINVAL"),
    ("modify-plain-add-gmem-flag", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), _slot(vm, g)), "EINVAL"),
    ("modify-plain-identical", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, 0, G0, 4 * PS)), (None, None)),
    ("modify-plain-move", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, 0, 2 * G0, 4 * PS)), (None, None)),
    ("modify-plain-move-overlap", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 1, 0, 2 * G0, 4 * PS), region2(vm, 0, 0, 2 * G0 + 2 * PS, 4 * PS)), "EEXIST"),
    ("modify-plain-move-onto-itself-partly", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, 0, G0 + PS, 4 * PS)), (None, None)),
    ("modify-plain-log-flag", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, LOG, G0, 4 * PS)), (None, None)),
    ("modify-plain-toggle-readonly", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, RO, G0, 4 * PS)), "EINVAL"),
    ("modify-plain-resize", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, 0, G0, 8 * PS)), "EINVAL"),
    ("modify-plain-hva", lambda h, vm, g: (region2(vm, 0, 0, G0, 4 * PS), region2(vm, 0, 0, G0, 4 * PS, hva=1 << 30)), "EINVAL"),
    ("plain-readonly", lambda h, vm, g: region2(vm, 0, RO, G0, 4 * PS), OK),
    ("plain-log-readonly", lambda h, vm, g: region2(vm, 0, RO | LOG, G0, 4 * PS), OK),
    # v1 ioctl: KVM_MEM_GUEST_MEMFD is v2-only
    ("v1-plain", lambda h, vm, g: vm.set_user_memory_region(0, 0, G0, 4 * PS), OK),
    ("v1-gmem-flag", lambda h, vm, g: vm.set_user_memory_region(0, GMEM, G0, 4 * PS), "EINVAL"),
    ("v1-gmem-flag-size-misaligned", lambda h, vm, g: vm.set_user_memory_region(0, GMEM, G0, 1), "EINVAL"),
    ("v1-then-v2-identical", lambda h, vm, g: (vm.set_user_memory_region(0, 0, G0, 4 * PS), region2(vm, 0, 0, G0, 4 * PS)), (None, None)),
    ("v1-delete-gmem-slot", lambda h, vm, g: (_slot(vm, g), vm.set_user_memory_region(0, 0, 0, 0)), (None, None)),
    ("v1-modify-gmem-slot", lambda h, vm, g: (_slot(vm, g), vm.set_user_memory_region(0, 0, G0, 4 * PS)), "EINVAL"),
]


def _try(fn):
    try:
        return fn()
    except OSError as e:
        return errname(e.errno)


for _name, _body, _exp in MEMSLOT_CASES:
    case(f"memslot-{_name}", _exp)(_memslot(_body))

# check_memory_region_flags for every bit (set_memory_region_test.c
# test_invalid_memory_region_flags): v1 takes LOG_DIRTY_PAGES|READONLY only; v2 on a 6.18 DEFAULT VM
# also GUEST_MEMFD (then the bind fails: fd -1 -> EBADF).
for _bit in range(32):
    case(f"memslot-v1-flag-bit{_bit}", OK if _bit < 2 else "EINVAL")(_memslot(
        lambda h, vm, g, _bit=_bit: vm.set_user_memory_region(0, 1 << _bit, G0, 4 * PS)))
    case(f"memslot-v2-flag-bit{_bit}", OK if _bit < 2 else "EBADF" if _bit == 2 else "EINVAL")(
        _memslot(lambda h, vm, g, _bit=_bit: region2(vm, 0, 1 << _bit, G0, 4 * PS)))


# -------------------------------------------------------------------------------- lifetimes
# §3.3 / §10.3: a gmem file pins its VM; memslots do not pin the gmem; a closed gmem leaves its
# slots in place but dead (re-adding the id is a modification of a gmem slot: EINVAL; deleting works).

@case("lifetime-vm-closed-gmem-fallocate", OK)
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    _slot(vm, f)
    vm.close()
    f.allocate(0, 16 * PS)
    f.punch_hole(0, 16 * PS)
    f.allocate(4 * PS, 4 * PS)


@case("lifetime-vm-closed-gmem-dup-fstat", {"st_size": 4 * PS, "st_blksize": PS, "st_mode": 0o100600,
                                            "st_blocks": 0})
def _(h):
    vm = vm_(h)
    f = gm(vm)
    vm.close()
    d = track(f.dup())
    f.close()
    return stat(d)


@case("lifetime-vm-closed-gmem-to-other-vm", "EINVAL")
def _(h):
    vm = vm_(h)
    f = gm(vm)
    vm.close()
    _slot(vm_(h), f)


@case("lifetime-gmem-closed-readd-same-slot", "EINVAL")
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    _slot(vm, f)
    f.close()
    _slot(vm, gm(vm, 16 * PS))


@case("lifetime-gmem-closed-readd-same-slot-bad-fd", "EINVAL")
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    _slot(vm, f)
    f.close()
    _slot(vm, -1)


@case("lifetime-gmem-closed-new-slot-same-gpa", "EEXIST")
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    _slot(vm, f)
    f.close()
    _slot(vm, gm(vm, 16 * PS), slot=1)


@case("lifetime-gmem-closed-delete-then-readd", (None, None))
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    _slot(vm, f)
    f.close()
    return region2(vm, 0, GMEM, G0, 0, -1), _slot(vm, gm(vm, 16 * PS))


@case("lifetime-gmem-closed-delete-twice", "EINVAL")
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    _slot(vm, f)
    f.close()
    region2(vm, 0, 0, 0, 0)
    region2(vm, 0, 0, 0, 0)


@case("lifetime-closed-gmem-object-not-bound", "EBADF")
def _(h):
    # a closed guest_memfd is not an open fd, even when its number has been reused
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    f.close()
    gm(vm, 16 * PS)
    _slot(vm, f)


@case("lifetime-dup-keeps-binding", "EINVAL")
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    d = track(f.dup())
    _slot(vm, f)
    f.close()
    _slot(vm, d, slot=1, gpa=2 * G0)      # the binding lives while the file does


@case("lifetime-dup-binds-disjoint-after-close", OK)
def _(h):
    vm = vm_(h)
    f = gm(vm, 16 * PS)
    d = track(f.dup())
    _slot(vm, f)
    f.close()
    _slot(vm, d, slot=1, gpa=2 * G0, offset=4 * PS)


@case("lifetime-mapping-keeps-file-vm-gone", (0x99, 0))
def _(h):
    vm = vm_(h)
    f = gm(vm, 2 * PS, MMAP | INIT_SHARED)
    m = mp(f, 2 * PS)
    vm.close()
    f.close()
    m[0:PS] = b"\x99" * PS
    return pages(m, 2)


# ------------------------------------------------------------------------- create VM, vCPU
for _t, _exp in [(0, 0), (1, "EINVAL"), (2, "EINVAL"), (3, "EINVAL"), (4, "EINVAL"), (5, "EINVAL"),
                 (6, "EINVAL"), (31, "EINVAL"), (32, "EINVAL"), (64, "EINVAL"), (-1, "EINVAL")]:
    case(f"create-vm-type-{_t}", _exp)(lambda h, _t=_t: vm_(h, _t).vm_type)


@case("create-vcpu-duplicate", "EEXIST")
def _(h):
    vm = vm_(h)
    track(vm.create_vcpu(0))
    track(vm.create_vcpu(0))


@case("create-vcpu-id-limit", "EINVAL")
def _(h):
    track(vm_(h).create_vcpu(4096))


# ------------------------------------------------------------------------- capabilities (§14)
CAPS = [("GUEST_MEMFD", uapi.KVM_CAP_GUEST_MEMFD, 1),
        ("GUEST_MEMFD_FLAGS", uapi.KVM_CAP_GUEST_MEMFD_FLAGS, MMAP | INIT_SHARED),
        ("MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES, 0),
        ("USER_MEMORY2", uapi.KVM_CAP_USER_MEMORY2, 1),
        ("MEMORY_FAULT_INFO", uapi.KVM_CAP_MEMORY_FAULT_INFO, 1),
        ("VM_TYPES", uapi.KVM_CAP_VM_TYPES, 1 << uapi.KVM_X86_DEFAULT_VM),
        ("NR_MEMSLOTS", uapi.KVM_CAP_NR_MEMSLOTS, 32764),
        ("READONLY_MEM", uapi.KVM_CAP_READONLY_MEM, 1),
        ("MULTI_ADDRESS_SPACE", uapi.KVM_CAP_MULTI_ADDRESS_SPACE, 0),
        ("unknown-999", 999, 0),
        ("unknown-1<<32", 1 << 32, 0),
        ("unknown-minus1", -1, 0)]
# Not here: KVM_CAP_PRE_FAULT_MEMORY is tdp_enabled; this machine's kvm_pvm runs without TDP
# (answers 0), the model is a TDP machine (1) -- see the model-only table.
for _name, _cap, _exp in CAPS:
    case(f"cap-host-{_name}", _exp)(lambda h, _cap=_cap: h.check_extension(_cap))
    case(f"cap-vm-{_name}", _exp)(lambda h, _cap=_cap: vm_(h).check_extension(_cap))


# ---------------------------------------------------------------- KVM_SET_MEMORY_ATTRIBUTES
# This build has no CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: the ioctl falls through to
# kvm_arch_vm_ioctl -> ENOTTY, whatever the arguments.
for _name, _args in [("shared", (0, PS, 0)), ("private", (0, PS, 8)), ("misaligned", (1, 1, 0)),
                     ("bad-flags", (0, PS, 0, 1)), ("size0", (0, 0, 8)), ("wrap", (-PS, 2 * PS, 0))]:
    case(f"attributes-{_name}", "ENOTTY")(lambda h, _args=_args: vm_(h).set_memory_attributes(*_args))


@case("attributes-get-after-refused-set", ("ENOTTY", 0))
def _(h):
    vm = vm_(h)
    return _try(lambda: vm.set_memory_attributes(G0, PS, 8)), vm.get_memory_attributes(G0 >> 12)


@pytest.mark.parametrize("scenario,expected", CASES)
def test_uapi(scenario, expected, khost):
    check(scenario, expected, khost)


def test_table_size():
    assert len(CASES) >= 150
    assert len({p.id for p in CASES}) == len(CASES)


# =============================================================================================
# Model only: VM types and a kernel build this machine lacks.  Each expectation cites the
# kernel function (6.18) it comes from.

SW, SEV, SEV_ES, SNP, TDX = (uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM,
                             uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM)
MODEL_CASES = []


def mcase(name, platform, expected):
    def deco(fn):
        MODEL_CASES.append(pytest.param(platform, fn, expected, id=name))
        return fn
    return deco


# kvm_arch_init_vm / KVM_CAP_VM_TYPES: kvm_caps.supported_vm_types; SW_PROTECTED with
# CONFIG_KVM_SW_PROTECTED_VM (the model's sw_protected=True default)
mcase("vm-types-amd", "amd", 0b11111)(lambda h: h.check_extension(uapi.KVM_CAP_VM_TYPES))
mcase("vm-types-intel", "intel", (1 << 0) | (1 << 1) | (1 << 5))(
    lambda h: h.check_extension(uapi.KVM_CAP_VM_TYPES))
mcase("create-vm-tdx-on-amd", "amd", "EINVAL")(lambda h: vm_(h, TDX).vm_type)
mcase("create-vm-snp-on-intel", "intel", "EINVAL")(lambda h: vm_(h, SNP).vm_type)
mcase("create-vm-sev-on-intel", "intel", "EINVAL")(lambda h: vm_(h, SEV).vm_type)
for _t, _p in ((SW, "amd"), (SEV, "amd"), (SEV_ES, "amd"), (SNP, "amd"), (TDX, "intel")):
    mcase(f"create-vm-type-{_t}-{_p}", _p, _t)(lambda h, _t=_t: vm_(h, _t).vm_type)

# kvm_gmem_create -> kvm_gmem_get_supported_flags(): MMAP always; INIT_SHARED only when
# kvm_arch_supports_gmem_init_shared() = !kvm_arch_has_private_mem() (SW_PROTECTED/SNP/TDX: no)
for _t, _p, _private in ((0, "amd", False), (SW, "amd", True), (SEV, "amd", False),
                         (SEV_ES, "amd", False), (SNP, "amd", True), (TDX, "intel", True)):
    for _fl in (MMAP, INIT_SHARED, MMAP | INIT_SHARED, 1 << 2, 1 << 63):
        _exp = (PS, _fl) if _fl == MMAP or (_fl & ~3 == 0 and not _private) else "EINVAL"
        mcase(f"create-gmem-type{_t}-flags{_fl:#x}", _p, _exp)(
            lambda h, _t=_t, _fl=_fl: (lambda f: (f.size, f.flags))(gm(vm_(h, _t), PS, _fl)))
    # flags are checked before size (kvm_gmem_create): both bad -> EINVAL
    mcase(f"create-gmem-type{_t}-bad-size", _p, "EINVAL")(lambda h, _t=_t: gm(vm_(h, _t), 1, 0))

# KVM_CHECK_EXTENSION (§14): kvm_vm_ioctl_check_extension_generic / kvm_vm_ioctl_check_extension
#   GUEST_MEMFD_FLAGS: kvm_gmem_get_supported_flags(kvm);  MEMORY_ATTRIBUTES:
#   kvm_supported_mem_attributes(kvm) = PRIVATE iff !kvm || kvm_arch_has_private_mem(kvm);
#   READONLY_MEM: kvm_arch_has_readonly_mem(kvm) = !kvm->arch.has_protected_state (SEV-ES/SNP/TDX)
for _t, _p, _flags, _attrs, _ro in ((0, "amd", 3, 0, 1), (SW, "amd", 1, 8, 1), (SEV, "amd", 3, 0, 1),
                                    (SEV_ES, "amd", 3, 0, 0), (SNP, "amd", 1, 8, 0),
                                    (SW, "intel", 1, 8, 1), (TDX, "intel", 1, 8, 0)):
    for _name, _cap, _exp in (("GUEST_MEMFD_FLAGS", uapi.KVM_CAP_GUEST_MEMFD_FLAGS, _flags),
                              ("MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES, _attrs),
                              ("READONLY_MEM", uapi.KVM_CAP_READONLY_MEM, _ro),
                              ("GUEST_MEMFD", uapi.KVM_CAP_GUEST_MEMFD, 1)):
        mcase(f"cap-{_name}-type{_t}-{_p}", _p, _exp)(
            lambda h, _t=_t, _cap=_cap: vm_(h, _t).check_extension(_cap))
for _p in ("amd", "intel"):
    mcase(f"cap-host-MEMORY_ATTRIBUTES-{_p}", _p, 8)(
        lambda h: h.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES))
    mcase(f"cap-host-GUEST_MEMFD_FLAGS-{_p}", _p, 3)(
        lambda h: h.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS))
# x86.c: case KVM_CAP_PRE_FAULT_MEMORY: r = tdp_enabled (the model is a TDP machine)
mcase("cap-PRE_FAULT_MEMORY-model-tdp", "none", 1)(
    lambda h: h.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY))

# check_memory_region_flags: READONLY only if kvm_arch_has_readonly_mem(kvm); never with GUEST_MEMFD;
# LOG_DIRTY_PAGES never with GUEST_MEMFD
for _t, _p, _exp in ((SW, "amd", OK), (SEV, "amd", OK), (SEV_ES, "amd", "EINVAL"), (SNP, "amd", "EINVAL"),
                     (TDX, "intel", "EINVAL")):
    mcase(f"memslot-readonly-type{_t}", _p, _exp)(lambda h, _t=_t: region2(vm_(h, _t), 0, RO, G0, PS))
for _t, _p in ((SW, "amd"), (SNP, "amd"), (TDX, "intel")):
    mcase(f"memslot-gmem-readonly-type{_t}", _p, "EINVAL")(
        lambda h, _t=_t: (lambda vm: _slot(vm, gm(vm, 4 * PS), flags=GMEM | RO))(vm_(h, _t)))
    mcase(f"memslot-gmem-log-type{_t}", _p, "EINVAL")(
        lambda h, _t=_t: (lambda vm: _slot(vm, gm(vm, 4 * PS), flags=GMEM | LOG))(vm_(h, _t)))
    mcase(f"memslot-gmem-bind-type{_t}", _p, OK)(
        lambda h, _t=_t: (lambda vm: _slot(vm, gm(vm, 4 * PS)))(vm_(h, _t)))
    # kvm_arch_nr_memslot_as_ids(): 1 for a VM with private memory
    mcase(f"memslot-as-id-1-type{_t}", _p, "EINVAL")(
        lambda h, _t=_t: (lambda vm: _slot(vm, gm(vm, 4 * PS), slot=1 << 16))(vm_(h, _t)))
# kvm_arch_prepare_memory_region: kvm_is_gfn_alias() -- a TDX memslot may not reach the shared bit
mcase("memslot-tdx-shared-bit", "intel", "EINVAL")(
    lambda h: region2(vm_(h, TDX), 0, 0, 1 << 51, PS))
mcase("memslot-tdx-below-shared-bit", "intel", OK)(
    lambda h: region2(vm_(h, TDX), 0, 0, (1 << 51) - PS, PS))

# kvm_vm_ioctl_set_mem_attributes: flags != 0 -> EINVAL; attributes & ~kvm_supported_mem_attributes
# -> EINVAL; size == 0 or address + size wraps -> EINVAL; !PAGE_ALIGNED(address/size) -> EINVAL
P8 = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
for _t, _p in ((SW, "amd"), (SNP, "amd"), (TDX, "intel")):
    for _name, _args, _exp in [("private", (G0, PS, P8), (P8, 0)),
                               ("private-no-memslot", (1 << 45, 2 * PS, P8), (P8, 0)),
                               ("shared", (G0, PS, 0), (0, 0)),
                               ("flags", (G0, PS, P8, 1), "EINVAL"),
                               ("flags-high", (G0, PS, 0, 1 << 63), "EINVAL"),
                               ("attr-bit0", (G0, PS, 1), "EINVAL"),
                               ("attr-bit63", (G0, PS, 1 << 63), "EINVAL"),
                               ("attr-private-and-bit4", (G0, PS, P8 | 16), "EINVAL"),
                               ("size0", (G0, 0, P8), "EINVAL"),
                               ("wrap", (-PS, 2 * PS, P8), "EINVAL"),
                               ("address-misaligned", (G0 + 1, PS, P8), "EINVAL"),
                               ("size-misaligned", (G0, PS + 1, P8), "EINVAL")]:
        def _attr(h, _t=_t, _args=_args):
            vm = vm_(h, _t)
            vm.set_memory_attributes(*_args)
            g = (_args[0] & ((1 << 64) - 1)) >> 12
            return vm.get_memory_attributes(g), vm.get_memory_attributes(g + (_args[1] >> 12))
        mcase(f"attributes-type{_t}-{_name}", _p, _exp)(_attr)
for _t, _p in ((0, "amd"), (SEV, "amd"), (SEV_ES, "amd"), (0, "intel")):
    # no private memory: kvm_supported_mem_attributes() == 0
    mcase(f"attributes-type{_t}-{_p}-private", _p, "EINVAL")(
        lambda h, _t=_t: vm_(h, _t).set_memory_attributes(G0, PS, P8))
    mcase(f"attributes-type{_t}-{_p}-zero", _p, OK)(
        lambda h, _t=_t: vm_(h, _t).set_memory_attributes(G0, PS, 0))


@mcase("attributes-overwrite-and-erase", "amd", (P8, P8, 0, P8))
def _(h):
    # kvm_vm_set_mem_attributes: the range's attributes are replaced; 0 erases
    vm = vm_(h, SW)
    vm.set_memory_attributes(G0, 4 * PS, P8)
    r = (vm.get_memory_attributes(G0 >> 12), vm.get_memory_attributes((G0 >> 12) + 3))
    vm.set_memory_attributes(G0 + PS, 2 * PS, 0)
    return r + (vm.get_memory_attributes((G0 >> 12) + 1), vm.get_memory_attributes((G0 >> 12) + 3))


@mcase("attributes-independent-of-gmem", "amd", ((4, 0), (4, 4)))
def _(h):
    # kvm_vm_set_mem_attributes never allocates or frees gmem pages; punching ignores attributes
    vm = vm_(h, SW)
    f = gm(vm, 4 * PS)
    _slot(vm, f)
    f.allocate(0, 4 * PS)
    vm.set_memory_attributes(G0, 4 * PS, P8)
    vm.set_memory_attributes(G0, 2 * PS, 0)
    a = (h.stats["folios_allocated"], h.stats["folios_freed"])
    f.punch_hole(0, 4 * PS)
    return a, (h.stats["folios_allocated"], h.stats["folios_freed"])


# kvm_gmem_fault_user_mapping: a gmem of a private-memory VM cannot have INIT_SHARED, so every
# host access to its mapping is SIGBUS
for _t, _p in ((SW, "amd"), (SNP, "amd"), (TDX, "intel")):
    mcase(f"mmap-type{_t}-sigbus", _p, ("SIGBUS", 0))(
        lambda h, _t=_t: mp(gm(vm_(h, _t), 4 * PS, MMAP), 4 * PS)[0])
    mcase(f"mmap-type{_t}-no-mmap-flag", _p, "ENODEV")(
        lambda h, _t=_t: mp(gm(vm_(h, _t), 4 * PS), 4 * PS))
mcase("mmap-sev-init-shared", "amd", (0xAB, 0))(
    lambda h: (lambda m: (m.__setitem__(slice(0, PS), b"\xab" * PS), pages(m, 2))[1])(
        mp(gm(vm_(h, SEV), 2 * PS, MMAP | INIT_SHARED), 2 * PS)))


@pytest.mark.parametrize("platform,scenario,expected", MODEL_CASES)
def test_model_only(platform, scenario, expected):
    h = gmem.Host(platform=platform)
    assert run(scenario, h) == expected
    h.check()
