"""Shared fixtures: real ipykernel kernels, external kernels, and a leak check.

Kernel fixtures are parametrized over KERNEL_PATHS; adding a path (e.g.
"comm") to that list runs every kernel-using test over it too.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import (
    ExternalKernel,
    JupyterServer,
    cmdline,
    kernel_children,
    new_kernel,
    pid_running,
    start_external_kernel,
    start_jupyter_server,
    stop_external_kernel,
    stop_jupyter_server,
    wait_pid_gone,
)

import kernelproxy

# Enterprise Gateway and JupyterHub fixtures (each server in its own cached environment): tests/servers/fixtures.py.
pytest_plugins = ["servers.fixtures"]

# Every kernel fixture runs once per path listed here: a transport over a wire. "server" is a kernel of a
# real `jupyter server`, reached over its REST + websocket API (comm transport, frames in parts).
KERNEL_PATHS = [
    pytest.param(("lane", "zmq"), id="lane"),
    pytest.param(("comm", "zmq"), id="comm"),
    pytest.param(("execute", "zmq"), id="execute"),
    pytest.param(("comm", "websocket"), id="server"),
]
SERVER_PATH = ("comm", "websocket")


@dataclass
class StartedKernels:
    """Pids of every kernel started with kernelproxy.start()/start_async() during the session."""

    pids: list[int]


@pytest.fixture(scope="session", autouse=True)
def no_kernel_left_behind() -> Iterator[StartedKernels]:
    """At the end of the session no ipykernel child of ours may still run.

    Also records every kernel started through kernelproxy.start()/start_async()
    (by wrapping those functions, without changing what they do) and checks
    each of those processes is gone too, even if it were not our child.
    """
    started = StartedKernels(pids=[])
    original_start, original_start_async = kernelproxy.start, kernelproxy.start_async

    @functools.wraps(original_start)
    def start(*args, **kwargs):
        k = original_start(*args, **kwargs)
        started.pids.append(k.info.pid)
        return k

    @functools.wraps(original_start_async)
    async def start_async(*args, **kwargs):
        k = await original_start_async(*args, **kwargs)
        started.pids.append(k.info.pid)
        return k

    patch = pytest.MonkeyPatch()
    patch.setattr(kernelproxy, "start", start)
    patch.setattr(kernelproxy, "start_async", start_async)
    try:
        yield started
    finally:
        patch.undo()

    # Shutdowns are synchronous, but allow a moment for processes that were just told to exit.
    deadline = time.monotonic() + 10
    while kernel_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = kernel_children()
    still_running = [pid for pid in started.pids if pid_running(pid)]
    details = [f"{proc.pid}: {' '.join(cmdline(proc))}" for proc in leftovers]
    for proc in leftovers:  # do not leak them past the session even though we fail
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    for pid in still_running:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    sys.stderr.write(f"\nkernelproxy.start()/start_async() started {len(started.pids)} kernels this session\n")
    if leftovers or still_running:
        pytest.fail(
            "kernels left running at the end of the session: "
            f"ipykernel children {details}; kernelproxy-started pids still running {still_running}",
            pytrace=False,
        )


# ---------------------------------------------------------------------- kernels


@pytest.fixture(scope="module", params=KERNEL_PATHS)
def kernel_path(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(transport, wire) under test; parametrizes every kernel fixture."""
    return request.param


@pytest.fixture(scope="module")
def transport(kernel_path: tuple[str, str]) -> str:
    """The transport under test: "comm" or "execute"."""
    return kernel_path[0]


@pytest.fixture(scope="module")
def wire(kernel_path: tuple[str, str]) -> str:
    """The wire under test: "zmq" (the kernel's own sockets) or "websocket" (through a Jupyter server)."""
    return kernel_path[1]


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """A real `jupyter server` on 127.0.0.1 with a random port and token, for the whole session."""
    server = start_jupyter_server(tmp_path_factory.mktemp("jupyter-server"))
    try:
        yield server
    finally:
        stop_jupyter_server(server)


@pytest.fixture(scope="module")
def kernel(kernel_path: tuple[str, str], request: pytest.FixtureRequest) -> Iterator[kernelproxy.Kernel]:
    """A kernel shared by the tests of one module: do not break it (use fresh_kernel for that)."""
    k = new_kernel(kernel_path, request)
    try:
        yield k
    finally:
        _shutdown(k)


@pytest.fixture
def fresh_kernel(kernel_path: tuple[str, str], request: pytest.FixtureRequest) -> Iterator[kernelproxy.Kernel]:
    """A kernel of one's own, for tests that kill, restart or shut it down."""
    k = new_kernel(kernel_path, request)
    try:
        yield k
    finally:
        _shutdown(k)


def _shutdown(k: kernelproxy.Kernel) -> None:
    pid = k.info.pid
    try:
        k.shutdown()
    finally:
        if not wait_pid_gone(pid, 10):  # never leak a kernel, even if shutdown() is broken
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


# ---------------------------------------------------------------------- kernels started outside kernelproxy


@pytest.fixture
def external_kernel(tmp_path: Path) -> Iterator[ExternalKernel]:
    """A running ipykernel that kernelproxy did not start; killed at teardown whatever happened."""
    kernel = start_external_kernel(tmp_path)
    try:
        yield kernel
    finally:
        stop_external_kernel(kernel)




SERVER_KERNEL_FIXTURES = {"kernel", "fresh_kernel"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the "server" variant only for tests whose kernels come from the fixtures.

    A test that calls start()/connect() itself tests local kernels; running it
    again under the "server" parameter would only repeat its "comm" variant.
    """
    skip = pytest.mark.skip(reason="starts or connects to local kernels itself; the server variant would repeat 'comm'")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("kernel_path") != SERVER_PATH:
            continue
        if not SERVER_KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)
        elif item.get_closest_marker("local_kernel"):
            item.add_marker(pytest.mark.skip(reason=item.get_closest_marker("local_kernel").args[0]))
