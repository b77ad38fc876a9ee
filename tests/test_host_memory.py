"""runtime/host_memory.py: memory that moves free gets back to the system (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlpipe.runtime import host_memory

needs_glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc_trim is not available here")

# Frees a 2 MiB block (glibc then raises its mmap threshold above 1 MiB),
# allocates 64 x 1 MiB blocks and a 200 KiB one after them (which pins the top
# of the heap), frees the 64 and prints how much of them is still resident,
# after release_freed() when asked.
_PROBE = """
import ctypes, sys
from rlpipe.runtime import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def block(n):
    p = libc.malloc(n); libc.memset(p, 1, n); return p
libc.free(block(2 << 20))
base = rss()
blocks = [block(1 << 20) for _ in range(64)]
pin = block(200 << 10)
for p in blocks:
    libc.free(p)
if sys.argv[1] == "release":
    assert host_memory.release_freed()
print((rss() - base) / (64 << 20))
"""


def _resident_share(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@needs_glibc
def test_freed_heap_memory_goes_back_only_when_released():
    assert _resident_share("keep") > 0.9  # glibc keeps the freed 64 MiB in the heap
    assert _resident_share("release") < 0.1


@needs_glibc
def test_moving_arrays_to_host_memory_and_back_releases_what_earlier_moves_freed(monkeypatch):
    import jax.numpy as jnp

    from rlpipe.runtime import weights

    calls = []
    monkeypatch.setattr(host_memory, "release_freed", lambda: calls.append(1) or True)
    tree = {"w": jnp.ones((4, 4))}
    back = weights.onload(weights.offload(tree))
    assert len(calls) == 2 and back["w"].sharding.memory_kind == "device"
