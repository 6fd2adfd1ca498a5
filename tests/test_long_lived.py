"""Long-lived hosts: an IO thread nothing can end, replies never lost, any event loop, deep values (issue 12).

Each test here failed before the fix it names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import cloudpickle
import psutil
import pytest
from helpers import pid_running

import kernelproxy
from kernelproxy import SerializationError
from kernelproxy._portal import get_portal

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ExitsWhenUnpickled:
    """Unpickles as ``sys.exit(1)`` (or another BaseException), as a hostile or careless reply could."""

    def __init__(self, kind: str = "exit") -> None:
        self.kind = kind

    def __reduce__(self):
        if self.kind == "exit":
            return (sys.exit, (1,))
        return (_raise_base, (self.kind,))


def _raise_base(kind: str) -> None:
    raise {"interrupt": KeyboardInterrupt, "generator": GeneratorExit}[kind]()


def make_exiting(kind: str) -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled(kind)


@pytest.mark.parametrize("kind", ["exit", "interrupt", "generator"])
def test_a_result_that_raises_base_exceptions_when_unpickled_is_a_serialization_error(kernel, kind):
    """Before: SystemExit ended the IO thread's loop; this call and every later one hung."""
    with pytest.raises(SerializationError, match="could not unpickle the result") as caught:
        kernel.options(timeout=30).call(make_exiting, kind)
    assert isinstance(caught.value.__cause__, BaseException)
    assert not isinstance(caught.value.__cause__, Exception)
    assert kernel.options(timeout=30).call(pow, 2, 5) == 32  # the IO thread goes on
    assert kernel.submit(pow, 3, 2).result(timeout=30) == 9


def test_nothing_escaping_a_callback_ends_the_io_thread(kernel, caplog):
    """A SystemExit or KeyboardInterrupt escaping any IO-thread callback is logged; every kernel goes on."""
    portal = get_portal()

    def exits() -> None:
        raise SystemExit(3)

    def interrupts() -> None:
        raise KeyboardInterrupt

    with caplog.at_level(logging.ERROR, logger="kernelproxy"):
        portal.loop.call_soon_threadsafe(exits)
        portal.loop.call_soon_threadsafe(interrupts)
        time.sleep(0.2)
    assert kernel.options(timeout=30).call(pow, 2, 3) == 8
    assert "would have ended it" in caplog.text


def test_a_done_callback_that_exits_does_not_end_the_io_thread(kernel):
    with kernelproxy.KernelPool([kernel]) as pool:
        future = pool.submit(time.sleep, 1)
        future.add_done_callback(lambda _: sys.exit(2))  # runs on the IO thread, when the task ends
        assert future.result(timeout=30) is None
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8
    assert kernel.options(timeout=30).call(pow, 2, 4) == 16


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ten_thousand_concurrent_submits_on_one_kernel_all_return(kernel, request):
    """Before: over execute (and comm replies past IOPub's high-water mark) the kernel or its replies got stuck."""
    count = 10_000
    started = time.monotonic()
    futures = [kernel.submit(pow, i, 2) for i in range(count)]
    done, not_done = concurrent.futures.wait(futures, timeout=330)
    elapsed = time.monotonic() - started
    transport = request.node.callspec.id
    assert not not_done, f"{len(not_done)} of {count} submits never returned ({transport})"
    assert [f.result() for f in futures] == [i * i for i in range(count)]
    sys.stderr.write(f"\n{count} concurrent submits over {transport}: {elapsed:.1f} s ({count / elapsed:.0f}/s)\n")


def test_async_kernel_of_the_io_thread_works_from_another_event_loop(kernel):
    """Before: ``await k.aio.call(...)`` from the caller's own loop hung for ever."""

    async def main() -> tuple[int, bool, int]:
        value = await asyncio.wait_for(kernel.aio.call(pow, 2, 10), 30)
        alive = await asyncio.wait_for(kernel.aio.is_alive(), 30)
        task = kernel.aio.submit(pow, 3, 3)
        return value, alive, await asyncio.wait_for(task, 30)

    assert asyncio.run(main()) == (1024, True, 27)


def test_async_kernel_of_a_stopped_loop_says_so_at_once():
    loop = asyncio.new_event_loop()
    ak = loop.run_until_complete(kernelproxy.start_async())
    try:  # its loop is not running now

        async def use() -> None:
            await asyncio.wait_for(ak.call(pow, 2, 2), 10)

        with pytest.raises(RuntimeError, match="event loop that is no longer running"):
            asyncio.run(use())
    finally:
        loop.run_until_complete(ak.shutdown())
        loop.close()


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_an_argument_nested_too_deeply_is_a_serialization_error_naming_it(kernel):
    """Before: a raw RecursionError from the search for the unpicklable part."""
    with pytest.raises(SerializationError, match=r"args\[1\].*nested too deeply"):
        kernel.call(len, [], nested(20_000))
    with pytest.raises(SerializationError, match=r"send deep to the kernel: it is nested too deeply"):
        kernel.push(deep=nested(20_000))
    assert kernel.call(len, nested(10)) == 1


# ---------------------------------------------------------------------- nothing leaks, nothing is left behind


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_dropped_kernels_warn_and_are_shut_down_releasing_everything():
    """Before: each dropped Kernel kept its kernel process and ~16 host descriptors until exit."""
    host = psutil.Process()
    kernelproxy.start().close()  # the process-wide IO thread and zmq context exist from here on
    fds, threads = host.num_fds(), threading.active_count()
    pids = []
    for _ in range(5):
        k = kernelproxy.start()
        pids.append(k.info.pid)
        view = k.options(timeout=30)
        assert view.call(pow, 2, 2) == 4
        del k
        gc.collect()  # a view still holds the kernel: nothing happens
        assert pid_running(pids[-1])
        with pytest.warns(ResourceWarning, match="unclosed kernel kernelproxy started"):
            del view
            gc.collect()
    assert _wait(lambda: not any(pid_running(pid) for pid in pids)), "dropped kernels still run"
    assert _wait(lambda: host.num_fds() <= fds), f"descriptors: {host.num_fds()} now, {fds} before"
    assert threading.active_count() <= threads


def test_a_dropped_connection_disconnects_and_leaves_the_kernel_running(external_kernel):
    host = psutil.Process()
    kernelproxy.connect(external_kernel.connection_file).close()
    fds = host.num_fds()
    k = kernelproxy.connect(external_kernel.connection_file)
    assert k.call(pow, 2, 3) == 8
    with pytest.warns(ResourceWarning, match="unclosed connection to a kernel"):
        del k
        gc.collect()
    assert _wait(lambda: host.num_fds() <= fds)
    assert pid_running(external_kernel.process.pid)
    with kernelproxy.connect(external_kernel.connection_file) as again:
        assert again.call(pow, 2, 4) == 16


def test_a_dropped_pool_warns_finishes_its_tasks_and_stops_its_kernels():
    pool = kernelproxy.KernelPool(2)
    pids = [k.info.pid for k in pool.kernels]
    future = pool.submit(time.sleep, 1)
    with pytest.warns(ResourceWarning, match="unclosed KernelPool"):
        del pool
        gc.collect()
    assert future.result(timeout=30) is None  # as ProcessPoolExecutor: submitted tasks still run
    assert _wait(lambda: not any(pid_running(pid) for pid in pids)), "a dropped pool's kernels still run"


HOST = """
import os, sys, kernelproxy
k = kernelproxy.start()
print(k.info.pid, os.path.dirname(k.info.connection_file), flush=True)
if sys.argv[1] == "exit":
    os._exit(0)
sys.stdin.read()
"""


def _host(tmp_path, how: str) -> tuple[subprocess.Popen[str], int, str]:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(script), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    pid, directory = proc.stdout.readline().split()
    assert os.path.isdir(directory) and directory.startswith(str(tmp_path))
    return proc, int(pid), directory


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(30)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
def test_a_killed_host_leaves_no_kernel_and_no_files(tmp_path, how):
    """Before: the kernel exited, but its private directory (key, sockets) stayed in the temp directory."""
    proc, kernel_pid, directory = _host(tmp_path, how)
    if how != "exit":
        proc.send_signal(getattr(signal, how))
    proc.wait(30)
    _reap(proc)
    assert _wait(lambda: not pid_running(kernel_pid)), "the kernel outlived its host"
    assert _wait(lambda: not os.path.exists(directory)), f"left behind: {os.listdir(directory)}"
    assert not list(tmp_path.glob("kernelproxy-*"))


def test_a_host_killed_with_its_kernel_is_swept_by_the_next_start(tmp_path):
    from kernelproxy._launch import sweep_stale_dirs

    dead, dead_kernel, dead_dir = _host(tmp_path, "wait")
    alive, _, alive_dir = _host(tmp_path, "wait")
    try:
        os.kill(dead_kernel, signal.SIGKILL)  # both die at once (OOM killer, a process group, a container)
        _reap(dead)
        assert os.path.isdir(dead_dir)
        assert sweep_stale_dirs(str(tmp_path)) == [dead_dir]
        assert not os.path.exists(dead_dir)
        assert os.path.isdir(alive_dir), "a live host's directory was swept"
    finally:
        _reap(alive)


FORK = """
import multiprocessing, os, sys, kernelproxy
k = kernelproxy.start()
directory = os.path.dirname(k.info.connection_file)

def use(_):
    try:
        k.call(pow, 2, 2)
        return "worked"
    except kernelproxy.KernelClosedError as exc:
        return "refused" if "forked child" in str(exc) else repr(exc)

if sys.argv[1] == "fork":
    child = os.fork()
    if child == 0:
        print("child", use(0), flush=True)
        with kernelproxy.start() as own:
            print("child own kernel", own.call(pow, 2, 3), flush=True)
        k.close()  # does nothing in a child: the kernel is the parent's
        sys.exit(0)  # a normal exit: atexit hooks run in the child
    os.waitpid(child, 0)
else:
    with multiprocessing.get_context("fork").Pool(2) as workers:
        print("workers", sorted(set(workers.map(use, range(4)))), flush=True)
print("parent dir kept", os.path.isdir(directory), flush=True)
print("parent call", k.call(pow, 2, 5), flush=True)
k.restart()
print("parent restarted", k.call(pow, 2, 6), flush=True)
k.close()
print("parent closed", not os.path.exists(directory), flush=True)
"""


@pytest.mark.parametrize("how", ["fork", "pool"])
def test_a_forked_child_gets_a_clear_error_and_never_touches_the_parents_kernel(tmp_path, how):
    """Before: the child hung; a child that exited normally deleted the parent's files, breaking restart/close."""
    script = tmp_path / "fork.py"
    script.write_text(FORK)
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=100)
    lines = proc.stdout.splitlines()
    if how == "fork":
        assert "child refused" in lines and "child own kernel 8" in lines, proc.stdout + proc.stderr
    else:
        assert "workers ['refused']" in lines, proc.stdout + proc.stderr
    for expected in ["parent dir kept True", "parent call 32", "parent restarted 64", "parent closed True"]:
        assert expected in lines, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------- security statements


def test_plain_http_to_another_machine_warns_once_naming_the_risk():
    """Before: token and pickles went in clear without a word."""
    with pytest.warns(UserWarning, match=r"plain http to another machine.*inject a reply.*https://"):
        with pytest.raises(kernelproxy.ServerUnreachableError):
            kernelproxy.connect_server("http://192.0.2.1:9/", token="t", connect_timeout=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per host
        with pytest.raises(kernelproxy.ServerUnreachableError):
            kernelproxy.connect_server("http://192.0.2.1:9/", token="t", connect_timeout=0.3)
        for loopback in ("http://127.0.0.1:9/", "http://localhost:9/", "http://[::1]:9/"):  # no warning
            with pytest.raises(kernelproxy.ServerUnreachableError):
                kernelproxy.connect_server(loopback, token="t", connect_timeout=0.3)
