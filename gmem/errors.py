"""Exceptions gmem raises besides the kernel's OSError(errno)."""


class SigBus(Exception):
    """An access through a guest_memfd mapping that the kernel answers with SIGBUS
    (kvm_gmem_fault_user_mapping: beyond i_size, or a gmem without INIT_SHARED)."""


class RmpViolation(Exception):
    """A host CPU write to a page the RMP assigns to a guest (an RMP #PF on the host)."""


class InvariantError(AssertionError):
    """host.check() found two structures of the model that disagree."""
