"""Host-side pickling: cloudpickle with pickle-protocol-5 out-of-band buffers.

A value becomes a list of *frames*: frame 0 is the pickle stream, frames 1..n
are the out-of-band buffers (numpy data, bytes, ...), handed over without
copying. Our pickler adds two array reductions, shared with the agent
(``_array_reduce`` there): large datetime64/timedelta64 arrays travel as their
int64 data out-of-band (numpy would copy them into the stream), and large
object arrays of ``str`` as one UTF-8 buffer (numpy would pickle each string).
When pickling fails we search the value for the innermost part that
does not pickle, so the error can say ``args[1]['conn']: cannot pickle
'socket' object`` instead of a bare cloudpickle traceback.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import cloudpickle  # type: ignore[import-untyped]

from ._exceptions import KernelProxyError, SerializationError
from .agent import _agent as agent

# Buffers smaller than this stay in-band (must match the agent's OUT_OF_BAND_MIN).
OUT_OF_BAND_MIN = 64 * 1024


CodeSet = agent.CodeSet  # the code objects already described to one kernel


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, plus the agent's reductions: faster datetime and string arrays, code that keeps its source."""

    def __init__(self, *args: Any, sent_code: CodeSet | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        numpy = sys.modules.get("numpy")  # not imported: no ndarray in the value either
        self._ndarray = None if numpy is None else numpy.ndarray
        self._sent_code = sent_code

    def reducer_override(self, obj: Any) -> Any:  # called for almost every object: keep the common path short
        if type(obj) is self._ndarray:
            reduced = agent._array_reduce(obj)  # type: ignore[no-untyped-call]  # one copy, shared with the agent
            if reduced is not None:
                return reduced
        elif type(obj) is types.CodeType:
            return agent.code_reduce(self, obj, self._sent_code)  # type: ignore[no-untyped-call]
        return super().reducer_override(obj)


def _pickle(value: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool], sent_code: CodeSet | None) -> bytes:
    with io.BytesIO() as file:
        _Pickler(file, protocol=5, buffer_callback=buffer_callback, sent_code=sent_code).dump(value)
        return file.getvalue()


def dumps(value: Any, *, parts: Mapping[str, Any] | None = None, sent_code: CodeSet | None = None) -> list[memoryview]:
    """Pickle ``value`` into frames.

    ``parts`` names the pieces of ``value`` as the user wrote them (``args[0]``,
    ``kwargs['x']``, a pushed name): on failure the error names the one that broke.
    Functions pickled by value carry their file name and source lines, for the
    kernel's tracebacks; ``sent_code`` holds the code already described to the
    receiving kernel, whose lines are not sent again (None: describe all).
    """
    buffers: list[memoryview] = []

    def keep_large_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # true: serialize in-band
        buffers.append(raw)
        return False

    try:
        main = _pickle(value, keep_large_out_of_band, sent_code)
    except BaseException as exc:
        if sent_code is not None:
            sent_code.clear()  # this pickle described code that will never arrive
        if isinstance(exc, KernelProxyError) or not isinstance(exc, Exception):
            raise  # a RemoteRef that may not travel says why itself (stale, or another kernel's)
        raise SerializationError(_describe_pickling_failure(parts or {"the value": value}, exc)) from exc
    return [memoryview(main), *buffers]


def call_parts(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the parts of a call the way a user reads them, for error messages."""
    named: dict[str, Any] = {"the function": fn}
    named.update({f"args[{i}]": arg for i, arg in enumerate(args)})
    named.update({f"kwargs[{key!r}]": arg for key, arg in kwargs.items()})
    return named


def loads(frames: list[Any], *, what: str = "the kernel's reply") -> Any:
    """Unpickle frames produced by the agent's dumps()."""
    try:
        return pickle.loads(frames[0], buffers=frames[1:])
    except Exception as exc:
        hint = ""
        if isinstance(exc, (ModuleNotFoundError, AttributeError)):
            hint = (
                " The value's class probably exists only in the kernel: import or define it on the host,"
                " or keep the value in the kernel (call_ref() instead of call(), ref() instead of pull())"
                " and fetch only what you need."
            )
        raise SerializationError(
            f"could not unpickle {what} on the host: {type(exc).__name__}: {exc}.{hint}"
        ) from exc


def _describe_pickling_failure(parts: Mapping[str, Any], exc: Exception) -> str:
    for name, part in parts.items():
        try:
            cloudpickle.dumps(part, protocol=5)
        except Exception as part_exc:
            path, culprit, reason = _innermost_unpicklable(part, name, part_exc)
            kind = f"{type(culprit).__module__}.{type(culprit).__qualname__}"
            return (
                f"cannot send {path} to the kernel: a {kind} cannot be pickled "
                f"({type(reason).__name__}: {reason}). Nothing was sent. "
                "Create such objects inside the kernel instead (for instance in the function you call)."
            )
    return f"cannot pickle the request ({type(exc).__name__}: {exc}). Nothing was sent."


def _innermost_unpicklable(value: Any, path: str, exc: Exception) -> tuple[str, Any, Exception]:
    """Descend into containers and instance state to the deepest part that fails on its own."""
    for child_path, child in _children(value, path):
        try:
            cloudpickle.dumps(child, protocol=5)
        except Exception as child_exc:
            return _innermost_unpicklable(child, child_path, child_exc)
    return path, value, exc


def _children(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}[{key!r}]", item
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield f"{path}[{index}]", item
    elif isinstance(value, (set, frozenset)):
        for item in value:
            yield f"{path} item {item!r}", item
    else:
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            for key, item in state.items():
                yield f"{path}.{key}", item
