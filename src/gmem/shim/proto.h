/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The wire protocol between gmem exec's preload library (gmem_shim.c) and its model
 * server (gmem/exec.py, which mirrors every number here: change both together).
 *
 * One UNIX stream socket per client process.  A request is a struct shim_req followed
 * by `len - sizeof(struct shim_req)` payload bytes; the reply is a struct shim_rep,
 * then `out_len` bytes for the caller's argument, then `nr_actions` struct shim_act the
 * preload library applies before it returns to the program (real memslots to change,
 * guest_memfd backings to forget).  A reply may carry file descriptors (SCM_RIGHTS on
 * its first byte): the guest_memfd a KVM_CREATE_GUEST_MEMFD made.
 */
#ifndef GMEM_SHIM_PROTO_H
#define GMEM_SHIM_PROTO_H

#include <stdint.h>

#define SHIM_PROTO_VERSION 1

enum shim_op {
	OP_HELLO = 1,		/* a0 = pid, a1 = SHIM_PROTO_VERSION */
	OP_SYS_IOCTL,		/* /dev/kvm: a1 = cmd, a2 = arg value; payload = arg bytes */
	OP_VM_IOCTL,		/* a0 = vm, a1 = cmd, a2 = arg value, a3/a4: see below; payload = arg bytes */
	OP_VCPU_IOCTL,		/* a0 = vcpu, a1 = cmd, a2 = arg value; payload = arg bytes */
	OP_GMEM,		/* a0 = gmem file, a1 = GMEM_*, a2.. = arguments */
	OP_CLOSE,		/* a0 = object: the program closed its last fd on it */
	OP_FAULT,		/* a0 = vcpu, a1 = gpa, a2 = is_write, a3 = len: a real MMIO exit */
	OP_RUN,			/* a0 = vcpu; payload = the kvm_run header and union (256 bytes) */
	OP_AUDIT,		/* a0 = vm, before its last fd closes: the reply's payload lists
				   (hva, pages) of the program's shared memory behind private gfns */
	OP_AUDIT_DONE,		/* a0 = vm; payload: (hva, resident pages) for each of them */
	OP_RESUME,		/* a0 = vm: the program re-enters a vCPU after ACT_VM_CHECK_RESUME */
};

/*
 * OP_VM_IOCTL, KVM_SET_USER_MEMORY_REGION2: what the guest_memfd field names in this
 * process, since fd numbers are the program's and not the model's.
 */
enum shim_fd_state {
	FD_NOT_OPEN = 0,	/* EBADF territory */
	FD_OTHER = 1,		/* an open file that is no guest_memfd (EINVAL) */
	FD_GMEM = 2,		/* a4 = the guest_memfd object */
};

enum shim_gmem_op {
	GMEM_FALLOCATE = 1,	/* a2 = mode, a3 = offset, a4 = len */
	GMEM_READ,		/* read/readv: no FMODE_CAN_READ */
	GMEM_WRITE,
	GMEM_PREAD,		/* a2 = offset */
	GMEM_PWRITE,		/* a2 = offset */
	GMEM_LSEEK,		/* a2 = offset, a3 = whence */
	GMEM_FTRUNCATE,		/* a2 = length */
	GMEM_FSTAT,		/* out: struct shim_stat */
	GMEM_MMAP,		/* a2 = length, a3 = offset, a4 = prot, a5 = flags; ret = mapping object,
				   v[2] = 1 when the pages may be touched (else every access SIGBUSes) */
	GMEM_MUNMAP,		/* a2 = mapping object: the last of its pages is unmapped */
};

/* OP_FAULT replies (ret) */
enum shim_fault_ret {
	FAULT_RESUME = 0,	/* the model mapped gpa: complete the access, re-enter */
	FAULT_PASS = 1,		/* an MMIO access the model also calls MMIO: give it to the program */
	FAULT_MEMORY_FAULT = 2,	/* KVM_EXIT_MEMORY_FAULT: v[0..2] = flags, gpa, size */
	/* < 0: -errno for KVM_RUN */
};

/* OP_VM_IOCTL / OP_SYS_IOCTL reply flag v[3]: the model does not answer, ask the host's KVM */
#define SHIM_PASS 1

/* KVM_CREATE_VM reply (OP_SYS_IOCTL): v[0] = how KVM_RUN runs on this VM */
enum shim_run_mode {
	RUN_REAL = 0,		/* the host's KVM executes the guest (hybrid) */
	RUN_MODEL = 1,		/* the model server runs a scripted guest (OP_RUN) */
	RUN_NONE = 2,		/* nothing can execute it: KVM_RUN fails with ENOEXEC */
};

struct shim_req {
	uint32_t len;		/* bytes, this header included */
	uint32_t op;
	uint64_t a[6];
};

struct shim_rep {
	uint32_t len;		/* bytes, this header included */
	uint32_t nr_actions;
	int64_t ret;		/* >= 0, or -errno */
	uint32_t out_len;
	uint32_t pad;
	uint64_t v[4];
};

enum shim_act_type {
	ACT_SLOT_SET = 1,	/* vm, a = real slot id, b = flags, c = gpa, d = size,
				   e = hva (backing == 0) or offset in the backing */
	ACT_SLOT_DEL,		/* vm, a = real slot id */
	ACT_BACKING_DEL,	/* backing: forget it (its inode is gone) */
	ACT_VM_GONE,		/* vm: the model destroyed it: drop the real VM */
	ACT_VM_GOVERNED,	/* vm: ask the model about its MMIO exits */
	ACT_VM_CHECK_RESUME,	/* vm: send OP_RESUME at the next KVM_RUN (a conversion to check) */
};

struct shim_act {
	uint32_t type;
	uint32_t vm;
	uint64_t backing;	/* ACT_SLOT_SET: 0 = e is an address of the program */
	uint64_t a, b, c, d, e;
};

/* GMEM_FSTAT's answer */
struct shim_stat {
	uint64_t size, blksize, mode, ino, blocks;
};

#endif
