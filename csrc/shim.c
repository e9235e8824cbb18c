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

/* Threads per block of p2pc_copy; its grid is every SM's resident blocks (one wave). */
#define COPY_THREADS 512u
#define ATTRIBUTE_SM_COUNT 16 /* CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT */
#define STREAM_NON_BLOCKING 1u /* CU_STREAM_NON_BLOCKING: no implicit sync with stream 0 */

/* Queues `loops` transfers of n bytes src -> dst on `stream`; 0 on failure (logged). */
static int queue_transfers(const p2pc_driver *d, void *copy, unsigned engine, unsigned grid,
                           p2pc_devptr dst, p2pc_devptr src, unsigned long long n,
                           unsigned loops, void *stream, p2pc_report *out) {
    unsigned long long n16 = n / 16;
    void *params[] = {&dst, &src, &n16};
    for (unsigned l = 0; l < loops; l++) {
        int rc = engine == P2PC_ENGINE_CE
                     ? failed(out, "cuMemcpyDtoDAsync_v2", d->memcpy_dtod_async(dst, src, n, stream))
                     : failed(out, "cuLaunchKernel",
                              d->launch_kernel(copy, grid, 1, 1, COPY_THREADS, 1, 1, 0, stream,
                                               params, NULL));
        if (rc) return 0;
    }
    return 1;
}

/* The SM copy's grid: SMs times the blocks of COPY_THREADS one SM holds at once. */
static unsigned copy_grid(const p2pc_driver *d, void *copy, p2pc_report *out) {
    int device = 0, sms = 0, per_sm = 0;
    if (failed(out, "cuCtxGetDevice", d->ctx_get_device(&device)) ||
        failed(out, "cuDeviceGetAttribute",
               d->device_get_attribute(&sms, ATTRIBUTE_SM_COUNT, device)) ||
        failed(out, "cuOccupancyMaxActiveBlocksPerMultiprocessor",
               d->occupancy_max_active_blocks(&per_sm, copy, (int)COPY_THREADS, 0)))
        return 0;
    long long grid = (long long)(sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
    return grid > 65535 ? 65535u : (unsigned)grid;
}

void p2pcheck_shim_timed_copy(const p2pc_driver *d, void *spin, void *copy, unsigned engine,
                              p2pc_devptr dst, p2pc_devptr src, p2pc_devptr dst2,
                              p2pc_devptr src2, unsigned long long n, unsigned loops,
                              unsigned long long budget_ns, p2pc_report *out) {
    report_init(out);
    if (loops == 0 || loops > P2PC_MAX_LOOPS || n % 16 != 0 || engine > P2PC_ENGINE_SM ||
        (dst2 == 0) != (src2 == 0)) {
        out->failed_call = "p2pc argument";
        out->code = 1;
        return;
    }
    unsigned ways = dst2 ? 2u : 1u;
    unsigned grid = 0;
    if (engine == P2PC_ENGINE_SM && (grid = copy_grid(d, copy, out)) == 0) return;
    p2pc_devptr flag = 0;
    void *streams[3] = {NULL, NULL, NULL}; /* one per direction, then the release stream */
    void *events[4] = {NULL, NULL, NULL, NULL}; /* start and end per direction */
    unsigned n_streams = 0, n_events = 0, spins = 0;
    if (failed(out, "cuMemAlloc_v2", d->mem_alloc(&flag, 2 * sizeof(unsigned))))
        return;
    /* Zeroed and synchronised before any stream of ours can read it. */
    int ok = !failed(out, "cuMemsetD8_v2", d->memset_d8(flag, 0, 2 * sizeof(unsigned))) &&
             !failed(out, "cuCtxSynchronize", d->ctx_synchronize());
    while (ok && n_streams < ways + 1)
        ok = !failed(out, "cuStreamCreate",
                     d->stream_create(&streams[n_streams++], STREAM_NON_BLOCKING));
    while (ok && n_events < 2 * ways)
        ok = !failed(out, "cuEventCreate", d->event_create(&events[n_events++], 0));
    for (unsigned w = 0; ok && w < ways; w++) {
        void *params[] = {&flag, &budget_ns};
        ok = !failed(out, "cuLaunchKernel",
                     d->launch_kernel(spin, 1, 1, 1, 1, 1, 1, 0, streams[w], params, NULL));
        if (!ok) break;
        spins++;
        ok = !failed(out, "cuEventRecord", d->event_record(events[2 * w], streams[w])) &&
             queue_transfers(d, copy, engine, grid, w ? dst2 : dst, w ? src2 : src, n, loops,
                             streams[w], out) &&
             !failed(out, "cuEventRecord", d->event_record(events[2 * w + 1], streams[w]));
    }
    /* Released whatever failed: a held stream would otherwise wait for its deadline. */
    if (spins > 0) {
        int released = !failed(out, "cuMemsetD32Async",
                               d->memset_d32_async(flag, 1, 1, streams[ways]));
        ok = !failed(out, "cuCtxSynchronize", d->ctx_synchronize()) && released && ok;
    }
    if (ok) {
        float end = 0, t = 0, start = 0;
        ok = !failed(out, "cuEventElapsedTime", d->event_elapsed_time(&end, events[0], events[1]));
        if (ok && ways == 2) {
            ok = !failed(out, "cuEventElapsedTime",
                         d->event_elapsed_time(&t, events[0], events[3]));
            if (t > end) end = t;
            ok = ok && !failed(out, "cuEventElapsedTime",
                               d->event_elapsed_time(&start, events[0], events[2]));
            if (start > 0) start = 0;
        }
        unsigned how[2] = {0, 0};
        if (ok && !failed(out, "cuMemcpyDtoH_v2", d->memcpy_dtoh(how, flag, sizeof how))) {
            double ns = ((double)end - (double)start) * 1e6;
            out->results[0] = ns > 0 ? (unsigned long long)ns : 0;
            out->results[1] = how[1];
            out->results[2] = grid;
        }
    }
    for (unsigned i = 0; i < n_events; i++)
        if (events[i]) failed(out, "cuEventDestroy_v2", d->event_destroy(events[i]));
    for (unsigned i = 0; i < n_streams; i++)
        if (streams[i]) failed(out, "cuStreamDestroy_v2", d->stream_destroy(streams[i]));
    failed(out, "cuMemFree_v2", d->mem_free(flag));
}

void p2pcheck_shim_chase(const p2pc_driver *d, void *chain, void *chase, p2pc_devptr p,
                         unsigned long long slots, unsigned long long stride,
                         unsigned long long warm, unsigned long long hops, p2pc_report *out) {
    p2pc_devptr results = 0;
    void *chain_params[] = {&p, &slots, &stride};
    void *chase_params[] = {&p, &warm, &hops, &results};
    static const unsigned long long init[2] = {0, 0};
    report_init(out);
    if (failed(out, "cuLaunchKernel",
               d->launch_kernel(chain, blocks_for(slots), 1, 1, THREADS, 1, 1, 0, NULL,
                                chain_params, NULL)) ||
        failed(out, "cuCtxSynchronize", d->ctx_synchronize()))
        return;
    with_counters(d, chase, 1, 1, chase_params, &results, init, 2, out);
}
