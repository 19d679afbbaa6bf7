"""What importing the kit's entry points costs, in this checkout and in another one, side by side.

Usage: python bench/imports.py --against DIR [--repeats N] [--out F]  (DIR: another checkout's folder holding
``hilal/``, e.g. ``git worktree add /tmp/base main``; default output bench/results/imports.json).
Each import runs in a fresh interpreter (``PYTHONPATH`` = the checkout, one torch thread) after an untimed one
that writes the bytecode caches; the two checkouts alternate within every repeat, so background load affects
both alike. Recorded per entry point and checkout: the median seconds of the import itself (interpreter start
excluded), the median peak resident memory of the process, and whether torch and aihwkit were loaded; the ratio
is this checkout's median over the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hilal.runtime import machine_info, utc_now

ENTRY_POINTS = ("hilal", "hilal.cli", "hilal.data", "hilal.train", "hilal.mapping", "hilal.api", "hilal.plots",
                "hilal.bench", "hilal.bench.report")
"""Modules a user or a command starts from: the package, the command, the data and training layers, the
mapping, the public API, the figures and the benchmarks with their report generator."""

_PROBE = ("import resource, sys, time\n"
          "t = time.perf_counter()\n"
          "import {module}\n"
          "dt = time.perf_counter() - t\n"
          "print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'torch' in sys.modules, "
          "'aihwkit' in sys.modules)\n")


def import_once(checkout: Path, module: str) -> dict[str, Any]:
    """Seconds, peak memory (MiB) and heavy packages of one fresh interpreter importing ``module`` from
    ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as cwd:  # nothing importable from the working directory
        r = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300, check=True)
    s, rss, torch, aihwkit = r.stdout.split()
    return {"s": float(s), "peak_mib": int(rss) / 1024, "torch": torch == "True", "aihwkit": aihwkit == "True"}


def compare(this: Path, other: Path, repeats: int) -> list[dict[str, Any]]:
    """One record per entry point: both checkouts' medians over ``repeats`` alternating imports, and ratios."""
    sides = {"this": this, "other": other}
    records = []
    for module in ENTRY_POINTS:
        for path in sides.values():
            import_once(path, module)  # untimed: bytecode caches
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
        for i in range(repeats):
            for k in (list(sides) if i % 2 == 0 else list(reversed(sides))):
                runs[k].append(import_once(sides[k], module))
        rec: dict[str, Any] = {"module": module}
        for k, rs in runs.items():
            rec[f"{k}_s"] = statistics.median(r["s"] for r in rs)
            rec[f"{k}_peak_mib"] = statistics.median(r["peak_mib"] for r in rs)
            rec[f"{k}_loads_torch"] = rs[0]["torch"]
            rec[f"{k}_loads_aihwkit"] = rs[0]["aihwkit"]
        rec["time_ratio"] = rec["this_s"] / rec["other_s"]
        rec["memory_ratio"] = rec["this_peak_mib"] / rec["other_peak_mib"]
        records.append(rec)
        print(f"{module:20s} {rec['this_s']:6.2f} s against {rec['other_s']:6.2f} s ({rec['time_ratio']:.2f}x), "
              f"{rec['this_peak_mib']:5.0f} MiB against {rec['other_peak_mib']:5.0f} MiB", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="another checkout's folder (the one holding hilal/)")
    p.add_argument("--repeats", type=int, default=5, help="imports per entry point and checkout (medians)")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/imports.json)")
    a = p.parse_args(argv)
    this = Path(__file__).resolve().parent.parent
    other = Path(a.against).resolve()
    if not (other / "hilal" / "__init__.py").is_file():
        p.error(f"--against {other}: no hilal/__init__.py there; give a checkout's folder")
    if a.repeats < 1:
        p.error(f"--repeats must be a whole number >= 1; got {a.repeats}")
    records = compare(this, other, a.repeats)
    out = Path(a.out) if a.out else this / "bench" / "results" / "imports.json"
    result = {"kind": "imports", "this": str(this), "other": str(other), "repeats": a.repeats,
              "machine": {**machine_info("cpu"), "date": utc_now("seconds")},
              "records": records}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
