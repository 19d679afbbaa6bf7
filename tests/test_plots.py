"""Figure helpers: the files they write, the numbers they plot, brute-force checks of the statistics."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import norm  # noqa: E402

from hilal import plots  # noqa: E402
from hilal.evaluate import ONE_DAY, ONE_YEAR  # noqa: E402
from hilal.paths import code_fingerprint, read_provenance, source_revision  # noqa: E402
from hilal.registry import HilalError  # noqa: E402
from hilal.runtime import utc_now  # noqa: E402


@pytest.fixture(autouse=True)
def figdir(tmp_path, monkeypatch):
    monkeypatch.setenv("HILAL_FIGURES_DIR", str(tmp_path / "figs"))
    yield tmp_path / "figs"
    plt.close("all")


def drift_like(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for net in ("a", "b"):
        for preset, slope in (("mild", 0.001), ("harsh", 0.05)):
            for t in (60.0, 3600.0, ONE_DAY, ONE_YEAR):
                for r in range(4):
                    acc = 0.95 - slope * np.log10(t / 60) + rng.normal(0, 0.01)
                    rows.append({"network": net, "preset": preset, "t_inference": t, "rep": r, "accuracy": acc})
    return pd.DataFrame(rows)


def results_like() -> list[dict]:
    layers = ["conv1", "layer1.conv", "fc"]

    def res(method, analog, share, mean, std, search, mapping, rounds):
        return {"method": method, "analog_layers": analog, "analog_mac_share": share, "accuracy_mean": mean,
                "accuracy_std": std, "fp_accuracy": 0.98, "t_eval": ONE_DAY, "reps": 5, "rounds": rounds,
                "timings": {"search_s": search, "mapping_s": mapping, "total_s": search + mapping + 0.5}}

    return [res("lionheart", layers[:1], 0.5, 0.96, 0.01, 10.0, 20.0, 12),
            res("all-digital", [], 0.0, 0.98, 0.0, 0.0, 0.0, 0),
            res("hilal", layers[1:], 0.4, 0.97, 0.005, 2.0, 5.0, 4),
            res("all-analog", layers, 1.0, 0.6, 0.05, 0.0, 0.0, 0)]


def test_savefig_writes_png_and_csv_with_the_plotted_numbers(figdir):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    data = pd.DataFrame({"x": [1, 2], "y": [3.5, 4.25]})
    png = plots.savefig(fig, "09_demo", data)
    assert png == figdir / "09_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = pd.read_csv(figdir / "09_demo.csv")
    pd.testing.assert_frame_equal(back, data)


@pytest.mark.parametrize("name", ["demo", "9_demo", "09_demo.png", "09 demo", "../09_demo"])
def test_savefig_rejects_names_outside_the_convention(name):
    fig, _ = plt.subplots()
    with pytest.raises(HilalError, match="NN_what"):
        plots.savefig(fig, name, pd.DataFrame({"x": [1]}))


def test_savefig_needs_the_numbers():
    fig, _ = plt.subplots()
    with pytest.raises(HilalError, match="DataFrame"):
        plots.savefig(fig, "09_demo", pd.DataFrame())


def test_save_summary(figdir):
    path = plots.save_summary("03", {"spearman": {"eli": np.float64(0.9)}, "layers": np.int64(10)})
    assert path == figdir / "03_summary.json"
    assert json.loads(path.read_text()) == {"spearman": {"eli": 0.9}, "layers": 10}
    plots.save_summary("01", {})
    entry = read_provenance()["03"]  # run by hand, not by hilal reproduce: no profile, no parameters
    assert set(read_provenance()) == {"01", "03"} and read_provenance(figdir) == read_provenance()
    assert entry["profile"] is None and entry["parameters"] is None and entry["code"] == code_fingerprint()
    assert entry["commit"] == source_revision()["commit"] and entry["written"] <= utc_now()
    assert entry["machine"]["threads"] == torch.get_num_threads() and "date" not in entry["machine"]
    assert entry["machine"]["device"] == ("cpu" if not torch.cuda.is_available() else
                                          f"cuda:{torch.cuda.get_device_name(0)}")
    with pytest.raises(HilalError, match="two-digit"):
        plots.save_summary("3", {})


def test_time_axis_has_human_ticks_inside_the_range():
    fig, ax = plt.subplots()
    plots.time_axis(ax, [60, 3600, ONE_DAY, 30 * ONE_DAY, ONE_YEAR])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 min", "1 h", "1 day", "1 month", "1 year"]
    fig, ax = plt.subplots()
    plots.time_axis(ax, [3600, ONE_DAY])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 h", "1 day"]


def test_drift_curves_plot_mean_and_std_over_repetitions():
    table = drift_like()
    fig, data = plots.drift_curves(table, hue="preset", col="network", fp={"a": 0.97, "b": 0.96})
    for (net, preset, t), g in table.groupby(["network", "preset", "t_inference"]):
        row = data[(data.network == net) & (data.preset == preset) & (data.t_inference == t)]
        assert len(row) == 1
        acc = g["accuracy"].to_numpy()
        assert row["mean"].item() == pytest.approx(acc.sum() / len(acc))
        assert row["std"].item() == pytest.approx(np.sqrt(((acc - acc.mean()) ** 2).sum() / (len(acc) - 1)))
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax in axes:
        lines = [ln for ln in ax.get_lines() if ln.get_label() in ("mild", "harsh")]
        assert len(lines) == 2
        # the plotted y values are the means, in time order
        for ln in lines:
            sub = data[(data.network == ax.get_title()) & (data.preset == ln.get_label())].sort_values("t_inference")
            np.testing.assert_allclose(ln.get_ydata(), sub["mean"])
        fp_lines = [ln for ln in ax.get_lines() if ln.get_label() == "digital (FP)"]
        assert fp_lines and fp_lines[0].get_ydata()[0] == {"a": 0.97, "b": 0.96}[ax.get_title()]
        assert ax.get_xlabel() and ax.get_xscale() == "log"
    assert "accuracy" in axes[0].get_ylabel()


def test_headline_nests_by_keys_and_time_label():
    _, data = plots.drift_curves(drift_like(), hue="preset", col="network")
    h = plots.headline(data, ["network", "preset"])
    assert set(h) == {"a", "b"} and set(h["a"]) == {"mild", "harsh"}
    assert set(h["a"]["harsh"]) == {"1 min", "1 h", "1 day", "1 year"}
    row = data[(data.network == "b") & (data.preset == "mild") & (data.t_inference == ONE_YEAR)]
    assert h["b"]["mild"]["1 year"] == pytest.approx(row["mean"].item())


def brute_spearman(x, y):
    def ranks(v):
        v = np.asarray(v, float)
        r = np.empty(len(v))
        for i, vi in enumerate(v):  # average rank for ties
            r[i] = (v < vi).sum() + ((v == vi).sum() + 1) / 2
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def test_rank_correlations_match_brute_force():
    rng = np.random.default_rng(1)
    n = 9
    metrics = pd.DataFrame({"layer": [f"l{i}" for i in range(n)], "trace": rng.random(n),
                            "lambda_max": rng.random(n), "concentration": np.round(rng.random(n), 1),
                            "eli": np.arange(n, dtype=float)})
    sens = pd.DataFrame({"layer": [f"l{i}" for i in range(n)][::-1],
                         "loss_increase": (np.arange(n, dtype=float) ** 2)[::-1]})
    corr = plots.rank_correlations(metrics, sens).set_index("metric")
    merged = metrics.merge(sens, on="layer")
    for c in ("trace", "lambda_max", "concentration", "eli"):
        assert corr.loc[c, "spearman"] == pytest.approx(brute_spearman(merged[c], merged["loss_increase"]))
    assert corr.loc["eli", "spearman"] == pytest.approx(1.0)  # same order after the join on layer names
    with pytest.raises(HilalError, match="at least 3"):
        plots.rank_correlations(metrics.head(2), sens)


def test_mapping_table_and_layer_matrix():
    res = results_like()
    table = plots.mapping_table(res)
    assert table["method"].tolist() == ["hilal", "lionheart", "all-analog", "all-digital"]
    row = table.set_index("method").loc["lionheart"]
    assert row["accuracy_drop"] == pytest.approx(0.98 - 0.96)
    assert row["analog_layers"] == 1 and row["total_s"] == pytest.approx(30.5)
    mat = plots.layer_matrix(res, ["conv1", "layer1.conv", "fc"])
    assert mat.loc["conv1"].to_dict() == {"hilal": 0, "lionheart": 1, "all-analog": 1, "all-digital": 0}
    assert mat["all-analog"].sum() == 3 and mat["all-digital"].sum() == 0
    assert mat["hilal"].tolist() == [0, 1, 1]


def test_runtime_bars_and_speedup():
    res = results_like()
    fig, data = plots.runtime_bars(res, reference="lionheart")
    by = data.set_index("method")
    assert by.loc["hilal", "speedup_vs_lionheart"] == pytest.approx(30.5 / 7.5)
    assert plots.speedup(res, "hilal", "lionheart") == pytest.approx(30.5 / 7.5)
    with pytest.raises(HilalError, match="random"):
        plots.speedup(res, "random", "lionheart")
    ax = fig.get_axes()[0]
    assert "time" in ax.get_xlabel() and "(s)" in ax.get_xlabel()


def test_mapping_figures_carry_their_numbers():
    res = results_like()
    fig, data = plots.mapping_overview(res, drop_threshold=0.02)
    assert data["analog_mac_share"].tolist() == [0.4, 0.5, 1.0, 0.0]
    assert all(ax.get_xlabel() for ax in fig.get_axes())
    macs = {"conv1": 100, "layer1.conv": 50, "fc": 50}
    fig, data = plots.layer_heatmap(res, list(macs), macs=macs)
    assert data["layer"].tolist() == list(macs) and data["macs"].tolist() == [100, 50, 50]
    assert data["hilal"].tolist() == [0, 1, 1]
    labels = [t.get_text() for t in fig.get_axes()[0].get_yticklabels()]
    assert labels[0].endswith("(50%)")


def test_recheck_plot_draws_each_methods_fresh_score_against_its_floor():
    floor = 0.97
    checks = {"lionheart": {"calib_mean": 0.965, "calib_se": 0.002, "reps": 50, "floor": floor, "margin": -0.005,
                            "z": -2.5, "holds_floor": False, "accepted": 0.972},
              "all-digital": {"calib_mean": 0.99, "calib_se": 0.0, "reps": 50, "floor": floor, "margin": 0.02,
                              "z": None, "holds_floor": True, "accepted": None},
              "hilal": {"calib_mean": 0.975, "calib_se": 0.001, "reps": 50, "floor": floor, "margin": 0.005,
                        "z": 5.0, "holds_floor": True, "accepted": 0.974}}
    fig, data = plots.recheck_plot(checks)
    assert data["method"].tolist() == ["hilal", "lionheart", "all-digital"]
    by = data.set_index("method")
    assert by.loc["lionheart", "ci_low"] == pytest.approx(0.965 - 1.96 * 0.002)
    assert by.loc["hilal", "ci_high"] == pytest.approx(0.975 + 1.96 * 0.001)
    assert np.isnan(by.loc["all-digital", "accepted"]) and by.loc["lionheart", "accepted"] == 0.972
    assert by["holds_floor"].tolist() == [True, False, True]
    ax = fig.get_axes()[0]
    floor_lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(floor_lines) == 1 and floor_lines[0].get_xdata()[0] == floor  # one shared floor: one line
    texts = [t.get_text() for t in ax.texts]
    assert "-0.50 points (below)" in texts and "+0.50 points (holds)" in texts
    # floors that differ get a tick on each row instead of a common line
    checks["hilal"] = {**checks["hilal"], "floor": 0.96, "margin": 0.015}
    fig, data = plots.recheck_plot(checks)
    assert not [ln for ln in fig.get_axes()[0].get_lines() if ln.get_linestyle() == "--"]
    with pytest.raises(HilalError, match="at least one"):
        plots.recheck_table({})
    # with the search's programmings per evaluation: the chance one more evaluation clears the floor
    assert "pass_rate" not in data
    rates = plots.recheck_table(checks, test_reps=10).set_index("method")["pass_rate"]
    assert rates["lionheart"] == pytest.approx(norm.cdf(-0.005 / (0.002 * math.sqrt(50 / 10))))
    assert rates["hilal"] == pytest.approx(norm.cdf(0.015 / (0.001 * math.sqrt(5))))
    assert rates["all-digital"] == 1.0  # every programming scores the same, above the floor


def test_layer_figures():
    n = 6
    merged = pd.DataFrame({"layer": [f"block{i}.conv" for i in range(n)], "trace": np.logspace(0, 4, n),
                           "trace_se": np.ones(n), "lambda_max": np.logspace(-1, 2, n),
                           "concentration": np.linspace(0.1, 0.9, n), "eli": np.logspace(-5, -1, n),
                           "loss_increase": np.linspace(-0.01, 0.5, n), "macs": np.arange(1, n + 1) * 1000,
                           "cluster": ["robust"] * 3 + ["sensitive"] * 3})
    fig, data = plots.layer_profile(merged)
    assert len(fig.get_axes()) == 5 and "trace_se" in data
    assert fig.get_axes()[0].get_yscale() == "log"  # trace spans four decades
    fig, data = plots.sensitivity_scatter(merged)
    assert data["spearman_eli"].iloc[0] == pytest.approx(1.0)
    assert [ax.get_title() for ax in fig.get_axes()][3] == "Spearman ρ = 1.00"
    fig, data = plots.cluster_plane(merged)
    np.testing.assert_allclose(data["log10_eli"], np.log10(merged["eli"]))
    ax = fig.get_axes()[0]
    assert "ELI" in ax.get_xlabel() and "concentration" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["robust (3 layers)", "sensitive (3 layers)"]


def test_accuracy_bars():
    zoo = pd.DataFrame({"model": ["resnet8", "resnet20"], "dataset": ["digits", "digits"], "accuracy": [0.98, 0.97]})
    fig, data = plots.accuracy_bars(zoo)
    ax = fig.get_axes()[0]
    heights = sorted(p.get_height() for p in ax.patches if p.get_height() > 0)
    assert heights == pytest.approx([0.97, 0.98])
    assert data.equals(zoo[["model", "dataset", "accuracy"]])


def test_mapping_summary_keeps_layer_names():
    res = results_like()
    s = plots.mapping_summary(res)
    assert s["hilal"]["analog_layers"] == ["layer1.conv", "fc"]
    assert s["lionheart"]["accuracy_drop"] == pytest.approx(0.02) and s["lionheart"]["rounds"] == 12
    assert json.loads(json.dumps(s)) == s


def test_share_labels_rename_the_legend():
    res = results_like()
    labels = plots.share_labels(res)
    assert labels["hilal"] == "hilal (40% MACs analog)"
    table = drift_like().rename(columns={"preset": "method"}).replace({"mild": "hilal", "harsh": "all-analog"})
    fig, _ = plots.drift_curves(table[table.network == "a"], hue="method", labels=labels)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["hilal (40% MACs analog)", "all-analog (100% MACs analog)"]


def test_every_plots_name_the_notebooks_use_exists():
    """Each ``plots.X`` and ``from hilal.plots import X`` in a notebook's code cells names something
    ``hilal.plots`` exports (the notebooks themselves run only in the slow suite)."""
    import re
    from pathlib import Path

    import nbformat

    folder = Path(__file__).resolve().parents[1] / "notebooks"
    used: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.ipynb")):
        src = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        names = set(re.findall(r"\bplots\.(\w+)", src))
        for m in re.finditer(r"from hilal\.plots import (?:\(([^)]*)\)|([^\n#(]+))", src):
            names |= {n.split(" as ")[0].strip() for n in (m[1] or m[2]).split(",") if n.strip()}
        for n in names:
            used.setdefault(n, set()).add(path.name)
    assert len(used) >= 10  # the notebooks were found and read
    missing = {n: sorted(nb) for n, nb in used.items() if n not in plots.__all__ or not hasattr(plots, n)}
    assert not missing


def test_hardware_columns_and_the_energy_frontier_plot():
    """The mapping table carries each record's hardware cost (NaN without one); the frontier figure plots each
    point and LionHeart's mapping at its energy and latency, and rings the chosen point."""
    res = results_like()
    res[0]["hardware"] = {"analog_tiles": 9, "energy_uj": 8.5, "energy_gain": 1.5, "latency_us": 190.0,
                          "latency_gain": 0.4}
    table = plots.mapping_table(res).set_index("method")
    assert table.loc["lionheart", list(plots.HARDWARE_COLUMNS)].tolist() == [9, 8.5, 1.5, 190.0, 0.4]
    assert table.loc["hilal", list(plots.HARDWARE_COLUMNS)].isna().all()
    hw = {"analog_tiles": 0, "energy_gain": 1.0, "latency_gain": 1.0}
    frontier = pd.DataFrame([
        {"kind": "all-digital", "n_analog": 0, "accuracy_mean": 0.98, "accuracy_std": 0.0, "accuracy_drop": 0.0,
         **hw, "energy_uj": 13.0, "latency_us": 75.0},
        {"kind": "hilal", "n_analog": 2, "accuracy_mean": 0.97, "accuracy_std": 0.01, "accuracy_drop": 0.01,
         **hw, "energy_uj": 9.0, "latency_us": 70.0},
        {"kind": "all-analog", "n_analog": 3, "accuracy_mean": 0.6, "accuracy_std": 0.05, "accuracy_drop": 0.38,
         **hw, "energy_uj": 4.0, "latency_us": 300.0}])
    fig, data = plots.energy_frontier_plot(frontier, [res[0]], drop_threshold=0.02, chosen=frontier.iloc[1],
                                           max_tiles=16)
    assert data["kind"].tolist() == ["all-digital", "hilal", "all-analog", "lionheart"]
    assert data["energy_uj"].tolist() == [13.0, 9.0, 4.0, 8.5] and data["accuracy_drop"].iloc[-1] == pytest.approx(0.02)
    energy_ax, latency_ax = fig.get_axes()[:2]
    assert energy_ax.get_xscale() == "log" and "energy" in energy_ax.get_xlabel()
    ring = [c for c in latency_ax.collections if hasattr(c, "get_sizes") and list(c.get_sizes()) == [260]]
    assert ring and tuple(ring[0].get_offsets()[0]) == (70.0, 0.97)
    plt.close(fig)
