"""Model snapshots and the resumable journal: a ``--workdir`` folder where every finished step of a mapping is
recorded (with the weights of the models it kept), so that an interrupted mapping started again with the same
settings and code replays those steps from disk instead of redoing them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from aihwkit.optim.context import AnalogContext
from torch import nn

from hilal.mapping.config import MappingConfig
from hilal.paths import atomic_json_dump, atomic_torch_save, code_fingerprint


def _weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers, keyed ``p:``/``b:``, without aihwkit's ``AnalogContext`` placeholders (they hold
    no data; the tile weights are their own parameters, and aihwkit 1.2 refuses to read a placeholder)."""
    for k, v in model.named_parameters():
        if not isinstance(v, AnalogContext):
            yield f"p:{k}", v
    for k, v in model.named_buffers():
        yield f"b:{k}", v


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (cheaper than a state_dict of an aihwkit model)."""
    return {k: v.detach().clone() for k, v in _weights(model)}


@torch.no_grad()
def restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot` back into a model of the same structure."""
    for k, v in _weights(model):
        if k.startswith("p:") or k in snap:  # every parameter must be there; buffers may be new
            v.copy_(snap[k])


class Journal:
    """Resumable record of finished steps: one JSON index plus one weights file per kept model, in a folder
    keyed by the method, model, settings and code version (a change of the package's source starts a fresh
    journal beside the old one instead of replaying steps the old code took)."""

    def __init__(self, workdir: str | None, method: str, cfg: MappingConfig, tag: str) -> None:
        self.dir = Path(workdir) / _safe(f"{method}-{tag}-{cfg.key()}-{code_fingerprint()}") if workdir else None
        self.steps: dict[str, Any] = {}
        if self.dir and (self.dir / "journal.json").exists():
            self.steps = json.loads((self.dir / "journal.json").read_text())

    def get(self, key: str) -> Any:
        """The record of finished step ``key``, or None."""
        return self.steps.get(key)

    def put(self, key: str, value: Any, model: nn.Module | None = None) -> None:
        """Record step ``key`` as finished with ``value`` (JSON), and ``model``'s weights when given."""
        self.steps[key] = value
        if self.dir is None:
            return
        if model is not None:
            atomic_torch_save(snapshot(model), self.dir / f"{_safe(key)}.pt")
        atomic_json_dump(self.steps, self.dir / "journal.json")

    def load_model(self, key: str, model: nn.Module) -> bool:
        """Restore the weights recorded with step ``key`` into ``model``; False when there are none."""
        path = self.dir / f"{_safe(key)}.pt" if self.dir else None
        if path is None or not path.exists():
            return False
        restore(model, torch.load(path, map_location="cpu", weights_only=False))
        return True


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
