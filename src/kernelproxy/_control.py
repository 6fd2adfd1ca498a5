"""Kernel control: starting over, interrupting and stopping a kernel, whoever runs it.

Requests and replies travel on the kernel's channels (``_connection``); the
kernel's *process* is someone's business: ours (a local kernel kernelproxy
started, through jupyter_client's ``AsyncKernelManager``), a server's (its
REST API), or nobody's we can reach (a kernel we connected to: only messages
on its control channel). One small contract, three implementations, so the
rest of kernelproxy never asks which kind of kernel it has.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Callable

from ._exceptions import KernelProxyError, ServerError

if TYPE_CHECKING:
    from jupyter_client.manager import AsyncKernelManager

    from ._connection import KernelConnection, ProcessCheck
    from ._server import ServerKernelControl

SHUTDOWN_REQUEST_TIMEOUT = 5.0  # seconds a connected kernel has to answer a shutdown_request


class KernelControl(abc.ABC):
    """What can be done to one kernel besides sending it requests."""

    owned: bool = False  # kernelproxy started it: closing the Kernel stops it
    restartable: bool = False  # restart() gives a fresh kernel
    server: str | None = None  # the Jupyter Server or gateway's URL, for kernels reached through one

    @property
    def kernel_id(self) -> str | None:
        """The kernel's id on its server, for kernels reached through one."""
        return None

    @property
    def lane_directory(self) -> str | None:
        """A private directory on this machine for the lane's socket, where transport="auto" may use a lane."""
        return None

    def process_check(self) -> ProcessCheck | None:
        """A way to ask whether the kernel's process exited (local kernels only)."""
        return None

    def advice(self, connection: KernelConnection) -> str:
        """What to do about the kernel's death, for the message of the calls that find it dead."""
        return "call restart() for a fresh one" if self.restartable else "start or connect to another kernel"

    @abc.abstractmethod
    async def interrupt(self, connection: KernelConnection) -> None:
        """Interrupt what the kernel runs."""

    async def restart(self, connection: KernelConnection) -> None:
        """Start the kernel afresh (``connection`` is the old one, closed already)."""
        raise KernelProxyError(
            "restart() needs a kernel that kernelproxy started; this one was connected to with connect(), "
            "so restart it where it was started"
        )

    @abc.abstractmethod
    async def shutdown(self, connection: KernelConnection) -> None:
        """Stop the kernel."""

    async def release(self) -> None:  # noqa: B027 - most kinds hold nothing
        """Free what this side holds for the kernel (HTTP clients, tunnels, private files); after shutdown."""

    def kill_now(self) -> None:  # noqa: B027 - nothing to do for kernels we do not own
        """At interpreter exit, without an event loop: stop a kernel we own, leave nothing behind."""


class LocalControl(KernelControl):
    """A kernel process kernelproxy started here, through jupyter_client's AsyncKernelManager."""

    owned = True
    restartable = True

    def __init__(self, manager: AsyncKernelManager, private_dir: str | None, lock: int | None = None) -> None:
        self.manager = manager
        self.private_dir = private_dir  # holds the kernel's IPC sockets and connection file; removed at the end
        self.lock = lock  # descriptor of the directory's flock()ed host.lock: held while we live (see _launch)
        self.pid = os.getpid()

    @property
    def lane_directory(self) -> str | None:
        return self.private_dir  # an ipykernel we started here, with its sockets in this private directory

    def process_check(self) -> ProcessCheck:
        manager = self.manager

        async def exit_code() -> int | None:
            provisioner = manager.provisioner
            return await provisioner.poll() if provisioner is not None else 0

        return exit_code

    async def interrupt(self, connection: KernelConnection) -> None:
        await self.manager.interrupt_kernel()

    async def restart(self, connection: KernelConnection) -> None:
        await self.manager.restart_kernel(now=True)

    async def shutdown(self, connection: KernelConnection) -> None:
        await self.manager.shutdown_kernel(now=connection.dead is not None)

    async def release(self) -> None:
        self._remove_private_dir()

    def kill_now(self) -> None:
        if self.pid != os.getpid():
            return  # a forked child exiting: the kernel is its parent's
        self.kill_process()
        self.manager.cleanup_connection_file()
        self._remove_private_dir()

    def kill_process(self) -> None:
        """SIGKILL the kernel process, if it runs. For one that never became ready: jupyter_client's
        shutdown interrupts a kernel first, and one still importing prints a KeyboardInterrupt traceback."""
        process = getattr(self.manager.provisioner, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def _remove_private_dir(self) -> None:
        if self.pid != os.getpid():
            return  # a forked child: the directory is its parent's
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


class ServerControl(KernelControl):
    """A kernel of a Jupyter Server or gateway, controlled through its REST API."""

    restartable = True

    def __init__(self, kernel: ServerKernelControl) -> None:
        self.kernel = kernel
        self.owned = kernel.owned
        self.server = kernel.client.address.url

    @property
    def kernel_id(self) -> str:  # a kernel we started that the server lost is started again under a new id
        return self.kernel.kernel_id

    def advice(self, connection: KernelConnection) -> str:
        if getattr(connection.wire, "gone", False) and self.kernel.start is None:
            return "it was attached by kernel_id, so connect to another kernel"
        return "call restart() for a fresh one"

    async def interrupt(self, connection: KernelConnection) -> None:
        await self.kernel.interrupt_kernel()

    async def restart(self, connection: KernelConnection) -> None:
        if connection.restarted_by_server and not getattr(connection.wire, "gone", False):
            try:
                await self.kernel.wait_settled()  # it is fresh already: restarting it again races the server
                return
            except ServerError as exc:
                if exc.status != 404:
                    raise
        await self.kernel.restart_kernel()

    async def shutdown(self, connection: KernelConnection) -> None:
        await self.kernel.shutdown_kernel()

    async def release(self) -> None:
        self.kernel.close()

    def kill_now(self) -> None:
        self.kernel.delete_now()


class ConnectedControl(KernelControl):
    """A kernel someone else runs, reached by its connection file: only its control channel is ours."""

    def __init__(self, closers: list[Callable[[], Awaitable[None]]] | None = None) -> None:
        self.closers = closers or []  # run at release (an SSH tunnel)

    async def interrupt(self, connection: KernelConnection) -> None:
        await connection.interrupt_by_message()

    async def shutdown(self, connection: KernelConnection) -> None:
        if connection.dead is not None:
            return
        try:
            await asyncio.wait_for(
                connection.request("control", "shutdown_request", {"restart": False}), SHUTDOWN_REQUEST_TIMEOUT
            )
        except (asyncio.TimeoutError, KernelProxyError):
            pass  # it is gone or going; nothing more we can do from here

    async def release(self) -> None:
        for closer in self.closers:
            await closer()
