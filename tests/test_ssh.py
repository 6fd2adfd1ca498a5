"""SSH tunnels (kernelproxy._ssh) through a real sshd on 127.0.0.1, to real kernels.

The sshd runs as the current user on a free port with throwaway keys; tests
skip when OpenSSH's server is not installed (.ci/run installs it when root).
The "remote" kernels are local ones reached through the tunnel, so the tunnel
is all that is under test.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import ExternalKernel, cmdline, pid_running, start_external_kernel, stop_external_kernel

import kernelproxy
from kernelproxy import _ssh
from kernelproxy._exceptions import ConnectionFileError
from kernelproxy._ssh import SshTunnel

SSHD = "/usr/sbin/sshd"
FAST = 15.0  # seconds: a failure must be reported sooner than this


# ---------------------------------------------------------------------- pure parts: no ssh needed


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("user@host", ("user@host", None)),
        ("host", ("host", None)),
        ("user@host:2222", ("user@host", 2222)),
        ("host:22", ("host", 22)),
        ("user@[::1]:2222", ("user@::1", 2222)),
        ("user@::1", ("user@::1", None)),
        ("me@example.org", ("me@example.org", None)),
        ("ssh://user@host:2222", ("ssh://user@host:2222", None)),
    ],
)
def test_parse_destination(given, expected):
    assert _ssh.parse_destination(given) == expected


@pytest.mark.parametrize("bad", ["", "-oProxyCommand=evil", "user@host name", " host", "host:0", "host:70000"])
def test_parse_destination_rejects(bad):
    with pytest.raises(ValueError):
        _ssh.parse_destination(bad)


def test_remote_endpoints_tcp():
    info = {
        "transport": "tcp",
        "ip": "10.0.0.5",
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
    }
    assert _ssh.remote_endpoints(info) == {
        "shell_port": "10.0.0.5:1",
        "iopub_port": "10.0.0.5:2",
        "stdin_port": "10.0.0.5:3",
        "control_port": "10.0.0.5:4",
        "hb_port": "10.0.0.5:5",
    }


@pytest.mark.parametrize(
    ("ip", "host"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("::", "[::1]"),
        ("fe80::1", "[fe80::1]"),
        ("", "127.0.0.1"),
        ("localhost", "localhost"),
    ],
)
def test_remote_endpoints_tcp_addresses(ip, host):
    assert _ssh.remote_endpoints({"ip": ip, "shell_port": 7})["shell_port"] == f"{host}:7"


def test_remote_endpoints_skips_missing_ports():
    assert list(_ssh.remote_endpoints({"ip": "127.0.0.1", "shell_port": 7, "stdin_port": 0})) == ["shell_port"]


def test_remote_endpoints_ipc():
    info = {"transport": "ipc", "ip": "/tmp/k/kernel", "shell_port": 1, "hb_port": 5}
    assert _ssh.remote_endpoints(info) == {"shell_port": "/tmp/k/kernel-1", "hb_port": "/tmp/k/kernel-5"}


def test_remote_endpoints_relative_ipc_explains():
    with pytest.raises(ConnectionFileError, match="relative path.*absolute path"):
        _ssh.remote_endpoints({"transport": "ipc", "ip": "kernel-ipc", "shell_port": 1})


def test_remote_endpoints_rejects_unknown_transport():
    with pytest.raises(ConnectionFileError, match="'udp'"):
        _ssh.remote_endpoints({"transport": "udp", "ip": "h", "shell_port": 1})


def test_rewrite_info_keeps_key_and_points_at_tunnel():
    info = {"transport": "ipc", "ip": "/tmp/k", "shell_port": 1, "key": "secret", "signature_scheme": "hmac-sha256"}
    rewritten = _ssh.rewrite_info(info, {"shell_port": 50001})
    assert rewritten == {
        "transport": "tcp",
        "ip": "127.0.0.1",
        "shell_port": 50001,
        "key": "secret",
        "signature_scheme": "hmac-sha256",
    }
    assert info["shell_port"] == 1  # a copy


def test_ssh_command_option_order():
    """ssh keeps an option's first value: BatchMode cannot be overridden, ServerAliveInterval can."""
    argv = _ssh.ssh_command(
        "ssh", "u@h", 2222, {"shell_port": "127.0.0.1:9"}, {"shell_port": 5000}, ["-o", "ServerAliveInterval=60"], 15.0
    )
    assert argv[:2] == ["ssh", "-N"]
    assert argv.index("BatchMode=yes") < argv.index("ServerAliveInterval=60") < argv.index("ServerAliveInterval=5")
    assert argv[-3:] == ["-p", "2222", "u@h"]
    assert ["-L", "127.0.0.1:5000:127.0.0.1:9"] == argv[argv.index("-L") : argv.index("-L") + 2]


def test_ssh_options_must_be_a_list():
    with pytest.raises(TypeError, match="list"):
        asyncio.run(SshTunnel.open({"ip": "127.0.0.1", "shell_port": 1}, "host", ssh_options="-i key"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- a real sshd


@dataclass
class Sshd:
    port: int
    user: str
    key: Path  # a client key the server accepts
    known_hosts: Path
    log: Path

    @property
    def destination(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def options(self, key: Path | None = None, known_hosts: Path | None = None) -> list[str]:
        """Client options for this server: our key only, no user config, its host key trusted.

        With ``known_hosts`` (a file without its key), host keys are checked strictly instead.
        """
        if known_hosts is None:
            checking = ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=no"]
        else:
            checking = ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return [
            "-F",
            "/dev/null",
            "-i",
            str(key or self.key),
            "-o",
            "IdentitiesOnly=yes",
            *checking,
            "-o",
            "LogLevel=ERROR",
        ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    missing = [tool for tool in (SSHD, "ssh-keygen", "ssh") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"openssh-server not installed (missing {', '.join(missing)}): "
            ".ci/run installs it with apt-get when run as root"
        )
    directory = tmp_path_factory.mktemp("sshd")
    host_key, client_key = keygen(directory / "host_key"), keygen(directory / "client_key")
    (directory / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {host_key}
        AuthorizedKeysFile {directory / "authorized_keys"}
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        StrictModes no
        PidFile {directory / "sshd.pid"}
        UsePAM no
        PermitRootLogin prohibit-password
        AllowTcpForwarding yes
        AllowStreamLocalForwarding yes
        UseDNS no
        LogLevel VERBOSE
        """)
    )
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # its privilege-separation directory, absent until the service ran
    except OSError:
        pass  # not root: sshd does without it
    log = directory / "sshd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    try:
        deadline = time.monotonic() + 15
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start listening on {port}:\n{log.read_text()}")
            time.sleep(0.05)
        server = Sshd(port, getpass.getuser(), client_key, directory / "known_hosts", log)
        check = subprocess.run(
            ["ssh", *server.options(), "-o", "BatchMode=yes", "-p", str(port), f"{server.user}@127.0.0.1", "true"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            if "locked" in log.read_text():
                pytest.skip(f"sshd refuses to log in {server.user}: the account is locked")
            pytest.fail(f"cannot log in to the test sshd: {check.stderr}\n{log.read_text()}")
        yield server
    finally:
        process.terminate()
        process.wait(10)
        for proc in ssh_processes():
            proc.kill()  # per-connection sshd children of a tunnel a test forgot to close


def ssh_processes() -> list[psutil.Process]:
    """ssh/sshd processes descended from pytest."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() in ("ssh", "sshd") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(autouse=True)
def no_ssh_left_behind() -> Iterator[None]:
    """Each test ends with no ssh client of ours running: tunnels are closed or killed."""
    before = {proc.pid for proc in ssh_processes()}
    yield
    deadline = time.monotonic() + 5
    while True:
        clients = [
            proc
            for proc in ssh_processes()
            if proc.pid not in before and proc.name() == "ssh" and "-N" in cmdline(proc)
        ]
        if not clients or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in clients:
        proc.kill()
    assert not clients, f"ssh processes left running: {[cmdline(proc) for proc in clients]}"


# ---------------------------------------------------------------------- kernels behind it


def wait_listening(info: dict, timeout: float = 30) -> None:
    """Until the kernel (started just now) accepts connections on its shell socket."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if info.get("transport", "tcp") == "ipc":
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(f"{info['ip']}-{info['shell_port']}")
            else:
                socket.create_connection((info["ip"], info["shell_port"]), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"kernel not listening after {timeout} s: {info}") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def tcp_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalKernel]:
    """An ipykernel on TCP 127.0.0.1, shared by this module's tests (they do not break it)."""
    kernel = start_external_kernel(tmp_path_factory.mktemp("tcp-kernel"))
    try:
        wait_listening(json.loads(kernel.connection_file.read_text()))
        yield kernel
    finally:
        stop_external_kernel(kernel)


@pytest.fixture
def ipc_kernel() -> Iterator[ExternalKernel]:
    """An ipykernel on IPC sockets, in a short directory (unix socket paths are limited to ~100 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="kp-ssh-"))
    kernel = start_external_kernel(directory, transport="ipc", ip=str(directory / "k"))
    try:
        wait_listening(read_info(kernel))
        yield kernel
    finally:
        stop_external_kernel(kernel)
        shutil.rmtree(directory, ignore_errors=True)


def read_info(kernel: ExternalKernel) -> dict:
    return json.loads(kernel.connection_file.read_text())


def open_tunnel(info: dict, sshd: Sshd, **kwargs) -> SshTunnel:
    kwargs.setdefault("ssh_options", sshd.options())
    return asyncio.run(SshTunnel.open(info, sshd.destination, **kwargs))


def close_tunnel(tunnel: SshTunnel) -> None:
    asyncio.run(tunnel.close())


def connection_file_for(tunnel: SshTunnel, directory: Path) -> Path:
    """What connect(path, ssh=...) will do inside: a connection file pointing at the tunnel."""
    path = directory / "tunnelled-kernel.json"
    path.write_text(json.dumps(tunnel.info))
    return path


# ---------------------------------------------------------------------- through the tunnel


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_tunnel_tcp_kernel_call_push_pull(sshd, tcp_kernel, tmp_path, transport):
    info = read_info(tcp_kernel)
    started = time.monotonic()
    tunnel = open_tunnel(info, sshd)
    opened_in = time.monotonic() - started
    try:
        assert tunnel.is_alive()
        assert tunnel.info["ip"] == "127.0.0.1" and tunnel.info["transport"] == "tcp"
        assert tunnel.info["key"] == info["key"]
        assert {tunnel.info[name] for name in _ssh.PORT_NAMES}.isdisjoint({info[name] for name in _ssh.PORT_NAMES})
        with kernelproxy.connect(connection_file_for(tunnel, tmp_path), transport=transport) as k:
            assert k.call(pow, 2, 10) == 1024
            assert k.call(os.getpid) == tcp_kernel.process.pid
            array = np.random.default_rng(0).random(10 * 2**20 // 8)  # 10 MB
            k.push(big=array)
            assert np.array_equal(k.pull("big"), array)
            k.delete("big")
    finally:
        pid = tunnel.pid
        close_tunnel(tunnel)
    assert not tunnel.is_alive()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert tcp_kernel.process.poll() is None  # closing the tunnel leaves the kernel running
    assert opened_in < 5, f"opening the tunnel took {opened_in:.1f} s"


def test_tunnel_ipc_kernel(sshd, ipc_kernel, tmp_path):
    info = read_info(ipc_kernel)
    assert info["transport"] == "ipc"
    tunnel = open_tunnel(info, sshd)
    try:
        assert tunnel.info["transport"] == "tcp"
        with kernelproxy.connect(connection_file_for(tunnel, tmp_path)) as k:
            assert k.call(pow, 3, 4) == 81
    finally:
        close_tunnel(tunnel)


def test_tunnel_async_context_manager(sshd, tcp_kernel):
    async def main() -> SshTunnel:
        async with await SshTunnel.open(read_info(tcp_kernel), sshd.destination, ssh_options=sshd.options()) as t:
            assert t.is_alive()
            assert "open" in repr(t)
        return t

    tunnel = asyncio.run(main())
    assert not tunnel.is_alive()
    close_tunnel(tunnel)  # twice is harmless


def test_tunnel_kill_now(sshd, tcp_kernel):
    tunnel = open_tunnel(read_info(tcp_kernel), sshd)
    tunnel.kill_now()
    assert not tunnel.is_alive()
    assert tunnel.pid not in {proc.pid for proc in ssh_processes()}


def test_tunnel_retries_when_a_local_port_is_taken(sshd, tcp_kernel, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real, calls = _ssh.free_local_ports, []

        def pick(count: int) -> list[int]:
            calls.append(count)
            ports = real(count)
            return [taken, *ports[1:]] if len(calls) == 1 else ports

        monkeypatch.setattr(_ssh, "free_local_ports", pick)
        tunnel = open_tunnel(read_info(tcp_kernel), sshd)
    try:
        assert len(calls) == 2
        assert taken not in tunnel.info.values()
        assert tunnel.is_alive()
    finally:
        close_tunnel(tunnel)


def test_tunnel_killed_at_interpreter_exit(sshd, tcp_kernel):
    """A tunnel never closed does not outlive its Python process."""
    script = textwrap.dedent(f"""\
        import asyncio, json
        from kernelproxy._ssh import SshTunnel
        tunnel = asyncio.run(SshTunnel.open(json.loads({json.dumps(json.dumps(read_info(tcp_kernel)))}),
                                            {sshd.destination!r}, ssh_options={sshd.options()!r}))
        print(tunnel.pid, flush=True)
        """)
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout)
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"ssh {pid} outlived its interpreter: {cmdline(psutil.Process(pid))}"
        time.sleep(0.05)


def test_tunnel_survives_sigint_to_our_process_group(sshd, tcp_kernel):
    """Ctrl-C in a terminal signals the foreground process group; the tunnel is needed right then to interrupt."""
    tunnel = open_tunnel(read_info(tcp_kernel), sshd)
    try:
        assert os.getpgid(tunnel.pid) != os.getpgid(0)
    finally:
        close_tunnel(tunnel)


# ---------------------------------------------------------------------- failures: fast, and saying what to do


def expect_failure(info: dict, destination: str, options: list[str], *, timeout: float = FAST) -> str:
    started = time.monotonic()
    with pytest.raises(ConnectionFileError) as caught:
        asyncio.run(SshTunnel.open(info, destination, ssh_options=options, timeout=timeout))
    elapsed = time.monotonic() - started
    assert elapsed < FAST, f"took {elapsed:.1f} s to fail: {caught.value}"
    return str(caught.value)


def test_tunnel_wrong_key_says_permission_denied(sshd, tcp_kernel, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    message = expect_failure(read_info(tcp_kernel), sshd.destination, sshd.options(key=stranger))
    assert "Permission denied (publickey" in message
    assert "key-based login" in message and "password" in message


def test_tunnel_unknown_host_key_says_so(sshd, tcp_kernel, tmp_path):
    message = expect_failure(read_info(tcp_kernel), sshd.destination, sshd.options(known_hosts=tmp_path / "none"))
    assert "Host key verification failed" in message
    assert "accept" in message


def test_tunnel_unreachable_port_says_connection_refused(sshd, tcp_kernel):
    message = expect_failure(read_info(tcp_kernel), f"{sshd.user}@127.0.0.1:{free_port()}", sshd.options())
    assert "Connection refused" in message
    assert "SSH server running" in message


def test_tunnel_no_kernel_at_remote_end(sshd):
    ports = {name: free_port() for name in _ssh.PORT_NAMES}
    info = {"transport": "tcp", "ip": "127.0.0.1", "key": "k", **ports}
    message = expect_failure(info, sshd.destination, sshd.options())
    assert "kernel's socket refused the connection" in message
    assert f"127.0.0.1:{ports['shell_port']}" in message


def test_tunnel_silent_remote_end(sshd):
    """Something listens at the kernel's address but never speaks ZMQ: "did not answer", by the timeout."""
    with socket.socket() as impostor:
        impostor.bind(("127.0.0.1", 0))
        impostor.listen()
        info = {"transport": "tcp", "ip": "127.0.0.1", "key": "k", "shell_port": impostor.getsockname()[1]}
        message = expect_failure(info, sshd.destination, sshd.options(), timeout=2.0)
    assert "kernel's socket did not answer" in message


def test_tunnel_timeout_is_reported(sshd, tcp_kernel):
    """A server that accepts TCP but never speaks SSH: the timeout, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConnectionFileError, match=r"within 2(\.0)? s|timed out") as caught:
            asyncio.run(
                SshTunnel.open(read_info(tcp_kernel), f"127.0.0.1:{port}", ssh_options=sshd.options(), timeout=2.0)
            )
        assert time.monotonic() - started < 5, caught.value


# ---------------------------------------------------------------------- connect(path, ssh=...)


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_connect_with_ssh(sshd, tcp_kernel, transport):
    """The user's form: the (copied) connection file, and where to ssh to. The tunnel goes with the Kernel."""
    with kernelproxy.connect(
        tcp_kernel.connection_file, ssh=sshd.destination, ssh_options=sshd.options(), transport=transport
    ) as k:
        assert k.call(os.getpid) == tcp_kernel.process.pid
        assert tunnel_clients(), "no ssh process carries the connection"
        array = np.arange(3 * 2**20, dtype=np.float64)  # 24 MB, both ways
        k.push(big=array)
        assert np.array_equal(k.pull("big"), array)
        k.delete("big")
        printed = k.call(lambda: print("through ssh") or 7)
        assert printed == 7
    assert not tunnel_clients(), "the tunnel outlived the Kernel"
    assert pid_running(tcp_kernel.process.pid), "close() must leave a connected kernel running"


def test_connect_with_ssh_bad_login_is_a_clear_error(sshd, tcp_kernel, tmp_path):
    other_key = keygen(tmp_path / "other")
    started = time.monotonic()
    with pytest.raises(kernelproxy.ConnectionFileError, match="Permission denied"):
        kernelproxy.connect(tcp_kernel.connection_file, ssh=sshd.destination, ssh_options=sshd.options(other_key))
    assert time.monotonic() - started < FAST
    assert not tunnel_clients()


def tunnel_clients() -> list[psutil.Process]:
    """Our ssh clients (not the test's sshd and its per-login children, which linger a moment)."""
    return [proc for proc in ssh_processes() if proc.name() == "ssh"]


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_restart_by_someone_else_through_ssh(sshd, transport):
    """Issue 13: the kernel's owner restarts it; through the tunnel the next call runs and old refs are stale."""
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")  # TCP on 127.0.0.1: what the tunnel forwards
    manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(json.loads(Path(manager.connection_file).read_text()))
        with kernelproxy.connect(
            manager.connection_file, ssh=sshd.destination, ssh_options=sshd.options(), transport=transport
        ) as k:
            ref = k.call_ref(lambda: ["before"])
            pid = k.info.pid
            manager.restart_kernel(now=True)
            assert k.options(timeout=FAST).call(os.getpid) != pid
            with pytest.raises(kernelproxy.StaleRefError):
                ref.get()
            assert k.status.restarts == 1
    finally:
        manager.shutdown_kernel(now=True)
        manager.cleanup_resources()
