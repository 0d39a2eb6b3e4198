"""gmem exec --guest: scripted guests for confidential VMs.

An SEV-SNP or TDX guest's instructions (PVALIDATE, the GHCB page-state change, TDCALL) cannot
execute on a plain host, so for those VMs KVM_RUN runs a guest script in the model instead:
a generator function that gets a GuestCpu and drives the model's guest side (vcpu.read/write,
pvalidate, page_state_change, tdx_map_gpa, tdx_accept). Each `yield from cpu.<call>()` may
stop at an exit, which KVM_RUN returns to the program exactly as the kernel would
(KVM_EXIT_MEMORY_FAULT with -EFAULT, KVM_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE); the next
KVM_RUN resumes the script with the program's answer (kvm_run.hypercall.ret). When the
script returns, KVM_RUN answers KVM_EXIT_SHUTDOWN.

    gmem exec --guest conversions -- ./vmm          # the built-in script below
    gmem exec --guest my_guest.py -- ./vmm          # def guest(cpu): ... (a generator)
"""
import errno
import runpy
import struct
import sys

from gmem import uapi
from gmem._core import GuestExit, GuestFault, HypercallExit

ENC = uapi.PFERR_GUEST_ENC_MASK
_VC = 29                    # #VC: an SNP guest touched a private page it has not validated


class Exit:
    """What KVM_RUN returns for one stop of the script: ret and kvm_run fields."""

    def __init__(self, reason, ret=0, fields=()):
        self.reason = reason
        self.ret = ret
        self.fields = fields            # (offset, struct format, value)

    @classmethod
    def memory_fault(cls, result):
        flags, gpa, size = result.memory_fault
        return cls(uapi.KVM_EXIT_MEMORY_FAULT, -errno.EFAULT,
                   ((uapi.KVM_RUN_MEMORY_FAULT_FLAGS_OFFSET, "<Q", flags),
                    (uapi.KVM_RUN_MEMORY_FAULT_GPA_OFFSET, "<Q", gpa),
                    (uapi.KVM_RUN_MEMORY_FAULT_SIZE_OFFSET, "<Q", size)))

    @classmethod
    def hypercall(cls, h):
        args = (list(h.args) + [0] * 6)[:6]
        return cls(uapi.KVM_EXIT_HYPERCALL, 0,
                   ((uapi.KVM_RUN_HYPERCALL_NR_OFFSET, "<Q", h.nr),
                    (uapi.KVM_RUN_HYPERCALL_ARGS_OFFSET, "<6Q", args),
                    (uapi.KVM_RUN_HYPERCALL_RET_OFFSET, "<Q", 0),
                    (uapi.KVM_RUN_HYPERCALL_FLAGS_OFFSET, "<Q", h.flags)))

    def encode(self, head):
        out = bytearray(head)
        struct.pack_into("<I", out, uapi.KVM_RUN_EXIT_REASON_OFFSET, self.reason)
        for off, fmt, value in self.fields:
            struct.pack_into(fmt, out, off, *(value if isinstance(value, list) else [value]))
        return bytes(out)


class GuestCpu:
    """The guest side of one vCPU, for scripts: every call is a generator (yield from it)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.vm = vcpu.vm

    def _private_bits(self, gpa, private):
        if self.vm.vm_type == uapi.KVM_X86_TDX_VM:
            return gpa if private else gpa | self.vm.shared_gpa_bit, 0
        return gpa, ENC if private and self.vm.vm_type == uapi.KVM_X86_SNP_VM else 0

    def access(self, gpa, write=False, private=True, data=b"\0" * 8):
        """A guest load or store of data at gpa; a memory-fault exit stops the script until the
        VMM fixed it (the access is then retried, as the CPU re-executes it); a private page
        not validated yet is validated first (SNP), or accepted (TDX)."""
        addr, ec = self._private_bits(gpa, private)
        while True:
            try:
                if write:
                    self.vcpu.write(addr, data, ec | uapi.PFERR_WRITE_MASK)
                    return None
                return self.vcpu.read(addr, len(data), ec)
            except GuestExit as e:
                if e.result.exit_reason != uapi.KVM_EXIT_MEMORY_FAULT:
                    raise
                yield Exit.memory_fault(e.result)
            except GuestFault as e:
                if e.vector != _VC and self.vm.vm_type != uapi.KVM_X86_TDX_VM:
                    raise
                yield from self.validate(gpa & ~4095, 1)

    def validate(self, gpa, npages):
        """SNP: PVALIDATE each page (TDX: TDG.MEM.PAGE.ACCEPT); faults stop as in access()."""
        for g in range(gpa, gpa + (npages << 12), 4096):
            while True:
                try:
                    if self.vm.vm_type == uapi.KVM_X86_TDX_VM:
                        self.vcpu.tdx_accept(g)
                    else:
                        self.vcpu.pvalidate(g, 0, True)
                    break
                except GuestExit as e:
                    if e.result.exit_reason != uapi.KVM_EXIT_MEMORY_FAULT:
                        raise
                    yield Exit.memory_fault(e.result)

    def convert(self, gpa, npages, private):
        """Ask the host to convert [gpa, gpa + npages pages): an SNP page-state change, a TDX
        MapGPA; each KVM_HC_MAP_GPA_RANGE exit waits for the VMM's answer. The guest-visible
        result (0 on success)."""
        if self.vm.vm_type == uapi.KVM_X86_TDX_VM:
            r = self.vcpu.tdx_map_gpa(self._private_bits(gpa, private)[0], npages << 12)
        else:
            entries = [dict(gfn=(gpa >> 12) + i, operation=1 if private else 2) for i in range(npages)]
            r = self.vcpu.page_state_change(entries)
        while isinstance(r, HypercallExit):
            ret = yield Exit.hypercall(r)
            r = self.vcpu.complete_hypercall(ret)
        return r

    def halt(self):
        yield Exit(uapi.KVM_EXIT_HLT)


class ScriptedGuest:
    """One vCPU's script, resumed by each KVM_RUN."""

    def __init__(self, script, vcpu):
        self.gen = script(GuestCpu(vcpu))
        self.started = False
        self.last = None
        self.done = False

    def run(self, head):
        if self.done:
            return 0, Exit(uapi.KVM_EXIT_SHUTDOWN).encode(head)
        answer = None
        if self.last is not None and self.last.reason == uapi.KVM_EXIT_HYPERCALL:
            answer = struct.unpack_from("<Q", head, uapi.KVM_RUN_HYPERCALL_RET_OFFSET)[0]
        try:
            e = self.gen.send(answer) if self.started else next(self.gen)
            self.started = True
        except StopIteration:
            self.done = True
            return 0, Exit(uapi.KVM_EXIT_SHUTDOWN).encode(head)
        except (GuestExit, GuestFault, OSError, ValueError) as err:
            self.done = True
            print(f"gmem exec: the scripted guest stopped: {err}", file=sys.stderr)
            return 0, Exit(uapi.KVM_EXIT_INTERNAL_ERROR).encode(head)
        self.last = e
        return e.ret, e.encode(head)


def conversions(cpu):
    """The built-in guest: it uses its first guest_memfd memslot (at most 64 pages). It validates
    and writes all of it privately; converts the upper half to shared (page-state change) and
    writes it shared; stores privately into the first shared page without asking, so KVM exits
    with KVM_EXIT_MEMORY_FAULT until the VMM converts it; converts the upper half back to
    private; reads everything privately; halts."""
    slots = [s for s in cpu.vm.memslots() if s["flags"] & uapi.KVM_MEM_GUEST_MEMFD]
    if not slots:
        raise ValueError("the conversions guest needs a guest_memfd memslot")
    base = slots[0]["guest_phys_addr"]
    n = min(slots[0]["memory_size"] >> 12, 64)
    half = base + (n // 2 << 12)
    yield from cpu.validate(base, n)
    for i in range(n):
        yield from cpu.access(base + (i << 12), write=True, data=b"private!")
    r = yield from cpu.convert(half, n - n // 2, private=False)
    if r:
        raise ValueError(f"the page-state change to shared failed: {r:#x}")
    for i in range(n // 2, n):
        yield from cpu.access(base + (i << 12), write=True, private=False, data=b"shared!!")
    yield from cpu.access(half, write=True, private=True, data=b"implicit")
    r = yield from cpu.convert(half, n - n // 2, private=True)
    if r:
        raise ValueError(f"the page-state change to private failed: {r:#x}")
    yield from cpu.validate(half + 4096, n - n // 2 - 1)
    for i in range(n):
        yield from cpu.access(base + (i << 12))
    yield from cpu.halt()


BUILTIN = {"conversions": conversions}


def load_guest(spec):
    """A factory (vcpu, vm state) -> ScriptedGuest for --guest NAME or FILE.py."""
    if spec in BUILTIN:
        script = BUILTIN[spec]
    else:
        try:
            ns = runpy.run_path(spec)
        except OSError as e:
            raise ValueError(f"--guest {spec}: {e.strerror}") from None
        script = ns.get("guest")
        if not callable(script):
            raise ValueError(f"--guest {spec}: no function guest(cpu) in it "
                             f"(built-in guests: {', '.join(BUILTIN)})")
    return lambda vcpu, vs: ScriptedGuest(script, vcpu)
