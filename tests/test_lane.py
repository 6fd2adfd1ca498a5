"""The lane: who gets it (and who falls back), its permissions, freeing shared memory, interrupts aimed at one request.

The behaviour suite runs over the lane too (conftest.TRANSPORTS); this file
tests what only the lane has.
"""

from __future__ import annotations

import gc
import os
import socket
import stat
import threading
import time

import numpy as np
import pytest
from helpers import start_external_kernel, stop_external_kernel

import kernelproxy
from kernelproxy._transports import lane as lane_module
from kernelproxy._transports.lane import LaneTransport

AGENT = "__import__('sys').modules['_kernelproxy_agent_v1']"
MB = 2**20


@pytest.fixture(scope="module")
def lane_kernel():
    kernel = kernelproxy.start()  # auto: the lane, for a kernel kernelproxy starts here
    yield kernel
    kernel.shutdown()


def kernel_lane_state(kernel):
    return kernel.eval(f"{AGENT}.lanes[-1].arena_state()")


# ---------------------------------------------------------------------- who gets a lane


def test_auto_gives_kernels_we_start_a_lane(lane_kernel):
    assert lane_kernel.info.transport.startswith("lane (Unix socket")
    assert isinstance(lane_kernel.aio._state.transport, LaneTransport)


def test_other_transports_can_be_asked_for():
    with kernelproxy.start(transport="comm") as comm, kernelproxy.start(transport="execute") as execute:
        assert comm.info.transport.startswith("comm")
        assert execute.info.transport.startswith("execute")


def test_auto_falls_back_to_comm_visibly_when_the_lane_cannot_open(monkeypatch):
    async def refuse(*args, **kwargs):
        raise kernelproxy.ProtocolError("no lane today")

    monkeypatch.setattr(LaneTransport, "open", refuse)
    with kernelproxy.start() as k:
        assert k.info.transport.startswith("comm (binary buffers")
        assert "no lane: no lane today" in k.info.transport
        assert k.call(sum, [1, 2]) == 3


def test_asking_for_a_lane_the_kernel_cannot_have_says_why(monkeypatch):
    async def refuse(*args, **kwargs):
        raise kernelproxy.ProtocolError("no lane today")

    monkeypatch.setattr(LaneTransport, "open", refuse)
    with pytest.raises(kernelproxy.ProtocolError, match="transport='lane' is not possible.*no lane today"):
        kernelproxy.start(transport="lane")


def test_connected_kernels_get_a_lane_only_when_asked(tmp_path):
    external = start_external_kernel(tmp_path)
    try:
        with kernelproxy.connect(str(external.connection_file), startup_timeout=60) as plain:
            assert plain.info.transport.startswith("comm")  # someone else's kernel: the Jupyter channels
        with kernelproxy.connect(str(external.connection_file), transport="lane") as direct:
            assert direct.info.transport.startswith("lane")
            assert direct.call(os.getpid) == external.process.pid
            directory = direct.aio._state.transport._own_dir
            assert stat.S_IMODE(os.stat(directory).st_mode) & 0o777 == 0o700  # (jupyter_client adds the sticky bit)
        assert not os.path.exists(directory)  # its private directory goes with it
    finally:
        stop_external_kernel(external)


def test_server_kernels_get_a_lane_only_when_asked_and_on_this_machine(jupyter_server, monkeypatch):
    with kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token) as k:
        assert k.info.transport.startswith("comm")
    # This server runs its kernels here, so a lane can be had by asking (the agent listens in a private directory).
    with kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, transport="lane") as k:
        assert k.info.transport.startswith("lane") and k.call(sum, [1, 2]) == 3
    # A kernel on another machine cannot have one.
    monkeypatch.setattr(kernelproxy._kernel.platform, "node", lambda: "another-host")
    with pytest.raises(kernelproxy.ProtocolError, match="transport='lane' is not possible.*another machine"):
        kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, transport="lane")


def test_restart_opens_a_new_lane():
    with kernelproxy.start() as k:
        k.push(before=1)
        first = k.aio._state.transport
        k.restart()
        assert k.aio._state.transport is not first and k.info.transport.startswith("lane")
        assert "before" not in k
        assert k.call(sum, [2, 3]) == 5


# ---------------------------------------------------------------------- who can reach it


def test_the_socket_and_shared_memory_are_the_owners_only(lane_kernel, tmp_path):
    # The kernel's own lane: its socket file is gone once connected; its directory is private.
    directory = lane_kernel.aio._state.control.private_dir
    assert stat.S_IMODE(os.stat(directory).st_mode) & 0o777 == 0o700  # (jupyter_client adds the sticky bit)
    assert not [name for name in os.listdir(directory) if name.startswith("lane-")]
    # A listening socket, as the agent makes it: 0600 from its creation, in the caller's directory.
    path = str(tmp_path / "probe.sock")
    lane_kernel.exec(f"_kp_answer = {AGENT}._lane_expression({path!r}, 'secret-token').payload")
    assert lane_kernel.eval("_kp_answer['status']") == "ok", lane_kernel.eval("_kp_answer")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # A client without the token is dropped before anything is read as a request.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        client.settimeout(10)
        hello = lane_module.agent._lane_pack({"k": "hello", "t": "wrong"}, [])[0]
        client.sendall(b"".join(bytes(part) for part in hello))
        assert client.recv(100) == b""  # closed
    assert not os.path.exists(path)  # one connection per listener, then the path is gone
    # Shared memory: unnamed memfds, nothing in /dev/shm.
    lane_kernel.push(big=np.ones(4 * MB // 8))
    fds = f"/proc/{lane_kernel.info.pid}/fd"
    targets = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
    memfds = [target for target in targets if target.startswith("/memfd:kernelproxy-lane")]
    assert memfds, targets
    assert not [name for name in os.listdir("/dev/shm") if "kernelproxy" in name]
    del lane_kernel["big"]


# ---------------------------------------------------------------------- shared memory


def test_big_values_arrive_whole_writable_and_are_freed(lane_kernel):
    original = np.arange(3 * MB, dtype=np.float64)  # 24 MB: through the arena both ways
    lane_kernel.push(a=original)
    assert lane_kernel.eval("(a.flags.writeable, float(a.sum()))") == (True, float(original.sum()))
    pulled = lane_kernel.pull("a")
    np.testing.assert_array_equal(pulled, original)
    pulled[0] = -1  # ours, not the kernel's
    assert lane_kernel.eval("a[0]") == 0
    transport = lane_kernel.aio._state.transport
    del lane_kernel["a"], pulled
    gc.collect()
    lane_kernel.call(gc.collect)
    lane_kernel.call(int)  # carries the host's frees to the kernel, and brings the kernel's back
    lane_kernel.call(int)
    assert transport._arena._used == {}  # every region the host wrote was handed back
    assert kernel_lane_state(lane_kernel)["arena_regions"] == 0


def read_kernel_rss(kernel) -> int:
    with open(f"/proc/{kernel.info.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_no_growth_after_1000_push_pull_cycles_of_16_mb(lane_kernel):
    value = np.random.default_rng(0).random(16 * MB // 8)
    transport = lane_kernel.aio._state.transport

    def cycles(count: int) -> None:
        for _ in range(count):
            lane_kernel.push(v=value)
            pulled = lane_kernel.pull("v")
            assert pulled[7] == value[7]
            del pulled

    cycles(50)
    lane_kernel.call(gc.collect)
    before = read_kernel_rss(lane_kernel), kernel_lane_state(lane_kernel), transport._arena.size
    cycles(1000)
    del lane_kernel["v"]
    gc.collect()
    lane_kernel.call(gc.collect)
    lane_kernel.call(int)
    after = read_kernel_rss(lane_kernel), kernel_lane_state(lane_kernel), transport._arena.size
    print(f"\nLANE-DRIFT kernel RSS {before[0] / MB:.1f} -> {after[0] / MB:.1f} MB; arenas {before[1:]} -> {after[1:]}")
    assert after[0] - before[0] < 8 * MB, "the kernel's memory grew over the cycles"
    assert after[1]["arena_bytes"] <= before[1]["arena_bytes"] and after[2] <= before[2], "an arena grew"
    assert after[1]["arena_regions"] == 0 and transport._arena._used == {}


# ---------------------------------------------------------------------- the stream's parser (pure logic)


@pytest.mark.parametrize("chunking", ["one read", "byte by byte", "uneven"])
def test_the_reader_parses_messages_however_the_stream_is_cut(chunking):
    """Whole messages in one read take the reader's fast path; any other cut takes the piecewise one."""
    from kernelproxy.agent import _agent as agent

    sent = [
        ({"k": "rep", "i": 1, "h": {"status": "ok"}}, []),
        ({"k": "out", "i": 2, "t": "stream"}, [b'{"text": "hi"}']),
        ({"k": "req", "i": 3, "h": {"op": "echo"}}, [b"", b"x" * 1000, bytes(range(256)) * 1500]),  # 375 KiB: direct
        ({"k": "rep", "i": 4, "h": None}, [b"a", b"bc"]),
    ]
    stream = b"".join(
        bytes(b"".join(bytes(part) for part in agent._lane_pack(dict(message), frames)[0])) for message, frames in sent
    )
    got = []
    reader = agent.LaneReader(lambda message, frames: got.append((message, list(map(bytes, frames)))), agent.LaneMaps())
    cuts = {"one read": [len(stream)], "byte by byte": [1] * len(stream), "uneven": [5, 11, 3, 70_000, 1, 200_000]}
    sizes = iter(cuts[chunking] * (len(stream) // sum(cuts[chunking]) + 1))
    at = 0
    while at < len(stream):
        view, direct = reader.buffer()
        count = min(len(view), next(sizes), len(stream) - at)
        view[:count] = stream[at : at + count]
        reader.received(count, direct)
        at += count
    assert [message["i"] for message, _ in got] == [1, 2, 3, 4]
    for (message, frames), (sent_message, sent_frames) in zip(got, sent):
        assert message["k"] == sent_message["k"] and message.get("h") == sent_message.get("h")
        assert frames == [bytes(frame) for frame in sent_frames]


# ---------------------------------------------------------------------- requests and interrupts


def test_a_timed_out_request_queued_behind_another_never_runs(lane_kernel):
    first = lane_kernel.submit(time.sleep, 1.5)
    time.sleep(0.2)
    with pytest.raises(kernelproxy.CallTimeout, match="queued"):
        lane_kernel.exec("ran_when_queued = True", timeout=0.5)
    assert first.result(timeout=30) is None  # the first is not hit by the timeout's interrupt
    time.sleep(0.3)
    assert "ran_when_queued" not in lane_kernel


def test_interrupt_stops_the_running_lane_request(lane_kernel):
    future = lane_kernel.submit(time.sleep, 30)
    time.sleep(0.5)
    lane_kernel.interrupt()
    with pytest.raises(kernelproxy.CallInterrupted):
        future.result(timeout=10)
    assert lane_kernel.call(sum, [1, 1]) == 2


def test_a_late_interrupt_does_not_hit_the_next_request(lane_kernel):
    transport = lane_kernel.aio._state.transport
    transport._set_status(8, 10**9)  # an interrupt aimed at a request that is over
    future = lane_kernel.submit(time.sleep, 1)
    time.sleep(0.3)
    os.kill(lane_kernel.info.pid, 2)
    assert future.result(timeout=10) is None  # not interrupted: it was not meant for it


def test_output_from_a_thread_started_by_the_call_reaches_the_caller(lane_kernel, capsys):
    def speak():
        import threading

        thread = threading.Thread(target=lambda: print("from a thread"))
        thread.start()
        thread.join()
        print("from the call")

    lane_kernel.call(speak)
    out = capsys.readouterr().out
    assert "from a thread" in out and "from the call" in out


def test_lane_calls_from_many_threads(lane_kernel):
    results: dict[int, int] = {}

    def work(n: int) -> None:
        for i in range(50):
            results[n * 1000 + i] = lane_kernel.call(pow, n, 2) + i

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n * 1000 + i: n * n + i for n in range(6) for i in range(50)}
