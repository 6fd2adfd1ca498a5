"""The direct wire: a kernel's own zmq sockets, messages signed with its key.

jupyter_client provides the connection info, the Session (HMAC signing) and
socket creation; this wire owns the sockets, because jupyter_client's channel
classes serve one reader through queues and copy every frame. Frames are read
with ``copy=False`` so that binary buffers reach the unpickler without a copy.

The sockets are plain (blocking-API) shadows of jupyter_client's asyncio sockets,
read by one ``loop.add_reader`` callback each, which drains every waiting message.
zmq.asyncio makes a future and a loop round per message, and a call takes three:
reading directly took ~0.1 ms off each call here (2 cores).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from typing import Any, Callable, cast

import orjson
import zmq
from jupyter_client.adapter import adapt
from jupyter_client.asynchronous.client import AsyncKernelClient

from .base import Deliver, Encoded, Wire, normalize

log = logging.getLogger("kernelproxy")

HEARTBEAT_TIMEOUT = 1.0  # seconds a heartbeat may take
HEARTBEAT_MISSES = 3  # consecutive missed beats before the kernel is declared dead
# jupyter_client remembers every signature it verified (replay protection), up to 65,536 per
# session: ~12 MB. Replies that match no pending request are dropped anyway, so keep fewer.
DIGEST_HISTORY_SIZE = 4096
CHANNELS = ("shell", "control", "iopub")
DRAIN_BATCH = 64  # messages read per callback before the loop gets a turn
SEND_RETRY_FIRST, SEND_RETRY_MAX = 0.0005, 0.01  # seconds of backoff while a socket's send queue is full


class ZmqWire(Wire):
    def __init__(self, client: AsyncKernelClient) -> None:
        self._client = client
        self.session = client.session
        self.session.digest_history_size = DIGEST_HISTORY_SIZE
        self._async_sockets: list[Any] = []  # jupyter_client's zmq.asyncio sockets, kept open under the shadows
        self._sockets: dict[str, zmq.Socket[Any]] = {}
        self._drains: dict[str, Callable[[], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat = _Heartbeat(client)
        self._misses = 0

    async def start(self, deliver: Deliver) -> None:
        identity = self.session.bsession
        self._async_sockets = [
            self._client.connect_shell(identity=identity),
            self._client.connect_control(identity=identity),
            self._client.connect_iopub(),
        ]
        self._sockets = {channel: zmq.Socket(sock) for channel, sock in zip(CHANNELS, self._async_sockets)}
        for sock in self._sockets.values():
            sock.linger = 0
        # A PUB socket drops what a subscriber's queue cannot hold, and comm replies travel on IOPub:
        # let libzmq's IO thread buffer everything on our side so the kernel's queue never fills.
        self._sockets["iopub"].rcvhwm = 0
        self._loop = asyncio.get_running_loop()
        for channel, sock in self._sockets.items():
            drain = self._drains[channel] = functools.partial(self._drain, channel, sock, deliver)
            self._loop.add_reader(sock.FD, drain)
            self._loop.call_soon(drain)  # messages may have arrived before the reader was added

    def encode(self, msg: dict[str, Any]) -> Encoded:
        return cast(Encoded, self.session.serialize(msg))

    async def send(self, channel: str, encoded: Encoded, buffers: list[Any] | None = None) -> None:
        sock, frames = self._sockets[channel], [*encoded, *(buffers or [])]
        delay = SEND_RETRY_FIRST
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:  # the send queue is full (high-water mark): the kernel is not reading
                await asyncio.sleep(delay)
                delay = min(2 * delay, SEND_RETRY_MAX)
        self._drain_soon(channel)  # a send can consume the edge that signals readable messages on the FD

    def _drain_soon(self, channel: str) -> None:
        drain = self._drains.get(channel)
        if drain is not None and self._loop is not None:
            self._loop.call_soon(drain)

    def receive(self, frames: list[Any]) -> dict[str, Any] | None:
        """Verify and parse a message; None (counted in rejected_messages) if it is not one we can use."""
        try:
            _, msg_list = self.session.feed_identities(frames, copy=False)
            msg = self._deserialize(msg_list)
        except Exception as exc:
            self.rejected_messages += 1
            log.warning("dropped a message from the kernel that failed verification: %s", exc)
            return None
        return normalize(msg)

    def _deserialize(self, msg_list: list[Any]) -> dict[str, Any]:
        """Session.deserialize's checks (signature, replay), minus its date parsing: 7x faster.

        jupyter_client turns every date-like string of header and parent into a
        datetime with dateutil: 100 µs of its 120 µs per message, and a call takes
        3 to 5 messages. Nothing here reads dates, so they stay strings.
        """
        session = self.session
        if len(msg_list) < 5:
            raise TypeError(f"malformed message: {len(msg_list)} parts, at least 5 expected")
        signature, *parts = (bytes(frame.bytes) for frame in msg_list[:5])
        if session.auth is not None:
            if not signature:
                raise ValueError("Unsigned Message")
            if signature in session.digest_history:
                raise ValueError(f"Duplicate Signature: {signature!r}")
            session._add_digest(signature)
            if not hmac.compare_digest(signature, session.sign(parts)):
                raise ValueError(f"Invalid Signature: {signature!r}")
        header = orjson.loads(parts[0])
        msg = {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": orjson.loads(parts[1]),
            "metadata": orjson.loads(parts[2]),
            "content": orjson.loads(parts[3]),
            "buffers": [frame.buffer for frame in msg_list[5:]],
        }
        if not str(header.get("version", "5")).startswith("5"):
            msg = adapt(msg)  # an old protocol version (kernels of protocol 4): let jupyter_client translate
        return msg

    def _drain(self, channel: str, sock: zmq.Socket[Any], deliver: Deliver) -> None:
        """Deliver the messages waiting on ``sock`` (its FD is edge-triggered: read until none are left)."""
        for _ in range(DRAIN_BATCH):
            if channel not in self._drains:  # closed (a drain scheduled before close() may still run)
                return
            try:
                frames = [sock.recv(zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                return
            # pyzmq's recv_multipart asks the socket (RCVMORE) after each frame; a Frame says it itself:
            # 17 µs less per message of 7 frames. The other parts are there already: zmq delivers messages whole.
            while frames[-1].more:
                frames.append(sock.recv(zmq.NOBLOCK, copy=False))
            msg = self.receive(frames)
            if msg is not None:
                deliver(channel, msg)
        self._drain_soon(channel)  # more may wait

    async def death(self) -> str | None:
        self._misses = 0 if await self._heartbeat.beat(HEARTBEAT_TIMEOUT) else self._misses + 1
        if self._misses == 1 and self.hint is not None:
            self.hint("the kernel missed a heartbeat")  # a restart does that: worth a look
        if self._misses < HEARTBEAT_MISSES:
            return None
        return (
            f"the kernel stopped answering its heartbeat ({self._misses} beats missed): it died, "
            "hangs with its process stopped, or the network to it is down"
        )

    async def close(self) -> None:
        for sock in self._sockets.values():
            if self._loop is not None:
                self._loop.remove_reader(sock.FD)
        for sock in self._async_sockets:
            sock.close(linger=0)  # the shadows share these sockets: closing them closes both
        self._sockets, self._async_sockets, self._drains = {}, [], {}
        self._heartbeat.close()


class _Heartbeat:
    """Ping the kernel's heartbeat socket; a REQ socket that timed out is replaced."""

    def __init__(self, client: AsyncKernelClient) -> None:
        self._client = client
        self._sock: Any = None  # a zmq.asyncio REQ socket, typed as sync by jupyter_client
        self._lock: asyncio.Lock | None = None  # made on the loop that beats
        self._closed = False  # a beat waiting for the lock when the wire closed must not open a new socket

    async def beat(self, timeout: float) -> bool:
        # One ping at a time: a REQ socket takes one request per reply, and a timed-out beat closes the
        # socket, which would cancel another caller's wait (CI: a CancelledError out of death()).
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._beat(timeout)

    async def _beat(self, timeout: float) -> bool:
        if self._closed:
            return True  # the wire closed: its connection no longer asks (nothing to say the kernel died)
        if self._sock is None:
            self._sock = self._client.connect_hb()
            self._sock.linger = 0
        try:
            await self._sock.send(b"ping")
            await asyncio.wait_for(self._sock.recv(), timeout)
            return True
        except (asyncio.TimeoutError, zmq.ZMQError):
            self._drop()  # a REQ socket without its reply cannot send again
            return False
        except asyncio.CancelledError:
            self._drop()  # its reply would never be read: the next beat needs a fresh socket
            raise

    def close(self) -> None:
        self._drop()
        self._closed = True

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
