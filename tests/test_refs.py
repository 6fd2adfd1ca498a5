"""RemoteRef: objects that stay in the kernel, used by handle (over every transport)."""

from __future__ import annotations

import asyncio
import gc
import sys
import time

import cloudpickle
import numpy as np
import pytest

import kernelproxy

cloudpickle.register_pickle_by_value(sys.modules[__name__])

class Model:
    def __init__(self, weight):
        self.weight = weight
        self.coef_ = np.array([weight, weight * 2.0])
        self.calls = 0

    def predict(self, x):
        self.calls += 1
        return x * self.coef_

    def fail(self):
        raise ValueError(f"model {self.weight} cannot do that")


class Unpicklable:
    """Lives only in the kernel: holds a lock, which cannot be pickled."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.value = 41

    def bump(self):
        self.value += 1
        return self.value


def kept_ids(kernel):
    return set(kernel.eval("list(__import__('_kernelproxy_agent_v1')._objects)"))


def wait_until_released(kernel, ids, timeout=5.0):
    """Whether the kernel dropped every object in ``ids`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if not ids & kept_ids(kernel):
            return True
        time.sleep(0.05)
    return False


def test_call_ref_keeps_the_object_and_methods_return_values(kernel):
    model = kernel.call_ref(Model, 3.0)
    assert isinstance(model, kernelproxy.RemoteRef)
    np.testing.assert_array_equal(model.predict(2.0), [6.0, 12.0])
    np.testing.assert_array_equal(model.predict(1.0), [3.0, 6.0])
    assert model.calls.get() == 2  # state persists in the kernel: the same object both times


def test_attribute_chains_are_lazy_and_get_copies(kernel):
    model = kernel.call_ref(Model, 2.0)
    coef = model.coef_
    assert isinstance(coef, kernelproxy.RemoteRef)
    assert "not fetched" in repr(coef)
    np.testing.assert_array_equal(coef.get(), [2.0, 4.0])
    assert coef[1].get() == 4.0
    assert len(coef) == 2


def test_repr_describes_the_object_without_fetching_it(kernel):
    kernel.exec("big = list(range(10))")
    ref = kernel.ref("big")
    assert repr(ref).startswith("<RemoteRef #") and "list" in repr(ref) and "[0, 1, 2" in repr(ref)


def test_ref_to_a_variable_and_refs_as_arguments_arrive_as_the_kernels_objects(kernel):
    kernel.push(table={"a": 1})
    table = kernel.ref("table")
    assert kernel.call(lambda t: t is __import__("__main__").table, table)  # the same object, not a copy
    kernel.call(lambda t: t.update(b=2), table)
    assert kernel.pull("table") == {"a": 1, "b": 2}
    model = kernel.call_ref(Model, 1.0)
    np.testing.assert_array_equal(kernel.call(lambda m, c: m.predict(3.0) + c, model, model.coef_), [4.0, 8.0])


def test_ref_to_missing_variable_raises_key_error(kernel):
    with pytest.raises(KeyError, match="no_such_variable"):
        kernel.ref("no_such_variable")


def test_unpicklable_objects_stay_usable_by_handle(kernel):
    thing = kernel.call_ref(Unpicklable)
    assert thing.bump() == 42
    assert thing.value.get() == 42
    with pytest.raises(kernelproxy.SerializationError):
        thing.get()
    with pytest.raises(kernelproxy.SerializationError):
        thing.lock.get()
    assert thing.bump() == 43  # the failed fetches changed nothing


def test_call_ref_on_a_ref_keeps_the_method_result(kernel):
    model = kernel.call_ref(Model, 5.0)
    prediction = model.call_ref("predict", 2.0)
    assert isinstance(prediction, kernelproxy.RemoteRef)
    np.testing.assert_array_equal(prediction.get(), [10.0, 20.0])
    assert (prediction * 2).tolist() == [20.0, 40.0]


def test_operators_need_one_round_trip_each(kernel):
    kernel.push(numbers=[1, 2, 3])
    numbers = kernel.ref("numbers")
    assert numbers + [4] == [1, 2, 3, 4]
    assert 2 in numbers and 5 not in numbers
    assert bool(numbers) and len(numbers) == 3
    with pytest.raises(TypeError, match="cannot be iterated"):
        iter(numbers)


def test_errors_inside_ref_calls_keep_their_type(kernel):
    model = kernel.call_ref(Model, 7.0)
    with pytest.raises(ValueError, match="model 7.0 cannot do that") as info:
        model.fail()
    assert "cannot do that" in str(info.value.__cause__)
    with pytest.raises(AttributeError, match="no_such_method"):
        model.no_such_method()
    assert model.predict(1.0).tolist() == [7.0, 14.0]


def test_private_and_reserved_names_need_attr(kernel):
    kernel.push(mapping={"get": 1})
    mapping = kernel.ref("mapping")
    with pytest.raises(AttributeError, match="attr"):
        mapping._private  # noqa: B018
    assert mapping.attr("get")("get") == 1  # the remote dict's own .get, not RemoteRef.get
    assert mapping.get() == {"get": 1}


def test_kernel_releases_the_object_when_the_last_handle_is_collected(kernel):
    model = kernel.call_ref(Model, 1.0)
    model_id = {model._root.id}
    coef = model.coef_  # a derived ref keeps the root alive
    assert model_id <= kept_ids(kernel)
    del model
    gc.collect()
    time.sleep(0.2)
    assert model_id <= kept_ids(kernel)
    assert coef.get().tolist() == [1.0, 2.0]
    del coef
    assert wait_until_released(kernel, model_id), "the kernel kept an object no host handle points to"


def test_many_refs_are_released_in_batches(kernel):
    refs = [kernel.call_ref(list, range(i)) for i in range(50)]
    ids = {ref._root.id for ref in refs}
    assert len(ids) == 50 and ids <= kept_ids(kernel)
    del refs
    assert wait_until_released(kernel, ids)


def test_ref_from_another_kernel_is_refused_with_a_clear_error(kernel):
    with kernelproxy.start() as other:
        foreign = other.call_ref(list, [1, 2])
        with pytest.raises(kernelproxy.SerializationError, match="another kernel"):
            kernel.call(len, foreign)
        assert kernel.call(len, foreign.get()) == 2


def test_refs_after_restart_are_stale_and_after_shutdown_closed(fresh_kernel):
    model = fresh_kernel.call_ref(Model, 1.0)
    fresh_kernel.restart()
    with pytest.raises(kernelproxy.StaleRefError, match="restarted"):
        model.predict(1.0)
    with pytest.raises(kernelproxy.StaleRefError):
        fresh_kernel.call(lambda m: m, model)
    fresh = fresh_kernel.call_ref(Model, 2.0)
    fresh_kernel.shutdown()
    with pytest.raises(kernelproxy.KernelClosedError):
        fresh.get()


def test_async_refs_return_coroutines(transport):
    async def main():
        async with await kernelproxy.start_async(transport=transport) as kernel:
            model = await kernel.call_ref(Model, 4.0)
            prediction = await model.predict(1.0)
            kept = await model.call_ref("predict", 2.0)
            return prediction.tolist(), (await kept.get()).tolist()

    assert asyncio.run(main()) == ([4.0, 8.0], [8.0, 16.0])


def test_async_refs_refuse_answers_python_needs_at_once(transport):
    """bool/in/len/iteration cannot await: an AsyncRemoteRef says so instead of answering wrongly."""

    async def main():
        async with await kernelproxy.start_async(transport=transport) as kernel:
            ref = await kernel.call_ref(list, [1, 2, 3])
            assert isinstance(ref, kernelproxy.AsyncRemoteRef)
            for attempt in (lambda: bool(ref), lambda: 99 in ref, lambda: len(ref), lambda: list(ref)):
                with pytest.raises(TypeError, match="await"):
                    attempt()
            assert await ref.get() == [1, 2, 3]
            assert await ref.attr("__len__")() == 3
            assert await (ref + [4]) == [1, 2, 3, 4]
            assert await ref[1].get() == 2
            named = await kernel.ref("__name__")
            assert isinstance(named, kernelproxy.AsyncRemoteRef) and await named.get() == "__main__"

    asyncio.run(main())


def test_blocking_refs_answer_at_once(kernel):
    ref = kernel.call_ref(list, [1, 2, 3])
    assert isinstance(ref, kernelproxy.RemoteRef) and not isinstance(ref, kernelproxy.AsyncRemoteRef)
    assert bool(ref) is True and (99 in ref) is False and (2 in ref) is True and len(ref) == 3
    assert isinstance(ref[0], kernelproxy.RemoteRef) and ref[0].get() == 1
    assert isinstance(ref.call_ref("copy"), kernelproxy.RemoteRef)
