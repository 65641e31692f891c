"""ssh_config files read the way OpenSSH's ``ssh`` reads them (its readconf.c, OpenSSH 9.x).

:func:`load` parses the files once (their syntax checked at once, errors naming the file);
:meth:`SSHConfigFiles.lookup` then walks them for one host as ``ssh`` does: ``Host`` and
``Match`` blocks, ``Include`` (globbed when looked up, as ssh does), the first value of a
keyword wins, ``IdentityFile`` and the known-hosts files accumulate, ``ProxyJump`` and
``ProxyCommand`` exclude each other (whichever comes first), and a ``Match final`` (or
``CanonicalizeHostname``) block triggers ssh's second pass. Values are checked as ssh checks
them, even in blocks that do not apply: a bad ``Port`` anywhere makes the file invalid.

It replaces ``paramiko.SSHConfig``, which differs from ssh where it matters for trust: no
``Include``, ``fnmatch`` patterns (``[`` is a character class), both ``ProxyJump`` and
``ProxyCommand`` kept, quotes stripped only around a whole value, ``~`` replaced anywhere in
a value, ``%%`` not understood. The tests compare this module with ``ssh -G`` over generated
configurations (tests/test_oracle_config.py).

Keywords this module does not know are kept (first value wins) but never checked: ssh
refuses an unknown keyword, this module does not, so a file written for a newer ssh still
works. Host-name canonicalisation (``CanonicalizeHostname``) is not done.
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import os
import re
import socket
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .hostnames import expand_tokens, match_pattern, match_pattern_list

try:
    import pwd
except ImportError:  # not on Windows: there the environment is all there is
    pwd = None  # type: ignore[assignment]

__all__ = [
    "ConfigError",
    "HostConfig",
    "SSHConfigFiles",
    "convtime",
    "load",
    "local_user",
    "split_arguments",
    "split_jump",
]

#: Separators of words in ssh_config (OpenSSH's WHITESPACE).
_WHITESPACE = " \t\r\n"
#: ssh's READCONF_MAX_DEPTH: how deeply ``Include`` may nest.
MAX_INCLUDE_DEPTH = 16
#: Seconds a ``Match exec`` command may run (ssh waits for ever; a connect must not).
EXEC_TIMEOUT = 60.0

_STRINGS = ("hostname", "user", "hostkeyalias", "revokedhostkeys")
_LISTS = ("userknownhostsfile", "globalknownhostsfile")
_STRICT = {"yes": "true", "true": "true", "no": "false", "false": "false", "off": "false",
           "ask": "ask", "accept-new": "accept-new"}
_FLAGS = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
#: The keywords this module checks, spelled as ssh_config(5) spells them (for messages).
_KNOWN = {name.lower(): name for name in (
    "Host", "Match", "Include", "HostName", "User", "Port", "IdentityFile", "ProxyCommand",
    "ProxyJump", "HostKeyAlias", "StrictHostKeyChecking", "UserKnownHostsFile",
    "GlobalKnownHostsFile", "RevokedHostKeys", "HashKnownHosts", "ServerAliveInterval",
    "ServerAliveCountMax")}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MATCH_CRITERIA = ("all", "canonical", "final", "exec", "host", "originalhost", "user",
                   "localuser")


class ConfigError(ValueError):
    """An ssh_config file that ssh would refuse; the text names the file and line."""


def split_arguments(text: str) -> List[str]:
    """The words of an ssh_config value, as OpenSSH's ``argv_split`` finds them.

    Words are separated by spaces and tabs; ``"..."`` and ``'...'`` quote; a backslash
    escapes a quote, a backslash or (outside quotes) a space, and is kept before anything
    else; an unquoted ``#`` at the start of a word ends the line. Unbalanced quotes are a
    ``ValueError``.
    """
    words: List[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        word: List[str] = []
        quote = ""
        while i < n:
            char = text[i]
            if char == "\\" and i + 1 < n and (
                text[i + 1] in "'\"\\" or (not quote and text[i + 1] == " ")
            ):
                word.append(text[i + 1])
                i += 2
                continue
            if not quote and char in " \t":
                break
            if not quote and char in "\"'":
                quote = char
            elif quote and char == quote:
                quote = ""
            else:
                word.append(char)
            i += 1
        if quote:
            raise ValueError("unbalanced quotes")
        words.append("".join(word))
    return words


def convtime(text: str) -> int:
    """OpenSSH's time format (``90``, ``1m30s``, ``2h``...) in seconds; ``ValueError`` if bad."""
    if not re.fullmatch(r"(\+?\d+[smhdwSMHDW]?)+", text):
        raise ValueError(f"invalid time value {text!r}")
    total = sum(int(number) * _TIME_UNITS[unit.lower()]
                for number, unit in re.findall(r"\+?(\d+)([smhdwSMHDW]?)", text))
    if total > 2**31 - 1:
        raise ValueError(f"time value {text!r} is too large")
    return total


def _connect_name(name: str) -> str:
    """The name ssh connects to: lower-cased, unless it looks like an address.

    ssh's ``is_addr_fast``: a name with ``%`` or ``:`` (an IPv6 address, maybe with a
    scope) or only digits and dots is an address and keeps its case.
    """
    if "%" in name or ":" in name or not name.strip("0123456789."):
        return name
    return name.lower()


def _a2port(text: str) -> int:
    """OpenSSH's ``a2port``: a number 1-65535 or a service name; -1 if neither."""
    if text.isdigit():
        port = int(text)
        return port if 0 < port <= 65535 else -1
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return -1


@dataclass
class _Line:
    keyword: str
    rest: str  # the text after the keyword (and the one '=' or whitespace after it)
    args: List[str]
    where: str


@dataclass
class HostConfig:
    """The configuration of one host after ssh's passes; values are the raw texts.

    ``options`` maps lower-case keywords to their first value; ``lists`` holds the
    keywords with several words (``identityfile``, which accumulates, and
    ``userknownhostsfile``, ``globalknownhostsfile``). ``hostname`` is the name ssh would connect
    to and print (``HostName`` with ``%h`` expanded, else the host as given; lower-cased
    unless it looks like an address, see :func:`_connect_name`).
    """

    host_arg: str
    hostname: str
    options: Dict[str, str] = field(default_factory=dict)
    lists: Dict[str, List[str]] = field(default_factory=dict)

    def get(self, keyword: str, default: Optional[str] = None) -> Optional[str]:
        """The value of a one-word keyword, ``default`` if no block set it."""
        return self.options.get(keyword, default)

    def words(self, keyword: str) -> Optional[List[str]]:
        """The words of a list keyword, None if no block set it."""
        return self.lists.get(keyword)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.options or keyword in self.lists


class _Pass:
    """One reading of the files for one host (ssh reads them twice for ``Match final``)."""

    def __init__(self, files: SSHConfigFiles, host: str, host_arg: str, local_user: str,
                 options: Dict[str, str], lists: Dict[str, List[str]], final: bool) -> None:
        self.files = files
        self.host = host
        self.host_arg = host_arg
        self.local_user = local_user
        self.options = options
        self.lists = lists
        self.final = final
        self.want_final = False

    def read(self, lines: Sequence[_Line], depth: int, nevermatch: bool) -> None:
        active = not nevermatch
        for line in lines:
            active = self.line(line, active, depth, nevermatch)

    def line(self, line: _Line, active: bool, depth: int, nevermatch: bool) -> bool:
        keyword, args, options = line.keyword, list(line.args), self.options
        if keyword == "host":
            return self.host_line(line, nevermatch)
        if keyword == "match":
            matched = self.match_line(line)
            return False if nevermatch else matched
        if keyword == "include":
            self.include(line, active, depth)
            return active
        if keyword == "proxycommand":
            # A ProxyJump (not "none") before it has set ProxyCommand to "none" already.
            if active and "proxycommand" not in options:
                options["proxycommand"] = line.rest
            return active
        if keyword == "proxyjump":
            self.proxy_jump(line, active)
            return active
        if keyword in _STRINGS or keyword in ("port", "serveraliveinterval",
                                              "serveralivecountmax", "stricthostkeychecking",
                                              "hashknownhosts", "identityfile"):
            value = self.single(line)
            if keyword == "identityfile":
                files = self.lists.setdefault("identityfile", [])
                if active and value not in files:
                    files.append(value)
            elif active and keyword not in options:
                options[keyword] = value
            return active
        if keyword in _LISTS:
            for i, arg in enumerate(args):
                if not arg:
                    raise self.files.error(line, "empty argument")
                if arg.lower() == "none" and (i > 0 or len(args) > 1):
                    raise self.files.error(line, '"none" must appear alone')
            if active and keyword not in self.lists:
                self.lists[keyword] = args
            return active
        if active and keyword not in options:
            options[keyword] = line.rest
            if keyword == "canonicalizehostname" and line.rest.lower() in ("yes", "always"):
                self.want_final = True
        return active

    def single(self, line: _Line) -> str:
        """The one argument of ``line``, checked as ssh checks its keyword."""
        if len(line.args) != 1:
            raise self.files.error(line, "takes exactly one argument")
        (value,) = line.args
        keyword = line.keyword
        if keyword != "identityfile" and not value:
            raise self.files.error(line, "empty argument")
        if keyword == "port":
            port = _a2port(value)
            if port <= 0:
                raise self.files.error(line, "bad port")
            return str(port)
        if keyword == "serveraliveinterval":
            try:
                return str(convtime(value))
            except ValueError:
                raise self.files.error(line, "invalid time value") from None
        if keyword == "serveralivecountmax":
            if not re.fullmatch(r"\+?\d+", value) or int(value) > 2**31 - 1:
                raise self.files.error(line, "not a number")
            return str(int(value))
        if keyword == "stricthostkeychecking":
            if value.lower() not in _STRICT:
                raise self.files.error(line, "unsupported value")
            return _STRICT[value.lower()]
        if keyword == "hashknownhosts":
            if value.lower() not in _FLAGS:
                raise self.files.error(line, "unsupported value")
            return _FLAGS[value.lower()]
        return value

    def host_line(self, line: _Line, nevermatch: bool) -> bool:
        active = False
        for arg in line.args:
            if not arg:
                raise self.files.error(line, "empty argument")
            if nevermatch:
                break
            negated = arg.startswith("!")
            if match_pattern(self.host, arg[1:] if negated else arg):
                if negated:
                    return False
                active = True
        return active

    def match_line(self, line: _Line) -> bool:
        """Whether every criterion of a ``Match`` line holds (ssh's ``match_cfg_line``)."""
        args = list(line.args)
        options = self.options
        port = options.get("port", "22")
        ruser = options.get("user", self.local_user)
        if self.final:
            host = options.get("hostname", self.host)
        elif "hostname" in options:
            host = expand_tokens(options["hostname"], {"h": self.host_arg}, "HostName")
        else:
            host = self.host_arg
        result = True
        count = 0
        while args:
            attribute = args.pop(0)
            count += 1
            negate = attribute.startswith("!")
            name = (attribute[1:] if negate else attribute).lower()
            if name not in _MATCH_CRITERIA:
                raise self.files.error(line, f"unsupported Match attribute {attribute!r}")
            if name == "all":
                if count != 1 or args and not (len(args) == 1 and args[0].lower() in
                                                ("canonical", "final")):
                    raise self.files.error(line, "'all' cannot be combined with other criteria")
                if negate:
                    result = False
                continue
            if name in ("canonical", "final"):
                if name == "final":
                    self.want_final = True
                if self.final == negate:
                    result = False
                continue
            if not args or not args[0] or args[0].startswith("#"):
                raise self.files.error(line, f"Match {name} needs an argument")
            argument = args.pop(0)
            if name == "exec":
                if result:
                    matched = self.exec(argument, host, port, ruser, line)
                    if matched == negate:
                        result = False
                continue
            if name in ("host", "originalhost"):
                value = match_pattern_list(host if name == "host" else self.host_arg,
                                           argument, lower=True)
            else:
                value = match_pattern_list(ruser if name == "user" else self.local_user,
                                           argument, lower=False)
            if (value == 1) == negate:
                result = False
        if count == 0:
            raise self.files.error(line, "Match needs criteria")
        return result

    def exec(self, command: str, host: str, port: str, ruser: str, line: _Line) -> bool:
        """``Match exec``: run the command through ``/bin/sh``; true if it exits 0."""
        tokens = self.files.tokens(host=host, host_arg=self.host_arg, port=port, user=ruser,
                                   alias=self.options.get("hostkeyalias", self.host_arg))
        expanded = expand_tokens(command, tokens, "Match exec")
        try:
            done = subprocess.run(["/bin/sh", "-c", expanded], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, timeout=EXEC_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise self.files.error(line, f"Match exec ran longer than {EXEC_TIMEOUT:g} s") \
                from None
        except OSError as exc:
            raise self.files.error(line, f"Match exec cannot run ({exc.strerror})") from None
        return done.returncode == 0

    def include(self, line: _Line, active: bool, depth: int) -> None:
        if depth >= MAX_INCLUDE_DEPTH:
            raise self.files.error(line, "too many nested Include files")
        for arg in line.args:
            if not arg:
                raise self.files.error(line, "empty argument")
            if not arg.startswith(("/", "~")):
                arg = os.path.join("~/.ssh", arg)  # user configuration: relative to ~/.ssh
            for path in sorted(glob.glob(os.path.expanduser(arg))):
                lines = self.files.read(path, check_permissions=True, missing_ok=True)
                if lines is not None:
                    self.read(lines, depth + 1, nevermatch=not active)

    def proxy_jump(self, line: _Line, active: bool) -> None:
        """``ProxyJump``: checked as ssh checks it; kept unless a proxy was already chosen."""
        if not line.args:
            raise self.files.error(line, "missing argument")
        value = line.rest.split("#", 1)[0].rstrip()
        if value.lower() != "none":
            for hop in value.split(","):
                try:
                    split_jump(hop)
                except ValueError:
                    raise self.files.error(line, "invalid ProxyJump") from None
        if active and "proxycommand" not in self.options and "proxyjump" not in self.options:
            if value.lower() == "none":
                self.options["proxyjump"] = "none"  # a later ProxyCommand still applies
            else:
                self.options["proxyjump"] = value
                self.options["proxycommand"] = "none"


def split_jump(spec: str) -> Tuple[Optional[str], str, Optional[int]]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` of one ProxyJump hop."""
    if spec.startswith("ssh://"):
        spec = spec[len("ssh://"):]
        if spec.endswith("/"):
            spec = spec[:-1]
    user, at, hostport = spec.rpartition("@")
    if at and not user:
        raise ValueError(f"ProxyJump: empty user in {spec!r}")
    host, port_text = hostport, None
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"ProxyJump: cannot parse hop {spec!r}")
        port_text = rest[1:] if rest else None
    elif ":" in hostport:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"ProxyJump: cannot parse hop {spec!r}")
    port = None
    if port_text is not None:
        port = _a2port(port_text)
        if port <= 0:
            raise ValueError(f"ProxyJump: bad port in {spec!r}")
    return (user or None), host, port


class SSHConfigFiles:
    """The ssh_config files to consult, parsed; :meth:`lookup` resolves one host."""

    def __init__(self, local_user: str, local_host: str, home: str) -> None:
        self.local_user = local_user
        self.local_host = local_host
        self.home = home
        self.paths: List[str] = []
        self._files: List[List[_Line]] = []

    def error(self, line: _Line, problem: str) -> ConfigError:
        # The line itself is never quoted: an ssh_config may hold anything.
        return ConfigError(f"ssh_config {line.where}: {_KNOWN[line.keyword]}: {problem}")

    def read(self, path: str, *, check_permissions: bool, missing_ok: bool
             ) -> Optional[List[_Line]]:
        """The lines of one file; None if it is missing and ``missing_ok``.

        With ``check_permissions`` (the default ``~/.ssh/config`` and included files, as in
        ssh) a file another user owns or may write is refused.
        """
        try:
            with open(path, "rb") as stream:
                if check_permissions:
                    info = os.fstat(stream.fileno())
                    if (info.st_uid not in (0, os.getuid())
                            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                        raise ConfigError(f"ssh_config: bad owner or permissions on {path!r}")
                data = stream.read()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise ConfigError(f"ssh_config: cannot read {path!r}: file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"ssh_config: cannot read {path!r}: it is a directory") from None
        except OSError as exc:
            raise ConfigError(f"ssh_config: cannot read {path!r}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"ssh_config {path!r} is not a UTF-8 text file") from None
        lines = []
        for number, raw in enumerate(text.split("\n"), 1):
            line = _parse_line(raw, f"{path!r} line {number}")
            if line is not None:
                lines.append(line)
        return lines

    def add(self, path: str, *, default: bool = False) -> None:
        """Parse ``path`` and consult it after the files added before it."""
        lines = self.read(path, check_permissions=default, missing_ok=default)
        if lines is not None:
            self.paths.append(path)
            self._files.append(lines)

    def tokens(self, *, host: str, host_arg: str, port: str, user: str, alias: str
               ) -> Dict[str, str]:
        """OpenSSH's TOKENS for file names and ``Match exec`` (ssh_config(5))."""
        connection = hashlib.sha1((self.local_host + host + port + user).encode())
        return {
            "C": connection.hexdigest(),
            "L": self.local_host.split(".")[0],
            "i": str(os.getuid()),
            "k": alias,
            "l": self.local_host,
            "n": host_arg,
            "p": port,
            "d": self.home,
            "h": host,
            "r": user,
            "u": self.local_user,
        }

    def lookup(self, host_arg: str, *, user: Optional[str] = None,
               port: Optional[int] = None) -> HostConfig:
        """Resolve ``host_arg`` as ``ssh [-l user] [-p port] host_arg`` would.

        ``user`` and ``port`` are the caller's explicit values: they win over the files
        and ``Match user`` sees ``user``. Raises :class:`ConfigError` (a ``ValueError``).
        """
        options: Dict[str, str] = {}
        lists: Dict[str, List[str]] = {}
        if user is not None:
            options["user"] = user
        if port is not None:
            options["port"] = str(port)
        first = _Pass(self, host_arg, host_arg, self.local_user, options, lists, final=False)
        for lines in self._files:
            first.read(lines, 0, nevermatch=False)
        if "hostname" in options:
            options["hostname"] = expand_tokens(options["hostname"], {"h": host_arg},
                                                 "HostName")
            host = options["hostname"]
        else:
            host = host_arg
        host = _connect_name(host)
        if first.want_final:
            final = _Pass(self, host, host_arg, self.local_user, options, lists, final=True)
            for lines in self._files:
                final.read(lines, 0, nevermatch=False)
        if "hostkeyalias" in options:
            options["hostkeyalias"] = options["hostkeyalias"].lower()
        return HostConfig(host_arg, host, options, lists)


def _parse_line(raw: str, where: str) -> Optional[_Line]:
    """One line: its keyword (lower-cased) and arguments; None for a blank or comment."""
    text = raw.rstrip(_WHITESPACE + "\f")
    stripped = text.lstrip(_WHITESPACE)
    if not stripped or stripped.startswith("#"):
        return None
    match = re.match(r"([^ \t\r\n=]+)[ \t]*(?:=[ \t]*)?(.*)\Z", stripped, re.DOTALL)
    if match is None:
        raise ConfigError(f"ssh_config {where}: not a keyword and value")
    keyword, rest = match.group(1).lower(), match.group(2)
    if not rest:
        raise ConfigError(f"ssh_config {where}: no argument after the keyword")
    try:
        args = split_arguments(rest)
    except ValueError:
        # Only a keyword of ours is named: the line may hold anything.
        named = f"{_KNOWN[keyword]}: " if keyword in _KNOWN else ""
        raise ConfigError(f"ssh_config {where}: {named}invalid quotes") from None
    return _Line(keyword, rest, args, where)


def local_user() -> str:
    """This process's user name as ssh knows it: the password database's for the real uid.

    Not ``$USER`` or ``$LOGNAME`` (``getpass.getuser``): ssh never reads them, and a
    process whose environment names another user must not take that user's ``Match
    localuser`` blocks, ``%u`` or default remote user.
    """
    if pwd is not None:
        try:
            return pwd.getpwuid(os.getuid()).pw_name
        except KeyError:  # a uid without an entry (a container): what the environment says
            pass
    return getpass.getuser()


def load(paths: Sequence[str], *, default: Optional[str] = None) -> SSHConfigFiles:
    """Parse the ssh_config files ``paths``, or ``default`` (may be missing) if given.

    Errors are ``ValueError`` naming the file and line, never quoting the line.
    """
    files = SSHConfigFiles(local_user(), socket.gethostname(), os.path.expanduser("~"))
    if default is not None:
        files.add(default, default=True)
    for path in paths:
        files.add(path)
    return files
