"""Finding: Enterprise Gateway run as root refuses kernels whose request names no KERNEL_USERNAME.

Usage: python tests/servers/repro/eg_kernel_username.py SERVER.json
(SERVER.json written by ``python tests/servers/serve.py eg SERVER.json``).
Prints the raw HTTP exchange and what kernelproxy reports for each case.
"""

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import kernelproxy

info = json.loads(Path(sys.argv[1]).read_text())
url, token = info["url"], info["token"]


def post(body):
    request = urllib.request.Request(
        url + "api/kernels",
        method="POST",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def delete(kernel_id):
    request = urllib.request.Request(
        url + f"api/kernels/{kernel_id}", method="DELETE", headers={"Authorization": f"token {token}"}
    )
    urllib.request.urlopen(request, timeout=30).close()


for label, body in [
    ("no env", {"name": "python3"}),
    ("env without KERNEL_USERNAME", {"name": "python3", "env": {"KERNEL_FOO": "1"}}),
    ("KERNEL_USERNAME=root", {"name": "python3", "env": {"KERNEL_USERNAME": "root"}}),
    ("KERNEL_USERNAME=alice", {"name": "python3", "env": {"KERNEL_USERNAME": "alice"}}),
]:
    status, ctype, text = post(body)
    print(f"--- POST api/kernels {json.dumps(body)}  ({label})")
    print(f"HTTP {status}  Content-Type: {ctype}  body ({len(text)} chars): {text[:600]!r}")
    if status == 201:
        delete(json.loads(text)["id"])

for label, env in [
    ("connect_server(url, token=...)", None),
    ("connect_server(..., env={'KERNEL_USERNAME': 'alice'})", {"KERNEL_USERNAME": "alice"}),
]:
    print(f"--- kernelproxy.{label}")
    try:
        with kernelproxy.connect_server(url, token=token, env=env) as k:
            print("works: call ->", k.call(pow, 2, 10))
    except kernelproxy.KernelProxyError as exc:
        print(f"{type(exc).__name__} (status {getattr(exc, 'status', None)}): {exc}")
