"""Side-by-side speed benchmarks (``hilal bench hessian|search|analog``).

Both sides of every comparison run in the same process, interleaved within each repeat, and the reported
ratio is the ratio of the medians over repeats, so background load affects both sides alike.

- ``hessian``: Hessian traces and the expected loss increase (ELI) of every mappable layer, from the joint
  pass (:mod:`hilal.hessian`: exact Gauss-Newton blocks where the network is piecewise linear in each weight,
  else one HVP per probe / noise sample for all layers) versus PyHessian's ``hessian``
  class run one layer at a time (only that layer's weight requiring grad; ``.trace()`` for the traces and
  ``pyhessian.utils.hessian_vector_product`` on the same noise samples for the ELI quadratic term). Same data,
  same number of probes and the same noise samples on both sides.
- ``search``: ``run_mapping("hilal")`` versus ``run_mapping("lionheart")`` with one :class:`MappingConfig`.
- ``analog``: forward time of the all-analog aihwkit model versus the digital one, and one drift evaluation.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from hilal.paths import atomic_json_dump
from hilal.registry import HilalError, check_choice
from hilal.runtime import machine_info, utc_now

KINDS = ("hessian", "search", "analog")


@dataclass
class BenchConfig:
    """Sizes of the benchmarks (``quick`` shrinks them)."""

    models: tuple[str, ...] = ("resnet8", "resnet20", "vit_tiny")
    """Models (``hilal.models.MODELS``); names not registered are skipped with a note."""
    dataset: str = "digits"
    """Dataset (``hilal.data.DATASETS``)."""
    preset: str = "pcm_harsh"
    """aihwkit preset for noise samples, mappings and analog models."""
    repeats: int = 3
    """Timed repeats per side; medians are reported."""
    seed: int = 0
    """Seed of the dataset split, training, probes and noise."""
    probes: int = 32
    """hessian: Hutchinson probes per layer (both sides)."""
    eli_samples: int = 16
    """hessian: noise samples for the ELI (both sides)."""
    max_samples: int = 512
    """hessian: calibration samples (one batch, both sides)."""
    t_inference: float = 86400.0
    """hessian/analog: inference time (s) of the noise samples and of the drift evaluation."""
    search_models: tuple[str, ...] = ("resnet8", "resnet20")
    """search: models to map."""
    mapping: dict[str, Any] = field(default_factory=dict)
    """search: overrides of :class:`hilal.mapping.MappingConfig` (the same for both methods)."""
    mapping_seeds: tuple[int, ...] = (0,)
    """search: mapping seeds (noise, shuffling, evaluation programmings; same trained model), one record
    each; the table adds the median over seeds per model and method."""
    recheck_reps: int = 50
    """search: programmings of each method's final mapping on the calibration split, with seeds its search
    never drew (:func:`hilal.mapping.recheck`, untimed, first repeat): whether the mapping holds the floor
    it was accepted at. 0 turns it off."""
    forward_iters: int = 20
    """analog: forward passes per timed repeat."""
    batch_size: int = 256
    """analog: batch of test inputs for the forward timing."""
    device: str = "cpu"
    """Device of the models and data (``cpu`` or ``cuda``); PyHessian's side runs there too."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default). On a shared, loaded CPU, 1 avoids the large slow-down
    of oversubscribed OpenMP threads."""

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """Smaller sizes for a quick look (minutes on a laptop CPU)."""
        base = cls(repeats=1, probes=16, eli_samples=8, max_samples=256, forward_iters=5,
                   recheck_reps=10, mapping={"reps": 5, "max_rounds": 4})
        if "mapping" in overrides:  # settings of the mapping go on top of the quick sizes
            overrides = {**overrides, "mapping": {**base.mapping, **overrides["mapping"]}}
        return replace(base, **overrides)


def _median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, float)))


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _registered(names: Sequence[str], notes: list[str]) -> list[str]:
    from hilal.models import MODELS

    known = set(MODELS.names()) if hasattr(MODELS, "names") else set(MODELS)
    out = []
    for n in names:
        if n in known:
            out.append(n)
        else:
            notes.append(f"model {n!r} is not in the MODELS registry; skipped")
    return out


def _trained(name: str, splits: Any, seed: int, device: str = "cpu") -> nn.Module:
    from hilal.train import trained_model

    return trained_model(name, splits, seed=seed, progress=False).to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# hessian: joint pass versus PyHessian one layer at a time


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
    from hilal.hessian import (
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
    from hilal.hessian import HessianOperator, OutputOperator

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


def bench_hessian(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model: times (median over repeats) and HVP counts of both sides, the speed-up, and the
    agreement of the estimates (relative difference, and difference in units of the combined Monte-Carlo
    standard error)."""
    from hilal.data import load_dataset

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    for name in _registered(cfg.models, notes):
        yield _hessian_one(name, splits, cfg, progress)


def _hessian_one(name: str, splits: Any, cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    from hilal.analog import mappable_layers
    from hilal.hessian import HessianConfig, calibration_batches, sample_weight_noise
    from hilal.train import to_device

    model = _trained(name, splits, cfg.seed, cfg.device)
    layers = mappable_layers(model)
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


# ---------------------------------------------------------------------------------------------------------
# search: HILAL versus LionHeart under one MappingConfig


def warm_up() -> None:
    """Import what the mapping methods import on first use, so that the method timed first in a process does
    not pay for the process's one-time imports: torch's optimizers load ``torch._dynamo`` when the first one
    is built (about 2 s of a 32 s HILAL mapping of ResNet-8 on a 2-core EPYC VM), and HILAL loads the
    curvature and clustering modules (PyHessian, scikit-learn)."""
    import sklearn.cluster  # noqa: F401
    import sklearn.mixture  # noqa: F401
    import torch._dynamo  # noqa: F401

    import hilal.cluster  # noqa: F401
    import hilal.hessian  # noqa: F401


def warm_up_model(model: nn.Module, splits: Any, cfg: Any) -> None:
    """Run, untimed, each kind of work the two mapping methods do on ``model``, once and cheaply, on the shapes
    they use: a curvature pass (HILAL's), two noise-injection training steps on an all-analog copy (both
    methods' retraining) and one noisy evaluation of it (every step's). The first call of a kernel on a new
    shape pays one-time costs (allocations, oneDNN primitives: about 0.8 s of ResNet-8's first curvature
    pass in a process on a 2-core Xeon), which the method timed first would otherwise pay. ``cfg`` is the
    :class:`hilal.mapping.MappingConfig` the methods will run with; torch's random state is left as it was."""
    from hilal.analog import mappable_layers, to_analog
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
    from hilal.data import load_dataset
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


# ---------------------------------------------------------------------------------------------------------
# analog: aihwkit simulation overhead


def bench_analog(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model: median time of ``forward_iters`` forward passes of the digital model and of the
    all-analog model (eval mode, unprogrammed), and of one drift evaluation (``noisy_scores`` with
    ``reps=1`` on the test split) next to one digital evaluation."""
    from hilal.data import load_dataset, loader

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    x = next(iter(loader(splits.test, batch_size=cfg.batch_size)))[0]
    for name in _registered(cfg.models, notes):
        yield _analog_one(name, splits, x, cfg, progress)


def _analog_one(name: str, splits: Any, x: torch.Tensor, cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    from hilal.analog import mappable_layers, to_analog
    from hilal.evaluate import noisy_scores
    from hilal.train import score

    model = _trained(name, splits, cfg.seed, cfg.device)
    x = x.to(cfg.device)
    analog = to_analog(model, mappable_layers(model), cfg.preset).eval()

    @torch.no_grad()
    def forwards(m: nn.Module) -> None:
        for _ in range(cfg.forward_iters):
            m(x)

    forwards(model), forwards(analog)  # warm-up
    t: dict[str, list[float]] = {"digital": [], "analog": [], "drift": [], "digital_eval": []}
    for r in range(cfg.repeats):
        t["digital"].append(_clock(lambda: forwards(model))[0] / cfg.forward_iters)
        t["analog"].append(_clock(lambda: forwards(analog))[0] / cfg.forward_iters)
        t["digital_eval"].append(_clock(lambda: score(model, splits, "test"))[0])
        t["drift"].append(_clock(lambda r=r: noisy_scores(analog, splits, cfg.t_inference, 1, cfg.seed + r))[0])
    rec = {"model": name, "dataset": cfg.dataset, "preset": cfg.preset, "batch": int(x.shape[0]),
           "layers": len(mappable_layers(model)), "digital_s": _median(t["digital"]),
           "analog_s": _median(t["analog"]), "drift_eval_s": _median(t["drift"]),
           "digital_eval_s": _median(t["digital_eval"])}
    rec["overhead"] = rec["analog_s"] / rec["digital_s"]
    rec["drift_eval_overhead"] = rec["drift_eval_s"] / rec["digital_eval_s"]
    if progress:
        print(f"[bench analog] {name}: digital {rec['digital_s'] * 1e3:.2f} ms, analog "
              f"{rec['analog_s'] * 1e3:.2f} ms, drift eval {rec['drift_eval_s']:.3f}s", flush=True)
    return rec


# ---------------------------------------------------------------------------------------------------------
# tables and the entry point

BENCHES: dict[str, Callable[[BenchConfig, list[str], bool], Iterator[dict[str, Any]]]] = {
    "hessian": bench_hessian, "search": bench_search, "analog": bench_analog}


def table(kind: str, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The summary table of a benchmark's records (what is printed and shown in the README)."""
    check_choice("kind", kind, KINDS)
    if kind == "hessian":
        cols = ["model", "layers", "curvature", "hvps_joint", "hvps_per_layer", "joint_s", "per_layer_s", "speedup",
                "output_hvp_cost_ratio", "max_rel_diff", "max_z_trace", "max_z_eli", "se_ratio_trace", "se_ratio_eli",
                "equal_error_speedup"]
        return pd.DataFrame([r if "equal_error_speedup" in r else agreement(dict(r)) for r in records], columns=cols)
    if kind == "analog":
        return pd.DataFrame(records, columns=["model", "layers", "batch", "digital_s", "analog_s", "overhead",
                                              "digital_eval_s", "drift_eval_s", "drift_eval_overhead"])
    rows = []
    for r in records:
        for method in ("hilal", "lionheart"):
            d = r[method]
            rows.append({"model": r["model"], "seed": r.get("mapping_seed", 0), "method": method,
                         "search_s": d["timings"]["search_s"],
                         "mapping_s": d["timings"]["mapping_s"], "total_s": d["timings"]["total_s"],
                         "rounds": d["rounds"], "analog_layers": f"{len(d['analog_layers'])}/{d['n_layers']}",
                         "analog_mac_share": d["analog_mac_share"], "accuracy_mean": d["accuracy_mean"],
                         "accuracy_std": d["accuracy_std"], "fp_accuracy": d["fp_accuracy"],
                         "floor_margin": d.get("recheck", {}).get("margin", np.nan),
                         "speedup": r["speedup"] if method == "hilal" else 1.0})
    df = pd.DataFrame(rows)
    if df["seed"].nunique() > 1:  # the median over mapping seeds, per model and method
        num = ["search_s", "mapping_s", "total_s", "rounds", "analog_mac_share", "accuracy_mean", "accuracy_std",
               "fp_accuracy", "floor_margin", "speedup"]
        med = df.groupby(["model", "method"], sort=False)[num].median().reset_index()
        df = pd.concat([df, med.assign(seed="median", analog_layers="")], ignore_index=True)[df.columns]
    return df


TARGET_SPEEDUP = 5.0
"""The speed-up HILAL's total time should reach against LionHeart's (issue target, ``search_criteria``)."""


def search_criteria(records: Sequence[dict[str, Any]], target: float = TARGET_SPEEDUP) -> pd.DataFrame:
    """Per model, over its mapping seeds: how often HILAL meets each criterion against LionHeart, and the
    medians behind them. ``speedup`` (median, with ``speedup_min``/``speedup_max``) and ``fast_seeds``, the
    seeds at ``target`` or more; ``share_*`` the analog MAC shares and ``share_seeds`` the seeds where
    HILAL's is at least as high; ``acc_*`` the test accuracies and ``acc_seeds`` the seeds where HILAL's is
    at least as high (both start from the same digital model, so its drop is no larger); ``holds_*`` the
    seeds whose final mapping holds its floor on fresh programmings, ``margin_*`` the median margins
    (fractions) and ``pass_*`` the median chance that one more run of the search's acceptance test, on
    fresh programmings, passes the final mapping (:func:`hilal.mapping.fresh_pass_rate`; the last three NaN
    without a recheck); ``all_seeds`` the seeds that meet the first three at once."""
    from hilal.mapping import fresh_pass_rate

    if not records:
        raise HilalError("no search records to summarize")
    rows = []
    for r in records:
        h, lh = r["hilal"], r["lionheart"]
        rows.append({"model": r["model"], "seed": int(r.get("mapping_seed", 0)), "speedup": r["speedup"],
                     **{f"{k}_{m}": d[f] for m, d in (("hilal", h), ("lionheart", lh))
                        for k, f in (("share", "analog_mac_share"), ("acc", "accuracy_mean"))},
                     **{f"{k}_{m}": d.get("recheck", {}).get(f, np.nan) for m, d in (("hilal", h), ("lionheart", lh))
                        for k, f in (("holds", "holds_floor"), ("margin", "margin"))},
                     **{f"pass_{m}": fresh_pass_rate(d["recheck"], r["config"]["reps"]) if "recheck" in d else np.nan
                        for m, d in (("hilal", h), ("lionheart", lh))}})
    df = pd.DataFrame(rows)
    dup = df[df.duplicated(["model", "seed"])]
    if len(dup):
        raise HilalError(f"{dup['model'].iat[0]} mapping seed {dup['seed'].iat[0]} appears twice; pass each "
                         "seed's record once")
    df["fast"] = df["speedup"] >= target
    df["share"] = df["share_hilal"] >= df["share_lionheart"] - 1e-12  # one set of layers: the same float
    df["acc"] = df["acc_hilal"] >= df["acc_lionheart"]
    df["all"] = df["fast"] & df["share"] & df["acc"]

    def count(x: pd.Series) -> float:  # NaN when a record has no recheck
        return int(x.astype(float).sum()) if x.notna().all() else np.nan

    return df.groupby("model", sort=False).agg(
        seeds=("seed", "size"), speedup=("speedup", "median"), speedup_min=("speedup", "min"),
        speedup_max=("speedup", "max"), fast_seeds=("fast", "sum"), share_hilal=("share_hilal", "median"),
        share_lionheart=("share_lionheart", "median"), share_seeds=("share", "sum"),
        acc_hilal=("acc_hilal", "median"), acc_lionheart=("acc_lionheart", "median"), acc_seeds=("acc", "sum"),
        all_seeds=("all", "sum"), holds_hilal=("holds_hilal", count), holds_lionheart=("holds_lionheart", count),
        margin_hilal=("margin_hilal", "median"), margin_lionheart=("margin_lionheart", "median"),
        pass_hilal=("pass_hilal", "median"), pass_lionheart=("pass_lionheart", "median")).reset_index()


def load_bench(path: str | Path) -> dict[str, Any]:
    """A JSON file written by :func:`run_bench` (missing or unreadable files get a one-line error)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise HilalError(f"no benchmark file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HilalError(f"{str(path)!r} is not a benchmark JSON file ({e})") from None
    if not isinstance(data, dict) or "records" not in data:
        raise HilalError(f"{str(path)!r} is not a benchmark JSON file (no records)")
    return data


def search_records(paths: Sequence[str | Path], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of one or more JSON files written by the ``search`` benchmark, in order; a file left by an
    interrupted run (``complete`` false) is read too, with a line in ``notes``."""
    records: list[dict[str, Any]] = []
    for p in paths:
        path, data = Path(p), load_bench(p)
        if data.get("kind") != "search":
            raise HilalError(f"{str(path)!r} holds a {data.get('kind')!r} benchmark; the criteria need 'search' files")
        if not data.get("complete", True) and notes is not None:
            notes.append(f"{path} is from an interrupted run: {len(data['records'])} record(s)")
        records += data["records"]
    return records


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table of ``df`` for the README (floats to ``digits`` significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def markdown_from_json(path: str | Path) -> str:
    """The README table of a JSON file written by :func:`run_bench`."""
    data = load_bench(path)
    return markdown(table(data["kind"], data["records"]))


def run_bench(kind: str, out: str | Path | None = None, quick: bool = False, progress: bool = True,
              **overrides: Any) -> dict[str, Any]:
    """Run one benchmark, print its table, and write ``{"kind", "machine", "config", "records", "notes"}`` as
    JSON to ``out`` (if given). ``overrides`` set :class:`BenchConfig` fields."""
    check_choice("kind", kind, KINDS)
    valid = {f.name for f in fields(BenchConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise HilalError(f"unknown benchmark setting(s) {bad}; valid: {sorted(valid)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    cfg = BenchConfig.quick(**overrides) if quick else BenchConfig(**overrides)
    if cfg.device != "cpu" and not (cfg.device.startswith("cuda") and torch.cuda.is_available()):
        raise HilalError(f"device {cfg.device!r} is not available here; valid: 'cpu'"
                         + (", 'cuda'" if torch.cuda.is_available() else " (no CUDA GPU found)"))
    notes: list[str] = []
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []

    def result(complete: bool) -> dict[str, Any]:
        machine = {**machine_info(cfg.device), "date": utc_now("seconds")}
        return {"kind": kind, "quick": quick, "complete": complete, "machine": machine,
                "config": asdict(cfg), "records": records, "notes": notes, "wall_s": time.perf_counter() - t0}

    try:
        for rec in BENCHES[kind](cfg, notes, progress):
            records.append(rec)
            if out is not None:  # a partial file after every model, so that a long run leaves its results
                atomic_json_dump(result(False), out)
        final = result(True)
    finally:
        torch.set_num_threads(old_threads)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
        print(table(kind, records).to_string(index=False))
        if kind == "search" and len(cfg.mapping_seeds) > 1 and records:
            print(search_criteria(records).to_string(index=False))
    for n in notes:
        print("note:", n)
    if out is not None:
        atomic_json_dump(final, out)
        print(f"-> {out}")
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bench/*.py`` scripts: ``KIND`` and the options of :func:`hilal.cli.add_bench_options`;
    the output defaults to ``bench/results/KIND.json``. ``search --criteria F [F ...]`` prints
    :func:`search_criteria` of finished result files instead of running."""
    from hilal.cli import add_bench_options

    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS)
    add_bench_options(p)
    return run_args(p.parse_args(argv))


def run_args(a: argparse.Namespace) -> int:
    """Run the benchmark that parsed options ``a`` (of :func:`hilal.cli.add_bench_options`, plus ``kind``)
    describe, or with ``criteria`` print the criteria table of those files."""
    if a.criteria:
        if a.kind != "search":
            raise HilalError(f"--criteria summarizes search results; got kind {a.kind!r}")
        notes: list[str] = []
        print(markdown(search_criteria(search_records(a.criteria, notes))))
        for n in notes:
            print("note:", n)
        return 0
    from hilal.cli import retraining_overrides
    from hilal.paths import project_root
    from hilal.runtime import keep_freed_memory

    mapping = retraining_overrides(a)
    if mapping and a.kind != "search":
        raise HilalError(f"--confirm, --distill and --temperature set how the search benchmark retrains; got kind "
                         f"{a.kind!r}")
    keep_freed_memory()

    out = a.out or project_root() / "bench" / "results" / f"{a.kind}.json"
    models = tuple(a.models.split(",")) if a.models else None
    key = "search_models" if a.kind == "search" else "models"
    seeds = tuple(int(x) for x in a.seeds.split(",")) if a.seeds else None
    run_bench(a.kind, out=out, quick=a.quick, repeats=a.repeats, threads=a.threads, probes=a.probes,
              eli_samples=a.samples, mapping_seeds=seeds, device=a.device, seed=a.train_seed, mapping=mapping or None,
              **{key: models})
    return 0


def script(kind: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bench/KIND.py``: :func:`main` on the command line, bad input reported as one line on
    stderr (exit status 2), as ``hilal bench`` does."""
    try:
        return main([kind, *(sys.argv[1:] if argv is None else argv)])
    except HilalError as e:
        print(f"bench {kind}: error: {e}", file=sys.stderr)
        return 2
