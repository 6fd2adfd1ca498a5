"""The transport contract: carry one request (header + frames) to the agent, return its reply.

A transport knows how bytes travel (base64 in execute requests, binary comm
frames, a websocket...), nothing about what they mean. Everything above it,
serialization, errors, timeouts, works the same over any transport.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from .._connection import IopubListener as IopubListener  # re-exported for the transports
from .._exceptions import ProtocolError
from .._protocol import Message as Message
from .._protocol import Outcome as Outcome


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
    async def request(
        self,
        header: Mapping[str, Any],
        frames: list[Any],
        *,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
    ) -> Message:
        """Send one request; return the agent's reply header and frames.

        ``listener`` receives the IOPub messages (stream output...) the request causes;
        ``outcome`` records how far the request got, for its caller.
        Cancelling the awaiting task abandons the request and interrupts its remote work.
        """

    async def close(self) -> None:  # noqa: B027 - a transport may hold nothing
        """Release what the transport holds in the kernel and on the host."""
