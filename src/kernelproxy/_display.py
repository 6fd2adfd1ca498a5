"""How Kernel, KernelPool and RemoteRef show themselves in notebooks and IPython: their state, no round trip.

Everything shown is what kernelproxy already knows (``status``, ``info``, the
requests it is waiting for, the pool's queue); nothing here asks the kernel.
Each object gets ``_repr_html_`` (notebooks) and ``_repr_pretty_`` (IPython's
terminal and ``text/plain``).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._kernel import AsyncKernel
    from ._pool._scheduler import Scheduler
    from ._refs import _RefBase


def kernel_facts(kernel: AsyncKernel) -> list[tuple[str, str]]:
    """(label, value) pairs describing a kernel now."""
    status = kernel.status
    state: str = status.state
    if status.death:
        state += f" ({status.death})"
    facts: list[tuple[str, str]] = [("state", state)]
    connection = getattr(kernel._state, "connection", None)
    if status.state == "ready" and connection is not None:
        waiting = len(getattr(connection, "_pending", {}) or {})  # calls of this process not answered yet
        facts.append(("in flight", f"{waiting} request(s) from this process"))
    info = kernel._state.info
    if info is not None:
        facts.append(("process", f"pid {info.pid} on {info.hostname}"))
        facts.append(("Python", f"{info.python} ({info.executable})"))
        facts.append(("kernel", f"{info.implementation} {info.implementation_version}"))
        facts.append(("transport", info.transport))
        if info.server:
            facts.append(("server", f"{info.server}, kernel {info.kernel_id}"))
        elif info.connection_file:
            facts.append(("connection file", info.connection_file))
    owned = "started by kernelproxy: closing stops it" if status.owned else "attached: closing leaves it running"
    facts.append(("owned", owned))
    if status.restarts:
        facts.append(("restarts", str(status.restarts)))
    return facts


def table_html(title: str, facts: list[tuple[str, str]]) -> str:
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
        f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
        for label, value in facts
    )
    return f"<div><b>{html.escape(title)}</b><table>{rows}</table></div>"


def pretty(p: Any, title: str, facts: list[tuple[str, str]]) -> None:
    """Write ``title`` and indented facts to an IPython pretty printer."""
    p.text(title)
    for label, value in facts:
        p.break_()
        p.text(f"  {label}: {value}")


# ---------------------------------------------------------------------- pools


def pool_facts(scheduler: Scheduler | None) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """(summary facts, one row per kernel: index, state, process, tasks on it) of a pool now."""
    if scheduler is None or not scheduler.slots:
        return [("state", "not started")], []
    state = "shut down" if scheduler.closed else "broken: no kernel left" if scheduler.broken else "running"
    ready = len(scheduler.working_kernels())
    summary: list[tuple[str, str]] = [
        ("state", state),
        ("kernels", f"{ready} of {len(scheduler.slots)} ready"),
        ("tasks", f"{scheduler.running} running, {len(scheduler.queue)} queued"),
    ]
    rows = []
    for slot in scheduler.slots:
        status = slot.kernel.status
        kernel_state = "retired" if slot.retired else "being replaced" if not slot.ready else status.state
        info = slot.kernel._state.info
        where = f"pid {info.pid} on {info.hostname}" if info is not None else "?"
        rows.append([str(slot.index), kernel_state, where, str(len(slot.holding))])
    return summary, rows


POOL_COLUMNS = ["kernel", "state", "process", "tasks on it"]


def pool_html(title: str, scheduler: Scheduler | None) -> str:
    summary, rows = pool_facts(scheduler)
    head = "".join(f"<th style='text-align:left'>{column}</th>" for column in POOL_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    kernels = f"<table><tr>{head}</tr>{body}</table>" if rows else ""
    return table_html(title, summary)[: -len("</div>")] + kernels + "</div>"


def pool_pretty(p: Any, title: str, scheduler: Scheduler | None) -> None:
    summary, rows = pool_facts(scheduler)
    pretty(p, title, summary)
    for index, state, where, tasks in rows:
        p.break_()
        p.text(f"  kernel {index}: {state}, {where}, {tasks} task(s) on it")


# ---------------------------------------------------------------------- refs


def ref_html(ref: _RefBase) -> str:
    root = ref._root
    title = f"{type(ref).__name__} #{root.id}"
    if ref._path:
        text = html.escape(repr(ref))
        return f"<div><b>{html.escape(title)}</b>: <code>{text}</code></div>"
    return (
        f"<div><b>{html.escape(title)}</b>: a <code>{html.escape(root.type)}</code> kept in the kernel"
        f"<pre style='margin:0'>{html.escape(root.repr)}</pre></div>"
    )
