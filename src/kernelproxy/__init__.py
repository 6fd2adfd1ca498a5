"""kernelproxy: use a Jupyter kernel as a remote Python.

    with kernelproxy.start() as k:
        k.push(df=frame)
        total = k.call(lambda d: d["x"].sum(), k.ref("df"))
"""

from ._api import connect, connect_async, connect_server, connect_server_async, start, start_async
from ._exceptions import (
    AuthenticationError,
    BrokenKernelPool,
    CallInterrupted,
    CallTimeout,
    ConnectionFileError,
    EnvironmentMismatchError,
    KernelClosedError,
    KernelDiedError,
    KernelProxyError,
    KernelRestartedWarning,
    KernelStartError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    ServerError,
    ServerUnreachableError,
    StaleRefError,
    SubshellUnavailableError,
)
from ._kernel import AsyncKernel
from ._magic import load_ipython_extension
from ._pool import AsyncKernelPool, KernelPool
from ._refs import AsyncRemoteRef, RemoteRef
from ._sync import Kernel
from ._types import CallOptions, KernelInfo, KernelStatus

__version__ = "0.1.0"

__all__ = [
    "AsyncKernel",
    "AsyncKernelPool",
    "AsyncRemoteRef",
    "AuthenticationError",
    "BrokenKernelPool",
    "CallInterrupted",
    "CallOptions",
    "CallTimeout",
    "ConnectionFileError",
    "EnvironmentMismatchError",
    "Kernel",
    "KernelClosedError",
    "KernelDiedError",
    "KernelInfo",
    "KernelPool",
    "KernelProxyError",
    "KernelRestartedWarning",
    "KernelStartError",
    "KernelStatus",
    "ProtocolError",
    "RemoteError",
    "RemoteRef",
    "RemoteTraceback",
    "SerializationError",
    "ServerError",
    "ServerUnreachableError",
    "StaleRefError",
    "SubshellUnavailableError",
    "__version__",
    "connect",
    "connect_async",
    "connect_server",
    "connect_server_async",
    "load_ipython_extension",
    "start",
    "start_async",
]
