"""The pickler's fast paths for numpy arrays: exact round trips, and the data really out-of-band.

datetime64/timedelta64 arrays of 64 KB and more travel as their int64 data in an out-of-band buffer
(numpy alone would copy them into the pickle stream); object arrays of mostly ``str`` with 8192
elements and more travel as one UTF-8 buffer (numpy alone would pickle every string). Both reductions
live in the agent and run on both sides, so every round trip below crosses each of them twice.
"""

from __future__ import annotations

import pickle
import sys

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from kernelproxy import _serialization as serialization
from kernelproxy.agent import _agent as agent

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIG = 100_000  # elements: 800 KB of datetime64, well over the 64 KB out-of-band threshold


def same_array(back: np.ndarray, original: np.ndarray) -> None:
    """Equal bit for bit (NaT included), same dtype, shape, type, memory order and writability.

    A read-only array comes back read-only, as numpy's own out-of-band arrays do (pickle's READONLY_BUFFER).
    """
    assert type(back) is np.ndarray
    assert back.dtype == original.dtype
    assert back.shape == original.shape
    if original.dtype.kind in "mM":
        np.testing.assert_array_equal(back.view(np.int64), original.view(np.int64))
    else:
        assert elements(back) == elements(original)
    assert back.flags.writeable == original.flags.writeable
    if original.flags.f_contiguous and not original.flags.c_contiguous:
        assert back.flags.f_contiguous


def elements(array: np.ndarray) -> list[tuple[type, str]]:
    """Type and repr of each element: NaN equals NaN here, and a str subclass differs from str."""
    return [(type(x), repr(x)) for x in array.ravel().tolist()]


def with_nat(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[::7] = np.datetime64("NaT") if array.dtype.kind == "M" else np.timedelta64("NaT")
    return array


def datetimes(n: int, unit: str = "ns") -> np.ndarray:
    return np.datetime64("2020-01-01", unit) + np.arange(n).astype(f"m8[{unit}]") * 997


DATETIME_ARRAYS = {
    "big-ns": datetimes(BIG),
    "big-ns-nat": with_nat(datetimes(BIG)),
    "big-days": datetimes(BIG, "D"),
    "big-timedelta-nat": with_nat(np.arange(BIG).astype("m8[us]")),
    "big-fortran": np.asfortranarray(datetimes(BIG).reshape(250, 400)),
    "big-non-contiguous": datetimes(3 * BIG)[::3],
    "big-big-endian": datetimes(BIG).astype(">M8[ns]"),
    "big-readonly-source": np.frombuffer(datetimes(BIG).tobytes(), dtype="M8[ns]"),
    "small": datetimes(10),
    "zero-d": np.array(np.datetime64("2024-02-29T12:00", "ns")),
    "zero-d-nat": np.array(np.timedelta64("NaT", "s")),
    "empty": np.empty((0, 3), dtype="M8[ms]"),
}

STRING_ARRAYS = {
    "big-ascii": np.array([f"user-{i % 1000}" for i in range(BIG)], dtype=object),
    # None, NaN, pd.NA, a str subclass, a tuple, empty strings, non-ASCII and a lone surrogate
    "big-with-holes": np.array(
        (["a", "", "héllo", "\ud800x", "😀", None, float("nan"), pd.NA, np.str_("np"), (1, 2)] * (BIG // 10)),
        dtype=object,
    ),
    "big-fortran": np.asfortranarray(np.array([str(i) for i in range(BIG)], dtype=object).reshape(400, 250)),
    "big-non-contiguous": np.array([str(i) for i in range(3 * BIG)], dtype=object)[::3],
    "big-with-nul": np.array(["a\0b"] + ["c"] * BIG, dtype=object),  # declines: normal pickling
    "big-mostly-not-str": np.array([1] * BIG + ["s"], dtype=object),  # declines: normal pickling
    "small": np.array(["x", None, "y"], dtype=object),
}


# ---------------------------------------------------------------------- in this process


@pytest.fixture
def as_in_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host pickles name the kernel's agent module: let this process resolve it, as a kernel does."""
    monkeypatch.setitem(sys.modules, agent.MODULE_NAME, agent)


def local_round_trip(value: object) -> object:
    frames = serialization.dumps(value)
    return pickle.loads(frames[0], buffers=[bytearray(frame) for frame in frames[1:]])  # as received: writable


def test_big_datetime_array_travels_out_of_band() -> None:
    for array in (datetimes(BIG), np.arange(BIG).astype("m8[ns]"), np.asfortranarray(datetimes(BIG).reshape(400, 250))):
        frames = serialization.dumps(array)
        assert len(frames) == 2
        assert frames[1].nbytes == array.nbytes
        assert frames[0].nbytes < 1024
    # the agent pickles the same way in the other direction
    frames = agent.dumps(datetimes(BIG))
    assert [frame.nbytes for frame in frames[1:]] == [BIG * 8]


def test_datetime_frame_columns_travel_out_of_band() -> None:
    frame = pd.DataFrame(
        {
            "naive": pd.date_range("2020-01-01", periods=BIG, freq="s"),
            "aware": pd.date_range("2020-01-01", periods=BIG, freq="s", tz="Europe/Paris"),
            "delta": pd.timedelta_range(0, periods=BIG, freq="ms"),
        }
    )
    frames = serialization.dumps(frame)
    assert sorted(frame.nbytes for frame in frames[1:]) == [BIG * 8] * 3
    assert frames[0].nbytes < 4096


def test_small_and_non_contiguous_datetime_arrays_stay_in_band() -> None:
    for name in ("small", "zero-d", "empty", "big-non-contiguous"):
        assert len(serialization.dumps(DATETIME_ARRAYS[name])) == 1, name


def test_string_array_travels_as_one_buffer() -> None:
    array = STRING_ARRAYS["big-ascii"]
    frames = serialization.dumps(array)
    assert len(frames) == 2
    assert frames[1].nbytes == sum(len(s) + 1 for s in array) - 1  # the NUL-joined UTF-8 text
    assert frames[0].nbytes < 1024
    assert len(serialization.dumps(STRING_ARRAYS["big-with-nul"])) == 1


@pytest.mark.parametrize("name", list(DATETIME_ARRAYS))
def test_datetime_array_local_round_trip(name: str) -> None:
    array = DATETIME_ARRAYS[name]
    same_array(local_round_trip(array), array)


@pytest.mark.parametrize("name", list(STRING_ARRAYS))
def test_string_array_local_round_trip(as_in_kernel: None, name: str) -> None:
    array = STRING_ARRAYS[name]
    back = local_round_trip(array)
    assert isinstance(back, np.ndarray)
    same_array(back, array)


def test_agent_round_trip_in_this_process(as_in_kernel: None) -> None:
    """The agent's own dumps, paired with the host's loads (the kernel's side is tested through kernels below)."""
    array = STRING_ARRAYS["big-with-holes"]
    frames = agent.dumps({"s": array, "t": DATETIME_ARRAYS["big-ns-nat"]})
    assert len(frames) == 3
    back = serialization.loads(frames)
    same_array(back["s"], array)
    same_array(back["t"], DATETIME_ARRAYS["big-ns-nat"])


# ---------------------------------------------------------------------- through a real kernel, both transports


@pytest.mark.parametrize("name", list(DATETIME_ARRAYS))
def test_datetime_array_round_trip(kernel, name):
    array = DATETIME_ARRAYS[name]
    back = kernel.call(lambda a: a, array)
    same_array(back, array)


@pytest.mark.parametrize("name", list(STRING_ARRAYS))
def test_string_array_round_trip(kernel, name):
    array = STRING_ARRAYS[name]
    back = kernel.call(lambda a: a, array)
    same_array(back, array)


def test_arrays_arrive_exact_and_writable_in_the_kernel(kernel):
    kernel.push(dt_probe=DATETIME_ARRAYS["big-ns-nat"], str_probe=STRING_ARRAYS["big-with-holes"])
    described = kernel.eval(
        "(str(dt_probe.dtype), dt_probe.flags.writeable, int(__import__('numpy').isnat(dt_probe).sum()),"
        " str_probe.flags.writeable, [type(x).__name__ for x in str_probe[:10]], str_probe[3])"
    )
    nat = int(np.isnat(DATETIME_ARRAYS["big-ns-nat"]).sum())
    kinds = ["str", "str", "str", "str", "str", "NoneType", "float", "NAType", "str_", "tuple"]
    assert described == ("datetime64[ns]", True, nat, True, kinds, "\ud800x")
    kernel.delete("dt_probe", "str_probe")


def test_kernel_sends_big_datetime_and_string_arrays_out_of_band(kernel):
    def layout():
        agent_module = sys.modules["_kernelproxy_agent_v1"]
        values = (
            np.arange(100_000).astype("M8[ns]"),
            np.array([str(i) for i in range(100_000)], dtype=object),
        )
        return [[frame.nbytes for frame in agent_module.dumps(value)[1:]] for value in values]

    dt_frames, str_frames = kernel.call(layout)
    assert dt_frames == [800_000]
    assert len(str_frames) == 1


def frame_with_every_time_kind(rows: int) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "naive": pd.date_range("2020-01-01", periods=rows, freq="s"),
            "aware": pd.date_range("2020-03-29", periods=rows, freq="min", tz="Europe/Paris"),
            "utc_ms": pd.date_range("2020-01-01", periods=rows, freq="ms", tz="UTC").as_unit("ms"),
            "delta": pd.timedelta_range(0, periods=rows, freq="us"),
            "python_str": pd.array([f"s{i}" for i in range(rows)], dtype=pd.StringDtype("python")),
            "python_nan_str": pd.array([f"n{i}" for i in range(rows)], dtype=pd.StringDtype("python", np.nan)),
        },
        index=pd.date_range("1999-12-31", periods=rows, freq="h", name="when"),
    )
    frame["object_str"] = pd.Series([f"o{i % 97}" for i in range(rows)], dtype=object, index=frame.index)
    frame.iloc[::5, frame.columns.get_loc("naive")] = pd.NaT
    frame.iloc[::6, frame.columns.get_loc("aware")] = pd.NaT
    frame.iloc[::7, frame.columns.get_loc("delta")] = pd.NaT
    frame.iloc[::8, frame.columns.get_loc("python_str")] = pd.NA
    frame.iloc[::4, frame.columns.get_loc("python_nan_str")] = np.nan
    frame.iloc[::9, frame.columns.get_loc("object_str")] = None
    return frame


@pytest.mark.parametrize("rows", [3, BIG], ids=["small", "big"])
def test_dataframe_time_and_string_columns_round_trip(kernel, rows):
    frame = frame_with_every_time_kind(rows)
    kernel.push(time_frame=frame)
    assert kernel.eval("str(time_frame['aware'].dtype)") == str(frame["aware"].dtype)
    assert kernel.eval("int(time_frame['naive'].isna().sum())") == int(frame["naive"].isna().sum())
    back = kernel.pull("time_frame")
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert frame["object_str"].dtype == object
    assert list(back.dtypes) == list(frame.dtypes)
    computed = kernel.call(lambda df: df.assign(later=df["naive"] + df["delta"]), frame)
    pd.testing.assert_frame_equal(computed, frame.assign(later=frame["naive"] + frame["delta"]), check_exact=True)
    kernel.delete("time_frame")
