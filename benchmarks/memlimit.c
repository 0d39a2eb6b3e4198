/* The machine's memory limit L for the fault-path benchmarks: thread CPU time per random
 * 8-byte load over a large array, with software prefetch far enough ahead that the loads'
 * misses overlap (the best a stream of independent random accesses can do here).
 *
 *   cc -O2 -o memlimit memlimit.c && ./memlimit [MiB] [rounds] [huge]
 *
 * Prints one JSON line: {"mib": .., "loads": .., "min_ns": .., "median_ns": .., "huge": ..}.
 * huge = 1 backs the array with transparent huge pages (madvise), as the model's page tables
 * are; 0 (the default) with the 4 KiB pages an ordinary allocation gets.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define AHEAD 32

static double thread_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    int rounds = argc > 2 ? atoi(argv[2]) : 7, huge = argc > 3 ? atoi(argv[3]) : 0;
    size_t n = mib << 17, loads = 1 << 22, i;  /* n 8-byte words */
    uint64_t *a, *idx, x = 88172645463325252ULL, sum = 0;
    double *t;
    int r;
    a = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    idx = malloc(loads * sizeof(*idx));
    t = malloc(rounds * sizeof(*t));
    if (a == MAP_FAILED || !idx || !t)
        return 1;
    if (huge)
        madvise(a, n * 8, MADV_HUGEPAGE);
    for (i = 0; i < n; i++)
        a[i] = i;
    for (i = 0; i < loads; i++) {       /* xorshift64: independent random indices */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        idx[i] = x % n;
    }
    for (r = 0; r < rounds; r++) {
        double t0 = thread_ns();
        for (i = 0; i < loads; i++) {
            if (i + AHEAD < loads)
                __builtin_prefetch(&a[idx[i + AHEAD]]);
            sum += a[idx[i]];
        }
        t[r] = (thread_ns() - t0) / loads;
    }
    qsort(t, rounds, sizeof(*t), cmp);
    printf("{\"mib\": %zu, \"loads\": %zu, \"min_ns\": %.2f, \"median_ns\": %.2f, \"huge\": %d, "
           "\"checksum\": %llu}\n", mib, loads, t[0], t[rounds / 2], huge,
           (unsigned long long)(sum & 0xffff));
    return 0;
}
