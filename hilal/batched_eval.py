"""Many programmings of one analog network scored in one batched pass: the evaluation engine of
:func:`hilal.evaluate.noisy_metrics` and every caller of it.

Each programming (:func:`capture`, a :class:`hilal.batched_tile.Programming`) is drawn through aihwkit as the
loop draws it (seeded ``program_analog_weights`` + ``drift_analog_weights``) and keeps each tile's weights,
its drift-compensation factor and torch's random state after it. :func:`per_programming` runs the evaluation
function once per programming, side by side in lock-step threads, each in its programming's random state (so
draws outside the model, such as a data loader's seed, land where the loop's do); each round of their model
calls is one pass of the network over all programmings' inputs stacked along the batch, whose analog layers
compute every programming's tile forward at once (:func:`hilal.batched_tile.layer_forward`). The same
operations on the same numbers: the results equal the loop's, and so does the random state afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from aihwkit.nn import AnalogConv2d, AnalogLinear
from aihwkit.simulator.parameters.enums import AnalogMVType
from aihwkit.simulator.tiles.inference_torch import TorchInferenceTile
from torch import nn

from hilal.analog import ANALOG_TYPES
from hilal.batched_tile import Pass, Programming, TooBig, layer_forward, layer_tiles
from hilal.device import model_device, rng_state, set_rng_state
from hilal.registry import HilalError, check_choice

ENGINES = ("batched", "loop")
"""``batched``: :func:`per_programming`; ``loop``: one network pass per programming (the reference path)."""
MAX_BYTES = 2.0**31
"""Default bound on one analog layer's batched activations: more programmings than fit run in turns."""


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`, else a one-line HilalError."""
    return check_choice("engine", engine, ENGINES)


def capture(model: nn.Module) -> Programming:
    """The current programming of ``model``'s tiles and the random state after it (call right after
    programming and drift)."""
    device = model_device(model)
    tiles = layer_tiles(model)
    alphas = [torch.as_tensor(t.alpha).detach().clone() if _compensated(t) else None for t in tiles]
    return Programming([t.tile.weight.detach().clone() for t in tiles], alphas, rng_state(device), device)


def _compensated(tile: Any) -> bool:
    return getattr(tile.rpu_config, "drift_compensation", None) is not None


def unsupported(model: nn.Module) -> str | None:
    """Why :func:`per_programming` cannot evaluate ``model`` (``None`` when it can): analog layers other than
    Linear / unfolded Conv2d, tiles other than aihwkit's torch inference tile, or IO settings that draw
    from torch's global random state (input noise, stochastic rounding) or per-output noise values."""
    for name, m in model.named_modules():
        if isinstance(m, ANALOG_TYPES) and not isinstance(m, AnalogConv2d | AnalogLinear):
            return f"{name}: {type(m).__name__} layers are not batched"
        if isinstance(m, AnalogConv2d) and m.groups != 1:
            return f"{name}: grouped convolutions are not batched"
    for t in layer_tiles(model):
        io = t.rpu_config.forward
        if type(t) is not TorchInferenceTile or getattr(t, "input_range", None) is not None or t.analog_bias:
            return f"{type(t).__name__} tiles (input ranges, analog bias) are not batched"
        if io.mv_type != AnalogMVType.ONE_PASS or io.inp_noise > 0 or io.inp_sto_round or io.out_sto_round:
            return "input noise, stochastic rounding and multi-pass MVMs are not batched"
        if t.tile.out_noise_values is not None:
            return "per-output noise values (out_noise_std) are not batched"
    return None


@contextmanager
def _batched_layers(model: nn.Module, run: Pass) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, ANALOG_TYPES)]
    for m in layers:
        m.forward = lambda x, m=m: layer_forward(m, run, x)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _cat(parts: Sequence[Any]) -> Any:
    """The programmings' inputs of one call as one input, stacked along the batch dimension."""
    first = parts[0]
    if torch.is_tensor(first):
        if any(p.shape != first.shape for p in parts):
            raise HilalError("the repetitions called the model with inputs of different shapes")
        return torch.cat(list(parts)) if first.dim() and len(parts) > 1 else first
    if isinstance(first, dict):
        out = {k: _cat([p[k] for p in parts]) for k in first}
        return out if type(first) is dict else type(first)(out)
    if isinstance(first, list | tuple):
        return type(first)(_cat(list(p)) for p in zip(*parts, strict=True))
    return first


def _split(obj: Any, r: int) -> list[Any]:
    """``obj`` (outputs of a pass over R programmings' inputs) as R per-programming outputs."""
    if torch.is_tensor(obj):
        if obj.dim() == 0 or obj.shape[0] % r:
            raise HilalError(f"an output of shape {tuple(obj.shape)} does not split into {r} programmings")
        return list(obj.chunk(r)) if r > 1 else [obj]
    if isinstance(obj, dict):
        parts = {k: _split(v, r) for k, v in obj.items()}
        each = [{k: v[i] for k, v in parts.items()} for i in range(r)]
        return each if type(obj) is dict else [type(obj)(**d) for d in each]
    if isinstance(obj, list | tuple):
        parts = [_split(v, r) for v in obj]
        return [type(obj)(p[i] for p in parts) for i in range(r)]
    return [obj] * r


def _forward(model: nn.Module, run: Pass, progs: Sequence[Programming], calls: Sequence[tuple]) -> list[Any]:
    """The model's outputs for each programming's call ``(args, kwargs)``, in passes of at most ``run.turn``
    programmings (halved while a layer would not fit); the programmings' random states advance."""
    while True:
        turn, outs, drawn = run.turn or len(progs), [], []
        try:
            for start in range(0, len(progs), turn):
                part = progs[start:start + turn]
                run.select(part)
                args, kwargs = _cat([c[0] for c in calls[start:start + turn]]), \
                    _cat([c[1] for c in calls[start:start + turn]])
                outs += _split(model(*args, **kwargs), len(part))
                drawn += zip(part, run.gens, strict=True)
        except TooBig:
            run.turn = max(1, turn // 2)
            continue
        for p, g in drawn:
            p.advance(g)
        return outs


class _Aborted(Exception):
    pass


class _Worker:
    """``fn`` for one programming, in a thread of its own that runs only while the coordinator waits: it runs
    with the programming's random state until it calls the model, then the coordinator answers the calls of
    all programmings in one pass."""

    def __init__(self, fn: Callable[[nn.Module], Any], model: nn.Module) -> None:
        self.fn, self.go, self.back = fn, threading.Semaphore(0), threading.Semaphore(0)
        self.call: tuple | None = None
        self.reply: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = self.abort = False
        self.stand_in = _StandIn(model, self)
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        self.go.acquire()
        try:
            self.result = self.fn(self.stand_in)
        except BaseException as e:  # handed to the coordinator
            self.error = e
        self.finished = True
        self.back.release()

    def ask(self, args: tuple, kwargs: dict) -> Any:
        """In the worker: hand over a call of the model and wait for its outputs."""
        self.call = (args, kwargs)
        self.back.release()
        self.go.acquire()
        if self.abort:
            raise _Aborted
        out, self.reply, self.call = self.reply, None, None
        return out

    def resume(self, prog: Programming) -> None:
        """In the coordinator: let the worker run, in ``prog``'s random state, to its next call or its end."""
        set_rng_state(prog.rng, prog.device)
        self.go.release()
        self.back.acquire()
        prog.rng = rng_state(prog.device)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.abort = True
            self.go.release()
            self.thread.join()


class _StandIn(nn.Module):
    """Stands for the model in one programming's ``fn``: a call goes to the coordinator."""

    def __init__(self, model: nn.Module, worker: _Worker) -> None:
        super().__init__()
        self.model = model
        self.__dict__["worker"] = worker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.worker.ask(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def per_programming(fn: Callable[[nn.Module], Any], model: nn.Module, progs: Sequence[Programming],
                    max_bytes: float = MAX_BYTES) -> list[Any]:
    """``fn(model)`` under each programming of ``progs`` (from :func:`capture`), as the loop gives it with the
    model programmed so: the ``fn`` s run side by side, each in its programming's random state, and every
    round of their model calls is answered by one batched pass (calls with inputs of one shape; at most about
    ``max_bytes`` per analog layer, more programmings than fit run in turns). Each programming's random state
    ends where the loop's would. Model in eval mode."""
    run = Pass(model, max_bytes)
    workers = [_Worker(fn, model) for _ in progs]
    try:
        alive = list(range(len(progs)))
        while alive:
            for i in alive:
                workers[i].resume(progs[i])
            alive = [i for i in alive if not workers[i].finished]
            if alive:
                with torch.no_grad(), _batched_layers(model, run):
                    outs = _forward(model, run, [progs[i] for i in alive], [workers[i].call for i in alive])
                for i, out in zip(alive, outs, strict=True):
                    workers[i].reply = out
    finally:
        for w in workers:
            w.stop()
    return [w.result for w in workers]
