/*
 * Calls every function of p2pcheck.h and prints what it gave, one "key: value" line per fact;
 * tests/capi.rs runs it (linked with libp2pcheck.a, and with libp2pcheck.so) on the simulated
 * driver and asserts every line.
 *
 *   capi_test main DIR   options, the check, reports, errors, vLLM's functions with a cache in
 *                        DIR, the background check, the policy (4 simulated GPUs, 0->1 broken)
 *   capi_test warm DIR   the cache DIR written by "main" answers with no worker at all
 *   capi_test env        the default options on the simulator named by the environment
 *                        (P2PCHECK_LIBCUDA, P2PCHECK_SIM_GPUS=2, VLLM_CACHE_ROOT)
 */

#define _POSIX_C_SOURCE 200809L

#include "p2pcheck.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char msg[2048];

/* The message buffer, filled with 'X' so that a call that writes nothing shows. */
static char *m(void) {
    memset(msg, 'X', sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    return msg;
}

/* A status and the message the call wrote. */
static void stm(const char *key, p2pcheck_status status) {
    printf("%s: %d\n", key, (int)status);
    printf("%s.msg: %s\n", key, msg);
}

/* A status alone. */
static void st(const char *key, p2pcheck_status status) {
    printf("%s: %d\n", key, (int)status);
}

/* Text with its newlines written as "\n", so that it stays on one line. */
static void text_line(const char *key, const char *text) {
    printf("%s: ", key);
    for (; *text; text++) {
        if (*text == '\n') {
            fputs("\\n", stdout);
        } else {
            putchar(*text);
        }
    }
    putchar('\n');
}

static void print_pair(const char *key, const p2pcheck_pair_result *p) {
    printf("%s: %u->%u ok=%d verdict=%d copy=%d kernel=%d handshake=%d failed_tier=%d "
           "diagnosis=%d attempts=%u claim=%d persistable=%d\n",
           key, p->src, p->tgt, p->ok, p->verdict, p->copy, p->kernel, p->handshake,
           p->failed_tier, p->diagnosis, p->attempts, p->driver_claim, p->persistable);
}

/* Every pair of a report, with its details. */
static void print_report(const char *key, const p2pcheck_report *r) {
    uint32_t devices = 0;
    size_t pairs = 0, i;
    char name[64], details[4096];
    snprintf(name, sizeof name, "%s.device_count", key);
    st(name, p2pcheck_report_device_count(r, &devices));
    printf("%s.devices: %u\n", key, devices);
    snprintf(name, sizeof name, "%s.pair_count", key);
    st(name, p2pcheck_report_pair_count(r, &pairs));
    printf("%s.pairs: %zu\n", key, pairs);
    for (i = 0; i < pairs; i++) {
        p2pcheck_pair_result p;
        size_t needed = 12345;
        memset(&p, 0xAB, sizeof p);
        snprintf(name, sizeof name, "%s.pair.%zu", key, i);
        if (p2pcheck_report_pair(r, i, &p) != P2PCHECK_STATUS_OK) {
            printf("%s: failed\n", name);
        }
        print_pair(name, &p);
        snprintf(name, sizeof name, "%s.details.%zu", key, i);
        if (p2pcheck_report_pair_details(r, i, details, sizeof details, &needed) !=
                P2PCHECK_STATUS_OK ||
            needed != strlen(details)) {
            printf("%s: failed\n", name);
        }
        text_line(name, details);
    }
}

static int main_mode(const char *dir) {
    static const uint32_t src3[] = {0, 1, 2}, tgt3[] = {1, 0, 2};
    static const uint32_t nine[] = {9}, zero[] = {0}, seven[] = {7};
    p2pcheck_options *o;
    p2pcheck_report *r, *stale;
    p2pcheck_pending *p;
    p2pcheck_pair_result pair;
    bool results[3], b = false;
    char small[16], path[4096];
    size_t needed = 0, count = 0;
    int transport = -1;
    uint32_t u = 0;
    uint64_t bytes = 0;
    double seconds = 0;
    int s, c;

    /* Versions and texts. */
    printf("version: %s\n", p2pcheck_version());
    printf("protocol: %u\n", p2pcheck_protocol_version());
    for (s = -1; s <= 16; s++) {
        printf("status_text.%d: %s\n", s, p2pcheck_status_text((p2pcheck_status)s));
    }
    for (c = -1; c <= 7; c++) {
        printf("class_name.%d: %s\n", c, p2pcheck_class_name((p2pcheck_class)c));
        printf("class_hint.%d: %s\n", c, p2pcheck_class_hint((p2pcheck_class)c));
    }

    /* Options: every setter, its range checks and NULL. */
    o = p2pcheck_options_new();
    printf("options_new: %s\n", o ? "non-null" : "null");
    stm("set_engine.null", p2pcheck_options_set_engine(NULL, P2PCHECK_ENGINE_VLLM, m(), sizeof msg));
    stm("set_engine.7", p2pcheck_options_set_engine(o, (p2pcheck_engine)7, m(), sizeof msg));
    stm("set_engine.vllm", p2pcheck_options_set_engine(o, P2PCHECK_ENGINE_VLLM, m(), sizeof msg));
    stm("set_engine.parallel",
        p2pcheck_options_set_engine(o, P2PCHECK_ENGINE_PARALLEL, m(), sizeof msg));
    stm("set_level.3", p2pcheck_options_set_level(o, (p2pcheck_level)3, m(), sizeof msg));
    stm("set_level.none", p2pcheck_options_set_level(o, P2PCHECK_LEVEL_NONE, m(), sizeof msg));
    stm("set_level.handshake",
        p2pcheck_options_set_level(o, P2PCHECK_LEVEL_HANDSHAKE, m(), sizeof msg));
    stm("set_visibility.2",
        p2pcheck_options_set_visibility(o, (p2pcheck_visibility)2, m(), sizeof msg));
    stm("set_visibility.all",
        p2pcheck_options_set_visibility(o, P2PCHECK_VISIBILITY_ALL, m(), sizeof msg));
    stm("set_visibility.one",
        p2pcheck_options_set_visibility(o, P2PCHECK_VISIBILITY_ONE, m(), sizeof msg));
    stm("set_transport.3",
        p2pcheck_options_set_transport(o, (p2pcheck_transports)3, m(), sizeof msg));
    stm("set_transport.ipc",
        p2pcheck_options_set_transport(o, P2PCHECK_TRANSPORTS_IPC, m(), sizeof msg));
    stm("set_timeouts.day_and_1ms",
        p2pcheck_options_set_timeouts_ms(o, 86400001, 0, m(), sizeof msg));
    stm("set_timeouts", p2pcheck_options_set_timeouts_ms(o, 5000, 60000, m(), sizeof msg));
    stm("set_timeouts.keep", p2pcheck_options_set_timeouts_ms(o, 0, 0, m(), sizeof msg));
    stm("set_kernel_bytes.1000", p2pcheck_options_set_kernel_bytes(o, 1000, m(), sizeof msg));
    stm("set_kernel_bytes", p2pcheck_options_set_kernel_bytes(o, 256 * 1024, m(), sizeof msg));
    stm("set_worker.empty", p2pcheck_options_set_worker(o, "", m(), sizeof msg));
    stm("set_simulation.no_gpus",
        p2pcheck_options_set_simulation(o, 0, "0->1:hang", m(), sizeof msg));
    stm("set_simulation.melt",
        p2pcheck_options_set_simulation(o, 4, "0->1:melt", m(), sizeof msg));
    stm("set_simulation.gpu9",
        p2pcheck_options_set_simulation(o, 4, "9->0:hang", m(), sizeof msg));
    stm("set_simulation.65", p2pcheck_options_set_simulation(o, 65, NULL, m(), sizeof msg));
    stm("set_simulation.off", p2pcheck_options_set_simulation(o, 0, NULL, m(), sizeof msg));
    /* Messages cut to the buffer, at a character boundary: the 14-byte buffer holds 13 bytes
       of text, the 13th being the first byte of a 2-byte character, so 12 are written. */
    memset(small, 'X', sizeof small);
    s = p2pcheck_options_set_simulation(o, 4, "0->1:\xc3\xa9\xc3\xa9", small, 14);
    printf("cut.utf8: %d %zu %s\n", s, strlen(small), small);
    memset(small, 'X', sizeof small);
    s = p2pcheck_options_set_simulation(o, 4, "0->1:melt", small, 10);
    printf("cut.ascii: %d %zu %s\n", s, strlen(small), small);
    memset(small, 'X', sizeof small);
    s = p2pcheck_options_set_simulation(o, 4, "0->1:melt", small, 1);
    printf("cut.one: %d %zu\n", s, strlen(small));
    memset(small, 'X', sizeof small);
    s = p2pcheck_options_set_simulation(o, 4, "0->1:melt", small, 0);
    printf("cut.zero: %d %c\n", s, small[0]);
    st("cut.null", p2pcheck_options_set_simulation(o, 4, "0->1:melt", NULL, 100));
    stm("set_simulation",
        p2pcheck_options_set_simulation(o, 4, " 0->1:drop-writes , ", m(), sizeof msg));
    stm("set_worker.missing",
        p2pcheck_options_set_worker(o, "/nonexistent/p2pcheck-worker", m(), sizeof msg));
    r = (p2pcheck_report *)&stale;
    stm("check.worker_missing", p2pcheck_check(o, NULL, NULL, 0, &r, m(), sizeof msg));
    printf("check.worker_missing.out: %s\n", r ? "non-null" : "null");
    stm("set_worker.search", p2pcheck_options_set_worker(o, NULL, m(), sizeof msg));

    /* The whole matrix: 0->1 drops writes, the other 15 pairs work. */
    r = NULL;
    stm("check", p2pcheck_check(o, NULL, NULL, 0, &r, m(), sizeof msg));
    print_report("report", r);
    st("report.answer_seconds", p2pcheck_report_answer_seconds(r, &seconds));
    printf("report.answer_positive: %d\n", seconds > 0 && seconds < 60);
    st("report.restarts", p2pcheck_report_restarts(r, &u));
    printf("report.restarts.value: %u\n", u);
    st("report.workers_started", p2pcheck_report_workers_started(r, &u));
    printf("report.workers_started.value: %u\n", u);
    st("report.warning_count", p2pcheck_report_warning_count(r, &count));
    printf("report.warning_count.value: %zu\n", count);
    st("report.warning.0", p2pcheck_report_warning(r, 0, small, sizeof small, &needed));
    st("report.pair.16", p2pcheck_report_pair(r, 16, &pair));
    st("report.pair_transport.0", p2pcheck_report_pair_transport(r, 0, &transport));
    printf("report.pair_transport.0.value: %d\n", transport);
    st("report.pair_transport.16", p2pcheck_report_pair_transport(r, 16, &transport));
    st("report.pair_transport.null_out", p2pcheck_report_pair_transport(r, 0, NULL));
    st("report.pair.null_out", p2pcheck_report_pair(r, 0, NULL));
    st("report.pair.null_report", p2pcheck_report_pair(NULL, 0, &pair));
    st("report.device_count.null", p2pcheck_report_device_count(NULL, &u));
    st("report.device_count.null_out", p2pcheck_report_device_count(r, NULL));
    st("report.pair_count.null", p2pcheck_report_pair_count(NULL, &count));
    st("report.answer_seconds.null", p2pcheck_report_answer_seconds(NULL, &seconds));
    st("report.restarts.null", p2pcheck_report_restarts(NULL, &u));
    st("report.workers_started.null", p2pcheck_report_workers_started(NULL, &u));
    st("report.warning_count.null", p2pcheck_report_warning_count(NULL, &count));
    st("report.warning.null", p2pcheck_report_warning(NULL, 0, small, sizeof small, &needed));
    /* Details into buffers too small, and the size query. */
    memset(small, 'X', sizeof small);
    needed = 0;
    s = p2pcheck_report_pair_details(r, 1, small, sizeof small, &needed);
    printf("details.small: %d %zu %zu %s\n", s, strlen(small), needed, small);
    needed = 0;
    s = p2pcheck_report_pair_details(r, 1, NULL, 0, &needed);
    printf("details.query: %d %zu\n", s, needed);
    {
        char *exact = (char *)malloc(needed + 1);
        size_t again = 0;
        s = p2pcheck_report_pair_details(r, 1, exact, needed + 1, &again);
        printf("details.exact: %d %zu %zu\n", s, strlen(exact), again);
        s = p2pcheck_report_pair_details(r, 1, exact, needed, NULL);
        printf("details.one_short: %d %zu\n", s, strlen(exact));
        free(exact);
    }
    st("details.null_buf", p2pcheck_report_pair_details(r, 1, NULL, 5, &needed));
    st("details.16", p2pcheck_report_pair_details(r, 16, small, sizeof small, &needed));
    needed = 99;
    s = p2pcheck_report_pair_details(r, 0, small, sizeof small, &needed);
    printf("details.ok_pair: %d %zu '%s'\n", s, needed, small);
    st("details.null_report", p2pcheck_report_pair_details(NULL, 0, small, sizeof small, NULL));
    p2pcheck_report_free(r);

    /* Bad input to the check. */
    r = (p2pcheck_report *)&stale;
    stm("check.device9", p2pcheck_check(o, nine, zero, 1, &r, m(), sizeof msg));
    printf("check.device9.out: %s\n", r ? "non-null" : "null");
    stm("check.null_src", p2pcheck_check(o, NULL, zero, 1, &r, m(), sizeof msg));
    stm("check.null_tgt", p2pcheck_check(o, zero, NULL, 1, &r, m(), sizeof msg));
    stm("check.null_out", p2pcheck_check(o, NULL, NULL, 0, NULL, m(), sizeof msg));
    stm("check.too_many", p2pcheck_check(o, zero, zero, 65537, &r, m(), sizeof msg));

    /* The rest at the kernel level: no handshake to time out. */
    stm("set_level.kernel", p2pcheck_options_set_level(o, P2PCHECK_LEVEL_KERNEL, m(), sizeof msg));

    /* A batch, as vLLM's can_actually_p2p. */
    results[0] = results[1] = results[2] = false;
    stm("can", p2pcheck_can_actually_p2p(o, src3, tgt3, 3, results, m(), sizeof msg));
    printf("can.results: %d %d %d\n", results[0], results[1], results[2]);
    stm("can.empty", p2pcheck_can_actually_p2p(o, NULL, NULL, 0, NULL, m(), sizeof msg));
    stm("can.null_results", p2pcheck_can_actually_p2p(o, src3, tgt3, 3, NULL, m(), sizeof msg));
    stm("can.null_src", p2pcheck_can_actually_p2p(o, NULL, tgt3, 3, results, m(), sizeof msg));
    stm("can.device7", p2pcheck_can_actually_p2p(o, zero, seven, 1, results, m(), sizeof msg));

    /* gpu_p2p_access_check with a cache folder, and the cache file's path. */
    stm("access.0_1", p2pcheck_access_check_with(o, dir, false, 0, 1, &b, m(), sizeof msg));
    printf("access.0_1.answer: %d\n", b);
    stm("access.1_0", p2pcheck_access_check_with(o, dir, false, 1, 0, &b, m(), sizeof msg));
    printf("access.1_0.answer: %d\n", b);
    stm("access.9_0", p2pcheck_access_check_with(o, dir, false, 9, 0, &b, m(), sizeof msg));
    stm("access.empty_dir", p2pcheck_access_check_with(o, "", false, 0, 1, &b, m(), sizeof msg));
    stm("access.null_result",
        p2pcheck_access_check_with(o, dir, false, 0, 1, NULL, m(), sizeof msg));
    stm("cache_path", p2pcheck_cache_path(4, dir, path, sizeof path, &needed, m(), sizeof msg));
    printf("cache_path.value: %s\n", path);
    printf("cache_path.needed: %d\n", needed == strlen(path));
    stm("cache_path.small", p2pcheck_cache_path(4, dir, small, 10, &needed, m(), sizeof msg));
    printf("cache_path.small.value: %zu %d\n", strlen(small), needed == strlen(path));
    stm("cache_path.0", p2pcheck_cache_path(0, dir, path, sizeof path, NULL, m(), sizeof msg));
    stm("cache_path.257",
        p2pcheck_cache_path(257, dir, path, sizeof path, NULL, m(), sizeof msg));
    stm("cache_path.empty_dir",
        p2pcheck_cache_path(4, "", path, sizeof path, NULL, m(), sizeof msg));
    stm("cache_path.null_buf", p2pcheck_cache_path(4, dir, NULL, 5, NULL, m(), sizeof msg));

    /* In the background. */
    p = NULL;
    stm("start", p2pcheck_start(o, NULL, NULL, 0, &p, m(), sizeof msg));
    r = (p2pcheck_report *)&stale;
    stm("try_wait.running", p2pcheck_pending_try_wait(p, &r, m(), sizeof msg));
    printf("try_wait.running.out: %s\n", r ? "non-null" : "null");
    st("try_wait.null_out", p2pcheck_pending_try_wait(p, NULL, NULL, 0));
    r = (p2pcheck_report *)&stale;
    stm("wait_ms.running", p2pcheck_pending_wait_ms(p, 1, &r, m(), sizeof msg));
    printf("wait_ms.running.out: %s\n", r ? "non-null" : "null");
    stm("wait", p2pcheck_pending_wait(p, &r, m(), sizeof msg));
    print_report("background", r);
    {
        /* The result is kept: every wait gives a new copy of the same report. */
        p2pcheck_report *again = NULL, *third = NULL;
        stm("try_wait.again", p2pcheck_pending_try_wait(p, &again, m(), sizeof msg));
        stm("wait_ms.again", p2pcheck_pending_wait_ms(p, 0, &third, m(), sizeof msg));
        printf("again.new: %d %d\n", again != r && again != NULL, third != r && third != again);
        print_report("again", again);
        p2pcheck_report_free(again);
        p2pcheck_report_free(third);
    }
    p2pcheck_report_free(r);
    stm("wait.again", p2pcheck_pending_wait(p, &r, m(), sizeof msg));
    p2pcheck_report_free(r);
    st("cancel.finished", p2pcheck_pending_cancel(p));
    stm("wait.after_cancel", p2pcheck_pending_wait_ms(p, UINT64_MAX, &r, m(), sizeof msg));
    p2pcheck_report_free(r);
    st("wait_ms.null_out", p2pcheck_pending_wait_ms(p, 0, NULL, NULL, 0));
    p2pcheck_pending_free(p);
    printf("pending_free: done\n");

    stm("start.cancel", p2pcheck_start(o, NULL, NULL, 0, &p, m(), sizeof msg));
    st("cancel", p2pcheck_pending_cancel(p));
    stm("wait.cancelled", p2pcheck_pending_wait(p, &r, m(), sizeof msg));
    printf("wait.cancelled.out: %s\n", r ? "non-null" : "null");
    stm("try_wait.cancelled", p2pcheck_pending_try_wait(p, &r, m(), sizeof msg));
    st("cancel.again", p2pcheck_pending_cancel(p));
    p2pcheck_pending_free(p);

    /* A check's error is kept too: every wait gives it again. */
    stm("start.device9", p2pcheck_start(o, nine, zero, 1, &p, m(), sizeof msg));
    stm("wait.device9", p2pcheck_pending_wait(p, &r, m(), sizeof msg));
    stm("wait.device9.again", p2pcheck_pending_wait(p, &r, m(), sizeof msg));
    stm("try_wait.device9", p2pcheck_pending_try_wait(p, &r, m(), sizeof msg));
    p2pcheck_pending_free(p);

    stm("start.unwaited", p2pcheck_start(o, src3, tgt3, 3, &p, m(), sizeof msg));
    p2pcheck_pending_free(p);
    printf("pending_free.unwaited: done\n");

    p = (p2pcheck_pending *)&stale;
    stm("start.null_src", p2pcheck_start(o, NULL, zero, 1, &p, m(), sizeof msg));
    printf("start.null_src.out: %s\n", p ? "non-null" : "null");
    stm("start.null_out", p2pcheck_start(o, NULL, NULL, 0, NULL, m(), sizeof msg));
    stm("try_wait.null", p2pcheck_pending_try_wait(NULL, &r, m(), sizeof msg));
    stm("wait.null", p2pcheck_pending_wait(NULL, &r, m(), sizeof msg));
    stm("wait_ms.null", p2pcheck_pending_wait_ms(NULL, 0, &r, m(), sizeof msg));
    st("cancel.null", p2pcheck_pending_cancel(NULL));

    /* The bandwidth measurement: two GPUs whose 0->1 runs through the host (20 GB/s). */
    {
        static const uint32_t bsrc[] = {0, 1}, btgt[] = {1, 0};
        p2pcheck_options *ob = p2pcheck_options_new();
        p2pcheck_bandwidth bw;
        size_t i;
        printf("bw.layout: %zu %zu %zu %zu %zu\n", sizeof(p2pcheck_bandwidth),
               _Alignof(p2pcheck_bandwidth), offsetof(p2pcheck_bandwidth, floor_gbps),
               offsetof(p2pcheck_bandwidth, cv), offsetof(p2pcheck_bandwidth, latency_ns));
        stm("set_bandwidth.null",
            p2pcheck_options_set_bandwidth(NULL, true, 0, 0, m(), sizeof msg));
        stm("set_bandwidth.1000",
            p2pcheck_options_set_bandwidth(ob, true, 1000, 0, m(), sizeof msg));
        stm("bw.set_simulation",
            p2pcheck_options_set_simulation(ob, 2, "0->1:slow", m(), sizeof msg));
        stm("bw.set_timeouts", p2pcheck_options_set_timeouts_ms(ob, 60000, 0, m(), sizeof msg));
        stm("set_bandwidth",
            p2pcheck_options_set_bandwidth(ob, true, 2u << 20, 0, m(), sizeof msg));
        r = NULL;
        stm("bw.check", p2pcheck_check(ob, bsrc, btgt, 2, &r, m(), sizeof msg));
        for (i = 0; i < 2; i++) {
            char name[32];
            memset(&bw, 0xAB, sizeof bw);
            snprintf(name, sizeof name, "bw.pair.%zu", i);
            st(name, p2pcheck_report_pair_bandwidth(r, i, &bw));
            printf("%s.value: state=%d slow=%d floor=%.1f ce_write=%.0f ce_read=%.0f "
                   "sm_both=%.0f cv=%d latency=%d\n",
                   name, bw.state, bw.slow, bw.floor_gbps, bw.gbps[0], bw.gbps[1], bw.gbps[5],
                   bw.cv[0] >= 0 && bw.cv[0] < 0.03, bw.latency_ns > 0);
        }
        st("bw.pair.2", p2pcheck_report_pair_bandwidth(r, 2, &bw));
        st("bw.pair.null_out", p2pcheck_report_pair_bandwidth(r, 0, NULL));
        st("bw.pair.null_report", p2pcheck_report_pair_bandwidth(NULL, 0, &bw));
        p2pcheck_report_free(r);
        p2pcheck_options_free(ob);
    }

    /* The all-reduce policy. */
    printf("should.8_64k: %d\n", p2pcheck_should_nccl_symm_mem_allreduce(8, 65536, false, true));
    printf("should.8_1m: %d\n", p2pcheck_should_nccl_symm_mem_allreduce(8, 1 << 20, false, true));
    printf("should.8_1m_invariant: %d\n",
           p2pcheck_should_nccl_symm_mem_allreduce(8, 1 << 20, true, true));
    printf("should.8_1m_disabled: %d\n",
           p2pcheck_should_nccl_symm_mem_allreduce(8, 1 << 20, false, false));
    printf("should.2_1m: %d\n", p2pcheck_should_nccl_symm_mem_allreduce(2, 1 << 20, false, true));
    printf("should.4_16k: %d\n", p2pcheck_should_nccl_symm_mem_allreduce(4, 16384, false, true));
    printf("should.4_32k: %d\n", p2pcheck_should_nccl_symm_mem_allreduce(4, 32768, false, true));
    printf("should.16_1k: %d\n", p2pcheck_should_nccl_symm_mem_allreduce(16, 1024, false, true));
    bytes = 0;
    st("custom.9_0_8", p2pcheck_custom_allreduce_max_size(9, 0, 8, &bytes));
    printf("custom.9_0_8.value: %llu\n", (unsigned long long)bytes);
    st("custom.10_3_6", p2pcheck_custom_allreduce_max_size(10, 3, 6, &bytes));
    printf("custom.10_3_6.value: %llu\n", (unsigned long long)bytes);
    st("custom.9_0_3", p2pcheck_custom_allreduce_max_size(9, 0, 3, &bytes));
    st("custom.null", p2pcheck_custom_allreduce_max_size(9, 0, 8, NULL));
    st("symm.10_0_6", p2pcheck_symm_mem_max_size(10, 0, 6, &bytes));
    printf("symm.10_0_6.value: %llu\n", (unsigned long long)bytes);
    st("symm.7_5_8", p2pcheck_symm_mem_max_size(7, 5, 8, &bytes));
    st("symm.null", p2pcheck_symm_mem_max_size(10, 0, 6, NULL));
    {
        bool invariant = true, symm = false;
        stm("policy_env", p2pcheck_policy_config_from_env(&invariant, &symm, m(), sizeof msg));
        printf("policy_env.value: %d %d\n", invariant, symm);
        setenv("VLLM_BATCH_INVARIANT", "maybe", 1);
        stm("policy_env.bad", p2pcheck_policy_config_from_env(&invariant, &symm, m(), sizeof msg));
        unsetenv("VLLM_BATCH_INVARIANT");
        stm("policy_env.null", p2pcheck_policy_config_from_env(NULL, &symm, m(), sizeof msg));
    }

    p2pcheck_options_free(o);
    p2pcheck_options_free(NULL);
    p2pcheck_report_free(NULL);
    p2pcheck_pending_free(NULL);
    printf("free_null: done\n");
    return 0;
}

/* The cache written by main_mode answers the same check (the same simulated machine, its fault
   and the kernel tier's bytes included: the fingerprint records them): the worker does not
   exist, so nothing runs. */
static int warm_mode(const char *dir) {
    p2pcheck_options *o = p2pcheck_options_new();
    bool b = true;
    stm("warm.sim", p2pcheck_options_set_simulation(o, 4, "0->1:drop-writes", m(), sizeof msg));
    stm("warm.level", p2pcheck_options_set_level(o, P2PCHECK_LEVEL_KERNEL, m(), sizeof msg));
    stm("warm.kernel_bytes", p2pcheck_options_set_kernel_bytes(o, 256 * 1024, m(), sizeof msg));
    stm("warm.worker",
        p2pcheck_options_set_worker(o, "/nonexistent/p2pcheck-worker", m(), sizeof msg));
    stm("warm.0_1", p2pcheck_access_check_with(o, dir, false, 0, 1, &b, m(), sizeof msg));
    printf("warm.0_1.answer: %d\n", b);
    stm("warm.2_3", p2pcheck_access_check_with(o, dir, false, 2, 3, &b, m(), sizeof msg));
    printf("warm.2_3.answer: %d\n", b);
    stm("warm.refresh", p2pcheck_access_check_with(o, dir, true, 0, 1, &b, m(), sizeof msg));
    p2pcheck_options_free(o);
    return 0;
}

/* The default options, on the simulator the environment names. */
static int env_mode(void) {
    static const uint32_t src[] = {1, 0}, tgt[] = {0, 1};
    bool results[2] = {true, false}, b = false;
    char path[4096];
    uint32_t i, j;
    for (i = 0; i < 2; i++) {
        for (j = 0; j < 2; j++) {
            char key[32];
            snprintf(key, sizeof key, "env.access.%u_%u", i, j);
            stm(key, p2pcheck_gpu_p2p_access_check(i, j, &b, m(), sizeof msg));
            printf("%s.answer: %d\n", key, b);
        }
    }
    stm("env.access.2_0", p2pcheck_gpu_p2p_access_check(2, 0, &b, m(), sizeof msg));
    stm("env.access.null", p2pcheck_gpu_p2p_access_check(0, 1, NULL, m(), sizeof msg));
    stm("env.can", p2pcheck_can_actually_p2p(NULL, src, tgt, 2, results, m(), sizeof msg));
    printf("env.can.results: %d %d\n", results[0], results[1]);
    stm("env.cache_path", p2pcheck_cache_path(2, NULL, path, sizeof path, NULL, m(), sizeof msg));
    printf("env.cache_path.value: %s\n", path);
    {
        /* Single-GPU visibility cannot be planned without /proc/driver/nvidia: a warning. */
        p2pcheck_report *r = NULL;
        size_t count = 0, needed = 0;
        char warning[1024];
        stm("env.check", p2pcheck_check(NULL, src, tgt, 1, &r, m(), sizeof msg));
        print_report("env.report", r);
        st("env.warning_count", p2pcheck_report_warning_count(r, &count));
        printf("env.warning_count.value: %zu\n", count);
        st("env.warning.0", p2pcheck_report_warning(r, 0, warning, sizeof warning, &needed));
        printf("env.warning.0.value: %d %s\n", needed == strlen(warning), warning);
        st("env.warning.small", p2pcheck_report_warning(r, 0, warning, 8, NULL));
        printf("env.warning.small.value: %s\n", warning);
        p2pcheck_report_free(r);
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "main") == 0) {
        return main_mode(argv[2]);
    }
    if (argc == 3 && strcmp(argv[1], "warm") == 0) {
        return warm_mode(argv[2]);
    }
    if (argc == 2 && strcmp(argv[1], "env") == 0) {
        return env_mode();
    }
    fprintf(stderr, "usage: capi_test main DIR | warm DIR | env\n");
    return 2;
}
