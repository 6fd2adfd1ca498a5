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

Each request carries an id (``rid``): sent again after its reply was lost, it
is answered from what the agent kept, never run twice. A comm lives in one
kernel process: a kernel restarted by someone else drops our messages with
only 'idle' to show for them (``reply_grace``), and the kernel state opens a
new comm. A comm opened on a subshell runs its requests on that subshell's
thread.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping
from typing import Any

from .._connection import KernelConnection, Match, RequestLost
from .._exceptions import ProtocolError
from ..agent import _agent as agent
from .base import Interrupter, IopubListener, Message, Outcome, Transport, kernel_refusal

DIGESTS = ("blake3", "sha256")  # offered to the agent, best first
PROBE_SIZE = 256 * 1024  # bytes echoed at negotiation: proves binary buffers survive the path
PART_OVERHEAD = 64 * 1024  # room left in a wire message for the JSON around a part's bytes
# Seconds after the kernel's 'idle' for a request with no reply before it counts as unanswered: replies on
# IOPub come before 'idle' (same socket); replies on shell travel beside it and may come a little later.
REPLY_GRACE = {"iopub": 0.2, "shell": 1.0}
OPEN_ATTEMPTS = 3


def digest_frames(algorithm: str, frames: list[Any]) -> str:
    """Hash all frames, in order, as the agent does."""
    if algorithm == "blake3" and _forked:
        return _blake3_one_thread(frames)
    return str(agent.DIGESTS[algorithm](frames))  # type: ignore[no-untyped-call]


def _blake3_one_thread(frames: list[Any]) -> str:
    """blake3 without its thread pool, which a forked child inherits without its threads (it would hang)."""
    import blake3  # type: ignore[import-not-found, unused-ignore]

    hasher = blake3.blake3(max_threads=1)
    for frame in frames:
        hasher.update(frame)
    return str(hasher.hexdigest())


_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class CommTransport(Transport):
    name = "comm"

    def __init__(
        self,
        connection: KernelConnection,
        comm_id: str,
        digest: str,
        *,
        part_size: int | None,
        reply_on: str,
        shell: str | None = None,
    ) -> None:
        self._conn = connection
        self._comm_id = comm_id
        self.digest = digest
        self._part_size = part_size  # None: frames travel whole
        self._reply_on = reply_on
        self.shell = shell  # the subshell it runs requests on (None: the main shell)
        self._keep_replies = connection.wire.may_lose_replies  # the agent keeps replies until acknowledged
        self._acks: list[str] = []  # request ids whose replies arrived, acknowledged with the next request

    @property
    def description(self) -> str:
        parts = f", in parts of {self._part_size // 2**20} MiB" if self._part_size else ""
        return f"comm (binary buffers, {self.digest} digest, replies on {self._reply_on}{parts})"

    @property
    def comm_id(self) -> str:
        return self._comm_id

    @classmethod
    async def open(
        cls, connection: KernelConnection, timeout: float = 10.0, *, shell: str | None = None
    ) -> CommTransport:
        """Open the agent's comm (on ``shell``, a subshell) and prove a binary round trip.

        Raises ProtocolError if the kernel cannot. Opened again if a reply was lost (a server connection
        that dropped meanwhile).
        """
        for attempt in range(OPEN_ATTEMPTS):
            try:
                return await cls._open(connection, timeout, shell)
            except RequestLost:
                if attempt == OPEN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    async def _open(cls, connection: KernelConnection, timeout: float, shell: str | None) -> CommTransport:
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
            matcher = _CommReply(comm_id, parts=False, wait_idle=False)
            opening = connection.request("shell", "comm_open", content, matcher=matcher, shell=shell)
            reply = await asyncio.wait_for(opening, timeout)
        except asyncio.TimeoutError as exc:
            raise ProtocolError(f"the kernel did not answer kernelproxy's comm_open within {timeout} s") from exc
        if reply["msg_type"] == "comm_reply":  # refused by the kernel itself (a subshell it does not have)
            raise kernel_refusal(reply["content"].get("ename", "?"), reply["content"].get("evalue", ""), shell)
        opened = reply["content"].get("data", {})
        algorithm = opened.get("opened")
        if reply["msg_type"] != "comm_msg" or algorithm not in DIGESTS:
            raise ProtocolError(f"the kernel refused kernelproxy's comm: {reply['content']!r:.200}")
        reply_on = opened.get("reply_on", "iopub")
        transport = cls(connection, comm_id, algorithm, part_size=part_size, reply_on=reply_on, shell=shell)
        probe = os.urandom(PROBE_SIZE)
        header, frames = await asyncio.wait_for(transport.request({"op": "echo"}, [probe]), timeout)
        if header.get("status") != "ok" or len(frames) != 1 or bytes(frames[0]) != probe:
            raise ProtocolError("binary buffers did not survive a round trip through the kernel's comms")
        return transport

    async def request(
        self,
        header: Mapping[str, Any],
        frames: list[Any],
        *,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
        rid: str | None = None,
        interrupter: Interrupter | None = None,
    ) -> Message:
        data: dict[str, Any] = {"header": header, "digest": digest_frames(self.digest, frames)}
        if rid is not None:
            data["rid"] = rid
        if self._keep_replies:
            data["keep_reply"] = True
        matcher = self.reply_matcher()
        if self._acks:
            data["ack"], self._acks = self._acks, []
        if self._part_size is not None and sum(memoryview(f).nbytes for f in frames) > self._part_size:
            data["upload"] = uuid.uuid4().hex
            await self._send_parts(data["upload"], frames)
            frames = []
        content = {"comm_id": self._comm_id, "data": data}
        reply = await self._conn.request(
            "shell",
            "comm_msg",
            content,
            buffers=frames,
            listener=listener,
            matcher=matcher,
            outcome=outcome,
            shell=self.shell,
            interrupter=interrupter,
        )
        if rid is not None and self._keep_replies:
            self._acks.append(rid)
        if reply["msg_type"] == "comm_close":
            raise ProtocolError(f"the kernel closed kernelproxy's comm: {reply['content'].get('data')!r:.200}")
        if reply["msg_type"] != "comm_msg":  # the kernel refused the message itself (a subshell it does not have)
            content = reply["content"]
            raise kernel_refusal(content.get("ename", "?"), content.get("evalue", ""), self.shell)
        data = reply["content"].get("data", {})
        buffers = matcher.frames(data) if "parts" in data else reply.get("buffers", [])
        if data.get("digest") != digest_frames(self.digest, buffers):
            raise ProtocolError(
                "a reply's binary buffers do not match their signed digest (altered in transit?); "
                "refused, not unpickled"
            )
        reply_header = data.get("header")
        if not isinstance(reply_header, dict):
            raise ProtocolError(f"malformed reply from the kernel's agent: {data!r:.200}")
        return reply_header, list(buffers)

    def reply_matcher(self) -> _CommReply:
        """Recognises the reply to one request on this comm."""
        # On IOPub the reply comes after the call's output (the agent flushes first): no 'idle' to wait for.
        return _CommReply(
            self._comm_id,
            parts=self._part_size is not None,
            wait_idle=self._reply_on != "iopub",
            reply_grace=REPLY_GRACE.get(self._reply_on, REPLY_GRACE["shell"]),
        )

    async def _send_parts(self, upload: str, frames: list[Any]) -> None:
        """Send the frames of one request as parts no bigger than the wire carries, ahead of the request.

        If this is interrupted, the agent's half-built upload is dropped with an ``abort`` part.
        """
        assert self._part_size is not None
        try:
            for fields, piece in agent.split_parts(frames, self._part_size):  # type: ignore[no-untyped-call]
                content = {"comm_id": self._comm_id, "data": {"part": {"upload": upload, **fields}}}
                await self._conn.send("shell", "comm_msg", content, [piece], shell=self.shell)
        except BaseException:
            if self._conn.dead is None:
                abort = {"comm_id": self._comm_id, "data": {"part": {"upload": upload, "abort": True}}}
                await asyncio.shield(self._conn.send("shell", "comm_msg", abort, shell=self.shell))
            raise

    async def close(self) -> None:
        if self._conn.dead is None:
            await self._conn.send("shell", "comm_close", {"comm_id": self._comm_id, "data": {}}, shell=self.shell)


class _CommReply:
    """Matches the reply to a comm request: the next message on our comm (comm_msg or comm_close), on any channel.

    Where the wire limits message size, the reply's frames may come first as
    ``part`` messages; they are consumed here and put together.
    """

    def __init__(self, comm_id: str, *, parts: bool, wait_idle: bool, reply_grace: float | None = None) -> None:
        self._comm_id = comm_id
        self._parts = parts
        self.wait_idle = wait_idle
        self.reply_grace = reply_grace
        self._assembly: Any = agent.PartsAssembly()  # type: ignore[no-untyped-call]
        self._error: str | None = None

    def __call__(self, channel: str, msg: dict[str, Any]) -> Match:
        content = msg["content"]
        if channel == "shell" and msg["msg_type"] == "comm_reply" and content.get("status") == "error":
            return "reply"  # the kernel refused the comm message (ipykernel 7: a subshell it does not have)
        if msg["msg_type"] not in ("comm_msg", "comm_close") or content.get("comm_id") != self._comm_id:
            return "other"
        data = content.get("data")
        if isinstance(data, dict) and "part" in data:
            try:
                self._assembly.add(data["part"], msg.get("buffers", []))
            except ValueError as exc:
                self._error = self._error or str(exc)
            return "part"
        return "reply"

    def frames(self, data: dict[str, Any]) -> list[Any]:
        if not self._parts:
            raise ProtocolError("the kernel's agent sent a reply in parts over a wire that needs none")
        frames = self._assembly.frames or []
        if self._error is not None or len(frames) != data["parts"]:
            raise ProtocolError(f"a reply sent in parts could not be put together ({self._error or 'parts missing'})")
        return list(frames)
