"""Whether two checkouts of the kit map alike: run the same seeded smoke mappings (ResNet-8 on digits, the tiny
settings of tests/test_mapping.py) and write what they decided, or compare two such files.

Usage: PYTHONPATH=<checkout> python bench/same_mapping.py --out F  (once per checkout, with one HILAL_DATA_DIR so
both load the same trained model); python bench/same_mapping.py --compare A B  (exit status 1 when they differ).
Recorded: per method, the analog layers, MAC share, final accuracy mean and std, rounds, every history step's
layers, scores and verdict, the curvature metrics, and a SHA-1 of the final model's weights; timings are not
compared (they differ from run to run)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

_HESSIAN = {"probes": 8, "eli_samples": 4, "first_order_samples": 8}
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "hilal": ("hilal", {"hessian": _HESSIAN}),
    "hilal-screen": ("hilal", {"search": "screen", "hessian": _HESSIAN}),
    "lionheart": ("lionheart", {}),
    "hilal-paper": ("hilal-paper", {}),
}
"""Name -> (method, MappingConfig overrides on top of the tiny settings)."""

HISTORY = ("step", "layers", "score", "zero_shot", "zero_shot_se", "best_round", "floor", "rounds", "kept")


def _weights_sha(model: Any) -> str:
    from hilal.mapping import snapshot

    h = hashlib.sha1()
    for k, v in sorted(snapshot(model).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def outcomes() -> dict[str, Any]:
    """Run every mapping of :data:`RUNS` and return what each decided (JSON-ready)."""
    import hilal
    from hilal.data import load_dataset
    from hilal.mapping import MappingConfig, run_mapping
    from hilal.train import FinetuneConfig, trained_model

    print(f"mapping with {hilal.__file__}", file=sys.stderr)
    splits = load_dataset("digits", seed=0)
    model = trained_model("resnet8", splits, seed=0, progress=False)
    out: dict[str, Any] = {"model_sha": _weights_sha(model)}
    for name, (method, over) in RUNS.items():
        cfg = MappingConfig(**{"preset": "pcm_harsh", "reps": 2, "patience": 1, "max_rounds": 2,
                               "finetune": FinetuneConfig(steps=3), "seed": 0, **over})
        res = run_mapping(method, model, splits, cfg, progress=False)
        hist = res.history[[c for c in HISTORY if c in res.history]].to_dict(orient="records")
        out[name] = {"analog_layers": res.analog_layers, "analog_mac_share": res.analog_mac_share,
                     "accuracy_mean": res.accuracy_mean, "accuracy_std": res.accuracy_std,
                     "fp_accuracy": res.fp_accuracy, "rounds": res.rounds, "history": hist,
                     "metrics": None if res.metrics is None else res.metrics.to_dict(orient="records"),
                     "model_sha": _weights_sha(res.model)}
    out["digital_untouched_sha"] = _weights_sha(model)
    return out


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths at which ``a`` and ``b`` differ (exact equality; NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} against {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {a!r} against {b!r}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write this checkout's outcomes as JSON here")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two outcome files")
    a = p.parse_args(argv)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(outcomes(), f, indent=1, default=float)
        return 0
    files = []
    for name in a.compare:
        with open(name) as f:
            files.append(json.load(f))
    diffs = _diff(*files)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s) over {len(RUNS)} mappings")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
