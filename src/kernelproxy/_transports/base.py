"""The transport contract: carry one request (header + frames) to the agent, return its reply.

A transport knows how bytes travel (base64 in execute requests, binary comm
frames, a websocket...), nothing about what they mean. Everything above it,
serialization, errors, timeouts, works the same over any transport.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, List, Tuple

from .._connection import IopubListener as IopubListener  # re-exported for the transports
from .._exceptions import ProtocolError

# A request or reply: the JSON-able header and the binary frames (see agent/_agent.py).
Message = Tuple[Dict[str, Any], List[Any]]


class AgentMissingError(ProtocolError):
    """The agent is not installed in the kernel (it was restarted by someone else): reinstall and retry."""


class Transport(abc.ABC):
    """How requests reach the kernel's agent."""

    name: ClassVar[str]

    @property
    def description(self) -> str:
        """How this transport carries data, for ``Kernel.info.transport``."""
        return self.name

    @abc.abstractmethod
    async def request(self, header: dict[str, Any], frames: list[Any], *, listener: IopubListener | None = None) -> Message:
        """Send one request; return the agent's reply header and frames.

        ``listener`` receives the IOPub messages (stream output...) the request causes.
        Cancelling the awaiting task abandons the request and interrupts its remote work.
        """

    async def close(self) -> None:
        """Release what the transport holds in the kernel and on the host."""
