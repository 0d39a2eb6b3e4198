"""gmem exec, hybrid mode: the memslots of the real (plain) VM behind each model VM.

The host's KVM executes the guest; the model decides what memory the guest reaches. A model
memslot is mirrored in one of two ways:

* **as is** (an "identity" slot, same slot id): a plain memslot of a VM without private
  memory. The host's KVM has the kernel's own semantics for it, moves and dirty logging
  included, and the model is not asked about its faults.
* **governed**: every memslot of a VM with private memory (SW_PROTECTED; SNP and TDX guests
  do not run on a plain host) and every guest_memfd memslot. Its gfns are cut into runs of
  one *kind*, each run a real memslot ("piece") with an id of our own:

    USER  the program's shared memory at userspace_addr (attribute shared, not gmem-only):
          mapped from the start, as the host's KVM would map it on the first access;
    GMEM  guest_memfd pages the model's fault path mapped (an SPTE): private pages, and
          shared ones of a gmem-only slot; the real memslot points into the memfd that holds
          the inode's contents (Host(content_memfd=True));
    NONE  anything else: no real memslot, so the guest's access leaves the real VM as an MMIO
          exit, which the preload library turns into a model fault.

After every model operation the kinds are recomputed from the model's attributes and SPTEs
(gmem.page_states) and only the pieces that changed are deleted and created, deletions first,
so a conversion or punch removes the memory from the real VM before the program's call
returns.
"""
import numpy as np

from gmem import _core, uapi
from gmem._exec.proto import ACT_SLOT_DEL, ACT_SLOT_SET, act

NONE, USER, GMEM = 0, 1, 2
_MAX_SLOT_ID = uapi.KVM_USER_MEM_SLOTS - 1
_REAL_FLAGS = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
_CHUNK = 1 << 24            # pages per gmem.page_states call


class GovernedSlot:
    """A model memslot the model governs: its pieces in the real VM."""

    __slots__ = ("slot", "flags", "gpa", "size", "uaddr", "gmem", "gmem_off", "gmem_only", "pieces")

    def __init__(self, d, gmem):
        self.slot = d["slot"]
        self.flags = d["flags"]
        self.gpa = d["guest_phys_addr"]
        self.size = d["memory_size"]
        self.uaddr = d["userspace_addr"]
        self.gmem = gmem                   # the GFile bound at creation, or None
        self.gmem_off = d["guest_memfd_offset"]
        # kvm_gmem_bind (6.18): a file with GUEST_MEMFD_FLAG_MMAP makes the slot gmem-only,
        # shared faults then come from the file too
        self.gmem_only = gmem is not None and bool(gmem.flags & uapi.GUEST_MEMFD_FLAG_MMAP)
        self.pieces = {}                   # (first page, pages, kind) -> real slot id

    def kinds(self, vm):
        """NONE/USER/GMEM for every page, from the model's attributes and SPTEs."""
        n = self.size >> 12
        out = np.empty(n, np.uint8)
        shared_default = USER if self.uaddr and not self.gmem_only else NONE
        for off in range(0, n, _CHUNK):
            k = min(n - off, _CHUNK)
            ps = _core.page_states(vm, self.gpa + (off << 12), k << 12)
            mapped = ps["level"] > 0
            shared = np.full(k, shared_default, np.uint8)
            if self.gmem_only:
                shared[mapped] = GMEM
            private = np.where(mapped, GMEM, NONE).astype(np.uint8) if self.gmem is not None \
                else np.zeros(k, np.uint8)
            out[off:off + k] = np.where(ps["private"] != 0, private, shared)
        return out


def _runs(kinds):
    """(first page, pages, kind) of each maximal run of one kind other than NONE."""
    if not len(kinds):
        return []
    cut = np.flatnonzero(np.diff(kinds)) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [len(kinds)]))
    return [(int(a), int(b - a), int(kinds[a])) for a, b in zip(starts, ends) if kinds[a] != NONE]


class RealVm:
    """The real VM of one model VM: identity slots and governed slots' pieces."""

    def __init__(self, vm_id, vm):
        self.id = vm_id
        self.vm = vm
        self.governed = {}          # model slot id -> GovernedSlot
        self.identity = set()       # model slot ids mirrored as is
        self.used = {}              # real slot id -> model slot id (identity) or None (piece)

    @property
    def governs(self):
        return self.vm.has_private_mem or bool(self.governed)

    def _governed(self, d):
        return self.vm.has_private_mem or bool(d["flags"] & uapi.KVM_MEM_GUEST_MEMFD)

    def _alloc(self):
        for i in range(_MAX_SLOT_ID, -1, -1):
            if i not in self.used:
                self.used[i] = None
                return i
        raise OSError(28, "no real memslot id left")    # ENOSPC: never with KVM's 32764

    def _set(self, real_id, flags, gpa, size, backing, e):
        return act(ACT_SLOT_SET, self.id, backing, real_id, flags, gpa, size, e)

    def _piece(self, s, start, n, kind, real_id):
        gpa = s.gpa + (start << 12)
        if kind == USER:
            return self._set(real_id, s.flags & _REAL_FLAGS, gpa, n << 12, 0, s.uaddr + (start << 12))
        return self._set(real_id, s.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES, gpa, n << 12,
                         s.gmem.ino, s.gmem_off + (start << 12))

    def _claim(self, slot_id, acts):
        """The identity slot slot_id needs its real id: move a piece that holds it."""
        if slot_id in self.used and self.used[slot_id] is None:
            for s in self.governed.values():
                for key, rid in s.pieces.items():
                    if rid == slot_id:
                        new = self._alloc()
                        acts.append(act(ACT_SLOT_DEL, self.id, 0, rid))
                        acts.append(self._piece(s, *key, new))
                        s.pieces[key] = new
        self.used[slot_id] = slot_id

    def memslot_changed(self, d, gmem):
        """The model accepted KVM_SET_USER_MEMORY_REGION(2) as d (slot, flags, guest_phys_addr,
        memory_size, userspace_addr, guest_memfd_offset: what the slot is now, a memory_size of
        0 for a deletion; a move or flags change keeps the rest, __kvm_set_memory_region
        refuses anything else). gmem: the GFile a new guest_memfd slot binds. The actions."""
        acts = []
        slot_id = d["slot"]
        if not d["memory_size"]:
            d = None
        old = self.governed.pop(slot_id, None)
        if old is not None:
            for rid in old.pieces.values():
                acts.append(act(ACT_SLOT_DEL, self.id, 0, rid))
                del self.used[rid]
            if d is not None and gmem is None:
                gmem = old.gmem            # a move or a flags change keeps the binding
        if d is not None and self._governed(d):
            self.governed[slot_id] = GovernedSlot(d, gmem)
            acts += self.refresh(only=slot_id)
        elif d is not None or slot_id in self.identity:
            # as the program asked, so the host's KVM moves or deletes it its own way
            if d is None:
                self.identity.discard(slot_id)
                self.used.pop(slot_id, None)
                acts.append(self._set(slot_id, 0, 0, 0, 0, 0))
            else:
                self._claim(slot_id, acts)
                self.identity.add(slot_id)
                acts.append(self._set(slot_id, d["flags"] & _REAL_FLAGS, d["guest_phys_addr"],
                                      d["memory_size"], 0, d["userspace_addr"]))
        return acts

    def refresh(self, only=None):
        """Recompute the pieces of the governed slots (or of one): the actions that change them."""
        dels, sets = [], []
        if self.vm.destroyed:
            return []
        for sid, s in self.governed.items():
            if only is not None and sid != only:
                continue
            want = set(_runs(s.kinds(self.vm)))
            for key in [k for k in s.pieces if k not in want]:
                rid = s.pieces.pop(key)
                dels.append(act(ACT_SLOT_DEL, self.id, 0, rid))
                del self.used[rid]
            for key in sorted(want - s.pieces.keys()):
                rid = self._alloc()
                s.pieces[key] = rid
                sets.append(self._piece(s, *key, rid))
        return dels + sets

    def slot_of(self, gpa):
        for s in self.governed.values():
            if s.gpa <= gpa < s.gpa + s.size:
                return s
        return None
