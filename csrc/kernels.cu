// GPU kernels of p2pcheck's kernel and handshake tiers: SM-issued loads and stores through a
// CUDA IPC mapping of a peer's memory (what custom all-reduce kernels do), and a ping-pong of
// kernels resident at the same time in two processes (how they synchronise), as opposed to
// the copy-engine memset/memcpy of vLLM's test. Compiled by scripts/gen-kernels.sh into the
// committed csrc/kernels.fatbin (SASS per architecture, PTX as the fallback), which the
// library embeds, so the build needs no nvcc and the driver needs no JIT on listed GPUs. The
// simulated driver (csrc/sim.c) implements the same kernels by name, with the same pattern.
// volatile: every access must really travel to the memory, not stay in a register or L1.

typedef unsigned long long u64;
typedef unsigned int u32;

// The byte expected at offset o for a seed: a hash, so that a store to a wrong address, a lost
// page or a stale buffer shows as wrong bytes, unlike a constant fill.
__device__ __forceinline__ unsigned char pat(u64 o, u64 seed) {
    u64 x = o + seed * 0x9E3779B97F4A7C15ull;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (unsigned char)x;
}

// Stores the pattern for `seed` into [p, p+n) with SM stores of `width` bytes (1, 4, 8, 16),
// word i going to offset (i*width + shift) % n. shift is 0 except under the test-only planted
// fault, which must then be caught.
extern "C" __global__ void p2pc_pattern_store(unsigned char *p, u64 n, u64 seed, u32 width,
                                              u64 shift) {
    u64 words = n / width;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < words;
         i += (u64)gridDim.x * blockDim.x) {
        u64 o = i * width;
        u64 at = (o + shift) % n;
        if (width == 1) {
            *(volatile unsigned char *)(p + at) = pat(o, seed);
        } else if (width == 4) {
            u32 v = 0;
            for (int k = 0; k < 4; k++) v |= (u32)pat(o + k, seed) << (8 * k);
            *(volatile u32 *)(p + at) = v;
        } else if (width == 8) {
            u64 v = 0;
            for (int k = 0; k < 8; k++) v |= (u64)pat(o + k, seed) << (8 * k);
            *(volatile u64 *)(p + at) = v;
        } else {
            u32 w[4];
            for (int q = 0; q < 4; q++) {
                w[q] = 0;
                for (int k = 0; k < 4; k++) w[q] |= (u32)pat(o + 4 * q + k, seed) << (8 * k);
            }
            // One 16-byte store (volatile uint4 has no assignment in CUDA C++).
            asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p + at),
                         "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                         : "memory");
        }
    }
    __threadfence_system();
}

__device__ __forceinline__ void count_byte(unsigned char got, u64 o, u64 seed, u64 old_seed,
                                           u64 *counters) {
    if (got != pat(o, seed)) {
        atomicAdd(&counters[0], 1ull);
        atomicMin(&counters[1], o);
        if (got == pat(o, old_seed)) atomicAdd(&counters[2], 1ull);
    }
}

// Loads every byte of [p, p+n) with SM loads of `width` bytes and counts those that differ
// from the pattern for `seed`: counters = [wrong, first bad offset, wrong but equal to the
// pattern for `old_seed` (the old contents: a write that never arrived)].
extern "C" __global__ void p2pc_pattern_check(const unsigned char *p, u64 n, u64 seed,
                                              u64 old_seed, u32 width, u64 *counters) {
    u64 words = n / width;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < words;
         i += (u64)gridDim.x * blockDim.x) {
        u64 o = i * width;
        if (width == 1) {
            count_byte(*(const volatile unsigned char *)(p + o), o, seed, old_seed, counters);
        } else if (width == 4) {
            u32 v = *(const volatile u32 *)(p + o);
            for (int k = 0; k < 4; k++)
                count_byte((unsigned char)(v >> (8 * k)), o + k, seed, old_seed, counters);
        } else if (width == 8) {
            u64 v = *(const volatile u64 *)(p + o);
            for (int k = 0; k < 8; k++)
                count_byte((unsigned char)(v >> (8 * k)), o + k, seed, old_seed, counters);
        } else {
            u32 w[4];
            asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                         : "l"(p + o)
                         : "memory");
            for (int q = 0; q < 4; q++)
                for (int k = 0; k < 4; k++)
                    count_byte((unsigned char)(w[q] >> (8 * k)), o + 4 * q + k, seed, old_seed,
                               counters);
        }
    }
}

__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ u32 load_acquire(const u32 *p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void store_release(u32 *p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Waits until *flag == want or the deadline passes (on the GPU's own clock); true if it came.
__device__ bool wait_flag(const u32 *flag, u32 want, u64 deadline) {
    while (load_acquire(flag) != want)
        if (now_ns() > deadline) return false;
    return true;
}

// One side of a ping-pong between kernels resident at the same time in two processes, through
// `area` (2048 bytes of the owner's memory): flag_c at +0, flag_p at +128, payload_c (256 bytes)
// at +256, payload_p at +1024. Role 1, the driver (through the IPC mapping), writes its payload
// and releases flag_c = r, then acquires flag_p == r and checks the answer; role 0, the server
// (the owner), the other way round. Every wait ends at start + budget_ns on the GPU clock.
// out = [rounds done, payload bytes wrong, timed out, elapsed ns]. One thread.
extern "C" __global__ void p2pc_handshake(unsigned char *area, u32 rounds, u32 role, u64 seed,
                                          u64 budget_ns, u64 *out) {
    u32 *flag_c = (u32 *)(area + 0);
    u32 *flag_p = (u32 *)(area + 128);
    volatile unsigned char *payload_c = area + 256;
    volatile unsigned char *payload_p = area + 1024;
    u64 start = now_ns();
    u64 deadline = start + budget_ns;
    u64 done = 0, errors = 0, timed_out = 0;
    for (u32 r = 1; r <= rounds; r++) {
        u64 base = (u64)r * 512;
        if (role == 1) {
            for (int j = 0; j < 256; j++) payload_c[j] = pat(base + j, seed);
            store_release(flag_c, r);
            if (!wait_flag(flag_p, r, deadline)) {
                timed_out = 1;
                break;
            }
            for (int j = 0; j < 256; j++) errors += payload_p[j] != pat(base + 256 + j, seed);
        } else {
            if (!wait_flag(flag_c, r, deadline)) {
                timed_out = 1;
                break;
            }
            for (int j = 0; j < 256; j++) errors += payload_c[j] != pat(base + j, seed);
            for (int j = 0; j < 256; j++) payload_p[j] = pat(base + 256 + j, seed);
            store_release(flag_p, r);
        }
        done++;
    }
    out[0] = done;
    out[1] = errors;
    out[2] = timed_out;
    out[3] = now_ns() - start;
}

// ---- Bandwidth and latency (p2pcheck --bandwidth) ----------------------------------------------

// Copies n16 16-byte words src -> dst with SM loads and stores (what an all-reduce kernel does
// through a peer's mapping): grid-stride, four independent loads in flight per thread before
// their stores, so that a remote link is kept busy without depending on occupancy alone.
// Launched with a grid of every SM's resident blocks (shim.c), one wave.
extern "C" __global__ void p2pc_copy(uint4 *dst, const uint4 *src, u64 n16) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = __ldcg(src + i);
        uint4 b = __ldcg(src + i + stride);
        uint4 c = __ldcg(src + i + 2 * stride);
        uint4 d = __ldcg(src + i + 3 * stride);
        __stcg(dst + i, a);
        __stcg(dst + i + stride, b);
        __stcg(dst + i + 2 * stride, c);
        __stcg(dst + i + 3 * stride, d);
    }
    for (; i < n16; i += stride) __stcg(dst + i, __ldcg(src + i));
}

// Holds its stream until the host releases flag[0] (a memset on another stream) or budget_ns
// pass on the GPU clock, so that the timed work queued behind it starts back to back, without
// the host's launch overhead in the figure (nvbandwidth's method). flag[1] = 1: released by the
// host; 2: the deadline came first (the queueing took longer than the budget: the figure may
// hold launch gaps); with two spins on one flag (both ways at once) the worse. One thread.
extern "C" __global__ void p2pc_spin(u32 *flag, u64 budget_ns) {
    u64 deadline = now_ns() + budget_ns;
    u32 how = 2;
    for (;;) {
        if (*(volatile u32 *)flag != 0) {
            how = 1;
            break;
        }
        if (now_ns() > deadline) break;
    }
    atomicMax(flag + 1, how);
}

// Writes a pointer chase into [p, p + slots*stride): the u64 at slot k holds the byte offset of
// slot k+1 (the last one's points back to slot 0). Grid-stride over the slots.
extern "C" __global__ void p2pc_chain(unsigned char *p, u64 slots, u64 stride) {
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < slots;
         k += (u64)gridDim.x * blockDim.x)
        *(u64 *)(p + k * stride) = ((k + 1) % slots) * stride;
    __threadfence_system();
}

// Latency: one thread follows the chain p2pc_chain wrote, one dependent 8-byte load after
// another (each waits for the last: nothing overlaps), first `warm` hops untimed (TLB and the
// owner's L2 warmed), then `hops` hops timed on the GPU clock. out = [ns for the timed hops,
// the offset reached (keeps the loads live; the host checks it against the chain)].
extern "C" __global__ void p2pc_chase(const unsigned char *p, u64 warm, u64 hops, u64 *out) {
    u64 o = 0;
    for (u64 h = 0; h < warm; h++) o = *(const volatile u64 *)(p + o);
    u64 start = now_ns();
    for (u64 h = 0; h < hops; h++) o = *(const volatile u64 *)(p + o);
    u64 end = now_ns();
    out[0] = end - start;
    out[1] = o;
}
