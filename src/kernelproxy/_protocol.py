"""The agent's wire protocol on the host side, free of I/O.

What a request is (``Request``: its header, built by one function per kind,
and the frames of pickled values), what a reply means (``reply_error``), and
the fate of each request (``Outcome``), which the connection records and the
caller reads after a timeout or a cancellation. The agent's docstring
(``agent/_agent.py``) is the specification; the codecs both sides share
(pickler, out-of-band threshold, digests, parts) live there once.
"""

from __future__ import annotations

import enum
import itertools
import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Union

from ._exceptions import (
    CallInterrupted,
    KernelDiedError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    StaleRefError,
)
from ._serialization import missing_module_advice
from ._tracebacks import attach_ipython_rendering

# A reply: the agent's JSON header and the binary frames.
Message = tuple[dict[str, Any], list[Any]]


# ---------------------------------------------------------------------- requests

_id_prefix = uuid.uuid4().hex[:16]
_id_numbers = itertools.count()


def request_id() -> str:
    """A request id no other client of the kernel uses: a random per-process prefix and a counter.

    (About a tenth of uuid4's cost: 0.7 against 6.5 µs here; uuid4 showed in profiles of pools of tiny tasks.)
    """
    return f"{_id_prefix}{next(_id_numbers):x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_numbers
    _id_prefix, _id_numbers = uuid.uuid4().hex[:16], itertools.count()


if hasattr(os, "register_at_fork"):  # a forked child counts from the same point: it needs its own prefix
    os.register_at_fork(after_in_child=_new_id_prefix)


class CallHeader(TypedDict):
    op: Literal["call"]
    keep: bool  # keep the result in the kernel (a RemoteRef) instead of returning it


class PushHeader(TypedDict):
    op: Literal["push"]


class NamesHeader(TypedDict):
    op: Literal["pull", "delete"]
    names: list[str]


class NameHeader(TypedDict):
    op: Literal["contains", "ref_name"]
    name: str


class ExecHeader(TypedDict):
    op: Literal["exec"]
    code: str


class EvalHeader(TypedDict):
    op: Literal["eval"]
    expr: str


class _RefEvalFields(TypedDict):
    op: Literal["ref_eval"]
    root: int
    keep: bool


class RefEvalHeader(_RefEvalFields, total=False):
    agent: str  # the agent instance that kept the root: another instance refuses it (stale)


class _ReleaseFields(TypedDict):
    op: Literal["release"]
    ids: list[int]


class ReleaseHeader(_ReleaseFields, total=False):
    agent: str  # the agent instance that kept them: another instance ignores them


class EchoHeader(TypedDict):
    op: Literal["echo"]


class CellHeader(TypedDict):
    op: Literal["cell"]
    code: str


Header = Union[
    CallHeader,
    PushHeader,
    NamesHeader,
    NameHeader,
    ExecHeader,
    EvalHeader,
    RefEvalHeader,
    ReleaseHeader,
    EchoHeader,
    CellHeader,
]


def call(*, keep: bool = False) -> CallHeader:
    return {"op": "call", "keep": keep}


def push() -> PushHeader:
    return {"op": "push"}


def pull(names: list[str]) -> NamesHeader:
    return {"op": "pull", "names": names}


def delete(names: list[str]) -> NamesHeader:
    return {"op": "delete", "names": names}


def contains(name: str) -> NameHeader:
    return {"op": "contains", "name": name}


def ref_name(name: str) -> NameHeader:
    return {"op": "ref_name", "name": name}


def exec_(code: str) -> ExecHeader:
    return {"op": "exec", "code": code}


def eval_(expression: str) -> EvalHeader:
    return {"op": "eval", "expr": expression}


def ref_eval(root: int, *, keep: bool, agent: str | None = None) -> RefEvalHeader:
    header: RefEvalHeader = {"op": "ref_eval", "root": root, "keep": keep}
    if agent is not None:
        header["agent"] = agent
    return header


def release(ids: list[int], *, agent: str | None = None) -> ReleaseHeader:
    header: ReleaseHeader = {"op": "release", "ids": ids}
    if agent is not None:
        header["agent"] = agent
    return header


def echo() -> EchoHeader:
    return {"op": "echo"}


def cell(code: str) -> CellHeader:
    return {"op": "cell", "code": code}


# ---------------------------------------------------------------------- the fate of one request


class Stage(enum.Enum):
    """How far a request got."""

    PREPARING = "preparing"  # not sent yet (pickled, waiting for a slot, parts still going out)
    SENT = "sent"  # sent; the kernel has not been seen starting it
    RUNNING = "running"  # the kernel said it started it (IOPub 'busy' with it as parent)
    FINISHED = "finished"  # the kernel said it is done with it (IOPub 'idle'), and no reply came
    ANSWERED = "answered"  # its reply arrived


class Interrupt(enum.Enum):
    """What interrupting an abandoned request did."""

    NONE = "none"  # not interrupted (yet)
    ANSWERED = "answered"  # the request ended within the grace period
    IGNORED = "ignored"  # it did not end: code that blocks SIGINT, or a kernel that ignores interrupts
    FAILED = "failed"  # sending the interrupt failed


@dataclass(eq=False)
class Outcome:
    """One request's fate, recorded by the connection and read by its caller: never shared between requests.

    After a timeout or a cancellation the caller reads it to say what
    happened: never sent, queued behind other work, interrupted, ignored the
    interrupt, or died with the kernel.
    """

    stage: Stage = Stage.PREPARING
    msg_id: str | None = None  # the Jupyter message carrying it now (a transfer may take several)
    queued_behind: str | None = None  # when abandoned before it started: the msg_id the kernel was busy with
    interrupt: Interrupt = Interrupt.NONE
    died: KernelDiedError | None = None
    abandoned: bool = False
    subshell: bool = False  # it ran on a subshell: interrupted by an exception in that thread, never SIGINT
    skipped: bool = False  # abandoned before it started, and the kernel was told to skip it (the lane)
    unanswered_after: float | None = None  # interrupted, then the kernel did not answer a probe for this many s

    def describe(self) -> str:
        """What became of the request after it was abandoned, in words for an error message."""
        if self.died is not None:
            cause = "interrupting the kernel ended it" if self.interrupt is not Interrupt.NONE else "the kernel died"
            return f"{cause} ({self.died}); call restart() for a fresh one"
        if self.stage is Stage.PREPARING:
            return "it had not been sent to the kernel yet, and never will be: nothing ran"
        if self.skipped:  # told before it started: the kernel never runs it
            if self.queued_behind is not None:
                return "it was still queued behind other work in the kernel, which skips it: nothing ran"
            return "the kernel had not started it and skips it: nothing ran"
        if self.stage is Stage.SENT and self.interrupt is Interrupt.NONE:
            if self.queued_behind is not None:
                return (
                    "it was still queued behind other work in the kernel (which runs one request at a time); "
                    "it is interrupted as soon as it starts"
                )
            return "the kernel had not started it yet; it is interrupted as soon as it starts"
        if self.stage is Stage.FINISHED:
            return "the kernel finished it without a reply that kernelproxy recognised (lost, or not answered)"
        if self.interrupt is Interrupt.IGNORED and self.subshell:
            return (
                "it runs on kernelproxy's subshell, in code that cannot be stopped from another thread (C code: "
                "time.sleep, I/O, a lock, a long numpy operation); it gets KeyboardInterrupt when it returns to "
                "Python. The kernel's main shell was not interrupted"
            )
        if self.interrupt is Interrupt.IGNORED:
            return (
                "the kernel ignored the interrupt (stuck in code that blocks SIGINT?) and is still busy: "
                "call restart(), or use on_timeout='restart' to have timeouts do it"
            )
        if self.interrupt is Interrupt.FAILED:
            return "interrupting the kernel failed; it may still be running the call"
        if self.subshell:
            return "its remote work on the subshell was stopped; the kernel's main shell was not interrupted"
        if self.unanswered_after is not None:
            return (
                f"its remote work was interrupted, but the kernel has not answered a request since (none within "
                f"{self.unanswered_after:g} s): it is stuck (xeus-python can be, after an interrupt) or busy with "
                "another client's work; call restart() if it stays so, or use on_timeout='restart'"
            )
        return "its remote work was interrupted and the kernel is usable"


# ---------------------------------------------------------------------- replies


def reply_error(reply: dict[str, Any], frames: list[Any], what: str, loads: Any) -> BaseException:
    """The exception a failed reply stands for; ``loads`` unpickles the remote exception's frames."""
    kind = reply.get("kind")
    ename, evalue, tb = reply.get("ename", "?"), reply.get("evalue", ""), reply.get("traceback", "")
    stack = reply.get("stack") if isinstance(reply.get("stack"), list) else None  # agents from REVISION 4 on
    if kind == "exception":
        exc: Any = None
        if frames:
            try:
                exc = loads(frames, what="the remote exception")
            except SerializationError:
                exc = None
        if not isinstance(exc, Exception):  # also keeps SystemExit/KeyboardInterrupt from acting here
            return RemoteError(ename, evalue, tb, stack)
        exc.__cause__ = RemoteTraceback(tb, stack)
        attach_ipython_rendering(exc)
        return exc
    if kind == "interrupted":
        return CallInterrupted(f"{what} was interrupted in the kernel\n{tb}".rstrip())
    if kind == "stale":
        return StaleRefError(f"{evalue}. Make a new ref")
    if kind == "lost":
        return ProtocolError(f"{what}: {evalue}")
    if kind in ("deserialize", "serialize"):
        if kind == "deserialize":
            advice = missing_module_advice(reply.get("missing"))
            error = SerializationError(f"the kernel could not unpickle the {what}: {evalue}. {advice}")
        else:
            error = SerializationError(f"{what}: {evalue}")
        error.__cause__ = _remote_cause(frames, tb, stack, loads)  # the kernel's own error (ModuleNotFoundError...)
        return error
    return ProtocolError(f"{what} failed in kernelproxy's agent: {ename}: {evalue}")


def _remote_cause(frames: list[Any], tb: str, stack: list[Any] | None, loads: Any) -> BaseException | None:
    """The original error the kernel sent with a serialization failure, its traceback chained; or the traceback."""
    cause: Any = None
    if frames:
        try:
            cause = loads(frames, what="the kernel's error")
        except SerializationError:
            cause = None
    if isinstance(cause, Exception):
        cause.__cause__ = RemoteTraceback(tb, stack)
        return cause
    return RemoteTraceback(tb, stack) if tb else None
