"""Attacks on put's held probe requests (a5be47c): the probe's REMOVE and CLOSE go out
with the next requests after its exclusive OPEN's answer (`_Session.later`), a refused
OPEN takes its name off the put's temporary names, and `SFTPNotStarted.lasting` decides
whether a clean-up gives its names up at once. And on DupingSSHExecutor with ``pty=True``
(74b36db).

Against real sshds (and Dropbear): deadlines at each round trip, servers frozen or their
SFTP process killed, file objects and progress callbacks that raise, many threads.
"""

from __future__ import annotations

import errno
import inspect
import io
import os
import pathlib
import pickle
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Dict, Iterator, List, Set, Tuple

import paramiko
import pytest
from conftest import start_openssh
from helpers import at_line, wait_for
from test_attack10b import SFTP_SERVER, RelaySFTPServer
from test_attack12c import _taken
from test_files import leftovers, put_with_the_connection_killed
from test_files_trust import _U32, FXP, HostileSFTPServer, packet, read_packet, string
from test_review11 import _thaw

from paramiko_executor import (
    SAFE_WRAPPER,
    DupingSSHExecutor,
    ExecutorFailure,
    SSHExecutor,
    TransferTimeout,
    executors,
    transfer,
)
from testsupport.openssh import _cmdline, _descendants, _process_table


@pytest.fixture
def workdir(shared_dir: str) -> pathlib.Path:
    return pathlib.Path(shared_dir)


def _freeze(server: Any) -> List[int]:
    """SIGSTOP to ``server``'s processes serving connections; their pids, for `_thaw`."""
    pids = server.serving_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


@pytest.mark.parametrize("answered", ["within the grace", "after the grace"])
@pytest.mark.parametrize("which", ["probe", "temporary file"])
def test_a_deadline_at_the_creating_round_trip_leaves_a_file_already_there(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any, which: str,
        answered: str) -> None:
    # The server is slow while the exclusive OPENs are on their way; the deadline passes
    # before their answers. The clean-up then removed both names "whoever's they are",
    # although the OPENs' answers come (in order, before the REMOVEs' own) within its
    # grace and say that one of them was refused: another client's file. Answers that
    # come only after the grace decide nothing: the names are given up (this put's own
    # empty file stays), not handed to the executor's clean-up, which removed both.
    names = ["1" * 16, "0" * 16] if which == "probe" else ["0" * 16, "1" * 16]
    taken = _taken(monkeypatch, workdir, *names)
    late = answered == "after the grace"
    monkeypatch.setattr(transfer, "CLEANUP_GRACE", 1.0)
    server = make_sshd(max_sessions=10)
    frozen: List[int] = []
    create, discard = transfer._Session.stat_and_create, transfer._Session.discard_upload

    def creating(session: Any, *args: Any) -> Any:
        frozen.extend(_freeze(server))  # the requests wait in the socket
        return create(session, *args)

    def discarding(session: Any, *args: Any, **kwargs: Any) -> None:
        if not late:
            _thaw(frozen)  # the deadline passed: the server answers again
        discard(session, *args, **kwargs)
        _thaw(frozen)
    monkeypatch.setattr(transfer._Session, "stat_and_create", creating)
    monkeypatch.setattr(transfer._Session, "discard_upload", discarding)
    try:
        with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
            ex.run_command("true")
            with pytest.raises(TransferTimeout):
                ex.put(io.BytesIO(b"data"), str(workdir / "f"), timeout=2)
            monkeypatch.undo()
            assert ex.put(io.BytesIO(b"ok"), str(workdir / "g"), timeout=30) == 2
    finally:
        _thaw(frozen)
    assert taken.read_bytes() == b"another client's"
    assert leftovers(workdir) == [taken.name] or late and len(leftovers(workdir)) == 2


class _Freezing(io.RawIOBase):
    """A source whose first read freezes ``server`` and fails (a disk error)."""

    def __init__(self, server: Any, frozen: List[int]) -> None:
        self.server = server
        self.frozen = frozen

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.frozen.extend(_freeze(self.server))
        raise OSError(errno.EIO, "the source's disk failed")


@pytest.mark.parametrize("failing", ["file object", "progress"])
def test_a_caller_error_while_the_server_is_slow_leaves_no_temporary_file(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any, failing: str) -> None:
    # The source (or the progress callback) raises while the server is slow for longer
    # than the upload's own clean-up may take (CLEANUP_GRACE): that clean-up gives up
    # quietly, and the put hands its names to the executor's clean-up only for an
    # ExecutorFailure or an interrupt. The temporary file stays for good.
    monkeypatch.setattr(transfer, "CLEANUP_GRACE", 1.0)
    server = make_sshd(max_sessions=10)
    frozen: List[int] = []

    def progress(done: int, total: int) -> None:
        frozen.extend(_freeze(server))
        raise ValueError("the progress bar broke")
    source: Any = _Freezing(server, frozen) if failing == "file object" else io.BytesIO(b"data")
    try:
        with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
            ex.run_command("true")
            with pytest.raises(OSError if failing == "file object" else ValueError):
                ex.put(source, str(workdir / "f"), timeout=30,
                       progress=None if failing == "file object" else progress)
            _thaw(frozen)

            def cleaned() -> bool:
                ex.put(io.BytesIO(b"ok"), str(workdir / "g"), timeout=30)
                return not leftovers(workdir)
            wait_for(cleaned, "the temporary files' removal", timeout=10,
                     explain=lambda: str(leftovers(workdir)))
    finally:
        _thaw(frozen)


def test_an_interrupt_as_held_requests_go_out_costs_no_clean_up_grace(
        sshd: Any, workdir: pathlib.Path) -> None:
    # `_send_requests` takes the held REMOVE and CLOSE off the queue before the send:
    # interrupted there (nothing sent), they are lost, their ids still awaited. The
    # upload's clean-up then waits for their replies until CLEANUP_GRACE ends (5 s
    # more for a Ctrl-C'd caller); the probe goes only with the put's own clean-up.
    code = transfer._Session._send_requests.__code__
    line = _line_of(transfer._Session._send_requests, "data = memoryview(")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        ex.run_command("true")
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            at_line(code, line, _interrupt,
                    lambda: ex.put(io.BytesIO(b"data"), str(workdir / "f")))()
        took = time.monotonic() - started

        def cleaned() -> bool:
            ex.put(io.BytesIO(b"ok"), str(workdir / "g"))
            return not leftovers(workdir)
        wait_for(cleaned, "the temporary files' removal", timeout=executors.LEFTOVER_TIMEOUT)
    assert took < transfer.CLEANUP_GRACE / 2, took


def test_a_slow_sftp_start_at_a_clean_up_does_not_give_the_names_up(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    # The names come from puts whose SFTP started on this very login. A clean-up whose
    # subsystem was accepted but whose VERSION did not come within NEGOTIATION_TIMEOUT
    # (a loaded or stalled server) is taken for "the server runs something else"
    # (lasting) and gives every name up at once; SFTPNotStarted's docstring says an
    # answer that did not come in time may pass, and a refused subsystem counts as one
    # failed try.
    server = make_sshd(max_sessions=10)
    frozen: List[int] = []
    invoke = transfer._Session._invoke_subsystem
    stalls: List[str] = []

    def stalled(session: Any, until: float) -> None:
        invoke(session, until)  # accepted
        if not stalls:  # the clean-up's session only: frozen before its INIT goes out
            stalls.append("stalled")
            frozen.extend(_freeze(server))
    negotiate = transfer._Session._negotiate

    def thawing(session: Any, until: float) -> Any:
        try:
            return negotiate(session, until)
        except transfer.SFTPNotStarted as exc:
            stalls.append(f"lasting={exc.lasting}: {exc}")
            raise
        finally:
            _thaw(frozen)
    try:
        with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
            put_with_the_connection_killed(ex, server, str(workdir / "f"))
            assert leftovers(workdir) and ex._leftovers
            monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 1.0)
            monkeypatch.setattr(transfer._Session, "_invoke_subsystem", stalled)
            monkeypatch.setattr(transfer._Session, "_negotiate", thawing)
            assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
            assert len(stalls) == 2 and "no SFTP version came" in stalls[1], stalls
            monkeypatch.undo()
            assert ex._leftovers, f"the names were given up ({stalls[1]})"
            assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        assert leftovers(workdir) == []
    finally:
        _thaw(frozen)


def _line_of(function: Any, text: str) -> int:
    """The line of ``function`` holding ``text`` (the first)."""
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def _interrupt() -> None:
    raise KeyboardInterrupt


# -- a real sftp-server that meddles with the probe's held REMOVE and CLOSE -----------------------


def _status(request_id: int, code: int) -> bytes:
    return packet(FXP["STATUS"], _U32.pack(request_id), _U32.pack(code), string(b"meddled"),
                  string(b""))


class MeddlingRelay(HostileSFTPServer):
    """An SSH server whose ``sftp`` is a real OpenSSH sftp-server (as root), relayed. In
    sessions that sent an LSTAT (a put without ``mode``: its probe's), the first REMOVE
    and the first CLOSE after it (the probe's held requests) get what ``plan[kind]``
    says:

    ``late``: answered once a CLOSE sent after the next request was (the temporary
    file's: after everything else the put waits for); ``twice``: answered twice; ``fail``: done, but
    answered with FAILURE; ``refuse``: not done, answered with FAILURE; ``silent``: not
    done, never answered.
    """

    def __init__(self, directory: pathlib.Path, plan: Dict[str, str]) -> None:
        super().__init__(directory, {})
        self.plan = plan

    def serve(self, chan: paramiko.Channel) -> None:
        proc = subprocess.Popen([SFTP_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        meddled: Dict[int, str] = {}  # request id: what its reply gets
        kinds: Dict[int, int] = {}  # request id: its kind
        lock = threading.Lock()

        def send(data: bytes) -> bool:
            try:
                chan.sendall(data)
                return True
            except (EOFError, OSError, paramiko.SSHException):
                return False

        def pump() -> None:
            assert proc.stdout is not None
            held: List[Tuple[int, bytes]] = []  # (request id, reply)
            while True:
                head = proc.stdout.read(4)
                if len(head) < 4:
                    break
                reply = head + proc.stdout.read(_U32.unpack(head)[0])
                (request_id,) = _U32.unpack_from(reply, 5)
                with lock:
                    action = meddled.pop(request_id, "")
                    kind = kinds.pop(request_id, 0)
                if action == "late":
                    held.append((request_id, reply))
                    continue
                if action == "fail":
                    reply = _status(request_id, 4)
                if not send(reply * (2 if action == "twice" else 1)):
                    return
                while held and kind == FXP["CLOSE"] and held[0][0] + 1 < request_id:
                    if not send(held.pop(0)[1]):
                        return
            for _request_id, late in held:
                send(late)

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        seen: Set[int] = set()  # kinds met in this session
        try:
            chan.settimeout(30)
            while True:
                kind, request_id, payload = read_packet(chan)
                action = ""
                if FXP["LSTAT"] in seen and kind in (FXP["REMOVE"], FXP["CLOSE"]) \
                        and kind not in seen:
                    action = self.plan.get({FXP["REMOVE"]: "REMOVE",
                                            FXP["CLOSE"]: "CLOSE"}[kind], "")
                seen.add(kind)
                if action in ("refuse", "silent"):
                    if action == "refuse" and not send(_status(request_id, 4)):
                        return
                    continue
                with lock:
                    meddled[request_id] = action
                    kinds[request_id] = kind
                body = bytes((kind,)) + (b"" if kind == FXP["INIT"]
                                         else _U32.pack(request_id)) + payload
                assert proc.stdin is not None
                proc.stdin.write(_U32.pack(len(body)) + body)
                proc.stdin.flush()
        except (EOFError, OSError, paramiko.SSHException):
            pass
        finally:
            with suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            proc.wait(10)
            pumper.join(10)


def _put_meddled(tmp_path: pathlib.Path, plan: Dict[str, str], size: int,
                 failing: Tuple[str, ...] = ()) -> None:
    """Puts of ``size`` bytes to a new and a replaced file through a `MeddlingRelay` of
    ``plan``: each succeeds, or (``plan`` holds an action of ``failing``) fails leaving
    the final name as it was; and no temporary name is left once two more transfers'
    clean-ups ran."""
    directory = tmp_path / "remote"
    directory.mkdir()
    (directory / "old").write_bytes(b"old")
    server = MeddlingRelay(tmp_path, plan)
    data = os.urandom(size)
    try:
        with SSHExecutor(**server.executor_parameters(on_disconnect_retry=0)) as ex:
            for name in ("new", "old"):
                try:
                    assert ex.put(io.BytesIO(data), f"{directory}/{name}", timeout=4) == size
                except (TransferTimeout, ExecutorFailure) as exc:
                    assert set(plan.values()) & set(failing), exc
                    if name == "old":
                        assert (directory / name).read_bytes() == b"old"
                    else:
                        assert not (directory / name).exists()
                else:
                    assert (directory / name).read_bytes() == data
            for _ in range(2):
                assert ex.get(f"{directory}/old", io.BytesIO(), timeout=30) >= 0
        left = sorted(p.name for p in directory.iterdir())
        assert [n for n in left if n.endswith(".tmp")] == [], (plan, left)
    finally:
        server.close()


_PLANS = [{"REMOVE": action} for action in ("twice", "fail", "refuse", "silent")] + [
    {"CLOSE": action} for action in ("late", "twice", "fail", "refuse", "silent")] + [
    {"REMOVE": "fail", "CLOSE": "fail"}, {"REMOVE": "refuse", "CLOSE": "silent"}]


@pytest.mark.parametrize("size", [0, 5, 3 * 1024 * 1024])
@pytest.mark.parametrize("plan", _PLANS, ids=lambda plan: ",".join(
    f"{kind}-{action}" for kind, action in plan.items()))
def test_the_probes_held_requests_answered_any_way_leave_nothing_behind(
        tmp_path: pathlib.Path, plan: Dict[str, str], size: int) -> None:
    # A reply never given (REMOVE: awaited by a put that renames over a probe it could
    # not remove) or given twice (a protocol error) fails the put; the others succeed.
    _put_meddled(tmp_path, plan, size, failing=("twice", "silent"))


@pytest.mark.parametrize("size", [0, 5, 3 * 1024 * 1024])
def test_a_probes_remove_answered_last_does_not_hold_the_put_up(
        tmp_path: pathlib.Path, size: int) -> None:
    # A server may answer requests out of order (the draft allows it; a slow REMOVE on
    # a network file system answered after the quick ones). The REMOVE's reply came
    # after every other reply the put waited for: `kept` calls `receive`, which keeps
    # that reply and goes on waiting for a reply to another request, and there is none:
    # the put hangs until its deadline (for ever without a timeout) and fails.
    _put_meddled(tmp_path, {"REMOVE": "late"}, size)


# --- what held ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sftp_process_sshd() -> Iterator[Any]:
    """A private sshd whose SFTP is a process of its own (sftp-server, not internal-sftp),
    to be killed apart from the connection."""
    server = start_openssh(max_sessions=10, extra_config=[f"ForceCommand {SFTP_SERVER}"])
    yield server
    server.close()


def _kill_sftp_servers(server: Any) -> None:
    """SIGKILL to ``server``'s sftp-server processes (not to the connections)."""
    for pid in _descendants(_process_table(), server._proc.pid):
        if SFTP_SERVER in _cmdline(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _lines(function: Any) -> List[int]:
    """The lines of ``function``'s body that run code."""
    code = function.__code__
    return sorted({line for _start, _end, line in code.co_lines()
                   if line is not None and line > code.co_firstlineno})


_KILLED: List[Any] = [transfer.upload, transfer._Session.stat_and_create,
                      transfer._Session._created]
_KILL_CASES = [(function, line) for function in _KILLED for line in _lines(function)]


@pytest.mark.parametrize("what", ["sftp-server", "connection"])
@pytest.mark.parametrize("function,line", _KILL_CASES,
                         ids=[f"{function.__name__}:{line}" for function, line in _KILL_CASES])
def test_a_put_whose_sftp_server_or_connection_is_killed_anywhere_leaves_nothing(
        sftp_process_sshd: Any, workdir: pathlib.Path, function: Any, line: int,
        what: str) -> None:
    server = sftp_process_sshd
    (workdir / "f").write_bytes(b"old")
    keep = workdir / ".keep.0000000000000000.tmp"  # another client's
    keep.write_bytes(b"keep")
    data = os.urandom(300 * 1024)

    def kill() -> None:
        if what == "connection":
            for pid in server.serving_pids():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        else:
            _kill_sftp_servers(server)
    with SSHExecutor(**server.executor_parameters(on_disconnect_retry=1)) as ex:
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        with suppress(ExecutorFailure):
            at_line(function.__code__, line, kill,
                    lambda: ex.put(io.BytesIO(data), str(workdir / "f"), timeout=30))()

        def cleaned() -> bool:
            ex.put(io.BytesIO(b"ok"), str(workdir / "g"), timeout=30)
            return leftovers(workdir) == [keep.name]
        wait_for(cleaned, "the temporary files' removal", timeout=executors.LEFTOVER_TIMEOUT,
                 explain=lambda: str(leftovers(workdir)))
    assert (workdir / "f").read_bytes() in (b"old", data)
    assert keep.read_bytes() == b"keep"


def test_many_threads_putting_the_same_names_leave_only_whole_files(
        sshd: Any, workdir: pathlib.Path) -> None:
    payloads = [b"", b"small", os.urandom(200 * 1024)]
    names = [workdir / f"same{i}" for i in range(3)]
    (workdir / "same0").write_bytes(b"before")

    def work(index: int) -> int:
        done = 0
        for round_ in range(6):
            target = names[(index + round_) % len(names)]
            data = payloads[(index * 7 + round_) % len(payloads)]
            mode = None if (index + round_) % 2 else 0o640
            done += ex.put(io.BytesIO(data), str(target), mode=mode, timeout=60)
        return done
    with SSHExecutor(**sshd.executor_parameters()) as ex, ThreadPoolExecutor(12) as pool:
        list(pool.map(work, range(12)))
        assert not ex._leftovers
    assert leftovers(workdir) == []
    for target in names:
        assert target.read_bytes() in payloads


_SWEPT: List[Any] = [transfer._Session._send_requests, transfer._Session.later,
                     transfer._Session.kept, transfer._Session.settle,
                     transfer._Session.discard_upload, transfer._Session.write_file]
_CASES = [(function, line) for function in _SWEPT for line in _lines(function)]


@pytest.mark.parametrize("failing", [False, True])
@pytest.mark.parametrize("function,line", _CASES,
                         ids=[f"{function.__name__}:{line}" for function, line in _CASES])
def test_ctrl_c_in_the_held_requests_bookkeeping_leaves_nothing(
        sshd: Any, workdir: pathlib.Path, function: Any, line: int, failing: bool) -> None:
    # ``failing``: the progress callback raises at the first block, so that the
    # clean-up's lines (discard_upload, settle) run.
    keep = workdir / ".keep.0000000000000000.tmp"  # another client's
    keep.write_bytes(b"keep")

    def progress(done: int, total: int) -> None:
        if failing:
            raise ValueError("progress failed")
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        assert ex.get("/etc/hostname", io.BytesIO(), timeout=30) > 0
        with suppress(KeyboardInterrupt, ValueError):
            at_line(function.__code__, line, _interrupt,
                    lambda: ex.put(io.BytesIO(os.urandom(100 * 1024)), str(workdir / "f"),
                                   progress=progress))()

        def cleaned() -> bool:
            ex.put(io.BytesIO(b"ok"), str(workdir / "g"))
            return leftovers(workdir) == [keep.name]
        wait_for(cleaned, "the temporary files' removal", timeout=executors.LEFTOVER_TIMEOUT,
                 explain=lambda: str(leftovers(workdir)))
    assert keep.read_bytes() == b"keep"


@pytest.mark.parametrize("mode", [None, 0o640])
@pytest.mark.parametrize("at", range(11))
def test_a_deadline_at_any_request_of_a_put_leaves_nothing_behind(
        tmp_path: pathlib.Path, at: int, mode: Any) -> None:
    # Each request in turn held up 3 s by the server, past the put's 1.5 s deadline.
    directory = tmp_path / "remote"
    directory.mkdir()
    (directory / "up").write_bytes(b"old")
    server = RelaySFTPServer(tmp_path, lambda index, kind: False,
                             hold=lambda index, kind: 3.0 if index == at else 0.0)
    try:
        with SSHExecutor(**server.executor_parameters()) as ex:
            with suppress(TransferTimeout):
                ex.put(io.BytesIO(b"data"), f"{directory}/up", mode=mode, timeout=1.5)
            assert server.first_done.wait(20)

            def cleaned() -> bool:
                ex.get(f"{directory}/up", io.BytesIO(), timeout=30)
                return sorted(p.name for p in directory.iterdir()) == ["up"]
            wait_for(cleaned, "the temporary files' removal",
                     timeout=executors.LEFTOVER_TIMEOUT,
                     explain=lambda: str(sorted(p.name for p in directory.iterdir())))
        assert (directory / "up").read_bytes() in (b"old", b"data")
    finally:
        server.close()


@pytest.mark.parametrize("lasting", [True, False])
def test_sftp_not_started_pickles_with_its_lasting(lasting: bool) -> None:
    error = transfer.SFTPNotStarted("no SFTP", object(), lasting=lasting)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.lasting, copy.executor) == (
        transfer.SFTPNotStarted, "no SFTP", lasting, None)


def _put_refused_again(ex: SSHExecutor, data: bytes, remote: str, mode: Any) -> int:
    """``ex.put``, tried again (up to 20 times) while the server refuses the SFTP
    subsystem: what a caller must do against Dropbear now."""
    for _ in range(19):
        try:
            return ex.put(io.BytesIO(data), remote, mode=mode, timeout=30)
        except transfer.SFTPNotStarted as exc:
            assert not exc.lasting
    return ex.put(io.BytesIO(data), remote, mode=mode, timeout=30)


def test_puts_through_dropbear_leave_only_their_files(
        dropbear: Any, workdir: pathlib.Path) -> None:
    with SSHExecutor(**dropbear.executor_parameters()) as ex:
        for mode in (None, 0o640):
            for data in (b"", b"data", os.urandom(300 * 1024)):
                for name in ("new", "new"):  # new, then replaced
                    remote = str(workdir / f"{name}-{mode}")
                    assert _put_refused_again(ex, data, remote, mode) == len(data)
                    assert (workdir / f"{name}-{mode}").read_bytes() == data
    assert leftovers(workdir) == []


def test_a_put_whose_sftp_subsystem_is_refused_once_is_tried_again(
        sshd: Any, workdir: pathlib.Path, monkeypatch: Any) -> None:
    invoke = transfer._Session._invoke_subsystem
    refusals = [1]

    def refusing(session: Any, until: float) -> None:
        if refusals:
            refusals.pop()
            raise transfer.SFTPNotStarted("the server refused to start the SFTP subsystem",
                                          refused=True)  # as _invoke_subsystem raises it
        invoke(session, until)
    monkeypatch.setattr(transfer._Session, "_invoke_subsystem", refusing)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        assert ex.run_command("true").exit_code == 0
        assert ex.put(io.BytesIO(b"data"), str(workdir / "f"), timeout=30) == 4
    assert (workdir / "f").read_bytes() == b"data"


def test_a_refused_sftp_subsystem_is_not_lasting_and_a_forced_command_is(
        test_server: Any, sshd: Any, monkeypatch: Any) -> None:
    # The project's test server has no SFTP subsystem: a refusal. The sshd fixture's
    # forced /bin/bash runs instead of it: something else, silent.
    monkeypatch.setattr(transfer, "NEGOTIATION_TIMEOUT", 1.0)
    with SSHExecutor(**test_server.executor_parameters()) as ex:
        with pytest.raises(transfer.SFTPNotStarted) as refused:
            ex.get("/etc/hostname", io.BytesIO(), timeout=30)
    forced = sshd.executor_parameters(client_keys=[sshd.forced_key_path])
    with SSHExecutor(**forced) as ex:
        with pytest.raises(transfer.SFTPNotStarted) as ran:
            ex.get("/etc/hostname", io.BytesIO(), timeout=30)
    assert (refused.value.lasting, ran.value.lasting) == (False, True)


# --- 74b36db: DupingSSHExecutor with pty=True -----------------------------------------


def test_a_long_duping_command_on_a_pty_runs_whole_or_not_at_all(sshd: Any) -> None:
    # The terminal echoes the whole line, the marker too: "$((6 * 7))" tells what ran.
    command = "true " + "x" * 5000 + "; echo $((6 * 7))-whole"
    with DupingSSHExecutor(**sshd.executor_parameters(), wrapper=SAFE_WRAPPER) as ex:
        assert "42-whole" in ex.run_command(command, timeout=20).stdout  # without a pty
        try:
            result = ex.run_command(command, pty=True, timeout=20, check=False)
        except (ValueError, ExecutorFailure):
            return  # refused before anything ran
        assert "42-whole" in result.stdout, (result.exit_code, result.stdout[-100:])


@pytest.mark.parametrize("taken", ["probe", "temporary file"])
@pytest.mark.parametrize("refused", ["lstat", "remove"])
def test_a_name_already_taken_on_a_restricted_sftp_server_is_left_alone(
        make_sshd: Any, workdir: pathlib.Path, monkeypatch: Any, taken: str,
        refused: str) -> None:
    # sftp-server -P lstat (the probe's bits by FSTAT, one more round trip, which sends
    # the held REMOVE) and -P remove (the upload renamed over its probe).
    server = make_sshd(max_sessions=10,
                       extra_config=[f"ForceCommand internal-sftp -P {refused}"])
    names = ["1" * 16, "0" * 16] if taken == "probe" else ["0" * 16, "1" * 16]
    other = _taken(monkeypatch, workdir, *names)
    with SSHExecutor(**server.executor_parameters()) as ex:
        if taken == "probe":
            assert ex.put(io.BytesIO(b"data"), str(workdir / "f"), timeout=30) == 4
            assert (workdir / "f").read_bytes() == b"data"
        else:
            with pytest.raises(ExecutorFailure, match="cannot create a temporary file"):
                ex.put(io.BytesIO(b"data"), str(workdir / "f"), timeout=30)
        monkeypatch.undo()
        ex.put(io.BytesIO(b"ok"), str(workdir / "g"), mode=0o644, timeout=30)
    assert other.read_bytes() == b"another client's"
    left = leftovers(workdir)
    # -P remove: a probe created (the temporary file refused) cannot be removed.
    assert left == [other.name] or (refused == "remove" and taken != "probe"
                                    and len(left) == 2), left


def test_a_source_with_no_permission_bits_gives_a_file_with_none(
        sshd: Any, workdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # The probe is created asking for 0o000, as sftp creates the file.
    source = tmp_path / "source"
    source.write_bytes(b"secret")
    source.chmod(0)
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        assert ex.put(str(source), str(workdir / "f"), timeout=30) == 6
    assert stat.S_IMODE((workdir / "f").stat().st_mode) == 0
    assert leftovers(workdir) == []
