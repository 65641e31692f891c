"""Sphinx configuration: the user guide, the API reference from the docstrings, the design notes.

Builds offline with the built-in alabaster theme. ``python -m sphinx -W -b html
docs docs/_build/html`` builds the site; ``-b doctest`` runs every example
(tests/test_docs.py does that in the test suite).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# The checkout's package (and its testsupport, which the examples' hidden set-ups
# use for a real sshd) before any installed copy.
sys.path.insert(0, ROOT)

import paramiko_executor  # noqa: E402

project = "paramiko-executor"
author = "the paramiko-executor authors"
copyright = "the paramiko-executor authors"
release = paramiko_executor.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
]

exclude_patterns = ["_build"]
# `Name` in a docstring links to that name when Sphinx knows it, and is
# plain code otherwise (never a warning).
default_role = "py:obj"
highlight_language = "default"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Signatures name paramiko's and the standard library's types as the code does.
autodoc_type_aliases: dict[str, str] = {}

# Every example runs with -b doctest; the pages' `testsetup` blocks start the
# servers they talk to. Docstrings' own `>>>` blocks are not examples.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import os
# A real OpenSSH sshd (for SFTP, env and pty examples) needs root and
# /usr/sbin/sshd; CI has both and never skips.
NO_SSHD = not os.environ.get("CI") and (
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"))
"""

html_theme = "alabaster"
html_static_path = ["_static"]
html_title = f"paramiko-executor {release}"
html_theme_options = {
    "description": "Thread-safe remote commands over one multiplexed SSH connection",
    "fixed_sidebar": False,
    "show_relbars": True,
}
