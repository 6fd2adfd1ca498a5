"""The universal transport: base64 frames carried by silent execute requests.

Works with any Python kernel that evaluates ``user_expressions``. Nothing
passes through the cell machinery: the cell code is empty, the request is
silent and stores no history, and the agent is reached through an expression.
Replies come back in the expression's display bundle under the agent's MIME
type, never as text/plain.

Where frames travel:

* ``content`` mode (ipykernel >= 6, detected by the handshake): the base64
  text rides in an extra field of the execute_request content, which the
  agent reads from its parent message. Parsing JSON is cheap.
* ``literal`` mode (any other kernel): the base64 text is a string literal in
  the expression; compiling a large literal is slow (~70 MB/s here).

Large frames are chunked (``chunk_size``) with at most ``window`` chunks in
flight (one in literal mode), so neither side ever holds more than the
payload plus a few chunks.

Each agent call goes through ``once()`` with an id of its own: when its reply is
lost (a server websocket reconnected) it is sent again with the same id, and
the agent answers from what it kept instead of running it twice.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any, Callable

import pybase64

from .._connection import KernelConnection, RequestLost
from .._exceptions import ProtocolError, SerializationError
from ..agent import _agent as agent
from .base import AgentMissingError, Interrupter, IopubListener, Message, Outcome, Transport, kernel_refusal

CHUNK_SIZE = 16 * 1024 * 1024
WINDOW = 2
INLINE_LIMIT = 1024 * 1024  # frames up to this size in total travel in the request itself
EXPRESSION_KEY = "kernelproxy"
AGENT = f"__import__({agent.MODULE_NAME!r})"
RESENDS = 5  # times an agent call whose reply was lost is sent again before the request fails
LOST = (
    "the kernel ran kernelproxy's request, but its reply was lost on the way (the connection to the server "
    "dropped) and the kernel no longer keeps it"
)


class ExecuteTransport(Transport):
    name = "execute"

    def __init__(
        self,
        connection: KernelConnection,
        *,
        content_frames: bool,
        chunk_size: int = CHUNK_SIZE,
        window: int = WINDOW,
        inline_limit: int = INLINE_LIMIT,
        shell: str | None = None,
    ) -> None:
        self._conn = connection
        self._content_frames = content_frames
        self.shell = shell  # the subshell it runs requests on (None: the main shell)
        self._keep_replies = connection.wire.may_lose_replies  # the agent keeps answers until acknowledged
        self._acks: list[str] = []
        limit = connection.wire.max_message_bytes
        if limit is not None:  # base64 grows 4/3; leave room for the rest of the message
            chunk_size = min(chunk_size, (limit - 64 * 1024) * 3 // 4)
        self._chunk_size = chunk_size
        # Pipelining only where proven safe: xeus-python 0.19 stops answering when a large request
        # arrives while it runs another, so kernels without parent access get one chunk at a time.
        self._window = window if content_frames else 1
        self._inline_limit = inline_limit

    @property
    def description(self) -> str:
        return f"execute (base64 frames as {'request content' if self._content_frames else 'literals'})"

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
        rid = rid or uuid.uuid4().hex
        tid = uuid.uuid4().hex
        try:
            header_literal = repr(json.dumps(header))
        except (TypeError, ValueError) as exc:  # as the other transports say it: nothing was sent
            raise SerializationError(f"cannot encode the request's header as JSON: {exc}") from exc
        sizes = [memoryview(frame).nbytes for frame in frames]
        try:
            if sum(sizes) <= self._inline_limit:
                encoded = [_b64(frame) for frame in frames]
                if self._content_frames:
                    source, extra = "None", {agent.CONTENT_KEY: encoded}
                else:
                    source, extra = "[" + ",".join(f"'{text}'" for text in encoded) + "]", None
            else:
                await self._upload(tid, frames, sizes)
                source, extra = repr(tid), None
            args = f"globals(), {header_literal}, {source}, {self._inline_limit}, {tid!r}, {rid!r}"
            reply = await self.call(
                "ex", args, rid=rid, extra=extra, listener=listener, outcome=outcome, interrupter=interrupter
            )
            if "tid" in reply:
                out = await self._download(tid, reply.pop("sizes"))
            else:
                out = [_unb64(text) for text in reply.pop("frames")]
            return reply, out
        except BaseException:
            self._forget(tid)
            raise

    async def call(
        self,
        function: str,
        args: str,
        *,
        rid: str | None = None,
        extra: dict[str, Any] | None = None,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
        interrupter: Interrupter | None = None,
    ) -> Any:
        """Evaluate the agent's ``function(args)`` once, under a request id; sent again if its reply is lost."""
        rid = rid or uuid.uuid4().hex
        for attempt in range(RESENDS):
            acks, self._acks = self._acks, []
            expression = f"{AGENT}.once({rid!r}, {self._keep_replies}, {acks!r}, {AGENT}.{function}, {args})"
            try:
                payload = await self.expression(
                    expression, extra=extra, listener=listener, outcome=outcome, interrupter=interrupter
                )
            except RequestLost as exc:
                if attempt == RESENDS - 1:
                    raise ProtocolError(f"{exc}; sent {RESENDS} times, the reply never came") from exc
                continue
            if self._keep_replies:
                self._acks.append(rid)
            if isinstance(payload, dict) and payload.get("kind") == "lost":
                raise ProtocolError(LOST)
            return payload
        raise AssertionError("unreachable")

    async def expression(
        self,
        expression: str,
        *,
        extra: dict[str, Any] | None = None,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
        interrupter: Interrupter | None = None,
    ) -> Any:
        """Evaluate one agent expression; return the payload of its display bundle (or None)."""
        content = await self._conn.execute(
            {EXPRESSION_KEY: expression},
            extra=extra,
            listener=listener,
            outcome=outcome,
            shell=self.shell,
            interrupter=interrupter,
        )
        return read_expression_result(content, self.shell)

    # ------------------------------------------------------------------ chunking

    async def _upload(self, tid: str, frames: list[Any], sizes: list[int]) -> None:
        await self.call("alloc", f"{tid!r}, {sizes!r}")

        def chunk_sender(index: int, offset: int, view: memoryview) -> Callable[[], Awaitable[Any]]:
            def send() -> Awaitable[Any]:
                text = _b64(view)
                if self._content_frames:
                    return self.call("put", f"{tid!r}, {index}, {offset}", extra={agent.CONTENT_KEY: text})
                return self.call("put", f"{tid!r}, {index}, {offset}, '{text}'")

            return send

        senders = [
            chunk_sender(index, offset, view)
            for index, frame in enumerate(frames)
            for offset, view in _chunks(memoryview(frame).cast("B"), self._chunk_size)
        ]
        await self._pipelined(senders)

    async def _download(self, tid: str, sizes: list[int]) -> list[bytearray]:
        frames = [bytearray(size) for size in sizes]

        def chunk_fetcher(index: int, offset: int, size: int, last: bool) -> Callable[[], Awaitable[None]]:
            async def fetch() -> None:
                reply = await self.call("get", f"{tid!r}, {index}, {offset}, {size}, {last}")
                data = pybase64.b64decode(reply["data"], validate=True)
                frames[index][offset : offset + len(data)] = data

            return fetch

        chunks = [
            (index, offset, min(self._chunk_size, size - offset))
            for index, size in enumerate(sizes)
            for offset in range(0, size, self._chunk_size)
        ]
        # The kernel runs requests in order, so the last get() may free the parked reply.
        await self._pipelined([chunk_fetcher(*chunk, last=chunk is chunks[-1]) for chunk in chunks])
        return frames

    async def _pipelined(self, steps: list[Callable[[], Awaitable[Any]]]) -> None:
        """Run steps in order with at most ``window`` in flight (the kernel runs them one by one)."""
        in_flight: list[asyncio.Future[Any]] = []
        try:
            for step in steps:
                if len(in_flight) >= self._window:
                    await in_flight.pop(0)
                in_flight.append(asyncio.ensure_future(step()))
            for future in in_flight:
                await future
        finally:
            for future in in_flight:
                future.cancel()

    def _forget(self, tid: str) -> None:
        """Free a transfer in the kernel without waiting (it is queued behind the transfer's requests)."""
        if self._conn.dead is None:
            task = asyncio.ensure_future(self.expression(f"{AGENT}.free({tid!r})"))
            task.add_done_callback(_ignore_result)


def read_expression_result(content: dict[str, Any], shell: str | None = None) -> Any:
    """Extract the agent's payload from an execute_reply; raise ProtocolError if there is none."""
    if content.get("ename") == "UnknownSubshellError":
        raise kernel_refusal(content["ename"], content.get("evalue", ""), shell)
    if content.get("status") != "ok":
        raise ProtocolError(
            f"the kernel rejected kernelproxy's request: {content.get('ename')}: {content.get('evalue')}"
        )
    result = content.get("user_expressions", {}).get(EXPRESSION_KEY)
    if result is None:
        raise ProtocolError("the kernel did not evaluate user_expressions (is it a Python kernel?)")
    if result.get("status") != "ok":
        ename, evalue = result.get("ename", "?"), result.get("evalue", "")
        if ename == "ModuleNotFoundError" and agent.MODULE_NAME in evalue:
            raise AgentMissingError("the kernelproxy agent is not installed in the kernel")
        raise ProtocolError(f"kernelproxy's agent failed in the kernel: {ename}: {evalue}")
    return result.get("data", {}).get(agent.MIME)


def _chunks(view: memoryview, size: int) -> list[tuple[int, memoryview]]:
    return [(offset, view[offset : offset + size]) for offset in range(0, view.nbytes, size)] or [(0, view)]


def _b64(frame: Any) -> str:
    return pybase64.b64encode(frame).decode("ascii")


def _unb64(text: str) -> bytearray:
    return bytearray(pybase64.b64decode(text, validate=True))  # bytearray: values built on it stay writable


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
