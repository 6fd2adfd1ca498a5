"""The server wire: a kernel's channels through a Jupyter Server or gateway websocket.

``/api/kernels/{id}/channels`` carries every channel over one websocket. We
offer the ``v1.kernel.websocket.jupyter.org`` subprotocol, where the server
forwards message parts and buffers as they are (no JSON re-encoding on the
server), and fall back to the default protocol (JSON text, or a binary
envelope when there are buffers) with servers that do not offer it. The server
signs messages for the kernel, so nothing is signed here.

The websocket is tornado's client: tornado is already a dependency of
jupyter_client and ipykernel, is what Jupyter Server and the gateways use
themselves, and has a C extension for the frame masking clients must do.
A dropped websocket is reopened with the same session id, so the server
replays what the kernel sent meanwhile (``buffer_offline_messages``); if it
cannot be reopened, ``death()`` says so and waiting calls fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import uuid
from typing import Any

import orjson
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from .._exceptions import AuthenticationError, ServerError, ServerUnreachableError
from .._server import ServerClient
from .base import Deliver, Encoded, Wire, normalize

log = logging.getLogger("kernelproxy")

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
SERVER_MESSAGE_LIMIT = 10 * 1024 * 1024  # Tornado-based servers refuse bigger websocket messages by default
RECEIVE_LIMIT = 2**31  # what we accept from the server; the agent chunks big replies anyway
PING_INTERVAL = 10.0  # seconds between websocket pings; a connection silent for as long again is reopened
RECONNECT_WINDOW = 15.0  # seconds to keep trying to reopen a dropped websocket before calls fail
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
STATUS_POLL_INTERVAL = 5.0  # seconds between REST checks that the kernel still exists on the server


class WebsocketWire(Wire):
    may_lose_replies = True

    def __init__(
        self,
        rest: ServerClient,
        kernel_id: str,
        *,
        subprotocol: str | None = V1_PROTOCOL,
        max_message_bytes: int = SERVER_MESSAGE_LIMIT,
    ) -> None:
        self._rest = rest  # the kernel's REST client (owned by its ServerKernelControl): status checks
        self._address = rest.address
        self.kernel_id = kernel_id
        self._offered = subprotocol  # None: ask for the default protocol only
        self.max_message_bytes = max_message_bytes
        # Builds message dicts only: the server signs what it forwards (the key just silences a warning).
        self.session = Session(key=uuid.uuid4().hex.encode(), session=uuid.uuid4().hex)
        self.protocol = ""  # the subprotocol the server chose ("" for the default)
        self._conn: WebSocketClientConnection | None = None
        self._socket: socket.socket | None = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._lost: str | None = None  # why the websocket is gone for good
        self.gone = False  # the server no longer has the kernel (404): culled or shut down there
        self._next_status_poll = 0.0
        self._closing = False

    @property
    def description(self) -> str:
        return f" over a server websocket ({self.protocol or 'default protocol'})"

    @property
    def url(self) -> str:
        path = f"api/kernels/{self.kernel_id}/channels?session_id={self.session.session}"
        return self._address.endpoint(path, websocket=True)

    async def start(self, deliver: Deliver) -> None:
        await self._connect()
        self._reader = asyncio.ensure_future(self._read(deliver))

    async def _connect(self) -> None:
        request = HTTPRequest(
            self.url,
            headers=self._address.headers(),
            connect_timeout=self._address.connect_timeout,
            request_timeout=self._address.request_timeout,
            **self._address.tls_options(),
        )
        try:
            conn = await websocket_connect(
                request,
                subprotocols=[self._offered] if self._offered else None,
                max_message_size=RECEIVE_LIMIT,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_INTERVAL,  # tornado caps it at the interval
            )
        except HTTPClientError as exc:
            code = exc.code
            if code in (401, 403):
                where = self.url.split("?")[0]
                raise AuthenticationError(f"the server rejected the token for {where} (HTTP {code})", code) from exc
            if code == 404:
                raise ServerError(f"no kernel {self.kernel_id} on the server (websocket HTTP 404)", 404) from exc
            if code == 599:
                why = exc.message
                raise ServerUnreachableError(f"the kernel's websocket could not be opened: {why}", 599) from exc
            raise ServerError(f"the server refused the kernel's websocket: HTTP {code} {exc.message}", code) from exc
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise ServerUnreachableError(f"the kernel's websocket could not be opened: {why}") from exc
        conn.protocol.stream.set_nodelay(True)  # type: ignore[union-attr]  # our small requests leave at once
        self._socket = conn.protocol.stream.socket  # type: ignore[union-attr]
        self._conn = conn
        self.protocol = conn.selected_subprotocol or ""
        self._connected.set()

    # ------------------------------------------------------------------ sending

    def encode(self, msg: dict[str, Any]) -> Encoded:
        pack = self.session.pack
        return [pack(msg["header"]), pack(msg["parent_header"]), pack(msg["metadata"]), pack(msg["content"])]

    async def send(self, channel: str, encoded: Encoded, buffers: list[Any] | None = None) -> None:
        buffers = buffers or []
        if self.protocol == V1_PROTOCOL:
            data: bytes | str = _v1_frame(channel, [*encoded, *buffers])
        else:
            data = _default_frame(channel, encoded, buffers)
        while True:
            await self._connected.wait()
            if self._lost is not None:
                raise ServerUnreachableError(self._lost)
            conn = self._conn
            assert conn is not None
            try:
                self._ack_quickly()
                await conn.write_message(data, binary=isinstance(data, bytes))
                return
            except WebSocketClosedError:
                if conn is self._conn:
                    self._connected.clear()  # the reader reconnects; send again on the new websocket

    # ------------------------------------------------------------------ receiving

    async def _read(self, deliver: Deliver) -> None:
        while True:
            assert self._conn is not None
            data = await self._conn.read_message()
            self._ack_quickly()
            if data is not None:
                self._release_next()
            if data is None:
                if self._closing:
                    return
                self._connected.clear()
                if not await self._reconnect():
                    return
                continue
            try:
                channel, msg = self._decode(data)
            except Exception as exc:  # a malformed message must not stop the reader
                self.rejected_messages += 1
                log.warning("dropped a malformed message from the server: %s", exc)
                continue
            deliver(channel, msg)

    def _ack_quickly(self) -> None:
        """Acknowledge what arrives at once rather than 40 ms later (Linux), re-armed at each read and send.

        Jupyter Server does not disable Nagle's algorithm on its websockets, so it
        holds a reply until the status message it wrote just before is ACKed; with
        our delayed ACKs every round trip took 44 ms here instead of 3.
        """
        if _QUICKACK is not None and self._socket is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass  # closed meanwhile: the reader finds out

    def _release_next(self) -> None:
        """Write an empty unsolicited pong after each message read (RFC 6455 5.5.3: no answer expected).

        Jupyter Server leaves Nagle's algorithm on for kernel websockets, so it
        holds each message until the one before is acknowledged. Direct, our
        TCP_QUICKACK acknowledges at once; behind a proxy (JupyterHub's
        configurable-http-proxy, an ingress) the proxy's own socket to the server
        delays its ACK by 40 ms, and every reply waited for it (48 ms a call
        through the hub's proxy instead of 8). The pong crosses the proxy right
        after the message it follows, and the proxy's segment to the server
        carries the ACK the server is waiting for. A ping would not do: the
        server's pong becomes one more unacknowledged message holding back the next.
        """
        conn = self._conn
        write_frame = getattr(getattr(conn, "protocol", None), "_write_frame", None)  # tornado has no write_pong
        if write_frame is None:
            return
        try:
            write_frame(True, 0xA, b"")
        except (WebSocketClosedError, StreamClosedError):
            pass  # the reader finds out

    def _decode(self, data: bytes | str) -> tuple[str, dict[str, Any]]:
        if isinstance(data, str):
            msg = json.loads(data)
            return msg.pop("channel"), normalize(msg)
        view = memoryview(data)
        if self.protocol == V1_PROTOCOL:
            count = int.from_bytes(view[:8], "little")
            offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
            channel = bytes(view[offsets[0] : offsets[1]]).decode("utf-8")
            parts = [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
            header, parent, metadata, content = (orjson.loads(part) for part in parts[:4])
            msg = {
                "header": header,
                "parent_header": parent,
                "metadata": metadata,
                "content": content,
                "msg_type": header.get("msg_type"),
                "msg_id": header.get("msg_id"),
                # writable, like zmq frames: values built on them (numpy arrays) are writable too
                "buffers": [bytearray(part) for part in parts[4:]],
            }
            return channel, normalize(msg)
        # The default protocol's binary envelope: count, offsets (uint32 big-endian), JSON, buffers.
        count = struct.unpack_from("!I", view)[0]
        offsets = [*struct.unpack_from(f"!{count}I", view, 4), len(view)]
        msg = orjson.loads(view[offsets[0] : offsets[1]])
        msg["buffers"] = [bytearray(view[offsets[i] : offsets[i + 1]]) for i in range(1, count)]
        return msg.pop("channel"), normalize(msg)

    async def _reconnect(self) -> bool:
        """Reopen a dropped websocket with the same session id; give up after RECONNECT_WINDOW."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_WINDOW
        delay = 0.1
        error: Exception | None = None
        while loop.time() < deadline and not self._closing:
            try:
                await self._connect()
                log.info("kernelproxy reopened the websocket to kernel %s", self.kernel_id)
                if self.reconnected is not None:
                    self.reconnected()
                return True
            except ServerError as exc:
                error = exc
                if exc.status == 404 or isinstance(exc, AuthenticationError):
                    self.gone = exc.status == 404
                    break  # the kernel is gone, or we may no longer talk to it: retrying will not help
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        self._lost = (
            f"the websocket to kernel {self.kernel_id} on {self._address.url} closed and could not be "
            f"reopened within {RECONNECT_WINDOW:.0f} s ({error or 'closing'})"
        )
        self._connected.set()  # wake senders, so they raise instead of waiting
        return False

    # ------------------------------------------------------------------ liveness and closing

    async def death(self) -> str | None:
        if self._lost is not None:
            return self._lost
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_status_poll:
            return None
        self._next_status_poll = loop.time() + STATUS_POLL_INTERVAL
        try:
            model = await self._rest.get_kernel(self.kernel_id)
        except ServerError as exc:
            if exc.status == 404:
                self.gone = True
                return f"the kernel {self.kernel_id} no longer exists on the server (culled or shut down there)"
            return None  # a slow or briefly unreachable server: the websocket tells if it is gone
        if model.get("execution_state") == "dead":
            return f"the server reports kernel {self.kernel_id} dead"
        return None

    async def close(self) -> None:
        self._closing = True
        if self._conn is not None:
            self._conn.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


def _v1_frame(channel: str, parts: list[Any]) -> bytes:
    """The v1 protocol: offset count, offsets (uint64 little-endian), channel, then the parts as they are."""
    name = channel.encode("utf-8")
    offsets = [8 * (2 + len(parts) + 1)]
    offsets.append(offsets[0] + len(name))
    for part in parts:
        offsets.append(offsets[-1] + memoryview(part).nbytes)
    head = struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets)
    return b"".join([head, name, *parts])


def _default_frame(channel: str, encoded: Encoded, buffers: list[Any]) -> bytes | str:
    """The default protocol: one JSON text, or with buffers the binary envelope around it."""
    header, parent, metadata, content = (bytes(part) for part in encoded)
    text = (
        b'{"header":' + header + b',"parent_header":' + parent + b',"metadata":' + metadata
        + b',"content":' + content + b',"channel":' + json.dumps(channel, default=json_default).encode() + b"}"
    )
    if not buffers:
        return text.decode("utf-8")
    parts = [text, *buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + memoryview(part).nbytes)
    return b"".join([struct.pack(f"!{len(parts) + 1}I", len(parts), *offsets), *parts])
