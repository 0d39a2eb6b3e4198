// SPDX-License-Identifier: GPL-2.0-only
/*
 * A KVM/guest_memfd uAPI driver for tests/test_exec.py: it reads one command per line
 * (from the file in argv[1], or stdin) and prints one result line per command, making the
 * plain system calls a VMM makes.  Run under `gmem exec`, every call goes through the
 * preload library; the tests compare the results with the model's Python API, or with what
 * the kernel does.
 *
 * Handles are names: "vm v0 0" creates a VM named v0, later commands say "v0".  Results:
 *   ok | val V... | err ERRNO | sigbus | exit REASON ...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* 6.18 uAPI the system headers may lack */
#define KVMIO_ 0xAE
#define IOC_(dir, nr, size) (((unsigned long)(dir) << 30) | ((unsigned long)(size) << 16) | (KVMIO_ << 8) | (nr))
#define SET_USER_MEMORY_REGION2	IOC_(1, 0x49, 160)
#define SET_MEMORY_ATTRIBUTES	IOC_(1, 0xd2, 32)
#define CREATE_GUEST_MEMFD	IOC_(3, 0xd4, 64)
#define PRE_FAULT_MEMORY	IOC_(3, 0xd5, 64)
#define EXIT_MEMORY_FAULT	39

struct region2 { uint32_t slot, flags; uint64_t gpa, size, uaddr, goff; uint32_t gfd, pad1; uint64_t pad2[14]; };

#define MAXH 256
static struct { char name[32]; long fd; void *p; size_t len; } h[MAXH];
static int nh;

static int find(const char *name)
{
	for (int i = 0; i < nh; i++)
		if (!strcmp(h[i].name, name))
			return i;
	return -1;
}

static int put(const char *name, long fd, void *p, size_t len)
{
	int i = find(name);

	if (i < 0 && nh < MAXH)
		i = nh++;
	if (i < 0)
		return -1;
	snprintf(h[i].name, sizeof(h[i].name), "%s", name);
	h[i].fd = fd;
	h[i].p = p;
	h[i].len = len;
	return i;
}

/* A number, or a handle's fd, or "name+off" for an address in a mapping or buffer. */
static uint64_t num(const char *s)
{
	char nm[32];
	const char *plus = strchr(s, '+');
	int i;

	if ((s[0] >= '0' && s[0] <= '9') || s[0] == '-')
		return strtoull(s, NULL, 0);
	snprintf(nm, sizeof(nm), "%.*s", plus ? (int)(plus - s) : (int)strlen(s), s);
	i = find(nm);
	if (i < 0)
		return (uint64_t)-1;
	if (h[i].p)
		return (uint64_t)h[i].p + (plus ? strtoull(plus + 1, NULL, 0) : 0);
	return (uint64_t)h[i].fd;
}

static void result(long r)
{
	if (r < 0)
		printf("err %d\n", errno);
	else
		printf("ok\n");
}

static sigjmp_buf jb;

static void on_sigbus(int sig)
{
	siglongjmp(jb, 1);
}

static void run_vcpu(int fd, struct kvm_run *run)
{
	int r = ioctl(fd, KVM_RUN, 0);

	if (r < 0) {
		uint64_t *mf = (uint64_t *)((char *)run + 32);	/* memory_fault: flags, gpa, size */

		printf("err %d exit %u", errno, run->exit_reason);
		if (run->exit_reason == EXIT_MEMORY_FAULT)
			printf(" mf %llx %llx %llx", (unsigned long long)mf[0], (unsigned long long)mf[1],
			       (unsigned long long)mf[2]);
		printf("\n");
		return;
	}
	printf("exit %u", run->exit_reason);
	if (run->exit_reason == KVM_EXIT_IO)
		printf(" io %x %x", run->io.port, *((uint8_t *)run + run->io.data_offset));
	if (run->exit_reason == KVM_EXIT_MMIO)
		printf(" mmio %llx %u", (unsigned long long)run->mmio.phys_addr, run->mmio.len);
	if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		printf(" suberror %u", run->internal.suberror);
	printf("\n");
}

static void command(char **a, int n);

/* One command of "repeat", its result line swallowed: 1 if it failed. */
static int repeat_one(char **a, int n)
{
	char line[128];
	FILE *old = stdout, *mem = fmemopen(line, sizeof(line), "w");
	int bad;

	if (!mem)
		return 1;
	stdout = mem;
	command(a, n);
	fflush(mem);
	stdout = old;
	bad = strncmp(line, "ok", 2) != 0;
	fclose(mem);
	return bad;
}

static void command(char **a, int n)
{
	const char *c = a[0];
	long r;

	errno = 0;
	if (!strcmp(c, "kvm")) {
		r = open("/dev/kvm", O_RDWR | O_CLOEXEC);
		if (r >= 0)
			put(a[1], r, NULL, 0);
		result(r);
	} else if (!strcmp(c, "vm")) {		/* vm NAME TYPE  (on the kvm handle "kvm") */
		r = ioctl((int)num("kvm"), KVM_CREATE_VM, num(a[2]));
		if (r >= 0)
			put(a[1], r, NULL, 0);
		result(r);
	} else if (!strcmp(c, "ext")) {		/* ext FD CAP */
		r = ioctl((int)num(a[1]), KVM_CHECK_EXTENSION, num(a[2]));
		if (r < 0)
			result(r);
		else
			printf("val %ld\n", r);
	} else if (!strcmp(c, "gmem")) {	/* gmem NAME VM SIZE FLAGS */
		uint64_t g[8] = { num(a[3]), num(a[4]) };

		r = ioctl((int)num(a[2]), CREATE_GUEST_MEMFD, g);
		if (r >= 0)
			put(a[1], r, NULL, 0);
		result(r);
	} else if (!strcmp(c, "slot")) {	/* slot VM SLOT FLAGS GPA SIZE UADDR GMEMFD GMEMOFF */
		struct region2 rg = { (uint32_t)num(a[2]), (uint32_t)num(a[3]), num(a[4]), num(a[5]),
				      num(a[6]), num(a[8]), (uint32_t)num(a[7]) };

		result(ioctl((int)num(a[1]), SET_USER_MEMORY_REGION2, &rg));
	} else if (!strcmp(c, "slot1")) {	/* slot1 VM SLOT FLAGS GPA SIZE UADDR: the v1 ioctl */
		struct kvm_userspace_memory_region rg = { (uint32_t)num(a[2]), (uint32_t)num(a[3]),
							  num(a[4]), num(a[5]), num(a[6]) };

		result(ioctl((int)num(a[1]), KVM_SET_USER_MEMORY_REGION, &rg));
	} else if (!strcmp(c, "attr")) {	/* attr VM GPA SIZE ATTRS FLAGS */
		uint64_t at[4] = { num(a[2]), num(a[3]), num(a[4]), num(a[5]) };

		result(ioctl((int)num(a[1]), SET_MEMORY_ATTRIBUTES, at));
	} else if (!strcmp(c, "falloc")) {	/* falloc FD MODE OFF LEN */
		result(fallocate((int)num(a[1]), (int)num(a[2]), (off_t)num(a[3]), (off_t)num(a[4])));
	} else if (!strcmp(c, "read")) {
		char b[64];

		result(read((int)num(a[1]), b, sizeof(b)));
	} else if (!strcmp(c, "write")) {
		char b[64] = { 0 };

		result(write((int)num(a[1]), b, sizeof(b)));
	} else if (!strcmp(c, "pread")) {
		char b[64];

		result(pread((int)num(a[1]), b, sizeof(b), (off_t)num(a[2])));
	} else if (!strcmp(c, "pwrite")) {
		char b[64] = { 0 };

		result(pwrite((int)num(a[1]), b, sizeof(b), (off_t)num(a[2])));
	} else if (!strcmp(c, "lseek")) {
		result(lseek((int)num(a[1]), (off_t)num(a[2]), (int)num(a[3])));
	} else if (!strcmp(c, "ftruncate")) {
		result(ftruncate((int)num(a[1]), (off_t)num(a[2])));
	} else if (!strcmp(c, "fsync")) {
		result(fsync((int)num(a[1])));
	} else if (!strcmp(c, "fstat")) {
		struct stat st;

		r = fstat((int)num(a[1]), &st);
		if (r < 0)
			result(r);
		else
			printf("val %lld %ld %o %lld\n", (long long)st.st_size, (long)st.st_blksize,
			       st.st_mode, (long long)st.st_blocks);
	} else if (!strcmp(c, "ino")) {
		struct stat st;

		r = fstat((int)num(a[1]), &st);
		printf("val %llu\n", r < 0 ? 0ull : (unsigned long long)st.st_ino);
	} else if (!strcmp(c, "mmap")) {	/* mmap NAME FD LEN OFF PROT FLAGS */
		void *p = mmap(NULL, num(a[3]), (int)num(a[5]), (int)num(a[6]), (int)num(a[2]), (off_t)num(a[4]));

		if (p != MAP_FAILED)
			put(a[1], -1, p, num(a[3]));
		result(p == MAP_FAILED ? -1 : 0);
	} else if (!strcmp(c, "buf")) {		/* buf NAME LEN: private anonymous memory */
		void *p = mmap(NULL, num(a[2]), PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

		put(a[1], -1, p, num(a[2]));
		result(p == MAP_FAILED ? -1 : 0);
	} else if (!strcmp(c, "memfd")) {	/* memfd NAME SIZE: a regular memfd */
		r = memfd_create("test", MFD_CLOEXEC);
		if (r >= 0 && ftruncate((int)r, (off_t)num(a[2])) == 0)
			put(a[1], r, NULL, 0);
		result(r);
	} else if (!strcmp(c, "repeat")) {	/* repeat N FROM STEP CMD...: @ = FROM + i * STEP, @*K times K */
		long k = (long)num(a[1]), from = (long)num(a[2]), step = (long)num(a[3]);
		char *b[16], buf[16][64];
		int errs = 0;

		for (long i = 0; i < k; i++) {
			for (int j = 4; j < n; j++) {
				char *at = strchr(a[j], '@'), *rest;
				long v = from + i * step;

				if (at && at[1] == '*') {	/* @*K: times K */
					v *= strtol(at + 2, &rest, 0);
				} else {
					rest = at ? at + 1 : NULL;
				}
				if (at)
					snprintf(buf[j - 4], sizeof(buf[0]), "%.*s%ld%s", (int)(at - a[j]), a[j], v, rest);
				else
					snprintf(buf[j - 4], sizeof(buf[0]), "%s", a[j]);
				b[j - 4] = buf[j - 4];
			}
			fflush(stdout);
			errs += repeat_one(b, n - 4);
		}
		printf("val %d\n", errs);	/* how many failed */
	} else if (!strcmp(c, "peek") || !strcmp(c, "poke")) {	/* peek ADDR | poke ADDR BYTE */
		volatile uint8_t *p = (volatile uint8_t *)num(a[1]);

		signal(SIGBUS, on_sigbus);
		if (sigsetjmp(jb, 1)) {
			printf("sigbus\n");
		} else if (c[1] == 'e') {
			printf("val %u\n", *p);
		} else {
			*p = (uint8_t)num(a[2]);
			printf("ok\n");
		}
	} else if (!strcmp(c, "code")) {	/* code ADDR HEXBYTES */
		uint8_t *p = (uint8_t *)num(a[1]);

		for (const char *s = a[2]; s[0] && s[1]; s += 2) {
			unsigned v;

			sscanf(s, "%2x", &v);
			*p++ = (uint8_t)v;
		}
		printf("ok\n");
	} else if (!strcmp(c, "munmap")) {
		int i = find(a[1]);

		result(munmap(h[i].p, h[i].len));
	} else if (!strcmp(c, "madvise")) {	/* madvise ADDR LEN ADVICE */
		result(madvise((void *)num(a[1]), num(a[2]), (int)num(a[3])));
	} else if (!strcmp(c, "mprotect")) {
		result(mprotect((void *)num(a[1]), num(a[2]), (int)num(a[3])));
	} else if (!strcmp(c, "close")) {
		result(close((int)num(a[1])));
	} else if (!strcmp(c, "dup")) {		/* dup NAME FD */
		r = dup((int)num(a[2]));
		if (r >= 0)
			put(a[1], r, NULL, 0);
		result(r);
	} else if (!strcmp(c, "ioctl")) {	/* ioctl FD CMD ARG */
		r = ioctl((int)num(a[1]), (unsigned long)num(a[2]), num(a[3]));
		if (r < 0)
			result(r);
		else
			printf("val %ld\n", r);
	} else if (!strcmp(c, "sysioctl")) {	/* the same through syscall() */
		r = syscall(SYS_ioctl, (int)num(a[1]), (unsigned long)num(a[2]), num(a[3]));
		if (r < 0)
			result(r);
		else
			printf("val %ld\n", r);
	} else if (!strcmp(c, "vcpu")) {	/* vcpu NAME VM ID [RIP]: real mode, at RIP (0x1000) */
		struct kvm_sregs s;
		struct kvm_regs regs = { .rip = n > 4 ? num(a[4]) : 0x1000, .rflags = 2 };
		long sz = ioctl((int)num("kvm"), KVM_GET_VCPU_MMAP_SIZE, 0);

		r = ioctl((int)num(a[2]), KVM_CREATE_VCPU, num(a[3]));
		if (r >= 0) {
			void *run = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, (int)r, 0);

			put(a[1], r, run, sz);
			if (!ioctl((int)r, KVM_GET_SREGS, &s)) {
				s.cs.base = 0;
				s.cs.selector = 0;
				ioctl((int)r, KVM_SET_SREGS, &s);
				ioctl((int)r, KVM_SET_REGS, &regs);
			}
		}
		result(r);
	} else if (!strcmp(c, "run")) {		/* run VCPU */
		int i = find(a[1]);

		run_vcpu((int)h[i].fd, h[i].p);
	} else if (!strcmp(c, "prefault")) {	/* prefault VCPU GPA SIZE */
		uint64_t pf[8] = { num(a[2]), num(a[3]) };
		int i = find(a[1]);

		r = ioctl((int)h[i].fd, PRE_FAULT_MEMORY, pf);
		printf("%s %d %llx %llx\n", r < 0 ? "err" : "val", r < 0 ? errno : 0,
		       (unsigned long long)pf[0], (unsigned long long)pf[1]);
	} else if (!strcmp(c, "fork")) {	/* fork COMMAND...: run it in a child */
		pid_t pid;

		fflush(stdout);
		pid = fork();
		if (pid == 0) {
			command(a + 1, n - 1);
			fflush(stdout);
			_exit(0);
		}
		waitpid(pid, NULL, 0);
	} else {
		printf("unknown %s\n", c);
	}
}

int main(int argc, char **argv)
{
	FILE *in = argc > 1 ? fopen(argv[1], "r") : stdin;
	char line[1024];

	if (argc > 2 && !freopen(argv[2], "w", stdout))
		return 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (in && fgets(line, sizeof(line), in)) {
		char *a[16];
		int n = 0;

		for (char *t = strtok(line, " \t\n"); t && n < 16; t = strtok(NULL, " \t\n"))
			a[n++] = t;
		if (n)
			command(a, n);
	}
	return 0;
}
