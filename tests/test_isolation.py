"""The proxy leaves no trace in the kernel: no execution count, outputs, history or stray names."""

from __future__ import annotations

import os
import queue
import sys
import time

import cloudpickle
import pytest
from jupyter_client import BlockingKernelClient

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])

AGENT_MODULE = "_kernelproxy_agent_v1"

# One silent expression that describes what the kernel's user-visible state looks like. Of the history
# database, which every kernel of this user shares (other tests' kernels write to it meanwhile), its own rows.
SNAPSHOT = """{
    'execution_count': get_ipython().execution_count,
    'Out': sorted(Out),
    '_oh': sorted(_oh),
    'In': len(In),
    'input_hist_raw': len(get_ipython().history_manager.input_hist_raw),
    'input_hist_parsed': len(get_ipython().history_manager.input_hist_parsed),
    'output_hist': sorted(get_ipython().history_manager.output_hist),
    'history_db_rows': get_ipython().history_manager.db.execute(
        'SELECT line, source FROM history WHERE session = ?', (get_ipython().history_manager.session_number,)
    ).fetchall(),
    'last_outputs': [repr(_), repr(__), repr(___)],
    'names': sorted(globals()),
    'sys_last_value': repr(getattr(__import__('sys'), 'last_value', None)),
}"""

PUBLIC_NAMES = "sorted(k for k in globals() if not k.startswith('_'))"


def snapshot(k: kernelproxy.Kernel) -> dict:
    return k.eval(SNAPSHOT)


def workload(k: kernelproxy.Kernel) -> None:
    """A bit of everything the API does, including failures and chunked transfers."""
    k.call(lambda: 1 + 1)
    k.call(print, "workload output")
    k.push(iso_pushed=42, iso_other=[1, 2])
    k.pull("iso_pushed")
    k.pull("iso_pushed", "iso_other")
    k["iso_item"] = "x"
    assert "iso_item" in k
    del k["iso_item"]
    k.eval("iso_pushed * 2")
    k.exec("iso_pushed2 = iso_pushed + 1\ndel iso_pushed2")
    k.call(lambda b: len(b), b"x" * (3 * 1024 * 1024))  # chunked upload
    k.call(lambda: b"y" * (3 * 1024 * 1024))  # chunked download
    k.submit(lambda: 2).result(timeout=30)
    with pytest.raises(ZeroDivisionError):
        k.call(lambda: 1 / 0)
    with pytest.raises(SyntaxError):
        k.exec("def (")
    with pytest.raises(KeyError):
        k.pull("iso_missing_name")
    with pytest.raises(kernelproxy.SerializationError):
        k.call(lambda: (i for i in ()))


def test_no_trace_in_ipython_state(kernel):
    before = snapshot(kernel)
    workload(kernel)
    after = snapshot(kernel)
    pushed = {"iso_pushed", "iso_other"}
    assert set(after["names"]) - set(before["names"]) == pushed
    assert set(before["names"]) - set(after["names"]) == set()
    for key in before:
        if key != "names":
            assert after[key] == before[key], key
    kernel.delete(*pushed)


def test_public_namespace_unchanged_except_pushed(kernel):
    before = kernel.eval(PUBLIC_NAMES)
    kernel.call(lambda: sum(range(10)))
    kernel.eval("len(globals())")
    kernel.push(only_this_one=1)
    after = kernel.eval(PUBLIC_NAMES)
    assert sorted(set(after) - set(before)) == ["only_this_one"]
    assert set(before) <= set(after)
    kernel.delete("only_this_one")
    assert kernel.eval(PUBLIC_NAMES) == before


def test_execution_count_unchanged_over_many_calls(kernel):
    count = kernel.eval("get_ipython().execution_count")
    for i in range(30):
        assert kernel.call(lambda i: i, i) == i
    assert kernel.eval("get_ipython().execution_count") == count


def test_agent_lives_in_sys_modules_not_user_namespace(kernel):
    assert kernel.eval(f"{AGENT_MODULE!r} in __import__('sys').modules") is True
    assert kernel.eval(f"__import__('sys').modules[{AGENT_MODULE!r}].PROTOCOL") == 1
    assert kernel.eval(f"__import__('sys').modules[{AGENT_MODULE!r}].__name__") == AGENT_MODULE
    assert AGENT_MODULE not in kernel
    # no user variable refers to the agent module or anything in it
    refs = kernel.eval(
        f"[k for k, v in list(globals().items()) "
        f"if v is __import__('sys').modules[{AGENT_MODULE!r}] "
        f"or getattr(v, '__module__', None) == {AGENT_MODULE!r}]"
    )
    assert refs == []
    # the host package itself is never imported in the kernel
    assert kernel.eval("'kernelproxy' in __import__('sys').modules") is False


@pytest.mark.local_kernel("listens on the kernel's IOPub socket directly")
def test_no_iopub_broadcasts_seen_by_other_frontends(kernel, transport):
    """Another client on the kernel's IOPub sees no execute_input/result/error from our requests.

    Over the lane it sees nothing at all: output goes to the caller only, on the lane.
    """
    client = BlockingKernelClient()
    client.load_connection_file(kernel.info.connection_file)
    client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    try:
        # the SUB socket only sees messages after its subscription reached the kernel
        deadline = time.monotonic() + 30
        subscribed = False
        while not subscribed and time.monotonic() < deadline:
            msg_id = client.kernel_info()
            client.get_shell_msg(timeout=10)
            try:
                while True:
                    msg = client.get_iopub_msg(timeout=0.5)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        subscribed = True
                        break
            except queue.Empty:
                pass
        assert subscribed, "the test client never saw IOPub messages"
        while True:  # drain
            try:
                client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                break

        workload(kernel)
        seen = []
        while True:
            try:
                seen.append(client.get_iopub_msg(timeout=1.0))
            except queue.Empty:
                break
    finally:
        client.stop_channels()
    kernel.delete("iso_pushed", "iso_other")
    types = {msg["msg_type"] for msg in seen}
    if transport == "lane":
        assert not types, f"requests over the lane were broadcast on IOPub as {types}"
        return
    assert types, "no IOPub traffic at all: the test did not observe the kernel"
    assert "stream" in types  # the workload printed, and that is forwarded to everyone
    forbidden = types & {"execute_input", "execute_result", "error", "display_data", "update_display_data"}
    assert not forbidden, f"our requests were broadcast as {forbidden}"


@pytest.mark.local_kernel('connects by connection file')
def test_connect_twice_to_one_kernel(kernel):
    path = kernel.info.connection_file
    kernel.exec(f"__import__('sys').modules[{AGENT_MODULE!r}].install_marker = 'first install'")
    agent_id = kernel.eval(f"id(__import__('sys').modules[{AGENT_MODULE!r}])")
    first = kernelproxy.connect(path)
    try:
        second = kernelproxy.connect(path)
        try:
            assert first.info.pid == second.info.pid == kernel.info.pid
            first.push(shared_between=[1, 2])
            assert second.pull("shared_between") == [1, 2]
            assert kernel.pull("shared_between") == [1, 2]
            assert second.call(os.getpid) == kernel.info.pid
            # the agent was not reinstalled: same module object, state kept
            for k in (first, second, kernel):
                assert k.eval(f"id(__import__('sys').modules[{AGENT_MODULE!r}])") == agent_id
                assert k.eval(f"__import__('sys').modules[{AGENT_MODULE!r}].install_marker") == "first install"
            # concurrent use from all three connections
            futures = [c.submit(lambda i: i * 3, i) for i in range(10) for c in (first, second, kernel)]
            assert sorted(f.result(timeout=60) for f in futures) == sorted(i * 3 for i in range(10) for _ in range(3))
        finally:
            second.close()
        assert first.call(lambda: "first still works") == "first still works"
    finally:
        first.close()
    # closing connections leaves the kernel (and the original Kernel) intact
    assert kernel.is_alive()
    assert kernel.pull("shared_between") == [1, 2]
    kernel.delete("shared_between")


@pytest.mark.local_kernel('connects a second host by connection file')
def test_agent_removed_behind_our_back(fresh_kernel, transport):
    """If the agent module vanishes from sys.modules, calls still work and new hosts can still connect."""
    k = fresh_kernel
    k.push(survives=1)
    k.exec(f"__import__('sys').modules.pop({AGENT_MODULE!r})")
    assert k.call(lambda: "works again") == "works again"
    assert k.pull("survives") == 1
    other = kernelproxy.connect(k.info.connection_file, transport=transport)
    try:
        assert other.pull("survives") == 1
        assert other.call(lambda: "second host") == "second host"
        assert k.call(lambda: "first host") == "first host"
    finally:
        other.close()
    assert k.call(lambda: "still") == "still"
