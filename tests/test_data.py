"""Dataset splits: digits, CIFAR-10/100 from self-written files in the official format, ImageFolder."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from hilal.data import DATASETS, load_dataset, loader
from hilal.registry import HilalError


def test_digits_sizes_shapes_and_standardization(digits):
    assert (len(digits.train), len(digits.calib), len(digits.test)) == (1077, 360, 360)
    assert (digits.in_channels, digits.image_size, digits.num_classes, digits.task) == (1, 8, 10, "classification")
    x, y = digits.train.tensors
    assert x.shape == (1077, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3  # train statistics
    assert digits.example_input(4).shape == (4, 1, 8, 8)


def test_digits_splits_partition_the_dataset(digits):
    from sklearn.datasets import load_digits

    d = load_digits()
    x_tr = digits.train.tensors[0]
    full = Counter()
    for img, lab in zip(d.images.astype(np.int64), d.target, strict=True):
        full[(img.tobytes(), int(lab))] += 1
    # undo the standardization x = (raw/16 - mean) / std through the affine map it applies
    flat = x_tr.flatten()
    lo, hi = float(flat.min()), float(flat.max())  # raw 0 and raw 16 both occur in the train split
    union = Counter()
    for part in ("train", "calib", "test"):
        xs, ys = getattr(digits, part).tensors
        raw = np.rint((xs.squeeze(1).numpy() - lo) / (hi - lo) * 16).astype(np.int64)
        for img, lab in zip(raw, ys.numpy(), strict=True):
            union[(img.tobytes(), int(lab))] += 1
    assert union == full  # same multiset of (image, label): a partition, nothing shared or lost


def test_digits_splits_are_stratified(digits):
    from sklearn.datasets import load_digits

    y = load_digits().target
    p = np.bincount(y, minlength=10) / len(y)
    for part in ("train", "calib", "test"):
        ys = getattr(digits, part).tensors[1].numpy()
        counts = np.bincount(ys, minlength=10)
        assert np.all(np.abs(counts - p * len(ys)) <= 2), (part, counts, p * len(ys))


def test_digits_deterministic_by_seed(digits):
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    for part in ("train", "calib", "test"):
        a, b = getattr(digits, part).tensors, getattr(again, part).tensors
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(digits.test.tensors[1], other.test.tensors[1])


def test_loader_shuffles_by_seed(digits):
    def order(seed):
        return torch.cat([y for _, y in loader(digits.calib, 64, shuffle=True, seed=seed)])

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    assert torch.equal(torch.sort(order(3)).values, torch.sort(digits.calib.tensors[1]).values)
    plain = torch.cat([y for _, y in loader(digits.calib, 64)])
    assert torch.equal(plain, digits.calib.tensors[1])


# --- CIFAR in the official "python version" format ----------------------------------------------------


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root, per_batch=20, n_test=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for b in range(1, 6):
        data = _images(rng, per_batch)
        labels = [(b + i) % 10 for i in range(per_batch)]
        train.append((data, labels))
        _dump({"batch_label": f"training batch {b} of 5", "data": data, "labels": labels,
               "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]}, folder / f"data_batch_{b}")
    test = (_images(rng, n_test), [i % 10 for i in range(n_test)])
    _dump({"batch_label": "testing batch 1 of 1", "data": test[0], "labels": test[1],
           "filenames": [f"t_{i}.png" for i in range(n_test)]}, folder / "test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, folder / "batches.meta")
    return train, test


def _write_cifar100(root, n_train=500, n_test=100):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data, fine = _images(rng, n), [i % 100 for i in range(n)]
        _dump({"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": f"{split} batch",
               "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data}, folder / split)
        out[split] = (data, fine)
    _dump({"fine_label_names": [f"class{i}" for i in range(100)],
           "coarse_label_names": [f"super{i}" for i in range(20)]}, folder / "meta")
    return out


def _expected(raw_row, mean, std):
    img = torch.from_numpy(raw_row.reshape(3, 32, 32).astype(np.float32) / 255.0)
    return (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_cifar10_from_official_format(tmp_path):
    train, test = _write_cifar10(tmp_path)
    s = load_dataset("cifar10", seed=0, root=tmp_path, download=False)
    assert (s.in_channels, s.image_size, s.num_classes) == (3, 32, 10)
    assert (len(s.train), len(s.calib), len(s.test)) == (80, 20, 20)
    assert not set(s.train.indices) & set(s.calib.indices)
    assert sorted(s.train.indices + s.calib.indices) == list(range(100))
    all_data = np.concatenate([d for d, _ in train])
    all_labels = [lab for _, ls in train for lab in ls]
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    for k in (0, 7):
        x, y = s.test[k]
        assert y == test[1][k]
        torch.testing.assert_close(x, _expected(test[0][k], mean, std), rtol=0, atol=1e-5)
        xc, yc = s.calib[k]
        idx = s.calib.indices[k]
        assert yc == all_labels[idx]
        torch.testing.assert_close(xc, _expected(all_data[idx], mean, std), rtol=0, atol=1e-5)
    xa, ya = s.train[0]  # augmented: random crop + flip, same shape and label
    assert xa.shape == (3, 32, 32) and ya == all_labels[s.train.indices[0]]
    assert np.bincount([all_labels[i] for i in s.calib.indices], minlength=10).tolist() == [2] * 10


def test_cifar100_from_official_format(tmp_path):
    written = _write_cifar100(tmp_path)
    s = load_dataset("cifar100", seed=0, root=tmp_path, download=False, augment=False)
    assert (s.in_channels, s.image_size, s.num_classes) == (3, 32, 100)
    assert (len(s.train), len(s.calib), len(s.test)) == (400, 100, 100)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    x, y = s.test[5]
    assert y == written["test"][1][5]
    torch.testing.assert_close(x, _expected(written["test"][0][5], mean, std), rtol=0, atol=1e-5)
    idx = s.train.indices[3]
    x, y = s.train[3]  # augment=False: the train split is the plain images too
    assert y == written["train"][1][idx]
    torch.testing.assert_close(x, _expected(written["train"][0][idx], mean, std), rtol=0, atol=1e-5)
    assert sorted(s.calib.dataset.targets[i] for i in s.calib.indices) == list(range(100))


@pytest.mark.parametrize("name,folder,files", [
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
    ("cifar100", "cifar-100-python", ["train", "test", "meta"]),
])
def test_cifar_missing_files_offline(tmp_path, monkeypatch, name, folder, files):
    monkeypatch.setenv("HILAL_OFFLINE", "1")
    with pytest.raises(HilalError) as e:
        load_dataset(name, seed=0, root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / folder) in msg
    for f in files:
        assert f in msg
    assert not (tmp_path / folder).exists()  # nothing was downloaded


def test_cifar_truncated_file_is_a_hilal_error(tmp_path):
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(HilalError, match="cifar-10-batches-py"):
        load_dataset("cifar10", seed=0, root=tmp_path, download=False)


# --- ImageNet as an ImageFolder tree -----------------------------------------------------------------


def test_imagenet_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["n01440764", "n01443537", "n01484850"]
    for split, n in (("train", 4), ("val", 2)):
        for c, wnid in enumerate(classes):
            d = tmp_path / "imagenet" / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(40 + 4 * i, 48, 3), dtype=np.uint8)
                arr[..., 0] = 80 * c  # the class is visible in the red channel
                Image.fromarray(arr).save(d / f"{wnid}_{i}.png")
    s = load_dataset("imagenet", seed=0, root=tmp_path, image_size=32)
    assert (s.in_channels, s.image_size, s.num_classes) == (3, 32, 3)
    assert (len(s.train), len(s.calib), len(s.test)) == (6, 6, 6)
    assert not set(s.train.indices) & set(s.calib.indices)
    labels = []
    for x, y in s.test:
        assert x.shape == (3, 32, 32)
        red = float(x[0].mean()) * 0.229 + 0.485  # undo normalization
        assert red == pytest.approx(80 * y / 255, abs=0.02)
        labels.append(y)
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 3


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(HilalError) as e:
        load_dataset("imagenet", root=tmp_path)
    assert str(tmp_path / "imagenet" / "train") in str(e.value)
    assert str(tmp_path / "imagenet" / "val") in str(e.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(HilalError) as e:
        load_dataset("mnist-fashion")
    for name in ("digits", "cifar10", "cifar100", "imagenet"):
        assert name in str(e.value)
    assert set(DATASETS.names()) >= {"digits", "cifar10", "cifar100", "imagenet"}
