"""The comm transport: negotiation, and buffers that are tamper-evident although HMAC does not cover them."""

from __future__ import annotations

import numpy as np
import pytest

import kernelproxy
from kernelproxy._transports import comm as comm_module


@pytest.fixture(scope="module")
def comm_kernel():
    kernel = kernelproxy.start(transport="comm")
    yield kernel
    kernel.shutdown()


def test_auto_picks_comm_on_a_connected_ipykernel_and_execute_can_be_forced(external_kernel):
    """A kernel kernelproxy did not start gets no lane unless asked (tests/test_lane.py): comm is the default."""
    with kernelproxy.connect(external_kernel.connection_file) as auto, kernelproxy.start(transport="execute") as forced:
        assert auto.info.transport.startswith("comm (binary buffers")
        assert forced.info.transport.startswith("execute")


def test_request_whose_buffers_were_altered_is_refused_in_the_kernel(comm_kernel):
    transport = comm_kernel.aio._state.transport
    original = np.arange(100_000, dtype=np.float64)
    frames = kernelproxy._serialization.dumps({"victim": original})
    data = {"header": {"op": "push"}, "digest": comm_module.digest_frames(transport.digest, frames)}
    altered = [frames[0], np.zeros_like(original).data]  # same sizes, other bytes: HMAC would not notice
    content = {"comm_id": transport._comm_id, "data": data}
    request = transport._conn.request("shell", "comm_msg", content, buffers=altered, matcher=transport.reply_matcher())
    reply = comm_kernel._portal.run(request)
    header = reply["content"]["data"]["header"]
    assert header["status"] == "error" and header["kind"] == "protocol"
    assert "do not match its signed digest" in header["evalue"]
    assert "victim" not in comm_kernel  # refused, never unpickled
    comm_kernel.push(victim=original)  # and the kernel is usable
    np.testing.assert_array_equal(comm_kernel.pull("victim"), original)


def test_reply_whose_buffers_do_not_match_its_digest_is_refused_on_the_host(comm_kernel, monkeypatch):
    comm_kernel.push(payload=np.ones(50_000))
    real_digest = comm_module.digest_frames
    calls = []

    def digest_that_sees_altered_replies(algorithm, frames):
        calls.append(len(frames))
        if len(calls) == 2:  # the host's check of the reply: as if its buffers had changed in transit
            return "0" * 64
        return real_digest(algorithm, frames)

    monkeypatch.setattr(comm_module, "digest_frames", digest_that_sees_altered_replies)
    with pytest.raises(kernelproxy.ProtocolError, match="do not match their signed digest"):
        comm_kernel.pull("payload")
    monkeypatch.undo()
    assert comm_kernel.pull("payload").sum() == 50_000


def test_large_values_arrive_writable_and_intact(comm_kernel):
    array = np.random.default_rng(1).normal(size=5_000_000)  # 40 MB, out-of-band
    comm_kernel.push(array=array)
    assert comm_kernel.eval("array.flags.writeable")
    back = comm_kernel.pull("array")
    assert back.flags.writeable
    back[0] = 1.0  # writable memory, received without a copy
    np.testing.assert_array_equal(back[1:], array[1:])


def test_thousands_of_concurrent_calls_all_complete(comm_kernel):
    # Comm replies ride on IOPub, whose PUB socket drops past its high-water mark: none may be lost.
    import concurrent.futures

    futures = [comm_kernel.submit(int, str(i)) for i in range(3000)]
    done, not_done = concurrent.futures.wait(futures, timeout=90)
    assert not not_done, f"{len(not_done)} of 3000 calls never completed"
    assert [future.result() for future in futures] == list(range(3000))
