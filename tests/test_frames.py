"""fgc_bank.frames: one multipart message out and back, against pyzmq's own multipart calls."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import zmq

from fgc_bank.frames import NOBLOCK, readable, recv_frames, send_frames


@pytest.fixture()
def pair():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    address = f"inproc://test-frames-{uuid.uuid4().hex}"  # a closed socket unbinds later, not at once
    a.bind(address)
    b.connect(address)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)


def test_sent_frames_arrive_as_one_message_in_order(pair) -> None:
    a, b = pair
    big = np.arange(50_000, dtype=np.int64)  # 400 KB: above pyzmq's copy threshold, sent zero-copy
    parts = [b"header", memoryview(big).cast("B"), b"", zmq.Frame(b"owned", copy=True)]
    send_frames(a, parts)
    send_frames(a, [b"next"])
    assert b.recv_multipart() == [b"header", big.tobytes(), b"", b"owned"]
    assert b.recv_multipart() == [b"next"]


def test_received_frames_are_the_whole_message_and_nothing_more(pair) -> None:
    a, b = pair
    assert not readable(b)
    with pytest.raises(zmq.Again):
        recv_frames(b, NOBLOCK)
    a.send_multipart([b"one", b"two", b"three"])
    a.send_multipart([b"four"])
    assert readable(b)
    frames = recv_frames(b, NOBLOCK)
    assert [f.bytes for f in frames] == [b"one", b"two", b"three"]
    assert [f.bytes for f in recv_frames(b, NOBLOCK)] == [b"four"]
    assert not readable(b)
