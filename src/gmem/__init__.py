"""gmem: a model of Linux KVM guest_memfd and the x86 confidential-VM fault path.

The state lives in C structs in gmem._core; the classes here are handles on it.
"""
from gmem import uapi
from gmem._core import (FAULT_DTYPE, RMP_DTYPE, TRACE_DTYPE, TRACE_EVENTS, FaultResult, GuestExit,
                        GuestFault, GuestMemfd, Host, HypercallExit, Mapping, PhysMem, Pin, Rmp, RmpEntry,
                        Trace, Vcpu, Vm, XArray, page_states)
from gmem._version import __version__
from gmem.errors import InvariantError, RmpViolation, SigBus

# The public names, for `from gmem import *` and for type checkers (a py.typed package
# re-exports an imported name only if it is listed here).
__all__ = [
    "FAULT_DTYPE", "RMP_DTYPE", "TRACE_DTYPE", "TRACE_EVENTS", "FaultResult", "GuestExit", "GuestFault",
    "GuestMemfd", "Host", "HypercallExit", "InvariantError", "Mapping", "PhysMem", "Pin", "Rmp", "RmpEntry",
    "RmpViolation", "SigBus", "Trace", "Vcpu", "Vm", "XArray", "uapi", "__version__",
]
