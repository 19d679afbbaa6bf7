"""Per-batch curvature state (autograd graphs, layer inputs, Gauss-Newton signals) under a memory budget.

The curvature estimators of :mod:`hilal.hessian` run over the calibration batches many times (probes, power
iterations, noise draws). Keeping every batch's graph makes memory grow with the number of calibration
samples; rebuilding every graph for every product costs a forward and backward pass each time. A
:class:`BatchCache` keeps the state of the batches it builds while a shared :class:`GraphBudget` allows and
rebuilds the others whenever they are asked for, so memory stays bounded by the budget plus one batch, and
the estimators (which loop batches outermost wherever they can) pay one rebuild per pass over the data
(see docs/design.md for the estimators). A rebuilt batch computes exactly what the kept one did, so
the estimates do not depend on the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from hilal.registry import HilalError

T = TypeVar("T")

DEFAULT_GRAPH_BYTES = 2**31


def check_graph_bytes(value: object) -> float:
    """``value`` as a float if it is a byte count >= 0 (``math.inf``: keep everything), else a HilalError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and value >= 0
    if not ok:
        raise HilalError(f"graph_bytes must be a number of bytes >= 0 (0: rebuild every batch, math.inf: keep "
                         f"every batch), got {value!r}")
    return float(value)


class GraphBudget:
    """Bytes that kept per-batch state may hold, shared by the operators of one measurement."""

    def __init__(self, total: float = DEFAULT_GRAPH_BYTES) -> None:
        self.total = check_graph_bytes(total)
        self.used = 0
        self.peak = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; whether they did."""
        if self.used + nbytes > self.total:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        """Return bytes reserved by :meth:`take`."""
        self.used -= nbytes


def as_budget(budget: GraphBudget | float) -> GraphBudget:
    """A budget as given, or a new one of that many bytes."""
    return budget if isinstance(budget, GraphBudget) else GraphBudget(budget)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return str(t.device), st.data_ptr()


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def tensor_bytes(kept: Any, model: nn.Module | None = None) -> int:
    """Bytes of the storages of the tensors in ``kept``, each once, those of ``model``'s parameters and
    buffers not at all."""
    skip = set() if model is None else {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[tuple[str, int], int] = {}
    for t in tensors_in(kept):
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


_SAVED_NAMES: dict[type, list[str]] = {}


def _saved(node: Any) -> Iterator[Any]:
    """What an autograd node keeps for backward: its ``_saved_*`` values (torch's own nodes) or, for a custom
    Function's node, its saved tensors and the attributes its ``forward``/``backward`` set on it."""
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = _SAVED_NAMES[type(node)] = [n for n in dir(node) if n.startswith("_saved_")]
    for name in names:
        try:
            yield getattr(node, name)
        except RuntimeError:  # already freed
            continue
    if hasattr(node, "saved_tensors"):  # a custom Function (the node is its ctx)
        try:
            yield node.saved_tensors
        except RuntimeError:
            pass
        yield from getattr(node, "__dict__", {}).values()


def graph_bytes(roots: Any, model: nn.Module | None = None) -> int:
    """Bytes a graph holds for backward: the storages saved by every node reachable from the tensors in
    ``roots`` (each once; ``model``'s parameters and buffers not at all), plus those of ``roots``. Walks the
    graph instead of hooking the saves: a saved-tensor hook that keeps the tensor would tie each node to its
    saved outputs in a cycle the garbage collector cannot see."""
    skip = set() if model is None else {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    sizes: dict[tuple[str, int], int] = {}

    def add(obj: Any) -> None:
        for t in tensors_in(obj):
            key = _storage_key(t)
            if key not in skip:
                sizes[key] = t.untyped_storage().nbytes()

    add(roots)
    stack = [t.grad_fn for t in tensors_in(roots) if t.grad_fn is not None]
    visited: dict[int, Any] = {}  # holds the nodes walked, so their ids stay theirs
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited[id(node)] = node
        for value in _saved(node):
            add(value)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return sum(sizes.values())


class StateMeter:
    """Bytes a batch's state holds once built: on CUDA the growth of allocated memory over the ``with``
    block; elsewhere :func:`graph_bytes` of the tensors passed to :meth:`total` (the graph behind them and
    themselves)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cuda = device.type == "cuda"
        self._start = self._end = 0

    def __enter__(self) -> StateMeter:
        if self.cuda:
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end = torch.cuda.memory_allocated(self.device)

    def total(self, kept: Any) -> int:
        """Bytes of the block's state, ``kept`` being the tensors the caller keeps from it."""
        if self.cuda:
            return max(0, self._end - self._start)
        return graph_bytes(kept, self.model)


class BatchCache(Generic[T]):
    """The states of numbered batches: ``build(i, measure)`` makes batch i's state and returns it with its size
    in bytes (measured only where ``measure``: while the budget has room); states are kept, first come first
    kept, while ``budget`` allows, and built again whenever asked for beyond it. ``builds`` counts calls of
    ``build``."""

    def __init__(self, build: Callable[[int, bool], tuple[T, int]],
                 budget: GraphBudget | float = math.inf) -> None:
        self._build = build
        self.budget = as_budget(budget)
        self.kept: dict[int, tuple[T, int]] = {}
        self.builds = 0

    def get(self, i: int) -> T:
        """Batch i's state, kept or built now."""
        if i in self.kept:
            return self.kept[i][0]
        room = self.budget.used < self.budget.total
        state, nbytes = self._build(i, room)
        self.builds += 1
        if room and self.budget.take(nbytes):
            self.kept[i] = (state, nbytes)
        return state

    def release(self) -> None:
        """Drops the kept states and returns their bytes to the budget."""
        for _, nbytes in self.kept.values():
            self.budget.give(nbytes)
        self.kept.clear()


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``size`` covering ``range(n)``."""
    size = max(1, int(size))
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, 0)]


def rows(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch ((inputs, labels, ...) or a dict); the batch itself when that is all."""
    if isinstance(batch, dict):
        n = int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
        if start == 0 and stop == n:
            return batch
        return {k: v[start:stop] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
    if start == 0 and stop == int(batch[0].shape[0]):
        return batch
    return type(batch)(b[start:stop] if torch.is_tensor(b) else b for b in batch)


class PerBatch(Sequence[T]):
    """A read-only sequence whose item b is ``get(b)``, computed when asked for (nothing is held)."""

    def __init__(self, count: int, get: Callable[[int], T]) -> None:
        self._count, self._get = count, get

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, b: int) -> T:  # type: ignore[override]
        if not -self._count <= b < self._count:
            raise IndexError(b)
        return self._get(b % self._count)


def held_groups(draws: Iterable[T], nbytes: Callable[[T], int], hold_bytes: float) -> Iterator[list[T]]:
    """The draws in consecutive groups of at most ``hold_bytes`` (at least one draw each)."""
    group: list[T] = []
    held = 0
    for d in draws:
        size = nbytes(d)
        if group and held + size > hold_bytes:
            yield group
            group, held = [], 0
        group.append(d)
        held += size
    if group:
        yield group
