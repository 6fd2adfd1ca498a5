"""Kernel: the blocking API, a thin facade over AsyncKernel run on the IO thread.

Each method hands the AsyncKernel coroutine to the portal and waits; any
number of threads may do so at once. Nothing here talks to the kernel itself.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, TypeVar, overload

from . import _display
from ._kernel import AsyncKernel, Submitted, run_submitted
from ._portal import Portal
from ._refs import RemoteRef
from ._tracebacks import local_tracebacks, trimming
from ._types import UNSET, CallOptions, KernelInfo, KernelStatus, OnTimeout, Output, Unset

T = TypeVar("T")
if TYPE_CHECKING:
    from ._types import P


@local_tracebacks  # errors re-raised from the kernel go from the caller's line to the remote frames
class Kernel:
    """A Jupyter kernel used as a remote Python.

    Get one with ``kernelproxy.start()`` or ``kernelproxy.connect()``. Use it
    as a context manager, or call ``close()``/``shutdown()`` when done.
    Mapping access works on the kernel's user namespace:
    ``k["x"] = 5``, ``k["x"]``, ``del k["x"]``, ``"x" in k``.
    """

    def __init__(self, core: AsyncKernel, portal: Portal) -> None:
        self._core = core
        self._portal = portal

    @property
    def aio(self) -> AsyncKernel:
        """The AsyncKernel behind this Kernel (bound to kernelproxy's IO thread)."""
        return self._core

    def options(
        self,
        *,
        timeout: float | None | Unset = UNSET,
        output: Output | Unset = UNSET,
        on_timeout: OnTimeout | Unset = UNSET,
        subshell: bool | Unset = UNSET,
    ) -> Kernel:
        """A view of the same kernel with other call options: ``k.options(timeout=2).call(f)``.

        ``subshell=True``: calls run on kernelproxy's subshell of the kernel, while its main
        shell is busy with someone's cell (see ``CallOptions``).
        """
        core = self._core.options(timeout=timeout, output=output, on_timeout=on_timeout, subshell=subshell)
        return Kernel(core, self._portal)

    @property
    def call_options(self) -> CallOptions:
        """This view's call options: ``timeout``, ``output``, ``on_timeout``, ``subshell``."""
        return self._core.call_options

    @property
    def status(self) -> KernelStatus:
        """Whether the kernel is ready, restarting, dead or closed, as far as kernelproxy knows now (no round trip)."""
        return self._core.status

    @property
    def info(self) -> KernelInfo:
        """Kernel implementation and version, Python, cloudpickle, pid, transport."""
        return self._core.info

    # ------------------------------------------------------------------ calls

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in the kernel and return its result.

        Every keyword goes to ``fn``, so the timeout is the view's call option: ``k.options(timeout=5).call(fn)``.

        Raises:
            Exception: what ``fn`` raised, as its own type; the remote traceback is its ``__cause__``.
            RemoteError: ``fn`` raised an exception that cannot be re-raised here (unknown class, unpicklable).
            CallTimeout: the call outlived its timeout (counted from the request, time queued in the kernel
                included). The kernel was interrupted and the message says what happened: normally the work
                stopped and the kernel is usable (it answered a request since); a kernel that ignores the
                interrupt is reported still busy 2 s later, one that stops answering after it 5 s later, or
                either is restarted with ``on_timeout="restart"``.
            CallInterrupted: ``interrupt()`` stopped the remote work.
            SerializationError: ``fn``, an argument or the result could not be pickled or unpickled.
            StaleRefError: a RemoteRef argument points into the kernel before a restart.
            KernelDiedError: the kernel died before or during the call.
            KernelClosedError: the kernel was shut down or closed.
        """
        return self._portal.run(self._core.call(fn, *args, **kwargs))

    def call_ref(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> RemoteRef:
        """Run ``fn(*args, **kwargs)`` in the kernel, keep the result there, return a RemoteRef to it.

        The timeout is the view's call option, as for ``call()``: ``k.options(timeout=5).call_ref(fn)``.

        Raises:
            Exception: what ``fn`` raised, as its own type (``RemoteError`` if it cannot be re-raised here).
            CallTimeout: the call outlived its timeout; the kernel was interrupted (see ``call()``).
            CallInterrupted: ``interrupt()`` stopped the remote work.
            SerializationError: ``fn`` or an argument could not be pickled or unpickled.
            KernelDiedError: the kernel died before or during the call.
            KernelClosedError: the kernel was shut down or closed.
        """
        return RemoteRef(self._core, self._portal.run(self._core._call_keep(fn, args, kwargs)), portal=self._portal)

    def ref(self, name: str, *, timeout: float | None = None) -> RemoteRef:
        """A RemoteRef to the object a kernel variable names now."""
        return RemoteRef(self._core, self._portal.run(self._core._name_keep(name, timeout)), portal=self._portal)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """Start ``call(fn, *args, **kwargs)`` and return a ``concurrent.futures.Future`` for its result.

        The future's ``result()`` raises what ``call()`` raises: ``fn``'s own exception, ``CallTimeout`` after the
        view's timeout call option (``k.options(timeout=5).submit(fn)``), ``SerializationError``,
        ``KernelDiedError``... ``k.interrupt(future)`` stops that call (interrupting the kernel if it runs)
        and the future raises CallInterrupted; cancelling the future also interrupts the remote work.
        """
        call = Submitted(f"call of {getattr(fn, '__qualname__', None) or fn!r}")
        future = self._portal.submit(run_submitted(call, self._core.call(fn, *args, **kwargs)))
        self._core._state.submitted[future] = call
        return future

    def remote(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Decorator: calling the decorated function runs it in the kernel (it keeps ``fn``'s signature)."""

        @functools.wraps(fn)
        def run_remotely(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        return trimming(run_remotely)

    def push(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Set variables in the kernel: ``push(df=frame)`` or ``push({"df": frame})``.

        Every keyword is a variable, so the timeout is the view's call option: ``k.options(timeout=5).push(...)``.

        Raises:
            ValueError: a name is not a Python identifier.
            SerializationError: a value could not be pickled (the message names it); nothing was sent.
            CallTimeout: the push outlived its timeout; the kernel was interrupted (see ``call()``).
            KernelDiedError: the kernel died before or during the push.
            KernelClosedError: the kernel was shut down or closed.
        """
        self._portal.run(self._core.push(values, **named))

    def pull(self, *names: str, timeout: float | None = None) -> Any:
        """Values of kernel variables: one name gives its value, several a tuple.

        Args:
            *names: the variables' names.
            timeout: seconds before ``CallTimeout``; None (the default) takes the view's call option.

        Raises:
            KeyError: a name is not defined in the kernel.
            SerializationError: a value could not be pickled in the kernel or unpickled here.
            CallTimeout: the pull outlived its timeout; the kernel was interrupted (see ``call()``).
            KernelDiedError: the kernel died before or during the pull.
            KernelClosedError: the kernel was shut down or closed.
        """
        return self._portal.run(self._core.pull(*names, timeout=timeout))

    def exec(self, code: str, *, timeout: float | None = None) -> None:
        """Run Python statements in the kernel's user namespace (plain Python, no IPython magics).

        Args:
            code: the statements.
            timeout: seconds before ``CallTimeout``; None (the default) takes the view's call option.

        Raises:
            Exception: what the code raised (``SyntaxError`` included), as its own type.
            CallTimeout: the code outlived its timeout; the kernel was interrupted (see ``call()``).
            CallInterrupted: ``interrupt()`` stopped it.
            KernelDiedError: the kernel died before or during the request.
            KernelClosedError: the kernel was shut down or closed.
        """
        self._portal.run(self._core.exec(code, timeout=timeout))

    def eval(self, expression: str, *, timeout: float | None = None) -> Any:
        """Evaluate an expression in the kernel's user namespace and return its value.

        Args:
            expression: a Python expression (not a statement).
            timeout: seconds before ``CallTimeout``; None (the default) takes the view's call option.

        Raises:
            Exception: what the evaluation raised (``SyntaxError``, ``NameError``...), as its own type.
            SerializationError: the value could not be pickled in the kernel or unpickled here.
            CallTimeout: the evaluation outlived its timeout; the kernel was interrupted (see ``call()``).
            CallInterrupted: ``interrupt()`` stopped it.
            KernelDiedError: the kernel died before or during the request.
            KernelClosedError: the kernel was shut down or closed.
        """
        return self._portal.run(self._core.eval(expression, timeout=timeout))

    def delete(self, *names: str, timeout: float | None = None) -> None:
        """Delete kernel variables (KeyError if one is missing)."""
        self._portal.run(self._core.delete(*names, timeout=timeout))

    def contains(self, name: str, *, timeout: float | None = None) -> bool:
        """Whether the kernel has a variable ``name``."""
        return self._portal.run(self._core.contains(name, timeout=timeout))

    def __getitem__(self, name: str) -> Any:
        return self.pull(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.push({name: value})

    def __delitem__(self, name: str) -> None:
        self.delete(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.contains(name)

    def __iter__(self) -> Iterator[str]:
        raise TypeError("a Kernel cannot be iterated; use k.eval('dir()') to list its variables")

    # ------------------------------------------------------------------ lifecycle

    @overload
    def interrupt(self) -> None: ...

    @overload
    def interrupt(self, future: concurrent.futures.Future[Any]) -> bool: ...

    def interrupt(self, future: concurrent.futures.Future[Any] | None = None) -> bool | None:
        """Interrupt what the kernel is running (that call raises CallInterrupted).

        On a subshell view, stop what kernelproxy runs on its subshell instead (the main shell is left alone).
        With ``future`` (from ``submit()``): stop that call only; its future raises CallInterrupted (the
        kernel is interrupted if it runs the call, or as it starts if still queued there). Returns False if it
        had finished.
        """
        if future is not None:
            call = self._core._state.submitted.get(future)
            if call is None:
                raise ValueError("interrupt(future) takes a future that this kernel's submit() returned")
            return self._portal.run(self._core._state.interrupt_submitted(call))
        self._portal.run(self._core.interrupt())
        return None

    def restart(self, *, timeout: float = 60) -> None:
        """Restart a kernel kernelproxy started, or one on a Jupyter Server: empty namespace, agent reinstalled."""
        self._portal.run(self._core.restart(timeout=timeout))

    def is_alive(self) -> bool:
        """Whether the kernel is running and answering."""
        return self._portal.run(self._core.is_alive())

    def shutdown(self) -> None:
        """Stop the kernel (also one connected to) and disconnect. Idempotent."""
        self._portal.run(self._core.shutdown())

    def close(self) -> None:
        """Disconnect; a kernel kernelproxy started is shut down, a connected-to one keeps running.

        In a forked child, closing an inherited Kernel does nothing: the kernel is the parent's.
        """
        if self._portal.pid != os.getpid():
            return
        self._portal.run(self._core.close())

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._core).replace("AsyncKernel", "Kernel", 1)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython: the state, as _display tells it
        _display.pretty(p, repr(self), _display.kernel_facts(self._core))

    def _repr_html_(self) -> str:  # notebooks
        return _display.table_html(repr(self), _display.kernel_facts(self._core))

