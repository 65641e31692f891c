"""Shared pytest fixtures: private real OpenSSH servers, the project's own test server,
and a hang guard.

OpenSSH fixtures need ``/usr/sbin/sshd`` and root. Where they cannot run, the
test is skipped with a reason saying how to fix it, except when the ``CI``
environment variable is set: there such a test fails, so CI never passes by
skipping the real-server tests.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Iterator, List, NoReturn, Tuple

import pyotp
import pytest
from backends import Backend
from helpers import SLOW_RETRIES, wait_for

from testsupport.openssh import (
    SSHD_PATH,
    OpenSSHServer,
    OpenSSHUnavailable,
    close_all,
)

#: Seconds a test (setup, call and teardown) may run before the hang guard
#: dumps every thread's stack and ends pytest with exit status 1. Raise it for
#: one test with ``@pytest.mark.hang_timeout(seconds)``.
HANG_TIMEOUT = 180.0

#: The command the ``sshd`` fixture forces for its forced_key_path: a shell
#: that reads its commands from stdin, as DupingSSHExecutor expects.
FORCED_COMMAND = "/bin/bash"

_hang_guard_fd: List[int] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hang_timeout(seconds): let this test run longer before the hang guard fires"
    )
    # Output capture is suspended while pytest_configure runs: fd 2 is the
    # real stderr now, so a dump written there reaches the console or CI log.
    _hang_guard_fd.append(os.dup(2))


def pytest_unconfigure(config: pytest.Config) -> None:
    while _hang_guard_fd:
        os.close(_hang_guard_fd.pop())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Iterator[None]:
    """Hang guard: a test stuck past its limit dumps all stacks and fails the run.

    Without it a deadlocked test would hold CI until its 90-minute limit.
    """
    marker = item.get_closest_marker("hang_timeout")
    seconds = float(marker.args[0]) if marker else HANG_TIMEOUT
    if _hang_guard_fd:
        faulthandler.dump_traceback_later(seconds, exit=True, file=_hang_guard_fd[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def openssh_unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``; under CI (env ``CI`` set) fail it instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the real-sshd tests must run)", pytrace=False)
    pytest.skip(reason)


def require_sshd() -> None:
    """Skip (fail under CI) unless a real sshd is installed."""
    if not os.path.exists(SSHD_PATH):
        openssh_unavailable(f"{SSHD_PATH} not found: apt-get install openssh-server")


def start_openssh(**kwargs: Any) -> OpenSSHServer:
    """Start an :class:`OpenSSHServer` with ``kwargs``; skip (fail under CI) if impossible here."""
    require_sshd()
    server = OpenSSHServer(**kwargs)
    try:
        return server.start()
    except OpenSSHUnavailable as exc:
        server.close()
        openssh_unavailable(str(exc))


@pytest.fixture
def openssh_client() -> None:
    """Skip (fail under CI) unless OpenSSH's client tools (the differential tests' oracle) exist."""
    from testsupport import oracle

    if not oracle.available():
        openssh_unavailable(f"{oracle.SSH} not found: apt-get install openssh-client")


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_servers() -> Iterator[None]:
    """Fail the session if a test left a private sshd running; ends such servers.

    It changes no global state: it only checks, at the very end, after the
    session fixtures below have closed their servers.
    """
    yield
    leftover = close_all()
    if leftover:
        pytest.fail(f"{leftover} OpenSSHServer(s) were left running by the tests")


@pytest.fixture(scope="session")
def sshd() -> Iterator[OpenSSHServer]:
    """A private sshd with MaxSessions 10, shared by the session.

    ``forced_key_path`` is a key restricted to ``/bin/bash`` (FORCED_COMMAND).
    Tests must leave it running; one that stops, freezes or kills it (or its
    connections' processes) should use ``make_sshd`` instead.
    """
    server = start_openssh(max_sessions=10, forced_command=FORCED_COMMAND)
    yield server
    server.close()


@pytest.fixture
def dropbear(sshd: Any) -> Iterator[Any]:
    """A private Dropbear on 127.0.0.1 logging in sshd's test user with sshd's client key."""
    from testsupport.dropbear import DropbearServer, DropbearUnavailable

    try:
        server = DropbearServer(username=sshd.username, client_key_path=sshd.client_key_path)
    except DropbearUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with server:
        yield server


@pytest.fixture(scope="session")
def sshd3() -> Iterator[OpenSSHServer]:
    """A private sshd with MaxSessions 3, shared by the session."""
    server = start_openssh(max_sessions=3)
    yield server
    server.close()


@pytest.fixture
def make_sshd() -> Iterator[Callable[..., OpenSSHServer]]:
    """Factory: ``make_sshd(**OpenSSHServer kwargs)`` starts a private sshd for this test only."""
    servers: List[OpenSSHServer] = []

    def make(**kwargs: Any) -> OpenSSHServer:
        server = start_openssh(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def sshd_totp(make_sshd: Callable[..., OpenSSHServer]) -> OpenSSHServer:
    """A private sshd demanding the client key, then a TOTP code (PAM google-authenticator).

    ``sshd_totp.totp_secret`` is the secret, new for each test: every code is
    accepted once only, so a shared server would make tests depend on each other.
    """
    return make_sshd(max_sessions=10, totp_secret=pyotp.random_base32())


@pytest.fixture
def make_test_server() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_test_server(**SSHTestServer kwargs)`` starts the project's test server."""
    # Imported here so the OpenSSH fixtures work even while the test server is broken.
    from paramiko_executor.testing import SSHTestServer

    servers: List[Any] = []

    def make(**kwargs: Any) -> Any:
        server = SSHTestServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def test_server(make_test_server: Callable[..., Any]) -> Any:
    """The project's paramiko-based test server with MaxSessions 10, for this test only."""
    return make_test_server(max_sessions=10)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A directory both the tests (root) and the sshd login user can use.

    pytest's ``tmp_path`` lies below a directory only root may enter.
    """
    path = tempfile.mkdtemp(prefix="pe-shared-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_backend() -> Iterator[Callable[..., Backend]]:
    backends: List[Backend] = []

    def make(mode: str = "echo") -> Backend:
        backend = Backend(mode)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


@pytest.fixture
def down(make_sshd: Callable[..., Any]) -> Iterator[Tuple[Any, Any]]:
    """A real sshd and an executor (slow connect retries) that was connected to it; the
    server is then stopped. No thread may be left behind once the executor is closed."""
    from paramiko_executor import SSHExecutor

    server = make_sshd(max_sessions=10)
    threads_before = threading.active_count()
    ex = SSHExecutor(**SLOW_RETRIES, **server.executor_parameters())
    try:
        assert ex.run_command("echo up").stdout == "up\n"
        server.stop()
        yield server, ex
    finally:
        ex.close()
    # The connect a caller stopped waiting for ends with close().
    wait_for(lambda: threading.active_count() <= threads_before, "the threads to end",
             timeout=10)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for a test that sends real
    SIGINTs, even when the suite runs with SIGINT ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
