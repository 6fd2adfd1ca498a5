"""Remote errors whose printed tracebacks read like local ones.

Two things stand between a user's line and the remote frames of an error
re-raised here, and this module removes both.

kernelproxy's own frames
------------------------
An exception re-raised by a blocking call passes through the facade
(``Kernel.call``), the IO thread's portal, three frames of ``AsyncKernel``,
and for futures and pools ``concurrent.futures``. ``trim()`` takes those out
of the exception's traceback; it is applied once, where the API hands the
exception to its caller: a wrapper around every public method of the facades
(``local_tracebacks``, a class decorator on Kernel, RemoteRef, KernelPool, and
on AsyncKernel and AsyncRemoteRef for asyncio code), ``LocalFuture.result()``
(the futures of ``submit()``), the generator of ``KernelPool.map``, and
``trimmed_await`` (AsyncRemoteRef calls and operators, which return coroutines).

The wrapper trims its own frame too, then re-raises with a bare ``raise``. From
Python 3.11 a bare ``raise`` takes the exception's (trimmed) ``__traceback__``,
so the printed traceback goes from the user's line straight to the remote
error. Python 3.9 and 3.10 re-raise the traceback as it was caught, whose first
entry is the wrapper's own frame: one line of kernelproxy remains there
(IPython hides it too: the wrapper sets ``__tracebackhide__``).

Only exceptions meant for the user are trimmed: those re-raised from the kernel
(their ``__cause__`` is a ``RemoteTraceback``) and kernelproxy's own errors,
which say what happened in words. Anything else escaping kernelproxy (a bug of
ours, ``ProtocolError``) keeps every frame, for whoever debugs it.

Remote errors in IPython
------------------------
In plain Python a remote exception prints as Python prints a chained one: the
kernel's traceback (the ``RemoteTraceback`` cause, formatted in the kernel as
text), then the local frames. IPython would show that cause as a quoted text
blob. So the agent also sends the remote traceback as data (for each exception
of the remote chain: its frames as ``[file, line, function, source line]`` and
its ``format_exception_only`` lines), and in an IPython host the re-raised
exception gets a ``_render_traceback_`` (IPython's hook, as ipyparallel's
``RemoteError`` has) that renders it with the shell's own formatter: the remote
frames through IPython's ``ListTB`` in the shell's colours, with IPython's file
names (``Cell In[3], line 2`` for a function defined in a notebook cell, which
the kernel cannot know) and a source line missing in the kernel filled from the
host's linecache; then the local frames as IPython renders any traceback.
Rendering on the host rather than colouring in the kernel: the host's colour
scheme and cell numbers are the host's, kernels without IPython (xeus-python)
are covered, and plain-Python hosts keep uncoloured text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import linecache
import traceback
import types
from collections.abc import Awaitable, Coroutine
from typing import Any, Callable, TypeVar

from ._exceptions import KernelProxyError, ProtocolError, RemoteTraceback
from ._output import ipython_shell

T = TypeVar("T")
C = TypeVar("C", bound=type)

# Modules whose frames are kernelproxy's machinery, not the user's code.
HIDDEN_MODULES = ("kernelproxy", "concurrent.futures", "asyncio")
# At most this many frames of one remote exception are rendered in IPython (the first and last ones).
MAX_RENDERED_FRAMES = 60


# ---------------------------------------------------------------------- trimming kernelproxy's frames


def _hidden(frame: types.FrameType) -> bool:
    name = frame.f_globals.get("__name__")
    if not isinstance(name, str):
        return False
    return any(name == module or name.startswith(module + ".") for module in HIDDEN_MODULES)


def _for_the_user(exc: BaseException) -> bool:
    """Re-raised from the kernel, or an error of ours that says what happened; not a bug of ours."""
    if isinstance(exc.__cause__, RemoteTraceback):
        return True
    return isinstance(exc, KernelProxyError) and not isinstance(exc, ProtocolError)


def trim(exc: BaseException) -> None:
    """Remove kernelproxy's own frames from ``exc``'s traceback (if it is one for the user); re-raise it bare.

    The traceback objects are relinked in place: the first one (the frame that
    caught ``exc``, which Python 3.9 and 3.10 keep on a bare ``raise``) then
    leads straight to the frames that remain.
    """
    if not _for_the_user(exc):
        return
    head = exc.__traceback__
    kept = []
    tb = head
    while tb is not None:
        if not _hidden(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    for entry, following in zip(kept, [*kept[1:], None]):
        entry.tb_next = following
    first = kept[0] if kept else None
    if head is not None and head is not first:
        head.tb_next = first
    exc.__traceback__ = first


def trimming(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: ``method`` (a function or a coroutine function) re-raises with ``trim()``, its own frame included."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def trimmed_coroutine(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True  # noqa: F841
            try:
                return await method(*args, **kwargs)  # kernelproxy re-raises (Python < 3.11 shows this line)
            except Exception as exc:
                trim(exc)
                raise

        return trimmed_coroutine

    @functools.wraps(method)
    def trimmed(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame where Python keeps it (3.9, 3.10)
        try:
            return method(*args, **kwargs)  # kernelproxy re-raises (Python < 3.11 shows this line)
        except Exception as exc:
            trim(exc)
            raise

    return trimmed


def local_tracebacks(cls: C) -> C:
    """Class decorator: the public methods (and dunders) of a facade re-raise with ``trim()``.

    Private helpers (``_name``), properties and ``__init__``/``__repr__`` are left as they are.
    """
    for name, member in list(vars(cls).items()):
        if not isinstance(member, types.FunctionType) or name in ("__init__", "__repr__", "__getattr__"):
            continue
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            continue
        setattr(cls, name, trimming(member))
    return cls


async def trimmed_await(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; re-raise with ``trim()`` (for methods that return a coroutine without being one)."""
    __tracebackhide__ = True  # noqa: F841
    try:
        return await awaitable  # kernelproxy re-raises (Python < 3.11 shows this line)
    except Exception as exc:
        trim(exc)
        raise


class LocalFuture(concurrent.futures.Future[T]):
    """A ``concurrent.futures.Future`` whose ``result()`` re-raises without kernelproxy's frames."""

    def result(self, timeout: float | None = None) -> T:
        __tracebackhide__ = True  # noqa: F841
        try:
            return super().result(timeout)  # kernelproxy re-raises (Python < 3.11 shows this line)
        except Exception as exc:
            trim(exc)
            raise


def run_coroutine_threadsafe(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> LocalFuture[T]:
    """``asyncio.run_coroutine_threadsafe``, returning a ``LocalFuture``."""
    future: LocalFuture[T] = LocalFuture()

    def start() -> None:
        try:
            asyncio.futures._chain_future(asyncio.ensure_future(coro), future)  # type: ignore[attr-defined]
        except BaseException as exc:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            raise

    loop.call_soon_threadsafe(start)
    return future


# ---------------------------------------------------------------------- rendering remote errors in IPython



class _IPythonTraceback:
    """An exception's ``_render_traceback_``: IPython calls it to render the exception (see the module docstring)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self) -> list[str]:
        shell = ipython_shell()
        exc = self.exc
        try:
            return render(shell, exc)
        except Exception:  # never let a rendering problem hide the error: IPython's own rendering instead
            formatter = shell.InteractiveTB
            return list(formatter.structured_traceback(type(exc), exc, exc.__traceback__))


def attach_ipython_rendering(exc: BaseException) -> None:
    """In an IPython host, have IPython render ``exc`` (re-raised from the kernel) with its remote frames."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback) and cause.stack and ipython_shell() is not None:
        try:
            exc._render_traceback_ = _IPythonTraceback(exc)  # type: ignore[attr-defined]
        except AttributeError:  # an exception class with __slots__ and no __dict__
            pass


def render(shell: Any, exc: BaseException) -> list[str]:
    """The structured traceback of ``exc``: its remote part (its cause's stack), a separator, its local part."""
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback) and cause.stack
    blocks = [*render_remote(shell, cause.stack), "", RERAISED, ""]
    # Frontends join the blocks with newlines; a terminal shell with its join character (none in Plain mode).
    if getattr(shell.InteractiveTB, "tb_join_char", "\n") == "\n":
        lines = [block.rstrip("\n") for block in blocks]
    else:
        lines = [block.rstrip("\n") + "\n" for block in blocks]
    saved = exc.__cause__, exc.__context__, exc.__suppress_context__
    exc.__cause__, exc.__context__, exc.__suppress_context__ = None, None, True
    try:
        lines.extend(shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__))
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = saved
    return lines


RERAISED = "The above exception was raised in the kernel, and re-raised here:"
SEPARATORS = {
    "cause": "The above exception was the direct cause of the following exception:",
    "context": "During handling of the above exception, another exception occurred:",
}


def render_remote(shell: Any, stack: list[dict[str, Any]]) -> list[str]:
    """The remote chain, oldest exception first, each rendered by IPython's ListTB in the shell's colours."""
    from IPython.core.ultratb import ListTB

    format_frames: Any = ListTB.structured_traceback  # takes a list of frames where its annotation says traceback
    lines: list[str] = []
    for entry in stack:
        if entry.get("link") in SEPARATORS and lines:
            lines.extend(["", SEPARATORS[entry["link"]], ""])
        frames = frame_summaries(entry.get("frames") or [])
        only = [str(line) for line in entry.get("only") or []]
        stand_in = _stand_in(entry, only)
        if stand_in is not None:
            rendered = format_frames(shell.InteractiveTB, type(stand_in), stand_in, frames, 0)
            lines.extend(rendered)
        else:  # several lines (a SyntaxError's caret, notes): IPython's frames, the kernel's own text after them
            rendered = format_frames(shell.InteractiveTB, Exception, Exception(), frames, 0)
            lines.extend(rendered[:-1] if frames else [])
            lines.append("".join(only))
    return lines


def frame_summaries(frames: list[Any]) -> list[traceback.FrameSummary]:
    """The agent's frames as FrameSummary objects; a source line the kernel lacked comes from the host's linecache."""
    summaries = []
    shown = frames
    if len(frames) > MAX_RENDERED_FRAMES:
        half = MAX_RENDERED_FRAMES // 2
        skipped = len(frames) - 2 * half
        shown = [*frames[:half], ["...", 0, f"({skipped} more frames)", ""], *frames[-half:]]
    for filename, lineno, name, line in shown:
        if not line and isinstance(filename, str) and isinstance(lineno, int) and lineno > 0:
            line = linecache.getline(filename, lineno).strip()
        summaries.append(traceback.FrameSummary(filename, lineno, name, lookup_line=False, line=line))
    return summaries


def _stand_in(entry: dict[str, Any], only: list[str]) -> BaseException | None:
    """An exception that IPython renders as the remote one's last line (``module.Name: message``), or None."""
    name = entry.get("type")
    message = entry.get("message", "")
    if not isinstance(name, str) or not isinstance(message, str) or len(only) != 1:
        return None
    expected = f"{name}: {message}" if message else name
    if only[0].rstrip("\n") != expected:
        return None
    module, _, qualname = name.rpartition(".")
    cls = type(qualname or name, (Exception,), {"__module__": module or "builtins", "__str__": lambda self: message})
    stand_in: BaseException = cls()
    return stand_in
