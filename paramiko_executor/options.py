"""Connection options: the executor's keyword arguments and ssh_config, checked and resolved.

`resolve_target` turns the keyword arguments of an executor (paramiko's
``SSHClient.connect`` names plus the asyncssh-style ``host``, ``client_keys``
and ``known_hosts``) and the user's OpenSSH client configuration into one
`Target`: everything needed to open one connection, checked once at
construction so that bad input fails at the boundary, not deep in paramiko.
Explicit parameters win over the configuration file.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple, Union

import paramiko

from . import hostkeys, sshconfig
from .auth import Credentials, parse_mfa_config
from .checks import check_bool, check_number, check_secret, check_str
from .hostkeys import HostKeyPolicy
from .hostnames import check_hostname, check_username, expand_paths, expand_tokens

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_KNOWN_HOSTS",
    "Target",
    "connect_parameter_names",
    "normalize_parameters",
    "resolve_target",
]

DEFAULT_CONFIG = "~/.ssh/config"
#: OpenSSH's default UserKnownHostsFile: new keys are recorded in the first.
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")

#: asyncssh-style spellings accepted beside paramiko's names.
ALIASES = {"host": "hostname", "client_keys": "key_filename"}

ConfigPaths = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


class _Default:
    """Marks a parameter the caller did not give."""

    def __repr__(self) -> str:
        return "<default>"

    def __reduce__(self) -> str:
        return "DEFAULT"  # unpickles as the module's one instance


DEFAULT: Any = _Default()


@functools.lru_cache(maxsize=1)
def connect_parameter_names() -> FrozenSet[str]:
    """The keyword arguments of the installed paramiko's ``SSHClient.connect`` (looked up once)."""
    names = inspect.signature(paramiko.SSHClient.connect).parameters
    return frozenset(name for name in names if name != "self")


def normalize_parameters(parameters: Mapping[str, Any]) -> Dict[str, Any]:
    """Map asyncssh-style names to paramiko's and reject unknown or doubled ones.

    Returns a new dict keyed by paramiko's names plus ``known_hosts``.
    Raises `TypeError` naming an unknown parameter, or both spellings of one.
    """
    known = connect_parameter_names() | {"known_hosts"}
    result: Dict[str, Any] = {}
    for name, value in parameters.items():
        canonical = ALIASES.get(name, name)
        if canonical not in known:
            raise TypeError(f"unexpected keyword argument {name!r}")
        if canonical in result:
            other = next(n for n in parameters if n != name and ALIASES.get(n, n) == canonical)
            raise TypeError(f"{name!r} and {other!r} are the same parameter: give only one")
        result[canonical] = value
    return result


@dataclass(frozen=True)
class Target:
    """Everything needed to open one connection: where, through what, as whom."""

    hostname: str
    port: int
    credentials: Credentials
    host_keys: HostKeyPolicy
    timeout: Optional[float] = None
    banner_timeout: Optional[float] = None
    auth_timeout: Optional[float] = None
    channel_timeout: Optional[float] = None
    compress: bool = False
    sock: Any = field(default=None, compare=False)
    proxy_command: Optional[str] = None
    jump: Optional[Target] = None
    disabled_algorithms: Optional[Mapping[str, Sequence[str]]] = None
    transport_factory: Any = None
    keepalive_interval: Optional[float] = None
    keepalive_count_max: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.credentials.username}@{self.hostname}:{self.port}"


def _paths(name: str, value: Any) -> Tuple[str, ...]:
    """One path or a sequence of paths, each ``~``-expanded."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a path or a list of paths, not {type(value).__name__}")
    out = []
    for item in value:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"{name} must contain paths, not {type(item).__name__}")
        out.append(os.path.expanduser(os.fspath(item)))
    return tuple(out)


def _check_port(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"port must be an integer, not {type(value).__name__}")
    if not 0 < value < 65536:
        raise ValueError(f"port must be between 1 and 65535, not {value}")
    return value


def load_ssh_config(config: ConfigPaths) -> sshconfig.SSHConfigFiles:
    """Parse the ssh_config files named by ``config`` (the default one may be missing).

    An ssh_config file is trusted configuration: it can run programs (``ProxyCommand``,
    ``Match exec``). Errors are ``ValueError`` naming the file, never quoting its lines.
    """
    if config is DEFAULT:
        return sshconfig.load((), default=os.path.expanduser(DEFAULT_CONFIG))
    return sshconfig.load(_paths("config", config))


def _host_key_policy(
    explicit: Any, host_config: sshconfig.HostConfig, tokens: Mapping[str, str]
) -> HostKeyPolicy:
    """The host-key rules for one host: explicit ``known_hosts`` first, then ssh_config.

    ``known_hosts=None`` switches verification off. ``StrictHostKeyChecking no`` from
    ssh_config accepts unknown and changed keys (and records unknown ones, as ssh does) but
    never a revoked one.
    """
    strict = host_config.get("stricthostkeychecking", "true")
    if explicit is None:
        return HostKeyPolicy(None)
    # An explicit known_hosts means "verify against these": ssh_config cannot loosen it.
    lax = explicit is DEFAULT and strict == "false"
    if explicit is not DEFAULT:
        files: Any = explicit
    else:
        user_files = host_config.words("userknownhostsfile")
        files = (DEFAULT_KNOWN_HOSTS if user_files is None
                 else expand_paths(user_files, "UserKnownHostsFile", tokens) or ())
    global_files = host_config.words("globalknownhostsfile")
    # Read through the module attribute, so that tests can point it elsewhere.
    global_paths = (hostkeys.DEFAULT_GLOBAL_KNOWN_HOSTS if global_files is None
                    else expand_paths(global_files, "GlobalKnownHostsFile", tokens) or ())
    revoked_value = host_config.get("revokedhostkeys")
    revoked = None
    if revoked_value is not None:
        revoked_paths = expand_paths([revoked_value], "RevokedHostKeys", tokens)
        revoked = revoked_paths[0] if revoked_paths else None
    alias = host_config.get("hostkeyalias")
    if alias is not None:
        # Recorded and matched as a known_hosts name: pattern characters would widen trust.
        # ("none" is a name like any other here: ssh has no special meaning for it.)
        alias = check_hostname(alias, "HostKeyAlias")
    return HostKeyPolicy(
        files,
        accept_new=strict == "accept-new",
        strict=not lax,
        global_known_hosts=global_paths,
        revoked_host_keys=revoked,
        hash_known_hosts=host_config.get("hashknownhosts") == "yes",
        host_key_alias=alias,
    )


def _proxy_command(command: str, tokens: Mapping[str, str]) -> str:
    """A ``ProxyCommand`` with OpenSSH's tokens (``%h %k %n %p %r %%``) expanded.

    ssh hands the command to a shell, which expands a ``~`` that starts a word; it is run
    here without a shell, so that one expansion is done here.
    """
    allowed = {letter: tokens[letter] for letter in "hknpr"}
    expanded = expand_tokens(command, allowed, "ProxyCommand")
    return re.sub(r"(?<![^\s=])~(?=/|\s|$)", lambda _: os.path.expanduser("~"), expanded)


def resolve_target(
    parameters: Mapping[str, Any],
    *,
    mfa_config: Any = None,
    config: Any = DEFAULT,
    keepalive_interval: Any = DEFAULT,
    keepalive_count_max: Any = DEFAULT,
) -> Target:
    """Check ``parameters`` (already `normalize_parameters`-d) and resolve them against ssh_config.

    Raises `TypeError`/`ValueError` naming the offending parameter.
    """
    params = dict(parameters)
    hostname = params.pop("hostname", None)
    if hostname is None:
        raise TypeError("missing required parameter 'host' (or 'hostname')")
    if not isinstance(hostname, str) or not hostname:
        raise TypeError("host must be a non-empty string")
    # Before anything reads, substitutes or records the name (ssh_config Match exec, %h in
    # ProxyCommand, known_hosts): the checks OpenSSH 9.6 makes against CVE-2023-51385.
    check_hostname(hostname)
    ssh_config = load_ssh_config(config)
    return _resolve(hostname, params, ssh_config, mfa_config, keepalive_interval,
                    keepalive_count_max, seen=())


def _resolve(
    alias: str,
    params: Dict[str, Any],
    ssh_config: sshconfig.SSHConfigFiles,
    mfa_config: Any,
    keepalive_interval: Any,
    keepalive_count_max: Any,
    *,
    seen: Tuple[str, ...],
    proxy: bool = True,
) -> Target:
    port = params.pop("port", DEFAULT)
    port = None if port is DEFAULT else _check_port(port)
    username = check_str("username", params.pop("username", None))
    if username is not None:
        # Substituted for %r into ProxyCommand and Match exec, as ssh -l USER's would be.
        check_username(username)
    host_config = ssh_config.lookup(alias, user=username, port=port)
    # The HostName from ssh_config is trusted configuration, but it too is substituted for %h
    # into ProxyCommand and filed in known_hosts: it must be a plain host name as well.
    resolved = check_hostname(host_config.hostname, f"HostName of {alias!r}")
    port = _check_port(host_config.get("port", "22"))
    username = host_config.get("user") or sshconfig.local_user()
    key_alias = host_config.get("hostkeyalias", alias) or alias
    tokens = ssh_config.tokens(host=resolved, host_arg=alias, port=str(port), user=username,
                               alias=key_alias)

    key_filename = params.pop("key_filename", None)
    if key_filename is not None:
        key_filenames = _paths("client_keys", key_filename)
    else:
        configured = expand_paths(host_config.words("identityfile") or [], "IdentityFile",
                                  tokens, relative_ok=True) or ()
        key_filenames = tuple(path for path in configured if os.path.isfile(path))
    pkey = params.pop("pkey", None)
    if pkey is not None and not isinstance(pkey, paramiko.PKey):
        raise TypeError(f"pkey must be a paramiko.PKey, not {type(pkey).__name__}")
    credentials = Credentials(
        username=username,
        password=check_secret("password", params.pop("password", None)),
        pkey=pkey,
        key_filenames=key_filenames,
        passphrase=check_secret("passphrase", params.pop("passphrase", None)),
        allow_agent=check_bool("allow_agent", params.pop("allow_agent", True)),
        look_for_keys=check_bool("look_for_keys", params.pop("look_for_keys", True)),
        mfa=parse_mfa_config(mfa_config),
        auth_strategy=params.pop("auth_strategy", None),
    )
    explicit_known_hosts = params.pop("known_hosts", DEFAULT)
    host_keys = _host_key_policy(explicit_known_hosts, host_config, tokens)

    if keepalive_interval is DEFAULT:
        keepalive_interval = float(host_config.get("serveraliveinterval", "0") or 0) or None
    if keepalive_count_max is DEFAULT:
        keepalive_count_max = int(host_config.get("serveralivecountmax", "3") or 3)

    sock = params.pop("sock", None)
    jump = None
    proxy_command = None
    if sock is None and proxy:
        proxy_jump = host_config.get("proxyjump") or "none"
        command = host_config.get("proxycommand") or "none"
        if proxy_jump.lower() != "none":
            jump = _resolve_jumps(proxy_jump, ssh_config, key_filenames, explicit_known_hosts,
                                  seen=seen + (alias,))
        elif command.lower() != "none":
            proxy_command = _proxy_command(command, tokens)
    elif sock is not None and not (hasattr(sock, "send") and hasattr(sock, "recv")):
        raise TypeError(f"sock must be a socket-like object, not {type(sock).__name__}")

    disabled = params.pop("disabled_algorithms", None)
    if disabled is not None and not isinstance(disabled, Mapping):
        raise TypeError("disabled_algorithms must be a dict of lists")
    transport_factory = params.pop("transport_factory", None)
    if transport_factory is not None and not callable(transport_factory):
        raise TypeError("transport_factory must be callable")
    target = Target(
        hostname=resolved,
        port=port,
        credentials=credentials,
        host_keys=host_keys,
        timeout=check_number("timeout", params.pop("timeout", None)),
        banner_timeout=check_number("banner_timeout", params.pop("banner_timeout", None)),
        auth_timeout=check_number("auth_timeout", params.pop("auth_timeout", None)),
        channel_timeout=check_number(
            "channel_timeout", params.pop("channel_timeout", None)
        ),
        compress=check_bool("compress", params.pop("compress", False)),
        sock=sock,
        proxy_command=proxy_command,
        jump=jump,
        disabled_algorithms=disabled,
        transport_factory=transport_factory,
        keepalive_interval=check_number("keepalive_interval", keepalive_interval),
        keepalive_count_max=keepalive_count_max,
    )
    for name, value in params.items():
        # paramiko 3.x's GSS-API options: accepted by name, supported only switched
        # off; the others (gss_host, gss_trust_dns, ...) only refine those two.
        if name.startswith("gss_") and not (name in ("gss_auth", "gss_kex") and value):
            continue
        raise ValueError(f"{name}={value!r} is not supported by paramiko_executor")
    return target


def _resolve_jumps(
    spec: str,
    ssh_config: sshconfig.SSHConfigFiles,
    key_filenames: Tuple[str, ...],
    known_hosts: Any,
    *,
    seen: Tuple[str, ...],
) -> Target:
    """The last hop of a ProxyJump chain, each hop reached through the one before it.

    Each hop checks host keys by its own ssh_config settings (``StrictHostKeyChecking``,
    ``HostKeyAlias``, ...): a bastion configured ``yes`` stays ``yes`` whatever the target
    says. An explicit ``known_hosts`` parameter (the files, not the strictness) applies to
    hops whose ssh_config names no ``UserKnownHostsFile``.
    """
    jump: Optional[Target] = None
    for hop in spec.split(","):
        user, host, port = sshconfig.split_jump(hop)
        check_hostname(host, "ProxyJump host")
        if user is not None:
            check_username(user, "ProxyJump user")  # ssh passes it to the hop's ssh as -l
        if host in seen:
            raise ValueError(f"ProxyJump loops back to {host!r}")
        hop_config = ssh_config.lookup(host, user=user, port=port)
        params: Dict[str, Any] = {}
        if user:
            params["username"] = user
        if port is not None:
            params["port"] = port
        if "identityfile" not in hop_config and key_filenames:
            params["key_filename"] = list(key_filenames)
        if known_hosts is not DEFAULT and known_hosts is not None \
                and "userknownhostsfile" not in hop_config:
            params["known_hosts"] = known_hosts
        # Only the first hop follows its own ProxyJump/ProxyCommand; each later
        # hop is reached through the one before it, as OpenSSH does.
        hop_target = _resolve(host, params, ssh_config, None, DEFAULT, DEFAULT,
                              seen=seen + (host,), proxy=jump is None)
        if jump is not None:
            hop_target = replace(hop_target, jump=jump)
        jump = hop_target
    assert jump is not None
    return jump
