"""When a command with stdin left is woken by the server's window adjustments.

Unit tests on a transport-less paramiko channel, adjusting its window the way
paramiko's window-adjust handler does; the real-server tests (16 and 64 MiB of
stdin through sshd and the test server) prove the flow end to end.
"""

from types import SimpleNamespace

import paramiko
import pytest

from paramiko_executor.channel import _Wakeup, _WakingCondition
from paramiko_executor.internals import replace_send_condition


@pytest.fixture
def sending():
    chan = paramiko.Channel(7)
    # The fields of a SessionChannel that the condition reads.
    ex = SimpleNamespace(sending=True, unsent=10 << 20, window_peak=0, wakeup=_Wakeup(None))
    replace_send_condition(chan, _WakingCondition(chan, ex))

    def adjust(window):
        with chan.lock:
            chan.out_window_size = window
            chan.out_buffer_cv.notify_all()
        woken = ex.wakeup.is_set()
        ex.wakeup.reset()
        return woken

    return chan, ex, adjust


def test_wakes_once_a_quarter_of_the_largest_window_is_open(sending):
    _, _, adjust = sending
    assert adjust(2 << 20)  # sshd's first window
    assert not adjust(100 << 10)  # one adjustment of 96 KiB after sending it all
    assert not adjust(500 << 10)
    assert adjust(512 << 10)


def test_a_small_server_window_still_wakes_when_it_is_whole_again(sending):
    _, _, adjust = sending
    assert adjust(64 << 10)
    assert not adjust(8 << 10)
    assert adjust(64 << 10)


def test_wakes_as_soon_as_the_rest_fits(sending):
    _, ex, adjust = sending
    assert adjust(2 << 20)
    ex.unsent = 1000
    assert adjust(1000)


def test_a_closed_channel_wakes_and_a_command_done_sending_does_not(sending):
    chan, ex, adjust = sending
    assert adjust(2 << 20)
    chan.closed = True
    assert adjust(0)
    chan.closed = False
    ex.sending = False
    assert not adjust(2 << 20)
