"""Benchmark tables in the docs, generated from the result files in ``bench/results``.

A table block in a markdown file is a line ``<!-- table: ARGS -->``, the table, and a line ``<!-- /table -->``.
:func:`update` rewrites the table of every block from the JSON files its ARGS name (paths relative to the
repository root) and leaves every other line as it was. ARGS is one of

- ``records FILE [COL ...]``: :func:`hilal.bench.tables.table` of the file's kind and records;
- ``criteria FILE [FILE ...] [COL ...]``: :func:`hilal.bench.tables.search_criteria` over the records of the
  search files, in order (what ``hilal bench search --criteria`` prints);

arguments ending in ``.json`` are files, the others the columns to keep, in that order (default all). Marker
lines inside fenced code are text, so the docs can show the syntax.

``python -m hilal.bench.report [FILE ...] [--check]`` (default: README.md and docs/benchmarks.md) rewrites the
blocks; with ``--check`` it writes nothing and exits 1 naming the stale blocks, so that a test holds the committed
docs to the committed results.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hilal.bench.tables import load_bench, markdown, search_criteria, search_records, table
from hilal.paths import atomic_write_text, project_root
from hilal.registry import HilalError

DOCS = ("README.md", "docs/benchmarks.md")
"""The files :func:`update` rewrites when given none (relative to the repository root)."""
TABLE_KINDS = ("criteria", "records")
OPEN, CLOSE = "<!-- table: ARGS -->", "<!-- /table -->"

_OPEN = re.compile(r"<!--\s*table:(?P<args>.*?)-->")
_CLOSE = re.compile(r"<!--\s*/table\s*-->")
_FENCE = re.compile(r"(```|~~~)")


def block_table(args: Sequence[str], root: Path, where: str = "", notes: list[str] | None = None) -> str:
    """The markdown table of a block whose marker holds ``args`` (result paths relative to ``root``); every
    error starts with ``where`` (``file:line``), so that it names the block."""
    at = f"{where}: " if where else ""
    if not args or args[0] not in TABLE_KINDS:
        got = repr(args[0]) if args else "nothing"
        raise HilalError(f"{at}unknown table kind {got}; valid: {', '.join(map(repr, TABLE_KINDS))}")
    kind = args[0]
    files = [root / a for a in args[1:] if a.endswith(".json")]
    cols = [a for a in args[1:] if not a.endswith(".json")]
    if not files or (kind == "records" and len(files) > 1):
        raise HilalError(f"{at}a {kind!r} table takes {'one result file' if kind == 'records' else 'result files'}"
                         f" (*.json); got {len(files)}")
    try:
        if kind == "records":
            data = load_bench(files[0])
            df = table(data.get("kind"), data["records"])
        else:
            df = search_criteria(search_records(files, notes))
    except HilalError as e:
        raise HilalError(f"{at}{e}") from None
    bad = [c for c in cols if c not in df.columns]
    if bad:
        raise HilalError(f"{at}unknown column(s) {bad} of the {kind!r} table; valid: {list(df.columns)}")
    return markdown(df[cols] if cols else df)


def rewrite(text: str, name: str, root: Path, notes: list[str] | None = None) -> tuple[str, list[str]]:
    """``text`` with every table block filled (see the module's docstring) and the blocks whose table changed,
    as ``name:line: ARGS``. A block without its closing line, or a closing line without a block, is an error."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stale: list[str] = []
    fenced, i = False, 0
    while i < len(lines):
        line, s = lines[i], lines[i].strip()
        out.append(line)
        if _FENCE.match(s):
            fenced = not fenced
        m = None if fenced else _OPEN.fullmatch(s)
        if not fenced and _CLOSE.fullmatch(s):
            raise HilalError(f"{name}:{i + 1}: {CLOSE} without a {OPEN} line before it")
        if m is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines))
                    if _CLOSE.fullmatch(lines[j].strip()) or _OPEN.fullmatch(lines[j].strip())), None)
        if end is None or _OPEN.fullmatch(lines[end].strip()):
            raise HilalError(f"{name}:{i + 1}: table block not closed: no {CLOSE} line before "
                             + ("the end of the file" if end is None else f"the next block (line {end + 1})"))
        args = m["args"].split()
        new = block_table(args, root, f"{name}:{i + 1}", notes) + "\n"
        if "".join(lines[i + 1:end]) != new:
            stale.append(f"{name}:{i + 1}: {' '.join(args)}")
        out += [new, lines[end]]
        i = end + 1
    return "".join(out), stale


def update(files: Sequence[str | Path] | None = None, check: bool = False, root: str | Path | None = None,
           notes: list[str] | None = None) -> list[str]:
    """Fill the table blocks of ``files`` (default :data:`DOCS`; relative paths and the result paths in the
    blocks are taken from ``root``, default the repository root) and return the stale blocks. Every file is
    read and every table computed before anything is written; with ``check`` nothing is."""
    root = Path(root) if root is not None else project_root()
    done = []
    for f in files if files else DOCS:
        path = root / f
        if not path.is_file():
            raise HilalError(f"no markdown file {str(path)!r}")
        text = path.read_bytes().decode("utf-8")
        new, stale = rewrite(text, str(f), root, notes)
        done.append((path, new, stale, new != text))
    if not check:
        for path, new, _, changed in done:
            if changed:
                atomic_write_text(new, path)
    return [s for _, _, stale, _ in done for s in stale]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hilal.bench.report``: exit 0 (blocks rewritten, or with ``--check`` up to date), 1 (``--check``
    found stale blocks, named on stdout) or 2 (a bad block or file, one line on stderr)."""
    p = argparse.ArgumentParser(prog="python -m hilal.bench.report", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help=f"markdown files (default: {' '.join(DOCS)})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block's table is stale")
    p.add_argument("--root", default=None, help="folder the paths are relative to (default: the repository root)")
    a = p.parse_args(argv)
    notes: list[str] = []
    try:
        stale = update(a.files, check=a.check, root=a.root, notes=notes)
    except HilalError as e:
        print(f"bench report: error: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print("note:", n)
    if a.check and stale:
        print("stale benchmark tables (rewrite them with python -m hilal.bench.report):")
        print("\n".join(f"  {s}" for s in stale))
        return 1
    print("\n".join(["rewrote:", *(f"  {s}" for s in stale)]) if stale else "every table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
