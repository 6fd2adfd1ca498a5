"""Use kernels of a Jupyter Server (or Kernel Gateway, Enterprise Gateway) as remote Pythons.

    python examples/jupyter_server.py https://hub.example:8888 --token TOKEN
    python examples/jupyter_server.py            # starts a throwaway local `jupyter server` to show it

The kernel runs wherever the server puts it; this process talks to it over the
server's REST + websocket API, exactly as with a local kernel.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

import kernelproxy


def norm(matrix: np.ndarray) -> float:
    return float(np.linalg.norm(matrix))


@contextmanager
def local_server() -> Iterator[tuple[str, str]]:
    """A `jupyter server` on 127.0.0.1 with a random port and token, for the demo."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_hex(16)
    args = [sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tempfile.gettempdir()}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(150):
            try:
                request = urllib.request.Request(url + "api/status", headers={"Authorization": f"token {token}"})
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        yield url, token
    finally:
        server.terminate()
        server.wait(30)


def demo(url: str, token: str | None) -> None:
    with kernelproxy.connect_server(url, token=token) as k:  # starts a kernel there; deleted at the end
        print(f"kernel {k.info.kernel_id} on {k.info.server}, pid {k.info.pid} on {k.info.hostname}")
        print(f"transport: {k.info.transport}")
        matrix = np.random.default_rng(0).random((2000, 2000))  # 32 MB: sent in parts under the server's limit
        k.push(matrix=matrix)
        print("norm computed in the kernel:", k.call(norm, k.ref("matrix")))
        k.call(print, "this line was printed by the kernel")

    with kernelproxy.KernelPool.from_server(url, 2, token=token) as pool:
        print("squares from two server kernels:", list(pool.map(pow, range(8), [2] * 8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", help="the server's URL; none: start a local jupyter server")
    parser.add_argument("--token", default=os.environ.get("JUPYTER_TOKEN"), help="default: $JUPYTER_TOKEN")
    options = parser.parse_args()
    if options.url:
        demo(options.url, options.token)
        return
    try:
        import jupyter_server  # noqa: F401
    except ImportError:
        sys.exit("no URL given and jupyter_server is not installed: python -m pip install jupyter_server")
    with local_server() as (url, token):
        demo(url, token)


if __name__ == "__main__":
    main()
