"""The lane's arena on its own (no kernel): regions are reused, and memory beyond what is kept goes, in time.

Pure bookkeeping over real memfd segments; the lane tests (test_lane.py) show
the same arena freed end to end through a kernel.
"""

from __future__ import annotations

import os
import time

import pytest

from kernelproxy.agent import _agent as agent

MB = 2**20
pytestmark = pytest.mark.skipif(not agent.LaneArena.supported(), reason="no memfd_create/posix_fallocate here")


@pytest.fixture
def arena():
    arena = agent.LaneArena()
    yield arena
    arena.close()


def test_a_freed_region_is_reused_without_a_new_segment(arena):
    first = arena.put(memoryview(b"x" * (2 * MB)))
    new, dropped = arena.take_news()
    assert [size for _, size, _ in new] == [agent.LANE_SEGMENT_MIN] and dropped == []
    arena.release(first[0], first[1])
    second = arena.put(memoryview(b"y" * (2 * MB)))
    assert second[:2] == first[:2] and arena.take_news() == ([], [])


def test_free_memory_beyond_the_kept_amount_goes_only_after_the_retention_time(arena, monkeypatch):
    monkeypatch.setattr(agent, "LANE_RETAIN", agent.LANE_SEGMENT_MIN)  # one minimal segment is kept for good
    monkeypatch.setattr(agent, "LANE_RETAIN_SECONDS", 0.2)
    small = arena.put(memoryview(b"s" * MB))
    big = arena.put(memoryview(bytes(agent.LANE_SEGMENT_MIN + MB)))  # too big for the first: a second segment
    segments = [segment for segment, _, _ in arena.take_news()[0]]
    assert len(segments) == 2 and arena.trim_due() is None  # nothing free yet
    arena.release(big[0], big[1])
    arena.release(small[0], small[1])
    due = arena.trim_due()
    assert due is not None and 0 < due <= 0.2
    assert not arena.trim()  # too early: a loop of big transfers would reuse it
    time.sleep(due + 0.05)
    assert arena.trim()
    assert arena.take_news() == ([], [big[0]])  # the peer is told which segment went
    assert arena.size == agent.LANE_SEGMENT_MIN and arena.trim_due() is None


def test_closing_the_arena_closes_every_segment_descriptor(arena):
    arena.put(memoryview(bytes(2 * MB)))
    fds = [fd for _, _, fd in arena._new] + [fd for fd, _, _ in arena._segments.values()]
    arena.close()
    for fd in set(fds):
        with pytest.raises(OSError):
            os.fstat(fd)
