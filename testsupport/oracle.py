"""OpenSSH's own client tools as the oracle the differential tests compare with.

``ssh -G`` prints the configuration ssh would use for a host without connecting;
``ssh-keygen -F`` looks a name up in a known_hosts file; a real ``ssh`` login (``BatchMode``,
so it never prompts) gives OpenSSH's host-key decision. Every call runs with a bounded
timeout, an empty environment of our choosing and ``-F`` naming the test's own file, so
neither the user's nor the system's ssh configuration is read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["SSH", "SSH_KEYGEN", "available", "keygen_find", "login", "resolve"]

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

#: Seconds any one OpenSSH tool may run: they never touch the network except `login`.
TIMEOUT = 30.0


def available() -> bool:
    """Whether the OpenSSH client tools are installed."""
    return os.path.exists(SSH) and os.path.exists(SSH_KEYGEN)


def _environment(home: str, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    env.update(extra or {})
    return env


def resolve(
    config: str, host: str, home: str, *, user: Optional[str] = None,
    port: Optional[int] = None, env: Optional[Mapping[str, str]] = None,
) -> Tuple[Optional[Dict[str, List[str]]], str]:
    """``ssh -G -F config [-l user] [-p port] host``: keyword -> values, or None.

    Returns ``(options, stderr)``; ``options`` is None when ssh refuses (exit status != 0).
    """
    argv = [SSH, "-G", "-F", config]
    if user is not None:
        argv += ["-l", user]
    if port is not None:
        argv += ["-p", str(port)]
    argv += ["--", host]
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                          env=_environment(home, env), check=False)
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        return None, stderr
    options: Dict[str, List[str]] = {}
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        keyword, _, value = line.partition(" ")
        options.setdefault(keyword.lower(), []).append(value)
    return options, stderr


def keygen_find(known_hosts: str, name: str, home: str) -> List[str]:
    """``ssh-keygen -F name -f known_hosts``: the key fields of the lines that match ``name``.

    Each result is ``"marker type base64"`` (marker ``-`` for none) so that callers compare
    keys, not how the lines were written.
    """
    done = subprocess.run([SSH_KEYGEN, "-F", name, "-f", known_hosts], capture_output=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, env=_environment(home),
                          check=False)
    found = []
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if not fields or fields[0] == "#":
            continue
        marker = "-"
        if fields[0].startswith("@"):
            marker, fields = fields[0], fields[1:]
        if len(fields) >= 3:
            found.append(f"{marker} {fields[1]} {fields[2]}")
    return found


def login(config: str, host: str, home: str, options: Sequence[str] = ()) -> Tuple[int, str]:
    """A real ``ssh -F config host true`` (never prompting): its exit status and stderr."""
    argv = [SSH, "-F", config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    for option in options:
        argv += ["-o", option]
    argv += ["--", host, "true"]
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                          env=_environment(home), check=False)
    return done.returncode, done.stderr.decode("utf-8", "replace")
