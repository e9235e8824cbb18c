/*
 * p2pcheck.h: the C ABI of p2pcheck 0.1 (libp2pcheck.so.0, libp2pcheck.a).
 *
 * p2pcheck proves, with real memory traffic across processes, which ordered pairs of NVIDIA
 * GPUs work: "src->tgt" means a process on GPU tgt maps memory owned by a process on GPU src
 * (CUDA IPC) and both read back what was written. It answers vLLM's can_actually_p2p and
 * gpu_p2p_access_check (with vLLM's cache file, byte for byte). Nothing links against CUDA:
 * libcuda and libcudart are loaded at run time (P2PCHECK_LIBCUDA, P2PCHECK_LIBCUDART), so a
 * machine without a GPU gets an error status, never a crash. C11 and C++ (any standard).
 *
 * BUILDING AND LINKING
 *   cargo build --release puts both libraries (the crate capi/, so cargo names them
 *   libp2pcheck_capi.a and libp2pcheck_capi.so) and the worker in target/release/.
 *   Static: cc prog.c -Iinclude target/release/libp2pcheck_capi.a \
 *             -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
 *     Those are the system libraries the static library needs, exactly ("native-static-libs"
 *     of rustc; capi/tests/capi.rs links a C and a C++ program with this list). The program
 *     needs no file of p2pcheck at run time but the worker.
 *   Shared, from the build tree: the library's soname, the name a program loads, is
 *   libp2pcheck.so.0, so give the file that name too and link it:
 *     ln -sf libp2pcheck_capi.so target/release/libp2pcheck.so.0
 *     cc prog.c -Iinclude target/release/libp2pcheck.so.0 -Wl,-rpath,"$PWD/target/release"
 *   Installed: scripts/install.sh PREFIX puts the header in PREFIX/include; libp2pcheck.a,
 *     libp2pcheck.so.0, its libp2pcheck.so link and pkgconfig/p2pcheck.pc in PREFIX/lib; the
 *     worker in PREFIX/bin. There, cc prog.c $(pkg-config --cflags --static --libs p2pcheck)
 *     links the static library (p2pcheck.pc names libp2pcheck.a itself: a program linked
 *     with it has no dynamic dependency on libp2pcheck, with or without --static, which adds
 *     the system libraries above); cc prog.c -IPREFIX/include -LPREFIX/lib -lp2pcheck links
 *     the shared one. scripts/gen-pkgconfig.sh PREFIX prints that p2pcheck.pc alone.
 *   CMake: examples/cmake/CMakeLists.txt.
 *
 * THE WORKER EXECUTABLE
 *   The check runs in worker processes: the executable p2pcheck-worker, built beside the
 *   libraries. It is found, in order: p2pcheck_options_set_worker; $P2PCHECK_WORKER;
 *   p2pcheck-worker beside the program's executable, then beside libp2pcheck.so.0 when the
 *   shared library is used; p2pcheck-worker on $PATH. The program's own executable is never
 *   run as a worker, whatever its name. A program linked with libp2pcheck.a ships
 *   p2pcheck-worker beside its own executable, or sets P2PCHECK_WORKER to its path. It must
 *   be the same version (a worker of another protocol version: P2PCHECK_STATUS_VERSION).
 *
 * STATUS AND MESSAGES
 *   Every function that can fail returns a p2pcheck_status: P2PCHECK_STATUS_OK (0) or why not.
 *   A NULL where a pointer is required gives P2PCHECK_STATUS_NULL_ARGUMENT and a value out of
 *   range P2PCHECK_STATUS_INVALID_ARGUMENT, never a crash; a bug inside p2pcheck gives
 *   P2PCHECK_STATUS_PANIC (no panic crosses into the caller). Functions whose failures need
 *   words take `char *msg, size_t msg_len`: a caller buffer that receives the error's full
 *   text, NUL-terminated (an empty string on success), cut at a UTF-8 character boundary when
 *   it does not fit (the status stays the error's). msg NULL or msg_len 0: no message. The
 *   accessors, whose only failures are a NULL argument, an index out of range, a missing
 *   table entry or a handle of another process, return the status alone. Treat an unknown
 *   status value as an error.
 *
 * OUTPUT TEXT
 *   Functions that return text take `char *buf, size_t len, size_t *needed`: the text and its
 *   NUL are written to buf; when they do not fit in len bytes, what fits is written
 *   NUL-terminated (cut at a UTF-8 character boundary) and the status is
 *   P2PCHECK_STATUS_BUFFER_TOO_SMALL. *needed (when needed is not NULL) always receives the
 *   text's length in bytes without the NUL, so buf NULL, len 0 asks for the size. buf may be
 *   NULL only when len is 0.
 *
 * WHAT IS COPIED
 *   Nothing the caller passes is kept: strings (paths, faults, cache_dir) and the src/tgt
 *   arrays are read, and copied where needed, before the call returns, so they may be freed
 *   or changed at once; p2pcheck_check and p2pcheck_start copy the options when they are
 *   called (changing or freeing the options afterwards does not affect a check already
 *   started). Results are written into the caller's variables and buffers before the call
 *   returns, never later. Every report handed out is a new object of the caller's, freed with
 *   p2pcheck_report_free. The strings p2pcheck_version, _status_text, _class_name and
 *   _class_hint return are static: never freed, valid for the life of the process.
 *
 * THREAD SAFETY
 *   Every function may be called from any thread, concurrently with any other. A
 *   p2pcheck_pending may be used from several threads at once: one thread may wait on it while
 *   another cancels it (p2pcheck_pending_cancel never blocks and ends every wait on it at
 *   once) or waits too. Calls on one p2pcheck_options from two threads at once are serialised
 *   inside. A p2pcheck_report never changes after it is made; reading one from several
 *   threads at once is fine. No handle may be used during or after its _free.
 *
 * FORK
 *   A handle belongs to the process that made it. In the child of a fork(), every call on an
 *   inherited handle returns P2PCHECK_STATUS_WRONG_PROCESS at once and touches nothing of it
 *   (no lock, no thread: the parent's check thread does not exist in the child; the parent's
 *   check goes on undisturbed); the _free functions return at once and release nothing (the
 *   memory goes when the child exits or execs). A child of a fork made while a check ran in
 *   the parent holds copies of the pipes to its workers until it exits or execs (a worker
 *   then waits for its end of the work up to 10 s longer before it is killed), and should
 *   call nothing else of p2pcheck before exec, as for any library with threads; a child of a
 *   fork made while no check ran may use p2pcheck with handles of its own.
 *
 * ENVIRONMENT
 *   The library reads CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER, P2PCHECK_LIBCUDA,
 *   P2PCHECK_LIBCUDART, P2PCHECK_WORKER, PATH, VLLM_CACHE_ROOT, XDG_CACHE_HOME, HOME and
 *   (policy) VLLM_BATCH_INVARIANT and VLLM_USE_NCCL_SYMM_MEM, as the README of p2pcheck
 *   describes, during the calls that need them, every time; each function's comment names
 *   what it reads (one that names nothing reads nothing). Nothing read is kept from one call
 *   to the next, with two exceptions: once libcuda or libcudart is loaded into this process
 *   (only p2pcheck_gpu_p2p_access_check and _access_check_with load libcuda here, and only
 *   where the GPUs cannot be named from /proc/driver/nvidia) it stays loaded, while a failed
 *   load is tried again, with P2PCHECK_LIBCUDA read again, at the next call; and
 *   P2PCHECK_TRACE is read once, at this process's first CUDA call. A check's workers inherit
 *   the environment as it is when they start (during the check), with the variables that
 *   CUDA, the trace and the simulator read. Do not change the environment while a p2pcheck
 *   call runs in another thread, or while a background check runs (setenv is not
 *   thread-safe).
 *
 * OUTPUT
 *   The library writes nothing to the host's stdout or stderr (a bug caught as
 *   P2PCHECK_STATUS_PANIC is also reported on stderr by Rust's panic handler). The workers'
 *   stderr is captured by the check, not passed to the host's: what a worker writes there
 *   (the simulator's notes, a failing worker's own errors) comes back in the report's warnings
 *   or in the error's message.
 *
 * PROCESSES
 *   A check starts its workers as child processes of the caller, from a thread of its own
 *   that reaps them; they are killed if the caller dies. The library signals and reaps only
 *   the processes it started: another child of the host is never touched. A host must not
 *   reap children it did not start (waitpid(-1, ...), SIGCHLD set to SIG_IGN) while a check
 *   runs. p2pcheck_check returns as soon as the verdicts are known, while the workers still
 *   tear their CUDA contexts down (about 0.3 s on an H200); a program that exits at once ends
 *   them then (they die with the thread that started them, and init reaps them). To return
 *   only when every worker has been reaped, use p2pcheck_start, p2pcheck_pending_wait and
 *   p2pcheck_pending_free.
 */

#ifndef P2PCHECK_H
#define P2PCHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What a call gave. 0 is success; values are stable; later versions only add values. */
typedef enum p2pcheck_status {
    P2PCHECK_STATUS_OK = 0,
    /* CUDA failed in this process: the library could not be loaded, lacks a symbol, or a call
       failed (the message names the call, device and CUDA's error). */
    P2PCHECK_STATUS_CUDA = 1,
    /* A worker process could not start CUDA (the message has its failing call). */
    P2PCHECK_STATUS_WORKER_CUDA = 2,
    /* The worker executable could not be found or started, or misbehaved before any pair. */
    P2PCHECK_STATUS_WORKER = 3,
    /* The worker speaks another protocol version: install the matching p2pcheck-worker. */
    P2PCHECK_STATUS_VERSION = 4,
    /* No GPU is visible (none, or CUDA_VISIBLE_DEVICES selects none). */
    P2PCHECK_STATUS_NO_DEVICE = 5,
    /* An argument is invalid or out of range (a device id, an option, an index). */
    P2PCHECK_STATUS_INVALID_ARGUMENT = 6,
    /* vLLM's cache file or its lock could not be used. */
    P2PCHECK_STATUS_CACHE = 7,
    /* The check was cancelled (p2pcheck_pending_cancel). */
    P2PCHECK_STATUS_CANCELLED = 8,
    /* A required pointer argument is NULL. */
    P2PCHECK_STATUS_NULL_ARGUMENT = 9,
    /* Internal error in p2pcheck (a bug), caught at the C boundary. */
    P2PCHECK_STATUS_PANIC = 10,
    /* An output buffer is too small for the text; what fits was written. */
    P2PCHECK_STATUS_BUFFER_TOO_SMALL = 11,
    /* p2pcheck_pending_try_wait, _wait_ms: the check is still running. */
    P2PCHECK_STATUS_NOT_READY = 12,
    /* A policy table has no entry for these arguments. */
    P2PCHECK_STATUS_NOT_FOUND = 13,
    /* An error this version does not name (reserved for later versions' kinds of error). */
    P2PCHECK_STATUS_OTHER = 14,
    /* The handle was made by another process: this is a child of fork() (see FORK). Nothing
       of the handle was touched. */
    P2PCHECK_STATUS_WRONG_PROCESS = 15
} p2pcheck_status;

/* Which procedure checks the pairs. */
typedef enum p2pcheck_engine {
    /* One worker per GPU for the whole run, every pair at once, no device reset (default). */
    P2PCHECK_ENGINE_PARALLEL = 0,
    /* vLLM's procedure exactly: two workers, pair after pair, a device reset after each. */
    P2PCHECK_ENGINE_VLLM = 1
} p2pcheck_engine;

/* How much evidence a check gathers (each level includes the ones below); also the tier a
   pair failed at (p2pcheck_pair_result.failed_tier). */
typedef enum p2pcheck_level {
    /* Only in p2pcheck_pair_result.failed_tier: no tier failed. */
    P2PCHECK_LEVEL_NONE = -1,
    /* vLLM's test: copy-engine memset through the mapping, both sides read back (1 KiB). */
    P2PCHECK_LEVEL_COPY = 0,
    /* Also SM stores and loads of a pattern through the mapping, 1/4/8/16 bytes wide. */
    P2PCHECK_LEVEL_KERNEL = 1,
    /* Also kernels resident on both sides at once exchanging flags (default). */
    P2PCHECK_LEVEL_HANDSHAKE = 2
} p2pcheck_level;

/* Which GPUs a parallel-engine worker's CUDA sees. */
typedef enum p2pcheck_visibility {
    /* Only its own (faster start-up); falls back to ALL where it cannot be done (default). */
    P2PCHECK_VISIBILITY_ONE = 0,
    /* Every GPU this process sees. */
    P2PCHECK_VISIBILITY_ALL = 1
} p2pcheck_visibility;

/* A transport: how a pair's two processes reach each other's memory. */
typedef enum p2pcheck_transport {
    /* Legacy CUDA IPC (cudaIpcGetMemHandle/cudaIpcOpenMemHandle): what vLLM's check uses. */
    P2PCHECK_TRANSPORT_IPC = 0,
    /* cuMemCreate memory exported as a POSIX descriptor, passed over a Unix socket, imported
       and mapped (PyTorch's symmetric memory, NCCL_CUMEM_ENABLE). */
    P2PCHECK_TRANSPORT_CUMEM = 1
} p2pcheck_transport;

/* Which transports a check runs every tier over. */
typedef enum p2pcheck_transports {
    /* Legacy IPC alone (default). */
    P2PCHECK_TRANSPORTS_IPC = 0,
    /* The cuMem path alone (the parallel engine only). */
    P2PCHECK_TRANSPORTS_CUMEM = 1,
    /* Both: the report holds every pair over IPC, then every pair over cuMem. */
    P2PCHECK_TRANSPORTS_ALL = 2
} p2pcheck_transports;

/* A pair's verdict. Only OK is true for vLLM. */
typedef enum p2pcheck_verdict {
    /* Every tier asked for passed, as both processes saw it. */
    P2PCHECK_VERDICT_OK = 0,
    /* The pair ran to the end and a tier failed (failed_tier, diagnosis, details say how). */
    P2PCHECK_VERDICT_FAILS = 1,
    /* A worker stopped answering during an attempt at this pair (details say which). */
    P2PCHECK_VERDICT_HANG = 2,
    /* A worker died or broke the protocol during an attempt at this pair, or the pair was
       not attempted (the check's deadline passed first). */
    P2PCHECK_VERDICT_ERROR = 3
} p2pcheck_verdict;

/* One tier's result for a pair, both sides combined. */
typedef enum p2pcheck_tier {
    /* Not asked for, or the pair never got that far. */
    P2PCHECK_TIER_NOT_RUN = 0,
    /* Passed on both sides. */
    P2PCHECK_TIER_OK = 1,
    /* Failed on a side. */
    P2PCHECK_TIER_FAILED = 2
} p2pcheck_tier;

/* The diagnosis of a pair's failed tier (p2pcheck_class_hint gives the usual cause). */
typedef enum p2pcheck_class {
    /* No tier failed: the pair is ok, or it hung or errored (see the verdict). */
    P2PCHECK_CLASS_NONE = 0,
    /* Nothing written through the mapping arrived (PCIe with ACS and a translating IOMMU). */
    P2PCHECK_CLASS_NEVER_WRITTEN = 1,
    /* Some pages arrived, others kept their old contents. */
    P2PCHECK_CLASS_PARTIAL = 2,
    /* Data arrived, but wrong. */
    P2PCHECK_CLASS_WRONG_DATA = 3,
    /* cudaIpcOpenMemHandle failed (containers: share the IPC and PID namespaces). */
    P2PCHECK_CLASS_OPEN_FAILED = 4,
    /* Resident kernels never saw each other's flags within the deadline. */
    P2PCHECK_CLASS_TIMEOUT = 5,
    /* Another failed call, or the driver could not be used. */
    P2PCHECK_CLASS_OTHER = 6,
    /* cuMem transport: cuMemCreate/cuMemExportToShareableHandle refused a POSIX descriptor. */
    P2PCHECK_CLASS_EXPORT_REFUSED = 7,
    /* cuMem transport: the descriptor could not be passed over the Unix socket. */
    P2PCHECK_CLASS_FD_NOT_PASSABLE = 8,
    /* cuMem transport: cuMemImportFromShareableHandle refused the descriptor. */
    P2PCHECK_CLASS_IMPORT_REFUSED = 9,
    /* cuMem transport: cuMemAddressReserve, cuMemMap or cuMemSetAccess refused. */
    P2PCHECK_CLASS_MAP_REFUSED = 10
} p2pcheck_class;

/*
 * One pair of a report as plain data, filled by p2pcheck_report_pair. Every field is a 32-bit
 * integer (the enum-valued ones hold the enum's value), so the layout is fixed:
 * 48 bytes, alignment 4, no padding, the offsets as commented. tests/capi.rs checks the size,
 * alignment, offsets and field types, compiled as C and as C++, against the library's.
 * A pair that does not pass at once is attempted again on fresh workers; only a pass at once
 * or the same failure twice (same tier, same diagnosis) is persistable, and anything else is
 * answered false (ok is 0) and never written to vLLM's cache.
 */
typedef struct p2pcheck_pair_result {
    uint32_t src;         /* offset  0: the device that owns the memory */
    uint32_t tgt;         /* offset  4: the device that maps and accesses it */
    int32_t ok;           /* offset  8: 1 when verdict is P2PCHECK_VERDICT_OK, else 0 */
    int32_t verdict;      /* offset 12: a p2pcheck_verdict */
    int32_t copy;         /* offset 16: a p2pcheck_tier: vLLM's copy test */
    int32_t kernel;       /* offset 20: a p2pcheck_tier: the kernel tier */
    int32_t handshake;    /* offset 24: a p2pcheck_tier: the handshake tier */
    int32_t failed_tier;  /* offset 28: a p2pcheck_level: the weakest failed tier, or NONE */
    int32_t diagnosis;    /* offset 32: a p2pcheck_class: the failed tier's diagnosis */
    uint32_t attempts;    /* offset 36: 1, or 2 when the first attempt did not pass */
    int32_t driver_claim; /* offset 40: cudaDeviceCanAccessPeer: 1, 0, or -1 not asked */
    int32_t persistable;  /* offset 44: 1 when the verdict may go into vLLM's cache */
} p2pcheck_pair_result;

/*
 * One pair's bandwidth measurement (p2pcheck_options_set_bandwidth) as plain data, filled by
 * p2pcheck_report_pair_bandwidth: 120 bytes, alignment 8, no padding, the offsets as
 * commented. The figures are measured by the process on tgt through its IPC mapping of src's
 * memory (README, "Bandwidth"); each is the median of 5 timed samples after a warm-up, and the
 * bytes moved are checked after them: wrong bytes are state 2, never a figure.
 */
typedef struct p2pcheck_bandwidth {
    int32_t state;      /* offset   0: 0 not measured (its copy tier did not pass, or the
                           measurement was off), 1 measured, 2 failed (no figures) */
    int32_t slow;       /* offset   4: 1 when the copy engine's write or read is below floor */
    double floor_gbps;  /* offset   8: the floor judged against (the given one, else the
                           link's from NVML, the simulator's 270); 0: none, no verdict */
    double gbps[6];     /* offset  16: median GB/s: copy engine write, read, both ways at
                           once; SM write, read, both ways at once */
    double cv[6];       /* offset  64: each figure's coefficient of variation (0.01 = 1 %) */
    double latency_ns;  /* offset 112: one dependent 8-byte load through the mapping */
} p2pcheck_bandwidth;

/* Options of a check (opaque): p2pcheck_options_new, the setters, p2pcheck_options_free. */
typedef struct p2pcheck_options p2pcheck_options;

/* The result of a check (opaque, immutable): p2pcheck_check, p2pcheck_pending_wait. */
typedef struct p2pcheck_report p2pcheck_report;

/* A check running in the background (opaque): p2pcheck_start. */
typedef struct p2pcheck_pending p2pcheck_pending;

/* ---- Versions and texts ---------------------------------------------------------------- */

/* The library's version, e.g. "0.1.0": a static string, never NULL. */
const char *p2pcheck_version(void);

/* The worker protocol version this library speaks (its p2pcheck-worker must speak it too). */
uint32_t p2pcheck_protocol_version(void);

/* What a status means, in words: a static string, never NULL ("unknown status" for a value
   this version does not define). */
const char *p2pcheck_status_text(p2pcheck_status status);

/* A class's name ("never-written", "partial", "wrong-data", "open-failed", "timeout",
   "other"; "none" for P2PCHECK_CLASS_NONE): a static string, "" for an unknown value. */
const char *p2pcheck_class_name(p2pcheck_class diagnosis);

/* What usually causes a class, for a person: a static string, "" for NONE or an unknown
   value. */
const char *p2pcheck_class_hint(p2pcheck_class diagnosis);

/* ---- Options --------------------------------------------------------------------------- */

/* New options with the defaults: parallel engine, level handshake, visibility one, 5 s step
   timeout, 60 s start-up timeout, 2 MiB kernel tier, the worker searched, the real driver.
   Free with p2pcheck_options_free. NULL only if the library failed internally. */
p2pcheck_options *p2pcheck_options_new(void);

/* Frees options made by p2pcheck_options_new; never blocks. NULL is ignored. */
void p2pcheck_options_free(p2pcheck_options *opts);

/* Sets the engine (a p2pcheck_engine). INVALID_ARGUMENT for another value. */
p2pcheck_status p2pcheck_options_set_engine(p2pcheck_options *opts, p2pcheck_engine engine,
                                            char *msg, size_t msg_len);

/* Sets the level (COPY, KERNEL or HANDSHAKE). INVALID_ARGUMENT for another value. The level is
   recorded beside vLLM's cache file: a cached answer of another level is checked again. */
p2pcheck_status p2pcheck_options_set_level(p2pcheck_options *opts, p2pcheck_level level,
                                           char *msg, size_t msg_len);

/* Sets what parallel-engine workers see (a p2pcheck_visibility). INVALID_ARGUMENT for another
   value. */
p2pcheck_status p2pcheck_options_set_visibility(p2pcheck_options *opts,
                                                p2pcheck_visibility visibility, char *msg,
                                                size_t msg_len);

/* Sets the transports every tier runs over (a p2pcheck_transports). INVALID_ARGUMENT for
   another value; a check with the vLLM engine and another choice than IPC is INVALID_ARGUMENT
   too (vLLM's procedure is legacy IPC's). vLLM's cache only ever holds IPC's verdicts. */
p2pcheck_status p2pcheck_options_set_transport(p2pcheck_options *opts,
                                               p2pcheck_transports transport, char *msg,
                                               size_t msg_len);

/* Sets the timeouts in milliseconds: step_ms, how long any single step of a pair may take
   (longer: the pair is HANG), and startup_ms, how long a worker may take to start CUDA. 0
   keeps a value as it is. Each must be from 1 ms to 1 day (86400000 ms), else
   INVALID_ARGUMENT and nothing changes. */
p2pcheck_status p2pcheck_options_set_timeouts_ms(p2pcheck_options *opts, uint64_t step_ms,
                                                 uint64_t startup_ms, char *msg,
                                                 size_t msg_len);

/* Sets the kernel tier's pattern area per pair in bytes: a multiple of 256 KiB from 256 KiB to
   1 GiB (default 2 MiB), else INVALID_ARGUMENT. */
p2pcheck_status p2pcheck_options_set_kernel_bytes(p2pcheck_options *opts, uint32_t bytes,
                                                  char *msg, size_t msg_len);

/* Turns the bandwidth measurement on (on true) or off (the default: the check's time does not
   change): after the tiers, each pair whose copy tier passed is measured alone, about 60 ms a
   pair over NVLink (p2pcheck_bandwidth). transfer_bytes: each timed transfer, a multiple of
   2 MiB up to 512 MiB (0: 64 MiB); min_gbps: the floor for every pair of two GPUs (0: the
   link's, from NVML; none where the link is unknown). The parallel engine only: with
   P2PCHECK_ENGINE_VLLM, or a bad size or floor, INVALID_ARGUMENT and nothing changes. */
p2pcheck_status p2pcheck_options_set_bandwidth(p2pcheck_options *opts, bool on,
                                               uint32_t transfer_bytes, double min_gbps,
                                               char *msg, size_t msg_len);

/* Sets the worker executable's path (any bytes but NUL, copied; checked when a check starts:
   a path that is not an executable file then gives P2PCHECK_STATUS_WORKER). NULL: search as
   the opening comment says. "" is INVALID_ARGUMENT. */
p2pcheck_status p2pcheck_options_set_worker(p2pcheck_options *opts, const char *path,
                                            char *msg, size_t msg_len);

/* Runs the workers on p2pcheck's simulated driver: a machine of `gpus` GPUs (1 to 64) with
   the faults in `faults`, a comma-separated list of SRC->TGT:KIND such as
   "0->1:drop-writes,2->3:hang" (KIND: ipc-open-fails, drop-writes, corrupt, sm-only,
   late-visibility, hang, crash, one-way, claim-no, partial, shifted, slow, fast-wrong,
   cumem-export-fails, cumem-import-fails, cumem-access-fails, cumem-drop-writes), each
   optionally followed
   by "@once" (only in the first attempt at the pair of each check: the fresh workers of its
   retry do not see it), or NULL or "" for none. gpus 0 with no faults turns the simulation off. A fault naming a GPU that does not exist,
   an unknown kind or a malformed entry is INVALID_ARGUMENT, with the entry in the message. */
p2pcheck_status p2pcheck_options_set_simulation(p2pcheck_options *opts, uint32_t gpus,
                                                const char *faults, char *msg,
                                                size_t msg_len);

/* ---- The check ------------------------------------------------------------------------- */

/*
 * Checks the pairs src[i]->tgt[i] (i < n_pairs) and, on success, stores a new report in *out
 * (free it with p2pcheck_report_free); on failure *out is set to NULL. n_pairs 0 checks every
 * ordered pair of the visible devices (src and tgt are then ignored and may be NULL). opts
 * NULL: the defaults. Returns when every verdict is known; the workers exit in the background.
 * A pair that fails, hangs or errors is not a failure of the call: it is in the report. A
 * device id the workers cannot see is INVALID_ARGUMENT; n_pairs above 65536 too.
 * Environment, read during the call: CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER, P2PCHECK_WORKER
 * and PATH (the worker search); the workers inherit the rest.
 */
p2pcheck_status p2pcheck_check(const p2pcheck_options *opts, const uint32_t *src,
                               const uint32_t *tgt, size_t n_pairs, p2pcheck_report **out,
                               char *msg, size_t msg_len);

/* Frees a report; never blocks. NULL is ignored. */
void p2pcheck_report_free(p2pcheck_report *report);

/* The number of devices the workers saw. */
p2pcheck_status p2pcheck_report_device_count(const p2pcheck_report *report, uint32_t *out);

/* The number of pairs in the report (in the order asked; row-major src, tgt for all pairs). */
p2pcheck_status p2pcheck_report_pair_count(const p2pcheck_report *report, size_t *out);

/* Pair `index` (below the pair count, else INVALID_ARGUMENT) as plain data. */
p2pcheck_status p2pcheck_report_pair(const p2pcheck_report *report, size_t index,
                                     p2pcheck_pair_result *out);

/* Pair `index`'s bandwidth measurement (below the pair count, else INVALID_ARGUMENT) as plain
   data; state 0 when it was not measured. p2pcheck_check judges slow against the link NVML
   describes; a report from p2pcheck_pending_wait only against min_gbps, the simulator's link
   and none for one GPU's own memory. */
p2pcheck_status p2pcheck_report_pair_bandwidth(const p2pcheck_report *report, size_t index,
                                               p2pcheck_bandwidth *out);

/* The transport pair `index` was checked over (a p2pcheck_transport, in *out). With
   P2PCHECK_TRANSPORTS_ALL the report holds every pair over IPC first, then over cuMem; the
   pair struct's layout is unchanged. */
p2pcheck_status p2pcheck_report_pair_transport(const p2pcheck_report *report, size_t index,
                                               int *out);

/* What was seen for pair `index`, one line per detail ('\n' between them): why it failed,
   hung or errored, with the diagnosis and its usual cause in brackets, and what an earlier
   attempt gave. "" for a pair that passed at its first attempt. See OUTPUT TEXT. */
p2pcheck_status p2pcheck_report_pair_details(const p2pcheck_report *report, size_t index,
                                             char *buf, size_t len, size_t *needed);

/* Seconds from the start of the check to its last verdict. */
p2pcheck_status p2pcheck_report_answer_seconds(const p2pcheck_report *report, double *out);

/* Rounds of fresh workers after a hang or a worker's death (0 when nothing went wrong). */
p2pcheck_status p2pcheck_report_restarts(const p2pcheck_report *report, uint32_t *out);

/* Worker processes started, in all rounds. */
p2pcheck_status p2pcheck_report_workers_started(const p2pcheck_report *report, uint32_t *out);

/* The number of warnings: things to know that are not a pair's verdict (a visibility
   fallback, an ignored part of CUDA_VISIBLE_DEVICES, processes that disagree). */
p2pcheck_status p2pcheck_report_warning_count(const p2pcheck_report *report, size_t *out);

/* Warning `index` (below the warning count, else INVALID_ARGUMENT). See OUTPUT TEXT. */
p2pcheck_status p2pcheck_report_warning(const p2pcheck_report *report, size_t index, char *buf,
                                        size_t len, size_t *needed);

/* ---- vLLM's functions ------------------------------------------------------------------ */

/* vLLM's can_actually_p2p: checks src[i]->tgt[i] for i < n and sets results[i] to whether
   the pair's verdict is OK. opts NULL: the defaults (options with P2PCHECK_ENGINE_VLLM and
   P2PCHECK_LEVEL_COPY run vLLM's exact test). n 0 does nothing. Environment: as
   p2pcheck_check. */
p2pcheck_status p2pcheck_can_actually_p2p(const p2pcheck_options *opts, const uint32_t *src,
                                          const uint32_t *tgt, size_t n, bool *results,
                                          char *msg, size_t msg_len);

/* vLLM's gpu_p2p_access_check(src, tgt): can a process on tgt use memory owned by a process
   on src? With the default options and vLLM's cache folder; see p2pcheck_access_check_with
   (the environment too). */
p2pcheck_status p2pcheck_gpu_p2p_access_check(uint32_t src, uint32_t tgt, bool *result,
                                              char *msg, size_t msg_len);

/*
 * gpu_p2p_access_check with options (NULL: the defaults) and a cache folder (NULL: vLLM's:
 * $VLLM_CACHE_ROOT, else $XDG_CACHE_HOME/vllm, else ~/.cache/vllm). Answers, in order: from
 * this process's earlier answers; from vLLM's cache file when the fingerprint beside it
 * matches the machine, which needs no CUDA and no worker at all; else by checking every pair
 * once (other processes wait on a lock) and writing the file and its fingerprint. refresh
 * true checks again whatever is cached. src or tgt out of range is INVALID_ARGUMENT, and so
 * is a cache_dir of "". Environment, read at each call: CUDA_VISIBLE_DEVICES; VLLM_CACHE_ROOT,
 * XDG_CACHE_HOME and HOME when cache_dir is NULL; P2PCHECK_LIBCUDA where the GPUs cannot be
 * named from /proc/driver/nvidia and libcuda is not loaded yet (this process then counts them
 * with cuInit and cuDeviceGetCount; a failed load is tried again at the next call); and, when
 * a check runs, p2pcheck_check's.
 */
p2pcheck_status p2pcheck_access_check_with(const p2pcheck_options *opts, const char *cache_dir,
                                           bool refresh, uint32_t src, uint32_t tgt,
                                           bool *result, char *msg, size_t msg_len);

/* The path of vLLM's cache file for n_devices devices (1 to 256) and this process's
   CUDA_VISIBLE_DEVICES, in cache_dir (NULL: vLLM's folder, as above; "" is INVALID_ARGUMENT).
   Creates nothing. See OUTPUT TEXT. Environment, read at each call: CUDA_VISIBLE_DEVICES, and
   VLLM_CACHE_ROOT, XDG_CACHE_HOME and HOME when cache_dir is NULL. */
p2pcheck_status p2pcheck_cache_path(uint32_t n_devices, const char *cache_dir, char *buf,
                                    size_t len, size_t *needed, char *msg, size_t msg_len);

/* ---- In the background ----------------------------------------------------------------- */

/* Starts p2pcheck_check's work on a thread of its own and returns at once with a handle in
   *out (NULL on failure); errors of the check itself come from the waits. The options and the
   src/tgt arrays are copied before it returns. The check's thread reads the environment as
   p2pcheck_check does, as it begins (just after this returns). Free the handle with
   p2pcheck_pending_free. */
p2pcheck_status p2pcheck_start(const p2pcheck_options *opts, const uint32_t *src,
                               const uint32_t *tgt, size_t n_pairs, p2pcheck_pending **out,
                               char *msg, size_t msg_len);

/* The result if the check has ended, without waiting: P2PCHECK_STATUS_NOT_READY while it
   runs. The result is kept in the handle: every wait after the check ended gives it again,
   OK with a new report in *out each time (each one the caller's, freed with
   p2pcheck_report_free), or the check's error, the same status and message each time
   (P2PCHECK_STATUS_CANCELLED after p2pcheck_pending_cancel). *out is NULL unless the status
   is OK. */
p2pcheck_status p2pcheck_pending_try_wait(p2pcheck_pending *pending, p2pcheck_report **out,
                                          char *msg, size_t msg_len);

/* Waits at most timeout_ms milliseconds for the result, as p2pcheck_pending_try_wait gives
   it; P2PCHECK_STATUS_NOT_READY if the check still runs then. 0 does not wait;
   UINT64_MAX waits for the result. A p2pcheck_pending_cancel from another thread ends the
   wait at once. */
p2pcheck_status p2pcheck_pending_wait_ms(p2pcheck_pending *pending, uint64_t timeout_ms,
                                         p2pcheck_report **out, char *msg, size_t msg_len);

/* Waits for the result, as p2pcheck_pending_try_wait gives it (the check's own deadlines
   bound the wait: every step of a pair has one). A p2pcheck_pending_cancel from another
   thread ends the wait at once. */
p2pcheck_status p2pcheck_pending_wait(p2pcheck_pending *pending, p2pcheck_report **out,
                                      char *msg, size_t msg_len);

/* Stops the check, from any thread, and returns at once (it never blocks): unless the result
   was complete already, the result becomes P2PCHECK_STATUS_CANCELLED at once, and every wait
   on the handle, in any thread, returns with it; the check's thread then kills and reaps
   its workers. After the result, it changes nothing. */
p2pcheck_status p2pcheck_pending_cancel(p2pcheck_pending *pending);

/* Frees the handle: cancels the check if it has no result yet, then blocks until every
   worker process has exited and been reaped: after a result, the workers' teardown (about
   0.3 s on an H200; a worker gets at most 10 s before it is killed); after a cancel, the time
   to kill and reap them (well under a second on the simulator). No other call on the handle
   may run at the same time or follow. NULL is ignored. */
void p2pcheck_pending_free(p2pcheck_pending *pending);

/* ---- All-reduce policy (vLLM's all_reduce_utils) --------------------------------------- */

/* vLLM's should_nccl_symm_mem_allreduce: whether NCCL symmetric memory all-reduce is used for
   nbytes on world_size GPUs. Never with batch_invariant or without symm_mem_enabled. */
bool p2pcheck_should_nccl_symm_mem_allreduce(uint32_t world_size, uint64_t nbytes,
                                             bool batch_invariant, bool symm_mem_enabled);

/* The largest tensor in bytes vLLM's custom all-reduce handles on world_size GPUs of compute
   capability major.minor (CUSTOM_ALL_REDUCE_MAX_SIZES) into *out; P2PCHECK_STATUS_NOT_FOUND
   when the table has no entry. */
p2pcheck_status p2pcheck_custom_allreduce_max_size(uint32_t major, uint32_t minor,
                                                   uint32_t world_size, uint64_t *out);

/* The same for vLLM's symmetric-memory all-reduce (SYMM_MEM_ALL_REDUCE_MAX_SIZES). */
p2pcheck_status p2pcheck_symm_mem_max_size(uint32_t major, uint32_t minor, uint32_t world_size,
                                           uint64_t *out);

/* The two switches from the environment as vLLM reads them, at each call:
   VLLM_BATCH_INVARIANT and VLLM_USE_NCCL_SYMM_MEM, each on for 1 or true, off for 0, false,
   unset or empty (case-insensitive); another value is INVALID_ARGUMENT naming it. */
p2pcheck_status p2pcheck_policy_config_from_env(bool *batch_invariant, bool *symm_mem_enabled,
                                                char *msg, size_t msg_len);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* P2PCHECK_H */
