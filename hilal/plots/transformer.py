"""Transformer figures (notebook 08): curvature of every projection block by block, and the mapping of
transformers by method."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.plots.base import CLUSTER_COLORS, METHOD_ORDER, PALETTE, _order, _percent_axis, style
from hilal.plots.layers import METRIC_LABELS, _scale_for

_BLOCK = re.compile(r"^(?P<pre>.*?)(?:blocks|layers|layer|encoder_layer|h)[._](?P<idx>\d+)\.(?P<proj>.+)$")
# readable names of the projections inside a block (ViT, transformers' ViT and MobileBERT, torchvision ViT), in order
_PROJ_SHORT = ((r"\.dense$", ""), (r"^attention\.self\.", ""), (r"^attention\.attention\.", ""),
               (r"^attention\.(q|k|v)_proj$", r"\1"), (r"^attention\.o_proj$", "out"), (r"^mlp\.(fc\d)$", r"\1"),
               (r"^attn\.", ""), (r"^self_attention\.", ""),
               (r"^attention\.output$", "attn.out"), (r"^bottleneck\.input$", "bn.in"),
               (r"^bottleneck\.attention$", "bn.attn"), (r"^output\.bottleneck$", "out.bn"),
               (r"intermediate", "inter"), (r"^ffn\.(\d+)\.", r"ffn\1."), (r"^query$", "q"), (r"^key$", "k"),
               (r"^value$", "v"), (r"^out_proj$", "out"), (r"^mlp\.(\d+)$", r"mlp\1"))


def projection_groups(layers: Sequence[str]) -> pd.DataFrame:
    """Block and projection type of each transformer layer name (model order kept).

    Layers inside a numbered block (``blocks.0.attn.q``, ``encoder.layer.1.attention.self.query``,
    ``encoder_layer_3.mlp.0``) get ``block`` = "block N" and a short projection name (q, k, v, out, fc1,
    attn.out, inter, ffn0.inter, bn.in, ...); layers before the first block are the "embedding" group, those
    after the last one the "head" group (projection = the last part of their name)."""
    rows, seen_block = [], False
    for name in layers:
        m = _BLOCK.match(name)
        if m:
            seen_block, proj = True, m["proj"]
            for pat, rep in _PROJ_SHORT:
                proj = re.sub(pat, rep, proj)
            rows.append({"layer": name, "block": f"block {int(m['idx'])}", "projection": proj})
        else:
            rows.append({"layer": name, "block": "head" if seen_block else "embedding",
                         "projection": name.split(".")[-1]})
    return pd.DataFrame(rows)


def transformer_layers(clustered: Mapping[str, pd.DataFrame], columns: Sequence[str] = ("eli", "concentration"),
                       title: str = "Curvature of every projection, block by block") -> tuple[Figure, pd.DataFrame]:
    """Per-layer bars of ``columns`` for one or more transformers (``{label: cluster_layers(...) frame}``),
    one row of panels per model and column, layers in model order grouped by block (shaded bands, block
    names on top) and labelled by projection type, bars coloured by robust/sensitive cluster."""
    from matplotlib.patches import Patch

    frames = []
    for label, df in clustered.items():
        g = projection_groups(df["layer"].tolist())
        part = df[["layer", *columns, *(["cluster"] if "cluster" in df else [])]].merge(g, on="layer", how="left")
        frames.append(part.assign(model=label))
    data = pd.concat(frames, ignore_index=True)
    data = data[["model", "layer", "block", "projection", *[c for c in data if c not in
                                                             ("model", "layer", "block", "projection")]]]
    labels = list(clustered)
    width = max(len(clustered[m]) for m in labels)
    with style():
        fig, axes = plt.subplots(len(labels) * len(columns), 1, squeeze=False,
                                 figsize=(max(7.0, 0.34 * width + 2.5), 1.75 * len(labels) * len(columns) + 1.2))
        for i, label in enumerate(labels):
            sub = data[data["model"] == label].reset_index(drop=True)
            x = np.arange(len(sub))
            colors = [CLUSTER_COLORS.get(c, "0.5") for c in sub.get("cluster", ["?"] * len(sub))]
            spans = sub.groupby("block", sort=False).indices
            for j, c in enumerate(columns):
                ax = axes[i * len(columns) + j][0]
                ax.bar(x, sub[c], color=colors, width=0.75)
                for k, (block, idx) in enumerate(spans.items()):
                    if k % 2:
                        ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color="0.93", zorder=0, lw=0)
                    if j == 0:
                        ax.text((idx.min() + idx.max()) / 2, 1.02, block, transform=ax.get_xaxis_transform(),
                                ha="center", va="bottom", fontsize=8, color="0.3")
                _scale_for(ax, "y", sub[c])
                ax.axhline(0, color="0.4", lw=0.6)
                ax.set_xlim(-0.6, len(sub) - 0.4)
                ax.set_ylabel(METRIC_LABELS.get(c, c).split(" (")[0].replace(" ", "\n", 1), fontsize=8)
                ax.set_xticks(x)
                ax.set_xticklabels(sub["projection"] if j == len(columns) - 1 else [], rotation=60, ha="right",
                                   fontsize=7.5)
                ax.grid(axis="x", visible=False)
                if j == 0:
                    ax.set_title(label, loc="left", pad=14)
        handles = [Patch(color=v, label=k) for k, v in CLUSTER_COLORS.items()]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(title, fontweight="bold")
    return fig, data


def transformer_mapping(table: pd.DataFrame, title: str = "Mapping transformers: analog share, score, time"
                        ) -> tuple[Figure, pd.DataFrame]:
    """Three panels of grouped bars (one group per model, one bar per method): share of MACs on analog
    tiles, score (mean ± std over programmings, floating-point score as a black tick) and total mapping
    time. ``table`` holds :func:`mapping_table` rows plus a ``model`` column."""
    data = table[["model", "method", "analog_mac_share", "accuracy_mean", "accuracy_std", "fp_accuracy", "total_s",
                  "rounds", "analog_layers"]].copy()
    models = list(dict.fromkeys(data["model"]))
    methods = _order(data["method"], METHOD_ORDER)
    colors = dict(zip(methods, sns.color_palette(PALETTE, len(methods)), strict=True))
    w = 0.8 / len(methods)
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(4.0 * 3, 3.9))
        for k, method in enumerate(methods):
            sub = data[data["method"] == method].set_index("model").reindex(models)
            x = np.arange(len(models)) + (k - (len(methods) - 1) / 2) * w
            axes[0].bar(x, sub["analog_mac_share"], w, color=colors[method], label=method)
            axes[1].bar(x, sub["accuracy_mean"], w, yerr=sub["accuracy_std"], color=colors[method], capsize=3,
                        error_kw={"lw": 0.9})
            axes[2].bar(x, sub["total_s"], w, color=colors[method])
            for xi, r in zip(x, sub.itertuples(), strict=True):
                axes[0].text(xi, r.analog_mac_share + 0.02, f"{r.analog_mac_share:.0%}\n{int(r.analog_layers)} L",
                             ha="center", va="bottom", fontsize=7.5)
                axes[1].text(xi, r.accuracy_mean + r.accuracy_std + 0.02, f"{r.accuracy_mean:.2f}", ha="center",
                             va="bottom", fontsize=7.5)
                axes[2].text(xi, r.total_s * 1.15, f"{r.total_s:.0f} s\n{int(r.rounds)} rnd", ha="center",
                             va="bottom", fontsize=7.5)
        fp = data.groupby("model", sort=False)["fp_accuracy"].first().reindex(models)
        for i, v in enumerate(fp):
            axes[1].plot([i - 0.45, i + 0.45], [v, v], color="black", lw=1.6, ls="--",
                         label="floating point" if i == 0 else None)
        axes[0].set_ylim(0, 1.3)
        _percent_axis(axes[0])
        axes[0].set_ylabel("MACs on analog tiles")
        axes[1].set_ylim(0, min(1.3, max(1.0, float((data["accuracy_mean"] + data["accuracy_std"]).max())) + 0.2))
        axes[1].set_ylabel("test score (accuracy or F1)")
        axes[2].set_yscale("log")
        axes[2].set_ylim(data["total_s"].min() / 2, data["total_s"].max() * 4)
        axes[2].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes[2].set_ylabel("total mapping time (s, log scale)")
        for ax, t in zip(axes, ("analog share (L = layers)", "score after mapping", "time (rnd = retraining rounds)"),
                         strict=True):
            ax.set_xticks(np.arange(len(models)))
            ax.set_xticklabels(models, fontsize=8.5)
            ax.grid(axis="x", visible=False)
            ax.set_title(t)
        handles, labs = axes[0].get_legend_handles_labels()
        h1, l1 = axes[1].get_legend_handles_labels()
        fig.legend(handles + h1, labs + l1, loc="outside lower center", ncol=len(methods) + 1, frameon=False)
        fig.suptitle(title, fontweight="bold")
    return fig, data
