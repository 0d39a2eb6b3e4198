"""The machinery of the hostile suite (tests/test_hostile.py, issue 13).

- The public API, read from the type stubs (gmem/_core.pyi, parsed with ast): every class,
  constructor, method, property and function, with its parameters.  A method added to the
  stubs is attacked without any change here: its receiver and baseline arguments come from
  the tables below by class, name prefix and parameter name, with a fallback by annotation.
- EDGE_VALUES: the values put into every argument position.
- The invariant every case checks (`run_call`): only the documented exceptions come out,
  a refused call leaves the state as it was (`snapshot`), and host.check() passes afterwards.
- `run_batches`: runs cases in forked children, many per child, so that a crash, an abort or
  a hang fails the test naming the case instead of killing pytest; a batch that dies is run
  again case by case to find the culprit.
"""
import ast
import copy
import decimal
import errno
import faulthandler
import functools
import gc
import math
import os
import pickle
import random
import resource
import select
import signal
import struct
import tempfile
import threading
import time
import traceback
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import gmem
import gmem._core as core
from gmem import uapi as u
from test_fuzz import HVA, MB, check_all, world as fuzz_world

ENC = u.PFERR_GUEST_ENC_MASK
W = u.PFERR_WRITE_MASK
GMEM = u.KVM_MEM_GUEST_MEMFD
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


# ------------------------------------------------------------------ hostile values

class Hostile(Exception):
    """Raised by the hostile objects' own methods: gmem may let it through (it is the
    caller's own exception) but must not swallow it or crash on it."""


def _raise(*_):
    raise Hostile("hostile dunder")


class RaisingIndex:
    __index__ = _raise


class RaisingInt:
    __int__ = __float__ = _raise


class RaisingBool:
    __bool__ = __len__ = _raise


class RaisingEverything:
    """An object whose every conversion raises (and which compares equal to nothing)."""
    __index__ = __int__ = __float__ = __bool__ = __len__ = __iter__ = __hash__ = _raise
    __eq__ = __lt__ = __gt__ = __le__ = __ge__ = _raise


class LyingInt(int):
    """An int subclass (value 1) whose __index__ and __int__ say 2**70."""

    def __index__(self):
        return 1 << 70

    __int__ = __index__


_U8 = np.uint64

EDGE_VALUES = [
    ("None", lambda: None), ("True", lambda: True), ("False", lambda: False),
    ("-1", lambda: -1), ("2**31", lambda: 1 << 31), ("2**32", lambda: 1 << 32), ("2**63", lambda: 1 << 63),
    ("2**64-1", lambda: (1 << 64) - 1), ("2**64", lambda: 1 << 64), ("-2**63", lambda: -(1 << 63)),
    ("-2**63-1", lambda: -(1 << 63) - 1), ("2**200", lambda: 1 << 200), ("-2**200", lambda: -(1 << 200)),
    ("0.5", lambda: 0.5), ("1.0", lambda: 1.0), ("nan", lambda: math.nan), ("inf", lambda: math.inf),
    ("1j", lambda: 1j), ("Fraction(1)", lambda: Fraction(1)), ("Fraction(1,3)", lambda: Fraction(1, 3)),
    ("Decimal(1)", lambda: decimal.Decimal(1)),
    ("''", lambda: ""), ("'1'", lambda: "1"), ("b''", lambda: b""), ("b'\\0'*8", lambda: b"\0" * 8),
    ("bytearray", lambda: bytearray(b"xy")), ("memoryview", lambda: memoryview(b"xy")),
    ("[]", lambda: []), ("[1]", lambda: [1]), ("()", lambda: ()), ("{}", lambda: {}),
    ("{'gfn': 1}", lambda: {"gfn": 1}), ("set()", lambda: set()), ("object()", lambda: object()),
    ("int (a type)", lambda: int), ("a function", lambda: (lambda *a, **k: None)), ("slice(0,1)", lambda: slice(0, 1)),
    ("range(3)", lambda: range(3)), ("Ellipsis", lambda: ...),
    ("RaisingIndex", RaisingIndex), ("RaisingInt", RaisingInt), ("RaisingBool", RaisingBool),
    ("RaisingEverything", RaisingEverything), ("LyingInt", lambda: LyingInt(1)),
    # numpy scalars of every kind
    ("np.int8(-1)", lambda: np.int8(-1)), ("np.int16(-1)", lambda: np.int16(-1)),
    ("np.int32(-2**31)", lambda: np.int32(-(1 << 31))), ("np.int64(-1)", lambda: np.int64(-1)),
    ("np.int64(2**62)", lambda: np.int64(1 << 62)), ("np.uint8(255)", lambda: np.uint8(255)),
    ("np.uint16(1)", lambda: np.uint16(1)), ("np.uint32(2**32-1)", lambda: np.uint32((1 << 32) - 1)),
    ("np.uint64(2**64-1)", lambda: np.uint64((1 << 64) - 1)), ("np.float16(1)", lambda: np.float16(1)),
    ("np.float32(nan)", lambda: np.float32(math.nan)), ("np.float64(1)", lambda: np.float64(1)),
    ("np.longdouble(1)", lambda: np.longdouble(1)), ("np.complex64(1)", lambda: np.complex64(1)),
    ("np.bool_(True)", lambda: np.bool_(True)), ("np.str_('1')", lambda: np.str_("1")),
    ("np.bytes_(b'1')", lambda: np.bytes_(b"1")), ("np.datetime64(1,'s')", lambda: np.datetime64(1, "s")),
    ("np.timedelta64(1,'s')", lambda: np.timedelta64(1, "s")),
    # numpy arrays of the wrong shape, dtype, layout
    ("np.array(5) (0-d)", lambda: np.array(5, _U8)), ("np.zeros(0)", lambda: np.zeros(0, _U8)),
    ("np.zeros((2,2))", lambda: np.zeros((2, 2), _U8)), ("float array", lambda: np.zeros(3)),
    ("object array", lambda: np.array([None, 1, "x"], dtype=object)), ("bool array", lambda: np.ones(3, bool)),
    ("int8 array -1", lambda: np.full(3, -1, np.int8)), ("big-endian array", lambda: np.arange(3, dtype=">u8")),
    ("strided array", lambda: np.arange(6, dtype=_U8)[::2]), ("read-only array", lambda: _readonly(np.zeros(3, _U8))),
    ("structured array", lambda: np.zeros(3, gmem.FAULT_DTYPE)), ("str array", lambda: np.array(["a", "b"])),
]


def _readonly(a):
    a.flags.writeable = False
    return a


# values that size a buffer: MemoryError is the documented answer to them (a Python object
# cannot hold 2**31 bytes here: the children run under an address-space limit)
ALLOCATION_PARAMS = {"n", "capacity", "nr_pages", "memory"}


# ----------------------------------------------------------------- the public API

class Member(SimpleNamespace):
    """One public callable of the stubs: cls (None for a module function), name, kind
    ("constructor", "method", "property", "function") and params [(name, kind, default)]
    with kind "pos", "var" (*args) or "kw" (keyword-only); default is ast's node or None."""

    @property
    def qualname(self):
        return f"{self.cls}.{self.name}" if self.cls else self.name


def stub_path():
    return Path(core.__file__).with_name("_core.pyi")


def _params(fn, skip_first):
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    out = [(p.arg, "pos", d) for p, d in zip(pos, defaults)][1 if skip_first else 0:]
    if a.vararg:
        out.append((a.vararg.arg, "var", None))
    out += [(p.arg, "kw", d) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return out


@functools.lru_cache(maxsize=None)
def public_api():
    """Every public member of gmem._core as the stubs declare it (overloads merged)."""
    tree = ast.parse(stub_path().read_text())
    members = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            members[node.name] = Member(cls=None, name=node.name, kind="function",
                                        params=_params(node, False))
        if not isinstance(node, ast.ClassDef) or node.name.startswith("_") and node.name != "_Injection":
            continue
        if any(isinstance(b, ast.Name) and b.id in ("TypedDict", "NamedTuple") for b in node.bases):
            continue            # dicts and tuples returned by the API, not classes of gmem
        for f in node.body:
            if not isinstance(f, ast.FunctionDef):
                continue
            decos = {ast.unparse(d) for d in f.decorator_list}
            if f.name in ("__init__", "__new__"):
                kind = "constructor"
            elif "property" in decos:
                kind = "property"
            elif f.name.startswith("_") and f.name not in ("__getitem__", "__setitem__", "__eq__",
                                                            "__enter__", "__exit__", "__len__"):
                continue
            else:
                kind = "method"
            m = Member(cls=node.name, name=f.name, kind=kind, params=_params(f, True))
            members[m.qualname] = m
    return tuple(members.values())


def live_class(name):
    return getattr(core, name)


# ------------------------------------------------------------------------- world

def world():
    """tests/test_fuzz.py's world (two hosts with a VM of every kind, closed and foreign
    objects), plus a populated XArray and PhysMem."""
    w = fuzz_world()
    w.xa = gmem.XArray()
    for i in range(40):
        w.xa.store(i * 3, i)
    w.xa.store(512, 1, order=9)
    w.xa.set_mark(3, 1)
    w.pm = gmem.PhysMem(16 * MB)
    w.pm_block = w.pm.alloc(2)
    w.pm_folio = w.pm.folio_alloc(2)
    w.pm.alloc_many(5, 0)
    return w


def check_world(w):
    """host.check() on every host that is not a scratch one, and the structures' own checks."""
    check_all(w)
    w.xa.check()
    w.pm.check()


def fresh_fault(w):
    return gmem.FaultResult(5, 0, None, 1, 0)


# The object a member is called on: by class, then by the longest name prefix that matches.
RECEIVERS = {
    "XArray": lambda w: w.xa, "PhysMem": lambda w: w.pm, "Trace": lambda w: w.amd.trace,
    "Host": lambda w: w.amd, "_Injection": lambda w: w.amd.inject(), "FaultResult": fresh_fault,
    "GuestExit": lambda w: gmem.GuestExit(fresh_fault(w)), "GuestFault": lambda w: gmem.GuestFault(14, 0, "m"),
    "HypercallExit": lambda w: gmem.HypercallExit(12, (0, 1, 0)),
    "Vm": lambda w: w.snp, "Vm.snp_launch": lambda w: w.lsnp, "Vm.tdx_": lambda w: w.ltdx,
    "Vcpu": lambda w: w.sv, "Vcpu.tdx_": lambda w: w.tv, "Vcpu.tdx_init_mem_region": lambda w: w.ltv,
    "GuestMemfd": lambda w: w.f, "GuestMemfd.mmap": lambda w: w.df, "Mapping": lambda w: w.m,
    # the raw RMP instructions corrupt the RMP on purpose: a scratch host nobody checks
    "Rmp": lambda w: w.amd.rmp, **{f"Rmp.{n}": (lambda w: w.rmp) for n in
                                   ("rmpupdate", "psmash", "make_private", "make_shared", "inject_rmpupdate_failures")},
}


@functools.lru_cache(maxsize=None)
def _table_key(keys, cls, key):
    """The entry of a table for a member: its class, or the longest "Class.prefix" it has."""
    return max([k for k in keys if k == cls or (k.startswith(f"{cls}.") and key.startswith(k))], key=len)


def _lookup(table, member):
    return table[_table_key(tuple(table), member.cls, member.qualname)]


def receiver(w, member):
    return _lookup(RECEIVERS, member)(w)


SCRATCH = {"scratch", "rmp"}        # the host the raw RMP instructions may corrupt


def candidates(w, member):
    """The objects of the world a random call of member may go to: every one of its class
    (closed and foreign ones included) but the scratch host's, which only the raw RMP
    instructions use (through their receiver)."""
    objs = [v for k, v in sorted(vars(w).items()) if type(v).__name__ == member.cls and k not in SCRATCH]
    return objs if objs and member.cls != "Rmp" else [receiver(w, member)]


# Baseline (valid) arguments: by member, then by parameter name, then by annotation.
BASELINE = {
    "XArray.store": dict(index=512, value=7, order=9),
    "XArray.split": dict(index=512, order=3),
    "PhysMem.free": lambda w: dict(pfn=w.pm_block, order=2),
    "PhysMem.free_many": lambda w: dict(pfns=w.pm.alloc_many(2, 0)),
    "PhysMem.folio_put": lambda w: dict(pfn=w.pm_folio),
    "PhysMem.folio_split": lambda w: dict(pfn=w.pm_folio, order=0),
    "Trace.enable": dict(events="spte_install", capacity=64), "Trace.disable": dict(events="spte_install"),
    "Host.__init__": dict(memory=16 * MB), "Host.register_hooks": dict(vm_type=9),
    "Host.touch": lambda w: dict(pfn=w.amd.nr_pages - 1), "Host.memory_failure": lambda w: dict(pfn=w.amd.nr_pages - 1),
    "Host.write_user": dict(hva=HVA + 40 * MB),
    "FaultResult.__init__": dict(ret=5, exit_reason=0, memory_fault=None, level=1, pfn=0),
    "GuestFault.__init__": dict(vector=14, code=0, message="m"),
    "HypercallExit.__init__": dict(nr=12, args=(0, 1, 0)),
    "Vm.__init__": lambda w: dict(host=w.other, vm_type=0),
    "Vm.create_vcpu": dict(vcpu_id=1), "Vm.create_guest_memfd": dict(size=8192),
    "Vm.set_user_memory_region2": lambda w: dict(slot=3, flags=GMEM, guest_phys_addr=8 * MB, memory_size=8192,
                                                 userspace_addr=HVA + 64 * MB, guest_memfd=w.f,
                                                 guest_memfd_offset=3 * MB),
    "Vm.set_user_memory_region": dict(slot=1, flags=0, guest_phys_addr=16 * MB, memory_size=8192,
                                      userspace_addr=HVA + 96 * MB),
    "Vm.set_memory_attributes": dict(address=0x2000, size=0x2000, attributes=0),
    "Vm.enable_cap": dict(cap=u.KVM_CAP_EXIT_HYPERCALL, args=1 << u.KVM_HC_MAP_GPA_RANGE),
    "Vm.tdx_init_vm": dict(gpaw=48), "Vm.inject_invalidation": dict(gpa=0, size=4096),
    "Vcpu.__new__": lambda w: dict(vm=w.snp, vcpu_id=7), "Vcpu.page_fault": dict(gpa=0x2000),
    "Vcpu.write": dict(gpa=0x1000, data=b"data", error_code=ENC | W), "Vcpu.read": dict(n=8),
    "Vcpu.pre_fault_memory": dict(gpa=0x200000, size=4096),
    "Vcpu.tdx_accept": dict(gpa=0x5000), "Vcpu.psc_msr": dict(gpa=0x5000),
    "Vcpu.tdx_map_gpa": lambda w: dict(gpa=w.tdx.shared_gpa_bit | 0x200000, size=0x200000),
    "Vcpu.tdx_init_mem_region": dict(source_addr=HVA + 32 * MB, gpa=0x1000, nr_pages=1),
    "GuestMemfd.ftruncate": dict(length=4096), "GuestMemfd.allocate": dict(offset=2 * MB),
    "GuestMemfd.mmap": dict(length=4096), "GuestMemfd.punch_hole": dict(length=4096),
    "Mapping.__getitem__": dict(key=slice(0, 4)), "Mapping.__setitem__": dict(key=slice(0, 2), value=b"xy"),
    "Rmp.rmpupdate": dict(pfn=512, assigned=True, pagesize=1, asid=1),
    "Rmp.psmash": dict(pfn=512), "Rmp.make_private": dict(pfn=1024, gpa=0, level=1, asid=1),
    "Rmp.make_shared": dict(pfn=1024, level=1), "Rmp.view": dict(start=0, stop=16),
    "page_states": lambda w: dict(vm=w.snp, gpa=0, size=8192),
    "Rmp.__new__": lambda w: dict(host=w.scratch),
}
BY_NAME = {
    "index": 3, "value": 7, "order": 0, "first": 0, "last": 100, "start": 0, "mark": 0,
    "indices": lambda w: np.arange(3, dtype=_U8), "values": lambda w: np.arange(3, dtype=_U8),
    "memory": 16 * MB, "start_pfn": 0, "n": 4, "pfn": 0, "pfns": lambda w: np.zeros(0, _U8),
    "host": lambda w: w.amd, "cap": u.KVM_CAP_GUEST_MEMFD, "vm_type": 0, "hva": HVA + 32 * MB,
    "data": b"x", "write": True, "limit": 4, "gpa": 0x1000, "error_code": ENC, "size": 8192, "gfn": 1,
    "policy": 0x30000, "gfn_start": 4, "uaddr": HVA + 32 * MB, "length": 8192, "page_type": 1,
    "gpas": lambda w: np.arange(4, dtype=_U8) << 12, "error_codes": lambda w: np.full(4, ENC, _U8),
    "vcpu_id": 0, "pagesize": 0, "validate": False, "attrs": 0x101, "op": 2,
    "entries": lambda w: [dict(gfn=0x10, operation=2), dict(gfn=0x11, operation=1)],
    "ret": 0, "offset": 0, "whence": 0, "mode": u.FALLOC_FL_KEEP_SIZE, "prot": 3, "flags": 0,
    "src": lambda w: w.f, "vm": lambda w: w.snp, "result": fresh_fault, "other": fresh_fault,
    "file": None, "key": 0, "stop": 16, "code": 3, "nr": 12, "args": (0, 1, 0), "message": "m",
    "vector": 14, "exc_type": None, "exc": None, "tb": None, "events": "spte_install", "assigned": True,
}
BY_ANNOTATION = {"_Int": 0, "int": 0, "bool": False, "str": "", "bytes": b"x", "_Bytes": b"x",
                 "Host": lambda w: w.amd, "Vm": lambda w: w.snp, "Vcpu": lambda w: w.sv,
                 "GuestMemfd": lambda w: w.f, "npt.ArrayLike": lambda w: np.zeros(1, _U8)}


def _value(v, w):
    return v(w) if callable(v) and getattr(v, "__name__", "") == "<lambda>" else v


def baseline(w, member):
    """{param: value} for this member's parameters that have a baseline (the others are
    left to their defaults)."""
    table = BASELINE.get(member.qualname, {})
    if callable(table):
        try:
            table = table(w)
        except Exception:           # e.g. an internal class that can no longer be built
            table = {}
    out = {}
    for name, kind, default in member.params:
        if name in table:
            out[name] = table[name]
        elif default is not None and not (isinstance(default, ast.Constant) and default.value is ...):
            continue                # the stub's default is a fine baseline: leave it out
        elif name in BY_NAME:
            out[name] = _value(BY_NAME[name], w)
    return out


def call_args(w, member, replace=None):
    """(args, kwargs) for one call: the baseline, with param index `replace[0]` given
    `replace[1]`.  Positional parameters before a given one are filled in."""
    base = baseline(w, member)
    if replace is not None:
        base[member.params[replace[0]][0]] = replace[1]
    args, kwargs = [], {}
    last = max([i for i, (n, k, d) in enumerate(member.params) if n in base and k == "pos"], default=-1)
    for i, (name, kind, default) in enumerate(member.params):
        if kind == "pos" and i <= last:
            if name not in base:
                base[name] = _fallback(w, member, i)
            args.append(base[name])
        elif kind == "var" and name in base:
            args.append(base[name])
        elif kind == "kw" and name in base:
            kwargs[name] = base[name]
    return args, kwargs


def _fallback(w, member, i):
    default = member.params[i][2]
    if default is not None and not (isinstance(default, ast.Constant) and default.value is ...):
        return ast.literal_eval(default)
    return None


def invoke(w, member, args, kwargs, recv=None, base=False):
    """Make the call a member stands for (base: gmem's own method on recv, whatever recv's
    class overrides)."""
    if member.kind == "function":
        return getattr(core, member.name)(*args, **kwargs)
    if member.kind == "constructor":
        return live_class(member.cls)(*args, **kwargs)
    obj = receiver(w, member) if recv is None else recv
    if base:
        attr = getattr(live_class(member.cls), member.name)
        return attr.__get__(obj) if member.kind == "property" else attr(obj, *args, **kwargs)
    attr = getattr(obj, member.name)
    return attr if member.kind == "property" else attr(*args, **kwargs)


# ------------------------------------------------------------------ the invariant

ALLOWED = (OSError, TypeError, ValueError, gmem.GuestExit, gmem.GuestFault, gmem.SigBus,
           gmem.RmpViolation, Hostile)
GUEST_OUTCOMES = (gmem.GuestExit, gmem.GuestFault, gmem.SigBus, gmem.RmpViolation)
# calls documented to keep partial progress when they fail part-way
PARTIAL = {"GuestMemfd.fallocate", "GuestMemfd.allocate", "Vcpu.tdx_init_mem_region"}


def _fingerprint(obj):
    """The state of one object of the world, as far as a refused call could change it (the
    RMP through the hosts' RMP counters and the guests' page states, the fault counters
    through the world's vCPUs)."""
    if isinstance(obj, gmem.Host):
        # an injected allocation failure (host.inject) is consumed by the call it makes fail:
        # counting it is not a change the refusal left behind
        stats = {k: v for k, v in obj.stats.items() if k != "alloc_failures"}
        return (stats, obj.rmp.stats if obj.rmp else None, obj.trace.enabled)
    if isinstance(obj, gmem.Vm):
        if obj.destroyed:
            return ("destroyed", obj.closed)
        return (obj.closed, obj.sptes(), obj.memslots(), sorted(obj.vcpus), obj.td_state, obj.nr_premapped,
                obj.sept(), obj.launch_digest, obj.vmsa_pfns,
                gmem.page_states(obj, 0, 256 << 10).tobytes())     # where the baselines point
    if isinstance(obj, (gmem.GuestMemfd, gmem.Mapping)):
        return obj.closed
    if isinstance(obj, gmem.Vcpu):
        return obj.stats
    if isinstance(obj, gmem.XArray):
        return [list(obj.items(mark=m)) for m in (None, 0, 1, 2)]
    if isinstance(obj, gmem.PhysMem):
        return (obj.free_blocks(), obj.folios(), obj.nr_free_pages)
    return None


def _diff(before, after):
    """Where two fingerprints differ, briefly."""
    if isinstance(before, dict) and isinstance(after, dict):
        return ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
                         if before.get(k) != after.get(k))
    if isinstance(before, (tuple, list)) and isinstance(after, (tuple, list)) and len(before) == len(after):
        return "; ".join(_diff(b, a) for b, a in zip(before, after) if b != a)
    return f"{describe(before)} -> {describe(after)}"


def snapshot(w):
    """What a refused call must not change: every host's, VM's, file's and structure's state."""
    return [(k, _fingerprint(v)) for k, v in sorted(vars(w).items())]


def describe(v):
    try:
        s = repr(v)
    except Exception:
        s = f"<{type(v).__name__}>"
    return s if len(s) < 60 else s[:57] + "..."


def run_call(w, member, args, kwargs, value_name=None, param=None, recv=None):
    """Call once and check the invariant: a failure message, or None."""
    where = f"{member.qualname}" + (f"({param}={value_name})" if param else "")
    extra = _extra_allowed(member, param)
    before = snapshot(w)
    try:
        invoke(w, member, args, kwargs, recv)
    except ALLOWED + extra as e:
        if isinstance(e, OSError) and e.errno is None:
            return f"{where}: OSError without an errno: {e}"
        if not isinstance(e, GUEST_OUTCOMES) and member.qualname not in PARTIAL:
            after = snapshot(w)
            if after != before:
                changed = [f"{k}: {_diff(b, a)}" for (k, a), (_, b) in zip(after, before) if a != b]
                return f"{where}: refused with {type(e).__name__} ({e}) but changed {'; '.join(changed)}"
    except BaseException as e:          # noqa: B902 -- anything else is the finding
        return f"{where}: {type(e).__name__}: {str(e)[:200]}"
    try:
        check_world(w)
    except AssertionError as e:
        return f"{where}: host.check() afterwards: {e}"
    return None


def _extra_allowed(member, param=None):
    extra = ()
    if member.qualname in ("Mapping.__getitem__", "Mapping.__setitem__"):
        extra = (IndexError,)           # the sequence protocol's own error
    if param in ALLOCATION_PARAMS:
        extra += (MemoryError,)
    return extra


_LAST = ("close", "__exit__")           # members that end an object's life: called last


def members_of(cls_name):
    """cls_name's public methods and properties, the ones that close it last."""
    ms = [m for m in public_api() if m.cls == cls_name and m.kind in ("method", "property")]
    return sorted(ms, key=lambda m: m.name in _LAST)


def poke_members(w, obj, cls_name, base=False):
    """Call every public method and property of cls_name on obj with baseline arguments:
    the failures (anything but the documented exceptions), then host.check() on the world."""
    failures = []
    for m in members_of(cls_name):
        try:
            args, kwargs = call_args(w, m)
            invoke(w, m, args, kwargs, recv=obj, base=base)
        except ALLOWED + _extra_allowed(m):
            pass
        except BaseException as e:      # noqa: B902 -- anything else is the finding
            failures.append(f"{m.qualname} on {describe(obj)}: {type(e).__name__}: {str(e)[:200]}")
    try:
        check_world(w)
    except AssertionError as e:
        failures.append(f"host.check() afterwards: {e}")
    return failures


# ------------------------------------------------------------------ the runner

def _under_asan():
    return "asan" in os.environ.get("LD_PRELOAD", "")


# per batch: a hang fails (a batch takes a second or two; under ASan, ten times that)
TIMEOUT = float(os.environ.get("GMEM_HOSTILE_TIMEOUT", "60" if _under_asan() else "20"))
ADDRESS_SPACE = 1 << 30          # extra address space a child may take (MemoryError past it)


def _limit_memory():
    """Keep a runaway allocation from eating the machine: an address-space limit (under ASan,
    whose shadow memory needs terabytes of address space, ASAN_OPTIONS's
    max_allocation_size_mb / allocator_may_return_null do the same job)."""
    if _under_asan():
        return
    with open("/proc/self/statm") as fh:
        vsz = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _send(fd, obj):
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(data)) + data)


def _child(setup, cases, run_one, wfd):
    """In the child: one world, every case in turn; a record per case as it ends."""
    try:
        faulthandler.disable()      # pytest's: it would re-raise a SEGV from its own handler
        gc.freeze()                 # the parent's objects: a collection here need not walk them
        _limit_memory()
        w = setup()
        for i, case in enumerate(cases):
            failure = run_one(w, case)      # a message, a list of them, or None
            if failure:
                # a failed case may leave a broken world: the next gets a fresh one (dropping
                # the old one may crash: the case is reported once that is over)
                w = None
                w = setup()
            _send(wfd, ("case", i, failure))
        _send(wfd, ("done",))
    except BaseException:
        _send(wfd, ("error", traceback.format_exc()))
    os._exit(0)


def _fork_batch(setup, cases, run_one, timeout):
    """Run cases in one forked child: (results by case index, None) or (results so far,
    what went wrong: a crash, a hang or an exception outside the cases)."""
    r, wfd = os.pipe()
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(err.fileno(), 2)
        _child(setup, cases, run_one, wfd)
    os.close(wfd)
    results, buf, end, status = {}, b"", None, None
    deadline = time.monotonic() + timeout
    while end is None:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            end = f"hung (no answer within {timeout:.0f} s)"
            break
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack("<I", buf[:4])[0]:
            n = struct.unpack("<I", buf[:4])[0]
            rec, buf = pickle.loads(buf[4:4 + n]), buf[4 + n:]
            if rec[0] == "case":
                results[rec[1]] = rec[2]
            elif rec[0] == "done":
                end = "done"
            else:
                end = f"the batch itself failed:\n{rec[1]}"
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if end is None:
        how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"exited with status {os.WEXITSTATUS(status)}")
        err.seek(0)
        text = err.read().decode(errors="replace")
        # a sanitizer's verdict first (its stack traces would push it out of the tail)
        verdict = [ln for ln in text.splitlines() if "ERROR: AddressSanitizer" in ln
                   or ln.startswith("SUMMARY:") or "runtime error:" in ln][:4]
        end = f"crashed ({how})" + "".join(f"\n{ln}" for ln in verdict)
        if text.strip():
            end += f"\nits stderr ends:\n{text[-2000:]}"
    return results, (None if end == "done" else end)


def _attempt(_, fn):
    try:
        fn()
    except BaseException:
        return traceback.format_exc()
    return None


def run_isolated(fn, timeout=None):
    """fn() in a forked child: None, or how it failed (its traceback, a crash, a hang)."""
    results, broken = _fork_batch(lambda: None, [fn], _attempt, TIMEOUT if timeout is None else timeout)
    return broken or results.get(0)


def run_batches(setup, cases, run_one, describe_case, batch_size=200, timeout=None):
    """Run run_one(world, case) for every case, in forked children of batch_size cases each.
    run_one returns a failure message or None.  Returns (failures, number of cases run)."""
    timeout = TIMEOUT if timeout is None else timeout
    failures, todo = [], [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    while todo:
        batch = todo.pop(0)
        results, broken = _fork_batch(setup, batch, run_one, timeout)
        for m in results.values():
            failures += m if isinstance(m, list) else [m] if m else []
        if broken is None:
            continue
        # the child died in the case after the last one it reported: that case again, alone in
        # a fresh world, names the culprit; the rest of the batch goes on in a new child
        k = len(results)
        if k == len(batch):             # after its last case: rebuilding the world, or exiting
            failures.append(f"after {describe_case(batch[-1])}: {broken}")
            continue
        res, alone = _fork_batch(setup, [batch[k]], run_one, timeout)
        if alone:
            failures.append(f"{describe_case(batch[k])}: {alone}")
        else:
            failures.append(f"{describe_case(batch[k])}: {broken}\n  (only after the cases before it in "
                            f"its batch: alone it gave {res.get(0) or 'no failure'})")
        if batch[k + 1:]:
            todo.insert(0, batch[k + 1:])
    return failures, len(cases)


# ------------------------------------------------------------------ hook re-entry

HOOK_TYPE = 12                  # a VM type the host lacks: register_hooks makes it creatable
HOOK_RETURNS = {"is_private_fault": True, "gmem_prepare": 0, "gmem_invalidate": None,
                "private_max_mapping_level": 2}


def hook_world():
    """The world, plus a guest of HOOK_TYPE on w.amd (huge folios) whose fault at gpa 0 runs
    is_private_fault, gmem_prepare and private_max_mapping_level, and whose hole punch over
    it runs gmem_invalidate."""
    w = world()
    w.amd.register_hooks(HOOK_TYPE)
    w.hvm = w.amd.create_vm(HOOK_TYPE)
    w.hf = w.hvm.create_guest_memfd(4 * MB, u.GUEST_MEMFD_FLAG_MMAP)
    w.hvm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA + 128 * MB, w.hf, 0)
    w.hvm.set_memory_attributes(0, 4 * MB, PRIVATE)
    w.hm = w.hf.mmap(4096)
    w.hv = w.hvm.create_vcpu(0)
    return w


# inside a hook, the objects of the class are those the hook runs under
REENTRY_RECEIVERS = {"Vm": "hvm", "Vcpu": "hv", "GuestMemfd": "hf", "Mapping": "hm"}


def hook_trigger(w):
    """Run all four hooks: the fault, then the punch (each step's documented exceptions are
    the outcome; anything else propagates)."""
    for step in (lambda: w.hv.page_fault(0, W), lambda: w.hf.punch_hole(0, 2 * MB)):
        try:
            step()
        except ALLOWED:
            pass


def reentry_case(w, case):
    """A hook in one slot calls member back into the model (once per trigger: the hook does
    not re-enter itself); the trigger must end in the documented exceptions, with
    host.check() clean."""
    hook, member = case
    ran = []
    args, kwargs = call_args(w, member)
    recv = None
    if member.kind in ("method", "property"):
        name = REENTRY_RECEIVERS.get(member.cls)
        recv = getattr(w, name) if name else receiver(w, member)

    def hostile(*_):
        ran.append(1)
        if len(ran) == 1:
            invoke(w, member, args, kwargs, recv)
        return HOOK_RETURNS[hook]

    # undo what an earlier case's call may have left: a fresh, private folio to fault (prepared
    # again, mapped huge), no failure injected
    w.hvm.set_memory_attributes(0, 4 * MB, PRIVATE)
    w.hf.punch_hole(0, 4 * MB)
    w.amd.inject()
    w.amd.rmp.inject_rmpupdate_failures(0)
    w.amd.register_hooks(HOOK_TYPE, **{hook: hostile})
    try:
        hook_trigger(w)
    except _extra_allowed(member):
        pass
    except BaseException as e:          # noqa: B902 -- anything else is the finding
        return f"{hook} -> {member.qualname}: {type(e).__name__}: {str(e)[:200]}"
    finally:
        w.amd.register_hooks(HOOK_TYPE, **{hook: None})
    if not ran:
        return f"{hook} -> {member.qualname}: the hook never ran"
    try:
        check_world(w)
    except AssertionError as e:
        return f"{hook} -> {member.qualname}: host.check() afterwards: {e}"
    return None


# ---------------------------------------------------------------------- lifetimes

def _ctor(cls_name):
    return next((m for m in public_api() if m.cls == cls_name and m.kind == "constructor"),
                Member(cls=cls_name, name="__new__", kind="constructor", params=[]))


def _junk_subclass(cls):
    """A subclass whose every public method and property returns None: gmem's own methods
    that call one of them virtually (create_vcpu from page_fault_batch...) get None back."""
    over = {}
    for m in members_of(cls.__name__):
        over[m.name] = property(lambda self: None) if m.kind == "property" else (lambda self, *a, **k: None)
    return type(f"Junk{cls.__name__}", (cls,), over)


def _lazy_subclass(cls):
    return type(f"Lazy{cls.__name__}", (cls,), {"__init__": lambda self, *a, **k: None})


def _orphan(cls_name):
    """An object of cls_name left over from a guest whose every other object was dropped: the
    VM closed (and destroyed, unless the object is its file or mapping), the host, VM and
    files reachable only through it, cycles through a hook closure for the collector."""
    h = gmem.Host(memory=16 * MB, huge_folios=True)
    vm = h.create_vm(u.KVM_X86_SW_PROTECTED_VM)
    f = vm.create_guest_memfd(4 * MB, u.GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MB, HVA, f, 0)
    vm.set_memory_attributes(0, 2 * MB, PRIVATE)
    v, m = vm.create_vcpu(0), f.mmap(4096)
    h.register_hooks(u.KVM_X86_SW_PROTECTED_VM, gmem_invalidate=lambda *a: (h, vm, f, v, m))
    v.page_fault(0, W)
    v.page_fault(2 * MB, W)
    keep = dict(Vcpu=v, Mapping=m, Rmp=h.rmp, Trace=h.trace, GuestMemfd=f)[cls_name]
    vm.close()
    if cls_name not in ("GuestMemfd", "Mapping"):
        m.close()
        f.close()
    return keep


def _existing(w, cls_name):
    """A live object of the class (an Rmp of the scratch host: poking it runs the raw RMP
    instructions)."""
    return w.rmp if cls_name == "Rmp" else RECEIVERS[cls_name](w)


def lifetime_case(w, case):
    """One attack on the life of an object of cls_name (how: closed, reinit, new, lazy,
    junk, copy): the object must then answer every member with the documented exceptions
    only, and leave host.check() clean."""
    how, name = case
    if how in ("closed", "orphaned"):
        obj = getattr(w, name) if how == "closed" else _orphan(name)
        gc.collect()
        failures = poke_members(w, obj, type(obj).__name__)
        return f"{how} {name}:\n  " + "\n  ".join(failures) if failures else None
    cls_name, cls = name, live_class(name)
    args, kwargs = call_args(w, _ctor(cls_name))
    objs, base = [], False
    try:
        if how == "reinit":
            objs = [_existing(w, cls_name)]
            objs[0].__init__(*args, **kwargs)
        elif how == "new":
            objs = [cls.__new__(cls, *args, **kwargs)]
        elif how == "lazy":
            objs = [_lazy_subclass(cls)(*args, **kwargs)]
        elif how == "junk":
            objs, base = [_junk_subclass(cls)(*args, **kwargs)], True
        elif how == "copy":
            orig = _existing(w, cls_name)
            for dup in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
                try:
                    objs.append(dup(orig))
                except (TypeError, pickle.PickleError):
                    pass
            objs.append(orig)           # the original still works once its copies are gone
    except ALLOWED + (pickle.PickleError,):
        return None                     # refused to be made that way: fine
    except BaseException as e:          # noqa: B902
        return f"{how} {cls_name}: {type(e).__name__}: {str(e)[:200]}"
    failures = []
    for obj in objs:
        failures += poke_members(w, obj, cls_name, base=base)
        del obj
        gc.collect()
    return f"{how} {cls_name}:\n  " + "\n  ".join(failures) if failures else None


def lifetime_cases():
    classes = sorted({m.cls for m in public_api() if m.cls})
    cases = [("closed", name) for name in ("closed_vm", "closed_vcpu", "closed_f", "closed_m")]
    cases += [("orphaned", name) for name in ("Vcpu", "Mapping", "Rmp", "Trace", "GuestMemfd")]
    return cases + [(how, c) for c in classes for how in ("reinit", "new", "lazy", "junk", "copy")]


# ------------------------------------------------------- random sequences, threads

def _callables():
    return [m for m in public_api() if m.kind != "constructor" or m.cls in ("Vm", "Vcpu", "XArray", "PhysMem")]


def random_step(w, rng, members, edge=0.3):
    """One random call: a random member on a random object of its class, baseline arguments
    with (probability edge) one of them an edge value.  (description, failure or None)."""
    m = rng.choice(members)
    replace, label, param = None, None, None
    if m.params and rng.random() < edge:
        i = rng.randrange(len(m.params))
        label, make = rng.choice(EDGE_VALUES)
        replace, param = (i, make()), m.params[i][0]
    args, kwargs = call_args(w, m, replace)
    recv = None
    if m.kind in ("method", "property"):
        recv = rng.choice(candidates(w, m))
    where = f"{m.qualname}" + (f"({param}={label})" if param else "") + (f" on {describe(recv)}" if recv else "")
    return where, run_call(w, m, args, kwargs, label, param, recv)


def random_sequence(w, seed, steps=200):
    """A seeded random sequence with the invariant checked after each step; after a failure
    the sequence goes on in a fresh world.  The failures (a list)."""
    rng = random.Random(seed)
    members, done, failures = _callables(), [], []
    for i in range(steps):
        where, failure = random_step(w, rng, members)
        done.append(where)
        if failure:
            failures.append(f"{failure}\n  (seed {seed}, step {i}; the steps before: {'; '.join(done[-6:-1])})")
            w = world()
    return failures


def thread_stress(w, seed, threads=4, steps=150, join_timeout=60):
    """Threads calling random members on one world (hooks on HOOK_TYPE calling back too):
    only documented exceptions in every thread, no deadlock, host.check() clean after."""
    members = _callables()
    errors, local = [], threading.local()

    def call(rng):
        m = rng.choice(members)
        args, kwargs = call_args(w, m)
        recv = rng.choice(candidates(w, m)) if m.kind in ("method", "property") else None
        try:
            invoke(w, m, args, kwargs, recv)
        except ALLOWED + _extra_allowed(m):
            pass
        except BaseException as e:      # noqa: B902
            errors.append(f"{m.qualname} on {describe(recv)}: {type(e).__name__}: {str(e)[:200]}")

    def hook(name):
        def fn(*_):
            if not getattr(local, "busy", False):
                local.busy = True
                try:
                    call(local.rng)
                finally:
                    local.busy = False
            return HOOK_RETURNS[name]
        return fn

    w.amd.register_hooks(HOOK_TYPE, **{name: hook(name) for name in HOOK_RETURNS})

    def worker(k):
        local.rng = rng = random.Random(seed * 100 + k)
        for _ in range(steps):
            if rng.random() < 0.2:
                try:
                    hook_trigger(w)
                except BaseException as e:  # noqa: B902
                    errors.append(f"the hook trigger: {type(e).__name__}: {e}")
            else:
                call(rng)

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(join_timeout)
    if any(t.is_alive() for t in ts):
        return f"seed {seed}: threads still running after {join_timeout} s (a deadlock?)"
    w.amd.register_hooks(HOOK_TYPE, **{name: None for name in HOOK_RETURNS})
    try:
        check_world(w)
    except AssertionError as e:
        errors.append(f"host.check() afterwards: {e}")
    return f"seed {seed}:\n  " + "\n  ".join(errors[:20]) if errors else None
