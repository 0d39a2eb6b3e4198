"""The kernel's guest_memfd selftests, re-expressed on the gmem API (spec §18.2, §18.3):
tools/testing/selftests/kvm/guest_memfd_test.c (6.18) and the guest_memfd cases of
set_memory_region_test.c, one test per selftest function, named after it.

Each runs on
* ``kernel``: the real /dev/kvm (skipped without it) -- DEFAULT VMs only, no memory attributes;
* ``model``: the model of that same kernel, ``gmem.Host(platform="none", sw_protected=False,
  memory_attributes=False)``;
* ``model-amd`` / ``model-intel``: the model with SW_PROTECTED and the platform's confidential VM
  types, where the selftests iterate over every type in KVM_CAP_VM_TYPES (guest_memfd_test.c) or
  need KVM_X86_SW_PROTECTED_VM (set_memory_region_test.c).
Where the selftest asserts only "fails", the errno asserted here is the one of spec §4/§5/§10/§11.
"""

import errno

import pytest

import gmem
from gmem import kernel, uapi
from gmem.errors import SigBus

PS = uapi.PAGE_SIZE
TOTAL = 4 * PS
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
RW = uapi.PROT_READ | uapi.PROT_WRITE
SW = uapi.KVM_X86_SW_PROTECTED_VM

MEM_REGION_SIZE = 0x200000
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SLOT = 10

BACKENDS = ["kernel", "model", "model-amd", "model-intel"]


class Env:
    """A host plus everything a test opened on it, closed in reverse order at the end."""

    def __init__(self, name):
        self.name = name
        if name == "kernel":
            if not kernel.available():
                pytest.skip("no /dev/kvm with guest_memfd")
            self.host = kernel.Host()
        elif name == "model":
            self.host = gmem.Host(platform="none", sw_protected=False, memory_attributes=False)
        else:
            self.host = gmem.Host(platform=name.split("-")[1])
        self.opened = []

    @property
    def is_model(self):
        return self.name != "kernel"

    def track(self, obj):
        self.opened.append(obj)
        return obj

    def vm(self, vm_type=0):
        return self.track(self.host.create_vm(vm_type))

    def gmem(self, vm, size=TOTAL, flags=0):
        return self.track(vm.create_guest_memfd(size, flags))

    def mmap(self, f, length, prot=RW, flags=uapi.MAP_SHARED, offset=0):
        return self.track(f.mmap(length, offset, prot, flags))

    def vm_types(self):
        """guest_memfd_test.c main(): KVM_CAP_VM_TYPES, or BIT(VM_TYPE_DEFAULT) if 0."""
        bits = self.host.check_extension(uapi.KVM_CAP_VM_TYPES) or 1
        return [t for t in range(32) if bits >> t & 1]

    def close(self):
        for obj in reversed(self.opened):
            if hasattr(obj, "close"):
                obj.close()
        if self.is_model:
            self.host.check()
        else:
            self.host.close()


@pytest.fixture(params=BACKENDS)
def env(request):
    e = Env(request.param)
    yield e
    e.close()


def raises_errno(err, fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    assert exc.value.errno == err, f"{fn.__name__}{args}: {exc.value} (wanted {errno.errorcode[err]})"


def sigbus_at(fn):
    with pytest.raises(SigBus) as exc:
        fn()
    return exc.value.offset


def gmem_flag_sets(vm):
    """test_guest_memfd(): flags 0, then MMAP and MMAP|INIT_SHARED if KVM_CAP_GUEST_MEMFD_FLAGS has them."""
    supported = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
    sets = [0]
    if supported & MMAP:
        sets.append(MMAP)
    if supported & INIT_SHARED:
        sets.append(MMAP | INIT_SHARED)
    return sets


def each_gmem(env, want=lambda flags: True):
    """__test_guest_memfd over every VM type and flag set: a fresh 4-page gmem per case
    (gmem_test()). Yields (vm, flags, fd); asserts at least one combination ran."""
    ran = 0
    for vm_type in env.vm_types():
        vm = env.vm(vm_type)
        for flags in gmem_flag_sets(vm):
            if want(flags):
                f = env.gmem(vm, TOTAL, flags)
                yield vm, flags, f
                f.close()
                ran += 1
        vm.close()
    assert ran, "no VM type / flag combination ran this case"


# =========================================================================== guest_memfd_test.c

def test_guest_memfd_flags(env):
    for vm_type in env.vm_types():
        vm = env.vm(vm_type)
        valid = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        assert valid & MMAP
        for bit in range(64):
            flag = 1 << bit
            if flag & valid:
                env.gmem(vm, PS, flag).close()
            else:
                raises_errno(errno.EINVAL, vm.create_guest_memfd, PS, flag)
        vm.close()


def _stat(f):
    s = f.fstat()
    return s if isinstance(s, dict) else {k: getattr(s, k) for k in ("st_size", "st_blksize", "st_ino")}


def test_create_guest_memfd_multiple(env):
    for vm_type in env.vm_types():
        vm = env.vm(vm_type)
        f1 = env.gmem(vm, PS)
        assert _stat(f1)["st_size"] == PS
        f2 = env.gmem(vm, 2 * PS)
        assert _stat(f2)["st_size"] == 2 * PS
        assert _stat(f1)["st_size"] == PS
        assert _stat(f1)["st_ino"] != _stat(f2)["st_ino"]
        vm.close()


def test_create_guest_memfd_invalid_sizes(env):
    ran = 0
    for vm_type in env.vm_types():
        vm = env.vm(vm_type)
        for flags in gmem_flag_sets(vm):
            for size in range(1, PS):
                raises_errno(errno.EINVAL, vm.create_guest_memfd, size, flags)
            ran += 1
        vm.close()
    assert ran


def test_file_read_write(env):
    for _, _, f in each_gmem(env):
        raises_errno(errno.EINVAL, f.read, 64)
        raises_errno(errno.EINVAL, f.write, b"\0" * 64)
        raises_errno(errno.ESPIPE, f.pread, 64, 0)
        raises_errno(errno.ESPIPE, f.pwrite, b"\0" * 64, 0)


def test_mmap_supported(env):
    for _, _, f in each_gmem(env, lambda flags: flags & INIT_SHARED):
        m = env.mmap(f, TOTAL)
        m[:] = b"\xaa" * TOTAL
        assert m[:] == b"\xaa" * TOTAL
        f.fallocate(KEEP | PUNCH, 0, PS)
        assert m[:PS] == b"\0" * PS
        assert m[PS:] == b"\xaa" * (TOTAL - PS)
        m[:PS] = b"\xaa" * PS
        assert m[:] == b"\xaa" * TOTAL
        m.close()


def test_fault_overflow(env):
    # test_fault_sigbus(fd, total, total * 4)
    for _, _, f in each_gmem(env, lambda flags: flags & INIT_SHARED):
        m = env.mmap(f, 4 * TOTAL)
        assert sigbus_at(lambda: m.__setitem__(slice(0, 4 * TOTAL), b"\xaa" * 4 * TOTAL)) == TOTAL
        assert sigbus_at(lambda: m[TOTAL]) == TOTAL
        assert m[:TOTAL] == b"\xaa" * TOTAL
        m.close()


def test_fault_private(env):
    # test_fault_sigbus(fd, 0, total): MMAP without INIT_SHARED -- every page is private
    for _, _, f in each_gmem(env, lambda flags: flags == MMAP):
        m = env.mmap(f, TOTAL)
        assert sigbus_at(lambda: m.__setitem__(slice(0, TOTAL), b"\xaa" * TOTAL)) == 0
        assert sigbus_at(lambda: m[0]) == 0
        m.close()


def test_mmap_cow(env):
    for _, _, f in each_gmem(env, lambda flags: flags & MMAP):
        raises_errno(errno.EINVAL, f.mmap, TOTAL, 0, RW, uapi.MAP_PRIVATE)


def test_mmap_not_supported(env):
    for _, _, f in each_gmem(env, lambda flags: not flags & MMAP):
        raises_errno(errno.ENODEV, f.mmap, PS, 0, RW, uapi.MAP_SHARED)
        raises_errno(errno.ENODEV, f.mmap, TOTAL, 0, RW, uapi.MAP_SHARED)


def test_file_size(env):
    for _, _, f in each_gmem(env):
        s = f.fstat()
        get = s.__getitem__ if isinstance(s, dict) else lambda k: getattr(s, k)
        assert get("st_size") == TOTAL
        assert get("st_blksize") == PS


def test_fallocate(env):
    for _, _, f in each_gmem(env):
        f.fallocate(KEEP, 0, TOTAL)
        raises_errno(errno.EINVAL, f.fallocate, KEEP | PUNCH, PS - 1, PS)
        raises_errno(errno.EINVAL, f.fallocate, KEEP, TOTAL, PS)
        raises_errno(errno.EINVAL, f.fallocate, KEEP, TOTAL + PS, PS)
        f.fallocate(KEEP | PUNCH, TOTAL, PS)
        f.fallocate(KEEP | PUNCH, TOTAL + PS, PS)
        raises_errno(errno.EINVAL, f.fallocate, KEEP | PUNCH, PS, PS - 1)
        f.fallocate(KEEP | PUNCH, PS, PS)
        f.fallocate(KEEP, PS, PS)


def test_invalid_punch_hole(env):
    cases = [(0, 1), (0, PS - 1), (0, PS + 1), (1, 1), (1, PS - 1), (1, PS), (1, PS + 1),
             (PS, 1), (PS, PS - 1), (PS, PS + 1)]
    for _, _, f in each_gmem(env):
        for offset, length in cases:
            raises_errno(errno.EINVAL, f.fallocate, KEEP | PUNCH, offset, length)


def test_guest_memfd_guest(env):
    if not env.is_model:
        pytest.skip("needs guest code in KVM_RUN; gmem.kernel runs no guest (the model's vcpu.read/write do)")
    assert env.host.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
    vm = env.vm(uapi.KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & (MMAP | INIT_SHARED) == MMAP | INIT_SHARED
    gpa, size = 4 << 30, PS
    f = env.gmem(vm, size, MMAP | INIT_SHARED)
    vm.set_user_memory_region2(1, GMEM, gpa, size, 0, f, 0)
    m = f.mmap(size)
    m[:] = b"\xaa" * size
    m.close()
    assert vcpu.read(gpa, size) == b"\xaa" * size        # GUEST_ASSERT_EQ(mem[i], 0xaa)
    vcpu.write(gpa, b"\xff" * size)                      # memset(mem, 0xff, size)
    m = env.mmap(f, size)
    assert m[:] == b"\xff" * size


# ======================================================================= set_memory_region_test.c

def _region_vm(env):
    """VM = SW_PROTECTED if KVM_CAP_VM_TYPES has it, else the default type."""
    types = env.host.check_extension(uapi.KVM_CAP_VM_TYPES)
    return env.vm(SW if types >> SW & 1 else uapi.KVM_X86_DEFAULT_VM)


def test_invalid_memory_region_flags(env):
    vm = _region_vm(env)
    supported = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
    if env.host.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
        supported |= GMEM
    v2_only = GMEM
    for i in range(32):
        flag = 1 << i
        if flag & supported and not flag & v2_only:
            continue
        raises_errno(errno.EINVAL, vm.set_user_memory_region, 0, flag, 0, MEM_REGION_SIZE, 0)
        if flag & supported:
            continue
        # guest_memfd = 0: on a 6.18 DEFAULT VM the GUEST_MEMFD flag itself is valid and the bind
        # refuses fd 0 (not a guest_memfd) -- EINVAL either way
        raises_errno(errno.EINVAL, vm.set_user_memory_region2, 0, flag, 0, MEM_REGION_SIZE, 0, 0, 0)
    if supported & GMEM:
        f = env.gmem(vm, MEM_REGION_SIZE)
        for extra in (uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY):
            raises_errno(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM | extra, 0,
                         MEM_REGION_SIZE, 0, f, 0)


def _test_invalid_guest_memfd(vm, fd, offset):
    raises_errno(errno.EINVAL, vm.set_user_memory_region2, MEM_REGION_SLOT, GMEM, MEM_REGION_GPA,
                 MEM_REGION_SIZE, 0, fd, offset)


def _add_private_memory_region(env, vm_type):
    vm = env.vm(vm_type)
    _test_invalid_guest_memfd(vm, env.host.fd, 0)          # vm->kvm_fd
    _test_invalid_guest_memfd(vm, vm.fd, 0)                # the VM fd
    if not env.is_model:
        import os
        memfd = os.memfd_create("not-gmem")
        os.ftruncate(memfd, MEM_REGION_SIZE)
        try:
            _test_invalid_guest_memfd(vm, memfd, 0)        # a regular memfd
        finally:
            os.close(memfd)
    vm2 = env.vm(vm_type)
    f2 = env.gmem(vm2, MEM_REGION_SIZE)
    _test_invalid_guest_memfd(vm, f2, 0)                   # another VM's guest_memfd
    vm2.set_user_memory_region2(MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, 0, f2, 0)
    f = env.gmem(vm, MEM_REGION_SIZE)
    for offset in range(1, PS):
        _test_invalid_guest_memfd(vm, f, offset)
    vm.set_user_memory_region2(MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, 0, f, 0)


def _add_overlapping_private_memory_regions(env, vm_type):
    vm = env.vm(vm_type)
    f = env.gmem(vm, 4 * MEM_REGION_SIZE)
    s2 = 2 * MEM_REGION_SIZE
    vm.set_user_memory_region2(MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, s2, 0, f, 0)
    vm.set_user_memory_region2(MEM_REGION_SLOT + 1, GMEM, MEM_REGION_GPA * 2, s2, 0, f, s2)
    vm.set_user_memory_region2(MEM_REGION_SLOT, GMEM, MEM_REGION_GPA, 0, 0, -1, 0)       # delete
    # overlap in the guest_memfd range and the GPA range: the GPA check (EEXIST) comes first
    raises_errno(errno.EEXIST, vm.set_user_memory_region2, MEM_REGION_SLOT, GMEM,
                 MEM_REGION_GPA * 2 - MEM_REGION_SIZE, s2, 0, f, 0)
    raises_errno(errno.EEXIST, vm.set_user_memory_region2, MEM_REGION_SLOT, GMEM,
                 MEM_REGION_GPA * 2 + MEM_REGION_SIZE, s2, 0, f, 0)


def test_add_private_memory_region(env):
    if not env.host.check_extension(uapi.KVM_CAP_VM_TYPES) >> SW & 1:
        pytest.skip("TEST_REQUIRE(KVM_X86_SW_PROTECTED_VM): see the _default_vm variant")
    _add_private_memory_region(env, SW)


def test_add_overlapping_private_memory_regions(env):
    if not env.host.check_extension(uapi.KVM_CAP_VM_TYPES) >> SW & 1:
        pytest.skip("TEST_REQUIRE(KVM_X86_SW_PROTECTED_VM): see the _default_vm variant")
    _add_overlapping_private_memory_regions(env, SW)


# 6.18 lets every VM type bind guest_memfd (check_memory_region_flags), so the same two cases run
# on a DEFAULT VM too -- which is what this machine's kernel can check.
def test_add_private_memory_region_default_vm(env):
    _add_private_memory_region(env, uapi.KVM_X86_DEFAULT_VM)


def test_add_overlapping_private_memory_regions_default_vm(env):
    _add_overlapping_private_memory_regions(env, uapi.KVM_X86_DEFAULT_VM)
