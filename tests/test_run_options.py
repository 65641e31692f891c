"""The everyday options of run_command (check, env, encoding, pty) and live output.

Against a real sshd that accepts ``PEXEC_*`` variables, and ShellExecutor
with the same expectations.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import threading
import tracemalloc

import pytest
from conftest import start_openssh

from paramiko_executor import (
    SAFE_WRAPPER,
    CommandExecutionFailure,
    CommandResult,
    CommandTimeout,
    DupingSSHExecutor,
    ExecutorFailure,
    ShellExecutor,
    SSHExecutor,
)


@pytest.fixture(scope="module")
def env_sshd():
    server = start_openssh(max_sessions=4, extra_config=["AcceptEnv PEXEC_*"],
                           forced_command="/bin/bash")
    yield server
    server.close()


@pytest.fixture(scope="module")
def remote(env_sshd):
    with SSHExecutor(**env_sshd.executor_parameters()) as ex:
        yield ex


@pytest.fixture(params=["ssh", "shell"])
def executor(request, remote):
    return remote if request.param == "ssh" else ShellExecutor()


def test_check_false_returns_non_zero_and_signalled_results(executor):
    result = executor.run_command("echo out; exit 7", check=False)
    assert result == CommandResult("out\n", "", 7, None)
    killed = executor.run_command("kill -KILL $$", check=False)
    assert killed.exit_code == -1 and killed.exit_signal == "KILL"
    with pytest.raises(CommandExecutionFailure) as info:
        executor.run_command("kill -TERM $$")
    assert info.value.exit_code == -1 and info.value.exit_signal == "TERM"


def test_check_false_still_raises_a_timeout(executor):
    with pytest.raises(CommandTimeout):
        executor.run_command("sleep 10", timeout=0.5, check=False)


def test_env_values_with_spaces_and_equals_arrive(executor):
    env = {"PEXEC_A": "two words", "PEXEC_B": "x=y=z", "PEXEC_C": ""}
    result = executor.run_command('printf "%s|%s|%s" "$PEXEC_A" "$PEXEC_B" "${PEXEC_C-unset}"',
                                  env=env)
    assert result.stdout == "two words|x=y=z|"


def test_a_refused_variable_fails_before_the_command_runs(remote, env_sshd, tmp_path):
    marker = f"/tmp/pe-env-refused-{os.getpid()}"
    before = remote.statistics()
    with pytest.raises(ExecutorFailure) as info:
        remote.run_command(f"touch {marker}", env={"PEXEC_OK": "1", "NOT_ACCEPTED": "x"})
    text = str(info.value)
    assert "NOT_ACCEPTED" in text and "AcceptEnv" in text
    assert not os.path.exists(marker)
    # The connection stays, and the refused channel's slot came back.
    assert remote.run_command("echo still").stdout == "still\n"
    after = remote.statistics()
    assert after.connects == before.connects
    limit = remote.session_limit
    results = [remote.run_command("sleep 0.2; echo ok") for _ in range(limit + 1)]
    assert all(r.stdout == "ok\n" for r in results)


def test_bad_env_is_refused_at_the_call(executor):
    with pytest.raises(TypeError, match="env"):
        executor.run_command("true", env={"A": 1})
    with pytest.raises(TypeError, match="env"):
        executor.run_command("true", env=["A=1"])
    with pytest.raises(ValueError, match="env"):
        executor.run_command("true", env={"A=B": "1"})


def test_bytes_output_matches_a_random_blob(executor, shared_dir):
    blob = os.urandom(3 * 1024 * 1024)
    path = os.path.join(shared_dir, "blob")
    with open(path, "wb") as file:
        file.write(blob)
    os.chmod(path, 0o644)
    result = executor.run_command(f"cat {path}", encoding=None)
    assert isinstance(result.stdout, bytes) and isinstance(result.stderr, bytes)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(blob).digest()


def test_another_codec_decodes_with_it(executor):
    result = executor.run_command(r"printf 'caf\351\n'", encoding="latin-1")
    assert result.stdout == "café\n"
    with pytest.raises(ValueError, match="encoding"):
        executor.run_command("true", encoding="no-such-codec")


def test_pty_gives_the_command_a_terminal(executor):
    assert executor.run_command("test -t 1", check=False).exit_code == 1
    result = executor.run_command("test -t 1 && echo tty; echo err >&2", pty=True)
    assert result.stdout.replace("\r\n", "\n") == "tty\nerr\n"


@pytest.mark.parametrize("stdin", ["a\nb\n", "a\nb", ""])
def test_stdin_on_a_pty_ends_with_end_of_file(executor, stdin):
    """An SSH EOF does not reach a command on a pty: the terminal's own end-of-file must."""
    result = executor.run_command("wc -l", stdin, pty=True, timeout=20)
    # The terminal echoes the input; wc's count follows it.
    assert re.search(r"(\d+)\s*$", result.stdout).group(1) == str(stdin.count("\n"))


def test_a_duping_command_on_a_pty_ends_under_a_wrapper_that_is_not_interactive(env_sshd):
    """A non-interactive wrapper reads its line in the terminal's line mode, so the
    terminal's end-of-file sent after stdin reaches the command; an interactive bash
    on the terminal (the command key's forced ``/bin/bash``) reads through line
    editing, which turns the end-of-file sent ahead of it into a NUL, and the call
    ends only at its timeout, as the docs say."""
    with DupingSSHExecutor(**env_sshd.executor_parameters(), wrapper=SAFE_WRAPPER) as safe:
        result = safe.run_command("wc -l", "a\nb\n", pty=True, timeout=20)
        # The wrapper's feed ends stdin with one more newline (command, stdin, newline).
        assert re.search(r"(\d+)\s*$", result.stdout).group(1) == "3"
        assert "/dev/pts/" in safe.run_command("tty", pty=True, timeout=20).stdout
    key = env_sshd.executor_parameters(client_keys=[env_sshd.forced_key_path])
    with DupingSSHExecutor(**key) as interactive:
        with pytest.raises(CommandTimeout) as info:
            interactive.run_command("echo hi", pty=True, timeout=3)
        assert "hi" in info.value.stdout
        assert interactive.run_command("echo $((6 * 7))").stdout == "42\n"


def test_live_lines_arrive_before_the_command_ends(executor):
    seen = []
    released = threading.Event()

    def on_output(stream, line):
        seen.append((stream, line))
        if line == "first\n":
            released.set()

    # The command waits until the first line was seen, so it must arrive live.
    result = executor.run_command(
        "echo first; echo oops >&2; sleep 1; printf 'last'", on_output=on_output)
    assert released.is_set()
    assert ("stdout", "first\n") in seen and ("stderr", "oops\n") in seen
    assert [line for stream, line in seen if stream == "stdout"] == ["first\n", "last"]
    assert result.stdout == "first\nlast" and result.stderr == "oops\n"


def test_a_line_without_end_comes_live_in_pieces_with_keep_output_false(executor):
    """Was: held whole until the command ended (memory grew with a \r progress bar)."""
    from paramiko_executor.output import LINE_PIECE

    pieces = []
    size = 3 * LINE_PIECE + 5
    result = executor.run_command(
        f"head -c {size} /dev/zero | tr '\\0' x; echo; echo next", keep_output=False,
        on_output=lambda stream, line: pieces.append(line), timeout=60)
    assert result.stdout == "" and result.exit_code == 0
    assert pieces[-1] == "next\n" and "".join(pieces[:-1]) == "x" * size + "\n"
    assert len(pieces) >= 4 and max(len(piece) for piece in pieces) < 2 * LINE_PIECE


def test_live_output_comes_from_the_calling_thread(executor):
    threads = set()
    executor.run_command("seq 1 100", on_output=lambda s, line: threads.add(threading.get_ident()))
    assert threads == {threading.get_ident()}


def test_live_bytes_with_encoding_none(executor):
    lines = []
    executor.run_command(r"printf 'a\nb\377\n'", encoding=None,
                         on_output=lambda s, line: lines.append(line))
    assert lines == [b"a\n", b"b\xff\n"]


def test_a_raising_callback_ends_the_command_and_reaches_the_caller(executor):
    class Stop(Exception):
        pass

    def on_output(stream, line):
        raise Stop(line)

    with pytest.raises(Stop):
        executor.run_command("echo go; sleep 30", on_output=on_output, timeout=20)
    assert executor.run_command("echo after").stdout == "after\n"


def test_unkept_output_keeps_memory_flat(executor):
    count = [0, 0]

    def on_output(stream, line):
        count[0] += 1
        count[1] += len(line)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # 100 MB of lines, none kept.
    result = executor.run_command("yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghij"
                                  " | head -c 100000000", on_output=on_output, keep_output=False)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert result.stdout == "" and count[1] == 100_000_000
    assert grown_kib < 50 * 1024, f"peak RSS grew by {grown_kib} KiB"


@pytest.mark.parametrize("encoding", ["utf-8", None])
def test_keep_output_false_keeps_nothing_without_on_output(executor, encoding):
    """Was: without ``on_output`` the result (and a failure) held the whole output."""
    empty = "" if encoding else b""
    both = "echo out; echo err >&2"
    result = executor.run_command(both, keep_output=False, encoding=encoding)
    assert (result.stdout, result.stderr, result.exit_code) == (empty, empty, 0)
    failed = executor.run_command(f"{both}; exit 3", keep_output=False, check=False,
                                  encoding=encoding)
    assert (failed.stdout, failed.stderr, failed.exit_code) == (empty, empty, 3)
    with pytest.raises(CommandExecutionFailure) as info:
        executor.run_command(f"{both}; exit 4", keep_output=False, encoding=encoding)
    assert (info.value.stdout, info.value.stderr, info.value.exit_code) == (empty, empty, 4)
    on_pty = executor.run_command(both, keep_output=False, pty=True, encoding=encoding)
    assert (on_pty.stdout, on_pty.stderr) == (empty, empty)
    # The same options keep the output again.
    assert executor.run_command(both, encoding=encoding).stdout == ("out\n" if encoding
                                                                    else b"out\n")


def test_a_timeout_with_keep_output_false_carries_no_output(executor):
    with pytest.raises(CommandTimeout) as info:
        executor.run_command("echo out; echo err >&2; sleep 30", keep_output=False, timeout=2)
    assert (info.value.stdout, info.value.stderr) == ("", "")


def test_keep_output_false_without_on_output_keeps_memory_flat(executor):
    """64 MB dropped as it arrives: Python's allocations (tracemalloc's peak) stay a few
    windows small, where the buffer and the decoded text took 64 MB each."""
    tracemalloc.start()
    try:
        result = executor.run_command("head -c 64000000 /dev/zero", keep_output=False,
                                      timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"tracemalloc peak {peak / 2**20:.1f} MiB"
    assert result.stdout == "" and result.exit_code == 0


def test_bytes_received_counts_the_bytes_the_command_printed(remote, env_sshd):
    """Was: the decoded characters of the kept output (2 for two é, 0 when none was kept)."""

    def counted(executor, command, **options):
        before = executor.statistics().bytes_received
        executor.run_command(command, **options)
        return executor.statistics().bytes_received - before

    def drop(stream, line):
        pass

    two_e = r"printf '\303\251\303\251'"
    assert counted(remote, two_e) == 4
    assert counted(remote, two_e, encoding=None) == 4
    assert counted(remote, "echo abc", on_output=drop, keep_output=False) == 4
    assert counted(remote, "echo abc; printf de >&2", keep_output=False) == 6
    assert counted(remote, "echo abc; exit 5", keep_output=False, check=False) == 4
    params = env_sshd.executor_parameters(client_keys=[env_sshd.forced_key_path])
    with DupingSSHExecutor(**params) as duping:
        assert counted(duping, two_e, keep_output=False) == 4
        assert duping.run_command("echo abc", keep_output=False).stdout == ""


def test_duping_executor_sends_env_and_live_lines(env_sshd):
    params = env_sshd.executor_parameters(client_keys=[env_sshd.forced_key_path])
    with DupingSSHExecutor(**params) as ex:
        lines = []
        result = ex.run_command('echo "$PEXEC_X"', env={"PEXEC_X": "duped"},
                                on_output=lambda s, line: lines.append(line))
        assert result.stdout == "duped\n" and lines == ["duped\n"]
        with pytest.raises(ValueError, match="NUL"):
            ex.run_command("echo a\0b")
        assert ex.run_command("echo usable").stdout == "usable\n"


def test_command_line_env_pty_and_statistics(env_sshd, capfd):
    from paramiko_executor.cli import main

    params = env_sshd.executor_parameters()
    options = ["--host", "127.0.0.1", "--port", str(params["port"]), "--user",
               params["username"], "--key", params["client_keys"][0], "--known-hosts",
               str(params["known_hosts"]), "-F", "none"]
    status = main(["run", *options, "--env", "PEXEC_X=a=b c", "--pty", "-v", "--",
                   'test -t 1 && printf "%s" "$PEXEC_X"'])
    out, err = capfd.readouterr()
    assert (status, out) == (0, "a=b c")
    assert "commands_succeeded" in err and "connects" in err
    assert main(["run", *options, "--env", "NOT_ACCEPTED=1", "--", "true"]) == 255
    assert "AcceptEnv" in capfd.readouterr().err
