"""The wire protocol of gmem exec: the numbers and layouts of src/gmem/shim/proto.h.

tests/test_exec.py reads proto.h and checks every name here against it.
"""
import struct

SHIM_PROTO_VERSION = 1

# enum shim_op
OP_HELLO = 1
OP_SYS_IOCTL = 2
OP_VM_IOCTL = 3
OP_VCPU_IOCTL = 4
OP_GMEM = 5
OP_CLOSE = 6
OP_FAULT = 7
OP_RUN = 8
OP_AUDIT = 9
OP_AUDIT_DONE = 10
OP_RESUME = 11

# enum shim_fd_state
FD_NOT_OPEN = 0
FD_OTHER = 1
FD_GMEM = 2

# enum shim_gmem_op
GMEM_FALLOCATE = 1
GMEM_READ = 2
GMEM_WRITE = 3
GMEM_PREAD = 4
GMEM_PWRITE = 5
GMEM_LSEEK = 6
GMEM_FTRUNCATE = 7
GMEM_FSTAT = 8
GMEM_MMAP = 9
GMEM_MUNMAP = 10

# enum shim_fault_ret
FAULT_RESUME = 0
FAULT_PASS = 1
FAULT_MEMORY_FAULT = 2

SHIM_PASS = 1

# enum shim_run_mode
RUN_REAL = 0
RUN_MODEL = 1
RUN_NONE = 2

# enum shim_act_type
ACT_SLOT_SET = 1
ACT_SLOT_DEL = 2
ACT_BACKING_DEL = 3
ACT_VM_GONE = 4
ACT_VM_GOVERNED = 5
ACT_VM_CHECK_RESUME = 6

REQ = struct.Struct("<II6Q")            # struct shim_req
REP = struct.Struct("<IIqII4Q")         # struct shim_rep
ACT = struct.Struct("<IIQQQQQQ")        # struct shim_act
STAT = struct.Struct("<5Q")             # struct shim_stat

RUN_HEAD = 256                          # kvm_run bytes OP_RUN exchanges


def act(type_, vm=0, backing=0, a=0, b=0, c=0, d=0, e=0):
    """One struct shim_act."""
    return ACT.pack(type_, vm, backing, a, b, c, d, e)
