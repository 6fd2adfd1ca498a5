"""Lifecycle: timeouts, interrupts, a dying kernel, restart, shutdown, connect/close, start/connect failures."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
from helpers import kernel_children, kill_new_kernels, pid_running, wait_for_file, wait_pid_gone
from jupyter_client.connect import write_connection_file

import kernelproxy
from kernelproxy import (
    CallInterrupted,
    CallTimeout,
    ConnectionFileError,
    KernelClosedError,
    KernelDiedError,
    KernelStartError,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Kernels started by the external_kernel fixture just now may need a moment before they answer.
CONNECT_STARTUP = 30


def sleep_after_marker(marker: str, seconds: float) -> str:
    """Announce that the call is running (by creating ``marker``), then sleep."""
    with open(marker, "w") as file:
        file.write("running")
    time.sleep(seconds)
    return "slept"


# ---------------------------------------------------------------------- timeout and interrupt
# Timeout tests use their own kernel: if interrupting failed, the shared one would stay busy for the
# rest of the module.


def test_call_timeout_interrupts_and_kernel_stays_usable(fresh_kernel):
    fresh_kernel.push(survivor={"kept": True})
    started = time.monotonic()
    with pytest.raises(CallTimeout) as info:
        fresh_kernel.options(timeout=1).call(time.sleep, 30)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5, elapsed
    assert isinstance(info.value, TimeoutError)
    assert "1" in str(info.value)
    # the next call is not stuck behind the 30 s sleep
    started = time.monotonic()
    assert fresh_kernel.call(lambda: "next") == "next"
    assert time.monotonic() - started < 5
    assert fresh_kernel.pull("survivor") == {"kept": True}
    fresh_kernel.delete("survivor")


def test_per_call_timeout_on_exec_and_eval(fresh_kernel):
    started = time.monotonic()
    with pytest.raises(CallTimeout):
        fresh_kernel.exec("import time as _time\n_time.sleep(15)", timeout=1)
    with pytest.raises(CallTimeout):
        fresh_kernel.eval("__import__('time').sleep(15)", timeout=1)
    assert time.monotonic() - started < 10
    started = time.monotonic()
    assert fresh_kernel.eval("1 + 1") == 2
    assert time.monotonic() - started < 5, "the timed-out work was not interrupted"


def test_timeout_view_does_not_limit_original(fresh_kernel):
    fast = fresh_kernel.options(timeout=0.5)
    with pytest.raises(CallTimeout):
        fast.call(time.sleep, 10)
    started = time.monotonic()
    assert fresh_kernel.call(lambda: time.sleep(1.0) or "ok") == "ok"  # no timeout on the original
    assert time.monotonic() - started < 5, "the timed-out work was not interrupted"


def test_timeout_from_start_options(transport):
    with kernelproxy.start(transport=transport, timeout=1) as k:
        assert k.call_options.timeout == 1
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            k.call(time.sleep, 15)
        assert time.monotonic() - started < 5
        started = time.monotonic()
        assert k.options(timeout=None).call(lambda: time.sleep(1.5) or 7) == 7
        assert time.monotonic() - started < 6, "the timed-out work was not interrupted"


def test_timed_out_queued_call_does_not_disturb_running_call(fresh_kernel, tmp_path):
    """A call that times out while still queued must not interrupt the call the kernel is running."""
    k = fresh_kernel
    marker = tmp_path / "running"
    running = k.submit(sleep_after_marker, str(marker), 3)
    wait_for_file(marker)
    with pytest.raises(CallTimeout):
        k.options(timeout=0.5).call(lambda: "queued")
    assert running.result(timeout=30) == "slept"
    assert k.call(lambda: "after") == "after"


def test_keyboard_interrupt_in_host_interrupts_remote_work(tmp_path):
    """Ctrl-C in a blocking call cancels it *and* its remote work, and the kernel stays usable."""
    marker = tmp_path / "running"
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal, time, kernelproxy
            # As in an interactive program: a test run started as a shell's background job inherits SIGINT ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with kernelproxy.start() as k:
                print("pid", k.info.pid, flush=True)
                try:
                    k.call(lambda: (open({str(marker)!r}, "w").close(), time.sleep(20)))
                except KeyboardInterrupt:
                    print("host got KeyboardInterrupt", flush=True)
                started = time.monotonic()
                assert k.call(lambda: "after") == "after"
                print("next call took", round(time.monotonic() - started, 1), flush=True)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(marker, timeout=60)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "host got KeyboardInterrupt" in out, (out, err)
    assert proc.returncode == 0, err
    took = float(out.split("next call took")[1].split()[0])
    assert took < 5, f"the next call waited {took} s: the remote work was not interrupted"
    kernel_pid = int(out.split()[1])
    assert wait_pid_gone(kernel_pid, 10)


def test_interrupt_from_another_thread(kernel, tmp_path):
    marker = tmp_path / "running"
    kernel.push(before_interrupt=1)
    errors = []

    def interrupter():
        try:
            wait_for_file(marker)
            kernel.interrupt()
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=interrupter)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(CallInterrupted) as interrupted:
            kernel.call(sleep_after_marker, str(marker), 60)
    finally:
        thread.join(30)
    assert not errors
    assert time.monotonic() - started < 20
    message = str(interrupted.value)
    assert message.startswith("call of sleep_after_marker was interrupted in the kernel\nTraceback")
    assert ", in sleep_after_marker\n" in message  # where it was: the caller's code...
    assert "kernelproxy-agent" not in message  # ...not the agent's SIGINT handler that raised KeyboardInterrupt
    assert message.endswith("\nKeyboardInterrupt")
    assert kernel.call(lambda: "after interrupt") == "after interrupt"
    assert kernel.pull("before_interrupt") == 1
    kernel.delete("before_interrupt")


def test_an_interrupted_c_function_called_directly_says_only_that(kernel):
    """No frame of the caller's code to show (time.sleep itself was called): no traceback, no lone
    'KeyboardInterrupt' line under the message."""
    finished = threading.Event()

    def interrupter():  # until the call ends: an interrupt that comes before it runs hits an idle kernel, harmless
        while not finished.wait(0.5):
            kernel.interrupt()

    thread = threading.Thread(target=interrupter)
    thread.start()
    try:
        with pytest.raises(CallInterrupted) as interrupted:
            kernel.call(time.sleep, 30)
    finally:
        finished.set()
        thread.join(30)
    assert str(interrupted.value) == "call of sleep was interrupted in the kernel"
    assert kernel.call(lambda: 6) == 6


def test_interrupt_submitted_call(kernel, tmp_path):
    marker = tmp_path / "running"
    future = kernel.submit(sleep_after_marker, str(marker), 60)
    wait_for_file(marker)
    kernel.interrupt()
    with pytest.raises(CallInterrupted):
        future.result(timeout=20)
    assert kernel.call(lambda: 5) == 5


def test_interrupt_idle_kernel_is_harmless(kernel):
    kernel.interrupt()
    time.sleep(0.3)
    assert kernel.call(lambda: "still fine") == "still fine"


# ---------------------------------------------------------------------- a kernel that dies


@pytest.mark.slow
def test_sigkill_during_call_raises_kernel_died_quickly(fresh_kernel, tmp_path):
    k = fresh_kernel
    k.push(doomed=1)
    pid = k.info.pid
    marker = tmp_path / "running"
    future = k.submit(sleep_after_marker, str(marker), 60)
    wait_for_file(marker)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(KernelDiedError):
        future.result(timeout=30)
    elapsed = time.monotonic() - killed_at
    assert elapsed < 5, f"KernelDiedError took {elapsed:.1f} s"

    # later calls fail immediately, whatever the verb
    for action in (lambda: k.call(lambda: 1), lambda: k.pull("doomed"), lambda: k.push(x=1), lambda: k.eval("1")):
        started = time.monotonic()
        with pytest.raises(KernelDiedError):
            action()
        assert time.monotonic() - started < 1
    assert k.is_alive() is False

    k.restart()
    assert k.is_alive() is True
    assert k.info.pid != pid
    assert k.call(os.getpid) == k.info.pid
    assert "doomed" not in k
    assert k.call(lambda a, b: a * b, 6, 7) == 42


@pytest.mark.slow
def test_sigkill_while_idle_then_call(fresh_kernel):
    k = fresh_kernel
    pid = k.info.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while k.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert k.is_alive() is False
    started = time.monotonic()
    with pytest.raises(KernelDiedError):
        k.call(lambda: 1)
    assert time.monotonic() - started < 5
    k.restart()
    assert k.call(lambda: 2) == 2


@pytest.mark.slow
def test_sigkill_fails_all_concurrent_calls(fresh_kernel, tmp_path):
    k = fresh_kernel
    marker = tmp_path / "running"
    running = k.submit(sleep_after_marker, str(marker), 60)
    queued = [k.submit(lambda i: i, i) for i in range(5)]
    wait_for_file(marker)
    os.kill(k.info.pid, signal.SIGKILL)
    for future in [running, *queued]:
        with pytest.raises(KernelDiedError):
            future.result(timeout=10)


def test_restart_healthy_kernel_clears_namespace(fresh_kernel):
    k = fresh_kernel
    old_pid = k.info.pid
    k.push(before_restart=1)
    k.exec("import json")
    k.restart()
    assert "before_restart" not in k
    assert "json" not in k
    assert k.info.pid != old_pid
    assert wait_pid_gone(old_pid, 10)
    assert k.call(os.getpid) == k.info.pid
    assert k.eval("'_kernelproxy_agent_v1' in __import__('sys').modules") is True
    k.push(after_restart=2)
    assert k.pull("after_restart") == 2


def test_restart_fails_running_call(fresh_kernel, tmp_path):
    k = fresh_kernel
    marker = tmp_path / "running"
    future = k.submit(sleep_after_marker, str(marker), 60)
    wait_for_file(marker)
    k.restart()
    with pytest.raises(KernelDiedError):
        future.result(timeout=10)
    assert k.call(lambda: "new") == "new"


def test_options_view_follows_restart(fresh_kernel):
    k = fresh_kernel
    view = k.options(timeout=30)
    k.restart()
    assert view.info.pid == k.info.pid
    assert view.call(os.getpid) == k.info.pid


# ---------------------------------------------------------------------- shutdown and close


def test_shutdown_then_use_raises_kernel_closed(fresh_kernel):
    k = fresh_kernel
    pid = k.info.pid
    assert k.is_alive() is True
    k.shutdown()
    assert k.is_alive() is False
    assert wait_pid_gone(pid, 10)
    for action in (
        lambda: k.call(lambda: 1),
        lambda: k.push(a=1),
        lambda: k.pull("a"),
        lambda: k.exec("1"),
        lambda: k.eval("1"),
        lambda: k["a"],
        lambda: "a" in k,
        lambda: k.interrupt(),
        lambda: k.submit(lambda: 1).result(timeout=10),
        lambda: k.options(timeout=1).call(lambda: 1),
    ):
        with pytest.raises(KernelClosedError):
            action()
    k.shutdown()  # idempotent
    k.close()


def test_shutdown_fails_running_call(fresh_kernel, tmp_path):
    k = fresh_kernel
    marker = tmp_path / "running"
    future = k.submit(sleep_after_marker, str(marker), 60)
    wait_for_file(marker)
    k.shutdown()
    with pytest.raises((KernelClosedError, KernelDiedError)):
        future.result(timeout=10)


@pytest.mark.local_kernel('checks local connection files and sockets')
def test_shutdown_leaves_no_files(fresh_kernel):
    connection_file = fresh_kernel.info.connection_file
    info = json.loads(Path(connection_file).read_text())
    socket_dir = os.path.dirname(info["ip"]) if info["transport"] == "ipc" else None
    fresh_kernel.shutdown()
    assert not os.path.exists(connection_file)
    if socket_dir is not None:
        leftovers = [name for name in os.listdir(socket_dir)] if os.path.isdir(socket_dir) else []
        assert not leftovers, f"IPC socket files left in {socket_dir}: {leftovers}"


@pytest.mark.local_kernel("checks the local kernel's sockets")
def test_started_kernel_is_reachable_only_locally(kernel):
    """The kernel's sockets are private: IPC in an owner-only directory, or TCP on loopback."""
    info = json.loads(Path(kernel.info.connection_file).read_text())
    if info["transport"] == "ipc":
        socket_dir = os.path.dirname(info["ip"])
        mode = os.stat(socket_dir).st_mode
        assert mode & 0o077 == 0, f"{socket_dir} is accessible by others: {oct(mode)}"
        assert os.stat(socket_dir).st_uid == os.getuid()
    else:
        assert info["ip"] in ("127.0.0.1", "localhost", "::1")
    assert info["key"], "the kernel accepts unsigned messages"
    mode = os.stat(kernel.info.connection_file).st_mode
    assert mode & 0o077 == 0, f"the connection file (holding the key) is readable by others: {oct(mode)}"


def test_restart_after_shutdown_raises(fresh_kernel):
    fresh_kernel.shutdown()
    with pytest.raises(KernelClosedError):
        fresh_kernel.restart()


def test_close_of_started_kernel_stops_it(fresh_kernel):
    pid = fresh_kernel.info.pid
    fresh_kernel.close()
    assert wait_pid_gone(pid, 10)
    with pytest.raises(KernelClosedError):
        fresh_kernel.call(lambda: 1)


# ---------------------------------------------------------------------- connect to a kernel started elsewhere


def test_connect_by_full_path_close_leaves_it_running(external_kernel, transport):
    path = external_kernel.connection_file
    with kernelproxy.connect(path, transport=transport, startup_timeout=CONNECT_STARTUP) as k:
        assert k.info.pid == external_kernel.process.pid
        assert k.info.connection_file == str(path)
        assert k.call(os.getpid) == external_kernel.process.pid
        k.push(left_behind="still here")
    # the with block closed the connection only
    time.sleep(0.5)
    assert external_kernel.process.poll() is None
    with pytest.raises(KernelClosedError):
        k.call(lambda: 1)
    k2 = kernelproxy.connect(str(path), transport=transport, startup_timeout=CONNECT_STARTUP)
    try:
        assert k2.pull("left_behind") == "still here"
        assert k2.is_alive()
    finally:
        k2.close()
    assert external_kernel.process.poll() is None


def test_connect_by_fragment(external_kernel, transport, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(external_kernel.connection_file.parent))
    monkeypatch.chdir(tmp_path / "..")  # the fragment is not a file in the working directory
    fragment = external_kernel.fragment[:12]
    assert not os.path.exists(fragment)
    k = kernelproxy.connect(fragment, transport=transport, startup_timeout=CONNECT_STARTUP)
    try:
        assert k.call(os.getpid) == external_kernel.process.pid
        assert os.path.samefile(k.info.connection_file, external_kernel.connection_file)
    finally:
        k.close()
    assert external_kernel.process.poll() is None


def test_connect_then_shutdown_stops_external_kernel(external_kernel, transport):
    k = kernelproxy.connect(external_kernel.connection_file, transport=transport, startup_timeout=CONNECT_STARTUP)
    assert k.call(lambda: 1) == 1
    k.shutdown()
    started = time.monotonic()
    external_kernel.process.wait(10)
    assert time.monotonic() - started < 10
    assert k.is_alive() is False
    with pytest.raises(KernelClosedError):
        k.call(lambda: 1)


def test_restart_of_connected_kernel_is_refused(external_kernel, transport):
    k = kernelproxy.connect(external_kernel.connection_file, transport=transport, startup_timeout=CONNECT_STARTUP)
    try:
        with pytest.raises(kernelproxy.KernelProxyError, match="restart"):
            k.restart()
        assert k.call(lambda: "unharmed") == "unharmed"
    finally:
        k.close()
    assert external_kernel.process.poll() is None


def test_interrupt_connected_kernel(external_kernel, transport, tmp_path):
    """Interrupting a kernel we did not start goes through the control channel."""
    k = kernelproxy.connect(external_kernel.connection_file, transport=transport, startup_timeout=CONNECT_STARTUP)
    try:
        marker = tmp_path / "running"
        future = k.submit(sleep_after_marker, str(marker), 60)
        wait_for_file(marker)
        k.interrupt()
        with pytest.raises(CallInterrupted):
            future.result(timeout=20)
        assert k.call(lambda: 3) == 3
    finally:
        k.close()


@pytest.mark.slow
def test_connected_kernel_killed_raises_kernel_died(external_kernel, transport, tmp_path):
    k = kernelproxy.connect(external_kernel.connection_file, transport=transport, startup_timeout=CONNECT_STARTUP)
    try:
        marker = tmp_path / "running"
        future = k.submit(sleep_after_marker, str(marker), 60)
        wait_for_file(marker)
        killed_at = time.monotonic()
        external_kernel.process.kill()
        with pytest.raises(KernelDiedError):
            future.result(timeout=30)
        # no process to poll: the heartbeat notices within a few seconds
        assert time.monotonic() - killed_at < 8
        with pytest.raises(KernelDiedError):
            k.call(lambda: 1)
    finally:
        k.close()


# ---------------------------------------------------------------------- connection file errors


def test_connect_missing_file(tmp_path):
    with pytest.raises(ConnectionFileError):
        kernelproxy.connect(tmp_path / "kernel-does-not-exist.json")


def test_connect_unknown_fragment(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionFileError, match="no-such-fragment"):
        kernelproxy.connect("no-such-fragment-" + uuid.uuid4().hex)


def test_connect_invalid_json(tmp_path):
    path = tmp_path / "kernel-bad.json"
    path.write_text("{not json")
    with pytest.raises(ConnectionFileError, match="JSON"):
        kernelproxy.connect(path)


def test_connect_json_not_an_object(tmp_path):
    path = tmp_path / "kernel-list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConnectionFileError):
        kernelproxy.connect(path)


def _valid_connection_info(tmp_path):
    path = tmp_path / "kernel-template.json"
    write_connection_file(str(path), ip="127.0.0.1", key=b"secret-key")
    return json.loads(path.read_text())


@pytest.mark.parametrize("missing", ["shell_port", "iopub_port", "control_port", "hb_port", "ip", "key"])
def test_connect_missing_key(tmp_path, missing):
    info = _valid_connection_info(tmp_path)
    del info[missing]
    path = tmp_path / "kernel-missing.json"
    path.write_text(json.dumps(info))
    with pytest.raises(ConnectionFileError, match=missing):
        kernelproxy.connect(path)


def test_connect_empty_key(tmp_path):
    info = _valid_connection_info(tmp_path)
    info["key"] = ""
    path = tmp_path / "kernel-nokey.json"
    path.write_text(json.dumps(info))
    with pytest.raises(ConnectionFileError, match="empty key"):
        kernelproxy.connect(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_nobody_listening_raises_quickly(tmp_path):
    info = _valid_connection_info(tmp_path)
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        info[name] = _free_port()
    path = tmp_path / "kernel-deaf.json"
    path.write_text(json.dumps(info))
    started = time.monotonic()
    with pytest.raises(ConnectionFileError) as excinfo:
        kernelproxy.connect(path, startup_timeout=2)
    elapsed = time.monotonic() - started
    assert elapsed < 6, elapsed
    assert str(path) in str(excinfo.value)


def test_connect_says_the_heartbeat_gave_up_and_when(tmp_path):
    """Nobody at the ports: the heartbeat monitor gives up after ~3 s; the message says that, not the timeout."""
    info = _valid_connection_info(tmp_path)
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        info[name] = _free_port()
    path = tmp_path / "kernel-silent.json"
    path.write_text(json.dumps(info))
    started = time.monotonic()
    with pytest.raises(ConnectionFileError) as excinfo:
        kernelproxy.connect(path, startup_timeout=20)
    elapsed = time.monotonic() - started
    message = str(excinfo.value)
    assert elapsed < 15, elapsed
    stated = float(re.search(r"after (\d+\.\d) s kernelproxy gave up before the 20 s startup_timeout", message)[1])
    assert abs(stated - elapsed) < 1.5, (stated, elapsed)
    assert "heartbeat" in message and str(info["hb_port"]) in message
    assert "within 20" not in message


def test_connect_to_a_busy_kernel_says_it_may_be_busy(external_kernel):
    """A kernel running another client's long cell answers its heartbeat but not kernel_info: the timeout says so."""
    from jupyter_client import BlockingKernelClient

    other = BlockingKernelClient(connection_file=str(external_kernel.connection_file))
    other.load_connection_file()
    other.start_channels()
    try:
        # Not wait_for_ready(): under load it says "Kernel died" when the heartbeat is merely slow to start.
        other.kernel_info()
        other.get_shell_msg(timeout=CONNECT_STARTUP)
        other.execute("import time; time.sleep(30)")
        time.sleep(0.5)  # the kernel is inside the cell now
        started = time.monotonic()
        with pytest.raises(ConnectionFileError) as excinfo:
            kernelproxy.connect(external_kernel.connection_file, startup_timeout=3)
        assert time.monotonic() - started < 10
        message = str(excinfo.value)
        assert "did not answer a kernel_info request" in message and "within the 3 s startup_timeout" in message
        assert "busy" in message and "raise startup_timeout" in message
    finally:
        other.stop_channels()


def test_connect_wrong_key_raises_connection_file_error(external_kernel, tmp_path):
    info = json.loads(external_kernel.connection_file.read_text())
    info["key"] = "not-the-right-key"
    path = tmp_path / "kernel-wrongkey.json"
    path.write_text(json.dumps(info))
    # the kernel must be up first, so that a failure is the key's fault
    with kernelproxy.connect(external_kernel.connection_file, startup_timeout=CONNECT_STARTUP) as good:
        assert good.call(lambda: 1) == 1
    started = time.monotonic()
    with pytest.raises(ConnectionFileError):
        kernelproxy.connect(path, startup_timeout=2)
    assert time.monotonic() - started < 6
    assert external_kernel.process.poll() is None


# ---------------------------------------------------------------------- start errors


def test_start_unknown_kernel_name():
    before = {proc.pid for proc in kernel_children()}
    with pytest.raises(KernelStartError, match="no-such-kernel-xyz"):
        kernelproxy.start("no-such-kernel-xyz")
    assert not kill_new_kernels(before)


def test_start_nonexistent_python():
    before = {proc.pid for proc in kernel_children()}
    started = time.monotonic()
    with pytest.raises(KernelStartError):
        kernelproxy.start(python="/nonexistent/bin/python")
    assert time.monotonic() - started < 10
    assert not kill_new_kernels(before)


def test_a_kernel_not_ready_within_startup_timeout_is_killed_quietly(capfd):
    """Killed, not interrupted first as jupyter_client's shutdown does: a kernel still importing would print
    a KeyboardInterrupt traceback here, which reads like a crash."""
    before = {proc.pid for proc in kernel_children()}
    with pytest.raises(KernelStartError, match="did not become ready within 0.2 s"):
        kernelproxy.start(startup_timeout=0.2)
    assert not kill_new_kernels(before)
    assert "KeyboardInterrupt" not in capfd.readouterr().err


@pytest.mark.parametrize("seconds", [0, -1, "10"])
def test_startup_and_connect_timeouts_are_checked_before_anything_starts(seconds, jupyter_server):
    before = {proc.pid for proc in kernel_children()}
    with pytest.raises(ValueError, match=f"startup_timeout must be a positive number of seconds, not {seconds!r}"):
        kernelproxy.start(startup_timeout=seconds)
    with pytest.raises(ValueError, match="startup_timeout must be a positive number of seconds"):
        kernelproxy.connect("kernel-no-such-file.json", startup_timeout=seconds)
    with pytest.raises(ValueError, match="connect_timeout must be a positive number of seconds"):
        kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, connect_timeout=seconds)
    assert not kill_new_kernels(before)


def test_start_python_without_ipykernel(tmp_path):
    """An interpreter that exists but cannot run ipykernel_launcher: reported quickly, nothing left."""
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S -c 'import sys; sys.exit(\"no ipykernel here\")'\n")
    fake_python.chmod(0o755)
    before = {proc.pid for proc in kernel_children()}
    started = time.monotonic()
    with pytest.raises(KernelStartError, match=r"cannot import ipykernel \(no ipykernel here\)\. Install it"):
        kernelproxy.start(python=str(fake_python), startup_timeout=30)
    assert time.monotonic() - started < 10
    assert not kill_new_kernels(before)


def test_start_with_cwd_and_env(tmp_path, transport):
    with kernelproxy.start(transport=transport, cwd=tmp_path, env={"KERNELPROXY_TEST_VAR": "hello"}) as k:
        assert os.path.samefile(k.call(os.getcwd), tmp_path)
        # (not os.environ.get: that bound method would carry the host's os.environ along by value)
        assert k.call(lambda: os.environ.get("KERNELPROXY_TEST_VAR")) == "hello"
    assert "KERNELPROXY_TEST_VAR" not in os.environ


def test_kernel_process_exits_with_host():
    """A kernel the host never shut down does not outlive the host process."""
    code = (
        "import kernelproxy, sys\n"
        "k = kernelproxy.start()\n"
        "print(k.info.pid, flush=True)\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[0])
    assert wait_pid_gone(pid, 10), f"kernel {pid} outlived its host"
    assert not pid_running(pid)


# ---------------------------------------------------------------------- stopping one call (issue 13, section 4)


def test_interrupt_one_submitted_call(fresh_kernel):
    k = fresh_kernel
    running = k.submit(time.sleep, 30)
    queued = k.submit(lambda: "queued ran")
    time.sleep(1.0)
    started = time.monotonic()
    assert k.interrupt(running) is True
    with pytest.raises(CallInterrupted, match="interrupt"):
        running.result(10)
    assert time.monotonic() - started < 5
    assert queued.result(10) == "queued ran"  # the call behind it was not interrupted
    assert k.interrupt(queued) is False  # finished already
    with pytest.raises(ValueError, match="submit"):
        k.interrupt(k.options(timeout=5)._portal.submit(asyncio_sleep_zero()))
    assert k.call(lambda: "usable") == "usable"


async def asyncio_sleep_zero() -> None:
    import asyncio

    await asyncio.sleep(0)


def test_interrupt_one_submitted_call_asyncio():
    import asyncio

    async def main() -> None:
        async with await kernelproxy.start_async() as ak:
            task = ak.submit(time.sleep, 30)
            await asyncio.sleep(1.0)
            assert await ak.interrupt(task) is True
            with pytest.raises(CallInterrupted):
                await task
            assert await ak.call(lambda: 5) == 5

    asyncio.run(main())


class SleepsWhenUnpickled:
    """An argument whose unpickling in the kernel takes long: ``time.sleep(30)`` runs there as it is loaded."""

    def __reduce__(self) -> tuple:
        return (time.sleep, (30,))


def test_an_interrupt_while_the_kernel_unpickles_the_arguments_says_interrupted(fresh_kernel):
    """Before: a SerializationError suggesting a missing module (the KeyboardInterrupt came from unpickling)."""
    future = fresh_kernel.submit(type, SleepsWhenUnpickled())
    time.sleep(1)  # the kernel is loading the argument now
    fresh_kernel.interrupt()
    with pytest.raises(CallInterrupted, match="interrupt"):
        future.result(timeout=10)
    with pytest.raises(CallTimeout, match="interrupted and the kernel is usable"):
        fresh_kernel.options(timeout=1).call(type, SleepsWhenUnpickled())
    assert fresh_kernel.call(pow, 2, 5) == 32
