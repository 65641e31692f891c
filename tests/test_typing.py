"""The public types as a user's program sees them, checked with ``mypy --strict``.

``typing/user_program.py`` uses the API as README.rst shows it and must get
no error; ``typing/user_mistakes.py`` holds mistakes, each of which must be
reported where it is marked (so a type that decays to ``Any`` fails too).
Errors inside the package are not this test's business (``.ci/run`` checks
the package itself): imports are followed silently, as for an installed one.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "typing"
MYPY_TIMEOUT = 300

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (it is in the test extra)")


def _marked(path: Path) -> Set[Tuple[str, int, str]]:
    """The ``# E: code`` marks of ``path``: (file name, line, error code)."""
    marks = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        found = re.search(r"# E: ([a-z-]+)$", line)
        if found:
            marks.add((path.name, number, found.group(1)))
    return marks


def test_user_programs_type_check_as_documented(tmp_path: Path) -> None:
    programs = [PROGRAMS / "user_program.py", PROGRAMS / "user_mistakes.py"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-error-summary", "--show-error-codes", "--cache-dir", str(tmp_path),
         *map(str, programs)],
        cwd=ROOT, capture_output=True, text=True, timeout=MYPY_TIMEOUT,
    )
    assert not result.stderr, result.stderr
    reported = set()
    for line in result.stdout.splitlines():
        if ": error: " in line:
            found = re.match(r"(?:.*/)?([\w.]+):(\d+): error: .*\[([a-z-]+)\]$", line)
            assert found, line
            reported.add((found.group(1), int(found.group(2)), found.group(3)))
    expected = _marked(programs[1])
    assert len(expected) == 11
    assert reported == expected, result.stdout
