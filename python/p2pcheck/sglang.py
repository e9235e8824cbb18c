"""SGLang: its cache written and verified before the engine starts.

SGLang replaces its P2P check with `lambda: True` unless the server runs with
--enable-p2p-check; then its gpu_p2p_access_check (adapted from vLLM's, in
sglang/srt/distributed/device_communicators/custom_all_reduce_utils.py) reads
os.path.expanduser("~/.cache/sglang")/gpu_p2p_access_cache_for_<CUDA_VISIBLE_DEVICES>.json,
in vLLM's format (json.dump(cache, f, indent=4)), and computes it only when absent. No
variable moves that folder. prepare() writes that file from p2pcheck's check.
"""

import os
from typing import Any, Optional

from ._engines import prepare as _prepare
from ._types import Prepared

__all__ = ["default_cache_dir", "prepare"]


def default_cache_dir() -> str:
    """SGLang's cache folder, as SGLang computes it: os.path.expanduser("~/.cache/sglang")."""
    return os.path.expanduser("~/.cache/sglang")


def prepare(cache_dir: Optional[str] = None, **options: Any) -> Prepared:
    """Writes SGLang's P2P cache for this process's CUDA_VISIBLE_DEVICES in `cache_dir`
    (None: SGLang's, ~/.cache/sglang, created if missing), with p2pcheck's fingerprint beside
    it. Options as p2pcheck.check's; a simulation needs an explicit cache_dir."""
    if cache_dir is None and options.get("simulate") is None:
        cache_dir = default_cache_dir()
    return _prepare("sglang", cache_dir, options)
