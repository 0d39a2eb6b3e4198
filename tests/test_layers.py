"""The core's layering, read from its source (src/gmem/README.md): a check that keeps it true.

* Kernel files hold only `noexcept nogil` C: no `raise`, `def`, Python `object` or `with gil`.
* Handle files (`_api_*.pxi`) never reach into xarrays, RMP entries, S-EPT leaves or SPTEs:
  they convert arguments, make a C call and raise (only `_api_mm.pxi`, the handle of the
  XArray itself, calls `xa_*`).
* The generic files (`_kvm_main.pxi`, `_guest_memfd.pxi`, `_mmu.pxi`) name no SNP or TDX
  internals: vendors come in through the hook table.
* Each layer calls only downward, in the include order of `_core.pyx`; the calls up are the
  kernel's own callbacks (kvm_arch_*, the vendor ops table, ...), listed here with the reason.
* `_core.pyx` is the include list; the C constants agree with gmem.uapi.
"""
import errno
import os
import re

import pytest

import gmem
from gmem import _core, uapi

SRC = os.path.dirname(os.path.abspath(gmem.__file__))
PYX = os.path.join(SRC, "_core.pyx")

pytestmark = pytest.mark.skipif(not os.path.exists(PYX), reason="the .pyx/.pxi sources are not installed")


def _includes():
    return re.findall(r'^include "(\w+)\.pxi"', open(PYX).read(), re.M)


def _code(name):
    """A .pxi file without its comments and docstrings."""
    s = open(os.path.join(SRC, name + ".pxi")).read()
    s = re.sub(r'"""[\s\S]*?"""', '""', s)
    return re.sub(r"#.*", "", s)


INCLUDES = _includes() if os.path.exists(PYX) else []
KERNEL = [f for f in INCLUDES if not f.startswith("_api_")]
HANDLES = [f for f in INCLUDES if f.startswith("_api_")]
GENERIC = ["_kvm_main", "_guest_memfd", "_mmu"]


def test_core_pyx_is_the_include_list():
    lines = [ln.strip() for ln in open(PYX).read().split('"""', 2)[2].splitlines()]
    code = [ln for ln in lines if ln and not ln.startswith("#")]
    assert all(ln.startswith(("include ", "cimport ", "import ", "from ", "cnp.import_array()"))
               for ln in code), [ln for ln in code if not ln.startswith(("include", "cimport", "import", "from"))]
    assert KERNEL and HANDLES and INCLUDES.index(KERNEL[-1]) < INCLUDES.index(HANDLES[0]), \
        "the kernel half is included before the handle half"
    for line in open(PYX):
        if line.startswith("include "):
            assert "#" in line, f"every include line says what it holds: {line!r}"


@pytest.mark.parametrize("name", KERNEL)
def test_kernel_file_is_nogil_c(name):
    code = _code(name)
    for pattern, what in [(r"\braise\b", "raise"), (r"^\s*(async\s+)?def\s", "def"), (r"\bcpdef\b", "cpdef"),
                          (r"\bobject\b", "object"), (r"\bwith\s+gil\b", "with gil")]:
        hits = [ln for ln in code.splitlines() if re.search(pattern, ln)]
        assert not hits, f"{name}.pxi has {what}: {hits[:3]}"
    for m in re.finditer(r"^cdef\s+(?:inline\s+)?[^\n=:]*?\b(\w+)\s*\(([^)]*)\)([^:]*):", code, re.M):
        assert "noexcept" in m.group(3) and "nogil" in m.group(3), \
            f"{name}.pxi: {m.group(1)} is not `noexcept nogil`"


HANDLE_FORBIDDEN = [
    (r"\bxa_\w+\s*\(|\b_xa_\w+\s*\(", "an xa_* call"),
    (r"\bRMP_(?!DTYPE)\w+", "RMP entry bits"),
    (r"\.rmp\.|\.sev\.", "SEV/RMP state"),
    (r"\bSPTE_\w+|\.sptes\b|\.mmio_sptes\b", "SPTE bits"),
    (r"\bTDX_SEPT_(?!STATES)\w+|\.sept\b|\.tdx\.", "S-EPT state"),
    (r"\.memslots\b|\.filemap\b|\.bindings\b|\.mem_attr_array\b", "a kernel structure's insides"),
]


@pytest.mark.parametrize("name", [h for h in HANDLES if h != "_api_mm"])
def test_handle_file_touches_no_kernel_internals(name):
    code = _code(name)
    for pattern, what in HANDLE_FORBIDDEN:
        hits = [ln.strip() for ln in code.splitlines() if re.search(pattern, ln)]
        assert not hits, f"{name}.pxi touches {what}: {hits[:3]}"


GENERIC_FORBIDDEN = r"\brmp\b|\.rmp\b|\bRMP_\w+|\bsept\b|\.sept\b|\bTDX_SEPT\w*|\.sev\.|\.tdx\.|" \
                    r"\b(snp|sev|tdx|psmash|pvalidate|rmpupdate)_\w+\s*\("


@pytest.mark.parametrize("name", GENERIC)
def test_generic_file_names_no_vendor_internals(name):
    hits = [ln.strip() for ln in _code(name).splitlines() if re.search(GENERIC_FORBIDDEN, ln)]
    assert not hits, f"{name}.pxi names SNP/TDX internals: {hits[:3]}"


# The calls from a file to a later one: the kernel's own callbacks, each with its reason.
UPCALLS = {
    # folio_put of a pool folio ends in free_huge_folio (mm/hugetlb.c), not the buddy allocator
    ("_physmem", "_hugetlb"): {"hugetlb_free_pages"},
    # the huge-folio rules sit under guest_memfd.c and use its allocation and its user mappings
    # (folio_mapped) as the restructuring code of the proposals does
    ("_gmem_huge", "_guest_memfd"): {"kvm_gmem_alloc_folio", "kvm_gmem_folio_mapped"},
    # a split first zaps the huge leaves over the folio (kvm_split_cross_boundary_leafs, zap)
    ("_gmem_huge", "_mmu"): {"kvm_unmap_huge_leafs", "kvm_split_private_leafs"},
    # the machine at boot: the vendor ops table (kvm_x86_vendor_init) and the platform's
    # hardware, SNP's RMP (snp_rmptable_init), which also checks every host write
    ("_host", "_x86"): {"kvm_x86_hooks_init"},
    ("_host", "_sev"): {"snp_host_write_fault", "snp_inject_rmpupdate_failures", "snp_page_state",
                        "snp_rmptable_destroy", "snp_rmptable_init"},
    # gmem exec: a guest_memfd page's contents live in its inode's memfd (the page cache)
    ("_host", "_contents_memfd"): {"gmem_contents_drop", "gmem_contents_page"},
    ("_guest_memfd", "_contents_memfd"): {"gmem_contents_init", "gmem_contents_release"},
    # kvm_main.c calls guest_memfd.c (kvm_gmem_bind/unbind, the supported flags, and with
    # in-place conversion the attributes: kvm_gmem_is_private_gfn behind kvm_mem_is_private) ...
    ("_kvm_main", "_guest_memfd"): {"kvm_gmem_bind", "kvm_gmem_bind_check", "kvm_gmem_get_supported_flags",
                                    "kvm_gmem_unbind", "kvm_gmem_get_memory_attributes"},
    # ... and KVM_SET_MEMORY_ATTRIBUTES, which the kernel keeps in kvm_main.c too
    ("_kvm_main", "_attributes"): {"kvm_mmu_init_memslot_memory_attributes", "kvm_vm_set_mem_attributes"},
    # the kvm_arch_* callbacks (include/linux/kvm_host.h), implemented by x86 and its MMU
    ("_kvm_main", "_x86"): {"kvm_arch_destroy_vm", "kvm_arch_init_vm", "kvm_arch_prepare_memory_region",
                            "kvm_vm_ioctl_check_extension"},
    ("_kvm_main", "_mmu"): {"kvm_arch_vcpu_pre_fault_memory", "kvm_unmap_gfn_range"},
    # the MMU state x86 keeps per vCPU and per VM: kvm_arch_vcpu_create's kvm_mmu_create,
    # kvm_arch_destroy_vm's kvm_mmu_uninit_vm (the roots' page tables)
    ("_kvm_main", "_tdp_mmu"): {"kvm_mmu_create", "kvm_mmu_uninit_tdp_mmu"},
    # (and, proposed by TDX huge pages v3, the split of huge private leaves crossing a punch
    # or a conversion to shared before its zap: kvm_split_cross_boundary_leafs)
    ("_guest_memfd", "_mmu"): {"kvm_unmap_gfn_range"},
    ("_guest_memfd", "_x86"): {"kvm_arch_has_bound_private_mem"},
    ("_attributes", "_mmu"): {"kvm_unmap_gfn_range", "kvm_split_private_leafs"},
    # x86 fills each VM type's ops from its vendor (svm_x86_ops, vt_x86_ops)
    ("_x86", "_sev"): {"sev_hooks_init"},
    ("_x86", "_tdx"): {"tdx_hooks_init"},
}


def test_each_layer_calls_only_downward():
    defs, code = {}, {}
    for f in KERNEL:
        code[f] = _code(f)
        for m in re.finditer(r"^cdef\s+(?:inline\s+)?[\w\s\*]*?\b(\w+)\s*\(", code[f], re.M):
            defs.setdefault(m.group(1), f)
    up = {}
    for f in KERNEL:
        for m in re.finditer(r"\b(\w+)\s*\(", code[f]):
            d = defs.get(m.group(1))
            if d and KERNEL.index(d) > KERNEL.index(f):
                up.setdefault((f, d), set()).add(m.group(1))
    assert up == UPCALLS


def test_c_constants_agree_with_uapi():
    """gmem.uapi mirrors the core's C constants: one value per kernel name."""
    assert len(_core.C_CONSTANTS) > 100
    for name, value in _core.C_CONSTANTS.items():
        mirror = getattr(uapi, name, getattr(errno, name, None))
        assert mirror == value, f"{name}: C {value:#x}, gmem.uapi {mirror!r}"


def test_module_constants_are_the_c_ones():
    for name in ("GHCB_MSR_PSC_RESP_ERROR", "TDVMCALL_STATUS_INVALID_OPERAND", "INITIAL_VMSA_GPA",
                 "VMGEXIT_PSC_MAX_COUNT"):
        assert getattr(_core, name) == _core.C_CONSTANTS[name] == getattr(uapi, name)
