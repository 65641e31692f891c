"""The canary: every private paramiko name the library leans on still exists.

When this fails after a paramiko upgrade, `paramiko_executor.internals` names
what changed; nothing else in the library touches paramiko's private API.
"""

from __future__ import annotations

import pathlib
import re

import paramiko

from paramiko_executor import internals


def test_every_private_name_exists_in_the_installed_paramiko():
    assert internals.missing_private_names() == [], paramiko.__version__


def test_the_canary_fails_when_a_name_disappears(monkeypatch):
    monkeypatch.delattr(paramiko.Transport, "_next_channel")
    monkeypatch.delattr(paramiko.Channel, "_check_add_window")
    assert internals.missing_private_names() == ["Transport._next_channel",
                                                  "Channel._check_add_window"]


def test_no_other_module_uses_a_private_paramiko_name():
    # The names of the list, as attribute accesses anywhere but internals.py.
    names = {name for _, name in internals.PRIVATE_NAMES if name.startswith("_")}
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, sorted(names))) + r")\b")
    package = pathlib.Path(internals.__file__).parent
    offenders = [
        f"{path.name}:{number}"
        for path in package.rglob("*.py")
        if path.name != "internals.py" and "testing" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
