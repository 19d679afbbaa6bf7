"""The notebooks: committed stripped and following the conventions, and every one executed at the smoke
profile through ``hilal.reproduce`` (papermill, a real kernel) with its headline numbers asserted."""

from __future__ import annotations

import ast
import itertools
import json
import math
import re

import nbformat
import pandas as pd
import pytest

from hilal import reproduce as rp
from hilal.paths import read_provenance

NOTEBOOKS = rp.list_notebooks()
REQUIRED = ["00_quickstart", "01_digital_baselines", "02_analog_drift", "03_layer_sensitivity", "04_clustering",
            "05_mapping", "06_runtime", "07_drift_per_method", "08_transformers", "09_your_own_model",
            "10_energy_frontier"]
FIGURES = {
    "00": ["00_quickstart_drift"],
    "01": ["01_digital_baselines"],
    "02": ["02_analog_drift"],
    "03": ["03_layer_profile", "03_metric_vs_measured", "03_validity", "03_validity_sources"],
    "04": ["04_clusters"],
    "05": ["05_mapping_overview", "05_mapping_layers", "05_mapping_recheck"],
    "06": ["06_runtime"],
    "07": ["07_drift_per_method"],
    "08": ["08_layer_metrics", "08_mapping"],
    "09": ["09_layer_profile", "09_mapping_overview", "09_mapping_layers"],
    "10": ["10_energy_frontier"],
    "11": ["11_sweep_seeds"],
    "12": ["12_noise_attribution", "12_drift_compensation", "12_layer_attribution"],
    "13": ["13_ablations"],
}
MAX_LINES = 30
OWN_MODEL = {"09"}
"""Notebooks that show the API on a user's own network: they build it and its data with torch and scikit-learn."""
OWN_MODEL_IMPORTS = {"torch", "sklearn"}


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def python_of(src: str) -> str:
    """Cell source with IPython line magics blanked, so that ``ast`` can parse it."""
    return "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!"))
                     else line for line in src.splitlines())


def test_the_required_notebooks_exist_in_reading_order():
    stems = [p.stem for p in NOTEBOOKS.values()]
    assert all(name in stems for name in REQUIRED), stems
    assert list(NOTEBOOKS) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_notebook_is_stripped_and_follows_the_conventions(key):
    path = NOTEBOOKS[key]
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    ids = [c.get("id") for c in json.loads(path.read_text())["cells"]]  # as committed: nbformat fills missing ones
    assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: every cell needs an id of its own (nbformat 4.5)"
    cells = code_cells(nb)
    for c in cells:
        assert c.outputs == [] and c.execution_count is None, f"{path.name}: commit it with outputs stripped"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {key} ")
    assert f"colab.research.google.com/github/{rp.COLAB_REPO}/blob/main/notebooks/{path.name}" in nb.cells[0].source
    # first code cell: the Colab-only install, then the imports, then the one parameters cell
    install = cells[0].source
    assert 'if "google.colab" in sys.modules:' in install and rp.COLAB_INSTALL in install
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [2], f"{path.name}: exactly one parameters cell, right after the imports"
    # the imports, then the allocator setting of hilal.runtime (interactive kernels and a plain papermill
    # run get it too, not only the kernels of hilal reproduce)
    *imports, setting = ast.parse(cells[1].source).body
    assert imports and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in imports)
    assert ast.unparse(setting) == "keep_freed_memory()", f"{path.name}: the imports cell ends with the setting"
    assert any(isinstance(s, ast.ImportFrom) and s.module == "hilal.runtime" for s in imports)
    for c in cells:
        lines = c.source.splitlines()
        assert len(lines) <= MAX_LINES, f"{path.name}: a code cell of {len(lines)} lines"
        assert all(len(line) <= 110 for line in lines), f"{path.name}: lines over 110 characters"
        tree = ast.parse(python_of(c.source))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                              ast.Lambda))]
        assert not defs, f"{path.name}: function definitions belong in the package"
    allowed = {"hilal", "pandas", "sys"} | (OWN_MODEL_IMPORTS if key in OWN_MODEL else set())
    for s in imports:
        mod = s.module if isinstance(s, ast.ImportFrom) else s.names[0].name
        assert mod.split(".")[0] in allowed, f"{path.name}: imports {mod}"


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_parameters_cell_declares_upper_case_names_with_comments(key):
    nb = nbformat.read(NOTEBOOKS[key], as_version=4)
    cell = code_cells(nb)[2]
    tree = ast.parse(cell.source)
    names = [t.id for s in tree.body if isinstance(s, ast.Assign) for t in s.targets]
    assert names and all(isinstance(s, ast.Assign) for s in tree.body)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", n) for n in names), names
    for line in cell.source.splitlines():
        if "=" in line.split("#")[0]:
            assert "#" in line, f"{NOTEBOOKS[key].name}: document allowed values of: {line}"
    # papermill must see every parameter (it skips lines it cannot parse, e.g. an '=' in a comment)
    assert list(rp.declared_parameters(NOTEBOOKS[key])) == names


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_notebook_saves_its_figures_and_summary(key):
    src = "\n".join(c.source for c in code_cells(nbformat.read(NOTEBOOKS[key], as_version=4)))
    names = re.findall(r'plots\.savefig\(fig, "([^"]+)"', src)
    assert names and all(n.startswith(f"{key}_") for n in names)
    if key in FIGURES:
        assert names == FIGURES[key]
    assert f'plots.save_summary("{key}"' in src


def test_readme_indexes_every_notebook_with_a_colab_badge():
    readme = (rp.notebooks_dir() / "README.md").read_text()
    for path in NOTEBOOKS.values():
        assert f"]({path.name})" in readme
        assert f"https://colab.research.google.com/github/{rp.COLAB_REPO}/blob/main/notebooks/{path.name}" in readme


# ------------------------------------------------------------------------- execution at the smoke profile

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every notebook executed once at the smoke profile into a temporary figures folder."""
    root = tmp_path_factory.mktemp("smoke")
    figures = root / "figures"
    table = rp.reproduce("smoke", out_dir=root / "run", figures=figures, progress=False)
    return {"table": table, "figures": figures, "run": root / "run"}


def summary(smoke, key: str) -> dict:
    return json.loads((smoke["figures"] / f"{key}_summary.json").read_text())


@pytest.mark.slow
def test_smoke_profile_runs_every_notebook(smoke):
    table = smoke["table"]
    assert table["notebook"].tolist() == list(NOTEBOOKS)
    assert (table["status"] == "ok").all()
    for key in NOTEBOOKS:
        assert (smoke["run"] / NOTEBOOKS[key].name).exists()
        pngs = sorted(smoke["figures"].glob(f"{key}_*.png"))
        assert pngs, f"notebook {key} wrote no figure"
        for png in pngs:
            assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
            csv = png.with_suffix(".csv")
            assert csv.exists() and len(csv.read_text().splitlines()) >= 2, f"{csv.name} missing or empty"
        if key in FIGURES:
            assert [p.stem for p in pngs] == sorted(FIGURES[key])
    # every kernel recorded where its figures came from, and the runner added the profile and parameters
    prov = read_provenance(smoke["figures"])
    assert list(prov) == list(NOTEBOOKS)
    todo = rp.plan("smoke")
    for key, entry in prov.items():
        assert entry["profile"] == "smoke" and entry["status"] == "ok" and entry["parameters"] == todo[key][1]
        assert entry["written"] < entry["finished"]


@pytest.mark.slow
def test_00_quickstart_numbers(smoke):
    s = summary(smoke, "00")
    fp, acc = s["fp_accuracy"], s["accuracy"]
    assert fp > 0.9
    assert acc["pcm_harsh"]["1 year"] < fp - 0.1
    assert acc["pcm"]["1 min"] > fp - 0.05  # LionHeart's preset barely hurts this small task
    assert acc["pcm_harsh"]["1 min"] > acc["pcm_harsh"]["1 year"] + 0.1  # drift costs accuracy over time


@pytest.mark.slow
def test_01_baselines_numbers(smoke):
    s = summary(smoke, "01")
    assert set(s["accuracy"]) == {"resnet8/digits", "resnet20/digits"}
    assert all(a > 0.9 for a in s["accuracy"].values())
    assert s["mmacs"]["resnet20/digits"] > 2 * s["mmacs"]["resnet8/digits"]


@pytest.mark.slow
def test_02_drift_numbers(smoke):
    acc = summary(smoke, "02")["accuracy"]["resnet8"]
    std = summary(smoke, "02")["std"]["resnet8"]
    assert acc["pcm_harsh"]["1 year"] < acc["pcm"]["1 year"] - 0.2
    assert acc["pcm_harsh"]["1 min"] - acc["pcm_harsh"]["1 year"] > 0.2
    assert std["pcm_harsh"]["1 year"] > std["pcm"]["1 year"]


@pytest.mark.slow
def test_03_eli_ranks_the_layers_best(smoke):
    s = summary(smoke, "03")
    rho = s["spearman"]
    assert s["layers"] == 10
    assert rho["eli"] > 0.6
    assert rho["eli"] >= max(rho["trace"], rho["lambda_max"]) - 0.05
    # the validity section: the model and preset of sections 1-2, its ceiling the root of their split-half
    assert s["validity"]["resnet8/pcm_harsh"] == pytest.approx(rho)
    assert s["ceiling"]["resnet8"]["pcm_harsh"] == pytest.approx(math.sqrt(max(s["split_half"], 0)))
    assert rho["eli"] <= s["ceiling"]["resnet8"]["pcm_harsh"] + 0.25
    # section 6: the preset again (sections 1-2 reused) and its weight noise alone
    assert list(s["why"]) == ["model", "pcm_harsh", "weights only"] and s["why"]["model"] == "resnet8"
    assert s["why"]["pcm_harsh"]["eli"] == pytest.approx(rho["eli"])
    assert 0 <= s["why"]["weights only"]["ceiling"] <= 1


@pytest.mark.slow
def test_04_clusters(smoke):
    s = summary(smoke, "04")
    assert 1 <= s["n_robust"] < s["n_layers"] == 10
    assert s["mean_log10_eli"]["robust"] < s["mean_log10_eli"]["sensitive"]
    assert 0 < s["robust_mac_share"] < 1


@pytest.mark.slow
def test_05_mapping_numbers(smoke):
    s = summary(smoke, "05")
    m = s["methods"]
    assert m["all-digital"]["analog_mac_share"] == 0 and abs(m["all-digital"]["accuracy_drop"]) < 1e-9
    assert m["all-analog"]["analog_mac_share"] == pytest.approx(1.0)
    assert m["all-analog"]["accuracy_drop"] > 0.05
    # LionHeart keeps a layer only within the tolerance (on the calibration split; the test split may differ)
    assert 0.2 < m["lionheart"]["analog_mac_share"] < 1
    assert m["lionheart"]["accuracy_drop"] < s["drop_threshold"] + 0.04
    # HILAL offloads part of the network and keeps what its search found too sensitive digital
    assert 0 < m["hilal"]["analog_mac_share"] < 1
    assert m["hilal"]["accuracy_drop"] < m["all-analog"]["accuracy_drop"]
    assert m["hilal-paper"]["analog_mac_share"] > 0
    # section 4: every mapping re-scored on fresh programmings against the one floor (baseline - tolerance)
    rc = s["recheck"]
    assert set(rc) == set(m)
    floors = {k: c["calib_mean"] - c["margin"] for k, c in rc.items()}
    floor = floors["all-digital"]
    assert all(f == pytest.approx(floor, abs=1e-9) for f in floors.values())
    digital = rc["all-digital"]  # scores the same at every programming, exactly the tolerance above the floor
    assert digital["calib_se"] == 0 and digital["margin"] == pytest.approx(s["drop_threshold"], abs=1e-8)
    assert digital["holds_floor"] and digital["accepted"] is None and digital["pass_rate"] == 1.0
    for c in rc.values():  # one more evaluation clears the floor more often than not exactly when the margin is >= 0
        assert 0 <= c["pass_rate"] <= 1 and (c["pass_rate"] >= 0.5) == (c["margin"] >= 0)
    assert rc["all-analog"]["margin"] < 0 and not rc["all-analog"]["holds_floor"]
    for k in ("hilal", "lionheart"):  # steps are kept only at or above the floor
        assert rc[k]["accepted"] >= floor and rc[k]["holds_floor"] == (rc[k]["margin"] >= 0)


@pytest.mark.slow
def test_06_runtime_reuses_the_mappings(smoke):
    s = summary(smoke, "06")
    assert s["reused"] is True
    assert s["speedup_hilal_vs_lionheart"] > 0
    assert s["rounds"]["hilal"] <= s["rounds"]["lionheart"]
    assert s["total_s"]["all-digital"] < s["total_s"]["lionheart"]


@pytest.mark.slow
def test_07_drift_per_method_numbers(smoke):
    s = summary(smoke, "07")
    fp, acc = s["fp_accuracy"], s["accuracy"]
    assert all(v == pytest.approx(fp) for v in acc["all-digital"].values())  # nothing analog, nothing drifts
    assert acc["all-analog"]["1 year"] < fp - 0.1
    assert acc["hilal"]["1 year"] > acc["all-analog"]["1 year"]
    # the stored final models behave as in notebook 05 (evaluated there at T_EVAL = 1 day, on other
    # programmings): the two means agree within 4 standard errors of their difference (the all-analog model's
    # repetitions spread by about 0.04, the fine-tuned ones' by about 0.01)
    drift = pd.read_csv(smoke["figures"] / "07_drift_per_method.csv").set_index(["method", "time"])
    reps05 = rp.load_profile("smoke")["common"]["REPS"]
    for method, r in summary(smoke, "05")["methods"].items():
        d = drift.loc[(method, "1 day")]
        se = math.hypot(r["accuracy_std"] / math.sqrt(reps05), d["std"] / math.sqrt(d["reps"]))
        assert acc[method]["1 day"] == pytest.approx(r["accuracy_mean"], abs=max(4 * se, 0.01)), method



@pytest.mark.slow
def test_08_transformers_numbers(smoke):
    s = summary(smoke, "08")["models"]
    assert set(s) == {"vit_tiny", "mobilebert_tiny"}
    vit, qa = s["vit_tiny"], s["mobilebert_tiny"]
    assert vit["task"] == "classification" and vit["fp"]["accuracy"] > 0.6  # ten classes: chance is 0.1
    # the QA score is the SQuAD F1, reported with exact match (EM <= F1 by definition)
    assert qa["task"] == "qa" and 0 < qa["fp"]["em"] <= qa["fp"]["f1"] == pytest.approx(qa["fp"]["accuracy"])
    for name, m in s.items():
        # every projection is a mappable layer with finite curvature: q, k, v, out and the feed-forward ones
        assert len(m["layers"]) == m["fp"]["layers"] and all(math.isfinite(e) for e in m["eli"])
        for proj in (("attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2") if name == "vit_tiny" else
                     ("self.query", "self.key", "self.value", "attention.output.dense", "bottleneck.input.dense",
                      "ffn.0.output.dense")):
            assert sum(proj in layer for layer in m["layers"]) == 2, (name, proj)  # two blocks each
        assert 1 <= len(m["robust"]) < len(m["layers"])
        hilal, lionheart = m["methods"]["hilal"], m["methods"]["lionheart"]
        assert lionheart["rounds"] == len(m["layers"])  # one retraining per candidate layer
        assert hilal["rounds"] < lionheart["rounds"]
        assert hilal["analog_mac_share"] > 0 and lionheart["analog_mac_share"] > 0


@pytest.mark.slow
def test_09_your_own_model_numbers(smoke):
    """The public API on an nn.Sequential and plain DataLoaders: its layers are the Sequential's module names,
    every method maps a subset of them, and the all-digital mapping scores what the trained network does."""
    s = summary(smoke, "09")
    assert s["layers"] == ["0", "2", "5", "8", "10"]  # the Conv2d and Linear modules of the notebook's network
    assert s["fp_accuracy"] > 0.85 and 1 <= len(s["robust"]) < len(s["layers"])
    methods = s["methods"]
    assert methods["all-digital"]["analog_mac_share"] == 0
    assert methods["all-digital"]["accuracy_mean"] == pytest.approx(s["fp_accuracy"])
    assert methods["all-analog"]["analog_layers"] == s["layers"] and methods["all-analog"]["analog_mac_share"] == 1
    for name in ("hilal", "lionheart"):
        assert set(methods[name]["analog_layers"]) <= set(s["layers"])
        assert 0 < methods[name]["analog_mac_share"] < 1
    assert -1 <= s["spearman"]["eli"] <= 1


@pytest.mark.slow
def test_10_energy_frontier_numbers(smoke):
    """The frontier runs from all-digital (no tile, gain 1) to all-analog, its sets grow in expected loss and
    energy saved; the ringed point fits the budget; the HILAL points that beat LionHeart really do."""
    s = summary(smoke, "10")
    f, lh = s["frontier"], s["lionheart"]
    assert f[0]["kind"] == "all-digital" and f[0]["analog_tiles"] == 0 and f[0]["energy_gain"] == pytest.approx(1)
    assert f[-1]["kind"] == "all-analog" and f[-1]["n_analog"] == 22  # ResNet-20's mappable layers
    hilal = [p for p in f if p["kind"] == "hilal"]
    assert hilal and all(a["energy_uj"] > b["energy_uj"] for a, b in itertools.pairwise([f[0], *hilal]))
    assert 0 < lh["n_analog"] < 22 and lh["energy_uj"] < f[0]["energy_uj"]
    for p in s["beats_lionheart"]:
        assert p["energy_uj"] < lh["energy_uj"] and p["accuracy_drop"] <= lh["accuracy_drop"] + 1e-12
    if s["chosen"] is not None:
        assert s["chosen"]["analog_tiles"] <= s["max_tiles"]
@pytest.mark.slow
def test_12_noise_attribution_numbers(smoke):
    """Each source alone costs less than the whole preset; the dominant sources named are sources; the output-space
    ELI sees output noise, which the weight-space one cannot; with exact converters the drift-compensation factor
    is the same for every layer, through the preset's periphery it is not."""
    s = summary(smoke, "12")
    sources = {"programming", "drift", "read", "dac", "adc", "output", "clipping"}
    for by_time in s["dominant"].values():
        for d in by_time.values():
            assert d["alone"] in sources and d["removed"] in sources
            assert d["share_alone"] < 1 and d["all_drop"] > 0
    cap = s["capture"]
    assert cap["output"]["eli_weight"] == 0 and cap["output"]["eli_output"] > 0
    comp = pd.read_csv(smoke["figures"] / "12_drift_compensation.csv")
    spread = comp.groupby("setting")["alpha"].std()
    assert spread["drift"] < 0.05 and spread["all"] > spread["drift"]


@pytest.mark.slow
def test_13_ablations_numbers(smoke):
    """The chart's baselines are what they say; the kit's guard keeps ``hilal-paper`` nearer the tolerance than
    the paper-faithful variant, which keeps every robust layer it tries (as many analog, or more)."""
    s = summary(smoke, "13")
    m = s["models"]["resnet8"]
    assert m["full digital"]["analog_mac_share"] == 0 and abs(m["full digital"]["drop"]) < 1e-9
    assert m["full analog"]["analog_mac_share"] == pytest.approx(1.0) and m["full analog"]["drop"] > 0.05
    assert s["variant"] == "kit" and set(s["tried"]["resnet8"]) <= set(m)
    g = s["guard"]
    kit, faithful = g["eli-r (kit)"], g["eli-r (paper-faithful)"]
    assert faithful["kept"] == s["tried"]["resnet8"]["eli-r"] >= kit["kept"]
    assert faithful["analog_mac_share"] >= kit["analog_mac_share"] and kit["drop"] <= faithful["drop"]


def test_11_sweeps_numbers(smoke):
    """The notebook's numbers are those of the sweep table it read (the committed smoke sweep), recomputed."""
    from hilal.sweep import criteria, read_table

    s = summary(smoke, "11")
    table = read_table(rp.notebooks_dir().parent / "tests" / "fixtures" / "sweep_smoke")
    assert s["runs"] == s["grid_runs"] == len(table) == 8
    crit = criteria(table).groupby("model")
    assert s["seeds"] == {m: int(g["seeds"].sum()) for m, g in crit} == {"resnet8": 4}
    assert s["all_seeds"] == {m: int(g["all_seeds"].sum()) for m, g in crit}
    hilal, lionheart = (table[table["method"] == m].sort_values(["settings", "mapping_seed"]) for m in
                        ("hilal", "lionheart"))
    speed = lionheart["total_s"].to_numpy() / hilal["total_s"].to_numpy()
    assert s["median_speedup"]["resnet8"] == pytest.approx(float(pd.Series(speed).median()), abs=1e-3)
