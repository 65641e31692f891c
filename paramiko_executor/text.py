"""Text that came from a server, made safe to show: one escaping rule for every message.

A server controls its banner, its disconnect reasons, keyboard-interactive prompts and the
texts paramiko puts into its exceptions, and it sends some of them before its host key has
been verified. Such text must never reach a terminal or a log raw: an escape sequence in it
could rewrite the screen, retitle the terminal or hide what really happened. Every message
built from server data passes through :func:`printable`; a log handler that shows records
on a terminal gets :class:`PrintableRecords`, which passes each record through it.
"""

from __future__ import annotations

import logging

__all__ = ["PrintableRecords", "printable", "printable_record"]


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


def printable_record(record: logging.LogRecord) -> logging.LogRecord:
    """Escape ``record`` in place (its message, arguments merged in, and its traceback).

    For log records that may quote a server (paramiko's own, which log the server's
    version string and disconnect reasons before its host key is checked). Returns it.
    """
    record.msg = printable(record.getMessage())
    record.args = None
    if record.exc_info:
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = "\n".join(printable(line) for line in text.splitlines())
        record.exc_info = None
    return record


class PrintableRecords(logging.Filter):
    """A logging filter that lets every record through, escaped by `printable_record`.

    Add it to a handler that shows records on a terminal:
    ``handler.addFilter(PrintableRecords())``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        printable_record(record)
        return True
