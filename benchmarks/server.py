#!/usr/bin/env python
"""Benchmark kernels reached through a Jupyter Server against the direct comm transport.

    python benchmarks/server.py                 # 256 MB transfers, 300 calls per latency row
    python benchmarks/server.py --quick         # 64 MB, 100 calls
    python benchmarks/server.py --sizes 256,1024

Starts a real `jupyter server` on 127.0.0.1 (random port and token, default
configuration: 10 MiB websocket messages, IOPub rate limits on) and, in the
same run, measures:

1. the latency of ``k.call(add, 1, 2)``: a kernel started directly (comm over
   zmq), and server kernels over the websocket (comm, and execute), against a
   raw ``kernel_info_request`` round trip through the same server websocket
   (the floor of that path);
2. push and pull of a float64 array: time and MB/s, same kernels.

Every kernel is this interpreter's ipykernel on this machine, so the
difference is the path: zmq direct, or HTTP server + websocket + zmq.
Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable

import numpy as np
from _common import LOAD_AT_START, MB, log, machine_info, median, p90, section, table

import kernelproxy
from kernelproxy._server import ServerAddress, ServerClient
from kernelproxy._wires.websocket_wire import WebsocketWire


def add(a: int, b: int) -> int:
    return a + b


class Server:
    """A `jupyter server` subprocess with a random port and token."""

    def __init__(self, directory: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{port}/"
        args = [sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={directory}"]
        if os.geteuid() == 0:
            args.append("--allow-root")
        self.log = open(os.path.join(directory, "server.log"), "wb")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                headers = {"Authorization": f"token {self.token}"}
                request = urllib.request.Request(self.url + "api/status", headers=headers)
                urllib.request.urlopen(request, timeout=2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("jupyter server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def time_calls(fn: Callable[[], Any], calls: int) -> list[float]:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def raw_websocket_round_trips(server: Server, kernel_id: str, calls: int) -> list[float]:
    """kernel_info_request → reply through the server's websocket: no kernelproxy above the wire."""

    async def run() -> list[float]:
        rest = ServerClient(ServerAddress.parse(server.url, token=server.token))
        wire = WebsocketWire(rest, kernel_id)
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await wire.start(lambda channel, msg: replies.put_nowait(msg) if channel == "shell" else None)
        times = []
        try:
            for i in range(calls + 20):
                started = time.perf_counter()
                await wire.send("shell", wire.encode(wire.session.msg("kernel_info_request", {})))
                while (await replies.get())["msg_type"] != "kernel_info_reply":
                    pass
                if i >= 20:
                    times.append(time.perf_counter() - started)
        finally:
            await wire.close()
            rest.close()
        return times

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256", help="array sizes in MB, comma-separated")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per latency row")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each transfer")
    parser.add_argument("--quick", action="store_true", help="64 MB, 100 calls, 2 repeats")
    options = parser.parse_args()
    if options.quick:
        options.sizes, options.calls, options.repeat = "64", 100, 2
    sizes = [int(size) for size in options.sizes.split(",")]

    directory = tempfile.mkdtemp(prefix="kernelproxy-bench-")
    log("starting jupyter server")
    server = Server(directory)
    kernels: dict[str, kernelproxy.Kernel] = {}
    failures = 0
    try:
        kernels["direct comm (zmq)"] = kernelproxy.start(transport="comm")
        kernels["server, comm (websocket)"] = kernelproxy.connect_server(server.url, token=server.token)
        kernels["server, execute (websocket)"] = kernelproxy.connect_server(
            server.url, token=server.token, transport="execute"
        )
        for name, k in kernels.items():
            log(f"{name}: {k.info.transport}")

        section("Trivial call latency (ms)")
        latency: dict[str, list[float]] = {}
        server_kernel_id = kernels["server, comm (websocket)"].info.kernel_id
        assert server_kernel_id is not None
        log("raw websocket kernel_info round trips")
        latency["raw kernel_info through the server websocket"] = raw_websocket_round_trips(
            server, server_kernel_id, options.calls
        )
        for name, k in kernels.items():
            log(f"latency: {name}")
            latency[f"kernelproxy {name}: call(add, 1, 2)"] = time_calls(lambda k=k: k.call(add, 1, 2), options.calls)
        floor = median(latency["raw kernel_info through the server websocket"])
        direct = median(latency["kernelproxy direct comm (zmq): call(add, 1, 2)"])
        rows = [
            (name, f"{median(t) * 1e3:.2f}", f"{p90(t) * 1e3:.2f}", f"{median(t) / floor:.2f}x",
             f"{median(t) / direct:.2f}x")
            for name, t in latency.items()
        ]
        print(table(["round trip", "median", "p90", "vs raw server ws", "vs direct comm"], rows))

        section("Array push and pull")
        rows = []
        for size in sizes:
            array = np.random.default_rng(0).random(size * MB // 8)
            results: dict[str, tuple[list[float], list[float]]] = {}
            for name, k in kernels.items():
                pushes, pulls = [], []
                for _ in range(options.repeat):
                    log(f"{size} MB: {name}")
                    started = time.perf_counter()
                    k.push(arr=array)
                    pushes.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    back = k.pull("arr")
                    pulls.append(time.perf_counter() - started)
                    if not np.array_equal(back, array):
                        failures += 1
                    del back
                    k.delete("arr")
                results[name] = (pushes, pulls)
            base_push, base_pull = (median(t) for t in results["direct comm (zmq)"])
            for name, (pushes, pulls) in results.items():
                rows.append((
                    f"{size} MB", name,
                    f"{median(pushes):.3f}", f"{size / median(pushes):.0f}", f"{median(pushes) / base_push:.2f}x",
                    f"{median(pulls):.3f}", f"{size / median(pulls):.0f}", f"{median(pulls) / base_pull:.2f}x",
                ))
        print(table(
            ["size", "path", "push s", "push MB/s", "push vs direct", "pull s", "pull MB/s", "pull vs direct"],
            rows, right=[False, False, True, True, True, True, True, True],
        ))

        section("Machine")
        print(table(["", ""], [*machine_info([("jupyter_server", "jupyter_server"), ("tornado", "tornado")]),
                               ("1-min load at start", f"{LOAD_AT_START:.2f}")], right=[False, False]))
    finally:
        for k in kernels.values():
            k.shutdown()
        server.stop()
    if failures:
        print(f"\n{failures} pulled arrays differed from the pushed ones", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
