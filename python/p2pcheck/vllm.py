"""vLLM: its cache written and verified before the engine starts.

vLLM checks P2P only with VLLM_SKIP_P2P_CHECK=0 (since 2025 the default is 1: it trusts
cudaDeviceCanAccessPeer for the first peer); then its gpu_p2p_access_check reads
$VLLM_CACHE_ROOT/gpu_p2p_access_cache_for_<CUDA_VISIBLE_DEVICES>.json (VLLM_CACHE_ROOT
defaults to $XDG_CACHE_HOME/vllm, else ~/.cache/vllm) and computes it only when absent.
prepare() writes that file from p2pcheck's check, so vLLM's own check is instant and every
answer in it was proven by SM loads and stores and a handshake as well as vLLM's copy.
"""

from typing import Any, Optional

from ._engines import prepare as _prepare
from ._types import Prepared

__all__ = ["prepare"]


def prepare(cache_dir: Optional[str] = None, **options: Any) -> Prepared:
    """Writes vLLM's P2P cache for this process's CUDA_VISIBLE_DEVICES in `cache_dir` (None:
    vLLM's folder, as the environment says now), with p2pcheck's fingerprint beside it.
    Options as p2pcheck.check's; a simulation needs an explicit cache_dir."""
    return _prepare("vllm", cache_dir, options)
