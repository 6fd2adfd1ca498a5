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
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Tuple

from ._exceptions import SerializationError, StaleRefError
from .agent import _agent as agent

if TYPE_CHECKING:
    from ._kernel import AsyncKernel, _KernelState
    from ._portal import Portal

# The kernel whose request is being pickled: refs only pickle for their own kernel.
_pickling_for: contextvars.ContextVar[_KernelState | None] = contextvars.ContextVar("_pickling_for", default=None)

Path = Tuple[Tuple[Any, ...], ...]  # steps: ("getattr", name) | ("getitem", key) | ("call", args, kwargs) | ("op", name, args)


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
        weakref.finalize(self, state.release_later, self.id, self.generation)


class RemoteRef:
    """A handle to an object in the kernel; see the module docstring.

    ``ref.attr``, ``ref[key]`` build lazy refs; ``ref(...)``, ``ref.get()``,
    ``len(ref)``, ``ref + 1``... fetch a value (one round trip);
    ``ref.call_ref("method", ...)`` keeps the result in the kernel.
    Names starting with ``_``, and ``get``, ``call_ref``, ``attr``, are not
    forwarded: reach such remote attributes with ``ref.attr(name)``.
    With an AsyncKernel, the value-fetching methods return coroutines.
    """

    __slots__ = ("_kernel", "_portal", "_path", "_root")

    def __init__(self, kernel: AsyncKernel, root: _Root, path: Path = (), portal: Portal | None = None) -> None:
        self._kernel = kernel
        self._root = root
        self._path = path
        self._portal = portal

    # ------------------------------------------------------------------ lazy steps

    def attr(self, name: str) -> RemoteRef:
        """A lazy ref to attribute ``name`` (any name, also ``get`` or ``_private``)."""
        return self._then(("getattr", name))

    def __getattr__(self, name: str) -> RemoteRef:
        if name.startswith("_"):
            raise AttributeError(f"{name!r}: private names are not forwarded; use ref.attr({name!r})")
        return self.attr(name)

    def __getitem__(self, key: Any) -> RemoteRef:
        return self._then(("getitem", key))

    def _then(self, step: tuple[Any, ...]) -> RemoteRef:
        return RemoteRef(self._kernel, self._root, (*self._path, step), self._portal)

    # ------------------------------------------------------------------ round trips

    def get(self) -> Any:
        """Copy the value this ref points to into this process."""
        return self._evaluate(self._path, keep=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the remote object; return the result by value."""
        return self._evaluate((*self._path, ("call", args, kwargs)), keep=False)

    def call_ref(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` of the remote object and keep the result in the kernel (a new RemoteRef)."""
        return self._evaluate((*self._path, ("getattr", method), ("call", args, kwargs)), keep=True)

    def _evaluate(self, path: Path, keep: bool) -> Any:
        coroutine = self._kernel._ref_eval(self._root, path, keep, self._portal)
        return coroutine if self._portal is None else self._portal.run(coroutine)

    def _operator(self, name: str, *args: Any) -> Any:
        return self._evaluate((*self._path, ("op", name, args)), keep=False)

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

    # ------------------------------------------------------------------ identity

    def __reduce__(self) -> tuple[Any, ...]:
        target = _pickling_for.get()
        if target is not self._root.state:
            raise SerializationError(
                f"{self!r} belongs to another kernel (or is being pickled outside a kernelproxy call); "
                "pass ref.get() to copy its value instead"
            )
        check_fresh(self._root)
        return (_AgentResolve(), (self._root.id, self._path))

    def __repr__(self) -> str:
        if not self._path:
            return f"<RemoteRef #{self._root.id} {self._root.type}: {self._root.repr}>"
        steps = "".join(_describe_step(step) for step in self._path)
        return f"<RemoteRef #{self._root.id} ({self._root.type}){steps}, not fetched>"


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
