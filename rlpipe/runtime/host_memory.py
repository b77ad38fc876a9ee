"""Host memory given back to the system after XLA:CPU frees many buffers.

On the CPU backend every device buffer — parameters, optimizer state, their
``pinned_host`` copies when a role is offloaded — is an allocation of the C
library's ``malloc``.  glibc serves a large allocation from a mapping of its
own only above a threshold that it *raises* each time such a block is freed
(up to 32 MiB), so after the first frees a run's shard-sized buffers come
from the heap arenas, and memory freed there stays with the process.  Offload
and onload replace every array of a role, twice a step: the freed copies pile
up.  Measured (docs/learning.md): an 8-layer, SmolLM2-wide model colocated
with offload on 8 fake devices held 1.36 GB of live arrays at 3.8–4.1 GB
resident; with :func:`release_freed` before each move, 2.2–2.3 GB.  Each
trim took 17.7 ms (median; at most 255 ms) there, eight per step, and the
pages given back are faulted in again when reused.

Why not pin the threshold instead (``mallopt(M_MMAP_THRESHOLD)``, or
``MALLOC_MMAP_THRESHOLD_``): then every buffer above it is a fresh mapping
whose pages the kernel zeroes on first touch, and a decode loop allocates
such buffers every step — generation at B 64, N 256 took 1.45 s instead of
0.78 s.  A trim costs only where arrays move.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed"]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc (musl and macOS have no malloc_trim).
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None


def release_freed() -> bool:
    """Returns the free memory of every ``malloc`` arena to the system
    (glibc's ``malloc_trim(0)``); ``False`` where the C library has no such
    call.  Meant for after many large buffers were freed at once (a role's
    arrays moved to or from host memory), not for hot loops: it walks every
    arena's free lists and returns their pages (tens of milliseconds with a
    few GB of heap)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
