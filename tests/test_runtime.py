"""The allocator settings: large blocks must come from the heap and freed heap must stay with the process,
and the settings must stay out of the way where the user chose otherwise."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from hilal import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# What the settings change, read off the process's own memory map with raw malloc calls: an 8 MiB block
# comes from the heap instead of a fresh mapping, and freeing 100 MiB of 1 MiB heap blocks keeps the heap
# instead of handing it back to the kernel (with glibc's defaults: a mapping, and a trimmed heap).
PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    from hilal.runtime import keep_freed_memory
    assert keep_freed_memory(), "nothing applied"
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi
    return 0, 0
big = libc.malloc(8 << 20)
lo, hi = heap()
libc.free(big)  # with glibc's defaults this raises the dynamic thresholds to 8 and 16 MiB
blocks = [libc.malloc(1 << 20) for _ in range(100)]
size = heap()[1] - heap()[0]
for b in reversed(blocks):
    libc.free(b)
print(int(lo <= big < hi), size >> 20, (heap()[1] - heap()[0]) >> 20)
"""


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "HILAL_MALLOC"))}


def probe(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=clean_env(), capture_output=True, text=True,
                         check=True)
    big_in_heap, before, after = (int(x) for x in out.stdout.split())
    return big_in_heap, before, after


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_it():
    big_in_heap, before, after = probe("default")
    assert not big_in_heap and before >= 100 and after < before - 50  # glibc's defaults: mapped, then trimmed
    big_in_heap, before, after = probe("tuned")
    assert big_in_heap and before >= 100 and after == before


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_settings_are_exported_for_child_processes(monkeypatch):
    for k in clean_env().keys() ^ os.environ.keys():
        monkeypatch.delenv(k)
    applied = runtime.keep_freed_memory()
    assert applied == {"mmap_threshold": 32 << 20, "trim_threshold": 256 << 20}
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(256 << 20)
    assert runtime.allocator_env() == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                       "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


@pytest.mark.parametrize("var, value", [("HILAL_MALLOC", "0"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                        ("MALLOC_TOP_PAD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")])
def test_off_switch_and_the_users_own_malloc_settings_are_respected(monkeypatch, var, value):
    for k in clean_env().keys() ^ os.environ.keys():
        monkeypatch.delenv(k)
    monkeypatch.setenv(var, value)
    assert runtime.allocator_env() == {}
    assert runtime.keep_freed_memory() == {}
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_") is None
