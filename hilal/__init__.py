"""hilal: Hessian-informed layer allocation for heterogeneous analog-digital inference.

The package is thin on purpose: one module per concern (docs/design.md).
"""

from hilal.registry import HilalError

__all__ = ["HilalError"]
__version__ = "0.1.0"
