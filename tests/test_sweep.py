"""hilal.sweep: a 2-worker LocalCluster sweep matches the same runs done serially, row for row; resuming skips
finished runs; a worker killed mid-run still leaves one row per run; failed runs are retried and recorded; the
Slurm/PBS job scripts of dask-jobqueue; the summary against hilal.bench.search_criteria."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hilal.cli import main
from hilal.registry import HilalError
from hilal.sweep import (
    bench_json,
    criteria,
    job_script,
    load_grid,
    map_run,
    medians,
    read_errors,
    read_table,
    run,
    search_records,
)
from hilal.sweep.store import row_path
from hilal.sweep.tasks import RUNNING

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
VOLATILE = {"timings", "total_times"}
"""Fields of a result record that depend on the machine's load, not on the run (with the history's seconds)."""
ROW_VOLATILE = {"search_s", "mapping_s", "eval_s", "total_s", "record", "pid", "host", "started", "finished",
                "wall_s", "attempt", "machine"}


@pytest.fixture(scope="module")
def client():
    """One 2-process LocalCluster shared by the tests of this file (starting one costs seconds)."""
    from hilal.sweep import connect

    c, close = connect(load_grid(SMOKE))
    yield c
    close()


@pytest.fixture(scope="module")
def swept(client, tmp_path_factory, resnet8_digits):
    """The smoke grid (8 runs) on the 2 workers."""
    from distributed import get_task_stream

    folder = tmp_path_factory.mktemp("smoke")
    grid = load_grid(SMOKE, out=str(folder))
    with get_task_stream(client) as stream:
        table = run(grid, client=client, progress=False)
    keys = [str(t["key"]) for t in stream.data]
    return grid, table, keys


def _stable(record: dict) -> dict:
    """The record without its clock readings (the run's timings, each history step's seconds)."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["history"] = [{k: v for k, v in step.items() if k != "seconds"} for step in record["history"]]
    return out


def test_parallel_rows_match_serial_runs(swept, tmp_path):
    grid, table, keys = swept
    # the one digital checkpoint of the grid was made (here: found in the cache) by one task, not by each run
    assert sum(k.startswith("train-") for k in keys) == 1 and sum(k.startswith("map-") for k in keys) == 8
    runs = grid.runs()
    assert len(runs) == 8 and len(table) == 8 and set(table["run_id"]) == {r.run_id for r in runs}
    assert table["pid"].nunique() == 2  # both worker processes mapped runs
    parallel = read_table(grid.folder()).set_index("run_id")
    for r in runs:  # each run again, in this process, one after another
        serial = map_run(r, tmp_path)
        row = parallel.loc[r.run_id]
        assert row["analog_layers"].tolist() == serial["analog_layers"], r
        assert _stable(json.loads(row["record"])) == _stable(json.loads(serial["record"])), r
        for k in set(serial) - ROW_VOLATILE - {"analog_layers", "run_id"}:
            a, b = row[k], serial[k]
            assert a == b or (a is None and b is None) or (pd.isna(a) and pd.isna(b)), (r, k, a, b)
    # the grid varies what it says it varies
    assert sorted(table["method"].unique()) == ["hilal", "lionheart"]
    assert sorted({json.loads(s)["drop_threshold"] for s in table["settings"]}) == [0.01, 0.02]


def test_resume_runs_only_missing_rows(swept, client):
    grid, table, _ = swept
    victim = table.sort_values("run_id")["run_id"].iat[0]
    before = {p: p.stat().st_mtime_ns for p in (grid.folder() / "table").glob("*.parquet")}
    row_path(grid.folder(), victim).unlink()
    again = run(grid, client=client, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (grid.folder() / "table").glob("*.parquet")}
    assert len(again) == 8 and set(again["run_id"]) == set(table["run_id"])
    rewritten = [p.stem for p in after if before.get(p) != after[p]]
    assert rewritten == [victim]  # the other seven rows were not run again
    old = table.set_index("run_id").loc[victim]
    new = again.set_index("run_id").loc[victim]
    assert list(new["analog_layers"]) == list(old["analog_layers"]) and new["accuracy_mean"] == old["accuracy_mean"]


def test_command_on_a_running_scheduler(swept, client, tmp_path, capsys):
    """`hilal sweep --scheduler ADDRESS` uses a cluster that is already up; a run gives the row it gave in the
    full sweep (same settings, same id)."""
    import yaml

    _, table, _ = swept
    spec = {**yaml.safe_load(SMOKE.read_text()), "mapping_seeds": [1], "vary": {"drop_threshold": [0.02]}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--scheduler", client.scheduler.address, "--quiet"]) == 0
    assert "fast_seeds" in capsys.readouterr().out
    mine = read_table(out).set_index("run_id")
    assert len(mine) == 2 and set(mine.index) <= set(table["run_id"])
    full = table.set_index("run_id").loc[mine.index]
    assert list(mine["accuracy_mean"]) == list(full["accuracy_mean"])
    assert [list(x) for x in mine["analog_layers"]] == [list(x) for x in full["analog_layers"]]


def test_worker_killed_mid_run_leaves_one_row_per_run(client, tmp_path, resnet8_digits):
    grid = load_grid(SMOKE, out=str(tmp_path), mapping_seeds=[5], vary={"drop_threshold": [0.02]})
    assert len(grid.runs()) == 2
    pids = set(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_first_running() -> None:
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            for m in (tmp_path / RUNNING).glob("*.json"):
                pid = json.loads(m.read_text())["pid"]
                if pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    import threading

    t = threading.Thread(target=kill_first_running)
    t.start()
    table = run(grid, client=client, progress=False)
    t.join()
    assert killed, "no run was caught in progress"
    assert sorted(table["run_id"]) == sorted(r.run_id for r in grid.runs())
    assert len(list((tmp_path / "table").glob("*.parquet"))) == 2
    assert killed[0] not in set(table["pid"])  # the killed worker's run was done again elsewhere
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the worker for the next tests


def test_failed_run_is_retried_and_recorded(client, tmp_path):
    # a setting that only fails inside the mapping: a layer pattern that matches nothing
    grid = load_grid(SMOKE, out=str(tmp_path), methods=["hilal"], mapping_seeds=[0], vary={"drop_threshold": [0.02]},
                     retries=1)
    grid = replace(grid, mapping={**grid.mapping, "layers": ["no_such_layer*"]})
    table = run(grid, client=client, progress=False)
    assert table.empty
    errors = read_errors(tmp_path)
    assert sorted(errors["attempt"]) == [1, 2] and errors["run_id"].nunique() == 1
    assert all(errors["error"].str.len() > 0) and "no_such_layer" in errors["error"].iat[0]


def test_summary_matches_search_criteria(swept, tmp_path, capsys):
    from hilal.bench import search_criteria

    grid, table, _ = swept
    recs = search_records(table)
    assert len(recs) == 4  # 2 mapping seeds x 2 drop thresholds, each with both methods
    for rec in recs:
        h = table[(table["method"] == "hilal") & (table["mapping_seed"] == rec["mapping_seed"])
                  & (table["settings"].map(lambda s: json.loads(s)["drop_threshold"])
                     == rec["config"]["drop_threshold"])]
        assert rec["speedup"] == pytest.approx(rec["lionheart"]["timings"]["total_s"] / h["total_s"].iat[0])
    crit = criteria(table)
    assert len(crit) == 2 and set(crit["settings"].map(lambda s: json.loads(s)["drop_threshold"])) == {0.01, 0.02}
    for _, row in crit.iterrows():
        mine = search_criteria([r for r in recs if r["config"]["drop_threshold"]
                                == json.loads(row["settings"])["drop_threshold"]]).iloc[0]
        assert row["seeds"] == 2 and row["fast_seeds"] == mine["fast_seeds"]
        assert row["speedup"] == pytest.approx(mine["speedup"])
    med = medians(table)
    one = med[(med["method"] == "hilal")].iloc[0]
    sel = table[(table["method"] == "hilal") & (table["settings"] == one["settings"])]
    assert one["seeds"] == 2 and one["analog_mac_share"] == pytest.approx(np.median(sel["analog_mac_share"]))
    out = bench_json(table, tmp_path / "sweep.json")
    from hilal.bench import load_bench

    assert load_bench(out)["records"][0]["hilal"]["analog_layers"] == recs[0]["hilal"]["analog_layers"]
    assert main(["sweep", str(SMOKE), "--out", str(grid.folder()), "--summary"]) == 0
    printed = capsys.readouterr().out
    assert "fast_seeds" in printed and "analog_mac_share" in printed


def test_slurm_and_pbs_job_scripts(tmp_path):
    spec = {"name": "paper", "models": ["resnet8"], "datasets": ["digits"], "presets": ["pcm_harsh"],
            "methods": ["hilal", "lionheart"], "threads": 2,
            "cluster": {"kind": "slurm", "cores": 4, "memory": "16GB", "processes": 2, "walltime": "02:00:00",
                        "queue": "gpu", "account": "aimc", "job_extra_directives": ["--gres=gpu:1"]}}
    script = job_script(load_grid(spec))
    lines = script.splitlines()
    assert lines[0].startswith("#!")
    for directive in ("#SBATCH -p gpu", "#SBATCH -A aimc", "#SBATCH -n 1", "#SBATCH --cpus-per-task=4",
                      "#SBATCH --mem=15G", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:1"):
        assert directive in lines, (directive, script)
    assert "export OMP_NUM_THREADS=2" in lines
    worker = next(ln for ln in lines if "distributed.cli.dask_worker" in ln or "dask worker" in ln)
    assert "--nworkers 2" in worker and "--nthreads 2" in worker and "--memory-limit 7.45GiB" in worker
    pbs = job_script(load_grid({**spec, "cluster": {"kind": "pbs", "cores": 4, "memory": "16GB", "queue": "q"}}))
    assert "#PBS -q q" in pbs and "#PBS -l select=1:ncpus=4:mem=15GB" in pbs
    paper = load_grid(SMOKE.with_name("paper.yaml"))
    assert len(paper.runs()) == 180
    lines = job_script(paper).splitlines()
    assert {"#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=4", "export OMP_NUM_THREADS=4"} <= set(lines)
    assert "--nthreads 1" in lines[-1]  # one run at a time per job, on its 4 CPUs
    with pytest.raises(HilalError, match=r"unknown slurm job resource\(s\) \['gpus'\]"):
        job_script(load_grid({**spec, "cluster": {"kind": "slurm", "cores": 1, "memory": "1GB", "gpus": 1}}))


def test_jobqueue_cluster_needs_its_submit_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    out = tmp_path / "out"
    assert main(["sweep", str(SMOKE.with_name("paper.yaml")), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"hilal( sweep)?: error: a slurm cluster submits jobs with 'sbatch'", err) and "\n" not in err
    assert not out.exists()
    assert main(["sweep", str(SMOKE), "--cluster", "pbs", "--out", str(out)]) == 2
    assert "'qsub', which is not on this machine's PATH" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"models": ["resnet9"]}, r"unknown model 'resnet9'; valid choices: .*resnet8"),
    ({"methods": ["hilal", "greedy"]}, r"unknown method 'greedy'; valid choices: .*lionheart"),
    ({"mapping": {"repz": 2}}, r"unknown MappingConfig setting\(s\) \['repz'\]"),
    ({"mapping": {"finetune": {"step": 2}}}, r"unknown FinetuneConfig setting\(s\) \['step'\]"),
    ({"vary": {"drop_threshold": 0.01}}, r"vary.drop_threshold must be a non-empty list"),
    ({"mapping_seeds": [0, -1]}, r"mapping_seeds must be whole numbers >= 0"),
    ({"workers": 0}, r"workers must be a whole number >= 1"),
    ({"cluster": {"kind": "sge"}}, r"unknown cluster kind 'sge'; valid choices: local, slurm, pbs"),
    ({"seedz": [1]}, r"unknown key\(s\) \['seedz'\]"),
    ({"mapping": {"seed": 3}}, r"'seed' is set by the grid itself"),
])
def test_grid_errors_before_any_work(tmp_path, capsys, change, message):
    import yaml

    spec = {**yaml.safe_load(SMOKE.read_text()), **change, "out": str(tmp_path / "out")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(HilalError, match=message):
        load_grid(path)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"hilal( sweep)?: error: ", err) and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_keeps_finished_rows(tmp_path, client, resnet8_digits):
    """SIGINT to `hilal sweep` after its first row: it exits 130, every row on disk reads, and a second run
    does only the runs that had none."""
    import subprocess
    import sys

    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(SMOKE.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hilal.cli", "sweep", str(SMOKE), "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "table").glob("*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; finished runs are kept" in err
    kept = {p.stem: p.stat().st_mtime_ns for p in (out / "table").glob("*.parquet")}
    assert 1 <= len(kept) < 8 and not list((out / "table").glob(".*.tmp"))
    assert set(read_table(out)["run_id"]) == set(kept)
    table = run(load_grid(SMOKE, out=str(out)), client=client, progress=False)
    assert len(table) == 8
    assert {p.stem: p.stat().st_mtime_ns for p in (out / "table").glob("*.parquet") if p.stem in kept} == kept


def test_seed_table_and_figure_of_the_committed_smoke_sweep():
    """Notebook 11's figure data: one row per run, HILAL's speed-up over LionHeart on the run with the same
    settings and seed; the committed table is the one the notebook's smoke profile reads."""
    from hilal.plots import seed_table, sweep_seeds

    table = read_table(SMOKE.parents[1] / "tests" / "fixtures" / "sweep_smoke")
    assert len(table) == 8 and set(table["run_id"]) == {r.run_id for r in load_grid(SMOKE).runs()}
    data = seed_table(table)
    assert len(data) == 8 and data["speedup"].notna().sum() == 4
    for row in data.dropna(subset=["speedup"]).itertuples():
        same = table[(table["settings"] == row.settings) & (table["mapping_seed"] == row.mapping_seed)]
        by = dict(zip(same["method"], same["total_s"], strict=True))
        assert row.method == "hilal" and row.speedup == pytest.approx(by["lionheart"] / by["hilal"])
    fig, plotted = sweep_seeds(table, target=5.0)
    assert len(fig.axes) == 3 and plotted.equals(data)
