"""Finding: after two *concurrent* kernel starts with env, Enterprise Gateway reuses one of their envs for later starts.

Its KernelHandler.post swaps ``kernel_manager.start_kernel`` for a partial
carrying the request's env and puts back what it saw when done; two requests
in flight at once (a KernelPool.from_server does that) restore each other's
partial, which then stays installed. Every later request without an ``env``
field gets the first client's KERNEL_* variables: the 403 for root disappears,
and kernels run with another client's KERNEL_USERNAME. Tests that start pools
before single kernels on one gateway see the 403 vanish because of this.

Usage: python tests/servers/repro/eg_env_leak.py SERVER.json   (on a freshly started gateway)
"""

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import kernelproxy

info = json.loads(Path(sys.argv[1]).read_text())
url, token = info["url"], info["token"]


def post_without_env():
    req = urllib.request.Request(
        url + "api/kernels", method="POST", data=b"{}", headers={"Authorization": f"token {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            kernel_id = json.loads(response.read())["id"]
        urllib.request.urlopen(
            urllib.request.Request(
                url + f"api/kernels/{kernel_id}", method="DELETE", headers={"Authorization": f"token {token}"}
            )
        ).close()
        return 201
    except urllib.error.HTTPError as exc:
        return exc.code


def kernel_vars(k):
    return k.call(lambda: {key: v for key, v in __import__("os").environ.items() if key.startswith("KERNEL_U")})


print("POST api/kernels {} on the fresh gateway ->", post_without_env())
with kernelproxy.KernelPool.from_server(url, 2, token=token, env={"KERNEL_USERNAME": "alice"}) as pool:
    print(
        "KernelPool.from_server(2, env={'KERNEL_USERNAME': 'alice'}): its kernels see",
        [kernel_vars(k) for k in pool.kernels],
    )
print("POST api/kernels {} afterwards ->", post_without_env())
with kernelproxy.connect_server(url, token=token) as k:
    print("connect_server(url, token=...) without env afterwards works; its kernel sees", kernel_vars(k))
