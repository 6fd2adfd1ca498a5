"""kernelproxy: use a Jupyter kernel as a remote Python.

    with kernelproxy.start() as k:
        k.push(df=frame)
        total = k.call(lambda: df["x"].sum())
"""

from ._api import connect, connect_async, start, start_async
from ._exceptions import (
    CallInterrupted,
    CallTimeout,
    ConnectionFileError,
    EnvironmentMismatchError,
    KernelClosedError,
    KernelDiedError,
    KernelProxyError,
    KernelStartError,
    ProtocolError,
    RemoteError,
    SerializationError,
)
from ._kernel import AsyncKernel
from ._sync import Kernel
from ._types import CallOptions, KernelInfo

__version__ = "0.1.0"

__all__ = [
    "AsyncKernel",
    "CallInterrupted",
    "CallOptions",
    "CallTimeout",
    "ConnectionFileError",
    "EnvironmentMismatchError",
    "Kernel",
    "KernelClosedError",
    "KernelDiedError",
    "KernelInfo",
    "KernelProxyError",
    "KernelStartError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "__version__",
    "connect",
    "connect_async",
    "start",
    "start_async",
]
