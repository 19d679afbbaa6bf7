"""Where data, checkpoints and figures live. Override with HILAL_DATA_DIR / HILAL_FIGURES_DIR."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import torch

import hilal
from hilal.runtime import machine_info

_PKG = Path(__file__).resolve().parent


def project_root() -> Path:
    """The checkout's root when running from a clone, else the current directory."""
    root = _PKG.parent
    if (root / "pyproject.toml").exists() and (root / "notebooks").exists():
        return root
    return Path.cwd()


def data_dir() -> Path:
    """``HILAL_DATA_DIR``, else the checkout's ``data/`` (created)."""
    p = Path(os.environ.get("HILAL_DATA_DIR", project_root() / "data"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def figures_dir() -> Path:
    p = Path(os.environ.get("HILAL_FIGURES_DIR", project_root() / "figures"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def offline() -> bool:
    """True when downloads must not be attempted (HILAL_OFFLINE=1)."""
    return os.environ.get("HILAL_OFFLINE", "0") not in ("", "0", "false", "False")


def pretrained_source(name: str) -> tuple[str, bool]:
    """Where Hugging Face weights or a tokenizer called ``name`` are read from: a folder ``name``, else
    ``data/models/<last part of name>``, else the hub id (its cache only, when offline). Returns the source
    and whether it is a local folder."""
    local = data_dir() / "models" / name.split("/")[-1]
    if Path(name).is_dir():
        return name, True
    if local.is_dir():
        return str(local), True
    return name, False


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ``write`` creates the temporary file itself, so it gets the mode of any new file (0666 less the umask);
    # mkstemp's 0600 would leave results and checkpoints unreadable to a group sharing the directory
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    return _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_json_dump(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temporary file + rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)

    return _atomic(Path(path), write)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` as UTF-8 atomically (temporary file + rename), newlines as given."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return _atomic(Path(path), write)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@functools.lru_cache(maxsize=4)
def code_fingerprint(root: Path | None = None) -> str:
    """The package version plus a hash of its source files (``root``: the package folder, subpackages such as
    ``mapping/`` included), part of every cache key: a stored mapping, metrics table or mapping journal is never
    reused across a change of the code."""
    root = Path(root or _PKG)
    h = hashlib.sha1()
    for rel in sorted(f.relative_to(root).as_posix() for f in root.rglob("*.py")):
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return f"{hilal.__version__}+{h.hexdigest()[:10]}"


DRYRUN_MARKER = "HILAL_DRYRUN.json"
"""The manifest :func:`hilal.dryrun.prepare` leaves in a data folder of synthetic files (and random weights)."""


def is_dryrun_dir(path: str | os.PathLike | None = None) -> bool:
    """Whether ``path`` (default: :func:`data_dir`) is a folder of :mod:`hilal.dryrun`'s synthetic data."""
    return (Path(path) if path is not None else data_dir()).joinpath(DRYRUN_MARKER).is_file()


PROVENANCE = "provenance.json"
"""The file in the figures folder that says, per notebook, from which code, on which machine and when its
figures were last written, and under which profile and parameters when ``hilal reproduce`` ran it."""


def source_revision(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The git commit of the checkout at ``root`` (``commit``) and whether tracked files other than ``figures/``
    differ from it (``modified``); both None where ``root`` is not the top of a git checkout or git is missing.
    The default ``root`` is the folder holding this package: the kit's checkout when it runs from a clone or an
    editable install, never the repository a user's working directory happens to be in."""
    root = Path(root) if root is not None else _PKG.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return {"commit": None, "modified": None}
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)figures")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": bool(changed)}


def provenance_source(threads: int | None = None) -> dict[str, Any]:
    """The code (:func:`code_fingerprint`, :func:`source_revision`) and machine (:func:`hilal.runtime.machine_info`
    with ``threads`` in place of this process's torch threads when given, and the GPU where there is one, since
    the kit then runs on it) that results are written from."""
    machine = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    if threads is not None:
        machine["threads"] = threads
    return {"code": code_fingerprint(), **source_revision(), "machine": machine}


def read_provenance(figures: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Notebook number -> entry of the figures folder's :data:`PROVENANCE` ({} when it is missing or
    unreadable)."""
    path = Path(figures or figures_dir()) / PROVENANCE
    try:
        entries = json.loads(path.read_text())["notebooks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_provenance(notebook: str, entry: dict[str, Any], figures: str | os.PathLike | None = None) -> Path:
    """Replace ``notebook``'s entry in the figures folder's :data:`PROVENANCE`, keeping the others (atomic; an
    unreadable file is started afresh). Read and write hold a lock on ``provenance.json.lock``, so that notebooks
    finishing at once in parallel processes (``hilal reproduce --workers``) keep each other's entries."""
    folder = Path(figures or figures_dir())
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{PROVENANCE}.lock", "a") as lock:
        try:
            import fcntl  # POSIX; elsewhere the notebooks run one at a time

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:
            pass
        entries = read_provenance(folder) | {notebook: entry}
        return atomic_json_dump({"notebooks": dict(sorted(entries.items()))}, folder / PROVENANCE)
