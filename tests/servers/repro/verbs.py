"""Finding: which kernelproxy verbs work through a server today, and how the others fail.

Usage: python tests/servers/repro/verbs.py SERVER.json [--env KERNEL_USERNAME=alice]
(SERVER.json from ``python tests/servers/serve.py eg|hub SERVER.json``).
Each verb runs on its own; a failure prints the exception kernelproxy raised, and the script goes on.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

import cloudpickle
import numpy as np

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])

info = json.loads(Path(sys.argv[1]).read_text())
env = {}
if "--env" in sys.argv:
    key, _, value = sys.argv[sys.argv.index("--env") + 1].partition("=")
    env[key] = value
url, token = info["url"], info["token"]
results = []


def verb(name):
    def wrap(fn):
        started = time.monotonic()
        try:
            detail = fn()
            results.append((name, "works", detail or "", time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001
            text = f"{type(exc).__name__}: {exc}"
            results.append((name, "FAILS", text, time.monotonic() - started))
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
        return fn

    return wrap


k = None


@verb("connect_server")
def _():
    global k
    k = kernelproxy.connect_server(url, token=token, env=env or None)
    return k.info.transport


@verb("call")
def _():
    assert k.call(pow, 2, 10) == 1024


@verb("call: trivial call median (ms)")
def _():
    k.call(int)
    times = []
    for _ in range(50):
        t = time.perf_counter()
        k.call(int)
        times.append(time.perf_counter() - t)
    return f"{sorted(times)[len(times) // 2] * 1e3:.1f} ms"


@verb("print forwarded")
def _():
    k.call(print, "hello from the kernel")


@verb("remote exception")
def _():
    try:
        k.call(lambda: 1 / 0)
    except ZeroDivisionError:
        return "ZeroDivisionError re-raised"
    raise AssertionError("no exception")


@verb("push/pull 24 MB (in parts)")
def _():
    array = np.random.default_rng(0).random(3 * 2**20)
    k.push(big=array)
    assert np.array_equal(k.pull("big"), array)


@verb("ref")
def _():
    assert k.ref("big").shape.get() == (3 * 2**20,)


@verb("interrupt")
def _():
    future = k.submit(time.sleep, 30)
    time.sleep(1)
    k.interrupt()
    try:
        future.result(15)
    except kernelproxy.CallInterrupted:
        return "CallInterrupted"
    raise AssertionError("not interrupted")


@verb("timeout")
def _():
    try:
        k.options(timeout=1).call(time.sleep, 30)
    except kernelproxy.CallTimeout:
        assert k.call(lambda: 1) == 1
        return "CallTimeout, kernel usable"
    raise AssertionError("no timeout")


@verb("restart")
def _():
    pid = k.call(os.getpid)
    k.restart()
    assert "big" not in k
    return f"new pid: {k.call(os.getpid) != pid}"


@verb("dropped websocket reopened")
def _():
    wire = k.aio._state.connection.wire  # internals: close the websocket under a running call
    future = k.submit(lambda: (__import__("time").sleep(2), "done")[1])
    time.sleep(0.5)
    k._portal.loop.call_soon_threadsafe(wire._conn.close)
    assert future.result(30) == "done"


@verb("kernel SIGKILLed during a call")
def _():
    import signal

    future = k.submit(time.sleep, 60)
    time.sleep(0.5)
    started = time.monotonic()
    os.kill(k.info.pid, signal.SIGKILL)
    try:
        future.result(30)
    except kernelproxy.KernelDiedError:
        took = time.monotonic() - started
        k.restart()
        assert k.call(lambda: 3) == 3
        return f"KernelDiedError after {took:.2f} s; restart() works"
    raise AssertionError("no KernelDiedError")


@verb("attach by kernel_id")
def _():
    with kernelproxy.connect_server(url, token=token, kernel_id=k.info.kernel_id) as other:
        assert other.call(lambda: 2) == 2


@verb("close deletes the kernel")
def _():
    kernel_id = k.info.kernel_id
    k.close()
    try:
        kernelproxy.connect_server(url, token=token, kernel_id=kernel_id).close()
    except kernelproxy.ServerError as exc:
        return f"gone: {type(exc).__name__} {exc.status}"
    raise AssertionError("still there")


@verb("KernelPool.from_server(2)")
def _():
    with kernelproxy.KernelPool.from_server(url, 2, token=token, env=env or None) as pool:
        assert sorted(pool.map(pow, range(10), [2] * 10)) == [i * i for i in range(10)]
        return f"{len({p.info.pid for p in pool.kernels})} kernels"


@verb("KernelPool.from_server(2) without env")
def _():
    with kernelproxy.KernelPool.from_server(url, 2, token=token) as pool:
        assert sorted(pool.map(pow, range(10), [2] * 10)) == [i * i for i in range(10)]


@verb("unknown kernel_name")
def _():
    try:
        kernelproxy.connect_server(url, token=token, env=env or None, kernel_name="nope")
    except kernelproxy.KernelProxyError as exc:
        return f"{type(exc).__name__}: {exc}"


@verb("wrong token")
def _():
    try:
        kernelproxy.connect_server(url, token="wrong", env=env or None)
    except kernelproxy.KernelProxyError as exc:
        return f"{type(exc).__name__}: {exc}"


@verb("wrong token, attach by kernel_id")
def _():
    try:
        kernelproxy.connect_server(url, token="wrong", kernel_id="00000000-0000-0000-0000-000000000000")
    except kernelproxy.KernelProxyError as exc:
        return f"{type(exc).__name__}: {exc}"


print(f"\n{info.get('kind', '')} {url} env={env}")
for name, status, detail, seconds in results:
    print(f"{name:34} {status:5} {seconds:6.2f}s  {detail}")
