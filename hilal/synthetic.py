"""Format-true synthetic data files for the dry run (:mod:`hilal.dryrun`): the CIFAR-10 and CIFAR-100 "python
version" pickles (Python 2 strings and all), ImageFolder trees of real JPEG files, SQuAD v1.1 JSON, and a Hugging
Face folder with a BERT WordPiece tokenizer of MobileBERT's vocabulary size and randomly initialised MobileBERT
weights. Each writer gives file name -> a function that makes the file's bytes (seeded: the same bytes every
time), so that files already in place need not be made again.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hilal.registry import HilalError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668"]
MOBILEBERT_VOCAB = 30522
"""Vocabulary size of ``google/mobilebert-uncased`` (BERT's uncased WordPiece vocabulary)."""


# --- Python 2 pickles, as in the CIFAR "python version" archives ------------------------------------------

class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), the way the CIFAR archives were written: read
    back with ``encoding="latin1"`` (torchvision) they are ``str``, with ``encoding="bytes"`` ``bytes``."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj: Any) -> bytes:
    """``obj`` pickled with protocol 2 and ``bytes`` as Python 2 strings."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced labels in random order (every class n // classes or one more times)."""
    return rng.permutation(np.arange(n) % classes)


def _cifar_batch(n: int, label_keys: dict[str, np.ndarray], batch_label: str, seed: int,
                 names: list[str]) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    first = next(iter(label_keys.values()))
    files = [f"{names[int(c)]}_s_{seed:02d}{i:06d}.png".encode() for i, c in enumerate(first)]
    out: dict[bytes, Any] = {b"batch_label": batch_label.encode()}
    out.update({k.encode(): [int(v) for v in lab] for k, lab in label_keys.items()})
    out.update({b"data": data, b"filenames": files})
    return out


def cifar10_files(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> dict[str, Callable[[], bytes]]:
    """File name (under ``cifar-10-batches-py/``) -> a function giving its bytes: ``data_batch_1..5`` (the
    training images in five equal parts), ``test_batch`` and ``batches.meta``, as in the real archive."""
    if n_train < 5 or n_test < 1:
        raise HilalError(f"CIFAR-10 needs at least 5 training and 1 test images; got {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    train, test = _labels(n_train, 10, rng), _labels(n_test, 10, rng)
    parts = np.array_split(train, 5)
    files: dict[str, Callable[[], bytes]] = {}
    for i, lab in enumerate(parts, 1):
        files[f"data_batch_{i}"] = lambda lab=lab, i=i: py2_pickle(_cifar_batch(
            len(lab), {"labels": lab}, f"training batch {i} of 5", seed * 10 + i, CIFAR10_CLASSES))
    files["test_batch"] = lambda: py2_pickle(_cifar_batch(n_test, {"labels": test}, "testing batch 1 of 1",
                                                          seed * 10 + 6, CIFAR10_CLASSES))
    files["batches.meta"] = lambda: py2_pickle({b"num_cases_per_batch": len(parts[0]),
                                                b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                                b"num_vis": 3072})
    return files


def cifar100_files(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> dict[str, Callable[[], bytes]]:
    """File name (under ``cifar-100-python/``) -> a function giving its bytes: ``train``, ``test`` (with
    ``fine_labels`` and ``coarse_labels``, fine class c in coarse class c // 5) and ``meta``."""
    if n_train < 1 or n_test < 1:
        raise HilalError(f"CIFAR-100 needs at least 1 training and 1 test image; got {n_train} and {n_test}")
    rng = np.random.default_rng(seed + 100)
    fine_names = [f"fine_class_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_class_{i:02d}" for i in range(20)]

    def part(n: int, lab: np.ndarray, name: str, s: int) -> bytes:
        return py2_pickle(_cifar_batch(n, {"fine_labels": lab, "coarse_labels": lab // 5}, name, s, fine_names))

    train, test = _labels(n_train, 100, rng), _labels(n_test, 100, rng)
    return {"train": lambda: part(n_train, train, "training batch 1 of 1", seed * 10 + 7),
            "test": lambda: part(n_test, test, "testing batch 1 of 1", seed * 10 + 8),
            "meta": lambda: py2_pickle({b"fine_label_names": [c.encode() for c in fine_names],
                                        b"coarse_label_names": [c.encode() for c in coarse_names]})}


def imagenet_files(classes: int = 4, train: int = 8, val: int = 3, seed: int = 0) -> dict[str, Callable[[], bytes]]:
    """Relative path (under ``imagenet/``) -> a function giving a JPEG file's bytes: ``train/<wnid>/`` and
    ``val/<wnid>/`` folders of random RGB images of varied sizes (120 to 500 pixels a side)."""
    if not 1 <= classes <= len(WNIDS) or train < 2 or val < 1:
        raise HilalError(f"ImageFolder needs 1 to {len(WNIDS)} classes, at least 2 training and 1 validation images "
                         f"each; got {classes}, {train}, {val}")

    def jpeg(s: int) -> bytes:
        from PIL import Image

        r = np.random.default_rng(s)
        h, w = (int(v) for v in r.integers(120, 501, size=2))
        buf = io.BytesIO()
        Image.fromarray(r.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(buf, "JPEG", quality=90)
        return buf.getvalue()

    files: dict[str, Callable[[], bytes]] = {}
    for c, wnid in enumerate(WNIDS[:classes]):
        for i in range(train):
            files[f"train/{wnid}/{wnid}_{i + 1}.JPEG"] = lambda s=seed * 10_000 + c * 100 + i: jpeg(s)
        for i in range(val):
            k = c * val + i + 1
            files[f"val/{wnid}/ILSVRC2012_val_{k:08d}.JPEG"] = lambda s=seed * 10_000 + 5000 + k: jpeg(s)
    return files


# --- SQuAD v1.1 and MobileBERT's folder ---------------------------------------------------------------

def _words() -> list[str]:
    """Whole words of the shipped sample's WordPiece vocabulary (one token each under any BERT vocabulary
    built from it)."""
    from hilal.qa import SAMPLE_VOCAB

    lines = SAMPLE_VOCAB.read_text(encoding="utf-8").split("\n")
    return [w for w in lines if w.isalpha() and w.islower() and len(w) > 1]


def squad_document(questions: int, seed: int = 0, answers_per_question: int = 1) -> dict[str, Any]:
    """A SQuAD v1.1 document with ``questions`` questions: about five per paragraph, 40 paragraphs per
    article, contexts of log-normally many words (median 120, a few past a 384-token window, so that
    contexts split into overlapping windows as in the real set), each answer a 1-4 word span of its context
    with its character offset (``answers_per_question`` spans per question: the dev set has three)."""
    if questions < 1:
        raise HilalError(f"SQuAD needs at least 1 question; got {questions}")
    rng = np.random.default_rng(seed)
    words = np.array(_words())
    data: list[dict[str, Any]] = []
    q = 0
    while q < questions:
        paragraphs = []
        for _ in range(40):
            if q >= questions:
                break
            n_words = int(np.clip(rng.lognormal(np.log(120), 0.5), 20, 700)) if q else 450  # the first is long
            tokens = list(words[rng.integers(0, len(words), n_words)])
            context = " ".join(t + ("." if i % 17 == 16 else "") for i, t in enumerate(tokens))
            starts = np.cumsum([0] + [len(t) + 1 + (i % 17 == 16) for i, t in enumerate(tokens[:-1])])
            qas = []
            for _ in range(min(int(rng.integers(3, 8)), questions - q)):
                answers = []
                for _ in range(answers_per_question):
                    a = int(rng.integers(0, n_words - 4))
                    k = int(rng.integers(1, 5))
                    text = context[starts[a]:starts[a + k - 1] + len(tokens[a + k - 1])]
                    answers.append({"text": text, "answer_start": int(starts[a])})
                question = " ".join(words[rng.integers(0, len(words), int(rng.integers(6, 15)))]) + "?"
                qas.append({"id": rng.bytes(12).hex(), "question": question, "answers": answers})
                q += 1
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Synthetic_article_{len(data):04d}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def squad_files(n_train: int = 87_599, n_dev: int = 10_570, seed: int = 0) -> dict[str, Callable[[], bytes]]:
    """``train-v1.1.json`` (one answer a question) and ``dev-v1.1.json`` (three), under ``squad/``."""
    from hilal.qa import SQUAD_FILES

    return {SQUAD_FILES["train"]: lambda: json.dumps(squad_document(n_train, seed)).encode(),
            SQUAD_FILES["dev"]: lambda: json.dumps(squad_document(n_dev, seed + 1, 3)).encode()}


def bert_vocab(size: int = MOBILEBERT_VOCAB) -> list[str]:
    """A BERT WordPiece vocabulary of ``size`` tokens: the shipped sample's (special tokens first), then
    ``[unused<i>]`` placeholders as in BERT's own vocabulary."""
    from hilal.qa import SAMPLE_VOCAB

    base = [t for t in SAMPLE_VOCAB.read_text(encoding="utf-8").split("\n") if t]
    if size < len(base):
        raise HilalError(f"vocabulary size {size} is below the sample vocabulary's {len(base)} tokens")
    return base + [f"[unused{i}]" for i in range(size - len(base))]


def write_mobilebert(folder: str | Path, seed: int = 0, weights: bool = True) -> list[Path]:
    """``save_pretrained`` a fast WordPiece tokenizer of :func:`bert_vocab` and (with ``weights``) a randomly
    initialised ``MobileBertForQuestionAnswering`` of ``google/mobilebert-uncased``'s configuration (transformers'
    defaults) into ``folder``, where :func:`hilal.qa.load_tokenizer` and :func:`hilal.models.mobilebert` look.
    Returns the files written."""
    import tempfile

    import torch
    from transformers import MobileBertConfig, MobileBertForQuestionAnswering

    from hilal.qa import wordpiece_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
        wordpiece_tokenizer(vocab).save_pretrained(folder)
    if weights:
        torch.manual_seed(seed)
        cfg = MobileBertConfig(vocab_size=MOBILEBERT_VOCAB)
        MobileBertForQuestionAnswering(cfg).save_pretrained(folder)
    return sorted(p for p in folder.iterdir() if p.is_file())


def write_vit_b16(folder: str | Path, seed: int = 0, num_labels: int = 1000) -> list[Path]:
    """``save_pretrained`` a randomly initialised ``ViTForImageClassification`` of ``google/vit-base-patch16-224``'s
    configuration (transformers' ViT defaults: ViT-B/16 at 224x224) with ``num_labels`` classes and its
    preprocessing statistics into ``folder``, where :func:`hilal.models.vit_b16` looks. Returns the files
    written."""
    import json

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ViTForImageClassification(ViTConfig(num_labels=num_labels)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return sorted(p for p in folder.iterdir() if p.is_file())
