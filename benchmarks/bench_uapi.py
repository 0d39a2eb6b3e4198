"""The uAPI on the model and on the real /dev/kvm in the same run: fallocate and punch of
1 GiB (per 4K page), memslot binding and attribute updates (per call)."""
import pytest

import gmem
from gmem import kernel, uapi

GIB = 1 << 30
PAGES = GIB >> 12
on_kernel = pytest.mark.skipif(not kernel.available(), reason="no /dev/kvm with guest_memfd on this machine")


def _model_host():
    return gmem.Host(memory=4 << 30, platform="none", sw_protected=False, memory_attributes=False)


def _gmem(host):
    vm = host.create_vm(uapi.KVM_X86_DEFAULT_VM)
    return vm, vm.create_guest_memfd(GIB)


def _allocate_then_punch(benchmark, record, host_factory, label):
    state = {}

    def setup():
        if "vm" in state:
            state["f"].close()
            state["vm"].close()
        state["vm"], state["f"] = _gmem(host_factory())
        return (state["f"],), {}

    def cycle(f):
        f.allocate(0, GIB)
        f.punch_hole(0, GIB)

    benchmark.pedantic(cycle, setup=setup, rounds=5, iterations=1)
    record(benchmark, 2 * PAGES, backend=label, per="4K page (allocate + punch)")
    state["f"].close()
    state["vm"].close()


@pytest.mark.benchmark(group="fallocate 1 GiB")
def test_allocate_punch_1g_model(benchmark, record):
    _allocate_then_punch(benchmark, record, _model_host, "model")


@on_kernel
@pytest.mark.benchmark(group="fallocate 1 GiB")
def test_allocate_punch_1g_kernel(benchmark, record):
    _allocate_then_punch(benchmark, record, kernel.Host, "kernel")


def _bind_unbind(benchmark, record, host, label, n=256):
    vm = host.create_vm(uapi.KVM_X86_DEFAULT_VM)
    f = vm.create_guest_memfd(n << 21)

    def cycle():
        for i in range(n):
            vm.set_user_memory_region2(i, uapi.KVM_MEM_GUEST_MEMFD, i << 21, 2 << 20, 0, f, i << 21)
        for i in range(n):
            vm.set_user_memory_region2(i, uapi.KVM_MEM_GUEST_MEMFD, i << 21, 0, 0, f, i << 21)

    benchmark.pedantic(cycle, rounds=5, iterations=1)
    record(benchmark, 2 * n, backend=label, per="KVM_SET_USER_MEMORY_REGION2 (bind or delete)")
    f.close()
    vm.close()


@pytest.mark.benchmark(group="memslot bind/unbind")
def test_memslot_bind_model(benchmark, record):
    _bind_unbind(benchmark, record, _model_host(), "model")


@on_kernel
@pytest.mark.benchmark(group="memslot bind/unbind")
def test_memslot_bind_kernel(benchmark, record):
    _bind_unbind(benchmark, record, kernel.Host(), "kernel")


@pytest.mark.benchmark(group="memory attributes")
@pytest.mark.parametrize("granule", [4096, 2 << 20])
def test_set_memory_attributes_model(benchmark, record, granule):
    """Alternate private/shared over 1 GiB mapped by one memslot, granule bytes per call
    (the kernel here has no KVM_SET_MEMORY_ATTRIBUTES: model only)."""
    host = gmem.Host(memory=4 << 30)
    vm = host.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(GIB)
    vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, GIB, 0x7F0000000000, f, 0)
    n = 1024
    flip = {"attr": uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE}

    def cycle():
        a = flip["attr"]
        for i in range(n):
            vm.set_memory_attributes(i * granule * 2, granule, a)
        flip["attr"] ^= uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE

    benchmark.pedantic(cycle, rounds=6, iterations=1)
    record(benchmark, n, backend="model", per=f"KVM_SET_MEMORY_ATTRIBUTES of {granule >> 10} KiB")
    host.check()
