"""Wall time of one sweep grid on 1 worker against N (default: the 8-run smoke grid, 1 against 2 workers), side
by side in one run: each repeat runs every worker count from an empty folder on a fresh LocalCluster (its start
included: what a user waits for), alternating the order between repeats. Records the wall times, the ratio of
the medians, the seconds the runs themselves took (summed over runs: what contention for the cores adds),
whether every worker count wrote the same rows (mappings and accuracies), the load average before and after,
the machine, and the GPUs the workers shared.

Usage: PYTHONPATH=. OMP_NUM_THREADS=1 python bench/sweep.py [--grid sweeps/smoke.yaml] [--workers 1,2]
[--repeats 1] [--out bench/results/sweep.json]"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _outcome(table: Any) -> dict[str, Any]:
    return {r.run_id: (list(r.analog_layers), r.accuracy_mean, r.analog_mac_share) for r in table.itertuples()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="sweeps/smoke.yaml")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench/results/sweep.json")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from hilal.paths import atomic_json_dump, provenance_source
    from hilal.runtime import utc_now
    from hilal.sweep import load_grid, run

    counts = [int(w) for w in args.workers.split(",")]
    grid = load_grid(args.grid)
    times: dict[int, list[float]] = {w: [] for w in counts}
    outcomes: dict[int, dict[str, Any]] = {}
    run_s: dict[int, list[float]] = {w: [] for w in counts}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for w in counts if r % 2 == 0 else counts[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                table = run(load_grid(args.grid, workers=w, out=str(Path(tmp) / "sweep")), progress=False)
                times[w].append(time.perf_counter() - t0)
                outcomes.setdefault(w, _outcome(table))
                run_s[w].append(float(table["wall_s"].sum()))
                print(f"[bench sweep] {w} worker(s), repeat {r + 1}: {times[w][-1]:.1f} s, {len(table)} rows",
                      flush=True)
    med = {w: float(np.median(t)) for w, t in times.items()}
    base = counts[0]
    gpus = torch.cuda.device_count()
    records = [{"grid": args.grid, "runs": len(grid.runs()), "workers": w, "gpus": gpus, "repeats": len(times[w]),
                "wall_s": med[w], "speedup": med[base] / med[w], "same_rows": outcomes[w] == outcomes[base],
                "runs_s": float(np.median(run_s[w]))}
               for w in counts]
    record = {"kind": "sweep", "complete": True, "records": records, "wall_s": {str(w): t for w, t in times.items()},
              "load_before": list(load_before), "load_after": list(os.getloadavg()), "finished": utc_now(),
              **provenance_source(threads=grid.threads)}
    atomic_json_dump(record, args.out)
    for r in records:
        print(f"[bench sweep] {r['workers']} worker(s): median {r['wall_s']:.1f} s, {r['speedup']:.2f}x the "
              f"{base}-worker time, same rows: {r['same_rows']}", flush=True)
    print(f"[bench sweep] load average {load_before[0]:.1f} before, {record['load_after'][0]:.1f} after -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
