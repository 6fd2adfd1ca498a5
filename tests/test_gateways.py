"""Smoke tests against a real Enterprise Gateway and a real JupyterHub (tests/servers builds and starts them).

One test per server: connect_server, call a function, close (which deletes the
kernel there). What each server does differently, and what kernelproxy should
do about it, is issue 13's business; these tests only show that the servers run
our kernels and kernelproxy reaches them.
"""

from __future__ import annotations

import sys

import pytest

import kernelproxy

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
