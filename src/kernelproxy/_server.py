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
import getpass
import html
import ipaddress
import json
import logging
import os
import re
import ssl
import urllib.parse
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any, Callable, cast

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from ._exceptions import AuthenticationError, KernelStartError, ServerError, ServerUnreachableError

DEFAULT_REQUEST_TIMEOUT = 60.0  # seconds for one REST request; starting and restarting kernels take startup_timeout
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to reach the server at all: an unreachable one fails fast
RESTART_RETRY_WINDOW = 15.0  # seconds to keep asking for a restart the server cannot do yet
# Pages of Jupyter's frontends under a server's base URL: the URL a server prints at start (".../lab?token=...")
# and the browser's address bar are pages, not the base URL the REST API lives under.
FRONTEND_PAGES = frozenset({"lab", "tree", "notebooks", "doc", "edit", "voila"})
log = logging.getLogger("kernelproxy")


@dataclass(frozen=True)
class ServerAddress:
    """Where a server is and how to talk to it: base URL, token, TLS settings."""

    url: str  # http(s)://host:port/base_url/ (always ends with '/')
    token: str | None = None
    verify: bool | str = True  # TLS: check the certificate (True), don't (False), or a CA bundle path
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    # Base URLs to try, nearest first, if ``url`` is no server's (it named a frontend page: ".../lab/tree/x")
    fallbacks: tuple[str, ...] = ()

    @classmethod
    def parse(cls, url: str, *, token: str | None = None, **options: Any) -> ServerAddress:
        """A server's address from a URL as users have it: a base URL, or a page of it with ``?token=...``.

        The token: ``token``, else the URL's ``token`` parameter, else $JUPYTER_TOKEN.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            examples = "'https://host:8888' or 'http://127.0.0.1:8888/base/'"
            raise ValueError(f"a server URL looks like {examples}, not {url!r}")
        in_url = urllib.parse.parse_qs(parts.query).get("token", [None])[-1]
        if token is not None and in_url is not None and token != in_url:
            raise ValueError("the URL's ?token=... and token= differ: pass one of them")
        token = token if token is not None else in_url if in_url is not None else os.environ.get("JUPYTER_TOKEN")
        segments = [segment for segment in parts.path.split("/") if segment]
        bases = ["/" + "".join(f"{segment}/" for segment in segments[:end]) for end in range(len(segments), -1, -1)]
        pages = [index for index, segment in enumerate(segments) if segment in FRONTEND_PAGES]
        fallbacks = tuple(
            urllib.parse.urlunsplit((parts.scheme, parts.netloc, bases[len(segments) - index], "", ""))
            for index in reversed(pages)
        )
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, bases[0], "", ""))
        return cls(base, token=token or None, fallbacks=fallbacks, **options)

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


_warned_cleartext: set[str] = set()


def warn_if_cleartext(address: ServerAddress) -> None:
    """Warn, once per host, about plain http to another machine: token and pickles travel in clear."""
    parts = urllib.parse.urlsplit(address.url)
    host = parts.hostname or ""
    if parts.scheme != "http" or _is_loopback(host) or host in _warned_cleartext:
        return
    _warned_cleartext.add(host)
    warnings.warn(
        f"{address.url} is plain http to another machine: the token and every pickle travel in clear, and "
        "anyone on the network path can read them or inject a reply that this process unpickles (running "
        "their code here). Use https:// (or an SSH tunnel to a loopback address).",
        UserWarning,
        stacklevel=4,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: not resolved here (it may not be loopback)


class ServerClient:
    """The kernels REST API of one server."""

    def __init__(self, address: ServerAddress) -> None:
        self.address = address
        self._http = AsyncHTTPClient(force_instance=True)  # our own: no settings shared with the application's
        self._version: dict[str, Any] | None = None  # GET api, once: which kind of server this is

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        check_token: bool = True,
    ) -> Any:
        """One REST call; the decoded JSON reply (None for 204). Raises ServerError and its kinds.

        ``timeout`` replaces the address's request timeout (kernel starts on a
        cluster take minutes). A 401 is an AuthenticationError; a 403 only if the
        token does not work for ``GET api/kernelspecs`` either (``check_token``):
        servers also answer 403 for refusals that have nothing to do with the
        token (Enterprise Gateway's KERNEL_USERNAME check, JupyterHub's page for a
        stopped user server), and then their own words are the error.
        """
        try:
            return await self._fetch(method, self.address.endpoint(path), body, timeout, check_token=check_token)
        except ServerError as exc:
            if exc.status != 404 or not await self._moved_to_server_base():
                raise
        return await self._fetch(method, self.address.endpoint(path), body, timeout, check_token=check_token)

    async def _moved_to_server_base(self) -> bool:
        """Whether the address moved to a base URL above the one given, which named a frontend's page
        (".../lab?token=..."); asked once, when the first 404 comes and the URL given is no server's."""
        fallbacks = self.address.fallbacks
        self.address = replace(self.address, fallbacks=())
        if not fallbacks or await self._is_server(self.address.url):
            return False
        for base in fallbacks:
            if await self._is_server(base):
                log.debug("%s is a page of a Jupyter frontend: using the server's base URL %s", self.address.url, base)
                self.address = replace(self.address, url=base)
                return True
        return False

    async def _is_server(self, base: str) -> bool:
        """Whether ``base`` is a Jupyter server's base URL: ``GET api`` there answers with a version."""
        request = HTTPRequest(
            base + "api",
            headers=self.address.headers(),
            connect_timeout=self.address.connect_timeout,
            request_timeout=self.address.connect_timeout,
            follow_redirects=False,
            **self.address.tls_options(),
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
            return response.code == 200 and "version" in json.loads(response.body)
        except (OSError, HTTPClientError, ValueError, TypeError):  # unreachable or timed out, not JSON nor a dict
            return False

    async def _fetch(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        timeout: float | None,
        *,
        check_token: bool,
        redirects: int = 0,
    ) -> Any:
        request = HTTPRequest(
            url,
            method=method,
            headers={**self.address.headers(), "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
            connect_timeout=self.address.connect_timeout,
            request_timeout=timeout if timeout is not None else self.address.request_timeout,
            follow_redirects=False,
            **self.address.tls_options(),
        )
        try:
            response = await self._http.fetch(request)
        except HTTPClientError as exc:
            target = _redirect_on_same_server(url, exc)
            if target is not None and method == "GET" and not check_token and redirects < 3:
                # Only the 403 probe follows redirects, and only on the same server (the token goes along):
                # JupyterHub sends /user/NAME/... of a stopped server to /hub/user/NAME/..., which says so.
                return await self._fetch("GET", target, None, timeout, check_token=False, redirects=redirects + 1)
            error = _http_error(method, url, exc, token_rejected=exc.code == 403 and not check_token)
            if exc.code == 403 and check_token:
                error = await self._why_forbidden(error)
            raise error from exc
        except ssl.SSLError as exc:
            if exc.reason == "WRONG_VERSION_NUMBER":  # what came back was no TLS: a plain-HTTP server's answer
                raise ServerUnreachableError(
                    f"TLS with {self.address.url} failed ({exc}): the server answered in plain text, so it does not "
                    "speak TLS; is it an http:// server?"
                ) from exc
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

    async def _why_forbidden(self, error: ServerError) -> ServerError:
        """What a 403 means: the token is refused only if ``GET api/kernelspecs`` is refused too.

        Every server has that endpoint and asks for the token there. Whatever
        else the probe hears says more than the 403 did (JupyterHub answers a
        POST to a stopped user server with an XSRF page, a GET with 424 "server
        no longer running"); a token that works leaves the 403's own message.
        """
        try:
            await self.request("GET", "api/kernelspecs", check_token=False)
        except ServerError as probe:  # AuthenticationError included
            return probe
        return error

    async def is_enterprise_gateway(self) -> bool:
        """Enterprise Gateway says so in ``GET api`` (``gateway_version``); asked once per client."""
        if self._version is None:
            try:
                answer = await self.request("GET", "api")
            except ServerUnreachableError:
                raise  # not reached at all: the next request would wait as long again
            except ServerError:
                answer = None
            self._version = answer if isinstance(answer, dict) else {}
        return "gateway_version" in self._version

    async def list_kernels(self) -> list[dict[str, Any]]:
        return cast("list[dict[str, Any]]", await self.request("GET", "api/kernels"))

    async def get_kernel(self, kernel_id: str) -> dict[str, Any]:
        return cast("dict[str, Any]", await self.request("GET", f"api/kernels/{_quote(kernel_id)}"))

    async def start_kernel(
        self,
        name: str | None,
        env: dict[str, str] | None = None,
        path: str | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Start a kernel; ``timeout`` (seconds) is how long the server may take (a cluster: minutes)."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if path is not None:
            body["path"] = path  # the kernel's working directory, relative to the server's root
        env = await self._kernel_env(env, path, timeout)
        if env:
            body["env"] = env  # gateways pass KERNEL_* variables to the kernel; Jupyter Server ignores this
        try:
            return cast("dict[str, Any]", await self.request("POST", "api/kernels", body, timeout=timeout))
        except AuthenticationError:
            raise
        except ServerUnreachableError as exc:
            if timeout is None or not _request_timed_out(exc):  # not reaching the server is no slow kernel start
                raise
            raise KernelStartError(
                f"the server did not start the kernel within {timeout} s (startup_timeout): kernels on a cluster "
                "can take minutes to start, raise startup_timeout"
            ) from exc
        except ServerError as exc:
            if name is not None and exc.status is not None and exc.status >= 400:
                await self._check_kernelspec(name)  # Jupyter Server answers an unknown name with a bare 500
            raise

    async def _kernel_env(
        self, env: dict[str, str] | None, path: str | None, timeout: float | None
    ) -> dict[str, str] | None:
        """The start request's ``env`` field.

        To Enterprise Gateway, what jupyter_server's own gateway client sends
        (``GatewayKernelManager.start_kernel``): this process's ``KERNEL_*``
        variables, then the caller's ``env``; plus ``KERNEL_USERNAME`` (from those,
        else the login name: the gateway refuses kernels for requests naming no
        user, when it runs as root), ``KERNEL_LAUNCH_TIMEOUT`` (the start timeout)
        and ``KERNEL_WORKING_DIR`` (``cwd``). To other servers only the caller's
        ``env``: Kernel Gateway gives a kernel just PATH and the requested
        variables when a request has an ``env`` field, instead of its whole
        environment (no HOME, no LANG), so nothing is sent there unasked.
        """
        if not await self.is_enterprise_gateway():
            return env or None
        merged = {key: value for key, value in os.environ.items() if key.startswith("KERNEL_")}
        merged.update(env or {})
        merged.setdefault("KERNEL_USERNAME", _login_name())
        if timeout is not None:
            merged.setdefault("KERNEL_LAUNCH_TIMEOUT", str(int(timeout)))
        if path is not None:
            merged.setdefault("KERNEL_WORKING_DIR", path)
        return merged

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

    async def restart_kernel(self, kernel_id: str, *, timeout: float | None = None) -> None:
        await self.request("POST", f"api/kernels/{_quote(kernel_id)}/restart", timeout=timeout)

    async def delete_kernel(self, kernel_id: str) -> None:
        try:
            await self.request("DELETE", f"api/kernels/{_quote(kernel_id)}")
        except ServerError as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True)
class StartSpec:
    """How a kernel was started on a server: what starts it again when the server lost it."""

    name: str | None
    env: dict[str, str] | None
    path: str | None


class ServerKernelControl:
    """Start-stop control of one kernel on a server, shaped like the parts of jupyter_client's
    KernelManager that kernelproxy uses (interrupt, restart, shutdown), so restarts and
    timeouts work the same as for local kernels."""

    provisioner = None  # no local process to poll: the wire and the server report deaths

    def __init__(
        self,
        client: ServerClient,
        kernel_id: str,
        *,
        owned: bool,
        start: StartSpec | None = None,
        timeout: float | None = None,
    ) -> None:
        self.client = client
        self.kernel_id = kernel_id
        self.owned = owned  # started by us: shut down at close
        self.start = start  # how it was started (kernels we started): a kernel deleted on the server starts again
        self.timeout = timeout  # seconds a (re)start may take on the server
        self.replaced = 0  # how many times a kernel gone from the server was started again

    async def interrupt_kernel(self) -> None:
        await self.client.interrupt_kernel(self.kernel_id)

    async def restart_kernel(self, now: bool = True) -> None:
        """Restart the kernel on its server; one we started that the server no longer has starts again there."""
        try:
            await self.wait_settled()
            await _while_busy(lambda: self.client.restart_kernel(self.kernel_id, timeout=self.timeout))
        except ServerError as exc:
            if exc.status != 404 or isinstance(exc, AuthenticationError):
                raise
            if self.start is None:
                raise ServerError(
                    f"kernel {self.kernel_id} no longer exists on {self.client.address.url} (culled or shut down "
                    "there); it was attached by kernel_id, so kernelproxy cannot start it again: connect to another",
                    404,
                ) from None
            model = await self.client.start_kernel(
                self.start.name, self.start.env, self.start.path, timeout=self.timeout
            )
            log.info("kernel %s was gone from the server; started %s in its place", self.kernel_id, model["id"])
            self.kernel_id = model["id"]
            self.replaced += 1

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
        text = " ".join(_text_of(response.body.decode("utf-8", "replace")).split())[:MAX_DETAIL]
        raise ServerError(
            f"the server's reply to {response.request.url} is not JSON ({text!r}): is this the server's base URL?"
        ) from exc


def _redirect_on_same_server(url: str, exc: HTTPClientError) -> str | None:
    """Where a redirect answer points, if it stays on the same scheme, host and port."""
    if exc.code not in (301, 302, 303, 307, 308) or exc.response is None:
        return None
    location = exc.response.headers.get("Location")
    if not location:
        return None
    target = urllib.parse.urljoin(url, location)
    same = urllib.parse.urlsplit(target)[:2] == urllib.parse.urlsplit(url)[:2]
    return target if same else None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container's arbitrary user)
        return str(os.getuid()) if hasattr(os, "getuid") else "kernelproxy"


def _http_error(method: str, url: str, exc: HTTPClientError, *, token_rejected: bool = False) -> ServerError:
    status = exc.code
    if status == 599:  # tornado's code for a connection failure or timeout
        hint = "check the URL, that the server runs, and the network between us"
        if "TLS handshake" in str(exc.message):  # a plain-HTTP server waits for a request line that never comes
            hint = f"is it an http:// server? One that does not speak TLS never answers the handshake. Else {hint}"
        return ServerUnreachableError(f"no Jupyter server answered {method} {url} ({exc.message}); {hint}", status)
    detail = _error_detail(exc.response)
    if status == 401 or token_rejected:
        return AuthenticationError(
            f"the server at {url.split('/api/')[0]}/ rejected the token (HTTP {status}{detail}): "
            "pass the server's token as token=... or in the URL, ?token=... "
            "(`jupyter server list` on its machine shows it)",
            status,
        )
    if status == 403 and "KERNEL_USERNAME" in detail:
        return ServerError(
            f"the server refused {method} {url}: HTTP 403{detail} (the gateway starts no kernels for that user: "
            "pass env={'KERNEL_USERNAME': 'name'} to connect_server, or set $KERNEL_USERNAME)",
            status,
        )
    if status == 404 and "/api/kernels/" in url:
        return ServerError(f"no such kernel on the server ({method} {url}: HTTP 404{detail})", status)
    return ServerError(f"the server refused {method} {url}: HTTP {status}{detail}", status)


def _request_timed_out(exc: ServerUnreachableError) -> bool:
    """Whether the server was reached and then took too long to answer (tornado: "Timeout during request"),
    rather than not reached at all (connecting, resolving, the TLS handshake)."""
    cause = exc.__cause__
    return isinstance(cause, HTTPClientError) and cause.code == 599 and "during request" in str(cause.message)


MAX_DETAIL = 300  # characters of a server's error message quoted in ours


def _error_detail(response: HTTPResponse | None) -> str:
    """The server's own words about an error, in one short line: never a whole HTML page."""
    if response is None or not response.body:
        return ""
    try:
        body = json.loads(response.body)
        message = body.get("message") or body.get("reason") or ""
    except (ValueError, AttributeError):
        message = _text_of(response.body.decode("utf-8", "replace"))
    message = " ".join(str(message).split())
    if len(message) > MAX_DETAIL:
        message = message[: MAX_DETAIL - 3] + "..."
    return f", {message}" if message else ""


def _text_of(page: str) -> str:
    """An HTML error page's message without markup; other text as it is.

    Jupyter's error pages (Jupyter Server, JupyterHub) put it in an ``<h1>`` and
    the ``<p>`` after it, among navigation bars and scripts; tornado's bare pages
    in their ``<title>``.
    """
    if not re.search(r"<(html|body|head|title|!doctype)\b", page[:1000], re.IGNORECASE):
        return page

    def text(fragment: str) -> str:
        return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())

    page = re.sub(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", " ", page, flags=re.IGNORECASE | re.DOTALL)
    heading = re.search(r"<h1[^>]*>(.*?)</h1>(?:\s*<p[^>]*>(.*?)</p>)?", page, re.IGNORECASE | re.DOTALL)
    if heading:
        first, second = text(heading.group(1)), text(heading.group(2) or "")
        return f"{first}: {second}" if second and second not in first else first
    title = re.search(r"<title[^>]*>(.*?)</title>", page, re.IGNORECASE | re.DOTALL)
    if title:
        return text(title.group(1))
    return text(page)
