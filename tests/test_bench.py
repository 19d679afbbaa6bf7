"""Benchmarks: the JSON each one writes (tiny sizes), ratios recomputed from the recorded times, and the
PyHessian per-layer reference checked against a dense Hessian. No timed assertions."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from hilal.bench import (
    TARGET_SPEEDUP,
    BenchConfig,
    joint_estimates,
    main,
    pyhessian_estimates,
    run_bench,
    script,
    search_criteria,
    table,
)
from hilal.registry import HilalError
from hilal.train import FinetuneConfig

MACHINE_KEYS = {"torch", "threads", "device", "cpu_count", "python", "cpu_model"}


def _load(path):
    data = json.loads(path.read_text())
    assert MACHINE_KEYS | {"date"} <= set(data["machine"])
    assert data["machine"]["torch"] == torch.__version__
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
             if ln.startswith("model name")] if cpuinfo.exists() else []
    assert data["machine"]["cpu_model"] == (names[0] if names else data["machine"]["processor"])
    return data


def test_hessian_bench_json(tmp_path, resnet8_digits):
    from hilal.analog import mappable_layers

    out = tmp_path / "hessian.json"
    # 16 probes: the per-layer side's standard errors come from its own probes, and from 3 (2 degrees of
    # freedom) one layer in ten fell outside 5 of them on one machine's trained model
    with pytest.raises(HilalError, match="unknown model 'no_such_model'; valid choices: "):  # before any work
        run_bench("hessian", out=out, models=["resnet8", "no_such_model"], progress=False)
    assert not out.exists()
    for sides in (("batched", "exact"), ("batched",), ("loop", "loop")):
        with pytest.raises(HilalError, match="pass_sides must be two or three different sides of: batched, sampled"):
            run_bench("hessian", out=out, models=["resnet8"], pass_sides=sides, progress=False)
    run_bench("hessian", out=out, models=["resnet8"], repeats=2, probes=16, eli_samples=2, max_samples=48,
              progress=False)
    data = _load(out)
    assert data["kind"] == "hessian" and data["complete"]
    (rec,) = data["records"]
    n_layers = len(mappable_layers(resnet8_digits))
    assert rec["model"] == "resnet8" and rec["layers"] == n_layers and rec["samples"] == 48
    # ResNet-8 is piecewise linear in every weight: exact Gauss-Newton blocks, one check HVP per layer
    assert rec["curvature"] == "gauss-newton" and rec["gauss_newton_mismatch"] < 1e-4
    assert rec["hvps_joint"] == n_layers
    # the curvature pass at default settings: the loop takes every draw, the sequential rule at most as many
    assert rec["eli_draws_loop"] == 128 and 16 <= rec["eli_draws_batched"] <= 128
    assert all(16 <= e["draws_batched"] <= 128 for e in rec["pass_estimates"])
    assert 0 < rec["eli_share_batched"] < 1 and rec["pass_batched_s"] > 0
    assert len(rec["pass_estimates"]) == n_layers and rec["pass_max_z_eli"] < 4
    assert rec["hvps_per_layer"] == n_layers * (16 + 2)
    assert len(rec["joint_times"]) == len(rec["per_layer_times"]) == 2
    assert rec["joint_s"] == pytest.approx(np.median(rec["joint_times"]))
    assert rec["per_layer_s"] == pytest.approx(np.median(rec["per_layer_times"]))
    assert rec["speedup"] == pytest.approx(rec["per_layer_s"] / rec["joint_s"])
    assert rec["hvp_cost_ratio"] == pytest.approx(rec["block_hvps_s"] / rec["full_hvp_s"])
    assert rec["output_hvp_cost_ratio"] == pytest.approx(rec["block_hvps_s"] / rec["output_hvp_s"])
    est = {k: np.array([e[k] for e in rec["estimates"]]) for k in rec["estimates"][0] if k != "layer"}
    assert [e["layer"] for e in rec["estimates"]] == mappable_layers(resnet8_digits)
    rel_tr = np.abs(est["trace_joint"] - est["trace_pyhessian"]) / np.abs(est["trace_pyhessian"])
    assert rec["max_rel_diff_trace"] == pytest.approx(rel_tr.max())
    assert rec["max_rel_diff"] == pytest.approx(max(rec["max_rel_diff_trace"], rec["max_rel_diff_eli"]))
    z = np.abs(est["eli_joint"] - est["eli_pyhessian"]) / np.hypot(est["eli_joint_se"], est["eli_pyhessian_se"])
    assert rec["max_z_eli"] == pytest.approx(z.max())
    # the same noise samples on both sides and no Monte-Carlo error of its own: the same ELI to rounding
    np.testing.assert_allclose(est["eli_joint"], est["eli_pyhessian"], rtol=1e-3, atol=1e-7)
    assert np.all(np.abs(est["trace_joint"] - est["trace_pyhessian"]) <= 5 * est["trace_pyhessian_se"])
    se_ratio = np.median(est["trace_joint_se"] / est["trace_pyhessian_se"])
    assert rec["se_ratio_trace"] == pytest.approx(se_ratio)
    worst = max(se_ratio, rec["se_ratio_eli"])
    assert rec["equal_error_speedup"] == pytest.approx(rec["speedup"] / worst**2)
    assert list(table("hessian", data["records"])["model"]) == ["resnet8"]


def _tanh_case(seed: int, scale: float, draws: int, samples: int = 32) -> tuple[nn.Module, tuple, list[str], list]:
    """A tiny float64 tanh MLP (curved: Gauss-Newton blocks are not the Hessian), data and weight noise."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(samples, 4, dtype=torch.float64), torch.randint(0, 3, (samples,))
    noise = [[scale * torch.randn_like(model[0].weight), scale * torch.randn_like(model[2].weight)]
             for _ in range(draws)]
    return model, (x, y), ["0", "2"], noise


def _dense_reference(model: nn.Module, batch: tuple, layers: list[str], noise: list) -> tuple[list, list]:
    """Exact tr(H_ll) and mean g.dw + 1/2 dw^T H_ll dw over the noise, per layer, from dense Hessians."""
    x, y = batch
    traces, elis = [], []
    for i, name in enumerate(layers):
        w0 = model.get_submodule(name).weight.detach().clone()

        def loss_of(w, name=name):
            return nn.functional.cross_entropy(torch.func.functional_call(model, {f"{name}.weight": w}, (x,)), y)

        h = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), w0.numel())
        g = torch.autograd.grad(loss_of(w0.requires_grad_(True)), w0)[0].reshape(-1)
        traces.append(float(h.trace()))
        elis.append(np.mean([float(g @ dw[i].reshape(-1) + 0.5 * dw[i].reshape(-1) @ h @ dw[i].reshape(-1))
                             for dw in noise]))
    return traces, elis


def test_pyhessian_reference_matches_dense_hessian():
    """The per-layer side (PyHessian objects, one layer at a time) gives exactly g.dw + 1/2 dw^T H_ll dw per
    noise sample, and an unbiased trace: compared with the dense Hessian of a tiny float64 MLP."""
    model, batch, layers, noise = _tanh_case(0, 0.1, 3)
    for p in model.parameters():  # stale gradients (e.g. of a training step) must not leak into PyHessian's
        p.grad = torch.randn_like(p)
    est = pyhessian_estimates(model, batch, layers, noise, probes=400)
    assert est["hvps"] == 2 * (400 + 3)
    traces, elis = _dense_reference(model, batch, layers, noise)
    for i in range(len(layers)):
        assert est["eli"][i] == pytest.approx(elis[i], rel=1e-8)
        assert abs(est["trace"][i] - traces[i]) < 4 * est["trace_se"][i] + 1e-9
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # model left as it was


def test_joint_side_on_a_curved_model_matches_dense_hessian():
    """Where Gauss-Newton blocks are not the Hessian (tanh), the joint side takes output-space HVPs for all
    layers: the trace probes shared out over gradient strata, one product per noise sample; its traces and
    ELI agree with the dense Hessian within their Monte-Carlo errors."""
    from hilal.hessian import HessianConfig, OutputOperator, probe_counts, strata_for

    model, batch, layers, noise = _tanh_case(1, 0.3, 40, samples=128)
    est = joint_estimates(model, batch, layers, noise, probes=400, seed=0)
    strata = strata_for(HessianConfig().strata, 400, len(batch[0]))
    assert strata > 1
    op = OutputOperator(model, [batch], layers, strata)
    traces_hvps = sum(n * w for n, w in zip(probe_counts(op, 400), op.batch_weights, strict=True))
    assert est["curvature"] == "hvp" and est["hvps"] == round(traces_hvps + 40)
    traces, elis = _dense_reference(model, batch, layers, noise)
    for i in range(len(layers)):
        assert abs(est["trace"][i] - traces[i]) < 4 * est["trace_se"][i]
        assert abs(est["eli"][i] - elis[i]) < 4 * est["eli_se"][i]


def test_search_bench_json(tmp_path, resnet8_digits, digits, capsys):
    out = tmp_path / "search.json"
    from hilal.hessian import HessianConfig

    tiny = {"probes": 2, "eli_samples": 2, "first_order_samples": 2, "power_iters": 2, "max_samples": 32}
    known = {f.name for f in fields(HessianConfig)}
    mapping = {"reps": 1, "max_rounds": 1, "patience": 1, "finetune": FinetuneConfig(steps=1),
               "hessian": {k: v for k, v in tiny.items() if k in known}}
    run_bench("search", out=out, search_models=["resnet8"], repeats=1, mapping=mapping, mapping_seeds=[0, 1],
              recheck_reps=3, progress=False)
    data = _load(out)
    rec, rec1 = data["records"]
    assert [rec["mapping_seed"], rec1["mapping_seed"]] == [0, 1] == [rec["config"]["seed"], rec1["config"]["seed"]]
    assert rec["train_seed"] == rec1["train_seed"] == data["config"]["seed"] == 0
    assert (rec["model"], rec["dataset"], rec["preset"]) == ("resnet8", "digits", "pcm_harsh")
    assert rec["config"]["reps"] == 1 and rec["config"]["finetune"]["steps"] == 1
    for method in ("hilal", "lionheart"):
        r = rec[method]
        assert r["method"] == method and r["preset"] == "pcm_harsh"
        assert set(r["timings"]) >= {"search_s", "mapping_s", "total_s"}
        assert r["timings"]["total_s"] == pytest.approx(np.median(r["total_times"]))
        assert 0.0 <= r["analog_mac_share"] <= 1.0 and 0.0 <= r["accuracy_mean"] <= 1.0
        assert r["reps"] == 1 and isinstance(r["history"], list)
    assert rec["speedup"] == pytest.approx(rec["lionheart"]["timings"]["total_s"] / rec["hilal"]["timings"]["total_s"])
    t = table("search", data["records"])
    assert list(t["method"]) == ["hilal", "lionheart"] * 3 and list(t["seed"]) == [0, 0, 1, 1, "median", "median"]
    assert t.loc[0, "speedup"] == pytest.approx(rec["speedup"])
    assert t.loc[4, "speedup"] == pytest.approx(np.median([rec["speedup"], rec1["speedup"]]))
    assert t.loc[5, "total_s"] == pytest.approx(np.median([r["lionheart"]["timings"]["total_s"] for r in (rec, rec1)]))
    # the recheck scores each method's final mapping (a rerun maps the same) on fresh programmings
    from hilal.mapping import MappingConfig, recheck, run_mapping

    for method in ("hilal", "lionheart"):
        c = rec[method]["recheck"]
        assert c["reps"] == 3 and c["floor"] == pytest.approx(rec[method]["baseline_calib"] - 0.02, abs=1e-8)
        again = run_mapping(method, resnet8_digits, digits, MappingConfig(preset="pcm_harsh", seed=0, **mapping),
                            progress=False)
        assert again.analog_layers == rec[method]["analog_layers"]
        mine = recheck(again, digits, 3, seed=0)
        assert [mine[k] for k in ("calib_mean", "calib_se", "margin")] == pytest.approx(
            [c[k] for k in ("calib_mean", "calib_se", "margin")]) and mine["holds_floor"] == c["holds_floor"]
    assert list(t["floor_margin"][:2]) == pytest.approx([rec[m]["recheck"]["margin"] for m in ("hilal", "lionheart")])
    _check_criteria(data["records"], out, capsys)


def _pass_rate(check, test_reps):
    if check["calib_se"] == 0:
        return float(check["margin"] >= 0)
    return float(norm.cdf(check["margin"] / (check["calib_se"] * math.sqrt(check["reps"] / test_reps))))


def _check_criteria(recs, path, capsys):
    """search_criteria's counts and medians, recomputed seed by seed from the records; the command-line
    summary of the file prints the same row."""
    (row,) = search_criteria(recs).to_dict("records")
    sp = [r["speedup"] for r in recs]
    assert (row["model"], row["seeds"]) == ("resnet8", len(recs))
    assert [row["speedup"], row["speedup_min"], row["speedup_max"]] == pytest.approx([np.median(sp), min(sp), max(sp)])
    assert row["fast_seeds"] == sum(s >= TARGET_SPEEDUP for s in sp)
    met = {}
    for key, f in (("share", "analog_mac_share"), ("acc", "accuracy_mean")):
        h, lh = ([r[m][f] for r in recs] for m in ("hilal", "lionheart"))
        assert [row[f"{key}_hilal"], row[f"{key}_lionheart"]] == pytest.approx([np.median(h), np.median(lh)])
        met[key] = [a >= b for a, b in zip(h, lh, strict=True)]
        assert row[f"{key}_seeds"] == sum(met[key])
    all_three = zip(sp, met["share"], met["acc"], strict=True)
    assert row["all_seeds"] == sum(s >= TARGET_SPEEDUP and a and b for s, a, b in all_three)
    for m in ("hilal", "lionheart"):
        assert row[f"holds_{m}"] == sum(r[m]["recheck"]["holds_floor"] for r in recs)
        assert row[f"margin_{m}"] == pytest.approx(np.median([r[m]["recheck"]["margin"] for r in recs]))
        # the chance that a fresh acceptance test (config reps programmings) passes: Phi(margin / its sd)
        rates = [_pass_rate(r[m]["recheck"], r["config"]["reps"]) for r in recs]
        assert row[f"pass_{m}"] == pytest.approx(np.median(rates))
    with pytest.raises(HilalError, match="resnet8 mapping seed 0 appears twice"):
        search_criteria(recs + recs[:1])
    from hilal.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["bench", "search", "--criteria", str(path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| resnet8 "))
    assert line.split(" | ")[1:3] == [str(len(recs)), f"{row['speedup']:.3g}"]


def test_analog_bench_json(tmp_path, resnet8_digits):
    from hilal.analog import mappable_layers

    out = tmp_path / "analog.json"
    assert main(["analog", "--quick", "--models", "resnet8", "--threads", "1", "--device", "cpu", "--out",
                 str(out)]) == 0
    data = _load(out)
    assert data["machine"]["threads"] == 1 and data["config"]["models"] == ["resnet8"]
    assert data["config"]["device"] == data["machine"]["device"] == "cpu"
    (rec,) = data["records"]
    assert rec["model"] == "resnet8" and rec["layers"] == len(mappable_layers(resnet8_digits))
    assert min(rec["digital_s"], rec["analog_s"], rec["drift_eval_s"]) > 0
    assert rec["overhead"] == pytest.approx(rec["analog_s"] / rec["digital_s"])
    assert rec["drift_eval_overhead"] == pytest.approx(rec["drift_eval_s"] / rec["digital_eval_s"])
    for pre in ("", "cifar_"):  # both engines timed on the same programmings, with the same scores
        assert rec[f"{pre}eval_equal"] is True and rec[f"{pre}eval_reps"] == 4
        assert rec[f"{pre}eval_speedup"] == pytest.approx(rec[f"{pre}eval_loop_s"] / rec[f"{pre}eval_batched_s"])


def test_train_seed_reaches_the_benchmark_config(tmp_path, monkeypatch):
    """``--train-seed`` (both entry points) sets BenchConfig.seed, the data split and training of the
    checkpoint; left out, the default stays."""
    import hilal.bench.cli
    from hilal.cli import main as cli_main

    seen: list[dict] = []
    monkeypatch.setattr(hilal.bench.cli, "run_bench", lambda kind, **kw: seen.append({"kind": kind, **kw}))
    out = str(tmp_path / "s.json")
    assert main(["search", "--train-seed", "3", "--seeds", "0,2", "--out", out]) == 0
    assert cli_main(["bench", "search", "--train-seed", "1", "--out", out]) == 0
    assert cli_main(["bench", "hessian", "--out", out]) == 0
    assert [(s["kind"], s["seed"]) for s in seen] == [("search", 3), ("search", 1), ("hessian", None)]
    assert seen[0]["mapping_seeds"] == (0, 2)


def test_retraining_options_reach_the_search_benchmark(tmp_path, monkeypatch, capsys):
    """``--confirm``, ``--distill`` and ``--temperature`` (both entry points) become the benchmark's mapping
    overrides, the same for both methods; left at their defaults they add nothing, so the JSON config is as
    before. Bad values, or these options on another benchmark, stop before any work with exit code 2."""
    import hilal.bench.cli
    from hilal.cli import main as cli_main

    seen: list[dict] = []
    monkeypatch.setattr(hilal.bench.cli, "run_bench", lambda kind, **kw: seen.append({"kind": kind, **kw}))
    out = str(tmp_path / "s.json")
    assert main(["search", "--confirm", "--out", out]) == 0
    assert cli_main(["bench", "search", "--distill", "0.5", "--temperature", "2", "--confirm", "--out", out]) == 0
    assert cli_main(["bench", "search", "--out", out]) == 0
    assert seen[0]["mapping"] == {"confirm": True}
    assert seen[1]["mapping"] == {"confirm": True, "finetune": FinetuneConfig(distill=0.5, temperature=2.0)}
    assert seen[2]["mapping"] is None
    n = len(seen)
    assert script("search", ["--distill", "2", "--out", out]) == 2
    assert "distill must lie in [0, 1]" in capsys.readouterr().err
    assert cli_main(["bench", "search", "--distill", "0.5", "--temperature", "0", "--out", out]) == 2
    assert "temperature must be positive" in capsys.readouterr().err
    assert script("hessian", ["--confirm", "--out", out]) == 2
    assert "set how the search and frontier benchmarks retrain; got kind 'hessian'" in capsys.readouterr().err
    assert len(seen) == n
    quick = BenchConfig.quick(mapping={"confirm": True})
    assert quick.mapping == {**BenchConfig.quick().mapping, "confirm": True}


def test_bad_settings_name_the_problem():
    with pytest.raises(HilalError, match="kind"):
        run_bench("nope")
    with pytest.raises(HilalError, match="probez"):
        run_bench("hessian", probez=3)
    with pytest.raises(HilalError, match="device 'tpu'.*valid: 'cpu'"):
        run_bench("hessian", device="tpu")
    assert BenchConfig.quick(repeats=2).repeats == 2 and BenchConfig.quick().probes < BenchConfig().probes


def test_criteria_without_recheck_and_bad_files(tmp_path, capsys):
    """Ties meet a criterion (the same layers give the same share), a record without a recheck leaves the
    floor columns empty, and the summary refuses files that are not search results."""

    def rec(seed, speedup, share, acc):
        side = {"analog_mac_share": share, "accuracy_mean": acc}
        return {"model": "m", "mapping_seed": seed, "speedup": speedup, "hilal": side,
                "lionheart": {"analog_mac_share": 0.5, "accuracy_mean": 0.9}}

    records = [rec(0, 5.0, 0.5, 0.9), rec(1, 4.9, 0.6, 0.95), rec(2, 9.0, 0.4, 0.99)]
    (row,) = search_criteria(records).to_dict("records")
    assert (row["fast_seeds"], row["share_seeds"], row["acc_seeds"], row["all_seeds"]) == (2, 2, 3, 1)
    assert np.isnan(row["holds_hilal"]) and np.isnan(row["margin_lionheart"]) and np.isnan(row["pass_hilal"])
    with pytest.raises(HilalError, match="no search records"):
        search_criteria([])
    hess = tmp_path / "h.json"
    hess.write_text(json.dumps({"kind": "hessian", "records": []}))
    assert script("search", ["--criteria", str(hess)]) == 2
    assert "holds a 'hessian' benchmark; the criteria need 'search' files" in capsys.readouterr().err
    assert script("search", ["--criteria", str(tmp_path / "none.json")]) == 2
    assert "no benchmark file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert script("search", ["--criteria", str(tmp_path / "bad.json")]) == 2
    assert "is not a benchmark JSON file" in capsys.readouterr().err
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"kind": "search", "complete": False, "records": [rec(0, 6.0, 0.7, 0.96)]}))
    assert script("search", ["--criteria", str(partial)]) == 0
    assert "from an interrupted run: 1 record(s)" in capsys.readouterr().out
    assert script("hessian", ["--criteria", str(hess)]) == 2
    assert "--criteria summarizes search results" in capsys.readouterr().err
    from hilal.cli import main as cli_main

    assert cli_main(["bench", "search"]) == 2
    assert "needs --out F" in capsys.readouterr().err


def test_markdown_table():
    import pandas as pd

    from hilal.bench import markdown

    md = markdown(pd.DataFrame({"model": ["resnet8"], "speedup": [3.14159], "hvps": [48]})).splitlines()
    assert md == ["| model | speedup | hvps |", "|---|---|---|", "| resnet8 | 3.14 | 48 |"]


def test_warm_up_leaves_no_heavy_import_to_the_first_timed_method(tmp_path):
    """In a fresh interpreter, after warm_up() neither method imports torch._dynamo, PyHessian, scikit-learn or
    a module of this package while it runs (those imports would be timed as the first method's work)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hilal.bench import warm_up\n"
        "from hilal.data import load_dataset\n"
        "from hilal.mapping import MappingConfig, run_mapping\n"
        "from hilal.models import model_for\n"
        "from hilal.train import FinetuneConfig\n"
        "splits = load_dataset('digits', seed=0)\n"
        "model = model_for('resnet8', splits).eval()\n"
        "warm_up()\n"
        "before = set(sys.modules)\n"
        "cfg = MappingConfig(preset='pcm_harsh', reps=1, max_rounds=1, patience=1, finetune=FinetuneConfig(steps=1),\n"
        "                    hessian={'probes': 2, 'eli_samples': 2, 'first_order_samples': 2, 'power_iters': 2,\n"
        "                             'max_samples': 32})\n"
        "for method in ('hilal', 'lionheart'):\n"
        "    run_mapping(method, model, splits, cfg, progress=False)\n"
        "heavy = ('torch._dynamo', 'pyhessian', 'sklearn', 'hilal.')\n"
        "print(sorted(n for n in set(sys.modules) - before if n.startswith(heavy)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_warm_up_model_leaves_model_and_random_state_as_they_were():
    """The untimed per-model warm-up must not change what the timed mappings compute: the digital model's
    weights, gradient flags and mode, and torch's random state (the methods seed their own draws, but a
    draw made before seeding would otherwise shift)."""
    import torch

    from hilal.bench import warm_up_model
    from hilal.data import load_dataset
    from hilal.mapping import MappingConfig
    from hilal.models import model_for
    from hilal.train import FinetuneConfig

    splits = load_dataset("digits", seed=0)
    model = model_for("resnet8", splits).eval()
    cfg = MappingConfig(preset="pcm_harsh", hessian={"max_samples": 32, "probes": 2},
                        finetune=FinetuneConfig(distill=0.5))  # the bench's --distill: retraining needs a teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    warm_up_model(model, splits, cfg)
    assert torch.equal(torch.rand(3), expected)
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)




def test_frontier_table_flags_the_points_that_beat_lionheart():
    """Rows: the frontier's points, then LionHeart's mapping; a HILAL point beats LionHeart when it needs less
    energy at no larger accuracy drop (here only the second: the first drops more, the third needs more)."""
    from hilal.bench.tables import HARDWARE

    def point(kind, n, acc, energy):
        return {"kind": kind, "n_analog": n, "accuracy_mean": acc, "accuracy_drop": 0.9 - acc,
                **dict.fromkeys(HARDWARE, 1.0), "energy_uj": energy}

    rec = {"model": "m", "mapping_seed": 0,
           "frontier": [point("all-digital", 0, 0.9, 10.0), point("hilal", 2, 0.80, 5.0),
                        point("hilal", 3, 0.88, 6.0), point("hilal", 4, 0.89, 8.0), point("all-analog", 5, 0.5, 3.0)],
           "lionheart": {"analog_layers": ["a", "b"], "accuracy_mean": 0.87, "fp_accuracy": 0.9,
                         "hardware": {**dict.fromkeys(HARDWARE, 1.0), "energy_uj": 7.0}}}
    t = table("frontier", [rec])
    assert list(t["kind"]) == ["all-digital", "hilal", "hilal", "hilal", "all-analog", "lionheart"]
    assert list(t["beats_lionheart"]) == [False, False, True, False, False, False]
    assert t["accuracy_drop"].iloc[-1] == pytest.approx(0.03) and t["analog_layers"].iloc[-1] == 2
