/* How long a cache line takes to go from one CPU to another and back: the two CPUs of this process's affinity
   (the first two, or those named), each thread pinned to one, passing a flag back and forth. Not a test.

   Why: on the 2-core Zen 5 KVM the host moves the guest's two vCPUs between cores of one CCD (~77 ns a round trip;
   the two share one CCD's link to memory: a 2-thread read ~55 GB/s) and cores of two CCDs (~340 ns; ~85-95 GB/s),
   every few seconds, whatever runs in the guest: the "two speed states" of a decode (profiles/RESULTS.md, step35).
   profiles/common.py builds and runs it before and after each timed decode, so a figure says which state it ran in.

   Build: cc -O2 -pthread profiles/core_pair.c -o profiles/out/core_pair
   Run:   profiles/out/core_pair [BATCHES [CPU_A CPU_B]]   prints the minimum and median round trip in ns over BATCHES
          batches of 1,000 round trips (the minimum: a batch the load left alone); exit status 2 without two
          distinct CPUs. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#include "core_pair.h"

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const int batches = argc > 1 ? atoi(argv[1]) : 30;
    int cpus[2] = {-1, -1}, found = 0;
    if (argc > 3) {
        cpus[0] = atoi(argv[2]), cpus[1] = atoi(argv[3]), found = 2;
    } else {
        cpu_set_t set;
        sched_getaffinity(0, sizeof set, &set);
        for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
            if (CPU_ISSET(c, &set)) cpus[found++] = c;
    }
    if (found < 2 || cpus[0] == cpus[1] || batches < 1) return 2;
    double *ns = malloc(batches * sizeof *ns);
    if (!ns || core_pair_round_trips(cpus[0], cpus[1], batches, ns) != 0) return 2;
    qsort(ns, batches, sizeof *ns, by_value);
    printf("%.0f %.0f\n", ns[0], ns[batches / 2]);
    free(ns);
    return 0;
}
