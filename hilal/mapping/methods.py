"""The method registry and the entry point: :func:`run_mapping` validates the settings, sets up one run
(:class:`hilal.mapping.run._Run`: the digital baseline, MACs, journal) and hands it to the method, a function of
the run that returns a :class:`MappingResult`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hilal.batched_eval import check_engine
from hilal.data import Splits
from hilal.hardware import OBJECTIVES, make_chip
from hilal.mapping.baselines import all_analog, all_analog_ft, all_digital, lionheart, random_order
from hilal.mapping.config import COSTS, ORDERS, SEARCHES, MappingConfig, MappingResult
from hilal.mapping.paper import hilal_paper
from hilal.mapping.run import _Run
from hilal.mapping.search import hilal
from hilal.mapping.zeroshot import hilal_zeroshot, max_norm
from hilal.registry import HilalError, Registry, check_choice

METHODS: Registry[Callable[..., MappingResult]] = Registry("method")
"""Method name -> the function that maps a run (``hilal map --method``, ``run_mapping``'s first argument)."""
METHODS.add("hilal", hilal)
METHODS.add("hilal-paper", hilal_paper)
METHODS.add("lionheart", lionheart)
METHODS.add("random", random_order)
METHODS.add("all-digital", all_digital)
METHODS.add("all-analog", all_analog)
METHODS.add("all-analog-ft", all_analog_ft)
METHODS.add("max-norm", max_norm)
METHODS.add("hilal-zeroshot", hilal_zeroshot)


def run_mapping(method: str, model: nn.Module, splits: Splits, cfg: MappingConfig | None = None,
                progress: bool = True) -> MappingResult:
    """Run one allocation method on a trained digital ``model`` (left unmodified)."""
    fn = METHODS[method]
    cfg = cfg or MappingConfig()
    check_choice("search", cfg.search, SEARCHES)
    check_choice("order", cfg.order, ORDERS)
    check_choice("cost", cfg.cost, tuple(COSTS))
    check_choice("objective", cfg.objective, OBJECTIVES)
    check_max_tiles(cfg.max_tiles)
    make_chip(cfg.chip, cfg.preset)  # an unknown or invalid chip setting fails before any work
    check_engine(cfg.engine)
    if not isinstance(cfg.paper_guard, bool):
        raise HilalError(f"paper_guard must be True or False, got {cfg.paper_guard!r}")
    return fn(_Run(method, model, splits, cfg, progress))


def check_max_tiles(max_tiles: object) -> None:
    """``max_tiles`` is None (no limit) or a positive whole number of tiles; otherwise a one-line HilalError."""
    if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1):
        raise HilalError(f"max_tiles must be a positive whole number of analog tiles, or None for no limit; "
                         f"got {max_tiles!r}")
