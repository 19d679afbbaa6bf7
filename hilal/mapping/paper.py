"""The HILAL paper's own variant (``hilal-paper``) and its ablations, kept faithful so the paper can be
reproduced: descriptors on training mini-batches with isotropic noise (ELI_norm = 1/2 (gamma max|W|)^2
tr(H_ll) / n_params, r = lambda_max / tr), k-means on their z-scores, and the robust layers offloaded one per
stage with retraining judged without drift; sensitive layers are never tried (docs/design.md). The kit
rejects a stage that breaks the tolerance unless ``MappingConfig.paper_guard`` is off (the paper-faithful
variant, labelled so in the result)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hilal.batches import epoch_generator
from hilal.data import loader
from hilal.device import model_device
from hilal.evaluate import noisy_scores
from hilal.hessian import layer_metrics
from hilal.mapping.config import ABLATIONS, MappingResult, _hessian_cfg
from hilal.mapping.run import _Run
from hilal.registry import check_choice
from hilal.train import train_batch


def paper_descriptors(run: _Run) -> pd.DataFrame:
    """The paper's descriptors on ``sensitivity_batches`` training mini-batches: ELI_norm =
    ½ (gamma max|W|)² tr(H_ll) / n_params, r = lambda_max / trace, and the ablation features."""
    cfg = run.cfg
    it = iter(loader(run.splits.train, batch_size=run.cfg.finetune.batch_size, shuffle=True, seed=cfg.seed))
    gen, device = epoch_generator(cfg.seed, 0), model_device(run.digital)
    batches = [train_batch(run.splits, next(it), device, gen) for _ in range(cfg.sensitivity_batches)]  # augmented
    hcfg = _hessian_cfg(cfg)
    hcfg.eli_samples = hcfg.first_order_samples = 0  # the paper's ELI uses isotropic noise, below
    df = layer_metrics(run.digital, batches, cfg.preset, hcfg, layers=run.candidates, progress=run.progress)
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


def hilal_paper(run: _Run) -> MappingResult:
    """The HILAL paper's variant: descriptors on training batches, isotropic noise, k-means on
    [ELI_norm, r] (or an ablation's feature), robust layers sorted by (ELI_norm, r) and offloaded one per
    stage with retraining judged without drift; sensitive layers never tried. With ``paper_guard`` (the
    default) a stage is judged at ``t_eval`` and rejected if it breaks the tolerance; without it, as
    published, every stage is kept."""
    cfg = run.cfg
    df = run.timed_search(lambda: paper_clusters(paper_descriptors(run), cfg.ablation, cfg.seed))
    robust = df[df["cluster"] == "robust"].sort_values(["eli_norm", "r"], kind="stable")["layer"].tolist()
    guard = cfg.paper_guard
    for i, name in enumerate(robust):
        run.stage(f"robust-{i}", [name], (lambda s: s >= run.floor()) if guard else None, drift=guard)
    res = run.finish(metrics=df, robust=robust, ablation=cfg.ablation,
                     variant="kit" if guard else "paper-faithful")
    nodrift = noisy_scores(run.model, run.splits, 0.0, res.reps, cfg.seed + 2, split="test",
                           engine=cfg.engine)
    res.extra["accuracy_t0_mean"] = float(nodrift.mean())
    return res
