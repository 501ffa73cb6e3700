/* Each thread's own working memory for the kernels. Internal, not exported. */
#ifndef NANOQWEN_SCRATCH_H
#define NANOQWEN_SCRATCH_H

#include <stdlib.h>

/* The calling thread's scratch of at least `bytes` (64-byte aligned), grown when a call needs more and never
   freed, so a decode step allocates nothing once its largest call has run. NULL if the allocation fails (the
   old one is freed then): a caller must have a way without it, or report NANOQWEN_NO_MEMORY. A kernel stages its
   inputs there before nanoqwen_pool_run, and its tasks may write their results there, each its own region: the pool's
   finished counter (a helper's release, the caller's acquire) publishes what a helper wrote to the caller once it
   returns. The contents do not outlive the call: the next one may grow (move) the scratch. */
#ifdef NANOQWEN_NO_SCRATCH  /* tests build this to run every kernel's way without its scratch */
static inline void *thread_scratch(size_t bytes) {
    (void)bytes;
    return 0;
}
#else
static inline void *thread_scratch(size_t bytes) {
    static __thread void *buf;
    static __thread size_t size;
    if (bytes > size) {
        free(buf);
        buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        size = buf ? bytes : 0;
    }
    return buf;
}
#endif

/* The calling thread's scratch (thread_scratch) cut into `count` parts, part i of sizes[i] bytes at part[i], each
   64-byte aligned. 0 if there is none. */
static inline int thread_scratch_parts(const size_t *sizes, int count, char **part) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (sizes[i] + 63) / 64 * 64;
    if (!(part[0] = (char *)thread_scratch(total))) return 0;
    for (int i = 1; i < count; i++) part[i] = part[i - 1] + (sizes[i - 1] + 63) / 64 * 64;
    return 1;
}

/* Memory for one call, freed by the caller before it returns: NULL if it cannot be had (the caller reports
   NANOQWEN_NO_MEMORY). For memory that must not outlive the call: prefill attention's ~273 KiB a thread, kept in the
   engine thread's scratch, left bf16 batch-1 decode without its fast runs (~35 against ~26 tok/s, in 0 of 20 runs;
   profiles/RESULTS.md, sixteenth session). */
#ifdef NANOQWEN_NO_SCRATCH
static inline void *call_memory(size_t bytes) {
    (void)bytes;
    return 0;
}
#else
static inline void *call_memory(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }
#endif

#endif
