"""Call into a kernel that is already running (a notebook's, or one started by hand).

Usage:
    python examples/existing_kernel.py                 # starts a throwaway kernel itself, to show the flow
    python examples/existing_kernel.py kernel-1234     # a running kernel: connection file path or fragment

In a notebook, `%connect_info` prints the kernel's connection file.
"""

import os
import secrets
import subprocess
import sys
import tempfile
import time

from jupyter_client.connect import write_connection_file

import kernelproxy


def start_kernel_by_hand() -> tuple[str, subprocess.Popen]:
    """What a notebook server does: write a connection file, launch ipykernel on it."""
    path = os.path.join(tempfile.mkdtemp(), "kernel-example.json")
    write_connection_file(path, key=secrets.token_hex(32).encode())  # never run a kernel without a key
    process = subprocess.Popen(
        [sys.executable, "-m", "ipykernel_launcher", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return path, process


if len(sys.argv) > 1:
    connection_file, process = sys.argv[1], None
else:
    connection_file, process = start_kernel_by_hand()

try:
    with kernelproxy.connect(connection_file, startup_timeout=30) as kernel:
        kernel.exec("import platform; started_at = __import__('time').time()")
        print("connected to", kernel.info.implementation, kernel.info.implementation_version, "pid", kernel.info.pid)
        print("kernel namespace has", kernel.eval("len(globals())"), "names")
        print("kernel clock ahead of ours by", round(kernel.call(time.time) - time.time(), 3), "s")
    # Leaving the block disconnected us; the kernel keeps running: it is not ours to stop.

    if process is not None:  # the throwaway kernel we started above: stopping it explicitly is allowed
        with kernelproxy.connect(connection_file) as kernel:
            kernel.shutdown()
        process.wait(timeout=10)
        print("throwaway kernel stopped, exit code", process.returncode)
finally:
    if process is not None and process.poll() is None:
        process.kill()
