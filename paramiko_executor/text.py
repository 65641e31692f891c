"""Text that came from a server, made safe to show: one escaping rule for every message.

A server controls its banner, its disconnect reasons, keyboard-interactive prompts and the
texts paramiko puts into its exceptions, and it sends some of them before its host key has
been verified. Such text must never reach a terminal or a log raw: an escape sequence in it
could rewrite the screen, retitle the terminal or hide what really happened. Every message
built from server data passes through :func:`printable`.
"""

from __future__ import annotations

import logging

__all__ = ["EscapingFilter", "one_line", "printable"]


def _escape(char: str) -> str:
    # The escapes Python's repr() uses (\n, \x1b, \u202e, ...): familiar, and unambiguous.
    return char.encode("unicode_escape").decode("ascii")


def printable(text: object) -> str:
    """``text`` (``str()`` of it) with every non-printable character escaped.

    Control characters (C0, DEL, C1: newlines and escape sequences too), Unicode format
    characters (bidirectional overrides, zero-width characters), line and paragraph separators,
    and unassigned or surrogate code points become ``\\n``, ``\\x1b``, ``\\u202e``...; the
    plain space and every printable character stay as they are. The result is one line.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def one_line(text: object) -> str:
    """``text`` with its whitespace runs folded to single spaces, then made `printable`."""
    return printable(" ".join(str(text).split()))


class EscapingFilter(logging.Filter):
    """Escapes each record's message through `printable`; drops none.

    For paramiko's records on the executor's transports: they quote the
    server (its version string, before its host key is checked; debug
    dumps of what it sent), and reach whatever handlers the application
    configured.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = printable(message), None
        return True
