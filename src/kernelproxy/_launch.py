"""Starting a local kernel and opening it: the one place that does it, for start() and the pools.

"python3" means *this* interpreter's ipykernel (pickles need the same Python
on both sides), ``python=`` another interpreter's; ipykernels listen on IPC
sockets in a private directory. Other kernelspecs start as jupyter_client
starts them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from ._control import LocalControl
from ._exceptions import KernelDiedError, KernelStartError
from ._kernel import AsyncKernel, _KernelState, check_transport_name
from ._types import CallOptions
from ._wires.zmq_wire import ZmqWire

DEFAULT_STARTUP_TIMEOUT = 60.0  # seconds a new local kernel has to answer

_context: zmq.asyncio.Context | None = None


def zmq_context() -> zmq.asyncio.Context:
    """One zmq context (one IO thread of zmq's) for every kernel of this process."""
    global _context
    if _context is None:
        _context = zmq.asyncio.Context()
    return _context


@dataclass(frozen=True)
class LocalSpec:
    """How to start a local kernel (``start()``'s arguments; a pool keeps one to start replacements)."""

    kernel_name: str = "python3"
    python: Optional[str] = None
    cwd: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    transport: str = "auto"
    manager_options: dict[str, Any] = field(default_factory=dict)  # for jupyter_client's AsyncKernelManager

    def __post_init__(self) -> None:
        check_transport_name(self.transport)

    @property
    def is_ipykernel(self) -> bool:
        """Whether the kernel is an ipykernel we start ourselves (other kernelspecs may be anything)."""
        return self.python is not None or self.kernel_name == "python3"


def local_spec(
    kernel_name: str,
    python: str | None,
    cwd: str | os.PathLike[str] | None,
    env: dict[str, str] | None,
    startup_timeout: float | None,
    transport: str,
    manager_options: dict[str, Any],
) -> LocalSpec:
    return LocalSpec(
        kernel_name=kernel_name,
        python=python,
        cwd=os.fspath(cwd) if cwd is not None else None,
        env=dict(env or {}),
        startup_timeout=DEFAULT_STARTUP_TIMEOUT if startup_timeout is None else startup_timeout,
        transport=transport,
        manager_options=dict(manager_options),
    )


class _ThisPythonFirst(KernelSpecManager):
    """Kernelspec lookup where "python3" means this interpreter's ipykernel.

    Pickles only travel between equal Python versions, so the default kernel
    must be this very interpreter, whatever "python3" kernelspec is installed.
    """

    python: Optional[str] = None

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if self.python is not None or kernel_name == "python3":
            return python_kernel_spec(self.python or sys.executable)
        return super().get_kernel_spec(kernel_name)


def python_kernel_spec(python: str) -> KernelSpec:
    return KernelSpec(
        argv=[python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name=f"Python ({python})",
        language="python",
        interrupt_mode="signal",
        metadata={"debugger": False},
    )


async def start_local(spec: LocalSpec, options: CallOptions, *, auto_restart: bool = False) -> AsyncKernel:
    """Start a local kernel as ``spec`` says and return it, connected and checked.

    On failure nothing is left behind: no process, no private directory.
    """
    spec_manager = _ThisPythonFirst()
    spec_manager.python = spec.python
    manager_options = dict(spec.manager_options)
    private_dir = _private_sockets(spec, manager_options)
    manager = AsyncKernelManager(kernel_name=spec.kernel_name, kernel_spec_manager=spec_manager, **manager_options)
    control = LocalControl(manager, private_dir)
    try:
        await manager.start_kernel(cwd=spec.cwd, env={**os.environ, **spec.env})
    except BaseException as exc:
        if manager.has_kernel:  # a start cut short (cancelled) may have left a process
            await asyncio.shield(manager.shutdown_kernel(now=True))
        await control.release()
        error = _start_error(exc, spec.kernel_name)
        if error is None:
            raise
        raise error from exc
    state = _KernelState(
        functools.partial(ZmqWire, manager.client(context=zmq_context())),
        control,
        manager.connection_file,
        spec.transport,
        auto_restart=auto_restart,
        ready_timeout=spec.startup_timeout,
    )
    try:
        await state.open(spec.startup_timeout)
    except BaseException as exc:
        dead = state.connection.dead
        await asyncio.shield(state.close(shutdown=True))
        if isinstance(exc, asyncio.TimeoutError):
            raise KernelStartError(f"the kernel did not become ready within {spec.startup_timeout} s") from exc
        if isinstance(exc, KernelDiedError) or dead is not None:
            argv = manager.kernel_spec.argv if manager.kernel_spec else "?"
            hint = " Is ipykernel installed for that Python?" if spec.is_ipykernel else " See its output above."
            raise KernelStartError(f"the kernel exited while starting ({dead or exc}); command: {argv}.{hint}") from exc
        raise
    return AsyncKernel(state, options)


def _private_sockets(spec: LocalSpec, manager_options: dict[str, Any]) -> str | None:
    """Put an ipykernel's sockets in a fresh private directory (returned), unless the caller chose an ip.

    IPC sockets in a directory only we can enter: no other user (or host) can
    reach the kernel. Adds the manager options for it to ``manager_options``.
    """
    if os.name != "posix" or not spec.is_ipykernel or "ip" in manager_options:  # other kernels may lack IPC
        return None
    private_dir = tempfile.mkdtemp(prefix="kernelproxy-")
    manager_options.update(transport="ipc", ip=os.path.join(private_dir, "kernel"))
    manager_options.setdefault("connection_file", os.path.join(private_dir, "kernel.json"))
    return private_dir


def _start_error(exc: BaseException, kernel_name: str) -> KernelStartError | None:
    """What to raise when a kernel manager's start_kernel() raised ``exc`` (None: re-raise it)."""
    if isinstance(exc, NoSuchKernel):
        return KernelStartError(
            f"no kernelspec named {kernel_name!r} (see `jupyter kernelspec list`); "
            "or pass python='/path/to/python' to start that interpreter's ipykernel"
        )
    if isinstance(exc, Exception):
        return KernelStartError(f"could not start kernel {kernel_name!r}: {type(exc).__name__}: {exc}")
    return None
