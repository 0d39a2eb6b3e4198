"""gmem.kernel against the real /dev/kvm: the guest_memfd selftests a DEFAULT VM can run, and the
exact errnos of the kernel's uAPI (kvm_vm_ioctl_set_memory_region, kvm_gmem_create, kvm_gmem_bind,
kvm_gmem_fallocate, kvm_vm_ioctl_set_mem_attributes, ...), plus the uapi ioctl numbers against _IOC().

Case names follow guest_memfd_test.c (6.18) and set_memory_region_test.c."""

import errno
import fcntl
import os
import stat
import struct

import pytest

from gmem import kernel, uapi
from gmem.errors import SigBus

PS = uapi.PAGE_SIZE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD

MEM_REGION_SIZE = 0x200000
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SLOT = 10


# --------------------------------------------------------------------------------------------
# uapi: no kernel needed

# (name, _IOC dir, nr, struct size, the spec's literal value) -- kernel-gmem.md §2.1
SPEC_IOCTLS = [
    ("KVM_GET_API_VERSION", uapi._IOC_NONE, 0x00, 0, 0xAE00),
    ("KVM_CREATE_VM", uapi._IOC_NONE, 0x01, 0, 0xAE01),
    ("KVM_CHECK_EXTENSION", uapi._IOC_NONE, 0x03, 0, 0xAE03),
    ("KVM_GET_VCPU_MMAP_SIZE", uapi._IOC_NONE, 0x04, 0, 0xAE04),
    ("KVM_CREATE_VCPU", uapi._IOC_NONE, 0x41, 0, 0xAE41),
    ("KVM_SET_USER_MEMORY_REGION", uapi._IOC_WRITE, 0x46, 32, 0x4020AE46),
    ("KVM_SET_USER_MEMORY_REGION2", uapi._IOC_WRITE, 0x49, 160, 0x40A0AE49),
    ("KVM_RUN", uapi._IOC_NONE, 0x80, 0, 0xAE80),
    ("KVM_ENABLE_CAP", uapi._IOC_WRITE, 0xA3, 104, 0x4068AEA3),
    ("KVM_SET_MEMORY_ATTRIBUTES", uapi._IOC_WRITE, 0xD2, 32, 0x4020AED2),
    ("KVM_CREATE_GUEST_MEMFD", uapi._IOC_READ | uapi._IOC_WRITE, 0xD4, 64, 0xC040AED4),
    ("KVM_PRE_FAULT_MEMORY", uapi._IOC_READ | uapi._IOC_WRITE, 0xD5, 64, 0xC040AED5),
]


@pytest.mark.parametrize("name,dir,nr,size,literal", SPEC_IOCTLS, ids=[t[0] for t in SPEC_IOCTLS])
def test_uapi_ioctl_numbers(name, dir, nr, size, literal):
    assert uapi.KVMIO == 0xAE
    assert uapi._IOC(dir, uapi.KVMIO, nr, size) == literal
    assert getattr(uapi, name) == literal


@pytest.mark.parametrize("name,size", [
    ("KVM_USERSPACE_MEMORY_REGION", 32), ("KVM_USERSPACE_MEMORY_REGION2", 160),
    ("KVM_MEMORY_ATTRIBUTES", 32), ("KVM_CREATE_GUEST_MEMFD", 64), ("KVM_PRE_FAULT_MEMORY", 64),
    ("KVM_ENABLE_CAP", 104), ("KVM_SEV_SNP_LAUNCH_UPDATE", 64)])
def test_uapi_struct_sizes(name, size):
    assert struct.calcsize(getattr(uapi, name + "_FORMAT")) == getattr(uapi, name + "_SIZE") == size


def test_uapi_spec_values():
    assert (uapi.KVM_CAP_USER_MEMORY2, uapi.KVM_CAP_MEMORY_FAULT_INFO, uapi.KVM_CAP_MEMORY_ATTRIBUTES,
            uapi.KVM_CAP_GUEST_MEMFD, uapi.KVM_CAP_VM_TYPES, uapi.KVM_CAP_PRE_FAULT_MEMORY,
            uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == (231, 232, 233, 234, 235, 236, 244)
    assert (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_HYPERCALL, uapi.KVM_EXIT_INTERNAL_ERROR,
            uapi.KVM_EXIT_MEMORY_FAULT) == (2, 3, 17, 39)
    assert uapi.KVM_USER_MEM_SLOTS == 32764 and uapi.KVM_MEM_MAX_NR_PAGES == 2**31 - 1
    assert uapi.EHWPOISON == 133
    assert uapi.PFERR_GUEST_RMP_MASK == 1 << 31 and uapi.PFERR_GUEST_VMPL_MASK == 1 << 36
    assert uapi.PFERR_SYNTHETIC_MASK == (1 << 48) | (1 << 49)
    assert uapi.PFERR_SYNTHETIC_MASK & 0xFFFFFFFF == 0          # BUILD_BUG_ON in kvm_handle_page_fault
    assert (uapi.RET_PF_CONTINUE, uapi.RET_PF_FIXED, uapi.RET_PF_SPURIOUS) == (0, 5, 6)
    assert [uapi.KVM_PAGES_PER_HPAGE(lv) for lv in (1, 2, 3)] == [1, 512, 512 * 512]
    assert uapi.KVM_MAP_GPA_RANGE_ENCRYPTED == 0x10 and uapi.KVM_MAP_GPA_RANGE_DECRYPTED == 0
    assert uapi.TDX_SHARED_BIT_PWL_5 << uapi.PAGE_SHIFT == 1 << 51
    assert uapi.TDX_SHARED_BIT_PWL_4 << uapi.PAGE_SHIFT == 1 << 47
    assert uapi.VMGEXIT_PSC_ERROR_INVALID_ENTRY == 0x100000002


def test_attribute_shadow():
    """The Python shadow behind Vm.get_memory_attributes: overwrite per range, 0 erases."""
    s = kernel._AttributeShadow()
    s.set(0, 10, 8)
    s.set(4, 6, 0)
    s.set(8, 12, 8)
    assert [s.get(g) for g in range(13)] == [8, 8, 8, 8, 0, 0, 8, 8, 8, 8, 8, 8, 0]


# --------------------------------------------------------------------------------------------
# The real kernel

requires_kvm = pytest.mark.skipif(not kernel.available(),
                                    reason=f"needs /dev/kvm with guest_memfd: {kernel.unavailable_reason()}")


@pytest.fixture(scope="module")
def host():
    if not kernel.available():
        pytest.skip("needs /dev/kvm with guest_memfd (KVM_CAP_GUEST_MEMFD)")
    with kernel.Host(platform="none", sw_protected=False, memory_attributes=False) as h:
        yield h


@pytest.fixture
def vm(host):
    with host.create_vm(uapi.KVM_X86_DEFAULT_VM) as v:
        yield v


def errno_of(fn, *args, **kwargs):
    """The errno a call fails with (the test fails if it succeeds)."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def gmem_flags(vm):
    return vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)


def flag_variants(vm):
    """__test_guest_memfd()'s flag sets for this VM (guest_memfd_test.c, 6.18)."""
    flags = gmem_flags(vm)
    out = [0]
    if flags & MMAP:
        out.append(MMAP)
    if flags & INIT_SHARED:
        out.append(MMAP | INIT_SHARED)
    return out


# §14 -------------------------------------------------------------------------------------------

@requires_kvm
def test_check_extension(host, vm):
    assert host.api_version() == uapi.KVM_API_VERSION
    for fd in (host, vm):
        assert fd.check_extension(uapi.KVM_CAP_USER_MEMORY2) == 1
        assert fd.check_extension(uapi.KVM_CAP_MEMORY_FAULT_INFO) == 1
        assert fd.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1       # 6.18: every VM type
        assert fd.check_extension(uapi.KVM_CAP_VM_TYPES) & (1 << uapi.KVM_X86_DEFAULT_VM)
        assert fd.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED
        assert fd.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) == uapi.KVM_USER_MEM_SLOTS
        assert fd.check_extension(0x7FFFFFFF) == 0                        # unknown cap
    # a DEFAULT VM supports no attributes, whatever /dev/kvm says
    assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert host.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) in (0, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)


# §15 -------------------------------------------------------------------------------------------

@requires_kvm
def test_create_vm_types(host):
    supported = host.check_extension(uapi.KVM_CAP_VM_TYPES)
    for vm_type in range(uapi.KVM_X86_TDX_VM + 2):
        if supported & (1 << vm_type):
            host.create_vm(vm_type).close()
        else:
            assert errno_of(host.create_vm, vm_type) == errno.EINVAL
    for vm_type in (32, 1 << 40, 1 << 63):
        assert errno_of(host.create_vm, vm_type) == errno.EINVAL


# §3 KVM_CREATE_GUEST_MEMFD -------------------------------------------------------------------

@requires_kvm
def test_guest_memfd_flags(vm):
    """test_guest_memfd_flags: each single flag bit in KVM_CAP_GUEST_MEMFD_FLAGS works, others EINVAL."""
    valid = gmem_flags(vm)
    for bit in range(64):
        flag = 1 << bit
        if flag & valid:
            vm.create_guest_memfd(PS, flag).close()
        else:
            assert errno_of(vm.create_guest_memfd, PS, flag) == errno.EINVAL
    vm.create_guest_memfd(PS, MMAP | INIT_SHARED).close()
    # flags are checked before size: bad flags + bad size is EINVAL either way
    assert errno_of(vm.create_guest_memfd, 1, 1 << 63) == errno.EINVAL


@requires_kvm
def test_create_guest_memfd_invalid_sizes(vm):
    for flags in flag_variants(vm):
        for size in range(1, PS):
            assert errno_of(vm.create_guest_memfd, size, flags) == errno.EINVAL
        for size in (0, PS + 1, 1 << 63, (1 << 64) - PS, -PS):     # loff_t: >= 2^63 is negative
            assert errno_of(vm.create_guest_memfd, size, flags) == errno.EINVAL


@requires_kvm
def test_create_guest_memfd_multiple(vm):
    with vm.create_guest_memfd(PS) as f1, vm.create_guest_memfd(2 * PS) as f2:
        assert f1.fstat().st_size == PS
        assert f2.fstat().st_size == 2 * PS
        assert f1.fstat().st_size == PS
        assert f1.fstat().st_ino != f2.fstat().st_ino


@requires_kvm
def test_create_guest_memfd_reserved_ignored(vm):
    buf = bytearray(struct.pack(uapi.KVM_CREATE_GUEST_MEMFD_FORMAT, PS, 0, *([0xFFFFFFFF] * 6)))
    os.close(fcntl.ioctl(vm.fd, uapi.KVM_CREATE_GUEST_MEMFD, buf, True))


@requires_kvm
def test_create_guest_memfd_dispatch(host, vm):
    """§3.1: on /dev/kvm or a vCPU fd -> EINVAL; from another process (forked child) -> EIO."""
    buf = bytearray(struct.pack(uapi.KVM_CREATE_GUEST_MEMFD_FORMAT, PS, 0, 0, 0, 0, 0, 0, 0))
    assert errno_of(fcntl.ioctl, host.fd, uapi.KVM_CREATE_GUEST_MEMFD, buf, True) == errno.EINVAL
    with vm.create_vcpu(0) as vcpu:
        assert errno_of(fcntl.ioctl, vcpu.fd, uapi.KVM_CREATE_GUEST_MEMFD, buf, True) == errno.EINVAL
    pid = os.fork()
    if pid == 0:
        try:
            vm.create_guest_memfd(PS)
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
        finally:
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == errno.EIO


@requires_kvm
def test_guest_memfd_fd_properties(vm):
    """§3.3."""
    with vm.create_guest_memfd(4 * PS) as f:
        assert not fcntl.fcntl(f.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC     # get_unused_fd_flags(0)
        assert fcntl.fcntl(vm.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(f.fd, fcntl.F_GETFL) == 0x8002                  # O_RDWR | O_LARGEFILE
        assert os.readlink(f"/proc/self/fd/{f.fd}") == "anon_inode:[kvm-gmem]"
        st = f.fstat()
        assert st.st_mode == stat.S_IFREG | 0o600
        assert (st.st_size, st.st_blksize, st.st_blocks) == (4 * PS, PS, 0)
        f.allocate(0, 4 * PS)
        assert f.fstat().st_blocks == 0                                    # i_blocks never updated


@requires_kvm
def test_guest_memfd_outlives_vm_fd(host):
    """§3.3: the gmem pins the VM; fallocate still works after the VM fd is closed."""
    v = host.create_vm()
    f = v.create_guest_memfd(4 * PS)
    v.close()
    f.allocate(0, 4 * PS)
    f.punch_hole(0, 4 * PS)
    assert errno_of(v.create_guest_memfd, PS) == errno.EBADF
    f.close()
    assert errno_of(f.allocate, 0, PS) == errno.EBADF


# §4.1 file operations --------------------------------------------------------------------------

@requires_kvm
@pytest.mark.parametrize("flags", [0, MMAP, MMAP | INIT_SHARED], ids=["0", "MMAP", "MMAP|INIT_SHARED"])
def test_file_read_write(vm, flags):
    with vm.create_guest_memfd(4 * PS, flags) as f:
        assert errno_of(f.read, 64) == errno.EINVAL
        assert errno_of(f.write, b"x" * 64) == errno.EINVAL
        assert errno_of(f.pread, 64, 0) == errno.ESPIPE
        assert errno_of(f.pwrite, b"x" * 64, 0) == errno.ESPIPE
        assert errno_of(f.pread, 64, -1) == errno.EINVAL                  # pos < 0 first
        assert errno_of(f.pwrite, b"x", -1) == errno.EINVAL


@requires_kvm
def test_file_syscalls(vm):
    with vm.create_guest_memfd(4 * PS) as f:
        for whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            assert errno_of(f.lseek, 0, whence) == errno.ESPIPE
        for n in (0, PS, 4 * PS, 8 * PS, -1):
            assert errno_of(f.ftruncate, n) == errno.EINVAL
        assert errno_of(fcntl.ioctl, f.fd, uapi.KVM_CHECK_EXTENSION, 0) == errno.ENOTTY
        assert errno_of(fcntl.ioctl, f.fd, uapi.KVM_CREATE_GUEST_MEMFD, bytearray(64), True) == errno.ENOTTY
        assert errno_of(os.fsync, f.fd) == errno.EINVAL
        assert errno_of(os.fdatasync, f.fd) == errno.EINVAL
        assert errno_of(fcntl.fcntl, f.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL) == errno.EINVAL
        assert errno_of(fcntl.fcntl, f.fd, fcntl.F_GET_SEALS) == errno.EINVAL
        os.posix_fadvise(f.fd, 0, PS, os.POSIX_FADV_DONTNEED)
        assert errno_of(os.open, f"/proc/self/fd/{f.fd}", os.O_RDWR) == errno.ENXIO
        assert f.fstat().st_size == 4 * PS


@requires_kvm
def test_mmap_not_supported(vm):
    with vm.create_guest_memfd(4 * PS) as f:
        assert errno_of(f.mmap, PS) == errno.ENODEV
        assert errno_of(f.mmap, 4 * PS) == errno.ENODEV


@requires_kvm
@pytest.mark.parametrize("flags", [0, MMAP, MMAP | INIT_SHARED], ids=["0", "MMAP", "MMAP|INIT_SHARED"])
def test_mmap_prot_exec(vm, flags):
    """6.18.44: EPERM even without the MMAP flag (anon_inodefs is noexec)."""
    with vm.create_guest_memfd(4 * PS, flags) as f:
        assert errno_of(f.mmap, PS, prot=uapi.PROT_READ | uapi.PROT_EXEC) == errno.EPERM


@requires_kvm
@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED], ids=["MMAP", "MMAP|INIT_SHARED"])
def test_mmap_cow(vm, flags):
    with vm.create_guest_memfd(4 * PS, flags) as f:
        assert errno_of(f.mmap, 4 * PS, flags=uapi.MAP_PRIVATE) == errno.EINVAL


@requires_kvm
def test_mprotect_exec(vm):
    with vm.create_guest_memfd(4 * PS, MMAP | INIT_SHARED) as f, f.mmap(4 * PS) as m:
        assert errno_of(m.mprotect, uapi.PROT_READ | uapi.PROT_EXEC) == errno.EACCES
        m.mprotect(uapi.PROT_READ)
        assert m[0:4] == b"\0" * 4
        with pytest.raises(PermissionError):
            m[0:4] = b"abcd"


# §4.2 / §18.2 mmap and faults ------------------------------------------------------------------

@requires_kvm
def test_mmap_supported(vm):
    total = 4 * PS
    with vm.create_guest_memfd(total, MMAP | INIT_SHARED) as f, f.mmap(total) as m:
        m[:] = b"\xaa" * total
        assert m[:] == b"\xaa" * total
        f.punch_hole(0, PS)
        assert m[:PS] == b"\0" * PS and m[PS:] == b"\xaa" * (total - PS)
        m[:PS] = b"\xaa" * PS
        assert m[:] == b"\xaa" * total


@requires_kvm
def test_fault_overflow(vm):
    """Map 4x the file; a memset stops with SIGBUS at i_size, having written everything before."""
    total = 4 * PS
    with vm.create_guest_memfd(total, MMAP | INIT_SHARED) as f, f.mmap(4 * total) as m:
        assert len(m) == 4 * total
        with pytest.raises(SigBus) as info:
            m[:] = b"\xaa" * (4 * total)
        assert info.value.offset == total
        with pytest.raises(SigBus):
            m[total]
        with pytest.raises(SigBus):
            m[total - 1:total + 1]
        assert m[:total] == b"\xaa" * total


@requires_kvm
def test_fault_private(vm):
    """MMAP without INIT_SHARED: mmap succeeds, every access is SIGBUS."""
    total = 4 * PS
    with vm.create_guest_memfd(total, MMAP) as f, f.mmap(total) as m:
        with pytest.raises(SigBus) as info:
            m[:] = b"\xaa" * total
        assert info.value.offset == 0
        with pytest.raises(SigBus):
            m[0]
        f.allocate(0, total)                     # allocating does not make pages host-accessible
        with pytest.raises(SigBus):
            m[PS:PS + 1]


@requires_kvm
def test_mapping_outlives_fd(vm):
    """The VMA holds the file: the mapping works after close(), and sees dup()'s file."""
    f = vm.create_guest_memfd(2 * PS, MMAP | INIT_SHARED)
    m = f.mmap(2 * PS)
    m[0:3] = b"abc"
    g = f.dup()
    assert g.fd != f.fd and g.size == f.size and g.flags == f.flags
    assert os.fstat(g.fd).st_ino == f.fstat().st_ino
    f.close()
    assert m[0:3] == b"abc"
    g.punch_hole(0, PS)
    assert m[0:3] == b"\0\0\0"
    g.close()
    m[PS:PS + 2] = b"zz"
    assert m[PS:PS + 2] == b"zz"
    m.close()


# §5 fallocate ----------------------------------------------------------------------------------

@requires_kvm
@pytest.mark.parametrize("flags", [0, MMAP, MMAP | INIT_SHARED], ids=["0", "MMAP", "MMAP|INIT_SHARED"])
def test_fallocate(vm, flags):
    """guest_memfd_test.c test_fallocate, in order."""
    total = 4 * PS
    with vm.create_guest_memfd(total, flags) as f:
        f.fallocate(KEEP, 0, total)
        assert errno_of(f.fallocate, KEEP | PUNCH, PS - 1, PS) == errno.EINVAL
        assert errno_of(f.fallocate, KEEP, total, PS) == errno.EINVAL
        assert errno_of(f.fallocate, KEEP, total + PS, PS) == errno.EINVAL
        f.fallocate(KEEP | PUNCH, total, PS)                  # punch beyond EOF succeeds
        f.fallocate(KEEP | PUNCH, total + PS, PS)
        assert errno_of(f.fallocate, KEEP | PUNCH, PS, PS - 1) == errno.EINVAL
        f.fallocate(KEEP | PUNCH, PS, PS)
        f.fallocate(KEEP, PS, PS)


@requires_kvm
def test_invalid_punch_hole(vm):
    with vm.create_guest_memfd(4 * PS) as f:
        for off, n in [(0, 1), (0, PS - 1), (0, PS + 1), (1, 1), (1, PS - 1), (1, PS), (1, PS + 1),
                       (PS, 1), (PS, PS - 1), (PS, PS + 1)]:
            assert errno_of(f.fallocate, KEEP | PUNCH, off, n) == errno.EINVAL


@requires_kvm
def test_fallocate_errnos(vm):
    """§5.1 VFS checks then §5.2 kvm_gmem_fallocate()."""
    total = 4 * PS
    with vm.create_guest_memfd(total) as f:
        # VFS: offset < 0 or len <= 0
        for mode in (KEEP, KEEP | PUNCH, 0):
            assert errno_of(f.fallocate, mode, 0, 0) == errno.EINVAL
            assert errno_of(f.fallocate, mode, 0, -PS) == errno.EINVAL
            assert errno_of(f.fallocate, mode, -PS, PS) == errno.EINVAL
        # VFS: offset + len beyond MAX_LFS_FILESIZE
        assert errno_of(f.fallocate, KEEP, 1 << 62, 1 << 62) == errno.EFBIG
        assert errno_of(f.fallocate, KEEP | PUNCH, (1 << 63) - PS, 2 * PS) == errno.EFBIG
        # mode: rejected by the VFS or by gmem, EOPNOTSUPP either way
        for mode in (0, PUNCH, uapi.FALLOC_FL_NO_HIDE_STALE, KEEP | uapi.FALLOC_FL_NO_HIDE_STALE,
                     uapi.FALLOC_FL_ZERO_RANGE, KEEP | uapi.FALLOC_FL_ZERO_RANGE,
                     uapi.FALLOC_FL_COLLAPSE_RANGE, KEEP | uapi.FALLOC_FL_COLLAPSE_RANGE,
                     uapi.FALLOC_FL_INSERT_RANGE, uapi.FALLOC_FL_UNSHARE_RANGE,
                     KEEP | uapi.FALLOC_FL_UNSHARE_RANGE, uapi.FALLOC_FL_WRITE_ZEROES,
                     KEEP | PUNCH | uapi.FALLOC_FL_ZERO_RANGE, 0x100, KEEP | 0x100):
            assert errno_of(f.fallocate, mode, 0, PS) == errno.EOPNOTSUPP, hex(mode)
        # mode before alignment
        assert errno_of(f.fallocate, 0, 1, 1) == errno.EOPNOTSUPP
        # alignment before bounds
        assert errno_of(f.fallocate, KEEP, total + 1, PS) == errno.EINVAL
        assert errno_of(f.fallocate, KEEP, 0, total + PS) == errno.EINVAL
        f.allocate(0, total)
        f.allocate(0, total)                                   # idempotent
        f.punch_hole(0, 1 << 40)                               # no bounds check on punch
        f.punch_hole(0, total)                                 # punching a hole is fine


# §10 / §11 memslots ----------------------------------------------------------------------------

def region2(vm, slot, flags, gpa, size, gmem=-1, offset=0, hva=0):
    return vm.set_user_memory_region2(slot, flags, gpa, size, hva, gmem, offset)


def delete(vm, slot):
    vm.set_user_memory_region2(slot, 0, 0, 0, 0, -1, 0)


@requires_kvm
def test_invalid_memory_region_flags(vm):
    """set_memory_region_test.c test_invalid_memory_region_flags on a DEFAULT VM."""
    supported = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
    if vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
        supported |= GMEM
    fd0_open = os.path.exists("/proc/self/fd/0")
    for i in range(32):
        flag = 1 << i
        if flag & supported and not flag & GMEM:
            continue
        assert errno_of(vm.set_user_memory_region, 0, flag, 0, MEM_REGION_SIZE, 0) == errno.EINVAL
        if flag & supported:
            continue
        err = errno_of(region2, vm, 0, flag, 0, MEM_REGION_SIZE, 0, 0)
        if flag == GMEM:
            # 6.18 accepts GUEST_MEMFD on a DEFAULT VM; fd 0 is then refused by kvm_gmem_bind()
            assert err == (errno.EINVAL if fd0_open else errno.EBADF)
        else:
            assert err == errno.EINVAL
    with vm.create_guest_memfd(MEM_REGION_SIZE) as f:
        for flags in (uapi.KVM_MEM_LOG_DIRTY_PAGES | GMEM, uapi.KVM_MEM_READONLY | GMEM):
            assert errno_of(region2, vm, 0, flags, 0, MEM_REGION_SIZE, f, 0) == errno.EINVAL


@requires_kvm
def test_add_private_memory_region(host, vm):
    """set_memory_region_test.c test_add_private_memory_region, on a DEFAULT VM (6.18 binds gmem
    to every VM type)."""
    def invalid(fd, offset=0):
        return errno_of(region2, vm, MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, fd, offset)

    assert invalid(host.fd) == errno.EINVAL
    assert invalid(vm.fd) == errno.EINVAL
    memfd = os.memfd_create("gmem-test")
    try:
        os.ftruncate(memfd, MEM_REGION_SIZE)
        assert invalid(memfd) == errno.EINVAL
    finally:
        os.close(memfd)
    with host.create_vm() as vm2, vm2.create_guest_memfd(MEM_REGION_SIZE) as other:
        assert invalid(other) == errno.EINVAL
        region2(vm2, MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, other, 0)
    with vm.create_guest_memfd(MEM_REGION_SIZE) as f:
        for offset in range(1, PS):
            assert invalid(f, offset) == errno.EINVAL
        region2(vm, MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, f, 0)


@requires_kvm
def test_add_overlapping_private_memory_regions(vm):
    with vm.create_guest_memfd(4 * MEM_REGION_SIZE) as f:
        region2(vm, 10, GMEM, MEM_REGION_GPA, 2 * MEM_REGION_SIZE, f, 0)
        region2(vm, 11, GMEM, 0x180000000, 2 * MEM_REGION_SIZE, f, 2 * MEM_REGION_SIZE)
        delete(vm, 10)
        for gpa in (0x180000000 - MEM_REGION_SIZE, 0x180000000 + MEM_REGION_SIZE):
            assert errno_of(region2, vm, 10, GMEM, gpa, 2 * MEM_REGION_SIZE, f, 0) == errno.EEXIST
        # GPA-disjoint but overlapping slot 11's gmem range: kvm_gmem_bind() says EINVAL, not EEXIST
        assert errno_of(region2, vm, 10, GMEM, MEM_REGION_GPA, 2 * MEM_REGION_SIZE, f,
                        3 * MEM_REGION_SIZE) == errno.EINVAL
        region2(vm, 10, GMEM, MEM_REGION_GPA, 2 * MEM_REGION_SIZE, f, 0)


@requires_kvm
def test_bind_errnos(host, vm):
    """§10.1 kvm_gmem_bind() and the §11.3 checks that come before it."""
    gpa, size = MEM_REGION_GPA, MEM_REGION_SIZE
    with vm.create_guest_memfd(2 * size) as f:
        assert errno_of(region2, vm, 1, GMEM, gpa, size, -1, 0) == errno.EBADF
        assert errno_of(region2, vm, 1, GMEM, gpa, size, 0x7FFFFFF0, 0) == errno.EBADF
        # offset/size beyond i_size
        assert errno_of(region2, vm, 1, GMEM, gpa, size, f, 2 * size) == errno.EINVAL
        assert errno_of(region2, vm, 1, GMEM, gpa, 3 * size, f, 0) == errno.EINVAL
        assert errno_of(region2, vm, 1, GMEM, gpa, size, f, size + PS) == errno.EINVAL
        # §11.3 steps 2-7 come before the fd is looked at (fd -1 would be EBADF)
        for args in [(gpa, size + 1, 0), (gpa + 1, size, 0), (gpa, size, 1),
                     (gpa, size, (1 << 64) - PS),                        # offset + size wraps
                     ((1 << 64) - PS, size, 0),                          # gpa + size wraps
                     (0, (uapi.KVM_MEM_MAX_NR_PAGES + 1) * PS, 0)]:
            g, s, off = args
            assert errno_of(region2, vm, 1, GMEM, g, s, -1, off) == errno.EINVAL, args
        assert errno_of(region2, vm, 1, GMEM, gpa, size, -1, 0, hva=1) == errno.EINVAL
        assert errno_of(region2, vm, uapi.KVM_USER_MEM_SLOTS, GMEM, gpa, size, f, 0) == errno.EINVAL
        assert errno_of(region2, vm, 2 << 16, GMEM, gpa, size, f, 0) == errno.EINVAL
        if vm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) < 2:
            assert errno_of(region2, vm, 1 << 16, GMEM, gpa, size, f, 0) == errno.EINVAL
        # last valid slot id; two slots on disjoint ranges of one gmem
        region2(vm, uapi.KVM_USER_MEM_SLOTS - 1, GMEM, gpa, size, f, 0)
        region2(vm, 1, GMEM, gpa + size, size, f, size)
        # a range can back one memslot only
        assert errno_of(region2, vm, 2, GMEM, gpa + 2 * size, PS, f, size) == errno.EINVAL
        delete(vm, 1)
        region2(vm, 2, GMEM, gpa + 2 * size, PS, f, size)       # unbound by the delete


@requires_kvm
def test_modify_and_delete(vm):
    """§11.3 steps 8-9: gmem slots are immutable; deleting a missing slot is EINVAL."""
    gpa, size = MEM_REGION_GPA, MEM_REGION_SIZE
    assert errno_of(delete, vm, 5) == errno.EINVAL
    with vm.create_guest_memfd(size) as f:
        region2(vm, 5, GMEM, gpa, size, f, 0)
        assert errno_of(region2, vm, 5, GMEM, gpa, size, f, 0) == errno.EINVAL      # identical
        # dropping GUEST_MEMFD: accepted as FLAGS_ONLY before the Dec 2025 stable fix, EINVAL after
        assert errno_of(region2, vm, 5, 0, gpa, size) == errno.EINVAL
        assert errno_of(region2, vm, 5, uapi.KVM_MEM_LOG_DIRTY_PAGES, gpa, size) == errno.EINVAL
        assert errno_of(region2, vm, 5, GMEM, gpa + size, size, f, 0) == errno.EINVAL  # move
        # a delete carrying GUEST_MEMFD still runs the offset checks first
        assert errno_of(vm.set_user_memory_region2, 5, GMEM, gpa, 0, 0, -1, 1) == errno.EINVAL
        vm.set_user_memory_region2(5, GMEM, gpa, 0, 0, -1, 0)
        # a plain slot: identical re-issue is a no-op, adding GUEST_MEMFD is EINVAL
        vm.set_user_memory_region(6, 0, gpa, size, 0)
        vm.set_user_memory_region(6, 0, gpa, size, 0)
        assert errno_of(region2, vm, 6, GMEM, gpa, size, f, 0) == errno.EINVAL
        delete(vm, 6)


@requires_kvm
def test_bound_slot_after_gmem_close(vm):
    """§10.3: closing the gmem leaves a dead slot that can't be re-bound, only deleted."""
    f = vm.create_guest_memfd(MEM_REGION_SIZE)
    region2(vm, 7, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, f, 0)
    f.close()
    with vm.create_guest_memfd(MEM_REGION_SIZE) as g:
        assert errno_of(region2, vm, 7, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, g, 0) == errno.EINVAL
        delete(vm, 7)
        region2(vm, 7, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, g, 0)


@requires_kvm
def test_guest_memfd_guest_host_side(vm):
    """The host half of test_guest_memfd_guest: an MMAP|INIT_SHARED gmem bound at 4 GiB, written
    and read back through a host mapping (no guest runs here)."""
    with vm.create_guest_memfd(PS, MMAP | INIT_SHARED) as f:
        region2(vm, 1, GMEM, 4 << 30, PS, f, 0)
        with f.mmap(PS) as m:
            m[:] = b"\xaa" * PS
        with f.mmap(PS) as m:
            assert m[:] == b"\xaa" * PS


# §12 KVM_SET_MEMORY_ATTRIBUTES -----------------------------------------------------------------

@requires_kvm
def test_set_memory_attributes(host, vm):
    """Without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES the ioctl does not exist: ENOTTY for every
    argument, and the shadow stays empty. With it, a DEFAULT VM supports no attribute."""
    if host.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0:
        for args in [(0, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE), (0, PS, 0), (0, PS, 0, 1), (1, 0, 0)]:
            assert errno_of(vm.set_memory_attributes, *args) == errno.ENOTTY
    else:
        assert errno_of(vm.set_memory_attributes, 0, PS, 0, 1) == errno.EINVAL
        assert errno_of(vm.set_memory_attributes, 0, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) == errno.EINVAL
        assert errno_of(vm.set_memory_attributes, 0, 0, 0) == errno.EINVAL
        assert errno_of(vm.set_memory_attributes, 1, PS, 0) == errno.EINVAL
    assert vm.get_memory_attributes(0) == 0


# vCPUs -----------------------------------------------------------------------------------------

@requires_kvm
def test_vcpu(vm):
    with vm.create_vcpu(0) as vcpu:
        assert vcpu.fd >= 0
        assert errno_of(vm.create_vcpu, 0) == errno.EEXIST
        assert errno_of(vcpu.pre_fault_memory, 0, PS, 1) == errno.EINVAL         # flags
        assert errno_of(vcpu.pre_fault_memory, 1, PS) == errno.EINVAL            # alignment
        assert errno_of(vcpu.pre_fault_memory, 0, 0) == errno.EINVAL             # gpa + size <= gpa
        with pytest.raises(NotImplementedError):
            vcpu.page_fault(0, 0)


def test_unavailable_reason_agrees_with_available():
    """Finding: available() said False without a reason."""
    why = kernel.unavailable_reason()
    assert (why is None) == kernel.available()
    if why is not None:
        assert why.startswith(("cannot open /dev/kvm: ", "/dev/kvm: this kernel has no guest_memfd"))


def test_the_run_header_says_what_the_differential_tests_checked(pytestconfig):
    from conftest import pytest_report_header
    line = pytest_report_header(pytestconfig)
    assert line.startswith("gmem.kernel: ")
    assert ("check the model only" in line) == (not kernel.available())
