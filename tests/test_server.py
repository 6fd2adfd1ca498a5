"""Kernels of a real Jupyter Server, over its REST + websocket API.

The behaviour suite runs against server kernels through the "server" variant
of the kernel fixtures (conftest.KERNEL_PATHS); this module covers what only a
server has: its REST verbs, authentication, an unreachable server, the
websocket message limit, its IOPub throttling, both websocket protocols,
reconnecting, kernels attached by id, and pools of server kernels.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import helpers
import numpy as np
import pytest
from helpers import every_verb, free_port, start_jupyter_server, start_kernel_gateway, stop_jupyter_server
from jupyter_core.paths import jupyter_runtime_dir

import kernelproxy
from kernelproxy._server import ServerAddress, ServerClient

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(helpers)  # every_verb's lambdas go to the kernels

FAST = 10.0  # seconds: errors about the server come sooner than this


def server_kernel_ids(server) -> set[str]:
    import asyncio

    async def ids() -> set[str]:
        client = ServerClient(ServerAddress.parse(server.url, token=server.token))
        try:
            return {model["id"] for model in await client.list_kernels()}
        finally:
            client.close()

    return asyncio.run(ids())


@pytest.fixture
def server_kernel(jupyter_server):
    k = kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token)
    try:
        yield k
    finally:
        k.shutdown()


# ---------------------------------------------------------------------- REST: start, attach, delete


def test_started_kernel_is_deleted_on_close(jupyter_server):
    with kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token) as k:
        kernel_id = k.info.kernel_id
        assert kernel_id in server_kernel_ids(jupyter_server)
        assert k.call(pow, 3, 4) == 81
        assert k.info.server == jupyter_server.url
    assert kernel_id not in server_kernel_ids(jupyter_server)


def test_attach_by_id_leaves_the_kernel_running(jupyter_server, server_kernel):
    server_kernel.push(shared=41)
    with kernelproxy.connect_server(
        jupyter_server.url, token=jupyter_server.token, kernel_id=server_kernel.info.kernel_id
    ) as other:
        assert other.eval("shared + 1") == 42
        assert other.info.pid == server_kernel.info.pid
    assert server_kernel.info.kernel_id in server_kernel_ids(jupyter_server)
    assert server_kernel.eval("shared") == 41


def test_shutdown_of_an_attached_kernel_deletes_it(jupyter_server):
    owner = kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token)
    kernel_id = owner.info.kernel_id
    try:
        attached = kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, kernel_id=kernel_id)
        attached.shutdown()
        assert kernel_id not in server_kernel_ids(jupyter_server)
    finally:
        owner.close()


def test_interrupt_through_the_server(server_kernel):
    future = server_kernel.submit(time.sleep, 30)
    time.sleep(1.0)
    started = time.monotonic()
    server_kernel.interrupt()
    with pytest.raises(kernelproxy.CallInterrupted):
        future.result(FAST)
    assert time.monotonic() - started < FAST
    assert server_kernel.call(lambda: "usable") == "usable"


def test_timeout_interrupts_through_the_server(server_kernel):
    with pytest.raises(kernelproxy.CallTimeout):
        server_kernel.options(timeout=1).call(time.sleep, 30)
    assert server_kernel.call(lambda: "usable") == "usable"


def test_restart_through_the_server(server_kernel, jupyter_server):
    server_kernel.push(x=1)
    ref = server_kernel.ref("x")
    pid = server_kernel.info.pid
    server_kernel.restart()
    assert server_kernel.contains("x") is False
    assert server_kernel.call(lambda: 5) == 5
    with pytest.raises(kernelproxy.StaleRefError):
        ref.get()
    assert server_kernel.info.kernel_id in server_kernel_ids(jupyter_server)  # the same kernel, restarted
    assert server_kernel.call(os.getpid) != pid, "restart() through the server started a new kernel process"


def test_unknown_kernel_id_is_a_clear_error(jupyter_server):
    with pytest.raises(kernelproxy.ServerError, match="no such kernel") as info:
        kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, kernel_id="not-a-kernel")
    assert info.value.status == 404


def test_unknown_kernel_name_is_a_clear_error(jupyter_server):
    with pytest.raises(kernelproxy.ServerError, match="no kernelspec named 'no-such-kernelspec'; it has: .*python3"):
        kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, kernel_name="no-such-kernelspec")


# ---------------------------------------------------------------------- authentication and reachability


def test_wrong_token_is_an_authentication_error(jupyter_server):
    started = time.monotonic()
    with pytest.raises(kernelproxy.AuthenticationError, match="rejected the token") as info:
        kernelproxy.connect_server(jupyter_server.url, token="wrong")
    assert info.value.status in (401, 403)
    assert time.monotonic() - started < FAST


def test_missing_token_is_an_authentication_error(jupyter_server, monkeypatch):
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    with pytest.raises(kernelproxy.AuthenticationError):
        kernelproxy.connect_server(jupyter_server.url)


def test_token_from_the_environment(jupyter_server, monkeypatch):
    monkeypatch.setenv("JUPYTER_TOKEN", jupyter_server.token)
    with kernelproxy.connect_server(jupyter_server.url) as k:
        assert k.call(lambda: 1) == 1


def test_the_url_a_server_prints_works_as_it_is(jupyter_server, monkeypatch):
    """Users paste what the server printed or the browser shows: a frontend page with ?token=... ."""
    monkeypatch.setenv("JUPYTER_TOKEN", "not-this-one")  # the URL's token comes first
    for page in (f"lab?token={jupyter_server.token}", f"tree/some/dir?token={jupyter_server.token}"):
        with kernelproxy.connect_server(jupyter_server.url + page) as k:
            assert k.call(lambda: 7) == 7
    with pytest.raises(ValueError, match="token= differ"):
        kernelproxy.connect_server(jupyter_server.url + "?token=one", token="two")


def test_server_address_from_a_pasted_url():
    """Pure: the token, the base URL as given, and the bases above its frontend pages, nearest first."""
    address = ServerAddress.parse("https://hub.example/user/lab/lab/tree/x.ipynb?token=abc")
    assert address.token == "abc"
    assert address.url == "https://hub.example/user/lab/lab/tree/x.ipynb/"  # tried first: it may be a base URL
    assert address.fallbacks == (
        "https://hub.example/user/lab/lab/",  # a user named "lab" keeps their base URL
        "https://hub.example/user/lab/",
        "https://hub.example/user/",
    )
    assert ServerAddress.parse("http://127.0.0.1:8888/lab?token=t").fallbacks == ("http://127.0.0.1:8888/",)
    plain = ServerAddress.parse("http://127.0.0.1:8888/base", token="x")
    assert (plain.url, plain.token, plain.fallbacks) == ("http://127.0.0.1:8888/base/", "x", ())
    assert "token" not in ServerAddress.parse("http://h:1/lab?token=secret").url  # never in a request URL


def test_server_down_is_a_quick_connection_error():
    url = f"http://127.0.0.1:{free_port()}/"
    started = time.monotonic()
    with pytest.raises(kernelproxy.ServerUnreachableError, match="no Jupyter server answers") as info:
        kernelproxy.connect_server(url, token="x")
    assert isinstance(info.value, ConnectionError)
    assert time.monotonic() - started < FAST


def test_bad_url_is_a_value_error():
    with pytest.raises(ValueError, match="server URL"):
        kernelproxy.connect_server("127.0.0.1:8888")


# ---------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A jupyter server on https://127.0.0.1 with a certificate from a throwaway CA (trustme)."""
    trustme = pytest.importorskip("trustme")
    directory = tmp_path_factory.mktemp("tls-server")
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(directory / "ca.pem"))
    certificate = directory / "server.pem"
    authority.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(certificate))
    tls = (f"--ServerApp.certfile={certificate}", f"--ServerApp.keyfile={certificate}")
    server = start_jupyter_server(directory, *tls, tls_ca=directory / "ca.pem")
    try:
        yield server, directory / "ca.pem"
    finally:
        stop_jupyter_server(server)


def test_tls_with_the_servers_ca(tls_server):
    server, ca = tls_server
    assert server.url.startswith("https://")
    with kernelproxy.connect_server(server.url, token=server.token, verify=str(ca)) as k:
        assert "websocket" in k.info.transport
        assert k.call(pow, 2, 8) == 256
        array = np.arange(2 * 2**20, dtype=np.float64)  # 16 MB: parts over wss
        k.push(big=array)
        assert np.array_equal(k.pull("big"), array)


def test_tls_certificate_not_trusted_is_a_clear_error(tls_server):
    server, _ = tls_server
    started = time.monotonic()
    with pytest.raises(kernelproxy.ServerUnreachableError, match="CERTIFICATE_VERIFY_FAILED.*verify="):
        kernelproxy.connect_server(server.url, token=server.token)
    assert time.monotonic() - started < FAST


def test_tls_verify_false_skips_the_check(tls_server):
    server, _ = tls_server
    with kernelproxy.connect_server(server.url, token=server.token, verify=False) as k:
        assert k.call(lambda: "unverified but encrypted") == "unverified but encrypted"


# ---------------------------------------------------------------------- payloads and output


@pytest.mark.parametrize("protocol", ["v1.kernel.websocket.jupyter.org", None], ids=["v1", "default"])
@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_payload_larger_than_the_websocket_limit(jupyter_server, protocol, transport):
    """40 MB each way through a default-configured server (10 MiB per websocket message)."""
    with kernelproxy.connect_server(
        jupyter_server.url, token=jupyter_server.token, websocket_protocol=protocol, transport=transport
    ) as k:
        assert (protocol or "default protocol") in k.info.transport
        array = np.random.default_rng(1).random(5 * 2**20)  # 40 MB
        k.push(big=array)
        assert k.eval("float(big.sum())") == pytest.approx(float(array.sum()))
        back = k.pull("big")
        assert np.array_equal(back, array) and back.flags.writeable
        assert k.call(lambda b: b.nbytes, array) == array.nbytes  # an argument in parts too
        k.delete("big")


def test_heavy_printing_is_throttled_visibly_not_silently(server_kernel, capfd):
    """The server drops IOPub output above 1 MB/s and says so on stderr; the call's result still arrives."""

    def shout() -> int:
        line = "x" * 1000
        for _ in range(6000):  # 6 MB at once: over the server's data rate limit
            print(line)
        return 7

    assert server_kernel.call(shout) == 7
    out, err = capfd.readouterr()
    assert "IOPub data rate exceeded" in err
    assert server_kernel.call(lambda: 8) == 8


def test_many_small_calls_beyond_the_iopub_message_rate(server_kernel):
    """Replies travel on shell, which the server does not throttle: 3,000 quick calls all come back."""
    futures = [server_kernel.options(output="discard").submit(pow, i, 2) for i in range(3000)]
    assert [f.result(120) for f in futures] == [i * i for i in range(3000)]


# ---------------------------------------------------------------------- deaths and reconnects


def test_killed_kernel_is_reported_promptly(jupyter_server):
    k = kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token)
    try:
        future = k.submit(time.sleep, 60)
        time.sleep(0.5)
        started = time.monotonic()
        os.kill(k.info.pid, signal.SIGKILL)
        with pytest.raises(kernelproxy.KernelDiedError):
            future.result(30)
        assert time.monotonic() - started < FAST
        k.restart()
        assert k.call(lambda: "fresh") == "fresh"
    finally:
        k.shutdown()


def test_dropped_websocket_is_reopened(server_kernel):
    """Closing the websocket under a running call: the wire reopens it and the call completes."""
    wire = server_kernel.aio._state.connection.wire
    future = server_kernel.submit(lambda: (__import__("time").sleep(2), "done")[1])
    time.sleep(0.5)
    server_kernel._portal.loop.call_soon_threadsafe(wire._conn.close)
    assert future.result(30) == "done"
    assert server_kernel.call(pow, 2, 5) == 32


def test_server_gone_fails_calls_promptly(tmp_path):
    server = start_jupyter_server(tmp_path)
    try:
        k = kernelproxy.connect_server(server.url, token=server.token)
        future = k.submit(time.sleep, 60)
        time.sleep(0.5)
        started = time.monotonic()
        server.process.kill()
        server.process.wait()
        with pytest.raises((kernelproxy.KernelDiedError, kernelproxy.ServerError)):
            future.result(60)
        assert time.monotonic() - started < 30
        k.close()
        # what the killed server could not remove stays in the test's directory, not in the user's runtime dir
        assert (tmp_path / "jupyter-runtime" / f"jpserver-{server.process.pid}.json").exists()
        assert not (Path(jupyter_runtime_dir()) / f"jpserver-{server.process.pid}.json").exists()
    finally:
        stop_jupyter_server(server)
        # The server was killed: its kernel is an orphan now; kill it too.
        try:
            os.kill(k.info.pid, signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass


# ---------------------------------------------------------------------- pools


def test_pool_from_server(jupyter_server):
    before = server_kernel_ids(jupyter_server)
    with kernelproxy.KernelPool.from_server(jupyter_server.url, 2, token=jupyter_server.token) as pool:
        deadline = time.monotonic() + 60
        while len(pool.kernels) < 2:  # the first kernel ready starts the pool; the other joins when ready
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pids = {k.info.pid for k in pool.kernels}
        assert len(pids) == 2
        assert sorted(pool.map(pow, range(20), [2] * 20)) == sorted(i * i for i in range(20))
        assert len(server_kernel_ids(jupyter_server) - before) == 2
    assert server_kernel_ids(jupyter_server) == before


def test_pool_from_server_replaces_a_dead_kernel(jupyter_server):
    with kernelproxy.KernelPool.from_server(jupyter_server.url, 2, token=jupyter_server.token) as pool:
        victim = pool.kernels[0].info.pid
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = {k.info.pid for k in pool.kernels}
            if victim not in pids and len(pids) == 2:
                break
            time.sleep(0.2)
        assert victim not in {k.info.pid for k in pool.kernels}
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]


# ---------------------------------------------------------------------- Jupyter Kernel Gateway


@pytest.fixture(scope="module")
def kernel_gateway(tmp_path_factory):
    pytest.importorskip("kernel_gateway", reason="jupyter_kernel_gateway is not installed")
    gateway = start_kernel_gateway(tmp_path_factory.mktemp("kernel-gateway"))
    try:
        yield gateway
    finally:
        stop_jupyter_server(gateway)


def test_kernel_gateway_every_verb(kernel_gateway, capfd):
    with kernelproxy.connect_server(kernel_gateway.url, token=kernel_gateway.token) as k:
        every_verb(k, capfd)
        kernel_id = k.info.kernel_id
    with pytest.raises(kernelproxy.ServerError, match="no such kernel"):
        kernelproxy.connect_server(kernel_gateway.url, token=kernel_gateway.token, kernel_id=kernel_id)


def test_kernel_gateway_wrong_token(kernel_gateway):
    with pytest.raises(kernelproxy.AuthenticationError):
        kernelproxy.connect_server(kernel_gateway.url, token="wrong")


def test_the_example_runs_against_a_server(jupyter_server):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "jupyter_server.py")
    result = subprocess.run(
        [sys.executable, example, jupyter_server.url, "--token", jupyter_server.token],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "this line was printed by the kernel" in result.stdout
    assert "squares from two server kernels: [0, 1, 4, 9, 16, 25, 36, 49]" in result.stdout


def test_cwd_is_relative_to_the_servers_root(jupyter_server):
    root = jupyter_server.log.parent  # the session server's root directory
    (root / "project").mkdir(exist_ok=True)
    with kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token, cwd="project") as k:
        assert os.path.samefile(k.call(os.getcwd), root / "project")


def test_server_pool_requeues_a_task_sent_to_a_kernel_that_died_idle(kernel_gateway):
    """A task that never started is never failed for its kernel's death, even with retries=0 (issue 13)."""
    with kernelproxy.KernelPool.from_server(kernel_gateway.url, 2, token=kernel_gateway.token, retries=0) as pool:
        os.kill(pool.kernels[0].info.pid, signal.SIGKILL)  # idle: the pool has not noticed yet
        futures = [pool.submit(pow, i, 2) for i in range(6)]
        assert [f.result(120) for f in futures] == [i * i for i in range(6)]


def test_server_pool_works_as_its_kernels_become_ready(jupyter_server, monkeypatch):
    """On a cluster kernel starts take minutes: the pool starts working with the first one ready (issue 13)."""
    import asyncio

    from kernelproxy._pool import _supervisor

    original = _supervisor.connect_server_async
    starts = []

    async def one_slow_start(**options):
        starts.append(len(starts))
        if len(starts) == 2:
            await asyncio.sleep(6)  # this one is slow to start on the "cluster"
        return await original(**options)

    monkeypatch.setattr(_supervisor, "connect_server_async", one_slow_start)
    started = time.monotonic()
    with kernelproxy.KernelPool.from_server(jupyter_server.url, 2, token=jupyter_server.token) as pool:
        assert time.monotonic() - started < 6
        assert len(pool.kernels) == 1
        pool.push(weight=3)
        assert pool.submit(lambda x: x * __import__("__main__").weight, 2).result(30) == 6
        deadline = time.monotonic() + 60
        while len(pool.kernels) < 2:
            assert time.monotonic() < deadline, "the slow kernel never joined"
            time.sleep(0.1)
        late = pool.kernels[1]
        assert late.eval("weight") == 3  # it got every push before its first task
        assert sorted(pool.map(abs, [-1, -2, -3, -4])) == [1, 2, 3, 4]


# ---------------------------------------------------------------------- what servers say (issue 13, section 5)


def test_kernel_gateway_kernels_keep_their_environment(kernel_gateway):
    """Kernel Gateway gives a kernel only PATH and the requested variables when a start names any: none unasked."""
    with kernelproxy.connect_server(kernel_gateway.url, token=kernel_gateway.token) as k:
        assert k.call(lambda: "HOME" in __import__("os").environ) is True


def http_error(status: int, body: bytes, content_type: str = "text/html"):
    from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
    from tornado.httputil import HTTPHeaders

    request = HTTPRequest("http://server.example/api/kernels")
    headers = HTTPHeaders({"Content-Type": content_type})
    response = HTTPResponse(request, status, headers=headers, buffer=io.BytesIO(body))
    return HTTPClientError(status, response=response)


JUPYTERHUB_PAGE = (
    b"<!DOCTYPE HTML>\n<html><head><title>JupyterHub</title><script>var x = '<h1>not this</h1>';</script></head>"
    b"<body><nav>Home Token Admin</nav><div class='error'><h1>424 : Failed Dependency</h1>\n"
    b"<p>JupyterHub server no longer running at /user/u/api/kernels. Restart the server at "
    b"<a href='/hub/spawn/u'>/hub/spawn/u</a></p></div>" + b"<p>filler</p>" * 500 + b"</body></html>"
)


def test_html_error_pages_become_one_short_line():
    from kernelproxy._server import _http_error

    error = _http_error("POST", "http://server.example/api/kernels", http_error(424, JUPYTERHUB_PAGE))
    text = str(error)
    assert "424 : Failed Dependency: JupyterHub server no longer running at /user/u/api/kernels" in text
    assert "<" not in text and "filler" not in text and len(text) < 500
    bare = _http_error("GET", "http://server.example/api", http_error(502, b"<html><title>502: Bad Gateway</title>"))
    assert "502: Bad Gateway" in str(bare) and "<" not in str(bare)
    plain = _http_error("GET", "http://server.example/api", http_error(500, b"x" * 5000, "text/plain"))
    assert len(str(plain)) < 450


def test_a_403_is_a_wrong_token_only_if_the_token_is_refused_everywhere():
    """Servers answer 403 for other refusals too (a gateway's user check): a probe tells them apart."""
    import http.server

    class Gateway(http.server.BaseHTTPRequestHandler):
        def reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            good = self.headers.get("Authorization") == "token good"
            self.reply(200 if good else 403, b"{}" if good else b'{"reason": "Forbidden"}')

        def do_POST(self):  # noqa: N802
            self.reply(403, b'{"reason": "User \'root\' is not authorized. Ensure KERNEL_USERNAME is set"}')

        def log_message(self, *args):
            pass

    with serving(Gateway) as url:
        with pytest.raises(kernelproxy.ServerError, match="not authorized.*KERNEL_USERNAME") as info:
            kernelproxy.connect_server(url, token="good")
        assert info.value.status == 403 and not isinstance(info.value, kernelproxy.AuthenticationError)
        with pytest.raises(kernelproxy.AuthenticationError, match="rejected the token"):
            kernelproxy.connect_server(url, token="wrong")


@contextlib.contextmanager
def serving(handler) -> Iterator[str]:
    """A tiny HTTP server on 127.0.0.1 in a thread; yields its URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_https_to_a_plain_http_server_says_so_promptly(jupyter_server):
    """https:// to a plain-HTTP server: 'is it an http:// server?', promptly; not advice about certificates,
    nor 'the server did not start the kernel within startup_timeout'."""
    import http.server

    class PlainServer(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    with serving(PlainServer) as url:  # answers the TLS hello with a plain-text 400
        with pytest.raises(kernelproxy.ServerUnreachableError, match=r"plain text.*is it an http:// server\?"):
            kernelproxy.connect_server(url.replace("http://", "https://"), token="t", connect_timeout=1)
    # Jupyter Server (tornado) waits for a request line that never comes: the handshake times out
    started = time.monotonic()
    with pytest.raises(kernelproxy.ServerUnreachableError, match=r"TLS handshake.*is it an http:// server\?"):
        kernelproxy.connect_server(jupyter_server.url.replace("http://", "https://"), token="t", connect_timeout=2)
    assert time.monotonic() - started < 3.9  # one attempt (2 s), not one per request


def test_kernel_start_takes_as_long_as_startup_timeout(tmp_path):
    """The REST call that starts a kernel follows startup_timeout (minutes on a cluster), not a fixed 60 s."""
    import http.server

    class SlowServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_POST(self):  # noqa: N802
            time.sleep(4)  # a kernel start on a busy cluster
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    with serving(SlowServer) as url:
        started = time.monotonic()
        with pytest.raises(kernelproxy.KernelStartError, match="within 1 s .*raise startup_timeout"):
            kernelproxy.connect_server(url, token="t", startup_timeout=1)
        assert time.monotonic() - started < 3.5
        started = time.monotonic()
        with pytest.raises(kernelproxy.ServerError) as info:
            kernelproxy.connect_server(url, token="t", startup_timeout=10)
        assert info.value.status == 500  # it waited for the slow answer
        assert time.monotonic() - started >= 4
