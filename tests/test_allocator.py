"""The C allocator settings of shard-running processes (``curate.allocator``), checked in fresh interpreters."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    applied = {}
    if sys.argv[1] == "tuned":
        from curate.allocator import tune_allocator
        applied = tune_allocator(2)
        assert tune_allocator(8) is applied  # once per process

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    big = np.ones(16 << 20, np.uint8)  # freeing a 16 MB block lifts glibc's own mmap threshold to 16 MB
    del big
    base = rss()
    blocks, pins = [], []
    for _ in range(40):
        blocks.append(np.ones(4 << 20, np.uint8))  # 4 MB arrays (batches) ...
        pins.append(bytearray(64 * 1024))          # ... each followed by a small block that outlives it
    del blocks
    print(json.dumps({"kept_MB": (rss() - base) >> 20, "applied": applied}))
""")


def _probe(mode: str, **env: str) -> dict:
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_freed_batches_go_back_to_the_system():
    plain, tuned = _probe("plain"), _probe("tuned")
    assert tuned["applied"] == {"MALLOC_MMAP_THRESHOLD_": 1 << 20, "MALLOC_ARENA_MAX": 2}
    # glibc's defaults keep the 160 MB of freed arrays (they came from the heap, pinned by small blocks)
    assert plain["kept_MB"] > 100, plain
    assert tuned["kept_MB"] < 20, tuned


def test_a_value_the_user_set_is_left_alone():
    got = _probe("tuned", MALLOC_ARENA_MAX="4")
    assert got["applied"] == {"MALLOC_MMAP_THRESHOLD_": 1 << 20}
    got = _probe("tuned", MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_ARENA_MAX="4")
    assert got["applied"] == {}
    assert got["kept_MB"] > 100  # the user's own threshold is in force
    got = _probe("tuned", GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={64 << 20}")
    assert got["applied"] == {"MALLOC_ARENA_MAX": 2}
    assert got["kept_MB"] > 100


def test_arenas_are_capped_at_the_thread_share_but_never_below_two():
    code = ("from curate.allocator import tune_allocator; import sys; "
            "print(tune_allocator(int(sys.argv[1]))['MALLOC_ARENA_MAX'])")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for threads, arenas in ((1, 2), (2, 2), (6, 6)):
        out = subprocess.run([sys.executable, "-c", code, str(threads)], env=clean, capture_output=True, text=True,
                             check=True)
        assert int(out.stdout) == arenas
