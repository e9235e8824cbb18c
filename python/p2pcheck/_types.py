"""The typed results of p2pcheck's Python API."""

import enum
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


class P2PCheckError(RuntimeError):
    """A call of p2pcheck failed: `status` is the C ABI's p2pcheck_status (e.g. 5, no device),
    `status_name` its text, and the message says what failed and why."""

    def __init__(self, status: int, status_name: str, message: str) -> None:
        super().__init__(f"p2pcheck: {status_name}: {message}")
        self.status = status
        self.status_name = status_name


class Verdict(str, enum.Enum):
    """A pair's verdict. Only OK is True for vLLM."""

    OK = "ok"
    """Every tier asked for passed, as both processes saw it."""
    FAILS = "fails"
    """The pair ran to the end and a tier failed."""
    HANG = "hang"
    """A worker stopped answering during an attempt at the pair."""
    ERROR = "error"
    """A worker died or broke the protocol, or the pair was not attempted."""


class Level(str, enum.Enum):
    """A tier of the check (each level includes the ones before it)."""

    COPY = "copy"
    """vLLM's test: copy-engine memset through the mapping, both sides read back."""
    KERNEL = "kernel"
    """SM loads and stores of a pattern through the mapping, 1/4/8/16 bytes wide."""
    HANDSHAKE = "handshake"
    """Kernels resident on both sides at once, exchanging flags."""


class TierResult(str, enum.Enum):
    """One tier's result for a pair, both sides combined."""

    NOT_RUN = "not-run"
    """Not asked for, or the pair never got that far."""
    OK = "ok"
    """Passed on both sides."""
    FAILED = "fail"
    """Failed on a side."""


@dataclass(frozen=True)
class PairResult:
    """One ordered pair: a process on GPU `tgt` maps memory owned by a process on GPU `src`."""

    src: int
    tgt: int
    ok: bool
    """True when the verdict is OK: vLLM's answer."""
    verdict: Verdict
    copy: TierResult
    kernel: TierResult
    handshake: TierResult
    failed_tier: Optional[Level]
    """The weakest tier that failed; None when none did (ok, or a hang or error)."""
    diagnosis: Optional[str]
    """The failed tier's class: never-written, partial, wrong-data, open-failed, timeout, other."""
    attempts: int
    """1, or 2 when the first attempt did not pass."""
    driver_claim: Optional[bool]
    """cudaDeviceCanAccessPeer, where a worker could ask it."""
    persistable: bool
    """Whether the verdict is a fact that may go into vLLM's cache."""
    details: Tuple[str, ...] = ()
    """What was seen: why it failed, hung or errored, and what an earlier attempt gave."""

    def __str__(self) -> str:
        return f"{self.src}->{self.tgt}: {self.verdict.value}" + (
            f" ({self.failed_tier.value} tier, {self.diagnosis})" if self.failed_tier else ""
        )


@dataclass(frozen=True)
class Report:
    """What a check found: every pair asked for, in order (all pairs: row-major src, tgt)."""

    device_count: int
    pairs: Tuple[PairResult, ...]
    answer_seconds: float
    """Seconds from the start of the check to its last verdict."""
    restarts: int
    """Rounds of fresh workers after a hang or a worker's death."""
    workers_started: int
    warnings: Tuple[str, ...] = ()

    @property
    def all_ok(self) -> bool:
        """Whether every pair's verdict is OK."""
        return all(p.ok for p in self.pairs)

    def get(self, src: int, tgt: int) -> Optional[PairResult]:
        """The pair src->tgt, if it was checked."""
        return next((p for p in self.pairs if (p.src, p.tgt) == (src, tgt)), None)

    def __str__(self) -> str:
        bad = [str(p) for p in self.pairs if not p.ok]
        head = (
            f"p2pcheck report: {self.device_count} GPU(s), {len(self.pairs)} pair(s), "
            f"{self.answer_seconds:.2f} s to answer: "
        )
        return head + ("all ok" if not bad else f"{len(bad)} not ok: " + "; ".join(bad))


@dataclass(frozen=True)
class Cause:
    """A pair that calls for a setting, and what it showed."""

    src: int
    tgt: int
    verdict: Verdict
    tier: Optional[Level]
    """The weakest tier that failed; None for a hang or an error."""
    copy_proven: bool
    """Whether the copy tier passed (False also when the pair never got that far)."""


@dataclass(frozen=True)
class Setting:
    """One setting that makes NCCL or an engine safe on this machine."""

    kind: str
    """"env" (an environment variable) or "flag" (a server command-line flag)."""
    name: str
    """The variable (NCCL_P2P_DISABLE, FORCE_NCCL_ALL_REDUCE_STRATEGY) or the flag
    (--disable-custom-all-reduce)."""
    value: Optional[str]
    """The variable's value; None for a flag."""
    remedy: str
    """What it turns off: "nccl-p2p-off" or "custom-all-reduce-off"."""
    consumers: Tuple[str, ...]
    """Whom it is for: nccl, vllm, sglang, tensorrt-llm."""
    because: str
    """The pairs and tiers that call for it, in words."""
    causes: Tuple[Cause, ...]


@dataclass(frozen=True)
class CacheWrite:
    """An engine's cache that `env` wrote, or why not."""

    engine: str
    path: Optional[str]
    written: bool
    error: Optional[str]


@dataclass(frozen=True)
class Advice:
    """The settings one check calls for (p2pcheck env): none when every pair passed."""

    level: Level
    pairs: int
    devices: int
    all_ok: bool
    settings: Tuple[Setting, ...]
    caches: Tuple[CacheWrite, ...] = field(default=())

    def environ(self) -> Dict[str, str]:
        """The environment variables to set, as a dict for os.environ.update or subprocess."""
        return {s.name: s.value or "" for s in self.settings if s.kind == "env"}

    def flags(self, engine: str) -> Tuple[str, ...]:
        """The command-line flags for `engine` ("vllm" or "sglang")."""
        return tuple(s.name for s in self.settings if s.kind == "flag" and engine in s.consumers)


@dataclass(frozen=True)
class Prepared:
    """An engine's cache written by vllm.prepare() or sglang.prepare()."""

    path: str
    """The cache file, gpu_p2p_access_cache_for_<CUDA_VISIBLE_DEVICES>.json."""
    all_ok: bool
    """Whether every pair passed (the file says which did not)."""
    warnings: Tuple[str, ...] = ()
