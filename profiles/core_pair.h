/* A cache line's round trip between two CPUs: core_pair.c's measure, also run inside pool_handoff.c. Not a test.
   Each thread pinned to one CPU passes a flag back and forth; the caller's affinity is restored after. */
#ifndef NANOQWEN_CORE_PAIR_H
#define NANOQWEN_CORE_PAIR_H

#include <pthread.h>
#include <sched.h>
#include <time.h>

#define CORE_PAIR_TRIPS 1000  /* round trips a batch */

static struct { int value; } __attribute__((aligned(128))) core_pair_flag;  /* a line (and its pair's prefetch) alone */

static void *core_pair_echo(void *trips) {
    for (long i = 0; i < (long)trips; i++) {
        while (__atomic_load_n(&core_pair_flag.value, __ATOMIC_ACQUIRE) != 1) {}
        __atomic_store_n(&core_pair_flag.value, 0, __ATOMIC_RELEASE);
    }
    return 0;
}

static double core_pair_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static cpu_set_t core_pair_cpu(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return set;
}

/* ns[b] = batch b's mean round trip between CPUs a and b, ns, for `batches` batches; 0, or -1 where a CPU cannot be
   pinned (unpinned, a round trip waits on the scheduler: ms, not ns) or the thread not started. */
static int core_pair_round_trips(int cpu_a, int cpu_b, int batches, double *ns) {
    cpu_set_t old, mine = core_pair_cpu(cpu_a), theirs = core_pair_cpu(cpu_b);
    pthread_getaffinity_np(pthread_self(), sizeof old, &old);
    pthread_attr_t attr;
    pthread_t other;
    if (pthread_setaffinity_np(pthread_self(), sizeof mine, &mine) != 0 || pthread_attr_init(&attr) != 0 ||
        pthread_attr_setaffinity_np(&attr, sizeof theirs, &theirs) != 0 ||
        pthread_create(&other, &attr, core_pair_echo, (void *)((long)batches * CORE_PAIR_TRIPS)) != 0) {
        pthread_setaffinity_np(pthread_self(), sizeof old, &old);
        return -1;
    }
    for (int b = 0; b < batches; b++) {
        const double start = core_pair_now_ns();
        for (int i = 0; i < CORE_PAIR_TRIPS; i++) {
            __atomic_store_n(&core_pair_flag.value, 1, __ATOMIC_RELEASE);
            while (__atomic_load_n(&core_pair_flag.value, __ATOMIC_ACQUIRE) != 0) {}
        }
        ns[b] = (core_pair_now_ns() - start) / CORE_PAIR_TRIPS;
    }
    pthread_join(other, 0);
    pthread_setaffinity_np(pthread_self(), sizeof old, &old);
    return 0;
}

/* The best of `batches` (at most 64) batches between CPUs 0 and 1, ns (-1 where they cannot be pinned): a tool's label
   of the speed state it ran in. */
static inline double core_pair_best_ns(int batches) {  /* inline: core_pair.c has no use for it */
    double ns[64], best = 1e9;
    if (batches > 64 || core_pair_round_trips(0, 1, batches, ns) != 0) return -1;
    for (int b = 0; b < batches; b++)
        if (ns[b] < best) best = ns[b];
    return best;
}

#endif
