"""Sending and receiving one multipart message with the fewest pyzmq calls.

The client and the server both use these on their hot path. ``Socket.send_multipart`` and
``recv_multipart`` check every part's type, combine pyzmq's ``IntFlag`` constants (each operator
call ~0.6 us) and ask for ``RCVMORE`` through the Python-level ``getsockopt``; after a search has
emptied the caches each of those costs several times more, on every request. Here the flags are
plain ints and a received frame's ``more`` says whether another part follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def send_frames(socket: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` (bytes, buffers or ``zmq.Frame``) as one message. Buffers of 64 KB and
    more (pyzmq's ``copy_threshold``) go zero-copy; pyzmq copies smaller ones, which is cheaper."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        socket.send(frame, flags | SNDMORE if i < last else flags, copy=False)


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """Receive one whole message as ``zmq.Frame`` objects (not copied). ZeroMQ delivers a
    message's parts together, so only the first receive can find nothing (``zmq.Again``)."""
    frames = [socket.recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(socket.recv(copy=False))
    return frames


def readable(socket: zmq.Socket) -> bool:
    """Whether a message is waiting on ``socket``."""
    return bool(socket.getsockopt(EVENTS) & POLLIN)


def recv_bounded(socket: zmq.Socket, max_parts: int, max_bytes: int) -> tuple[list[zmq.Frame], bool]:
    """Receive one whole message, keeping at most ``max_parts`` parts and ``max_bytes`` bytes;
    the rest is received and let go at once. Returns the parts kept and whether any were cut
    (ZeroMQ bounds each part, MAXMSGSIZE, but not how many parts a message has)."""
    frames = [socket.recv(NOBLOCK, copy=False)]
    size, more, cut = len(frames[0]), frames[0].more, False
    while more:
        frame = socket.recv(copy=False)
        size, more = size + len(frame), frame.more
        if cut or len(frames) >= max_parts or size > max_bytes:
            cut = True  # the part is let go when ``frame`` is rebound
        else:
            frames.append(frame)
    return frames, cut
