"""A Hypothesis state machine over the guest_memfd uAPI of one DEFAULT VM: create / allocate /
punch / bind / unbind / close / mmap-write / read / munmap, run side by side on

* the model of this machine's kernel, ``gmem.Host(platform="none", sw_protected=False,
  memory_attributes=False)`` (``host.check()`` after every step), and
* the real /dev/kvm (``gmem.kernel``) when it is available,

comparing every outcome (value, errno, SIGBUS offset) and all readable contents. Both are also
compared with a small shadow written from the spec (§4.2, §5, §10, §11.3), so the machine checks
the model even where there is no /dev/kvm.

The guest_memfds are created with GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, so host
mappings read and write them; each file has one mapping one page longer than the file (the last
page SIGBUSes).
"""

import errno

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import gmem
from gmem import kernel, uapi
from gmem.errors import SigBus

PS = uapi.PAGE_SIZE
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
KERNEL = kernel.available()
GPA_BASE = 1 << 32


def errname(e):
    return "EOPNOTSUPP" if e == errno.EOPNOTSUPP else errno.errorcode.get(e, e)


def outcome(fn):
    try:
        return ("ok", fn())
    except SigBus as e:
        return ("SIGBUS", e.offset)
    except OSError as e:
        return ("err", errname(e.errno))


class ShadowFile:
    """What the spec says about one guest_memfd: contents, open fd / mapping, bindings."""

    def __init__(self, npages):
        self.size = npages * PS
        self.data = bytearray(self.size)
        self.fd_open = True
        self.map_open = False
        self.bindings = {}           # slot id -> (first page, npages)

    @property
    def alive(self):
        """The struct file lives while its fd or a mapping holds it (kvm_gmem_release on the last)."""
        return self.fd_open or self.map_open


class GmemMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.hosts = [gmem.Host(platform="none", sw_protected=False, memory_attributes=False,
                                kernel=kernel.model_kernel())]          # the rules of the kernel compared
        if KERNEL:
            self.hosts.append(kernel.Host())
        self.vms = [h.create_vm(0) for h in self.hosts]
        self.files = []          # (ShadowFile, [GuestMemfd per host], [Mapping or None per host])
        self.slots = {}          # slot id -> (gpa page, npages, file index)

    # ------------------------------------------------------------------ helpers
    def both(self, fn):
        """fn(i) on every host; all outcomes must agree. Returns the outcome."""
        results = [outcome(lambda i=i: fn(i)) for i in range(len(self.hosts))]
        assert all(r == results[0] for r in results), f"model vs kernel: {results}"
        return results[0]

    def file(self, k):
        return self.files[k % len(self.files)]

    def release_if_dead(self, sf):
        if not sf.alive:
            sf.bindings.clear()          # kvm_gmem_release: bindings go, slots stay (dead)

    # -------------------------------------------------------------------- rules
    @initialize()
    def first_file(self):
        self.create(4)

    @precondition(lambda self: len(self.files) < 4)
    @rule(npages=st.integers(1, 4))
    def create(self, npages):
        objs = [None] * len(self.hosts)

        def mk(i):
            objs[i] = self.vms[i].create_guest_memfd(npages * PS, FLAGS)
        assert self.both(mk) == ("ok", None)
        sf, maps = ShadowFile(npages), [None] * len(self.hosts)
        # every file is mapped at once, one page past i_size, so all contents stay readable
        assert self.both(lambda i: maps.__setitem__(i, objs[i].mmap((npages + 1) * PS))) == ("ok", None)
        sf.map_open = True
        self.files.append((sf, objs, maps))

    @rule(k=st.integers(0, 3), first=st.integers(0, 5), n=st.integers(0, 3), punch=st.booleans())
    def fallocate(self, k, first, n, punch):
        sf, objs, _ = self.file(k)
        mode = uapi.FALLOC_FL_KEEP_SIZE | (uapi.FALLOC_FL_PUNCH_HOLE if punch else 0)
        got = self.both(lambda i: objs[i].fallocate(mode, first * PS, n * PS))
        if not sf.fd_open:
            want = ("err", "EBADF")
        elif n == 0:
            want = ("err", "EINVAL")                          # vfs_fallocate: len <= 0
        elif punch:
            want = ("ok", None)                               # no EOF check
            a, b = min(first * PS, sf.size), min((first + n) * PS, sf.size)
            sf.data[a:b] = bytes(b - a)
        else:
            want = ("ok", None) if (first + n) * PS <= sf.size else ("err", "EINVAL")
        assert got == want

    @rule(k=st.integers(0, 3), start=st.integers(0, 5 * PS - 1), length=st.integers(1, 2 * PS),
          value=st.integers(1, 255))
    def write(self, k, start, length, value):
        sf, objs, maps = self.file(k)
        if not sf.map_open:
            return
        maplen = sf.size + PS
        end = min(start + length, maplen)
        start = min(start, end - 1)
        got = self.both(lambda i: maps[i].__setitem__(slice(start, end), bytes([value]) * (end - start)))
        if end <= sf.size:
            want = ("ok", None)
        else:
            want = ("SIGBUS", max(start, sf.size))            # stops at i_size, bytes before written
        if start < sf.size:
            e = min(end, sf.size)
            sf.data[start:e] = bytes([value]) * (e - start)
        assert got == want

    @rule(k=st.integers(0, 3), start=st.integers(0, 5 * PS - 1), length=st.integers(1, 2 * PS))
    def read(self, k, start, length):
        sf, objs, maps = self.file(k)
        if not sf.map_open:
            return
        end = min(start + length, sf.size + PS)
        start = min(start, end - 1)
        want = ("ok", bytes(sf.data[start:end])) if end <= sf.size else ("SIGBUS", max(start, sf.size))
        assert self.both(lambda i: maps[i][start:end]) == want

    @rule(k=st.integers(0, 3))
    def munmap(self, k):
        sf, _, maps = self.file(k)
        if sf.map_open:
            assert self.both(lambda i: maps[i].close()) == ("ok", None)
            sf.map_open = False
            self.release_if_dead(sf)

    @rule(k=st.integers(0, 3), unmap=st.booleans())
    def close(self, k, unmap):
        sf, objs, maps = self.file(k)
        assert self.both(lambda i: objs[i].close()) == ("ok", None)
        sf.fd_open = False
        if unmap and sf.map_open:
            assert self.both(lambda i: maps[i].close()) == ("ok", None)
            sf.map_open = False
        self.release_if_dead(sf)

    @rule(slot=st.integers(0, 2), gpa=st.sampled_from([0, 2, 4, 6, 8]), npages=st.integers(1, 2),
          k=st.integers(0, 3), offset=st.integers(0, 3))
    def bind(self, slot, gpa, npages, k, offset):
        fi = k % len(self.files)
        sf, objs, _ = self.files[fi]
        got = self.both(lambda i: self.vms[i].set_user_memory_region2(
            slot, GMEM, GPA_BASE + gpa * PS, npages * PS, 0, objs[i], offset * PS))
        # __kvm_set_memory_region: a gmem slot cannot be modified; GPA overlap; then kvm_gmem_bind
        if slot in self.slots:
            want = ("err", "EINVAL")
        elif any(g < gpa + npages and gpa < g + n for g, n, _ in self.slots.values()):
            want = ("err", "EEXIST")
        elif not sf.fd_open:
            want = ("err", "EBADF")
        elif (offset + npages) * PS > sf.size:
            want = ("err", "EINVAL")
        elif any(o < offset + npages and offset < o + n for o, n in sf.bindings.values()):
            # kvm_gmem_bind: -EEXIST since 7.2, -EINVAL before
            want = ("err", "EEXIST" if kernel.model_kernel() == "7.2" else "EINVAL")
        else:
            want = ("ok", None)
            self.slots[slot] = (gpa, npages, fi)
            sf.bindings[slot] = (offset, npages)
        assert got == want

    @rule(slot=st.integers(0, 2))
    def unbind(self, slot):
        got = self.both(lambda i: self.vms[i].set_user_memory_region2(slot, GMEM, GPA_BASE, 0, 0, -1, 0))
        if slot in self.slots:
            want = ("ok", None)
            _, _, fi = self.slots.pop(slot)
            self.files[fi][0].bindings.pop(slot, None)
        else:
            want = ("err", "EINVAL")
        assert got == want

    # -------------------------------------------------------------- invariants
    @invariant()
    def model_consistent(self):
        self.hosts[0].check()

    @invariant()
    def contents(self):
        """All readable contents: every file still mapped reads as the shadow says, on both hosts."""
        for sf, _, maps in self.files:
            if sf.map_open:
                assert self.both(lambda i: maps[i][0:sf.size]) == ("ok", bytes(sf.data))

    @invariant()
    def model_bindings(self):
        """The model's memslots: every slot still there, bound iff its file lives."""
        slots = {s["slot"]: s for s in self.vms[0].memslots()}
        assert set(slots) == set(self.slots)
        for sid, (gpa, npages, fi) in self.slots.items():
            s = slots[sid]
            assert (s["guest_phys_addr"], s["memory_size"]) == (GPA_BASE + gpa * PS, npages * PS)
            assert s["bound"] == self.files[fi][0].alive

    def teardown(self):
        for sf, objs, maps in self.files:
            for obj in maps + objs:
                if obj is not None:
                    obj.close()
        for vm in self.vms:
            vm.close()
        self.hosts[0].check()
        if KERNEL:
            self.hosts[1].close()


TestGmemMachine = GmemMachine.TestCase
# max_examples and deadline come from the profile loaded in tests/conftest.py; few steps each
TestGmemMachine.settings = settings(stateful_step_count=20)
