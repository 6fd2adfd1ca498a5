"""The fast transport: frames as binary buffers of comm messages, zero-copy.

Requests go to the kernel as ``comm_msg`` on the shell channel with the
pickle's out-of-band buffers attached as separate zmq frames (sent without
copying); replies come back as ``comm_msg`` on IOPub and are read without
copying (pyzmq ``copy=False``), so values are rebuilt on the received memory.

Jupyter's HMAC signs header, parent, metadata and content, not buffers: each
message carries a digest of its buffers inside its (signed) data, checked on
both sides before anything is unpickled.

Where the wire limits message size (a Jupyter Server refuses websocket
messages over 10 MiB), frames travel in parts: the request's frames are sent
as ``part`` messages ahead of it, and the agent sends a big reply's frames as
parts ahead of the reply; each side assembles them into one buffer per frame.

Replies travel on IOPub (comms' own channel, kept in order with the call's
output) or, where the wire asks for it, on shell: a Jupyter Server drops IOPub
messages beyond 1,000 a second, and shell replies reach only the requester.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from typing import Any

import blake3

from .._connection import KernelConnection
from .._exceptions import ProtocolError
from ..agent import _agent as agent
from .base import IopubListener, Message, Transport

DIGESTS = ("blake3", "sha256")  # offered to the agent, best first
PROBE_SIZE = 256 * 1024  # bytes echoed at negotiation: proves binary buffers survive the path
# Requests queued in the kernel at once. It runs one at a time anyway; a bound keeps bursts of IOPub
# traffic (3 messages a request) far below the kernel's PUB high-water mark (1,000), past which it drops.
MAX_IN_FLIGHT = 64
PART_OVERHEAD = 64 * 1024  # room left in a wire message for the JSON around a part's bytes


def digest_frames(algorithm: str, frames: list[Any]) -> str:
    """Hash all frames, in order (must match the agent's DIGESTS)."""
    hasher: Any = blake3.blake3(max_threads=blake3.blake3.AUTO) if algorithm == "blake3" else hashlib.sha256()
    for frame in frames:
        hasher.update(frame)
    return str(hasher.hexdigest())


class CommTransport(Transport):
    name = "comm"

    def __init__(
        self, connection: KernelConnection, comm_id: str, digest: str, *, part_size: int | None, reply_on: str
    ) -> None:
        self._conn = connection
        self._comm_id = comm_id
        self.digest = digest
        self._part_size = part_size  # None: frames travel whole
        self._reply_on = reply_on
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    @property
    def description(self) -> str:
        parts = f", in parts of {self._part_size // 2**20} MiB" if self._part_size else ""
        return f"comm (binary buffers, {self.digest} digest, replies on {self._reply_on}{parts})"

    @classmethod
    async def open(cls, connection: KernelConnection, timeout: float = 10.0) -> CommTransport:
        """Open the agent's comm and prove a binary round trip; raise ProtocolError if the kernel cannot."""
        comm_id = uuid.uuid4().hex
        limit = connection.wire.max_message_bytes
        part_size = limit - PART_OVERHEAD if limit is not None else None
        data = {
            "digests": list(DIGESTS),
            # Shell replies where IOPub is throttled (servers); on a direct wire IOPub keeps output and reply in order.
            "reply_on": "shell" if limit is not None else "iopub",
            "part_size": part_size,
        }
        content = {"comm_id": comm_id, "target_name": agent.COMM_TARGET, "data": data}
        try:
            reply = await asyncio.wait_for(connection.request("shell", "comm_open", content, comm_id=comm_id), timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"the kernel did not answer kernelproxy's comm_open within {timeout} s") from None
        opened = reply["content"].get("data", {})
        algorithm = opened.get("opened")
        if reply["msg_type"] != "comm_msg" or algorithm not in DIGESTS:
            raise ProtocolError(f"the kernel refused kernelproxy's comm: {reply['content']!r:.200}")
        transport = cls(connection, comm_id, algorithm, part_size=part_size, reply_on=opened.get("reply_on", "iopub"))
        probe = os.urandom(PROBE_SIZE)
        header, frames = await asyncio.wait_for(transport.request({"op": "echo"}, [probe]), timeout)
        if header.get("status") != "ok" or len(frames) != 1 or bytes(frames[0]) != probe:
            raise ProtocolError("binary buffers did not survive a round trip through the kernel's comms")
        return transport

    async def request(self, header: dict[str, Any], frames: list[Any], *, listener: IopubListener | None = None) -> Message:
        data: dict[str, Any] = {"header": header, "digest": digest_frames(self.digest, frames)}
        reply_parts = _Assembly(self._comm_id) if self._part_size is not None else None  # only limited wires
        async with self._slots:
            if self._part_size is not None and sum(memoryview(f).nbytes for f in frames) > self._part_size:
                data["upload"] = uuid.uuid4().hex
                await self._send_parts(data["upload"], frames)
                frames = []
            content = {"comm_id": self._comm_id, "data": data}
            reply = await self._conn.request(
                "shell", "comm_msg", content, buffers=frames, listener=listener, comm_id=self._comm_id,
                on_part=reply_parts.add if reply_parts is not None else None,
                # On IOPub the reply comes after the call's output (the agent flushes first): no 'idle' to wait for.
                wait_idle=self._reply_on != "iopub",
            )
        if reply["msg_type"] == "comm_close":
            raise ProtocolError(f"the kernel closed kernelproxy's comm: {reply['content'].get('data')!r:.200}")
        data = reply["content"].get("data", {})
        if "parts" in data:
            if reply_parts is None:
                raise ProtocolError("the kernel's agent sent a reply in parts over a wire that needs none")
            buffers = reply_parts.frames(data)
        else:
            buffers = reply.get("buffers", [])
        if data.get("digest") != digest_frames(self.digest, buffers):
            raise ProtocolError(
                "a reply's binary buffers do not match their signed digest (altered in transit?); refused, not unpickled"
            )
        reply_header = data.get("header")
        if not isinstance(reply_header, dict):
            raise ProtocolError(f"malformed reply from the kernel's agent: {data!r:.200}")
        return reply_header, list(buffers)

    async def _send_parts(self, upload: str, frames: list[Any]) -> None:
        """Send the frames of one request as parts no bigger than the wire carries, ahead of the request.

        If this is interrupted, the agent's half-built upload is dropped with an ``abort`` part.
        """
        assert self._part_size is not None
        sizes = [memoryview(frame).nbytes for frame in frames]
        try:
            for index, frame in enumerate(frames):
                view = memoryview(frame).cast("B")
                for offset in range(0, max(len(view), 1), self._part_size):
                    part = {"upload": upload, "index": index, "offset": offset, "sizes": sizes}
                    content = {"comm_id": self._comm_id, "data": {"part": part}}
                    await self._conn.send("shell", "comm_msg", content, [view[offset : offset + self._part_size]])
        except BaseException:
            if self._conn.dead is None:
                abort = {"comm_id": self._comm_id, "data": {"part": {"upload": upload, "abort": True}}}
                await asyncio.shield(self._conn.send("shell", "comm_msg", abort))
            raise

    async def close(self) -> None:
        if self._conn.dead is None:
            await self._conn.send("shell", "comm_close", {"comm_id": self._comm_id, "data": {}})


class _Assembly:
    """The frames of a reply that the agent sent in parts, rebuilt as they arrive."""

    def __init__(self, comm_id: str) -> None:
        self._comm_id = comm_id
        self._frames: list[bytearray] = []
        self._error: str | None = None

    def add(self, msg: dict[str, Any]) -> bool:
        """Take ``msg`` if it is one of our parts (True); anything else is left to the caller."""
        content = msg["content"]
        data = content.get("data")
        if content.get("comm_id") != self._comm_id or not isinstance(data, dict) or "part" not in data:
            return False
        try:
            part, (buffer,) = data["part"], msg["buffers"]
            if not self._frames:
                self._frames = [bytearray(size) for size in part["sizes"]]
            frame, offset, view = self._frames[part["index"]], part["offset"], memoryview(buffer).cast("B")
            if not 0 <= offset <= len(frame) - len(view):
                raise ValueError(f"part [{offset}, {offset + len(view)}) outside a frame of {len(frame)} bytes")
            frame[offset : offset + len(view)] = view
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            self._error = self._error or f"{type(exc).__name__}: {exc}"
        return True

    def frames(self, data: dict[str, Any]) -> list[Any]:
        if self._error is not None or len(self._frames) != data["parts"]:
            raise ProtocolError(f"a reply sent in parts could not be put together ({self._error or 'parts missing'})")
        return list(self._frames)
