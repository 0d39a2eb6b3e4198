"""Exceptions gmem raises besides the kernel's OSError(errno)."""


class SigBus(Exception):
    """An access the kernel answers with SIGBUS: through a guest_memfd mapping
    (kvm_gmem_fault_user_mapping: beyond i_size, or a gmem without INIT_SHARED), or a VMM
    write to an RMP-assigned page. .offset: the first faulting byte (of the mapping), or hva."""

    offset: int

    def __init__(self, message, offset=0):
        super().__init__(message)
        self.offset = offset


class RmpViolation(Exception):
    """A host CPU write to a page the RMP assigns to a guest (an RMP #PF on the host)."""


class InvariantError(AssertionError):
    """host.check() found two structures of the model that disagree."""
