"""Concurrency: many threads on one Kernel, use inside event loops, AsyncKernel, live output."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
from helpers import wait_pid_gone

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tagged(thread_id: int, index: int, payload: list):
    """Echo who asked, so that a reply routed to the wrong caller shows."""
    return thread_id, index, sum(payload), os.getpid()


# ---------------------------------------------------------------------- threads


def test_many_threads_many_calls_routed_to_their_callers(kernel):
    threads, calls = 8, 100
    barrier = threading.Barrier(threads)
    pid = kernel.info.pid

    def worker(thread_id: int):
        barrier.wait()
        results = []
        for index in range(calls):
            payload = [thread_id, index, thread_id * index]
            results.append((index, payload, kernel.call(tagged, thread_id, index, payload)))
        return results

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = {pool.submit(worker, t): t for t in range(threads)}
        for future in concurrent.futures.as_completed(futures, timeout=110):
            thread_id = futures[future]
            results = future.result()
            assert len(results) == calls
            for index, payload, result in results:
                assert result == (thread_id, index, sum(payload), pid)


def test_threads_mixing_verbs(kernel):
    """push/pull/eval/call from several threads at once, each on its own names."""

    def worker(t: int):
        name = f"thread_var_{t}"
        for i in range(20):
            kernel.push({name: np.full(10, i + t)})
            assert kernel.eval(f"int({name}.sum())") == 10 * (i + t)
            assert kernel.pull(name).tolist() == [i + t] * 10
            assert kernel.call(lambda n: n * 2, i) == 2 * i
        kernel.delete(name)
        return t

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(worker, range(6), timeout=100)) == list(range(6))


def test_submit_from_many_threads(kernel):
    def worker(t: int):
        futures = [kernel.submit(tagged, t, i, [i]) for i in range(25)]
        return [f.result(timeout=60) for f in futures]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for t, results in enumerate(pool.map(worker, range(4))):
            assert [r[:3] for r in results] == [(t, i, i) for i in range(25)]


def test_big_and_small_calls_interleaved(kernel):
    """A chunked transfer in flight must not mix its chunks with other calls' replies."""
    big = np.arange(4_000_000, dtype=np.float64)  # 32 MB: chunked both ways

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        big_future = pool.submit(kernel.call, lambda a: a[::-1].copy(), big)
        small = [pool.submit(kernel.call, lambda i: -i, i) for i in range(50)]
        assert [f.result(timeout=100) for f in small] == [-i for i in range(50)]
        back = big_future.result(timeout=100)
    assert np.array_equal(back, big[::-1])


# ---------------------------------------------------------------------- event loops


def test_blocking_api_inside_running_event_loop(kernel):
    """The blocking API works from code that runs inside an event loop (as in a notebook)."""

    async def main():
        assert asyncio.get_running_loop().is_running()
        kernel.push(from_loop=41)
        value = kernel.call(lambda: __import__("__main__").from_loop + 1)
        future = kernel.submit(lambda: "submitted")
        wrapped = await asyncio.wrap_future(future)
        kernel.delete("from_loop")
        return value, wrapped

    assert asyncio.run(main()) == (42, "submitted")


def test_async_kernel_gather(transport):
    async def main():
        ak = await kernelproxy.start_async(transport=transport)
        assert isinstance(ak, kernelproxy.AsyncKernel)
        async with ak:
            pid = await ak.call(os.getpid)
            assert pid == ak.info.pid
            results = await asyncio.gather(*(ak.call(tagged, 0, i, [i, i]) for i in range(200)))
            assert results == [(0, i, 2 * i, pid) for i in range(200)]

            await ak.push(async_value=np.arange(5), other=2)
            assert (await ak.pull("other")) == 2
            assert (await ak.pull("async_value")).tolist() == [0, 1, 2, 3, 4]
            assert await ak.contains("other")
            await ak.delete("other")
            assert not await ak.contains("other")
            await ak.exec("async_exec = 3")
            assert await ak.eval("async_exec * 2") == 6

            task = ak.submit(lambda: "task")
            assert isinstance(task, asyncio.Task)
            assert await task == "task"

            @ak.remote
            def remote_double(x):
                return 2 * x

            assert asyncio.iscoroutinefunction(remote_double)
            assert await remote_double(21) == 42

            with pytest.raises(ZeroDivisionError):
                await ak.call(lambda: 1 / 0)
            with pytest.raises(kernelproxy.CallTimeout):
                await ak.options(timeout=0.5).call(time.sleep, 5)
            assert await ak.is_alive()
        assert not await ak.is_alive()
        with pytest.raises(kernelproxy.KernelClosedError):
            await ak.call(lambda: 1)
        return pid

    pid = asyncio.run(main())
    assert wait_pid_gone(pid, 10)


def test_async_kernel_cancelled_task_leaves_kernel_usable(transport):
    async def main():
        async with await kernelproxy.start_async(transport=transport) as ak:
            task = asyncio.ensure_future(ak.call(time.sleep, 30))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.monotonic()
            assert await asyncio.wait_for(ak.call(lambda: "after cancel"), 10) == "after cancel"
            return time.monotonic() - started

    assert asyncio.run(main()) < 10


@pytest.mark.local_kernel("connects by connection file")
def test_connect_async(kernel):
    async def main():
        ak = await kernelproxy.connect_async(kernel.info.connection_file)
        try:
            return await asyncio.gather(ak.call(os.getpid), ak.eval("1 + 2"))
        finally:
            await ak.close()

    assert asyncio.run(main()) == [kernel.info.pid, 3]
    assert kernel.is_alive()


def test_aio_is_the_async_core(kernel):
    assert isinstance(kernel.aio, kernelproxy.AsyncKernel)
    assert kernel.aio.info is kernel.info


# ---------------------------------------------------------------------- output


def test_stdout_and_stderr_forwarded(kernel, capsys):
    def talk():
        print("hello from the kernel stdout")
        print("hello from the kernel stderr", file=sys.stderr)
        return "done"

    assert kernel.call(talk) == "done"
    captured = capsys.readouterr()
    assert "hello from the kernel stdout" in captured.out
    assert "hello from the kernel stderr" in captured.err
    assert "stderr" not in captured.out
    assert "hello from the kernel stdout" not in captured.err


def test_output_of_exec_and_eval_forwarded(kernel, capsys):
    kernel.exec("print('exec says hi')")
    kernel.eval("print('eval says hi')")
    assert capsys.readouterr().out.count("says hi") == 2


def test_output_complete_when_call_returns(kernel, capsys):
    """Output printed just before returning is already here when call() returns."""
    lines = kernel.call(lambda n: [print(f"line {i}") for i in range(n)] and n, 500)
    assert lines == 500
    out = capsys.readouterr().out
    assert out.count("line ") == 500
    assert "line 499" in out


def test_output_forwarded_live(kernel, capfd):
    """Output arrives while the call is still running, not only at its end."""

    def slow_talker():
        print("early output", flush=True)
        time.sleep(4)
        print("late output", flush=True)
        return "finished"

    future = kernel.submit(slow_talker)
    seen = ""
    deadline = time.monotonic() + 3.5
    while "early output" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += capfd.readouterr().out
    assert "early output" in seen
    assert not future.done(), "output arrived only once the call had finished"
    assert "late output" not in seen
    assert future.result(timeout=30) == "finished"
    assert "late output" in capfd.readouterr().out


def test_output_discard(kernel, capsys):
    quiet = kernel.options(output="discard")
    assert quiet.call(lambda: print("should not appear") or 5) == 5
    quiet.exec("import sys as _s\n_s.stderr.write('nor this\\n')\ndel _s")
    captured = capsys.readouterr()
    assert "should not appear" not in captured.out
    assert "nor this" not in captured.err
    # the original view still forwards
    kernel.call(print, "loud again")
    assert "loud again" in capsys.readouterr().out


def test_output_discard_from_start(transport, capsys):
    with kernelproxy.start(transport=transport, output="discard") as k:
        k.call(print, "silent start")
        assert "silent start" not in capsys.readouterr().out
        k.options(output="forward").call(print, "forwarded now")
        assert "forwarded now" in capsys.readouterr().out


class Rich:
    """Displays as HTML where a frontend can, as text elsewhere."""

    def _repr_html_(self):
        return "<b>rich</b>"

    def __repr__(self):
        return "Rich as text"


def show_rich():
    from IPython.display import display

    display(Rich())
    return "shown"


def test_output_discard_drops_displays(kernel, capsys):
    assert kernel.options(output="discard").call(show_rich) == "shown"
    assert capsys.readouterr() == ("", "")
    assert kernel.call(show_rich) == "shown"
    assert capsys.readouterr().out == "Rich as text\n"  # plain Python: the display's text/plain


DISPLAYING_SCRIPT = """
import kernelproxy

class Rich:
    def _repr_html_(self):
        return "<b>rich</b>"

    def __repr__(self):
        return "Rich as text"

def show(obj):
    from IPython.display import display
    display(obj)

def progress():
    from IPython.display import clear_output, display
    handle = display("first", display_id=True)
    handle.update("second")
    clear_output()

with kernelproxy.start() as k:
    k.call(show, Rich())
    k.call(show, "only text")
    k.call(show, Rich())
    k.call(progress)
    print("done")
"""


def test_displays_in_a_plain_script(tmp_path):
    """Without IPython the text/plain of each display is shown, and one notice says what was left out."""
    script = tmp_path / "displaying.py"
    script.write_text(DISPLAYING_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Rich as text\n'only text'\nRich as text\n'first'\n'second'\ndone\n"
    assert proc.stderr.count("kernelproxy: a remote call displayed rich output (text/html)") == 1, proc.stderr
    assert "Jupyter or IPython" in proc.stderr


def test_concurrent_output_goes_to_host(kernel, capsys):
    def worker(t):
        return kernel.call(lambda t: print(f"thread-{t}-says") or t, t)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(worker, range(8))) == list(range(8))
    out = capsys.readouterr().out
    for t in range(8):
        assert f"thread-{t}-says" in out
