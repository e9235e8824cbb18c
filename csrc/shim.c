/* See shim.h. Every driver call's return code is checked; the first failure is reported by name
 * and code, and whatever was acquired before it is released. */
#include "shim.h"

#include <string.h>

#define THREADS 256u

/* Logs the call, records the first failing one; returns nonzero when `rc` is a failure. */
static int failed(p2pc_report *out, const char *call, int rc) {
    if (out->n_calls < P2PC_MAX_CALLS) {
        out->calls[out->n_calls] = call;
        out->codes[out->n_calls] = rc;
    }
    out->n_calls++;
    if (rc == 0) return 0;
    if (out->failed_call == NULL) {
        out->failed_call = call;
        out->code = rc;
    }
    return 1;
}

static unsigned blocks_for(unsigned long long words) {
    unsigned long long blocks = (words + THREADS - 1) / THREADS;
    if (blocks == 0) blocks = 1;
    return blocks > 1024 ? 1024u : (unsigned)blocks;
}

static void report_init(p2pc_report *out) {
    memset(out, 0, sizeof *out);
}

void p2pcheck_shim_pattern_store(const p2pc_driver *d, void *function, p2pc_devptr ptr,
                                 unsigned long long n, unsigned long long seed, unsigned width,
                                 unsigned long long shift, p2pc_report *out) {
    void *params[] = {&ptr, &n, &seed, &width, &shift};
    report_init(out);
    if (width == 0) width = 1;
    if (!failed(out, "cuLaunchKernel",
                d->launch_kernel(function, blocks_for(n / width), 1, 1, THREADS, 1, 1, 0, NULL,
                                 params, NULL)))
        failed(out, "cuCtxSynchronize", d->ctx_synchronize());
}

/* Runs `function` (one launch of grid x THREADS, or 1 x 1) with `params`, whose last parameter
 * points at `count` u64 counters in a fresh allocation set from `init`, and copies them into
 * out->results. */
static void with_counters(const p2pc_driver *d, void *function, unsigned grid, unsigned block,
                          void **params, p2pc_devptr *counters, const unsigned long long *init,
                          unsigned count, p2pc_report *out) {
    size_t bytes = count * sizeof(unsigned long long);
    if (failed(out, "cuMemAlloc_v2", d->mem_alloc(counters, bytes))) return;
    int ok = 1;
    for (unsigned i = 0; i < count && ok; i++)
        ok = !failed(out, "cuMemsetD8_v2",
                     d->memset_d8(*counters + i * sizeof(unsigned long long),
                                  init[i] ? 0xff : 0, sizeof(unsigned long long)));
    if (ok && !failed(out, "cuLaunchKernel",
                      d->launch_kernel(function, grid, 1, 1, block, 1, 1, 0, NULL, params, NULL)) &&
        !failed(out, "cuCtxSynchronize", d->ctx_synchronize()))
        failed(out, "cuMemcpyDtoH_v2", d->memcpy_dtoh(out->results, *counters, bytes));
    failed(out, "cuMemFree_v2", d->mem_free(*counters));
}

void p2pcheck_shim_pattern_check(const p2pc_driver *d, void *function, p2pc_devptr ptr,
                                 unsigned long long n, unsigned long long seed,
                                 unsigned long long old_seed, unsigned width, p2pc_report *out) {
    p2pc_devptr counters = 0;
    void *params[] = {&ptr, &n, &seed, &old_seed, &width, &counters};
    /* {wrong, first bad, stale}: first bad starts at ~0 (all bytes 0xff). */
    static const unsigned long long init[3] = {0, ~0ULL, 0};
    report_init(out);
    if (width == 0) width = 1;
    with_counters(d, function, blocks_for(n / width), THREADS, params, &counters, init, 3, out);
}

void p2pcheck_shim_handshake(const p2pc_driver *d, void *function, p2pc_devptr area,
                             unsigned rounds, unsigned role, unsigned long long seed,
                             unsigned long long budget_ns, p2pc_report *out) {
    p2pc_devptr results = 0;
    void *params[] = {&area, &rounds, &role, &seed, &budget_ns, &results};
    static const unsigned long long init[4] = {0, 0, 0, 0};
    report_init(out);
    with_counters(d, function, 1, 1, params, &results, init, 4, out);
}
