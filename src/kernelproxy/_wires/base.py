"""The wire contract: send and receive whole Jupyter messages on named channels.

A wire knows the bytes: sockets, signing, framing. It knows nothing of
requests and replies; ``KernelConnection`` routes what a wire delivers.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from jupyter_client.session import Session

# Called with (channel, message) for each verified message from the kernel; message has
# header, parent_header (a dict, never None), metadata, content, msg_type and buffers.
Deliver = Callable[[str, dict[str, Any]], None]
# A message encoded for the wire, without its binary buffers: built before a request is registered,
# so that one that cannot be encoded leaves no trace.
Encoded = list[Any]


class Wire(abc.ABC):
    """One connection to one kernel's channels (shell, control, iopub)."""

    session: Session  # builds message dicts (and signs them, where the wire signs)
    max_message_bytes: int | None = None  # the largest message the path carries; None: no limit
    rejected_messages = 0  # messages dropped for a bad signature or a bad format
    may_lose_replies = False  # a reconnect can lose replies (a server websocket): the agent keeps them for resends
    # Set by the connection: told what suggests the kernel was restarted (a missed heartbeat), and when the
    # wire reopened after a drop.
    hint: Callable[[str], None] | None = None
    reconnected: Callable[[], None] | None = None

    @property
    def description(self) -> str:
        """Appended to Kernel.info.transport: how messages travel, when not by the kernel's own sockets."""
        return ""

    @abc.abstractmethod
    async def start(self, deliver: Deliver) -> None:
        """Connect and start handing every incoming message to ``deliver``."""

    @abc.abstractmethod
    def encode(self, msg: dict[str, Any]) -> Encoded:
        """Encode a message (raises TypeError/ValueError if its JSON part cannot be encoded)."""

    @abc.abstractmethod
    async def send(self, channel: str, encoded: Encoded, buffers: list[Any] | None = None) -> None:
        """Send an encoded message, with binary buffers, without copying them where the wire can."""

    @abc.abstractmethod
    async def death(self) -> str | None:
        """Check, once, whether the kernel is still reachable; say why not, or None while it is.

        Called every second by the connection's monitor.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop reading and release the connection."""


def normalize(msg: dict[str, Any]) -> dict[str, Any]:
    """Some kernels send null parents (xeus-python's 'starting' status); readers expect dicts."""
    for part in ("parent_header", "content", "metadata"):
        if not isinstance(msg.get(part), dict):
            msg[part] = {}
    msg.setdefault("buffers", [])
    return msg
