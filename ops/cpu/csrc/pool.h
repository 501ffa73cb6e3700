/* A work-claiming thread pool for the C kernels (decode-sized calls, and prefill's dequantising and silu_mul).
   Internal, not exported to Python.

   Why not OpenMP: a `parallel for` ends in a barrier, so on a shared CPU every call waits until each
   of its threads has been scheduled and done its share; with more runnable processes than cores a
   decode step's ~140 parallel regions each waited for a time slice (measured at load average 9 on a
   2-core Xeon: 2 threads 3x slower than 1). Here the calling thread claims chunks of the work itself
   and only waits for chunks a helper has claimed: a helper that is not running is not waited for.

   nanoqwen_pool_run(fn, ctx, chunks) calls fn(ctx, c) once for every chunk c < chunks, on the caller and up to
   omp_get_max_threads() - 1 helpers (torch.set_num_threads sets it), and returns when all are done.
   Callers are serialised by a mutex (ctypes releases the GIL). One pool serves every kernel library of the process
   (pool.c, a library of its own): helpers spin briefly after a job, whichever library ran it, then sleep on a futex. */
#ifndef NANOQWEN_POOL_H
#define NANOQWEN_POOL_H

#include <immintrin.h>
#include <sched.h>

typedef void (*pool_fn)(const void *ctx, long chunk);

void nanoqwen_pool_run(pool_fn fn, const void *ctx, long chunks);

/* Chunks of whole rows, about POOL_CHUNK_BYTES of weights each: small enough that the threads balance and
   that the caller never waits long on a helper descheduled mid-chunk, large enough that claiming one
   (a CAS) costs little beside streaming it. A claim takes several chunks while many are left (pool.c). */
#define POOL_CHUNK_BYTES (128L << 10)
static inline long pool_rows_per_chunk(long row_bytes) {
    long rows = POOL_CHUNK_BYTES / row_bytes;
    return rows > 0 ? rows : 1;
}

/* Rows per pool chunk of the row-wise kernels (the norms, q/k norm + RoPE + store, silu_mul), whose rows are
   `row_values` values each: a call of more than PREFILL_CHUNK_ROWS rows (prefill's) in chunks of that many; a decode
   step's in chunks of at least POOL_SPLIT_VALUES values, so that batch 1's run on the calling thread alone (a job's
   hand-off costs a few µs, more than half such a call) and batch 8's on both threads (profiles/RESULTS.md, lane
   splitb8_42: at batch 8 these calls had the second thread idle through ~3 ms of a ~32 ms step). The pool, not
   OpenMP: between the pool's jobs an OpenMP region's threads and the pool's spinning helpers took each other's cores
   on 2 busy cores (a 16-row decode step cost 640-1,032 ms against 120-184 at 15 rows), and a 512 x 3072 silu_mul took
   a median of 15 ms in an OpenMP loop at load 12 against 1.3-1.5 on one thread, its barrier waiting for a descheduled
   thread. */
#define PREFILL_CHUNK_ROWS 32
#define POOL_SPLIT_VALUES 4096
static inline long pool_row_chunk(long rows, long row_values) {
    if (rows > PREFILL_CHUNK_ROWS || row_values <= 0) return PREFILL_CHUNK_ROWS;  /* no values: nothing to split */
    return (POOL_SPLIT_VALUES + row_values - 1) / row_values;
}

/* The end (exclusive) of chunk `chunk`'s rows, `rows` per chunk out of `n`; it starts at chunk * rows. */
static inline long pool_chunk_end(long chunk, long rows, long n) {
    return (chunk + 1) * rows < n ? (chunk + 1) * rows : n;
}

/* A linear's weight rows in chunks of `rows` (whole `unit`s), but the rows of the last POOL_TAIL_CHUNKS such chunks in
   POOL_TAIL_PARTS times as many: a thread that finds nothing left to claim waits for the other's last chunk (a claim
   takes one chunk at the end, pool.c), which at 8 rows took ~1 ms of a ~35 ms int4 step with every chunk whole
   (profiles/RESULTS.md, lane b8_43's b8_split). head: the whole chunks before the tail's, of `tail` rows each. */
#define POOL_TAIL_CHUNKS 2
#define POOL_TAIL_PARTS 4
struct pool_rows {
    long n, rows, head, tail;
};

static inline struct pool_rows pool_rows_cut(long n, long rows, long unit) {
    const long chunks = (n + rows - 1) / rows, head = chunks > POOL_TAIL_CHUNKS ? chunks - POOL_TAIL_CHUNKS : 0;
    const long parts = chunks > 1 ? POOL_TAIL_CHUNKS * POOL_TAIL_PARTS : 1;  /* one chunk: the caller's alone */
    const long tail = (n - head * rows + parts - 1) / parts;
    return (struct pool_rows){n, rows, head, tail > 0 ? (tail + unit - 1) / unit * unit : unit};
}

static inline long pool_rows_chunks(const struct pool_rows *s) {
    return s->head + (s->n - s->head * s->rows + s->tail - 1) / s->tail;
}

/* The first row of chunk `chunk`, and the end (exclusive) of its rows. */
static inline long pool_rows_start(const struct pool_rows *s, long chunk) {
    return chunk <= s->head ? chunk * s->rows : s->head * s->rows + (chunk - s->head) * s->tail;
}

static inline long pool_rows_end(const struct pool_rows *s, long chunk) {
    const long end = pool_rows_start(s, chunk + 1);
    return end < s->n ? end : s->n;
}

/* A job whose first chunks stage what its others read (a linear's activation rows as integers, a row a chunk), so
   that both threads stage them where the caller alone did before the job: a claim takes the next chunks in order
   (pool.c), so a thread has run or holds every staging chunk before it takes a later one, which waits until `done`
   counts `staged` of them. */
static inline void pool_staged_wait(const long *done, long staged) {
    for (unsigned spins = 1; __atomic_load_n(done, __ATOMIC_ACQUIRE) < staged; spins++) {
        _mm_pause();
        if (spins % 1024 == 0) sched_yield();  /* the thread staging may need this core */
    }
}

/* Stages row `row` of x for `job`: writes what the job's other chunks read of it, and returns what flags[row] keeps
   (a linear's: whether the row is past the pieces' range, act_quant.h). */
typedef int (*pool_stage_fn)(const void *job, long row);

/* A job's staging: its first `rows` chunks (0: none, the caller staged what there was before the job), a row each. */
struct pool_stage {
    const void *x;  /* the rows staged (read by the job's pool_stage_fn) */
    int *flags;     /* [rows]: what each row's pool_stage_fn returned */
    long rows;
    long *done;     /* staging chunks done */
};

/* Chunk `*chunk` of a job with staging `s`: a staging chunk stages its row by `stage` and returns 1; any other, once
   every staging chunk is done, becomes its index among the others (*chunk) and returns 0. */
static inline int pool_stage_chunk(const struct pool_stage *s, pool_stage_fn stage, const void *job, long *chunk) {
    if (*chunk < s->rows) {
        s->flags[*chunk] = stage(job, *chunk);
        __atomic_fetch_add(s->done, 1, __ATOMIC_RELEASE);
        return 1;
    }
    if (s->rows) pool_staged_wait(s->done, s->rows);  /* none: a job without staging reads no staging counter */
    *chunk -= s->rows;
    return 0;
}

#endif
