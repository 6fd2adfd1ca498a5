"""A long-lived kernel that still runs an older agent revision gets this one, and keeps other hosts' objects."""

from __future__ import annotations

import pytest

import kernelproxy
from kernelproxy.agent import _agent as agent

MAKE_IT_OLD = f"""
import sys
_agent_module = sys.modules[{agent.MODULE_NAME!r}]
_agent_module.REVISION = 1            # what an older kernelproxy left behind...
del _agent_module._restore_code       # ...lacking what this one's pickles need
del _agent_module
"""


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_an_older_agent_revision_is_upgraded_and_its_objects_survive(external_kernel, transport):
    with kernelproxy.connect(external_kernel.connection_file, transport=transport) as first:
        kept = first.call_ref(list, [1, 2, 3])
        first.exec(MAKE_IT_OLD)
        assert first.eval(f"__import__('sys').modules[{agent.MODULE_NAME!r}].REVISION") == 1
        with kernelproxy.connect(external_kernel.connection_file, transport=transport) as second:
            assert second.info.agent_revision == agent.REVISION
            assert second.call(lambda x: x * 2, 21) == 42  # pickled code needs _restore_code: the new revision
            assert kept.get() == [1, 2, 3]  # the first host's object was taken over, not dropped
            assert first.call(lambda: "first still works") == "first still works"


def test_a_newer_agent_is_left_in_place(external_kernel):
    """An older kernelproxy must not downgrade a kernel's agent: revisions only go up."""
    with kernelproxy.connect(external_kernel.connection_file) as first:
        first.exec(f"__import__('sys').modules[{agent.MODULE_NAME!r}].REVISION = {agent.REVISION + 1}")
        with kernelproxy.connect(external_kernel.connection_file) as second:
            assert second.info.agent_revision == agent.REVISION + 1
            assert second.call(sum, [1, 2]) == 3
