"""Every figure the notebooks draw, one style, and the one place that writes figures.

Each figure function returns ``(fig, data)``: the figure and a tidy DataFrame holding exactly the numbers
it plots. ``savefig(fig, name, data)`` writes ``figures/<name>.png`` and ``figures/<name>.csv`` side by side
(``HILAL_FIGURES_DIR`` overrides the folder); ``save_summary`` writes a notebook's headline numbers as JSON.

One concern per module, each importing only from those listed before it:

- ``base``: the style (:func:`style`, palettes, method order), :func:`savefig`, :func:`save_summary`,
  :func:`time_axis` and the helpers the figure modules share
- ``drift``: accuracy over time (:func:`drift_curves`), digital baselines (:func:`accuracy_bars`),
  :func:`headline`
- ``layers``: curvature against measured sensitivity (:func:`rank_correlations`, :func:`layer_profile`,
  :func:`sensitivity_scatter`) and the clusters (:func:`cluster_plane`)
- ``comparison``: mapping methods side by side (:func:`mapping_table`, :func:`mapping_overview`,
  :func:`layer_heatmap`, :func:`recheck_plot`, :func:`runtime_bars`, :func:`speedup`)
- ``hardware``: accuracy against energy and latency per sample along HILAL's frontier
  (:func:`energy_frontier_plot`, :func:`frontier_table`)
- ``sweeps``: a sweep's runs across seeds per model and method (:func:`sweep_seeds`, :func:`seed_table`)
- ``ablations``: the HILAL paper's ablation chart (:func:`ablation_table`, :func:`ablation_chart`)
- ``noise``: noise attribution (:func:`attribution_bars`, :func:`layer_attribution`, :func:`compensation_plot`)
- ``validity``: each metric against the measurement's ceiling across models and presets (:func:`validity_plot`)
- ``transformer``: projections block by block (:func:`projection_groups`, :func:`transformer_layers`) and
  :func:`transformer_mapping`

Import from ``hilal.plots`` (notebooks call ``plots.savefig``, ``plots.drift_curves``, ...); to replace a
function in a test, patch it in the module that calls it, not here.
"""

from __future__ import annotations

from hilal.plots.ablations import ablation_chart, ablation_table
from hilal.plots.base import (
    CLUSTER_COLORS,
    METHOD_ORDER,
    PALETTE,
    save_summary,
    savefig,
    style,
    time_axis,
)
from hilal.plots.comparison import (
    HARDWARE_COLUMNS,
    layer_heatmap,
    layer_matrix,
    mapping_overview,
    mapping_summary,
    mapping_table,
    recheck_plot,
    recheck_table,
    runtime_bars,
    speedup,
)
from hilal.plots.drift import accuracy_bars, drift_curves, headline, share_labels
from hilal.plots.hardware import energy_frontier_plot, frontier_summary, frontier_table
from hilal.plots.layers import METRIC_LABELS, cluster_plane, layer_profile, rank_correlations, sensitivity_scatter
from hilal.plots.noise import attribution_bars, compensation_plot, layer_attribution
from hilal.plots.sweeps import seed_table, sweep_seeds
from hilal.plots.transformer import projection_groups, transformer_layers, transformer_mapping
from hilal.plots.validity import validity_plot

__all__ = [
    "CLUSTER_COLORS", "HARDWARE_COLUMNS", "METHOD_ORDER", "METRIC_LABELS", "PALETTE", "ablation_chart",
    "ablation_table", "accuracy_bars", "attribution_bars", "compensation_plot", "layer_attribution",
    "cluster_plane", "drift_curves", "energy_frontier_plot", "frontier_summary", "frontier_table", "headline",
    "layer_heatmap", "layer_matrix", "layer_profile", "mapping_overview", "mapping_summary", "mapping_table",
    "projection_groups", "rank_correlations", "recheck_plot", "recheck_table", "runtime_bars", "save_summary",
    "savefig", "seed_table", "sensitivity_scatter", "share_labels", "speedup", "style", "sweep_seeds", "time_axis",
    "transformer_layers", "transformer_mapping", "validity_plot",
]
