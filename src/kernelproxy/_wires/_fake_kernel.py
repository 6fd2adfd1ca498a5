"""A kernel in this process: its channels, its main thread, its death. What the fake wire connects to.

It behaves as ipykernel does for the messages kernelproxy sends:

* shell requests run one at a time, in order, on the kernel's own main thread
  (a daemon thread), between IOPub ``status`` busy and idle whose parent is the
  request; replies go to the client that asked, IOPub to every client;
* ``kernel_info_request``, ``execute_request`` (cell code, then
  ``user_expressions`` formatted as IPython does; output printed meanwhile
  becomes IOPub ``stream`` messages, flushed before the reply; an error with
  ``stop_on_error`` aborts the execute requests queued behind it),
  ``comm_open``/``comm_msg``/``comm_close``/``comm_info_request``,
  ``shutdown_request``; control: ``kernel_info_request``,
  ``interrupt_request``, ``shutdown_request``, each between busy and idle too;
* ``interrupt()`` (SIGINT's stand-in) raises KeyboardInterrupt in the code
  the main thread runs, and ends a ``time.sleep`` there at once (one that
  comes before the code starts waits for it, or is dropped as ipykernel
  drops it: ``early_interrupts``);
* ``die()`` ends it as a killed process ends: nothing more is read or sent.

Code runs in a ``FakePython`` (``_fake_python``), where the real agent source
is installed by the host's handshake as into any kernel. ``submit`` runs a
function on the main thread directly, for the in-process transport.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, Union

from jupyter_client.session import Session

from . import _fake_python as fake_python
from ._fake_ipython import CommManager, KernelView, Shell, format_error, format_value

log = logging.getLogger("kernelproxy")
T = TypeVar("T")
PROTOCOL_VERSION = "5.3"


class Client(Protocol):
    """A wire's kernel side: takes what the kernel sends to that client (called from any thread)."""

    def post(self, channel: str, parts: list[bytes], buffers: list[bytearray]) -> None: ...


class KernelExit(BaseException):
    """Raised in the main thread's code when the kernel dies: the process is gone."""


def _raise_in(thread_ident: int, exc_type: type[BaseException] | None) -> None:
    """Schedule ``exc_type`` in a thread (raised at its next bytecode); None cancels one not yet raised."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_ident), exc)


class _Request:
    """A shell message waiting for the main thread."""

    def __init__(self, msg: dict[str, Any], origin: Client) -> None:
        self.msg = msg
        self.origin = origin
        self.id: str = msg["header"].get("msg_id", "")


class DirectCall:
    """A function run on the kernel's main thread without messages (the in-process transport's requests).

    ``started`` is called when the main thread takes it, ``output`` with what it
    prints, ``done`` once with its result or exception (KernelDiedError-like
    ``died(reason)`` if the kernel dies first); all from the kernel's threads.
    """

    def __init__(
        self,
        fn: Callable[[], Any],
        *,
        started: Callable[[], None],
        output: fake_python.Sink,
        done: Callable[[Any, BaseException | None], None],
        died: Callable[[str], BaseException],
    ) -> None:
        self.id = f"direct-{uuid.uuid4().hex}"
        self.fn = fn
        self.started = started
        self.output = output
        self._done = done
        self._died = died
        self._finished = False
        self._lock = threading.Lock()

    def finish(self, result: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._done(result, error)

    def fail_with_death(self, reason: str) -> None:
        self.finish(None, self._died(reason))


_Job = Union[_Request, DirectCall]


class FakeKernel:
    """One fake kernel "process"."""

    implementation = "kernelproxy-fake"

    def __init__(
        self,
        *,
        early_interrupts: Literal["wait", "drop"] = "wait",
        code_start_delay: float = 0.0,
        deaf_after_interrupt: bool = False,
    ) -> None:
        # Builds this kernel's messages; nothing is signed (the key only keeps Session from warning).
        self.session = Session(key=uuid.uuid4().hex.encode(), username="kernel")
        self.python = fake_python.FakePython()
        self.comms = CommManager(self)
        self.python.set_ipython(Shell(self.python.user_ns, KernelView(self, self.comms)))
        self.death: str | None = None  # why it died; None while it runs
        self.exit_code: int | None = None
        self.execution_count = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the fields below, and when exceptions may be raised in the main thread
        self._clients: list[Client] = []
        self._running: _Job | None = None
        self._armed = False  # kernel code runs on the main thread: an interrupt may raise there
        self._sleeping = False  # ...and it sleeps (time.sleep): the interrupt is raised by the sleep
        # An interrupt that comes while a request runs the kernel's own code (its busy status sent, the user's
        # code not started): ipykernel ignores SIGINT there ("drop"), a window of microseconds unless the
        # kernel is slow (``code_start_delay`` widens it). The fake's is as wide as a thread switch, so by
        # default ("wait") such an interrupt waits for the request's first sleep (code that never sleeps
        # misses it). "drop" reproduces the real race on demand.
        self.early_interrupts = early_interrupts
        self.code_start_delay = code_start_delay  # seconds between a request's busy status and its code
        self._interrupt_pending = False  # raised by the next sleep of the running request
        # xeus-python, now and then: the interrupted request answers, and later shell requests are never read.
        self.deaf_after_interrupt = deaf_after_interrupt
        self._deaf = False
        self.python.on_sleep = self._on_sleep
        self.python.on_exit = self._exit_from_code
        self._aborting: set[int] = set()  # ids of queued jobs to abort (an execute error with stop_on_error)
        self._thread = threading.Thread(target=self._main, name="kernelproxy-fake-kernel", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ clients (the wires' side)

    def attach(self, client: Client) -> None:
        with self._lock:
            self._clients.append(client)

    def detach(self, client: Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def receive(self, origin: Client, channel: str, msg: dict[str, Any]) -> None:
        """A message from a client: shell requests queue for the main thread, control ones are handled now."""
        if self.death is not None:
            return  # a dead process reads nothing
        if channel == "shell":
            if not self._deaf:
                self._queue.put(_Request(msg, origin))
        elif channel == "control":
            self._control(_Request(msg, origin))

    def submit(self, call: DirectCall) -> None:
        """Queue a function for the main thread, behind the shell requests already queued."""
        if self.death is not None:
            call.fail_with_death(self.death)
            return
        self._queue.put(call)

    @property
    def running(self) -> str | None:
        """The id of what the main thread runs now (a request's msg_id, or a direct call's id)."""
        job = self._running
        return job.id if job is not None else None

    # ------------------------------------------------------------------ signals and death

    def interrupt(self) -> None:
        """SIGINT's stand-in: KeyboardInterrupt in the kernel code running now (none if it is idle).

        Code that sleeps gets it from its sleep (a safe place); other code at its next bytecode, wherever
        that is, as a signal lands.
        """
        with self._lock:
            if self.death is not None or self.python.main_thread is None:
                return
            self._deaf = self._deaf or (self.deaf_after_interrupt and self._armed)  # for good, as xeus-python
            if self._armed and not self._sleeping:
                _raise_in(self.python.main_thread, KeyboardInterrupt)
            elif self._armed or (self._running is not None and self.early_interrupts == "wait"):
                self._interrupt_pending = True
                self.python.wake.set()

    def die(self, reason: str = "the fake kernel was killed", exit_code: int = -9) -> None:
        """End the kernel as a killed process ends: requests waiting or running get no reply."""
        with self._lock:
            if self.death is not None:
                return
            self.death, self.exit_code = reason, exit_code
            main = self.python.main_thread
            if self._armed and not self._sleeping and main is not None and main != threading.get_ident():
                _raise_in(main, KernelExit)  # code that does not sleep must still stop
            self.python.wake.set()  # a sleeping one stops there
            running = self._running
        if isinstance(running, DirectCall):
            running.fail_with_death(reason)
        while True:  # what was queued dies with it
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, DirectCall):
                job.fail_with_death(reason)
        self._queue.put(None)  # wakes an idle main thread, which then ends

    def _exit_from_code(self, code: int) -> None:
        """Kernel code ended its process (os._exit, os.kill of its pid...)."""
        self.die(f"the fake kernel's code ended its process (exit code {code})", exit_code=code)
        raise KernelExit

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the main thread to end (after die()); say whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the main thread

    def _main(self) -> None:
        self.python.main_thread = threading.get_ident()
        while True:
            job = self._queue.get()
            if job is None or self.death is not None:
                if isinstance(job, DirectCall):
                    job.fail_with_death(self.death or "the fake kernel died")
                return
            with self._lock:
                self._running = job
            try:
                if isinstance(job, DirectCall):
                    self._run_direct(job)
                else:
                    self._run_request(job)
            except KernelExit:
                return
            except BaseException:  # a bug here must not end the kernel silently
                log.exception("fake kernel: handling a request failed")
            finally:
                with self._lock:
                    self._running = None
                    self._interrupt_pending = False  # it was for this request

    def run_kernel_code(self, fn: Callable[[], T]) -> T:
        """Run user or agent code on the main thread, where an interrupt raises KeyboardInterrupt."""
        with self._lock:
            self._armed = True
        try:
            return fn()
        finally:
            with self._lock:
                self._armed = False
                if self.python.main_thread is not None:
                    _raise_in(self.python.main_thread, None)  # one scheduled as fn returned is dropped

    def _on_sleep(self, starting: bool) -> type[BaseException] | None:
        """Called by time.sleep on the main thread before and after it sleeps: what it raises, if anything."""
        with self._lock:
            self._sleeping = starting and self._armed
            if not starting:
                self.python.wake.clear()
            if self.death is not None:
                return KernelExit
            if self._interrupt_pending and self._armed:
                self._interrupt_pending = False
                return KeyboardInterrupt
            return None

    def _run_direct(self, call: DirectCall) -> None:
        call.started()  # as a request's busy status: an interrupt coming before fn runs waits for it
        self._code_starts()
        try:
            with fake_python.routed_output(call.output):
                result = self.run_kernel_code(call.fn)
        except KernelExit:
            call.fail_with_death(self.death or "the fake kernel died")
            raise
        except BaseException as exc:
            call.finish(None, exc)
            return
        call.finish(result, None)

    def _run_request(self, request: _Request) -> None:
        msg = request.msg

        def stream(name: str, text: str) -> None:
            self._send("iopub", "stream", {"name": name, "text": text}, msg)

        self._send("iopub", "status", {"execution_state": "busy"}, msg)
        self._code_starts()
        msg_type = msg["header"].get("msg_type")
        handler = _SHELL_HANDLERS.get(msg_type)
        with fake_python.routed_output(stream):
            if handler is None:
                log.warning("fake kernel: unknown shell message type %r", msg_type)
            else:
                try:
                    handler(self, request)
                except KeyboardInterrupt:  # as ipykernel: an interrupt outside kernel code does not end the kernel
                    log.error("fake kernel: KeyboardInterrupt caught in kernel")
        self._send("iopub", "status", {"execution_state": "idle"}, msg)

    def _code_starts(self) -> None:
        if self.code_start_delay:
            time.sleep(self.code_start_delay)  # a slow kernel between saying "busy" and running the code

    def _control(self, request: _Request) -> None:
        """Control messages are handled at once, on the caller's thread (ipykernel's control thread)."""
        msg = request.msg
        msg_type = msg["header"].get("msg_type")
        self._send("iopub", "status", {"execution_state": "busy"}, msg)
        if msg_type == "kernel_info_request":
            self._send("control", "kernel_info_reply", self._kernel_info(), msg, to=request.origin)
        elif msg_type == "interrupt_request":
            self.interrupt()
            self._send("control", "interrupt_reply", {"status": "ok"}, msg, to=request.origin)
        elif msg_type == "shutdown_request":
            self._shutdown(request)
            return
        else:
            log.error("fake kernel: unknown control message type %r", msg_type)
        self._send("iopub", "status", {"execution_state": "idle"}, msg)

    # ------------------------------------------------------------------ sending (any thread)

    def _send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        parent: dict[str, Any] | None,
        *,
        to: Client | None = None,
        buffers: list[Any] | None = None,
    ) -> None:
        msg = self.session.msg(msg_type, content, parent=parent or {})
        pack = self.session.pack
        parts = [pack(msg["header"]), pack(msg["parent_header"]), pack(msg["metadata"]), pack(msg["content"])]
        copies = [bytearray(buffer) for buffer in buffers or []]  # as they are now: the kernel may change them later
        with self._lock:
            if self.death is not None:
                return
            clients = [to] if to is not None else list(self._clients)
        for client in clients:
            client.post(channel, parts, copies)

    # The Publisher protocol of the comms and the shell (_fake_ipython), on the main thread.

    def parent(self) -> dict[str, Any]:
        job = self._running
        return job.msg if isinstance(job, _Request) else {}

    def publish(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None) -> None:
        self._send("iopub", msg_type, content, self.parent(), buffers=buffers)

    def reply(self, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None) -> None:
        job = self._running
        if isinstance(job, _Request):
            self._send("shell", msg_type, content, job.msg, to=job.origin, buffers=buffers)

    # ------------------------------------------------------------------ handlers

    def _kernel_info(self) -> dict[str, Any]:
        import platform

        from .. import __version__

        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "implementation": self.implementation,
            "implementation_version": __version__,
            "language_info": {
                "name": "python",
                "version": platform.python_version(),
                "mimetype": "text/x-python",
                "file_extension": ".py",
            },
            "banner": "kernelproxy's fake kernel (in-process)",
            "help_links": [],
        }

    def _kernel_info_request(self, request: _Request) -> None:
        self._send("shell", "kernel_info_reply", self._kernel_info(), request.msg, to=request.origin)

    def _execute_request(self, request: _Request) -> None:
        msg, content = request.msg, request.msg["content"]
        code, silent = content.get("code", ""), bool(content.get("silent", False))
        if id(request) in self._aborting:
            self._aborting.discard(id(request))
            reply: dict[str, Any] = {"status": "aborted", "execution_count": self.execution_count}
            self._send("shell", "execute_reply", reply, msg, to=request.origin)
            return
        if not silent:
            self.execution_count += 1
            self._send("iopub", "execute_input", {"code": code, "execution_count": self.execution_count}, msg)
        reply = {"status": "ok", "execution_count": self.execution_count, "user_expressions": {}, "payload": []}
        error = self._run_cell(code) if code.strip() else None
        if error is None:
            expressions = content.get("user_expressions") or {}
            reply["user_expressions"] = {key: self._expression(expr) for key, expr in expressions.items()}
        else:
            reply.update(error)
            self._send("iopub", "error", {key: error[key] for key in ("ename", "evalue", "traceback")}, msg)
            if not silent and content.get("stop_on_error", True):
                with self._queue.mutex:
                    self._aborting = {id(job) for job in self._queue.queue if isinstance(job, _Request)}
        fake_python.flush_routed()  # output goes out before the reply, as ipykernel flushes it
        self._send("shell", "execute_reply", reply, msg, to=request.origin)

    def _run_cell(self, code: str) -> dict[str, Any] | None:
        try:
            compiled = compile(code, f"<fake-cell-{self.execution_count}>", "exec")
            self.run_kernel_code(lambda: exec(compiled, self.python.user_ns))
        except KernelExit:
            raise
        except BaseException as exc:
            return format_error(exc)
        return None

    def _expression(self, expression: str) -> dict[str, Any]:
        try:  # IPython catches everything here, KeyboardInterrupt included
            return self.run_kernel_code(lambda: format_value(eval(expression, self.python.user_ns)))
        except KernelExit:
            raise
        except BaseException as exc:
            return format_error(exc)

    def _comm(self, request: _Request) -> None:
        handle = getattr(self.comms, request.msg["header"]["msg_type"])
        self.run_kernel_code(lambda: handle(request.msg))

    def _comm_info_request(self, request: _Request) -> None:
        target = request.msg["content"].get("target_name")
        reply = {"status": "ok", "comms": self.comms.info(target)}
        self._send("shell", "comm_info_reply", reply, request.msg, to=request.origin)

    def _shutdown(self, request: _Request) -> None:
        channel = "shell" if isinstance(self._running, _Request) and self._running is request else "control"
        restart = bool(request.msg["content"].get("restart", False))
        self._send(channel, "shutdown_reply", {"status": "ok", "restart": restart}, request.msg, to=request.origin)
        self._send("iopub", "status", {"execution_state": "idle"}, request.msg)
        self.die("the fake kernel was shut down (shutdown_request)", exit_code=0)


_SHELL_HANDLERS: dict[str, Callable[[FakeKernel, _Request], None]] = {
    "kernel_info_request": FakeKernel._kernel_info_request,
    "execute_request": FakeKernel._execute_request,
    "comm_open": FakeKernel._comm,
    "comm_msg": FakeKernel._comm,
    "comm_close": FakeKernel._comm,
    "comm_info_request": FakeKernel._comm_info_request,
    "shutdown_request": FakeKernel._shutdown,
}
