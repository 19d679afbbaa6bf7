"""Dataset registry. Every dataset comes as train / calibration / test splits.

The calibration split is held out from training: Hessian metrics and in-loop model selection use it,
final accuracies use the test split (curvature on fitted training data is uninformative).

:data:`DATASETS` is filled here, in one place: the image datasets defined below and the question-answering
ones of :mod:`hilal.qa` (which imports nothing from this module), so :func:`load_dataset` finds every dataset
whatever was imported first. :class:`Splits`, :data:`LossFn` and :func:`loader` live in :mod:`hilal.splits`
and are importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset, TensorDataset

from hilal import cifar, qa
from hilal.batches import ImageTensors, RandomCropFlip
from hilal.paths import data_dir, offline
from hilal.registry import HilalError, Registry, is_count
from hilal.splits import LossFn as LossFn  # re-exported: the kit and users import them from here
from hilal.splits import Splits
from hilal.splits import loader as loader

DATASETS: Registry = Registry("dataset")


def load_dataset(name: str, seed: int = 0, root: str | Path | None = None, **kwargs: Any) -> Splits:
    """Build the named dataset's splits. ``root`` defaults to ``data/`` (HILAL_DATA_DIR)."""
    builder = DATASETS[name]
    return builder(seed=seed, root=Path(root) if root else data_dir(), **kwargs)


def _three_way(labels: np.ndarray, calib: float | int, test: float | int | None, seed: int):
    idx = np.arange(len(labels))
    rest, te = (idx, None) if test is None else train_test_split(
        idx, test_size=test, stratify=labels, random_state=seed)
    tr, ca = train_test_split(rest, test_size=calib, stratify=labels[rest], random_state=seed)
    return tr, ca, te


@DATASETS.register("digits")
def digits(seed: int = 0, root: Path | None = None, calib: float = 0.2, test: float = 0.2,
           **_: Any) -> Splits:
    """scikit-learn's 1797 real 8x8 digit images (ships with scikit-learn: the offline default).

    Fixed stratified split by seed, standardized with the training split's statistics, shape 1x8x8.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    tr, ca, te = _three_way(y, calib / (1 - test), test, seed)
    mean, std = x[tr].mean(), x[tr].std()
    xt = torch.from_numpy((x - mean) / std).unsqueeze(1)
    yt = torch.from_numpy(y)

    def part(i: np.ndarray) -> TensorDataset:
        return TensorDataset(xt[i], yt[i])

    return Splits("digits", part(tr), part(ca), part(te), in_channels=1, image_size=8, num_classes=10)


def _cifar(name: str, seed: int, root: Path, calib_size: int, download: bool | None,
           augment: bool) -> Splits:
    """In-memory CIFAR (:mod:`hilal.cifar`); calibration = a stratified hold-out of train (the same indices
    for the same seed as torchvision's reader gave, so earlier checkpoints keep their splits)."""
    if download is not None and not isinstance(download, bool):
        raise HilalError(f"download must be True, False or None (download unless HILAL_OFFLINE); got {download!r}")
    if not isinstance(augment, bool):
        raise HilalError(f"augment must be True or False; got {augment!r}")
    if not is_count(calib_size):
        raise HilalError(f"calib_size must be a whole number >= 1; got {calib_size!r}")
    arrays = cifar.load_cifar(name, root, not offline() if download is None else download)
    mean, std = cifar.STATS[name]
    full = ImageTensors(arrays.train_images, arrays.train_labels, mean, std)
    labels = arrays.train_labels.numpy()
    tr, ca, _ = _three_way(labels, min(calib_size, len(labels) // 5), None, seed)
    test = ImageTensors(arrays.test_images, arrays.test_labels, mean, std)
    return Splits(name, Subset(full.with_raw(augment), tr.tolist()), Subset(full, ca.tolist()), test,
                  in_channels=3, image_size=32, num_classes=cifar.NUM_CLASSES[name],
                  meta={"classes": arrays.classes, "normalization": (mean, std)},
                  augment=RandomCropFlip(mean, std, padding=4) if augment else None)


@DATASETS.register("cifar10")
def cifar10(seed: int = 0, root: Path | None = None, calib_size: int = 5000, download: bool | None = None,
            augment: bool = True, **_: Any) -> Splits:
    """CIFAR-10 from the "python version" batches under ``root`` (``data/``), held in memory; training batches
    are cropped and flipped on the model's device (``augment``); calibration = a stratified hold-out of train."""
    return _cifar("cifar10", seed, root or data_dir(), calib_size, download, augment)


@DATASETS.register("cifar100")
def cifar100(seed: int = 0, root: Path | None = None, calib_size: int = 5000, download: bool | None = None,
             augment: bool = True, **_: Any) -> Splits:
    """CIFAR-100 as :func:`cifar10` (fine labels); calibration = a stratified hold-out of train."""
    return _cifar("cifar100", seed, root or data_dir(), calib_size, download, augment)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@DATASETS.register("imagenet")
def imagenet(seed: int = 0, root: Path | None = None, calib_size: int = 10000, image_size: int = 224,
             **_: Any) -> Splits:
    """ImageNet as an ImageFolder tree: ``data/imagenet/train/<wnid>/*.JPEG`` and ``.../val/<wnid>/``."""
    import torchvision
    from torchvision import transforms as T

    base = (root or data_dir()) / "imagenet"
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise HilalError(f"dataset 'imagenet' not found: expected class folders under {base / 'train'} and "
                         f"{base / 'val'} (one sub-folder per class, torchvision ImageFolder layout)")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    ev = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])
    tr_t = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    train_aug = torchvision.datasets.ImageFolder(str(base / "train"), transform=tr_t)
    train_plain = torchvision.datasets.ImageFolder(str(base / "train"), transform=ev)
    test = torchvision.datasets.ImageFolder(str(base / "val"), transform=ev)
    labels = np.asarray(train_plain.targets)
    calib_size = min(calib_size, len(labels) // 2)
    tr, ca, _ = _three_way(labels, calib_size, None, seed)
    return Splits("imagenet", Subset(train_aug, tr.tolist()), Subset(train_plain, ca.tolist()), test,
                  in_channels=3, image_size=image_size, num_classes=len(train_plain.classes),
                  meta={"normalization": (IMAGENET_MEAN, IMAGENET_STD)})


# the question-answering datasets, defined in hilal.qa and registered here with the others
DATASETS.add("squad", qa.squad)
DATASETS.add("squad_sample", qa.squad_sample)
