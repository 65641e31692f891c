"""Host and user names that ssh refuses, compared with what the library refuses.

OpenSSH (9.6, and the distributions' backports of its fix for CVE-2023-51385) refuses a
host name or a remote user name given on its command line that could do harm when
substituted into a ``ProxyCommand`` or ``Match exec``. The names are generated (seeded);
``ssh -G`` decides for each, `check_hostname` / `check_username` must decide the same, except
for the deliberate differences listed in docs/design/openssh-differences.rst, which are
encoded here by name.
"""

from __future__ import annotations

import random
from typing import List, Optional

import pytest

from paramiko_executor.hostnames import HOSTNAME_REFUSED, check_hostname, check_username
from testsupport import oracle

pytestmark = pytest.mark.usefixtures("openssh_client")

SEED = 1951
HOST_NAMES = 400
USER_NAMES = 300

#: Characters names are made of: ordinary ones mostly, then everything interesting.
PLAIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
SPECIAL = ("'`\"$\\;&<>|(){}*?!,@%[]~#^=+/: \t\n\r\x00\x01\x07\x1b\x7f"
           "\u00fc\u0085\u009b\u202e\u00a0")


def names(rng: random.Random, count: int) -> List[str]:
    result = []
    for _ in range(count):
        length = rng.randint(1, 12)
        chars = [rng.choice(SPECIAL) if rng.random() < 0.12 else rng.choice(PLAIN)
                 for _ in range(length)]
        if rng.random() < 0.08:
            chars.insert(0, "-")
        result.append("".join(chars).replace("\x00", ""))
    return result


def ssh_refuses(home: str, *, host: str = "h", user: Optional[str] = None) -> bool:
    options, err = oracle.resolve("/dev/null", host, home, user=user)
    return options is None


def library_refuses_host(name: str) -> bool:
    try:
        check_hostname(name)
    except ValueError:
        return True
    return False


def library_refuses_user(name: str) -> bool:
    try:
        check_username(name)
    except ValueError:
        return True
    return False


def deliberate_host(name: str) -> Optional[str]:
    """Why the library refuses a name that ssh takes, if the docs list the reason."""
    if not name:
        return "empty-host"
    if "@" in name:
        return "user-at-host"  # ssh splits user@host; the library takes the parts apart
    if any(char in "*?!," for char in name):
        return "pattern-characters"
    if any(not char.isprintable() for char in name if ord(char) > 127):
        return "unicode-controls"
    return None


def deliberate_user(name: str) -> Optional[str]:
    if any(not char.isprintable() for char in name if ord(char) > 127):
        return "unicode-controls"
    return None


def test_host_names_refused_as_ssh_refuses_them(tmp_path):
    rng = random.Random(SEED)
    corpus = names(rng, HOST_NAMES) + ["", "-x", "a b", "x;y", "$(id)", "`id`", "a\x1b",
                                       "evil,*", "web01", "a%b", "a:b", "ü", "bob@host"]
    disagreements, explained = [], {}
    refused = 0
    for name in corpus:
        theirs = ssh_refuses(str(tmp_path), host=name)
        ours = library_refuses_host(name)
        refused += ours
        if ours == theirs:
            continue
        reason = deliberate_host(name) if ours else None
        if reason is None:
            disagreements.append((name, "library refuses" if ours else "ssh refuses"))
        else:
            explained[reason] = explained.get(reason, 0) + 1
    print(f"{len(corpus)} host names: library refuses {refused}; deliberate: {explained}")
    assert not disagreements, disagreements[:20]
    assert explained.keys() <= {"empty-host", "user-at-host", "pattern-characters",
                                "unicode-controls"}
    assert set(HOSTNAME_REFUSED) >= set("*?!,@")


def test_user_names_refused_as_ssh_refuses_them(tmp_path):
    rng = random.Random(SEED + 1)
    corpus = names(rng, USER_NAMES) + ["bob", "a;b", "a b", "a -b", "-a", "a\\", "a\\b", "a$b",
                                       "a@b", "ü", "a\x1bb"]
    disagreements, explained = [], {}
    refused = 0
    for name in corpus:
        theirs = ssh_refuses(str(tmp_path), user=name)
        ours = library_refuses_user(name)
        refused += ours
        if ours == theirs:
            continue
        reason = deliberate_user(name) if ours else None
        if reason is None:
            disagreements.append((name, "library refuses" if ours else "ssh refuses"))
        else:
            explained[reason] = explained.get(reason, 0) + 1
    print(f"{len(corpus)} user names: library refuses {refused}; deliberate: {explained}")
    assert not disagreements, disagreements[:20]


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"host": "h", "username": "x;touch /tmp/pwned"}, "username"),
    ({"host": "h", "username": "-oProxyCommand=x"}, "username"),
    ({"host": "bob@h"}, "host"),
])
def test_names_ssh_refuses_fail_at_construction(kwargs, name):
    from paramiko_executor import SSHExecutor

    with pytest.raises(ValueError, match=name):
        SSHExecutor(config=(), **kwargs)


def test_proxy_jump_user_is_checked_as_ssh_checks_it(tmp_path):
    from paramiko_executor import SSHExecutor

    config = tmp_path / "config"
    config.write_text("Host target\n    ProxyJump 'a(b)'@bastion\n")
    with pytest.raises(ValueError, match="ProxyJump user"):
        SSHExecutor(host="target", config=str(config))
    assert oracle.resolve(str(config), "target", str(tmp_path))[0] is not None  # -G takes it
    assert ssh_refuses(str(tmp_path), user="a(b)")  # but ssh -l 'a(b)' bastion refuses
