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
    distillation_loss,
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


class _QA(nn.Module):
    """Start and end logits over 5 positions from token ids, like a QA head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(7, 2)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.emb(input_ids)
        return out[..., 0], out[..., 1]


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """T^2 * mean over rows of sum_c p_c (log p_c - log q_c), in float64 from the softmax's definition."""
    def soft(z: torch.Tensor) -> torch.Tensor:
        e = torch.exp(z.double() / t - (z.double() / t).max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)

    p, q = soft(teacher), soft(student)
    return float(t ** 2 * (p * (p.log() - q.log())).sum(dim=-1).mean())


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_distillation_loss_matches_the_definition(t):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    assert float(distillation_loss(student, teacher, t)) == pytest.approx(_kl_by_hand(student, teacher, t), rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("distill", [0.0, 0.3, 1.0])
def test_task_loss_mixes_the_task_and_the_distillation(digits, distill):
    student, teacher = _mlp(1).eval(), _mlp(2).eval()
    x, y = digits.train.tensors[0][:8], digits.train.tensors[1][:8]
    with torch.no_grad():
        ce = float(nn.functional.cross_entropy(student(x), y))
        kd = _kl_by_hand(student(x), teacher(x), 4.0)
        got = float(task_loss(student, (x, y), teacher, distill, 4.0))
    assert got == pytest.approx((1 - distill) * ce + distill * kd, rel=1e-5)
    # without a teacher, or with distill 0, it is the task loss exactly
    assert torch.equal(task_loss(student, (x, y), teacher, 0.0), task_loss(student, (x, y)))

    qa, qa_teacher = _QA(0), _QA(1)
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "start_positions": torch.tensor([0, 1, 2, 3]),
             "end_positions": torch.tensor([1, 2, 3, 4])}
    with torch.no_grad():
        (s, e), (ts, te) = qa(ids), qa_teacher(ids)
        ce_qa = float(nn.functional.cross_entropy(s, batch["start_positions"])
                      + nn.functional.cross_entropy(e, batch["end_positions"])) / 2
        kd_qa = (_kl_by_hand(s, ts, 2.0) + _kl_by_hand(e, te, 2.0)) / 2
        got_qa = float(task_loss(qa, batch, qa_teacher, distill, 2.0))
    assert got_qa == pytest.approx((1 - distill) * ce_qa + distill * kd_qa, rel=1e-5)


def test_distillation_pulls_the_student_towards_the_teacher(digits):
    """Fine-tuned on the teacher's soft outputs alone, a student comes much closer to them than when it is
    fine-tuned on the labels for as many steps."""
    teacher = _mlp(0)
    train_digital(teacher, digits, TrainConfig(epochs=2, lr=0.05, seed=0), progress=False)
    teacher.eval()
    x = digits.calib.tensors[0]

    def gap(m: nn.Module) -> float:
        with torch.no_grad():
            return float(distillation_loss(m.eval()(x), teacher(x), 4.0))

    gaps = {}
    for distill in (0.0, 1.0):
        student = _mlp(1)
        cfg = FinetuneConfig(digital_lr=0.05, steps=40, distill=distill)
        finetune_round(student, digits, cfg, make_optimizer(student, cfg), seed=0, teacher=teacher)
        gaps[distill] = gap(student)
    assert gaps[1.0] < 0.5 * gaps[0.0]
    assert gaps[1.0] < 0.5 * gap(_mlp(1))


def test_distillation_settings_are_checked(digits):
    with pytest.raises(HilalError, match=r"distill must lie in \[0, 1\]"):
        FinetuneConfig(distill=1.5)
    with pytest.raises(HilalError, match="temperature must be positive"):
        FinetuneConfig(distill=0.5, temperature=0.0)
    student = _mlp(1)
    cfg = FinetuneConfig(steps=1, distill=0.5)
    with pytest.raises(HilalError, match="needs the digital model as teacher"):
        finetune_round(student, digits, cfg, make_optimizer(student, cfg))


def test_a_training_split_smaller_than_one_batch_is_refused(digits):
    """With the last partial batch dropped, such a split has no step: training would do nothing (digital) or
    loop forever (fine-tuning asks for a number of steps)."""
    import dataclasses

    n = len(digits.train)
    small = dataclasses.replace(digits, train=torch.utils.data.Subset(digits.train, range(40)))
    torch.manual_seed(0)
    model = _MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(HilalError, match="digital training: the training split holds 40 samples, fewer than one "
                                         "batch of 64"):
        train_digital(model, small, TrainConfig(epochs=1, batch_size=64), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    cfg = FinetuneConfig(steps=2, batch_size=64)
    with pytest.raises(HilalError, match="fine-tuning: the training split holds 40 samples"):
        finetune_round(model, small, cfg, make_optimizer(model, cfg))
    # a batch that fits trains as before
    assert n >= 64
    train_digital(model, small, TrainConfig(epochs=1, batch_size=40), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
