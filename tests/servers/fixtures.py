"""pytest plugin: session-scoped Enterprise Gateway and JupyterHub servers (registered in tests/conftest.py).

Fixtures:

* ``enterprise_gateway``: a ``ServerProcess`` for Enterprise Gateway 3.x on 127.0.0.1.
  Its kernels are our Python's ipykernel. Start kernels with
  ``env=enterprise_gateway.extra["kernel_env"]`` (a KERNEL_USERNAME that is not root).
* ``jupyterhub``: a ``ServerProcess`` whose ``url`` is the user's single-user server through
  configurable-http-proxy (``http://127.0.0.1:PORT/user/NAME/``) and ``token`` a user API token;
  ``extra["direct_url"]`` is the same server without the proxy.

Both are what ``kernelproxy.connect_server(server.url, token=server.token)`` takes.

Their environments are built before the first test runs (outside the per-test
timeout, both at once), only when a collected test uses one of the fixtures,
and cached (see ``envs``). A missing prerequisite (npm, say) skips the tests
that need it, with the reason; so does ``KERNELPROXY_TEST_SERVERS=off``. A
build or start that fails for another reason is an error: CI must not skip
these silently. At teardown, kernels still on a server fail the session (the
tests leaked them), and the server is stopped with every process it started.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from . import enterprise_gateway as _eg
from . import envs
from . import jupyterhub as _hub
from .process import ServerProcess, stop

MARKER = "servers: uses a server built in its own environment (tests/servers: Enterprise Gateway, JupyterHub)"


@dataclass
class _Build:
    name: str
    build: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    seconds: float = 0.0
    thread: threading.Thread | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.build()
        except BaseException as exc:  # noqa: BLE001 (reported by the fixture that needs it)
            self.error = exc
        finally:
            self.seconds = time.monotonic() - started
            self.done.set()

    def wait(self) -> None:
        if self.thread is None:  # not started by the collection hook (e.g. a fixture reached dynamically)
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()
        self.done.wait()
        if isinstance(self.error, envs.PrerequisiteMissing):
            pytest.skip(f"{self.name}: {self.error}")
        if self.error is not None:
            pytest.fail(f"building {self.name}'s environment failed: {self.error}", pytrace=False)


_BUILDS = {
    "enterprise_gateway": _Build("Enterprise Gateway", _eg.build),
    "jupyterhub": _Build("JupyterHub", _hub.build),
}
_REPORT: list[str] = []


def _disabled() -> bool:
    return os.environ.get("KERNELPROXY_TEST_SERVERS", "").lower() in ("off", "0", "no", "skip")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the environments the collected tests need, in parallel, before any test (and its timeout) starts."""
    if session.config.option.collectonly or _disabled():
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ()) if name in _BUILDS}
    for name in sorted(wanted):
        build = _BUILDS[name]
        build.thread = threading.Thread(target=build.run, name=f"build-{name}", daemon=True)
        build.thread.start()
    for name in sorted(wanted):
        _BUILDS[name].done.wait()


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORT:
        terminalreporter.write_sep("-", "test servers (tests/servers)")
        for line in _REPORT:
            terminalreporter.write_line(line)


def _serve(name: str, start: Callable[[], ServerProcess]) -> Iterator[ServerProcess]:
    if _disabled():
        pytest.skip("KERNELPROXY_TEST_SERVERS=off")
    build = _BUILDS[name]
    build.wait()
    started = time.monotonic()
    server = start()
    took = time.monotonic() - started
    _REPORT.append(
        f"{server.name}: environment ready after {build.seconds:.1f} s, server started in {took:.1f} s "
        f"(first builds in {envs.cache_root()}: {envs.build_times()})"
    )
    try:
        yield server
    finally:
        leftovers = _kernels_on(server)
        killed = stop(server)
        if killed:
            _REPORT.append(f"{server.name}: had to kill pids {killed} after SIGTERM")
        if leftovers:
            pytest.fail(f"kernels left on {server.name} at the end of the session: {leftovers}", pytrace=False)


def _kernels_on(server: ServerProcess) -> list[str]:
    """Ids of the kernels the server still has (the tests should have closed or shut down every one)."""
    request = urllib.request.Request(server.url + "api/kernels", headers={"Authorization": f"token {server.token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return [model["id"] for model in json.loads(response.read())]
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"\ncould not list the kernels on {server.name}: {exc}\n")
        return []


@pytest.fixture(scope="session")
def enterprise_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Enterprise Gateway 3.x on 127.0.0.1 serving our Python's kernels; start them with ``env=extra["kernel_env"]``."""
    yield from _serve("enterprise_gateway", lambda: _eg.start(tmp_path_factory.mktemp("enterprise-gateway")))


@pytest.fixture(scope="session")
def jupyterhub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """JupyterHub + configurable-http-proxy; ``url`` is the user's server through the proxy, ``token`` a user token."""
    yield from _serve("jupyterhub", lambda: _hub.start(tmp_path_factory.mktemp("jupyterhub")))
