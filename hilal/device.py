"""Where models and batches live: the device helpers every layer of the package shares.

A bottom-layer module (docs/design.md, "one-way layer order"), so that data, models, analog and the layers
above them move batches and find a model's device without importing :mod:`hilal.train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def default_device() -> torch.device:
    """CUDA where a GPU is present, else the CPU: where the kit puts a model nobody placed."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device``: a tensor, a list / tuple of them (kept as its type) or a
    mapping of names to them (a QA batch); anything else is returned as it is."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch.to(device) if torch.is_tensor(batch) else batch


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global random state torch's CPU generator and, on CUDA, the device's generator are in."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    """Restores a state from :func:`rng_state`."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
