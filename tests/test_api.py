"""Every verb of the public API, with real values, against a real ipykernel."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import decimal
import fractions
import math
import os
import platform
import sys
import time
from collections import OrderedDict, defaultdict, namedtuple

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from helpers import kernel_children, kill_new_kernels, wait_pid_gone

import kernelproxy

# Functions and classes of this module travel by value: the kernel cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------- things defined here


@dataclasses.dataclass
class Point:
    x: float
    y: float
    tags: list = dataclasses.field(default_factory=list)

    def norm2(self) -> float:
        return self.x * self.x + self.y * self.y


@dataclasses.dataclass(frozen=True)
class FrozenPair:
    left: int
    right: str


class Counter:
    """A plain class with state and methods."""

    def __init__(self, start: int) -> None:
        self.value = start

    def add(self, n: int) -> int:
        self.value += n
        return self.value

    def where(self) -> int:
        return os.getpid()


Pair = namedtuple("Pair", "a b")


def module_function(a, b, *, scale=1):
    return (a + b) * scale


def kernel_pid() -> int:
    return os.getpid()


def make_adder(n):
    def add(x):
        return x + n

    return add


# ---------------------------------------------------------------------- call


def test_call_runs_in_the_kernel_process(kernel):
    pid = kernel.call(kernel_pid)
    assert pid == kernel.info.pid
    assert pid != os.getpid()


def test_call_lambda_with_args_and_kwargs(kernel):
    assert kernel.call(lambda a, b, c=0: a * b + c, 6, 7, c=1) == 43


def test_call_module_function_with_keyword_only(kernel):
    assert kernel.call(module_function, 2, 3, scale=10) == 50


def test_call_closure_captures_host_values(kernel):
    offset = 1000
    data = {"k": [1, 2, 3]}
    assert kernel.call(lambda i: data["k"][i] + offset, 2) == 1003
    adder = make_adder(5)
    assert kernel.call(adder, 10) == 15


def test_call_builtin_function(kernel):
    assert kernel.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    assert kernel.call(divmod, 17, 5) == (3, 2)


def test_call_returns_none(kernel):
    assert kernel.call(lambda: None) is None


def test_call_bound_method_runs_on_a_copy(kernel):
    counter = Counter(10)
    assert kernel.call(counter.add, 5) == 15
    assert counter.value == 10  # the kernel mutated its own copy
    assert kernel.call(counter.where) == kernel.info.pid


def test_dataclass_round_trip(kernel):
    point = Point(3.0, 4.0, tags=["a", "b"])
    back = kernel.call(lambda p: p, point)
    assert isinstance(back, Point)
    assert back == point
    assert back is not point
    assert kernel.call(lambda p: p.norm2(), point) == 25.0
    frozen = kernel.call(lambda: FrozenPair(1, "x"))
    assert frozen == FrozenPair(1, "x")
    assert isinstance(frozen, FrozenPair)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frozen.left = 2


def test_instance_created_in_the_kernel_is_of_the_host_class(kernel):
    made = kernel.call(lambda: Counter(7))
    assert type(made) is Counter
    assert made.add(1) == 8


def test_class_itself_round_trips(kernel):
    assert kernel.call(lambda cls: cls.__name__, Point) == "Point"
    assert kernel.call(lambda: Point) is Point


def test_nested_containers_round_trip(kernel):
    value = {
        "list": [1, 2.5, "three", None, True],
        "tuple": (1, (2, (3, ()))),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a"}),
        "bytes": b"\x00\xffabc",
        "bytearray": bytearray(b"xyz"),
        "complex": 1 + 2j,
        "big_int": 2**200,
        "nested": {"deep": [{"deeper": [Point(1, 2)]}]},
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "namedtuple": Pair(1, "two"),
        "date": datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc),
        "decimal": decimal.Decimal("1.10"),
        "fraction": fractions.Fraction(1, 3),
        "unicode": "naïve ☃ 𝄞",
        "float_specials": [float("inf"), -0.0],
        1: "int key",
        ("tuple", "key"): "tuple key",
    }
    back = kernel.call(lambda v: v, value)
    assert back == value
    assert list(back["ordered"]) == ["b", "a"]
    assert isinstance(back["namedtuple"], Pair)
    assert type(back["bytearray"]) is bytearray
    assert str(back["float_specials"][1]) == "-0.0"


def test_defaultdict_and_self_reference_round_trip(kernel):
    counts = defaultdict(int, {"a": 1})
    loop: list = [1]
    loop.append(loop)
    back_counts, back_loop = kernel.call(lambda c, lst: (c, lst), counts, loop)
    assert back_counts["missing"] == 0  # still a defaultdict(int)
    assert back_loop[1] is back_loop


def test_nan_survives(kernel):
    back = kernel.call(lambda: float("nan"))
    assert math.isnan(back)


# ---------------------------------------------------------------------- numpy and pandas


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.linspace(0, 1, 7, dtype=np.float32),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
        np.array([True, False, True]),
        np.array(["2024-01-01", "2024-12-31"], dtype="datetime64[D]"),
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.asfortranarray(np.arange(200_000, dtype=np.float64).reshape(400, 500)),  # out-of-band, F order
        np.arange(300_000, dtype=np.uint16)[::3],  # non-contiguous view
        np.empty((0, 3), dtype=np.int8),
        np.array([{"a": 1}, None, "s"], dtype=object),
    ],
    ids=[
        "int64-2d", "float32", "complex", "bool", "datetime64",
        "structured", "fortran-big", "strided", "empty", "object",
    ],
)
def test_numpy_round_trip(kernel, array):
    back = kernel.call(lambda a: a, array)
    assert isinstance(back, np.ndarray)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    if array.dtype == object:
        assert list(back) == list(array)
    else:
        np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert back.flags.f_contiguous


def test_numpy_computation_in_kernel(kernel):
    a = np.random.default_rng(0).normal(size=(50, 50))
    result = kernel.call(lambda m: m @ m.T, a)
    np.testing.assert_allclose(result, a @ a.T)


def test_numpy_array_created_in_kernel_is_writable(kernel):
    for size in (10, 100_000):  # in-band and out-of-band buffers
        back = kernel.call(lambda n: np.arange(n, dtype=np.float64), size)
        assert back.flags.writeable
        back[0] = 42.0
        assert back[0] == 42.0
        assert back[-1] == size - 1


def test_pulled_array_is_writable(kernel):
    kernel.push(pulled_array=np.ones((400, 400)))  # 1.28 MB: out-of-band and over the inline limit
    back = kernel.pull("pulled_array")
    assert back.flags.writeable
    back[:] = 3
    assert back.sum() == 3 * 400 * 400
    assert kernel.eval("float(pulled_array.sum())") == 400 * 400  # the kernel's copy is untouched
    kernel.delete("pulled_array")


def test_array_pushed_into_kernel_is_writable_there(kernel):
    kernel.push(writable_probe=np.zeros(200_000))
    assert kernel.eval("writable_probe.flags.writeable") is True
    kernel.exec("writable_probe[:] = 1")
    assert kernel.eval("float(writable_probe.sum())") == 200_000
    del kernel["writable_probe"]


def test_big_array_round_trip_chunked(kernel):
    """40 MB each way: more than the inline limit and than one 16 MB chunk."""
    big = np.random.default_rng(1).random(5_000_000)
    assert big.nbytes == 40_000_000
    back = kernel.call(lambda a: a, big)
    assert back.dtype == big.dtype and back.shape == big.shape
    assert np.array_equal(back, big)
    assert back.flags.writeable
    # the kernel really received all of it, not just the beginning
    summary = kernel.call(lambda a: (a.shape, float(a[-1]), float(a.sum())), big)
    assert summary == (big.shape, float(big[-1]), float(big.sum()))


def test_big_bytes_round_trip(kernel):
    """bytes travel in-band: the pickle stream itself (frame 0) is chunked."""
    payload = os.urandom(33 * 1024 * 1024 + 7)
    back = kernel.call(lambda b: b, payload)
    assert type(back) is bytes
    assert back == payload


def test_big_bytearray_exact_chunk_multiple(kernel):
    payload = bytearray(os.urandom(32 * 1024 * 1024))  # exactly two 16 MB chunks
    back = kernel.call(lambda b: b, payload)
    assert type(back) is bytearray
    assert back == payload


def test_big_push_and_pull(kernel):
    big = np.arange(3_000_000, dtype=np.int64)  # 24 MB
    kernel.push(big_pushed=big)
    assert kernel.eval("int(big_pushed[-1])") == 2_999_999
    back = kernel.pull("big_pushed")
    assert np.array_equal(back, big)
    kernel.delete("big_pushed")


def test_dataframe_round_trip(kernel):
    frame = pd.DataFrame(
        {
            "i": np.arange(5, dtype=np.int32),
            "f": np.linspace(0, 1, 5),
            "s": list("abcde"),
            "cat": pd.Categorical(list("xyxyx")),
            "t": pd.date_range("2024-01-01", periods=5, freq="D", tz="UTC"),
        },
        index=pd.Index([10, 20, 30, 40, 50], name="idx"),
    )
    back = kernel.call(lambda df: df, frame)
    pd.testing.assert_frame_equal(back, frame)
    kernel.push(frame=frame)
    assert kernel.eval("int(frame['i'].sum())") == 10
    pd.testing.assert_frame_equal(kernel.pull("frame"), frame)
    kernel.delete("frame")


def test_big_dataframe_round_trip(kernel):
    frame = pd.DataFrame(np.random.default_rng(2).random((200_000, 4)), columns=list("abcd"))
    back = kernel.call(lambda df: df * 2, frame)
    pd.testing.assert_frame_equal(back, frame * 2)


def test_series_computed_in_kernel(kernel):
    series = kernel.call(lambda: pd.Series([1, 2, 3], name="n").cumsum())
    pd.testing.assert_series_equal(series, pd.Series([1, 3, 6], name="n"))


# ---------------------------------------------------------------------- push / pull / mapping


def test_push_kwargs_and_pull(kernel):
    kernel.push(pk_a=1, pk_b=[1, 2], pk_c=Point(0, 1))
    assert kernel.pull("pk_a") == 1
    a, b, c = kernel.pull("pk_a", "pk_b", "pk_c")
    assert (a, b, c) == (1, [1, 2], Point(0, 1))
    kernel.delete("pk_a", "pk_b", "pk_c")


def test_push_mapping(kernel):
    kernel.push({"pm_x": "from mapping", "pm_y": 2})
    assert kernel.pull("pm_x", "pm_y") == ("from mapping", 2)
    kernel.delete("pm_x", "pm_y")


def test_push_mapping_and_kwargs_kwargs_win(kernel):
    kernel.push({"pmk_a": 1, "pmk_b": 2}, pmk_b=20, pmk_c=30)
    assert kernel.pull("pmk_a", "pmk_b", "pmk_c") == (1, 20, 30)
    kernel.delete("pmk_a", "pmk_b", "pmk_c")


def test_push_nothing_is_a_no_op(kernel):
    before = kernel.eval("len(globals())")
    kernel.push()
    kernel.push({})
    assert kernel.eval("len(globals())") == before


def test_pushed_value_usable_by_later_calls_and_eval(kernel):
    kernel.push(shared_df=pd.DataFrame({"x": [1, 2, 3]}))
    assert kernel.eval("int(shared_df['x'].sum())") == 6
    kernel.exec("shared_total = int(shared_df['x'].sum()) * 2")
    assert kernel["shared_total"] == 12
    kernel.delete("shared_df", "shared_total")


def test_pull_single_name_returns_value_not_tuple(kernel):
    kernel.push(single=(1, 2))
    assert kernel.pull("single") == (1, 2)
    kernel.push(other=3)
    assert kernel.pull("single", "other") == ((1, 2), 3)
    kernel.delete("single", "other")


def test_mapping_access(kernel):
    kernel["mx"] = 5
    assert "mx" in kernel
    assert kernel["mx"] == 5
    kernel["mx"] = [5, 6]
    assert kernel["mx"] == [5, 6]
    del kernel["mx"]
    assert "mx" not in kernel
    assert kernel.contains("mx") is False


def test_contains_non_string_is_false(kernel):
    assert 5 not in kernel
    assert None not in kernel


def test_pull_missing_name_raises_keyerror(kernel):
    with pytest.raises(KeyError, match="definitely_missing"):
        kernel.pull("definitely_missing")
    with pytest.raises(KeyError):
        kernel["definitely_missing"]
    kernel.push(present=1)
    with pytest.raises(KeyError, match="also_missing"):
        kernel.pull("present", "also_missing")
    kernel.delete("present")


def test_delete_missing_name_raises_keyerror_and_deletes_nothing(kernel):
    with pytest.raises(KeyError, match="never_defined"):
        del kernel["never_defined"]
    kernel.push(keep_me=1)
    with pytest.raises(KeyError):
        kernel.delete("keep_me", "never_defined")
    assert "keep_me" in kernel  # nothing was deleted since one name was missing
    kernel.delete("keep_me")


def test_pull_without_names_is_typeerror(kernel):
    with pytest.raises(TypeError):
        kernel.pull()


def test_pull_non_string_name_is_typeerror(kernel):
    with pytest.raises(TypeError):
        kernel.pull(42)


@pytest.mark.parametrize("name", ["not an identifier", "1abc", "a-b", ""])
def test_push_non_identifier_raises_valueerror(kernel, name):
    with pytest.raises(ValueError, match="identifier"):
        kernel.push({name: 1})
    with pytest.raises(ValueError):
        kernel[name] = 1


def test_push_non_string_name_raises_valueerror(kernel):
    with pytest.raises(ValueError):
        kernel.push({1: "x"})


def test_kernel_is_not_iterable(kernel):
    with pytest.raises(TypeError):
        iter(kernel)


# ---------------------------------------------------------------------- exec / eval


def test_exec_defines_names_and_eval_reads_them(kernel):
    kernel.exec("import math\nexec_val = math.factorial(5)\ndef exec_fn(x):\n    return x * exec_val\n")
    assert kernel.eval("exec_val") == 120
    assert kernel.eval("exec_fn(2)") == 240
    assert kernel["exec_val"] == 120
    kernel.delete("math", "exec_val", "exec_fn")


def test_exec_numpy_then_eval(kernel):
    kernel.exec("import numpy as np")
    value = kernel.eval("np.arange(3).sum()")
    assert value == 3
    assert isinstance(value, np.integer)
    kernel.delete("np")


def test_exec_returns_none(kernel):
    assert kernel.exec("x_exec_none = 1") is None
    kernel.delete("x_exec_none")


def test_exec_syntax_error_is_syntaxerror(kernel):
    with pytest.raises(SyntaxError) as info:
        kernel.exec("x = 1\ndef broken(:\n    pass")
    assert info.value.lineno == 2


def test_eval_syntax_error_is_syntaxerror(kernel):
    with pytest.raises(SyntaxError):
        kernel.eval("1 +")
    with pytest.raises(SyntaxError):
        kernel.eval("x = 1")  # a statement is not an expression


def test_exec_runtime_error_reraised_with_type(kernel):
    with pytest.raises(ZeroDivisionError):
        kernel.exec("a_before = 1\n1 / 0\na_after = 2")
    assert "a_before" in kernel
    assert "a_after" not in kernel
    kernel.delete("a_before")


def test_eval_name_error(kernel):
    with pytest.raises(NameError, match="no_such_name_xyz"):
        kernel.eval("no_such_name_xyz + 1")


def test_exec_is_plain_python_not_ipython(kernel):
    with pytest.raises(SyntaxError):
        kernel.exec("%time 1")


def test_eval_returns_rich_values(kernel):
    assert kernel.eval("{'a': [1, 2], 'b': (3,)}") == {"a": [1, 2], "b": (3,)}
    assert kernel.eval("__import__('os').getpid()") == kernel.info.pid


def test_exec_code_sees_pushed_values_and_calls_see_exec_definitions(kernel):
    kernel.push(base_value=7)
    kernel.exec("def triple_base():\n    return base_value * 3")
    assert kernel.call(lambda: __import__("__main__").triple_base()) == 21
    kernel.delete("base_value", "triple_base")


# ---------------------------------------------------------------------- submit / remote


def test_submit_returns_concurrent_future(kernel):
    future = kernel.submit(lambda a, b: a ** b, 2, 10)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 1024


def test_submit_many_then_gather(kernel):
    futures = [kernel.submit(lambda i: i * i, i) for i in range(20)]
    done, _ = concurrent.futures.wait(futures, timeout=60)
    assert len(done) == 20
    assert [f.result() for f in futures] == [i * i for i in range(20)]


def test_submit_error_is_in_the_future(kernel):
    future = kernel.submit(lambda: {}["nope"])
    with pytest.raises(KeyError):
        future.result(timeout=30)


def test_remote_decorator(kernel):
    @kernel.remote
    def work(x, *, power=2):
        """Doc of work."""
        return os.getpid(), x**power

    assert work.__name__ == "work"
    assert work.__doc__ == "Doc of work."
    assert work(3) == (kernel.info.pid, 9)
    assert work(2, power=5) == (kernel.info.pid, 32)


def test_remote_decorator_uses_kernel_namespace(kernel):
    kernel.push(remote_factor=11)

    @kernel.remote
    def scaled(x):
        import __main__

        return x * __main__.remote_factor

    assert scaled(2) == 22
    kernel.delete("remote_factor")


# ---------------------------------------------------------------------- info


def test_info_fields(kernel, wire):
    info = kernel.info
    assert isinstance(info, kernelproxy.KernelInfo)
    assert info.implementation == "ipython"
    assert info.implementation_version
    assert info.python == platform.python_version()
    assert info.cloudpickle == cloudpickle.__version__
    assert info.pid == kernel.call(os.getpid)
    assert info.pid != os.getpid()
    assert info.executable == kernel.call(lambda: sys.executable)
    assert os.path.samefile(info.executable, sys.executable)
    assert info.hostname == platform.node()
    assert info.transport.split()[0] in ("execute", "comm", "lane")
    if wire == "websocket":  # reached through a server: no connection file here, the server's URL instead
        assert info.connection_file is None
        assert info.server and info.kernel_id and "websocket" in info.transport
    else:
        assert info.connection_file and os.path.isfile(info.connection_file)
        assert info.server is None and info.kernel_id is None
    assert info.agent_protocol == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.pid = 1


def test_info_transport_matches_request(kernel, transport):
    # Through a server, "auto" picks comm: binary buffers survive the websocket.
    assert kernel.info.transport.split()[0] == transport


def test_repr_mentions_pid(kernel):
    text = repr(kernel)
    assert text.startswith("<Kernel ")
    assert str(kernel.info.pid) in text


def test_is_alive(kernel):
    assert kernel.is_alive() is True


# ---------------------------------------------------------------------- options


def test_options_view_shares_the_kernel(kernel):
    view = kernel.options(timeout=30)
    assert isinstance(view, kernelproxy.Kernel)
    assert view.call_options.timeout == 30
    assert kernel.call_options.timeout is None  # the original is unchanged
    kernel.push(shared_by_view=123)
    assert view.pull("shared_by_view") == 123
    view.push(set_by_view=4)
    assert kernel.pull("set_by_view") == 4
    assert view.info.pid == kernel.info.pid
    assert view.call(os.getpid) == kernel.info.pid
    kernel.delete("shared_by_view", "set_by_view")


def test_options_views_chain(kernel):
    view = kernel.options(timeout=5).options(output="discard")
    assert view.call_options == kernelproxy.CallOptions(timeout=5, output="discard")
    assert view.options(timeout=None).call_options.timeout is None
    assert view.call(lambda: 1) == 1


@pytest.mark.parametrize(
    "bad",
    [{"timeout": 0}, {"timeout": -1}, {"output": "nowhere"}, {"output": None}],
    ids=["timeout-zero", "timeout-negative", "output-unknown", "output-none"],
)
def test_invalid_options_raise_valueerror(kernel, bad):
    with pytest.raises(ValueError):
        kernel.options(**bad)


def test_invalid_start_options_raise_valueerror_and_start_nothing():
    before = {proc.pid for proc in kernel_children()}
    try:
        with pytest.raises(ValueError):
            kernelproxy.start(timeout=-5)
        with pytest.raises(ValueError):
            kernelproxy.start(output="loud")
        time.sleep(0.5)
        assert not [proc for proc in kernel_children() if proc.pid not in before]
    finally:
        kill_new_kernels(before)


def test_invalid_transport_raises_valueerror_and_starts_nothing():
    before = {proc.pid for proc in kernel_children()}
    try:
        with pytest.raises(ValueError, match="transport"):
            kernelproxy.start(transport="carrier-pigeon")
        time.sleep(0.5)
        leaked = [proc for proc in kernel_children() if proc.pid not in before]
        assert not leaked, f"start() raised ValueError but left kernel processes running: {leaked}"
    finally:
        kill_new_kernels(before)  # keep the session's leak check about other tests


def test_connect_invalid_transport_raises_valueerror(kernel):
    with pytest.raises(ValueError, match="transport"):
        kernelproxy.connect(kernel.info.connection_file, transport="carrier-pigeon")
    assert kernel.call(lambda: 1) == 1


def test_context_manager_shuts_down_started_kernel(transport):
    with kernelproxy.start(transport=transport) as k:
        pid = k.info.pid
        assert k.call(os.getpid) == pid
    assert wait_pid_gone(pid, 10), "the kernel process outlived the with block"
    with pytest.raises(kernelproxy.KernelClosedError):
        k.call(os.getpid)
