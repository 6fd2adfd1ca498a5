"""The fake wire: a connection to a kernel living in this process (``FakeKernel``), for tests.

It keeps the wire contract as the real wires do, so what runs above it
(``KernelConnection``, both transports, the agent handshake) cannot tell:
messages travel as JSON (packed with the session's packer, so what cannot be
encoded fails in ``encode`` as on a real wire, and values arrive as JSON makes
them), buffers are copied (the kernel's memory is not ours), every message is
delivered on the wire's event loop, in order, never inside ``send``.

Tests drive faults deterministically: ``drop``, ``delay`` or ``corrupt`` the
next messages that match, in either direction; ``kernel.die()`` kills the
kernel, which ``death()`` then reports. A ``max_message_bytes`` makes it a
size-limited path like a Jupyter Server's websocket (the comm transport then
sends frames in parts and asks for replies on shell); a bigger message is
dropped, as a server would refuse it.

Not modelled: signatures (nothing is signed), heartbeats (the kernel is alive
until it dies), the websocket's reconnection, several processes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

import orjson
from jupyter_client.session import Session

from ._fake_kernel import FakeKernel
from .base import Deliver, Encoded, Wire, normalize

log = logging.getLogger("kernelproxy")

Direction = Literal["to_kernel", "from_kernel"]
Match = Callable[[str, dict[str, Any]], bool]  # (channel, message) -> whether a fault applies to it


@dataclass(eq=False)
class Fault:
    """What to do to the next ``times`` messages that ``match`` (None: to all of them)."""

    direction: Direction
    match: Match
    action: Literal["drop", "delay", "corrupt"]
    seconds: float = 0.0
    times: int | None = 1
    hits: int = 0  # messages it applied to so far


class FakeWire(Wire):
    def __init__(self, kernel: FakeKernel, *, max_message_bytes: int | None = None) -> None:
        self.kernel = kernel
        self.max_message_bytes = max_message_bytes
        # Builds message dicts; nothing is signed (the key only keeps Session from warning).
        self.session = Session(key=uuid.uuid4().hex.encode(), session=uuid.uuid4().hex)
        self.faults: list[Fault] = []
        self.oversized_messages = 0  # messages over max_message_bytes, dropped
        self._deliver: Deliver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def description(self) -> str:
        return " over a fake wire (a kernel in this process)"

    # ------------------------------------------------------------------ faults

    def drop(self, match: Match, *, direction: Direction = "from_kernel", times: int | None = 1) -> Fault:
        """Lose the next ``times`` matching messages."""
        return self._add(Fault(direction, match, "drop", times=times))

    def delay(
        self, match: Match, seconds: float, *, direction: Direction = "from_kernel", times: int | None = 1
    ) -> Fault:
        """Hold the next ``times`` matching messages for ``seconds``; the others overtake them."""
        return self._add(Fault(direction, match, "delay", seconds, times))

    def corrupt(self, match: Match, *, times: int | None = 1) -> Fault:
        """Garble the next ``times`` matching messages from the kernel: dropped and counted in rejected_messages."""
        return self._add(Fault("from_kernel", match, "corrupt", times=times))

    def _add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def _fault_for(self, direction: Direction, channel: str, msg: dict[str, Any]) -> Fault | None:
        for fault in self.faults:
            live = fault.direction == direction and (fault.times is None or fault.hits < fault.times)
            if live and fault.match(channel, msg):
                fault.hits += 1
                return fault
        return None

    # ------------------------------------------------------------------ the wire contract

    async def start(self, deliver: Deliver) -> None:
        self._loop = asyncio.get_running_loop()
        self._deliver = deliver
        self.kernel.attach(self)

    def encode(self, msg: dict[str, Any]) -> Encoded:
        pack = self.session.pack
        return [pack(msg["header"]), pack(msg["parent_header"]), pack(msg["metadata"]), pack(msg["content"])]

    async def send(self, channel: str, encoded: Encoded, buffers: list[Any] | None = None) -> None:
        if self._closed or self._loop is None:
            raise RuntimeError("the fake wire is not open")
        copies = [bytearray(buffer) for buffer in buffers or []]  # the kernel's memory is not ours
        if self.max_message_bytes is not None:
            size = sum(len(part) for part in encoded) + sum(len(copy) for copy in copies)
            if size > self.max_message_bytes:
                self.oversized_messages += 1
                log.warning("fake wire: dropped a %d-byte message over the limit of %d", size, self.max_message_bytes)
                return
        msg = _decode(list(encoded), copies)
        fault = self._fault_for("to_kernel", channel, msg)
        if fault is None:
            self.kernel.receive(self, channel, msg)
        elif fault.action == "delay":
            self._loop.call_later(fault.seconds, self._receive_late, channel, msg)

    def _receive_late(self, channel: str, msg: dict[str, Any]) -> None:
        if not self._closed:
            self.kernel.receive(self, channel, msg)

    async def death(self) -> str | None:
        return self.kernel.death

    async def close(self) -> None:
        self._closed = True
        self.kernel.detach(self)

    # ------------------------------------------------------------------ from the kernel (its threads)

    def post(self, channel: str, parts: list[bytes], buffers: list[bytearray]) -> None:
        """Called by the kernel from its threads: hand the message to this wire's loop."""
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._arrive, channel, parts, buffers)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    def _arrive(self, channel: str, parts: list[bytes], buffers: list[bytearray]) -> None:
        if self._closed or self._deliver is None or self._loop is None:
            return
        msg = _decode(parts, buffers)
        fault = self._fault_for("from_kernel", channel, msg)
        if fault is None:
            self._deliver(channel, msg)
        elif fault.action == "delay":
            self._loop.call_later(fault.seconds, self._deliver_late, channel, msg)
        elif fault.action == "corrupt":
            self.rejected_messages += 1
            log.warning("fake wire: dropped a message from the kernel that failed verification (a corrupt fault)")

    def _deliver_late(self, channel: str, msg: dict[str, Any]) -> None:
        if not self._closed and self._deliver is not None:
            self._deliver(channel, msg)


def _decode(parts: list[Any], buffers: list[bytearray]) -> dict[str, Any]:
    header, parent, metadata, content = (orjson.loads(bytes(part)) for part in parts[:4])
    msg = {
        "header": header,
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": buffers,
    }
    return normalize(msg)
