"""Starting a server process on loopback, waiting for it to answer, and stopping it with all it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

START_TIMEOUT = 90.0  # seconds for a server to answer after it was started (first start compiles .pyc files)


@dataclass
class ServerProcess:
    """A server we started: where to reach it, its token, its log, and the process to stop."""

    name: str
    url: str  # what kernelproxy.connect_server takes: http://127.0.0.1:PORT/... (ends with '/')
    token: str
    process: subprocess.Popen
    log: Path
    directory: Path
    extra: dict = field(default_factory=dict)  # server-specific details (the hub's admin URL, user name...)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_kernelspec(jupyter_path: Path, name: str = "python3") -> Path:
    """A kernelspec named ``name`` under ``jupyter_path/kernels`` that starts *this* interpreter's ipykernel.

    Servers in other virtualenvs find it through ``JUPYTER_PATH``, which comes
    before their own data directories, so ``python3`` there means our Python:
    kernels whose pickles match ours.
    """
    directory = jupyter_path / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (kernelproxy's test Python)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (directory / "kernel.json").write_text(json.dumps(spec, indent=1))
    return directory


def server_environment(jupyter_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a server in another venv: our kernelspec first, none of our venv's paths.

    PYTHONDONTWRITEBYTECODE goes too (CI's machines set it): a server then caches
    the bytecode of what it imports at its first start, and later starts take half
    the time (JupyterHub: 45 s -> 20 s on 2 busy cores).
    """
    dropped = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "JUPYTER_PATH", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["JUPYTER_PATH"] = str(jupyter_path)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def launch(name: str, args: list[str], directory: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = directory / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=env,
            start_new_session=True,  # its own process group: a Ctrl-C at the terminal goes to pytest only
        )
    return process, log


def wait_until_answers(
    server: ServerProcess,
    probe: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    success_only: bool = False,
) -> None:
    """Poll ``server.url + probe`` until it answers; fail with the log otherwise.

    An answer is any HTTP status below 500, or with ``success_only`` a 2xx (a proxy
    answers 404 before its routes are set up).
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            request = urllib.request.Request(server.url + probe, headers=headers or {})
            urllib.request.urlopen(request, timeout=2).close()
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and not success_only:
                return
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if server.process.poll() is not None or time.monotonic() > deadline:
            stop(server)
            state = (
                f"exited with code {server.process.returncode}"
                if server.process.poll() is not None
                else (f"did not answer {probe} within {timeout:.0f} s ({last})")
            )
            raise RuntimeError(f"{server.name} {state}; the end of its log:\n{server.log_tail()}")
        time.sleep(0.2)


def stop(server: ServerProcess, grace: float = 15.0) -> list[int]:
    """SIGTERM the server, wait up to ``grace`` s, then SIGKILL it and everything it started.

    Returns the pids that had to be killed (a clean shutdown returns []).
    Children are collected *before* the server is stopped, and their process
    group too, so kernels and proxies it started cannot outlive it even when it
    dies without cleaning up.
    """
    try:
        root = psutil.Process(server.process.pid)
        family = root.children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    killed = []
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()
        killed.append(server.process.pid)
    survivors = []
    for proc in family:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                survivors.append(proc)
        except psutil.NoSuchProcess:
            pass
    if survivors:
        _, alive = psutil.wait_procs(survivors, timeout=5)  # given a moment to finish their own shutdown
        for proc in alive:
            try:
                proc.kill()
                killed.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
    return killed
