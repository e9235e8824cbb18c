/* floor: the least a p2pcheck worker must do before it has something to hand to its peer. It
 * loads the driver, starts CUDA on one device, makes the primary context current, allocates
 * 1 KiB and exports it as a CUDA IPC handle, then prints one line and exits normally.
 * scripts/bench.py starts several at once: the time until the last one has printed is the floor
 * no cross-process P2P check can beat on that machine.
 *
 *   usage:  floor [ORDINAL]     device index as this process sees it (CUDA_VISIBLE_DEVICES
 *                               applies), default 0
 *   stdout: handle <CLOCK_MONOTONIC seconds, 9 decimals>      then exit 0
 *           error <call> <code> <name>                        then exit 3
 *
 * Built by scripts/stage-carry.sh:
 *   gcc -O2 -Wall -Wextra -Werror -o .carry/floor scripts/floor.c -ldl */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* No CUDA headers on the build machine: the few driver types, declared by their ABI. */
typedef int CUresult; /* an enum; CUDA_SUCCESS is 0 */
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef struct { char reserved[64]; } CUipcMemHandle;

static CUresult (*cuGetErrorName)(CUresult, const char **);

/* One parseable line on stdout (bench.py reads only stdout), then the exit code bench.py
 * counts as a failed start-up. */
static void fail(const char *call, int code, const char *name) {
    printf("error %s %d %s\n", call, code, name ? name : "?");
    fflush(stdout);
    exit(3);
}

static void check(CUresult rc, const char *call) {
    const char *name = NULL;
    if (rc == 0) return;
    if (cuGetErrorName == NULL || cuGetErrorName(rc, &name) != 0) name = NULL;
    fail(call, rc, name);
}

static void *sym(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (p == NULL) fail(name, -1, "symbol-not-found");
    return p;
}

int main(int argc, char **argv) {
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemAlloc_v2)(CUdeviceptr *, size_t);
    CUresult (*cuIpcGetMemHandle)(CUipcMemHandle *, CUdeviceptr);
    CUdevice dev;
    CUcontext ctx;
    CUdeviceptr p;
    CUipcMemHandle h;
    struct timespec ts;
    char *end;
    long ordinal = 0;

    if (argc > 1) {
        ordinal = strtol(argv[1], &end, 10);
        if (argv[1][0] == '\0' || *end != '\0' || ordinal < 0 || ordinal > 1 << 20)
            fail("argv", -1, "bad-ordinal");
    }
    /* The soname a worker opens (plain libcuda.so is only the development symlink). */
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        printf("error dlopen -1 %s\n", dlerror()); /* the reason has spaces: last on the line */
        return 3;
    }
    cuGetErrorName = sym(lib, "cuGetErrorName");
    cuInit = sym(lib, "cuInit");
    cuDeviceGet = sym(lib, "cuDeviceGet");
    cuDevicePrimaryCtxRetain = sym(lib, "cuDevicePrimaryCtxRetain");
    cuCtxSetCurrent = sym(lib, "cuCtxSetCurrent");
    cuMemAlloc_v2 = sym(lib, "cuMemAlloc_v2");
    cuIpcGetMemHandle = sym(lib, "cuIpcGetMemHandle");

    check(cuInit(0), "cuInit");
    check(cuDeviceGet(&dev, (int)ordinal), "cuDeviceGet");
    /* The primary context: the one cudaSetDevice creates, so the same cost a worker pays. */
    check(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    check(cuMemAlloc_v2(&p, 1024), "cuMemAlloc_v2");
    check(cuIpcGetMemHandle(&h, p), "cuIpcGetMemHandle");

    /* Stamped before the write, so the parent can tell pipe and scheduling delay from CUDA work
     * (both clocks are CLOCK_MONOTONIC). */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    printf("handle %lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
    fflush(stdout);
    /* Return, not _exit: the driver tears the context down at exit, as it does for a worker. */
    return 0;
}
