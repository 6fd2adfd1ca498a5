"""Every exception kernelproxy raises, in one place.

The tree::

    KernelProxyError
    ├── RemoteError              code in the kernel raised, and its exception could not be re-raised here
    ├── CallTimeout              (also TimeoutError) a call outlived its timeout; the kernel was interrupted
    ├── CallInterrupted          the call was stopped by Kernel.interrupt() (or a signal sent to the kernel)
    ├── SerializationError       (also pickle.PicklingError and UnpicklingError) a value could not be pickled
    │                            or unpickled, on either side
    ├── EnvironmentMismatchError the kernel's Python or cloudpickle cannot exchange pickles with ours
    ├── ConnectionFileError      a connection file is missing, unreadable or invalid, or nobody answers at it
    ├── ServerError              a Jupyter Server or gateway refused a request (HTTP status in .status)
    │   ├── AuthenticationError  the server rejected the token
    │   └── ServerUnreachableError (also ConnectionError) nothing answers at the server's URL
    ├── KernelStartError         a kernel process could not be started or never became ready
    ├── KernelDiedError          the kernel died or stopped answering
    │   └── BrokenKernelPool     (also concurrent.futures.process.BrokenProcessPool) a pool that cannot run tasks
    ├── KernelClosedError        (also RuntimeError) the Kernel was shut down and used again
    ├── StaleRefError            a RemoteRef was used after its kernel restarted (by anyone)
    ├── SubshellUnavailableError a call asked for a subshell and the kernel has none
    └── ProtocolError            a reply kernelproxy cannot read: corruption or a version mismatch

    KernelRestartedWarning (UserWarning)  auto_restart replaced a dead kernel with a fresh one
    RemoteTraceback (Exception)           the ``__cause__`` of a re-raised remote exception: the kernel's traceback

Exceptions raised by *your* code in the kernel are raised here as their own
type (``ValueError`` stays ``ValueError``) with the remote traceback attached
as ``__cause__``; ``RemoteError`` is only the fallback.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = [
    "AuthenticationError",
    "BrokenKernelPool",
    "CallInterrupted",
    "CallTimeout",
    "ConnectionFileError",
    "EnvironmentMismatchError",
    "KernelClosedError",
    "KernelDiedError",
    "KernelProxyError",
    "KernelRestartedWarning",
    "KernelStartError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "ServerError",
    "ServerUnreachableError",
    "StaleRefError",
    "SubshellUnavailableError",
]


class KernelProxyError(Exception):
    """Base class of every error kernelproxy raises itself."""


class RemoteError(KernelProxyError):
    """Raised when code in the kernel raised an exception that cannot be re-raised on the host.

    That happens when the exception's class does not exist here, or the
    exception object cannot be pickled. ``ename``, ``evalue`` and
    ``traceback`` (the formatted remote traceback) describe what happened.
    """

    def __init__(self, ename: str, evalue: str, traceback: str = "", stack: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.stack = stack  # the remote traceback as data, when the agent sent it (see RemoteTraceback)

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            return f"{text}\n\nRemote traceback:\n{self.traceback.rstrip()}"
        return text


class CallTimeout(KernelProxyError, TimeoutError):
    """Raised when a call did not finish within its timeout.

    The kernel was interrupted to cancel the remote work and stays usable.
    """


class CallInterrupted(KernelProxyError):
    """Raised when a call's remote work was interrupted, e.g. by ``Kernel.interrupt()``."""


class SerializationError(KernelProxyError, pickle.PicklingError, pickle.UnpicklingError):
    """Raised when a value cannot be pickled or unpickled.

    The message says which value (its path in the arguments, such as
    ``args[1]['key']``), on which side, and why; ``__cause__`` is the original
    error where there is one (a ``ModuleNotFoundError`` in the kernel...). It is
    also a ``pickle.PicklingError`` and a ``pickle.UnpicklingError``, so code
    written for ``ProcessPoolExecutor`` that catches those catches it.
    """


class EnvironmentMismatchError(KernelProxyError):
    """Raised at connect time when the kernel cannot exchange pickles with this process.

    Python's major.minor version and cloudpickle's major.minor version must
    match on both sides; the message names both and says what to install where.
    """


class ConnectionFileError(KernelProxyError):
    """Raised when a connection file is missing, unreadable or invalid, or no kernel answers at it."""


class ServerError(KernelProxyError):
    """Raised when a Jupyter Server or gateway refused a request (the HTTP status and its message are in the text)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(ServerError):
    """Raised when a Jupyter Server or gateway rejected the token (HTTP 401 or 403)."""


class ServerUnreachableError(ServerError, ConnectionError):
    """Raised when no Jupyter Server or gateway answers at the URL (refused, unresolvable, timed out, TLS failure)."""


class KernelStartError(KernelProxyError):
    """Raised when a kernel could not be started or did not become ready in time."""


class KernelDiedError(KernelProxyError):
    """Raised when the kernel died, or stopped answering its heartbeat, before or during a call.

    Call ``restart()`` to get a fresh kernel (only for kernels kernelproxy started).
    """


class BrokenKernelPool(KernelDiedError, BrokenProcessPool):
    """Raised by a KernelPool that cannot run tasks: every kernel died and none could be replaced,
    or the pool's ``initializer`` failed in a kernel it started.

    Also a ``concurrent.futures.process.BrokenProcessPool``. A kernel that dies
    and is replaced does not break the pool: its task raises ``KernelDiedError``.
    """


class KernelClosedError(KernelProxyError, RuntimeError):
    """Raised when a Kernel is used after ``shutdown()`` or ``close()``, or in a forked child (it is the parent's)."""


class StaleRefError(KernelProxyError):
    """Raised when a RemoteRef is used after its kernel restarted: the object it pointed to is gone.

    Also after a restart by someone else (another client, the notebook's Restart
    button): the agent in the new kernel process refuses refs minted by the old one,
    so a stale ref never reaches another client's object.
    """


class SubshellUnavailableError(KernelProxyError):
    """Raised when a call asks for a subshell (``options(subshell=True)``) and the kernel has none.

    Subshells need a kernel that lists "kernel subshells" in its supported
    features (JEP 91: ipykernel 7 and later); the message names the kernel.
    """


class ProtocolError(KernelProxyError):
    """Raised when a reply cannot be understood: message corruption or a version mismatch."""


class KernelRestartedWarning(UserWarning):
    """Warned when ``start(..., auto_restart=True)`` replaced a dead kernel: its namespace is empty."""


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception re-raised from the kernel: the kernel-side traceback.

    ``traceback`` is the text the kernel formatted. ``stack`` is the same as data, for hosts that render it
    themselves (IPython does, in its own colours): one dict per exception of the remote chain, oldest first,
    with ``type``, ``message``, ``only`` (its ``traceback.format_exception_only`` lines), ``frames``
    (``[filename, line number, function name, source line]`` each) and ``link`` (``"cause"`` or ``"context"``:
    how it follows the previous one); None from kernels whose agent does not send it.
    """

    def __init__(self, traceback: str, stack: list[dict[str, Any]] | None = None) -> None:
        super().__init__(traceback)
        self.traceback = traceback
        self.stack = stack

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'
