"""``hessian`` benchmark: the joint curvature pass (:mod:`hilal.hessian`) versus PyHessian one layer at a time,
on the same data, probes and noise samples, and how far their estimates agree."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from hilal.bench.config import BenchConfig, _clock, _median, _registered, _trained


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-12)


def _z(a: np.ndarray, sa: np.ndarray, b: np.ndarray, sb: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.maximum(np.sqrt(sa**2 + sb**2), 1e-30)


def joint_estimates(model: nn.Module, batch: Any, layers: Sequence[str], noise: Sequence[Sequence[torch.Tensor]],
                    probes: int, seed: int) -> dict[str, Any]:
    """Traces and ELI of all layers the way :func:`hilal.hessian.layer_metrics` gets them in ``joint`` mode:
    exact Gauss-Newton blocks where they are the Hessian blocks (checked with one block HVP per layer), else
    output-space HVPs for all layers, probes and signs drawn per sample: the trace probes shared out over the
    default gradient strata (``hvps`` counts products over all samples), one product per noise sample."""
    from hilal.hessian import (  # local: the report loads hilal.bench without the kit
        HessianConfig,
        OutputOperator,
        gauss_newton,
        output_loss_increase,
        output_traces,
        strata_for,
        weight_output_errors,
    )

    gn = gauss_newton(model, [batch], layers, seed=seed)
    strata = strata_for(HessianConfig().strata, probes, int(batch[0].shape[0]))
    op = gn if gn is not None else OutputOperator(model, [batch], layers, strata)
    trace, trace_se = output_traces(op, probes, seed)
    eli = output_loss_increase(op, weight_output_errors(op, noise), "joint", seed)
    return {"trace": trace, "trace_se": trace_se, "eli": eli["eli"], "eli_se": eli["eli_se"],
            "hvps": len(layers) if gn is not None else round(op.full_hvps),
            "curvature": "hvp" if gn is None else "gauss-newton",
            "gauss_newton_mismatch": float("nan") if gn is None else gn.check}


def pyhessian_estimates(model: nn.Module, batch: Any, layers: Sequence[str],
                        noise: Sequence[Sequence[torch.Tensor]], probes: int) -> dict[str, Any]:
    """The same estimates the way a PyHessian user gets them: for each layer a ``pyhessian.hessian`` object
    with only that layer's weight requiring grad, ``.trace(maxIter=probes)`` (tolerance disabled so that
    exactly ``probes`` probes run) and one ``hessian_vector_product`` per noise sample for the ELI."""
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import group_product, hessian_vector_product

    mods = dict(model.named_modules())
    x, y = batch[0], batch[1]
    flags = {p: p.requires_grad for p in model.parameters()}
    n, s = len(layers), len(noise)
    trace, trace_se, eli, eli_se = (np.empty(n) for _ in range(4))
    hvps = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # PyHessian reads the gradient from .grad, which backward() accumulates into
        for i, name in enumerate(layers):
            w = mods[name].weight
            w.requires_grad_(True)
            with warnings.catch_warnings():  # PyHessian's backward(create_graph=True) warns about .grad cycles
                warnings.simplefilter("ignore")
                h = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
                vals = np.asarray(h.trace(maxIter=probes, tol=-1.0), float)
            g = h.gradsH[0].detach()
            per_sample = np.empty(s)
            for k, dw in enumerate(noise):
                hv = hessian_vector_product(h.gradsH, h.params, [dw[i]])
                per_sample[k] = float(group_product([g], [dw[i]])) + 0.5 * float(group_product(hv, [dw[i]]))
            hvps += len(vals) + s
            trace[i], trace_se[i] = vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else np.nan
            eli[i], eli_se[i] = per_sample.mean(), per_sample.std(ddof=1) / np.sqrt(s) if s > 1 else np.nan
            w.grad = None  # drops the create_graph gradient and with it the graph
            w.requires_grad_(False)
            del h
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
    return {"trace": trace, "trace_se": trace_se, "eli": eli, "eli_se": eli_se, "hvps": hvps}


def agreement(record: dict[str, Any]) -> dict[str, Any]:
    """Derived fields of a hessian record from its per-layer ``estimates``: the median ratio of the joint to
    the per-layer Monte-Carlo standard error (traces, ELI) and ``equal_error_speedup``, the speed-up once the
    joint pass is given the (se ratio)^2 times more probes it needs for the per-layer error (the random-sign
    cross terms add variance). Fills ``record`` in place and returns it."""
    est = pd.DataFrame(record["estimates"])
    for k in ("trace", "eli"):
        ratio = est[f"{k}_joint_se"] / est[f"{k}_pyhessian_se"].where(est[f"{k}_pyhessian_se"] > 0)
        record[f"se_ratio_{k}"] = float(ratio.median())
    worst = max(record["se_ratio_trace"], record["se_ratio_eli"])
    record["equal_error_speedup"] = float(record["speedup"] / worst**2) if worst > 0 else float("nan")
    return record


def hvp_costs(model: nn.Module, batch: Any, layers: Sequence[str], repeats: int = 3) -> dict[str, float]:
    """Median seconds of one full HVP (all layers), of one output-space HVP (with respect to every layer's
    output, what the joint pass takes) and of the L block-restricted HVPs (one per layer) on the same data.
    ``output_hvp_cost_ratio`` (blocks over one output-space HVP) bounds what the joint pass can gain over a
    per-layer loop at equal probe counts, graph builds aside: a late layer's block HVP stops early in the
    double backward, so it costs far less than a full one."""
    from hilal.hessian import HessianOperator, OutputOperator  # local: the report loads hilal.bench without the kit

    op = HessianOperator(model, [batch], layers)
    out = OutputOperator(model, [batch], layers)
    gen = torch.Generator().manual_seed(0)
    v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in op.params]
    e = [(torch.randint(0, 2, z.shape, generator=gen) * 2 - 1).to(z) for z in out.zs[0]]
    full, output, blocks = [], [], []
    for _ in range(repeats):
        full.append(_clock(lambda: op.hvp(v))[0])
        output.append(_clock(lambda: out.hvp(0, e))[0])
        blocks.append(_clock(lambda: [op.block_hvp(i, v[i]) for i in range(len(v))])[0])
    f, o, b = _median(full), _median(output), _median(blocks)
    return {"full_hvp_s": f, "output_hvp_s": o, "block_hvps_s": b, "hvp_cost_ratio": b / f,
            "output_hvp_cost_ratio": b / o}


PASS_SIDES = ("batched", "sampled", "loop")
"""Sides of :func:`curvature_pass`: the default settings; the same without the first-order surrogate
(``first_order="sampled"``); all draws from aihwkit one programming at a time (the path before both)."""


def curvature_pass(model: nn.Module, splits: Any, cfg: BenchConfig) -> dict[str, Any]:
    """:func:`hilal.hessian.layer_metrics` at its default settings (noise draws batched, first-order terms
    around their closed-form surrogate, stopped by the sequential rule: ``batched``) against the sides of
    ``cfg.pass_sides`` (:data:`PASS_SIDES`), the last one the reference: each side's pass and ELI seconds,
    the ELI's share of the pass, its draws (the mean over layers; per layer in ``pass_estimates``), and the
    ELI's agreement with the reference in units of the combined standard error (the sides share their first
    draws, so these z-scores understate a disagreement)."""
    from hilal.hessian import HessianConfig, layer_metrics  # local: the report loads hilal.bench without the kit

    base = {"max_samples": cfg.max_samples, "t_inference": cfg.t_inference, "seed": cfg.seed}
    configs = {"batched": HessianConfig(**base), "sampled": HessianConfig(**base, first_order="sampled"),
               "loop": HessianConfig(**base, noise_draws="loop", eli_rtol=0.0)}
    sides = ["batched", *[s for s in cfg.pass_sides if s != "batched"]]
    out: dict[str, Any] = {"pass_reference": sides[-1]}
    tables = {}
    for side in sides:
        hc = configs[side]
        t, df = _clock(lambda hc=hc: layer_metrics(model, splits, cfg.preset, hc, progress=False))
        tables[side] = df
        out.update({f"pass_{side}_s": t, f"eli_{side}_s": df.attrs["eli_s"],
                    f"eli_share_{side}": df.attrs["eli_s"] / df.attrs["total_s"],
                    f"eli_draws_{side}": float(np.mean(df.attrs["eli_draws"]))})
    ref = sides[-1]
    b, lp = tables["batched"], tables[ref]
    z = _z(b["eli"].to_numpy(), b["eli_se"].to_numpy(), lp["eli"].to_numpy(), lp["eli_se"].to_numpy())
    out.update({"pass_speedup": out[f"pass_{ref}_s"] / out["pass_batched_s"], "pass_max_z_eli": float(z.max()),
                "pass_median_z_eli": float(np.median(z)),
                "pass_estimates": pd.DataFrame({"layer": b["layer"], "eli_batched": b["eli"],
                                                "eli_batched_se": b["eli_se"], "eli_ref": lp["eli"],
                                                "eli_ref_se": lp["eli_se"], "z": z,
                                                "draws_batched": b.attrs["eli_draws"],
                                                "draws_ref": lp.attrs["eli_draws"]}).to_dict(orient="records")})
    return out


def bench_hessian(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model: times (median over repeats) and HVP counts of both sides, the speed-up, and the
    agreement of the estimates (relative difference, and difference in units of the combined Monte-Carlo
    standard error)."""
    from hilal.data import load_dataset  # local: the report loads hilal.bench without the kit

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    for name in _registered(cfg.models, notes):
        yield _hessian_one(name, splits, cfg, progress)


def _hessian_one(name: str, splits: Any, cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    from hilal.analog import mappable_layers  # local: the report loads hilal.bench without the kit
    from hilal.device import to_device
    from hilal.hessian import HessianConfig, calibration_batches, sample_weight_noise

    model = _trained(name, splits, cfg.seed, cfg.device)
    layers = mappable_layers(model)
    if not cfg.pyhessian:
        return {"model": name, "dataset": cfg.dataset, "preset": cfg.preset, "layers": len(layers),
                "samples": cfg.max_samples, **(curvature_pass(model, splits, cfg) if cfg.curvature_pass else {})}
    (batch,) = calibration_batches(splits, HessianConfig(max_samples=cfg.max_samples, batch_size=cfg.max_samples))
    batch = to_device(batch, torch.device(cfg.device))
    noise_s, noise = _clock(lambda: sample_weight_noise(model, layers, cfg.preset, cfg.t_inference,
                                                        cfg.eli_samples, cfg.seed))
    sides = [("joint", lambda: joint_estimates(model, batch, layers, noise, cfg.probes, cfg.seed)),
             ("per_layer", lambda: pyhessian_estimates(model, batch, layers, noise, cfg.probes))]
    times: dict[str, list[float]] = {"joint": [], "per_layer": []}
    first: dict[str, dict[str, Any]] = {}
    for r in range(cfg.repeats):
        for side, fn in sides if r % 2 == 0 else sides[::-1]:
            t, est = _clock(fn)
            times[side].append(t)
            first.setdefault(side, est)
        if progress:
            print(f"[bench hessian] {name} repeat {r + 1}/{cfg.repeats}: joint {times['joint'][-1]:.2f}s, "
                  f"per-layer {times['per_layer'][-1]:.2f}s", flush=True)
    joint, pl = first["joint"], first["per_layer"]
    joint_t, pl_t = times["joint"], times["per_layer"]
    costs = hvp_costs(model, batch, layers, max(cfg.repeats, 3))
    if cfg.curvature_pass:
        costs.update(curvature_pass(model, splits, cfg))
    rel_tr, rel_eli = _rel(joint["trace"], pl["trace"]), _rel(joint["eli"], pl["eli"])
    z_tr = _z(joint["trace"], joint["trace_se"], pl["trace"], pl["trace_se"])
    z_eli = _z(joint["eli"], joint["eli_se"], pl["eli"], pl["eli_se"])
    est = pd.DataFrame({"layer": layers, "trace_joint": joint["trace"], "trace_joint_se": joint["trace_se"],
                        "trace_pyhessian": pl["trace"], "trace_pyhessian_se": pl["trace_se"],
                        "eli_joint": joint["eli"], "eli_joint_se": joint["eli_se"], "eli_pyhessian": pl["eli"],
                        "eli_pyhessian_se": pl["eli_se"], "trace_z": z_tr, "eli_z": z_eli})
    js, ps = _median(joint_t), _median(pl_t)
    return agreement({
        "model": name, "dataset": cfg.dataset, "preset": cfg.preset, "layers": len(layers),
        "samples": int(batch[0].shape[0]), "probes": cfg.probes, "eli_samples": cfg.eli_samples,
        "hvps_joint": int(joint["hvps"]), "hvps_per_layer": int(pl["hvps"]), "curvature": joint["curvature"],
        "gauss_newton_mismatch": joint["gauss_newton_mismatch"],
        "joint_s": js, "per_layer_s": ps, "speedup": ps / js, "target_speedup": 0.5 * len(layers),
        "joint_times": joint_t, "per_layer_times": pl_t, "noise_s": noise_s, **costs,
        "max_rel_diff": float(max(rel_tr.max(), rel_eli.max())),
        "max_rel_diff_trace": float(rel_tr.max()), "max_rel_diff_eli": float(rel_eli.max()),
        "median_rel_diff_trace": float(np.median(rel_tr)), "median_rel_diff_eli": float(np.median(rel_eli)),
        "max_z_trace": float(z_tr.max()), "max_z_eli": float(z_eli.max()),
        "mean_rel_se_trace": float(np.mean(joint["trace_se"] / np.maximum(np.abs(joint["trace"]), 1e-12))),
        "estimates": est.to_dict(orient="records"),
    })
