"""The ``kernelproxy`` command line (also ``python -m kernelproxy``).

    kernelproxy list [--server URL]     kernels in Jupyter's runtime directory, or on a server
    kernelproxy info KERNEL             versions, transport, agent, pid, executable
    kernelproxy exec KERNEL CODE        run code there; its output here; a remote error exits 1
    kernelproxy bench [KERNEL]          latency and throughput on this machine, as a table

KERNEL is a connection file (a path, or a fragment such as ``kernel-12ab`` found
in Jupyter's runtime directory, as ``kernelproxy.connect`` takes it); with
``--server URL`` it is a kernel id on that server (or a unique prefix of one).
Commands attach to a kernel and ``close()`` it: a kernel they did not start keeps
running. Only the public API and the REST client are used here.

Exit status: 0 done; 1 the code ``exec`` ran raised or was interrupted (its
remote traceback is on stderr); 2 bad usage; 3 kernelproxy could not do it (no
such kernel, nobody answers, the server refused, the kernel died, a timeout),
said in one line on stderr; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import cloudpickle  # type: ignore[import-untyped]
import zmq
from jupyter_client.session import Session
from jupyter_core.paths import jupyter_runtime_dir

import kernelproxy

from ._server import ServerAddress, ServerClient

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1  # the code run in the kernel raised
EXIT_USAGE = 2  # argparse's own status for bad arguments
EXIT_FAILED = 3  # kernelproxy could not do what was asked
EXIT_INTERRUPTED = 130

DEFAULT_LIST_TIMEOUT = 1.0  # seconds a kernel in `list` has to answer its heartbeat
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds a kernel has to answer kernelproxy's handshake
DEFAULT_BENCH_SECONDS = 60.0
DEFAULT_BENCH_SIZES = "1,64"  # MB (2**20 bytes)
BENCH_VARIABLE = "_kernelproxy_bench"  # the kernel variable bench pushes and pulls, deleted after
RAW_TIMEOUT = 30.0  # seconds for one raw round trip in bench (a 1 GB buffer included)
MB = 2**20

# A function from the user's __main__ travels by value (its code pickled with every call), so the
# trivial call sends `add` as a user's script would; defined here it would go by reference and need
# kernelproxy installed in the kernel.
_MAIN_SOURCE = "def add(a, b):\n    return a + b\n"


class CommandError(Exception):
    """A failure the command line reports in one line (exit status 3) rather than as a traceback."""


class UsageError(Exception):
    """An argument the parser could not check (a server URL, sizes): one line, exit status 2."""


# ---------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        status: int = args.run(args)
    except KeyboardInterrupt:
        print(f"kernelproxy {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (kernelproxy.KernelProxyError, CommandError) as exc:
        print(f"kernelproxy {args.command}: {_one_line(exc)}{_hint(exc, args)}", file=sys.stderr)
        return EXIT_FAILED
    except UsageError as exc:
        print(f"kernelproxy {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        sys.stdout.flush()
    return status


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _hint(exc: BaseException, args: argparse.Namespace) -> str:
    server = getattr(args, "server", None)
    if isinstance(exc, kernelproxy.AuthenticationError):
        return " (here: --token T, ?token=T in the URL, or $JUPYTER_TOKEN)"
    if isinstance(exc, kernelproxy.ServerError) and server and exc.status == 404:
        return f" (`kernelproxy list --server {server}` shows its kernels)"
    if isinstance(exc, kernelproxy.ConnectionFileError):
        return f" (`kernelproxy list` shows the kernels in {jupyter_runtime_dir()})"
    return ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelproxy",
        description="Use a Jupyter kernel as a remote Python: list kernels, inspect one, run code, measure.",
        epilog=(
            "KERNEL is a connection file: a path, or a fragment of a kernel-*.json name in Jupyter's runtime "
            "directory (`kernelproxy list` shows them). With --server URL, KERNEL is a kernel id on that server "
            "(or a unique prefix). Exit status: 0 done, 1 the code run in the kernel raised, 2 bad usage, "
            "3 kernelproxy could not do it (one line on stderr says why), 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kernelproxy {kernelproxy.__version__}")
    parser.set_defaults(command=None)
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")

    server = argparse.ArgumentParser(add_help=False)
    group = server.add_argument_group("kernels on a Jupyter Server or gateway")
    group.add_argument("--server", metavar="URL", help="the server's URL, e.g. http://127.0.0.1:8888/")
    group.add_argument(
        "--token", metavar="T", help="the server's token (default: the URL's ?token=, else $JUPYTER_TOKEN)"
    )
    group.add_argument("--insecure", action="store_true", help="do not check the server's TLS certificate")
    group.add_argument("--cafile", metavar="PEM", help="check the server's TLS certificate against this CA bundle")

    connecting = argparse.ArgumentParser(add_help=False)
    group = connecting.add_argument_group("connecting")
    group.add_argument(
        "--transport", choices=("auto", "comm", "execute"), default="auto", help="kernelproxy's transport (auto)"
    )
    group.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help=f"seconds the kernel has to answer (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )

    p = verbs.add_parser(
        "list",
        parents=[server],
        help="kernels in Jupyter's runtime directory, or on a server",
        description=(
            "List the kernels whose connection files (kernel-*.json) are in Jupyter's runtime directory "
            "($JUPYTER_RUNTIME_DIR, else `jupyter --runtime-dir`), newest first: whether each answers its "
            "heartbeat, its pid (found among this machine's processes) and its implementation and Python. "
            "Files nobody answers at are reported as dead. With --server URL, list that server's kernels instead."
        ),
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_LIST_TIMEOUT,
        metavar="S",
        help=f"seconds each kernel has to answer (default {DEFAULT_LIST_TIMEOUT:g}); kernels are asked in parallel",
    )
    p.add_argument("--alive", action="store_true", help="show only kernels that answer")
    p.set_defaults(command="list", run=_cmd_list)

    p = verbs.add_parser(
        "info",
        parents=[connecting, server],
        help="versions, transport, agent, pid of a kernel",
        description=(
            "Attach to KERNEL and print what kernelproxy knows about it (Kernel.info): kernel implementation, "
            "Python, cloudpickle, pid, executable, hostname, transport, agent protocol; and this side's versions. "
            "The kernel keeps running."
        ),
    )
    p.add_argument("kernel", metavar="KERNEL", help="connection file or fragment; with --server, a kernel id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(command="info", run=_cmd_info)

    p = verbs.add_parser(
        "exec",
        parents=[connecting, server],
        help="run code in a kernel",
        description=(
            "Run Python statements in KERNEL's namespace (Kernel.exec). What the code prints appears on stdout "
            "and stderr; if it raises, the remote traceback goes to stderr and the exit status is 1. "
            "The kernel keeps running."
        ),
        epilog="example: kernelproxy exec kernel-12ab 'import sys; print(sys.version)'; "
        "kernelproxy exec kernel-12ab - < script.py",
    )
    p.add_argument("kernel", metavar="KERNEL", help="connection file or fragment; with --server, a kernel id")
    p.add_argument("code", metavar="CODE", help="the code; - reads it from stdin")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="interrupt the code after S seconds")
    p.set_defaults(command="exec", run=_cmd_exec)

    p = verbs.add_parser(
        "bench",
        parents=[connecting, server],
        help="latency and throughput check, as a table",
        description=(
            "Measure kernelproxy on this machine: a trivial call's latency, calls per second, push and pull "
            "throughput; and, on the same kernel in the same run, the raw Jupyter floor (a kernel_info round "
            "trip, a silent execute, the same bytes sent raw), which the ratios divide by. Without KERNEL a "
            "fresh kernel is started (with --server: on the server) and shut down after. On a kernel of yours "
            f"bench pushes and deletes one variable, {BENCH_VARIABLE}."
        ),
    )
    p.add_argument(
        "kernel", metavar="KERNEL", nargs="?", help="connection file or fragment; with --server, a kernel id"
    )
    p.add_argument(
        "--seconds",
        type=_positive_float,
        default=DEFAULT_BENCH_SECONDS,
        metavar="S",
        help=f"how long to measure (default {DEFAULT_BENCH_SECONDS:g}; starting a kernel is extra)",
    )
    p.add_argument(
        "--sizes",
        default=DEFAULT_BENCH_SIZES,
        metavar="MB,MB",
        help=f"push/pull sizes in MB (default {DEFAULT_BENCH_SIZES})",
    )
    p.set_defaults(command="bench", run=_cmd_bench)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


# ---------------------------------------------------------------------- opening kernels


@dataclass
class _Opened:
    kernel: kernelproxy.Kernel
    started: bool  # started for this command: shut down after; otherwise only closed


def _server_address(args: argparse.Namespace) -> ServerAddress:
    try:
        return ServerAddress.parse(args.server, token=args.token, verify=_verify(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _verify(args: argparse.Namespace) -> bool | str:
    if args.insecure and args.cafile:
        raise UsageError("--insecure and --cafile contradict each other: give one")
    return False if args.insecure else (args.cafile or True)


def _open(args: argparse.Namespace, *, may_start: bool = False) -> _Opened:
    """The kernel a command works on: attached (left running at the end) or, for bench, started."""
    if args.server:
        address = _server_address(args)
        kernel_id = _resolve_server_kernel(address, args.kernel) if args.kernel else None
        kernel = kernelproxy.connect_server(
            address.url,
            token=address.token,
            kernel_id=kernel_id,
            verify=address.verify,
            transport=args.transport,
            startup_timeout=args.connect_timeout if kernel_id else 60.0,
        )
        return _Opened(kernel, started=kernel_id is None)
    if args.kernel is None:
        assert may_start
        return _Opened(kernelproxy.start(transport=args.transport), started=True)
    return _Opened(
        kernelproxy.connect(args.kernel, transport=args.transport, startup_timeout=args.connect_timeout),
        started=False,
    )


def _resolve_server_kernel(address: ServerAddress, wanted: str) -> str:
    """A kernel id on the server: ``wanted`` itself, or the one kernel whose id starts with it."""
    try:
        kernels = _server_kernels(address)
    except kernelproxy.ServerUnreachableError:
        raise
    except kernelproxy.ServerError:  # gateways may refuse to list kernels: then the id must be whole
        return wanted
    ids = [str(model.get("id", "")) for model in kernels]
    if wanted in ids:
        return wanted
    matches = [kernel_id for kernel_id in ids if kernel_id.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CommandError(f"{wanted!r} matches {len(matches)} kernels on {address.url}: give more of the id")
    raise CommandError(
        f"no kernel {wanted!r} on {address.url} (it has {len(ids)}); "
        f"`kernelproxy list --server {address.url}` shows them"
    )


def _server_kernels(address: ServerAddress) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        client = ServerClient(address)  # created in the loop that uses it
        try:
            return await client.list_kernels()
        finally:
            client.close()

    return asyncio.run(fetch())


def _close(opened: _Opened) -> None:
    if opened.started:
        opened.kernel.shutdown()
    else:
        opened.kernel.close()  # never shut down a kernel we attached to


# ---------------------------------------------------------------------- list


def _cmd_list(args: argparse.Namespace) -> int:
    if args.server:
        return _list_server(args)
    directory = jupyter_runtime_dir()
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "kernel-*.json")), key=_mtime, reverse=True)
    if not paths:
        print(f"no kernel connection files (kernel-*.json) in {directory}", file=sys.stderr)
        return EXIT_OK
    processes = _kernel_processes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(paths))) as workers:
        statuses = list(workers.map(lambda path: _probe(path, args.timeout, processes), paths))
    rows = [
        [status.path, status.state, str(status.pid) if status.pid else "-", status.describe()]
        for status in statuses
        if status.alive or not args.alive
    ]
    _print_table(["CONNECTION FILE", "STATE", "PID", "KERNEL"], rows, sys.stdout)
    return EXIT_OK


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


@dataclass
class _Process:
    pid: int
    executable: str
    is_kernel: bool  # its command line names ipykernel (not a wrapper that launched it)


@dataclass
class _Probe:
    path: str
    state: str  # "alive", "dead", "invalid"
    detail: str = ""  # implementation and Python, or why it is dead/invalid
    pid: int | None = None
    executable: str = ""

    @property
    def alive(self) -> bool:
        return self.state == "alive"

    def describe(self) -> str:
        if self.executable:
            return f"{self.detail} ({self.executable})" if self.detail else self.executable
        return self.detail


def _probe(path: str, timeout: float, processes: Mapping[str, _Process]) -> _Probe:
    """Ask one connection file's kernel, without kernelproxy's handshake: heartbeat, then kernel_info on control."""
    try:
        with open(path, encoding="utf-8") as file:
            info = json.load(file)
        if not isinstance(info, dict) or "hb_port" not in info or "ip" not in info:
            raise ValueError("not a kernel connection file")
    except (OSError, ValueError) as exc:
        return _Probe(path, "invalid", f"unreadable: {exc}")
    process = processes.get(os.path.realpath(path))
    with contextlib.closing(_RawKernel(info)) as raw:
        if not raw.ping(timeout):
            return _Probe(path, "dead", f"no heartbeat within {timeout:g} s")
        probe = _Probe(path, "alive", pid=process.pid if process else None)
        probe.executable = process.executable if process else ""
        try:
            reply = raw.request("control", "kernel_info_request", {}, timeout)  # control: answered while busy
        except ValueError:  # a reply signed with another key
            probe.detail = "answers, but not with its file's key"
            return probe
    if reply is None:
        probe.detail = "no kernel_info reply"
        return probe
    content = reply["content"]
    language = content.get("language_info", {})
    implementation = f"{content.get('implementation', '?')} {content.get('implementation_version', '')}".strip()
    name = str(language.get("name", "?"))
    probe.detail = f"{implementation}, {name.capitalize() if name == 'python' else name} {language.get('version', '?')}"
    return probe


def _kernel_processes() -> dict[str, _Process]:
    """This machine's processes by the connection files on their command lines (Linux /proc; elsewhere none)."""
    found: dict[str, _Process] = {}
    if not os.path.isdir("/proc/self"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                argv = [part.decode(errors="replace") for part in file.read().split(b"\0") if part]
        except OSError:
            continue
        files = [arg for arg in argv if arg.endswith(".json")]
        if not files:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")  # a relative path on the command line is relative to it
        except OSError:
            cwd = "/"
        executable = argv[0]
        if not os.path.isabs(executable):  # as the kernel's sys.executable reads (a venv's, not its base's)
            try:
                executable = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                pass
        process = _Process(int(entry), executable, any("ipykernel" in arg for arg in argv))
        for file_name in files:
            key = os.path.realpath(os.path.join(cwd, file_name))
            known = found.get(key)
            if known is None or (process.is_kernel and not known.is_kernel):
                found[key] = process
    return found


def _list_server(args: argparse.Namespace) -> int:
    address = _server_address(args)
    kernels = _server_kernels(address)
    if not kernels:
        print(f"no kernels on {address.url}", file=sys.stderr)
        return EXIT_OK
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [
        [
            str(model.get("id", "?")),
            str(model.get("name", "?")),
            str(model.get("execution_state", "?")),
            str(model.get("connections", "?")),
            _activity(model.get("last_activity"), now),
        ]
        for model in kernels
    ]
    _print_table(["KERNEL ID", "NAME", "STATE", "CONNECTIONS", "LAST ACTIVITY"], rows, sys.stdout)
    return EXIT_OK


def _activity(stamp: object, now: datetime.datetime) -> str:
    if not isinstance(stamp, str) or not stamp:
        return "-"
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return f"{stamp} ({_ago((now - when).total_seconds())})"


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


# ---------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace) -> int:
    opened = _open(args)
    try:
        info = opened.kernel.info
    finally:
        _close(opened)
    host = {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "kernelproxy": kernelproxy.__version__,
    }
    if args.json:
        print(json.dumps({**dataclasses.asdict(info), "host": host}, indent=2))
        return EXIT_OK
    rows = [[field.name.replace("_", " "), _text(getattr(info, field.name))] for field in dataclasses.fields(info)]
    rows.append(
        ["host", f"Python {host['python']}, cloudpickle {host['cloudpickle']}, kernelproxy {host['kernelproxy']}"]
    )
    _print_table(None, rows, sys.stdout)
    return EXIT_OK


def _text(value: object) -> str:
    return "-" if value is None else str(value)


# ---------------------------------------------------------------------- exec


def _cmd_exec(args: argparse.Namespace) -> int:
    code = sys.stdin.read() if args.code == "-" else args.code
    opened = _open(args)
    try:
        opened.kernel.exec(code, timeout=args.timeout)
    except kernelproxy.CallInterrupted as exc:  # interrupted in the kernel: where it was is the code's business
        print(f"kernelproxy exec: {exc}", file=sys.stderr)
        return EXIT_REMOTE_ERROR
    except kernelproxy.KernelProxyError as exc:
        if not isinstance(exc, kernelproxy.RemoteError):
            raise  # kernelproxy's own failure: one line, status 3
        _print_remote_error(exc)
        return EXIT_REMOTE_ERROR
    except Exception as exc:  # noqa: BLE001 (the code's own exception, re-raised here with its remote traceback)
        _print_remote_error(exc)
        return EXIT_REMOTE_ERROR
    finally:
        sys.stdout.flush()
        _close(opened)
    return EXIT_OK


def _print_remote_error(exc: BaseException) -> None:
    """The remote traceback alone: the frames in this process are kernelproxy's, not the user's."""
    text = _remote_traceback(exc)
    if text is None:
        text = "".join(_format_exception_only(exc))
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _remote_traceback(exc: BaseException) -> str | None:
    if isinstance(exc, kernelproxy.RemoteError):
        return exc.traceback or None
    cause = exc.__cause__
    if cause is not None:  # the remote traceback travels as the re-raised exception's cause
        for candidate in (getattr(cause, "traceback", None), *cause.args, str(cause)):
            if isinstance(candidate, str) and "Traceback (most recent call last)" in candidate:
                return candidate.strip().strip('"').strip() + "\n"
    return None


def _format_exception_only(exc: BaseException) -> list[str]:
    import traceback

    return traceback.format_exception_only(type(exc), exc)


# ---------------------------------------------------------------------- bench


@dataclass
class _Row:
    what: str
    samples: list[float]  # seconds per operation
    nbytes: int = 0  # per operation, for throughput rows
    per_second: float | None = None  # rate rows: operations per second
    vs: str = "-"  # ratio to the same run's floor


def _cmd_bench(args: argparse.Namespace) -> int:
    sizes = _parse_sizes(args.sizes)
    budget = args.seconds
    began = time.perf_counter()
    if args.kernel is None:
        where = f"on {args.server}" if args.server else "a fresh local kernel"
        _progress(began, f"starting {where} (shut down after)")
    opened = _open(args, may_start=True)
    raw: _RawKernel | None = None
    try:
        kernel = opened.kernel
        info = kernel.info
        if info.connection_file is not None and info.server is None:
            with open(info.connection_file, encoding="utf-8") as file:
                raw = _RawKernel(json.load(file))
        _print_bench_header(info, opened.started, budget)
        sys.stdout.flush()
        start = time.perf_counter()  # the phases share the budget: 35% latency, 15% calls/s, 50% transfers
        rows = _bench_latency(kernel, raw, began, start + budget * 0.35)
        rows += _bench_rate(kernel, began, start + budget * 0.5)
        rows += _bench_transfers(kernel, raw, began, start + budget, sizes)
        _progress(began, "done")
    finally:
        if raw is not None:
            raw.close()
        _close(opened)
    table = [_format_row(row) for row in rows]
    _print_table(["", "median", "p90", "n", "vs same-run floor"], table, sys.stdout, right=(1, 2, 3))
    if raw is None:
        print("(no raw floor: the kernel is reached through a server; ratios need its zmq sockets)")
    return EXIT_OK


def _left(until: float) -> float:
    return max(until - time.perf_counter(), 0.0)


def _parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--sizes takes sizes in MB separated by commas, e.g. 1,64; not {text!r}") from None
    if not sizes or any(size <= 0 for size in sizes):
        raise UsageError(f"--sizes takes positive sizes in MB, e.g. 1,64; not {text!r}")
    return sizes


def _progress(began: float, message: str) -> None:
    print(f"[{time.perf_counter() - began:6.1f}s] {message}", file=sys.stderr, flush=True)


def _print_bench_header(info: kernelproxy.KernelInfo, started: bool, budget: float) -> None:
    cores = os.cpu_count() or "?"
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"kernelproxy {kernelproxy.__version__} bench: {budget:g} s on {platform.node()} ({cores} cores{load})")
    origin = "started for this run" if started else (info.connection_file or info.kernel_id or "attached")
    where = f" on {info.server}" if info.server else ""
    print(
        f"kernel: pid {info.pid}{where}, {info.implementation} {info.implementation_version}, "
        f"Python {info.python}, cloudpickle {info.cloudpickle}; {origin}"
    )
    print(f"transport: {info.transport}")


def _bench_function() -> Callable[[int, int], int]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(_MAIN_SOURCE, "<kernelproxy-bench>", "exec"), namespace)  # noqa: S102 (our own constant)
    add: Callable[[int, int], int] = namespace["add"]
    return add


def _bench_latency(kernel: kernelproxy.Kernel, raw: _RawKernel | None, origin: float, until: float) -> list[_Row]:
    """Round trips, interleaved in rounds with rotating order so that drift in load hits all alike."""
    add = _bench_function()
    variants: list[tuple[_Row, Callable[[], object]]] = [
        (_Row("trivial call: k.call(add, 1, 2)", []), lambda: kernel.call(add, 1, 2)),
    ]
    if raw is not None:
        execute = {"code": "1+2", "silent": True, "store_history": False, "user_expressions": {}, "allow_stdin": False}
        variants.append((_Row("raw: kernel_info_request", []), lambda: raw.roundtrip("kernel_info_request", {})))
        variants.append((_Row("raw: execute '1+2' silent", []), lambda: raw.roundtrip("execute_request", execute)))
    kinds = "k.call, raw kernel_info and raw execute, interleaved" if raw is not None else "k.call"
    _progress(origin, f"latency: {kinds}, for {_left(until):.1f} s")
    for _, action in variants:  # warm-up: the agent, imports, caches
        for _ in range(10):
            action()
    turn = 0
    while time.perf_counter() < until or turn < len(variants):
        for index in range(len(variants)):
            row, action = variants[(turn + index) % len(variants)]
            for _ in range(20):
                began = time.perf_counter()
                action()
                row.samples.append(time.perf_counter() - began)
        turn += 1
    rows = [row for row, _ in variants]
    if raw is not None:
        floor = statistics.median(rows[1].samples)
        for row in rows:
            row.vs = f"{statistics.median(row.samples) / floor:.2f}x kernel_info"
        rows[1].vs = "floor"
    return rows


def _bench_rate(kernel: kernelproxy.Kernel, origin: float, until: float) -> list[_Row]:
    """Calls per second with many in flight (submit) and one at a time, alternating so that drift hits both."""
    add = _bench_function()
    batch = 64
    _progress(origin, f"calls/s: {batch} at a time and one at a time, alternating, for {_left(until):.1f} s")
    sequential = pipelined = 0.0  # seconds spent on each kind, `batch` calls at a time
    rounds = 0
    while not rounds or time.perf_counter() < until:
        began = time.perf_counter()
        futures = [kernel.submit(add, 1, 2) for _ in range(batch)]
        for future in futures:
            future.result()
        middle = time.perf_counter()
        for _ in range(batch):
            kernel.call(add, 1, 2)
        pipelined += middle - began
        sequential += time.perf_counter() - middle
        rounds += 1
    in_flight = rounds * batch / pipelined
    one_at_a_time = rounds * batch / sequential
    return [
        _Row("calls/s, one at a time (call)", [], per_second=one_at_a_time),
        _Row(
            f"calls/s, {batch} in flight (submit)",
            [],
            per_second=in_flight,
            vs=f"{in_flight / one_at_a_time:.2f}x one at a time",
        ),
    ]


def _bench_transfers(
    kernel: kernelproxy.Kernel, raw: _RawKernel | None, origin: float, until: float, sizes: Sequence[float]
) -> list[_Row]:
    """Push and pull each size; the floor: the same bytes sent raw as a kernel_info_request buffer."""
    make, payload_name = _payload_maker(kernel)
    rows: list[_Row] = []
    kernel.push({BENCH_VARIABLE: make(MB)})  # warm-up: the kernel imports what unpickling needs
    kernel.pull(BENCH_VARIABLE)
    for index, size in enumerate(sizes):
        window = _left(until) / (len(sizes) - index)  # what earlier sizes left over goes to later ones
        nbytes = int(size * MB)
        label = _size_label(size)
        _progress(origin, f"push/pull {label} ({payload_name}) for {window:.1f} s")
        value = make(nbytes)
        push = _Row(f"push {label}: k.push(...)", [], nbytes)
        pull = _Row(f"pull {label}: k.pull(...)", [], nbytes)
        floor = _Row(f"raw: {label} in a kernel_info_request", [], nbytes, vs="floor")
        deadline = time.perf_counter() + window
        while not push.samples or time.perf_counter() < deadline:
            began = time.perf_counter()
            kernel.push({BENCH_VARIABLE: value})
            pushed = time.perf_counter()
            back = kernel.pull(BENCH_VARIABLE)
            push.samples.append(pushed - began)
            pull.samples.append(time.perf_counter() - pushed)
            if len(pull.samples) == 1 and not _same(back, value):
                raise CommandError(f"the {label} value pulled back differs from the one pushed")
            del back
            if raw is not None:
                began = time.perf_counter()
                raw.roundtrip("kernel_info_request", {}, buffers=[memoryview(value)])
                floor.samples.append(time.perf_counter() - began)
        kernel.delete(BENCH_VARIABLE)
        if floor.samples:
            floor_rate = nbytes / statistics.median(floor.samples)
            for row in (push, pull):
                row.vs = f"{nbytes / statistics.median(row.samples) / floor_rate:.2f}x raw"
            rows += [push, pull, floor]
        else:
            rows += [push, pull]
    return rows


def _payload_maker(kernel: kernelproxy.Kernel) -> tuple[Callable[[int], Any], str]:
    """numpy arrays when both sides have numpy (their data travels out-of-band, as users' arrays do), else bytes."""
    try:
        import numpy
    except ImportError:
        return (lambda nbytes: bytes(nbytes)), "bytes (no numpy here)"
    if kernel.eval("__import__('importlib.util').util.find_spec('numpy') is not None"):
        return (lambda nbytes: numpy.ones(nbytes // 8)), "numpy float64 arrays"
    return (lambda nbytes: bytes(nbytes)), "bytes (no numpy in the kernel)"


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, bytes):
        return bool(a == b)
    return bool(a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all()))


def _size_label(size: float) -> str:
    return f"{size:g} MB"


def _format_row(row: _Row) -> list[str]:
    if row.per_second is not None:
        return [row.what, f"{row.per_second:,.0f}/s", "", "", row.vs]
    median = statistics.median(row.samples)
    p90 = _p90(row.samples)
    n = f"{len(row.samples):,}"
    if row.nbytes:  # throughput; p90 is the slow tail: the size over the p90 time
        return [row.what, _rate(row.nbytes / median), _rate(row.nbytes / p90), n, row.vs]
    return [row.what, _ms(median), _ms(p90), n, row.vs]


def _p90(samples: Sequence[float]) -> float:
    """The 90th percentile, interpolating linearly between ranks (numpy's default)."""
    ordered = sorted(samples)
    rank = 0.9 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MB:,.0f} MB/s"


# ---------------------------------------------------------------------- raw Jupyter messages


class _RawKernel:
    """Jupyter messages to one kernel straight over its zmq sockets: no kernelproxy, no channel threads.

    ``list`` asks with it without installing anything (heartbeat; kernel_info on
    the control channel, which ipykernel answers also while busy); ``bench``
    measures the floor its ratios divide by.
    """

    def __init__(self, info: Mapping[str, Any]) -> None:
        self._info = info
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        key = str(info.get("key", "")).encode()
        self._session = Session(key=key, signature_scheme=str(info.get("signature_scheme", "hmac-sha256")))
        self._sockets: dict[str, zmq.Socket[bytes]] = {}

    def _address(self, channel: str) -> str:
        transport = str(self._info.get("transport", "tcp"))
        ip = str(self._info["ip"])
        port = self._info[f"{channel}_port"]
        if transport == "ipc":
            return f"ipc://{ip}-{port}"
        if ip in ("0.0.0.0", "*", ""):
            ip = "127.0.0.1"
        return f"{transport}://{ip}:{port}"

    def _socket(self, channel: str, kind: int) -> zmq.Socket[bytes]:
        socket = self._context.socket(kind)
        socket.linger = 0
        socket.connect(self._address(channel))
        return socket

    def ping(self, timeout: float) -> bool:
        """Whether the kernel answers its heartbeat within ``timeout`` seconds."""
        with self._socket("hb", zmq.REQ) as socket:
            socket.send(b"ping")
            return bool(socket.poll(int(timeout * 1000)))

    def request(
        self, channel: str, msg_type: str, content: dict[str, Any], timeout: float, buffers: Sequence[memoryview] = ()
    ) -> dict[str, Any] | None:
        """Send one request on shell or control and return its reply (None: none within ``timeout``).

        Raises ValueError when a reply is signed with another key.
        """
        socket = self._sockets.get(channel)
        if socket is None:
            socket = self._sockets[channel] = self._socket(channel, zmq.DEALER)
        sent = self._session.send(socket, msg_type, content, buffers=list(buffers))  # type: ignore[arg-type]
        assert sent is not None
        msg_id = sent["header"]["msg_id"]
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not socket.poll(int(remaining * 1000) + 1):
                return None
            _, reply = self._session.recv(socket, mode=0)
            if reply is not None and reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def roundtrip(self, msg_type: str, content: dict[str, Any], buffers: Sequence[memoryview] = ()) -> None:
        """A shell request that must be answered (bench)."""
        if self.request("shell", msg_type, content, RAW_TIMEOUT, buffers) is None:
            raise CommandError(f"the kernel did not answer a raw {msg_type} within {RAW_TIMEOUT:g} s")

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close()
        self._sockets.clear()
        self._context.term()


# ---------------------------------------------------------------------- output


def _print_table(
    headers: Sequence[str] | None, rows: Sequence[Sequence[str]], out: TextIO, right: Sequence[int] = ()
) -> None:
    """Columns padded to their widest cell (``right``: numbers, aligned right); the last column is not padded."""
    lines = ([list(headers)] if headers else []) + [list(row) for row in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(line[:-1], widths))
        ]
        cells.append(line[-1])
        out.write("  ".join(cells).rstrip() + "\n")
