#!/usr/bin/env python3
"""p2pcheck benchmark: cold timings against a bare-CUDA floor and vLLM's way (gpu), or the
structure of a check on the simulated driver (sim). Python 3.8+, standard library only.

  bench.py gpu [--runs 5] [--warmup 1] [--carry .carry] [--variants a,b,..] [--budget S]
      On a GPU machine, from the repository root, with .carry/ holding p2pcheck,
      p2pcheck-worker, floor and vllm_style_reference.py (scripts/stage-carry.sh fills it).
      Every variant runs --runs times, interleaved (run 1 of each, then run 2 of each, ...),
      each a fresh process; every p2pcheck run gets a fresh, empty VLLM_CACHE_ROOT.
  bench.py sim [--p2pcheck PATH] [--sizes 1,2,4,8] [--engines default,vllm]
      No GPU: `p2pcheck --simulate N --json` with P2PCHECK_TRACE=1, and what the run did:
      processes, CUDA start-ups, contexts, resets, pairs in flight.

Prints one table at the end; progress goes to stderr. With $OUT set, raw values go to
$OUT/bench.tsv (round, variant, metric, value; written as they come, so a run cut short keeps
what it measured), p2pcheck's JSON lines to $OUT/bench-json.log, the stderr of failed runs to
$OUT/bench-fail.log and the table to $OUT/bench-table.txt. Every child has a deadline and is
killed (its whole process group) past it. All clocks are CLOCK_MONOTONIC (time.monotonic()),
the clock floor stamps its line with. See docs/bench.md.
"""
import argparse
import collections
import glob
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ["floor-one", "floor-all", "p2pcheck", "p2pcheck-copy", "p2pcheck-all", "p2pcheck-vllm",
            "p2pcheck-nocache", "reference", "warm-lookup"]
# p2pcheck-copy: vLLM's copy tier alone, so the time the kernel and handshake tiers add shows.
# p2pcheck-nocache: the default check with the driver's compute cache off, as in a fresh
# container: any JIT compilation of the kernels would show here.
P2P_FLAGS = {"p2pcheck": [], "p2pcheck-copy": ["--level", "copy"],
             "p2pcheck-all": ["--visibility", "all"], "p2pcheck-vllm": ["--engine", "vllm"],
             "p2pcheck-nocache": []}
P2P_ENV = {"p2pcheck-nocache": {"CUDA_CACHE_DISABLE": "1"}}
# Environment that would change what is measured; dropped from every child's environment.
NOISE = ("P2PCHECK_TRACE",)
REF_RE = re.compile(r"REFERENCE n_gpus=(\d+) seconds=([0-9.]+)")


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Starting and watching processes


class Proc:
    """One child: its output, when its first stdout line arrived, when it exited, how."""

    def __init__(self, popen):
        self.popen = popen
        self.pid = popen.pid
        self.out = bytearray()
        self.err = bytearray()
        self.first_line_t = None  # monotonic time its first stdout line had been read
        self.exit_t = None  # monotonic time its exit was seen
        self.rc = None  # exit code, -signal if killed; None while running
        self.maxrss_kb = None  # wait4's ru_maxrss: itself and its reaped descendants
        self.timed_out = False

    def first_line(self):
        i = self.out.find(b"\n")
        return self.out[:i].decode(errors="replace") if i >= 0 else None

    def stdout(self):
        return self.out.decode(errors="replace")

    def stderr(self):
        return self.err.decode(errors="replace")

    def status(self):
        if self.timed_out:
            return "timed out (killed)"
        return "exit %s" % self.rc if self.rc is None or self.rc >= 0 else "signal %d" % -self.rc


def _exitcode(status):
    if hasattr(os, "waitstatus_to_exitcode"):
        return os.waitstatus_to_exitcode(status)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _reap(pr, t, block=False):
    """Collects the child's status and rusage ourselves (Popen's wait has no rusage)."""
    try:
        pid, status, ru = os.wait4(pr.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # already collected: should not happen, but never hang on it
        pr.rc = -255 if pr.rc is None else pr.rc
        return True
    if pid == 0:
        return False
    pr.exit_t, pr.rc, pr.maxrss_kb = t, _exitcode(status), ru.ru_maxrss
    pr.popen.returncode = pr.rc  # so Popen never waits for it again
    return True


def run_group(specs, timeout, grace=1.0):
    """Starts every (argv, env) in `specs` in a tight loop and watches them all until they have
    exited and closed their pipes (or `grace` seconds after the last exit, for a descendant that
    keeps a pipe open), or until `timeout`: then every process group still running is killed.
    Returns (t0, procs), t0 the monotonic time just before the first Popen."""
    procs = []
    t0 = time.monotonic()
    try:
        for argv, env in specs:
            procs.append(Proc(subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True)))
    except OSError as e:
        for pr in procs:
            _kill(pr)
        raise BenchError("cannot start %s: %s" % (argv[0], e))
    sel = selectors.DefaultSelector()
    open_pipes = 0
    polled = []  # children without a pidfd: their exit is polled
    for pr in procs:
        for f, kind in ((pr.popen.stdout, "out"), (pr.popen.stderr, "err")):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ, (pr, kind))
            open_pipes += 1
        try:
            # A pidfd turns readable at exit: exit times without polling (Linux 5.3+).
            sel.register(os.pidfd_open(pr.pid), selectors.EVENT_READ, (pr, "exit"))
        except (AttributeError, OSError):
            polled.append(pr)
    deadline, settle = t0 + timeout, None
    try:
        while True:
            now = time.monotonic()
            if all(pr.rc is not None for pr in procs):
                if open_pipes == 0:
                    break
                settle = settle or now + grace
                if now >= settle:
                    break
            if now >= deadline:
                break
            wait = min(deadline, settle or deadline) - now
            if any(pr.rc is None for pr in polled):
                wait = min(wait, 0.0005)
            for key, _ in sel.select(max(wait, 0.0)):
                t = time.monotonic()
                pr, kind = key.data
                if kind == "exit":
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    if not _reap(pr, t):
                        polled.append(pr)
                    continue
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    open_pipes -= 1
                    continue
                if kind == "out":
                    if pr.first_line_t is None and b"\n" in chunk:
                        pr.first_line_t = t
                    pr.out += chunk
                else:
                    pr.err += chunk
            for pr in polled:
                if pr.rc is None:
                    _reap(pr, time.monotonic())
    finally:
        for pr in procs:
            if pr.rc is None:
                pr.timed_out = True
                _kill(pr)
        for key in list(sel.get_map().values()):
            if key.data[1] == "exit":
                os.close(key.fd)
        sel.close()
        for pr in procs:
            pr.popen.stdout.close()
            pr.popen.stderr.close()
    return t0, procs


def _kill(pr):
    """SIGKILL to the child's whole process group (its workers too), then collect it."""
    for kill in (lambda: os.killpg(pr.pid, signal.SIGKILL), lambda: os.kill(pr.pid, signal.SIGKILL)):
        try:
            kill()
            break
        except OSError:
            pass
    if pr.rc is None:
        _reap(pr, time.monotonic(), block=True)


def run_one(argv, env, timeout):
    t0, (pr,) = run_group([(argv, env)], timeout)
    return t0, pr


# ---------------------------------------------------------------------------------------------
# Output: raw values, the table


class Sink:
    """Raw values and logs under $OUT, each line flushed as written."""

    def __init__(self, out_dir):
        self.dir = out_dir
        self.files = {}
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.write("bench.tsv", "round\tvariant\tmetric\tvalue\n", mode="w")

    def write(self, name, text, mode="a"):
        if not self.dir:
            return
        if name not in self.files or mode == "w":
            self.files[name] = open(os.path.join(self.dir, name), mode)
        self.files[name].write(text)
        self.files[name].flush()

    def value(self, rnd, variant, metric, value):
        self.write("bench.tsv", "%s\t%s\t%s\t%s\n" % (rnd, variant, metric,
                                                       "?" if value is None else value))

    def failure(self, rnd, what, pr, extra=""):
        self.write("bench-fail.log", "==== round %s, %s: %s %s\n--- stdout\n%s\n--- stderr\n%s\n"
                   % (rnd, what, pr.status(), extra, pr.stdout()[-4000:], pr.stderr()[-8000:]))


def fmt(v, unit="", nd=3):
    return "?" if v is None else ("%.*f%s" % (nd, v, unit))


def median(vals):
    return statistics.median(vals) if vals else None


def table(header, rows):
    """Plain-text table; a row of None is a separator."""
    rows = [tuple(str(c) for c in r) if r is not None else None for r in rows]
    w = [max(len(r[i]) for r in [header] + [r for r in rows if r]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < len(r) - 1 else c for i, c in enumerate(r))
    sep = "  ".join("-" * x for x in w)
    return "\n".join([line(header), sep] + [line(r) if r else sep for r in rows])


def get(d, key):
    """A field of p2pcheck's JSON, or None (an older or newer binary may lack it)."""
    return d.get(key) if isinstance(d, dict) else None


def parse_json_line(text):
    """The JSON object on the first stdout line (or the whole stdout), else None."""
    if not text:
        return None
    for cand in (text.split("\n", 1)[0], text):
        try:
            v = json.loads(cand)
            return v if isinstance(v, dict) else None
        except ValueError:
            continue
    return None


def why(pr, extra=None):
    """The process's status, `extra`, and its first line of stderr (or stdout) that is not a
    trace line: the note shown for a failed run."""
    parts = [pr.status()] + ([extra] if extra else [])
    for ln in pr.stderr().splitlines() + pr.stdout().splitlines():
        if ln.strip() and not is_trace_line(ln):
            parts.append(ln.strip()[:160])
            break
    return ": ".join(parts)


# ---------------------------------------------------------------------------------------------
# Traces


def is_trace_line(line):
    return parse_trace_line(line) is not None


def parse_trace_line(line):
    """(pid, call) of one audit-trace line (one JSON object per line, see README "Audit
    trace"), or None for any other line."""
    s = line.strip()
    if not s.startswith("{"):
        return None
    try:
        d = json.loads(s)
    except ValueError:
        return None
    if isinstance(d, dict) and d.get("call"):
        pid = d.get("pid")
        return (str(pid) if pid is not None else "?", str(d["call"]))
    return None


def trace_summary(stderr_text):
    calls, pids = collections.Counter(), set()
    for ln in stderr_text.splitlines():
        t = parse_trace_line(ln)
        if t:
            pids.add(t[0])
            calls[t[1]] += 1
    return calls, pids


# ---------------------------------------------------------------------------------------------
# gpu mode


def visible_gpus():
    """UUIDs of the GPUs CUDA will show, in CUDA's order: nvidia-smi's list, narrowed and
    reordered by CUDA_VISIBLE_DEVICES (indices or UUIDs, also unique UUID prefixes; like CUDA,
    the list ends at the first entry that matches nothing or repeats one)."""
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError("nvidia-smi: %s" % e)
    if q.returncode != 0:
        raise BenchError("nvidia-smi exit %d: %s" % (q.returncode, q.stderr.strip()[:200]))
    rows = []
    for ln in q.stdout.splitlines():
        if "," in ln:
            i, u = ln.split(",", 1)
            rows.append((int(i.strip()), u.strip()))
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return [u for _, u in sorted(rows)]
    vis = []
    for tok in (t.strip() for t in cvd.split(",")):
        if tok.isdigit():
            match = [u for i, u in rows if i == int(tok)]
        else:
            match = [u for _, u in rows if u == tok] or \
                    [u for _, u in rows if tok.startswith("GPU-") and u.startswith(tok)]
        if len(match) != 1 or match[0] in vis:
            break
        vis.append(match[0])
    return vis


def handle_stamp(line):
    """The CLOCK_MONOTONIC seconds of floor's `handle <seconds>` line, else None."""
    parts = (line or "").split()
    try:
        return float(parts[1]) if len(parts) == 2 and parts[0] == "handle" else None
    except ValueError:
        return None


class Gpu:
    def __init__(self, args, sink):
        self.args, self.sink = args, sink
        c = args.carry
        self.floor = os.path.abspath(os.path.join(c, "floor"))
        self.p2p = os.path.abspath(os.path.join(c, "p2pcheck"))
        self.worker = os.path.abspath(os.path.join(c, "p2pcheck-worker"))
        self.ref = os.path.abspath(os.path.join(c, "vllm_style_reference.py"))
        self.env = {k: v for k, v in os.environ.items() if k not in NOISE}
        self.env["P2PCHECK_WORKER"] = self.worker
        self.vals = collections.defaultdict(dict)  # (variant, metric) -> {round: value}
        self.checks = collections.OrderedDict()  # name -> [ok, total, notes]
        self.notes = []
        self.cache_bytes = collections.defaultdict(list)  # source -> [bytes or None]
        self.visibility = collections.defaultdict(collections.Counter)
        self.tmp = []

    # --- bookkeeping
    def rec(self, rnd, variant, metric, value):
        self.sink.value(rnd, variant, metric, value)
        if isinstance(rnd, int) and value is not None:
            self.vals[(variant, metric)][rnd] = value

    def check(self, rnd, name, ok, note=None):
        c = self.checks.setdefault(name, [0, 0, []])
        if not str(rnd).startswith("w"):  # warm-up rounds only leave a note
            c[0] += bool(ok)
            c[1] += 1
        if note and note not in c[2]:
            c[2].append(note)

    def mktemp(self):
        d = tempfile.mkdtemp(prefix="p2pbench-")
        self.tmp.append(d)
        return d

    def cleanup(self):
        for d in self.tmp:
            shutil.rmtree(d, ignore_errors=True)
        self.tmp = []

    def cache_file(self, root):
        files = sorted(glob.glob(os.path.join(root, "gpu_p2p_access_cache_for_*.json")))
        if len(files) != 1:
            return None
        with open(files[0], "rb") as f:
            return f.read()

    # --- the variants
    def floor_run(self, rnd, kind):
        n = len(self.gpus)
        specs = []
        for k in range(2 * n):
            if kind == "one":
                specs.append(([self.floor, "0"], dict(self.env, CUDA_VISIBLE_DEVICES=self.gpus[k % n])))
            else:
                specs.append(([self.floor, str(k % n)], self.env))
        t0, procs = run_group(specs, self.args.timeout)
        variant = "floor-" + kind
        bad = [pr for pr in procs if pr.rc != 0 or handle_stamp(pr.first_line()) is None]
        self.check(rnd, variant + ": every process printed its handle, exit 0", not bad,
                   bad and why(bad[0]))
        if bad:
            self.sink.failure(rnd, variant, bad[0], "(%d of %d processes failed)" % (len(bad), len(procs)))
            log("[%s] %s: %d of %d processes failed: %s" % (rnd, variant, len(bad), len(procs),
                                                           why(bad[0])))
            return
        answer = max(pr.first_line_t for pr in procs) - t0
        stamped = max(handle_stamp(pr.first_line()) for pr in procs) - t0
        exit_ = max(pr.exit_t for pr in procs) - t0
        rss = max(pr.maxrss_kb for pr in procs)
        self.rec(rnd, variant, "answer_s", answer)
        self.rec(rnd, variant, "stamped_s", stamped)
        self.rec(rnd, variant, "exit_s", exit_)
        self.rec(rnd, variant, "max_rss_kb", rss)
        log("[%s] %s: %d processes, last handle %.3f s (stamped %.3f s), last exit %.3f s"
            % (rnd, variant, len(procs), answer, stamped, exit_))

    def p2p_run(self, rnd, variant):
        root = self.mktemp()
        env = dict(self.env, VLLM_CACHE_ROOT=root, **P2P_ENV.get(variant, {}))
        t0, pr = run_one([self.p2p, "--json"] + P2P_FLAGS[variant], env, self.args.timeout)
        shutil.rmtree(root, ignore_errors=True)
        d = parse_json_line(pr.first_line())
        self.sink.write("bench-json.log", "%s\t%s\t%s\n" % (rnd, variant, pr.first_line()))
        ok = pr.rc == 0 and get(d, "all_ok") is True
        self.check(rnd, variant + ": exit 0 and all_ok", ok,
                   None if ok else why(pr, "all_ok=%s" % get(d, "all_ok")))
        if not ok:
            self.sink.failure(rnd, variant, pr)
        if isinstance(rnd, int):
            self.visibility[variant][str(get(d, "visibility") or "?")] += 1
        # A check that ran to its verdicts (exit 1: some pair not ok, e.g. GPUs without P2P) is
        # still timed; one that could not check (exit 2, killed, no JSON) is not.
        done = pr.rc in (0, 1) and d is not None and "error" not in d
        answer = pr.first_line_t - t0 if (done and pr.first_line_t) else None
        whole = pr.exit_t - t0 if done else None
        self.rec(rnd, variant, "answer_s", answer)
        self.rec(rnd, variant, "whole_s", whole)
        for f in ("answer_s", "elapsed_s", "worker_max_rss_kb", "workers_started", "peak_in_flight"):
            v = get(d, f)
            self.rec(rnd, variant, "json_" + f,
                     v if done and isinstance(v, (int, float)) and not isinstance(v, bool) else None)
        self.rec(rnd, variant, "tree_max_rss_kb", pr.maxrss_kb if done else None)
        log("[%s] %s: %s, all_ok %s, answer %s s (own clock %s s), whole %s s"
            % (rnd, variant, pr.status(), get(d, "all_ok"), fmt(answer),
               fmt(get(d, "answer_s") if isinstance(get(d, "answer_s"), (int, float)) else None),
               fmt(whole)))

    def reference_run(self, rnd):
        d = self.mktemp()
        out = os.path.join(d, "ref.json")
        t0, pr = run_one([sys.executable, self.ref, out], self.env, self.args.ref_timeout)
        m = REF_RE.search(pr.stdout())
        ok = pr.rc == 0 and m is not None and os.path.exists(out)
        self.check(rnd, "reference: exit 0, REFERENCE line", ok, None if ok else why(pr))
        if not ok:
            self.sink.failure(rnd, "reference", pr)
        self.rec(rnd, "reference", "whole_s", pr.exit_t - t0 if ok else None)
        self.rec(rnd, "reference", "seconds", float(m.group(2)) if m else None)
        if ok:
            with open(out, "rb") as f:
                self.cache_bytes["reference"].append(f.read())
            if int(m.group(1)) != len(self.gpus):
                self.notes.append("reference saw %s GPUs, nvidia-smi/CUDA_VISIBLE_DEVICES %d"
                                  % (m.group(1), len(self.gpus)))
        shutil.rmtree(d, ignore_errors=True)
        log("[%s] reference: %s, whole %s s, seconds=%s" % (rnd, pr.status(), fmt(
            pr.exit_t - t0 if pr.exit_t else None), m.group(2) if m else "?"))

    def write_cache(self, rnd, source, flags):
        """p2pcheck --write-vllm-cache into a fresh root; returns the root (caller removes it)."""
        root = self.mktemp()
        env = dict(self.env, VLLM_CACHE_ROOT=root)
        t0, pr = run_one([self.p2p, "--write-vllm-cache"] + flags, env, self.args.timeout)
        data = self.cache_file(root)
        ok = pr.rc == 0 and data is not None
        self.check(rnd, "p2pcheck --write-vllm-cache %s: exit 0, one cache file"
                   % (" ".join(flags) or "(default engine)"), ok,
                   None if ok else why(pr))
        if not ok:
            self.sink.failure(rnd, "write-cache " + source, pr)
        self.cache_bytes[source].append(data)
        self.rec(rnd, "write-cache-" + source, "whole_s", pr.exit_t - t0 if ok else None)
        return root

    def warm_run(self, rnd, trace=False):
        root = self.write_cache(rnd, "default", [])
        env = dict(self.env, VLLM_CACHE_ROOT=root)
        if trace:
            env["P2PCHECK_TRACE"] = "1"
        t0, pr = run_one([self.p2p, "access-check", "0", "0"], env, self.args.timeout)
        answer = pr.stdout().strip()
        ok = pr.rc == 0 and answer in ("true", "false")
        name = "warm lookup (access-check 0 0): exit 0, prints true/false"
        if trace:
            calls, _ = trace_summary(pr.stderr())
            n = sum(calls.values())
            self.check(rnd, "warm lookup with P2PCHECK_TRACE=1: CUDA calls traced (must be 0)",
                       ok and n == 0, "%d traced" % n if ok else why(pr))
        else:
            self.check(rnd, name, ok, answer if ok else why(pr))
            self.rec(rnd, "warm-lookup", "whole_s", pr.exit_t - t0 if ok else None)
        if not ok:
            self.sink.failure(rnd, "warm-lookup" + (" (trace)" if trace else ""), pr)
        shutil.rmtree(root, ignore_errors=True)
        log("[%s] warm-lookup%s: %s, prints %r, whole %s s" % (
            rnd, " (traced)" if trace else "", pr.status(), answer[:20],
            fmt(pr.exit_t - t0 if pr.exit_t else None)))

    # --- the whole benchmark
    def run(self):
        args = self.args
        self.gpus = visible_gpus()
        if not self.gpus:
            raise BenchError("no visible GPU (nvidia-smi list narrowed by CUDA_VISIBLE_DEVICES=%r)"
                             % os.environ.get("CUDA_VISIBLE_DEVICES"))
        need = {"floor-one": self.floor, "floor-all": self.floor, "reference": self.ref}
        variants = []
        for v in args.variants:
            path = need.get(v, self.p2p)
            if not os.path.exists(path) or (v.startswith("p2pcheck") and not os.path.exists(self.worker)):
                missing = path if not os.path.exists(path) else self.worker
                self.notes.append("%s skipped: %s missing" % (v, missing))
            else:
                variants.append(v)
        version = "?"
        if os.path.exists(self.p2p):
            try:
                version = subprocess.run([self.p2p, "--version"], stdout=subprocess.PIPE,
                                         universal_newlines=True, timeout=30).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.head = ("p2pcheck bench (gpu): %d visible GPU(s), CUDA_VISIBLE_DEVICES=%s, %s; "
                     "%d run(s) + %d warm-up, interleaved" % (
                         len(self.gpus), os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
                         version, args.runs, args.warmup))
        log(self.head)
        self.sink.write("bench.tsv", "# %s\n# gpus %s\n" % (self.head, " ".join(self.gpus)))
        rounds = ["w%d" % i for i in range(1, args.warmup + 1)] + list(range(1, args.runs + 1))
        started, self.done = time.monotonic(), 0
        for rnd in rounds:
            if args.budget and time.monotonic() - started > args.budget:
                self.notes.append("stopped after %d measured round(s): --budget %g s spent"
                                  % (self.done, args.budget))
                break
            for v in variants:
                try:
                    if v.startswith("floor-"):
                        self.floor_run(rnd, v[len("floor-"):])
                    elif v in P2P_FLAGS:
                        self.p2p_run(rnd, v)
                    elif v == "reference":
                        self.reference_run(rnd)
                    elif v == "warm-lookup":
                        self.warm_run(rnd)
                except BenchError as e:
                    self.check(rnd, v + ": started", False, str(e))
                    log("[%s] %s: %s" % (rnd, v, e))
                self.cleanup()
            self.done += isinstance(rnd, int)
        self.variants = variants
        self.final_checks(variants)
        return self.render()

    def final_checks(self, variants):
        """Once, after the timed rounds: cache bytes of both engines vs the reference, the
        warm lookup's trace, leftover workers."""
        if os.path.exists(self.p2p) and os.path.exists(self.worker):
            try:
                if not self.cache_bytes["default"]:
                    self.write_cache("x", "default", [])
                self.write_cache("x", "vllm", ["--engine", "vllm"])
                if "warm-lookup" in variants:
                    self.warm_run("x", trace=True)
            except BenchError as e:
                self.notes.append(str(e))
            self.cleanup()
        srcs = [("default engine", "default"), ("--engine vllm", "vllm"), ("reference", "reference")]
        seen = {k: self.cache_bytes[k] for _, k in srcs}
        missing = [name for name, k in srcs if not seen[k] or any(b is None for b in seen[k])]
        distinct = {b for k in seen for b in seen[k] if b is not None}
        verdict = "DIFFERENT" if len(distinct) > 1 else "identical" if not missing else \
            "INCOMPLETE" if distinct else "MISSING"
        self.cache_verdict = (verdict, "files compared: default %d, vllm %d, reference %d%s" % (
            len(seen["default"]), len(seen["vllm"]), len(seen["reference"]),
            "; missing or unwritten: " + ", ".join(missing) if missing else ""))
        if len(distinct) > 1 and self.sink.dir:
            for i, b in enumerate(sorted(distinct)):
                self.sink.write("bench-cache-variant-%d.json" % i, b.decode(errors="replace"), "w")
        time.sleep(0.5)  # let a worker that is still exiting finish
        try:
            q = subprocess.run(["pgrep", "-c", "-x", "p2pcheck-worker"], stdout=subprocess.PIPE,
                               universal_newlines=True, timeout=10)
            self.leftover = q.stdout.strip() or "?"
        except (OSError, subprocess.TimeoutExpired):
            self.leftover = "? (no pgrep)"

    def series(self, variant, metric):
        d = self.vals.get((variant, metric), {})
        return [d[r] for r in sorted(d)], d

    def render(self):
        rows = []
        fl, _ = self.series("floor-one", "answer_s")
        base = median(fl)

        def timed(label, variant, metric, ratio=True):
            if variant not in self.variants:
                rows.append((label, "not run", "", ""))
                return
            vals, _ = self.series(variant, metric)
            m = median(vals)
            r = "%.2f" % (m / base) if (ratio and m is not None and base) else ""
            failed = self.done - len(vals)
            allv = " ".join("%.3f" % v for v in vals) + (" (%d missing)" % failed if failed > 0 and vals else "")
            rows.append((label, fmt(m, " s"), r, allv or "-"))

        def speedup(label, num, den):
            _, a = self.series(*num)
            _, b = self.series(*den)
            vals = [a[r] / b[r] for r in sorted(a) if r in b and b[r] > 0]
            rows.append((label, fmt(median(vals), "x", 2), "", " ".join("%.2f" % v for v in vals) or "-"))

        def rss(label, variant, metric, base_kb):
            if variant not in self.variants:
                rows.append((label, "not run", "", ""))
                return
            vals, _ = self.series(variant, metric)
            m = median(vals)
            r = "%.2f" % (m / base_kb) if (m is not None and base_kb) else ""
            rows.append((label, fmt(m / 1024 if m is not None else None, " MB", 1), r,
                         " ".join("%.1f" % (v / 1024) for v in vals) or "-"))

        timed("floor-one: last handle read (answer)", "floor-one", "answer_s")
        timed("floor-one: last exit", "floor-one", "exit_s")
        timed("floor-all: last handle read (answer)", "floor-all", "answer_s")
        timed("floor-all: last exit", "floor-all", "exit_s")
        for v, name in (("p2pcheck", "p2pcheck"), ("p2pcheck-copy", "p2pcheck --level copy"),
                        ("p2pcheck-all", "p2pcheck --visibility all"),
                        ("p2pcheck-vllm", "p2pcheck --engine vllm"),
                        ("p2pcheck-nocache", "p2pcheck, CUDA_CACHE_DISABLE=1")):
            timed(name + ": answer (JSON line read)", v, "answer_s")
            timed(name + ": answer_s (its own clock)", v, "json_answer_s")
            timed(name + ": whole process", v, "whole_s")
        timed("reference: whole process", "reference", "whole_s")
        timed("reference: its seconds=", "reference", "seconds")
        timed("warm lookup (access-check 0 0): whole", "warm-lookup", "whole_s")
        rows.append(None)
        speedup("reference whole / p2pcheck whole", ("reference", "whole_s"), ("p2pcheck", "whole_s"))
        speedup("reference whole / p2pcheck answer", ("reference", "whole_s"), ("p2pcheck", "answer_s"))
        speedup("p2pcheck answer: no compute cache / cache warm", ("p2pcheck-nocache", "answer_s"),
                ("p2pcheck", "answer_s"))
        speedup("p2pcheck answer: default / --level copy", ("p2pcheck", "answer_s"),
                ("p2pcheck-copy", "answer_s"))
        rows.append(None)
        fr, _ = self.series("floor-one", "max_rss_kb")
        fbase = median(fr)
        rss("peak RSS: floor process (max of 2N)", "floor-one", "max_rss_kb", fbase)
        rss("peak RSS: p2pcheck worker (worker_max_rss_kb)", "p2pcheck", "json_worker_max_rss_kb", fbase)
        rss("peak RSS: p2pcheck and reaped workers (wait4)", "p2pcheck", "tree_max_rss_kb", fbase)
        rows.append(None)
        for name, (ok, total, notes) in self.checks.items():
            rows.append(("check: " + name, "%d/%d" % (ok, total) if total else "-", "",
                         "; ".join(notes)[:200]))
        for v, c in self.visibility.items():
            rows.append(("check: %s visibility (JSON)" % v, " ".join(
                "%s x%d" % kv for kv in sorted(c.items())), "", ""))
        rows.append(("check: vLLM cache bytes: default engine, --engine vllm, reference",
                     self.cache_verdict[0], "", self.cache_verdict[1]))
        rows.append(("check: leftover p2pcheck-worker processes (expect 0)", self.leftover, "", ""))
        out = [self.head, "", table(("what", "median", "ratio to floor-one", "all values"), rows)]
        out.append("ratio: median over the floor-one median (time to answer; RSS rows: to the floor "
                   "process's RSS). Speedups: median of per-round ratios.")
        out += ["note: " + n for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# sim mode


def saw_text(workers):
    """"8 x 1 GPU, 2 x 8 GPUs" from the JSON's workers list."""
    if not isinstance(workers, list) or not workers:
        return "?"
    c = collections.Counter(w.get("saw") if isinstance(w, dict) else None for w in workers)
    parts = []
    for saw, k in sorted(c.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0)):
        parts.append("%d x %s" % (k, "? GPUs" if saw is None else "%s GPU%s" % (saw, "" if saw == 1 else "s")))
    return ", ".join(parts)


def sim_mode(args, sink):
    p2p = args.p2pcheck
    if p2p is None:
        for cand in (".carry/p2pcheck", "target/release/p2pcheck", shutil.which("p2pcheck")):
            if cand and os.path.exists(cand):
                p2p = cand
                break
    if not p2p or not os.path.exists(p2p):
        raise BenchError("no p2pcheck binary (give --p2pcheck PATH)")
    p2p = os.path.abspath(p2p)
    env = {k: v for k, v in os.environ.items() if k not in NOISE and k != "CUDA_VISIBLE_DEVICES"}
    env["P2PCHECK_TRACE"] = "1"
    rows, notes = [], []
    for n in args.sizes:
        for engine in args.engines:
            flags = [] if engine == "default" else ["--engine", engine]
            argv = [p2p, "--simulate", str(n), "--json"] + flags
            try:
                t0, pr = run_one(argv, env, args.timeout)
            except BenchError as e:
                notes.append("%s N=%d: %s" % (engine, n, e))
                continue
            d = parse_json_line(pr.first_line())
            calls, pids = trace_summary(pr.stderr())
            ctx_calls = {c: k for c, k in calls.items()
                         if c == "cudaSetDevice" or c == "cuDevicePrimaryCtxRetain" or c.startswith("cuCtxCreate")}
            reset_calls = {c: k for c, k in calls.items()
                           if c == "cudaDeviceReset" or c.startswith("cuDevicePrimaryCtxReset")}
            sink.write("bench-json.log", "sim\t%s\t%d\t%s\n" % (engine, n, pr.first_line()))
            sink.write("bench-sim-calls.log", "%s N=%d: %s\n" % (engine, n, json.dumps(dict(calls))))
            ok = pr.rc == 0 and get(d, "all_ok") is True
            if not ok:
                notes.append("%s N=%d: %s" % (engine, n, why(pr, "all_ok=%s" % get(d, "all_ok"))))
                sink.failure("sim-%d" % n, engine, pr)
            traced = sum(calls.values()) if (ok or calls) else "?"
            count = lambda k: k if traced != "?" else "?"
            num = lambda f, nd=3: fmt(get(d, f), "", nd) if isinstance(get(d, f), (int, float)) and \
                not isinstance(get(d, f), bool) else "?"
            row = (
                "%s%s" % (engine, "" if get(d, "engine") in (None, engine) else " (%s)" % get(d, "engine")),
                n, pr.status() + (", all_ok" if ok else ""),
                num("workers_started", 0), count(len(pids)), count(calls.get("cuInit", 0)),
                saw_text(get(d, "workers")), count(sum(ctx_calls.values())),
                count(sum(reset_calls.values())), num("peak_in_flight", 0), num("elapsed_s"),
                num("answer_s"), fmt(pr.exit_t - t0), traced)
            rows.append(row)
            for metric, v in zip(("status", "workers_started", "trace_pids", "cuInit", "saw",
                                  "contexts", "resets", "peak_in_flight", "elapsed_s", "answer_s",
                                  "wall_s", "traced_calls"), row[2:]):
                sink.value("sim-%d" % n, engine, metric, v)
            log("sim N=%d %s: %s" % (n, engine, " | ".join(str(c) for c in row[2:])))
    header = ("engine", "N", "result", "procs", "pids", "cuInit", "each saw", "contexts",
              "resets", "peak", "elapsed_s", "answer_s", "wall_s", "calls")
    out = ["p2pcheck bench (sim): %s, P2PCHECK_TRACE=1, CUDA_VISIBLE_DEVICES unset" % p2p, "",
           table(header, rows),
           "procs: processes started (JSON workers_started); pids: distinct worker pids in the "
           "trace; cuInit: CUDA start-ups traced;",
           "each saw: devices each start-up saw (JSON workers); contexts: cudaSetDevice + "
           "cuDevicePrimaryCtxRetain + cuCtxCreate* calls traced;",
           "resets: cudaDeviceReset + cuDevicePrimaryCtxReset* calls; peak: most pairs in flight "
           "at once (JSON peak_in_flight);",
           "elapsed_s, answer_s: p2pcheck's JSON; wall_s: the process, measured here; calls: trace "
           "lines. '?': not in p2pcheck's JSON / no trace."]
    out += ["note: " + x for x in notes]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def csv_list(conv):
    return lambda s: [conv(x) for x in s.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode")
    g = sub.add_parser("gpu", help="cold timings on the GPU machine")
    g.add_argument("--runs", type=int, default=5, help="measured runs of each variant [5]")
    g.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first [1]")
    g.add_argument("--carry", default=".carry", help="folder with the binaries [.carry]")
    g.add_argument("--variants", type=csv_list(str), default=VARIANTS,
                   help="comma-separated subset of: " + ",".join(VARIANTS))
    g.add_argument("--budget", type=float, default=None,
                   help="start no new round after this many seconds")
    g.add_argument("--timeout", type=float, default=120.0, help="deadline per process [120]")
    g.add_argument("--ref-timeout", type=float, default=300.0, help="deadline for the reference [300]")
    s = sub.add_parser("sim", help="structure on the simulated driver (no GPU)")
    s.add_argument("--p2pcheck", default=None,
                   help="the binary [.carry/p2pcheck, else target/release/p2pcheck, else PATH]")
    s.add_argument("--sizes", type=csv_list(int), default=[1, 2, 4, 8], help="GPU counts [1,2,4,8]")
    s.add_argument("--engines", type=csv_list(str), default=["default", "vllm"],
                   help="'default' (no --engine flag) or engine names for --engine [default,vllm]")
    s.add_argument("--timeout", type=float, default=120.0, help="deadline per process [120]")
    args = ap.parse_args()
    if args.mode is None:
        ap.print_help()
        return 2
    if args.mode == "gpu":
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad or args.runs < 1 or args.warmup < 0:
            ap.error("bad --variants %s / --runs / --warmup" % ",".join(bad))
    sink = Sink(os.environ.get("OUT") or None)
    try:
        text = Gpu(args, sink).run() if args.mode == "gpu" else sim_mode(args, sink)
    except BenchError as e:
        print("bench.py: %s" % e, file=sys.stderr)
        return 2
    print(text, flush=True)
    sink.write("bench-table.txt", text + "\n", "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
