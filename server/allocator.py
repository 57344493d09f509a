"""glibc malloc settings for a process that handles multi-megabyte images.

Two glibc defaults make a server's RSS grow under bursts of large answers and stay there:

* The mmap threshold is dynamic: once a 2 MB block that had its own mapping is freed,
  glibc raises the threshold to 2 MB, and from then on buffers of that size (upstream
  bodies, base64 text, decoded images, protobuf and JSON answers) come from the heap
  arenas, where freed memory is kept and fragments. Fixing the threshold at 1 MiB gives
  each of these buffers its own mapping, returned to the kernel the moment it is freed.
  The pieces an upstream body is read in (64 and 256 KiB, one per socket read) stay on
  the heap and are reused: how many are alive at once is bounded by the answer gate
  (``server.providers.gate``). Mapping each of them too (a 64 KiB threshold, until the
  gate) costs a page fault per 4 KiB and a TLB shootdown per unmap, about a fifth of the
  server's CPU in ``perf`` on 1.5 MB answers: 38 ms of gateway CPU per answer with the
  gate, against 29-32 ms at 1 MiB.
* Up to 8 arenas per core, one per thread that allocates: the worker threads (base64,
  JSON, image checks, database) each pin their own. Two are enough here.

Measured with the bench (``bench/README.md``): after a burst of 512 requests for 1.5 MB
images the server's RSS went back to about 300 MiB instead of staying at 1,061 MiB. The
peak during the burst is set by how many answers are in memory at once (the gate), not
by this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1024 * 1024
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Applies the settings above; False (and nothing changed) where libc is not glibc.
    Call it before the process starts threads."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_ARENA_MAX, ARENA_MAX) == 1
    if not applied:
        log.warning("could not tune malloc; large answers may leave the RSS high after bursts")
    return applied
