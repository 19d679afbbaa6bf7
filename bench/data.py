"""Is a CIFAR-10 training epoch waiting on data? ResNet-20 steps through the kit's training batches
(``hilal.data.loader`` and :func:`hilal.train.train_batch`, as ``train_digital`` calls them: in-memory
uint8 CIFAR sliced per batch, cropped, flipped and normalized on the model's device), with wall time split
into waiting for data (iterator next, move to the device, augmentation) and compute (forward, backward,
optimizer step); side by side, in the same loop, the previous path's data time: torchvision's CIFAR10
reader with per-sample PIL transforms and a single-process DataLoader.

The data is a full-size CIFAR-10 folder (50,000 train + 10,000 test random uint8 images in the official
"python version" pickle layout) written to a temporary directory and read through
``hilal.data.load_dataset("cifar10", root=...)``.

Usage: python bench/data.py [--batches N] [--old-batches M] [--batch-size B] [--threads T] [--device D]
       [--out bench/results/data.json]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def write_cifar10(root: Path, seed: int = 0) -> Path:
    """A full-size CIFAR-10 folder of random images in the official layout (``str`` keys: what the official
    Python 2 pickles give under ``encoding="latin1"``, as torchvision reads them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [*((f"data_batch_{i}", 10_000) for i in range(1, 6)), ("test_batch", 10_000)]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.permutation(np.arange(n) % 10).tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10_000, "num_vis": 3072}, f, protocol=2)
    return folder


def previous_loader(root: Path, train_indices: list[int], batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """The previous implementation's training loader: torchvision's CIFAR10 (files on disk read without
    comparing their md5), RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize per sample
    through PIL, a Subset of the training indices, one process."""
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms as T

    class LocalCIFAR10(torchvision.datasets.CIFAR10):  # as hilal.data subclassed it before
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = Subset(LocalCIFAR10(str(root), train=True, transform=aug, download=False), train_indices)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      drop_last=True, num_workers=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_next(it: Any, device: torch.device) -> tuple[Any, float]:
    """The next batch on ``device`` and the seconds it took (next, move, and for the kit's path augmentation)."""
    from hilal.device import to_device

    t0 = time.perf_counter()
    batch = to_device(next(it), device)
    _sync(device)
    return batch, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hilal.batches import epoch_generator
    from hilal.data import load_dataset, loader
    from hilal.models import model_for
    from hilal.runtime import keep_freed_memory, machine_info, utc_now
    from hilal.train import TrainConfig, task_loss, train_batch

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = TrainConfig(batch_size=args.batch_size, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="hilal-bench-data-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_cifar10(root, args.seed)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        splits = load_dataset("cifar10", seed=args.seed, root=root, download=False)
        load_s = time.perf_counter() - t0
        epoch_batches = len(splits.train) // cfg.batch_size
        n = epoch_batches if args.batches == 0 else min(args.batches, epoch_batches)
        n_old = min(args.old_batches, epoch_batches)
        t0 = time.perf_counter()
        old = iter(previous_loader(root, list(splits.train.indices), cfg.batch_size, cfg.seed))
        old_open_s = time.perf_counter() - t0

        torch.manual_seed(cfg.seed)
        model = model_for("resnet20", splits).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
        # what train_digital iterates, the move and augmentation moved inside the timed next()
        gen = epoch_generator(cfg.seed, 0)
        new = (train_batch(splits, b, device, gen)
               for b in loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True))
        new_data, compute, old_data = [], [], []
        for i in range(n):
            while len(old_data) < -(-(i + 1) * n_old // n):  # spread over the steps: load hits both paths alike
                old_data.append(_timed_next(old, device)[1])
            batch, dt = _timed_next(new, device)
            new_data.append(dt)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)  # the body of train_digital's loop
            loss = task_loss(model, batch)
            loss.backward()
            opt.step()
            _sync(device)
            compute.append(time.perf_counter() - t0)
    w = args.warmup
    nd, cp, od = new_data[w:], compute[w:], old_data[w:]
    new_share = sum(nd) / (sum(nd) + sum(cp))
    old_per_batch = sum(od) / len(od)
    old_total = old_per_batch * len(cp)  # extrapolated to the batches the new path timed
    old_share = old_total / (old_total + sum(cp))
    scope = ("a full epoch" if n == epoch_batches else
             f"{n} of the epoch's {epoch_batches} batches (a full ResNet-20 epoch on a shared CPU takes minutes)")
    return {
        "kind": "data", "date": utc_now("seconds"), "machine": machine_info(device.type),
        "config": {"model": "resnet20", "dataset": "cifar10 (random images, official pickle layout)",
                   "batch_size": cfg.batch_size, "optimizer": "SGD nesterov (TrainConfig defaults)",
                   "batches": n, "old_batches": n_old, "warmup_excluded": w, "epoch_batches": epoch_batches,
                   "threads": args.threads, "seed": cfg.seed},
        "notes": [f"Measured {scope}; the first {w} batches of each path are left out of every number.",
                  f"The previous path's data time was measured on {n_old} batches, spread evenly between the new "
                  f"path's steps in the same loop, and extrapolated (mean per batch) to the {len(cp)} timed "
                  "batches and to the epoch; its share assumes the same compute time per batch.",
                  "data = iterator next + move to the device + batch augmentation (the previous path augments "
                  "per sample inside next); compute = zero_grad + forward + loss + backward + step.",
                  *(["On a CPU the step's compute dominates both paths' shares; on a GPU, where a step takes "
                     "milliseconds, the per-batch data times decide them."] if device.type == "cpu" else [])],
        "write_s": write_s, "load_s": load_s, "previous_open_s": old_open_s,
        "new": {"data_s": sum(nd), "compute_s": sum(cp), "data_share": new_share,
                "data_ms_median": 1e3 * statistics.median(nd), "compute_ms_median": 1e3 * statistics.median(cp),
                "epoch_data_s_extrapolated": sum(nd) / len(nd) * epoch_batches},
        "previous": {"data_s_measured": sum(od), "measured_batches": len(od),
                     "data_ms_median": 1e3 * statistics.median(od), "data_s_extrapolated": old_total,
                     "data_share_extrapolated": old_share, "epoch_data_s_extrapolated": old_per_batch * epoch_batches},
        "data_ms_median_ratio_previous_over_new": statistics.median(od) / statistics.median(nd),
        "target_data_share": 0.10, "meets_target": new_share < 0.10,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=100, help="training batches to time; 0 = a full epoch")
    p.add_argument("--old-batches", type=int, default=300, help="batches of the previous PIL path to time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="first batches of each path left out of the numbers")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/data.json")
    args = p.parse_args(argv)
    for name in ("batches", "old_batches", "warmup"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device not in (None, "cpu", "cuda"):
        p.error(f"--device must be cpu or cuda; got {args.device!r}")
    if args.old_batches <= args.warmup or (args.batches and args.batches <= args.warmup):
        p.error("--batches and --old-batches must exceed --warmup")
    from hilal.paths import atomic_json_dump

    result = run(args)
    atomic_json_dump(result, args.out)
    new, old = result["new"], result["previous"]
    print(f"data share {new['data_share']:.1%} (previous path {old['data_share_extrapolated']:.1%}); "
          f"data per batch {new['data_ms_median']:.1f} ms vs {old['data_ms_median']:.1f} ms; "
          f"compute {new['compute_ms_median']:.0f} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
