"""Deliver a call's remote output (IOPub streams and displays) where its caller sees it.

Where output goes
-----------------
A call's IOPub messages reach kernelproxy on whatever thread reads the wire
(the IO thread for the blocking API). Writing them there, as is, would send
them wherever output of *that* thread goes. In a notebook host that is the
wrong cell: ipykernel files every write to ``sys.stdout``/``sys.stderr`` and
every ``display()`` under a parent header (the request, i.e. the cell, that
caused it) and looks it up when the output is produced:

* ipykernel 7 (``iostream.OutStream.parent_header``, ``zmqshell.ZMQDisplayPublisher``):
  the ``_parent_header`` ContextVar of the stream or publisher, which
  ``Kernel.set_parent`` sets in the context that runs the cell; where it has
  no value (a thread the cell started: threads do not inherit contexts), the
  header of the latest request (``_parent_header_global``), the cell that
  runs *now*.
* ipykernel 6.29 to 6.x: the same ContextVar first; then the header of the
  cell that started the thread (or its oldest ancestor thread), recorded by
  ipykernel's patch of ``threading.Thread``; then the latest request.
* earlier ipykernel 6: one header for the whole process, the latest request.

So each call, where it is made (on the calling thread, before the blocking
API hands it to the IO thread), takes ``capture()``: a copy of the caller's
context in which those ContextVars are set to the header that output written
on the calling thread would carry at that moment (so ipykernel's own rule
for the calling thread decides, whatever its version). The call's
``Forwarder`` writes every message inside that context, so its output lands
where the caller's own ``print`` would have, also for pool tasks and calls
from threads. Outside ipykernel the context changes nothing.

What is forwarded
-----------------
* ``stream``: written to this process's ``sys.stdout``/``sys.stderr`` (looked
  up at each write, so ``contextlib.redirect_stdout`` and pytest capture work).
* ``display_data``, ``update_display_data`` (with its transient
  ``display_id``), ``execute_result``, ``clear_output``: in an IPython host,
  published through the shell's display publisher (in a notebook: in the
  calling cell); elsewhere the ``text/plain`` of each display is written to
  stdout and, the first time a display carried more than text, one notice on
  stderr says what was left out and how to see it.

A pool labels each line of a task's output (``prefix="[task N] "``), also
the text of its displays in plain Python; displays published through IPython
carry no label.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from typing import Any, Callable

RICH_NOTICE = (
    "kernelproxy: a remote call displayed rich output ({kinds}); this Python has no IPython display, "
    "so only its text/plain is shown here. Run the code in Jupyter or IPython to see it, or return the "
    "object from the remote function and save or show it here.\n"
)
_rich_notice_lock = threading.Lock()
_rich_notice_given = False


def capture() -> contextvars.Context:
    """Where output written here now would go: a copy of the current context, with ipykernel's parents pinned.

    Call it on the thread (in the task) that makes the call, at the time of the call.
    """
    context = contextvars.copy_context()
    if "ipykernel" not in sys.modules:  # no parent headers to pin (the common case in scripts: keep it cheap)
        return context
    shell = ipython_shell()
    header = _parent_header(shell)
    if header is not None:
        context.run(_pin, shell, header)
    return context


class Forwarder:
    """An IOPub listener that delivers one call's output within the caller's context (see the module docstring)."""

    __slots__ = ("context", "partial", "prefix")

    def __init__(self, context: contextvars.Context | None = None, prefix: str = "") -> None:
        self.context = capture() if context is None else context
        self.prefix = prefix
        self.partial = {"stdout": "", "stderr": ""}  # with a prefix: the last, unfinished line of each stream

    def __call__(self, msg: dict[str, Any]) -> None:
        handler = _HANDLERS.get(msg["msg_type"])
        if handler is not None:
            self.context.run(handler, self, msg["content"])

    def flush(self) -> None:
        """Write unfinished lines (a pool task ended without a final newline)."""
        if self.prefix and any(self.partial.values()):
            self.context.run(self._flush_partial)

    # ------------------------------------------------------------------ handlers (run in the caller's context)

    def _stream(self, content: dict[str, Any]) -> None:
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        self._write(name, content.get("text", ""))

    def _write(self, name: str, text: str) -> None:
        if self.prefix:
            lines = (self.partial[name] + text).split("\n")
            self.partial[name] = lines.pop()
            text = "".join(f"{self.prefix}{line}\n" for line in lines)
        if text:
            _write(name, text)

    def _flush_partial(self) -> None:
        for name, text in self.partial.items():
            if text:
                self.partial[name] = ""
                _write(name, f"{self.prefix}{text}\n")

    def _display(self, content: dict[str, Any], update: bool = False) -> None:
        data = content.get("data")
        if not isinstance(data, dict):
            return
        self._flush_partial()  # a task's unfinished line goes before its display
        shell = ipython_shell()
        if shell is not None:
            metadata = content.get("metadata")
            transient = content.get("transient")
            shell.display_pub.publish(
                data=data,
                metadata=metadata if isinstance(metadata, dict) else {},
                transient=transient if isinstance(transient, dict) else {},
                update=update,
            )
            return
        text = data.get("text/plain")
        if isinstance(text, str):
            self._write("stdout", text if text.endswith("\n") else text + "\n")
        _notice_rich_output(data)

    def _update_display(self, content: dict[str, Any]) -> None:
        self._display(content, update=True)

    def _clear_output(self, content: dict[str, Any]) -> None:
        shell = ipython_shell()
        if shell is not None:  # a plain terminal has no cell to clear
            shell.display_pub.clear_output(wait=bool(content.get("wait", False)))


_HANDLERS: dict[str, Callable[[Forwarder, dict[str, Any]], None]] = {
    "stream": Forwarder._stream,
    "display_data": Forwarder._display,
    "execute_result": Forwarder._display,
    "update_display_data": Forwarder._update_display,
    "clear_output": Forwarder._clear_output,
}


def _write(name: str, text: str) -> None:
    stream = sys.stderr if name == "stderr" else sys.stdout
    if stream is not None:
        stream.write(text)
        stream.flush()


def _notice_rich_output(data: dict[str, Any]) -> None:
    """Say once per process, on stderr, that a display had more than text/plain."""
    global _rich_notice_given
    kinds = [kind for kind in data if kind != "text/plain"]
    if not kinds or _rich_notice_given:
        return
    with _rich_notice_lock:
        if _rich_notice_given:
            return
        _rich_notice_given = True
    _write("stderr", RICH_NOTICE.format(kinds=", ".join(kinds)))


# ---------------------------------------------------------------------- the IPython host


def ipython_shell() -> Any:
    """The running IPython shell (terminal or kernel), or None; never imports IPython.

    What ``IPython.get_ipython()`` does, without its import statement: a sixth of the
    cost, paid twice per call wherever IPython is imported (a notebook, or a library
    that brings it, as ipyparallel does).
    """
    interactive = sys.modules.get("IPython.core.interactiveshell")
    shell_class = getattr(interactive, "InteractiveShell", None)
    if shell_class is None or not shell_class.initialized():
        return None
    return shell_class.instance()


def _parent_header(shell: Any) -> dict[str, Any] | None:
    """The parent header that ipykernel would give output written on this thread now; None outside ipykernel."""
    for source in (sys.stdout, sys.stderr, getattr(shell, "display_pub", None)):
        header = getattr(source, "parent_header", None)  # ipykernel's property applies its rule for this thread
        if isinstance(header, dict):
            return header
    return None


def _pin(shell: Any, header: dict[str, Any]) -> None:
    """Set ``header`` as the parent of output in the current context (run inside the captured context)."""
    pin_all = getattr(shell, "set_thread_parent", None)
    if callable(pin_all):  # ipykernel 7: the shell, its display publisher and hook, sys.stdout/stderr
        pin_all(header)
        return
    for target in (sys.stdout, sys.stderr, getattr(shell, "display_pub", None)):
        pin = getattr(target, "set_thread_parent", None)
        if callable(pin):
            pin(header)
            continue
        var = getattr(target, "_parent_header", None)  # ipykernel 6.29 to 6.x: no public setter
        if isinstance(var, contextvars.ContextVar):
            var.set(header)
