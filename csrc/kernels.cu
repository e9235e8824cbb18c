// GPU kernels of p2pcheck's kernel check: loads and stores issued by SMs through a CUDA IPC
// mapping of a peer's memory (what custom all-reduce kernels do), as opposed to the copy-engine
// memset/memcpy of the vLLM-compatible check. Compiled to PTX by scripts/gen-ptx.sh; the
// committed csrc/kernels.ptx is what the library embeds and the driver JIT-compiles.
// volatile: every access must really travel to the peer's memory, not stay in a register or L1.

extern "C" __global__ void p2pc_store(volatile unsigned char *p, unsigned long long n,
                                      unsigned char value) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        p[i] = value;
    __threadfence_system();
}

extern "C" __global__ void p2pc_count(const volatile unsigned char *p, unsigned long long n,
                                      unsigned char value, unsigned long long *mismatches,
                                      unsigned long long *first_bad) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        if (p[i] != value) {
            atomicAdd(mismatches, 1ULL);
            atomicMin(first_bad, i);
        }
    }
}
