"""Host-key decisions compared with OpenSSH's own: ``ssh-keygen -F`` and real ``ssh`` logins.

Every file is written by the test; ``GlobalKnownHostsFile none`` keeps /etc/ssh out of it.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import base64
import random
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import paramiko
import pytest
from paramiko.hostkeys import HostKeys

from paramiko_executor import HostKeyFailure, SSHExecutor, hostkeys
from paramiko_executor.hostkeys import HostKeyPolicy
from testsupport import oracle

pytestmark = pytest.mark.usefixtures("openssh_client")


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def home(tmp_path: Path) -> str:
    path = tmp_path / "home"
    (path / ".ssh").mkdir(parents=True)
    return str(path)


def host_line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def block(alias: str, server, known: Path, extra: str = "") -> str:
    return (f"Host {alias}\n    HostName 127.0.0.1\n    Port {server.port}\n"
            f"    User {server.username}\n    IdentityFile {server.client_key_path}\n"
            f"    GlobalKnownHostsFile none\n    UserKnownHostsFile {known}\n" + extra)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run(config: str, host: str = "target") -> str:
    with SSHExecutor(host=host, config=config, connect_retries=0) as ex:
        return ex.run_command("echo ok").stdout


# -- issue 19.1: HostKeyAlias is lower-cased, as OpenSSH does -------------------------------------


def test_upper_case_host_key_alias_with_accept_new(sshd, sshd3, tmp_path, home):
    recorded = tmp_path / "recorded"
    alias = "    HostKeyAlias ProdDB\n    StrictHostKeyChecking accept-new\n"
    genuine = write(tmp_path / "genuine", block("target", sshd, recorded, alias))
    assert run(genuine) == "ok\n"
    first = recorded.read_text()
    assert first == host_line("proddb", sshd.host_public_key)
    assert run(genuine) == "ok\n"
    assert recorded.read_text() == first  # found again: not appended a second time
    # OpenSSH finds the same line: it logs in without recording anything either.
    assert oracle.login(genuine, "target", home)[0] == 0
    assert recorded.read_text() == first

    impostor = write(tmp_path / "impostor", block("target", sshd3, recorded, alias))
    with pytest.raises(HostKeyFailure, match="Host key for proddb does not match"):
        run(impostor)
    status, err = oracle.login(impostor, "target", home)
    assert status == 255 and "HOST IDENTIFICATION HAS CHANGED" in err
    assert recorded.read_text() == first


def test_upper_case_host_key_alias_with_yes_accepts_the_genuine_host(sshd, tmp_path, home):
    # The line as OpenSSH records it for "HostKeyAlias ProdDB".
    known = tmp_path / "known"
    known.write_text(host_line("proddb", sshd.host_public_key))
    config = write(tmp_path / "config", block(
        "target", sshd, known, "    HostKeyAlias ProdDB\n    StrictHostKeyChecking yes\n"))
    assert oracle.login(config, "target", home)[0] == 0
    assert run(config) == "ok\n"


# -- generated known_hosts files: lookups against ssh-keygen -F -------------------------------

SEED = 2023
LOOKUP_FILES = 40
DECISION_FILES = 12

#: Names looked up (as ssh looks them up: lower-cased, "[host]:port" off port 22).
QUERIES = ["web1", "web2", "db.example.com", "a.example.com", "[web1]:2222", "10.0.0.5",
           "[10.0.0.5]:2200", "proddb", "gw"]
PATTERNS = ["web1", "WEB1", "Web2", "web*", "*.example.com", "*.EXAMPLE.com", "[web1]:2222",
            "[WEB1]:2222", "[web*]:2222", "*", "?b", "10.0.0.*", "db.example.com", "ProdDB",
            "proddb", "[10.0.0.5]:2200", "gw", "g?"]


def _keys(tmp_path: Path) -> List[paramiko.PKey]:
    """Public keys made by ssh-keygen: three ed25519 and one ECDSA (another type)."""
    keys = []
    for index, kind in enumerate(["ed25519", "ed25519", "ed25519", "ecdsa"]):
        path = tmp_path / f"key{index}"
        subprocess.run([oracle.SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-f", str(path)],
                       check=True, timeout=30)
        kind_name, data = path.with_suffix(".pub").read_text().split()[:2]
        keys.append(paramiko.PKey.from_type_string(kind_name, base64.b64decode(data)))
    return keys


def _field(rng: random.Random, patterns: List[str]) -> str:
    """The names field of a line: a pattern list, or one hashed name (ssh hashes one name)."""
    if rng.random() < 0.25:
        name = rng.choice(patterns).strip("!")
        hashed = HostKeys.hash_host(name if rng.random() < 0.7 else name.upper())
        return hashed + (",gw" if rng.random() < 0.1 else "")
    chosen = rng.sample(patterns, rng.randint(1, 3))
    if rng.random() < 0.3:
        chosen.append("!" + rng.choice(patterns))
    return ",".join(chosen)


def known_hosts_text(rng: random.Random, keys: List[paramiko.PKey], patterns: List[str]) -> str:
    lines = []
    for _ in range(rng.randint(1, 7)):
        key = rng.choice(keys)
        marker = rng.choices(["", "@revoked", "@cert-authority", "@bogus"], [70, 15, 10, 5])[0]
        separator = rng.choice([" ", "\t", "  ", " \t"])
        fields = ([marker] if marker else []) + [_field(rng, patterns), key.get_name(),
                                                 key.get_base64()]
        lines.append(separator.join(fields))
        if rng.random() < 0.1:
            lines.append(rng.choice(["# a comment", "", "onlyonefield",
                                     f"{rng.choice(patterns)} ssh-ed25519 !!notbase64!!"]))
    return "\n".join(lines) + "\n"


def _parses(found: str) -> bool:
    _marker, kind, data = found.split()
    try:
        paramiko.PKey.from_type_string(kind, base64.b64decode(data, validate=True))
    except Exception:  # noqa: BLE001 - any parse failure means ssh skips the line
        return False
    return True


def _ours(path: str, name: str) -> set:
    trusted, revoked = HostKeyPolicy._for_host(hostkeys._read_entries(path), name)
    return ({f"- {e.key.get_name()} {e.key.get_base64()}" for e in trusted}
            | {f"@revoked {e.key.get_name()} {e.key.get_base64()}" for e in revoked})


def test_known_hosts_lookups_match_ssh_keygen(tmp_path, home):
    keys = _keys(tmp_path)
    rng = random.Random(SEED)
    lookups = lines = 0
    for index in range(LOOKUP_FILES):
        text = known_hosts_text(rng, keys, PATTERNS)
        path = tmp_path / f"known_hosts_{index}"
        path.write_text(text)
        lines += text.count("\n")
        for name in QUERIES:
            # @cert-authority lines only ever vouch for certificates: a plain key, all
            # paramiko sees, is never checked against them by ssh either.
            # ssh-keygen -F also prints lines whose key does not parse; ssh skips those.
            theirs = {found for found in oracle.keygen_find(str(path), name, home)
                      if not found.startswith("@cert-authority") and _parses(found)}
            assert _ours(str(path), name) == theirs, (name, text)
            lookups += 1
    print(f"{LOOKUP_FILES} files, {lines} lines, {lookups} lookups agree with ssh-keygen -F")


# -- decisions: a real ssh login against the test sshd, and HostKeyPolicy.verify --------------


class _Presenting:
    """What verify() needs of a transport: the key the server presented."""

    def __init__(self, key: paramiko.PKey) -> None:
        self.key = key

    def get_remote_server_key(self) -> paramiko.PKey:
        return self.key


def _ours_decides(path: Path, key: paramiko.PKey, mode: str, port: int,
                  alias: Optional[str]) -> bool:
    policy = HostKeyPolicy(str(path), accept_new=mode == "accept-new", strict=mode != "no",
                           host_key_alias=alias)
    try:
        policy.verify(_Presenting(key), "127.0.0.1", port)  # type: ignore[arg-type]
    except HostKeyFailure:
        return False
    return True


@pytest.mark.hang_timeout(300)
def test_host_key_decisions_match_ssh_logins(sshd, tmp_path, home):
    others = _keys(tmp_path)
    genuine = sshd.host_public_key
    keys = [genuine, genuine, others[0], others[3]]  # the server's key, another, another type
    by_port = [f"[127.0.0.1]:{sshd.port}", f"[127.0.0.*]:{sshd.port}", "[127.0.0.1]:*", "*",
               "127.0.0.1", f"[127.0.0.2]:{sshd.port}", "[127.0.0.1]:22",
               f"[127.0.0.?]:{sshd.port}"]
    by_alias = ["proddb", "ProdDB", "PRODDB", "prod*", "*", "[proddb]:22", "127.0.0.1"]
    rng = random.Random(SEED + 1)
    decisions = 0
    explained: Dict[str, int] = {}
    for index in range(DECISION_FILES):
        alias = "ProdDB" if index % 3 == 2 else None  # matched lower-cased, as ssh does
        filed = "proddb" if alias else f"[127.0.0.1]:{sshd.port}"
        text = known_hosts_text(rng, keys, by_alias if alias else by_port)
        for mode in ("yes", "accept-new", "no"):
            theirs_file = tmp_path / f"theirs_{index}_{mode}"
            ours_file = tmp_path / f"ours_{index}_{mode}"
            theirs_file.write_text(text)
            ours_file.write_text(text)
            config = write(tmp_path / f"config_{index}_{mode}", block(
                "target", sshd, theirs_file,
                f"    StrictHostKeyChecking {mode}\n    UpdateHostKeys no\n"
                + (f"    HostKeyAlias {alias}\n" if alias else "") +
                "    PasswordAuthentication no\n    IdentitiesOnly yes\n"))
            status, err = oracle.login(config, "target", home)
            # What was appended, if anything: the same line, under the same name.
            theirs = (status == 0, theirs_file.read_text()[len(text):])
            ours = (_ours_decides(ours_file, genuine, mode, sshd.port, alias),
                    ours_file.read_text()[len(text):])
            decisions += 1
            if ours == theirs:
                continue
            # Deliberate: a host known only under keys of another type. ssh counts it as
            # new and records the key; the library takes it for a changed key, as paramiko
            # does (accept-new refuses it, no accepts it with a warning, neither records).
            trusted, _ = HostKeyPolicy._for_host(hostkeys._read_entries(str(ours_file)), filed)
            refused = (False, "") if mode == "accept-new" else (True, "")
            if mode != "yes" and theirs[0] and theirs[1] and ours == refused \
                    and trusted and all(e.key.get_name() != genuine.get_name() for e in trusted):
                explained["other-key-type"] = explained.get("other-key-type", 0) + 1
                continue
            # Deliberate: under "no" ssh connects to a key marked @revoked (password
            # authentication switched off); the library refuses a revoked key in every mode.
            _, revoked = HostKeyPolicy._for_host(hostkeys._read_entries(str(ours_file)), filed)
            if mode == "no" and ours == (False, "") and theirs[0] \
                    and "REVOKED HOST KEY" in err \
                    and any(e.key.asbytes() == genuine.asbytes() for e in revoked):
                explained["revoked-under-no"] = explained.get("revoked-under-no", 0) + 1
                continue
            raise AssertionError((mode, text, theirs, ours, err))
    print(f"{DECISION_FILES} files x 3 modes: {decisions} decisions compared with real ssh "
          f"logins; deliberate: {explained}")
