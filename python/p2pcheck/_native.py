"""The C ABI (include/p2pcheck.h) through ctypes: the library bundled in this package, its
prototypes, options, reports and statuses. Private: the public API is in __init__."""

import ctypes
import os
import threading
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from ._types import (
    Level,
    P2PCheckError,
    PairResult,
    Report,
    TierResult,
    Verdict,
)

BIN_DIR = Path(__file__).resolve().parent / "_bin"
"""Where the wheel puts libp2pcheck.so, p2pcheck-worker and the p2pcheck CLI."""

STATUS_OK = 0
STATUS_INVALID_ARGUMENT = 6
STATUS_BUFFER_TOO_SMALL = 11
STATUS_NOT_READY = 12
_MSG_LEN = 8192

_ENGINES = {"parallel": 0, "vllm": 1}
_LEVELS = {"copy": 0, "kernel": 1, "handshake": 2}
_VISIBILITIES = {"one": 0, "all": 1}
_VERDICTS = [Verdict.OK, Verdict.FAILS, Verdict.HANG, Verdict.ERROR]
_TIERS = [TierResult.NOT_RUN, TierResult.OK, TierResult.FAILED]

_u32p = ctypes.POINTER(ctypes.c_uint32)
_voidp = ctypes.c_void_p
_char = ctypes.c_char_p
_size = ctypes.c_size_t


class _PairResult(ctypes.Structure):
    """p2pcheck_pair_result: 12 32-bit fields, 48 bytes."""

    _fields_ = [
        ("src", ctypes.c_uint32),
        ("tgt", ctypes.c_uint32),
        ("ok", ctypes.c_int32),
        ("verdict", ctypes.c_int32),
        ("copy", ctypes.c_int32),
        ("kernel", ctypes.c_int32),
        ("handshake", ctypes.c_int32),
        ("failed_tier", ctypes.c_int32),
        ("diagnosis", ctypes.c_int32),
        ("attempts", ctypes.c_uint32),
        ("driver_claim", ctypes.c_int32),
        ("persistable", ctypes.c_int32),
    ]


# name: (restype, argtypes)
_PROTOTYPES = {
    "p2pcheck_version": (_char, []),
    "p2pcheck_status_text": (_char, [ctypes.c_int]),
    "p2pcheck_class_name": (_char, [ctypes.c_int]),
    "p2pcheck_options_new": (_voidp, []),
    "p2pcheck_options_free": (None, [_voidp]),
    "p2pcheck_options_set_engine": (ctypes.c_int, [_voidp, ctypes.c_int, _char, _size]),
    "p2pcheck_options_set_level": (ctypes.c_int, [_voidp, ctypes.c_int, _char, _size]),
    "p2pcheck_options_set_visibility": (ctypes.c_int, [_voidp, ctypes.c_int, _char, _size]),
    "p2pcheck_options_set_timeouts_ms": (
        ctypes.c_int,
        [_voidp, ctypes.c_uint64, ctypes.c_uint64, _char, _size],
    ),
    "p2pcheck_options_set_kernel_bytes": (ctypes.c_int, [_voidp, ctypes.c_uint32, _char, _size]),
    "p2pcheck_options_set_worker": (ctypes.c_int, [_voidp, _char, _char, _size]),
    "p2pcheck_options_set_simulation": (
        ctypes.c_int,
        [_voidp, ctypes.c_uint32, _char, _char, _size],
    ),
    "p2pcheck_check": (
        ctypes.c_int,
        [_voidp, _u32p, _u32p, _size, ctypes.POINTER(_voidp), _char, _size],
    ),
    "p2pcheck_report_free": (None, [_voidp]),
    "p2pcheck_report_device_count": (ctypes.c_int, [_voidp, _u32p]),
    "p2pcheck_report_pair_count": (ctypes.c_int, [_voidp, ctypes.POINTER(_size)]),
    "p2pcheck_report_pair": (ctypes.c_int, [_voidp, _size, ctypes.POINTER(_PairResult)]),
    "p2pcheck_report_pair_details": (
        ctypes.c_int,
        [_voidp, _size, _char, _size, ctypes.POINTER(_size)],
    ),
    "p2pcheck_report_answer_seconds": (ctypes.c_int, [_voidp, ctypes.POINTER(ctypes.c_double)]),
    "p2pcheck_report_restarts": (ctypes.c_int, [_voidp, _u32p]),
    "p2pcheck_report_workers_started": (ctypes.c_int, [_voidp, _u32p]),
    "p2pcheck_report_warning_count": (ctypes.c_int, [_voidp, ctypes.POINTER(_size)]),
    "p2pcheck_report_warning": (
        ctypes.c_int,
        [_voidp, _size, _char, _size, ctypes.POINTER(_size)],
    ),
    "p2pcheck_can_actually_p2p": (
        ctypes.c_int,
        [_voidp, _u32p, _u32p, _size, ctypes.POINTER(ctypes.c_bool), _char, _size],
    ),
    "p2pcheck_access_check_with": (
        ctypes.c_int,
        [
            _voidp,
            _char,
            ctypes.c_bool,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_bool),
            _char,
            _size,
        ],
    ),
    "p2pcheck_start": (
        ctypes.c_int,
        [_voidp, _u32p, _u32p, _size, ctypes.POINTER(_voidp), _char, _size],
    ),
    "p2pcheck_pending_try_wait": (ctypes.c_int, [_voidp, ctypes.POINTER(_voidp), _char, _size]),
    "p2pcheck_pending_wait_ms": (
        ctypes.c_int,
        [_voidp, ctypes.c_uint64, ctypes.POINTER(_voidp), _char, _size],
    ),
    "p2pcheck_pending_cancel": (ctypes.c_int, [_voidp]),
    "p2pcheck_pending_free": (None, [_voidp]),
}

_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """libp2pcheck.so of this package ($P2PCHECK_LIBRARY overrides), loaded once."""
    global _lib
    with _lib_lock:
        if _lib is None:
            path = os.environ.get("P2PCHECK_LIBRARY") or str(BIN_DIR / "libp2pcheck.so")
            lib = ctypes.CDLL(path)
            for name, (restype, argtypes) in _PROTOTYPES.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
            _lib = lib
        return _lib


def worker_path() -> Path:
    """The worker executable bundled in this package."""
    return BIN_DIR / "p2pcheck-worker"


def cli_path() -> Path:
    """The p2pcheck command-line tool bundled in this package."""
    return BIN_DIR / "p2pcheck"


def status_text(status: int) -> str:
    return library().p2pcheck_status_text(status).decode()


def raise_for(status: int, msg: ctypes.Array, what: str) -> None:
    """Raises P2PCheckError unless status is OK."""
    if status != STATUS_OK:
        text = msg.value.decode("utf-8", "replace")
        raise P2PCheckError(status, status_text(status), f"{what}: {text}")


def message_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(_MSG_LEN)


def _text(fn, *args) -> str:
    """A text output (buf, len, needed) of the C ABI, whatever its length."""
    needed = _size(0)
    status = fn(*args, None, 0, ctypes.byref(needed))
    if status not in (STATUS_OK, STATUS_BUFFER_TOO_SMALL):
        raise P2PCheckError(status, status_text(status), "reading a report's text")
    buf = ctypes.create_string_buffer(needed.value + 1)
    status = fn(*args, buf, len(buf), ctypes.byref(needed))
    if status != STATUS_OK:
        raise P2PCheckError(status, status_text(status), "reading a report's text")
    return buf.value.decode("utf-8", "replace")


class Options:
    """A p2pcheck_options made from keyword arguments; a context manager that frees it."""

    def __init__(
        self,
        *,
        engine: str = "parallel",
        level: str = "handshake",
        visibility: str = "one",
        timeout: Optional[float] = None,
        startup_timeout: Optional[float] = None,
        kernel_bytes: Optional[int] = None,
        worker: Optional[str] = None,
        simulate: Optional[int] = None,
        faults: Iterable[str] = (),
    ) -> None:
        lib = library()
        self._lib = lib
        self.handle = lib.p2pcheck_options_new()
        if not self.handle:
            raise P2PCheckError(10, "panic", "p2pcheck_options_new returned NULL")
        try:
            self._set(engine, level, visibility, timeout, startup_timeout, kernel_bytes)
            self._set_worker(worker)
            faults = list(faults)
            if simulate is not None or faults:
                msg = message_buffer()
                status = lib.p2pcheck_options_set_simulation(
                    self.handle, simulate or 0, ",".join(faults).encode(), msg, len(msg)
                )
                raise_for(status, msg, "simulation")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _choice(table: dict, value: str, what: str) -> int:
        if value not in table:
            raise ValueError(f"{what} {value!r}: one of {', '.join(table)}")
        return table[value]

    def _set(self, engine, level, visibility, timeout, startup_timeout, kernel_bytes):
        lib, msg = self._lib, message_buffer()
        raise_for(
            lib.p2pcheck_options_set_engine(
                self.handle, self._choice(_ENGINES, engine, "engine"), msg, len(msg)
            ),
            msg,
            "engine",
        )
        raise_for(
            lib.p2pcheck_options_set_level(
                self.handle, self._choice(_LEVELS, level, "level"), msg, len(msg)
            ),
            msg,
            "level",
        )
        raise_for(
            lib.p2pcheck_options_set_visibility(
                self.handle, self._choice(_VISIBILITIES, visibility, "visibility"), msg, len(msg)
            ),
            msg,
            "visibility",
        )
        if timeout is not None or startup_timeout is not None:
            ms = [0 if t is None else max(1, round(t * 1000)) for t in (timeout, startup_timeout)]
            raise_for(
                lib.p2pcheck_options_set_timeouts_ms(self.handle, ms[0], ms[1], msg, len(msg)),
                msg,
                "timeouts",
            )
        if kernel_bytes is not None:
            raise_for(
                lib.p2pcheck_options_set_kernel_bytes(self.handle, kernel_bytes, msg, len(msg)),
                msg,
                "kernel_bytes",
            )

    def _set_worker(self, worker: Optional[str]) -> None:
        # The worker inside this package, unless told otherwise: the library would find it
        # beside itself too, but an explicit path cannot pick up another version on $PATH.
        path = worker or os.environ.get("P2PCHECK_WORKER") or str(worker_path())
        msg = message_buffer()
        status = self._lib.p2pcheck_options_set_worker(
            self.handle, os.fsencode(path), msg, len(msg)
        )
        raise_for(status, msg, "worker")

    def close(self) -> None:
        if self.handle:
            self._lib.p2pcheck_options_free(self.handle)
            self.handle = None

    def __enter__(self) -> "Options":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pair_arrays(pairs: Optional[Sequence[Tuple[int, int]]]):
    """The src and tgt arrays of `pairs` (None: every pair: empty arrays)."""
    if not pairs:
        return None, None, 0
    n = len(pairs)
    src = (ctypes.c_uint32 * n)(*[int(p[0]) for p in pairs])
    tgt = (ctypes.c_uint32 * n)(*[int(p[1]) for p in pairs])
    return src, tgt, n


def _level(value: int) -> Optional[Level]:
    return None if value < 0 else list(Level)[value]


def take_report(handle: int) -> Report:
    """A Report dataclass from a p2pcheck_report handle, which is then freed."""
    lib = library()
    try:
        u32 = ctypes.c_uint32()
        count = _size()
        seconds = ctypes.c_double()
        for fn, out in [
            (lib.p2pcheck_report_device_count, u32),
            (lib.p2pcheck_report_pair_count, count),
            (lib.p2pcheck_report_answer_seconds, seconds),
        ]:
            status = fn(handle, ctypes.byref(out))
            if status != STATUS_OK:
                raise P2PCheckError(status, status_text(status), "reading a report")
        device_count = u32.value
        pairs: List[PairResult] = []
        for i in range(count.value):
            r = _PairResult()
            status = lib.p2pcheck_report_pair(handle, i, ctypes.byref(r))
            if status != STATUS_OK:
                raise P2PCheckError(status, status_text(status), "reading a pair")
            failed = _level(r.failed_tier)
            pairs.append(
                PairResult(
                    src=r.src,
                    tgt=r.tgt,
                    ok=bool(r.ok),
                    verdict=_VERDICTS[r.verdict],
                    copy=_TIERS[r.copy],
                    kernel=_TIERS[r.kernel],
                    handshake=_TIERS[r.handshake],
                    failed_tier=failed,
                    diagnosis=(
                        lib.p2pcheck_class_name(r.diagnosis).decode() if r.diagnosis else None
                    ),
                    attempts=r.attempts,
                    driver_claim=None if r.driver_claim < 0 else bool(r.driver_claim),
                    persistable=bool(r.persistable),
                    details=tuple(
                        line
                        for line in _text(lib.p2pcheck_report_pair_details, handle, i).split("\n")
                        if line
                    ),
                )
            )
        lib.p2pcheck_report_restarts(handle, ctypes.byref(u32))
        restarts = u32.value
        lib.p2pcheck_report_workers_started(handle, ctypes.byref(u32))
        workers_started = u32.value
        lib.p2pcheck_report_warning_count(handle, ctypes.byref(count))
        warnings = tuple(
            _text(lib.p2pcheck_report_warning, handle, i) for i in range(count.value)
        )
        return Report(
            device_count=device_count,
            pairs=tuple(pairs),
            answer_seconds=seconds.value,
            restarts=restarts,
            workers_started=workers_started,
            warnings=warnings,
        )
    finally:
        lib.p2pcheck_report_free(handle)
