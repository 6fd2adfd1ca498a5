"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from jupyter_client.connect import write_connection_file

if TYPE_CHECKING:
    import kernelproxy

KERNEL_MARKER = "ipykernel_launcher"
# Environments the tests build (virtualenvs, pip --target dirs), kept between runs.
TEST_CACHE = Path(os.environ.get("KERNELPROXY_TEST_CACHE", Path.home() / ".cache" / "kernelproxy-tests"))


# ---------------------------------------------------------------------- environments built for the tests


def run_build_step(args, what: str) -> None:
    proc = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the test environment failed at {what}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)


def build_once(target: Path, build) -> Path:
    """Build ``target`` unless a complete build is cached; a half-built one is thrown away."""
    marker = target / ".kernelproxy-tests-complete"
    if marker.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    build(target)
    marker.write_text(time.ctime())
    return target


def pip_command(python: Path, *args) -> list:
    return [python, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q", *args]


def pip_target(package: str, version: str) -> Path:
    """A directory holding ``package==version`` alone (pip --target), for PYTHONPATH; built once."""

    def build(target: Path) -> None:
        run_build_step(
            pip_command(Path(sys.executable), "install", "--no-deps", "--target", target, f"{package}=={version}"),
            f"pip install --target {package}=={version}",
        )

    root = TEST_CACHE / f"py{sys.version_info[0]}.{sys.version_info[1]}-targets"
    root.mkdir(parents=True, exist_ok=True)
    return build_once(root / f"{package}-{version}", build)


# ---------------------------------------------------------------------- process bookkeeping


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def kernel_children() -> list[psutil.Process]:
    """Running (non-zombie) ipykernel processes descended from this pytest process."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if any(KERNEL_MARKER in part for part in cmdline(proc)):
            found.append(proc)
    return found


def kill_new_kernels(known_pids) -> list[int]:
    """Kill ipykernel children not in ``known_pids`` (cleanup after a test that expects none); return their pids."""
    killed = []
    for proc in kernel_children():
        if proc.pid not in known_pids:
            try:
                proc.kill()
                proc.wait(10)
                killed.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
    return killed


def pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_running(pid):
            return True
        time.sleep(0.05)
    return not pid_running(pid)



@dataclass
class ExternalKernel:
    """An ipykernel started with `python -m ipykernel_launcher -f FILE`, not by kernelproxy."""

    connection_file: Path
    process: subprocess.Popen

    @property
    def fragment(self) -> str:
        """A part of the file name that find_connection_file resolves."""
        return self.connection_file.stem.replace("kernel-", "")


def start_external_kernel(
    directory: Path, *, key: bytes | None = None, transport: str = "tcp", ip: str = "127.0.0.1"
) -> ExternalKernel:
    """An ipykernel started by hand, as Jupyter does; ``key=b""`` makes one that accepts unsigned messages.

    ``transport="ipc"`` with ``ip`` a socket path prefix puts its sockets there.
    """
    key = uuid.uuid4().hex.encode("ascii") if key is None else key
    for attempt in range(3):
        path = directory / f"kernel-{uuid.uuid4().hex[:8]}.json"
        # Free TCP ports picked here can be taken by another process (other workers start kernels too) before the
        # kernel binds them; it then exits at once (CI: "the test kernel exited with code 1"). New ports, again.
        write_connection_file(str(path), transport=transport, ip=ip, key=key)
        process = subprocess.Popen(
            [sys.executable, "-m", KERNEL_MARKER, "-f", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(directory),
            start_new_session=True,  # like a kernel launched by Jupyter: its own process group
        )
        kernel = ExternalKernel(path, process)
        try:
            wait_for_heartbeat(kernel)
        except KernelExitedEarly:
            stop_external_kernel(kernel)
            if attempt == 2:
                raise
            continue
        except BaseException:
            stop_external_kernel(kernel)
            raise
        return kernel
    raise AssertionError("unreachable")


class KernelExitedEarly(RuntimeError):
    """The hand-started kernel exited before it answered its heartbeat."""


def wait_for_heartbeat(kernel: ExternalKernel, timeout: float = 60) -> None:
    """Until the kernel answers a heartbeat, as Jupyter waits before it offers a kernel: on a loaded machine
    ipykernel can take seconds to start, and connect() gives up on a silent heartbeat after 3.5 s."""
    import zmq

    info = json.loads(kernel.connection_file.read_text())
    address = (
        f"ipc://{info['ip']}-{info['hb_port']}"
        if info["transport"] == "ipc"
        else f"tcp://{info['ip']}:{info['hb_port']}"
    )
    deadline = time.monotonic() + timeout
    context = zmq.Context.instance()
    while time.monotonic() < deadline:
        if kernel.process.poll() is not None:
            raise KernelExitedEarly(f"the test kernel exited with code {kernel.process.returncode}")
        socket = context.socket(zmq.REQ)
        socket.linger = 0
        try:
            socket.connect(address)
            socket.send(b"ping")
            if socket.poll(500):
                socket.recv()
                return
        finally:
            socket.close()
    raise TimeoutError(f"the test kernel did not answer its heartbeat within {timeout} s")


def stop_external_kernel(kernel: ExternalKernel) -> None:
    if kernel.process.poll() is None:
        kernel.process.kill()
    kernel.process.wait(10)



def wait_for_file(path: os.PathLike, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


# ---------------------------------------------------------------------- a real Jupyter Server


def new_kernel(kernel_path: tuple[str, str], request):
    """A kernel for a path of conftest.KERNEL_PATHS: started here, or on the session's Jupyter server."""
    import kernelproxy

    transport, wire = kernel_path
    if wire == "websocket":
        server = request.getfixturevalue("jupyter_server")
        return kernelproxy.connect_server(server.url, token=server.token, transport=transport)
    return kernelproxy.start(transport=transport)


@dataclass
class JupyterServer:
    url: str
    token: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_jupyter_server(
    directory: Path, *extra_args: str, token: str | None = None, tls_ca: Path | None = None
) -> JupyterServer:
    """A real `jupyter server` on 127.0.0.1, a free port and a random token; its log in ``directory``."""
    port = free_port()
    token = token or uuid.uuid4().hex
    log = directory / f"jupyter-server-{port}.log"
    args = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={directory}",
        # The server's restarter notices a dead kernel within half a second (default 3 s).
        "--KernelRestarter.time_to_dead=0.5",
        *extra_args,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # CI machines run as root
    return _wait_for_server(args, directory, log, port, token, "api/status", tls_ca=tls_ca)


def start_kernel_gateway(directory: Path) -> JupyterServer:
    """A real Jupyter Kernel Gateway on 127.0.0.1, a free port and a random token."""
    port = free_port()
    token = uuid.uuid4().hex
    args = [
        sys.executable,
        "-m",
        "kernel_gateway",
        "--KernelGatewayApp.ip=127.0.0.1",
        f"--KernelGatewayApp.port={port}",
        "--KernelGatewayApp.port_retries=0",
        f"--KernelGatewayApp.auth_token={token}",
    ]
    # Not api/kernels: the gateway refuses to list kernels unless configured to (403).
    return _wait_for_server(args, directory, directory / f"kernel-gateway-{port}.log", port, token, "api")


def _wait_for_server(
    args: list[str], directory: Path, log: Path, port: int, token: str, probe: str, *, tls_ca: Path | None = None
) -> JupyterServer:
    import ssl
    import urllib.request

    # Its runtime files (jpserver-PID.json, its kernels' connection files) in the test's directory, not the
    # user's runtime directory: a server a test kills cannot remove them, and `kernelproxy list` would show them.
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(directory / "jupyter-runtime")}
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=directory, env=env)
    url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}/"
    context = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
    deadline = time.monotonic() + 60
    while True:
        try:
            request = urllib.request.Request(url + probe, headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(request, timeout=2, context=context).close()
            return JupyterServer(url, token, process, log)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{args[2]} did not start; its log:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


def stop_jupyter_server(server: JupyterServer) -> None:
    """Stop the server; it shuts its kernels down. Anything left of it is killed."""
    children = psutil.Process(server.process.pid).children(recursive=True) if server.process.poll() is None else []
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


# ---------------------------------------------------------------------- what every server's kernels must do


def every_verb(k: kernelproxy.Kernel, capfd) -> None:
    """Every verb works on a server's kernel (issue 13). The calling module registers helpers pickle-by-value."""
    import numpy as np

    import kernelproxy

    assert k.call(pow, 2, 10) == 1024
    k.call(print, "printed in the gateway's kernel")
    assert "printed in the gateway's kernel" in capfd.readouterr().out
    array = np.random.default_rng(3).random(3 * 2**20)  # 24 MB: in parts both ways
    k.push(big=array)
    assert np.array_equal(k.pull("big"), array)
    ref = k.ref("big")
    assert ref.shape.get() == array.shape
    with pytest.raises(ZeroDivisionError):
        k.call(lambda: 1 / 0)
    with pytest.raises(kernelproxy.CallTimeout):
        k.options(timeout=1).call(time.sleep, 30)
    assert k.call(lambda: "after the timeout") == "after the timeout"
    running = k.submit(time.sleep, 30)
    time.sleep(0.5)
    assert k.interrupt(running) is True
    with pytest.raises(kernelproxy.CallInterrupted):
        running.result(15)
    k.restart()
    assert "big" not in k
    with pytest.raises(kernelproxy.StaleRefError):
        ref.get()
    assert k.call(lambda: "after restart") == "after restart"
