# host.check(): every structure against the others (DESIGN.md "Verifiable").

cdef void _phys_check(const physmem *pm) except *:
    """Free areas, watermark, folio table and counters agree."""
    cdef int o, r
    cdef uint64_t free_pages = 0
    for o in range(NR_PAGE_ORDERS):
        r = xa_check(&pm.free_area[o])
        if r < 0:
            raise _InvariantError(f"free_area[{o}] xarray inconsistent ({r})")
    r = xa_check(&pm.memmap)
    if r < 0:
        raise _InvariantError(f"memmap xarray inconsistent ({r})")
    spans = []
    for o in range(NR_PAGE_ORDERS):
        for f, k, v in _xa_entries(&pm.free_area[o]):
            spans.append((f << o, 1 << o, "free block"))
            free_pages += 1 << o
    for o in range(pm.pcp_count):
        spans.append((pm.pcp[o], 1, "per-cpu free page"))
    free_pages += pm.pcp_count
    for f, k, v in _xa_entries(&pm.memmap):
        spans.append((f, 1 << k, f"folio {v}"))
        if folio_get(pm, <uint32_t>v).pfn != f or folio_get(pm, <uint32_t>v).order != k:
            raise _InvariantError(f"folio {v} disagrees with memmap at pfn {f:#x}")
    spans.sort()
    end = pm.start_pfn
    for p, n, what in spans:
        if p < end:
            raise _InvariantError(f"{what} at pfn {p:#x} overlaps the block before it (pfn owned twice)")
        end = p + n
    if end > pm.watermark:
        raise _InvariantError(f"a block ends at pfn {end:#x}, above the watermark {pm.watermark:#x}")
    free_pages += pm.end_pfn - pm.watermark
    if free_pages != pm.nr_free_pages:
        raise _InvariantError(f"nr_free_pages {pm.nr_free_pages} != {free_pages} free pages found")


cdef void _xa_check_named(const xarray *xa, str name) except *:
    cdef int r = xa_check(xa)
    if r < 0:
        raise _InvariantError(f"{name}: xarray inconsistent (xa_check {r})")


cdef void _inode_check(GmemInode inode) except *:
    cdef gmem_inode *i = &inode.i
    cdef uint64_t start = 0, first, v
    cdef int order
    cdef folio *f
    _xa_check_named(&i.filemap, f"gmem inode {i.ino} filemap")
    while xa_find_entry(&i.filemap, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        f = folio_get(&i.host.pm, <uint32_t>v)
        if f.order != order or f.index != first or f.mapping != i.ino or pfn_folio(&i.host.pm, f.pfn) != v:
            raise _InvariantError(f"gmem inode {i.ino} index {first:#x}: folio {v} (pfn {f.pfn:#x}, "
                                  f"order {f.order}, mapping {f.mapping}, index {f.index:#x}) disagrees")
        if (first + _pages(order)) << 12 > i.size:
            raise _InvariantError(f"gmem inode {i.ino}: folio at index {first:#x} beyond i_size")
        start = first + _pages(order)


cdef void _vm_check(Vm vm) except *:
    cdef kvm *k = &vm.k
    cdef uint64_t start = 0, first, v, gfn, pfn, idx, fv, ffirst
    cdef int order, level, forder, lvl
    cdef kvm_memory_slot *slot
    cdef folio *f
    name = f"VM fd {vm.fd} (type {k.vm_type})"
    _xa_check_named(&k.sptes, name + " sptes")
    _xa_check_named(&k.mem_attr_array, name + " memory attributes")
    _xa_check_named(&k.gfn_to_slot, name + " gfn_to_slot")
    while xa_find_entry(&k.sptes, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        start = first + _pages(order)
        level = v & SPTE_LEVEL_MASK
        pfn = v >> SPTE_PFN_SHIFT
        where = f"{name}: SPTE gfn {first:#x} level {level} pfn {pfn:#x}"
        if _level_order(level) != order or pfn & _mask(order):
            raise _InvariantError(f"{where}: level and entry size disagree or pfn misaligned")
        slot = gfn_to_memslot(k, first)
        if slot == NULL or gfn_to_memslot(k, first + _mask(order)) != slot:
            raise _InvariantError(f"{where}: not inside one memslot (stale SPTE)")
        # a TDX shared SPTE of a gmem-only slot goes stale in the kernel too (see
        # kvm_gmem_invalidate_filter): say so, it is not a model bug
        gap = ("; known kernel gap: kvm_gmem_get_invalidate_filter() is KVM_FILTER_PRIVATE, "
               "which leaves TDX's direct root" if k.vm_type == KVM_X86_TDX_VM
               and not (v & SPTE_PRIVATE) and kvm_memslot_is_gmem_only(slot) else "")
        if pfn_folio(&k.host.pm, pfn) == 0 or pfn_folio(&k.host.pm, pfn + _mask(order)) == 0:
            raise _InvariantError(f"{where}: maps a freed page (stale SPTE{gap})")
        f = folio_get(&k.host.pm, pfn_folio(&k.host.pm, pfn))
        if f.mapping and f.flags & PG_hwpoison:
            # (a poisoned VMM page is not checked: memory_failure does not model the mmu
            # notifier that unmapping it from the VMM would run)
            raise _InvariantError(f"{where}: maps a poisoned guest_memfd page (stale SPTE: "
                                  f"kvm_gmem_error_folio did not zap it{gap})")
        if k.has_private_mem:
            for gfn in range(first, first + _pages(order)):
                if kvm_mem_is_private(k, gfn) != bool(v & SPTE_PRIVATE):
                    raise _InvariantError(f"{where}: private={bool(v & SPTE_PRIVATE)} but gfn {gfn:#x} "
                                          f"attributes are {kvm_get_memory_attributes(k, gfn):#x}")
        if level > PG_LEVEL_4K and lpage_info_slot(slot, first, level)[0]:
            raise _InvariantError(f"{where}: huge mapping where lpage_info disallows it "
                                  f"({lpage_info_slot(slot, first, level)[0]:#x})")
        if v & SPTE_PRIVATE or kvm_memslot_is_gmem_only(slot):
            if slot.gmem_file == NULL:
                raise _InvariantError(f"{where}: gmem SPTE in a slot without a live binding{gap}")
            idx = first - slot.base_gfn + slot.gmem_pgoff
            if not xa_lookup(&slot.gmem_file.inode.filemap, idx, &fv, &ffirst, &forder):
                raise _InvariantError(f"{where}: gmem index {idx:#x} has no folio "
                                      f"(stale SPTE after a punch{gap})")
            f = folio_get(&k.host.pm, <uint32_t>fv)
            if f.pfn + (idx - ffirst) != pfn:
                raise _InvariantError(f"{where}: gmem index {idx:#x} holds pfn "
                                      f"{f.pfn + idx - ffirst:#x}{gap}")
    # large-page mixed flags agree with the attributes
    cdef uint32_t s
    cdef uint64_t n, g
    if k.has_private_mem:
        for s in range(k.nr_memslots):
            slot = &k.memslots[s]
            if not slot.used:
                continue
            for lvl in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
                n = _pages(_level_order(lvl))
                g = (slot.base_gfn + n - 1) & ~(n - 1)
                while g + n <= slot.base_gfn + slot.npages:
                    if hugepage_test_mixed(slot, g, lvl) == hugepage_has_attrs(
                            k, slot, g, lvl, kvm_get_memory_attributes(k, g)):
                        raise _InvariantError(f"{name}: memslot {slot.id:#x} level {lvl} gfn {g:#x}: "
                                              "KVM_LPAGE_MIXED_FLAG disagrees with the attributes")
                    g += n


cdef void _vm_check_coco(Vm vm) except *:
    """SNP: private SPTEs are backed by this guest's RMP entries at that GPA and size (INV-2).
    TDX: the mirror S-EPT and the private SPTEs are the same set (INV-8)."""
    cdef kvm *k = &vm.k
    cdef gmem_host *h = k.host
    cdef uint64_t start = 0, first, v, pfn, i, raw, sv
    cdef int order, level, assigned, rmp_level
    cdef int64_t premapped = 0
    name = f"VM fd {vm.fd} (type {k.vm_type})"
    while xa_find_entry(&k.sptes, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        start = first + _pages(order)
        if not v & SPTE_PRIVATE:
            continue
        level = v & SPTE_LEVEL_MASK
        if k.vm_type == KVM_X86_SNP_VM:
            for i in range(_pages(order)):
                pfn = (v >> SPTE_PFN_SHIFT) + i
                raw = rmp_raw(h, pfn)
                snp_lookup_rmpentry(h, pfn, &assigned, &rmp_level)
                if (not raw & RMP_ASSIGNED or (raw & RMP_ASID_MASK) >> RMP_ASID_SHIFT != k.asid
                        or (raw & RMP_GPA_MASK) != (first + i) << 12 or rmp_level < level):
                    raise _InvariantError(f"{name}: private SPTE gfn {first + i:#x} level {level} maps pfn "
                                          f"{pfn:#x} whose RMP entry is {_rmp_entry(raw)} (level {rmp_level})")
        elif k.vm_type == KVM_X86_TDX_VM:
            if level != PG_LEVEL_4K or not xa_load(&k.sept, first, &sv) or sv >> 4 != v >> SPTE_PFN_SHIFT:
                raise _InvariantError(f"{name}: private SPTE gfn {first:#x} has no matching 4K S-EPT leaf")
    if k.vm_type == KVM_X86_TDX_VM:
        start = 0
        while xa_find_entry(&k.sept, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &sv):
            start = first + 1
            if not xa_load(&k.sptes, first, &v) or not v & SPTE_PRIVATE or v >> SPTE_PFN_SHIFT != sv >> 4:
                raise _InvariantError(f"{name}: S-EPT leaf gfn {first:#x} without its mirror SPTE")
            if (sv & 15) == TDX_SEPT_PREMAPPED:
                premapped += 1
        if premapped != k.nr_premapped or (premapped and k.launch_state == TD_STATE_RUNNABLE):
            raise _InvariantError(f"{name}: nr_premapped {k.nr_premapped}, {premapped} premapped leaves, "
                                  f"TD state {k.launch_state}")


cdef void _rmp_check(Host host, dict inodes, set vmsa) except *:
    """Every assigned pfn belongs to a live gmem folio of a VM with that ASID, or is a VMSA,
    or was leaked; 2M entries are aligned and alone in their region (INV-3, INV-4)."""
    cdef gmem_host *h = &host.h
    cdef uint64_t start = 0, first, v, f2, v2, pfn, leaked, nr_2m = 0
    cdef int order, k2
    cdef uint32_t id
    cdef folio *f
    while xa_find_entry(&h.rmp.entries, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK, &first, &order, &v):
        start = first + 1
        if v & RMP_PAGESIZE:
            nr_2m += 1
            if first & (PTRS_PER_PMD - 1) or (v & RMP_GPA_MASK) & ((PTRS_PER_PMD << 12) - 1):
                raise _InvariantError(f"RMP: 2M entry at pfn {first:#x} is misaligned ({_rmp_entry(v)})")
            if first + 1 <= first + PTRS_PER_PMD - 1 and xa_find_entry(
                    &h.rmp.entries, first + 1, first + PTRS_PER_PMD - 1, XA_NO_MARK, &f2, &k2, &v2):
                raise _InvariantError(f"RMP: 2M entry at pfn {first:#x} over a 4K entry at {f2:#x} (mixed 4K state)")
        if not v & RMP_ASSIGNED:
            continue
        for pfn in range(first, first + (PTRS_PER_PMD if v & RMP_PAGESIZE else 1)):
            if xa_load(&h.rmp.leaked, pfn, &leaked) or pfn in vmsa:
                continue
            id = pfn_folio(&h.pm, pfn)
            if id == 0:
                raise _InvariantError(f"RMP: freed pfn {pfn:#x} is still assigned ({_rmp_entry(rmp_raw(h, pfn))})")
            f = folio_get(&h.pm, id)
            owner = inodes.get(f.mapping)
            asid = (rmp_raw(h, pfn) & RMP_ASID_MASK) >> RMP_ASID_SHIFT
            if owner is None or asid not in owner:
                raise _InvariantError(f"RMP: pfn {pfn:#x} is assigned to ASID {asid} but belongs to "
                                      f"{'gmem inode ' + str(f.mapping) if owner is not None else 'no guest_memfd'}"
                                      f" (VM ASIDs {sorted(owner) if owner else []})")
            if not f.flags & PG_uptodate:
                raise _InvariantError(f"RMP: pfn {pfn:#x} (gmem inode {f.mapping}, index {f.index + pfn - f.pfn:#x})"
                                      f" is assigned ({_rmp_entry(rmp_raw(h, pfn))}) but its folio was never "
                                      "prepared: the next prepare zeroes a guest-owned page (INV-4, INV-5)")
    if nr_2m != h.rmp.nr_2m:
        raise _InvariantError(f"RMP: {nr_2m} 2M entries, but nr_2m is {h.rmp.nr_2m}")


cdef void _gmem_rmp_check(Host host, list files) except *:
    """From the guest_memfd side (INV-2, INV-4): a prepared page of an SNP guest_memfd is
    RMP-assigned, and an assigned page bound in a memslot of the VM with its ASID is assigned
    at the GPA the memslot gives it."""
    cdef gmem_host *h = &host.h
    cdef GmemFile gf
    cdef uint64_t start, first, v, k, idx, pfn, raw, sv, gfn
    cdef int order
    cdef folio *f
    cdef kvm_memory_slot *slot
    for gf in files:
        start = 0
        while xa_find_entry(&gf.inode.i.filemap, start, <uint64_t>0xFFFFFFFFFFFFFFFF, XA_NO_MARK,
                            &first, &order, &v):
            start = first + _pages(order)
            f = folio_get(&h.pm, <uint32_t>v)
            if not f.flags & PG_uptodate:
                continue
            for k in range(_pages(order)):
                idx, pfn = first + k, f.pfn + k
                raw = rmp_raw(h, pfn)
                if not raw & RMP_ASSIGNED:
                    if gf.inode.i.vm_type == KVM_X86_SNP_VM and not f.flags & PG_leaked:
                        raise _InvariantError(f"gmem inode {gf.inode.i.ino} index {idx:#x} (pfn {pfn:#x}) is "
                                              "prepared for an SNP guest but not RMP-assigned: the prepare "
                                              "hook did not make it private (INV-4)")
                    continue
                if (raw & RMP_ASID_MASK) >> RMP_ASID_SHIFT != gf.vm.k.asid or gf.f.released:
                    continue
                if not xa_load(&gf.f.bindings, idx, &sv):
                    continue
                slot = &gf.vm.k.memslots[sv]
                gfn = slot.base_gfn + idx - slot.gmem_pgoff
                if (raw & RMP_GPA_MASK) != gfn << 12:
                    raise _InvariantError(f"RMP: pfn {pfn:#x} (gmem inode {gf.inode.i.ino}, index {idx:#x}) is "
                                          f"bound at gfn {gfn:#x} of VM fd {gf.vm.fd} (ASID {gf.vm.k.asid}) "
                                          f"but assigned at gpa {raw & RMP_GPA_MASK:#x} (INV-2: wrong GPA)")


def _host_check(Host host):
    cdef GmemFile gf
    _phys_check(&host.h.pm)
    _xa_check_named(&host.h.page_data, "page contents")
    seen_vms = set()
    seen_inodes = set()
    inodes = {}          # ino -> ASIDs of the VMs with a file on it
    vmsa = set()
    # the open fds first (VMs and guest_memfds, in fd order), then the guest_memfd files only a
    # mapping keeps alive (they pin their VM, whose fd may be closed)
    objs = list(host._fds.values())
    objs += [gf for gf in host._gmem_files.values()]
    files = []
    for obj in objs:
        if isinstance(obj, GuestMemfd):
            obj = (<GuestMemfd>obj).file
        if isinstance(obj, GmemFile):
            gf = obj
            if gf in files:
                continue
            files.append(gf)
            if gf.inode.i.ino not in seen_inodes:
                seen_inodes.add(gf.inode.i.ino)
                _inode_check(gf.inode)
            vm = gf.vm
            inodes.setdefault(gf.inode.i.ino, set()).add((<Vm>vm).k.asid)
        elif isinstance(obj, Vm):
            vm = obj
        else:
            continue
        if id(vm) not in seen_vms and not (<Vm>vm).destroyed:
            seen_vms.add(id(vm))
            _vm_check(<Vm>vm)
            _vm_check_coco(<Vm>vm)
            vmsa.update((<Vm>vm)._vmsa_pfns)
    if host.h.rmp.enabled:
        _xa_check_named(&host.h.rmp.entries, "RMP")
        _rmp_check(host, inodes, vmsa)
        _gmem_rmp_check(host, files)
