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
 *   P2PCHECK_SIM_FAULTS    comma-separated items SRC->TGT:KIND, SRC and TGT PHYSICAL GPU ids < N
 *                          (whitespace around items and tokens allowed), for example
 *                          "0->1:drop-writes,2->3:hang". One pair may carry several kinds.
 *                          Invalid text (unknown kind, id >= N, bad syntax, empty item) prints
 *                          a message naming the bad item on stderr, and then EVERY call (except
 *                          the error-name/-string functions and p2pcheck_sim_abi) fails with
 *                          CUDA_ERROR_INVALID_VALUE / cudaErrorInvalidValue (1), so that a typo
 *                          can never pass for a clean run.
 *
 * FAULTS. A fault on SRC->TGT means "TGT accessing SRC's memory": it applies to accesses made
 * by a process whose current device is (physically) TGT to memory owned by (physical) device SRC
 * that the process mapped with cudaIpcOpenMemHandle. Memory a process allocated itself is never
 * faulted. SRC == TGT is allowed (two processes sharing one GPU). Kinds:
 *   ipc-open-fails   cudaIpcOpenMemHandle returns cudaErrorMapBufferObjectFailed (205), as in a
 *                    container without a shared IPC namespace.
 *   drop-writes      the driver says yes, but writes through the mapping (cudaMemset,
 *                    cuMemsetD8, cudaMemcpy into it, kernel stores) silently vanish; reads work.
 *   corrupt          writes through the mapping land, but every written byte at allocation
 *                    offset % 64 == 7 is XORed with 0x5a.
 *   sm-only          copy-engine work (cudaMemset, cudaMemcpy, cuMemsetD8, cuMemcpyDtoH) works;
 *                    kernel loads through the mapping read 0xEE and kernel stores vanish.
 *   late-visibility  a kernel's stores through the mapping are buffered and become visible only
 *                    when the kernel ends. Kernels are synchronous here, so this cannot be seen
 *                    at the API level: it documents a fault the check cannot detect.
 *   hang             the first access through the mapping (memset, memcpy, kernel) never
 *                    returns (a pause() loop; the process stays killable by SIGTERM/SIGKILL).
 *   crash            the first access through the mapping kills the process with SIGSEGV.
 *   one-way          exactly drop-writes on SRC->TGT; TGT->SRC untouched (an alias that makes
 *                    the intent explicit).
 *   claim-no         cudaDeviceCanAccessPeer(&c, TGT, SRC) answers 0 although access works.
 * Without faults cudaDeviceCanAccessPeer answers 1 for two distinct valid devices and 0 for a
 * device and itself, as real CUDA does. hang and crash print one line on stderr first.
 *
 * MEMORY MODEL. Every allocation (cudaMalloc, cuMemAlloc_v2) is its own
 * memfd_create("p2pcheck-sim") + ftruncate + mmap(MAP_SHARED); the device pointer is the host
 * address of that mapping. Nothing is named in /dev/shm, so nothing can leak when a process
 * dies, however it dies. The 64-byte IPC handle carries a magic, the owner's pid and memfd
 * descriptor number, the size, the owner's physical device, the memfd's inode and a checksum;
 * cudaIpcOpenMemHandle opens /proc/<pid>/fd/<fd> and maps it (so both processes must share a PID
 * namespace and uid, like real CUDA IPC needs a shared IPC namespace). A corrupt handle, or one
 * whose descriptor now names another file (a stale handle), is cudaErrorInvalidResourceHandle
 * (400); a failed open (owner gone, no access) is cudaErrorMapBufferObjectFailed (205).
 * A pointer is valid when it lies inside a live region (allocation or IPC mapping); an access
 * outside every region, or running past a region's end, fails with invalid value (1) and touches
 * nothing. Kernels report such an access as CUDA_ERROR_ILLEGAL_ADDRESS (700), as a GPU would.
 *
 * CONTEXTS. The current device is per thread (0 until cudaSetDevice, as in CUDA). Runtime calls
 * create the current device's primary context and make it current for the calling thread;
 * driver calls that need a context (modules, launches, memory) fail with
 * CUDA_ERROR_NOT_INITIALIZED (3) before cuInit or any runtime call, and with
 * CUDA_ERROR_INVALID_CONTEXT (201) when this thread has no live context (no runtime call yet, or
 * after cudaDeviceReset). cudaDeviceReset releases every allocation, IPC mapping and module
 * created while the current device was current. One mutex guards all tables.
 *
 * KERNELS (cuModuleLoadData takes PTX text; only the ".entry NAME(" kernels it defines can be
 * fetched with cuModuleGetFunction, others fail with CUDA_ERROR_NOT_FOUND, 500):
 *   p2pc_store(u8 *p, u64 n, u8 value)                     p[0..n) = value
 *   p2pc_count(const u8 *p, u64 n, u8 value, u64 *mismatches, u64 *first_bad)
 *       for each i with p[i] != value: *mismatches += 1, *first_bad = min(*first_bad, i)
 * Grid and block sizes are validated (no zero dimension, at most 1024 threads a block) and
 * otherwise ignored.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define SIM_EXPORT __attribute__((visibility("default")))

#define MAX_GPUS 64
#define HANDLE_BYTES 64

typedef struct {
    char reserved[HANDLE_BYTES];
} cudaIpcMemHandle_t;

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
    X(int, cuLaunchKernel, (void *f, unsigned gridX, unsigned gridY, unsigned gridZ,              \
                            unsigned blockX, unsigned blockY, unsigned blockZ,                    \
                            unsigned sharedMemBytes, void *hStream, void **kernelParams,          \
                            void **extra))                                                        \
    X(int, cuCtxSynchronize, (void))                                                              \
    X(int, cuMemAlloc_v2, (unsigned long long *dptr, size_t bytes))                               \
    X(int, cuMemFree_v2, (unsigned long long dptr))                                               \
    X(int, cuMemsetD8_v2, (unsigned long long dptr, unsigned char value, size_t n))               \
    X(int, cuMemcpyDtoH_v2, (void *dst, unsigned long long src, size_t bytes))                    \
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
    E_NOT_FOUND = 500,          /* driver only */
    E_ILLEGAL_ADDRESS = 700,
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
};

static const struct {
    const char *name;
    unsigned bit;
} FAULT_KINDS[] = {
    {"ipc-open-fails", F_IPC_OPEN_FAILS}, {"drop-writes", F_DROP_WRITES},
    {"corrupt", F_CORRUPT},               {"sm-only", F_SM_ONLY},
    {"late-visibility", F_LATE},          {"hang", F_HANG},
    {"crash", F_CRASH},                   {"one-way", F_DROP_WRITES},
    {"claim-no", F_CLAIM_NO},
};

struct config {
    int n_phys;                           /* P2PCHECK_SIM_GPUS */
    int n_visible;                        /* after CUDA_VISIBLE_DEVICES */
    int visible[MAX_GPUS];                /* local ordinal -> physical id */
    uint16_t faults[MAX_GPUS][MAX_GPUS];  /* [src][tgt] physical -> F_* bits */
    int bad;                              /* P2PCHECK_SIM_FAULTS was invalid: fail every call */
};

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
    size_t len = (size_t)(end - s);
    for (size_t i = 0; i < sizeof FAULT_KINDS / sizeof FAULT_KINDS[0]; i++) {
        if (strlen(FAULT_KINDS[i].name) == len && strncmp(s, FAULT_KINDS[i].name, len) == 0) {
            c->faults[src][tgt] |= (uint16_t)FAULT_KINDS[i].bit;
            return NULL;
        }
    }
    return "unknown kind (ipc-open-fails, drop-writes, corrupt, sm-only, late-visibility, hang, "
           "crash, one-way, claim-no)";
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
            return;
        }
        if (comma == NULL) return;
        s = comma + 1;
    }
}

static void config_load(void) {
    struct config *c = &g_cfg;
    memset(c, 0, sizeof *c);
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

/* ------------------------------------------------------------------------------------------ */
/* Shared state: regions, modules, contexts */

struct region {
    unsigned char *base;
    size_t size;
    int fd;            /* memfd of an own allocation; -1 for an IPC mapping (closed once mapped) */
    int owner_phys;    /* physical device that owns the memory */
    int is_ipc;        /* opened with cudaIpcOpenMemHandle */
    int ctx_dev;       /* local ordinal current when it was created/opened (for cudaDeviceReset) */
    uint64_t ino, dev; /* the memfd's identity, written into IPC handles */
};

enum { K_STORE, K_COUNT, K_NUM };
static const char *const KERNEL_NAMES[K_NUM] = {"p2pc_store", "p2pc_count"};

struct module;
struct function {
    struct module *module;
    int kernel;
};

struct module {
    struct module *next;
    int ctx_dev;
    unsigned defined; /* bit k: the PTX defines kernel k */
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
 * starts outside every region, must never be touched. */
static struct region *find_range(uintptr_t p, size_t n) {
    struct region *r = find_region(p);
    if (r == NULL || n > r->size - (p - (uintptr_t)r->base)) return NULL;
    return r;
}

static int add_region(const struct region *r) {
    if (g_nregions == g_cap_regions) {
        size_t cap = g_cap_regions ? 2 * g_cap_regions : 16;
        struct region *grown = realloc(g_regions, cap * sizeof *grown);
        if (grown == NULL) return E_OUT_OF_MEMORY;
        g_regions = grown;
        g_cap_regions = cap;
    }
    g_regions[g_nregions++] = *r;
    return E_OK;
}

/* Unmaps and closes region i and removes it from the table (order is not kept). */
static int release_region(size_t i) {
    struct region r = g_regions[i];
    int rc = E_OK;
    g_regions[i] = g_regions[--g_nregions];
    if (munmap(r.base, r.size) != 0) {
        fprintf(stderr, "p2pcheck-sim: munmap(%p, %zu): %s\n", (void *)r.base, r.size,
                strerror(errno));
        rc = E_UNKNOWN;
    }
    if (r.fd >= 0 && close(r.fd) != 0) {
        fprintf(stderr, "p2pcheck-sim: close(%d): %s\n", r.fd, strerror(errno));
        rc = E_UNKNOWN;
    }
    return rc;
}

/* A fresh allocation of n > 0 bytes on the current device (lock held). */
static int allocate(size_t n, uintptr_t *out) {
    if (n > (size_t)INT64_MAX) return E_OUT_OF_MEMORY;
    /* memfd: anonymous, so nothing named can outlive the process; shareable via /proc. */
    int fd = memfd_create("p2pcheck-sim", MFD_CLOEXEC);
    if (fd < 0) return E_OUT_OF_MEMORY;
    struct stat st;
    void *p = MAP_FAILED;
    int rc = E_OUT_OF_MEMORY;
    /* fallocate reserves the pages now: running out later would be a SIGBUS, not an error
     * code. Kernels without it for memfds only lose that early warning. */
    if (ftruncate(fd, (off_t)n) == 0 &&
        (fallocate(fd, 0, 0, (off_t)n) == 0 || errno == EOPNOTSUPP || errno == ENOSYS) &&
        fstat(fd, &st) == 0 &&
        (p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) != MAP_FAILED) {
        struct region r = {
            .base = p,
            .size = n,
            .fd = fd,
            .owner_phys = current_phys(),
            .is_ipc = 0,
            .ctx_dev = tl_dev,
            .ino = (uint64_t)st.st_ino,
            .dev = (uint64_t)st.st_dev,
        };
        rc = add_region(&r);
    }
    if (rc == E_OK) {
        *out = (uintptr_t)p;
        return E_OK;
    }
    if (p != MAP_FAILED && munmap(p, n) != 0)
        fprintf(stderr, "p2pcheck-sim: munmap: %s\n", strerror(errno));
    if (close(fd) != 0) fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    return rc;
}

/* Frees the own allocation starting exactly at p (lock held). */
static int free_allocation(uintptr_t p) {
    for (size_t i = 0; i < g_nregions; i++)
        if ((uintptr_t)g_regions[i].base == p && !g_regions[i].is_ipc) return release_region(i);
    return E_INVALID_VALUE;
}

/* ------------------------------------------------------------------------------------------ */
/* Accesses, with the faults applied */

/* Fault bits for an access to r by this thread: only IPC mappings are ever faulted. */
static unsigned fault_mask(const struct region *r) {
    if (r == NULL || !r->is_ipc) return 0;
    return config()->faults[r->owner_phys][current_phys()];
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

/* Writes n bytes at offset off of r: a copy from src, or `fill` when src is NULL. */
static void write_bytes(struct region *r, size_t off, const void *src, unsigned char fill,
                        size_t n, unsigned mask, int by_kernel) {
    if (mask & F_DROP_WRITES) return;
    if (by_kernel && (mask & F_SM_ONLY)) return;
    if (src != NULL)
        memmove(r->base + off, src, n);
    else
        memset(r->base + off, fill, n);
    if (mask & F_CORRUPT) {
        size_t o = off + ((7 + 64 - off % 64) % 64); /* first offset >= off with o % 64 == 7 */
        for (; o < off + n; o += 64) r->base[o] ^= 0x5a;
    }
}

/* Kernel loads of n bytes at offset off of r into dst. */
static void kernel_load(const struct region *r, size_t off, void *dst, size_t n, unsigned mask) {
    if (mask & F_SM_ONLY)
        memset(dst, 0xEE, n);
    else
        memcpy(dst, r->base + off, n);
}

/* Driver-engine memset of [p, p+n) (lock held). */
static int sim_memset(uintptr_t p, unsigned char value, size_t n) {
    if (n == 0) return E_OK;
    struct region *r = find_range(p, n);
    if (r == NULL) return E_INVALID_VALUE;
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    write_bytes(r, p - (uintptr_t)r->base, NULL, value, n, mask, 0);
    return E_OK;
}

/* Driver-engine copy (lock held). kind: 0 HtoH, 1 HtoD, 2 DtoH, 3 DtoD, 4 default (inferred
 * from which pointers lie in simulated device memory). */
static int sim_copy(uintptr_t dst, uintptr_t src, size_t n, int kind) {
    if (kind < 0 || kind > 4) return E_MEMCPY_DIRECTION;
    if (n == 0) return E_OK;
    if (dst == 0 || src == 0) return E_INVALID_VALUE;
    struct region *rd = find_region(dst), *rs = find_region(src);
    /* A range that starts in device memory must end there too. */
    if (rd != NULL && find_range(dst, n) == NULL) return E_INVALID_VALUE;
    if (rs != NULL && find_range(src, n) == NULL) return E_INVALID_VALUE;
    if ((kind == 1 || kind == 3) && rd == NULL) return E_INVALID_VALUE;
    if ((kind == 2 || kind == 3) && rs == NULL) return E_INVALID_VALUE;
    unsigned ms = fault_mask(rs), md = fault_mask(rd);
    trigger(rs, ms);
    trigger(rd, md);
    /* Copy-engine reads through a mapping are never altered by the faults. */
    if (rd != NULL)
        write_bytes(rd, dst - (uintptr_t)rd->base, (const void *)src, 0, n, md, 0);
    else
        memmove((void *)dst, (const void *)src, n);
    return E_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Kernels */

/* Kernel stores held back until the kernel ends (late-visibility). */
struct pending {
    struct region *r;
    size_t off, n;
    unsigned char fill;
    int has_bytes;
    unsigned char bytes[8];
    unsigned mask;
};

struct launch {
    struct pending pending[4];
    int npending;
};

/* A kernel store of n bytes (src, or fill when src is NULL; src at most 8 bytes). */
static void kernel_store(struct launch *l, struct region *r, size_t off, const void *src,
                         unsigned char fill, size_t n, unsigned mask) {
    if ((mask & F_LATE) && l->npending < (int)(sizeof l->pending / sizeof l->pending[0]) &&
        (src == NULL || n <= sizeof l->pending[0].bytes)) {
        struct pending *p = &l->pending[l->npending++];
        p->r = r;
        p->off = off;
        p->n = n;
        p->fill = fill;
        p->has_bytes = src != NULL;
        if (src != NULL) memcpy(p->bytes, src, n);
        p->mask = mask;
        return;
    }
    write_bytes(r, off, src, fill, n, mask, 1);
}

/* The kernel ends: buffered stores become visible, in program order. */
static void kernel_end(struct launch *l) {
    for (int i = 0; i < l->npending; i++) {
        struct pending *p = &l->pending[i];
        write_bytes(p->r, p->off, p->has_bytes ? p->bytes : NULL, p->fill, p->n, p->mask, 1);
    }
    l->npending = 0;
}

static int param_u64(void **params, int i, uint64_t *out) {
    if (params[i] == NULL) return E_INVALID_VALUE;
    memcpy(out, params[i], sizeof *out);
    return E_OK;
}

static int run_store(void **params) {
    uint64_t p, n;
    unsigned char value;
    if (param_u64(params, 0, &p) || param_u64(params, 1, &n) || params[2] == NULL)
        return E_INVALID_VALUE;
    memcpy(&value, params[2], 1);
    if (n == 0) return E_OK;
    if (n > SIZE_MAX) return E_ILLEGAL_ADDRESS;
    struct region *r = find_range((uintptr_t)p, (size_t)n);
    if (r == NULL) return E_ILLEGAL_ADDRESS;
    unsigned mask = fault_mask(r);
    trigger(r, mask);
    struct launch l = {.npending = 0};
    kernel_store(&l, r, (uintptr_t)p - (uintptr_t)r->base, NULL, value, (size_t)n, mask);
    kernel_end(&l);
    return E_OK;
}

static int run_count(void **params) {
    uint64_t p, n, mism_addr, first_addr;
    unsigned char value;
    if (param_u64(params, 0, &p) || param_u64(params, 1, &n) || params[2] == NULL ||
        param_u64(params, 3, &mism_addr) || param_u64(params, 4, &first_addr))
        return E_INVALID_VALUE;
    memcpy(&value, params[2], 1);
    if (n > SIZE_MAX) return E_ILLEGAL_ADDRESS;
    /* Every address is checked before anything runs: a bad one touches nothing. */
    struct region *r = n ? find_range((uintptr_t)p, (size_t)n) : NULL;
    struct region *rm = find_range((uintptr_t)mism_addr, 8);
    struct region *rf = find_range((uintptr_t)first_addr, 8);
    if ((n && r == NULL) || rm == NULL || rf == NULL) return E_ILLEGAL_ADDRESS;
    unsigned mask = fault_mask(r), mm = fault_mask(rm), mf = fault_mask(rf);
    if (r != NULL) trigger(r, mask);
    trigger(rm, mm);
    trigger(rf, mf);
    uint64_t count = 0, first = UINT64_MAX;
    if (r != NULL) {
        const unsigned char *base = r->base + ((uintptr_t)p - (uintptr_t)r->base);
        for (uint64_t i = 0; i < n; i++) {
            unsigned char b = (mask & F_SM_ONLY) ? 0xEE : base[i];
            if (b != value) {
                if (count++ == 0) first = i;
            }
        }
    }
    if (count == 0) return E_OK; /* no atomic ran: the counters are untouched */
    struct launch l = {.npending = 0};
    uint64_t m, f;
    size_t offm = (uintptr_t)mism_addr - (uintptr_t)rm->base;
    size_t offf = (uintptr_t)first_addr - (uintptr_t)rf->base;
    kernel_load(rm, offm, &m, 8, mm);
    m += count;
    kernel_store(&l, rm, offm, &m, 0, 8, mm);
    kernel_load(rf, offf, &f, 8, mf);
    if (first < f) kernel_store(&l, rf, offf, &first, 0, 8, mf);
    kernel_end(&l);
    return E_OK;
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
    /* Only PTX text can be read here; a cubin (ELF) or fatbinary is refused as real CUDA
     * refuses an image built for another machine. Compared byte by byte: stops at a NUL. */
    if ((b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F') ||
        (b[0] == 0x50 && b[1] == 0xed && b[2] == 0x55 && b[3] == 0xba))
        return unlock_return(E_INVALID_IMAGE);
    struct module *m = calloc(1, sizeof *m);
    if (m == NULL) return unlock_return(E_OUT_OF_MEMORY);
    m->ctx_dev = tl_dev;
    m->defined = ptx_entries(image);
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
    (void)hStream; /* every launch is synchronous, whatever the stream */
    (void)extra;   /* only kernelParams is supported: without it, invalid value */
    int rc = driver_begin();
    if (rc) return rc;
    struct function *fn = find_function(f);
    if (fn == NULL) return unlock_return(E_INVALID_HANDLE);
    if (!gridX || !gridY || !gridZ || !blockX || !blockY || !blockZ ||
        (unsigned long long)blockX * blockY * blockZ > 1024 || kernelParams == NULL)
        return unlock_return(E_INVALID_VALUE);
    rc = fn->kernel == K_STORE ? run_store(kernelParams) : run_count(kernelParams);
    return unlock_return(rc);
}

SIM_EXPORT int cuCtxSynchronize(void) {
    int rc = driver_begin();
    if (rc) return rc;
    return unlock_return(E_OK); /* kernels already ran to completion */
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
    *canAccessPeer = device != peerDevice && !(c->faults[src][tgt] & F_CLAIM_NO);
    return E_OK;
}

SIM_EXPORT int cudaIpcGetMemHandle(cudaIpcMemHandle_t *handle, void *devPtr) {
    if (handle == NULL) return E_INVALID_VALUE;
    int rc = runtime_begin(1);
    if (rc) return rc;
    const struct region *r = find_region((uintptr_t)devPtr);
    if (r == NULL || r->is_ipc) return unlock_return(E_INVALID_VALUE);
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
    if (c->faults[h.owner_phys][current_phys()] & F_IPC_OPEN_FAILS)
        return unlock_return(E_MAP_FAILED);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)h.pid, (int)h.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return unlock_return(E_MAP_FAILED);
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(fd, &st) != 0) {
        rc = E_MAP_FAILED;
    } else if ((uint64_t)st.st_ino != h.ino || (uint64_t)st.st_dev != h.dev ||
               (uint64_t)st.st_size < h.size) {
        rc = E_INVALID_HANDLE; /* the descriptor now names another file: a stale handle */
    } else {
        p = mmap(NULL, (size_t)h.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        rc = p == MAP_FAILED ? E_MAP_FAILED : E_OK;
    }
    /* The mapping keeps the memory alive; the descriptor is not needed any more. */
    if (close(fd) != 0) fprintf(stderr, "p2pcheck-sim: close: %s\n", strerror(errno));
    if (rc == E_OK) {
        struct region r = {
            .base = p,
            .size = (size_t)h.size,
            .fd = -1,
            .owner_phys = h.owner_phys,
            .is_ipc = 1,
            .ctx_dev = tl_dev,
            .ino = h.ino,
            .dev = h.dev,
        };
        rc = add_region(&r);
        if (rc != E_OK && munmap(p, (size_t)h.size) != 0)
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
