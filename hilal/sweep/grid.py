"""A sweep's grid: the YAML file ``hilal sweep`` reads, checked before any work starts, and its expansion
into one :class:`Run` per mapping run.

A grid names lists of models, datasets, presets, methods, mapping seeds and training seeds, fixed
:class:`hilal.mapping.MappingConfig` settings (``mapping``) and swept ones (``vary``: a setting -> a list of
values); every combination is one run. Why check everything first: a typo found after an hour of mappings
costs that hour.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hilal.registry import HilalError, check_choice, is_count

CLUSTERS = ("local", "slurm", "pbs")
"""Where a sweep's workers run: an embedded ``LocalCluster``, or Slurm / PBS jobs through dask-jobqueue."""
_KEYS = {"name", "models", "datasets", "presets", "methods", "mapping_seeds", "train_seeds", "epochs", "recheck",
         "mapping", "vary", "workers", "threads", "retries", "cluster", "out"}
_LISTS = ("models", "datasets", "presets", "methods", "mapping_seeds", "train_seeds")


@dataclass(frozen=True)
class Run:
    """One mapping run of a sweep: what :func:`hilal.allocate` is called with."""

    model: str
    dataset: str
    preset: str
    method: str
    mapping_seed: int
    train_seed: int
    settings: dict[str, Any] = field(default_factory=dict, hash=False)
    """MappingConfig settings on top of the defaults (``finetune``: a dict of FinetuneConfig fields)."""
    epochs: int | None = None
    """Digital training epochs (None: the dataset's recipe)."""
    recheck: int = 0
    """Programmings of the final mapping's recheck (0: none)."""

    @property
    def run_id(self) -> str:
        """A stable name for the run: a hash of every field, the same in every process and session."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def checkpoint(self) -> tuple[str, str, int, int | None]:
        """The digital checkpoint the run starts from: (model, dataset, train seed, epochs)."""
        return (self.model, self.dataset, self.train_seed, self.epochs)


@dataclass
class Grid:
    """A checked sweep grid (see the module docstring and ``sweeps/smoke.yaml``)."""

    name: str
    models: list[str]
    datasets: list[str]
    presets: list[str]
    methods: list[str]
    mapping_seeds: list[int] = field(default_factory=lambda: [0])
    train_seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int | None = None
    recheck: int = 0
    mapping: dict[str, Any] = field(default_factory=dict)
    vary: dict[str, list[Any]] = field(default_factory=dict)
    workers: int = 2
    """Worker processes of the embedded LocalCluster (or jobs of a jobqueue cluster)."""
    threads: int = 1
    """torch threads per task."""
    retries: int = 2
    """How many times a failed task is tried again before its error stands."""
    cluster: dict[str, Any] = field(default_factory=lambda: {"kind": "local"})
    """``kind`` (local, slurm, pbs) and, for a jobqueue cluster, its job resources (``cores``, ``memory``, ...)."""
    out: str | None = None
    """The sweep's folder (default: ``runs/sweeps/<name>`` in the checkout)."""

    def runs(self) -> list[Run]:
        """Every run of the grid, in a fixed order."""
        keys = list(self.vary)
        out = []
        for combo in itertools.product(self.models, self.datasets, self.presets, self.train_seeds,
                                       self.mapping_seeds, *(self.vary[k] for k in keys), self.methods):
            model, dataset, preset, train_seed, seed, *values, method = combo
            settings = {**self.mapping, **dict(zip(keys, values, strict=True))}
            out.append(Run(model, dataset, preset, method, seed, train_seed, settings, self.epochs, self.recheck))
        return out

    def folder(self) -> Path:
        """Where the sweep's table and errors go."""
        from hilal.paths import project_root

        return Path(self.out) if self.out else project_root() / "runs" / "sweeps" / self.name


def load_grid(source: str | Path | Mapping[str, Any], **overrides: Any) -> Grid:
    """A checked :class:`Grid` from a YAML file or a mapping; ``overrides`` (e.g. ``workers``, ``out``) go on
    top. Any unknown key, name or setting raises a one-line HilalError naming it and the valid choices."""
    if isinstance(source, Mapping):
        raw, where = dict(source), "grid"
    else:
        path = Path(source)
        if not path.is_file():
            raise HilalError(f"sweep file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise HilalError(f"sweep file {str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise HilalError(f"sweep file {str(path)!r} must be a mapping of grid keys")
        raw.setdefault("name", path.stem)
        where = str(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    bad = sorted(set(raw) - _KEYS)
    if bad:
        raise HilalError(f"{where}: unknown key(s) {bad}; valid: {', '.join(sorted(_KEYS))}")
    for k in ("models", "datasets", "presets", "methods"):
        if k not in raw:
            raise HilalError(f"{where}: {k!r} is missing (a list of names)")
    grid = Grid(**{k: _listed(raw[k], k, where) if k in _LISTS else raw[k] for k in raw})
    _check(grid, where)
    return grid


def _listed(value: Any, key: str, where: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise HilalError(f"{where}: {key!r} is empty")
    return items


def _check(grid: Grid, where: str) -> None:
    from hilal.analog import PRESETS  # local: reading a grid's YAML does not load torch and aihwkit
    from hilal.data import DATASETS
    from hilal.mapping import METHODS
    from hilal.models import MODELS

    if not isinstance(grid.name, str) or not grid.name or "/" in grid.name:
        raise HilalError(f"{where}: 'name' must be a plain folder name; got {grid.name!r}")
    for key, registry in (("models", MODELS), ("datasets", DATASETS), ("presets", PRESETS), ("methods", METHODS)):
        for name in getattr(grid, key):
            check_choice(key[:-1], str(name), registry.names())
    for key in ("mapping_seeds", "train_seeds"):
        for s in getattr(grid, key):
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise HilalError(f"{where}: {key} must be whole numbers >= 0; got {s!r}")
    for key in ("workers", "threads"):
        if not is_count(getattr(grid, key)):
            raise HilalError(f"{where}: {key} must be a whole number >= 1; got {getattr(grid, key)!r}")
    if not isinstance(grid.retries, int) or isinstance(grid.retries, bool) or grid.retries < 0:
        raise HilalError(f"{where}: retries must be a whole number >= 0; got {grid.retries!r}")
    if grid.epochs is not None and not is_count(grid.epochs):
        raise HilalError(f"{where}: epochs must be a whole number >= 1 (or left out); got {grid.epochs!r}")
    if grid.recheck != 0 and not (is_count(grid.recheck) and grid.recheck >= 2):
        raise HilalError(f"{where}: recheck needs at least 2 programmings (or 0 for none); got {grid.recheck!r}")
    if not isinstance(grid.mapping, dict) or not isinstance(grid.vary, dict):
        raise HilalError(f"{where}: 'mapping' and 'vary' must be mappings of MappingConfig settings")
    for k, v in grid.vary.items():
        if not isinstance(v, list) or not v:
            raise HilalError(f"{where}: vary.{k} must be a non-empty list of values; got {v!r}")
        if k in grid.mapping:
            raise HilalError(f"{where}: {k!r} is both fixed (mapping) and swept (vary); give it once")
    for k in ("seed", "preset", "workdir"):
        if k in grid.mapping or k in grid.vary:
            raise HilalError(f"{where}: {k!r} is set by the grid itself (mapping_seeds, presets) or per run; "
                             "remove it from mapping/vary")
    for run in {json.dumps(r.settings, sort_keys=True, default=str): r for r in grid.runs()}.values():
        mapping_config(run)  # every combination of settings builds, before any work
    if not isinstance(grid.cluster, dict):
        raise HilalError(f"{where}: 'cluster' must be a mapping with a 'kind' ({', '.join(CLUSTERS)})")
    check_choice("cluster kind", str(grid.cluster.get("kind", "local")), CLUSTERS)


def mapping_config(run: Run) -> Any:
    """The :class:`hilal.mapping.MappingConfig` of a run (settings checked: unknown fields raise)."""
    from hilal.mapping import SEARCHES, MappingConfig
    from hilal.train import FinetuneConfig

    valid = [f.name for f in fields(MappingConfig)]
    bad = sorted(set(run.settings) - set(valid))
    if bad:
        raise HilalError(f"unknown MappingConfig setting(s) {bad}; valid: {', '.join(valid)}")
    settings = dict(run.settings)
    if isinstance(settings.get("finetune"), Mapping):
        ft = [f.name for f in fields(FinetuneConfig)]
        bad = sorted(set(settings["finetune"]) - set(ft))
        if bad:
            raise HilalError(f"unknown FinetuneConfig setting(s) {bad}; valid: {', '.join(ft)}")
        settings["finetune"] = FinetuneConfig(**settings["finetune"])
    if "search" in settings:
        check_choice("search", str(settings["search"]), SEARCHES)
    return MappingConfig(**{**settings, "preset": run.preset, "seed": run.mapping_seed})
