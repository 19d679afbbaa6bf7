"""Robust/sensitive split: determinism, the robust rule, exhaustive optimality, degenerate inputs."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest

from hilal.cluster import FEATURE_SETS, cluster_layers, feature_frame, log_eli
from hilal.registry import HilalError


def _metrics(eli, conc=None, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(eli)
    return pd.DataFrame({
        "layer": [f"l{i}" for i in range(n)],
        "params": rng.integers(10, 1000, n),
        "trace": rng.uniform(0.1, 10, n),
        "lambda_max": rng.uniform(0.1, 5, n),
        "concentration": rng.uniform(0.05, 0.9, n) if conc is None else conc,
        "eli": eli,
    })


def _best_split_ss(z: np.ndarray) -> float:
    """Smallest within-cluster sum of squares over every split of the points into two non-empty groups."""
    best = np.inf
    n = len(z)
    for mask in itertools.product([0, 1], repeat=n - 1):
        lab = np.array((0, *mask))
        if lab.min() == lab.max():
            continue
        ss = sum(((z[lab == c] - z[lab == c].mean(0)) ** 2).sum() for c in (0, 1))
        best = min(best, ss)
    return best


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_kmeans_is_the_best_two_partition(dims, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 11))
    eli = 10 ** rng.uniform(-5, -2, n)
    df = _metrics(eli, seed=seed)
    feats = ("log_eli",) if dims == 1 else ("log_eli", "concentration")
    out = cluster_layers(df, features=feats)
    z = out[[f"z_{f}" for f in feats]].to_numpy()
    lab = (out.cluster == "robust").to_numpy()
    ss = sum(((z[lab == c] - z[lab == c].mean(0)) ** 2).sum() for c in (True, False))
    assert ss == pytest.approx(_best_split_ss(z), rel=1e-9)


@pytest.mark.parametrize("method", ["kmeans", "gmm", "agglomerative"])
def test_robust_has_lower_mean_eli_and_is_deterministic(method):
    rng = np.random.default_rng(5)
    eli = np.r_[10 ** rng.uniform(-6, -5, 6), 10 ** rng.uniform(-3, -2, 4)]
    conc = np.r_[rng.uniform(0.1, 0.2, 6), rng.uniform(0.6, 0.8, 4)]
    df = _metrics(eli, conc)
    a = cluster_layers(df, method=method, seed=3)
    b = cluster_layers(df, method=method, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.cluster) == ["robust"] * 6 + ["sensitive"] * 4
    assert a.loc[a.cluster == "robust", "eli"].mean() < a.loc[a.cluster == "sensitive", "eli"].mean()
    # z-scored features
    np.testing.assert_allclose(a.z_log_eli.mean(), 0, atol=1e-12)
    np.testing.assert_allclose(a.z_log_eli.std(ddof=0), 1)
    # the input is not modified, the order is kept
    assert "cluster" not in df.columns and list(a.layer) == list(df.layer)


def test_log_eli_floors_non_positive_values():
    out = log_eli([1e-3, 1e-5, 0.0, -2e-4])
    np.testing.assert_allclose(out, [-3, -5, -6, -6])
    np.testing.assert_allclose(log_eli([0.0, -1.0]), [0.0, 0.0])
    df = _metrics(np.array([1e-2, 2e-2, -1e-4, 1e-6, 3e-2]))
    out = cluster_layers(df, features=("log_eli",))
    assert out.loc[2, "cluster"] == "robust"  # a negative estimate counts as the least sensitive


def test_feature_sets_for_ablations():
    df = _metrics(np.array([1e-3, 1e-4, 1e-2]))
    for name, cols in FEATURE_SETS.items():
        out = cluster_layers(df, features=name)
        assert {f"z_{c}" for c in cols} <= set(out.columns)
        assert set(out.cluster) <= {"robust", "sensitive"}
    ff = feature_frame(df, FEATURE_SETS["topeigen/params"])
    np.testing.assert_allclose(ff.lambda_max_per_param, df.lambda_max / df.params)
    # one-feature ablation without ELI: the robust cluster is the one with less of that feature
    df2 = _metrics(np.array([1e-3, 1e-3, 1e-3, 1e-3]))
    df2["trace"] = [1.0, 1.1, 9.0, 9.5]
    out = cluster_layers(df2, features="trace-only")
    assert list(out.cluster) == ["robust", "robust", "sensitive", "sensitive"]


def test_degenerate_inputs_mark_everything_robust():
    for df in (_metrics(np.array([1e-3])), _metrics(np.array([1e-3, 1e-3, 1e-3]), conc=np.array([0.2] * 3))):
        with pytest.warns(RuntimeWarning, match="robust"):
            out = cluster_layers(df)
        assert set(out.cluster) == {"robust"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cluster_layers(_metrics(np.array([1e-3, 1e-5])))
    assert list(out.cluster) == ["sensitive", "robust"]


def test_unknown_method_and_features():
    df = _metrics(np.array([1e-3, 1e-4, 1e-2]))
    with pytest.raises(HilalError, match="kmeans, gmm, agglomerative"):
        cluster_layers(df, method="dbscan")
    with pytest.raises(HilalError, match="eli-only"):
        cluster_layers(df, features="nope")
    with pytest.raises(HilalError, match="unknown clustering feature"):
        cluster_layers(df, features=("colour",))
    bad = df.copy()
    bad.loc[0, "concentration"] = np.nan
    with pytest.raises(HilalError, match="l0"):
        cluster_layers(bad)
