/* p2pcheck's C shim: launches the kernels of the kernel and handshake tiers (csrc/kernels.cu)
 * and brings their results back, and times the bandwidth and latency measurements on the GPU.
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
    /* The timed measurements' (p2pcheck_shim_timed_copy). */
    int (*ctx_get_device)(int *device);
    int (*device_get_attribute)(int *value, int attribute, int device);
    int (*occupancy_max_active_blocks)(int *blocks, void *function, int block_size,
                                       size_t shared_bytes);
    int (*stream_create)(void **stream, unsigned flags);
    int (*stream_destroy)(void *stream);
    int (*event_create)(void **event, unsigned flags);
    int (*event_record)(void *event, void *stream);
    int (*event_elapsed_time)(float *ms, void *start, void *end);
    int (*event_destroy)(void *event);
    int (*memcpy_dtod_async)(p2pc_devptr dst, p2pc_devptr src, size_t bytes, void *stream);
    int (*memset_d32_async)(p2pc_devptr ptr, unsigned value, size_t count, void *stream);
} p2pc_driver;

/* Room for every call one shim function makes (at most 49: a timed copy both ways with
 * P2PC_MAX_LOOPS transfers each); n_calls counts them all, so a
 * caller sees it if the log ever overflowed instead of losing calls silently. */
#define P2PC_MAX_CALLS 64

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

/* How p2pcheck_shim_timed_copy moves the bytes. */
#define P2PC_ENGINE_CE 0u /* the copy engine: cuMemcpyDtoDAsync */
#define P2PC_ENGINE_SM 1u /* SM loads and stores: kernel p2pc_copy */
/* Most transfers one timed sample queues per direction. */
#define P2PC_MAX_LOOPS 8u

/* One timed sample, nvbandwidth's way: on a fresh non-blocking stream, kernel p2pc_spin holds
 * the stream while an event, `loops` transfers of n bytes (a multiple of 16) src -> dst by
 * `engine`, and a second event queue up behind it; then a memset on a third stream releases
 * it, so the transfers run back to back and the events time them on the GPU. With dst2 and
 * src2 both nonzero, the same runs on a second stream at the same time (both ways at once),
 * timed from the first start to the last end. Every allocation, stream and event is released,
 * whatever failed; the spin is always released (and ends at budget_ns on the GPU clock
 * anyway). results = {elapsed ns, 1 when the host released the spin (2: its deadline came
 * first: the queueing took longer than budget_ns), the SM copy's grid (blocks of 512 threads;
 * 0 for the copy engine), 0}. A bad argument (loops 0 or above P2PC_MAX_LOOPS, n not a multiple
 * of 16, an unknown engine, only one of dst2/src2) fails as "p2pc argument", code 1, before
 * any call. */
void p2pcheck_shim_timed_copy(const p2pc_driver *d, void *spin, void *copy, unsigned engine,
                              p2pc_devptr dst, p2pc_devptr src, p2pc_devptr dst2,
                              p2pc_devptr src2, unsigned long long n, unsigned loops,
                              unsigned long long budget_ns, p2pc_report *out);

/* Latency: kernel p2pc_chain writes a pointer chase of `slots` slots `stride` bytes apart into
 * [p, p + slots*stride), then kernel p2pc_chase follows it, `warm` hops untimed and `hops`
 * timed, one thread. results = {ns for the timed hops, the offset reached, 0, 0}. */
void p2pcheck_shim_chase(const p2pc_driver *d, void *chain, void *chase, p2pc_devptr p,
                         unsigned long long slots, unsigned long long stride,
                         unsigned long long warm, unsigned long long hops, p2pc_report *out);

#endif
