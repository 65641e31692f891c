"""A command's output as it arrives: one growing buffer per stream, its memory reused.

Every page of fresh memory costs a fault when first written, and on virtual
machines whose host takes back the guest's freed memory, a fault several times
dearer (measured here: 64 MiB of output went from ~500 to ~230 MiB/s once the
host started reclaiming). A large output therefore fills the buffer of an
earlier one, whose pages are already there; only the decoded text, which the
caller keeps, needs fresh memory.
"""

from __future__ import annotations

import codecs
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from .results import Output, decode_output

__all__ = ["KEEP_BYTES", "KEEP_MIN", "LINE_PIECE", "LineSplitter", "LiveStream", "OutputBuffer",
           "line_splitters"]

#: At most this much buffer memory is kept for reuse, for the whole process.
KEEP_BYTES = 128 * 1024 * 1024

#: Buffers smaller than this are not kept: they come from warm heap memory anyway.
KEEP_MIN = 1024 * 1024


class _Spares:
    """Buffers of finished commands, kept for the next large outputs; one lock guards them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: List[bytearray] = []
        self._bytes = 0

    def take(self) -> bytearray:
        with self._lock:
            if not self._buffers:
                return bytearray()
            buffer = self._buffers.pop()
            self._bytes -= len(buffer)
            return buffer

    def keep(self, buffer: bytearray) -> None:
        if len(buffer) < KEEP_MIN:
            return
        with self._lock:
            if self._bytes + len(buffer) <= KEEP_BYTES:
                self._buffers.append(buffer)
                self._bytes += len(buffer)


_SPARES = _Spares()

if hasattr(os, "register_at_fork"):
    # A thread of the parent may have held the lock at the fork; the child
    # starts with an empty pool and a lock of its own.
    os.register_at_fork(after_in_child=_SPARES.__init__)  # type: ignore[misc]


class OutputBuffer:
    """One output stream of one command.

    Only the transport thread appends, and only until the stream's EOF; the
    command's thread reads after it (`text`) or, after a time-out, while data
    may still arrive (`text_so_far`). A reused buffer is longer than what was
    written into it: ``_used`` bytes of it are this command's.
    """

    __slots__ = ("_data", "_used")

    def __init__(self) -> None:
        self._data: Optional[bytearray] = None
        self._used = 0

    def append(self, chunk: bytes) -> None:
        data = self._data
        if data is None:
            data = self._data = _SPARES.take()
        used = self._used
        # Overwrites in place while the buffer is long enough, else grows it.
        data[used:used + len(chunk)] = chunk
        self._used = used + len(chunk)

    def decode_so_far(self, encoding: Optional[str] = "utf-8") -> Output:
        """What arrived so far, decoded, while more may arrive; the buffer is not reused."""
        used = self._used  # read first: the buffer only grows behind it
        data = self._data
        # A slice, not a view: a view would stop the transport thread growing the buffer.
        return decode_output(b"" if data is None else data[:used], encoding)

    def decode(self, encoding: Optional[str] = "utf-8") -> Output:
        """The whole output decoded (bytes for None), once no more can arrive.

        The buffer goes back for reuse.
        """
        data, self._data = self._data, None
        if data is None:
            return decode_output(b"", encoding)
        with memoryview(data) as whole, whole[:self._used] as written:
            text = decode_output(written, encoding)
        _SPARES.keep(data)
        return text


class LiveStream:
    """One output stream of a command whose caller watches it live (``on_output``).

    The transport thread appends; the caller's thread drains what arrived and
    keeps it only if asked (``keep_output``), so an unkept stream holds no
    more than what arrived since the last drain. The channel's window is
    given back as the caller drains, so a slow callback slows the command
    instead of filling memory.
    """

    __slots__ = ("_lock", "_chunks", "_kept")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: List[bytes] = []
        self._kept = bytearray()

    def append(self, chunk: bytes) -> None:
        with self._lock:
            self._chunks.append(chunk)

    def drain(self, keep: bool) -> bytes:
        """What arrived since the last drain."""
        with self._lock:
            chunks, self._chunks = self._chunks, []
        data = b"".join(chunks)
        if keep:
            self._kept += data
        return data

    def kept(self, encoding: Optional[str]) -> Output:
        """Everything drained with ``keep``, decoded (empty when nothing was kept)."""
        return decode_output(self._kept, encoding)


#: A line that grew this long (characters, or bytes without an encoding) and has not
#: ended yet goes out as a piece: a progress bar drawn with \r for hours never ends
#: its line, and ``keep_output=False`` promises memory that stays flat.
LINE_PIECE = 1024 * 1024


class LineSplitter:
    """Hands a stream's output to ``callback(stream, line)`` one complete line at a time.

    Lines keep their ``"\n"``; the last unterminated piece goes out at
    `finish`. A line longer than `LINE_PIECE` goes out in pieces of
    `LINE_PIECE` (bytes: cut between UTF-8 characters, a few bytes off), as
    it arrives if it has not ended yet; only its last piece ends with ``"\n"``.
    Text is decoded incrementally (a character split across two chunks is
    decoded whole); with ``encoding`` None, lines are bytes.
    """

    def __init__(self, stream: str, callback: Callable[[str, Any], object],
                 encoding: Optional[str]) -> None:
        self._stream = stream
        self._callback = callback
        self._decoder = (None if encoding is None
                         else codecs.getincrementaldecoder(encoding)("replace"))
        self._empty: Any = b"" if encoding is None else ""
        # The unterminated line so far, in the pieces it came in: joined once, when it ends,
        # so that a long line (a progress bar drawn with \r for hours) costs its length once,
        # not its length again with every chunk.
        self._pieces: List[Any] = []
        self._pending = 0  # their total length

    def feed(self, data: bytes, final: bool = False) -> None:
        text = data if self._decoder is None else self._decoder.decode(data, final)
        if not text:
            return
        newline: Any = b"\n" if self._decoder is None else "\n"  # of text's type, bytes or str
        lines = text.split(newline)
        last = lines.pop()
        if lines:
            self._pieces.append(lines[0])
            lines[0] = self._empty.join(self._pieces)
            self._pieces, self._pending = [], 0
        if last:
            self._pieces.append(last)
            self._pending += len(last)
        for line in lines:
            line += newline
            if len(line) <= LINE_PIECE:
                self._callback(self._stream, line)
            else:  # as if its end had come in a later read
                self._hand_on(self._cut(line))
        if self._pending >= LINE_PIECE:
            *pieces, rest = self._cut(self._empty.join(self._pieces))
            self._pieces, self._pending = [rest], len(rest)
            self._hand_on(pieces)

    def finish(self) -> None:
        """The stream ended: hand on what is left of its last line."""
        if self._decoder is not None:
            self.feed(b"", final=True)
        if self._pieces:
            rest = self._cut(self._empty.join(self._pieces))
            self._pieces, self._pending = [], 0
            self._hand_on(rest)

    def _cut(self, text: Any) -> List[Any]:
        """Non-empty ``text`` in pieces of `LINE_PIECE` but the last (bytes: a few bytes
        off, between UTF-8 characters)."""
        pieces, start = [], 0
        while len(text) - start > LINE_PIECE:
            end = start + LINE_PIECE
            if self._decoder is None:
                end = _utf8_cut(text, start, end)
            pieces.append(text[start:end])
            start = end
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def _hand_on(self, pieces: List[Any]) -> None:
        for piece in pieces:
            self._callback(self._stream, piece)


def _utf8_cut(data: bytes, start: int, end: int) -> int:
    """``end``, moved off the middle of a UTF-8 character: back before it, or past it if
    it starts the piece (bytes of unknown encoding are most often UTF-8, and a callback
    decoding each piece must not get half a character)."""
    for back in range(1, 4):
        at = end - back
        if at < start:
            break
        byte = data[at]
        if byte & 0xC0 != 0x80:  # not a continuation byte: ASCII, or a character's lead
            length = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back >= length:
                break
            return at if at > start else min(at + length, len(data))
    return end


def line_splitters(callback: Optional[Callable[[str, Any], object]],
                   encoding: Optional[str]) -> Optional[Dict[str, LineSplitter]]:
    """A `LineSplitter` per stream for a live-output ``callback``; None without one."""
    if callback is None:
        return None
    return {name: LineSplitter(name, callback, encoding) for name in ("stdout", "stderr")}
