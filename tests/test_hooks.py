"""Python hooks per VM type (issue 5, "A hook table per VM type"; API.md register_hooks).

A hook gets the kernel's arguments: gmem_prepare(vm, gfn, pfn, order) as
kvm_arch_gmem_prepare(kvm, gfn, pfn, max_order) (gfn first, then pfn; gfn and pfn of the
folio's first page), gmem_invalidate(host, start_pfn, end_pfn) as
kvm_arch_gmem_invalidate(start, end) from .free_folio, private_max_mapping_level(vm, pfn) with
the faulting page's pfn, is_private_fault(vm, gpa, error_code) with the exit's error code
(synthetic bits cleared).  The scalar and batch paths call them the same way.
"""
import errno

import numpy as np
import pytest

import gmem
from gmem import uapi as u

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ENC = u.PFERR_GUEST_ENC_MASK
HVA = 0x7F0000000000
MB2 = 2 << 20


class Recorder:
    def __init__(self, ret=None):
        self.calls = []
        self.ret = ret

    def __call__(self, *args):
        self.calls.append(args)
        return self.ret(*args) if callable(self.ret) else self.ret


def vm_with_slot(h, vm_type, size=8 << 20, private=True):
    vm = h.create_vm(vm_type)
    f = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, size, HVA, f, 0)
    if private:
        vm.set_memory_attributes(0, size, PRIVATE)
    return vm, f, vm.create_vcpu(0)


def strip_vm(calls, vm):
    out = []
    for c in calls:
        assert c[0] is vm
        out.append(c[1:])
    return out


class TestExistingType:
    def test_sw_protected_prepare_and_invalidate(self):
        h = gmem.Host(memory=256 << 20, huge_folios=True, kernel="6.18")    # prepared once
        prep, inval = Recorder(0), Recorder()
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=prep, gmem_invalidate=inval)
        vm, f, v = vm_with_slot(h, u.KVM_X86_SW_PROTECTED_VM, size=4 << 20)
        f2 = vm.create_guest_memfd(MB2)
        vm.set_user_memory_region2(1, u.KVM_MEM_GUEST_MEMFD, 0x1000000 + 0x3000, 0x10000, HVA + (8 << 20), f2, 0)
        vm.set_memory_attributes(0x1000000, 0x20000, PRIVATE)
        r = v.page_fault(MB2 + 0x5000, u.PFERR_WRITE_MASK)        # attributes say private
        assert (r.ret, r.level) == (u.RET_PF_FIXED, u.PG_LEVEL_2M)
        # the folio's first gfn and pfn, and its order
        assert strip_vm(prep.calls, vm) == [(0x200, r.pfn, 9)]
        # a slot whose gfns are not congruent with the file's indices mod 512: the 2M folio
        # cannot be one page of this guest, so it is split first and the hook gets 4K
        r2 = v.page_fault(0x1000000 + 0x3000 + 0x2000, 0)
        assert r2.level == u.PG_LEVEL_4K
        assert strip_vm(prep.calls, vm)[1] == (0x1005, r2.pfn, 0)
        assert vm.stats["gmem_prepare"] == 2
        h.check()
        # prepared once (gmem tracks it): a second fault in the folio does not call the hook
        vm.set_memory_attributes(MB2, 4096, 0)
        vm.set_memory_attributes(MB2, 4096, PRIVATE)
        assert v.page_fault(MB2 + 0x5000, 0).ret == u.RET_PF_FIXED
        assert len(prep.calls) == 2
        # freeing: (host, start_pfn, end_pfn) of the whole folio, from .free_folio
        f.punch_hole(MB2, MB2)
        assert inval.calls == [(h, r.pfn, r.pfn + 512)]
        f2.close()
        head = r2.pfn - 2           # index 2 of the split folio
        assert sorted(inval.calls[1:]) == [(h, p, p + 1) for p in range(head, head + 512)]
        assert h.stats["gmem_invalidate"] == len(inval.calls)
        h.check()

    def test_scalar_and_batch_pass_the_same_arguments(self):
        def run(batch):
            h = gmem.Host(memory=256 << 20)
            prep, lvl, priv = Recorder(0), Recorder(u.PG_LEVEL_4K), Recorder(lambda vm, gpa, ec: bool(ec & ENC))
            h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=prep,
                             private_max_mapping_level=lvl, is_private_fault=priv)
            vm, f, v = vm_with_slot(h, u.KVM_X86_SW_PROTECTED_VM)
            gpas = [0x1000, 0x3000, MB2, MB2 + 0x1000, 0x5000]
            ecs = [ENC | 2, ENC, ENC | u.PFERR_PRIVATE_ACCESS, 0, ENC]
            if batch:
                out = vm.page_fault_batch(gpas, ecs)
                rets = [(int(o["ret"]), int(o["exit_reason"]), int(o["pfn"])) for o in out]
            else:
                rets = []
                for g, e in zip(gpas, ecs):
                    r = v.page_fault(g, e)
                    rets.append((r.ret, r.exit_reason, r.pfn if r.ret > 0 else 0))
            h.check()
            return (strip_vm(prep.calls, vm), strip_vm(lvl.calls, vm), strip_vm(priv.calls, vm), rets,
                    vm.stats["gmem_prepare"])

        scalar, batch = run(False), run(True)
        assert scalar == batch
        prep, lvl, priv, rets, n = scalar
        # is_private_fault sees the error code with the synthetic PRIVATE_ACCESS bit cleared
        assert priv == [(0x1000, ENC | 2), (0x3000, ENC), (MB2, ENC), (MB2 + 0x1000, 0), (0x5000, ENC)]
        assert [r[0] for r in rets] == [u.RET_PF_FIXED] * 3 + [-errno.EFAULT, u.RET_PF_FIXED]
        assert [g for g, p, o in prep] == [1, 3, 0x200, 5] and n == 4
        # no huge folios here: 4K folios never ask for a level; with 2M ones it is asked
        assert lvl == []


class TestNewType:
    def test_new_vm_type_7(self):
        h = gmem.Host(memory=256 << 20, huge_folios=True)
        with pytest.raises(OSError) as e:
            h.create_vm(7)
        assert e.value.errno == errno.EINVAL
        priv = Recorder(lambda vm, gpa, ec: bool(ec & ENC))
        lvl = Recorder(lambda vm, pfn: u.PG_LEVEL_4K if pfn & 0x200 else u.PG_LEVEL_2M)
        h.register_hooks(7, is_private_fault=priv, private_max_mapping_level=lvl)
        assert h.vm_types >> 7 & 1
        assert h.check_extension(u.KVM_CAP_VM_TYPES) >> 7 & 1
        vm, f, v = vm_with_slot(h, 7, size=8 << 20)
        assert vm.vm_type == 7 and vm.has_private_mem
        out = vm.page_fault_batch([0x3000, MB2 + 0x3000, 0x5000], [ENC | 2, ENC | 2, 2])
        r0 = v.page_fault(3 * MB2 + 0x7000, ENC)
        calls = strip_vm(priv.calls, vm)
        assert calls == [(0x3000, ENC | 2), (MB2 + 0x3000, ENC | 2), (0x5000, 2), (3 * MB2 + 0x7000, ENC)]
        # a private fault in each 2M folio asks for the level with the faulting page's pfn
        pfns = [int(out["pfn"][0]), int(out["pfn"][1]), r0.pfn]
        assert [int(x) for x in out["ret"]] == [u.RET_PF_FIXED, u.RET_PF_FIXED, -errno.EFAULT]
        levels = [int(out["level"][0]), int(out["level"][1]), r0.level]
        asked = [c[0] for c in strip_vm(lvl.calls, vm)]
        assert len(asked) == 3
        for pfn, level, pfn_asked in zip(pfns, levels, asked):
            assert pfn == pfn_asked & ~(0x1FF if level == u.PG_LEVEL_2M else 0)
        # the level is asked with the pfn of the page faulted, and obeyed
        for gpa, level, pfn_asked in zip((0x3000, MB2 + 0x3000, 3 * MB2 + 0x7000), levels, asked):
            want = u.PG_LEVEL_4K if pfn_asked & 0x200 else u.PG_LEVEL_2M
            assert level == want
            assert pfn_asked & 0x1FF == (gpa >> 12) & 0x1FF
        h.check()
        # another host knows nothing of type 7
        with pytest.raises(OSError):
            gmem.Host(memory=64 << 20).create_vm(7)

    def test_bad_registrations(self):
        h = gmem.Host(memory=64 << 20)
        with pytest.raises(ValueError):
            h.register_hooks(32, gmem_prepare=Recorder(0))
        with pytest.raises(ValueError):
            h.register_hooks(1, gmem_prepares=Recorder(0))
        with pytest.raises(TypeError):
            h.register_hooks(1, gmem_prepare=5)


class TestFailures:
    def test_raising_hook_propagates_at_the_call_boundary(self):
        class Boom(Exception):
            pass

        def bad(vm, gfn, pfn, order):
            raise Boom(gfn)

        h = gmem.Host(memory=256 << 20)
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=bad)
        vm, f, v = vm_with_slot(h, u.KVM_X86_SW_PROTECTED_VM)
        with pytest.raises(Boom):
            v.page_fault(0x3000, 0)
        assert vm.sptes() == [] and h.stats["hook_errors"] == 1
        h.check()
        with pytest.raises(Boom):
            vm.page_fault_batch([0x4000, 0x5000, 0x6000], [0, 0, 0])
        # the batch stops at the failing fault: nothing after it ran
        assert h.stats["hook_errors"] == 2 and vm.sptes() == []
        h.check()
        # the exception is not left behind for the next call
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=None)
        assert v.page_fault(0x3000, 0).ret == u.RET_PF_FIXED
        h.check()

    def test_raising_invalidate_and_private_fault_hooks(self):
        h = gmem.Host(memory=256 << 20)

        def bad_inval(host, start, end):
            raise KeyError("inval")

        def bad_priv(vm, gpa, ec):
            raise ZeroDivisionError

        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_invalidate=bad_inval)
        vm, f, v = vm_with_slot(h, u.KVM_X86_SW_PROTECTED_VM)
        assert v.page_fault(0x3000, 0).ret == u.RET_PF_FIXED
        with pytest.raises(KeyError):
            f.punch_hole(0x3000, 4096)
        assert vm.sptes() == []                      # the punch itself completed
        h.check()
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, is_private_fault=bad_priv)
        with pytest.raises(ZeroDivisionError):
            v.page_fault(0x3000, 0)
        with pytest.raises(ZeroDivisionError):
            vm.page_fault_batch([0x3000], [0])
        h.check()

    @pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, 133])
    def test_prepare_errno_becomes_a_memory_fault_exit(self, err):
        h = gmem.Host(memory=256 << 20)
        fail = [True]
        prep = Recorder(lambda vm, gfn, pfn, order: -err if fail[0] else 0)
        h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=prep)
        vm, f, v = vm_with_slot(h, u.KVM_X86_SW_PROTECTED_VM)
        r = v.page_fault(0x3000, u.PFERR_WRITE_MASK)
        assert (r.ret, r.exit_reason) == (-err, u.KVM_EXIT_MEMORY_FAULT)
        assert r.memory_fault == (u.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x3000, 4096)
        out = vm.page_fault_batch([0x3000], [u.PFERR_WRITE_MASK])
        assert (int(out["ret"][0]), int(out["exit_reason"][0])) == (-err, u.KVM_EXIT_MEMORY_FAULT)
        assert vm.stats["gmem_prepare_failed"] == 2 and vm.sptes() == []
        h.check()
        # a failed prepare does not mark the folio prepared: it is asked again
        fail[0] = False
        assert v.page_fault(0x3000, u.PFERR_WRITE_MASK).ret == u.RET_PF_FIXED
        assert len(prep.calls) == 3
        h.check()


class TestRestore:
    def test_snp_prepare_replaced_then_restored(self):
        h = gmem.Host(memory=256 << 20)
        prep = Recorder(0)
        h.register_hooks(u.KVM_X86_SNP_VM, gmem_prepare=prep)
        vm, f, v = vm_with_slot(h, u.KVM_X86_SNP_VM)
        r = v.page_fault(0x3000, ENC | 2)
        assert r.ret == u.RET_PF_FIXED and strip_vm(prep.calls, vm) == [(3, r.pfn, 0)]
        # the Python hook did not RMPUPDATE: the private mapping has no RMP entry (INV-2)
        assert h.rmp.assigned() == []
        with pytest.raises(gmem.InvariantError, match="private SPTE gfn 0x3"):
            h.check()
        vm.set_memory_attributes(0x3000, 4096, 0)
        f.punch_hole(0x3000, 4096)
        h.check()
        h.register_hooks(u.KVM_X86_SNP_VM, gmem_prepare=None)     # the native sev_gmem_prepare
        vm.set_memory_attributes(0x3000, 4096, PRIVATE)
        r = v.page_fault(0x3000, ENC | 2)
        assert h.rmp.lookup(r.pfn) == gmem.RmpEntry(True, 0, False, False, vm.asid, 0x3000, False)
        assert len(prep.calls) == 1
        h.check()

    def test_wrapping_the_native_hook(self):
        """A Python hook can count and still leave the work to... itself: here it refuses
        2M mappings on SNP by answering the level, while the native prepare stays."""
        h = gmem.Host(memory=256 << 20, huge_folios=True)
        lvl = Recorder(u.PG_LEVEL_4K)
        h.register_hooks(u.KVM_X86_SNP_VM, private_max_mapping_level=lvl)
        vm, f, v = vm_with_slot(h, u.KVM_X86_SNP_VM)
        r = v.page_fault(MB2 + 0x4000, ENC | 2)
        assert r.level == u.PG_LEVEL_4K and h.rmp.level(r.pfn) == u.PG_LEVEL_2M
        assert strip_vm(lvl.calls, vm) == [(r.pfn,)]
        h.check()
        h.register_hooks(u.KVM_X86_SNP_VM, private_max_mapping_level=None)
        r = v.page_fault(0x4000, ENC | 2)
        assert r.level == u.PG_LEVEL_2M and len(lvl.calls) == 1
        h.check()

    def test_hooks_are_per_host(self):
        a, b = gmem.Host(memory=64 << 20), gmem.Host(memory=64 << 20)
        prep = Recorder(0)
        a.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_prepare=prep)
        vm, f, v = vm_with_slot(b, u.KVM_X86_SW_PROTECTED_VM, size=MB2)
        assert v.page_fault(0x1000, 0).ret == u.RET_PF_FIXED and prep.calls == []
        assert vm.stats["gmem_prepare"] == 0                     # SW_PROTECTED has no native prepare
        b.check()


def test_cyclic_garbage_with_a_python_hook():
    """host -> hook -> guest_memfd -> inode -> host: the cyclic GC frees it all. The inode's
    eviction frees folios into its host (kept alive for it) and skips a Python hook the GC
    has already let go of (it used to call the half-freed callable: a segfault)."""
    import gc
    calls = []
    for _ in range(50):
        host = gmem.Host(memory=64 << 20)
        vm = host.create_vm(u.KVM_X86_SW_PROTECTED_VM)
        f = vm.create_guest_memfd(2 << 20)
        f.allocate(0, 2 << 20)
        host.register_hooks(u.KVM_X86_SW_PROTECTED_VM,
                            gmem_invalidate=lambda h, s, e, f=f: calls.append(e - s))
        del host, vm, f
        gc.collect()
    assert set(calls) <= {1, 512}
