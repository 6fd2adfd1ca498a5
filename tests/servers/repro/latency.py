"""Finding: the latency of a trivial round trip through JupyterHub's proxy, direct, and through a gateway.

Usage:
    python tests/servers/repro/latency.py NAME=SERVER.json [NAME=SERVER.json ...] [--calls 200] [--rounds 2]

SERVER.json from ``python tests/servers/serve.py eg|hub SERVER.json``; for a
hub, both the proxy URL and the single-user server's own URL are measured.

Rows, each the median over ``--calls`` back-to-back round trips (after 20 warm-up
ones), per round:

* ``kernelproxy call as shipped``: ``Kernel.call(int)`` (TCP_NODELAY, TCP_QUICKACK re-armed at each read and
  send, an empty unsolicited pong frame (RFC 6455 5.5.3) after each message read: the client-side remedy);
* ``kernelproxy call, no pong``: the same with the pong turned off (kernelproxy before issue 13);
* ``raw kernel_info ...``: a bare tornado websocket client sending ``kernel_info_request`` on shell and
  waiting for the reply, with the socket options and follow-ups named in the row.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

import kernelproxy
from kernelproxy._server import ServerAddress, ServerClient
from kernelproxy._wires.websocket_wire import V1_PROTOCOL, WebsocketWire, _v1_frame

QUICKACK = getattr(socket, "TCP_QUICKACK", None)
WARMUP = 20


def _pong(conn) -> None:
    conn.protocol._write_frame(True, 0xA, b"")  # tornado has no public write_pong; an unsolicited pong is legal


# ---------------------------------------------------------------------- raw websocket client


async def raw_kernel_info(url: str, token: str, calls: int, *, nodelay: bool, quickack: bool, follow_up: str) -> float:
    """Median seconds of a kernel_info round trip over a bare websocket. follow_up: '', 'pong-after-read',
    'ping-after-read', 'pong-after-send'."""
    rest = ServerClient(ServerAddress.parse(url, token=token))
    model = await rest.request("POST", "api/kernels", {"env": {"KERNEL_USERNAME": "kernelproxy-tests"}})
    kernel_id = model["id"]
    session = uuid.uuid4().hex
    try:
        ws_url = rest.address.endpoint(f"api/kernels/{kernel_id}/channels?session_id={session}", websocket=True)
        conn = await websocket_connect(HTTPRequest(ws_url, headers=rest.address.headers()), subprotocols=[V1_PROTOCOL])
        assert conn.selected_subprotocol == V1_PROTOCOL
        sock = conn.protocol.stream.socket
        if nodelay:
            conn.protocol.stream.set_nodelay(True)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

        def ack():
            if quickack and QUICKACK is not None:
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

        async def round_trip() -> float:
            msg_id = uuid.uuid4().hex
            header = {
                "msg_id": msg_id,
                "msg_type": "kernel_info_request",
                "username": "bench",
                "session": session,
                "date": "2026-01-01T00:00:00.000000Z",
                "version": "5.3",
            }
            frame = _v1_frame("shell", [json.dumps(p).encode() for p in (header, {}, {}, {})])
            started = time.perf_counter()
            ack()
            await conn.write_message(frame, binary=True)
            if follow_up == "pong-after-send":
                _pong(conn)
            while True:
                data = await conn.read_message()
                ack()
                if follow_up == "pong-after-read":
                    _pong(conn)
                elif follow_up == "ping-after-read":
                    conn.ping(b"")
                if data is None:
                    raise RuntimeError("websocket closed")
                if isinstance(data, bytes) and msg_id.encode() in data and b"kernel_info_reply" in data:
                    return time.perf_counter() - started

        # The kernel is ready when it answers; the first answers may be slow.
        for _ in range(WARMUP):
            await asyncio.wait_for(round_trip(), 60)
        times = [await round_trip() for _ in range(calls)]
        conn.close()
        return statistics.median(times)
    finally:
        await rest.delete_kernel(kernel_id)
        rest.close()


# ---------------------------------------------------------------------- kernelproxy


def kernelproxy_call(url: str, token: str, calls: int, *, pong: bool) -> float:
    """Median seconds of ``Kernel.call(int)``; ``pong=False`` turns the wire's pong after each read off (before)."""
    original = WebsocketWire._release_next
    if not pong:
        WebsocketWire._release_next = lambda self: None
    try:
        with kernelproxy.connect_server(url, token=token, env={"KERNEL_USERNAME": "kernelproxy-tests"}) as k:
            for _ in range(WARMUP):
                k.call(int)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                k.call(int)
                times.append(time.perf_counter() - started)
            return statistics.median(times)
    finally:
        WebsocketWire._release_next = original


# ---------------------------------------------------------------------- the table


def targets(args: list[str]) -> list[tuple[str, str, str]]:
    found = []
    for arg in args:
        name, _, path = arg.partition("=")
        info = json.loads(Path(path).read_text())
        if info.get("direct_url"):
            found.append((f"{name} via proxy", info["url"], info["token"]))
            found.append((f"{name} direct", info["direct_url"], info["token"]))
        else:
            found.append((name, info["url"], info["token"]))
    return found


ROWS: list[tuple[str, dict[str, Any]]] = [
    ("kernelproxy call, no pong (before)", {"kind": "kp", "pong": False}),
    ("kernelproxy call as shipped (pong after each read)", {"kind": "kp", "pong": True}),
    ("raw kernel_info, no NODELAY, no QUICKACK", {"kind": "raw", "nodelay": False, "quickack": False, "follow_up": ""}),
    ("raw kernel_info, NODELAY + QUICKACK", {"kind": "raw", "nodelay": True, "quickack": True, "follow_up": ""}),
    (
        "raw kernel_info, + pong after send",
        {"kind": "raw", "nodelay": True, "quickack": True, "follow_up": "pong-after-send"},
    ),
    (
        "raw kernel_info, + pong after each read",
        {"kind": "raw", "nodelay": True, "quickack": True, "follow_up": "pong-after-read"},
    ),
    (
        "raw kernel_info, + ping after each read",
        {"kind": "raw", "nodelay": True, "quickack": True, "follow_up": "ping-after-read"},
    ),
]


def main() -> None:
    argv = sys.argv[1:]
    calls = 200
    rounds = 2
    if "--calls" in argv:
        calls = int(argv.pop(argv.index("--calls") + 1))
        argv.remove("--calls")
    if "--rounds" in argv:
        rounds = int(argv.pop(argv.index("--rounds") + 1))
        argv.remove("--rounds")
    where = targets(argv)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for row, options in ROWS:
            for name, url, token in where:
                if options["kind"] == "kp":
                    seconds = kernelproxy_call(url, token, calls, pong=options["pong"])
                else:
                    kwargs = {k: v for k, v in options.items() if k != "kind"}
                    seconds = asyncio.run(raw_kernel_info(url, token, calls, **kwargs))
                results.setdefault((row, name), []).append(seconds * 1e3)
                print(f"  {row:45} {name:24} {seconds * 1e3:7.2f} ms", file=sys.stderr, flush=True)
    names = " | ".join(n for n, _, _ in where)
    header = f"| median of {calls} back-to-back round trips, ms (each round) | {names} |"
    print(header)
    print("|" + "---|" * (len(where) + 1))
    for row, _ in ROWS:
        cells = [" / ".join(f"{v:.1f}" for v in results[(row, name)]) for name, _, _ in where]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
