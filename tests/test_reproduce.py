"""The papermill runner (profiles, parameter checks, failures) and the results shared between notebooks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

import hilal
from hilal import reproduce as rp
from hilal.paths import PROVENANCE, code_fingerprint, project_root, source_revision
from hilal.registry import HilalError
from hilal.runtime import allocator_env, machine_info


def write_nb(folder: Path, name: str, params: str, body: str) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell("import os"), new_code_cell(params, metadata={"tags": ["parameters"]}),
                new_code_cell(body)]
    path = folder / name
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny(tmp_path):
    """Two small notebooks and a profile file."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_nb(folder, "00_first.ipynb", 'A = 1  # any int\nSHARED = "x"  # any string',
             'import json, pathlib, torch\n'
             'out = pathlib.Path(os.environ["HILAL_FIGURES_DIR"])\n'
             '(out / "00_values.json").write_text(json.dumps({"A": A, "SHARED": SHARED,\n'
             '                                              "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_"),\n'
             '                                              "threads": torch.get_num_threads()}))\n'
             'from hilal import plots\n'
             'plots.save_summary("00", {"A": A})')
    write_nb(folder, "01_second.ipynb", "B = 2  # any int\nFAIL = False  # True or False",
             'assert not FAIL, "asked to fail"')
    return folder


def profile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(HilalError, match=r"unknown profile 'nope'.*paper.*smoke"):
        rp.load_profile("nope")
    with pytest.raises(HilalError, match="does not exist"):
        rp.load_profile("/no/such/profile.yaml")


def test_profile_sections_are_checked(tmp_path):
    with pytest.raises(HilalError, match=r"unknown section.*'extras'"):
        rp.load_profile(profile(tmp_path, "extras: 1\n"))
    prof = rp.load_profile(profile(tmp_path, "notebooks:\n  3: {A: 1}\n  '04': {}\n  05: {}\n"))
    assert set(prof["notebooks"]) == {"03", "04", "05"}


def test_plan_applies_common_where_declared_and_sections_per_notebook(tmp_path, tiny):
    p = profile(tmp_path, "common: {SHARED: y, B: 5}\nnotebooks:\n  '00': {A: 7}\n")
    todo = rp.plan(p, folder=tiny)
    assert list(todo) == ["00", "01"]
    assert todo["00"][1] == {"SHARED": "y", "A": 7}
    assert todo["01"][1] == {"B": 5}
    assert list(rp.plan(p, only=1, folder=tiny)) == ["01"]
    assert list(rp.plan(p, only="01,00", folder=tiny)) == ["01", "00"]


def test_unknown_notebook_number(tmp_path, tiny):
    p = profile(tmp_path, "common: {}\n")
    with pytest.raises(HilalError, match=r"unknown notebook '07'; valid choices: 00, 01"):
        rp.plan(p, only="07", folder=tiny)
    with pytest.raises(HilalError, match=r"unknown notebook '09'"):
        rp.plan(profile(tmp_path, "notebooks:\n  '09': {A: 1}\n"), folder=tiny)


def test_undeclared_parameters_are_errors_before_anything_runs(tmp_path, tiny, monkeypatch):
    import papermill

    def boom(*a, **k):
        raise AssertionError("nothing may execute when a parameter is wrong")

    monkeypatch.setattr(papermill, "execute_notebook", boom)
    p = profile(tmp_path, "notebooks:\n  '01': {B: 3, TYPO: 1}\n")
    with pytest.raises(HilalError, match=r"'TYPO'.*01_second.ipynb.*declares: B, FAIL"):
        rp.reproduce(p, notebooks=tiny, out_dir=tmp_path / "run", progress=False)
    p = profile(tmp_path, "common: {NOBODY: 1}\n")
    with pytest.raises(HilalError, match=r"common parameter 'NOBODY' is declared by no notebook"):
        rp.reproduce(p, notebooks=tiny, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(HilalError, match=r"'B' \(overrides.*00_first.ipynb"):
        rp.reproduce(profile(tmp_path, "{}\n"), notebooks=tiny, overrides={"B": 1}, progress=False,
                     out_dir=tmp_path / "run")


def test_real_profiles_match_the_notebooks():
    for name in ("smoke", "paper"):
        todo = rp.plan(name)
        assert list(todo) == list(rp.list_notebooks())
        assert all(params for _, params in todo.values())


@pytest.mark.slow
def test_reproduce_executes_with_parameters_env_and_reports_failures(tmp_path, tiny, monkeypatch):
    # a clean HOME: the kernel must not depend on anything registered per user
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    # the kernel gets these from reproduce itself (one torch thread unless told otherwise)
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    malloc = allocator_env().get("MALLOC_TRIM_THRESHOLD_")
    figs = tmp_path / "figs"
    p = profile(tmp_path, "common: {SHARED: z}\nnotebooks:\n  '00': {A: 42}\n  '01': {FAIL: true}\n")
    with pytest.raises(rp.ReproduceError, match=r"1 notebook\(s\) failed: 01_second: AssertionError: asked to fail") \
            as err:
        rp.reproduce(p, notebooks=tiny, out_dir=tmp_path / "run", figures=figs, progress=False)
    table = err.value.table
    assert table.set_index("notebook")["status"].to_dict() == {"00": "ok", "01": "failed"}
    assert json.loads((figs / "00_values.json").read_text()) == {"A": 42, "SHARED": "z", "malloc": malloc,
                                                                 "threads": 1}
    assert (tmp_path / "run" / "00_first.ipynb").exists() and (tmp_path / "run" / "reproduce.csv").exists()
    prov = json.loads((figs / PROVENANCE).read_text())["notebooks"]
    assert {k: (v["name"], v["status"], v["parameters"]) for k, v in prov.items()} == {
        "00": ("00_first", "ok", {"A": 42, "SHARED": "z"}), "01": ("01_second", "failed", {"FAIL": True})}
    first, second = prov["00"], prov["01"]
    assert first["profile"] == "p" and first["seconds"] == table["seconds"].iloc[0]
    assert first["code"] == code_fingerprint() and first["machine"]["cpu_model"] == machine_info()["cpu_model"]
    assert first["machine"]["threads"] == 1 and first["machine"]["torch"] == torch.__version__
    assert first["commit"] == source_revision()["commit"]  # None outside a git checkout
    # 00's kernel recorded its summary (save_summary); 01 failed before writing anything: the runner's record
    assert first["written"] < first["finished"] and "written" not in second
    assert second["machine"]["threads"] == 1 and second["code"] == code_fingerprint()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a user's setting is kept, an explicit argument wins over it
    table = rp.reproduce(p, only="00", notebooks=tiny, out_dir=tmp_path / "run2", figures=figs, progress=False,
                         threads=1)
    assert table["status"].tolist() == ["ok"] and table["seconds"].iloc[0] > 0
    assert json.loads((figs / "00_values.json").read_text())["threads"] == 1
    prov = json.loads((figs / PROVENANCE).read_text())["notebooks"]
    assert prov["01"] == second and prov["00"]["written"] > first["finished"]  # 01's entry is kept
    (figs / PROVENANCE).write_text("{not json")  # a damaged file is started afresh, not fatal
    rp.reproduce(p, only="00", notebooks=tiny, out_dir=tmp_path / "run3", figures=figs, progress=False)
    assert json.loads((figs / "00_values.json").read_text())["threads"] == min(2, os.cpu_count())  # torch's cap
    prov = json.loads((figs / PROVENANCE).read_text())["notebooks"]
    assert list(prov) == ["00"] and prov["00"]["machine"]["threads"] == min(2, os.cpu_count())  # the kernel's
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(HilalError, match=r"threads must be a positive integer.*got"):
            rp.reproduce(p, notebooks=tiny, figures=figs, progress=False, threads=bad)


def test_source_revision_names_the_checkout_commit_or_none(tmp_path):
    rev = source_revision()  # the kit's own checkout
    if (project_root() / ".git").exists():
        assert len(rev["commit"]) == 40 and isinstance(rev["modified"], bool)
    assert source_revision(tmp_path) == {"commit": None, "modified": None}  # not a git checkout
    repo = tmp_path / "repo"  # a checkout of its own: figures/ may change, anything else tracked may not
    (repo / "figures").mkdir(parents=True)
    (repo / "figures" / "a.csv").write_text("1")
    (repo / "code.py").write_text("x = 1")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (repo / "figures" / "a.csv").write_text("2")
    (repo / "new.py").write_text("untracked")
    assert source_revision(repo) == {"commit": head, "modified": False}
    (repo / "code.py").write_text("x = 2")
    assert source_revision(repo) == {"commit": head, "modified": True}
    # inside a repository but not at its top (an installed package under someone's project)
    assert source_revision(repo / "figures") == {"commit": None, "modified": None}


def test_mapping_results_are_stored_and_reused_with_identical_settings(tmp_path, monkeypatch, digits):
    from hilal.evaluate import noisy_scores
    from hilal.mapping import MappingConfig, snapshot
    from hilal.train import FinetuneConfig

    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path / "data"))
    cfg = MappingConfig(preset="pcm_harsh", reps=2, patience=1, max_rounds=1, finetune=FinetuneConfig(steps=3))
    first = rp.mapping_results(["all-analog-ft", "all-digital"], "resnet8", digits, cfg, progress=False)
    assert not any(m.reused for m in first.values())
    again = rp.mapping_results(["all-analog-ft", "all-digital"], "resnet8", digits, cfg, progress=False)
    assert all(m.reused for m in again.values())
    for name in first:
        assert again[name].result == first[name].result
        a, b = snapshot(first[name].model), snapshot(again[name].model)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    # the fine-tuned model comes back as it was: same scores under the same seeds
    np.testing.assert_array_equal(noisy_scores(first["all-analog-ft"].model, digits, 3600.0, 2, seed=5),
                                  noisy_scores(again["all-analog-ft"].model, digits, 3600.0, 2, seed=5))
    # a stored mapping re-checks as the one computed: same model, same fresh programmings; the score its
    # retraining stage was kept at is the history's
    ft, ft_again = first["all-analog-ft"].recheck(digits, 3, seed=2), again["all-analog-ft"].recheck(digits, 3, seed=2)
    assert ft == ft_again and ft["floor"] == first["all-analog-ft"].result["floor"]
    assert ft["accepted"] == first["all-analog-ft"].result["history"][-1]["score"]
    other = rp.mapping_results(["all-digital"], "resnet8", digits, MappingConfig(reps=3), progress=False)
    assert not other["all-digital"].reused
    fresh = rp.mapping_results(["all-digital"], "resnet8", digits, cfg, reuse=False, progress=False)
    assert not fresh["all-digital"].reused


def test_layer_metrics_are_cached_by_settings(tmp_path, monkeypatch, digits):
    import hilal.api as api
    import hilal.hessian as hs

    calls = []

    def fake(model, splits, preset, cfg, progress=True):
        calls.append(cfg.probes)
        df = pd.DataFrame({"layer": ["a", "b"], "eli": [float(cfg.probes), 2.0]})
        df.attrs["total_s"] = 1.5
        return df

    monkeypatch.setattr(api, "layer_metrics", fake)
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path / "data"))
    tag = {"model": "m"}
    a = rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(probes=4), tag=tag, reuse=True)
    b = rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(probes=4), tag=tag, reuse=True)
    pd.testing.assert_frame_equal(a, b)
    assert b.attrs["total_s"] == 1.5 and calls == [4]
    rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(probes=8), tag=tag, reuse=True)
    rp.layer_metrics_for(None, digits, "pcm_harsh", hs.HessianConfig(probes=4), tag=tag, reuse=True)
    rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(probes=4), tag={"model": "n"}, reuse=True)
    rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(probes=4), tag=tag, reuse=False)
    assert calls == [4, 8, 4, 4, 4]


def test_caches_are_keyed_by_the_code(tmp_path, monkeypatch, digits):
    """A change of the package's source changes the fingerprint, and a changed fingerprint recomputes."""
    import hilal.api as api
    import hilal.hessian as hs

    for name, text in (("a", "x = 1\n"), ("b", "x = 2\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.py").write_text(text)
    assert rp.code_fingerprint(tmp_path / "a") != rp.code_fingerprint(tmp_path / "b")
    assert rp.code_fingerprint() == rp.code_fingerprint(Path(hilal.__file__).parent)
    calls = []
    monkeypatch.setattr(api, "layer_metrics", lambda *a, **k: calls.append(1) or pd.DataFrame({"layer": ["a"]}))
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path / "data"))
    rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(), tag={"m": 1})
    rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(), tag={"m": 1})
    monkeypatch.setattr(rp, "code_fingerprint", lambda root=None: "0+changed")
    rp.layer_metrics_for(None, digits, "pcm", hs.HessianConfig(), tag={"m": 1})
    assert len(calls) == 2


def test_zoo_table_counts_the_model(digits, resnet8_digits):
    from hilal.analog import count_macs, mappable_layers
    from hilal.train import score

    zoo = rp.zoo_table(["resnet8"], ["digits"], progress=False)
    row = zoo.iloc[0]
    assert row["layers"] == len(mappable_layers(resnet8_digits))
    assert row["mmacs"] == pytest.approx(sum(count_macs(resnet8_digits, digits.example_input(2)).values()) / 1e6)
    assert row["accuracy"] == pytest.approx(score(resnet8_digits, digits, "test"))
