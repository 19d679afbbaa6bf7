"""hilal: Hessian-informed layer allocation for heterogeneous analog-digital inference.

The public API is :func:`analyze` (per-layer curvature, expected loss under analog noise, robust/sensitive
clusters) and :func:`allocate` (map a network with HILAL, LionHeart or a baseline), both on the user's own
model and data (:mod:`hilal.api`). One module per concern; the layer order is in docs/design.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hilal.registry import HilalError

if TYPE_CHECKING:
    from hilal.api import allocate, analyze

__all__ = ["HilalError", "allocate", "analyze"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``hilal.analyze`` and ``hilal.allocate`` import torch and aihwkit on first use, so that ``import hilal``
    (the command line's start, ``hilal.registry``) stays light."""
    if name in ("analyze", "allocate"):
        from hilal import api

        return getattr(api, name)
    raise AttributeError(f"module 'hilal' has no attribute {name!r}")
