"""Soak test: many mixed calls from many threads on one kernel, per transport.

    python benchmarks/soak.py [--calls 10000 --threads 8 --transports comm,execute]

Each transport gets a fresh kernel and ``--calls`` requests from ``--threads`` threads at once, a mix of
small calls, 1 MB numpy round trips, exceptions raised in the kernel, RemoteRefs (created with call_ref,
used through a method call, dropped), and push/pull. Every result is checked, including that it reached
the thread that asked for it.

Memory and resources are sampled after a warm-up (the first ``--warmup`` calls) and at the end, each time
with no call in flight, after a garbage collection and ``malloc_trim`` on both sides so that RSS counts live
memory. The table shows growth between the two samples; the script exits non-zero if a check fails
(a wrong result, an unexpected error, RSS growth of ``--max-growth`` MB or more, kept objects or transfers
left in the kernel, a file descriptor or thread leaked).

About signature histories: jupyter_client's Session remembers the signature of every message it has
verified (``digest_history``, to refuse replays) until it holds ``digest_history_size`` of them (65536 by
default), then forgets a random tenth. Both sides grow by ~150 bytes per message until then, i.e. up to ~10 MB
per connection: bounded, but above a 5 MB limit over 10,000 calls. The table shows how many signatures each
side added; ``--digest-history-size N`` caps the host's history (kernelproxy does not today) to show the
growth that remains without it.

Not a test (it takes a couple of minutes) and not part of the package.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np
import psutil

import kernelproxy

# The functions below run in the kernel, which cannot import this file: send them by value also when
# this module is imported rather than run as a script.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1024 * 1024
ARRAY_ITEMS = MB // 8  # a 1 MB float64 array
AGENT = "__import__('sys').modules['_kernelproxy_agent_v1']"

from _common import TRIM_SOURCE  # noqa: E402 - benchmarks/ is on sys.path when this script runs

# ---------------------------------------------------------------------- what runs in the kernel (pickled by value)


def small(thread_id: int, index: int) -> tuple[int, int, int]:
    return thread_id, index, os.getpid()


def array_round_trip(array: np.ndarray, thread_id: int) -> np.ndarray:
    return array * 2 + thread_id


def raise_tagged(thread_id: int, index: int) -> None:
    raise ValueError(f"expected failure {thread_id}:{index}")


class Counter:
    """Kept in the kernel through a RemoteRef."""

    def __init__(self, owner: int, start: int) -> None:
        self.owner = owner
        self.value = start

    def add(self, amount: int) -> tuple[int, int]:
        self.value += amount
        return self.owner, self.value


# ---------------------------------------------------------------------- the load


@dataclass
class Tally:
    calls: int = 0
    errors_expected: int = 0
    errors_seen: int = 0
    wrong: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, calls: int, limit: int) -> bool:
        """Reserve ``calls`` requests of the budget; False if that many are no longer left."""
        with self.lock:
            if self.calls + calls > limit:
                return False
            self.calls += calls
            return True


def one_operation(k: kernelproxy.Kernel, thread_id: int, index: int, tally: Tally, limit: int) -> bool:
    """Run the operation ``index`` picks (its share of the mix in parentheses); False when the budget is spent."""
    kind = index % 20
    requests = 2 if kind >= 14 else 1
    if not tally.claim(requests, limit):
        if requests == 1 or not tally.claim(1, limit):
            return False
        kind = 0  # one request left in the budget: a small call
    try:
        if kind < 8:  # small call (40 %)
            got: Any = k.call(small, thread_id, index)
            if got != (thread_id, index, k.info.pid):
                tally.wrong.append(f"small: {got!r} for {(thread_id, index)}")
        elif kind < 11:  # 1 MB numpy array there and back (15 %)
            array = np.full(ARRAY_ITEMS, float(index))
            got = k.call(array_round_trip, array, thread_id)
            if got.shape != array.shape or not np.all(got == 2.0 * index + thread_id):
                tally.wrong.append(f"array: wrong values for {(thread_id, index)}")
        elif kind < 14:  # an exception raised in the kernel (15 %)
            with tally.lock:
                tally.errors_expected += 1
            try:
                k.call(raise_tagged, thread_id, index)
                tally.wrong.append(f"exception: none raised for {(thread_id, index)}")
            except ValueError as exc:
                if str(exc) == f"expected failure {thread_id}:{index}":
                    with tally.lock:
                        tally.errors_seen += 1
                else:
                    tally.wrong.append(f"exception: {exc!r} for {(thread_id, index)}")
        elif kind < 17:  # a RemoteRef: create, use, drop (15 %; two requests, and a batched release)
            ref = k.call_ref(Counter, thread_id, index)
            got = ref.add(5)
            if got != (thread_id, index + 5):
                tally.wrong.append(f"ref: {got!r} for {(thread_id, index)}")
            del ref
        else:  # push, then pull back (15 %; two requests)
            name = f"soak_{thread_id}"
            k.push({name: (thread_id, index)})
            got = k.pull(name)
            if got != (thread_id, index):
                tally.wrong.append(f"push/pull: {got!r} for {(thread_id, index)}")
    except Exception as exc:  # noqa: BLE001 - reported in the table
        tally.unexpected.append(f"{type(exc).__name__}: {exc}"[:200])
    return True


def run_phase(k: kernelproxy.Kernel, threads: int, tally: Tally, limit: int, start_index: int) -> None:
    """``threads`` threads issue operations until ``limit`` requests in total have been made."""
    barrier = threading.Barrier(threads)

    def worker(thread_id: int) -> None:
        barrier.wait()
        index = start_index + thread_id
        while one_operation(k, thread_id, index, tally, limit):
            index += threads

    workers = [
        threading.Thread(target=worker, args=(thread_id,), name=f"soak-{thread_id}") for thread_id in range(threads)
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()


# ---------------------------------------------------------------------- measuring


@dataclass
class Sample:
    host_rss: int
    kernel_rss: int
    host_fds: int
    host_threads: int
    kept_objects: int
    transfers: int
    host_signatures: int
    kernel_signatures: int


def quiesce(k: kernelproxy.Kernel) -> tuple[int, int]:
    """Let dropped RemoteRefs be released; return (kept objects, unfinished transfers) in the kernel."""
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        kept = k.eval(f"len({AGENT}._objects)")
        if kept == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    transfers = k.eval(f"len({AGENT}._uploads) + len({AGENT}._outbox)")
    return kept, transfers


def sample(k: kernelproxy.Kernel) -> Sample:
    kept, transfers = quiesce(k)
    k.exec(TRIM_SOURCE)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    host = psutil.Process()
    return Sample(
        host_rss=host.memory_info().rss,
        kernel_rss=psutil.Process(k.info.pid).memory_info().rss,
        host_fds=host.num_fds(),
        host_threads=host.num_threads(),
        kept_objects=kept,
        transfers=transfers,
        host_signatures=len(k.aio._state.connection.session.digest_history),
        kernel_signatures=k.eval("len(get_ipython().kernel.session.digest_history)"),
    )


@dataclass
class Result:
    transport: str
    calls: int
    errors_expected: int
    errors_seen: int
    wrong: list[str]
    unexpected: list[str]
    seconds: float
    before: Sample
    after: Sample


def soak(transport: str, calls: int, threads: int, warmup: int, digest_history_size: int | None) -> Result:
    with kernelproxy.start(transport=transport, output="discard") as k:
        if digest_history_size is not None:
            k.aio._state.connection.session.digest_history_size = digest_history_size
        tally = Tally()
        started = time.perf_counter()
        run_phase(k, threads, tally, warmup, start_index=0)
        warm_seconds = time.perf_counter() - started
        before = sample(k)
        started = time.perf_counter()
        run_phase(k, threads, tally, calls, start_index=1_000_000)
        seconds = warm_seconds + time.perf_counter() - started
        after = sample(k)
    return Result(
        transport,
        tally.calls,
        tally.errors_expected,
        tally.errors_seen,
        tally.wrong,
        tally.unexpected,
        seconds,
        before,
        after,
    )


# ---------------------------------------------------------------------- report


def print_table(results: list[Result]) -> None:
    headers = [
        "transport",
        "calls",
        "errors exp/seen",
        "wrong",
        "unexpected",
        "calls/s",
        "host RSS +MB",
        "kernel RSS +MB",
        "host fds",
        "host threads",
        "kept/transfers left",
        "signatures + host/kernel",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.transport,
                str(r.calls),
                f"{r.errors_expected}/{r.errors_seen}",
                str(len(r.wrong)),
                str(len(r.unexpected)),
                f"{r.calls / r.seconds:.0f}",
                f"{(r.after.host_rss - r.before.host_rss) / MB:+.2f}",
                f"{(r.after.kernel_rss - r.before.kernel_rss) / MB:+.2f}",
                f"{r.before.host_fds}->{r.after.host_fds}",
                f"{r.before.host_threads}->{r.after.host_threads}",
                f"{r.after.kept_objects}/{r.after.transfers}",
                (
                    f"{r.after.host_signatures - r.before.host_signatures:+}/"
                    f"{r.after.kernel_signatures - r.before.kernel_signatures:+}"
                ),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def failures(result: Result, max_growth_mb: float) -> list[str]:
    problems = []
    if result.wrong:
        problems.append(f"{len(result.wrong)} wrong results, e.g. {result.wrong[:3]}")
    if result.unexpected:
        problems.append(f"{len(result.unexpected)} unexpected errors, e.g. {result.unexpected[:3]}")
    if result.errors_seen != result.errors_expected:
        problems.append(f"{result.errors_expected} remote exceptions expected, {result.errors_seen} seen")
    for side, growth in (
        ("host", result.after.host_rss - result.before.host_rss),
        ("kernel", result.after.kernel_rss - result.before.kernel_rss),
    ):
        if growth >= max_growth_mb * MB:
            problems.append(f"{side} RSS grew by {growth / MB:.2f} MB after warm-up (limit {max_growth_mb} MB)")
    if result.after.kept_objects or result.after.transfers:
        problems.append(
            f"left in the kernel: {result.after.kept_objects} kept objects, {result.after.transfers} transfers"
        )
    if result.after.host_fds > result.before.host_fds:
        problems.append(f"host file descriptors {result.before.host_fds} -> {result.after.host_fds}")
    if result.after.host_threads > result.before.host_threads:
        problems.append(f"host threads {result.before.host_threads} -> {result.after.host_threads}")
    return [f"{result.transport}: {problem}" for problem in problems]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="requests per transport (default 10000)")
    parser.add_argument("--threads", type=int, default=8, help="threads calling at once (default 8)")
    parser.add_argument("--warmup", type=int, default=1_000, help="requests before the first sample (default 1000)")
    parser.add_argument("--transports", default="comm,execute", help="comma-separated (default comm,execute)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth limit in MB (default 5)")
    parser.add_argument(
        "--digest-history-size",
        type=int,
        default=None,
        help="cap the host Session's signature history (default: jupyter_client's, 65536)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.calls:
        parser.error("--warmup must be between 0 and --calls")

    print(
        f"kernelproxy {kernelproxy.__version__}, Python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs; {args.calls} requests per transport from {args.threads} threads, "
        f"memory compared after {args.warmup} and at the end"
        + (f"; host signature history capped at {args.digest_history_size}" if args.digest_history_size else "")
        + "\n"
    )
    results = [
        soak(transport, args.calls, args.threads, args.warmup, args.digest_history_size)
        for transport in args.transports.split(",")
    ]
    print_table(results)
    problems = [problem for result in results for problem in failures(result, args.max_growth)]
    print()
    for problem in problems:
        print("FAIL", problem)
    if not problems:
        print("OK: every result correct and routed to its caller; no growth, leak or leftover beyond the limits")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
