"""Helpers shared by the benchmark scripts (transfer.py, compare.py).

Tables and statistics, peak-memory measurement (/proc/<pid>/clear_refs + VmHWM),
a raw jupyter_client kernel, the hand-written "seed" push/pull, machine info.
Not a test; not part of the kernelproxy package.

This module is registered with cloudpickle to be pickled by value, so its
functions (``trim_memory``...) can be sent to a kernel or worker that cannot
import it.
"""

from __future__ import annotations

import ast
import base64
import ctypes
import gc
import importlib.metadata
import json
import os
import pickle
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
from jupyter_client.manager import KernelManager, start_new_kernel

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1024 * 1024  # sizes and throughputs are in MiB (2**20 bytes), printed as "MB"


OP_TIMEOUT = 900.0  # seconds; the seed approach at 64 MB takes about a minute


# Run in both processes before every memory baseline: collect garbage, and hand
# freed heap back to the OS, so that VmRSS counts live memory, not glibc's cache.
TRIM_SOURCE = """\
import gc as _kpb_gc, ctypes as _kpb_ctypes
_kpb_gc.collect()
try:
    _kpb_ctypes.CDLL("libc.so.6").malloc_trim(0)
except Exception:
    pass
del _kpb_gc, _kpb_ctypes
"""


SEED_PULL_EXPRESSION = "__import__('base64').b64encode(__import__('pickle').dumps(arr)).decode()"


def trim_memory() -> bool:
    """gc.collect() and malloc_trim(0) in this process; True if malloc_trim was available."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


LOAD_AT_START = os.getloadavg()[0]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    """90th percentile, linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), 90))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    if right is None:
        right = [i > 0 for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def section(title: str) -> None:
    print()
    print(title)
    print("=" * len(title))


def fmt_size(mb: float) -> str:
    return f"{mb:g} MB"


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss(pid: int) -> int:
    try:
        return _status_kb(pid, "VmRSS")
    except (OSError, KeyError):
        import psutil

        return int(psutil.Process(pid).memory_info().rss)


class PeakProbe:
    """Peak resident memory of one process during a block.

    Preferred: write "5" to /proc/<pid>/clear_refs (resets the kernel's VmHWM
    counter to the current RSS), then read VmHWM afterwards. Exact: the kernel
    itself tracks the high-water mark, nothing is sampled.
    Fallback: a thread samples the RSS with psutil every 5 ms (can miss short
    peaks, and sampling the host from the host needs the GIL).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.method = self._pick_method()
        self.before = 0
        self._peak = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _pick_method(self) -> str:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")
            _status_kb(self.pid, "VmHWM")
            return "clear_refs"
        except (OSError, KeyError):
            pass
        try:
            import psutil  # noqa: F401

            return "psutil"
        except ImportError:
            return "none"

    @property
    def description(self) -> str:
        return {
            "clear_refs": "exact: clear_refs=5 resets VmHWM before, VmHWM read after",
            "psutil": "approximate: psutil RSS sampled every 5 ms in a thread",
            "none": "unavailable (no clear_refs, no psutil): memory columns are n/a",
        }[self.method]

    def begin(self) -> None:
        if self.method == "clear_refs":
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")
            self.before = _status_kb(self.pid, "VmRSS")
        elif self.method == "psutil":
            import psutil

            process = psutil.Process(self.pid)
            self.before = self._peak = int(process.memory_info().rss)
            self._stop = threading.Event()

            def sample() -> None:
                assert self._stop is not None
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, int(process.memory_info().rss))

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

    def end(self) -> int | None:
        """Peak RSS minus RSS before, in bytes (None when unavailable)."""
        if self.method == "clear_refs":
            return _status_kb(self.pid, "VmHWM") - self.before
        if self.method == "psutil":
            assert self._stop is not None and self._thread is not None
            self._stop.set()
            self._thread.join()
            return self._peak - self.before
        return None


class RawKernel:
    """A kernel driven directly with jupyter_client's BlockingKernelClient."""

    def __init__(self, ipython_dir: str, zmq_transport: str, scratch: str) -> None:
        env = {**os.environ, "IPYTHONDIR": ipython_dir}
        self.zmq_transport = zmq_transport
        if zmq_transport == "tcp":
            self.km, self.kc = start_new_kernel(startup_timeout=60, kernel_name="python3", env=env)
        else:
            # start_new_kernel()'s own body, with IPC sockets as kernelproxy uses for the kernels it starts
            self.km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(scratch, "raw-ipc"))
            self.km.start_kernel(env=env)
            self.kc = self.km.client()
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=60)
        self.pid = int(self.expr("__import__('os').getpid()"))
        self.executable = self.expr("__import__('sys').executable")
        info = self.wait_shell_reply(self.kc.kernel_info())["content"]
        self.implementation = f"{info.get('implementation', '?')} {info.get('implementation_version', '?')}"

    def expr(self, expression: str) -> Any:
        """Evaluate an expression silently and return its literal_eval'd text/plain repr."""
        reply = self.kc.execute(
            "", silent=True, store_history=False, user_expressions={"x": expression}, reply=True, timeout=OP_TIMEOUT
        )
        result = reply["content"]["user_expressions"]["x"]
        if result.get("status") != "ok":
            raise RuntimeError(
                f"{expression!r} failed in the raw kernel: {result.get('ename')}: {result.get('evalue')}"
            )
        return ast.literal_eval(result["data"]["text/plain"])

    def run_silent(self, code: str) -> None:
        reply = self.kc.execute(code, silent=True, store_history=False, reply=True, timeout=OP_TIMEOUT)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"silent code failed in the raw kernel: {reply['content'].get('evalue')}")

    def drain_iopub(self) -> None:
        """Read every IOPub message already received (channel.get_msgs() would block forever)."""
        while True:
            try:
                self.kc.iopub_channel.get_msg(timeout=0)
            except queue.Empty:
                return

    def wait_shell_reply(self, msg_id: str) -> dict:
        while True:
            reply = self.kc.get_shell_msg(timeout=OP_TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def wait_idle(self, msg_id: str) -> None:
        while True:
            msg = self.kc.get_iopub_msg(timeout=OP_TIMEOUT)
            if (
                msg["msg_type"] == "status"
                and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"].get("execution_state") == "idle"
            ):
                return

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def seed_push(raw: RawKernel, arr: np.ndarray) -> None:
    """How people push by hand: pickle, base64, pasted into cell code (history on, as in the seeds)."""
    b64 = base64.b64encode(pickle.dumps(arr)).decode()
    code = f"import pickle, base64; arr = pickle.loads(base64.b64decode('{b64}'))"
    reply = raw.kc.execute(code, store_history=True, reply=True, timeout=OP_TIMEOUT)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"seed push failed: {reply['content'].get('evalue')}")


def seed_pull(raw: RawKernel) -> np.ndarray:
    """How people pull by hand: user_expressions, text/plain repr, literal_eval, base64, unpickle."""
    reply = raw.kc.execute("", user_expressions={"r": SEED_PULL_EXPRESSION}, reply=True, timeout=OP_TIMEOUT)
    result = reply["content"]["user_expressions"]["r"]
    if result.get("status") != "ok":
        raise RuntimeError(f"seed pull failed: {result.get('ename')}: {result.get('evalue')}")
    return pickle.loads(base64.b64decode(ast.literal_eval(result["data"]["text/plain"])))


def fmt_multiple(values: list[int | None], payload: int) -> str:
    """median/p90 as multiples of the payload"""
    known = [v / payload for v in values if v is not None]
    return f"{median(known):.2f}/{p90(known):.2f}" if known else "n/a"


def fmt_mb(values: list[int | None]) -> str:
    """median in MB"""
    known = [v / MB for v in values if v is not None]
    return f"{median(known):.0f}" if known else "n/a"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Rows for the "Machine" table; ``extra`` adds (label, distribution) rows, version looked up."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    try:
        ram = f"{_meminfo_total() / 1024**3:.1f} GiB"
    except (OSError, KeyError, ValueError):
        ram = "?"
    import IPython
    import zmq

    source = Path(kernelproxy.__file__).resolve().parents[2]
    revision = ""
    if shutil.which("git") and (source / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--", "src"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            revision = f" (git {head}{', src modified' if dirty else ''})"
        except (OSError, subprocess.SubprocessError):
            pass
    return [
        ("cpu", f"{cpu}; {os.cpu_count()} logical cores, {affinity} usable"),
        ("memory", ram),
        ("os", platform.platform()),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("kernelproxy", f"{kernelproxy.__version__}{revision}"),
        ("ipykernel", version("ipykernel")),
        ("IPython", IPython.__version__),
        ("jupyter_client", version("jupyter_client")),
        ("pyzmq / libzmq", f"{zmq.__version__} / {zmq.zmq_version()}"),
        ("cloudpickle", version("cloudpickle")),
        ("numpy", np.__version__),
        ("pybase64 / orjson", f"{version('pybase64')} / {version('orjson')}"),
    ] + [(label, version(dist)) for label, dist in extra]


def _meminfo_total() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemTotal")


def zmq_transport_of(k: kernelproxy.Kernel) -> str:
    """ "tcp" or "ipc": the sockets kernelproxy's kernel listens on (from its connection file)."""
    try:
        with open(k.info.connection_file or "") as file:
            return str(json.load(file).get("transport", "tcp"))
    except (OSError, ValueError):
        return "?"
