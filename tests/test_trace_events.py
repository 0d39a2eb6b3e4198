"""The core's tracepoints beyond the fault path (docs/trace-events.md): RMP instructions, the
guest's PVALIDATE, attribute changes, fallocate, folio splits, memory failure, and the TDX
module's SEAMCALLs, each recorded where the kernel (or the hardware) does it, with its payload;
the report and the Chrome export read them like the others."""
import json

import numpy as np

import gmem
from gmem import tracing
from gmem import uapi as u

HVA = 0x7F0000000000
SRC = 0x7E0000000000
MB2 = 2 << 20
ENC_W = u.PFERR_GUEST_ENC_MASK | u.PFERR_WRITE_MASK
PRIVATE = u.KVM_MEMORY_ATTRIBUTE_PRIVATE


def named(recs, event):
    return recs[recs["event"] == gmem.TRACE_EVENTS.index(event)]


def rows(recs, event, *cols):
    return [tuple(int(r[c]) for c in cols) for r in named(recs, event)]


def test_snp_events():
    h = gmem.Host(memory=64 << 20, platform="amd", huge_folios=True)
    vm = h.create_vm(u.KVM_X86_SNP_VM)
    f = vm.create_guest_memfd(2 * MB2)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, 2 * MB2, HVA, f, 0)
    v = vm.create_vcpu(0)
    vm.launch()
    h.trace.enable()
    vm.set_memory_attributes(0, 2 * MB2, PRIVATE)
    r = v.page_fault(0x5000, ENC_W)                         # a 2M folio, a 2M RMP entry
    head = r.pfn & ~511
    assert v.pvalidate(0x5000, 0, True) == 0                # 4K inside 2M: PSMASH first
    f.punch_hole(0x5000, 4096)                              # split the folio, reclaim the page
    recs = h.trace.to_numpy()
    assert rows(recs, "kvm_set_memory_attributes", "a", "b", "c", "d") == [(0, 1024, PRIVATE, 0)]
    ups = rows(recs, "rmpupdate", "a", "b", "c", "d")
    assert ups[0] == (head, 0, 1 | 2 | (vm.asid << 32), 0)   # assigned 2M at gpa 0, this ASID
    assert (head + 5, 0, 0, 0) in ups                        # the punched page made shared again
    assert rows(recs, "psmash", "a", "d") == [(head, 0)]
    assert rows(recs, "pvalidate", "a", "b", "c", "d") == [(0x5000, head + 5, 0 | 1 << 1, 0)]
    assert named(recs, "pvalidate")["vcpu"][0] == 0 and named(recs, "psmash")["vcpu"][0] == 0xFFFFFFFF
    assert rows(recs, "folio_split", "a", "b", "c") == [(head, 9, 0)]
    assert rows(recs, "gmem_fallocate", "a", "b", "c", "d") == [
        (f.ino, 0x5000, 4096, u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE)]
    assert h.memory_failure(head + 7) is True
    assert rows(h.trace.to_numpy(), "memory_failure", "a", "d") == [(head + 7, 1)]
    text = h.trace.report()
    assert "rmpupdate" in text and "psmash" in text and "folio_split" in text
    doc = json.loads(json.dumps(tracing.chrome_trace(h.trace.to_numpy())))
    assert {"rmpupdate", "pvalidate", "memory_failure"} <= {e["name"] for e in doc["traceEvents"]}


def test_tdx_events():
    h = gmem.Host(memory=64 << 20, platform="intel")
    vm = h.create_vm(u.KVM_X86_TDX_VM)
    vm.tdx_init_vm(52)
    f = vm.create_guest_memfd(MB2)
    vm.set_user_memory_region2(0, u.KVM_MEM_GUEST_MEMFD, 0, MB2, HVA, f, 0)
    vm.set_memory_attributes(0, MB2, PRIVATE)
    v = vm.create_vcpu(0)
    v.tdx_init_vcpu()
    h.mmap_user(SRC, 4096)
    h.trace.enable()
    assert v.tdx_init_mem_region(SRC, 0x10000, 1) == 1
    f.punch_hole(0x10000, 4096)                             # before FINALIZE: no TRACK
    vm.tdx_finalize_vm()
    r = v.page_fault(0x5000, 0)
    assert v.tdx_accept(0x5000) == u.TDX_SUCCESS
    f.punch_hole(0x5000, 4096)                              # the TD runs: BLOCK, TRACK, REMOVE
    recs = h.trace.to_numpy()
    add = rows(recs, "tdx_page_add", "a", "c")
    assert add == [(0x10, u.PG_LEVEL_4K)]
    assert rows(recs, "tdx_page_aug", "a", "b", "c") == [(5, r.pfn, u.PG_LEVEL_4K)]
    assert rows(recs, "tdx_accept", "a", "b", "d") == [(0x5000, r.pfn, u.TDX_SUCCESS)]
    assert rows(recs, "tdx_range_block", "a") == [(0x10,), (5,)]
    assert rows(recs, "tdx_page_remove", "a") == [(0x10,), (5,)]
    assert len(named(recs, "tdx_track")) == 1 and vm.tdx_stats["track"] == 1
    seq = [gmem.TRACE_EVENTS[e] for e in recs["event"]]
    i = seq.index("tdx_track")
    assert seq[i - 1] == "tdx_range_block" and seq[i + 1] == "tdx_page_remove"
    assert np.all(np.diff(recs["seq"].astype(np.int64)) == 1)
    h.check()


def _map_gpa_guest(platform, vm_type):
    """A launched guest whose MAP_GPA_RANGE hypercalls exit, tracing them."""
    h = gmem.Host(memory=64 << 20, platform=platform)
    vm = h.create_vm(vm_type)
    vm.launch()
    vm.enable_cap(u.KVM_CAP_EXIT_HYPERCALL, 1 << u.KVM_HC_MAP_GPA_RANGE)
    v = vm.create_vcpu(0)
    h.trace.enable("kvm_map_gpa_range")
    return h, vm, v


def test_map_gpa_range_exits():
    """The KVM_HC_MAP_GPA_RANGE exits of an SNP page-state change and a TD's MapGPA, each
    recorded with the vCPU, the range, the attributes and the hypercall.ret userspace gave."""
    h, vm, v = _map_gpa_guest("amd", u.KVM_X86_SNP_VM)
    v.psc_msr(0x6000, 2)                                     # to shared
    v.complete_hypercall(0)
    ents = [dict(gfn=0x10, operation=1), dict(gfn=0x11, operation=1)]
    v.page_state_change(ents)                                # to private, the two merged
    v.complete_hypercall(22)                                 # EINVAL: the guest sees an error
    assert rows(h.trace.to_numpy(), "kvm_map_gpa_range", "vcpu", "a", "b", "c", "d") == [
        (0, 0x6000, 1, 0, 0), (0, 0x10000, 2, u.KVM_MAP_GPA_RANGE_ENCRYPTED, 22)]
    t, td, tv = _map_gpa_guest("intel", u.KVM_X86_TDX_VM)
    tv.tdx_map_gpa(td.shared_gpa_bit | 0x200000, 3 << 20)    # two chunks: 2M, then 1M
    tv.complete_hypercall(0)
    assert tv.complete_hypercall(0) == u.TDVMCALL_STATUS_SUCCESS
    assert rows(t.trace.to_numpy(), "kvm_map_gpa_range", "a", "b", "c", "d") == [
        (0x200000, 512, 0, 0), (0x400000, 256, 0, 0)]
