# mm/slab.c, for the model's own memory (not the simulated host's: xarray nodes, the folio
# table and page tables take no simulated pfn). A random fault stream over a big guest
# touches a few of these objects per fault, each on a different page: from malloc's 4 KiB
# pages every one is a TLB miss, a page walk a fault pays even when its cache lines were
# prefetched (measured over 4 GiB: random slow-path faults 106-110 -> 88-94 ns, cold
# 135 -> 128; benchmarks/README.md). So they come from 2 MiB chunks the OS backs with
# transparent huge pages: page tables through the host's gmem_page_pool (_host.pxi), xarray
# nodes and folio-table chunks through the caches below. A freed chunk of page tables is
# kept, zeroed, for the next host (process-wide, up to 32): a new guest does not pay the
# OS's page faults again.
#
# The caches (kmem_cache_alloc/kmem_cache_free) are per thread, so an allocation takes no
# lock: an object goes on the free stack of the thread that frees it, and the chunks are
# never given back, so the model's memory stays at its high-water mark as a slab cache does
# until shrunk (a thread's stack dies with it, unused).

cdef extern from *:
    """
    #include <sys/mman.h>
    #include <pthread.h>
    #define GMEM_POOL_CHUNK (2UL << 20)
    #define GMEM_POOL_CACHED 32
    static pthread_mutex_t gmem_pool_lock = PTHREAD_MUTEX_INITIALIZER;
    static void *gmem_pool_cached[GMEM_POOL_CACHED];
    static int gmem_pool_nr_cached;

    /* A zeroed, 2 MiB-aligned chunk: a cached one, or 4 MiB from mmap trimmed to one. */
    static void *gmem_pool_chunk_get(void) {
        void *p = NULL;
        char *m, *a;
        pthread_mutex_lock(&gmem_pool_lock);
        if (gmem_pool_nr_cached)
            p = gmem_pool_cached[--gmem_pool_nr_cached];
        pthread_mutex_unlock(&gmem_pool_lock);
        if (p)
            return p;
        m = mmap(NULL, 2 * GMEM_POOL_CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            return NULL;
        a = (char *)(((uintptr_t)m + GMEM_POOL_CHUNK - 1) & ~(uintptr_t)(GMEM_POOL_CHUNK - 1));
        if (a > m)
            munmap(m, a - m);
        if (a + GMEM_POOL_CHUNK < m + 2 * GMEM_POOL_CHUNK)
            munmap(a + GMEM_POOL_CHUNK, m + 2 * GMEM_POOL_CHUNK - (a + GMEM_POOL_CHUNK));
        madvise(a, GMEM_POOL_CHUNK, MADV_HUGEPAGE);
        return a;
    }

    /* A chunk whose every byte is zero again. */
    static void gmem_pool_chunk_put(void *p) {
        pthread_mutex_lock(&gmem_pool_lock);
        if (gmem_pool_nr_cached < GMEM_POOL_CACHED) {
            gmem_pool_cached[gmem_pool_nr_cached++] = p;
            p = NULL;
        }
        pthread_mutex_unlock(&gmem_pool_lock);
        if (p)
            munmap(p, GMEM_POOL_CHUNK);
    }
    """
    void *gmem_pool_chunk_get() noexcept nogil
    void gmem_pool_chunk_put(void *p) noexcept nogil
    const size_t GMEM_POOL_CHUNK


cdef extern from *:
    """
    #include <stdlib.h>
    /* The free objects are a stack of pointers, not a list through them: a pop reads the
       stack (hot), not a freed object's link (cold: freed long ago, in any order), so a
       stream that allocates several objects a fault waits for none (sparse cold faults). */
    struct gmem_kmem_cache { void **stack; size_t nr, cap; char *next; char *end; };
    enum { GMEM_KMEM_XA_NODE, GMEM_KMEM_FOLIOS, GMEM_NR_KMEM_CACHES };
    #define GMEM_KMEM_AHEAD 4
    static __thread struct gmem_kmem_cache gmem_kmem_caches[GMEM_NR_KMEM_CACHES];

    /* An object of size (always the same for one cache), or NULL: as it was freed, or zero
       if fresh. Whoever frees an object that must come back zeroed zeroes it, while its
       lines are in the cache (xarray nodes: an allocation then writes only the lines it
       uses). */
    static void *gmem_kmem_cache_alloc(int cache, size_t size) {
        struct gmem_kmem_cache *c = &gmem_kmem_caches[cache];
        char *p;
        if (c->nr) {
            p = c->stack[--c->nr];
            /* the first line of the one GMEM_KMEM_AHEAD pops on (a fault may take several
               objects in a row: each must already be on its way) */
            if (c->nr >= GMEM_KMEM_AHEAD)
                __builtin_prefetch(c->stack[c->nr - GMEM_KMEM_AHEAD], 1);
            return p;
        }
        if ((size_t)(c->end - c->next) < size) {
            char *chunk = gmem_pool_chunk_get();        /* zero, as the OS gives it */
            if (!chunk)
                return NULL;
            c->next = chunk;
            c->end = chunk + GMEM_POOL_CHUNK;
        }
        p = c->next;
        c->next += size;
        return p;
    }

    static void gmem_kmem_cache_free(int cache, void *p) {
        struct gmem_kmem_cache *c = &gmem_kmem_caches[cache];
        if (c->nr == c->cap) {
            size_t cap = c->cap ? 2 * c->cap : 4096;
            void **stack = realloc(c->stack, cap * sizeof(void *));
            if (!stack)
                return;         /* out of memory: the object is lost, nothing else */
            c->stack = stack;
            c->cap = cap;
        }
        c->stack[c->nr++] = p;
    }
    """
    enum:
        GMEM_KMEM_XA_NODE       # struct xa_node (_xarray.pxi)
        GMEM_KMEM_FOLIOS        # a chunk of the folio table (_physmem.pxi)
    void *gmem_kmem_cache_alloc(int cache, size_t size) noexcept nogil
    void gmem_kmem_cache_free(int cache, void *p) noexcept nogil
