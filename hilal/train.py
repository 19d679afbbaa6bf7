"""Digital training, evaluation, and noise-injection (hardware-aware) fine-tuning, with checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import ANALOG_TYPES
from hilal.batches import epoch_generator
from hilal.checks import check_count, check_number
from hilal.data import LossFn, Splits, load_dataset, loader
from hilal.device import default_device, model_device, to_device  # also importable from here, as before
from hilal.models import model_for
from hilal.paths import atomic_torch_save, data_dir, load_tensors, locked, set_aside
from hilal.qa import qa_logits
from hilal.registry import HilalError, check_choice


@dataclass
class TrainConfig:
    """Digital training settings (SGD with Nesterov momentum and a cosine schedule)."""

    epochs: int = 15
    """Passes over the training split (0: none, the weights as built; for pretrained models, as loaded)."""
    lr: float = 0.05
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 penalty."""
    batch_size: int = 64
    """Mini-batch size."""
    seed: int = 0
    """Seed for initialization and shuffling."""
    optimizer: str = "sgd"
    """``sgd`` (Nesterov momentum) or ``adamw``."""

    def __post_init__(self) -> None:
        check_count("epochs", self.epochs, 0)  # 0: the weights as built or loaded (a pretrained model's)
        check_count("batch_size", self.batch_size)
        check_count("seed", self.seed, 0)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("momentum", self.momentum, 0, 1)
        check_number("weight_decay", self.weight_decay, 0)
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def train_batch(splits: Splits, batch: Any, device: torch.device, generator: torch.Generator) -> Any:
    """A batch of the train split moved to ``device`` and, where the split has one, passed through its batch
    augmentation (:attr:`Splits.augment`) drawing from ``generator``
    (:func:`~hilal.batches.epoch_generator` of the run's seed and epoch: a resumed run repeats the
    uninterrupted one)."""
    batch = to_device(batch, device)
    if splits.augment is None:
        return batch
    return [splits.augment(batch[0], generator), *batch[1:]]


def task_loss(model: nn.Module, batch: Any, teacher: nn.Module | None = None, distill: float = 0.0,
              temperature: float = 4.0, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The task loss of one batch already on the model's device: ``loss_fn(model, batch)`` when given (a
    user's task, :attr:`hilal.data.Splits.loss_fn`; distillation needs logits, so not with it), otherwise
    ``(inputs, labels)`` -> cross-entropy; a dict with ``start_positions``/``end_positions`` ->
    the mean of start and end cross-entropy (extractive QA). With a ``teacher`` and ``distill`` > 0,
    ``(1 - distill) * task + distill * T^2 * KL(teacher || student)`` on the logits softened by
    ``temperature`` T (knowledge distillation; for QA the mean over start and end).
    """
    if loss_fn is not None:
        if distill > 0:
            raise HilalError("FinetuneConfig.distill > 0 needs classification or QA logits; it does not apply "
                             "with a custom loss_fn (set distill=0)")
        return loss_fn(model, batch)
    if distill > 0 and teacher is None:
        raise HilalError("FinetuneConfig.distill > 0 needs the digital model as teacher")
    logits, targets = _task_outputs(model, batch)
    ce = sum(nn.functional.cross_entropy(z, t) for z, t in zip(logits, targets, strict=True)) / len(logits)
    if distill == 0:
        return ce
    with torch.no_grad():
        soft = _task_outputs(teacher, batch)[0]
    kd = sum(distillation_loss(z, s, temperature) for z, s in zip(logits, soft, strict=True)) / len(logits)
    return (1 - distill) * ce + distill * kd


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (the T^2 keeps
    the gradient's scale independent of T)."""
    log_p = nn.functional.log_softmax(teacher / temperature, dim=-1)
    log_q = nn.functional.log_softmax(student / temperature, dim=-1)
    return nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature ** 2


def _task_outputs(model: nn.Module, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The logits of one batch and their targets: one pair for classification, start and end for QA."""
    if isinstance(batch, Mapping):
        if "start_positions" not in batch or "end_positions" not in batch:
            raise HilalError("a question-answering batch needs 'start_positions' and 'end_positions'")
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions",
                                                               "example_id", "offset_mapping")}
        start, end = qa_logits(model(**inputs))
        return [start, end], [batch["start_positions"], batch["end_positions"]]
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise HilalError("a classification batch must be (inputs, labels); got a batch without labels")
    return [model(batch[0])], [batch[1]]


def split_of(splits: Splits, split: str) -> Any:
    if split not in ("train", "calib", "test"):
        raise HilalError(f"unknown split {split!r}; valid choices: train, calib, test")
    return getattr(splits, split)


@torch.no_grad()
def evaluate(model: nn.Module, splits: Splits, split: str = "test", batch_size: int = 512) -> dict[str, float]:
    """Task metrics of ``model`` on a split: ``{'accuracy': ...}`` (fractions); QA adds ``em`` and ``f1``
    and reports F1 as ``accuracy``. The model is put in eval mode."""
    model.eval()
    if "evaluator" in splits.meta:
        return splits.meta["evaluator"](model, split)
    device = model_device(model)
    correct = total = 0
    for x, y in loader(split_of(splits, split), batch_size=batch_size):
        pred = model(x.to(device)).argmax(1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    return {"accuracy": correct / max(total, 1)}


def score(model: nn.Module, splits: Splits, split: str = "test") -> float:
    """The headline metric as a fraction (accuracy, or F1 for QA)."""
    return float(evaluate(model, splits, split)["accuracy"])


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise HilalError(f"non-finite loss ({loss.item()}) during {where}; lower the learning rate or check "
                         "the data")


def train_digital(model: nn.Module, splits: Splits, cfg: TrainConfig | None = None, progress: bool = True,
                  checkpoint: str | Path | None = None) -> nn.Module:
    """Train ``model`` digitally. With ``checkpoint``, state is written atomically after every epoch and an
    interrupted run resumes from the last finished epoch."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    device = model_device(model)
    if check_choice("optimizer", cfg.optimizer, ("sgd", "adamw")) == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    start = 0
    st = _cached_state(checkpoint, device)
    if st is not None and st.get("config") == asdict(cfg) and "optimizer" in st:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start = st["epoch"]
        _set_rng_state(st.get("rng"))
    bar = tqdm(range(start, cfg.epochs), desc="train", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        gen = epoch_generator(cfg.seed, epoch)
        for batch in _train_batches(splits, cfg.batch_size, cfg.seed + epoch, "digital training"):
            opt.zero_grad(set_to_none=True)
            loss = task_loss(model, train_batch(splits, batch, device, gen), loss_fn=splits.loss_fn)
            _check_finite(loss, f"digital training (epoch {epoch})")
            loss.backward()
            opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint is not None:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "epoch": epoch + 1, "config": asdict(cfg),
                               "rng": _rng_state()}, checkpoint)
    opt.zero_grad(set_to_none=True)  # a trained model carries no stale gradients
    model.eval()
    return model


def _train_batches(splits: Splits, batch_size: int, seed: int, what: str) -> Any:
    """One shuffled epoch of full training batches (the last partial one dropped); a training split smaller than
    one batch is a HilalError, since the epoch would hold no step (training would do nothing, or never end)."""
    batches = loader(splits.train, batch_size, shuffle=True, seed=seed, drop_last=True)
    try:
        empty = len(batches) == 0
    except TypeError:  # an iterable-style loader of the user's: its length is unknown
        return batches
    if empty:
        size = len(splits.train) if hasattr(splits.train, "__len__") else "too few"
        raise HilalError(f"{what}: the training split holds {size} samples, fewer than one batch of {batch_size}; "
                         f"lower the batch size or use more training data")
    return batches


def _rng_state() -> dict[str, Any]:
    """Global RNG states (dropout, random layers), saved so that a resumed run continues identically."""
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any] | None) -> None:
    if not st:
        return
    torch.set_rng_state(st["torch"].cpu())
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


def default_train_config(splits: Splits, seed: int = 0, **overrides: Any) -> TrainConfig:
    """The training settings for a dataset: TrainConfig defaults, the dataset's own recipe
    (``splits.meta["train_config"]``), then ``overrides``."""
    return TrainConfig(**{**splits.meta.get("train_config", {}), "seed": seed, **overrides})


def checkpoint_path(model_name: str, splits: Splits, seed: int, cfg: TrainConfig) -> Path:
    extra = splits.meta.get("cache_key")
    key = cfg.key() if not extra else hashlib.sha1(f"{cfg.key()}-{extra}".encode()).hexdigest()[:8]
    return data_dir() / "checkpoints" / f"{model_name}-{splits.name}-seed{seed}-{key}.pt"


def trained_model(model_name: str, splits: Splits | str, seed: int = 0, cfg: TrainConfig | None = None,
                  progress: bool = True, device: torch.device | str | None = None) -> nn.Module:
    """A digitally trained model, cached under ``data/checkpoints`` (keyed by model, dataset, seed and the
    training settings) and reused on later calls."""
    if isinstance(splits, str):
        splits = load_dataset(splits, seed=seed)
    cfg = cfg or default_train_config(splits, seed)
    torch.manual_seed(seed)
    model = model_for(model_name, splits).to(device or default_device())
    path = checkpoint_path(model_name, splits, seed, cfg)
    with locked(path):  # one process trains, the others wait and load its checkpoint
        st = _cached_state(path, model_device(model))
        if st is not None and st.get("epoch", cfg.epochs) >= cfg.epochs:
            try:
                model.load_state_dict(st["model"])
                return model.eval()
            except (RuntimeError, KeyError, TypeError):
                set_aside(path, "does not fit the model")
        return train_digital(model, splits, cfg, progress=progress, checkpoint=path)


def _cached_state(path: str | Path | None, device: torch.device) -> dict[str, Any] | None:
    """A training checkpoint (``weights_only``: tensors and plain values, never code), or None when there is none;
    a damaged one (truncated, foreign, not a checkpoint dict) is set aside (:func:`hilal.paths.set_aside`) and
    training starts afresh instead of failing every later run."""
    if path is None or not Path(path).exists():
        return None
    try:
        st = load_tensors(path, device, "cached checkpoint")
    except HilalError:
        st = None
    if not isinstance(st, dict) or not isinstance(st.get("model"), dict):
        set_aside(path, "is damaged or not a training checkpoint")
        return None
    return st


@dataclass
class FinetuneConfig:
    """One round of noise-injection (hardware-aware) fine-tuning; LionHeart's example defaults."""

    digital_lr: float = 1e-2
    """Learning rate of the layers that stay digital."""
    analog_lr: float = 1e-3
    """Learning rate of the analog layers."""
    momentum: float = 0.85
    """SGD momentum for both."""
    steps: int = -1
    """Optimizer steps per round; -1 = one pass over the training split."""
    batch_size: int = 64
    """Mini-batch size."""
    distill: float = 0.0
    """Weight in [0, 1] of knowledge distillation from the digital model (0: the task loss alone, as
    LionHeart trains; see :func:`task_loss`)."""
    temperature: float = 4.0
    """Softening temperature of the distillation."""

    def __post_init__(self) -> None:
        check_number("digital_lr", self.digital_lr, 0)
        check_number("analog_lr", self.analog_lr, 0)
        check_number("momentum", self.momentum, 0, 1)
        check_count("steps", self.steps, 1, allow=(-1,))
        check_count("batch_size", self.batch_size)
        if not 0 <= self.distill <= 1:
            raise HilalError(f"distill must lie in [0, 1] (0 turns distillation off); got {self.distill}")
        if not self.temperature > 0:
            raise HilalError(f"temperature must be positive; got {self.temperature}")


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """aihwkit's AnalogSGD with one group for analog layers (analog_lr) and one for the rest (digital_lr).
    The analog step applies the tiles' clipping and remapping after every update."""
    from aihwkit.optim import AnalogSGD

    analog_ids = {id(p) for m in model.modules() if isinstance(m, ANALOG_TYPES) for p in m.parameters()}
    analog = [p for p in model.parameters() if id(p) in analog_ids]
    digital = [p for p in model.parameters() if id(p) not in analog_ids and p.requires_grad]
    groups = [g for g in ({"params": analog, "lr": cfg.analog_lr}, {"params": digital, "lr": cfg.digital_lr})
              if g["params"]]
    return AnalogSGD(groups, lr=cfg.digital_lr, momentum=cfg.momentum)


def finetune_round(model: nn.Module, splits: Splits, cfg: FinetuneConfig, optimizer: torch.optim.Optimizer,
                   seed: int = 0, progress: bool = False, teacher: nn.Module | None = None) -> float:
    """``cfg.steps`` optimizer steps of noise-injection training (the analog tiles inject the preset's
    weight noise in training mode), distilled from ``teacher`` (the digital model, in eval mode) when
    ``cfg.distill`` > 0. Returns the mean training loss."""
    device = model_device(model)
    model.train()
    steps = cfg.steps if cfg.steps > 0 else math.inf
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        batches = _train_batches(splits, cfg.batch_size, seed * 1000 + epoch, "noise-injection fine-tuning")
        gen = epoch_generator(seed, epoch)
        for batch in tqdm(batches, desc="finetune", disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            loss = task_loss(model, train_batch(splits, batch, device, gen), teacher, cfg.distill, cfg.temperature,
                             splits.loss_fn)
            _check_finite(loss, "noise-injection fine-tuning")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) >= steps:
                break
        epoch += 1
        if cfg.steps <= 0:
            break
    model.eval()
    return float(np.mean(losses)) if losses else float("nan")


def parameters_of(model: nn.Module, names: Iterable[str]) -> list[torch.Tensor]:
    mods = dict(model.named_modules())
    return [mods[n].weight for n in names]
