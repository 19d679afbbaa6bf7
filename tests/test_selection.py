"""The default test selection: the paper-scale dry run runs only when a -m expression names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("marks,collected", [(None, False), ("not slow", False), ("paper", True),
                                             ("paper or slow", True)])
def test_the_paper_dry_run_is_selected_only_by_name(marks, collected):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "tests/test_dryrun.py::test_dry_run_end_to_end"] + (["-m", marks] if marks else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    assert ("test_dry_run_end_to_end" in out) is collected, out
