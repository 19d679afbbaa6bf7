"""What a mapping run did and where its time went: one history row per step (replayed ones included), the
retraining rounds, and the timings. ``search_s`` is the time spent deciding (curvature metrics, ordering,
clustering, zero-shot screens, and retraining rounds whose result was rejected), ``mapping_s`` the retraining
whose result was kept, ``eval_s`` the final evaluation, ``total_s`` everything including the floating-point
baseline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm


class Ledger:
    """The history, round count and timings of one run, kept apart from the steps that produce them so that
    each step records itself the same way (:meth:`record`)."""

    def __init__(self, method: str, progress: bool) -> None:
        self.t0 = time.perf_counter()
        self.method, self.progress = method, progress
        self.rows: list[dict[str, Any]] = []
        self.rounds = 0
        self.timings = {"search_s": 0.0, "mapping_s": 0.0, "eval_s": 0.0}

    def record(self, key: str, layers: list[str], done: dict[str, Any], kept: bool, floor: float,
               replayed: bool = False) -> None:
        """Append step ``key``'s row from ``done`` (its journal record) and count its rounds, and its seconds
        as mapping time when its result was ``kept``, else as search time; with ``progress``, print it."""
        self.rounds += done["rounds"]
        self.timings["mapping_s" if kept else "search_s"] += done["seconds"]
        self.rows.append({"step": key, "layers": ",".join(layers), "score": done["score"],
                          "zero_shot": done.get("zero_shot"), "zero_shot_se": done.get("zero_shot_se"),
                          "best_round": done.get("best_round"),
                          "floor": floor, "rounds": done["rounds"],
                          "seconds": done["seconds"], "kept": kept, "replayed": replayed})
        s, rounds, seconds = done["score"], done["rounds"], done["seconds"]
        verdict = "kept" if kept else "zero-shot" if not rounds else "rejected"
        if self.progress:
            tqdm.write(f"[{self.method}] {key}: +{layers} score={s:.4f} floor={floor:.4f} "
                       f"{verdict} ({rounds} rounds, {seconds:.1f}s)")

    def timed_search(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, its time counted as search (a method's metrics, ordering or clustering)."""
        t = time.perf_counter()
        out = fn()
        self.timings["search_s"] += time.perf_counter() - t
        return out

    def credit_mapping(self, seconds: float) -> None:
        """Move ``seconds`` from search to mapping: a rejected stage's retraining whose result was kept after
        all (a trimmed subset of it)."""
        self.timings["search_s"] -= seconds
        self.timings["mapping_s"] += seconds

    def close(self, eval_s: float) -> dict[str, float]:
        """The timings once the final evaluation took ``eval_s``, ``total_s`` counted from the run's start
        (rounded to milliseconds)."""
        self.timings["eval_s"] = eval_s
        self.timings["total_s"] = time.perf_counter() - self.t0
        return {k: round(v, 3) for k, v in self.timings.items()}
