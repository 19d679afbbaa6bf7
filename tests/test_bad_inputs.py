"""Bad input, tried as a careful user would: every case must end in a clear error (exit status 2 and one line
``hilal CMD: error: ...`` naming the problem, or a one-line HilalError from the API), never a traceback, never a
silent success, and never a partial or lost output file. ``python tests/test_bad_inputs.py`` runs the cases
and prints the README's table (cases tried, clear errors, tracebacks, silent failures, data lost)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from hilal.cli import main
from hilal.registry import HilalError

SENTINEL = "previous result: must survive a failed run\n"
PWNED = "pwned"  # the file a crafted pickle would create by running code


class _Evil:
    """A pickle that runs code when loaded (creates ``PWNED`` in the folder it names)."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __reduce__(self):
        return (exec, (f"open({os.path.join(self.folder, PWNED)!r}, 'w').write('ran')",))


@dataclass
class Case:
    """One probe: ``argv`` (``{t}`` becomes the case's folder) for the command, or ``call`` for the API;
    ``setup`` writes its files; ``env`` its environment; ``needle`` a piece of the expected message."""

    id: str
    needle: str
    argv: list[str] = field(default_factory=list)
    call: Callable[[Path], object] | None = None
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


M = ["map", "--method", "lionheart", "--model", "resnet8", "--dataset", "digits", "--quiet"]
A = ["analyze", "--model", "resnet8", "--dataset", "digits", "--quiet"]
OUT = ["--out", "{t}/result.json"]
NO_VERIFY = {"HILAL_CIFAR_VERIFY": "0"}


def _map(*extra: str, out: list[str] = OUT) -> list[str]:
    return [*M, *extra, *out]


# --- files the cases write -------------------------------------------------------------------------------------

def _save(obj, name: str) -> Callable[[Path], None]:
    def setup(t: Path) -> None:
        torch.save(obj(t) if callable(obj) else obj, t / name)
    return setup


def _truncated_checkpoint(t: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(16, 1, 3, 3)}, t / "ck.pt")
    data = (t / "ck.pt").read_bytes()
    (t / "ck.pt").write_bytes(data[: len(data) // 2])


def _text(name: str, text: str) -> Callable[[Path], None]:
    def setup(t: Path) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_text(text)
    return setup


def _fifo(t: Path) -> None:
    (t / "result.json").unlink()
    os.mkfifo(t / "result.json")


def _symlink(t: Path) -> None:
    (t / "result.json").unlink()
    (t / "elsewhere.json").write_text(SENTINEL)
    os.symlink(t / "elsewhere.json", t / "result.json")


def _cifar10(t: Path, change: Callable[[dict], object] | None = None, truncate: bool = False) -> None:
    """A CIFAR-10 folder in the official layout (Python 2 pickles, bytes keys), ``change`` applied to batch 1."""
    folder = t / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        obj = change(batch) if change and name == "data_batch_1" else batch
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    if truncate:
        p = folder / "data_batch_2"
        p.write_bytes(p.read_bytes()[:100])


def _squad(doc) -> Callable[[Path], None]:
    def setup(t: Path) -> None:
        (t / "data" / "squad").mkdir(parents=True)
        for name in ("train-v1.1.json", "dev-v1.1.json"):
            text = doc if isinstance(doc, str) else json.dumps(doc)
            (t / "data" / "squad" / name).write_text(text)
    return setup


_QA = {"id": "q1", "question": "Who?", "answers": [{"text": "me", "answer_start": 0}]}
_SQUAD_NO_ANSWERS = {"data": [{"title": "t", "paragraphs": [{"context": "me", "qas": [
    {k: v for k, v in _QA.items() if k != "answers"}]}]}]}


def _other_architecture(t: Path) -> None:
    from hilal.models import build_model

    torch.save(build_model("resnet20", in_channels=1, image_size=8).state_dict(), t / "ck.pt")


def _nan_checkpoint(t: Path) -> None:
    from hilal.models import build_model

    sd = build_model("resnet8", in_channels=1, image_size=8).state_dict()
    sd["conv1.weight"] = torch.full_like(sd["conv1.weight"], float("nan"))
    torch.save(sd, t / "ck.pt")


def _api(fn: Callable[[], object]) -> Callable[[Path], object]:
    return lambda t: fn()


def _mapping(**kw):
    from hilal.mapping import MappingConfig

    return MappingConfig(**kw)


def _hessian(**kw):
    from hilal.hessian import HessianConfig

    return HessianConfig(**kw)


def _allocate(t: Path, **kw):
    import hilal
    from hilal.models import build_model

    return hilal.allocate(build_model("resnet8", in_channels=1, image_size=8), "digits", progress=False, **kw)


def _atomic_fifo(t: Path):
    from hilal.paths import atomic_json_dump

    os.mkfifo(t / "f")
    return atomic_json_dump({"a": 1}, t / "f")


CK = ["--checkpoint", "{t}/ck.pt"]
CASES = [
    # names
    Case("unknown method", "unknown method 'greedy'", ["map", "--method", "greedy", *M[3:], *OUT]),
    Case("unknown model", "unknown model 'resnet99'", [*M[:3], "--model", "resnet99", *M[5:], *OUT]),
    Case("unknown dataset", "unknown dataset 'mnist'", [*M[:5], "--dataset", "mnist", "--quiet", *OUT]),
    Case("unknown preset", "unknown preset 'rram'", _map("--preset", "rram")),
    Case("unknown search", "unknown --search 'linear'", _map("--search", "linear")),
    Case("unknown cluster", "unknown --cluster 'dbscan'", _map("--cluster", "dbscan")),
    Case("unknown ablation", "unknown --ablation 'all'", _map("--ablation", "all")),
    Case("analyze: unknown cluster", "unknown clustering method", [*A, "--cluster", "dbscan", *OUT]),
    Case("analyze: unknown noise space", "invalid choice: 'both'", [*A, "--noise", "both", *OUT]),
    # numbers
    Case("--epochs -1", "--epochs must be a whole number >= 1", _map("--epochs", "-1")),
    Case("--epochs 0", "--epochs must be a whole number >= 1", _map("--epochs", "0")),
    Case("--max-rounds 0", "--max-rounds must be a whole number >= 1", _map("--max-rounds", "0")),
    Case("--max-rounds -3", "--max-rounds must be", _map("--max-rounds", "-3")),
    Case("--reps 0", "--reps must be a whole number >= 1", _map("--reps", "0")),
    Case("--reps -1", "--reps must be", _map("--reps", "-1")),
    Case("--reps abc", "argument --reps: invalid int value", _map("--reps", "abc")),
    Case("--patience 0", "--patience must be", _map("--patience", "0")),
    Case("--stages 0", "--stages must be", _map("--stages", "0")),
    Case("--t-eval -5", "--t-eval must be a finite number > 0", _map("--t-eval", "-5")),
    Case("--t-eval 0", "--t-eval must be a finite number > 0", _map("--t-eval", "0")),
    Case("--t-eval nan", "--t-eval must be a finite number", _map("--t-eval", "nan")),
    Case("--t-eval inf", "--t-eval must be a finite number", _map("--t-eval", "inf")),
    Case("--drop-threshold -0.1", "--drop-threshold must be a finite number >= 0 and <= 1",
         _map("--drop-threshold", "-0.1")),
    Case("--drop-threshold 1.5", "--drop-threshold must be", _map("--drop-threshold", "1.5")),
    Case("--drop-threshold nan", "--drop-threshold must be", _map("--drop-threshold", "nan")),
    Case("--recheck 1", "--recheck must be a whole number >= 2 or 0", _map("--recheck", "1")),
    Case("--recheck -2", "--recheck must be", _map("--recheck", "-2")),
    Case("--distill 1.5", "distill must lie in [0, 1]", _map("--distill", "1.5")),
    Case("--temperature 0", "temperature must be positive", _map("--temperature", "0")),
    Case("--seed -1", "--seed must be a whole number >= 0", _map("--seed", "-1")),
    Case("analyze --samples 0", "--samples must be a whole number >= 1", [*A, "--samples", "0", *OUT]),
    Case("analyze --probes 0", "--probes must be a whole number >= 1", [*A, "--probes", "0", *OUT]),
    Case("analyze --t-eval -5", "--t-eval must be", [*A, "--t-eval", "-5", *OUT]),
    # the output file
    Case("--out a directory", "is a directory, not a regular file", _map(out=["--out", "{t}"])),
    Case("--out ending in a slash", "names a folder", _map(out=["--out", "{t}/new/"])),
    Case("--out under a file", "is not a folder", _map(out=["--out", "{t}/plain.txt/result.json"]),
         setup=_text("plain.txt", "x")),
    Case("--out a FIFO", "is a FIFO, not a regular file", _map(), setup=_fifo),
    Case("--out a symbolic link", "is a symbolic link", _map(), setup=_symlink),
    Case("analyze --out a directory", "is a directory", [*A, "--out", "{t}"]),
    Case("--workdir a file", "--workdir", _map("--workdir", "{t}/plain.txt"), setup=_text("plain.txt", "x")),
    # checkpoints
    Case("--checkpoint missing", "--checkpoint", _map(*CK)),
    Case("--checkpoint a directory", "is a directory", _map("--checkpoint", "{t}")),
    Case("--checkpoint a text file", "not a readable weights file", _map(*CK), setup=_text("ck.pt", "hello\n")),
    Case("--checkpoint runs code", "refused by the weights-only loader", _map(*CK),
         setup=_save(lambda t: {"model": _Evil(t)}, "ck.pt")),
    Case("--checkpoint truncated", "not a readable weights file", _map(*CK), setup=_truncated_checkpoint),
    Case("--checkpoint with NaN weights", "non-finite weights", _map(*CK), setup=_nan_checkpoint),
    Case("--checkpoint of another architecture", "does not fit this ResNetCIFAR", _map(*CK),
         setup=_other_architecture),
    Case("--checkpoint without tensors", "holds no state_dict", _map(*CK), setup=_save({"model": {"a": 1}}, "ck.pt")),
    Case("analyze --checkpoint runs code", "refused", [*A, *CK, *OUT], setup=_save(lambda t: [_Evil(t)], "ck.pt")),
    # datasets
    Case("CIFAR-10 missing", "cifar-10-batches-py", [*M[:5], "--dataset", "cifar10", *OUT]),
    Case("CIFAR-10 batch that runs code", "was not unpickled", [*M[:5], "--dataset", "cifar10", *OUT],
         setup=lambda t: _cifar10(t, lambda d: _Evil(t))),
    Case("CIFAR-10 batch edited", "is not the published sum", [*M[:5], "--dataset", "cifar10", *OUT],
         setup=_cifar10),
    Case("CIFAR-10 arrays of the wrong shape (opt-out)", "'data' must be an N x 3072 uint8 array",
         [*M[:5], "--dataset", "cifar10", *OUT], env=NO_VERIFY,
         setup=lambda t: _cifar10(t, lambda d: {**d, b"data": d[b"data"][:, :3000]})),
    Case("CIFAR-10 labels out of range (opt-out)", "expected 0..9", [*M[:5], "--dataset", "cifar10", *OUT],
         setup=lambda t: _cifar10(t, lambda d: {**d, b"labels": [12] * 10}),
         env=NO_VERIFY),
    Case("CIFAR-10 truncated batch (opt-out)", "not a readable CIFAR pickle", [*M[:5], "--dataset", "cifar10", *OUT],
         setup=lambda t: _cifar10(t, truncate=True), env=NO_VERIFY),
    Case("SQuAD without 'data'", "no 'data' field", [*M[:3], "--model", "mobilebert_tiny", "--dataset", "squad", *OUT],
         setup=_squad({"version": "1.1"})),
    Case("SQuAD without 'answers'", "no 'answers' field",
         [*M[:3], "--model", "mobilebert_tiny", "--dataset", "squad", *OUT], setup=_squad(_SQUAD_NO_ANSWERS)),
    Case("SQuAD not JSON", "not a SQuAD v1.1 JSON file",
         [*M[:3], "--model", "mobilebert_tiny", "--dataset", "squad", *OUT], setup=_squad("{\"data\": [")),
    # reproduce
    Case("reproduce: unknown profile", "unknown profile 'fast'", ["reproduce", "--profile", "fast"]),
    Case("reproduce: unparsable profile", "is not valid YAML at line", ["reproduce", "--profile", "{t}/p.yaml"],
         setup=_text("p.yaml", "common:\n  a: [1, 2\n")),
    Case("reproduce: unknown profile section", "unknown section(s) ['extra']",
         ["reproduce", "--profile", "{t}/p.yaml"], setup=_text("p.yaml", "common: {}\nextra: 1\n")),
    Case("reproduce: missing profile file", "does not exist", ["reproduce", "--profile", "{t}/none.yaml"]),
    Case("reproduce: 'notebooks' a list", "'notebooks' must be a mapping", ["reproduce", "--profile", "{t}/p.yaml"],
         setup=_text("p.yaml", "notebooks: [1, 2]\n")),
    Case("reproduce: 'common' a list", "'common' must be a mapping", ["reproduce", "--profile", "{t}/p.yaml"],
         setup=_text("p.yaml", "common: [1]\n")),
    Case("reproduce: a notebook section a list", "notebook '05' must be a mapping",
         ["reproduce", "--profile", "{t}/p.yaml"], setup=_text("p.yaml", "notebooks: {'05': [1]}\n")),
    Case("reproduce: 'timeout_s' not a number", "'timeout_s' (seconds per cell) must be a whole number",
         ["reproduce", "--profile", "{t}/p.yaml"], setup=_text("p.yaml", "timeout_s: abc\n")),
    Case("reproduce: profile a list", "must be a mapping with 'common' and 'notebooks'",
         ["reproduce", "--profile", "{t}/p.yaml"], setup=_text("p.yaml", "- a\n")),
    Case("reproduce --only 99", "unknown notebook '99'", ["reproduce", "--only", "99", "--out-dir", "{t}/runs"]),
    Case("reproduce --threads 0", "--threads must be a whole number >= 1", ["reproduce", "--threads", "0"]),
    Case("reproduce --out-dir a file", "--out-dir", ["reproduce", "--out-dir", "{t}/plain.txt"],
         setup=_text("plain.txt", "x")),
    # bench
    Case("bench: unknown kind", "unknown benchmark 'memory'", ["bench", "memory", *OUT]),
    Case("bench --repeats 0", "--repeats must be a whole number >= 1", ["bench", "analog", "--repeats", "0", *OUT]),
    Case("bench --models nope", "unknown model 'nope'", ["bench", "hessian", "--models", "nope", *OUT]),
    Case("bench --seeds 0,a", "--seeds must be comma-separated whole numbers", ["bench", "search", "--seeds", "0,a",
                                                                               *OUT]),
    Case("bench --seeds -1", "--seeds must be whole numbers >= 0", ["bench", "search", "--seeds", "-1", *OUT]),
    Case("bench --seeds 1,1", "lists a number twice", ["bench", "search", "--seeds", "1,1", *OUT]),
    Case("bench --threads 0", "--threads must be", ["bench", "analog", "--threads", "0", *OUT]),
    Case("bench --probes 0", "--probes must be", ["bench", "hessian", "--probes", "0", *OUT]),
    Case("bench --train-seed -1", "--train-seed must be", ["bench", "hessian", "--train-seed", "-1", *OUT]),
    Case("bench --device tpu", "unknown device 'tpu'", ["bench", "analog", "--device", "tpu", *OUT]),
    Case("bench without --out", "needs --out F", ["bench", "analog"]),
    Case("bench --out a directory", "is a directory", ["bench", "analog", "--out", "{t}"]),
    Case("bench --criteria missing", "--criteria", ["bench", "search", "--criteria", "{t}/none.json"]),
    Case("bench analog --confirm", "set how the search and frontier benchmarks retrain",
         ["bench", "analog", "--confirm", *OUT]),
    Case("map --objective power", "unknown objective 'power'", [*M, "--objective", "power", *OUT]),
    Case("map --max-tiles 0", "max_tiles must be", [*M, "--max-tiles", "0", *OUT]),
    Case("reproduce --workers 0", "--workers must be a whole number >= 1", ["reproduce", "--workers", "0"]),
    Case("sweep: missing grid", "sweep grid", ["sweep", "{t}/none.yaml"]),
    Case("sweep --workers 0", "--workers must be",
         ["sweep", str(Path(__file__).parents[1] / "sweeps" / "smoke.yaml"), "--workers", "0"]),
    Case("API MappingConfig(layers=[])", "layers must be None or a non-empty list",
         call=_api(lambda: _mapping(layers=[]))),
    Case("API MappingConfig(engine='gpu')", "unknown engine 'gpu'", call=_api(lambda: _mapping(engine="gpu"))),
    # the public API
    Case("API MappingConfig(recovery_prior=2)", "recovery_prior must be a finite number >= 0 and <= 1",
         call=_api(lambda: _mapping(recovery_prior=2.0))),
    Case("API MappingConfig(near_miss=-1)", "near_miss must be", call=_api(lambda: _mapping(near_miss=-1.0))),
    Case("API MappingConfig(scan=-1)", "scan must be a whole number >= 0", call=_api(lambda: _mapping(scan=-1))),
    Case("API MappingConfig(min_gain=2)", "min_gain must be", call=_api(lambda: _mapping(min_gain=2.0))),
    Case("API MappingConfig(gamma=0)", "gamma must be", call=_api(lambda: _mapping(gamma=0.0))),
    Case("API MappingConfig(final_reps=0)", "final_reps must be", call=_api(lambda: _mapping(final_reps=0))),
    Case("API MappingConfig(order='mac')", "unknown order 'mac'", call=_api(lambda: _mapping(order="mac"))),
    Case("API MappingConfig(cost='hessian')", "unknown cost 'hessian'", call=_api(lambda: _mapping(cost="hessian"))),
    Case("API MappingConfig(hessian={'probe': 4})", "unknown HessianConfig setting(s) ['probe']",
         call=_api(lambda: _mapping(hessian={"probe": 4}))),
    Case("API MappingConfig(t_eval=nan)", "t_eval must be a finite number > 0",
         call=_api(lambda: _mapping(t_eval=float("nan")))),
    Case("API allocate(reps=0)", "reps must be a whole number >= 1", call=lambda t: _allocate(t, reps=0)),
    Case("API allocate(max_rounds=0)", "max_rounds must be", call=lambda t: _allocate(t, max_rounds=0)),
    Case("API allocate(finetune={'steps': 0})", "steps must be a whole number >= 1 or -1",
         call=lambda t: _allocate(t, finetune={"steps": 0})),
    Case("API HessianConfig(probes=0)", "probes must be a whole number >= 1", call=_api(lambda: _hessian(probes=0))),
    Case("API HessianConfig(t_inference=-1)", "t_inference must be", call=_api(lambda: _hessian(t_inference=-1.0))),
    Case("API HessianConfig(mode='block')", "unknown mode 'block'", call=_api(lambda: _hessian(mode="block"))),
    Case("API TrainConfig(epochs=-1)", "epochs must be a whole number >= 0",
         call=_api(lambda: __import__("hilal.train", fromlist=["x"]).TrainConfig(epochs=-1))),
    Case("API TrainConfig(lr=0)", "lr must be a finite number > 0",
         call=_api(lambda: __import__("hilal.train", fromlist=["x"]).TrainConfig(lr=0.0))),
    Case("API BenchConfig(repeats=0)", "repeats must be a whole number >= 1",
         call=_api(lambda: __import__("hilal.bench", fromlist=["x"]).BenchConfig(repeats=0))),
    Case("API run_bench(models=('nope',))", "unknown model 'nope'",
         call=lambda t: __import__("hilal.bench", fromlist=["x"]).run_bench("analog", t / "b.json", models=("nope",))),
    Case("API atomic write onto a FIFO", "is a FIFO, not a regular file", call=_atomic_fifo),
]


def _fill(x: str, t: Path) -> str:
    return x.replace("{t}", str(t))


def run_case(case: Case, t: Path) -> tuple[str, str]:
    """Run one case in folder ``t``; returns its outcome (``clear error``, ``traceback``, ``silent failure``,
    ``data lost``) and what it printed on stderr (or the exception)."""
    (t / "result.json").write_text(SENTINEL)  # a result of an earlier run, which a failed run must leave alone
    if case.setup is not None:
        case.setup(t)
    env = {"HILAL_DATA_DIR": str(t / "data"), **{k: _fill(v, t) for k, v in case.env.items()}}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    err = io.StringIO()
    try:
        if case.call is not None:
            try:
                case.call(t)
                return "silent failure", "no error"
            except HilalError as e:
                msg, ok = str(e), True
            except Exception as e:  # noqa: BLE001  (any other exception is a traceback for the user)
                return "traceback", f"{type(e).__name__}: {e}"
        else:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = main([_fill(a, t) for a in case.argv])
                except SystemExit as e:
                    rc = e.code
                except BaseException as e:  # noqa: BLE001
                    return "traceback", f"{type(e).__name__}: {e}"
            msg = err.getvalue().strip()
            ok = rc == 2 and "error:" in msg and "\n" not in msg and "Traceback" not in msg
            if rc == 0:
                return "silent failure", msg
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = t / "result.json"
    if (t / PWNED).exists():
        return "code ran", msg
    if (out.is_file() and not out.is_symlink() and out.read_text() != SENTINEL) or (
            (t / "elsewhere.json").exists() and (t / "elsewhere.json").read_text() != SENTINEL):
        return "data lost", msg
    return ("clear error" if ok and case.needle in msg else "unclear error"), msg


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clear_one_line_error(case, tmp_path):
    outcome, msg = run_case(case, tmp_path)
    assert outcome == "clear error", f"{outcome}: {msg}"
    assert case.needle in msg and "\n" not in msg.strip()


def test_the_case_table_is_large_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def table(cases: list[Case] = CASES) -> str:
    """The README's row: cases tried and their outcomes."""
    import tempfile

    counts = {"clear error": 0, "traceback": 0, "silent failure": 0, "data lost": 0, "other": 0}
    for c in cases:
        with tempfile.TemporaryDirectory() as d:
            outcome, msg = run_case(c, Path(d))
        counts[outcome if outcome in counts else "other"] += 1
        if outcome != "clear error":
            print(f"{c.id}: {outcome}: {msg}", file=sys.stderr)
    head = "| cases tried | clear errors | tracebacks | silent failures | data lost | other (unclear, code ran) |"
    return (f"{head}\n|---|---|---|---|---|---|\n| {len(cases)} | {counts['clear error']} | {counts['traceback']} | "
            f"{counts['silent failure']} | {counts['data lost']} | {counts['other']} |")


if __name__ == "__main__":
    os.environ.setdefault("HILAL_OFFLINE", "1")
    print(table())
