#!/usr/bin/env python
"""Benchmark kernelproxy: call latency and numpy transfers, against the alternatives.

    python benchmarks/transfer.py                  # default: 256 MB (+ 64 MB for the seed comparison)
    python benchmarks/transfer.py --sizes 64,256 --repeat 5
    python benchmarks/transfer.py --quick          # ~30 s smoke run

Everything compared is measured in the same run, on kernels started the same
way (this interpreter's ipykernel, each with its own temporary IPYTHONDIR):

1. latency of a trivial ``k.call(add, 1, 2)`` against raw jupyter_client round
   trips (kernel_info_request, silent execute_request);
2. push and pull of a float64 array: time, MB/s, and peak extra memory in the
   kernel and on the host;
3. the same with the "seed" approach (pickle + base64 pasted into cell code;
   pulled back through user_expressions' text/plain repr), at <= 64 MB;
4. ``arr.copy()`` in this process, as the physical limit.

See benchmarks/README.md for what each column means and how memory is measured.
This file is not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
from _common import (  # shared with compare.py; benchmarks/ is on sys.path when this script runs
    LOAD_AT_START,
    MB,
    TRIM_SOURCE,
    PeakProbe,
    RawKernel,
    fmt_mb,
    fmt_multiple,
    fmt_size,
    log,
    machine_info,
    median,
    p90,
    rss,
    section,
    seed_pull,
    seed_push,
    table,
    trim_memory,
    zmq_transport_of,
)

import kernelproxy

DEFAULT_SIZES = [256.0]
DEFAULT_SEED_SIZE = 64.0
SEED_SIZE_CAP = 64.0
WARMUP_SIZE = 2.0  # MB; above kernelproxy's 1 MB inline limit, so the chunked path is warmed up too


def add(a: int, b: int) -> int:
    return a + b


# ----------------------------------------------------------------------------- 1. latency


def measure_latency(
    proxies: list[tuple[str, kernelproxy.Kernel]], raw: RawKernel, calls: int, rounds: int = 10
) -> dict[str, list[float]]:
    kc = raw.kc

    def raw_kernel_info() -> None:
        raw.wait_shell_reply(kc.kernel_info())

    def raw_execute() -> None:
        reply = raw.wait_shell_reply(kc.execute("1+2", silent=True, store_history=False))
        assert reply["content"]["status"] == "ok", reply["content"]

    def raw_execute_idle() -> None:
        msg_id = kc.execute("1+2", silent=True, store_history=False)
        reply = raw.wait_shell_reply(msg_id)
        assert reply["content"]["status"] == "ok", reply["content"]
        raw.wait_idle(msg_id)

    variants: dict[str, Callable[[], Any]] = {}
    for label, k in proxies:
        quiet = k.options(output="discard")
        variants[f"{label}: k.call(add, 1, 2)"] = lambda k=k: k.call(add, 1, 2)
        variants[f"{label}: same, output='discard'"] = lambda quiet=quiet: quiet.call(add, 1, 2)
    variants["raw: kernel_info_request"] = raw_kernel_info
    variants["raw: execute '1+2' silent"] = raw_execute
    variants["raw: same + wait IOPub idle"] = raw_execute_idle

    for _label, k in proxies:
        assert k.call(add, 1, 2) == 3, "k.call(add, 1, 2) != 3"
        assert k.options(output="discard").call(add, 1, 2) == 3

    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        for _ in range(20):
            fn()
        raw.drain_iopub()
    per_round = max(1, calls // rounds)
    names = list(variants)
    for round_index in range(rounds):
        # interleaved, rotating order: drift (thermal, other load) hits every variant alike
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            raw.drain_iopub()
    return times


def print_latency(times: dict[str, list[float]], proxy_labels: list[str]) -> None:
    rows = []
    for name, values in times.items():
        ms = [v * 1000 for v in values]
        rows.append([name, len(ms), f"{median(ms):.3f}", f"{p90(ms):.3f}", f"{min(ms):.3f}"])
    print(table(["operation", "n", "median ms", "p90 ms", "min ms"], rows, right=[False, True, True, True, True]))
    raw_names = [name for name in times if name.startswith("raw: ")]
    proxy_names = [name for name in times if not name.startswith("raw: ")]
    print()
    print("Ratio of medians, kernelproxy / raw (how many raw round trips one call costs):")
    rows = []
    for name in proxy_names:
        rows.append([name] + [f"{median(times[name]) / median(times[raw]):.2f}x" for raw in raw_names])
    print(table(["kernelproxy \\ raw"] + [raw[5:] for raw in raw_names], rows))


# ----------------------------------------------------------------------------- 2-4. transfers


class Result:
    """One method x operation x size: times and memory over repeats."""

    def __init__(self, size_mb: float, op: str, method: str) -> None:
        self.size_mb = size_mb
        self.op = op
        self.method = method
        self.times: list[float] = []
        # bytes, one value per repeat (None when unavailable)
        self.mem: dict[str, list[int | None]] = {
            key: [] for key in ("k_peak", "k_extra", "k_left", "h_peak", "h_extra", "h_left")
        }

    def add_time(self, seconds: float) -> None:
        self.times.append(seconds)

    @property
    def mbps(self) -> float:
        return self.size_mb / median(self.times)


class Side:
    """Memory bookkeeping for one process (kernel or host) around one transfer."""

    def __init__(self, probe: PeakProbe | None, payload: int, keeps_payload: bool) -> None:
        self.probe = probe
        self.payload = payload
        self.keeps = payload if keeps_payload else 0
        self.peak: int | None = None

    def begin(self) -> None:
        if self.probe:
            self.probe.begin()

    def end(self) -> None:
        self.peak = self.probe.end() if self.probe else None

    def record(self, result: Result, prefix: str) -> None:
        if self.probe is None or self.peak is None:
            for key in ("peak", "extra", "left"):
                result.mem[f"{prefix}_{key}"].append(None)
            return
        left = rss(self.probe.pid) - self.probe.before - self.keeps
        result.mem[f"{prefix}_peak"].append(self.peak)
        result.mem[f"{prefix}_extra"].append(self.peak - self.keeps)
        result.mem[f"{prefix}_left"].append(left)


def measured(
    result: Result,
    fn: Callable[[], Any],
    kernel_probe: PeakProbe | None,
    host_probe: PeakProbe | None,
    kernel_keeps: bool,
    host_keeps: bool,
    prepare: Callable[[], None],
    settle: Callable[[], None],
) -> Any:
    """Time fn() with both processes' memory measured around it.

    prepare(): gc + malloc_trim in both processes (before the baseline);
    settle(): the same after the transfer (round trips, so queued clean-up ran) before reading "left".
    """
    payload = int(result.size_mb * MB)
    kernel = Side(kernel_probe, payload, kernel_keeps)
    host = Side(host_probe, payload, host_keeps)
    prepare()
    kernel.begin()
    host.begin()
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    host.end()
    kernel.end()
    result.add_time(elapsed)
    settle()
    kernel.record(result, "k")
    host.record(result, "h")
    return value


def check_equal(pulled: Any, original: np.ndarray, what: str) -> None:
    ok = (
        isinstance(pulled, np.ndarray)
        and pulled.dtype == original.dtype
        and pulled.shape == original.shape
        and np.array_equal(pulled, original)
    )
    CHECKS.append((what, ok))
    if not ok:
        print(f"!! CORRECTNESS FAILURE: {what}: pulled value differs from the pushed array", file=sys.stderr)


CHECKS: list[tuple[str, bool]] = []


def make_array(size_mb: float) -> np.ndarray:
    return np.random.default_rng(int(size_mb * 1000)).random(int(size_mb * MB) // 8)


def bench_memcpy(arrays: dict[float, np.ndarray], repeat: int) -> dict[float, Result]:
    results = {}
    for size_mb, arr in arrays.items():
        result = Result(size_mb, "copy", "arr.copy() in-process")
        arr.copy()  # warm-up, not counted
        for _ in range(max(repeat, 10)):
            trim_memory()
            start = time.perf_counter()
            copy = arr.copy()
            result.add_time(time.perf_counter() - start)
            del copy
        results[size_mb] = result
    return results


def bench_kernelproxy(
    label: str, k: kernelproxy.Kernel, arrays: dict[float, np.ndarray], repeat: int, host_probe: PeakProbe
) -> tuple[list[Result], PeakProbe]:
    kernel_probe = PeakProbe(k.info.pid)

    def both_trimmed() -> None:
        # two round trips: the kernel also lets go of the previous request message it keeps as 'parent'
        k.call(trim_memory)
        k.call(trim_memory)
        trim_memory()

    # warm-up: imports numpy in the kernel, first chunked transfer, etc.
    warm = make_array(WARMUP_SIZE)
    k.push(arr=warm)
    check_equal(k.pull("arr"), warm, f"{label} warm-up")
    del k["arr"]

    results = []
    for size_mb, arr in arrays.items():
        push = Result(size_mb, "push", label)
        pull = Result(size_mb, "pull", label)
        for index in range(repeat):
            log(f"{label}: {fmt_size(size_mb)} repeat {index + 1}/{repeat}")
            measured(
                push, lambda arr=arr: k.push(arr=arr), kernel_probe, host_probe, True, False, both_trimmed, both_trimmed
            )
            pulled = measured(
                pull, lambda: k.pull("arr"), kernel_probe, host_probe, False, True, both_trimmed, both_trimmed
            )
            check_equal(pulled, arr, f"{label} {fmt_size(size_mb)} repeat {index + 1}")
            del pulled
            del k["arr"]
            gc.collect()
        results += [push, pull]
    return results, kernel_probe


def history_size(raw: RawKernel) -> tuple[str, int | None]:
    """Flush IPython's history cache in the kernel and return (history file, its size)."""
    raw.run_silent("get_ipython().history_manager.writeout_cache()")
    path = str(raw.expr("str(get_ipython().history_manager.hist_file)"))
    try:
        size = os.path.getsize(path)
        for suffix in ("-wal", "-journal"):
            if os.path.exists(path + suffix):
                size += os.path.getsize(path + suffix)
        return path, size
    except OSError:
        return path, None


def bench_seed(
    raw: RawKernel, size_mb: float, arr: np.ndarray, repeat: int, host_probe: PeakProbe
) -> tuple[list[Result], PeakProbe, dict]:
    kernel_probe = PeakProbe(raw.pid)
    label = "seed (pickle+b64 in cell code)"

    def both_trimmed() -> None:
        raw.run_silent(TRIM_SOURCE)
        raw.run_silent(TRIM_SOURCE)
        raw.drain_iopub()  # execute_input echoes the whole cell (the payload) on IOPub: read it, as a client would
        trim_memory()

    warm = make_array(WARMUP_SIZE)  # warm-up: imports numpy and pickle in the kernel
    seed_push(raw, warm)
    check_equal(seed_pull(raw), warm, "seed warm-up")
    raw.run_silent("del arr")
    raw.drain_iopub()

    hist_path, hist_before = history_size(raw)
    in_before = int(raw.expr("len(get_ipython().user_ns['In'])"))
    push = Result(size_mb, "push", label)
    pull = Result(size_mb, "pull", label)
    for index in range(repeat):
        log(f"seed: {fmt_size(size_mb)} repeat {index + 1}/{repeat} (slow)")
        measured(push, lambda: seed_push(raw, arr), kernel_probe, host_probe, True, False, both_trimmed, both_trimmed)
        pulled = measured(
            pull, lambda: seed_pull(raw), kernel_probe, host_probe, False, True, both_trimmed, both_trimmed
        )
        check_equal(pulled, arr, f"seed {fmt_size(size_mb)} repeat {index + 1}")
        del pulled
        raw.run_silent("del arr")
        gc.collect()
    _, hist_after = history_size(raw)
    history = {
        "path": hist_path,
        "before": hist_before,
        "after": hist_after,
        "pushes": repeat,
        "payload": int(size_mb * MB),
        "in_cells": int(raw.expr("len(get_ipython().user_ns['In'])")) - in_before,
    }
    return [push, pull], kernel_probe, history


def row_order(r: Result) -> tuple:
    return (r.size_mb, {"copy": 0, "push": 1, "pull": 2}[r.op], r.method.startswith("seed"), r.method)


def print_transfers(results: list[Result], memcpy: dict[float, Result]) -> None:
    seed_by_key = {(r.size_mb, r.op): r for r in results if r.method.startswith("seed")}
    rows = []
    for r in sorted(results + list(memcpy.values()), key=row_order):
        limit = memcpy[r.size_mb]
        seed = seed_by_key.get((r.size_mb, r.op))
        speedup = "" if seed is None or seed is r or r.op == "copy" else f"{median(seed.times) / median(r.times):.1f}x"
        rows.append(
            [
                fmt_size(r.size_mb),
                r.op,
                r.method,
                len(r.times),
                f"{median(r.times):.3f}",
                f"{p90(r.times):.3f}",
                f"{r.mbps:.1f}",
                f"{r.size_mb / p90(r.times):.1f}",
                f"{100 * r.mbps / limit.mbps:.2f}%",
                speedup,
            ]
        )
    headers = ["size", "op", "method", "n", "med s", "p90 s", "MB/s med", "MB/s p90", "of memcpy", "vs seed"]
    print(table(headers, rows, right=[False, False, False] + [True] * 7))

    print()
    print("Memory: x columns are multiples of the payload (median/p90 over repeats); MB columns are medians")
    rows = []
    for r in sorted(results, key=row_order):
        m, payload = r.mem, int(r.size_mb * MB)
        rows.append(
            [fmt_size(r.size_mb), r.op, r.method]
            + [fmt_multiple(m["k_peak"], payload), fmt_multiple(m["k_extra"], payload), fmt_mb(m["k_extra"])]
            + [fmt_mb(m["k_left"])]
            + [fmt_multiple(m["h_peak"], payload), fmt_multiple(m["h_extra"], payload), fmt_mb(m["h_extra"])]
            + [fmt_mb(m["h_left"])]
        )
    headers = ["size", "op", "method", "kern dpeak x", "kern extra x", "MB", "left MB"]
    headers += ["host dpeak x", "host extra x", "MB", "left MB"]
    print(table(headers, rows, right=[False, False, False] + [True] * 8))
    print(
        "  dpeak: peak RSS during the transfer minus RSS just before it (VmHWM - VmRSS); the receiving side's\n"
        "         dpeak includes the 1.00x payload it keeps (the kernel on push, the host on pull).\n"
        "  extra: dpeak minus that kept payload: the transient cost of the transfer itself (also in MB).\n"
        "  left:  RSS after the transfer (two more round trips, gc + malloc_trim on both sides) minus RSS before,\n"
        "         minus the kept payload: memory the transfer leaves behind (negative: it freed earlier leftovers)."
    )


def print_history(history: dict, size_mb: float) -> None:
    rows = []
    before, after = history["before"], history["after"]
    if before is None or after is None:
        rows.append([history["path"], "n/a", "n/a", "n/a", "n/a"])
    else:
        growth = (after - before) / max(history["pushes"], 1)
        rows.append(
            [
                history["path"],
                f"{before / MB:.1f}",
                f"{after / MB:.1f}",
                f"{growth / MB:.1f}",
                f"{growth / history['payload']:.2f}x",
            ]
        )
    print(table(["history.sqlite", "before MB", "after MB", "growth/push MB", "growth/payload"], rows))
    print(
        f"  ({history['pushes']} seed push(es) of {fmt_size(size_mb)}; the kernel's In list also grew by "
        f"{history['in_cells']} cell(s), each holding the pasted code in memory for the kernel's lifetime)"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="array sizes in MB (2**20 bytes), comma-separated (default: 256)")
    parser.add_argument("--repeat", type=int, help="repeats of each kernelproxy transfer (default 3)")
    parser.add_argument("--calls", type=int, help="timed calls per latency variant (default 300)")
    parser.add_argument(
        "--seed-size",
        type=float,
        help=f"size of the seed-approach transfers in MB (default {DEFAULT_SEED_SIZE:g}; 0: skip)",
    )
    parser.add_argument("--seed-repeat", type=int, help="repeats of the seed approach (default 1: ~1 min at 64 MB)")
    parser.add_argument(
        "--transport",
        default="execute",
        help="kernelproxy transport(s), comma-separated, each on its own kernel (default: execute)",
    )
    parser.add_argument(
        "--raw-sockets",
        choices=["match", "tcp", "ipc"],
        default="match",
        help="zmq transport of the raw jupyter_client kernel; 'match' (default): the same as kernelproxy's kernel",
    )
    parser.add_argument("--quick", action="store_true", help="small and fast: 64 MB, 2 repeats, seed at 16 MB")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = (
        sorted({float(s) for s in args.sizes.split(",") if s.strip()})
        if args.sizes
        else ([64.0] if quick else DEFAULT_SIZES)
    )
    args.repeat = args.repeat or (2 if quick else 3)
    args.calls = args.calls or (60 if quick else 300)
    args.seed_size = args.seed_size if args.seed_size is not None else (16.0 if quick else DEFAULT_SEED_SIZE)
    args.seed_repeat = args.seed_repeat or 1
    args.transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    if args.seed_size > SEED_SIZE_CAP:
        print(
            f"note: the seed approach runs at {args.seed_size:g} MB, above the usual {SEED_SIZE_CAP:g} MB cap; "
            "it is superlinear and may take many minutes",
            file=sys.stderr,
        )
    if any(s <= 0 for s in args.sizes) or args.repeat < 1 or args.calls < 10:
        parser.error("sizes must be positive, --repeat >= 1, --calls >= 10")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM: still shut the kernels down
    kp_sizes = sorted(set(args.sizes) | ({args.seed_size} if args.seed_size > 0 else set()))
    print("kernelproxy benchmark: call latency and numpy transfers")
    print(
        f"options: sizes {', '.join(map(fmt_size, kp_sizes))} x {args.repeat} repeats (kernelproxy), "
        f"seed approach {fmt_size(args.seed_size) + f' x {args.seed_repeat}' if args.seed_size > 0 else 'skipped'}, "
        f"{args.calls} calls per latency variant, transport(s): {', '.join(args.transports)}"
    )
    section("Machine")
    print(table(["", ""], machine_info(), right=[False, False]))

    scratch = tempfile.mkdtemp(prefix="kernelproxy-bench-")
    proxies: list[tuple[str, kernelproxy.Kernel]] = []
    raw: RawKernel | None = None
    try:
        log("starting kernels")
        for transport in args.transports:
            ipython_dir = os.path.join(scratch, f"ipython-kp-{transport}")
            k = kernelproxy.start(transport=transport, env={"IPYTHONDIR": ipython_dir})
            proxies.append((f"kernelproxy[{k.info.transport}]", k))
        sockets = {label: zmq_transport_of(k) for label, k in proxies}
        raw_sockets = args.raw_sockets
        if raw_sockets == "match":
            raw_sockets = next(iter(sockets.values()), "tcp")
            raw_sockets = raw_sockets if raw_sockets in ("tcp", "ipc") else "tcp"
        raw = RawKernel(os.path.join(scratch, "ipython-raw"), raw_sockets, scratch)
        host_probe = PeakProbe(os.getpid())

        section("Kernels")
        rows = [
            [
                label,
                k.info.pid,
                sockets[label],
                k.info.executable,
                f"{k.info.implementation} {k.info.implementation_version}",
            ]
            for label, k in proxies
        ]
        how = "start_new_kernel" if raw.zmq_transport == "tcp" else "start_new_kernel's steps, ipc"
        rows.append([f"raw jupyter_client ({how})", raw.pid, raw.zmq_transport, raw.executable, raw.implementation])
        headers = ["kernel", "pid", "sockets", "executable", "implementation"]
        print(table(headers, rows, right=[False, True, False, False, False]))
        print("Each kernel runs with its own temporary IPYTHONDIR (a fresh profile; the user's is untouched).")

        # 1. latency
        log("latency")
        section("1. Trivial call latency (ms per round trip)")
        times = measure_latency(proxies, raw, args.calls)
        print_latency(times, [label for label, _ in proxies])
        print(
            "  'raw: execute' waits for the shell reply only; kernelproxy's default output='forward' also waits for\n"
            "  the kernel's IOPub 'idle' (so no printed output is lost), hence the '+ wait IOPub idle' raw variant."
        )

        # host arrays: allocated before any memory is measured
        log(f"allocating host arrays: {', '.join(map(fmt_size, kp_sizes))}")
        arrays = {size: make_array(size) for size in kp_sizes}

        # 4. memcpy limit
        log("in-process copy")
        memcpy = bench_memcpy(arrays, args.repeat)

        # 2. kernelproxy transfers
        results: list[Result] = []
        probes: list[tuple[str, PeakProbe]] = [("host", host_probe)]
        for label, k in proxies:
            kp_results, kernel_probe = bench_kernelproxy(label, k, arrays, args.repeat, host_probe)
            results += kp_results
            probes.append((f"{label} kernel", kernel_probe))
            k.close()

        # 3. the seed approach
        history = None
        if args.seed_size > 0:
            seed_results, seed_probe, history = bench_seed(
                raw, args.seed_size, arrays[args.seed_size], args.seed_repeat, host_probe
            )
            results += seed_results
            probes.append(("seed kernel", seed_probe))

        section("2-4. Push/pull of a float64 numpy array (MB = 2**20 bytes)")
        print(
            table(
                ["process", "memory measurement"], [[name, p.description] for name, p in probes], right=[False, False]
            )
        )
        print()
        print_transfers(results, memcpy)
        if history is not None:
            print()
            print(f"Seed approach ran at {fmt_size(args.seed_size)} only (no extrapolation); its kernel's history:")
            print_history(history, args.seed_size)

        section("Correctness and conditions")
        failed = [what for what, ok in CHECKS if not ok]
        print(f"{len(CHECKS) - len(failed)}/{len(CHECKS)} pulled arrays equal the pushed ones (dtype, shape, values)")
        for what in failed:
            print(f"  FAILED: {what}")
        print(
            f"load average (1 min) at start {LOAD_AT_START:.2f}, at end {os.getloadavg()[0]:.2f} "
            f"({os.cpu_count()} cores; other processes' load skews every number above)"
        )
        log("done")
        return 1 if failed else 0
    finally:
        for label, k in proxies:
            try:
                k.close()
            except Exception as exc:  # noqa: BLE001 - still close the others and the raw kernel
                print(f"closing {label} failed: {exc!r}", file=sys.stderr)
        if raw is not None:
            raw.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
