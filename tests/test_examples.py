"""Every example runs (against the built-in test server) and prints what it promises;
the sample restricted wrapper refuses what it must."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import paramiko_executor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PACKAGE_ROOT = Path(paramiko_executor.__file__).resolve().parent.parent
WRAPPER = EXAMPLES / "restricted_wrapper.sh"
TIMEOUT = 120

# example -> lines (or parts of lines) its output must contain
EXPECTED = {
    "thread_pool.py": ["200 of 200 commands succeeded over one connection",
                       "at most 10 ran at once"],
    "mfa_login.py": ["logged in as ", "after the key and a TOTP code"],
    "command_key.py": [
        "'squeue --me': ok: squeue --me:",
        "'sbatch': ok: Submitted batch job 4242",
        "'scancel 4242': ok: cancelled job 4242",
        "'id': refused (exit 126): restricted_wrapper: 'id' is not allowed",
        "'squeue; id': refused (exit 126)",
        "'squeue $(id)': ok: squeue $(id):",  # passed on literally, never expanded
    ],
    "local_remote_switch.py": ["local:  kernel ", "remote: kernel ",
                               "wc -w counted 3 words; failing command: exit 7"],
    "dask_hosts.py": ["40 of 40 tasks succeeded on 2 worker processes",
                      "SSH connections used: 2 (one per worker process)"],
    "database_tunnel.py": ["GET /customers through the tunnel: 200 rows for /customers",
                           "GET /orders over open_connection: 200 rows for /orders",
                           "commands still share the connection: ok"],
    "remote_forward.py": ["the remote command got: received 'step 3 of 5'",
                          "the collector here got: ['step 3 of 5']"],
    "yaml_config.py": ["executor.yaml loads as SSHExecutor(host='login.example.org'",
                       "remote: SSHExecutor(", "local: ShellExecutor(): hello from"],
}


def _environment(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def test_every_example_is_tested():
    scripts = {path.name for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_against_the_test_server(name):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
        env=_environment(),
    )
    assert proc.returncode == 0, proc.stderr
    for text in EXPECTED[name]:
        assert text in proc.stdout, f"{text!r} not in:\n{proc.stdout}"


@pytest.fixture
def stand_in_path(tmp_path):
    """A PATH whose ``squeue`` prints its arguments one per line, then its stdin."""
    squeue = tmp_path / "squeue"
    squeue.write_text('#!/bin/sh\nfor arg in "$@"; do echo "arg:$arg"; done\ncat\n')
    squeue.chmod(squeue.stat().st_mode | stat.S_IXUSR)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


def _wrapper(stdin, path, cwd):
    return subprocess.run(
        ["/bin/bash", str(WRAPPER)], input=stdin, capture_output=True, text=True,
        timeout=TIMEOUT, env=_environment(PATH=path), cwd=cwd,
    )


def test_wrapper_runs_allowed_command_with_literal_words_and_the_rest_of_stdin(
    stand_in_path, tmp_path
):
    (tmp_path / "globbed").write_text("")
    proc = _wrapper("squeue $(touch pwned) `touch pwned` * ;id\njob line\n", stand_in_path,
                    tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "arg:$(touch", "arg:pwned)", "arg:`touch", "arg:pwned`", "arg:*", "arg:;id", "job line",
    ]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "stdin",
    ["id\n", "squeue;id\n", "/usr/bin/squeue\n", "bash -c squeue\n", "\n", "", "squeue"],
)
def test_wrapper_refuses_everything_else(stdin, stand_in_path, tmp_path):
    proc = _wrapper(stdin, stand_in_path, tmp_path)
    assert proc.returncode == 126
    assert proc.stdout == ""
    assert proc.stderr.startswith("restricted_wrapper: ")
