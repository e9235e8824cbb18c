/* p2pcheck's CUDA simulator: a stand-in for BOTH libcuda.so.1 (driver API) and libcudart.so
 * (runtime API) in one shared library, behaving like a machine with N GPUs whose peer-to-peer
 * paths can be broken pair by pair. It lets the whole multi-process check (a producer and a
 * consumer worker exchanging CUDA IPC handles over pipes) run on CI machines without a GPU.
 *
 * Build:  cc -Wall -Wextra -Werror -std=gnu11 -O2 -fPIC -shared [-fvisibility=hidden] \
 *            -o libsim.so sim.c
 * Use:    P2PCHECK_LIBCUDA=/abs/libsim.so P2PCHECK_LIBCUDART=/abs/libsim.so P2PCHECK_SIM_GPUS=4 ...
 * p2pcheck can tell it from a real driver by the extra symbol p2pcheck_sim_abi() (returns 1).
 * There is no GPU: "device memory" is host shared memory and "kernels" are C functions that run
 * synchronously, on the calling thread, inside cuLaunchKernel.
 *
 * CONFIGURATION (environment variables, read once, at the first call into the library)
 *   P2PCHECK_SIM_GPUS=N    number of simulated physical GPUs, 0..64. Unset, empty or invalid
 *                          means 0 (invalid text also warns on stderr): a machine without a GPU,
 *                          where cuInit and the runtime answer CUDA_ERROR_NO_DEVICE (100).
 *   CUDA_VISIBLE_DEVICES   applied over the N GPUs the way CUDA applies it: unset = all, in
 *                          order; set but empty = none; otherwise comma-separated entries,
 *                          whitespace around each ignored, each a decimal physical index < N or
 *                          a GPU UUID (or a unique prefix of one, "GPU-" included). The first
 *                          invalid, out-of-range or repeated entry ends the list (it and all
 *                          later entries are ignored). GPU k's UUID is
 *                          GPU-51a00000-0000-0000-0000-<k as 12 lower-case hex digits>.
 *                          Entry i of the list is local ordinal i: every API takes local
 *                          ordinals; handles and faults use physical ids.
 *   P2PCHECK_SIM_FAULTS    comma-separated items SRC->TGT:KIND[@once], SRC and TGT PHYSICAL GPU
 *                          ids < N (whitespace around items and tokens allowed), for example
 *                          "0->1:drop-writes,2->3:hang@once". One pair may carry several kinds.
 *                          Invalid text (unknown kind or modifier, id >= N, bad syntax, empty
 *                          item), or an @once fault without a usable P2PCHECK_SIM_LEDGER, prints
 *                          a message naming the bad item on stderr, and then EVERY call (except
 *                          the error-name/-string functions and p2pcheck_sim_abi) fails with
 *                          CUDA_ERROR_INVALID_VALUE / cudaErrorInvalidValue (1), so that a typo
 *                          can never pass for a clean run.
 *   P2PCHECK_SIM_LEDGER    (needed by @once faults only) a path to a file every process of one
 *                          check opens read-write and maps shared (grown to 32 KiB of zeros when
 *                          shorter): p2pcheck passes a fresh memfd of its own per check, as
 *                          /proc/<pid>/fd/<n>, so nothing is left on disk. Zeros: no pair's
 *                          @once faults claimed yet.
 *
 * FAULTS. A fault on SRC->TGT means "TGT accessing SRC's memory": it applies to accesses made
 * by a process whose current device is (physically) TGT to memory owned by (physical) device SRC
 * that the process mapped from another process: with cudaIpcOpenMemHandle, or imported with
 * cuMemImportFromShareableHandle and mapped with cuMemMap (a "peer mapping" of either
 * transport: the kinds below that name no transport model the path between the GPUs, which both
 * use). Memory a process allocated itself is never faulted. SRC == TGT is allowed (two
 * processes sharing one GPU). Kinds:
 *   ipc-open-fails   cudaIpcOpenMemHandle returns cudaErrorMapBufferObjectFailed (205), as in a
 *                    container without a shared IPC namespace.
 *   drop-writes      the driver says yes, but writes through the mapping (cudaMemset,
 *                    cuMemsetD8, cudaMemcpy into it, kernel stores) silently vanish; reads work.
 *   corrupt          writes through the mapping land, but every written byte at allocation
 *                    offset % 64 == 7 is XORed with 0x5a.
 *   sm-only          copy-engine work (cudaMemset, cudaMemcpy, cuMemsetD8, cuMemcpyDtoH) works;
 *                    kernel loads through the mapping read 0xEE and kernel stores vanish.
 *   late-visibility  a kernel's stores through the mapping are buffered and become visible only
 *                    when the kernel ends (then in program order). Kernels run to completion
 *                    inside cuLaunchKernel, so a kernel that only stores, or a store followed by
 *                    a later launch that loads, cannot tell; two kernels of two processes
 *                    running at the same time can: p2pc_handshake's driver never gets its flag
 *                    through while it runs, and both sides time out (at once: see there).
 *   hang             the first access through the mapping (memset, memcpy, kernel) never
 *                    returns (a pause() loop; the process stays killable by SIGTERM/SIGKILL).
 *   crash            the first access through the mapping kills the process with SIGSEGV.
 *   one-way          exactly drop-writes on SRC->TGT; TGT->SRC untouched (an alias that makes
 *                    the intent explicit).
 *   claim-no         cudaDeviceCanAccessPeer(&c, TGT, SRC) answers 0 although access works.
 *   partial          every write through the mapping (cudaMemset, cuMemsetD8, cudaMemcpy into
 *                    it, kernel stores) to a byte whose allocation offset lies in an odd 64 KiB
 *                    page ((offset / 65536) % 2 == 1) silently vanishes; writes to even pages
 *                    land; reads work.
 *   shifted          kernel stores through the mapping land 4096 bytes further than addressed
 *                    (allocation offset + 4096); the bytes that would land at or past the
 *                    allocation's end vanish. Copy-engine writes and all loads are unaffected.
 *   slow             bandwidth: every timed transfer through the mapping (cuMemcpyDtoDAsync,
 *                    p2pc_copy, p2pc_chase) is modelled at the speed of a path through the host
 *                    (SIM_SLOW_GBPS, SIM_SLOW_LATENCY_NS) instead of NVLink's; the bytes land.
 *   fast-wrong       bandwidth: cuMemcpyDtoDAsync and p2pc_copy through the mapping are timed as
 *                    usual but move nothing (a fast wrong copy, which the data check must catch).
 *   cumem-export-fails  cuMemExportToShareableHandle of any allocation owned by SRC fails with
 *                    CUDA_ERROR_NOT_SUPPORTED (801), in every process, and
 *                    cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_
 *                    SUPPORTED) answers 0 for SRC: a property of the device, so TGT only names
 *                    the pair it is written on (every pair from SRC fails on the cuMem path).
 *                    No @once (the export is the producer's, made once for all its pairs).
 *   cumem-import-fails  cuMemImportFromShareableHandle of SRC's memory on TGT fails with
 *                    CUDA_ERROR_NOT_PERMITTED (800), as where the driver refuses the handle.
 *   cumem-access-fails  cuMemSetAccess granting TGT access to a mapping of SRC's imported
 *                    memory fails with CUDA_ERROR_NOT_SUPPORTED (801).
 *   cumem-drop-writes   drop-writes on the cuMem path only: writes through a cuMem mapping of
 *                    SRC's imported memory vanish; an IPC mapping of the same pair is untouched.
 * Without faults cudaDeviceCanAccessPeer answers 1 for two distinct valid devices and 0 for a
 * device and itself, as real CUDA does. hang and crash print one line on stderr first.
 * @once: the fault fires in the first attempt at the pair only. The first attempt is every
 * access of ONE process: the first that, on (physical) TGT, opens an IPC handle of SRC's memory,
 * asks cudaDeviceCanAccessPeer about SRC, or accesses SRC's memory through a mapping; at that
 * moment it claims all of the pair's @once faults in the ledger (an atomic compare-and-swap of
 * the pair's entry from 0 to a random mark of its own). They then apply to all its accesses on
 * the pair, for its whole life, and to no other process's. In p2pcheck that process is the pair's
 * consumer worker in the check's first round (its copy-tier write opens the handle first); an
 * attempt cut short (a worker of the pair hung or died elsewhere) counts as the first attempt
 * too. The producer takes no part: its accesses are to its own memory, which no fault touches.
 * The fresh workers of a retry see no @once fault; a new check (a new ledger) fires them again.
 * Several kinds on one pair compose per written byte, in this order: drop-writes (and one-way)
 * drops it; sm-only drops a kernel store; shifted moves a kernel store (+4096, or drops it past
 * the end); partial drops it when its (landing) offset is in an odd 64 KiB page; corrupt XORs
 * it when its (landing) offset % 64 == 7; late-visibility delays all of that to the kernel's
 * end. sm-only also makes kernel loads read 0xEE. hang and crash fire before any of them.
 *
 * MEMORY MODEL. Every allocation (cudaMalloc, cuMemAlloc_v2) is its own
 * memfd_create("p2pcheck-sim") + ftruncate + mmap(MAP_SHARED); the device pointer is the host
 * address of that mapping. Nothing is named in /dev/shm, so nothing can leak when a process
 * dies, however it dies. Nothing is reserved either: a page takes memory when first touched.
 * After the memory (rounded up to pages) the memfd holds the allocation's METADATA, mapped by
 * every process that maps the memory and guarded by a robust process-shared mutex (a process
 * that dies holding it leaves page states whole, and the reference counts are rebuilt from
 * them): a state per page, a table of contents, and the handshake records (p2pc_handshake).
 * LAZY PAGES: a write that no fault alters and that covers whole pages with a memset value
 * (cudaMemset, cuMemsetD8) or a p2pc_pattern_store pattern does not write those pages: their
 * state names the content instead (a fill byte, or a pattern's seed, first offset, length and
 * shift; zeros need no content), and their memory is given back (madvise MADV_REMOVE, which
 * punches the memfd's pages, in every process mapping them). Reads (kernel loads, copies to the
 * host) compute a lazy page's bytes; p2pc_pattern_check skips memory known to hold exactly its
 * pattern; any other write, and a handshake's flags, first write the page's bytes out (it
 * becomes raw). What every access sees is byte for byte what a plain buffer would hold; only
 * the memory taken differs: a check's 2 MiB pattern areas and fills take none, so the memory of
 * a simulated machine stays small however many GPUs it has (tests/sim_driver.rs compares it
 * with a plain model of the bytes). A full content table (4095 entries per allocation) only
 * means writing bytes out. The 64-byte IPC handle carries a magic, the owner's pid and memfd
 * descriptor number, the size, the owner's physical device, the memfd's inode and a checksum;
 * cudaIpcOpenMemHandle opens /proc/<pid>/fd/<fd> and maps it (so both processes must share a PID
 * namespace and uid, like real CUDA IPC needs a shared IPC namespace). A corrupt handle, or one
 * whose descriptor now names another file (a stale handle), is cudaErrorInvalidResourceHandle
 * (400); a failed open (owner gone, no access) is cudaErrorMapBufferObjectFailed (205).
 * A pointer is valid when it lies inside a live region (allocation or IPC mapping); an access
 * outside every region, or running past a region's end, fails with invalid value (1) and touches
 * nothing. Kernels report such an access as CUDA_ERROR_ILLEGAL_ADDRESS (700), as a GPU would.
 *
 * VIRTUAL MEMORY (the cuMem calls; the legacy IPC path above is untouched by them).
 * cuMemCreate(&h, size, prop, 0) makes an allocation of `size` bytes (a multiple of the
 * granularity, SIM_GRANULARITY = 2 MiB, which cuMemGetAllocationGranularity answers for both
 * MINIMUM and RECOMMENDED) on prop->location.id (a local ordinal; type PINNED, location type
 * DEVICE, requestedHandleTypes NONE or POSIX_FILE_DESCRIPTOR, else invalid value): a memfd laid
 * out as cudaMalloc's, not mapped. The handle is a number of this process. cuMemRelease forgets
 * it (the memory lives on while mapped). cuMemExportToShareableHandle(&fd, h,
 * CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) returns a new descriptor (close-on-exec) of the
 * memfd, which the caller owns and may pass to another process (SCM_RIGHTS), only when the
 * allocation asked for that handle type (else invalid value). cuMemImportFromShareableHandle(&h,
 * (void *)(intptr_t)fd, POSIX_FILE_DESCRIPTOR) takes a descriptor exported so (not a descriptor:
 * invalid value; another file: invalid handle, 400), keeps its own duplicate (the caller still
 * owns and closes fd) and returns a handle of this process to the same memory.
 * cuMemAddressReserve(&p, size, alignment, addr, 0) reserves `size` bytes (a multiple of the
 * granularity) of address space, inaccessible (alignment and addr are only hints: ignored);
 * cuMemAddressFree(p, size) gives back exactly one reservation with nothing mapped in it.
 * cuMemMap(p, size, 0, h, 0) maps ALL of h's allocation (size must be its size, offset 0) at p,
 * inside a reservation, over nothing mapped; cuMemUnmap(p, size) undoes exactly one such
 * mapping (the range becomes reserved again). A mapping is accessible from no device until
 * cuMemSetAccess(p, size, desc, count) (exactly one mapping's range; each desc a device location
 * with flags PROT_NONE or PROT_READWRITE; PROT_READ alone is not simulated: invalid value)
 * grants it: any call or kernel touching it from a device without access fails as an access
 * outside every region does. Memory mapped from an imported handle is a peer mapping (faulted as
 * above); memory of one's own cuMemCreate is not. cuDeviceGet(&d, ordinal) answers the ordinal;
 * cuDeviceGetAttribute answers VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED (102) 1 and
 * HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED (103) 1 (0 under cumem-export-fails), any other
 * attribute invalid value; cuDriverGetVersion answers 13000. cudaDeviceReset releases the
 * handles, mappings and reservations made while its device was current. cudaIpcGetMemHandle of
 * cuMem memory is invalid value, as on a GPU. The simulator never defines cuMulticast*.
 *
 * CONTEXTS. The current device is per thread (0 until cudaSetDevice, as in CUDA). Runtime calls
 * create the current device's primary context and make it current for the calling thread;
 * driver calls that need a context (modules, launches, memory) fail with
 * CUDA_ERROR_NOT_INITIALIZED (3) before cuInit or any runtime call, and with
 * CUDA_ERROR_INVALID_CONTEXT (201) when this thread has no live context (no runtime call yet, or
 * after cudaDeviceReset). cudaDeviceReset releases every allocation, IPC mapping and module
 * created while the current device was current. One mutex per process guards all tables; it is
 * held while a kernel runs, p2pc_handshake's waiting included, so a process runs one kernel at
 * a time and another thread's calls wait for it to end (each process has its own mutex: two
 * processes' kernels do run at the same time).
 *
 * KERNELS (cuModuleLoadData takes PTX text, or a fat binary holding PTX: only the ".entry NAME("
 * kernels its PTX defines can be fetched with cuModuleGetFunction, others fail with
 * CUDA_ERROR_NOT_FOUND, 500; a lone cubin is CUDA_ERROR_INVALID_IMAGE, 200). Every simulated
 * GPU is of architecture SIM_ARCH (sm_90): a fat binary's SASS for sm_90 is "taken" when it has
 * one, else its PTX is "JIT-compiled"; cuFuncGetAttribute answers CU_FUNC_ATTRIBUTE_PTX_VERSION
 * (5) and CU_FUNC_ATTRIBUTE_BINARY_VERSION (6) accordingly (PTX text: its ".target sm_XY"),
 * any other attribute CUDA_ERROR_INVALID_VALUE. Pointers are
 * u64 device addresses. Loads and stores are SM (kernel) accesses: the faults above apply to
 * each byte, and to the counters and results a kernel writes too. An access outside every live
 * region is CUDA_ERROR_ILLEGAL_ADDRESS (700), and a misaligned one (where noted)
 * CUDA_ERROR_MISALIGNED_ADDRESS (716); both are checked for every pointer before anything runs,
 * so such a launch touches nothing. Invalid scalar arguments are CUDA_ERROR_INVALID_VALUE (1),
 * checked first (a GPU kernel cannot report them: p2pcheck must never pass them).
 *   With pat(o, seed): x = o + seed * 0x9E3779B97F4A7C15; x ^= x >> 33;
 *   x *= 0xff51afd7ed558ccd; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53; x ^= x >> 33; the low byte
 *   of x (all arithmetic mod 2^64):
 *   p2pc_pattern_store(u8 *p, u64 n, u64 seed, u32 width, u64 shift)
 *       width is 1, 4, 8 or 16, n a multiple of 16 and shift a multiple of 16 below n (shift 0
 *       when n is 0), else invalid value; p % width != 0 is misaligned. For each word
 *       o = i * width < n, the bytes pat(o + k, seed), k < width, go to p + (o + shift) % n + k:
 *       byte q of [p, p+n) gets pat((q - shift) mod n, seed). Width only says how a GPU stores.
 *   p2pc_pattern_check(const u8 *p, u64 n, u64 seed, u64 old_seed, u32 width, u64 *counters)
 *       width and n validated as for p2pc_pattern_store (p % width misaligned); counters is 3
 *       u64 [wrong, first_bad, stale] (8-aligned), which the caller sets to [0, ~0, 0]. For each
 *       o < n with got = p[o] != pat(o, seed): wrong += 1, first_bad = min(first_bad, o), and
 *       if got == pat(o, old_seed) also stale += 1. The counters are loaded and stored only
 *       when something was wrong; stale only when it grows.
 *   p2pc_handshake(u8 *area, u32 rounds, u32 role, u64 seed, u64 budget_ns, u64 *out)
 *       a ping-pong between two processes' kernels running at the same time. area: 2048 bytes
 *       (4-aligned), u32 flag_c at +0, u32 flag_p at +128, payload_c at +256 and payload_p at
 *       +1024 (256 bytes each), both flags 0 at the start. role 0 (server: in the process that
 *       owns the memory) and role 1 (driver: the other process, through its IPC mapping); any
 *       other role is invalid value. For r = 1..rounds: the driver writes payload_c[j] =
 *       pat(r*512 + j, seed), j < 256, release-stores flag_c = r, waits (acquire loads) for
 *       flag_p == r, then counts the bytes payload_p[j] != pat(r*512 + 256 + j, seed); the
 *       server waits for flag_c == r, counts the bytes payload_c[j] != pat(r*512 + j, seed),
 *       writes payload_p[j] = pat(r*512 + 256 + j, seed) and release-stores flag_p = r. At the
 *       end, out (4 u64, 8-aligned) gets [rounds_done (rounds whose last step this side
 *       completed), payload_errors, timed_out, elapsed_ns] as plain kernel stores.
 *       NO CLOCK DECIDES (a GPU's kernel gives up at start + budget_ns of %globaltimer; here
 *       CPU scheduling would then decide verdicts). Each launch of a role on an area is paired
 *       with the other role's launch of the same rank (the k-th with the k-th), through a record
 *       in the metadata that no fault masks: per role, launches started and ended, and the last
 *       round whose flag store the running launch made (made: whether the fault let it land or
 *       not). A wait ends when the flag reads r (a healthy wait ends only so), or with
 *       timed_out = 1 as soon as the flag can never read r while this kernel runs: the paired
 *       launch has made its store for round r and this side's view does not show it (dropped,
 *       moved, changed, or held back until the end of a kernel that waits for this one), or it
 *       has ended, or its process died (a robust mutex it holds while it runs says so), without
 *       the flag showing r. A timed-out side reports elapsed_ns of at least budget_ns: the time
 *       its GPU kernel would have waited. A paired launch that never starts (its process hung
 *       before, as under the hang fault) is waited for without end: the host's step timeout
 *       bounds it. A second launch of a role on an area while one runs is invalid value; the two
 *       roles must run in two processes (one process runs one kernel at a time). Waiting
 *       yields a few times, then sleeps on the flag word (a futex), woken by each flag store and
 *       at the paired launch's end, and looks at the record at least every millisecond (to see
 *       a start or a death); with this process's mutex held. An allocation holds 256
 *       handshake records, taken again once all their launches have ended; a launch finding
 *       none free is CUDA_ERROR_OUT_OF_MEMORY (2).
 * Grid and block sizes are validated (no zero dimension, at most 1024 threads a block) and
 * otherwise ignored. A launch whose late-visibility buffer cannot be allocated still performs
 * every store (at once) and then fails with CUDA_ERROR_OUT_OF_MEMORY (2).
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define SIM_EXPORT __attribute__((visibility("default")))

#define MAX_GPUS 64
#define HANDLE_BYTES 64

typedef struct {
    char reserved[HANDLE_BYTES];
} cudaIpcMemHandle_t;

/* CUmemLocation, CUmemAllocationProp and CUmemAccessDesc, as cuda.h lays them out. */
typedef struct {
    int type; /* CU_MEM_LOCATION_TYPE_DEVICE = 1 */
    int id;
} sim_location;
typedef struct {
    int type;                   /* CU_MEM_ALLOCATION_TYPE_PINNED = 1 */
    int requested_handle_types; /* CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1 */
    sim_location location;
    void *win32_metadata;
    unsigned char alloc_flags[8];
} sim_alloc_prop;
typedef struct {
    sim_location location;
    int flags; /* CU_MEM_ACCESS_FLAGS_PROT_NONE = 0, _READ = 1, _READWRITE = 3 */
} sim_access_desc;
_Static_assert(sizeof(sim_alloc_prop) == 32, "CUmemAllocationProp layout");
_Static_assert(sizeof(sim_access_desc) == 12, "CUmemAccessDesc layout");

/* The exported ABI: libcuda's and libcudart's own signatures (CUresult, cudaError_t and the
 * handle types spelled as plain C types), plus the simulator's marker. */
#define P2PC_PROTOTYPES(X)                                                                        \
    X(int, p2pcheck_sim_abi, (void))                                                              \
    X(int, cuInit, (unsigned int flags))                                                          \
    X(int, cuDeviceGetCount, (int *count))                                                        \
    X(int, cuGetErrorName, (int error, const char **pStr))                                        \
    X(int, cuGetErrorString, (int error, const char **pStr))                                      \
    X(int, cuModuleLoadData, (void **module, const void *image))                                  \
    X(int, cuModuleGetFunction, (void **hfunc, void *hmod, const char *name))                     \
    X(int, cuModuleUnload, (void *hmod))                                                          \
    X(int, cuFuncGetAttribute, (int *value, int attribute, void *hfunc))                          \
    X(int, cuLaunchKernel, (void *f, unsigned gridX, unsigned gridY, unsigned gridZ,              \
                            unsigned blockX, unsigned blockY, unsigned blockZ,                    \
                            unsigned sharedMemBytes, void *hStream, void **kernelParams,          \
                            void **extra))                                                        \
    X(int, cuCtxSynchronize, (void))                                                              \
    X(int, cuMemAlloc_v2, (unsigned long long *dptr, size_t bytes))                               \
    X(int, cuMemFree_v2, (unsigned long long dptr))                                               \
    X(int, cuMemsetD8_v2, (unsigned long long dptr, unsigned char value, size_t n))               \
    X(int, cuMemcpyDtoH_v2, (void *dst, unsigned long long src, size_t bytes))                    \
    X(int, cuCtxGetDevice, (int *device))                                                         \
    X(int, cuOccupancyMaxActiveBlocksPerMultiprocessor, (int *blocks, void *f, int block,         \
                                                         size_t shared))                          \
    X(int, cuStreamCreate, (void **stream, unsigned flags))                                       \
    X(int, cuStreamDestroy_v2, (void *stream))                                                    \
    X(int, cuEventCreate, (void **event, unsigned flags))                                         \
    X(int, cuEventRecord, (void *event, void *stream))                                            \
    X(int, cuEventElapsedTime, (float *ms, void *start, void *end))                               \
    X(int, cuEventDestroy_v2, (void *event))                                                      \
    X(int, cuMemcpyDtoDAsync_v2, (unsigned long long dst, unsigned long long src, size_t n,       \
                                  void *stream))                                                  \
    X(int, cuMemsetD32Async, (unsigned long long dst, unsigned value, size_t n, void *stream))    \
    X(int, cuDriverGetVersion, (int *version))                                                    \
    X(int, cuDeviceGet, (int *device, int ordinal))                                               \
    X(int, cuDeviceGetAttribute, (int *value, int attribute, int device))                         \
    X(int, cuMemGetAllocationGranularity, (size_t *granularity, const sim_alloc_prop *prop,       \
                                           int option))                                           \
    X(int, cuMemCreate, (unsigned long long *handle, size_t size, const sim_alloc_prop *prop,     \
                         unsigned long long flags))                                               \
    X(int, cuMemRelease, (unsigned long long handle))                                             \
    X(int, cuMemExportToShareableHandle, (void *shareable, unsigned long long handle, int type,   \
                                          unsigned long long flags))                              \
    X(int, cuMemImportFromShareableHandle, (unsigned long long *handle, void *osHandle,           \
                                            int type))                                            \
    X(int, cuMemAddressReserve, (unsigned long long *ptr, size_t size, size_t alignment,          \
                                 unsigned long long addr, unsigned long long flags))              \
    X(int, cuMemAddressFree, (unsigned long long ptr, size_t size))                               \
    X(int, cuMemMap, (unsigned long long ptr, size_t size, size_t offset,                         \
                      unsigned long long handle, unsigned long long flags))                       \
    X(int, cuMemUnmap, (unsigned long long ptr, size_t size))                                     \
    X(int, cuMemSetAccess, (unsigned long long ptr, size_t size, const sim_access_desc *desc,     \
                            size_t count))                                                        \
    X(int, cudaGetDeviceCount, (int *count))                                                      \
    X(int, cudaSetDevice, (int device))                                                           \
    X(int, cudaMalloc, (void **devPtr, size_t size))                                              \
    X(int, cudaFree, (void *devPtr))                                                              \
    X(int, cudaMemset, (void *devPtr, int value, size_t count))                                   \
    X(int, cudaMemcpy, (void *dst, const void *src, size_t count, int kind))                      \
    X(int, cudaDeviceSynchronize, (void))                                                         \
    X(int, cudaDeviceReset, (void))                                                               \
    X(int, cudaDeviceCanAccessPeer, (int *canAccessPeer, int device, int peerDevice))             \
    X(int, cudaIpcGetMemHandle, (cudaIpcMemHandle_t * handle, void *devPtr))                      \
    X(int, cudaIpcOpenMemHandle, (void **devPtr, cudaIpcMemHandle_t handle, unsigned int flags))  \
    X(int, cudaIpcCloseMemHandle, (void *devPtr))                                                 \
    X(const char *, cudaGetErrorName, (int error))                                                \
    X(const char *, cudaGetErrorString, (int error))                                              \
    X(int, cudaRuntimeGetVersion, (int *runtimeVersion))
#define P2PC_DECLARE(ret, name, args) SIM_EXPORT ret name args;
P2PC_PROTOTYPES(P2PC_DECLARE)

/* Error codes. The driver's CUresult and the runtime's cudaError_t agree on every value used
 * here except in name, so internal helpers return these and both APIs pass them through. */
enum {
    E_OK = 0,
    E_INVALID_VALUE = 1,        /* CUDA_ERROR_INVALID_VALUE / cudaErrorInvalidValue */
    E_OUT_OF_MEMORY = 2,        /* CUDA_ERROR_OUT_OF_MEMORY / cudaErrorMemoryAllocation */
    E_NOT_INITIALIZED = 3,      /* driver only */
    E_MEMCPY_DIRECTION = 21,    /* runtime only */
    E_NO_DEVICE = 100,
    E_INVALID_DEVICE = 101,
    E_INVALID_IMAGE = 200,      /* driver only */
    E_INVALID_CONTEXT = 201,    /* driver only */
    E_MAP_FAILED = 205,         /* CUDA_ERROR_MAP_FAILED / cudaErrorMapBufferObjectFailed */
    E_INVALID_HANDLE = 400,     /* CUDA_ERROR_INVALID_HANDLE / cudaErrorInvalidResourceHandle */
    E_NOT_PERMITTED = 800,      /* CUDA_ERROR_NOT_PERMITTED / cudaErrorNotPermitted */
    E_NOT_SUPPORTED = 801,      /* CUDA_ERROR_NOT_SUPPORTED / cudaErrorNotSupported */
    E_NOT_FOUND = 500,          /* driver only */
    E_ILLEGAL_ADDRESS = 700,
    E_MISALIGNED_ADDRESS = 716,
    E_UNKNOWN = 999,
};

struct err_desc {
    int code;
    const char *driver_name;  /* NULL: no CUresult has this value */
    const char *runtime_name; /* NULL: no cudaError_t has this value */
    const char *text;
};

/* Names and texts as CUDA 13's cuGetErrorName/String and cudaGetErrorName/String give them. */
static const struct err_desc ERRORS[] = {
    {0, "CUDA_SUCCESS", "cudaSuccess", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "cudaErrorInvalidValue", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "cudaErrorMemoryAllocation", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "cudaErrorInitializationError", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "cudaErrorCudartUnloading", "driver shutting down"},
    {21, NULL, "cudaErrorInvalidMemcpyDirection", "invalid copy direction for memcpy"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "cudaErrorStubLibrary", "CUDA driver is a stub library"},
    {100, "CUDA_ERROR_NO_DEVICE", "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "cudaErrorInvalidDevice", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "cudaErrorInvalidKernelImage",
     "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "cudaErrorDeviceUninitialized", "invalid device context"},
    {205, "CUDA_ERROR_MAP_FAILED", "cudaErrorMapBufferObjectFailed",
     "mapping of buffer object failed"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "cudaErrorInvalidResourceHandle",
     "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "cudaErrorSymbolNotFound", "named symbol not found"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "cudaErrorIllegalAddress",
     "an illegal memory access was encountered"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "cudaErrorMisalignedAddress", "misaligned address"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "cudaErrorNotPermitted", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "cudaErrorNotSupported", "operation not supported"},
    {999, "CUDA_ERROR_UNKNOWN", "cudaErrorUnknown", "unknown error"},
};

static const struct err_desc *find_error(int code) {
    for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
        if (ERRORS[i].code == code) return &ERRORS[i];
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Configuration */

enum {
    F_IPC_OPEN_FAILS = 1u << 0,
    F_DROP_WRITES = 1u << 1, /* drop-writes and one-way */
    F_CORRUPT = 1u << 2,
    F_SM_ONLY = 1u << 3,
    F_LATE = 1u << 4,
    F_HANG = 1u << 5,
    F_CRASH = 1u << 6,
    F_CLAIM_NO = 1u << 7,
    F_PARTIAL = 1u << 8,
    F_SHIFTED = 1u << 9,
    F_CUMEM_EXPORT = 1u << 10,
    F_CUMEM_IMPORT = 1u << 11,
    F_CUMEM_ACCESS = 1u << 12,
    F_CUMEM_DROP = 1u << 13, /* becomes F_DROP_WRITES on cuMem peer mappings (fault_mask) */
    F_SLOW = 1u << 14,
    F_FAST_WRONG = 1u << 15,
};

static const struct {
    const char *name;
    unsigned bit;
} FAULT_KINDS[] = {
    {"ipc-open-fails", F_IPC_OPEN_FAILS}, {"drop-writes", F_DROP_WRITES},
    {"corrupt", F_CORRUPT},               {"sm-only", F_SM_ONLY},
    {"late-visibility", F_LATE},          {"hang", F_HANG},
    {"crash", F_CRASH},                   {"one-way", F_DROP_WRITES},
    {"claim-no", F_CLAIM_NO},             {"partial", F_PARTIAL},
    {"shifted", F_SHIFTED},               {"slow", F_SLOW},
    {"fast-wrong", F_FAST_WRONG},         {"cumem-export-fails", F_CUMEM_EXPORT},
    {"cumem-import-fails", F_CUMEM_IMPORT}, {"cumem-access-fails", F_CUMEM_ACCESS},
    {"cumem-drop-writes", F_CUMEM_DROP},
};

struct config {
    int n_phys;                           /* P2PCHECK_SIM_GPUS */
    int n_visible;                        /* after CUDA_VISIBLE_DEVICES */
    int visible[MAX_GPUS];                /* local ordinal -> physical id */
    uint16_t faults[MAX_GPUS][MAX_GPUS];  /* [src][tgt] physical -> F_* bits */
    uint16_t once[MAX_GPUS][MAX_GPUS];    /* the same, for faults marked @once */
    uint64_t *ledger;                     /* P2PCHECK_SIM_LEDGER mapped: [src][tgt] claimant */
    uint64_t token;                       /* this process's claimant mark (never 0) */
    size_t page;                          /* the system's page size */
    int bad;                              /* P2PCHECK_SIM_FAULTS was invalid: fail every call */
};

/* The ledger: one u64 per ordered pair, 0 until a process claims the pair's @once faults. */
#define LEDGER_BYTES ((size_t)MAX_GPUS * MAX_GPUS * sizeof(uint64_t))

static struct config g_cfg;
static pthread_once_t g_cfg_once = PTHREAD_ONCE_INIT;

__attribute__((noreturn)) static void die(const char *what, int err) {
    fprintf(stderr, "p2pcheck-sim: %s: %s\n", what, strerror(err));
    abort();
}

static const char *skip_ws(const char *s, const char *end) {
    while (s < end && (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')) s++;
    return s;
}

static const char *trim_end(const char *s, const char *end) {
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        end--;
    return end;
}

/* A decimal number of at most 4 digits at *s (advanced past it); -1 when there is none. */
static int parse_small_uint(const char **s, const char *end) {
    int v = 0, digits = 0;
    while (*s < end && **s >= '0' && **s <= '9') {
        if (++digits > 4) return -1; /* any id > 9999 is out of range anyway */
        v = v * 10 + (**s - '0');
        (*s)++;
    }
    return digits ? v : -1;
}

static void gpu_uuid(int k, char *buf, size_t len) {
    snprintf(buf, len, "GPU-51a00000-0000-0000-0000-%012x", (unsigned)k);
}

/* One CUDA_VISIBLE_DEVICES entry [s, end) (already trimmed) -> physical id, or -1. */
static int visible_entry(const char *s, const char *end, int n_phys) {
    size_t len = (size_t)(end - s);
    if (len == 0) return -1;
    if (len >= 4 && strncmp(s, "GPU-", 4) == 0) {
        /* A UUID or a unique prefix of one, as CUDA accepts. */
        int found = -1, matches = 0;
        for (int k = 0; k < n_phys; k++) {
            char uuid[48];
            gpu_uuid(k, uuid, sizeof uuid);
            if (len <= strlen(uuid) && strncasecmp(s, uuid, len) == 0) {
                found = k;
                matches++;
            }
        }
        return matches == 1 ? found : -1;
    }
    const char *p = s;
    int v = parse_small_uint(&p, end);
    if (v < 0 || p != end || v >= n_phys) return -1;
    return v;
}

static void parse_visible(struct config *c) {
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    c->n_visible = 0;
    if (v == NULL) {
        for (int k = 0; k < c->n_phys; k++) c->visible[c->n_visible++] = k;
        return;
    }
    const char *end = v + strlen(v);
    if (skip_ws(v, end) == end) return; /* set but empty: no device */
    const char *s = v;
    for (;;) {
        const char *comma = memchr(s, ',', (size_t)(end - s));
        const char *item_end = comma ? comma : end;
        const char *a = skip_ws(s, item_end), *b = trim_end(a, item_end);
        int phys = visible_entry(a, b, c->n_phys);
        if (phys < 0) return; /* CUDA's rule: the first bad entry ends the list */
        for (int i = 0; i < c->n_visible; i++)
            if (c->visible[i] == phys) return; /* a repeat ends it too */
        c->visible[c->n_visible++] = phys;
        if (comma == NULL || c->n_visible == MAX_GPUS) return;
        s = comma + 1;
    }
}

/* Parses one fault item [s, end); NULL on success, else why it is invalid. */
static const char *parse_fault_item(struct config *c, const char *s, const char *end) {
    s = skip_ws(s, end);
    end = trim_end(s, end);
    if (s == end) return "empty item";
    int src = parse_small_uint(&s, end);
    if (src < 0) return "SRC is not a number";
    s = skip_ws(s, end);
    if (end - s < 2 || s[0] != '-' || s[1] != '>') return "missing \"->\" after SRC";
    s = skip_ws(s + 2, end);
    int tgt = parse_small_uint(&s, end);
    if (tgt < 0) return "TGT is not a number";
    s = skip_ws(s, end);
    if (s == end || *s != ':') return "missing \":\" after TGT";
    s = skip_ws(s + 1, end);
    if (src >= c->n_phys || tgt >= c->n_phys)
        return "GPU id out of range (ids are physical and must be < P2PCHECK_SIM_GPUS)";
    /* KIND[@once] */
    const char *at = memchr(s, '@', (size_t)(end - s));
    int once = 0;
    if (at != NULL) {
        const char *m = skip_ws(at + 1, end);
        if ((size_t)(end - m) != 4 || strncmp(m, "once", 4) != 0)
            return "unknown modifier after \"@\" (only @once)";
        once = 1;
        end = trim_end(s, at);
    }
    size_t len = (size_t)(end - s);
    for (size_t i = 0; i < sizeof FAULT_KINDS / sizeof FAULT_KINDS[0]; i++) {
        if (strlen(FAULT_KINDS[i].name) == len && strncmp(s, FAULT_KINDS[i].name, len) == 0) {
            if (once && FAULT_KINDS[i].bit == F_CUMEM_EXPORT)
                return "cumem-export-fails takes no @once (the export is made once per device)";
            if (once)
                c->once[src][tgt] |= (uint16_t)FAULT_KINDS[i].bit;
            else
                c->faults[src][tgt] |= (uint16_t)FAULT_KINDS[i].bit;
            return NULL;
        }
    }
    return "unknown kind (ipc-open-fails, drop-writes, corrupt, sm-only, late-visibility, hang, "
           "crash, one-way, claim-no, partial, shifted, slow, fast-wrong, cumem-export-fails, "
           "cumem-import-fails, cumem-access-fails, cumem-drop-writes)";
}

static int has_once(const struct config *c) {
    for (int s = 0; s < c->n_phys; s++)
        for (int t = 0; t < c->n_phys; t++)
            if (c->once[s][t]) return 1;
    return 0;
}

/* Maps P2PCHECK_SIM_LEDGER (grown to LEDGER_BYTES when shorter); NULL on failure, said on
 * stderr. */
static uint64_t *open_ledger(void) {
    const char *path = getenv("P2PCHECK_SIM_LEDGER");
    if (path == NULL || *path == '\0') {
        fprintf(stderr, "p2pcheck-sim: P2PCHECK_SIM_FAULTS has @once faults but "
                        "P2PCHECK_SIM_LEDGER names no ledger file\n");
        return NULL;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    struct stat st;
    void *p = MAP_FAILED;
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        ((uint64_t)st.st_size >= LEDGER_BYTES || ftruncate(fd, (off_t)LEDGER_BYTES) == 0))
        p = mmap(NULL, LEDGER_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        fprintf(stderr, "p2pcheck-sim: P2PCHECK_SIM_LEDGER=\"%s\": %s\n", path, strerror(errno));
    if (fd >= 0 && close(fd) != 0) fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    return p == MAP_FAILED ? NULL : p;
}

/* This process's claimant mark: random, so that no other process (even one given a reused
 * pid) can pass for it. */
static uint64_t claimant_token(void) {
    uint64_t t = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &t, sizeof t) != (ssize_t)sizeof t) t = 0;
        if (close(fd) != 0) fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    }
    t ^= ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL);
    return t ? t : 1;
}

static void parse_faults(struct config *c) {
    const char *v = getenv("P2PCHECK_SIM_FAULTS");
    if (v == NULL) return;
    const char *end = v + strlen(v);
    if (skip_ws(v, end) == end) return; /* empty: no fault */
    const char *s = v;
    for (;;) {
        const char *comma = memchr(s, ',', (size_t)(end - s));
        const char *item_end = comma ? comma : end;
        const char *why = parse_fault_item(c, s, item_end);
        if (why != NULL) {
            fprintf(stderr,
                    "p2pcheck-sim: invalid item \"%.*s\" in P2PCHECK_SIM_FAULTS=\"%s\": %s; "
                    "expected SRC->TGT:KIND[,...]; every CUDA call will fail with invalid value\n",
                    (int)(item_end - s), s, v, why);
            c->bad = 1;
            memset(c->faults, 0, sizeof c->faults);
            memset(c->once, 0, sizeof c->once);
            return;
        }
        if (comma == NULL) break;
        s = comma + 1;
    }
    if (has_once(c)) {
        c->token = claimant_token();
        c->ledger = open_ledger();
        if (c->ledger == NULL) {
            fprintf(stderr, "p2pcheck-sim: every CUDA call will fail with invalid value\n");
            c->bad = 1;
        }
    }
}

static void config_load(void) {
    struct config *c = &g_cfg;
    memset(c, 0, sizeof *c);
    long pg = sysconf(_SC_PAGESIZE);
    c->page = pg > 0 ? (size_t)pg : 4096;
    const char *g = getenv("P2PCHECK_SIM_GPUS");
    if (g != NULL) {
        const char *end = g + strlen(g), *s = skip_ws(g, end);
        const char *e = trim_end(s, end);
        if (s != e) {
            int n = parse_small_uint(&s, e);
            if (n < 0 || s != e || n > MAX_GPUS)
                fprintf(stderr,
                        "p2pcheck-sim: P2PCHECK_SIM_GPUS=\"%s\" is not a number 0..%d; "
                        "simulating no GPU\n",
                        g, MAX_GPUS);
            else
                c->n_phys = n;
        }
    }
    parse_visible(c);
    parse_faults(c);
}

static const struct config *config(void) {
    int rc = pthread_once(&g_cfg_once, config_load);
    if (rc != 0) die("pthread_once", rc);
    return &g_cfg;
}

/* Who holds each pair's @once faults, as far as this process knows: 0 not asked yet, 1 this
 * process, 2 another one. */
static unsigned char g_claims[MAX_GPUS][MAX_GPUS];

/* The fault bits that apply to this process's accesses on src->tgt: the pair's faults, plus its
 * @once faults when this process is (or, being the first to ask, now becomes) their claimant. */
static unsigned pair_faults(int src, int tgt) {
    const struct config *c = config();
    unsigned bits = c->faults[src][tgt];
    if (c->once[src][tgt] == 0) return bits;
    unsigned char k = __atomic_load_n(&g_claims[src][tgt], __ATOMIC_ACQUIRE);
    if (k == 0) {
        uint64_t seen = 0;
        int mine = __atomic_compare_exchange_n(&c->ledger[src * MAX_GPUS + tgt], &seen, c->token,
                                               0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) ||
                   seen == c->token;
        k = mine ? 1 : 2;
        __atomic_store_n(&g_claims[src][tgt], k, __ATOMIC_RELEASE);
    }
    return k == 1 ? bits | c->once[src][tgt] : bits;
}

/* ------------------------------------------------------------------------------------------ */
/* Shared state: regions, modules, contexts */

struct meta;

struct region {
    unsigned char *base;
    size_t size;
    size_t map_len;    /* bytes mapped from base: the memory, then its metadata */
    struct meta *meta; /* the allocation's shared metadata (see MEMORY above) */
    int fd;            /* memfd of an own allocation; -1 for an IPC mapping (closed once mapped) */
    int owner_phys;    /* physical device that owns the memory */
    int is_ipc;        /* opened with cudaIpcOpenMemHandle */
    int is_import;     /* a cuMem mapping of memory imported from another process */
    int cumem;         /* mapped with cuMemMap inside a reservation; its metadata is mapped
                          apart (meta, map_len bytes) and unmapping reserves the range again */
    uint64_t access;   /* cuMem: bit d set when local ordinal d may access it (cuMemSetAccess) */
    int ctx_dev;       /* local ordinal current when it was created/opened (for cudaDeviceReset) */
    uint64_t ino, dev; /* the memfd's identity, written into IPC handles */
};

enum { K_PATTERN_STORE, K_PATTERN_CHECK, K_HANDSHAKE, K_COPY, K_SPIN, K_CHAIN, K_CHASE, K_NUM };
static const char *const KERNEL_NAMES[K_NUM] = {
    "p2pc_pattern_store", "p2pc_pattern_check", "p2pc_handshake", "p2pc_copy",
    "p2pc_spin",          "p2pc_chain",         "p2pc_chase",
};

struct module;
struct function {
    struct module *module;
    int kernel;
};

struct module {
    struct module *next;
    int ctx_dev;
    unsigned defined; /* bit k: the PTX defines kernel k */
    int ptx_version;    /* XY of the PTX the "machine code" came from */
    int binary_version; /* XY of the "machine code" (always SIM_ARCH) */
    struct function functions[K_NUM];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct region *g_regions;
static size_t g_nregions, g_cap_regions;
static struct module *g_modules;
static int g_driver_initialized;           /* cuInit or any runtime call succeeded */
static unsigned char g_ctx_alive[MAX_GPUS]; /* primary context of each local ordinal exists */

static __thread int tl_dev;   /* current device (local ordinal); 0 by default, as in CUDA */
static __thread int tl_bound; /* a runtime call made the primary context current here */

static void lock(void) {
    int rc = pthread_mutex_lock(&g_lock);
    if (rc != 0) die("pthread_mutex_lock", rc);
}

static void unlock(void) {
    int rc = pthread_mutex_unlock(&g_lock);
    if (rc != 0) die("pthread_mutex_unlock", rc);
}

/* Entry of a driver call that needs a context; on success returns 0 WITH the lock held. */
static int driver_begin(void) {
    if (config()->bad) return E_INVALID_VALUE;
    lock();
    if (!g_driver_initialized) {
        unlock();
        return E_NOT_INITIALIZED;
    }
    if (!tl_bound || !g_ctx_alive[tl_dev]) {
        unlock();
        return E_INVALID_CONTEXT;
    }
    return E_OK;
}

/* Entry of a runtime call; makes the current device's primary context current when asked (as
 * the runtime does on first use). On success returns 0 WITH the lock held. */
static int runtime_begin(int need_context) {
    const struct config *c = config();
    if (c->bad) return E_INVALID_VALUE;
    if (c->n_visible == 0) return E_NO_DEVICE;
    lock();
    g_driver_initialized = 1;
    if (need_context) {
        g_ctx_alive[tl_dev] = 1;
        tl_bound = 1;
    }
    return E_OK;
}

static int unlock_return(int rc) {
    unlock();
    return rc;
}

static int current_phys(void) { return config()->visible[tl_dev]; }

/* The region containing p, or NULL. */
static struct region *find_region(uintptr_t p) {
    for (size_t i = 0; i < g_nregions; i++) {
        uintptr_t base = (uintptr_t)g_regions[i].base;
        if (p >= base && p - base < g_regions[i].size) return &g_regions[i];
    }
    return NULL;
}

/* The region holding all of [p, p+n) (n > 0), or NULL: a range that leaves its region, or
 * starts outside every region, or lies in a cuMem mapping the current device was granted no
 * access to, must never be touched. */
static struct region *find_range(uintptr_t p, size_t n) {
    struct region *r = find_region(p);
    if (r == NULL || n > r->size - (p - (uintptr_t)r->base)) return NULL;
    if (r->cumem && !((r->access >> tl_dev) & 1)) return NULL;
    return r;
}

/* Address space reserved with cuMemAddressReserve (inaccessible where nothing is mapped). */
struct reservation {
    unsigned char *base;
    size_t size;
    int ctx_dev;
};
static struct reservation *g_res;
static size_t g_nres, g_cap_res;

/* Whether p lies in a reservation: an address the host must never touch as host memory. */
static int in_reservation(uintptr_t p) {
    for (size_t i = 0; i < g_nres; i++)
        if (p >= (uintptr_t)g_res[i].base && p - (uintptr_t)g_res[i].base < g_res[i].size)
            return 1;
    return 0;
}

/* Makes room for one more element in a growable table; 0 when memory ran out. */
static int grow(void **table, size_t *cap, size_t n, size_t elem) {
    if (n < *cap) return 1;
    size_t want = *cap ? 2 * *cap : 16;
    void *grown = realloc(*table, want * elem);
    if (grown == NULL) return 0;
    *table = grown;
    *cap = want;
    return 1;
}

/* Makes [base, base+size) reserved and inaccessible again (after a cuMem mapping there). */
static int re_reserve(unsigned char *base, size_t size) {
    void *p = mmap(base, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                   -1, 0);
    if (p != MAP_FAILED) return E_OK;
    fprintf(stderr, "p2pcheck-sim: mmap(reserve %p, %zu): %s\n", (void *)base, size,
            strerror(errno));
    return E_UNKNOWN;
}

static int add_region(const struct region *r) {
    if (!grow((void **)&g_regions, &g_cap_regions, g_nregions, sizeof *g_regions))
        return E_OUT_OF_MEMORY;
    g_regions[g_nregions++] = *r;
    return E_OK;
}

/* Unmaps and closes region i and removes it from the table (order is not kept). */
static int release_region(size_t i) {
    struct region r = g_regions[i];
    int rc = E_OK;
    g_regions[i] = g_regions[--g_nregions];
    /* A cuMem mapping: its metadata was mapped apart, and its range stays reserved. */
    unsigned char *unmap = r.cumem ? (unsigned char *)r.meta : r.base;
    if (munmap(unmap, r.map_len) != 0) {
        fprintf(stderr, "p2pcheck-sim: munmap(%p, %zu): %s\n", (void *)unmap, r.map_len,
                strerror(errno));
        rc = E_UNKNOWN;
    }
    if (r.cumem && re_reserve(r.base, r.size) != E_OK) rc = E_UNKNOWN;
    if (r.fd >= 0 && close(r.fd) != 0) {
        fprintf(stderr, "p2pcheck-sim: close(%d): %s\n", r.fd, strerror(errno));
        rc = E_UNKNOWN;
    }
    return rc;
}

/* The test pattern, exactly as the GPU kernels compute it. */
static unsigned char pat(uint64_t o, uint64_t seed) {
    uint64_t x = o + seed * 0x9E3779B97F4A7C15ull;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (unsigned char)x;
}

/* ------------------------------------------------------------------------------------------ */
/* Shared metadata: lazy pages and handshake records (see MEMORY and p2pc_handshake above) */

enum { MAX_CONTENTS = 4096, MAX_HS = 256 };
enum { C_FILL = 1, C_PATTERN = 2 };
#define META_MAGIC 0x4154454d43503250ull /* "P2PCMETA" */

/* What a lazy page holds; its memfd page is a hole (or stale) and never read. An entry is in
 * use while pages refer to it (refs > 0). */
struct content {
    uint32_t kind, refs;
    uint64_t seed;   /* C_PATTERN: the seed; C_FILL: the byte */
    uint64_t origin; /* C_PATTERN: the store's first byte, as an offset in the allocation */
    uint64_t n, shift;
};

/* One role of the handshakes run on one area. */
struct hs_side {
    pthread_mutex_t alive; /* held by this role's running launch (robust: its death shows) */
    uint32_t started;      /* launches of this role on the area so far */
    uint32_t ended;        /* of them, those that ended or whose process died */
    uint32_t issued;       /* the last round whose flag store the running launch has made */
    uint32_t pad;
};

struct hs_record {
    uint64_t area; /* the area's offset in the allocation */
    uint32_t used, pad;
    struct hs_side side[2]; /* [role] */
};

struct meta {
    uint64_t magic, npages;
    /* Entries ever taken in each table: only those are searched, so that a search touches (and
     * makes resident) no more of the tables than is used. */
    uint32_t contents_used, hs_used;
    int32_t owner_phys; /* the physical device that owns the memory (read by an importer) */
    uint32_t pad;
    pthread_mutex_t lock; /* guards all of it; page states are also read without it */
    struct content contents[MAX_CONTENTS]; /* entry 0 unused: state 0 means "raw" */
    struct hs_record hs[MAX_HS];
    /* then, from the next page on: uint16_t state[npages] */
};

static size_t page_size(void) { return config()->page; }

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

static size_t meta_head_bytes(void) { return round_up(sizeof(struct meta), page_size()); }

/* Bytes mapped for an allocation of n bytes (the memory rounded to pages, then the metadata);
 * 0 when that does not fit in an off_t. */
static size_t mapped_bytes(size_t n) {
    size_t pg = page_size();
    if (n > (size_t)INT64_MAX / 2) return 0;
    size_t data = round_up(n, pg);
    return data + meta_head_bytes() + round_up(data / pg * sizeof(uint16_t), pg);
}

static uint16_t *page_states(const struct region *r) {
    return (uint16_t *)(void *)((unsigned char *)r->meta + meta_head_bytes());
}

static int robust_mutex_init(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc == 0) rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    if (rc == 0) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (rc == 0) rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

/* A process died holding the lock, maybe half way through an update: page states are always
 * whole (one atomic store each), so the reference counts are rebuilt from them. */
static void meta_recount(struct region *r) {
    struct meta *m = r->meta;
    uint16_t *st = page_states(r);
    for (size_t i = 0; i < m->contents_used; i++) m->contents[i].refs = 0;
    for (uint64_t i = 0; i < m->npages; i++) {
        uint16_t s = __atomic_load_n(&st[i], __ATOMIC_RELAXED);
        if (s == 0) continue;
        if (s >= m->contents_used) m->contents_used = s + 1u;
        m->contents[s].refs++;
    }
}

static void meta_lock(struct region *r) {
    int rc = pthread_mutex_lock(&r->meta->lock);
    if (rc == EOWNERDEAD) {
        meta_recount(r);
        rc = pthread_mutex_consistent(&r->meta->lock);
    }
    if (rc != 0) die("pthread_mutex_lock (shared)", rc);
}

static void meta_unlock(struct region *r) {
    int rc = pthread_mutex_unlock(&r->meta->lock);
    if (rc != 0) die("pthread_mutex_unlock (shared)", rc);
}

/* The bytes [x, x+len) of content c (x an offset in the allocation). */
static void content_bytes(const struct content *c, size_t x, unsigned char *dst, size_t len) {
    if (c->kind == C_FILL) {
        memset(dst, (unsigned char)c->seed, len);
        return;
    }
    for (size_t k = 0; k < len; k++)
        dst[k] = pat((x + k - c->origin + c->n - c->shift) % c->n, c->seed);
}

/* Whether any page of [off, off+n) (n > 0) is lazy (a racy look, then taken under the lock). */
static int any_lazy(const struct region *r, size_t off, size_t n) {
    const uint16_t *st = page_states(r);
    size_t pg = page_size();
    for (size_t i = off / pg; i <= (off + n - 1) / pg; i++)
        if (__atomic_load_n(&st[i], __ATOMIC_ACQUIRE) != 0) return 1;
    return 0;
}

/* Makes every page of [off, off+n) raw: a lazy page gets its bytes written out. Before any
 * write of raw bytes, and before a wait that reads them. */
static void make_raw(struct region *r, size_t off, size_t n) {
    if (n == 0 || !any_lazy(r, off, n)) return;
    size_t pg = page_size();
    uint16_t *st = page_states(r);
    meta_lock(r);
    for (size_t i = off / pg; i <= (off + n - 1) / pg; i++) {
        uint16_t s = st[i];
        if (s == 0) continue;
        content_bytes(&r->meta->contents[s], i * pg, r->base + i * pg, pg);
        __atomic_store_n(&st[i], 0, __ATOMIC_RELEASE);
        r->meta->contents[s].refs--;
    }
    meta_unlock(r);
}

/* Reads [off, off+n) of r into dst, lazy pages from their content (nothing is made raw). */
static void read_bytes(struct region *r, size_t off, unsigned char *dst, size_t n) {
    if (n == 0) return;
    if (!any_lazy(r, off, n)) {
        memcpy(dst, r->base + off, n);
        return;
    }
    size_t pg = page_size();
    const uint16_t *st = page_states(r);
    meta_lock(r);
    for (size_t at = off; at < off + n;) {
        size_t len = pg - at % pg;
        if (len > off + n - at) len = off + n - at;
        uint16_t s = st[at / pg];
        if (s == 0)
            memcpy(dst + (at - off), r->base + at, len);
        else
            content_bytes(&r->meta->contents[s], at, dst + (at - off), len);
        at += len;
    }
    meta_unlock(r);
}

/* Whether every byte o of [off, off+n) holds pat(o - origin, seed) because its page is lazy
 * with exactly that pattern (a cheap, exact test; 0 says only "not known that way"). */
static int holds_pattern(struct region *r, size_t off, size_t n, uint64_t seed, size_t origin) {
    if (n == 0) return 1;
    size_t pg = page_size();
    const uint16_t *st = page_states(r);
    int all = 1;
    meta_lock(r);
    for (size_t i = off / pg; all && i <= (off + n - 1) / pg; i++) {
        const struct content *c = &r->meta->contents[st[i]];
        all = st[i] != 0 && c->kind == C_PATTERN && c->seed == seed && c->origin == origin &&
              c->shift == 0;
    }
    meta_unlock(r);
    return all;
}

/* The content table's entry for c: an equal entry in use, else a free one filled with c; 0
 * when the table is full (meta lock held). */
static uint16_t content_entry(struct meta *m, const struct content *c) {
    uint16_t free_one = 0;
    for (uint16_t i = 1; i < m->contents_used; i++) {
        struct content *e = &m->contents[i];
        if (e->refs == 0) {
            if (free_one == 0) free_one = i;
        } else if (e->kind == c->kind && e->seed == c->seed && e->origin == c->origin &&
                   e->n == c->n && e->shift == c->shift) {
            return i;
        }
    }
    if (free_one == 0 && m->contents_used < MAX_CONTENTS)
        free_one = (uint16_t)(m->contents_used == 0 ? 1 : m->contents_used);
    if (free_one != 0) {
        m->contents[free_one] = *c;
        m->contents[free_one].refs = 0;
        if (free_one >= m->contents_used) m->contents_used = free_one + 1u;
    }
    return free_one;
}

/* A write of content c (NULL: zeros) over [off, off+n) that no fault alters: the whole pages
 * inside it become lazy and their memory is given back (MADV_REMOVE; a hole reads as zeros).
 * Returns the part left for raw writes, [off, *a) and [*b, off+n), or 0 when nothing was done
 * (no whole page, or a full content table): then all of it is. */
static int write_lazy(struct region *r, size_t off, size_t n, const struct content *c, size_t *a,
                      size_t *b) {
    size_t pg = page_size();
    *a = round_up(off, pg);
    *b = (off + n) / pg * pg;
    if (*a >= *b) return 0;
    uint16_t *st = page_states(r);
    meta_lock(r);
    uint16_t e = c == NULL ? 0 : content_entry(r->meta, c);
    if (c != NULL && e == 0) {
        meta_unlock(r);
        return 0;
    }
    /* Inside the lock: a page made raw meanwhile must not lose its bytes afterwards. When the
     * kernel cannot remove them, the old bytes stay resident but unread. */
    (void)madvise(r->base + *a, *b - *a, MADV_REMOVE);
    for (size_t i = *a / pg; i < *b / pg; i++) {
        uint16_t old = st[i];
        if (old != 0) r->meta->contents[old].refs--;
        if (e != 0) r->meta->contents[e].refs++;
        __atomic_store_n(&st[i], e, __ATOMIC_RELEASE);
    }
    meta_unlock(r);
    return 1;
}

/* The handshake record of the area at offset area (meta lock held): found, or taken (a free
 * one, else one whose launches have all ended); NULL when every one is busy. */
static struct hs_record *hs_record(struct region *r, uint64_t area) {
    struct hs_record *spare = NULL;
    for (size_t i = 0; i < r->meta->hs_used; i++) {
        struct hs_record *h = &r->meta->hs[i];
        if (h->used && h->area == area) return h;
        int idle = !h->used || (h->side[0].started == h->side[0].ended &&
                                h->side[1].started == h->side[1].ended);
        if (spare == NULL && idle) spare = h;
    }
    if (spare == NULL && r->meta->hs_used < MAX_HS) spare = &r->meta->hs[r->meta->hs_used++];
    if (spare == NULL) return NULL;
    if (!spare->used) {
        for (int k = 0; k < 2; k++)
            if (robust_mutex_init(&spare->side[k].alive) != 0) return NULL;
        spare->used = 1;
    }
    spare->area = area;
    for (int k = 0; k < 2; k++) {
        spare->side[k].started = spare->side[k].ended = spare->side[k].issued = 0;
    }
    return spare;
}

/* Whether side s's running launch is alive (meta lock held): its process holds the side's
 * robust mutex while it runs; a dead holder's launch counts as ended. */
static int hs_alive(struct hs_side *s) {
    int rc = pthread_mutex_trylock(&s->alive);
    if (rc == EBUSY) return 1;
    if (rc == EOWNERDEAD) {
        s->ended = s->started;
        if (pthread_mutex_consistent(&s->alive) != 0) die("pthread_mutex_consistent", rc);
    } else if (rc != 0) {
        die("pthread_mutex_trylock", rc);
    }
    if ((rc = pthread_mutex_unlock(&s->alive)) != 0) die("pthread_mutex_unlock", rc);
    return s->started > s->ended;
}

/* Writes the metadata of a fresh allocation of n bytes owned by physical device owner (its
 * memfd is all zeros); nonzero when its mutex cannot be made. */
static int meta_init(struct meta *m, size_t n, int owner) {
    m->magic = META_MAGIC;
    m->npages = round_up(n, page_size()) / page_size();
    m->owner_phys = owner;
    return robust_mutex_init(&m->lock);
}

/* A fresh allocation of n > 0 bytes on the current device (lock held). */
static int allocate(size_t n, uintptr_t *out) {
    size_t total = mapped_bytes(n);
    if (total == 0) return E_OUT_OF_MEMORY;
    /* memfd: anonymous, so nothing named can outlive the process; shareable via /proc. */
    int fd = memfd_create("p2pcheck-sim", MFD_CLOEXEC);
    if (fd < 0) return E_OUT_OF_MEMORY;
    struct stat st;
    void *p = MAP_FAILED;
    int rc = E_OUT_OF_MEMORY;
    /* Nothing is reserved: a page takes memory when first touched, and lazy pages give theirs
     * back. memfds live on the kernel's internal shmem mount, which has no size limit, so a
     * late page can fail only for want of memory, which is the OOM killer's either way. */
    if (ftruncate(fd, (off_t)total) == 0 && fstat(fd, &st) == 0 &&
        (p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) != MAP_FAILED) {
        struct meta *m = (struct meta *)(void *)((unsigned char *)p + round_up(n, page_size()));
        struct region r = {
            .base = p,
            .size = n,
            .map_len = total,
            .meta = m,
            .fd = fd,
            .owner_phys = current_phys(),
            .is_ipc = 0,
            .ctx_dev = tl_dev,
            .ino = (uint64_t)st.st_ino,
            .dev = (uint64_t)st.st_dev,
        };
        if (meta_init(m, n, r.owner_phys) == 0) rc = add_region(&r);
    }
    if (rc == E_OK) {
        *out = (uintptr_t)p;
        return E_OK;
    }
    if (p != MAP_FAILED && munmap(p, total) != 0)
        fprintf(stderr, "p2pcheck-sim: munmap: %s\n", strerror(errno));
    if (close(fd) != 0) fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    return rc;
}

/* Frees the own allocation starting exactly at p (lock held). */
static int free_allocation(uintptr_t p) {
    for (size_t i = 0; i < g_nregions; i++)
        if ((uintptr_t)g_regions[i].base == p && !g_regions[i].is_ipc && !g_regions[i].cumem)
            return release_region(i);
    return E_INVALID_VALUE;
}

/* ------------------------------------------------------------------------------------------ */
/* Accesses, with the faults applied */

/* Fault bits for an access to r by this thread: only peer mappings (IPC, or cuMem of imported
 * memory) are ever faulted; cumem-drop-writes drops writes through cuMem mappings alone. */
static unsigned fault_mask(const struct region *r) {
    if (r == NULL || (!r->is_ipc && !r->is_import)) return 0;
    unsigned bits = pair_faults(r->owner_phys, current_phys());
    if (r->is_import && (bits & F_CUMEM_DROP)) bits |= F_DROP_WRITES;
    return bits;
}

static void say_fault(const char *kind, const struct region *r) {
    fprintf(stderr, "p2pcheck-sim: fault %d->%d:%s hit by pid %ld\n", r->owner_phys,
            current_phys(), kind, (long)getpid());
}

/* hang and crash fire at the first access; called with the lock held, returns only when
 * neither applies. */
static void trigger(const struct region *r, unsigned mask) {
    if (mask & F_CRASH) {
        say_fault("crash", r);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        if (sigemptyset(&sa.sa_mask) != 0 || sigaction(SIGSEGV, &sa, NULL) != 0)
            fprintf(stderr, "p2pcheck-sim: cannot restore SIGSEGV: %s\n", strerror(errno));
        sigset_t set;
        /* A blocked SIGSEGV from raise() would stay pending: unblock it first. */
        if (sigemptyset(&set) != 0 || sigaddset(&set, SIGSEGV) != 0 ||
            pthread_sigmask(SIG_UNBLOCK, &set, NULL) != 0)
            fprintf(stderr, "p2pcheck-sim: cannot unblock SIGSEGV\n");
        if (raise(SIGSEGV) != 0) fprintf(stderr, "p2pcheck-sim: raise: %s\n", strerror(errno));
        abort(); /* not reached: SIGSEGV's default action ends the process */
    }
    if (mask & F_HANG) {
        say_fault("hang", r);
        unlock(); /* other threads may go on; this one never returns */
        for (;;) pause(); /* returns only after a handled signal: keep waiting */
    }
}

#define PARTIAL_PAGE ((size_t)65536) /* partial: odd pages of this size lose their writes */
#define SHIFT_BYTES ((size_t)4096)   /* shifted: how much further kernel stores land */

/* Puts n bytes at offset off of r (a copy from src, or `fill` when src is NULL), then applies
 * corrupt. release: a flag store that must become visible after every earlier store, as one
 * atomic 32-bit store when it is one aligned word. */
static void land(struct region *r, size_t off, const unsigned char *src, unsigned char fill,
                 size_t n, unsigned mask, int release) {
    unsigned char *dst = r->base + off;
    make_raw(r, off, n);
    if (release && src != NULL && n == sizeof(uint32_t) && off % sizeof(uint32_t) == 0) {
        unsigned char b[sizeof(uint32_t)];
        memcpy(b, src, sizeof b);
        if (mask & F_CORRUPT)
            for (size_t k = 0; k < sizeof b; k++)
                if ((off + k) % 64 == 7) b[k] ^= 0x5a;
        uint32_t v;
        memcpy(&v, b, sizeof v);
        __atomic_store_n((uint32_t *)(void *)dst, v, __ATOMIC_RELEASE);
        return;
    }
    if (release) __atomic_thread_fence(__ATOMIC_RELEASE);
    if (src != NULL)
        memmove(dst, src, n);
    else
        memset(dst, fill, n);
    if (mask & F_CORRUPT) {
        size_t o = off + ((7 + 64 - off % 64) % 64); /* first offset >= off with o % 64 == 7 */
        for (; o < off + n; o += 64) r->base[o] ^= 0x5a;
    }
}

/* Writes n bytes at offset off of r (off + n <= r->size): a copy from src, or `fill` when src
 * is NULL, with the write faults of mask applied (by_kernel: an SM store, else copy engine). */
static void write_bytes(struct region *r, size_t off, const void *src, unsigned char fill,
                        size_t n, unsigned mask, int by_kernel, int release) {
    const unsigned char *s = src;
    if (mask & F_DROP_WRITES) return;
    if (by_kernel && (mask & F_SM_ONLY)) return;
    if (by_kernel && (mask & F_SHIFTED)) {
        if (r->size - off <= SHIFT_BYTES) return; /* lands at or past the end: all vanish */
        off += SHIFT_BYTES;
        if (n > r->size - off) n = r->size - off; /* the part past the end vanishes */
    }
    if (!(mask & F_PARTIAL)) {
        land(r, off, s, fill, n, mask, release);
        return;
    }
    while (n > 0) {
        size_t chunk = PARTIAL_PAGE - off % PARTIAL_PAGE;
        if (chunk > n) chunk = n;
        if ((off / PARTIAL_PAGE) % 2 == 0) land(r, off, s, fill, chunk, mask, release);
        off += chunk;
        n -= chunk;
        if (s != NULL) s += chunk;
    }
}

/* Kernel loads of n bytes at offset off of r into dst. */
static void kernel_load(struct region *r, size_t off, void *dst, size_t n, unsigned mask) {
    if (mask & F_SM_ONLY)
        memset(dst, 0xEE, n);
    else
        read_bytes(r, off, dst, n);
}

/* Whether a write lands as written (no fault drops, moves, delays or changes any byte of it):
 * then its whole pages can be lazy. by_kernel: an SM store, else copy engine. */
static int lands_as_written(unsigned mask, int by_kernel) {
    unsigned alter = F_DROP_WRITES | F_CORRUPT | F_PARTIAL;
    if (by_kernel) alter |= F_SM_ONLY | F_SHIFTED | F_LATE;
    return (mask & alter) == 0;
}

/* Driver-engine memset of [p, p+n) (lock held). */
static int sim_memset(uintptr_t p, unsigned char value, size_t n) {
    if (n == 0) return E_OK;
    struct region *r = find_range(p, n);
    if (r == NULL) return E_INVALID_VALUE;
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    size_t off = p - (uintptr_t)r->base, a, b;
    struct content fill = {.kind = C_FILL, .seed = value};
    if (lands_as_written(mask, 0) && write_lazy(r, off, n, value ? &fill : NULL, &a, &b)) {
        write_bytes(r, off, NULL, value, a - off, mask, 0, 0);
        write_bytes(r, b, NULL, value, off + n - b, mask, 0, 0);
    } else {
        write_bytes(r, off, NULL, value, n, mask, 0, 0);
    }
    return E_OK;
}

/* Driver-engine copy (lock held). kind: 0 HtoH, 1 HtoD, 2 DtoH, 3 DtoD, 4 default (inferred
 * from which pointers lie in simulated device memory). */
static int sim_copy(uintptr_t dst, uintptr_t src, size_t n, int kind) {
    if (kind < 0 || kind > 4) return E_MEMCPY_DIRECTION;
    if (n == 0) return E_OK;
    if (dst == 0 || src == 0) return E_INVALID_VALUE;
    struct region *rd = find_region(dst), *rs = find_region(src);
    /* Reserved address space is never host memory, mapped or not. */
    if ((rd == NULL && in_reservation(dst)) || (rs == NULL && in_reservation(src)))
        return E_INVALID_VALUE;
    /* A range that starts in device memory must end there too. */
    if (rd != NULL && find_range(dst, n) == NULL) return E_INVALID_VALUE;
    if (rs != NULL && find_range(src, n) == NULL) return E_INVALID_VALUE;
    if ((kind == 1 || kind == 3) && rd == NULL) return E_INVALID_VALUE;
    if ((kind == 2 || kind == 3) && rs == NULL) return E_INVALID_VALUE;
    unsigned ms = fault_mask(rs), md = fault_mask(rd);
    trigger(rs, ms);
    trigger(rd, md);
    /* Copy-engine reads through a mapping are never altered by the faults. Into device memory
     * the bytes are copied from the source's own (made raw), so overlaps behave as memmove. */
    if (rd != NULL) {
        if (rs != NULL) make_raw(rs, src - (uintptr_t)rs->base, n);
        write_bytes(rd, dst - (uintptr_t)rd->base, (const void *)src, 0, n, md, 0, 0);
    } else if (rs != NULL) {
        read_bytes(rs, src - (uintptr_t)rs->base, (unsigned char *)dst, n);
    } else {
        memmove((void *)dst, (const void *)src, n);
    }
    return E_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Kernels */

/* Kernel stores held back until the kernel ends (late-visibility). */
struct pending {
    struct region *r;
    size_t off, n;
    unsigned char fill;
    unsigned char *bytes; /* a copy of the stored bytes (malloc'd); NULL: n times fill */
    unsigned mask;
    int release;
};

/* One kernel's run: its buffered stores, as many as it makes. */
struct launch {
    struct pending *pending;
    size_t npending, cap;
    int oom; /* a store could not be buffered: it was written at once, the launch fails */
};

#define LAUNCH_INIT {.pending = NULL, .npending = 0, .cap = 0, .oom = 0}

/* Buffers a store for kernel_end; 0 when memory ran out (nothing buffered). */
static int buffer_store(struct launch *l, struct region *r, size_t off, const void *src,
                        unsigned char fill, size_t n, unsigned mask, int release) {
    if (l->npending == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        struct pending *grown = realloc(l->pending, cap * sizeof *grown);
        if (grown == NULL) return 0;
        l->pending = grown;
        l->cap = cap;
    }
    unsigned char *copy = NULL;
    if (src != NULL) {
        copy = malloc(n ? n : 1);
        if (copy == NULL) return 0;
        memcpy(copy, src, n);
    }
    l->pending[l->npending++] = (struct pending){
        .r = r, .off = off, .n = n, .fill = fill, .bytes = copy, .mask = mask, .release = release};
    return 1;
}

/* A kernel store of n bytes at offset off of r (src, or fill when src is NULL). release: a
 * flag store (see land). Under late-visibility it is buffered until kernel_end; when that
 * buffer cannot grow, the store is written at once (never lost) and the launch fails. */
static void kernel_store_ex(struct launch *l, struct region *r, size_t off, const void *src,
                            unsigned char fill, size_t n, unsigned mask, int release) {
    if (n == 0) return;
    if ((mask & F_LATE) && buffer_store(l, r, off, src, fill, n, mask, release)) return;
    if (mask & F_LATE) {
        if (!l->oom)
            fprintf(stderr, "p2pcheck-sim: out of memory buffering a late-visibility store; "
                            "written at once, the launch fails\n");
        l->oom = 1;
    }
    write_bytes(r, off, src, fill, n, mask, 1, release);
}

static void kernel_store(struct launch *l, struct region *r, size_t off, const void *src,
                         unsigned char fill, size_t n, unsigned mask) {
    kernel_store_ex(l, r, off, src, fill, n, mask, 0);
}

/* The kernel ends: buffered stores become visible, in program order. The launch's result. */
static int kernel_end(struct launch *l) {
    for (size_t i = 0; i < l->npending; i++) {
        struct pending *p = &l->pending[i];
        write_bytes(p->r, p->off, p->bytes, p->fill, p->n, p->mask, 1, p->release);
        free(p->bytes);
    }
    free(l->pending);
    int oom = l->oom;
    *l = (struct launch)LAUNCH_INIT;
    return oom ? E_OUT_OF_MEMORY : E_OK;
}

static int param_u64(void **params, int i, uint64_t *out) {
    if (params[i] == NULL) return E_INVALID_VALUE;
    memcpy(out, params[i], sizeof *out);
    return E_OK;
}

static int param_u32(void **params, int i, uint32_t *out) {
    if (params[i] == NULL) return E_INVALID_VALUE;
    memcpy(out, params[i], sizeof *out);
    return E_OK;
}

/* The region holding [p, p+n) for a kernel, or NULL (an illegal address). */
static struct region *kernel_range(uint64_t p, uint64_t n) {
    if (n > SIZE_MAX || p > UINTPTR_MAX) return NULL;
    return find_range((uintptr_t)p, (size_t)n);
}

static size_t region_off(const struct region *r, uint64_t p) {
    return (size_t)((uintptr_t)p - (uintptr_t)r->base);
}

static int valid_width(uint32_t width) {
    return width == 1 || width == 4 || width == 8 || width == 16;
}

/* Bytes a pattern kernel handles at a time (the store buffer lives on the stack). */
#define PATTERN_CHUNK ((size_t)16384)

/* The stores of bytes q in [from, to) of p2pc_pattern_store over [off, off+n) of r. */
static void store_pattern(struct launch *l, struct region *r, size_t off, uint64_t n, uint64_t seed,
                          uint64_t shift, uint64_t from, uint64_t to, unsigned mask) {
    unsigned char buf[PATTERN_CHUNK];
    for (uint64_t q = from; q < to;) {
        size_t len = to - q < PATTERN_CHUNK ? (size_t)(to - q) : PATTERN_CHUNK;
        for (size_t k = 0; k < len; k++) {
            uint64_t at = q + k;
            buf[k] = pat(at >= shift ? at - shift : at + n - shift, seed);
        }
        kernel_store(l, r, off + (size_t)q, buf, 0, len, mask);
        q += len;
    }
}

static int run_pattern_store(void **params) {
    uint64_t p, n, seed, shift;
    uint32_t width;
    if (param_u64(params, 0, &p) || param_u64(params, 1, &n) || param_u64(params, 2, &seed) ||
        param_u32(params, 3, &width) || param_u64(params, 4, &shift))
        return E_INVALID_VALUE;
    if (!valid_width(width) || n % 16 != 0 || shift % 16 != 0 || (n ? shift >= n : shift != 0))
        return E_INVALID_VALUE;
    if (n == 0) return E_OK;
    struct region *r = kernel_range(p, n);
    if (r == NULL) return E_ILLEGAL_ADDRESS;
    if (p % width != 0) return E_MISALIGNED_ADDRESS;
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    /* Words never wrap (n, shift and every word's o are multiples of width), so byte q of
     * [p, p+n) gets pat(o, seed) with o = (q - shift) mod n, whatever the width. */
    struct launch l = LAUNCH_INIT;
    size_t off = region_off(r, p), a, b;
    struct content c = {.kind = C_PATTERN, .seed = seed, .origin = off, .n = n, .shift = shift};
    if (lands_as_written(mask, 1) && write_lazy(r, off, (size_t)n, &c, &a, &b)) {
        store_pattern(&l, r, off, n, seed, shift, 0, a - off, mask);
        store_pattern(&l, r, off, n, seed, shift, b - off, n, mask);
    } else if (!(mask & F_DROP_WRITES) && !(mask & F_SM_ONLY)) { /* else every store vanishes */
        store_pattern(&l, r, off, n, seed, shift, 0, n, mask);
    }
    return kernel_end(&l);
}

static int run_pattern_check(void **params) {
    uint64_t p, n, seed, old_seed, counters;
    uint32_t width;
    if (param_u64(params, 0, &p) || param_u64(params, 1, &n) || param_u64(params, 2, &seed) ||
        param_u64(params, 3, &old_seed) || param_u32(params, 4, &width) ||
        param_u64(params, 5, &counters))
        return E_INVALID_VALUE;
    if (!valid_width(width) || n % 16 != 0) return E_INVALID_VALUE;
    /* Every address is checked before anything runs: a bad one touches nothing. */
    struct region *r = n ? kernel_range(p, n) : NULL;
    struct region *rc = kernel_range(counters, 3 * sizeof(uint64_t));
    if ((n && r == NULL) || rc == NULL) return E_ILLEGAL_ADDRESS;
    if (p % width != 0 || counters % sizeof(uint64_t) != 0) return E_MISALIGNED_ADDRESS;
    unsigned mask = fault_mask(r), mc = fault_mask(rc);
    if (r != NULL) trigger(r, mask);
    trigger(rc, mc);
    uint64_t wrong = 0, first = UINT64_MAX, stale = 0;
    if (r != NULL) {
        unsigned char buf[PATTERN_CHUNK];
        size_t off = region_off(r, p);
        /* Memory known to hold exactly the expected pattern needs no byte by byte look: all of
         * it at once, else chunk by chunk. */
        int known = !(mask & F_SM_ONLY) && holds_pattern(r, off, (size_t)n, seed, off);
        for (uint64_t o = 0; !known && o < n;) {
            size_t len = n - o < PATTERN_CHUNK ? (size_t)(n - o) : PATTERN_CHUNK;
            if (!(mask & F_SM_ONLY) && holds_pattern(r, off + (size_t)o, len, seed, off)) {
                o += len;
                continue;
            }
            kernel_load(r, off + (size_t)o, buf, len, mask);
            for (size_t k = 0; k < len; k++) {
                if (buf[k] == pat(o + k, seed)) continue;
                if (wrong++ == 0) first = o + k;
                if (buf[k] == pat(o + k, old_seed)) stale++;
            }
            o += len;
        }
    }
    if (wrong == 0) return E_OK; /* no atomic ran: the counters are untouched */
    struct launch l = LAUNCH_INIT;
    size_t offc = region_off(rc, counters);
    uint64_t v;
    kernel_load(rc, offc, &v, 8, mc);
    v += wrong;
    kernel_store(&l, rc, offc, &v, 0, 8, mc);
    kernel_load(rc, offc + 8, &v, 8, mc);
    if (first < v) kernel_store(&l, rc, offc + 8, &first, 0, 8, mc);
    if (stale != 0) {
        kernel_load(rc, offc + 16, &v, 8, mc);
        v += stale;
        kernel_store(&l, rc, offc + 16, &v, 0, 8, mc);
    }
    return kernel_end(&l);
}

/* p2pc_handshake's area: where each side's flag and payload lie. */
enum {
    HS_AREA = 2048,
    HS_FLAG_C = 0,
    HS_FLAG_P = 128,
    HS_PAYLOAD_C = 256,
    HS_PAYLOAD_P = 1024,
    HS_PAYLOAD = 256,
};

static uint64_t now_ns(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) die("clock_gettime", errno);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A handshake launch running in this thread: its record, its role, and which launch of that
 * role on the area it is (the k-th of each role make a pair). */
struct hs_run {
    struct region *r;
    struct hs_record *h;
    int me;
    uint32_t k;
};

/* Starts launch x of role `me` on the area at offset area of r: holds the role's alive mutex
 * until hs_end. Another launch of the same role running on the area is invalid value. */
static int hs_begin(struct hs_run *x, struct region *r, uint64_t area, int me) {
    meta_lock(r);
    struct hs_record *h = hs_record(r, area);
    if (h == NULL) {
        meta_unlock(r);
        return E_OUT_OF_MEMORY;
    }
    struct hs_side *s = &h->side[me];
    /* Under the meta lock nobody else only looks at the mutex (hs_alive runs under it too):
     * busy means a running launch of this role holds it. */
    int rc = pthread_mutex_trylock(&s->alive);
    if (rc == EOWNERDEAD) {
        s->ended = s->started;
        rc = pthread_mutex_consistent(&s->alive);
        if (rc != 0) die("pthread_mutex_consistent", rc);
    } else if (rc == EBUSY) {
        meta_unlock(r);
        return E_INVALID_VALUE;
    } else if (rc != 0) {
        die("pthread_mutex_trylock", rc);
    }
    *x = (struct hs_run){.r = r, .h = h, .me = me, .k = ++s->started};
    s->issued = 0;
    meta_unlock(r);
    return E_OK;
}

/* The u32 flag at offset off of r, as memory (also a futex: waiters sleep on it). */
static uint32_t *flag_word(const struct region *r, size_t off) {
    return (uint32_t *)(void *)(r->base + off);
}

/* Wakes whoever sleeps on a flag word (in any process: the memory is shared). */
static void flag_wake(uint32_t *word) {
    (void)syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Records that launch x has made its flag store for round `round` (after the store: whoever
 * reads this with acquire sees the flag too, if it landed), and wakes the other side. */
static void hs_issued(struct hs_run *x, size_t flag_off, uint32_t round) {
    __atomic_store_n(&x->h->side[x->me].issued, round, __ATOMIC_RELEASE);
    flag_wake(flag_word(x->r, flag_off));
}

/* Ends launch x (after its held-back stores landed) and wakes the other side. */
static void hs_end(struct hs_run *x) {
    meta_lock(x->r);
    x->h->side[x->me].ended = x->k;
    meta_unlock(x->r);
    int rc = pthread_mutex_unlock(&x->h->side[x->me].alive);
    if (rc != 0) die("pthread_mutex_unlock", rc);
    flag_wake(flag_word(x->r, x->h->area + HS_FLAG_C));
    flag_wake(flag_word(x->r, x->h->area + HS_FLAG_P));
}

/* Whether the other side can still make this side's view of a flag read `want`: not when its
 * paired launch has ended or died, nor once it has made that flag store (the value shows at
 * once, or never in this launch: dropped, moved, changed, or held back until the end of a
 * kernel that waits for this one). Decided from what the other side did, never by a clock. */
static int hs_may_still_come(struct hs_run *x, uint32_t want) {
    meta_lock(x->r);
    struct hs_side *o = &x->h->side[1 - x->me];
    int may;
    if (o->started < x->k)
        may = 1; /* not started yet */
    else if (o->started > x->k || o->ended >= x->k)
        may = 0;
    else if (__atomic_load_n(&o->issued, __ATOMIC_ACQUIRE) >= want)
        may = 0;
    else
        may = hs_alive(o);
    meta_unlock(x->r);
    return may;
}

/* What a kernel's acquire load of a flag word reads: sm-only loads read 0xEE bytes. */
static uint32_t seen_flag(uint32_t word, unsigned mask) {
    return mask & F_SM_ONLY ? 0xEEEEEEEEu : word;
}

/* Waits until the flag at offset off reads `want`; 0 when it never can. No deadline of its
 * own: the other side's progress or end decides, and the host's step timeout bounds a side
 * that never starts (the hang fault). */
static int wait_flag(struct hs_run *x, size_t off, uint32_t want, unsigned mask) {
    uint32_t *word = flag_word(x->r, off);
    for (unsigned looks = 0;; looks++) {
        uint32_t raw = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if (seen_flag(raw, mask) == want) return 1;
        /* A few yields first: quick when the other side runs on another CPU, and they give it
         * this one when they share it. */
        if (looks < 16) {
            sched_yield();
            continue;
        }
        if (!hs_may_still_come(x, want))
            return seen_flag(__atomic_load_n(word, __ATOMIC_ACQUIRE), mask) == want;
        /* Then sleep until the word changes or the other side wakes it (at each flag store
         * and at its end), or for 1 ms, to look again whether it started or died. Neither the
         * wake nor the 1 ms decides anything: hs_may_still_come does. */
        struct timespec nap = {.tv_sec = 0, .tv_nsec = 1000000};
        (void)syscall(SYS_futex, word, FUTEX_WAIT, raw, &nap, NULL, 0);
    }
}

static int run_handshake(void **params) {
    uint64_t area, seed, budget, out;
    uint32_t rounds, role;
    if (param_u64(params, 0, &area) || param_u32(params, 1, &rounds) ||
        param_u32(params, 2, &role) || param_u64(params, 3, &seed) ||
        param_u64(params, 4, &budget) || param_u64(params, 5, &out))
        return E_INVALID_VALUE;
    if (role > 1) return E_INVALID_VALUE;
    /* Every address is checked before anything runs: a bad one touches nothing. */
    struct region *ra = kernel_range(area, HS_AREA);
    struct region *ro = kernel_range(out, 4 * sizeof(uint64_t));
    if (ra == NULL || ro == NULL) return E_ILLEGAL_ADDRESS;
    if (area % sizeof(uint32_t) != 0 || out % sizeof(uint64_t) != 0) return E_MISALIGNED_ADDRESS;
    unsigned ma = fault_mask(ra), mo = fault_mask(ro);
    trigger(ra, ma);
    trigger(ro, mo);
    uint64_t start = now_ns();
    int driver = role == 1;
    size_t base = region_off(ra, area);
    struct hs_run x;
    int rc = hs_begin(&x, ra, base, (int)role);
    if (rc != E_OK) return rc;
    make_raw(ra, base, HS_AREA); /* the flags are waited on with atomic loads of their bytes */
    /* Mine: what this side writes; theirs: what it waits for and checks. */
    size_t my_flag = base + (driver ? HS_FLAG_C : HS_FLAG_P);
    size_t their_flag = base + (driver ? HS_FLAG_P : HS_FLAG_C);
    size_t my_payload = base + (driver ? HS_PAYLOAD_C : HS_PAYLOAD_P);
    size_t their_payload = base + (driver ? HS_PAYLOAD_P : HS_PAYLOAD_C);
    uint64_t my_pat = driver ? 0 : HS_PAYLOAD, their_pat = driver ? HS_PAYLOAD : 0;
    struct launch l = LAUNCH_INIT;
    uint64_t done = 0, errors = 0, timed_out = 0;
    unsigned char buf[HS_PAYLOAD];
    for (uint32_t r = 1; r != 0 && r <= rounds; r++) {
        uint64_t at = (uint64_t)r * 512;
        if (driver) {
            for (size_t j = 0; j < HS_PAYLOAD; j++) buf[j] = pat(at + my_pat + j, seed);
            kernel_store(&l, ra, my_payload, buf, 0, HS_PAYLOAD, ma);
            kernel_store_ex(&l, ra, my_flag, &r, 0, sizeof r, ma, 1);
            hs_issued(&x, my_flag, r);
        }
        if (!wait_flag(&x, their_flag, r, ma)) {
            timed_out = 1;
            break;
        }
        kernel_load(ra, their_payload, buf, HS_PAYLOAD, ma);
        for (size_t j = 0; j < HS_PAYLOAD; j++) errors += buf[j] != pat(at + their_pat + j, seed);
        if (!driver) {
            for (size_t j = 0; j < HS_PAYLOAD; j++) buf[j] = pat(at + my_pat + j, seed);
            kernel_store(&l, ra, my_payload, buf, 0, HS_PAYLOAD, ma);
            kernel_store_ex(&l, ra, my_flag, &r, 0, sizeof r, ma, 1);
            hs_issued(&x, my_flag, r);
        }
        done++;
    }
    /* A GPU's wait that can never end lasts until its deadline: the simulator knows at once,
     * and reports the budget as the time waited, as the GPU's kernel would. */
    uint64_t elapsed = now_ns() - start;
    if (timed_out && elapsed < budget) elapsed = budget;
    uint64_t result[4] = {done, errors, timed_out, elapsed};
    kernel_store(&l, ro, region_off(ro, out), result, 0, sizeof result, mo);
    rc = kernel_end(&l);
    hs_end(&x);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Bandwidth: streams, events and modelled time (p2pcheck --bandwidth) */

/* What the model gives a transfer, in GB/s (= bytes per ns), and a dependent load, in ns. */
#define SIM_OWN_GBPS 2000.0       /* a GPU's own memory (an H200 copies about 2000 GB/s) */
#define SIM_LINK_GBPS 370.0       /* two GPUs: NVLink 4, 18 links, one way, as measured */
#define SIM_SLOW_GBPS 20.0        /* the slow fault: a path through the host */
#define SIM_OWN_LATENCY_NS 150.0  /* an L2-resident load of the GPU's own memory */
#define SIM_LINK_LATENCY_NS 900.0 /* the same through NVLink */
#define SIM_SLOW_LATENCY_NS 3000.0
#define SIM_SMS 132 /* CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT of every simulated GPU */
enum { MAX_STREAMS = 16, MAX_EVENTS = 32, ATTR_SM_COUNT = 16 };

/* A stream keeps the modelled time its queued work ends at; an event, the time it was recorded
 * at. Work runs at once (synchronously) whatever the stream; only the clocks model a GPU. */
struct stream {
    int live;
    uint64_t clock_ns;
};
struct event {
    int live, recorded;
    uint64_t at_ns;
};
static struct stream g_streams[MAX_STREAMS];
static struct event g_events[MAX_EVENTS];
static uint64_t g_vnow_ns; /* modelled time of the last synchronise: new streams start there */

static struct stream *find_stream(const void *h) {
    for (int i = 0; i < MAX_STREAMS; i++)
        if (h == &g_streams[i] && g_streams[i].live) return &g_streams[i];
    return NULL;
}

static struct event *find_event(const void *h) {
    for (int i = 0; i < MAX_EVENTS; i++)
        if (h == &g_events[i] && g_events[i].live) return &g_events[i];
    return NULL;
}

/* The modelled speed of an access to r: its pair's (through a mapping) or the GPU's own. */
static double model_gbps(const struct region *r) {
    if (r == NULL || !r->is_ipc) return SIM_OWN_GBPS;
    if (fault_mask(r) & F_SLOW) return SIM_SLOW_GBPS;
    return r->owner_phys == current_phys() ? SIM_OWN_GBPS : SIM_LINK_GBPS;
}

static double model_latency_ns(const struct region *r) {
    if (r == NULL || !r->is_ipc) return SIM_OWN_LATENCY_NS;
    if (fault_mask(r) & F_SLOW) return SIM_SLOW_LATENCY_NS;
    return r->owner_phys == current_phys() ? SIM_OWN_LATENCY_NS : SIM_LINK_LATENCY_NS;
}

/* n bytes moved between rd and rs on st: the stream's clock advances by the slower side. */
static void model_transfer(struct stream *st, const struct region *rd, const struct region *rs,
                           size_t n) {
    double a = model_gbps(rd), b = model_gbps(rs);
    if (st != NULL) st->clock_ns += (uint64_t)((double)n / (a < b ? a : b));
}

/* Whether fast-wrong empties a transfer between rd and rs. */
static int fast_wrong(const struct region *rd, const struct region *rs) {
    return ((fault_mask(rd) | fault_mask(rs)) & F_FAST_WRONG) != 0;
}

/* p2pc_copy(uint4 *dst, const uint4 *src, u64 n16): kernel loads and stores of 16 n16 bytes
 * (both 16-aligned, the ranges disjoint), the faults applied to each side. */
static int run_copy(void **params, struct stream *st) {
    uint64_t dst, src, n16;
    if (param_u64(params, 0, &dst) || param_u64(params, 1, &src) || param_u64(params, 2, &n16))
        return E_INVALID_VALUE;
    if (n16 > SIZE_MAX / 16) return E_INVALID_VALUE;
    size_t n = (size_t)n16 * 16;
    if (n == 0) return E_OK;
    struct region *rd = kernel_range(dst, n), *rs = kernel_range(src, n);
    if (rd == NULL || rs == NULL) return E_ILLEGAL_ADDRESS;
    if (dst % 16 != 0 || src % 16 != 0) return E_MISALIGNED_ADDRESS;
    unsigned md = fault_mask(rd), ms = fault_mask(rs);
    trigger(rs, ms);
    trigger(rd, md);
    model_transfer(st, rd, rs, n);
    if (fast_wrong(rd, rs)) return E_OK;
    struct launch l = LAUNCH_INIT;
    unsigned char buf[PATTERN_CHUNK];
    size_t od = region_off(rd, dst), os = region_off(rs, src);
    for (size_t o = 0; o < n; o += PATTERN_CHUNK) {
        size_t len = n - o < PATTERN_CHUNK ? n - o : PATTERN_CHUNK;
        kernel_load(rs, os + o, buf, len, ms);
        kernel_store(&l, rd, od + o, buf, 0, len, md);
    }
    return kernel_end(&l);
}

/* p2pc_spin(u32 *flag, u64 budget_ns): streams here never wait, so the spin is released at
 * once: flag[1] becomes at least 1 ("released by the host"). */
static int run_spin(void **params) {
    uint64_t flag, budget;
    if (param_u64(params, 0, &flag) || param_u64(params, 1, &budget)) return E_INVALID_VALUE;
    struct region *r = kernel_range(flag, 2 * sizeof(uint32_t));
    if (r == NULL) return E_ILLEGAL_ADDRESS;
    if (flag % sizeof(uint32_t) != 0) return E_MISALIGNED_ADDRESS;
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    uint32_t how;
    size_t off = region_off(r, flag) + sizeof(uint32_t);
    kernel_load(r, off, &how, sizeof how, mask);
    if (how >= 1) return E_OK;
    how = 1;
    struct launch l = LAUNCH_INIT;
    kernel_store(&l, r, off, &how, 0, sizeof how, mask);
    return kernel_end(&l);
}

/* p2pc_chain(u8 *p, u64 slots, u64 stride): u64 at p + k*stride = ((k+1) % slots) * stride;
 * stride a multiple of 8, slots at least 1. */
static int run_chain(void **params) {
    uint64_t p, slots, stride;
    if (param_u64(params, 0, &p) || param_u64(params, 1, &slots) || param_u64(params, 2, &stride))
        return E_INVALID_VALUE;
    if (slots == 0 || stride == 0 || stride % 8 != 0 || slots > UINT64_MAX / stride)
        return E_INVALID_VALUE;
    struct region *r = kernel_range(p, slots * stride);
    if (r == NULL) return E_ILLEGAL_ADDRESS;
    if (p % 8 != 0) return E_MISALIGNED_ADDRESS;
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    struct launch l = LAUNCH_INIT;
    size_t off = region_off(r, p);
    for (uint64_t k = 0; k < slots; k++) {
        uint64_t next = ((k + 1) % slots) * stride;
        kernel_store(&l, r, off + (size_t)(k * stride), &next, 0, sizeof next, mask);
    }
    return kernel_end(&l);
}

/* p2pc_chase(const u8 *p, u64 warm, u64 hops, u64 *out): follows the chain from offset 0 for
 * warm + hops loads; out = [hops times the modelled latency of p's memory, offset reached]. A
 * link that leads outside p's region is an illegal address. */
static int run_chase(void **params) {
    uint64_t p, warm, hops, out;
    if (param_u64(params, 0, &p) || param_u64(params, 1, &warm) || param_u64(params, 2, &hops) ||
        param_u64(params, 3, &out))
        return E_INVALID_VALUE;
    struct region *r = kernel_range(p, sizeof(uint64_t));
    struct region *ro = kernel_range(out, 2 * sizeof(uint64_t));
    if (r == NULL || ro == NULL) return E_ILLEGAL_ADDRESS;
    if (p % 8 != 0 || out % 8 != 0) return E_MISALIGNED_ADDRESS;
    unsigned mask = fault_mask(r), mo = fault_mask(ro);
    trigger(r, mask);
    trigger(ro, mo);
    size_t base = region_off(r, p);
    uint64_t o = 0;
    for (uint64_t h = 0; h < warm + hops; h++) {
        if (o > r->size - base || r->size - base - o < sizeof o) return E_ILLEGAL_ADDRESS;
        kernel_load(r, base + (size_t)o, &o, sizeof o, mask);
    }
    uint64_t result[2] = {(uint64_t)((double)hops * model_latency_ns(r)), o};
    struct launch l = LAUNCH_INIT;
    kernel_store(&l, ro, region_off(ro, out), result, 0, sizeof result, mo);
    return kernel_end(&l);
}

/* The architecture of every simulated GPU (an H200's sm_90). */
enum { SIM_ARCH = 90 };

/* A fat binary's PTX (a pointer into it and its length) and whether it has SASS for SIM_ARCH;
 * -1 when it is malformed or holds no PTX. Every size is checked before it is used. */
static int fatbin_find(const unsigned char *b, const unsigned char **ptx, size_t *ptx_len,
                       int *has_sass) {
    uint16_t header;
    uint64_t body;
    memcpy(&header, b + 6, sizeof header);
    memcpy(&body, b + 8, sizeof body);
    if (header < 16 || body > (uint64_t)1 << 30) return -1;
    size_t at = header, end = header + (size_t)body;
    *ptx = NULL;
    *has_sass = 0;
    while (at < end) {
        uint16_t kind;
        uint32_t entry_header, arch;
        uint64_t payload;
        if (end - at < 32) return -1;
        memcpy(&kind, b + at, sizeof kind);
        memcpy(&entry_header, b + at + 4, sizeof entry_header);
        memcpy(&payload, b + at + 8, sizeof payload);
        memcpy(&arch, b + at + 28, sizeof arch);
        if (entry_header < 32 || entry_header > end - at || payload > end - at - entry_header)
            return -1;
        if (kind == 1 && *ptx == NULL) {
            *ptx = b + at + entry_header;
            *ptx_len = (size_t)payload;
        } else if (kind == 2 && arch == SIM_ARCH) {
            *has_sass = 1;
        }
        at += entry_header + (size_t)payload;
    }
    return *ptx == NULL ? -1 : 0;
}

/* XY of the PTX's ".target sm_XY" (0 when it names none). */
static int ptx_target(const char *ptx) {
    const char *t = strstr(ptx, ".target sm_");
    return t == NULL ? 0 : atoi(t + strlen(".target sm_"));
}

/* Records which supported kernels the PTX text defines (".entry NAME("). */
static unsigned ptx_entries(const char *ptx) {
    unsigned defined = 0;
    const char *s = ptx;
    while ((s = strstr(s, ".entry")) != NULL) {
        const char *before = s;
        s += 6;
        if (before != ptx && before[-1] != ' ' && before[-1] != '\t' && before[-1] != '\n')
            continue;
        if (*s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') continue;
        while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
        const char *name = s;
        while (*s && *s != '(' && *s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') s++;
        size_t len = (size_t)(s - name);
        const char *t = s;
        while (*t == ' ' || *t == '\t' || *t == '\n' || *t == '\r') t++;
        if (*t != '(') continue;
        for (int k = 0; k < K_NUM; k++)
            if (strlen(KERNEL_NAMES[k]) == len && strncmp(name, KERNEL_NAMES[k], len) == 0)
                defined |= 1u << k;
    }
    return defined;
}

static struct module *find_module(const void *hmod) {
    for (struct module *m = g_modules; m != NULL; m = m->next)
        if (m == hmod) return m;
    return NULL;
}

/* The live function f points at, or NULL (f is compared, never dereferenced, until found). */
static struct function *find_function(const void *f) {
    for (struct module *m = g_modules; m != NULL; m = m->next)
        for (int k = 0; k < K_NUM; k++)
            if (&m->functions[k] == f && (m->defined & (1u << k))) return &m->functions[k];
    return NULL;
}

static void unlink_module(struct module *target) {
    for (struct module **pp = &g_modules; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == target) {
            *pp = target->next;
            free(target);
            return;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* IPC handles */

static const char HANDLE_MAGIC[8] = {'P', '2', 'P', 'C', 'S', 'I', 'M', '1'};

struct sim_handle {
    char magic[8];
    int32_t pid;
    int32_t fd;
    uint64_t size;
    int32_t owner_phys;
    int32_t reserved;
    uint64_t ino;
    uint64_t dev;
    uint64_t spare;
    uint64_t checksum; /* FNV-1a of everything before it: a handle mangled in transit is 400 */
};
_Static_assert(sizeof(struct sim_handle) == HANDLE_BYTES, "handle layout");

static uint64_t handle_checksum(const struct sim_handle *h) {
    const unsigned char *b = (const unsigned char *)h;
    uint64_t x = 1469598103934665603ULL;
    for (size_t i = 0; i < offsetof(struct sim_handle, checksum); i++) {
        x ^= b[i];
        x *= 1099511628211ULL;
    }
    return x;
}

/* ------------------------------------------------------------------------------------------ */
/* Virtual memory: cuMem allocations, their handles, reservations (see VIRTUAL MEMORY above) */

#define SIM_GRANULARITY ((size_t)2 << 20)
enum { LOC_DEVICE = 1, ALLOC_PINNED = 1, HANDLE_POSIX_FD = 1, ACCESS_NONE = 0, ACCESS_RW = 3 };

/* An allocation handle of this process: its own memfd (cuMemCreate) or a duplicate of an
 * imported descriptor. */
struct vmm_handle {
    unsigned long long id;
    int fd;
    size_t size;       /* the memory's bytes (a multiple of the granularity) */
    int owner_phys;    /* physical device owning the memory */
    int imported;      /* from cuMemImportFromShareableHandle */
    int posix_fd;      /* may be exported as a POSIX descriptor */
    int ctx_dev;       /* local ordinal current when it was made (for cudaDeviceReset) */
};
static struct vmm_handle *g_handles;
static size_t g_nhandles, g_cap_handles;
static unsigned long long g_next_handle = 0x51a0001;

static struct vmm_handle *find_handle(unsigned long long id) {
    for (size_t i = 0; i < g_nhandles; i++)
        if (g_handles[i].id == id) return &g_handles[i];
    return NULL;
}

/* Forgets handle i (order is not kept); the memory lives on in its mappings. */
static int drop_handle(size_t i) {
    int fd = g_handles[i].fd;
    g_handles[i] = g_handles[--g_nhandles];
    if (close(fd) == 0) return E_OK;
    fprintf(stderr, "p2pcheck-sim: close(%d): %s\n", fd, strerror(errno));
    return E_UNKNOWN;
}

static int add_handle(struct vmm_handle *h, unsigned long long *out) {
    if (!grow((void **)&g_handles, &g_cap_handles, g_nhandles, sizeof *g_handles))
        return E_OUT_OF_MEMORY;
    h->id = g_next_handle++;
    g_handles[g_nhandles++] = *h;
    *out = h->id;
    return E_OK;
}

/* Whether cuMem exports of physical device phys's memory are refused (cumem-export-fails on
 * any pair from it: a property of the device, never @once). */
static int export_refused(int phys) {
    const struct config *c = config();
    for (int t = 0; t < c->n_phys; t++)
        if (c->faults[phys][t] & F_CUMEM_EXPORT) return 1;
    return 0;
}

/* A valid allocation property: pinned memory on a visible device's location; the local
 * ordinal, or -1. */
static int prop_device(const sim_alloc_prop *prop) {
    if (prop == NULL || prop->type != ALLOC_PINNED || prop->location.type != LOC_DEVICE ||
        (prop->requested_handle_types & ~HANDLE_POSIX_FD) != 0)
        return -1;
    if (prop->location.id < 0 || prop->location.id >= config()->n_visible) return -1;
    return prop->location.id;
}

/* The memory bytes of an allocation whose memfd holds `total` bytes (memory, then metadata:
 * see mapped_bytes, strictly growing with the memory's pages); 0 when no size gives total. */
static size_t memory_bytes_of(size_t total) {
    size_t pg = page_size(), lo = 1, hi = total / pg;
    while (lo <= hi) {
        size_t k = lo + (hi - lo) / 2, m = mapped_bytes(k * pg);
        if (m == total) return k * pg;
        if (m < total)
            lo = k + 1;
        else
            hi = k - 1;
    }
    return 0;
}

/* The metadata of the n-byte allocation in memfd fd, mapped (its length in *len); NULL when it
 * cannot be mapped. */
static struct meta *map_meta(int fd, size_t n, size_t *len) {
    *len = mapped_bytes(n) - n;
    void *m = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)n);
    return m == MAP_FAILED ? NULL : m;
}

static void unmap_meta(struct meta *m, size_t len) {
    if (munmap(m, len) != 0) fprintf(stderr, "p2pcheck-sim: munmap: %s\n", strerror(errno));
}

/* The cuMem mapping starting exactly at p of exactly n bytes, or NULL. */
static struct region *find_mapping(uintptr_t p, size_t n, size_t *index) {
    for (size_t i = 0; i < g_nregions; i++) {
        if (g_regions[i].cumem && (uintptr_t)g_regions[i].base == p && g_regions[i].size == n) {
            if (index) *index = i;
            return &g_regions[i];
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Exported: identification */

SIM_EXPORT int p2pcheck_sim_abi(void) { return 1; }

/* ------------------------------------------------------------------------------------------ */
/* Exported: driver API */

SIM_EXPORT int cuInit(unsigned int flags) {
    const struct config *c = config();
    if (c->bad || flags != 0) return E_INVALID_VALUE;
    if (c->n_visible == 0) return E_NO_DEVICE;
    lock();
    g_driver_initialized = 1;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuDeviceGetCount(int *count) {
    const struct config *c = config();
    if (c->bad || count == NULL) return E_INVALID_VALUE;
    lock();
    int inited = g_driver_initialized;
    unlock();
    if (!inited) return E_NOT_INITIALIZED;
    *count = c->n_visible;
    return E_OK;
}

SIM_EXPORT int cuGetErrorName(int error, const char **pStr) {
    if (pStr == NULL) return E_INVALID_VALUE;
    const struct err_desc *d = find_error(error);
    *pStr = d ? d->driver_name : NULL;
    return *pStr ? E_OK : E_INVALID_VALUE;
}

SIM_EXPORT int cuGetErrorString(int error, const char **pStr) {
    if (pStr == NULL) return E_INVALID_VALUE;
    const struct err_desc *d = find_error(error);
    *pStr = d && d->driver_name ? d->text : NULL;
    return *pStr ? E_OK : E_INVALID_VALUE;
}

SIM_EXPORT int cuModuleLoadData(void **module, const void *image) {
    if (module == NULL || image == NULL) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    const unsigned char *b = image;
    /* A lone cubin (ELF) cannot be read here: refused as real CUDA refuses an image built for
     * another machine. Magics compared byte by byte: a short PTX text stops at its NUL. */
    if (b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F')
        return unlock_return(E_INVALID_IMAGE);
    char *text = NULL; /* a fat binary's PTX, NUL-terminated */
    int has_sass = 0;
    if (b[0] == 0x50 && b[1] == 0xed && b[2] == 0x55 && b[3] == 0xba) {
        const unsigned char *ptx;
        size_t len;
        if (fatbin_find(b, &ptx, &len, &has_sass) != 0) return unlock_return(E_INVALID_IMAGE);
        text = strndup((const char *)ptx, len);
        if (text == NULL) return unlock_return(E_OUT_OF_MEMORY);
    }
    struct module *m = calloc(1, sizeof *m);
    if (m == NULL) {
        free(text);
        return unlock_return(E_OUT_OF_MEMORY);
    }
    m->ctx_dev = tl_dev;
    const char *ptx = text != NULL ? text : image;
    m->defined = ptx_entries(ptx);
    m->binary_version = SIM_ARCH;
    m->ptx_version = has_sass ? SIM_ARCH : ptx_target(ptx);
    free(text);
    for (int k = 0; k < K_NUM; k++) {
        m->functions[k].module = m;
        m->functions[k].kernel = k;
    }
    m->next = g_modules;
    g_modules = m;
    *module = m;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuModuleGetFunction(void **hfunc, void *hmod, const char *name) {
    if (hfunc == NULL || name == NULL) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    struct module *m = find_module(hmod);
    if (m == NULL) return unlock_return(E_INVALID_HANDLE);
    for (int k = 0; k < K_NUM; k++) {
        if (strcmp(name, KERNEL_NAMES[k]) == 0 && (m->defined & (1u << k))) {
            *hfunc = &m->functions[k];
            return unlock_return(E_OK);
        }
    }
    return unlock_return(E_NOT_FOUND);
}

SIM_EXPORT int cuFuncGetAttribute(int *value, int attribute, void *hfunc) {
    if (value == NULL) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    struct function *f = find_function(hfunc);
    if (f == NULL) return unlock_return(E_INVALID_HANDLE);
    if (attribute == 5) {
        *value = f->module->ptx_version;
    } else if (attribute == 6) {
        *value = f->module->binary_version;
    } else {
        return unlock_return(E_INVALID_VALUE);
    }
    return unlock_return(E_OK);
}

SIM_EXPORT int cuModuleUnload(void *hmod) {
    int rc = driver_begin();
    if (rc) return rc;
    struct module *m = find_module(hmod);
    if (m == NULL) return unlock_return(E_INVALID_HANDLE);
    unlink_module(m);
    return unlock_return(E_OK);
}

SIM_EXPORT int cuLaunchKernel(void *f, unsigned gridX, unsigned gridY, unsigned gridZ,
                              unsigned blockX, unsigned blockY, unsigned blockZ,
                              unsigned sharedMemBytes, void *hStream, void **kernelParams,
                              void **extra) {
    (void)sharedMemBytes;
    /* Every launch is synchronous, whatever the stream; a stream only keeps modelled time. */
    (void)extra;   /* only kernelParams is supported: without it, invalid value */
    int rc = driver_begin();
    if (rc) return rc;
    struct function *fn = find_function(f);
    if (fn == NULL) return unlock_return(E_INVALID_HANDLE);
    if (!gridX || !gridY || !gridZ || !blockX || !blockY || !blockZ ||
        (unsigned long long)blockX * blockY * blockZ > 1024 || kernelParams == NULL)
        return unlock_return(E_INVALID_VALUE);
    struct stream *st = NULL;
    if (hStream != NULL && (st = find_stream(hStream)) == NULL)
        return unlock_return(E_INVALID_HANDLE);
    switch (fn->kernel) {
    case K_PATTERN_STORE: rc = run_pattern_store(kernelParams); break;
    case K_PATTERN_CHECK: rc = run_pattern_check(kernelParams); break;
    case K_HANDSHAKE: rc = run_handshake(kernelParams); break;
    case K_COPY: rc = run_copy(kernelParams, st); break;
    case K_SPIN: rc = run_spin(kernelParams); break;
    case K_CHAIN: rc = run_chain(kernelParams); break;
    default: rc = run_chase(kernelParams); break;
    }
    return unlock_return(rc);
}

SIM_EXPORT int cuCtxSynchronize(void) {
    int rc = driver_begin();
    if (rc) return rc;
    /* Kernels already ran to completion; the modelled time moves to the last stream's end. */
    for (int i = 0; i < MAX_STREAMS; i++)
        if (g_streams[i].live && g_streams[i].clock_ns > g_vnow_ns) g_vnow_ns = g_streams[i].clock_ns;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuMemAlloc_v2(unsigned long long *dptr, size_t bytes) {
    if (dptr == NULL || bytes == 0) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    uintptr_t p;
    rc = allocate(bytes, &p);
    if (rc == E_OK) *dptr = p;
    return unlock_return(rc);
}

SIM_EXPORT int cuMemFree_v2(unsigned long long dptr) {
    int rc = driver_begin();
    if (rc) return rc;
    return unlock_return(free_allocation((uintptr_t)dptr));
}

SIM_EXPORT int cuMemsetD8_v2(unsigned long long dptr, unsigned char value, size_t n) {
    int rc = driver_begin();
    if (rc) return rc;
    return unlock_return(sim_memset((uintptr_t)dptr, value, n));
}

SIM_EXPORT int cuMemcpyDtoH_v2(void *dst, unsigned long long src, size_t bytes) {
    int rc = driver_begin();
    if (rc) return rc;
    return unlock_return(sim_copy((uintptr_t)dst, (uintptr_t)src, bytes, 2));
}

SIM_EXPORT int cuCtxGetDevice(int *device) {
    if (device == NULL) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    *device = tl_dev;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, void *f, int block,
                                                          size_t shared) {
    if (blocks == NULL || block <= 0 || block > 1024 || shared != 0) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    if (find_function(f) == NULL) return unlock_return(E_INVALID_HANDLE);
    *blocks = 2048 / block; /* an sm_90 SM holds 2048 threads */
    return unlock_return(E_OK);
}

SIM_EXPORT int cuStreamCreate(void **stream, unsigned flags) {
    if (stream == NULL || flags > 1) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    for (int i = 0; i < MAX_STREAMS; i++) {
        if (g_streams[i].live) continue;
        g_streams[i] = (struct stream){.live = 1, .clock_ns = g_vnow_ns};
        *stream = &g_streams[i];
        return unlock_return(E_OK);
    }
    return unlock_return(E_OUT_OF_MEMORY);
}

SIM_EXPORT int cuStreamDestroy_v2(void *stream) {
    int rc = driver_begin();
    if (rc) return rc;
    struct stream *st = find_stream(stream);
    if (st == NULL) return unlock_return(E_INVALID_HANDLE);
    st->live = 0;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuEventCreate(void **event, unsigned flags) {
    if (event == NULL || flags > 1) return E_INVALID_VALUE; /* timing events only */
    int rc = driver_begin();
    if (rc) return rc;
    for (int i = 0; i < MAX_EVENTS; i++) {
        if (g_events[i].live) continue;
        g_events[i] = (struct event){.live = 1, .recorded = 0, .at_ns = 0};
        *event = &g_events[i];
        return unlock_return(E_OK);
    }
    return unlock_return(E_OUT_OF_MEMORY);
}

SIM_EXPORT int cuEventRecord(void *event, void *stream) {
    int rc = driver_begin();
    if (rc) return rc;
    struct event *ev = find_event(event);
    struct stream *st = stream ? find_stream(stream) : NULL;
    if (ev == NULL || (stream != NULL && st == NULL)) return unlock_return(E_INVALID_HANDLE);
    ev->recorded = 1;
    ev->at_ns = st ? st->clock_ns : g_vnow_ns;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuEventElapsedTime(float *ms, void *start, void *end) {
    if (ms == NULL) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    struct event *a = find_event(start), *b = find_event(end);
    if (a == NULL || b == NULL || !a->recorded || !b->recorded)
        return unlock_return(E_INVALID_HANDLE);
    *ms = (float)(((double)b->at_ns - (double)a->at_ns) / 1e6);
    return unlock_return(E_OK);
}

SIM_EXPORT int cuEventDestroy_v2(void *event) {
    int rc = driver_begin();
    if (rc) return rc;
    struct event *ev = find_event(event);
    if (ev == NULL) return unlock_return(E_INVALID_HANDLE);
    ev->live = 0;
    return unlock_return(E_OK);
}

/* A copy-engine copy between device memory: as cudaMemcpy's device to device, timed on the
 * stream by the model (fast-wrong: timed, nothing moved). */
SIM_EXPORT int cuMemcpyDtoDAsync_v2(unsigned long long dst, unsigned long long src, size_t n,
                                    void *stream) {
    int rc = driver_begin();
    if (rc) return rc;
    struct stream *st = stream ? find_stream(stream) : NULL;
    if (stream != NULL && st == NULL) return unlock_return(E_INVALID_HANDLE);
    struct region *rd = find_range((uintptr_t)dst, n), *rs = find_range((uintptr_t)src, n);
    if (n != 0 && (rd == NULL || rs == NULL)) return unlock_return(E_INVALID_VALUE);
    if (n == 0) return unlock_return(E_OK);
    model_transfer(st, rd, rs, n);
    if (fast_wrong(rd, rs)) {
        trigger(rs, fault_mask(rs));
        trigger(rd, fault_mask(rd));
        return unlock_return(E_OK);
    }
    return unlock_return(sim_copy((uintptr_t)dst, (uintptr_t)src, n, 3));
}

/* n 32-bit words of value at dst (4-aligned), by the copy engine. */
SIM_EXPORT int cuMemsetD32Async(unsigned long long dst, unsigned value, size_t n, void *stream) {
    int rc = driver_begin();
    if (rc) return rc;
    if (stream != NULL && find_stream(stream) == NULL) return unlock_return(E_INVALID_HANDLE);
    if (n == 0) return unlock_return(E_OK);
    if (n > SIZE_MAX / 4) return unlock_return(E_INVALID_VALUE);
    struct region *r = find_range((uintptr_t)dst, n * 4);
    if (r == NULL) return unlock_return(E_INVALID_VALUE);
    if (dst % 4 != 0) return unlock_return(E_MISALIGNED_ADDRESS);
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    uint32_t words[256];
    for (size_t i = 0; i < 256; i++) words[i] = value;
    size_t off = region_off(r, dst);
    for (size_t done = 0; done < n;) {
        size_t k = n - done < 256 ? n - done : 256;
        write_bytes(r, off + done * 4, words, 0, k * 4, mask, 0, 0);
        done += k;
    }
    return unlock_return(E_OK);
}

SIM_EXPORT int cuDriverGetVersion(int *version) {
    if (config()->bad || version == NULL) return E_INVALID_VALUE;
    *version = 13000;
    return E_OK;
}

SIM_EXPORT int cuDeviceGet(int *device, int ordinal) {
    const struct config *c = config();
    if (c->bad || device == NULL) return E_INVALID_VALUE;
    lock();
    int inited = g_driver_initialized;
    unlock();
    if (!inited) return E_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= c->n_visible) return E_INVALID_DEVICE;
    *device = ordinal;
    return E_OK;
}

SIM_EXPORT int cuDeviceGetAttribute(int *value, int attribute, int device) {
    const struct config *c = config();
    if (c->bad || value == NULL) return E_INVALID_VALUE;
    lock();
    int inited = g_driver_initialized;
    unlock();
    if (!inited) return E_NOT_INITIALIZED;
    if (device < 0 || device >= c->n_visible) return E_INVALID_DEVICE;
    if (attribute == 102) { /* VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED */
        *value = 1;
    } else if (attribute == 103) { /* HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED */
        *value = !export_refused(c->visible[device]);
    } else if (attribute == ATTR_SM_COUNT) { /* the bandwidth measurement's grid */
        *value = SIM_SMS;
    } else {
        return E_INVALID_VALUE;
    }
    return E_OK;
}

SIM_EXPORT int cuMemGetAllocationGranularity(size_t *granularity, const sim_alloc_prop *prop,
                                             int option) {
    if (granularity == NULL || (option != 0 && option != 1)) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    if (prop_device(prop) < 0) return unlock_return(E_INVALID_VALUE);
    *granularity = SIM_GRANULARITY;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuMemCreate(unsigned long long *handle, size_t size, const sim_alloc_prop *prop,
                           unsigned long long flags) {
    if (handle == NULL || flags != 0 || size == 0 || size % SIM_GRANULARITY != 0)
        return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    int dev = prop_device(prop);
    if (dev < 0 || mapped_bytes(size) == 0) return unlock_return(E_INVALID_VALUE);
    int fd = memfd_create("p2pcheck-sim", MFD_CLOEXEC);
    if (fd < 0) return unlock_return(E_OUT_OF_MEMORY);
    struct vmm_handle h = {.fd = fd,
                           .size = size,
                           .owner_phys = config()->visible[dev],
                           .posix_fd = prop->requested_handle_types == HANDLE_POSIX_FD,
                           .ctx_dev = tl_dev};
    size_t len = 0;
    struct meta *m = NULL;
    rc = E_OUT_OF_MEMORY;
    if (ftruncate(fd, (off_t)mapped_bytes(size)) == 0 && (m = map_meta(fd, size, &len)) != NULL &&
        meta_init(m, size, h.owner_phys) == 0)
        rc = add_handle(&h, handle);
    if (m != NULL) unmap_meta(m, len);
    if (rc != E_OK && close(fd) != 0)
        fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    return unlock_return(rc);
}

SIM_EXPORT int cuMemRelease(unsigned long long handle) {
    int rc = driver_begin();
    if (rc) return rc;
    for (size_t i = 0; i < g_nhandles; i++)
        if (g_handles[i].id == handle) return unlock_return(drop_handle(i));
    return unlock_return(E_INVALID_VALUE);
}

SIM_EXPORT int cuMemExportToShareableHandle(void *shareable, unsigned long long handle, int type,
                                            unsigned long long flags) {
    if (shareable == NULL || type != HANDLE_POSIX_FD || flags != 0) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    const struct vmm_handle *h = find_handle(handle);
    if (h == NULL || !h->posix_fd) return unlock_return(E_INVALID_VALUE);
    if (export_refused(h->owner_phys)) return unlock_return(E_NOT_SUPPORTED);
    int fd = fcntl(h->fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return unlock_return(E_OUT_OF_MEMORY);
    memcpy(shareable, &fd, sizeof fd);
    return unlock_return(E_OK);
}

SIM_EXPORT int cuMemImportFromShareableHandle(unsigned long long *handle, void *osHandle,
                                              int type) {
    if (handle == NULL || type != HANDLE_POSIX_FD) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    const struct config *c = config();
    int fd = (int)(intptr_t)osHandle;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return unlock_return(E_INVALID_VALUE);
    size_t n = S_ISREG(st.st_mode) ? memory_bytes_of((size_t)st.st_size) : 0;
    size_t len = 0;
    struct meta *m = n ? map_meta(fd, n, &len) : NULL;
    int owner = -1;
    if (m != NULL && m->magic == META_MAGIC && m->npages == n / page_size() &&
        m->owner_phys >= 0 && m->owner_phys < c->n_phys)
        owner = m->owner_phys;
    if (m != NULL) unmap_meta(m, len);
    if (owner < 0 || n % SIM_GRANULARITY != 0) return unlock_return(E_INVALID_HANDLE);
    if (pair_faults(owner, current_phys()) & F_CUMEM_IMPORT) return unlock_return(E_NOT_PERMITTED);
    /* The caller keeps (and closes) its descriptor; the handle holds a duplicate. */
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) return unlock_return(E_OUT_OF_MEMORY);
    struct vmm_handle h = {
        .fd = own, .size = n, .owner_phys = owner, .imported = 1, .posix_fd = 1, .ctx_dev = tl_dev};
    rc = add_handle(&h, handle);
    if (rc != E_OK && close(own) != 0)
        fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    return unlock_return(rc);
}

SIM_EXPORT int cuMemAddressReserve(unsigned long long *ptr, size_t size, size_t alignment,
                                   unsigned long long addr, unsigned long long flags) {
    (void)alignment; /* hints only, as the header says */
    (void)addr;
    if (ptr == NULL || flags != 0 || size == 0 || size % SIM_GRANULARITY != 0)
        return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    if (!grow((void **)&g_res, &g_cap_res, g_nres, sizeof *g_res))
        return unlock_return(E_OUT_OF_MEMORY);
    void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return unlock_return(E_OUT_OF_MEMORY);
    g_res[g_nres++] = (struct reservation){.base = p, .size = size, .ctx_dev = tl_dev};
    *ptr = (uintptr_t)p;
    return unlock_return(E_OK);
}

SIM_EXPORT int cuMemAddressFree(unsigned long long ptr, size_t size) {
    int rc = driver_begin();
    if (rc) return rc;
    for (size_t i = 0; i < g_nres; i++) {
        struct reservation r = g_res[i];
        if ((uintptr_t)r.base != ptr || r.size != size) continue;
        for (size_t k = 0; k < g_nregions; k++)
            if (g_regions[k].cumem && g_regions[k].base >= r.base &&
                g_regions[k].base < r.base + r.size)
                return unlock_return(E_INVALID_VALUE); /* still mapped */
        g_res[i] = g_res[--g_nres];
        if (munmap(r.base, r.size) != 0) {
            fprintf(stderr, "p2pcheck-sim: munmap: %s\n", strerror(errno));
            return unlock_return(E_UNKNOWN);
        }
        return unlock_return(E_OK);
    }
    return unlock_return(E_INVALID_VALUE);
}

SIM_EXPORT int cuMemMap(unsigned long long ptr, size_t size, size_t offset,
                        unsigned long long handle, unsigned long long flags) {
    if (offset != 0 || flags != 0 || size == 0) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    const struct vmm_handle *h = find_handle(handle);
    if (h == NULL) return unlock_return(E_INVALID_HANDLE);
    uintptr_t p = (uintptr_t)ptr;
    const struct reservation *in = NULL;
    for (size_t i = 0; i < g_nres; i++)
        if (p >= (uintptr_t)g_res[i].base && p - (uintptr_t)g_res[i].base < g_res[i].size)
            in = &g_res[i];
    if (size != h->size || in == NULL || size > in->size - (p - (uintptr_t)in->base))
        return unlock_return(E_INVALID_VALUE);
    for (size_t k = 0; k < g_nregions; k++) {
        uintptr_t b = (uintptr_t)g_regions[k].base;
        if (g_regions[k].cumem && b < p + size && p < b + g_regions[k].size)
            return unlock_return(E_INVALID_VALUE); /* over another mapping */
    }
    struct stat st;
    size_t len = 0;
    struct meta *m = NULL;
    if (fstat(h->fd, &st) != 0 || (m = map_meta(h->fd, size, &len)) == NULL)
        return unlock_return(E_OUT_OF_MEMORY);
    void *q = mmap((void *)p, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, h->fd, 0);
    if (q == MAP_FAILED) {
        unmap_meta(m, len);
        (void)re_reserve((unsigned char *)p, size);
        return unlock_return(E_OUT_OF_MEMORY);
    }
    struct region r = {
        .base = q,
        .size = size,
        .map_len = len,
        .meta = m,
        .fd = -1,
        .owner_phys = h->owner_phys,
        .is_ipc = 0,
        .is_import = h->imported,
        .cumem = 1,
        .access = 0,
        .ctx_dev = tl_dev,
        .ino = (uint64_t)st.st_ino,
        .dev = (uint64_t)st.st_dev,
    };
    rc = add_region(&r);
    if (rc != E_OK) {
        unmap_meta(m, len);
        (void)re_reserve((unsigned char *)p, size);
    }
    return unlock_return(rc);
}

SIM_EXPORT int cuMemUnmap(unsigned long long ptr, size_t size) {
    int rc = driver_begin();
    if (rc) return rc;
    size_t i;
    if (find_mapping((uintptr_t)ptr, size, &i) == NULL) return unlock_return(E_INVALID_VALUE);
    return unlock_return(release_region(i));
}

SIM_EXPORT int cuMemSetAccess(unsigned long long ptr, size_t size, const sim_access_desc *desc,
                              size_t count) {
    if (desc == NULL || count == 0) return E_INVALID_VALUE;
    int rc = driver_begin();
    if (rc) return rc;
    const struct config *c = config();
    struct region *r = find_mapping((uintptr_t)ptr, size, NULL);
    if (r == NULL) return unlock_return(E_INVALID_VALUE);
    /* Every entry is checked before any applies. */
    for (size_t i = 0; i < count; i++) {
        const sim_access_desc *d = &desc[i];
        if (d->location.type != LOC_DEVICE || d->location.id < 0 ||
            d->location.id >= c->n_visible || (d->flags != ACCESS_NONE && d->flags != ACCESS_RW))
            return unlock_return(E_INVALID_VALUE);
        if (d->flags == ACCESS_RW && r->is_import &&
            (pair_faults(r->owner_phys, c->visible[d->location.id]) & F_CUMEM_ACCESS))
            return unlock_return(E_NOT_SUPPORTED);
    }
    for (size_t i = 0; i < count; i++) {
        uint64_t bit = (uint64_t)1 << desc[i].location.id;
        r->access = desc[i].flags == ACCESS_RW ? r->access | bit : r->access & ~bit;
    }
    return unlock_return(E_OK);
}

/* ------------------------------------------------------------------------------------------ */
/* Exported: runtime API */

SIM_EXPORT int cudaGetDeviceCount(int *count) {
    const struct config *c = config();
    if (c->bad || count == NULL) return E_INVALID_VALUE;
    *count = c->n_visible;
    if (c->n_visible == 0) return E_NO_DEVICE;
    lock();
    g_driver_initialized = 1;
    return unlock_return(E_OK);
}

SIM_EXPORT int cudaSetDevice(int device) {
    const struct config *c = config();
    if (c->bad) return E_INVALID_VALUE;
    if (c->n_visible == 0) return E_NO_DEVICE;
    if (device < 0 || device >= c->n_visible) return E_INVALID_DEVICE;
    lock();
    tl_dev = device;
    g_driver_initialized = 1;
    g_ctx_alive[device] = 1; /* CUDA 12+: cudaSetDevice initialises the primary context */
    tl_bound = 1;
    return unlock_return(E_OK);
}

SIM_EXPORT int cudaMalloc(void **devPtr, size_t size) {
    if (devPtr == NULL) return E_INVALID_VALUE;
    int rc = runtime_begin(1);
    if (rc) return rc;
    if (size == 0) {
        *devPtr = NULL; /* as CUDA does */
        return unlock_return(E_OK);
    }
    uintptr_t p;
    rc = allocate(size, &p);
    if (rc == E_OK) *devPtr = (void *)p;
    return unlock_return(rc);
}

SIM_EXPORT int cudaFree(void *devPtr) {
    int rc = runtime_begin(1);
    if (rc) return rc;
    if (devPtr == NULL) return unlock_return(E_OK);
    return unlock_return(free_allocation((uintptr_t)devPtr));
}

SIM_EXPORT int cudaMemset(void *devPtr, int value, size_t count) {
    int rc = runtime_begin(1);
    if (rc) return rc;
    return unlock_return(sim_memset((uintptr_t)devPtr, (unsigned char)value, count));
}

SIM_EXPORT int cudaMemcpy(void *dst, const void *src, size_t count, int kind) {
    int rc = runtime_begin(1);
    if (rc) return rc;
    return unlock_return(sim_copy((uintptr_t)dst, (uintptr_t)src, count, kind));
}

SIM_EXPORT int cudaDeviceSynchronize(void) {
    int rc = runtime_begin(1);
    if (rc) return rc;
    return unlock_return(E_OK);
}

SIM_EXPORT int cudaDeviceReset(void) {
    int rc = runtime_begin(0);
    if (rc) return rc;
    int dev = tl_dev;
    for (size_t i = 0; i < g_nregions;) {
        if (g_regions[i].ctx_dev == dev) {
            int r = release_region(i); /* moves the last region into slot i */
            if (rc == E_OK) rc = r;
        } else {
            i++;
        }
    }
    for (size_t i = 0; i < g_nhandles;) {
        if (g_handles[i].ctx_dev == dev) {
            int r = drop_handle(i);
            if (rc == E_OK) rc = r;
        } else {
            i++;
        }
    }
    for (size_t i = 0; i < g_nres;) {
        if (g_res[i].ctx_dev == dev) {
            if (munmap(g_res[i].base, g_res[i].size) != 0 && rc == E_OK) rc = E_UNKNOWN;
            g_res[i] = g_res[--g_nres];
        } else {
            i++;
        }
    }
    for (struct module **pp = &g_modules; *pp != NULL;) {
        struct module *m = *pp;
        if (m->ctx_dev == dev) {
            *pp = m->next;
            free(m);
        } else {
            pp = &m->next;
        }
    }
    g_ctx_alive[dev] = 0;
    return unlock_return(rc);
}

SIM_EXPORT int cudaDeviceCanAccessPeer(int *canAccessPeer, int device, int peerDevice) {
    const struct config *c = config();
    if (c->bad || canAccessPeer == NULL) return E_INVALID_VALUE;
    if (c->n_visible == 0) return E_NO_DEVICE;
    if (device < 0 || device >= c->n_visible || peerDevice < 0 || peerDevice >= c->n_visible)
        return E_INVALID_DEVICE;
    /* "Can device access peerDevice's memory": the pair peer->device. */
    int src = c->visible[peerDevice], tgt = c->visible[device];
    *canAccessPeer = device != peerDevice && !(pair_faults(src, tgt) & F_CLAIM_NO);
    return E_OK;
}

SIM_EXPORT int cudaIpcGetMemHandle(cudaIpcMemHandle_t *handle, void *devPtr) {
    if (handle == NULL) return E_INVALID_VALUE;
    int rc = runtime_begin(1);
    if (rc) return rc;
    const struct region *r = find_region((uintptr_t)devPtr);
    if (r == NULL || r->is_ipc || r->cumem) return unlock_return(E_INVALID_VALUE);
    struct sim_handle h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, HANDLE_MAGIC, sizeof h.magic);
    h.pid = (int32_t)getpid();
    h.fd = r->fd;
    h.size = r->size;
    h.owner_phys = r->owner_phys;
    h.ino = r->ino;
    h.dev = r->dev;
    h.checksum = handle_checksum(&h);
    memcpy(handle->reserved, &h, sizeof h);
    return unlock_return(E_OK);
}

SIM_EXPORT int cudaIpcOpenMemHandle(void **devPtr, cudaIpcMemHandle_t handle,
                                    unsigned int flags) {
    if (devPtr == NULL || flags > 1) return E_INVALID_VALUE; /* 1: LazyEnablePeerAccess */
    int rc = runtime_begin(1);
    if (rc) return rc;
    const struct config *c = config();
    struct sim_handle h;
    memcpy(&h, handle.reserved, sizeof h);
    if (memcmp(h.magic, HANDLE_MAGIC, sizeof h.magic) != 0 || h.checksum != handle_checksum(&h) ||
        h.owner_phys < 0 || h.owner_phys >= c->n_phys || h.size == 0 || h.size > SIZE_MAX ||
        h.pid <= 0 || h.fd < 0)
        return unlock_return(E_INVALID_HANDLE);
    if (pair_faults(h.owner_phys, current_phys()) & F_IPC_OPEN_FAILS)
        return unlock_return(E_MAP_FAILED);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)h.pid, (int)h.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return unlock_return(E_MAP_FAILED);
    struct stat st;
    void *p = MAP_FAILED;
    size_t total = mapped_bytes((size_t)h.size);
    struct meta *m = NULL;
    if (fstat(fd, &st) != 0) {
        rc = E_MAP_FAILED;
    } else if ((uint64_t)st.st_ino != h.ino || (uint64_t)st.st_dev != h.dev || total == 0 ||
               (uint64_t)st.st_size < total) {
        rc = E_INVALID_HANDLE; /* the descriptor now names another file: a stale handle */
    } else {
        p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        rc = p == MAP_FAILED ? E_MAP_FAILED : E_OK;
    }
    if (rc == E_OK) {
        m = (struct meta *)(void *)((unsigned char *)p + round_up((size_t)h.size, page_size()));
        if (m->magic != META_MAGIC ||
            m->npages != round_up((size_t)h.size, page_size()) / page_size()) {
            rc = E_INVALID_HANDLE;
            if (munmap(p, total) != 0)
                fprintf(stderr, "p2pcheck-sim: munmap: %s\n", strerror(errno));
        }
    }
    /* The mapping keeps the memory alive; the descriptor is not needed any more. */
    if (close(fd) != 0) fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    if (rc == E_OK) {
        struct region r = {
            .base = p,
            .size = (size_t)h.size,
            .map_len = total,
            .meta = m,
            .fd = -1,
            .owner_phys = h.owner_phys,
            .is_ipc = 1,
            .ctx_dev = tl_dev,
            .ino = h.ino,
            .dev = h.dev,
        };
        rc = add_region(&r);
        if (rc != E_OK && munmap(p, total) != 0)
            fprintf(stderr, "p2pcheck-sim: munmap: %s\n", strerror(errno));
    }
    if (rc == E_OK) *devPtr = p;
    return unlock_return(rc);
}

SIM_EXPORT int cudaIpcCloseMemHandle(void *devPtr) {
    int rc = runtime_begin(1);
    if (rc) return rc;
    for (size_t i = 0; i < g_nregions; i++)
        if (g_regions[i].base == devPtr && g_regions[i].is_ipc)
            return unlock_return(release_region(i));
    return unlock_return(E_INVALID_VALUE);
}

SIM_EXPORT const char *cudaGetErrorName(int error) {
    const struct err_desc *d = find_error(error);
    return d && d->runtime_name ? d->runtime_name : "unrecognized error code";
}

SIM_EXPORT const char *cudaGetErrorString(int error) {
    const struct err_desc *d = find_error(error);
    return d && d->runtime_name ? d->text : "unrecognized error code";
}

SIM_EXPORT int cudaRuntimeGetVersion(int *runtimeVersion) {
    if (config()->bad || runtimeVersion == NULL) return E_INVALID_VALUE;
    *runtimeVersion = 13000;
    return E_OK;
}
