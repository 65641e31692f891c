"""The documentation: every example in docs/ and README.rst runs, the site builds without a
warning, and every topic the README points to has its page.

The examples of docs/ are Sphinx doctest blocks (``testcode``/``testoutput``); the
doctest builder runs them against the built-in test server, and those that need a
real sshd (SFTP, env, pty, ProxyJump) against a private OpenSSH server, which, as
elsewhere in the suite, needs root and /usr/sbin/sshd, and never skips under CI.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.rst"
TIMEOUT = 600

#: The user guide's topics (the README's former sections): each has a page.
GUIDE_TOPICS = (
    "quickstart", "commands", "threads", "retries", "hostkeys", "ssh-config", "mfa",
    "command-keys", "files", "live-output", "many-hosts", "workers", "local", "yaml",
    "cli", "migrating",
)

_PYTHON_BLOCK = re.compile(r"^(\s*)\.\. (?:code-block|code|sourcecode):: (?:python|pycon)\s*$")


def _require_sphinx() -> None:
    try:
        import sphinx  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("needs Sphinx: pip install '.[docs]'")


def _sphinx(builder: str, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", *options, "-b", builder, str(DOCS), str(out)],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
    )


def _python_blocks(text: str) -> list:
    """The bodies of the ``.. code-block:: python`` blocks of an reStructuredText text."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _PYTHON_BLOCK.match(lines[index])
        index += 1
        if not match:
            continue
        indent = len(match.group(1))
        body = []
        while index < len(lines) and (
            not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
        ):
            body.append(lines[index])
            index += 1
        code = "\n".join(body)
        dedent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
        blocks.append("\n".join(line[dedent:] for line in code.splitlines()).strip() + "\n")
    return blocks


def test_every_docs_example_runs(tmp_path):
    _require_sphinx()
    proc = _sphinx("doctest", tmp_path)
    report = (tmp_path / "output.txt").read_text() if (tmp_path / "output.txt").exists() else ""
    assert proc.returncode == 0, report + proc.stdout + proc.stderr
    assert "0 failures in tests" in report, report
    assert "0 failures in setup code" in report, report
    assert "0 failures in cleanup code" in report, report
    if os.environ.get("CI") or (os.geteuid() == 0 and os.path.exists("/usr/sbin/sshd")):
        # Where a private sshd can run, the blocks that need one run too: none skipped.
        blocks = sum(
            len(re.findall(r"^\.\. testcode::", path.read_text(), re.MULTILINE))
            for path in DOCS.rglob("*.rst") if "_build" not in path.parts
        )
        assert re.search(rf"^ +{blocks} tests$", report, re.MULTILINE), report


def test_docs_build_without_warnings(tmp_path):
    _require_sphinx()
    proc = _sphinx("html", tmp_path, "-W", "--keep-going")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "api.html").exists()


def test_no_python_example_escapes_the_doctest():
    """A Python example in docs/ is a ``testcode`` block, so the doctest build runs it."""
    plain = {
        str(path.relative_to(ROOT)): len(_python_blocks(path.read_text()))
        for path in DOCS.rglob("*.rst")
        if "_build" not in path.parts
    }
    assert {path: count for path, count in plain.items() if count} == {}


def test_readme_examples_run():
    blocks = _python_blocks(README.read_text())
    assert blocks, "README.rst shows no Python example"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for code in blocks:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert proc.returncode == 0, f"{code}\n{proc.stdout}{proc.stderr}"
        assert proc.stdout.strip(), f"the example printed nothing:\n{code}"


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 300
    assert "pip install '.[test]'" in text and "paramiko-executor demo" in text
    assert "python -m pytest" in text  # .ci/run runs the README's test command
    links = re.findall(r"<((?:docs/|CHANGELOG)[^>]*\.rst)>`_", text)
    assert links
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert missing == []


def test_every_guide_topic_has_a_page_linked_from_the_readme():
    readme = README.read_text()
    for topic in GUIDE_TOPICS:
        page = DOCS / "guide" / f"{topic}.rst"
        assert page.is_file(), page
        assert f"<docs/guide/{topic}.rst>" in readme, topic
    # The guide's toctree takes every page of docs/guide (a glob catches later ones).
    index = (DOCS / "guide" / "index.rst").read_text()
    assert re.search(r"^   \*$", index, re.MULTILINE)


def test_docs_never_point_outside_the_repository():
    """Nor do the docstrings, which the API reference shows."""
    package = ROOT / "paramiko_executor"
    for path in [README, ROOT / "CHANGELOG.rst", *DOCS.rglob("*.rst"), *DOCS.rglob("*.py"),
                 *package.rglob("*.py")]:
        if "_build" in path.parts:
            continue
        text = path.read_text()
        assert "shared/design" not in text and "../shared" not in text, path
        # Notes of the project's own that users do not have.
        for note in ("API.md", "CHANNEL.md", "design card"):
            assert note not in text, (path, note)


def test_api_reference_covers_every_public_name():
    import paramiko_executor

    api = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: paramiko_executor\.(\w+)$", api, re.MULTILINE))
    assert set(paramiko_executor.__all__) - documented == set()
