/* p2pcheck's C shim: launches the kernels of the kernel and handshake tiers (csrc/kernels.cu)
 * and brings their results back.
 *
 * The shim links against nothing: the caller passes the driver entry points it resolved
 * (p2pc_driver) and the kernel handles of a module it loaded and owns. Types are spelled out
 * here rather than taken from cuda.h so that the shim builds on machines without CUDA headers
 * (CI without a GPU). Every driver call's return code is checked and logged in order.
 *
 * The functions are linker symbols of libp2pcheck.a, so they carry the library's prefix
 * (p2pcheck_shim_): a host's own names cannot clash with them (tests/capi.rs runs nm). They
 * are hidden from any shared object. The kernels keep their p2pc_ names: those are strings
 * looked up in the PTX module, not linker symbols. */
#ifndef P2PCHECK_SHIM_H
#define P2PCHECK_SHIM_H

#include <stddef.h>

typedef unsigned long long p2pc_devptr; /* CUdeviceptr */

typedef struct p2pc_driver {
    int (*launch_kernel)(void *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                         unsigned block_x, unsigned block_y, unsigned block_z,
                         unsigned shared_bytes, void *stream, void **params, void **extra);
    int (*ctx_synchronize)(void);
    int (*mem_alloc)(p2pc_devptr *ptr, size_t bytes);
    int (*mem_free)(p2pc_devptr ptr);
    int (*memset_d8)(p2pc_devptr ptr, unsigned char value, size_t bytes);
    int (*memcpy_dtoh)(void *dst, p2pc_devptr src, size_t bytes);
} p2pc_driver;

/* Room for every call one shim function makes (at most 8); n_calls counts them all, so a
 * caller sees it if the log ever overflowed instead of losing calls silently. */
#define P2PC_MAX_CALLS 16

/* Outcome of one shim call. failed_call is NULL when every driver call succeeded; otherwise it
 * names the first failing call (a static string) and code holds its CUresult. calls/codes list
 * the driver calls made, in order, for the caller's audit trace; results holds what the kernel
 * computed (see each function). */
typedef struct p2pc_report {
    const char *failed_call;
    int code;
    int n_calls;
    const char *calls[P2PC_MAX_CALLS];
    int codes[P2PC_MAX_CALLS];
    unsigned long long results[4];
} p2pc_report;

/* Kernel p2pc_pattern_store over [ptr, ptr+n) with stores of `width` bytes, then a synchronise.
 * results unused. */
void p2pcheck_shim_pattern_store(const p2pc_driver *d, void *function, p2pc_devptr ptr,
                                 unsigned long long n, unsigned long long seed, unsigned width,
                                 unsigned long long shift, p2pc_report *out);

/* Kernel p2pc_pattern_check over [ptr, ptr+n): results = {wrong, first bad offset (or ~0),
 * wrong but equal to the old_seed pattern}. */
void p2pcheck_shim_pattern_check(const p2pc_driver *d, void *function, p2pc_devptr ptr,
                                 unsigned long long n, unsigned long long seed,
                                 unsigned long long old_seed, unsigned width, p2pc_report *out);

/* Kernel p2pc_handshake on `area` (one thread): results = {rounds done, payload bytes wrong,
 * timed out, elapsed ns}. */
void p2pcheck_shim_handshake(const p2pc_driver *d, void *function, p2pc_devptr area,
                             unsigned rounds, unsigned role, unsigned long long seed,
                             unsigned long long budget_ns, p2pc_report *out);

#endif
