/* The simulated driver (csrc/sim.c) driven directly, for tests/sim_driver.rs: its memory model
 * against a reference, its memory use, its handshake and its @once faults. The library is
 * loaded from $P2PCHECK_LIBCUDA; the simulator's own variables configure it.
 *
 *   sim_driver memory SEED OPS [cumem]
 *                                random memsets, pattern stores, copies and checks by two
 *                                processes (the owner and one mapping it through IPC, or with
 *                                "cumem" through cuMemCreate/export, the descriptor passed with
 *                                SCM_RIGHTS, import/map/set access) taking turns; every read and
 *                                check is compared with a plain model of the bytes. Prints
 *                                "memory ok OPS".
 *   sim_driver resident MIB      fills MIB MiB as the parallel worker does (memset, then four
 *                                patterns, checked, replaced, checked) and prints
 *                                "resident KIB" (this process's VmRSS) and the checks' counts.
 *   sim_driver handshake ROUNDS BUDGET_NS DRIVER_DELAY_MS DRIVER_DIES_MS
 *                                the owner serves, a second process drives through IPC after
 *                                DRIVER_DELAY_MS; DRIVER_DIES_MS > 0 makes the driver's process
 *                                die that long into its kernel, before the server starts.
 *                                Prints "server|driver DONE ERRORS TIMED_OUT ELAPSED_NS".
 *   sim_driver cumem             the cuMem path step by step: the owner (device 0) creates, maps
 *                                and fills 1s, exports a descriptor and passes it to a second
 *                                process (device 0, or 1 when 2 GPUs are simulated), which
 *                                imports, reserves, maps, grants itself access and writes 2s;
 *                                the calls' rules are checked on the way. Prints "attribute A"
 *                                (POSIX-descriptor support of device 0), then "export rc N",
 *                                "import rc N" or "access rc N" where a call failed, else
 *                                "cumem sees V" (the owner's byte after the write).
 *   sim_driver once PROCESSES    the owner's memory is written through IPC by PROCESSES fresh
 *                                processes, one after the other: prints "writer K sees V" (the
 *                                value read back after writing 2 over 1).
 *   sim_driver bandwidth MIB     (2 GPUs) a process on GPU 1 maps GPU 0's memory and times, with
 *                                csrc/shim.c, copy-engine writes, SM reads, both ways at once and
 *                                a pointer chase through the mapping, then checks the bytes with
 *                                p2pc_pattern_check: prints "NAME GBPS HELD WRONG" per figure
 *                                (GB/s as the events say) and "latency NS".
 * Exit 0 when it ran (what it saw is on stdout), 1 on any unexpected result or failed call. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shim.h"

typedef struct {
    char reserved[64];
} handle_t;

static int (*p_setdev)(int);
static int (*p_count)(int *);
static int (*p_malloc)(void **, size_t);
static int (*p_memset)(void *, int, size_t);
static int (*p_memcpy)(void *, const void *, size_t, int);
static int (*p_get)(handle_t *, void *);
static int (*p_open)(void **, handle_t, unsigned);
static int (*p_load)(void **, const void *);
static int (*p_func)(void **, void *, const char *);
static int (*p_launch)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                       unsigned, void *, void **, void **);

static void *f_store, *f_check, *f_handshake;

/* The cuMem calls and their structures (cuda.h's layout). */
typedef struct {
    int type, id;
} location_t;
typedef struct {
    int type, handle_types;
    location_t location;
    void *win32;
    unsigned char flags[8];
} prop_t;
typedef struct {
    location_t location;
    int flags;
} access_t;
static int (*p_init)(unsigned);
static int (*p_attr)(int *, int, int);
static int (*p_gran)(size_t *, const prop_t *, int);
static int (*p_create)(unsigned long long *, size_t, const prop_t *, unsigned long long);
static int (*p_release)(unsigned long long);
static int (*p_export)(void *, unsigned long long, int, unsigned long long);
static int (*p_import)(unsigned long long *, void *, int);
static int (*p_reserve)(unsigned long long *, size_t, size_t, unsigned long long,
                        unsigned long long);
static int (*p_afree)(unsigned long long, size_t);
static int (*p_map)(unsigned long long, size_t, size_t, unsigned long long, unsigned long long);
static int (*p_unmap)(unsigned long long, size_t);
static int (*p_access)(unsigned long long, size_t, const access_t *, size_t);

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "sim_driver: " __VA_ARGS__);                                               \
        fputc('\n', stderr);                                                                       \
        exit(1);                                                                                   \
    } while (0)
#define OK(call)                                                                                   \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_ != 0) FAIL("%s -> %d (line %d)", #call, rc_, __LINE__);                            \
    } while (0)

static void *sym(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (p == NULL) FAIL("no symbol %s", name);
    return p;
}

static void load(void) {
    const char *path = getenv("P2PCHECK_LIBCUDA");
    void *lib = path ? dlopen(path, RTLD_NOW) : NULL;
    if (lib == NULL) FAIL("dlopen %s: %s", path ? path : "(P2PCHECK_LIBCUDA unset)", dlerror());
    *(void **)&p_setdev = sym(lib, "cudaSetDevice");
    *(void **)&p_count = sym(lib, "cudaGetDeviceCount");
    *(void **)&p_malloc = sym(lib, "cudaMalloc");
    *(void **)&p_memset = sym(lib, "cudaMemset");
    *(void **)&p_memcpy = sym(lib, "cudaMemcpy");
    *(void **)&p_get = sym(lib, "cudaIpcGetMemHandle");
    *(void **)&p_open = sym(lib, "cudaIpcOpenMemHandle");
    *(void **)&p_load = sym(lib, "cuModuleLoadData");
    *(void **)&p_func = sym(lib, "cuModuleGetFunction");
    *(void **)&p_launch = sym(lib, "cuLaunchKernel");
    *(void **)&p_init = sym(lib, "cuInit");
    *(void **)&p_attr = sym(lib, "cuDeviceGetAttribute");
    *(void **)&p_gran = sym(lib, "cuMemGetAllocationGranularity");
    *(void **)&p_create = sym(lib, "cuMemCreate");
    *(void **)&p_release = sym(lib, "cuMemRelease");
    *(void **)&p_export = sym(lib, "cuMemExportToShareableHandle");
    *(void **)&p_import = sym(lib, "cuMemImportFromShareableHandle");
    *(void **)&p_reserve = sym(lib, "cuMemAddressReserve");
    *(void **)&p_afree = sym(lib, "cuMemAddressFree");
    *(void **)&p_map = sym(lib, "cuMemMap");
    *(void **)&p_unmap = sym(lib, "cuMemUnmap");
    *(void **)&p_access = sym(lib, "cuMemSetAccess");
}

/* The first CUDA calls of a process: device 0, the kernels. */
static void start(void) {
    int n = 0;
    OK(p_count(&n));
    OK(p_setdev(0));
    void *m;
    OK(p_load(&m, ".entry p2pc_pattern_store(\n.entry p2pc_pattern_check(\n"
                  ".entry p2pc_handshake(\n"));
    OK(p_func(&f_store, m, "p2pc_pattern_store"));
    OK(p_func(&f_check, m, "p2pc_pattern_check"));
    OK(p_func(&f_handshake, m, "p2pc_handshake"));
}

static int launch(void *f, void **params) { return p_launch(f, 1, 1, 1, 32, 1, 1, 0, NULL, params, NULL); }

static int pattern_store(uint64_t p, uint64_t n, uint64_t seed, uint32_t width, uint64_t shift) {
    void *params[] = {&p, &n, &seed, &width, &shift};
    return launch(f_store, params);
}

/* [wrong, first_bad, stale] of p2pc_pattern_check; counters is device memory of 24 bytes. */
static void pattern_check(uint64_t p, uint64_t n, uint64_t seed, uint64_t old_seed, uint32_t width,
                          uint64_t counters, uint64_t out[3]) {
    uint64_t init[3] = {0, UINT64_MAX, 0};
    OK(p_memcpy((void *)counters, init, sizeof init, 1));
    void *params[] = {&p, &n, &seed, &old_seed, &width, &counters};
    OK(launch(f_check, params));
    OK(p_memcpy(out, (void *)counters, 3 * sizeof(uint64_t), 2));
}

static unsigned char pat(uint64_t o, uint64_t seed) {
    uint64_t x = o + seed * 0x9E3779B97F4A7C15ull;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (unsigned char)x;
}

static uint64_t rng_state;
static uint64_t rnd(uint64_t below) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return below ? rng_state % below : 0;
}

static void put(int fd, const void *b, size_t n) {
    if (write(fd, b, n) != (ssize_t)n) FAIL("pipe write");
}
static void get(int fd, void *b, size_t n) {
    if (read(fd, b, n) != (ssize_t)n) FAIL("pipe read (the other process ended)");
}

/* Passes descriptor fd over the Unix socket sock (SCM_RIGHTS). */
static void send_fd(int sock, int fd) {
    char byte = 'f';
    struct iovec iov = {&byte, 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = sizeof ctl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &msg, 0) != 1) FAIL("sendmsg");
}

static int recv_fd(int sock) {
    char byte;
    struct iovec iov = {&byte, 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = sizeof ctl.buf};
    if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1) FAIL("recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c == NULL || c->cmsg_type != SCM_RIGHTS) FAIL("no descriptor arrived");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

#define GRANULE ((size_t)2 << 20)

static prop_t device_prop(int device) {
    prop_t prop;
    memset(&prop, 0, sizeof prop);
    prop.type = 1;         /* pinned */
    prop.handle_types = 1; /* POSIX descriptor */
    prop.location.type = 1;
    prop.location.id = device;
    return prop;
}

/* Reserves room for `bytes`, maps handle h there and grants `device` read-write access. */
static unsigned long long map_with_access(unsigned long long h, size_t bytes, int device) {
    unsigned long long va;
    OK(p_reserve(&va, bytes, 0, 0, 0));
    OK(p_map(va, bytes, 0, h, 0));
    access_t a = {{1, device}, 3};
    OK(p_access(va, bytes, &a, 1));
    return va;
}

/* ---------------------------------------------------------------------------------------- */

#define MEM_BYTES ((size_t)37 * 4096 + 1008) /* many pages and a partial one */
#define SEEDS 4

/* One random operation, the same in both processes (the rng runs in step); the process whose
 * turn it is performs it on its pointer `base`, both update the model. */
static void memory_op(int act, unsigned char *model, uint64_t base, uint64_t counters) {
    uint64_t kind = rnd(6);
    int aligned = rnd(2) == 0;
    uint64_t off = aligned ? rnd(MEM_BYTES / 4096) * 4096 : rnd(MEM_BYTES);
    uint64_t max = MEM_BYTES - off;
    uint64_t n = aligned && rnd(2) ? (rnd(max / 4096 + 1)) * 4096 : rnd(max + 1);
    if (kind == 0) { /* memset, often to 0 or 1 */
        unsigned char v = (unsigned char)(rnd(3) == 0 ? 0 : rnd(3) == 0 ? 1 : rnd(256));
        if (act) OK(p_memset((void *)(base + off), v, n));
        memset(model + off, v, n);
    } else if (kind == 1) { /* pattern store: n and shift multiples of 16 */
        uint32_t widths[] = {1, 4, 8, 16};
        uint32_t w = widths[rnd(4)];
        off -= off % 16;
        n = (MEM_BYTES - off) < n ? MEM_BYTES - off : n;
        n -= n % 16;
        if (n == 0) return;
        uint64_t shift = rnd(3) == 0 ? rnd(n / 16) * 16 : 0;
        uint64_t seed = 1 + rnd(SEEDS);
        if (act) OK(pattern_store(base + off, n, seed, w, shift));
        for (uint64_t q = 0; q < n; q++) model[off + q] = pat((q + n - shift) % n, seed);
    } else if (kind == 2) { /* copy from the host */
        unsigned char *src = malloc(n + 1);
        for (uint64_t k = 0; k < n; k++) src[k] = (unsigned char)rnd(256);
        if (act) OK(p_memcpy((void *)(base + off), src, n, 1));
        memcpy(model + off, src, n);
        free(src);
    } else if (kind == 3) { /* device to device, within the allocation, overlaps too */
        uint64_t from = rnd(MEM_BYTES - n + 1);
        if (act) OK(p_memcpy((void *)(base + off), (void *)(base + from), n, 3));
        memmove(model + off, model + from, n);
    } else if (kind == 4 && act) { /* read back to the host */
        unsigned char *got = malloc(n + 1);
        OK(p_memcpy(got, (void *)(base + off), n, 2));
        for (uint64_t k = 0; k < n; k++)
            if (got[k] != model[off + k])
                FAIL("read of %lu bytes at %lu: byte %lu is %u, the model says %u",
                     (unsigned long)n, (unsigned long)off, (unsigned long)(off + k), got[k],
                     model[off + k]);
        free(got);
    } else if (kind == 5) { /* pattern check against the model's count */
        off -= off % 16;
        n = (MEM_BYTES - off) < n ? MEM_BYTES - off : n;
        n -= n % 16;
        uint64_t seed = 1 + rnd(SEEDS), old = 1 + rnd(SEEDS);
        if (!act) return;
        uint64_t got[3], want[3] = {0, UINT64_MAX, 0};
        pattern_check(base + off, n, seed, old, 1, counters, got);
        for (uint64_t o = 0; o < n; o++) {
            if (model[off + o] == pat(o, seed)) continue;
            if (want[0]++ == 0) want[1] = o;
            if (model[off + o] == pat(o, old)) want[2]++;
        }
        if (memcmp(got, want, sizeof got) != 0)
            FAIL("check of %lu bytes at %lu, seed %lu: [%lu %lu %lu], the model says [%lu %lu %lu]",
                 (unsigned long)n, (unsigned long)off, (unsigned long)seed, (unsigned long)got[0],
                 (unsigned long)got[1], (unsigned long)got[2], (unsigned long)want[0],
                 (unsigned long)want[1], (unsigned long)want[2]);
    }
}

static int memory(uint64_t seed, long ops, int cumem) {
    int to_child[2], to_parent[2], sock[2];
    if (pipe(to_child) || pipe(to_parent)) FAIL("pipe");
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sock)) FAIL("socketpair");
    pid_t pid = fork();
    if (pid < 0) FAIL("fork");
    int me = pid == 0; /* 0: the owner, 1: the mapper */
    start();
    uint64_t base, counters;
    void *p;
    OK(p_malloc(&p, 64));
    counters = (uint64_t)p;
    if (cumem) {
        unsigned long long h;
        if (me == 0) {
            prop_t prop = device_prop(0);
            OK(p_create(&h, GRANULE, &prop, 0));
            int fd;
            OK(p_export(&fd, h, 1, 0));
            send_fd(sock[0], fd);
            close(fd);
        } else {
            int fd = recv_fd(sock[1]);
            OK(p_import(&h, (void *)(intptr_t)fd, 1));
            close(fd);
        }
        base = map_with_access(h, GRANULE, 0);
        OK(p_release(h)); /* the mapping keeps the memory */
    } else if (me == 0) {
        OK(p_malloc(&p, MEM_BYTES));
        base = (uint64_t)p;
        handle_t h;
        OK(p_get(&h, p));
        put(to_child[1], &h, sizeof h);
    } else {
        handle_t h;
        get(to_child[0], &h, sizeof h);
        OK(p_open(&p, h, 1));
        base = (uint64_t)p;
    }
    unsigned char *model = calloc(1, MEM_BYTES); /* a fresh allocation reads zeros */
    rng_state = seed | 1;
    int in = me ? to_child[0] : to_parent[0], out = me ? to_parent[1] : to_child[1];
    char turn = 't';
    for (long i = 0; i < ops; i++) {
        int act = (int)(i % 2) == me;
        if (act && i > 0) get(in, &turn, 1);
        memory_op(act, model, base, counters);
        if (act) put(out, &turn, 1);
    }
    if (me == 1) _exit(0);
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        FAIL("the mapping process failed");
    printf("memory ok %ld\n", ops);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */

static long vm_kib(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t len = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, len) == 0 && line[len] == ':') v = atol(line + len + 1);
    if (f) fclose(f);
    return v;
}

static int resident(long mib) {
    start();
    size_t bytes = (size_t)mib << 20, part = bytes / 4;
    void *p, *c;
    OK(p_malloc(&p, bytes));
    OK(p_malloc(&c, 64));
    uint64_t base = (uint64_t)p, wrong = 0, stale = 0, got[3];
    OK(p_memset(p, 1, bytes));
    for (int q = 0; q < 4; q++) OK(pattern_store(base + q * part, part, 100 + q, 16, 0));
    for (int q = 0; q < 4; q++) {
        pattern_check(base + q * part, part, 100 + q, 200 + q, 1u << (2 * q) > 16 ? 16 : 1u << (2 * q),
                      (uint64_t)c, got);
        wrong += got[0];
    }
    for (int q = 0; q < 4; q++) OK(pattern_store(base + q * part, part, 200 + q, 4, 0));
    for (int q = 0; q < 4; q++) {
        pattern_check(base + q * part, part, 300 + q, 200 + q, 8, (uint64_t)c, got);
        stale += got[2];
    }
    unsigned char b[2];
    OK(p_memcpy(b, (void *)(base + part - 1), 2, 2));
    if (b[0] != pat(part - 1, 200) || b[1] != pat(0, 201)) FAIL("read back %u %u", b[0], b[1]);
    printf("resident %ld\nright-pattern wrong %lu\nwrong-pattern stale %lu\n", vm_kib("VmRSS"),
           (unsigned long)wrong, (unsigned long)stale);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void *die_later(void *arg) {
    sleep_ms((long)(intptr_t)arg);
    kill(getpid(), SIGKILL);
    return NULL;
}

static void side(uint64_t area, uint32_t rounds, uint32_t role, uint64_t budget) {
    void *o;
    OK(p_malloc(&o, 32));
    uint64_t out = (uint64_t)o, seed = 77, r[4];
    void *params[] = {&area, &rounds, &role, &seed, &budget, &out};
    OK(launch(f_handshake, params));
    OK(p_memcpy(r, o, sizeof r, 2));
    printf("%s %lu %lu %lu %lu\n", role ? "driver" : "server", (unsigned long)r[0],
           (unsigned long)r[1], (unsigned long)r[2], (unsigned long)r[3]);
    fflush(stdout);
}

static int handshake(uint32_t rounds, uint64_t budget, long delay_ms, long dies_ms) {
    int to_child[2], to_parent[2];
    if (pipe(to_child) || pipe(to_parent)) FAIL("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) FAIL("fork");
    start();
    if (pid == 0) {
        handle_t h;
        void *p;
        get(to_child[0], &h, sizeof h);
        OK(p_open(&p, h, 1));
        sleep_ms(delay_ms);
        if (dies_ms > 0) {
            pthread_t t;
            if (pthread_create(&t, NULL, die_later, (void *)(intptr_t)dies_ms)) FAIL("thread");
            put(to_parent[1], "s", 1); /* the server starts once this process is dead */
        }
        side((uint64_t)p, rounds, 1, budget);
        _exit(0);
    }
    void *p;
    OK(p_malloc(&p, 4096));
    OK(p_memset(p, 0, 4096));
    handle_t h;
    OK(p_get(&h, p));
    put(to_child[1], &h, sizeof h);
    int status;
    if (dies_ms > 0) {
        char c;
        get(to_parent[0], &c, 1);
        if (waitpid(pid, &status, 0) != pid || !WIFSIGNALED(status)) FAIL("the driver lived");
        printf("driver killed\n");
    }
    side((uint64_t)p, rounds, 0, budget);
    if (dies_ms == 0 &&
        (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0))
        FAIL("the driver failed");
    return 0;
}

/* ---------------------------------------------------------------------------------------- */

/* The owner's and the importer's sides of the cuMem path (see the header). */
static int cumem(void) {
    int sock[2], done[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sock) || pipe(done)) FAIL("socketpair");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) FAIL("fork");
    start();
    int n = 0;
    OK(p_count(&n));
    if (pid == 0) {
        int device = n > 1 ? 1 : 0;
        OK(p_setdev(device));
        int fd = recv_fd(sock[1]);
        unsigned long long h;
        int rc = p_import(&h, (void *)(intptr_t)fd, 1);
        close(fd);
        if (rc != 0) {
            printf("import rc %d\n", rc);
            _exit(0);
        }
        unsigned long long va;
        OK(p_reserve(&va, GRANULE, 0, 0, 0));
        OK(p_map(va, GRANULE, 0, h, 0));
        OK(p_release(h));
        /* No access granted yet: the memory cannot be touched. */
        if (p_memset((void *)va, 2, 4096) != 1) FAIL("a write before cuMemSetAccess worked");
        access_t a = {{1, device}, 3};
        rc = p_access(va, GRANULE, &a, 1);
        if (rc != 0) {
            printf("access rc %d\n", rc);
            _exit(0);
        }
        OK(p_memset((void *)va, 2, 4096));
        if (p_afree(va, GRANULE) != 1) FAIL("a reservation was freed while mapped");
        OK(p_unmap(va, GRANULE));
        unsigned char b;
        if (p_memcpy(&b, (void *)va, 1, 4) != 1) FAIL("an unmapped reservation was read");
        OK(p_afree(va, GRANULE));
        put(done[1], "w", 1);
        _exit(0);
    }
    int attr = -1;
    OK(p_attr(&attr, 103, 0));
    printf("attribute %d\n", attr);
    prop_t prop = device_prop(0);
    size_t granule = 0;
    OK(p_gran(&granule, &prop, 0));
    if (granule != GRANULE) FAIL("granularity %zu", granule);
    unsigned long long h;
    OK(p_create(&h, GRANULE, &prop, 0));
    unsigned long long va = map_with_access(h, GRANULE, 0);
    OK(p_memset((void *)va, 1, 4096));
    handle_t ipc;
    if (p_get(&ipc, (void *)va) != 1) FAIL("an IPC handle of cuMem memory");
    int fd = -1;
    int rc = p_export(&fd, h, 1, 0);
    if (rc != 0) {
        printf("export rc %d\n", rc);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return 0;
    }
    send_fd(sock[0], fd);
    close(fd);
    close(done[1]);
    char c;
    ssize_t got = read(done[0], &c, 1); /* 0: the importer stopped early (it said why) */
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        FAIL("the importer failed");
    if (got == 1) {
        unsigned char b[4096];
        OK(p_memcpy(b, (void *)va, sizeof b, 2));
        for (size_t i = 1; i < sizeof b; i++)
            if (b[i] != b[0]) FAIL("byte %zu is %u, byte 0 %u", i, b[i], b[0]);
        printf("cumem sees %u\n", b[0]);
    }
    OK(p_unmap(va, GRANULE));
    OK(p_release(h));
    return 0;
}

static int once(int processes) {
    start();
    void *p;
    OK(p_malloc(&p, 4096));
    handle_t h;
    OK(p_get(&h, p));
    for (int k = 1; k <= processes; k++) {
        OK(p_memset(p, 1, 4096));
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) FAIL("fork");
        if (pid == 0) {
            /* Each writer is a fresh process, as a retry's worker is. */
            char arg[16];
            snprintf(arg, sizeof arg, "%d", k);
            char hex[129];
            for (int i = 0; i < 64; i++) sprintf(hex + 2 * i, "%02x", (unsigned char)h.reserved[i]);
            execl("/proc/self/exe", "sim_driver", "once-writer", arg, hex, (char *)NULL);
            _exit(127);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            FAIL("writer %d failed", k);
    }
    return 0;
}

static int once_writer(const char *k, const char *hex) {
    start();
    handle_t h;
    for (int i = 0; i < 64; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) FAIL("bad handle");
        h.reserved[i] = (char)v;
    }
    void *p;
    OK(p_open(&p, h, 1));
    OK(p_memset(p, 2, 4096));
    unsigned char b;
    OK(p_memcpy(&b, p, 1, 2));
    printf("writer %s sees %u\n", k, b);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */

static p2pc_driver shim_driver(void) {
    void *lib = dlopen(getenv("P2PCHECK_LIBCUDA"), RTLD_NOW);
    if (lib == NULL) FAIL("dlopen: %s", dlerror());
    p2pc_driver d;
    *(void **)&d.launch_kernel = sym(lib, "cuLaunchKernel");
    *(void **)&d.ctx_synchronize = sym(lib, "cuCtxSynchronize");
    *(void **)&d.mem_alloc = sym(lib, "cuMemAlloc_v2");
    *(void **)&d.mem_free = sym(lib, "cuMemFree_v2");
    *(void **)&d.memset_d8 = sym(lib, "cuMemsetD8_v2");
    *(void **)&d.memcpy_dtoh = sym(lib, "cuMemcpyDtoH_v2");
    *(void **)&d.ctx_get_device = sym(lib, "cuCtxGetDevice");
    *(void **)&d.device_get_attribute = sym(lib, "cuDeviceGetAttribute");
    *(void **)&d.occupancy_max_active_blocks =
        sym(lib, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    *(void **)&d.stream_create = sym(lib, "cuStreamCreate");
    *(void **)&d.stream_destroy = sym(lib, "cuStreamDestroy_v2");
    *(void **)&d.event_create = sym(lib, "cuEventCreate");
    *(void **)&d.event_record = sym(lib, "cuEventRecord");
    *(void **)&d.event_elapsed_time = sym(lib, "cuEventElapsedTime");
    *(void **)&d.event_destroy = sym(lib, "cuEventDestroy_v2");
    *(void **)&d.memcpy_dtod_async = sym(lib, "cuMemcpyDtoDAsync_v2");
    *(void **)&d.memset_d32_async = sym(lib, "cuMemsetD32Async");
    return d;
}

static void report_ok(const p2pc_report *r) {
    if (r->failed_call) FAIL("%s -> %d", r->failed_call, r->code);
}

/* One figure: the destinations' old pattern, one timed sample, the pattern check. */
static void bw_figure(const p2pc_driver *d, void **f, const char *name, unsigned engine,
                      uint64_t dst, uint64_t src, uint64_t dst2, uint64_t src2, uint64_t n) {
    p2pc_report r;
    uint64_t seed = 900;
    p2pcheck_shim_pattern_store(d, f_store, src, n, seed, 16, 0, &r);
    report_ok(&r);
    p2pcheck_shim_pattern_store(d, f_store, dst, n, seed + 1, 16, 0, &r);
    report_ok(&r);
    if (dst2) {
        p2pcheck_shim_pattern_store(d, f_store, src2, n, seed, 16, 0, &r);
        report_ok(&r);
        p2pcheck_shim_pattern_store(d, f_store, dst2, n, seed + 1, 16, 0, &r);
        report_ok(&r);
    }
    p2pcheck_shim_timed_copy(d, f[0], f[1], engine, dst, src, dst2, src2, n, 2, 1000000, &r);
    report_ok(&r);
    double gbps = (double)n * 2 * (dst2 ? 2 : 1) / (double)r.results[0];
    unsigned long long held = r.results[1];
    uint64_t wrong = 0;
    for (int k = 0; k < (dst2 ? 2 : 1); k++) {
        p2pcheck_shim_pattern_check(d, f_check, k ? dst2 : dst, n, seed, seed + 1, 16, &r);
        report_ok(&r);
        wrong += r.results[0];
    }
    printf("%s %.0f %llu %lu\n", name, gbps, held, (unsigned long)wrong);
}

static int bandwidth(uint64_t mib) {
    uint64_t n = mib << 20;
    int to_child[2];
    if (pipe(to_child)) FAIL("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) FAIL("fork");
    if (pid == 0) {
        int count = 0;
        OK(p_count(&count));
        OK(p_setdev(1));
        void *m, *f[4];
        OK(p_load(&m, ".entry p2pc_pattern_store(\n.entry p2pc_pattern_check(\n"
                      ".entry p2pc_spin(\n.entry p2pc_copy(\n.entry p2pc_chain(\n"
                      ".entry p2pc_chase(\n"));
        OK(p_func(&f_store, m, "p2pc_pattern_store"));
        OK(p_func(&f_check, m, "p2pc_pattern_check"));
        OK(p_func(&f[0], m, "p2pc_spin"));
        OK(p_func(&f[1], m, "p2pc_copy"));
        OK(p_func(&f[2], m, "p2pc_chain"));
        OK(p_func(&f[3], m, "p2pc_chase"));
        handle_t h;
        void *remote, *local;
        get(to_child[0], &h, sizeof h);
        OK(p_open(&remote, h, 1));
        OK(p_malloc(&local, 2 * n));
        p2pc_driver d = shim_driver();
        uint64_t r0 = (uint64_t)remote, r1 = r0 + n, l0 = (uint64_t)local, l1 = l0 + n;
        bw_figure(&d, f, "ce-write", P2PC_ENGINE_CE, r0, l0, 0, 0, n);
        bw_figure(&d, f, "sm-read", P2PC_ENGINE_SM, l1, r1, 0, 0, n);
        bw_figure(&d, f, "ce-both", P2PC_ENGINE_CE, r0, l0, l1, r1, n);
        p2pc_report r;
        p2pcheck_shim_chase(&d, f[2], f[3], r0, 64, 4160, 64, 1000, &r);
        report_ok(&r);
        if (r.results[1] != (64 + 1000) % 64 * 4160) FAIL("chase ended at %llu", r.results[1]);
        printf("latency %.0f\n", (double)r.results[0] / 1000);
        _exit(0);
    }
    start();
    void *p;
    OK(p_malloc(&p, 2 * n));
    handle_t h;
    OK(p_get(&h, p));
    put(to_child[1], &h, sizeof h);
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        FAIL("the consumer failed");
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    load();
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "memory") == 0)
        return memory(strtoull(argv[2], NULL, 10), atol(argv[3]),
                      argc == 5 && strcmp(argv[4], "cumem") == 0);
    if (argc == 2 && strcmp(argv[1], "cumem") == 0) return cumem();
    if (argc == 3 && strcmp(argv[1], "resident") == 0) return resident(atol(argv[2]));
    if (argc == 6 && strcmp(argv[1], "handshake") == 0)
        return handshake((uint32_t)atol(argv[2]), strtoull(argv[3], NULL, 10), atol(argv[4]),
                         atol(argv[5]));
    if (argc == 3 && strcmp(argv[1], "once") == 0) return once(atoi(argv[2]));
    if (argc == 3 && strcmp(argv[1], "bandwidth") == 0) return bandwidth(strtoull(argv[2], NULL, 10));
    if (argc == 4 && strcmp(argv[1], "once-writer") == 0) return once_writer(argv[2], argv[3]);
    if (argc == 2 && strcmp(argv[1], "count") == 0) {
        int n = -1;
        printf("count rc %d\n", p_count(&n));
        return 0;
    }
    FAIL("usage: see the header comment");
}
