// SPDX-License-Identifier: GPL-2.0-only
/*
 * ioctls per second through gmem exec's preload library (benchmarks/bench_exec.py): N calls
 * of each kind, timed in the program; prints "NAME ns_per_call".  Without gmem exec it times
 * the same calls on this machine's /dev/kvm (which may refuse them: the time is still the
 * kernel's round trip).
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>

#define KVM_CREATE_VM 0xae01
#define KVM_CHECK_EXTENSION 0xae03
#define KVM_CREATE_GUEST_MEMFD 0xc040aed4
#define KVM_SET_MEMORY_ATTRIBUTES 0x4020aed2
#define KVM_CAP_GUEST_MEMFD 234

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 10000;
	int kvm = open("/dev/kvm", O_RDWR), vm = ioctl(kvm, KVM_CREATE_VM, argc > 2 ? atoi(argv[2]) : 0);
	struct { uint64_t size, flags, r[6]; } bad = { 4095, 0 };
	struct { uint64_t addr, size, attrs, flags; } attr = { 0, 4096, 0, 0 };
	double t;

	t = now();
	for (int i = 0; i < n; i++)
		ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD);
	printf("check_extension %.0f\n", (now() - t) / n * 1e9);
	t = now();
	for (int i = 0; i < n; i++)
		ioctl(vm, KVM_CREATE_GUEST_MEMFD, &bad);
	printf("create_guest_memfd_einval %.0f\n", (now() - t) / n * 1e9);
	t = now();
	for (int i = 0; i < n; i++) {
		attr.attrs = (i & 1) << 3;
		ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr);
	}
	printf("set_memory_attributes %.0f\n", (now() - t) / n * 1e9);
	return 0;
}
