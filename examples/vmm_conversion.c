// SPDX-License-Identifier: GPL-2.0-only
/*
 * A VMM's private/shared conversion loop for an SEV-SNP guest, written against KVM's uAPI
 * only (no gmem headers, no libraries): what QEMU, cloud-hypervisor or Firecracker do for
 * guest_memfd-backed memory, in 200 lines.
 *
 *   KVM_CREATE_VM(KVM_X86_SNP_VM), KVM_SEV_INIT2, KVM_CREATE_GUEST_MEMFD, a memslot with a
 *   shared backing and the guest_memfd, everything private, KVM_CAP_EXIT_HYPERCALL for
 *   KVM_HC_MAP_GPA_RANGE, SNP_LAUNCH_{START,UPDATE,FINISH}; then KVM_RUN until the guest
 *   stops, converting on every KVM_HC_MAP_GPA_RANGE exit (the guest asked) and every
 *   KVM_EXIT_MEMORY_FAULT (the guest touched a page in the other state):
 *     to shared:  set the attributes, punch the private copy out of guest_memfd;
 *     to private: set the attributes, discard the shared copy (MADV_DONTNEED).
 *   An emulated device DMAs into the first page the guest shares, through a pointer into
 *   the shared memory, and drops the pointer when the page goes private again.
 *
 * Built with -DBUGGY it has the two bugs VMMs shipped (docs: README.md, "gmem exec"):
 * it forgets to punch after going shared (private memory stays allocated: cloud-hypervisor
 * #8167) and its device keeps DMAing through the stale pointer after the discard (QEMU
 * 852f0048f3's stale IOMMU mapping).  Run both under the model:
 *
 *   gmem exec --platform amd --guest conversions --report -- examples/vmm_conversion
 *   gmem exec --platform amd --guest conversions --report -- examples/vmm_conversion_buggy
 *
 * An SNP guest cannot execute on a plain host, so the guest is the model's scripted one
 * (--guest conversions): it validates its memory, converts half of it to shared and back
 * with page-state changes, and touches one page privately without asking first.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h (6.18) */
#define KVMIO 0xAE
#define IOC(dir, nr, size) (((unsigned long)(dir) << 30) | ((unsigned long)(size) << 16) | (KVMIO << 8) | (nr))
#define KVM_CREATE_VM			IOC(0, 0x01, 0)
#define KVM_CHECK_EXTENSION		IOC(0, 0x03, 0)
#define KVM_GET_VCPU_MMAP_SIZE		IOC(0, 0x04, 0)
#define KVM_CREATE_VCPU			IOC(0, 0x41, 0)
#define KVM_SET_USER_MEMORY_REGION2	IOC(1, 0x49, 160)
#define KVM_ENABLE_CAP			IOC(1, 0xa3, 104)
#define KVM_RUN				IOC(0, 0x80, 0)
#define KVM_MEMORY_ENCRYPT_OP		IOC(3, 0xba, 8)
#define KVM_SET_MEMORY_ATTRIBUTES	IOC(1, 0xd2, 32)
#define KVM_CREATE_GUEST_MEMFD		IOC(3, 0xd4, 64)

#define KVM_CAP_EXIT_HYPERCALL	201
#define KVM_CAP_GUEST_MEMFD	234
#define KVM_CAP_VM_TYPES	235
#define KVM_X86_SNP_VM		4
#define KVM_MEM_GUEST_MEMFD	(1u << 2)
#define KVM_MEMORY_ATTRIBUTE_PRIVATE	(1ull << 3)
#define KVM_MEMORY_EXIT_FLAG_PRIVATE	(1ull << 3)
#define KVM_HC_MAP_GPA_RANGE	12
#define KVM_MAP_GPA_RANGE_ENCRYPTED	(1ull << 4)
#define KVM_EXIT_HYPERCALL	3
#define KVM_EXIT_HLT		5
#define KVM_EXIT_SHUTDOWN	8
#define KVM_EXIT_MEMORY_FAULT	39
#define KVM_SEV_INIT2			22
#define KVM_SEV_SNP_LAUNCH_START	100
#define KVM_SEV_SNP_LAUNCH_UPDATE	101
#define KVM_SEV_SNP_LAUNCH_FINISH	102
#define KVM_SEV_SNP_PAGE_TYPE_NORMAL	1

struct kvm_userspace_memory_region2 {
	uint32_t slot, flags;
	uint64_t guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset;
	uint32_t guest_memfd, pad1;
	uint64_t pad2[14];
};
struct kvm_memory_attributes { uint64_t address, size, attributes, flags; };
struct kvm_create_guest_memfd { uint64_t size, flags, reserved[6]; };
struct kvm_enable_cap { uint32_t cap, flags; uint64_t args[4]; uint8_t pad[64]; };
struct kvm_sev_cmd { uint32_t id, pad0; uint64_t data; uint32_t error, sev_fd; };
struct kvm_sev_snp_launch_start { uint64_t policy; uint8_t gosvw[16]; uint16_t flags; uint8_t pad0[6]; uint64_t pad1[4]; };
struct kvm_sev_snp_launch_update { uint64_t gfn_start, uaddr, len; uint8_t type, pad0; uint16_t flags; uint32_t pad1; uint64_t pad2[4]; };

/* struct kvm_run, the parts read here (x86-64) */
struct run {
	uint8_t request_interrupt_window, immediate_exit, padding1[6];
	uint32_t exit_reason;
	uint8_t ready_for_interrupt_injection, if_flag;
	uint16_t flags;
	uint64_t cr8, apic_base;
	union {
		struct { uint64_t flags, gpa, size; } memory_fault;
		struct { uint64_t nr, args[6], ret, flags; } hypercall;
		uint8_t padding[256];
	};
};

#define MEM_SIZE (256u << 10)

static int vm_fd, gmem_fd, sev_fd;
static uint8_t *shared;		/* the shared backing of guest memory (gpa 0 .. MEM_SIZE) */
static uint8_t *dma;		/* the emulated device's buffer: a pointer into shared memory */

static void die(const char *what)
{
	fprintf(stderr, "vmm_conversion: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void xioctl(int fd, unsigned long cmd, void *arg, const char *what)
{
	if (ioctl(fd, cmd, arg) < 0)
		die(what);
}

static void sev_cmd(uint32_t id, void *data, const char *what)
{
	struct kvm_sev_cmd cmd = { .id = id, .data = (uint64_t)data, .sev_fd = (uint32_t)sev_fd };

	xioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, &cmd, what);
}

static void set_private(uint64_t gpa, uint64_t size, int private)
{
	struct kvm_memory_attributes a = { gpa, size, private ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, 0 };

	xioctl(vm_fd, KVM_SET_MEMORY_ATTRIBUTES, &a, "KVM_SET_MEMORY_ATTRIBUTES");
}

/* The conversion itself: the attributes, then the copy the guest no longer uses goes. */
static void convert(uint64_t gpa, uint64_t size, int private)
{
	set_private(gpa, size, private);
	if (private) {
		if (dma >= shared + gpa && dma < shared + gpa + size) {
#ifndef BUGGY
			dma = NULL;		/* the device's mapping goes before the page does */
#endif
		}
		if (madvise(shared + gpa, size, MADV_DONTNEED) < 0)
			die("madvise(MADV_DONTNEED)");
	} else {
#ifndef BUGGY
		if (fallocate(gmem_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, gpa, size) < 0)
			die("fallocate(PUNCH_HOLE)");
#endif
		if (!dma)
			dma = shared + gpa;	/* the device gets the first page the guest shares */
	}
}

/* The device: a completion record, DMAed now and then. */
static void device_dma(unsigned n)
{
	if (dma)
		memcpy(dma, &n, sizeof(n));
}

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	struct kvm_userspace_memory_region2 region = { 0 };
	struct kvm_create_guest_memfd gmem = { .size = MEM_SIZE };
	struct kvm_enable_cap cap = { .cap = KVM_CAP_EXIT_HYPERCALL, .args = { 1u << KVM_HC_MAP_GPA_RANGE } };
	uint8_t init[8] = { 0 };
	struct kvm_sev_snp_launch_start start = { .policy = 0x30000 };
	struct kvm_sev_snp_launch_update update = { 0 };
	uint8_t finish[88] = { 0 };
	unsigned exits[64] = { 0 }, n = 0;
	uint8_t *image;
	struct run *run;
	int vcpu;
	long run_size;

	if (kvm < 0)
		die("/dev/kvm");
	if (!(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES) & (1 << KVM_X86_SNP_VM)) ||
	    ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0) {
		fprintf(stderr, "vmm_conversion: no SEV-SNP VMs with guest_memfd here "
			"(run it under gmem exec --platform amd)\n");
		return 4;
	}
	sev_fd = open("/dev/sev", O_RDWR | O_CLOEXEC);
	if (sev_fd < 0)
		die("/dev/sev");
	vm_fd = ioctl(kvm, KVM_CREATE_VM, KVM_X86_SNP_VM);
	if (vm_fd < 0)
		die("KVM_CREATE_VM");
	sev_cmd(KVM_SEV_INIT2, init, "KVM_SEV_INIT2");

	gmem_fd = ioctl(vm_fd, KVM_CREATE_GUEST_MEMFD, &gmem);
	if (gmem_fd < 0)
		die("KVM_CREATE_GUEST_MEMFD");
	shared = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		die("mmap");
	region = (struct kvm_userspace_memory_region2){ .slot = 0, .flags = KVM_MEM_GUEST_MEMFD,
		.guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)shared,
		.guest_memfd = (uint32_t)gmem_fd, .guest_memfd_offset = 0 };
	xioctl(vm_fd, KVM_SET_USER_MEMORY_REGION2, &region, "KVM_SET_USER_MEMORY_REGION2");
	set_private(0, MEM_SIZE, 1);
	xioctl(vm_fd, KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)");
	vcpu = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap(vcpu)");

	/* the initial image: one page of "firmware" at gpa 0 */
	image = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(image, 0x90, 4096);
	sev_cmd(KVM_SEV_SNP_LAUNCH_START, &start, "KVM_SEV_SNP_LAUNCH_START");
	update = (struct kvm_sev_snp_launch_update){ .gfn_start = 0, .uaddr = (uint64_t)image,
		.len = 4096, .type = KVM_SEV_SNP_PAGE_TYPE_NORMAL };
	sev_cmd(KVM_SEV_SNP_LAUNCH_UPDATE, &update, "KVM_SEV_SNP_LAUNCH_UPDATE");
	sev_cmd(KVM_SEV_SNP_LAUNCH_FINISH, finish, "KVM_SEV_SNP_LAUNCH_FINISH");

	for (;;) {
		int r = ioctl(vcpu, KVM_RUN, 0);

		if (r < 0 && errno == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
			/* an implicit conversion: the guest's access says which state it wants */
			convert(run->memory_fault.gpa, run->memory_fault.size,
				!!(run->memory_fault.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE));
		} else if (r < 0) {
			die("KVM_RUN");
		} else if (run->exit_reason == KVM_EXIT_HYPERCALL &&
			   run->hypercall.nr == KVM_HC_MAP_GPA_RANGE) {
			convert(run->hypercall.args[0], run->hypercall.args[1] << 12,
				!!(run->hypercall.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED));
			run->hypercall.ret = 0;
		} else if (run->exit_reason == KVM_EXIT_HLT || run->exit_reason == KVM_EXIT_SHUTDOWN) {
			break;
		} else {
			fprintf(stderr, "vmm_conversion: unexpected exit %u\n", run->exit_reason);
			return 1;
		}
		exits[run->exit_reason & 63]++;
		device_dma(++n);
	}
	printf("vmm_conversion: guest done after %u exits (%u KVM_HC_MAP_GPA_RANGE, %u memory faults)\n",
	       n, exits[KVM_EXIT_HYPERCALL], exits[KVM_EXIT_MEMORY_FAULT]);
	close(vcpu);
	close(vm_fd);		/* the guest_memfd keeps the VM until it is closed too */
	close(gmem_fd);
	return 0;
}
