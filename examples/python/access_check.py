#!/usr/bin/env python3
"""vLLM's gpu_p2p_access_check(src, tgt), answered by p2pcheck's shared library via ctypes.

A drop-in for vllm.distributed.device_communicators.all_reduce_utils.gpu_p2p_access_check with
the same semantics: the same signature; the same cache file,
$VLLM_CACHE_ROOT/gpu_p2p_access_cache_for_{CUDA_VISIBLE_DEVICES}.json, byte for byte; a bool
for two visible devices; KeyError for anything else (vLLM looks "src->tgt" up in a dict);
RuntimeError when no answer can be had (no GPU, no driver, no worker). Unlike vLLM's, a pair
that hung or errored only once is retried, and answered False without being cached if it
cannot be settled, and a cache with p2pcheck's fingerprint is checked again when the machine
changed.

The library: $P2PCHECK_LIBRARY, else libp2pcheck.so.0 from the loader's path. Its worker,
p2pcheck-worker, goes beside the library, or $P2PCHECK_WORKER names it.

    python3 access_check.py SRC TGT [SRC TGT ...]   prints "SRC->TGT: True", "False" or
                                                    "KeyError" per pair
"""

import ctypes
import os
import sys

_STATUS_OK = 0
_STATUS_INVALID_ARGUMENT = 6
_MSG_LEN = 4096

_lib = None


def _library():
    """p2pcheck's shared library, loaded once, with the prototypes this module uses."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(os.environ.get("P2PCHECK_LIBRARY") or "libp2pcheck.so.0")
        check = lib.p2pcheck_gpu_p2p_access_check
        check.argtypes = [
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_bool),
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        check.restype = ctypes.c_int
        lib.p2pcheck_status_text.argtypes = [ctypes.c_int]
        lib.p2pcheck_status_text.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def _device(x):
    """The device id vLLM's cache key would name (str(x) a plain decimal), else None."""
    text = str(x)
    if text.isascii() and text.isdigit() and str(int(text)) == text and int(text) < 2**32:
        return int(text)
    return None


def gpu_p2p_access_check(src: int, tgt: int) -> bool:
    """Check if GPU src can access GPU tgt."""
    lib = _library()
    s, t = _device(src), _device(tgt)
    if s is None or t is None:
        raise KeyError(f"{src}->{tgt}")
    result = ctypes.c_bool(False)
    msg = ctypes.create_string_buffer(_MSG_LEN)
    status = lib.p2pcheck_gpu_p2p_access_check(s, t, ctypes.byref(result), msg, _MSG_LEN)
    if status == _STATUS_OK:
        return bool(result.value)
    text = msg.value.decode("utf-8", "replace")
    if status == _STATUS_INVALID_ARGUMENT and "out of range" in text:
        raise KeyError(f"{src}->{tgt}")
    raise RuntimeError(f"p2pcheck: {lib.p2pcheck_status_text(status).decode()}: {text}")


def main(argv):
    if len(argv) < 2 or len(argv) % 2 or not all(a.lstrip("-").isdigit() for a in argv):
        print("usage: access_check.py SRC TGT [SRC TGT ...]", file=sys.stderr)
        return 2
    for src, tgt in zip(argv[0::2], argv[1::2]):
        try:
            answer = gpu_p2p_access_check(int(src), int(tgt))
        except KeyError:
            answer = "KeyError"
        print(f"{src}->{tgt}: {answer}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
