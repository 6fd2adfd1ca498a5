"""Starting a local kernel and opening it: the one place that does it, for start() and the pools.

"python3" means *this* interpreter's ipykernel (pickles need the same Python
on both sides), ``python=`` another interpreter's; ipykernels listen on IPC
sockets in a private directory. Other kernelspecs start as jupyter_client
starts them.

Nothing is left behind when the host dies without cleaning up (SIGKILL, the
OOM killer, ``os._exit``): an ipykernel we start runs ``ORPHAN_WATCH`` first,
which removes its private directory and ends the kernel as soon as its parent
(this process) is gone; and while the host lives it holds a lock on
``host.lock`` in each directory, so a later start sweeps directories whose
host and kernel both died (``sweep_stale_dirs``).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import glob
import logging
import os
import shutil
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
from ._types import CallOptions, check_seconds
from ._wires.zmq_wire import ZmqWire

DEFAULT_STARTUP_TIMEOUT = 60.0  # seconds a new local kernel has to answer
PRIVATE_PREFIX = "kernelproxy-"  # private directories in the temp directory
HOST_LOCK = "host.lock"  # flock()ed by the host while it lives
log = logging.getLogger("kernelproxy")

# Run by an ipykernel we start, before ipykernel itself (stdlib only: it may be another Python).
# ipykernel's own parent poller ends the kernel with os._exit() when the host dies, leaving the directory;
# this watch takes its place (ipykernel starts no poller for parent 1, and prints no banner for a parent),
# removes the directory, then ends the kernel.
ORPHAN_WATCH = """\
import os, runpy, shutil, sys, threading, time
def _kernelproxy_orphan_watch(directory, parent):
    while os.getppid() == parent:
        time.sleep(0.2)
    shutil.rmtree(directory, ignore_errors=True)
    os._exit(1)
threading.Thread(
    target=_kernelproxy_orphan_watch, args=(%r, os.getppid()), name="kernelproxy-orphan-watch", daemon=True
).start()
os.environ["JPY_PARENT_PID"] = "1"
sys.path[0] = os.getcwd()
del _kernelproxy_orphan_watch
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""

KERNEL_OUTPUT_WENT = "The kernel's own output (its error) went to this process's standard error."
IMPORT_PROBE_TIMEOUT = 30.0  # seconds for "python -c 'import ipykernel'" when a kernel died while starting

_context: zmq.asyncio.Context | None = None
_context_pid = 0
_inherited_contexts: list[zmq.asyncio.Context] = []  # a forked child never terminates its parent's context


def zmq_context() -> zmq.asyncio.Context:
    """One zmq context (one IO thread of zmq's) for every kernel of this process; a forked child gets its own."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        if _context is not None:
            _inherited_contexts.append(_context)
        _context, _context_pid = zmq.asyncio.Context(), os.getpid()
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
        check_seconds("startup_timeout", self.startup_timeout)

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
    unknown = sorted(set(manager_options) - _manager_traits())
    if unknown:  # traitlets would warn and ignore them
        raise TypeError(
            f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            "neither a kernelproxy option nor an option of jupyter_client's AsyncKernelManager, "
            "which gets the other keywords"
        )
    return LocalSpec(
        kernel_name=kernel_name,
        python=python,
        cwd=os.fspath(cwd) if cwd is not None else None,
        env=dict(env or {}),
        startup_timeout=DEFAULT_STARTUP_TIMEOUT if startup_timeout is None else startup_timeout,
        transport=transport,
        manager_options=dict(manager_options),
    )


@functools.cache
def _manager_traits() -> frozenset[str]:
    traits = AsyncKernelManager.class_trait_names()
    return frozenset(name for name in traits if not name.startswith("_")) | {"parent", "config"}


class _ThisPythonFirst(KernelSpecManager):
    """Kernelspec lookup where "python3" means this interpreter's ipykernel.

    Pickles only travel between equal Python versions, so the default kernel
    must be this very interpreter, whatever "python3" kernelspec is installed.
    """

    python: Optional[str] = None
    private_dir: Optional[str] = None

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if self.python is not None or kernel_name == "python3":
            return python_kernel_spec(self.python or sys.executable, self.private_dir)
        return super().get_kernel_spec(kernel_name)


def python_kernel_spec(python: str, private_dir: str | None = None) -> KernelSpec:
    """This interpreter's ipykernel; with ``private_dir``, one that removes it if orphaned (``ORPHAN_WATCH``)."""
    start = ["-c", ORPHAN_WATCH % private_dir] if private_dir is not None else ["-m", "ipykernel_launcher"]
    return KernelSpec(
        argv=[python, *start, "-f", "{connection_file}"],
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
    private_dir, lock = _private_sockets(spec, manager_options)
    spec_manager.private_dir = private_dir
    manager = AsyncKernelManager(kernel_name=spec.kernel_name, kernel_spec_manager=spec_manager, **manager_options)
    control = LocalControl(manager, private_dir, lock)
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
        control.kill_process()  # it never became ready: nothing to shut down gracefully
        await asyncio.shield(state.close(shutdown=True))
        if isinstance(exc, asyncio.TimeoutError):
            raise KernelStartError(f"the kernel did not become ready within {spec.startup_timeout} s") from exc
        if isinstance(exc, KernelDiedError) or dead is not None:
            why = f"the kernel exited while starting ({dead or exc})"
            if spec.is_ipykernel:
                python = spec.python or sys.executable
                missing = await _cannot_import_ipykernel(python)
                if missing is not None:
                    raise KernelStartError(
                        f"{why}: {python} cannot import ipykernel ({missing}). Install it in that environment: "
                        f"{python} -m pip install ipykernel cloudpickle"
                    ) from exc
                raise KernelStartError(f"{why}; its Python: {python}. {KERNEL_OUTPUT_WENT}") from exc
            argv = manager.kernel_spec.argv if manager.kernel_spec else "?"
            raise KernelStartError(f"{why}; command: {argv}. {KERNEL_OUTPUT_WENT}") from exc
        raise
    return AsyncKernel(state, options)


async def _cannot_import_ipykernel(python: str) -> str | None:
    """Why ``python`` cannot import ipykernel (its last line of error), or None if it can (or we cannot tell)."""
    try:
        probe = await asyncio.create_subprocess_exec(
            python, "-c", "import ipykernel", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except OSError:
        return None
    try:
        _, stderr = await asyncio.wait_for(probe.communicate(), IMPORT_PROBE_TIMEOUT)
    except asyncio.TimeoutError:
        probe.kill()
        await probe.wait()
        return None
    lines = stderr.decode(errors="replace").strip().splitlines()
    return (lines[-1] if lines else f"exit code {probe.returncode}") if probe.returncode else None


def _private_sockets(spec: LocalSpec, manager_options: dict[str, Any]) -> tuple[str | None, int | None]:
    """Put an ipykernel's sockets in a fresh private directory, unless the caller chose an ip.

    IPC sockets in a directory only we can enter: no other user (or host) can
    reach the kernel. Adds the manager options for it to ``manager_options``.
    Returns the directory and the descriptor of its host lock (None, None: no directory).
    """
    if os.name != "posix" or not spec.is_ipykernel or "ip" in manager_options:  # other kernels may lack IPC
        return None, None
    sweep_stale_dirs()
    private_dir = tempfile.mkdtemp(prefix=PRIVATE_PREFIX)
    lock = os.open(os.path.join(private_dir, HOST_LOCK), os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by kernels
    fcntl.flock(lock, fcntl.LOCK_EX)
    manager_options.update(transport="ipc", ip=os.path.join(private_dir, "kernel"))
    manager_options.setdefault("connection_file", os.path.join(private_dir, "kernel.json"))
    return private_dir, lock


def sweep_stale_dirs(root: str | None = None) -> list[str]:
    """Remove the private directories whose host died with its kernel (nobody holds their lock); return them.

    A directory whose kernel outlived its host is removed by the kernel itself
    (``ORPHAN_WATCH``); this finds those whose kernel died too (killed together:
    a process group, the OOM killer, a container). A directory without a lock is
    left alone (an older kernelproxy's: its host may be alive).
    """
    removed = []
    for lock_path in glob.glob(os.path.join(root or tempfile.gettempdir(), PRIVATE_PREFIX + "*", HOST_LOCK)):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue  # another user's, or just removed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its host (or a forked child of it) is alive
        finally:
            os.close(fd)
        directory = os.path.dirname(lock_path)
        shutil.rmtree(directory, ignore_errors=True)
        log.info("removed %s, left behind by a host that died with its kernel", directory)
        removed.append(directory)
    return removed


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
