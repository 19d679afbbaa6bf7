"""Where data, checkpoints and figures live. Override with HILAL_DATA_DIR / HILAL_FIGURES_DIR."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import torch

import hilal
from hilal.checks import regular_target
from hilal.registry import HilalError
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


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


STALE_TMP_S = 600.0
"""Age in seconds after which a temporary file whose writer's process id is not running here is removed (the age
spares a live writer on another machine sharing the folder)."""


def clean_stale_tmp(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files that killed atomic writes left in ``folder`` (of ``name`` only when given):
    those whose writing process is gone and that are older than :data:`STALE_TMP_S`. Returns what was
    removed."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for f in Path(folder).iterdir():
            m = _TMP.match(f.name)
            if (m and (name is None or m["name"] == name) and not _alive(int(m["pid"]))
                    and now - f.lstat().st_mtime > STALE_TMP_S):
                with contextlib.suppress(OSError):
                    f.unlink()
                    removed.append(f)
    return removed


def _atomic(path: Path, write) -> Path:
    path = regular_target(Path(path), "atomic write target")  # never replace a FIFO, device, link or folder
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent)  # what killed writes of any file here left behind
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
    text = json.dumps(obj, indent=2, default=_json_default)  # serialized first: a failure leaves no file behind

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

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


def jsonable(o: Any) -> Any:
    """A JSON-ready stand-in for ``o`` (``json.dumps(default=jsonable)``): a tensor or numpy value as a number
    or list, anything else as its string."""
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


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
    """Replace ``notebook``'s entry in the figures folder's :data:`PROVENANCE`, keeping the others (atomic, under
    a file lock so that concurrent writers keep each other's entries; an unreadable file is started afresh)."""
    path = Path(figures or figures_dir()) / PROVENANCE
    with locked(path):
        entries = read_provenance(figures) | {notebook: entry}
        return atomic_json_dump({"notebooks": dict(sorted(entries.items()))}, path)


# --- files that other processes share or that a run reads back ------------------------------------------------

@contextlib.contextmanager
def locked(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (the hidden file ``.<name>.lock`` beside it; filelock, released when
    the process dies) while reading, computing and writing it, so that concurrent writers never lose each other's
    entries and a cache entry is computed once. ``timeout`` in seconds (-1: wait as long as it takes; a wait is
    announced on stderr). In a folder that cannot be written, where nothing can be stored anyway, no lock is
    taken (reads stay safe: writes are atomic)."""
    path = Path(path)
    lock: filelock.FileLock | None = filelock.FileLock(str(path.parent / f".{path.name}.lock"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"hilal: waiting for another process writing {path}", file=sys.stderr, flush=True)
            lock.acquire(timeout=timeout)
    except filelock.Timeout:
        raise
    except OSError:  # (a read-only folder)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file: what a journal or cache records to recognize a missing or damaged one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def set_aside(path: str | os.PathLike, why: str) -> Path | None:
    """Rename a damaged file to ``<name>.corrupt-<time>`` (kept for a look, never read again) and say so in one
    line on stderr; returns the new path (None when it was already gone)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        aside = None
    print(f"hilal: warning: {path} {why}; set aside{f' as {aside.name}' if aside else ''}, recomputing",
          file=sys.stderr, flush=True)
    return aside


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and containers of them, never code
    (a pickle that names anything else is refused). A file that is missing, truncated, of another format or
    refused is a one-line HilalError naming it."""
    path = Path(path)
    if not path.is_file():
        raise HilalError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # (zip, pickle and refusal errors of every kind: all mean "not one of ours")
        text = str(e)
        if "Weights only load failed" in text:  # torch's refusal: keep its reason, not its advice
            parts = [p.strip() for p in text.split("\n\n") if p.strip()]
            text = "refused by the weights-only loader: " + " ".join(parts[1:-1] or parts[:1])
        else:
            text = f"{type(e).__name__}: {text}"
        raise HilalError(f"{what} {path} is not a readable weights file ({' '.join(text.split())[:200]}); only "
                         "tensors and plain containers are loaded, never pickled code") from None


def write_cached(entry: Any, path: str | os.PathLike, weights: Any = None) -> Path:
    """Store a cache entry: ``weights`` (tensors) in ``<path>.pt`` first, then the JSON ``entry`` with the
    weights file's size and checksum (:func:`file_digest`) in ``path``, both atomic; :func:`read_cached` reads
    it back."""
    path = Path(path)
    digest = None
    if weights is not None:
        digest = file_digest(atomic_torch_save(weights, path.with_suffix(".pt")))
    return atomic_json_dump({"format": 2, "entry": entry, "weights": digest}, path)


def read_cached(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[Any, Any] | None:
    """The ``(entry, weights)`` that :func:`write_cached` stored at ``path`` (weights None when it stored none),
    or None when there is none. A damaged entry (unparsable JSON, a weights file missing, of another size or
    checksum, or unreadable) is set aside (:func:`set_aside`) and None returned, so that it is recomputed."""
    path, pt = Path(path), Path(path).with_suffix(".pt")
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != 2 or "entry" not in doc:
            raise ValueError
    except (OSError, ValueError):
        set_aside(path, "is damaged (not a cache entry of this kit)")
        return None
    if doc.get("weights") is None:
        return doc["entry"], None
    if not pt.exists() or file_digest(pt) != doc["weights"]:
        set_aside(pt if pt.exists() else path, "does not match the weights its cache entry recorded")
        return None
    try:
        return doc["entry"], load_tensors(pt, map_location, "cached weights")
    except HilalError:
        set_aside(pt, "is not a readable weights file")
        return None


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """A YAML file's content (``yaml.safe_load``: plain data, never objects); unreadable or unparsable is a
    one-line HilalError naming the file and the place of the error."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise HilalError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise HilalError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
