"""Hostile arguments at every public call (issue 7, "Tests": the fuzz test).

Every call in SPECS gets, one argument position at a time, every value of HOSTILE (negative,
huge, non-integer, NaN, strings, None, bytes, containers, numpy scalars and arrays) and the
hostile objects of the world it runs in (a closed guest_memfd, a closed mapping, a destroyed VM,
objects of another Host), the other arguments staying valid.  Only OSError, ValueError and
TypeError may come out, plus the exceptions a call raises by design (GuestExit/GuestFault for
guest accesses, SigBus/IndexError for mapping accesses, RmpViolation for host.touch,
MemoryError for a deliberately huge allocation).  Afterwards host.check() must pass on every
host of the world.

Each spec runs in a forked child, so that a crash of the C core (a segfault, an abort) is a
failing test naming the call instead of the end of the test run.  A Hypothesis test then mixes
hostile values into all positions of a call at once, in this process.

The raw RMP instructions (rmp.rmpupdate, psmash, make_private, make_shared) exist to corrupt
the RMP on purpose; they run on a scratch host whose check() is not asserted.

Under ASan, run with ASAN_OPTIONS=allocator_may_return_null=1: the deliberately huge
allocations (a 2**40-byte read) must come back as MemoryError, not abort the process.
"""
import errno
import math
import os
import pickle
import signal
import sys
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gmem
from gmem import uapi as u
from gmem.errors import InvariantError, RmpViolation, SigBus

PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE
ENC = u.PFERR_GUEST_ENC_MASK
GMEM = u.KVM_MEM_GUEST_MEMFD
HVA = 0x7F0000000000
MB = 1 << 20

BASE_EXC = (OSError, ValueError, TypeError)
GUEST_EXC = (gmem.GuestExit, gmem.GuestFault)

HOSTILE = [
    -1, -(1 << 31) - 1, -(1 << 63), -(1 << 63) - 1, (1 << 31), (1 << 32), (1 << 63), (1 << 64) - 1,
    1 << 64, 1 << 200, -(1 << 200),
    0.5, 1.0, -0.0, math.nan, math.inf, -math.inf, 1j,
    "", "0", "1", "x" * 5, b"", b"\x00", b"\x01" * 9, bytearray(b"\x01"), memoryview(b"ab"),
    None, True, False, [], [1], (), (1, 2), {}, {"gfn": 1}, set(), object(), type, print,
    np.int8(-1), np.int64(-1), np.uint64((1 << 64) - 1), np.float64(1.0), np.float32(math.nan),
    np.bool_(True), np.array(1), np.array([1, 2]), np.zeros((2, 2)),
]


def _hostile_objects(w):
    return [w.closed_f, w.closed_m, w.closed_vm, w.foreign_vm, w.foreign_f, w.foreign_vcpu,
            w.other, w.amd, w.sv, w.m]


# ------------------------------------------------------------------ the world

def world():
    """Two hosts with one VM of each kind, files, slots and some private memory in use,
    plus closed and foreign objects to hand around."""
    w = SimpleNamespace()
    w.amd = gmem.Host(memory=64 * MB, platform="amd", huge_folios=True)
    w.intel = gmem.Host(memory=64 * MB, platform="intel")
    w.other = gmem.Host(memory=16 * MB, platform="amd")
    w.scratch = gmem.Host(memory=16 * MB, platform="amd")
    w.rmp = w.scratch.rmp
    # SNP: 4M of gmem at gpa 0, the first 2M private, one page faulted in and validated
    w.snp = w.amd.create_vm(u.KVM_X86_SNP_VM)
    w.sv = w.snp.create_vcpu(0)
    w.f = w.snp.create_guest_memfd(4 * MB)
    w.snp.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, w.f, 0)
    w.snp.set_memory_attributes(0, 2 * MB, PRIVATE)
    w.snp.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
    w.sv.page_fault(0x1000, ENC | u.PFERR_WRITE_MASK)
    w.sv.pvalidate(0x1000, 0, True)
    # SW_PROTECTED with an mmap-able gmem
    w.sw = w.amd.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    w.swv = w.sw.create_vcpu(0)
    w.swf = w.sw.create_guest_memfd(2 * MB, u.GUEST_MEMFD_FLAG_MMAP)
    w.sw.set_user_memory_region2(0, GMEM, 1 << 30, 2 * MB, HVA + 8 * MB, w.swf, 0)
    # DEFAULT with an INIT_SHARED gmem and a mapping
    w.dflt = w.amd.create_vm(u.KVM_X86_DEFAULT_VM)
    w.df = w.dflt.create_guest_memfd(1 * MB, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    w.m = w.df.mmap(1 * MB)
    w.m[0:4] = b"abcd"
    w.closed_m = w.df.mmap(4096)
    w.closed_m.close()
    # TDX: 4M at gpa 0, private, one page accepted
    w.tdx = w.intel.create_vm(u.KVM_X86_TDX_VM)
    w.tv = w.tdx.create_vcpu(0)
    w.tf = w.tdx.create_guest_memfd(4 * MB)
    w.tdx.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, w.tf, 0)
    w.tdx.set_memory_attributes(0, 4 * MB, PRIVATE)
    w.tdx.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
    w.tv.tdx_accept(0x3000)
    # an SNP VM being launched (for the launch calls), a TDX VM being built
    w.lsnp = w.amd.create_vm(u.KVM_X86_SNP_VM)
    w.lsv = w.lsnp.create_vcpu(0)
    w.lf = w.lsnp.create_guest_memfd(2 * MB)
    w.lsnp.set_user_memory_region2(0, GMEM, 0, 2 * MB, HVA + 16 * MB, w.lf, 0)
    w.lsnp.set_memory_attributes(0, 2 * MB, PRIVATE)
    w.lsnp.snp_launch_start()
    w.amd.mmap_user(HVA + 32 * MB, 16 * MB)            # the VMM's buffers (launch images, ...)
    w.amd.write_user(HVA + 32 * MB, b"kernel")
    w.ltdx = w.intel.create_vm(u.KVM_X86_TDX_VM)
    w.ltdx.tdx_init_vm(52)
    w.ltv = w.ltdx.create_vcpu(0)
    w.ltf = w.ltdx.create_guest_memfd(2 * MB)
    w.ltdx.set_user_memory_region2(0, GMEM, 0, 2 * MB, HVA + 16 * MB, w.ltf, 0)
    w.ltdx.set_memory_attributes(0, 2 * MB, PRIVATE)
    w.intel.mmap_user(HVA + 32 * MB, 16 * MB)
    w.intel.write_user(HVA + 32 * MB, b"tdboot")
    # closed things
    w.closed_f = w.snp.create_guest_memfd(8192)
    w.closed_f.close()
    w.closed_vm = w.amd.create_vm(u.KVM_X86_SNP_VM)
    w.closed_vcpu = w.closed_vm.create_vcpu(0)
    w.closed_vm.close()
    # another host's objects
    w.foreign_vm = w.other.create_vm(u.KVM_X86_SNP_VM)
    w.foreign_vcpu = w.foreign_vm.create_vcpu(0)
    w.foreign_f = w.foreign_vm.create_guest_memfd(2 * MB)
    w.foreign_vm.set_user_memory_region2(0, GMEM, 0, 2 * MB, HVA, w.foreign_f, 0)
    w.foreign_vm.set_memory_attributes(0, 2 * MB, PRIVATE)
    w.foreign_vcpu.page_fault(0, ENC)
    w.hosts = [w.amd, w.intel, w.other]
    return w


def check_all(w):
    for h in w.hosts:
        h.check()


# ------------------------------------------------------------------ the calls

class Spec:
    """One public call: fn(w, *args), valid args, the exceptions it may raise besides
    BASE_EXC, and the argument positions that size an output buffer (they get only the
    extreme values: a mid-sized one would allocate and fault gigabytes)."""

    def __init__(self, name, fn, valid, extra=(), alloc=(), objects=()):
        self.name, self.fn, self.valid = name, fn, valid
        self.extra, self.alloc, self.objects = tuple(extra), set(alloc), set(objects)

    def allowed(self):
        return BASE_EXC + self.extra


def _inject(h, *a):
    keys = ("alloc_failures", "prepare_failures", "prepare_errno", "rmpupdate_failures", "rmpupdate_code")
    with h.inject(**dict(zip(keys, a))):
        pass


def _host_kw(*a):
    keys = ("platform", "sw_protected", "memory_attributes", "prepare", "prepared_tracking",
            "invalidate", "huge_folios", "reattach_private")
    return gmem.Host(a[0], **dict(zip(keys, a[1:])))


def _setitem(m, k, v):
    m[k] = v


def _psc(v, entries, cur, end):
    r = v.page_state_change(entries, cur, end)
    while isinstance(r, gmem.HypercallExit):
        r = v.complete_hypercall(0)
    return r


def _map_gpa(v, gpa, size):
    r = v.tdx_map_gpa(gpa, size)
    while isinstance(r, gmem.HypercallExit):
        r = v.complete_hypercall(0)
    return r


def _ents():
    return [dict(gfn=0x10, operation=2), dict(gfn=0x11, operation=1)]


A = u.PFERR_WRITE_MASK
SPECS = [
    # gmem.Host and its calls
    Spec("Host", lambda w, *a: _host_kw(*a),
         lambda w: [16 * MB, "amd", True, True, "fault", "gmem", "free_folio", False, False]),
    Spec("Host.check_extension", lambda w, c: w.amd.check_extension(c), lambda w: [u.KVM_CAP_GUEST_MEMFD]),
    Spec("Host.create_vm", lambda w, t: w.amd.create_vm(t), lambda w: [u.KVM_X86_SNP_VM]),
    Spec("Host.register_hooks", lambda w, t, fn: w.amd.register_hooks(t, gmem_invalidate=fn),
         lambda w: [9, lambda *a: None]),
    Spec("Host.folio", lambda w, p: w.amd.folio(p), lambda w: [0]),
    Spec("Host.read_user", lambda w, hva, n: w.amd.read_user(hva, n), lambda w: [HVA + 32 * MB, 6],
         extra=(MemoryError,), alloc=(1,)),
    Spec("Host.write_user", lambda w, hva, d: w.amd.write_user(hva, d), lambda w: [HVA + 40 * MB, b"x"],
         extra=(MemoryError,)),
    Spec("Host.touch", lambda w, p, wr: w.amd.touch(p, wr), lambda w: [w.amd.nr_pages - 1, True],
         extra=(RmpViolation,)),
    Spec("Host.memory_failure", lambda w, p: w.amd.memory_failure(p), lambda w: [w.amd.nr_pages - 1]),
    Spec("Host.inject", lambda w, *a: _inject(w.amd, *a), lambda w: [1, 1, 5, 1, 3]),
    Spec("Host.inject_alloc_failures", lambda w, n: w.amd.inject_alloc_failures(n), lambda w: [0]),
    Spec("Trace.enable", lambda w, e, c: w.amd.trace.enable(e, capacity=c), lambda w: ["spte_install", 64]),
    Spec("Trace.disable", lambda w, e: w.amd.trace.disable(e), lambda w: ["spte_install"]),
    Spec("Trace.report", lambda w, n: w.amd.trace.report(n), lambda w: [4]),
    Spec("Trace(host)", lambda w, h: gmem.Trace(h).enabled, lambda w: [w.amd], objects=(0,)),
    # the RMP (read-only calls on a real host; instructions on the scratch host)
    Spec("Rmp.lookup", lambda w, p: w.amd.rmp.lookup(p), lambda w: [0]),
    Spec("Rmp.level", lambda w, p: w.amd.rmp.level(p), lambda w: [0]),
    Spec("Rmp.view", lambda w, a, b: w.amd.rmp.view(a, b), lambda w: [0, 16]),
    Spec("Rmp(host)", lambda w, h: gmem.Rmp(h).stats, lambda w: [w.amd], objects=(0,)),
    Spec("Rmp.rmpupdate", lambda w, p, a, ps, im, g, asid: w.rmp.rmpupdate(
        p, assigned=a, pagesize=ps, immutable=im, gpa=g, asid=asid), lambda w: [512, True, 1, False, 0, 1]),
    Spec("Rmp.psmash", lambda w, p: w.rmp.psmash(p), lambda w: [512]),
    Spec("Rmp.make_private", lambda w, *a: w.rmp.make_private(*a), lambda w: [1024, 0, 1, 1, False]),
    Spec("Rmp.make_shared", lambda w, p, lv: w.rmp.make_shared(p, lv), lambda w: [1024, 1]),
    Spec("Rmp.inject_rmpupdate_failures", lambda w, n, c: w.rmp.inject_rmpupdate_failures(n, c),
         lambda w: [1, 3]),
    # gmem.Vm
    Spec("Vm(host, type)", lambda w, h, t: gmem.Vm(h, t), lambda w: [w.other, 0], objects=(0,)),
    Spec("Vm.check_extension", lambda w, c: w.snp.check_extension(c), lambda w: [u.KVM_CAP_MEMORY_ATTRIBUTES]),
    Spec("Vm.create_vcpu", lambda w, i: w.snp.create_vcpu(i), lambda w: [1]),
    Spec("Vm.create_guest_memfd", lambda w, s, f: w.snp.create_guest_memfd(s, f), lambda w: [8192, 0]),
    Spec("Vm.link_guest_memfd", lambda w, src: w.snp.link_guest_memfd(src), lambda w: [w.f], objects=(0,)),
    Spec("Vm.set_user_memory_region2", lambda w, *a: w.snp.set_user_memory_region2(*a),
         lambda w: [3, GMEM, 8 * MB, 8192, HVA + 64 * MB, w.f, 3 * MB], objects=(5,)),
    Spec("Vm.set_user_memory_region2 (delete)", lambda w, *a: w.snp.set_user_memory_region2(*a),
         lambda w: [0, GMEM, 0, 0, HVA, w.f, 0], objects=(5,)),
    Spec("Vm.set_user_memory_region", lambda w, *a: w.dflt.set_user_memory_region(*a),
         lambda w: [1, 0, 16 * MB, 8192, HVA + 96 * MB]),
    Spec("Vm.set_memory_attributes", lambda w, *a: w.snp.set_memory_attributes(*a),
         lambda w: [0x2000, 0x2000, 0, 0]),
    Spec("Vm.get_memory_attributes", lambda w, g: w.snp.get_memory_attributes(g), lambda w: [1]),
    Spec("Vm.enable_cap", lambda w, c, a: w.snp.enable_cap(c, a),
         lambda w: [u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE]),
    Spec("Vm.snp_launch_start", lambda w, p: w.amd.create_vm(u.KVM_X86_SNP_VM).snp_launch_start(p),
         lambda w: [0x30000]),
    Spec("Vm.snp_launch_update", lambda w, *a: w.lsnp.snp_launch_update(*a),
         lambda w: [4, HVA + 32 * MB, 4096, u.KVM_SEV_SNP_PAGE_TYPE_NORMAL, 0]),
    Spec("Vm.snp_launch_finish", lambda w: w.lsnp.snp_launch_finish(), lambda w: []),
    Spec("Vm.tdx_init_vm", lambda w, g: w.intel.create_vm(u.KVM_X86_TDX_VM).tdx_init_vm(g), lambda w: [48]),
    Spec("Vm.tdx_finalize_vm", lambda w: w.ltdx.tdx_finalize_vm(), lambda w: []),
    Spec("Vm.page_fault_batch", lambda w, g, e, i: w.snp.page_fault_batch(g, e, i),
         lambda w: [np.arange(4, dtype=np.uint64) << 12, np.full(4, ENC, np.uint64), 0]),
    Spec("Vm.inject_invalidation", lambda w, g, s: w.snp.inject_invalidation(g, s), lambda w: [0, 4096]),
    Spec("Vm.sept", lambda w: w.tdx.sept(), lambda w: []),
    Spec("page_states", lambda w, vm, g, s: gmem.page_states(vm, g, s), lambda w: [w.snp, 0, 8192],
         objects=(0,)),
    # gmem.Vcpu
    Spec("Vcpu(vm, id)", lambda w, vm, i: gmem.Vcpu(vm, i), lambda w: [w.snp, 7], objects=(0,)),
    Spec("Vcpu.page_fault", lambda w, g, e: w.sv.page_fault(g, e), lambda w: [0x2000, ENC]),
    Spec("Vcpu.page_fault (tdx)", lambda w, g, e: w.tv.page_fault(g, e), lambda w: [0x4000, 0]),
    Spec("Vcpu.read", lambda w, g, n, e: w.sv.read(g, n, e), lambda w: [0x1000, 8, ENC],
         extra=GUEST_EXC + (MemoryError,), alloc=(1,)),
    Spec("Vcpu.write", lambda w, g, d, e: w.sv.write(g, d, e), lambda w: [0x1000, b"data", ENC | A],
         extra=GUEST_EXC + (MemoryError,)),
    Spec("Vcpu.write (tdx)", lambda w, g, d, e: w.tv.write(g, d, e), lambda w: [0x3000, b"data", A],
         extra=GUEST_EXC + (MemoryError,)),
    Spec("Vcpu.pvalidate", lambda w, g, ps, v: w.sv.pvalidate(g, ps, v), lambda w: [0x1000, 0, False],
         extra=GUEST_EXC),
    Spec("Vcpu.rmpadjust", lambda w, g, ps, a: w.sv.rmpadjust(g, ps, a), lambda w: [0x1000, 0, 0x101],
         extra=GUEST_EXC),
    Spec("Vcpu.psc_msr", lambda w, g, op: w.sv.psc_msr(g, op), lambda w: [0x5000, 2]),
    Spec("Vcpu.page_state_change", lambda w, e, c, n: _psc(w.sv, e, c, n), lambda w: [_ents(), 0, 1]),
    Spec("Vcpu.page_state_change (entry)", lambda w, e: _psc(w.sv, [e], 0, 0),
         lambda w: [dict(gfn=0x10, operation=2)]),
    Spec("Vcpu.complete_hypercall", lambda w, r: (w.sv.psc_msr(0x6000, 2), w.sv.complete_hypercall(r)),
         lambda w: [0]),
    Spec("Vcpu.tdx_accept", lambda w, g: w.tv.tdx_accept(g), lambda w: [0x5000], extra=GUEST_EXC),
    Spec("Vcpu.tdx_map_gpa", lambda w, g, s: _map_gpa(w.tv, g, s),
         lambda w: [w.tdx.shared_gpa_bit | 0x200000, 0x200000]),
    Spec("Vcpu.tdx_init_mem_region", lambda w, src, g, n, m: w.ltv.tdx_init_mem_region(src, g, n, m),
         lambda w: [HVA + 32 * MB, 0x1000, 1, False]),
    # gmem.GuestMemfd
    Spec("GuestMemfd(file)", lambda w, f: gmem.GuestMemfd(f), lambda w: [None], objects=(0,)),
    Spec("GuestMemfd.fallocate", lambda w, *a: w.f.fallocate(*a), lambda w: [u.FALLOC_FL_KEEP_SIZE, 0, 8192]),
    Spec("GuestMemfd.allocate", lambda w, o, n: w.f.allocate(o, n), lambda w: [2 * MB, 8192]),
    Spec("GuestMemfd.punch_hole", lambda w, o, n: w.f.punch_hole(o, n), lambda w: [0, 4096]),
    Spec("GuestMemfd.mmap", lambda w, *a: w.df.mmap(*a), lambda w: [4096, 0, 3, 1]),
    Spec("GuestMemfd.read", lambda w, n: w.f.read(n), lambda w: [4]),
    Spec("GuestMemfd.write", lambda w, d: w.f.write(d), lambda w: [b"x"]),
    Spec("GuestMemfd.pread", lambda w, n, o: w.f.pread(n, o), lambda w: [4, 0]),
    Spec("GuestMemfd.pwrite", lambda w, d, o: w.f.pwrite(d, o), lambda w: [b"x", 0]),
    Spec("GuestMemfd.lseek", lambda w, o, wh: w.f.lseek(o, wh), lambda w: [0, 0]),
    Spec("GuestMemfd.ftruncate", lambda w, n: w.f.ftruncate(n), lambda w: [4096]),
    Spec("GuestMemfd (closed)", lambda w, o, n: w.closed_f.allocate(o, n), lambda w: [0, 4096]),
    Spec("GuestMemfd.dup/fstat/close", lambda w: (w.f.dup().close(), w.f.fstat(), w.closed_f.close()),
         lambda w: []),
    # gmem.Mapping
    Spec("Mapping(file, ...)", lambda w, f, n, o, p: gmem.Mapping(f, n, o, p), lambda w: [None, 4096, 0, 3],
         objects=(0,)),
    Spec("Mapping[key]", lambda w, k: w.m[k], lambda w: [slice(0, 4)], extra=(SigBus, IndexError)),
    Spec("Mapping[key] = value", lambda w, k, v: _setitem(w.m, k, v), lambda w: [slice(0, 2), b"xy"],
         extra=(SigBus, IndexError)),
    Spec("Mapping (closed)", lambda w, k: w.closed_m[k], lambda w: [0], extra=(IndexError,)),
    Spec("Mapping (SIGBUS)", lambda w, k: w.swf.mmap(8192)[k], lambda w: [0], extra=(SigBus, IndexError)),
    # XArray and PhysMem
    Spec("XArray.store", lambda w, i, v, o: gmem.XArray().store(i, v, o), lambda w: [512, 7, 9]),
    Spec("XArray.items", lambda w, a, b, m: list(gmem.XArray().items(a, b, m)), lambda w: [0, 100, None]),
    Spec("XArray.load_many", lambda w, a: gmem.XArray().load_many(a), lambda w: [np.arange(3, dtype=np.uint64)]),
    Spec("PhysMem", lambda w, n, s: gmem.PhysMem(n, s).check(), lambda w: [16 * MB, 0]),
    Spec("PhysMem.free", lambda w, p, o: gmem.PhysMem(16 * MB).free(p, o), lambda w: [0, 0]),
    Spec("PhysMem.alloc_many", lambda w, n, o: gmem.PhysMem(16 * MB).alloc_many(n, o), lambda w: [4, 0],
         extra=(MemoryError,)),
]

# numpy arrays that page_fault_batch must refuse or survive
_U = np.uint64
BATCH_ARRAYS = [
    np.zeros(4, np.float64), np.zeros(4, object), np.ones(4, bool), np.zeros((2, 2), _U),
    (np.arange(8, dtype=_U) << 12)[::2], np.arange(3, dtype=_U), np.zeros(0, _U), np.full(4, -1, np.int64),
    np.full(4, (1 << 64) - 1, _U), np.array(["a"] * 4), np.zeros(4, np.complex128), np.zeros(4, np.int8),
    np.zeros(4, ">u8"), [1, 2, 3, 4], [1.5] * 4, [None] * 4, "abcd", np.array([[1], [2], [3], [4]], _U),
    np.full(4, 4095, _U), np.full(4, 4096, _U), np.ma.masked_array(np.zeros(4, _U)),
]


def _values(spec, w, pos):
    vals = list(HOSTILE)
    if pos in spec.alloc:
        vals = [v for v in vals if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                        and 1 << 20 < int(v) < 1 << 40)]
        vals.append(1 << 40)        # 1 TiB: MemoryError, deliberately
    vals += _hostile_objects(w)
    if spec.name == "Vm.page_fault_batch":
        vals += BATCH_ARRAYS
    return vals


def run_spec(spec):
    """Every hostile value at every position of one call; returns the failures (strings)."""
    failures = []
    w = world()
    nargs = len(spec.valid(w))
    positions = range(nargs) if nargs else [None]
    for pos in positions:
        for val in (_values(spec, w, pos) if pos is not None else [None]):
            args = spec.valid(w)
            if pos is not None:
                args[pos] = val
            try:
                spec.fn(w, *args)
            except spec.allowed():
                pass
            except InvariantError as e:
                failures.append(f"{spec.name}[{pos}]={val!r:.60}: InvariantError {e}")
            except BaseException as e:     # noqa: B902 -- anything else is the finding
                failures.append(f"{spec.name}[{pos}]={val!r:.60}: {type(e).__name__}: {e!s:.200}")
    # the valid call itself
    try:
        spec.fn(w, *spec.valid(w))
    except spec.allowed():
        pass
    except BaseException as e:
        failures.append(f"{spec.name}(valid): {type(e).__name__}: {e!s:.200}")
    try:
        check_all(w)
    except InvariantError as e:
        failures.append(f"{spec.name}: host.check() afterwards: {e}")
    return failures


def in_child(fn, *args):
    """Run fn(*args) in a forked child: (failures, None) or (None, how the child died)."""
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                               # the child
        os.close(r)
        try:
            out = pickle.dumps(("ok", fn(*args)))
        except BaseException:
            out = pickle.dumps(("exc", traceback.format_exc()))
        with os.fdopen(wfd, "wb") as fh:
            fh.write(out)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if not data:
        return None, f"exited with {os.WEXITSTATUS(status)} and no report"
    kind, payload = pickle.loads(data)
    if kind == "exc":
        return [f"the fuzz driver itself failed:\n{payload}"], None
    return payload, None


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_hostile_arguments(spec):
    if hasattr(os, "fork") and not os.environ.get("GMEM_FUZZ_NO_FORK"):
        failures, crash = in_child(run_spec, spec)
        assert crash is None, f"{spec.name}: the process crashed ({crash})"
    else:
        failures = run_spec(spec)
    assert not failures, "\n".join(failures[:40])


# ---------------------------------------------------- closed and destroyed objects

def _every_method(obj):
    for name in dir(obj):
        if name.startswith("_") or name in ("close",):
            continue
        attr = getattr(obj, name, None)
        if callable(attr):
            yield name, attr


def test_calls_on_closed_and_destroyed_objects():
    """Every public method of a closed VM (destroyed once its files are closed), its vCPU, a
    closed gmem file and a closed mapping, called with plausible arguments."""
    w = world()
    vm, v, f = w.snp, w.sv, w.f
    m = w.df.mmap(8192)
    m.close()
    f2 = w.f.dup()
    for obj in (w.snp, w.f, f2, w.closed_vm, w.closed_vcpu):
        obj.close() if hasattr(obj, "close") else None
    failures = []
    arg_sets = [(), (0,), (0, 0), (0, 4096), (0, 4096, 0), (0, 0, 0, 0), (0, 4096, 0, 0, 0),
                (1, GMEM, 0, 4096, HVA, -1, 0)]
    for obj in (vm, v, f, f2, w.closed_vm, w.closed_vcpu, m):
        for name, meth in _every_method(obj):
            for args in arg_sets:
                try:
                    meth(*args)
                except BASE_EXC + GUEST_EXC + (IndexError,):
                    pass
                except BaseException as e:
                    failures.append(f"{type(obj).__name__}.{name}{args}: {type(e).__name__}: {e}")
    check_all(w)
    assert not failures, "\n".join(failures)


def test_close_everything_in_any_order():
    """Closing VMs before their files and files before their VMs, twice each, leaves nothing
    behind: no folio, no RMP assignment, no SPTE."""
    w = world()
    for obj in (w.snp, w.m, w.f, w.sw, w.df, w.dflt, w.swf, w.lsnp, w.lf, w.foreign_f, w.foreign_vm,
                w.tdx, w.tf, w.ltf, w.ltdx, w.snp, w.f):
        obj.close()
        check_all(w)
    assert w.amd.rmp.assigned() == []
    assert w.amd.stats["folios"] == w.amd.stats["used_pages"] == 1     # the VMM's own page (write_user)
    assert w.intel.stats["folios"] == w.intel.stats["used_pages"] == 1


# ---------------------------------------------------------------- Hypothesis

def _hostile_strategy():
    return st.one_of(
        st.sampled_from(HOSTILE),
        st.integers(-(1 << 70), 1 << 70),
        st.integers(0, 1 << 24),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4), st.binary(max_size=8), st.none(), st.booleans(),
        st.lists(st.integers(-5, 1 << 40), max_size=4),
        st.builds(lambda xs, dt: np.array(xs, dtype=dt),
                  st.lists(st.integers(0, 1 << 40), max_size=5), st.sampled_from(["u8", "i8", "f8", "O", "?"])),
    )


_MIXED = [s for s in SPECS if not s.alloc and s.name not in ("Host", "PhysMem", "PhysMem.alloc_many")]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_hostile_argument_mixtures(data):
    """All argument positions hostile at once (in this process: a crash ends the run)."""
    w = _shared_world()
    spec = data.draw(st.sampled_from(_MIXED), label="call")
    n = len(spec.valid(w))
    args = [data.draw(_hostile_strategy(), label=f"arg{i}") for i in range(n)]
    try:
        spec.fn(w, *args)
    except spec.allowed():
        pass
    finally:
        # the world is shared between examples: failures one of them armed (inject_*) must
        # not leak into the next one's calls
        w.amd.inject_alloc_failures(0)
        w.intel.inject_alloc_failures(0)
        w.rmp.inject_rmpupdate_failures(0)
        w.amd.rmp.inject_rmpupdate_failures(0)
    check_all(w)


_WORLD = []


def _shared_world():
    if not _WORLD:
        _WORLD.append(world())
    return _WORLD[0]


def test_fault_batch_is_the_scalar_path_for_odd_arrays():
    """Arrays page_fault_batch accepts (non-contiguous, big-endian, small ints) give the same
    records as the same faults one at a time on a twin world."""
    w1, w2 = world(), world()
    gpas = (np.arange(16, dtype=np.uint64) << 12)[::2]
    ecs = np.full(16, ENC | A, ">u8")[::2]
    out = w1.snp.page_fault_batch(gpas, ecs)
    for i, (g, e) in enumerate(zip(gpas, ecs)):
        r = w2.sv.page_fault(int(g), int(e))
        assert (int(out["ret"][i]), int(out["level"][i]), int(out["pfn"][i])) == (r.ret, r.level, r.pfn)
    check_all(w1)
    check_all(w2)


if __name__ == "__main__":          # a quick way to see every finding at once
    for s in SPECS:
        fl, crash = in_child(run_spec, s)
        print(s.name, "CRASH " + crash if crash else "", *(fl or []), sep="\n  " if fl else " ")
    sys.exit(0)


# ---------------------------------------------------------- hooks that re-enter gmem

def _reentry_world(vm_type, **kw):
    h = gmem.Host(memory=64 * MB, platform="intel" if vm_type == u.KVM_X86_TDX_VM else "amd", **kw)
    vm = h.create_vm(vm_type)
    f = vm.create_guest_memfd(4 * MB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f, 0)
    vm.set_memory_attributes(0, 4 * MB, PRIVATE)
    return h, vm, f, vm.create_vcpu(0)


_REENTRY = {
    "close the file and the VM": lambda w: (w["f"].close(), w["vm"].close()),
    "punch the whole file": lambda w: w["f"].punch_hole(0, 4 * MB),
    "delete the memslot": lambda w: w["vm"].set_user_memory_region2(0, GMEM, 0, 0, HVA, w["f"], 0),
    "munmap the last mapping": lambda w: w["m"].close(),
}


@pytest.mark.parametrize("action", list(_REENTRY))
@pytest.mark.parametrize("hook", ["gmem_prepare", "gmem_invalidate", "private_max_mapping_level",
                                  "is_private_fault"])
def test_hooks_that_reenter_gmem(hook, action):
    """A hook that frees what the C path calling it holds (the file, the folio being prepared,
    the memslot, the VM) was a use-after-free (ASan: kvm_mmu_faultin_pfn_gmem read the freed
    memslot array; kvm_gmem_get_pfn shifted by a freed folio's order 255).  The kernel would
    deadlock on its own locks there; the model refuses with EDEADLK, which comes out of the call
    that ran the hook, and stays consistent."""
    h, vm, f, v = _reentry_world(u.KVM_X86_SW_PROTECTED_VM, huge_folios=True)
    w = dict(vm=vm, f=f)
    f2 = vm.create_guest_memfd(2 * MB, u.GUEST_MEMFD_FLAG_MMAP)
    w["m"] = f2.mmap(4096)
    f2.close()
    ret = {"gmem_prepare": 0, "gmem_invalidate": None, "private_max_mapping_level": 2,
           "is_private_fault": True}[hook]
    calls = []

    def broken(*args):
        calls.append(args)
        _REENTRY[action](w)
        return ret

    h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, **{hook: broken})
    with pytest.raises(OSError) as e:
        v.page_fault(2 * MB + 0x3000, u.PFERR_WRITE_MASK)
        f.punch_hole(0, 4 * MB)                 # the invalidate hook runs on free
    assert e.value.errno == errno.EDEADLK and calls
    h.check()
    h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, **{hook: None})
    assert v.page_fault(2 * MB + 0x3000, u.PFERR_WRITE_MASK).ret in (u.RET_PF_FIXED, u.RET_PF_SPURIOUS)
    _REENTRY[action](w)                         # outside a hook it is fine
    h.check()
