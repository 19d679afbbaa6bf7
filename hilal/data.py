"""Dataset registry. Every dataset comes as train / calibration / test splits.

The calibration split is held out from training: Hessian metrics and in-loop model selection use it,
final accuracies use the test split (curvature on fitted training data is uninformative).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from hilal.paths import data_dir, offline
from hilal.registry import HilalError, Registry


@dataclass
class Splits:
    """A dataset split three ways, with the shape facts models need."""

    name: str
    """Registry name of the dataset."""
    train: Dataset
    """Training split (augmented where the dataset has augmentation)."""
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

    def example_input(self, n: int = 2) -> Any:
        """A real batch of ``n`` inputs from the calibration split (for shapes and MAC counting)."""
        batch = next(iter(loader(self.calib, batch_size=n)))
        return batch[0] if isinstance(batch, (list, tuple)) else {k: v for k, v in batch.items()}


DATASETS: Registry = Registry("dataset")


def load_dataset(name: str, seed: int = 0, root: str | Path | None = None, **kwargs: Any) -> Splits:
    """Build the named dataset's splits. ``root`` defaults to ``data/`` (HILAL_DATA_DIR)."""
    builder = DATASETS[name]
    return builder(seed=seed, root=Path(root) if root else data_dir(), **kwargs)


def loader(ds: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A single-process DataLoader (the datasets here are small or in memory); seeded shuffling."""
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last,
                      num_workers=0)


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


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _missing(name: str, root: Path, folder: str, files: list[str], how: str) -> HilalError:
    return HilalError(
        f"dataset {name!r} not found: expected {', '.join(files)} in {root / folder}. {how} "
        f"(downloads are {'disabled by HILAL_OFFLINE' if offline() else 'attempted when online'})")


def _cifar_class(name: str) -> type:
    """torchvision's CIFAR reader, except that files already on disk are read without comparing their md5 to
    the official archive's (downloads are still verified through the archive's md5)."""
    import torchvision

    base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100

    class LocalCIFAR(base):  # type: ignore[misc, valid-type]
        def _path(self, filename: str) -> Path:
            return Path(self.root) / self.base_folder / filename

        def _check_integrity(self) -> bool:
            names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(self._path(f).is_file() for f in names)

        def _load_meta(self) -> None:
            path = self._path(self.meta["filename"])
            if not path.is_file():
                raise RuntimeError(f"CIFAR metadata file {path} not found")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    LocalCIFAR.__name__ = base.__name__
    return LocalCIFAR


def _cifar(name: str, seed: int, root: Path, calib_size: int, download: bool | None,
           augment: bool) -> Splits:
    from torchvision import transforms as T

    cls = _cifar_class(name)
    folder, files = _CIFAR_FILES[name]
    want = not offline() if download is None else download
    mean, std = _CIFAR_STATS[name]
    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), plain]) if augment else plain
    try:
        train_aug = cls(str(root), train=True, transform=aug, download=want)
        train_plain = cls(str(root), train=True, transform=plain, download=False)
        test = cls(str(root), train=False, transform=plain, download=False)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:  # missing / truncated / URLError
        raise _missing(name, root, folder, files,
                       f"Download the 'python version' archive from the CIFAR page and extract it "
                       f"into {root} ({type(e).__name__}: {e})") from None
    labels = np.asarray(train_plain.targets)
    tr, ca, _ = _three_way(labels, min(calib_size, len(labels) // 5), None, seed)
    return Splits(name, Subset(train_aug, tr.tolist()), Subset(train_plain, ca.tolist()), test,
                  in_channels=3, image_size=32, num_classes=100 if name == "cifar100" else 10)


@DATASETS.register("cifar10")
def cifar10(seed: int = 0, root: Path | None = None, calib_size: int = 5000, download: bool | None = None,
            augment: bool = True, **_: Any) -> Splits:
    """CIFAR-10 through torchvision (root ``data/``); calibration = a stratified hold-out of train."""
    return _cifar("cifar10", seed, root or data_dir(), calib_size, download, augment)


@DATASETS.register("cifar100")
def cifar100(seed: int = 0, root: Path | None = None, calib_size: int = 5000, download: bool | None = None,
             augment: bool = True, **_: Any) -> Splits:
    """CIFAR-100 through torchvision (root ``data/``); calibration = a stratified hold-out of train."""
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
