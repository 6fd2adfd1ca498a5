"""Calls into a busy kernel: kernelproxy's subshell (JEP 91, ipykernel >= 7), issue 13 section 3.

The busy kernel is real: a second client (jupyter_client's own, or a bare
websocket client of a Jupyter Server) runs a cell on the main shell, as a
notebook does, while kernelproxy calls into the kernel on its subshell.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from jupyter_client.manager import KernelManager

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CELL = "import time\nstarted_cell = time.time()\ntime.sleep({seconds})\ncell_finished = True"


@pytest.fixture
def notebook_kernel() -> Iterator[KernelManager]:
    """A kernel a notebook server runs (jupyter_client's KernelManager); its client runs cells."""
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield manager
    finally:
        manager.shutdown_kernel(now=True)
        manager.cleanup_resources()


class Notebook:
    """The other client: runs cells on the kernel's main shell and reads their replies."""

    def __init__(self, manager: KernelManager) -> None:
        self.client = manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run_cell(self, code: str) -> str:
        return self.client.execute(code)

    def reply(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.1))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def close(self) -> None:
        self.client.stop_channels()


@pytest.fixture
def notebook(notebook_kernel) -> Iterator[Notebook]:
    client = Notebook(notebook_kernel)
    try:
        yield client
    finally:
        client.close()


def wait_busy(k: kernelproxy.Kernel) -> None:
    """Until the other client's cell runs on the main shell (the subshell sees its variable)."""
    sub = k.options(subshell=True)
    deadline = time.monotonic() + 30
    while not sub.contains("started_cell"):
        assert time.monotonic() < deadline, "the other client's cell never started"
        time.sleep(0.05)


def spin() -> int:
    """Python code that never ends by itself (a subshell cancel stops it between bytecodes)."""
    count = 0
    while True:
        count += 1


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_calls_on_the_subshell_while_someone_elses_cell_runs(notebook_kernel, notebook, transport, capsys):
    with kernelproxy.connect(notebook_kernel.connection_file, transport=transport) as k:
        k.push(shared={"rows": 3})
        cell = notebook.run_cell(CELL.format(seconds=10))
        wait_busy(k)
        sub = k.options(subshell=True)
        started = time.monotonic()
        assert sub.eval("1 + 1") == 2
        assert time.monotonic() - started < 1.0
        assert sub.pull("shared") == {"rows": 3}
        ref = sub.ref("shared")
        assert ref["rows"].get() == 3
        assert sub.call(lambda d: d["rows"] * 2, ref) == 6
        times = []
        for _ in range(100):
            began = time.perf_counter()
            sub.call(int)
            times.append(time.perf_counter() - began)
        # a timeout on the subshell stops the subshell's call, not the cell
        began = time.monotonic()
        with pytest.raises(kernelproxy.CallTimeout, match="main shell was not interrupted"):
            sub.options(timeout=1).call(spin)
        assert time.monotonic() - began < 3.5
        assert sub.eval("'cell_finished' in globals()") is False  # the cell still runs
        assert sub.eval("40 + 2") == 42  # and the subshell is usable again
        reply = notebook.reply(cell)
        assert reply["status"] == "ok", reply  # the cell finished undisturbed: no KeyboardInterrupt
        assert k.eval("cell_finished") is True
        with capsys.disabled():
            print(
                f"\n[{transport}] subshell call while the main shell is busy: median "
                f"{statistics.median(times) * 1e3:.2f} ms, p90 {sorted(times)[89] * 1e3:.2f} ms"
            )


def test_submit_on_the_subshell_can_be_cancelled_and_interrupted(notebook_kernel, notebook):
    with kernelproxy.connect(notebook_kernel.connection_file) as k:
        cell = notebook.run_cell(CELL.format(seconds=6))
        wait_busy(k)
        sub = k.options(subshell=True)
        running = sub.submit(spin)
        time.sleep(0.5)
        sub.interrupt()  # a subshell view's interrupt stops its own work only
        with pytest.raises(kernelproxy.CallInterrupted):
            running.result(10)
        assert sub.call(lambda: "subshell usable") == "subshell usable"
        assert notebook.reply(cell)["status"] == "ok"


def test_code_in_c_on_the_subshell_cannot_be_stopped_and_says_so(notebook_kernel, notebook):
    with kernelproxy.connect(notebook_kernel.connection_file) as k:
        cell = notebook.run_cell(CELL.format(seconds=5))
        wait_busy(k)
        sub = k.options(subshell=True)
        with pytest.raises(kernelproxy.CallTimeout, match="cannot be stopped from another thread"):
            sub.options(timeout=0.5).call(time.sleep, 3)
        assert notebook.reply(cell)["status"] == "ok"
        time.sleep(3)
        assert sub.eval("'after'") == "after"


def test_default_calls_stay_on_the_main_shell(notebook_kernel, notebook):
    """Concurrency is opt-in: without subshell=True a call waits for the cell."""
    with kernelproxy.connect(notebook_kernel.connection_file) as k:
        cell = notebook.run_cell(CELL.format(seconds=2))
        wait_busy(k)
        assert k.eval("'cell_finished' in globals()") is True  # ran after the cell
        assert notebook.reply(cell)["status"] == "ok"


def test_subshell_survives_a_restart(fresh_kernel_comm):
    k = fresh_kernel_comm
    sub = k.options(subshell=True)
    assert sub.call(lambda: 1) == 1
    first = k.aio._state.subshell.id
    k.restart()
    assert sub.call(lambda: 2) == 2
    assert k.aio._state.subshell.id != first


def test_subshell_options_view_repr_and_call_options(fresh_kernel_comm):
    sub = fresh_kernel_comm.options(subshell=True)
    assert sub.call_options.subshell is True
    assert fresh_kernel_comm.call_options.subshell is False
    assert sub.options(timeout=3).call_options.subshell is True
    with pytest.raises(TypeError):
        fresh_kernel_comm.options(subshell="yes")


@pytest.fixture
def fresh_kernel_comm() -> Iterator[kernelproxy.Kernel]:
    k = kernelproxy.start()
    try:
        yield k
    finally:
        k.shutdown()


# ---------------------------------------------------------------------- through a Jupyter Server


def server_cell(k: kernelproxy.Kernel, server, code: str) -> asyncio.Future:
    """A second websocket client (a browser tab) runs ``code`` as a cell; the future gets its execute_reply."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    session = uuid.uuid4().hex
    url = server.url.replace("http", "ws", 1) + f"api/kernels/{k.info.kernel_id}/channels?session_id={session}"
    msg_id = uuid.uuid4().hex

    async def run() -> dict:
        conn = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {server.token}"}))
        try:
            header = {"msg_id": msg_id, "msg_type": "execute_request", "session": session, "username": "browser",
                      "version": "5.3", "date": "2026-01-01T00:00:00Z"}
            content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                       "allow_stdin": False, "stop_on_error": True}
            await conn.write_message(json.dumps(
                {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}
            ))
            while True:
                data = await conn.read_message()
                if data is None:
                    raise ConnectionError("the browser's websocket closed")
                if isinstance(data, bytes):
                    continue
                msg = json.loads(data)
                if msg.get("channel") == "shell" and msg["parent_header"].get("msg_id") == msg_id:
                    return msg["content"]
        finally:
            conn.close()

    return asyncio.run_coroutine_threadsafe(run(), k._portal.loop)


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_subshell_through_a_jupyter_server(jupyter_server, transport, capsys):
    with kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, transport=transport) as k:
        cell = server_cell(k, jupyter_server, CELL.format(seconds=8))
        wait_busy(k)
        sub = k.options(subshell=True)
        started = time.monotonic()
        assert sub.eval("1 + 1") == 2
        assert time.monotonic() - started < 1.0
        times = []
        for _ in range(50):
            began = time.perf_counter()
            sub.call(int)
            times.append(time.perf_counter() - began)
        with capsys.disabled():
            print(
                f"\n[server, {transport}] subshell call while the main shell is busy: median "
                f"{statistics.median(times) * 1e3:.2f} ms"
            )
        with pytest.raises(kernelproxy.CallTimeout, match="main shell was not interrupted"):
            sub.options(timeout=1).call(spin)
        assert cell.result(30)["status"] == "ok"
        assert k.eval("cell_finished") is True


def list_subshells(manager: KernelManager) -> list[str]:
    client = manager.client()
    client.start_channels()
    try:
        msg = client.session.msg("list_subshell_request", {})
        client.control_channel.send(msg)
        while True:
            reply = client.get_control_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return list(reply["content"]["subshell_id"])
    finally:
        client.stop_channels()


def test_close_leaves_no_subshell_in_a_kernel_that_lives_on_and_a_deleted_one_is_made_again(notebook_kernel):
    with kernelproxy.connect(notebook_kernel.connection_file) as k:
        sub = k.options(subshell=True)
        assert sub.call(lambda: 1) == 1
        first = k.aio._state.subshell.id
        assert list_subshells(notebook_kernel) == [first]
        client = notebook_kernel.client()  # someone else deletes it
        client.start_channels()
        msg = client.session.msg("delete_subshell_request", {"subshell_id": first})
        client.control_channel.send(msg)
        client.get_control_msg(timeout=10)
        client.stop_channels()
        assert sub.call(lambda: 2) == 2  # made again, transparently
        assert k.aio._state.subshell.id != first
    assert list_subshells(notebook_kernel) == []
