"""In-place conversion under kernel="next" (kvm-x86, v13 applied 2026-09-22).

Shared/private moves from the VM into the guest_memfd inode (a maple tree, every index present,
equal neighbours merged); KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd converts; a
conversion to private unmaps every user PTE of the range and then fails with EAGAIN, writing
error_offset, at the first page still referenced (kvm_gmem_has_outstanding_references); private
to shared checks nothing. The module parameter kvm.gmem_in_place_conversion chooses per-file or
per-VM attributes for the whole module.

The first part ports the queued selftests (tools/testing/selftests/kvm/x86/
guest_memfd_conversions_test.c): every case is a SW_PROTECTED VM with a guest_memfd memslot at
4 GiB whose host view is the guest_memfd's own mmap; a host access to a private page is SIGBUS
(gmem.SigBus), the guest reads and writes through the vCPU.
"""
import errno

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import gmem
from gmem import uapi as u

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ZERO, PRESERVE = u.KVM_SET_MEMORY_ATTRIBUTES2_ZERO, u.KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
GPA = 4 << 30
HVA = 0x7F0000000000
PG = 4096
MMAP, INIT_SHARED = u.GUEST_MEMFD_FLAG_MMAP, u.GUEST_MEMFD_FLAG_INIT_SHARED


class Conv:
    """One selftest VM: a SW_PROTECTED VM, slot 1 at 4 GiB on a guest_memfd of npages, the
    host's mapping of it and a vCPU."""

    def __init__(self, npages=1, gmem_flags=0, host=None, **host_kw):
        host_kw = {"gmem_in_place_conversion": True, **host_kw}
        self.host = host or gmem.Host(memory=1 << 30, platform="none", kernel="next", **host_kw)
        self.vm = self.host.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        self.f = self.vm.create_guest_memfd(npages * PG, MMAP | gmem_flags)
        self.vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, npages * PG, HVA, self.f, 0)
        self.m = self.f.mmap(npages * PG)
        self.vcpu = self.vm.create_vcpu(0)

    def host_read(self, pg):
        return self.m[pg * PG]

    def host_write(self, pg, v):
        self.m[pg * PG] = v

    def guest_read(self, pg):
        return self.vcpu.read(GPA + pg * PG, 1)[0]

    def guest_write(self, pg, v):
        self.vcpu.write(GPA + pg * PG, bytes([v]))

    def convert(self, pg, private, npages=1, flags=0):
        self.f.set_memory_attributes(pg * PG, npages * PG, PRIVATE if private else 0, flags)

    # the selftest's helpers
    def test_private(self, pg, start, w):
        with pytest.raises(gmem.SigBus):
            self.host_write(pg, w)
        assert self.guest_read(pg) == start
        self.guest_write(pg, w)
        with pytest.raises(gmem.SigBus):
            self.host_read(pg)

    def test_shared(self, pg, start, hw, w):
        assert self.host_read(pg) == start
        self.host_write(pg, hw)
        assert self.guest_read(pg) == hw
        self.guest_write(pg, w)
        assert self.host_read(pg) == w

    def to_private(self, pg, start, w):
        self.convert(pg, True)
        self.test_private(pg, start, w)

    def to_shared(self, pg, start, hw, w):
        self.convert(pg, False)
        self.test_shared(pg, start, hw, w)


A, B, C, D, E = b"ABCDE"


def test_init_private():
    c = Conv()
    c.test_private(0, 0, A)
    c.to_shared(0, A, B, C)
    c.to_private(0, C, E)
    c.host.check()


def test_init_shared():
    c = Conv(gmem_flags=INIT_SHARED)
    c.test_shared(0, 0, A, B)
    c.to_private(0, B, C)
    c.to_shared(0, C, D, E)
    c.host.check()


@pytest.mark.parametrize("test_page", range(4))
def test_indexing(test_page):
    c = Conv(4, INIT_SHARED)
    for i in reversed(range(4)):
        c.test_shared(i, 0, i, 2 * i)
    for i in range(4):
        if i == test_page:
            c.to_private(i, 2 * i, 4 * i)
        else:
            c.test_shared(i, 2 * i, 3 * i, 4 * i)
    for i in range(4):
        if i == test_page:
            c.to_shared(i, 4 * i, 5 * i, 6 * i)
        else:
            c.test_shared(i, 4 * i, 5 * i, 6 * i)
    c.host.check()


def test_before_allocation_shared():
    c = Conv(gmem_flags=INIT_SHARED)
    c.to_private(0, 0, A)                   # recorded before any page exists: the guest reads 0


def test_before_allocation_private():
    c = Conv()
    c.to_shared(0, 0, A, B)


@pytest.mark.parametrize("test_page", range(8))
def test_unallocated_folios(test_page):
    c = Conv(8, INIT_SHARED)
    faulted = {test_page, 4}
    for i in faulted:
        assert c.host_read(i) == 0
        c.host_write(i, A)
    c.convert(0, True, 8)                   # one call over allocated and unallocated pages
    for i in range(8):
        c.test_private(i, A if i in faulted else 0, B)
    for i in range(8):
        c.to_shared(i, B, C, D)
    c.host.check()


def test_truncate_keeps_attributes():
    c = Conv(gmem_flags=INIT_SHARED)
    c.host_write(0, A)
    c.f.punch_hole(0, PG)
    assert c.host_read(0) == 0              # a new page, still shared
    c.host_write(0, A)
    c.to_private(0, A, B)
    c.f.punch_hole(0, PG)
    assert c.f.get_memory_attributes(0) == PRIVATE
    c.test_private(0, 0, A)                 # still private; the new page reads 0
    c.host.check()


def test_forked_accesses():
    """A second process's mapping (fork: the same guest_memfd mapping) sees the shared data and
    SIGBUSes once the parent converted: the private status is the inode's."""
    c = Conv(gmem_flags=INIT_SHARED)
    child = c.f.mmap(PG)
    c.host_write(0, A)
    assert child[0] == A
    child[0] = B
    assert c.host_read(0) == B
    c.convert(0, True)
    with pytest.raises(gmem.SigBus):
        child[0]
    with pytest.raises(gmem.SigBus):
        c.host_read(0)
    c.convert(0, False)
    assert child[0] == B                    # SW_PROTECTED: nothing touched the contents
    c.host.check()


@pytest.mark.parametrize("longterm", [True, False], ids=["pin", "get"])
@pytest.mark.parametrize("test_page", range(4))
def test_elevated_refcount(test_page, longterm):
    c = Conv(4, INIT_SHARED)
    pin = c.m.pin(test_page * PG, PG, longterm=longterm)
    for i in range(4):
        c.test_shared(i, 0, A, B)
    with pytest.raises(OSError) as e:
        c.convert(0, True, 4)
    assert e.value.errno == errno.EAGAIN and e.value.error_offset == test_page * PG
    assert "still referenced" in str(e.value)
    # nothing converted, but the whole range was unmapped first (not undone): pages refault
    assert all(c.f.get_memory_attributes(i * PG) == 0 for i in range(4))
    c.host.check()
    for i in range(4):
        if i == test_page:
            with pytest.raises(OSError) as e:
                c.convert(i, True)
            assert e.value.errno == errno.EAGAIN and e.value.error_offset == test_page * PG
        else:
            c.to_private(i, B, C)
    pin.release()
    c.convert(0, True, 4)
    for i in range(4):
        c.test_private(i, B if i == test_page else C, D)
    c.host.check()


def test_private_to_shared_does_not_check_references():
    """The guest is the only user of private pages: nothing to check on the way to shared, and
    a pin taken afterwards blocks only the next conversion to private."""
    c = Conv(2, INIT_SHARED)
    c.host_write(1, A)
    c.convert(0, True, 2)
    c.convert(0, False, 2)
    with c.m.pin(PG, PG):
        with pytest.raises(OSError) as e:
            c.convert(0, True, 2)
        assert (e.value.errno, e.value.error_offset) == (errno.EAGAIN, PG)
    c.convert(0, True, 2)


def test_pin_of_a_private_page_is_efault():
    c = Conv(2)
    with pytest.raises(OSError) as e:
        c.m.pin(0, 2 * PG)
    assert e.value.errno == errno.EFAULT
    c.convert(1, False)
    with pytest.raises(OSError) as e:       # all or nothing: page 0 is private
        c.m.pin(0, 2 * PG)
    c.convert(0, False)
    with c.m.pin(0, 2 * PG) as p:
        assert not p.released
    assert p.released
    c.convert(0, True, 2)
    c.host.check()


def test_punched_pinned_page_lives_until_release():
    """A punch drops the page cache's reference; the pin keeps the folio (DMA may still hit it)
    until it is released. The file's new page is not pinned: conversion succeeds."""
    c = Conv(1, INIT_SHARED)
    c.host_write(0, A)
    free0 = c.host.nr_free_pages
    p = c.m.pin(0, PG)
    c.f.punch_hole(0, PG)
    assert c.host.nr_free_pages == free0    # still held by the pin
    c.convert(0, True)
    c.host.check()
    p.release()
    assert c.host.nr_free_pages == free0 + 1
    c.host.check()


def test_already_converted_range_is_a_no_op():
    """Step 9: the whole range already has the attributes: 0, no unmapping, no zap, no check."""
    c = Conv(2, INIT_SHARED)
    c.guest_write(0, A)
    zaps = c.vm.stats["zapped_sptes"]
    with c.m.pin(0, PG):
        c.convert(0, False, 2)
    assert c.vm.stats["zapped_sptes"] == zaps and c.host.stats["gmem_conversions"] == 0


def test_conversion_zaps_the_other_kind():
    c = Conv(2, INIT_SHARED)
    c.guest_write(0, A)
    c.guest_write(1, B)
    pages = c.vm.stats["pages_4k"]
    c.convert(0, True)                      # KVM_FILTER_SHARED over page 0 only
    assert c.vm.stats["pages_4k"] == pages - 1
    assert c.guest_read(0) == A and c.vm.stats["pages_4k"] == pages
    c.host.check()


# ------------------------------------------------------------ checks, in order

@pytest.mark.parametrize("args, err, why", [
    ((0, PG, PRIVATE, 1), errno.EINVAL, "flags must be 0"),
    ((0, PG, PRIVATE | 1, 0), errno.EINVAL, "attributes other than"),
    ((0, 0, PRIVATE, 0), errno.EINVAL, "size is 0"),
    ((PG, (1 << 64) - PG, PRIVATE, 0), errno.EINVAL, "wraps"),
    ((1, PG, PRIVATE, 0), errno.EINVAL, "page aligned"),
    ((0, PG + 1, PRIVATE, 0), errno.EINVAL, "page aligned"),
    ((4 * PG, PG, PRIVATE, 0), errno.EINVAL, "past i_size"),
    ((0, 5 * PG, PRIVATE, 0), errno.EINVAL, "past i_size"),
    # the first failing check names itself: flags before the alignment
    ((1, 0, 7, 1), errno.EINVAL, "flags must be 0"),
    ((1, 0, 7, 0), errno.EINVAL, "attributes other than"),
])
def test_set_attributes2_checks(args, err, why):
    c = Conv(4, INIT_SHARED)
    with pytest.raises(OSError) as e:
        c.f.set_memory_attributes(*args)
    assert e.value.errno == err and why in str(e.value)
    assert all(c.f.get_memory_attributes(i * PG) == 0 for i in range(4))


def test_default_vm_guest_memfd_has_no_private_memory():
    h = gmem.Host(memory=1 << 30, platform="none", kernel="next", gmem_in_place_conversion=True)
    f = h.create_vm(u.KVM_X86_DEFAULT_VM).create_guest_memfd(PG, MMAP)
    with pytest.raises(OSError) as e:
        f.set_memory_attributes(0, PG, PRIVATE)
    assert e.value.errno == errno.EINVAL and "no private memory" in str(e.value)


# ----------------------------------------------- per-file vs per-VM attributes

def test_module_parameter_is_next_only():
    # off by default: a kernel built with CONFIG_KVM_VM_MEMORY_ATTRIBUTES (what VMMs using the
    # per-VM ioctl need) loads with kvm.gmem_in_place_conversion=0
    assert not gmem.Host(memory=1 << 30, kernel="next").gmem_in_place_conversion
    assert gmem.Host(memory=1 << 30, kernel="next", gmem_in_place_conversion=True).gmem_in_place_conversion
    for k in ("rfc-2023", "6.18", "7.2"):
        assert not gmem.Host(memory=1 << 30, kernel=k).gmem_in_place_conversion
        with pytest.raises(ValueError, match="next"):
            gmem.Host(memory=1 << 30, kernel=k, gmem_in_place_conversion=True)
        with pytest.raises(ValueError, match="next"):
            gmem.Host(memory=1 << 30, kernel=k, content_modes=True)
    with pytest.raises(ValueError, match="gmem_in_place_conversion"):
        gmem.Host(memory=1 << 30, kernel="next", gmem_in_place_conversion=False, content_modes=True)


@pytest.mark.parametrize("in_place", [True, False])
def test_capabilities(in_place):
    h = gmem.Host(memory=1 << 30, platform="amd", kernel="next", gmem_in_place_conversion=in_place)
    cap = u.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES
    assert h.check_extension(cap) == (PRIVATE if in_place else 0)
    assert h.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == (0 if in_place else PRIVATE)
    for t, private in [(u.KVM_X86_SW_PROTECTED_VM, True), (u.KVM_X86_SNP_VM, True),
                       (u.KVM_X86_DEFAULT_VM, False), (u.KVM_X86_SEV_VM, False)]:
        vm = h.create_vm(t)
        assert vm.check_extension(cap) == (PRIVATE if in_place and private else 0)
        assert vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) == (PRIVATE if private and not in_place else 0)
        # b5ed1ee2a7a0: INIT_SHARED for CoCo VMs while in place
        flags = vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
        assert flags == (MMAP | INIT_SHARED if in_place or not private else MMAP)
        vm.close()
    # the capability does not exist before "next"
    assert gmem.Host(memory=1 << 30, kernel="7.2").check_extension(cap) == 0


def test_vm_ioctl_while_in_place():
    """v8: the VM's PRIVATE attribute is deprecated while in place (supported VM attributes 0):
    PRIVATE is EINVAL, clearing is a no-op."""
    c = Conv(gmem_flags=INIT_SHARED)
    with pytest.raises(OSError) as e:
        c.vm.set_memory_attributes(GPA, PG, PRIVATE)
    assert e.value.errno == errno.EINVAL and "guest_memfd attribute" in str(e.value)
    c.vm.set_memory_attributes(GPA, PG, 0)
    c.convert(0, True)
    assert c.vm.get_memory_attributes(GPA >> 12) == PRIVATE       # read through the gmem


def test_gmem_ioctl_while_per_vm():
    c = Conv(gmem_flags=0, gmem_in_place_conversion=False)
    with pytest.raises(OSError) as e:
        c.convert(0, False)
    assert e.value.errno == errno.ENOTTY
    with pytest.raises(OSError) as e:
        c.f.get_memory_attributes(0)
    assert e.value.errno == errno.ENOTTY
    c.vm.set_memory_attributes(GPA, PG, PRIVATE)                    # the legacy way works
    assert c.vm.get_memory_attributes(GPA >> 12) == PRIVATE
    h = gmem.Host(memory=1 << 30, platform="none", kernel="7.2")
    f = h.create_vm(u.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(PG, MMAP)
    with pytest.raises(OSError) as e:
        f.set_memory_attributes(0, PG, PRIVATE)
    assert e.value.errno == errno.ENOTTY


def test_every_gmem_slot_is_gmem_only_in_place():
    """2e646bcfcf90: shared faults come from the guest_memfd even without MMAP."""
    h = gmem.Host(memory=1 << 30, platform="none", kernel="next", gmem_in_place_conversion=True)
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(PG, INIT_SHARED)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, PG, HVA, f, 0)
    vcpu = vm.create_vcpu(0)
    r = vcpu.page_fault(GPA, u.PFERR_WRITE_MASK)
    assert r.ret == u.RET_PF_FIXED
    assert h.folio(r.pfn)["mapping"] == f.ino                      # the gmem page, not VMM memory
    h.check()


def test_deleted_memslot_reads_shared():
    """98fd6e30bd14: no memslot -> shared: the fault is emulated MMIO, not a memory-fault exit."""
    c = Conv()
    c.vm.set_user_memory_region2(1, 0, GPA, 0, 0)
    r = c.vcpu.page_fault(GPA, 0)
    assert r.ret == u.RET_PF_EMULATE and r.exit_reason == 0


# ------------------------------------------------------------------ hooks

def test_hooks_renamed_under_next():
    h = gmem.Host(memory=1 << 30, platform="none", kernel="next", gmem_in_place_conversion=True)
    calls = []
    h.register_hooks(u.KVM_X86_SW_PROTECTED_VM,
                     make_private=lambda vm, gfn, pfn, npages: calls.append(("mp", gfn, npages)) or 0,
                     gmem_make_shared=lambda host, pfn, npages: calls.append(("ms", npages)),
                     reclaim=lambda host, start, end: calls.append(("rc", end - start)))
    c = Conv(2, INIT_SHARED, host=h)
    c.guest_write(0, A)                     # shared: never made private
    assert calls == []
    c.convert(0, True, 2)
    c.guest_write(0, B)
    c.guest_write(1, B)
    assert calls == [("mp", GPA >> 12, 1), ("mp", (GPA >> 12) + 1, 1)]
    assert c.vm.stats["gmem_make_private"] == 2
    calls.clear()
    c.convert(0, False, 2)                  # per allocated folio run
    assert calls == [("ms", 1), ("ms", 1)]
    assert h.stats["gmem_make_shared"] == 2 and h.stats["gmem_make_shared_pages"] == 2
    calls.clear()
    c.f.punch_hole(0, 2 * PG)
    assert calls == [("rc", 1), ("rc", 1)] and h.stats["gmem_reclaim"] == 2


def test_old_and_new_names_reach_the_same_slot():
    h = gmem.Host(memory=1 << 30, platform="none", kernel="next", gmem_in_place_conversion=True)
    calls = []
    h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=lambda vm, gfn, pfn, order: calls.append(order) or 0)
    c = Conv(1, host=h)
    c.guest_write(0, A)
    assert calls == [0]                     # the old name, its old arguments
    with pytest.raises(ValueError, match="both its names"):
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=None, make_private=None)
    h7 = gmem.Host(memory=1 << 30, platform="none", kernel="7.2")
    seen = []
    h7.register_hooks(u.KVM_X86_SW_PROTECTED_VM, make_private=lambda vm, gfn, pfn, n: seen.append(n) or 0)
    vm = h7.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(PG)
    vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, GPA, PG, HVA, f, 0)
    vm.set_memory_attributes(GPA, PG, PRIVATE)
    vm.create_vcpu(0).page_fault(GPA, 0)
    assert seen == [1]                      # 7.2 calls it prepare; the new name gets npages


def test_snp_in_place_rmp():
    """SNP under "next": make_private (RMPUPDATE assigned) at the private fault only,
    make_shared (RMPUPDATE shared) at the conversion to shared, before the page is used shared."""
    h = gmem.Host(memory=1 << 30, platform="amd", kernel="next", gmem_in_place_conversion=True)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(4 * PG, MMAP | INIT_SHARED)          # INIT_SHARED: in place only
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 4 * PG, HVA, f, 0)
    vm.launch()
    vcpu = vm.create_vcpu(0) if 0 not in vm.vcpus else vm.vcpus[0]
    m = f.mmap(4 * PG)
    m[PG] = A
    r = vcpu.page_fault(PG, u.PFERR_WRITE_MASK)                     # shared: nothing to prepare
    assert r.ret == u.RET_PF_FIXED and vm.stats["gmem_make_private"] == 0
    assert not h.rmp.lookup(r.pfn).assigned
    f.set_memory_attributes(0, 4 * PG, PRIVATE)
    r = vcpu.page_fault(PG, u.PFERR_GUEST_ENC_MASK | u.PFERR_WRITE_MASK)
    assert r.ret == u.RET_PF_FIXED and vm.stats["gmem_make_private"] == 1
    e = h.rmp.lookup(r.pfn)
    assert e.assigned and e.gpa == PG
    h.check()
    f.set_memory_attributes(0, 4 * PG, 0)
    assert not h.rmp.lookup(r.pfn).assigned and h.stats["gmem_make_shared"] == 1
    m[PG] = B                                                       # the host may write it again
    h.check()


# ----------------------------------------------------- content modes (RFC v4/v5)

def _content(mode_host=True):
    c = Conv(2, INIT_SHARED, content_modes=mode_host)
    c.m[0:PG] = bytes(range(256)) * 16
    return c


def test_content_modes_sw_protected():
    c = _content()
    c.convert(0, True, 1, PRESERVE)
    assert c.vcpu.read(GPA, 16) == bytes(range(16))
    c.convert(0, False, 1, PRESERVE)
    assert c.m[0:16] == bytes(range(16))
    c.convert(0, True)                      # unspecified: SW_PROTECTED scrambles
    scrambled = c.vcpu.read(GPA, 16)
    assert scrambled != bytes(range(16)) and scrambled != bytes(16)
    c.convert(0, False, 1, ZERO)
    assert c.m[0:PG] == bytes(PG)
    c.host.check()


def test_content_mode_errors():
    c = _content()
    with pytest.raises(OSError) as e:
        c.convert(1, True, 1, ZERO)         # KVM cannot promise the guest zeros
    assert (e.value.errno, e.value.error_offset) == (errno.EOPNOTSUPP, PG)
    with pytest.raises(OSError) as e:
        c.convert(0, True, 1, ZERO | PRESERVE)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        c.convert(0, True, 1, 4)
    assert e.value.errno == errno.EINVAL
    assert c.f.get_memory_attributes(0) == 0
    # without the RFC's modes (v7 on): flags must be 0, contents are left alone
    d = _content(False)
    with pytest.raises(OSError) as e:
        d.convert(0, True, 1, PRESERVE)
    assert e.value.errno == errno.EINVAL
    d.convert(0, True)
    assert d.vcpu.read(GPA, 16) == bytes(range(16))


def test_content_modes_snp_masks():
    """SNP: ZERO; PRESERVE only to private before the launch finishes (argued, not agreed)."""
    h = gmem.Host(memory=1 << 30, platform="amd", kernel="next", gmem_in_place_conversion=True, content_modes=True)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(2 * PG, MMAP | INIT_SHARED)
    with pytest.raises(OSError) as e:
        f.set_memory_attributes(0, PG, 0, PRESERVE)
    assert e.value.errno == errno.EOPNOTSUPP
    f.set_memory_attributes(0, PG, PRIVATE, PRESERVE)
    f.set_memory_attributes(0, PG, 0, ZERO)


# ------------------------------------------------------------ state machine

N = 8


class InPlaceMachine(RuleBasedStateMachine):
    """Random conversions, pins, punches, host and guest accesses on a SW_PROTECTED VM under
    "next", against a reference: per page its attribute, its first byte, and the pins that
    hold the page the file has now (a punch hands the old page to its pins)."""

    @initialize(init_shared=st.booleans())
    def setup(self, init_shared):
        self.c = Conv(N, INIT_SHARED if init_shared else 0)
        self.private = [not init_shared] * N
        self.data = [0] * N
        self.pins = {}                      # pin -> set of pages it holds in the file
        self.live = []

    def _span(self, start, n):
        return range(start, min(N, start + n))

    @rule(start=st.integers(0, N - 1), n=st.integers(1, N), private=st.booleans())
    def convert(self, start, n, private):
        pages = self._span(start, n)
        pinned = sorted(p for p in pages if any(p in held for held in self.pins.values()))
        noop = all(self.private[p] == private for p in pages)
        try:
            self.c.convert(start, private, len(pages))
        except OSError as e:
            assert private and not noop and pinned, e
            assert (e.errno, e.error_offset) == (errno.EAGAIN, pinned[0] * PG)
            return
        assert noop or not private or not pinned, "shared->private succeeded over a pinned page"
        for p in pages:
            self.private[p] = private

    @rule(start=st.integers(0, N - 1), n=st.integers(1, 3), longterm=st.booleans())
    def pin(self, start, n, longterm):
        pages = self._span(start, n)
        try:
            p = self.c.m.pin(start * PG, len(pages) * PG, longterm=longterm)
        except OSError as e:
            assert e.errno == errno.EFAULT and any(self.private[q] for q in pages)
            return
        assert not any(self.private[q] for q in pages)
        self.pins[p] = set(pages)
        self.live.append(p)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        p = self.live.pop(i % len(self.live))
        p.release()
        del self.pins[p]

    @rule(start=st.integers(0, N - 1), n=st.integers(1, N))
    def punch(self, start, n):
        pages = self._span(start, n)
        self.c.f.punch_hole(start * PG, len(pages) * PG)
        for p in pages:
            self.data[p] = 0
        for held in self.pins.values():
            held.difference_update(pages)

    @rule(pg=st.integers(0, N - 1), v=st.integers(1, 255))
    def host_write(self, pg, v):
        try:
            self.c.host_write(pg, v)
        except gmem.SigBus:
            assert self.private[pg]
            return
        assert not self.private[pg]
        self.data[pg] = v

    @rule(pg=st.integers(0, N - 1))
    def host_read(self, pg):
        try:
            assert self.c.host_read(pg) == self.data[pg]
        except gmem.SigBus:
            assert self.private[pg]
            return
        assert not self.private[pg]

    @rule(pg=st.integers(0, N - 1), v=st.integers(0, 255), write=st.booleans())
    def guest_access(self, pg, v, write):
        if write:
            self.c.guest_write(pg, v)
            self.data[pg] = v
        else:
            assert self.c.guest_read(pg) == self.data[pg]

    @invariant()
    def consistent(self):
        self.c.host.check()
        for p in range(N):
            assert self.c.f.get_memory_attributes(p * PG) == (PRIVATE if self.private[p] else 0)

    def teardown(self):
        for p in self.live:
            p.release()


TestInPlaceMachine = InPlaceMachine.TestCase
TestInPlaceMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("name", sorted(__import__("gmem.scenario").scenario.BUILTIN))
def test_builtin_scenarios_under_next(name, in_place):
    """The VMM of the scenarios converts through the guest_memfd when in place (and keeps the
    page: no punch on conversion to shared), through the VM otherwise."""
    from gmem import scenario
    r = scenario.run(scenario.BUILTIN[name], options=dict(kernel="next", gmem_in_place_conversion=in_place),
                     name=name)
    assert r.status == "ok", r.error
    assert (r.host.stats["gmem_conversions"] > 0) == in_place
    r.host.check()
