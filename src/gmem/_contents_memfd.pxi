# gmem exec: guest_memfd contents in a memfd, so that another process maps the same bytes.
#
# With Host(content_memfd=True) every guest_memfd inode keeps its page contents in a
# memfd of its size (the inode's page cache, as it were) instead of the host's page_data
# table: `gmem exec` hands that memfd to the program under test, which mmaps it, and the
# model's own accesses (guest reads and writes, zeroing before prepare, scrambling on
# conversion, SNP/TDX population) go to the same bytes.  Dropping contents punches the
# memfd, so what the model frees reads back as zeros everywhere, as a freed and
# reallocated folio does in the kernel.
#
# This is the one place of the core that knows about memfds: page_data_get() and
# page_data_drop() (_host.pxi) ask gmem_contents_page() / gmem_contents_drop()
# first, and kvm_gmem_create / kvm_gmem_evict_inode create and release the memfd
# (gmem_contents_init/_release).

from posix.mman cimport mmap, munmap, madvise, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.unistd cimport close, ftruncate
from posix.types cimport off_t

cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    enum: MFD_CLOEXEC
    enum: MAP_NORESERVE
    enum: MADV_REMOVE

cdef extern from "<unistd.h>" nogil:
    off_t lseek(int fd, off_t offset, int whence)
    enum: SEEK_DATA
    enum: SEEK_HOLE

cdef extern from "<errno.h>" nogil:
    int errno "errno"


cdef int gmem_contents_init(gmem_inode *inode) noexcept nogil:
    """A memfd of i_size for the inode's contents, mapped here: 0 or -errno."""
    cdef uint64_t old
    cdef void *p
    inode.memfd = -1
    if not inode.host.content_memfd:
        return 0
    inode.memfd = memfd_create(b"gmem", MFD_CLOEXEC)
    if inode.memfd < 0:
        return -errno
    if ftruncate(inode.memfd, <off_t>inode.size) < 0:
        return -gmem_contents_fail(inode)
    p = mmap(NULL, inode.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, inode.memfd, 0)
    if p == MAP_FAILED:
        return -gmem_contents_fail(inode)
    inode.contents = <unsigned char *>p
    if xa_store_order(&inode.host.content_inodes, inode.ino, 0, <uint64_t><size_t>inode, &old) < 0:
        munmap(p, inode.size)
        inode.contents = NULL
        close(inode.memfd)
        inode.memfd = -1
        return -ENOMEM
    return 0


cdef int gmem_contents_fail(gmem_inode *inode) noexcept nogil:
    cdef int e = errno
    close(inode.memfd)
    inode.memfd = -1
    return e


cdef void gmem_contents_release(gmem_inode *inode) noexcept nogil:
    """After the inode's folios are gone: forget its memfd."""
    cdef uint64_t old
    if inode.contents != NULL:
        xa_erase(&inode.host.content_inodes, inode.ino, &old)
        munmap(inode.contents, inode.size)
        inode.contents = NULL
    if inode.memfd >= 0:
        close(inode.memfd)
        inode.memfd = -1


cdef inline gmem_inode *_contents_inode(gmem_host *host, uint64_t pfn, uint64_t *pgoff) noexcept nogil:
    """The memfd-backed inode whose folio holds pfn (and pfn's page index in it), or NULL."""
    cdef uint64_t id, v
    cdef folio *f
    if not xa_load(&host.pm.memmap, pfn, &id):
        return NULL
    f = folio_get(&host.pm, <uint32_t>id)
    if f.mapping == 0 or not xa_load(&host.content_inodes, f.mapping, &v):
        return NULL
    pgoff[0] = f.index + (pfn - f.pfn)
    return <gmem_inode *><size_t>v


cdef unsigned char *gmem_contents_page(gmem_host *host, uint64_t pfn) noexcept nogil:
    """pfn's page in its inode's memfd, or NULL when pfn is no memfd-backed gmem page."""
    cdef uint64_t pgoff
    cdef gmem_inode *inode = _contents_inode(host, pfn, &pgoff)
    if inode == NULL or (pgoff << 12) >= inode.size:
        return NULL
    return inode.contents + (pgoff << 12)


cdef uint64_t gmem_contents_drop(gmem_host *host, uint64_t pfn, uint64_t n) noexcept nogil:
    """Punch the memfd pages of [pfn, pfn + n) that are gmem pages (they read as zeros again,
    here and in every process mapping the memfd); returns how many pages were such."""
    cdef uint64_t i, pgoff, done = 0
    cdef gmem_inode *inode
    for i in range(n):
        inode = _contents_inode(host, pfn + i, &pgoff)
        if inode != NULL and (pgoff << 12) < inode.size:
            madvise(inode.contents + (pgoff << 12), 4096, MADV_REMOVE)
            done += 1
    return done


cdef int64_t gmem_contents_sync(gmem_inode *inode) noexcept nogil:
    """Pages another process wrote through its own mapping of the memfd, which the model did
    not see fault: give each a folio, marked uptodate without clearing it, as
    kvm_gmem_fault_user_mapping() did when that process first touched it (6.18). Returns the
    pages faulted in, or -ENOMEM."""
    cdef off_t pos = 0, end
    cdef uint64_t idx, v
    cdef uint32_t id
    cdef int64_t n = 0
    cdef xa_state xas
    if inode.memfd < 0:
        return 0
    xas_init(&xas, &inode.filemap, 0)
    while <uint64_t>pos < inode.size:
        pos = lseek(inode.memfd, pos, SEEK_DATA)
        if pos < 0:
            break                       # ENXIO: no data after pos
        end = lseek(inode.memfd, pos, SEEK_HOLE)
        if end < 0:
            end = <off_t>inode.size
        for idx in range(<uint64_t>pos >> 12, (<uint64_t>end + 4095) >> 12):
            if xa_load(&inode.filemap, idx, &v):
                continue
            if kvm_gmem_get_folio(inode, &xas, idx, &id) < 0:
                return -ENOMEM
            folio_get(&inode.host.pm, id).flags |= PG_uptodate
            n += 1
        pos = end
    return n


cdef int gmem_contents_memfd(const gmem_file *file) noexcept nogil:
    return file.inode.memfd
