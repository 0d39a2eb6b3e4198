# cython: language_level=3
"""gmem's core: the kernel's data structures as C structs, and thin Python handles.

One extension module, two halves (README.md in this directory says which file holds which
kernel file's rules). The kernel half is `noexcept nogil` C returning 0 or -errno, in files
named after the kernel files they model; the C-level API is declared in _core.pxd. The
handle half (_api_*.pxi) converts arguments, holds the host, resolves fds, makes the C
call and raises. Included in layer order, each calling only downward (or through the
per-VM-type hook table).
"""

cimport cython
cimport numpy as cnp
import numpy as np
from libc.stdlib cimport malloc, realloc, calloc, free, qsort
from libc.string cimport memset, memcpy, memmove

cnp.import_array()

# ---------------------------------------------------------- the kernel half (C)
include "_slab.pxi"          # mm/slab.c: the model's own objects in 2 MiB pages (TLB reach)
include "_xarray.pxi"        # lib/xarray.c: the XArray
include "_maple.pxi"         # lib/maple_tree.c: ranges of values (guest_memfd attributes, "next")
include "_physmem.pxi"       # mm/page_alloc.c, struct folio: the buddy allocator and folio table
include "_hugetlb.pxi"       # mm/hugetlb.c: the pool of 2M/1G pages, reservations, restructuring
include "_trace.pxi"         # include/trace/events/kvm.h: tracepoints into a ring
include "_host.pxi"          # the simulated machine: page contents, the VMM's memory, the platform
include "_mempolicy.pxi"     # mm/mempolicy.c: NUMA policies of guest_memfd (mbind, 6.19+)
include "_kvm_main.pxi"      # virt/kvm/kvm_main.c: VMs, vCPUs, memslots, attributes, invalidation
include "_gmem_huge.pxi"     # guest_memfd's huge folios (proposed): pool files, split/merge policies
include "_guest_memfd.pxi"   # virt/kvm/guest_memfd.c: inodes, files, bindings, fallocate, get_pfn
include "_contents_memfd.pxi"  # gmem exec: guest_memfd contents in memfds (Host(content_memfd=True))
include "_attributes.pxi"    # kvm_vm_set_mem_attributes with x86's pre/post hooks (lpage mixed)
include "_x86.pxi"           # arch/x86/kvm/x86.c: arch VM init, caps, enable_cap, the hook table
include "_tdp_mmu.pxi"       # arch/x86/kvm/mmu/tdp_mmu.c, spte.h: SPTEs in page tables, map, zap
include "_mmu.pxi"           # arch/x86/kvm/mmu/mmu.c: the fault path, unmap, the batch, pre-fault
include "_sev.pxi"           # arch/x86/{virt,kvm}/svm/sev.c: RMP, its instructions, SNP's KVM side
include "_tdx.pxi"           # arch/x86/kvm/vmx/tdx.c: the TD's life, S-EPT, EPT violations, TDCALLs
include "_guest.pxi"         # the guest CPU: accesses through the NPT, PVALIDATE/RMPADJUST walks
include "_inspect.pxi"       # page states across the layers (gmem.page_states)
include "_check.pxi"         # host.check(): every structure against the others

# ---------------------------------------------------------- the handle half (Python)
include "_api_args.pxi"      # argument converters, OSError from a rule's -errno and reason
include "_api_constants.pxi" # the C constants by their kernel names (gmem.uapi mirrors them)
include "_api_mm.pxi"        # gmem.XArray, gmem.PhysMem
include "_api_trace.pxi"     # gmem.Trace
include "_api_host.pxi"      # gmem.Host: the host lock, fd table, Python hooks
include "_api_results.pxi"   # FaultResult, HypercallExit, GuestExit, GuestFault
include "_api_vm.pxi"        # gmem.Vm: the VM ioctls
include "_api_vcpu.pxi"      # gmem.Vcpu: faults, pre-fault, the guest's accesses and requests
include "_api_gmem.pxi"      # gmem.GuestMemfd, gmem.Mapping
include "_api_snp.pxi"       # gmem.Rmp and SNP's constants
include "_api_inspect.pxi"   # gmem.page_states; handles -> structs for the C-level API
