"""What the paper profile costs on this machine: unit costs measured at the paper's shapes, times the counts
of training steps, curvature passes and noisy evaluations that the profile implies.

Unit costs, per model and dataset (:func:`measure_units`; medians of ``repeats`` timings in one process):

- ``step_s``: one digital training step at the dataset's batch size (:func:`hilal.train.train_digital`);
- ``ft_step_s``: one noise-injection fine-tuning step with every mappable layer analog
  (:func:`hilal.train.finetune_round`, batch 64), an upper bound for a partly analog model;
- ``hvp_sample_s``: one Hessian-vector product over all layers per calibration sample
  (:meth:`hilal.hessian.HessianOperator.hvp` on a few samples); a curvature pass over ``max_samples`` samples
  costs ``max_samples * hvp_sample_s``;
- ``program_s`` and ``eval_sample_s``: programming and drifting every tile once, and the forward pass per
  sample of the programmed all-analog model (:func:`hilal.evaluate.program_repetition`,
  :func:`hilal.train.evaluate`); a noisy evaluation of n samples costs ``program_s + n * eval_sample_s``.

Counts (:func:`profile_counts`) come from the profile's parameters and each notebook's declared defaults, with
the real datasets' split sizes (:data:`SPLIT_SIZES`). The projection (:func:`project`) of a row is

    seconds = steps * step_s + ft_steps * ft_step_s + passes * pass_samples * hvp_sample_s
              + evaluations * program_s + eval_samples * eval_sample_s

summed over rows for a notebook and for the profile. Mapping searches are data-dependent, so their counts are
upper bounds: every retraining stage runs ``MAX_ROUNDS`` rounds, LionHeart and random orders one stage per
mappable layer, the paper variant one per layer of its robust cluster (bounded by all layers), HILAL's
knapsack :data:`HILAL_STAGES` stages with about log2(layers) zero-shot screens each; curvature counts
``probes + power_iters + eli_samples`` HVP passes (power iterations may stop early, and exact Gauss-Newton
traces replace HVPs where the network allows). Clean (digital) evaluations are left out: a few forward
passes next to hundreds of training epochs.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hilal.cost_units import UNIT_COLUMNS, measure_all, measure_units  # noqa: F401 - measured there, projected here
from hilal.registry import HilalError, is_count

SPLIT_SIZES: dict[str, dict[str, int]] = {
    # torchvision's CIFAR: 50,000 training images less the 5,000-image calibration hold-out; 10,000 test
    "cifar10": {"train": 45_000, "calib": 5_000, "test": 10_000},
    "cifar100": {"train": 45_000, "calib": 5_000, "test": 10_000},
    # SQuAD v1.1 under BERT's uncased WordPiece at 384 tokens, stride 128: 88,524 training and 10,784 dev windows
    # (Hugging Face's run_qa); the calibration split holds out 2 % of the training paragraphs
    "squad": {"train": 86_754, "calib": 1_770, "test": 10_784},
    # ImageNet-1k (ILSVRC 2012): 1,281,167 training images less the 10,000-image calibration hold-out; the
    # 50,000 validation images are the test split
    "imagenet": {"train": 1_271_167, "calib": 10_000, "test": 50_000},
}
"""Windows (samples) per split of the paper's datasets, by dataset name."""

HILAL_STAGES = 3
"""Retraining stages HILAL's knapsack search is counted with (its docstring: typically one to three)."""

COUNT_COLUMNS = ("steps", "ft_steps", "passes", "pass_samples", "evaluations", "eval_samples")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench" / "results" / "dryrun_cpu.json"


def notebook_parameters(profile: str | Path = "paper") -> dict[str, dict[str, Any]]:
    """Notebook number -> every parameter it runs with under ``profile``: its declared defaults, overridden by
    the profile's ``common`` and per-notebook values."""
    from hilal.reproduce import plan

    out = {}
    for key, (path, params) in plan(profile).items():
        from hilal.reproduce import declared_parameters

        defaults = {}
        for name, info in declared_parameters(path).items():
            try:
                defaults[name] = ast.literal_eval(info["default"])
            except (ValueError, SyntaxError):
                defaults[name] = info["default"]
        out[key] = {**defaults, **params}
    return out


def _steps_per_pass(dataset: str, batch: int) -> int:
    return SPLIT_SIZES[dataset]["train"] // batch  # drop_last, as train_digital and finetune_round load


def _batch(dataset: str) -> int:
    return 32 if dataset == "squad" else 64  # hilal.qa's AdamW recipe; TrainConfig's default


def _row(notebook: str, model: str, dataset: str, what: str, **counts: float) -> dict[str, Any]:
    return {"notebook": notebook, "model": model, "dataset": dataset, "what": what,
            **{c: float(counts.get(c, 0)) for c in COUNT_COLUMNS}}


def _curvature(nb: str, model: str, dataset: str, probes: int, iters: int, eli: int, samples: int,
               what: str) -> dict[str, Any]:
    return _row(nb, model, dataset, what, passes=probes + iters + eli, pass_samples=samples)


def _evals(nb: str, model: str, dataset: str, n: int, split: str, what: str) -> dict[str, Any]:
    return _row(nb, model, dataset, what, evaluations=n, eval_samples=n * SPLIT_SIZES[dataset][split])


def mapping_counts(nb: str, method: str, model: str, dataset: str, layers: int, p: Mapping[str, Any]
                   ) -> list[dict[str, Any]]:
    """Upper-bound counts of one mapping (module docstring) under notebook parameters ``p``."""
    from hilal.mapping import MAPPING_HESSIAN

    reps, rounds = int(p["REPS"]), int(p["MAX_ROUNDS"])
    steps = int(p["FINETUNE_STEPS"]) if int(p["FINETUNE_STEPS"]) > 0 else _steps_per_pass(dataset, 64)
    stages = {"lionheart": layers, "random": layers, "hilal-paper": layers, "all-analog-ft": 1,
              "hilal": HILAL_STAGES}.get(method, 0)
    log = math.ceil(math.log2(layers + 1))  # a bisection's screens over a frontier or order of about ``layers``
    screens = {"hilal": HILAL_STAGES * log, "hilal-zeroshot": 2 * log, "max-norm": log}.get(method, 0)
    final = 2 if method == "hilal-paper" else 1  # the paper variant adds an evaluation without drift
    rows = [_row(nb, model, dataset, f"map {method}", ft_steps=stages * rounds * steps),
            _evals(nb, model, dataset, (stages * rounds + screens) * reps, "calib", f"map {method}: in-loop"),
            _evals(nb, model, dataset, final * reps if method != "all-digital" else 0, "test",
                   f"map {method}: final")]
    if method in ("hilal", "hilal-zeroshot"):
        h = {**MAPPING_HESSIAN, **dict(p.get("HESSIAN") or {})}
        rows.append(_curvature(nb, model, dataset, h["probes"], h["power_iters"], h["eli_samples"],
                               min(h["max_samples"], SPLIT_SIZES[dataset]["calib"]), f"map {method}: curvature"))
    return rows


def profile_counts(profile: str | Path = "paper", layers: Callable[[str, str], int] | None = None) -> pd.DataFrame:
    """One row per (notebook, model, dataset, part) with the counts of :data:`COUNT_COLUMNS` that ``profile``
    implies (module docstring). ``layers(model, dataset)`` gives the mappable layers (default: built)."""
    layers = layers or mappable_count
    prm = notebook_parameters(profile)
    rows: list[dict[str, Any]] = []
    trained: set[tuple[str, str, int, int]] = set()

    def train(nb: str, model: str, dataset: str, epochs: int) -> None:
        key = (model, dataset, int(epochs), _batch(dataset) if nb == "08" else 64)
        if key not in trained:  # a checkpoint trains once and is reused by every later notebook
            trained.add(key)
            rows.append(_row(nb, model, dataset, "train", steps=epochs * _steps_per_pass(dataset, key[3])))

    for nb, p in prm.items():
        if nb == "01":
            for d in p["DATASETS"]:
                for m in p["MODELS"]:
                    train(nb, m, d, p["EPOCHS"])
        elif nb in ("00", "02"):
            for m in ([p["MODEL"]] if nb == "00" else p["MODELS"]):
                train(nb, m, p["DATASET"], p["EPOCHS"])
                rows.append(_evals(nb, m, p["DATASET"], len(p["PRESETS"]) * len(p["TIMES"]) * p["REPS"], "test",
                                   "drift"))
        elif nb in ("03", "04"):
            m, d = p["MODEL"], p["DATASET"]
            train(nb, m, d, p["EPOCHS"])
            if nb == "03" or not p["REUSE"]:
                rows.append(_curvature(nb, m, d, p["PROBES"], p["POWER_ITERS"], p["ELI_SAMPLES"],
                                       min(p["MAX_SAMPLES"], SPLIT_SIZES[d]["calib"]), "curvature"))
            if nb == "03":
                rows.append(_evals(nb, m, d, layers(m, d) * p["SENS_REPS"], "calib", "single-layer sensitivity"))
                for vm in p["VALIDITY_MODELS"]:  # section 5: every model and preset but the one above
                    train(nb, vm, d, p["EPOCHS"])
                    for preset in p["VALIDITY_PRESETS"]:
                        if (vm, preset) != (m, p["PRESET"]):
                            n = min(p["MAX_SAMPLES"], SPLIT_SIZES[d]["calib"])
                            rows.append(_curvature(nb, vm, d, p["PROBES"], p["POWER_ITERS"], p["ELI_SAMPLES"], n,
                                                   "validity: curvature"))
                            rows.append(_evals(nb, vm, d, layers(vm, d) * p["VALIDITY_REPS"], "calib",
                                               "validity: single-layer sensitivity"))
                wm = p["WHY_MODEL"]  # section 6: weight noise only, and without each source of WHY_REMOVED
                train(nb, wm, d, p["EPOCHS"])
                reused = wm == m and p["WHY_REPS"] == p["SENS_REPS"]  # the preset itself is sections 1-2's
                for _ in range(len(p["WHY_REMOVED"]) + (1 if reused else 2)):
                    rows.append(_curvature(nb, wm, d, p["PROBES"], p["POWER_ITERS"], p["ELI_SAMPLES"],
                                           min(p["MAX_SAMPLES"], SPLIT_SIZES[d]["calib"]), "why: curvature"))
                    rows.append(_evals(nb, wm, d, layers(wm, d) * p["WHY_REPS"], "calib",
                                       "why: single-layer sensitivity"))
        elif nb in ("05", "06", "07"):
            m, d = p["MODEL"], p["DATASET"]
            train(nb, m, d, p["EPOCHS"])
            if nb == "05" or not p["REUSE"]:
                for method in p["METHODS"]:
                    rows += mapping_counts(nb, method, m, d, layers(m, d), p)
            if nb == "05" and p["RECHECK_REPS"]:
                rows.append(_evals(nb, m, d, len(p["METHODS"]) * p["RECHECK_REPS"], "calib", "recheck"))
            if nb == "07":
                rows.append(_evals(nb, m, d, len(p["METHODS"]) * len(p["TIMES"]) * p["DRIFT_REPS"], "test",
                                   "drift"))
        elif nb == "10":  # LionHeart, one curvature pass, and POINTS + 1 sets each retrained once and judged
            m, d = p["MODEL"], p["DATASET"]
            train(nb, m, d, p["EPOCHS"])
            rows += mapping_counts(nb, "lionheart", m, d, layers(m, d), p)
            from hilal.mapping import MAPPING_HESSIAN

            h = {**MAPPING_HESSIAN, **dict(p["HESSIAN"] or {})}
            rows.append(_curvature(nb, m, d, h["probes"], h["power_iters"], h["eli_samples"],
                                   min(h["max_samples"], SPLIT_SIZES[d]["calib"]), "frontier: curvature"))
            sets, rounds = int(p["POINTS"]) + 1, int(p["MAX_ROUNDS"]) if p["RETRAIN"] else 0
            steps = int(p["FINETUNE_STEPS"]) if int(p["FINETUNE_STEPS"]) > 0 else _steps_per_pass(d, 64)
            rows += [_row(nb, m, d, "frontier: retraining", ft_steps=sets * rounds * steps),
                     _evals(nb, m, d, sets * rounds * int(p["REPS"]), "calib", "frontier: in-loop"),
                     _evals(nb, m, d, sets * int(p["REPS"]), "test", "frontier: judged")]
        elif nb == "12":  # every source alone and removed, all-analog; per layer at one time; the ELI comparison
            d, n = p["DATASET"], len(p["TIMES"])
            for i, m in enumerate(p["MODELS"]):
                train(nb, m, d, p["EPOCHS"])
                rows.append(_evals(nb, m, d, 16 * n * p["REPS"], p["SPLIT"], "attribution: all-analog"))
                if i == 0:
                    if p["PER_LAYER"]:
                        rows.append(_evals(nb, m, d, 8 * layers(m, d) * p["LAYER_REPS"], p["SPLIT"],
                                           "attribution: per layer"))
                    rows.append(_curvature(nb, m, d, 0, 0, 2 * len(p["CAPTURE_SOURCES"]) * p["ELI_SAMPLES"],
                                           min(p["MAX_SAMPLES"], SPLIT_SIZES[d]["calib"]), "attribution: ELI"))
        elif nb == "13":  # per model: all-digital, all-analog and hilal-paper once per ablation (and COMPARE)
            for i, m in enumerate(p["MODELS"]):
                train(nb, m, p["DATASET"], p["EPOCHS"])
                runs = len(p["ABLATIONS"]) + int(bool(p["COMPARE"]) and i == 0 and bool(p["ABLATIONS"]))
                for method in ["all-digital", "all-analog"] + ["hilal-paper"] * runs:
                    rows += mapping_counts(nb, method, m, p["DATASET"], layers(m, p["DATASET"]), p)
        elif nb == "08":
            from hilal.mapping import MAPPING_HESSIAN

            h = {**MAPPING_HESSIAN, **dict(p["HESSIAN"] or {})}
            for m, d, epochs in ((p["VIT_MODEL"], p["VIT_DATASET"], p["VIT_EPOCHS"]),
                                 (p["QA_MODEL"], p["QA_DATASET"], p["QA_EPOCHS"])):
                train(nb, m, d, epochs)
                rows.append(_curvature(nb, m, d, h["probes"], h["power_iters"], h["eli_samples"],
                                       min(h["max_samples"], SPLIT_SIZES[d]["calib"]), "curvature"))
                for method in p["METHODS"]:
                    rows += mapping_counts(nb, method, m, d, layers(m, d), p)
    unknown = sorted({r["dataset"] for r in rows} - set(SPLIT_SIZES))
    if unknown:
        raise HilalError(f"no paper split sizes for dataset(s) {unknown}; known: {', '.join(SPLIT_SIZES)}")
    return pd.DataFrame(rows)


def mappable_count(model: str, dataset: str) -> int:
    """Mappable layers of ``model`` built for ``dataset`` (classes and input size; QA at MobileBERT's)."""
    from hilal.analog import mappable_layers
    from hilal.models import build_model

    if dataset == "squad":
        return len(mappable_layers(build_model(model, in_channels=1, num_classes=2, image_size=384,
                                               allow_random=True)))
    classes, size = {"cifar100": (100, 32), "imagenet": (1000, 224)}.get(dataset, (10, 32))
    return len(mappable_layers(build_model(model, in_channels=3, num_classes=classes, image_size=size,
                                           allow_random=True)))


# --- projection and report -------------------------------------------------------------------------------

def project(counts: pd.DataFrame, units: pd.DataFrame) -> pd.DataFrame:
    """``counts`` with the unit costs of its model and dataset joined and ``seconds`` = the formula of the
    module docstring; a term whose count is 0 adds 0, one whose unit cost is missing (NaN) makes ``seconds``
    NaN."""
    u = units.set_index(["model", "dataset"])[list(UNIT_COLUMNS)]
    df = counts.join(u, on=["model", "dataset"])
    terms = (("steps", "step_s"), ("ft_steps", "ft_step_s"), ("passes", "hvp_sample_s"),
             ("evaluations", "program_s"), ("eval_samples", "eval_sample_s"))
    seconds = 0.0
    for count, unit in terms:
        n = df[count] * (df["pass_samples"] if count == "passes" else 1.0)
        seconds = seconds + (n * df[unit]).where(n != 0, 0.0)
    df["seconds"] = seconds
    return df


def cost_table(projected: pd.DataFrame) -> pd.DataFrame:
    """Per notebook, model and dataset: the unit costs at paper size (``pass_s``: a curvature pass over the
    mean calibration size of its passes; ``eval_s``: a noisy evaluation of the whole test split), the counts,
    and the projected ``hours`` (NaN when a unit cost it needs is missing); then one ``all`` row per notebook
    and a ``total`` row, which sum the hours that are known and say in ``incomplete`` whether any were not."""
    rows = []
    for (nb, m, d), g in projected.groupby(["notebook", "model", "dataset"], sort=True):
        passes = g["passes"].sum()
        mean_pass = (g["passes"] * g["pass_samples"]).sum() / passes if passes else 0.0
        u = g.iloc[0]
        hours = g["seconds"].sum(skipna=False) / 3600
        rows.append({"notebook": nb, "model": m, "dataset": d, "step_s": u["step_s"], "ft_step_s": u["ft_step_s"],
                     "pass_s": u["hvp_sample_s"] * mean_pass if passes else float("nan"),
                     "eval_s": u["program_s"] + u["eval_sample_s"] * SPLIT_SIZES[d]["test"],
                     "steps": g["steps"].sum(), "ft_steps": g["ft_steps"].sum(), "passes": passes,
                     "evaluations": g["evaluations"].sum(), "hours": hours, "incomplete": bool(pd.isna(hours))})
    table = pd.DataFrame(rows)
    sums = ["steps", "ft_steps", "passes", "evaluations", "hours"]
    per_nb = (table.groupby("notebook", sort=True)
              .agg(**{c: (c, "sum") for c in sums}, incomplete=("incomplete", "any"))
              .reset_index().assign(model="all", dataset=""))
    total = pd.DataFrame([{"notebook": "total", "model": "", "dataset": "", **table[sums].sum(),
                           "incomplete": bool(table["incomplete"].any())}])
    return pd.concat([table, per_nb, total], ignore_index=True)


def latest_runs(root: str | Path) -> pd.DataFrame:
    """Each notebook's latest row of the ``reproduce.csv`` tables under ``root/runs`` (the dry runs there)."""
    tables = [pd.read_csv(f, dtype={"notebook": str}).assign(run=f.parent.name)
              for f in sorted(Path(root).glob("runs/*/reproduce.csv"))]
    if not tables:
        return pd.DataFrame(columns=["notebook", "name", "status", "seconds", "error", "run"])
    df = pd.concat(tables, ignore_index=True).fillna({"error": ""})
    return df.groupby("notebook", sort=True).tail(1).sort_values("notebook", ignore_index=True)


def cost_report(root: str | Path, runs: pd.DataFrame | None = None, out: str | Path | None = DEFAULT_OUT,
                profile: str = "paper", repeats: int = 3, threads: int | None = None,
                max_batch: Mapping[str, int] | None = None, units: pd.DataFrame | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Measure the unit costs on the synthetic data under ``root`` (:func:`hilal.dryrun.prepare`), project
    ``profile``'s cost (:func:`project`, :func:`cost_table`) and write units, counts, table and the dry run's
    notebook table ``runs`` (default: each notebook's latest row in the ``reproduce.csv`` files under
    ``root/runs``) to ``out`` (JSON, atomically). ``max_batch``: see :func:`measure_all`. ``units``: unit costs
    measured before (a table as :func:`measure_all` returns), reused instead of measured. Returns the table."""
    import os

    from hilal.paths import atomic_json_dump, is_dryrun_dir
    from hilal.runtime import machine_info

    if not is_dryrun_dir(root):
        raise HilalError(f"{root} is not a dry-run data folder; write one with hilal.dryrun.prepare(root)")
    if threads is not None:
        if not is_count(threads):
            raise HilalError(f"threads must be a positive integer; got {threads!r}")
        torch.set_num_threads(threads)
    os.environ["HILAL_DATA_DIR"] = str(Path(root).resolve())
    os.environ["HILAL_OFFLINE"] = "1"
    common = notebook_parameters(profile)["05"]
    counts = profile_counts(profile)
    pairs = list(dict.fromkeys(zip(counts["model"], counts["dataset"], strict=True)))
    if units is None:
        units = measure_all(pairs, common["PRESET"], float(common["T_EVAL"]), repeats, max_batch, progress=progress)
    missing = sorted(set(pairs) - set(zip(units["model"], units["dataset"], strict=True)))
    if missing:
        raise HilalError(f"the unit costs given lack {missing}; measure them (units=None)")
    runs = latest_runs(root) if runs is None else runs
    table = cost_table(project(counts, units))
    if out is not None:
        atomic_json_dump({"profile": profile, "machine": machine_info("cpu"), "repeats": repeats,
                          "max_batch": dict(max_batch or {}),
                          "formula": "seconds = steps*step_s + ft_steps*ft_step_s + passes*pass_samples*hvp_sample_s"
                                     " + evaluations*program_s + eval_samples*eval_sample_s",
                          "split_sizes": SPLIT_SIZES, "units": units.to_dict(orient="records"),
                          "counts": counts.to_dict(orient="records"), "table": table.to_dict(orient="records"),
                          "total_hours": float(table["hours"].iloc[-1]),
                          "dryrun": runs.drop(columns=["output"], errors="ignore").to_dict(orient="records")},
                         out)
    return table
