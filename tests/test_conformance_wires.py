"""The wire contract, held against the fake wire and the real ones (zmq to a local ipykernel, a server's websocket).

Each case runs through ``KernelConnection``, which is what reads a wire:
replies routed by their parent's msg_id, IOPub status around each request,
binary buffers, encode errors, death, output before the reply, and the
``Outcome`` of an abandoned request. A case that cannot hold for a peer is
skipped there with the reason; none is faked.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from peers import (
    DEATH_WITHIN,
    STUBBORN_CELL,
    WIRE_PEERS,
    Record,
    Site,
    connected,
    execute_content,
    make_site,
    printed,
    run,
    until,
)

import kernelproxy
from kernelproxy import _connection as connection_module
from kernelproxy._bootstrap import install_agent
from kernelproxy._protocol import Interrupt, Outcome, Stage
from kernelproxy._transports.comm import CommTransport


@pytest.fixture(scope="module", params=WIRE_PEERS)
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One kernel per peer kind for the module's cases that leave it usable."""
    kernel_site = make_site(
        request.param, tmp_path_factory.mktemp("wires"), lambda: request.getfixturevalue("jupyter_server")
    )
    yield kernel_site
    kernel_site.close()


@pytest.fixture
def fresh_site(site: Site, tmp_path, request: pytest.FixtureRequest):
    """A kernel of the same kind as ``site`` for one case that kills it."""
    kernel_site = make_site(site.kind, tmp_path, lambda: request.getfixturevalue("jupyter_server"))
    yield kernel_site
    kernel_site.close()


def test_kernel_info_reply_reaches_its_request(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as conn:
            info = await conn.wait_ready(10)
            assert info["status"] == "ok"
            assert info["protocol_version"].startswith("5.")
            assert info["language_info"]["name"] == "python"

    run(case())


def test_a_shell_request_runs_between_busy_and_idle_with_its_parent(site: Site) -> None:
    async def case() -> None:
        record: Record = []
        async with connected(site, record) as conn:
            reply = await conn.request("shell", "execute_request", execute_content("x_conformance = 1"))
            msg_id = reply["parent_header"]["msg_id"]
            assert reply["msg_type"] == "execute_reply" and reply["content"]["status"] == "ok"

            def states() -> list[str]:
                return [
                    msg["content"]["execution_state"]
                    for channel, msg in record
                    if channel == "iopub"
                    and msg["msg_type"] == "status"
                    and msg["parent_header"].get("msg_id") == msg_id
                ]

            await until(lambda: "idle" in states(), 5, "the request's idle status")
            assert states() == ["busy", "idle"]
            replies = [(channel, msg) for channel, msg in record if msg["parent_header"].get("msg_id") == msg_id]
            assert [channel for channel, msg in replies if msg["msg_type"] == "execute_reply"] == ["shell"]

    run(case())


def test_concurrent_replies_are_routed_by_msg_id(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as conn:
            replies = await asyncio.gather(*(conn.execute({"v": f"{i} * 7"}) for i in range(40)))
            values = [int(reply["user_expressions"]["v"]["data"]["text/plain"]) for reply in replies]
            assert values == [i * 7 for i in range(40)]

    run(case())


def test_two_clients_of_one_kernel_each_get_their_own_replies_and_output(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as first, connected(site) as second:
            heard: dict[str, list[dict]] = {"first": [], "second": []}

            def ask(conn, name: str, i: int):
                code = f"print('{name} {i}')"
                content = execute_content(code, user_expressions={"v": f"{i} + 100"})
                return conn.request("shell", "execute_request", content, listener=heard[name].append)

            replies = await asyncio.gather(
                *(ask(first if i % 2 else second, "first" if i % 2 else "second", i) for i in range(12))
            )
            values = [int(reply["content"]["user_expressions"]["v"]["data"]["text/plain"]) for reply in replies]
            assert values == [i + 100 for i in range(12)]
            for name, parity in (("first", 1), ("second", 0)):
                by_request: dict[str, str] = {}  # a kernel may split a print over several stream messages
                for msg in heard[name]:
                    if msg["msg_type"] == "stream":
                        parent = msg["parent_header"]["msg_id"]
                        by_request[parent] = by_request.get(parent, "") + msg["content"]["text"]
                assert sorted(by_request.values()) == sorted(f"{name} {i}\n" for i in range(12) if i % 2 == parity)

    run(case())


def test_binary_buffers_survive_both_ways(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as conn:
            await install_agent(conn)
            transport = await CommTransport.open(conn)  # itself proves a 256 KiB round trip
            frames = [b"", os.urandom(1), os.urandom(100_000), bytearray(os.urandom(3_000_000))]
            header, back = await transport.request({"op": "echo"}, frames)
            assert header["status"] == "ok"
            assert [bytes(frame) for frame in back] == [bytes(frame) for frame in frames]
            await transport.close()

    run(case())


@pytest.mark.parametrize("bad", ["\ud800", object()], ids=["lone-surrogate", "object"])
def test_a_message_that_cannot_be_encoded_leaves_no_trace(site: Site, bad: object) -> None:
    async def case() -> None:
        record: Record = []
        async with connected(site, record) as conn:
            seen = len(record)
            with pytest.raises(kernelproxy.SerializationError, match="cannot encode the execute_request"):
                await conn.request("shell", "execute_request", execute_content("", user_expressions={"v": bad}))
            assert conn._pending == {}
            reply = await conn.request("shell", "execute_request", execute_content("", user_expressions={"v": "6 * 7"}))
            assert reply["content"]["user_expressions"]["v"]["data"]["text/plain"] == "42"
            # A server sends its own kernel_info_requests in the websocket's session (jupyter_server's "nudge"),
            # whose late answers reach this connection too: only this process's requests count.
            ours = f"{conn.session.session}_{os.getpid()}_"
            answered = {msg["parent_header"].get("msg_id") or "" for _, msg in record[seen:]}
            before = {msg["parent_header"].get("msg_id") for _, msg in record[:seen]}
            later = {msg_id for msg_id in answered - before if msg_id.startswith(ours)}
            assert later == {reply["parent_header"]["msg_id"]}  # only the second request reached the kernel

    run(case())


def test_death_is_reported_promptly_and_fails_waiting_requests(fresh_site: Site) -> None:
    async def case() -> None:
        async with connected(fresh_site) as conn:
            outcome = Outcome()
            waiting = asyncio.ensure_future(
                conn.request(
                    "shell", "execute_request", execute_content("import time; time.sleep(60)"), outcome=outcome
                )
            )
            await until(lambda: outcome.stage is Stage.RUNNING, 10, "the request running")
            killed = time.monotonic()
            await fresh_site.kill()
            with pytest.raises(kernelproxy.KernelDiedError):
                await waiting
            assert time.monotonic() - killed < DEATH_WITHIN[fresh_site.kind]
            assert outcome.died is not None and conn.dead is not None
            with pytest.raises(kernelproxy.KernelDiedError):
                await conn.execute({"v": "1"})

    run(case())


def test_the_wire_says_why_a_kernel_is_gone_for_good(fresh_site: Site) -> None:
    async def case() -> None:
        async with connected(fresh_site) as conn:
            assert await conn.wire.death() is None
            await fresh_site.kill_for_good()
            deadline = time.monotonic() + 20  # a heartbeat needs 3 missed beats, 1 s apart
            reason = None
            while reason is None and time.monotonic() < deadline:
                reason = await conn.wire.death()
                await asyncio.sleep(0.2)
            assert isinstance(reason, str) and reason

    run(case())


def test_the_listener_gets_stream_output_before_the_reply(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as conn:
            seen: list[dict] = []
            code = "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nprint('again')"
            reply = await conn.request("shell", "execute_request", execute_content(code), listener=seen.append)
            assert reply["content"]["status"] == "ok"
            streams = [msg for msg in seen if msg["msg_type"] == "stream"]
            stdout = "".join(msg["content"]["text"] for msg in streams if msg["content"]["name"] == "stdout")
            stderr = "".join(msg["content"]["text"] for msg in streams if msg["content"]["name"] == "stderr")
            assert (stdout, stderr) == ("to stdout\nagain\n", "to stderr\n")
            assert {msg["parent_header"]["msg_id"] for msg in seen} == {reply["parent_header"]["msg_id"]}

    run(case())


def test_an_abandoned_running_request_is_interrupted_and_answers(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded machine (or a server's REST interrupt) may take seconds: the case is the answered path.
    monkeypatch.setattr(connection_module, "INTERRUPT_GRACE", 15.0)

    async def case() -> None:
        async with connected(site) as conn:
            outcome = Outcome()
            code = "import time; time.sleep(30)"
            task = asyncio.ensure_future(
                conn.request("shell", "execute_request", execute_content(code), outcome=outcome)
            )
            await until(lambda: outcome.stage is Stage.RUNNING, 10, "the request running")
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # returns once the interrupt was answered (or the grace ran out)
            assert time.monotonic() - started < 15.0
            assert (outcome.abandoned, outcome.stage, outcome.interrupt) == (True, Stage.ANSWERED, Interrupt.ANSWERED)
            assert outcome.describe() == "its remote work was interrupted and the kernel is usable"
            reply = await conn.execute({"v": "1 + 1"})
            assert reply["user_expressions"]["v"]["data"]["text/plain"] == "2"

    run(case())


def test_an_abandoned_request_that_ignores_the_interrupt_is_recorded_as_ignored(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "INTERRUPT_GRACE", 0.3)

    async def case() -> None:
        async with connected(site) as conn:
            outcome, seen = Outcome(), []
            request = conn.request(
                "shell",
                "execute_request",
                execute_content(STUBBORN_CELL.format(seconds=1)),
                listener=seen.append,
                outcome=outcome,
            )
            task = asyncio.ensure_future(request)
            await until(printed(seen, "stubborn"), 10, "the stubborn code running")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (outcome.stage, outcome.interrupt) == (Stage.RUNNING, Interrupt.IGNORED)
            assert "ignored the interrupt" in outcome.describe()
            await conn.request("shell", "kernel_info_request", {})  # queued behind it: the kernel is free again
            await until(lambda: outcome.stage is Stage.ANSWERED, 5, "the late reply")  # recorded, then dropped
            assert conn._pending == {}

    run(case())


def test_an_abandoned_queued_request_records_what_it_waited_behind(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as conn:
            first, second = Outcome(), Outcome()
            sleep = execute_content("import time; time.sleep(30)")
            short = execute_content("import time; time.sleep(1)")
            running = asyncio.ensure_future(conn.request("shell", "execute_request", sleep, outcome=first))
            await until(lambda: first.stage is Stage.RUNNING, 10, "the first request running")
            queued = asyncio.ensure_future(conn.request("shell", "execute_request", short, outcome=second))
            await until(lambda: second.stage is Stage.SENT, 5, "the second request sent")
            await asyncio.sleep(0.2)  # it reached the kernel, which is busy with the first
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert (second.stage, second.queued_behind, second.interrupt) == (Stage.SENT, first.msg_id, Interrupt.NONE)
            assert "queued behind other work" in second.describe()
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            # It is interrupted as soon as the kernel says it started it. Whether that interrupt lands in its
            # code is a race on real kernels (ipykernel ignores SIGINT until it runs the handler); the fake
            # kernel's default lets it land: test_logic_on_fakes covers both.
            await until(lambda: second.stage is Stage.ANSWERED, 10, "the queued request's reply")
            assert second.interrupt is not Interrupt.NONE

    run(case())


def test_control_traffic_does_not_hide_what_the_kernel_runs(site: Site) -> None:
    async def case() -> None:
        async with connected(site) as conn:
            first, second = Outcome(), Outcome()
            sleep = execute_content("import time; time.sleep(3)")
            running = asyncio.ensure_future(conn.request("shell", "execute_request", sleep, outcome=first))
            await until(lambda: first.stage is Stage.RUNNING, 10, "the first request running")
            queued = asyncio.ensure_future(conn.request("shell", "execute_request", sleep, outcome=second))
            await conn.request("control", "kernel_info_request", {})
            await asyncio.sleep(0.2)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            await until(lambda: second.stage is Stage.ANSWERED, 10, "the queued request interrupted")
            assert second.queued_behind == first.msg_id

    run(case())
