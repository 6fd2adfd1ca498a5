"""Checking what users pass to a pool, and cutting map() input into tasks; shared by both pool APIs."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Callable, TypeVar, Union

from .. import _output
from .. import _serialization as serialization
from ._scheduler import Scheduler
from ._supervisor import Initializer
from ._tasks import Sink, Task, TaskOptions, function_name

Progress = Union[bool, Mapping[str, Any]]
F = TypeVar("F")


def split_sources(kernels: int | Iterable[Any] | None, kind: type, pool: str) -> tuple[int, list[Any]]:
    """(number of kernels to start, given kernels and connection files)."""
    if kernels is None:
        return os.cpu_count() or 1, []
    if isinstance(kernels, bool):
        raise TypeError("kernels must be a number of kernels or a list of kernels and connection files, not a bool")
    if isinstance(kernels, int):
        if kernels < 1:
            raise ValueError(f"a pool needs at least one kernel, not {kernels}")
        return kernels, []
    if isinstance(kernels, (str, os.PathLike)):
        if isinstance(kernels, str) and kernels.strip().isdigit():
            raise TypeError(f"the number of kernels is an int: {pool}({kernels.strip()}), not {pool}({kernels!r})")
        raise TypeError(f"pass a list of connection files ([{os.fspath(kernels)!r}]), not one file name")
    sources = list(kernels)
    if not sources:
        raise ValueError("a pool needs at least one kernel: the list is empty")
    for source in sources:
        if not isinstance(source, (kind, str, os.PathLike)):
            raise TypeError(f"{pool} takes {kind.__name__} objects or connection files, not {type(source).__name__}")
    return 0, sources


def executor_options(
    kernels: Any,
    *,
    max_workers: int | None,
    mp_context: Any,
    initializer: Callable[..., Any] | None,
    initargs: Iterable[Any],
    max_tasks_per_child: int | None,
    pool: str,
) -> tuple[Any, Initializer | None]:
    """Check ProcessPoolExecutor's keywords: (the kernels argument, the pickled initializer).

    Nothing is accepted that is then ignored: ``max_workers`` is the number of
    kernels, ``initializer`` runs in every kernel, ``max_tasks_per_child`` is
    kept by the scheduler; ``mp_context`` means nothing for kernels and is refused.
    """
    if mp_context is not None:
        raise TypeError(
            f"{pool} takes no mp_context: its workers are Jupyter kernels, not processes forked or spawned "
            "from this one, so a multiprocessing context has no meaning (python=... picks the kernels' interpreter)"
        )
    if max_workers is not None:
        if kernels is not None:
            raise TypeError(f"{pool}: give the number of kernels once, as kernels or as max_workers")
        kernels = max_workers
    if max_tasks_per_child is not None:
        if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
            raise TypeError(f"max_tasks_per_child must be an int, not {type(max_tasks_per_child).__name__}")
        if max_tasks_per_child < 1:
            raise ValueError(f"max_tasks_per_child must be >= 1, not {max_tasks_per_child}")
        if kernels is not None and not isinstance(kernels, int):
            raise ValueError(
                "max_tasks_per_child needs kernels the pool starts itself (a number of kernels, or from_server): "
                "given kernels and connection files are not the pool's to replace"
            )
    if initializer is None:
        return kernels, None
    if not callable(initializer):
        raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
    args = tuple(initargs)
    frames = serialization.dumps_call(initializer, args, {})
    return kernels, Initializer(frames, function_name(initializer))


# Executor keywords that mean nothing for kernels: refused, saying why, rather than passed on or ignored.
MEANINGLESS = {
    "thread_name_prefix": "its workers are kernels, not threads of this process",
}


def refuse_meaningless(options: Mapping[str, Any], pool: str) -> None:
    for name, why in MEANINGLESS.items():
        if name in options:
            raise TypeError(f"{pool} takes no {name}: {why}")


def check_count(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive number of kernels, not {n!r}")
    return n


def check_names(values: Mapping[str, Any] | None, named: dict[str, Any]) -> dict[str, Any]:
    merged = {**(values or {}), **named}
    bad = [name for name in merged if not (isinstance(name, str) and name.isidentifier())]
    if bad:
        raise ValueError(f"push() needs variable names that are identifiers, got {bad!r}")
    return merged


def server_spec(url: str, token: str | None, kernel_name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """connect_server_async() arguments for each kernel of a server pool."""
    return {"url": url, "token": token, "kernel_name": kernel_name, **options}


def chunks(iterables: tuple[Iterable[Any], ...], chunksize: int) -> list[list[tuple[Any, ...]]]:
    if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
        raise ValueError(f"chunksize must be an int >= 1, not {chunksize!r}")
    items = list(zip(*iterables))
    return [items[i : i + chunksize] for i in range(0, len(items), chunksize)]


def map_tasks(
    scheduler: Scheduler,
    fn: Callable[..., Any],
    items: list[list[tuple[Any, ...]]],
    chunked: bool,
    options: TaskOptions,
    new_future: Callable[[], F],
    sink_of: Callable[[F], Sink],
    counter: ProgressCounter | None,
) -> tuple[list[F], list[Task]]:
    """One future and one task per chunk of map() items; unless ``chunked``, each task is a plain call of one item."""
    futures: list[F] = []
    tasks: list[Task] = []
    first = 0
    try:
        refs = serialization.function_refs(fn)  # once for all the tasks
    except Exception:
        refs = None  # each task reports the pickling error itself
    for chunk in items:
        future = new_future()
        if counter is not None:
            counter.track(future, len(chunk))
        sink = sink_of(future)
        if chunked:
            task = scheduler.make_chunk_task(fn, chunk, first, options, sink, refs)
        else:
            task = scheduler.make_task(fn, chunk[0], {}, options, sink, refs)
        first += len(chunk)
        futures.append(future)
        if task is not None:
            tasks.append(task)
    return futures, tasks


def progress_bar(progress: Progress, total: int) -> Any:
    """A tqdm bar counting map() items, or None. ``progress`` may be a dict of tqdm arguments."""
    if not progress:
        return None
    try:
        tqdm = _tqdm_class()
    except ImportError as exc:
        raise ImportError("map(progress=...) needs tqdm: pip install tqdm") from exc

    settings: dict[str, Any] = {"total": total, "unit": "item", "desc": "KernelPool.map"}
    if isinstance(progress, Mapping):
        settings.update(progress)
    return tqdm(**settings)


def _tqdm_class() -> Any:
    """tqdm's notebook bar in a notebook that has ipywidgets, its text bar anywhere else.

    Not ``tqdm.auto``: in a notebook without ipywidgets it warns (TqdmWarning) and prints text anyway.
    """
    import importlib.util

    shell = _output.ipython_shell()
    notebook = shell is not None and type(shell).__name__ == "ZMQInteractiveShell"  # ipykernel's shell
    if notebook and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm  # type: ignore[import-untyped]

        return notebook_tqdm
    from tqdm import tqdm as text_tqdm  # type: ignore[import-untyped]

    return text_tqdm


class ProgressCounter:
    """Advances a progress bar as map() tasks finish (on the loop's thread); closes it at the end.

    Made on the thread that called map(): the bar is drawn where that caller's output goes (its notebook
    cell), also when the loop's thread advances it.
    """

    def __init__(self, bar: Any, tasks: int) -> None:
        self.bar = bar
        self.left = tasks
        self.lock = threading.Lock()
        self.context = _output.capture()
        if tasks == 0:
            bar.close()

    def track(self, future: Any, size: int) -> None:
        future.add_done_callback(lambda f: self.done(size, f.cancelled()))

    def done(self, size: int, cancelled: bool) -> None:
        with self.lock:
            if not cancelled:
                self.context.copy().run(self.bar.update, size)  # a copy: another thread may be in the context
            self.left -= 1
            if self.left == 0:
                self.context.copy().run(self.bar.close)

    def close(self) -> None:
        with self.lock:
            self.context.copy().run(self.bar.close)
