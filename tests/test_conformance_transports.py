"""The transport contract, held against the test peers and the real transports.

Peers: comm and execute over the fake wire, the in-process transport, and
comm, execute and the lane beside zmq to a real ipykernel; and comm over a size-limited
path (frames in parts, replies on shell), the fake wire's and a real Jupyter
Server's websocket. Each case speaks the agent's
protocol (header + frames) through ``Transport.request``: values and binary
frames round trip, concurrent requests get their own replies, output reaches
the listener before the reply, errors come back as error replies, and an
abandoned or orphaned request records its fate in its ``Outcome``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import cloudpickle
import numpy as np
import peers
import pytest
from peers import (
    DEATH_WITHIN,
    TRANSPORT_PEERS,
    FakeSite,
    Site,
    printed,
    run,
    running,
    site_for_transport,
    stubborn,
    transport_on,
    until,
)

import kernelproxy
from kernelproxy import _connection as connection_module
from kernelproxy import _protocol as protocol
from kernelproxy import _serialization as serialization
from kernelproxy._protocol import Interrupt, Outcome, Stage

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(peers)


@pytest.fixture(scope="module", params=TRANSPORT_PEERS)
def peer(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def site(peer: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    kernel_site = site_for_transport(
        peer, tmp_path_factory.mktemp("transports"), lambda: request.getfixturevalue("jupyter_server")
    )
    yield kernel_site
    kernel_site.close()


@pytest.fixture
def fresh_site(peer: str, tmp_path, request: pytest.FixtureRequest):
    kernel_site = site_for_transport(peer, tmp_path, lambda: request.getfixturevalue("jupyter_server"))
    yield kernel_site
    kernel_site.close()


def call(fn, *args, **kwargs) -> tuple[protocol.CallHeader, list]:
    return protocol.call(), serialization.dumps((fn, args, kwargs))


def value(frames: list) -> object:
    return serialization.loads(frames, what="the reply")


def chatty(n: int) -> int:
    print("line 1")
    print("to stderr", file=sys.stderr)
    print("line 2", flush=True)
    return n


def fails() -> None:
    raise ValueError("as intended")


def test_a_call_round_trips(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            header, frames = await transport.request(*call(divmod, 17, 5))
            assert header["status"] == "ok" and value(frames) == (3, 2)

    run(case())


def test_binary_frames_survive(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            frames = [b"", os.urandom(1), os.urandom(2_500_000)]  # execute: over its inline limit, so chunked
            header, back = await transport.request(protocol.echo(), frames)
            assert header["status"] == "ok" and [bytes(frame) for frame in back] == frames
            array = np.random.default_rng(0).normal(size=300_000)  # out-of-band buffers, both ways
            header, back = await transport.request(*call(np.negative, array))
            np.testing.assert_array_equal(value(back), -array)

    run(case())


def test_concurrent_requests_each_get_their_own_reply(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            payloads = [os.urandom(i * 97) for i in range(40)]
            replies = await asyncio.gather(*(transport.request(protocol.echo(), [p]) for p in payloads))
            assert [bytes(frames[0]) for _, frames in replies] == payloads

    run(case())


def test_the_listener_gets_the_output_before_the_reply(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            seen: list[dict] = []
            _, frames = await transport.request(*call(chatty, 5), listener=seen.append)
            assert value(frames) == 5
            streams = [msg["content"] for msg in seen if msg["msg_type"] == "stream"]
            stdout = "".join(content["text"] for content in streams if content["name"] == "stdout")
            stderr = "".join(content["text"] for content in streams if content["name"] == "stderr")
            assert (stdout, stderr) == ("line 1\nline 2\n", "to stderr\n")

    run(case())


def test_an_exception_comes_back_as_an_error_reply(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            header, frames = await transport.request(*call(fails))
            assert (header["status"], header["kind"], header["ename"]) == ("error", "exception", "ValueError")
            error = value(frames)
            assert isinstance(error, ValueError) and str(error) == "as intended"
            header, _ = await transport.request({"op": "no such op"}, [])
            assert (header["status"], header["kind"]) == ("error", "protocol")

    run(case())


def test_a_header_that_cannot_be_encoded_is_refused_and_leaves_no_trace(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, connection):
            with pytest.raises(kernelproxy.SerializationError):
                await transport.request({"op": "echo", "bad": object()}, [b"x"])
            if connection is not None:
                assert connection._pending == {}
            _, frames = await transport.request(protocol.echo(), [b"after"])
            assert bytes(frames[0]) == b"after"

    run(case())


def test_an_abandoned_running_request_is_interrupted(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, connection):
            outcome = Outcome()
            task = asyncio.ensure_future(transport.request(*call(time.sleep, 30), outcome=outcome))
            await until(lambda: running(connection, outcome), 10, "the request running")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (outcome.abandoned, outcome.stage, outcome.interrupt) == (True, Stage.ANSWERED, Interrupt.ANSWERED)
            _, frames = await transport.request(*call(int, "7"))
            assert value(frames) == 7

    run(case())


def test_a_request_that_ignores_the_interrupt_is_recorded_as_ignored(
    peer: str, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "INTERRUPT_GRACE", 0.3)

    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            outcome, seen = Outcome(), []
            task = asyncio.ensure_future(transport.request(*call(stubborn, 1), listener=seen.append, outcome=outcome))
            await until(printed(seen, "stubborn"), 10, "the stubborn code running")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (outcome.stage, outcome.interrupt) == (Stage.RUNNING, Interrupt.IGNORED)
            _, frames = await transport.request(*call(int, "8"))  # runs once the stubborn one ends
            assert value(frames) == 8

    run(case())


def test_an_abandoned_queued_request_records_what_it_waited_behind(peer: str, site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, site) as (transport, connection):
            first, second = Outcome(), Outcome()
            busy = asyncio.ensure_future(transport.request(*call(time.sleep, 30), outcome=first))
            await until(lambda: running(connection, first), 10, "the first request running")
            queued = asyncio.ensure_future(transport.request(*call(time.sleep, 1), outcome=second))
            await until(lambda: second.stage is Stage.SENT, 5, "the second request sent")
            await asyncio.sleep(0.2)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert (second.stage, second.queued_behind, second.interrupt) == (Stage.SENT, first.msg_id, Interrupt.NONE)
            busy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await busy
            # Interrupted as soon as it starts (whether that lands in its code is a race on real kernels: see
            # the wire suite's twin of this case; test_logic_on_fakes covers both outcomes), or skipped (the lane).
            await until(lambda: second.stage is Stage.ANSWERED, 10, "the queued request's reply")
            assert (second.interrupt is not Interrupt.NONE) != second.skipped, second

    run(case())


def test_death_fails_waiting_requests_with_kernel_died(peer: str, fresh_site: Site) -> None:
    async def case() -> None:
        async with transport_on(peer, fresh_site) as (transport, connection):
            outcome, queued_outcome = Outcome(), Outcome()
            busy = asyncio.ensure_future(transport.request(*call(time.sleep, 60), outcome=outcome))
            queued = asyncio.ensure_future(transport.request(*call(int, "1"), outcome=queued_outcome))
            await until(lambda: running(connection, outcome), 10, "the request running")
            killed = time.monotonic()
            await fresh_site.kill()
            for task in (busy, queued):
                with pytest.raises(kernelproxy.KernelDiedError):
                    await task
            assert time.monotonic() - killed < DEATH_WITHIN[fresh_site.kind]
            assert outcome.died is not None and queued_outcome.died is not None
            with pytest.raises(kernelproxy.KernelDiedError):
                await transport.request(*call(int, "2"))

    run(case())


def test_frames_are_copied_both_ways(site: Site, peer: str) -> None:
    if not isinstance(site, FakeSite):
        pytest.skip("real kernels are other processes: nothing is shared by construction")

    async def case() -> None:
        async with transport_on(peer, site) as (transport, _):
            array = np.zeros(100_000)  # out-of-band: the transport sees the array's own memory
            await transport.request(protocol.push(), serialization.dumps({"shared": array}))
            await transport.request(protocol.exec_("shared[0] = 1.0"), [])
            assert array[0] == 0.0
            _, frames = await transport.request(protocol.pull(["shared"]), [])
            (back,) = value(frames)
            back[1] = 2.0
            _, frames = await transport.request(protocol.eval_("shared[1]"), [])
            assert value(frames) == 0.0

    run(case())
