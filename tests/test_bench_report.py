"""Generated benchmark tables in the docs (``python -m hilal.bench.report``): blocks filled from result files
the tests write, the text around them kept byte for byte, ``--check``, and one-line errors naming the block."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hilal.bench.report import main, update
from hilal.paths import project_root
from hilal.registry import HilalError


def _analog(tmp_path, digital=(0.0052734, 0.0145), analog=(0.0870, 0.2731)):
    """An ``analog`` result file; the table's overhead is analog_s / digital_s."""
    recs = [{"model": m, "layers": n, "batch": 256, "digital_s": d, "analog_s": a, "overhead": a / d,
             "digital_eval_s": 0.011, "drift_eval_s": 0.143, "drift_eval_overhead": 0.143 / 0.011}
            for m, n, d, a in zip(("resnet8", "resnet20"), (10, 22), digital, analog, strict=True)]
    path = tmp_path / "bench" / "results" / "analog.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "analog", "complete": True, "records": recs}))
    return path


def _search(tmp_path, name, seeds, speedups, shares, accs):
    """A ``search`` result file of model ``m``: per seed HILAL's share and accuracy against LionHeart's 0.5 and
    0.95."""
    recs = [{"model": "m", "mapping_seed": s, "speedup": sp,
             "hilal": {"analog_mac_share": sh, "accuracy_mean": ac},
             "lionheart": {"analog_mac_share": 0.5, "accuracy_mean": 0.95}}
            for s, sp, sh, ac in zip(seeds, speedups, shares, accs, strict=True)]
    path = tmp_path / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "search", "complete": True, "records": recs}))
    return path


def _g(v):
    return f"{v:.3g}"


DOC = ("# Results\n\nSome text with ü and × kept as is.  \r\n"
       "<!-- table: records bench/results/analog.json model overhead digital_s -->\n"
       "| old | table |\n|---|---|\n"
       "<!-- /table -->\n"
       "Between the blocks.\n\n"
       "```markdown\n<!-- table: nonsense -->\n<!-- /table -->\n```\n"
       "<!-- table: criteria bench/results/s1.json bench/results/s2.json model seeds speedup speedup_min "
       "speedup_max fast_seeds share_seeds acc_seeds all_seeds -->\n"
       "<!-- /table -->\n"
       "The end, without a newline.")


def _outside(text):
    """The lines outside table blocks (fenced examples included)."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(("<!-- table: records", "<!-- table: criteria")):
            inside = True
        if not inside:
            out.append(line)
        if line.startswith("<!-- /table -->") and inside:
            inside = False
    return out


def _setup(tmp_path):
    _analog(tmp_path)
    sp, sh, ac = [6.0, 4.0, 5.5], [0.6, 0.5, 0.4], [0.96, 0.95, 0.97]
    _search(tmp_path, "s1.json", [0, 1], sp[:2], sh[:2], ac[:2])
    _search(tmp_path, "s2.json", [2], sp[2:], sh[2:], ac[2:])
    doc = tmp_path / "doc.md"
    doc.write_bytes(DOC.encode())
    return doc, (sp, sh, ac)


def test_blocks_are_filled_from_the_result_files_and_nothing_else_changes(tmp_path):
    doc, (sp, sh, ac) = _setup(tmp_path)
    opening = [(i, ln) for i, ln in enumerate(DOC.splitlines(), 1) if ln.startswith("<!-- table: ")][::2]
    assert [i for i, _ in opening] == [4, 14]  # the fenced example between them is text
    assert update(["doc.md"], root=tmp_path) == [f"doc.md:{i}: {ln[12:-4]}" for i, ln in opening]
    text = doc.read_bytes().decode()
    assert _outside(text) == _outside(DOC)
    lines = text.splitlines()
    first = lines[lines.index("<!-- table: records bench/results/analog.json model overhead digital_s -->") + 1:]
    assert first[:5] == ["| model | overhead | digital_s |", "|---|---|---|",
                         f"| resnet8 | {_g(0.0870 / 0.0052734)} | {_g(0.0052734)} |",
                         f"| resnet20 | {_g(0.2731 / 0.0145)} | {_g(0.0145)} |", "<!-- /table -->"]
    crit = lines[lines.index(next(ln for ln in lines if ln.startswith("<!-- table: criteria"))) + 1:]
    fast = [s >= 5 for s in sp]
    share = [h >= 0.5 for h in sh]
    acc = [a >= 0.95 for a in ac]
    row = ["m", "3", _g(np.median(sp)), _g(min(sp)), _g(max(sp)), str(sum(fast)), str(sum(share)), str(sum(acc)),
           str(sum(f and s and a for f, s, a in zip(fast, share, acc, strict=True)))]
    assert crit[2] == "| " + " | ".join(row) + " |" and crit[3] == "<!-- /table -->"
    assert crit[0].split(" | ")[1:3] == ["seeds", "speedup"]
    assert text.endswith("The end, without a newline.")


def test_rewrite_is_idempotent_and_check_finds_stale_blocks(tmp_path, capsys):
    doc, _ = _setup(tmp_path)
    assert main(["doc.md", "--root", str(tmp_path)]) == 0
    filled = doc.read_bytes()
    assert update(["doc.md"], root=tmp_path) == [] and doc.read_bytes() == filled
    assert main(["doc.md", "--root", str(tmp_path), "--check"]) == 0
    _analog(tmp_path, digital=(0.0052734, 0.0150))  # one number of the first block changes
    capsys.readouterr()
    assert main(["doc.md", "--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "doc.md:4: records bench/results/analog.json" in out and "doc.md:14" not in out
    assert doc.read_bytes() == filled  # --check writes nothing
    assert main(["doc.md", "--root", str(tmp_path)]) == 0
    assert f"| resnet20 | {_g(0.2731 / 0.0150)} | {_g(0.0150)} |" in doc.read_text()
    assert main(["doc.md", "--root", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize("block, needle", [
    ("<!-- table: histogram bench/results/analog.json -->\n<!-- /table -->\n",
     "doc.md:4: unknown table kind 'histogram'; valid: 'criteria', 'records'"),
    ("<!-- table: -->\n<!-- /table -->\n", "doc.md:4: unknown table kind nothing"),
    ("<!-- table: records bench/results/none.json -->\n<!-- /table -->\n", "doc.md:4: no benchmark file"),
    ("<!-- table: records bench/results/analog.json -->\n| a |\n", "doc.md:4: table block not closed: no "
     "<!-- /table --> line before the end of the file"),
    ("<!-- table: records bench/results/analog.json -->\n<!-- table: records bench/results/analog.json -->\n"
     "<!-- /table -->\n", "doc.md:4: table block not closed: no <!-- /table --> line before the next block (line 5)"),
    ("text\n<!-- /table -->\n", "doc.md:5: <!-- /table --> without a <!-- table: ARGS --> line"),
    ("<!-- table: records bench/results/analog.json model speed -->\n<!-- /table -->\n",
     "doc.md:4: unknown column(s) ['speed'] of the 'records' table; valid: ['model', 'layers'"),
    ("<!-- table: records bench/results/analog.json bench/results/analog.json -->\n<!-- /table -->\n",
     "doc.md:4: a 'records' table takes one result file (*.json); got 2"),
    ("<!-- table: criteria bench/results/analog.json -->\n<!-- /table -->\n",
     "doc.md:4: 'bench/results/analog.json' holds a 'analog' benchmark; the criteria need 'search' files"),
])
def test_bad_blocks_are_one_line_errors_naming_file_and_line(tmp_path, capsys, block, needle):
    _analog(tmp_path)
    good = "<!-- table: records bench/results/analog.json -->\n<!-- /table -->\n"
    doc = tmp_path / "doc.md"
    doc.write_text(good + "\n" + block)  # the bad block starts on line 4
    with pytest.raises(HilalError):
        update(["doc.md"], root=tmp_path)
    assert main(["doc.md", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle.replace(str(tmp_path) + "/", "") in err.replace(str(tmp_path) + "/", "")
    assert doc.read_text() == good + "\n" + block  # the good block before it was not written either


def test_missing_markdown_file(tmp_path):
    with pytest.raises(HilalError, match="no markdown file .*nope.md"):
        update(["nope.md"], root=tmp_path)


def test_repository_docs_match_the_committed_results(capsys):
    """README.md and docs/benchmarks.md hold the tables their committed result files give."""
    root = project_root()
    assert (root / "README.md").is_file() and (root / "docs" / "benchmarks.md").is_file()
    assert main(["--check"]) == 0, capsys.readouterr().out
