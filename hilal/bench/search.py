"""``search`` benchmark: ``run_mapping("hilal")`` versus ``run_mapping("lionheart")`` under one
:class:`hilal.mapping.MappingConfig`, after an untimed warm-up so that neither side pays one-time costs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from hilal.bench.config import BenchConfig, _median, _registered, _trained


def warm_up() -> None:
    """Import what the mapping methods import on first use, so that the method timed first in a process does
    not pay for the process's one-time imports: torch's optimizers load ``torch._dynamo`` when the first one
    is built, and HILAL loads the curvature and clustering modules (PyHessian, scikit-learn)."""
    # imported here, not at the top: loading them is this function's job
    import sklearn.cluster  # noqa: F401
    import sklearn.mixture  # noqa: F401
    import torch._dynamo  # noqa: F401

    import hilal.cluster  # noqa: F401
    import hilal.hessian  # noqa: F401


def warm_up_model(model: nn.Module, splits: Any, cfg: Any) -> None:
    """Run, untimed, each kind of work the two mapping methods do on ``model``, once and cheaply, on the shapes
    they use: a curvature pass (HILAL's), two noise-injection training steps on an all-analog copy (both
    methods' retraining) and one noisy evaluation of it (every step's). The first call of a kernel on a new
    shape pays one-time costs (allocations, oneDNN primitives), which the method timed first would otherwise
    pay. ``cfg`` is the :class:`hilal.mapping.MappingConfig` the methods will run with; torch's random state
    is left as it was."""
    from hilal.analog import mappable_layers, to_analog  # local: the report loads hilal.bench without the kit
    from hilal.evaluate import noisy_scores
    from hilal.hessian import layer_metrics
    from hilal.mapping import _hessian_cfg
    from hilal.train import finetune_round, make_optimizer

    hcfg = replace(_hessian_cfg(cfg), power_iters=1, eli_samples=1, first_order_samples=1)
    with torch.random.fork_rng():
        layer_metrics(model, splits, cfg.preset, hcfg, progress=False)
        analog = to_analog(model, mappable_layers(model), cfg.preset)
        finetune_round(analog, splits, replace(cfg.finetune, steps=2), make_optimizer(analog, cfg.finetune),
                       teacher=model)
        noisy_scores(analog, splits, cfg.t_eval, 1, split="calib")


def _result_record(res: Any) -> dict[str, Any]:
    d = res.to_dict()
    d.pop("metrics", None)  # the per-layer table is in `hilal analyze`; keep the record small
    return d


def bench_search(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model: both methods' result records (timings are medians over repeats, the rest from
    the first repeat; ``recheck``: the first repeat's final mapping re-scored on fresh programmings) and the
    speed-up of the total time."""
    from hilal.data import load_dataset  # local: the report loads hilal.bench without the kit
    from hilal.mapping import MappingConfig, recheck, run_mapping

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    warm_up()
    warmed: set[str] = set()
    for name, seed in ((n, s) for n in _registered(cfg.search_models, notes) for s in cfg.mapping_seeds):
        mcfg = MappingConfig(**{"preset": cfg.preset, **cfg.mapping, "seed": seed})
        model = _trained(name, splits, cfg.seed, cfg.device)
        if name not in warmed:
            warm_up_model(model, splits, mcfg)
            warmed.add(name)
        runs: dict[str, list[Any]] = {"hilal": [], "lionheart": []}
        for r in range(cfg.repeats):
            for method in ("hilal", "lionheart") if r % 2 == 0 else ("lionheart", "hilal"):
                res = run_mapping(method, model, splits, mcfg, progress=False)
                if r == 0 and cfg.recheck_reps:  # the record's fields come from the first repeat
                    res.extra["recheck"] = recheck(res, splits, cfg.recheck_reps, seed)
                res.model = None
                runs[method].append(res)
                if progress:
                    print(f"[bench search] {name} seed {seed} {method} repeat {r + 1}/{cfg.repeats}: "
                          f"{res.timings['total_s']:.1f}s, {len(res.analog_layers)} analog layers, "
                          f"acc {res.accuracy_mean:.4f}", flush=True)
        rec: dict[str, Any] = {"model": name, "dataset": cfg.dataset, "preset": cfg.preset, "train_seed": cfg.seed,
                               "mapping_seed": seed, "config": asdict(mcfg)}
        for method, rs in runs.items():
            d = _result_record(rs[0])
            d["timings"] = {k: _median([x.timings[k] for x in rs]) for k in rs[0].timings}
            d["total_times"] = [x.timings["total_s"] for x in rs]
            d["same_result_all_repeats"] = all(x.analog_layers == rs[0].analog_layers
                                               and x.accuracy_mean == rs[0].accuracy_mean for x in rs)
            rec[method] = d
        rec["speedup"] = rec["lionheart"]["timings"]["total_s"] / rec["hilal"]["timings"]["total_s"]
        yield rec
