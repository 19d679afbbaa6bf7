"""Every registered model runs on the shapes of the datasets it is meant for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hilal.analog import ANALOG_TYPES, DIGITAL_TYPES, analog_layers, count_macs, mappable_layers, to_analog
from hilal.models import MODELS, build_model
from hilal.plots import projection_groups
from hilal.registry import HilalError

IMAGE_MODELS = ["resnet8", "resnet20", "alexnet", "vgg16", "resnet50", "vit_b16"]
BIG = {"vgg16", "resnet50", "vit_b16"}
# (in_channels, image_size, num_classes): digits, CIFAR-10, CIFAR-100
SHAPES = [(1, 8, 10), (3, 32, 10), (3, 32, 100)]
# Counted by hand from each architecture (convs + linears, incl. 1x1 shortcuts; ViT-B/16: patch projection,
# q/k/v/out and the two MLP layers of 12 blocks, head).
MAPPABLE = {"resnet8": 1 + 3 * 2 + 2 + 1, "resnet20": 1 + 9 * 2 + 2 + 1, "alexnet": 5 + 3, "vgg16": 13 + 2,
            "resnet50": 1 + 16 * 3 + 4 + 1, "vit_b16": 1 + 12 * 6 + 1}
RANDOM = {"vit_b16": {"allow_random": True}, "mobilebert": {"allow_random": True}}
"""Builders that load pretrained weights by default: random weights in the tests (no downloads here)."""
TEXT = {"mobilebert", "mobilebert_tiny"}
pytestmark = pytest.mark.filterwarnings("ignore:.*random init:UserWarning")


def _forward(name: str, cin: int, size: int, classes: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(name, in_channels=cin, num_classes=classes, image_size=size, **RANDOM.get(name, {})).eval()
    n = 2 if name in BIG else 3
    with torch.no_grad():
        return model(torch.randn(n, cin, size, size))


@pytest.mark.parametrize("cin,size,classes", SHAPES, ids=["digits", "cifar10", "cifar100"])
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_forward_shape(name, cin, size, classes):
    out = _forward(name, cin, size, classes)
    assert out.shape == (2 if name in BIG else 3, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in IMAGE_MODELS])
def test_other_registered_models_on_images_if_they_take_images(name):
    """Models appended to the registry later (e.g. for question answering) are checked when they take images."""
    try:
        out = _forward(name, 3, 32, 10)
    except Exception as e:  # a text model: not an image classifier
        pytest.skip(f"{name} does not take image inputs ({type(e).__name__})")
    assert out.shape[-1] == 10


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "alexnet", "vgg16", "resnet50", "vit_b16"])
def test_mappable_layer_counts(name):
    model = build_model(name, in_channels=3, num_classes=10, image_size=32, **RANDOM.get(name, {}))
    names = mappable_layers(model)
    assert len(names) == MAPPABLE[name]
    assert len(set(names)) == len(names)


def test_builders_adapt_stem_and_head():
    m = build_model("resnet8", in_channels=1, num_classes=7)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 7
    r = build_model("resnet50", in_channels=1, num_classes=5, image_size=8)
    assert r.conv1.in_channels == 1 and r.conv1.kernel_size == (3, 3) and r.fc.out_features == 5


def test_unknown_model_lists_choices():
    with pytest.raises(HilalError) as e:
        build_model("resnet9000")
    for valid in IMAGE_MODELS:
        assert valid in str(e.value)


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    a = build_model("resnet8", in_channels=1, image_size=8)
    torch.save({"model": a.state_dict()}, tmp_path / "ck.pt")
    torch.manual_seed(1)
    b = build_model("resnet8", in_channels=1, image_size=8, checkpoint=tmp_path / "ck.pt")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(HilalError, match="checkpoint not found"):
        build_model("resnet8", checkpoint=tmp_path / "missing.pt")


def _example(name: str, model: nn.Module) -> object:
    if name in TEXT:
        ids = torch.randint(0, model.config.vocab_size, (1, 16))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return torch.randn(1, 3, 32, 32)


def _logits(out: object) -> torch.Tensor:
    return out.start_logits if hasattr(out, "start_logits") else out


@pytest.mark.parametrize("name", MODELS.names())
def test_every_mappable_layer_runs_on_a_tile(name):
    """Full-size configurations with random weights on a tiny input: converting every mappable layer leaves no
    weight matrix outside a tile, every analog layer is called by the forward pass, MACs are counted from those
    calls, and noise-free tiles compute what the digital model does."""
    torch.manual_seed(0)
    model = build_model(name, **RANDOM.get(name, {})).eval()
    x = _example(name, model)
    layers = mappable_layers(model)
    macs = count_macs(model, x)
    assert sorted(macs) == sorted(layers), "a mappable layer is not called by the digital forward pass"
    analog = to_analog(model, layers, "ideal").eval()
    assert analog_layers(analog) == layers
    leftover = [n for n, m in analog.named_modules() if isinstance(m, (*DIGITAL_TYPES, nn.MultiheadAttention))
                and not isinstance(m, ANALOG_TYPES)]
    assert not leftover, f"digital matrix layers left: {leftover}"
    inside = tuple(f"{n}." for n in layers)
    embeddings = {f"{n}.weight" for n, m in analog.named_modules() if isinstance(m, nn.Embedding)}
    matrices = [n for n, p in analog.named_parameters() if p.dim() >= 2 and not n.startswith(inside)
                and n not in embeddings and n.rpartition(".")[2] not in ("cls_token", "pos_embed",
                                                                        "position_embeddings")]
    assert not matrices, f"weight matrices multiplied outside any tile: {matrices}"
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in analog.named_modules() if isinstance(m, ANALOG_TYPES)]
    with torch.no_grad():
        out = _logits(analog(**x) if isinstance(x, dict) else analog(x))
        ref = _logits(model(**x) if isinstance(x, dict) else model(x))
    for h in hooks:
        h.remove()
    assert sorted(calls) == sorted(layers), f"analog layers never called: {sorted(set(layers) - set(calls))}"
    assert count_macs(analog, x) == macs
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_vit_b16_is_transformers_vit_and_needs_weights(tmp_path, monkeypatch):
    """The pretrained default fails with a message naming what to download; the forward the kit calls equals
    the library's own on the same resized input."""
    monkeypatch.setenv("HILAL_OFFLINE", "1")
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path))
    with pytest.raises(HilalError, match="huggingface-cli download google/vit-base-patch16-224.*allow_random"):
        build_model("vit_b16")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random init"):
        model = build_model("vit_b16", num_classes=7, allow_random=True).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        mine = model(x)
        lib = model.net(pixel_values=nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(224, 224),
                                                              mode="bilinear", align_corners=False)).logits
    assert mine.shape == (2, 7)
    torch.testing.assert_close(mine, lib, rtol=0, atol=0)
    groups = projection_groups(mappable_layers(model))
    per_block = groups[groups["block"].str.startswith("block")].groupby("block")["projection"].apply(sorted)
    assert len(per_block) == 12
    assert all(p == ["fc1", "fc2", "k", "out", "q", "v"] for p in per_block)
    assert groups["block"].iloc[0] == "embedding" and groups["block"].iloc[-1] == "head"


def test_vit_b16_loads_local_pretrained_folder(tmp_path, monkeypatch):
    """A ``save_pretrained`` folder under data/models is found offline; its weights are used (a new head when
    the class count differs) and inputs are re-normalized from the dataset's statistics to the weights'."""
    import json

    from transformers import ViTConfig, ViTForImageClassification

    monkeypatch.setenv("HILAL_OFFLINE", "1")
    monkeypatch.setenv("HILAL_DATA_DIR", str(tmp_path))
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=16, num_labels=5)
    folder = tmp_path / "models" / "vit-base-patch16-224"
    ViTForImageClassification(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    same = build_model("vit_b16", num_classes=5)
    saved = ViTForImageClassification.from_pretrained(folder)
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(same.net.state_dict()[k], v, rtol=0, atol=0)
    norm = ((0.2, 0.3, 0.4), (0.1, 0.2, 0.3))
    other = build_model("vit_b16", num_classes=3, input_norm=norm).eval()
    assert other.net.classifier.out_features == 3
    x = torch.randn(1, 3, 32, 32)
    raw = x * torch.tensor(norm[1]).view(1, 3, 1, 1) + torch.tensor(norm[0]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(other(x), other.net(pixel_values=(raw - 0.5) / 0.5).logits)
