/* bw-probe: the bandwidth method of `p2pcheck --bandwidth` on one GPU, outside p2pcheck, for the
 * GPU run (scripts/gpu-bw.sh): a producer process allocates memory and exports an IPC handle, a
 * consumer process on the same GPU opens it and measures, with csrc/shim.c's timed copies and
 * pointer chase (the code p2pcheck's worker calls), its own memory and the same-GPU pair through
 * the mapping; then it studies the kernel tier's SM-store figure (issue 18's bimodal 200/360
 * GB/s), timing p2pc_pattern_store launches as the trace did (launch to synchronise) with the SM
 * clock from NVML beside each. One JSON object per line on stdout.
 *
 * usage: bw-probe FATBIN [MIB [LOOPS [SAMPLES]]]     (defaults 64 4 5)
 * build: gcc -O2 -Wall -Wextra -Werror -Icsrc scripts/bw-probe.c csrc/shim.c -ldl -lm -o bw-probe
 * Links nothing of CUDA: libcuda.so.1 and libnvidia-ml.so.1 are loaded with dlopen. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shim.h"

typedef struct {
    char bytes[64];
} ipc_handle;

static void *cuda, *nvml;
static p2pc_driver D;
static void *nvml_dev;
static int (*nvml_clock)(void *dev, int type, unsigned *mhz);
static int (*nvml_reasons)(void *dev, unsigned long long *reasons);

static void *sym(void *lib, const char *name) {
    void *f = dlsym(lib, name);
    if (!f) {
        fprintf(stderr, "bw-probe: %s: %s\n", name, dlerror());
        exit(2);
    }
    return f;
}

#define CK(call)                                                                                 \
    do {                                                                                         \
        int rc_ = (call);                                                                        \
        if (rc_) {                                                                               \
            fprintf(stderr, "bw-probe: %s failed: %d\n", #call, rc_);                           \
            exit(2);                                                                             \
        }                                                                                        \
    } while (0)

static void check_report(const char *what, const p2pc_report *r) {
    if (r->failed_call) {
        fprintf(stderr, "bw-probe: %s: %s failed: %d\n", what, r->failed_call, r->code);
        exit(2);
    }
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

static unsigned sm_clock(void) {
    unsigned mhz = 0;
    if (nvml_clock && nvml_clock(nvml_dev, 1 /* NVML_CLOCK_SM */, &mhz)) mhz = 0;
    return mhz;
}

static unsigned long long clock_reasons(void) {
    unsigned long long r = 0;
    if (nvml_reasons && nvml_reasons(nvml_dev, &r)) r = ~0ull;
    return r;
}

static void load(void) {
    cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) {
        fprintf(stderr, "bw-probe: %s\n", dlerror());
        exit(2);
    }
    D.launch_kernel = sym(cuda, "cuLaunchKernel");
    D.ctx_synchronize = sym(cuda, "cuCtxSynchronize");
    D.mem_alloc = sym(cuda, "cuMemAlloc_v2");
    D.mem_free = sym(cuda, "cuMemFree_v2");
    D.memset_d8 = sym(cuda, "cuMemsetD8_v2");
    D.memcpy_dtoh = sym(cuda, "cuMemcpyDtoH_v2");
    D.ctx_get_device = sym(cuda, "cuCtxGetDevice");
    D.device_get_attribute = sym(cuda, "cuDeviceGetAttribute");
    D.occupancy_max_active_blocks = sym(cuda, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    D.stream_create = sym(cuda, "cuStreamCreate");
    D.stream_destroy = sym(cuda, "cuStreamDestroy_v2");
    D.event_create = sym(cuda, "cuEventCreate");
    D.event_record = sym(cuda, "cuEventRecord");
    D.event_elapsed_time = sym(cuda, "cuEventElapsedTime");
    D.event_destroy = sym(cuda, "cuEventDestroy_v2");
    D.memcpy_dtod_async = sym(cuda, "cuMemcpyDtoDAsync_v2");
    D.memset_d32_async = sym(cuda, "cuMemsetD32Async");
    nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (nvml) {
        int (*init)(void) = sym(nvml, "nvmlInit_v2");
        int (*by_index)(unsigned, void **) = sym(nvml, "nvmlDeviceGetHandleByIndex_v2");
        if (init() == 0 && by_index(0, &nvml_dev) == 0) {
            nvml_clock = sym(nvml, "nvmlDeviceGetClockInfo");
            nvml_reasons = sym(nvml, "nvmlDeviceGetCurrentClocksEventReasons");
        }
    }
}

static void context(void) {
    int (*init)(unsigned) = sym(cuda, "cuInit");
    int (*get)(int *, int) = sym(cuda, "cuDeviceGet");
    int (*retain)(void **, int) = sym(cuda, "cuDevicePrimaryCtxRetain");
    int (*set)(void *) = sym(cuda, "cuCtxSetCurrent");
    int dev;
    void *ctx;
    CK(init(0));
    CK(get(&dev, 0));
    CK(retain(&ctx, dev));
    CK(set(ctx));
}

static void *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *b = malloc((size_t)n);
    if (!b || fread(b, 1, (size_t)n, f) != (size_t)n) exit(2);
    fclose(f);
    return b;
}

static void *k_store, *k_check, *k_copy, *k_spin, *k_chain, *k_chase;

static void kernels(const char *fatbin) {
    int (*load_data)(void **, const void *) = sym(cuda, "cuModuleLoadData");
    int (*get_fn)(void **, void *, const char *) = sym(cuda, "cuModuleGetFunction");
    void *m;
    CK(load_data(&m, read_file(fatbin)));
    CK(get_fn(&k_store, m, "p2pc_pattern_store"));
    CK(get_fn(&k_check, m, "p2pc_pattern_check"));
    CK(get_fn(&k_copy, m, "p2pc_copy"));
    CK(get_fn(&k_spin, m, "p2pc_spin"));
    CK(get_fn(&k_chain, m, "p2pc_chain"));
    CK(get_fn(&k_chase, m, "p2pc_chase"));
}

static void store(p2pc_devptr p, unsigned long long n, unsigned long long seed) {
    p2pc_report r;
    p2pcheck_shim_pattern_store(&D, k_store, p, n, seed, 16, 0, &r);
    check_report("pattern store", &r);
}

static unsigned long long wrong(p2pc_devptr p, unsigned long long n, unsigned long long seed) {
    p2pc_report r;
    p2pcheck_shim_pattern_check(&D, k_check, p, n, seed, seed ^ 1, 16, &r);
    check_report("pattern check", &r);
    return r.results[0];
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One figure: a warm-up sample, then `samples` timed ones; prints GB/s median and CV, and the
 * data check of every destination. */
static void figure(const char *name, unsigned engine, p2pc_devptr dst, p2pc_devptr src,
                   p2pc_devptr dst2, p2pc_devptr src2, unsigned long long n, unsigned loops,
                   int samples) {
    static unsigned long long seed = 0x5eed;
    seed += 2;
    store(src, n, seed);
    store(dst, n, seed ^ 1);
    if (dst2) {
        store(src2, n, seed + 1);
        store(dst2, n, (seed + 1) ^ 1);
    }
    double gbps[64];
    unsigned long long held = 1, grid = 0;
    unsigned mhz0 = sm_clock();
    for (int s = -1; s < samples; s++) {
        p2pc_report r;
        p2pcheck_shim_timed_copy(&D, k_spin, k_copy, engine, dst, src, dst2, src2, n, loops,
                                 100000000ull, &r);
        check_report(name, &r);
        if (r.results[1] != 1) held = r.results[1];
        grid = r.results[2];
        double bytes = (double)n * loops * (dst2 ? 2 : 1);
        if (s >= 0) gbps[s] = bytes / (double)r.results[0];
    }
    unsigned mhz1 = sm_clock();
    double sorted[64], mean = 0, var = 0;
    memcpy(sorted, gbps, sizeof(double) * samples);
    qsort(sorted, samples, sizeof(double), cmp);
    for (int s = 0; s < samples; s++) mean += gbps[s] / samples;
    for (int s = 0; s < samples; s++) var += (gbps[s] - mean) * (gbps[s] - mean) / samples;
    unsigned long long bad = wrong(dst, n, seed) + (dst2 ? wrong(dst2, n, seed + 1) : 0);
    printf("{\"figure\":\"%s\",\"engine\":\"%s\",\"mib\":%llu,\"loops\":%u,\"gbps\":%.1f,"
           "\"cv_pct\":%.2f,\"min\":%.1f,\"max\":%.1f,\"grid\":%llu,\"held\":%llu,\"wrong\":%llu,"
           "\"sm_mhz\":[%u,%u]}\n",
           name, engine ? "sm" : "ce", n >> 20, loops, sorted[samples / 2],
           100 * sqrt(var) / mean, sorted[0], sorted[samples - 1], grid, held, bad,
           mhz0, mhz1);
    fflush(stdout);
}

static void latency(const char *name, p2pc_devptr p) {
    const unsigned long long slots = 1024, stride = 4160, hops = 4096;
    p2pc_report r;
    p2pcheck_shim_chase(&D, k_chain, k_chase, p, slots, stride, slots, hops, &r);
    check_report(name, &r);
    printf("{\"figure\":\"%s\",\"latency_ns\":%.1f,\"end_ok\":%d}\n", name,
           (double)r.results[0] / hops, r.results[1] == ((slots + hops) % slots) * stride);
    fflush(stdout);
}

/* The kernel tier's SM-store figure as the trace measured it: p2pc_pattern_store of 256 MiB
 * with 16-byte stores, launch to synchronise on the host clock, SM clock before and after. */
static void store_study(const char *name, p2pc_devptr p, int launches) {
    const unsigned long long n = 256ull << 20;
    for (int i = 0; i < launches; i++) {
        unsigned mhz0 = sm_clock();
        unsigned long long why = clock_reasons();
        double t0 = now_s();
        store(p, n, 0x77 + i);
        double dt = now_s() - t0;
        printf("{\"study\":\"%s\",\"launch\":%d,\"gbps\":%.1f,\"sm_mhz\":[%u,%u],"
               "\"clock_reasons\":\"0x%llx\"}\n",
               name, i, n / dt / 1e9, mhz0, sm_clock(), why);
    }
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bw-probe FATBIN [MIB [LOOPS [SAMPLES]]]\n");
        return 2;
    }
    unsigned long long n = (argc > 2 ? strtoull(argv[2], NULL, 10) : 64) << 20;
    unsigned loops = argc > 3 ? (unsigned)atoi(argv[3]) : 4;
    int samples = argc > 4 ? atoi(argv[4]) : 5;
    if (samples < 1 || samples > 64) return 2;
    const unsigned long long remote_bytes = 2 * n + (256ull << 20) + (8ull << 20);
    int to_consumer[2], to_producer[2];
    if (pipe(to_consumer) || pipe(to_producer)) return 2;
    load();
    pid_t pid = fork();
    if (pid == 0) { /* producer: owns the memory, exports it, waits for the consumer's end */
        int (*get_handle)(ipc_handle *, p2pc_devptr) = sym(cuda, "cuIpcGetMemHandle");
        context();
        p2pc_devptr p;
        ipc_handle h;
        CK(D.mem_alloc(&p, remote_bytes));
        CK(get_handle(&h, p));
        if (write(to_consumer[1], &h, sizeof h) != sizeof h) _exit(2);
        char done;
        _exit(read(to_producer[0], &done, 1) == 1 ? 0 : 2);
    }
    int (*open_handle)(p2pc_devptr *, ipc_handle, unsigned) = sym(cuda, "cuIpcOpenMemHandle_v2");
    double t_start = now_s();
    unsigned idle_mhz = sm_clock();
    context();
    kernels(argv[1]);
    ipc_handle h;
    if (read(to_consumer[0], &h, sizeof h) != sizeof h) return 2;
    p2pc_devptr remote, local;
    CK(open_handle(&remote, h, 1 /* CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS */));
    CK(D.mem_alloc(&local, 2 * n + (256ull << 20)));
    printf("{\"probe\":\"start\",\"sm_mhz_before_cuda\":%u,\"sm_mhz\":%u,\"setup_s\":%.3f}\n",
           idle_mhz, sm_clock(), now_s() - t_start);
    /* The kernel tier's store figure first, on the freshly opened mapping, as in a check. */
    p2pc_devptr area = remote + 2 * n;
    store_study("mapping-first", area, 6);
    store_study("own-memory", local + 2 * n, 3);
    p2pc_devptr l0 = local, l1 = local + n, r0 = remote, r1 = remote + n;
    for (unsigned e = 0; e <= 1; e++) {
        figure("own", e, l1, l0, 0, 0, n, loops, samples);
        figure("write", e, r0, l0, 0, 0, n, loops, samples);
        figure("read", e, l1, r1, 0, 0, n, loops, samples);
        figure("both", e, r0, l0, l1, r1, n, loops, samples);
    }
    latency("latency-own", local);
    latency("latency-mapping", remote + 2 * n + (256ull << 20));
    /* The store figure again after the GPU has been busy (clocks up), then after 2 s idle. */
    store_study("mapping-busy", area, 3);
    sleep(2);
    store_study("mapping-after-idle", area, 3);
    if (write(to_producer[1], "x", 1) != 1) return 2;
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 2;
}
