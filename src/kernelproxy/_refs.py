"""RemoteRef: a handle to an object that stays in the kernel.

A ref is a kept kernel object (its *root*, an id in the agent's object table)
plus a lazy *path* of steps (attribute, item, call, operator). Building a
path costs nothing; calling the ref, ``get()``, ``call_ref()`` or an operator
that needs a value sends the whole path in one round trip.

Lifetime: each root carries a finalizer. When the host's last handle to a root
is collected, the finalizer only queues its id; the IO loop sends the queued
ids in one ``release`` request. No network I/O ever happens inside ``__del__``.

A ref passed as an argument pickles as ``resolve(id, path)`` in the agent, so
the kernel receives its own object, never a copy.

Two kinds, as the two APIs need: ``RemoteRef`` (blocking Kernel) answers at
once; ``AsyncRemoteRef`` (AsyncKernel) returns what must be awaited, and
refuses ``bool``/``len``/``in``/iteration, whose answers Python needs at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import weakref
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from ._exceptions import SerializationError, StaleRefError
from ._tracebacks import local_tracebacks, trimmed_await
from .agent import _agent as agent

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

    from ._kernel import AsyncKernel, _KernelState
    from ._portal import Portal

# The kernel whose request is being pickled: refs only pickle for their own kernel.
_pickling_for: contextvars.ContextVar[_KernelState | None] = contextvars.ContextVar("_pickling_for", default=None)

# Steps: ("getattr", name) | ("getitem", key) | ("call", args, kwargs) | ("op", name, args).
Path = tuple[tuple[Any, ...], ...]

# For type checkers a ref has an Any base: it stands for the remote object, so ``k.call(fn, ref)`` checks
# whatever type fn's parameter has (fn receives the kernel's own object there). At run time, a plain object.
if TYPE_CHECKING:
    _StandsForTheRemoteObject = Any
else:
    _StandsForTheRemoteObject = object


@contextlib.contextmanager
def pickling_for(state: _KernelState) -> Iterator[None]:
    token = _pickling_for.set(state)
    try:
        yield
    finally:
        _pickling_for.reset(token)


class _AgentModule:
    """Unpickles, in the kernel, as the agent module."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (importlib.import_module, (agent.MODULE_NAME,))


class _AgentResolve:
    """Unpickles, in the kernel, as the agent's ``resolve`` function."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (_AgentModule(), "resolve"))

    def __call__(self, *args: Any) -> Any:  # pickle insists a reducer's function be callable here too
        raise RuntimeError("resolves RemoteRefs inside the kernel only")


class _Root:
    """One kept kernel object; its finalizer queues the release."""

    def __init__(self, state: _KernelState, description: dict[str, Any]) -> None:
        self.state = state
        self.id: int = description["id"]
        self.type: str = description["type"]
        self.repr: str = description["repr"]
        self.generation = state.generation
        # The agent instance (kernel process) that kept it: another one refuses the ref instead of resolving
        # the same id to something else (ids start over in a restarted kernel).
        self.instance: str | None = description.get("agent", state.agent_instance)
        weakref.finalize(self, state.release_later, self.id, self.generation, self.instance)


class _RefBase(_StandsForTheRemoteObject):  # type: ignore[misc]  # an Any base, on purpose (see above)
    """What both kinds of ref share: the lazy path, identity, pickling as the kernel's own object."""

    __slots__ = ("_kernel", "_path", "_root")

    def __init__(self, kernel: AsyncKernel, root: _Root, path: Path = ()) -> None:
        self._kernel = kernel
        self._root = root
        self._path = path

    # ------------------------------------------------------------------ lazy steps

    def attr(self, name: str) -> Self:
        """A lazy ref to attribute ``name`` (any name, also ``get`` or ``_private``)."""
        return self._then(("getattr", name))

    def __getattr__(self, name: str) -> Self:
        if name.startswith("_"):
            raise AttributeError(f"{name!r}: private names are not forwarded; use ref.attr({name!r})")
        return self.attr(name)

    def __getitem__(self, key: Any) -> Self:
        return self._then(("getitem", key))

    def _then(self, step: tuple[Any, ...]) -> Self:
        return self._clone(self._root, (*self._path, step))

    def _kept(self, root: _Root) -> Self:
        """A ref of the same kind to a new kept object."""
        return self._clone(root, ())

    def _clone(self, root: _Root, path: Path) -> Self:
        raise NotImplementedError

    def _call_path(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Path:
        return (*self._path, ("call", args, kwargs))

    def _method_path(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Path:
        return (*self._path, ("getattr", method), ("call", args, kwargs))

    def _op_path(self, name: str, args: tuple[Any, ...]) -> Path:
        return (*self._path, ("op", name, args))

    # ------------------------------------------------------------------ identity

    def __reduce__(self) -> tuple[Any, ...]:
        target = _pickling_for.get()
        if target is not self._root.state:
            raise SerializationError(
                f"{self!r} belongs to another kernel (or is being pickled outside a kernelproxy call); "
                "pass ref.get() to copy its value instead"
            )
        check_fresh(self._root)
        return (_AgentResolve(), (self._root.id, self._path, self._root.instance))

    def __repr__(self) -> str:
        name = type(self).__name__
        if not self._path:
            return f"<{name} #{self._root.id} {self._root.type}: {self._root.repr}>"
        steps = "".join(_describe_step(step) for step in self._path)
        return f"<{name} #{self._root.id} ({self._root.type}){steps}, not fetched>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython: the repr, no round trip
        p.text(repr(self))

    def _repr_html_(self) -> str:  # notebooks: its type and the repr taken when it was kept, no round trip
        from ._display import ref_html

        return ref_html(self)


@local_tracebacks  # errors re-raised from the kernel go from the caller's line to the remote frames
class RemoteRef(_RefBase):
    """A handle to an object that stays in the kernel, for the blocking API: ``k.call_ref(...)``, ``k.ref(name)``.

    ``ref.attr``, ``ref[key]`` build lazy refs; ``ref(...)``, ``ref.get()``,
    ``len(ref)``, ``ref + 1``... fetch a value (one round trip);
    ``ref.call_ref("method", ...)`` keeps the result in the kernel.
    Names starting with ``_``, and ``get``, ``call_ref``, ``attr``, are not
    forwarded: reach such remote attributes with ``ref.attr(name)``.

    The kernel keeps the object while a handle to it (or to a ref derived from
    it) is alive here. A ref used after its kernel restarted raises
    ``StaleRefError``; after ``shutdown()``, ``KernelClosedError``.
    """

    __slots__ = ("_portal",)

    def __init__(self, kernel: AsyncKernel, root: _Root, path: Path = (), *, portal: Portal) -> None:
        super().__init__(kernel, root, path)
        self._portal = portal

    def _clone(self, root: _Root, path: Path) -> RemoteRef:
        return RemoteRef(self._kernel, root, path, portal=self._portal)

    def get(self) -> Any:
        """Copy the value this ref points to into this process."""
        return self._value(self._path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the remote object; return the result by value."""
        return self._value(self._call_path(args, kwargs))

    def call_ref(self, method: str, /, *args: Any, **kwargs: Any) -> RemoteRef:
        """Call ``method`` of the remote object and keep the result in the kernel (a new RemoteRef)."""
        root = self._portal.run(self._kernel._ref_keep(self._root, self._method_path(method, args, kwargs)))
        return self._kept(root)

    def _value(self, path: Path) -> Any:
        return self._portal.run(self._kernel._ref_value(self._root, path))

    def _operator(self, name: str, *args: Any) -> Any:
        return self._value(self._op_path(name, args))

    def __len__(self) -> int:
        return int(self._operator("len"))

    def __bool__(self) -> bool:
        return bool(self._operator("truth"))

    def __contains__(self, item: Any) -> bool:
        return bool(self._operator("contains", item))

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("a RemoteRef cannot be iterated in place; iterate over ref.get() (a copy)")

    def __add__(self, other: Any) -> Any: return self._operator("add", other)  # noqa: E704
    def __sub__(self, other: Any) -> Any: return self._operator("sub", other)  # noqa: E704
    def __mul__(self, other: Any) -> Any: return self._operator("mul", other)  # noqa: E704
    def __truediv__(self, other: Any) -> Any: return self._operator("truediv", other)  # noqa: E704
    def __floordiv__(self, other: Any) -> Any: return self._operator("floordiv", other)  # noqa: E704
    def __mod__(self, other: Any) -> Any: return self._operator("mod", other)  # noqa: E704
    def __pow__(self, other: Any) -> Any: return self._operator("pow", other)  # noqa: E704
    def __matmul__(self, other: Any) -> Any: return self._operator("matmul", other)  # noqa: E704
    def __lt__(self, other: Any) -> Any: return self._operator("lt", other)  # noqa: E704
    def __le__(self, other: Any) -> Any: return self._operator("le", other)  # noqa: E704
    def __gt__(self, other: Any) -> Any: return self._operator("gt", other)  # noqa: E704
    def __ge__(self, other: Any) -> Any: return self._operator("ge", other)  # noqa: E704
    def __neg__(self) -> Any: return self._operator("neg")  # noqa: E704
    def __abs__(self) -> Any: return self._operator("abs")  # noqa: E704


@local_tracebacks  # errors re-raised from the kernel go from the caller's line to the remote frames
class AsyncRemoteRef(_RefBase):
    """A handle to an object in the kernel, for AsyncKernel: what fetches a value is awaited.

    ``await ref.get()``, ``await ref(...)``, ``await ref.call_ref("method")``,
    ``await (ref + 1)``. ``bool(ref)``, ``len(ref)``, ``x in ref`` and
    iteration raise TypeError: Python needs their answer at once, and an
    answer from the kernel must be awaited (``len(await ref.get())``).
    """

    __slots__ = ()

    def _clone(self, root: _Root, path: Path) -> AsyncRemoteRef:
        return AsyncRemoteRef(self._kernel, root, path)

    async def get(self) -> Any:
        """Copy the value this ref points to into this process."""
        return await self._kernel._ref_value(self._root, self._path)

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Call the remote object; await the result (by value)."""
        return trimmed_await(self._kernel._ref_value(self._root, self._call_path(args, kwargs)))

    async def call_ref(self, method: str, /, *args: Any, **kwargs: Any) -> AsyncRemoteRef:
        """Call ``method`` of the remote object and keep the result in the kernel (a new AsyncRemoteRef)."""
        return self._kept(await self._kernel._ref_keep(self._root, self._method_path(method, args, kwargs)))

    def _operator(self, name: str, *args: Any) -> Coroutine[Any, Any, Any]:
        return trimmed_await(self._kernel._ref_value(self._root, self._op_path(name, args)))

    def _refuse(self, what: str, instead: str) -> TypeError:
        return TypeError(
            f"{what} of an AsyncRemoteRef needs an answer from the kernel, which must be awaited: "
            f"use {instead}"
        )

    def __len__(self) -> int:
        raise self._refuse("len()", "len(await ref.get()), or await ref.attr('__len__')()")

    def __bool__(self) -> bool:
        raise self._refuse("the truth value", "bool(await ref.get())")

    def __contains__(self, item: Any) -> bool:
        raise self._refuse("'in'", "item in await ref.get(), or await ref.attr('__contains__')(item)")

    def __iter__(self) -> Iterator[Any]:
        raise self._refuse("iteration", "iterate over await ref.get() (a copy)")

    def __add__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("add", other)  # noqa: E704
    def __sub__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("sub", other)  # noqa: E704
    def __mul__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("mul", other)  # noqa: E704
    def __truediv__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("truediv", other)  # noqa: E704
    def __floordiv__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("floordiv", other)  # noqa: E704
    def __mod__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("mod", other)  # noqa: E704
    def __pow__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("pow", other)  # noqa: E704
    def __matmul__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("matmul", other)  # noqa: E704
    def __lt__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("lt", other)  # noqa: E704
    def __le__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("le", other)  # noqa: E704
    def __gt__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("gt", other)  # noqa: E704
    def __ge__(self, other: Any) -> Coroutine[Any, Any, Any]: return self._operator("ge", other)  # noqa: E704
    def __neg__(self) -> Coroutine[Any, Any, Any]: return self._operator("neg")  # noqa: E704
    def __abs__(self) -> Coroutine[Any, Any, Any]: return self._operator("abs")  # noqa: E704


def check_fresh(root: _Root) -> None:
    if root.generation != root.state.generation:
        raise StaleRefError(
            f"RemoteRef #{root.id} ({root.type}) points into a kernel that was restarted since; "
            "its object is gone. Make a new ref."
        )


def _describe_step(step: tuple[Any, ...]) -> str:
    kind = step[0]
    if kind == "getattr":
        return f".{step[1]}"
    if kind == "getitem":
        return f"[{step[1]!r}]"
    if kind == "call":
        return "(...)"
    return f" {step[1]} ..."
