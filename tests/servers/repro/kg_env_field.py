"""Finding: on Jupyter Kernel Gateway, *any* ``env`` field in the start request shrinks the kernel's environment.

Its KernelsHandler.post gives the kernel only PATH, the variables in
``KernelGatewayApp.env_process_whitelist`` and the requested KERNEL_* (or
whitelisted) ones, instead of the gateway's whole environment. So sending
KERNEL_USERNAME to every server by default would take HOME, LANG, ... away from
Kernel Gateway kernels. Starts a Kernel Gateway from this venv (tests/helpers).

Usage: python tests/servers/repro/kg_env_field.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers

from helpers import start_kernel_gateway, stop_jupyter_server

import kernelproxy

gateway = start_kernel_gateway(Path(tempfile.mkdtemp(prefix="kg-env-")))
try:
    for env in (None, {"KERNEL_USERNAME": "alice"}):
        with kernelproxy.connect_server(gateway.url, token=gateway.token, env=env) as k:
            names = k.call(lambda: sorted(__import__("os").environ))
            print(f"env={env}: the kernel has {len(names)} variables; HOME: {'HOME' in names}, LANG: {'LANG' in names}")
            print("   ", names)
finally:
    stop_jupyter_server(gateway)
