"""The malloc settings give freed large buffers back to the kernel (server/allocator.py).

Each case runs in a fresh interpreter: 2,000 buffers of 64 KiB (the size of one socket
read of an upstream answer) interleaved with small long-lived allocations, as in the
server, then the buffers are freed. glibc's defaults keep the freed memory resident.
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
before = rss_kib()
buffers, pinned = [], []
for i in range(2000):
    buffers.append(b"x" * (64 * 1024 + i % 7))
    pinned.append(b"y" * 600)  # above pymalloc's 512 bytes: from malloc, interleaved
del buffers
print(rss_kib() - before)
"""


def retained_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_freed_large_buffers_are_returned_only_with_the_tuning() -> None:
    tuned, default = retained_kib("tuned"), retained_kib("default")
    # 2,000 x 64 KiB = 125 MiB was allocated in each case.
    assert default > 60 * 1024, default
    assert tuned < 16 * 1024, tuned
