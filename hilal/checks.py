"""Checks of user input made before any work: counts, numbers in a range, seed lists, the files a run reads and
the file it writes, and records that must be finite before they are written (docs/design.md, "Reliability and
security"). Every failure is a one-line :class:`~hilal.registry.HilalError` naming the problem and what is valid.
Pure Python: the command checks its options with these before importing torch."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hilal.registry import HilalError


def check_count(name: str, value: Any, minimum: int = 1, allow: Iterable[int] = ()) -> int:
    """``value`` if it is a whole number >= ``minimum`` (or one of ``allow``, such as -1 for "all"), else a
    HilalError naming ``name`` and the valid range."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= minimum or value in tuple(allow))
    if not ok:
        extra = "".join(f" or {a}" for a in allow)
        raise HilalError(f"{name} must be a whole number >= {minimum}{extra}; got {value!r}")
    return value


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` if it is a finite number in [``low``, ``high``] (``low_open``: > ``low``), else a HilalError
    naming ``name`` and the valid range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        rng = " and ".join(p for p in (lo, hi) if p)
        raise HilalError(f"{name} must be a finite number{' ' + rng if rng else ''}; got {value!r}")
    return float(value)


def parse_ints(name: str, text: str, minimum: int = 0) -> tuple[int, ...]:
    """A comma-separated list of whole numbers >= ``minimum`` (``"0,1,2"``), e.g. ``--seeds``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise HilalError(f"{name} must be comma-separated whole numbers such as 0,1,2; got {text!r}") from None
    bad = [v for v in values if v < minimum]
    if bad:
        raise HilalError(f"{name} must be whole numbers >= {minimum}; got {text!r}")
    if len(set(values)) != len(values):
        raise HilalError(f"{name} lists a number twice; got {text!r}")
    return values


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return kind
    return "special file"


def regular_target(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` if it may be replaced by a new regular file: absent, or a regular file that is no symbolic link.
    A directory, FIFO, device, socket or link is refused (an atomic write would replace the entry itself)."""
    p = Path(path)
    try:
        mode = os.lstat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return p
    if not stat.S_ISREG(mode):
        raise HilalError(f"{what} {p} is a {_kind(mode)}, not a regular file; name a file to write")
    return p


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """A file the run will write at its end, checked before the work: a regular file or absent
    (:func:`regular_target`), in a folder that exists (or can be made) and can be written."""
    p = regular_target(path, what)
    if not p.name or str(path).endswith(os.sep):
        raise HilalError(f"{what} {path!r} names a folder; give a file name such as result.json")
    parent = p.parent if str(p.parent) else Path(".")
    existing = next((d for d in (parent, *parent.parents) if d.exists()), Path("."))
    if not existing.is_dir():
        raise HilalError(f"{what} {p}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HilalError(f"{what} {p}: the folder {existing} is not writable")
    return p


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """A file the run reads: it must exist and be a regular file (a link to one is followed)."""
    p = Path(path)
    if not p.exists():
        raise HilalError(f"{what} {p} does not exist")
    if not p.is_file():
        raise HilalError(f"{what} {p} is a {_kind(os.stat(p).st_mode)}, not a regular file")
    if not os.access(p, os.R_OK):
        raise HilalError(f"{what} {p} is not readable")
    return p


def check_folder(path: str | os.PathLike, what: str) -> Path:
    """A folder the run writes into: absent (it is made) or a directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise HilalError(f"{what} {p} exists and is not a folder")
    return p


def check_mapping(what: str, value: Any) -> dict[str, Any]:
    """``value`` as a dict (None: empty) if it is a mapping, such as a section of a YAML file, else a HilalError
    naming ``what`` and what it is instead."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HilalError(f"{what} must be a mapping of names to values; got a {type(value).__name__}: {value!r}"[:300])
    return dict(value)


def nonfinite(obj: Any, where: str = "") -> str | None:
    """The path (``history[3].score``) of the first NaN or infinite number in a JSON-like record, or None."""
    if isinstance(obj, float) or (hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0):
        try:
            return None if math.isfinite(float(obj)) else where or "value"
        except (TypeError, ValueError):
            return None
    if isinstance(obj, dict):
        items: Iterable[tuple[str, Any]] = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((p for p in (nonfinite(v, k) for k, v in items) if p), None)


def check_finite_record(obj: Any, what: str = "the result") -> Any:
    """``obj`` if it holds no NaN or infinite number, else a HilalError naming the first one (nothing is
    written: a result with a non-finite score is no result)."""
    bad = nonfinite(obj)
    if bad:
        raise HilalError(f"{what} holds a non-finite number at {bad}; nothing was written (check the checkpoint, "
                         "the data and the settings)")
    return obj
