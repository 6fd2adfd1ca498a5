"""The IO thread: a private event loop that runs the async core for blocking callers.

The blocking API never touches the caller's event loop, so it works the same
in scripts, threads and notebooks (where a loop is always running).
One thread serves every Kernel in the process. Each coroutine runs in its
caller's context, taken on the calling thread (``_output.capture``), so the
output of a call goes where the caller's own output goes (its notebook cell).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._output import capture
from ._tracebacks import run_coroutine_threadsafe

T = TypeVar("T")

# How long a blocking caller hit by KeyboardInterrupt waits for the cancelled call to interrupt the kernel.
CANCEL_GRACE = 10.0


class Portal:
    """Runs coroutines on a daemon thread's event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kernelproxy-io", daemon=True)
        self._thread.start()

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
        tasks: list[asyncio.Task[T]] = []
        cancelled = False

        def start() -> None:
            if cancelled:  # Ctrl-C came before the task existed
                coro.close()
                done.release()
                return
            task = self._loop.create_task(coro)
            task.add_done_callback(lambda _: done.release())
            tasks.append(task)

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
            # The cancelled call interrupts its remote work meanwhile.
            if done.acquire(timeout=CANCEL_GRACE) and tasks and not tasks[0].cancelled():
                tasks[0].exception()  # mark it retrieved: the caller gets the KeyboardInterrupt instead
            raise
        return tasks[0].result()

    def _check_thread(self, coro: Coroutine[Any, Any, Any]) -> None:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking kernelproxy call was made from kernelproxy's own IO thread "
                "(inside an output callback?); use the AsyncKernel API there"
            )


_portal: Portal | None = None
_portal_lock = threading.Lock()


def get_portal() -> Portal:
    global _portal
    with _portal_lock:
        if _portal is None:
            _portal = Portal()
        return _portal
