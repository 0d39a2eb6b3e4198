"""A soak: random operations over several VMs on an SEV-SNP, a TDX and a
SW_PROTECTED host, host.check() every check_every operations, with throughput and memory.

    from gmem import soak
    r = soak.run(ops=10**6, seed=0, check_every=10**4, progress=print)

One operation is one call a VMM or a guest makes: a fault, a batch of faults (counted once; its
faults are counted in r["faults"]), a conversion (attributes, then a punch for to-shared), an
SNP page-state change or PVALIDATE, a TDX MapGPA or ACCEPT, a guest read or write, a punch,
an allocate, a memslot delete and re-add, an injected failure (page allocation, RMPUPDATE,
an invalidation inside a fault, memory failure), a host write attempt, or the destruction of a
VM and the creation of a new one.  Errors the model raises by design (OSError, GuestExit,
GuestFault, RmpViolation) are counted; anything else ends the soak.

Memory is measured before any VM exists, at its peak (sampled at every check), after every VM
and file is closed, and after the hosts are deleted: the model's own bookkeeping
(host.memory_bytes), the pages in use, the process's RSS (resource.getrusage for the peak) and
the C heap in use (glibc mallinfo2).  After the VMs are gone every page still in use is
classified: the VMM's own memory (one 64 MiB window per host, faulted in before the start is
measured, as with -mem-prealloc; every VM of the host maps it at its memslot's userspace_addr),
pages leaked on purpose (a reclaim that failed: rmp.leaked) and poisoned pages; no guest_memfd
page may be left.  The model's memory after teardown is compared with the start: what is
left is the contents of the VMM pages the guests wrote, and metadata (the folio table keeps its
high-water chunks; the leaked and poisoned pages' entries).
"""
import ctypes
import gc
import os
import random
import resource
import time

import numpy as np

import gmem
from gmem import uapi as u

MB = 1 << 20
PS = 4096
HVA = 0x7F0000000000
GMEM_SIZE = 64 * MB
GMEM_PAGES = GMEM_SIZE // PS
ENC = u.PFERR_GUEST_ENC_MASK
W = u.PFERR_WRITE_MASK
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
SNP, TDX, SW = u.KVM_X86_SNP_VM, u.KVM_X86_TDX_VM, u.KVM_X86_SW_PROTECTED_VM
EXPECTED = (OSError, gmem.GuestExit, gmem.GuestFault, gmem.RmpViolation)

# (name, Host keywords, VM type, VMs alive at a time)
HOSTS = [
    ("snp", dict(platform="amd", huge_folios=True), SNP, 2),
    ("tdx", dict(platform="intel"), TDX, 2),
    ("sw", dict(platform="amd", prepare="alloc", prepared_tracking="arch", huge_folios=True), SW, 2),
]
HOST_MEMORY = 1 << 30

OPS = [  # (operation, weight)
    ("fault", 30), ("batch", 10), ("convert", 8), ("guest_convert", 4), ("validate", 5),
    ("access", 6), ("punch", 4), ("allocate", 3), ("memslot", 1), ("invalidation", 1),
    ("touch", 1), ("inject_alloc", 0.5), ("inject_rmpupdate", 0.5), ("memory_failure", 0.005),
    ("vm_churn", 0.2),
]


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_bytes():
    """C heap in use (glibc mallinfo2: uordblks + hblkhd), or None elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    m = f()
    return m.uordblks + m.hblkhd


class _Guest:
    def __init__(self, host, vm_type, serial):
        self.host, self.type = host, vm_type
        self.vm = host.create_vm(vm_type)
        if vm_type == TDX:
            self.vm.tdx_init_vm(52)
            self.vm.tdx_finalize_vm()
        self.vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
        self.f = self.vm.create_guest_memfd(GMEM_SIZE)
        self.bind()
        self.vm.set_memory_attributes(0, GMEM_SIZE // 2, PRIVATE)       # half private, half shared
        self.vcpus = [self.vm.create_vcpu(i) for i in range(2)]
        self.shared_bit = self.vm.shared_gpa_bit

    def bind(self):
        # every VM of a host uses the same VMM memory window: the VMM's pages are bounded
        self.vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, GMEM_SIZE, HVA, self.f, 0)

    def close(self):
        self.f.close()
        self.vm.close()

    def error_code(self, rng, private):
        bits = rng.choice((0, W, u.PFERR_PRESENT_MASK | W, u.PFERR_USER_MASK))
        if self.type == SNP and private:
            bits |= ENC
        return bits

    def gpa(self, gfn, private):
        return (gfn << 12) | (self.shared_bit if self.type == TDX and not private else 0)


class _Soak:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.hosts = {}
        self.guests = {}
        self.serial = 0
        self.counts = {name: 0 for name, _ in OPS}
        self.vmm_written = set()          # (host, gfn): VMM pages the guests wrote (their contents stay)
        self.errors = 0
        self.faults = 0
        names, weights = zip(*OPS)
        self.op_names, self.op_cum = names, np.cumsum(weights) / sum(weights)

    # ---------------------------------------------------------------- setup
    def make_hosts(self):
        for name, kw, vm_type, nvms in HOSTS:
            h = self.hosts[name] = gmem.Host(memory=HOST_MEMORY, **kw)
            # the VMM's guest RAM window, mapped and faulted in up front (as with
            # -mem-prealloc): every VM of this host maps it at its memslots' userspace_addr
            h.mmap_user(HVA, GMEM_SIZE)
            for off in range(0, GMEM_SIZE, MB):
                h.read_user(HVA + off, MB)

    def make_guests(self):
        for name, kw, vm_type, nvms in HOSTS:
            self.guests[name] = [self.new_guest(name, vm_type) for _ in range(nvms)]

    def new_guest(self, name, vm_type):
        self.serial += 1
        return _Guest(self.hosts[name], vm_type, self.serial)

    def close_guests(self):
        for gs in self.guests.values():
            for g in gs:
                g.close()
        self.guests = {}

    # ---------------------------------------------------------------- operations
    def pick(self):
        name = self.rng.choice(list(self.guests))
        return name, self.rng.choice(self.guests[name])

    def op(self):
        which = self.op_names[int(np.searchsorted(self.op_cum, self.rng.random()))]
        self.counts[which] += 1
        hname, g = self.pick()
        try:
            getattr(self, "op_" + which)(hname, g)
        except EXPECTED:
            self.errors += 1

    def _gfn(self, g):
        return self.rng.randrange(GMEM_PAGES + 16)           # a few past the memslot

    def op_fault(self, hname, g):
        gfn = self._gfn(g)
        private = g.vm.get_memory_attributes(gfn) == PRIVATE
        if self.rng.random() < 0.05:
            private = not private                             # an implicit conversion: exits
        v = self.rng.choice(g.vcpus)
        v.page_fault(g.gpa(gfn, private), g.error_code(self.rng, private))
        self.faults += 1

    def op_batch(self, hname, g):
        n = self.rng.choice((16, 64, 256))
        start = self.rng.randrange(GMEM_PAGES - n)
        gfns = start + np.arange(n, dtype=np.uint64)
        private = self.rng.random() < 0.5
        gpas = np.array([g.gpa(int(x), private) for x in gfns], dtype=np.uint64)
        ecs = np.full(n, g.error_code(self.rng, private), dtype=np.uint64)
        g.vm.page_fault_batch(gpas, ecs, self.nprng.integers(0, 2, n).astype(np.uint64))
        self.faults += n

    def _convert(self, g, gfn, npages, private):
        npages = min(npages, GMEM_PAGES - gfn) if gfn < GMEM_PAGES else npages
        g.vm.set_memory_attributes(gfn << 12, npages << 12, PRIVATE if private else 0)
        if not private and gfn < GMEM_PAGES:
            g.f.punch_hole(gfn << 12, min(npages, GMEM_PAGES - gfn) << 12)

    def op_convert(self, hname, g):
        npages = self.rng.choice((1, 1, 16, 512))
        gfn = self.rng.randrange(GMEM_PAGES) & ~(npages - 1)
        self._convert(g, gfn, npages, self.rng.random() < 0.5)

    def op_guest_convert(self, hname, g):
        """The guest asks (SNP page-state change, TDX MapGPA; SW: the VMM decides), the VMM
        answers each KVM_HC_MAP_GPA_RANGE exit by converting."""
        gfn = self.rng.randrange(GMEM_PAGES - 4)
        private = self.rng.random() < 0.5
        v = g.vcpus[0]
        if g.type == SNP:
            if self.rng.random() < 0.5:
                r = v.psc_msr(gfn << 12, 1 if private else 2)
            else:
                r = v.page_state_change([dict(gfn=gfn + i, operation=1 if private else 2) for i in range(4)])
        elif g.type == TDX:
            r = v.tdx_map_gpa(g.gpa(gfn, private), 4 * PS)
        else:
            self._convert(g, gfn, 4, private)
            return
        while isinstance(r, gmem.HypercallExit):
            gpa, npages, attrs = r.args
            self._convert(g, gpa >> 12, npages, bool(attrs & 16))
            r = v.complete_hypercall(0)

    def op_validate(self, hname, g):
        gfn = self.rng.randrange(GMEM_PAGES)
        v = self.rng.choice(g.vcpus)
        if g.type == SNP:
            if self.rng.random() < 0.2:
                v.pvalidate((gfn & ~511) << 12, 1, True)
            else:
                v.pvalidate(gfn << 12, 0, self.rng.random() < 0.9)
        elif g.type == TDX:
            v.tdx_accept(gfn << 12)
        else:
            v.page_fault(gfn << 12, W)
            self.faults += 1

    def op_access(self, hname, g):
        gfn = self.rng.randrange(GMEM_PAGES)
        private = g.vm.get_memory_attributes(gfn) == PRIVATE
        v = self.rng.choice(g.vcpus)
        ec = ENC if g.type == SNP and private else 0
        if self.rng.random() < 0.5:
            v.write(g.gpa(gfn, private) + self.rng.randrange(4088), b"soakdata", ec | W)
            if not private:
                self.vmm_written.add((hname, gfn))       # all VMs of a host share one VMM window
        else:
            v.read(g.gpa(gfn, private) + self.rng.randrange(4088), 8, ec)

    def op_punch(self, hname, g):
        n = self.rng.choice((1, 16, 512))
        g.f.punch_hole(self.rng.randrange(GMEM_PAGES - n) << 12, n << 12)

    def op_allocate(self, hname, g):
        n = self.rng.choice((1, 16, 512))
        g.f.allocate(self.rng.randrange(GMEM_PAGES - n) << 12, n << 12)

    def op_memslot(self, hname, g):
        g.vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 0, HVA, g.f, 0)
        g.bind()

    def op_invalidation(self, hname, g):
        gfn = self.rng.randrange(GMEM_PAGES)
        g.vm.inject_invalidation(gfn << 12, PS)
        private = g.vm.get_memory_attributes(gfn) == PRIVATE
        g.vcpus[0].page_fault(g.gpa(gfn, private), g.error_code(self.rng, private))
        self.faults += 1

    def _mapped_pfn(self, g):
        sptes = g.vm.sptes()
        if not sptes:
            return None
        gfn, level, pfn, _, _ = sptes[self.rng.randrange(len(sptes))]
        return pfn

    def op_touch(self, hname, g):
        pfn = self._mapped_pfn(g)
        if pfn is not None:
            g.host.touch(pfn, self.rng.random() < 0.5)

    def op_inject_alloc(self, hname, g):
        with g.host.inject(alloc_failures=self.rng.choice((1, 3, 100))):
            self.op_batch(hname, g)

    def op_inject_rmpupdate(self, hname, g):
        if g.host.rmp is None:
            return self.op_fault(hname, g)
        with g.host.inject(rmpupdate_failures=1, rmpupdate_code=self.rng.choice((3, 4))):
            if self.rng.random() < 0.5:
                self.op_fault(hname, g)
            else:
                # a failed reclaim leaks what the RMPUPDATE covered: one page here (a whole 2M
                # entry on a 2M punch, which would eat the host in a long soak)
                g.f.punch_hole(self.rng.randrange(GMEM_PAGES) << 12, PS)

    def op_memory_failure(self, hname, g):
        pfn = self._mapped_pfn(g)
        if pfn is not None:
            g.host.memory_failure(pfn)

    def op_vm_churn(self, hname, g):
        self.guests[hname].remove(g)
        g.close()
        self.guests[hname].append(self.new_guest(hname, g.type))

    # ---------------------------------------------------------------- measuring
    def memory(self):
        hosts = self.hosts.values()
        return dict(memory_bytes=sum(h.memory_bytes for h in hosts),
                    used_pages=sum(h.stats["used_pages"] for h in hosts),
                    rss_bytes=_rss_bytes(), heap_bytes=_heap_bytes())

    def check(self):
        for h in self.hosts.values():
            h.check()

    def classify_pages(self):
        """Every page still in use once the VMs are gone: VMM memory, leaked, poisoned; a
        guest_memfd page left would be a leak of the model."""
        out = dict(vmm=0, leaked=0, poisoned=0, gmem=0)
        for h in self.hosts.values():
            pfn, left = 0, h.stats["used_pages"]
            while left and pfn < h.nr_pages:
                f = h.folio(pfn)
                if f is None:
                    pfn += 1
                    continue
                n = 1 << f["order"]
                if f["flags"] & 4:                    # PG_hwpoison (kept, with PG_leaked, once freed)
                    out["poisoned"] += n
                elif f["flags"] & 8:                  # PG_leaked: a failed reclaim
                    out["leaked"] += n
                elif f["mapping"]:
                    out["gmem"] += n
                else:
                    out["vmm"] += n
                left -= n
                pfn = f["pfn"] + n
        return out


def _malloc_trim():
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(ops=10**6, seed=0, check_every=10**4, progress=None, warmup=2000):
    """Run the soak; returns a dict of figures (see the module docstring).  progress, if given,
    is called as progress(done, ops, figures_so_far) after every check.  A short warm-up soak
    on throwaway hosts runs first, so that one-time growth of the process (imports, caches,
    free lists) is not counted against the model."""
    if ops < 0 or check_every <= 0:
        raise ValueError("ops must be >= 0 and check_every > 0")
    if warmup:
        run(ops=warmup, seed=seed + 1, check_every=warmup, warmup=0)
    gc.collect()
    _malloc_trim()
    before_hosts = dict(rss_bytes=_rss_bytes(), heap_bytes=_heap_bytes())
    s = _Soak(seed)
    s.make_hosts()
    start = s.memory()
    s.make_guests()
    peak = dict(start)
    t0 = time.perf_counter()
    checks = 0
    done = 0
    while done < ops:
        n = min(check_every, ops - done)
        for _ in range(n):
            s.op()
        done += n
        s.check()
        checks += 1
        now = s.memory()
        for k in ("memory_bytes", "used_pages", "rss_bytes", "heap_bytes"):
            if now[k] is not None and now[k] > (peak[k] or 0):
                peak[k] = now[k]
        if progress is not None:
            el = time.perf_counter() - t0
            progress(done, ops, dict(seconds=round(el, 2), ops_per_s=round(done / el) if el else 0,
                                     faults=s.faults, errors=s.errors, **now))
    seconds = time.perf_counter() - t0
    s.close_guests()
    s.check()
    pages = s.classify_pages()
    leaked = sum(len(h.rmp.leaked) for h in s.hosts.values() if h.rmp is not None)
    assigned = [p for h in s.hosts.values() if h.rmp is not None
                for p in set(h.rmp.assigned()) - set(h.rmp.leaked)]
    after = s.memory()
    vmm_contents = PS * len(s.vmm_written)
    result = dict(
        ops=done, seed=seed, seconds=round(seconds, 2), ops_per_s=round(done / seconds) if seconds else 0,
        faults=s.faults, faults_per_s=round(s.faults / seconds) if seconds else 0, checks=checks,
        errors=s.errors, op_counts=dict(s.counts), vms_created=s.serial,
        memory=dict(start=start, peak=dict(peak, rss_bytes=max(peak["rss_bytes"], _peak_rss_bytes())),
                    after_teardown=after),
        pages_after_teardown=pages, leaked_pages=leaked, assigned_after_teardown=len(assigned),
        vmm_pages_written=len(s.vmm_written),
        # what the model still holds beyond its start: the VMM pages' contents and the rest
        # (xarray nodes of the VMM/leaked/poisoned pages, the folio table's high-water chunks)
        model_memory_growth=dict(total=after["memory_bytes"] - start["memory_bytes"], vmm_page_contents=vmm_contents,
                                 metadata=after["memory_bytes"] - start["memory_bytes"] - vmm_contents),
    )
    hosts = s.hosts
    s.hosts = {}
    del hosts, s
    gc.collect()
    result["memory"]["before_hosts"] = before_hosts
    result["memory"]["after_hosts_deleted"] = dict(rss_bytes=_rss_bytes(), heap_bytes=_heap_bytes())
    _malloc_trim()
    result["memory"]["after_hosts_deleted_trimmed"] = dict(rss_bytes=_rss_bytes(), heap_bytes=_heap_bytes())
    return result


def format_result(r):
    """The figures as lines of text."""
    mb = lambda b: "-" if b is None else f"{b / MB:.1f} MiB"          # noqa: E731
    m = r["memory"]
    lines = [
        f"ops {r['ops']:,} in {r['seconds']} s: {r['ops_per_s']:,} ops/s "
        f"({r['faults']:,} faults, {r['faults_per_s']:,} faults/s), {r['checks']} checks, "
        f"{r['errors']:,} expected errors, {r['vms_created']} VMs created",
        f"{'':22}{'model memory':>14}{'pages in use':>14}{'RSS':>12}{'C heap':>12}",
    ]
    for key, label in (("start", "start (hosts, no VM)"), ("peak", "peak"),
                       ("after_teardown", "after all VMs closed")):
        x = m[key]
        lines.append(f"{label:22}{mb(x['memory_bytes']):>14}{x['used_pages']:>14,}{mb(x['rss_bytes']):>12}"
                     f"{mb(x['heap_bytes']):>12}")
    lines.append(f"{'before hosts':22}{'':>14}{'':>14}{mb(m['before_hosts']['rss_bytes']):>12}"
                 f"{mb(m['before_hosts']['heap_bytes']):>12}")
    lines.append(f"{'after hosts deleted':22}{'':>14}{'':>14}{mb(m['after_hosts_deleted']['rss_bytes']):>12}"
                 f"{mb(m['after_hosts_deleted']['heap_bytes']):>12}")
    lines.append(f"{'  and malloc_trim(0)':22}{'':>14}{'':>14}"
                 f"{mb(m['after_hosts_deleted_trimmed']['rss_bytes']):>12}"
                 f"{mb(m['after_hosts_deleted_trimmed']['heap_bytes']):>12}")
    g = r["model_memory_growth"]
    lines.append(f"model memory after teardown - start: {mb(g['total'])} = {mb(g['vmm_page_contents'])} contents of "
                 f"{r['vmm_pages_written']:,} VMM pages the guests wrote + {mb(g['metadata'])} metadata")
    p = r["pages_after_teardown"]
    lines.append(f"pages in use after teardown: {p['vmm']:,} VMM pages, {p['leaked']:,} leaked (failed reclaim), "
                 f"{p['poisoned']:,} poisoned, {p['gmem']:,} guest_memfd; "
                 f"RMP entries still assigned (not leaked): {r['assigned_after_teardown']}")
    return "\n".join(lines)
