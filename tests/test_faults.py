"""Faults with real kernels: death during a large transfer, death while idle, a frozen process, a kernel that
ignores SIGINT, two host processes sharing one kernel, and a KeyboardInterrupt raised by a host thread.

Every scenario is repeated (REPS times, or REPS iterations inside one subprocess) to catch flakiness, and
prints the delays it measured (``pytest -s`` shows them) in lines starting with ``FAULT-TIMING``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import cloudpickle
import numpy as np
import psutil
import pytest
from helpers import wait_for_file, wait_pid_gone

import kernelproxy
from kernelproxy import CallTimeout, KernelDiedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPS = 3
MB = 1024 * 1024
BIG_BYTES = 400 * MB
AGENT_MODULE = "_kernelproxy_agent_v1"

# Extra delay after the kernel's memory shows the transfer arriving, per repetition: the kill lands at
# different points of the transfer. The comm push takes ~0.7 s here, the execute push ~4 s (chunked base64).
KILL_DELAYS = {"comm": (0.0, 0.03, 0.06), "execute": (0.0, 0.4, 0.8), "server": (0.0, 0.03, 0.06)}
# Over the lane the host copies the array into shared memory before the kernel maps it (its memory does not
# grow during the transfer): the kill comes this long after the push started.
LANE_KILL_DELAYS = (0.0, 0.03, 0.08)


def report(scenario: str, **measured: float | str) -> None:
    fields = " ".join(
        f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in measured.items()
    )
    print(f"\nFAULT-TIMING {scenario} {fields}")


def sleep_after_marker(marker: str, seconds: float) -> str:
    """Announce that the call is running (by creating ``marker``), then sleep."""
    with open(marker, "w") as file:
        file.write("running")
    time.sleep(seconds)
    return "slept"


def ignore_sigint_and_sleep(marker: str, seconds: float) -> str:
    """Hang in C code (time.sleep) with SIGINT ignored, as a stuck native extension would."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(marker, "w") as file:
        file.write("running")
    time.sleep(seconds)
    return "slept through the interrupt"


def assert_later_calls_fail_fast(k: kernelproxy.Kernel) -> float:
    """Every verb raises KernelDiedError at once; return the slowest of them (seconds)."""
    slowest = 0.0
    for action in (
        lambda: k.call(lambda: 1),
        lambda: k.push(small=1),
        lambda: k.pull("small"),
        lambda: k.eval("1"),
        lambda: k.call_ref(list),
    ):
        started = time.monotonic()
        with pytest.raises(KernelDiedError):
            action()
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5, f"a call on a dead kernel took {slowest:.2f} s to fail"
    assert k.is_alive() is False
    return slowest


def kill_now(pid: int) -> None:
    """SIGKILL (and SIGCONT, in case it is stopped) ``pid`` if it still exists."""
    for sig in (signal.SIGKILL, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def assert_recovered(k: kernelproxy.Kernel, old_pid: int) -> None:
    """After restart(): a new process with the agent installed, and both small and large values travel."""
    assert k.is_alive() is True
    assert k.info.pid != old_pid
    assert k.call(os.getpid) == k.info.pid
    assert k.eval(f"{AGENT_MODULE!r} in __import__('sys').modules") is True
    array = np.arange(MB // 8, dtype=np.float64)  # 1 MB: out-of-band frames (chunked on execute)
    k.push(array=array)
    np.testing.assert_array_equal(k.pull("array"), array)


# ---------------------------------------------------------------------- SIGKILL during a 400 MB push


@pytest.fixture(scope="module")
def big_array() -> np.ndarray:
    return np.ones(BIG_BYTES // 8, dtype=np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("rep", range(REPS))
def test_sigkill_during_large_push_raises_kernel_died_quickly(fresh_kernel, transport, big_array, rep):
    k = fresh_kernel
    pid = k.info.pid
    kernel_process = psutil.Process(pid)
    baseline = kernel_process.memory_info().rss
    finished_at: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        push = pool.submit(k.push, big=big_array)
        push.add_done_callback(lambda _: finished_at.append(time.monotonic()))
        deadline = time.monotonic() + 60
        # The transfer is under way once the kernel's memory grows by 100 MB (zmq receiving the comm
        # message, or the execute transport's upload buffer allocated and being filled).
        while transport != "lane" and kernel_process.memory_info().rss < baseline + 100 * MB:
            assert not push.done(), f"the push finished before it could be killed: {push.exception()!r}"
            assert time.monotonic() < deadline, "the kernel's memory never grew: no transfer seen"
            time.sleep(0.002)
        time.sleep(LANE_KILL_DELAYS[rep] if transport == "lane" else KILL_DELAYS[transport][rep])
        assert not push.done(), "the push finished before the kill: nothing was tested"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(KernelDiedError):
            push.result(timeout=30)
    detected = finished_at[0] - killed_at
    slowest_later = assert_later_calls_fail_fast(k)
    report(f"sigkill-during-400MB-push[{transport}-{rep}]", detected_s=detected, later_call_s=slowest_later)
    assert detected < 3, f"KernelDiedError came {detected:.2f} s after the kill"


# ---------------------------------------------------------------------- SIGKILL while idle


@pytest.mark.slow
@pytest.mark.parametrize("rep", range(REPS))
def test_sigkill_while_idle_next_call_fails_fast_and_restart_recovers(fresh_kernel, transport, rep):
    k = fresh_kernel
    k.push(doomed=1)
    pid = k.info.pid
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()  # the call follows at once: it may be sent before the death is noticed
    with pytest.raises(KernelDiedError):
        k.call(lambda: 1)
    detected = time.monotonic() - killed_at
    assert detected < 3, f"the call after the kill took {detected:.2f} s to raise KernelDiedError"
    assert_later_calls_fail_fast(k)

    started = time.monotonic()
    k.restart()
    restart_s = time.monotonic() - started
    assert_recovered(k, pid)
    assert "doomed" not in k
    report(f"sigkill-idle[{transport}-{rep}]", detected_s=detected, restart_s=restart_s)


# ---------------------------------------------------------------------- a frozen kernel (SIGSTOP)
# Only the heartbeat can tell a stopped process from a busy one, and it takes ~3-4 s to decide; the
# repetitions therefore run side by side (REPS kernels frozen at once), each measured on its own.


@contextlib.contextmanager
def started_kernels(count: int, transport: str) -> Iterator[list[kernelproxy.Kernel]]:
    """``count`` kernels started concurrently; shut down (and their processes killed) whatever happens."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(kernelproxy.start, transport=transport) for _ in range(count)]
    try:
        yield [future.result() for future in futures]
    finally:
        for future in futures:
            if future.exception() is not None:
                continue
            k = future.result()
            pid = k.info.pid  # the current process, after any restart
            with contextlib.suppress(Exception):
                k.shutdown()
            kill_now(pid)
            wait_pid_gone(pid, 10)


@pytest.mark.slow
def test_sigstop_during_call_raises_kernel_died_by_heartbeat(transport, tmp_path):
    with started_kernels(REPS, transport) as kernels:
        pids = [k.info.pid for k in kernels]
        try:
            failed_at: dict[int, float] = {}
            futures = []
            for rep, k in enumerate(kernels):
                marker = tmp_path / f"running{rep}"
                future = k.submit(sleep_after_marker, str(marker), 30)
                future.add_done_callback(lambda _, rep=rep: failed_at.setdefault(rep, time.monotonic()))
                futures.append(future)
                wait_for_file(marker)
            stopped_at = {}
            for rep, pid in enumerate(pids):
                stopped_at[rep] = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
            for future in futures:
                with pytest.raises(KernelDiedError, match="heartbeat"):
                    future.result(timeout=20)  # never a hang: the sleep alone would take 30 s
            for rep, pid in enumerate(pids):
                assert psutil.Process(pid).status() == psutil.STATUS_STOPPED  # alive: only the heartbeat knew
                assert_later_calls_fail_fast(kernels[rep])

            def restart(k: kernelproxy.Kernel) -> float:
                started = time.monotonic()
                k.restart()  # must get rid of the stopped process itself
                return time.monotonic() - started

            with concurrent.futures.ThreadPoolExecutor(REPS) as pool:
                restart_times = list(pool.map(restart, kernels))
            for rep, k in enumerate(kernels):
                detected = failed_at[rep] - stopped_at[rep]
                report(f"sigstop-during-call[{transport}-{rep}]", detected_s=detected, restart_s=restart_times[rep])
                assert detected < 6, f"a frozen kernel was declared dead after {detected:.2f} s"
                assert wait_pid_gone(pids[rep], 10), "restart() left the stopped kernel process behind"
                assert_recovered(k, pids[rep])
        finally:
            for pid in pids:
                kill_now(pid)  # never leave a stopped process behind, whatever failed


# ---------------------------------------------------------------------- a kernel that ignores SIGINT


@pytest.mark.slow
def test_timeout_with_kernel_ignoring_sigint_raises_call_timeout(transport, tmp_path):
    """Repetitions side by side, one kernel each: every one stays stuck for 30 s after its CallTimeout."""
    with started_kernels(REPS, transport) as kernels:
        try:

            def timed_out_call(rep: int) -> tuple[float, BaseException | None]:
                started = time.monotonic()
                try:
                    kernels[rep].options(timeout=1).call(ignore_sigint_and_sleep, str(tmp_path / f"running{rep}"), 30)
                except BaseException as exc:  # noqa: BLE001 - checked below
                    return time.monotonic() - started, exc
                return time.monotonic() - started, None

            with concurrent.futures.ThreadPoolExecutor(REPS) as pool:
                outcomes = list(pool.map(timed_out_call, range(REPS)))
            for rep, (elapsed, error) in enumerate(outcomes):
                report(
                    f"timeout-sigint-ignored[{transport}-{rep}]",
                    call_timeout_after_s=elapsed,
                    message=repr(str(error)[:160]),
                )
                assert (tmp_path / f"running{rep}").exists(), "the call never started: no ignored interrupt tested"
                assert isinstance(error, CallTimeout) and isinstance(error, TimeoutError), repr(error)
                assert 1 <= elapsed < 7, f"CallTimeout(timeout=1) came after {elapsed:.2f} s"
        finally:
            for k in kernels:
                kill_now(k.info.pid)  # it would sleep 30 s more; shutting a dead kernel down is immediate


# ---------------------------------------------------------------------- two host processes, one kernel

HOST_SCRIPT = """
import json, os, sys, time
import kernelproxy

connection_file, transport, host_id, workdir, calls, rounds = sys.argv[1:7]
host_id, calls, rounds = int(host_id), int(calls), int(rounds)

def tagged(host, index):
    import os
    return host, index, os.getpid()

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.002)

outcomes = []
with kernelproxy.connect(connection_file, transport=transport, startup_timeout=30) as k:
    assert k.call(tagged, host_id, -1)[0] == host_id  # connected and warm
    for round_ in range(rounds):
        open(os.path.join(workdir, "ready-%d-%d" % (round_, host_id)), "w").close()
        wait_for(os.path.join(workdir, "go-%d" % round_))
        began = time.time()
        results = [k.call(tagged, host_id, index) for index in range(calls)]
        outcomes.append({"results": results, "began": began, "ended": time.time()})
    rejected = k.aio._state.connection.rejected_messages
    info_transport = k.info.transport
with open(os.path.join(workdir, "host%d.json" % host_id), "w") as file:
    json.dump({"rounds": outcomes, "rejected": rejected, "transport": info_transport}, file)
"""


@pytest.mark.local_kernel('attaches a second host by connection file')
@pytest.mark.slow
def test_two_host_processes_share_a_kernel_and_get_only_their_own_results(fresh_kernel, transport, tmp_path):
    """Two processes connect to one kernel and call it at the same time, REPS rounds of 200 calls each."""
    calls = 200
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    kernel_pid = fresh_kernel.info.pid
    hosts = {}
    try:
        for host_id in (1, 2):
            argv = [
                sys.executable,
                str(script),
                fresh_kernel.info.connection_file,
                transport,
                str(host_id),
                str(tmp_path),
                str(calls),
                str(REPS),
            ]
            hosts[host_id] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for round_ in range(REPS):
            for host_id in hosts:
                wait_for_file(tmp_path / f"ready-{round_}-{host_id}", timeout=60)
            (tmp_path / f"go-{round_}").write_text("go")  # both start calling at the same moment
        for host_id, proc in hosts.items():
            stdout, stderr = proc.communicate(timeout=90)
            assert proc.returncode == 0, f"host {host_id} failed:\n{stdout}\n{stderr}"
    finally:
        for proc in hosts.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    outcomes = {host_id: json.loads((tmp_path / f"host{host_id}.json").read_text()) for host_id in hosts}
    for host_id, outcome in outcomes.items():
        assert outcome["transport"].startswith(transport)
        assert outcome["rejected"] == 0
        expected = [[host_id, index, kernel_pid] for index in range(calls)]
        for round_ in outcome["rounds"]:
            wrong = [(got, want) for got, want in zip(round_["results"], expected) if got != want]
            assert len(round_["results"]) == calls and not wrong, f"host {host_id} got others' results: {wrong[:5]}"
    for rep, (first, second) in enumerate(zip(outcomes[1]["rounds"], outcomes[2]["rounds"])):
        overlap = min(first["ended"], second["ended"]) - max(first["began"], second["began"])
        report(
            f"two-hosts[{transport}-{rep}]",
            overlap_s=overlap,
            host1_s=first["ended"] - first["began"],
            host2_s=second["ended"] - second["began"],
        )
        assert overlap > 0, "the two hosts' calls did not run at the same time: nothing was tested"
    assert fresh_kernel.call(lambda: "still mine") == "still mine"


# ---------------------------------------------------------------------- KeyboardInterrupt from a host thread

# Runs in a subprocess, so that a KeyboardInterrupt arriving late cannot hit pytest itself. A watchdog
# gives up after WATCHDOG seconds (kills the kernel, writes what it saw, exits 3) instead of waiting out
# the 30 s remote sleep.
INTERRUPT_SCRIPT = """
import _thread, json, os, signal, sys, threading, time
import kernelproxy

# As in an interactive program: a test run started as a shell's background job inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

transport, mode, reps, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
WATCHDOG = 5.0
MAIN = threading.main_thread().ident
results = []

def remote_sleep(marker, done, seconds):
    import time
    open(marker, "w").close()
    time.sleep(seconds)
    open(done, "w").close()  # only if the sleep was not interrupted
    return "slept"

def write(status):
    with open(os.path.join(workdir, "result.json"), "w") as file:
        json.dump({"status": status, "reps": results}, file)

k = kernelproxy.start(transport=transport)
try:
    for rep in range(reps):
        marker, done = os.path.join(workdir, "running%d" % rep), os.path.join(workdir, "done%d" % rep)
        caught = threading.Event()
        fired = []

        def interrupter():
            while not os.path.exists(marker):
                time.sleep(0.002)
            time.sleep(0.1)  # well inside the remote sleep
            fired.append(time.monotonic())
            if mode == "interrupt_main":
                _thread.interrupt_main()
            else:
                signal.pthread_kill(MAIN, signal.SIGINT)  # a real SIGINT, delivered to the main thread
            if not caught.wait(WATCHDOG):
                results.append({"outcome": "no KeyboardInterrupt within %s s of %s" % (WATCHDOG, mode)})
                write("hung")
                os.kill(k.info.pid, signal.SIGKILL)
                os._exit(3)

        thread = threading.Thread(target=interrupter, daemon=True)
        thread.start()
        try:
            k.call(remote_sleep, marker, done, 30)
            outcome = "returned"
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        caught.set()
        raised_at = time.monotonic()
        thread.join()
        started = time.monotonic()
        value = k.call(lambda: "next")
        next_call = time.monotonic() - started
        time.sleep(0.5)  # had the remote sleep gone on, it would still be running: no 'done' either way
        results.append({"outcome": outcome, "raised_after": raised_at - fired[0], "next_call": next_call,
                        "next_value": value, "remote_finished": os.path.exists(done),
                        "still_busy": k.options(timeout=2).call(lambda: "idle")})
    write("ok")
finally:
    k.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["interrupt_main", "sigint_to_main_thread"])
def test_keyboard_interrupt_from_host_thread_interrupts_remote_work(transport, mode, tmp_path):
    """A KeyboardInterrupt raised in the main thread by another thread (``_thread.interrupt_main()``, as IDEs and
    ipykernel's Windows interrupt do, or a real SIGINT) while it waits in ``k.call``: the host gets the
    KeyboardInterrupt promptly, the remote sleep is interrupted, and the next call works at once."""
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), transport, mode, str(REPS), str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=110,
    )
    result_file = tmp_path / "result.json"
    assert result_file.exists(), f"the host script died:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(result_file.read_text())
    for rep, outcome in enumerate(result["reps"]):
        if "raised_after" in outcome:
            report(
                f"keyboard-interrupt[{transport}-{mode}-{rep}]",
                raised_after_s=outcome["raised_after"],
                next_call_s=outcome["next_call"],
            )
    assert result["status"] == "ok", f"{mode}: {result['reps'][-1]['outcome']}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr
    for outcome in result["reps"]:
        assert outcome["outcome"] == "KeyboardInterrupt"
        assert outcome["raised_after"] < 3, f"KeyboardInterrupt took {outcome['raised_after']:.2f} s"
        assert outcome["next_value"] == "next" and outcome["next_call"] < 2, outcome
        assert not outcome["remote_finished"], "the remote sleep was not interrupted"
        assert outcome["still_busy"] == "idle"


# ---------------------------------------------------------------------- hygiene


def test_no_stopped_or_leftover_kernel_processes_from_this_module():
    """Nothing this module froze is still stopped (the session check covers leftovers in general)."""
    me = psutil.Process()
    stopped = [proc.pid for proc in me.children(recursive=True) if _status(proc) == psutil.STATUS_STOPPED]
    assert not stopped, f"stopped processes left behind: {stopped}"


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return "gone"


def test_an_abandoned_call_that_keeps_printing_is_interrupted_once(fresh_kernel):
    """A timed-out call is interrupted once. Its later output must not trigger more interrupts: one that
    lands after the reply hits the idle kernel's event loop, and ipykernel then exits (code 0)."""

    def print_through_interrupts(seconds: float) -> None:
        import builtins
        import time

        builtins._kp_interrupts = 0  # type: ignore[attr-defined]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                print("working", flush=True)
                time.sleep(0.02)
            except KeyboardInterrupt:
                builtins._kp_interrupts += 1  # type: ignore[attr-defined]
                end = min(end, time.monotonic() + 1.0)  # go on printing for a second after the first

    with pytest.raises(CallTimeout):
        fresh_kernel.options(timeout=0.5).call(print_through_interrupts, 30)
    time.sleep(1.5)  # any second interrupt would come with the output printed meanwhile
    assert fresh_kernel.call(lambda: __import__("builtins")._kp_interrupts) == 1
    assert fresh_kernel.is_alive()
