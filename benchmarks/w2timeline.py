"""Where a W2 command's time goes: every session channel's messages, timed in the client.

``wan.py --w2-rounds N --w2-trace`` hooks paramiko's `Packetizer` in the W2
child and, from the messages each session channel sent and received, times
the steps of a slot's cycle (open, exec, end, the next open on the freed
slot) against the round trip. A slot's cycle is at least 2 round trips (the
open's and the exec's): the floor of 5 commands per RTT at 10 sessions. What
it costs beyond them is the server's (its answer to the open, the command
itself, its CLOSE), the client's (the exec sent after the confirmation, the
next open after the CLOSE) and the refused opens' (a round trip each).

The hooks cost a few µs per message; they are installed only with ``--w2-trace``.
"""

from __future__ import annotations

import bisect
import statistics
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

#: SSH message numbers (RFC 4254) this timeline reads.
OPEN, CONFIRMATION, FAILURE, EOF, CLOSE, REQUEST = 90, 91, 92, 96, 97, 98

#: One message: when (``time.monotonic``), "out" or "in", its number, the
#: channel it names (the recipient's id; for an OPEN the sender's), and the
#: sender's id of a confirmation or the type of a request.
Event = Tuple[float, str, int, Optional[int], Any]


class PacketLog:
    """Every message paramiko sends or reads from install on, with its time."""

    def __init__(self) -> None:
        self.events: List[Event] = []
        self._lock = threading.Lock()

    def install(self) -> None:
        from paramiko.message import Message
        from paramiko.packet import Packetizer

        send, read = Packetizer.send_message, Packetizer.read_message
        log = self

        def send_message(packetizer: Packetizer, data: Message) -> None:
            log._note("out", data.asbytes())
            send(packetizer, data)

        def read_message(packetizer: Packetizer) -> Tuple[int, Message]:
            ptype, m = read(packetizer)
            log._note("in", bytes([ptype]) + m.asbytes()[m.packet.tell():])
            return ptype, m

        Packetizer.send_message = send_message  # type: ignore[method-assign, assignment]
        Packetizer.read_message = read_message  # type: ignore[method-assign, assignment]

    def _note(self, direction: str, body: bytes) -> None:
        at = time.monotonic()
        kind = body[0]
        channel: Optional[int] = None
        extra: Any = None
        if kind == OPEN:
            skip = struct.unpack(">I", body[1:5])[0]
            channel = struct.unpack(">I", body[5 + skip:9 + skip])[0]
        elif CONFIRMATION <= kind <= 100:
            channel = struct.unpack(">I", body[1:5])[0]
            if kind == CONFIRMATION:
                extra = struct.unpack(">I", body[5:9])[0]
            elif kind == REQUEST:
                size = struct.unpack(">I", body[5:9])[0]
                extra = body[9:9 + size].decode("ascii", "replace")
        with self._lock:
            self.events.append((at, direction, kind, channel, extra))

    def mark(self) -> int:
        """Where the log stands now: `breakdown` looks only at what came after."""
        with self._lock:
            return len(self.events)


def breakdown(events: List[Event], rtt: float) -> Dict[str, float]:
    """Means over the W2 round's channels, in ms; "ceiling": x floor if the client took no time.

    ``open``: the open's answer after one round trip; ``to_exec``: the exec
    sent after the confirmation; ``command``: exit status in after one round
    trip from the exec; ``to_close``: the server's CLOSE after the exit
    status; ``reopen``: the next open on a freed slot after that CLOSE (the
    open sent first after each CLOSE, each open counted once); ``cycle``: a
    slot's time from its open to the server's CLOSE, beyond 2 round trips.
    """
    channels: Dict[int, Dict[str, float]] = {}
    ours: Dict[int, int] = {}  # the server's channel id -> ours
    for at, direction, kind, channel, extra in events:
        if channel is None:
            continue
        if direction == "out" and kind == OPEN:
            channels[channel] = {"open": at}
            continue
        local = ours.get(channel) if direction == "out" else channel
        found = channels.get(local) if local is not None else None
        if found is None:
            continue  # opened before the round
        if direction == "in" and kind == CONFIRMATION:
            found["confirmed"] = at
            ours[extra] = channel  # our id, as the confirmation names it
        elif direction == "in" and kind == FAILURE:
            found["refused"] = at
        elif direction == "out" and kind == REQUEST and extra == "exec":
            found["exec"] = at
        elif direction == "in" and kind == REQUEST and extra == "exit-status":
            found["exit"] = at
        elif direction == "in" and kind == CLOSE:
            found["closed"] = at
    done = [c for c in channels.values()
            if all(k in c for k in ("confirmed", "exec", "exit", "closed"))]
    opens = sorted(c["open"] for c in channels.values())
    taken = set()
    reopen = []
    for closed in sorted(c["closed"] for c in done):
        index = bisect.bisect_left(opens, closed)
        while index < len(opens) and index in taken:
            index += 1
        if index < len(opens):
            taken.add(index)
            reopen.append(opens[index] - closed)

    def mean_ms(values: List[float]) -> float:
        return statistics.mean(values) * 1000 if values else float("nan")

    result = {
        "open": mean_ms([c["confirmed"] - c["open"] - rtt for c in done]),
        "to_exec": mean_ms([c["exec"] - c["confirmed"] for c in done]),
        "command": mean_ms([c["exit"] - c["exec"] - rtt for c in done]),
        "to_close": mean_ms([c["closed"] - c["exit"] for c in done]),
        "reopen": mean_ms(reopen),
        "cycle": mean_ms([c["closed"] - c["open"] - 2 * rtt for c in done]),
    }
    server = (result["open"] + result["command"] + result["to_close"]) / 1000
    result["ceiling"] = 2 * rtt / (2 * rtt + server)
    return result


def describe(parts: Dict[str, float]) -> str:
    """One line of `breakdown`'s numbers."""
    return (f"open answered +{parts['open']:.2f} ms, exec sent {parts['to_exec']:.2f} ms after "
            f"the confirmation, exit status +{parts['command']:.2f} ms, CLOSE "
            f"{parts['to_close']:.2f} ms after it, next open {parts['reopen']:.2f} ms after "
            f"the CLOSE; cycle 2 RTT +{parts['cycle']:.2f} ms; server alone caps at "
            f"{parts['ceiling']:.3f}x")
