"""Extractive question answering: SQuAD v1.1 data, tokenization into windows, and EM / F1 scoring.

Two dataset builders, which :mod:`hilal.data` registers in :data:`hilal.data.DATASETS` (this module imports
nothing from it):

- ``squad``: SQuAD v1.1 (``data/squad/train-v1.1.json`` and ``dev-v1.1.json``, fetched when online),
  tokenized with MobileBERT's tokenizer; test = the official dev set.
- ``squad_sample``: a small SQuAD-format file shipped with the package (original paragraphs and
  questions) with its own WordPiece vocabulary, so the same code runs offline on tiny models.

Contexts longer than the window are split into overlapping windows (``doc_stride`` tokens of overlap);
a window that does not contain the answer is labelled with the [CLS] index. Predictions combine the
n-best start/end logits of every window of an example and map back to characters through the offsets.
"""

from __future__ import annotations

import collections
import json
import re
import string
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hilal.device import model_device, to_device
from hilal.paths import data_dir, offline, pretrained_source
from hilal.registry import HilalError
from hilal.splits import Splits, loader

RESOURCES = Path(__file__).resolve().parent / "resources"
SAMPLE_JSON = RESOURCES / "squad_sample.json"
SAMPLE_VOCAB = RESOURCES / "squad_sample_vocab.txt"
MOBILEBERT = "google/mobilebert-uncased"
SQUAD_FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")

# --- metrics (the official SQuAD v1.1 definitions) ---------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Harmonic mean of token precision and recall between normalized prediction and truth (bag of tokens)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_over_truths(metric: Any, prediction: str, truths: Iterable[str]) -> float:
    """The best score of ``prediction`` against any of the ground truths."""
    return max(metric(prediction, t) for t in truths)


def squad_scores(predictions: Mapping[str, str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Exact match and F1 as fractions in [0, 1], averaged over every example (a missing prediction
    counts as the empty answer)."""
    if not examples:
        return {"em": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex["id"], "")
        truths = ex["answers"]["text"]
        em += best_over_truths(exact_match, pred, truths)
        f1 += best_over_truths(f1_score, pred, truths)
    return {"em": em / len(examples), "f1": f1 / len(examples)}


# --- reading -----------------------------------------------------------------------------------------

def read_squad(path: str | Path) -> list[dict[str, Any]]:
    """Flatten a SQuAD v1.1 JSON file into examples ``{id, title, context, question, answers}`` where
    ``answers = {"text": [...], "answer_start": [...]}`` (the Hugging Face ``datasets`` layout). A file that is
    not JSON or lacks a field of the v1.1 layout is a one-line HilalError naming the file and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise HilalError(f"{path}: not a SQuAD v1.1 JSON file ({type(e).__name__}: {' '.join(str(e).split())})"
                         ) from None
    out = []
    where = "the top level"
    try:
        for i, article in enumerate(doc["data"]):
            where = f"data[{i}]"
            for j, para in enumerate(article["paragraphs"]):
                where = f"data[{i}].paragraphs[{j}]"
                for k, qa in enumerate(para["qas"]):
                    where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                    out.append({"id": qa["id"], "title": article.get("title", ""), "context": para["context"],
                                "question": qa["question"],
                                "answers": {"text": [a["text"] for a in qa["answers"]],
                                            "answer_start": [int(a["answer_start"]) for a in qa["answers"]]}})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"no {e.args[0]!r} field" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise HilalError(f"{path}: not the SQuAD v1.1 layout at {where} ({what}); expected "
                         "data[].paragraphs[].qas[] with id, question and answers[].text/answer_start") from None
    return out


def _squad_files(root: Path, download: bool | None) -> dict[str, Path]:
    """Paths of the official files under ``root/squad``; fetched first when missing and online."""
    base = root / "squad"
    paths = {k: base / v for k, v in SQUAD_FILES.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    if download if download is not None else not offline():
        try:
            _fetch_squad(paths)
        except Exception as e:  # no network, blocked host, missing optional library
            why = f"{type(e).__name__}: {e}"
        else:
            return paths
    else:
        why = "downloads are disabled by HILAL_OFFLINE"
    raise HilalError(
        f"dataset 'squad' not found: expected {paths['train'].name} and {paths['dev'].name} in {base} "
        f"({why}). Download SQuAD v1.1 from {SQUAD_URL} (the two JSON files) and put them there, "
        f"or use the offline stand-in 'squad_sample'.")


def _fetch_squad(paths: dict[str, Path]) -> None:
    """Write the official JSON files, from the Hugging Face hub via ``datasets`` when it is installed,
    else from the SQuAD site."""
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    try:
        import datasets  # optional
    except ImportError:
        datasets = None
    if datasets is not None:
        hf = datasets.load_dataset("rajpurkar/squad")
        for key, split in (("train", "train"), ("dev", "validation")):
            _write_squad_json(hf[split], paths[key])
        return
    for path in paths.values():
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(SQUAD_URL + path.name, tmp)
        tmp.replace(path)


def _write_squad_json(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Rows in the ``datasets`` layout -> an official-format v1.1 file (grouped by title and context)."""
    articles: dict[str, dict[str, list]] = {}
    for r in rows:
        paras = articles.setdefault(r["title"], {})
        qas = paras.setdefault(r["context"], [])
        qas.append({"id": r["id"], "question": r["question"],
                    "answers": [{"text": t, "answer_start": s}
                                for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)]})
    doc = {"version": "1.1", "data": [
        {"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in paras.items()]}
        for t, paras in articles.items()]}
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    tmp.replace(path)


# --- tokenizers --------------------------------------------------------------------------------------

def sample_tokenizer() -> Any:
    """The WordPiece tokenizer (lowercasing, BERT special tokens) of the shipped sample, as a fast
    ``BertTokenizerFast``; its vocabulary was trained on the sample with the ``tokenizers`` library."""
    return wordpiece_tokenizer(SAMPLE_VOCAB)


def wordpiece_tokenizer(vocab_file: str | Path) -> Any:
    """A lowercasing fast BERT tokenizer from a ``vocab.txt`` file (one token a line, line number = id)."""
    import transformers
    from transformers import BertTokenizerFast

    if int(transformers.__version__.split(".")[0]) >= 5:
        return BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)


def build_wordpiece_vocab(texts: Iterable[str], vocab_size: int = 6000) -> list[str]:
    """Train a lowercasing WordPiece vocabulary on ``texts``; returns tokens in id order (special tokens,
    then the rest sorted). ``resources/squad_sample_vocab.txt`` was made this way from the sample's
    contexts and questions (:func:`sample_texts`). The trainer breaks ties between equally frequent merges
    differently from run to run, so the shipped file, not a re-run, fixes the sample's token ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(list(texts), trainer)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + sorted(set(tok.get_vocab()) - set(specials))


def sample_texts() -> list[str]:
    """Every distinct context and question of the shipped sample, in file order."""
    seen: dict[str, None] = {}
    for ex in read_squad(SAMPLE_JSON):
        seen.setdefault(ex["context"], None)
        seen.setdefault(ex["question"], None)
    return list(seen)


def load_tokenizer(name: str) -> Any:
    """``"sample"`` -> :func:`sample_tokenizer`; otherwise a fast tokenizer from a local folder, the
    ``data/models/<name>`` folder, or the Hugging Face hub (cache only when offline)."""
    if name == "sample":
        return sample_tokenizer()
    from transformers import AutoTokenizer

    src, is_local = pretrained_source(name)
    local = data_dir() / "models" / name.split("/")[-1]
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=offline() and not is_local)
    except Exception as e:
        raise HilalError(
            f"tokenizer {name!r} is not available ({type(e).__name__}). Download it once with "
            f"`huggingface-cli download {name}` (or save_pretrained it into {local}); offline, use the "
            f"'squad_sample' dataset with the 'mobilebert_tiny' model.") from None
    if not getattr(tok, "is_fast", False):
        raise HilalError(f"tokenizer {name!r} is not a fast tokenizer; offset mappings need one")
    return tok


# --- features ----------------------------------------------------------------------------------------

def prepare_features(tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int = 384,
                     doc_stride: int = 128) -> dict[str, Any]:
    """Tokenize (question, context) pairs into fixed-length windows.

    Returns numpy arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` (N, max_length),
    ``start_positions``/``end_positions`` (N,) token indices of the first answer, or the [CLS] index when
    the answer is not wholly inside the window, ``example_index`` (N,) and ``offsets`` (N, max_length, 2)
    character spans of context tokens (-1 for question, special and padding tokens).
    """
    if not examples:
        raise HilalError("no question-answering examples to tokenize")
    enc = tokenizer([ex["question"].lstrip() for ex in examples], [ex["context"] for ex in examples],
                    truncation="only_second", max_length=max_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    n = len(enc["input_ids"])
    offsets = np.full((n, max_length, 2), -1, dtype=np.int64)
    starts, ends = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ex_index = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
    for i in range(n):
        seq = enc.sequence_ids(i)
        ctx = [j for j, s in enumerate(seq) if s == 1]
        for j in ctx:
            offsets[i, j] = enc["offset_mapping"][i][j]
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in \
            enc["input_ids"][i] else 0
        starts[i] = ends[i] = cls
        ans = examples[ex_index[i]]["answers"]
        if not ans["text"] or not ctx:
            continue
        a0 = ans["answer_start"][0]
        a1 = a0 + len(ans["text"][0])
        if offsets[i, ctx[0], 0] > a0 or offsets[i, ctx[-1], 1] < a1:
            continue  # the answer is not wholly inside this window
        starts[i] = next(j for j in ctx if offsets[i, j, 1] > a0)
        ends[i] = next(j for j in reversed(ctx) if offsets[i, j, 0] < a1)
    feats: dict[str, Any] = {"input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
                             "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
                             "start_positions": starts, "end_positions": ends,
                             "example_index": ex_index, "offsets": offsets}
    if "token_type_ids" in enc:
        feats["token_type_ids"] = np.asarray(enc["token_type_ids"], dtype=np.int64)
    return feats


class QAFeatures(Dataset):
    """Tokenized windows of a list of examples. Items are dicts of model inputs plus start/end labels;
    ``examples``, ``example_index`` and ``offsets`` stay on the dataset for answer post-processing."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], features: Mapping[str, Any]) -> None:
        self.examples = list(examples)
        self.example_index = np.asarray(features["example_index"])
        self.offsets = np.asarray(features["offsets"])
        self.tensors = {k: torch.as_tensor(features[k]) for k in MODEL_KEYS if k in features}

    def __len__(self) -> int:
        return len(self.example_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of the windows in ``index`` (:func:`hilal.data.loader` cuts batches with it)."""
        return {k: v[index] for k, v in self.tensors.items()}


def postprocess(dataset: QAFeatures, start_logits: np.ndarray, end_logits: np.ndarray, n_best: int = 20,
                max_answer_length: int = 30) -> dict[str, str]:
    """Answer text per example id: the highest start+end logit span over all windows of the example, among
    the ``n_best`` starts and ends of each window, inside the context, end >= start and at most
    ``max_answer_length`` tokens long. An example without any valid span gets the empty answer."""
    best: dict[int, tuple[float, str]] = {}
    for i in range(len(dataset)):
        e = int(dataset.example_index[i])
        off = dataset.offsets[i]
        context = dataset.examples[e]["context"]
        s_idx = np.argsort(start_logits[i])[::-1][:n_best]
        e_idx = np.argsort(end_logits[i])[::-1][:n_best]
        for s in s_idx:
            if off[s, 0] < 0:
                continue
            for t in e_idx:
                if off[t, 0] < 0 or t < s or t - s + 1 > max_answer_length:
                    continue
                score = float(start_logits[i, s] + end_logits[i, t])
                if e not in best or score > best[e][0]:
                    best[e] = (score, context[off[s, 0]:off[t, 1]])
    return {ex["id"]: best[e][1] if e in best else "" for e, ex in enumerate(dataset.examples)}


def qa_logits(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The start and end logits of a QA model's output: a transformers output object or a ``(start, end)`` pair
    (the kit's own models and traced ones return either)."""
    if hasattr(out, "start_logits"):
        return out.start_logits, out.end_logits
    return out[0], out[1]


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: QAFeatures, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits of every window, in dataset order (model in eval mode)."""
    model.eval()
    device = model_device(model)
    starts, ends = [], []
    for batch in loader(dataset, batch_size=batch_size):
        inputs = {k: v for k, v in to_device(batch, device).items() if k not in ("start_positions", "end_positions")}
        s, e = qa_logits(model(**inputs))
        starts.append(s.float().cpu().numpy())
        ends.append(e.float().cpu().numpy())
    return np.concatenate(starts), np.concatenate(ends)


class SquadEvaluator:
    """``splits.meta["evaluator"]``: ``(model, split) -> {"accuracy": f1, "em": em, "f1": f1}`` (fractions).
    Every example of the split is scored, including those whose answer lies in no window."""

    def __init__(self, datasets: Mapping[str, QAFeatures], n_best: int = 20, max_answer_length: int = 30,
                 batch_size: int = 64) -> None:
        self.datasets = dict(datasets)
        self.n_best, self.max_answer_length, self.batch_size = n_best, max_answer_length, batch_size

    def __call__(self, model: nn.Module, split: str) -> dict[str, float]:
        if split not in self.datasets:
            raise HilalError(f"unknown split {split!r}; valid choices: {', '.join(self.datasets)}")
        ds = self.datasets[split]
        s, e = predict_logits(model, ds, self.batch_size)
        preds = postprocess(ds, s, e, self.n_best, self.max_answer_length)
        sc = squad_scores(preds, ds.examples)
        return {"accuracy": sc["f1"], "em": sc["em"], "f1": sc["f1"]}


# --- datasets ----------------------------------------------------------------------------------------

def _group_split(examples: list[dict[str, Any]], share: float, seed: int) -> tuple[list, list]:
    """Split examples by context (questions about one paragraph stay together), about ``share`` held out."""
    contexts = sorted({ex["context"] for ex in examples})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(contexts))
    k = max(1, round(share * len(contexts)))
    held = {contexts[i] for i in order[:k]}
    return [ex for ex in examples if ex["context"] not in held], [ex for ex in examples if ex["context"] in held]


def qa_splits(name: str, train: list, calib: list, test: list, tokenizer: Any, tokenizer_name: str,
              max_length: int, doc_stride: int) -> Splits:
    """Tokenize three example lists and wrap them as :class:`Splits` with the EM/F1 evaluator."""
    if doc_stride >= max_length:
        raise HilalError(f"doc_stride ({doc_stride}) must be smaller than max_length ({max_length})")
    parts = {k: QAFeatures(v, prepare_features(tokenizer, v, max_length, doc_stride))
             for k, v in (("train", train), ("calib", calib), ("test", test))}
    meta = {"evaluator": SquadEvaluator(parts), "tokenizer": tokenizer,
            "model_kwargs": {"vocab_size": len(tokenizer), "max_length": max_length,
                             "tokenizer_name": tokenizer_name},
            "examples": {k: d.examples for k, d in parts.items()}, "max_length": max_length,
            "doc_stride": doc_stride,
            # transformers train far better with AdamW than with the CNNs' SGD recipe
            "train_config": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "batch_size": 32},
            "cache_key": f"{tokenizer_name}-{len(tokenizer)}-{max_length}-{doc_stride}"}
    return Splits(name, parts["train"], parts["calib"], parts["test"], in_channels=1, image_size=max_length,
                  num_classes=2, task="qa", meta=meta)


def _subsample(examples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return [examples[i] for i in idx]


def squad(seed: int = 0, root: Path | None = None, tokenizer: str = MOBILEBERT, max_length: int = 384,
          doc_stride: int = 128, calib: float = 0.02, max_train: int | None = None, max_test: int | None = None,
          download: bool | None = None, **_: Any) -> Splits:
    """SQuAD v1.1 from ``data/squad/{train,dev}-v1.1.json`` (fetched when online), tokenized with
    ``tokenizer`` (MobileBERT's by default). calib = paragraphs held out of train (share ``calib``),
    test = the dev set. ``max_train``/``max_test`` subsample questions for quick runs."""
    paths = _squad_files(root or data_dir(), download)
    train, cal = _group_split(read_squad(paths["train"]), calib, seed)
    test = read_squad(paths["dev"])
    train, test = _subsample(train, max_train, seed), _subsample(test, max_test, seed)
    return qa_splits("squad", train, cal, test, load_tokenizer(tokenizer), tokenizer, max_length, doc_stride)


def squad_sample(seed: int = 0, root: Path | None = None, tokenizer: str = "sample", max_length: int = 96,
                 doc_stride: int = 48, calib: float = 0.15, test: float = 0.2, **_: Any) -> Splits:
    """The shipped SQuAD-format sample, split by paragraph into train / calib / test and tokenized with the
    sample's own WordPiece vocabulary (offline). 287 paragraphs, 900 questions: 47 hand-written paragraphs
    on varied topics and 240 from templates about invented towns, people and ships."""
    examples = read_squad(SAMPLE_JSON)
    rest, te = _group_split(examples, test, seed)
    tr, ca = _group_split(rest, calib / (1 - test), seed + 1)
    return qa_splits("squad_sample", tr, ca, te, load_tokenizer(tokenizer), tokenizer, max_length, doc_stride)
