"""Dataset registry. Every dataset comes as train / calibration / test splits.

The calibration split is held out from training: Hessian metrics and in-loop model selection use it,
final accuracies use the test split (curvature on fitted training data is uninformative).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from hilal import cifar
from hilal.batches import BatchTransform, BatchView, ImageTensors, RandomCropFlip, batch_taker, first
from hilal.paths import data_dir, offline
from hilal.registry import HilalError, Registry, is_count

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""A task loss: ``loss_fn(model, batch)`` -> a scalar tensor."""


@dataclass
class Splits:
    """A dataset split three ways, with the shape facts models need."""

    name: str
    """Registry name of the dataset."""
    train: Dataset
    """Training split (augmented per sample, or raw for :attr:`augment`, where the dataset augments)."""
    calib: Dataset
    """Held-out calibration split: curvature metrics and in-loop model selection."""
    test: Dataset
    """Test split: final accuracies."""
    in_channels: int = 3
    """Input channels (images)."""
    image_size: int = 32
    """Input height = width (images)."""
    num_classes: int = 10
    """Number of classes (classification)."""
    task: str = "classification"
    """``classification`` or ``qa`` (extractive question answering)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task extras, e.g. the tokenizer and raw examples for question answering."""
    loss_fn: LossFn | None = None
    """The task loss of one batch, ``loss_fn(model, batch) -> scalar tensor`` (the batch on the model's device),
    for tasks beyond classification and extractive QA; None: cross-entropy on ``(inputs, labels)`` batches,
    start/end cross-entropy on QA batches (:func:`hilal.train.task_loss`). Training, fine-tuning, evaluation
    losses and curvature all use it."""
    augment: BatchTransform | None = None
    """Transform of every training batch's inputs once on the model's device, ``(x, generator) -> x`` with a
    CPU generator seeded per epoch (:func:`hilal.batches.epoch_generator`); the training loops apply it
    (:func:`hilal.train.train_batch`). Set, the train split yields its inputs before this transform (CIFAR:
    uint8 images, cropped, flipped and normalized by :class:`hilal.batches.RandomCropFlip`); calibration and
    test batches are model inputs as they come."""

    def example_input(self, n: int = 2) -> Any:
        """A real batch of (at most) ``n`` inputs from the calibration split (for shapes and MAC counting)."""
        batch = next(iter(loader(self.calib, batch_size=n)))
        if isinstance(batch, (list, tuple)):
            return batch[0][:n]
        return {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}


DATASETS: Registry = Registry("dataset")


def load_dataset(name: str, seed: int = 0, root: str | Path | None = None, **kwargs: Any) -> Splits:
    """Build the named dataset's splits. ``root`` defaults to ``data/`` (HILAL_DATA_DIR)."""
    builder = DATASETS[name]
    return builder(seed=seed, root=Path(root) if root else data_dir(), **kwargs)


def loader(ds: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False, num_workers: int | None = None) -> DataLoader:
    """Batches of ``ds``; shuffled by a generator seeded with ``seed``. A ``DataLoader`` (a user's own) is
    returned as it is: its batch size, sampler, collate function and workers are the user's choice.

    Datasets held as tensors (:class:`~hilal.batches.ImageTensors`, ``TensorDataset``, ``Subset`` s of them)
    are cut a batch at a time by one index (:func:`~hilal.batches.batch_taker`) in this process: the same
    batches, order and RNG draws as per-sample collation, without its per-sample cost. Datasets that decode
    files (ImageFolder) load in ``num_workers`` worker processes: by default one per CPU core but one, at most
    8, none for fewer than 4 batches (starting workers costs more; other datasets: none), with ``pin_memory``
    when CUDA is present
    and ``persistent_workers`` (a loader iterated again keeps its workers). Per-sample random transforms in
    workers draw from seeds the shuffling generator gives each worker, so they repeat for the same seed and
    worker count (in this process, with ``num_workers=0``, they draw from the global RNG)."""
    if isinstance(ds, DataLoader):
        return ds
    if not is_count(batch_size):
        raise HilalError(f"batch_size must be a whole number >= 1; got {batch_size!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise HilalError(f"num_workers must be None (automatic) or a whole number >= 0; got {num_workers!r}")
    g = torch.Generator().manual_seed(seed) if shuffle else None
    take = batch_taker(ds)
    if take is not None:
        return DataLoader(BatchView(ds, take), batch_size=batch_size, shuffle=shuffle, generator=g,
                          drop_last=drop_last, collate_fn=first, num_workers=0)
    if num_workers is None:
        many = _decodes_files(ds) and len(ds) >= 4 * batch_size  # type: ignore[arg-type]
        num_workers = min(8, (os.cpu_count() or 1) - 1) if many else 0
    workers = max(num_workers, 0)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last,
                      num_workers=workers, pin_memory=workers > 0 and torch.cuda.is_available(),
                      persistent_workers=workers > 0)


def _decodes_files(ds: Dataset) -> bool:
    """Whether ``ds`` (or the dataset a Subset draws from) reads and decodes a file per sample (ImageFolder)."""
    from torchvision.datasets import DatasetFolder

    while isinstance(ds, Subset):
        ds = ds.dataset
    return isinstance(ds, DatasetFolder)


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


from hilal import qa as _qa  # noqa: E402,F401  (registers the question-answering datasets)
