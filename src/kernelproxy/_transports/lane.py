"""The lane: requests over a private Unix socket, big buffers through shared memory, on one machine.

For kernels on this machine (those kernelproxy starts, and local ones it
connects to where the user opts in), a direct path beside the Jupyter
channels. The agent listens on a Unix socket in a private directory (0700,
the socket 0600, removed once connected; one connection, from this user,
that knows a token sent over the signed shell channel) and serves it from
the kernel's main thread, through the main thread's event loop, as ipykernel
serves its own shell messages: signals, interrupts and thread-bound libraries
behave as in a cell.

What travels (the agent's docstring and its lane section are the spec):

* a request: its header and frames; frames up to ``LANE_INLINE_MAX`` inline
  in the socket stream, bigger ones copied into the sender's arena (memfd
  segments handed to the peer once, over SCM_RIGHTS) and named by region;
* ``start`` when the kernel starts a request (Jupyter's 'busy'), so a timed-out
  or cancelled request is interrupted only while it runs; ``cancel`` from the
  host for one abandoned before it started (the kernel skips it);
* the request's output, as IOPub content (the agent routes ipykernel's IOPub
  messages whose parent is a lane request to the lane instead), then its reply,
  in order on one stream: no 'idle' to wait for.

A frame received through the arena is mapped, not copied: the value built on
it (a numpy array...) lives in the shared region until it is garbage-collected;
then the region is handed back to its writer with the next message.

No buffer digest: only this user can reach the socket (0700 directory, 0600
socket, SO_PEERCRED checked, a token) and the arena (unnamed memfds passed
over that socket), and whoever is this user can read the kernel's connection
file and run code in it anyway.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import json
import logging
import mmap
import os
import secrets
import shutil
import socket
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

from .._connection import KernelConnection
from .._exceptions import KernelDiedError, ProtocolError, SerializationError
from ..agent import _agent as agent
from .base import Interrupter, IopubListener, Message, Outcome, Transport
from .execute import EXPRESSION_KEY, read_expression_result

log = logging.getLogger("kernelproxy")

PROBE_SIZE = 256 * 1024  # bytes echoed when the lane opens: proves the path carries binary frames
MAX_FDS = 64  # file descriptors one recvmsg may carry
DEATH_GRACE = 2.0  # seconds to find out whether a kernel whose lane closed has died


class LaneTransport(Transport):
    name = "lane"

    def __init__(self, connection: KernelConnection, sock: socket.socket, own_dir: str | None) -> None:
        self._conn = connection
        self._sock = sock
        self._own_dir = own_dir  # a directory we made for the socket (connected kernels); removed at close
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._status = mmap.mmap(-1, agent.LANE_STATUS_SIZE)  # replaced by the shared page at open
        self._last_running = 0  # what the status page said when the lane closed
        self._maps: Any = agent.LaneMaps()  # type: ignore[no-untyped-call]
        self._arena: Any = agent.LaneArena() if agent.LaneArena.supported() else None  # type: ignore[no-untyped-call]
        self._reader: Any = agent.LaneReader(self._on_message, self._maps)  # type: ignore[no-untyped-call]
        self._backlog: collections.deque[tuple[list[memoryview], list[int]]] = collections.deque()  # not sent yet
        self._drained: asyncio.Future[None] | None = None
        self._flush_scheduled = False  # a _flush() is due in this loop iteration
        self._trim_handle: asyncio.TimerHandle | None = None  # drops long-free arena segments
        self._writing = False  # waiting for the socket to take more (add_writer)
        self._inflight: set[str] = set()
        self._ready: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._closed = False
        self.broken: BaseException | None = None
        self._settled: asyncio.Future[None] | None = None  # finding out why the lane broke
        self._pid = 0  # the kernel's, from its ready message
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def description(self) -> str:
        arena = "shared memory for frames over 1 MiB" if self._arena is not None else "no shared memory here"
        return f"lane (Unix socket, {arena}, no digest: owner-only socket)"

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(cls, connection: KernelConnection, directory: str | None, timeout: float = 10.0) -> LaneTransport:
        """Have the agent listen in ``directory`` (a private one made here if None) and connect; or ProtocolError."""
        if not hasattr(socket, "AF_UNIX") or not hasattr(socket.socket, "sendmsg") or not hasattr(os, "memfd_create"):
            raise ProtocolError("no Unix sockets with descriptor passing, or no memfd_create, on this platform")
        own_dir = None
        if directory is None:
            directory = own_dir = tempfile.mkdtemp(prefix="kernelproxy-lane-")  # mode 0700
        path = os.path.join(directory, f"lane-{secrets.token_hex(4)}.sock")
        token = secrets.token_hex(16)
        sock = None
        try:
            expression = f"__import__('sys').modules[{agent.MODULE_NAME!r}]._lane_expression({path!r}, {token!r})"
            content = await asyncio.wait_for(connection.execute({EXPRESSION_KEY: expression}), timeout)
            answer = read_expression_result(content)
            if not isinstance(answer, dict) or answer.get("status") != "ok":
                reason = answer.get("evalue", answer) if isinstance(answer, dict) else answer
                raise ProtocolError(f"the kernel cannot serve a lane: {reason}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
            except OSError as exc:
                raise ProtocolError(f"cannot connect to the kernel's lane at {path}: {exc}") from exc
            transport = cls(connection, sock, own_dir)
        except BaseException:
            if sock is not None:
                sock.close()
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)
            raise
        try:
            status_fd = os.memfd_create("kernelproxy-lane-status", os.MFD_CLOEXEC)
            try:
                os.ftruncate(status_fd, agent.LANE_STATUS_SIZE)
                transport._status = mmap.mmap(status_fd, agent.LANE_STATUS_SIZE, flags=mmap.MAP_SHARED)
                transport._send({"k": "hello", "t": token}, fds=[status_fd])
            finally:
                os.close(status_fd)  # sendmsg passed a copy; the mapping keeps the memory
            await asyncio.wait_for(asyncio.shield(transport._ready), timeout)
            probe = os.urandom(PROBE_SIZE)
            header, frames = await asyncio.wait_for(transport.request({"op": "echo"}, [probe]), timeout)
            if header.get("status") != "ok" or len(frames) != 1 or bytes(frames[0]) != probe:
                raise ProtocolError("binary frames did not survive a round trip over the lane")
        except BaseException as exc:
            transport.discard()
            if isinstance(exc, asyncio.TimeoutError):
                raise ProtocolError(f"the kernel's lane did not answer within {timeout} s") from None
            raise
        return transport

    # ------------------------------------------------------------------ requests

    async def request(
        self,
        header: Mapping[str, Any],
        frames: list[Any],
        *,
        listener: IopubListener | None = None,
        outcome: Outcome | None = None,
        rid: str | None = None,
        interrupter: Interrupter | None = None,
    ) -> Message:
        """See ``Transport.request``. The lane runs on the main shell: ``interrupter`` (subshells) does not apply."""
        if self._settled is not None:
            await asyncio.shield(self._settled)
        if self.broken is not None:
            raise self.broken
        number = next(self._ids)
        msg_id = f"lane-{number}"
        outcome = outcome if outcome is not None else Outcome()

        async def send() -> None:
            self._inflight.add(msg_id)
            message = {"k": "req", "i": number, "h": header}
            if rid is not None:
                message["r"] = rid
            try:
                self._send(message, frames)
            except (TypeError, ValueError) as exc:  # marshal: a header of plain data only (as JSON elsewhere)
                raise SerializationError(f"cannot encode the request header for the lane: {exc}") from exc
            if self._writing:  # the socket is full: wait until it took this request
                await self._wait_drained()

        async def cancel() -> bool:
            """Ask the kernel to skip it; say whether it runs already (then it is to be interrupted)."""
            if self._closed:
                return False
            self._send({"k": "cancel", "i": number})
            self._flush()  # now: the system call orders the status read after it
            if self._writing:
                await self._wait_drained()
            running = self._running()
            if running and running != number:
                outcome.queued_behind = f"lane-{running}"
            # Neither running nor run (its reply could be on its way): the kernel skips it when it gets there.
            outcome.skipped = running != number and self._last_run() < number
            return running == number

        def aim() -> None:
            self._set_status(8, number)

        try:
            reply = await self._conn.exchange(
                msg_id,
                send,
                listener=listener,
                outcome=outcome,
                cancel=cancel,
                aim=aim,
                started=lambda: self._running() == number,  # the status page outlives the kernel: read after death
            )
        finally:
            self._inflight.discard(msg_id)
        reply_header, reply_frames = reply
        if not isinstance(reply_header, dict):
            raise ProtocolError(f"malformed reply from the kernel's agent: {reply_header!r:.200}")
        return reply_header, reply_frames

    # ------------------------------------------------------------------ the status page

    def _running(self) -> int:
        """The number of the lane request the kernel runs now (0: none); once closed, what it ran last."""
        if self._status.closed:
            return self._last_running
        return int(struct.unpack_from("<Q", self._status, 0)[0])

    def _last_run(self) -> int:
        """The number of the last lane request the kernel ran to its end (read after ``_running()``)."""
        return 0 if self._status.closed else int(struct.unpack_from("<Q", self._status, 16)[0])

    def _set_status(self, offset: int, value: int) -> None:
        if not self._status.closed:
            struct.pack_into("<Q", self._status, offset, value)

    def aim_interrupt_at_any(self) -> None:
        """The next interrupt stops whatever lane request runs (Kernel.interrupt())."""
        self._set_status(8, agent.LANE_ANY)

    # ------------------------------------------------------------------ reading (the loop's reader callback)

    def _on_readable(self) -> None:
        while not self._closed:
            view, direct = self._reader.buffer()
            try:
                count, ancillary, _, _ = self._sock.recvmsg_into([view], socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"the lane's socket failed ({exc})")
                return
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                    self._reader.fds.extend(fds)
            if count == 0:
                self._lost("the kernel closed the lane")
                return
            try:
                self._reader.received(count, direct)
            except Exception as exc:
                self._lost(f"the lane carried something unreadable ({type(exc).__name__}: {exc})")
                return
            if count < len(view) and not ancillary:
                # The socket was empty: no reading on to EAGAIN (a read that brought descriptors can end short).
                return

    def _on_message(self, message: dict[str, Any], frames: list[Any]) -> None:
        if self._arena is not None and message.get("fr"):
            for segment, offset in message["fr"]:
                self._arena.release(segment, offset)
            self._schedule_trim()
        kind = message.get("k")
        msg_id = f"lane-{message.get('i')}"
        if kind == "rep":
            self._conn.route_reply(msg_id, (message.get("h"), frames))
        elif kind == "out" and frames:
            msg_type = message.get("t")
            try:
                content = json.loads(bytes(frames[0]))
            except ValueError:
                return
            msg = {"msg_type": msg_type, "content": content, "header": {"msg_type": msg_type}}
            msg["parent_header"] = {"msg_id": msg_id}
            self._conn.route_output(msg_id, msg)
        elif kind == "ready" and not self._ready.done():
            self._pid = int(message.get("pid", 0))
            self._ready.set_result(message)

    def _lost(self, reason: str) -> None:
        """The lane broke. Usually the kernel died: find out (briefly) and fail what travels on it accordingly."""
        if self._closed:
            return
        self.discard()
        self.broken = None
        self._settled = asyncio.ensure_future(self._settle(reason))

    async def _settle(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEATH_GRACE
        while self._conn.dead is None and loop.time() < deadline:
            if await self._conn.check_process():
                break
            if not _process_alive(self._pid):
                self._conn.declare_dead(KernelDiedError(f"the kernel process ({self._pid}) exited"))
                break
            await asyncio.sleep(0.01)
        error: BaseException = self._conn.dead or ProtocolError(f"{reason} although the kernel still runs")
        if self._conn.dead is None:
            log.warning("kernelproxy: %s although the kernel still runs", reason)
        self.broken = error
        self._conn.fail(list(self._inflight), error)
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()

    def _schedule_trim(self) -> None:
        due = self._arena.trim_due() if self._arena is not None else None
        if due is not None and self._trim_handle is None:
            self._trim_handle = self._loop.call_later(due + 0.05, self._trim)

    def _trim(self) -> None:
        """Drop arena segments long free; tell the kernel at once (its descriptor keeps the memory otherwise)."""
        self._trim_handle = None
        if self._closed or self._arena is None:
            return
        if self._arena.trim():
            self._send({"k": "trim"})
        self._schedule_trim()

    # ------------------------------------------------------------------ writing (on the loop)

    def _send(
        self, message: dict[str, Any], frames: list[Any] | tuple[Any, ...] = (), fds: list[int] | None = None
    ) -> None:
        """Send one message now, or queue it behind the ones the socket has not taken yet (never blocks)."""
        if self._closed:
            raise self.broken or ProtocolError("the lane is closed")
        buffers, arena_fds = agent._lane_pack(  # type: ignore[no-untyped-call]
            message, frames, self._arena if frames else None, self._maps.take_frees()
        )
        fds = (fds or []) + arena_fds
        views = [view for view in (memoryview(buffer).cast("B") for buffer in buffers) if view.nbytes]
        if self._backlog and not fds and not self._backlog[-1][1]:
            self._backlog[-1][0].extend(views)  # one sendmsg for the messages of one loop iteration
        else:
            self._backlog.append((views, fds))
        lone = len(self._backlog) == 1 and not self._flush_scheduled and not self._writing and len(self._inflight) <= 1
        if fds or lone:
            # Now: descriptors may be closed once this returns; a lone request goes without a loop iteration's wait.
            self._flush()
        elif not self._flush_scheduled and not self._writing:
            # Requests of one loop iteration (a pool's) go together at its end: one system call, one read there.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or self._writing:
            return
        self._on_writable()  # a failure here ends the lane: _settle() fails the requests on it
        if self._backlog and not self._closed:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        """Send queued messages while the socket takes them; descriptors go with their message's first bytes."""
        while self._backlog:
            views, fds = self._backlog[0]
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            try:
                sent = self._sock.sendmsg(views[:64], ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"the lane's socket failed ({exc})")
                return
            if fds:
                self._backlog[0] = (views, [])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            if not views:
                self._backlog.popleft()
        if self._closed:
            return
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def _wait_drained(self) -> None:
        while self._backlog and not self._closed:
            if self._drained is None or self._drained.done():
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)

    # ------------------------------------------------------------------ closing

    def discard(self) -> None:
        """Close the socket and unmap everything, without messages (the kernel is gone, or restarting)."""
        if self._closed:
            return
        self._closed = True
        if self.broken is None:
            self.broken = ProtocolError("the lane is closed")
        if self._trim_handle is not None:
            self._trim_handle.cancel()
        try:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        except Exception:
            pass
        self._sock.close()
        self._maps.close()
        if self._arena is not None:
            self._arena.close()
        for fd in self._reader.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._last_running = self._running()  # a request the kernel died running: it started (see _observe)
        self._status.close()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    async def close(self) -> None:
        self.discard()


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not); True when unknown."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
