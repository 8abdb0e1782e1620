"""The cluster token: a shared secret that every message to an instance's control-plane ports carries.

    export PDLAB_CLUSTER_TOKEN=...   # for every instance, api_server and client of one deployment

(or `--cluster-token`, which shows in the process list). With a token, a
message is sent as `[TOKEN, body, *rest]`, `TOKEN` being `b"pdlab-token:" +
token`; an instance started with one drops any message to its
engine-worker-queue, cache-queue or pd-comm port whose first frame is not
exactly that (compared in constant time) and logs it. An instance without a
token takes messages with or without the frame, so clients may always send it.

Replies (to the socket that asked) carry no token: the asker chose whom to
ask. The token authenticates; it does not encrypt: like Redis' password it
crosses the network in clear, so across untrusted networks put the instances
on a private network or a VPN. Every check is here (`unseal`), every sender
goes through `seal` (or a `SealedSocket`).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Sequence

import zmq

TOKEN_ENV = "PDLAB_CLUSTER_TOKEN"
PREFIX = b"pdlab-token:"
_MAX_FRAME_BYTES = len(PREFIX) + 4096  # a token frame is small; a longer first frame is a message body

log = logging.getLogger("pdlab.auth")


def cluster_token(flag: str | None = None) -> bytes | None:
    """The token: the flag's value, else $PDLAB_CLUSTER_TOKEN; None (no token) if neither is set."""
    text = flag if flag is not None else os.environ.get(TOKEN_ENV)
    return text.encode() if text else None


def seal(token: bytes | None, frames: Sequence) -> list:
    """The frames to send: the token's frame first when there is a token."""
    return [PREFIX + token, *frames] if token else list(frames)


def unseal(token: bytes | None, frames: list) -> list | None:
    """A received message's own frames (without the token's), or None if it must be refused."""
    first = frames[0] if frames else None
    data = None
    if first is not None and len(first) <= _MAX_FRAME_BYTES:
        data = first.bytes if isinstance(first, zmq.Frame) else bytes(first)
    if data is not None and data.startswith(PREFIX):
        if token is not None and not hmac.compare_digest(data, PREFIX + token):
            return None
        return frames[1:]
    return None if token is not None else frames


class SealedSocket:
    """A connected zmq socket whose every message carries the token first (the rest as the socket)."""

    def __init__(self, socket: zmq.Socket, token: bytes | None) -> None:
        self.socket = socket
        self.token = token

    def send(self, data, flags: int = 0, **kw) -> None:
        self.socket.send_multipart(seal(self.token, [data]), flags, **kw)

    def send_multipart(self, frames: Sequence, flags: int = 0, **kw) -> None:
        self.socket.send_multipart(seal(self.token, frames), flags, **kw)

    def __getattr__(self, name: str):
        return getattr(self.socket, name)


class RefusalLog:
    """Logs refused messages without letting a flood of them flood the log: at most one line a second per port."""

    def __init__(self, instance_id: str, every_s: float = 1.0) -> None:
        self.instance_id = instance_id
        self.every_s = every_s
        self._counts: dict[str, int] = {}
        self._next_s: dict[str, float] = {}

    def refused(self, port: str, why: str) -> None:
        self._counts[port] = self._counts.get(port, 0) + 1
        now_s = time.monotonic()
        if now_s >= self._next_s.get(port, 0.0):
            log.warning("%s: refused %d message(s) on the %s port: %s", self.instance_id, self._counts[port], port, why)
            self._counts[port] = 0
            self._next_s[port] = now_s + self.every_s
