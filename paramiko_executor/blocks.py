"""``bounded_connection`` blocks: the slot each holds, until the server closed its sessions.

A block yields the connection's paramiko ``Transport`` with one slot
reserved, and the caller opens session channels on it through paramiko's own
API. The slot covers those sessions as it covers a command's: it is free
again only once the server closed every session channel opened in the block.
The block's end is not that moment: OpenSSH keeps a session whose command
still runs after our CLOSE (until the command ends), so an open sent on a
slot freed at the block's end would be refused, and a refusal with no
session ending lowers an unprobed cap for the connection's life
(`connection.Connection.refused`). A channel the caller left open is closed
as the block ends, as the block's other resources are: a paramiko channel
holds a session on the server for as long as it is open, and a slot that
waited for the channel's user to close it could wait for good.

Which opens are a block's: the session channels opened through the
transport's ``open_channel`` (``open_session``, ``open_sftp_client``, ...)
while the block runs; the executor opens its own channels without it
(`internals.new_session_channel`), so no command of another thread is
counted to a block. An open from a thread inside blocks of the connection
counts to its innermost block; one from any other thread (a worker the
block's thread started) to the block that began last. Channels of other
kinds (``direct-tcpip``) are no sessions: the server's MaxSessions does not
count them, nor does a block.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional

import paramiko

from .channel import Cover, Sessions, close_soon
from .internals import known_channel
from .slots import Claim, Slots

__all__ = ["Blocks", "Reservation"]


class Reservation(Claim, Cover):
    """One ``bounded_connection`` block's slot for thread ``holder``, and the sessions
    opened in the block.

    A `Claim` for the block's duration: leaving ``with`` gives the slot back
    on every path, unless the block's sessions are not all closed by the
    server yet; then the reservation takes the slot over (`Cover`), no
    thread's from then on, and gives it back as the server's CLOSE of the
    last one arrives (in paramiko's thread). Its exit may run twice (the
    block's boundary runs it again after an interrupt, `Link.taking`): the
    second finishes what the first left.
    """

    def __init__(self, slots: Slots, holder: int, blocks: Blocks) -> None:
        super().__init__(slots, holder)
        self._blocks = blocks
        #: Guards the counts below and `ended` against paramiko's thread and the openers'.
        self._lock = threading.Lock()
        #: Opens counted to the block (`opening`) and not answered yet.
        self._opens = 0
        #: The block's sessions the server has not closed yet, by channel id.
        #: Held here: paramiko holds channels weakly, and a channel collected
        #: before the server's CLOSE would keep its slot for good.
        self._unclosed: Dict[int, paramiko.Channel] = {}
        #: Set as the block ends: no open counts to it from then on.
        self.ended = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self.ended = True
            if (self._opens or self._unclosed) and self.taken:
                # Plain stores, no call: the slot is the claim's or the reservation's.
                self._slots, self._holder = self.slots, self.holder
                self.taken = False
        self.hold(None)  # its thread is done: the server's CLOSE frees the slot
        for chan in list(self._unclosed.values()):
            close_soon(chan)  # nothing to send for one the caller closed
        Claim.__exit__(self)

    def opening(self) -> bool:
        """Count an open about to be sent to this block (`opened` follows); False once
        it ended. Under the `Blocks` lock."""
        with self._lock:
            if self.ended:
                return False
            self._opens += 1
            return True

    def opened(self, chan: Optional[paramiko.Channel], sessions: Sessions) -> None:
        """The open counted by `opening` returned ``chan`` (None: it failed or was refused).

        The channel is watched for the server's CLOSE from here on; one
        whose CLOSE came first (paramiko forgot it already) is settled here.
        A block that ended meanwhile closes the channel at once.
        """
        if chan is not None:
            chanid = chan.chanid
            with self._lock:
                self._unclosed[chanid] = chan
                sessions.watched[chanid] = lambda: self._server_closed(chanid)
            # The watch set, then paramiko asked: a CLOSE handled before it was set is
            # seen here, one after by the close hook; whichever pops the watch settles.
            transport = chan.get_transport()
            if (transport is None or known_channel(transport, chanid) is not chan) and (
                    sessions.watched.pop(chanid, None) is not None):
                self._server_closed(chanid)
        with self._lock:
            self._opens -= 1
            ended = self.ended
        if ended and chan is not None:
            close_soon(chan)
        self._settle()

    def _server_closed(self, chanid: int) -> None:
        """The server closed channel ``chanid`` too (paramiko's thread, or `opened`)."""
        with self._lock:
            self._unclosed.pop(chanid, None)
        self._settle()

    def _settle(self) -> None:
        """Give the slot back once the block ended and the server closed all its sessions."""
        with self._lock:
            done = self.ended and not self._opens and not self._unclosed
        if done:
            self._release()  # once: nothing if the claim gave it back

    @property
    def counted(self) -> bool:
        """Whether the block holds its slot (running, or waiting for the server's CLOSE)."""
        return not self.ended or self.taken or self.holds_slot


class Blocks:
    """The ``bounded_connection`` blocks of one connection, and the opens counted to them.

    Installs itself as the transport's ``open_channel`` (an instance
    attribute in front of paramiko's, which ``open_session`` and the like
    call): paramiko's, with the session opened counted to a block.
    """

    def __init__(self, transport: paramiko.Transport, sessions: Sessions) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        #: Begun, and running or still holding their slot, oldest first.
        self._blocks: List[Reservation] = []
        self._open = transport.open_channel
        transport.open_channel = self._open_channel  # type: ignore[method-assign]

    def begin(self, block: Reservation) -> None:
        """``block`` runs: sessions opened from here on count to it."""
        with self._lock:
            self._prune()
            self._blocks.append(block)

    def reserved(self) -> int:
        """How many blocks hold a slot: running, or their sessions not all closed yet."""
        with self._lock:
            self._prune()
            return len(self._blocks)

    def _prune(self) -> None:
        """Forget the blocks whose slot is back (under ``_lock``)."""
        self._blocks = [block for block in self._blocks if block.counted]

    def _count_open(self) -> Optional[Reservation]:
        """The block an open from this thread counts to, counted (`Reservation.opening`);
        None when no block runs."""
        thread = threading.get_ident()
        with self._lock:
            running = [block for block in self._blocks if not block.ended]
            own = [block for block in running if block.holder == thread]
            # A block ending just now counts nothing: the next one in line does.
            for block in reversed(own or running):
                if block.opening():
                    return block
        return None

    def _open_channel(self, kind: str, *args: Any, **kwargs: Any) -> paramiko.Channel:
        block = self._count_open() if kind == "session" else None
        if block is None:
            return self._open(kind, *args, **kwargs)
        chan: Optional[paramiko.Channel] = None
        try:
            chan = self._open(kind, *args, **kwargs)
        finally:
            block.opened(chan, self._sessions)
        return chan
