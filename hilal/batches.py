"""Whole-batch data paths: in-memory datasets fetched a batch at a time by one tensor index, and training
augmentation applied to a whole batch on the model's device.

Per-sample ``__getitem__`` plus the default collate (and, for images, a PIL round trip per sample) made
training epochs wait on data; here a batch is ``images[index]`` and the augmentation is a few tensor ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from hilal.registry import HilalError

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``(inputs, generator) -> inputs``: a transform of a whole training batch (:attr:`hilal.data.Splits.augment`)."""


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, on the images' device:
    the operations of torchvision's ``ToTensor`` then ``Normalize`` in the same order (identical values)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).div_(255).sub_(m).div_(s)


class ImageTensors(Dataset):
    """Images held as one uint8 tensor (N, C, H, W) with int64 labels (N,).

    Items and batches are normalized float images, or the uint8 images themselves when ``raw`` (a training
    split whose :class:`RandomCropFlip` normalizes on the device after augmenting). Views made with
    :meth:`with_raw` share the tensors.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 raw: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != (len(images),):
            raise HilalError(f"ImageTensors needs uint8 images (N, C, H, W) and N labels; got {images.dtype} "
                             f"{tuple(images.shape)} and labels {tuple(labels.shape)}")
        self.images, self.labels = images, labels.to(torch.int64)
        self.mean, self.std, self.raw = tuple(mean), tuple(std), raw

    def with_raw(self, raw: bool) -> ImageTensors:
        """The same images, served raw (uint8) or normalized."""
        return ImageTensors(self.images, self.labels, self.mean, self.std, raw)

    @property
    def targets(self) -> list[int]:
        """Labels as a list (torchvision's name)."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        return (x if self.raw else normalize(x, self.mean, self.std)), int(self.labels[i])

    def take(self, index: torch.Tensor) -> list[torch.Tensor]:
        """The batch ``[images, labels]`` of the rows in ``index`` (int64)."""
        x = self.images[index]
        return [x if self.raw else normalize(x, self.mean, self.std), self.labels[index]]


def batch_taker(ds: Dataset) -> Callable[[torch.Tensor], Any] | None:
    """``index -> batch`` for datasets held as tensors (a ``take(index)`` method as :class:`ImageTensors` has,
    ``TensorDataset``, ``Subset`` s of them), equal to collating their items one by one; None for others."""
    if isinstance(ds, Subset):
        inner = batch_taker(ds.dataset)
        if inner is None:
            return None
        rows = torch.as_tensor(ds.indices, dtype=torch.int64)
        return lambda index: inner(rows[index])
    take = getattr(ds, "take", None)
    if callable(take):  # ImageTensors, QAFeatures: their own batch cut
        return take
    if type(ds) is TensorDataset:  # a subclass may override __getitem__
        return lambda index: [t[index] for t in ds.tensors]
    return None


class BatchView(Dataset):
    """``ds`` for a DataLoader with ``collate_fn=first``: the fetcher asks ``__getitems__`` for a whole batch,
    which ``take`` answers with one index instead of ``len(batch)`` calls of ``__getitem__``."""

    def __init__(self, ds: Dataset, take: Callable[[torch.Tensor], Any]) -> None:
        self.ds, self.take = ds, take

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return [self.take(torch.as_tensor(indices, dtype=torch.int64))]


def first(batch: list[Any]) -> Any:
    """The collate function of a :class:`BatchView` loader: the batch ``__getitems__`` built."""
    return batch[0]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for the augmentation of one epoch, seeded from (seed, epoch): a resumed run draws what
    the uninterrupted one did, and CPU and GPU runs draw the same crops."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(epoch) % 2**63]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class RandomCropFlip:
    """Per-sample random crop after zero-padding ``padding`` pixels on each side, and a random horizontal flip
    with probability 1/2, then :func:`normalize`: torchvision's ``RandomCrop(size, padding)``,
    ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)`` for a uint8 batch at once, on the
    batch's device. Offsets and flips are drawn on the generator's device (a CPU generator: the same draws
    on every device)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 4) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise HilalError(f"padding must be a whole number of pixels >= 0; got {padding!r}")
        self.mean, self.std, self.padding = tuple(mean), tuple(std), padding

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top and left corners of each crop in the padded image (0..2*padding) and the flip mask, for n samples."""
        dev, span = generator.device, 2 * self.padding + 1
        top = torch.randint(0, span, (n,), generator=generator, device=dev)
        left = torch.randint(0, span, (n,), generator=generator, device=dev)
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        return top, left, flip

    def crop_flip(self, images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
        """Sample b = the zero-padded ``images[b]`` sliced at ``top[b], left[b]``, mirrored where ``flip[b]``
        (one gather for the whole batch; dtype kept)."""
        n, c, h, w = images.shape
        p, dev = self.padding, images.device
        top, left, flip = top.to(dev), left.to(dev), flip.to(dev)
        padded = images.new_zeros(n, c, h + 2 * p, w + 2 * p)
        padded[:, :, p:p + h, p:p + w] = images
        cols = torch.arange(w, device=dev)
        cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (n, w)
        rows = top[:, None] + torch.arange(h, device=dev)  # (n, h)
        flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        return padded.view(n, c, -1).gather(2, flat).view(n, c, h, w)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise HilalError(f"RandomCropFlip takes uint8 image batches (N, C, H, W); got {images.dtype} "
                             f"{tuple(images.shape)}")
        return normalize(self.crop_flip(images, *self.draw(len(images), generator)), self.mean, self.std)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, mean={self.mean}, std={self.std})"
