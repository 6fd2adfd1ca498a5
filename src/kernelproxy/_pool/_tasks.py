"""What a pool runs: tasks, their options, and where their outcomes go."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextvars
import dataclasses
import logging
import types
from collections.abc import Sequence
from typing import Any, Callable, Protocol

from .._output import capture
from .._protocol import Outcome
from .._types import CallOptions, Output, Unset

log = logging.getLogger("kernelproxy")


def map_timed_out(timeout: float, received: int) -> str:
    """What a map() iterator's TimeoutError says (concurrent.futures' own says nothing)."""
    results = "no result" if received == 0 else f"{received} result{'s' if received != 1 else ''}"
    return (
        f"map(timeout={timeout}): {results} came within {timeout} s of the map() call and the next one is not "
        "ready; tasks not yet sent to a kernel are cancelled, running ones finish and their results are dropped"
    )


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """How the tasks of a pool (or of a view, ``pool.options(...)``) run."""

    retries: int = 0
    timeout: float | None = None
    output: Output = "forward"

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative int, not {self.retries!r}")
        CallOptions(timeout=self.timeout, output=self.output)  # validates both

    def replace(self, retries: int | Unset, timeout: float | None | Unset, output: Output | Unset) -> TaskOptions:
        changes: dict[str, Any] = {}
        if not isinstance(retries, Unset):
            changes["retries"] = retries
        if not isinstance(timeout, Unset):
            changes["timeout"] = timeout
        if not isinstance(output, Unset):
            changes["output"] = output
        return dataclasses.replace(self, **changes)


class Sink(Protocol):
    """Where a task's outcome goes: a concurrent.futures.Future or an asyncio.Future."""

    @property
    def future(self) -> Any:
        """The future the caller holds."""

    def claim(self) -> bool:
        """Mark the task running; False if it was cancelled before it started."""

    def resolve(self, value: Any) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def cancel(self) -> bool:
        """Cancel the task if it has not started."""


class ThreadSink:
    """KernelPool's futures: concurrent.futures semantics (a running future cannot be cancelled).

    Setting a concurrent.futures.Future runs its done-callbacks here, on the IO
    thread; concurrent.futures catches their Exceptions, not SystemExit: caught here.
    Once set, the sink lets go of the future (and its result): a map() keeps its
    tasks until it ends, not their results (bpo-14406).
    """

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self.future: concurrent.futures.Future[Any] | None = future

    def claim(self) -> bool:
        return self.future is not None and self.future.set_running_or_notify_cancel()

    def resolve(self, value: Any) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():  # only the loop's thread sets it; running: not cancellable
            try:
                future.set_result(value)
            except BaseException:
                log.exception("a done-callback of a KernelPool future raised")

    def fail(self, exc: BaseException) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():
            try:
                future.set_exception(exc)
            except BaseException:
                log.exception("a done-callback of a KernelPool future raised")

    def cancel(self) -> bool:
        return self.future is not None and self.future.cancel()


class LoopSink:
    """AsyncKernelPool's futures: cancelling one interrupts its remote work, also while it runs.

    Once set, the sink lets go of the future, as ThreadSink does.
    """

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future: asyncio.Future[Any] | None = future

    def claim(self) -> bool:
        return self.future is not None and not self.future.done()

    def resolve(self, value: Any) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_exception(exc)

    def cancel(self) -> bool:
        return self.future is not None and self.future.cancel()


@dataclasses.dataclass(eq=False)
class Task:
    id: int
    frames: list[memoryview]  # pickled (fn, args, kwargs)
    name: str  # the function's name, for messages
    size: int  # items it covers (a map chunk's length), for progress bars
    options: TaskOptions
    sink: Sink
    retries_left: int
    started: bool = False
    abandoned: bool = False  # its caller no longer wants it (map() closed early)
    behind: Task | None = None  # the task its kernel was busy with when it was sent there
    ended: bool = False  # its call ended, other than by the death of its kernel
    outcome: Outcome | None = None  # how far its last run got (did it start before its kernel died?)
    request: asyncio.Future[Any] | None = None  # its call while it runs on a kernel
    interrupted: bool = False  # stopped by pool.interrupt(future)
    requeued_unseen: bool = False  # sent again once already because its dead kernel never said it started it
    # Where its output goes: taken where the task is made, on the submitting thread (or in its asyncio task).
    output_to: contextvars.Context = dataclasses.field(default_factory=capture)
    functions: list[Any] = dataclasses.field(default_factory=list)  # FunctionRefs its frames name


def _run_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _by_value(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` that cloudpickle sends by value, so the kernel does not need kernelproxy."""
    clone = types.FunctionType(fn.__code__, {"__builtins__": builtins}, fn.__name__)
    clone.__module__ = "_kernelproxy_pool"  # not an importable module: pickled by value
    clone.__qualname__ = fn.__qualname__
    return clone


RUN_CHUNK = _by_value(_run_chunk)  # runs one map() chunk in the kernel


def function_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
