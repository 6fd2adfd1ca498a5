"""The pool's scheduler: one worker coroutine per kernel feeding it tasks from the queue.

It runs on one event loop (kernelproxy's IO thread for ``KernelPool``, the
caller's loop for ``AsyncKernelPool``); ``make_task``, ``make_chunk_task``,
``enqueue_threadsafe`` and ``close_submissions`` may be called from any thread.
Decisions (which task, how many per kernel, what a death means) are the
policy's (``_policy``); kernels are the supervisor's (``_supervisor``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Callable

from .. import _serialization as serialization
from .._connection import INTERRUPT_GRACE
from .._exceptions import BrokenKernelPool, CallInterrupted, KernelClosedError, KernelDiedError
from .._launch import LocalSpec
from .._output import Forwarder
from .._portal import forked_message
from .._protocol import Outcome
from . import _policy as policy
from ._supervisor import Initializer, KernelSource, Slot, Supervisor, died_of
from ._tasks import RUN_CHUNK, LoopSink, Sink, Task, TaskOptions, function_name

log = logging.getLogger("kernelproxy")

IDLE_CHECK = 1.0  # seconds between liveness checks of an idle kernel


class Scheduler:
    """Queue, workers and the fate of tasks; shared by both pool APIs."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local: LocalSpec | None,
        server: dict[str, Any] | None,
        connect_timeout: float,
        prefetch: bool,
        initializer: Initializer | None = None,
        max_tasks_per_child: int | None = None,
    ) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.prefetch = prefetch
        self._kernel_plan = (local, server, connect_timeout, initializer)
        self.max_tasks = max_tasks_per_child  # a fresh kernel in a slot after this many tasks
        self.supervisor: Supervisor | None = None  # made on the loop (Python 3.9 binds locks to a loop)
        self.queue = policy.TaskQueue()
        self.idle: collections.deque[asyncio.Future[None]] = collections.deque()  # workers of idle kernels
        self.prefetching: collections.deque[asyncio.Future[None]] = collections.deque()  # of busy, short-task ones
        self.task_ids = itertools.count()
        self.running = 0
        self.draining = False  # shutting down: workers leave once the queue is empty
        self.closed = False  # no new submissions (set under submit_lock)
        self.broken: KernelDiedError | None = None  # no kernel left
        self.submit_lock = threading.Lock()
        self.closing: asyncio.Future[None] | None = None  # shutting down the kernels once the tasks are done
        self.tasks: dict[int, Task] = {}  # id(future) -> its task, until the future is done: pool.interrupt()
        _watch_at_exit(self)

    @property
    def slots(self) -> list[Slot]:
        return self.supervisor.slots if self.supervisor is not None else []

    # ------------------------------------------------------------------ tasks (any thread)

    def make_task(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: TaskOptions,
        sink: Sink,
        refs: tuple[Any, list[Any]] | None = None,
    ) -> Task | None:
        """Pickle a call into a task; on a pickling error fail ``sink`` and return None.

        ``refs``: ``serialization.function_refs(fn)``, when the caller made it once for many tasks (map()).
        """
        task_id = next(self.task_ids)
        try:
            sent_fn, functions = refs or serialization.function_refs(fn)  # pickled once, sent once per kernel
            frames = serialization.dumps_call(fn, args, kwargs, sent_fn=sent_fn)
        except Exception as exc:
            sink.fail(exc)
            return None
        task = Task(task_id, frames, function_name(fn), 1, options, sink, options.retries)
        task.functions = functions
        self.track(sink.future, task)
        return task

    def make_chunk_task(
        self,
        fn: Callable[..., Any],
        chunk: list[tuple[Any, ...]],
        first: int,
        options: TaskOptions,
        sink: Sink,
        refs: tuple[Any, list[Any]] | None = None,
    ) -> Task | None:
        """Pickle one map() chunk (items ``first``...) into a task that runs them in one call."""
        task_id = next(self.task_ids)
        parts = {"the function": fn, **{f"item {first + i}": args for i, args in enumerate(chunk)}}
        try:
            run_chunk, functions = serialization.function_refs(RUN_CHUNK)
            sent_fn, more = refs or serialization.function_refs(fn)
            frames = serialization.dumps((run_chunk, (sent_fn, chunk), {}), parts=parts)
        except Exception as exc:
            sink.fail(exc)
            return None
        task = Task(task_id, frames, function_name(fn), len(chunk), options, sink, options.retries)
        task.functions = functions + more
        return task

    def track(self, future: Any, task: Task | None) -> None:
        """Remember which task a future stands for, until it is done (for ``interrupt``)."""
        if task is None:
            return
        key = id(future)
        self.tasks[key] = task
        future.add_done_callback(lambda _: self.tasks.pop(key, None))

    async def interrupt(self, future: Any) -> bool:
        """Stop the task behind ``future``: interrupt its kernel if it runs (that kernel only), drop it if queued.

        Its future raises CallInterrupted. Says whether there was anything to stop.
        """
        task = self.tasks.get(id(future))
        if task is None:
            if future.done():
                return False
            raise ValueError("interrupt() takes a future that this pool's submit() or map() returned")
        if future.done():
            return False
        task.interrupted = True
        request = task.request
        if request is None or request.done():  # waiting for a kernel (queued, or requeued after a death)
            self.queue.remove(task)
            task.sink.fail(CallInterrupted(f"task {task.id} ({task.name}) was interrupted before it started"))
            return True
        request.cancel()  # abandons the call: its kernel is interrupted (at once, or when it starts the task)
        await asyncio.wait({request}, timeout=INTERRUPT_GRACE + 5)
        return True

    def check_open(self) -> None:
        if self.pid != os.getpid():
            raise KernelClosedError(forked_message().replace("this kernel", "this pool", 1))
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self.closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self.broken is not None:
            raise BrokenKernelPool(str(self.broken))

    def enqueue_threadsafe(self, tasks: list[Task]) -> None:
        with self.submit_lock:
            self.check_open()
            self.loop.call_soon_threadsafe(self.enqueue, tasks)

    def close_submissions(self) -> None:
        with self.submit_lock:
            self.closed = True

    # ------------------------------------------------------------------ queue (loop)

    def enqueue(self, tasks: list[Task], front: bool = False) -> None:
        if self.broken is not None:
            for task in tasks:
                if task.started or task.sink.claim():
                    task.sink.fail(BrokenKernelPool(str(self.broken)))
            return
        self.queue.add(tasks, front=front)
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

    def abandon(self, tasks: list[Task]) -> None:
        policy.abandon(tasks)

    # ------------------------------------------------------------------ lifecycle (loop)

    async def start(self, count: int, sources: Sequence[KernelSource]) -> None:
        """Start ``count`` kernels and take the given ones; then start a worker per kernel."""
        local, server, connect_timeout, initializer = self._kernel_plan
        self.supervisor = Supervisor(local, server, connect_timeout, initializer)
        self.supervisor.on_join = self._joined
        await self.supervisor.start(count, sources)
        for slot in self.supervisor.slots:
            slot.worker = asyncio.ensure_future(self._work(slot))

    def _joined(self, slot: Slot) -> None:
        """A kernel that was still starting is ready (server pools): it takes tasks too."""
        slot.worker = asyncio.ensure_future(self._work(slot))
        self.wake()

    async def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Stop taking tasks; with ``wait``, return once every task is done and every kernel closed."""
        if cancel_futures:
            self.queue.cancel_unstarted()
        self.draining = True
        self.wake()
        if self.closing is None:
            self.closing = asyncio.ensure_future(self._finish())
        if wait:
            await asyncio.shield(self.closing)

    async def _finish(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.settled()  # kernels still starting join, then leave with the others
        workers = [slot.worker for slot in self.slots if slot.worker is not None]
        await asyncio.gather(*workers, return_exceptions=True)
        if self.supervisor is not None:
            await self.supervisor.close_kernels()

    async def push(self, names: list[str], frames: list[memoryview]) -> None:
        assert self.supervisor is not None
        await self.supervisor.push(names, frames)

    def working_kernels(self) -> list[Any]:
        return self.supervisor.working_kernels() if self.supervisor is not None else []

    # ------------------------------------------------------------------ workers (loop)

    async def _work(self, slot: Slot) -> None:
        """Feed one kernel: one task at a time, or two when its tasks are short (see ``policy.capacity``)."""
        assert self.supervisor is not None
        inflight: set[asyncio.Task[None]] = set()
        # One future per wait, resolved by whichever comes first: one of its tasks ends, wake() has work for it,
        # or IDLE_CHECK passes. (asyncio.wait over every task in flight, up to 16, cost more than a tiny task.)
        wake: asyncio.Future[None] = self.loop.create_future()

        def woken(_: object = None) -> None:
            if not wake.done():
                wake.set_result(None)

        try:
            while True:
                if slot.unusable:
                    if inflight:  # they end at once: the connection failed them
                        await asyncio.wait(inflight)
                        inflight.clear()
                    if self._all_done():
                        return  # nothing left to run on a replacement; close_kernels() cleans up the dead one
                    await self.supervisor.replace(slot)
                    if slot.retired:
                        self._check_any_left()
                        return
                    continue
                if slot.restarted_elsewhere:  # restarted outside the pool: push again
                    try:
                        await self.supervisor.push_all(slot, slot.kernel)
                    except Exception as exc:
                        log.warning("pushing the pool's values to restarted kernel %d failed: %s", slot.index, exc)
                        await asyncio.sleep(IDLE_CHECK)
                        continue
                if self.max_tasks is not None and slot.sent >= self.max_tasks and not inflight:
                    await self.supervisor.replace(slot, retire=True)  # max_tasks_per_child: a fresh kernel
                    if slot.retired:
                        self._check_any_left()
                        return
                    continue
                waiting_for_work = False
                upcoming = self.queue.peek()
                limit = policy.capacity(
                    prefetch=self.prefetch,
                    service=slot.service,
                    default_timeout=slot.kernel.call_options.timeout,
                    deep=slot.kernel.info.transport.startswith("lane")
                    and upcoming is not None
                    and upcoming.name == slot.service_of,
                )
                if self.max_tasks is not None:
                    limit = min(limit, self.max_tasks - slot.sent)
                slot.inflight = len(inflight)
                if len(inflight) < limit and (not inflight or len(self.queue) > self._idle_kernels()):
                    task = self.queue.pop(second=bool(inflight))
                    if task is not None:
                        slot.sent += 1
                        running = self.loop.create_task(self._run(slot, task))
                        running.add_done_callback(woken)
                        inflight.add(running)
                        slot.inflight = len(inflight)
                        continue
                    if self._all_done():
                        self.wake()  # let the other workers see it too
                        return
                    waiting_for_work = True
                if wake.done():
                    wake = self.loop.create_future()
                if waiting_for_work:
                    (self.prefetching if inflight else self.idle).append(wake)
                if any(ended.done() for ended in inflight):
                    woken()  # one ended before this wait began
                timer = self.loop.call_later(IDLE_CHECK, woken)
                try:
                    await wake
                finally:
                    timer.cancel()
                    if waiting_for_work:
                        for waiters in (self.idle, self.prefetching):
                            if wake in waiters:
                                waiters.remove(wake)
                inflight = {going for going in inflight if not going.done()}
        except asyncio.CancelledError:
            for going in inflight:
                going.cancel()
            raise
        except Exception:  # a bug here must not hang callers: say so, and leave the kernel out
            log.exception("kernelproxy pool worker %d failed", slot.index)
            slot.retired = True
            self._check_any_left()

    def _idle_kernels(self) -> int:
        """Kernels whose workers hold no task: a task goes to one of them before a busy kernel takes another."""
        return sum(1 for slot in self.slots if not slot.inflight and not slot.retired and slot.ready)

    def _all_done(self) -> bool:
        return self.draining and not self.queue and self.running == 0

    async def _run(self, slot: Slot, task: Task) -> None:
        kernel = slot.kernel
        sent = self.loop.time()
        task.behind, task.ended = (slot.holding[-1] if slot.holding else None), False
        slot.holding.append(task)
        output = Forwarder(task.output_to, f"[task {task.id}] ") if task.options.output == "forward" else None
        task.outcome = Outcome()
        request = self.loop.create_task(
            kernel._call_frames(task.frames, task.name, task.options.timeout, output, task.outcome, task.functions)
        )
        task.request = request
        if isinstance(task.sink, LoopSink) and task.sink.future is not None:  # cancelling it interrupts the work
            task.sink.future.add_done_callback(lambda future: request.cancel() if future.cancelled() else None)
        self.running += 1
        try:
            # Not awaiting the request itself: cancelling this task must leave the request be (it is cancelled below).
            ended: asyncio.Future[None] = self.loop.create_future()
            request.add_done_callback(lambda _: None if ended.done() else ended.set_result(None))
            try:
                await ended
            except asyncio.CancelledError:
                request.cancel()
                task.sink.fail(KernelClosedError("the pool was torn down while this task ran"))
                raise
            finally:
                if output is not None:
                    output.flush()
            died = request.done() and not request.cancelled() and died_of(request.exception(), kernel)
            task.ended = not died
            if request.cancelled():
                how = "interrupted" if task.interrupted else "cancelled"
                task.sink.fail(
                    CallInterrupted(f"task {task.id} ({task.name}) was {how}; its remote work was interrupted")
                )
                return
            done = self.loop.time()
            # the kernel's own time for it, not its wait behind another
            previous = slot.service if task.name == slot.service_of else None  # another function: start afresh
            slot.service = policy.moving_service(previous, done - max(sent, slot.last_done))
            slot.service_of = task.name
            slot.last_done = done
            exc = request.exception()
            if exc is None:
                task.sink.resolve(request.result())
                task.frames, task.request = [], None  # done: nothing of it stays alive (map() holds its tasks)
            elif died:
                self._lost(task, slot, exc)
            else:
                task.sink.fail(exc)
                task.frames, task.request = [], None
        finally:
            slot.holding.remove(task)
            self.running -= 1
            if self.draining and self.running == 0:
                self.wake()

    def _lost(self, task: Task, slot: Slot, exc: BaseException) -> None:
        """``task`` was sent to a kernel that died: run it again if it never started or has retries, else fail it."""
        fate = policy.fate_of_lost(task)
        if fate is policy.Fate.REQUEUE:
            log.debug("task %d never ran on kernel %d, which died; it goes back to the queue", task.id, slot.index)
        elif fate is policy.Fate.REQUEUE_ONCE:
            task.requeued_unseen = True
            log.info("kernel %d died before it started task %d; the task goes back to the queue", slot.index, task.id)
        elif fate is policy.Fate.RETRY:
            task.retries_left -= 1
            log.warning("kernel %d died during task %d (%s): %s; retrying it", slot.index, task.id, task.name, exc)
        else:
            what = "retries exhausted; " if task.options.retries else ""
            task.sink.fail(
                KernelDiedError(
                    f"the kernel running task {task.id} ({task.name}) died: {exc}; {what}the pool replaces that kernel"
                )
            )
            return
        self.enqueue([task], front=True)

    def _check_any_left(self) -> None:
        joining = self.supervisor is not None and self.supervisor.still_joining
        if all(slot.retired for slot in self.slots) and self.broken is None and not joining:
            self.broken = BrokenKernelPool("every kernel of the pool died and none could be replaced")
            for task in self.queue.take_all():
                if task.started or task.sink.claim():
                    task.sink.fail(BrokenKernelPool(str(self.broken)))
            self.wake()


# ---------------------------------------------------------------------- interpreter exit

_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()
_exiting = False  # the interpreter is shutting down: no new tasks
_hooked = False


def _watch_at_exit(scheduler: Scheduler) -> None:
    """At interpreter exit, finish the pools' submitted tasks, as ProcessPoolExecutor does."""
    global _hooked
    _live.add(scheduler)
    if _hooked:
        return
    _hooked = True
    try:  # runs before atexit hooks (and _kill_started_kernels), like concurrent.futures' own
        threading._register_atexit(_finish_pools_at_exit)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # no such hook (not CPython), or already exiting
        import atexit

        atexit.register(_finish_pools_at_exit)


def _finish_pools_at_exit() -> None:
    """Refuse new tasks, then wait for every pool's submitted tasks and close its kernels."""
    global _exiting
    _exiting = True
    for scheduler in list(_live):
        if scheduler.pid != os.getpid() or scheduler.closing is not None and scheduler.closing.done():
            continue
        loop = scheduler.loop
        if loop.is_closed() or not loop.is_running() or scheduler.supervisor is None:
            continue  # an AsyncKernelPool whose loop has ended: nothing can run its tasks now
        scheduler.close_submissions()
        try:
            asyncio.run_coroutine_threadsafe(scheduler.shutdown(wait=True, cancel_futures=False), loop).result()
        except BaseException as exc:  # exiting anyway: the kernels are killed at atexit
            log.warning("finishing a pool's tasks at exit failed: %r", exc)
