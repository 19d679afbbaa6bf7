"""SQuAD metrics, tokenization into windows, answer post-processing and the SQuAD loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hilal.data import load_dataset, loader
from hilal.qa import (
    QAFeatures,
    SquadEvaluator,
    _write_squad_json,
    build_wordpiece_vocab,
    exact_match,
    f1_score,
    normalize_answer,
    postprocess,
    prepare_features,
    read_squad,
    sample_tokenizer,
    squad_scores,
    wordpiece_tokenizer,
)
from hilal.registry import HilalError

# --- metrics, against hand-worked cases ---------------------------------------------------------------


def test_normalization():
    assert normalize_answer("  The Quick,  brown fox! ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("U.S.A.") == "usa"


def test_exact_match():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_partial_overlap():
    # pred tokens [big, red, dog, barked], gold [red, dog]: P = 2/4, R = 2/2, F1 = 2/3
    assert f1_score("the big red dog barked", "a red dog") == pytest.approx(2 / 3)
    # repeated tokens count once each: common = {dog: 1, cat: 1}, P = R = 2/3
    assert f1_score("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/3 -> 2 * (1/3) / (4/3) = 1/2
    assert f1_score("1874", "in May 1874") == pytest.approx(0.5)
    assert f1_score("", "answer") == 0.0
    assert f1_score("nothing shared", "answer") == 0.0


def test_scores_take_best_ground_truth_and_count_missing():
    examples = [
        {"id": "a", "answers": {"text": ["the river Alde", "Alde"], "answer_start": [0, 10]}},
        {"id": "b", "answers": {"text": ["four metres wide"], "answer_start": [0]}},
        {"id": "c", "answers": {"text": ["1911"], "answer_start": [0]}},
    ]
    preds = {"a": "Alde", "b": "four metres"}  # "c" missing -> empty answer, still counted
    sc = squad_scores(preds, examples)
    assert sc["em"] == pytest.approx(1 / 3)
    # a: 1; b: P = 1, R = 2/3 -> 0.8; c: 0
    assert sc["f1"] == pytest.approx((1 + 0.8 + 0) / 3)


# --- tokenization -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_examples():
    from hilal.qa import SAMPLE_JSON

    return read_squad(SAMPLE_JSON)


def test_sample_file_is_consistent(sample_examples):
    assert len(sample_examples) >= 100
    assert len({ex["id"] for ex in sample_examples}) == len(sample_examples)
    for ex in sample_examples:
        for text, start in zip(ex["answers"]["text"], ex["answers"]["answer_start"], strict=True):
            assert ex["context"][start:start + len(text)] == text
    tok = sample_tokenizer()
    assert tok.is_fast
    ids = tok([ex["context"] for ex in sample_examples[:50]])["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)


def test_wordpiece_vocab_covers_its_texts(tmp_path):
    texts = ["The lamp was lit in 1874.", "Who lit the lamp?", "Lamps and lighthouses light the coast."]
    vocab = build_wordpiece_vocab(texts, 200)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(vocab)) == len(vocab)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = wordpiece_tokenizer(tmp_path / "vocab.txt")
    assert len(tok) == len(vocab)
    for row in tok(texts)["input_ids"]:
        assert tok.unk_token_id not in row
    assert tok.convert_ids_to_tokens(tok("lamp")["input_ids"]) == ["[CLS]", "lamp", "[SEP]"]


@pytest.mark.parametrize("max_length,stride", [(40, 16), (96, 48)])
def test_windows_map_answers_to_exact_character_spans(sample_examples, max_length, stride):
    examples = sample_examples[::3]
    tok = sample_tokenizer()
    f = prepare_features(tok, examples, max_length, stride)
    n = len(f["input_ids"])
    assert f["input_ids"].shape == (n, max_length) and f["offsets"].shape == (n, max_length, 2)
    if max_length == 40:
        assert n > len(examples)  # overflow produced several windows per example
    covered = set()
    for i in range(n):
        ex = examples[f["example_index"][i]]
        s, e, off = f["start_positions"][i], f["end_positions"][i], f["offsets"][i]
        ctx = np.flatnonzero(off[:, 0] >= 0)
        a0 = ex["answers"]["answer_start"][0]
        a1 = a0 + len(ex["answers"]["text"][0])
        inside = off[ctx[0], 0] <= a0 and off[ctx[-1], 1] >= a1
        if s == 0 and e == 0:
            assert not inside  # [CLS] only for windows that do not hold the answer
            continue
        assert inside and s <= e
        assert ex["context"][off[s, 0]:off[e, 1]] == ex["answers"]["text"][0]
        covered.add(int(f["example_index"][i]))
    # brute force: an example has a labelled window iff some window's context span covers the answer
    assert covered == {int(f["example_index"][i]) for i in range(n)
                       if _window_covers(f["offsets"][i], examples[f["example_index"][i]])}
    assert set(f["example_index"].tolist()) == set(range(len(examples)))


def _window_covers(off, ex):
    ctx = off[off[:, 0] >= 0]
    a0 = ex["answers"]["answer_start"][0]
    return ctx[:, 0].min() <= a0 and ctx[:, 1].max() >= a0 + len(ex["answers"]["text"][0])


def test_postprocess_with_oracle_logits_scores_every_example(sample_examples):
    examples = list(sample_examples[:60])
    # an answer longer than any window's context part: it lies in no window
    long = dict(examples[0], id="long")
    long["answers"] = {"text": [long["context"][:150]], "answer_start": [0]}
    examples.append(long)
    f = prepare_features(sample_tokenizer(), examples, 40, 16)
    ds = QAFeatures(examples, f)
    n, length = f["input_ids"].shape
    start, end = np.zeros((n, length)), np.zeros((n, length))
    has_answer = set()
    for i in range(n):
        if f["start_positions"][i] != 0:
            start[i, f["start_positions"][i]] = end[i, f["end_positions"][i]] = 10.0
            has_answer.add(int(f["example_index"][i]))
    preds = postprocess(ds, start, end)
    assert set(preds) == {ex["id"] for ex in examples}
    for e in has_answer:
        assert preds[examples[e]["id"]] == examples[e]["answers"]["text"][0]
    sc = squad_scores(preds, examples)
    # examples whose answer lies in no window are counted in the denominator, not dropped
    assert len(has_answer) == len(examples) - 1 and len(examples) - 1 not in has_answer
    assert sc["em"] == pytest.approx(len(has_answer) / len(examples))
    assert sc["f1"] >= sc["em"]


class _Oracle(torch.nn.Module):
    """Returns logits peaked at the labelled start/end of each window, looked up by its input ids."""

    def __init__(self, ds: QAFeatures) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        t = ds.tensors
        self.lookup = {tuple(t["input_ids"][i].tolist()): (int(t["start_positions"][i]), int(t["end_positions"][i]))
                       for i in range(len(ds))}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        s = torch.zeros(input_ids.shape)
        e = torch.zeros(input_ids.shape)
        for r, row in enumerate(input_ids.tolist()):
            a, b = self.lookup[tuple(row)]
            s[r, a] = e[r, b] = 5.0
        return s, e


# --- loaders ------------------------------------------------------------------------------------------

_TRAIN = {"version": "1.1", "data": [
    {"title": "Harbour", "paragraphs": [
        {"context": "The harbour wall was finished in 1821. It shelters forty fishing boats from winter storms.",
         "qas": [{"id": "t1", "question": "When was the harbour wall finished?",
                  "answers": [{"text": "1821", "answer_start": 33}]},
                 {"id": "t2", "question": "How many boats does it shelter?",
                  "answers": [{"text": "forty", "answer_start": 52}]}]},
        {"context": "A ferry crosses the bay to the island of Tarn every morning at seven.",
         "qas": [{"id": "t3", "question": "Where does the ferry go?",
                  "answers": [{"text": "the island of Tarn", "answer_start": 27}]}]}]},
    {"title": "Garden", "paragraphs": [
        {"context": "The walled garden grows pears, figs and quinces along its south facing wall.",
         "qas": [{"id": "t4", "question": "What grows along the wall?",
                  "answers": [{"text": "pears, figs and quinces", "answer_start": 24}]}]},
        {"context": "Its gardener, Ruth Amsel, has looked after the beds since 2003.",
         "qas": [{"id": "t5", "question": "Who is the gardener?",
                  "answers": [{"text": "Ruth Amsel", "answer_start": 14}]}]}]}]}
_DEV = {"version": "1.1", "data": [
    {"title": "Mill", "paragraphs": [
        {"context": "The mill pond froze solid in the winter of 1947, and children skated on it for weeks.",
         "qas": [{"id": "d1", "question": "When did the mill pond freeze solid?",
                  "answers": [{"text": "1947", "answer_start": 42}, {"text": "the winter of 1947",
                                                                      "answer_start": 28}]}]}]}]}


def _write(root, name, doc):
    (root / "squad").mkdir(parents=True, exist_ok=True)
    (root / "squad" / name).write_text(json.dumps(doc))


def test_squad_loader_on_official_format(tmp_path):
    _write(tmp_path, "train-v1.1.json", _TRAIN)
    _write(tmp_path, "dev-v1.1.json", _DEV)
    s = load_dataset("squad", root=tmp_path, tokenizer="sample", max_length=32, doc_stride=8, calib=0.25,
                     download=False)
    assert s.task == "qa" and s.name == "squad"
    ex = s.meta["examples"]
    assert sorted(e["id"] for e in ex["train"] + ex["calib"]) == ["t1", "t2", "t3", "t4", "t5"]
    assert {e["context"] for e in ex["train"]}.isdisjoint({e["context"] for e in ex["calib"]})
    assert [e["id"] for e in ex["test"]] == ["d1"]
    assert ex["test"][0]["answers"]["text"] == ["1947", "the winter of 1947"]
    for part in (s.train, s.calib, s.test):
        batch = next(iter(loader(part, batch_size=4)))
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
        assert batch["input_ids"].shape[1] == 32 and batch["input_ids"].dtype == torch.int64
    assert s.meta["model_kwargs"]["vocab_size"] == len(sample_tokenizer())
    # the evaluator scores through the same post-processing: an oracle model gets EM = F1 = 1 on train
    m = _Oracle(s.train)
    out = SquadEvaluator({"train": s.train})(m, "train")
    assert out["em"] == pytest.approx(1.0) and out["accuracy"] == out["f1"] == pytest.approx(1.0)


def test_squad_missing_files_error(tmp_path):
    with pytest.raises(HilalError) as err:
        load_dataset("squad", root=tmp_path, download=False)
    msg = str(err.value)
    assert "train-v1.1.json" in msg and "dev-v1.1.json" in msg and str(tmp_path / "squad") in msg


def test_hf_rows_round_trip_to_official_json(tmp_path):
    rows = [{"id": "x1", "title": "T", "context": "Bees make honey.", "question": "What do bees make?",
             "answers": {"text": ["honey"], "answer_start": [10]}},
            {"id": "x2", "title": "T", "context": "Bees make honey.", "question": "Who makes honey?",
             "answers": {"text": ["Bees"], "answer_start": [0]}}]
    _write_squad_json(rows, tmp_path / "x.json")
    assert read_squad(tmp_path / "x.json") == rows


def test_squad_sample_splits_by_paragraph():
    s = load_dataset("squad_sample", seed=0)
    ex = s.meta["examples"]
    ctx = {k: {e["context"] for e in v} for k, v in ex.items()}
    assert not (ctx["train"] & ctx["calib"]) and not (ctx["train"] & ctx["test"]) and not (ctx["calib"] & ctx["test"])
    assert len(ex["train"]) > len(ex["test"]) > 0 and len(ex["calib"]) > 0
    assert len(s.train) >= len(ex["train"])
