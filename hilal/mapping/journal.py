"""Model snapshots and the resumable journal: a ``--workdir`` folder where every finished step of a mapping is
recorded (with the weights of the models it kept), so that an interrupted mapping started again with the same
settings and code replays those steps from disk instead of redoing them."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from aihwkit.optim.context import AnalogContext
from torch import nn

from hilal.mapping.config import MappingConfig
from hilal.paths import atomic_json_dump, atomic_torch_save, code_fingerprint, file_digest, load_tensors, set_aside
from hilal.registry import HilalError


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
    journal beside the old one instead of replaying steps the old code took).

    Nothing in it is trusted blindly: the index records each weights file's size and SHA-256, weights load with
    ``weights_only`` (never pickled code), and a damaged index or a missing, changed or unreadable weights file
    is named on stderr and set aside; its step and every later one are then recomputed."""

    def __init__(self, workdir: str | None, method: str, cfg: MappingConfig, tag: str) -> None:
        self.dir = Path(workdir) / _safe(f"{method}-{tag}-{cfg.key()}-{code_fingerprint()}") if workdir else None
        self.steps: dict[str, Any] = {}
        self.files: dict[str, dict[str, Any]] = {}
        index = self.dir / "journal.json" if self.dir else None
        if index is not None and index.exists():
            try:
                doc = json.loads(index.read_text())
                if doc.get("version") != _VERSION or not isinstance(doc.get("steps"), dict):
                    raise ValueError("not a journal of this kind")
                self.steps, self.files = doc["steps"], dict(doc.get("files") or {})
            except (ValueError, AttributeError, OSError):
                set_aside(index, "is damaged (not a journal index)")

    def get(self, key: str) -> Any:
        """The record of finished step ``key``, or None (also when its weights file is missing or damaged:
        then this step and the later ones are dropped, to be recomputed)."""
        if key not in self.steps:
            return None
        kept = isinstance(self.steps[key], dict) and self.steps[key].get("kept")  # a kept step has its weights
        if (key in self.files or kept) and self.dir is not None:
            path = self.dir / f"{_safe(key)}.pt"
            why = None
            if not path.exists():
                why = "is missing"
            elif key not in self.files:
                why = "has no size and checksum in its journal"
            elif file_digest(path) != self.files[key]:
                why = "does not match the size and checksum its journal recorded"
            if why is not None:
                if path.exists():
                    set_aside(path, why)
                else:
                    print(f"hilal: warning: {path} {why}; recomputing step {key!r} and the later ones",
                          file=sys.stderr, flush=True)
                self._drop_from(key)
                return None
        return self.steps[key]

    def _drop_from(self, key: str) -> None:
        keys = list(self.steps)
        for k in keys[keys.index(key):]:
            self.steps.pop(k)
            self.files.pop(k, None)
        self._write()

    def put(self, key: str, value: Any, model: nn.Module | None = None) -> None:
        """Record step ``key`` as finished with ``value`` (JSON), and ``model``'s weights when given."""
        self.steps[key] = value
        if self.dir is None:
            return
        if model is not None:
            path = atomic_torch_save(snapshot(model), self.dir / f"{_safe(key)}.pt")
            self.files[key] = file_digest(path)
        else:
            self.files.pop(key, None)
        self._write()

    def _write(self) -> None:
        if self.dir is not None:
            atomic_json_dump({"version": _VERSION, "steps": self.steps, "files": self.files},
                             self.dir / "journal.json")

    def load_model(self, key: str, model: nn.Module) -> bool:
        """Restore the weights recorded with step ``key`` into ``model``; False when there are none. A file that
        cannot be read or does not fit is a HilalError naming it (:meth:`get` has checked its checksum)."""
        path = self.dir / f"{_safe(key)}.pt" if self.dir else None
        if path is None or key not in self.files or not path.exists():  # only files the index vouches for
            return False
        snap = load_tensors(path, "cpu", "journal weights")
        try:
            restore(model, snap)
        except (KeyError, RuntimeError, TypeError) as e:
            raise HilalError(f"journal weights {path} do not fit the model ({type(e).__name__}); delete "
                             f"{self.dir} to start this mapping afresh") from None
        return True


_VERSION = 2
"""Format of ``journal.json``: ``{"version", "steps": {key: record}, "files": {key: {"size", "sha256"}}}``."""


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
