"""Host names and ssh_config file paths: what OpenSSH accepts, and how it expands them.

:func:`check_hostname` refuses the host names OpenSSH 9.6 refuses (CVE-2023-51385): a name
is substituted for ``%h`` into a ``ProxyCommand`` that a shell may interpret, into the
arguments of ``ssh -W %h:%p``, into ``Match exec`` commands, and it is written to
``known_hosts``, where ``*?!,`` are pattern syntax. So a name with shell metacharacters,
whitespace, control characters, a leading ``-`` or pattern characters is refused before
anything is resolved, substituted or recorded.

:func:`match_pattern_list` matches a name against an OpenSSH pattern list (``Host``,
``Match`` and known_hosts lines).

:func:`expand_paths` turns the words of ``UserKnownHostsFile``, ``GlobalKnownHostsFile``,
``RevokedHostKeys`` or ``IdentityFile`` into paths the way OpenSSH does: ``~`` expanded, then
the ``%`` tokens and ``${VAR}`` environment variables.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence, Tuple

__all__ = ["check_hostname", "check_username", "expand_path", "expand_paths", "expand_tokens",
           "match_pattern", "match_pattern_list", "HOSTNAME_REFUSED", "USERNAME_REFUSED"]

#: Characters never allowed in a host name: OpenSSH 9.6's shell metacharacters, then the
#: known_hosts pattern characters (a name recorded with them would be a pattern), then "@"
#: (ssh reads user@host; the library takes the user as its own parameter).
HOSTNAME_REFUSED = "'`\"$\\;&<>|(){}" + "*?!," + "@"
#: Characters never allowed in a remote user name (OpenSSH 9.6's ``valid_ruser``).
USERNAME_REFUSED = "'`\";&<>|(){}"

_TOKEN_OR_VARIABLE = re.compile(r"%(.?)|\$\{([^}]*)\}", re.DOTALL)
_TOKEN = re.compile(r"%(.?)", re.DOTALL)


def check_hostname(name: str, what: str = "host") -> str:
    """Return ``name`` if it is a host name OpenSSH would accept; else raise ``ValueError``.

    Refused: the empty name, a leading ``-`` (it would be read as an option by ``ssh -W``
    or ``nc``), whitespace and control characters, shell metacharacters
    ``'"`$\\;&<>|(){}``, the known_hosts pattern characters ``*?!,`` and ``@``. ``what``
    names the parameter or ssh_config keyword in the message (the name is shown escaped).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    problem = None
    if not name:
        problem = "it is empty"
    elif name.startswith("-"):
        problem = "it starts with '-'"
    else:
        for char in name:
            if char.isspace() or not char.isprintable():
                problem = "it contains whitespace or a control character"
                break
            if char in HOSTNAME_REFUSED:
                problem = f"it contains {char!r}"
                break
    if problem is not None:
        raise ValueError(
            f"{what} {name!r} is not a valid host name: {problem} (OpenSSH refuses it too)"
        )
    return name


def check_username(name: str, what: str = "username") -> str:
    """Return ``name`` if it is a remote user name OpenSSH would accept; else ``ValueError``.

    As OpenSSH 9.6 checks a user given on its command line (it is substituted for ``%r``
    into ``ProxyCommand`` and ``Match exec``): refused are a leading ``-``, control
    characters (and non-printable Unicode), ``'"`;&<>|(){}``, whitespace followed by ``-``
    and a ``\\`` at the end. The empty name passes, as in ssh.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    problem = None
    if name.startswith("-"):
        problem = "it starts with '-'"
    elif name.endswith("\\"):
        problem = "it ends with '\\'"
    elif re.search(r"\s-", name):
        problem = "it has '-' after whitespace"
    else:
        for char in name:
            if char in USERNAME_REFUSED:
                problem = f"it contains {char!r}"
                break
            if not char.isprintable() and char not in " ":
                problem = "it contains a control character"
                break
    if problem is not None:
        raise ValueError(
            f"{what} {name!r} is not a valid user name: {problem} (OpenSSH refuses it too)"
        )
    return name


def match_pattern(string: str, pattern: str) -> bool:
    """OpenSSH's ``match_pattern``: ``*`` and ``?`` are wildcards, everything else literal.

    Matched in O(len(string) * len(pattern)) steps: a pattern with many ``*`` cannot make
    a lookup hang, as a regular expression could.
    """
    at = index = 0
    star, resume = -1, 0  # the last "*" seen, and where its match would go on
    while at < len(string):
        if index < len(pattern) and pattern[index] == "*":
            star, resume, index = index, at, index + 1
        elif index < len(pattern) and pattern[index] in ("?", string[at]):
            at, index = at + 1, index + 1
        elif star >= 0:
            resume += 1
            at, index = resume, star + 1
        else:
            return False
    return pattern[index:].strip("*") == ""


def match_pattern_list(string: str, patterns: str, lower: bool) -> int:
    """OpenSSH's ``match_pattern_list`` over a comma-separated list with ``!`` negations.

    1 if a pattern matches, -1 if a negated one matches (it vetoes the list), else 0.
    ``lower`` compares case-insensitively (host names).
    """
    if lower:
        string = string.lower()
    result = 0
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if negated:
            pattern = pattern[1:]
        if lower:
            pattern = pattern.lower()
        if match_pattern(string, pattern):
            if negated:
                return -1
            result = 1
    return result


def expand_tokens(text: str, tokens: Mapping[str, str], what: str, *,
                  variables: bool = False) -> str:
    """``%x`` replaced by ``tokens["x"]``, ``%%`` by ``%`` (OpenSSH's ``percent_expand``).

    With ``variables``, ``${VAR}`` is replaced by the environment variable too, in the same
    pass (a value is never expanded again). An unknown token, a ``%`` at the end or an
    unset variable is a ``ValueError`` naming ``what``.
    """
    def substitute(match: re.Match[str]) -> str:
        letter, variable = match.group(1), match.group(2) if variables else None
        if variable is not None:
            if variable not in os.environ:
                raise ValueError(f"{what}: environment variable ${{{variable}}} is not set")
            return os.environ[variable]
        if letter == "%":
            return "%"
        if letter not in tokens:
            shown = f"%{letter}" if letter else "a '%' at the end"
            raise ValueError(f"{what}: unknown token {shown} in {text!r}")
        return tokens[letter]

    return (_TOKEN_OR_VARIABLE if variables else _TOKEN).sub(substitute, text)


def expand_path(word: str, keyword: str, tokens: Mapping[str, str], *,
                relative_ok: bool = False) -> str:
    """One file name of ``keyword``: ``~`` expanded, then ``%x`` tokens and ``${VAR}``.

    ``tokens`` maps token letters (``"h"``, ``"d"``, ...) to their values; ``%%`` is a
    literal ``%``. An unknown token, a ``%`` at the end, an unset variable or (unless
    ``relative_ok``) a path that is still relative after expansion is a ``ValueError``
    naming ``keyword``.
    """
    if word.startswith("~"):
        word = os.path.expanduser(word)
    expanded = expand_tokens(word, tokens, keyword, variables=True)
    if not relative_ok and not os.path.isabs(expanded):
        # OpenSSH would look for it relative to wherever the program runs, and accept-new
        # would create it there: never what the configuration meant.
        raise ValueError(
            f"{keyword}: {word!r} is a relative path after expansion ({expanded!r}); "
            "give an absolute path or start it with ~ or %d"
        )
    return expanded


def expand_paths(
    words: Sequence[str], keyword: str, tokens: Mapping[str, str], *,
    relative_ok: bool = False,
) -> Optional[Tuple[str, ...]]:
    """The files that the words of a ``keyword`` value name (see :func:`expand_path`).

    None when the value is ``none``: no file at all.
    """
    if len(words) == 1 and words[0].lower() == "none":
        return None
    return tuple(expand_path(word, keyword, tokens, relative_ok=relative_ok) for word in words)
