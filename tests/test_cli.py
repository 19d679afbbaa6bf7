"""The ``hilal`` command: JSON contract and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hilal.cli import main

RESULT_FIELDS = {"method", "analog_layers", "analog_mac_share", "accuracy_mean", "accuracy_std", "fp_accuracy",
                 "t_eval", "reps", "timings"}


def test_map_all_digital_and_all_analog(tmp_path, resnet8_digits):
    out_d, out_a = tmp_path / "d.json", tmp_path / "a.json"
    common = ["--model", "resnet8", "--dataset", "digits", "--preset", "pcm_harsh", "--quiet", "--reps", "3",
              "--t-eval", str(365 * 86400)]
    assert main(["map", "--method", "all-digital", *common, "--out", str(out_d)]) == 0
    assert main(["map", "--method", "all-analog", *common, "--recheck", "3", "--out", str(out_a)]) == 0
    d, a = json.loads(out_d.read_text()), json.loads(out_a.read_text())
    assert RESULT_FIELDS <= set(d) and RESULT_FIELDS <= set(a)
    assert "recheck" not in d and a["recheck"]["reps"] == 3 and a["recheck"]["floor"] == pytest.approx(a["floor"])
    assert a["recheck"]["margin"] == pytest.approx(a["recheck"]["calib_mean"] - a["floor"])
    assert not a["recheck"]["holds_floor"] and a["recheck"]["calib_mean"] < a["baseline_calib"] - 0.1
    assert d["analog_mac_share"] == 0 and a["analog_mac_share"] == pytest.approx(1.0)
    assert {"search_s", "mapping_s", "total_s"} <= set(d["timings"])
    assert a["accuracy_mean"] < d["accuracy_mean"] - 0.1  # the harsh preset bites
    assert 0 <= a["accuracy_mean"] <= 1 and 0 <= d["fp_accuracy"] <= 1


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet99", "--dataset", "digits"], "unknown model 'resnet99'; valid choices: "),
    (["--model", "resnet8", "--dataset", "mnist"], "unknown dataset 'mnist'; valid choices: "),
    (["--model", "resnet8", "--dataset", "digits", "--preset", "rram"], "unknown preset 'rram'"),
    (["--model", "resnet8", "--dataset", "cifar10"], "cifar-10-batches-py"),
    (["--model", "resnet8", "--dataset", "digits", "--recheck", "1"], "--recheck must be a whole number >= 2 or 0"),
    (["--model", "resnet8", "--dataset", "digits", "--distill", "1.5"], "distill must lie in [0, 1]"),
    (["--model", "resnet8", "--dataset", "digits", "--temperature", "0"], "temperature must be positive"),
])
def test_errors_name_the_problem(tmp_path, capsys, args, needle, monkeypatch):
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path))
    rc = main(["map", "--method", "all-digital", *args, "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_unknown_method_exit_code():
    r = subprocess.run([sys.executable, "-m", "hilal.cli", "map", "--method", "greedy", "--model", "resnet8",
                        "--dataset", "digits", "--out", "/dev/null"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown method 'greedy'" in r.stderr and "lionheart" in r.stderr


def test_map_reports_exact_match_and_f1_for_question_answering(tmp_path, capsys):
    out_d, out_a = tmp_path / "d.json", tmp_path / "a.json"
    common = ["--model", "mobilebert_tiny", "--dataset", "squad_sample", "--epochs", "3", "--reps", "2", "--quiet"]
    assert main(["map", "--method", "all-digital", *common, "--out", str(out_d)]) == 0
    assert main(["map", "--method", "all-analog", *common, "--out", str(out_a)]) == 0
    printed = capsys.readouterr().out
    assert "EM " in printed and "F1 " in printed
    d, a = json.loads(out_d.read_text()), json.loads(out_a.read_text())
    for r in (d, a):
        assert RESULT_FIELDS | {"em_mean", "em_std", "f1_mean", "f1_std", "fp_em", "fp_f1"} <= set(r)
        assert r["f1_mean"] == pytest.approx(r["accuracy_mean"])  # the search's score is the F1
        assert 0 <= r["em_mean"] <= r["f1_mean"] <= 1 and r["fp_em"] <= r["fp_f1"] == pytest.approx(r["fp_accuracy"])
    assert d["em_mean"] == pytest.approx(d["fp_em"]) and d["em_std"] == 0  # nothing analog, nothing noisy
    assert a["analog_mac_share"] == pytest.approx(1.0) and a["em_std"] + a["f1_std"] > 0


def test_map_defaults_are_the_package_defaults():
    from hilal.cli import build_parser, mapping_config
    from hilal.mapping import SEARCHES, MappingConfig

    args = build_parser().parse_args(["map", "--method", "hilal", "--model", "resnet8", "--dataset", "digits",
                                      "--out", "x.json"])
    cfg = MappingConfig()
    assert args.search == cfg.search in SEARCHES
    assert (args.reps, args.drop_threshold, args.patience, args.max_rounds, args.stages, args.cluster) == (
        cfg.reps, cfg.drop_threshold, cfg.patience, cfg.max_rounds, cfg.stages, cfg.cluster)
    assert mapping_config(args) == cfg
    distilled = mapping_config(build_parser().parse_args(
        ["map", "--method", "hilal", "--model", "resnet8", "--dataset", "digits", "--out", "x.json",
         "--distill", "0.5", "--temperature", "2", "--confirm"]))
    assert (distilled.finetune.distill, distilled.finetune.temperature, distilled.confirm) == (0.5, 2.0, True)
    assert distilled.finetune.steps == cfg.finetune.steps and distilled.reps == cfg.reps


def test_reproduce_threads_reach_the_runner_and_bad_ones_are_refused(capsys):
    from hilal.cli import build_parser

    assert build_parser().parse_args(["reproduce", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["reproduce"]).threads is None  # OMP_NUM_THREADS, else 1
    assert main(["reproduce", "--only", "00", "--threads", "0"]) == 2
    assert "--threads must be a whole number >= 1" in capsys.readouterr().err


def test_map_objective_and_tile_budget(tmp_path, capsys, resnet8_digits):
    """``--objective`` and ``--max-tiles`` reach the mapping (invalid ones fail before any work), and the record
    and the printed line carry the hardware cost; all-analog cannot keep a budget and says so."""
    for bad, needle in ((["--objective", "power"], "unknown objective 'power'"), (["--max-tiles", "0"], "max_tiles")):
        assert main(["map", "--method", "all-digital", "--model", "resnet8", "--dataset", "digits", *bad,
                     "--out", str(tmp_path / "x.json")]) == 2
        assert needle in capsys.readouterr().err
    out = tmp_path / "a.json"
    assert main(["map", "--method", "all-analog", "--model", "resnet8", "--dataset", "digits", "--quiet", "--reps",
                 "2", "--objective", "energy", "--max-tiles", "4", "--out", str(out)]) == 0
    a = json.loads(out.read_text())
    assert a["objective"] == "energy" and a["hardware"]["max_tiles"] == 4
    assert a["hardware"]["budget"] == "not honoured" and a["hardware"]["analog_tiles"] > 4
    assert f"{a['hardware']['analog_tiles']} analog tiles of 64, not honoured budget of 4" in capsys.readouterr().out
