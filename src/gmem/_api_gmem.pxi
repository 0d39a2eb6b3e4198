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


@cython.final
cdef class Mapping:
    """A MAP_SHARED mapping of a guest_memfd. m[a:b] reads, m[a:b] = data writes; an access
    the kernel answers with SIGBUS (kvm_gmem_fault_user_mapping) raises gmem.SigBus."""
    cdef gmem_file *f                # NULL once unmapped
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
        m.f = file.f
        kvm_gmem_get_file(m.f)              # a VMA holds a file reference
        return m

    def __dealloc__(self):
        if self.f != NULL:
            _teardown_put_file(self.f)

    @property
    def closed(self):
        return self.f == NULL

    def __len__(self):
        return self.length

    def close(self):
        """munmap."""
        held = _host_enter(self.file.vm.host)
        cdef gmem_file *f = self.f
        if f != NULL:
            _refuse_in_hook(self.file.vm.host, "munmap")
            self.f = NULL
            kvm_gmem_put_file(f)
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
        cdef int r = kvm_gmem_fault_user_mapping(self.f, (self.offset + pos) >> 12, write, &p)
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
