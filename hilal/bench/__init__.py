"""Side-by-side benchmarks (``hilal bench hessian|search|analog|frontier``).

Both sides of every comparison run in the same process, interleaved within each repeat, and the reported
ratio is the ratio of the medians over repeats, so background load affects both sides alike.

- ``hessian``: Hessian traces and the expected loss increase (ELI) of every mappable layer, from the joint
  pass (:mod:`hilal.hessian`: exact Gauss-Newton blocks where the network is piecewise linear in each weight,
  else one HVP per probe / noise sample for all layers) versus PyHessian's ``hessian``
  class run one layer at a time (only that layer's weight requiring grad; ``.trace()`` for the traces and
  ``pyhessian.utils.hessian_vector_product`` on the same noise samples for the ELI quadratic term). Same data,
  same number of probes and the same noise samples on both sides.
- ``search``: ``run_mapping("hilal")`` versus ``run_mapping("lionheart")`` with one :class:`MappingConfig`.
- ``analog``: forward time of the all-analog aihwkit model versus the digital one, and one drift evaluation.
- ``frontier``: HILAL's energy frontier (:func:`hilal.mapping.energy_frontier`) versus LionHeart's mapping,
  priced on the chip model of :mod:`hilal.hardware`: accuracy, tiles, energy and latency per sample.

One concern per module, each importing only from those listed before it:

- ``config``: :class:`BenchConfig`, the benchmark kinds, timing and the trained models
- ``hessian``: the joint pass against PyHessian (:func:`bench_hessian`, :func:`agreement`)
- ``search``: HILAL against LionHeart (:func:`bench_search`) and the untimed warm-ups
- ``analog``: the aihwkit simulation overhead (:func:`bench_analog`)
- ``frontier``: the energy frontier against LionHeart (:func:`bench_frontier`)
- ``tables``: summary tables (:func:`table`, :func:`search_criteria`), result files, markdown
- ``cli``: :func:`run_bench` and the argparse entry shared by ``hilal bench`` and ``bench/*.py``
- ``report``: the benchmark tables in README.md and docs/benchmarks.md, generated from ``bench/results``
  (``python -m hilal.bench.report [--check]``; not imported here, so that ``-m`` runs it once)

The modules import the rest of the kit inside the functions that use it, so that the report, which loads this
package, reads and writes its tables without loading aihwkit and the models.

Import from ``hilal.bench``; to replace a function in a test, patch it in the module that calls it (e.g.
``hilal.bench.cli.run_bench``, which :func:`run_args` calls), not here.
"""

from __future__ import annotations

from hilal.bench.analog import _analog_one, bench_analog
from hilal.bench.cli import BENCHES, main, run_args, run_bench, script
from hilal.bench.config import KINDS, BenchConfig
from hilal.bench.frontier import bench_frontier
from hilal.bench.hessian import _hessian_one, agreement, bench_hessian, hvp_costs, joint_estimates, pyhessian_estimates
from hilal.bench.search import bench_search, warm_up, warm_up_model
from hilal.bench.tables import (
    TARGET_SPEEDUP,
    load_bench,
    markdown,
    markdown_from_json,
    search_criteria,
    search_records,
    table,
)

__all__ = [
    "BENCHES", "KINDS", "TARGET_SPEEDUP", "BenchConfig", "_analog_one", "_hessian_one", "agreement", "bench_analog",
    "bench_frontier", "bench_hessian", "bench_search", "hvp_costs", "joint_estimates", "load_bench", "main", "markdown",
    "markdown_from_json", "pyhessian_estimates", "run_args", "run_bench", "script", "search_criteria",
    "search_records", "table", "warm_up", "warm_up_model",
]
