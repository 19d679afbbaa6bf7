"""A dry run of the paper profile on format-true synthetic data (see docs/design.md, "paper scale").

:func:`prepare` writes, into a data folder of its own, files in the exact formats the kit's loaders read
(:mod:`hilal.synthetic`):
CIFAR-10 and CIFAR-100 (the "python version" archives' pickles, Python 2 strings and all), an ImageFolder
tree of real JPEG files, SQuAD v1.1 JSON, and a Hugging Face folder ``models/mobilebert-uncased`` with a
WordPiece tokenizer of MobileBERT's vocabulary size and a randomly initialised full-size MobileBERT (the
pretrained weights are not available offline; random weights have every shape of the real ones). Then
``hilal reproduce --profile dryrun`` with ``HILAL_DATA_DIR`` pointing there executes every notebook with the
paper's models, datasets and methods and every count cut to the minimum, and :mod:`hilal.cost` projects what
the full paper profile costs. ``python -m hilal.dryrun`` does all three.

Images and labels are random, so accuracies are chance: the dry run checks that the paper run gets through,
and what it costs, not what it finds. A folder :func:`prepare` wrote carries :data:`hilal.paths.DRYRUN_MARKER`
(listing what it wrote); it refuses any other non-empty folder, so it never mixes random weights or images into
real data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hilal.paths import DRYRUN_MARKER, atomic_json_dump, is_dryrun_dir
from hilal.registry import HilalError, check_choice
from hilal.synthetic import cifar10_files, cifar100_files, imagenet_files, squad_files, write_mobilebert, write_vit_b16

SIZES: dict[str, dict[str, int]] = {
    # the real datasets' counts: CIFAR 50,000 + 10,000 images, SQuAD v1.1 87,599 + 10,570 questions
    "paper": {"cifar_train": 50_000, "cifar_test": 10_000, "squad_train": 87_599, "squad_dev": 10_570,
              "imagenet_classes": 4, "imagenet_train": 32, "imagenet_val": 3},
    # counts a shared 2-core CPU gets through (every shape as in "paper"; 2,560 training images give a
    # calibration split of 512, two curvature batches of 256); 32 ImageNet images a class: half of them are the
    # calibration split, and the rest must hold one fine-tuning batch of 64
    "cpu": {"cifar_train": 2_560, "cifar_test": 512, "squad_train": 96, "squad_dev": 32,
            "imagenet_classes": 4, "imagenet_train": 32, "imagenet_val": 2},
}
"""Sample counts of :func:`prepare` by size name."""


def _write_folder(root: Path, rel: str, write: Callable[[Path], list[Path]], written: dict[str, int]) -> int:
    """Write a folder at once unless the manifest lists files in it and each has its listed size."""
    mine = {k: v for k, v in written.items() if k.startswith(rel + "/")}
    if mine and all((root / k).is_file() and (root / k).stat().st_size == v for k, v in mine.items()):
        return 0
    files = write(root / rel)
    written.update({p.relative_to(root).as_posix(): p.stat().st_size for p in files})
    return len(files)


def _write_group(root: Path, folder: str, files: dict[str, Callable[[], bytes]], written: dict[str, int],
                 sums: dict[str, str]) -> int:
    """Write the files of one dataset, skipping those the manifest lists with their present size and MD5 sum
    (recorded in ``sums``: the CIFAR reader checks the synthetic files against them, as it checks real files
    against the published ones)."""
    count = 0
    for name, make in files.items():
        rel = f"{folder}/{name}"
        path = root / rel
        if path.is_file() and written.get(rel) == path.stat().st_size and rel in sums:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make()
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
        written[rel] = len(data)
        sums[rel] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        count += 1
    return count


DATASETS = ("cifar10", "cifar100", "imagenet", "squad")
"""What :func:`prepare` can write."""


def counts_of(size: str | dict[str, int]) -> dict[str, int]:
    """The sample counts of a size: a name of :data:`SIZES`, or a mapping of (some of) its keys, the rest as in
    ``"cpu"``."""
    if isinstance(size, str):
        return dict(SIZES[check_choice("dry-run size", size, tuple(SIZES))])
    bad = sorted(set(size) - set(SIZES["cpu"]))
    if bad or not all(isinstance(v, int) and not isinstance(v, bool) for v in size.values()):
        raise HilalError(f"dry-run size keys must be integers among {', '.join(SIZES['cpu'])}; got {size!r}")
    return {**SIZES["cpu"], **size}


def prepare(root: str | Path, size: str | dict[str, int] = "paper", datasets: tuple[str, ...] | list[str] = DATASETS,
            weights: bool = True, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write the synthetic data sets under ``root``: the counts of ``size`` (:func:`counts_of`), the layout of the
    real files. With ``squad``, MobileBERT's tokenizer folder too, and with ``weights`` its random weights.
    Idempotent: a file the manifest (:data:`hilal.paths.DRYRUN_MARKER`) lists with its present size is not
    written again. ``root`` must be empty, missing, or a folder this function wrote. Returns the manifest."""
    n = counts_of(size)
    for d in datasets:
        check_choice("dry-run dataset", d, DATASETS)
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not is_dryrun_dir(root):
        raise HilalError(f"{root} holds files but no {DRYRUN_MARKER}: prepare() writes only into an empty folder or "
                         f"one it wrote (never into real data); choose another folder")
    root.mkdir(parents=True, exist_ok=True)
    marker = root / DRYRUN_MARKER
    manifest = json.loads(marker.read_text()) if marker.is_file() else {}
    if manifest and manifest.get("counts") not in (None, n):
        raise HilalError(f"{root} was prepared with counts {manifest.get('counts')}, not {n}; use another folder "
                         f"for each size (valid sizes: {', '.join(SIZES)}, or a mapping of counts)")
    written: dict[str, int] = dict(manifest.get("files", {}))
    sums: dict[str, str] = dict(manifest.get("md5", {}))
    groups = {"cifar10": ("cifar-10-batches-py", lambda: cifar10_files(n["cifar_train"], n["cifar_test"], seed)),
              "cifar100": ("cifar-100-python", lambda: cifar100_files(n["cifar_train"], n["cifar_test"], seed)),
              "imagenet": ("imagenet", lambda: imagenet_files(n["imagenet_classes"], n["imagenet_train"],
                                                              n["imagenet_val"], seed)),
              "squad": ("squad", lambda: squad_files(n["squad_train"], n["squad_dev"], seed))}
    for name in datasets:
        folder, files = groups[name]
        count = _write_group(root, folder, files(), written, sums)
        atomic_json_dump({"counts": n, "seed": seed, "files": written, "md5": sums}, marker)
        if progress:
            print(f"[dryrun] {name}: {count} file(s) written under {root / folder}", flush=True)
    if "imagenet" in datasets and weights:
        count = _write_folder(root, "models/vit-base-patch16-224",
                              lambda f: write_vit_b16(f, seed, n["imagenet_classes"]), written)
        if progress:
            print(f"[dryrun] models/vit-base-patch16-224: {count} file(s) written", flush=True)
    if "squad" in datasets:
        count = _write_folder(root, "models/mobilebert-uncased",
                              lambda f: write_mobilebert(f, seed, weights), written)
        if progress:
            print(f"[dryrun] models/mobilebert-uncased: {count} file(s) written", flush=True)
    manifest = {"counts": n, "seed": seed, "files": written, "md5": sums}
    atomic_json_dump(manifest, marker)
    return manifest


# --- the dry run -------------------------------------------------------------------------------------------

PROFILE = "dryrun"
"""The profile the dry run executes (``notebooks/profiles/dryrun.yaml``)."""

SIZE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    # MobileBERT trains on 32 windows of 384 tokens a step: about 20 GB on a CPU, past a shared machine's memory,
    # so on "cpu" notebook 08 runs the SQuAD path (same files, tokenizer and windows) with mobilebert_tiny
    # (hilal.cost still measures full-size MobileBERT, per window); every method maps the query and value
    # projections of ViT-B/16's first block only (LionHeart and the paper variant retrain once per candidate: 74
    # stages over the whole model) and fine-tunes on 8 images a step (64 at 224x224 hold about 10 GB of
    # activations); its curvature takes batches of one sample: a batch of 4 holds about 4.5 GB of double-backward
    # graph per operator, past 24 GB with both operators and a product in flight
    "cpu": {"08": {"QA_MODEL": "mobilebert_tiny", "VIT_LAYERS": ["*.layers.0.attention.[qv]_proj"], "FINETUNE_BATCH": 8,
                   "HESSIAN": {"probes": 2, "power_iters": 2, "eli_samples": 2, "first_order_samples": 2,
                               "max_samples": 2, "batch_size": 1}}},
}
"""Per size, notebook number -> parameters that replace the profile's for that notebook."""

MEASURE_BATCH: dict[str, dict[str, int]] = {"paper": {}, "cpu": {"squad": 1, "imagenet": 8}}
"""Per size, dataset -> the largest batch :func:`hilal.cost.measure_units` times a step at (scaled per sample to
the paper's batch): full-size MobileBERT's training batch, and ViT-B/16's all-analog fine-tuning batch of 64 at
224x224, do not fit a small machine's memory."""


def default_root(size: str = "paper") -> Path:
    """``data/dryrun-<size>`` in the checkout (beside, never inside, the real data's folders)."""
    from hilal.paths import project_root

    return project_root() / "data" / f"dryrun-{check_choice('dry-run size', size, tuple(SIZES))}"


def run_notebooks(root: str | Path, size: str = "paper", only: str | None = None, threads: int | None = None,
                  progress: bool = True) -> Any:
    """Execute the :data:`PROFILE` notebooks (``only``: some of them) on the data under ``root`` (prepared
    first), with :data:`SIZE_OVERRIDES` [``size``]; returns :func:`hilal.reproduce.reproduce`'s table, a
    failed notebook's row included (``status``, ``error``) instead of raised."""
    import os

    import pandas as pd

    from hilal.reproduce import ReproduceError, list_notebooks, reproduce

    check_choice("dry-run size", size, tuple(SIZES))
    prepare(root, size, progress=progress)
    os.environ["HILAL_DATA_DIR"] = str(Path(root).resolve())
    keys = list(list_notebooks()) if only is None else [f"{int(k):02d}" for k in str(only).split(",")]
    groups: dict[str, list[str]] = {}
    for k in keys:  # notebooks with the same overrides run together
        groups.setdefault(json.dumps(SIZE_OVERRIDES[size].get(k, {}), sort_keys=True), []).append(k)
    tables = []
    for over, nbs in groups.items():
        try:
            tables.append(reproduce(PROFILE, only=nbs, overrides=json.loads(over), threads=threads,
                                    progress=progress))
        except ReproduceError as e:
            tables.append(e.table)
    return pd.concat(tables, ignore_index=True).sort_values("notebook", ignore_index=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m hilal.dryrun [--size paper|cpu] [--root DIR] [--only NN] [--no-notebooks] [--out JSON]
    [--units JSON] [--repeats N] [--threads N]``: prepare the synthetic data, execute the dry-run profile,
    measure unit costs and print and write the projected cost of the paper profile
    (:func:`hilal.cost.cost_report`)."""
    import argparse

    import pandas as pd

    from hilal.cost import DEFAULT_OUT, cost_report
    from hilal.runtime import keep_freed_memory

    p = argparse.ArgumentParser(prog="python -m hilal.dryrun", description=main.__doc__)
    p.add_argument("--size", default="paper", help=f"sample counts: {', '.join(SIZES)}")
    p.add_argument("--root", default=None, help="data folder of the synthetic files (default data/dryrun-<size>)")
    p.add_argument("--only", default=None, help="notebook number(s), e.g. 03 or 00,05")
    p.add_argument("--no-notebooks", action="store_true", help="measure and project only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (kernels and measurements)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file of the cost table")
    p.add_argument("--units", default=None, help="reuse the unit costs of an earlier JSON file instead of measuring")
    p.add_argument("--repeats", type=int, default=3, help="timings per unit cost (their median counts)")
    args = p.parse_args(argv)
    check_choice("dry-run size", args.size, tuple(SIZES))
    keep_freed_memory()  # as the hilal command and the notebooks do (hilal.runtime)
    root = Path(args.root) if args.root else default_root(args.size)
    if not args.no_notebooks:
        runs = run_notebooks(root, args.size, args.only, args.threads)
        print(runs[["notebook", "name", "status", "seconds", "error"]].to_string(index=False), flush=True)
    else:
        prepare(root, args.size)
    units = pd.DataFrame(json.loads(Path(args.units).read_text())["units"]) if args.units else None
    table = cost_report(root, out=args.out, threads=args.threads, repeats=args.repeats,
                        max_batch=MEASURE_BATCH[args.size], units=units)
    print(table.to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
