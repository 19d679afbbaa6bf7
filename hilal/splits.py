"""The three-way split every dataset comes as (:class:`Splits`) and how a split is cut into batches (:func:`loader`).

Below :mod:`hilal.data` (which re-exports both) so that the dataset builders of :mod:`hilal.qa`, which
:mod:`hilal.data` registers, need nothing from the registry's module (docs/design.md, "one-way layer order").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hilal.batches import BatchTransform, BatchView, batch_taker, first
from hilal.registry import HilalError, is_count

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
