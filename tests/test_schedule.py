"""hilal reproduce --workers: notebooks run side by side in their own processes, dependents after the notebooks
they read, one provenance entry each, failures collected as in the serial runner."""

from __future__ import annotations

import json
import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from hilal.cli import main
from hilal.paths import read_provenance
from hilal.registry import HilalError
from hilal.reproduce import ReproduceError
from hilal.schedule import reproduce_parallel


def write_nb(folder, name, params, body):
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell("import os"), new_code_cell(params, metadata={"tags": ["parameters"]}),
                new_code_cell(body)]
    nbformat.write(nb, folder / name)

BODY = ('import json, pathlib, time\n'
        'out = pathlib.Path(os.environ["HILAL_FIGURES_DIR"])\n'
        't0 = time.time()\n'
        'time.sleep(SLEEP)\n'
        '(out / f"{NB}_times.json").write_text(json.dumps({"start": t0, "end": time.time(),\n'
        '    "saw": sorted(p.name for p in out.glob("*_times.json"))}))\n'
        'assert not FAIL, "asked to fail"')


def test_notebooks_run_side_by_side_after_their_dependencies(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for key in ("03", "04", "05"):
        write_nb(folder, f"{key}_n.ipynb", f'NB = "{key}"  # this notebook\nSLEEP = 2.0  # seconds\n'
                 'FAIL = False  # True or False', BODY)
    prof = tmp_path / "p.yaml"
    prof.write_text("notebooks:\n  '05': {FAIL: true}\n")
    figs = tmp_path / "figs"
    with pytest.raises(ReproduceError, match=r"1 notebook\(s\) failed: 05_n: AssertionError: asked to fail") as e:
        reproduce_parallel(prof, workers=2, stagger=0.2, out_dir=tmp_path / "run", figures=figs, notebooks=folder,
                           progress=False)
    table = e.value.table.set_index("notebook")
    assert list(table.index) == ["03", "04", "05"] and list(table["status"]) == ["ok", "ok", "failed"]
    times = {k: json.loads((figs / f"{k}_times.json").read_text()) for k in ("03", "04", "05")}
    assert times["04"]["start"] >= times["03"]["end"] and "03_times.json" in times["04"]["saw"]  # 04 reads 03
    assert times["05"]["start"] < times["03"]["end"] and times["03"]["start"] < times["05"]["end"]  # side by side
    assert table.loc["04", "started"] >= table.loc["03", "finished"]
    prov = read_provenance(figs)
    assert sorted(prov) == ["03", "04", "05"] and prov["05"]["status"] == "failed"  # no entry lost to a race
    assert all((tmp_path / "run" / f"{k}_n.ipynb").exists() for k in ("03", "04", "05"))


def test_workers_checked_before_any_work(capsys):
    with pytest.raises(HilalError, match="workers must be a positive integer"):
        reproduce_parallel("smoke", workers=0)
    assert main(["reproduce", "--workers", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"hilal( reproduce)?: error: --workers must be a whole number >= 1", err) and "\n" not in err
