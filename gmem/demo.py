"""The default scenario of `gmem demo`."""
from gmem import PhysMem, XArray


def run(plot=False, out=None):
    mem = PhysMem(64 << 30)
    print(f"host: {mem.nr_pages} pages of 4 KiB ({mem.nr_pages >> 18} GiB), "
          f"{mem.memory_bytes} bytes of metadata")
    huge = mem.folio_alloc(9)
    small = [mem.folio_alloc(0) for _ in range(8)]
    print(f"allocated a 2M folio at pfn {huge:#x} and 8 4K folios at {small[0]:#x}..{small[-1]:#x}")
    mem.folio_split(huge, 0)
    print(f"split the 2M folio: {mem.nr_folios} folios")
    for pfn in small + [huge + i for i in range(512)]:
        mem.folio_put(pfn)
    mem.check()
    print(f"freed everything: {mem.nr_free_pages} free pages, 1G blocks free: {mem.free_blocks()[18]}")

    xa = XArray()
    xa.store(0, 1, order=9)
    xa.store_range(512, 4095, 2)
    print(f"xarray: {len(xa)} entries over {xa.nr_indices} indices in {xa.memory_bytes} bytes")
    xa.split(0, 0)
    print(f"after splitting the order-9 entry: {len(xa)} entries, {xa.memory_bytes} bytes")
    xa.check()
    return 0
