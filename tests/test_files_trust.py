"""put and get on terms a user can trust: file modes as OpenSSH's sftp leaves them,
exclusive owner-only temporary files, and hostile SFTP servers.

Modes are checked against a real sshd (and against OpenSSH's own ``sftp -b``
where it decides the same thing); malformed replies come from a small
hostile SFTP server started here: a paramiko server whose ``sftp``
subsystem answers every request as a scenario says.
"""

from __future__ import annotations

import io
import os
import pathlib
import pwd
import socket
import struct
import subprocess
import threading
from typing import Any, Callable, Dict, Iterator, List

import paramiko
import pytest
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from paramiko_executor import ExecutorFailure, HostGroup, ShellExecutor, SSHExecutor

# --- modes ----------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture
def remote_dir(sshd: Any, shared_dir: str) -> pathlib.Path:
    """A directory owned by the sshd login user, as its home would be."""
    path = pathlib.Path(shared_dir) / "remote"
    path.mkdir()
    entry = pwd.getpwnam(sshd.username)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


@pytest.fixture(params=["ssh", "shell"])
def executor(request: Any, sshd: Any) -> Iterator[Any]:
    if request.param == "shell":
        yield ShellExecutor()
        return
    with SSHExecutor(**sshd.executor_parameters()) as ex:
        yield ex


def bits(path: Any) -> int:
    return os.stat(path).st_mode & 0o7777


def make_file(path: pathlib.Path, mode: int, data: bytes = b"secret\n") -> pathlib.Path:
    """A file of ``mode``; in a directory of the sshd login user, owned by that user."""
    path.write_bytes(data)
    os.chmod(path, mode)
    parent = path.parent.stat()
    if parent.st_uid != os.getuid():
        os.chown(path, parent.st_uid, parent.st_gid)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755])
def test_a_new_file_gets_the_sources_bits(executor: Any, remote_dir: pathlib.Path,
                                          tmp_path: pathlib.Path, umask_022: None,
                                          mode: int) -> None:
    source = make_file(tmp_path / "source", mode)
    executor.put(source, str(remote_dir / "up"))
    assert bits(remote_dir / "up") == mode
    remote = make_file(remote_dir / "remote", mode)
    executor.get(str(remote), str(tmp_path / "down"))
    assert bits(tmp_path / "down") == mode


def test_get_takes_the_umask_off_and_a_file_object_counts_as_0644(
        executor: Any, remote_dir: pathlib.Path, tmp_path: pathlib.Path, umask_022: None) -> None:
    remote = make_file(remote_dir / "wide", 0o666)
    executor.get(str(remote), str(tmp_path / "down"))
    assert bits(tmp_path / "down") == 0o644
    os.umask(0o077)
    executor.get(str(remote), str(tmp_path / "private"))
    assert bits(tmp_path / "private") == 0o600
    os.umask(0o022)  # a ShellExecutor's put takes this process's umask off, as sftp-server's
    executor.put(io.BytesIO(b"data"), str(remote_dir / "from-object"))
    assert bits(remote_dir / "from-object") == 0o644


def test_a_replaced_file_keeps_its_bits_unless_mode_is_given(
        executor: Any, remote_dir: pathlib.Path, tmp_path: pathlib.Path, umask_022: None) -> None:
    source = make_file(tmp_path / "source", 0o644, b"new\n")
    target = make_file(remote_dir / "target", 0o600, b"old\n")
    executor.put(source, str(target))
    assert bits(target) == 0o600 and target.read_bytes() == b"new\n"
    executor.put(source, str(target), mode=0o640)
    assert bits(target) == 0o640
    remote = make_file(remote_dir / "public", 0o644, b"public\n")
    local = make_file(tmp_path / "local", 0o600, b"old\n")
    executor.get(str(remote), str(local))
    assert bits(local) == 0o600 and local.read_bytes() == b"public\n"


def test_temporary_files_are_owner_only_until_the_end(
        executor: Any, remote_dir: pathlib.Path, tmp_path: pathlib.Path, umask_022: None) -> None:
    data = os.urandom(3 * 1024 * 1024)
    seen: List[int] = []

    def watch(directory: pathlib.Path) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            seen.extend(bits(p) for p in directory.iterdir() if p.name.endswith(".tmp"))
        return progress

    source = make_file(tmp_path / "source", 0o644, data)
    executor.put(source, str(remote_dir / "up"), progress=watch(remote_dir))
    remote = make_file(remote_dir / "remote", 0o644, data)
    down = tmp_path / "down"
    down.mkdir()
    executor.get(str(remote), str(down / "file"), progress=watch(down))
    assert seen and set(seen) == {0o600}
    assert bits(remote_dir / "up") == 0o644 and bits(down / "file") == 0o644


def test_modes_match_openssh_sftp(make_sshd: Callable[..., Any], shared_dir: str,
                                  tmp_path: pathlib.Path, umask_022: None) -> None:
    server = make_sshd()  # started under umask 022, as its sftp-server then is
    entry = pwd.getpwnam(server.username)
    remote = pathlib.Path(shared_dir)
    os.chown(remote, entry.pw_uid, entry.pw_gid)
    ssh_options = ["-F", "/dev/null", "-i", server.client_key_path,
                   "-o", f"UserKnownHostsFile={server.known_hosts_path}",
                   "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                   "-P", str(server.port)]

    def sftp(*commands: str) -> None:
        subprocess.run(["sftp", *ssh_options, "-b", "-", f"{server.username}@{server.host}"],
                       input="\n".join(commands).encode(), check=True, timeout=60,
                       stdout=subprocess.DEVNULL)

    cases: Dict[str, List[int]] = {}
    with SSHExecutor(**server.executor_parameters()) as ex:
        for mode in (0o600, 0o644):
            source = make_file(tmp_path / f"source-{mode:o}", mode)
            origin = make_file(remote / f"origin-{mode:o}", mode)
            for tool in ("sftp", "ours"):
                up, down = remote / f"up-{tool}-{mode:o}", tmp_path / f"down-{tool}-{mode:o}"
                # Replaced files: the other kind of bits, kept by both tools.
                kept_up = make_file(remote / f"kept-{tool}-{mode:o}", 0o644 if mode == 0o600
                                    else 0o600)
                kept_down = make_file(tmp_path / f"kept-{tool}-{mode:o}", bits(kept_up))
                if tool == "sftp":
                    sftp(f"put {source} {up}", f"get {origin} {down}",
                         f"put {source} {kept_up}", f"get {origin} {kept_down}")
                else:
                    ex.put(source, str(up))
                    ex.get(str(origin), str(down))
                    ex.put(source, str(kept_up))
                    ex.get(str(origin), str(kept_down))
                cases[f"{tool}-{mode:o}"] = [bits(p) for p in (up, down, kept_up, kept_down)]
    for mode in (0o600, 0o644):
        assert cases[f"ours-{mode:o}"] == cases[f"sftp-{mode:o}"], cases


# --- hostile SFTP servers -------------------------------------------------------------

_U32 = struct.Struct(">I")
FXP = {"INIT": 1, "VERSION": 2, "OPEN": 3, "CLOSE": 4, "READ": 5, "WRITE": 6, "LSTAT": 7,
       "FSTAT": 8, "FSETSTAT": 10, "REMOVE": 13, "RENAME": 18, "STAT": 17, "STATUS": 101,
       "HANDLE": 102, "DATA": 103, "ATTRS": 105}
CONTENT = b"hello from a hostile server\n"
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def packet(kind: int, *fields: bytes) -> bytes:
    body = bytes((kind,)) + b"".join(fields)
    return _U32.pack(len(body)) + body


def string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def status(request_id: int, code: int, message: bytes = b"") -> bytes:
    return packet(FXP["STATUS"], _U32.pack(request_id), _U32.pack(code), string(message),
                  string(b""))


def good_reply(kind: int, request_id: int, payload: bytes) -> bytes:
    """What a well-behaved server answers, for a one-file server holding CONTENT."""
    rid = _U32.pack(request_id)
    if kind == FXP["OPEN"]:
        return packet(FXP["HANDLE"], rid, string(b"h"))
    if kind == FXP["STAT"]:
        return status(request_id, 2, b"No such file")
    if kind in (FXP["FSTAT"], FXP["LSTAT"]):  # LSTAT: an upload's probe, just created
        return packet(FXP["ATTRS"], rid, _U32.pack(0x5), struct.pack(">QI", len(CONTENT), 0o100644))
    if kind == FXP["READ"]:
        offset, length = struct.unpack(">QI", payload[-12:])
        if offset >= len(CONTENT):
            return status(request_id, 1, b"EOF")
        return packet(FXP["DATA"], rid, string(CONTENT[offset : offset + length]))
    return status(request_id, 0)


#: Scenario name -> (what the server sends for its VERSION or None for a good one,
#: {request type: reply maker}): malformed in one place each.
Reply = Callable[[int, bytes], bytes]
SCENARIOS: Dict[str, Dict[str, Any]] = {
    "version with a cut-off extension": {
        "version": packet(FXP["VERSION"], _U32.pack(3), string(b"posix-rename@openssh.com"))},
    "handle reply without its handle": {
        "OPEN": lambda rid, _: packet(FXP["HANDLE"], _U32.pack(rid))},
    "handle of 4 GiB": {
        "OPEN": lambda rid, _: packet(FXP["HANDLE"], _U32.pack(rid), _U32.pack(0xFFFFFFF0))},
    "handle of 1000 bytes": {
        "OPEN": lambda rid, _: packet(FXP["HANDLE"], _U32.pack(rid), string(b"h" * 1000))},
    "attrs cut short": {
        "FSTAT": lambda rid, _: packet(FXP["ATTRS"], _U32.pack(rid), _U32.pack(0x5))},
    "data reply without data": {
        "READ": lambda rid, _: packet(FXP["DATA"], _U32.pack(rid))},
    "data longer than asked": {
        "READ": lambda rid, _: packet(FXP["DATA"], _U32.pack(rid), string(b"x" * 70000))},
    "status cut short": {
        "OPEN": lambda rid, _: packet(FXP["STATUS"], _U32.pack(rid), b"\x00\x00")},
    "status message longer than its packet": {
        "OPEN": lambda rid, _: packet(FXP["STATUS"], _U32.pack(rid), _U32.pack(4),
                                      _U32.pack(1 << 20), b"short")},
    "a reply to a request never sent": {
        "OPEN": lambda rid, _: status(rid + 1000, 0)},
    "a packet of 2 GiB": {
        "OPEN": lambda rid, _: _U32.pack(0x7FFFFFFF) + b"\x66" * 64},
    "a packet too short for an id": {
        "OPEN": lambda rid, _: _U32.pack(2) + b"\x65\x00"},
}


class HostileSFTPServer:
    """An SSH server on 127.0.0.1 whose ``sftp`` subsystem follows a scenario of `SCENARIOS`."""

    def __init__(self, directory: pathlib.Path, scenario: Dict[str, Any]) -> None:
        self.scenario = scenario
        self.host_key = paramiko.ECDSAKey.generate()
        self.client_key = paramiko.ECDSAKey.generate()
        self.client_key_path = str(directory / "client_key")
        self.client_key.write_private_key_file(self.client_key_path)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.known_hosts = directory / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_key.get_name()} "
                                    f"{self.host_key.get_base64()}\n")
        self.transports: List[paramiko.Transport] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def executor_parameters(self, **overrides: Any) -> Dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "username": "test",
                "client_keys": [self.client_key_path], "known_hosts": str(self.known_hosts),
                "config": (), **overrides}

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            transport.start_server(event=threading.Event(), server=_Interface(self))

    def serve(self, chan: paramiko.Channel) -> None:
        """The subsystem: VERSION, then one reply per request, as the scenario says."""
        chan.settimeout(10)
        try:
            read_packet(chan)  # INIT
            if "stderr" in self.scenario:  # a subsystem that only complains, and ends
                chan.sendall_stderr(self.scenario["stderr"])
                chan.close()
                return
            chan.sendall(self.scenario.get("version") or packet(FXP["VERSION"], _U32.pack(3)))
            while True:
                kind, request_id, payload = read_packet(chan)
                maker = self.scenario.get({v: k for k, v in FXP.items()}.get(kind, ""))
                chan.sendall(maker(request_id, payload) if maker
                             else good_reply(kind, request_id, payload))
        except (EOFError, OSError, paramiko.SSHException):
            pass

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(5)
        for transport in self.transports:
            transport.close()


def read_packet(chan: paramiko.Channel) -> Any:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = chan.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    (size,) = _U32.unpack(exactly(4))
    body = exactly(size)
    if body[0] == FXP["INIT"]:
        return body[0], 0, body[1:]
    return body[0], _U32.unpack_from(body, 1)[0], body[5:]


class _Interface(paramiko.ServerInterface):
    def __init__(self, server: HostileSFTPServer) -> None:
        self.server = server

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.asbytes() == self.server.client_key.asbytes():
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED if kind == "session" else \
            OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            return False
        threading.Thread(target=self.server.serve, args=(channel,), daemon=True).start()
        return True


@pytest.fixture
def hostile(tmp_path: pathlib.Path) -> Iterator[Callable[[Dict[str, Any]], HostileSFTPServer]]:
    servers: List[HostileSFTPServer] = []

    def make(scenario: Dict[str, Any]) -> HostileSFTPServer:
        directory = tmp_path / f"hostile-{len(servers)}"
        directory.mkdir()
        servers.append(HostileSFTPServer(directory, scenario))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_the_hostile_server_serves_a_good_scenario(hostile: Any, tmp_path: pathlib.Path) -> None:
    server = hostile({})
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.get("/file", str(tmp_path / "copy"), timeout=30) == len(CONTENT)
        assert (tmp_path / "copy").read_bytes() == CONTENT
        assert ex.put(io.BytesIO(b"up"), "/file", timeout=30) == 2


@pytest.mark.parametrize(("name", "direction"), [
    (name, direction) for name in sorted(SCENARIOS) for direction in ("get", "put")
    # An upload sends neither FSTAT nor READ.
    if direction == "get" or not set(SCENARIOS[name]) & {"FSTAT", "READ"}])
def test_malformed_replies_are_protocol_errors(hostile: Any, tmp_path: pathlib.Path,
                                               name: str, direction: str) -> None:
    server = hostile(SCENARIOS[name])
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match="SFTP protocol error"):
            if direction == "get":
                ex.get("/file", str(tmp_path / "copy"), timeout=30)
            else:
                ex.put(io.BytesIO(b"data"), "/file", timeout=30)
        assert ex.statistics().reconnects == 0
    assert not (tmp_path / "copy").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(("code", "kind"), [(2, FileNotFoundError), (3, PermissionError),
                                            (4, ExecutorFailure)])
def test_server_text_in_a_status_is_escaped(hostile: Any, tmp_path: pathlib.Path,
                                            code: int, kind: type) -> None:
    message = (ESCAPES + "\u202e").encode() + b"\xff"
    server = hostile({"OPEN": lambda rid, _: status(rid, code, message)})
    with SSHExecutor(**server.executor_parameters()) as ex:
        for call in (lambda: ex.get("/file", str(tmp_path / "copy"), timeout=30),
                     lambda: ex.put(io.BytesIO(b"x"), "/file", timeout=30)):
            with pytest.raises(kind) as caught:
                call()
            text = str(caught.value)
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in text)
            assert "\\x1b]0;pwned" in text


def test_one_hostile_host_does_not_cost_the_others_their_results(
        hostile: Any, sshd: Any, remote_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    server = hostile(SCENARIOS["handle reply without its handle"])
    make_file(remote_dir / "file", 0o644, CONTENT)
    source = make_file(tmp_path / "source", 0o644, b"everyone\n")
    down = tmp_path / "down"
    down.mkdir()
    hosts = [{"name": "hostile", **server.executor_parameters()},
             {"name": "good", **sshd.executor_parameters()}]
    with HostGroup(hosts) as group:
        # The hostile one knows no remote_dir: every path leads to its one file.
        got = group.get(str(remote_dir / "file"), down, timeout=30)
        put = group.put(source, str(remote_dir / "put"), timeout=30)
    for result in (got, put):
        assert isinstance(result["hostile"], ExecutorFailure)
        assert "SFTP protocol error" in str(result["hostile"])
    assert got["good"] == len(CONTENT) and (down / "good").read_bytes() == CONTENT
    assert put["good"] == len(b"everyone\n")



def test_a_server_that_cannot_set_modes_leaves_the_file_owner_only(hostile: Any) -> None:
    server = hostile({"FSETSTAT": lambda rid, _: status(rid, 8, b"unsupported")})
    with SSHExecutor(**server.executor_parameters()) as ex:
        assert ex.put(io.BytesIO(b"data"), "/file", timeout=30) == 4
        with pytest.raises(ExecutorFailure, match="SFTP status 8"):
            ex.put(io.BytesIO(b"data"), "/file", mode=0o640, timeout=30)


def test_server_text_on_stderr_is_escaped(hostile: Any, tmp_path: pathlib.Path) -> None:
    server = hostile({"stderr": ESCAPES.encode()})
    with SSHExecutor(**server.executor_parameters()) as ex:
        with pytest.raises(ExecutorFailure, match="did not start SFTP") as caught:
            ex.get("/file", str(tmp_path / "copy"), timeout=30)
    text = str(caught.value)
    assert "\x1b" not in text and "\\x1b]0;pwned" in text
