"""start() and connect(), and their async twins: how a Kernel comes to be."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from jupyter_client import find_connection_file
from jupyter_client.asynchronous.client import AsyncKernelClient

from ._control import ConnectedControl, ServerControl
from ._exceptions import ConnectionFileError, KernelDiedError, KernelStartError
from ._kernel import AsyncKernel, _KernelState, check_transport_name
from ._launch import DEFAULT_STARTUP_TIMEOUT, local_spec, start_local, zmq_context
from ._portal import get_portal
from ._server import (
    DEFAULT_CONNECT_TIMEOUT,
    ServerAddress,
    ServerClient,
    ServerKernelControl,
    StartSpec,
    warn_if_cleartext,
)
from ._ssh import SshTunnel
from ._sync import Kernel
from ._types import CallOptions, OnTimeout, Output, check_seconds
from ._wires.websocket_wire import SERVER_MESSAGE_LIMIT, V1_PROTOCOL, WebsocketWire
from ._wires.zmq_wire import ZmqWire

DEFAULT_ATTACH_TIMEOUT = 10.0  # seconds a running kernel has to answer connect()
REQUIRED_CONNECTION_KEYS = ("shell_port", "iopub_port", "control_port", "hb_port", "ip", "key")


async def start_async(
    kernel_name: str = "python3",
    *,
    python: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    transport: str = "auto",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    auto_restart: bool = False,
    **options: Any,
) -> AsyncKernel:
    """Start a local kernel and return an AsyncKernel for it (see ``start``)."""
    call_options = CallOptions(timeout=timeout, output=output, on_timeout=on_timeout)
    spec = local_spec(kernel_name, python, cwd, env, startup_timeout, transport, options)
    return await start_local(spec, call_options, auto_restart=auto_restart)


async def connect_async(
    connection_file: str | os.PathLike[str],
    *,
    startup_timeout: float = DEFAULT_ATTACH_TIMEOUT,
    transport: str = "auto",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    allow_unsigned: bool = False,
    ssh: str | None = None,
    ssh_options: Sequence[str] = (),
) -> AsyncKernel:
    """Connect to a running kernel by its connection file (see ``connect``)."""
    call_options = CallOptions(timeout=timeout, output=output, on_timeout=on_timeout)
    check_transport_name(transport)
    check_seconds("startup_timeout", startup_timeout)
    path = resolve_connection_file(connection_file)
    info = read_connection_file(path, allow_unsigned=allow_unsigned)
    tunnel = await SshTunnel.open(info, ssh, ssh_options=ssh_options) if ssh is not None else None
    client = AsyncKernelClient(context=zmq_context())
    client.load_connection_info(tunnel.info if tunnel is not None else info)  # type: ignore[arg-type]
    control = ConnectedControl([tunnel.close] if tunnel is not None else [])
    state = _KernelState(functools.partial(ZmqWire, client), control, path, transport)
    started = time.monotonic()
    try:
        await state.open(startup_timeout)
    except BaseException as exc:
        await state.close(shutdown=False)
        if isinstance(exc, (asyncio.TimeoutError, KernelDiedError)):
            raise ConnectionFileError(_no_answer(path, info, exc, time.monotonic() - started, startup_timeout)) from exc
        raise
    return AsyncKernel(state, call_options)


def _no_answer(path: str, info: dict[str, Any], exc: BaseException, waited: float, startup_timeout: float) -> str:
    """Why connect() gave up, and when: the heartbeat went silent first, or the timeout passed."""
    where = f"{info.get('transport', 'tcp')}://{info['ip']}"
    advice = "is the kernel running, and is this its current connection file (key included)?"
    if isinstance(exc, KernelDiedError):
        return (
            f"no kernel answered at {path} ({where}): after {waited:.1f} s kernelproxy gave up before the "
            f"{startup_timeout:g} s startup_timeout, because {exc} (heartbeat port {info['hb_port']}); {advice}"
        )
    return (
        f"the kernel at {path} ({where}) did not answer a kernel_info request on its shell port "
        f"{info['shell_port']} within the {startup_timeout:g} s startup_timeout, though its heartbeat did not go "
        f"silent: it may be busy running code (it answers once idle; raise startup_timeout to wait longer), or "
        f"its key or shell port may not match; {advice}"
    )


async def connect_server_async(
    url: str,
    *,
    token: str | None = None,
    kernel_id: str | None = None,
    kernel_name: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    verify: bool | str = True,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    transport: str = "auto",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    websocket_protocol: str | None = V1_PROTOCOL,
    max_message_bytes: int = SERVER_MESSAGE_LIMIT,
    auto_restart: bool = False,
) -> AsyncKernel:
    """Start a kernel on a Jupyter Server or gateway, or attach to one of its kernels (see ``connect_server``)."""
    call_options = CallOptions(timeout=timeout, output=output, on_timeout=on_timeout)
    check_transport_name(transport)
    check_seconds("startup_timeout", startup_timeout)
    check_seconds("connect_timeout", connect_timeout)
    address = ServerAddress.parse(url, token=token, verify=verify, connect_timeout=connect_timeout)
    warn_if_cleartext(address)
    client = ServerClient(address)
    spec = StartSpec(kernel_name, dict(env) if env else None, cwd) if kernel_id is None else None
    try:
        if kernel_id is not None:
            model = await client.get_kernel(kernel_id)
        else:
            assert spec is not None
            model = await client.start_kernel(spec.name, spec.env, spec.path, timeout=startup_timeout)
    except BaseException:
        client.close()
        raise
    kernel = ServerKernelControl(client, model["id"], owned=spec is not None, start=spec, timeout=startup_timeout)
    control = ServerControl(kernel)

    def make_wire() -> WebsocketWire:  # after a restart, maybe a new kernel id (one the server had lost)
        return WebsocketWire(
            client, kernel.kernel_id, subprotocol=websocket_protocol, max_message_bytes=max_message_bytes
        )

    state = _KernelState(make_wire, control, None, transport, auto_restart=auto_restart, ready_timeout=startup_timeout)
    try:
        await state.open(startup_timeout)
    except BaseException as exc:
        await state.close(shutdown=False)  # deletes the kernel if we started it
        if isinstance(exc, asyncio.TimeoutError):
            raise KernelStartError(
                f"kernel {kernel.kernel_id} on {client.address.url} did not answer within {startup_timeout} s"
            ) from exc
        raise
    return AsyncKernel(state, call_options)


def resolve_connection_file(connection_file: str | os.PathLike[str]) -> str:
    """A path as given, or a fragment ('kernel-12', '1234') resolved like jupyter_client does."""
    text = os.fspath(connection_file)
    if os.path.isfile(text):
        return os.path.abspath(text)
    try:
        return str(find_connection_file(text))
    except OSError as exc:
        raise ConnectionFileError(
            f"no connection file {text!r}: it is not a file, and no kernel-*.json in Jupyter's runtime "
            f"directory matches it ({exc}). Pass the full path, or a fragment of an existing kernel's file name."
        ) from exc


def read_connection_file(path: str, *, allow_unsigned: bool = False) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            info = json.load(file)
    except OSError as exc:
        raise ConnectionFileError(f"cannot read connection file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConnectionFileError(f"connection file {path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise ConnectionFileError(f"connection file {path} does not hold a JSON object")
    missing = [key for key in REQUIRED_CONNECTION_KEYS if key not in info]
    if missing:
        raise ConnectionFileError(f"connection file {path} lacks {', '.join(missing)}")
    if not info["key"] and not allow_unsigned:
        raise ConnectionFileError(
            f"connection file {path} has an empty key: its kernel accepts unsigned messages from anyone "
            "who can reach its ports, and kernelproxy would unpickle whatever arrives. Refusing to connect; "
            "pass allow_unsigned=True if you trust everyone who can reach those ports."
        )
    return info


def start(
    kernel_name: str = "python3",
    *,
    python: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    transport: str = "auto",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    auto_restart: bool = False,
    **options: Any,
) -> Kernel:
    """Start a local kernel and return a Kernel for it.

    Args:
        kernel_name: a kernelspec; the default "python3" is this interpreter's
            ipykernel (pickles need the same Python on both sides).
        python: start this interpreter's ipykernel instead (another virtualenv);
            it needs ipykernel and cloudpickle, not kernelproxy.
        cwd: the kernel's working directory.
        env: variables added to this process's environment for the kernel.
        startup_timeout: seconds to wait for the kernel to answer.
        transport: "auto" (the lane: a Unix socket and shared memory, for an ipykernel started here;
            else comm where the kernel supports it, else execute), "lane", "comm" or "execute".
        timeout: default call option (see ``CallOptions``): seconds a call may take.
        output: default call option (see ``CallOptions``): "forward" or "discard".
        on_timeout: default call option (see ``CallOptions``): "interrupt" or "restart".
        auto_restart: when the kernel dies, the next call starts a fresh one
            (with a KernelRestartedWarning) instead of raising KernelDiedError.
        **options: passed to jupyter_client's AsyncKernelManager.
    """
    portal = get_portal()
    core = portal.run(
        start_async(
            kernel_name,
            python=python,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            transport=transport,
            timeout=timeout,
            output=output,
            on_timeout=on_timeout,
            auto_restart=auto_restart,
            **options,
        )
    )
    return Kernel(core, portal)


def connect_server(
    url: str,
    *,
    token: str | None = None,
    kernel_id: str | None = None,
    kernel_name: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    verify: bool | str = True,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    transport: str = "auto",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    websocket_protocol: str | None = V1_PROTOCOL,
    max_message_bytes: int = SERVER_MESSAGE_LIMIT,
    auto_restart: bool = False,
) -> Kernel:
    """Use a kernel of a Jupyter Server, Kernel Gateway or Enterprise Gateway, through its REST and websocket API.

    Without ``kernel_id`` a new kernel is started there (``kernel_name``, or the
    server's default) and shut down when this Kernel is closed; with it, that
    running kernel is attached to and left running by ``close()``.

    Args:
        url: the server's address, e.g. "https://hub.example:8888" (with any base path), or a URL the
            server printed or a browser shows ("http://127.0.0.1:8888/lab?token=..."): the base URL
            above a frontend's page (lab, tree, notebooks, doc, edit, voila) is found.
        token: the server's token (default: the URL's ?token=, else $JUPYTER_TOKEN), sent in the
            Authorization header.
        env: variables for the new kernel; gateways pass the KERNEL_* ones to it, Jupyter Server ignores them.
            To Enterprise Gateway kernelproxy also sends this process's KERNEL_* variables and
            KERNEL_USERNAME (default: the login name), as jupyter_server's gateway client does.
        cwd: the new kernel's working directory, relative to the server's root directory
            (Enterprise Gateway: KERNEL_WORKING_DIR, a path on the kernel's machine).
        startup_timeout: seconds the server may take to start the kernel (on a cluster: minutes)
            and the kernel to answer; restarts get as long.
        verify: TLS certificate check: True, False, or the path of a CA bundle.
        connect_timeout: seconds to reach the server before ServerUnreachableError.
        websocket_protocol: the websocket subprotocol to offer; None for the default protocol.
        max_message_bytes: the server's websocket message limit (Tornado servers: 10 MiB);
            bigger payloads travel in parts below it.
        auto_restart: when the kernel dies (or the server culled or deleted a kernel started here), the
            next call gets a fresh one (with a KernelRestartedWarning) instead of raising KernelDiedError.

    The other options are ``start()``'s.
    """
    portal = get_portal()
    core = portal.run(
        connect_server_async(
            url,
            token=token,
            kernel_id=kernel_id,
            kernel_name=kernel_name,
            env=env,
            cwd=cwd,
            verify=verify,
            startup_timeout=startup_timeout,
            connect_timeout=connect_timeout,
            transport=transport,
            timeout=timeout,
            output=output,
            on_timeout=on_timeout,
            websocket_protocol=websocket_protocol,
            max_message_bytes=max_message_bytes,
            auto_restart=auto_restart,
        )
    )
    return Kernel(core, portal)


def connect(
    connection_file: str | os.PathLike[str],
    *,
    startup_timeout: float = DEFAULT_ATTACH_TIMEOUT,
    transport: str = "auto",
    timeout: float | None = None,
    output: Output = "forward",
    on_timeout: OnTimeout = "interrupt",
    allow_unsigned: bool = False,
    ssh: str | None = None,
    ssh_options: Sequence[str] = (),
) -> Kernel:
    """Connect to a running kernel by connection file: a path, or a fragment such as "kernel-1234".

    The kernel keeps running after ``close()`` or the end of a ``with`` block;
    only ``shutdown()`` stops it. A connection file without a key is refused
    unless ``allow_unsigned=True``: anyone who reaches such a kernel's ports
    could send what kernelproxy unpickles.

    Args:
        ssh: "user@host[:port]" to reach a kernel on another machine (its connection
            file copied here) through one OpenSSH tunnel, closed with the Kernel.
            Key-based login only: kernelproxy cannot answer password prompts.
        ssh_options: extra ssh arguments, e.g. ["-i", "~/.ssh/cluster_key"].
    """
    portal = get_portal()
    core = portal.run(
        connect_async(
            connection_file,
            startup_timeout=startup_timeout,
            transport=transport,
            timeout=timeout,
            output=output,
            on_timeout=on_timeout,
            allow_unsigned=allow_unsigned,
            ssh=ssh,
            ssh_options=ssh_options,
        )
    )
    return Kernel(core, portal)
