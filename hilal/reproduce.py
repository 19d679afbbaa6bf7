"""Execute the numbered notebooks headlessly with papermill under a parameter profile, and the cached
results the notebooks share.

A profile (``notebooks/profiles/<name>.yaml``) has a ``common:`` section of parameters given to every
notebook that declares them and a ``notebooks:`` section keyed by two-digit notebook number whose
parameters must be declared by that notebook. Anything not declared is an error, found before a single
cell runs (``papermill.inspect_notebook``). ``dryrun: true`` marks a profile that runs on the synthetic data of
:func:`hilal.dryrun.prepare`: it runs only where ``HILAL_DATA_DIR`` is such a folder, offline, and its figures and
executed notebooks go into that folder, never into ``figures/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

import hilal
from hilal.checks import check_count, check_mapping
from hilal.paths import (
    DRYRUN_MARKER,
    code_fingerprint,
    data_dir,
    figures_dir,
    is_dryrun_dir,
    jsonable,
    locked,
    project_root,
    provenance_source,
    read_cached,
    read_provenance,
    read_yaml,
    write_cached,
    write_provenance,
)
from hilal.registry import HilalError, is_count
from hilal.runtime import allocator_env, utc_now

COLAB_REPO = "hilal-kit/hilal"
"""GitHub ``owner/name`` the notebooks install from on Colab and link their badges to (a placeholder until
the kit is published); notebooks/README.md and every notebook's first code cell use this one value."""
COLAB_INSTALL = f'%pip install -q "git+https://github.com/{COLAB_REPO}"'
_NB = re.compile(r"^(\d\d)_[A-Za-z0-9_\-]+\.ipynb$")
_PROFILE_KEYS = {"description", "common", "notebooks", "timeout_s", "dryrun"}


class ReproduceError(HilalError):
    """A notebook failed; ``table`` holds the per-notebook status and times."""

    def __init__(self, message: str, table: pd.DataFrame) -> None:
        super().__init__(message)
        self.table = table


def notebooks_dir() -> Path:
    """The folder holding ``NN_name.ipynb`` and ``profiles/``."""
    return project_root() / "notebooks"


def list_notebooks(folder: str | Path | None = None) -> dict[str, Path]:
    """Notebook number (``'00'``...) -> path, in reading order."""
    folder = Path(folder) if folder else notebooks_dir()
    found = {}
    for p in sorted(folder.glob("*.ipynb")):
        m = _NB.match(p.name)
        if m:
            if m.group(1) in found:
                raise HilalError(f"two notebooks numbered {m.group(1)}: {found[m.group(1)].name}, {p.name}")
            found[m.group(1)] = p
    return found


def profile_names(folder: str | Path | None = None) -> list[str]:
    """Names of the profiles in ``notebooks/profiles``."""
    folder = Path(folder) if folder else notebooks_dir() / "profiles"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _nb_key(k: Any) -> str:
    # YAML reads 00..07 as integers (octal rules aside); accept both spellings
    if isinstance(k, int) and not isinstance(k, bool):
        return f"{k:02d}"
    k = str(k)
    if re.fullmatch(r"\d\d?", k):
        return f"{int(k):02d}"
    return k


def load_profile(profile: str | Path) -> dict[str, Any]:
    """Read a profile by name (``smoke``, ``paper``) or path; keys checked, notebook keys normalized to
    two digits."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = notebooks_dir() / "profiles" / f"{profile}.yaml"
        if not path.exists():
            raise HilalError(f"unknown profile {str(profile)!r}; valid choices: {', '.join(profile_names())} "
                             "(or a path to a .yaml file)")
    elif not path.exists():
        raise HilalError(f"profile file {path} does not exist")
    raw = read_yaml(path, "profile") or {}
    if not isinstance(raw, dict):
        raise HilalError(f"profile {path} must be a mapping with 'common' and 'notebooks' sections")
    bad = set(raw) - _PROFILE_KEYS
    if bad:
        raise HilalError(f"profile {path}: unknown section(s) {sorted(bad)}; valid: {sorted(_PROFILE_KEYS)}")
    nbs = {_nb_key(k): check_mapping(f"profile {path}: notebook {k!r}", v)
           for k, v in check_mapping(f"profile {path}: 'notebooks'", raw.get("notebooks")).items()}
    dry, timeout = raw.get("dryrun", False), raw.get("timeout_s")
    if not isinstance(dry, bool):
        raise HilalError(f"profile {path}: 'dryrun' must be true or false; got {dry!r}")
    if timeout is not None:
        check_count(f"profile {path}: 'timeout_s' (seconds per cell)", timeout)
    return {"name": path.stem, "path": str(path), "description": raw.get("description", ""), "dryrun": dry,
            "common": check_mapping(f"profile {path}: 'common'", raw.get("common")), "notebooks": nbs,
            "timeout_s": timeout}


def _select(only: str | int | Iterable[str | int] | None, available: Mapping[str, Path]) -> list[str]:
    if only is None:
        return list(available)
    items = [only] if isinstance(only, (str, int)) else list(only)
    keys = []
    for item in items:
        for part in str(item).split(","):
            key = _nb_key(int(part) if part.strip().isdigit() else part.strip())
            if key not in available:
                raise HilalError(f"unknown notebook {part.strip()!r}; valid choices: {', '.join(available)}")
            keys.append(key)
    return list(dict.fromkeys(keys))


def declared_parameters(path: str | Path) -> dict[str, Any]:
    """Parameters declared in a notebook's ``parameters`` cell (name -> papermill's description)."""
    import papermill as pm

    return pm.inspect_notebook(str(path))


def plan(profile: str | Path | Mapping[str, Any], only: str | int | Iterable[str | int] | None = None,
         folder: str | Path | None = None, overrides: Mapping[str, Any] | None = None
         ) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Notebook number -> (path, parameters) for a profile, checked against what each notebook declares.

    ``common`` parameters go to the notebooks that declare them (each must be declared by at least one
    notebook of the whole set); per-notebook parameters, and ``overrides`` (applied to every selected
    notebook), must be declared by their notebook. Any violation raises a HilalError naming the parameter,
    the notebook and what it does declare."""
    prof = profile if isinstance(profile, Mapping) else load_profile(profile)
    available = list_notebooks(folder)
    if not available:
        raise HilalError(f"no NN_name.ipynb notebooks in {folder or notebooks_dir()}")
    for key in prof["notebooks"]:
        if key not in available:
            raise HilalError(f"profile {prof['name']!r} has a section for unknown notebook {key!r}; valid "
                             f"choices: {', '.join(available)}")
    selected = _select(only, available)
    declared = {k: declared_parameters(p) for k, p in available.items()}
    common = dict(prof["common"])
    for name in common:
        if not any(name in d for d in declared.values()):
            raise HilalError(f"profile {prof['name']!r}: common parameter {name!r} is declared by no notebook")
    out = {}
    for key in selected:
        decl = declared[key]
        params = {k: v for k, v in common.items() if k in decl}
        for source, extra in ((f"section {key!r}", prof["notebooks"].get(key, {})),
                              ("overrides", overrides or {})):
            for name, value in extra.items():
                if name not in decl:
                    raise HilalError(f"parameter {name!r} ({source} of profile {prof['name']!r}) is not declared "
                                     f"by notebook {available[key].name}; it declares: {', '.join(decl) or 'none'}")
                params[name] = value
        out[key] = (available[key], params)
    return out


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reproduce(profile: str | Path = "smoke", only: str | int | Iterable[str | int] | None = None,
              out_dir: str | Path | None = None, figures: str | Path | None = None,
              kernel_name: str = "python3", overrides: Mapping[str, Any] | None = None,
              progress: bool = True, log_output: bool = False, notebooks: str | Path | None = None,
              threads: int | None = None) -> pd.DataFrame:
    """Execute notebooks with papermill under a profile and return a table of number, notebook, status,
    seconds and the output notebook path.

    ``only``: a notebook number or several (``"00"``, ``3``, ``["00", "02"]``, ``"00,02"``). ``out_dir``: where
    the executed notebooks go (default ``runs/<profile>-<timestamp>/``). ``figures``: the figures folder
    (default ``hilal.paths.figures_dir()``, i.e. ``figures/`` or ``HILAL_FIGURES_DIR``; for a ``dryrun`` profile
    both defaults lie in the data folder, which must be one :func:`hilal.dryrun.prepare` wrote). ``kernel_name``:
    a Jupyter kernel; ``python3`` resolves to the interpreter running this function when ipykernel is
    installed in it. ``overrides``: parameters given to every selected notebook (each must declare them).
    ``notebooks``: another folder of ``NN_name.ipynb`` files (default ``notebooks/``). ``threads``: torch threads
    of each kernel (its ``OMP_NUM_THREADS``; default: the one set in the environment, else 1, since the models
    are small and torch's default of one thread per core oversubscribes a shared machine).

    After each notebook its entry in the figures folder's ``provenance.json`` (:data:`hilal.paths.PROVENANCE`)
    gets the profile, parameters, status, seconds and when it finished, on top of the code and machine that
    the kernel's :func:`hilal.plots.save_summary` recorded (``written``), or, for a notebook that failed
    before it, those of this process with the kernels' threads. Float results differ between CPUs, so
    figures are cited with it.

    Every notebook runs even if an earlier one failed; then a ReproduceError (a HilalError) carrying the
    table is raised. Parameter errors (unknown profile or notebook, undeclared parameter) are raised before
    anything runs.
    """
    import papermill as pm

    if threads is not None and not is_count(threads):
        raise HilalError(f"threads must be a positive integer (torch threads per notebook kernel); got {threads!r}")
    omp = str(threads) if threads is not None else os.environ.get("OMP_NUM_THREADS") or "1"
    prof = load_profile(profile)
    todo = plan(prof, only, folder=notebooks, overrides=overrides)
    extra_env = {}
    if prof.get("dryrun"):
        if not is_dryrun_dir():
            raise HilalError(f"profile {prof['name']!r} runs on synthetic data only: write it with "
                             f"hilal.dryrun.prepare(root) (or python -m hilal.dryrun) and set HILAL_DATA_DIR=root; "
                             f"{data_dir()} has no {DRYRUN_MARKER}")
        extra_env["HILAL_OFFLINE"] = "1"
    home = data_dir() if prof.get("dryrun") else project_root()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_dir) if out_dir else home / "runs" / f"{prof['name']}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = Path(figures) if figures else data_dir() / "figures" if prof.get("dryrun") else figures_dir()
    fig_dir.mkdir(parents=True, exist_ok=True)
    # the kernel imports this very package even when it is not pip-installed (a fresh clone)
    pkg_root = str(Path(hilal.__file__).resolve().parent.parent)
    pypath = os.pathsep.join([pkg_root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    rows = []
    source = provenance_source(threads=int(omp))  # the kernels' threads, not this process's
    # inline backend: the executed copies under runs/ show their figures (an inherited Agg would hide them)
    with _environ(HILAL_FIGURES_DIR=str(fig_dir.resolve()), PYTHONPATH=pypath,
                  MPLBACKEND="module://matplotlib_inline.backend_inline", OMP_NUM_THREADS=omp, MKL_NUM_THREADS=omp,
                  **allocator_env(),
                  **extra_env):
        for key, (path, params) in todo.items():
            out_nb = run_dir / path.name
            if progress:
                print(f"[reproduce] {path.name} {json.dumps(params, default=str)}", flush=True)
            t0, started = time.perf_counter(), utc_now()
            status, error = "ok", ""
            try:
                pm.execute_notebook(str(path), str(out_nb), parameters=params, kernel_name=kernel_name,
                                    cwd=str(path.parent), progress_bar=False, log_output=log_output,
                                    request_save_on_cell_execute=True,
                                    execution_timeout=prof["timeout_s"])
            except Exception as e:  # noqa: BLE001 - recorded per notebook, raised together below
                status = "failed"
                error = _short_error(e)
            secs = time.perf_counter() - t0
            rows.append({"notebook": key, "name": path.stem, "status": status, "seconds": round(secs, 1),
                         "output": str(out_nb), "error": error})
            # the kernel's own entry (save_summary) names its machine and code; a notebook that did not get
            # that far gets this process's
            kernel = read_provenance(fig_dir).get(key, {})
            wrote = kernel if str(kernel.get("written") or "") >= started else {}
            write_provenance(key, {"name": path.stem, **source, **wrote, "profile": prof["name"], "status": status,
                                   "seconds": round(secs, 1), "parameters": params, "finished": utc_now()},
                             fig_dir)
            if progress:
                print(f"[reproduce] {path.name}: {status} in {secs:.1f} s" + (f" ({error})" if error else ""),
                      flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(run_dir / "reproduce.csv", index=False)
    if progress:
        print(table[["notebook", "name", "status", "seconds"]].to_string(index=False), flush=True)
    failed = table[table["status"] != "ok"]
    if len(failed):
        raise ReproduceError(f"{len(failed)} notebook(s) failed: " + "; ".join(
            f"{r.name}: {r.error}" for r in failed.itertuples()) + f" (executed notebooks in {run_dir})", table)
    return table


def _short_error(e: Exception) -> str:
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    msg = f"{ename}: {evalue}" if ename else f"{type(e).__name__}: {e}"
    return msg.strip().splitlines()[0][:500] if msg.strip() else type(e).__name__


# ---------------------------------------------------------------- results shared between notebooks

@dataclass
class StoredMapping:
    """A mapping result as the notebooks use it: the ``result.json`` fields and the final model."""

    result: dict[str, Any]
    """``MappingResult.to_dict()``."""
    model: nn.Module
    """The final (partly analog, fine-tuned) model."""
    reused: bool
    """True when loaded from an earlier run with identical settings instead of computed."""

    def recheck(self, splits: Any, reps: int = 50, seed: int = 0) -> dict[str, Any]:
        """The final model re-scored on fresh programmings against its floor (:func:`hilal.mapping.recheck`)."""
        from hilal.mapping import recheck

        return recheck(self.result, splits, reps, seed, model=self.model)


def _key(d: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def mapping_results(methods: Sequence[str], model_name: str, splits: Any, cfg: Any = None, seed: int = 0,
                    epochs: int | None = None, reuse: bool = True, progress: bool = True
                    ) -> dict[str, StoredMapping]:
    """Run (:func:`hilal.allocate`) or load the mapping of each method for ``model_name`` trained on
    ``splits`` (a Splits or a dataset name).

    Results are stored under ``data/mappings/`` keyed by model, dataset, seed, training epochs, method, every
    MappingConfig field and :func:`code_fingerprint`; with ``reuse`` a stored result with identical settings
    is loaded instead of recomputed (notebook 05 computes, 06 and 07 reuse). The stored model is rebuilt from
    the digital checkpoint, the analog layer list and the saved weights.
    """
    from hilal.api import allocate
    from hilal.data import load_dataset
    from hilal.mapping import MappingConfig, restore, snapshot
    from hilal.train import TrainConfig, trained_model

    if isinstance(splits, str):
        splits = load_dataset(splits, seed=seed)
    cfg = cfg or MappingConfig()
    tcfg = TrainConfig(seed=seed) if epochs is None else TrainConfig(epochs=epochs, seed=seed)
    cfg_d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    cfg_d.pop("workdir", None)
    settings = {f: getattr(cfg, f) for f in asdict(cfg)} if is_dataclass(cfg) else dict(cfg)  # hilal.allocate's
    out = {}
    for method in methods:
        key = _key({"model": model_name, "dataset": splits.name, "seed": seed, "train": asdict(tcfg),
                    "method": method, "cfg": cfg_d, "version": code_fingerprint()})
        js = (data_dir() / "mappings" / f"{model_name}-{splits.name}-{method}-{key}").with_suffix(".json")
        digital = trained_model(model_name, splits, seed, tcfg, progress=progress)
        with locked(js):  # another process mapping the same settings waits and loads this one's result
            stored = read_cached(js) if reuse else None  # damaged entries are set aside and recomputed
            if stored is not None:
                model = _rebuild(digital, stored[0])
                restore(model, stored[1])
                out[method] = StoredMapping(stored[0], model.eval(), True)
                if progress:
                    print(f"[mapping] {method}: loaded {js.name}", flush=True)
                continue
            res = allocate(digital, splits, method, progress=progress, **settings)
            result = json.loads(json.dumps(res.to_dict(), default=jsonable))
            write_cached(result, js, snapshot(res.model))
            out[method] = StoredMapping(result, res.model, False)
    return out


def _rebuild(digital: nn.Module, result: Mapping[str, Any]) -> nn.Module:
    from hilal.analog import to_analog

    layers = list(result["analog_layers"])
    return to_analog(digital, layers, result.get("preset", "pcm")) if layers else digital


def layer_metrics_for(model: nn.Module, splits: Any, preset: str = "pcm", cfg: Any = None,
                      tag: Mapping[str, Any] | None = None, reuse: bool = True, progress: bool = True
                      ) -> pd.DataFrame:
    """:func:`hilal.analyze` (its metrics, without clusters) stored under ``data/cache/`` keyed by ``tag`` (say
    model name, dataset, seed, epochs), the preset and every HessianConfig field; with ``reuse`` a stored table
    with identical settings is returned instead of recomputed (notebook 03 computes, 04 reuses)."""
    from hilal.api import analyze
    from hilal.hessian import HessianConfig

    cfg = cfg or HessianConfig()
    settings = {"tag": dict(tag or {}), "preset": preset, "cfg": asdict(cfg), "version": code_fingerprint()}
    path = data_dir() / "cache" / f"layer_metrics-{_key(settings)}.json"
    with locked(path):
        stored = read_cached(path) if reuse else None  # a damaged entry is set aside and recomputed
        if stored is not None:
            df = pd.DataFrame(stored[0]["rows"])
            df.attrs.update(stored[0]["attrs"])
            return df
        df = analyze(model, splits, preset, cluster=None, progress=progress,
                     **{k: getattr(cfg, k) for k in asdict(cfg)})
        write_cached({"settings": settings, "attrs": df.attrs, "rows": df.to_dict(orient="records")}, path)
    return df


def zoo_table(models: Sequence[str], datasets: Sequence[str], seed: int = 0, epochs: int | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Train (or load from the checkpoint cache) every model on every dataset and tabulate mappable layers,
    weights, MACs per sample and the floating-point test and calibration accuracy."""
    from hilal.analog import count_macs, count_params
    from hilal.data import load_dataset
    from hilal.train import TrainConfig, score, trained_model

    tcfg = TrainConfig(seed=seed) if epochs is None else TrainConfig(epochs=epochs, seed=seed)
    rows = []
    for dataset in datasets:
        splits = load_dataset(dataset, seed=seed)
        for name in models:
            t0 = time.perf_counter()
            model = trained_model(name, splits, seed, tcfg, progress=progress)
            macs = count_macs(model, splits.example_input(2))
            rows.append({"model": name, "dataset": dataset, "layers": len(macs),
                         "weights": sum(count_params(model).values()), "mmacs": sum(macs.values()) / 1e6,
                         "accuracy": score(model, splits, "test"), "calib_accuracy": score(model, splits, "calib"),
                         "seconds": round(time.perf_counter() - t0, 1)})
    return pd.DataFrame(rows)


def headlines(numbers: Iterable[str], figures: str | Path | None = None) -> str:
    """The headline numbers the given notebooks recorded (``NN_summary.json``), as text; for the quickstart,
    the drift table (mean ± std accuracy per preset and inference time)."""
    fig_dir = Path(figures) if figures else figures_dir()
    parts = []
    drift = fig_dir / "00_quickstart_drift.csv"
    if "00" in numbers and drift.exists():
        from hilal.evaluate import time_label

        d = pd.read_csv(drift)
        if {"preset", "t_inference", "mean", "std"} <= set(d.columns):
            d["cell"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(d["mean"], d["std"], strict=True)]
            t = d.pivot(index="preset", columns="t_inference", values="cell")
            t.columns = [time_label(float(c)) for c in t.columns]
            parts.append("00 quickstart: all-analog test accuracy after programming\n" + t.to_string())
    for nb in numbers:
        p = fig_dir / f"{nb}_summary.json"
        if p.exists():
            parts.append(f"{nb} summary: {json.dumps(json.loads(p.read_text()), default=str)[:600]}")
    return "\n\n".join(parts)
