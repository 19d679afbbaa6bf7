"""Tiny transformers: every projection is a mappable nn.Linear, the QA loss is finite, HVPs work."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hilal.analog import count_macs, mappable_layers, to_analog
from hilal.data import load_dataset, loader
from hilal.models import _check_vocab, build_model, model_for
from hilal.registry import HilalError
from hilal.train import task_loss

MOBILEBERT_PER_LAYER = [
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense", "output.bottleneck.dense", "bottleneck.input.dense",
    "bottleneck.attention.dense", "ffn.0.intermediate.dense", "ffn.0.output.dense",
]


@pytest.fixture(scope="module")
def sample():
    return load_dataset("squad_sample", seed=0)


@pytest.fixture(scope="module")
def qa_batch(sample):
    return next(iter(loader(sample.calib, batch_size=8)))


def _expected_linear(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def test_vit_tiny_projections_are_mappable(digits):
    torch.manual_seed(0)
    model = model_for("vit_tiny", digits)
    x, y = next(iter(loader(digits.calib, batch_size=4)))
    assert model(x).shape == (4, 10)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    layers = mappable_layers(model)
    assert layers == _expected_linear(model)
    for b in range(2):
        for p in ("attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2"):
            assert f"blocks.{b}.{p}" in layers
    assert layers[0] == "patch_embed" and layers[-1] == "head"
    macs = count_macs(model, x)
    # q on 17 tokens (16 patches of 2x2 + class token), 64 -> 64
    assert macs["blocks.0.attn.q"] == 17 * 64 * 64 and set(macs) == set(layers)


def test_vit_tiny_attention_matches_a_reference(digits):
    torch.manual_seed(0)
    model = model_for("vit_tiny", digits).eval()
    att = model.blocks[0].attn
    x = torch.randn(3, 5, 64)
    ref = nn.MultiheadAttention(64, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([att.q.weight, att.k.weight, att.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([att.q.bias, att.k.bias, att.v.bias]))
        ref.out_proj.weight.copy_(att.out.weight)
        ref.out_proj.bias.copy_(att.out.bias)
        torch.testing.assert_close(att(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_mobilebert_tiny_projections_are_mappable(sample, qa_batch):
    torch.manual_seed(0)
    model = model_for("mobilebert_tiny", sample).eval()
    assert model.config._attn_implementation == "eager"
    assert model.config.vocab_size == len(sample.meta["tokenizer"])
    out = model(**{k: v for k, v in qa_batch.items() if "positions" not in k})
    assert out.start_logits.shape == qa_batch["input_ids"].shape == out.end_logits.shape
    layers = mappable_layers(model)
    assert layers == _expected_linear(model)
    expected = [f"mobilebert.encoder.layer.{i}.{s}" for i in range(2) for s in MOBILEBERT_PER_LAYER]
    assert set(expected) <= set(layers)
    assert set(layers) - set(expected) == {"mobilebert.embeddings.embedding_transformation", "qa_outputs"}
    macs = count_macs(model, sample.example_input(2))
    assert set(macs) == set(layers) and min(macs.values()) > 0


def test_ideal_analog_mobilebert_tiny_matches_digital(sample, qa_batch):
    torch.manual_seed(0)
    model = model_for("mobilebert_tiny", sample).eval()
    analog = to_analog(model, mappable_layers(model), "ideal").eval()
    inputs = {k: v for k, v in qa_batch.items() if "positions" not in k}
    with torch.no_grad():
        torch.testing.assert_close(analog(**inputs).start_logits, model(**inputs).start_logits,
                                   atol=1e-4, rtol=1e-4)


def _hvp(model: nn.Module, batch, vectors: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = task_loss(model, batch)
    assert torch.isfinite(loss)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = []
    for v in vectors:
        hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v, strict=True)), params,
                                 retain_graph=True)
        assert all(torch.isfinite(h).all() for h in hv)
        out.append(list(hv))
    return out


def _prepare(model: nn.Module, seed: int = 0) -> tuple[nn.Module, list[list[torch.Tensor]]]:
    """float64, eval mode, parameters moved off exact zeros (zero-initialized biases put ReLU inputs on the
    kink), and two random directions."""
    model = model.double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(2)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def test_vit_tiny_loss_and_hvp(digits):
    """HVP by double backward equals a central difference of gradients (GELU: smooth)."""
    torch.manual_seed(0)
    x, y = next(iter(loader(digits.calib, batch_size=16)))
    model, (v, _) = _prepare(model_for("vit_tiny", digits))
    batch = (x.double(), y)
    (hv,) = _hvp(model, batch, [v])
    params = [p for p in model.parameters() if p.requires_grad]
    eps = 1e-4

    def grad_at(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, u in zip(params, v, strict=True):
                p.add_(sign * eps * u)
        g = torch.autograd.grad(task_loss(model, batch), params)
        with torch.no_grad():
            for p, u in zip(params, v, strict=True):
                p.sub_(sign * eps * u)
        return list(g)

    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(1.0), grad_at(-1.0), strict=True)]
    diff = [h - f for h, f in zip(hv, fd, strict=True)]
    assert _dot(fd, fd) > 0 and (_dot(diff, diff) / _dot(fd, fd)) ** 0.5 < 1e-3


def test_mobilebert_tiny_qa_loss_and_hvp(sample, qa_batch):
    torch.manual_seed(0)
    assert any(qa_batch["start_positions"] > 0)
    model, (u, v) = _prepare(model_for("mobilebert_tiny", sample))
    hu, hv = _hvp(model, qa_batch, [u, v])
    # MobileBERT's ReLUs make finite differences of the gradient jump at kinks; check instead that double
    # backward gives a symmetric, non-zero bilinear form: u.Hv = v.Hu
    assert abs(_dot(u, hv)) > 0
    assert _dot(u, hv) == pytest.approx(_dot(v, hu), rel=1e-9)
    assert _dot(hv, hv) > 0


def test_mobilebert_without_weights_says_what_to_download(sample, tmp_path, monkeypatch):
    monkeypatch.setenv("HILAL_OFFLINE", "1")
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HilalError, match="huggingface-cli download google/mobilebert-uncased"):
        build_model("mobilebert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("mobilebert", allow_random=True)
    assert any("random init" in str(w.message) for w in caught)
    assert model.config._attn_implementation == "eager" and model.config.num_hidden_layers == 24
    # random init takes the dataset's vocabulary; pretrained embeddings must match the dataset's tokenizer
    assert model_for("mobilebert", sample, allow_random=True).config.vocab_size == len(sample.meta["tokenizer"])
    with pytest.raises(HilalError, match="tokenizer"):
        _check_vocab(model, len(sample.meta["tokenizer"]), "mobilebert")


def test_layer_metrics_cover_every_projection(digits, sample):
    hessian = pytest.importorskip("hilal.hessian")
    if not hasattr(hessian, "layer_metrics"):
        pytest.skip("hilal.hessian.layer_metrics not available")
    cfg = hessian.HessianConfig(probes=4, power_iters=3, eli_samples=2, max_samples=32, batch_size=16)
    for name, splits in (("vit_tiny", digits), ("mobilebert_tiny", sample)):
        torch.manual_seed(0)
        model = model_for(name, splits).eval()
        df = hessian.layer_metrics(model, splits, preset="pcm", cfg=cfg, progress=False)
        assert list(df["layer"]) == mappable_layers(model)
        for col in ("trace", "lambda_max", "eli", "macs", "params"):
            assert np.isfinite(df[col].to_numpy(dtype=float)).all(), (name, col)


def test_layer_metrics_stratifies_the_traces_where_probes_and_samples_allow(digits):
    """16 probes on 64 samples: two gradient strata (one per 8 probes and 32 samples), each with its own
    probes, and finite traces with standard errors; the mapping default's settings."""
    from hilal.hessian import HessianConfig, layer_metrics

    torch.manual_seed(0)
    model = model_for("vit_tiny", digits).eval()
    cfg = HessianConfig(probes=16, power_iters=2, eli_samples=2, first_order_samples=2, max_samples=64,
                        batch_size=32, gauss_newton="off")
    df = layer_metrics(model, digits, preset="pcm", cfg=cfg, progress=False)
    assert df.attrs["strata"] == 2
    assert np.isfinite(df["trace"]).all() and (df["trace_se"] > 0).all()
