"""Jupyter Enterprise Gateway 3.x on 127.0.0.1, serving local kernels of our Python.

Enterprise Gateway runs from its own virtualenv (it pins jupyter_client 6);
its ``python3`` kernelspec is ours (``write_kernelspec``), launched by its
LocalProcessProxy. It runs as whatever user runs the tests: as root (CI) it
refuses, with HTTP 403, to start a kernel for a request that does not name a
``KERNEL_USERNAME`` (its ``unauthorized_users`` default to ``{"root"}``, and an
unnamed kernel user defaults to the gateway's own user). Clients therefore pass
``env={"KERNEL_USERNAME": ...}``; ``KERNEL_ENV`` below is that dict.
"""

from __future__ import annotations

import getpass
import uuid
from pathlib import Path

from . import envs
from .process import ServerProcess, free_port, launch, server_environment, wait_until_answers, write_kernelspec

KERNEL_USER = "kernelproxy-tests"  # never 'root': the gateway refuses to start kernels for root
KERNEL_ENV = {"KERNEL_USERNAME": KERNEL_USER}


def build() -> envs.BuiltEnv:
    return envs.python_venv("enterprise-gateway", envs.ENTERPRISE_GATEWAY)


def start(directory: Path, *extra_args: str) -> ServerProcess:
    """Start Enterprise Gateway with a random port and token; ``stop()`` it (``process.stop``) when done."""
    venv = build()
    jupyter_path = directory / "jupyter-path"
    write_kernelspec(jupyter_path)
    port = free_port()
    token = uuid.uuid4().hex
    args = [
        str(venv.bin("jupyter-enterprisegateway")),
        "--EnterpriseGatewayApp.ip=127.0.0.1",
        f"--EnterpriseGatewayApp.port={port}",
        "--EnterpriseGatewayApp.port_retries=0",
        f"--EnterpriseGatewayApp.auth_token={token}",
        "--EnterpriseGatewayApp.list_kernels=True",  # GET api/kernels (off by default: 403)
        # The gateway's restarter notices a dead kernel within half a second (default 3 s), as in the other servers.
        "--KernelRestarter.time_to_dead=0.5",
        *extra_args,
    ]
    env = server_environment(
        jupyter_path,
        # Kernel state files and the gateway's own runtime files stay in this session's directory.
        JUPYTER_RUNTIME_DIR=str(directory / "runtime"),
        JUPYTER_DATA_DIR=str(directory / "data"),
        JUPYTER_CONFIG_DIR=str(directory / "config"),
    )
    process, log = launch("enterprise-gateway", args, directory, env)
    server = ServerProcess(
        "Enterprise Gateway",
        f"http://127.0.0.1:{port}/",
        token,
        process,
        log,
        directory,
        extra={"run_as": getpass.getuser(), "kernel_env": dict(KERNEL_ENV), "venv": str(venv.path)},
    )
    # api/kernelspecs answers once the gateway is up; api/kernels would need list_kernels (set above anyway).
    wait_until_answers(server, "api/kernelspecs", headers={"Authorization": f"token {token}"})
    return server
