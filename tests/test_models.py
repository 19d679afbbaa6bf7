"""Every registered model runs on the shapes of the datasets it is meant for."""

from __future__ import annotations

import pytest
import torch

from hilal.analog import mappable_layers
from hilal.models import MODELS, build_model
from hilal.registry import HilalError

IMAGE_MODELS = ["resnet8", "resnet20", "alexnet", "vgg16", "resnet50", "vit_b16"]
BIG = {"vgg16", "resnet50", "vit_b16"}
# (in_channels, image_size, num_classes): digits, CIFAR-10, CIFAR-100
SHAPES = [(1, 8, 10), (3, 32, 10), (3, 32, 100)]
# Counted by hand from each architecture (convs + linears, incl. 1x1 shortcuts / ViT attention out_proj).
MAPPABLE = {"resnet8": 1 + 3 * 2 + 2 + 1, "resnet20": 1 + 9 * 2 + 2 + 1, "alexnet": 5 + 3, "vgg16": 13 + 2,
            "resnet50": 1 + 16 * 3 + 4 + 1, "vit_b16": 1 + 12 * 3 + 1}


def _forward(name: str, cin: int, size: int, classes: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(name, in_channels=cin, num_classes=classes, image_size=size).eval()
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
    model = build_model(name, in_channels=3, num_classes=10, image_size=32)
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
