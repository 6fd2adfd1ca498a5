"""Small value types of the public API."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:  # for the checker only: call(fn, *args) checks args against fn's parameters
    if sys.version_info >= (3, 10):
        from typing import ParamSpec, TypeVar
    else:
        from typing_extensions import ParamSpec, TypeVar

    P = ParamSpec("P")  # the parameters of a function run in the kernel
    T = TypeVar("T")
    A1 = TypeVar("A1")  # map()'s item types, one per iterable
    A2 = TypeVar("A2")
    A3 = TypeVar("A3")

Output = Literal["forward", "discard"]
OnTimeout = Literal["interrupt", "restart"]


class Unset(enum.Enum):
    """Marks an option left as it is (None is a meaningful timeout)."""

    UNSET = "unset"


UNSET = Unset.UNSET


def check_seconds(name: str, value: object) -> None:
    """A duration option (startup_timeout, connect_timeout) is a positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


@dataclass(frozen=True)
class CallOptions:
    """Per-call options; ``Kernel.options(...)`` returns a view of the kernel with other ones.

    Attributes:
        timeout: seconds a call may take before CallTimeout (None: no limit).
        output: "forward" writes the kernel's stdout/stderr to this process's
            sys.stdout/sys.stderr as it arrives, and shows what the call displays
            (in a notebook, both in the cell that made the call; in plain Python,
            the text/plain of displays); "discard" drops both.
        on_timeout: what a timeout does. "interrupt" interrupts the kernel; if the
            kernel ignores the interrupt (stuck in C code), CallTimeout says so and
            the kernel stays busy. "restart" then also restarts the kernel (one
            kernelproxy started), emptying its namespace. Never on a subshell.
        subshell: run calls on kernelproxy's own subshell of the kernel (a thread
            of its own, JEP 91, ipykernel >= 7) instead of its main shell, so they
            run while the kernel is busy with someone's cell. They run *concurrently*
            with that cell, on the same objects: only for what is safe to read or do
            meanwhile. A timeout or cancel stops only the subshell's work (an
            exception raised in its thread), never the main shell's cell.
    """

    timeout: Optional[float] = None
    output: Output = "forward"
    on_timeout: OnTimeout = "interrupt"
    subshell: bool = False

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, not {self.timeout!r}")
        if self.output not in ("forward", "discard"):
            raise ValueError(f"output must be 'forward' or 'discard', not {self.output!r}")
        if self.on_timeout not in ("interrupt", "restart"):
            raise ValueError(f"on_timeout must be 'interrupt' or 'restart', not {self.on_timeout!r}")
        if not isinstance(self.subshell, bool):
            raise TypeError(f"subshell must be True or False, not {self.subshell!r}")


@dataclass(frozen=True)
class KernelInfo:
    """What kernelproxy knows about the kernel it talks to: ``k.info``.

    Attributes:
        implementation: the kernel's implementation, e.g. "ipython" (from its kernel_info_reply).
        implementation_version: that implementation's version.
        python: the kernel's Python version.
        cloudpickle: the kernel's cloudpickle version.
        pid: the kernel's process id (on its own machine).
        executable: the path of the kernel's Python interpreter.
        hostname: the machine the kernel runs on.
        transport: "lane", "comm" or "execute" (and its mode), the wire when not direct zmq, and why "auto" got no lane.
        connection_file: the kernel's connection file (None for kernels on a server).
        agent_protocol: the version of the wire format spoken with kernelproxy's agent in the kernel.
        server: the Jupyter Server or gateway's URL, for kernels reached through one.
        kernel_id: the kernel's id on that server.
    """

    implementation: str  # e.g. "ipython" (from kernel_info_reply)
    implementation_version: str
    python: str  # the kernel's Python version
    cloudpickle: str
    pid: int
    executable: str
    hostname: str
    transport: str  # "lane", "comm" or "execute" (and its mode); the wire; why no lane
    connection_file: Optional[str]
    agent_protocol: int
    server: Optional[str] = None  # the Jupyter Server or gateway's URL, for kernels reached through one
    kernel_id: Optional[str] = None  # the kernel's id on that server
    agent_revision: int = 0  # the agent's revision in the kernel (this kernelproxy's, or a newer one's)


@dataclass(frozen=True)
class KernelStatus:
    """Where a kernel stands now (``Kernel.status``): cheap, no round trip."""

    state: Literal["ready", "restarting", "dead", "closed"]
    restarts: int  # how often it restarted (by kernelproxy, or noticed after someone else's): older refs are stale
    owned: bool  # kernelproxy started it (here or on a server): closing the Kernel stops it
    death: Optional[str] = None  # why it is dead, when it is
