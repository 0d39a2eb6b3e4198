# gmem.GuestMemfd and gmem.Mapping: a guest_memfd fd and a MAP_SHARED mapping of one. Each
# holds one reference to the C struct gmem_file while open (fget/fput); the last close
# releases the file (kvm_gmem_release), the last file the inode.

@cython.final
cdef class GuestMemfd:
    """A guest_memfd file descriptor (KVM_CREATE_GUEST_MEMFD)."""
    cdef gmem_file *f                # NULL once closed
    cdef readonly int fd
    cdef readonly Vm vm
    cdef readonly uint64_t size
    cdef readonly uint64_t flags
    cdef readonly uint32_t ino

    def __cinit__(self, _wrap=None):
        if _wrap is not _HANDLE:
            raise TypeError("guest_memfds come from Vm.create_guest_memfd(), link_guest_memfd() or dup()")

    @staticmethod
    cdef GuestMemfd _new(Vm vm, gmem_file *f):
        """A new fd on f, holding the reference the caller got."""
        cdef GuestMemfd g = GuestMemfd.__new__(GuestMemfd, _HANDLE)
        g.f, g.vm = f, vm
        g.size, g.flags, g.ino = f.inode.size, f.inode.flags, f.inode.ino
        g.fd = vm.host._install_fd(g)
        return g

    def __dealloc__(self):
        if self.f != NULL:
            _teardown_put_file(self.f)    # a process exiting closes its fds

    @property
    def closed(self):
        return self.f == NULL

    @property
    def memfd(self):
        """Host(content_memfd=True): the memfd holding this inode's contents (owned by the
        inode: dup it to keep it), else -1 (also once this fd is closed)."""
        return gmem_contents_memfd(self.f) if self.f != NULL else -1

    def sync_memfd(self):
        """Host(content_memfd=True): fault in, as kvm_gmem_fault_user_mapping() would have,
        every page another process wrote through its own mapping of the memfd; the number."""
        held = _host_enter(self.vm.host)
        cdef int64_t n = gmem_contents_sync(self._open("sync_memfd").inode)
        if n < 0:
            raise MemoryError("out of memory faulting in guest_memfd pages (VM_FAULT_OOM)")
        return n

    cdef gmem_file *_open(self, str what) except NULL:
        if self.f == NULL:
            raise _err(EBADF, f"{what}: guest_memfd fd is closed")
        return self.f

    def close(self):
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self.f
        if f == NULL:
            return
        _refuse_in_hook(self.vm.host, "close(guest_memfd)")
        self.f = NULL
        self.vm.host._close_fd(self.fd)
        kvm_gmem_put_file(f)
        self.vm.host._raise_hook_exc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def dup(self):
        """dup(2): a new fd on the same file."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("dup")
        kvm_gmem_get_file(f)
        return GuestMemfd._new(self.vm, f)

    def fstat(self):
        """st_size, st_blksize, st_mode (S_IFREG | 0600), st_ino, st_blocks (always 0)."""
        self._open("fstat")
        return dict(st_size=self.size, st_blksize=4096, st_mode=0o100600, st_ino=self.ino, st_blocks=0)

    # file operations gmem does not have: the VFS answers
    cdef _vfs(self, str what, int op, uint64_t arg):
        held = _host_enter(self.vm.host)
        self.vm.host._check(kvm_gmem_vfs_op(self._open(what), op, arg), what)

    def read(self, n=-1):
        self._vfs("read", GMEM_VFS_READ, 0)

    def write(self, data):
        self._vfs("write", GMEM_VFS_WRITE, 0)

    def pread(self, n, offset):
        self._vfs("pread", GMEM_VFS_PREAD, _u64_wrap(offset, "offset"))

    def pwrite(self, data, offset):
        self._vfs("pwrite", GMEM_VFS_PWRITE, _u64_wrap(offset, "offset"))

    def lseek(self, offset, whence=0):
        self._vfs("lseek", GMEM_VFS_LSEEK, 0)

    def ftruncate(self, length):
        self._vfs("ftruncate", GMEM_VFS_FTRUNCATE, _u64_wrap(length, "length"))

    def fallocate(self, mode, offset, length):
        """fallocate(2): vfs_fallocate's checks, then kvm_gmem_fallocate's."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("fallocate")
        _refuse_in_hook(self.vm.host, "fallocate")
        cdef uint64_t m = _u32_wrap(mode, "mode"), off = _u64_wrap(offset, "offset")
        cdef uint64_t ln = _u64_wrap(length, "length")
        self.vm.host._check(kvm_gmem_fallocate(f, m, off, ln), "fallocate")

    def allocate(self, offset, length):
        """fallocate(FALLOC_FL_KEEP_SIZE)."""
        self.fallocate(FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset, length):
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
        self.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def mmap(self, length, offset=0, prot=PROT_READ | PROT_WRITE, flags=MAP_SHARED):
        """mmap(2): do_mmap's checks, then kvm_gmem_mmap's (6.18)."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("mmap")
        cdef uint64_t ln = _u64_wrap(length, "length"), off = _u64_wrap(offset, "offset")
        cdef uint32_t p = _u32_wrap(prot, "prot"), fl = _u32_wrap(flags, "flags")
        self.vm.host._check(kvm_gmem_mmap(f, ln, off, p, fl), "mmap")
        return Mapping._new(self, ln, off, p)

    def set_memory_attributes(self, offset, size, attributes, flags=0):
        """KVM_SET_MEMORY_ATTRIBUTES2 on this fd ("next", in-place conversion). Refused with
        OSError whose .error_offset is what the kernel writes back: for EAGAIN the first page
        still referenced (a pin or reference) after the range was unmapped."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("KVM_SET_MEMORY_ATTRIBUTES2")
        _refuse_in_hook(self.vm.host, "KVM_SET_MEMORY_ATTRIBUTES2")
        cdef kvm_memory_attributes2 a
        memset(&a, 0, sizeof(a))
        a.offset, a.size = _u64_wrap(offset, "offset"), _u64_wrap(size, "size")
        a.attributes, a.flags = _u64_wrap(attributes, "attributes"), _u64_wrap(flags, "flags")
        cdef int r = kvm_gmem_set_attributes(f, &a)
        self.vm.host._raise_hook_exc()
        if r < 0:
            e = _err(-r, f"KVM_SET_MEMORY_ATTRIBUTES2: {_reason(self.vm.host.h)}")
            e.error_offset = a.error_offset
            raise e

    def folios(self):
        """The file's folios in index order: (index, order, pfn) each (the page cache as
        /proc/kpageflags would show it; huge folios and what restructuring made of them)."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("folios")
        cdef uint64_t start = 0, index, pfn
        cdef int order
        out = []
        while kvm_gmem_next_folio(f.inode, &start, &index, &order, &pfn):
            out.append((index, order, pfn))
        return out

    def get_policy(self, offset):
        """The NUMA policy of the page at offset, as get_mempolicy(MPOL_F_ADDR) on a mapping of
        it reports: (mode, nodes), (MPOL_DEFAULT, ()) where mbind set none (6.19+; before,
        guest_memfd keeps no policy)."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("get_policy")
        cdef uint64_t off = _u64(offset, "offset")
        if off >= self.size:
            raise _err(EINVAL, f"offset {off:#x} is past i_size")
        cdef uint64_t pol = kvm_gmem_get_policy(f.inode, off >> 12)
        return (<int>(pol >> 32), tuple(n for n in range(GMEM_MAX_NUMNODES) if (pol >> n) & 1))

    def get_memory_attributes(self, offset):
        """The attributes of the page at offset in this guest_memfd's own attributes (the
        maple tree kept while in-place conversion is on; no ioctl reads them)."""
        held = _host_enter(self.vm.host)
        cdef gmem_file *f = self._open("get_memory_attributes")
        cdef uint64_t off = _u64(offset, "offset")
        if off >= self.size:
            raise _err(EINVAL, f"offset {off:#x} is past i_size")
        cdef uint64_t attrs = 0
        self.vm.host._check(kvm_gmem_get_attributes(f, off >> 12, &attrs), "get_memory_attributes")
        return attrs


@cython.final
cdef class Mapping:
    """A MAP_SHARED mapping of a guest_memfd. m[a:b] reads, m[a:b] = data writes; an access
    the kernel answers with SIGBUS (kvm_gmem_fault_user_mapping) raises gmem.SigBus.
    m.pin(offset, length) takes GUP references on its pages (gmem.Pin)."""
    cdef gmem_file *f                # NULL once unmapped
    cdef gmem_vma *vma               # the VMA: the pages it has PTEs for
    cdef GuestMemfd file             # the fd it was mapped from
    cdef readonly uint64_t length
    cdef readonly uint64_t offset
    cdef readonly uint32_t prot

    def __cinit__(self, _wrap=None):
        if _wrap is not _HANDLE:
            raise TypeError("mappings come from GuestMemfd.mmap()")

    @staticmethod
    cdef Mapping _new(GuestMemfd file, uint64_t length, uint64_t offset, uint32_t prot):
        cdef Mapping m = Mapping.__new__(Mapping, _HANDLE)
        m.file, m.length, m.offset, m.prot = file, length, offset, prot
        m.vma = kvm_gmem_vma_create(file.f, offset >> 12, (length + 4095) >> 12)  # holds the file
        if m.vma == NULL:
            raise MemoryError("mmap: out of memory")
        m.f = file.f
        return m

    def __dealloc__(self):
        if self.vma != NULL:
            _teardown(self.f.inode.host, <void *>self.vma, _TEARDOWN_VMA)

    @property
    def closed(self):
        return self.f == NULL

    def __len__(self):
        return self.length

    def close(self):
        """munmap."""
        held = _host_enter(self.file.vm.host)
        cdef gmem_vma *vma = self.vma
        if vma != NULL:
            _refuse_in_hook(self.file.vm.host, "munmap")
            self.f, self.vma = NULL, NULL
            kvm_gmem_vma_close(vma)
            self.file.vm.host._raise_hook_exc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef tuple _range(self, key):
        if self.f == NULL:
            raise ValueError("mapping is closed")
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                raise ValueError("only contiguous slices")
            return start, max(start, stop)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key)
            if i < 0:
                i += self.length
            if not 0 <= i < self.length:
                raise IndexError("mapping index out of range")
            return i, i + 1
        raise TypeError("mapping indices must be integers or slices")

    cdef unsigned char *_fault(self, uint64_t pos, bint write) except NULL:
        """kvm_gmem_fault_user_mapping for the page holding byte pos of the mapping."""
        cdef unsigned char *p = NULL
        cdef int r = kvm_gmem_vma_fault(self.vma, (self.offset + pos) >> 12, write, &p)
        if r > 0:
            e = _SigBus(f"SIGBUS: {_reason(self.file.vm.host.h)} (page {(self.offset + pos) >> 12})", pos)
            e.offset = pos          # the first byte of the mapping that faulted, as gmem.kernel sets it
            raise e
        if r < 0:
            raise MemoryError(_reason(self.file.vm.host.h))
        return p if p != NULL else <unsigned char *>_ZERO_PAGE

    def __getitem__(self, key):
        held = _host_enter(self.file.vm.host)
        cdef uint64_t a, b, pos, n
        cdef unsigned char *p
        a, b = self._range(key)
        if not self.prot & PROT_READ:
            raise _err(EACCES, "read of a mapping without PROT_READ (SIGSEGV)")
        out = bytearray(b - a)
        cdef unsigned char[::1] o = out if b > a else None
        pos = a
        while pos < b:
            n = min(b - pos, 4096 - ((self.offset + pos) & 4095))
            p = self._fault(pos, False)
            memcpy(&o[pos - a], p + ((self.offset + pos) & 4095), n)
            pos += n
        return bytes(out) if isinstance(key, slice) else out[0]

    def __setitem__(self, key, value):
        held = _host_enter(self.file.vm.host)
        cdef uint64_t a, b, pos, n
        cdef unsigned char *p
        a, b = self._range(key)
        if not self.prot & PROT_WRITE:
            raise _err(EACCES, "write to a mapping without PROT_WRITE (SIGSEGV)")
        data = bytes([value]) if isinstance(value, (int, np.integer)) else bytes(value)
        if len(data) != b - a:
            raise ValueError(f"{len(data)} bytes for a {b - a}-byte slice")
        cdef const unsigned char[::1] d = data if data else None
        pos = a
        while pos < b:
            n = min(b - pos, 4096 - ((self.offset + pos) & 4095))
            p = self._fault(pos, True)
            memcpy(p + ((self.offset + pos) & 4095), &d[pos - a], n)
            pos += n

    def mbind(self, mode, nodes=()):
        """mbind(2) over the whole mapping: the inode's shared policy for those pages (mode
        from uapi.MPOL_*, nodes an iterable of node numbers), used when their folios are
        allocated; folios already there stay (kvm_gmem_set_policy, 6.19+). EINVAL as
        do_mbind refuses; before 6.19 it succeeds and guest_memfd ignores it."""
        held = _host_enter(self.file.vm.host)
        cdef Host host = self.file.vm.host
        cdef int m = _c_int_arg(mode, "mode")
        cdef uint64_t mask = 0, pol = 0
        if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__iter__"):
            raise TypeError("nodes must be an iterable of node numbers")
        for n in nodes:
            k = _int_arg(n, "node", 0, 1 << 30)
            if k >= GMEM_MAX_NUMNODES:
                raise _err(EINVAL, f"mbind: node {k} is beyond MAX_NUMNODES")
            mask |= (<uint64_t>1) << k
        if self.vma == NULL:
            raise _err(EFAULT, "mbind: the range is not mapped (the mapping is closed)")
        host._check(mpol_new(host.h, m, mask, &pol), "mbind")
        host._check(kvm_gmem_set_policy(self.f.inode, self.offset >> 12, self.length >> 12, pol), "mbind")

    def pin(self, offset, length, *, longterm=True):
        """GUP on [offset, offset + length) of the mapping, as a DMA/VFIO pin takes it:
        pin_user_pages(FOLL_LONGTERM | FOLL_WRITE) (longterm=True) or a plain get_user_pages
        reference (longterm=False, a transient reference). Every page is faulted in for write; a
        page the fault refuses (private, beyond i_size) fails the whole call with EFAULT. The
        references hold the folios (a punched page lives on until released) and keep the file
        open: pin.release(), or use the pin as a context manager."""
        held = _host_enter(self.file.vm.host)
        cdef uint64_t off = _u64(offset, "offset"), ln = _u64(length, "length")
        cdef gmem_pin *p = NULL
        if self.vma == NULL:
            raise ValueError("mapping is closed")
        if not self.prot & PROT_WRITE:
            raise _err(EFAULT, "GUP for write on a mapping without PROT_WRITE")
        if ln == 0 or off + ln > self.length or off + ln < off:
            raise _err(EFAULT, f"[{off:#x}, +{ln:#x}) is not inside the mapping")
        cdef uint64_t first = (self.offset + off) >> 12
        cdef uint64_t last = (self.offset + off + ln - 1) >> 12
        self.file.vm.host._check(kvm_gmem_pin(self.vma, first, last - first + 1, bool(longterm), &p), "GUP")
        return Pin._new(self.file.vm.host, p, off, ln)


@cython.final
cdef class Pin:
    """GUP references on a mapping's pages (Mapping.pin): held until release()."""
    cdef gmem_pin *p                 # NULL once released
    cdef Host host
    cdef readonly uint64_t offset    # in the mapping, as pinned
    cdef readonly uint64_t length
    cdef readonly bint longterm

    def __cinit__(self, _wrap=None):
        if _wrap is not _HANDLE:
            raise TypeError("pins come from Mapping.pin()")

    @staticmethod
    cdef Pin _new(Host host, gmem_pin *p, uint64_t offset, uint64_t length):
        cdef Pin pin = Pin.__new__(Pin, _HANDLE)
        pin.p, pin.host, pin.offset, pin.length, pin.longterm = p, host, offset, length, p.longterm
        return pin

    def __dealloc__(self):
        if self.p != NULL:
            _teardown(self.host.h, <void *>self.p, _TEARDOWN_PIN)

    @property
    def released(self):
        return self.p == NULL

    def release(self):
        """unpin_user_pages / put_page (a second release does nothing)."""
        held = _host_enter(self.host)
        cdef gmem_pin *p = self.p
        if p != NULL:
            _refuse_in_hook(self.host, "unpin")
            self.p = NULL
            kvm_gmem_unpin(p, True)
            self.host._raise_hook_exc()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
