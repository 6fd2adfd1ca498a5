"""Requests and replies with one kernel: routing, cancellation, liveness.

A wire (``_wires``) carries whole messages to and from the kernel's channels;
this module matches them up. Each incoming message is routed by its parent
``msg_id`` to the request waiting for it, so any number of concurrent calls
share the kernel. A monitor task notices a dead kernel (process gone, or the
wire's liveness check failing) and fails every waiting request with
KernelDiedError instead of letting it hang.

Requests may run on a subshell (``shell``: its ``subshell_id``, sent in the
header); what the kernel runs is tracked per shell. No request waits forever
for a reply that will not come: one that the kernel finished without answering
(a comm it does not know: it was restarted) or whose reply may have been lost
while the wire reconnected fails with ``RequestLost``, which the layers above
answer by sending it again (the agent runs a request id once). What hints that
someone else restarted the kernel (its 'starting' status or IOPub welcome, a
missed heartbeat) goes to ``on_hint``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, cast

from ._exceptions import KernelDiedError, ProtocolError, SerializationError
from ._protocol import Interrupt, Outcome, Stage
from ._wires.base import Wire

log = logging.getLogger("kernelproxy")

IopubListener = Callable[[dict[str, Any]], None]
Match = Literal["reply", "part", "other"]
ProcessCheck = Callable[[], Awaitable["int | None"]]  # exit code once the process is gone, else None

LIVENESS_INTERVAL = 1.0  # seconds between the wire's liveness checks (heartbeats)
PROCESS_POLL_INTERVAL = 0.1  # seconds between exit checks of a local kernel process
IDLE_GRACE = 5.0  # seconds to wait, after a reply, for the output that precedes 'idle' on IOPub
# Requests of the control channel: a kernel publishes busy/idle around them too, beside the shell's work.
CONTROL_REQUESTS = frozenset(
    {
        "interrupt_request",
        "shutdown_request",
        "debug_request",
        "usage_request",
        "create_subshell_request",
        "delete_subshell_request",
        "list_subshell_request",
    }
)
RECENT_CONTROL_IDS = 64  # control requests remembered, to tell their busy/idle from the shell's
MONITOR_STOP_GRACE = 1.0  # seconds closing waits for the liveness monitor to stop
INTERRUPT_GRACE = 2.0  # seconds an interrupted request has to answer before we say the kernel ignored it
# Seconds a request may wait unstarted, with nothing running on its shell, before kernelproxy checks that it
# arrived (see _probe_stalled).
STALL_PROBE_AFTER = 3.0


class RequestLost(ProtocolError):
    """A request's reply will not come: send it again (with the same request id, so it never runs twice).

    ``check``: first make sure the kernel is still the one the request was meant
    for (someone may have restarted it).
    """

    def __init__(self, why: str, *, check: bool = False) -> None:
        super().__init__(f"the kernel did not answer a request: {why}")
        self.why = why
        self.check = check


class ReplyMatcher(Protocol):
    """How a request tells its reply from the other messages it causes (comm replies have no shell reply)."""

    wait_idle: bool  # with a listener, return the reply only after IOPub 'idle' (output may follow the reply)
    # Seconds after the kernel's 'idle' for a request after which no reply will come (RequestLost), or None
    # for requests the kernel always answers. Comm requests need it: a kernel drops messages to comms it does
    # not know (it was restarted) and says only 'idle'.
    reply_grace: float | None

    def __call__(self, channel: str, msg: dict[str, Any]) -> Match:
        """"reply": ``msg`` is the reply; "part": a piece of it, consumed; "other": any other message."""


class ShellReply:
    """The default: the reply is the request's ``*_reply`` on shell or control."""

    wait_idle = True
    reply_grace: float | None = None

    def __call__(self, channel: str, msg: dict[str, Any]) -> Match:
        return "other" if channel == "iopub" else "reply"


SHELL_REPLY = ShellReply()


class LaneReply:
    """Replies that come on the lane (``route_reply``) are replies; output there arrives before them."""

    wait_idle = False
    reply_grace: float | None = None

    def __call__(self, channel: str, msg: dict[str, Any]) -> Match:
        return "reply" if channel == "lane" else "other"


LANE_REPLY = LaneReply()


@dataclass(eq=False)
class _Pending:
    """One request waiting for its reply (and, with a listener, its IOPub 'idle')."""

    msg_id: str
    reply: asyncio.Future[Any]
    outcome: Outcome
    matcher: ReplyMatcher = SHELL_REPLY
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    listener: IopubListener | None = None
    control: bool = False  # sent on the control channel
    shell: str | None = None  # the subshell running it (None: the main shell)
    sent: int = 0  # the connection's send counter when it left (0: not sent yet)
    sent_at: float = 0.0  # the loop's time when it left (0: not through the Jupyter channels)
    stall_checked: bool = False  # _probe_stalled asked whether the kernel was restarted under it
    interrupter: Callable[[], Awaitable[None]] | None = None  # stops its remote work; None: interrupt the kernel
    interruptible: bool = True  # False: an abandoned request is left to finish (a handshake)
    # The lane: tells the kernel to skip the request if it has not started it; returns whether it runs now.
    cancel: Callable[[], Awaitable[bool]] | None = None
    aim: Callable[[], None] | None = None  # the lane: aims the next interrupt at this request
    started: Callable[[], bool] | None = None  # the lane: whether the kernel runs it now (no 'busy' tells)


class KernelConnection:
    """Routed request/reply over a wire to one kernel's shell, control and iopub channels."""

    def __init__(
        self,
        wire: Wire,
        *,
        process_check: ProcessCheck | None = None,
        interrupter: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.wire = wire
        self.session = wire.session
        self._process_check = process_check
        self._interrupter = interrupter or self.interrupt_by_message
        self._pending: dict[str, _Pending] = {}
        self._running: dict[str | None, str | None] = {}  # per shell, msg_id the kernel is executing (IOPub status)
        # Per shell, our latest answered request: the kernel may still be wrapping it up (flushing, then 'idle';
        # its 'busy' may even come after a reply on shell) when the next one is abandoned; that one is not
        # "queued behind other work" (replies come before 'idle').
        self._last_answered: dict[str | None, str] = {}
        self._signals_on_the_way: set[asyncio.Future[Any]] = set()  # SIGINTs for abandoned requests, not yet sent
        self._control_ids: dict[str, None] = {}  # our latest requests on control, oldest first
        self._monitor_task: asyncio.Task[None] | None = None
        self._sent = 0  # counts messages sent: orders requests against reconnect barriers and checks
        self._recovery: asyncio.Future[None] | None = None
        self._stall_probe: asyncio.Future[Any] | None = None
        self.dead: KernelDiedError | None = None
        self.restarted_by_server = False  # the kernel died and its server started a fresh one in its place
        self._answered = False  # the kernel answered wait_ready()
        self.on_hint: Callable[[str], None] | None = None  # told what suggests the kernel was restarted
        self.on_reconnect: Callable[[], None] | None = None  # told when the wire reconnected
        self.on_stall: Callable[[str], None] | None = None  # told when a request went unheard (_probe_stalled)
        wire.hint = self._hint
        wire.reconnected = self._reconnected

    @property
    def rejected_messages(self) -> int:
        """Messages the wire dropped for a bad signature or a bad format."""
        return self.wire.rejected_messages

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self.dead = None
        self._running, self._last_answered = {}, {}
        self._signals_on_the_way = set()
        await self.wire.start(self._on_message)
        self._monitor_task = asyncio.ensure_future(self._monitor())

    async def close(self) -> None:
        for task in (self._monitor_task, self._recovery, self._stall_probe):
            if task is not None:
                task.cancel()
                # Bounded: a heartbeat's zmq.asyncio recv has been seen to ignore its cancellation (a close that
                # hung for good); the wire's close below closes that socket, which ends it anyway.
                await asyncio.wait([task], timeout=MONITOR_STOP_GRACE)
        self._monitor_task = self._recovery = self._stall_probe = None
        await self.wire.close()

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiting request with ``error``."""
        for pending in list(self._pending.values()):
            self._fail(pending, error)
        self._pending.clear()

    def _observe(self, pending: _Pending) -> None:
        """Bring a lane request's stage up to date (the kernel says nothing when it starts one)."""
        if pending.started is not None and pending.outcome.stage is Stage.SENT and pending.started():
            pending.outcome.stage = Stage.RUNNING

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        self._observe(pending)
        if isinstance(error, KernelDiedError):
            pending.outcome.died = error
        if not pending.reply.done():
            pending.reply.set_exception(error)
        pending.idle.set()
        self._pending.pop(pending.msg_id, None)

    @property
    def sent(self) -> int:
        """How many messages were sent so far: a later request has a higher number."""
        return self._sent

    def restarted(self, before: int, error: KernelDiedError) -> None:
        """The kernel is a new process since message number ``before``: settle the requests sent to the old one.

        Those it never ran are sent again (``RequestLost``): not started (the old
        process died before them), or finished without a reply (the new process
        dropped a message to a comm it does not know). Those the old process was
        running fail with ``error``: each shell runs requests in order, so by now
        the new process has finished every one sent to it before the check.
        """
        self._running, self._last_answered = {}, {}
        for pending in list(self._pending.values()):
            self._observe(pending)
            if 0 < pending.sent < before:
                never_ran = pending.outcome.stage in (Stage.PREPARING, Stage.SENT, Stage.FINISHED)
                if never_ran and not pending.outcome.abandoned:
                    self._fail(pending, RequestLost("the kernel was restarted before it started it"))
                else:
                    self._fail(pending, error)

    def declare_dead(self, error: KernelDiedError) -> None:
        if self.dead is None:
            self.dead = error
        self.fail_all(error)

    # ------------------------------------------------------------------ requests

    async def request(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        *,
        buffers: list[Any] | None = None,
        listener: IopubListener | None = None,
        matcher: ReplyMatcher = SHELL_REPLY,
        outcome: Outcome | None = None,
        shell: str | None = None,
        interrupter: Callable[[], Awaitable[None]] | None = None,
        interruptible: bool = True,
    ) -> dict[str, Any]:
        """Send one request and return its reply message.

        With a ``listener``, IOPub messages caused by the request are passed
        to it until the kernel reports 'idle', and the reply is returned only
        after that (unless the ``matcher`` says the reply itself comes after
        the output), so no output is lost behind it. ``matcher`` tells the
        reply from other messages. ``outcome`` records the request's fate for
        its caller. ``shell``: the subshell to run it on (None: the main shell).
        If the caller is cancelled, the request is abandoned: interrupted if the
        kernel is running it, or as soon as it starts, with ``interrupter``
        (default: the kernel's interrupt; a subshell's requests need their own),
        unless it is not ``interruptible``. Raises ``RequestLost`` when its reply
        will not come.
        """
        if self.dead is not None:
            raise self.dead
        outcome = outcome if outcome is not None else Outcome()
        msg = self.session.msg(msg_type, content)
        if shell is not None:
            msg["header"]["subshell_id"] = shell
        try:
            encoded = self.wire.encode(msg)  # before registering: a request that cannot be sent leaves no trace
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError included: a lone surrogate in a name...
            raise SerializationError(f"cannot encode the {msg_type} (its JSON part): {exc}") from exc
        msg_id = msg["header"]["msg_id"]
        pending = _Pending(
            msg_id,
            asyncio.get_running_loop().create_future(),
            outcome,
            matcher,
            listener=listener,
            control=channel == "control",
            shell=shell,
            interrupter=interrupter,
            interruptible=interruptible,
        )
        pending.reply.add_done_callback(_consume_outcome)  # an abandoned request's failure is nobody's error
        self._pending[msg_id] = pending
        if pending.control:  # its busy/idle may come after its reply, when it is no longer pending
            self._control_ids[msg_id] = None
            while len(self._control_ids) > RECENT_CONTROL_IDS:
                del self._control_ids[next(iter(self._control_ids))]
        outcome.msg_id = msg_id
        outcome.stage = Stage.SENT  # from here on it may have reached the kernel
        try:
            if channel == "shell" and self._signals_on_the_way:
                # A SIGINT meant for an abandoned request must not land in this one (a slow REST interrupt
                # did): it goes first; between requests ipykernel ignores SIGINT.
                # Bounded: an interrupt the kernel never answers (it died of it) must not hold up what follows.
                await asyncio.wait(set(self._signals_on_the_way), timeout=INTERRUPT_GRACE)
            await self.wire.send(channel, encoded, buffers)
            self._sent += 1
            pending.sent = self._sent
            pending.sent_at = asyncio.get_running_loop().time()
            reply = await _reply_of(pending)
            if listener is not None and matcher.wait_idle:
                try:
                    await asyncio.wait_for(pending.idle.wait(), IDLE_GRACE)
                except asyncio.TimeoutError:
                    log.warning("no 'idle' status from the kernel for %s; some output may be missing", msg_type)
            return cast(dict[str, Any], reply)
        except asyncio.CancelledError:
            if not pending.reply.done():
                await asyncio.shield(self._abandon(pending))
            raise
        finally:
            if not outcome.abandoned:
                self._pending.pop(msg_id, None)

    async def exchange(
        self,
        msg_id: str,
        send: Callable[[], Awaitable[None]],
        *,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
        cancel: Callable[[], Awaitable[bool]] | None = None,
        aim: Callable[[], None] | None = None,
        started: Callable[[], bool] | None = None,
    ) -> Any:
        """A request that travels outside the Jupyter channels (the lane): ``send()`` it, return its reply.

        Registered and failed like the others (death, restarts, closing); the
        lane's reader routes its output and reply here (``route_output``,
        ``route_reply``). ``cancel`` tells the kernel to skip it if its caller
        abandons it before it started, and says whether it runs already (then
        it is interrupted, ``aim`` first making the interrupt hit it only);
        ``started`` says whether the kernel runs it now (for its Outcome).
        """
        if self.dead is not None:
            raise self.dead
        outcome = outcome if outcome is not None else Outcome()
        pending = _Pending(msg_id, asyncio.get_running_loop().create_future(), outcome, LANE_REPLY, listener=listener)
        pending.cancel = cancel
        pending.aim = aim
        pending.started = started
        pending.reply.add_done_callback(_consume_outcome)  # an abandoned request's failure is nobody's error
        self._pending[msg_id] = pending
        outcome.msg_id = msg_id
        outcome.stage = Stage.SENT  # from here on it may have reached the kernel
        try:
            await send()
            self._sent += 1
            pending.sent = self._sent
            return await _reply_of(pending)
        except asyncio.CancelledError:
            if not pending.reply.done():
                await asyncio.shield(self._abandon(pending))
            raise
        finally:
            if not outcome.abandoned:
                self._pending.pop(msg_id, None)

    async def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        buffers: list[Any] | None = None,
        *,
        shell: str | None = None,
    ) -> None:
        """Send a message that has no reply (comm_close, a part of a chunked request...)."""
        if self.dead is not None:
            raise self.dead
        msg = self.session.msg(msg_type, content)
        if shell is not None:
            msg["header"]["subshell_id"] = shell
        await self.wire.send(channel, self.wire.encode(msg), buffers)
        self._sent += 1

    async def execute(
        self,
        user_expressions: dict[str, str],
        *,
        extra: dict[str, Any] | None = None,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
        shell: str | None = None,
        interrupter: Callable[[], Awaitable[None]] | None = None,
        interruptible: bool = True,
    ) -> dict[str, Any]:
        """A silent execute_request that runs no cell code, only ``user_expressions``.

        Silent and history-free: no execution count, no ``Out``, no history
        entry, no execute_input broadcast. ``extra`` adds fields to the content.
        """
        content = {
            "code": "",
            "silent": True,
            "store_history": False,
            "user_expressions": user_expressions,
            "allow_stdin": False,
            "stop_on_error": False,
        }
        if extra:
            content.update(extra)
        reply = await self.request(
            "shell",
            "execute_request",
            content,
            listener=listener,
            outcome=outcome,
            shell=shell,
            interrupter=interrupter,
            interruptible=interruptible,
        )
        return cast(dict[str, Any], reply["content"])

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait until the kernel answers on shell and its IOPub messages reach us.

        A SUB socket misses messages published before its subscription has
        propagated, so a first call's output could be lost without this.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.dead is not None:  # e.g. its server restarted it again meanwhile: no use waiting
                raise self.dead
            seen = asyncio.Event()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            msg = self.session.msg("kernel_info_request", {})
            pending = _Pending(msg["header"]["msg_id"], loop.create_future(), Outcome(), listener=_setter(seen))
            self._pending[pending.msg_id] = pending
            try:
                await self.wire.send("shell", self.wire.encode(msg))
                reply = await asyncio.wait_for(asyncio.shield(pending.reply), min(remaining, 1.0))
                await asyncio.wait_for(seen.wait(), min(max(deadline - loop.time(), 0.01), 0.5))
                self._answered = True
                return cast(dict[str, Any], reply["content"])
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    raise
            finally:
                self._pending.pop(pending.msg_id, None)

    async def answers(self, timeout: float) -> bool:
        """Whether the kernel's main shell answers a kernel_info_request within ``timeout`` (it reads requests).

        Other failures (death, a closed connection) are not this question's: they say True, and tell otherwise.
        """
        try:
            await asyncio.wait_for(self.request("shell", "kernel_info_request", {}, interruptible=False), timeout)
        except asyncio.TimeoutError:
            return False
        except Exception:
            pass
        return True

    async def interrupt_by_message(self) -> None:
        """Interrupt through the control channel (kernels with interrupt_mode 'message', or remote ones)."""
        await asyncio.wait_for(self.request("control", "interrupt_request", {}), 5)

    async def _abandon(self, pending: _Pending) -> None:
        """The caller gave up on ``pending``: stop its remote work, leave the kernel usable."""
        outcome = pending.outcome
        outcome.abandoned = True
        if not pending.interruptible:
            self._pending.pop(pending.msg_id, None)
            return
        running = self._running.get(pending.shell)
        if outcome.stage is Stage.RUNNING:
            await self._interrupt_and_wait(pending)
        elif running is not None and running not in (pending.msg_id, self._last_answered.get(pending.shell)):
            outcome.queued_behind = running  # _route_iopub interrupts it when it starts
        # Otherwise the kernel has not said it started it: _route_iopub interrupts it when it does.
        if pending.cancel is not None and outcome.stage is Stage.SENT:
            try:
                runs = await pending.cancel()  # the lane: the kernel skips it, unless it runs it already
            except Exception as exc:
                log.debug("cancelling an abandoned request: %r", exc)
                runs = False
            if runs and not pending.reply.done():
                outcome.stage = Stage.RUNNING
                await self._interrupt_and_wait(pending)

    async def _interrupt_and_wait(self, pending: _Pending) -> None:
        outcome = pending.outcome
        # Once only: a second SIGINT could land after the reply, in an idle kernel.
        outcome.interrupt = Interrupt.ANSWERED
        try:
            if pending.aim is not None:
                pending.aim()
            sending = asyncio.ensure_future((pending.interrupter or self._interrupter)())
            sending.add_done_callback(_consume_outcome)
            if pending.interrupter is None:  # a kernel-wide SIGINT (a subshell's own interrupter aims at its work)
                self._signals_on_the_way.add(sending)
                sending.add_done_callback(self._signals_on_the_way.discard)
            try:
                await asyncio.shield(sending)
            except KernelDiedError:
                return  # recorded in the outcome by fail_all()
            except Exception as exc:  # an unanswered interrupt_request, a server that refused it...
                outcome.interrupt = Interrupt.FAILED
                log.debug("interrupting an abandoned request failed: %r", exc)
                return
            try:
                await asyncio.wait_for(asyncio.shield(pending.reply), INTERRUPT_GRACE)
            except asyncio.TimeoutError:
                outcome.interrupt = Interrupt.IGNORED  # stuck in code that ignores SIGINT; a late reply is dropped
            except Exception:
                pass  # it ended otherwise (died, closed): its reply future says how, the outcome records it
        finally:
            if pending.reply.done() or self.dead is not None:
                self._pending.pop(pending.msg_id, None)

    # ------------------------------------------------------------------ readers

    def _on_message(self, channel: str, msg: dict[str, Any]) -> None:
        if channel == "iopub":
            self._route_iopub(msg)
        elif channel in ("shell", "control"):
            self._route_reply(channel, msg)

    def _route_reply(self, channel: str, msg: dict[str, Any]) -> None:
        pending = self._pending.get(msg["parent_header"].get("msg_id", ""))
        if pending is not None:  # else a reply to an abandoned request, or to another client
            self._offer(pending, channel, msg)

    def _offer(self, pending: _Pending, channel: str, msg: dict[str, Any]) -> bool:
        """Resolve ``pending`` if ``msg`` is its reply; say whether ``msg`` was consumed (reply or part)."""
        match = pending.matcher(channel, msg)
        if match == "other":
            return False
        if match == "reply":
            pending.outcome.stage = Stage.ANSWERED
            self._last_answered[pending.shell] = pending.msg_id
            if self._running.get(pending.shell) == pending.msg_id:
                self._running[pending.shell] = None  # done, whenever its 'idle' arrives: later ones are not behind it
            if pending.outcome.abandoned:
                self._pending.pop(pending.msg_id, None)
            if not pending.reply.done():
                pending.reply.set_result(msg)
        return True

    def _route_iopub(self, msg: dict[str, Any]) -> None:
        parent = msg["parent_header"]
        parent_id = parent.get("msg_id")
        msg_type = msg["msg_type"]
        if not parent_id and msg_type == "iopub_welcome":
            self._hint("the kernel's IOPub socket welcomed a (re)connected subscriber")
            return
        shell = parent.get("subshell_id")
        if msg_type == "status":
            state = msg["content"].get("execution_state")
            if state in ("restarting", "dead") and not parent_id:  # said by a Jupyter server of its kernel
                self.restarted_by_server = state == "restarting"
                self.declare_dead(
                    KernelDiedError(
                        "the kernel died; its server restarted it with an empty namespace"
                        if state == "restarting"
                        else "the kernel died and its server could not restart it"
                    )
                )
                return
            if state == "starting" and not parent_id:
                self._hint("the kernel said it is starting")
            if msg["parent_header"].get("msg_type") in CONTROL_REQUESTS or parent_id in self._control_ids:
                pass  # handled beside the shell's work, not instead of it: it says nothing of what runs there
            elif state == "busy":
                self._running[shell] = parent_id
            elif state == "idle" and self._running.get(shell) == parent_id:
                self._running[shell] = None
        pending = self._pending.get(parent_id or "")
        if pending is None:
            return
        outcome = pending.outcome
        running = self._running.get(pending.shell)
        if running == parent_id and outcome.stage is Stage.SENT:
            outcome.stage = Stage.RUNNING
            if outcome.abandoned and outcome.interrupt is Interrupt.NONE and not pending.reply.done():
                if pending.interruptible:  # abandoned while queued; started now
                    asyncio.ensure_future(self._interrupt_and_wait(pending))
        elif running is None and outcome.stage is Stage.RUNNING and msg_type == "status":
            outcome.stage = Stage.FINISHED  # idle: interrupting it now would hit whatever runs next
        if not pending.reply.done() and self._offer(pending, "iopub", msg):
            return
        if pending.listener is not None:
            try:
                pending.listener(msg)
            except BaseException as exc:  # e.g. SystemExit from a sys.stdout replaced by the host: not our loop's end
                if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                    raise  # a real Ctrl-C, in an AsyncKernel's loop on the main thread
                log.exception("IOPub listener failed")
        if msg_type == "status" and msg["content"].get("execution_state") == "idle":
            pending.idle.set()
            grace = pending.matcher.reply_grace
            if grace is not None and not pending.reply.done():
                asyncio.get_running_loop().call_later(grace, self._no_reply, pending)

    def _no_reply(self, pending: _Pending) -> None:
        """The kernel finished ``pending`` a while ago and no reply came: it will not (see ``reply_grace``)."""
        if not pending.reply.done() and self._pending.get(pending.msg_id) is pending:
            self._fail(pending, RequestLost("the kernel finished it without answering", check=True))

    def _hint(self, why: str) -> None:
        if self.on_hint is not None and self.dead is None:
            self.on_hint(why)

    # ------------------------------------------------------------------ reconnects

    def _reconnected(self) -> None:
        """The wire reopened: replies the kernel sent meanwhile may be lost (Jupyter Server replays them only
        when ours was the kernel's last connection). Find the requests that lost theirs, with barriers."""
        if self.on_reconnect is not None:
            self.on_reconnect()
        if self._recovery is not None:
            self._recovery.cancel()  # its barriers may be lost too: start over
        self._recovery = asyncio.ensure_future(self._recover())

    async def _recover(self) -> None:
        """For each shell with requests waiting, a kernel_info_request behind them: each shell runs its
        requests in order and answers in order, so once the barrier's reply is here, a request sent before
        it that still has no reply lost it (or never arrived): RequestLost, and it is sent again."""
        shells = {pending.shell for pending in self._pending.values() if pending.sent}
        if shells and self.dead is None:
            lost = "its reply was lost while the connection to the server was down"
            await asyncio.gather(*(self._barrier(shell, lost) for shell in shells), return_exceptions=True)

    def _probe_stalled(self) -> None:
        """A request can vanish without a trace when someone restarts the kernel: sent while the new kernel was
        not yet connected to its server, or answered with a status our IOPub subscription missed while it
        reconnected to the new process, it gets no reply and no status, so nothing would ever fail it. A
        request still unstarted after STALL_PROBE_AFTER, on a shell where nothing runs that we know of:
        - through a server, gets a barrier behind it: if the barrier is answered first, the request was lost
          (and is checked and sent again: the agent keeps replies through servers, so nothing runs twice); a
          request queued behind someone's cell is answered before the barrier, which waits in the same queue;
        - directly, makes the kernel check (once) whether it is a new process: if so, what the old one never
          ran is sent again. Nothing is declared lost here: without kept replies a resend could run twice."""
        if self._stall_probe is not None and not self._stall_probe.done():
            return
        now = asyncio.get_running_loop().time()
        stalled = [
            pending
            for pending in self._pending.values()
            if pending.sent_at  # lane requests (no sent_at) say themselves when they start
            and not pending.control
            and not pending.stall_checked
            and not pending.reply.done()
            and pending.outcome.stage is Stage.SENT
            and now - pending.sent_at > STALL_PROBE_AFTER
            and self._running.get(pending.shell) is None
        ]
        if not stalled:
            return
        if not self.wire.may_lose_replies:
            for pending in stalled:
                pending.stall_checked = True
            if self.on_stall is not None:
                self.on_stall(f"a request got no word from the kernel for {STALL_PROBE_AFTER:g} s")
            return
        lost = "the kernel never started it (restarted meanwhile?)"
        barriers = (self._barrier(shell, lost, check=True) for shell in {pending.shell for pending in stalled})
        self._stall_probe = asyncio.ensure_future(asyncio.gather(*barriers, return_exceptions=True))

    async def _barrier(self, shell: str | None, lost: str, *, check: bool = False) -> None:
        msg = self.session.msg("kernel_info_request", {})
        if shell is not None:
            msg["header"]["subshell_id"] = shell
        loop = asyncio.get_running_loop()
        pending = _Pending(msg["header"]["msg_id"], loop.create_future(), Outcome(), shell=shell, interruptible=False)
        pending.reply.add_done_callback(_consume_outcome)
        self._pending[pending.msg_id] = pending
        try:
            await self.wire.send("shell", self.wire.encode(msg))
            self._sent += 1
            pending.sent = before = self._sent
            await asyncio.shield(pending.reply)
        finally:
            self._pending.pop(pending.msg_id, None)
        for waiting in list(self._pending.values()):
            if waiting.shell == shell and 0 < waiting.sent < before and not waiting.reply.done():
                self._fail(waiting, RequestLost(lost, check=check))

    # ------------------------------------------------------------------ the lane's messages

    def route_output(self, msg_id: str, msg: dict[str, Any]) -> None:
        """Output (an IOPub-shaped message) of the lane request ``msg_id``."""
        pending = self._pending.get(msg_id)
        if pending is not None and pending.listener is not None:
            try:
                pending.listener(msg)
            except Exception:
                log.exception("IOPub listener failed")

    def route_reply(self, msg_id: str, reply: Any) -> None:
        """The reply to the lane request ``msg_id``."""
        pending = self._pending.get(msg_id)
        if pending is not None:
            self._offer(pending, "lane", reply)

    def fail(self, msg_ids: list[str], error: BaseException) -> None:
        """Fail the given requests (the lane they travel on broke)."""
        for msg_id in msg_ids:
            pending = self._pending.get(msg_id)
            if pending is not None:
                self._fail(pending, error)

    # ------------------------------------------------------------------ liveness

    async def check_process(self) -> bool:
        """For a local kernel: declare it dead if its process has exited (one waitpid). Say if it is dead."""
        if self.dead is None and self._process_check is not None:
            code = await self._process_check()
            if code is not None:
                self.declare_dead(KernelDiedError(f"the kernel process exited (exit code {code})"))
        return self.dead is not None

    async def _monitor(self) -> None:
        """Declare the kernel dead when its process exits or the wire says it is unreachable."""
        loop = asyncio.get_running_loop()
        next_check = loop.time()
        while self.dead is None:
            if await self.check_process():
                return
            self._probe_stalled()
            # A kernel process we can watch is alive while it starts: its heartbeat may not answer yet (and,
            # on a loaded machine, not for seconds), so the heartbeat counts once the kernel has answered.
            heartbeat_counts = self._answered or self._process_check is None
            if heartbeat_counts and loop.time() >= next_check:
                next_check = loop.time() + LIVENESS_INTERVAL
                reason = await self.wire.death()
                if reason is not None:
                    self.declare_dead(KernelDiedError(reason))
                    return
            await asyncio.sleep(PROCESS_POLL_INTERVAL if self._process_check else LIVENESS_INTERVAL / 4)


async def _reply_of(pending: _Pending) -> Any:
    """Await ``pending``'s reply; if the caller is cancelled meanwhile, its request waits for a reply afresh.

    Not ``asyncio.shield``, which costs a loop iteration per request: cancelling the
    caller cancels the reply future, replaced here by a new one that ``_abandon()`` awaits.
    """
    try:
        return await pending.reply
    except asyncio.CancelledError:
        if pending.reply.cancelled():
            pending.reply = asyncio.get_running_loop().create_future()
            pending.reply.add_done_callback(_consume_outcome)
        raise


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _setter(event: asyncio.Event) -> IopubListener:
    return lambda _msg: event.set()
