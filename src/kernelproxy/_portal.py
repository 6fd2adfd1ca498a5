"""The IO thread: a private event loop that runs the async core for blocking callers.

The blocking API never touches the caller's event loop, so it works the same
in scripts, threads and notebooks (where a loop is always running).
One thread serves every Kernel in the process. Each coroutine runs in its
caller's context, taken on the calling thread (``_output.capture``), so the
output of a call goes where the caller's own output goes (its notebook cell).

The host process is not ours, so the thread must outlive anything: a
``SystemExit`` or ``KeyboardInterrupt`` that escapes a callback (asyncio lets
those two end ``run_forever``) is logged and the loop runs on. A forked child
inherits the portal without its thread: there every use raises
``KernelClosedError`` at once, and a new portal serves the child's own kernels.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._exceptions import KernelClosedError
from ._output import capture
from ._tracebacks import run_coroutine_threadsafe

log = logging.getLogger("kernelproxy")

T = TypeVar("T")

# How long a blocking caller hit by KeyboardInterrupt waits for the cancelled call to interrupt the kernel.
CANCEL_GRACE = 10.0


class Portal:
    """Runs coroutines on a daemon thread's event loop."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="kernelproxy-io", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Run the loop for ever: nothing that escapes a callback may end it (every kernel of the process needs it)."""
        while True:
            try:
                self._loop.run_forever()
                return  # stopped on purpose
            except BaseException:  # SystemExit/KeyboardInterrupt from a callback: asyncio lets them end the loop
                log.exception("kernelproxy's IO thread caught an exception that would have ended it; it goes on")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the IO loop; return a future for its result."""
        self._check_thread(coro)
        return capture().run(run_coroutine_threadsafe, coro, self._loop)  # the task copies that context

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the IO loop and wait for it.

        On KeyboardInterrupt the call is cancelled (which interrupts its remote
        work) before the KeyboardInterrupt propagates, so the kernel stays consistent.
        """
        self._check_thread(coro)
        # The cheapest hop there is (it sets the latency floor of every blocking call): one
        # call_soon_threadsafe there, one lock release back, no concurrent.futures.Future in between.
        done = threading.Lock()
        done.acquire()
        ended: list[tuple[bool, Any]] = []  # (raised, its result or exception)
        tasks: list[asyncio.Task[None]] = []
        cancelled = False

        async def run_and_release() -> None:
            # Released by the task's last step, not by a done callback: one loop iteration less per call.
            try:
                ended.append((False, await coro))
            except BaseException as exc:  # the caller raises it (KeyboardInterrupt and SystemExit too: not the loop)
                ended.append((True, exc))
            finally:
                done.release()

        def start() -> None:
            if cancelled:  # Ctrl-C came before the task existed
                coro.close()
                done.release()
                return
            tasks.append(self._loop.create_task(run_and_release()))

        def cancel() -> None:
            nonlocal cancelled
            cancelled = True
            for task in tasks:
                task.cancel()

        self._loop.call_soon_threadsafe(start, context=capture())  # the caller's context, for the task
        try:
            # Wait in slices on a private lock: signals and _thread.interrupt_main() get through at once,
            # and a KeyboardInterrupt cannot land inside a lock another thread needs.
            while not done.acquire(timeout=0.1):
                pass
        except KeyboardInterrupt:
            self._loop.call_soon_threadsafe(cancel)
            done.acquire(timeout=CANCEL_GRACE)  # the cancelled call interrupts its remote work meanwhile
            raise
        raised, value = ended.pop()  # (popped: the exception's frames must not keep it alive through this list)
        if raised:
            raise value
        result: T = value
        return result

    def _check_thread(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self.pid != os.getpid():
            coro.close()
            raise KernelClosedError(forked_message())
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking kernelproxy call was made from kernelproxy's own IO thread "
                "(inside an output callback?); use the AsyncKernel API there"
            )


def forked_message() -> str:
    return (
        "this kernel belongs to the process that created it, not to this forked child "
        f"(pid {os.getpid()}): its connection, IO thread and files are the parent's. "
        "Start or connect to a kernel in the child (kernelproxy.start()/connect() work there)"
    )


_portal: Portal | None = None
_portal_lock = threading.Lock()
_inherited: list[Any] = []  # a forked child keeps what it inherited alive, never closing the parent's resources


def get_portal() -> Portal:
    global _portal
    with _portal_lock:
        if _portal is None or _portal.pid != os.getpid():
            if _portal is not None:
                _inherited.append(_portal)
            _portal = Portal()
        return _portal


def _after_fork_in_child() -> None:
    global _portal_lock
    _portal_lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
