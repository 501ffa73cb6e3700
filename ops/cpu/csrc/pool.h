/* A work-claiming thread pool for the C kernels (decode-sized calls, and prefill's dequantising and silu_mul).
   Internal, not exported.

   Why not OpenMP: a `parallel for` ends in a barrier, so on a shared CPU every call waits until each
   of its threads has been scheduled and done its share; with more runnable processes than cores a
   decode step's ~140 parallel regions each waited for a time slice (measured at load average 9 on a
   2-core Xeon: 2 threads 3x slower than 1). Here the calling thread claims chunks of the work itself
   and only waits for chunks a helper has claimed: a helper that is not running is not waited for.

   pool_run(fn, ctx, chunks) calls fn(ctx, c) once for every chunk c < chunks, on the caller and up to
   omp_get_max_threads() - 1 helpers (torch.set_num_threads sets it), and returns when all are done.
   Callers are serialised by a mutex (ctypes releases the GIL). Each .so that includes this has its own
   pool; helpers spin briefly after a job, then sleep on a futex. */
#ifndef NANOQWEN_POOL_H
#define NANOQWEN_POOL_H

#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "scratch.h"

typedef void (*pool_fn)(const void *ctx, long chunk);

#define POOL_MAX_HELPERS 63
#define POOL_SPIN_NS 200000L  /* a helper spins this long after a job before it sleeps: between two
                                 layers' kernels the step spends tens of µs in Python */

struct pool_job {
    pool_fn fn;
    const void *ctx;
    long chunks;
    int helpers;  /* helpers with a smaller index take part */
};

static struct {
    uint64_t claim;       /* generation << 32 | next unclaimed chunk: a claim is a CAS of the same generation */
    long finished;        /* chunks of the current job that helpers finished */
    int sleepers, futex;  /* helpers asleep, and the word they sleep on */
    struct pool_job jobs[2];  /* generation g's job is jobs[g & 1]: a late helper reads a finished job, never a half-written one */
    uint32_t generation;
    int started;          /* helpers running (reset in a forked child, which has none) */
    int atfork;           /* pool_forked is registered */
    pthread_mutex_t lock;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static inline long pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Runs the chunks of the current generation g that this thread can claim; how many it ran. */
static long pool_work(uint32_t g, uint64_t w, const struct pool_job *job) {
    long ran = 0;
    while ((uint32_t)(w >> 32) == g && (long)(uint32_t)w < job->chunks) {
        if (__atomic_compare_exchange_n(&pool.claim, &w, w + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            job->fn(job->ctx, (long)(uint32_t)w);
            ran++;
            w++;
        }
    }
    return ran;
}

static void *pool_helper(void *arg) {
    const int id = (int)(long)arg;
    uint32_t seen = __atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE) >> 32;
    long idle_since = pool_now_ns();
    for (unsigned spins = 0;; spins++) {
        uint64_t w = __atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE);
        uint32_t g = (uint32_t)(w >> 32);
        if (g != seen) {
            const struct pool_job *job = &pool.jobs[g & 1];
            if (id < job->helpers) {
                long ran = pool_work(g, w, job);
                if (ran) __atomic_fetch_add(&pool.finished, ran, __ATOMIC_RELEASE);
            }
            seen = g;
            idle_since = pool_now_ns();
            continue;
        }
        _mm_pause();
        if (spins % 64) continue;
        if (pool_now_ns() - idle_since < POOL_SPIN_NS) {
            sched_yield();  /* a thread that has work on this core (an OpenMP worker of torch's) runs first */
            continue;
        }
        __atomic_fetch_add(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        int word = __atomic_load_n(&pool.futex, __ATOMIC_SEQ_CST);
        if ((uint32_t)(__atomic_load_n(&pool.claim, __ATOMIC_SEQ_CST) >> 32) == seen)
            syscall(SYS_futex, &pool.futex, FUTEX_WAIT_PRIVATE, word, 0, 0, 0);
        __atomic_fetch_sub(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        idle_since = pool_now_ns();
    }
    return 0;
}

static void pool_forked(void) {  /* the child of a fork has no helpers and an unlocked pool */
    pool.started = 0;
    pool.sleepers = 0;
    pthread_mutex_init(&pool.lock, 0);
}

static void pool_start(int helpers) {
    if (!pool.atfork) pool.atfork = pthread_atfork(0, 0, pool_forked) == 0;
    for (; pool.started < helpers; pool.started++) {
        pthread_t t;
        if (pthread_create(&t, 0, pool_helper, (void *)(long)pool.started) != 0) break;
        pthread_detach(t);
    }
}

static void pool_run(pool_fn fn, const void *ctx, long chunks) {
    int helpers = omp_get_max_threads() - 1;
    helpers = helpers < POOL_MAX_HELPERS ? helpers : POOL_MAX_HELPERS;
    if (helpers < 1 || chunks < 2) {
        for (long c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    pool_start(helpers);
    const uint32_t g = ++pool.generation;
    struct pool_job *job = &pool.jobs[g & 1];
    job->fn = fn, job->ctx = ctx, job->chunks = chunks, job->helpers = helpers < pool.started ? helpers : pool.started;
    __atomic_store_n(&pool.finished, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.claim, (uint64_t)g << 32, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        __atomic_fetch_add(&pool.futex, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &pool.futex, FUTEX_WAKE_PRIVATE, INT_MAX, 0, 0, 0);
    }
    long mine = 0;  /* only this thread starts jobs, so the generation cannot change under it */
    for (long c; (c = (long)(uint32_t)__atomic_fetch_add(&pool.claim, 1, __ATOMIC_ACQ_REL)) < chunks; mine++) fn(ctx, c);
    for (unsigned spins = 1; __atomic_load_n(&pool.finished, __ATOMIC_ACQUIRE) != chunks - mine; spins++) {
        _mm_pause();
        if (spins % 1024 == 0) sched_yield();  /* the helper still running a chunk may need this core */
    }
    pthread_mutex_unlock(&pool.lock);
}

/* Chunks of whole rows, about POOL_CHUNK_BYTES of weights each: small enough that the threads balance and
   that the caller never waits long on a helper descheduled mid-chunk, large enough that claiming one
   (a CAS) costs nothing beside streaming it. */
#define POOL_CHUNK_BYTES (128L << 10)
static inline long pool_rows_per_chunk(long row_bytes) {
    long rows = POOL_CHUNK_BYTES / row_bytes;
    return rows > 0 ? rows : 1;
}

/* The end (exclusive) of chunk `chunk`'s rows, `rows` per chunk out of `n`; it starts at chunk * rows. */
static inline long pool_chunk_end(long chunk, long rows, long n) {
    return (chunk + 1) * rows < n ? (chunk + 1) * rows : n;
}

#endif
