"""Attacks on put's temporary files (c95f0c7): names recorded once SFTP started, removed
in one bounded clean-up session per transfer, given up after `LEFTOVER_TRIES`.

Against real sshds: connections killed mid-upload, a frozen server, ``close()`` from
another thread, Ctrl-C at each line of the upload and of the clean-up, an upload-only
drop box, many failing puts at once.
"""

from __future__ import annotations

import dis
import io
import os
import pathlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Set, Tuple

import pytest
from helpers import at_line, wait_for
from test_files import (
    connection_killer,
    kill_connections,
    leftovers,
    put_with_the_connection_killed,
)
from test_review11 import _thaw

from paramiko_executor import ExecutorFailure, SSHExecutor, TransferTimeout, executors, transfer

BIG = 32 * 1024 * 1024


@pytest.fixture
def workdir(shared_dir: str) -> pathlib.Path:
    return pathlib.Path(shared_dir)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _lines(function: Callable[..., Any]) -> List[int]:
    """The body's lines where a signal could raise: not those of a ``try:`` alone (a NOP
    outside every handler, where only a tracer can raise)."""
    code = function.__code__
    kinds: Dict[int, Set[str]] = {}
    line = code.co_firstlineno
    for instruction in dis.get_instructions(code):
        if instruction.starts_line is not None:
            line = instruction.starts_line
        kinds.setdefault(line, set()).add(instruction.opname)
    return sorted(line for line, names in kinds.items()
                  if line > code.co_firstlineno and names != {"NOP"})


#: Ctrl-C at each line of these, during a put (the clean-up ones with a leftover to remove).
_SWEPT: List[Callable[..., Any]] = [
    transfer.upload, transfer._Session.stat_and_create, transfer._Session._created,
    transfer.remove,
    executors.SSHExecutor._remove_leftovers]
_CASES: List[Tuple[Callable[..., Any], int]] = [
    (function, line) for function in _SWEPT for line in _lines(function)]


@pytest.mark.parametrize("function,line", _CASES,
                         ids=[f"{function.__name__}:{line}" for function, line in _CASES])
def test_ctrl_c_anywhere_in_a_put_leaves_no_temporary_file(
        sshd: Any, workdir: pathlib.Path, function: Callable[..., Any], line: int) -> None:
    # A Ctrl-C once the temporary file's OPEN had gone out (from the round trip that
    # creates it to the handle's check) left it for good: neither the upload's own
    # clean-up (only from the writes on) nor the put's (ExecutorFailure only) had it.
    data = os.urandom(300 * 1024)
    planted = workdir / ".planted.0000000000000000.tmp"  # a broken put's, to clean up
    planted.write_bytes(b"x")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        ex._leftovers[str(planted)] = 0
        try:
            at_line(function.__code__, line, _interrupt,
                    lambda: ex.put(io.BytesIO(data), str(workdir / "f")))()
        except KeyboardInterrupt:
            pass


        def cleaned() -> bool:
            # The clean-up of an interrupted put runs in a thread of its own; of an
            # interrupted clean-up, in the next transfer's.
            ex.put(io.BytesIO(b"ok"), str(workdir / "g"))
            return not leftovers(workdir)
        wait_for(cleaned, "the temporary files' removal", timeout=executors.LEFTOVER_TIMEOUT)
    assert (workdir / "g").read_bytes() == b"ok"
    if (workdir / "f").exists():
        assert (workdir / "f").read_bytes() == data


def test_a_file_already_under_the_temporary_name_is_not_removed(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # The exclusive create refused (another client's file, a link planted under the
    # name): the put's clean-up removed what was there all the same.
    monkeypatch.setattr(transfer.secrets, "token_hex", lambda n: "0" * (2 * n))
    taken = workdir / ".f.0000000000000000.tmp"
    taken.write_bytes(b"another client's")
    planted = workdir / ".g.0000000000000000.tmp"
    planted.symlink_to(workdir / "target")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        for name in ("f", "g"):
            with pytest.raises(ExecutorFailure, match="cannot create a temporary file"):
                ex.put(io.BytesIO(b"data"), str(workdir / name), mode=0o644)
        assert ex.get("/etc/hostname", io.BytesIO()) > 0
    assert taken.read_bytes() == b"another client's"
    assert planted.is_symlink()


def _taken(monkeypatch: Any, workdir: pathlib.Path, *names: str) -> pathlib.Path:
    """Another client's file, ``.f.<16 zeros>.tmp``; ``secrets.token_hex`` gives ``names``
    in turn (a put to ``f``: its temporary file's, then its probe's)."""
    given = iter(names)
    monkeypatch.setattr(transfer.secrets, "token_hex", lambda n: next(given))
    taken = workdir / ".f.0000000000000000.tmp"
    taken.write_bytes(b"another client's")
    return taken


def _left_alone(workdir: pathlib.Path, taken: pathlib.Path) -> None:
    """``taken`` is as it was, and the only temporary name in ``workdir``."""
    assert taken.read_bytes() == b"another client's"
    assert leftovers(workdir) == [taken.name]


def test_a_file_already_under_the_probes_name_is_not_removed(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # The probe's REMOVE went out in the round trip of its exclusive OPEN: a file already
    # under the probe's name (the OPEN refused) was removed all the same.
    taken = _taken(monkeypatch, workdir, "1" * 16, "0" * 16)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        assert ex.put(io.BytesIO(b"data"), str(workdir / "f")) == 4
    _left_alone(workdir, taken)


def test_a_file_already_under_the_probes_name_outlives_a_broken_put(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # Refused, the probe's name was still the put's: the clean-up of the put broken
    # with its connection removed what was there.
    taken = _taken(monkeypatch, workdir, "1" * 16, "0" * 16)
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        put_with_the_connection_killed(ex, server, str(workdir / "f"))
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        assert not ex._leftovers
    _left_alone(workdir, taken)


def test_a_probe_is_removed_when_the_temporary_file_cannot_be_created(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # The probe's REMOVE waits for the next requests; the put ends at the temporary
    # file's refusal, with none to come. Removed by the upload itself: the put's own
    # clean-up (a session more) does not come for every refusal (PermissionError).
    taken = _taken(monkeypatch, workdir, "0" * 16, "1" * 16)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        monkeypatch.setattr(ex, "_remove_leftover", lambda temps, deadline: None)
        with pytest.raises(ExecutorFailure, match="cannot create a temporary file"):
            ex.put(io.BytesIO(b"data"), str(workdir / "f"))
    _left_alone(workdir, taken)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_put_over_what_is_no_file_leaves_no_probe(
        sshd: Any, workdir: pathlib.Path, kind: str) -> None:
    target = workdir / "target"
    if kind == "directory":
        target.mkdir()
    else:
        os.mkfifo(target)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        with pytest.raises(IsADirectoryError if kind == "directory" else ValueError):
            ex.put(io.BytesIO(b"data"), str(target))
    assert leftovers(workdir) == []


def test_a_put_without_mode_takes_the_round_trips_of_one_with_mode(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # The probe's REMOVE goes with the next requests: none of its own (a new file: STAT
    # and the OPENs, the WRITE, FSETSTAT and CLOSE, the rename; a replaced one: LSTATs).
    # A flight: the requests sent together, until a reply is taken.
    flights: List[str] = []
    send, take = transfer._Session.send_bytes, transfer._Session._recv

    def sending(session: Any, data: Any) -> None:
        if not flights or flights[-1] != "send":
            flights.append("send")
        send(session, data)

    def taking(session: Any, *args: Any) -> bytes:
        if flights and flights[-1] == "send":
            flights.append("reply")
        return take(session, *args)
    monkeypatch.setattr(transfer._Session, "send_bytes", sending)
    monkeypatch.setattr(transfer._Session, "_recv", taking)
    trips = {}
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        for mode in (0o644, None):
            for name in ("new", "replaced"):
                flights.clear()
                ex.put(io.BytesIO(b"data"), str(workdir / f"{name}-{mode}"), mode=mode)
                trips[name, mode] = flights.count("reply")
                if name == "new":
                    ex.put(io.BytesIO(b"data"), str(workdir / f"replaced-{mode}"), mode=mode)
    # INIT, limits, STAT and OPEN(s), WRITE, FSETSTAT and CLOSE, posix-rename; LSTATs.
    assert trips == {("new", 0o644): 6, ("replaced", 0o644): 7,
                     ("new", None): 6, ("replaced", None): 7}, trips
    assert leftovers(workdir) == []


def _put_killed_in_two_directories(ex: SSHExecutor, server: Any,
                                   first: pathlib.Path, second: pathlib.Path,
                                   monkeypatch: Any) -> None:
    """Two puts, into ``first`` and ``second``, broken by one lost connection; their
    names recorded in that order."""
    ex.run_command("true")
    recorded = threading.Event()
    record = ex._remove_leftover

    def in_order(temps: List[str], deadline: Any) -> None:
        if str(second) in temps[0] and not recorded.wait(60):
            raise AssertionError("the first put recorded nothing")
        record(temps, deadline)
        recorded.set()
    monkeypatch.setattr(ex, "_remove_leftover", in_order)
    _puts_broken_together(ex, server, [first / "f", second / "f"], BIG)
    monkeypatch.undo()


def _puts_broken_together(ex: SSHExecutor, server: Any, remotes: List[pathlib.Path],
                          size: int) -> None:
    """A put of ``size`` random bytes to each of ``remotes`` at once, in threads; ``server``
    kills the connection once each is past 1 MiB: all raise `ExecutorFailure`."""
    killed = threading.Event()
    together = threading.Barrier(len(remotes), timeout=60)

    def put(remote: pathlib.Path) -> None:
        def progress(done: int, total: int) -> None:
            if done > 1024 * 1024 and not killed.is_set():
                together.wait()
                if not killed.is_set():
                    killed.set()
                    kill_connections(server)
        with pytest.raises(ExecutorFailure):
            ex.put(io.BytesIO(os.urandom(size)), str(remote), progress=progress)
    with ThreadPoolExecutor(len(remotes)) as pool:
        for future in [pool.submit(put, remote) for remote in remotes]:
            future.result(timeout=120)


def test_a_leftover_the_server_refuses_to_remove_does_not_keep_the_others(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # The one clean-up session ended at the first name the server refused: the names
    # after it were never tried, and were given up with it after LEFTOVER_TRIES.
    server = make_sshd(max_sessions=10)
    locked, free = workdir / "locked", workdir / "free"
    for directory in (locked, free):
        directory.mkdir()
        directory.chmod(0o777)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        _put_killed_in_two_directories(ex, server, locked, free, monkeypatch)
        assert leftovers(locked) and leftovers(free)
        locked.chmod(0o755)  # root's: the login may no longer remove what is in it
        for _ in range(executors.LEFTOVER_TRIES + 1):
            assert ex.get("/etc/hostname", io.BytesIO()) > 0
        assert not ex._leftovers
    assert leftovers(free) == []
    assert leftovers(locked)


def test_a_refused_sftp_subsystem_at_a_clean_up_does_not_give_the_names_up(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # A refusal gave every pending name up at once, as if the login could never start
    # SFTP; it can pass: Dropbear refused it to 0 to 9 of 60 back-to-back transfers on
    # one healthy connection (6 runs). Only a server that ran something else (a forced
    # command) is a lasting answer.
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        put_with_the_connection_killed(ex, server, str(workdir / "f"))
        assert leftovers(workdir)
        invoke = transfer._Session._invoke_subsystem
        refusals = [1]

        def refused_once(session: Any, until: float) -> None:
            if refusals:
                refusals.pop()
                raise transfer.SFTPNotStarted("the server refused to start the SFTP subsystem")
            invoke(session, until)
        monkeypatch.setattr(transfer._Session, "_invoke_subsystem", refused_once)
        for _ in range(executors.LEFTOVER_TRIES):
            assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
    assert not refusals
    assert leftovers(workdir) == []


def test_a_clean_up_refused_every_time_gives_the_names_up_after_its_tries(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    planted = workdir / ".planted.0000000000000000.tmp"
    planted.write_bytes(b"x")
    tries: List[str] = []

    def refused(*paths: str, **kwargs: Any) -> bool:
        tries.append(paths[-1])
        raise transfer.SFTPNotStarted("the server refused to start the SFTP subsystem")
    monkeypatch.setattr(executors, "remove", refused)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        ex._leftovers[str(planted)] = 0
        for done in range(1, executors.LEFTOVER_TRIES + 2):
            assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
            assert len(tries) == min(done, executors.LEFTOVER_TRIES)
            assert bool(ex._leftovers) == (done < executors.LEFTOVER_TRIES)
    assert planted.exists()


def test_a_forced_command_at_a_clean_up_gives_the_names_up_at_once(
        sshd: Any, monkeypatch: Any) -> None:
    # What the server runs instead of SFTP it runs for every later session too.
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 1.0)
    params = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with SSHExecutor(**params) as ex:
        ex.run_command("true")
        with pytest.raises(transfer.SFTPNotStarted) as info:
            ex.get("/etc/hostname", io.BytesIO())
        assert info.value.lasting
        ex._leftovers["/tmp/.never.0000000000000000.tmp"] = 0
        with pytest.raises(transfer.SFTPNotStarted):
            ex.get("/etc/hostname", io.BytesIO())
        assert not ex._leftovers


# --- what held ------------------------------------------------------------------------


def test_a_server_frozen_mid_upload_times_out_and_is_cleaned_up_once_it_thaws(
        make_sshd: Any, workdir: pathlib.Path) -> None:
    server = make_sshd(max_sessions=10)
    frozen: List[int] = []
    try:
        with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
            ex.run_command("true")

            def progress(done: int, total: int) -> None:
                if done > 1024 * 1024 and not frozen:
                    frozen.extend(server.serving_pids())
                    for pid in frozen:
                        os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(TransferTimeout):
                ex.put(io.BytesIO(os.urandom(BIG)), str(workdir / "f"), timeout=3,
                       progress=progress)
            took = time.monotonic() - started
            _thaw(frozen)

            def cleaned() -> bool:
                ex.put(io.BytesIO(b"x"), str(workdir / "g"), timeout=30)
                return not leftovers(workdir)
            # Past the deadline the clean-up runs in a thread of its own, which holds the
            # names until it ends (LEFTOVER_TIMEOUT at most); a later transfer's if it
            # failed.
            wait_for(cleaned, "the temporary file's removal",
                     timeout=executors.LEFTOVER_TIMEOUT + 10)
    finally:
        _thaw(frozen)
    assert took < 3 + transfer.CLEANUP_GRACE + 1


def test_an_upload_only_drop_box_costs_later_transfers_nothing(
        make_sshd: Any, workdir: pathlib.Path) -> None:
    server = make_sshd(max_sessions=10, extra_config=["ForceCommand internal-sftp -P remove"])
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        ex.put(io.BytesIO(b"x"), str(workdir / "ok"))
        progress, _killed = connection_killer(server)
        with pytest.raises(ExecutorFailure):
            ex.put(io.BytesIO(os.urandom(BIG)), str(workdir / "f"), progress=progress)
        assert len(leftovers(workdir)) == 2  # the probe too: neither may be removed
        took = []
        for _ in range(executors.LEFTOVER_TRIES + 2):
            started = time.monotonic()
            assert ex.get(str(workdir / "ok"), io.BytesIO(), timeout=30) == 1
            took.append(time.monotonic() - started)
        assert not ex._leftovers
    assert max(took) < 2, took


def test_many_puts_broken_at_once_are_cleaned_up_by_the_next_transfer(
        make_sshd: Any, workdir: pathlib.Path) -> None:
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        ex.run_command("true")
        _puts_broken_together(ex, server, [workdir / f"f{i}" for i in range(8)],
                              8 * 1024 * 1024)
        # The temporary files; the probes' REMOVEs were answered before the WRITEs'.
        assert len(ex._leftovers) == 8
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        assert not ex._leftovers
    assert leftovers(workdir) == []


def test_close_from_another_thread_mid_put(make_sshd: Any, workdir: pathlib.Path) -> None:
    server = make_sshd(max_sessions=10)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
        ex.run_command("true")
        closed = threading.Event()

        def progress(done: int, total: int) -> None:
            if done > 1024 * 1024 and not closed.is_set():
                closed.set()
                closer = threading.Thread(target=ex.close)
                closer.start()
                closer.join(30)
        with pytest.raises(ExecutorFailure, match="closed"):
            ex.put(io.BytesIO(os.urandom(BIG)), str(workdir / "f"), progress=progress)
        assert leftovers(workdir)
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0  # reconnects
    assert leftovers(workdir) == []
