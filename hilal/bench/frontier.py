"""``frontier`` benchmark: HILAL's energy frontier from one curvature pass (:func:`hilal.mapping.energy_frontier`)
against LionHeart's mapping, both priced on the chip model (:mod:`hilal.hardware`), with the time each took."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from hilal.bench.config import BenchConfig, _clock, _registered, _trained


def bench_frontier(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model and mapping seed: the frontier's points (accuracy, tiles, energy, latency), LionHeart's
    result record, the frontier points that need less energy than LionHeart at no larger accuracy drop
    (``beats_lionheart``), and the seconds of each side (one run each: the claim is about energy, not time)."""
    from hilal.data import load_dataset  # local: the report loads hilal.bench without the kit
    from hilal.mapping import MappingConfig, beats, energy_frontier, run_mapping

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    for name, seed in ((n, s) for n in _registered(cfg.search_models, notes) for s in cfg.mapping_seeds):
        mcfg = MappingConfig(**{"preset": cfg.preset, "objective": "energy", **cfg.mapping, "seed": seed})
        model = _trained(name, splits, cfg.seed, cfg.device)
        frontier_s, frontier = _clock(lambda m=model, c=mcfg: energy_frontier(
            m, splits, c, points=cfg.frontier_points, progress=False))
        lionheart_s, lh = _clock(lambda m=model, c=mcfg: run_mapping("lionheart", m, splits, c, progress=False))
        rec = lh.to_dict()
        rec.pop("metrics", None)
        better = beats(frontier, rec)
        if progress:
            print(f"[bench frontier] {name} seed {seed}: frontier {frontier_s:.1f}s, LionHeart {lionheart_s:.1f}s, "
                  f"{len(better)} frontier point(s) beat LionHeart's energy at no larger drop", flush=True)
        yield {"model": name, "dataset": cfg.dataset, "preset": cfg.preset, "train_seed": cfg.seed,
               "mapping_seed": seed, "config": asdict(mcfg), "frontier_s": frontier_s, "lionheart_s": lionheart_s,
               "curvature_s": frontier.attrs["curvature_s"], "fp_accuracy": frontier.attrs["fp_accuracy"],
               "frontier": frontier.to_dict(orient="records"), "lionheart": rec,
               "beats_lionheart": better.drop(columns=["layers"]).to_dict(orient="records")}
