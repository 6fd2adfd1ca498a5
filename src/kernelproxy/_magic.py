"""The IPython extension: ``%load_ext kernelproxy`` gives the ``%%remote`` cell magic.

``%%remote k`` runs the rest of the cell in the kernel of ``k``, a ``Kernel``
or ``KernelPool`` variable of the notebook, through IPython's cell machinery
there (the agent's ``cell`` request runs ``shell.run_cell``, not stored in the
kernel's history): magics work, and the last expression is displayed, as in a
cell of that kernel. What the cell prints and displays appears in the calling
cell (``_output``), live for a Kernel. For a KernelPool the cell runs on every
kernel at once, and the output is shown when all are done, grouped per kernel
as ipyparallel's ``%%px`` does: each printed line prefixed ``[kernel i] ``,
each display after a ``[kernel i]`` line. An error is the cell's error: shown
with the remote frames only (the local ones would be IPython's magic
machinery), and the cell fails, as a local cell would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import _protocol as protocol
from ._exceptions import KernelDiedError, RemoteTraceback
from ._kernel import AsyncKernel
from ._output import Forwarder, capture, ipython_shell
from ._pool import KernelPool
from ._portal import Portal
from ._sync import Kernel
from ._tracebacks import render_remote, trim
from ._types import UNSET

USAGE = "%%remote KERNEL: run this cell in KERNEL, a Kernel or KernelPool variable of this notebook"


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext kernelproxy``: registers the ``%%remote`` cell magic.

    ``%%remote k`` runs the cell in the kernel of ``k`` (a ``Kernel``) or on every kernel of a
    ``KernelPool``, through IPython's cell machinery there (magics and the last expression's display
    work); its output, displays and errors appear in the calling cell.
    """
    ipython.register_magic_function(_remote_magic, magic_kind="cell", magic_name="remote")


def _remote_magic(line: str, cell: str) -> None:
    from IPython.core.error import UsageError

    shell = ipython_shell()
    name = line.strip()
    if not name:
        raise UsageError(USAGE)
    if name not in shell.user_ns:
        raise UsageError(f"%%remote: no variable {name!r} in this notebook ({USAGE})")
    target = shell.user_ns[name]
    if isinstance(target, Kernel):
        _run_on_kernel(target, cell)
    elif isinstance(target, KernelPool):
        _run_on_pool(target, cell)
    else:
        kind = type(target).__name__
        hint = " (for an AsyncKernel, await ak.call(...) instead)" if kind == "AsyncKernel" else ""
        raise UsageError(f"%%remote: {name} is a {kind}, not a Kernel or KernelPool{hint}")


def _run_on_kernel(kernel: Kernel, code: str) -> None:
    __tracebackhide__ = True  # noqa: F841
    try:
        kernel._portal.run(_run_cell(kernel.aio, code, None))
    except Exception as exc:
        _as_cell_error(exc, [(None, exc)])
        raise


async def _run_cell(kernel: AsyncKernel, code: str, listener: Any) -> None:
    await kernel._request(protocol.cell(code), [], None, "%%remote cell", UNSET if listener is None else listener)


class _Recorder:
    """Keeps one kernel's IOPub output, to show it after all kernels are done."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def __call__(self, msg: dict[str, Any]) -> None:
        if msg["msg_type"] in ("stream", "display_data", "execute_result", "update_display_data", "clear_output"):
            self.messages.append(msg)


def _run_on_pool(pool: KernelPool, code: str) -> None:
    __tracebackhide__ = True  # noqa: F841
    kernels = pool.kernels
    portal: Portal = pool._portal
    quiet = pool._pool._options.output == "discard"
    recorders = [_Recorder() for _ in kernels]

    async def run_all() -> list[BaseException | None]:
        results = await asyncio.gather(
            *(_run_cell(kernel.aio, code, recorder) for kernel, recorder in zip(kernels, recorders)),
            return_exceptions=True,
        )
        return [result if isinstance(result, BaseException) else None for result in results]

    if not kernels:
        raise KernelDiedError(f"%%remote: the pool has no working kernel now ({pool!r})")
    errors = portal.run(run_all())
    if not quiet:  # each kernel's output in turn, where this cell's own output goes
        context = capture()
        for index, recorder in enumerate(recorders):
            forwarder = Forwarder(context, prefix=f"[kernel {index}] ")
            for msg in recorder.messages:
                if msg["msg_type"] in ("display_data", "execute_result"):
                    forwarder.flush()
                    context.run(print, f"[kernel {index}]")  # a display carries no label of its own
                forwarder(msg)
            forwarder.flush()
    failed: list[tuple[int | None, BaseException]] = [(i, error) for i, error in enumerate(errors) if error is not None]
    if not failed:
        return
    for _, error in failed:
        if not isinstance(error, Exception):
            raise error
    first = failed[0][1]
    assert isinstance(first, Exception)
    raise _as_cell_error(first, failed)


def _as_cell_error(exc: Exception, errors: list[tuple[int | None, BaseException]]) -> Exception:
    """``exc``, rendered in IPython as the cell's own error: the remote frames of each failed kernel, no local ones."""
    trim(exc)
    cause = exc.__cause__
    if not isinstance(cause, RemoteTraceback) or not cause.stack:
        return exc

    def render_traceback() -> list[str]:
        shell = ipython_shell()
        lines: list[str] = []
        for index, error in errors:
            remote = error.__cause__
            if not isinstance(remote, RemoteTraceback) or not remote.stack:
                lines.append(f"[kernel {index}] {type(error).__name__}: {error}")
                continue
            if index is not None:
                lines.append(f"[kernel {index}]")
            lines.extend(block.rstrip("\n") for block in render_remote(shell, remote.stack))
        return lines

    try:
        exc._render_traceback_ = render_traceback  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return exc
