"""The public API on a user's own model, DataLoaders and loss, as the README shows it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hilal
from hilal.api import as_splits
from hilal.registry import HilalError

TINY_HESSIAN = {"probes": 8, "power_iters": 4, "eli_samples": 4, "first_order_samples": 4, "max_samples": 128,
                "gauss_newton": "off"}
TINY_MAPPING = {"reps": 2, "patience": 1, "max_rounds": 1, "finetune": {"steps": 4}, "preset": "pcm_harsh",
                "hessian": {"probes": 4, "power_iters": 2, "eli_samples": 2, "first_order_samples": 2,
                            "max_samples": 64}}


def _user_setup(batch_size: int = 50) -> tuple[nn.Module, tuple[DataLoader, DataLoader, DataLoader], list[int]]:
    """What a user brings: an ``nn.Sequential``, plain DataLoaders with their own collate, a trained model."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    seen: list[int] = []

    def collate(items):  # the user's collate: records every batch it builds
        seen.append(len(items))
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    parts = (slice(0, 1200), slice(1200, 1500), slice(1500, None))
    loaders = tuple(DataLoader(TensorDataset(x[p], y[p]), batch_size=batch_size, shuffle=i == 0, collate_fn=collate,
                               generator=torch.Generator().manual_seed(0)) for i, p in enumerate(parts))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for xb, yb in loaders[0]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    seen.clear()
    return model.eval(), loaders, seen


def test_analyze_and_allocate_on_own_model_loaders_and_loss():
    model, loaders, seen = _user_setup()

    def loss_fn(m, batch):  # a custom loss: twice the cross-entropy
        return 2 * nn.functional.cross_entropy(m(batch[0]), batch[1])

    metrics = hilal.analyze(model, loaders, "pcm_harsh", loss_fn=loss_fn, progress=False, **TINY_HESSIAN)
    plain = hilal.analyze(model, loaders, "pcm_harsh", progress=False, **TINY_HESSIAN)
    assert metrics["layer"].tolist() == ["0", "2", "5", "7"]
    assert set(metrics["cluster"]) <= {"robust", "sensitive"}
    # the loss is the user's: every curvature (trace, top eigenvalue, ELI) scales with it, to rounding
    for col in ("trace", "lambda_max", "eli"):
        np.testing.assert_allclose(metrics[col], 2 * plain[col], rtol=1e-4, atol=1e-12)
    assert seen and set(seen) == {50}, "the user's collate and batch size built every batch"

    result = hilal.allocate(model, loaders, "hilal", loss_fn=loss_fn, recheck_reps=2, progress=False,
                            **TINY_MAPPING)
    record = result.to_dict()
    assert set(record["analog_layers"]) <= set(metrics["layer"])
    for key in ("method", "analog_mac_share", "accuracy_mean", "accuracy_std", "fp_accuracy", "timings", "recheck"):
        assert key in record
    json.dumps(record)  # the record hilal map writes
    fp = sum(int((model(x).argmax(1) == y).sum()) for x, y in loaders[2]) / len(loaders[2].dataset)
    assert record["fp_accuracy"] == pytest.approx(fp)
    assert result.model is not None and result.model is not model


def test_custom_score_replaces_accuracy():
    model, loaders, _ = _user_setup()

    def neg_loss(m, batches):  # a score where higher is better: minus the mean cross-entropy
        with torch.no_grad():
            return -float(np.mean([nn.functional.cross_entropy(m(x), y).item() for x, y in batches]))

    result = hilal.allocate(model, loaders, "all-digital", score_fn=neg_loss, progress=False, **TINY_MAPPING)
    assert result.fp_accuracy == pytest.approx(neg_loss(model, loaders[2]))


@pytest.mark.parametrize("data,msg", [
    ((1, 2), "registered dataset name"),
    ({"train": [], "calib": []}, "missing the split"),
    (([1], [2], [3]), "DataLoader or Dataset"),
    ("nope", "unknown dataset 'nope'"),
])
def test_bad_data_is_one_clear_error(data, msg):
    with pytest.raises(HilalError, match=msg):
        as_splits(data)


def test_bad_settings_fail_before_work():
    model = nn.Linear(2, 2)
    with pytest.raises(HilalError, match="unknown HessianConfig setting.*probez"):
        hilal.analyze(model, "digits", probez=3)
    with pytest.raises(HilalError, match="unknown method 'greedy'"):
        hilal.allocate(model, "digits", "greedy")
    with pytest.raises(HilalError, match="unknown FinetuneConfig setting"):
        hilal.allocate(model, "digits", finetune={"lr": 1})


def test_the_readme_example_runs_as_written():
    """The README's Python example, executed as it stands on a user's nn.Sequential and DataLoaders."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(example.strip().splitlines()) < 20
    model, loaders, _ = _user_setup()
    scope = {"model": model, "loaders": loaders}
    exec(compile(example, "README.md", "exec"), scope)
    result, metrics = scope["result"], scope["metrics"]
    assert set(result.analog_layers) <= set(metrics["layer"]) and 0 <= result.analog_mac_share <= 1
    assert scope["record"]["analog_layers"] == result.analog_layers
    assert scope["lionheart"].method == "lionheart"
