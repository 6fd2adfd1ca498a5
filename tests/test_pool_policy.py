"""The pool's scheduling policy, without kernels: queue order, claiming, prefetch, and what a death means."""

from __future__ import annotations

import concurrent.futures

import pytest

from kernelproxy import CallInterrupted
from kernelproxy._pool import _policy as policy
from kernelproxy._pool._tasks import Task, TaskOptions, ThreadSink


def make_task(task_id: int, *, timeout: float | None = None, retries: int = 0) -> Task:
    options = TaskOptions(retries=retries, timeout=timeout)
    return Task(task_id, [], "fn", 1, options, ThreadSink(concurrent.futures.Future()), retries)


def test_queue_is_fifo_and_front_insertion_keeps_order():
    queue = policy.TaskQueue()
    a, b, c, d = (make_task(i) for i in range(4))
    queue.add([a, b])
    queue.add([c, d], front=True)
    assert [queue.pop(second=False) for _ in range(4)] == [c, d, a, b]
    assert queue.pop(second=False) is None and not queue


def test_pop_claims_the_task_and_skips_cancelled_ones():
    queue = policy.TaskQueue()
    cancelled, wanted = make_task(0), make_task(1)
    cancelled.sink.cancel()
    queue.add([cancelled, wanted])
    task = queue.pop(second=False)
    assert task is wanted and task.started
    assert wanted.sink.future.running()  # claimed: it can no longer be cancelled (concurrent.futures semantics)


def test_a_second_task_for_a_busy_kernel_is_never_one_with_a_timeout():
    queue = policy.TaskQueue()
    timed, plain = make_task(0, timeout=5), make_task(1)
    queue.add([timed, plain])
    assert queue.pop(second=True) is None  # order is kept: the timed task waits for an idle kernel
    assert queue.pop(second=False) is timed
    assert queue.pop(second=True) is plain


def test_an_abandoned_task_that_had_started_fails_instead_of_running_again():
    queue = policy.TaskQueue()
    task = make_task(0)
    future = task.sink.future
    queue.add([task])
    assert queue.pop(second=False) is task
    policy.abandon([task])
    queue.add([task], front=True)  # e.g. its kernel died and it went back to the queue
    assert queue.pop(second=False) is None
    with pytest.raises(CallInterrupted, match="abandoned"):
        future.result(0)
    assert task.sink.future is None  # a finished task lets go of its future and result (bpo-14406)


def test_abandon_cancels_only_tasks_not_yet_started():
    queue = policy.TaskQueue()
    started, waiting = make_task(0), make_task(1)
    queue.add([started, waiting])
    queue.pop(second=False)
    policy.abandon([started, waiting])
    assert waiting.sink.future.cancelled()
    assert not started.sink.future.cancelled()


def test_cancel_unstarted_keeps_started_tasks_queued():
    queue = policy.TaskQueue()
    retried, fresh = make_task(0), make_task(1)
    queue.add([retried])
    queue.pop(second=False)
    queue.add([retried, fresh])
    queue.cancel_unstarted()
    assert fresh.sink.future.cancelled()
    assert queue.take_all() == [retried]


@pytest.mark.parametrize(
    ("prefetch", "service", "default_timeout", "expected"),
    [
        (True, None, None, 1),  # no measurement yet
        (True, 0.01, None, 2),  # short tasks: hide the round trip
        (True, 0.5, None, 1),  # long tasks: never wait behind one
        (False, 0.01, None, 1),
        (True, 0.01, 3.0, 1),  # the kernel's calls have a timeout: its clock must not start early
    ],
)
def test_capacity(prefetch, service, default_timeout, expected):
    assert policy.capacity(prefetch=prefetch, service=service, default_timeout=default_timeout) == expected


def test_moving_service_weights_the_newest_sample():
    assert policy.moving_service(None, 1.0) == 1.0
    assert policy.moving_service(1.0, 0.0) == pytest.approx(1 - policy.SERVICE_WEIGHT)


def test_a_task_that_waited_behind_an_unfinished_one_never_ran_and_is_requeued_free():
    ahead, behind = make_task(0), make_task(1, retries=0)
    behind.behind = ahead  # ahead.ended is False: the kernel died while running it
    assert policy.fate_of_lost(behind) is policy.Fate.REQUEUE


def test_a_task_that_ran_is_retried_while_it_has_retries_then_fails():
    task = make_task(0, retries=1)
    assert policy.fate_of_lost(task) is policy.Fate.RETRY
    task.retries_left = 0
    assert policy.fate_of_lost(task) is policy.Fate.FAIL
    ahead = make_task(1)
    ahead.ended = True  # the task ahead had finished: this one ran
    task.behind = ahead
    assert policy.fate_of_lost(task) is policy.Fate.FAIL


def test_an_abandoned_task_is_never_run_again():
    task = make_task(0, retries=3)
    task.behind = make_task(1)
    task.abandoned = True
    assert policy.fate_of_lost(task) is policy.Fate.FAIL


def test_a_task_its_kernel_never_started_goes_back_without_a_retry():
    """Its kernel died idle: the task was sent (or not even sent) but never began (issue 13)."""
    from kernelproxy._protocol import Outcome, Stage

    for stage in (Stage.PREPARING, Stage.SENT):
        task = make_task(0, retries=0)
        task.outcome = Outcome(stage=stage)
        assert policy.fate_of_lost(task) is policy.Fate.REQUEUE_ONCE
        task.requeued_unseen = True  # once: a task that kills its kernel at once may not have said it started
        assert policy.fate_of_lost(task) is policy.Fate.FAIL
    started = make_task(1, retries=0)
    started.outcome = Outcome(stage=Stage.RUNNING)
    assert policy.fate_of_lost(started) is policy.Fate.FAIL


def test_remove_takes_one_task_out_of_the_queue():
    queue = policy.TaskQueue()
    tasks = [make_task(i) for i in range(3)]
    queue.add(tasks)
    assert queue.remove(tasks[1]) is True
    assert queue.remove(tasks[1]) is False
    assert [queue.pop(second=False).id, queue.pop(second=False).id] == [0, 2]
