"""Logic above the wire, on the test peers, in milliseconds instead of seconds.

The conformance suites (``test_conformance_*``) hold the fakes to the real
kernels' behaviour; here they drive what real kernels make slow (timeouts,
interrupt graces, deaths, replacements) or cannot do on demand (a lost, late
or garbled message): per-request outcomes through ``AsyncKernel``,
``KernelConnection`` under message faults, and the pool's scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import cloudpickle
import peers
import pytest
from peers import execute_content, run, stubborn, until

import kernelproxy
from kernelproxy import _connection as connection_module
from kernelproxy import _kernel as kernel_module
from kernelproxy._connection import KernelConnection
from kernelproxy._kernel import AsyncKernel
from kernelproxy._protocol import Interrupt, Outcome, Stage
from kernelproxy._testing import fake_parts, start_fake_async
from kernelproxy._wires._fake_kernel import FakeKernel
from kernelproxy._wires.fake import FakeWire

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(peers)

GRACE = 0.3  # seconds an interrupted call has to answer (2 s in production): a stubborn call costs this


@pytest.fixture(autouse=True)
def short_interrupt_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "INTERRUPT_GRACE", GRACE)


@asynccontextmanager
async def fake_kernel(**options) -> AsyncIterator[AsyncKernel]:
    kernel = await start_fake_async(**options)
    try:
        yield kernel
    finally:
        await kernel.shutdown()


# ---------------------------------------------------------------------- each call's own fate (issue 11's first bug)


@pytest.mark.parametrize("transport", ["comm", "execute", "inprocess"])
def test_concurrent_timeouts_each_report_their_own_fate(transport: str) -> None:
    """A runs and ignores the interrupt, B waits behind it: each is told what happened to it."""

    async def case() -> None:
        async with fake_kernel(transport=transport) as kernel:
            await kernel.call(stubborn, 0)  # its source is known now: unpickling it later is quick
            a = asyncio.ensure_future(kernel.options(timeout=0.3).call(stubborn, 1.0))
            await asyncio.sleep(0.05)
            b = asyncio.ensure_future(kernel.options(timeout=0.4).call(int, "7"))
            with pytest.raises(kernelproxy.CallTimeout) as a_info:
                await a
            with pytest.raises(kernelproxy.CallTimeout) as b_info:
                await b
            assert "ignored the interrupt" in str(a_info.value)
            assert "queued behind other work" not in str(a_info.value)
            assert "queued behind other work" in str(b_info.value)
            assert "ignored the interrupt" not in str(b_info.value)

    run(case())


def test_on_timeout_restart_follows_the_call_that_ignored_the_interrupt() -> None:
    async def case() -> None:
        async with fake_kernel() as kernel:
            await kernel.push(kept=1)
            a = asyncio.ensure_future(kernel.options(timeout=0.2).call(stubborn, 0.8))
            await asyncio.sleep(0.05)
            b = asyncio.ensure_future(kernel.options(timeout=0.3, on_timeout="restart").call(int, "7"))
            with pytest.raises(kernelproxy.CallTimeout, match="ignored the interrupt"):
                await a
            with pytest.raises(kernelproxy.CallTimeout, match="queued behind other work") as b_info:
                await b
            assert "restarted" not in str(b_info.value)
            assert await kernel.pull("kept") == 1  # queued behind A's end: B never restarted the kernel
            assert kernel.status.restarts == 0

            with pytest.raises(kernelproxy.CallTimeout, match="restarted") as info:
                await kernel.options(timeout=0.2, on_timeout="restart").call(stubborn, 5)
            assert "namespace is empty" in str(info.value)
            assert kernel.status.restarts == 1 and not await kernel.contains("kept")

    run(case())


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_a_kernel_that_stops_reading_requests_after_an_interrupt_is_not_called_usable(
    monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """xeus-python, now and then: the interrupted call answers, and no later request is ever read."""
    monkeypatch.setattr(kernel_module, "ANSWER_AFTER_INTERRUPT", 0.5)

    async def case() -> None:
        async with fake_kernel(transport=transport) as healthy:
            with pytest.raises(kernelproxy.CallTimeout, match="interrupted and the kernel is usable"):
                await healthy.options(timeout=0.2).call(time.sleep, 5)
        async with fake_kernel(transport=transport, deaf_after_interrupt=True) as kernel:
            await kernel.push(kept=1)
            started = time.monotonic()
            with pytest.raises(kernelproxy.CallTimeout) as info:
                await kernel.options(timeout=0.2).call(time.sleep, 5)
            message = str(info.value)
            assert "has not answered a request since (none within 0.5 s)" in message
            assert "usable" not in message and "call restart()" in message
            assert time.monotonic() - started < 3
        async with fake_kernel(transport=transport, deaf_after_interrupt=True) as kernel:
            await kernel.push(kept=1)
            with pytest.raises(kernelproxy.CallTimeout, match="stopped answering after the interrupt, so it was rest"):
                await kernel.options(timeout=0.2, on_timeout="restart").call(time.sleep, 5)
            assert kernel.status.restarts == 1 and not await kernel.contains("kept")  # a fresh one, answering

    run(case())


def test_a_tiny_timeout_on_an_idle_kernel_never_claims_other_work() -> None:
    async def case() -> None:
        async with fake_kernel() as kernel:
            connection = kernel._state.connection
            for _ in range(30):
                try:
                    await kernel.options(timeout=0.001).call(time.sleep, 0.01)
                except kernelproxy.CallTimeout as exc:
                    assert "queued behind other work" not in str(exc), str(exc)
                # The abandoned call answered and the kernel idle as far as the host knows (its 'idle' status
                # arrived): else the next call *is* queued behind it.
                await until(
                    lambda: not connection._pending and connection._running.get(None) is None, 10, "the kernel idle"
                )
            assert await kernel.call(int, "8") == 8

    run(case())


def test_a_call_that_kills_its_kernel_raises_kernel_died_and_restart_recovers() -> None:
    def die() -> None:
        os._exit(3)  # in a fake kernel this ends the kernel, not this process

    async def case() -> None:
        async with fake_kernel() as kernel:
            started = time.monotonic()
            with pytest.raises(kernelproxy.KernelDiedError, match="exit code 3"):
                await kernel.call(die)
            assert time.monotonic() - started < 1
            assert kernel.status.state == "dead"
            await kernel.restart()
            assert await kernel.call(int, "9") == 9

    run(case())


def sleep_then_mark(seconds: float) -> None:
    import time

    import __main__

    time.sleep(seconds)
    __main__.queued_call_ran = True


async def abandon_a_queued_call(kernel: AsyncKernel) -> None:
    """A long call runs; a second one queued behind it times out; then the first is cancelled."""
    first = asyncio.ensure_future(kernel.call(time.sleep, 30))
    await until(lambda: fake_parts(kernel)[0].running is not None, 5, "the first call running")
    with pytest.raises(kernelproxy.CallTimeout, match="queued behind other work"):
        await kernel.options(timeout=0.1).call(sleep_then_mark, 1.0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await kernel.call(int, "0")  # queued behind the abandoned one: it is over


# The fake kernel interrupts with an asynchronous exception in its thread, which can land anywhere, even
# between open() and the try of tokenize.open() while a traceback is formatted: a file then closes unclosed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_abandoned_queued_call_is_interrupted_as_soon_as_it_starts() -> None:
    async def case() -> None:
        async with fake_kernel() as kernel:
            started = time.monotonic()
            await abandon_a_queued_call(kernel)
            assert time.monotonic() - started < 1.0
            assert not await kernel.contains("queued_call_ran")

    run(case())


@pytest.mark.xfail(
    strict=True,
    reason="the connection interrupts an abandoned queued call when IOPub says it started; ipykernel ignores "
    "SIGINT until it runs the request's handler, so on a slow kernel that interrupt is lost and the call "
    "runs to its end (the fake reproduces it with early_interrupts='drop' and a code_start_delay)",
)
def test_an_abandoned_queued_call_is_interrupted_even_on_a_slow_kernel() -> None:
    async def case() -> None:
        async with fake_kernel(early_interrupts="drop", code_start_delay=0.05) as kernel:
            await abandon_a_queued_call(kernel)
            assert not await kernel.contains("queued_call_ran")

    run(case())


# ---------------------------------------------------------------------- the connection under message faults


@asynccontextmanager
async def fake_connection(interrupt_timeout: float = 5.0) -> AsyncIterator[tuple[KernelConnection, FakeWire]]:
    kernel = FakeKernel()
    wire = FakeWire(kernel)

    async def interrupt_by_message() -> None:  # as KernelConnection's, with its 5 s wait made adjustable
        await asyncio.wait_for(conn.request("control", "interrupt_request", {}), interrupt_timeout)

    conn = KernelConnection(wire, interrupter=interrupt_by_message)
    await conn.open()
    try:
        await conn.wait_ready(5)
        yield conn, wire
    finally:
        await conn.close()
        kernel.die("the test is over", exit_code=0)


def is_type(msg_type: str):
    return lambda channel, msg: msg["msg_type"] == msg_type


def test_a_late_reply_overtaken_by_the_next_one_still_reaches_its_caller() -> None:
    async def case() -> None:
        async with fake_connection() as (conn, wire):
            wire.delay(is_type("execute_reply"), 0.2)
            first = asyncio.ensure_future(conn.execute({"v": "'first'"}))
            second = asyncio.ensure_future(conn.execute({"v": "'second'"}))
            done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {second}
            assert (await first)["user_expressions"]["v"]["data"]["text/plain"] == "'first'"
            assert (await second)["user_expressions"]["v"]["data"]["text/plain"] == "'second'"

    run(case())


def test_a_lost_idle_costs_the_listener_idle_grace_not_the_reply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(connection_module, "IDLE_GRACE", 0.2)

    def is_idle(channel: str, msg: dict) -> bool:  # this request's: wait_ready's kernel_info idle may come late
        return (
            msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
            and msg["parent_header"].get("msg_type") == "execute_request"
        )

    async def case() -> None:
        async with fake_connection() as (conn, wire):
            wire.drop(is_idle)
            seen: list[dict] = []
            started = time.monotonic()
            reply = await conn.request(
                "shell", "execute_request", execute_content("print('out')"), listener=seen.append
            )
            assert reply["content"]["status"] == "ok"
            assert 0.2 <= time.monotonic() - started < 1
            assert [msg["content"]["text"] for msg in seen if msg["msg_type"] == "stream"] == ["out\n"]

    with caplog.at_level(logging.WARNING, logger="kernelproxy"):
        run(case())
    assert "no 'idle' status" in caplog.text


def test_a_garbled_message_is_counted_and_the_rest_get_through() -> None:
    async def case() -> None:
        async with fake_connection() as (conn, wire):
            wire.corrupt(is_type("stream"))
            seen: list[dict] = []
            code = "print('lost', flush=True)\nimport time; time.sleep(0.01)\nprint('kept')"
            reply = await conn.request("shell", "execute_request", execute_content(code), listener=seen.append)
            assert reply["content"]["status"] == "ok"
            assert [msg["content"]["text"] for msg in seen if msg["msg_type"] == "stream"] == ["kept\n"]
            assert conn.rejected_messages == 1

    run(case())


def test_a_lost_request_abandoned_while_the_kernel_is_idle_says_it_never_started() -> None:
    async def case() -> None:
        async with fake_connection() as (conn, wire):
            wire.drop(is_type("execute_request"), direction="to_kernel")
            outcome = Outcome()
            request = conn.request("shell", "execute_request", execute_content("1"), outcome=outcome)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(request, 0.2)
            assert (outcome.stage, outcome.queued_behind, outcome.interrupt) == (Stage.SENT, None, Interrupt.NONE)
            assert outcome.describe().startswith("the kernel had not started it yet")

    run(case())


def test_an_interrupt_request_that_gets_no_answer_is_recorded_as_failed() -> None:
    async def case() -> None:
        async with fake_connection(interrupt_timeout=0.2) as (conn, wire):
            wire.drop(is_type("interrupt_request"), direction="to_kernel")
            outcome = Outcome()
            code = "import time; time.sleep(30)"
            task = asyncio.ensure_future(
                conn.request("shell", "execute_request", execute_content(code), outcome=outcome)
            )
            await until(lambda: outcome.stage is Stage.RUNNING)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert outcome.interrupt is Interrupt.FAILED

    run(case())


# ---------------------------------------------------------------------- the pool's scheduler over fake kernels


def where_am_i(x: int) -> tuple[int, int]:
    import time

    import __main__

    time.sleep(0.05)
    return x, id(__main__)  # each fake kernel has its own __main__


def add_pushed(x: int) -> int:
    import __main__

    return x + __main__.offset


def slow_then(x: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return x


def chatty_task(i: int) -> int:
    print(f"hello from {i}")
    return i


@asynccontextmanager
async def fake_pool(count: int, **options) -> AsyncIterator[tuple[kernelproxy.AsyncKernelPool, list[AsyncKernel]]]:
    kernels = [await start_fake_async(output="discard") for _ in range(count)]
    try:
        async with kernelproxy.AsyncKernelPool(kernels, **options) as pool:
            yield pool, kernels
    finally:
        for kernel in kernels:
            await kernel.shutdown()


def test_pool_tasks_spread_over_the_kernels_and_map_keeps_order() -> None:
    async def case() -> None:
        async with fake_pool(3) as (pool, _):
            results = await pool.map(where_am_i, range(12))
            assert [x for x, _ in results] == list(range(12))
            assert len({where for _, where in results}) == 3
            assert await pool.map(abs, range(-20, 0), chunksize=6) == list(range(20, 0, -1))

    run(case())


def test_pool_retries_a_task_whose_kernel_died_and_the_replacement_gets_every_push() -> None:
    async def case() -> None:
        async with fake_pool(2) as (pool, kernels):
            await pool.push(offset=100)
            victim = pool.options(retries=1).submit(slow_then, 5, 0.5)
            await until(lambda: any(fake_parts(k)[0].running for k in kernels), 5, "the task running")
            (running,) = [k for k in kernels if fake_parts(k)[0].running]
            fake_parts(running)[0].die()
            assert await asyncio.wait_for(victim, 10) == 5  # ran again on the other kernel
            # (the dead kernel stays listed until the pool has noticed: wait for the restart itself)
            await until(lambda: running.status.restarts == 1 and len(pool.kernels) == 2, 10, "the dead kernel replaced")
            assert running.status.restarts == 1  # a given kernel is restarted in place
            assert await running.call(add_pushed, 1) == 101

    run(case())


def test_pool_requeues_a_prefetched_task_that_never_ran_without_using_a_retry() -> None:
    async def case() -> None:
        async with fake_pool(1) as (pool, kernels):
            await pool.map(abs, range(20))  # short tasks: the kernel now gets its next task early
            fatal = pool.submit(slow_then, 1, 0.5)
            innocent = pool.submit(abs, -2)  # sent to the same kernel while the first runs
            await until(lambda: fake_parts(kernels[0])[0].running is not None, 5, "the first task running")
            await asyncio.sleep(0.05)
            fake_parts(kernels[0])[0].die()
            with pytest.raises(kernelproxy.KernelDiedError):
                await asyncio.wait_for(fatal, 10)
            assert await asyncio.wait_for(innocent, 10) == 2  # no retries: it never ran, so it runs now

    run(case())


def test_pool_output_lines_are_attributed_to_their_task(capsys: pytest.CaptureFixture[str]) -> None:
    async def case() -> None:
        async with fake_pool(2) as (pool, _):
            futures = [pool.submit(chatty_task, i) for i in range(4)]
            assert await asyncio.gather(*futures) == [0, 1, 2, 3]

    run(case())
    lines = sorted(line for line in capsys.readouterr().out.splitlines() if "hello" in line)
    assert lines == sorted(f"[task {i}] hello from {i}" for i in range(4))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_request_ids_are_unique_in_the_process_and_in_a_forked_child() -> None:
    """Several clients (a forked child's own included) share a kernel, whose agent never runs one id twice."""
    from kernelproxy._protocol import request_id

    ids = {request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a threaded process; this child only writes
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # the child's next ids, to the parent
        try:
            os.write(write, " ".join(request_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = set(pipe.read().split())
    os.waitpid(child, 0)
    parents = {request_id() for _ in range(100)}
    assert len(childs) == 100 and not childs & (parents | ids)


def test_a_heartbeat_waiting_when_its_wire_closes_opens_no_socket() -> None:
    """A beat queued behind another (the monitor's and a caller's) when the wire closed: no socket left open."""
    import zmq
    import zmq.asyncio

    from kernelproxy._wires.zmq_wire import _Heartbeat

    context = zmq.asyncio.Context()
    made: list[zmq.asyncio.Socket] = []

    class Client:  # jupyter_client's connect_hb(), to a port where no kernel listens
        def connect_hb(self) -> zmq.asyncio.Socket:
            sock = context.socket(zmq.REQ)
            sock.connect("tcp://127.0.0.1:9")
            made.append(sock)
            return sock

    async def case() -> None:
        heartbeat = _Heartbeat(Client())  # type: ignore[arg-type]
        first = asyncio.ensure_future(heartbeat.beat(0.5))
        second = asyncio.ensure_future(heartbeat.beat(0.5))  # waits for the first: one ping at a time
        await until(lambda: len(made) == 1, 5, "the first beat's socket")
        heartbeat.close()
        await asyncio.gather(first, second, return_exceptions=True)
        assert len(made) == 1 and made[0].closed

    try:
        run(case())
    finally:
        for sock in made:
            sock.close(linger=0)
        context.term()
