"""Noise attribution: which analog non-ideality costs the accuracy. Each source of a preset (programming
noise, drift, read noise, DAC and ADC resolution, output noise, I/O clipping) switched on alone
(:func:`source_config`), all together, or none, measured all-analog and one layer at a time
(:func:`attribution_table`), and set against the ELI's prediction in weight and output space
(:func:`eli_capture`). Weight clipping and remapping are no source here: aihwkit applies them only in training
(the ``pcm_hilal`` test in tests/test_analog.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from aihwkit.simulator.configs import TorchInferenceRPUConfig
from aihwkit.simulator.parameters import BoundManagementType
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import check_layers, get_preset, mappable_layers, to_analog
from hilal.data import Splits
from hilal.evaluate import _loss_and_accuracy, per_repetition
from hilal.hessian import (
    HessianConfig,
    HessianOperator,
    OutputOperator,
    calibration_batches,
    expected_loss_increase,
    output_error_stream,
    output_loss_increase,
    weight_noise_stream,
)
from hilal.registry import HilalError

WEIGHT_SOURCES = ("programming", "drift", "read")
"""Sources that perturb the programmed conductances (what the weight-space ELI models)."""
IO_SOURCES = ("dac", "adc", "output", "clipping")
"""Sources of the periphery: input and output quantization, additive output noise, I/O range clipping."""
SOURCES = (*WEIGHT_SOURCES, *IO_SOURCES, "all", "none")
"""Every choice of :func:`source_config`: one source alone, the preset as it is (``all``), or no noise."""


def check_sources(sources: Sequence[str]) -> list[str]:
    """``sources`` as a list, or a one-line HilalError naming the valid ones."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise HilalError(f"unknown noise source(s) {bad or sources!r}; valid choices: {', '.join(SOURCES)}")
    return sources


def source_config(preset: str | TorchInferenceRPUConfig, source: str | Sequence[str], alone: bool = True
                  ) -> TorchInferenceRPUConfig:
    """The preset with only ``source`` switched on, at the preset's own strength (``all``: the preset as it is;
    ``none``: no noise, exact converters, no bounds); with ``alone=False`` the preset with only ``source``
    switched off (what removing it recovers, interactions included). Drift keeps the preset's drift
    compensation. A sequence of sources switches those on together (``WEIGHT_SOURCES``: the weight noise with
    an exact periphery)."""
    if not isinstance(source, str):
        on = check_sources(source)
        if not alone or any(s in ("all", "none") for s in on):
            raise HilalError(f"several sources are switched on together (alone=True), without 'all' or 'none'; "
                             f"got {on!r} with alone={alone}")
        return _switch(get_preset(preset), on)
    check_sources([source])
    cfg = get_preset(preset)
    if not alone:
        if source in ("all", "none"):
            raise HilalError(f"alone=False needs one source, not {source!r}")
        on = [s for s in (*WEIGHT_SOURCES, *IO_SOURCES) if s != source]
    else:
        on = {"all": [*WEIGHT_SOURCES, *IO_SOURCES], "none": []}.get(source, [source])
    if source == "all":
        return cfg
    return _switch(cfg, on)


def noise_conditions(preset: str | Any, removed: Sequence[str] = IO_SOURCES) -> dict[str, Any]:
    """Labelled configs for :func:`hilal.validity.validity_table`'s ``presets``: the preset itself (under its
    name, or ``preset``), its weight noise alone with an exact periphery (``weights only``: programming, drift,
    read noise; what weight-space draws model), and the preset without each source of ``removed``
    (``without <source>``, :func:`source_config`). Why: where ELI reaches the ceiling under one condition and
    not under another, the sources that differ are what it misses. Note that ``without clipping`` also makes
    the ADC finer: aihwkit sets the ADC step to ``out_res`` times twice the output bound, and with no bound to
    ``out_res`` times 2 (12 times finer at the presets' bound of 12)."""
    removed = check_sources(removed) if len(removed) else []
    out = {preset if isinstance(preset, str) else "preset": preset,
           "weights only": source_config(preset, list(WEIGHT_SOURCES))}
    return out | {f"without {s}": source_config(preset, s, alone=False) for s in removed}


def _switch(cfg: TorchInferenceRPUConfig, on: Sequence[str]) -> TorchInferenceRPUConfig:
    """``cfg`` (changed in place) with every source not in ``on`` switched off."""
    nm, f = cfg.noise_model, cfg.forward
    for s, attr in {"programming": "prog_noise_scale", "drift": "drift_scale", "read": "read_noise_scale"}.items():
        if s not in on:
            setattr(nm, attr, 0.0)
    if "drift" not in on:
        cfg.drift_compensation = None
    f.is_perfect = not any(s in on for s in IO_SOURCES)  # the periphery off altogether when none of it is on
    if "dac" not in on:
        f.inp_res = -1.0
    if "adc" not in on:
        f.out_res = -1.0
    if "output" not in on:
        f.out_noise = 0.0
    if "clipping" not in on:
        f.out_bound = -1.0
        f.bound_management = BoundManagementType.NONE
    return cfg


def _measure(model: nn.Module, splits: Splits, layers: list[str], cfg: TorchInferenceRPUConfig, t: float,
             reps: int, seed: int, split: str, engine: str) -> tuple[float, float, float, float]:
    """Mean loss and accuracy of ``model`` with ``layers`` analog under ``cfg``, and their standard errors."""
    res = per_repetition(to_analog(model, layers, cfg), lambda m: _loss_and_accuracy(m, splits, split), t, reps,
                         seed, engine=engine)
    loss, acc = np.array([x[0] for x in res]), np.array([x[1] for x in res])
    se = (lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan"))  # noqa: E731
    return float(loss.mean()), float(acc.mean()), se(loss), se(acc)


def attribution_table(model: nn.Module, splits: Splits, preset: str = "pcm_harsh",
                      sources: Sequence[str] = SOURCES, times: Sequence[float] = (60.0, 86400.0),
                      reps: int = 10, per_layer: bool = False, layers: Sequence[str] | None = None, seed: int = 0,
                      split: str = "calib", engine: str = "batched", progress: bool = False,
                      removed: bool = False) -> pd.DataFrame:
    """One row per (source, time, scope): every ``layers`` analog (scope ``all-analog``), and with
    ``per_layer`` each layer alone (scope its name), under :func:`source_config` (``mode`` ``alone``; with
    ``removed`` also each single source switched off from the preset, ``mode`` ``removed``); mean loss and
    accuracy over ``reps`` programmings on ``split``, their increase and drop from the digital model, standard
    errors."""
    sources = check_sources(sources)
    layers = check_layers(model, layers if layers is not None else mappable_layers(model))
    if not times or any(float(t) <= 0 for t in times):
        raise HilalError(f"times must be positive seconds after programming, got {list(times)!r}")
    base_loss, base_acc = _loss_and_accuracy(model, splits, split)
    scopes = [("all-analog", layers)] + ([(n, [n]) for n in layers] if per_layer else [])
    rows = []
    modes = [(s, True) for s in sources] + ([(s, False) for s in sources if s not in ("all", "none")] if removed
                                            else [])
    jobs = [(s, a, float(t), sc) for s, a in modes for t in times for sc in scopes]
    for source, alone, t, (scope, names) in tqdm(jobs, desc="attribution", disable=not progress, leave=False):
        loss, acc, loss_se, acc_se = _measure(model, splits, names, source_config(preset, source, alone), t, reps,
                                              seed, split, engine)
        rows.append({"source": source, "mode": "alone" if alone else "removed", "t_inference": t, "scope": scope,
                     "loss": loss,
                     "loss_increase": loss - base_loss, "loss_increase_se": loss_se, "accuracy": acc,
                     "accuracy_drop": base_acc - acc, "accuracy_se": acc_se})
    return pd.DataFrame(rows)


def dominant_sources(table: pd.DataFrame, by: str = "accuracy_drop") -> pd.DataFrame:
    """Per time, all-analog: the single source that alone costs the most ``by`` (``all``/``none`` excluded) and
    its share of the preset's (``all``) cost; with ``removed`` rows, also the source whose removal recovers the
    most of it (interactions included) and that share."""
    t = table[table["scope"] == "all-analog"]
    mode = t["mode"] if "mode" in t else pd.Series("alone", index=t.index)
    alone, gone = t[(mode == "alone") & ~t["source"].isin(["all", "none"])], t[mode == "removed"]
    rows = []
    for time, g in alone.groupby("t_inference"):
        top = g.loc[g[by].idxmax()]
        allv = t[(t["source"] == "all") & (t["t_inference"] == time)][by]
        total = float(allv.iloc[0]) if len(allv) else float("nan")
        row = {"t_inference": time, "dominant_alone": top["source"], by: float(top[by]), f"all_{by}": total,
               "share_alone": float(top[by]) / total if total else float("nan")}
        r = gone[gone["t_inference"] == time]
        if len(r):
            rec = total - r.set_index("source")[by]
            row |= {"dominant_removed": rec.idxmax(), "recovered": float(rec.max()),
                    "share_removed": float(rec.max()) / total if total else float("nan")}
        rows.append(row)
    return pd.DataFrame(rows)


def eli_capture(model: nn.Module, splits: Splits, preset: str, table: pd.DataFrame, samples: int = 16,
                max_samples: int = 360, sources: Sequence[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """Per (source, time) of ``table``'s all-analog ``alone`` rows: the ELI summed over layers in weight space
    and in output space under that source alone (``samples`` aihwkit draws, joint estimator, on the first
    ``max_samples`` calibration samples), next to the measured loss increase, and their ratios (the share of
    the measured loss each predicts). The weight-space ELI of a periphery source is 0 by construction (it
    changes no weight) and is not computed."""
    t = table[table["scope"] == "all-analog"]
    t = t[t["mode"] == "alone"] if "mode" in t else t
    sources = check_sources(sources or [s for s in dict.fromkeys(t["source"]) if s != "none"])
    layers = mappable_layers(model)
    batches = calibration_batches(splits, HessianConfig(max_samples=max_samples))
    wop, oop = HessianOperator(model.eval(), batches, layers), OutputOperator(model, batches, layers)
    rows: list[dict[str, Any]] = []
    for source in sources:
        cfg = source_config(preset, source)
        for time in sorted(set(t.loc[t["source"] == source, "t_inference"])):
            measured = float(t[(t["source"] == source) & (t["t_inference"] == time)]["loss_increase"].iloc[0])
            w = 0.0 if source in IO_SOURCES else float(expected_loss_increase(
                wop, weight_noise_stream(model, layers, cfg, time, samples, seed), "joint", seed=seed)["eli"].sum())
            o = float(output_loss_increase(oop, output_error_stream(model, oop, cfg, time, samples, seed), "joint",
                                           seed=seed)["eli"].sum())
            nan = float("nan")
            rows.append({"source": source, "t_inference": time, "measured": measured, "eli_weight": w,
                         "eli_output": o, "captured_weight": w / measured if measured > 0 else nan,
                         "captured_output": o / measured if measured > 0 else nan})
    return pd.DataFrame(rows)


def compensation_factors(model: nn.Module, preset: str, t_inference: float, sources: Sequence[tuple[str, bool]],
                         seed: int = 0, layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Per layer, the global drift-compensation factor aihwkit estimates (its tiles' ``alpha``, averaged over a
    layer's tiles) after one seeded programming drifted to ``t_inference``, under each ``(source, alone)`` of
    :func:`source_config` that keeps drift. Why: the factor is read out through the periphery (one-hot inputs),
    so converter and output noise bias it; ``("drift", True)`` gives the factor with exact converters."""
    import torch

    from hilal.analog import analog_tiles

    layers = check_layers(model, layers if layers is not None else mappable_layers(model))
    rows = []
    for source, alone in sources:
        cfg = source_config(preset, source, alone)
        if cfg.drift_compensation is None:
            raise HilalError(f"source {source!r} (alone={alone}) has no drift compensation to read")
        net = to_analog(model, layers, cfg).eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            net.program_analog_weights()
            net.drift_analog_weights(float(t_inference))
        for name in layers:
            alphas = [float(t.alpha) for t in analog_tiles(net.get_submodule(name))]
            label = source if alone else f"without {source}"
            rows.append({"setting": label, "layer": name, "alpha": float(np.mean(alphas))})
    return pd.DataFrame(rows)
