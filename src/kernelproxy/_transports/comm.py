"""The fast transport: frames as binary buffers of comm messages, zero-copy.

Requests go to the kernel as ``comm_msg`` on the shell channel with the
pickle's out-of-band buffers attached as separate zmq frames (sent without
copying); replies come back as ``comm_msg`` on IOPub and are read without
copying (pyzmq ``copy=False``), so values are rebuilt on the received memory.

Jupyter's HMAC signs header, parent, metadata and content, not buffers: each
message carries a digest of its buffers inside its (signed) data, checked on
both sides before anything is unpickled.

Caveat: replies travel on IOPub, which every client of the kernel receives.
For a kernel shared with a notebook frontend, its server relays them too.
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


def digest_frames(algorithm: str, frames: list[Any]) -> str:
    """Hash all frames, in order (must match the agent's DIGESTS)."""
    hasher: Any = blake3.blake3(max_threads=blake3.blake3.AUTO) if algorithm == "blake3" else hashlib.sha256()
    for frame in frames:
        hasher.update(frame)
    return str(hasher.hexdigest())


class CommTransport(Transport):
    name = "comm"

    def __init__(self, connection: KernelConnection, comm_id: str, digest: str) -> None:
        self._conn = connection
        self._comm_id = comm_id
        self.digest = digest
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    @property
    def description(self) -> str:
        return f"comm (binary buffers, {self.digest} digest)"

    @classmethod
    async def open(cls, connection: KernelConnection, timeout: float = 10.0) -> CommTransport:
        """Open the agent's comm and prove a binary round trip; raise ProtocolError if the kernel cannot."""
        comm_id = uuid.uuid4().hex
        content = {"comm_id": comm_id, "target_name": agent.COMM_TARGET, "data": {"digests": list(DIGESTS)}}
        try:
            reply = await asyncio.wait_for(connection.request("shell", "comm_open", content, comm_id=comm_id), timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"the kernel did not answer kernelproxy's comm_open within {timeout} s") from None
        algorithm = reply["content"].get("data", {}).get("opened")
        if reply["msg_type"] != "comm_msg" or algorithm not in DIGESTS:
            raise ProtocolError(f"the kernel refused kernelproxy's comm: {reply['content']!r:.200}")
        transport = cls(connection, comm_id, algorithm)
        probe = os.urandom(PROBE_SIZE)
        header, frames = await asyncio.wait_for(transport.request({"op": "echo"}, [probe]), timeout)
        if header.get("status") != "ok" or len(frames) != 1 or bytes(frames[0]) != probe:
            raise ProtocolError("binary buffers did not survive a round trip through the kernel's comms")
        return transport

    async def request(self, header: dict[str, Any], frames: list[Any], *, listener: IopubListener | None = None) -> Message:
        data = {"header": header, "digest": digest_frames(self.digest, frames)}
        content = {"comm_id": self._comm_id, "data": data}
        async with self._slots:
            reply = await self._conn.request(
                "shell", "comm_msg", content, buffers=frames, listener=listener, comm_id=self._comm_id
            )
        if reply["msg_type"] == "comm_close":
            raise ProtocolError(f"the kernel closed kernelproxy's comm: {reply['content'].get('data')!r:.200}")
        data = reply["content"].get("data", {})
        buffers = reply.get("buffers", [])
        if data.get("digest") != digest_frames(self.digest, buffers):
            raise ProtocolError(
                "a reply's binary buffers do not match their signed digest (altered in transit?); refused, not unpickled"
            )
        reply_header = data.get("header")
        if not isinstance(reply_header, dict):
            raise ProtocolError(f"malformed reply from the kernel's agent: {data!r:.200}")
        return reply_header, list(buffers)

    async def close(self) -> None:
        if self._conn.dead is None:
            await self._conn.send("shell", "comm_close", {"comm_id": self._comm_id, "data": {}})
