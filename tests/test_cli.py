"""The command line, run as `python -m kernelproxy ...` against real kernels.

One ipykernel started by hand (as Jupyter does) whose connection file sits in a
runtime directory of our own (JUPYTER_RUNTIME_DIR), shared by the module's
tests; a fresh kernel for `bench` without KERNEL; the session's Jupyter Server
for `--server`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ExternalKernel, start_external_kernel, stop_external_kernel, wait_pid_gone
from jupyter_client.connect import write_connection_file

import kernelproxy
from kernelproxy._cli import main

CLI_TIMEOUT = 90  # seconds for one command: a hang fails the test instead of stalling it


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def cli_kernel(runtime_dir: Path) -> Iterator[ExternalKernel]:
    """A running kernel kernelproxy did not start, its connection file in ``runtime_dir``."""
    kernel = start_external_kernel(runtime_dir)
    try:
        kernelproxy.connect(str(kernel.connection_file), startup_timeout=30).close()  # it answers: ready
        yield kernel
    finally:
        stop_external_kernel(kernel)


def run_cli(
    runtime_dir: Path, *args: str, stdin: str | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir)}
    env.pop("JUPYTER_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "kernelproxy", *args],
        input=stdin if stdin is not None else "",
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure as the CLI must report it: status 3, one line on stderr, no traceback."""
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("verb", [None, "list", "info", "exec", "bench"])
def test_help(verb: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*([verb] if verb else []), "--help"])  # in-process: no kernel involved, no interpreter to start
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: kernelproxy {verb or ''}".rstrip())


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: kernelproxy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--seconds", "0"])
    assert exit_.value.code == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["bench", "--sizes", "1,x"]) == 2
    assert "--sizes takes sizes in MB" in capsys.readouterr().err


def test_python_dash_m_and_the_entry_point_are_the_same_command(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--version")
    assert (result.returncode, result.stdout) == (0, f"kernelproxy {kernelproxy.__version__}\n")
    from importlib.metadata import distribution

    scripts = {ep.name: ep.value for ep in distribution("kernelproxy").entry_points if ep.group == "console_scripts"}
    assert scripts["kernelproxy"] == "kernelproxy._cli:main"


# ---------------------------------------------------------------------- list


def test_list_shows_the_kernel_and_reports_a_dead_file(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    dead = runtime_dir / "kernel-nobody-home.json"
    write_connection_file(str(dead), ip="127.0.0.1", key=b"some-key")  # nothing listens at its ports
    try:
        with kernelproxy.connect(str(cli_kernel.connection_file)) as k:
            busy = k.submit(time.sleep, 30)  # a busy kernel answers kernel_info on its control channel
            time.sleep(0.3)
            began = time.monotonic()
            result = run_cli(runtime_dir, "list", "--timeout", "1")
            elapsed = time.monotonic() - began
            assert not busy.done(), "the kernel was not busy during list: make it sleep longer"
            k.interrupt()
            with pytest.raises(kernelproxy.CallInterrupted):
                busy.result()
        assert result.returncode == 0, result.stderr
        lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
        alive = lines[str(cli_kernel.connection_file)]
        assert alive.split()[1:3] == ["alive", str(cli_kernel.process.pid)]
        assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in alive
        assert "ipython" in alive
        assert lines[str(dead)].split()[1] == "dead"
        assert "no heartbeat within 1 s" in lines[str(dead)]
        assert elapsed < 15, f"a dead file must not hang list ({elapsed:.1f} s)"  # interpreter start included

        alive_only = run_cli(runtime_dir, "list", "--alive", "--timeout", "1")
        assert str(cli_kernel.connection_file) in alive_only.stdout
        assert str(dead) not in alive_only.stdout
    finally:
        dead.unlink()


def test_list_of_an_empty_runtime_directory(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "list")
    assert result.returncode == 0
    assert result.stdout == ""
    assert f"no kernel connection files (kernel-*.json) in {tmp_path}" in result.stderr


# ---------------------------------------------------------------------- info


def test_info_shows_the_kernel_and_leaves_it_running(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    result = run_cli(runtime_dir, "info", cli_kernel.fragment)
    assert result.returncode == 0, result.stderr
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())
    assert fields["pid"] == str(cli_kernel.process.pid)
    assert fields["connection file"] == str(cli_kernel.connection_file)
    assert fields["implementation"] == "ipython"
    assert fields["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert fields["transport"].startswith("comm")
    assert fields["agent protocol"].isdigit()
    assert fields["host"].startswith("Python ")
    for name in ("cloudpickle", "executable", "hostname", "implementation version"):
        assert fields[name] not in ("", "-"), name
    assert cli_kernel.process.poll() is None, "info must not shut down a kernel it attached to"

    as_json = json.loads(run_cli(runtime_dir, "info", "--json", "--transport", "execute", cli_kernel.fragment).stdout)
    assert as_json["pid"] == cli_kernel.process.pid
    assert as_json["transport"].startswith("execute")
    assert as_json["host"]["kernelproxy"] == kernelproxy.__version__


def test_unknown_kernel_is_one_line_saying_what_to_do(runtime_dir: Path) -> None:
    line = one_line_error(run_cli(runtime_dir, "info", "no-such-kernel"))
    assert "no-such-kernel" in line
    assert "kernelproxy list" in line


def test_dead_kernel_file_is_one_line(tmp_path: Path) -> None:
    dead = tmp_path / "kernel-dead.json"
    write_connection_file(str(dead), ip="127.0.0.1", key=b"some-key")
    line = one_line_error(run_cli(tmp_path, "exec", str(dead), "1", "--connect-timeout", "1"))
    assert str(dead) in line


# ---------------------------------------------------------------------- exec


def test_exec_prints_the_kernels_output(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    code = "import sys\nprint('to stdout', 6 * 7)\nprint('to stderr', file=sys.stderr)\ncli_x = 5"
    result = run_cli(runtime_dir, "exec", cli_kernel.fragment, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "to stdout 42\n"
    assert "to stderr" in result.stderr
    # The namespace is the kernel's: a later command sees what this one left there.
    assert run_cli(runtime_dir, "exec", cli_kernel.fragment, "print(cli_x * 2)").stdout == "10\n"


def test_exec_reads_code_from_stdin(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    result = run_cli(runtime_dir, "exec", cli_kernel.fragment, "-", stdin="for i in range(3):\n    print(i)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1", "2"]


def test_exec_error_prints_the_remote_traceback_and_exits_1(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    code = "print('before')\ndef cli_fails(n):\n    raise ValueError(f'boom {n}')\ncli_fails(3)\n"
    result = run_cli(runtime_dir, "exec", cli_kernel.fragment, code)
    assert result.returncode == 1
    assert result.stdout == "before\n"
    stderr = result.stderr
    assert stderr.startswith("Traceback (most recent call last):"), stderr
    assert "in cli_fails" in stderr and "line 3" in stderr
    assert stderr.rstrip().endswith("ValueError: boom 3")
    assert "kernelproxy/_" not in stderr, "only the remote frames: this process's are kernelproxy's own"
    assert cli_kernel.process.poll() is None


def test_exec_timeout_is_one_line(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    line = one_line_error(
        run_cli(runtime_dir, "exec", cli_kernel.fragment, "import time; time.sleep(30)", "--timeout", "1")
    )
    assert "interrupted" in line
    assert run_cli(runtime_dir, "exec", cli_kernel.fragment, "print('still usable')").stdout == "still usable\n"


# ---------------------------------------------------------------------- bench


def bench_rows(stdout: str) -> dict[str, str]:
    return {line.split("  ")[0]: line for line in stdout.splitlines()}


def test_bench_on_a_given_kernel(runtime_dir: Path, cli_kernel: ExternalKernel) -> None:
    result = run_cli(runtime_dir, "bench", cli_kernel.fragment, "--seconds", "3", "--sizes", "1,4")
    assert result.returncode == 0, result.stderr
    rows = bench_rows(result.stdout)
    assert f"kernel: pid {cli_kernel.process.pid}," in result.stdout
    assert re.search(r"[\d.]+ ms +[\d.]+ ms +[\d,]+ +[\d.]+x kernel_info$", rows["trivial call: k.call(add, 1, 2)"])
    assert rows["raw: kernel_info_request"].endswith("floor")
    assert "x kernel_info" in rows["raw: execute '1+2' silent"]
    assert re.search(r"[\d,]+/s +[\d.]+x one at a time$", rows["calls/s, 64 in flight (submit)"])
    assert re.search(r"[\d,]+/s +-$", rows["calls/s, one at a time (call)"])
    for size in ("1 MB", "4 MB"):
        for verb in ("push", "pull"):
            assert re.search(r"[\d,]+ MB/s +[\d,]+ MB/s +[\d,]+ +[\d.]+x raw$", rows[f"{verb} {size}: k.{verb}(...)"])
        assert rows[f"raw: {size} in a kernel_info_request"].endswith("floor")
    check = "print(sorted(n for n in dir() if n.startswith('_kernelproxy')))"
    assert run_cli(runtime_dir, "exec", cli_kernel.fragment, check).stdout == "[]\n", "bench cleans up its variable"
    assert cli_kernel.process.poll() is None


def test_bench_starts_a_kernel_and_shuts_it_down(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "bench", "--seconds", "2", "--sizes", "1")
    assert result.returncode == 0, result.stderr
    assert "started for this run" in result.stdout
    assert "push 1 MB: k.push(...)" in result.stdout
    pid = int(re.search(r"kernel: pid (\d+),", result.stdout).group(1))  # type: ignore[union-attr]
    assert wait_pid_gone(pid, 10), f"bench left its kernel (pid {pid}) running"


# ---------------------------------------------------------------------- a Jupyter Server


def test_server_list_info_exec(jupyter_server, tmp_path: Path) -> None:
    server = ("--server", jupyter_server.url, "--token", jupyter_server.token)
    with kernelproxy.connect_server(jupyter_server.url, token=jupyter_server.token) as k:
        kernel_id = k.info.kernel_id
        assert kernel_id is not None
        listed = run_cli(tmp_path, "list", *server)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[0].split()[2:] == ["NAME", "STATE", "CONNECTIONS", "LAST", "ACTIVITY"]
        (line,) = [line for line in listed.stdout.splitlines() if line.startswith(kernel_id)]
        assert line.split()[1:3] == ["python3", "idle"]
        assert line.split()[3].isdigit()
        assert line.endswith(" ago)")

        info = run_cli(tmp_path, "info", *server, kernel_id[:8])  # a unique prefix of the id will do
        assert info.returncode == 0, info.stderr
        assert re.search(rf"^kernel id +{kernel_id}$", info.stdout, re.MULTILINE)
        assert re.search(rf"^pid +{k.info.pid}$", info.stdout, re.MULTILINE)

        ran = run_cli(tmp_path, "exec", *server, kernel_id, "print('through the server'); 1/0")
        assert ran.returncode == 1
        assert ran.stdout == "through the server\n"
        assert ran.stderr.rstrip().endswith("ZeroDivisionError: division by zero")

        assert k.call(pow, 2, 5) == 32, "the kernel the CLI attached to is still there and usable"

        unknown = one_line_error(run_cli(tmp_path, "info", *server, "no-such-id"))
        assert "kernelproxy list --server" in unknown


def test_server_errors_are_one_line(jupyter_server, tmp_path: Path) -> None:
    line = one_line_error(run_cli(tmp_path, "list", "--server", jupyter_server.url, "--token", "wrong"))
    assert "token" in line and "--token T" in line
    result = run_cli(tmp_path, "list", "--server", "not-a-url")
    assert result.returncode == 2 and "server URL looks like" in result.stderr
