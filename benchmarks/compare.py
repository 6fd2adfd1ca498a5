#!/usr/bin/env python
"""Compare kernelproxy with the alternatives, all measured in one run on this machine.

    python benchmarks/compare.py                   # default: about 7-8 min on 2 cores
    python benchmarks/compare.py --quick           # about 1.5 min: 64 MB, 1e6-row DataFrame, 200 cycles
    python benchmarks/compare.py --only latency --backends comm,raw,ipyparallel
    python benchmarks/compare.py --sizes 256 --repeat 5 --only arrays

What is compared (see benchmarks/README.md, "compare.py"):

* kernelproxy over the comm transport and over the execute transport;
* the bare Jupyter floor: raw kernel_info_request, silent execute_request and a
  raw comm round trip (echo target in a raw kernel), with jupyter_client;
* the hand-written "seed" approach (pickle + base64 pasted into cell code), at a
  small size only;
* ipyparallel (1 engine), loky and concurrent.futures.ProcessPoolExecutor (1
  worker), rpyc classic mode;
* raw pyzmq between two processes (REQ/REP ping-pong; one frame each way) and an
  in-process copy: the physical limits.

Workloads: a trivial call's latency; push/pull of float64 arrays (256 MB, 1 GB)
with peak memory in every process involved; a 1e7-row DataFrame, kernelproxy's
protocol-5 path against the same comm with plain cloudpickle; memory drift of
the kernel over 1,000 push/pull/delete cycles. A final table checks the targets.
Progress goes to stderr, tables to stdout. Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle
import numpy as np
import psutil
import zmq
from _common import (  # shared with transfer.py; benchmarks/ is on sys.path when this script runs
    LOAD_AT_START,
    MB,
    OP_TIMEOUT,
    TRIM_SOURCE,
    PeakProbe,
    RawKernel,
    fmt_size,
    log,
    machine_info,
    median,
    p90,
    rss,
    section,
    seed_pull,
    seed_push,
    table,
    trim_memory,
    zmq_transport_of,
)

import kernelproxy
from kernelproxy import _serialization as kp_serialization  # what push() does to a value, for the layout table

SECTIONS = ("latency", "arrays", "small", "dataframe", "drift")
BACKENDS = ("lane", "comm", "execute", "raw", "ipyparallel", "loky", "ppe", "rpyc", "zmq")
STRING_VARIANTS = ("arrow", "python", "object")
GB = 1024 * MB
ECHO_TARGET = "kpbench.echo"

# Registered in the raw kernel: the cheapest possible comm round trip (echo what came, buffers included).
ECHO_TARGET_SOURCE = f"""
def _kpbench_echo_target(comm, open_msg):
    @comm.on_msg
    def _echo(msg):
        comm.send(msg["content"]["data"], buffers=msg.get("buffers"))
get_ipython().kernel.comm_manager.register_target({ECHO_TARGET!r}, _kpbench_echo_target)
del _kpbench_echo_target
"""

# The raw pyzmq peer: a REP socket holding frames by name, zero-copy both ways.
ZMQ_SERVER_SOURCE = r"""
import ctypes, gc, os, sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.REP)
sock.bind(sys.argv[1])
print("ready", flush=True)
store = {}
while True:
    parts = sock.recv_multipart(copy=False)
    op = parts[0].bytes
    if op == b"ping":
        sock.send(b"pong")
    elif op == b"put":
        store[parts[1].bytes] = parts[2]
        sock.send(b"ok")
    elif op == b"get":
        sock.send(store[parts[1].bytes], copy=False)
    elif op == b"del":
        del store[parts[1].bytes]
        sock.send(b"ok")
    elif op == b"trim":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except Exception:
            pass
        sock.send(b"ok")
    elif op == b"pid":
        sock.send(str(os.getpid()).encode())
    else:
        sock.send(b"bye")
        break
sock.close(linger=0)
ctx.term()
"""

# rpyc classic server (what `rpyc_classic.py` runs: ThreadedServer + SlaveService), on a free localhost port.
RPYC_SERVER_SOURCE = r"""
import sys
from rpyc.core import SlaveService
from rpyc.utils.server import ThreadedServer
server = ThreadedServer(SlaveService, hostname="127.0.0.1", port=0, auto_register=False,
                        protocol_config={"sync_request_timeout": float(sys.argv[1])})
print(server.port, flush=True)
server.start()
"""


# ----------------------------------------------------------------------------- functions run in workers


def add(a: int, b: int) -> int:
    return a + b


def _worker_values() -> dict:
    """A dict that lives as long as the worker process (loky/PPE have no user namespace)."""
    import sys
    import types

    module = sys.modules.get("_kpbench_store")
    if module is None:
        module = sys.modules["_kpbench_store"] = types.ModuleType("_kpbench_store")
        module.values = {}  # type: ignore[attr-defined]
    return module.values  # type: ignore[attr-defined,no-any-return]


def worker_store(name: str, value: Any) -> None:
    _worker_values()[name] = value


def worker_fetch(name: str) -> Any:
    return _worker_values()[name]


def worker_drop(name: str) -> None:
    del _worker_values()[name]


def worker_pid() -> int:
    return os.getpid()


def kernel_load_plain(name: str, blob: Any) -> None:
    """comm + plain cloudpickle, kernel side of a push: one buffer in, cloudpickle.loads, into the namespace."""
    import cloudpickle
    import IPython

    IPython.get_ipython().user_ns[name] = cloudpickle.loads(blob)


def kernel_dump_plain(name: str) -> Any:
    """comm + plain cloudpickle, kernel side of a pull: cloudpickle.dumps as one bytes, sent as one buffer."""
    import pickle

    import cloudpickle
    import IPython

    return pickle.PickleBuffer(cloudpickle.dumps(IPython.get_ipython().user_ns[name]))


def kernel_object_count() -> int:
    import gc

    return len(gc.get_objects())


# ----------------------------------------------------------------------------- backends


class Backend:
    """One way to run code in another process: a call, and push/pull/delete of named values."""

    key = ""
    label = ""
    how = ""
    supports_dataframe = True
    slow = False  # moves data at a few MB/s: transfers only at the small size (section 3)
    failed: str | None = None  # why this backend was dropped from the rest of the run

    def __init__(self) -> None:
        self.pid: int | None = None  # the process that receives pushed values
        self.others: dict[str, int] = {}  # other processes whose memory counts (ipyparallel's controller)

    def call_add(self) -> int:
        raise NotImplementedError

    def push(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def pull(self, name: str) -> Any:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def trim(self) -> None:
        """gc + malloc_trim in the worker (twice, so leftovers of the last request are gone too)."""

    def after_transfer(self) -> None:
        """Untimed clean-up after each transfer (caches a library keeps)."""

    def close(self) -> None:
        pass


class KernelproxyBackend(Backend):
    def __init__(self, transport: str, ipython_dir: str) -> None:
        super().__init__()
        self.key = transport
        self.k = kernelproxy.start(transport=transport, env={"IPYTHONDIR": ipython_dir})
        self.quiet = self.k.options(output="discard")
        self.label = f"kernelproxy[{transport}]"
        self.how = f"{self.k.info.transport}; {zmq_transport_of(self.k)} sockets"
        self.pid = self.k.info.pid

    def call_add(self) -> int:
        return self.k.call(add, 1, 2)

    def push(self, name: str, value: Any) -> None:
        self.k.push(**{name: value})

    def pull(self, name: str) -> Any:
        return self.k.pull(name)

    def delete(self, name: str) -> None:
        del self.k[name]

    def trim(self) -> None:
        self.k.call(trim_memory)
        self.k.call(trim_memory)

    def close(self) -> None:
        self.k.close()


class PlainCloudpickleOverComm(Backend):
    """The same comm transport and kernel, but the value travels as one plain cloudpickle.dumps() buffer."""

    def __init__(self, base: KernelproxyBackend) -> None:
        super().__init__()
        self.base = base
        self.key = "comm-plain"
        self.label = "comm + plain cloudpickle"
        self.how = "cloudpickle.dumps(value) (no buffer_callback) sent as one out-of-band buffer, loads() there"
        self.pid = base.pid

    def push(self, name: str, value: Any) -> None:
        self.base.k.call(kernel_load_plain, name, pickle.PickleBuffer(cloudpickle.dumps(value)))

    def pull(self, name: str) -> Any:
        return cloudpickle.loads(self.base.k.call(kernel_dump_plain, name))

    def delete(self, name: str) -> None:
        self.base.delete(name)

    def trim(self) -> None:
        self.base.trim()


class SeedBackend(Backend):
    """The hand-written approach: pickle + base64 pasted into cell code; pulled through user_expressions."""

    key = "seed"
    label = "seed (pickle+b64 in cell code)"
    how = "execute_request with the base64 in the code (store_history=True); pull via user_expressions text/plain"
    supports_dataframe = False
    slow = True

    def __init__(self, raw: RawKernel) -> None:
        super().__init__()
        self.raw = raw
        self.pid = raw.pid

    def push(self, name: str, value: Any) -> None:
        assert name == "arr", "the seed approach's code is written for a variable named arr"
        seed_push(self.raw, value)

    def pull(self, name: str) -> Any:
        return seed_pull(self.raw)

    def delete(self, name: str) -> None:
        self.raw.run_silent(f"del {name}")
        self.raw.drain_iopub()

    def trim(self) -> None:
        self.raw.run_silent(TRIM_SOURCE)
        self.raw.run_silent(TRIM_SOURCE)
        self.raw.drain_iopub()  # execute_input echoes every pasted cell on IOPub: read it, as a client would


class IpyparallelBackend(Backend):
    key = "ipyparallel"
    label = "ipyparallel"

    def __init__(self, profile_dir: str) -> None:
        super().__init__()
        import ipyparallel as ipp
        from IPython.core.profiledir import ProfileDir

        ProfileDir.create_profile_dir(profile_dir)
        self.cluster = ipp.Cluster(n=1, profile_dir=profile_dir, log_level=logging.WARNING)
        self.rc = None
        self.engine_children: list[int] = []
        try:
            self.rc = self.cluster.start_and_connect_sync(n=1)
            self.rc.wait_for_engines(1, timeout=120)
            self.dview = self.rc[:]
            self.pid = int(self.dview.apply_sync(os.getpid)[0])
            # the engine's own children (its "nanny"): they outlive stop_cluster_sync() by up to a minute
            self.engine_children = [child.pid for child in psutil.Process(self.pid).children(recursive=True)]
            controller = getattr(self.cluster.controller, "process", None)
            if controller is not None:
                self.others["controller"] = int(controller.pid)
        except BaseException:
            self.close()
            raise
        self.how = f"ipyparallel {ipp.__version__}: Cluster(n=1), rc[:].apply_sync / push / pull(block=True)"

    def call_add(self) -> int:
        return int(self.dview.apply_sync(add, 1, 2)[0])

    def push(self, name: str, value: Any) -> None:
        self.dview.push({name: value}, block=True)

    def pull(self, name: str) -> Any:
        return self.dview.pull(name, block=True)[0]

    def delete(self, name: str) -> None:
        self.dview.execute(f"del {name}", block=True)

    def trim(self) -> None:
        self.dview.execute(TRIM_SOURCE, block=True)
        self.dview.execute(TRIM_SOURCE, block=True)

    def after_transfer(self) -> None:
        # The client caches every result and the hub stores every request/result (buffers included):
        # drop both, or each repeat would leave the previous payload behind.
        self.rc.purge_everything()

    def close(self) -> None:
        try:
            if self.rc is not None:
                self.rc.close()
        finally:
            try:
                self.cluster.stop_cluster_sync()
            finally:
                stop_pids(self.engine_children)


class ExecutorBackend(Backend):
    """loky or ProcessPoolExecutor: submit(fn, *args).result(); values live in a dict in the worker."""

    def __init__(self, key: str, executor: Any, label: str, how: str) -> None:
        super().__init__()
        self.key = key
        self.executor = executor
        self.label = label
        self.how = how
        self.pid = int(self.executor.submit(worker_pid).result())

    def call_add(self) -> int:
        return int(self.executor.submit(add, 1, 2).result())

    def push(self, name: str, value: Any) -> None:
        self.executor.submit(worker_store, name, value).result()

    def pull(self, name: str) -> Any:
        return self.executor.submit(worker_fetch, name).result()

    def delete(self, name: str) -> None:
        self.executor.submit(worker_drop, name).result()

    def trim(self) -> None:
        self.executor.submit(trim_memory).result()
        self.executor.submit(trim_memory).result()


def start_loky() -> ExecutorBackend:
    import loky

    # timeout: loky stops idle workers after 300 s by default; the worker must survive the whole run.
    # LOKY_MAX_MEMORY_LEAK_SIZE: loky restarts a worker whose RSS grew by more than 300 MB since it started
    # (its leak guard), which would drop a pushed 1 GB array; the worker reads it from its environment.
    previous = os.environ.get("LOKY_MAX_MEMORY_LEAK_SIZE")
    os.environ["LOKY_MAX_MEMORY_LEAK_SIZE"] = str(1 << 50)
    try:
        executor = loky.get_reusable_executor(max_workers=1, timeout=24 * 3600)
        backend = ExecutorBackend(
            "loky",
            executor,
            "loky",
            f"loky {loky.__version__}: get_reusable_executor(max_workers=1).submit(...).result(); "
            "leak guard off (LOKY_MAX_MEMORY_LEAK_SIZE)",
        )
    finally:
        if previous is None:
            del os.environ["LOKY_MAX_MEMORY_LEAK_SIZE"]
        else:
            os.environ["LOKY_MAX_MEMORY_LEAK_SIZE"] = previous
    backend.close = lambda: executor.shutdown(wait=True, kill_workers=True)  # type: ignore[method-assign]
    return backend


def start_ppe() -> ExecutorBackend:
    import multiprocessing

    executor = concurrent.futures.ProcessPoolExecutor(1)
    backend = ExecutorBackend(
        "ppe",
        executor,
        "ProcessPoolExecutor",
        f"concurrent.futures.ProcessPoolExecutor(1), start method {multiprocessing.get_start_method()!r}",
    )
    backend.close = lambda: executor.shutdown(wait=True, cancel_futures=True)  # type: ignore[method-assign]
    return backend


class RpycBackend(Backend):
    key = "rpyc"
    label = "rpyc classic"
    slow = True

    def __init__(self) -> None:
        super().__init__()
        import rpyc
        import rpyc.utils.classic

        self.rpyc = rpyc
        self.classic = rpyc.utils.classic
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RPYC_SERVER_SOURCE, str(OP_TIMEOUT)], stdout=subprocess.PIPE, text=True
        )
        self.conn = None
        try:
            port = int(self.proc.stdout.readline())  # type: ignore[union-attr]
            config = {"sync_request_timeout": OP_TIMEOUT}
            deadline = time.monotonic() + 30
            while True:  # the server prints its port when bound, a moment before it listens
                try:
                    self.conn = rpyc.connect("127.0.0.1", port, service=rpyc.ClassicService, config=config)
                    break  # = rpyc.classic.connect(), with a longer sync_request_timeout
                except ConnectionRefusedError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.05)
            self.radd = self.classic.teleport_function(self.conn, add)
            self.pid = int(self.conn.modules.os.getpid())
        except BaseException:
            self.close()
            raise
        self.how = (
            f"rpyc {rpyc.__version__}: ThreadedServer(SlaveService) subprocess on 127.0.0.1; teleport_function, "
            "classic.deliver/obtain (pickle, zlib-compressed channel)"
        )

    def call_add(self) -> int:
        return int(self.radd(1, 2))

    def push(self, name: str, value: Any) -> None:
        self.conn.namespace[name] = self.classic.deliver(self.conn, value)

    def pull(self, name: str) -> Any:
        return self.classic.obtain(self.conn.namespace[name])

    def delete(self, name: str) -> None:
        del self.conn.namespace[name]

    def trim(self) -> None:
        self.conn.execute(TRIM_SOURCE)
        self.conn.execute(TRIM_SOURCE)

    def close(self) -> None:
        # The server first: conn.close() is a synchronous request, it would wait for a server still busy
        # with an interrupted transfer.
        stop_process(self.proc)
        if self.conn is not None:
            with contextlib.suppress(Exception):  # the server is gone; the socket is closed either way
                self.conn.close()


class ZmqBackend(Backend):
    """Raw pyzmq, no serialization: the array's memory as one frame, zero-copy on both sides."""

    key = "zmq"
    label = "raw pyzmq (1 frame)"
    supports_dataframe = False

    def __init__(self, scratch: str, sockets: str) -> None:
        super().__init__()
        if sockets == "ipc":
            self.address = f"ipc://{os.path.join(scratch, 'zmq-bench')}"
        else:
            with contextlib.closing(__import__("socket").socket()) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.address = f"tcp://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZMQ_SERVER_SOURCE, self.address], stdout=subprocess.PIPE, text=True
        )
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.linger = 0
        self.shapes: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        try:
            if self.proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("the raw pyzmq peer did not start")
            self.sock.connect(self.address)
            self.pid = int(self.request(b"pid").bytes)
        except BaseException:
            self.close()
            raise
        self.how = f"pyzmq {zmq.__version__}: REQ/REP over {sockets}, send(copy=False)/recv(copy=False), no pickle"

    def request(self, *parts: Any) -> Any:
        self.sock.send_multipart(list(parts), copy=False)
        return self.sock.recv(copy=False)

    def call_add(self) -> int:
        assert self.request(b"ping").bytes == b"pong"
        return 3

    def push(self, name: str, value: Any) -> None:
        assert isinstance(value, np.ndarray) and value.flags.c_contiguous
        self.shapes[name] = (value.dtype, value.shape)
        assert self.request(b"put", name.encode(), memoryview(value).cast("B")).bytes == b"ok"

    def pull(self, name: str) -> Any:
        dtype, shape = self.shapes[name]
        return np.frombuffer(self.request(b"get", name.encode()).buffer, dtype=dtype).reshape(shape)

    def delete(self, name: str) -> None:
        self.request(b"del", name.encode())
        del self.shapes[name]

    def trim(self) -> None:
        self.request(b"trim")
        self.request(b"trim")

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.pid is not None:
                self.sock.send(b"quit")
                if self.sock.poll(5000):
                    self.sock.recv()
        finally:
            self.sock.close(linger=0)
            self.ctx.term()
            stop_process(self.proc)


class RawJupyter:
    """The Jupyter floor: a kernel driven with jupyter_client alone, plus an echo comm target in it."""

    def __init__(self, ipython_dir: str, sockets: str, scratch: str) -> None:
        self.raw = RawKernel(ipython_dir, sockets, scratch)
        self.kc = self.raw.kc
        try:
            self.raw.run_silent(ECHO_TARGET_SOURCE)
            self.comm_id = uuid.uuid4().hex
            content = {"comm_id": self.comm_id, "target_name": ECHO_TARGET, "data": {}}
            msg = self.kc.session.msg("comm_open", content)
            self.kc.shell_channel.send(msg)
            self.raw.wait_idle(msg["header"]["msg_id"])
            if self.comm_round_trip() != {"x": 1}:
                raise RuntimeError("the raw kernel's echo comm did not echo")
            self.raw.drain_iopub()
        except BaseException:
            self.raw.close()
            raise

    def kernel_info(self) -> None:
        self.raw.wait_shell_reply(self.kc.kernel_info())

    def execute_silent(self) -> None:
        reply = self.raw.wait_shell_reply(self.kc.execute("1+2", silent=True, store_history=False))
        assert reply["content"]["status"] == "ok", reply["content"]

    def comm_send(self) -> str:
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": {"x": 1}})
        self.kc.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def wait_comm_reply(self, msg_id: str) -> dict:
        while True:
            msg = self.kc.get_iopub_msg(timeout=OP_TIMEOUT)
            if msg["msg_type"] == "comm_msg" and msg["parent_header"].get("msg_id") == msg_id:
                return dict(msg["content"]["data"])

    def comm_round_trip(self) -> dict:
        return self.wait_comm_reply(self.comm_send())

    def comm_round_trip_idle(self) -> None:
        msg_id = self.comm_send()
        self.wait_comm_reply(msg_id)
        self.raw.wait_idle(msg_id)

    def close(self) -> None:
        self.raw.close()


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """Terminate processes we started indirectly (by pid), if still running after ``grace`` seconds."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# ----------------------------------------------------------------------------- measurement


@dataclass
class Transfer:
    """One method x operation x workload: times and memory over repeats."""

    workload: str
    payload: int  # bytes
    op: str  # push / pull
    method: str
    times: list[float] = field(default_factory=list)
    peak: dict[str, list[int | None]] = field(default_factory=dict)  # role -> VmHWM - VmRSS before, per repeat
    left: dict[str, list[int | None]] = field(default_factory=dict)  # role -> RSS after settling - before - kept


CHECKS: list[tuple[str, bool]] = []


def check(ok: bool, what: str) -> None:
    CHECKS.append((what, ok))
    if not ok:
        print(f"!! CORRECTNESS FAILURE: {what}", file=sys.stderr)


def arrays_equal(pulled: Any, original: np.ndarray) -> bool:
    return (
        isinstance(pulled, np.ndarray)
        and pulled.dtype == original.dtype
        and pulled.shape == original.shape
        and np.array_equal(pulled, original)
    )


def frames_equal(pulled: Any, original: Any) -> bool:
    import pandas as pd

    return (
        isinstance(pulled, pd.DataFrame)
        and list(pulled.dtypes.astype(str)) == list(original.dtypes.astype(str))
        and pulled.equals(original)
    )


def make_array(size_mb: float) -> np.ndarray:
    return np.random.default_rng(int(size_mb * 1000)).random(int(size_mb * MB) // 8)


class Probes:
    """Peak-memory probes of the host and of one backend's processes."""

    def __init__(self, host: PeakProbe, backend: Backend) -> None:
        self.roles: dict[str, PeakProbe] = {"host": host}
        if backend.pid is not None:
            self.roles["worker"] = PeakProbe(backend.pid)
        for name, pid in backend.others.items():
            self.roles[name] = PeakProbe(pid)


def measured(result: Transfer, fn: Callable[[], Any], probes: Probes, keeps: dict[str, int], backend: Backend) -> Any:
    """Time fn() with the peak memory of every process around it (see transfer.py's measured())."""

    def settle() -> None:
        backend.trim()
        trim_memory()

    settle()
    ordered = list(probes.roles.items())
    for _, probe in reversed(ordered):  # the host last, closest to the start
        probe.begin()
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    peaks = {role: probe.end() for role, probe in ordered}
    result.times.append(elapsed)
    backend.after_transfer()
    settle()
    for role, probe in ordered:
        peak = peaks[role]
        result.peak.setdefault(role, []).append(peak)
        left = None if peak is None else rss(probe.pid) - probe.before - keeps.get(role, 0)
        result.left.setdefault(role, []).append(left)
    return value


def guarded(backend: Backend, what: str, fn: Callable[[], None]) -> None:
    """Run one measurement; a backend that fails is reported and left out of the rest of the run."""
    if backend.failed:
        return
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one broken backend must not end the whole comparison
        traceback.print_exc()
        backend.failed = f"{what}: {type(exc).__name__}: {exc}"
        check(False, f"{backend.label} failed during {backend.failed}; left out from there on")


def push_pull(
    backend: Backend,
    value: Any,
    payload: int,
    workload: str,
    probes: Probes,
    results: dict[tuple[str, str, str], Transfer],
    equal: Callable[[Any, Any], bool],
    name: str = "arr",
) -> None:
    """One repeat: push (timed), pull (timed), check, delete."""
    push = results.setdefault((workload, "push", backend.label), Transfer(workload, payload, "push", backend.label))
    pull = results.setdefault((workload, "pull", backend.label), Transfer(workload, payload, "pull", backend.label))
    measured(push, lambda: backend.push(name, value), probes, {"worker": payload}, backend)
    pulled = measured(pull, lambda: backend.pull(name), probes, {"host": payload}, backend)
    check(equal(pulled, value), f"{backend.label} {workload}: pulled value equals the pushed one")
    del pulled
    backend.delete(name)
    backend.after_transfer()
    gc.collect()


def push_pull_rounds(
    backends: list[Backend],
    value: Any,
    payload: int,
    workload: str,
    probes_of: Callable[[Backend], Probes],
    results: dict[tuple[str, str, str], Transfer],
    equal: Callable[[Any, Any], bool],
    *,
    repeats: int,
    what: str,
    progress: str,
    name: str = "arr",
) -> None:
    """``repeats`` rounds of push_pull() over ``backends``, each one guarded() as ``what``.

    Round i starts at backends[i % len(backends)]: interleaved, rotating order, so drift in load hits every
    backend alike. Each transfer is logged as ``progress`` (str.format fields {workload}, {repeat}, {repeats})
    followed by ": " and the backend's label.
    """
    if not backends:
        return
    for index in range(repeats):
        shift = index % len(backends)
        for b in backends[shift:] + backends[:shift]:
            log(f"{progress.format(workload=workload, repeat=index + 1, repeats=repeats)}: {b.label}")
            guarded(
                b, what, lambda b=b: push_pull(b, value, payload, workload, probes_of(b), results, equal, name=name)
            )


# ----------------------------------------------------------------------------- formatting


def ms(values: Sequence[float]) -> list[float]:
    return [v * 1000 for v in values]


def fmt_x(values: Sequence[int | None], payload: int) -> str:
    known = [v / payload for v in values if v is not None]
    return f"{median(known):.2f}/{p90(known):.2f}" if known else "n/a"


def fmt_mb_median(values: Sequence[int | None]) -> str:
    known = [v / MB for v in values if v is not None]
    return f"{median(known):.0f}" if known else "n/a"


def round_trip_times(results: dict, workload: str, method: str) -> list[float]:
    """push + pull time, per repeat."""
    push = results.get((workload, "push", method))
    pull = results.get((workload, "pull", method))
    if push is None or pull is None:
        return []
    return [a + b for a, b in zip(push.times, pull.times)]


def median_peak_x(result: Transfer | None, role: str) -> float | None:
    if result is None:
        return None
    known = [v / result.payload for v in result.peak.get(role, []) if v is not None]
    return median(known) if known else None


# ----------------------------------------------------------------------------- sections


def bench_latency(variants: dict[str, Callable[[], Any]], calls: int, drain: Callable[[], None], rounds: int = 10):
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        for _ in range(20):
            fn()
        drain()
    per_round = max(1, calls // rounds)
    names = list(variants)
    for round_index in range(rounds):
        shift = round_index % len(names)  # interleaved, rotating order: drift in load hits every variant alike
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            drain()
    return times


def print_latency(times: dict[str, list[float]], references: list[str]) -> None:
    refs = [r for r in references if r in times]
    rows = []
    for name, values in times.items():
        row = [name, len(values), f"{median(ms(values)):.3f}", f"{p90(ms(values)):.3f}", f"{min(ms(values)):.3f}"]
        row += [f"{median(values) / median(times[r]):.2f}x" for r in refs]
        rows.append(row)
    headers = ["operation", "n", "median ms", "p90 ms", "min ms"] + [f"/ {r.split(':')[0]}" for r in refs]
    print(table(headers, rows, right=[False] + [True] * (len(headers) - 1)))
    print("  ratio columns: this row's median / that row's median (below 1: faster than it).")
    for r in refs:
        print(f"  {r.split(':')[0]} = {r}")


def print_transfers(results: dict, workloads: list[str], memcpy: dict[str, list[float]], reference: str) -> None:
    rows = []
    for workload in workloads:
        methods = list(dict.fromkeys(key[2] for key in results if key[0] == workload))
        payload = next(r.payload for key, r in results.items() if key[0] == workload)
        size_mb = payload / MB
        copy_times = memcpy.get(workload)
        if copy_times:
            rows.append(
                [workload, "copy", "arr.copy() in-process", len(copy_times), f"{median(copy_times):.3f}"]
                + [f"{p90(copy_times):.3f}", f"{size_mb / median(copy_times):.0f}"]
                + [f"{size_mb / p90(copy_times):.0f}", "100%", ""]
            )
        for op in ("push", "pull", "push+pull"):
            ref_times = (
                round_trip_times(results, workload, reference)
                if op == "push+pull"
                else getattr(results.get((workload, op, reference)), "times", [])
            )
            for method in methods:
                if op == "push+pull":
                    times = round_trip_times(results, workload, method)
                    size = 2 * size_mb
                else:
                    result = results.get((workload, op, method))
                    times = result.times if result else []
                    size = size_mb
                if not times:
                    continue
                of_copy = f"{100 * (size / median(times)) / (size_mb / median(copy_times)):.1f}%" if copy_times else ""
                vs = f"{median(times) / median(ref_times):.2f}x" if ref_times else ""
                rows.append(
                    [workload, op, method, len(times), f"{median(times):.3f}", f"{p90(times):.3f}"]
                    + [f"{size / median(times):.0f}", f"{size / p90(times):.0f}", of_copy, vs]
                )
    headers = ["workload", "op", "method", "n", "med s", "p90 s", "MB/s med", "MB/s p90", "of memcpy"]
    headers += [f"time / {reference}"]
    print(table(headers, rows, right=[False, False, False] + [True] * 7))
    print(
        f"  push+pull: the two times of one repeat added; MB/s counts the payload twice. 'time / {reference}': this\n"
        f"  median time over {reference}'s (above 1: {reference} is that many times faster). 'of memcpy': MB/s med\n"
        "  as a share of arr.copy()'s MB/s med at that size (one copy in one process: the physical limit)."
    )


def print_memory(results: dict, workloads: list[str]) -> None:
    rows = []
    for workload in workloads:
        for (w, op, method), r in results.items():
            if w != workload:
                continue
            other_roles = [role for role in r.peak if role not in ("host", "worker")]
            others = ", ".join(f"{role} {fmt_x(r.peak[role], r.payload)}" for role in other_roles)
            rows.append(
                [workload, op, method]
                + [fmt_x(r.peak.get("worker", []), r.payload), fmt_mb_median(r.peak.get("worker", []))]
                + [fmt_mb_median(r.left.get("worker", []))]
                + [fmt_x(r.peak.get("host", []), r.payload), fmt_mb_median(r.peak.get("host", []))]
                + [fmt_mb_median(r.left.get("host", [])), others]
            )
    headers = ["workload", "op", "method", "work dpeak x", "MB", "left MB", "host dpeak x", "MB", "left MB", "other"]
    print(table(headers, rows, right=[False, False, False] + [True] * 6 + [False]))
    print(
        "  dpeak x: (peak RSS during the transfer - RSS just before) / payload, median/p90 over repeats, exact\n"
        "           (/proc/<pid>/clear_refs=5 resets VmHWM, VmHWM read after). The receiving side keeps the value,\n"
        "           so its dpeak includes 1.00x (the worker on push, the host on pull); 'peak memory as a multiple\n"
        "           of the payload' is this number. MB: the same dpeak in MB (median).\n"
        "  left MB: RSS after the transfer (gc + malloc_trim on both sides) - RSS before - the kept payload.\n"
        "  work: the process that receives pushes (kernel, engine, worker, server). other: ipyparallel's controller."
    )


# ----------------------------------------------------------------------------- DataFrames


def make_frame(rows: int, strings: str) -> Any:
    import pandas as pd

    rng = np.random.default_rng(rows)
    ids = rng.integers(0, 1_000_000, rows)
    text = ("user-" + pd.Series(ids % 100_000).astype(str)).astype(object)
    if strings == "arrow":
        text = text.astype(pd.StringDtype("pyarrow", na_value=np.nan))  # pandas 3's "str" with pyarrow installed
    elif strings == "python":
        text = text.astype(pd.StringDtype("python", na_value=np.nan))  # pandas 3's "str" without pyarrow
    return pd.DataFrame(
        {
            "x": rng.random(rows),
            "n": ids,
            "t": pd.date_range("2020-01-01", periods=rows, freq="s"),
            "s": text,
        }
    )


def frame_layout(df: Any) -> list[list[Any]]:
    """Per column: how kernelproxy's push pickles it (pickle stream vs out-of-band buffers)."""
    rows = []
    for column in list(df.columns) + [None]:
        part = df if column is None else df[[column]]
        frames = kp_serialization.dumps(part)
        band = frames[0].nbytes
        out = sum(f.nbytes for f in frames[1:])
        rows.append(
            [
                "(whole frame)" if column is None else column,
                "" if column is None else str(df[column].dtype),
                "" if column is None else type(df[column].array).__name__,
                f"{part.memory_usage(deep=True, index=column is None).sum() / MB:.0f}",
                f"{band / MB:.1f}",
                f"{out / MB:.1f}",
                len(frames) - 1,
                f"{100 * out / max(band + out, 1):.0f}%",
            ]
        )
    return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small and fast (~1.5 min): see the docstring")
    parser.add_argument("--only", help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--backends", help=f"comma-separated: {', '.join(BACKENDS)} (default: all installed)")
    parser.add_argument("--sizes", help="array sizes in MB, comma-separated (default 256,1024; quick: 64)")
    parser.add_argument("--repeat", type=int, help="repeats per array transfer (default: 3 below 1 GB, 2 from 1 GB)")
    parser.add_argument("--calls", type=int, help="timed calls per latency variant (default 300, quick 60)")
    parser.add_argument(
        "--small-size", type=float, help="MB for the slow methods, seed approach and rpyc (default 8, quick 2)"
    )
    parser.add_argument("--rows", type=int, help="DataFrame rows (default 10,000,000; quick 1,000,000)")
    parser.add_argument("--df-repeat", type=int, help="repeats per DataFrame transfer (default 2)")
    parser.add_argument(
        "--strings",
        help=f"DataFrame string column storages, comma-separated: {', '.join(STRING_VARIANTS)} (default arrow,python)",
    )
    parser.add_argument("--cycles", type=int, help="push/pull/delete cycles for the drift test (default 1000)")
    parser.add_argument(
        "--drift-transports",
        default="lane,comm",
        help="kernelproxy transports for the drift test (default lane,comm)",
    )
    parser.add_argument("--zmq-sockets", choices=["ipc", "tcp"], default="ipc", help="raw pyzmq transport (ipc)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sections = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    args.backends = [b.strip() for b in (args.backends or ",".join(BACKENDS)).split(",") if b.strip()]
    args.sizes = sorted({float(s) for s in (args.sizes or ("64" if quick else "256,1024")).split(",") if s.strip()})
    args.calls = args.calls or (60 if quick else 300)
    args.small_size = args.small_size if args.small_size is not None else (2.0 if quick else 8.0)
    args.rows = args.rows or (1_000_000 if quick else 10_000_000)
    args.df_repeat = args.df_repeat or 2
    args.strings = [s.strip() for s in (args.strings or "arrow,python").split(",") if s.strip()]
    args.cycles = args.cycles or (200 if quick else 1000)
    bad = [s for s in args.sections if s not in SECTIONS] + [b for b in args.backends if b not in BACKENDS]
    bad += [s for s in args.strings if s not in STRING_VARIANTS]
    if bad:
        parser.error(f"unknown section, backend or string storage: {', '.join(bad)}")
    if any(s <= 0 for s in args.sizes) or (args.repeat is not None and args.repeat < 1) or args.calls < 10:
        parser.error("sizes must be positive, --repeat >= 1, --calls >= 10")
    return args


def repeats_for(size_mb: float, args: argparse.Namespace) -> int:
    if args.repeat:
        return int(args.repeat)
    if args.quick:
        return 2
    return 2 if size_mb >= 1024 else 3


class Run:
    """Everything started, for the sections and for the clean-up."""

    def __init__(self, args: argparse.Namespace, scratch: str) -> None:
        self.args = args
        self.scratch = scratch
        self.backends: dict[str, Backend] = {}
        self.raw: RawJupyter | None = None
        self.failed_to_start: list[tuple[str, str]] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []

    def start(self, key: str, starter: Callable[[], Any]) -> Any:
        if key not in self.args.backends:
            return None
        log(f"starting {key}")
        for attempt in (1, 2):  # a loaded 2-core machine can stall a start; the second failure counts
            try:
                started = starter()
                break
            except ImportError as exc:
                self.failed_to_start.append((key, f"not installed ({exc}); pip install it to compare"))
                return None
            except Exception as exc:  # noqa: BLE001 - report, run the rest
                traceback.print_exc()
                why = f"{type(exc).__name__}: {exc}"
                if attempt == 2:
                    self.failed_to_start.append((key, f"failed to start twice, last: {why}"))
                    check(False, f"{key} failed to start: {why}")
                    return None
                self.failed_to_start.append((key, f"first start failed ({why}), started on the second attempt"))
                log(f"starting {key} failed, retrying once")
        self.cleanups.append((key, started.close))
        if isinstance(started, Backend):
            self.backends[key] = started
        return started

    def close_all(self) -> None:
        for key, close in reversed(self.cleanups):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - still close the others
                print(f"closing {key} failed: {exc!r}", file=sys.stderr)
        self.cleanups = []


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM: still stop every worker (finally below)
    print("kernelproxy comparison benchmark")
    print(
        f"options: sections {', '.join(args.sections)}; backends {', '.join(args.backends)}; arrays "
        f"{', '.join(f'{fmt_size(s)} x {repeats_for(s, args)}' for s in args.sizes)}; {args.calls} calls per latency "
        f"variant; seed approach and rpyc at {fmt_size(args.small_size)}; DataFrame {args.rows:,} rows x "
        f"{args.df_repeat} ({', '.join(args.strings)} strings); drift {args.cycles} cycles ({args.drift_transports})"
    )
    section("Machine")
    extra = [
        (label, dist)
        for label, dist in [
            ("pandas", "pandas"),
            ("pyarrow", "pyarrow"),
            ("blake3", "blake3"),
            ("ipyparallel", "ipyparallel"),
            ("loky", "loky"),
            ("rpyc", "rpyc"),
        ]
    ]
    print(table(["", ""], machine_info(extra), right=[False, False]))
    print(f"load average (1 min) at start: {LOAD_AT_START:.2f} on {os.cpu_count()} cores")

    scratch = tempfile.mkdtemp(prefix="kernelproxy-compare-")
    run = Run(args, scratch)
    measurements: dict[str, Any] = {}
    loads: list[tuple[str, float]] = [("start", LOAD_AT_START)]
    try:
        # A forking ProcessPoolExecutor first, while this process has no threads and holds no big arrays.
        run.start("ppe", start_ppe)
        run.start("loky", start_loky)
        for transport in ("lane", "comm", "execute"):
            run.start(transport, lambda t=transport: KernelproxyBackend(t, os.path.join(scratch, f"ipython-{t}")))
        kp_sockets = next(
            (zmq_transport_of(b.k) for b in run.backends.values() if isinstance(b, KernelproxyBackend)), "tcp"
        )
        raw_sockets = kp_sockets if kp_sockets in ("ipc", "tcp") else "tcp"
        run.raw = run.start("raw", lambda: RawJupyter(os.path.join(scratch, "ipython-raw"), raw_sockets, scratch))
        run.start("ipyparallel", lambda: IpyparallelBackend(os.path.join(scratch, "ipp-profile")))
        run.start("rpyc", RpycBackend)
        run.start("zmq", lambda: ZmqBackend(scratch, args.zmq_sockets))
        host_probe = PeakProbe(os.getpid())

        section("Processes")
        rows = [
            [b.label, b.pid, ", ".join(f"{k} {v}" for k, v in b.others.items()), b.how] for b in run.backends.values()
        ]
        if run.raw is not None:
            rows.append(["raw jupyter_client kernel", run.raw.raw.pid, "", f"BlockingKernelClient, {raw_sockets}"])
        rows.append(["host (this script)", os.getpid(), "", sys.executable])
        print(table(["backend", "pid", "other pids", "how"], rows, right=[False, True, False, False]))
        for key, why in run.failed_to_start:
            print(f"  {key}: {why}")
        print(
            "  kernels: this interpreter's ipykernel, each with its own temporary IPYTHONDIR.\n"
            f"  memory of every pid above: {host_probe.description}."
        )

        ordered = [run.backends[k] for k in BACKENDS if k in run.backends]
        comm = run.backends.get("comm")

        if "latency" in args.sections:
            loads.append(("latency", os.getloadavg()[0]))
            log("latency")
            section("1. Trivial call latency: add(1, 2) (ms per round trip)")
            variants: dict[str, Callable[[], Any]] = {}
            for b in ordered:
                if isinstance(b, KernelproxyBackend):
                    variants[f"{b.label}: k.call(add, 1, 2)"] = b.call_add
                    variants[f"{b.label}: same, output='discard'"] = lambda b=b: b.quiet.call(add, 1, 2)
            raw = run.raw
            if raw is not None:
                variants["raw comm: comm_msg -> echo comm_msg"] = raw.comm_round_trip
                variants["raw comm: same + wait IOPub idle"] = raw.comm_round_trip_idle
                variants["raw: kernel_info_request"] = raw.kernel_info
                variants["raw: execute '1+2' silent"] = raw.execute_silent
            labels = {
                "ipyparallel": "ipyparallel: rc[:].apply_sync(add, 1, 2)",
                "loky": "loky: submit(add, 1, 2).result()",
                "ppe": "ProcessPoolExecutor: submit(add, 1, 2).result()",
                "rpyc": "rpyc classic: teleported add(1, 2)",
                "zmq": "raw pyzmq: REQ/REP ping-pong",
            }
            for key, label in labels.items():
                if key in run.backends:
                    variants[label] = run.backends[key].call_add
            for name, fn in list(variants.items()):
                try:
                    result = fn()
                except Exception as exc:  # noqa: BLE001 - leave the variant out, say so
                    traceback.print_exc()
                    check(False, f"latency variant {name} failed: {type(exc).__name__}: {exc}")
                    del variants[name]
                    continue
                check(result in (3, None, {"x": 1}) or result == [3], f"latency variant {name} returned {result!r}")
            drain = raw.raw.drain_iopub if raw is not None else (lambda: None)
            times = bench_latency(variants, args.calls, drain)
            measurements["latency"] = times
            refs = ["raw comm: comm_msg -> echo comm_msg", "kernelproxy[comm]: k.call(add, 1, 2)"]
            refs += ["loky: submit(add, 1, 2).result()"]
            refs += ["ipyparallel: rc[:].apply_sync(add, 1, 2)"]
            print_latency(times, refs)
            print(
                f"  {args.calls} timed calls per row after 20 warm-up calls, in 10 interleaved rounds with rotating\n"
                "  order. Over comm, kernelproxy returns at the reply (the agent flushes printed output before it\n"
                "  replies); over execute it also waits for IOPub 'idle'. The raw comm row waits for the echo only;\n"
                "  '+ wait IOPub idle' also waits for the idle status that follows it."
            )

        arrays: dict[float, np.ndarray] = {}
        memcpy: dict[str, list[float]] = {}
        transfers: dict[tuple[str, str, str], Transfer] = {}
        if "arrays" in args.sections or "small" in args.sections:
            sizes = (args.sizes if "arrays" in args.sections else []) + (
                [args.small_size] if "small" in args.sections and args.small_size > 0 else []
            )
            log(f"allocating host arrays: {', '.join(map(fmt_size, sorted(set(sizes))))}")
            arrays = {size: make_array(size) for size in sorted(set(sizes))}
            for size, arr in arrays.items():
                workload = fmt_size(size)
                arr.copy()
                memcpy[workload] = []
                for _ in range(max(repeats_for(size, args), 5)):
                    trim_memory()
                    start = time.perf_counter()
                    copy = arr.copy()
                    memcpy[workload].append(time.perf_counter() - start)
                    del copy

            probes = {b.key: Probes(host_probe, b) for b in ordered}
            for b in ordered:

                def warm_up(b: Backend = b) -> None:
                    warm = make_array(0.25 if b.slow else 2)
                    b.push("arr", warm)  # imports numpy in the worker, first chunked/buffered transfer
                    check(arrays_equal(b.pull("arr"), warm), f"{b.label} warm-up")
                    b.delete("arr")
                    b.after_transfer()

                guarded(b, "warm-up", warm_up)

        if "arrays" in args.sections:
            loads.append(("arrays", os.getloadavg()[0]))
            movers = [b for b in ordered if not b.slow]
            for size in args.sizes:
                arr, workload = arrays[size], fmt_size(size)
                push_pull_rounds(
                    movers,
                    arr,
                    arr.nbytes,
                    workload,
                    lambda b: probes[b.key],
                    transfers,
                    arrays_equal,
                    repeats=repeats_for(size, args),
                    what=f"{workload} transfers",
                    progress="{workload} repeat {repeat}/{repeats}",
                )
            measurements["arrays"] = transfers
            section("2. Push/pull of a float64 numpy array (MB = 2**20 bytes)")
            reference = comm.label if comm is not None else ordered[0].label
            print_transfers(transfers, [fmt_size(s) for s in args.sizes], memcpy, reference)
            print()
            print("Memory (peak during each transfer, per process):")
            print_memory(transfers, [fmt_size(s) for s in args.sizes])

        if "small" in args.sections and args.small_size > 0:
            loads.append(("small", os.getloadavg()[0]))
            size, workload = args.small_size, f"{fmt_size(args.small_size)} (small)"
            arr = arrays[size]
            small_results: dict[tuple[str, str, str], Transfer] = {}
            slow = [b for b in ordered if b.slow]
            if run.raw is not None:
                seed = SeedBackend(run.raw.raw)
                warm = make_array(0.25)
                seed.push("arr", warm)
                check(arrays_equal(seed.pull("arr"), warm), "seed warm-up")
                seed.delete("arr")
                slow.insert(0, seed)
            reference = slow[0].label if slow else ordered[0].label
            push_pull_rounds(
                slow + [b for b in ordered if isinstance(b, KernelproxyBackend)],
                arr,
                arr.nbytes,
                workload,
                lambda b: Probes(host_probe, b),
                small_results,
                arrays_equal,
                repeats=1,
                what=f"{workload} transfers",
                progress=f"small size {fmt_size(size)}",
            )
            memcpy[workload] = memcpy[fmt_size(size)]
            measurements["small"] = small_results
            section(f"3. Slow methods at {fmt_size(size)} only (they move a few MB/s), 1 repeat, with kernelproxy")
            print_transfers(small_results, [workload], memcpy, reference)
            print()
            print_memory(small_results, [workload])

        if "dataframe" in args.sections and comm is not None:
            loads.append(("dataframe", os.getloadavg()[0]))
            assert isinstance(comm, KernelproxyBackend)
            import pandas as pd

            plain = PlainCloudpickleOverComm(comm)
            section(f"4. DataFrame of {args.rows:,} rows (float, int, datetime, string), push and pull")
            default_storage = pd.Series(["a"]).dtype
            print(
                f"pandas {pd.__version__}: the default string dtype here is {default_storage!r}"
                f" (storage {getattr(default_storage, 'storage', '?')}); pyarrow "
                f"{'installed' if _has('pyarrow') else 'not installed'}"
            )
            df_results: dict[tuple[str, str, str], Transfer] = {}
            layouts = []
            df_probes = Probes(host_probe, comm)
            for strings in args.strings:
                if strings == "arrow" and not _has("pyarrow"):
                    print("  arrow strings skipped: pyarrow is not installed")
                    continue
                log(f"DataFrame, {strings} strings: building")
                df = make_frame(args.rows, strings)
                payload = int(df.memory_usage(deep=True).sum())
                workload = f"{strings} strings"
                layouts.append((workload, frame_layout(df)))
                lane = run.backends.get("lane")
                contestants = ([lane] if lane is not None else []) + [comm, plain]
                small = make_frame(1_000, strings)
                for b in contestants:

                    def warm_up(b: Backend = b, small: Any = small) -> None:  # pandas/pyarrow imports: not timed
                        b.push("df", small)
                        check(frames_equal(b.pull("df"), small), f"{b.label} DataFrame warm-up")
                        b.delete("df")

                    guarded(b, "DataFrame warm-up", warm_up)
                push_pull_rounds(
                    contestants,
                    df,
                    payload,
                    workload,
                    lambda b: df_probes,
                    df_results,
                    frames_equal,
                    repeats=args.df_repeat,
                    what=f"DataFrame {workload}",
                    progress="DataFrame, {workload}, repeat {repeat}/{repeats}",
                    name="df",
                )
                del df
                gc.collect()
            measurements["dataframe"] = df_results
            print()
            print("How kernelproxy pickles each column (protocol 5, buffers >= 64 KB out-of-band):")
            for workload, rows in layouts:
                print(f"  {workload}:")
                headers = ["column", "dtype", "array", "MB in memory", "MB in pickle stream", "MB out-of-band"]
                headers += ["buffers", "out-of-band"]
                print(table(headers, rows, right=[False, False, False] + [True] * 5))
            print()
            workloads = list(dict.fromkeys(key[0] for key in df_results))
            print_transfers(df_results, workloads, {}, plain.label)
            print("  MB/s here: in-memory size (memory_usage(deep=True)) / time.")
            print()
            print_memory(df_results, workloads)

        if "drift" in args.sections:
            loads.append(("drift", os.getloadavg()[0]))
            section(f"5. Kernel memory drift over {args.cycles:,} push/pull/delete cycles of a 1 MB array")
            small = make_array(1)
            rows = []
            drift: dict[str, dict[str, float]] = {}
            for b in ordered:
                if not isinstance(b, KernelproxyBackend) or b.key not in args.drift_transports.split(","):
                    continue
                log(f"drift: {b.label}, {args.cycles} cycles")

                def cycle(b: KernelproxyBackend = b) -> None:
                    b.k.push(arr=small)
                    b.k.pull("arr")
                    del b.k["arr"]

                for _ in range(max(50, args.cycles // 20)):  # warm-up: caches, linecache, allocator arenas
                    cycle()
                b.trim()
                trim_memory()
                assert b.pid is not None
                base, host_base = rss(b.pid), rss(os.getpid())
                objects_before = b.k.call(kernel_object_count)
                start = time.perf_counter()
                trace = []  # RSS - baseline at each quarter: a leak grows linearly, a cache levels off
                for index in range(args.cycles):
                    cycle()
                    if (index + 1) % max(1, args.cycles // 4) == 0:
                        trace.append((rss(b.pid) - base) / MB)
                elapsed = time.perf_counter() - start
                after, host_after = rss(b.pid), rss(os.getpid())
                objects_after = b.k.call(kernel_object_count)
                b.trim()
                trim_memory()
                after_trim, host_after_trim = rss(b.pid), rss(os.getpid())
                drift[b.label] = {"plain": (after - base) / MB, "trimmed": (after_trim - base) / MB}
                rows.append(
                    [b.label, f"{base / MB:.1f}", f"{after / MB:.1f}", f"{(after - base) / MB:+.1f}"]
                    + [f"{(after_trim - base) / MB:+.1f}", f"{objects_after - objects_before:+d}"]
                    + [f"{(host_after - host_base) / MB:+.1f}", f"{(host_after_trim - host_base) / MB:+.1f}"]
                    + [" ".join(f"{x:+.1f}" for x in trace), f"{1000 * elapsed / args.cycles:.2f}"]
                )
            measurements["drift"] = drift
            headers = ["kernel", "RSS after warm-up MB", "after cycles MB", "drift MB", "drift, trimmed MB"]
            headers += ["gc objects", "host drift MB", "host, trimmed", "kernel MB at 1/4..4/4", "ms/cycle"]
            print(table(headers, rows, right=[False] + [True] * 9))
            print(
                "  Warm-up: max(50, cycles/20) cycles, then gc + malloc_trim in both processes and the baseline RSS.\n"
                "  drift: RSS right after the cycles - baseline; trimmed: after one more gc + malloc_trim (what is\n"
                "  really held, not glibc's cache). gc objects: change in len(gc.get_objects()) in the kernel.\n"
                "  kernel MB at 1/4..4/4: the kernel's RSS - baseline after each quarter of the cycles (untrimmed)."
            )

        section("6. Targets")
        print_lane_targets(measurements, run)
        print_targets(measurements, run)

        section("Correctness and conditions")
        failed = [what for what, ok in CHECKS if not ok]
        print(f"{len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed (pulled values equal the pushed ones, ...)")
        for what in failed:
            print(f"  FAILED: {what}")
        loads.append(("end", os.getloadavg()[0]))
        print(
            "load average (1 min): "
            + ", ".join(f"{name} {value:.2f}" for name, value in loads)
            + f" ({os.cpu_count()} cores; other processes' load skews every number above)"
        )
        log("done")
        return 1 if failed else 0
    finally:
        log("stopping every kernel, cluster and worker")
        run.close_all()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


AddRow = Callable[..., None]  # add_row(target, measured or None, met or None, note="")


def target_rows() -> tuple[list[list[str]], AddRow]:
    """The rows of a targets table, and the function that adds one (None: not measured)."""
    rows: list[list[str]] = []

    def add_row(target: str, measured: str | None, met: bool | None, note: str = "") -> None:
        verdict = "not measured" if met is None else ("met" if met else "MISSED")
        rows.append([target, measured if measured is not None else "-", verdict, note])

    return rows, add_row


def biggest_transfer(transfers: dict[Any, Any]) -> tuple[int | None, str, str]:
    """The array size the 1 GB targets are judged at: its bytes, its label, and a note when it is not 1 GB."""
    sizes = sorted({r.payload for r in transfers.values()})
    big = GB if GB in sizes else (sizes[-1] if sizes else None)
    big_name = fmt_size(big / MB) if big else "1 GB"
    return big, big_name, "" if big == GB else f" (measured at {big_name}, 1 GB not run)"


def add_peak_memory_rows(add_row: AddRow, transfers: dict[Any, Any], big: str, backend: str, label: str) -> None:
    """'peak memory moving 1 GB <= 1.1x payload' for the host and the kernel: the worse of push and pull."""
    suffix = biggest_transfer(transfers)[2]
    for role, where in (("host", "host"), ("worker", "kernel")):
        values = [(op, median_peak_x(transfers.get((big, op, backend)), role)) for op in ("push", "pull")]
        known = [(op, v) for op, v in values if v is not None]
        target = f"{label} <= 1.1x payload, {where}"
        if known:
            worst_op, worst = max(known, key=lambda item: item[1])
            note = ", ".join(f"{op} {v:.2f}x" for op, v in known) + f" (median dpeak/payload){suffix}"
            add_row(target, f"{worst:.2f}x ({worst_op})", worst <= 1.1, note)
        else:
            add_row(target, None, None)


def print_lane_targets(m: dict[str, Any], run: Run) -> None:
    """The targets of the direct lane (issue 14), each a ratio to an alternative measured in this run."""
    rows, add_row = target_rows()

    times = m.get("latency", {})
    lane = times.get("kernelproxy[lane]: k.call(add, 1, 2)")
    loky = times.get("loky: submit(add, 1, 2).result()")
    comm = times.get("kernelproxy[comm]: k.call(add, 1, 2)")
    raw_comm = times.get("raw comm: comm_msg -> echo comm_msg")
    target = "trivial call, lane <= loky's median"
    if lane and loky:
        ratio = median(lane) / median(loky)
        add_row(target, f"{ratio:.2f}x", ratio <= 1.0, f"{median(ms(lane)):.3f} vs {median(ms(loky)):.3f} ms")
    else:
        add_row(target, None, None)
    target = "trivial call, comm <= 1.0x raw comm round trip"
    if comm and raw_comm:
        ratio = median(comm) / median(raw_comm)
        add_row(target, f"{ratio:.2f}x", ratio <= 1.0, f"{median(ms(comm)):.2f} vs {median(ms(raw_comm)):.2f} ms")
    else:
        add_row(target, None, None)

    transfers = m.get("arrays", {})
    big, big_name, suffix = biggest_transfer(transfers)
    lane_rt = round_trip_times(transfers, big_name, "kernelproxy[lane]") if big else []
    zmq_rt = round_trip_times(transfers, big_name, "raw pyzmq (1 frame)") if big else []
    target = "1 GB push+pull, lane >= 1.5x raw pyzmq one-frame throughput"
    if lane_rt and zmq_rt:
        ratio = median(zmq_rt) / median(lane_rt)
        note = f"{median(lane_rt):.2f} s vs {median(zmq_rt):.2f} s{suffix}"
        add_row(target, f"{ratio:.2f}x", ratio >= 1.5, note)
    else:
        add_row(target, None, None)
    add_peak_memory_rows(add_row, transfers, big_name, "kernelproxy[lane]", "peak memory moving 1 GB over the lane")
    frames = m.get("dataframe", {})
    rows_label = "1e7" if run.args.rows == 10_000_000 else f"{run.args.rows:,}"
    for workload in list(dict.fromkeys(key[0] for key in frames)) or ["(not run)"]:
        lane_t = round_trip_times(frames, workload, "kernelproxy[lane]")
        plain_t = round_trip_times(frames, workload, "comm + plain cloudpickle")
        target = f"{rows_label}-row DataFrame push+pull, lane <= 0.35x comm + plain cloudpickle, {workload}"
        if lane_t and plain_t:
            ratio = median(lane_t) / median(plain_t)
            add_row(target, f"{ratio:.2f}x", ratio <= 0.35, f"{median(lane_t):.2f} s vs {median(plain_t):.2f} s")
        else:
            add_row(target, None, None)
    print(table(["target (the lane, issue 14)", "measured", "verdict", "detail"], rows, right=[False] * 4))
    print("  Pool targets (throughput against loky): benchmarks/pool.py.")
    print()


def print_targets(m: dict[str, Any], run: Run) -> None:
    rows, add_row = target_rows()

    times = m.get("latency", {})
    kp = times.get("kernelproxy[comm]: k.call(add, 1, 2)")
    kp_quiet = times.get("kernelproxy[comm]: same, output='discard'")
    raw_comm = times.get("raw comm: comm_msg -> echo comm_msg")
    ipp = times.get("ipyparallel: rc[:].apply_sync(add, 1, 2)")
    if kp and raw_comm:
        ratio = median(kp) / median(raw_comm)
        note = f"{median(ms(kp)):.2f} vs {median(ms(raw_comm)):.2f} ms"
        if kp_quiet:
            note += f"; output='discard': {median(kp_quiet) / median(raw_comm):.2f}x"
        raw_idle = times.get("raw comm: same + wait IOPub idle")
        if raw_idle:
            note += f"; raw comm + idle: {median(raw_idle) / median(raw_comm):.2f}x"
        add_row("comm trivial call <= 1.1x raw comm round trip", f"{ratio:.2f}x", ratio <= 1.1, note)
    else:
        add_row("comm trivial call <= 1.1x raw comm round trip", None, None)
    if kp and ipp:
        ratio = median(kp) / median(ipp)
        note = f"{median(ms(kp)):.2f} vs {median(ms(ipp)):.2f} ms"
        add_row("comm trivial call <= 0.5x ipyparallel apply_sync", f"{ratio:.2f}x", ratio <= 0.5, note)
    else:
        add_row("comm trivial call <= 0.5x ipyparallel apply_sync", None, None)

    transfers = m.get("arrays", {})
    big, big_name, suffix = biggest_transfer(transfers)
    kp_rt = round_trip_times(transfers, big_name, "kernelproxy[comm]") if big else []
    for other, target, threshold in (
        ("raw pyzmq (1 frame)", "1 GB push+pull >= 0.9x raw zmq one-frame throughput", 0.9),
        ("ipyparallel", "1 GB push+pull >= 4x ipyparallel throughput", 4.0),
    ):
        other_rt = round_trip_times(transfers, big_name, other) if big else []
        zmq_rt = round_trip_times(transfers, big_name, "raw pyzmq (1 frame)") if big else []
        if kp_rt and other_rt:
            ratio = median(other_rt) / median(kp_rt)  # throughput ratio = inverse time ratio
            note = f"{median(kp_rt):.2f} s vs {median(other_rt):.2f} s{suffix}"
            if zmq_rt and other != "raw pyzmq (1 frame)":
                note += f"; raw pyzmq itself is {median(other_rt) / median(zmq_rt):.2f}x {other}"
            add_row(target, f"{ratio:.2f}x", ratio >= threshold, note)
        else:
            add_row(target, None, None)
    add_peak_memory_rows(add_row, transfers, big_name, "kernelproxy[comm]", "peak memory moving 1 GB")

    frames = m.get("dataframe", {})
    variants = list(dict.fromkeys(key[0] for key in frames))
    for workload in variants or ["(not run)"]:
        kp_t = round_trip_times(frames, workload, "kernelproxy[comm]")
        plain_t = round_trip_times(frames, workload, "comm + plain cloudpickle")
        rows_label = "1e7" if run.args.rows == 10_000_000 else f"{run.args.rows:,}"
        target = f"{rows_label}-row DataFrame push+pull <= 0.6x comm + plain cloudpickle, {workload}"
        if kp_t and plain_t:
            ratio = median(kp_t) / median(plain_t)
            add_row(target, f"{ratio:.2f}x", ratio <= 0.6, f"{median(kp_t):.2f} s vs {median(plain_t):.2f} s")
        else:
            add_row(target, None, None)

    drift = m.get("drift", {}).get("kernelproxy[comm]")
    target = f"kernel memory flat (within 5 MB) after {run.args.cycles:,} cycles"
    if drift:
        note = f"trimmed: {drift['trimmed']:+.1f} MB"
        execute = m.get("drift", {}).get("kernelproxy[execute]")
        if execute:
            note += f"; execute transport: {execute['plain']:+.1f} MB"
        add_row(target, f"{drift['plain']:+.1f} MB", abs(drift["plain"]) <= 5, note)
    else:
        add_row(target, None, None)
    print(table(["target (kernelproxy over comm)", "measured", "verdict", "detail"], rows, right=[False] * 4))


if __name__ == "__main__":
    sys.exit(main())
