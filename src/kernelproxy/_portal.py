"""The IO thread: a private event loop that runs the async core for blocking callers.

The blocking API never touches the caller's event loop, so it works the same
in scripts, threads and notebooks (where a loop is always running).
One thread serves every Kernel in the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

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
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking kernelproxy call was made from kernelproxy's own IO thread "
                "(inside an output callback?); use the AsyncKernel API there"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the IO loop and wait for it.

        On KeyboardInterrupt the call is cancelled (which interrupts its remote
        work) before the KeyboardInterrupt propagates, so the kernel stays consistent.
        """
        done = threading.Lock()
        done.acquire()
        outcome: list[Any] = []

        def signal_done() -> None:
            try:
                done.release()
            except RuntimeError:  # already released: cancelled just as it started
                pass

        async def run_and_signal() -> None:
            outcome.append(None)  # marks "started": from here on, finally signals
            try:
                outcome[0] = await coro
            except BaseException as exc:
                outcome[0] = _Failure(exc)
            finally:
                signal_done()

        future = self.submit(run_and_signal())
        future.add_done_callback(lambda _: None if outcome else signal_done())  # cancelled before it ran
        try:
            # Wait in slices on a private lock: signals and _thread.interrupt_main() get through at once,
            # and a KeyboardInterrupt cannot land inside a lock another thread needs.
            while not done.acquire(timeout=0.1):
                pass
        except KeyboardInterrupt:
            future.cancel()
            done.acquire(timeout=CANCEL_GRACE)  # the cancelled call interrupts its remote work meanwhile
            raise
        result: Any = outcome[0]
        if isinstance(result, _Failure):
            raise result.exception
        return result  # type: ignore[no-any-return]


class _Failure:
    """A coroutine's exception, carried back to the waiting thread."""

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception


_portal: Portal | None = None
_portal_lock = threading.Lock()


def get_portal() -> Portal:
    global _portal
    with _portal_lock:
        if _portal is None:
            _portal = Portal()
        return _portal
