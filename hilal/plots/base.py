"""The kit's one figure style, the one place that writes figures (:func:`savefig`) and headline numbers
(:func:`save_summary`), and the axis, order and label helpers every figure module shares."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.evaluate import ONE_DAY, ONE_YEAR, time_label
from hilal.paths import atomic_json_dump, figures_dir, provenance_source, write_provenance
from hilal.registry import HilalError
from hilal.runtime import utc_now

_RC: dict[str, Any] = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("notebook", font_scale=0.95),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.titleweight": "bold",
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.constrained_layout.use": True,
}
PALETTE = "colorblind"
CLUSTER_COLORS = {"robust": "#2a9d8f", "sensitive": "#e76f51"}
METHOD_ORDER = ("hilal", "hilal-paper", "hilal-zeroshot", "max-norm", "lionheart", "random", "all-analog",
                "all-analog-ft", "all-digital")
_NAME = re.compile(r"^\d\d_[A-Za-z0-9_\-]+$")
# ticks drawn on time axes, where they fall inside the plotted range
_TIME_TICKS = (1.0, 60.0, 3600.0, ONE_DAY, 30 * ONE_DAY, ONE_YEAR, 10 * ONE_YEAR)


@contextmanager
def style():
    """The kit's single figure style (seaborn whitegrid, compact fonts) as a matplotlib rc context."""
    with plt.rc_context(_RC):
        yield


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise HilalError(f"figure name {name!r} must look like 'NN_what' (two digits of the notebook, an "
                         "underscore, letters/digits/_/-), without extension")
    return name


def savefig(fig: Figure, name: str, data: pd.DataFrame) -> Path:
    """Write ``fig`` as ``<figures>/<name>.png`` and the plotted numbers ``data`` as ``<name>.csv``.

    The folder is ``hilal.paths.figures_dir()`` (``HILAL_FIGURES_DIR`` overrides it). Returns the PNG path.
    """
    _check_name(name)
    if not isinstance(data, pd.DataFrame) or data.empty:
        raise HilalError(f"savefig({name!r}) needs the plotted numbers as a non-empty DataFrame")
    out = figures_dir()
    png = out / f"{name}.png"
    with style():
        fig.savefig(png, bbox_inches="tight")
    data.to_csv(out / f"{name}.csv", index=False)
    return png


def save_summary(notebook: str, values: Mapping[str, Any]) -> Path:
    """Record a notebook's headline numbers in ``<figures>/<NN>_summary.json`` (read back by the tests), and
    the code and machine they came from as the notebook's entry in ``<figures>/provenance.json``
    (:data:`hilal.paths.PROVENANCE`; ``hilal reproduce`` adds the profile and parameters)."""
    if not re.fullmatch(r"\d\d", str(notebook)):
        raise HilalError(f"notebook {notebook!r} must be its two-digit number, e.g. '00'")
    path = atomic_json_dump(dict(values), figures_dir() / f"{notebook}_summary.json")
    write_provenance(str(notebook), {"profile": None, "parameters": None, **provenance_source(),
                                     "written": utc_now()})
    return path


def time_axis(ax: plt.Axes, times: Iterable[float]) -> None:
    """Log-scaled time axis with human tick labels (1 min, 1 h, 1 day, ...) inside the plotted range."""
    times = np.asarray(list(times), dtype=float)
    lo, hi = times.min(), times.max()
    ax.set_xscale("log")
    ticks = [t for t in _TIME_TICKS if lo / 1.5 <= t <= hi * 1.5] or sorted(set(times))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_tick_label(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xlabel("time since programming (log scale)")


def _tick_label(t: float) -> str:
    return "10 years" if t == 10 * ONE_YEAR else time_label(t)


def _percent_axis(ax: plt.Axes, axis: str = "y") -> None:
    fmt = matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=0)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _order(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _short(layer: str, width: int = 20) -> str:
    return layer if len(layer) <= width else "…" + layer[-(width - 1):]


def finish_grid(g: Any, ylabel: str, title: str | None) -> None:
    """A seaborn grid's axis labels (no x label), facet titles by column value and an optional title above."""
    g.set_axis_labels("", ylabel)
    g.set_titles("{col_name}")
    if title:
        g.figure.suptitle(title, y=1.0)
        g.figure.subplots_adjust(top=0.82)
