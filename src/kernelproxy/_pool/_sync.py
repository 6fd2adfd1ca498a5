"""KernelPool: the blocking pool, a thin facade over AsyncKernelPool run on kernelproxy's IO thread."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union, overload

from .. import _display
from .. import _serialization as serialization
from .._portal import Portal, get_portal
from .._sync import Kernel
from .._tracebacks import local_tracebacks, trim
from .._types import UNSET, Output, Unset
from . import _arguments as arguments
from ._arguments import Progress, ProgressCounter
from ._async import AsyncKernelPool, _counter, _describe
from ._tasks import Task, map_timed_out

T = TypeVar("T")
if TYPE_CHECKING:
    from .._types import A1, A2, A3, P
KernelSource = Union[Kernel, str, "os.PathLike[str]"]


@local_tracebacks  # errors re-raised from the kernel go from the caller's line to the remote frames
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
            ``[task N] ``, its displays as in ``Kernel``; in a notebook, in the
            cell that submitted it) or "discard".
        prefetch: a kernel whose tasks take under 0.1 s gets its next task while
            it finishes the current one, when no kernel is idle (hides the round
            trip; a task may then wait behind an unexpectedly long one). False:
            a task only ever goes to an idle kernel.
        initializer: ``initializer(*initargs)`` runs first in every kernel,
            also in each kernel that replaces another (as with
            ``ProcessPoolExecutor``); if it fails, the pool raises BrokenKernelPool.
        initargs: the arguments of ``initializer``.
        max_tasks_per_child: a kernel the pool started is replaced by a fresh one
            after this many tasks (None: never).
        max_workers: ``ProcessPoolExecutor``'s name for the number of kernels.
        mp_context: refused with a TypeError: kernels are not forked or spawned.

    ``kernel_name``, ``python``, ``cwd``, ``env``, ``startup_timeout``, ``transport`` and other keywords
    say how local kernels start, as in ``kernelproxy.start()``.
    """

    _pool: AsyncKernelPool
    _portal: Portal

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
        kernels, _ = arguments.executor_options(
            kernels,
            max_workers=max_workers,
            mp_context=mp_context,
            initializer=None,
            initargs=(),
            max_tasks_per_child=max_tasks_per_child,
            pool="KernelPool",
        )
        arguments.refuse_meaningless(options, "KernelPool")
        count, sources = arguments.split_sources(kernels, Kernel, "KernelPool")
        given = [source.aio if isinstance(source, Kernel) else source for source in sources]
        pool = AsyncKernelPool(
            given or count,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            retries=retries,
            timeout=timeout,
            output=output,
            kernel_name=kernel_name,
            python=python,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            transport=transport,
            prefetch=prefetch,
            **options,
        )
        self._start(pool)

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
    ) -> KernelPool:
        """A pool of ``n`` new kernels on a Jupyter Server or gateway (see ``kernelproxy.connect_server``).

        The kernels are deleted on the server when the pool shuts down; a kernel
        that dies is replaced by a new one there. ``server_options`` go to
        ``connect_server`` (verify, env, transport, startup_timeout...).
        """
        pool = object.__new__(cls)
        pool._start(
            AsyncKernelPool.from_server(
                url,
                n,
                token=token,
                kernel_name=kernel_name,
                retries=retries,
                timeout=timeout,
                output=output,
                prefetch=prefetch,
                initializer=initializer,
                initargs=initargs,
                max_tasks_per_child=max_tasks_per_child,
                **server_options,
            )
        )
        return pool

    def _start(self, pool: AsyncKernelPool) -> None:
        pool._name = "KernelPool"
        self._portal = get_portal()
        self._portal.run(pool.start())
        self._pool = pool

    def options(
        self,
        *,
        retries: int | Unset = UNSET,
        timeout: float | None | Unset = UNSET,
        output: Output | Unset = UNSET,
    ) -> KernelPool:
        """A view of the same pool whose tasks use other options: ``pool.options(retries=1).submit(f, x)``."""
        view = object.__new__(KernelPool)
        view._portal = self._portal
        view._pool = self._pool.options(retries=retries, timeout=timeout, output=output)
        return view

    @property
    def kernels(self) -> list[Kernel]:
        """The pool's working kernels now (a kernel being replaced is not listed)."""
        return [Kernel(kernel, self._portal) for kernel in self._pool.kernels]

    # ------------------------------------------------------------------ Executor

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on the next idle kernel; return a concurrent.futures.Future."""
        return self._pool._submit_threadsafe(fn, args, kwargs)

    # The checker matches fn's parameters with the iterables' items (up to three iterables, like builtins.map).
    # Executor.map takes any callable; these are narrower on purpose, hence the ignored override check.
    @overload  # type: ignore[override]
    def map(
        self,
        fn: Callable[[A1], T],
        iterable: Iterable[A1],
        /,
        *,
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> Iterator[T]: ...
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
    ) -> Iterator[T]: ...
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
    ) -> Iterator[T]: ...
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
    ) -> Iterator[T]: ...
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
        items = arguments.chunks(iterables, chunksize)
        counter = _counter(progress, items)
        try:
            futures, tasks = self._pool._map_threadsafe(fn, items, chunksize > 1, counter)
        except BaseException:
            if counter is not None:
                counter.close()
            raise
        return self._results(futures, tasks, chunksize > 1, timeout, end_time, counter)

    def _results(
        self,
        futures: list[concurrent.futures.Future[Any]],
        tasks: list[Task],
        chunked: bool,
        timeout: float | None,
        end_time: float | None,
        counter: ProgressCounter | None,
    ) -> Generator[Any, None, None]:
        futures.reverse()  # pop from the end
        received = 0
        try:
            # No local holds a result while the caller works on it, nor after (bpo-14406): with big
            # results, peak memory would double. A chunk's items are popped as they are yielded.
            while futures:
                future = futures.pop()
                try:
                    box = [_result(future, end_time)]  # emptied before the yield: no local keeps it
                except Exception as exc:
                    if isinstance(exc, concurrent.futures.TimeoutError) and not future.done():  # not the task's own
                        assert timeout is not None
                        raise concurrent.futures.TimeoutError(map_timed_out(timeout, received)) from None
                    trim(exc)  # the caller's line, then the remote frames
                    raise
                finally:
                    del future
                if chunked:
                    chunk = box.pop()
                    chunk.reverse()
                    while chunk:
                        received += 1
                        yield chunk.pop()
                else:
                    received += 1
                    yield box.pop()
        finally:
            if futures:  # closed early, timed out or failed: stop what nobody will read
                self._pool._abandon_threadsafe(tasks)
            if counter is not None:
                counter.close()

    def interrupt(self, future: concurrent.futures.Future[Any]) -> bool:
        """Stop one running task: interrupt the kernel running it (that kernel only; the pool goes on).

        ``future`` is what ``submit()`` returned; it raises CallInterrupted (``future.cancel()`` cannot
        stop a task that runs, as with any ``concurrent.futures`` executor). A task still waiting for
        a kernel is dropped. Returns False if the task had finished already.
        """
        return self._portal.run(self._pool._scheduler().interrupt(future))

    def push(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Set variables in every kernel: ``push(weights=w)``. Pickled once; kept for replacement kernels.

        Returns once every kernel has them (after the task it is running, if
        any); tasks submitted afterwards see them.
        """
        merged = arguments.check_names(values, named)
        if not merged:
            return
        self._pool._scheduler().check_open()
        frames = serialization.dumps(merged, parts=merged)  # on this thread, not the IO thread
        self._portal.run(self._pool._scheduler().push(list(merged), frames))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; then close the kernels once every submitted task is done.

        Kernels the pool started are shut down, those it connected to are
        disconnected, Kernel objects you gave it are left as they are.

        Args:
            wait: block until then (else it happens in the background).
            cancel_futures: cancel the tasks that have not started.
        """
        if self._pool._scheduler().pid != os.getpid():
            return  # a forked child: the pool is its parent's to shut down
        self._pool._scheduler().close_submissions()
        future = self._portal.submit(self._pool.shutdown(wait, cancel_futures=cancel_futures))
        if wait:
            future.result()

    def __enter__(self) -> KernelPool:
        return self

    def __repr__(self) -> str:
        return f"<KernelPool {_describe(self._pool._scheduler())}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython: the pool's state, as _display tells it
        _display.pool_pretty(p, repr(self), self._pool._startup.scheduler)

    def _repr_html_(self) -> str:  # notebooks
        return _display.pool_html(repr(self), self._pool._startup.scheduler)


def _result(future: concurrent.futures.Future[Any], end_time: float | None) -> Any:
    """The future's result; the future itself is then referenced by no one (bpo-14406)."""
    return future.result() if end_time is None else future.result(end_time - time.monotonic())
