"""The in-process transport: requests go straight to the agent's ``dispatch`` in a fake kernel.

No messages, no base64, no digests: for tests of everything above the
transport (serialization, errors, refs, timeouts, the pool) at a fraction of
a millisecond per call. It keeps the transport contract as the real ones do:

* the header travels as JSON (what cannot be encoded raises SerializationError,
  before anything is queued) and frames are *copied* both ways: the kernel's
  memory is not ours, and a value changed on one side must not change on the other;
* requests run one at a time, in order, on the kernel's main thread, queued
  with the requests its wires bring;
* what a request prints reaches ``listener`` as IOPub ``stream`` messages, before the reply;
* ``outcome`` records the request's fate as ``KernelConnection`` does: sent,
  running, answered; when abandoned (the caller was cancelled) it is
  interrupted if running (answered, or ignored within the connection's
  ``INTERRUPT_GRACE``), else recorded as queued behind what runs and
  interrupted as soon as it starts; a kernel that dies fails it with KernelDiedError.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import _connection as connection_module
from .._bootstrap import install_expression
from .._exceptions import KernelDiedError, ProtocolError, SerializationError
from .._protocol import Interrupt, Stage
from .._wires._fake_kernel import DirectCall, FakeKernel
from ..agent import _agent as agent
from .base import AgentMissingError, Interrupter, IopubListener, Message, Outcome, Transport


@dataclass(eq=False)
class _Pending:
    call_id: str
    reply: asyncio.Future[Message]
    outcome: Outcome
    listener: IopubListener | None
    interrupted: asyncio.Future[None] | None = field(default=None)


class InProcessTransport(Transport):
    name = "inprocess"

    def __init__(self, kernel: FakeKernel) -> None:
        self._kernel = kernel

    @property
    def description(self) -> str:
        return "inprocess (the agent's dispatch called directly, frames copied)"

    @classmethod
    async def open(cls, kernel: FakeKernel) -> InProcessTransport:
        """Install the agent as the handshake does (its expression, run in the kernel) unless it is there."""
        transport = cls(kernel)
        if agent.MODULE_NAME not in kernel.python.modules.own:
            expression = install_expression(uuid.uuid4().hex)
            namespace = kernel.python.user_ns
            bundle = await transport._run(lambda: eval(expression, namespace), None, Outcome())
            hello = bundle.payload
            if not isinstance(hello, dict) or hello.get("protocol") != agent.PROTOCOL:
                raise ProtocolError(f"the agent answered the handshake with {hello!r:.200}")
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
        # No reply is ever lost in process: ``rid`` (for sending a request again) is not needed, and the
        # fake kernel has one shell, interrupted as the connection does it (``interrupter`` is for subshells).
        outcome = outcome if outcome is not None else Outcome()
        try:
            header_json = json.dumps(header)  # as any wire would: before anything is queued
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"cannot encode the request header (its JSON part): {exc}") from exc
        copies = [bytearray(frame) for frame in frames]
        module = self._kernel.python.modules.own.get(agent.MODULE_NAME)
        if module is None:
            raise AgentMissingError("the kernelproxy agent is not installed in the kernel")
        namespace = self._kernel.python.user_ns

        def run() -> Message:
            reply, out = module.dispatch(json.loads(header_json), copies, namespace)
            # Copied on the kernel's thread, before later requests can change what the frames show.
            return json.loads(json.dumps(reply)), [bytearray(frame) for frame in out]

        result: Message = await self._run(run, listener, outcome)
        return result

    async def _run(self, fn: Any, listener: IopubListener | None, outcome: Outcome) -> Any:
        if self._kernel.death is not None:
            raise KernelDiedError(self._kernel.death)
        loop = asyncio.get_running_loop()
        pending = _Pending("", loop.create_future(), outcome, listener)
        call = DirectCall(
            fn,
            started=lambda: _post(loop, self._started, pending),
            output=lambda name, text: _post(loop, self._output, pending, name, text),
            done=lambda result, error: _post(loop, self._finished, pending, result, error),
            died=KernelDiedError,
        )
        pending.call_id = outcome.msg_id = call.id
        outcome.stage = Stage.SENT
        self._kernel.submit(call)
        try:
            return await asyncio.shield(pending.reply)
        except asyncio.CancelledError:
            if not pending.reply.done():
                await asyncio.shield(self._abandon(pending))
            raise

    # ------------------------------------------------------------------ on the loop, posted by the kernel

    def _started(self, pending: _Pending) -> None:
        outcome = pending.outcome
        if outcome.stage is Stage.SENT:
            outcome.stage = Stage.RUNNING
        if outcome.abandoned and outcome.interrupt is Interrupt.NONE and not pending.reply.done():
            asyncio.ensure_future(self._interrupt_and_wait(pending))  # abandoned while queued; started now

    def _output(self, pending: _Pending, name: str, text: str) -> None:
        if pending.listener is not None and not pending.reply.done():
            pending.listener(_stream_message(pending.call_id, name, text))

    def _finished(self, pending: _Pending, result: Any, error: BaseException | None) -> None:
        if isinstance(error, KernelDiedError):
            pending.outcome.died = error
        else:
            pending.outcome.stage = Stage.ANSWERED
        if pending.reply.done():
            return
        if error is not None and not isinstance(error, KernelDiedError):
            # Raised outside dispatch (an interrupt landing as the reply was copied): the kernel's exception,
            # maybe a KeyboardInterrupt, must not act here. The execute transport says the same of it.
            cause = error
            error = ProtocolError(f"kernelproxy's agent failed in the kernel: {type(cause).__name__}: {cause}")
            error.__cause__ = cause
        if error is not None:
            pending.reply.set_exception(error)
            pending.reply.exception()  # an abandoned request's failure is nobody's error
        else:
            pending.reply.set_result(result)

    # ------------------------------------------------------------------ abandoning

    async def _abandon(self, pending: _Pending) -> None:
        outcome = pending.outcome
        outcome.abandoned = True
        running = self._kernel.running
        if outcome.stage is Stage.RUNNING:
            await self._interrupt_and_wait(pending)
        elif running is not None and running != pending.call_id:
            outcome.queued_behind = running  # _started() interrupts it when it starts

    async def _interrupt_and_wait(self, pending: _Pending) -> None:
        outcome = pending.outcome
        outcome.interrupt = Interrupt.ANSWERED  # once only, as the connection does
        self._kernel.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(pending.reply), connection_module.INTERRUPT_GRACE)
        except asyncio.TimeoutError:
            outcome.interrupt = Interrupt.IGNORED
        except Exception:
            pass  # it failed or died: recorded by _finished()


def _post(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody waits any more


def _stream_message(parent_id: str, name: str, text: str) -> dict[str, Any]:
    """What a kernel publishes on IOPub for printed output, shaped as a wire delivers it."""
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "stream"}
    return {
        "header": header,
        "msg_id": header["msg_id"],
        "msg_type": "stream",
        "parent_header": {"msg_id": parent_id},
        "metadata": {},
        "content": {"name": name, "text": text},
        "buffers": [],
    }
