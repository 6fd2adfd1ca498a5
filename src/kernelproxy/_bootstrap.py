"""Installing the agent in a kernel, and the version handshake.

The agent's source travels in one silent ``user_expressions`` entry that
executes it as module ``_kernelproxy_agent_v<N>`` in ``sys.modules``, unless a
module of that name (same protocol) and the same or a newer ``REVISION`` is
already there: installing is idempotent, several hosts can share a kernel, and
an older revision left in a long-lived kernel is replaced (keeping its kept
objects, so other hosts' refs still resolve). The same expression calls
``hello()``, whose JSON answer the host checks before any pickle is sent.
"""

from __future__ import annotations

import base64
import platform
import uuid
from importlib import resources
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from ._connection import KernelConnection
from ._exceptions import EnvironmentMismatchError, ProtocolError
from ._transports.execute import EXPRESSION_KEY, read_expression_result
from .agent import _agent as agent


def agent_source() -> str:
    return resources.files("kernelproxy.agent").joinpath("_agent.py").read_text(encoding="utf-8")


def install_expression(probe: str) -> str:
    """One expression: install the agent unless this revision or a newer one is there; return its hello(probe)."""
    source = base64.b64encode(agent_source().encode("utf-8")).decode("ascii")
    compile_source = (
        f"compile(__import__('base64').b64decode('{source}').decode('utf-8'), {agent.AGENT_FILENAME!r}, 'exec')"
    )
    return (
        "(lambda sys, name: sys.modules[name] "
        f"if getattr(sys.modules.get(name), 'REVISION', 0) >= {agent.REVISION} else "
        f"(lambda module: (exec({compile_source}, module.__dict__), module._install(module))[1])"
        "(__import__('types').ModuleType(name))"
        f")(__import__('sys'), {agent.MODULE_NAME!r}).hello({probe!r})"
    )


async def install_agent(connection: KernelConnection, *, shell: str | None = None) -> dict[str, Any]:
    """Install the agent (idempotently) and return its hello() description of the kernel.

    ``shell``: run it on that subshell (the main shell may be busy with someone's cell).
    """
    probe = uuid.uuid4().hex
    content = await connection.execute(
        {EXPRESSION_KEY: install_expression(probe)},
        extra={agent.CONTENT_KEY: probe},
        shell=shell,
        interruptible=False,  # abandoned (a timeout), it is left to finish: it takes milliseconds
    )
    hello = read_expression_result(content, shell)
    if not isinstance(hello, dict) or hello.get("protocol") != agent.PROTOCOL:
        raise ProtocolError(f"the kernel's agent answered the handshake with {hello!r:.200} (version mismatch?)")
    return hello


def check_environment(hello: dict[str, Any]) -> None:
    """Raise EnvironmentMismatchError listing every difference that breaks pickles between the two sides."""
    executable = hello.get("executable") or "the kernel's python"
    host_cloudpickle = cloudpickle.__version__
    if hello.get("cloudpickle") is None:
        raise EnvironmentMismatchError(
            f"the kernel's Python ({executable}) cannot import cloudpickle ({hello.get('cloudpickle_error')}). "
            f"Install it in the kernel's environment: {executable} -m pip install 'cloudpickle=={host_cloudpickle}'"
        )
    problems = []
    host_python = platform.python_version()
    if _major_minor(hello["python"]) != _major_minor(host_python):
        problems.append(f"Python {hello['python']} in the kernel, {host_python} here")
    if _major_minor(hello["cloudpickle"]) != _major_minor(host_cloudpickle):
        problems.append(f"cloudpickle {hello['cloudpickle']} in the kernel, {host_cloudpickle} here")
    if problems:
        raise EnvironmentMismatchError(
            "the kernel cannot exchange pickles with this process: "
            + "; ".join(problems)
            + f". Use the same Python major.minor and cloudpickle major.minor on both sides (kernel: {executable}); "
            f"for cloudpickle: {executable} -m pip install 'cloudpickle=={host_cloudpickle}'"
        )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])
