"""Layer-allocation methods: HILAL, the paper's variant, LionHeart, and plain baselines.

Every method shares one retraining routine (:func:`retrain`: the same optimizer settings, steps per round
and patience rule) and one evaluation (:func:`hilal.evaluate.noisy_scores` at ``t_eval`` over ``reps`` on the
calibration split inside the loop, on the test split at the end), so a HILAL stage and a LionHeart round cost
the same and any speed-up comes from the method.

Timings: ``search_s`` is the time spent deciding (curvature metrics, ordering, clustering, and retraining
rounds whose result was rejected), ``mapping_s`` the retraining whose result was kept, ``eval_s`` the final
evaluation, ``total_s`` everything including the floating-point baseline.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import (
    mappable_layers,
    to_analog,
)
from hilal.data import Splits, loader
from hilal.evaluate import noisy_scores
from hilal.mapping.config import COSTS, MAPPING_HESSIAN, ORDERS, SEARCHES, MappingConfig, MappingResult, _hessian_cfg
from hilal.mapping.journal import Journal, restore, snapshot
from hilal.mapping.recheck import RECHECK_SEED, fresh_pass_rate, recheck
from hilal.mapping.run import CONFIRM_SEED, Round, _decided, _Run, retrain
from hilal.mapping.search import _extend_prefix, _knapsack, _scan, _screened, _trim, hilal, pareto_sets
from hilal.registry import Registry, check_choice

__all__ = [
    "ABLATIONS", "CONFIRM_SEED", "COSTS", "MAPPING_HESSIAN", "METHODS", "ORDERS", "RECHECK_SEED", "SEARCHES",
    "Journal", "MappingConfig", "MappingResult", "Round", "_Run", "_decided", "_extend_prefix", "_hessian_cfg",
    "_knapsack", "_scan", "_screened", "_trim", "all_analog", "all_analog_ft", "all_digital", "fresh_pass_rate",
    "hilal", "hilal_paper", "lionheart", "paper_clusters", "paper_descriptors", "pareto_sets", "random_order",
    "recheck", "restore", "retrain", "run_mapping", "snapshot",
]


METHODS: Registry[Callable[..., MappingResult]] = Registry("method")
METHODS.add("hilal", hilal)


# --- shared machinery ----------------------------------------------------------------------------------


def run_mapping(method: str, model: nn.Module, splits: Splits, cfg: MappingConfig | None = None,
                progress: bool = True) -> MappingResult:
    """Run one allocation method on a trained digital ``model`` (left unmodified)."""
    fn = METHODS[method]
    cfg = cfg or MappingConfig()
    check_choice("search", cfg.search, SEARCHES)
    check_choice("order", cfg.order, ORDERS)
    check_choice("cost", cfg.cost, tuple(COSTS))
    return fn(_Run(method, model, splits, cfg, progress))


# --- HILAL ---------------------------------------------------------------------------------------------


# --- the paper's own variant ----------------------------------------------------------------------------

ABLATIONS = {
    "eli-r": ("eli_norm", "r"),
    "eli-only": ("eli_norm",),
    "r-only": ("r",),
    "topeigen-only": ("lambda_max",),
    "topeigen/params": ("lambda_per_param",),
    "trace-only": ("trace",),
}


def paper_descriptors(run: _Run) -> pd.DataFrame:
    """The paper's descriptors on ``sensitivity_batches`` training mini-batches: ELI_norm =
    ½ (gamma max|W|)² tr(H_ll) / n_params, r = lambda_max / trace, and the ablation features."""
    from hilal.hessian import layer_metrics

    cfg = run.cfg
    it = iter(loader(run.splits.train, batch_size=run.cfg.finetune.batch_size, shuffle=True, seed=cfg.seed))
    batches = [next(it) for _ in range(cfg.sensitivity_batches)]
    hcfg = _hessian_cfg(cfg)
    hcfg.eli_samples = hcfg.first_order_samples = 0  # the paper's ELI uses isotropic noise, below
    df = layer_metrics(run.digital, batches, cfg.preset, hcfg, progress=run.progress)
    mods = dict(run.digital.named_modules())
    wmax = np.array([float(mods[n].weight.detach().abs().max()) for n in df["layer"]])
    df["eli_norm"] = 0.5 * (cfg.gamma * wmax) ** 2 * df["trace"] / df["params"]
    df["r"] = df["lambda_max"] / df["trace"]
    df["lambda_per_param"] = df["lambda_max"] / df["params"]
    return df


def paper_clusters(df: pd.DataFrame, ablation: str, seed: int, restarts: int = 8) -> pd.DataFrame:
    """k-means (k=2, restarts) on the z-scored ablation features; robust = cluster whose centroid has the
    lower first feature."""
    from sklearn.cluster import KMeans

    cols = list(ABLATIONS[check_choice("ablation", ablation, tuple(ABLATIONS))])
    x = df[cols].to_numpy(float)
    z = (x - x.mean(0)) / (x.std(0) + 1e-12)
    out = df.copy()
    if len(df) < 2:
        out["cluster"] = "robust"
        return out
    km = KMeans(2, n_init=restarts, random_state=seed).fit(z)
    robust = int(np.argmin(km.cluster_centers_[:, 0]))
    out["cluster"] = np.where(km.labels_ == robust, "robust", "sensitive")
    return out


@METHODS.register("hilal-paper")
def hilal_paper(run: _Run) -> MappingResult:
    """The HILAL paper's variant: descriptors on training batches, isotropic noise, k-means on
    [ELI_norm, r] (or an ablation's feature), robust layers sorted by (ELI_norm, r) and offloaded one per
    stage with retraining judged without drift; sensitive layers never tried."""
    cfg = run.cfg
    df = run.timed_search(lambda: paper_clusters(paper_descriptors(run), cfg.ablation, cfg.seed))
    robust = df[df["cluster"] == "robust"].sort_values(["eli_norm", "r"], kind="stable")["layer"].tolist()
    for i, name in enumerate(robust):
        run.stage(f"robust-{i}", [name], drift=False)
    res = run.finish(metrics=df, robust=robust, ablation=cfg.ablation)
    nodrift = noisy_scores(run.model, run.splits, 0.0, res.reps, cfg.seed + 2, split="test")
    res.extra["accuracy_t0_mean"] = float(nodrift.mean())
    return res


# --- LionHeart and baselines ---------------------------------------------------------------------------

def _greedy(run: _Run, order: list[str]) -> MappingResult:
    ok = lambda s: s >= run.floor()  # noqa: E731
    for i, name in enumerate(tqdm(order, desc=run.method, disable=not run.progress, leave=False)):
        run.stage(f"candidate-{i}", [name], ok)
    return run.finish(order=order)


@METHODS.register("lionheart")
def lionheart(run: _Run) -> MappingResult:
    """IBM/lionheart's greedy loop: candidates by descending MACs; add one, retrain with patience, keep it if
    the best score stays within ``drop_threshold`` of the digital baseline, else revert."""
    order = run.timed_search(lambda: sorted(run.macs, key=lambda n: -run.macs[n]))
    return _greedy(run, order)


@METHODS.register("random")
def random_order(run: _Run) -> MappingResult:
    """LionHeart's accept/reject loop over a random (seeded) layer order."""
    order = list(run.macs)
    random.Random(run.cfg.seed).shuffle(order)
    return _greedy(run, order)


@METHODS.register("all-digital")
def all_digital(run: _Run) -> MappingResult:
    """Nothing analog: the floating-point reference."""
    return run.finish()


@METHODS.register("all-analog")
def all_analog(run: _Run) -> MappingResult:
    """Every mappable layer analog, no fine-tuning."""
    run.model = to_analog(run.digital, mappable_layers(run.digital), run.cfg.preset)
    run.layers = mappable_layers(run.digital)
    return run.finish()


@METHODS.register("all-analog-ft")
def all_analog_ft(run: _Run) -> MappingResult:
    """Every mappable layer analog, with one noise-injection retraining stage."""
    run.stage("all", mappable_layers(run.digital))
    return run.finish()
