"""Threshold-free split of layers into a robust and a sensitive cluster from their curvature metrics.

Features are standardized (z-scores) and split in two (k-means by default); the cluster with the lower
mean ELI is *robust*. No user threshold is involved.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from hilal.registry import HilalError, check_choice

METHODS = ("kmeans", "gmm", "agglomerative")

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "hilal": ("log_eli", "concentration"),
    "eli-only": ("log_eli",),
    "r-only": ("concentration",),
    "topeigen-only": ("lambda_max",),
    "topeigen/params": ("lambda_max_per_param",),
    "trace-only": ("trace",),
}
"""Feature columns of the default split and of the paper's one-feature ablations."""

N_INIT = 10
"""k-means restarts (fixed, so results do not depend on library defaults)."""


def log_eli(eli: Sequence[float] | np.ndarray) -> np.ndarray:
    """log10 of the expected loss increase. A non-positive ELI (the Monte-Carlo estimate of a layer whose
    noise barely changes the loss can fall below zero) is floored at the smallest positive ELI of the set
    divided by 10, i.e. treated as the least sensitive; if none is positive, every layer gets 0."""
    e = np.asarray(eli, dtype=float)
    pos = e[np.isfinite(e) & (e > 0)]
    if pos.size == 0:
        return np.zeros_like(e)
    return np.log10(np.where(np.isfinite(e) & (e > 0), e, pos.min() / 10))


def feature_frame(metrics: pd.DataFrame, features: Sequence[str] = FEATURE_SETS["hilal"]) -> pd.DataFrame:
    """The raw feature columns: ``log_eli`` and ``lambda_max_per_param`` are derived, others are taken
    from ``metrics`` as they are."""
    out = {}
    for f in features:
        if f == "log_eli":
            out[f] = log_eli(metrics["eli"])
        elif f == "lambda_max_per_param":
            out[f] = metrics["lambda_max"].to_numpy(float) / metrics["params"].to_numpy(float)
        elif f in metrics.columns:
            out[f] = metrics[f].to_numpy(float)
        else:
            raise HilalError(f"unknown clustering feature {f!r}; use a metrics column, log_eli or "
                             "lambda_max_per_param")
    return pd.DataFrame(out, index=metrics.index)


def _zscore(x: np.ndarray) -> np.ndarray:
    mu, sd = x.mean(0), x.std(0)
    return (x - mu) / np.where(sd > 0, sd, 1.0)


def _labels(z: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=2, n_init=N_INIT, random_state=seed).fit_predict(z)
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        return GaussianMixture(n_components=2, n_init=N_INIT, random_state=seed, reg_covar=1e-4).fit_predict(z)
    from sklearn.cluster import AgglomerativeClustering

    return AgglomerativeClustering(n_clusters=2, linkage="ward").fit_predict(z)


def cluster_layers(metrics: pd.DataFrame, method: str = "kmeans", seed: int = 0,
                   features: Sequence[str] | str = FEATURE_SETS["hilal"]) -> pd.DataFrame:
    """``metrics`` plus a ``cluster`` column ("robust" / "sensitive") and the standardized features
    (``z_<feature>``). ``features`` is a list of columns or the name of a set in ``FEATURE_SETS``.

    The cluster whose mean ELI is lower is robust; for feature sets without ``log_eli`` (the one-feature
    ablations), the cluster with the lower mean of the first feature (less curvature). Fewer than two
    layers, or features identical for all layers, cannot be split: every layer is
    then robust and a warning says so. Deterministic for a given ``seed``."""
    check_choice("clustering method", method, METHODS)
    if isinstance(features, str):
        if features not in FEATURE_SETS:
            raise HilalError(f"unknown feature set {features!r}; valid choices: {', '.join(FEATURE_SETS)}")
        features = FEATURE_SETS[features]
    features = list(features)
    raw = feature_frame(metrics, features)
    x = raw.to_numpy(float)
    if not np.isfinite(x).all():
        raise HilalError(f"non-finite clustering features for layers "
                         f"{list(metrics.loc[~np.isfinite(x).all(1), 'layer'])}")
    z = _zscore(x) if len(x) else x
    out = metrics.copy()
    for j, f in enumerate(features):
        out[f"z_{f}"] = z[:, j] if len(x) else []
    distinct = len(x) >= 2 and len(np.unique(np.round(z, 12), axis=0)) >= 2
    if not distinct:
        warnings.warn("cannot split fewer than two layers or layers with identical features; every layer "
                      "is marked robust", RuntimeWarning, stacklevel=2)
        out["cluster"] = "robust"
        return out
    labels = _labels(z, method, seed)
    if len(set(labels)) < 2:  # a mixture model may leave one component empty
        warnings.warn(f"{method} found a single cluster; every layer is marked robust", RuntimeWarning,
                      stacklevel=2)
        out["cluster"] = "robust"
        return out
    key = metrics["eli"].to_numpy(float) if "log_eli" in features else x[:, 0]
    means = [(key[labels == c].mean(), x[labels == c, 0].mean()) for c in (0, 1)]
    robust = 0 if means[0] <= means[1] else 1
    out["cluster"] = np.where(labels == robust, "robust", "sensitive")
    return out
