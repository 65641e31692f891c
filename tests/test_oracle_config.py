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
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from paramiko_executor import options, sshconfig
from testsupport import oracle

pytestmark = pytest.mark.usefixtures("openssh_client")

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
    "hostname-from-config": "a HostName from ssh_config is checked like a host name given "
                            "to the library (ssh checks only names on its command line)",
    "jump-loop": "a ProxyJump chain that comes back to one of its hosts is refused at once "
                 "(ssh -G prints it; ssh fails only when it connects)",
}


def _pick(rng: random.Random, items: List[str], low: int = 1, high: int = 3) -> List[str]:
    return rng.sample(items, rng.randint(low, min(high, len(items))))


def _case(rng: random.Random, keyword: str) -> str:
    return rng.choice([keyword, keyword.lower(), keyword.upper()])


def _values(base: Path) -> Dict[str, Tuple[List[str], List[str]]]:
    """keyword -> (values ssh accepts, values ssh refuses or the library refuses)."""
    return {
        "HostName": (["real.example.com", "%h.example.com", "%h", "10.9.8.7", "Upper.%h",
                      "a%%b", "%h-%%", '"quoted.example.com"', "FE80::1",
                      "real.example.com # comment"],
                     ["%x", "bad;name", '""', "two words", "a,b*"]),
        "User": (USERS + ['"bob"', "bob # comment", "b\\'ob", '"two words"'],
                 ["two words", '""']),
        "Port": (["2222", "22", "ssh", "2200"], ["0", "70000", "http-nope", "22 23"]),
        "IdentityFile": ([f"{base}/id_%h", f"{base}/id_%r_%p", f'"{base}/with space"',
                          "~/.ssh/id_x", f"{base}/id_a", f"{base}/id_%n_%%"],
                         [f"{base}/a {base}/b"]),
        "ProxyJump": (["bastion", "u@gw:2200", "gw,bastion", "none", "ssh://u@gw:23",
                       "alice@bastion,u@gw", "[gw]:2201", "gw # comment", "NONE"],
                      ["gw:0", "@gw", "gw:x"]),
        "ProxyCommand": (["nc %h %p", "none", "ssh -W %h:%p gw", "connect '%n' %r",
                          "relay %k %%"], []),
        "HostKeyAlias": (["ProdDB", "alias1", "Web-Key", "none"], ["a b", '""']),
        "StrictHostKeyChecking": (["yes", "no", "ask", "accept-new", "off", "true", "false",
                                   "Yes", "ACCEPT-NEW"], ["maybe", "1"]),
        "UserKnownHostsFile": ([f"{base}/kh_%h_%p", f"{base}/kh1 {base}/kh2", "none",
                                "~/kh_%n", "%d/kh_%r_%u_%k_%C_%L_%l_%i", f'"{base}/k h"',
                                f"{base}/kh_%%_%n", "NONE"],
                               ["relative_kh", f"{base}/a none", f"{base}/%j"]),
        "ServerAliveInterval": (["30", "1m", "1m30s", "0", "2H", "+5"], ["bad", "10x", "-1"]),
        "ServerAliveCountMax": (["5", "0", "3"], ["-1", "x"]),
        "HashKnownHosts": (["yes", "no", "Yes"], ["maybe"]),
        "Include": (["/nonexistent/*", "missing_relative", "~/.ssh/inc_*"], []),
    }


def _setting(rng: random.Random, base: Path) -> str:
    """One keyword line: a value ssh accepts, or now and then one that it refuses."""
    keyword, (good, bad) = rng.choice(sorted(_values(base).items()))
    value = rng.choice(bad if bad and rng.random() < 0.04 else good)
    separator = rng.choice([" ", " ", "=", " = ", "\t"])
    return f"    {_case(rng, keyword)}{separator}{value}\n"


def _header(rng: random.Random) -> str:
    if rng.random() < 0.6:
        patterns = _pick(rng, PATTERNS)
        if rng.random() < 0.3:
            patterns.append("!" + rng.choice(PATTERNS))
        if rng.random() < 0.1:
            patterns[0] = f'"{patterns[0]}"'
        if rng.random() < 0.1:
            patterns.append("# comment")
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
    elif rng.random() < 0.15:
        criteria.append(rng.choice(["final", "canonical", "!final"]))
    return f"{_case(rng, 'Match')} {' '.join(criteria)}\n"


def generate(rng: random.Random, base: Path, home: Path, index: int) -> str:
    """One configuration file (and the files it includes), written under ``base``."""
    if index == 0:  # what "Include ~/.ssh/inc_*" finds, for every configuration
        for name in ("inc_a", "inc_b"):
            (home / ".ssh" / name).write_text(_header(rng) + _setting(rng, base))
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
        if rng.random() < 0.01:
            text += "    NoSuchKeyword yes\n"
    return text


# -- what each side says ---------------------------------------------------------------------


def library(config: str, host: str, user: Optional[str] = None
            ) -> Tuple[Optional[Dict[str, Any]], str]:
    """What the library resolves, in ``ssh -G``'s terms; (None, why) if it refuses.

    ``user`` is the explicit ``username`` parameter (ssh's ``-l``).
    """
    parameters = {"hostname": host} if user is None else {"hostname": host, "username": user}
    try:
        files = options.load_ssh_config([config])
        raw = files.lookup(host, user=user)
        target = options.resolve_target(parameters, config=[config])
    except ValueError as exc:
        return None, str(exc)
    policy = target.host_keys
    strict = "false" if not policy.strict else "accept-new" if policy.accept_new else "true"
    identity = raw.words("identityfile") or []
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
    result: Dict[str, Any] = {key: resolved.get(key, []) for key in (
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
    if result["userknownhostsfile"] == ["none"]:
        result["userknownhostsfile"] = [""]
    return result, err


def openssh_chain(config: str, spec: List[Tuple[Optional[str], str, Optional[int]]],
                  home: str) -> Optional[List[Tuple[str, str, int]]]:
    """Each hop as ssh resolves it for ``ssh -l USER -p PORT HOP`` (how ssh runs a hop)."""
    chain = []
    for user, host, port in spec:
        resolved, _ = oracle.resolve(config, host, home, user=user, port=port)
        if resolved is None:
            return None  # the hop itself is refused: the library refuses the whole target
        chain.append((resolved["hostname"][0], resolved["user"][0], int(resolved["port"][0])))
    return chain


# -- the differential test ---------------------------------------------------------------------


def _corpus(base: Path, home: Path) -> List[Tuple[str, str, Optional[str], str]]:
    """(config, host, explicit user or None, config text) for every case."""
    rng = random.Random(SEED)
    corpus = []
    for index in range(CONFIGS):
        text = generate(rng, base, home, index)
        path = base / f"config_{index}"
        path.write_text(text)
        for host in rng.sample(NAMES, NAMES_PER_CONFIG):
            user = rng.choice(USERS) if rng.random() < 0.25 else None
            corpus.append((str(path), host, user, text))
    return corpus


def _deliberate(text: str, theirs: Optional[Dict[str, Any]], ours: Optional[Dict[str, Any]],
                our_error: str, their_error: str) -> Optional[str]:
    """Which listed difference explains a disagreement, if one does."""
    if ours is None and theirs is not None and "relative path" in our_error:
        return "relative-known-hosts"
    if ours is None and theirs is not None and our_error.startswith("HostName of"):
        return "hostname-from-config"
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
    corpus = _corpus(base, home)
    disagreements = []
    explained: Dict[str, int] = {}
    compared = refused = hops_compared = 0
    for config, host, user, text in corpus:
        ours, our_error = library(config, host, user)
        theirs, their_error = openssh(config, host, str(home), user=user)
        if ours is not None and theirs is not None:
            ours_chain = ours.pop("jump")
            theirs["jump"] = openssh_chain(config, theirs["proxyjump"], str(home))
            ours["jump"] = ours_chain if theirs["jump"] is not None else None
            hops_compared += len(ours_chain)
        if (ours is None) != (theirs is None) or (ours is not None and ours != theirs):
            reason = _deliberate(text, theirs, ours, our_error, their_error)
            if reason is not None:
                explained[reason] = explained.get(reason, 0) + 1
                continue
            diff = ({k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
                    if ours is not None and theirs is not None else
                    {"library": our_error or "accepts", "ssh": their_error.strip() or "accepts"})
            disagreements.append(f"{host!r} (user {user!r}) in\n{text}\n-> {diff}")
        else:
            compared += 1
            refused += ours is None
    print(f"{len(corpus)} cases ({CONFIGS} configs x {NAMES_PER_CONFIG} names): "
          f"{compared} agree ({refused} of them refused by both; {hops_compared} ProxyJump "
          "hops resolved and compared), "
          f"deliberate differences: {explained}")
    assert not disagreements, f"{len(disagreements)} disagreements; first:\n" + \
        "\n\n".join(disagreements[:int(os.environ.get("ORACLE_SHOW", "5"))])


# -- ProxyJump chains: every hop resolved as ssh resolves it -----------------------------------


def _chain_config(rng: random.Random) -> str:
    """Targets t1..t3 reached through chains of hops h1..h4 that have settings of their own."""
    text = ""
    for target in ("t1", "t2", "t3"):
        hops = []
        for hop in rng.sample(["h1", "h2", "h3", "h4"], rng.randint(1, 3)):
            spec = hop
            if rng.random() < 0.4:
                spec = f"{rng.choice(USERS)}@{spec}"
            if rng.random() < 0.4:
                spec = f"{spec}:{rng.choice([22, 2200, 2222])}"
            if rng.random() < 0.1:
                spec = f"ssh://{spec}"
            hops.append(spec)
        text += f"Host {target}\n    ProxyJump {','.join(hops)}\n"
    for hop in ("h1", "h2", "h3", "h4"):
        text += f"{rng.choice(['Host', 'Match originalhost'])} {hop}\n"
        if rng.random() < 0.6:
            name = rng.choice(["%h.example.com", "Jump.Example.Com", "10.1.1.1"])
            text += f"    HostName {name}\n"
        if rng.random() < 0.5:
            text += f"    User {rng.choice(USERS)}\n"
        if rng.random() < 0.5:
            text += f"    Port {rng.choice([2022, 2023])}\n"
    if rng.random() < 0.5:
        text += f"Match user {rng.choice(USERS)}\n    Port 4022\n"
    return text + "Host *\n    User fallback\n"


@pytest.mark.hang_timeout(300)
def test_proxy_jump_chains_match_ssh(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rng = random.Random(SEED + 1)
    hops = 0
    for index in range(40):
        text = _chain_config(rng)
        config = tmp_path / f"chain_{index}"
        config.write_text(text)
        for target in ("t1", "t2", "t3"):
            ours, our_error = library(str(config), target)
            assert ours is not None, (our_error, text)
            theirs = openssh_chain(str(config), ours["proxyjump"], str(tmp_path))
            assert ours["jump"] == theirs, (target, text)
            hops += len(theirs or ())
    print(f"40 configs x 3 targets: {hops} hops compared")


# -- ProxyCommand: the command ssh runs, with its tokens --------------------------------------

RECORDER = """#!/bin/sh
out=$1
shift
printf '%s\\n' "$@" > "$out"
exit 1
"""


@pytest.mark.hang_timeout(300)
def test_proxy_command_tokens_match_what_ssh_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recorder = tmp_path / "record"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    rng = random.Random(SEED + 2)
    arguments = ["%h", "%n", "%p", "%r", "%k", "%%", "'%h quoted'", "~/x", "a~b", "%h:%p",
                 "x%%h"]
    for index in range(25):
        out = tmp_path / f"out_{index}"
        words = " ".join(rng.sample(arguments, rng.randint(2, 6)))
        host = rng.choice(["Web1", "db.example.com", "10.0.0.5", "ProdDB"])
        text = f"Host {host}\n    ProxyCommand {recorder} {out} {words}\n"
        for keyword, values in (("HostName", ["Real.Example.Com", "%h.internal", "10.2.2.2"]),
                                ("User", USERS), ("Port", ["2222", "22"]),
                                ("HostKeyAlias", ["ProdDB", "key1"])):
            if rng.random() < 0.5:
                text += f"    {keyword} {rng.choice(values)}\n"
        config = tmp_path / f"config_{index}"
        config.write_text(text)
        target = options.resolve_target({"hostname": host}, config=[str(config)])
        ours = shlex.split(target.proxy_command)[2:]
        status, err = oracle.login(str(config), host, str(tmp_path))
        assert status == 255
        theirs = out.read_text().splitlines()
        assert ours == theirs, (text, err)


# -- named cases: each a disagreement the corpus found with paramiko.SSHConfig ------------------

NAMED = {
    "ProxyCommand before ProxyJump wins": "Host *\n    ProxyCommand nc %h %p\n    ProxyJump gw\n",
    "ProxyJump none leaves ProxyCommand": "Host *\n    ProxyJump none\n    ProxyCommand nc %h\n",
    "ServerAliveInterval in minutes": "Host *\n    ServerAliveInterval 1m30s\n",
    "StrictHostKeyChecking false": "Host *\n    StrictHostKeyChecking false\n",
    "%% in HostName": "Host *\n    HostName a%%b.%h\n",
    "host name lower-cased": "Host *\n    HostName Real.Example.COM\n",
    "'[' is literal in Host": "Host [ab]\n    User bracket\nHost *\n    User star\n",
    "Host is case-sensitive": "Host WEB1\n    User upper\n",
    "Match host is not": "Match host WEB1\n    User upper\n",
    "HostKeyAlias none is a name": "Host *\n    HostKeyAlias none\n",
    "Port by service name": "Host *\n    Port ssh\n",
    "%k and %n in known hosts": "Host *\n    HostKeyAlias Box\n    UserKnownHostsFile /k/%k_%n\n",
    "quoted User with a space": 'Host *\n    User "two words"\n',
    "comment after a value": "Host *\n    User bob # the admin\n",
    "bad Port in a block that does not apply": "Host nomatch\n    Port 0\n",
    "Include applies inline": "Include {base}/inc\n",
    "Include in an inactive block": "Host nomatch\n    Include {base}/inc\nHost *\n    User x\n",
    "Match exec with tokens": 'Match exec "test %h = web1 -a %n = %n"\n    User execd\n',
    "Match final sees HostName": "Host *\n    HostName final.example\nMatch final host final.*\n"
                                 "    User finalist\n",
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_cases_match_ssh_G(name, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "inc").write_text("Host *\n    User included\n    Port 2022\n")
    config = tmp_path / "config"
    config.write_text(NAMED[name].format(base=tmp_path))
    for host in ("web1", "WEB1", "a", "Db.Example.Com"):
        ours, our_error = library(str(config), host)
        theirs, their_error = openssh(str(config), host, str(home))
        if ours is not None:
            ours.pop("jump")
        assert ours == theirs, (host, our_error, their_error)


def test_world_writable_include_is_refused_as_by_ssh(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    included = tmp_path / "inc"
    included.write_text("Host *\n    User included\n")
    included.chmod(0o666)
    config = tmp_path / "config"
    config.write_text(f"Include {included}\n")
    theirs, err = openssh(str(config), "web1", str(tmp_path))
    assert theirs is None and "Bad owner or permissions" in err
    with pytest.raises(ValueError, match="bad owner or permissions"):
        options.resolve_target({"hostname": "web1"}, config=[str(config)])
