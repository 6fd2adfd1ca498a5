"""The pool's scheduling policy, free of I/O: which task goes next, to how many, and what a kernel's death means.

* One FIFO queue; retried tasks and tasks that never ran go to its front.
* A kernel holds one task, or two when its recent tasks were short
  (``PREFETCH_UNDER``): the second, sent while the first runs, hides the round
  trip. Over the lane, a kernel whose tasks are tiny (``DEEP_UNDER``) holds up
  to ``DEEP_MAX``, a few milliseconds of work, while the next task runs the function those durations were
  measured on (a slow function after tiny ones must not be sent 16 at a time: a map's timeout could not
  cancel them, and they would not spread over the kernels). Never a task with a timeout as the second one
  (its clock would start early), and never two on a kernel whose calls have a default timeout.
* A task sent to a kernel that died: if the kernel was busy with the task
  ahead of it, it never started and goes back to the front without using a
  retry. If the kernel never said it started it (no IOPub 'busy': it died idle
  before the task arrived), it goes back once without using a retry: a kernel
  that dies within milliseconds of starting a task may not have said so
  either, and such a task must not kill kernel after kernel. Otherwise it
  runs again while it has retries, else it fails.

Tested without kernels (tests/test_pool_policy.py).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable

from .._exceptions import CallInterrupted
from .._protocol import Stage
from ._tasks import Task

PREFETCH_UNDER = 0.1  # seconds: a kernel whose tasks take less gets its next task before the current one ends
# Over the lane, a kernel whose tasks are tiny holds enough of them for this long (up to DEEP_MAX): it goes
# from one to the next without waiting for the host, and neither side sleeps (and is woken) between tasks.
DEEP_UNDER = 0.002
DEEP_WORK = 0.004
DEEP_MAX = 16
SERVICE_WEIGHT = 0.3  # weight of the newest task in a kernel's moving average of task durations


class TaskQueue:
    """The tasks waiting for a kernel, in order."""

    def __init__(self) -> None:
        self._tasks: collections.deque[Task] = collections.deque()

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def add(self, tasks: list[Task], *, front: bool = False) -> None:
        if front:
            self._tasks.extendleft(reversed(tasks))
        else:
            self._tasks.extend(tasks)

    def peek(self) -> Task | None:
        """The task ``pop()`` would consider first (it may be dropped or refused there)."""
        return self._tasks[0] if self._tasks else None

    def pop(self, *, second: bool) -> Task | None:
        """The next task to run and claim it; None if none may run now.

        ``second``: for a kernel that already runs one, so none with a timeout.
        Tasks cancelled before they started are dropped; tasks abandoned by
        their caller after they started (a retry of an abandoned map item) fail.
        """
        while self._tasks:
            task = self._tasks[0]
            if second and task.options.timeout is not None:
                return None
            self._tasks.popleft()
            if task.abandoned and task.started:
                task.sink.fail(CallInterrupted(f"task {task.id} was abandoned by its caller"))
            elif task.started or task.sink.claim():
                task.started = True
                return task
        return None

    def remove(self, task: Task) -> bool:
        """Take ``task`` out of the queue; say whether it was there."""
        try:
            self._tasks.remove(task)
        except ValueError:
            return False
        return True

    def cancel_unstarted(self) -> None:
        """Cancel the tasks that never started (shutdown(cancel_futures=True))."""
        self._tasks = collections.deque(task for task in self._tasks if task.started or not task.sink.cancel())

    def take_all(self) -> list[Task]:
        tasks, self._tasks = list(self._tasks), collections.deque()
        return tasks


def capacity(*, prefetch: bool, service: float | None, default_timeout: float | None, deep: bool = False) -> int:
    """How many tasks a kernel may hold: two only while its tasks are short, more over the lane when tiny.

    ``deep``: over the lane, and the next task runs the function ``service`` was measured on.
    """
    if not prefetch or service is None or service >= PREFETCH_UNDER or default_timeout is not None:
        return 1
    if deep and service < DEEP_UNDER:
        return max(2, min(DEEP_MAX, int(DEEP_WORK / max(service, 1e-6))))
    return 2


def moving_service(previous: float | None, sample: float) -> float:
    """A kernel's moving average of its tasks' own durations."""
    return sample if previous is None else (1 - SERVICE_WEIGHT) * previous + SERVICE_WEIGHT * sample


class Fate(enum.Enum):
    """What becomes of a task whose kernel died under it."""

    REQUEUE = "requeue"  # it never ran: again, at the front, no retry used
    REQUEUE_ONCE = "requeue once"  # its kernel never said it started it: again, once, no retry used
    RETRY = "retry"  # it ran: again, at the front, one retry used
    FAIL = "fail"  # it ran and has no retries left (or nobody wants it)


def fate_of_lost(task: Task) -> Fate:
    if task.behind is not None and not task.behind.ended and not task.abandoned:
        return Fate.REQUEUE  # the kernel was still busy with the task ahead of it
    unseen = task.outcome is not None and task.outcome.stage in (Stage.PREPARING, Stage.SENT)
    if unseen and not task.requeued_unseen and not task.abandoned:
        return Fate.REQUEUE_ONCE  # the kernel never said it started it (it died idle, before the task arrived)
    if task.retries_left > 0 and not task.abandoned:
        return Fate.RETRY
    return Fate.FAIL


def abandon(tasks: Iterable[Task]) -> None:
    """The caller gave these up (map() closed early): cancel those not yet sent to a kernel.

    Those already sent run to the end, as with concurrent.futures; their
    results are dropped and they are not retried. Interrupting them would
    race: the interrupt can land on the kernel's next call instead.
    """
    for task in tasks:
        task.abandoned = True
        if not task.started:
            task.sink.cancel()
