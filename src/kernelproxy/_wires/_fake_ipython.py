"""What kernel code reaches through ``get_ipython()`` in the fake kernel: the shell, its kernel, comms.

Only what the agent uses, shaped as ipykernel's (7.x): ``shell.user_ns``,
``shell.kernel.comm_manager.register_target``, ``kernel.get_parent``, and the
pieces of ``kernel.session.send`` that comm replies on the shell channel use.
Also how IPython formats ``user_expressions`` results (``format_value``).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Protocol

log = logging.getLogger("kernelproxy")


class Publisher(Protocol):
    """The fake kernel, as its comms and its shell see it."""

    def parent(self) -> dict[str, Any]:
        """The shell request the main thread runs now ({} if none)."""

    def publish(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None) -> None:
        """An IOPub message, its parent the request running now."""

    def reply(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None) -> None:
        """A shell message to the client whose request runs now."""


class Comm:
    """One comm, as ``comm.base_comm.BaseComm`` behaves for a kernel-side comm opened by the frontend."""

    def __init__(self, manager: CommManager, comm_id: str, target_name: str) -> None:
        self.comm_id = comm_id
        self.target_name = target_name
        self._manager = manager
        self._on_msg: Callable[[dict[str, Any]], Any] | None = None
        self._on_close: Callable[[dict[str, Any]], Any] | None = None
        self._closed = False

    def send(self, data: Any = None, metadata: Any = None, buffers: list[Any] | None = None) -> None:
        self._manager.kernel.publish("comm_msg", {"comm_id": self.comm_id, "data": data or {}}, buffers)

    def close(self, data: Any = None, metadata: Any = None, buffers: list[Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._manager.comms.pop(self.comm_id, None)
        self._manager.kernel.publish("comm_close", {"comm_id": self.comm_id, "data": data or {}}, buffers)

    def on_msg(self, callback: Callable[[dict[str, Any]], Any] | None) -> None:
        self._on_msg = callback

    def on_close(self, callback: Callable[[dict[str, Any]], Any] | None) -> None:
        self._on_close = callback


class CommManager:
    """Targets and open comms; the handlers of comm_open, comm_msg and comm_close."""

    def __init__(self, kernel: Publisher) -> None:
        self.kernel = kernel
        self.targets: dict[str, Callable[[Comm, dict[str, Any]], Any]] = {}
        self.comms: dict[str, Comm] = {}

    def register_target(self, target_name: str, callback: Callable[[Comm, dict[str, Any]], Any]) -> None:
        self.targets[target_name] = callback

    def unregister_target(self, target_name: str) -> Any:
        return self.targets.pop(target_name, None)

    def comm_open(self, msg: dict[str, Any]) -> None:
        content = msg["content"]
        comm = Comm(self, content["comm_id"], content.get("target_name", ""))
        self.comms[comm.comm_id] = comm
        target = self.targets.get(comm.target_name)
        if target is None:
            log.error("fake kernel: no such comm target registered: %s", comm.target_name)
        else:
            try:
                target(comm, msg)
                return
            except Exception:
                log.exception("fake kernel: opening a comm with target %s failed", comm.target_name)
        comm.close()  # as ipykernel does when a comm cannot be opened

    def comm_msg(self, msg: dict[str, Any]) -> None:
        comm = self.comms.get(msg["content"].get("comm_id", ""))
        if comm is None or comm._on_msg is None:
            return
        try:
            comm._on_msg(msg)
        except Exception:
            log.exception("fake kernel: a comm's message handler failed")

    def comm_close(self, msg: dict[str, Any]) -> None:
        comm = self.comms.pop(msg["content"].get("comm_id", ""), None)
        if comm is None:
            return
        comm._closed = True
        if comm._on_close is not None:
            try:
                comm._on_close(msg)
            except Exception:
                log.exception("fake kernel: a comm's close handler failed")

    def info(self, target_name: str | None) -> dict[str, Any]:
        return {
            comm_id: {"target_name": comm.target_name}
            for comm_id, comm in self.comms.items()
            if target_name is None or comm.target_name == target_name
        }


class _Session:
    """``kernel.session.send``, as the agent calls it for comm replies on the shell channel."""

    def __init__(self, kernel: Publisher) -> None:
        self._kernel = kernel

    def send(
        self, stream: Any, msg_type: str, content: Any = None, parent: Any = None, ident: Any = None,
        buffers: list[Any] | None = None, **options: Any,
    ) -> None:
        self._kernel.reply(msg_type, content or {}, buffers)


class KernelView:
    """``get_ipython().kernel``: the parts of ipykernel's Kernel the agent touches."""

    _supports_kernel_subshells = False

    def __init__(self, kernel: Publisher, comm_manager: CommManager) -> None:
        self._kernel = kernel
        self.comm_manager = comm_manager
        self.session = _Session(kernel)
        self.shell_stream = "shell"  # non-None: replies on shell are possible
        self._parent_ident = {"shell": [b""], "control": [b""]}

    def get_parent(self, channel: str = "shell") -> dict[str, Any]:
        return self._kernel.parent()


class Shell:
    """What ``get_ipython()`` returns."""

    def __init__(self, user_ns: dict[str, Any], kernel: KernelView) -> None:
        self.user_ns = user_ns
        self.kernel = kernel


def format_value(value: Any) -> dict[str, Any]:
    """A user_expressions result as IPython's display formatter makes it: repr and ``_repr_mimebundle_``."""
    data: dict[str, Any] = {"text/plain": repr(value)}
    metadata: dict[str, Any] = {}
    method = None if isinstance(value, type) else getattr(value, "_repr_mimebundle_", None)
    if callable(method) and not hasattr(value, "_ipython_canary_method_should_not_exist_"):
        bundle = method(include=None, exclude=None)
        if isinstance(bundle, tuple):
            bundle, metadata = bundle
        data.update(bundle or {})
    return {"status": "ok", "data": data, "metadata": metadata}


def format_error(exc: BaseException) -> dict[str, Any]:
    """An error as ipykernel reports it in a reply or a user_expressions entry."""
    return {
        "status": "error",
        "ename": type(exc).__name__,
        "evalue": str(exc),
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }
