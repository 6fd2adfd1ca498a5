"""A client for the REST API that Jupyter Server and the gateways share (``/api/kernels``).

Jupyter Server, Jupyter Kernel Gateway and Enterprise Gateway all start, list,
interrupt, restart and delete kernels through the same endpoints; kernels on
Kubernetes, YARN or other hosts are the gateway's business, not ours. The
token travels in the Authorization header, never in the URL (where it would
end up in proxy logs). HTTP goes through tornado, which jupyter_client and
ipykernel already depend on; the websocket side is in ``_wires/websocket_wire``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Callable, cast

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from ._exceptions import AuthenticationError, ServerError, ServerUnreachableError

DEFAULT_REQUEST_TIMEOUT = 60.0  # seconds for one REST request (starting a kernel on a cluster can take a while)
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to reach the server at all: an unreachable one fails fast
RESTART_RETRY_WINDOW = 15.0  # seconds to keep asking for a restart the server cannot do yet
log = logging.getLogger("kernelproxy")


@dataclass(frozen=True)
class ServerAddress:
    """Where a server is and how to talk to it: base URL, token, TLS settings."""

    url: str  # http(s)://host:port/base_url/ (always ends with '/')
    token: str | None = None
    verify: bool | str = True  # TLS: check the certificate (True), don't (False), or a CA bundle path
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    @classmethod
    def parse(cls, url: str, **options: Any) -> ServerAddress:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            examples = "'https://host:8888' or 'http://127.0.0.1:8888/base/'"
            raise ValueError(f"a server URL looks like {examples}, not {url!r}")
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return cls(urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")), **options)

    def endpoint(self, path: str, *, websocket: bool = False) -> str:
        url = urllib.parse.urljoin(self.url, path.lstrip("/"))
        if websocket:
            url = "ws" + url[len("http") :]  # http→ws, https→wss
        return url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def tls_options(self) -> dict[str, Any]:
        if self.verify is True:
            return {}
        if self.verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return {"ssl_options": context}
        return {"ssl_options": ssl.create_default_context(cafile=self.verify)}


class ServerClient:
    """The kernels REST API of one server."""

    def __init__(self, address: ServerAddress) -> None:
        self.address = address
        self._http = AsyncHTTPClient(force_instance=True)  # our own: no settings shared with the application's

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST call; the decoded JSON reply (None for 204). Raises ServerError and its kinds."""
        url = self.address.endpoint(path)
        request = HTTPRequest(
            url,
            method=method,
            headers={**self.address.headers(), "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
            connect_timeout=self.address.connect_timeout,
            request_timeout=self.address.request_timeout,
            follow_redirects=False,
            **self.address.tls_options(),
        )
        try:
            response = await self._http.fetch(request)
        except HTTPClientError as exc:
            raise _http_error(method, url, exc) from exc
        except ssl.SSLError as exc:
            raise ServerUnreachableError(
                f"TLS with {self.address.url} failed ({exc}); if the server's certificate comes from a private "
                "authority, pass verify='/path/to/its-ca.pem' (or verify=False to skip the check)"
            ) from exc
        except OSError as exc:  # refused, unresolvable, unreachable
            raise ServerUnreachableError(
                f"no Jupyter server answers at {self.address.url} ({type(exc).__name__}: {exc}); "
                "check the URL, that the server runs, and the network between us"
            ) from exc
        return _json(response)

    async def list_kernels(self) -> list[dict[str, Any]]:
        return cast("list[dict[str, Any]]", await self.request("GET", "api/kernels"))

    async def get_kernel(self, kernel_id: str) -> dict[str, Any]:
        return cast("dict[str, Any]", await self.request("GET", f"api/kernels/{_quote(kernel_id)}"))

    async def start_kernel(
        self, name: str | None, env: dict[str, str] | None = None, path: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if path is not None:
            body["path"] = path  # the kernel's working directory, relative to the server's root
        if env:
            body["env"] = env  # gateways pass KERNEL_* variables to the kernel; Jupyter Server ignores this
        try:
            return cast("dict[str, Any]", await self.request("POST", "api/kernels", body))
        except AuthenticationError:
            raise
        except ServerError as exc:
            if name is not None and exc.status is not None and exc.status >= 400:
                await self._check_kernelspec(name)  # Jupyter Server answers an unknown name with a bare 500
            raise

    async def _check_kernelspec(self, name: str) -> None:
        try:
            specs = (await self.request("GET", "api/kernelspecs")).get("kernelspecs", {})
        except (ServerError, AttributeError):
            return
        if name not in specs:
            raise ServerError(
                f"the server has no kernelspec named {name!r}; it has: {', '.join(sorted(specs)) or 'none'}", 404
            )

    async def interrupt_kernel(self, kernel_id: str) -> None:
        await self.request("POST", f"api/kernels/{_quote(kernel_id)}/interrupt")

    async def restart_kernel(self, kernel_id: str) -> None:
        await self.request("POST", f"api/kernels/{_quote(kernel_id)}/restart")

    async def delete_kernel(self, kernel_id: str) -> None:
        try:
            await self.request("DELETE", f"api/kernels/{_quote(kernel_id)}")
        except ServerError as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    def close(self) -> None:
        self._http.close()


class ServerKernelControl:
    """Start-stop control of one kernel on a server, shaped like the parts of jupyter_client's
    KernelManager that kernelproxy uses (interrupt, restart, shutdown), so restarts and
    timeouts work the same as for local kernels."""

    provisioner = None  # no local process to poll: the wire and the server report deaths

    def __init__(self, client: ServerClient, kernel_id: str, *, owned: bool) -> None:
        self.client = client
        self.kernel_id = kernel_id
        self.owned = owned  # started by us: shut down at close

    async def interrupt_kernel(self) -> None:
        await self.client.interrupt_kernel(self.kernel_id)

    async def restart_kernel(self, now: bool = True) -> None:
        await self.wait_settled()
        await _while_busy(lambda: self.client.restart_kernel(self.kernel_id))

    async def wait_settled(self) -> None:
        """Wait (up to RESTART_RETRY_WINDOW) while the server is itself (re)starting the kernel.

        After a kernel dies, the server's restarter starts it again; a restart
        asked for meanwhile races with it and can leave the server's channels
        pointing at the kernel it replaced.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESTART_RETRY_WINDOW
        while loop.time() < deadline:
            model = await self.client.get_kernel(self.kernel_id)
            if model.get("execution_state") not in ("starting", "restarting", "autorestarting"):
                return
            await asyncio.sleep(0.2)

    async def shutdown_kernel(self, now: bool = False) -> None:
        try:
            await _while_busy(lambda: self.client.delete_kernel(self.kernel_id))
        except ServerUnreachableError as exc:  # the server is gone, and its kernels with it (or it will clean up)
            log.warning("could not delete kernel %s on its server: %s", self.kernel_id, exc)

    def close(self) -> None:
        self.client.close()

    def cleanup_connection_file(self) -> None:
        """Nothing local to clean up."""

    def delete_now(self) -> None:
        """Blocking delete at interpreter exit (no event loop left): kernels we started do not outlive us."""
        if not self.owned:
            return
        import urllib.request

        address = self.client.address
        request = urllib.request.Request(
            address.endpoint(f"api/kernels/{_quote(self.kernel_id)}"), method="DELETE", headers=address.headers()
        )
        context = address.tls_options().get("ssl_options")
        try:
            urllib.request.urlopen(request, timeout=5, context=context).close()  # noqa: S310 (http(s) only)
        except OSError:
            pass  # gone already, or the server is: nothing left to do


async def _while_busy(action: Callable[[], Awaitable[None]]) -> None:
    """Run a REST action, again while the server answers 5xx for up to RESTART_RETRY_WINDOW seconds.

    Right after a kernel died, the server's own restarter may be starting it
    again, and Jupyter Server answers restarts and deletes with 500 until then.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESTART_RETRY_WINDOW
    while True:
        try:
            await action()
            return
        except ServerUnreachableError:
            raise
        except ServerError as exc:
            if exc.status is None or exc.status < 500 or loop.time() > deadline:
                raise
        await asyncio.sleep(0.5)


def _quote(kernel_id: str) -> str:
    return urllib.parse.quote(kernel_id, safe="")


def _json(response: HTTPResponse) -> Any:
    if response.code == 204 or not response.body:
        return None
    try:
        return json.loads(response.body)
    except ValueError as exc:
        start = response.body[:200]
        raise ServerError(f"the server's reply to {response.request.url} is not JSON: {start!r}") from exc


def _http_error(method: str, url: str, exc: HTTPClientError) -> ServerError:
    status = exc.code
    if status == 599:  # tornado's code for a connection failure or timeout
        return ServerUnreachableError(
            f"no Jupyter server answered {method} {url} ({exc.message}); "
            "check the URL, that the server runs, and the network between us",
            status,
        )
    detail = _error_detail(exc.response)
    if status in (401, 403):
        return AuthenticationError(
            f"the server at {url.split('/api/')[0]}/ rejected the token (HTTP {status}{detail}): "
            "pass the server's token as token=... (see `jupyter server list` on its machine)",
            status,
        )
    if status == 404 and "/api/kernels/" in url:
        return ServerError(f"no such kernel on the server ({method} {url}: HTTP 404{detail})", status)
    return ServerError(f"the server refused {method} {url}: HTTP {status}{detail}", status)


def _error_detail(response: HTTPResponse | None) -> str:
    if response is None or not response.body:
        return ""
    try:
        body = json.loads(response.body)
        message = body.get("message") or body.get("reason") or ""
    except (ValueError, AttributeError):
        message = response.body[:200].decode("utf-8", "replace")
    return f", {message}" if message else ""
