"""The peers of the conformance suites: the fakes, and the real kernels they stand for.

A *site* is one kernel (a process, or a fake one) that tests open connections
to; every suite case runs against each site kind, so the fakes cannot drift
from what real kernels do:

* "fake": a ``FakeKernel`` in this process, reached through the fake wire;
* "zmq": a real ipykernel started by hand (as Jupyter does), through its own sockets;
* "websocket": a kernel of the session's real ``jupyter server``, through its websocket.

Transports run over a site: comm or execute over a wire, or "inprocess"
(the agent's dispatch on a fake kernel's main thread).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable

from helpers import JupyterServer, start_external_kernel, stop_external_kernel
from jupyter_client.asynchronous.client import AsyncKernelClient

from kernelproxy._bootstrap import install_agent
from kernelproxy._connection import KernelConnection, ProcessCheck
from kernelproxy._launch import zmq_context
from kernelproxy._protocol import Outcome, Stage
from kernelproxy._server import ServerAddress, ServerClient, _while_busy
from kernelproxy._transports.base import Transport
from kernelproxy._transports.comm import CommTransport
from kernelproxy._transports.execute import ExecuteTransport
from kernelproxy._transports.inprocess import InProcessTransport
from kernelproxy._transports.lane import LaneTransport
from kernelproxy._wires._fake_kernel import FakeKernel
from kernelproxy._wires.base import Wire
from kernelproxy._wires.fake import FakeWire
from kernelproxy._wires.websocket_wire import WebsocketWire
from kernelproxy._wires.zmq_wire import ZmqWire

WIRE_PEERS = ["fake", "zmq", "websocket"]
TRANSPORT_PEERS = [
    "fake-comm",
    "fake-execute",
    "inprocess",
    "zmq-comm",
    "zmq-execute",
    "zmq-lane",  # the lane beside a real local ipykernel's channels (Unix socket, shared memory)
    # A size-limited path, as through a Jupyter Server: frames travel in parts, replies come on shell.
    "fake-comm-parts",
    "websocket-comm-parts",
]
PART_LIMIT = 1024 * 1024  # the "-parts" peers' message limit: the suite's 2.5 MB frames need parts
READY_TIMEOUT = 60.0  # a real kernel starting on a busy 2-core machine
# Seconds from a kill until waiting requests fail: a local process is polled every 0.1 s; a server
# notices in about 0.5 s (the suite's server runs its restarter at that interval) and says so on IOPub.
DEATH_WITHIN = {"fake": 1.5, "zmq": 5.0, "websocket": 10.0}

Record = list[tuple[str, dict[str, Any]]]


def run(coro: Awaitable[Any], timeout: float = 90) -> Any:
    """Run one test's coroutine on a fresh event loop, with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``condition()`` is true, polling; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


class Site(abc.ABC):
    """One kernel that tests connect to."""

    kind: str

    @abc.abstractmethod
    def wire(self) -> Wire:
        """A new wire to the kernel (inside a running event loop)."""

    def process_check(self) -> ProcessCheck | None:
        return None

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the kernel's process (a server then restarts it, and says so)."""

    async def kill_for_good(self) -> None:
        """Make the kernel gone for good (a server's kernel is deleted there)."""
        await self.kill()

    async def close_connection(self, conn: KernelConnection) -> None:
        """Close a connection of ``connected()`` and what ``wire()`` made for it: the event loop ends soon after."""
        await conn.close()

    def close(self) -> None:  # noqa: B027 - most sites stop nothing
        """Stop the kernel."""


class FakeSite(Site):
    kind = "fake"

    def __init__(self, max_message_bytes: int | None = None) -> None:
        self.kernel = FakeKernel()
        self.max_message_bytes = max_message_bytes

    def wire(self) -> FakeWire:
        return FakeWire(self.kernel, max_message_bytes=self.max_message_bytes)

    def process_check(self) -> ProcessCheck:
        kernel = self.kernel

        async def exit_code() -> int | None:
            return kernel.exit_code if kernel.death is not None else None

        return exit_code

    async def kill(self) -> None:
        self.kernel.die()

    def close(self) -> None:
        self.kernel.die("the test is over", exit_code=0)


class ZmqSite(Site):
    """A real ipykernel started as Jupyter starts one (its own session), reached by its connection file."""

    kind = "zmq"

    def __init__(self, directory: Path) -> None:
        self.external = start_external_kernel(directory)

    def wire(self) -> ZmqWire:
        client = AsyncKernelClient(context=zmq_context())
        client.load_connection_file(str(self.external.connection_file))
        return ZmqWire(client)

    def process_check(self) -> ProcessCheck:
        process = self.external.process

        async def exit_code() -> int | None:
            return process.poll()

        return exit_code

    async def kill(self) -> None:
        self.external.process.kill()

    def close(self) -> None:
        stop_external_kernel(self.external)


class ServerSite(Site):
    """A kernel of the session's Jupyter Server, reached through its websocket."""

    kind = "websocket"

    def __init__(self, server: JupyterServer, max_message_bytes: int | None = None) -> None:
        self.server = server
        self.max_message_bytes = max_message_bytes
        self.kernel_id: str = run(self._rest_call(lambda rest: rest.start_kernel(None)))["id"]
        self._clients: dict[int, ServerClient] = {}
        self.pid: int = run(self._kernel_pid())  # asked now: a busy kernel would answer too late

    def _rest(self) -> ServerClient:
        return ServerClient(ServerAddress.parse(self.server.url, token=self.server.token))

    async def _rest_call(self, action: Callable[[ServerClient], Awaitable[Any]]) -> Any:
        rest = self._rest()
        try:
            return await action(rest)
        finally:
            rest.close()

    def wire(self) -> WebsocketWire:
        rest = self._rest()
        if self.max_message_bytes is None:
            wire = WebsocketWire(rest, self.kernel_id)
        else:
            wire = WebsocketWire(rest, self.kernel_id, max_message_bytes=self.max_message_bytes)
        self._clients[id(wire)] = rest
        return wire

    async def close_connection(self, conn: KernelConnection) -> None:
        websocket = getattr(conn.wire, "_conn", None)
        stream = websocket.protocol.stream if websocket is not None and websocket.protocol is not None else None
        await conn.close()
        if stream is not None:  # tornado closes the socket once the server answered the close frame...
            deadline = time.monotonic() + 0.5
            while not stream.closed() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stream.close()  # ...or after 5 s: this loop ends before that, and the socket must not leak
        rest = self._clients.pop(id(conn.wire), None)
        if rest is not None:
            rest.close()

    async def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    async def _kernel_pid(self) -> int:
        async with connected(self) as conn:
            content = await conn.execute({"pid": "__import__('os').getpid()"})
            return int(content["user_expressions"]["pid"]["data"]["text/plain"])

    async def kill_for_good(self) -> None:
        await self._rest_call(self._delete)

    def close(self) -> None:
        run(self._rest_call(self._delete))

    async def _delete(self, rest: ServerClient) -> None:
        # While the server restarts a killed kernel it answers 500: ask again, as kernelproxy's control does.
        await _while_busy(lambda: rest.delete_kernel(self.kernel_id))


def make_site(
    kind: str, directory: Path, server: Callable[[], JupyterServer], max_message_bytes: int | None = None
) -> Site:
    if kind == "fake":
        return FakeSite(max_message_bytes)
    if kind == "zmq":
        return ZmqSite(directory)
    return ServerSite(server(), max_message_bytes)


def site_for_transport(peer: str, directory: Path, server: Callable[[], JupyterServer]) -> Site:
    """The site a TRANSPORT_PEERS entry runs on."""
    kind = "fake" if peer == "inprocess" else peer.split("-")[0]
    return make_site(kind, directory, server, PART_LIMIT if peer.endswith("-parts") else None)


@contextlib.asynccontextmanager
async def connected(site: Site, record: Record | None = None) -> AsyncIterator[KernelConnection]:
    """An open connection to ``site``'s kernel, ready (its IOPub subscribed); ``record`` gets every message."""
    wire = site.wire()
    if record is not None:
        start = wire.start

        async def start_recording(deliver: Any) -> None:
            def recording(channel: str, msg: dict[str, Any]) -> None:
                record.append((channel, msg))
                deliver(channel, msg)

            await start(recording)

        wire.start = start_recording  # type: ignore[method-assign]
    conn = KernelConnection(wire, process_check=site.process_check())
    await conn.open()
    try:
        await conn.wait_ready(READY_TIMEOUT)
        yield conn
    finally:
        await site.close_connection(conn)


@contextlib.asynccontextmanager
async def transport_on(peer: str, site: Site) -> AsyncIterator[tuple[Transport, KernelConnection | None]]:
    """The transport ``peer`` names ("fake-comm", "inprocess"...) to ``site``'s kernel, and its connection."""
    if peer == "inprocess":
        assert isinstance(site, FakeSite)
        yield await InProcessTransport.open(site.kernel), None
        return
    async with connected(site) as conn:
        hello = await install_agent(conn)
        transport: Transport
        if "comm" in peer.split("-"):
            transport = await CommTransport.open(conn)
        elif "lane" in peer.split("-"):
            transport = await LaneTransport.open(conn, None)
        else:
            transport = ExecuteTransport(conn, content_frames=bool(hello.get("parent_access")))
        try:
            yield transport, conn
        finally:
            if conn.dead is None:
                await transport.close()


def running(connection: KernelConnection | None, outcome: Outcome) -> bool:
    """Whether the request ``outcome`` follows runs in the kernel now (the lane's stage is read when asked)."""
    pending = connection._pending.get(outcome.msg_id or "") if connection is not None else None
    if pending is not None:
        connection._observe(pending)  # type: ignore[union-attr]
    return outcome.stage is Stage.RUNNING


def printed(seen: list[dict[str, Any]], text: str) -> Callable[[], bool]:
    """Whether a listener that appends to ``seen`` got ``text`` in a stream message (for ``until``)."""
    return lambda: any(msg["msg_type"] == "stream" and text in msg["content"]["text"] for msg in seen)


def execute_content(code: str, **fields: Any) -> dict[str, Any]:
    """An execute_request's content as kernelproxy sends them (silent, no history, errors do not abort the queue)."""
    content = {
        "code": code,
        "silent": True,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": False,
    }
    content.update(fields)
    return content


# Code that ignores interrupts the way the suites can make every kernel do it: a real kernel turns
# SIGINT into KeyboardInterrupt, the fake raises it in its main thread; this code swallows it.
STUBBORN_CELL = """
import time
print("stubborn", flush=True)  # tells the test it runs: an interrupt sent earlier could land before it
_end = time.monotonic() + {seconds}
while time.monotonic() < _end:
    try:
        while time.monotonic() < _end:  # its jumps inside the try: an interrupt cannot land outside it
            time.sleep(0.02)
    except KeyboardInterrupt:
        pass
"""


def stubborn(seconds: float) -> None:
    """STUBBORN_CELL as a function, for the transports' call requests."""
    import time

    print("stubborn", flush=True)  # tells the test it runs: an interrupt sent earlier could land before it
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            while time.monotonic() < end:  # its jumps inside the try: an interrupt cannot land outside it
                time.sleep(0.02)
        except KeyboardInterrupt:
            pass
