"""LionHeart and the plain baselines: IBM's greedy accept/reject loop over layers by descending MACs (and over a
random order), nothing analog, and everything analog with and without one retraining stage. The greedy loops
keep a tile budget (``MappingConfig.max_tiles``) by skipping candidates that would exceed it; all-analog cannot,
and its record says so (``hardware.budget``)."""

from __future__ import annotations

import random

from tqdm.auto import tqdm

from hilal.analog import to_analog
from hilal.mapping.config import MappingResult
from hilal.mapping.run import _Run


def _greedy(run: _Run, order: list[str]) -> MappingResult:
    """LionHeart's accept/reject loop over ``order``; a candidate whose tiles would exceed ``max_tiles`` beside
    the layers kept so far is skipped untried (listed in the result as ``over_budget``)."""
    ok = lambda s: s >= run.floor()  # noqa: E731
    run.honours_budget, over = True, []
    for i, name in enumerate(tqdm(order, desc=run.method, disable=not run.progress, leave=False)):
        if run.tiles[name] > run.tiles_left():
            over.append(name)
            continue
        run.stage(f"candidate-{i}", [name], ok)
    return run.finish(order=order, **({"over_budget": over} if run.cfg.max_tiles is not None else {}))


def lionheart(run: _Run) -> MappingResult:
    """IBM/lionheart's greedy loop: candidates by descending MACs; add one, retrain with patience, keep it if
    the best score stays within ``drop_threshold`` of the digital baseline, else revert."""
    order = run.timed_search(lambda: sorted(run.candidates, key=lambda n: -run.macs[n]))
    return _greedy(run, order)


def random_order(run: _Run) -> MappingResult:
    """LionHeart's accept/reject loop over a random (seeded) layer order."""
    order = list(run.candidates)
    random.Random(run.cfg.seed).shuffle(order)
    return _greedy(run, order)


def all_digital(run: _Run) -> MappingResult:
    """Nothing analog: the floating-point reference (within any tile budget)."""
    run.honours_budget = True
    return run.finish()


def all_analog(run: _Run) -> MappingResult:
    """Every candidate layer (every mappable one unless ``layers`` says otherwise) analog, no fine-tuning."""
    run.model = to_analog(run.digital, run.candidates, run.cfg.preset)
    run.layers = list(run.candidates)
    return run.finish()


def all_analog_ft(run: _Run) -> MappingResult:
    """Every candidate layer analog, with one noise-injection retraining stage."""
    run.stage("all", list(run.candidates))
    return run.finish()
