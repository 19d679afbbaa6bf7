"""``analog`` benchmark: forward time of the all-analog aihwkit model versus the digital one, one drift
evaluation next to one digital evaluation, and a noisy evaluation of ``eval_reps`` programmings on each engine
(``loop`` against ``batched``, :mod:`hilal.batched_eval`) side by side, on the dataset and on CIFAR-shaped
inputs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hilal.bench.config import BenchConfig, _clock, _median, _registered, _trained


def bench_analog(cfg: BenchConfig, notes: list[str], progress: bool = True) -> Iterator[dict[str, Any]]:
    """One record per model: median time of ``forward_iters`` forward passes of the digital model and of the
    all-analog model (eval mode, unprogrammed), and of one drift evaluation (``noisy_scores`` with
    ``reps=1`` on the test split) next to one digital evaluation; and of a ``noisy_scores`` evaluation of
    ``eval_reps`` programmings with ``engine="loop"`` and ``engine="batched"`` in turn (``eval_loop_s``,
    ``eval_batched_s``, ``eval_speedup``; ``eval_equal``: the same scores), also on ``cifar_samples`` random
    3x32x32 inputs with an untrained model of the same architecture (``cifar_`` keys)."""
    from hilal.data import load_dataset, loader  # local: the report loads hilal.bench without the kit

    splits = load_dataset(cfg.dataset, seed=cfg.seed)
    x = next(iter(loader(splits.test, batch_size=cfg.batch_size)))[0]
    for name in _registered(cfg.models, notes):
        yield _analog_one(name, splits, x, cfg, progress)


def _analog_one(name: str, splits: Any, x: torch.Tensor, cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    from hilal.analog import mappable_layers, to_analog  # local: the report loads hilal.bench without the kit
    from hilal.evaluate import noisy_scores
    from hilal.models import model_for
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
    rec |= _engines(analog, splits, cfg)
    if cfg.cifar_samples:
        shaped = _cifar_shaped(cfg.cifar_samples, cfg.seed)
        torch.manual_seed(cfg.seed)
        net = to_analog(model_for(name, shaped).to(cfg.device).eval(), mappable_layers(model), cfg.preset)
        rec |= {f"cifar_{k}": v for k, v in _engines(net, shaped, cfg).items()}
    if progress:
        print(f"[bench analog] {name}: digital {rec['digital_s'] * 1e3:.2f} ms, analog "
              f"{rec['analog_s'] * 1e3:.2f} ms, drift eval {rec['drift_eval_s']:.3f}s, {cfg.eval_reps} programmings "
              f"{rec['eval_loop_s']:.2f}s loop / {rec['eval_batched_s']:.2f}s batched", flush=True)
    return rec


def _engines(analog: nn.Module, splits: Any, cfg: BenchConfig) -> dict[str, Any]:
    """Median times of one ``eval_reps``-programming evaluation on the test split per engine, run in turns."""
    from hilal.evaluate import noisy_scores  # local: the report loads hilal.bench without the kit

    t: dict[str, list[float]] = {"loop": [], "batched": []}
    scores: dict[str, Any] = {}
    for r in range(cfg.repeats):
        for engine in t:
            dt, scores[engine] = _clock(lambda e=engine, r=r: noisy_scores(analog, splits, cfg.t_inference,
                                                                           cfg.eval_reps, cfg.seed + r, engine=e))
            t[engine].append(dt)
    out = {"eval_reps": cfg.eval_reps, "eval_loop_s": _median(t["loop"]), "eval_batched_s": _median(t["batched"]),
           "eval_equal": bool(np.array_equal(scores["loop"], scores["batched"]))}
    out["eval_speedup"] = out["eval_loop_s"] / out["eval_batched_s"]
    return out


def _cifar_shaped(samples: int, seed: int) -> Any:
    """Splits of random 3x32x32 inputs (``samples`` in each split) with random labels of 10 classes."""
    from torch.utils.data import TensorDataset

    from hilal.data import Splits  # local: the report loads hilal.bench without the kit

    g = torch.Generator().manual_seed(seed)
    parts = [TensorDataset(torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, 10, (samples,), generator=g))
             for _ in range(3)]
    return Splits("cifar_shape", *parts, in_channels=3, image_size=32, num_classes=10)
