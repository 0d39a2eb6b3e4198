# cython: language_level=3, boundscheck=False, wraparound=False
# A simulator's own Cython module calling gmem's C-level API (gmem/_core.pxd): one fault at a
# time, without the GIL. Built by simulator_batch_and_capi.py.
from libc.stdint cimport uint64_t
from gmem._core cimport kvm_vcpu, kvm_fault_out, kvm_mmu_page_fault, gmem_vcpu_ptr

import numpy as np


def fault_all(vcpu, gpas, uint64_t error_code, int ret_pf_fixed):
    """kvm_mmu_page_fault(gpa, error_code) for each gpa on vcpu (a gmem.Vcpu); the number of
    faults that installed an SPTE (ret == ret_pf_fixed, gmem.uapi.RET_PF_FIXED)."""
    cdef kvm_vcpu *v = gmem_vcpu_ptr(vcpu)
    cdef const uint64_t[::1] g = np.ascontiguousarray(gpas, dtype=np.uint64)
    cdef kvm_fault_out out
    cdef Py_ssize_t i
    cdef Py_ssize_t fixed = 0
    with nogil:
        for i in range(g.shape[0]):
            kvm_mmu_page_fault(v, g[i], error_code, &out)
            if out.ret == ret_pf_fixed:
                fixed += 1
    return fixed
