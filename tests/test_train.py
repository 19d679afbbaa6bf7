"""Digital training with resumable atomic checkpoints, the training cache, and noise-injection fine-tuning."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import hilal.train as train_mod
from hilal.analog import analog_tiles, get_preset, to_analog
from hilal.registry import HilalError
from hilal.train import (
    FinetuneConfig,
    TrainConfig,
    checkpoint_path,
    evaluate,
    finetune_round,
    make_optimizer,
    score,
    task_loss,
    train_digital,
    trained_model,
)


class _MLP(nn.Module):
    """Small enough to train in well under a second; dropout makes the result depend on the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _MLP()


CFG = TrainConfig(epochs=4, lr=0.05, batch_size=64, seed=3)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_learns_and_is_deterministic(digits):
    a = train_digital(_mlp(0), digits, CFG, progress=False)
    b = train_digital(_mlp(0), digits, CFG, progress=False)
    assert _same_state(a, b)
    assert score(a, digits, "test") > 0.85
    assert not a.training
    assert all(p.grad is None for p in a.parameters())  # no stale gradient of the last step


def test_resume_from_interrupted_checkpoint_equals_uninterrupted_run(digits, tmp_path, monkeypatch):
    ck = tmp_path / "run.pt"
    real_save = train_mod.atomic_torch_save
    saved: list[int] = []

    class Interrupted(Exception):
        pass

    def save_then_stop(obj, path):
        real_save(obj, path)
        saved.append(obj["epoch"])
        if obj["epoch"] == 2:
            raise Interrupted

    monkeypatch.setattr(train_mod, "atomic_torch_save", save_then_stop)
    with pytest.raises(Interrupted):
        train_digital(_mlp(0), digits, CFG, progress=False, checkpoint=ck)
    assert saved == [1, 2]
    assert torch.load(ck, weights_only=False)["epoch"] == 2

    # a different initialization: everything must come from the checkpoint
    resumed = train_digital(_mlp(7), digits, CFG, progress=False, checkpoint=ck)
    assert saved == [1, 2, 3, 4]  # resumed at epoch 2, trained epochs 3 and 4 only
    monkeypatch.setattr(train_mod, "atomic_torch_save", real_save)
    straight = train_digital(_mlp(0), digits, CFG, progress=False)
    assert _same_state(resumed, straight)


def test_checkpoint_with_other_settings_is_not_resumed(digits, tmp_path):
    ck = tmp_path / "run.pt"
    train_digital(_mlp(0), digits, TrainConfig(epochs=1, seed=3), progress=False, checkpoint=ck)
    a = train_digital(_mlp(0), digits, TrainConfig(epochs=2, seed=3), progress=False, checkpoint=ck)
    b = train_digital(_mlp(0), digits, TrainConfig(epochs=2, seed=3), progress=False)
    assert _same_state(a, b)
    assert torch.load(ck, weights_only=False)["epoch"] == 2


def test_checkpoint_write_is_atomic(digits, tmp_path, monkeypatch):
    ck = tmp_path / "ckpts" / "run.pt"
    real = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(obj, f, *args, **kwargs)
        with open(f, "wb") as fh:  # half a file, then the disk fills up
            fh.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="No space"):
        train_digital(_mlp(0), digits, TrainConfig(epochs=2, seed=3), progress=False, checkpoint=ck)
    assert calls["n"] == 2
    assert os.listdir(ck.parent) == ["run.pt"]  # no temporary file left behind
    st = torch.load(ck, weights_only=False)
    assert st["epoch"] == 1
    model = _MLP()
    model.load_state_dict(st["model"])


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    """Results and checkpoints are readable as any file the user writes (umask applies), not 0600."""
    from hilal.paths import atomic_json_dump, atomic_torch_save

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for p in (atomic_json_dump({"a": 1}, tmp_path / "r.json"), atomic_torch_save({"a": 1}, tmp_path / "c.pt")):
        assert os.stat(p).st_mode == os.stat(plain).st_mode
    old = os.umask(0o022)
    try:
        assert os.stat(atomic_json_dump({"a": 2}, tmp_path / "s.json")).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "plain.txt", "r.json", "s.json"]


def test_non_finite_loss_raises(digits):
    class Exploding(_MLP):
        def forward(self, x):
            return super().forward(x) * float("inf")

    torch.manual_seed(0)
    with pytest.raises(HilalError, match=r"non-finite loss \((nan|inf)\) during digital training \(epoch 0\)"):
        train_digital(Exploding(), digits, TrainConfig(epochs=1), progress=False)


def test_trained_model_caches(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path))
    cfg = TrainConfig(epochs=1, seed=0)
    first = trained_model("resnet8", digits, seed=0, cfg=cfg, progress=False, device="cpu")
    path = checkpoint_path("resnet8", digits, 0, cfg)
    assert path.parent == tmp_path / "checkpoints" and path.exists()
    mtime = path.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("trained again instead of loading the cached checkpoint")

    monkeypatch.setattr(train_mod, "train_digital", no_training)
    second = trained_model("resnet8", digits, seed=0, cfg=cfg, progress=False, device="cpu")
    assert path.stat().st_mtime_ns == mtime
    assert _same_state(first, second)
    assert not second.training
    # other settings -> another cache entry, so training happens
    with pytest.raises(AssertionError, match="trained again"):
        trained_model("resnet8", digits, seed=0, cfg=TrainConfig(epochs=2, seed=0), progress=False)


def test_evaluate_matches_a_direct_count(digits):
    model = train_digital(_mlp(1), digits, TrainConfig(epochs=1, seed=1), progress=False)
    x, y = digits.calib.tensors
    with torch.no_grad():
        expect = int((model(x).argmax(1) == y).sum()) / len(y)
    assert evaluate(model, digits, "calib")["accuracy"] == pytest.approx(expect, abs=1e-12)
    with pytest.raises(HilalError, match="train, calib, test"):
        evaluate(model, digits, "validation")


def test_batch_without_labels_raises(digits):
    model = _mlp(0).eval()
    x = digits.train.tensors[0][:4]
    with pytest.raises(HilalError, match="without labels"):
        task_loss(model, (x,))
    with pytest.raises(HilalError, match="without labels"):
        task_loss(model, x)
    with pytest.raises(HilalError, match="start_positions"):
        task_loss(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    y = digits.train.tensors[1][:4]
    expect = nn.functional.cross_entropy(model(x), y)
    assert torch.equal(task_loss(model, (x, y)), expect)


def test_finetune_round_updates_analog_weights_within_clip(resnet8_digits, digits):
    layers = ["conv1", "layer2.0.conv1", "fc"]
    model = to_analog(resnet8_digits, layers, "pcm")
    cfg = FinetuneConfig(analog_lr=0.5, digital_lr=1e-2, steps=3, batch_size=32)
    opt = make_optimizer(model, cfg)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    tiles = analog_tiles(model)
    tile_ids = {id(t.tile.weight) for t in tiles}
    assert tile_ids <= by_lr[0.5] and not tile_ids & by_lr[1e-2]
    assert id(model.get_submodule("layer1.0.conv1").weight) in by_lr[1e-2]

    before = [t.tile.weight.detach().clone() for t in tiles]
    digital_before = model.get_submodule("layer1.0.conv1").weight.detach().clone()
    loss = finetune_round(model, digits, cfg, opt, seed=0)
    assert loss == loss and 0 < loss < 5  # a finite mean cross-entropy
    assert not model.training
    clip = get_preset("pcm").clip.fixed_value
    for t, w0 in zip(tiles, before, strict=True):
        w = t.tile.weight.detach()
        assert not torch.equal(w, w0)
        assert float(w.abs().max()) <= clip + 1e-6
    assert not torch.equal(model.get_submodule("layer1.0.conv1").weight, digital_before)
    # the digital original is untouched
    assert resnet8_digits.get_submodule("layer1.0.conv1").weight.requires_grad
