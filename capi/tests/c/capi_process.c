/*
 * The C ABI inside a host's process: threads, fork, the host's own children, its environment
 * and its name. tests/capi.rs runs each mode on the simulated driver (4 GPUs, the worker from
 * P2PCHECK_WORKER) and asserts every "key: value" line it prints.
 *
 *   capi_process cancel       a wait in one thread, cancelled from another
 *   capi_process fork FILE    a child of fork() calls every kind of function on inherited
 *                             handles (its stderr goes to FILE)
 *   capi_process bystander    a child of this program that p2pcheck did not start lives
 *                             through checks with hang and crash faults
 *   capi_process reload SIM   a failed libcuda load, then P2PCHECK_LIBCUDA=SIM: loaded
 *   capi_process noworker     no worker anywhere: this program (call it p2pcheck) is not one
 *
 * Run with --p2pcheck-worker as its first argument, it writes "ran as a worker" to the file
 * $P2PCHECK_TEST_MARKER: p2pcheck must never do that.
 */

#define _POSIX_C_SOURCE 200809L

#include "p2pcheck.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char msg[2048];

static void stm(const char *key, p2pcheck_status status) {
    printf("%s: %d\n%s.msg: %s\n", key, (int)status, key, msg);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void sleep_ms(long ms) {
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&t, NULL);
}

/* Options for a check that cannot end by itself within the test: 0->1 hangs and a step may
   take a minute. */
static p2pcheck_options *hanging(void) {
    p2pcheck_options *o = p2pcheck_options_new();
    if (p2pcheck_options_set_simulation(o, 4, "0->1:hang", msg, sizeof msg) != 0 ||
        p2pcheck_options_set_timeouts_ms(o, 60000, 0, msg, sizeof msg) != 0) {
        printf("options: %s\n", msg);
        exit(1);
    }
    return o;
}

/* ---- cancel ---------------------------------------------------------------------------- */

struct waiter {
    p2pcheck_pending *p;
    uint64_t timeout_ms; /* 0: p2pcheck_pending_wait */
    p2pcheck_status status;
    p2pcheck_report *out;
    double returned;
    char msg[256];
};

static void *wait_thread(void *arg) {
    struct waiter *w = arg;
    w->status = w->timeout_ms ? p2pcheck_pending_wait_ms(w->p, w->timeout_ms, &w->out, w->msg,
                                                         sizeof w->msg)
                              : p2pcheck_pending_wait(w->p, &w->out, w->msg, sizeof w->msg);
    w->returned = now_ms();
    return NULL;
}

static int cancel_mode(void) {
    p2pcheck_options *o = hanging();
    p2pcheck_pending *p = NULL;
    p2pcheck_report *r = NULL;
    struct waiter w[2];
    pthread_t t[2];
    double before, cancelled, returned;
    int i;
    stm("start", p2pcheck_start(o, NULL, NULL, 0, &p, msg, sizeof msg));
    /* A bounded wait waits its time, then says the check still runs. */
    before = now_ms();
    stm("wait_ms.200", p2pcheck_pending_wait_ms(p, 200, &r, msg, sizeof msg));
    printf("wait_ms.200.waited_ms: %.1f\n", now_ms() - before);
    printf("wait_ms.200.out: %s\n", r ? "non-null" : "null");
    /* Two threads wait, one without a limit, one with an hour's; this one cancels. */
    for (i = 0; i < 2; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].p = p;
        w[i].timeout_ms = i == 0 ? 0 : 3600000;
        pthread_create(&t[i], NULL, wait_thread, &w[i]);
    }
    sleep_ms(300);
    cancelled = now_ms();
    printf("cancel: %d\n", (int)p2pcheck_pending_cancel(p));
    returned = now_ms();
    printf("cancel.returned_ms: %.3f\n", returned - cancelled);
    for (i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        printf("waiter.%d: %d %s\n", i, (int)w[i].status, w[i].msg);
        printf("waiter.%d.out: %s\n", i, w[i].out ? "non-null" : "null");
        printf("waiter.%d.after_cancel_ms: %.3f\n", i, w[i].returned - cancelled);
    }
    stm("wait.again", p2pcheck_pending_wait(p, &r, msg, sizeof msg));
    before = now_ms();
    p2pcheck_pending_free(p);
    printf("free_ms: %.1f\n", now_ms() - before);
    p2pcheck_options_free(o);
    return 0;
}

/* ---- fork ------------------------------------------------------------------------------ */

/* What the child does with the parent's handles: every call answers at once. */
static void fork_child(p2pcheck_options *o, p2pcheck_report *r, p2pcheck_pending *p,
                       const char *err_file) {
    p2pcheck_report *out = NULL;
    size_t n = 0;
    double start = now_ms();
    int fd = open(err_file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || dup2(fd, 2) < 0) {
        _exit(3);
    }
    printf("child.pids: %ld %ld\n", (long)getppid(), (long)getpid());
    stm("child.try_wait", p2pcheck_pending_try_wait(p, &out, msg, sizeof msg));
    stm("child.wait_ms", p2pcheck_pending_wait_ms(p, 60000, &out, msg, sizeof msg));
    stm("child.wait", p2pcheck_pending_wait(p, &out, msg, sizeof msg));
    printf("child.cancel: %d\n", (int)p2pcheck_pending_cancel(p));
    printf("child.pair_count: %d\n", (int)p2pcheck_report_pair_count(r, &n));
    stm("child.set_level", p2pcheck_options_set_level(o, P2PCHECK_LEVEL_COPY, msg, sizeof msg));
    stm("child.check", p2pcheck_check(o, NULL, NULL, 0, &out, msg, sizeof msg));
    printf("child.out: %s\n", out ? "non-null" : "null");
    p2pcheck_pending_free(p);
    p2pcheck_report_free(r);
    p2pcheck_options_free(o);
    printf("child.frees: done\n");
    printf("child.ms: %.3f\n", now_ms() - start);
    fflush(stdout);
    _exit(0);
}

static int fork_mode(const char *err_file) {
    static const uint32_t src[] = {2}, tgt[] = {3};
    p2pcheck_options *o = hanging();
    p2pcheck_pending *p = NULL;
    p2pcheck_report *r = NULL;
    size_t n = 0;
    pid_t child;
    int status = 0, waited = 0;
    stm("check", p2pcheck_check(o, src, tgt, 1, &r, msg, sizeof msg));
    stm("start", p2pcheck_start(o, NULL, NULL, 0, &p, msg, sizeof msg));
    fflush(stdout);
    child = fork();
    if (child == 0) {
        fork_child(o, r, p, err_file);
    }
    /* Up to 10 s for the child to end (it takes microseconds), then it is killed. */
    while (waited < 1000 && waitpid(child, &status, WNOHANG) == 0) {
        sleep_ms(10);
        waited++;
    }
    if (waited == 1000) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        printf("child: hung\n");
    }
    printf("child.exit: %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    /* The parent's handles are its own still. */
    printf("parent.pair_count: %d", (int)p2pcheck_report_pair_count(r, &n));
    printf(" %zu\n", n);
    stm("parent.try_wait", p2pcheck_pending_try_wait(p, &r, msg, sizeof msg));
    printf("parent.cancel: %d\n", (int)p2pcheck_pending_cancel(p));
    stm("parent.wait", p2pcheck_pending_wait(p, &r, msg, sizeof msg));
    p2pcheck_pending_free(p);
    p2pcheck_report_free(r);
    p2pcheck_options_free(o);
    return 0;
}

/* ---- bystander ------------------------------------------------------------------------- */

/* Whether `pid` is a child of this process that has not exited: it is still ours to reap. */
static const char *child_state(pid_t pid) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
        return "not a child any more (reaped by someone else)";
    }
    return info.si_pid == 0 ? "alive, not reaped" : "exited, not reaped";
}

static int bystander_mode(void) {
    static const uint32_t src[] = {0, 1, 2}, tgt[] = {1, 0, 2};
    p2pcheck_options *o = p2pcheck_options_new();
    p2pcheck_report *r = NULL;
    p2pcheck_pending *p = NULL;
    int status = 0, engine;
    pid_t bystander = fork();
    if (bystander == 0) {
        for (;;) {
            pause();
        }
    }
    printf("bystander.before: %s\n", child_state(bystander));
    stm("faults", p2pcheck_options_set_simulation(o, 4, "0->1:hang,1->0:crash", msg,
                                                  sizeof msg));
    stm("timeouts", p2pcheck_options_set_timeouts_ms(o, 300, 0, msg, sizeof msg));
    for (engine = 0; engine < 2; engine++) {
        char key[64];
        p2pcheck_options_set_engine(o, (p2pcheck_engine)engine, msg, sizeof msg);
        snprintf(key, sizeof key, "check.%d", engine);
        stm(key, p2pcheck_check(o, src, tgt, 3, &r, msg, sizeof msg));
        p2pcheck_report_free(r);
        r = NULL;
        printf("bystander.after_check.%d: %s\n", engine, child_state(bystander));
    }
    stm("start", p2pcheck_start(o, src, tgt, 3, &p, msg, sizeof msg));
    sleep_ms(200);
    printf("cancel: %d\n", (int)p2pcheck_pending_cancel(p));
    p2pcheck_pending_free(p);
    printf("bystander.after_cancel: %s\n", child_state(bystander));
    /* Still ours: this program ends it and reaps it. */
    kill(bystander, SIGTERM);
    printf("bystander.reaped: %d\n", waitpid(bystander, &status, 0) == bystander);
    printf("bystander.signal: %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : -1);
    p2pcheck_options_free(o);
    return 0;
}

/* ---- reload ---------------------------------------------------------------------------- */

static int reload_mode(const char *sim) {
    bool b = false;
    setenv("P2PCHECK_LIBCUDA", "/nonexistent/libcuda.so.1", 1);
    stm("missing", p2pcheck_gpu_p2p_access_check(0, 1, &b, msg, sizeof msg));
    stm("missing.again", p2pcheck_gpu_p2p_access_check(0, 1, &b, msg, sizeof msg));
    setenv("P2PCHECK_LIBCUDA", sim, 1);
    stm("fixed", p2pcheck_gpu_p2p_access_check(0, 1, &b, msg, sizeof msg));
    printf("fixed.answer: %d\n", b);
    stm("fixed.1_0", p2pcheck_gpu_p2p_access_check(1, 0, &b, msg, sizeof msg));
    printf("fixed.1_0.answer: %d\n", b);
    return 0;
}

/* ---- noworker -------------------------------------------------------------------------- */

static int noworker_mode(void) {
    p2pcheck_options *o = p2pcheck_options_new();
    p2pcheck_report *r = NULL;
    stm("sim", p2pcheck_options_set_simulation(o, 2, NULL, msg, sizeof msg));
    stm("check", p2pcheck_check(o, NULL, NULL, 0, &r, msg, sizeof msg));
    printf("check.out: %s\n", r ? "non-null" : "null");
    p2pcheck_report_free(r);
    p2pcheck_options_free(o);
    return 0;
}

/* ---- access ---------------------------------------------------------------------------- */

/* gpu_p2p_access_check(0, 1) with the cache folder DIR, on 2 simulated GPUs whose 0->1 drops
 * its writes: the machine's answer is false. */
static int access_mode(const char *dir) {
    p2pcheck_options *o = p2pcheck_options_new();
    bool b = true;
    stm("sim", p2pcheck_options_set_simulation(o, 2, "0->1:drop-writes", msg, sizeof msg));
    stm("access", p2pcheck_access_check_with(o, dir, false, 0, 1, &b, msg, sizeof msg));
    printf("access.answer: %s\n", b ? "true" : "false");
    p2pcheck_options_free(o);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "--p2pcheck-worker") == 0) {
        const char *marker = getenv("P2PCHECK_TEST_MARKER");
        FILE *f = marker ? fopen(marker, "a") : NULL;
        if (f) {
            fputs("ran as a worker\n", f);
            fclose(f);
        }
        return 3;
    }
    if (argc == 2 && strcmp(argv[1], "cancel") == 0) {
        return cancel_mode();
    }
    if (argc == 3 && strcmp(argv[1], "fork") == 0) {
        return fork_mode(argv[2]);
    }
    if (argc == 2 && strcmp(argv[1], "bystander") == 0) {
        return bystander_mode();
    }
    if (argc == 3 && strcmp(argv[1], "reload") == 0) {
        return reload_mode(argv[2]);
    }
    if (argc == 2 && strcmp(argv[1], "noworker") == 0) {
        return noworker_mode();
    }
    if (argc == 3 && strcmp(argv[1], "access") == 0) {
        return access_mode(argv[2]);
    }
    fprintf(stderr, "usage: capi_process cancel | fork FILE | bystander | reload SIM | "
                    "noworker | access DIR\n");
    return 2;
}
