"""p2pcheck: proves, with real memory traffic across processes, which ordered pairs of NVIDIA
GPUs can reach each other's memory, the way vLLM, SGLang and TensorRT-LLM rely on it.

The wheel carries p2pcheck's shared library (used through ctypes), its worker and its CLI:
nothing of Rust is needed here, and nothing links against CUDA (a machine without a GPU gets
a P2PCheckError, never a crash).

    import p2pcheck
    report = p2pcheck.check()                      # every pair of the visible GPUs
    report = p2pcheck.check(simulate=4, faults=["0->1:drop-writes"])  # no GPU needed
    p2pcheck.gpu_p2p_access_check(0, 1)            # vLLM's function, vLLM's cache file
    p2pcheck.can_actually_p2p([0, 1], [1, 0])      # vLLM's function
    pending = p2pcheck.start()                     # in the background; pending.wait()
    p2pcheck.env().environ()                       # {"NCCL_P2P_DISABLE": "1", ...} or {}
    p2pcheck.vllm.prepare(); p2pcheck.sglang.prepare()   # the engines' verified caches

Options, as keyword arguments everywhere: engine ("parallel", or "vllm": vLLM's procedure
exactly), level ("copy", "kernel", "handshake": default), visibility ("one", "all"), timeout
and startup_timeout (seconds), kernel_bytes, worker (default: the one in this package),
simulate (a GPU count: the built-in simulated driver) and faults ("SRC->TGT:KIND[@once]").
"""

import ctypes
import json
import os
import subprocess
from typing import Any, List, Optional, Sequence, Tuple

from . import _native
from ._native import cli_path, worker_path
from ._types import (
    Advice,
    CacheWrite,
    Cause,
    Level,
    P2PCheckError,
    PairResult,
    Report,
    Setting,
    TierResult,
    Verdict,
)

__all__ = [
    "Advice",
    "CacheWrite",
    "Cause",
    "Level",
    "P2PCheckError",
    "PairResult",
    "Pending",
    "Report",
    "Setting",
    "TierResult",
    "Verdict",
    "access_check",
    "can_actually_p2p",
    "check",
    "cli_path",
    "env",
    "gpu_p2p_access_check",
    "run_cli",
    "sglang",
    "start",
    "version",
    "vllm",
    "worker_path",
]

__version__ = "0.1.0"


def version() -> str:
    """The bundled library's version (the same as the package's)."""
    return _native.library().p2pcheck_version().decode()


def _run(what: str, pairs: Optional[Sequence[Tuple[int, int]]], options: dict) -> int:
    """Calls p2pcheck_check or p2pcheck_start (`what`) on `pairs` with `options`: the handle
    it gives (a report or a pending check)."""
    src, tgt, n = _native.pair_arrays(pairs)
    with _native.Options(**options) as opts:
        out = ctypes.c_void_p()
        msg = _native.message_buffer()
        call = getattr(_native.library(), f"p2pcheck_{what}")
        status = call(opts.handle, src, tgt, n, ctypes.byref(out), msg, len(msg))
        _native.raise_for(status, msg, what)
    return out.value


def check(pairs: Optional[Sequence[Tuple[int, int]]] = None, **options: Any) -> Report:
    """Checks `pairs` ((src, tgt) tuples; None: every ordered pair of the visible GPUs) and
    returns when every verdict is known. A pair that fails is in the report, not an error;
    P2PCheckError when the check could not run (no GPU, no driver, a device not visible)."""
    return _native.take_report(_run("check", pairs, options))


class Pending:
    """A check running in the background (start). Thread-safe: one thread may wait while
    another cancels. close() (or leaving a `with` block) cancels a check without a result and
    waits until every worker is reaped."""

    def __init__(self, handle: int) -> None:
        self._handle: Optional[int] = handle

    def _result(self, status: int, out: ctypes.c_void_p, msg) -> Optional[Report]:
        if status == _native.STATUS_NOT_READY:
            return None
        _native.raise_for(status, msg, "check")
        return _native.take_report(out.value)

    def _live(self) -> int:
        if self._handle is None:
            raise ValueError("this Pending was closed")
        return self._handle

    def poll(self) -> Optional[Report]:
        """The report if the check has ended, else None, without waiting (raises the check's
        P2PCheckError if it failed)."""
        out, msg = ctypes.c_void_p(), _native.message_buffer()
        status = _native.library().p2pcheck_pending_try_wait(
            self._live(), ctypes.byref(out), msg, len(msg)
        )
        return self._result(status, out, msg)

    def wait(self, timeout: Optional[float] = None) -> Report:
        """The report, waiting at most `timeout` seconds (None: until the check ends; its own
        deadlines bound that). TimeoutError when it is still running then."""
        ms = 2**64 - 1 if timeout is None else max(0, round(timeout * 1000))
        out, msg = ctypes.c_void_p(), _native.message_buffer()
        status = _native.library().p2pcheck_pending_wait_ms(
            self._live(), ms, ctypes.byref(out), msg, len(msg)
        )
        report = self._result(status, out, msg)
        if report is None:
            raise TimeoutError(f"p2pcheck: the check still runs after {timeout} s")
        return report

    def cancel(self) -> None:
        """Stops the check (never blocks); waits then raise P2PCheckError (cancelled)."""
        _native.library().p2pcheck_pending_cancel(self._live())

    def close(self) -> None:
        """Frees the handle: cancels a check without a result, then waits until its workers
        are reaped."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _native.library().p2pcheck_pending_free(handle)

    def __enter__(self) -> "Pending":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def start(pairs: Optional[Sequence[Tuple[int, int]]] = None, **options: Any) -> Pending:
    """check() on a thread of the library's own: returns at once; the report comes from the
    Pending's wait() or poll()."""
    return Pending(_run("start", pairs, options))


def can_actually_p2p(batch_src: Sequence[int], batch_tgt: Sequence[int], **options: Any) -> List[bool]:
    """vLLM's can_actually_p2p: one bool per pair (batch_src[i], batch_tgt[i]), True when a
    process on batch_tgt[i] used memory owned by a process on batch_src[i] and every tier
    passed. engine="vllm", level="copy" is vLLM's exact test."""
    if len(batch_src) != len(batch_tgt):
        raise ValueError(
            f"batch_src has {len(batch_src)} devices but batch_tgt has {len(batch_tgt)}"
        )
    pairs = list(zip(batch_src, batch_tgt))
    if not pairs:
        return []
    src, tgt, n = _native.pair_arrays(pairs)
    results = (ctypes.c_bool * n)()
    with _native.Options(**options) as opts:
        msg = _native.message_buffer()
        status = _native.library().p2pcheck_can_actually_p2p(
            opts.handle, src, tgt, n, results, msg, len(msg)
        )
        _native.raise_for(status, msg, "can_actually_p2p")
    return [bool(r) for r in results]


def _device(x: Any) -> Optional[int]:
    """The device id vLLM's cache key would name (str(x) a plain decimal), else None."""
    text = str(x)
    if text.isascii() and text.isdigit() and str(int(text)) == text and int(text) < 2**32:
        return int(text)
    return None


def access_check(
    src: int,
    tgt: int,
    *,
    cache_dir: Optional[str] = None,
    refresh: bool = False,
    **options: Any,
) -> bool:
    """gpu_p2p_access_check with a cache folder (None: vLLM's: $VLLM_CACHE_ROOT, else
    $XDG_CACHE_HOME/vllm, else ~/.cache/vllm) and options. Answers from this process's
    earlier answers, else from the cache file when the fingerprint beside it vouches for it
    (no CUDA at all), else by checking every pair once and writing both. KeyError for a
    device that is not visible, as vLLM's dict lookup; P2PCheckError when there is no answer."""
    s, t = _device(src), _device(tgt)
    if s is None or t is None:
        raise KeyError(f"{src}->{tgt}")
    result = ctypes.c_bool(False)
    msg = _native.message_buffer()
    with _native.Options(**options) as opts:
        status = _native.library().p2pcheck_access_check_with(
            opts.handle,
            None if cache_dir is None else os.fsencode(cache_dir),
            refresh,
            s,
            t,
            ctypes.byref(result),
            msg,
            len(msg),
        )
    if status == _native.STATUS_INVALID_ARGUMENT and b"out of range" in msg.value:
        raise KeyError(f"{src}->{tgt}")
    _native.raise_for(status, msg, f"gpu_p2p_access_check({src}, {tgt})")
    return bool(result.value)


def gpu_p2p_access_check(src: int, tgt: int) -> bool:
    """vLLM's gpu_p2p_access_check(src, tgt): can a process on GPU tgt use memory owned by a
    process on GPU src? The same cache file as vLLM, byte for byte
    ($VLLM_CACHE_ROOT/gpu_p2p_access_cache_for_<CUDA_VISIBLE_DEVICES>.json); see access_check."""
    return access_check(src, tgt)


def _cli_options(options: dict) -> List[str]:
    """The CLI's arguments for the keyword options."""
    args: List[str] = []
    names = {
        "engine": "--engine",
        "level": "--level",
        "visibility": "--visibility",
        "timeout": "--timeout",
        "startup_timeout": "--startup-timeout",
        "kernel_bytes": "--kernel-bytes",
        "worker": "--worker",
        "simulate": "--simulate",
        "cache_dir": "--cache-dir",
        "sglang_cache_dir": "--sglang-cache-dir",
    }
    for key, value in options.items():
        if key == "faults":
            for f in value:
                args += ["--fault", f]
        elif key not in names:
            raise TypeError(f"unknown option {key!r}")
        elif value is not None:
            args += [names[key], os.fspath(value) if key.endswith("dir") else str(value)]
    return args


def run_cli(args: Sequence[str], **kwargs: Any) -> "subprocess.CompletedProcess[str]":
    """Runs the bundled p2pcheck CLI with `args` (text output captured unless kwargs say
    otherwise); the keyword arguments go to subprocess.run."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([str(cli_path())] + list(args), **kwargs)


def env(**options: Any) -> Advice:
    """`p2pcheck env`: one check, and the settings that make NCCL and the engines safe on this
    machine (none when every pair passed every tier); vLLM's and SGLang's caches are written
    too (on the simulator only into cache_dir= and sglang_cache_dir=). Apply them with
    os.environ.update(advice.environ()) before NCCL starts, and advice.flags("vllm") on the
    engine's command line. P2PCheckError when the check could not run."""
    done = run_cli(["env", "--json"] + _cli_options(options))
    if done.returncode != 0:
        raise P2PCheckError(done.returncode, "could not check", done.stderr.strip())
    v = json.loads(done.stdout)
    return Advice(
        level=Level(v["level"]),
        pairs=v["pairs"],
        devices=v["devices"],
        all_ok=v["all_ok"],
        settings=tuple(
            Setting(
                kind=s["kind"],
                name=s["name"],
                value=s["value"],
                remedy=s["remedy"],
                consumers=tuple(s["for"]),
                because=s["because"],
                causes=tuple(
                    Cause(
                        src=c["pair"][0],
                        tgt=c["pair"][1],
                        verdict=Verdict(c["verdict"]),
                        tier=None if c["tier"] is None else Level(c["tier"]),
                        copy_proven=c["copy_proven"],
                    )
                    for c in s["causes"]
                ),
            )
            for s in v["settings"]
        ),
        caches=tuple(
            CacheWrite(engine=c["engine"], path=c["path"], written=c["written"], error=c["error"])
            for c in v["caches"]
        ),
    )


from . import sglang, vllm  # noqa: E402  (they use the functions above)
