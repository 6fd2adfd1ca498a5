"""The transport contract: carry one request (header + frames) to the agent, return its reply.

A transport knows how bytes travel (base64 in execute requests, binary comm
frames, a websocket...), nothing about what they mean. Everything above it,
serialization, errors, timeouts, works the same over any transport.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Mapping
from typing import Any, Callable, ClassVar

from .._connection import IopubListener as IopubListener  # re-exported for the transports
from .._exceptions import ProtocolError
from .._protocol import Message as Message
from .._protocol import Outcome as Outcome

Interrupter = Callable[[], Awaitable[None]]  # stops one request's remote work (a subshell's: not SIGINT)


class AgentMissingError(ProtocolError):
    """The agent is not installed in the kernel (it was restarted by someone else): reinstall and retry."""


class SubshellMissingError(ProtocolError):
    """The kernel has no such subshell (it was restarted, or someone deleted it): make a new one and retry."""


def kernel_refusal(ename: str, evalue: str, shell: str | None) -> ProtocolError:
    """The error for a message the kernel itself refused (an error ``*_reply`` instead of the agent's answer)."""
    if ename == "UnknownSubshellError":
        return SubshellMissingError(f"the kernel has no subshell {shell} (restarted, or the subshell was deleted)")
    return ProtocolError(f"the kernel refused kernelproxy's message: {ename}: {evalue}")


class Transport(abc.ABC):
    """How requests reach the kernel's agent."""

    name: ClassVar[str]
    shell: str | None = None  # the subshell it runs requests on (None: the main shell)

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
        rid: str | None = None,
        interrupter: Interrupter | None = None,
    ) -> Message:
        """Send one request; return the agent's reply header and frames.

        ``listener`` receives the IOPub messages (stream output...) the request causes;
        ``outcome`` records how far the request got, for its caller. ``rid``: the
        request's id, the same when it is sent again (the agent runs it once).
        Cancelling the awaiting task abandons the request and interrupts its
        remote work (with ``interrupter``, when given). Raises ``RequestLost``
        when the reply will not come: send it again.
        """

    async def close(self) -> None:  # noqa: B027 - a transport may hold nothing
        """Release what the transport holds in the kernel and on the host."""

    def discard(self) -> None:  # noqa: B027 - a transport may hold nothing here
        """Release what the transport holds on the host, sending nothing (the kernel is gone or restarting)."""
