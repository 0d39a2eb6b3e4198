"""Scenarios: a host, its VMs and a workload, described as data (a dict or a TOML file),
run through the public API; built-in ones by name (`gmem run NAME`).

A scenario has `[host]` (Host keywords; sizes may be strings like "64M"), `[[vms]]` (name,
type, vcpus, `[[vms.gmem]]` files and `[[vms.memslots]]`) and `[[steps]]`, each with an `op`
from OPS. Its format is the JSON Schema gmem/schemas/scenario-1.schema.json (see
`gmem.schema`); `validate()` checks a scenario against it and checks its cross-references
(memslot -> gmem, step -> vm, vcpu index) before anything runs.

`run()` returns a `Run` whose `status` says how it ended: "ok", "violation" (a step found a
broken invariant: host.check() or an RMP violation, the finding a security researcher is after),
or "interrupted" (Ctrl-C with keep_partial=True); `Run.result()` is its result record
(gmem.results).
"""
import copy
import hashlib
import json
import time
from typing import Any

import numpy as np

from gmem import results, schema, uapi
from gmem._core import FAULT_DTYPE, GuestExit, HypercallExit, Host
from gmem.errors import InvariantError, RmpViolation

VM_TYPES = {"default": uapi.KVM_X86_DEFAULT_VM, "sw_protected": uapi.KVM_X86_SW_PROTECTED_VM,
            "sev": uapi.KVM_X86_SEV_VM, "sev_es": uapi.KVM_X86_SEV_ES_VM, "snp": uapi.KVM_X86_SNP_VM,
            "tdx": uapi.KVM_X86_TDX_VM}
HOST_KEYS = {"memory", "platform", "kernel", "sw_protected", "memory_attributes", "tdp", "prepare",
             "prepared_tracking", "invalidate", "huge_folios", "reattach_private", "scramble_on_conversion",
             "gmem_in_place_conversion", "content_modes", "gmem_backing", "hugetlb_pages", "huge_split",
             "huge_merge", "tdx_huge_page"}
POLICY_KEYS = ("kernel", "prepare", "prepared_tracking", "invalidate", "huge_folios", "reattach_private",
               "scramble_on_conversion", "gmem_in_place_conversion", "gmem_backing", "huge_split", "huge_merge",
               "tdx_huge_page")
HVA_BASE = 0x7F0000000000
ENC = uapi.PFERR_GUEST_ENC_MASK


MAX_SIZE = 1 << 52          # MAXPHYADDR: no size or guest address reaches past it
MAX_FAULT_PAGES = 1 << 28   # pages in one faults step (1 TiB; a random order is an array of them)
FAULT_CHUNK = 1 << 16       # faults per batch call: progress and Ctrl-C between chunks


class ScenarioError(ValueError):
    """A scenario that cannot be run as written (unknown key, bad size, unknown name)."""


def parse_size(v, what="size"):
    """An int, or a string with a K/M/G/T suffix (powers of 1024), in [0, 2**52]."""
    n = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str):
        s = v.strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
        try:
            n = int(s[:-1] if mult > 1 else s, 0) * mult
        except ValueError:
            pass
    if n is None:
        raise ScenarioError(f"{what}: {v!r} is not a size (use an int or e.g. \"64M\")")
    if not 0 <= n <= MAX_SIZE:
        raise ScenarioError(f"{what}: {v!r} is out of range (0 to 2**52 bytes)")
    return n


class Run:
    """A scenario being run: the host, VMs by name, gmem files by (vm, name), how it ended
    (status, error), what it did (events, timings) and its counters (counters())."""

    def __init__(self, spec, options=None, name="scenario"):
        self.spec, self.name = spec, name
        host_kw = dict(spec.get("host", {}))
        host_kw.update(options or {})
        unknown = set(host_kw) - HOST_KEYS
        if unknown:
            raise ScenarioError(f"host: unknown key(s) {', '.join(sorted(unknown))}")
        if "memory" in host_kw:
            host_kw["memory"] = parse_size(host_kw["memory"], "host.memory")
        try:
            self.host = Host(**host_kw)
        except (ValueError, TypeError, OverflowError) as e:
            raise ScenarioError(f"host: {e}") from None
        self.vms, self.files, self.vcpus, self.slots = {}, {}, {}, {}
        self.closed = {}             # name -> (step, vm stats, [vcpu stats], tdx stats) at close
        self.events, self.timings = [], []
        self.levels = []             # after every step: pages mapped at each level per VM (sample())
        self.status, self.error, self.last_step, self.current_step, self.seconds = "ok", None, None, 0, 0.0
        self.progress = None         # progress(step, op, done, total) inside long steps
        for i, vm_spec in enumerate(spec.get("vms", [])):
            try:
                self._make_vm(vm_spec)
            except OSError as e:
                raise ScenarioError(f"vms[{i}]: {e}") from None

    def _make_vm(self, s):
        """The VM with its vCPUs, as far into its launch as its kernel lets vCPUs be made: a
        TD being built (INIT_VM, INIT_VCPU) when a launch step follows, else launched at once
        (vm.launch(): a scenario without a launch step runs its guest from the start)."""
        name = s.get("name", f"vm{len(self.vms)}")
        vm_type = VM_TYPES[s.get("type", "default")]
        vm = self.host.create_vm(vm_type)
        self.vms[name] = vm
        first = next(iter(self.vms))
        launch = [st for st in self.spec.get("steps", [])
                  if st.get("op") == "launch" and st.get("vm", first) == name]
        if not launch:
            vm.launch()
        elif vm_type == uapi.KVM_X86_TDX_VM:
            vm.tdx_init_vm(int(launch[0].get("gpaw", 52)))     # vCPUs only while being built
        self.vcpus[name] = [vm.create_vcpu(i) for i in range(int(s.get("vcpus", 1)))]
        if launch and vm_type == uapi.KVM_X86_TDX_VM:
            for v in self.vcpus[name]:
                v.tdx_init_vcpu()
        if vm_type in (uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM):
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
        for g in s.get("gmem", []):
            self.files[name, g.get("name", "ram")] = vm.create_guest_memfd(
                parse_size(g["size"], "gmem.size"), int(g.get("flags", 0)), page_order=int(g.get("page_order", 0)))
        for i, m in enumerate(s.get("memslots", [])):
            f = self.files.get((name, m.get("gmem"))) if m.get("gmem") else None
            gpa, size = parse_size(m.get("gpa", 0), "gpa"), parse_size(m["size"], "memslot.size")
            off = parse_size(m.get("offset", 0), "offset")
            hva = int(m.get("hva", HVA_BASE + gpa))
            vm.set_user_memory_region2(int(m.get("slot", i)), uapi.KVM_MEM_GUEST_MEMFD if f else 0, gpa, size,
                                       hva, f if f else -1, off)
            self.slots.setdefault(name, []).append((gpa, size, f, off, hva))

    # ------------------------------------------------------------ helpers
    def vm(self, step):
        name = step.get("vm", next(iter(self.vms), None))
        if name not in self.vms:
            raise ScenarioError(f"unknown vm {name!r}")
        return name, self.vms[name]

    def vcpu(self, name, step):
        return self.vcpus[name][int(step.get("vcpu", 0))]

    def gmem_range(self, name, gpa, size):
        """(file, offset) pieces backing [gpa, gpa + size) through the memslots."""
        for sgpa, ssize, f, off, _ in self.slots.get(name, []):
            lo, hi = max(gpa, sgpa), min(gpa + size, sgpa + ssize)
            if f is not None and lo < hi:
                yield f, off + lo - sgpa, hi - lo

    def close_vm(self, name):
        """Keep the VM's counters as they are just before its close (a destroyed VM has none)."""
        vm = self.vms[name]
        tdx = dict(vm.tdx_stats) if vm.vm_type == uapi.KVM_X86_TDX_VM else None
        self.closed[name] = (self.current_step, dict(vm.stats),
                             [dict(v.stats) for v in self.vcpus[name]], tdx)

    def sample(self, step, op):
        """Record the pages mapped at 4K, 2M and 1G by each live VM now (TLB reach over time)."""
        self.levels.append(results.level_sample(step, op, self.vms))

    def counters(self):
        """Counters grouped by owner (gmem.results.snapshot), taken now: after the last step
        that ran; a VM closed by a step has those taken just before its close."""
        if self.last_step is None:
            moment = ("before the first step", None, None)
        else:
            op = self.spec["steps"][self.last_step]["op"]
            moment = (f"after step {self.last_step} ({op})", self.last_step, op)
        return results.snapshot(self.host, self.vms, self.vcpus, moment, self.closed)

    def result(self, label=None, **extra):
        """This run as a result record (gmem.results.run_record)."""
        counters = self.counters()
        return results.run_record(label or self.name, self.host, counters, status=self.status,
                                  error=self.error, events=self.events, timings=self.timings,
                                  seconds=self.seconds, huge=results.huge_record(self.host, counters, self.levels),
                                  **extra)


# -------------------------------------------------------------------- ops

def set_attributes(run, name, vm, gpa, size, private):
    """The VMM sets [gpa, gpa + size) private or shared: KVM_SET_MEMORY_ATTRIBUTES on the VM, or,
    with in-place conversion ("next"), KVM_SET_MEMORY_ATTRIBUTES2 on each guest_memfd behind it."""
    attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
    if not run.host.gmem_in_place_conversion:
        vm.set_memory_attributes(gpa, size, attrs)
        return
    for f, off, n in run.gmem_range(name, gpa, size):
        f.set_memory_attributes(off, n, attrs)


def op_attributes(run, step):
    """Set memory attributes of [gpa, gpa + size): private = true|false."""
    name, vm = run.vm(step)
    set_attributes(run, name, vm, parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"]),
                   step.get("private", True))


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
    the batch path; private = true makes them private accesses (SNP C-bit, TDX no shared bit);
    stride (a multiple of 4K, default 4K) touches one page in each stride bytes."""
    name, vm = run.vm(step)
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    stride = parse_size(step.get("stride", 4096), "stride")
    if stride == 0 or stride % 4096:
        raise ScenarioError(f"stride: {stride} is not a positive multiple of 4096")
    npages = ((gpa + size) // 4096 - gpa // 4096) // (stride >> 12)
    if npages > MAX_FAULT_PAGES:
        raise ScenarioError(f"size: {npages} pages in one faults step (at most {MAX_FAULT_PAGES})")
    pages = np.arange(gpa >> 12, (gpa + size) >> 12, stride >> 12, dtype=np.uint64)
    if step.get("pattern", "seq") == "random":
        pages = np.random.default_rng(int(step.get("seed", 0))).permutation(pages)
    private = step.get("private", vm.has_private_mem)
    high = np.uint64(vm.shared_gpa_bit if vm.vm_type == uapi.KVM_X86_TDX_VM and not private else 0)
    ec = _error_code(vm, private, step.get("write", True))
    vcpu_id = int(step.get("vcpu", 0))
    repeat = int(step.get("repeat", 1))
    total, done, exits = len(pages) * repeat, 0, 0
    res = np.empty(min(FAULT_CHUNK, max(1, len(pages))), FAULT_DTYPE)
    ecs = np.full(len(res), ec, dtype=np.uint64)
    for _ in range(repeat):
        # in chunks, so that progress shows and Ctrl-C stops a long step within milliseconds
        for lo in range(0, len(pages), FAULT_CHUNK):
            gpas = (pages[lo:lo + FAULT_CHUNK] << np.uint64(12)) | high
            out = vm.page_fault_batch(gpas, ecs[:len(gpas)], vcpu_id=vcpu_id, out=res[:len(gpas)])
            exits += int((out["exit_reason"] == uapi.KVM_EXIT_MEMORY_FAULT).sum())
            done += len(gpas)
            if run.progress:
                run.progress(run.current_step, "faults", done, total)
    run.events.append(f"faults on {total} pages of {name}: {exits} memory-fault exits")


def op_pvalidate(run, step):
    """SNP guest: PVALIDATE [gpa, gpa + size) at 2M where possible (falling back to 4K), or at
    pagesize = 0|1 as given."""
    name, vm = run.vm(step)
    vcpu = run.vcpu(name, step)
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


def _handle_map_gpa(run, name, vm, exit_, discard=True):
    """The VMM's side of KVM_HC_MAP_GPA_RANGE: set the attributes; discard freed private memory
    (not in place: there the page itself becomes shared; nor without discard: a VMM whose
    guest_memfd is hugetlb-backed can punch only whole huge pages, so it keeps the backing of
    a small shared window)."""
    gpa, npages, attrs = exit_.args
    private = bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED)
    set_attributes(run, name, vm, gpa, npages << 12, private)
    if discard and not private and not run.host.gmem_in_place_conversion:
        for f, off, n in run.gmem_range(name, gpa, npages << 12):
            f.punch_hole(off, n)
    return 0


def op_convert(run, step):
    """A guest conversion of [gpa, gpa + size) to = shared|private, as the guest asks for it:
    SNP page-state change (PSC buffer, 2M entries where aligned), TDX MapGPA, otherwise the
    VMM sets the attributes itself. The VMM punches pages that become shared unless
    discard = false."""
    name, vm = run.vm(step)
    vcpu = run.vcpu(name, step)
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    private = step.get("to", "shared") == "private"
    discard = step.get("discard", True)
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
                r = vcpu.complete_hypercall(_handle_map_gpa(run, name, vm, r, discard))
            if r:
                raise ScenarioError(f"PSC failed with {r:#x}")
    elif vm.vm_type == uapi.KVM_X86_TDX_VM:
        r = vcpu.tdx_map_gpa(gpa if private else gpa | vm.shared_gpa_bit, size)
        while isinstance(r, HypercallExit):
            nexits += 1
            r = vcpu.complete_hypercall(_handle_map_gpa(run, name, vm, r, discard))
        if r:
            raise ScenarioError(f"MapGPA failed with {r:#x}")
    else:
        _handle_map_gpa(run, name, vm, HypercallExit(12, (gpa, size >> 12,
                        uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0)), discard)
    run.events.append(f"{name}: converted {size >> 10} KiB at {gpa:#x} to "
                      f"{'private' if private else 'shared'} ({nexits} hypercall exits)")


def op_launch(run, step):
    """Launch with an initial image of size bytes at gpa: SNP LAUNCH_START/UPDATE/FINISH, or
    TDX INIT_VM/INIT_MEM_REGION/FINALIZE (the pages are set private first)."""
    name, vm = run.vm(step)
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    hva = HVA_BASE - (1 << 40)          # the VMM's launch image, below its guest RAM
    run.host.mmap_user(hva, (size + 4095) & ~4095)
    run.host.write_user(hva, bytes(range(256)) * (size // 256))
    if vm.vm_type == uapi.KVM_X86_SNP_VM:
        vm.snp_launch_start()
        set_attributes(run, name, vm, gpa, size, True)
        params = (gpa >> 12, hva, size)
        while params[2]:
            params = vm.snp_launch_update(params[0], params[1], params[2], uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        vm.snp_launch_finish()
    elif vm.vm_type == uapi.KVM_X86_TDX_VM:
        # (KVM_TDX_INIT_VM and INIT_VCPU ran when the VM was made: vCPUs exist only after it)
        set_attributes(run, name, vm, gpa, size, True)
        run.vcpus[name][0].tdx_init_mem_region(hva, gpa, size >> 12)
        vm.tdx_finalize_vm()
    else:
        raise ScenarioError(f"vm {name} is neither SNP nor TDX")
    run.events.append(f"{name}: launched with a {size >> 10} KiB initial image")


def op_accept(run, step):
    """TDX guest: TDG.MEM.PAGE.ACCEPT every page of [gpa, gpa + size), at level = 1 (4K, the
    default) or 2 (2M where aligned, with Host(tdx_huge_page=), proposed): a 2M ACCEPT that
    fails (TDX_PAGE_SIZE_MISMATCH: mapped at 4K) is retried at 4K, as the Linux guest's
    tdx_accept_memory() tries the larger size first and falls back on any error."""
    name, vm = run.vm(step)
    vcpu = run.vcpu(name, step)
    gpa, size = parse_size(step.get("gpa", 0), "gpa"), parse_size(step["size"])
    level = int(step.get("level", 1))
    end = gpa + size
    while gpa < end:
        if level == 2 and gpa % (2 << 20) == 0 and end - gpa >= (2 << 20) and vcpu.tdx_accept(gpa, level=2) == 0:
            gpa += 2 << 20
            continue
        vcpu.tdx_accept(gpa)
        gpa += 4096


def op_split(run, step):
    """A 4K PVALIDATE (rescind then validate again) inside a 2M private page: the RMP|SIZEM
    #NPF makes KVM PSMASH the 2M RMP entry and map 4K."""
    name, vm = run.vm(step)
    if vm.vm_type != uapi.KVM_X86_SNP_VM or run.host.rmp is None:
        raise ScenarioError(f"vm {name} is not an SNP guest")
    vcpu = run.vcpu(name, step)
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
    run.close_vm(name)
    for (vname, _), f in list(run.files.items()):
        if vname == name:
            f.close()
    vm.close()
    run.events.append(f"{name}: shut down")


OPS = {"attributes": op_attributes, "allocate": op_allocate, "punch": op_punch, "faults": op_faults,
       "pvalidate": op_pvalidate, "convert": op_convert, "launch": op_launch, "accept": op_accept,
       "split": op_split, "check": op_check, "close": op_close}


def validate(spec):
    """ScenarioError naming the path of the first problem, unless spec follows the scenario
    schema and its names resolve (memslot gmem, step vm, vcpu index, unique VM names)."""
    try:
        schema.validate(spec, "scenario")
    except schema.SchemaError as e:
        raise ScenarioError(str(e)) from None
    vms = {}
    for i, v in enumerate(spec.get("vms", [])):
        name = v.get("name", f"vm{i}")
        if name in vms:
            raise ScenarioError(f"vms[{i}].name: a second VM named {name!r}")
        vms[name] = v
        files = [g.get("name", "ram") for g in v.get("gmem", [])]
        for j, m in enumerate(v.get("memslots", [])):
            if "gmem" in m and m["gmem"] not in files:
                raise ScenarioError(f"vms[{i}].memslots[{j}].gmem: unknown gmem {m['gmem']!r} "
                                    f"(this VM has {', '.join(map(repr, files)) or 'none'})")
    for i, st in enumerate(spec.get("steps", [])):
        name = st.get("vm", next(iter(vms), None))
        if name not in vms:
            where = f"steps[{i}].vm" if "vm" in st else f"steps[{i}]"
            raise ScenarioError(f"{where}: unknown vm {name!r} (vms: {', '.join(vms) or 'none'})")
        if st.get("vcpu", 0) >= vms[name].get("vcpus", 1):
            raise ScenarioError(f"steps[{i}].vcpu: {st['vcpu']} but vm {name!r} has "
                                f"{vms[name].get('vcpus', 1)} vCPU(s)")
    return spec


def run(spec, options=None, on_step=None, trace=False, *, name="scenario", progress=None, keep_partial=False):
    """Run a scenario dict; returns the Run (host, VMs, status, counters(), events, timings).

    options: Host keywords over the scenario's [host]; trace=True records every tracepoint
    from the first step on (r.host.trace); on_step(i, step, run) after each step;
    progress(step, op, done, total) inside long steps. A step that finds a broken invariant
    (InvariantError, RmpViolation) ends the run with status "violation" and the error kept.
    With keep_partial, Ctrl-C (KeyboardInterrupt) ends it with status "interrupted" instead
    of propagating. A scenario that cannot be run as written raises ScenarioError; the
    kernel's refusals raise OSError as the API does."""
    spec = validate(copy.deepcopy(spec))
    try:
        r = Run(spec, options, name)
    except ScenarioError:
        raise
    except _MALFORMED as e:
        raise _malformed("vms", e) from None
    r.progress = progress
    if trace:
        r.host.trace.enable(capacity=1 << 22)
    t0 = time.perf_counter()
    try:
        for i, step in enumerate(spec.get("steps", [])):
            _run_step(r, i, step)
            if on_step:
                on_step(i, step, r)
    except (InvariantError, RmpViolation) as e:
        r.status, r.error = "violation", results.error_record(e, r.current_step, spec["steps"][r.current_step]["op"])
    except KeyboardInterrupt as e:
        if not keep_partial:
            raise
        r.status = "interrupted"
        r.error = results.error_record(e, r.current_step, spec["steps"][r.current_step]["op"])
        r.error["message"] = "interrupted (Ctrl-C)"
    finally:
        r.seconds = time.perf_counter() - t0
    return r


def _run_step(r, i, step):
    op = step["op"]
    r.current_step = i
    t = time.perf_counter()
    try:
        OPS[op](r, step)
    except GuestExit as e:
        raise ScenarioError(f"steps[{i}] ({op}): the guest exited to userspace: {e.result}") from None
    except ScenarioError as e:
        raise ScenarioError(f"steps[{i}] ({op}): {e}") from None
    except OSError as e:
        raise type(e)(e.errno, f"steps[{i}] ({op}): {e.strerror}") from None
    except _MALFORMED as e:
        raise _malformed(f"steps[{i}] ({op})", e) from None
    r.timings.append((i, op, time.perf_counter() - t))
    r.last_step = i
    r.sample(i, op)


def _malformed(where, e):
    """The ScenarioError for what a badly written scenario raises (a value the schema lets
    through but the model refuses)."""
    if isinstance(e, KeyError):
        return ScenarioError(f"{where}: missing key {e}")
    return ScenarioError(f"{where}: {e}")


_MALFORMED = (KeyError, IndexError, TypeError, ValueError, OverflowError)


def load_toml(path):
    """A TOML file as a dict (tomllib; tomli on Python 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:       # Python 3.10: the same parser, as a package
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ScenarioError("reading TOML on Python 3.10 needs tomli: pip install 'kvm-gmem[cli]'") from None
    with open(path, "rb") as f:
        return tomllib.load(f)


def fingerprint(spec):
    """A short hash of a scenario's content (sweep cells are keyed by it)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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


# Huge pages (proposed upstream): built to be compared across the restructuring
# policies (gmem compare SCENARIO --huge-policies). The host has a hugetlb pool of one size, so
# gmem_backing="hugetlb" takes every guest_memfd from it (the default hstate) and "buddy" gives
# THP-like 2M folios (huge_folios); the scenarios name no GUEST_MEMFD_FLAG_HUGETLB, which would
# take the pool under either backing.

def _bounce_buffer_steps(vm, windows=16, stride=64 << 20, first=32 << 20, size=64 << 10):
    """A guest with swiotlb-like bounce buffers: small shared windows converted out of private
    memory (discard = false: a hugetlb file punches whole huge pages only, so the VMM keeps the
    backing), the guest touching each window and the private 2M around it; then all of memory
    again; then every other window back to private, and all of memory once more. The guest
    touches one page per 64K around a window and one per 2M of all memory: the mapping level
    shows as well, and a split 1G folio makes each private fault (under huge_merge="lazy") a
    walk of the 1G range."""
    everything = {"op": "faults", "vm": vm, "gpa": 0, "size": "1G", "private": True, "stride": "2M"}
    steps = [{"op": "attributes", "vm": vm, "gpa": 0, "size": "1G", "private": True}, everything]
    starts = [first + k * stride for k in range(windows)]
    for w in starts:
        base = w & ~((2 << 20) - 1)
        steps += [{"op": "convert", "vm": vm, "gpa": w, "size": size, "to": "shared", "discard": False},
                  {"op": "faults", "vm": vm, "gpa": w, "size": size, "private": False},
                  {"op": "faults", "vm": vm, "gpa": base, "size": w - base, "private": True, "stride": "64K"},
                  {"op": "faults", "vm": vm, "gpa": w + size, "size": base + (2 << 20) - w - size, "private": True,
                   "stride": "64K"}]
    steps.append(dict(everything, pattern="random"))
    for w in starts[::2]:
        steps.append({"op": "convert", "vm": vm, "gpa": w, "size": size, "to": "private"})
    steps.append(dict(everything, pattern="random"))
    return [s for s in steps if s.get("size", 1)]


def _balloon_steps(vm, size=128 << 20, every=4 << 20):
    """A balloon in a 2M-backed guest: fault everything, inflate (punch a 2M hole every
    `every` bytes), deflate (the guest touches all of it again), a 4K shared page converted
    inside each ballooned range, and a second inflate over those now-split ranges, refaulted."""
    holes = range(every // 2, size, every)
    steps = [{"op": "attributes", "vm": vm, "gpa": 0, "size": size, "private": True},
             {"op": "faults", "vm": vm, "gpa": 0, "size": size, "private": True}]
    steps += [{"op": "punch", "vm": vm, "gpa": h, "size": "2M"} for h in holes]
    steps.append({"op": "faults", "vm": vm, "gpa": 0, "size": size, "private": True})
    steps += [{"op": "convert", "vm": vm, "gpa": h + (64 << 10), "size": "4K", "to": "shared", "discard": False}
              for h in holes]
    steps.append({"op": "faults", "vm": vm, "gpa": 0, "size": size, "private": True})
    steps += [{"op": "attributes", "vm": vm, "gpa": h, "size": "2M", "private": True} for h in holes]
    steps += [{"op": "punch", "vm": vm, "gpa": h, "size": "2M"} for h in holes]
    steps.append({"op": "faults", "vm": vm, "gpa": 0, "size": size, "private": True})
    return steps


def _two_guests(pool, size, **host):
    """A host with a hugetlb pool and two guests, a SW_PROTECTED one ("sw": 1G mappings are
    possible) and an SNP one ("snp": the RMP caps private mappings at 2M), each one guest_memfd
    of `size` at gpa 0."""
    vm = [{"name": n, "type": t, "gmem": [{"name": "ram", "size": size}],
           "memslots": [{"slot": 0, "gpa": 0, "size": size, "gmem": "ram"}]} for n, t in (("sw", "sw_protected"),
                                                                                      ("snp", "snp"))]
    return {"host": dict({"memory": "8G", "platform": "amd", "huge_folios": True, "hugetlb_pages": pool}, **host),
            "vms": vm}


BUILTIN["huge-bounce-buffers"] = dict(
    _two_guests({"1G": 2}, "1G"),
    description="Virtio bounce buffers out of 1G-backed private memory (huge pages, proposed): 16 shared 64 KiB "
                "windows converted out of each guest, faulted with the private 2M around them, all of memory "
                "refaulted, half the windows converted back (SW_PROTECTED and SNP guests; compare with "
                "--huge-policies).",
    steps=_bounce_buffer_steps("sw") + _bounce_buffer_steps("snp") + [{"op": "check"}])
BUILTIN["huge-balloon"] = dict(
    _two_guests({"2M": 128}, "128M"),
    description="A balloon punching 2M holes in 2M-backed guests (huge pages, proposed): inflate, deflate "
                "(refault), a 4K shared page inside each ballooned range, inflate again over the split ranges, "
                "refault (SW_PROTECTED and SNP guests; compare with --huge-policies).",
    steps=_balloon_steps("sw") + _balloon_steps("snp") + [{"op": "check"}])
BUILTIN["huge-boot-accept"] = {
    "description": "An SNP guest's boot over 2M-backed memory (huge pages, proposed): the first half PVALIDATEd "
                   "at 4K (each 4K PVALIDATE inside a 2M RMP entry is a size-mismatch #NPF: PSMASH), the second "
                   "at 2M, a GHCB page made shared, then all of it touched.",
    "host": {"memory": "4G", "platform": "amd", "huge_folios": True, "hugetlb_pages": {"2M": 64}},
    "vms": [{"name": "guest", "type": "snp", "gmem": [{"name": "ram", "size": "128M"}],
             "memslots": [{"slot": 0, "gpa": 0, "size": "128M", "gmem": "ram"}]}],
    "steps": [{"op": "attributes", "gpa": 0, "size": "128M", "private": True},
              {"op": "pvalidate", "gpa": 0, "size": "64M", "pagesize": 0},
              {"op": "pvalidate", "gpa": "64M", "size": "64M", "pagesize": 1},
              {"op": "convert", "gpa": "1M", "size": "4K", "to": "shared", "discard": False},    # its GHCB
              {"op": "faults", "gpa": 0, "size": "1M", "private": True},
              {"op": "faults", "gpa": "1M", "size": "4K", "private": False},
              {"op": "faults", "gpa": "1028K", "size": "130044K", "private": True},
              {"op": "check"}]}


BUILTIN["huge-tdx-boot"] = {
    "description": "A TD over 2M hugetlb memory with 2M S-EPT leaves (TDX huge pages v3, proposed): its "
                   "initial image added at 4K while it is built, half its memory accepted at 4K (the EPT "
                   "violations carry the ACCEPT level: GUEST_INHIBIT, 4K leaves), half at 2M (2M leaves), "
                   "then a 4K bounce buffer converted to shared inside an accepted 2M leaf (a demote, not a "
                   "zap of the 2M).",
    "host": {"memory": "4G", "platform": "intel", "gmem_backing": "hugetlb", "hugetlb_pages": {"2M": 40},
             "tdx_huge_page": True},
    "vms": [{"name": "td", "type": "tdx", "gmem": [{"name": "ram", "size": "64M"}],
             "memslots": [{"slot": 0, "gpa": 0, "size": "64M", "gmem": "ram"}]}],
    "steps": [{"op": "launch", "gpa": 0, "size": "1M"},
              {"op": "attributes", "gpa": "2M", "size": "62M", "private": True},
              {"op": "accept", "gpa": "2M", "size": "30M", "level": 1},
              {"op": "accept", "gpa": "32M", "size": "32M", "level": 2},
              {"op": "convert", "gpa": "40M", "size": "4K", "to": "shared", "discard": False},
              {"op": "faults", "gpa": "40M", "size": "4K", "private": False},
              {"op": "check"}]}


def get(name_or_path):
    """A built-in scenario by name, or a TOML file, validated (ScenarioError otherwise)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    if name_or_path.endswith(".toml"):
        try:
            spec = load_toml(name_or_path)
        except ScenarioError:
            raise
        except FileNotFoundError:
            raise ScenarioError(f"no such file: {name_or_path}") from None
        except OSError as e:
            raise ScenarioError(f"{name_or_path}: cannot read: {e.strerror}") from None
        except Exception as e:          # tomllib.TOMLDecodeError and friends
            raise ScenarioError(f"{name_or_path}: malformed TOML: {e}") from None
        return validate(spec)
    raise ScenarioError(f"unknown scenario {name_or_path!r}: a TOML file or one of {', '.join(BUILTIN)}")
