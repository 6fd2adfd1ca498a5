"""Functions pickled by value travel once per kernel; a changed one travels again; the kernel's cache is bounded."""

from __future__ import annotations

import pytest

import kernelproxy
from kernelproxy import _serialization as serialization

AGENT = "__import__('sys').modules['_kernelproxy_agent_v1']"


def define(source: str, name: str) -> tuple[dict, object]:
    """A function defined in a namespace no one can import: cloudpickle sends it by value, with its globals."""
    namespace: dict = {"__name__": "not_importable_here"}
    exec(source, namespace)
    return namespace, namespace[name]


@pytest.fixture
def sent(kernel, monkeypatch):
    """The headers of every request the kernel's transport sends."""
    headers: list[dict] = []
    transport = kernel.aio._state.transport
    original = transport.request

    async def spy(header, frames, **kwargs):
        headers.append(dict(header))
        return await original(header, frames, **kwargs)

    monkeypatch.setattr(transport, "request", spy)
    return headers


def definitions(headers: list[dict]) -> list[str]:
    return [digest for header in headers for digest in header.get("define", [])]


def test_a_function_travels_once_then_by_digest(kernel, sent, monkeypatch):
    _, scale = define("def scale(x):\n    return 3 * x\n", "scale")
    pickled: list[object] = []
    real_dumps = serialization.dumps

    def counting_dumps(value, **kwargs):
        if value is scale:
            pickled.append(value)
        return real_dumps(value, **kwargs)

    monkeypatch.setattr(serialization, "dumps", counting_dumps)
    assert [kernel.call(scale, n) for n in range(5)] == [0, 3, 6, 9, 12]
    assert len(definitions(sent)) == 1 and sent[0]["define"] and not any("define" in h for h in sent[1:])
    assert len(pickled) == 1  # unchanged: not pickled again either


def test_changed_functions_are_sent_again(kernel, sent):
    namespace, scale = define("FACTOR = 2\ndef scale(x):\n    return x * FACTOR\n", "scale")
    assert kernel.call(scale, 3) == 6
    namespace["FACTOR"] = 5  # a global it names, rebound
    assert kernel.call(scale, 3) == 15
    scale.__defaults__ = None
    _, other = define("def other(x):\n    return x - 1\n", "other")
    scale.__code__ = other.__code__  # its code
    assert kernel.call(scale, 3) == 2
    _, with_default = define("def with_default(x=1):\n    return x\n", "with_default")
    assert kernel.call(with_default) == 1
    with_default.__defaults__ = (10,)  # its defaults
    assert kernel.call(with_default) == 10
    assert len(set(definitions(sent))) == 5


def test_closures_and_mutable_globals_are_seen_as_they_are_now(kernel):
    namespace, read = define("CONFIG = {'a': 1}\ndef read():\n    return CONFIG['a']\n", "read")
    assert kernel.call(read) == 1
    namespace["CONFIG"]["a"] = 2  # changed in place: a dict is pickled anew for each call
    assert kernel.call(read) == 2

    def make():
        value = 1

        def get():
            return value

        def put(new):
            nonlocal value
            value = new

        return get, put

    get, put = make()
    assert kernel.call(get) == 1
    put(7)  # its closure's value
    assert kernel.call(get) == 7
    helper_ns, uses_helper = define(
        "def helper():\n    return 'a'\ndef uses_helper():\n    return helper()\n", "uses_helper"
    )
    assert kernel.call(uses_helper) == "a"
    exec("def helper():\n    return 'b'\n", helper_ns)  # a helper it calls, redefined
    assert kernel.call(uses_helper) == "b"


def test_a_recursive_function_is_cached(kernel, sent):
    _, fib = define("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "fib")
    assert [kernel.call(fib, n) for n in (10, 11, 12)] == [55, 89, 144]
    assert len(definitions(sent)) == 1


def test_a_function_the_kernel_lost_is_sent_again(kernel, sent):
    _, triple = define("def triple(x):\n    return 3 * x\n", "triple")
    assert kernel.call(triple, 1) == 3
    kernel.exec(f"{AGENT}._functions.clear(); {AGENT}._function_bytes[0] = 0")  # as after an eviction
    assert kernel.call(triple, 2) == 6  # the kernel answered 'missing'; the host sent it again
    assert len(definitions(sent)) == 2


def test_the_kernels_cache_is_bounded(kernel):
    kernel.exec(f"_kp_saved = {AGENT}.FUNCTION_CACHE_ENTRIES; {AGENT}.FUNCTION_CACHE_ENTRIES = 5")
    try:
        functions = [define(f"def f{i}():\n    return {i}\n", f"f{i}")[1] for i in range(12)]
        assert [kernel.call(fn) for fn in functions] == list(range(12))
        assert kernel.eval(f"len({AGENT}._functions)") == 5
        assert kernel.call(functions[0]) == 0  # evicted long ago: sent again
    finally:
        kernel.exec(f"{AGENT}.FUNCTION_CACHE_ENTRIES = _kp_saved; del _kp_saved")


def test_tracebacks_keep_their_source_when_only_the_digest_travels(kernel):
    def fails(x):
        raise ValueError(f"bad {x}")  # this line shows in the kernel's traceback

    for n in (1, 2):
        with pytest.raises(ValueError, match=f"bad {n}") as info:
            kernel.call(fails, n)
        assert "this line shows in the kernel's traceback" in info.value.__cause__.traceback


def test_big_closures_are_not_cached():
    big = bytes(2 * serialization.FUNCTION_PAYLOAD_MAX)

    def uses_big():
        return len(big)

    assert serialization.FUNCTIONS.reference(uses_big) is None
    assert serialization.FUNCTIONS.reference(len) is None  # pickled by name anyway
    assert serialization.FUNCTIONS.reference(kernelproxy.connect) is None


def test_a_pool_sends_a_function_once_per_kernel():
    _, square = define("def square(x):\n    return x * x\n", "square")
    with kernelproxy.KernelPool(2) as pool:
        assert list(pool.map(square, range(200))) == [x * x for x in range(200)]
        kernels = pool._pool._scheduler().working_kernels()
        assert all(len(k._state.sent_functions) == 1 for k in kernels)
