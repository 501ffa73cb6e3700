/* The one thread pool of the process (pool.h says what it does): built into a library of its own, which every kernel
   library resolves nanoqwen_pool_run from (ops/cpu/build.py loads it first, RTLD_GLOBAL), so the helper the linears
   keep spinning also serves attention, the pointwise kernels and the sampler, and a 2-core machine runs one helper,
   not one a library. Only nanoqwen_pool_run is exported. */
#define _GNU_SOURCE  /* pthread_setname_np */
#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pool.h"

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
    struct pool_job jobs[2];  /* generation g's job is jobs[g & 1]: a helper a generation late reads a finished job */
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

/* Chunks one claim takes: what is left / (2 x threads), at most POOL_CLAIM_CHUNKS, one at the end. A claim is a CAS
   on a line the other thread wrote last: ~340 ns a round trip on the Zen 5 KVM with its two vCPUs on two CCDs (the fast
   state), and a b1 step has ~4,600 chunks; a thread's chunks also follow one another in memory (one stream, not a jump
   every 128 KB). At most a few: a helper descheduled holding a claim is waited for. */
#define POOL_CLAIM_CHUNKS 4
static inline long pool_claim_size(long left, int threads) {
    const long take = left / (2L * threads);
    return take < 1 ? 1 : take > POOL_CLAIM_CHUNKS ? POOL_CLAIM_CHUNKS : take;
}

/* Runs the chunks of the current generation g that this thread can claim; how many it ran. A helper late by two
   generations reads a job being rewritten (atomically: a CAS of its stale generation then fails, and it leaves). */
static long pool_work(uint32_t g, uint64_t w, const struct pool_job *job) {
    const long chunks = __atomic_load_n(&job->chunks, __ATOMIC_RELAXED);
    const int threads = __atomic_load_n(&job->helpers, __ATOMIC_RELAXED) + 1;
    long ran = 0;
    while ((uint32_t)(w >> 32) == g && (long)(uint32_t)w < chunks) {
        const long first = (long)(uint32_t)w, take = pool_claim_size(chunks - first, threads);
        if (__atomic_compare_exchange_n(&pool.claim, &w, w + take, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            for (long c = first; c < first + take; c++) job->fn(job->ctx, c);
            ran += take;
            w += take;
        }
    }
    return ran;
}

/* A helper's argument: its id, and the generation before the job its start is for (it starts after that job is
   published, and reading the generation then, it would take the job as seen). */
#define POOL_ID_BITS 6
_Static_assert(POOL_MAX_HELPERS <= 1 << POOL_ID_BITS, "a helper's id fits its bits");

static void *pool_helper(void *arg) {
    const int id = (int)((uintptr_t)arg & ((1u << POOL_ID_BITS) - 1));
    uint32_t seen = (uint32_t)((uintptr_t)arg >> POOL_ID_BITS);
    long idle_since = pool_now_ns();
    for (unsigned spins = 0;; spins++) {
        uint64_t w = __atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE);
        uint32_t g = (uint32_t)(w >> 32);
        if (g != seen) {
            const struct pool_job *job = &pool.jobs[g & 1];
            if (id < __atomic_load_n(&job->helpers, __ATOMIC_RELAXED)) {
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
        const uintptr_t arg = (uintptr_t)pool.generation << POOL_ID_BITS | (uintptr_t)pool.started;
        if (pthread_create(&t, 0, pool_helper, (void *)arg) != 0) break;
        pthread_setname_np(t, "nanoqwen-pool");
        pthread_detach(t);
    }
}

void nanoqwen_pool_run(pool_fn fn, const void *ctx, long chunks) {
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
    job->fn = fn, job->ctx = ctx;  /* read only after a claim of this generation: published by the claim's store */
    __atomic_store_n(&job->chunks, chunks, __ATOMIC_RELAXED);
    __atomic_store_n(&job->helpers, helpers < pool.started ? helpers : pool.started, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.finished, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.claim, (uint64_t)g << 32, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        __atomic_fetch_add(&pool.futex, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &pool.futex, FUTEX_WAKE_PRIVATE, INT_MAX, 0, 0, 0);
    }
    const long mine = pool_work(g, (uint64_t)g << 32, job);  /* only this thread starts jobs: g stays */
    for (unsigned spins = 1; __atomic_load_n(&pool.finished, __ATOMIC_ACQUIRE) != chunks - mine; spins++) {
        _mm_pause();
        if (spins % 1024 == 0) sched_yield();  /* the helper still running a chunk may need this core */
    }
    pthread_mutex_unlock(&pool.lock);
}
