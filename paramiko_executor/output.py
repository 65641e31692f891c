"""A command's output as it arrives: one growing buffer per stream, its memory reused.

Every page of fresh memory costs a fault when first written, and on virtual
machines whose host takes back the guest's freed memory, a fault several times
dearer (measured here: 64 MiB of output went from ~500 to ~230 MiB/s once the
host started reclaiming). A large output therefore fills the buffer of an
earlier one, whose pages are already there; only the decoded text, which the
caller keeps, needs fresh memory.
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional

from .results import decode_output

__all__ = ["OutputBuffer", "KEEP_BYTES", "KEEP_MIN"]

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
    os.register_at_fork(after_in_child=_SPARES.__init__)


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

    def text_so_far(self) -> str:
        """What arrived so far, decoded, while more may arrive; the buffer is not reused."""
        used = self._used  # read first: the buffer only grows behind it
        data = self._data
        # A slice, not a view: a view would stop the transport thread growing the buffer.
        return "" if data is None else decode_output(data[:used])

    def text(self) -> str:
        """The whole output decoded, once no more can arrive; the buffer goes back for reuse."""
        data, self._data = self._data, None
        if data is None:
            return ""
        with memoryview(data) as whole, whole[:self._used] as written:
            text = decode_output(written)
        _SPARES.keep(data)
        return text
