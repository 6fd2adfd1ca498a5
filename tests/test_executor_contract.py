"""KernelPool keeps the concurrent.futures.Executor contract (issue 12).

Cases follow CPython's own executor tests (Lib/test/test_concurrent_futures:
executor.py, test_init.py, test_process_pool.py) run against ``KernelPool(2)``,
where a kernel can do what a worker process does. Each test here failed before.
"""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool

import cloudpickle
import pytest

import kernelproxy
from kernelproxy import BrokenKernelPool, CallInterrupted, KernelPool, RemoteError, SerializationError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

INITIALIZER_STATUS = "uninitialized"


def init(status: str) -> None:
    import __main__

    __main__.INITIALIZER_STATUS = status


def get_init_status() -> str:
    import __main__

    return getattr(__main__, "INITIALIZER_STATUS", "uninitialized")


def init_fail() -> None:
    raise ValueError("error in initializer")


class MyObject:
    def my_method(self) -> None:
        pass


def make_dummy_object(_) -> MyObject:
    return MyObject()


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt("my own")


def pid_and_init() -> tuple[int, str]:
    return os.getpid(), get_init_status()


@pytest.fixture(scope="module")
def pool() -> Iterator[KernelPool]:
    with KernelPool(2, initializer=init, initargs=("initialized",)) as pool:
        yield pool


# ---------------------------------------------------------------------- initializer, max_tasks_per_child


def test_initializer_runs_in_every_kernel(pool):
    """CPython's InitializerMixin.test_initializer. Before: accepted and never run."""
    futures = [pool.submit(get_init_status) for _ in range(8)]
    assert [f.result(timeout=30) for f in futures] == ["initialized"] * 8
    assert {k.eval("INITIALIZER_STATUS") for k in pool.kernels} == {"initialized"}


def test_initializer_runs_in_replacement_kernels(tmp_path):
    with KernelPool(1, initializer=init, initargs=("replaced",)) as pool:
        first = pool.submit(pid_and_init).result(timeout=30)
        pool.kernels[0].aio._state.control.kill_now()  # the kernel dies; the pool replaces it
        deadline = time.monotonic() + 60
        while True:
            try:
                second = pool.submit(pid_and_init).result(timeout=60)
                break
            except kernelproxy.KernelDiedError:
                assert time.monotonic() < deadline
        assert first[1] == second[1] == "replaced" and first[0] != second[0]


def test_a_failing_initializer_breaks_the_pool():
    """CPython's FailingInitializerMixin: BrokenProcessPool (here at once: kernels start eagerly)."""
    with pytest.raises(BrokenExecutor, match="initializer init_fail failed") as caught:
        KernelPool(2, initializer=init_fail)
    assert isinstance(caught.value, BrokenProcessPool) and isinstance(caught.value, BrokenKernelPool)
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_server_pool_runs_the_initializer_in_its_first_kernels_and_in_those_that_join(jupyter_server):
    """A server pool starts working with its first ready kernel; that one, too, runs the initializer."""
    pool = KernelPool.from_server(
        jupyter_server.url, 2, token=jupyter_server.token, initializer=init, initargs=("on server",)
    )
    with pool:
        assert pool.submit(get_init_status).result(timeout=60) == "on server"
        deadline = time.monotonic() + 120
        while len(pool.kernels) < 2:  # the other one joins when it is ready
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert {k.eval("INITIALIZER_STATUS") for k in pool.kernels} == {"on server"}
    with pytest.raises(BrokenKernelPool, match="initializer init_fail failed"):
        KernelPool.from_server(jupyter_server.url, 2, token=jupyter_server.token, initializer=init_fail)


def test_max_tasks_per_child_gives_a_fresh_kernel_after_n_tasks():
    """CPython's ProcessPoolExecutorTest.test_max_tasks_per_child. Before: accepted and ignored."""
    with KernelPool(1, max_tasks_per_child=3, initializer=init, initargs=("fresh",)) as pool:
        pids = [pool.submit(pid_and_init).result(timeout=60) for _ in range(7)]
    assert len({pid for pid, _ in pids[:3]}) == 1
    assert len({pid for pid, _ in pids[3:6]}) == 1
    assert pids[0][0] != pids[3][0] != pids[6][0]
    assert {status for _, status in pids} == {"fresh"}


def test_max_tasks_per_child_with_map_and_prefetch():
    with KernelPool(2, max_tasks_per_child=2) as pool:
        assert list(pool.map(abs, range(-20, 0))) == list(range(20, 0, -1))


# ---------------------------------------------------------------------- keywords


def test_meaningless_executor_keywords_are_refused_saying_why():
    with pytest.raises(TypeError, match="mp_context.*not processes forked or spawned"):
        KernelPool(2, mp_context=object())
    with pytest.raises(TypeError, match="thread_name_prefix: its workers are kernels"):
        KernelPool(2, thread_name_prefix="w")
    with pytest.raises(TypeError, match="'max_worker'.*AsyncKernelManager"):  # a typo: not silently ignored
        KernelPool(2, max_worker=3)
    with pytest.raises(TypeError, match="'no_such_option'"):
        kernelproxy.start(no_such_option=1)
    with pytest.raises(TypeError, match="once"):
        KernelPool(2, max_workers=2)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        KernelPool(["kernel-1.json"], max_tasks_per_child=2)
    with pytest.raises(ValueError, match=">= 1"):
        KernelPool(1, max_tasks_per_child=0)
    with pytest.raises(TypeError, match="callable"):
        KernelPool(1, initializer="init")


def test_max_workers_is_the_number_of_kernels_and_manager_options_still_work():
    with KernelPool(max_workers=2, mp_context=None, shutdown_wait_time=2.0) as pool:
        assert len(pool.kernels) == 2
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8


# ---------------------------------------------------------------------- map, errors


def test_map_does_not_keep_the_results_alive(pool):
    """CPython's ExecutorTest.test_free_reference (bpo-14406). Before: the previous result stayed alive."""
    for obj in pool.map(make_dummy_object, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None
    for obj in pool.map(make_dummy_object, range(10), chunksize=3):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_unpicklable_arguments_raise_pickling_error(pool):
    """Code written for ProcessPoolExecutor catches PicklingError; before it caught nothing."""
    with pytest.raises(pickle.PicklingError):
        pool.submit(len, [threading.Lock()]).result(timeout=30)
    with pytest.raises(pickle.PicklingError):
        list(pool.map(len, [[threading.Lock()]]))


def test_a_missing_module_in_the_kernel_is_the_cause(pool, tmp_path, monkeypatch):
    module_name = "kp_only_here_5d1e"
    (tmp_path / f"{module_name}.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(module_name)
    try:
        with pytest.raises(SerializationError) as caught:
            pool.submit(module.twice, 2).result(timeout=30)
        assert isinstance(caught.value, pickle.UnpicklingError)
        assert isinstance(caught.value.__cause__, ModuleNotFoundError), repr(caught.value.__cause__)
        assert module_name in str(caught.value.__cause__)
    finally:
        sys.modules.pop(module_name, None)


def test_a_task_that_raises_keyboard_interrupt_itself_is_not_call_interrupted(pool):
    """Before: reported as CallInterrupted, as if kernelproxy had interrupted it."""
    with pytest.raises(RemoteError, match="KeyboardInterrupt: my own") as caught:
        pool.submit(raise_keyboard_interrupt).result(timeout=30)
    assert not isinstance(caught.value, CallInterrupted)
    assert pool.submit(pow, 2, 2).result(timeout=30) == 4


def test_a_kernel_call_that_raises_keyboard_interrupt_itself_is_not_call_interrupted(kernel):
    with pytest.raises(RemoteError, match="KeyboardInterrupt: my own"):
        kernel.call(raise_keyboard_interrupt)
    future = kernel.submit(time.sleep, 30)
    time.sleep(1)
    kernel.interrupt()
    with pytest.raises(CallInterrupted):  # a real interrupt still is one
        future.result(timeout=30)


def test_a_pool_without_kernels_is_a_broken_process_pool(external_kernel):
    kernelproxy.connect(external_kernel.connection_file, startup_timeout=30).close()
    with KernelPool([external_kernel.connection_file], startup_timeout=2) as pool:
        external_kernel.process.kill()
        external_kernel.process.wait(10)
        deadline = time.monotonic() + 60
        while True:
            try:
                pool.submit(pow, 1, 1).result(timeout=30)
            except BrokenProcessPool as exc:
                assert isinstance(exc, BrokenKernelPool)
                break
            except kernelproxy.KernelDiedError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(BrokenExecutor):
            pool.submit(pow, 1, 1)


# ---------------------------------------------------------------------- interpreter exit

EXIT = """
import atexit, sys, time, kernelproxy
pool = kernelproxy.KernelPool(1)

def late():
    try:
        pool.submit(pow, 2, 2)
        print("atexit submit accepted", flush=True)
    except RuntimeError as exc:
        print("atexit submit refused:", exc, flush=True)

atexit.register(late)
futures = [pool.submit(time.sleep, 0.5) for _ in range(3)]
futures[-1].add_done_callback(lambda f: print("last task done", f.result(), flush=True))
print("exiting", flush=True)
"""


def test_at_exit_pending_tasks_finish_and_later_submits_are_refused(tmp_path):
    """As ProcessPoolExecutor. Before: pending tasks were dropped without a word; atexit submit accepted."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert lines[0] == "exiting"
    assert "last task done None" in lines, proc.stdout + proc.stderr
    assert "atexit submit refused: cannot schedule new futures after interpreter shutdown" in lines, proc.stdout
    assert proc.returncode == 0, proc.stderr
