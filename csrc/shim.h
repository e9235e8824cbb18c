/* p2pcheck's C shim: the kernel check (SM-issued stores and loads through a peer mapping).
 *
 * The shim links against nothing: the caller passes the driver entry points it resolved
 * (p2pc_driver) and the PTX of csrc/kernels.ptx. Types are spelled out here rather than taken
 * from cuda.h so that the shim builds on machines without CUDA headers (CI without a GPU). */
#ifndef P2PCHECK_SHIM_H
#define P2PCHECK_SHIM_H

#include <stddef.h>

typedef unsigned long long p2pc_devptr; /* CUdeviceptr */

typedef struct p2pc_driver {
    int (*module_load_data)(void **module, const void *image);
    int (*module_get_function)(void **function, void *module, const char *name);
    int (*module_unload)(void *module);
    int (*launch_kernel)(void *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                         unsigned block_x, unsigned block_y, unsigned block_z,
                         unsigned shared_bytes, void *stream, void **params, void **extra);
    int (*ctx_synchronize)(void);
    int (*mem_alloc)(p2pc_devptr *ptr, size_t bytes);
    int (*mem_free)(p2pc_devptr ptr);
    int (*memset_d8)(p2pc_devptr ptr, unsigned char value, size_t bytes);
    int (*memcpy_dtoh)(void *dst, p2pc_devptr src, size_t bytes);
} p2pc_driver;

#define P2PC_MAX_CALLS 16

/* Outcome of one kernel step. failed_call is NULL when every driver call succeeded; otherwise it
 * names the call (a static string) and code holds its CUresult. calls/codes list every driver
 * call made, in order, for the caller's audit trace. */
typedef struct p2pc_kernel_report {
    const char *failed_call;
    int code;
    unsigned long long mismatches; /* p2pc_check: bytes that differed from the expected value */
    unsigned long long first_bad;  /* offset of the first such byte, or ~0ULL */
    int n_calls;
    const char *calls[P2PC_MAX_CALLS];
    int codes[P2PC_MAX_CALLS];
} p2pc_kernel_report;

/* SM stores: writes `value` to bytes [0, n) at `ptr` with kernel p2pc_store, then synchronises. */
void p2pc_kernel_store(const p2pc_driver *d, const char *ptx, p2pc_devptr ptr, size_t n,
                       unsigned char value, p2pc_kernel_report *out);

/* SM loads: counts bytes in [0, n) at `ptr` that differ from `value` with kernel p2pc_count. */
void p2pc_kernel_check(const p2pc_driver *d, const char *ptx, p2pc_devptr ptr, size_t n,
                       unsigned char value, p2pc_kernel_report *out);

#endif
