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


@pytest.fixture(autouse=True)
def _own_cifar_files(monkeypatch):
    """These tests write their own CIFAR-format files, whose MD5 sums are not the published ones: they take the
    documented opt-out (tests/test_bad_inputs.py checks that without it such files are refused unread)."""
    monkeypatch.setenv("HILAL_CIFAR_VERIFY", "0")


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
    # decoding files: worker processes give the batches the main process does
    main = list(loader(s.test, 4, num_workers=0))
    workers = loader(s.test, 4, num_workers=1)
    assert workers.num_workers == 1 and workers.persistent_workers
    for (a, ya), (b, yb) in zip(main, workers, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


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


# --- in-memory CIFAR, the batch loader and batched augmentation -------------------------------------------


def _write_cifar(root, name, n_train, n_test, seed=0, bytes_keys=True):
    """A CIFAR folder in the official layout; ``bytes_keys`` as the official Python 2 pickles load (b"data")."""
    def key(k):
        return k.encode() if bytes_keys else k

    rng = np.random.default_rng(seed)
    n_classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    if name == "cifar10":
        files, meta = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta"
        names = {key("label_names"): [f"c{i}" for i in range(10)]}
        label_key = key("labels")
    else:
        files, meta = ["train", "test"], "meta"
        names = {key("fine_label_names"): [f"c{i}" for i in range(100)],
                 key("coarse_label_names"): [f"s{i}" for i in range(20)]}
        label_key = key("fine_labels")
    sizes = [n_train // 5] * 5 + [n_test] if name == "cifar10" else [n_train, n_test]
    arrays = []
    for f, n in zip(files, sizes, strict=True):
        data = _images(rng, n)
        labels = rng.permutation(np.arange(n) % n_classes).tolist()
        d = {key("batch_label"): f, key("data"): data, label_key: labels}
        if name == "cifar100":
            d[key("coarse_labels")] = [lab // 5 for lab in labels]
        _dump(d, folder / f)
        arrays.append((data, labels))
    _dump(names, folder / meta)
    train = arrays[:-1]
    return (np.concatenate([d for d, _ in train]), np.array([lab for _, ls in train for lab in ls]),
            arrays[-1][0], np.array(arrays[-1][1]))


def _torchvision_plain(row, mean, std):
    """The previous per-sample path: PIL image, ToTensor, Normalize."""
    from torchvision import transforms as T

    pil = Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))
    return T.Normalize(mean, std)(T.ToTensor()(pil))


@pytest.mark.parametrize("name,bytes_keys", [("cifar10", True), ("cifar10", False), ("cifar100", True)])
def test_cifar_tensors_equal_the_pickled_arrays(tmp_path, name, bytes_keys):
    tr_x, tr_y, te_x, te_y = _write_cifar(tmp_path, name, 50 if name == "cifar10" else 500, 20,
                                          bytes_keys=bytes_keys)
    s = load_dataset(name, seed=0, root=tmp_path, download=False)
    full = s.calib.dataset
    assert full.images.dtype == torch.uint8 and full.images.shape == (len(tr_x), 3, 32, 32)
    assert torch.equal(full.images, torch.from_numpy(tr_x).view(-1, 3, 32, 32))
    assert torch.equal(full.images[3, 1], torch.from_numpy(tr_x[3, 1024:2048].reshape(32, 32)))  # channel-major
    assert full.labels.dtype == torch.int64 and full.labels.tolist() == tr_y.tolist()
    assert torch.equal(s.test.images, torch.from_numpy(te_x).view(-1, 3, 32, 32))
    assert s.test.labels.tolist() == te_y.tolist()
    assert s.train.dataset.images is full.images  # one copy in memory
    assert s.meta["classes"] == [f"c{i}" for i in range(s.num_classes)]
    assert s.meta["normalization"] == (full.mean, full.std) == (s.augment.mean, s.augment.std)


@pytest.mark.parametrize("name,n_train", [("cifar10", 50), ("cifar100", 500)])
@pytest.mark.parametrize("seed", [0, 3])
def test_cifar_splits_match_the_previous_indices(tmp_path, name, n_train, seed):
    from sklearn.model_selection import train_test_split

    _, tr_y, _, _ = _write_cifar(tmp_path, name, n_train, 20, seed=seed)
    s = load_dataset(name, seed=seed, root=tmp_path, download=False, calib_size=5000)
    # the previous implementation: torchvision's targets, one stratified hold-out of min(calib_size, n // 5)
    tr, ca = train_test_split(np.arange(n_train), test_size=min(5000, n_train // 5), stratify=np.asarray(tr_y),
                              random_state=seed)
    assert s.train.indices == tr.tolist() and s.calib.indices == ca.tolist()


def test_cifar_batches_normalize_as_torchvision_did(tmp_path):
    tr_x, _, te_x, te_y = _write_cifar(tmp_path, "cifar10", 50, 20)
    s = load_dataset("cifar10", seed=0, root=tmp_path, download=False)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x, y = next(iter(loader(s.test, batch_size=8)))
    assert x.dtype == torch.float32 and y.tolist() == te_y[:8].tolist()
    assert torch.equal(x, torch.stack([_torchvision_plain(r, mean, std) for r in te_x[:8]]))  # bit-identical
    xc, _ = next(iter(loader(s.calib, batch_size=4, shuffle=True, seed=1)))
    rows = torch.randperm(len(s.calib), generator=_after_base_seed(1))[:4]
    want = torch.stack([_torchvision_plain(tr_x[s.calib.indices[int(i)]], mean, std) for i in rows])
    assert torch.equal(xc, want)
    assert torch.equal(s.calib[2][0], _torchvision_plain(tr_x[s.calib.indices[2]], mean, std))
    xt, _ = next(iter(loader(s.train, batch_size=4)))  # raw: the device-side augmentation normalizes
    assert xt.dtype == torch.uint8 and torch.equal(xt, torch.from_numpy(tr_x[s.train.indices[:4]]).view(-1, 3, 32, 32))
    plain = load_dataset("cifar10", seed=0, root=tmp_path, download=False, augment=False)
    assert plain.augment is None and next(iter(loader(plain.train, batch_size=4)))[0].dtype == torch.float32


def _after_base_seed(seed):
    """DataLoader's shuffling generator after the one draw its iterator takes for worker seeds."""
    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return g


def _collated(ds, **kw):
    """Reference: torch's DataLoader with per-sample __getitem__ and default collate."""
    from torch.utils.data import DataLoader

    seed = kw.pop("seed")
    g = torch.Generator().manual_seed(seed) if kw.get("shuffle") else None
    return DataLoader(ds, generator=g, num_workers=0, **kw)


@pytest.mark.parametrize("kind", ["tensor", "subset", "images", "qa"])
@pytest.mark.parametrize("shuffle,drop_last", [(False, False), (True, True), (True, False)])
def test_loader_slices_exactly_what_collation_gives(kind, shuffle, drop_last):
    from torch.utils.data import Subset, TensorDataset

    from hilal.batches import ImageTensors
    from hilal.qa import QAFeatures

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(103, 2, 4, 4, generator=gen), torch.randint(0, 5, (103,), generator=gen)
    imgs = torch.randint(0, 256, (103, 3, 8, 8), generator=gen, dtype=torch.uint8)
    ids = torch.randint(0, 50, (103, 6), generator=gen)
    qa = QAFeatures([{"id": "q", "context": "c"}], {"example_index": [0] * 103, "offsets": np.zeros((103, 6, 2)),
                                                     "input_ids": ids, "attention_mask": (ids > 3).long(),
                                                     "start_positions": y, "end_positions": y + 1})
    ds = {"tensor": TensorDataset(x, y), "subset": Subset(TensorDataset(x, y), list(range(100, 3, -2))),
          "images": Subset(ImageTensors(imgs, y, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)), list(range(0, 103, 2))),
          "qa": qa}[kind]
    torch.manual_seed(11)
    fast = list(loader(ds, 16, shuffle=shuffle, seed=5, drop_last=drop_last))
    rng_fast = torch.get_rng_state()
    torch.manual_seed(11)
    ref = list(_collated(ds, batch_size=16, shuffle=shuffle, seed=5, drop_last=drop_last))
    assert torch.equal(rng_fast, torch.get_rng_state())  # the same global RNG draws: seeded results unchanged
    assert len(fast) == len(ref) == (len(ds) // 16 if drop_last else -(-len(ds) // 16))
    for a, b in zip(fast, ref, strict=True):
        if kind == "qa":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert isinstance(a, list) and len(a) == len(b) == 2
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_loader_validates_its_options(digits):
    with pytest.raises(HilalError, match="batch_size"):
        loader(digits.calib, batch_size=0)
    with pytest.raises(HilalError, match="num_workers.*None"):
        loader(digits.calib, num_workers=-1)


def test_crop_flip_equals_the_per_sample_definition():
    from torchvision.transforms import functional as TF

    from hilal.batches import RandomCropFlip, epoch_generator

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    aug = RandomCropFlip(mean, std, padding=4)
    imgs = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    g = epoch_generator(0, 1)
    top, left, flip = aug.draw(64, torch.Generator().set_state(g.get_state()))
    out = aug(imgs, g)
    cropped = aug.crop_flip(imgs, top, left, flip)
    padded = torch.nn.functional.pad(imgs, (4, 4, 4, 4))
    for b in range(64):
        want = padded[b, :, top[b]:top[b] + 32, left[b]:left[b] + 32]
        assert torch.equal(cropped[b], want.flip(-1) if flip[b] else want)
        pil = TF.crop(TF.pad(Image.fromarray(imgs[b].permute(1, 2, 0).numpy()), 4), int(top[b]), int(left[b]), 32, 32)
        pil = TF.hflip(pil) if flip[b] else pil
        assert torch.equal(out[b], TF.normalize(TF.to_tensor(pil), mean, std))  # torchvision's own path, exactly
    assert bool(flip.any()) and not bool(flip.all())
    assert torch.equal(aug(imgs, epoch_generator(0, 1)), out)  # seeded
    assert not torch.equal(aug(imgs, epoch_generator(0, 2)), out)
    assert not torch.equal(aug(imgs, epoch_generator(1, 1)), out)


def test_crop_flip_offsets_and_flips_are_uniform():
    from scipy.stats import chisquare

    from hilal.batches import RandomCropFlip, epoch_generator

    aug = RandomCropFlip((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), padding=4)  # outputs the uint8 values
    r = torch.arange(1, 33, dtype=torch.uint8)
    ones = torch.ones(32, 32, dtype=torch.uint8)
    marker = torch.stack([r.view(32, 1).expand(32, 32), r.view(1, 32).expand(32, 32), ones])
    g = epoch_generator(7, 0)
    out = torch.cat([aug(marker.expand(4096, 3, 32, 32), g) for _ in range(5)]).round().to(torch.int64)
    # the centre pixel always comes from the image: its row/col values give the shift; the neighbour the flip
    dy = out[:, 0, 16, 16] - 17
    flipped = out[:, 1, 16, 17] < out[:, 1, 16, 16]
    dx = out[:, 1, 16, 16] - 17 + flipped.long()
    assert torch.all(out[:, 2].sum((1, 2)) == (32 - dy.abs()) * (32 - dx.abs()))  # zero padding elsewhere
    n = len(out)
    for counts, k in ((torch.bincount(dy + 4, minlength=9), 9), (torch.bincount(dx + 4, minlength=9), 9),
                      (torch.bincount(flipped.long(), minlength=2), 2),
                      (torch.bincount((dy + 4) * 18 + (dx + 4) * 2 + flipped.long(), minlength=162), 162)):
        assert len(counts) == k and int(counts.min()) > 0  # every offset -4..4 (and pairing) occurs
        assert chisquare(counts.numpy(), [n / k] * k).pvalue > 1e-3


def test_train_batch_augments_only_where_the_split_does(tmp_path):
    from hilal.batches import epoch_generator
    from hilal.train import train_batch

    _write_cifar(tmp_path, "cifar10", 50, 20)
    s = load_dataset("cifar10", seed=0, root=tmp_path, download=False)
    dev = torch.device("cpu")
    raw = next(iter(loader(s.train, 8, shuffle=True, seed=3, drop_last=True)))
    a = train_batch(s, raw, dev, epoch_generator(2, 1))
    assert a[0].dtype == torch.float32 and a[0].shape == (8, 3, 32, 32) and torch.equal(a[1], raw[1])
    assert torch.equal(a[0], s.augment(raw[0], epoch_generator(2, 1)))
    assert torch.equal(train_batch(s, raw, dev, epoch_generator(2, 1))[0], a[0])  # seeded
    assert not torch.equal(train_batch(s, raw, dev, epoch_generator(2, 2))[0], a[0])
    plain = load_dataset("cifar10", seed=0, root=tmp_path, download=False, augment=False)
    b = next(iter(loader(plain.train, 8, shuffle=True, seed=3, drop_last=True)))
    out = train_batch(plain, b, dev, epoch_generator(2, 1))
    assert torch.equal(out[0], b[0]) and torch.equal(out[1], b[1])


def _bad(tmp_path, name, edit):
    _write_cifar(tmp_path, name, 50 if name == "cifar10" else 500, 20)
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    return folder, edit(folder)


def _repickle(path, change):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    _dump(change(d), path)
    return path


@pytest.mark.parametrize("name,edit,words", [
    ("cifar10", lambda f: _repickle(f / "data_batch_2", lambda d: {**d, b"data": d[b"data"][:, :3000]}),
     "N x 3072 uint8"),
    ("cifar10", lambda f: _repickle(f / "data_batch_4", lambda d: {**d, b"data": d[b"data"].astype(np.float32)}),
     "float32"),
    ("cifar10", lambda f: _repickle(f / "test_batch", lambda d: {k: v for k, v in d.items() if k != b"labels"}),
     "no 'labels' entry"),
    ("cifar10", lambda f: _repickle(f / "data_batch_1", lambda d: {**d, b"labels": d[b"labels"][:-1]}),
     "one per image"),
    ("cifar10", lambda f: _repickle(f / "data_batch_5", lambda d: {**d, b"labels": [10] * len(d[b"labels"])}),
     "expected 0..9"),
    ("cifar10", lambda f: _repickle(f / "batches.meta", lambda d: {b"label_names": ["a", "b"]}), "10 class names"),
    ("cifar100", lambda f: _repickle(f / "train", lambda d: {k: v for k, v in d.items() if k != b"fine_labels"}),
     "no 'fine_labels' entry"),
    ("cifar100", lambda f: _repickle(f / "test", lambda d: [d]), "expected a pickled dict"),
    ("cifar100", lambda f: (f / "meta").write_bytes(b"\x80\x02}q\x00(X") and f / "meta", "not a readable CIFAR pickle"),
])
def test_malformed_cifar_files_give_one_line_naming_the_file(tmp_path, name, edit, words):
    _, path = _bad(tmp_path, name, edit)
    with pytest.raises(HilalError) as e:
        load_dataset(name, seed=0, root=tmp_path, download=False)
    msg = str(e.value)
    assert str(path) in msg and words in msg and "\n" not in msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chain


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 10))


def test_training_on_augmented_cifar_is_deterministic_and_resumes(tmp_path, monkeypatch):
    import dataclasses

    import hilal.train as train_mod
    from hilal.batches import normalize
    from hilal.train import TrainConfig, train_digital

    _write_cifar(tmp_path / "data", "cifar10", 50, 20)
    s = load_dataset("cifar10", seed=0, root=tmp_path / "data", download=False)
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=8, seed=1)
    whole = train_digital(_tiny_net(), s, cfg, progress=False).state_dict()
    again = train_digital(_tiny_net(), s, cfg, progress=False).state_dict()
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    unaugmented = dataclasses.replace(s, augment=lambda x, g: normalize(x, s.augment.mean, s.augment.std))
    plain = train_digital(_tiny_net(), unaugmented, cfg, progress=False).state_dict()
    assert not all(torch.equal(whole[k], plain[k]) for k in whole)  # the loop applies the augmentation

    real_save = train_mod.atomic_torch_save

    class Interrupted(Exception):
        pass

    def save_then_stop(obj, path):
        real_save(obj, path)
        if obj["epoch"] == 2:
            raise Interrupted

    monkeypatch.setattr(train_mod, "atomic_torch_save", save_then_stop)
    with pytest.raises(Interrupted):
        train_digital(_tiny_net(), s, cfg, progress=False, checkpoint=tmp_path / "run.pt")
    monkeypatch.setattr(train_mod, "atomic_torch_save", real_save)
    resumed = train_digital(_tiny_net(), s, cfg, progress=False, checkpoint=tmp_path / "run.pt").state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # epoch 3's crops drawn as uninterrupted


def test_finetune_round_augments_every_batch_on_the_device(tmp_path):
    import dataclasses

    from hilal.train import FinetuneConfig, finetune_round, make_optimizer

    _write_cifar(tmp_path, "cifar10", 50, 20)
    s = load_dataset("cifar10", seed=0, root=tmp_path, download=False)
    seen = []

    def recorded(x, g):
        seen.append((x.dtype, x.shape))
        return s.augment(x, g)

    cfg = FinetuneConfig(steps=7, batch_size=8)
    model = _tiny_net()
    finetune_round(model, dataclasses.replace(s, augment=recorded), cfg, make_optimizer(model, cfg), seed=2)
    assert seen == [(torch.uint8, (8, 3, 32, 32))] * 7  # 5 batches an epoch: two epochs, every batch augmented
