"""What vllm.prepare() and sglang.prepare() share: one check by the bundled CLI, written as
the engine's cache (the JSON vLLM writes, byte for byte, with p2pcheck's fingerprint beside
it)."""

import json
import os
from typing import Any, Optional

from ._types import P2PCheckError, Prepared


def prepare(engine: str, cache_dir: Optional[str], options: Any) -> Prepared:
    """Checks every pair and writes the verdicts as `engine`'s cache in `cache_dir` (None:
    the CLI's default, vLLM's folder). Raises P2PCheckError when the check could not run or
    the file could not be written, or a verdict is not a fact (a hang or an error that did not
    repeat: nothing is written then; check again)."""
    from . import _cli_options, run_cli

    if options.get("simulate") is not None and cache_dir is None:
        raise ValueError(
            f"{engine}.prepare(simulate=...) needs cache_dir=: simulated verdicts never go "
            "into the real cache"
        )
    args = ["--json", "--write-vllm-cache"]
    if cache_dir is not None:
        args += ["--cache-dir", os.fspath(cache_dir)]
    done = run_cli(args + _cli_options(options))
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    cache = report.get("vllm_cache") or {}
    if done.returncode not in (0, 1) or not cache.get("written"):
        why = cache.get("error") or report.get("error") or done.stderr.strip()
        warnings = "; ".join(report.get("warnings", []))
        raise P2PCheckError(
            done.returncode, "cache not written", f"{engine}'s cache: {why} {warnings}".strip()
        )
    return Prepared(
        path=cache["path"],
        all_ok=bool(report.get("all_ok")),
        warnings=tuple(report.get("warnings", [])),
    )
