"""gmem: a model of Linux KVM guest_memfd and the x86 confidential-VM fault path.

The state lives in C structs in gmem._core; the classes here are handles on it.
"""
from gmem._core import PhysMem, XArray
from gmem.errors import InvariantError, RmpViolation, SigBus

__version__ = "0.1.0"
