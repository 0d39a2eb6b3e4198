"""A pure-Python reference of the x86 TDP fault path with guest_memfd (not shipped).

It re-states arch/x86/kvm/mmu/mmu.c (kvm_mmu_page_fault -> kvm_mmu_do_page_fault ->
kvm_tdp_mmu_page_fault -> kvm_mmu_faultin_pfn -> kvm_mmu_hugepage_adjust ->
kvm_tdp_mmu_map) with dicts, in the order of arch/x86/kvm/mmu/mmu.c
(kvm_mmu_page_fault -> kvm_mmu_do_page_fault -> kvm_tdp_page_fault), so that it can be read
against the kernel line by line.  The Cython core is checked
against it (tests/test_fault_path.py) and measured against it (benchmarks/bench_fault.py).

State, all plain dicts:
  memslots      slot id -> Slot
  attributes    gfn -> attributes (absent = 0)
  gmem folios   per file: head index -> Folio(order, page ids)
  SPTEs         first gfn -> Spte(level, page id, writable, private)
  MMIO SPTEs    gfn -> memslot generation when installed

Pages are named by page ids that are never reused (the allocator's pfns are): a
comparison treats pfns up to renaming (the same gmem page <-> the same pfn).

What is modelled, by VM type: who decides private/shared (DEFAULT/SEV/SEV-ES: never;
SW_PROTECTED: the attributes, except RSVD faults; SNP: PFERR_GUEST_ENC; TDX: no shared
bit 51 in the gpa), the TDX shared-bit alias and its 4K private limit.  Not modelled:
the RMP, the S-EPT, PSMASH, dirty logging, gmem-only (mmap) slots.
"""
import errno
from collections import Counter
from dataclasses import dataclass

from gmem import uapi as U

PAGE_SHIFT = 12
MMAP_MIN_ADDR = 65536
HPAGE_ORDER = 9
EFAULT, EIO = 14, 5
TDX_SHARED_GFN = 1 << (51 - PAGE_SHIFT)

# the counters the reference keeps, by KVM's names (vcpu) and the pages_* of the VM
VCPU_COUNTERS = ("pf_taken", "pf_fixed", "pf_spurious", "pf_emulate", "pf_fast", "pf_retry",
                 "memory_fault_exits", "synthetic_error_bits_cleared")
VM_COUNTERS = ("pages_4k", "pages_2m", "pages_1g")


def level_order(level):
    return (level - 1) * 9          # KVM_HPAGE_GFN_SHIFT


def level_for_order(order):
    """kvm_max_level_for_order."""
    return 3 if order >= 18 else 2 if order >= 9 else 1


@dataclass
class Result:
    ret: int
    exit_reason: int = 0
    memory_fault: tuple = None      # (flags, gpa, size)
    level: int = 0
    page: object = None             # page id when mapped


@dataclass
class Slot:
    base_gfn: int
    npages: int
    flags: int
    hva: int
    gmem: object                    # RefGmem or None (unbound, or its file was closed)
    pgoff: int


@dataclass
class Folio:
    order: int
    pages: list                     # page ids, one per 4K page


@dataclass(frozen=True)
class Spte:
    level: int
    page: object
    writable: bool
    private: bool


class RefHost:
    def __init__(self, huge_folios=False):
        self.huge_folios = huge_folios
        self.user_pages = {}        # hva >> 12 -> page id (the VMM's memory; never freed)
        self.freed = []             # page ids given back to the allocator (for renaming)
        self._next_page = 0

    def new_page(self, kind):
        self._next_page += 1
        return (kind, self._next_page)

    def create_vm(self, vm_type):
        return RefVm(self, vm_type)


class RefGmem:
    def __init__(self, host, vm, size):
        self.host, self.vm, self.size = host, vm, size
        self.folios = {}            # head index -> Folio
        self.closed = False

    # ----------------------------------------------------- the filemap
    def folio_at(self, index):
        """(head, Folio) of the folio holding index: folios are 4K or 2M, 2M ones aligned."""
        for order in (0, HPAGE_ORDER):
            head = index & ~((1 << order) - 1)
            f = self.folios.get(head)
            if f is not None and index < head + (1 << f.order):
                return head, f
        return None, None

    def get_folio(self, index):
        """kvm_gmem_get_folio: the folio at index, allocated if absent (2M when huge_folios
        allows: an aligned 2M range inside i_size with no folio in it)."""
        head, f = self.folio_at(index)
        if f is not None:
            return head, f
        order = 0
        if self.host.huge_folios:
            base = index & ~((1 << HPAGE_ORDER) - 1)
            if (base + (1 << HPAGE_ORDER) <= self.size >> PAGE_SHIFT and
                    not any(base + k in self.folios for k in range(1 << HPAGE_ORDER))):
                order = HPAGE_ORDER
        head = index & ~((1 << order) - 1)
        f = Folio(order, [self.host.new_page("gmem") for _ in range(1 << order)])
        self.folios[head] = f
        return head, f

    def truncate(self, start, end):
        """truncate_inode_pages_range: free folios inside [start, end), split those sticking out."""
        for head in sorted(self.folios):
            f = self.folios[head]
            last = head + (1 << f.order)
            if last <= start or head >= end:
                continue
            if head < start or last > end:           # split into 4K folios (pages keep their pfn)
                del self.folios[head]
                for k, page in enumerate(f.pages):
                    self.folios[head + k] = Folio(0, [page])
        for head in sorted(self.folios):
            if start <= head < end:
                self.host.freed.extend(self.folios.pop(head).pages)

    # --------------------------------------------------- file operations
    def allocate(self, offset, length):
        """fallocate(KEEP_SIZE) inside i_size (prepare at fault: nothing else happens)."""
        assert offset + length <= self.size
        index = offset >> PAGE_SHIFT
        while index < (offset + length) >> PAGE_SHIFT:
            head, f = self.get_folio(index)
            index = head + (1 << f.order)

    def bound_slots(self):
        return [s for s in self.vm.slots.values() if s.gmem is self]

    def punch_hole(self, offset, length):
        """kvm_gmem_punch_hole: zap the bound gfns (KVM_FILTER_PRIVATE), then truncate."""
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        for s in self.bound_slots():
            lo, hi = max(start, s.pgoff), min(end, s.pgoff + s.npages)
            if lo < hi:
                self.vm.zap(s.base_gfn + lo - s.pgoff, s.base_gfn + hi - s.pgoff, "private")
        self.truncate(start, end)

    def close(self):
        """kvm_gmem_release (last reference): zap each bound slot whole, the slots go dead,
        and the inode is evicted (every folio freed)."""
        for s in self.bound_slots():
            self.vm.zap(s.base_gfn, s.base_gfn + s.npages, "private")
            s.gmem = None
        self.closed = True
        self.truncate(0, 1 << 64)


class RefVm:
    def __init__(self, host, vm_type):
        self.host, self.vm_type = host, vm_type
        self.has_private_mem = vm_type in (U.KVM_X86_SW_PROTECTED_VM, U.KVM_X86_SNP_VM,
                                           U.KVM_X86_TDX_VM)
        self.gfn_direct_bits = TDX_SHARED_GFN if vm_type == U.KVM_X86_TDX_VM else 0
        self.slots = {}
        self.attributes = {}
        self.sptes = {}
        self.mmio = {}
        self.memslot_generation = 0
        self.inject = None
        self.vcpu_stats = {}

    def stats(self, vcpu_id):
        st = self.vcpu_stats.get(vcpu_id)
        if st is None:
            st = self.vcpu_stats[vcpu_id] = Counter()
        return st

    @property
    def vm_stats(self):
        levels = Counter(s.level for s in self.sptes.values())
        return {"pages_4k": levels[1], "pages_2m": levels[2], "pages_1g": levels[3]}

    # --------------------------------------------------------- memslots
    def create_guest_memfd(self, size):
        return RefGmem(self.host, self, size)

    def set_user_memory_region2(self, slot, flags, gpa, size, hva=0, gmem=None, offset=0):
        """Create (size > 0) or delete (size == 0) a memslot; the caller keeps them valid."""
        self.memslot_generation += 1      # every MMIO SPTE is stale from now on
        if size == 0:
            s = self.slots.pop(slot)
            self.zap(s.base_gfn, s.base_gfn + s.npages, "all")   # kvm_arch_flush_shadow_memslot
            return
        assert slot not in self.slots
        self.slots[slot] = Slot(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, flags, hva,
                                gmem if flags & U.KVM_MEM_GUEST_MEMFD else None, offset >> PAGE_SHIFT)

    def slot_of(self, gfn):
        for s in self.slots.values():
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        return None

    # ------------------------------------------------------- attributes
    def is_private_gfn(self, gfn):
        return bool(self.attributes.get(gfn, 0) & U.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def set_memory_attributes(self, address, size, attributes):
        """kvm_vm_set_mem_attributes: nothing if the range has them already; else zap the
        opposite kind in every overlapping memslot, then store."""
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        if all(self.attributes.get(g, 0) == attributes for g in range(start, end)):
            return
        kind = "shared" if attributes & U.KVM_MEMORY_ATTRIBUTE_PRIVATE else "private"
        for s in self.slots.values():
            lo, hi = max(start, s.base_gfn), min(end, s.base_gfn + s.npages)
            if lo < hi:
                self.zap(lo, hi, kind)
        for g in range(start, end):
            if attributes:
                self.attributes[g] = attributes
            else:
                self.attributes.pop(g, None)

    # ----------------------------------------------------------- SPTEs
    def spte_at(self, gfn):
        """The SPTE covering gfn: (first gfn, Spte) or (None, None)."""
        for level in (3, 2, 1):
            first = gfn & ~((1 << level_order(level)) - 1)
            s = self.sptes.get(first)
            if s is not None and s.level == level:
                return first, s
        return None, None

    def zap(self, start, end, kind):
        """kvm_unmap_gfn_range: every SPTE overlapping [start, end) of that kind, huge ones whole.
        Only TDX has two roots (mirror: private, direct: shared and MMIO); elsewhere the one
        direct root is zapped whatever the filter (kvm_gfn_range_filter_to_root_types)."""
        if self.vm_type != U.KVM_X86_TDX_VM:
            kind = "all"
        for first, s in list(self.sptes.items()):
            if first < end and start < first + (1 << level_order(s.level)):
                if kind == "all" or (kind == "private") == s.private:
                    del self.sptes[first]
        if kind != "private":
            for g in [g for g in self.mmio if start <= g < end]:
                del self.mmio[g]

    def inject_invalidation(self, gpa, size):
        self.inject = (gpa >> PAGE_SHIFT, (gpa + size + 4095) >> PAGE_SHIFT)

    # ------------------------------------------------------- the fault
    def is_private_fault(self, gpa, error_code):
        """Who sets PFERR_PRIVATE_ACCESS (§2.1-§2.2)."""
        t = self.vm_type
        if t == U.KVM_X86_SW_PROTECTED_VM:
            return not error_code & U.PFERR_RSVD_MASK and self.is_private_gfn(gpa >> PAGE_SHIFT)
        if t == U.KVM_X86_SNP_VM:
            return bool(error_code & U.PFERR_GUEST_ENC_MASK)
        if t == U.KVM_X86_TDX_VM:
            return not (gpa >> PAGE_SHIFT) & self.gfn_direct_bits
        return False

    def page_fault(self, vcpu_id, gpa, error_code):
        """kvm_mmu_page_fault (§2.3), with the vendor entry (§2.1) in front of it."""
        st = self.stats(vcpu_id)
        if error_code & U.PFERR_SYNTHETIC_MASK:          # WARN_ON_ONCE, then cleared
            st["synthetic_error_bits_cleared"] += 1
            error_code &= ~U.PFERR_SYNTHETIC_MASK
        private = self.is_private_fault(gpa, error_code)
        if private and self.vm_type == U.KVM_X86_TDX_VM:
            # tdx_handle_ept_violation: a private access is a write (and GUEST_FINAL/PAGE kept)
            error_code = (error_code & (U.PFERR_GUEST_FINAL_MASK | U.PFERR_GUEST_PAGE_MASK)) | \
                U.PFERR_WRITE_MASK
        elif self.vm_type == U.KVM_X86_TDX_VM and error_code & U.PFERR_FETCH_MASK:
            return Result(-EIO)                          # a TD fetching from shared memory: KVM_BUG_ON
        gfn = (gpa >> PAGE_SHIFT) & ~self.gfn_direct_bits
        r = None
        if error_code & U.PFERR_RSVD_MASK:
            if private:
                return Result(-EFAULT)                   # WARN_ON_ONCE: no exit prepared
            # handle_mmio_page_fault
            if gfn not in self.mmio:
                r = Result(U.RET_PF_RETRY)               # the SPTE was zapped: fault again
            elif self.mmio[gfn] == self.memslot_generation:
                return Result(U.RET_PF_EMULATE)          # goto emulate: no stats
            # else: a stale generation takes the slow path
        if r is None:
            st["pf_taken"] += 1
            r = self.do_page_fault(st, gpa, gfn, error_code, private)
            if private and self.vm_type == U.KVM_X86_TDX_VM:
                while r.ret == U.RET_PF_RETRY:           # TDX retries private faults in KVM
                    st["pf_retry"] += 1
                    st["pf_taken"] += 1
                    r = self.do_page_fault(st, gpa, gfn, error_code, private)
        name = {U.RET_PF_FIXED: "pf_fixed", U.RET_PF_SPURIOUS: "pf_spurious",
                U.RET_PF_EMULATE: "pf_emulate", U.RET_PF_RETRY: "pf_retry"}.get(r.ret)
        if name:
            st[name] += 1
        return r

    def memory_fault_exit(self, st, gfn, private, ret=-EFAULT):
        """kvm_mmu_prepare_memory_fault_exit (§2.9): the gfn without the shared bit, one page,
        PRIVATE iff the access was private."""
        st["memory_fault_exits"] += 1
        flags = U.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
        return Result(ret, U.KVM_EXIT_MEMORY_FAULT, (flags, gfn << PAGE_SHIFT, 4096))

    def do_page_fault(self, st, gpa, gfn, error_code, private):
        """kvm_mmu_do_page_fault (§2.4): the TDP fault, and no emulation of private memory."""
        r = self.tdp_page_fault(st, gfn, error_code, private)
        if r.ret == U.RET_PF_EMULATE and private:
            return self.memory_fault_exit(st, gfn, private)
        return r

    def tdp_page_fault(self, st, gfn, error_code, private):
        """kvm_tdp_mmu_page_fault (§2.5)."""
        write = bool(error_code & U.PFERR_WRITE_MASK)
        # page_fault_can_be_fast + fast_page_fault
        if (not error_code & U.PFERR_RSVD_MASK
                and not (self.has_private_mem and private != self.is_private_gfn(gfn))
                and error_code & U.PFERR_PRESENT_MASK and write
                and not (self.vm_type == U.KVM_X86_TDX_VM and private)):
            first, s = self.spte_at(gfn)
            if s is not None and (s.writable or not write):
                st["pf_fast"] += 1
                return Result(U.RET_PF_SPURIOUS, level=s.level, page=s.page)
        # kvm_mmu_faultin_pfn (§2.6)
        if private != self.is_private_gfn(gfn):
            return self.memory_fault_exit(st, gfn, private)
        slot = self.slot_of(gfn)
        if slot is None:                                  # kvm_handle_noslot_fault
            if private:
                return self.memory_fault_exit(st, gfn, private)
            self.mmio[gfn] = self.memslot_generation      # an MMIO SPTE, then emulate
            return Result(U.RET_PF_EMULATE)
        if private:                                       # kvm_mmu_faultin_pfn_gmem (§2.7)
            if not slot.flags & U.KVM_MEM_GUEST_MEMFD:
                return self.memory_fault_exit(st, gfn, private)
            if slot.gmem is None:                         # kvm_gmem_get_pfn: no file
                return self.memory_fault_exit(st, gfn, private)
            index = gfn - slot.base_gfn + slot.pgoff
            head, folio = slot.gmem.get_folio(index)
            page = folio.pages[index - head]
            max_order = folio.order if not (gfn ^ index) & ((1 << folio.order) - 1) else 0
            max_level, writable = level_for_order(max_order), True
        else:                                             # __kvm_faultin_pfn: the hva
            if write and slot.flags & U.KVM_MEM_READONLY:
                return Result(U.RET_PF_EMULATE)           # KVM_PFN_ERR_RO_FAULT
            hva = slot.hva + ((gfn - slot.base_gfn) << PAGE_SHIFT)
            if hva < MMAP_MIN_ADDR:                       # kvm_handle_error_pfn: -EFAULT,
                return Result(-errno.EFAULT)              # and no memory-fault exit
            page = self.host.user_pages.get(hva >> PAGE_SHIFT)
            if page is None:                              # the VMM's page, at first touch
                page = self.host.user_pages[hva >> PAGE_SHIFT] = self.host.new_page("user")
            max_level, writable = 1, not slot.flags & U.KVM_MEM_READONLY
        level = self.hugepage_adjust(slot, gfn, private, max_level)
        if self.inject is not None:                       # an invalidation lands here
            start, end = self.inject
            self.inject = None
            self.zap(start, end, "all")
            return Result(U.RET_PF_RETRY)                 # is_page_fault_stale
        if level > 1:                                     # the head page of the huge mapping
            index = (gfn & ~((1 << level_order(level)) - 1)) - slot.base_gfn + slot.pgoff
            page = slot.gmem.folio_at(index)[1].pages[0]
        return self.tdp_mmu_map(gfn, Spte(level, page, writable, private))

    def hugepage_adjust(self, slot, gfn, private, max_level):
        """goal = min(folio order level, lpage_info (slot edges, mixed attributes), vendor)."""
        level = min(max_level, 3)
        while level > 1 and self.lpage_disallowed(slot, gfn, level):
            level -= 1
        if level > 1 and private and self.vm_type == U.KVM_X86_TDX_VM:
            level = 1                                     # tdx_gmem_private_max_mapping_level
        return level

    def lpage_disallowed(self, slot, gfn, level):
        n = 1 << level_order(level)
        first = gfn & ~(n - 1)
        if first < slot.base_gfn or first + n > slot.base_gfn + slot.npages:
            return True                                   # a misaligned slot edge
        if (slot.base_gfn ^ (slot.hva >> PAGE_SHIFT)) & (n - 1):
            return True                                   # gfn and hva not aligned alike
        if self.has_private_mem:                          # KVM_LPAGE_MIXED_FLAG
            attrs = {self.attributes.get(g, 0) for g in range(first, first + n)}
            return len(attrs) > 1
        return False

    def tdp_mmu_map(self, gfn, new):
        """kvm_tdp_mmu_map: RET_PF_SPURIOUS if that very SPTE is there; a bigger one is zapped,
        smaller ones inside the new one are replaced."""
        n = 1 << level_order(new.level)
        base = gfn & ~(n - 1)
        first, old = self.spte_at(gfn)
        if old is not None:
            if old == new:
                return Result(U.RET_PF_SPURIOUS, level=new.level, page=new.page)
            if old.level > new.level:
                del self.sptes[first]
        for g in range(base, base + n):
            self.sptes.pop(g, None)
        self.sptes[base] = new
        return Result(U.RET_PF_FIXED, level=new.level, page=new.page)


class Renaming:
    """Pfns up to renaming: each live reference page has one pfn and each pfn one page."""

    def __init__(self):
        self.pfn_of, self.page_of = {}, {}

    def forget(self, pages):
        for p in pages:
            pfn = self.pfn_of.pop(p, None)
            if pfn is not None:
                del self.page_of[pfn]

    def match(self, page, pfn, what=""):
        if page in self.pfn_of:
            assert self.pfn_of[page] == pfn, f"{what}: page {page} was pfn {self.pfn_of[page]:#x}, now {pfn:#x}"
            return
        assert pfn not in self.page_of, f"{what}: pfn {pfn:#x} is page {self.page_of[pfn]}, not {page}"
        self.pfn_of[page], self.page_of[pfn] = pfn, page
