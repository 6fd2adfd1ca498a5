"""Smoke tests against a real Enterprise Gateway and a real JupyterHub (tests/servers builds and starts them).

A smoke test per server (connect_server, call a function, close, which deletes
the kernel there), then what issue 13 asked of each: every verb, Enterprise
Gateway's KERNEL_* variables and its refusal of root said in its own words, a
kernel deleted there started again by restart() (or auto_restart), JupyterHub's
error pages without their HTML, and calls through its proxy that no longer wait
for a delayed ACK.
"""

from __future__ import annotations

import getpass
import os
import statistics
import sys
import time
import urllib.request

import cloudpickle
import helpers
import pytest
from helpers import every_verb

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(helpers)  # every_verb's lambdas go to the kernels

pytestmark = pytest.mark.servers


def _kernel_ids(server) -> set[str]:
    import json
    import urllib.request

    request = urllib.request.Request(server.url + "api/kernels", headers={"Authorization": f"token {server.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return {model["id"] for model in json.loads(response.read())}


def test_enterprise_gateway_smoke(enterprise_gateway):
    with kernelproxy.connect_server(
        enterprise_gateway.url, token=enterprise_gateway.token, env=enterprise_gateway.extra["kernel_env"]
    ) as k:
        assert k.call(pow, 2, 10) == 1024
        assert k.info.executable == sys.executable  # the gateway runs our Python's kernels: pickles match
        user = k.call(lambda: __import__("os").environ.get("KERNEL_USERNAME"))  # read in the kernel, not pickled here
        assert user == enterprise_gateway.extra["kernel_env"]["KERNEL_USERNAME"]
        kernel_id = k.info.kernel_id
        assert kernel_id in _kernel_ids(enterprise_gateway)
    assert kernel_id not in _kernel_ids(enterprise_gateway)


def test_jupyterhub_smoke(jupyterhub):
    assert jupyterhub.url.endswith(f"/user/{jupyterhub.extra['user']}/")
    with kernelproxy.connect_server(jupyterhub.url, token=jupyterhub.token) as k:
        assert k.call(pow, 2, 10) == 1024
        assert k.info.executable == sys.executable
        kernel_id = k.info.kernel_id
        assert kernel_id in _kernel_ids(jupyterhub)
    assert kernel_id not in _kernel_ids(jupyterhub)


# ---------------------------------------------------------------------- Enterprise Gateway out of the box (issue 13)

AS_ROOT = getpass.getuser() == "root"


def kernel_env() -> dict:
    return {name: value for name, value in os.environ.items() if name.startswith("KERNEL_")}


def test_enterprise_gateway_every_verb_with_the_environments_kernel_variables(enterprise_gateway, monkeypatch, capfd):
    """KERNEL_USERNAME and the other KERNEL_* variables go along as jupyter_server's gateway client sends them."""
    monkeypatch.setenv("KERNEL_USERNAME", enterprise_gateway.extra["kernel_env"]["KERNEL_USERNAME"])
    monkeypatch.setenv("KERNEL_KERNELPROXY_TEST", "forwarded")
    with kernelproxy.connect_server(enterprise_gateway.url, token=enterprise_gateway.token, startup_timeout=90) as k:
        seen = k.call(kernel_env)
        assert seen["KERNEL_USERNAME"] == enterprise_gateway.extra["kernel_env"]["KERNEL_USERNAME"]
        assert seen["KERNEL_KERNELPROXY_TEST"] == "forwarded"
        assert seen["KERNEL_LAUNCH_TIMEOUT"] == "90"
        every_verb(k, capfd)
        kernel_id = k.info.kernel_id
    assert kernel_id not in _kernel_ids(enterprise_gateway)


def test_enterprise_gateway_default_user_is_the_login_name(enterprise_gateway, monkeypatch):
    monkeypatch.delenv("KERNEL_USERNAME", raising=False)
    if AS_ROOT:
        # root may not start kernels there: the gateway's own words, not "wrong token", and no HTML
        with pytest.raises(kernelproxy.ServerError) as info:
            kernelproxy.connect_server(enterprise_gateway.url, token=enterprise_gateway.token)
        error = info.value
        assert not isinstance(error, kernelproxy.AuthenticationError)
        assert error.status == 403
        assert "User 'root' is not authorized" in str(error) and "KERNEL_USERNAME" in str(error)
        assert "<" not in str(error)
    else:
        with kernelproxy.connect_server(enterprise_gateway.url, token=enterprise_gateway.token) as k:
            assert k.call(kernel_env)["KERNEL_USERNAME"] == getpass.getuser()


def test_enterprise_gateway_kernel_username_root_is_refused_clearly(enterprise_gateway):
    with pytest.raises(kernelproxy.ServerError, match="KERNEL_USERNAME") as info:
        kernelproxy.connect_server(
            enterprise_gateway.url, token=enterprise_gateway.token, env={"KERNEL_USERNAME": "root"}
        )
    assert info.value.status == 403 and not isinstance(info.value, kernelproxy.AuthenticationError)


def test_enterprise_gateway_wrong_token(enterprise_gateway):
    with pytest.raises(kernelproxy.AuthenticationError) as info:
        kernelproxy.connect_server(enterprise_gateway.url, token="wrong", env=enterprise_gateway.extra["kernel_env"])
    assert info.value.status == 401


def test_enterprise_gateway_pool(enterprise_gateway):
    env = enterprise_gateway.extra["kernel_env"]
    with kernelproxy.KernelPool.from_server(enterprise_gateway.url, 2, token=enterprise_gateway.token, env=env) as pool:
        pool.push(offset=10)
        assert sorted(pool.map(lambda x: x + __import__("__main__").offset, range(8))) == list(range(10, 18))


def test_enterprise_gateway_kernel_deleted_there_restart_starts_a_new_one(enterprise_gateway):
    """The hint "call restart() for a fresh one" holds for a kernel culled or deleted on the server."""
    env = enterprise_gateway.extra["kernel_env"]
    with kernelproxy.connect_server(enterprise_gateway.url, token=enterprise_gateway.token, env=env) as k:
        old = k.info.kernel_id
        delete_kernel(enterprise_gateway, old)
        wait_for_death(k)
        with pytest.raises(kernelproxy.KernelDiedError, match=r"no longer exists .* call restart\(\) for a fresh one"):
            k.call(int)
        k.restart()
        assert k.info.kernel_id != old
        assert k.call(lambda: "fresh") == "fresh"
        assert k.info.kernel_id in _kernel_ids(enterprise_gateway)
    with kernelproxy.connect_server(
        enterprise_gateway.url, token=enterprise_gateway.token, env=env, auto_restart=True
    ) as k:
        delete_kernel(enterprise_gateway, k.info.kernel_id)
        with pytest.warns(kernelproxy.KernelRestartedWarning):
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert k.call(lambda: "fresh, automatically") == "fresh, automatically"
                    break
                except kernelproxy.KernelDiedError:  # died during the call: the next one restarts
                    assert time.monotonic() < deadline
                    time.sleep(0.5)


def delete_kernel(server, kernel_id: str) -> None:
    request = urllib.request.Request(
        server.url + f"api/kernels/{kernel_id}", method="DELETE", headers={"Authorization": f"token {server.token}"}
    )
    urllib.request.urlopen(request, timeout=30).close()


def wait_for_death(k: kernelproxy.Kernel) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            k.call(int)
        except kernelproxy.KernelDiedError:
            return  # kernelproxy noticed
        time.sleep(0.3)
    raise AssertionError("the deleted kernel was never reported dead")


# ---------------------------------------------------------------------- JupyterHub (issue 13)


def test_jupyterhub_every_verb_through_the_proxy(jupyterhub, capfd):
    with kernelproxy.connect_server(jupyterhub.url, token=jupyterhub.token) as k:
        every_verb(k, capfd)


def test_jupyterhub_wrong_token_and_wrong_url_say_so_without_html(jupyterhub):
    with pytest.raises(kernelproxy.AuthenticationError):
        kernelproxy.connect_server(jupyterhub.url, token="wrong")
    with pytest.raises(kernelproxy.ServerError) as info:
        kernelproxy.connect_server(jupyterhub.extra["hub_url"] + "nothing/here/", token=jupyterhub.token)
    assert not isinstance(info.value, kernelproxy.AuthenticationError)
    assert "<" not in str(info.value) and len(str(info.value)) < 600


def median_call_ms(url: str, token: str, *, pong: bool, calls: int = 100) -> float:
    from kernelproxy._wires.websocket_wire import WebsocketWire

    original = WebsocketWire._release_next
    if not pong:
        WebsocketWire._release_next = lambda self: None
    try:
        with kernelproxy.connect_server(url, token=token) as k:
            for _ in range(10):
                k.call(int)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                k.call(int)
                times.append(time.perf_counter() - started)
            return statistics.median(times) * 1e3
    finally:
        WebsocketWire._release_next = original


def test_jupyterhub_calls_through_the_proxy_do_not_wait_for_delayed_acks(jupyterhub, capsys):
    """Jupyter Server keeps Nagle on; behind the hub's proxy each reply waited for a delayed ACK (40 ms)."""
    before = median_call_ms(jupyterhub.url, jupyterhub.token, pong=False)
    after = median_call_ms(jupyterhub.url, jupyterhub.token, pong=True)
    direct = median_call_ms(jupyterhub.extra["direct_url"], jupyterhub.token, pong=True)
    with capsys.disabled():
        print(
            f"\ntrivial call through the hub's proxy: {before:.1f} ms without the pong, {after:.1f} ms with it; "
            f"direct to the single-user server: {direct:.1f} ms"
        )
    assert after < 35, f"{after:.1f} ms a call through the proxy: the delayed-ACK stall is back"


def test_jupyterhub_stopped_user_server_is_reported_as_such(jupyterhub):
    """Last: it stops the user's server (and starts it again). The hub's page says so; never 'wrong token'."""
    from servers import jupyterhub as hub

    hub._hub_api(jupyterhub, "DELETE", f"users/{jupyterhub.extra['user']}/server")
    deadline = time.monotonic() + 60
    while hub._hub_api(jupyterhub, "GET", f"users/{jupyterhub.extra['user']}").get("servers"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    try:
        with pytest.raises(kernelproxy.ServerError) as info:
            kernelproxy.connect_server(jupyterhub.url, token=jupyterhub.token)
        error = info.value
        assert not isinstance(error, kernelproxy.AuthenticationError)
        assert "no longer running" in str(error) and "<" not in str(error)
    finally:
        hub._spawn(jupyterhub)
