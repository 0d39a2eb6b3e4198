// SPDX-License-Identifier: GPL-2.0-only
/*
 * gmem exec's preload library: a virtual /dev/kvm.
 *
 * `gmem exec -- PROGRAM` runs PROGRAM with this library in LD_PRELOAD and a model server
 * (gmem/exec.py) on the other end of a UNIX socket.  Every call the program makes on a
 * KVM or guest_memfd file descriptor goes through here:
 *
 *  - the model answers what it models (VM types, capabilities, memslots, memory
 *    attributes, guest_memfd and its file operations, pre-faulting, SEV/TDX launch
 *    commands), with the kernel's errnos;
 *  - everything else (registers, CPUID, MSRs, irqchips, ...) goes to this machine's own
 *    /dev/kvm, which also executes guest code ("hybrid"): the program's VM and vCPU fds are
 *    real KVM fds of a plain (DEFAULT) VM, whose memslots this library keeps equal to what
 *    the model maps.  Shared memory of plain memslots is the program's own; memory the
 *    model owns (private pages, guest_memfd pages) appears in the real VM only once the
 *    model's fault path mapped it, so the guest's first access to it leaves the real VM as
 *    an MMIO exit that this library turns into a model fault: the model maps the page
 *    (the access is completed and the guest resumes) or answers with its own exit
 *    (KVM_EXIT_MEMORY_FAULT).  Conversions and punches delete the real memslots before
 *    the program's ioctl returns.
 *  - a guest_memfd is a memfd holding its inode's contents, shared with the model
 *    (Host(content_memfd=True)): mmap, punch and the guest see the same bytes.
 *
 * Descriptors are real, unique fd numbers; other fds pass through untouched.  The library
 * makes its own system calls directly (raw_syscall), so it never re-enters itself.
 * x86-64 only, like the model.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "proto.h"

#ifndef __x86_64__
#error "gmem's preload library models x86-64 KVM only"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ KVM uAPI numbers */
/* include/uapi/linux/kvm.h (6.18); the system's headers may predate guest_memfd */
#define KVMIO 0xAE
#define IOC(dir, nr, size) (((unsigned long)(dir) << 30) | ((unsigned long)(size) << 16) | (KVMIO << 8) | (nr))
#define IOC_DIR(cmd) (((cmd) >> 30) & 3)
#define IOC_SIZE(cmd) (((cmd) >> 16) & 0x3fff)
#define IOC_WRITE 1
#define IOC_READ 2

#define KVM_GET_API_VERSION		IOC(0, 0x00, 0)
#define KVM_CREATE_VM			IOC(0, 0x01, 0)
#define KVM_CHECK_EXTENSION		IOC(0, 0x03, 0)
#define KVM_GET_VCPU_MMAP_SIZE		IOC(0, 0x04, 0)
#define KVM_CREATE_VCPU			IOC(0, 0x41, 0)
#define KVM_SET_USER_MEMORY_REGION	IOC(1, 0x46, 32)
#define KVM_SET_USER_MEMORY_REGION2	IOC(1, 0x49, 160)
#define KVM_ENABLE_CAP			IOC(1, 0xa3, 104)
#define KVM_MEMORY_ENCRYPT_OP		IOC(3, 0xba, 8)
#define KVM_SET_MEMORY_ATTRIBUTES	IOC(1, 0xd2, 32)
#define KVM_CREATE_GUEST_MEMFD		IOC(3, 0xd4, 64)
#define KVM_RUN				IOC(0, 0x80, 0)
#define KVM_PRE_FAULT_MEMORY		IOC(3, 0xd5, 64)

#define KVM_CAP_EXIT_HYPERCALL	201
#define KVM_EXIT_MMIO		6
#define KVM_EXIT_MEMORY_FAULT	39
#define KVM_X86_SEV_VM		2
#define KVM_X86_SEV_ES_VM	3
#define KVM_X86_SNP_VM		4
#define KVM_X86_TDX_VM		5

/* struct kvm_run: the fields read or written here (x86-64) */
#define RUN_EXIT_REASON		8
#define RUN_MMIO_PHYS_ADDR	32	/* union: also memory_fault.flags */
#define RUN_MMIO_DATA		40	/* union: also memory_fault.gpa */
#define RUN_MMIO_LEN		48	/* union: also memory_fault.size */
#define RUN_MMIO_IS_WRITE	52
#define RUN_HEAD		256	/* header and union: what OP_RUN exchanges */

/* KVM_MEMORY_ENCRYPT_OP: struct kvm_sev_cmd and struct kvm_tdx_cmd are both 24 bytes with
 * the command id first and a pointer to the command's own struct at offset 8 */
#define ENC_CMD_SIZE 24

/* ------------------------------------------------------------------ raw system calls */

static int xfer_all(void *p, size_t n, int send);
#define send_all(p, n) xfer_all((void *)(p), (n), 1)

static long raw_syscall(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long ret;

	__asm__ volatile("syscall" : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define rsys(n, ...) rsys_(n, ##__VA_ARGS__, 0, 0, 0, 0, 0, 0)
#define rsys_(n, a, b, c, d, e, f, ...) raw_syscall(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

/* A libc-style result: -1 and errno for a failure. */
static long ret_errno(long r)
{
	if (r < 0 && r > -4096) {
		errno = (int)-r;
		return -1;
	}
	return r;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof(buf), "gmem exec: ");

	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	rsys(SYS_write, 2, buf, n);
}

/* ------------------------------------------------------------------ the program's memory */

/*
 * Arguments are copied in and out as the kernel's copy_from_user/copy_to_user do: a bad
 * pointer is EFAULT for the program, never a crash.  process_vm_readv/writev on ourselves
 * does it in one call; where a seccomp filter forbids them, a pipe does it (the kernel
 * checks the address when it copies into or out of the pipe).  Called under `lock`.
 */
static int use_vm_rw = 1;
static int xpipe[2] = { -1, -1 };

static int hide_fd(int fd);

static int pipe_ready(void)
{
	int p[2];

	if (xpipe[0] >= 0)
		return 0;
	if (rsys(SYS_pipe2, p, O_CLOEXEC) < 0)
		return -1;
	xpipe[0] = hide_fd(p[0]);
	xpipe[1] = hide_fd(p[1]);
	return xpipe[0] >= 0 && xpipe[1] >= 0 ? 0 : -1;
}

static void pipe_drain(void)
{
	char buf[4096];

	while (rsys(SYS_read, xpipe[0], buf, sizeof(buf)) == sizeof(buf))
		;
}

static int copy_via_pipe(void *dst, const void *src, size_t n)
{
	while (n) {
		size_t k = n < 4096 ? n : 4096;	/* a pipe holds at least a page */
		long w, r;

		if (pipe_ready() < 0)
			return -1;
		w = rsys(SYS_write, xpipe[1], src, k);
		if (w != (long)k) {
			if (w > 0)
				pipe_drain();
			return -1;
		}
		r = rsys(SYS_read, xpipe[0], dst, k);
		if (r != (long)k) {
			pipe_drain();
			return -1;
		}
		dst = (char *)dst + k;
		src = (const char *)src + k;
		n -= k;
	}
	return 0;
}

/* n bytes between our buffer and the program's address remote, out = toward the program */
static int copy_user(void *local, uint64_t remote, size_t n, int out)
{
	if (!n)
		return 0;
	if (use_vm_rw) {
		struct iovec l = { local, n }, rm = { (void *)remote, n };
		long pid = rsys(SYS_getpid);
		long r = rsys(out ? SYS_process_vm_writev : SYS_process_vm_readv, pid, &l, 1, &rm, 1, 0);

		if (r == (long)n)
			return 0;
		if (r != -EPERM && r != -ENOSYS)
			return -1;
		use_vm_rw = 0;
	}
	return out ? copy_via_pipe((void *)remote, local, n) : copy_via_pipe(local, (const void *)remote, n);
}

#define copy_in(dst, src, n) copy_user((dst), (src), (n), 0)
#define copy_out(dst, src, n) copy_user((void *)(src), (dst), (n), 1)

/* ------------------------------------------------------------------ state */

enum fd_kind { K_NONE, K_KVM, K_VM, K_VCPU, K_GMEM, K_SEV };

struct fdent {
	uint8_t kind;
	uint8_t foreign;	/* inherited over fork: KVM objects belong to the parent's mm */
	uint32_t obj;		/* VM, vCPU or guest_memfd object of the model server */
};

struct realslot {
	uint32_t id;
	uint64_t gpa, size, hva;
};

struct vm {
	uint32_t id;
	int used;
	int type;
	int run_mode;
	int governed;		/* the model owns some of its memory: ask it about MMIO exits */
	int check_resume;	/* tell the model when a vCPU re-enters (OP_RESUME) */
	int fd;			/* a real VM fd of our own (hybrid), or -1 */
	int nfds;		/* the program's fds on it */
	struct realslot *slots;	/* the real memslots the model asked for (governed ones) */
	int nslots, capslots;
};

struct vcpu {
	uint32_t id;
	int used;
	struct vm *vm;
	int fd;			/* our own real vCPU fd (hybrid) or placeholder, or -1 */
	unsigned char *run;	/* our own mapping of its kvm_run */
	int nfds;
	/* an MMIO exit answered with KVM_EXIT_MEMORY_FAULT: resolved again before re-entry */
	int pending;
	uint64_t p_gpa, p_len, p_write;
	unsigned char p_data[8];
};

struct backing {
	uint64_t id;		/* the model's inode number */
	int used;
	int fd;			/* our own dup of the memfd */
	unsigned char *base;	/* mapped whole: the hva of real memslots, MMIO completion */
	uint64_t size;
	int flags;		/* GUEST_MEMFD_FLAG_* */
};

struct gfile {
	uint32_t id;
	int used;
	struct backing *b;
	int nfds;
};

struct gmap {			/* a program mapping of a guest_memfd */
	uint64_t start, end;
	uint64_t obj;		/* the model's Mapping */
	int used;
};

#define MAX_FDS 65536
static struct fdent fds[MAX_FDS];
static struct vm *vms;
static int nvms;
static struct vcpu *vcpus;
static int nvcpus;
static struct backing *backings;
static int nbackings;
static struct gfile *gfiles;
static int ngfiles;
static struct gmap *gmaps;
static int ngmaps;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int sock = -1;
static int hybrid;		/* this machine's /dev/kvm runs the guests */
static int amd;			/* the model is an AMD machine: it has /dev/sev */
static int no_fix_hypercall;	/* the host's KVM is PVM: see real_vm_quirks() */
static long run_size = 3 * 4096;	/* KVM_GET_VCPU_MMAP_SIZE */
static int sigbus_fd = -1;	/* a memfd of size 0: its mappings SIGBUS on every access */
static int initialized;
static int disabled;		/* not under gmem exec: pass everything through */

#define HIDDEN_FD_BASE 512	/* our own fds live above the numbers programs usually see */

static struct fdent *fdent(int fd)
{
	if (fd < 0 || fd >= MAX_FDS || fds[fd].kind == K_NONE)
		return NULL;
	return &fds[fd];
}

/* A close-on-exec copy of fd for our own use, above the numbers programs usually see (or
 * anywhere, under an RLIMIT_NOFILE below HIDDEN_FD_BASE). */
static int dup_hidden(int fd)
{
	long r = rsys(SYS_fcntl, fd, F_DUPFD_CLOEXEC, HIDDEN_FD_BASE);

	if (r < 0)
		r = rsys(SYS_fcntl, fd, F_DUPFD_CLOEXEC, 3);
	return r < 0 ? -1 : (int)r;
}

/* fd becomes one of ours (moved, as dup_hidden) */
static int hide_fd(int fd)
{
	int r = dup_hidden(fd);

	if (r < 0)
		return fd;
	rsys(SYS_close, fd);
	return r;
}

static void *grow(void *arr, int *cap, size_t elem)
{
	int n = *cap ? *cap * 2 : 16;
	void *p = realloc(arr, n * elem);

	if (!p)
		return NULL;
	memset((char *)p + *cap * elem, 0, (n - *cap) * elem);
	*cap = n;
	return p;
}

static int capvms, capvcpus, capbackings, capgfiles, capgmaps;

/* The live entry (.used) of arr[0 .. n) whose .id is key, or NULL. */
#define BY_ID(arr, n, key) ({							\
	__typeof__(&(arr)[0]) r_ = NULL;					\
	for (int i_ = 0; i_ < (n) && !r_; i_++)					\
		if ((arr)[i_].used && (arr)[i_].id == (key))			\
			r_ = &(arr)[i_];					\
	r_;									\
})

static struct vm *vm_by_id(uint32_t id) { return BY_ID(vms, nvms, id); }
static struct vcpu *vcpu_by_id(uint32_t id) { return BY_ID(vcpus, nvcpus, id); }
static struct gfile *gfile_by_id(uint32_t id) { return BY_ID(gfiles, ngfiles, id); }
static struct backing *backing_by_id(uint64_t id) { return BY_ID(backings, nbackings, id); }

#define NEW_ENTRY(arr, n, cap, type) ({						\
	type *e_ = NULL;							\
	for (int i_ = 0; i_ < (n); i_++)					\
		if (!(arr)[i_].used) { e_ = &(arr)[i_]; break; }		\
	if (!e_) {								\
		if ((n) == (cap)) {						\
			void *p_ = grow((arr), &(cap), sizeof(type));		\
			if (p_) (arr) = p_;					\
		}								\
		if ((n) < (cap))						\
			e_ = &(arr)[(n)++];					\
	}									\
	if (e_) { memset(e_, 0, sizeof(type)); e_->used = 1; }		\
	e_;									\
})

/* ------------------------------------------------------------------ the server */

static int connect_server(void)
{
	const char *path = getenv("GMEM_EXEC_SOCKET");
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	long s;

	if (!path || strlen(path) >= sizeof(addr.sun_path))
		return -1;
	strcpy(addr.sun_path, path);
	s = rsys(SYS_socket, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	if (rsys(SYS_connect, s, &addr, sizeof(addr)) < 0) {
		rsys(SYS_close, s);
		return -1;
	}
	sock = hide_fd((int)s);
	return sock;
}

/* The request in one message: the server wakes up once. */
static int send_req(const struct shim_req *req, const void *payload, size_t plen)
{
	struct iovec iov[2] = { { (void *)req, sizeof(*req) }, { (void *)payload, plen } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = plen ? 2 : 1 };
	size_t total = sizeof(*req) + plen;
	long r;

	do
		r = rsys(SYS_sendmsg, sock, &mh, MSG_NOSIGNAL);
	while (r == -EINTR);
	if (r < 0)
		return -1;
	if ((size_t)r == total)
		return 0;
	/* a short send (a full socket buffer): the rest as it goes */
	if ((size_t)r < sizeof(*req)) {
		if (send_all((const char *)req + r, sizeof(*req) - r))
			return -1;
		r = 0;
	} else {
		r -= sizeof(*req);
	}
	return send_all((const char *)payload + r, plen - r);
}

/* All n bytes to (send) or from the server, across short transfers and signals. */
static int xfer_all(void *p, size_t n, int send)
{
	while (n) {
		long r = send ? rsys(SYS_sendto, sock, p, n, MSG_NOSIGNAL, 0, 0)
			      : rsys(SYS_recvfrom, sock, p, n, MSG_WAITALL, 0, 0);

		if (r == -EINTR)
			continue;
		if (r <= 0)
			return -1;
		p = (char *)p + r;
		n -= r;
	}
	return 0;
}

#define recv_all(p, n) xfer_all((p), (n), 0)

/* The reply header, with the descriptors that came with it. */
static int recv_head(struct shim_rep *rep, int *rfd)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { rep, sizeof(*rep) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	long r;

	*rfd = -1;
	do
		r = rsys(SYS_recvmsg, sock, &mh, MSG_WAITALL);
	while (r == -EINTR);
	if (r <= 0)
		return -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			memcpy(rfd, CMSG_DATA(c), sizeof(int));
	if ((size_t)r < sizeof(*rep))
		return recv_all((char *)rep + r, sizeof(*rep) - r);
	return 0;
}

static void apply_actions(const struct shim_act *act, uint32_t n);
struct vm;
static void audit(struct vm *vm);

/*
 * One request and its reply, under `lock`.  out (out_cap bytes) receives the reply's
 * payload; the actions are applied before this returns.  The server's failure is the
 * program's EIO: the model is gone.
 */
static long call(uint32_t op, const uint64_t a[6], const void *payload, size_t plen,
		 void *out, size_t out_cap, struct shim_rep *rep_out, int *rfd)
{
	struct shim_req req = { .len = sizeof(req) + plen, .op = op };
	struct shim_rep rep;
	struct shim_act *acts = NULL;
	int fd = -1;

	if (rep_out)
		memset(rep_out, 0, sizeof(*rep_out));
	if (rfd)
		*rfd = -1;
	if (sock < 0)
		return -EIO;
	memcpy(req.a, a, sizeof(req.a));
	if (send_req(&req, payload, plen))
		goto dead;
	if (recv_head(&rep, &fd))
		goto dead;
	if (rep.out_len) {
		char *tmp = malloc(rep.out_len);

		if (!tmp || recv_all(tmp, rep.out_len)) {
			free(tmp);
			goto dead;
		}
		if (out)
			memcpy(out, tmp, rep.out_len < out_cap ? rep.out_len : out_cap);
		free(tmp);
	}
	if (rep.nr_actions) {
		acts = malloc(rep.nr_actions * sizeof(*acts));
		if (!acts || recv_all(acts, rep.nr_actions * sizeof(*acts))) {
			free(acts);
			goto dead;
		}
		apply_actions(acts, rep.nr_actions);
		free(acts);
	}
	if (rfd)
		*rfd = fd;
	else if (fd >= 0)
		rsys(SYS_close, fd);
	if (rep_out)
		*rep_out = rep;
	return rep.ret;
dead:
	say("the model server is gone: KVM and guest_memfd calls fail with EIO from now on");
	rsys(SYS_close, sock);
	sock = -1;
	if (fd >= 0)
		rsys(SYS_close, fd);
	return -EIO;
}

#define A(...) ((const uint64_t[6]){ __VA_ARGS__ })

/* ------------------------------------------------------------------ real memslots */

struct kvm_umr {		/* struct kvm_userspace_memory_region */
	uint32_t slot, flags;
	uint64_t gpa, size, hva;
};

#define KVM_SET_USER_MEMORY_REGION_V1 IOC(1, 0x46, 32)

static void real_slot(struct vm *vm, uint32_t id, uint32_t flags, uint64_t gpa, uint64_t size,
		      uint64_t hva)
{
	struct kvm_umr r = { id, flags, gpa, size, hva };
	long ret;

	if (vm->fd < 0)
		return;
	ret = rsys(SYS_ioctl, vm->fd, KVM_SET_USER_MEMORY_REGION_V1, &r);
	if (ret < 0)
		say("the host's KVM refused memslot %u (gpa %#lx size %#lx hva %#lx flags %#x): errno %ld;"
		    " guest accesses there will not match the model", id, (unsigned long)gpa,
		    (unsigned long)size, (unsigned long)hva, flags, -ret);
}

static void vm_forget_slot(struct vm *vm, uint32_t id)
{
	for (int i = 0; i < vm->nslots; i++)
		if (vm->slots[i].id == id) {
			vm->slots[i] = vm->slots[--vm->nslots];
			return;
		}
}

static void vm_drop(struct vm *vm)
{
	if (vm->fd >= 0)
		rsys(SYS_close, vm->fd);
	free(vm->slots);
	vm->used = 0;
}

static void apply_actions(const struct shim_act *act, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++, act++) {
		struct vm *vm = vm_by_id(act->vm);
		struct backing *b;

		switch (act->type) {
		case ACT_SLOT_SET: {
			uint64_t hva = act->e;

			if (!vm)
				break;
			if (act->backing) {
				b = backing_by_id(act->backing);
				if (!b)
					break;
				hva = (uint64_t)b->base + act->e;
			}
			vm_forget_slot(vm, act->a);
			if (act->d) {
				if (vm->nslots == vm->capslots) {
					void *p = grow(vm->slots, &vm->capslots, sizeof(*vm->slots));

					if (!p)
						break;
					vm->slots = p;
				}
				vm->slots[vm->nslots++] = (struct realslot){ act->a, act->c, act->d, hva };
			}
			real_slot(vm, act->a, act->b, act->c, act->d, hva);
			break;
		}
		case ACT_SLOT_DEL:
			if (!vm)
				break;
			vm_forget_slot(vm, act->a);
			real_slot(vm, act->a, 0, 0, 0, 0);
			break;
		case ACT_BACKING_DEL:
			b = backing_by_id(act->backing);
			if (b) {
				rsys(SYS_munmap, b->base, b->size);
				rsys(SYS_close, b->fd);
				b->fd = -1;
				b->used = 0;
			}
			break;
		case ACT_VM_GONE:
			if (vm)
				vm_drop(vm);
			break;
		case ACT_VM_GOVERNED:
			if (vm)
				vm->governed = 1;
			break;
		case ACT_VM_CHECK_RESUME:
			if (vm)
				vm->check_resume = 1;
			break;
		}
	}
}

/* At exit: the VMs the program never closed are measured as at their close (audit()). */
__attribute__((destructor)) static void at_exit(void)
{
	if (disabled || !initialized)
		return;
	pthread_mutex_lock(&lock);
	for (int i = 0; i < nvms; i++)
		if (vms[i].used && vms[i].nfds > 0)
			audit(&vms[i]);
	pthread_mutex_unlock(&lock);
}

/* ------------------------------------------------------------------ init, fork */

static void atfork_prepare(void)
{
	pthread_mutex_lock(&lock);
}

static void atfork_parent(void)
{
	pthread_mutex_unlock(&lock);
}

/*
 * The child shares the parent's open files but not its mm: like the kernel (kvm->mm !=
 * current->mm), its VM and vCPU fds answer EIO; guest_memfd fds stay usable, through a
 * connection of its own.
 */
static void atfork_child(void)
{
	for (int i = 0; i < MAX_FDS; i++)
		if (fds[i].kind == K_VM || fds[i].kind == K_VCPU || fds[i].kind == K_KVM)
			fds[i].foreign = 1;
	if (sock >= 0) {
		rsys(SYS_close, sock);
		sock = -1;
		connect_server();
		if (sock >= 0) {
			struct shim_rep rep;

			call(OP_HELLO, A((uint64_t)getpid(), SHIM_PROTO_VERSION), NULL, 0, NULL, 0, &rep, NULL);
		}
	}
	pthread_mutex_unlock(&lock);
}

/* Under lock.  0, or -1 when this process is not under gmem exec. */
static int init_locked(void)
{
	const char *h;

	if (initialized)
		return disabled ? -1 : 0;
	initialized = 1;
	if (!getenv("GMEM_EXEC_SOCKET")) {
		disabled = 1;
		return -1;
	}
	h = getenv("GMEM_EXEC_HYBRID");
	hybrid = h && h[0] == '1';
	h = getenv("GMEM_EXEC_PLATFORM");
	amd = h && !strcmp(h, "amd");
	h = getenv("GMEM_EXEC_PVM");
	no_fix_hypercall = h && h[0] == '1';
	if (hybrid) {
		long kfd = rsys(SYS_openat, AT_FDCWD, "/dev/kvm", O_RDWR | O_CLOEXEC, 0);
		long sz = kfd >= 0 ? rsys(SYS_ioctl, kfd, KVM_GET_VCPU_MMAP_SIZE, 0) : -1;

		if (sz > 0)
			run_size = sz;
		else
			hybrid = 0;
		if (kfd >= 0)
			rsys(SYS_close, kfd);
	}
	if (connect_server() < 0) {
		say("cannot reach the model server (GMEM_EXEC_SOCKET): /dev/kvm fails with EIO");
		return 0;
	}
	if (call(OP_HELLO, A((uint64_t)getpid(), SHIM_PROTO_VERSION), NULL, 0, NULL, 0, NULL, NULL) < 0)
		say("the model server refused this library (protocol %d)", SHIM_PROTO_VERSION);
	sigbus_fd = (int)rsys(SYS_memfd_create, "gmem-sigbus", MFD_CLOEXEC);
	if (sigbus_fd >= 0)
		sigbus_fd = hide_fd(sigbus_fd);
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
	return 0;
}

/* ------------------------------------------------------------------ /dev/kvm */

static int init_locked(void);

/*
 * open() of /dev/kvm (and of /dev/sev where the model is an AMD machine): a real /dev/kvm fd
 * in hybrid mode, else a placeholder memfd, registered as the model's.  /dev/sev: the SEV
 * launch commands take its fd (sev_fd) and the kernel checks that it is one
 * (sev_issue_cmd_external_user: EBADF otherwise); the PSP's own ioctls on it are not
 * modelled (ENOTTY).
 */
static long open_device(const char *path, int flags, int kind)
{
	long fd;

	pthread_mutex_lock(&lock);
	if (init_locked() < 0 || (kind == K_SEV && !amd)) {
		pthread_mutex_unlock(&lock);
		return rsys(SYS_openat, AT_FDCWD, path, flags, 0);
	}
	if (hybrid && kind == K_KVM)
		fd = rsys(SYS_openat, AT_FDCWD, path, flags, 0);
	else
		fd = rsys(SYS_memfd_create, path + 5, (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
	if (fd >= 0 && fd < MAX_FDS)
		fds[fd] = (struct fdent){ .kind = (uint8_t)kind };
	pthread_mutex_unlock(&lock);
	return fd;
}

static long do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	if (path && (dirfd == AT_FDCWD || path[0] == '/') && !disabled) {
		if (!strcmp(path, "/dev/kvm"))
			return open_device(path, flags, K_KVM);
		if (!strcmp(path, "/dev/sev"))
			return open_device(path, flags, K_SEV);
	}
	return rsys(SYS_openat, dirfd, path, flags, mode);
}

/* open's optional mode argument, there only with O_CREAT or O_TMPFILE */
#define OPEN_MODE(flags, last) ({						\
	mode_t m_ = 0;								\
	if (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE) {	\
		va_list ap_;							\
		va_start(ap_, last);						\
		m_ = va_arg(ap_, mode_t);					\
		va_end(ap_);							\
	}									\
	m_;									\
})

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
	return (int)ret_errno(do_openat(dirfd, path, flags, OPEN_MODE(flags, flags)));
}

EXPORT int open(const char *path, int flags, ...)
{
	return (int)ret_errno(do_openat(AT_FDCWD, path, flags, OPEN_MODE(flags, flags)));
}

EXPORT int open64(const char *path, int flags, ...) __attribute__((alias("open")));
EXPORT int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

EXPORT int __open_2(const char *path, int flags)
{
	return (int)ret_errno(do_openat(AT_FDCWD, path, flags, 0));
}

EXPORT int __open64_2(const char *path, int flags) __attribute__((alias("__open_2")));

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
	return (int)ret_errno(do_openat(dirfd, path, flags, 0));
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags) __attribute__((alias("__openat_2")));

/* ------------------------------------------------------------------ fd lifetime */

/*
 * Before a VM's last fd closes: how much of the program's shared memory still backs gfns that
 * are private (the model asks; mincore answers).  Memory a VMM discarded at the private
 * conversion and did not touch since is not resident; a stale DMA mapping writing there, or
 * a VMM that never discards, shows.
 */
static void audit(struct vm *vm)
{
	uint64_t ranges[2 * 256], done[2 * 256];
	struct shim_rep rep;
	unsigned char vec[4096];
	int n;

	if (!vm->governed || call(OP_AUDIT, A(vm->id), NULL, 0, ranges, sizeof(ranges), &rep, NULL) < 0)
		return;
	n = (int)(rep.out_len < sizeof(ranges) ? rep.out_len : sizeof(ranges)) / 16;
	for (int i = 0; i < n; i++) {
		uint64_t hva = ranges[2 * i], pages = ranges[2 * i + 1], resident = 0;

		for (uint64_t off = 0; off < pages; off += sizeof(vec)) {
			uint64_t k = pages - off < sizeof(vec) ? pages - off : sizeof(vec);

			if (rsys(SYS_mincore, hva + (off << 12), k << 12, vec) < 0)
				continue;	/* not mapped: nothing resident */
			for (uint64_t j = 0; j < k; j++)
				resident += vec[j] & 1;
		}
		done[2 * i] = hva;
		done[2 * i + 1] = resident;
	}
	if (n)
		call(OP_AUDIT_DONE, A(vm->id), done, n * 16, NULL, 0, &rep, NULL);
}

static void put_object(struct fdent e)
{
	struct vm *vm;
	struct vcpu *vc;
	struct gfile *gf;

	switch (e.kind) {
	case K_VM:
		vm = vm_by_id(e.obj);
		if (vm && --vm->nfds == 0 && !e.foreign) {
			audit(vm);
			call(OP_CLOSE, A(e.obj), NULL, 0, NULL, 0, NULL, NULL);
		}
		break;
	case K_VCPU:
		vc = vcpu_by_id(e.obj);
		if (vc)
			vc->nfds--;
		break;
	case K_GMEM:
		gf = gfile_by_id(e.obj);
		if (gf && --gf->nfds == 0) {
			call(OP_CLOSE, A(e.obj), NULL, 0, NULL, 0, NULL, NULL);
			gf->used = 0;
		}
		break;
	}
}

static void get_object(struct fdent e)
{
	struct vm *vm;
	struct vcpu *vc;
	struct gfile *gf;

	switch (e.kind) {
	case K_VM:
		if ((vm = vm_by_id(e.obj)))
			vm->nfds++;
		break;
	case K_VCPU:
		if ((vc = vcpu_by_id(e.obj)))
			vc->nfds++;
		break;
	case K_GMEM:
		if ((gf = gfile_by_id(e.obj)))
			gf->nfds++;
		break;
	}
}

/* Under lock: fd is being closed (or replaced by dup2). */
static void forget_fd(int fd)
{
	struct fdent *e = fdent(fd);
	struct fdent old;

	if (!e)
		return;
	old = *e;
	e->kind = K_NONE;
	put_object(old);
}

static int is_hidden(int fd)
{
	if (fd == sock || fd == sigbus_fd || fd == xpipe[0] || fd == xpipe[1])
		return 1;
	for (int i = 0; i < nvms; i++)
		if (vms[i].used && vms[i].fd == fd)
			return 1;
	for (int i = 0; i < nvcpus; i++)
		if (vcpus[i].used && vcpus[i].fd == fd)
			return 1;
	for (int i = 0; i < nbackings; i++)
		if (backings[i].used && backings[i].fd == fd)
			return 1;
	return 0;
}

EXPORT int close(int fd)
{
	long r;

	if (fd >= HIDDEN_FD_BASE && !disabled) {
		pthread_mutex_lock(&lock);
		if (is_hidden(fd)) {
			/* one of ours: the program never had it; as if it were not open */
			pthread_mutex_unlock(&lock);
			errno = EBADF;
			return -1;
		}
		pthread_mutex_unlock(&lock);
	}
	if (!fdent(fd))
		return (int)ret_errno(rsys(SYS_close, fd));
	pthread_mutex_lock(&lock);
	r = rsys(SYS_close, fd);
	if (r == 0 || r == -EINTR)	/* Linux closes the fd even when close() says EINTR */
		forget_fd(fd);
	pthread_mutex_unlock(&lock);
	return (int)ret_errno(r);
}

/* Move one of our fds away from newfd before the program dup2()s over it. */
static void evict_hidden(int fd)
{
	long n;

	if (fd < HIDDEN_FD_BASE || !is_hidden(fd))
		return;
	n = dup_hidden(fd);
	if (n < 0)
		return;
	if (fd == sock)
		sock = (int)n;
	else if (fd == sigbus_fd)
		sigbus_fd = (int)n;
	else if (fd == xpipe[0] || fd == xpipe[1])
		xpipe[fd == xpipe[1]] = (int)n;
	for (int i = 0; i < nvms; i++)
		if (vms[i].used && vms[i].fd == fd)
			vms[i].fd = (int)n;
	for (int i = 0; i < nvcpus; i++)
		if (vcpus[i].used && vcpus[i].fd == fd)
			vcpus[i].fd = (int)n;
	for (int i = 0; i < nbackings; i++)
		if (backings[i].used && backings[i].fd == fd)
			backings[i].fd = (int)n;
	rsys(SYS_close, fd);
}

/* A tracked fd was duplicated into newfd (>= 0): the new fd names the same object. */
static void dup_tracked(int oldfd, int newfd)
{
	struct fdent *e = fdent(oldfd);

	if (!e || newfd < 0 || newfd >= MAX_FDS)
		return;
	fds[newfd] = *e;	/* one struct file, one more fd: the model is told at the last close */
	get_object(*e);
}

static long do_dup3(int oldfd, int newfd, int flags, int nr)
{
	long r;

	if (disabled || (!fdent(oldfd) && !fdent(newfd) && newfd < HIDDEN_FD_BASE))
		return nr == SYS_dup2 ? rsys(SYS_dup2, oldfd, newfd) : rsys(SYS_dup3, oldfd, newfd, flags);
	pthread_mutex_lock(&lock);
	evict_hidden(newfd);
	r = nr == SYS_dup2 ? rsys(SYS_dup2, oldfd, newfd) : rsys(SYS_dup3, oldfd, newfd, flags);
	if (r >= 0 && oldfd != newfd) {
		forget_fd(newfd);
		dup_tracked(oldfd, newfd);
	}
	pthread_mutex_unlock(&lock);
	return r;
}

EXPORT int dup(int fd)
{
	long r;

	if (!fdent(fd))
		return (int)ret_errno(rsys(SYS_dup, fd));
	pthread_mutex_lock(&lock);
	r = rsys(SYS_dup, fd);
	if (r >= 0)
		dup_tracked(fd, (int)r);
	pthread_mutex_unlock(&lock);
	return (int)ret_errno(r);
}

EXPORT int dup2(int oldfd, int newfd)
{
	return (int)ret_errno(do_dup3(oldfd, newfd, 0, SYS_dup2));
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
	return (int)ret_errno(do_dup3(oldfd, newfd, flags, SYS_dup3));
}

static long do_fcntl(int fd, int cmd, long arg)
{
	long r;

	if ((cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC) || !fdent(fd))
		return rsys(SYS_fcntl, fd, cmd, arg);
	pthread_mutex_lock(&lock);
	r = rsys(SYS_fcntl, fd, cmd, arg);
	if (r >= 0)
		dup_tracked(fd, (int)r);
	pthread_mutex_unlock(&lock);
	return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	long arg;

	va_start(ap, cmd);
	arg = va_arg(ap, long);
	va_end(ap);
	return (int)ret_errno(do_fcntl(fd, cmd, arg));
}

EXPORT int fcntl64(int fd, int cmd, ...) __attribute__((alias("fcntl")));

/* ------------------------------------------------------------------ ioctls */

static int fd_state(int fd, uint64_t *obj)
{
	struct fdent *e = fdent(fd);

	if (e && e->kind == K_GMEM) {
		*obj = e->obj;
		return FD_GMEM;
	}
	return rsys(SYS_fcntl, fd, F_GETFD) < 0 ? FD_NOT_OPEN : FD_OTHER;
}

/* Copy the ioctl's argument in, ask the model, copy the answer out: the kernel's
 * copy_from_user / copy_to_user, EFAULT for a bad pointer included. */
static long model_ioctl(uint32_t op, uint32_t obj, unsigned long cmd, unsigned long arg,
			uint64_t a3, uint64_t a4, struct shim_rep *rep, int *rfd)
{
	size_t size = IOC_SIZE(cmd);
	unsigned char buf[256] = { 0 };
	long r;

	if (size > sizeof(buf))
		return -EINVAL;
	if ((IOC_DIR(cmd) & IOC_WRITE) && size && copy_in(buf, arg, size))
		return -EFAULT;
	r = call(op, A(obj, cmd, arg, a3, a4), buf, (IOC_DIR(cmd) & IOC_WRITE) ? size : 0,
		 buf, sizeof(buf), rep, rfd);
	if ((IOC_DIR(cmd) & IOC_READ) && size && rep->out_len &&
	    copy_out(arg, buf, rep->out_len < size ? rep->out_len : size))
		return -EFAULT;
	return r;
}

/*
 * On a PVM host (kvm_pvm) guests make hypercalls with SYSCALL; with
 * KVM_X86_QUIRK_FIX_HYPERCALL_INSN on, PVM rewrites a VMCALL/VMMCALL into "ud2; int3"
 * (pvm_patch_hypercall, whose comment says the quirk should not be enabled for PVM
 * guests) and the vCPU never comes back.  With the quirk off the guest takes #UD, which a
 * test reports and a VMM sees.
 */
#define KVM_CAP_DISABLE_QUIRKS2 213
#define KVM_X86_QUIRK_FIX_HYPERCALL_INSN (1 << 5)

static void real_vm_quirks(int vmfd)
{
	struct { uint32_t cap, flags; uint64_t args[4]; uint8_t pad[64]; } c = {
		.cap = KVM_CAP_DISABLE_QUIRKS2, .args = { KVM_X86_QUIRK_FIX_HYPERCALL_INSN } };

	if (no_fix_hypercall)
		rsys(SYS_ioctl, vmfd, KVM_ENABLE_CAP, &c);
}

/*
 * KVM_CHECK_EXTENSION answers depend on the capability and the VM's type only, and programs
 * ask them over and over (kvm_util asks before most calls): the model is asked once per (VM,
 * capability).  Under lock.
 */
#define CAP_CACHE 512
static struct { uint32_t vm, used; uint64_t cap; long val; int pass; } caps[CAP_CACHE];

static long check_extension(int fd, uint32_t op, uint32_t vm, unsigned long cap)
{
	unsigned h = (unsigned)((cap * 31 + vm) % CAP_CACHE);
	struct shim_rep rep;
	long r;

	for (unsigned i = 0; i < CAP_CACHE && caps[h].used; i++, h = (h + 1) % CAP_CACHE)
		if (caps[h].vm == vm && caps[h].cap == cap)
			goto found;
	r = call(op, A(vm, KVM_CHECK_EXTENSION, cap), NULL, 0, NULL, 0, &rep, NULL);
	if (r < 0)
		return r;			/* the server is gone, or the VM: not an answer to keep */
	if (caps[h].used)
		return (rep.v[3] & SHIM_PASS) ? (hybrid ? rsys(SYS_ioctl, fd, KVM_CHECK_EXTENSION, cap) : 0) : r;
	caps[h].used = 1;
	caps[h].vm = vm;
	caps[h].cap = cap;
	caps[h].val = r;
	caps[h].pass = (rep.v[3] & SHIM_PASS) != 0;
found:
	if (caps[h].pass)
		return hybrid ? rsys(SYS_ioctl, fd, KVM_CHECK_EXTENSION, cap) : 0;
	return caps[h].val;
}

static long sys_ioctl(int fd, unsigned long cmd, unsigned long arg)
{
	struct shim_rep rep;
	long r, rfd;
	struct vm *vm;

	if (!hybrid) {
		if (cmd == KVM_GET_API_VERSION)
			return 12;
		if (cmd == KVM_GET_VCPU_MMAP_SIZE)
			return run_size;
	}
	if (cmd == KVM_CHECK_EXTENSION)
		return check_extension(fd, OP_SYS_IOCTL, 0, arg);
	if (cmd != KVM_CREATE_VM)
		/* without the host's KVM the placeholder answers ENOTTY; kvm_arch_dev_ioctl's is EINVAL */
		return hybrid ? rsys(SYS_ioctl, fd, cmd, arg) : -EINVAL;
	r = call(OP_SYS_IOCTL, A(0, cmd, arg), NULL, 0, NULL, 0, &rep, NULL);
	if (r < 0)
		return r;
	/* the real VM is always a plain one: the model is the VM type */
	rfd = hybrid ? rsys(SYS_ioctl, fd, KVM_CREATE_VM, 0)
		     : rsys(SYS_memfd_create, "gmem-vm", MFD_CLOEXEC);
	if (rfd < 0 || rfd >= MAX_FDS) {
		call(OP_CLOSE, A((uint64_t)r), NULL, 0, NULL, 0, NULL, NULL);
		return rfd < 0 ? rfd : -EMFILE;
	}
	if (hybrid)
		real_vm_quirks((int)rfd);
	vm = NEW_ENTRY(vms, nvms, capvms, struct vm);
	if (!vm) {
		rsys(SYS_close, rfd);
		call(OP_CLOSE, A((uint64_t)r), NULL, 0, NULL, 0, NULL, NULL);
		return -ENOMEM;
	}
	vm->id = (uint32_t)r;
	vm->type = (int)arg;
	vm->run_mode = (int)rep.v[0];
	vm->governed = (int)rep.v[1];
	vm->nfds = 1;
	vm->fd = hybrid ? dup_hidden((int)rfd) : -1;
	fds[rfd] = (struct fdent){ .kind = K_VM, .obj = vm->id };
	return rfd;
}

static long create_vcpu(int fd, struct vm *vm, struct fdent *e, unsigned long arg)
{
	struct shim_rep rep;
	struct vcpu *vc;
	long r, vfd;
	void *run;

	r = call(OP_VM_IOCTL, A(e->obj, KVM_CREATE_VCPU, arg), NULL, 0, NULL, 0, &rep, NULL);
	if (r < 0)
		return r;
	if (hybrid && vm->fd >= 0) {
		vfd = rsys(SYS_ioctl, fd, KVM_CREATE_VCPU, arg);
		if (vfd < 0) {
			say("the host's KVM refused vCPU %lu (errno %ld) after the model created it", arg, -vfd);
			return vfd;
		}
	} else {
		vfd = rsys(SYS_memfd_create, "gmem-vcpu", MFD_CLOEXEC);
		if (vfd >= 0)
			rsys(SYS_ftruncate, vfd, run_size);
	}
	if (vfd < 0 || vfd >= MAX_FDS)
		return vfd < 0 ? vfd : -EMFILE;
	vc = NEW_ENTRY(vcpus, nvcpus, capvcpus, struct vcpu);
	if (!vc)
		return -ENOMEM;
	vc->id = (uint32_t)r;
	vc->vm = vm;
	vc->nfds = 1;
	vc->fd = dup_hidden((int)vfd);
	run = (void *)rsys(SYS_mmap, 0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vc->fd, 0);
	vc->run = (long)run < 0 && (long)run > -4096 ? NULL : run;
	fds[vfd] = (struct fdent){ .kind = K_VCPU, .obj = vc->id };
	return vfd;
}

static void add_gfile(int gfd, uint32_t obj, uint64_t ino, uint64_t size, int flags)
{
	struct backing *b = backing_by_id(ino);
	struct gfile *gf;

	if (!b) {
		b = NEW_ENTRY(backings, nbackings, capbackings, struct backing);
		if (!b)
			return;
		b->id = ino;
		b->size = size;
		b->flags = flags;
		b->fd = dup_hidden(gfd);
		b->base = (void *)rsys(SYS_mmap, 0, size, PROT_READ | PROT_WRITE,
				       MAP_SHARED | MAP_NORESERVE, b->fd, 0);
	}
	gf = NEW_ENTRY(gfiles, ngfiles, capgfiles, struct gfile);
	if (!gf)
		return;
	gf->id = obj;
	gf->b = b;
	gf->nfds = 1;
	fds[gfd] = (struct fdent){ .kind = K_GMEM, .obj = obj };
}

/* KVM_MEMORY_ENCRYPT_OP: the command, its own struct and, for the commands that copy guest
 * pages in (SNP_LAUNCH_UPDATE, TDX_INIT_MEM_REGION), the source pages -- which the model
 * reads as the VMM's memory. */
static long encrypt_op(uint32_t op, uint32_t obj, int vm_type, unsigned long arg)
{
	unsigned char cmd[ENC_CMD_SIZE], data[512];
	uint32_t id, sev_fd;
	int sev_ok;
	uint64_t ptr, dsize = 0, src = 0, srclen = 0;
	unsigned char *payload;
	size_t plen;
	struct shim_rep rep;
	unsigned char out[ENC_CMD_SIZE + sizeof(data)];
	long r;
	int tdx = vm_type == KVM_X86_TDX_VM;

	if (!arg || copy_in(cmd, arg, sizeof(cmd)))
		return -EFAULT;
	memcpy(&id, cmd, 4);
	memcpy(&ptr, cmd + 8, 8);
	/* the size of each command's struct (arch/x86/include/uapi/asm/kvm.h, 6.18) */
	if (!tdx) {
		switch (id) {
		case 22: dsize = 48; break;	/* KVM_SEV_INIT2: struct kvm_sev_init */
		case 100: dsize = 64; break;	/* SNP_LAUNCH_START */
		case 101: dsize = 64; break;	/* SNP_LAUNCH_UPDATE */
		case 102: dsize = 88; break;	/* SNP_LAUNCH_FINISH */
		}
	} else {
		switch (id) {
		case 3: dsize = 24; break;	/* KVM_TDX_INIT_MEM_REGION: source_addr, gpa, nr_pages */
		case 1: dsize = 0; break;	/* KVM_TDX_INIT_VM: the model needs none of it */
		}
	}
	if (ptr && dsize && copy_in(data, ptr, dsize))
		return -EFAULT;
	if (!tdx && id == 101 && dsize) {
		memcpy(&src, data + 8, 8);
		memcpy(&srclen, data + 16, 8);
	} else if (tdx && id == 3 && dsize) {
		memcpy(&src, data, 8);
		memcpy(&srclen, data + 16, 8);
		srclen *= 4096;
	}
	if (srclen > (64ul << 20))
		srclen = 64ul << 20;		/* the model is told the rest is unreadable */
	plen = sizeof(cmd) + dsize + (src ? srclen : 0);
	payload = malloc(plen);
	if (!payload)
		return -ENOMEM;
	memcpy(payload, cmd, sizeof(cmd));
	memcpy(payload + sizeof(cmd), data, dsize);
	if (src && srclen && copy_in(payload + sizeof(cmd) + dsize, src, srclen))
		plen = sizeof(cmd) + dsize;	/* no source bytes: the model answers EFAULT */
	memcpy(&sev_fd, cmd + 20, 4);		/* struct kvm_sev_cmd .sev_fd */
	sev_ok = !tdx && fdent((int)sev_fd) && fdent((int)sev_fd)->kind == K_SEV;
	r = call(op, A(obj, KVM_MEMORY_ENCRYPT_OP, arg, dsize, src ? srclen : 0, sev_ok), payload, plen,
		 out, sizeof(out), &rep, NULL);
	free(payload);
	if (rep.out_len >= sizeof(cmd)) {
		copy_out(arg, out, sizeof(cmd));
		if (ptr && dsize && rep.out_len >= sizeof(cmd) + dsize)
			copy_out(ptr, out + sizeof(cmd), dsize);
	}
	return r;
}

static long vm_ioctl(int fd, struct fdent *e, unsigned long cmd, unsigned long arg)
{
	struct vm *vm = vm_by_id(e->obj);
	struct shim_rep rep;
	int rfd = -1;
	long r;

	if (e->foreign)
		return -EIO;		/* kvm_vm_ioctl: kvm->mm != current->mm */
	if (!vm)
		return -EIO;
	switch (cmd) {
	case KVM_CREATE_VCPU:
		return create_vcpu(fd, vm, e, arg);
	case KVM_CHECK_EXTENSION:
		return check_extension(fd, OP_VM_IOCTL, e->obj, arg);
	case KVM_SET_USER_MEMORY_REGION:
	case KVM_SET_MEMORY_ATTRIBUTES:
		return model_ioctl(OP_VM_IOCTL, e->obj, cmd, arg, 0, 0, &rep, NULL);
	case KVM_SET_USER_MEMORY_REGION2: {
		uint32_t gfd;
		uint64_t obj = 0;
		int st;

		if (copy_in(&gfd, arg + 40, 4))		/* .guest_memfd */
			return -EFAULT;
		st = fd_state((int)gfd, &obj);
		return model_ioctl(OP_VM_IOCTL, e->obj, cmd, arg, st, obj, &rep, NULL);
	}
	case KVM_CREATE_GUEST_MEMFD: {
		uint64_t size = 0, flags = 0;

		r = model_ioctl(OP_VM_IOCTL, e->obj, cmd, arg, 0, 0, &rep, &rfd);
		if (r < 0 || rfd < 0) {
			if (rfd >= 0)
				rsys(SYS_close, rfd);
			return r < 0 ? r : -EIO;
		}
		copy_in(&size, arg, 8);
		copy_in(&flags, arg + 8, 8);
		if (rfd >= MAX_FDS) {
			rsys(SYS_close, rfd);
			return -EMFILE;
		}
		add_gfile(rfd, (uint32_t)rep.v[0], rep.v[1], size, (int)flags);
		return rfd;
	}
	case KVM_ENABLE_CAP: {
		uint32_t cap = 0;

		if (copy_in(&cap, arg, 4))
			return -EFAULT;
		if (cap != KVM_CAP_EXIT_HYPERCALL)
			return rsys(SYS_ioctl, fd, cmd, arg);
		r = model_ioctl(OP_VM_IOCTL, e->obj, cmd, arg, 0, 0, &rep, NULL);
		/* the host's KVM exits on the guest's hypercalls the same way (hybrid) */
		if (r == 0 && hybrid && vm->fd >= 0)
			rsys(SYS_ioctl, vm->fd, cmd, arg);
		return r;
	}
	case KVM_MEMORY_ENCRYPT_OP:
		return encrypt_op(OP_VM_IOCTL, e->obj, vm->type, arg);
	}
	return rsys(SYS_ioctl, fd, cmd, arg);	/* placeholder (no hybrid): kvm_arch_vm_ioctl's ENOTTY */
}

/* ------------------------------------------------------------------ KVM_RUN */

/* Complete an MMIO access on memory the model just mapped: through the real memslot's
 * host address, as the real KVM would have had the slot been there. */
static int complete_access(struct vm *vm, uint64_t gpa, unsigned char *data, uint64_t len, int write)
{
	for (int i = 0; i < vm->nslots; i++) {
		struct realslot *s = &vm->slots[i];

		if (gpa >= s->gpa && gpa + len <= s->gpa + s->size)
			return write ? copy_out(s->hva + gpa - s->gpa, data, len)
				     : copy_in(data, s->hva + gpa - s->gpa, len);
	}
	return -1;
}

/* Under lock.  Returns FAULT_* or -errno; memory-fault fields go into the vCPU's kvm_run. */
static long resolve_mmio(struct vcpu *vc)
{
	unsigned char *run = vc->run;
	struct shim_rep rep;
	long r;

	r = call(OP_FAULT, A(vc->id, vc->p_gpa, vc->p_write, vc->p_len), NULL, 0, NULL, 0, &rep, NULL);
	if (r == FAULT_RESUME) {
		if (complete_access(vc->vm, vc->p_gpa, vc->p_data, vc->p_len, (int)vc->p_write) < 0)
			return -EFAULT;		/* the host address is gone: hva_to_pfn's EFAULT */
		if (!vc->p_write)
			memcpy(run + RUN_MMIO_DATA, vc->p_data, 8);
		vc->pending = 0;
		return FAULT_RESUME;
	}
	if (r == FAULT_MEMORY_FAULT) {
		uint32_t reason = KVM_EXIT_MEMORY_FAULT;

		memcpy(run + RUN_EXIT_REASON, &reason, 4);
		memcpy(run + RUN_MMIO_PHYS_ADDR, &rep.v[0], 8);		/* memory_fault.flags */
		memcpy(run + RUN_MMIO_DATA, &rep.v[1], 8);		/* .gpa */
		memcpy(run + RUN_MMIO_LEN, &rep.v[2], 8);		/* .size */
		vc->pending = 1;
		return FAULT_MEMORY_FAULT;
	}
	if (r == FAULT_PASS) {
		/* an MMIO access after all (the model has no memslot there) */
		uint32_t reason = KVM_EXIT_MMIO;

		memcpy(run + RUN_EXIT_REASON, &reason, 4);
		memcpy(run + RUN_MMIO_PHYS_ADDR, &vc->p_gpa, 8);
		memcpy(run + RUN_MMIO_DATA, vc->p_data, 8);
		memcpy(run + RUN_MMIO_LEN, &vc->p_len, 4);
		run[RUN_MMIO_IS_WRITE] = (unsigned char)vc->p_write;
		vc->pending = 0;
	}
	return r;
}

static long run_model(struct vcpu *vc)
{
	struct shim_rep rep;
	unsigned char head[RUN_HEAD];
	long r;

	pthread_mutex_lock(&lock);
	r = call(OP_RUN, A(vc->id), vc->run, RUN_HEAD, head, sizeof(head), &rep, NULL);
	if (rep.out_len >= RUN_HEAD)
		memcpy(vc->run + 8, head + 8, RUN_HEAD - 8);	/* from exit_reason on */
	pthread_mutex_unlock(&lock);
	return r;
}

static long vcpu_run(int fd, struct vcpu *vc)
{
	unsigned char *run = vc->run;
	long r;
	uint32_t reason;

	if (!run)
		return -EIO;
	if (vc->vm->check_resume) {
		/* the VMM is done with what it had to do for the last exit: the model checks it */
		pthread_mutex_lock(&lock);
		if (vc->vm->check_resume) {
			vc->vm->check_resume = 0;
			call(OP_RESUME, A(vc->vm->id), NULL, 0, NULL, 0, NULL, NULL);
		}
		pthread_mutex_unlock(&lock);
	}
	if (vc->vm->run_mode == RUN_MODEL)
		return run_model(vc);
	if (vc->vm->run_mode == RUN_NONE || !hybrid) {
		static int told;

		if (!told++)
			say("KVM_RUN: %s; guest code cannot execute here (ENOEXEC)",
			    hybrid ? "a confidential VM's guest cannot run on this host's plain KVM and no"
				     " scripted guest (gmem exec --guest) was given"
				   : "this host has no usable /dev/kvm (hybrid mode is off)");
		return -ENOEXEC;
	}
	for (;;) {
		if (vc->pending) {
			pthread_mutex_lock(&lock);
			r = resolve_mmio(vc);
			pthread_mutex_unlock(&lock);
			if (r == FAULT_MEMORY_FAULT)
				return -EFAULT;
			if (r < 0)
				return r;
			if (r == FAULT_PASS)
				return 0;
		}
		r = rsys(SYS_ioctl, fd, KVM_RUN, 0);
		memcpy(&reason, run + RUN_EXIT_REASON, 4);
		if (r != 0 || reason != KVM_EXIT_MMIO || !vc->vm->governed)
			return r;
		memcpy(&vc->p_gpa, run + RUN_MMIO_PHYS_ADDR, 8);
		memcpy(vc->p_data, run + RUN_MMIO_DATA, 8);
		vc->p_len = 0;
		memcpy(&vc->p_len, run + RUN_MMIO_LEN, 4);
		vc->p_write = run[RUN_MMIO_IS_WRITE];
		vc->pending = 1;
	}
}

static long vcpu_ioctl(int fd, struct fdent *e, unsigned long cmd, unsigned long arg)
{
	struct vcpu *vc = vcpu_by_id(e->obj);
	struct shim_rep rep;

	if (e->foreign || !vc)
		return -EIO;
	switch (cmd) {
	case KVM_RUN:
		return vcpu_run(fd, vc);
	case KVM_PRE_FAULT_MEMORY:
		return model_ioctl(OP_VCPU_IOCTL, e->obj, cmd, arg, 0, 0, &rep, NULL);
	case KVM_MEMORY_ENCRYPT_OP:
		return encrypt_op(OP_VCPU_IOCTL, e->obj, vc->vm->type, arg);
	}
	/* without the host's KVM: kvm_arch_vcpu_ioctl's EINVAL for what the model lacks */
	return hybrid ? rsys(SYS_ioctl, fd, cmd, arg) : -EINVAL;
}

#ifndef FIGETBSZ
#define FIGETBSZ _IO(0x00, 2)
#endif

/* The VFS ioctls every file answers (do_vfs_ioctl); guest_memfd has no ->unlocked_ioctl. */
static long gmem_ioctl(int fd, unsigned long cmd, unsigned long arg)
{
	switch (cmd) {
	case FIOCLEX: case FIONCLEX: case FIONBIO: case FIOASYNC: case FIOQSIZE: case FIONREAD:
	case FIGETBSZ:
		return rsys(SYS_ioctl, fd, cmd, arg);
	}
	return -ENOTTY;
}

static long do_ioctl(int fd, unsigned long cmd, unsigned long arg)
{
	struct fdent *e = fdent(fd);
	long r;

	if (!e || disabled)
		return rsys(SYS_ioctl, fd, cmd, arg);
	if (e->kind == K_VCPU && cmd == KVM_RUN) {
		struct vcpu *vc = vcpu_by_id(e->obj);

		if (e->foreign || !vc)
			return -EIO;
		return vcpu_run(fd, vc);	/* takes the lock only to ask the model */
	}
	pthread_mutex_lock(&lock);
	switch (e->kind) {
	case K_KVM:
		r = e->foreign ? -EIO : sys_ioctl(fd, cmd, arg);
		break;
	case K_VM:
		r = vm_ioctl(fd, e, cmd, arg);
		break;
	case K_VCPU:
		r = vcpu_ioctl(fd, e, cmd, arg);
		break;
	case K_GMEM:
		r = gmem_ioctl(fd, cmd, arg);
		break;
	case K_SEV:
		r = -ENOTTY;
		break;
	default:
		r = rsys(SYS_ioctl, fd, cmd, arg);
	}
	pthread_mutex_unlock(&lock);
	return r;
}

EXPORT int ioctl(int fd, unsigned long cmd, ...)
{
	va_list ap;
	unsigned long arg;

	va_start(ap, cmd);
	arg = va_arg(ap, unsigned long);
	va_end(ap);
	return (int)ret_errno(do_ioctl(fd, cmd, arg));
}

/* ------------------------------------------------------------------ guest_memfd files */

static struct gfile *gfile_of(int fd)
{
	struct fdent *e = fdent(fd);

	return e && e->kind == K_GMEM ? gfile_by_id(e->obj) : NULL;
}

static long gmem_op(int fd, uint64_t op, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5,
		    void *out, size_t out_cap, struct shim_rep *rep)
{
	struct fdent *e = fdent(fd);
	struct shim_rep tmp;

	return call(OP_GMEM, A(e->obj, op, a2, a3, a4, a5), NULL, 0, out, out_cap, rep ? rep : &tmp, NULL);
}

#define GMEM_CALL(fd, ...) ({						\
	long r_;							\
	pthread_mutex_lock(&lock);					\
	r_ = gmem_op(fd, __VA_ARGS__);					\
	pthread_mutex_unlock(&lock);					\
	r_;								\
})

static int is_gmem(int fd)
{
	struct fdent *e = fdent(fd);

	return e && e->kind == K_GMEM && !disabled;
}

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_READ, n, 0, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_read, fd, buf, n));
}

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_WRITE, n, 0, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_write, fd, buf, n));
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int n)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_READ, 0, 0, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_readv, fd, iov, n));
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int n)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_WRITE, 0, 0, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_writev, fd, iov, n));
}

EXPORT ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_PREAD, (uint64_t)off, 0, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_pread64, fd, buf, n, off));
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_PWRITE, (uint64_t)off, 0, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_pwrite64, fd, buf, n, off));
}

EXPORT ssize_t pread64(int fd, void *buf, size_t n, off_t off) __attribute__((alias("pread")));
EXPORT ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) __attribute__((alias("pwrite")));

EXPORT off_t lseek(int fd, off_t off, int whence)
{
	if (is_gmem(fd))
		return ret_errno(GMEM_CALL(fd, GMEM_LSEEK, (uint64_t)off, (uint64_t)whence, 0, 0, NULL, 0, NULL));
	return ret_errno(rsys(SYS_lseek, fd, off, whence));
}

EXPORT off_t lseek64(int fd, off_t off, int whence) __attribute__((alias("lseek")));

EXPORT int ftruncate(int fd, off_t len)
{
	if (is_gmem(fd))
		return (int)ret_errno(GMEM_CALL(fd, GMEM_FTRUNCATE, (uint64_t)len, 0, 0, 0, NULL, 0, NULL));
	return (int)ret_errno(rsys(SYS_ftruncate, fd, len));
}

EXPORT int ftruncate64(int fd, off_t len) __attribute__((alias("ftruncate")));

/* vfs_fsync_range: a file without ->fsync (guest_memfd has none) answers EINVAL */
EXPORT int fsync(int fd)
{
	if (is_gmem(fd))
		return (int)ret_errno(-EINVAL);
	return (int)ret_errno(rsys(SYS_fsync, fd));
}

EXPORT int fdatasync(int fd)
{
	if (is_gmem(fd))
		return (int)ret_errno(-EINVAL);
	return (int)ret_errno(rsys(SYS_fdatasync, fd));
}

static long gmem_fallocate(int fd, int mode, off_t off, off_t len)
{
	return GMEM_CALL(fd, GMEM_FALLOCATE, (uint64_t)(uint32_t)mode, (uint64_t)off, (uint64_t)len, 0,
			 NULL, 0, NULL);
}

EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
	if (is_gmem(fd))
		return (int)ret_errno(gmem_fallocate(fd, mode, off, len));
	return (int)ret_errno(rsys(SYS_fallocate, fd, mode, off, len));
}

EXPORT int fallocate64(int fd, int mode, off_t off, off_t len) __attribute__((alias("fallocate")));

/* The model's fstat, over the memfd's for the fields the model does not keep. */
static long gmem_fstat(int fd, struct stat *st)
{
	struct shim_stat s;
	struct shim_rep rep;
	long r;

	r = rsys(SYS_fstat, fd, st);
	if (r < 0)
		return r;
	pthread_mutex_lock(&lock);
	r = gmem_op(fd, GMEM_FSTAT, 0, 0, 0, 0, &s, sizeof(s), &rep);
	pthread_mutex_unlock(&lock);
	if (r < 0)
		return r;
	st->st_size = (off_t)s.size;
	st->st_blksize = (blksize_t)s.blksize;
	st->st_mode = (mode_t)s.mode;
	st->st_ino = (ino_t)s.ino;
	st->st_blocks = (blkcnt_t)s.blocks;
	return 0;
}

EXPORT int fstat(int fd, struct stat *st)
{
	if (is_gmem(fd))
		return (int)ret_errno(gmem_fstat(fd, st));
	return (int)ret_errno(rsys(SYS_fstat, fd, st));
}

EXPORT int fstat64(int fd, struct stat64 *st)
{
	return fstat(fd, (struct stat *)st);	/* the same layout on x86-64 */
}

EXPORT int __fxstat(int ver, int fd, struct stat *st)
{
	(void)ver;
	return fstat(fd, st);
}

EXPORT int __fxstat64(int ver, int fd, struct stat64 *st)
{
	(void)ver;
	return fstat(fd, (struct stat *)st);
}

EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	const char *p = path;

	__asm__("" : "+r"(p));	/* libc declares path nonnull; a buggy program's NULL is EFAULT */
	if (p && !p[0] && (flags & AT_EMPTY_PATH) && is_gmem(dirfd))
		return (int)ret_errno(gmem_fstat(dirfd, st));
	return (int)ret_errno(rsys(SYS_newfstatat, dirfd, path, st, flags));
}

EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return fstatat(dirfd, path, (struct stat *)st, flags);
}

/* 6.18 creates guest_memfd inodes on the anon_inode filesystem (anon_inode_create_getfile) */
#define ANON_INODE_FS_MAGIC 0x09041934
EXPORT int fstatfs(int fd, struct statfs *sf)
{
	long r = rsys(SYS_fstatfs, fd, sf);

	if (r == 0 && is_gmem(fd)) {
		sf->f_type = ANON_INODE_FS_MAGIC;
		sf->f_bsize = 4096;
		sf->f_blocks = sf->f_bfree = sf->f_bavail = sf->f_files = sf->f_ffree = 0;
	}
	return (int)ret_errno(r);
}

EXPORT int fstatfs64(int fd, struct statfs64 *sf)
{
	return fstatfs(fd, (struct statfs *)sf);
}

/* ------------------------------------------------------------------ mappings */

static struct gmap *gmap_at(uint64_t start, uint64_t end)
{
	for (int i = 0; i < ngmaps; i++)
		if (gmaps[i].used && gmaps[i].start < end && start < gmaps[i].end)
			return &gmaps[i];
	return NULL;
}

static void unmapped(uint64_t start, uint64_t end);

static long gmem_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	struct gfile *gf;
	struct shim_rep rep;
	struct gmap *m;
	long r, map;

	pthread_mutex_lock(&lock);
	gf = gfile_of(fd);
	r = gmem_op(fd, GMEM_MMAP, len, (uint64_t)off, (uint64_t)prot, (uint64_t)flags, NULL, 0, &rep);
	if (r < 0 || !gf || !gf->b) {
		pthread_mutex_unlock(&lock);
		return r < 0 ? r : -EIO;
	}
	/* the model said yes: the pages are the memfd's, or -- where every access is
	 * kvm_gmem_fault_user_mapping's SIGBUS -- an empty file's */
	map = rsys(SYS_mmap, addr, len, prot, flags, rep.v[2] ? gf->b->fd : sigbus_fd,
		   rep.v[2] ? off : 0);
	if (map < 0 && map > -4096) {
		call(OP_GMEM, A(0, GMEM_MUNMAP, (uint64_t)r), NULL, 0, NULL, 0, &rep, NULL);
		pthread_mutex_unlock(&lock);
		return map;
	}
	if (flags & MAP_FIXED)
		unmapped((uint64_t)map, (uint64_t)map + len);
	m = NEW_ENTRY(gmaps, ngmaps, capgmaps, struct gmap);
	if (m) {
		m->start = (uint64_t)map;
		m->end = (uint64_t)map + ((len + 4095) & ~4095ul);
		m->obj = (uint64_t)r;
	}
	pthread_mutex_unlock(&lock);
	return map;
}

/* Under lock: [start, end) of the address space is gone (munmap, or mmap MAP_FIXED over
 * it): a guest_memfd mapping entirely inside is closed in the model (its file reference
 * goes); one cut at an edge shrinks. */
static void unmapped(uint64_t start, uint64_t end)
{
	struct shim_rep rep;

	for (int i = 0; i < ngmaps; i++) {
		struct gmap *m = &gmaps[i];

		if (!m->used || m->end <= start || end <= m->start)
			continue;
		if (start <= m->start && m->end <= end) {
			call(OP_GMEM, A(0, GMEM_MUNMAP, m->obj), NULL, 0, NULL, 0, &rep, NULL);
			m->used = 0;
		} else if (start <= m->start) {
			m->start = end;
		} else if (m->end <= end) {
			m->end = start;
		}
		/* a hole in the middle: the VMA is split, the file stays referenced */
	}
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	long r;

	if (!(flags & MAP_ANONYMOUS) && is_gmem(fd))
		r = gmem_mmap(addr, len, prot, flags, fd, off);
	else
		r = rsys(SYS_mmap, addr, len, prot, flags, fd, off);
	if (r < 0 && r > -4096) {
		errno = (int)-r;
		return MAP_FAILED;
	}
	if ((flags & MAP_FIXED) && ngmaps && !is_gmem(fd)) {
		pthread_mutex_lock(&lock);
		unmapped((uint64_t)r, (uint64_t)r + len);
		pthread_mutex_unlock(&lock);
	}
	return (void *)r;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));

EXPORT int munmap(void *addr, size_t len)
{
	long r = rsys(SYS_munmap, addr, len);

	if (r == 0 && ngmaps) {
		pthread_mutex_lock(&lock);
		unmapped((uint64_t)addr, (uint64_t)addr + ((len + 4095) & ~4095ul));
		pthread_mutex_unlock(&lock);
	}
	return (int)ret_errno(r);
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

EXPORT int madvise(void *addr, size_t len, int advice)
{
	uint64_t s = (uint64_t)addr, e = s + len;

	if (ngmaps && !disabled) {
		struct gmap *m;

		pthread_mutex_lock(&lock);
		m = gmap_at(s, e);
		pthread_mutex_unlock(&lock);
		/* guest_memfd folios are never collapsed into a huge page: khugepaged's
		 * hugepage_vma_check refuses the VMA (7.2's guest_memfd_test: test_collapse) */
		if (m && advice == MADV_COLLAPSE)
			return (int)ret_errno(-EINVAL);
	}
	return (int)ret_errno(rsys(SYS_madvise, addr, len, advice));
}

EXPORT int mprotect(void *addr, size_t len, int prot)
{
	uint64_t s = (uint64_t)addr, e = s + len;

	if ((prot & PROT_EXEC) && ngmaps && !disabled) {
		struct gmap *m;

		pthread_mutex_lock(&lock);
		m = gmap_at(s, e);
		pthread_mutex_unlock(&lock);
		/* mapped from a noexec mount, the VMA lacks VM_MAYEXEC: mprotect_fixup's EACCES */
		if (m)
			return (int)ret_errno(-EACCES);
	}
	return (int)ret_errno(rsys(SYS_mprotect, addr, len, prot));
}

/* ------------------------------------------------------------------ syscall() */

EXPORT long syscall(long nr, ...)
{
	va_list ap;
	long a, b, c, d, e, f;

	va_start(ap, nr);
	a = va_arg(ap, long);
	b = va_arg(ap, long);
	c = va_arg(ap, long);
	d = va_arg(ap, long);
	e = va_arg(ap, long);
	f = va_arg(ap, long);
	va_end(ap);
	switch (nr) {
	case SYS_open: return open((const char *)a, (int)b, (mode_t)c);
	case SYS_openat: return openat((int)a, (const char *)b, (int)c, (mode_t)d);
	case SYS_ioctl: return ioctl((int)a, (unsigned long)b, c);
	case SYS_close: return close((int)a);
	case SYS_dup: return dup((int)a);
	case SYS_dup2: return dup2((int)a, (int)b);
	case SYS_dup3: return dup3((int)a, (int)b, (int)c);
	case SYS_fcntl: return fcntl((int)a, (int)b, c);
	case SYS_mmap: {
		void *p = mmap((void *)a, (size_t)b, (int)c, (int)d, (int)e, (off_t)f);

		return p == MAP_FAILED ? -1 : (long)p;
	}
	case SYS_munmap: return munmap((void *)a, (size_t)b);
	case SYS_madvise: return madvise((void *)a, (size_t)b, (int)c);
	case SYS_mprotect: return mprotect((void *)a, (size_t)b, (int)c);
	case SYS_fallocate: return fallocate((int)a, (int)b, (off_t)c, (off_t)d);
	case SYS_read: return read((int)a, (void *)b, (size_t)c);
	case SYS_write: return write((int)a, (const void *)b, (size_t)c);
	case SYS_readv: return readv((int)a, (const struct iovec *)b, (int)c);
	case SYS_writev: return writev((int)a, (const struct iovec *)b, (int)c);
	case SYS_pread64: return pread((int)a, (void *)b, (size_t)c, (off_t)d);
	case SYS_pwrite64: return pwrite((int)a, (const void *)b, (size_t)c, (off_t)d);
	case SYS_lseek: return lseek((int)a, (off_t)b, (int)c);
	case SYS_ftruncate: return ftruncate((int)a, (off_t)b);
	case SYS_fsync: return fsync((int)a);
	case SYS_fdatasync: return fdatasync((int)a);
	case SYS_fstat: return fstat((int)a, (struct stat *)b);
	case SYS_newfstatat: return fstatat((int)a, (const char *)b, (struct stat *)c, (int)d);
	case SYS_fstatfs: return fstatfs((int)a, (struct statfs *)b);
	}
	return ret_errno(raw_syscall(nr, a, b, c, d, e, f));
}
