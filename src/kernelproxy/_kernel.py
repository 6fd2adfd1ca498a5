"""AsyncKernel: the one real implementation of the kernelproxy API.

An ``AsyncKernel`` is a view, (shared kernel state, call options), so that
``k.options(timeout=2)`` costs nothing and every view talks to one kernel.
The blocking ``Kernel`` in ``_sync.py`` drives this class from an IO thread.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import dataclasses
import enum
import functools
import logging
import os
import platform
import warnings
import weakref
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar, overload

from . import _protocol as protocol
from . import _serialization as serialization
from ._bootstrap import check_environment, install_agent
from ._connection import INTERRUPT_GRACE, KernelConnection, RequestLost
from ._control import KernelControl
from ._exceptions import (
    CallInterrupted,
    CallTimeout,
    KernelClosedError,
    KernelDiedError,
    KernelRestartedWarning,
    KernelStartError,
    ProtocolError,
    SubshellUnavailableError,
)
from ._output import Forwarder
from ._portal import forked_message
from ._refs import AsyncRemoteRef, Path, _Root, check_fresh, pickling_for
from ._tracebacks import local_tracebacks, trim, trimming
from ._transports.base import AgentMissingError, Message, SubshellMissingError, Transport
from ._transports.comm import CommTransport
from ._transports.execute import AGENT, ExecuteTransport
from ._transports.lane import LaneTransport
from ._types import UNSET, CallOptions, KernelInfo, KernelStatus, OnTimeout, Output, Unset
from ._wires.base import Wire

T = TypeVar("T")
if TYPE_CHECKING:
    from ._types import P
TRANSPORTS = ("auto", "lane", "comm", "execute")
log = logging.getLogger("kernelproxy")
RELEASE_TIMEOUT = 60.0  # seconds a batch of releases may wait behind other requests
RESTART_ATTEMPTS = 2  # a kernel that dies while restarting gets one more restart
REQUEST_ATTEMPTS = 5  # times a request is sent (again: its reply was lost, the kernel restarted) before it fails
# Requests of this host in the kernel at once, per shell; more wait here. A shell runs one at a time anyway,
# and 64 in flight hide the round trip. Unbounded, thousands of requests deadlock ipykernel 7: its
# shell-channel thread blocks handing requests to the busy main thread (a zmq pipe of 1,000) while the main
# thread blocks handing it replies. The bound also keeps the replies and IOPub messages our requests cause
# far below any socket's high-water mark. Per shell: requests queued for the main shell never hold up a
# subshell's, which runs beside it.
MAX_IN_FLIGHT = 64
# After a timeout's interrupt, the kernel must answer a kernel_info_request this soon to be called usable.
ANSWER_AFTER_INTERRUPT = 5.0
SUBSHELL_FEATURE = "kernel subshells"  # in kernel_info_reply's supported_features (JEP 91; ipykernel >= 7)
FOREIGN_RESTART = (
    "the kernel was restarted by someone else (another client, or whoever runs it) while this call was "
    "waiting; its namespace is empty now"
)


def check_transport_name(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, not {transport!r}")


class State(enum.Enum):
    READY = "ready"
    RESTARTING = "restarting"
    CLOSED = "closed"


class _KernelState:
    """Everything one kernel's views share: its process (if ours), connection, transport, info."""

    def __init__(
        self,
        make_wire: Callable[[], Wire],
        control: KernelControl,
        connection_file: str | None,
        transport: str,
        *,
        auto_restart: bool = False,
        ready_timeout: float = 60.0,
    ) -> None:
        check_transport_name(transport)
        self.make_wire = make_wire  # a fresh wire per connection (restarts reconnect)
        self.control = control
        self.connection_file = connection_file
        self.requested_transport = transport
        if auto_restart and not control.restartable:
            raise ValueError("auto_restart needs a kernel that kernelproxy starts; connect() cannot restart one")
        self.auto_restart = auto_restart
        self.ready_timeout = ready_timeout
        self.state = State.READY
        self.restarted = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.pid = os.getpid()  # a forked child must not act on this kernel: it is its parent's
        self.generation = 0  # counts restarts (ours and others'): refs from an older generation are stale
        self.sent_code = serialization.CodeSet()  # functions whose source this kernel has (for its tracebacks)
        self.sent_functions: set[str] = set()  # digests of the functions this kernel keeps (as far as we know)
        self._releases: collections.deque[tuple[int, int, str | None]] = collections.deque()
        self._release_task: asyncio.Future[Any] | None = None
        self.connection: KernelConnection = self._new_connection()
        self.transport: Transport | None = None
        self.transport_note = ""  # why transport="auto" did not get a lane, for info.transport
        self.info: KernelInfo | None = None
        self.agent_instance: str | None = None  # the agent's instance id: a new one means a new kernel process
        self.features: list[str] = []  # kernel_info_reply's supported_features
        self._hello: dict[str, Any] = {}
        self._check: asyncio.Future[None] | None = None  # a check of the kernel's incarnation, after a hint
        self._recheck = False  # a hint came during that check: check again
        self.opening = False  # connecting (a start or a restart of ours): hints are not someone else's restart
        self.subshell: Subshell | None = None  # kernelproxy's subshell, made on first use
        self._subshell_lock = asyncio.Lock()
        self._subshell_requests: set[str] = set()  # ids of the requests sent to it, not answered yet
        self.submitted: weakref.WeakKeyDictionary[Any, Submitted] = weakref.WeakKeyDictionary()  # future -> call
        self._in_flight: dict[str | None, asyncio.Semaphore] = {}  # per shell: MAX_IN_FLIGHT requests at once
        self._dropped: weakref.finalize[Any, Any] | None = None
        if control.owned:
            _started_kernels.add(self)

    def lease(self) -> _Lease:
        """The token every user-facing handle of this kernel holds: when the last is gone, the kernel is closed.

        The event loop holds this state (its connection's tasks and readers), so
        the state itself never becomes garbage; the lease does, like an unclosed file.
        """
        lease = _Lease()
        if self._dropped is None:
            self._dropped = weakref.finalize(lease, _close_dropped, self)
            self._dropped.atexit = False  # at exit, _kill_started_kernels stops what we started, silently
        return lease

    @property
    def owned(self) -> bool:
        """Started by kernelproxy (here or on a server): it goes when we close."""
        return self.control.owned

    def status(self) -> KernelStatus:
        dead = self.connection.dead
        if self.state is State.CLOSED:
            state: Literal["ready", "restarting", "dead", "closed"] = "closed"
        elif self.state is State.RESTARTING:
            state = "restarting"
        else:
            state = "dead" if dead is not None else "ready"
        return KernelStatus(state, self.generation, self.owned, str(dead) if dead is not None else None)

    def _new_connection(self) -> KernelConnection:
        connection = KernelConnection(
            self.make_wire(),
            process_check=self.control.process_check(),  # None: no local process, the wire reports deaths
            interrupter=lambda: self.control.interrupt(connection),
        )
        connection.on_hint = self._on_hint
        connection.on_stall = self._on_hint  # not a hint from outside: our own requests went unheard
        return connection

    async def open(self, ready_timeout: float) -> None:
        """Connect, wait for the kernel, install the agent, check versions, pick the transport."""
        self.opening = True  # hints from the kernel's start are not someone else's restart
        self.subshell = None
        try:
            await self._open(ready_timeout)
        finally:
            self.opening = False

    async def _open(self, ready_timeout: float) -> None:
        self._drop_transport()  # reopening after a restart: the old transport's kernel is gone
        await self.connection.open()
        kernel_info = await self.connection.wait_ready(ready_timeout)
        hello = await install_agent(self.connection)
        check_environment(hello)
        transport = await self._negotiate_transport(hello)
        self.transport = transport
        self.agent_instance = hello.get("instance")
        self.features = list(kernel_info.get("supported_features") or [])
        self._hello = hello
        self.info = KernelInfo(
            implementation=kernel_info.get("implementation", "?"),
            implementation_version=kernel_info.get("implementation_version", "?"),
            python=hello["python"],
            cloudpickle=hello["cloudpickle"],
            pid=hello["pid"],
            executable=hello["executable"],
            hostname=hello["hostname"],
            transport=transport.description + self.connection.wire.description + self.transport_note,
            connection_file=self.connection_file,
            agent_protocol=hello["protocol"],
            server=self.control.server,
            kernel_id=self.control.kernel_id,
            agent_revision=hello.get("revision", 0),
        )

    def _drop_transport(self) -> None:
        """Forget the transport to a kernel process that is gone (what it holds here is released)."""
        if self.transport is not None:
            self.transport.discard()
            self.transport = None

    async def _negotiate_transport(self, hello: dict[str, Any]) -> Transport:
        """The lane for local ipykernels we started (or when asked), else comm where possible, else execute."""
        requested = self.requested_transport
        self.transport_note = ""
        directory = self.control.lane_directory
        if requested == "lane" or (requested == "auto" and directory is not None):
            try:
                if not hello.get("comms"):
                    raise ProtocolError("the kernel is not an ipykernel")
                if hello.get("hostname") != platform.node():
                    raise ProtocolError(f"the kernel runs on another machine ({hello.get('hostname')})")
                return await LaneTransport.open(self.connection, directory)
            except ProtocolError as exc:
                if requested == "lane":
                    raise ProtocolError(f"transport='lane' is not possible with this kernel: {exc}") from exc
                log.info("lane unavailable (%s); using the Jupyter channels", exc)
                self.transport_note = f"; no lane: {exc}"
        if requested in ("auto", "comm"):
            try:
                if not hello.get("comms"):
                    raise ProtocolError("the kernel has no comm manager (not an ipykernel?)")
                return await CommTransport.open(self.connection)
            except ProtocolError as exc:
                if requested == "comm":
                    raise ProtocolError(f"transport='comm' is not possible with this kernel: {exc}") from exc
                log.info("comm transport unavailable (%s); using the execute transport", exc)
        return ExecuteTransport(self.connection, content_frames=bool(hello.get("parent_access")))

    async def usable_transport(self, subshell: bool = False) -> Transport:
        """The transport (kernelproxy's subshell's with ``subshell``), once the kernel can take requests.

        Raises why it cannot.
        """
        while self.state is State.RESTARTING:
            await self.restarted.wait()
        if self.state is State.CLOSED:
            raise KernelClosedError("this kernel was shut down; start a new one with kernelproxy.start()")
        if await self.connection.check_process():  # do not send into a kernel the monitor has not buried yet
            cause = self.connection.dead
            if self.auto_restart:
                if await self.restart(self.ready_timeout, only_if_dead=True):
                    warnings.warn(
                        f"the kernel died ({cause}); auto_restart started a fresh one, with an empty namespace",
                        KernelRestartedWarning,
                        stacklevel=2,
                    )
                return await self.usable_transport(subshell)
            raise KernelDiedError(f"{cause} earlier; {self.control.advice(self.connection)}")
        assert self.transport is not None
        if subshell:
            return (await self._subshell()).transport
        return self.transport

    async def request(
        self,
        header: protocol.Header,
        frames: list[Any],
        listener: Callable[[dict[str, Any]], None] | None,
        outcome: protocol.Outcome | None = None,
        *,
        subshell: bool = False,
        functions: list[serialization.FunctionRef] | tuple[()] = (),
    ) -> Message:
        """Send one request to the agent (on kernelproxy's subshell with ``subshell``); return its reply.

        ``functions``: the FunctionRefs its frames name; those the kernel may not
        have yet travel with it (``define``), and again if it says it lacks one.

        The request has an id: when its reply is lost (a server connection that
        dropped) or the kernel dropped it (someone restarted the kernel: our comm
        is gone there), it is sent again, and the agent never runs one id twice.
        A restart by someone else is noticed here at the latest: the agent is
        installed again, refs made before are stale, the request runs.
        """
        rid = protocol.request_id()
        if subshell:
            self._subshell_requests.add(rid)
        try:
            return await self._send(rid, header, frames, listener, outcome, subshell, functions)
        finally:
            self._subshell_requests.discard(rid)  # (a resend under a new id discards its own)

    async def _send(
        self,
        rid: str,
        header: protocol.Header,
        frames: list[Any],
        listener: Callable[[dict[str, Any]], None] | None,
        outcome: protocol.Outcome | None,
        subshell: bool,
        functions: list[serialization.FunctionRef] | tuple[()] = (),
    ) -> Message:
        same_instance_losses = 0
        error: BaseException | None = None
        for _ in range(REQUEST_ATTEMPTS):
            if self._check is not None and not self._check.done() and not subshell:
                await asyncio.shield(self._check)  # a restart is suspected: learn the answer before sending
            transport = await self.usable_transport(subshell)
            interrupter = functools.partial(self.cancel_on_subshell, rid) if subshell else None
            slots = self._in_flight.get(transport.shell)
            if slots is None:
                slots = self._in_flight[transport.shell] = asyncio.Semaphore(MAX_IN_FLIGHT)
            try:
                async with slots:
                    # Decided once a slot is ours: a function defined by a request ahead is not sent again.
                    defines = [ref for ref in functions if ref.digest not in self.sent_functions]
                    sent_header: Any = {**header, "define": [ref.digest for ref in defines]} if defines else header
                    sent_frames = [ref.payload for ref in defines] + frames if defines else frames
                    message = await transport.request(
                        sent_header, sent_frames, listener=listener, outcome=outcome, rid=rid, interrupter=interrupter
                    )
            except AgentMissingError as exc:  # the kernel was restarted behind our back: the request never ran
                error = exc
                await self.check_incarnation(transport.shell)  # on the request's own shell: main may be busy
                continue
            except SubshellMissingError as exc:  # restarted, or someone deleted our subshell: it never ran
                error = exc
                self.subshell = None  # a new one is made, and the kernel's incarnation checked on it
                continue
            except RequestLost as exc:
                error = exc
                if exc.check and not await self.check_incarnation(transport.shell):
                    same_instance_losses += 1
                    if same_instance_losses >= 2:  # the kernel is the same, but it drops our comm's messages
                        await self._reopen(transport)
                continue
            reply, _ = message
            instance = reply.get("agent")
            if instance is not None and instance != self.agent_instance:  # it ran in a new kernel process
                await self.check_incarnation(transport.shell)
            kind = reply.get("kind")
            if kind == "undefined":  # evicted, or lost in a restart: nothing ran; send it again, defined
                self.sent_functions.difference_update(reply.get("undefined") or ())
                error = ProtocolError(f"the kernel lacks functions {reply.get('undefined')}")
                if subshell:
                    self._subshell_requests.discard(rid)
                rid = protocol.request_id()  # a new request: the agent remembers that it answered this id
                if subshell:
                    self._subshell_requests.add(rid)
                continue
            if kind not in ("protocol", "deserialize", "lost"):  # else the definitions may not have run
                self.sent_functions.update(ref.digest for ref in defines)
            return message
        raise ProtocolError(f"kernelproxy's request got no answer after {REQUEST_ATTEMPTS} attempts: {error}")

    # ------------------------------------------------------------------ someone else restarts the kernel

    def _on_hint(self, why: str) -> None:
        """Something suggests the kernel was restarted (by someone else): check it in the background."""
        if self.state is not State.READY or self.opening:
            return  # our own start or restart
        log.debug("kernelproxy checks whether the kernel was restarted: %s", why)
        self._recheck = True
        if self._check is None or self._check.done():
            self._check = asyncio.ensure_future(self._check_while_hinted())

    async def _check_while_hinted(self) -> None:
        while self._recheck and self.state is State.READY and self.connection.dead is None:
            self._recheck = False
            try:
                await self.check_incarnation()
            except Exception as exc:  # a dead or closed kernel says so to the next call
                log.debug("checking the kernel's incarnation failed: %r", exc)
                return

    async def check_incarnation(self, shell: str | None = None) -> bool:
        """Ask the agent who it is (installing it where the kernel lost it); adopt a new kernel process.

        Says whether the kernel is a new process since kernelproxy last looked.
        """
        for attempt in range(REQUEST_ATTEMPTS):
            before = self.connection.sent + 1  # the hello's own number: requests sent earlier went to the old one
            try:
                hello = await install_agent(self.connection, shell=shell)
                break
            except RequestLost:  # its reply was lost (a server connection dropped): installing is idempotent
                if attempt == REQUEST_ATTEMPTS - 1:
                    raise
        if hello.get("instance") == self.agent_instance:
            return False
        await self._adopt(hello, before)
        return True

    async def _adopt(self, hello: dict[str, Any], before: int) -> None:
        """The kernel is a new process (someone restarted it): refs are stale, our comm and subshell are gone."""
        if hello.get("instance") == self.agent_instance:
            return  # a concurrent check adopted it already
        log.info("the kernel was restarted by someone else; kernelproxy reinstalled its agent")
        self.agent_instance = hello.get("instance")
        self.generation += 1
        self.sent_code.clear()
        self.sent_functions.clear()
        self._hello = hello
        self.subshell = None
        self.connection.restarted(before, KernelDiedError(FOREIGN_RESTART))
        check_environment(hello)
        self._drop_transport()
        self.transport = await self._negotiate_transport(hello)
        if self.info is not None:
            self.info = dataclasses.replace(
                self.info,
                python=hello["python"],
                cloudpickle=hello["cloudpickle"],
                pid=hello["pid"],
                executable=hello["executable"],
                hostname=hello["hostname"],
                transport=self.transport.description + self.connection.wire.description + self.transport_note,
                agent_revision=hello.get("revision", 0),
            )

    async def _reopen(self, transport: Transport) -> None:
        """The agent is the same but does not answer on our comm (someone closed it): open another."""
        if transport.shell is not None:
            self.subshell = None
        elif transport is self.transport:
            self._drop_transport()
            self.transport = await self._negotiate_transport(self._hello)

    # ------------------------------------------------------------------ subshells

    def check_subshells(self) -> None:
        """Raise SubshellUnavailableError if the kernel has no subshells (known once it answered)."""
        if self.info is not None and SUBSHELL_FEATURE not in self.features:
            info = self.info
            raise SubshellUnavailableError(
                f"this kernel ({info.implementation} {info.implementation_version}) has no subshells: its "
                f"kernel_info_reply does not list {SUBSHELL_FEATURE!r} in supported_features (JEP 91; "
                "ipykernel 7 and later have them). Calls into a busy kernel need them; use the main shell "
                "(subshell=False), which runs calls after the kernel's current work"
            )

    async def _subshell(self) -> Subshell:
        """kernelproxy's subshell (made on first use: a thread in the kernel, and a transport to it)."""
        self.check_subshells()
        async with self._subshell_lock:
            if self.subshell is None:
                shell = await self._create_subshell()
                # Who is there, asked on the new subshell (the main shell may be busy): a kernel restarted since
                # is adopted (our agent installed) before a comm is opened on it.
                await self.check_incarnation(shell)
                if isinstance(self.transport, CommTransport):
                    transport: Transport = await CommTransport.open(self.connection, shell=shell)
                else:
                    transport = ExecuteTransport(
                        self.connection, content_frames=bool(self._hello.get("parent_access")), shell=shell
                    )
                self.subshell = Subshell(shell, transport)
            return self.subshell

    async def _create_subshell(self) -> str:
        reply = await asyncio.wait_for(self.connection.request("control", "create_subshell_request", {}), 30)
        content = reply["content"]
        if content.get("status") != "ok" or not isinstance(content.get("subshell_id"), str):
            raise SubshellUnavailableError(f"the kernel did not create a subshell: {content!r:.200}")
        return str(content["subshell_id"])

    async def _delete_subshells(self, subshell: Subshell) -> None:
        for shell in (subshell.id, subshell.canceller.shell if subshell.canceller is not None else None):
            if shell is not None and self.connection.dead is None:
                try:
                    request = self.connection.request("control", "delete_subshell_request", {"subshell_id": shell})
                    await asyncio.wait_for(request, 5)
                except Exception as exc:  # the kernel is gone or busy on control: nothing to clean up then
                    log.debug("deleting kernelproxy's subshell %s failed: %r", shell, exc)

    async def interrupt_subshell(self) -> None:
        """Stop every request of ours running on our subshell (their calls raise CallInterrupted)."""
        await self.usable_transport()
        for rid in list(self._subshell_requests):
            await self.cancel_on_subshell(rid)

    async def cancel_on_subshell(self, rid: str) -> None:
        """Stop a request running on our subshell: an exception raised in its thread, never SIGINT (which would
        hit the main thread: someone's cell). Runs on a second subshell, since ours is busy with the request."""
        subshell = self.subshell
        if subshell is None:
            return
        if subshell.canceller is None:
            shell = await self._create_subshell()
            subshell.canceller = ExecuteTransport(self.connection, content_frames=False, shell=shell)
        payload = await subshell.canceller.expression(f"{AGENT}.cancel({rid!r})")
        if isinstance(payload, dict) and not payload.get("cancelled"):
            log.debug("cancelling request %s on the subshell: %s", rid, payload.get("reason"))

    async def restart(self, ready_timeout: float, *, only_if_dead: bool = False) -> bool:
        """Restart the kernel; with ``only_if_dead``, only if no one restarted it meanwhile. Say if it did."""
        if not self.control.restartable:
            await self.control.restart(self.connection)  # raises: says why it cannot
        while self.state is State.RESTARTING:
            await self.restarted.wait()
        if self.state is State.CLOSED:
            raise KernelClosedError("this kernel was shut down; start a new one with kernelproxy.start()")
        if only_if_dead and self.connection.dead is None:
            return False
        self.state = State.RESTARTING
        self.restarted.clear()
        try:
            self.connection.fail_all(KernelDiedError("the kernel was restarted while this call was running"))
            for attempt in range(RESTART_ATTEMPTS):
                await self.connection.close()
                try:
                    await self.control.restart(self.connection)
                except Exception as exc:
                    raise KernelStartError(f"could not restart the kernel: {exc}") from exc
                self.generation += 1
                self.sent_code.clear()
                self.sent_functions.clear()
                self.connection = self._new_connection()
                try:
                    await self.open(ready_timeout)
                    break
                except KernelDiedError:  # died while starting (a server may have restarted it again): once more
                    if attempt == RESTART_ATTEMPTS - 1:
                        raise
            self.state = State.READY
            return True
        except BaseException:
            self.state = State.READY  # calls now report the dead connection instead of waiting
            raise
        finally:
            self.restarted.set()

    def foreign(self) -> bool:
        """Whether the running event loop is not this kernel's; raise KernelClosedError in a forked child."""
        if self.pid != os.getpid():
            raise KernelClosedError(forked_message())
        return asyncio.get_running_loop() is not self.loop

    async def hop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this kernel's event loop (it runs in another thread) and wait for it here.

        Cancelling the wait cancels ``coro`` there, which interrupts its remote work.
        """
        loop = self.loop
        if loop.is_closed() or not loop.is_running():
            coro.close()
            raise RuntimeError(
                "this AsyncKernel belongs to an event loop that is no longer running (the one that was "
                "running when it was started or connected): use it in that loop, or start a new one here"
            )
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def release_later(self, object_id: int, generation: int, instance: str | None) -> None:
        """Queue a kept object's release (called by finalizers, from any thread: no I/O here)."""
        if self.pid != os.getpid():
            return  # a forked child's copy: the parent releases its own objects
        self._releases.append((object_id, generation, instance))
        try:
            self.loop.call_soon_threadsafe(self._schedule_release)
        except RuntimeError:
            pass  # the loop is closed: the kernel is gone or going

    def _schedule_release(self) -> None:
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.ensure_future(self._flush_releases())

    async def _flush_releases(self) -> None:
        """Send the queued releases, a batch per request, until none are left."""
        await asyncio.sleep(0)  # let finalizers of one collection queue together
        while self._releases:  # releases queued during a request go in the next batch
            batches: dict[str | None, list[int]] = {}
            while self._releases:
                object_id, generation, instance = self._releases.popleft()
                if generation == self.generation:
                    batches.setdefault(instance, []).append(object_id)
            if not batches or self.state is not State.READY or self.connection.dead is not None:
                continue
            for instance, ids in batches.items():  # the agent ignores ids of another instance: never others' objects
                try:
                    await asyncio.wait_for(
                        self.request(protocol.release(ids, agent=instance), [], None), RELEASE_TIMEOUT
                    )
                except Exception as exc:  # the kernel went away (its objects with it) or is busy for long
                    log.debug("releasing kept objects failed: %r", exc)

    async def interrupt(self) -> None:
        transport = await self.usable_transport()
        if isinstance(transport, LaneTransport):
            transport.aim_interrupt_at_any()
        await self.control.interrupt(self.connection)

    async def interrupt_submitted(self, call: Submitted) -> bool:
        """Stop one call started by submit(): abandon its request (which interrupts its remote work, on the
        main shell or our subshell, once it runs); it raises CallInterrupted. Says if it was still going."""
        task = call.task() if call.task is not None else None
        if task is not None and task.done():
            return False
        call.interrupted = True
        if task is None:  # not started yet: it raises CallInterrupted as it starts
            return True
        task.cancel()
        await asyncio.wait({task}, timeout=INTERRUPT_GRACE + 5)
        return True

    async def is_alive(self) -> bool:
        if self.state is State.CLOSED:
            return False
        # A kernel we started is checked now; others by the heartbeat monitor, which declares a silent one dead.
        return not await self.connection.check_process()

    async def close(self, shutdown: bool) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        _started_kernels.discard(self)
        if self._dropped is not None:
            self._dropped.detach()
        self.connection.fail_all(KernelClosedError("the kernel was shut down while this call was running"))
        try:
            if self.subshell is not None and not (self.owned or shutdown):
                await self._delete_subshells(self.subshell)  # a kernel that lives on: leave no threads behind
            if self.transport is not None:
                await self.transport.close()
            if self.owned or shutdown:
                await self.control.shutdown(self.connection)
        finally:
            await self.connection.close()
            await self.control.release()

    def kill_now(self) -> None:
        """Stop our kernel without an event loop (interpreter exit)."""
        self.control.kill_now()


class Submitted:
    """A call started by ``submit()``, which ``interrupt(future)`` can stop."""

    __slots__ = ("interrupted", "task", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.task: weakref.ref[asyncio.Task[Any]] | None = None  # weak: the task holds this, not the reverse
        self.interrupted = False

    def error(self) -> CallInterrupted:
        return CallInterrupted(f"the {self.what} was interrupted (interrupt(future)); its remote work was stopped")


async def run_submitted(call: Submitted, coro: Coroutine[Any, Any, T]) -> T:
    """Run a submitted call; interrupted, it raises CallInterrupted (not CancelledError)."""
    task = asyncio.current_task()
    call.task = weakref.ref(task) if task is not None else None
    if call.interrupted:
        coro.close()
        raise call.error()
    __tracebackhide__ = True  # noqa: F841
    try:
        return await coro  # kernelproxy re-raises (Python < 3.11 shows this line)
    except asyncio.CancelledError:
        if call.interrupted:
            raise call.error() from None
        raise
    except Exception as exc:
        trim(exc)
        raise


@dataclasses.dataclass(eq=False)
class Subshell:
    """kernelproxy's subshell in the kernel: its id, the transport to it, and one more to cancel its work."""

    id: str
    transport: Transport
    canceller: ExecuteTransport | None = None


class _Lease:
    """Held by every view of one kernel (AsyncKernel, Kernel, RemoteRef): see ``_KernelState.lease``."""

    __slots__ = ("__weakref__",)


def _close_dropped(state: _KernelState) -> None:
    """The last handle of a kernel that was never closed is gone: warn, as for an unclosed file, and close it.

    Runs wherever garbage is collected (any thread), so it only schedules the close on the kernel's loop.
    """
    if state.state is State.CLOSED or state.pid != os.getpid():
        return  # closed meanwhile, or a forked child's copy of its parent's kernel
    what = "kernel kernelproxy started" if state.owned else "connection to a kernel"
    action = "shut it down" if state.owned else "disconnected (the kernel keeps running)"
    warnings.warn(
        f"unclosed {what} (pid {state.info.pid if state.info else '?'}): kernelproxy {action}; "
        "call close() or shutdown(), or use it in a `with` block",
        ResourceWarning,
        stacklevel=2,
    )

    def close() -> None:
        task = asyncio.ensure_future(state.close(shutdown=False))
        task.add_done_callback(_log_failure)

    try:
        state.loop.call_soon_threadsafe(close)
    except RuntimeError:  # its event loop is closed: stop what we started without it
        if state.owned:
            state.kill_now()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a dropped kernel failed: %r", task.exception())


_started_kernels: weakref.WeakSet[_KernelState] = weakref.WeakSet()


@atexit.register
def _kill_started_kernels() -> None:
    """No kernel we started outlives this process, even if nobody called shutdown()."""
    for state in list(_started_kernels):
        if state.pid != os.getpid():
            continue  # a forked child exiting: these are its parent's kernels
        try:
            state.kill_now()
        except Exception:
            pass


@local_tracebacks  # errors re-raised from the kernel go from the caller's line to the remote frames
class AsyncKernel:
    """A Jupyter kernel used as a remote Python, for asyncio code.

    Get one with ``await kernelproxy.start_async()`` or ``connect_async()``.
    Every method is a coroutine except ``submit``, ``remote`` and ``options``.
    """

    def __init__(self, state: _KernelState, options: CallOptions, lease: _Lease | None = None) -> None:
        self._state = state
        self._options = options
        self._lease = state.lease() if lease is None else lease  # shared by views: the kernel closes when all go

    # ------------------------------------------------------------------ views and info

    def options(
        self,
        *,
        timeout: float | None | Unset = UNSET,
        output: Output | Unset = UNSET,
        on_timeout: OnTimeout | Unset = UNSET,
        subshell: bool | Unset = UNSET,
    ) -> AsyncKernel:
        """A view of the same kernel whose calls use other options (see ``CallOptions``).

        ``subshell=True``: calls run on kernelproxy's subshell, while the kernel's main
        shell is busy (SubshellUnavailableError if the kernel has no subshells).
        """
        options = self._options
        if not isinstance(timeout, Unset):
            options = dataclasses.replace(options, timeout=timeout)
        if not isinstance(output, Unset):
            options = dataclasses.replace(options, output=output)
        if not isinstance(on_timeout, Unset):
            options = dataclasses.replace(options, on_timeout=on_timeout)
        if not isinstance(subshell, Unset):
            options = dataclasses.replace(options, subshell=subshell)
            if subshell:
                self._state.check_subshells()
        return AsyncKernel(self._state, options, self._lease)

    @property
    def call_options(self) -> CallOptions:
        """This view's call options: ``timeout``, ``output``, ``on_timeout``, ``subshell``."""
        return self._options

    @property
    def status(self) -> KernelStatus:
        """Whether the kernel is ready, restarting, dead or closed, as far as kernelproxy knows now."""
        return self._state.status()

    @property
    def info(self) -> KernelInfo:
        """Kernel implementation and version, Python, cloudpickle, pid, transport."""
        if self._state.info is None:
            raise KernelClosedError("this kernel has no info: it never became ready")
        return self._state.info

    def __repr__(self) -> str:
        info = self._state.info
        where = f"pid {info.pid} on {info.hostname}" if info else "not ready"
        return f"<{type(self).__name__} {where}, {self._state.state.value}>"

    # ------------------------------------------------------------------ calls

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in the kernel and return its result.

        Every keyword goes to ``fn``, so the timeout is the view's call option: ``ak.options(timeout=5).call(fn)``.

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
        _, out = await self._call(fn, args, kwargs, keep=False)
        result: T = serialization.loads(out, what=f"the result of {_name(fn)}")
        return result

    async def call_ref(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> AsyncRemoteRef:
        """Run ``fn(*args, **kwargs)`` in the kernel and keep the result there: return a ref to it.

        The timeout is the view's call option, as for ``call()``: ``ak.options(timeout=5).call_ref(fn)``.

        Raises:
            Exception: what ``fn`` raised, as its own type (``RemoteError`` if it cannot be re-raised here).
            CallTimeout: the call outlived its timeout; the kernel was interrupted (see ``call()``).
            CallInterrupted: ``interrupt()`` stopped the remote work.
            SerializationError: ``fn`` or an argument could not be pickled or unpickled.
            KernelDiedError: the kernel died before or during the call.
            KernelClosedError: the kernel was shut down or closed.
        """
        return AsyncRemoteRef(self, await self._call_keep(fn, args, kwargs))

    async def _call_keep(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Root:
        reply, _ = await self._call(fn, args, kwargs, keep=True)
        return _Root(self._state, reply["ref"])

    async def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], keep: bool) -> Message:
        sent_fn, functions = serialization.function_refs(fn)  # a function by value: its pickle once per kernel
        with pickling_for(self._state):
            frames = serialization.dumps_call(fn, args, kwargs, sent_fn=sent_fn, sent_code=self._state.sent_code)
        header = protocol.call(keep=keep)
        try:
            return await self._request(
                header, frames, self._options.timeout, f"call of {_name(fn)}", functions=functions
            )
        except TypeError as exc:
            _note_call_options_in(exc, fn, kwargs, "call_ref" if keep else "call")
            raise

    async def ref(self, name: str, *, timeout: float | None = None) -> AsyncRemoteRef:
        """A ref to the object a kernel variable names now (KeyError if there is none)."""
        return AsyncRemoteRef(self, await self._name_keep(name, timeout))

    async def _name_keep(self, name: str, timeout: float | None) -> _Root:
        _check_names((name,))
        reply, _ = await self._request(protocol.ref_name(name), [], timeout, f"ref({name!r})")
        return _Root(self._state, reply["ref"])

    async def _ref_value(self, root: _Root, path: Path) -> Any:
        """The value at a ref's path, in one round trip."""
        _, out = await self._ref_eval(root, path, keep=False)
        return serialization.loads(out, what=f"the value of RemoteRef #{root.id}")

    async def _ref_keep(self, root: _Root, path: Path) -> _Root:
        """Keep the object at a ref's path in the kernel, in one round trip."""
        reply, _ = await self._ref_eval(root, path, keep=True)
        return _Root(self._state, reply["ref"])

    async def _ref_eval(self, root: _Root, path: Path, keep: bool) -> Message:
        check_fresh(root)
        with pickling_for(self._state):
            parts = {"the ref's arguments": path}
            frames = serialization.dumps(path, parts=parts, sent_code=self._state.sent_code) if path else []
        header = protocol.ref_eval(root.id, keep=keep, agent=root.instance)
        return await self._request(header, frames, self._options.timeout, f"RemoteRef #{root.id}")

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Task[T]:
        """Start ``call(fn, *args, **kwargs)`` as an asyncio task and return it.

        Awaiting the task raises what ``call()`` raises: ``fn``'s own exception, ``CallTimeout`` after the
        view's timeout call option (``ak.options(timeout=5).submit(fn)``), ``SerializationError``,
        ``KernelDiedError``... Cancelling the task interrupts the remote work; ``await ak.interrupt(task)``
        does too, and the task raises CallInterrupted.
        """
        call = Submitted(f"call of {_name(fn)}")
        task = asyncio.ensure_future(run_submitted(call, self.call(fn, *args, **kwargs)))
        self._state.submitted[task] = call
        return task

    def remote(self, fn: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorator: calling the result runs ``fn`` in the kernel (a coroutine here, with ``fn``'s parameters)."""

        @functools.wraps(fn)
        async def run_remotely(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return trimming(run_remotely)

    async def push(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Set variables in the kernel's namespace: ``push(df=frame)`` or ``push({"df": frame})``.

        Every keyword is a variable, so the timeout is the view's call option: ``ak.options(timeout=5).push(...)``.

        Raises:
            ValueError: a name is not a Python identifier.
            SerializationError: a value could not be pickled (the message names it); nothing was sent.
            CallTimeout: the push outlived its timeout; the kernel was interrupted (see ``call()``).
            KernelDiedError: the kernel died before or during the push.
            KernelClosedError: the kernel was shut down or closed.
        """
        merged = {**(values or {}), **named}
        if not all(isinstance(name, str) and name.isidentifier() for name in merged):
            bad = [name for name in merged if not (isinstance(name, str) and name.isidentifier())]
            raise ValueError(f"push() needs variable names that are identifiers, got {bad!r}")
        if not merged:
            return
        with pickling_for(self._state):
            frames = serialization.dumps(merged, parts=merged, sent_code=self._state.sent_code)
        await self._request(protocol.push(), frames, self._options.timeout, f"push of {', '.join(merged)}")

    async def pull(self, *names: str, timeout: float | None = None) -> Any:
        """Values of variables in the kernel: one name gives its value, several a tuple.

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
        if not names:
            raise TypeError("pull() needs at least one variable name")
        _check_names(names)
        _, out = await self._request(protocol.pull(list(names)), [], timeout, f"pull of {', '.join(names)}")
        values = serialization.loads(out, what=f"the value of {', '.join(names)}")
        return values[0] if len(names) == 1 else values

    async def exec(self, code: str, *, timeout: float | None = None) -> None:
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
        await self._request(protocol.exec_(code), [], timeout, "exec()")

    async def eval(self, expression: str, *, timeout: float | None = None) -> Any:
        """Evaluate a Python expression in the kernel's user namespace and return its value.

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
        _, out = await self._request(protocol.eval_(expression), [], timeout, "eval()")
        return serialization.loads(out, what=f"the value of {expression!r}")

    async def delete(self, *names: str, timeout: float | None = None) -> None:
        """Delete variables from the kernel's namespace (KeyError if one is missing)."""
        _check_names(names)
        await self._request(protocol.delete(list(names)), [], timeout, "delete()")

    async def contains(self, name: str, *, timeout: float | None = None) -> bool:
        """Whether the kernel's namespace has a variable ``name``."""
        _check_names((name,))
        header, _ = await self._request(protocol.contains(name), [], timeout, "contains()")
        return bool(header["result"])

    async def _call_frames(
        self,
        frames: list[Any],
        what: str,
        timeout: float | None,
        listener: Callable[[dict[str, Any]], None] | None,
        outcome: protocol.Outcome | None = None,
        functions: list[serialization.FunctionRef] | tuple[()] = (),
    ) -> Any:
        """Run a call pickled beforehand (frames of ``(fn, args, kwargs)``); IOPub output goes to ``listener``.

        For KernelPool, which pickles on the caller's thread and labels each task's output; ``outcome``
        tells it whether the call started before its kernel died; ``functions`` are the FunctionRefs
        the frames name.
        """
        _, out = await self._request(
            protocol.call(), frames, timeout, f"call of {what}", listener, outcome, functions=functions
        )
        return serialization.loads(out, what=f"the result of {what}")

    async def _push_frames(self, frames: list[Any], names: list[str]) -> None:
        """Push values pickled beforehand (frames of ``{name: value}``): KernelPool pickles once for all kernels."""
        await self._request(protocol.push(), frames, self._options.timeout, f"push of {', '.join(names)}")

    async def _request(
        self,
        header: protocol.Header,
        frames: list[Any],
        timeout: float | None,
        what: str,
        listener: Callable[[dict[str, Any]], None] | None | Unset = UNSET,
        outcome: protocol.Outcome | None = None,
        *,
        functions: list[serialization.FunctionRef] | tuple[()] = (),
    ) -> Message:
        if isinstance(listener, Unset):
            listener = Forwarder() if self._options.output == "forward" else None  # to where the caller's output goes
        if self._state.foreign():  # awaited in another event loop: run it on the kernel's own
            return await self._state.hop(self._request(header, frames, timeout, what, listener, outcome))
        timeout = self._options.timeout if timeout is None else timeout
        outcome = outcome if outcome is not None else protocol.Outcome()
        outcome.subshell = self._options.subshell
        request = self._state.request(
            header, frames, listener, outcome, subshell=self._options.subshell, functions=functions
        )
        try:
            reply, out = await (asyncio.wait_for(request, timeout) if timeout is not None else request)
        except asyncio.TimeoutError as exc:
            aftermath = await self._after_timeout(outcome)
            raise CallTimeout(f"{what} did not finish within {timeout} s; {aftermath}") from exc
        if reply.get("status") == "ok":
            return reply, out
        raise protocol.reply_error(reply, out, what, serialization.loads)

    async def _after_timeout(self, outcome: protocol.Outcome) -> str:
        """Escalate after a timed-out call (its request was already interrupted); say what happened."""
        connection = self._state.connection
        if (
            outcome.interrupt is protocol.Interrupt.ANSWERED
            and outcome.died is None
            and not self._options.subshell
            and not await connection.answers(ANSWER_AFTER_INTERRUPT)
        ):
            outcome.unanswered_after = ANSWER_AFTER_INTERRUPT  # "usable" would be untrue
        if outcome.died is None and connection.dead is not None:
            outcome.died = connection.dead  # e.g. the interrupt ended the kernel (xeus-python)
        stuck = outcome.interrupt is protocol.Interrupt.IGNORED or outcome.unanswered_after is not None
        if (
            stuck
            and outcome.died is None
            and self._options.on_timeout == "restart"
            and self._state.owned
            and not self._options.subshell  # a restart would end someone's cell on the main shell
        ):
            await self._state.restart(self._state.ready_timeout)
            how = "stopped answering after the interrupt" if outcome.unanswered_after else "ignored the interrupt"
            return f"the kernel {how}, so it was restarted (on_timeout='restart'): its namespace is empty"
        return outcome.describe()

    # ------------------------------------------------------------------ lifecycle

    @overload
    async def interrupt(self) -> None: ...

    @overload
    async def interrupt(self, future: asyncio.Future[Any]) -> bool: ...

    async def interrupt(self, future: asyncio.Future[Any] | None = None) -> bool | None:
        """Interrupt what the kernel is running (the running call raises CallInterrupted).

        On a subshell view, stop what kernelproxy runs on its subshell instead (the main shell is left alone).
        With ``future`` (a task ``submit()`` returned): stop that call only; it raises CallInterrupted
        (interrupted in the kernel if it runs, or as it starts if queued there). Returns False if it had finished.
        """
        if future is not None:
            call = self._state.submitted.get(future)
            if call is None:
                raise ValueError("interrupt(future) takes a future that this kernel's submit() returned")
            return await self._state.interrupt_submitted(call)  # on the loop that runs the task
        if self._state.foreign():
            return await self._state.hop(self.interrupt())
        if self._options.subshell:
            await self._state.interrupt_subshell()
        else:
            await self._state.interrupt()
        return None

    async def restart(self, *, timeout: float = 60) -> None:
        """Restart the kernel (one kernelproxy started, or one on a server): its namespace is emptied."""
        if self._state.foreign():
            return await self._state.hop(self.restart(timeout=timeout))
        await self._state.restart(timeout)

    async def is_alive(self) -> bool:
        """Whether the kernel is running and answering."""
        if self._state.foreign():
            return await self._state.hop(self.is_alive())
        return await self._state.is_alive()

    async def shutdown(self) -> None:
        """Stop the kernel (also one connected to) and disconnect. Idempotent."""
        if self._state.foreign():
            return await self._state.hop(self.shutdown())
        await self._state.close(shutdown=True)

    async def close(self) -> None:
        """Disconnect; a kernel kernelproxy started is shut down, a connected-to one is left running.

        In a forked child, closing an inherited AsyncKernel does nothing: the kernel is the parent's.
        """
        if self._state.pid != os.getpid():
            return
        if self._state.foreign():
            return await self._state.hop(self.close())
        await self._state.close(shutdown=False)

    async def __aenter__(self) -> AsyncKernel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# ---------------------------------------------------------------------- helpers


def _check_names(names: tuple[Any, ...]) -> None:
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"variable names must be strings, got {bad!r}")


CALL_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(CallOptions))


def _note_call_options_in(exc: TypeError, fn: Any, kwargs: Mapping[str, Any], method: str) -> None:
    """If ``fn`` refused a keyword that is also a call option's name, say where that option goes.

    ``k.call(fn, timeout=5)`` hands ``timeout`` to ``fn`` (every keyword goes to it): a function that
    does not take it raises a TypeError that alone does not tell the caller what to do instead.
    Python 3.11+ (exception notes); on older Pythons the error stays as it is.
    """
    message = str(exc)
    refused = [
        name
        for name in CALL_OPTION_NAMES
        if name in kwargs
        and (
            f"unexpected keyword argument '{name}'" in message  # Python functions
            or f"'{name}' is an invalid keyword argument" in message  # some builtins
            or "takes no keyword arguments" in message  # builtins without keywords (time.sleep)
        )
    ]
    if not refused or not hasattr(exc, "add_note"):
        return
    given = ", ".join(f"{name}={kwargs[name]!r}" for name in refused)
    exc.add_note(
        f"kernelproxy: {given} went to {_name(fn)}() as its keyword argument{'s' if len(refused) > 1 else ''}: "
        f"{method}() passes every keyword to the function. Call options are set on a view of the kernel: "
        f"k.options({given}).{method}({_name(fn)}, ...)."
    )


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
