/* See shim.h. Every driver call's return code is checked; the first failure is reported by name
 * and code, and whatever was acquired before it is released. */
#include "shim.h"

#include <string.h>

#define THREADS 256u

/* Logs the call, records the first failing one; returns nonzero when `rc` is a failure. */
static int failed(p2pc_kernel_report *out, const char *call, int rc) {
    if (out->n_calls < P2PC_MAX_CALLS) {
        out->calls[out->n_calls] = call;
        out->codes[out->n_calls] = rc;
        out->n_calls++;
    }
    if (rc == 0) return 0;
    if (out->failed_call == NULL) {
        out->failed_call = call;
        out->code = rc;
    }
    return 1;
}

static unsigned blocks_for(size_t n) {
    size_t blocks = (n + THREADS - 1) / THREADS;
    if (blocks == 0) blocks = 1;
    return blocks > 1024 ? 1024u : (unsigned)blocks;
}

static void report_init(p2pc_kernel_report *out) {
    memset(out, 0, sizeof *out);
    out->first_bad = ~0ULL;
}

void p2pc_kernel_store(const p2pc_driver *d, const char *ptx, p2pc_devptr ptr, size_t n,
                       unsigned char value, p2pc_kernel_report *out) {
    void *module = NULL, *fn = NULL;
    unsigned long long count = n;
    void *params[] = {&ptr, &count, &value};
    report_init(out);
    if (failed(out, "cuModuleLoadData", d->module_load_data(&module, ptx))) return;
    if (!failed(out, "cuModuleGetFunction", d->module_get_function(&fn, module, "p2pc_store")) &&
        !failed(out, "cuLaunchKernel",
                d->launch_kernel(fn, blocks_for(n), 1, 1, THREADS, 1, 1, 0, NULL, params, NULL)))
        failed(out, "cuCtxSynchronize", d->ctx_synchronize());
    failed(out, "cuModuleUnload", d->module_unload(module));
}

void p2pc_kernel_check(const p2pc_driver *d, const char *ptx, p2pc_devptr ptr, size_t n,
                       unsigned char value, p2pc_kernel_report *out) {
    void *module = NULL, *fn = NULL;
    p2pc_devptr counters = 0; /* {mismatches, first_bad} */
    unsigned long long host[2] = {0, ~0ULL};
    unsigned long long count = n;
    p2pc_devptr mismatches, first_bad;
    void *params[] = {&ptr, &count, &value, &mismatches, &first_bad};
    report_init(out);
    if (failed(out, "cuModuleLoadData", d->module_load_data(&module, ptx))) return;
    if (!failed(out, "cuModuleGetFunction", d->module_get_function(&fn, module, "p2pc_count")) &&
        !failed(out, "cuMemAlloc_v2", d->mem_alloc(&counters, sizeof host))) {
        mismatches = counters;
        first_bad = counters + sizeof host[0];
        if (!failed(out, "cuMemsetD8_v2", d->memset_d8(mismatches, 0, sizeof host[0])) &&
            !failed(out, "cuMemsetD8_v2", d->memset_d8(first_bad, 0xff, sizeof host[1])) &&
            !failed(out, "cuLaunchKernel",
                    d->launch_kernel(fn, blocks_for(n), 1, 1, THREADS, 1, 1, 0, NULL, params, NULL)) &&
            !failed(out, "cuCtxSynchronize", d->ctx_synchronize()) &&
            !failed(out, "cuMemcpyDtoH_v2", d->memcpy_dtoh(host, counters, sizeof host))) {
            out->mismatches = host[0];
            out->first_bad = host[1];
        }
        failed(out, "cuMemFree_v2", d->mem_free(counters));
    }
    failed(out, "cuModuleUnload", d->module_unload(module));
}
