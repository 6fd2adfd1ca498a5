"""KernelPool and AsyncKernelPool: scheduling, broadcast push, map, failures, replacement, shutdown.

Every pool here has two kernels (the suite must stay fast on two cores).
Functions defined in this module travel to the kernels by value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import sys
import time
from collections.abc import Iterator

import cloudpickle
import numpy as np
import pytest
from helpers import pid_running, wait_pid_gone

import kernelproxy
from kernelproxy import CallTimeout, KernelDiedError, KernelPool

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------- functions run in the kernels


def square(x):
    return x * x


def add(x, y):
    return x + y


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def pushed(name):
    """A pushed value, read in the kernel's namespace (where push() puts it)."""
    import __main__

    return getattr(__main__, name)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


class Unlucky(Exception):
    pass


def raise_unlucky():
    raise Unlucky("13")


def die():
    time.sleep(0.2)  # the kernel has said it started this task: the pool knows it ran (see _policy)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


def die_unless(marker):
    """Kill this kernel the first time (creating ``marker``); return the pid the next time."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        time.sleep(0.2)  # the kernel has said it started this task
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)
    return os.getpid()


def pid_to_file_then_sleep(path, seconds):
    with open(path + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)


def chatty(item):
    print(f"{item}: first line")
    print(f"{item}: second", end="")
    time.sleep(0.05)
    print(" half", file=sys.stdout)
    print(f"{item}: to stderr", file=sys.stderr)
    return item


# ---------------------------------------------------------------------- helpers


def pids(pool: KernelPool) -> set[int]:
    return {k.info.pid for k in pool.kernels}


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


@pytest.fixture(scope="module")
def pool() -> Iterator[KernelPool]:
    """Two local kernels shared by the tests that do not break them."""
    with KernelPool(2, startup_timeout=60) as pool:
        started = pids(pool)
        yield pool
    assert all(wait_pid_gone(pid, 10) for pid in started)


# ---------------------------------------------------------------------- Executor behaviour


def test_is_an_executor_and_submit_returns_futures(pool):
    assert isinstance(pool, concurrent.futures.Executor)
    futures = [pool.submit(add, i, y=10) for i in range(6)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    done, _ = concurrent.futures.wait(futures, timeout=30)
    assert len(done) == 6
    assert [f.result() for f in futures] == [i + 10 for i in range(6)]
    assert sorted(f.result() for f in concurrent.futures.as_completed([pool.submit(square, 3)], timeout=30)) == [9]


def test_tasks_spread_over_idle_kernels(pool):
    futures = [pool.submit(pid_after, 0.3) for _ in range(4)]
    assert {f.result(timeout=30) for f in futures} == pids(pool)


def test_exceptions_keep_their_type(pool):
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=30)
    with pytest.raises(Unlucky, match="13"):
        pool.submit(raise_unlucky).result(timeout=30)
    future = pool.submit(fail_on, 1, bad=1)
    assert isinstance(future.exception(timeout=30), ValueError)


def test_map_preserves_order(pool):
    items = list(range(40))
    assert list(pool.map(square, items)) == [x * x for x in items]
    assert list(pool.map(add, items, reversed(items))) == [39] * 40


@pytest.mark.parametrize("chunksize", [3, 7, 100])
def test_map_chunks_preserve_order(pool, chunksize):
    items = list(range(50))
    assert list(pool.map(square, items, chunksize=chunksize)) == [x * x for x in items]
    assert list(pool.map(add, items, items, chunksize=chunksize)) == [2 * x for x in items]


def test_map_chunksize_means_one_round_trip_per_chunk(pool, monkeypatch):
    calls = []
    original = kernelproxy.AsyncKernel._call_frames

    async def counting(self, *args, **kwargs):
        calls.append(1)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(kernelproxy.AsyncKernel, "_call_frames", counting)
    assert list(pool.map(square, range(25), chunksize=10)) == [x * x for x in range(25)]
    assert len(calls) == 3


def test_map_raises_at_the_failing_item(pool):
    for chunksize in (1, 4):
        results = pool.map(fail_on, range(10), [5] * 10, chunksize=chunksize)
        seen = []
        with pytest.raises(ValueError, match="bad item 5"):
            for value in results:
                seen.append(value)  # noqa: PERF402 (until it raises)
        assert seen == list(range(5 if chunksize == 1 else 4))  # a failing chunk yields none of its items


def test_map_timeout_raises_and_cancels_what_did_not_start(pool):
    # Tiny tasks first: over the lane a kernel then holds up to 16 of them. Before, the slow tasks below were
    # sent 16 per kernel too (the tiny tasks' durations applied to them), and the kernels stayed busy for 16 s.
    assert list(pool.map(square, range(300))) == [i * i for i in range(300)]
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError, match=r"map\(timeout=0.5\): no result came within 0.5 s"):
        list(pool.map(pid_after, [1] * 40, timeout=0.5))
    assert time.monotonic() - started < 1
    # the tasks not sent to a kernel were cancelled; those running finish (as with concurrent.futures):
    # the kernels are free again within about a second, not after 40 / 2 s
    assert pool.submit(square, 4).result(timeout=5) == 16
    assert time.monotonic() - started < 5
    assert len(pool.kernels) == 2
    # the message counts the results that came in time
    results = pool.map(pid_after, [0, 0, 2], timeout=1)
    assert len([next(results), next(results)]) == 2
    with pytest.raises(concurrent.futures.TimeoutError, match=r"2 results came within 1 s .* next one is not ready"):
        next(results)


def raise_timeout_error(x):
    raise TimeoutError(f"the task's own timeout {x}")


def test_a_task_that_raises_timeout_error_is_not_taken_for_the_map_timeout(pool):
    with pytest.raises(TimeoutError, match="the task's own timeout 1"):
        list(pool.map(raise_timeout_error, [1], timeout=30))


def test_task_timeout_option_raises_call_timeout(pool):
    with pytest.raises(CallTimeout):
        pool.options(timeout=0.5).submit(pid_after, 10).result(timeout=30)
    assert pool.submit(square, 5).result(timeout=10) == 25


def test_unpicklable_argument_fails_its_future_only(pool):
    import threading

    future = pool.submit(square, threading.Lock())
    with pytest.raises(kernelproxy.SerializationError, match=r"args\[0\]"):
        future.result(timeout=5)
    assert pool.submit(square, 2).result(timeout=30) == 4


# ---------------------------------------------------------------------- push


def test_push_is_pickled_once_and_reaches_every_kernel(pool, monkeypatch):
    from kernelproxy import _serialization

    calls = []
    original = _serialization.dumps

    def counting_dumps(value, **kwargs):
        calls.append(value)
        return original(value, **kwargs)

    monkeypatch.setattr(_serialization, "dumps", counting_dumps)
    weights = np.arange(100_000, dtype=np.float64)  # 800 kB: travels as an out-of-band buffer
    pool.push(weights=weights, scale=3)
    assert len(calls) == 1
    assert set(calls[0]) == {"weights", "scale"}
    for kernel in pool.kernels:
        assert kernel.eval("float(weights.sum()) * scale") == float(weights.sum()) * 3
    # every kernel sees it from tasks too
    results = [pool.submit(pid_after, 0.2) for _ in range(2)] + [pool.submit(pushed, "scale") for _ in range(4)]
    assert [f.result(timeout=30) for f in results][2:] == [3] * 4


def test_push_forms(pool):
    pool.push({"from_mapping": 1}, keyword=2)
    pool.push()
    assert [k.eval("from_mapping + keyword") for k in pool.kernels] == [3, 3]
    with pytest.raises(ValueError, match="identifiers"):
        pool.push({"not an identifier": 1})


# ---------------------------------------------------------------------- output


def test_progress_bar(pool, capsys):
    pytest.importorskip("tqdm", reason="progress bars need tqdm")
    assert list(pool.map(square, range(30), chunksize=4, progress=True)) == [x * x for x in range(30)]
    err = capsys.readouterr().err
    assert "KernelPool.map" in err and "30/30" in err and "100%" in err
    list(pool.map(square, range(5), progress={"desc": "scoring"}))
    assert "scoring" in capsys.readouterr().err


def test_stdout_lines_are_attributed_to_their_task(pool, capsys):
    assert list(pool.map(chatty, ["a", "b", "c", "d"])) == ["a", "b", "c", "d"]
    captured = capsys.readouterr()
    task_of = {}
    for line in captured.out.splitlines():
        match = re.fullmatch(r"\[task (\d+)\] ([a-d]): (first line|second half)", line)
        assert match, f"unattributed or mixed line {line!r} in {captured.out!r}"
        task_of.setdefault(match.group(2), set()).add(int(match.group(1)))
    assert all(len(ids) == 1 for ids in task_of.values())
    first = task_of["a"].pop()
    assert [task_of[item].pop() for item in "bcd"] == [first + 1, first + 2, first + 3]  # map: one task per item
    assert sorted(re.findall(r"\[task (\d+)\] [a-d]: to stderr", captured.err)) == sorted(
        str(first + i) for i in range(4)
    )
    assert pool.options(output="discard").submit(chatty, "z").result(timeout=30) == "z"
    assert "z:" not in capsys.readouterr().out


def displays_and_prints(item):
    from IPython.display import display

    print(f"{item}: unfinished", end="")
    display(f"{item} displayed")
    return item


def test_task_displays_in_plain_python_are_labelled_text(pool, capsys):
    assert pool.submit(displays_and_prints, "d").result(timeout=30) == "d"
    out = capsys.readouterr().out
    assert re.fullmatch(r"\[task (\d+)\] d: unfinished\n\[task \1\] 'd displayed'\n", out), out
    assert pool.options(output="discard").submit(displays_and_prints, "q").result(timeout=30) == "q"
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------- dying kernels


def test_killed_kernel_is_replaced_with_the_pushed_values(tmp_path):
    with KernelPool(2) as pool:
        pool.push(model={"w": 7})
        before = pids(pool)
        started = time.monotonic()
        with pytest.raises(KernelDiedError, match="died"):
            pool.submit(die).result(timeout=30)
        assert time.monotonic() - started < 10
        now = wait_for(
            lambda: pids(pool) if len(pids(pool)) == 2 and pids(pool) != before else None, 60, "a replacement"
        )
        (dead,) = before - now
        assert not pid_running(dead)
        assert [k.eval("model['w']") for k in pool.kernels] == [7, 7]
        # a kernel killed from outside during a task: same story
        where = str(tmp_path / "victim")
        victim = pool.submit(pid_to_file_then_sleep, where, 30)
        wait_for(lambda: os.path.exists(where), 30, "the task to start")
        with open(where) as file:
            os.kill(int(file.read()), signal.SIGKILL)
        with pytest.raises(KernelDiedError):
            victim.result(timeout=30)
        # tasks sent behind the fatal one (short tasks are prefetched) never ran: they run elsewhere
        wait_for(lambda: len(pool.kernels) == 2, 60, "two kernels again")
        list(pool.map(square, range(50)))  # short tasks: the kernels now get their next task early
        fatal, innocent = pool.submit(die), [pool.submit(square, i) for i in range(30)]
        with pytest.raises(KernelDiedError):
            fatal.result(timeout=30)
        assert [f.result(timeout=60) for f in innocent] == [i * i for i in range(30)]
        # retries: the task runs again on another kernel and succeeds
        marker = str(tmp_path / "died-once")
        survivor = pool.options(retries=1).submit(die_unless, marker).result(timeout=60)
        assert os.path.exists(marker)
        assert survivor in pids(pool)
        wait_for(lambda: len(pool.kernels) == 2, 60, "two kernels again")
        assert sorted(pool.submit(pushed, "model").result(timeout=30)["w"] for _ in range(2)) == [7, 7]
        final = pids(pool)
    assert all(wait_pid_gone(pid, 10) for pid in final)


def test_retries_exhausted_raise(tmp_path):
    with KernelPool(2, retries=1) as pool:
        with pytest.raises(KernelDiedError, match="retries exhausted"):
            pool.submit(die).result(timeout=60)
        wait_for(lambda: len(pool.kernels) == 2, 60, "two kernels again")
        assert pool.submit(square, 3).result(timeout=30) == 9
    with pytest.raises(ValueError, match="retries"):
        KernelPool(2, retries=-1)


# ---------------------------------------------------------------------- shutdown


def test_shutdown_waits_cancels_and_leaves_no_process():
    pool = KernelPool(2)
    started = pids(pool)
    running = [pool.submit(pid_after, 0.5) for _ in range(2)]
    time.sleep(0.2)
    queued = [pool.submit(pid_after, 0.5) for _ in range(4)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert {f.result(timeout=0) for f in running} == started
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)
    assert all(wait_pid_gone(pid, 10) for pid in started)
    pool.shutdown()  # idempotent


def test_shutdown_without_wait_finishes_the_tasks_then_stops_the_kernels():
    pool = KernelPool(2)
    started = pids(pool)
    futures = [pool.submit(pid_after, 0.3) for _ in range(4)]
    pool.shutdown(wait=False)
    assert {f.result(timeout=30) for f in futures} == started
    assert all(wait_pid_gone(pid, 15) for pid in started)


# ---------------------------------------------------------------------- other kernels


@pytest.fixture(scope="module")
def two_kernels() -> Iterator[list[kernelproxy.Kernel]]:
    kernels = [kernelproxy.start(), kernelproxy.start()]
    try:
        yield kernels
    finally:
        for kernel in kernels:
            pid = kernel.info.pid
            kernel.shutdown()
            wait_pid_gone(pid, 10)


def test_pool_of_kernel_objects_leaves_them_running_and_restarts_dead_ones(two_kernels):
    with KernelPool(two_kernels) as pool:
        assert pids(pool) == {k.info.pid for k in two_kernels}
        assert {f.result(timeout=30) for f in [pool.submit(pid_after, 0.3) for _ in range(4)]} == pids(pool)
        pool.push(given_value=11)
        before = pids(pool)
        with pytest.raises(KernelDiedError):
            pool.submit(die).result(timeout=30)
        # the dead one was a kernel kernelproxy started: the pool restarted it, with the pushed value
        wait_for(lambda: len(pool.kernels) == 2 and all(k.is_alive() for k in two_kernels), 60, "a restart")
        after = {k.info.pid for k in two_kernels}
        assert len(after - before) == 1 and pids(pool) == after
        assert all(k["given_value"] == 11 for k in two_kernels)
    assert all(k.is_alive() for k in two_kernels)
    assert two_kernels[0].call(square, 6) == 36


def test_pool_of_connection_files(two_kernels):
    files = [k.info.connection_file for k in two_kernels]
    with KernelPool(files) as pool:
        assert pids(pool) == {k.info.pid for k in two_kernels}
        assert list(pool.map(square, range(10), chunksize=2)) == [x * x for x in range(10)]
    assert all(k.is_alive() for k in two_kernels)  # disconnected, not shut down


def test_pool_without_replaceable_kernels_says_so(external_kernel):
    """A kernel the pool only connected to, dead for good: no replacement, then no pool."""
    kernelproxy.connect(external_kernel.connection_file, startup_timeout=30).close()  # wait until it answers
    with KernelPool([external_kernel.connection_file], startup_timeout=2) as pool:
        assert pool.submit(square, 3).result(timeout=30) == 9
        with pytest.raises(KernelDiedError):
            pool.submit(die).result(timeout=30)

        def submit_fails():
            try:
                pool.submit(square, 1)
            except KernelDiedError as exc:
                return str(exc)
            return None

        assert "none could be replaced" in wait_for(submit_fails, 30, "the pool to give up")
        assert pool.kernels == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one kernel, not 0"):
        KernelPool(0)
    with pytest.raises(TypeError, match=r"list of connection files \(\['kernel-1.json'\]\), not one file name"):
        KernelPool("kernel-1.json")
    with pytest.raises(TypeError, match=r"the number of kernels is an int: KernelPool\(2\), not KernelPool\('2'\)"):
        KernelPool("2")
    with pytest.raises(TypeError, match="takes Kernel objects or connection files, not object"):
        KernelPool([object()])


# ---------------------------------------------------------------------- asyncio


def test_async_pool():
    async def main():
        async with kernelproxy.AsyncKernelPool(2) as pool:
            await pool.push(offset=100)
            future = pool.submit(add, 1, 2)
            assert isinstance(future, asyncio.Future)
            assert await future == 3
            assert await pool.map(square, range(20)) == [x * x for x in range(20)]
            assert [x async for x in pool.map(square, range(9), chunksize=4)] == [x * x for x in range(9)]
            assert await pool.submit(pushed, "offset") == 100
            with pytest.raises(ValueError):
                await pool.submit(fail_on, 2, 2)
            with pytest.raises(asyncio.TimeoutError, match=r"map\(timeout=0.3\): no result came within 0.3 s"):
                await pool.map(pid_after, [0.5] * 20, timeout=0.3)
            # cancelling a running task interrupts it: the kernels are free at once
            slow = pool.submit(pid_after, 30)
            await asyncio.sleep(0.3)
            slow.cancel()
            assert await asyncio.wait_for(pool.map(square, [1, 2, 3]), 5) == [1, 4, 9]
            started = {k.info.pid for k in pool.kernels}
        assert all(wait_pid_gone(pid, 10) for pid in started)
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(square, 1)

    asyncio.run(main())


# ---------------------------------------------------------------------- stopping one task (issue 13, section 4)


def test_interrupt_stops_one_running_task_and_only_its_kernel(pool):
    stuck = pool.submit(pid_after, 60)
    other = pool.submit(pid_after, 3)  # on the other kernel
    time.sleep(1.0)
    started = time.monotonic()
    assert pool.interrupt(stuck) is True
    with pytest.raises(kernelproxy.CallInterrupted, match="interrupted"):
        stuck.result(10)
    assert time.monotonic() - started < 5
    assert other.result(10) in pids(pool)  # the other kernel's task was not interrupted
    assert pool.interrupt(other) is False  # finished: nothing to stop
    assert sorted(pool.map(square, range(6))) == [x * x for x in range(6)]  # both kernels still work


def test_interrupt_drops_a_task_still_waiting_for_a_kernel():
    with KernelPool(1, prefetch=False) as single:
        busy = single.submit(pid_after, 2)
        waiting = single.submit(pushed_or_none, "never_set_here")
        time.sleep(0.5)
        assert single.interrupt(waiting) is True
        with pytest.raises(kernelproxy.CallInterrupted, match="before it started"):
            waiting.result(5)
        assert busy.result(10) > 0  # the running task was left alone
        with pytest.raises(ValueError, match="submit"):
            single.interrupt(concurrent.futures.Future())


def pushed_or_none(name: str):
    import __main__

    return getattr(__main__, name, None)


def test_async_pool_interrupt():
    async def main():
        async with kernelproxy.AsyncKernelPool(1) as pool:
            stuck = pool.submit(pid_after, 60)
            await asyncio.sleep(1.0)
            assert await pool.interrupt(stuck) is True
            with pytest.raises(kernelproxy.CallInterrupted):
                await stuck
            assert await asyncio.wait_for(pool.submit(square, 7), 10) == 49

    asyncio.run(main())


def die_at_once():
    os.kill(os.getpid(), signal.SIGKILL)  # before the kernel's 'busy' may have left it


def test_a_task_that_kills_its_kernel_at_once_is_not_sent_again_and_again():
    """Its kernel may die before saying it started it: sent again once at most, then it fails (retries=0)."""
    with KernelPool(2, retries=0) as pool:
        started = time.monotonic()
        with pytest.raises(KernelDiedError):
            pool.submit(die_at_once).result(timeout=90)
        assert time.monotonic() - started < 60
        wait_for(lambda: len(pool.kernels) == 2, 60, "replacements")
        assert sorted(pool.map(square, range(4))) == [0, 1, 4, 9]
