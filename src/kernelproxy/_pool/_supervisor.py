"""The pool's kernels: starting them, replacing the dead ones, and giving every kernel every push.

A *slot* is one place in the pool: the kernel in it now and how to replace it.

* A kernel the pool started (locally, or on a server) is replaced by a new one.
* A pool of server kernels starts working once its first kernel is ready; the
  others join as they become ready (on a cluster a start can take minutes).
* A given ``Kernel`` that kernelproxy started is restarted.
* A kernel known by its connection file is connected to again (a Jupyter
  server restarts its dead kernels in place).

``push()`` pickles once, sends the same frames to every kernel, and keeps
them: a replacement receives every push again, in order, before its first
task. Large buffers (numpy data) are kept by reference, not copied.

The supervisor talks to kernels through a few members of AsyncKernel only:
``status``, ``info``, ``_push_frames``, ``restart``, ``close``, ``shutdown``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
from collections.abc import Sequence
from typing import Any, Callable, Union

from .._api import connect_async, connect_server_async
from .._exceptions import BrokenKernelPool, KernelClosedError, KernelDiedError, KernelProxyError
from .._kernel import AsyncKernel
from .._launch import LocalSpec, start_local
from .._types import CallOptions

log = logging.getLogger("kernelproxy")

REPLACE_PAUSE = 1.0  # seconds between attempts to replace a dead kernel
KernelSource = Union[AsyncKernel, str, "os.PathLike[str]"]


class Origin(enum.Enum):
    STARTED = "started"  # the pool started it here: shut down with the pool, replaced by a new kernel
    SERVER = "server"  # started on a Jupyter Server by the pool: shut down with the pool, replaced by a new one there
    CONNECTED = "connected"  # the pool connected to it: disconnected with the pool, replaced by connecting again
    GIVEN = "given"  # the caller's: left alone by shutdown, replaced by restart() (or by connecting again)


REPLACE_ATTEMPTS = {Origin.STARTED: 3, Origin.SERVER: 3, Origin.CONNECTED: 1, Origin.GIVEN: 1}


@dataclasses.dataclass(eq=False)
class Slot:
    """One place in the pool: the kernel in it now, and how to replace that kernel."""

    index: int
    kernel: AsyncKernel
    origin: Origin
    connection_file: str | None = None  # where to connect again (CONNECTED)
    ready: bool = True  # has every push; False while being replaced
    restarts: int = 0  # the kernel's restart count when it got every push (someone may restart it)
    service: float | None = None  # moving average of its tasks' durations (s)
    service_of: str | None = None  # the function (name) of the task that last updated ``service``
    last_done: float = 0.0  # loop time its last task finished
    holding: list[Any] = dataclasses.field(default_factory=list)  # tasks sent to the kernel, in order
    inflight: int = 0  # tasks its worker has started and not seen end (set by the worker itself)
    retired: bool = False  # dead and not replaceable
    worker: asyncio.Future[None] | None = None
    sent: int = 0  # tasks sent to its kernel (for max_tasks_per_child)

    @property
    def unusable(self) -> bool:
        """Whether its kernel is dead or closed."""
        return self.kernel.status.state in ("dead", "closed")

    @property
    def restarted_elsewhere(self) -> bool:
        """Whether its kernel was restarted outside the pool since it got every push."""
        return self.kernel.status.restarts != self.restarts


def died_of(exc: BaseException | None, kernel: AsyncKernel) -> bool:
    """Whether a call on ``kernel`` failed because the kernel died (or was closed) under it."""
    return isinstance(exc, (KernelDiedError, KernelClosedError)) and kernel.status.state in ("dead", "closed")


@dataclasses.dataclass(frozen=True)
class Initializer:
    """The pool's ``initializer(*initargs)``, pickled once; run first in every kernel's fresh namespace."""

    frames: list[memoryview]  # pickled (initializer, initargs, {})
    name: str


class Supervisor:
    """Starts, replaces and closes a pool's kernels, and keeps the pushes for replacements."""

    def __init__(
        self,
        local: LocalSpec | None,
        server: dict[str, Any] | None,
        connect_timeout: float,
        initializer: Initializer | None = None,
    ) -> None:
        self.local = local  # how to start local kernels
        self.server = server  # connect_server_async() arguments, for a pool of server kernels
        self.connect_timeout = connect_timeout
        self.initializer = initializer
        self.transport = local.transport if local else "auto"
        self.slots: list[Slot] = []
        self.pushed: list[tuple[list[str], list[memoryview]]] = []  # every push, in order, for replacements
        self.push_lock = asyncio.Lock()
        self.joining: asyncio.Future[None] | None = None  # server kernels still starting after the first was ready
        self.on_join: Callable[[Slot], None] | None = None  # told of each kernel that joins the working pool late

    # ------------------------------------------------------------------ starting and closing

    async def start(self, count: int, sources: Sequence[KernelSource]) -> None:
        """Start ``count`` kernels and take the given ones (kernels or connection files), concurrently.

        Server kernels: returns once the first is ready; the others join later (``on_join``).
        """
        openers = [asyncio.ensure_future(self._start_new()) for _ in range(count)]
        openers += [asyncio.ensure_future(self._take(source)) for source in sources]
        if self.server is not None and not sources and count > 1:
            await self._start_first(openers)
            return
        try:
            outcomes = await asyncio.gather(*openers, return_exceptions=True)
        except BaseException:  # cancelled (KeyboardInterrupt in KernelPool()): close what did open
            await asyncio.shield(self._discard(openers))
            raise
        for outcome in outcomes:
            if isinstance(outcome, Slot):
                outcome.index = len(self.slots)
                self.slots.append(outcome)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            await self.close_kernels()
            raise errors[0]
        await self._initialize_all()

    async def _initialize_all(self) -> None:
        """Run the initializer in every kernel there is; if it fails in one, close them all: BrokenKernelPool."""
        if self.initializer is None:
            return
        ran = await asyncio.gather(*(self.initialize(slot.kernel) for slot in self.slots), return_exceptions=True)
        failed = [outcome for outcome in ran if isinstance(outcome, BaseException)]
        if failed:
            await self.close_kernels()
            raise BrokenKernelPool(
                f"the pool's initializer {self.initializer.name} failed in a kernel: "
                f"{type(failed[0]).__name__}: {failed[0]}"
            ) from failed[0]

    async def initialize(self, kernel: AsyncKernel) -> None:
        """Run the pool's initializer in ``kernel`` (its own output goes where the pool's does)."""
        if self.initializer is not None:
            await kernel._call_frames(self.initializer.frames, self.initializer.name, None, None)

    async def _start_first(self, openers: Sequence[asyncio.Future[Slot]]) -> None:
        """Wait for the first server kernel that becomes ready; let the others join as they do."""
        pending = set(openers)
        errors: list[BaseException] = []
        try:
            while pending and not self.slots:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for opener in done:
                    if opener.exception() is not None:
                        errors.append(opener.exception())  # type: ignore[arg-type]
                    else:
                        self._add(opener.result())
        except BaseException:  # cancelled (KeyboardInterrupt in KernelPool()): close what did open
            await asyncio.shield(self._discard(openers))
            raise
        if not self.slots:
            raise errors[0]
        for error in errors:
            log.warning("a kernel of the pool could not be started: %s", error)
        try:
            await self._initialize_all()  # the late ones run it as they join (push_all)
        except BaseException:
            if pending:  # the others are not wanted now
                for opener in pending:
                    opener.cancel()
                await asyncio.shield(self._discard(list(pending)))
            raise
        if pending:
            self.joining = asyncio.ensure_future(self._join(pending))

    async def _join(self, openers: set[asyncio.Future[Slot]]) -> None:
        for opener in asyncio.as_completed(openers):
            try:
                slot = await opener
            except Exception as exc:
                log.warning("a kernel of the pool could not be started: %s", exc)
                continue
            try:
                await self.push_all(slot, slot.kernel)  # every value pushed so far, before its first task
            except Exception as exc:
                log.warning("a kernel that joined the pool late did not take its pushed values: %s", exc)
                await slot.kernel.close()
                continue
            self._add(slot)
            if self.on_join is not None:
                self.on_join(slot)

    def _add(self, slot: Slot) -> None:
        slot.index = len(self.slots)
        self.slots.append(slot)

    @property
    def still_joining(self) -> bool:
        """Whether some kernels are still starting (server pools)."""
        return self.joining is not None and not self.joining.done()

    async def settled(self) -> None:
        """Until no kernel is still starting."""
        if self.joining is not None:
            await asyncio.gather(asyncio.shield(self.joining), return_exceptions=True)

    async def _discard(self, openers: Sequence[asyncio.Future[Slot]]) -> None:
        await asyncio.wait(openers)
        for opener in openers:
            if not opener.cancelled() and opener.exception() is None:
                self.slots.append(opener.result())
        await self.close_kernels()

    async def _start_new(self) -> Slot:
        if self.server is not None:
            return Slot(-1, await connect_server_async(**self.server), Origin.SERVER)
        assert self.local is not None
        return Slot(-1, await start_local(self.local, CallOptions()), Origin.STARTED)

    async def _take(self, source: KernelSource) -> Slot:
        if isinstance(source, AsyncKernel):
            return Slot(-1, source, Origin.GIVEN, restarts=source.status.restarts)
        kernel = await connect_async(source, startup_timeout=self.connect_timeout, transport=self.transport)
        return Slot(-1, kernel, Origin.CONNECTED, connection_file=kernel.info.connection_file)

    async def close_kernels(self) -> None:
        """Shut down the kernels the pool started, disconnect those it connected to, leave given ones."""
        closers = [slot.kernel.close() for slot in self.slots if slot.origin is not Origin.GIVEN]
        await asyncio.gather(*closers, return_exceptions=True)  # close() stops a kernel the pool started

    def working_kernels(self) -> list[AsyncKernel]:
        return [slot.kernel for slot in self.slots if slot.ready and not slot.retired]

    # ------------------------------------------------------------------ pushes

    async def push(self, names: list[str], frames: list[memoryview]) -> None:
        """Send pickled values to every kernel, and keep them for kernels that replace dead ones."""
        async with self.push_lock:
            entry = (names, frames)
            superseded = set(names)
            self.pushed = [old for old in self.pushed if not set(old[0]) <= superseded] + [entry]
            targets = [slot for slot in self.slots if slot.ready and not slot.retired]
            outcomes = await asyncio.gather(
                *(slot.kernel._push_frames(frames, names) for slot in targets), return_exceptions=True
            )
            errors = [
                outcome
                for slot, outcome in zip(targets, outcomes)
                # a kernel that died gets the values from the store when it is replaced
                if isinstance(outcome, BaseException) and not slot.unusable
            ]
            if errors:
                self.pushed.remove(entry)
                raise errors[0]

    async def push_all(self, slot: Slot, kernel: AsyncKernel) -> None:
        """Give ``kernel`` every value pushed so far, then make it ``slot``'s working kernel."""
        async with self.push_lock:
            await self.initialize(kernel)
            for names, frames in self.pushed:
                await kernel._push_frames(frames, names)
            slot.kernel = kernel
            slot.restarts = kernel.status.restarts
            slot.ready = True

    # ------------------------------------------------------------------ replacement

    async def replace(self, slot: Slot, *, retire: bool = False) -> None:
        """Put a working kernel, with every push, in the place of the dead one; retire the place if impossible.

        ``retire``: the kernel is alive but has run its ``max_tasks_per_child``.
        """
        slot.ready = False
        slot.sent = 0
        reason = "it ran max_tasks_per_child tasks" if retire else slot.kernel.status.death or "it was closed"
        error: BaseException | None = None
        for attempt in range(REPLACE_ATTEMPTS[slot.origin]):
            if attempt:
                await asyncio.sleep(REPLACE_PAUSE)
            try:
                await self._renew(slot)
            except Exception as exc:
                error = exc
                log.warning("replacing dead kernel %d failed (attempt %d): %s", slot.index, attempt + 1, exc)
                continue
            log.info("kernel %d (%s) was replaced", slot.index, reason)
            return
        log.warning(
            "kernel %d is dead (%s) and could not be replaced: %s; the pool goes on without it",
            slot.index,
            reason,
            error,
        )
        slot.retired = True

    async def _renew(self, slot: Slot) -> None:
        old = slot.kernel
        if slot.origin in (Origin.STARTED, Origin.SERVER):
            try:
                await old.close()  # stops it (deletes it on its server, if the server still has it)
            except KernelProxyError as exc:
                log.debug("closing a dead kernel: %r", exc)
            new = (await self._start_new()).kernel
        elif slot.origin is Origin.GIVEN and old.status.state == "closed":
            raise KernelClosedError("it was closed outside the pool")
        elif slot.origin is Origin.GIVEN and old.status.owned:
            await old.restart()
            new = old
        else:  # connected to, by us or by the caller: connect to its connection file again
            connection_file = slot.connection_file or _connection_file(old)
            if connection_file is None:
                raise KernelDiedError("it has no connection file to connect to again")
            if slot.origin is Origin.CONNECTED:
                await old.close()
            new = await connect_async(connection_file, startup_timeout=self.connect_timeout, transport=self.transport)
            slot.origin, slot.connection_file = Origin.CONNECTED, connection_file
        try:
            await self.push_all(slot, new)
        except BaseException:
            slot.kernel = new  # so that the next attempt shuts it down
            raise


def _connection_file(kernel: AsyncKernel) -> str | None:
    try:
        return kernel.info.connection_file
    except KernelClosedError:  # it never became ready
        return None
