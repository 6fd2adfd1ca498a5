"""Kernels on the test peers: an AsyncKernel (or Kernel) whose kernel lives in this process.

``start_fake_async()`` gives an ``AsyncKernel`` over the fake wire
(``_wires/fake.py``), opened as any kernel is (handshake, agent install,
transport negotiation: "comm" or "execute"), or with ``transport="inprocess"``
requests that skip the wire (``_transports/inprocess.py``). Its control
interrupts, restarts (a fresh fake kernel) and shuts down like a local
kernel's. Everything above the transport, the pool included, runs unchanged
on it, in milliseconds; the conformance suites (``tests/test_conformance_*``)
hold these peers to the real ones' behaviour.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from ._connection import KernelConnection, ProcessCheck
from ._control import KernelControl
from ._kernel import AsyncKernel, _KernelState
from ._transports.base import Transport
from ._transports.inprocess import InProcessTransport
from ._types import CallOptions, OnTimeout, Output
from ._wires._fake_kernel import FakeKernel
from ._wires.fake import FakeWire

FakeTransport = Literal["auto", "comm", "execute", "inprocess"]
READY_TIMEOUT = 10.0


class FakeControl(KernelControl):
    """The control of a fake kernel: as a local kernel's, with ``die()`` for a kill."""

    owned = True
    restartable = True

    def __init__(self, *, interrupt_by: Literal["signal", "message"] = "signal", **kernel_options: Any) -> None:
        self.kernel_options = kernel_options  # FakeKernel's: early_interrupts, code_start_delay
        self.kernel = FakeKernel(**kernel_options)
        self.interrupt_by = interrupt_by  # "message": an interrupt_request on control, as for connected kernels

    def process_check(self) -> ProcessCheck:
        async def exit_code() -> int | None:
            return self.kernel.exit_code if self.kernel.death is not None else None

        return exit_code

    async def interrupt(self, connection: KernelConnection) -> None:
        if self.interrupt_by == "message":
            await connection.interrupt_by_message()
        else:
            self.kernel.interrupt()

    async def restart(self, connection: KernelConnection) -> None:
        self.kernel.die("the fake kernel was restarted", exit_code=0)
        self.kernel = FakeKernel(**self.kernel_options)

    async def shutdown(self, connection: KernelConnection) -> None:
        self.kernel.die("the fake kernel was shut down", exit_code=0)

    def kill_now(self) -> None:
        self.kernel.die("the fake kernel was killed at exit")


class _FakeKernelState(_KernelState):
    """A kernel state whose transport may be the in-process one (after the usual handshake over the fake wire)."""

    inprocess = False

    async def _negotiate_transport(self, hello: dict[str, Any]) -> Transport:
        if self.inprocess:
            return await InProcessTransport.open(cast(FakeControl, self.control).kernel)
        return await super()._negotiate_transport(hello)


async def start_fake_async(
    *,
    transport: FakeTransport = "auto",
    max_message_bytes: int | None = None,
    interrupt_by: Literal["signal", "message"] = "signal",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    auto_restart: bool = False,
    early_interrupts: Literal["wait", "drop"] = "wait",
    code_start_delay: float = 0.0,
    deaf_after_interrupt: bool = False,
) -> AsyncKernel:
    """An AsyncKernel on a fake kernel; ``max_message_bytes`` makes its wire size-limited like a server's.

    ``early_interrupts`` and ``code_start_delay`` are FakeKernel's (what becomes of an interrupt that
    comes before a request's code runs), and so is ``deaf_after_interrupt`` (an interrupted kernel that
    answers the interrupted request and reads no shell request after it, as xeus-python now and then).
    """
    control = FakeControl(
        interrupt_by=interrupt_by,
        early_interrupts=early_interrupts,
        code_start_delay=code_start_delay,
        deaf_after_interrupt=deaf_after_interrupt,
    )

    def make_wire() -> FakeWire:
        return FakeWire(control.kernel, max_message_bytes=max_message_bytes)

    negotiated = "auto" if transport == "inprocess" else transport
    state = _FakeKernelState(
        make_wire, control, None, negotiated, auto_restart=auto_restart, ready_timeout=READY_TIMEOUT
    )
    state.inprocess = transport == "inprocess"
    try:
        await state.open(READY_TIMEOUT)
    except BaseException:
        await state.close(shutdown=True)
        raise
    return AsyncKernel(state, CallOptions(timeout=timeout, output=output, on_timeout=on_timeout))


def start_fake(**options: Any) -> Any:
    """A blocking ``Kernel`` on a fake kernel (``start_fake_async``'s options), driven by kernelproxy's IO thread."""
    from ._portal import get_portal
    from ._sync import Kernel

    portal = get_portal()
    return Kernel(portal.run(start_fake_async(**options)), portal)


def fake_parts(kernel: Any) -> tuple[FakeKernel, FakeWire]:
    """The fake kernel and the current wire to it, of an AsyncKernel or Kernel from ``start_fake*``."""
    core: AsyncKernel = getattr(kernel, "aio", kernel)
    state = core._state
    return cast(FakeControl, state.control).kernel, cast(FakeWire, state.connection.wire)


__all__ = ["FakeControl", "FakeTransport", "fake_parts", "start_fake", "start_fake_async"]
