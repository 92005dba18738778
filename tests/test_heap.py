"""The audit's large freed blocks go back to the operating system (tasks/heap.py, glibc).

Its threads read each node's answer in megabyte chunks; with glibc's mmap threshold free to
rise, such blocks freed by a thread stay in that thread's heap, behind small blocks still held.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support import ROOT

#: 200 blocks of 1 MiB made and freed by a thread, a small block kept after each, after one
#: large block freed (which is what raises glibc's threshold): the MiB the process got back.
FREED_BY_A_THREAD = textwrap.dedent(
    """
    import sys, threading
    from tasks.heap import release_large_blocks
    if sys.argv[1] == "pinned":
        assert release_large_blocks()
    def rss_mb():
        status = open("/proc/self/status").read().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) // 1024
    def work():
        kept, blocks = [], []
        first = b"\\x01" * (4 << 20)
        del first
        for _ in range(200):
            blocks.append(b"\\x01" * (1 << 20))
            kept.append(b"\\x02" * 2000)
        before = rss_mb()
        del blocks
        print(before - rss_mb())
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    """
)


def returned_mb(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FREED_BY_A_THREAD, mode], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_blocks_a_thread_freed_go_back_to_the_system_once_the_audit_pinned_the_threshold() -> None:
    pinned, free = returned_mb("pinned"), returned_mb("free")
    assert pinned >= 150, f"only {pinned} of 200 MiB went back"
    assert pinned > 3 * free, f"pinned {pinned} MiB, free to rise {free} MiB: the pin changed nothing"
