"""KernelPool and AsyncKernelPool: several kernels behind one ``concurrent.futures.Executor``.

How it works
------------
One scheduler (``_PoolCore``) runs on an event loop: kernelproxy's IO thread
for ``KernelPool``, the caller's loop for ``AsyncKernelPool``. It holds one
FIFO queue of tasks and one worker coroutine per kernel. A task goes to the
next idle kernel; idle kernels are served longest-idle first. The one
exception (``prefetch=True``, the default) hides the round trip of short
tasks: a kernel whose recent tasks took under ``PREFETCH_UNDER`` (100 ms)
also gets the next task while it finishes the current one, but only when no
kernel is idle, and never a task with a timeout (its clock would start
early). So at most one task per kernel can wait behind an unexpectedly long
one; ``prefetch=False`` rules that out, at the cost of one idle round trip
per task. Retried tasks go to the front of the queue.

* A task is one remote call: ``submit(fn, *args)`` or one chunk of ``map``
  (``chunksize`` items, one round trip, run by a small helper that travels by
  value, so the kernel never needs kernelproxy). Tasks are pickled on the
  submitting thread, not on the IO thread.
* Tasks are numbered from 0 in the order they are submitted (a map chunk is
  one task). With ``output="forward"`` every line a task prints in the kernel
  appears on this process's stdout/stderr prefixed ``[task N] ``, and partial
  lines of concurrent tasks never mix.
* ``push()`` pickles once, sends the same frames to every kernel, and keeps
  them: a kernel that replaces a dead one receives every push again, in order,
  before its first task. Large buffers (numpy data) are kept by reference, not
  copied, so a replacement receives them as they are at that moment.
* A kernel that dies during a task is replaced: a kernel the pool started by a
  new one (through its ``AsyncMultiKernelManager``), a given kernel that
  kernelproxy started by ``restart()``, a kernel known by its connection file
  by connecting again (a Jupyter server restarts its dead kernels in place).
  If that fails, the pool goes on with fewer kernels; with none left, waiting
  tasks and new submissions fail with ``KernelDiedError``. The task raises
  ``KernelDiedError``, or, with ``retries`` left, runs again on the next idle
  kernel. Only a dead kernel causes a retry: a task's own exceptions and
  ``CallTimeout`` never do. A task that was waiting behind another on the
  dying kernel never ran: it goes back to the queue without using a retry.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import dataclasses
import enum
import itertools
import logging
import os
import shutil
import sys
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Generic, Protocol, TypeVar, Union, cast

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from . import _serialization as serialization
from ._api import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
    _kernel_from_manager,
    _private_sockets,
    _start_error,
    _ThisPythonFirst,
    _zmq_context,
    connect_async,
    connect_server_async,
)
from ._exceptions import CallInterrupted, KernelClosedError, KernelDiedError, KernelProxyError
from ._kernel import AsyncKernel, State, check_transport_name
from ._portal import Portal, get_portal
from ._sync import Kernel
from ._types import UNSET, CallOptions, Output, Unset

T = TypeVar("T")
log = logging.getLogger("kernelproxy")

IDLE_CHECK = 1.0  # seconds between liveness checks of an idle kernel
PREFETCH_UNDER = 0.1  # seconds: a kernel whose tasks take less gets its next task before the current one ends
REPLACE_PAUSE = 1.0  # seconds between attempts to replace a dead kernel
SUBMIT_BATCH = 64  # map() hands tasks to the IO thread in batches of this many

Progress = Union[bool, Mapping[str, Any]]
KernelSource = Union[Kernel, str, "os.PathLike[str]"]
AsyncKernelSource = Union[AsyncKernel, str, "os.PathLike[str]"]


# ---------------------------------------------------------------------- options and tasks


@dataclasses.dataclass(frozen=True)
class _TaskOptions:
    """How the tasks of a pool (or of a view, ``pool.options(...)``) run."""

    retries: int = 0
    timeout: float | None = None
    output: Output = "forward"

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative int, not {self.retries!r}")
        CallOptions(timeout=self.timeout, output=self.output)  # validates both

    def replace(self, retries: int | Unset, timeout: float | None | Unset, output: Output | Unset) -> _TaskOptions:
        changes: dict[str, Any] = {}
        if not isinstance(retries, Unset):
            changes["retries"] = retries
        if not isinstance(timeout, Unset):
            changes["timeout"] = timeout
        if not isinstance(output, Unset):
            changes["output"] = output
        return dataclasses.replace(self, **changes)


class _Sink(Protocol):
    """Where a task's outcome goes: a concurrent.futures.Future or an asyncio.Future."""

    def claim(self) -> bool:
        """Mark the task running; False if it was cancelled before it started."""

    def resolve(self, value: Any) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def cancel(self) -> bool:
        """Cancel the task if it has not started."""


class _ThreadSink:
    """KernelPool's futures: concurrent.futures semantics (a running future cannot be cancelled)."""

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self.future = future

    def claim(self) -> bool:
        return self.future.set_running_or_notify_cancel()

    def resolve(self, value: Any) -> None:
        if not self.future.done():  # only the loop's thread sets it; a running future cannot be cancelled
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def cancel(self) -> bool:
        return self.future.cancel()


class _LoopSink:
    """AsyncKernelPool's futures: cancelling one interrupts its remote work, also while it runs."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def claim(self) -> bool:
        return not self.future.done()

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def cancel(self) -> bool:
        return self.future.cancel()


@dataclasses.dataclass(eq=False)
class _Task:
    id: int
    frames: list[memoryview]  # pickled (fn, args, kwargs)
    name: str  # the function's name, for messages
    size: int  # items it covers (a map chunk's length), for progress bars
    options: _TaskOptions
    sink: _Sink
    retries_left: int
    started: bool = False
    abandoned: bool = False  # its caller no longer wants it (map() closed early)
    behind: _Task | None = None  # the task its kernel was busy with when it was sent there
    ended: bool = False  # its call ended, other than by the death of its kernel


def _run_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _by_value(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` that cloudpickle sends by value, so the kernel does not need kernelproxy."""
    clone = types.FunctionType(fn.__code__, {"__builtins__": builtins}, fn.__name__)
    clone.__module__ = "_kernelproxy_pool"  # not an importable module: pickled by value
    clone.__qualname__ = fn.__qualname__
    return clone


_RUN_CHUNK = _by_value(_run_chunk)


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class _TaskOutput:
    """An IOPub listener that writes a task's output line by line, each line prefixed ``[task N] ``."""

    __slots__ = ("partial", "prefix")

    def __init__(self, task_id: int) -> None:
        self.prefix = f"[task {task_id}] "
        self.partial = {"stdout": "", "stderr": ""}

    def __call__(self, msg: dict[str, Any]) -> None:
        if msg["msg_type"] != "stream":
            return
        name = "stderr" if msg["content"].get("name") == "stderr" else "stdout"
        lines = (self.partial[name] + msg["content"].get("text", "")).split("\n")
        self.partial[name] = lines.pop()
        if lines:
            self._write(name, "".join(f"{self.prefix}{line}\n" for line in lines))

    def flush(self) -> None:
        for name, text in self.partial.items():
            if text:
                self._write(name, f"{self.prefix}{text}\n")
                self.partial[name] = ""

    @staticmethod
    def _write(name: str, text: str) -> None:
        stream = sys.stderr if name == "stderr" else sys.stdout
        if stream is not None:
            stream.write(text)
            stream.flush()


# ---------------------------------------------------------------------- kernels


class _Origin(enum.Enum):
    STARTED = "started"  # the pool started it: shut down with the pool, replaced by a new kernel
    CONNECTED = "connected"  # the pool connected to it: disconnected with the pool, replaced by connecting again
    GIVEN = "given"  # the caller's: left alone by shutdown, replaced by restart() (or by connecting again)
    SERVER = "server"  # started on a Jupyter Server by the pool: shut down with the pool, replaced by a new one there


@dataclasses.dataclass(eq=False)
class _Slot:
    """One place in the pool: the kernel in it now, and how to replace that kernel."""

    index: int
    kernel: AsyncKernel
    origin: _Origin
    kernel_id: str | None = None  # in the pool's MultiKernelManager (STARTED)
    connection_file: str | None = None  # where to connect again (CONNECTED)
    ready: bool = True  # has every push; False while being replaced
    generation: int = 0  # the kernel's restart count when it got every push (someone may restart it)
    service: float | None = None  # moving average of its tasks' durations (s)
    last_done: float = 0.0  # loop time its last task finished
    holding: list[_Task] = dataclasses.field(default_factory=list)  # tasks sent to the kernel, in order
    retired: bool = False  # dead and not replaceable
    worker: asyncio.Future[None] | None = None


def _died_of(exc: BaseException | None, kernel: AsyncKernel) -> bool:
    """Whether a call on ``kernel`` failed because the kernel died (or was closed) under it."""
    return isinstance(exc, (KernelDiedError, KernelClosedError)) and _unusable(kernel)


def _unusable(kernel: AsyncKernel) -> bool:
    """Whether the kernel is dead or closed (its state is shared by every view of it)."""
    state = kernel._state
    return state.state is State.CLOSED or state.connection.dead is not None


@dataclasses.dataclass(frozen=True)
class _LocalSpec:
    """How the pool starts its local kernels (and their replacements)."""

    kernel_name: str
    python: str | None
    cwd: str | None
    env: dict[str, str]
    startup_timeout: float
    transport: str
    options: dict[str, Any]


class _MultiKernelManager(AsyncMultiKernelManager):
    """jupyter_client's multi-kernel manager, with per-kernel manager options (private IPC sockets).

    It also remembers each kernel's manager from the moment it is made, so that
    a start cut short (cancelled) can still be stopped: jupyter_client lists a
    kernel only once it has started.
    """

    def pre_start_kernel(self, kernel_name: str | None, kwargs: Any) -> Any:
        manager_options = kwargs.pop("manager_options", {})
        km, name, kernel_id = super().pre_start_kernel(kernel_name, kwargs)
        for key, value in manager_options.items():
            setattr(km, key, value)
        self.made[kernel_id] = cast(AsyncKernelManager, km)
        return km, name, kernel_id

    @property
    def made(self) -> dict[str, AsyncKernelManager]:
        made: dict[str, AsyncKernelManager] | None = self.__dict__.get("_kernelproxy_made")
        if made is None:
            made = self.__dict__["_kernelproxy_made"] = {}
        return made

    async def stop_unfinished(self, kernel_id: str) -> None:
        """Kill the process of a kernel whose start failed or was cancelled, if it has one."""
        km = self.made.pop(kernel_id, None)
        self.remove_kernel(kernel_id)
        self._pending_kernels.pop(kernel_id, None)
        if km is not None and km.has_kernel:
            try:
                await km.shutdown_kernel(now=True)
            except Exception as exc:
                log.debug("stopping a kernel whose start failed: %r", exc)


# ---------------------------------------------------------------------- the scheduler


class _PoolCore:
    """The scheduler shared by KernelPool and AsyncKernelPool; every method but a few runs on ``loop``.

    Thread-safe entry points (any thread): ``make_task``, ``enqueue_threadsafe``,
    ``close_submissions``.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, local: _LocalSpec | None, connect_timeout: float, prefetch: bool
    ) -> None:
        self.loop = loop
        self.prefetch = prefetch
        self.local = local
        self.server: dict[str, Any] | None = None  # connect_server_async() arguments, for a pool of server kernels
        self.connect_timeout = connect_timeout
        self.transport = local.transport if local else "auto"
        self.slots: list[_Slot] = []
        self.queue: collections.deque[_Task] = collections.deque()
        self.idle: collections.deque[asyncio.Future[None]] = collections.deque()  # workers of idle kernels
        self.prefetching: collections.deque[asyncio.Future[None]] = collections.deque()  # of busy, short-task ones
        self.pushed: list[tuple[list[str], list[memoryview]]] = []  # every push, in order, for replacements
        self.task_ids = itertools.count()
        self.running = 0
        self.draining = False  # shutting down: workers leave once the queue is empty
        self.closed = False  # no new submissions (set under submit_lock)
        self.broken: KernelDiedError | None = None  # no kernel left
        self.submit_lock = threading.Lock()
        self.manager: _MultiKernelManager | None = None
        self.push_lock: asyncio.Lock | None = None  # created on the loop (Python 3.9 binds locks to a loop)
        self.closing: asyncio.Future[None] | None = None  # shutting down the kernels once the tasks are done

    # ------------------------------------------------------------------ tasks (any thread)

    def make_task(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], options: _TaskOptions, sink: _Sink
    ) -> _Task | None:
        """Pickle a call into a task; on a pickling error fail ``sink`` and return None."""
        task_id = next(self.task_ids)
        try:
            frames = serialization.dumps((fn, args, kwargs), parts=serialization.call_parts(fn, args, kwargs))
        except Exception as exc:
            sink.fail(exc)
            return None
        return _Task(task_id, frames, _name(fn), 1, options, sink, options.retries)

    def make_chunk_task(
        self, fn: Callable[..., Any], chunk: list[tuple[Any, ...]], first: int, options: _TaskOptions, sink: _Sink
    ) -> _Task | None:
        """Pickle one map() chunk (items ``first``...) into a task that runs them in one call."""
        task_id = next(self.task_ids)
        parts = {"the function": fn, **{f"item {first + i}": args for i, args in enumerate(chunk)}}
        try:
            frames = serialization.dumps((_RUN_CHUNK, (fn, chunk), {}), parts=parts)
        except Exception as exc:
            sink.fail(exc)
            return None
        return _Task(task_id, frames, _name(fn), len(chunk), options, sink, options.retries)

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self.broken is not None:
            raise KernelDiedError(str(self.broken))

    def enqueue_threadsafe(self, tasks: list[_Task]) -> None:
        with self.submit_lock:
            self.check_open()
            self.loop.call_soon_threadsafe(self.enqueue, tasks)

    # ------------------------------------------------------------------ queue (loop)

    def enqueue(self, tasks: list[_Task], front: bool = False) -> None:
        if self.broken is not None:
            for task in tasks:
                if task.started or task.sink.claim():
                    task.sink.fail(KernelDiedError(str(self.broken)))
            return
        if front:
            self.queue.extendleft(reversed(tasks))
        else:
            self.queue.extend(tasks)
        self.wake(len(tasks))

    def wake(self, count: int | None = None) -> None:
        """Wake ``count`` waiting workers (all with None): idle kernels first, then those that could prefetch."""
        for waiters in (self.idle, self.prefetching):
            while waiters and (count is None or count > 0):
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    if count is not None:
                        count -= 1

    def abandon(self, tasks: list[_Task]) -> None:
        """The caller gave these up (map() closed early): cancel those not yet sent to a kernel.

        Those already sent run to the end, as with concurrent.futures; their
        results are dropped and they are not retried. Interrupting them would
        race: the interrupt can land on the kernel's next call instead.
        """
        for task in tasks:
            task.abandoned = True
            if not task.started:
                task.sink.cancel()

    def cancel_queued(self) -> None:
        kept = collections.deque(task for task in self.queue if task.started or not task.sink.cancel())
        self.queue = kept

    # ------------------------------------------------------------------ lifecycle (loop)

    async def start(self, count: int, sources: Sequence[AsyncKernel | str | os.PathLike[str]]) -> None:
        """Start ``count`` local kernels and take the given ones (kernels or connection files), concurrently."""
        self.push_lock = asyncio.Lock()
        if count and self.local is not None and self.server is None:
            spec_manager = _ThisPythonFirst()
            spec_manager.python = self.local.python
            self.manager = _MultiKernelManager(
                kernel_spec_manager=spec_manager,
                kernel_manager_class="jupyter_client.manager.AsyncKernelManager",  # no auto-restarter: we replace
                context=_zmq_context(),
                connection_dir=jupyter_runtime_dir(),
                log=log,
            )
        start_one = self._start_on_server if self.server is not None else self._start_local
        openers = [asyncio.ensure_future(start_one()) for _ in range(count)]
        openers += [asyncio.ensure_future(self._take(source)) for source in sources]
        try:
            outcomes = await asyncio.gather(*openers, return_exceptions=True)
        except BaseException:  # cancelled (KeyboardInterrupt in KernelPool()): close what did open
            await asyncio.shield(self._discard(openers))
            raise
        for outcome in outcomes:
            if isinstance(outcome, _Slot):
                outcome.index = len(self.slots)
                self.slots.append(outcome)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            await self.close_kernels()
            raise errors[0]
        for slot in self.slots:
            slot.worker = asyncio.ensure_future(self._work(slot))

    async def _discard(self, openers: Sequence[asyncio.Future[_Slot]]) -> None:
        await asyncio.wait(openers)
        for opener in openers:
            if not opener.cancelled() and opener.exception() is None:
                self.slots.append(opener.result())
        await self.close_kernels()

    async def _start_local(self) -> _Slot:
        assert self.local is not None and self.manager is not None
        spec = self.local
        options = dict(spec.options)
        private_dir = _private_sockets(spec.kernel_name, spec.python, options)
        kernel_id = str(uuid.uuid4())
        try:
            await self.manager.start_kernel(
                kernel_name=spec.kernel_name,
                kernel_id=kernel_id,
                manager_options=options,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
            )
        except BaseException as exc:
            await asyncio.shield(self.manager.stop_unfinished(kernel_id))
            if private_dir is not None:
                shutil.rmtree(private_dir, ignore_errors=True)
            error = _start_error(exc, spec.kernel_name)
            if error is None:
                raise
            raise error from exc
        manager = cast(AsyncKernelManager, self.manager.get_kernel(kernel_id))
        is_ipykernel = spec.python is not None or spec.kernel_name == "python3"
        try:
            kernel = await _kernel_from_manager(
                manager, spec.transport, CallOptions(), spec.startup_timeout, private_dir, is_ipykernel=is_ipykernel
            )
        except BaseException:
            await asyncio.shield(self.manager.stop_unfinished(kernel_id))  # usually shut down already
            raise
        self.manager.made.pop(kernel_id, None)
        return _Slot(-1, kernel, _Origin.STARTED, kernel_id=kernel_id)

    async def _start_on_server(self) -> _Slot:
        assert self.server is not None
        return _Slot(-1, await connect_server_async(**self.server), _Origin.SERVER)

    async def _take(self, source: AsyncKernel | str | os.PathLike[str]) -> _Slot:
        if isinstance(source, AsyncKernel):
            return _Slot(-1, source, _Origin.GIVEN, generation=source._state.generation)
        kernel = await connect_async(source, startup_timeout=self.connect_timeout, transport=self.transport)
        return _Slot(-1, kernel, _Origin.CONNECTED, connection_file=kernel.info.connection_file)

    def close_submissions(self) -> None:
        with self.submit_lock:
            self.closed = True

    async def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Stop taking tasks; with ``wait``, return once every task is done and every kernel closed."""
        if cancel_futures:
            self.cancel_queued()
        self.draining = True
        self.wake()
        if self.closing is None:
            self.closing = asyncio.ensure_future(self._finish())
        if wait:
            await asyncio.shield(self.closing)

    async def _finish(self) -> None:
        workers = [slot.worker for slot in self.slots if slot.worker is not None]
        await asyncio.gather(*workers, return_exceptions=True)
        await self.close_kernels()

    async def close_kernels(self) -> None:
        """Shut down the kernels the pool started, disconnect those it connected to, leave given ones."""
        closers = []
        for slot in self.slots:
            if slot.origin is _Origin.STARTED:
                closers.append(self._drop_started(slot))
            elif slot.origin in (_Origin.CONNECTED, _Origin.SERVER):
                closers.append(slot.kernel.close())  # a server kernel we started is deleted there
        await asyncio.gather(*closers, return_exceptions=True)
        if self.manager is not None:
            await self.manager.shutdown_all(now=True)  # none left, unless a start was cut short

    async def _drop_started(self, slot: _Slot) -> None:
        try:
            await slot.kernel.shutdown()
        finally:
            if self.manager is not None and slot.kernel_id is not None:
                self.manager.remove_kernel(slot.kernel_id)

    # ------------------------------------------------------------------ push (loop)

    async def push(self, names: list[str], frames: list[memoryview]) -> None:
        """Send pickled values to every kernel, and keep them for kernels that replace dead ones."""
        assert self.push_lock is not None
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
                if isinstance(outcome, BaseException) and not _unusable(slot.kernel)
            ]
            if errors:
                self.pushed.remove(entry)
                raise errors[0]

    # ------------------------------------------------------------------ workers (loop)

    async def _work(self, slot: _Slot) -> None:
        """Feed one kernel: one task at a time, or two when its tasks are short (see ``_capacity``)."""
        inflight: set[asyncio.Future[None]] = set()
        try:
            while True:
                if _unusable(slot.kernel):
                    if inflight:  # they end at once: the connection failed them
                        await asyncio.wait(inflight)
                        inflight.clear()
                    if self.draining and not self.queue and self.running == 0:
                        return  # nothing left to run on a replacement; close_kernels() cleans up the dead one
                    await self._replace(slot)
                    if slot.retired:
                        return
                    continue
                if slot.kernel._state.generation != slot.generation:  # restarted outside the pool: push again
                    try:
                        await self._push_all(slot, slot.kernel)
                    except Exception as exc:
                        log.warning("pushing the pool's values to restarted kernel %d failed: %s", slot.index, exc)
                        await asyncio.sleep(IDLE_CHECK)
                        continue
                waiter: asyncio.Future[None] | None = None
                if len(inflight) < self._capacity(slot):
                    task = self._pop(prefetch=bool(inflight))
                    if task is not None:
                        inflight.add(asyncio.ensure_future(self._run(slot, task)))
                        continue
                    if self.draining and not self.queue and self.running == 0:
                        self.wake()  # let the other workers see it too
                        return
                    waiter = self.loop.create_future()
                    (self.prefetching if inflight else self.idle).append(waiter)
                await asyncio.wait(
                    inflight | ({waiter} if waiter else set()), timeout=IDLE_CHECK, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter is not None and not waiter.done():
                    waiter.cancel()
                    for waiters in (self.idle, self.prefetching):
                        if waiter in waiters:
                            waiters.remove(waiter)
                inflight = {running for running in inflight if not running.done()}
        except asyncio.CancelledError:
            for running in inflight:
                running.cancel()
            raise
        except Exception:  # a bug here must not hang callers: say so, and leave the kernel out
            log.exception("kernelproxy pool worker %d failed", slot.index)
            slot.retired = True
            self._check_any_left()

    def _capacity(self, slot: _Slot) -> int:
        """Tasks a kernel may hold: a second one, sent while the first runs, hides the round trip.

        Only for kernels whose recent tasks were short, so that a task rarely
        waits behind a long one while another kernel is idle.
        """
        if not self.prefetch or slot.service is None or slot.service >= PREFETCH_UNDER:
            return 1
        return 1 if slot.kernel.call_options.timeout is not None else 2

    def _pop(self, prefetch: bool) -> _Task | None:
        """The next task to run; for a second task in flight, none with a timeout (its clock would run early)."""
        while self.queue:
            task = self.queue[0]
            if prefetch and task.options.timeout is not None:
                return None
            self.queue.popleft()
            if task.abandoned and task.started:
                task.sink.fail(CallInterrupted(f"task {task.id} was abandoned by its caller"))
            elif task.started or task.sink.claim():
                task.started = True
                return task
        return None

    async def _run(self, slot: _Slot, task: _Task) -> None:
        kernel = slot.kernel
        sent = self.loop.time()
        task.behind, task.ended = (slot.holding[-1] if slot.holding else None), False
        slot.holding.append(task)
        output = _TaskOutput(task.id) if task.options.output == "forward" else None
        request = asyncio.ensure_future(kernel._call_frames(task.frames, task.name, task.options.timeout, output))
        if isinstance(task.sink, _LoopSink):  # cancelling an asyncio future interrupts its remote work
            task.sink.future.add_done_callback(lambda future: request.cancel() if future.cancelled() else None)
        self.running += 1
        try:
            try:
                await asyncio.wait({request})
            except asyncio.CancelledError:
                request.cancel()
                task.sink.fail(KernelClosedError("the pool was torn down while this task ran"))
                raise
            finally:
                if output is not None:
                    output.flush()
            died = request.done() and not request.cancelled() and _died_of(request.exception(), kernel)
            task.ended = not died
            if request.cancelled():
                task.sink.fail(
                    CallInterrupted(f"task {task.id} ({task.name}) was cancelled; its remote work was interrupted")
                )
                return
            done = self.loop.time()
            service = done - max(sent, slot.last_done)  # the kernel's own time for it, not its wait behind another
            slot.last_done = done
            slot.service = service if slot.service is None else 0.7 * slot.service + 0.3 * service
            exc = request.exception()
            if exc is None:
                task.sink.resolve(request.result())
            elif died:
                self._lost(task, slot, exc)
            else:
                task.sink.fail(exc)
        finally:
            slot.holding.remove(task)
            self.running -= 1
            if self.draining and self.running == 0:
                self.wake()

    def _lost(self, task: _Task, slot: _Slot, exc: BaseException) -> None:
        """``task`` was sent to a kernel that died: run it again if it never started or has retries, else fail it."""
        if task.behind is not None and not task.behind.ended and not task.abandoned:
            # The kernel was still busy with the task ahead of it: this one never ran.
            log.debug("task %d never ran on kernel %d, which died; it goes back to the queue", task.id, slot.index)
            self.enqueue([task], front=True)
            return
        if task.retries_left > 0 and not task.abandoned:
            task.retries_left -= 1
            log.warning(
                "kernel %d died during task %d (%s): %s; retrying the task", slot.index, task.id, task.name, exc
            )
            self.enqueue([task], front=True)
            return
        what = "retries exhausted; " if task.options.retries else ""
        task.sink.fail(
            KernelDiedError(
                f"the kernel running task {task.id} ({task.name}) died: {exc}; {what}the pool replaces that kernel"
            )
        )

    # ------------------------------------------------------------------ replacement (loop)

    async def _replace(self, slot: _Slot) -> None:
        """Put a working kernel, with every push, in the place of the dead one; retire the place if impossible."""
        slot.ready = False
        reason = slot.kernel._state.connection.dead or "it was closed"
        attempts = {_Origin.STARTED: 3, _Origin.SERVER: 3, _Origin.CONNECTED: 1, _Origin.GIVEN: 1}[slot.origin]
        error: BaseException | None = None
        for attempt in range(attempts):
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
        self._check_any_left()

    async def _renew(self, slot: _Slot) -> None:
        old = slot.kernel
        if slot.origin is _Origin.STARTED:
            await self._drop_started(slot)
            new_slot = await self._start_local()
            new, slot.kernel_id = new_slot.kernel, new_slot.kernel_id
        elif slot.origin is _Origin.SERVER:
            try:
                await old.close()  # deletes it on the server, if the server still has it
            except KernelProxyError as exc:
                log.debug("closing a dead server kernel: %r", exc)
            new = (await self._start_on_server()).kernel
        elif slot.origin is _Origin.GIVEN and old._state.state is State.CLOSED:
            raise KernelClosedError("it was closed outside the pool")
        elif slot.origin is _Origin.GIVEN and old._state.owned:
            await old.restart()
            new = old
        else:  # connected to, by us or by the caller: connect to its connection file again
            connection_file = slot.connection_file or (old.info.connection_file if old._state.info else None)
            if connection_file is None:
                raise KernelDiedError("it has no connection file to connect to again")
            if slot.origin is _Origin.CONNECTED:
                await old.close()
            new = await connect_async(connection_file, startup_timeout=self.connect_timeout, transport=self.transport)
            slot.origin, slot.connection_file = _Origin.CONNECTED, connection_file
        try:
            await self._push_all(slot, new)
        except BaseException:
            slot.kernel = new  # so that the next attempt shuts it down
            raise

    async def _push_all(self, slot: _Slot, kernel: AsyncKernel) -> None:
        """Give ``kernel`` every value pushed so far, then make it ``slot``'s working kernel."""
        assert self.push_lock is not None
        async with self.push_lock:
            for names, frames in self.pushed:
                await kernel._push_frames(frames, names)
            slot.kernel = kernel
            slot.generation = kernel._state.generation
            slot.ready = True

    def _check_any_left(self) -> None:
        if all(slot.retired for slot in self.slots) and self.broken is None:
            self.broken = KernelDiedError("every kernel of the pool died and none could be replaced")
            queued, self.queue = list(self.queue), collections.deque()
            for task in queued:
                if task.started or task.sink.claim():
                    task.sink.fail(KernelDiedError(str(self.broken)))
            self.wake()

    def ready_kernels(self) -> list[AsyncKernel]:
        return [slot.kernel for slot in self.slots if slot.ready and not slot.retired]


# ---------------------------------------------------------------------- shared by both facades


def _local_spec(
    kernel_name: str,
    python: str | None,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    startup_timeout: float | None,
    transport: str,
    options: dict[str, Any],
) -> _LocalSpec:
    check_transport_name(transport)
    return _LocalSpec(
        kernel_name=kernel_name,
        python=python,
        cwd=os.fspath(cwd) if cwd is not None else None,
        env=dict(env or {}),
        startup_timeout=DEFAULT_STARTUP_TIMEOUT if startup_timeout is None else startup_timeout,
        transport=transport,
        options=options,
    )


def _server_spec(url: str, token: str | None, kernel_name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """connect_server_async() arguments for each kernel of a server pool."""
    return {"url": url, "token": token, "kernel_name": kernel_name, **options}


def _check_count(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive number of kernels, not {n!r}")
    return n


def _split_sources(kernels: int | Iterable[Any] | None, kind: type) -> tuple[int, list[Any]]:
    """(number of local kernels to start, given kernels and connection files)."""
    if kernels is None:
        return os.cpu_count() or 1, []
    if isinstance(kernels, bool):
        raise TypeError("kernels must be a number of kernels or a list of kernels and connection files, not a bool")
    if isinstance(kernels, int):
        if kernels < 1:
            raise ValueError(f"a pool needs at least one kernel, not {kernels}")
        return kernels, []
    if isinstance(kernels, (str, os.PathLike)):
        raise TypeError("pass a list of connection files, not one file name")
    sources = list(kernels)
    if not sources:
        raise ValueError("a pool needs at least one kernel: the list is empty")
    for source in sources:
        if not isinstance(source, (kind, str, os.PathLike)):
            other = "KernelPool takes Kernel" if kind is Kernel else "AsyncKernelPool takes AsyncKernel"
            raise TypeError(f"{other} objects or connection files, not {type(source).__name__}")
    return 0, sources


def _check_names(values: Mapping[str, Any] | None, named: dict[str, Any]) -> dict[str, Any]:
    merged = {**(values or {}), **named}
    bad = [name for name in merged if not (isinstance(name, str) and name.isidentifier())]
    if bad:
        raise ValueError(f"push() needs variable names that are identifiers, got {bad!r}")
    return merged


def _progress_bar(progress: Progress, total: int) -> Any:
    """A tqdm bar counting map() items, or None. ``progress`` may be a dict of tqdm arguments."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError("map(progress=...) needs tqdm: pip install tqdm") from exc

    settings: dict[str, Any] = {"total": total, "unit": "item", "desc": "KernelPool.map"}
    if isinstance(progress, Mapping):
        settings.update(progress)
    return tqdm(**settings)


def _chunks(iterables: tuple[Iterable[Any], ...], chunksize: int) -> list[list[tuple[Any, ...]]]:
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize must be an int >= 1, not {chunksize!r}")
    items = list(zip(*iterables))
    return [items[i : i + chunksize] for i in range(0, len(items), chunksize)]


class _ProgressCounter:
    """Advances a progress bar as map() tasks finish (on the loop's thread); closes it at the end."""

    def __init__(self, bar: Any, tasks: int) -> None:
        self.bar = bar
        self.left = tasks
        self.lock = threading.Lock()
        if tasks == 0:
            bar.close()

    def done(self, size: int, cancelled: bool) -> None:
        with self.lock:
            if not cancelled:
                self.bar.update(size)
            self.left -= 1
            if self.left == 0:
                self.bar.close()

    def close(self) -> None:
        with self.lock:
            self.bar.close()


# ---------------------------------------------------------------------- KernelPool


class KernelPool(concurrent.futures.Executor):
    """A pool of Jupyter kernels that runs your functions: a ``concurrent.futures.Executor``.

    ``KernelPool(4)`` starts four local kernels (this interpreter's ipykernel,
    like ``kernelproxy.start()``); ``KernelPool(["kernel-1.json", k2])`` uses
    running kernels, by connection file or as ``Kernel`` objects. Use it as a
    context manager, or call ``shutdown()``.

    Args:
        retries: how many times a task whose kernel died under it runs again on
            another kernel (default 0: it raises KernelDiedError). Per task:
            ``pool.options(retries=2).submit(fn, x)``.
        timeout: seconds one task may run before CallTimeout; its kernel is
            interrupted and stays in the pool (None: no limit).
        output: "forward" (each line a task prints appears here prefixed with
            ``[task N] ``) or "discard".
        prefetch: a kernel whose tasks take under 0.1 s gets its next task while
            it finishes the current one, when no kernel is idle (hides the round
            trip; a task may then wait behind an unexpectedly long one). False:
            a task only ever goes to an idle kernel.

    ``kernel_name``, ``python``, ``cwd``, ``env``, ``startup_timeout``, ``transport`` and other keywords
    say how local kernels start, as in ``kernelproxy.start()``.
    """

    _core: _PoolCore
    _portal: Portal
    _options: _TaskOptions

    def __init__(
        self,
        kernels: int | Iterable[KernelSource] | None = None,
        *,
        retries: int = 0,
        timeout: float | None = None,
        output: Output = "forward",
        kernel_name: str = "python3",
        python: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float | None = None,
        transport: str = "auto",
        prefetch: bool = True,
        **options: Any,
    ) -> None:
        task_options = _TaskOptions(retries=retries, timeout=timeout, output=output)
        count, sources = _split_sources(kernels, Kernel)
        local = _local_spec(kernel_name, python, cwd, env, startup_timeout, transport, options)
        connect_timeout = DEFAULT_CONNECT_TIMEOUT if startup_timeout is None else startup_timeout
        portal = get_portal()
        core = _PoolCore(portal.loop, local, connect_timeout, prefetch)
        given = [source.aio if isinstance(source, Kernel) else source for source in sources]
        portal.run(core.start(count, given))
        self._setup(core, portal, task_options)

    @classmethod
    def from_server(
        cls,
        url: str,
        n: int,
        *,
        token: str | None = None,
        kernel_name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        output: Output = "forward",
        prefetch: bool = True,
        **server_options: Any,
    ) -> KernelPool:
        """A pool of ``n`` new kernels on a Jupyter Server or gateway (see ``kernelproxy.connect_server``).

        The kernels are deleted on the server when the pool shuts down; a kernel
        that dies is replaced by a new one there. ``server_options`` go to
        ``connect_server`` (verify, env, transport, startup_timeout...).
        """
        task_options = _TaskOptions(retries=retries, timeout=timeout, output=output)
        portal = get_portal()
        core = _PoolCore(portal.loop, None, DEFAULT_CONNECT_TIMEOUT, prefetch)
        core.server = _server_spec(url, token, kernel_name, server_options)
        pool = object.__new__(cls)
        portal.run(core.start(_check_count(n), []))
        pool._setup(core, portal, task_options)
        return pool

    def _setup(self, core: _PoolCore, portal: Portal, options: _TaskOptions) -> None:
        self._core = core
        self._portal = portal
        self._options = options

    def options(
        self,
        *,
        retries: int | Unset = UNSET,
        timeout: float | None | Unset = UNSET,
        output: Output | Unset = UNSET,
    ) -> KernelPool:
        """A view of the same pool whose tasks use other options: ``pool.options(retries=1).submit(f, x)``."""
        view = object.__new__(KernelPool)
        view._setup(self._core, self._portal, self._options.replace(retries, timeout, output))
        return view

    @property
    def kernels(self) -> list[Kernel]:
        """The pool's working kernels now (a kernel being replaced is not listed)."""
        return [Kernel(kernel, self._portal) for kernel in self._core.ready_kernels()]

    # ------------------------------------------------------------------ Executor

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on the next idle kernel; return a concurrent.futures.Future."""
        self._core.check_open()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        task = self._core.make_task(fn, args, kwargs, self._options, _ThreadSink(future))
        if task is not None:
            self._core.enqueue_threadsafe([task])
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> Iterator[T]:
        """``fn`` over the items, in order, like ``Executor.map``; every item is sent now.

        Args:
            timeout: seconds from this call; the iterator raises TimeoutError when a
                result is not there by then. Then, or when the iterator is closed
                early, tasks not yet sent to a kernel are cancelled; those running
                finish (as with concurrent.futures) and their results are dropped.
            chunksize: items per task (one round trip each); raise it for many small items.
            progress: True for a tqdm progress bar counting finished items, or a dict
                of tqdm arguments (``{"desc": "scoring", "delay": 2}``).
        """
        end_time = None if timeout is None else time.monotonic() + timeout
        self._core.check_open()
        chunks = _chunks(iterables, chunksize)
        bar = _progress_bar(progress, sum(len(chunk) for chunk in chunks))
        counter = _ProgressCounter(bar, len(chunks)) if bar is not None else None
        futures: list[concurrent.futures.Future[Any]] = []
        tasks: list[_Task] = []
        batch: list[_Task] = []
        try:
            first = 0
            for chunk in chunks:
                future: concurrent.futures.Future[Any] = concurrent.futures.Future()
                if counter is not None:
                    size = len(chunk)
                    future.add_done_callback(lambda f, size=size: counter.done(size, f.cancelled()))  # type: ignore[misc]
                sink = _ThreadSink(future)
                if chunksize == 1:
                    task = self._core.make_task(fn, chunk[0], {}, self._options, sink)
                else:
                    task = self._core.make_chunk_task(fn, chunk, first, self._options, sink)
                first += len(chunk)
                futures.append(future)
                if task is not None:
                    tasks.append(task)
                    batch.append(task)
                if len(batch) >= SUBMIT_BATCH:
                    self._core.enqueue_threadsafe(batch)
                    batch = []
            if batch:
                self._core.enqueue_threadsafe(batch)
        except BaseException:
            self._core.loop.call_soon_threadsafe(self._core.abandon, tasks)
            if counter is not None:
                counter.close()
            raise
        return self._results(futures, tasks, chunksize > 1, end_time, counter)

    def _results(
        self,
        futures: list[concurrent.futures.Future[Any]],
        tasks: list[_Task],
        chunked: bool,
        end_time: float | None,
        counter: _ProgressCounter | None,
    ) -> Generator[Any, None, None]:
        futures.reverse()  # pop from the end: finished results are not kept alive
        try:
            while futures:
                future = futures.pop()
                if end_time is None:
                    value = future.result()
                else:
                    value = future.result(end_time - time.monotonic())
                if chunked:
                    yield from value
                else:
                    yield value
        finally:
            if futures:  # closed early, timed out or failed: stop what nobody will read
                self._core.loop.call_soon_threadsafe(self._core.abandon, tasks)
            if counter is not None:
                counter.close()

    def push(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Set variables in every kernel: ``push(weights=w)``. Pickled once; kept for replacement kernels.

        Returns once every kernel has them (after the task it is running, if
        any); tasks submitted afterwards see them.
        """
        merged = _check_names(values, named)
        if not merged:
            return
        self._core.check_open()
        frames = serialization.dumps(merged, parts=merged)
        self._portal.run(self._core.push(list(merged), frames))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; then close the kernels once every submitted task is done.

        Kernels the pool started are shut down, those it connected to are
        disconnected, Kernel objects you gave it are left as they are.

        Args:
            wait: block until then (else it happens in the background).
            cancel_futures: cancel the tasks that have not started.
        """
        self._core.close_submissions()
        future = self._portal.submit(self._core.shutdown(wait, cancel_futures))
        if wait:
            future.result()

    def __enter__(self) -> KernelPool:
        return self

    def __repr__(self) -> str:
        core = self._core
        state = "shut down" if core.closed else "broken" if core.broken else "running"
        return f"<KernelPool {len(core.ready_kernels())}/{len(core.slots)} kernels ready, {len(core.queue)} queued, {state}>"


# ---------------------------------------------------------------------- AsyncKernelPool


@dataclasses.dataclass(eq=False)
class _AsyncStartup:
    """What an AsyncKernelPool starts on its first ``start()``, shared with its views."""

    count: int
    sources: list[Any]
    local: _LocalSpec
    connect_timeout: float
    prefetch: bool
    core: _PoolCore | None = None
    started: asyncio.Future[None] | None = None
    server: dict[str, Any] | None = None  # connect_server_async() arguments: start the kernels there


class AsyncKernelPool:
    """KernelPool for asyncio code: ``async with AsyncKernelPool(4) as pool:``.

    Same arguments as KernelPool (given kernels are AsyncKernel objects of
    this event loop). ``submit`` returns an asyncio.Future (cancelling it
    interrupts the task, also while it runs); ``map`` returns an object you
    can ``await`` (a list) or iterate with ``async for``; ``push`` and
    ``shutdown`` are coroutines. Kernels start on ``async with`` or
    ``await pool.start()``.
    """

    _startup: _AsyncStartup
    _options: _TaskOptions

    def __init__(
        self,
        kernels: int | Iterable[AsyncKernelSource] | None = None,
        *,
        retries: int = 0,
        timeout: float | None = None,
        output: Output = "forward",
        kernel_name: str = "python3",
        python: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float | None = None,
        transport: str = "auto",
        prefetch: bool = True,
        **options: Any,
    ) -> None:
        self._options = _TaskOptions(retries=retries, timeout=timeout, output=output)
        count, sources = _split_sources(kernels, AsyncKernel)
        local = _local_spec(kernel_name, python, cwd, env, startup_timeout, transport, options)
        connect_timeout = DEFAULT_CONNECT_TIMEOUT if startup_timeout is None else startup_timeout
        self._startup = _AsyncStartup(count, sources, local, connect_timeout, prefetch)

    @classmethod
    def from_server(
        cls,
        url: str,
        n: int,
        *,
        token: str | None = None,
        kernel_name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        output: Output = "forward",
        prefetch: bool = True,
        **server_options: Any,
    ) -> AsyncKernelPool:
        """A pool of ``n`` new kernels on a Jupyter Server or gateway; they start on ``async with``."""
        pool = cls(_check_count(n), retries=retries, timeout=timeout, output=output, prefetch=prefetch)
        pool._startup.server = _server_spec(url, token, kernel_name, server_options)
        return pool

    async def start(self) -> AsyncKernelPool:
        """Start (or connect to) the kernels; return the pool. Idempotent."""
        startup = self._startup
        if startup.started is None:
            startup.core = _PoolCore(
                asyncio.get_running_loop(), startup.local, startup.connect_timeout, startup.prefetch
            )
            startup.core.server = startup.server
            startup.started = asyncio.ensure_future(startup.core.start(startup.count, startup.sources))
        await asyncio.shield(startup.started)
        return self

    def _ready_core(self) -> _PoolCore:
        startup = self._startup
        if startup.core is None or startup.started is None or not startup.started.done():
            raise RuntimeError(
                "the pool has not started: use `async with AsyncKernelPool(...)` or `await pool.start()`"
            )
        if startup.started.exception() is not None:
            raise RuntimeError("the pool could not start its kernels") from startup.started.exception()
        return startup.core

    def options(
        self,
        *,
        retries: int | Unset = UNSET,
        timeout: float | None | Unset = UNSET,
        output: Output | Unset = UNSET,
    ) -> AsyncKernelPool:
        """A view of the same pool whose tasks use other options."""
        view = object.__new__(AsyncKernelPool)
        view._startup = self._startup
        view._options = self._options.replace(retries, timeout, output)
        return view

    @property
    def kernels(self) -> list[AsyncKernel]:
        """The pool's working kernels now (a kernel being replaced is not listed)."""
        return self._ready_core().ready_kernels()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Run ``fn(*args, **kwargs)`` on the next idle kernel; return an asyncio.Future."""
        core = self._ready_core()
        core.check_open()
        future: asyncio.Future[T] = core.loop.create_future()
        task = core.make_task(fn, args, kwargs, self._options, _LoopSink(future))
        if task is not None:
            core.enqueue([task])
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> AsyncMapResult[T]:
        """``fn`` over the items: ``await pool.map(...)`` gives a list, ``async for`` yields in order.

        Every item is sent now. timeout, chunksize and progress as in KernelPool.map.
        """
        core = self._ready_core()
        core.check_open()
        loop = core.loop
        end_time = None if timeout is None else loop.time() + timeout
        chunks = _chunks(iterables, chunksize)
        bar = _progress_bar(progress, sum(len(chunk) for chunk in chunks))
        counter = _ProgressCounter(bar, len(chunks)) if bar is not None else None
        futures: list[asyncio.Future[Any]] = []
        tasks: list[_Task] = []
        first = 0
        for chunk in chunks:
            future: asyncio.Future[Any] = loop.create_future()
            if counter is not None:
                size = len(chunk)
                future.add_done_callback(lambda f, size=size: counter.done(size, f.cancelled()))  # type: ignore[misc]
            sink = _LoopSink(future)
            if chunksize == 1:
                task = core.make_task(fn, chunk[0], {}, self._options, sink)
            else:
                task = core.make_chunk_task(fn, chunk, first, self._options, sink)
            first += len(chunk)
            futures.append(future)
            if task is not None:
                tasks.append(task)
        core.enqueue(tasks)
        return AsyncMapResult(core, futures, tasks, chunksize > 1, end_time, counter)

    async def push(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Set variables in every kernel (pickled once; kept for replacement kernels)."""
        merged = _check_names(values, named)
        if not merged:
            return
        core = self._ready_core()
        core.check_open()
        await core.push(list(merged), serialization.dumps(merged, parts=merged))

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks, then close the kernels once every task is done (see KernelPool.shutdown)."""
        startup = self._startup
        if startup.started is None or startup.core is None:
            return
        try:
            await asyncio.shield(startup.started)
        except Exception:
            return  # start() failed and cleaned up after itself
        startup.core.close_submissions()
        await startup.core.shutdown(wait, cancel_futures)

    async def __aenter__(self) -> AsyncKernelPool:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(wait=True)

    def __repr__(self) -> str:
        core = self._startup.core
        if core is None or not core.slots:
            return "<AsyncKernelPool not started>"
        state = "shut down" if core.closed else "broken" if core.broken else "running"
        return f"<AsyncKernelPool {len(core.ready_kernels())}/{len(core.slots)} kernels ready, {len(core.queue)} queued, {state}>"


class AsyncMapResult(Generic[T]):
    """The results of ``AsyncKernelPool.map``: ``await`` it for a list, or ``async for`` over it, in order."""

    def __init__(
        self,
        core: _PoolCore,
        futures: list[asyncio.Future[Any]],
        tasks: list[_Task],
        chunked: bool,
        end_time: float | None,
        counter: _ProgressCounter | None,
    ) -> None:
        self._core = core
        self._futures = futures
        self._tasks = tasks
        self._chunked = chunked
        self._end_time = end_time
        self._counter = counter

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    def __await__(self) -> Generator[Any, None, list[T]]:
        return self._collect().__await__()

    async def _collect(self) -> list[T]:
        return [value async for value in self._iterate()]

    async def _iterate(self) -> AsyncIterator[T]:
        futures = self._futures[::-1]
        self._futures = []  # one iteration only
        try:
            while futures:
                future = futures[-1]
                if self._end_time is not None and not future.done():
                    remaining = self._end_time - self._core.loop.time()
                    await asyncio.wait({future}, timeout=max(remaining, 0))
                    if not future.done():
                        raise asyncio.TimeoutError
                value = await future
                futures.pop()
                if self._chunked:
                    for item in value:
                        yield item
                else:
                    yield value
        finally:
            if futures:
                self._core.abandon(self._tasks)
                for future in futures:
                    future.add_done_callback(_consume_outcome)  # nobody reads it now
            if self._counter is not None:
                self._counter.close()
