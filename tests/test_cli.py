"""The paramiko-executor command line, run through subprocess as a user runs it."""

import json
import os
import pty
import re
import socket
import subprocess
import sys

import pytest
from helpers import drain_terminal

import paramiko_executor
from paramiko_executor.testing import SSHTestServer

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(paramiko_executor.__file__)))
TIMEOUT = 120


def _environment():
    env = dict(os.environ)
    # the subprocess must run the code under test, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


def cli(*args, input=None):
    """Run ``python -m paramiko_executor ARGS``; stdout and stderr as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "paramiko_executor", *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=TIMEOUT,
        env=_environment(),
    )


@pytest.fixture(scope="module")
def server():
    with SSHTestServer(max_sessions=4) as server:
        yield server


@pytest.fixture(scope="module")
def connection(server):
    """The command-line connection options that reach ``server``."""
    parameters = server.executor_parameters()
    options = ["--host", parameters["host"], "--port", str(parameters["port"])]
    options += ["--user", parameters["username"], "-F", "none"]
    for key in parameters["client_keys"]:
        options += ["--key", key]
    known_hosts = parameters["known_hosts"]
    return options + ["--known-hosts", "none" if known_hosts is None else known_hosts]


def test_demo_finishes_with_its_summary():
    proc = cli("demo", "--commands", "60", "--threads", "8", "--max-sessions", "3")
    stdout = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    summary = dict(
        re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", stdout, flags=re.MULTILINE)
    )
    assert summary["commands"] == "60"
    assert summary["failures"] == "0"
    assert float(summary["commands/s"]) > 0
    assert summary["MaxSessions (probed)"] == "3"
    assert 1 <= int(summary["peak concurrent channels"]) <= 3
    assert summary["TCP connections"] == "1"
    # not a terminal: plain progress lines, no carriage returns
    assert "progress: 60/60 commands (100%), 0 failed" in proc.stderr.decode()
    assert b"\r" not in proc.stderr


def test_demo_draws_a_progress_bar_on_a_terminal():
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paramiko_executor", "demo", "--commands", "30",
             "--threads", "4", "--max-sessions", "2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
            env=_environment(),
        )
        os.close(terminal)
        terminal = None
        drawn = b""
        drawn += drain_terminal(controller, proc, TIMEOUT)
        stdout, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    assert proc.returncode == 0
    assert b"\r[" in drawn
    assert b"30/30 100%" in drawn
    assert b"progress:" not in drawn
    assert b"MaxSessions (probed)      2" in stdout


def test_run_routes_streams_and_passes_on_the_exit_status(connection):
    proc = cli("run", *connection, "--", "printf out; printf err >&2; exit 3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, b"out", b"err")


def test_run_success_prints_output_exactly(connection):
    proc = cli("run", *connection, "--", "printf 'caf\\303\\251\\n\\n'")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "café\n\n".encode(), b"")


def test_run_quotes_several_arguments_with_shlex_join(connection):
    proc = cli("run", *connection, "--", "printf", "%s|", "a b", "c'd", "$HOME", "--")
    assert (proc.returncode, proc.stdout) == (0, b"a b|c'd|$HOME|--|")


def test_run_sends_stdin_only_when_asked(connection):
    proc = cli("run", *connection, "--stdin", "--", "wc -l", input=b"one\ntwo\n")
    assert (proc.returncode, proc.stdout.strip()) == (0, b"2")
    # without --stdin the command sees end-of-file at once
    proc = cli("run", *connection, "--", "cat", input=b"ignored\n")
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_run_timeout_exits_124(connection):
    proc = cli("run", *connection, "--timeout", "3", "--", "echo started; exec sleep 60")
    assert proc.returncode == 124
    assert proc.stdout == b"started\n"
    assert b"timed out" in proc.stderr


def test_run_with_wrapper_uses_a_duping_executor(connection):
    proc = cli("run", *connection, "--wrapper", "/bin/sh", "--", "echo duped by $0")
    assert (proc.returncode, proc.stdout) == (0, b"duped by /bin/sh\n")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_on_unreachable_host_exits_255_with_one_line():
    proc = cli(
        "run", "--host", "127.0.0.1", "--port", str(_free_port()), "--known-hosts", "none",
        "-F", "none", "--connect-retries", "1", "--connect-backoff", "0", "--", "true",
    )
    assert proc.returncode == 255
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paramiko-executor: "), lines


def _write_config(tmp_path, tag, parameters, **extra):
    path = tmp_path / "executor.yaml"
    # JSON is YAML flow style
    path.write_text(f"{tag} {json.dumps({**parameters, **extra})}\n")
    return str(path)


def test_run_with_yaml_config(server, tmp_path):
    config = _write_config(tmp_path, "!TardisSSHExecutor", server.executor_parameters())
    proc = cli("run", "--config", config, "--", "echo", "from config")
    assert (proc.returncode, proc.stdout) == (0, b"from config\n")


def test_config_with_unknown_key_exits_2_naming_it(server, tmp_path):
    config = _write_config(tmp_path, "!SSHExecutor", server.executor_parameters(), colour=1)
    proc = cli("run", "--config", config, "--", "true")
    assert proc.returncode == 2
    assert b"colour" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--", "true"], b"--host HOST or --config"),
        (["run", "--config", "x.yaml", "--host", "h", "--", "true"], b"cannot be combined"),
        (["run", "--config", "/nonexistent/x.yaml", "--", "true"], b"cannot read"),
        (["run", "--host", "h", "--password-env", "PE_UNSET_VARIABLE", "--", "true"],
         b"PE_UNSET_VARIABLE is not set"),
        (["run", "--host", "h", "--port", "0", "--", "true"], b"--port"),
        (["run", "--host", "h"], b"COMMAND"),
        (["probe"], b"--host HOST or --config"),
        ([], b"COMMAND"),
    ],
)
def test_bad_usage_exits_2_with_a_message(args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_probe_prints_max_sessions(connection):
    proc = cli("probe", *connection)
    assert (proc.returncode, proc.stdout) == (0, b"4\n")


def test_probe_on_unreachable_host_exits_255():
    proc = cli(
        "probe", "--host", "127.0.0.1", "--port", str(_free_port()), "--known-hosts", "none",
        "-F", "none", "--connect-retries", "0",
    )
    assert proc.returncode == 255
    assert len(proc.stderr.decode().splitlines()) == 1


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], [b"demo", b"run", b"probe", b"examples:"]),
        (["demo"], [b"--commands", b"--threads", b"--max-sessions", b"examples:", b"summary"]),
        (["run"], [b"--config", b"--host", b"--port", b"--user", b"--key", b"--known-hosts",
                   b"INSECURE", b"--password-env", b"--timeout", b"--connect-retries",
                   b"exit status:", b"124", b"255", b"examples:", b"shlex.join"]),
        (["probe"], [b"--config", b"--host", b"MaxSessions", b"examples:"]),
    ],
)
def test_help_is_complete(command, expected):
    proc = cli(*command, "--help")
    assert proc.returncode == 0
    for text in expected:
        assert text in proc.stdout, text


def test_password_env_serves_every_host():
    # The variable is taken out of the environment once, then given to each host.
    with SSHTestServer(password="pw for both", auth_methods=("password",)) as server:
        env = dict(_environment(), PE_TEST_PASSWORD="pw for both")
        proc = subprocess.run(
            [sys.executable, "-m", "paramiko_executor", "run", "--hosts", "127.0.0.1,localhost",
             "--port", str(server.port), "--user", server.username, "--known-hosts", "none",
             "-F", "none", "--connect-retries", "0", "--password-env", "PE_TEST_PASSWORD",
             "--", "echo ok"],
            input=b"", capture_output=True, timeout=TIMEOUT, env=env,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(proc.stdout.decode().splitlines()) == ["127.0.0.1: ok", "localhost: ok"]
    assert b"pw for both" not in proc.stdout + proc.stderr


# Bytes a hostile server puts into its version string: ESC sequences (retitle, colour),
# BEL, a C0 backspace, and a C1 control (CSI, U+009B, in UTF-8: paramiko refuses other bytes).
HOSTILE_VERSION = b"SSH-2.0-Evil\x1b]0;pwned\x07\x1b[31mred\x08\xc2\x9b2J"


def _serve_hostile_banner(listener: socket.socket) -> None:
    """Accept one connection, send HOSTILE_VERSION, read until the client gives up."""
    listener.settimeout(30)
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(10)
        try:
            conn.sendall(HOSTILE_VERSION + b"\r\n" + b"\x00" * 64)
            while conn.recv(4096):
                pass
        except OSError:
            pass


def test_verbose_logging_escapes_the_servers_text():
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=_serve_hostile_banner, args=(listener,), daemon=True)
        server.start()
        proc = cli("run", "-vv", "--host", "127.0.0.1", "--port",
                   str(listener.getsockname()[1]), "--known-hosts", "none", "-F", "none",
                   "--connect-retries", "0", "--", "true")
        server.join(60)
    assert proc.returncode == 255
    stderr = proc.stderr
    assert b"Evil" in stderr  # the record is there...
    for raw in (b"\x1b", b"\x07", b"\x08", b"\xc2\x9b"):
        assert raw not in stderr, raw  # ...but none of its control bytes reach the terminal
    assert b"\\x1b]0;pwned\\x07\\x1b[31m" in stderr
