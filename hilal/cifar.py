"""CIFAR-10/100 read from the official "python version" pickle batches into uint8 tensors.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta`` and ``cifar-100-python/train``, ``test``, ``meta``; every batch is a pickled dict whose
``data`` is an N x 3072 uint8 array (channel-major rows: 1024 red, 1024 green, 1024 blue values) and whose
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100) lists the classes. The official files were pickled by
Python 2, so their keys come back as ``bytes`` (``b"data"``); files written by Python 3 have ``str`` keys;
both are read. The whole dataset is held as one (N, 3, 32, 32) uint8 tensor: decoding per sample through PIL
was the training loop's bottleneck.

Unpickling a file can run code, so every file is checked against the MD5 sum published for the official
archive (torchvision's lists) *before* it is unpickled, and refused when it differs. A data folder that
:func:`hilal.dryrun.prepare` wrote is checked against the sums its manifest recorded for its synthetic files.
Your own CIFAR-format files (a subset, another split) need the explicit opt-out ``HILAL_CIFAR_VERIFY=0`` (or
``verify=False``): they are then unpickled as they are, so use it only for files you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hilal.paths import DRYRUN_MARKER, is_dryrun_dir, offline
from hilal.registry import HilalError

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
"""Sub-folder of the data root that each dataset's archive extracts to."""
TRAIN_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
META_FILES = {"cifar10": "batches.meta", "cifar100": "meta"}
_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
_NAMES_KEY = {"cifar10": "label_names", "cifar100": "fine_label_names"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
"""Per-channel mean and standard deviation of the training images (inputs are normalized with these)."""


@dataclass
class CifarArrays:
    """A CIFAR dataset in memory: images (N, 3, 32, 32) uint8 and labels (N,) int64 per split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def files(name: str) -> list[str]:
    """Every file of the dataset's folder, in reading order (train, test, meta)."""
    return [*TRAIN_FILES[name], *TEST_FILES[name], META_FILES[name]]


def missing_error(name: str, root: Path, how: str) -> HilalError:
    """The one-line error for absent files: what to put where, and whether downloads were tried."""
    return HilalError(
        f"dataset {name!r} not found: expected {', '.join(files(name))} in {root / FOLDERS[name]}. {how} "
        f"(downloads are {'disabled by HILAL_OFFLINE' if offline() else 'attempted when online'})")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unpickle(path: Path) -> dict[str, Any]:
    """A batch file as a dict with ``str`` keys; a HilalError naming the file if it is no such pickle."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # (truncated or foreign files fail in many ways inside pickle)
        raise HilalError(f"{path}: not a readable CIFAR pickle ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise HilalError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise HilalError(f"{path}: no {key!r} entry (keys: {', '.join(map(str, d)) or 'none'})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise HilalError(f"{path}: 'data' must be an N x 3072 uint8 array, found a {what}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise HilalError(f"{path}: {label_key!r} must be a list of class numbers ({_one_line(e)})") from None
    if labels.shape != (len(data),):
        raise HilalError(f"{path}: {label_key!r} has shape {labels.shape}, expected ({len(data)},): one per image")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise HilalError(f"{path}: {label_key!r} holds {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    return data, labels


def _read_split(name: str, folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_batch(folder / f, _LABEL_KEY[name], NUM_CLASSES[name]) for f in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(labels)


def _classes(name: str, path: Path) -> list[str]:
    d = _unpickle(path)
    key = _NAMES_KEY[name]
    names = d.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES[name]:
        found = f"{len(names)} entries" if isinstance(names, (list, tuple)) else "none"
        raise HilalError(f"{path}: {key!r} must list {NUM_CLASSES[name]} class names, found {found}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


VERIFY_ENV = "HILAL_CIFAR_VERIFY"
"""Environment variable of the opt-out: ``0`` reads CIFAR-format files without checking their MD5 sums."""


def published_md5(name: str) -> dict[str, str]:
    """File name -> MD5 of the official "python version" archive's files (as torchvision lists them)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return {**dict(cls.train_list), **dict(cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


def expected_md5(name: str, root: Path, verify: bool | None = None) -> tuple[dict[str, str], str] | None:
    """The sums ``root``'s files must have, and whose they are: those a dry-run manifest recorded where ``root``
    is :func:`hilal.dryrun.prepare`'s folder, else the published ones; None when checking is turned off
    (``verify=False``, or ``verify=None`` with ``HILAL_CIFAR_VERIFY=0``)."""
    if verify is None:
        verify = os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    if not verify:
        return None
    if is_dryrun_dir(root):
        try:
            sums = json.loads((Path(root) / DRYRUN_MARKER).read_text()).get("md5") or {}
        except (OSError, ValueError, AttributeError):
            sums = {}
        prefix = FOLDERS[name] + "/"
        return {k[len(prefix):]: v for k, v in sums.items() if k.startswith(prefix)}, "the dry-run manifest's"
    return published_md5(name), "the published"


def verify_files(name: str, root: Path, verify: bool | None = None) -> None:
    """Check every file of the dataset against :func:`expected_md5` before anything is unpickled: a file that
    differs (tampered, damaged, another version) is a one-line HilalError naming it and the opt-out."""
    expected = expected_md5(name, root, verify)
    if expected is None:
        return
    sums, whose = expected
    for f in files(name):
        path = Path(root) / FOLDERS[name] / f
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sums.get(f):
            raise HilalError(f"{path}: MD5 {h.hexdigest()} is not {whose} sum {sums.get(f, '(none recorded)')}, so it "
                             f"was not unpickled (unpickling can run code); for your own CIFAR-format files set "
                             f"{VERIFY_ENV}=0")


def read_cifar(name: str, root: Path, verify: bool | None = None) -> CifarArrays:
    """Read ``root/<folder>``'s batches (see the module docstring), each checked first against its MD5 sum
    (:func:`verify_files`; ``verify=False`` or ``HILAL_CIFAR_VERIFY=0``: not checked). Missing, tampered or
    unreadable files, wrong keys or shapes raise a one-line HilalError naming the file."""
    folder = Path(root) / FOLDERS[name]
    absent = [f for f in files(name) if not (folder / f).is_file()]
    if absent:
        raise missing_error(name, Path(root), f"Missing: {', '.join(absent)}. Download the 'python version' "
                                              f"archive from the CIFAR page and extract it into {root}.")
    verify_files(name, Path(root), verify)
    classes = _classes(name, folder / META_FILES[name])
    tr_x, tr_y = _read_split(name, folder, TRAIN_FILES[name])
    te_x, te_y = _read_split(name, folder, TEST_FILES[name])
    return CifarArrays(tr_x, tr_y, te_x, te_y, classes)


def fetch_cifar(name: str, root: Path) -> None:
    """Download and extract the official archive into ``root`` (torchvision's URL and archive checksum);
    a one-line HilalError when that fails (offline, unreachable)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # (URLError, HTTP, disk and archive errors alike)
        raise missing_error(name, Path(root), f"The download failed ({_one_line(e)}); download the 'python "
                                              f"version' archive from the CIFAR page and extract it into "
                                              f"{root}.") from None


def load_cifar(name: str, root: Path, download: bool, verify: bool | None = None) -> CifarArrays:
    """The dataset's arrays, fetched first when files are missing and ``download`` is true (``verify``: see
    :func:`read_cifar`)."""
    folder = Path(root) / FOLDERS[name]
    if download and not all((folder / f).is_file() for f in files(name)):
        fetch_cifar(name, Path(root))
    return read_cifar(name, Path(root), verify)
