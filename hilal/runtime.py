"""Process settings for fast CPU runs (glibc's allocator keeps freed memory for reuse), and a record of the
machine that results were measured on (:func:`machine_info`).

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults, blocks above a dynamic threshold are
mapped fresh and the top of the heap is handed back to the kernel once more than twice that threshold is
free, so a loop that allocates and frees the same activation-sized tensors (Hessian-vector products,
training steps) touches new pages every time: each page fault costs microseconds, more in a virtual
machine. Fixing the mapping threshold at 32 MiB and keeping up to 256 MiB of free heap removes those faults
(what it saved: docs/benchmarks.md). The price: up to 256 MiB of freed heap stay with the process for reuse
instead of going back to the system.

The ``hilal`` command, ``bench/``, the test suite and every notebook (in its imports cell, so Jupyter,
Colab and a plain papermill run get it too) apply this to their own process (:func:`keep_freed_memory`), and
``hilal reproduce`` passes it to the notebook kernels through glibc's environment variables
(:func:`allocator_env`). ``HILAL_MALLOC=0`` turns it off; a process whose own
``MALLOC_*_`` variables or ``GLIBC_TUNABLES`` already set malloc is left alone.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
from pathlib import Path
from typing import Any

_MIB = 1 << 20
# mallopt parameter number (malloc.h), value, and glibc's environment variable for the same setting
SETTINGS = {"mmap_threshold": (-3, 32 * _MIB, "MALLOC_MMAP_THRESHOLD_"),
            "trim_threshold": (-1, 256 * _MIB, "MALLOC_TRIM_THRESHOLD_")}


def _env() -> dict[str, str]:
    return {env: str(value) for _, value, env in SETTINGS.values()}


def _wanted() -> bool:
    if os.environ.get("HILAL_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    ours = _env()
    # ours already in the environment (a parent applied them) is fine; anything else is the user's choice
    user = [k for k, v in os.environ.items() if k.startswith("MALLOC_") and k.endswith("_") and ours.get(k) != v]
    return not (user or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def allocator_env() -> dict[str, str]:
    """glibc's environment variables for the settings, for child processes (empty where they do not
    apply: not glibc, ``HILAL_MALLOC=0``, or malloc already set by the user)."""
    return _env() if _wanted() else {}


def keep_freed_memory() -> dict[str, int]:
    """Apply the settings to this process with ``mallopt`` and export them to its children; returns what
    was applied (empty where nothing was: see :func:`allocator_env`). Safe to call more than once."""
    env = allocator_env()
    if not env:
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = {}
    for name, (param, value, _) in SETTINGS.items():  # in order: a trim threshold alone maps every block fresh
        if mallopt(param, value) != 1:
            return applied
        applied[name] = value
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return applied


def _cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else the architecture: float results of the
    same code can differ between CPUs (vector kernels), and with them trained checkpoints and mappings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now(timespec: str = "milliseconds") -> str:
    """The time in UTC, ISO 8601 (sorts as text)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on (the machine only; callers that want a date stamp add it)."""
    import aihwkit
    import torch

    dev = f"cuda:{torch.cuda.get_device_name(0)}" if device.startswith("cuda") else "cpu"
    return {"torch": torch.__version__, "aihwkit": aihwkit.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": dev,
            "malloc": {k: os.environ.get(k) for _, _, k in SETTINGS.values()}}
