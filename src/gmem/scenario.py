"""Scenarios: a host, its VMs and a workload, described as data (a dict or a TOML file),
run through the public API; built-in ones by name (`gmem run NAME`).

A scenario has `[host]` (Host keywords; sizes may be strings like "64M"), `[[vms]]` (name,
type, vcpus, `[[vms.gmem]]` files and `[[vms.memslots]]`) and `[[steps]]`, each with an `op`
from OPS. See README.md, "Scenario files".
"""
import copy
import time
from typing import Any

import numpy as np

from gmem import uapi
from gmem._core import GuestExit, HypercallExit, Host

VM_TYPES = {"default": uapi.KVM_X86_DEFAULT_VM, "sw_protected": uapi.KVM_X86_SW_PROTECTED_VM,
            "sev": uapi.KVM_X86_SEV_VM, "sev_es": uapi.KVM_X86_SEV_ES_VM, "snp": uapi.KVM_X86_SNP_VM,
            "tdx": uapi.KVM_X86_TDX_VM}
HOST_KEYS = {"memory", "platform", "sw_protected", "memory_attributes", "prepare", "prepared_tracking",
             "invalidate", "huge_folios", "reattach_private", "scramble_on_conversion"}
POLICY_KEYS = ("prepare", "prepared_tracking", "invalidate", "huge_folios", "reattach_private",
               "scramble_on_conversion")
HVA_BASE = 0x7F0000000000
ENC = uapi.PFERR_GUEST_ENC_MASK


class ScenarioError(ValueError):
    """A scenario that cannot be run as written (unknown key, bad size, unknown name)."""


def parse_size(v, what="size"):
    """An int, or a string with a K/M/G/T suffix (powers of 1024)."""
    if isinstance(v, bool):
        raise ScenarioError(f"{what}: {v!r} is not a size")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        s = v.strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
        try:
            return int(s[:-1] if mult > 1 else s, 0) * mult
        except ValueError:
            pass
    raise ScenarioError(f"{what}: {v!r} is not a size (use an int or e.g. \"64M\")")


class Run:
    """A scenario being run: the host, VMs by name, gmem files by (vm, name)."""

    def __init__(self, spec, options=None):
        self.spec = spec
        host_kw = dict(spec.get("host", {}))
        host_kw.update(options or {})
        unknown = set(host_kw) - HOST_KEYS
        if unknown:
            raise ScenarioError(f"[host]: unknown key(s) {', '.join(sorted(unknown))}")
        if "memory" in host_kw:
            host_kw["memory"] = parse_size(host_kw["memory"], "host.memory")
        try:
            self.host = Host(**host_kw)
        except ValueError as e:
            raise ScenarioError(f"[host]: {e}") from None
        self.vms, self.files, self.vcpus, self.slots = {}, {}, {}, {}
        self.events = []
        for vm_spec in spec.get("vms", []):
            self._make_vm(vm_spec)

    def _make_vm(self, s):
        name = s.get("name", f"vm{len(self.vms)}")
        t = s.get("type", "default")
        vm_type = VM_TYPES.get(t, t)
        if not isinstance(vm_type, int):
            raise ScenarioError(f"vm {name}: unknown type {t!r} (one of {', '.join(VM_TYPES)})")
        vm = self.host.create_vm(vm_type)
        self.vms[name] = vm
        self.vcpus[name] = [vm.create_vcpu(i) for i in range(int(s.get("vcpus", 1)))]
        if vm_type in (uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM):
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
        for g in s.get("gmem", []):
            self.files[name, g.get("name", "ram")] = vm.create_guest_memfd(
                parse_size(g["size"], "gmem.size"), int(g.get("flags", 0)))
        for i, m in enumerate(s.get("memslots", [])):
            f = self.files.get((name, m.get("gmem"))) if m.get("gmem") else None
            if m.get("gmem") and f is None:
                raise ScenarioError(f"vm {name}: memslot uses unknown gmem {m.get('gmem')!r}")
            gpa, size = parse_size(m.get("gpa", 0), "gpa"), parse_size(m["size"], "memslot.size")
            vm.set_user_memory_region2(int(m.get("slot", i)), uapi.KVM_MEM_GUEST_MEMFD if f else 0, gpa, size,
                                       int(m.get("hva", HVA_BASE + gpa)), f if f else -1,
                                       parse_size(m.get("offset", 0), "offset"))
            self.slots.setdefault(name, []).append((gpa, size, f, parse_size(m.get("offset", 0), "offset"),
                                                    int(m.get("hva", HVA_BASE + gpa))))

    # ------------------------------------------------------------ helpers
    def vm(self, step):
        name = step.get("vm", next(iter(self.vms), None))
        if name not in self.vms:
            raise ScenarioError(f"step {step.get('op')}: unknown vm {name!r}")
        return name, self.vms[name]

    def gmem_range(self, name, gpa, size):
        """(file, offset) pieces backing [gpa, gpa + size) through the memslots."""
        for sgpa, ssize, f, off, _ in self.slots.get(name, []):
            lo, hi = max(gpa, sgpa), min(gpa + size, sgpa + ssize)
            if f is not None and lo < hi:
                yield f, off + lo - sgpa, hi - lo

    def counters(self):
        out = {f"host.{k}": v for k, v in self.host.stats.items()}
        if self.host.rmp is not None:
            out.update({f"rmp.{k}": v for k, v in self.host.rmp.stats.items()})
            out["rmp.assigned_pages"] = len(self.host.rmp.assigned())
        for name, vm in self.vms.items():
            if vm.destroyed:
                continue
            out.update({f"{name}.{k}": v for k, v in vm.stats.items()})
            if vm.vm_type == uapi.KVM_X86_TDX_VM:
                out.update({f"{name}.tdx.{k}": v for k, v in vm.tdx_stats.items()})
        return out


# -------------------------------------------------------------------- ops

def op_attributes(run, step):
    """Set memory attributes of [gpa, gpa + size): private = true|false."""
    _, vm = run.vm(step)
    vm.set_memory_attributes(parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"]),
                             uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if step.get("private", True) else 0)


def op_allocate(run, step):
    """fallocate(KEEP_SIZE) the gmem behind [gpa, gpa + size)."""
    name, _ = run.vm(step)
    for f, off, n in run.gmem_range(name, parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])):
        f.allocate(off, n)


def op_punch(run, step):
    """PUNCH_HOLE the gmem behind [gpa, gpa + size)."""
    name, _ = run.vm(step)
    for f, off, n in run.gmem_range(name, parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])):
        f.punch_hole(off, n)


def _error_code(vm, private, write):
    ec = uapi.PFERR_WRITE_MASK if write else 0
    if private and vm.vm_type == uapi.KVM_X86_SNP_VM:
        ec |= ENC
    return ec


def op_faults(run, step):
    """Guest faults on the pages of [gpa, gpa + size) (pattern seq|random, repeat times) through
    the batch path; private = true makes them private accesses (SNP C-bit, TDX no shared bit)."""
    name, vm = run.vm(step)
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    pages = np.arange(gpa >> 12, (gpa + size) >> 12, dtype=np.uint64)
    if step.get("pattern", "seq") == "random":
        pages = np.random.default_rng(int(step.get("seed", 0))).permutation(pages)
    pages = np.tile(pages, int(step.get("repeat", 1)))
    gpas = pages << np.uint64(12)
    private = step.get("private", vm.has_private_mem)
    if vm.vm_type == uapi.KVM_X86_TDX_VM and not private:
        gpas |= np.uint64(vm.shared_gpa_bit)
    ecs = np.full(len(gpas), _error_code(vm, private, step.get("write", True)), dtype=np.uint64)
    out = vm.page_fault_batch(gpas, ecs, vcpu_id=int(step.get("vcpu", 0)))
    exits = int((out["exit_reason"] == uapi.KVM_EXIT_MEMORY_FAULT).sum())
    run.events.append(f"faults on {len(gpas)} pages of {name}: {exits} memory-fault exits")
    return out


def op_pvalidate(run, step):
    """SNP guest: PVALIDATE [gpa, gpa + size) at 2M where possible (falling back to 4K), or at
    pagesize = 0|1 as given."""
    name, vm = run.vm(step)
    vcpu = run.vcpus[name][int(step.get("vcpu", 0))]
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    want = step.get("pagesize")
    end = gpa + size
    while gpa < end:
        if want != 0 and gpa % (2 << 20) == 0 and end - gpa >= (2 << 20):
            r = vcpu.pvalidate(gpa, 1, step.get("validate", True))
            if r != uapi.PVALIDATE_FAIL_SIZEMISMATCH:
                gpa += 2 << 20
                continue
        vcpu.pvalidate(gpa, 0, step.get("validate", True))
        gpa += 4096


def _handle_map_gpa(run, name, vm, exit_):
    """The VMM's side of KVM_HC_MAP_GPA_RANGE: set the attributes; discard freed private memory."""
    gpa, npages, attrs = exit_.args
    private = bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED)
    vm.set_memory_attributes(gpa, npages << 12, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
    if not private:
        for f, off, n in run.gmem_range(name, gpa, npages << 12):
            f.punch_hole(off, n)
    return 0


def op_convert(run, step):
    """A guest conversion of [gpa, gpa + size) to = shared|private, as the guest asks for it:
    SNP page-state change (PSC buffer, 2M entries where aligned), TDX MapGPA, otherwise the
    VMM sets the attributes itself. The VMM punches pages that become shared."""
    name, vm = run.vm(step)
    vcpu = run.vcpus[name][int(step.get("vcpu", 0))]
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    private = step.get("to", "shared") == "private"
    nexits = 0
    if vm.vm_type == uapi.KVM_X86_SNP_VM:
        entries, g = [], gpa
        while g < gpa + size:
            huge = g % (2 << 20) == 0 and gpa + size - g >= (2 << 20)
            entries.append(dict(gfn=g >> 12, operation=1 if private else 2, pagesize=int(huge)))
            g += (2 << 20) if huge else 4096
        for i in range(0, len(entries), 64):       # VMGEXIT_PSC_MAX_ENTRY per request
            r = vcpu.page_state_change(entries[i:i + 64])
            while isinstance(r, HypercallExit):
                nexits += 1
                r = vcpu.complete_hypercall(_handle_map_gpa(run, name, vm, r))
            if r:
                raise ScenarioError(f"PSC failed with {r:#x}")
    elif vm.vm_type == uapi.KVM_X86_TDX_VM:
        r = vcpu.tdx_map_gpa(gpa if private else gpa | vm.shared_gpa_bit, size)
        while isinstance(r, HypercallExit):
            nexits += 1
            r = vcpu.complete_hypercall(_handle_map_gpa(run, name, vm, r))
        if r:
            raise ScenarioError(f"MapGPA failed with {r:#x}")
    else:
        _handle_map_gpa(run, name, vm, HypercallExit(12, (gpa, size >> 12,
                        uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0)))
    run.events.append(f"{name}: converted {size >> 10} KiB at {gpa:#x} to "
                      f"{'private' if private else 'shared'} ({nexits} hypercall exits)")


def op_launch(run, step):
    """Launch with an initial image of size bytes at gpa: SNP LAUNCH_START/UPDATE/FINISH, or
    TDX INIT_VM/INIT_MEM_REGION/FINALIZE (the pages are set private first)."""
    name, vm = run.vm(step)
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    hva = HVA_BASE + (1 << 40)
    run.host.write_user(hva, bytes(range(256)) * (size // 256))
    if vm.vm_type == uapi.KVM_X86_SNP_VM:
        vm.snp_launch_start()
        vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        params = (gpa >> 12, hva, size)
        while params[2]:
            params = vm.snp_launch_update(params[0], params[1], params[2], uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        vm.snp_launch_finish()
    elif vm.vm_type == uapi.KVM_X86_TDX_VM:
        vm.tdx_init_vm(int(step.get("gpaw", 52)))
        vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        run.vcpus[name][0].tdx_init_mem_region(hva, gpa, size >> 12)
        vm.tdx_finalize_vm()
    else:
        raise ScenarioError(f"launch: vm {name} is neither SNP nor TDX")
    run.events.append(f"{name}: launched with a {size >> 10} KiB initial image")


def op_accept(run, step):
    """TDX guest: TDG.MEM.PAGE.ACCEPT every page of [gpa, gpa + size)."""
    name, vm = run.vm(step)
    vcpu = run.vcpus[name][int(step.get("vcpu", 0))]
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    for g in range(gpa, gpa + size, 4096):
        vcpu.tdx_accept(g)


def op_split(run, step):
    """A 4K PVALIDATE (rescind then validate again) inside a 2M private page: the RMP|SIZEM
    #NPF makes KVM PSMASH the 2M RMP entry and map 4K."""
    name, vm = run.vm(step)
    if vm.vm_type != uapi.KVM_X86_SNP_VM or run.host.rmp is None:
        raise ScenarioError(f"split: vm {name} is not an SNP guest")
    vcpu = run.vcpus[name][int(step.get("vcpu", 0))]
    gpa = parse_size(step.get("gpa", 0), "gpa")
    before = run.host.rmp.stats["psmash"]
    vcpu.pvalidate(gpa, 0, False)
    vcpu.pvalidate(gpa, 0, True)
    run.events.append(f"{name}: 4K PVALIDATE at {gpa:#x}: {run.host.rmp.stats['psmash'] - before} PSMASH")


def op_check(run, step):
    """host.check(): every invariant."""
    run.host.check()


def op_close(run, step):
    """Close a VM's gmem files and its fd: the VM is destroyed (shutdown)."""
    name, vm = run.vm(step)
    for (vname, _), f in list(run.files.items()):
        if vname == name:
            f.close()
    vm.close()
    run.events.append(f"{name}: shut down")


OPS = {"attributes": op_attributes, "allocate": op_allocate, "punch": op_punch, "faults": op_faults,
       "pvalidate": op_pvalidate, "convert": op_convert, "launch": op_launch, "accept": op_accept,
       "split": op_split, "check": op_check, "close": op_close}


SPEC_KEYS = ("description", "host", "vms", "steps")


def check_shape(spec):
    """ScenarioError unless spec has the shape of a scenario: tables and lists of tables where
    the format has them (the values are checked when they are used)."""
    if not isinstance(spec, dict):
        raise ScenarioError("a scenario is a table (dict)")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ScenarioError(f"unknown key(s) {', '.join(sorted(unknown))} (one of {', '.join(SPEC_KEYS)})")
    if not isinstance(spec.get("host", {}), dict):
        raise ScenarioError("[host] must be a table")
    for key in ("vms", "steps"):
        items = spec.get(key, [])
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise ScenarioError(f"{key} must be an array of tables ([[{key}]])")
    for v in spec.get("vms", []):
        for key in ("gmem", "memslots"):
            items = v.get(key, [])
            if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
                raise ScenarioError(f"vm {v.get('name', '?')}: {key} must be an array of tables")


def _malformed(where, e):
    """The ScenarioError for what a badly written scenario raises (a missing key, a value of
    the wrong type or range, a vCPU index past vcpus)."""
    if isinstance(e, KeyError):
        return ScenarioError(f"{where}: missing key {e}")
    return ScenarioError(f"{where}: {e}")


_MALFORMED = (KeyError, IndexError, TypeError, ValueError)


def run(spec, options=None, on_step=None, trace=False):
    """Run a scenario dict; returns the Run (host, VMs, counters(), events, timings).
    trace=True records every tracepoint from the first step on (r.host.trace).
    A scenario that cannot be run as written raises ScenarioError; the kernel's refusals
    raise OSError as the API does."""
    spec = copy.deepcopy(spec)
    check_shape(spec)
    try:
        r = Run(spec, options)
    except ScenarioError:
        raise
    except _MALFORMED as e:
        raise _malformed("[[vms]]", e) from None
    if trace:
        r.host.trace.enable(capacity=1 << 22)
    r.timings = []
    for i, step in enumerate(spec.get("steps", [])):
        op = step.get("op")
        if op not in OPS:
            raise ScenarioError(f"step {i}: unknown op {op!r} (one of {', '.join(OPS)})")
        t = time.perf_counter()
        try:
            OPS[op](r, step)
        except GuestExit as e:
            raise ScenarioError(f"step {i} ({op}): the guest exited to userspace: {e.result}") from None
        except ScenarioError:
            raise
        except _MALFORMED as e:
            raise _malformed(f"step {i} ({op})", e) from None
        r.timings.append((op, time.perf_counter() - t))
        if on_step:
            on_step(i, step, r)
    return r


def load_toml(path):
    import tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


# ----------------------------------------------------------- built-ins

_SNP_GUEST = {
    "host": {"memory": "8G", "platform": "amd", "huge_folios": True},
    "vms": [{"name": "guest", "type": "snp", "vcpus": 2,
             "gmem": [{"name": "ram", "size": "64M"}],
             "memslots": [{"slot": 0, "gpa": 0, "size": "64M", "gmem": "ram"}]}],
}

BUILTIN: dict[str, dict[str, Any]] = {
    "snp-life": dict(_SNP_GUEST, description=(
        "An SEV-SNP guest's life: launch of a 1 MiB image, boot-time private faults and PVALIDATE, "
        "page-state changes both ways, a balloon-style discard, a 2M RMP split, shutdown."),
        steps=[
            {"op": "launch", "gpa": 0, "size": "1M"},
            {"op": "attributes", "gpa": "1M", "size": "63M", "private": True},
            {"op": "faults", "gpa": "2M", "size": "30M", "private": True},
            {"op": "pvalidate", "gpa": "2M", "size": "30M"},
            {"op": "convert", "gpa": "32M", "size": "8M", "to": "shared"},
            {"op": "faults", "gpa": "32M", "size": "8M", "private": False},
            {"op": "convert", "gpa": "36M", "size": "2M", "to": "private"},
            {"op": "faults", "gpa": "36M", "size": "2M", "private": True},
            {"op": "pvalidate", "gpa": "36M", "size": "2M"},
            {"op": "convert", "gpa": "24M", "size": "4M", "to": "shared"},     # balloon discard
            {"op": "split", "gpa": "8M"},
            {"op": "faults", "gpa": "8M", "size": "2M", "private": True, "repeat": 2},
            {"op": "check"},
        ]),
    "sw-conversions": {
        "description": "private_mem_conversions_test.c's pattern on a SW_PROTECTED VM: convert "
                       "4K/2M ranges both ways with and without discard, fault after each.",
        "host": {"memory": "4G", "platform": "none"},
        "vms": [{"name": "guest", "type": "sw_protected",
                 "gmem": [{"name": "ram", "size": "16M"}],
                 "memslots": [{"slot": 10, "gpa": "4G", "size": "16M", "gmem": "ram"}]}],
        "steps": [
            {"op": "faults", "gpa": "4G", "size": "16M", "private": False},
            {"op": "convert", "gpa": "4G", "size": "4K", "to": "private"},
            {"op": "convert", "gpa": "4100M", "size": "2M", "to": "private"},
            {"op": "faults", "gpa": "4G", "size": "16M"},
            {"op": "convert", "gpa": "4G", "size": "4K", "to": "shared"},
            {"op": "convert", "gpa": "4100M", "size": "2M", "to": "shared"},
            {"op": "faults", "gpa": "4G", "size": "16M"},
            {"op": "check"},
        ]},
    "tdx-life": {
        "description": "A TD: initial image through INIT_MEM_REGION, finalize, AUG and ACCEPT at "
                       "runtime, a MapGPA conversion to shared, shutdown.",
        "host": {"memory": "8G", "platform": "intel"},
        "vms": [{"name": "td", "type": "tdx", "gmem": [{"name": "ram", "size": "32M"}],
                 "memslots": [{"slot": 0, "gpa": 0, "size": "32M", "gmem": "ram"}]}],
        "steps": [
            {"op": "launch", "gpa": 0, "size": "1M"},
            {"op": "attributes", "gpa": "1M", "size": "31M", "private": True},
            {"op": "accept", "gpa": "1M", "size": "15M"},
            {"op": "convert", "gpa": "16M", "size": "8M", "to": "shared"},
            {"op": "faults", "gpa": "16M", "size": "8M", "private": False},
            {"op": "check"},
            {"op": "close", "vm": "td"},
        ]},
}
BUILTIN["snp-life"]["steps"] = BUILTIN["snp-life"]["steps"] + [{"op": "close", "vm": "guest"}]


def get(name_or_path):
    """A built-in scenario by name, or a TOML file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    if name_or_path.endswith(".toml"):
        try:
            return load_toml(name_or_path)
        except FileNotFoundError:
            raise ScenarioError(f"no such file: {name_or_path}") from None
        except Exception as e:          # tomllib.TOMLDecodeError and friends
            raise ScenarioError(f"{name_or_path}: malformed TOML: {e}") from None
    raise ScenarioError(f"unknown scenario {name_or_path!r}: a TOML file or one of {', '.join(BUILTIN)}")
