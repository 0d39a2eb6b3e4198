"""gmem exec's model server: the Python side of the virtual /dev/kvm.

One gmem.Host (with content_memfd=True, so guest_memfd contents are memfds the program maps)
answers the requests of the preload library (src/gmem/shim/gmem_shim.c) of every process of
the program, one request at a time, as the kernel's locks serialize one machine. Requests
carry the ioctl's argument bytes; the reply carries the bytes the kernel would copy back and
the real-memslot changes the library applies before it returns (gmem/_exec/realvm.py).
"""
import errno
import os
import selectors
import socket
import struct
import sys
import traceback

from gmem import uapi
from gmem._exec import proto
from gmem._exec.proto import (ACT_BACKING_DEL, ACT_VM_CHECK_RESUME, ACT_VM_GONE, ACT_VM_GOVERNED, FAULT_MEMORY_FAULT,
                              FAULT_PASS, FAULT_RESUME, RUN_MODEL, RUN_NONE, RUN_REAL, act)
from gmem._exec.realvm import RealVm
from gmem._exec.report import audit_findings, audit_ranges, stale_private_backing

KVM_MEMORY_ENCRYPT_OP = uapi._IOWR(uapi.KVMIO, 0xBA, 8)
KVM_GET_VCPU_MMAP_SIZE = uapi.KVM_GET_VCPU_MMAP_SIZE

# The capabilities the model answers (gmem's _check_extension, plus KVM_CAP_EXIT_HYPERCALL,
# whose enable the model implements: kvm_vm_ioctl_check_extension answers
# KVM_EXIT_HYPERCALL_VALID_MASK); the host's KVM answers the others.
MODELLED_CAPS = {
    uapi.KVM_CAP_USER_MEMORY2, uapi.KVM_CAP_MEMORY_FAULT_INFO, uapi.KVM_CAP_MEMORY_ATTRIBUTES,
    uapi.KVM_CAP_GUEST_MEMFD, uapi.KVM_CAP_GUEST_MEMFD_FLAGS, uapi.KVM_CAP_VM_TYPES,
    uapi.KVM_CAP_NR_MEMSLOTS, uapi.KVM_CAP_READONLY_MEM, uapi.KVM_CAP_MULTI_ADDRESS_SPACE,
    uapi.KVM_CAP_PRE_FAULT_MEMORY,
}
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << uapi.KVM_HC_MAP_GPA_RANGE

_CONFIDENTIAL = (uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM)


class Reply(Exception):
    """Raised by a handler to answer early: ret, and optionally out bytes."""

    def __init__(self, ret, out=b""):
        self.ret = ret
        self.out = out


class VmState:
    def __init__(self, oid, vm, run_mode):
        self.id = oid
        self.vm = vm
        self.run_mode = run_mode
        self.real = RealVm(oid, vm)
        self.gone = False
        self.audited = False                # its shared memory was measured at its close
        self.pending_shared = []            # (gpa, size) made shared since the last KVM_RUN
        self.last_stats = {}                # vm.stats when it was last closed (a destroyed VM has none)


class GFile:
    """One guest_memfd struct file of the program (all its dup'ed fds)."""

    def __init__(self, oid, f, vms):
        self.id = oid
        self.f = f
        self.vms = vms
        self.flags = f.flags
        self.ino = f.ino
        self.maps = set()
        self.closed = False


class Server:
    def __init__(self, host, hybrid, guest=None, log=None):
        self.host = host
        self.hybrid = hybrid
        self.guest = guest                 # a scripted guest factory for confidential VMs, or None
        self.log = log or (lambda msg: None)
        self.next_id = 1
        self.vms = {}                      # id -> VmState
        self.vcpus = {}                    # id -> (Vcpu, VmState)
        self.gfiles = {}                   # id -> GFile
        self.maps = {}                     # id -> (Mapping, GFile)
        self.guests = {}                   # vcpu id -> scripted guest
        self.counts = {"requests": 0, "faults": 0, "memory_fault_exits": 0}
        self.findings = []                 # problems the report names (gmem/_exec/report.py)
        self._acts = []
        self._fds = []

    # ------------------------------------------------------------------ plumbing

    def _new_id(self):
        oid = self.next_id
        self.next_id += 1
        return oid

    def handle(self, req, payload):
        """One request: (ret, v, out, actions, fds)."""
        op, a = req[1], req[2:]
        self._acts = []
        self._fds = []
        self._v = [0, 0, 0, 0]
        self.counts["requests"] += 1
        self._sync_user_touches()
        try:
            ret, out = self._dispatch(op, a, payload)
        except Reply as r:
            ret, out = r.ret, r.out
        except OSError as e:
            ret, out = -(e.errno or errno.EIO), b""
        except KeyError:                    # an object the model already forgot
            ret, out = -errno.EBADF, b""
        except (TypeError, ValueError) as e:
            self.log(f"refused as EINVAL: {e}")
            ret, out = -errno.EINVAL, b""
        self._reap()
        return ret, self._v, out, self._acts, self._fds

    def _dispatch(self, op, a, payload):
        self._sev_ok = bool(a[5])
        if op == proto.OP_HELLO:
            if a[1] != proto.SHIM_PROTO_VERSION:
                return -errno.EPROTO, b""
            return 0, b""
        if op == proto.OP_SYS_IOCTL:
            return self.sys_ioctl(a[1], a[2])
        if op == proto.OP_VM_IOCTL:
            return self.vm_ioctl(self.vms[a[0]], a[1], a[2], a[3], a[4], payload)
        if op == proto.OP_VCPU_IOCTL:
            vcpu, vs = self.vcpus[a[0]]
            return self.vcpu_ioctl(vcpu, vs, a[1], a[2], a[3], a[4], payload)
        if op == proto.OP_GMEM:
            return self.gmem_op(a[1], a[0], a[2:])
        if op == proto.OP_CLOSE:
            return self.close(a[0])
        if op == proto.OP_FAULT:
            return self.fault(a[0], a[1], a[2])
        if op == proto.OP_RUN:
            return self.run(a[0], payload)
        if op == proto.OP_AUDIT:
            self.vms[a[0]].audited = True
            self.findings += stale_private_backing(self.vms[a[0]])
            return 0, audit_ranges(self.vms[a[0]])
        if op == proto.OP_RESUME:
            vs = self.vms[a[0]]
            self.findings += stale_private_backing(vs, vs.pending_shared)
            vs.pending_shared = []
            return 0, b""
        if op == proto.OP_AUDIT_DONE:
            self.findings += audit_findings(self.vms[a[0]], payload)
            return 0, b""
        return -errno.ENOSYS, b""

    def _refresh(self, vs=None):
        """Real memslot changes for one VM, or every VM that governs memory."""
        for s in ([vs] if vs is not None else list(self.vms.values())):
            if not s.gone and s.real.governs:
                self._acts += s.real.refresh()

    def _reap(self):
        """VMs the model destroyed, inodes nothing references any more."""
        for vs in self.vms.values():
            if vs.vm.destroyed and not vs.gone:
                vs.gone = True
                vs.real.governed.clear()    # drop its guest_memfd references with it
                for vid in [v for v, (_, s) in self.vcpus.items() if s is vs]:
                    del self.vcpus[vid]
                    self.guests.pop(vid, None)
                self._acts.append(act(ACT_VM_GONE, vs.id))
        for gf in list(self.gfiles.values()):
            if gf.closed and not gf.maps:
                self._acts.append(act(ACT_BACKING_DEL, 0, gf.ino))
                del self.gfiles[gf.id]

    def _sync_user_touches(self):
        """Pages the program wrote through its own mappings of INIT_SHARED guest_memfds:
        the folios kvm_gmem_fault_user_mapping() would have made by now (6.18)."""
        for gf in self.gfiles.values():
            if gf.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED and not gf.f.closed:
                gf.f.sync_memfd()

    # ------------------------------------------------------------------ /dev/kvm

    def check_extension(self, vm, cap):
        if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK, b""
        if cap not in MODELLED_CAPS:
            self._v[3] = proto.SHIM_PASS
            return 0, b""
        return (vm or self.host).check_extension(cap), b""

    def sys_ioctl(self, cmd, arg):
        if cmd == uapi.KVM_CHECK_EXTENSION:
            return self.check_extension(None, arg)
        if cmd == uapi.KVM_CREATE_VM:
            vm = self.host.create_vm(arg)
            oid = self._new_id()
            if arg not in _CONFIDENTIAL:
                mode = RUN_REAL if self.hybrid else RUN_NONE
            else:
                mode = RUN_MODEL if self.guest is not None else RUN_NONE
            vs = VmState(oid, vm, mode)
            self.vms[oid] = vs
            self._v[0] = mode
            self._v[1] = int(vm.has_private_mem)
            return oid, b""
        return -errno.ENOTTY, b""

    # ------------------------------------------------------------------ VM ioctls

    def vm_ioctl(self, vs, cmd, arg, fd_state, gmem_obj, payload):
        vm = vs.vm
        if cmd == uapi.KVM_CHECK_EXTENSION:
            return self.check_extension(vm, arg)
        if cmd == uapi.KVM_CREATE_VCPU:
            vcpu = vm.create_vcpu(arg)
            oid = self._new_id()
            self.vcpus[oid] = (vcpu, vs)
            return oid, b""
        if cmd == uapi.KVM_SET_USER_MEMORY_REGION:
            slot, flags, gpa, size, uaddr = struct.unpack_from(uapi.KVM_USERSPACE_MEMORY_REGION_FORMAT, payload)
            vm.set_user_memory_region(slot, flags, gpa, size, uaddr)
            return self._memslot_changed(vs, _slot(slot, flags, gpa, size, uaddr, 0), None), b""
        if cmd == uapi.KVM_SET_USER_MEMORY_REGION2:
            f = struct.unpack_from(uapi.KVM_USERSPACE_MEMORY_REGION2_FORMAT, payload)
            slot, flags, gpa, size, uaddr, goff = f[:6]
            gf = self.gfiles.get(gmem_obj) if fd_state == proto.FD_GMEM else None
            # the program's fd numbers are not the model's: a guest_memfd is passed as the
            # object, another open file as fd 0 (an open file that is no guest_memfd), and a
            # number that is not open as -1
            gfd = gf.f if gf is not None else (0 if fd_state == proto.FD_OTHER else -1)
            vm.set_user_memory_region2(slot, flags, gpa, size, uaddr, gfd, goff)
            bound = gf if flags & uapi.KVM_MEM_GUEST_MEMFD and size else None
            return self._memslot_changed(vs, _slot(slot, flags, gpa, size, uaddr, goff), bound), b""
        if cmd == uapi.KVM_SET_MEMORY_ATTRIBUTES:
            gpa, size, attrs, flags = struct.unpack_from(uapi.KVM_MEMORY_ATTRIBUTES_FORMAT, payload)
            vm.set_memory_attributes(gpa, size, attrs, flags)
            self._refresh(vs)
            if not attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
                # by the next KVM_RUN the VMM should have discarded the private copy
                vs.pending_shared.append((gpa, size))
                self._acts.append(act(ACT_VM_CHECK_RESUME, vs.id))
            return 0, b""
        if cmd == uapi.KVM_CREATE_GUEST_MEMFD:
            size, flags = struct.unpack_from("<QQ", payload)
            f = vm.create_guest_memfd(size, flags)
            gf = GFile(self._new_id(), f, vs)
            self.gfiles[gf.id] = gf
            self._v[0], self._v[1] = gf.id, gf.ino
            self._fds.append(f.memfd)
            return 0, b""
        if cmd == uapi.KVM_ENABLE_CAP:
            cap, flags, *args = struct.unpack_from("<II4Q", payload)
            if flags:
                return -errno.EINVAL, b""       # kvm_vm_ioctl_enable_cap: flags must be 0
            vm.enable_cap(cap, args[0])
            return 0, b""
        if cmd == KVM_MEMORY_ENCRYPT_OP:
            from gmem._exec.encrypt import vm_encrypt_op
            return vm_encrypt_op(self, vs, fd_state, gmem_obj, payload)   # a3, a4: struct and source sizes
        return -errno.ENOTTY, b""

    def _memslot_changed(self, vs, d, gf):
        acts = vs.real.memslot_changed(d, gf)
        if vs.real.governs:
            self._acts.append(act(ACT_VM_GOVERNED, vs.id))
        self._acts += acts
        if vs.real.governed:
            self._refresh(vs)
        return 0

    # ------------------------------------------------------------------ vCPU ioctls

    def vcpu_ioctl(self, vcpu, vs, cmd, arg, a3, a4, payload):
        if cmd == uapi.KVM_PRE_FAULT_MEMORY:
            gpa, size, flags = struct.unpack_from("<QQQ", payload)
            out = bytearray(payload[:uapi.KVM_PRE_FAULT_MEMORY_SIZE])
            try:
                left = vcpu.pre_fault_memory(gpa, size, flags)
            except OSError as e:
                # kvm_vcpu_pre_fault_memory copies the range back before it returns the error
                raise Reply(-(e.errno or errno.EIO), bytes(out)) from None
            finally:
                self._refresh(vs)
            struct.pack_into("<QQ", out, 0, *left)
            return 0, bytes(out)
        if cmd == KVM_MEMORY_ENCRYPT_OP:
            from gmem._exec.encrypt import vcpu_encrypt_op
            return vcpu_encrypt_op(self, vcpu, vs, a3, a4, payload)
        return -errno.ENOTTY, b""

    def fault(self, vcpu_id, gpa, is_write):
        """A real MMIO exit on a VM whose memory the model governs: the model's fault path
        with the error code of a not-present access (the exit tells read from write)."""
        vcpu, vs = self.vcpus[vcpu_id]
        self.counts["faults"] += 1
        ec = uapi.PFERR_WRITE_MASK if is_write else 0
        for _ in range(8):                  # RET_PF_RETRY: the vCPU re-enters, faults again
            r = vcpu.page_fault(gpa, ec)
            if r.ret != uapi.RET_PF_RETRY:
                break
        if r.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT:
            self.counts["memory_fault_exits"] += 1
            self._v[:3] = list(r.memory_fault)
            return FAULT_MEMORY_FAULT, b""
        if r.ret == uapi.RET_PF_EMULATE:
            return FAULT_PASS, b""
        if r.ret < 0:
            return r.ret, b""
        self._refresh(vs)
        return FAULT_RESUME, b""

    def run(self, vcpu_id, payload):
        vcpu, vs = self.vcpus[vcpu_id]
        self.findings += stale_private_backing(vs, vs.pending_shared)
        vs.pending_shared = []
        g = self.guests.get(vcpu_id)
        if g is None:
            g = self.guests[vcpu_id] = self.guest(vcpu, vs)
        ret, head = g.run(bytes(payload[:proto.RUN_HEAD]))
        self._refresh(vs)
        return ret, head

    # ------------------------------------------------------------------ guest_memfd

    def gmem_op(self, op, oid, a):
        if op == proto.GMEM_MUNMAP:
            m, gf = self.maps.pop(a[0])
            m.close()
            gf.maps.discard(a[0])
            self._refresh()
            return 0, b""
        f = self.gfiles[oid].f
        if op == proto.GMEM_FALLOCATE:
            try:
                f.fallocate(a[0], _s64(a[1]), _s64(a[2]))
            finally:
                self._refresh()
            return 0, b""
        if op == proto.GMEM_READ:
            f.read(a[0])
        if op == proto.GMEM_WRITE:
            f.write(b"")
        if op == proto.GMEM_PREAD:
            f.pread(0, _s64(a[0]))
        if op == proto.GMEM_PWRITE:
            f.pwrite(b"", _s64(a[0]))
        if op == proto.GMEM_LSEEK:
            f.lseek(_s64(a[0]), a[1])
        if op == proto.GMEM_FTRUNCATE:
            f.ftruncate(_s64(a[0]))
        if op == proto.GMEM_FSTAT:
            st = f.fstat()
            return 0, proto.STAT.pack(st["st_size"], st["st_blksize"], st["st_mode"], st["st_ino"],
                                      st["st_blocks"])
        if op == proto.GMEM_MMAP:
            m = f.mmap(a[0], a[1], a[2], a[3])
            mid = self._new_id()
            gf = self.gfiles[oid]
            self.maps[mid] = (m, gf)
            gf.maps.add(mid)
            # 6.18 kvm_gmem_fault_user_mapping: every page SIGBUSes unless INIT_SHARED
            self._v[2] = int(bool(gf.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED))
            return mid, b""
        return -errno.ENOSYS, b""

    def close(self, oid):
        if oid in self.vms:
            vs = self.vms[oid]
            vs.last_stats = dict(vs.vm.stats)       # the report's, should this destroy it
            vs.vm.close()
        elif oid in self.gfiles:
            gf = self.gfiles[oid]
            if not gf.vms.vm.destroyed:
                gf.vms.last_stats = dict(gf.vms.vm.stats)
            gf.f.close()
            gf.closed = True
            self._refresh()
        return 0, b""


def _slot(slot, flags, gpa, size, uaddr, goff):
    """A memslot as the model accepted it (the keys of Vm.memslots())."""
    return dict(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=uaddr,
                guest_memfd_offset=goff)


def _s64(v):
    return v - (1 << 64) if v >> 63 else v


# ---------------------------------------------------------------------- the socket loop

class _Conn:
    """A client process's connection: its bytes not yet parsed into requests."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()


def serve(server, listener, child_pid):
    """Answer requests until the program (child_pid) exits; its wait status."""
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    pidfd = os.pidfd_open(child_pid)
    sel.register(pidfd, selectors.EVENT_READ, None)
    status = None
    try:
        while status is None:
            for key, _ in sel.select():
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    sel.register(conn, selectors.EVENT_READ, _Conn(conn))
                elif key.fileobj == pidfd:
                    status = os.waitpid(child_pid, 0)[1]
                elif not _serve(server, key.data):
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
    finally:
        for key in list(sel.get_map().values()):
            if key.data is not None:
                key.fileobj.close()
        sel.close()
        os.close(pidfd)
    return status


def _serve(server, c):
    """Read what the client sent and answer every complete request; False at EOF."""
    data = c.sock.recv(65536)
    if not data:
        return False
    c.buf += data
    while len(c.buf) >= proto.REQ.size:
        req = proto.REQ.unpack_from(c.buf)
        if req[0] < proto.REQ.size:
            return False                    # garbage: drop the client
        if len(c.buf) < req[0]:
            c.buf += _recv_exact(c.sock, req[0] - len(c.buf)) or b""
            if len(c.buf) < req[0]:
                return False
        payload = bytes(c.buf[proto.REQ.size:req[0]])
        del c.buf[:req[0]]
        _answer(server, c.sock, req, payload)
    return True


def _recv_exact(conn, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _answer(server, conn, req, payload):
    try:
        ret, v, out, acts, fds = server.handle(req, payload)
    except Exception:                       # a bug of ours: the program sees EIO, we go on
        traceback.print_exc(file=sys.stderr)
        ret, v, out, acts, fds = -errno.EIO, [0, 0, 0, 0], b"", [], []
    body = out + b"".join(acts)
    rep = proto.REP.pack(proto.REP.size + len(body), len(acts), ret, len(out), 0, *v) + body
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sent = conn.sendmsg([rep], anc)
    if sent < len(rep):
        conn.sendall(rep[sent:])
