"""Model registry. Every builder adapts to the dataset's channels, input size and class count."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hilal.paths import data_dir, load_tensors, offline, pretrained_source
from hilal.qa import SAMPLE_VOCAB
from hilal.registry import HilalError, Registry

MODELS: Registry = Registry("model")


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; optionally load a local checkpoint (a state_dict or {'model': sd})."""
    model = MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def model_for(name: str, splits: Any, **kwargs: Any) -> nn.Module:
    """Build ``name`` for a :class:`hilal.data.Splits` (its channels, size, classes and task; its input
    normalization, ``meta["normalization"]`` = (mean, std), for models with pretrained input statistics)."""
    extra = {"input_norm": splits.meta["normalization"]} if "normalization" in splits.meta else {}
    return build_model(name, in_channels=splits.in_channels, num_classes=splits.num_classes,
                       image_size=splits.image_size, **{**extra, **splits.meta.get("model_kwargs", {}), **kwargs})


def load_weights(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a state_dict (or ``{"model": state_dict}``) into ``model``: tensors only (``weights_only``, never
    pickled code), finite, of this architecture; anything else is a one-line HilalError naming the file."""
    path = Path(checkpoint)
    if not path.exists():
        raise HilalError(f"checkpoint not found: {path}")
    state = load_tensors(path, "cpu")
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise HilalError(f"checkpoint {path} holds no state_dict (a dict of tensors, or {{'model': state_dict}})")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise HilalError(f"checkpoint {path} holds non-finite weights ({bad}); train or fetch it again")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        missing = getattr(e, "args", [""])[0].count("\n")
        raise HilalError(f"checkpoint {path} does not fit this {type(model).__name__} (missing, unexpected or "
                         f"differently shaped weights; {missing} problem line(s)): another architecture or "
                         "dataset?") from None
    return model


# --- CNNs -------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """Basic residual block (two 3x3 convs); a 1x1 conv shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages of 16/32/64 channels, global pool, linear head."""

    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for b in range(blocks_per_stage):
                layers.append(_Block(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet8")
def resnet8(in_channels: int = 3, num_classes: int = 10, **_: Any) -> nn.Module:
    """ResNet-8 in the MLPerf Tiny layout: stem + 3 residual stages of one block, 10 mappable layers."""
    return ResNetCIFAR(1, in_channels, num_classes)


@MODELS.register("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 10, **_: Any) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016), 1x1-conv shortcuts: 22 mappable layers."""
    return ResNetCIFAR(3, in_channels, num_classes)


def _pool_or_id(size: int) -> tuple[nn.Module, int]:
    return (nn.MaxPool2d(2), size // 2) if size >= 2 else (nn.Identity(), size)


@MODELS.register("alexnet")
def alexnet(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **_: Any) -> nn.Module:
    """AlexNet's CIFAR variant: 5 convs (64-192-384-256-256), 3 FC layers; pools shrink with the input."""
    size, feats = image_size, []
    spec = [(in_channels, 64, True), (64, 192, True), (192, 384, False), (384, 256, False), (256, 256, True)]
    for cin, cout, pool in spec:
        feats += [nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(inplace=True)]
        if pool:
            p, size = _pool_or_id(size)
            feats.append(p)
    return nn.Sequential(
        nn.Sequential(*feats), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 4, 1024), nn.ReLU(inplace=True),
                      nn.Dropout(0.5), nn.Linear(1024, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)))


@MODELS.register("vgg16")
def vgg16(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **_: Any) -> nn.Module:
    """VGG-16's CIFAR variant: 13 conv+BN layers, 512-wide classifier; pools stop at 1x1."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    cin, size = in_channels, image_size
    for v in cfg:
        if v == "M":
            p, size = _pool_or_id(size)
            layers.append(p)
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(True)]
            cin = int(v)
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, num_classes)))


@MODELS.register("resnet50")
def resnet50(in_channels: int = 3, num_classes: int = 10, image_size: int = 224, weights: str | None = None,
             allow_random: bool = False, **_: Any) -> nn.Module:
    """torchvision ResNet-50 (no weights by default); small inputs get a 3x3 stem without max-pool."""
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if weights is not None:
        _load_torchvision_pretrained(model, "resnet50", weights, num_classes, allow_random)
    if image_size < 64 or in_channels != 3:
        k, s = (3, 1) if image_size < 64 else (7, 2)
        model.conv1 = nn.Conv2d(in_channels, 64, k, s, k // 2, bias=False)
        if image_size < 64:
            model.maxpool = nn.Identity()
    return model


def _load_torchvision_pretrained(model: nn.Module, arch: str, weights: str, num_classes: int,
                                 allow_random: bool = False) -> None:
    """Load torchvision's pretrained ``weights`` (torch's hub cache, or a download when online), keeping a fresh
    head when the class count differs. Missing weights are a HilalError (a warning and a random init with
    ``allow_random``)."""
    import torchvision

    try:
        state = torchvision.models.get_weight(weights).get_state_dict(progress=False)
    except Exception as e:
        msg = (f"{arch}: pretrained weights {weights!r} are not available ({type(e).__name__}); download them "
               f"once online (torchvision.models.get_weight({weights!r}).get_state_dict()) into torch's hub cache "
               f"(TORCH_HOME)")
        if not allow_random:
            raise HilalError(msg + ", or pass allow_random=True") from None
        warnings.warn(msg + "; random init", stacklevel=3)
        return
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


class ViTClassifier(nn.Module):
    """transformers' ``ViTForImageClassification`` as a plain ``images -> logits`` module. Inputs are first
    brought to what its weights were trained on: grey channels repeated to RGB, resized (bilinear) to ``size``,
    and re-normalized from the dataset's (``in_norm``) to the weights' (``net_norm``) mean and std. The forward
    calls the embeddings, blocks, final norm and head itself (the same computation): the library's own
    forward reads the patch projection's ``weight``, which an analog layer keeps in its tiles."""

    def __init__(self, net: nn.Module, size: int, in_norm: tuple | None = None, net_norm: tuple | None = None
                 ) -> None:
        super().__init__()
        self.net, self.size = net, size
        scale = shift = None
        if in_norm is not None and net_norm is not None:
            (m_in, s_in), (m_net, s_net) = (torch.tensor(v, dtype=torch.float32) for v in in_norm), (
                torch.tensor(v, dtype=torch.float32) for v in net_norm)
            scale, shift = s_in / s_net, (m_in - m_net) / s_net
        self.register_buffer("scale", None if scale is None else scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.scale is not None:
            x = x * self.scale + self.shift
        vit = self.net.vit
        h = vit.embeddings(x)
        for block in vit.layers if hasattr(vit, "layers") else vit.encoder.layer:  # transformers 5 / 4
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return self.net.classifier(vit.layernorm(h)[:, 0])


def _missing_weights(model: str, name: str, e: Exception, offline_alt: str) -> HilalError:
    local = data_dir() / "models" / name.split("/")[-1]
    return HilalError(
        f"{model} weights {name!r} are not available ({type(e).__name__}). Download them once with "
        f"`huggingface-cli download {name}` (Hugging Face cache) or save_pretrained them into {local}; pass "
        f"allow_random=True to start from a random init, or use {offline_alt!r} offline.")


def _image_norm(folder: str, default: float = 0.5) -> tuple:
    """The mean and std a Hugging Face image model was trained with (its ``preprocessor_config.json``)."""
    cfg = Path(folder) / "preprocessor_config.json"
    mean = std = (default,) * 3
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
    return mean, std


VIT_B16 = "google/vit-base-patch16-224"
"""ViT-B/16 pretrained on ImageNet-21k and fine-tuned on ImageNet-1k at 224x224 (the paper's starting point)."""


@MODELS.register("vit_b16")
def vit_b16(in_channels: int = 3, num_classes: int = 10, pretrained: str = VIT_B16, allow_random: bool = False,
            input_norm: tuple | None = None, **_: Any) -> nn.Module:
    """ViT-B/16 as transformers' ``ViTForImageClassification`` with eager attention: separate ``nn.Linear``
    query, key, value and output projections and MLP layers in each of the 12 blocks (all mappable, and
    twice differentiable for Hessian-vector products), patch projection and head: 74 mappable layers.
    Pretrained weights by default (a local folder, ``data/models/vit-base-patch16-224`` or the Hugging Face
    cache); the head is re-initialized when ``num_classes`` differs from theirs. Inputs of any size are
    resized to the 224x224 the weights were trained at, and re-normalized from ``input_norm`` (the dataset's
    (mean, std), when given) to the weights' own. Without the weights: a HilalError, or a random init with a
    warning when ``allow_random=True``."""
    from transformers import ViTConfig, ViTForImageClassification

    src, local = pretrained_source(pretrained)
    try:
        net = ViTForImageClassification.from_pretrained(
            src, num_labels=num_classes, ignore_mismatched_sizes=True, attn_implementation="eager",
            local_files_only=offline() and not local)
        net_norm = _image_norm(src) if local else _image_norm("")
    except Exception as e:
        if not allow_random:
            raise _missing_weights("vit_b16", pretrained, e, "vit_tiny") from None
        warnings.warn(f"vit_b16: pretrained weights {pretrained!r} not available; random init", stacklevel=2)
        net = ViTForImageClassification(ViTConfig(num_labels=num_classes, attn_implementation="eager"))
        net_norm = None
    return ViTClassifier(net, net.config.image_size, input_norm if net_norm else None, net_norm)


# --- transformers -----------------------------------------------------------------------------------

class _SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out ``nn.Linear`` projections (each one mappable).
    Written out with matmul + softmax so that double backward (Hessian-vector products) works."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise HilalError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d))


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP (fc1, fc2)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small Vision Transformer (patch conv, class token, learned positions, pre-norm blocks, linear head)
    in which every projection is a real ``nn.Linear``."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, patch_size: int, dim: int,
                 depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise HilalError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        n = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("vit_tiny")
def vit_tiny(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, patch_size: int | None = None,
             dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128, **_: Any) -> nn.Module:
    """A 2-block ViT (hidden 64, 4 heads, MLP 128) for small images; patch 2 for 8x8 inputs, 4 for 32x32.
    Mappable layers: patch conv, q/k/v/out and fc1/fc2 of every block, head."""
    patch = patch_size or (max(1, image_size // 4) if image_size <= 16 else max(1, image_size // 8))
    return TinyViT(in_channels, num_classes, image_size, patch, dim, depth, heads, mlp_dim)


def _check_vocab(model: nn.Module, vocab_size: int | None, name: str) -> None:
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        raise HilalError(
            f"{name} has a {model.config.vocab_size}-token vocabulary but the dataset was tokenized with "
            f"{vocab_size} tokens; load the dataset with this model's tokenizer (e.g. "
            f"load_dataset('squad', tokenizer='google/mobilebert-uncased')) or use 'mobilebert_tiny'")


@MODELS.register("mobilebert")
def mobilebert(vocab_size: int | None = None, pretrained: str = "google/mobilebert-uncased",
               allow_random: bool = False, **_: Any) -> nn.Module:
    """``MobileBertForQuestionAnswering`` from pretrained ``google/mobilebert-uncased`` (a local folder,
    ``data/models/mobilebert-uncased``, or the Hugging Face hub / its cache). Eager attention, so that
    Hessian-vector products work. Without the weights: a HilalError, or random init with a warning when
    ``allow_random=True``."""
    from transformers import MobileBertConfig, MobileBertForQuestionAnswering

    src, local = pretrained_source(pretrained)
    try:
        model = MobileBertForQuestionAnswering.from_pretrained(
            src, attn_implementation="eager", local_files_only=offline() and not local)
    except Exception as e:
        if not allow_random:
            raise _missing_weights("MobileBERT", pretrained, e, "mobilebert_tiny") from None
        warnings.warn(f"mobilebert: pretrained weights {pretrained!r} not available; random init",
                      stacklevel=2)
        cfg = MobileBertConfig(vocab_size=vocab_size or 30522, attn_implementation="eager")
        model = MobileBertForQuestionAnswering(cfg)
    _check_vocab(model, vocab_size, "mobilebert")
    return model


@MODELS.register("mobilebert_tiny")
def mobilebert_tiny(vocab_size: int | None = None, max_length: int = 512, hidden_size: int = 64,
                    embedding_size: int = 32, bottleneck_size: int = 32, intermediate_size: int = 64,
                    num_layers: int = 2, heads: int = 2, ffn_stack: int = 2, **_: Any) -> nn.Module:
    """A tiny ``MobileBertForQuestionAnswering`` (same class and layer types as MobileBERT: bottlenecks,
    stacked FFNs, no-norm), random init, eager attention; vocabulary size from the dataset's tokenizer.
    Mappable layers: embedding transformation, per layer the input/attention bottlenecks, q/k/v,
    attention output, the FFN stack, intermediate, output and output bottleneck; qa_outputs."""
    from transformers import MobileBertConfig, MobileBertForQuestionAnswering

    if vocab_size is None:
        vocab_size = sum(1 for _ in open(SAMPLE_VOCAB, encoding="utf-8"))
    cfg = MobileBertConfig(vocab_size=vocab_size, hidden_size=hidden_size, embedding_size=embedding_size,
                           intra_bottleneck_size=bottleneck_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=heads,
                           num_feedforward_networks=ffn_stack, max_position_embeddings=max(max_length, 16),
                           attn_implementation="eager")
    return MobileBertForQuestionAnswering(cfg)

