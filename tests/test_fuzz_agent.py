"""Fuzzing the agent's decoders: malformed, truncated, oversized and wrongly typed requests.

Part one runs the agent module in this process (``kernelproxy.agent._agent``) and feeds its entry points,
``dispatch``, ``ex``, the transfer helpers ``alloc/put/get/free`` and the comm ``on_msg`` callback, thousands
of generated inputs: each must come back as a reply (an error reply when the input is malformed), never
raise out of an entry point that promises a reply, never hang.

Part two sends a smaller set through a real kernel's transports (raw comm_msg data and buffers; raw execute
expressions calling the agent with bad arguments): each must produce an error reply, and a normal call
afterwards must succeed.

Unpickling random bytes can import modules and call functions. While the in-process fuzz runs, an audit
hook (``sys.addaudithook``) confines it: ``pickle.find_class`` only reaches a few harmless modules, and
processes, file writes, deletions and sockets are refused. It is inert at all other times.

Each test prints how many cases it tried (``pytest -s``) in lines starting with ``FUZZ-CASES``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import operator
import os
import pickle
import random
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kernelproxy
from kernelproxy import _serialization as serialization
from kernelproxy._transports import comm as comm_module
from kernelproxy._transports import execute as execute_module
from kernelproxy.agent import _agent as agent

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Hypothesis's pytest plugin imports libcst to report a failure, whose import warns (DeprecationWarning
# from mypy_extensions); under filterwarnings=error that turns every failing example into an INTERNALERROR
# that hides it. Import it now, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

ERROR_KINDS = {"exception", "interrupted", "deserialize", "serialize", "protocol"}
CASES: collections.Counter[str] = collections.Counter()

IN_PROCESS = settings(
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
REAL_KERNEL = settings(IN_PROCESS, max_examples=100)
REPLY_TIMEOUT = 10.0  # seconds a real kernel has to answer one fuzzed request


@pytest.fixture(scope="module", autouse=True)
def case_summary() -> Iterator[None]:
    yield
    total = sum(CASES.values())
    print(f"\nFUZZ-CASES total={total} " + " ".join(f"{name}={count}" for name, count in sorted(CASES.items())))
    agent._objects.clear()
    agent._uploads.clear()
    agent._parts.clear()
    agent._outbox.clear()


# ---------------------------------------------------------------------- a sandbox for unpickling random bytes

_SAFE_PICKLE_MODULES = {
    "builtins",
    "copyreg",
    "cloudpickle",
    "numpy",
    "_codecs",
    "collections",
    "types",
    "functools",
    "operator",
    "math",
    "datetime",
    "decimal",
    "fractions",
}
_REFUSED_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "os.remove",
    "os.unlink",
    "os.rmdir",
    "os.rename",
    "os.replace",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.link",
    "os.symlink",
    "os.mkdir",
    "os.putenv",
    "os.unsetenv",
    "shutil.",
    "subprocess.",
    "socket.",
    "ctypes.",
    "signal.",
    "sys.setrecursionlimit",
    "webbrowser.",
    "urllib.",
    "http.",
    "ftplib.",
    "smtplib.",
    "telnetlib.",
)
_sandboxed_thread: list[int | None] = [None]


class SandboxViolation(RuntimeError):
    pass


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _sandboxed_thread[0] != threading.get_ident():
        return
    if event == "pickle.find_class":
        if args[0].split(".")[0] not in _SAFE_PICKLE_MODULES:
            raise SandboxViolation(f"fuzz sandbox: pickle may not load {args[0]}.{args[1]}")
    elif event == "open":
        mode, flags = args[1], args[2]
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & writes):
            raise SandboxViolation(f"fuzz sandbox: no writing to {args[0]!r}")
    elif event.startswith(_REFUSED_EVENTS):
        raise SandboxViolation(f"fuzz sandbox: {event} refused")


_hook_installed: list[bool] = []


@contextlib.contextmanager
def sandbox() -> Iterator[None]:
    if not _hook_installed:  # audit hooks cannot be removed: install it only if a fuzz test runs
        sys.addaudithook(_audit)
        _hook_installed.append(True)
    _sandboxed_thread[0] = threading.get_ident()
    try:
        yield
    finally:
        _sandboxed_thread[0] = None


# ---------------------------------------------------------------------- strategies


class BigStr(str):
    """An oversized string that Hypothesis reports by its size, not its megabytes."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"<str of {len(self)} chars: {self[:20]!r}...>")


class BigBytes(bytes):
    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"<{len(self)} random bytes>")


class BigList(list):  # type: ignore[type-arg]
    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"<list of {len(self)} items>")


SAFE_CODE = st.text(alphabet="0123456789()[]{}:;,.=+-/%&|^~ \n\t'\"#\\", max_size=40)  # no names: nothing to call
text = st.text(max_size=30)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_like = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5),
    max_leaves=20,
)
anything = json_like | st.binary(max_size=20) | st.builds(object) | st.just(float("nan")) | st.tuples(json_like)

# Every field a request header may carry, with values of any type.
FIELDS = ("names", "name", "code", "expr", "root", "keep", "ids", "result")
ops = st.sampled_from(sorted(agent.HANDLERS)) | text | st.none() | st.integers() | st.lists(text, max_size=2)


@st.composite
def headers(draw: st.DrawFn) -> Any:
    """Request headers: mostly dicts with a plausible op and fields of random type, sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(anything)
    header = {"op": draw(ops)}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if field in ("code", "expr") and draw(st.booleans()):
            header[field] = draw(SAFE_CODE)
        elif field in ("names", "ids") and draw(st.booleans()):
            header[field] = draw(st.lists(text | st.integers(), max_size=4))
        else:
            header[field] = draw(anything)
    if draw(st.integers(0, 9)) == 0:  # oversized: a long string or a long list in a field
        header[draw(st.sampled_from(FIELDS))] = draw(
            st.sampled_from([BigStr("n" * 2_000_000), BigList(range(100_000))])
        )
    for key in ("code", "expr"):  # only code without names runs here (no calls, no imports)
        if isinstance(header.get(key), str) and header.get("op") in ("exec", "eval"):
            assume(all(c in "0123456789()[]{}:;,.=+-/%&|^~ \n\t'\"#\\" for c in header[key]))
    return header


def _harmless_request_frames() -> list[list[bytes]]:
    """Valid request pickles (of calls, pushes and ref paths), to truncate and corrupt."""
    array = np.arange(20_000, dtype=np.float64)  # large enough for an out-of-band buffer
    values = [
        (operator.add, (1, 2), {}),
        (len, ([1, 2, 3],), {}),
        (np.sum, (array,), {}),
        {"pushed": array, "other": "text"},
        (("getattr", "real"), ("op", "add", (1,))),
    ]
    return [[bytes(frame) for frame in serialization.dumps(value)] for value in values]


VALID_FRAMES = _harmless_request_frames()
# A lambda travels as bytecode. A flipped bit there can still unpickle, and running corrupted bytecode
# crashes CPython itself (seen with --hypothesis-seed=12): nothing at the pickle level can catch that,
# the signed digest is what keeps such bytes out. So it is truncated and padded, never bit-flipped.
LAMBDA_FRAMES = [[bytes(frame) for frame in serialization.dumps((lambda x: x + 1, (41,), {}))]]


@st.composite
def broken_pickles(draw: st.DrawFn) -> list[Any]:
    """A valid request's frames, truncated, bit-flipped, missing or padded."""
    how = draw(st.sampled_from(["truncate", "flip", "drop-buffers", "extra-buffer", "truncate-buffer"]))
    frames = list(draw(st.sampled_from(VALID_FRAMES if how == "flip" else VALID_FRAMES + LAMBDA_FRAMES)))
    index = draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    if how == "truncate":
        frames[0] = frames[0][: draw(st.integers(0, len(frames[0]) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(frame) - 1))
            frame[position] ^= 1 << draw(st.integers(0, 7))
        frames[index] = bytes(frame)
    elif how == "drop-buffers":
        frames = frames[:1]
    elif how == "extra-buffer":
        frames.append(draw(st.binary(max_size=100)))
    elif len(frames) > 1:
        frames[-1] = frames[-1][: draw(st.integers(0, len(frames[-1]) - 1))]
    return frames


def _random_bytes(size_and_seed: tuple[int, int]) -> bytes:
    size, seed = size_and_seed
    return BigBytes(random.Random(seed).randbytes(size))


oversized_frame = st.tuples(st.sampled_from([1 << 20, 4 << 20]), st.integers(0, 1000)).map(_random_bytes)
frame_lists = st.one_of(
    st.lists(st.binary(max_size=300), max_size=4),
    broken_pickles(),
    st.lists(oversized_frame, min_size=1, max_size=2),
    st.just([pickle.dumps(b"x" * 10)]),
    st.none(),
    text,
    st.integers(),
    st.lists(st.none() | st.integers() | text, min_size=1, max_size=3),
)


# ---------------------------------------------------------------------- reply checks


def check_reply_header(header: Any) -> dict[str, Any]:
    assert isinstance(header, dict), header
    assert header.get("status") in ("ok", "error"), header
    json.dumps(header)  # the kernel sends it as JSON
    if header["status"] == "error":
        assert header["kind"] in ERROR_KINDS, header
        assert all(isinstance(header[key], str) for key in ("ename", "evalue", "traceback")), header
    return header


def check_reply(reply: Any, sent: Any = None) -> dict[str, Any]:
    """A (header, frames) reply; its frames are bytes-like whenever the request's were (echo returns them)."""
    assert isinstance(reply, tuple) and len(reply) == 2, reply
    header, frames = reply
    assert isinstance(frames, list)
    if sent is None or (isinstance(sent, list) and all(isinstance(f, (bytes, bytearray, memoryview)) for f in sent)):
        for frame in frames:
            memoryview(frame)  # bytes-like
    return check_reply_header(header)


def is_protocol_error(header: dict[str, Any]) -> bool:
    return header["status"] == "error" and header["kind"] == "protocol"


# ---------------------------------------------------------------------- in process: dispatch


@settings(IN_PROCESS, max_examples=1500)
@given(header=headers(), frames=frame_lists)
def test_dispatch_answers_every_request_with_a_reply(header, frames):
    CASES["dispatch"] += 1
    ns: dict[str, Any] = {}
    with sandbox():
        reply = agent.dispatch(header, frames, ns)
    reply_header = check_reply(reply, sent=frames)
    if not isinstance(header, dict) or (isinstance(header.get("op"), str) and header["op"] not in agent.HANDLERS):
        assert is_protocol_error(reply_header), reply_header
    if isinstance(header, dict) and header.get("op") in ("call", "push") and not isinstance(frames, list):
        assert reply_header["status"] == "error" and reply_header["kind"] == "deserialize", reply_header
    agent._objects.clear()


@settings(IN_PROCESS, max_examples=300)
@given(frames=broken_pickles(), op=st.sampled_from(["call", "push", "ref_eval"]))
def test_broken_request_pickles_are_deserialize_errors(frames, op):
    """A truncated or corrupted pickle is reported as such, and nothing of it lands in the namespace."""
    CASES["broken-pickles"] += 1
    ns: dict[str, Any] = {}
    header = {"op": op, "root": 1} if op == "ref_eval" else {"op": op}
    with sandbox():
        try:  # is this corruption still a valid pickle? (a flipped bit in a number or a string can be)
            pickle.loads(frames[0], buffers=frames[1:])
            intact = True
        except BaseException:  # noqa: BLE001 - any failure means the request is broken
            intact = False
        reply_header = check_reply(agent.dispatch(header, frames, ns))
    if not intact:
        assert reply_header["status"] == "error" and reply_header["kind"] == "deserialize", reply_header
        if op == "push":
            assert ns == {}
    agent._objects.clear()


# ------------------------------------------------------------------- in process: the execute transport's entry points

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
b64ish = st.text(alphabet=B64_ALPHABET, max_size=200) | st.text(max_size=50)
valid_b64_frames = (st.lists(st.binary(max_size=300), max_size=3) | broken_pickles()).map(
    lambda frames: [execute_module._b64(frame) for frame in frames]
)


@st.composite
def header_texts(draw: st.DrawFn) -> Any:
    """JSON text of a header, truncated JSON, random text, or not text at all."""
    choice = draw(st.integers(0, 5))
    header = draw(headers())
    try:
        encoded = json.dumps(header)
    except (TypeError, ValueError):
        encoded = "{}"
    if choice == 0:
        return encoded
    if choice == 1:
        return encoded[: draw(st.integers(0, max(len(encoded) - 1, 0)))]
    if choice == 2:
        return draw(text)
    if choice == 3:
        return BigStr("[" * 100_000)  # nested beyond the recursion limit
    if choice == 4:
        return BigStr('{"op": "echo", "pad": "' + "x" * 3_000_000 + '"}')  # oversized but valid
    return draw(st.none() | st.integers() | st.binary(max_size=20) | st.lists(text, max_size=2))


@settings(IN_PROCESS, max_examples=1000)
@given(
    header_json=header_texts(),
    frames=st.one_of(
        valid_b64_frames,
        st.lists(b64ish, max_size=3),
        st.none(),
        text,
        st.integers(),
        st.lists(st.none() | st.integers() | st.binary(max_size=5), min_size=1, max_size=2),
    ),
    inline_limit=st.integers(-10, 1 << 21),
    tid=st.none() | st.text(alphabet="0123456789abcdef", min_size=1, max_size=8),
)
def test_ex_answers_every_request_with_a_bundle(header_json, frames, inline_limit, tid):
    CASES["ex"] += 1
    ns: dict[str, Any] = {}
    with sandbox():
        bundle = agent.ex(ns, header_json, frames, inline_limit, tid)
    assert isinstance(bundle, agent.Bundle)
    payload = check_reply_header(bundle._repr_mimebundle_()[agent.MIME])
    try:
        parsed = json.loads(header_json)
        malformed = not isinstance(parsed, dict)
    except (TypeError, ValueError, RecursionError):
        malformed = True
    if malformed:
        assert payload["status"] == "error", payload
    if "tid" in payload:  # a parked reply: it must be fully described and fetchable
        assert payload["tid"] == tid and len(payload["sizes"]) == len(agent._outbox[tid])
    else:
        assert all(isinstance(frame, str) for frame in payload.get("frames", []))
    if tid is not None:
        agent.free(tid)
    agent._objects.clear()


@settings(IN_PROCESS, max_examples=500)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("alloc"),
                st.sampled_from(["t1", "t2"]),
                st.lists(st.integers(-3, 1 << 16) | st.just(1 << 62) | text | st.none(), max_size=3)
                | st.integers()
                | st.none(),
            ),
            st.tuples(
                st.just("put"),
                st.sampled_from(["t1", "t2", "nope"]),
                st.integers(-3, 4) | st.none() | text,
                st.integers(-(1 << 17), 1 << 17) | st.none(),
                b64ish | st.none() | st.integers(),
            ),
            st.tuples(
                st.just("get"),
                st.sampled_from(["t1", "t2", "nope"]),
                st.integers(-3, 4) | text,
                st.integers(-(1 << 17), 1 << 17),
                st.integers(-10, 1 << 17),
                st.booleans(),
            ),
            st.tuples(st.just("free"), st.sampled_from(["t1", "t2", "nope"]) | st.none() | st.integers()),
            st.tuples(st.just("park"), st.sampled_from(["t1", "t2"]), st.binary(max_size=1000)),
        ),
        max_size=12,
    )
)
def test_transfer_helpers_fail_cleanly_on_bad_arguments(steps):
    """alloc/put/get/free run inside user_expressions: a bad argument may raise (the kernel reports the error
    to the host as a ProtocolError), but never anything but an Exception, and never hang."""
    CASES["transfer-helpers"] += 1
    for step in steps:
        name, args = step[0], step[1:]
        try:
            with sandbox():
                if name == "park":  # a reply parked for get(), as ex() leaves it
                    agent._outbox[args[0]] = [memoryview(args[1]).cast("B")]
                    continue
                result = getattr(agent, name)(*args)
        except Exception:  # noqa: BLE001, S112 - allowed: becomes the expression's error status
            continue
        if name == "get":
            assert isinstance(result, agent.Bundle)
            assert isinstance(result._repr_mimebundle_()[agent.MIME]["data"], str)
    for tid in ("t1", "t2", "nope"):
        agent.free(tid)
    assert not agent._uploads and not agent._outbox


def test_put_outside_the_allocated_frame_is_refused():
    """A chunk must land inside the frame alloc() made: writing past its end (or at a negative offset) must
    raise, not silently grow or shift the frame (bytearray slice assignment does either)."""
    CASES["put-bounds"] += 1
    text_of = execute_module._b64
    for offset in (10, 7, -2):
        agent.alloc("bounds", [8])
        try:
            with pytest.raises(Exception):  # noqa: B017 - which one is the agent's choice
                agent.put("bounds", 0, offset, text_of(b"abcd"))
            assert len(agent._uploads["bounds"][0]) == 8, f"put at offset {offset} resized the frame"
        finally:
            agent.free("bounds")


# ---------------------------------------------------------------------- in process: the comm transport's on_msg


class FakeComm:
    """What ipykernel hands the agent: a comm with on_msg, send and close."""

    def __init__(self) -> None:
        self.callback: Any = None
        self.sent: list[tuple[Any, list[Any]]] = []
        self.closed: list[Any] = []

    def on_msg(self, callback: Any) -> None:
        self.callback = callback

    def send(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        self.sent.append((data, list(buffers or [])))

    def close(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        self.closed.append(data)


@contextlib.contextmanager
def fake_ipython(user_ns: dict[str, Any]) -> Iterator[None]:
    """The agent finds the user namespace through IPython.get_ipython(); give it one."""
    shell = types.SimpleNamespace(user_ns=user_ns, kernel=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
        yield


def open_fake_comm(algorithm: str) -> FakeComm:
    comm = FakeComm()
    agent._on_comm_open(
        comm, {"content": {"comm_id": "c", "target_name": agent.COMM_TARGET, "data": {"digests": [algorithm]}}}
    )
    assert comm.sent == [({"opened": algorithm, "reply_on": "iopub"}, [])] and comm.callback is not None
    comm.sent.clear()
    return comm


@st.composite
def comm_requests(draw: st.DrawFn) -> tuple[Any, list[bytes], str]:
    """(data, buffers, how the digest was made) of a comm_msg; data is any JSON, or a request with a digest."""
    buffers = draw(
        frame_lists.filter(
            lambda frames: isinstance(frames, list) and all(isinstance(frame, (bytes, bytearray)) for frame in frames)
        )
    )
    choice = draw(st.sampled_from(["right", "right", "wrong", "missing", "anything"]))
    if choice == "anything":
        return draw(json_like), buffers, choice
    data = {"header": draw(headers())}
    if choice == "right":
        data["digest"] = "<right>"  # filled in by the test, which knows the algorithm
    elif choice == "wrong":
        data["digest"] = draw(text | st.integers() | st.none())
    return data, buffers, choice


@settings(IN_PROCESS, max_examples=1000)
@given(request=comm_requests(), algorithm=st.sampled_from(["sha256", "blake3"]))
def test_comm_on_msg_answers_every_message_with_one_reply(request, algorithm):
    CASES["comm-on_msg"] += 1
    data, buffers, how = request
    if how == "right":
        data["digest"] = comm_module.digest_frames(algorithm, buffers)
    user_ns: dict[str, Any] = {}
    comm = open_fake_comm(algorithm)
    with fake_ipython(user_ns), sandbox():
        comm.callback(
            {"header": {"msg_type": "comm_msg"}, "content": {"comm_id": "c", "data": data}, "buffers": buffers}
        )
    if isinstance(data, dict) and "part" in data:  # parts are never answered: the request after them is
        assert comm.sent == [] and not comm.closed, comm.sent
        agent._parts.clear()
        return
    assert len(comm.sent) == 1 and not comm.closed, comm.sent
    reply, out = comm.sent[0]
    header = check_reply_header(reply["header"])
    assert reply["digest"] == comm_module.digest_frames(algorithm, out)
    if how != "right":
        assert is_protocol_error(header) and "digest" in header["evalue"], header
        assert user_ns == {}  # refused, never unpickled
    agent._objects.clear()


@pytest.mark.parametrize(
    "content",
    [
        {"comm_id": "c"},  # no data at all
        {"comm_id": "c", "data": {"header": {"op": "echo"}}},  # no digest (covered above; kept as a contrast)
    ],
    ids=["no-data", "no-digest"],
)
def test_comm_on_msg_answers_a_message_without_data(content):
    """ipykernel passes a comm_msg's content as it came; one without 'data' must still get an error reply
    (ipykernel only logs an exception from on_msg, so the host would wait for a reply that never comes)."""
    CASES["comm-no-data"] += 1
    comm = open_fake_comm("sha256")
    with fake_ipython({}):
        comm.callback({"header": {"msg_type": "comm_msg"}, "content": content, "buffers": []})
    assert len(comm.sent) == 1, "no reply: the host would wait forever"
    assert is_protocol_error(check_reply_header(comm.sent[0][0]["header"]))


def send_comm(comm: FakeComm, data: Any, buffers: list[Any]) -> None:
    comm.callback({"header": {"msg_type": "comm_msg"}, "content": {"comm_id": "c", "data": data}, "buffers": buffers})


def request_in_parts(upload: str, payload: bytes, part_size: int) -> list[tuple[dict[str, Any], list[bytes]]]:
    """The messages the host sends for a one-frame request over a size-limited wire: parts, then the request."""
    sizes = [len(payload)]
    parts = [
        (
            {"part": {"upload": upload, "index": 0, "offset": offset, "sizes": sizes}},
            [payload[offset : offset + part_size]],
        )
        for offset in range(0, len(payload), part_size)
    ]
    request = {"header": {"op": "echo"}, "upload": upload, "digest": comm_module.digest_frames("sha256", [payload])}
    return [*parts, (request, [])]


def test_request_in_parts_is_assembled_and_answered_once():
    CASES["comm-parts"] += 1
    comm = open_fake_comm("sha256")
    with fake_ipython({}):
        for data, buffers in request_in_parts("u1", b"abcdefghij", part_size=3):
            send_comm(comm, data, buffers)
    assert len(comm.sent) == 1, "one reply, to the request; parts are not answered"
    reply, out = comm.sent[0]
    assert check_reply_header(reply["header"])["status"] == "ok"
    assert [bytes(frame) for frame in out] == [b"abcdefghij"]
    assert not agent._parts


@pytest.mark.parametrize(
    "bad_part",
    [
        {"upload": "u1", "index": 0, "offset": 9, "sizes": [10]},  # runs past the frame's end
        {"upload": "u1", "index": 5, "offset": 0, "sizes": [10]},  # no such frame
        {"upload": "u1", "index": 0},  # fields missing
        {"upload": "u1", "abort": True},  # the host gave up on this upload
    ],
    ids=["past-end", "bad-index", "fields-missing", "abort"],
)
def test_a_part_that_cannot_be_placed_makes_its_request_refused(bad_part):
    """A bad part is not answered (the host waits for no reply to it); the request after it says why it fails."""
    CASES["comm-parts"] += 1
    comm = open_fake_comm("sha256")
    messages = request_in_parts("u1", b"abcdefghij", part_size=3)
    with fake_ipython({}):
        send_comm(comm, *messages[0])
        send_comm(comm, {"part": bad_part}, [b"xyz"])
        assert comm.sent == [] and "u1" not in agent._parts
        send_comm(comm, *messages[-1])
    header = check_reply_header(comm.sent[0][0]["header"])
    assert is_protocol_error(header) and "did not all arrive" in header["evalue"], header


@pytest.mark.parametrize("upload", ["never-sent", None, ["unhashable"]])
def test_a_request_naming_an_unknown_upload_is_refused(upload):
    CASES["comm-parts"] += 1
    comm = open_fake_comm("sha256")
    with fake_ipython({}):
        send_comm(comm, {"header": {"op": "echo"}, "upload": upload, "digest": "x"}, [])
        send_comm(comm, {"part": ["not", "a", "part"]}, [])  # malformed beyond reading: dropped, not answered
    assert len(comm.sent) == 1
    header = check_reply_header(comm.sent[0][0]["header"])
    assert is_protocol_error(header) and "did not all arrive" in header["evalue"], header


# ---------------------------------------------------------------------- in process: what kind of error

MALFORMED_KNOWN_OPS = [
    {"op": "pull"},  # required field missing
    {"op": "pull", "names": 5},
    {"op": "pull", "names": "abc"},  # a string is not a list of names
    {"op": "delete", "names": [1, 2]},
    {"op": "contains", "name": []},
    {"op": "exec", "code": 5},
    {"op": "eval", "expr": None},
    {"op": "release", "ids": 5},
    {"op": "ref_name", "name": {}},
    {"op": ["call"]},  # an op that is not even hashable
]


@pytest.mark.parametrize("header", MALFORMED_KNOWN_OPS, ids=[json.dumps(h) for h in MALFORMED_KNOWN_OPS])
def test_known_op_with_malformed_fields_is_a_protocol_error(header):
    """The wire format says malformed requests get kind 'protocol'. A kind 'exception' reply makes the host
    re-raise the agent's own KeyError/TypeError as if the user's code had raised it."""
    CASES["malformed-known-op"] += 1
    reply_header = check_reply(agent.dispatch(header, [], {}))
    assert is_protocol_error(reply_header), reply_header


# ---------------------------------------------------------------------- a real kernel

real_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # JSON the host can encode
real_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | real_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(real_text, children, max_size=4),
    max_leaves=12,
)


@st.composite
def real_headers(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 3)) == 0:
        return draw(real_json)
    header = {"op": draw(st.sampled_from(sorted(agent.HANDLERS)) | real_text | st.integers())}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        header[field] = draw(SAFE_CODE) if field in ("code", "expr") else draw(real_json)
    return header


real_frames = st.one_of(
    st.lists(st.binary(max_size=200), max_size=3), broken_pickles(), st.lists(oversized_frame, min_size=1, max_size=1)
)


def run(kernel: kernelproxy.Kernel, coro: Any, timeout: float = REPLY_TIMEOUT) -> Any:
    """Run a coroutine on the kernel's IO loop, failing (not hanging) if no reply comes in time."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return kernel._portal.run(bounded())


def raw_comm_request(kernel: kernelproxy.Kernel, data: Any, buffers: list[Any], timeout: float = REPLY_TIMEOUT) -> Any:
    transport = kernel.aio._state.transport
    content = {"comm_id": transport._comm_id, "data": data}
    request = transport._conn.request("shell", "comm_msg", content, buffers=buffers, matcher=transport.reply_matcher())
    return run(kernel, request, timeout)


def still_usable(kernel: kernelproxy.Kernel, n: int) -> None:
    assert kernel.call(operator.add, n, 1) == n + 1


def test_real_kernel_fuzz(kernel, transport):
    """~100 malformed requests per transport through a real kernel; each gets an error reply, the kernel lives."""
    if transport == "comm":  # server kernels use the comm transport too, over the websocket
        fuzz_comm_transport(kernel)
    elif transport == "lane":
        fuzz_lane_transport(kernel)
    else:
        fuzz_execute_transport(kernel)
    assert kernel.is_alive()


def fuzz_comm_transport(kernel: kernelproxy.Kernel) -> None:
    algorithm = kernel.aio._state.transport.digest

    @REAL_KERNEL
    @given(
        header=real_headers(),
        buffers=real_frames,
        how=st.sampled_from(["right", "right", "wrong", "none"]),
        raw_data=real_json,
    )
    def case(header, buffers, how, raw_data):
        CASES["real-comm"] += 1
        if how == "none":  # data that is not a request at all
            data = raw_data
        else:
            digest = comm_module.digest_frames(algorithm, buffers) if how == "right" else "0" * 64
            data = {"header": header, "digest": digest}
        reply = raw_comm_request(kernel, data, buffers)
        assert reply["msg_type"] == "comm_msg", reply["msg_type"]
        reply_data = reply["content"]["data"]
        header_back = check_reply_header(reply_data["header"])
        assert reply_data["digest"] == comm_module.digest_frames(algorithm, reply.get("buffers", []))
        if how != "right":
            assert is_protocol_error(header_back), header_back
        still_usable(kernel, CASES["real-comm"])

    case()
    print(f"\nFUZZ-CASES real kernel, comm transport: {CASES['real-comm']} malformed comm_msg requests")


def fuzz_lane_transport(kernel: kernelproxy.Kernel) -> None:
    """Malformed headers and frames over the lane (its envelope is the lane's own: only this user can write it)."""
    transport = kernel.aio._state.transport

    @REAL_KERNEL
    @given(header=real_headers(), frames=real_frames)
    def case(header, frames):
        CASES["real-lane"] += 1
        reply_header, _ = run(kernel, transport.request(header, frames))
        check_reply_header(reply_header)
        still_usable(kernel, CASES["real-lane"])

    case()
    print(f"\nFUZZ-CASES real kernel, lane: {CASES['real-lane']} malformed requests")


def fuzz_execute_transport(kernel: kernelproxy.Kernel) -> None:
    transport = kernel.aio._state.transport
    agent_expr = execute_module.AGENT

    @REAL_KERNEL
    @given(
        header=real_headers(),
        frames=real_frames,
        mangle=st.sampled_from(["json", "truncated-json", "text", "bad-base64", "unknown-upload", "helper"]),
        junk=real_text,
        inline_limit=st.integers(-5, 1 << 21),
    )
    def case(header, frames, mangle, junk, inline_limit):
        CASES["real-execute"] += 1
        header_json = json.dumps(header)
        frames_source = repr([execute_module._b64(frame) for frame in frames])
        if mangle == "truncated-json":
            header_json = header_json[: len(header_json) // 2]
        elif mangle == "text":
            header_json = junk
        elif mangle == "bad-base64":
            frames_source = repr([junk + "!", "%%%"])
        elif mangle == "unknown-upload":
            frames_source = repr("no-such-upload")
        if mangle == "helper":  # the chunk helpers with arguments that point nowhere
            expression = (
                f"{agent_expr}.put('no-such-upload', 0, 0, {junk!r})"
                if inline_limit % 2
                else f"{agent_expr}.get('no-such-reply', 0, 0, {inline_limit})"
            )
            with pytest.raises(kernelproxy.ProtocolError, match="agent failed in the kernel"):
                run(kernel, transport.expression(expression))
        else:
            expression = f"{agent_expr}.ex(globals(), {header_json!r}, {frames_source}, {inline_limit}, 'fuzz')"
            payload = check_reply_header(run(kernel, transport.expression(expression)))
            if mangle != "json":
                assert payload["status"] == "error", payload
            run(kernel, transport.expression(f"{agent_expr}.free('fuzz')"))
        still_usable(kernel, CASES["real-execute"])

    case()
    print(f"\nFUZZ-CASES real kernel, execute transport: {CASES['real-execute']} malformed execute expressions")


def test_real_comm_msg_without_data_gets_an_error_reply(kernel, transport):
    """A comm_msg whose content lacks 'data' must be answered (today the agent raises in on_msg, ipykernel
    logs it, and the request waits forever: here it fails after 5 s instead)."""
    if transport != "comm":
        pytest.skip("a comm_msg only reaches the agent over the comm transport")
    CASES["real-comm-no-data"] += 1
    transport_ = kernel.aio._state.transport
    content = {"comm_id": transport_._comm_id}
    request = transport_._conn.request("shell", "comm_msg", content, matcher=transport_.reply_matcher())
    try:
        reply = run(kernel, request, timeout=5)
    except (asyncio.TimeoutError, TimeoutError):
        pytest.fail("a comm_msg without 'data' got no reply within 5 s: a caller without a timeout hangs")
    finally:
        still_usable(kernel, 0)
    assert is_protocol_error(check_reply_header(reply["content"]["data"]["header"]))


def test_request_the_host_cannot_encode_fails_cleanly_and_leaves_nothing_pending(kernel, transport):
    """A name with a lone surrogate cannot be sent as JSON over the comm transport (the execute transport
    escapes it): either way the error must be kernelproxy's or the remote KeyError, and no request may stay
    registered as pending forever."""
    CASES["unencodable"] += 1
    connection = kernel.aio._state.connection
    pending_before = len(connection._pending)
    with pytest.raises(Exception) as info:  # the type is checked below
        kernel.pull("x\ud800")
    assert isinstance(info.value, (KeyError, kernelproxy.KernelProxyError)), repr(info.value)
    assert len(connection._pending) == pending_before, "a request that was never sent is still pending"
    still_usable(kernel, 1)
