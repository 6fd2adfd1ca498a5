"""Several kernels behind one ``concurrent.futures.Executor``.

* ``_tasks``: what a task is and where its outcome goes (futures of either API).
* ``_policy``: the scheduling rules, free of I/O (tested without kernels).
* ``_supervisor``: the kernels: starting, replacing the dead, replaying pushes.
* ``_scheduler``: the queue and one worker per kernel, on one event loop.
* ``_async``: AsyncKernelPool, the one implementation; ``_sync``: KernelPool, its blocking facade.
"""

from ._async import AsyncKernelPool, AsyncMapResult
from ._sync import KernelPool

__all__ = ["AsyncKernelPool", "AsyncMapResult", "KernelPool"]
