"""AsyncKernelPool: the one pool implementation; ``KernelPool`` drives it from kernelproxy's IO thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import warnings
import weakref
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar, overload

from .. import _serialization as serialization
from .._api import DEFAULT_ATTACH_TIMEOUT
from .._kernel import AsyncKernel
from .._launch import local_spec
from .._tracebacks import LocalFuture
from .._types import UNSET, Output, Unset
from . import _arguments as arguments
from ._arguments import Progress, ProgressCounter
from ._scheduler import Scheduler
from ._supervisor import Initializer, KernelSource
from ._tasks import LoopSink, Task, TaskOptions, ThreadSink, map_timed_out

T = TypeVar("T")
if TYPE_CHECKING:
    from .._types import A1, A2, A3, P


class AsyncKernelPool:
    """KernelPool for asyncio code: ``async with AsyncKernelPool(4) as pool:``.

    Same arguments as KernelPool (given kernels are AsyncKernel objects of
    this event loop). ``submit`` returns an asyncio.Future (cancelling it
    interrupts the task, also while it runs); ``map`` returns an object you
    can ``await`` (a list) or iterate with ``async for``; ``push`` and
    ``shutdown`` are coroutines. Kernels start on ``async with`` or
    ``await pool.start()``.
    """

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
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        max_workers: int | None = None,
        mp_context: Any = None,
        **options: Any,
    ) -> None:
        self._options = TaskOptions(retries=retries, timeout=timeout, output=output)
        kernels, initializing = arguments.executor_options(
            kernels,
            max_workers=max_workers,
            mp_context=mp_context,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            pool=self._name,
        )
        arguments.refuse_meaningless(options, self._name)
        count, sources = arguments.split_sources(kernels, AsyncKernel, "AsyncKernelPool")
        local = local_spec(kernel_name, python, cwd, dict(env or {}), startup_timeout, transport, options)
        connect_timeout = DEFAULT_ATTACH_TIMEOUT if startup_timeout is None else startup_timeout
        self._startup = _Startup(count, sources, local, None, connect_timeout, prefetch)
        self._startup.initializer = initializing
        self._startup.max_tasks_per_child = max_tasks_per_child

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
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        **server_options: Any,
    ) -> AsyncKernelPool:
        """A pool of ``n`` new kernels on a Jupyter Server or gateway; they start on ``async with``.

        The kernels are deleted on the server when the pool shuts down; a kernel
        that dies is replaced by a new one there. ``server_options`` go to
        ``connect_server`` (verify, env, transport, startup_timeout...).
        """
        pool = cls(
            arguments.check_count(n),
            retries=retries,
            timeout=timeout,
            output=output,
            prefetch=prefetch,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
        )
        pool._startup.server = arguments.server_spec(url, token, kernel_name, server_options)
        return pool

    async def start(self) -> AsyncKernelPool:
        """Start (or connect to) the kernels; return the pool. Idempotent."""
        startup = self._startup
        if startup.started is None:
            startup.scheduler = Scheduler(
                asyncio.get_running_loop(),
                startup.local,
                startup.server,
                startup.connect_timeout,
                startup.prefetch,
                startup.initializer,
                startup.max_tasks_per_child,
            )
            startup.started = asyncio.ensure_future(startup.scheduler.start(startup.count, startup.sources))
            # The loop holds the scheduler, not this: when every view of the pool is gone, finish and close.
            startup.dropped = weakref.finalize(startup, _close_dropped, startup.scheduler, self._name)
            startup.dropped.atexit = False  # at exit: _shutdown_pools_at_exit
        try:
            await asyncio.shield(startup.started)
        except BaseException:
            if startup.started.done() and startup.dropped is not None:
                startup.dropped.detach()  # it closed what it had started: nothing to warn about
            raise
        return self

    def _scheduler(self) -> Scheduler:
        startup = self._startup
        if startup.scheduler is None or startup.started is None or not startup.started.done():
            raise RuntimeError(
                "the pool has not started: use `async with AsyncKernelPool(...)` or `await pool.start()`"
            )
        if startup.started.exception() is not None:
            raise RuntimeError("the pool could not start its kernels") from startup.started.exception()
        return startup.scheduler

    def options(
        self,
        *,
        retries: int | Unset = UNSET,
        timeout: float | None | Unset = UNSET,
        output: Output | Unset = UNSET,
    ) -> AsyncKernelPool:
        """A view of the same pool whose tasks use other options: ``pool.options(retries=1).submit(f, x)``."""
        view = object.__new__(AsyncKernelPool)
        view._startup = self._startup
        view._options = self._options.replace(retries, timeout, output)
        return view

    @property
    def kernels(self) -> list[AsyncKernel]:
        """The pool's working kernels now (a kernel being replaced is not listed)."""
        return self._scheduler().working_kernels()

    # ------------------------------------------------------------------ tasks

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Run ``fn(*args, **kwargs)`` on the next idle kernel; return an asyncio.Future."""
        scheduler = self._scheduler()
        scheduler.check_open()
        future: asyncio.Future[T] = scheduler.loop.create_future()
        task = scheduler.make_task(fn, args, kwargs, self._options, LoopSink(future))
        if task is not None:
            scheduler.enqueue([task])
        return future

    # The checker matches fn's parameters with the iterables' items (up to three iterables, like builtins.map).
    @overload
    def map(
        self,
        fn: Callable[[A1], T],
        iterable: Iterable[A1],
        /,
        *,
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> AsyncMapResult[T]: ...
    @overload
    def map(
        self,
        fn: Callable[[A1, A2], T],
        iterable1: Iterable[A1],
        iterable2: Iterable[A2],
        /,
        *,
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> AsyncMapResult[T]: ...
    @overload
    def map(
        self,
        fn: Callable[[A1, A2, A3], T],
        iterable1: Iterable[A1],
        iterable2: Iterable[A2],
        iterable3: Iterable[A3],
        /,
        *,
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> AsyncMapResult[T]: ...
    @overload
    def map(
        self,
        fn: Callable[..., T],
        iterable1: Iterable[Any],
        iterable2: Iterable[Any],
        iterable3: Iterable[Any],
        iterable4: Iterable[Any],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> AsyncMapResult[T]: ...
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
        scheduler = self._scheduler()
        scheduler.check_open()
        end_time = None if timeout is None else scheduler.loop.time() + timeout
        items = arguments.chunks(iterables, chunksize)
        counter = _counter(progress, items)
        futures, tasks = arguments.map_tasks(
            scheduler, fn, items, chunksize > 1, self._options, scheduler.loop.create_future, LoopSink, counter
        )
        scheduler.enqueue(tasks)
        return AsyncMapResult(scheduler, futures, tasks, chunksize > 1, timeout, end_time, counter)

    async def interrupt(self, future: asyncio.Future[Any]) -> bool:
        """Stop one task: interrupt the kernel running it (that kernel only), or drop it if it waits for one.

        ``future`` is what ``submit()`` returned; it raises CallInterrupted. Returns
        False if the task had finished already.
        """
        return await self._scheduler().interrupt(future)

    async def push(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Set variables in every kernel (pickled once; kept for replacement kernels).

        Returns once every kernel has them (after the task it is running, if
        any); tasks submitted afterwards see them.
        """
        merged = arguments.check_names(values, named)
        if not merged:
            return
        scheduler = self._scheduler()
        scheduler.check_open()
        await scheduler.push(list(merged), serialization.dumps(merged, parts=merged))

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; then close the kernels once every submitted task is done.

        Kernels the pool started are shut down, those it connected to are
        disconnected, kernels you gave it are left as they are.

        Args:
            wait: wait until then (else it happens in the background).
            cancel_futures: cancel the tasks that have not started.
        """
        startup = self._startup
        if startup.started is None or startup.scheduler is None:
            return
        try:
            await asyncio.shield(startup.started)
        except Exception:
            return  # start() failed and cleaned up after itself
        if startup.dropped is not None:
            startup.dropped.detach()
        startup.scheduler.close_submissions()
        await startup.scheduler.shutdown(wait, cancel_futures)

    async def __aenter__(self) -> AsyncKernelPool:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(wait=True)

    def __repr__(self) -> str:
        scheduler = self._startup.scheduler
        if scheduler is None or not scheduler.slots:
            return f"<{self._name} not started>"
        return f"<{self._name} {_describe(scheduler)}>"

    _name = "AsyncKernelPool"

    # ------------------------------------------------------------------ for KernelPool, from any thread

    def _submit_threadsafe(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> concurrent.futures.Future[T]:
        scheduler = self._scheduler()
        scheduler.check_open()
        future: concurrent.futures.Future[T] = LocalFuture()
        task = scheduler.make_task(fn, args, kwargs, self._options, ThreadSink(future))
        if task is not None:
            scheduler.enqueue_threadsafe([task])
        return future

    def _map_threadsafe(
        self, fn: Callable[..., Any], items: list[list[tuple[Any, ...]]], chunked: bool, counter: ProgressCounter | None
    ) -> tuple[list[concurrent.futures.Future[Any]], list[Task]]:
        """Submit map() tasks in batches as they are pickled (on the caller's thread)."""
        scheduler = self._scheduler()
        scheduler.check_open()
        futures: list[concurrent.futures.Future[Any]] = []
        tasks: list[Task] = []
        try:
            for start in range(0, len(items), SUBMIT_BATCH):
                batch_futures, batch = arguments.map_tasks(
                    scheduler, fn, items[start : start + SUBMIT_BATCH], chunked, self._options,
                    LocalFuture, ThreadSink, counter,
                )
                futures += batch_futures
                tasks += batch
                scheduler.enqueue_threadsafe(batch)
        except BaseException:
            self._abandon_threadsafe(tasks)
            raise
        return futures, tasks

    def _abandon_threadsafe(self, tasks: list[Task]) -> None:
        scheduler = self._scheduler()
        scheduler.loop.call_soon_threadsafe(scheduler.abandon, tasks)


SUBMIT_BATCH = 64  # map() hands tasks to the IO thread in batches of this many


class _Startup:
    """What a pool starts on its first ``start()``, shared with its views."""

    def __init__(
        self,
        count: int,
        sources: list[Any],
        local: Any,
        server: dict[str, Any] | None,
        connect_timeout: float,
        prefetch: bool,
    ) -> None:
        self.count = count
        self.sources = sources
        self.local = local
        self.server = server  # connect_server_async() arguments: start the kernels there
        self.connect_timeout = connect_timeout
        self.prefetch = prefetch
        self.scheduler: Scheduler | None = None
        self.started: asyncio.Future[None] | None = None
        self.dropped: weakref.finalize[Any, Any] | None = None
        self.initializer: Initializer | None = None
        self.max_tasks_per_child: int | None = None


def _close_dropped(scheduler: Scheduler, name: str) -> None:
    """The last view of a pool that was never shut down is gone: warn (as for an unclosed file) and shut it down.

    As ProcessPoolExecutor does when it is collected, the tasks already submitted
    still run; then the kernels are closed. Runs wherever garbage is collected.
    """
    if scheduler.closed or scheduler.pid != os.getpid():
        return
    warnings.warn(
        f"unclosed {name} ({len(scheduler.slots)} kernels): kernelproxy shuts it down once its submitted tasks "
        "are done; call shutdown(), or use it in a `with` block",
        ResourceWarning,
        stacklevel=2,
    )
    scheduler.close_submissions()

    def shut_down() -> None:
        asyncio.ensure_future(scheduler.shutdown(wait=False, cancel_futures=False))

    try:
        scheduler.loop.call_soon_threadsafe(shut_down)
    except RuntimeError:  # its loop is closed; _kill_started_kernels stops the kernels at exit
        pass


def _counter(progress: Progress, items: list[list[tuple[Any, ...]]]) -> ProgressCounter | None:
    bar = arguments.progress_bar(progress, sum(len(chunk) for chunk in items))
    return ProgressCounter(bar, len(items)) if bar is not None else None


def _describe(scheduler: Scheduler) -> str:
    state = "shut down" if scheduler.closed else "broken" if scheduler.broken else "running"
    ready = len(scheduler.working_kernels())
    return f"{ready}/{len(scheduler.slots)} kernels ready, {len(scheduler.queue)} queued, {state}"


class AsyncMapResult(Generic[T]):
    """The results of ``AsyncKernelPool.map``: ``await`` it for a list, or ``async for`` over it, in order."""

    def __init__(
        self,
        scheduler: Scheduler,
        futures: list[asyncio.Future[Any]],
        tasks: list[Task],
        chunked: bool,
        timeout: float | None,
        end_time: float | None,
        counter: ProgressCounter | None,
    ) -> None:
        self._scheduler = scheduler
        self._futures = futures
        self._tasks = tasks
        self._chunked = chunked
        self._timeout = timeout
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
        received = 0
        try:
            while futures:  # no local keeps a result alive while the caller works on it (bpo-14406)
                if self._end_time is not None and not futures[-1].done():
                    remaining = self._end_time - self._scheduler.loop.time()
                    await asyncio.wait({futures[-1]}, timeout=max(remaining, 0))
                    if not futures[-1].done():
                        assert self._timeout is not None
                        raise asyncio.TimeoutError(map_timed_out(self._timeout, received))
                await asyncio.wait({futures[-1]})
                if self._chunked:
                    chunk = futures.pop().result()
                    chunk.reverse()
                    while chunk:
                        received += 1
                        yield chunk.pop()
                else:
                    received += 1
                    yield futures.pop().result()
        finally:
            if futures:
                self._scheduler.abandon(self._tasks)
                for future in futures:
                    future.add_done_callback(_consume_outcome)  # nobody reads it now
            if self._counter is not None:
                self._counter.close()


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
