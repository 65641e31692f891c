"""ssh_config resolution compared with OpenSSH's own: ``ssh -G -F CONFIG HOST``.

The configurations are generated (seeded, so every run checks the same corpus) from the
pieces that decide where and how a connection goes: ``Host`` and ``Match`` blocks with
wildcards, negations and case differences, ``Include``, ``%`` tokens, ``HostKeyAlias``,
``ProxyJump`` chains, and every keyword the executor uses. For each configuration and host
name, what `paramiko_executor.options` resolves must equal what ``ssh -G`` prints, or ssh and
the library must both refuse the configuration. ``ssh -G`` needs no network.

The deliberate differences (docs/design/openssh-differences.rst) are encoded here, each by
name: `DELIBERATE`.
"""

from __future__ import annotations

import os
import pwd
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from paramiko_executor import options, sshconfig
from testsupport import oracle

pytestmark = pytest.mark.skipif(not oracle.available(), reason="OpenSSH client not installed")

SEED = 19
CONFIGS = 120
NAMES_PER_CONFIG = 6

#: Host names asked about: case variants, dotted names, addresses, names the patterns hit.
NAMES = ["web1", "Web1", "WEB1", "web12", "db", "DB", "db.example.com", "Db.Example.Com",
         "10.0.0.5", "alpha", "beta.internal", "bastion", "gw", "proddb", "ProdDB", "x"]
PATTERNS = ["web1", "Web1", "web*", "WEB*", "db", "DB", "*.example.com", "*.Example.Com", "db?",
            "*", "?", "alpha", "beta.*", "10.0.0.*", "bastion", "gw", "proddb", "ProdDB",
            "[ab]", "x", "web1,db"]
USERS = ["bob", "alice", "Bob", "root"]
#: What ssh -G lists when no IdentityFile applies.
DEFAULT_IDENTITIES = [f"~/.ssh/id_{kind}" for kind in (
    "rsa", "ecdsa", "ecdsa_sk", "ed25519", "ed25519_sk", "xmss", "dsa")]

#: The deliberate differences, by the name docs/design/openssh-differences.rst gives them.
DELIBERATE = {
    "relative-known-hosts": "a relative UserKnownHostsFile is refused (ssh would use the "
                            "working directory, and accept-new would create it there)",
    "unknown-keyword": "a keyword the library does not know is ignored (ssh refuses it)",
    "home": "~ and %d are $HOME (ssh uses the password database's home directory)",
    "jump-loop": "a ProxyJump chain that comes back to one of its hosts is refused at once "
                 "(ssh -G prints it; ssh fails only when it connects)",
}


def _pick(rng: random.Random, items: List[str], low: int = 1, high: int = 3) -> List[str]:
    return rng.sample(items, rng.randint(low, min(high, len(items))))


def _case(rng: random.Random, keyword: str) -> str:
    return rng.choice([keyword, keyword.lower(), keyword.upper()])


def _setting(rng: random.Random, base: Path) -> str:
    """One keyword line with a value ssh accepts (mostly) or refuses (sometimes)."""
    kind = rng.randrange(12)
    if kind == 0:
        value = rng.choice(["real.example.com", "%h.example.com", "%h", "10.9.8.7", "Upper.%h",
                            "a%%b", "%h-%%"])
        keyword = "HostName"
    elif kind == 1:
        value, keyword = rng.choice(USERS), "User"
    elif kind == 2:
        value, keyword = rng.choice(["2222", "22", "ssh", "0", "70000", "http"]), "Port"
    elif kind == 3:
        value = rng.choice([f"{base}/id_%h", f"{base}/id_%r_%p", f'"{base}/with space"',
                            "~/.ssh/id_x", f"{base}/id_a", f"{base}/id_%n_%%"])
        keyword = "IdentityFile"
    elif kind == 4:
        value = rng.choice(["bastion", "u@gw:2200", "gw,bastion", "none", "ssh://u@gw:23",
                            "alice@bastion,u@gw", "[gw]:2201", "gw # comment"])
        keyword = "ProxyJump"
    elif kind == 5:
        value = rng.choice(["nc %h %p", "none", "ssh -W %h:%p gw", "connect '%n' %r",
                            "relay %k %%"])
        keyword = "ProxyCommand"
    elif kind == 6:
        value, keyword = rng.choice(["ProdDB", "alias1", "Web-Key", "none"]), "HostKeyAlias"
    elif kind == 7:
        value = rng.choice(["yes", "no", "ask", "accept-new", "off", "true", "false", "Yes",
                            "ACCEPT-NEW", "maybe"])
        keyword = "StrictHostKeyChecking"
    elif kind == 8:
        value = rng.choice([f"{base}/kh_%h_%p", f"{base}/kh1 {base}/kh2", "none", "~/kh_%n",
                            "%d/kh_%r_%u_%k_%C_%L_%l_%i", f'"{base}/k h"', "relative_kh",
                            f"{base}/kh_%%_%n"])
        keyword = "UserKnownHostsFile"
    elif kind == 9:
        value = rng.choice(["30", "1m", "1m30s", "0", "2H", "bad", "10x"])
        keyword = "ServerAliveInterval"
    elif kind == 10:
        value, keyword = rng.choice(["5", "0", "-1", "x"]), "ServerAliveCountMax"
    else:
        value, keyword = rng.choice(["yes", "no"]), "HashKnownHosts"
    separator = rng.choice([" ", " ", "=", " = ", "\t"])
    return f"    {_case(rng, keyword)}{separator}{value}\n"


def _header(rng: random.Random) -> str:
    if rng.random() < 0.6:
        patterns = _pick(rng, PATTERNS)
        if rng.random() < 0.3:
            patterns.append("!" + rng.choice(PATTERNS))
        return f"{_case(rng, 'Host')} {' '.join(patterns)}\n"
    criteria = []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["host", "originalhost", "user", "!host", "localuser", "Host"])
        values = ",".join(_pick(rng, USERS if "user" in kind else PATTERNS, 1, 2))
        if rng.random() < 0.2:
            values += ",!" + rng.choice(PATTERNS)
        criteria.append(f"{kind} {values}")
    if rng.random() < 0.1:
        criteria = ["all"]
    elif rng.random() < 0.08:
        criteria.append("final")
    return f"{_case(rng, 'Match')} {' '.join(criteria)}\n"


def generate(rng: random.Random, base: Path, index: int) -> str:
    """One configuration file (and the files it includes), written under ``base``."""
    text = ""
    for block in range(rng.randint(1, 5)):
        if block or rng.random() < 0.7:
            text += _header(rng)
        for _ in range(rng.randint(1, 4)):
            text += _setting(rng, base)
        if rng.random() < 0.15:
            included = base / f"include_{index}_{block}"
            included.write_text(_header(rng) + _setting(rng, base) + _setting(rng, base))
            text += f"    Include {included}\n"
        if rng.random() < 0.03:
            text += "    NoSuchKeyword yes\n"
    return text


# -- what each side says ---------------------------------------------------------------------


def library(config: str, host: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """What the library resolves, in ``ssh -G``'s terms; (None, why) if it refuses."""
    try:
        files = options.load_ssh_config([config])
        raw = files.lookup(host)
        target = options.resolve_target({"hostname": host}, config=[config])
    except ValueError as exc:
        return None, str(exc)
    policy = target.host_keys
    strict = "false" if not policy.strict else "accept-new" if policy.accept_new else "true"
    identity = raw.get("identityfile") or []
    jump = raw.get("proxyjump")
    proxy_command = raw.get("proxycommand")
    return {
        "hostname": [target.hostname],
        "user": [target.credentials.username],
        "port": [str(target.port)],
        "identityfile": list(identity),  # ssh -G prints them unexpanded
        "proxyjump": [] if jump in (None, "none") else hops(str(jump)),
        "proxycommand": [] if proxy_command in (None, "none") else [str(proxy_command)],
        "hostkeyalias": [policy.host_key_alias] if policy.host_key_alias else [],
        "stricthostkeychecking": [strict],
        "userknownhostsfile": [" ".join(policy.files or ())],
        "globalknownhostsfile": [" ".join(policy.global_files)],
        "hashknownhosts": ["yes" if policy.hash_known_hosts else "no"],
        "serveraliveinterval": [str(int(target.keepalive_interval or 0))],
        "serveralivecountmax": [str(target.keepalive_count_max)],
        "jump": jump_chain(target),
    }, ""


def hops(spec: str) -> List[Tuple[Optional[str], str, Optional[int]]]:
    """A ProxyJump value as (user, host, port) hops: ssh -G rewrites the last one."""
    return [sshconfig.split_jump(hop) for hop in spec.split(",")]


def jump_chain(target: options.Target) -> List[Tuple[str, str, int]]:
    """The hops of a ProxyJump chain, first hop first, as the library resolved them."""
    hops = []
    jump = target.jump
    while jump is not None:
        hops.append((jump.hostname, jump.credentials.username, jump.port))
        jump = jump.jump
    return hops[::-1]


def openssh(config: str, host: str, home: str, user: Optional[str] = None,
            port: Optional[int] = None) -> Tuple[Optional[Dict[str, Any]], str]:
    """What ``ssh -G`` prints, in the shape of `library`; (None, why) if it refuses."""
    resolved, err = oracle.resolve(config, host, home, user=user, port=port)
    if resolved is None:
        return None, err
    pw_dir = pwd.getpwuid(os.getuid()).pw_dir
    result = {key: resolved.get(key, []) for key in (
        "hostname", "user", "port", "identityfile", "proxyjump", "proxycommand", "hostkeyalias",
        "stricthostkeychecking", "globalknownhostsfile", "hashknownhosts",
        "serveraliveinterval", "serveralivecountmax")}
    result["proxyjump"] = hops(result["proxyjump"][0]) if result["proxyjump"] else []
    if result["stricthostkeychecking"] == ["ask"]:
        result["stricthostkeychecking"] = ["true"]  # never prompts: ask is yes here
    if result["identityfile"] == DEFAULT_IDENTITIES:
        result["identityfile"] = []  # none configured: the library lets paramiko find keys
    # DELIBERATE["home"]: ~ and %d are $HOME here, the password database's home in ssh.
    result["userknownhostsfile"] = [" ".join(
        home + path[len(pw_dir):] if path.startswith(pw_dir + "/") else path
        for path in " ".join(resolved.get("userknownhostsfile", [])).split())]
    return result, err


# -- the differential test ---------------------------------------------------------------------


def _corpus(base: Path) -> List[Tuple[str, str, str]]:
    rng = random.Random(SEED)
    corpus = []
    for index in range(CONFIGS):
        text = generate(rng, base, index)
        path = base / f"config_{index}"
        path.write_text(text)
        for host in rng.sample(NAMES, NAMES_PER_CONFIG):
            corpus.append((str(path), host, text))
    return corpus


def _deliberate(text: str, theirs: Optional[Dict[str, Any]], ours: Optional[Dict[str, Any]],
                our_error: str, their_error: str) -> Optional[str]:
    """Which listed difference explains a disagreement, if one does."""
    if ours is None and theirs is not None and "relative path" in our_error:
        return "relative-known-hosts"
    if ours is None and theirs is not None and "ProxyJump loops back" in our_error:
        return "jump-loop"
    if theirs is None and ours is not None and "Bad configuration option" in their_error \
            and "NoSuchKeyword" in text:
        return "unknown-keyword"
    return None


@pytest.mark.hang_timeout(300)
def test_ssh_config_resolution_matches_ssh_G(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    base = tmp_path / "files"
    base.mkdir()
    corpus = _corpus(base)
    disagreements = []
    explained: Dict[str, int] = {}
    compared = 0
    for config, host, text in corpus:
        ours, our_error = library(config, host)
        theirs, their_error = openssh(config, host, str(home))
        if ours is not None:
            ours.pop("jump")
        if (ours is None) != (theirs is None) or (ours is not None and ours != theirs):
            reason = _deliberate(text, theirs, ours, our_error, their_error)
            if reason is not None:
                explained[reason] = explained.get(reason, 0) + 1
                continue
            diff = ({k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
                    if ours is not None and theirs is not None else
                    {"library": our_error or "accepts", "ssh": their_error.strip() or "accepts"})
            disagreements.append(f"{host!r} in\n{text}\n-> {diff}")
        else:
            compared += 1
    print(f"{len(corpus)} cases ({CONFIGS} configs x {NAMES_PER_CONFIG} names): "
          f"{compared} agree, deliberate differences: {explained}")
    assert not disagreements, f"{len(disagreements)} disagreements; first:\n" + \
        "\n\n".join(disagreements[:int(os.environ.get("ORACLE_SHOW", "5"))])
