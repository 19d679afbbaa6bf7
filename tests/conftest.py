"""Shared seeded tiny cases."""

from __future__ import annotations

import os

import pytest
import torch

from hilal.runtime import keep_freed_memory

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HILAL_OFFLINE", "1")
keep_freed_memory()  # as the hilal command does (hilal.runtime); the notebook kernels inherit it


def pytest_collection_modifyitems(config, items):
    # The notebooks' file, the longest by far, runs first: with two workers (pytest-xdist, a file at a time)
    # the other takes every other file meanwhile.
    items.sort(key=lambda item: item.path.name != "test_notebooks.py")
    # The paper-scale dry run only when a -m expression names it: any other (-m "not slow") keeps it out
    if "paper" not in (config.getoption("markexpr") or ""):
        paper = [item for item in items if "paper" in item.keywords]
        if paper:
            config.hook.pytest_deselected(items=paper)
            items[:] = [item for item in items if "paper" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    from hilal.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def resnet8_digits(digits):
    """A digitally trained ResNet-8 on digits (cached under data/checkpoints)."""
    from hilal.train import trained_model

    return trained_model("resnet8", digits, seed=0, progress=False)
