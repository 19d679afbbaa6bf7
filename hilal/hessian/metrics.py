"""The per-layer table of curvature metrics, :func:`layer_metrics`: the settings checked, the operators built
within one graph budget, and every estimator run once, with HVP counts, graph builds and timings in its
``attrs``."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import ANALOG_TYPES, check_layers, count_macs, mappable_layers, to_analog
from hilal.data import LossFn, Splits
from hilal.device import model_device, to_device
from hilal.hessian.config import (
    COLUMNS,
    GAUSS_NEWTON,
    MODES,
    NOISE_DRAWS,
    NOISE_SPACES,
    HessianConfig,
    _batch_size_of,
    _truncate,
    calibration_batches,
)
from hilal.hessian.draws import draws_unsupported, layer_noise, surrogate_shift
from hilal.hessian.estimators import (
    expected_loss_increase,
    hutchinson_traces,
    output_loss_increase,
    output_traces,
    top_eigenvalues,
)
from hilal.hessian.gauss_newton import try_gauss_newton
from hilal.hessian.graphs import (
    GraphBudget,
)
from hilal.hessian.noise import (
    output_error_stream,
    weight_noise_stream,
    weight_output_errors,
)
from hilal.hessian.operators import HessianOperator, OutputOperator
from hilal.hessian.sequential import sequential_loss_increase
from hilal.hessian.strata import _check_strata, strata_for
from hilal.registry import HilalError, check_choice, is_count


def layer_metrics(model: nn.Module, splits: Splits | Sequence[Any], preset: Any = "pcm",
                  cfg: HessianConfig | None = None, layers: Sequence[str] | None = None,
                  progress: bool = True, loss_fn: LossFn | None = None) -> pd.DataFrame:
    """One row per mappable layer (model order): params, MACs, Hutchinson trace (+ standard error), top
    eigenvalue, concentration, and the noise-aware expected loss increase (+ first/second-order parts and
    standard error), all on the calibration data. ``df.attrs`` holds the HVP counts (``hvps`` and per
    part), backward calls, the sample strata the traces used (1: none), timings in seconds, the curvature
    used (``curvature``: ``gauss-newton`` or ``hvp``, and ``curvature_reason``; falling back from the exact
    blocks in ``joint`` mode is also warned about), and the graph builds (``graph_builds``, weight and output
    space) with the peak bytes kept (``graph_bytes_kept``). The loss is ``loss_fn`` when given, else the
    splits' own (:attr:`hilal.data.Splits.loss_fn`), else the task loss of the batches' kind; the exact
    Gauss-Newton blocks need the softmax cross-entropy, so a custom loss takes HVPs.

    Memory: the calibration batches' state is kept within ``cfg.graph_bytes`` and rebuilt beyond it, one
    build per batch and pass over the data (the estimates do not depend on the budget). With nothing kept
    (budget 0), B batches and P output-space pieces (the batches, or the gradient strata in pieces of at
    most the batch size), the weight-space graphs are built B times at construction and B times per pass of:
    the Gauss-Newton check (1 pass), power iteration without Gauss-Newton blocks (1 per iteration),
    ``per_layer`` traces (1) and ``per_layer`` weight-noise ELI (1 per group of draws held). The output-space
    state (graphs, or Gauss-Newton signals) is built once at construction, then P times per pass of: the
    Gauss-Newton check (1), traces (1; none on Gauss-Newton blocks, whose traces come with the check's
    pass), power iteration on Gauss-Newton blocks (1 per iteration) and ELI (1; weight noise: 1 per 1 GiB of
    weight draws, plus 1 for the weight gradients of the sequential rule's extra draws). With a budget that
    holds everything each is built once."""
    cfg = cfg or HessianConfig()
    check_choice("mode", cfg.mode, MODES)
    check_choice("noise", cfg.noise, NOISE_SPACES)
    check_choice("gauss_newton", cfg.gauss_newton, GAUSS_NEWTON)
    check_choice("noise_draws", cfg.noise_draws, NOISE_DRAWS)
    _check_strata(cfg.strata)
    if not (isinstance(cfg.eli_rtol, (int, float)) and math.isfinite(cfg.eli_rtol) and cfg.eli_rtol >= 0):
        raise HilalError(f"eli_rtol must be a finite number >= 0, got {cfg.eli_rtol!r}")
    if not is_count(cfg.eli_block):
        raise HilalError(f"eli_block must be a whole number >= 1, got {cfg.eli_block!r}")
    budget = GraphBudget(cfg.graph_bytes)
    all_layers = mappable_layers(model)
    if not all_layers:
        raise HilalError("the model has no mappable (Conv1d/Conv2d/Linear) layer")
    layers = check_layers(model, layers if layers is not None else all_layers)
    if not layers:
        raise HilalError("no layers selected")
    order = {n: i for i, n in enumerate(all_layers)}
    layers = sorted(layers, key=order.__getitem__)
    mods = dict(model.named_modules())
    analog = [n for n in layers if isinstance(mods[n], ANALOG_TYPES)]
    if analog:
        raise HilalError(f"curvature is measured on the digital model; layer(s) {analog} are already analog")

    batches = calibration_batches(splits, cfg)
    samples = sum(_batch_size_of(b) for b in batches)
    if loss_fn is None and isinstance(splits, Splits):
        loss_fn = splits.loss_fn
    bar = tqdm(total=3, desc="curvature", disable=not progress, leave=False)
    was_training = model.training
    flags = {n: mods[n].weight.requires_grad for n in layers}
    timings: dict[str, float] = {}
    model.eval()
    try:
        for n in layers:
            mods[n].weight.requires_grad_(True)
        t0 = time.perf_counter()
        op = HessianOperator(model, batches, layers, budget, loss_fn)
        gn = out_op = None
        reason = "gauss_newton='off'" if cfg.gauss_newton == "off" else "per_layer mode"
        if loss_fn is not None:
            reason = "a custom loss_fn (the exact blocks are those of the softmax cross-entropy)"
        elif cfg.mode == "joint" and cfg.gauss_newton == "auto":
            gn, reason = try_gauss_newton(model, batches, layers, op, seed=cfg.seed, graph_bytes=budget)
            if gn is None:
                warnings.warn(f"curvature from Monte-Carlo HVPs, not exact Gauss-Newton blocks: {reason}",
                              stacklevel=2)
            else:
                op.release()  # the blocks serve the power iteration too
        if cfg.mode == "joint":  # exact blocks, or output-space HVPs with per-sample probes
            strata = strata_for(cfg.strata, cfg.probes, samples)
            out_op = gn if gn is not None else OutputOperator(model, batches, layers, strata, budget, loss_fn=loss_fn)
        timings["graph_s"] = time.perf_counter() - t0
        hv_check = op.hvps

        def hvps() -> int:  # HVPs so far, weight and output space (the latter in products over all samples)
            return op.hvps + (round(out_op.full_hvps) if isinstance(out_op, OutputOperator) else 0)

        t0 = time.perf_counter()
        if out_op is not None:
            trace, trace_se = output_traces(out_op, cfg.probes, cfg.seed)
        else:
            trace, trace_se = hutchinson_traces(op, cfg.probes, cfg.mode, cfg.seed)
        timings["trace_s"] = time.perf_counter() - t0
        hv_trace = hvps()
        bar.update()
        t0 = time.perf_counter()
        lam = top_eigenvalues(gn if gn is not None else op, cfg.power_iters, cfg.power_tol, cfg.seed)
        timings["eig_s"] = time.perf_counter() - t0
        hv_eig = hvps() - hv_trace
        bar.update()
        t0 = time.perf_counter()
        draws = max(cfg.first_order_samples, cfg.eli_samples)
        eli_draws = np.full(len(layers), draws)
        if draws == 0 or cfg.eli_samples == 0:  # curvature only
            eli = {k: np.full(len(layers), np.nan) for k in ("eli", "eli_first", "eli_second", "eli_se")}
            eli_draws = np.zeros(len(layers), int)
        elif out_op is not None or cfg.noise == "output":
            op.release()  # no more weight-space products
            if out_op is None:
                out_op = OutputOperator(model, batches, layers, graph_bytes=budget, loss_fn=loss_fn)
            if cfg.noise == "output":
                errors = output_error_stream(model, out_op, preset, cfg.t_inference, draws, cfg.seed)
                eli = output_loss_increase(out_op, errors, cfg.mode, cfg.seed, quadratic_samples=cfg.eli_samples)
            else:
                analog = to_analog(model, layers, preset)
                own = cfg.noise_draws == "batched" and draws_unsupported(analog, layers) is None
                surrogate = own and cfg.first_order == "surrogate" and cfg.mode == "joint"

                def weight_errors(start: int, count: int, op: Any = out_op) -> Any:
                    return weight_output_errors(op, weight_noise_stream(
                        model, layers, preset, cfg.t_inference, count, cfg.seed, cfg.noise_draws, start))

                def layer_draws(start: int, count: int, only: list[int]) -> Any:
                    return layer_noise(model, layers, [layers[i] for i in only], preset, cfg.t_inference, count,
                                       cfg.seed, start, analog=analog, surrogate=surrogate)

                def shift() -> Any:
                    return surrogate_shift(model, layers, preset, cfg.t_inference, analog=analog)

                eli, eli_draws = sequential_loss_increase(out_op, weight_errors, draws, cfg.eli_samples, cfg.mode,
                                                          cfg.seed, cfg.eli_rtol, cfg.eli_block,
                                                          layer_draws if own else None, shift if surrogate else None)
        else:  # per_layer mode, weight noise
            noise = weight_noise_stream(model, layers, preset, cfg.t_inference, draws, cfg.seed, cfg.noise_draws)
            eli = expected_loss_increase(op, noise, cfg.mode, cfg.seed, quadratic_samples=cfg.eli_samples)
        hv_eli = hvps() - hv_trace - hv_eig
        timings["eli_s"] = time.perf_counter() - t0
        calls = op.calls
        used_strata = len(out_op.sizes) if isinstance(out_op, OutputOperator) and out_op.scales is not None else 1
        curvature, check = ("gauss-newton", gn.check) if gn is not None else ("hvp", float("nan"))
        builds_w, builds_o = op.cache.builds, (out_op.cache.builds if out_op is not None else 0)
        bar.update()
        op = gn = out_op = None  # frees the kept graphs
    finally:
        for n, f in flags.items():
            mods[n].weight.requires_grad_(f)
        model.train(was_training)
        bar.close()

    x = batches[0][0] if not isinstance(batches[0], dict) else _truncate(
        {k: v for k, v in batches[0].items() if k not in ("start_positions", "end_positions", "example_id",
                                                         "offset_mapping")}, 2)
    if not isinstance(x, dict):
        x = x[:2]
    macs = count_macs(model, to_device(x, model_device(model)))
    with np.errstate(divide="ignore", invalid="ignore"):
        conc = np.where(trace != 0, lam / trace, np.nan)
    df = pd.DataFrame({"layer": layers, "params": [int(mods[n].weight.numel()) for n in layers],
                       "macs": [int(macs.get(n, 0)) for n in layers], "trace": trace, "trace_se": trace_se,
                       "lambda_max": lam, "concentration": conc, **eli})[COLUMNS]
    df.attrs.update({"hvps": hv_trace + hv_eig + hv_eli, "hvps_check": hv_check, "hvps_trace": hv_trace - hv_check,
                     "hvps_eig": hv_eig, "hvps_eli": hv_eli, "backward_calls": calls, "mode": cfg.mode,
                     "noise": cfg.noise, "curvature": curvature, "curvature_reason": reason,
                     "gauss_newton_mismatch": check, "strata": used_strata, "samples": samples,
                     "graph_builds": builds_w + builds_o, "graph_builds_weight": builds_w,
                     "graph_builds_output": builds_o, "graph_bytes": cfg.graph_bytes,
                     "graph_bytes_kept": budget.peak, "eli_draws": [int(d) for d in eli_draws], **timings,
                     "total_s": sum(timings.values())})
    return df
