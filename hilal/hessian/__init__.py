"""Per-layer curvature metrics on held-out calibration data, on top of PyHessian's HVP primitives.

For every mappable layer l (weights w_l, Hessian block H_ll of the task loss):

- ``trace``: tr(H_ll) by Hutchinson with Rademacher probes;
- ``lambda_max``: the dominant eigenvalue of H_ll by power iteration on block-restricted HVPs;
- ``concentration``: lambda_max / trace;
- ``eli``: the noise-aware expected loss increase E[g_l . dw_l] + 1/2 E[dw_l^T H_ll dw_l], where dw_l is the
  change of the effective weights an aihwkit analog tile computes with after programming and drift to
  ``t_inference`` (sampled through aihwkit itself).

In ``joint`` mode one HVP per probe (or noise sample) serves every layer: with independent random signs
s_l and v = sum_l s_l u_l, E_s[s_l u_l . (H v)_l] = u_l^T H_ll u_l because the cross blocks carry a
zero-mean sign product. ``per_layer`` mode does one block-restricted HVP per layer (the reference).
:func:`layer_metrics` takes these HVPs in output space (with respect to each layer's output, where a
layer's weight block is the output Hessian pulled back through its inputs), which lets the probes and signs
be drawn per sample as well as per layer (:func:`output_traces`, :func:`output_loss_increase`), and the trace
probes go mostly to the samples that carry the curvature (:func:`gradient_strata`, :func:`probe_counts`).
Where the network is piecewise linear in every layer's weight, ``joint`` mode replaces the Monte-Carlo traces
and ELI quadratic terms by exact ones from :class:`GaussNewton` blocks (one backward pass per class).

Memory stays bounded whatever the number of calibration samples: every operator keeps its per-batch state
(graphs, layer inputs, Gauss-Newton signals) only within ``HessianConfig.graph_bytes`` and rebuilds the rest
for each pass over the data (:mod:`hilal.hessian.graphs`); the estimators loop batches outermost and redraw
their probes and signs from recorded generator states, so the estimates are the same whatever the budget.
See docs/design.md for the method.

One concern per module, each importing only from those listed before it (``a | b``: neither imports the other):

- ``graphs`` | ``second_order``: per-batch state under a memory budget; the second derivatives of GELU, layer
  norm and softmax in HVP graphs
- ``config`` | ``loss``: :class:`HessianConfig`, the options' choices, :func:`calibration_batches` and the
  shared vector helpers; the loss graphs differentiated twice (weights or layer outputs) and finiteness checks
- ``strata``: :func:`gradient_strata`, :func:`strata_for`
- ``operators``: :class:`HessianOperator` (weight space), :class:`OutputOperator` (output space)
- ``gauss_newton``: exact :class:`GaussNewton` blocks and the check that decides where they apply
- ``draws``: many weight-noise draws replayed at once, to the bit the per-draw aihwkit path
  (:func:`batched_weight_noise`, :func:`draws_unsupported`)
- ``noise``: aihwkit weight and output noise (:func:`weight_noise_stream`, :func:`output_error_stream`),
  fixed-input analog forwards and their unfold cache
- ``estimators``: traces, top eigenvalues, the ELI in weight and output space, :func:`probe_counts`
- ``sequential``: the ELI's first-order draws in blocks until every layer's estimate is settled
- ``metrics``: the table, :func:`layer_metrics`

Import from ``hilal.hessian``; to replace a function in a test, patch it in the module that calls it (e.g.
``hilal.hessian.metrics.strata_for``), not here. Callers that import from the package when they run (as
``hilal.reproduce`` does ``layer_metrics``) see a patch of the package's name.
"""

from __future__ import annotations

from hilal.hessian.config import (
    COLUMNS,
    GAUSS_NEWTON,
    MODES,
    NOISE_DRAWS,
    NOISE_SPACES,
    HessianConfig,
    _apply,
    _batch_size_of,
    _dot,
    _rademacher,
    _se,
    calibration_batches,
)
from hilal.hessian.draws import batched_weight_noise, draws_unsupported
from hilal.hessian.estimators import (
    STRATUM_EXPONENT,
    STRATUM_FLOOR,
    _rank_one_probe,
    expected_loss_increase,
    hutchinson_traces,
    output_loss_increase,
    output_traces,
    probe_counts,
    top_eigenvalues,
)
from hilal.hessian.gauss_newton import GaussNewton, gauss_newton, try_gauss_newton
from hilal.hessian.graphs import DEFAULT_GRAPH_BYTES, GraphBudget
from hilal.hessian.loss import _check_finite, _hooked, _hvp_graph, _nonfinite
from hilal.hessian.metrics import layer_metrics
from hilal.hessian.noise import (
    AnalogOutputErrors,
    WeightOutputErrors,
    _analog_weight,
    fixed_input_forward,
    output_error_stream,
    sample_weight_noise,
    unfolded_bytes,
    weight_noise_stream,
    weight_output_errors,
)
from hilal.hessian.operators import HessianOperator, OutputOperator, OutputState
from hilal.hessian.second_order import SecondOrderRules
from hilal.hessian.strata import MIN_STRATUM_PROBES, MIN_STRATUM_SAMPLES, gradient_strata, strata_for

__all__ = [
    "COLUMNS", "DEFAULT_GRAPH_BYTES", "GAUSS_NEWTON", "MIN_STRATUM_PROBES", "MIN_STRATUM_SAMPLES", "MODES",
    "NOISE_DRAWS", "NOISE_SPACES", "STRATUM_EXPONENT", "STRATUM_FLOOR", "AnalogOutputErrors", "GaussNewton",
    "GraphBudget",
    "HessianConfig", "HessianOperator", "OutputOperator", "OutputState", "SecondOrderRules", "WeightOutputErrors",
    "_analog_weight", "_apply", "_batch_size_of", "_check_finite", "_dot", "_hooked", "_hvp_graph", "_nonfinite",
    "_rademacher", "_rank_one_probe", "_se", "batched_weight_noise", "calibration_batches",
    "draws_unsupported", "expected_loss_increase", "fixed_input_forward",
    "gauss_newton", "gradient_strata", "hutchinson_traces", "layer_metrics", "output_error_stream",
    "output_loss_increase", "output_traces", "probe_counts", "sample_weight_noise", "strata_for", "top_eigenvalues",
    "try_gauss_newton", "unfolded_bytes", "weight_noise_stream", "weight_output_errors",
]
