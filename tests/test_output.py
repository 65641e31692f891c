"""Output buffers: decoding, growth, and reuse of a finished command's memory."""

import os

import pytest

from paramiko_executor import output
from paramiko_executor.output import KEEP_MIN, OutputBuffer


@pytest.fixture
def spares(monkeypatch):
    """A fresh process-wide pool for each test."""
    pool = output._Spares()
    monkeypatch.setattr(output, "_SPARES", pool)
    return pool


def fill(chunks):
    buffer = OutputBuffer()
    for chunk in chunks:
        buffer.append(chunk)
    return buffer


def test_chunks_come_back_in_order_and_decoded(spares):
    assert fill([b"a" * 70_000, "é".encode(), b"\xff", b"end"]).decode() == (
        "a" * 70_000 + "é\ufffdend"
    )


def test_no_output_is_empty_text(spares):
    assert OutputBuffer().decode() == ""
    assert OutputBuffer().decode_so_far() == ""


def test_a_large_buffer_is_reused_and_a_shorter_output_does_not_see_the_old_one(spares):
    big = b"x" * (2 * KEEP_MIN)
    first = fill([big[: KEEP_MIN], big[KEEP_MIN:]])
    assert first.decode() == big.decode()
    kept = spares._buffers[-1]
    second = fill([b"short"])
    assert second._data is kept  # the same memory, overwritten in place
    assert second.decode() == "short"
    third = fill([b"y" * (3 * KEEP_MIN)])  # outgrows the reused buffer
    assert third.decode() == "y" * (3 * KEEP_MIN)


def test_small_buffers_are_not_kept(spares):
    fill([b"z" * (KEEP_MIN - 1)]).decode()
    assert spares._buffers == []


def test_kept_memory_is_bounded(spares, monkeypatch):
    monkeypatch.setattr(output, "KEEP_BYTES", 3 * KEEP_MIN)
    buffers = [fill([b"q" * (2 * KEEP_MIN)]) for _ in range(3)]
    for buffer in buffers:
        buffer.decode()
    assert len(spares._buffers) == 1
    assert spares._bytes == 2 * KEEP_MIN


def test_text_so_far_copies_and_keeps_nothing(spares):
    buffer = fill([b"p" * (2 * KEEP_MIN)])
    assert buffer.decode_so_far() == "p" * (2 * KEEP_MIN)
    buffer.append(b"more")  # still growable: no view of it is left behind
    assert buffer.decode_so_far().endswith("pmore")
    assert spares._buffers == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_an_empty_pool_and_a_free_lock():
    fill([b"f" * (2 * KEEP_MIN)]).decode()  # the real pool now holds a buffer
    output._SPARES._lock.acquire()  # as if another thread held it at the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child: must neither see the buffers nor block
            ok = output._SPARES._buffers == [] and output._SPARES._lock.acquire(timeout=5)
            os._exit(0 if ok else 1)
    finally:
        output._SPARES._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("encoding", ["utf-8", None])
def test_a_line_that_never_ends_comes_in_pieces_so_memory_stays_flat(encoding):
    """Was: an unterminated line was held whole until its end, so a progress bar drawn with
    \\r for hours grew memory without bound even with keep_output=False. Now it goes out in
    pieces of about LINE_PIECE; together they are the line, characters split whole."""
    from paramiko_executor.output import LINE_PIECE, LineSplitter

    pieces: list = []
    splitter = LineSplitter("stdout", lambda stream, line: pieces.append(line), encoding)
    chunk = "\r 42% [é====>    ]".encode()
    count = 3 * LINE_PIECE // len(chunk) + 7
    for _ in range(count):
        splitter.feed(chunk[:8])
        splitter.feed(chunk[8:])  # splits the two bytes of "é"
    splitter.feed(b"\rdone\nnext")
    splitter.finish()
    whole = chunk * count + b"\rdone\n"
    if encoding is not None:
        whole = whole.decode()  # type: ignore[assignment]
    assert len(pieces) >= 4, len(pieces)
    assert all(len(piece) < LINE_PIECE + len(chunk) for piece in pieces)
    assert pieces[-1] == (b"next" if encoding is None else "next")
    assert (b"" if encoding is None else "").join(pieces[:-1]) == whole
    ends = [p.endswith(b"\n" if encoding is None else "\n") for p in pieces]
    assert ends == [False] * (len(pieces) - 2) + [True, False]
