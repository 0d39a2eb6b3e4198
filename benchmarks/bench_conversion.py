"""Conversion cost per kernel version: shared -> private -> shared over 4K and 2M ranges of a
SW_PROTECTED VM's 64 MiB guest_memfd memslot, every page allocated, none mapped. rfc-2023, 6.18
and 7.2 convert with KVM_SET_MEMORY_ATTRIBUTES on the VM fd (the VM's attribute XArray, the
hugepage mixed flags); "next" with KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd (the inode's
maple tree, and on the way to private the unmap + reference check of every folio in range)."""
import pytest

import gmem
from gmem import uapi

SIZE = 64 << 20
GPA = 4 << 30
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
KERNELS = ["rfc-2023", "6.18", "7.2", "next"]


def _setup(kernel):
    host = gmem.Host(memory=1 << 30, platform="none", kernel=kernel)
    vm = host.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    flags = uapi.GUEST_MEMFD_FLAG_INIT_SHARED if kernel == "next" else 0
    f = vm.create_guest_memfd(SIZE, flags)
    vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GPA, SIZE, 0x7F0000000000, f, 0)
    f.allocate(0, SIZE)
    if kernel == "next":
        return host, lambda off, size, attrs: f.set_memory_attributes(off, size, attrs)
    return host, lambda off, size, attrs: vm.set_memory_attributes(GPA + off, size, attrs)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("step", [4096, 2 << 20], ids=["4K", "2M"])
def test_conversions(benchmark, record, kernel, step):
    host, convert = _setup(kernel)
    n = min(SIZE // step, 1024)

    def cycle():
        for i in range(n):
            convert(i * step, step, PRIVATE)
        for i in range(n):
            convert(i * step, step, 0)

    benchmark.group = f"conversions {'4K' if step == 4096 else '2M'}"
    benchmark.pedantic(cycle, rounds=5, iterations=1)
    record(benchmark, 2 * n, kernel=kernel, per="conversion")
    if benchmark.stats is not None:
        benchmark.extra_info["conversions_per_s"] = round(2 * n / benchmark.stats.stats.min)
    host.check()
