"""gmem exec: KVM_MEMORY_ENCRYPT_OP, the SEV-SNP and TDX launch commands the model has.

The preload library sends the 24-byte command (struct kvm_sev_cmd / kvm_tdx_cmd: id, then
the pointer to the command's struct at offset 8), the command's struct, and for the commands
that copy guest pages in, the source bytes, which are written into the model's VMM memory
(host.write_user) at the same address before the model reads them. The reply carries the
command and its struct as the kernel copies them back.
"""
import errno
import struct

from gmem import uapi

CMD_SIZE = 24
KVM_SEV_INIT2 = 22
_SEV_TYPES = (uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM, uapi.KVM_X86_SNP_VM)


def _split(payload, dsize, srclen):
    cmd = bytearray(payload[:CMD_SIZE])
    data = bytearray(payload[CMD_SIZE:CMD_SIZE + dsize])
    src = payload[CMD_SIZE + dsize:]
    return cmd, data, src if len(src) == srclen else None


def vm_encrypt_op(server, vs, dsize, srclen, payload):
    """The VM ioctl: sev_mem_enc_ioctl (platform "amd") or tdx_vm_ioctl ("intel")."""
    vm = vs.vm
    cmd, data, src = _split(payload, dsize, srclen)
    cid = struct.unpack_from("<I", cmd)[0]
    if server.host.platform == "intel":
        if vm.vm_type != uapi.KVM_X86_TDX_VM:
            return -errno.ENOTTY, b""           # vt_mem_enc_ioctl: !is_td(kvm)
        flags = struct.unpack_from("<I", cmd, 4)[0]
        if flags:
            return -errno.EINVAL, b""
        if cid == uapi.KVM_TDX_INIT_VM:
            vm.tdx_init_vm()                    # GPAW 52; the CPUID the VMM passes is not modelled
        elif cid == uapi.KVM_TDX_FINALIZE_VM:
            vm.tdx_finalize_vm()
        else:
            return -errno.EINVAL, b""
        return 0, bytes(cmd)
    if server.host.platform != "amd":
        return -errno.ENOTTY, b""               # no SEV: kvm_x86_ops.mem_enc_ioctl is NULL
    if cid == KVM_SEV_INIT2:
        if vm.vm_type not in _SEV_TYPES:
            return -errno.EINVAL, b""           # sev_guest_init2: not an SEV VM type
        return 0, bytes(cmd) + bytes(data)
    if vm.vm_type not in _SEV_TYPES:
        return -errno.ENOTTY, b""               # sev_mem_enc_ioctl: !sev_guest(kvm)
    if cid in (uapi.KVM_SEV_SNP_LAUNCH_START, uapi.KVM_SEV_SNP_LAUNCH_UPDATE) and not server._sev_ok:
        return -errno.EBADF, bytes(cmd) + bytes(data)   # __sev_issue_cmd: sev_fd is no /dev/sev
    if cid == uapi.KVM_SEV_SNP_LAUNCH_START and vm.vm_type == uapi.KVM_X86_SNP_VM:
        policy = struct.unpack_from("<Q", data)[0] if len(data) >= 8 else 0
        vm.snp_launch_start(policy)
    elif cid == uapi.KVM_SEV_SNP_LAUNCH_UPDATE and vm.vm_type == uapi.KVM_X86_SNP_VM:
        if len(data) < uapi.KVM_SEV_SNP_LAUNCH_UPDATE_SIZE:
            return -errno.EFAULT, b""
        gfn, uaddr, ln, ptype, _pad0, flags = struct.unpack_from("<QQQBBH", data)
        if ptype != uapi.KVM_SEV_SNP_PAGE_TYPE_ZERO and srclen:
            if src is None:
                return -errno.EFAULT, b""
            _vmm_pages(server, uaddr, src)  # the VMM's pages, as the model reads them
        gfn, uaddr, ln = vm.snp_launch_update(gfn, uaddr, ln, ptype, flags)
        struct.pack_into("<QQQ", data, 0, gfn, uaddr, ln)
    elif cid == uapi.KVM_SEV_SNP_LAUNCH_FINISH and vm.vm_type == uapi.KVM_X86_SNP_VM:
        vm.snp_launch_finish()
    else:
        return -errno.EINVAL, b""
    return 0, bytes(cmd) + bytes(data)


def _vmm_pages(server, addr, data):
    """The program's pages at addr, as the model reads them: mapped in the model's VMM
    (they are mapped in the program, which read them), then written."""
    start, end = addr & ~0xFFF, (addr + len(data) + 0xFFF) & ~0xFFF
    if end > start:
        server.host.mmap_user(start, end - start)
    server.host.write_user(addr, data)


def vcpu_encrypt_op(server, vcpu, vs, dsize, srclen, payload):
    """The vCPU ioctl: tdx_vcpu_ioctl (KVM_TDX_INIT_VCPU, KVM_TDX_INIT_MEM_REGION)."""
    cmd, data, src = _split(payload, dsize, srclen)
    cid, flags = struct.unpack_from("<II", cmd)
    if server.host.platform != "intel" or vs.vm.vm_type != uapi.KVM_X86_TDX_VM:
        return -errno.ENOTTY, b""               # kvm_arch_vcpu_unlocked_ioctl: no vcpu_mem_enc_ioctl
    if cid == uapi.KVM_TDX_INIT_VCPU:
        return 0, bytes(cmd)
    if cid != uapi.KVM_TDX_INIT_MEM_REGION or len(data) < 24:
        return -errno.EINVAL, b""
    source, gpa, nr = struct.unpack_from("<QQQ", data)
    if srclen:
        if src is None:
            return -errno.EFAULT, b""
        _vmm_pages(server, source, src)
    done = vcpu.tdx_init_mem_region(source, gpa, nr, bool(flags & uapi.KVM_TDX_MEASURE_MEMORY_REGION))
    struct.pack_into("<QQQ", data, 0, source + (done << 12), gpa + (done << 12), nr - done)
    return 0, bytes(cmd) + bytes(data)
