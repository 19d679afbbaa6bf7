"""Layer-allocation methods: HILAL, the paper's variant, LionHeart, and plain baselines.

Every method shares one retraining routine (:func:`retrain`: the same optimizer settings, steps per round
and patience rule) and one evaluation (:func:`hilal.evaluate.noisy_scores` at ``t_eval`` over ``reps`` on the
calibration split inside the loop, on the test split at the end), so a HILAL stage and a LionHeart round cost
the same and any speed-up comes from the method.

Timings: ``search_s`` is the time spent deciding (curvature metrics, ordering, clustering, and retraining
rounds whose result was rejected), ``mapping_s`` the retraining whose result was kept, ``eval_s`` the final
evaluation, ``total_s`` everything including the floating-point baseline (``ledger``).

One concern per module, each importing only from those listed before it:

- ``config``: :class:`MappingConfig`, :class:`MappingResult`, the options' choices, HILAL's curvature budget
- ``journal``: model snapshots and the resumable ``--workdir`` journal
- ``ledger``: a run's history rows, retraining rounds and timings
- ``run``: :func:`retrain` and the run object (``_Run``) whose steps every method is built from
- ``recheck``: :func:`recheck` and :func:`fresh_pass_rate`, a final mapping on fresh programmings
- ``search``: HILAL (:func:`hilal`): curvature order and the stage searches (:func:`pareto_sets`)
- ``paper``: the paper's variant (:func:`hilal_paper`) and its ablations
- ``baselines``: LionHeart and the plain baselines
- ``zeroshot``: the retraining-free methods (:func:`max_norm`, :func:`hilal_zeroshot`)
- ``methods``: the :data:`METHODS` registry and :func:`run_mapping`
- ``frontier``: :func:`energy_frontier`, accuracy against hardware cost along HILAL's knapsack frontier

Import from ``hilal.mapping``; to replace a function in a test, patch it in the module that calls it (e.g.
``hilal.mapping.run._in_loop_score``), not here.
"""

from __future__ import annotations

from hilal.mapping.baselines import all_analog, all_analog_ft, all_digital, lionheart, random_order
from hilal.mapping.config import COSTS, MAPPING_HESSIAN, ORDERS, SEARCHES, MappingConfig, MappingResult, _hessian_cfg
from hilal.mapping.frontier import beats, budget_choice, energy_frontier, frontier_sets
from hilal.mapping.journal import Journal, restore, snapshot
from hilal.mapping.methods import METHODS, check_max_tiles, run_mapping
from hilal.mapping.paper import ABLATIONS, hilal_paper, paper_clusters, paper_descriptors
from hilal.mapping.recheck import RECHECK_SEED, fresh_pass_rate, recheck
from hilal.mapping.run import CONFIRM_SEED, Round, _decided, _Run, retrain
from hilal.mapping.search import _extend_prefix, _knapsack, _scan, _screened, _trim, hilal, pareto_sets
from hilal.mapping.zeroshot import hilal_zeroshot, longest_prefix, max_norm, row_norm_ratio, zeroshot_knapsack

__all__ = [
    "ABLATIONS", "CONFIRM_SEED", "COSTS", "Journal", "MAPPING_HESSIAN", "METHODS", "MappingConfig", "MappingResult",
    "ORDERS", "RECHECK_SEED", "Round", "SEARCHES", "_Run", "_decided", "_extend_prefix", "_hessian_cfg", "_knapsack",
    "_scan", "_screened", "_trim", "all_analog", "all_analog_ft", "all_digital", "beats", "budget_choice",
    "check_max_tiles", "energy_frontier", "fresh_pass_rate", "frontier_sets", "hilal", "hilal_paper", "hilal_zeroshot",
    "lionheart", "longest_prefix", "max_norm", "paper_clusters", "paper_descriptors", "pareto_sets", "random_order",
    "recheck", "restore", "retrain", "row_norm_ratio", "run_mapping", "snapshot", "zeroshot_knapsack",
]
