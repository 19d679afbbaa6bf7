"""Nothing is lost and nothing untrusted runs: a mapping killed (SIGKILL) at random points resumes to the result
of an uninterrupted run; damaged journals and caches are named, set aside and recomputed; concurrent writers
keep each other's entries; Ctrl-C is one line; results with non-finite numbers are refused."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hilal.cli import main
from hilal.paths import (
    PROVENANCE,
    atomic_json_dump,
    clean_stale_tmp,
    file_digest,
    read_cached,
    read_provenance,
    write_cached,
    write_provenance,
)
from hilal.registry import HilalError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet8", "--dataset", "digits", "--reps", "2", "--max-rounds", "1", "--patience", "1", "--quiet"]


# --- SIGKILL at random points, then resume ----------------------------------------------------------------------

def _env() -> dict[str, str]:
    # this process's torch threads, so that the reference run in this process computes as the killed ones do
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "HILAL_OFFLINE": "1"}


def _cmd(method: str, checkpoint: Path, out: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "hilal.cli", "map", "--method", method, *TINY, "--checkpoint", str(checkpoint),
            "--workdir", str(workdir), "--out", str(out)]


def _steps(workdir: Path) -> int:
    try:
        return sum(len(json.loads(j.read_text())["steps"]) for j in workdir.glob("*/journal.json"))
    except (OSError, ValueError, KeyError):
        return 0  # (being replaced at this instant)


def _comparable(path: Path) -> dict:
    """The result without what an interruption may change: wall-clock timings, and per step its seconds and
    whether it was replayed."""
    d = json.loads(path.read_text())
    d.pop("timings")
    for row in d["history"]:
        row.pop("seconds"), row.pop("replayed")
    return d


def _map_args(method: str, checkpoint: Path, out: Path, workdir: Path) -> list[str]:
    return ["map", "--method", method, *TINY, "--checkpoint", str(checkpoint), "--workdir", str(workdir),
            "--out", str(out)]


def _kill_and_resume(method: str, tmp: Path, checkpoint: Path, kills: int, seed: int,
                     reference: tuple[Path, Path] | None = None) -> None:
    """Run ``method`` uninterrupted (or take ``reference``: its result and journal folder), then again in a
    fresh journal, killed with SIGKILL ``kills`` times at random points (once a random number of steps is
    journaled, plus up to 0.4 s: mid-retraining, mid-save or mid-rename), and resumed: the result must be the
    uninterrupted one."""
    rng = random.Random(seed)
    if reference is None:
        reference = tmp / f"{method}-ref.json", tmp / f"{method}-refwork"
        assert main(_map_args(method, checkpoint, *reference)) == 0
    ref, out, work = reference[0], tmp / f"{method}.json", tmp / f"{method}-work"
    targets = sorted(rng.sample(range(1, _steps(reference[1])), kills))
    cmd = [sys.executable, "-m", "hilal.cli", *_map_args(method, checkpoint, out, work)]
    for target in targets:
        p = subprocess.Popen(cmd, env=_env(), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while _steps(work) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not out.exists(), "a killed run must not leave a result"
    subprocess.run(cmd, env=_env(), check=True, timeout=600, stderr=subprocess.DEVNULL)
    assert _comparable(out) == _comparable(ref)
    history = json.loads(out.read_text())["history"]
    assert sum(r["replayed"] for r in history) >= targets[-1] - 1  # the finished steps were replayed, not redone


@pytest.fixture(scope="module")
def checkpoint(resnet8_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "resnet8.pt"
    torch.save(resnet8_digits.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def lionheart(checkpoint, tmp_path_factory):
    """An uninterrupted LionHeart mapping (in this process): its result file and its journal folder."""
    tmp = tmp_path_factory.mktemp("lionheart")
    out, work = tmp / "result.json", tmp / "work"
    assert main(_map_args("lionheart", checkpoint, out, work)) == 0
    return out, work


def test_a_mapping_killed_once_resumes_to_the_uninterrupted_result(tmp_path, checkpoint, lionheart):
    _kill_and_resume("lionheart", tmp_path, checkpoint, kills=1, seed=1, reference=lionheart)


@pytest.mark.slow
def test_a_hilal_mapping_killed_three_times_resumes_to_the_uninterrupted_result(tmp_path, checkpoint):
    """HILAL's steps (metrics, screens, stages), killed at three points; LionHeart's above."""
    _kill_and_resume("hilal", tmp_path, checkpoint, kills=3, seed=7)


# --- a damaged journal or cache is named, set aside and recomputed -----------------------------------------------

def test_a_deleted_weights_file_of_the_journal_is_recomputed_not_trusted(tmp_path, checkpoint, lionheart, capsys):
    """The probe of the issue: with a kept candidate's weights deleted, a resumed LionHeart run used untrained
    weights while its history claimed the rounds. Now that step and the later ones are recomputed."""
    shutil.copytree(lionheart[1], tmp_path / "work")
    first = json.loads(lionheart[0].read_text())
    journal = next((tmp_path / "work").glob("*/journal.json"))
    kept = [r["step"] for r in first["history"] if r["kept"]]
    assert len(kept) >= 2
    gone = journal.parent / f"{kept[-1]}.pt"
    gone.unlink()
    assert main(_map_args("lionheart", checkpoint, tmp_path / "again.json", tmp_path / "work")) == 0
    assert f"{gone} is missing; recomputing step {kept[-1]!r} and the later ones" in capsys.readouterr().err
    again = json.loads((tmp_path / "again.json").read_text())
    replayed = {r["step"]: r["replayed"] for r in again["history"]}
    assert replayed[kept[0]] and not replayed[kept[-1]]
    assert _comparable(tmp_path / "again.json") == _comparable(lionheart[0])


def test_the_journal_sets_aside_damaged_weights_and_a_damaged_index(tmp_path, capsys):
    from hilal.mapping.config import MappingConfig
    from hilal.mapping.journal import Journal

    model = torch.nn.Linear(2, 2)
    j = Journal(str(tmp_path), "lionheart", MappingConfig(), "tag")
    for k in ("a", "b", "c"):
        j.put(k, {"kept": True}, model)
    pt = j.dir / "b.pt"
    pt.write_bytes(pt.read_bytes()[:-8] + b"01234567")  # same size, other bytes
    j = Journal(str(tmp_path), "lionheart", MappingConfig(), "tag")
    assert j.get("a") == {"kept": True} and j.get("b") is None and j.get("c") is None  # b and what followed it
    assert "b.pt does not match the size and checksum its journal recorded; set aside" in capsys.readouterr().err
    assert list(j.steps) == ["a"] and list(j.dir.glob("b.pt.corrupt-*"))
    index = j.dir / "journal.json"
    index.write_text(index.read_text()[:30])
    j = Journal(str(tmp_path), "lionheart", MappingConfig(), "tag")
    assert j.steps == {} and f"{index} is damaged" in capsys.readouterr().err


def test_a_truncated_cached_checkpoint_is_set_aside_and_retrained(tmp_path, monkeypatch, digits, capsys):
    from hilal.train import TrainConfig, checkpoint_path, trained_model

    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path))
    cfg = TrainConfig(epochs=1)
    first = trained_model("resnet8", digits, cfg=cfg, progress=False)
    path = checkpoint_path("resnet8", digits, 0, cfg)
    path.write_bytes(path.read_bytes()[:1000])
    again = trained_model("resnet8", digits, cfg=cfg, progress=False)
    assert "is damaged or not a training checkpoint; set aside" in capsys.readouterr().err
    assert len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                   strict=True))
    trained_model("resnet8", digits, cfg=cfg, progress=False)  # and the rewritten entry is used again
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["json", "weights", "size", "missing"])
def test_a_damaged_cache_entry_is_set_aside(tmp_path, damage, capsys):
    path = tmp_path / "entry.json"
    write_cached({"rows": [1, 2]}, path, {"w": torch.arange(4.0)})
    entry, weights = read_cached(path)
    assert entry == {"rows": [1, 2]} and torch.equal(weights["w"], torch.arange(4.0))
    pt = path.with_suffix(".pt")
    if damage == "json":
        path.write_text(path.read_text()[:20])
    elif damage == "weights":
        raw = bytearray(pt.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # one byte flipped, same size
        pt.write_bytes(bytes(raw))
    elif damage == "size":
        pt.write_bytes(pt.read_bytes()[:-4])
    else:
        pt.unlink()
    assert read_cached(path) is None
    assert "set aside" in capsys.readouterr().err or damage == "missing"


def test_journal_weights_load_weights_only(tmp_path):
    """A journal weights file that names Python code is refused, and the code does not run."""
    from hilal.mapping.config import MappingConfig
    from hilal.mapping.journal import Journal

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w')",))

    j = Journal(str(tmp_path), "lionheart", MappingConfig(), "tag")
    j.put("step", {"kept": True}, torch.nn.Linear(1, 1))
    torch.save({"p:w": Evil()}, j.dir / "step.pt")
    j.files["step"] = file_digest(j.dir / "step.pt")  # who can write the folder can rewrite the index too
    assert j.get("step") == {"kept": True}
    with pytest.raises(HilalError, match="refused by the weights-only loader"):
        j.load_model("step", torch.nn.Linear(1, 1))
    assert not (tmp_path / "pwned").exists()


# --- untrusted CIFAR files --------------------------------------------------------------------------------------

def test_the_cifar_opt_out_is_what_stands_between_a_crafted_batch_and_its_code(tmp_path, monkeypatch):
    """Checked, a crafted batch is refused unread; with the opt-out the same file is unpickled and its code runs:
    the check, not luck, kept it out."""
    from hilal.cifar import published_md5, read_cifar

    assert published_md5("cifar10")["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert published_md5("cifar100")["meta"] == "7973b15100ade9c7d40fb424638fde48"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w')",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(HilalError, match="was not unpickled"):
        read_cifar("cifar10", tmp_path)
    assert not marker.exists()
    monkeypatch.setenv("HILAL_CIFAR_VERIFY", "0")
    with pytest.raises(HilalError):
        read_cifar("cifar10", tmp_path)
    assert marker.exists()


# --- the command's own behaviour -------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_saying_how_to_resume_and_debug_shows_the_traceback(tmp_path, checkpoint, monkeypatch,
                                                                               capsys):
    import hilal.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hilal.api, "allocate", interrupted)
    args = ["map", "--method", "lionheart", *TINY, "--checkpoint", str(checkpoint), "--workdir", str(tmp_path / "w"),
            "--out", str(tmp_path / "r.json")]
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"hilal map: interrupted; run the same command again to resume from the journal in {tmp_path / 'w'}"
    with pytest.raises(HilalError, match="--reps must be"):
        main(["map", "--method", "lionheart", *TINY, "--reps", "0", "--out", str(tmp_path / "r.json"), "--debug"])


def test_a_result_with_a_non_finite_score_is_refused_not_written(tmp_path, checkpoint, monkeypatch, capsys):
    import hilal.api
    from hilal.mapping import MappingResult

    nan = MappingResult("lionheart", [], 0.0, float("nan"), 0.0, 0.98, 86400.0, 2,
                        {"search_s": 0.0, "mapping_s": 0.0, "total_s": 0.0}, extra={"n_layers": 10})
    monkeypatch.setattr(hilal.api, "allocate", lambda *a, **k: nan)
    out = tmp_path / "r.json"
    assert main(["map", "--method", "lionheart", *TINY, "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "non-finite number at accuracy_mean; nothing was written" in capsys.readouterr().err
    assert not out.exists()


def test_atomic_writes_clean_up_after_killed_writers_and_write_nothing_on_failure(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".r.json.{int(dead.stdout)}.0123456789ab.tmp"
    mine = tmp_path / f".r.json.{os.getpid()}.0123456789ab.tmp"  # a live writer's: kept
    young = tmp_path / f".other.json.{int(dead.stdout)}.0123456789ab.tmp"  # maybe a live writer on another machine
    for f in (stale, mine, young):
        f.write_text("half")
    os.utime(stale, (time.time() - 3600,) * 2)
    os.utime(mine, (time.time() - 3600,) * 2)
    atomic_json_dump({"a": 1}, tmp_path / "r.json")
    assert not stale.exists() and mine.exists() and young.exists() and clean_stale_tmp(tmp_path) == []
    with pytest.raises(TypeError):
        atomic_json_dump({"a": object()}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", mine.name, young.name])


# --- two processes sharing the figures folder and the checkpoint cache --------------------------------------------

def _writer(figures: str, data: str, tag: str, n: int, barrier) -> None:
    os.environ["HILAL_DATA_DIR"] = data
    import hilal.train as train
    from hilal.data import load_dataset
    from hilal.train import TrainConfig, trained_model

    real = train.train_digital

    def counted(*a, **k):  # leaves a mark for each process that trains
        (Path(data) / f"trained-{tag}").write_text("")
        return real(*a, **k)

    train.train_digital = counted
    barrier.wait()
    for i in range(n):
        write_provenance(f"{tag}{i:03d}", {"i": i, "pad": "x" * 200}, figures)
    model = trained_model("resnet8", load_dataset("digits"), cfg=TrainConfig(epochs=1), progress=False)
    torch.save(model.state_dict(), Path(data) / f"{tag}.pt")


def test_two_processes_share_the_figures_and_the_checkpoint_cache(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "fig"), str(tmp_path / "data"), tag, 150, barrier))
             for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = read_provenance(tmp_path / "fig")
    assert len(entries) == 300 and json.loads((tmp_path / "fig" / PROVENANCE).read_text())["notebooks"] == entries
    a, b = (torch.load(tmp_path / "data" / f"{t}.pt", weights_only=True) for t in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "data").glob("trained-*"))) == 1  # one trained, the other waited and loaded it
    assert len(list((tmp_path / "data" / "checkpoints").glob("*.pt"))) == 1
    assert not list((tmp_path / "data").rglob("*.tmp")) and not list((tmp_path / "fig").rglob("*.tmp"))
