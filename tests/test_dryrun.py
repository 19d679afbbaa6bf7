"""The dry run's synthetic files, read back by the kit's own loaders; its profile; the cost projection."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import yaml

from hilal import cost, cost_units, dryrun, synthetic
from hilal.paths import DRYRUN_MARKER
from hilal.registry import HilalError
from hilal.reproduce import list_notebooks

SMALL = {"cifar_train": 500, "cifar_test": 20, "squad_train": 30, "squad_dev": 8, "imagenet_classes": 3,
         "imagenet_train": 4, "imagenet_val": 2}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry") / "data"
    dryrun.prepare(root, SMALL, weights=False, progress=False)
    return root


def test_cifar10_pickles_are_python2_dicts_the_kit_reads_back(small_root):
    from hilal.data import load_dataset

    folder = small_root / "cifar-10-batches-py"
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "rb") as f:
            raw = pickle.load(f, encoding="bytes")  # as the real archive reads: Python 2 strings are bytes
        assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (len(raw[b"labels"]), 3072)
        assert len(raw[b"filenames"]) == len(raw[b"labels"]) and isinstance(raw[b"filenames"][0], bytes)
        batches.append(raw)
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")  # as torchvision reads: Python 2 strings are str
    assert meta["label_names"] == synthetic.CIFAR10_CLASSES
    splits = load_dataset("cifar10", root=small_root, download=False, augment=False)
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (400, 100, 20)
    assert splits.num_classes == 10 and splits.train[0][0].shape == (3, 32, 32)
    # the kit's test split is the test batch: labels, and pixels once the normalization is undone
    test = batches[-1]
    assert [int(splits.test[i][1]) for i in range(20)] == test[b"labels"]
    mean, std = (np.array(v, dtype=np.float32)[:, None, None] for v in (
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    x = splits.test[3][0].numpy() * std + mean
    np.testing.assert_allclose(x, test[b"data"][3].reshape(3, 32, 32) / 255.0, atol=1e-5)
    train_labels = np.concatenate([b[b"labels"] for b in batches[:5]])
    assert np.bincount(train_labels, minlength=10).tolist() == [50] * 10  # balanced, as the real set


def test_cifar100_has_fine_and_coarse_labels(small_root):
    from hilal.data import load_dataset

    with open(small_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert {b"fine_labels", b"coarse_labels", b"data", b"filenames", b"batch_label"} == set(raw)
    assert [c for c in raw[b"coarse_labels"]] == [f // 5 for f in raw[b"fine_labels"]]
    with open(small_root / "cifar-100-python" / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20
    splits = load_dataset("cifar100", root=small_root, download=False, augment=False)
    assert splits.num_classes == 100 and len(splits.test) == 20
    assert [int(splits.test[i][1]) for i in range(5)] == pickle.load(
        open(small_root / "cifar-100-python" / "test", "rb"), encoding="bytes")[b"fine_labels"][:5]


def test_imagenet_tree_holds_real_jpegs_the_kit_reads(small_root):
    from PIL import Image

    from hilal.data import load_dataset

    files = sorted((small_root / "imagenet" / "val").rglob("*.JPEG"))
    assert len(files) == 3 * 2
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    splits = load_dataset("imagenet", root=small_root)
    assert splits.num_classes == 3 and len(splits.test) == 6 and len(splits.train) + len(splits.calib) == 12
    assert splits.test[0][0].shape == (3, 224, 224)
    assert splits.test.classes == synthetic.WNIDS[:3]


def test_squad_json_and_tokenizer_folder_feed_the_kit_loader(small_root, monkeypatch):
    from hilal.data import load_dataset
    from hilal.qa import read_squad

    doc = json.loads((small_root / "squad" / "dev-v1.1.json").read_text())
    assert doc["version"] == "1.1" and {"title", "paragraphs"} <= set(doc["data"][0])
    for name, n, answers in (("train-v1.1.json", 30, 1), ("dev-v1.1.json", 8, 3)):
        examples = read_squad(small_root / "squad" / name)
        assert len(examples) == n and len({e["id"] for e in examples}) == n
        for e in examples:
            assert len(e["answers"]["text"]) == answers
            for text, start in zip(e["answers"]["text"], e["answers"]["answer_start"], strict=True):
                assert e["context"][start:start + len(text)] == text
    monkeypatch.setenv("HILAL_DATA_DIR", str(small_root))  # where load_tokenizer finds models/mobilebert-uncased
    monkeypatch.setenv("HILAL_OFFLINE", "1")
    splits = load_dataset("squad", root=small_root)
    assert len(splits.meta["tokenizer"]) == synthetic.MOBILEBERT_VOCAB
    assert splits.train.tensors["input_ids"].shape[1] == 384
    # the first context is long: its questions span several overlapping windows
    assert np.bincount(splits.test.example_index).max() > 1
    # every window labelled with an answer points at the answer's characters
    ds = splits.train
    for i in range(len(ds)):
        s, t = int(ds.tensors["start_positions"][i]), int(ds.tensors["end_positions"][i])
        if s == 0:
            continue
        ex = ds.examples[int(ds.example_index[i])]
        assert ex["context"][ds.offsets[i, s, 0]:ds.offsets[i, t, 1]] == ex["answers"]["text"][0]


def test_prepare_is_idempotent_and_stays_out_of_real_data(tmp_path):
    root = tmp_path / "d"
    tiny = {**SMALL, "cifar_train": 10, "cifar_test": 10}
    first = dryrun.prepare(root, tiny, datasets=["cifar10"], progress=False)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    stamp = path.stat().st_mtime_ns
    assert dryrun.prepare(root, tiny, datasets=["cifar10"], progress=False) == first
    assert path.stat().st_mtime_ns == stamp
    path.write_bytes(path.read_bytes()[:100])  # a truncated file is written again, identically
    dryrun.prepare(root, tiny, datasets=["cifar10"], progress=False)
    assert path.stat().st_size == first["files"]["cifar-10-batches-py/data_batch_2"]
    with pytest.raises(HilalError, match="counts"):
        dryrun.prepare(root, {**tiny, "cifar_test": 20}, datasets=["cifar10"], progress=False)
    real = tmp_path / "real"
    (real / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(HilalError, match=DRYRUN_MARKER):
        dryrun.prepare(real, tiny, progress=False)
    with pytest.raises(HilalError, match="valid choices: paper, cpu"):
        dryrun.prepare(tmp_path / "x", "huge")
    with pytest.raises(HilalError, match="valid choices: cifar10, cifar100, imagenet, squad"):
        dryrun.prepare(tmp_path / "x", tiny, datasets=["mnist"])


def test_dryrun_profile_keeps_the_paper_choices_and_cuts_every_count():
    from hilal.reproduce import load_profile, plan

    paper, dry = plan("paper"), plan("dryrun")
    assert list(paper) == list(dry)
    choices = {"MODEL", "MODELS", "DATASET", "DATASETS", "METHODS", "PRESET", "PRESETS", "VIT_MODEL", "VIT_DATASET",
               "QA_MODEL", "QA_DATASET", "SEARCH", "ORDER", "CLUSTER", "STAGES", "T_EVAL", "T_INFERENCE"}
    for nb, (_, p) in paper.items():
        d = dry[nb][1]
        for k in choices & set(p):
            assert d[k] == p[k], (nb, k)
        for k in ("EPOCHS", "VIT_EPOCHS", "QA_EPOCHS", "REPS", "PATIENCE", "MAX_ROUNDS", "PROBES", "POWER_ITERS",
                  "ELI_SAMPLES", "FIRST_ORDER_SAMPLES", "SENS_REPS", "DRIFT_REPS"):
            if k in p and p[k] == 0:  # 0 epochs: pretrained weights as loaded, in both
                assert d[k] == 0, (nb, k)
            elif k in p:
                assert 1 <= d[k] <= 2 and (d[k] < p[k] or p[k] == 1), (nb, k)
        if "HESSIAN" in p:
            batch = p["HESSIAN"].get("batch_size", 256)
            assert d["HESSIAN"].get("batch_size", 256) == batch  # the paper's curvature batches, two of them
            assert d["HESSIAN"]["max_samples"] == 2 * batch < p["HESSIAN"]["max_samples"]
    assert load_profile("dryrun")["dryrun"] is True and load_profile("paper")["dryrun"] is False
    assert load_profile("smoke")["dryrun"] is False


def test_dryrun_profile_refuses_real_data_before_running(tmp_path, monkeypatch):
    from hilal.reproduce import load_profile, reproduce

    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path / "real"))
    with pytest.raises(HilalError, match="prepare"):
        reproduce("dryrun", only="00", out_dir=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dryrun": "yes", "common": {}}))
    with pytest.raises(HilalError, match="'dryrun' must be true or false"):
        load_profile(bad)


def test_projection_is_unit_costs_times_counts():
    rng = np.random.default_rng(0)
    units = pd.DataFrame([{"model": m, "dataset": d, **{c: float(rng.uniform(0.001, 2)) for c in cost.UNIT_COLUMNS}}
                          for m, d in (("a", "cifar10"), ("b", "squad"))])
    counts = pd.DataFrame([{"notebook": nb, "model": m, "dataset": d, "what": "x",
                            **{c: float(rng.integers(0, 1000)) for c in cost.COUNT_COLUMNS}}
                           for nb, m, d in (("00", "a", "cifar10"), ("00", "a", "cifar10"), ("08", "b", "squad"))])
    proj = cost.project(counts, units)
    for r in proj.itertuples():
        u = units[(units.model == r.model) & (units.dataset == r.dataset)].iloc[0]
        brute = (r.steps * u.step_s + r.ft_steps * u.ft_step_s + r.passes * r.pass_samples * u.hvp_sample_s
                 + r.evaluations * u.program_s + r.eval_samples * u.eval_sample_s)
        assert r.seconds == pytest.approx(brute, rel=1e-12)
    table = cost.cost_table(proj)
    assert table["hours"].iloc[-1] == pytest.approx(proj["seconds"].sum() / 3600)
    a = table[(table.notebook == "00") & (table.model == "a")].iloc[0]
    assert a["steps"] == counts["steps"].iloc[:2].sum()
    assert not table["incomplete"].any()
    units.loc[1, "hvp_sample_s"] = float("nan")  # a unit that failed: its rows are unknown, the rest still count
    counts.loc[2, "passes"] = 0
    assert cost.project(counts, units)["seconds"].notna().all()
    counts.loc[2, "passes"] = 3
    gap = cost.cost_table(cost.project(counts, units))
    assert pd.isna(gap[(gap.notebook == "08") & (gap.model == "b")]["hours"].iloc[0])
    assert gap["incomplete"].iloc[-1] and gap["hours"].iloc[-1] == pytest.approx(proj["seconds"][:2].sum() / 3600)
    test_size = cost.SPLIT_SIZES["cifar10"]["test"]
    assert a["eval_s"] == pytest.approx(units.program_s[0] + units.eval_sample_s[0] * test_size)


def test_paper_counts_follow_the_profile():
    p = yaml.safe_load(open(cost.Path(cost.__file__).parent.parent / "notebooks/profiles/paper.yaml"))
    counts = cost.profile_counts("paper", layers=lambda m, d: 7)
    per_epoch = 45_000 // 64
    train = counts[counts["what"] == "train"]
    assert not train.duplicated(["model", "dataset"]).any()  # a checkpoint trains once
    assert set(zip(train.model, train.dataset, strict=True)) >= {
        (m, d) for m in p["notebooks"]["01"]["MODELS"] for d in p["notebooks"]["01"]["DATASETS"]}
    vgg = train.set_index(["model", "dataset"]).loc[("vgg16", "cifar100"), "steps"]
    assert vgg == p["common"]["EPOCHS"] * per_epoch
    lion = counts[(counts.notebook == "05") & (counts.what == "map lionheart")].iloc[0]
    assert lion.ft_steps == 7 * p["common"]["MAX_ROUNDS"] * per_epoch  # FINETUNE_STEPS -1: a pass a round
    vit = counts[(counts.notebook == "08") & (counts.what == "map lionheart") & (counts.model == "vit_b16")].iloc[0]
    assert vit.ft_steps == 7 * p["notebooks"]["08"]["MAX_ROUNDS"] * p["notebooks"]["08"]["FINETUNE_STEPS"]
    drift = counts[(counts.notebook == "00") & (counts.what == "drift")].iloc[0]
    assert drift.evaluations == len(p["notebooks"]["00"]["PRESETS"]) * 5 * p["notebooks"]["00"]["REPS"]  # 5 TIMES
    curv = counts[(counts.notebook == "03") & (counts.what == "curvature")].iloc[0]
    h = p["common"]["HESSIAN"]
    assert (curv.passes, curv.pass_samples) == (h["probes"] + h["power_iters"] + h["eli_samples"], h["max_samples"])
    # 04 and 06 reuse 03's and 05's mappings
    assert set(counts.notebook) == {"00", "01", "02", "03", "05", "07", "08", "10", "12", "13"}
    p13 = p["notebooks"]["13"]
    ablations = cost.notebook_parameters("paper")["13"]["ABLATIONS"]
    paper_runs = counts[(counts.notebook == "13") & (counts.what == "map hilal-paper")]
    assert len(paper_runs) == len(p13["MODELS"]) * len(ablations) + 1  # one more: the guard's comparison


def test_cut_qa_split_scores_as_the_kit_does(small_root, monkeypatch):
    import torch

    from hilal.data import load_dataset
    from hilal.models import model_for
    from hilal.train import evaluate

    monkeypatch.setenv("HILAL_DATA_DIR", str(small_root))
    monkeypatch.setenv("HILAL_OFFLINE", "1")
    splits = load_dataset("squad", root=small_root)
    torch.manual_seed(0)
    model = model_for("mobilebert_tiny", splits).eval()
    whole = cost_units._head(splits, "test", len(splits.test))
    assert evaluate(model, whole, "test") == evaluate(model, splits, "test")
    part = cost_units._head(splits, "test", 3)
    assert len(part.test) == 3 and len(part.test.examples) == len(set(splits.test.example_index[:3].tolist()))


@pytest.mark.paper
def test_dry_run_end_to_end(tmp_path, monkeypatch):
    """Every notebook of the dryrun profile on CPU-sized synthetic data, then the cost table (hours on 2 CPU cores)."""
    for name in ("HILAL_DATA_DIR", "HILAL_OFFLINE"):  # the dry run sets them; restored afterwards
        monkeypatch.setenv(name, "unset")
    out = tmp_path / "cost.json"
    dryrun.main(["--size", "cpu", "--root", str(tmp_path / "data"), "--out", str(out), "--threads", "1"])
    rep = json.loads(out.read_text())
    assert [r["notebook"] for r in rep["dryrun"]] == list(list_notebooks())
    assert [r["status"] for r in rep["dryrun"]] == ["ok"] * len(rep["dryrun"])
    units = pd.DataFrame(rep["units"])
    assert (units["error"] == "").all()
    counts = pd.DataFrame(rep["counts"])
    proj = cost.project(counts, units)
    table = pd.DataFrame(rep["table"])
    body = table[~table["model"].isin(["all", ""])]
    assert body["hours"].sum() == pytest.approx(proj["seconds"].sum() / 3600, rel=1e-9)
    assert rep["total_hours"] == pytest.approx(proj["seconds"].sum() / 3600, rel=1e-9)
    for nb, g in body.groupby("notebook"):
        row = table[(table.notebook == nb) & (table.model == "all")]
        assert row["hours"].iloc[0] == pytest.approx(g["hours"].sum())
    assert set(body["notebook"]) == {"00", "01", "02", "03", "05", "07", "08", "10", "12", "13"}


def test_latest_runs_keep_each_notebooks_last_row(tmp_path):
    for run, rows in (("dryrun-20260101-000000", [("00", "ok", ""), ("08", "failed", "OOM")]),
                      ("dryrun-20260102-000000", [("08", "ok", "")])):
        (tmp_path / "runs" / run).mkdir(parents=True)
        pd.DataFrame([{"notebook": nb, "name": f"{nb}_x", "status": st, "seconds": 1.0, "output": "o", "error": err}
                      for nb, st, err in rows]).to_csv(tmp_path / "runs" / run / "reproduce.csv", index=False)
    runs = cost.latest_runs(tmp_path)
    assert runs["notebook"].tolist() == ["00", "08"]  # read as text: "00" stays "00"
    assert runs["status"].tolist() == ["ok", "ok"] and runs["run"].tolist()[1] == "dryrun-20260102-000000"
    assert cost.latest_runs(tmp_path / "none").empty


def test_paper_counts_of_the_energy_frontier():
    """Notebook 10: LionHeart once per layer, one curvature pass, and POINTS + 1 sets (the frontier's and
    all-analog) retrained for at most MAX_ROUNDS passes each and judged on REPS programmings."""
    p = yaml.safe_load(open(cost.Path(cost.__file__).parent.parent / "notebooks/profiles/paper.yaml"))
    counts = cost.profile_counts("paper", layers=lambda m, d: 7).set_index(["notebook", "what"])
    per_epoch, rounds, reps = 45_000 // 64, p["common"]["MAX_ROUNDS"], p["common"]["REPS"]
    sets = p["notebooks"]["10"]["POINTS"] + 1
    assert counts.loc[("10", "map lionheart"), "ft_steps"] == 7 * rounds * per_epoch
    assert counts.loc[("10", "frontier: retraining"), "ft_steps"] == sets * rounds * per_epoch
    assert counts.loc[("10", "frontier: in-loop"), "evaluations"] == sets * rounds * reps
    assert counts.loc[("10", "frontier: judged"), "eval_samples"] == sets * reps * 10_000
    h = p["common"]["HESSIAN"]
    assert counts.loc[("10", "frontier: curvature"), "passes"] == h["probes"] + h["power_iters"] + h["eli_samples"]
