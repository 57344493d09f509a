"""The malloc settings give freed large buffers back to the kernel (server/allocator.py).

Each case runs in a fresh interpreter, as in the server: one 2 MB buffer is freed (glibc
then raises its dynamic mmap threshold to 2 MB), then 200 buffers of 1 MiB (upstream
bodies, base64 text, decoded images) are allocated interleaved with small long-lived
allocations and freed. glibc's defaults keep the freed memory resident.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from server.allocator import tune_malloc

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

if sys.argv[1] == "tuned":
    assert tune_malloc()
first = b"z" * (2 * 1024 * 1024)
del first
before = rss_kib()
buffers, pinned = [], []
for i in range(200):
    buffers.append(b"x" * (1024 * 1024 + i % 7))
    pinned.append(b"y" * 600)  # above pymalloc's 512 bytes: from malloc, interleaved
del buffers
print(rss_kib() - before)
"""


def retained_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_freed_large_buffers_are_returned_only_with_the_tuning() -> None:
    tuned, default = retained_kib("tuned"), retained_kib("default")
    # 200 x 1 MiB = 200 MiB was allocated in each case.
    assert default > 100 * 1024, default
    assert tuned < 16 * 1024, tuned
