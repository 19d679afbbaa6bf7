"""``analog`` benchmark: forward time of the all-analog aihwkit model versus the digital one, and one drift
evaluation next to one digital evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hilal.bench.config import BenchConfig, _clock, _median, _registered, _trained


def bench_analog(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model: median time of ``forward_iters`` forward passes of the digital model and of the
    all-analog model (eval mode, unprogrammed), and of one drift evaluation (``noisy_scores`` with
    ``reps=1`` on the test split) next to one digital evaluation."""
    from hilal.data import load_dataset, loader  # local: the report loads hilal.bench without the kit

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    x = next(iter(loader(splits.test, batch_size=cfg.batch_size)))[0]
    for name in _registered(cfg.models, notes):
        yield _analog_one(name, splits, x, cfg, progress)


def _analog_one(name: str, splits: Any, x: torch.Tensor, cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    from hilal.analog import mappable_layers, to_analog  # local: the report loads hilal.bench without the kit
    from hilal.evaluate import noisy_scores
    from hilal.train import score

    model = _trained(name, splits, cfg.seed, cfg.device)
    x = x.to(cfg.device)
    analog = to_analog(model, mappable_layers(model), cfg.preset).eval()

    @torch.no_grad()
    def forwards(m: nn.Module) -> None:
        for _ in range(cfg.forward_iters):
            m(x)

    forwards(model), forwards(analog)  # warm-up
    t: dict[str, list[float]] = {"digital": [], "analog": [], "drift": [], "digital_eval": []}
    for r in range(cfg.repeats):
        t["digital"].append(_clock(lambda: forwards(model))[0] / cfg.forward_iters)
        t["analog"].append(_clock(lambda: forwards(analog))[0] / cfg.forward_iters)
        t["digital_eval"].append(_clock(lambda: score(model, splits, "test"))[0])
        t["drift"].append(_clock(lambda r=r: noisy_scores(analog, splits, cfg.t_inference, 1, cfg.seed + r))[0])
    rec = {"model": name, "dataset": cfg.dataset, "preset": cfg.preset, "batch": int(x.shape[0]),
           "layers": len(mappable_layers(model)), "digital_s": _median(t["digital"]),
           "analog_s": _median(t["analog"]), "drift_eval_s": _median(t["drift"]),
           "digital_eval_s": _median(t["digital_eval"])}
    rec["overhead"] = rec["analog_s"] / rec["digital_s"]
    rec["drift_eval_overhead"] = rec["drift_eval_s"] / rec["digital_eval_s"]
    if progress:
        print(f"[bench analog] {name}: digital {rec['digital_s'] * 1e3:.2f} ms, analog "
              f"{rec['analog_s'] * 1e3:.2f} ms, drift eval {rec['drift_eval_s']:.3f}s", flush=True)
    return rec
