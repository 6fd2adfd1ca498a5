"""SSH tunnels to a kernel on another machine, like ``jupyter console --existing f.json --ssh host``.

One OpenSSH client process forwards a local TCP port to each of the kernel's
five sockets (TCP ports, or IPC socket paths) on the remote side::

    ssh -N -o ExitOnForwardFailure=yes -o BatchMode=yes [ssh_options] \\
        -L 127.0.0.1:<local>:<remote ip>:<remote port>  (x5)  [-p port] user@host

``SshTunnel.info`` is the connection info rewritten to those local ports, to
hand to jupyter_client. Why not jupyter_client's ``tunnel_to_kernel``: it
starts ``ssh -f ... sleep 60`` processes that outlive us and answers prompts
through pexpect; ours is one process, killed by ``close()`` or at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from ._exceptions import ConnectionFileError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
DEFAULT_TIMEOUT = 15.0
OPEN_ATTEMPTS = 3  # a local port we picked may be taken before ssh binds it: pick again
POLL_INTERVAL = 0.05
CLOSE_GRACE = 5.0  # seconds ssh gets to exit after SIGTERM before SIGKILL

# ssh keeps the first value it sees for an option: these come before the caller's options (they
# cannot be overridden: without them open() could hang on a prompt or report success wrongly) ...
REQUIRED_OPTIONS = ("-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes")
# ... and these after, so that the caller's ssh_options may change them.
DEFAULT_OPTIONS = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")

# ssh's messages when a local port it was told to listen on is taken.
_PORT_TAKEN = ("cannot listen to port", "Address already in use", "Could not request local forwarding")
_PORT_SUFFIX = re.compile(r"^(?P<host>\[[^\]]*\]|[^:\[\]]+):(?P<port>\d+)$")


class SshTunnel:
    """One ``ssh -N -L ...`` process forwarding local ports to a remote kernel.

    Get one with ``await SshTunnel.open(info, "user@host")``; connect to
    ``tunnel.info`` (127.0.0.1, transport "tcp", the local ports); ``await
    tunnel.close()`` when done. A tunnel never closed is killed at interpreter exit.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr: IO[bytes], info: dict[str, Any], destination: str):
        self._process = process
        self._stderr = stderr
        self.info = info
        self.destination = destination

    @classmethod
    async def open(
        cls,
        info: dict[str, Any],
        ssh: str,
        *,
        ssh_options: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> SshTunnel:
        """Start ssh and wait until every forwarded port reaches the kernel's socket.

        info: a connection file's contents, as the kernel on the remote machine wrote it.
        ssh: "user@host", "host", "user@host:port" (or an ssh:// URL, or a Host of ~/.ssh/config).
        ssh_options: extra ssh arguments, e.g. ["-i", "~/.ssh/key", "-o", "StrictHostKeyChecking=no"].
        timeout: seconds for logging in and reaching the kernel.

        Raises ConnectionFileError, saying what ssh said and what to do, if ssh
        fails or the kernel does not answer at the remote end of the tunnel.
        """
        if isinstance(ssh_options, str):  # a str is a Sequence[str] too: "-i key" would become "-", "i", ...
            raise TypeError("ssh_options must be a list of arguments, such as ['-i', '/path/to/key'], not a str")
        destination, port = parse_destination(ssh)
        remotes = remote_endpoints(info)
        executable = shutil.which("ssh")
        if executable is None:
            raise ConnectionFileError(
                "no `ssh` command found on PATH: install an OpenSSH client to connect to a kernel over SSH"
            )
        deadline = time.monotonic() + timeout
        for attempt in range(OPEN_ATTEMPTS):
            local_ports = dict(zip(remotes, free_local_ports(len(remotes))))
            argv = ssh_command(executable, destination, port, remotes, local_ports, ssh_options, timeout)
            tunnel = cls._spawn(argv, rewrite_info(info, local_ports), ssh)
            try:
                await tunnel._wait_ready(local_ports, remotes, deadline, timeout)
            except _PortTaken as exc:
                said = tunnel.stderr_text()
                await tunnel.close()
                if attempt + 1 == OPEN_ATTEMPTS or time.monotonic() >= deadline:
                    raise ConnectionFileError(
                        f"ssh could not listen on local ports (taken by other programs) in {attempt + 1} "
                        f"attempts:\n{said}"
                    ) from exc
                continue
            except BaseException:
                await tunnel.close()
                raise
            return tunnel
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(cls, argv: list[str], info: dict[str, Any], destination: str) -> SshTunnel:
        # stderr to an unnamed file rather than a pipe: nobody has to drain it for the tunnel's
        # lifetime (a full pipe would block ssh, and with it the kernel's traffic).
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the tunnel; closed by close())
        try:
            # Popen rather than asyncio's subprocess: kill_now() must work at exit without the event
            # loop, and Popen.poll() never signals a reaped pid. Forking does not block the loop for long.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                # Own process group: a Ctrl-C in the terminal must not kill the tunnel that is needed
                # right then to interrupt the kernel; and killpg also reaches a ProxyCommand's process.
                start_new_session=True,
            )
        except OSError as exc:
            stderr.close()
            raise ConnectionFileError(f"could not run ssh ({argv[0]}): {exc}") from exc
        _live_processes.add(process)
        return cls(process, stderr, info, destination)

    async def _wait_ready(
        self, local_ports: dict[str, int], remotes: dict[str, str], deadline: float, timeout: float
    ) -> None:
        """Return when every local port reaches a kernel socket; raise if ssh exits or time runs out."""
        probes = {name: asyncio.ensure_future(_probe(port, deadline)) for name, port in local_ports.items()}
        try:
            while not all(probe.done() for probe in probes.values()):  # each probe ends by the deadline
                if self._process.poll() is not None:
                    raise self._exit_error()
                await asyncio.wait(probes.values(), timeout=POLL_INTERVAL)
            answers = {name: probe.result() for name, probe in probes.items()}
        finally:
            for probe in probes.values():
                probe.cancel()
            await asyncio.gather(*probes.values(), return_exceptions=True)  # reaped: no "never retrieved" at GC
        failed = {name: answer for name, answer in answers.items() if answer != "greeted"}
        if not failed:
            if self._process.poll() is not None:  # a port taken by another program that happens to greet
                raise self._exit_error()
            return
        # A probe also ends (with EOF) when ssh exits: report that rather than the kernel.
        await asyncio.sleep(0.2)
        if self._process.poll() is not None:
            raise self._exit_error()
        if "unlistened" in failed.values():
            raise ConnectionFileError(
                f"ssh to {self.destination} did not set up the tunnel within {timeout} s "
                f"(is the host slow to answer?); ssh said:\n{self.stderr_text() or '(nothing)'}"
            )
        where = ", ".join(f"{remotes[name]} ({name})" for name in failed)
        why = "refused the connection" if "closed" in failed.values() else "did not answer"
        said = self.stderr_text()
        raise ConnectionFileError(
            f"logged in to {self.destination}, but the kernel's socket {why} at the remote end: {where}. "
            "Is the kernel running there, and is this its current connection file?"
            + (f" ssh said:\n{said}" if said else "")
        )

    def _exit_error(self) -> Exception:
        text = self.stderr_text()
        if any(marker in text for marker in _PORT_TAKEN):
            return _PortTaken()
        status = self._process.returncode
        return ConnectionFileError(
            f"ssh to {self.destination} failed (exit status {status}):\n{text or '(ssh printed nothing)'}\n"
            + ssh_hint(text, self.destination)
        )

    def stderr_text(self, limit: int = 4000) -> str:
        """The end of what ssh wrote to stderr, without its known-hosts chatter."""
        try:
            self._stderr.seek(0)
            data = self._stderr.read()
        except (OSError, ValueError):  # closed
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        text = "\n".join(line for line in lines if line.strip() and not line.startswith("Warning: Permanently added"))
        return text[-limit:]

    @property
    def pid(self) -> int:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._process.poll() is None

    async def close(self) -> None:
        """Stop ssh (SIGTERM, then SIGKILL after a grace period) and wait for it. Idempotent."""
        if self._process.poll() is None:
            _signal_group(self._process, signal.SIGTERM)
            give_up = time.monotonic() + CLOSE_GRACE
            while self._process.poll() is None and time.monotonic() < give_up:
                await asyncio.sleep(POLL_INTERVAL)
            if self._process.poll() is None:
                _signal_group(self._process, signal.SIGKILL)
                while self._process.poll() is None:
                    await asyncio.sleep(POLL_INTERVAL)
        self._forget()

    def kill_now(self) -> None:
        """Kill ssh without an event loop (interpreter exit)."""
        _kill_process(self._process)
        self._forget()

    def _forget(self) -> None:
        _live_processes.discard(self._process)
        self._stderr.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "open" if self.is_alive() else "closed"
        return f"<SshTunnel {state} to {self.destination}, ssh pid {self.pid}>"


class _PortTaken(Exception):
    """ssh exited because a local port we picked was taken meanwhile: open() picks others."""


# ---------------------------------------------------------------------- pure helpers


def parse_destination(ssh: str) -> tuple[str, int | None]:
    """Split an optional port off: "user@host:port" -> ("user@host", port); "host" -> ("host", None).

    "user@[::1]:22" works too; "ssh://user@host:port" is returned whole, for ssh to parse.
    """
    if not ssh or ssh != ssh.strip() or any(c.isspace() for c in ssh):
        raise ValueError(f"ssh must be 'user@host', 'host' or 'user@host:port', not {ssh!r}")
    if ssh.startswith("-"):  # ssh would read it as an option
        raise ValueError(f"ssh destination {ssh!r} starts with '-'; pass options in ssh_options")
    if ssh.startswith("ssh://"):  # ssh parses these itself, port included
        return ssh, None
    user, at, host = ssh.rpartition("@")
    match = _PORT_SUFFIX.match(host)
    if match is None:
        return ssh, None
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"ssh port must be 1-65535, not {port} (in {ssh!r})")
    return f"{user}{at}{match['host'].strip('[]')}", port


def remote_endpoints(info: dict[str, Any]) -> dict[str, str]:
    """Where each of the kernel's sockets is, seen from the SSH server: {"shell_port": "host:port" or "/path"}."""
    transport = info.get("transport", "tcp")
    ip = str(info.get("ip") or "127.0.0.1")
    endpoints = {}
    for name in PORT_NAMES:
        port = info.get(name)
        if not port:  # stdin_port may be absent; 0 means "not bound"
            continue
        if not isinstance(port, int):
            raise ConnectionFileError(f"connection file's {name} is {port!r}, not a port number")
        if transport == "ipc":
            endpoints[name] = _ipc_path(ip, port)
        elif transport == "tcp":
            endpoints[name] = f"{_forward_host(ip)}:{port}"
        else:
            raise ConnectionFileError(f"cannot tunnel a kernel whose transport is {transport!r} (only tcp and ipc)")
    if not endpoints:
        raise ConnectionFileError("the connection info names no ports to forward")
    return endpoints


def _forward_host(ip: str) -> str:
    """The kernel's address as ssh's -L wants it."""
    if ip in ("0.0.0.0", "*"):
        return "127.0.0.1"  # the kernel listens on every interface: reach it through the host's loopback
    if ip == "::":
        return "[::1]"
    if ":" in ip:
        return f"[{ip}]"  # IPv6 literal: brackets keep ssh from splitting at its colons
    return ip


def _ipc_path(ip: str, port: int) -> str:
    path = f"{ip}-{port}"  # zmq's ipc endpoint for "port" N of a Jupyter connection file
    if not path.startswith("/"):
        raise ConnectionFileError(
            f"the kernel's IPC socket {path!r} is a relative path, relative to the kernel's working directory "
            "on the remote machine, which kernelproxy does not know: write its absolute path in the "
            "connection file's 'ip'"
        )
    if ":" in path:
        raise ConnectionFileError(f"cannot forward IPC socket {path!r}: ssh's -L cannot express a ':' in a path")
    return path


def rewrite_info(info: dict[str, Any], local_ports: dict[str, int]) -> dict[str, Any]:
    """A copy of ``info`` that points at the tunnel's local ends."""
    return {**info, **local_ports, "ip": "127.0.0.1", "transport": "tcp"}


def ssh_command(
    executable: str,
    destination: str,
    port: int | None,
    remotes: dict[str, str],
    local_ports: dict[str, int],
    ssh_options: Sequence[str],
    timeout: float,
) -> list[str]:
    argv = [executable, "-N", *REQUIRED_OPTIONS, *ssh_options, *DEFAULT_OPTIONS]
    # Unreachable hosts fail in ssh itself, with its message, before our own timeout.
    argv += ["-o", f"ConnectTimeout={max(1, math.floor(timeout * 0.8))}"]
    for name, remote in remotes.items():
        argv += ["-L", f"127.0.0.1:{local_ports[name]}:{remote}"]
    if port is not None:
        argv += ["-p", str(port)]
    argv.append(destination)
    return argv


def free_local_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that were free a moment ago (ssh binds them next; open() retries if taken)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so that no port is handed out twice
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ssh_hint(stderr: str, destination: str) -> str:
    """What to do about the failure ssh described in ``stderr``."""
    if "Permission denied" in stderr or "Too many authentication failures" in stderr:
        return (
            "Set up key-based login (ssh-copy-id, or a key in ssh-agent, or ssh_options=['-i', '/path/to/key']): "
            "kernelproxy runs ssh with BatchMode=yes and cannot answer password or passphrase prompts."
        )
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return (
            "ssh does not know this host's key (or it changed): "
            f"run `{_login_command(destination)}` once in a terminal (with the same options) to check and accept it; "
            "kernelproxy cannot answer that question."
        )
    if "Could not resolve hostname" in stderr:
        return "Check the host name (or add it as a Host in ~/.ssh/config)."
    if any(text in stderr for text in ("Connection refused", "timed out", "No route to host", "unreachable")):
        return "Is the host up, an SSH server running there, and is the port right (user@host:port)?"
    if "forwarding" in stderr.lower() and "prohibited" in stderr.lower():
        return (
            "The SSH server forbids port forwarding: it needs AllowTcpForwarding yes "
            "(AllowStreamLocalForwarding for IPC)."
        )
    return "Try the same login with `ssh` in a terminal to see what it needs."


def _login_command(ssh: str) -> str:
    destination, port = parse_destination(ssh)
    return f"ssh -p {port} {destination}" if port is not None else f"ssh {destination}"


# ---------------------------------------------------------------------- processes


async def _probe(port: int, deadline: float) -> str:
    """Connect to a forwarded port until ssh listens, and wait for the kernel's socket to speak.

    ZMQ sockets send their greeting as soon as a connection opens, so one byte
    read ("greeted") proves the whole path works. ssh closes the connection at
    once if the kernel's socket refused it ("closed"). By the deadline: "unlistened"
    if ssh never listened (still logging in), "silent" if the kernel never spoke.
    """
    while True:
        try:
            remaining = max(0.0, deadline - time.monotonic())
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), remaining)
            break
        except (OSError, asyncio.TimeoutError):  # ssh is still logging in: nothing listens yet
            if time.monotonic() >= deadline:
                return "unlistened"
            await asyncio.sleep(POLL_INTERVAL)
    try:
        data = await asyncio.wait_for(reader.read(1), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return "silent"
    except OSError:
        return "closed"
    finally:
        writer.close()
    return "greeted" if data else "closed"


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    if process.poll() is not None:  # reaped: its pid may belong to someone else now
        return
    try:
        if sys.platform == "win32":
            process.kill()
        else:
            os.killpg(process.pid, sig)  # its own session: this also reaches a ProxyCommand's process
    except ProcessLookupError:
        pass


def _kill_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        _signal_group(process, signal.SIGKILL if sys.platform != "win32" else signal.SIGTERM)
        try:
            process.wait(timeout=CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            pass


# Processes, not tunnels: a tunnel dropped without close() must still not outlive us.
_live_processes: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_live_processes() -> None:
    """No ssh process of ours outlives this interpreter, even if nobody called close()."""
    for process in list(_live_processes):
        try:
            _kill_process(process)
        except OSError:  # e.g. not ours to signal any more: nothing else to do at exit
            continue
    _live_processes.clear()
