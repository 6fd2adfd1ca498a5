"""auto_restart, and what a timeout does when the kernel ignores its interrupt."""

from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import pytest
from helpers import new_kernel

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sleep_ignoring_sigint(seconds):
    """Like code stuck in C: SIGINT does not interrupt it."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(seconds)


@pytest.fixture
def kernel(kernel_path, request):
    kernel = new_kernel(kernel_path, request)
    yield kernel
    kernel.shutdown()


def test_auto_restart_gives_the_next_call_a_fresh_kernel_with_a_warning(transport):
    with kernelproxy.start(transport=transport, auto_restart=True) as kernel:
        kernel["kept"] = 1
        old_pid = kernel.info.pid
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while kernel.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.warns(kernelproxy.KernelRestartedWarning, match="auto_restart started a fresh one"):
            assert kernel.call(int, "5") == 5
        assert kernel.info.pid != old_pid
        assert "kept" not in kernel  # a fresh namespace, as the warning says


def test_the_call_in_flight_still_raises_kernel_died_with_auto_restart(transport):
    with kernelproxy.start(transport=transport, auto_restart=True) as kernel:
        pid = kernel.info.pid
        future = kernel.submit(time.sleep, 30)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(kernelproxy.KernelDiedError):
            future.result(timeout=10)
        with pytest.warns(kernelproxy.KernelRestartedWarning):
            assert kernel.call(int, "6") == 6


def test_timeout_on_a_kernel_that_ignores_the_interrupt_says_so_promptly(kernel):
    started = time.monotonic()
    with pytest.raises(kernelproxy.CallTimeout, match="ignored the interrupt") as info:
        kernel.options(timeout=1).call(sleep_ignoring_sigint, 8)
    assert time.monotonic() - started < 5  # the timeout plus a short grace for the interrupt
    assert "restart()" in str(info.value)
    queued = time.monotonic()
    with pytest.raises(kernelproxy.CallTimeout, match="still queued behind other work"):
        kernel.options(timeout=1).call(int, "1")
    assert time.monotonic() - queued < 4
    kernel.restart()
    assert kernel.call(int, "2") == 2


def test_on_timeout_restart_restarts_a_kernel_that_ignores_the_interrupt(kernel):
    kernel["kept"] = 1
    started = time.monotonic()
    with pytest.raises(kernelproxy.CallTimeout, match="restarted") as info:
        kernel.options(timeout=1, on_timeout="restart").call(sleep_ignoring_sigint, 60)
    assert "namespace is empty" in str(info.value)
    assert time.monotonic() - started < 30
    assert kernel.call(int, "3") == 3
    assert "kept" not in kernel


def test_on_timeout_restart_leaves_an_interruptible_kernel_alone(kernel):
    kernel["kept"] = 1
    with pytest.raises(kernelproxy.CallTimeout, match="interrupted and the kernel is usable"):
        kernel.options(timeout=1, on_timeout="restart").call(time.sleep, 30)
    assert kernel["kept"] == 1


def test_bad_on_timeout_is_refused():
    with pytest.raises(ValueError, match="on_timeout"):
        kernelproxy.CallOptions(on_timeout="explode")  # type: ignore[arg-type]


def test_concurrent_timeouts_each_report_their_own_fate(kernel):
    """A runs and ignores SIGINT, B waits behind it: each is told what happened to it, not to the other."""
    call_a = kernel.options(timeout=1).submit(sleep_ignoring_sigint, 6)
    time.sleep(0.3)  # A is running
    call_b = kernel.options(timeout=2.5).submit(int, "7")
    with pytest.raises(kernelproxy.CallTimeout) as a_info:
        call_a.result(timeout=20)
    with pytest.raises(kernelproxy.CallTimeout) as b_info:
        call_b.result(timeout=20)
    assert "ignored the interrupt" in str(a_info.value)
    assert "queued behind other work" not in str(a_info.value)
    assert "queued behind other work" in str(b_info.value)
    assert "ignored the interrupt" not in str(b_info.value)
    kernel.restart()


def test_on_timeout_restart_follows_the_call_that_ignored_the_interrupt(kernel):
    """Only the call that ignored the interrupt restarts the kernel; a queued call behind it does not."""
    kernel["kept"] = 1
    call_a = kernel.options(timeout=1).submit(sleep_ignoring_sigint, 6)  # on_timeout="interrupt"
    time.sleep(0.3)
    call_b = kernel.options(timeout=2.5, on_timeout="restart").submit(int, "7")
    with pytest.raises(kernelproxy.CallTimeout, match="ignored the interrupt"):
        call_a.result(timeout=20)
    with pytest.raises(kernelproxy.CallTimeout, match="queued behind other work") as b_info:
        call_b.result(timeout=20)
    assert "restarted" not in str(b_info.value)
    time.sleep(4)  # A's sleep ends; B then starts and is interrupted, the kernel keeps its namespace
    assert kernel["kept"] == 1


def test_tiny_timeout_on_an_idle_kernel_does_not_claim_other_work(kernel):
    for _ in range(20):
        assert kernel.call(int, "8") == 8  # the kernel is idle: this call ran after everything before it
        try:
            kernel.options(timeout=0.001).call(time.sleep, 0.2)
        except kernelproxy.CallTimeout as exc:
            assert "queued behind other work" not in str(exc), str(exc)
